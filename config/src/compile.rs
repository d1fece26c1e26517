//! Validation and compilation: from the resources as written to the [`Snapshot`] workers run.
//!
//! Every problem is collected (not just the first), each pointing at the field to fix. A config with
//! any error compiles to nothing: the caller keeps whatever it was running.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::error::{closest, ConfigError};
use crate::host::{self, VisibleHosts};
use crate::http_routes::{
    self as hr, HeaderOps, HttpRoute, HttpRouteTable, RouteAction, RouteTarget, VirtualHost,
};
use crate::load::{Located, Origin, RawConfig};
use crate::model::*;
use crate::snapshot::*;

mod gateway;
mod interception;
mod rate_limit;
mod security;
mod tls;

pub use tls::{DEFAULT_TRUST_DOMAIN, ROOT_NAMESPACE};

use crate::load::fnv1a;

/// Name resolution for ServiceEntries with resolution DNS or DNS_ROUND_ROBIN, done by the caller:
/// the config crate does no I/O.
pub trait Dns: Send + Sync {
    /// The addresses `name` has now, asking `servers` (empty: the system's name servers); None
    /// when it does not resolve (yet): the cluster then has no endpoint from it until it does.
    fn lookup(&self, servers: &[SocketAddr], name: &str) -> Option<Vec<IpAddr>>;
}

/// No resolution at all (`keel validate`, tests): DNS clusters compile without endpoints.
pub struct NoDns;

impl Dns for NoDns {
    fn lookup(&self, _: &[SocketAddr], _: &str) -> Option<Vec<IpAddr>> {
        None
    }
}

/// Compiles parsed resources into a snapshot, or returns every error found.
pub fn compile(raw: RawConfig) -> Result<Snapshot, Vec<ConfigError>> {
    compile_with(raw, std::sync::Arc::new(NoDns))
}

/// [`compile`], resolving DNS ServiceEntries with `dns`.
pub fn compile_with(
    raw: RawConfig,
    dns: std::sync::Arc<dyn Dns>,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut c = Compiler {
        dns,
        dns_names: Vec::new(),
        dns_servers: Vec::new(),
        errors: Vec::new(),
        clusters: Vec::new(),
        cluster_index: HashMap::new(),
        material: Vec::new(),
        material_hash: raw.content_hash,
        peer_authn: tls::PeerAuthn::default(),
        locality: None,
        rate_limits: Vec::new(),
        interception: None,
        routes_checked: Default::default(),
    };
    c.check_not_supported(&raw);
    let proxy = c.proxy(&raw);
    c.interception = proxy.as_ref().and_then(|p| p.interception.clone());
    c.locality = raw
        .proxies
        .first()
        .and_then(|p| p.value.spec.workload.locality.clone());
    if let Some(p) = &proxy {
        c.peer_authn = c.peer_authn(&raw, p);
        c.dns_servers = p.dns_servers.clone();
    }
    let registry = c.registry(&raw);
    let have_identity = proxy.as_ref().is_some_and(|p| p.identity.is_some());
    let rules = c.destination_rules(&raw, &registry, have_identity);
    let security = match &proxy {
        Some(p) => c.security(&raw, p),
        None => Security::default(),
    };
    let mut listeners = Vec::new();
    if let Some(proxy) = &proxy {
        let sidecar = c.select_sidecar(&raw, proxy);
        if let Some(sidecar) = sidecar {
            c.listeners(sidecar, proxy, &raw, &registry, &rules, &mut listeners);
        }
        if let Some(ic) = c.interception.clone() {
            let visible = interception::capturing_egress(sidecar);
            let mode = sidecar
                .and_then(|s| s.value.spec.outbound_traffic_policy.as_ref())
                .and_then(|p| p.mode)
                .unwrap_or(OutboundMode::AllowAny);
            let o = sidecar.map(|s| &s.origin);
            c.captured_listeners(
                &ic,
                o,
                &raw,
                &registry,
                &rules,
                proxy,
                &visible,
                mode,
                &mut listeners,
            );
            for l in &listeners {
                let clash = listeners.iter().find(|b| {
                    b.binding == Binding::Bound
                        && matches!(l.binding, Binding::Capture(_))
                        && b.address.port() == l.address.port()
                        && overlaps(b.address.ip(), l.address.ip())
                });
                if let (Some(b), Some(p)) = (clash, raw.proxies.first()) {
                    let field = if l.direction == Direction::Inbound {
                        "spec.interception.inboundPort"
                    } else {
                        "spec.interception.outboundPort"
                    };
                    c.errors.push(p.origin.error(
                        field,
                        format!(
                            "listener {} uses port {}, the capture port of {}",
                            b.name,
                            l.address.port(),
                            l.name
                        ),
                    ));
                }
            }
        }
        c.gateway_listeners(&raw, &registry, &rules, proxy, &mut listeners);
        c.check_virtual_services(&raw, &registry, &rules, proxy);
        for l in &listeners {
            if l.address.port() == proxy.admin_address.port()
                && overlaps(l.address.ip(), proxy.admin_address.ip())
            {
                c.errors.push(ConfigError::global(
                    "",
                    format!(
                        "listener {} uses the admin port {}",
                        l.name, proxy.admin_address
                    ),
                ));
            }
        }
    }
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let proxy = proxy.ok_or_else(Vec::new)?;
    let version = format!("{:016x}", c.material_hash);
    Ok(Snapshot {
        version,
        proxy,
        listeners,
        clusters: c.clusters,
        security,
        rate_limits: c.rate_limits,
        dns_names: c.dns_names,
        material_files: c.material,
        source: std::sync::Arc::new(raw),
    })
}

struct Compiler {
    errors: Vec<ConfigError>,
    clusters: Vec<Cluster>,
    cluster_index: HashMap<String, usize>,
    /// Certificate and key files read, to be watched for rotation.
    material: Vec<std::path::PathBuf>,
    /// The config files' hash with every certificate and key file folded in: the config version.
    material_hash: u64,
    /// The PeerAuthentication in force for this workload.
    peer_authn: tls::PeerAuthn,
    /// This proxy's locality (`Proxy.spec.workload.locality`), for locality-prioritized balancing.
    locality: Option<String>,
    /// Local rate limits of the routes compiled so far.
    rate_limits: Vec<hr::LocalRateLimit>,
    /// `Proxy.spec.interception`, when the pod's traffic is captured.
    interception: Option<Interception>,
    /// VirtualServices (by address) whose HTTP routes some listener has compiled, and so checked.
    routes_checked: std::collections::HashSet<usize>,
    dns: std::sync::Arc<dyn Dns>,
    /// Names resolved so far, and the name servers asked.
    dns_names: Vec<String>,
    dns_servers: Vec<SocketAddr>,
}

/// One port of one service in the registry.
struct Service<'a> {
    host: String,
    namespace: String,
    entry: &'a Located<ServiceEntrySpec>,
}

/// All ServiceEntry hosts, qualified.
struct Registry<'a> {
    services: Vec<Service<'a>>,
}

impl<'a> Registry<'a> {
    fn find(&self, host: &str) -> Option<&Service<'a>> {
        self.services.iter().find(|s| s.host == host)
    }
}

/// The DestinationRule in force for a host.
struct Rule<'a> {
    host: String,
    rule: &'a Located<DestinationRuleSpec>,
    /// `trafficPolicy.tls`, compiled.
    tls: Option<tls::RuleTls>,
    /// Subsets whose own trafficPolicy sets `tls` (which then replaces the rule's).
    subset_tls: Vec<(String, Option<tls::RuleTls>)>,
}

fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// Istio's default ring size, and the largest Keel accepts (Envoy's maximum).
const DEFAULT_MIN_RING_SIZE: u64 = 1024;
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Istio's default Maglev table size.
const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// `consistentHash` must name exactly one key and at most one table, with sane sizes.
fn check_consistent_hash(
    errors: &mut Vec<ConfigError>,
    o: &Origin,
    ch: &ConsistentHash,
    with_simple: bool,
    at: &str,
) {
    if let Some(c) = &ch.http_cookie {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for (i, a) in c.attributes.iter().enumerate() {
            // An attribute must not smuggle another one in (or end the header).
            let bad_value = a
                .value
                .as_deref()
                .is_some_and(|v| v.bytes().any(|b| b == b';' || b.is_ascii_control()));
            if a.name.is_empty() || !a.name.bytes().all(token) || bad_value {
                errors.push(o.error(
                    &format!("{at}.httpCookie.attributes[{i}]"),
                    "an attribute needs a token name and a value without `;` or control characters",
                ));
            }
        }
        if c.name.is_empty() || !c.name.bytes().all(token) {
            errors.push(o.error(
                &format!("{at}.httpCookie.name"),
                format!("`{}` is not a valid cookie name", c.name),
            ));
        }
        if let Some(p) = &c.path {
            if !p.starts_with('/') || p.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                errors.push(o.error(
                    &format!("{at}.httpCookie.path"),
                    format!("`{p}` is not a cookie path (it starts with / and has no ; or control characters)"),
                ));
            }
        }
    }
    let keys = [
        ch.http_header_name.is_some(),
        ch.http_cookie.is_some(),
        ch.use_source_ip == Some(true),
        ch.http_query_parameter_name.is_some(),
    ];
    match keys.iter().filter(|k| **k).count() {
        0 => errors.push(o.error(at, "consistentHash needs one of httpHeaderName, httpCookie, useSourceIp: true or httpQueryParameterName")),
        1 => {}
        _ => errors.push(o.error(at, "consistentHash takes only one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName")),
    }
    if ch.http_header_name.as_deref() == Some("") {
        errors.push(o.error(&format!("{at}.httpHeaderName"), "must not be empty"));
    }
    if ch.http_query_parameter_name.as_deref() == Some("") {
        errors.push(o.error(&format!("{at}.httpQueryParameterName"), "must not be empty"));
    }
    if ch.ring_hash.is_some() && ch.maglev.is_some() {
        errors.push(o.error(at, "set ringHash or maglev, not both"));
    }
    if with_simple {
        errors.push(o.error(
            at,
            "set loadBalancer.simple or loadBalancer.consistentHash, not both",
        ));
    }
    let ring = ch
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .or(ch.minimum_ring_size);
    if let Some(size) = ring {
        if !(1..=MAX_RING_SIZE).contains(&size) {
            errors.push(o.error(
                &format!("{at}.ringHash.minimumRingSize"),
                format!("must be between 1 and {MAX_RING_SIZE}"),
            ));
        }
    }
    if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size) {
        if size > 5_000_011 || !is_prime(size) {
            errors.push(o.error(
                &format!("{at}.maglev.tableSize"),
                format!("{size} is not a prime of at most 5000011 (Istio's default is 65537)"),
            ));
        }
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The balancer and hash key a valid `consistentHash` asks for.
fn consistent_hash_policy(ch: &ConsistentHash) -> (LbPolicy, Option<HashKey>) {
    let key = if let Some(h) = &ch.http_header_name {
        Some(HashKey::Header(h.to_ascii_lowercase()))
    } else if let Some(c) = &ch.http_cookie {
        Some(HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.map(|d| d.0),
            attributes: c
                .attributes
                .iter()
                .map(|a| match &a.value {
                    Some(v) => format!("{}={v}", a.name),
                    None => a.name.clone(),
                })
                .collect(),
        })
    } else if ch.use_source_ip == Some(true) {
        Some(HashKey::SourceIp)
    } else {
        ch.http_query_parameter_name
            .clone()
            .map(HashKey::QueryParameter)
    };
    let lb = match &ch.maglev {
        Some(m) => LbPolicy::Maglev {
            table_size: m.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE) as usize,
        },
        None => LbPolicy::RingHash {
            min_ring_size: ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(DEFAULT_MIN_RING_SIZE) as usize,
        },
    };
    (lb, key)
}

/// The outlier detection an `outlierDetection` asks for (values already checked); `None` when
/// both error counts are off.
fn outlier_policy(od: &OutlierDetection) -> Option<OutlierPolicy> {
    let count = |v: Option<i64>| v.map(|n| n.clamp(0, u32::MAX as i64) as u32);
    let policy = OutlierPolicy {
        consecutive_5xx: count(od.consecutive_5xx_errors).unwrap_or(5),
        consecutive_gateway: count(od.consecutive_gateway_errors)
            .or(count(od.consecutive_errors))
            .unwrap_or(0),
        interval: od.interval.map_or(Duration::from_secs(10), |d| d.0),
        base_ejection: od
            .base_ejection_time
            .map_or(Duration::from_secs(30), |d| d.0),
        max_ejection_percent: od
            .max_ejection_percent
            .map_or(10, |p| p.clamp(0, 100) as u32),
        min_health_percent: od.min_health_percent.map_or(0, |p| p.clamp(0, 100) as u32),
    };
    (policy.consecutive_5xx > 0 || policy.consecutive_gateway > 0).then_some(policy)
}

/// The DestinationRule annotation choosing one of Keel's own balancers (`PEAK_EWMA`).
const LB_ANNOTATION: &str = "keel.dev/load-balancer";

/// The annotation prefix of active health checks on a ServiceEntry.
const HEALTH_PREFIX: &str = "health.keel.dev/";
const HEALTH_KEYS: [&str; 7] = [
    "protocol",
    "path",
    "expected-statuses",
    "interval",
    "timeout",
    "unhealthy-threshold",
    "healthy-threshold",
];

