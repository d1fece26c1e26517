//! Compiled HTTP routing: virtual hosts, routes with pre-compiled matchers, and route actions.
//!
//! Built once per snapshot; matching a request allocates nothing and compiles nothing.

use std::time::Duration;

use crate::snapshot::WeightedCluster;

/// A compiled Istio `StringMatch`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends (Envoy's full-match semantics for Istio regex matches).
    Regex(regex::Regex),
    /// `{}`: the value only has to be present.
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::Present => true,
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value.eq_ignore_ascii_case(e),
            StringMatch::Prefix(p) => {
                value.len() >= p.len()
                    && value.is_char_boundary(p.len())
                    && value[..p.len()].eq_ignore_ascii_case(p)
            }
            other => other.matches(value),
        }
    }
}

/// One `match` entry: every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub uri: Option<StringMatch>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lower-case header name → match.
    pub headers: Vec<(String, StringMatch)>,
    pub without_headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
}

/// The parts of a request that routing looks at.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub scheme: &'a str,
    /// The listener port the request arrived on.
    pub port: u16,
    /// Header lookup by lower-case name (the first value).
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

impl RequestMatch {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(r.path)
            } else {
                u.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if self.scheme.as_ref().is_some_and(|m| !m.matches(r.scheme))
            || self.method.as_ref().is_some_and(|m| !m.matches(r.method))
        {
            return false;
        }
        if self
            .authority
            .as_ref()
            .is_some_and(|m| !m.matches(r.authority))
            || self.port.is_some_and(|p| p != r.port)
        {
            return false;
        }
        if !self
            .headers
            .iter()
            .all(|(name, m)| (r.header)(name).is_some_and(|v| m.matches(v)))
        {
            return false;
        }
        if self
            .without_headers
            .iter()
            .any(|(name, m)| (r.header)(name).is_some_and(|v| m.matches(v)))
        {
            return false;
        }
        self.query_params
            .iter()
            .all(|(name, m)| query_param(r.query, name).is_some_and(|v| m.matches(v)))
    }
}

/// The first value of query parameter `name` (not percent-decoded, as Envoy matches).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// Header edits: applied as remove, then set, then add.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// One weighted destination of a route, with its own header edits.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub target: WeightedCluster,
    /// Host header sent upstream unless rewritten: the destination's service host.
    pub host: String,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// `rewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

/// `redirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub code: u16,
}

/// What a matched route does.
#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward {
        targets: Vec<RouteTarget>,
        rewrite: Option<Rewrite>,
    },
    Redirect(Redirect),
    Direct {
        status: u16,
        body: Option<String>,
    },
}

/// One compiled `http[]` route.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// `name`, or `<VirtualService>.<index>`: shown in logs.
    pub name: String,
    /// Empty = matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Timeouts, retries, faults and mirrors.
    pub policy: RoutePolicy,
}

/// What a route does about slow and failing upstreams, and what it injects or copies.
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    /// `timeout`: the whole exchange, retries included; `None` is no limit (Istio's default).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    /// A local rate limit (`ratelimit.keel.dev/local`): index into [`crate::Snapshot::rate_limits`].
    pub rate_limit: Option<usize>,
}

/// A local rate limit: a token bucket shared by every worker (Envoy's `local_ratelimit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRateLimit {
    /// Names the bucket across reloads (`<namespace>/<VirtualService>/<route>` and the numbers):
    /// a reload that keeps the limit keeps the bucket, and its tokens.
    pub key: String,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// One bucket per client address instead of one for the route.
    pub per_client: bool,
}

/// A share of requests, in millionths (Envoy's `FractionalPercent` per million).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(pub u32);

impl Share {
    pub const ALL: Share = Share(1_000_000);

    /// From an Istio percentage (clamped to 0..=100).
    pub fn percent(p: f64) -> Share {
        Share((p.clamp(0.0, 100.0) * 10_000.0).round() as u32)
    }

    /// Whether a request with uniform random `r` falls in the share.
    pub fn hit(self, r: u64) -> bool {
        self.0 >= 1_000_000 || (self.0 > 0 && (r % 1_000_000) < self.0 as u64)
    }
}

