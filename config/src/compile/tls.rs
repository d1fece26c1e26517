//! TLS settings: the mesh identity, PeerAuthentication, Sidecar ingress `tls` and DestinationRule
//! `tls`, compiled into what the TLS crate builds its rustls contexts from.
//!
//! Certificate and key files are read here, at load: their bytes join the config version (a
//! rotated certificate is a new config, swapped in like any other), and a missing or unreadable
//! file is an error at the field that names it. Their content (PEM, key matching certificate,
//! SPIFFE id) is checked when the contexts are built, still before anything is swapped in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Compiler;
use crate::load::{Located, Origin, RawConfig};
use crate::model::*;
use crate::snapshot::*;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Istio's root namespace: a PeerAuthentication there without a selector is mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A DestinationRule's `tls` as written, files read; the SNI and SANs are settled per cluster.
#[derive(Debug, Clone)]
pub(super) struct RuleTls {
    mode: UpstreamTlsMode,
    sni: Option<String>,
    subject_alt_names: Vec<String>,
    ca: Option<Pem>,
    client_certificate: Option<Pem>,
    private_key: Option<Pem>,
    insecure_skip_verify: bool,
}

/// The effective PeerAuthentication for this workload: a mode for the workload and, where set, per port.
#[derive(Debug, Default)]
pub(super) struct PeerAuthn {
    /// Mesh-wide, then namespace, then workload: the most specific non-UNSET wins.
    mode: Option<MtlsMode>,
    ports: Vec<(u32, MtlsMode)>,
}

impl PeerAuthn {
    /// The mode for an inbound listener on `port` forwarding to the app's `app_port`.
    pub(super) fn mode_for(&self, port: u32, app_port: u32) -> MtlsMode {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .or_else(|| self.ports.iter().find(|(p, _)| *p == app_port))
            .map(|(_, m)| *m)
            .or(self.mode)
            .unwrap_or(MtlsMode::Permissive)
    }
}

impl Compiler {
    /// Reads a PEM file named by `field` of the resource at `origin`; relative paths are relative
    /// to that resource's file.
    pub(super) fn pem(&mut self, origin: &Origin, field: &str, path: &str) -> Option<Pem> {
        if path.is_empty() {
            self.errors
                .push(origin.error(field, "must name a PEM file"));
            return None;
        }
        let resolved = resolve(&origin.file, path);
        match std::fs::read(&resolved) {
            Ok(bytes) => {
                super::fnv1a(
                    &mut self.material_hash,
                    resolved.to_string_lossy().as_bytes(),
                );
                super::fnv1a(&mut self.material_hash, &bytes);
                if !self.material.contains(&resolved) {
                    self.material.push(resolved.clone());
                }
                Some(Pem {
                    path: resolved,
                    bytes: Arc::from(bytes),
                    origin: origin.clone(),
                    field: field.to_string(),
                })
            }
            Err(e) => {
                self.errors
                    .push(origin.error(field, format!("cannot read {}: {e}", resolved.display())));
                None
            }
        }
    }