/// Active health checks from a ServiceEntry's `health.keel.dev/*` annotations: `None` when there
/// are none; an error names the annotation.
fn health_check(
    annotations: &BTreeMap<String, String>,
    host: &str,
) -> Result<Option<HealthCheck>, (String, String)> {
    let ours: Vec<(&str, &str)> = annotations
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(HEALTH_PREFIX).map(|k| (k, v.as_str())))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let get = |key: &str| ours.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    for (k, _) in &ours {
        if !HEALTH_KEYS.contains(k) {
            let hint = closest(k, HEALTH_KEYS.iter().copied())
                .map(|h| format!(" (did you mean `{HEALTH_PREFIX}{h}`?)"))
                .unwrap_or_default();
            return Err((
                format!("{HEALTH_PREFIX}{k}"),
                format!("unknown health check annotation{hint}"),
            ));
        }
    }
    let err = |k: &str, m: String| (format!("{HEALTH_PREFIX}{k}"), m);
    let duration = |k: &str, default: Duration| -> Result<Duration, (String, String)> {
        match get(k) {
            None => Ok(default),
            Some(v) => crate::duration::parse(v)
                .map_err(|e| err(k, e))
                .and_then(|d| {
                    if d.is_zero() {
                        Err(err(k, "must be more than 0".into()))
                    } else {
                        Ok(d)
                    }
                }),
        }
    };
    let count = |k: &str, default: u32| -> Result<u32, (String, String)> {
        match get(k) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(err(k, format!("`{v}` is not a count of 1 or more"))),
            },
        }
    };
    let http = match (get("protocol"), get("path")) {
        (Some("tcp") | Some("TCP"), None) => None,
        (Some("tcp") | Some("TCP"), Some(_)) => {
            return Err(err("path", "a TCP check has no path".into()))
        }
        (None | Some("http") | Some("HTTP"), Some(p)) if p.starts_with('/') => Some(p.to_string()),
        (None | Some("http") | Some("HTTP"), Some(p)) => {
            return Err(err("path", format!("`{p}` must start with /")))
        }
        (Some("http") | Some("HTTP"), None) => Some("/".to_string()),
        (None, None) => None,
        (Some(other), _) => return Err(err("protocol", format!("`{other}` is not http or tcp"))),
    };
    let mut statuses = Vec::new();
    for part in get("expected-statuses").unwrap_or("200-299").split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            (Ok(a), Ok(b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
                statuses.push((a, b))
            }
            _ => {
                return Err(err(
                    "expected-statuses",
                    format!("`{part}` is not a status or a range such as 200-299"),
                ))
            }
        }
    }
    let interval = duration("interval", Duration::from_secs(5))?;
    let timeout = duration("timeout", Duration::from_secs(1))?;
    if timeout > interval {
        return Err(err(
            "timeout",
            "must not be longer than the interval".into(),
        ));
    }
    Ok(Some(HealthCheck {
        http_path: http,
        statuses,
        host: host.to_string(),
        interval,
        timeout,
        unhealthy_threshold: count("unhealthy-threshold", 3)?,
        healthy_threshold: count("healthy-threshold", 2)?,
    }))
}

/// An endpoint's locality priority seen from `ours` (`region/zone/subzone`): 0 when all three
/// match, 1 region and zone, 2 region, 3 otherwise (or when either is unknown).
/// `localityLbSetting`, checked as Istio does: `distribute` or `failover`, not both; shares that
/// add up to 100; failover between two different regions.
fn check_locality_setting(e: &mut Vec<ConfigError>, o: &Origin, l: &LocalityLbSetting, at: &str) {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        e.push(o.error(
            &format!("{at}.failover"),
            "set distribute or failover, not both (as Istio requires)",
        ));
    }
    for (i, d) in l.distribute.iter().enumerate() {
        let sum: u64 = d.to.values().map(|v| u64::from(*v)).sum();
        if sum != 100 {
            e.push(o.error(
                &format!("{at}.distribute[{i}].to"),
                format!("the shares add up to {sum}, not 100"),
            ));
        }
        for pattern in std::iter::once(&d.from).chain(d.to.keys()) {
            if pattern.is_empty() || pattern.split('/').count() > 3 {
                e.push(o.error(
                    &format!("{at}.distribute[{i}]"),
                    format!("`{pattern}` is not region[/zone[/subzone]] (each may be `*`)"),
                ));
            }
        }
    }
    for (i, f) in l.failover.iter().enumerate() {
        if f.from.is_empty() || f.to.is_empty() || f.from.contains('/') || f.to.contains('/') {
            e.push(o.error(
                &format!("{at}.failover[{i}]"),
                "failover goes from one region to another (no zones)",
            ));
        } else if f.from == f.to {
            e.push(o.error(
                &format!("{at}.failover[{i}].to"),
                "failover to the same region",
            ));
        }
    }
}

/// Whether a locality (`region/zone/subzone`) matches a distribute pattern (`us-west/*`,
/// `us-west/zone-1/*`, `us-west/zone-1/rack-2`): `*` matches anything from there on.
fn locality_matches(pattern: &str, locality: Option<&str>) -> bool {
    let locality = locality.unwrap_or("");
    let mut have = locality.split('/');
    for part in pattern.split('/') {
        if part == "*" {
            return true;
        }
        if have.next().unwrap_or("") != part {
            return false;
        }
    }
    have.all(str::is_empty)
}

/// Priorities as Istio assigns them with failover: the same subzone (0), zone (1), region (2),
/// the region `failover` names for ours (3), anywhere else (4).
fn locality_priority(
    ours: Option<&str>,
    theirs: Option<&str>,
    failover: &[LocalityFailover],
) -> u8 {
    let (Some(a), Some(b)) = (ours, theirs) else {
        return 4;
    };
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    let same = |x: Option<&str>, y: Option<&str>| x.is_some_and(|x| !x.is_empty() && Some(x) == y);
    let (ra, rb) = (a.next(), b.next());
    if !same(ra, rb) {
        let to_failover = failover
            .iter()
            .any(|f| Some(f.from.as_str()) == ra && Some(f.to.as_str()) == rb);
        return if to_failover { 3 } else { 4 };
    }
    if !same(a.next(), b.next()) {
        return 2;
    }
    if a.next().unwrap_or("") != b.next().unwrap_or("") {
        return 1;
    }
    0
}

/// `distribute`: each endpoint's weight becomes its locality pattern's share split over that
/// pattern's endpoints (by their own weights), as Envoy's locality-weighted balancing does;
/// endpoints in no listed locality get no traffic and are left out.
fn distribute_by_locality(
    d: &LocalityDistribute,
    endpoints: &mut Vec<Endpoint>,
    localities: &[Option<String>],
) {
    let pattern_of = |i: usize| {
        d.to.iter()
            .position(|(p, _)| locality_matches(p, localities[i].as_deref()))
    };
    let patterns: Vec<Option<usize>> = (0..endpoints.len()).map(pattern_of).collect();
    let shares: Vec<u32> = d.to.values().copied().collect();
    let mut totals = vec![0u64; shares.len()];
    for (e, p) in endpoints.iter().zip(&patterns) {
        if let Some(p) = p {
            totals[*p] += u64::from(e.weight);
        }
    }
    let mut i = 0;
    endpoints.retain_mut(|e| {
        let p = patterns[i];
        i += 1;
        let Some(p) = p.filter(|p| shares[*p] > 0) else {
            return false;
        };
        // Scaled so that small shares over many endpoints stay distinct.
        let w = u64::from(shares[p]) * 10_000 * u64::from(e.weight) / totals[p].max(1);
        e.weight = w.clamp(1, u64::from(u32::MAX)) as u32;
        e.priority = 0;
        true
    });
}

/// gRPC status names, indexed by code.
const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Refuses a negative or over-large connection-pool limit (Istio's are int32; 0 means unset).
fn check_limit(errors: &mut Vec<ConfigError>, origin: &Origin, value: Option<i64>, path: &str) {
    if let Some(v) = value {
        if !(0..=i32::MAX as i64).contains(&v) {
            errors.push(origin.error(path, format!("{v} is not a limit from 0 to 2147483647")));
        }
    }
}

/// The circuit breakers and pooled-connection idle timeout a `connectionPool` asks for (values
/// already checked by [`check_limit`]).
fn pool_policy(pool: Option<&ConnectionPoolSettings>) -> (CircuitLimits, Duration) {
    let limit = |v: Option<i64>| match v {
        Some(n) if n > 0 => n.min(u32::MAX as i64) as u32,
        _ => u32::MAX,
    };
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let limits = CircuitLimits {
        max_connections: limit(tcp.and_then(|t| t.max_connections)),
        max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: limit(http.and_then(|h| h.http2_max_requests)),
        max_retries: http
            .and_then(|h| h.max_retries)
            .filter(|n| *n > 0)
            .map(|n| n.min(u32::MAX as i64) as u32),
        max_requests_per_connection: http
            .and_then(|h| h.max_requests_per_connection)
            .filter(|n| *n > 0)
            .map_or(0, |n| n.min(u32::MAX as i64) as u32),
        max_concurrent_streams: limit(http.and_then(|h| h.max_concurrent_streams)),
    };
    let idle = http
        .and_then(|h| h.idle_timeout)
        .or(tcp.and_then(|t| t.idle_timeout))
        .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0);
    (limits, idle)
}

/// The HTTP version for a cluster, as Istio picks it: a port declared `HTTP2`, `GRPC` or
/// `GRPC-WEB` is HTTP/2; otherwise the DestinationRule's `h2UpgradePolicy: UPGRADE` upgrades it
/// and `useClientProtocol: true` follows the client; otherwise HTTP/1.1.
fn upstream_protocol(
    port_protocol: Option<&str>,
    pool: Option<&ConnectionPoolSettings>,
) -> UpstreamProtocol {
    let http = pool.and_then(|p| p.http.as_ref());
    let h2_port = port_protocol.is_some_and(|p| {
        ["HTTP2", "GRPC", "GRPC-WEB"]
            .iter()
            .any(|h2| p.eq_ignore_ascii_case(h2))
    });
    if h2_port || http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE") {
        UpstreamProtocol::Http2
    } else if http.and_then(|h| h.use_client_protocol) == Some(true) {
        UpstreamProtocol::Client
    } else {
        UpstreamProtocol::Http1
    }
}

/// `path` is formatted only for a field that is present: this check runs over every route.
fn not_supported<T>(
    errors: &mut Vec<ConfigError>,
    origin: &Origin,
    field: &Option<T>,
    path: impl std::fmt::Display,
) {
    if field.is_some() {
        let path = path.to_string();
        errors.push(origin.error(&path, format!("field `{path}` is not supported yet")));
    }
}

/// `name[index]`, formatted only when an error path needs it.
struct Indexed<'a>(&'a str, usize);

impl std::fmt::Display for Indexed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

