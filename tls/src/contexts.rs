//! rustls contexts built from a compiled config: one server context per TLS listener, one client
//! context per TLS cluster. Built on the control thread before a config is swapped in, so a bad
//! certificate or key rejects the config like any other error and the running one stays.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use keel_config::{
    ConfigError, DownstreamTls, Identity, Pem, Protocol, ServerTls, Snapshot, TlsVersion,
    UpstreamTls, UpstreamTlsMode,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use crate::spiffe::{spiffe_ids, SpiffeId};
use crate::verify::{
    ClientIdentity, IdentityClientVerifier, IdentityServerVerifier, ServerIdentity,
};

/// Where Debian keeps the system's trusted roots (SIMPLE / MUTUAL without `caCertificates`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// ALPN an HTTP listener accepts, HTTP/2 first; TCP listeners negotiate none.
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN a mesh (ISTIO_MUTUAL) HTTP listener accepts: also Istio's own names, which sidecars
/// offer so that the server can tell HTTP from TCP on a port of undeclared protocol.
const MESH_HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1", b"istio-http/1.1", b"istio-h2"];

/// ALPN a mesh listener of undeclared protocol accepts: the HTTP names and Istio's TCP ones.
const MESH_AUTO_ALPN: &[&[u8]] = &[
    b"h2",
    b"http/1.1",
    b"istio-http/1.1",
    b"istio-h2",
    b"istio",
    b"istio-peer-exchange",
];

/// What an HTTP/1.1 client offers over mesh mTLS, as an Envoy sidecar does.
const MESH_HTTP1_ALPN: &[u8] = b"istio-http/1.1";

/// What a worker needs to secure the connections of one config version.
#[derive(Default)]
pub struct TlsContexts {
    /// By listener index: the server context of a listener that terminates TLS.
    pub listeners: Vec<Option<Arc<ServerConfig>>>,
    /// By cluster index: how to originate TLS to its endpoints.
    pub clusters: Vec<Option<UpstreamContext>>,
    /// Our own SPIFFE id (`By=` in x-forwarded-client-cert).
    pub identity: Option<SpiffeId>,
}

impl std::fmt::Debug for TlsContexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContexts")
            .field(
                "listeners",
                &self.listeners.iter().filter(|l| l.is_some()).count(),
            )
            .field(
                "clusters",
                &self.clusters.iter().filter(|c| c.is_some()).count(),
            )
            .finish()
    }
}

/// TLS origination to one cluster.
pub struct UpstreamContext {
    /// For TCP: no ALPN offered.
    pub config: Arc<ClientConfig>,
    /// For HTTP/1.1: over mesh mTLS offering `istio-http/1.1` (so a sidecar's port of undeclared
    /// protocol knows it is HTTP); otherwise the same as `config`.
    pub config_http1: Arc<ClientConfig>,
    /// For HTTP/2: the same settings offering ALPN `h2`, which TLS servers (and Envoy
    /// sidecars) need to speak HTTP/2 on the connection.
    pub config_h2: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Distinguishes pooled connections by TLS settings and identity: connections made with one
    /// context are never handed to another (0 is plaintext).
    pub pool_key: u64,
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = preferred_suites(p.cipher_suites);
            Arc::new(p)
        })
        .clone()
}

/// ring's suites, AES-128-GCM first (then AES-256-GCM, then ChaCha20), as BoringSSL (Envoy)
/// orders them. The suite's hash also drives the TLS 1.3 key schedule: SHA-256 runs on the CPU's
/// SHA extensions where SHA-384 is plain code in ring, which was 12% of a full handshake's CPU.
/// Listeners choose by this order (`ignore_client_order`), as Envoy's do.
fn preferred_suites(
    mut suites: Vec<rustls::SupportedCipherSuite>,
) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        C::TLS13_AES_128_GCM_SHA256 | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384 | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 1,
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    // Stable: TLS 1.3 suites stay ahead of TLS 1.2 ones of the same rank, as ring lists them.
    suites.sort_by_key(|s| (rank(s), s.version() != &rustls::version::TLS13));
    suites
}