/// `retries`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (`attempts`).
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// `retriable-status-codes` (numbers in `retryOn`).
    pub statuses: Vec<u16>,
    /// A retry goes to another endpoint than those tried, when there is one.
    pub other_host: bool,
}

impl RetryPolicy {
    /// Istio's policy for a route without `retries`: 2 retries on connect failure, refused
    /// stream, 503 and the gRPC statuses unavailable and cancelled, each to another host.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            retries: 2,
            per_try_timeout: None,
            on: RetryOn(
                RetryOn::CONNECT_FAILURE
                    | RetryOn::REFUSED_STREAM
                    | RetryOn::UNAVAILABLE
                    | RetryOn::CANCELLED
                    | RetryOn::RETRIABLE_STATUS_CODES,
            ),
            statuses: vec![503],
            other_host: true,
        }
    }

    /// Whether a response with `status` (and `grpc`, its `grpc-status` if any) is retried.
    pub fn retries_response(&self, status: u16, grpc: Option<u32>) -> bool {
        let on = self.on;
        (on.has(RetryOn::FIVE_XX) && status >= 500)
            || (on.has(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
            || (on.has(RetryOn::RETRIABLE_4XX) && status == 409)
            || (on.has(RetryOn::RETRIABLE_STATUS_CODES) && self.statuses.contains(&status))
            || grpc.is_some_and(|g| {
                (on.has(RetryOn::CANCELLED) && g == 1)
                    || (on.has(RetryOn::DEADLINE_EXCEEDED) && g == 4)
                    || (on.has(RetryOn::RESOURCE_EXHAUSTED) && g == 8)
                    || (on.has(RetryOn::INTERNAL) && g == 13)
                    || (on.has(RetryOn::UNAVAILABLE) && g == 14)
            })
    }
}

/// Envoy's `retry_on` conditions, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn(pub u32);

impl RetryOn {
    pub const FIVE_XX: u32 = 1;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const CONNECT_FAILURE: u32 = 1 << 3;
    pub const REFUSED_STREAM: u32 = 1 << 4;
    pub const RETRIABLE_4XX: u32 = 1 << 5;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 6;
    pub const CANCELLED: u32 = 1 << 7;
    pub const DEADLINE_EXCEEDED: u32 = 1 << 8;
    pub const INTERNAL: u32 = 1 << 9;
    pub const RESOURCE_EXHAUSTED: u32 = 1 << 10;
    pub const UNAVAILABLE: u32 = 1 << 11;

    /// The condition names Keel knows, with their bits.
    pub const NAMES: [(&'static str, u32); 12] = [
        ("5xx", Self::FIVE_XX),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("reset", Self::RESET),
        ("connect-failure", Self::CONNECT_FAILURE),
        ("refused-stream", Self::REFUSED_STREAM),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("cancelled", Self::CANCELLED),
        ("deadline-exceeded", Self::DEADLINE_EXCEEDED),
        ("internal", Self::INTERNAL),
        ("resource-exhausted", Self::RESOURCE_EXHAUSTED),
        ("unavailable", Self::UNAVAILABLE),
    ];

    pub fn has(self, bits: u32) -> bool {
        self.0 & bits != 0
    }
}

/// `fault`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

/// What an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status code, answered as a trailers-only gRPC response.
    Grpc(u32),
}

/// A mirror destination (`mirror` + `mirrorPercentage`, or one of `mirrors`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub cluster: usize,
    pub share: Share,
}

impl HttpRoute {
    /// Which of this route's matches accepts the request (index into `matches`; 0 when it has none).
    pub fn accepts(&self, r: &RequestView<'_>) -> Option<usize> {
        if self.matches.is_empty() {
            return Some(0);
        }
        self.matches.iter().position(|m| m.matches(r))
    }
}

/// A set of domains and the routes for them.
#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    /// Lower-case; exact (`reviews`, `reviews:9080`), `*.suffix`, or `*`.
    pub domains: Vec<String>,
    pub routes: Vec<HttpRoute>,
}

/// An HTTP listener's routing table.
#[derive(Debug, Clone, Default)]
pub struct HttpRouteTable {
    pub virtual_hosts: Vec<VirtualHost>,
    /// What a request for a host no virtual host serves gets.
    pub unknown_host: UnknownHost,
}

