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
    /// The effective config as JSON, for `/config_dump`.
    pub dump: serde_json::Value,
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

/// A listening socket and what to do with its connections.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Envoy-style name, `<bind>_<port>`, used in stats.
    pub name: String,
    pub address: SocketAddr,
    pub direction: Direction,
    /// TCP proxying: the weighted clusters a new connection is sent to (one entry = no choice).
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
    pub connect_timeout: Duration,
    /// No bytes either way for this long closes both sides.
    pub idle_timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

/// One upstream address.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

/// Istio's default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default TCP `idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Where the admin listener binds when `Proxy.spec.admin` is absent.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";
