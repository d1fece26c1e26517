//! The compiled, immutable configuration that workers read: listeners, routes and clusters.
//!
//! Everything a worker needs per connection is resolved here, at load time: names are indices,
//! durations are `std::time::Duration`, and no YAML or string lookup is left for the hot path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// One complete configuration. Workers hold the snapshot a connection started with until it ends.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Content hash of the files this snapshot was compiled from.
    pub version: String,
    pub proxy: ProxySettings,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    /// AuthorizationPolicy and RequestAuthentication for this workload (inbound listeners).
    pub security: Security,
    /// Local rate limits that routes refer to by index.
    pub rate_limits: Vec<crate::http_routes::LocalRateLimit>,
    /// Host names resolved for ServiceEntries with resolution DNS or DNS_ROUND_ROBIN (resolved
    /// again in the background; a change is a new snapshot).
    pub dns_names: Vec<String>,
    /// Certificate and key files the config names: watched, so that a rotated file reloads.
    pub material_files: Vec<std::path::PathBuf>,
    /// The resources it was compiled from, for `/config_dump` (rendered on request, not at load).
    pub source: std::sync::Arc<crate::load::RawConfig>,
}

impl Snapshot {
    /// The effective config as JSON: version, files, resources, listeners and clusters.
    pub fn dump(&self) -> serde_json::Value {
        crate::compile::dump(&self.source, &self.version, &self.listeners, &self.clusters)
    }
}

/// The security policies that apply to this workload's inbound traffic.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub authz: crate::authz::Authz,
    /// JWT providers from every RequestAuthentication that applies.
    pub jwt: Vec<crate::jwt::JwtProvider>,
}

/// What the `Proxy` resource says about this process.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub name: String,
    pub namespace: String,
    /// Worker threads asked for; 0 = one per online core.
    pub workers: usize,
    pub admin_address: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub http: HttpLimits,
    pub http2: Http2Limits,
    /// The mesh certificate (`spec.identity`); without it there is no mesh mTLS either way.
    pub identity: Option<Identity>,
    /// First byte and TLS handshake of a downstream connection must arrive within this.
    pub tls_handshake_timeout: Duration,
    /// `spec.telemetry.accessLog`: where and how requests and connections are logged.
    pub access_log: Option<AccessLog>,
    /// `spec.telemetry.tracing`: None when tracing is off.
    pub tracing: Option<Tracing>,
    /// `spec.dns`: name servers (empty: the system's) and the longest refresh interval.
    /// Present when the pod's traffic is captured (`Proxy.spec.interception`).
    pub interception: Option<Interception>,
    pub dns_servers: Vec<SocketAddr>,
    pub dns_refresh: Duration,
}

/// The access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// Relative paths are relative to the file naming them.
    pub path: std::path::PathBuf,
    pub format: crate::access_log::Format,
    /// The request and response headers the format prints (see `Format::headers`).
    pub request_headers: Vec<String>,
    pub response_headers: Vec<String>,
}

/// Where spans are sent, and how many requests are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// Zipkin v2 JSON collector: (`host:port`, path).
    pub zipkin: Option<(String, String)>,
    /// OTLP/HTTP (JSON) collector: (`host:port`, path).
    pub otlp: Option<(String, String)>,
    /// Requests traced when the caller did not say, in millionths.
    pub sampling: crate::http_routes::Share,
}

/// HTTP connection limits and timeouts (`Proxy.spec.http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub request_headers_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_request_headers_bytes: usize,
    pub max_headers: usize,
    pub max_request_target_bytes: usize,
    /// The most of a request body kept for retries and mirrors.
    pub max_request_buffer_bytes: usize,
}

impl Default for HttpLimits {
    /// Envoy's defaults where it has them (60 KiB heads, 100 fields, 1 h idle); 10 s for a head.
    fn default() -> Self {
        HttpLimits {
            request_headers_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_request_headers_bytes: 60 * 1024,
            max_headers: 100,
            max_request_target_bytes: 8 * 1024,
            max_request_buffer_bytes: 64 * 1024,
        }
    }
}

