//! SPIFFE identities as Istio issues them: `spiffe://<trust domain>/ns/<namespace>/sa/<account>`.

/// A peer's mesh identity, taken from its certificate's URI SAN once per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    uri: Box<str>,
    /// Byte offset of the namespace within `uri` and its length (zero when the path is not Istio's).
    ns: (u16, u16),
}

impl SpiffeId {
    /// Parses a `spiffe://` URI; `None` for anything else. Paths other than Istio's `/ns/../sa/..`
    /// are kept (they are valid SPIFFE ids) but have no namespace.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain.is_empty() || uri.len() > u16::MAX as usize {
            return None;
        }
        let mut ns = (0, 0);
        let parts: Vec<&str> = path.split('/').collect();
        if let ["ns", n, "sa", sa] = parts.as_slice() {
            if !n.is_empty() && !sa.is_empty() {
                let start = "spiffe://".len() + domain.len() + "/ns/".len();
                ns = (start as u16, n.len() as u16);
            }
        }
        Some(SpiffeId {
            uri: uri.into(),
            ns,
        })
    }

    /// The full URI, as in `x-forwarded-client-cert`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The trust domain (`cluster.local`).
    pub fn trust_domain(&self) -> &str {
        let rest = &self.uri["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(d, _)| d)
    }

    /// Istio's principal: the URI without its scheme (`cluster.local/ns/foo/sa/bar`).
    pub fn principal(&self) -> &str {
        &self.uri["spiffe://".len()..]
    }

    /// The namespace of an Istio identity.
    pub fn namespace(&self) -> Option<&str> {
        let (at, len) = (self.ns.0 as usize, self.ns.1 as usize);
        (len > 0).then(|| &self.uri[at..at + len])
    }
}

/// The SPIFFE ids among a certificate's URI SANs.
pub fn spiffe_ids(cert_der: &[u8]) -> Vec<SpiffeId> {
    let der = rustls_pki_types::CertificateDer::from(cert_der);
    match webpki::EndEntityCert::try_from(&der) {
        Ok(cert) => cert.valid_uri_names().filter_map(SpiffeId::parse).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/bar").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.principal(), "cluster.local/ns/foo/sa/bar");
        assert_eq!(id.namespace(), Some("foo"));
        let other = SpiffeId::parse("spiffe://example.org/workload/x").unwrap();
        assert_eq!(other.trust_domain(), "example.org");
        assert_eq!(other.namespace(), None);
        let bare = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(bare.trust_domain(), "example.org");
        assert!(SpiffeId::parse("https://example.org/ns/a/sa/b").is_none());
        assert!(SpiffeId::parse("spiffe:///ns/a/sa/b").is_none());
    }
}