/// Session-ticket keys shared by every listener and every config version, so a client resumes
/// whichever worker (and whichever reload) it lands on; rotated every 6 hours.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| match rustls::crypto::ring::Ticketer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("TLS session tickets disabled: {e}");
                None
            }
        })
        .clone()
}

fn certificates(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem.bytes).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(pem.error("no CERTIFICATE in this PEM file")),
        Err(e) => Err(pem.error(format!("not a valid PEM certificate file: {e}"))),
    }
}

fn private_key(pem: &Pem) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_slice(&pem.bytes).map_err(|e| {
        pem.error(format!(
            "no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"
        ))
    })
}

fn roots(pem: &Pem) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem)? {
        store
            .add(cert)
            .map_err(|e| pem.error(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// The system's CA bundle as a root store (for fetches to public endpoints such as a JWKS).
pub(crate) fn system_root_store() -> Result<Arc<RootCertStore>, String> {
    let bytes = std::fs::read(SYSTEM_ROOTS)
        .map_err(|e| format!("the system roots are unreadable ({SYSTEM_ROOTS}: {e})"))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes).flatten() {
        let _ = store.add(cert);
    }
    Ok(Arc::new(store))
}

fn system_roots(tls: &UpstreamTls) -> Result<Arc<RootCertStore>, String> {
    let bytes = std::fs::read(SYSTEM_ROOTS).map_err(|e| {
        format!(
            "no caCertificates for SNI {} and the system roots are unreadable ({SYSTEM_ROOTS}: {e}); set caCertificates",
            tls.sni
        )
    })?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes).flatten() {
        let _ = store.add(cert);
    }
    Ok(Arc::new(store))
}

/// The certificate and key, checked to belong together.
fn certified_key(
    chain: &Pem,
    key: &Pem,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
    let certs = certificates(chain)?;
    let k = private_key(key)?;
    rustls::sign::CertifiedKey::from_der(certs.clone(), k.clone_key(), &provider())
        .map_err(|e| key.error(format!("does not go with {}: {e}", chain.path.display())))?;
    Ok((certs, k))
}

fn versions(min: TlsVersion, max: TlsVersion) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::new();
    if max >= TlsVersion::V1_3 {
        v.push(&rustls::version::TLS13);
    }
    if min <= TlsVersion::V1_2 {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// The mesh identity, checked: key and chain belong together, the chain leads to the mesh roots
/// and is valid now, and the leaf names a SPIFFE id in the trust domain.
struct MeshIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    id: SpiffeId,
}

fn mesh_identity(identity: &Identity) -> Result<MeshIdentity, ConfigError> {
    let (chain, key) = certified_key(&identity.certificate_chain, &identity.private_key)?;
    let roots = roots(&identity.root_certificates)?;
    let pem = &identity.certificate_chain;
    let leaf = rustls::server::ParsedCertificate::try_from(&chain[0])
        .map_err(|e| pem.error(format!("unreadable certificate: {e}")))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &roots,
        &chain[1..],
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| {
        pem.error(format!(
            "does not verify against {}: {e}",
            identity.root_certificates.path.display()
        ))
    })?;
    let id = spiffe_ids(&chain[0])
        .into_iter()
        .find(|id| id.trust_domain() == identity.trust_domain)
        .ok_or_else(|| {
            pem.error(format!(
                "the certificate has no spiffe://{}/... URI SAN (the trust domain)",
                identity.trust_domain
            ))
        })?;
    Ok(MeshIdentity {
        chain,
        key,
        roots,
        id,
    })
}

