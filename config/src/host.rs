//! Istio's host-name rules: short names, wildcards, and Sidecar `hosts` visibility.

/// Expands a short name as Istio does: `reviews` in namespace `ns` is `reviews.ns.svc.cluster.local`.
pub fn qualify(host: &str, namespace: &str) -> String {
    let host = host.trim();
    if host == "*" || host.contains('.') {
        return host.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(host.len() + namespace.len() + 19);
    out.push_str(host);
    out.make_ascii_lowercase();
    for part in [".", namespace, ".svc.cluster.local"] {
        out.push_str(part);
    }
    out
}

/// Whether `name` is a host name a resolver can be asked about (RFC 1123 labels, 253 bytes at
/// most, not an IP address).
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Whether `pattern` (exact, `*`, or `*.suffix`) covers the concrete `host`.
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// One entry of a Sidecar listener's `hosts`: `namespace/dnsName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleHosts {
    namespace: String,
    dns: String,
}

impl VisibleHosts {
    /// Parses `ns/host`; `.` means the Sidecar's own namespace, `*` any namespace, `~` none.
    pub fn parse(entry: &str, sidecar_namespace: &str) -> Result<Self, String> {
        let (ns, dns) = entry
            .split_once('/')
            .ok_or_else(|| format!("host `{entry}` must be written as namespace/dnsName, e.g. `./*` or `*/reviews.default.svc.cluster.local`"))?;
        if ns.is_empty() || dns.is_empty() {
            return Err(format!(
                "host `{entry}` must be written as namespace/dnsName"
            ));
        }
        let namespace = if ns == "." {
            sidecar_namespace.to_string()
        } else {
            ns.to_string()
        };
        Ok(VisibleHosts {
            namespace,
            dns: dns.to_ascii_lowercase(),
        })
    }

    /// `*/*`: every host of every namespace (Istio's default egress).
    pub fn all() -> Self {
        VisibleHosts {
            namespace: "*".into(),
            dns: "*".into(),
        }
    }

    /// Whether a service `host` defined in `namespace` is imported by this entry.
    pub fn admits(&self, namespace: &str, host: &str) -> bool {
        if self.namespace == "~" {
            return false;
        }
        (self.namespace == "*" || self.namespace == namespace) && matches(&self.dns, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(
            qualify("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(qualify("db.example.com", "x"), "db.example.com");
        assert_eq!(qualify("*", "x"), "*");
    }

    #[test]
    fn wildcards() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
        assert!(matches("*", "anything"));
        assert!(matches("A.b", "a.b"));
    }

    #[test]
    fn sidecar_hosts() {
        let h = VisibleHosts::parse("./*", "prod").unwrap();
        assert!(h.admits("prod", "x.prod.svc.cluster.local"));
        assert!(!h.admits("dev", "x.dev.svc.cluster.local"));
        assert!(VisibleHosts::parse("*/db.example.com", "p")
            .unwrap()
            .admits("any", "db.example.com"));
        assert!(!VisibleHosts::parse("~/*", "p").unwrap().admits("p", "a"));
        assert!(VisibleHosts::parse("nohost", "p").is_err());
    }
}