impl Compiler {
    /// Refuses every Istio field Keel parses but does not enforce, so no policy is silently ignored.
    fn check_not_supported(&mut self, raw: &RawConfig) {
        let e = &mut self.errors;
        let pool = |e: &mut Vec<ConfigError>,
                    o: &Origin,
                    pool: &Option<ConnectionPoolSettings>,
                    at: &str| {
            if let Some(pool) = pool {
                if let Some(h) = &pool.http {
                    for (value, field) in [
                        (h.http1_max_pending_requests, "http1MaxPendingRequests"),
                        (h.http2_max_requests, "http2MaxRequests"),
                        (h.max_requests_per_connection, "maxRequestsPerConnection"),
                        (h.max_retries, "maxRetries"),
                    ] {
                        check_limit(e, o, value, &format!("{at}.http.{field}"));
                    }
                    match h.h2_upgrade_policy.as_deref() {
                        None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => {}
                        Some("UPGRADE") => {}
                        Some(other) => e.push(o.error(
                            &format!("{at}.http.h2UpgradePolicy"),
                            format!("`{other}` is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                        )),
                    }
                    check_limit(
                        e,
                        o,
                        h.max_concurrent_streams,
                        &format!("{at}.http.maxConcurrentStreams"),
                    );
                }
                if let Some(tcp) = &pool.tcp {
                    check_limit(
                        e,
                        o,
                        tcp.max_connections,
                        &format!("{at}.tcp.maxConnections"),
                    );
                    not_supported(
                        e,
                        o,
                        &tcp.max_connection_duration,
                        format_args!("{at}.tcp.maxConnectionDuration"),
                    );
                }
            }
        };
        for sc in &raw.sidecars {
            let (o, s) = (&sc.origin, &sc.value.spec);
            for (i, ing) in s.ingress.iter().enumerate() {
                if let Some(t) = &ing.tls {
                    let at = format!("spec.ingress[{i}].tls");
                    not_supported(e, o, &t.https_redirect, format_args!("{at}.httpsRedirect"));
                    not_supported(
                        e,
                        o,
                        &t.credential_name,
                        format_args!("{at}.credentialName"),
                    );
                    not_supported(
                        e,
                        o,
                        &t.credential_names,
                        format_args!("{at}.credentialNames"),
                    );
                    not_supported(e, o, &t.ca_crl, format_args!("{at}.caCrl"));
                    not_supported(
                        e,
                        o,
                        &t.verify_certificate_spki,
                        format_args!("{at}.verifyCertificateSpki"),
                    );
                    not_supported(
                        e,
                        o,
                        &t.verify_certificate_hash,
                        format_args!("{at}.verifyCertificateHash"),
                    );
                    not_supported(e, o, &t.cipher_suites, format_args!("{at}.cipherSuites"));
                }
                pool(
                    e,
                    o,
                    &ing.connection_pool,
                    &format!("spec.ingress[{i}].connectionPool"),
                );
            }
            pool(
                e,
                o,
                &s.inbound_connection_pool,
                "spec.inboundConnectionPool",
            );
            if let Some(otp) = &s.outbound_traffic_policy {
                not_supported(
                    e,
                    o,
                    &otp.egress_proxy,
                    "spec.outboundTrafficPolicy.egressProxy",
                );
            }
        }
        for se in &raw.service_entries {
            let (o, s) = (&se.origin, &se.value.spec);
            if let Err((key, message)) = health_check(&se.value.metadata.annotations, "") {
                e.push(o.error(&format!("metadata.annotations.{key}"), message));
            }
            not_supported(e, o, &s.addresses, "spec.addresses");
            not_supported(e, o, &s.workload_selector, "spec.workloadSelector");
            not_supported(e, o, &s.export_to, "spec.exportTo");
            for (i, ep) in s.endpoints.iter().enumerate() {
                not_supported(
                    e,
                    o,
                    &ep.network,
                    format_args!("spec.endpoints[{i}].network"),
                );
            }
        }
        for vs in &raw.virtual_services {
            let (o, s) = (&vs.origin, &vs.value.spec);
            for (i, r) in s.http.iter().enumerate() {
                let at = Indexed("spec.http", i);
                not_supported(e, o, &r.delegate, format_args!("{at}.delegate"));
                if let Some(rt) = &r.retries {
                    not_supported(
                        e,
                        o,
                        &rt.retry_remote_localities,
                        format_args!("{at}.retries.retryRemoteLocalities"),
                    );
                    not_supported(e, o, &rt.backoff, format_args!("{at}.retries.backoff"));
                }
                not_supported(e, o, &r.cors_policy, format_args!("{at}.corsPolicy"));
                for (j, m) in r.matches.iter().enumerate() {
                    not_supported(e, o, &m.gateways, format_args!("{at}.match[{j}].gateways"));
                    not_supported(
                        e,
                        o,
                        &m.stat_prefix,
                        format_args!("{at}.match[{j}].statPrefix"),
                    );
                }
                if let Some(rd) = &r.redirect {
                    not_supported(
                        e,
                        o,
                        &rd.derive_port,
                        format_args!("{at}.redirect.derivePort"),
                    );
                }
                if let Some(b) = r.direct_response.as_ref().and_then(|d| d.body.as_ref()) {
                    not_supported(
                        e,
                        o,
                        &b.bytes,
                        format_args!("{at}.directResponse.body.bytes"),
                    );
                }
                if let Some(rw) = &r.rewrite {
                    not_supported(
                        e,
                        o,
                        &rw.uri_regex_rewrite,
                        format_args!("{at}.rewrite.uriRegexRewrite"),
                    );
                }
            }
            for (i, r) in s.tls.iter().enumerate() {
                if r.matches.is_empty() {
                    e.push(o.error(
                        &format!("spec.tls[{i}].match"),
                        "a tls route needs a match with sniHosts",
                    ));
                }
                for (j, m) in r.matches.iter().enumerate() {
                    let at = format!("spec.tls[{i}].match[{j}]");
                    if m.sni_hosts.is_empty() {
                        e.push(o.error(&format!("{at}.sniHosts"), "sniHosts is required"));
                    }
                    not_supported(
                        e,
                        o,
                        &m.destination_subnets,
                        format_args!("{at}.destinationSubnets"),
                    );
                    not_supported(e, o, &m.gateways, format_args!("{at}.gateways"));
                }
            }
            not_supported(e, o, &s.export_to, "spec.exportTo");
            for (i, r) in s.tcp.iter().enumerate() {
                for (j, m) in r.matches.iter().enumerate() {
                    not_supported(
                        e,
                        o,
                        &m.destination_subnets,
                        format_args!("spec.tcp[{i}].match[{j}].destinationSubnets"),
                    );
                    not_supported(
                        e,
                        o,
                        &m.gateways,
                        format_args!("spec.tcp[{i}].match[{j}].gateways"),
                    );
                }
            }
        }
        let policy = |e: &mut Vec<ConfigError>,
                      o: &Origin,
                      tp: &Option<TrafficPolicy>,
                      at: &str| {
            if let Some(tp) = tp {
                if let Some(od) = &tp.outlier_detection {
                    let at = format!("{at}.outlierDetection");
                    for (value, field) in [
                        (od.consecutive_5xx_errors, "consecutive5xxErrors"),
                        (od.consecutive_gateway_errors, "consecutiveGatewayErrors"),
                        (od.consecutive_errors, "consecutiveErrors"),
                    ] {
                        check_limit(e, o, value, &format!("{at}.{field}"));
                    }
                    for (value, field) in [
                        (od.max_ejection_percent, "maxEjectionPercent"),
                        (od.min_health_percent, "minHealthPercent"),
                    ] {
                        if value.is_some_and(|v| !(0..=100).contains(&v)) {
                            e.push(o.error(
                                &format!("{at}.{field}"),
                                "must be a percentage from 0 to 100",
                            ));
                        }
                    }
                    if od.interval.is_some_and(|d| d.0.is_zero()) {
                        e.push(o.error(&format!("{at}.interval"), "must be more than 0"));
                    }
                    not_supported(
                        e,
                        o,
                        &od.split_external_local_origin_errors,
                        format_args!("{at}.splitExternalLocalOriginErrors"),
                    );
                    not_supported(
                        e,
                        o,
                        &od.consecutive_local_origin_failures,
                        format_args!("{at}.consecutiveLocalOriginFailures"),
                    );
                }
                if let Some(t) = &tp.tls {
                    not_supported(
                        e,
                        o,
                        &t.credential_name,
                        format_args!("{at}.tls.credentialName"),
                    );
                    not_supported(e, o, &t.ca_crl, format_args!("{at}.tls.caCrl"));
                }
                not_supported(
                    e,
                    o,
                    &tp.port_level_settings,
                    format_args!("{at}.portLevelSettings"),
                );
                not_supported(e, o, &tp.tunnel, format_args!("{at}.tunnel"));
                not_supported(e, o, &tp.proxy_protocol, format_args!("{at}.proxyProtocol"));
                if let Some(lb) = &tp.load_balancer {
                    if let Some(ch) = &lb.consistent_hash {
                        check_consistent_hash(
                            e,
                            o,
                            ch,
                            lb.simple.is_some(),
                            &format!("{at}.loadBalancer.consistentHash"),
                        );
                    }
                    if let Some(l) = &lb.locality_lb_setting {
                        let at = format!("{at}.loadBalancer.localityLbSetting");
                        check_locality_setting(e, o, l, &at);
                        not_supported(
                            e,
                            o,
                            &l.failover_priority,
                            format_args!("{at}.failoverPriority"),
                        );
                    }
                    if let Some(w) = lb.warmup_duration_secs {
                        let field = format!("{at}.loadBalancer.warmupDurationSecs");
                        let simple_ok = matches!(
                            lb.simple,
                            None | Some(SimpleLb::RoundRobin | SimpleLb::LeastRequest)
                        );
                        if lb.consistent_hash.is_some() || !simple_ok {
                            e.push(o.error(
                                &field,
                                "slow start applies to ROUND_ROBIN and LEAST_REQUEST only, as in Istio",
                            ));
                        } else if w.0 < Duration::from_secs(1) {
                            e.push(o.error(&field, "must be at least 1s"));
                        }
                    }
                }
                pool(e, o, &tp.connection_pool, &format!("{at}.connectionPool"));
            }
        };
        for dr in &raw.destination_rules {
            let (o, s) = (&dr.origin, &dr.value.spec);
            if let Some(v) = dr.value.metadata.annotations.get(LB_ANNOTATION) {
                let at = format!("metadata.annotations.{LB_ANNOTATION}");
                if v != "PEAK_EWMA" {
                    e.push(o.error(&at, format!("`{v}` is not a Keel balancer (PEAK_EWMA)")));
                }
                let hashed = std::iter::once(s.traffic_policy.as_ref())
                    .chain(s.subsets.iter().map(|x| x.traffic_policy.as_ref()))
                    .flatten()
                    .any(|tp| {
                        tp.load_balancer
                            .as_ref()
                            .is_some_and(|lb| lb.consistent_hash.is_some())
                    });
                if hashed {
                    e.push(o.error(&at, "PEAK_EWMA cannot be combined with consistentHash"));
                }
            }
            not_supported(e, o, &s.workload_selector, "spec.workloadSelector");
            not_supported(e, o, &s.export_to, "spec.exportTo");
            policy(e, o, &s.traffic_policy, "spec.trafficPolicy");
            for (i, sub) in s.subsets.iter().enumerate() {
                policy(
                    e,
                    o,
                    &sub.traffic_policy,
                    &format!("spec.subsets[{i}].trafficPolicy"),
                );
            }
        }
    }

    fn proxy(&mut self, raw: &RawConfig) -> Option<ProxySettings> {
        let p = match raw.proxies.as_slice() {
            [] => {
                let file = raw.files.first().cloned().unwrap_or_default();
                self.errors.push(ConfigError::global(file, "no `Proxy` resource (kind: Proxy, apiVersion: keel.dev/v1alpha1): exactly one is required"));
                return None;
            }
            [p] => p,
            [first, rest @ ..] => {
                for p in rest {
                    let (f, l, _) = (&first.origin.file, first.origin.doc.first_line, ());
                    self.errors.push(p.origin.error("kind", format!("a second `Proxy` resource; exactly one is allowed (the first is at {}:{l})", f.display())));
                }
                return None;
            }
        };
        let spec = &p.value.spec;
        let admin = spec
            .admin
            .as_ref()
            .map(|a| a.address.as_str())
            .unwrap_or(DEFAULT_ADMIN_ADDRESS);
        let admin_address = match admin.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.errors.push(p.origin.error(
                    "spec.admin.address",
                    format!("`{admin}` is not an IP:port address"),
                ));
                return None;
            }
        };
        let workers = spec.workers.unwrap_or(0) as usize;
        if workers > 1024 {
            self.errors
                .push(p.origin.error("spec.workers", "at most 1024 workers"));
        }
        let mut http = HttpLimits::default();
        if let Some(h) = &spec.http {
            if let Some(t) = h.request_headers_timeout {
                http.request_headers_timeout = t.0;
            }
            if let Some(t) = h.idle_timeout {
                http.idle_timeout = t.0;
            }
            if let Some(kb) = h.max_request_headers_kb {
                if kb == 0 || kb > 60 {
                    self.errors.push(
                        p.origin
                            .error("spec.http.maxRequestHeadersKb", "must be 1 to 60"),
                    );
                }
                http.max_request_headers_bytes = kb as usize * 1024;
            }
            if let Some(n) = h.max_headers_count {
                if n == 0 || n > 1000 {
                    self.errors.push(
                        p.origin
                            .error("spec.http.maxHeadersCount", "must be 1 to 1000"),
                    );
                }
                http.max_headers = n as usize;
            }
            if let Some(n) = h.max_request_target_bytes {
                if !(16..=60 * 1024).contains(&n) {
                    self.errors.push(
                        p.origin
                            .error("spec.http.maxRequestTargetBytes", "must be 16 to 61440"),
                    );
                }
                http.max_request_target_bytes = n as usize;
            }
            if let Some(n) = h.max_request_buffer_bytes {
                if n > 16 * 1024 * 1024 {
                    self.errors.push(p.origin.error(
                        "spec.http.maxRequestBufferBytes",
                        "must be at most 16777216 (16 MiB)",
                    ));
                }
                http.max_request_buffer_bytes = n as usize;
            }
        }
        let mut http2 = Http2Limits::default();
        if let Some(h) = &spec.http2 {
            let mut number = |value: Option<u32>,
                              field: &str,
                              range: std::ops::RangeInclusive<u32>,
                              into: &mut u32| {
                if let Some(v) = value {
                    if !range.contains(&v) {
                        self.errors.push(p.origin.error(
                            &format!("spec.http2.{field}"),
                            format!("must be {} to {}", range.start(), range.end()),
                        ));
                    }
                    *into = v;
                }
            };
            number(
                h.max_concurrent_streams,
                "maxConcurrentStreams",
                1..=1 << 20,
                &mut http2.max_concurrent_streams,
            );
            number(
                h.initial_stream_window_size,
                "initialStreamWindowSize",
                65_535..=(1 << 31) - 1,
                &mut http2.stream_window,
            );
            number(
                h.initial_connection_window_size,
                "initialConnectionWindowSize",
                65_535..=(1 << 31) - 1,
                &mut http2.connection_window,
            );
            number(
                h.max_continuation_frames,
                "maxContinuationFrames",
                0..=10_000,
                &mut http2.max_continuation_frames,
            );
            number(
                h.premature_reset_min_streams,
                "prematureResetMinStreams",
                1..=1 << 20,
                &mut http2.premature_reset_min_streams,
            );
            number(
                h.premature_reset_percent,
                "prematureResetPercent",
                1..=100,
                &mut http2.premature_reset_percent,
            );
            number(
                h.max_control_frames_per_second,
                "maxControlFramesPerSecond",
                1..=1 << 20,
                &mut http2.max_control_frames_per_second,
            );
            number(
                h.max_consecutive_empty_frames,
                "maxConsecutiveEmptyFrames",
                0..=1000,
                &mut http2.max_consecutive_empty_frames,
            );
            if let Some(t) = h.send_window_timeout {
                http2.send_window_timeout = t.0;
            }
        }
        let access_log = spec
            .telemetry
            .as_ref()
            .and_then(|t| t.access_log.as_ref())
            .and_then(|a| {
                let format = match a.format.as_deref() {
                    None | Some("text") | Some("TEXT") => {
                        crate::access_log::parse(crate::access_log::ISTIO_TEXT_FORMAT)
                            .map(crate::access_log::Format::Text)
                    }
                    Some("json") | Some("JSON") => Ok(crate::access_log::istio_json()),
                    Some(f) => crate::access_log::parse(f).map(crate::access_log::Format::Text),
                };
                let format = match format {
                    Ok(f) => f,
                    Err(m) => {
                        self.errors
                            .push(p.origin.error("spec.telemetry.accessLog.format", m));
                        return None;
                    }
                };
                if a.path.is_empty() {
                    self.errors.push(
                        p.origin
                            .error("spec.telemetry.accessLog.path", "must not be empty"),
                    );
                    return None;
                }
                let path = std::path::Path::new(&a.path);
                let path = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    p.origin
                        .file
                        .parent()
                        .map_or(path.to_path_buf(), |d| d.join(path))
                };
                let (request_headers, response_headers) = format.headers();
                Some(AccessLog {
                    path,
                    format,
                    request_headers,
                    response_headers,
                })
            });
        let mut dns_servers = Vec::new();
        let dns = p.value.spec.dns.as_ref();
        for (i, ns) in dns
            .map_or(&[][..], |d| &d.nameservers[..])
            .iter()
            .enumerate()
        {
            let parsed = ns
                .parse::<SocketAddr>()
                .or_else(|_| ns.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Ok(a) => dns_servers.push(a),
                Err(_) => self.errors.push(p.origin.error(
                    &format!("spec.dns.nameservers[{i}]"),
                    format!("`{ns}` is not an IP or IP:port"),
                )),
            }
        }
        let dns_refresh = dns
            .and_then(|d| d.refresh_rate)
            .map_or(Duration::from_secs(60), |d| d.0);
        if dns_refresh < Duration::from_secs(1) {
            self.errors.push(
                p.origin
                    .error("spec.dns.refreshRate", "must be at least 1s"),
            );
        }
        let tracing = p
            .value
            .spec
            .telemetry
            .as_ref()
            .and_then(|t| t.tracing.as_ref())
            .and_then(|t| {
                let at = "spec.telemetry.tracing";
                let mut collector = |c: &Option<CollectorSpec>, name: &str, path: &str| {
                    let c = c.as_ref()?;
                    let ok = c
                        .address
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                    if !ok {
                        self.errors.push(p.origin.error(
                            &format!("{at}.{name}.address"),
                            format!("`{}` is not host:port", c.address),
                        ));
                        return None;
                    }
                    let path = c.path.clone().unwrap_or_else(|| path.to_string());
                    if !path.starts_with('/') {
                        self.errors.push(
                            p.origin
                                .error(&format!("{at}.{name}.path"), "must start with /"),
                        );
                    }
                    Some((c.address.clone(), path))
                };
                let zipkin = collector(&t.zipkin, "zipkin", "/api/v2/spans");
                let otlp = collector(&t.otlp, "otlp", "/v1/traces");
                let sampling = t.sampling.unwrap_or(1.0);
                if !(0.0..=100.0).contains(&sampling) {
                    self.errors.push(p.origin.error(
                        &format!("{at}.sampling"),
                        format!("{sampling} is not a percentage (0 to 100)"),
                    ));
                }
                if zipkin.is_none() && otlp.is_none() {
                    self.errors.push(p.origin.error(
                        at,
                        "name a collector: zipkin: { address: host:port } and/or otlp: { address: host:port }",
                    ));
                    return None;
                }
                Some(Tracing {
                    zipkin,
                    otlp,
                    sampling: crate::http_routes::Share::percent(sampling),
                })
            });
        let interception = spec
            .interception
            .as_ref()
            .and_then(|ic| self.interception(&p.origin, ic, admin_address));
        // A traced request's span takes these two from the logged header set.
        let mut access_log = access_log;
        if let (Some(a), Some(_)) = (access_log.as_mut(), tracing.as_ref()) {
            for name in ["x-request-id", "user-agent"] {
                if !a.request_headers.iter().any(|n| n == name) {
                    a.request_headers.push(name.to_string());
                }
            }
        }
        Some(ProxySettings {
            interception,
            tracing,
            dns_servers,
            dns_refresh,
            access_log,
            http,
            http2,
            name: p.value.metadata.name.clone(),
            namespace: p.value.metadata.namespace().to_string(),
            workers,
            admin_address,
            labels: spec.workload.labels.clone(),
            identity: self.identity(p),
            tls_handshake_timeout: spec
                .tls
                .as_ref()
                .and_then(|t| t.handshake_timeout)
                .map_or(Duration::from_secs(10), |d| d.0),
        })
    }