/// What a server presents: one certificate, or one per SNI name.
enum ServerCerts {
    Single(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    BySni(Arc<crate::sni::SniResolver>),
}

fn server_config(
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    certs: ServerCerts,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
    origin: &Pem,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| origin.error(e))?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = match certs {
        ServerCerts::Single(chain, key) => builder
            .with_single_cert(chain, key)
            .map_err(|e| origin.error(e))?,
        ServerCerts::BySni(resolver) => builder.with_cert_resolver(resolver),
    };
    config.session_storage = Arc::new(NoServerSessionStorage {});
    if let Some(t) = ticketer() {
        config.ticketer = t;
    }
    config.send_tls13_tickets = 1;
    config.ignore_client_order = true;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    origin: Option<&Pem>,
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_auth {
        Some((chain, key)) => {
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match origin {
                    Some(o) => o.error(e).to_string(),
                    None => e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn pool_key(tls: &UpstreamTls, identity: Option<&Identity>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (tls.mode as u8).hash(&mut h);
    tls.sni.hash(&mut h);
    tls.subject_alt_names.hash(&mut h);
    tls.insecure_skip_verify.hash(&mut h);
    for pem in [&tls.ca, &tls.client_certificate, &tls.private_key]
        .into_iter()
        .flatten()
    {
        pem.bytes.hash(&mut h);
    }
    if tls.mode == UpstreamTlsMode::IstioMutual {
        if let Some(id) = identity {
            id.certificate_chain.bytes.hash(&mut h);
            id.root_certificates.bytes.hash(&mut h);
        }
    }
    h.finish() | 1
}

/// Builds every context `snapshot` needs, or reports every problem found.
pub fn build(snapshot: &Snapshot) -> Result<TlsContexts, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let identity = snapshot.proxy.identity.as_ref();
    let mesh = match identity.map(mesh_identity) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            errors.push(e);
            None
        }
        None => None,
    };
    let mut out = TlsContexts {
        identity: mesh.as_ref().map(|m| m.id.clone()),
        ..TlsContexts::default()
    };
    // Mesh listeners share one context per protocol.
    let mut mesh_server: [Option<Arc<ServerConfig>>; 3] = [None, None, None];
    for l in &snapshot.listeners {
        let protocol = l.protocol;
        let ctx = match &l.tls {
            None => None,
            Some(DownstreamTls::Mesh { .. }) => match (&mesh, identity) {
                (Some(m), Some(id)) => {
                    let slot = &mut mesh_server[protocol as usize];
                    if slot.is_none() {
                        let built = mesh_server_config(m, id, protocol);
                        match built {
                            Ok(c) => *slot = Some(c),
                            Err(e) => errors.push(e),
                        }
                    }
                    slot.clone()
                }
                _ => None,
            },
            Some(DownstreamTls::Terminate(t)) => match terminate_config(t, protocol) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        out.listeners.push(ctx);
    }
    for c in &snapshot.clusters {
        let ctx = match &c.tls {
            None => None,
            Some(tls) => match upstream_context(tls, identity, mesh.as_ref()) {
                Ok(ctx) => Some(ctx),
                Err(e) => {
                    errors.push(ConfigError::global(
                        "",
                        format!("cluster {}: TLS: {e}", c.name),
                    ));
                    None
                }
            },
        };
        out.clusters.push(ctx);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.dedup();
        Err(errors)
    }
}

fn mesh_server_config(
    m: &MeshIdentity,
    id: &Identity,
    protocol: Protocol,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let pem = &id.root_certificates;
    let webpki = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| pem.error(e))?;
    let verifier = Arc::new(IdentityClientVerifier::new(
        webpki,
        ClientIdentity::Mesh {
            trust_domain: id.trust_domain.clone(),
        },
    ));
    server_config(
        Some(verifier),
        ServerCerts::Single(m.chain.clone(), m.key.clone_key()),
        &versions(TlsVersion::V1_2, TlsVersion::V1_3),
        match protocol {
            Protocol::Tcp => &[],
            Protocol::Http => MESH_HTTP_ALPN,
            Protocol::Auto => MESH_AUTO_ALPN,
        },
        &id.certificate_chain,
    )
}

fn terminate_config(t: &ServerTls, protocol: Protocol) -> Result<Arc<ServerConfig>, ConfigError> {
    let (chain, key) = certified_key(&t.certificate_chain, &t.private_key)?;
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match &t.client_ca {
        None => None,
        Some(ca) => {
            let webpki = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| ca.error(e))?;
            Some(if t.subject_alt_names.is_empty() {
                webpki
            } else {
                Arc::new(IdentityClientVerifier::new(
                    webpki,
                    ClientIdentity::AnyOf(t.subject_alt_names.clone()),
                ))
            })
        }
    };
    let certs = if t.sni_certificates.is_empty() {
        ServerCerts::Single(chain, key)
    } else {
        let keyed = |chain, key| -> Result<Arc<rustls::sign::CertifiedKey>, ConfigError> {
            let (c, k) = certified_key(chain, key)?;
            rustls::sign::CertifiedKey::from_der(c, k, &provider())
                .map(Arc::new)
                .map_err(|e| key.error(e))
        };
        let mut by_name = Vec::new();
        for s in &t.sni_certificates {
            let k = keyed(&s.certificate_chain, &s.private_key)?;
            for n in &s.server_names {
                by_name.push((n.clone(), k.clone()));
            }
        }
        let default = keyed(&t.certificate_chain, &t.private_key)?;
        ServerCerts::BySni(Arc::new(crate::sni::SniResolver { default, by_name }))
    };
    server_config(
        verifier,
        certs,
        &versions(t.min_version, t.max_version),
        if protocol == Protocol::Tcp {
            &[]
        } else {
            HTTP_ALPN
        },
        &t.certificate_chain,
    )
}