/// HTTP/2 limits (`Proxy.spec.http2`): windows, streams, and the flood defences' thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_continuation_frames: u32,
    pub premature_reset_min_streams: u32,
    pub premature_reset_percent: u32,
    pub max_control_frames_per_second: u32,
    pub max_consecutive_empty_frames: u32,
    pub send_window_timeout: Duration,
}

impl Default for Http2Limits {
    /// Windows large enough that one transfer on loopback is not window-bound (Envoy uses 256
    /// MiB; these bound what a stalled upstream leaves buffered per stream), Envoy's flood
    /// thresholds where it has them.
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 1024,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_continuation_frames: 32,
            premature_reset_min_streams: 100,
            premature_reset_percent: 50,
            max_control_frames_per_second: 1000,
            max_consecutive_empty_frames: 1,
            send_window_timeout: Duration::from_secs(30),
        }
    }
}

/// Whether a listener faces the mesh (inbound to the app) or the app (outbound to services).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    /// Lower-case name used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
    /// Undeclared, on a captured port: told from the first bytes (HTTP/1.1 request line, HTTP/2
    /// preface, or over mesh TLS the ALPN); anything else, or silence for the detection timeout,
    /// is TCP. Such a listener has both an HTTP route table and a TCP route.
    Auto,
}

/// How the kernel tells a captured connection's original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// nat REDIRECT: SO_ORIGINAL_DST on the accepted socket.
    Redirect,
    /// mangle TPROXY (inbound): the accepted socket's local address is the original destination.
    Tproxy,
}

impl CaptureMode {
    /// The name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Redirect => "REDIRECT",
            CaptureMode::Tproxy => "TPROXY",
        }
    }
}

/// `Proxy.spec.interception`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    pub mode: CaptureMode,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// How long an undeclared port waits for the client's first bytes before it is taken for TCP.
    pub detection_timeout: Duration,
    /// The capture ports also listen on `[::]`.
    pub ipv6: bool,
}

/// Whether a listener has a socket of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Bound at its address.
    Bound,
    /// A capture port (15001 / 15006): each accepted connection is served by the virtual listener
    /// its original destination names (an exact `ip:port` first, then `0.0.0.0:port`), else by
    /// this listener itself (passthrough, or refused under REGISTRY_ONLY).
    Capture(CaptureMode),
    /// No socket (Envoy's `bind_to_port: false`): reached only through a capture listener of the
    /// same direction, for connections whose original destination is its address.
    Virtual,
}

/// A listening socket and what to do with its connections.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Envoy-style name, `<bind>_<port>`, used in stats.
    pub name: String,
    pub address: SocketAddr,
    pub direction: Direction,
    pub protocol: Protocol,
    /// TCP proxying: the weighted clusters a new connection is sent to (one entry = no choice).
    pub route: Vec<WeightedCluster>,
    /// HTTP listeners: virtual hosts and routes.
    pub http: Option<crate::http_routes::HttpRouteTable>,
    /// TLS on accepted connections: mesh mTLS (from PeerAuthentication) or the Sidecar ingress `tls`.
    pub tls: Option<DownstreamTls>,
    /// TLS passthrough (an egress port with protocol TLS or HTTPS): the route is chosen by the
    /// ClientHello's SNI, in order; empty for every other listener.
    pub sni_routes: Vec<SniRoute>,
    /// Bound, a capture port, or virtual (reached through a capture port).
    pub binding: Binding,
}

impl Listener {
    /// Whether the listener owns listening sockets (virtual listeners do not).
    pub fn binds(&self) -> bool {
        self.binding != Binding::Virtual
    }