    fn registry<'a>(&mut self, raw: &'a RawConfig) -> Registry<'a> {
        let mut services: Vec<Service<'a>> = Vec::new();
        for se in &raw.service_entries {
            let (o, s) = (&se.origin, &se.value.spec);
            let ns = se.value.metadata.namespace();
            if s.hosts.is_empty() {
                self.errors
                    .push(o.error("spec.hosts", "at least one host is required"));
            }
            if s.ports.is_empty() {
                self.errors
                    .push(o.error("spec.ports", "at least one port is required"));
            }
            let mut names: HashMap<&str, usize> = HashMap::new();
            for (i, port) in s.ports.iter().enumerate() {
                check_port(
                    &mut self.errors,
                    o,
                    port.number,
                    &format!("spec.ports[{i}].number"),
                );
                check_protocol(
                    &mut self.errors,
                    o,
                    port.protocol.as_deref(),
                    &format!("spec.ports[{i}].protocol"),
                );
                if let Some(name) = port.name.as_deref() {
                    if names.insert(name, i).is_some() {
                        self.errors.push(o.error(
                            &format!("spec.ports[{i}].name"),
                            format!("port name `{name}` is used twice"),
                        ));
                    }
                }
            }
            match s.resolution.unwrap_or(Resolution::None) {
                Resolution::Static => {
                    if s.endpoints.is_empty() {
                        self.errors.push(o.error(
                            "spec.endpoints",
                            "resolution STATIC needs at least one endpoint",
                        ));
                    }
                }
                Resolution::Dns | Resolution::DnsRoundRobin => {
                    if s.endpoints.is_empty() {
                        for (i, h) in s.hosts.iter().enumerate() {
                            if h.contains('*') {
                                self.errors.push(o.error(
                                    &format!("spec.hosts[{i}]"),
                                    "a wildcard host cannot be resolved: give resolution DNS endpoints, or list the names",
                                ));
                            }
                        }
                    }
                }
                Resolution::None if self.interception.is_some() => {}
                Resolution::None => {
                    self.errors.push(o.error("spec.resolution", "resolution NONE (the default) forwards to the original destination, which needs interception: not supported yet; use resolution: STATIC with endpoints"));
                }
            }
            let dns = matches!(
                s.resolution,
                Some(Resolution::Dns | Resolution::DnsRoundRobin)
            );
            for (i, ep) in s.endpoints.iter().enumerate() {
                if dns && host::valid_dns_name(&ep.address) {
                    // Resolved like the hosts.
                } else if ep.address.parse::<IpAddr>().is_err() {
                    let what = if ep.address.starts_with("unix://") {
                        "unix domain socket endpoints are not supported yet"
                    } else {
                        "with resolution STATIC an endpoint address must be an IP address (DNS and DNS_ROUND_ROBIN take names)"
                    };
                    self.errors.push(o.error(
                        &format!("spec.endpoints[{i}].address"),
                        format!("`{}`: {what}", ep.address),
                    ));
                }
                for (name, port) in &ep.ports {
                    if !names.contains_key(name.as_str()) {
                        let hint = closest(name, names.keys().copied())
                            .map(|n| format!(" (did you mean `{n}`?)"))
                            .unwrap_or_default();
                        self.errors.push(o.error(
                            &format!("spec.endpoints[{i}].ports.{name}"),
                            format!("no port named `{name}` in spec.ports{hint}"),
                        ));
                    }
                    check_port(
                        &mut self.errors,
                        o,
                        *port,
                        &format!("spec.endpoints[{i}].ports.{name}"),
                    );
                }
            }
            for (i, h) in s.hosts.iter().enumerate() {
                let host = host::qualify(h, ns);
                if host.starts_with('*') {
                    self.errors.push(o.error(
                        &format!("spec.hosts[{i}]"),
                        "wildcard ServiceEntry hosts are not supported yet",
                    ));
                    continue;
                }
                if let Some(prev) = services.iter().find(|x| x.host == host) {
                    let where_ = format!(
                        "{}:{}",
                        prev.entry.origin.file.display(),
                        prev.entry.origin.doc.first_line
                    );
                    self.errors.push(o.error(
                        &format!("spec.hosts[{i}]"),
                        format!(
                            "host `{host}` is already defined by ServiceEntry {} at {where_}",
                            prev.entry.value.metadata.name
                        ),
                    ));
                    continue;
                }
                services.push(Service {
                    host,
                    namespace: ns.to_string(),
                    entry: se,
                });
            }
        }
        Registry { services }
    }

    fn destination_rules<'a>(
        &mut self,
        raw: &'a RawConfig,
        registry: &Registry<'a>,
        have_identity: bool,
    ) -> Vec<Rule<'a>> {
        let mut rules: Vec<Rule<'a>> = Vec::new();
        for dr in &raw.destination_rules {
            let o = &dr.origin;
            let host = host::qualify(&dr.value.spec.host, dr.value.metadata.namespace());
            if registry
                .services
                .iter()
                .all(|s| !host::matches(&host, &s.host))
            {
                let hint = closest(&host, registry.services.iter().map(|s| s.host.as_str()))
                    .map(|h| format!(" (did you mean `{h}`?)"))
                    .unwrap_or_default();
                self.errors.push(o.error(
                    "spec.host",
                    format!("no ServiceEntry defines host `{host}`{hint}"),
                ));
            }
            if rules.iter().any(|r| r.host == host) {
                self.errors.push(o.error(
                    "spec.host",
                    format!("another DestinationRule already applies to host `{host}`"),
                ));
                continue;
            }
            let mut seen = HashMap::new();
            for (i, sub) in dr.value.spec.subsets.iter().enumerate() {
                if seen.insert(sub.name.as_str(), i).is_some() {
                    self.errors.push(o.error(
                        &format!("spec.subsets[{i}].name"),
                        format!("subset `{}` is defined twice", sub.name),
                    ));
                }
            }
            let spec = &dr.value.spec;
            let tls = spec
                .traffic_policy
                .as_ref()
                .and_then(|p| p.tls.as_ref())
                .and_then(|t| self.rule_tls(o, "spec.trafficPolicy.tls", t, have_identity));
            let mut subset_tls = Vec::new();
            for (i, sub) in spec.subsets.iter().enumerate() {
                if let Some(t) = sub.traffic_policy.as_ref().and_then(|p| p.tls.as_ref()) {
                    let at = format!("spec.subsets[{i}].trafficPolicy.tls");
                    let compiled = self.rule_tls(o, &at, t, have_identity);
                    subset_tls.push((sub.name.clone(), compiled));
                }
            }
            rules.push(Rule {
                host,
                rule: dr,
                tls,
                subset_tls,
            });
        }
        rules
    }

    /// The Sidecar that applies to this workload: one whose selector matches, else the namespace default.
    fn select_sidecar<'a>(
        &mut self,
        raw: &'a RawConfig,
        proxy: &ProxySettings,
    ) -> Option<&'a Located<SidecarSpec>> {
        let selected: Vec<_> = raw
            .sidecars
            .iter()
            .filter(|s| {
                s.value
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|w| labels_match(&w.labels, &proxy.labels))
            })
            .collect();
        let defaults: Vec<_> = raw
            .sidecars
            .iter()
            .filter(|s| {
                s.value.spec.workload_selector.is_none()
                    && s.value.metadata.namespace() == proxy.namespace
            })
            .collect();
        let chosen = if selected.is_empty() {
            defaults
        } else {
            selected
        };
        if chosen.len() > 1 {
            for s in &chosen[1..] {
                self.errors.push(s.origin.error("metadata.name", format!("more than one Sidecar applies to this workload (also {}); Istio allows one", chosen[0].value.metadata.name)));
            }
            return None;
        }
        chosen.first().copied()
    }

    #[allow(clippy::too_many_arguments)]
    fn listeners(
        &mut self,
        sc: &Located<SidecarSpec>,
        proxy: &ProxySettings,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        out: &mut Vec<Listener>,
    ) {
        let (o, spec) = (&sc.origin, &sc.value.spec);
        let mut bound: Vec<(SocketAddr, String)> = Vec::new();
        let mut claim = |errors: &mut Vec<ConfigError>, addr: SocketAddr, path: String| {
            if let Some((_, prev)) = bound
                .iter()
                .find(|(a, _)| a.port() == addr.port() && overlaps(a.ip(), addr.ip()))
            {
                errors.push(o.error(
                    &path,
                    format!(
                        "port {} is already used by the listener at {prev}",
                        addr.port()
                    ),
                ));
                return false;
            }
            bound.push((addr, path.trim_end_matches(".port.number").to_string()));
            true
        };
        for (i, ing) in spec.ingress.iter().enumerate() {
            let at = format!("spec.ingress[{i}]");
            let bind = self.listener_bind(
                o,
                &at,
                &ing.port,
                ing.capture_mode.as_deref(),
                ing.bind.as_deref(),
                "0.0.0.0",
            );
            let endpoint = match ing.default_endpoint.as_deref() {
                None => {
                    self.errors.push(o.error(
                        &at,
                        "defaultEndpoint is required (e.g. 127.0.0.1:8080, the local app)",
                    ));
                    None
                }
                Some(ep) if ep.starts_with("unix://") => {
                    self.errors.push(o.error(
                        &format!("{at}.defaultEndpoint"),
                        "unix domain socket endpoints are not supported yet",
                    ));
                    None
                }
                Some(ep) => match ep.parse::<SocketAddr>() {
                    Ok(mut a) => {
                        if a.ip().is_unspecified() {
                            // Istio: 0.0.0.0:PORT forwards to the instance; beside the app that is loopback.
                            a.set_ip(if a.is_ipv4() {
                                IpAddr::from([127, 0, 0, 1])
                            } else {
                                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
                            });
                        }
                        Some(a)
                    }
                    Err(_) => {
                        self.errors.push(o.error(
                            &format!("{at}.defaultEndpoint"),
                            format!("`{ep}` is not an IP:port address (e.g. 127.0.0.1:8080)"),
                        ));
                        None
                    }
                },
            };
            let (Some((bind, protocol)), Some(endpoint)) = (bind, endpoint) else {
                continue;
            };
            // Under interception an ingress port without `bind` is reached through the inbound
            // capture port (matched by port), not bound.
            let captured = self.interception.is_some()
                && interception::captured(ing.capture_mode.as_deref(), ing.bind.as_deref());
            let address = SocketAddr::new(bind, ing.port.number as u16);
            if !captured && !claim(&mut self.errors, address, format!("{at}.port.number")) {
                continue;
            }
            let protocol = if captured && ing.port.protocol.is_none() {
                Protocol::Auto
            } else {
                protocol
            };
            if !captured && endpoint == address
                || (!captured
                    && bind.is_unspecified()
                    && endpoint.port() == address.port()
                    && endpoint.ip().is_loopback())
            {
                self.errors.push(o.error(
                    &format!("{at}.defaultEndpoint"),
                    "defaultEndpoint points back at this listener",
                ));
                continue;
            }
            let pool = ing
                .connection_pool
                .as_ref()
                .or(spec.inbound_connection_pool.as_ref());
            let tcp = pool.and_then(|p| p.tcp.as_ref());
            let (limits, pool_idle_timeout) = pool_policy(pool);
            let name = format!("inbound|{}||", ing.port.number);
            let cluster = self.add_cluster(Cluster {
                name,
                endpoints: vec![Endpoint {
                    address: endpoint,
                    weight: 1,
                    labels: BTreeMap::new(),
                    priority: 0,
                }],
                lb: LbPolicy::RoundRobin,
                hash_key: None,
                connect_timeout: tcp
                    .and_then(|t| t.connect_timeout)
                    .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
                idle_timeout: tcp
                    .and_then(|t| t.idle_timeout)
                    .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                keepalive: tcp.and_then(|t| t.tcp_keepalive.as_ref()).map(keepalive),
                tls: None,
                limits,
                outlier: None,
                health_check: None,
                pool_idle_timeout,
                protocol: upstream_protocol(ing.port.protocol.as_deref(), pool),
                original_dst: false,
                bind_source: None,
                warmup: None,
            });
            let target = WeightedCluster { cluster, weight: 1 };
            // Inbound HTTP goes to the local app whatever the Host, as Istio's inbound listeners do.
            let http = (protocol != Protocol::Tcp).then(|| HttpRouteTable {
                virtual_hosts: vec![VirtualHost {
                    name: format!("inbound|http|{}", ing.port.number),
                    domains: vec!["*".into()],
                    // Istio's inbound routes neither time out nor retry.
                    routes: vec![forward_route(
                        "default",
                        target,
                        String::new(),
                        hr::RoutePolicy::default(),
                    )],
                }],
                unknown_host: hr::UnknownHost::NotFound,
            });
            let tls = match &ing.tls {
                Some(t) => match self.ingress_tls(o, &format!("{at}.tls"), t) {
                    Some(t) => Some(DownstreamTls::Terminate(Box::new(t))),
                    None => continue,
                },
                None if proxy.identity.is_none() => None,
                None => match self
                    .peer_authn
                    .mode_for(ing.port.number, u32::from(endpoint.port()))
                {
                    MtlsMode::Strict => Some(DownstreamTls::Mesh { permissive: false }),
                    MtlsMode::Disable => None,
                    MtlsMode::Permissive | MtlsMode::Unset => {
                        Some(DownstreamTls::Mesh { permissive: true })
                    }
                },
            };
            let (name, binding) = if captured {
                (
                    format!("virtual_inbound_{}", address.port()),
                    Binding::Virtual,
                )
            } else {
                (listener_name(address), Binding::Bound)
            };
            if captured
                && out
                    .iter()
                    .any(|l| l.binding == Binding::Virtual && l.name == name)
            {
                self.errors.push(o.error(
                    &format!("{at}.port.number"),
                    format!(
                        "port {} is captured by another ingress listener",
                        address.port()
                    ),
                ));
                continue;
            }
            out.push(Listener {
                name,
                address,
                direction: Direction::Inbound,
                protocol,
                route: vec![target],
                http,
                tls,
                sni_routes: Vec::new(),
                binding,
            });
        }
        // Istio's mesh default is ALLOW_ANY.
        let outbound_mode = spec
            .outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode)
            .unwrap_or(OutboundMode::AllowAny);
        for (i, eg) in spec.egress.iter().enumerate() {
            let at = format!("spec.egress[{i}]");
            let Some(port) = &eg.port else {
                if self.interception.is_none() {
                    self.errors.push(o.error(&at, "an egress listener without `port` is the capturing one: it needs `Proxy.spec.interception` (and `keel init-iptables`)"));
                }
                continue;
            };
            let bind = self.listener_bind(
                o,
                &at,
                port,
                eg.capture_mode.as_deref(),
                eg.bind.as_deref(),
                "127.0.0.1",
            );
            if eg.hosts.is_empty() {
                self.errors.push(o.error(&at, "hosts is required: which services this listener reaches, e.g. [\"./*\"] or [\"*/db.example.com\"]"));
                continue;
            }
            let mut visible = Vec::new();
            for (j, h) in eg.hosts.iter().enumerate() {
                match VisibleHosts::parse(h, sc.value.metadata.namespace()) {
                    Ok(v) => visible.push(v),
                    Err(m) => self.errors.push(o.error(&format!("{at}.hosts[{j}]"), m)),
                }
            }
            let Some((bind, protocol)) = bind else {
                continue;
            };
            let address = SocketAddr::new(bind, port.number as u16);
            if !claim(&mut self.errors, address, format!("{at}.port.number")) {
                continue;
            }
            let services: Vec<&Service> = registry
                .services
                .iter()
                .filter(|s| {
                    s.entry
                        .value
                        .spec
                        .ports
                        .iter()
                        .any(|p| p.number == port.number)
                })
                .filter(|s| visible.iter().any(|v| v.admits(&s.namespace, &s.host)))
                .collect();
            if protocol == Protocol::Http {
                if services.is_empty() {
                    self.errors.push(o.error(
                        &format!("{at}.port.number"),
                        format!(
                            "no ServiceEntry admitted by this listener's hosts has port {}",
                            port.number
                        ),
                    ));
                    continue;
                }
                let mut virtual_hosts = Vec::new();
                for service in services {
                    if let Some(vh) =
                        self.virtual_host(raw, registry, rules, proxy, service, port.number, o, &at)
                    {
                        virtual_hosts.push(vh);
                    }
                }
                let unknown_host = match outbound_mode {
                    OutboundMode::RegistryOnly => hr::UnknownHost::RegistryOnly,
                    OutboundMode::AllowAny => {
                        hr::UnknownHost::Passthrough(Box::new(self.passthrough_route()))
                    }
                };
                out.push(Listener {
                    name: listener_name(address),
                    address,
                    direction: Direction::Outbound,
                    protocol,
                    route: Vec::new(),
                    http: Some(HttpRouteTable {
                        virtual_hosts,
                        unknown_host,
                    }),
                    tls: None,
                    sni_routes: Vec::new(),
                    binding: Binding::Bound,
                });
                continue;
            }
            if port
                .protocol
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case("TLS") || p.eq_ignore_ascii_case("HTTPS"))
            {
                if services.is_empty() {
                    self.errors.push(o.error(
                        &format!("{at}.port.number"),
                        format!(
                            "no ServiceEntry admitted by this listener's hosts has port {}",
                            port.number
                        ),
                    ));
                    continue;
                }
                let mut sni_routes = Vec::new();
                for service in &services {
                    self.sni_routes_for(
                        raw,
                        registry,
                        rules,
                        proxy,
                        service,
                        port.number,
                        &mut sni_routes,
                    );
                }
                if sni_routes
                    .iter()
                    .flat_map(|r| &r.route)
                    .any(|w| self.clusters[w.cluster].original_dst)
                {
                    self.errors.push(o.error(&at, "loadBalancer PASSTHROUGH on a TLS port needs the original destination of each connection, i.e. interception: not supported yet"));
                    continue;
                }
                out.push(Listener {
                    name: listener_name(address),
                    address,
                    direction: Direction::Outbound,
                    protocol,
                    route: Vec::new(),
                    http: None,
                    tls: None,
                    sni_routes,
                    binding: Binding::Bound,
                });
                continue;
            }
            let service = match services.as_slice() {
                [] => {
                    self.errors.push(o.error(
                        &format!("{at}.port.number"),
                        format!(
                            "no ServiceEntry admitted by this listener's hosts has port {}",
                            port.number
                        ),
                    ));
                    continue;
                }
                [s] => *s,
                many => {
                    let names: Vec<&str> = many.iter().map(|s| s.host.as_str()).collect();
                    self.errors.push(o.error(&format!("{at}.port.number"), format!("a TCP listener cannot tell services apart, and {} all have port {}: give each its own egress port or narrow `hosts`", names.join(", "), port.number)));
                    continue;
                }
            };
            let route =
                match self.tcp_route_for(raw, registry, rules, proxy, &service.host, port.number) {
                    Some(r) => r,
                    None => {
                        match self.cluster_for(registry, rules, &service.host, None, port.number) {
                            Ok(c) => vec![WeightedCluster {
                                cluster: c,
                                weight: 1,
                            }],
                            Err(m) => {
                                self.errors.push(o.error(&at, m));
                                continue;
                            }
                        }
                    }
                };
            if route.iter().any(|w| self.clusters[w.cluster].original_dst) {
                self.errors.push(o.error(&at, format!(
                    "loadBalancer PASSTHROUGH for `{}` on a TCP port needs the original destination of each connection, i.e. interception: not supported yet (on HTTP ports it forwards to the request's authority)",
                    service.host
                )));
                continue;
            }
            out.push(Listener {
                name: listener_name(address),
                address,
                direction: Direction::Outbound,
                protocol,
                route,
                http: None,
                tls: None,
                sni_routes: Vec::new(),
                binding: Binding::Bound,
            });
        }
    }

    /// The checks every Sidecar listener shares: port, protocol, captureMode and bind address.
    /// Returns the IP to bind when all of them pass.
    fn listener_bind(
        &mut self,
        o: &Origin,
        at: &str,
        port: &Port,
        capture_mode: Option<&str>,
        bind: Option<&str>,
        default_bind: &str,
    ) -> Option<(IpAddr, Protocol)> {
        let port_ok = check_port(
            &mut self.errors,
            o,
            port.number,
            &format!("{at}.port.number"),
        );
        let protocol = self.check_listener_protocol(
            o,
            port.protocol.as_deref(),
            &format!("{at}.port.protocol"),
        );
        check_capture_mode(
            &mut self.errors,
            o,
            capture_mode,
            &format!("{at}.captureMode"),
        );
        if capture_mode == Some("IPTABLES") && self.interception.is_none() {
            self.errors.push(o.error(
                &format!("{at}.captureMode"),
                "captureMode IPTABLES needs `Proxy.spec.interception` (and `keel init-iptables`)",
            ));
        }
        let ip = parse_bind(
            &mut self.errors,
            o,
            bind,
            default_bind,
            &format!("{at}.bind"),
        );
        ip.filter(|_| port_ok).map(|ip| (ip, protocol))
    }

    fn check_listener_protocol(
        &mut self,
        o: &Origin,
        protocol: Option<&str>,
        path: &str,
    ) -> Protocol {
        if check_protocol(&mut self.errors, o, protocol, path) {
            match protocol.unwrap_or("TCP").to_ascii_uppercase().as_str() {
                // TLS and HTTPS are passed through (routed by SNI on egress ports).
                "TCP" | "TLS" | "HTTPS" => return Protocol::Tcp,
                // HTTP listeners serve HTTP/1.1 and HTTP/2 (gRPC included) on one port.
                "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => return Protocol::Http,
                p => self.errors.push(o.error(
                    path,
                    format!("listener protocol {p} is not supported yet; TCP, TLS, HTTPS, HTTP, HTTP2, GRPC and GRPC-WEB are"),
                )),
            }
        }
        Protocol::Tcp
    }

    /// The first VirtualService tcp route for `host` that matches traffic on `port` from this workload.
    /// The SNI routes of `service` on a TLS passthrough port: its VirtualService's `tls` routes
    /// whose match applies here, else its own host to its own cluster.
    #[allow(clippy::too_many_arguments)]
    fn sni_routes_for(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        service: &Service,
        port: u32,
        out: &mut Vec<SniRoute>,
    ) {
        let host = service.host.as_str();
        let Some(vs) = find_virtual_service(raw, host, |vs| !vs.value.spec.tls.is_empty()) else {
            match self.cluster_for(registry, rules, host, None, port) {
                Ok(c) => out.push(SniRoute {
                    server_names: vec![host.to_string()],
                    route: vec![WeightedCluster {
                        cluster: c,
                        weight: 1,
                    }],
                }),
                Err(m) => self
                    .errors
                    .push(service.entry.origin.error("spec.hosts", m)),
            }
            return;
        };
        let ns = vs.value.metadata.namespace();
        for (i, r) in vs.value.spec.tls.iter().enumerate() {
            let names: Vec<String> = r
                .matches
                .iter()
                .filter(|m| {
                    m.port.is_none_or(|p| p == port)
                        && labels_match(&m.source_labels, &proxy.labels)
                        && m.source_namespace
                            .as_deref()
                            .is_none_or(|n| n == proxy.namespace)
                })
                .flat_map(|m| m.sni_hosts.iter().cloned())
                .collect();
            if names.is_empty() {
                continue;
            }
            let mut route = Vec::new();
            for (k, rd) in r.route.iter().enumerate() {
                let dest = host::qualify(&rd.destination.host, ns);
                match self.cluster_for(
                    registry,
                    rules,
                    &dest,
                    rd.destination.subset.as_deref(),
                    rd.destination.port.as_ref().map_or(port, |p| p.number),
                ) {
                    Ok(c) => route.push(WeightedCluster {
                        cluster: c,
                        weight: if r.route.len() == 1 {
                            1
                        } else {
                            rd.weight.unwrap_or(0)
                        },
                    }),
                    Err(m) => self.errors.push(
                        vs.origin
                            .error(&format!("spec.tls[{i}].route[{k}].destination"), m),
                    ),
                }
            }
            route.retain(|w| w.weight > 0);
            if route.is_empty() {
                self.push_unique(vs.origin.error(
                    &format!("spec.tls[{i}].route"),
                    "at least one destination with a non-zero weight is required",
                ));
                continue;
            }
            out.push(SniRoute {
                server_names: names,
                route,
            });
        }
    }

    fn tcp_route_for(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        host: &str,
        port: u32,
    ) -> Option<Vec<WeightedCluster>> {
        let vs = find_virtual_service(raw, host, |vs| !vs.value.spec.tcp.is_empty())?;
        let ns = vs.value.metadata.namespace();
        let route_index = vs.value.spec.tcp.iter().position(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == port)
                        && labels_match(&m.source_labels, &proxy.labels)
                        && m.source_namespace
                            .as_deref()
                            .is_none_or(|n| n == proxy.namespace)
                })
        })?;
        let route = &vs.value.spec.tcp[route_index];
        let out = self.destinations(
            registry,
            rules,
            &vs.origin,
            ns,
            &route.route,
            &format!("spec.tcp[{route_index}]"),
        );
        if out.is_empty() {
            self.errors.push(vs.origin.error(
                &format!("spec.tcp[{route_index}].route"),
                "at least one destination with a non-zero weight is required",
            ));
            return None;
        }
        Some(out)
    }

    /// Records an error once, however many listeners lead to the same resource.
    fn push_unique(&mut self, e: ConfigError) {
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    /// The virtual host of one service on an HTTP egress port: its names (short forms included, with
    /// and without the port, as Istio generates them) and the routes of its VirtualService, or a
    /// default route to the service when there is none.
    #[allow(clippy::too_many_arguments)]
    fn virtual_host(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        service: &Service,
        port: u32,
        o: &Origin,
        at: &str,
    ) -> Option<VirtualHost> {
        let host = service.host.as_str();
        let mut names = vec![host.to_string()];
        if let Some(short) = host.strip_suffix(".svc.cluster.local") {
            if let Some((name, ns)) = short.split_once('.') {
                names.extend([format!("{name}.{ns}.svc"), format!("{name}.{ns}")]);
                if ns == proxy.namespace {
                    names.push(name.to_string());
                }
            }
        }
        let domains = names
            .iter()
            .flat_map(|n| [n.clone(), format!("{n}:{port}")])
            .collect();
        let vs = find_virtual_service(raw, host, |vs| !vs.value.spec.http.is_empty());
        let routes = match vs {
            Some(vs) => self.http_routes(vs, registry, rules, proxy, Some(port)),
            None => match self.cluster_for(registry, rules, host, None, port) {
                Ok(cluster) => vec![forward_route(
                    "default",
                    WeightedCluster { cluster, weight: 1 },
                    host.to_string(),
                    hr::RoutePolicy {
                        retry: Some(hr::RetryPolicy::istio_default()),
                        ..Default::default()
                    },
                )],
                Err(m) => {
                    self.push_unique(o.error(at, m));
                    return None;
                }
            },
        };
        Some(VirtualHost {
            name: format!("{host}:{port}"),
            domains,
            routes,
        })
    }

    /// A route's `timeout`, `retries`, `fault` and mirrors, checked and compiled.
    #[allow(clippy::too_many_arguments)]
    fn route_policy(
        &mut self,
        o: &Origin,
        r: &crate::model::HttpRoute,
        at: &Indexed<'_>,
        ns: &str,
        registry: &Registry,
        rules: &[Rule],
        port: Option<u32>,
    ) -> hr::RoutePolicy {
        let timeout = r.timeout.map(|d| d.0).filter(|d| !d.is_zero());
        let retry = match &r.retries {
            // Istio's default for a route that says nothing.
            None => Some(hr::RetryPolicy::istio_default()),
            Some(rt) => self.retry_policy(o, rt, &format!("{at}.retries")),
        };
        let fault = r
            .fault
            .as_ref()
            .and_then(|f| self.fault(o, f, &format!("{at}.fault")));
        let mut mirrors = Vec::new();
        let mut mirror_to = |c: &mut Compiler, d: &Destination, share: hr::Share, field: &str| {
            let dest = host::qualify(&d.host, ns);
            let dport = d.port.as_ref().map_or(port.unwrap_or(0), |p| p.number);
            match c.cluster_for(registry, rules, &dest, d.subset.as_deref(), dport) {
                Ok(cluster) => mirrors.push(hr::Mirror { cluster, share }),
                Err(m) => c.push_unique(o.error(field, m)),
            }
        };
        let percent = |c: &mut Compiler, p: Option<Percent>, field: &str| match p {
            Some(p) if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() => {
                c.push_unique(
                    o.error(field, format!("{} is not a percentage (0 to 100)", p.value)),
                );
                hr::Share::ALL
            }
            Some(p) => hr::Share::percent(p.value),
            None => hr::Share::ALL,
        };
        if let Some(m) = &r.mirror {
            let share = match (r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => percent(self, Some(p), &format!("{at}.mirrorPercentage.value")),
                (None, Some(p)) => percent(
                    self,
                    Some(Percent { value: p as f64 }),
                    &format!("{at}.mirrorPercent"),
                ),
                (None, None) => hr::Share::ALL,
            };
            mirror_to(self, m, share, &format!("{at}.mirror"));
        } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
            self.push_unique(o.error(
                &format!("{at}.mirrorPercentage"),
                "mirrorPercentage needs a mirror",
            ));
        }
        for (k, m) in r.mirrors.iter().enumerate() {
            let share = percent(
                self,
                m.percentage,
                &format!("{at}.mirrors[{k}].percentage.value"),
            );
            mirror_to(
                self,
                &m.destination,
                share,
                &format!("{at}.mirrors[{k}].destination"),
            );
        }
        hr::RoutePolicy {
            timeout,
            retry,
            fault,
            mirrors,
            rate_limit: None,
        }
    }

    /// `retries`: `None` when they are disabled (`attempts: 0`).
    fn retry_policy(&mut self, o: &Origin, rt: &HttpRetry, at: &str) -> Option<hr::RetryPolicy> {
        let mut policy = hr::RetryPolicy::istio_default();
        policy.per_try_timeout = rt.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero());
        policy.other_host = rt.retry_ignore_previous_hosts.unwrap_or(true);
        if let Some(on) = &rt.retry_on {
            policy.on = hr::RetryOn::default();
            policy.statuses.clear();
            for token in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if let Ok(code) = token.parse::<u16>() {
                    if !(100..=599).contains(&code) {
                        self.push_unique(o.error(
                            &format!("{at}.retryOn"),
                            format!("{code} is not an HTTP status"),
                        ));
                    }
                    policy.statuses.push(code);
                    policy.on.0 |= hr::RetryOn::RETRIABLE_STATUS_CODES;
                } else if let Some((_, bit)) = hr::RetryOn::NAMES.iter().find(|(n, _)| *n == token)
                {
                    policy.on.0 |= bit;
                } else {
                    let hint = closest(token, hr::RetryOn::NAMES.iter().map(|(n, _)| *n))
                        .map(|h| format!(" (did you mean `{h}`?)"))
                        .unwrap_or_default();
                    self.push_unique(o.error(
                        &format!("{at}.retryOn"),
                        format!("unknown retry condition `{token}`{hint}"),
                    ));
                }
            }
        }
        match rt.attempts {
            Some(n) if !(0..=i32::MAX as i64).contains(&n) => {
                self.push_unique(o.error(
                    &format!("{at}.attempts"),
                    format!("{n} is not a number of attempts (0 or more)"),
                ));
                None
            }
            Some(n) if n > 0 => {
                policy.retries = n.min(u32::MAX as i64) as u32;
                Some(policy)
            }
            // As Istio: `attempts` 0 (or unset in a `retries` block) disables retries.
            _ => None,
        }
    }

    /// `fault`: `None` when it injects nothing.
    fn fault(&mut self, o: &Origin, f: &HttpFaultInjection, at: &str) -> Option<hr::Fault> {
        let share = |c: &mut Compiler, p: Option<Percent>, percent: Option<u32>, field: &str| {
            let value = match (p, percent) {
                (Some(p), _) => p.value,
                (None, Some(p)) => p as f64,
                // As Istio: without a percentage no request is affected.
                (None, None) => 0.0,
            };
            if !(0.0..=100.0).contains(&value) || value.is_nan() {
                c.push_unique(o.error(field, format!("{value} is not a percentage (0 to 100)")));
            }
            hr::Share::percent(value)
        };
        let delay = f.delay.as_ref().and_then(|d| {
            not_supported(
                &mut self.errors,
                o,
                &d.exponential_delay,
                format_args!("{at}.delay.exponentialDelay"),
            );
            let share = share(
                self,
                d.percentage,
                d.percent,
                &format!("{at}.delay.percentage"),
            );
            match d.fixed_delay {
                Some(fd) => Some((fd.0, share)),
                None => {
                    self.push_unique(o.error(
                        &format!("{at}.delay.fixedDelay"),
                        "a delay needs fixedDelay",
                    ));
                    None
                }
            }
        });
        let abort = f.abort.as_ref().and_then(|a| {
            not_supported(
                &mut self.errors,
                o,
                &a.http2_error,
                format_args!("{at}.abort.http2Error"),
            );
            let share = share(self, a.percentage, None, &format!("{at}.abort.percentage"));
            let kind = match (a.http_status, a.grpc_status.as_deref()) {
                (Some(s), None) if (200..=599).contains(&s) => hr::Abort::Http(s as u16),
                (Some(s), None) => {
                    self.push_unique(o.error(
                        &format!("{at}.abort.httpStatus"),
                        format!("{s} is not an HTTP status (200-599)"),
                    ));
                    return None;
                }
                (None, Some(g)) => match GRPC_STATUS.iter().position(|n| *n == g) {
                    Some(code) => hr::Abort::Grpc(code as u32),
                    None => {
                        let hint = closest(g, GRPC_STATUS.iter().copied())
                            .map(|h| format!(" (did you mean `{h}`?)"))
                            .unwrap_or_default();
                        self.push_unique(o.error(
                            &format!("{at}.abort.grpcStatus"),
                            format!("unknown gRPC status `{g}`{hint}"),
                        ));
                        return None;
                    }
                },
                _ => {
                    self.push_unique(o.error(
                        &format!("{at}.abort"),
                        "an abort needs exactly one of httpStatus or grpcStatus",
                    ));
                    return None;
                }
            };
            Some((kind, share))
        });
        if f.delay.is_none() && f.abort.is_none() {
            self.push_unique(o.error(at, "a fault needs a delay or an abort"));
        }
        (delay.is_some() || abort.is_some()).then_some(hr::Fault { delay, abort })
    }

    /// Compiles a VirtualService's `http` routes for traffic from this workload (routes whose
    /// matches can never hold for it are left out) arriving on `port` (None: validate all).
    fn http_routes(
        &mut self,
        vs: &Located<VirtualServiceSpec>,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        port: Option<u32>,
    ) -> Vec<HttpRoute> {
        self.routes_checked.insert(std::ptr::from_ref(vs) as usize);
        let ns = vs.value.metadata.namespace();
        let o = &vs.origin;
        let limits = self.rate_limit_annotation(vs);
        let mut out = Vec::with_capacity(vs.value.spec.http.len());
        for (i, r) in vs.value.spec.http.iter().enumerate() {
            let at = Indexed("spec.http", i);
            let mut matches = Vec::new();
            let mut usable = r.matches.is_empty();
            for (j, m) in r.matches.iter().enumerate() {
                let compiled = self.request_match(o, m, &|| format!("{at}.match[{j}]"));
                let source_ok = labels_match(&m.source_labels, &proxy.labels)
                    && m.source_namespace
                        .as_deref()
                        .is_none_or(|n| n == proxy.namespace);
                let port_ok = match (m.port, port) {
                    (Some(p), Some(listener)) => p == listener,
                    _ => true,
                };
                if let (Some(c), true, true) = (compiled, source_ok, port_ok) {
                    usable = true;
                    matches.push(c);
                }
            }
            let action = match (&r.route[..], &r.redirect, &r.direct_response) {
                ([_, ..], None, None) => {
                    let mut targets = Vec::new();
                    for (k, d) in r.route.iter().enumerate() {
                        let dest = host::qualify(&d.destination.host, ns);
                        let dport = d
                            .destination
                            .port
                            .as_ref()
                            .map_or(port.unwrap_or(0), |p| p.number);
                        match self.cluster_for(
                            registry,
                            rules,
                            &dest,
                            d.destination.subset.as_deref(),
                            dport,
                        ) {
                            Ok(cluster) => {
                                let (request_headers, response_headers) = match &d.headers {
                                    None => Default::default(),
                                    Some(h) => self.header_ops(
                                        o,
                                        Some(h),
                                        &format!("{at}.route[{k}].headers"),
                                    ),
                                };
                                let weight = if r.route.len() == 1 {
                                    1
                                } else {
                                    d.weight.unwrap_or(0)
                                };
                                targets.push(RouteTarget {
                                    target: WeightedCluster { cluster, weight },
                                    host: dest,
                                    request_headers,
                                    response_headers,
                                });
                            }
                            Err(m) => self
                                .push_unique(o.error(&format!("{at}.route[{k}].destination"), m)),
                        }
                    }
                    if !targets.is_empty() && targets.iter().all(|t| t.target.weight == 0) {
                        self.push_unique(o.error(
                            &format!("{at}.route"),
                            "at least one destination with a non-zero weight is required",
                        ));
                    }
                    targets.retain(|t| t.target.weight > 0);
                    let rewrite = r.rewrite.as_ref().map(|rw| hr::Rewrite {
                        uri: rw.uri.clone(),
                        authority: rw.authority.clone(),
                    });
                    if let Some(uri) = rewrite.as_ref().and_then(|rw| rw.uri.as_ref()) {
                        if !uri.starts_with('/') {
                            self.push_unique(
                                o.error(&format!("{at}.rewrite.uri"), "must start with /"),
                            );
                        }
                    }
                    RouteAction::Forward { targets, rewrite }
                }
                ([], Some(rd), None) => {
                    let code = rd.redirect_code.unwrap_or(301);
                    if ![301, 302, 303, 307, 308].contains(&code) {
                        self.push_unique(o.error(
                            &format!("{at}.redirect.redirectCode"),
                            format!("{code} is not a redirect code (301, 302, 303, 307, 308)"),
                        ));
                    }
                    if let Some(p) = rd.port {
                        check_port(&mut self.errors, o, p, &format!("{at}.redirect.port"));
                    }
                    if r.rewrite.is_some() {
                        self.push_unique(o.error(
                            &format!("{at}.rewrite"),
                            "rewrite cannot be combined with redirect",
                        ));
                    }
                    RouteAction::Redirect(hr::Redirect {
                        uri: rd.uri.clone(),
                        authority: rd.authority.clone(),
                        port: rd.port.map(|p| p as u16),
                        scheme: rd.scheme.clone(),
                        code: code as u16,
                    })
                }
                ([], None, Some(dr)) => {
                    if !(200..=599).contains(&dr.status) {
                        self.push_unique(o.error(
                            &format!("{at}.directResponse.status"),
                            format!("{} is not an HTTP status (200-599)", dr.status),
                        ));
                    }
                    RouteAction::Direct {
                        status: dr.status as u16,
                        body: dr.body.as_ref().and_then(|b| b.string.clone()),
                    }
                }
                _ => {
                    self.push_unique(o.error(
                        &at.to_string(),
                        "a route needs exactly one of route, redirect or directResponse",
                    ));
                    continue;
                }
            };
            let (request_headers, response_headers) = match &r.headers {
                None => Default::default(),
                Some(h) => self.header_ops(o, Some(h), &format!("{at}.headers")),
            };
            if usable {
                let name = r.name.clone().unwrap_or_else(|| {
                    let vs_name = &vs.value.metadata.name;
                    let mut name = String::with_capacity(vs_name.len() + 6);
                    name.push_str(vs_name);
                    name.push('.');
                    name.push_str(&i.to_string());
                    name
                });
                if !matches!(action, RouteAction::Forward { .. }) {
                    // Nothing goes upstream: a policy here would silently do nothing.
                    for (given, field) in [
                        (r.timeout.is_some(), "timeout"),
                        (r.retries.is_some(), "retries"),
                        (r.fault.is_some(), "fault"),
                        (r.mirror.is_some() || !r.mirrors.is_empty(), "mirror"),
                    ] {
                        if given {
                            self.push_unique(o.error(
                                &format!("{at}.{field}"),
                                "applies only to a route with destinations, not to redirect or directResponse",
                            ));
                        }
                    }
                }
                let mut policy = self.route_policy(o, r, &at, ns, registry, rules, port);
                policy.rate_limit = limits
                    .iter()
                    .find(|l| {
                        l.routes.is_empty() || r.name.as_ref().is_some_and(|n| l.routes.contains(n))
                    })
                    .map(|l| {
                        let route = r.name.clone().unwrap_or_else(|| i.to_string());
                        let limit = hr::LocalRateLimit {
                            key: format!(
                                "{ns}/{}/{route}/{}/{}/{:?}/{}",
                                vs.value.metadata.name,
                                l.max_tokens,
                                l.tokens_per_fill,
                                l.fill_interval,
                                l.per_client
                            ),
                            max_tokens: l.max_tokens,
                            tokens_per_fill: l.tokens_per_fill,
                            fill_interval: l.fill_interval,
                            per_client: l.per_client,
                        };
                        match self.rate_limits.iter().position(|x| *x == limit) {
                            Some(i) => i,
                            None => {
                                self.rate_limits.push(limit);
                                self.rate_limits.len() - 1
                            }
                        }
                    });
                out.push(HttpRoute {
                    name,
                    matches,
                    action,
                    request_headers,
                    response_headers,
                    policy,
                });
            }
        }
        out
    }

    /// `at` names the match's field path; it is built only when an error needs it, since a
    /// 10,000-route VirtualService would otherwise format 10,000 paths per compile.
    fn request_match(
        &mut self,
        o: &Origin,
        m: &HttpMatch,
        at: &dyn Fn() -> String,
    ) -> Option<hr::RequestMatch> {
        let mut ok = true;
        let mut one =
            |this: &mut Self, sm: Option<&StringMatch>, field: &str| -> Option<hr::StringMatch> {
                let sm = sm?;
                let r = this.string_match(o, sm, &|| format!("{}.{field}", at()), false);
                ok &= r.is_some();
                r
            };
        let uri = one(self, m.uri.as_ref(), "uri");
        let scheme = one(self, m.scheme.as_deref(), "scheme");
        let method = one(self, m.method.as_deref(), "method");
        let authority = one(self, m.authority.as_deref(), "authority");
        let mut map = |this: &mut Self,
                       entries: &BTreeMap<String, StringMatch>,
                       field: &str|
         -> Vec<(String, hr::StringMatch)> {
            let mut v = Vec::new();
            for (name, sm) in entries {
                match this.string_match(
                    o,
                    sm,
                    &|| format!("{}.{field}.{name}", at()),
                    field != "queryParams",
                ) {
                    Some(c) => v.push((name.to_ascii_lowercase(), c)),
                    None => ok = false,
                }
            }
            v
        };
        let headers = map(self, &m.headers, "headers");
        let without_headers = map(self, &m.without_headers, "withoutHeaders");
        let query_params = map(self, &m.query_params, "queryParams");
        let port = m
            .port
            .filter(|p| check_port(&mut self.errors, o, *p, &format!("{}.port", at())))
            .map(|p| p as u16);
        ok.then_some(hr::RequestMatch {
            uri,
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
        })
    }

    fn string_match(
        &mut self,
        o: &Origin,
        sm: &StringMatch,
        at: &dyn Fn() -> String,
        empty_means_present: bool,
    ) -> Option<hr::StringMatch> {
        match (&sm.exact, &sm.prefix, &sm.regex) {
            (Some(e), None, None) => Some(hr::StringMatch::Exact(e.clone())),
            (None, Some(p), None) => Some(hr::StringMatch::Prefix(p.clone())),
            (None, None, Some(r)) => match regex::RegexBuilder::new(&format!("^(?:{r})$"))
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => Some(hr::StringMatch::Regex(re)),
                Err(e) => {
                    self.push_unique(
                        o.error(&format!("{}.regex", at()), format!("invalid regex: {e}")),
                    );
                    None
                }
            },
            (None, None, None) if empty_means_present => Some(hr::StringMatch::Present),
            _ => {
                self.push_unique(
                    o.error(&at(), "exactly one of exact, prefix or regex is required"),
                );
                None
            }
        }
    }

    fn header_ops(
        &mut self,
        o: &Origin,
        ops: Option<&HeaderOperations>,
        at: &str,
    ) -> (HeaderOps, HeaderOps) {
        let one = |this: &mut Self, edits: Option<&HeaderEdits>, side: &str| -> HeaderOps {
            let Some(e) = edits else {
                return HeaderOps::default();
            };
            let mut check = |name: &str, value: Option<&str>, field: &str| {
                let name_ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                let value_ok =
                    value.is_none_or(|v| !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0));
                if !name_ok || !value_ok {
                    this.push_unique(o.error(
                        &format!("{at}.{side}.{field}"),
                        format!("invalid header `{name}`"),
                    ));
                }
                name.to_ascii_lowercase()
            };
            HeaderOps {
                set: e
                    .set
                    .iter()
                    .map(|(k, v)| (check(k, Some(v), "set"), v.clone()))
                    .collect(),
                add: e
                    .add
                    .iter()
                    .map(|(k, v)| (check(k, Some(v), "add"), v.clone()))
                    .collect(),
                remove: e.remove.iter().map(|k| check(k, None, "remove")).collect(),
            }
        };
        let request = one(self, ops.and_then(|h| h.request.as_ref()), "request");
        let response = one(self, ops.and_then(|h| h.response.as_ref()), "response");
        (request, response)
    }

    /// Validates every VirtualService's destinations, including routes no listener uses yet.
    fn check_virtual_services(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
    ) {
        for vs in &raw.virtual_services {
            // Routes a listener compiled were checked then, against that listener's port.
            if !self
                .routes_checked
                .contains(&(std::ptr::from_ref(vs) as usize))
            {
                self.http_routes(vs, registry, rules, proxy, None);
            }
            let ns = vs.value.metadata.namespace();
            if vs.value.spec.hosts.is_empty() {
                self.errors.push(
                    vs.origin
                        .error("spec.hosts", "at least one host is required"),
                );
            }
            for (i, r) in vs.value.spec.tcp.iter().enumerate() {
                if r.route.is_empty() {
                    self.errors.push(vs.origin.error(
                        &format!("spec.tcp[{i}].route"),
                        "at least one destination is required",
                    ));
                }
                for (j, m) in r.matches.iter().enumerate() {
                    if let Some(p) = m.port {
                        check_port(
                            &mut self.errors,
                            &vs.origin,
                            p,
                            &format!("spec.tcp[{i}].match[{j}].port"),
                        );
                    }
                }
                for (k, rd) in r.route.iter().enumerate() {
                    let dest = host::qualify(&rd.destination.host, ns);
                    if let Err(m) = self.cluster_for(
                        registry,
                        rules,
                        &dest,
                        rd.destination.subset.as_deref(),
                        rd.destination.port.as_ref().map_or(0, |p| p.number),
                    ) {
                        let e = vs
                            .origin
                            .error(&format!("spec.tcp[{i}].route[{k}].destination"), m);
                        if !self.errors.contains(&e) {
                            self.errors.push(e);
                        }
                    }
                }
            }
        }
    }

    /// The cluster `outbound|port|subset|host`, built once per snapshot.
    fn cluster_for(
        &mut self,
        registry: &Registry,
        rules: &[Rule],
        host: &str,
        subset: Option<&str>,
        port: u32,
    ) -> Result<usize, String> {
        let service = registry.find(host).ok_or_else(|| {
            let hint = closest(host, registry.services.iter().map(|s| s.host.as_str()))
                .map(|h| format!(" (did you mean `{h}`?)"))
                .unwrap_or_default();
            format!("no ServiceEntry defines host `{host}`{hint}")
        })?;
        let spec = &service.entry.value.spec;
        let sp = if port == 0 {
            match spec.ports.as_slice() {
                [p] => p,
                _ => {
                    return Err(format!(
                        "host `{host}` has several ports: set destination.port.number"
                    ))
                }
            }
        } else {
            spec.ports
                .iter()
                .find(|p| p.number == port)
                .ok_or_else(|| format!("host `{host}` has no port {port}"))?
        };
        // Istio's cluster name; built without the formatting machinery, as every route asks.
        let number = sp.number.to_string();
        let subset_name = subset.unwrap_or("");
        let mut name = String::with_capacity(12 + number.len() + subset_name.len() + host.len());
        for part in ["outbound|", &number, "|", subset_name, "|", host] {
            name.push_str(part);
        }
        if let Some(i) = self.cluster_index.get(&name) {
            return Ok(*i);
        }
        let rule = rules
            .iter()
            .filter(|r| host::matches(&r.host, host))
            .max_by_key(|r| {
                if r.host == host {
                    usize::MAX
                } else {
                    r.host.len()
                }
            });
        let dr = rule.map(|r| &r.rule.value.spec);
        let sub = match subset {
            None => None,
            Some(s) => {
                let Some(dr) = dr else {
                    return Err(format!(
                        "subset `{s}` needs a DestinationRule for host `{host}` defining it"
                    ));
                };
                Some(dr.subsets.iter().find(|x| x.name == s).ok_or_else(|| {
                    let hint = closest(s, dr.subsets.iter().map(|x| x.name.as_str()))
                        .map(|h| format!(" (did you mean `{h}`?)"))
                        .unwrap_or_default();
                    format!("no subset `{s}` in the DestinationRule for host `{host}`{hint}")
                })?)
            }
        };
        // A subset's trafficPolicy overrides the rule's, field by field at the top level, as Istio does.
        let top = dr.and_then(|d| d.traffic_policy.as_ref());
        let own = sub.and_then(|s| s.traffic_policy.as_ref());
        let lb_settings = own
            .and_then(|p| p.load_balancer.as_ref())
            .or(top.and_then(|p| p.load_balancer.as_ref()));
        let pool = own
            .and_then(|p| p.connection_pool.as_ref())
            .or(top.and_then(|p| p.connection_pool.as_ref()));
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let (limits, pool_idle_timeout) = pool_policy(pool);
        let outlier = own
            .and_then(|p| p.outlier_detection.as_ref())
            .or(top.and_then(|p| p.outlier_detection.as_ref()))
            .and_then(outlier_policy);
        let peak_ewma = rule.is_some_and(|r| {
            r.rule
                .value
                .metadata
                .annotations
                .get(LB_ANNOTATION)
                .map(String::as_str)
                == Some("PEAK_EWMA")
        });
        let warmup = lb_settings
            .and_then(|l| l.warmup_duration_secs)
            .map(|d| d.0);
        let (lb, hash_key) = match lb_settings {
            Some(LoadBalancerSettings {
                consistent_hash: Some(ch),
                ..
            }) => consistent_hash_policy(ch),
            _ if peak_ewma => (LbPolicy::PeakEwma, None),
            _ => (
                match lb_settings.and_then(|l| l.simple) {
                    Some(SimpleLb::Random) => LbPolicy::Random,
                    Some(SimpleLb::LeastRequest) => LbPolicy::LeastRequest,
                    _ => LbPolicy::RoundRobin,
                },
                None,
            ),
        };
        // A subset's own `tls` replaces the rule's, like every other top-level policy field.
        let rule_tls = rule.and_then(|r| {
            subset
                .and_then(|s| r.subset_tls.iter().find(|(n, _)| n == s))
                .map_or(r.tls.as_ref(), |(_, t)| t.as_ref())
        });
        let tls = rule_tls.map(|t| t.for_cluster(host, sp.number, subset, &spec.subject_alt_names));
        // Locality-prioritized balancing, as Istio: on (unless the rule turns it off) when the
        // destination has outlier detection, which is what moves traffic away from a failing
        // locality.
        let by_locality = outlier.is_some()
            && lb_settings
                .and_then(|l| l.locality_lb_setting.as_ref())
                .and_then(|l| l.enabled)
                != Some(false);
        // DNS and DNS_ROUND_ROBIN: endpoint addresses may be names; with no endpoints the host
        // itself is resolved. DNS balances over every address a name has (Envoy's STRICT_DNS),
        // DNS_ROUND_ROBIN uses the first one (LOGICAL_DNS).
        let resolution = spec.resolution.unwrap_or(Resolution::None);
        let implicit;
        let declared: &[WorkloadEntry] = match resolution {
            Resolution::Dns | Resolution::DnsRoundRobin if spec.endpoints.is_empty() => {
                implicit = [WorkloadEntry {
                    address: host.to_string(),
                    ..Default::default()
                }];
                &implicit
            }
            _ => &spec.endpoints,
        };
        let locality_setting = lb_settings.and_then(|l| l.locality_lb_setting.as_ref());
        let failover: &[LocalityFailover] = locality_setting.map_or(&[], |l| &l.failover[..]);
        // `distribute`: the first entry whose `from` matches this proxy's locality, if any.
        let distribute = locality_setting
            .filter(|l| l.enabled != Some(false))
            .and_then(|l| {
                l.distribute
                    .iter()
                    .find(|d| locality_matches(&d.from, self.locality.as_deref()))
            });
        let by_locality = by_locality && distribute.is_none();
        let mut endpoints = Vec::new();
        let mut localities: Vec<Option<String>> = Vec::new();
        for ep in declared
            .iter()
            .filter(|ep| sub.is_none_or(|s| labels_match(&s.labels, &ep.labels)))
        {
            let ips: Vec<IpAddr> = match ep.address.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) => {
                    let mut ips = self.resolve(&ep.address);
                    if resolution == Resolution::DnsRoundRobin {
                        ips.truncate(1);
                    }
                    ips
                }
                Err(_) => continue,
            };
            let target = sp
                .name
                .as_ref()
                .and_then(|n| ep.ports.get(n))
                .copied()
                .or(sp.target_port)
                .unwrap_or(sp.number);
            for ip in ips {
                endpoints.push(Endpoint {
                    address: SocketAddr::new(ip, target as u16),
                    weight: ep.weight.unwrap_or(1).max(1),
                    labels: ep.labels.clone(),
                    priority: if by_locality {
                        locality_priority(
                            self.locality.as_deref(),
                            ep.locality.as_deref(),
                            failover,
                        )
                    } else {
                        0
                    },
                });
                localities.push(ep.locality.clone());
            }
        }
        if let Some(d) = distribute {
            distribute_by_locality(d, &mut endpoints, &localities);
        }
        Ok(self.add_cluster(Cluster {
            name,
            endpoints,
            lb,
            hash_key,
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout)
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            idle_timeout: tcp
                .and_then(|t| t.idle_timeout)
                .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            keepalive: tcp.and_then(|t| t.tcp_keepalive.as_ref()).map(keepalive),
            tls,
            limits,
            outlier,
            health_check: health_check(&service.entry.value.metadata.annotations, host)
                .ok()
                .flatten(),
            pool_idle_timeout,
            protocol: upstream_protocol(sp.protocol.as_deref(), pool),
            // PASSTHROUGH: each request goes where it says (its authority), as Envoy's
            // ORIGINAL_DST cluster; HTTP only (checked where TCP listeners are built).
            original_dst: lb_settings.and_then(|l| l.simple) == Some(SimpleLb::Passthrough)
                || spec.resolution.unwrap_or(Resolution::None) == Resolution::None,
            bind_source: None,
            warmup,
        }))
    }

    /// The route ALLOW_ANY sends unknown hosts by: to Istio's `PassthroughCluster`, which has no
    /// endpoints of its own (each request goes where its authority says), no retries.
    fn passthrough_route(&mut self) -> HttpRoute {
        let cluster = self.add_cluster(original_dst_cluster("PassthroughCluster"));
        forward_route(
            "allow_any",
            WeightedCluster { cluster, weight: 1 },
            String::new(),
            hr::RoutePolicy::default(),
        )
    }

    /// A name's addresses now (none when it does not resolve), remembered for re-resolution and
    /// folded into the config version, so that a change of address is a new snapshot.
    fn resolve(&mut self, name: &str) -> Vec<IpAddr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut ips = self
            .dns
            .lookup(&self.dns_servers, &name)
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        if !self.dns_names.contains(&name) {
            self.dns_names.push(name.clone());
            fnv1a(&mut self.material_hash, name.as_bytes());
            for ip in &ips {
                fnv1a(&mut self.material_hash, ip.to_string().as_bytes());
            }
        }
        ips
    }

    fn add_cluster(&mut self, cluster: Cluster) -> usize {
        if let Some(i) = self.cluster_index.get(&cluster.name) {
            return *i;
        }
        self.cluster_index
            .insert(cluster.name.clone(), self.clusters.len());
        self.clusters.push(cluster);
        self.clusters.len() - 1
    }
}