fn upstream_context(
    tls: &UpstreamTls,
    identity: Option<&Identity>,
    mesh: Option<&MeshIdentity>,
) -> Result<UpstreamContext, String> {
    let server_name = ServerName::try_from(tls.sni.clone())
        .map_err(|_| format!("`{}` cannot be sent as SNI", tls.sni))?;
    if tls.insecure_skip_verify {
        tracing::warn!(sni = %tls.sni, "insecureSkipVerify: upstream certificates are not verified");
    }
    let config = match tls.mode {
        UpstreamTlsMode::IstioMutual => {
            let (Some(m), Some(id)) = (mesh, identity) else {
                return Err("ISTIO_MUTUAL needs a valid Proxy spec.identity".into());
            };
            let identity = if tls.insecure_skip_verify {
                ServerIdentity::Unchecked
            } else {
                ServerIdentity::Mesh {
                    trust_domain: id.trust_domain.clone(),
                    subject_alt_names: tls.subject_alt_names.clone(),
                }
            };
            let verifier = Arc::new(IdentityServerVerifier::new(m.roots.clone(), identity));
            client_config(
                verifier,
                Some((m.chain.clone(), m.key.clone_key())),
                Some(&id.certificate_chain),
            )?
        }
        UpstreamTlsMode::Simple | UpstreamTlsMode::Mutual => {
            let roots = match &tls.ca {
                Some(ca) => roots(ca).map_err(|e| e.to_string())?,
                None => system_roots(tls)?,
            };
            let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
                if tls.insecure_skip_verify {
                    Arc::new(IdentityServerVerifier::new(
                        roots,
                        ServerIdentity::Unchecked,
                    ))
                } else if tls.subject_alt_names.is_empty() {
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| e.to_string())?
                } else {
                    Arc::new(IdentityServerVerifier::new(
                        roots,
                        ServerIdentity::AnyOf(tls.subject_alt_names.clone()),
                    ))
                };
            let auth = match (&tls.client_certificate, &tls.private_key) {
                (Some(c), Some(k)) => Some(certified_key(c, k).map_err(|e| e.to_string())?),
                _ => None,
            };
            client_config(verifier, auth, tls.client_certificate.as_ref())?
        }
    };
    let mut h2 = (*config).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let config_http1 = if tls.mode == UpstreamTlsMode::IstioMutual {
        let mut h1 = (*config).clone();
        h1.alpn_protocols = vec![MESH_HTTP1_ALPN.to_vec()];
        Arc::new(h1)
    } else {
        config.clone()
    };
    Ok(UpstreamContext {
        config,
        config_http1,
        config_h2: Arc::new(h2),
        server_name,
        pool_key: pool_key(tls, identity),
    })
}