    /// Whether every connection this listener serves opens with bytes from the client: an HTTP
    /// request or preface (plaintext, or inside TLS, or either under PERMISSIVE), a ClientHello
    /// (TLS terminated or routed by SNI, or mesh mTLS under STRICT). Such a listener's sockets can
    /// wait for those bytes before handing a connection over (TCP_DEFER_ACCEPT). Not a plain TCP
    /// port, where the server may speak first (MySQL, SMTP), nor a capture port or a port whose
    /// protocol is detected from the first bytes, which carry any protocol.
    pub fn client_speaks_first(&self) -> bool {
        if self.binding != Binding::Bound {
            return false;
        }
        match self.protocol {
            Protocol::Http => true,
            Protocol::Auto => false,
            Protocol::Tcp => {
                !self.sni_routes.is_empty()
                    || matches!(
                        self.tls,
                        Some(DownstreamTls::Terminate(_))
                            | Some(DownstreamTls::Mesh { permissive: false })
                    )
            }
        }
    }

    /// The virtual listener of `listeners` that serves a connection captured by a listener of
    /// `direction` whose original destination is `dst`: an exact address first, then a wildcard
    /// address on the same port.
    pub fn virtual_for(
        listeners: &[Listener],
        direction: Direction,
        dst: SocketAddr,
    ) -> Option<usize> {
        let candidates = || {
            listeners.iter().enumerate().filter(|(_, l)| {
                l.binding == Binding::Virtual
                    && l.direction == direction
                    && l.address.port() == dst.port()
            })
        };
        candidates()
            .find(|(_, l)| l.address.ip() == dst.ip())
            .or_else(|| candidates().find(|(_, l)| l.address.ip().is_unspecified()))
            .map(|(i, _)| i)
    }

    /// The route for a ClientHello naming `server_name`: an exact name first, then the most
    /// specific wildcard (`*.example.com`), as Envoy matches `server_names`.
    pub fn sni_route(&self, server_name: Option<&str>) -> Option<&SniRoute> {
        let name = server_name?;
        self.sni_routes
            .iter()
            .find(|r| r.server_names.iter().any(|s| s.eq_ignore_ascii_case(name)))
            .or_else(|| {
                self.sni_routes
                    .iter()
                    .filter_map(|r| {
                        r.server_names
                            .iter()
                            .filter(|s| s.starts_with('*') && crate::host::matches(s, name))
                            .map(|s| s.len())
                            .max()
                            .map(|len| (len, r))
                    })
                    .max_by_key(|(len, _)| *len)
                    .map(|(_, r)| r)
            })
    }
}

/// One SNI route of a TLS passthrough listener.
#[derive(Debug, Clone)]
pub struct SniRoute {
    /// Names as written (`reviews.example.com`, `*.example.com`).
    pub server_names: Vec<String>,
    /// Weighted destinations (one entry = no choice).
    pub route: Vec<WeightedCluster>,
}

/// A cluster a route can pick, with its relative weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightedCluster {
    /// Index into [`Snapshot::clusters`].
    pub cluster: usize,
    pub weight: u32,
}

/// How a cluster picks among its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    Random,
    /// Power of two choices on requests in flight (per worker).
    LeastRequest,
    /// Consistent hashing on a ring of at least this many points.
    RingHash {
        min_ring_size: usize,
    },
    /// Consistent hashing with a Maglev table of this (prime) size.
    Maglev {
        table_size: usize,
    },
    /// Keel's latency-aware power of two choices (annotation `keel.dev/load-balancer: PEAK_EWMA`).
    PeakEwma,
}

/// What a request is hashed by for consistent hashing (`consistentHash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (name lower-cased).
    Header(String),
    /// The downstream client's IP address (also for TCP).
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
    /// A cookie's value; when the request has none and `ttl` is set, Keel makes one up, hashes
    /// by it, and sets it on the response (`Max-Age` = ttl; a session cookie when ttl is 0).
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
        /// `httpCookie.attributes`, each `name` or `name=value`, appended to a cookie Keel sets.
        attributes: Vec<String>,
    },
}