/// A cluster with no endpoints of its own: each connection or request goes to its original
/// destination (captured) or where its authority says (Istio's Passthrough clusters).
fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        endpoints: Vec::new(),
        lb: LbPolicy::RoundRobin,
        hash_key: None,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        keepalive: None,
        tls: None,
        limits: CircuitLimits::default(),
        outlier: None,
        health_check: None,
        pool_idle_timeout: DEFAULT_IDLE_TIMEOUT,
        protocol: UpstreamProtocol::Http1,
        original_dst: true,
        bind_source: None,
        warmup: None,
    }
}

/// The source of Keel's inbound connections under interception (Istio's): the capture rules let
/// it through, so a connection to the pod's own address reaches the app instead of Keel again.
pub(super) const INBOUND_SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));

/// A route that sends every request to one cluster, without header changes.
fn forward_route(
    name: &str,
    target: WeightedCluster,
    host: String,
    policy: hr::RoutePolicy,
) -> HttpRoute {
    HttpRoute {
        name: name.into(),
        matches: Vec::new(),
        action: RouteAction::Forward {
            targets: vec![RouteTarget {
                target,
                host,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }],
            rewrite: None,
        },
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        policy,
    }
}

/// The VirtualService for `host` (an exact host before a wildcard) among those `relevant` keeps.
fn find_virtual_service<'a>(
    raw: &'a RawConfig,
    host: &str,
    relevant: impl Fn(&Located<VirtualServiceSpec>) -> bool,
) -> Option<&'a Located<VirtualServiceSpec>> {
    let applies = |vs: &&Located<VirtualServiceSpec>, exact: bool| {
        let ns = vs.value.metadata.namespace();
        gateway::applies_to_mesh(vs)
            && relevant(vs)
            && vs.value.spec.hosts.iter().any(|h| {
                let q = host::qualify(h, ns);
                if exact {
                    q == host
                } else {
                    host::matches(&q, host)
                }
            })
    };
    raw.virtual_services
        .iter()
        .find(|vs| applies(vs, true))
        .or_else(|| raw.virtual_services.iter().find(|vs| applies(vs, false)))
}

