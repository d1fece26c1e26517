//! Certificate verification for the mesh: chains are checked by rustls/webpki, and the identity
//! in them (the SPIFFE URI SAN, or the SANs a DestinationRule names) is checked here.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use crate::spiffe::{spiffe_ids, SpiffeId};

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn identity_error(message: String) -> Error {
    Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(IdentityMismatch(message)),
    )))
}

/// Why a certificate that chains correctly was still refused (shown in the handshake error).
#[derive(Debug)]
struct IdentityMismatch(String);

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityMismatch {}

/// Whether the certificate carries one of `wanted` as a URI or DNS SAN (exact match, as Envoy's
/// `match_subject_alt_names` with exact matchers).
fn has_any_san(cert: &CertificateDer<'_>, wanted: &[String]) -> bool {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    parsed
        .valid_uri_names()
        .chain(parsed.valid_dns_names())
        .any(|n| wanted.iter().any(|w| w == n))
}

/// The SPIFFE id of `cert` in `trust_domain`, or why there is none.
fn mesh_identity(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, Error> {
    let ids = spiffe_ids(cert);
    if ids.is_empty() {
        return Err(identity_error(
            "peer certificate has no spiffe:// URI SAN".into(),
        ));
    }
    ids.into_iter()
        .find(|id| id.trust_domain() == trust_domain)
        .ok_or_else(|| identity_error(format!("peer is not in trust domain {trust_domain}")))
}

/// What a client certificate must prove beyond its chain.
#[derive(Debug, Clone)]
pub enum ClientIdentity {
    /// Inbound mesh mTLS: a SPIFFE id in this trust domain.
    Mesh { trust_domain: String },
    /// Sidecar ingress MUTUAL with `subjectAltNames`: one of these SANs.
    AnyOf(Vec<String>),
}

/// Client verification: webpki's chain check (roots, validity, client-auth EKU), then the identity.
/// A certificate is always required.
#[derive(Debug)]
pub struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    identity: ClientIdentity,
}

impl IdentityClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, identity: ClientIdentity) -> Self {
        IdentityClientVerifier { inner, identity }
    }
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match &self.identity {
            ClientIdentity::Mesh { trust_domain } => {
                mesh_identity(end_entity, trust_domain)?;
            }
            ClientIdentity::AnyOf(sans) => {
                if !has_any_san(end_entity, sans) {
                    return Err(identity_error(
                        "client certificate has none of the subjectAltNames".into(),
                    ));
                }
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What an upstream's certificate must prove beyond its chain.
#[derive(Debug, Clone)]
pub enum ServerIdentity {
    /// A SPIFFE id in this trust domain, and one of the SANs when any are listed (ISTIO_MUTUAL).
    Mesh {
        trust_domain: String,
        subject_alt_names: Vec<String>,
    },
    /// One of these SANs instead of the SNI name (SIMPLE / MUTUAL with `subjectAltNames`).
    AnyOf(Vec<String>),
    /// Nothing at all (`insecureSkipVerify`): the handshake signature is still checked.
    Unchecked,
}

/// Upstream verification for the cases the stock verifier cannot do: mesh peers whose
/// certificates carry only a URI SAN, and SAN lists. The chain is checked against `roots` exactly
/// as the stock verifier does, unless verification is off.
#[derive(Debug)]
pub struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    identity: ServerIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl IdentityServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, identity: ServerIdentity) -> Self {
        IdentityServerVerifier {
            roots,
            identity,
            algorithms: algorithms(),
        }
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if matches!(self.identity, ServerIdentity::Unchecked) {
            return Ok(ServerCertVerified::assertion());
        }
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match &self.identity {
            ServerIdentity::Mesh {
                trust_domain,
                subject_alt_names,
            } => {
                mesh_identity(end_entity, trust_domain)?;
                if !subject_alt_names.is_empty() && !has_any_san(end_entity, subject_alt_names) {
                    return Err(identity_error(
                        "upstream identity is not one of the subjectAltNames".into(),
                    ));
                }
            }
            ServerIdentity::AnyOf(sans) => {
                if !has_any_san(end_entity, sans) {
                    return Err(identity_error(
                        "upstream certificate has none of the subjectAltNames".into(),
                    ));
                }
            }
            ServerIdentity::Unchecked => {}
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