/// A request for a host the registry does not know, by the Sidecar's `outboundTrafficPolicy`.
#[derive(Debug, Clone, Default)]
pub enum UnknownHost {
    /// 404 (no route): inbound listeners, where every host goes to the app anyway.
    #[default]
    NotFound,
    /// REGISTRY_ONLY: 502, as Istio's `BlackHoleCluster` answers.
    RegistryOnly,
    /// ALLOW_ANY: forwarded to the host and port the request names, through this route (to the
    /// `PassthroughCluster`), as Istio's `allow_any` virtual host does.
    Passthrough(Box<HttpRoute>),
}

impl HttpRouteTable {
    /// The virtual host for an authority (lower-case): exact domain first, then the longest
    /// wildcard suffix, then `*`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let exact = self
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == authority));
        exact
            .or_else(|| {
                let host = crate::host::strip_port(authority);
                self.virtual_hosts
                    .iter()
                    .filter_map(|v| {
                        v.domains
                            .iter()
                            .filter(|d| d.starts_with("*.") && crate::host::matches(d, host))
                            .map(|d| d.len())
                            .max()
                            .map(|l| (l, v))
                    })
                    .max_by_key(|(l, _)| *l)
                    .map(|(_, v)| v)
            })
            .or_else(|| {
                self.virtual_hosts
                    .iter()
                    .find(|v| v.domains.iter().any(|d| d == "*"))
            })
    }

    /// The first route of `vhost` accepting the request, and which of its matches did.
    pub fn route<'a>(
        vhost: &'a VirtualHost,
        r: &RequestView<'_>,
    ) -> Option<(&'a HttpRoute, usize)> {
        vhost
            .routes
            .iter()
            .find_map(|route| route.accepts(r).map(|m| (route, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(path: &'a str, header: &'a dyn Fn(&str) -> Option<&'a str>) -> RequestView<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestView {
            method: "GET",
            path,
            query,
            authority: "reviews",
            scheme: "http",
            port: 9080,
            header,
        }
    }

    #[test]
    fn match_conditions() {
        let none = |_: &str| None;
        let jason = |n: &str| (n == "end-user").then_some("jason");
        let m = RequestMatch {
            headers: vec![("end-user".into(), StringMatch::Exact("jason".into()))],
            ..Default::default()
        };
        assert!(m.matches(&view("/", &jason)));
        assert!(!m.matches(&view("/", &none)));
        let m = RequestMatch {
            without_headers: vec![("end-user".into(), StringMatch::Present)],
            ..Default::default()
        };
        assert!(!m.matches(&view("/", &jason)));
        assert!(m.matches(&view("/", &none)));
        let m = RequestMatch {
            uri: Some(StringMatch::Prefix("/API".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        assert!(m.matches(&view("/api/x", &none)));
        let m = RequestMatch {
            query_params: vec![("v".into(), StringMatch::Exact("2".into()))],
            ..Default::default()
        };
        assert!(m.matches(&view("/a?x=1&v=2", &none)));
        assert!(!m.matches(&view("/a?v=3", &none)));
        let re = StringMatch::Regex(regex::Regex::new("^(?:/v[0-9]+/.*)$").unwrap());
        assert!(re.matches("/v1/x") && !re.matches("/x/v1/x"));
    }

    #[test]
    fn virtual_host_selection() {
        let vh = |name: &str, domains: &[&str]| VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![],
        };
        let t = HttpRouteTable {
            virtual_hosts: vec![
                vh("a", &["a.example.com"]),
                vh("w", &["*.example.com"]),
                vh("ww", &["*.b.example.com"]),
                vh("any", &["*"]),
            ],
            unknown_host: UnknownHost::NotFound,
        };
        assert_eq!(t.virtual_host("a.example.com").unwrap().name, "a");
        assert_eq!(t.virtual_host("x.example.com:80").unwrap().name, "w");
        assert_eq!(t.virtual_host("x.b.example.com").unwrap().name, "ww");
        assert_eq!(t.virtual_host("other").unwrap().name, "any");
    }
}