/// TCP keepalive for upstream sockets (`connectionPool.tcp.tcpKeepalive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// A set of upstream endpoints with one policy: Istio's `outbound|port|subset|host` or `inbound|port||`.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub lb: LbPolicy,
    /// For `RingHash` and `Maglev`: what to hash; a request without it is balanced at random.
    pub hash_key: Option<HashKey>,
    pub connect_timeout: Duration,
    /// No bytes either way for this long closes both sides.
    pub idle_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// TLS to the endpoints (DestinationRule `trafficPolicy.tls`); `None` is plaintext.
    pub tls: Option<UpstreamTls>,
    /// Circuit breakers (`connectionPool`), enforced over all workers together.
    pub limits: CircuitLimits,
    /// Outlier detection (DestinationRule `outlierDetection`); `None` is off.
    pub outlier: Option<OutlierPolicy>,
    /// Active health checks (the ServiceEntry's `health.keel.dev/*` annotations); `None` is off.
    pub health_check: Option<HealthCheck>,
    /// How long an idle upstream HTTP connection is kept for reuse (`connectionPool.http.idleTimeout`,
    /// else the TCP idle timeout).
    pub pool_idle_timeout: Duration,
    /// What HTTP requests to the endpoints are sent over.
    pub protocol: UpstreamProtocol,
    /// Istio's `PassthroughCluster`: no endpoints of its own; each request goes to the address
    /// its authority names (ALLOW_ANY).
    pub original_dst: bool,
    /// The address upstream connections are made from, when not the kernel's choice: Istio's
    /// 127.0.0.6 for inbound clusters under interception, which the capture rules let through
    /// (so that a connection to the pod's own address is not captured again).
    pub bind_source: Option<std::net::IpAddr>,
    /// `loadBalancer.warmupDurationSecs`: slow start for endpoints that join or come back.
    pub warmup: Option<Duration>,
}

/// The HTTP version spoken to a cluster's endpoints, decided as Istio decides it: the service
/// port's protocol (`HTTP2`, `GRPC`, `GRPC-WEB`: HTTP/2), else the DestinationRule's
/// `h2UpgradePolicy: UPGRADE` (HTTP/2) or `useClientProtocol` (the client's), else HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The protocol the client's request came in (`useClientProtocol: true`).
    Client,
}

/// Active health checking of a cluster's endpoints, configured by annotations on the ServiceEntry
/// (Istio has no field for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `Some(path)`: an HTTP GET of the path must answer one of `statuses`; `None`: a TCP connect.
    pub http_path: Option<String>,
    /// Inclusive status ranges an HTTP check accepts (default 200-299).
    pub statuses: Vec<(u16, u16)>,
    /// The Host header of HTTP checks: the service host.
    pub host: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// When an endpoint is ejected for consecutive errors, and for how long (Istio's defaults: 5
/// consecutive 5xx, 10 s interval, 30 s base ejection, 10% of hosts at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 0 is off.
    pub consecutive_5xx: u32,
    /// 0 is off.
    pub consecutive_gateway: u32,
    /// How often an ejected host's count of past ejections decays by one.
    pub interval: Duration,
    /// An ejection lasts this times the number of times the host was ejected (at most 300 s, or
    /// the base when that is longer).
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of hosts not ejected, ejections are ignored (0: never).
    pub min_health_percent: u32,
}

/// A cluster's circuit breakers (Envoy's thresholds); `u32::MAX` is unlimited, Istio's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitLimits {
    /// `tcp.maxConnections`: connections open or opening.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight.
    pub max_requests: u32,
    /// `http.maxRetries`: retries in flight; `None` = the retry budget (20% of active requests,
    /// at least 3).
    pub max_retries: Option<u32>,
    /// `http.maxRequestsPerConnection`: 0 is unlimited.
    pub max_requests_per_connection: u32,
    /// `http.maxConcurrentStreams`: streams Keel opens at once on one HTTP/2 connection, also
    /// bounded by the peer's SETTINGS_MAX_CONCURRENT_STREAMS; past both, another connection opens.
    pub max_concurrent_streams: u32,
}

impl Default for CircuitLimits {
    fn default() -> Self {
        CircuitLimits {
            max_connections: u32::MAX,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_retries: None,
            max_requests_per_connection: 0,
            max_concurrent_streams: u32::MAX,
        }
    }
}

