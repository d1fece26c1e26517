//! Choosing a server certificate by the ClientHello's SNI: Gateway servers that share a port each
//! present their own certificate for their own hosts.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Certificates by name (exact, `*.suffix`, or `*`), with a default for a ClientHello without SNI
/// or with a name none of them has.
#[derive(Debug)]
pub(crate) struct SniResolver {
    pub(crate) default: Arc<CertifiedKey>,
    pub(crate) by_name: Vec<(String, Arc<CertifiedKey>)>,
}

impl SniResolver {
    /// The certificate for `name`: an exact name first, then the longest matching wildcard.
    pub(crate) fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let exact = self
            .by_name
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        let wildcard = || {
            self.by_name
                .iter()
                .filter(|(n, _)| n.starts_with('*') && keel_config::host::matches(n, name))
                .max_by_key(|(n, _)| n.len())
        };
        exact
            .or_else(wildcard)
            .map_or_else(|| self.default.clone(), |(_, k)| k.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}
