//! Test certificates made with rcgen: a mesh root, workload certificates with SPIFFE or DNS SANs,
//! and the broken kinds (another trust domain, another root, expired).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A SAN to put in a certificate.
pub enum San<'a> {
    Uri(&'a str),
    Dns(&'a str),
}

/// Files of one issued certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Keel tests");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the root to `dir/<name>.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, self.pem()).unwrap();
        p
    }

    /// Issues a leaf with `sans`, valid now unless `expired`, written as `dir/<name>.pem` and
    /// `dir/<name>-key.pem` (atomically: a watcher never sees half a file).
    pub fn issue(&self, dir: &Path, name: &str, sans: &[San], expired: bool) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s {
                San::Uri(u) => SanType::URI((*u).try_into().unwrap()),
                San::Dns(d) => SanType::DnsName((*d).try_into().unwrap()),
            })
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        write_atomically(&key_path, &key.serialize_pem());
        write_atomically(&cert_path, &cert.pem());
        Issued {
            cert: cert_path,
            key: key_path,
            cert_pem: cert.pem(),
        }
    }
}

/// Writes `text` to `path` by rename, as a certificate manager does.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A Proxy resource with the identity `id` (files as given).
pub fn proxy_with_identity(
    admin: u16,
    id: &Issued,
    root: &Path,
    namespace: &str,
    extra: &str,
) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: test, namespace: {namespace} }}
spec:
  workload: {{ labels: {{ app: test }} }}
  workers: 2
  admin: {{ address: 127.0.0.1:{admin} }}
  identity:
    certificateChain: {}
    privateKey: {}
    rootCertificates: {}
{extra}",
        id.cert.display(),
        id.key.display(),
        root.display()
    )
}

/// A mesh: one root, and certificates for the workloads of a test.
pub struct Mesh {
    pub dir: PathBuf,
    pub ca: Ca,
    pub root: PathBuf,
}

impl Mesh {
    pub fn new() -> Mesh {
        let dir = super::temp_dir("pki");
        let ca = Ca::new("mesh root");
        let root = ca.write(&dir, "root");
        Mesh { dir, ca, root }
    }

    /// A workload certificate with the SPIFFE id `id`.
    pub fn workload(&self, name: &str, id: &str) -> Issued {
        self.ca.issue(&self.dir, name, &[San::Uri(id)], false)
    }
}

/// A Keel terminating SIMPLE TLS with `cert` in front of an echo backend named `name`.
pub fn tls_terminator(
    cert: &Issued,
    name: &'static str,
) -> (super::Keel, u16, super::RecordingBackend) {
    let app = super::RecordingBackend::echo(name);
    let (port, admin) = (super::free_port(), super::free_port());
    let config = super::proxy_yaml(admin, 1)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {port}, protocol: HTTP, name: https }}
    bind: 127.0.0.1
    defaultEndpoint: {}
    tls: {{ mode: SIMPLE, serverCertificate: {}, privateKey: {} }}
",
            app.addr,
            cert.cert.display(),
            cert.key.display()
        );
    (super::Keel::start(&config, admin, &[]), port, app)
}