    /// `Proxy.spec.identity`.
    pub(super) fn identity(&mut self, p: &Located<ProxySpec>) -> Option<Identity> {
        let id = p.value.spec.identity.as_ref()?;
        let o = &p.origin;
        let trust_domain = id
            .trust_domain
            .clone()
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        if trust_domain.is_empty()
            || !trust_domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            self.errors.push(o.error(
                "spec.identity.trustDomain",
                format!(
                    "`{trust_domain}` is not a valid trust domain (letters, digits, `.`, `-`, `_`)"
                ),
            ));
        }
        let chain = self.pem(o, "spec.identity.certificateChain", &id.certificate_chain);
        let key = self.pem(o, "spec.identity.privateKey", &id.private_key);
        let roots = self.pem(o, "spec.identity.rootCertificates", &id.root_certificates);
        Some(Identity {
            certificate_chain: chain?,
            private_key: key?,
            root_certificates: roots?,
            trust_domain,
        })
    }

    /// Sidecar `ingress[].tls`: SIMPLE or MUTUAL termination with the listener's own certificate.
    pub(super) fn ingress_tls(
        &mut self,
        o: &Origin,
        at: &str,
        t: &ServerTlsSettings,
    ) -> Option<ServerTls> {
        let mode = t.mode.unwrap_or(ServerTlsMode::Simple);
        if t.https_redirect.is_some() && !at.contains("servers[") {
            self.errors.push(o.error(
                &format!("{at}.httpsRedirect"),
                "httpsRedirect is for Gateway servers",
            ));
        }
        if !matches!(mode, ServerTlsMode::Simple | ServerTlsMode::Mutual) {
            self.errors.push(o.error(
                &format!("{at}.mode"),
                "a Sidecar ingress terminates TLS with SIMPLE or MUTUAL (mesh mTLS is PeerAuthentication's)",
            ));
            return None;
        }
        let need = |c: &mut Compiler, v: &Option<String>, name: &str| -> Option<Pem> {
            match v {
                Some(p) => c.pem(o, &format!("{at}.{name}"), p),
                None => {
                    c.errors
                        .push(o.error(&format!("{at}.{name}"), format!("{name} is required")));
                    None
                }
            }
        };
        let chain = need(self, &t.server_certificate, "serverCertificate");
        let key = need(self, &t.private_key, "privateKey");
        let client_ca = if mode == ServerTlsMode::Mutual {
            need(self, &t.ca_certificates, "caCertificates")
        } else {
            if t.ca_certificates.is_some() || !t.subject_alt_names.is_empty() {
                self.errors.push(o.error(
                    &format!("{at}.caCertificates"),
                    "client certificates are checked only with mode MUTUAL",
                ));
            }
            None
        };
        let version = |c: &mut Compiler, v: Option<TlsProtocol>, field: &str, default| match v {
            None | Some(TlsProtocol::Auto) => Some(default),
            Some(TlsProtocol::V1_2) => Some(TlsVersion::V1_2),
            Some(TlsProtocol::V1_3) => Some(TlsVersion::V1_3),
            Some(_) => {
                c.errors.push(o.error(
                    &format!("{at}.{field}"),
                    "TLS 1.0 and 1.1 are not offered (TLSV1_2 or TLSV1_3)",
                ));
                None
            }
        };
        let min = version(
            self,
            t.min_protocol_version,
            "minProtocolVersion",
            TlsVersion::V1_2,
        );
        let max = version(
            self,
            t.max_protocol_version,
            "maxProtocolVersion",
            TlsVersion::V1_3,
        );
        if let (Some(a), Some(b)) = (min, max) {
            if a > b {
                self.errors.push(o.error(
                    &format!("{at}.minProtocolVersion"),
                    "minProtocolVersion is above maxProtocolVersion",
                ));
            }
        }
        let client_ca = match (mode, client_ca) {
            (ServerTlsMode::Mutual, None) => return None,
            (_, ca) => ca,
        };
        Some(ServerTls {
            certificate_chain: chain?,
            private_key: key?,
            client_ca,
            subject_alt_names: t.subject_alt_names.clone(),
            min_version: min?,
            max_version: max?,
            sni_certificates: Vec::new(),
        })
    }

    /// The PeerAuthentication policies that apply to this workload, most specific first, as Istio
    /// resolves them: a selector matching the workload, then the workload's namespace without a
    /// selector, then the root namespace without a selector.
    pub(super) fn peer_authn(&mut self, raw: &RawConfig, proxy: &ProxySettings) -> PeerAuthn {
        let mut workload = Vec::new();
        let mut namespace = Vec::new();
        let mut mesh = Vec::new();
        for pa in &raw.peer_authentications {
            let (o, spec, ns) = (&pa.origin, &pa.value.spec, pa.value.metadata.namespace());
            match &spec.selector {
                Some(sel) if !sel.match_labels.is_empty() => {
                    if ns == proxy.namespace
                        && sel
                            .match_labels
                            .iter()
                            .all(|(k, v)| proxy.labels.get(k) == Some(v))
                    {
                        workload.push(pa);
                    }
                }
                _ => {
                    if !spec.port_level_mtls.is_empty() {
                        self.errors.push(o.error(
                            "spec.portLevelMtls",
                            "portLevelMtls needs a selector (Istio ignores it on namespace- and mesh-wide policies)",
                        ));
                    }
                    if ns == proxy.namespace {
                        namespace.push(pa);
                    } else if ns == ROOT_NAMESPACE {
                        mesh.push(pa);
                    }
                }
            }
            for port in spec.port_level_mtls.keys() {
                if *port == 0 || *port > 65535 {
                    self.errors.push(o.error(
                        &format!("spec.portLevelMtls.{port}"),
                        "port must be 1 to 65535",
                    ));
                }
            }
        }
        let mut out = PeerAuthn::default();
        for (level, found) in [
            ("mesh-wide", &mesh),
            ("namespace", &namespace),
            ("workload", &workload),
        ] {
            if found.len() > 1 {
                for pa in &found[1..] {
                    self.errors.push(pa.origin.error(
                        "metadata.name",
                        format!(
                            "more than one {level} PeerAuthentication applies to this workload (also {}); keep one",
                            found[0].value.metadata.name
                        ),
                    ));
                }
            }
            if let Some(pa) = found.first() {
                let spec = &pa.value.spec;
                if let Some(m) = spec.mtls.as_ref().and_then(|m| m.mode) {
                    if m != MtlsMode::Unset {
                        out.mode = Some(m);
                    }
                }
                for (port, m) in &spec.port_level_mtls {
                    if let Some(m) = m.mode.filter(|m| *m != MtlsMode::Unset) {
                        out.ports.push((*port, m));
                    }
                }
            }
        }
        if proxy.identity.is_none() {
            let strict = out.mode == Some(MtlsMode::Strict)
                || out.ports.iter().any(|(_, m)| *m == MtlsMode::Strict);
            if strict {
                let pa = workload.first().or(namespace.first()).or(mesh.first());
                if let Some(pa) = pa {
                    self.errors.push(pa.origin.error(
                        "spec.mtls.mode",
                        "STRICT mTLS needs this workload's certificate: set Proxy spec.identity",
                    ));
                }
            }
        }
        out
    }

    /// A DestinationRule `tls` block (`at` is its field path).
    pub(super) fn rule_tls(
        &mut self,
        o: &Origin,
        at: &str,
        t: &ClientTlsSettings,
        have_identity: bool,
    ) -> Option<RuleTls> {
        let mode = match t.mode.unwrap_or(ClientTlsMode::Disable) {
            ClientTlsMode::Disable => return None,
            ClientTlsMode::Simple => UpstreamTlsMode::Simple,
            ClientTlsMode::Mutual => UpstreamTlsMode::Mutual,
            ClientTlsMode::IstioMutual => UpstreamTlsMode::IstioMutual,
        };
        let mut ok = true;
        if mode == UpstreamTlsMode::IstioMutual {
            if !have_identity {
                self.errors.push(o.error(
                    &format!("{at}.mode"),
                    "ISTIO_MUTUAL presents this workload's certificate: set Proxy spec.identity",
                ));
                ok = false;
            }
            for f in ["clientCertificate", "privateKey", "caCertificates"] {
                let set = match f {
                    "clientCertificate" => t.client_certificate.is_some(),
                    "privateKey" => t.private_key.is_some(),
                    _ => t.ca_certificates.is_some(),
                };
                if set {
                    self.errors.push(o.error(
                        &format!("{at}.{f}"),
                        "ISTIO_MUTUAL uses the mesh identity (Proxy spec.identity); certificates here are for MUTUAL",
                    ));
                    ok = false;
                }
            }
        }
        let ca = match &t.ca_certificates {
            Some(p) if mode != UpstreamTlsMode::IstioMutual => {
                let pem = self.pem(o, &format!("{at}.caCertificates"), p);
                ok &= pem.is_some();
                pem
            }
            _ => None,
        };
        let (mut client_certificate, mut private_key) = (None, None);
        if mode == UpstreamTlsMode::Mutual {
            for (f, v, slot) in [
                (
                    "clientCertificate",
                    &t.client_certificate,
                    &mut client_certificate,
                ),
                ("privateKey", &t.private_key, &mut private_key),
            ] {
                match v {
                    Some(p) => {
                        *slot = self.pem(o, &format!("{at}.{f}"), p);
                        ok &= slot.is_some();
                    }
                    None => {
                        self.errors
                            .push(o.error(&format!("{at}.{f}"), format!("MUTUAL needs {f}")));
                        ok = false;
                    }
                }
            }
        } else if mode == UpstreamTlsMode::Simple
            && (t.client_certificate.is_some() || t.private_key.is_some())
        {
            self.errors.push(o.error(
                &format!("{at}.clientCertificate"),
                "a client certificate is presented only with mode MUTUAL",
            ));
            ok = false;
        }
        if let Some(sni) = &t.sni {
            if sni.is_empty() || sni.len() > 253 || sni.bytes().any(|b| b.is_ascii_whitespace()) {
                self.errors
                    .push(o.error(&format!("{at}.sni"), format!("`{sni}` is not a host name")));
                ok = false;
            }
        }
        ok.then(|| RuleTls {
            mode,
            sni: t.sni.clone(),
            subject_alt_names: t.subject_alt_names.clone(),
            ca,
            client_certificate,
            private_key,
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        })
    }
}

impl RuleTls {
    /// The settings for one cluster: Istio's SNI for mesh traffic
    /// (`outbound_.<port>_.<subset>_.<host>`), the host name otherwise, unless `sni` is set; and
    /// for ISTIO_MUTUAL without `subjectAltNames`, the ServiceEntry's.
    pub(super) fn for_cluster(
        &self,
        host: &str,
        port: u32,
        subset: Option<&str>,
        service_sans: &[String],
    ) -> UpstreamTls {
        let sni = self.sni.clone().unwrap_or_else(|| match self.mode {
            UpstreamTlsMode::IstioMutual => {
                format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
            }
            _ => host.to_string(),
        });
        let subject_alt_names =
            if self.subject_alt_names.is_empty() && self.mode == UpstreamTlsMode::IstioMutual {
                service_sans.to_vec()
            } else {
                self.subject_alt_names.clone()
            };
        UpstreamTls {
            mode: self.mode,
            sni,
            subject_alt_names,
            ca: self.ca.clone(),
            client_certificate: self.client_certificate.clone(),
            private_key: self.private_key.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
        }
    }
}

fn resolve(file: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}