fn keepalive(k: &TcpKeepalive) -> Keepalive {
    Keepalive {
        probes: k.probes,
        time: k.time.map(|d| d.0),
        interval: k.interval.map(|d| d.0),
    }
}

fn listener_name(a: SocketAddr) -> String {
    format!("{}_{}", a.ip(), a.port())
}

/// Selector semantics: every label the selector names must be present with the same value.
fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn check_port(errors: &mut Vec<ConfigError>, o: &Origin, number: u32, path: &str) -> bool {
    if number == 0 || number > 65535 {
        errors.push(o.error(path, format!("port {number} is out of range 1-65535")));
        return false;
    }
    true
}

const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
];

/// Istio's port protocols (case-insensitive); returns whether the value is a known one.
fn check_protocol(
    errors: &mut Vec<ConfigError>,
    o: &Origin,
    protocol: Option<&str>,
    path: &str,
) -> bool {
    let Some(p) = protocol else { return true };
    if PROTOCOLS.iter().any(|k| k.eq_ignore_ascii_case(p)) {
        return true;
    }
    let hint = closest(&p.to_ascii_uppercase(), PROTOCOLS.iter().copied())
        .map(|h| format!(" (did you mean `{h}`?)"))
        .unwrap_or_default();
    errors.push(o.error(
        path,
        format!(
            "unknown protocol `{p}`{hint}; expected one of {}",
            PROTOCOLS.join(", ")
        ),
    ));
    false
}