/// One upstream address.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// Locality priority: 0 = this proxy's region, zone and subzone, 1 = region and zone,
    /// 2 = region, 3 = the region `failover` names for this one, 4 = elsewhere. All 0 when
    /// locality-prioritized balancing is off (or `distribute` applies).
    pub priority: u8,
}

/// Istio's default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default TCP `idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Where the admin listener binds when `Proxy.spec.admin` is absent.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";

/// A PEM file named by the config, read when the config was loaded (so a change to it is a new
/// config version, and a bad one is rejected like any other config error).
#[derive(Debug, Clone)]
pub struct Pem {
    /// As resolved (relative paths are relative to the file naming them).
    pub path: std::path::PathBuf,
    pub bytes: std::sync::Arc<[u8]>,
    /// Where it was named, for errors found when the TLS contexts are built.
    pub origin: crate::load::Origin,
    pub field: String,
}

impl Pem {
    /// An error about this file's content, pointing at the field that names it.
    pub fn error(&self, message: impl std::fmt::Display) -> crate::ConfigError {
        self.origin
            .error(&self.field, format!("{}: {message}", self.path.display()))
    }
}

/// This workload's mesh identity (`Proxy.spec.identity`).
#[derive(Debug, Clone)]
pub struct Identity {
    pub certificate_chain: Pem,
    pub private_key: Pem,
    pub root_certificates: Pem,
    pub trust_domain: String,
}

/// How accepted connections are secured.
#[derive(Debug, Clone)]
pub enum DownstreamTls {
    /// Mesh mTLS with the proxy's identity; clients must present a mesh certificate of our trust
    /// domain. `permissive` also admits plaintext on the same port (told apart by the first byte).
    Mesh { permissive: bool },
    /// TLS for clients outside the mesh, with the listener's own certificate (Sidecar ingress `tls`).
    Terminate(Box<ServerTls>),
}

impl DownstreamTls {
    /// Lower-case name for logs and `/config_dump`.
    pub fn describe(&self) -> &'static str {
        match self {
            DownstreamTls::Mesh { permissive: true } => "istio_mutual_permissive",
            DownstreamTls::Mesh { permissive: false } => "istio_mutual_strict",
            DownstreamTls::Terminate(t) if t.client_ca.is_some() => "mutual",
            DownstreamTls::Terminate(_) => "simple",
        }
    }
}

/// TLS protocol versions, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// Sidecar ingress `tls` SIMPLE / MUTUAL.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub certificate_chain: Pem,
    pub private_key: Pem,
    /// MUTUAL: client certificates must chain to these.
    pub client_ca: Option<Pem>,
    /// MUTUAL: a client certificate must carry one of these SANs (DNS or URI), when any are given.
    pub subject_alt_names: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// Gateway servers sharing a port: a certificate per server's hosts, chosen by the
    /// ClientHello's SNI (the fields above are the default, for a name none of these has).
    pub sni_certificates: Vec<SniCertificate>,
}

/// A certificate for the names of one Gateway server.
#[derive(Debug, Clone)]
pub struct SniCertificate {
    /// As written (`bookinfo.example.com`, `*.example.com`, `*`).
    pub server_names: Vec<String>,
    pub certificate_chain: Pem,
    pub private_key: Pem,
}

/// DestinationRule `tls` mode, DISABLE being no [`UpstreamTls`] at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTlsMode {
    Simple,
    Mutual,
    IstioMutual,
}

/// TLS origination to a cluster's endpoints.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub mode: UpstreamTlsMode,
    /// Sent as SNI and, without `subject_alt_names`, the name the certificate must be valid for.
    pub sni: String,
    /// The server certificate must carry one of these (DNS or URI SAN) when any are given.
    pub subject_alt_names: Vec<String>,
    /// SIMPLE / MUTUAL roots; `None` = the system's (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca: Option<Pem>,
    /// MUTUAL: our certificate and key.
    pub client_certificate: Option<Pem>,
    pub private_key: Option<Pem>,
    pub insecure_skip_verify: bool,
}