fn check_capture_mode(errors: &mut Vec<ConfigError>, o: &Origin, mode: Option<&str>, path: &str) {
    match mode {
        None | Some("DEFAULT") | Some("NONE") | Some("IPTABLES") => {}
        Some(m) => errors.push(o.error(
            path,
            format!("unknown captureMode `{m}`; expected DEFAULT, IPTABLES or NONE"),
        )),
    }
}

fn parse_bind(
    errors: &mut Vec<ConfigError>,
    o: &Origin,
    bind: Option<&str>,
    default: &str,
    path: &str,
) -> Option<IpAddr> {
    let b = bind.unwrap_or(default);
    if b.starts_with("unix://") {
        errors.push(o.error(path, "unix domain socket listeners are not supported yet"));
        return None;
    }
    match b.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            errors.push(o.error(path, format!("`{b}` is not an IP address")));
            None
        }
    }
}

/// The effective config as JSON, for `/config_dump`.
pub fn dump(
    raw: &RawConfig,
    version: &str,
    listeners: &[Listener],
    clusters: &[Cluster],
) -> serde_json::Value {
    use serde_json::json;
    let mut resources = Vec::new();
    let push = |out: &mut Vec<serde_json::Value>, v: serde_json::Result<serde_json::Value>| {
        if let Ok(v) = v {
            out.push(v);
        }
    };
    raw.proxies
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.sidecars
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.service_entries
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.virtual_services
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.destination_rules
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.peer_authentications
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.authorization_policies
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    raw.request_authentications
        .iter()
        .for_each(|r| push(&mut resources, serde_json::to_value(&r.value)));
    let ms = |d: Duration| d.as_millis() as u64;
    json!({
        "version": version,
        "files": raw.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "resources": resources,
        "listeners": listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address.to_string(),
            "direction": l.direction.as_str(),
            "protocol": format!("{:?}", l.protocol).to_ascii_uppercase(),
            "virtual_hosts": l.http.as_ref().map(|t| t.virtual_hosts.iter().map(|v| json!({
                "name": v.name,
                "domains": v.domains,
                "routes": v.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()),
            "route": l.route.iter().map(|w| json!({"cluster": clusters[w.cluster].name, "weight": w.weight})).collect::<Vec<_>>(),
            "tls": l.tls.as_ref().map(|t| t.describe()),
            "sni_routes": l.sni_routes.iter().map(|r| json!({
                "server_names": r.server_names,
                "route": r.route.iter().map(|w| json!({"cluster": clusters[w.cluster].name, "weight": w.weight})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| json!({
            "name": c.name,
            "lb": format!("{:?}", c.lb),
            "connect_timeout_ms": ms(c.connect_timeout),
            "idle_timeout_ms": ms(c.idle_timeout),
            "pool_idle_timeout_ms": ms(c.pool_idle_timeout),
            "protocol": match c.protocol {
                UpstreamProtocol::Http1 => "HTTP/1.1",
                UpstreamProtocol::Http2 => "HTTP/2",
                UpstreamProtocol::Client => "client",
            },
            "health_check": c.health_check.as_ref().map(|h| json!({
                "http_path": h.http_path,
                "interval_ms": ms(h.interval),
                "timeout_ms": ms(h.timeout),
                "unhealthy_threshold": h.unhealthy_threshold,
                "healthy_threshold": h.healthy_threshold,
            })),
            "outlier_detection": c.outlier.map(|od| json!({
                "consecutive_5xx": od.consecutive_5xx,
                "consecutive_gateway": od.consecutive_gateway,
                "interval_ms": ms(od.interval),
                "base_ejection_ms": ms(od.base_ejection),
                "max_ejection_percent": od.max_ejection_percent,
                "min_health_percent": od.min_health_percent,
            })),
            "circuit_breakers": json!({
                "max_connections": c.limits.max_connections,
                "max_pending_requests": c.limits.max_pending_requests,
                "max_requests": c.limits.max_requests,
                "max_retries": c.limits.max_retries,
                "max_requests_per_connection": c.limits.max_requests_per_connection,
                "max_concurrent_streams": c.limits.max_concurrent_streams,
            }),
            "tls": c.tls.as_ref().map(|t| json!({
                "mode": format!("{:?}", t.mode),
                "sni": t.sni,
                "subject_alt_names": t.subject_alt_names,
            })),
            "endpoints": c.endpoints.iter().map(|e| json!({"address": e.address.to_string(), "weight": e.weight, "labels": e.labels})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod locality_tests {
    use super::{locality_matches, locality_priority};
    use crate::model::LocalityFailover;

    #[test]
    fn priorities_by_region_zone_subzone() {
        let ours = Some("us-east/zone-a/rack-1");
        let p = |theirs| locality_priority(ours, theirs, &[]);
        assert_eq!(p(Some("us-east/zone-a/rack-1")), 0);
        assert_eq!(p(Some("us-east/zone-a/rack-2")), 1);
        assert_eq!(p(Some("us-east/zone-b")), 2);
        assert_eq!(p(Some("eu-west/zone-a/rack-1")), 4);
        assert_eq!(p(None), 4);
        assert_eq!(
            locality_priority(Some("us-east/zone-a"), Some("us-east/zone-a"), &[]),
            0
        );
        // Failover: the named region before the others.
        let f = [LocalityFailover {
            from: "us-east".into(),
            to: "eu-west".into(),
        }];
        assert_eq!(locality_priority(ours, Some("eu-west/zone-x"), &f), 3);
        assert_eq!(locality_priority(ours, Some("ap-south/zone-x"), &f), 4);
        assert_eq!(locality_priority(ours, Some("us-east/zone-b"), &f), 2);
    }

    #[test]
    fn distribute_patterns() {
        assert!(locality_matches("us-west/*", Some("us-west/zone1/rack")));
        assert!(locality_matches("us-west/zone1/*", Some("us-west/zone1")));
        assert!(locality_matches("us-west/zone1", Some("us-west/zone1")));
        assert!(!locality_matches(
            "us-west/zone1",
            Some("us-west/zone1/rack")
        ));
        assert!(!locality_matches(
            "us-west/zone2/*",
            Some("us-west/zone1/rack")
        ));
        assert!(locality_matches("*", None));
        assert!(!locality_matches("us-west", None));
    }
}
