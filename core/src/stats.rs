//! Counters: one slot per worker, written only by that worker, summed when scraped.
//!
//! A counter update is a plain load and store to a cache line no other core writes (no `lock`
//! prefix, no contention); the admin thread reads all slots with relaxed loads at scrape time. The
//! atomics are only there so that the cross-thread read is defined behaviour.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_config::Snapshot;
use keel_io::IoDriver;

/// A monotonic counter with exactly one writer thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this (single writer, so no read-modify-write atomic).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One worker's counters for one listener, on its own cache lines.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct ListenerCounters {
    pub accepted: Counter,
    pub closed: Counter,
    /// Bytes read from downstream clients.
    pub rx_bytes: Counter,
    /// Bytes written to downstream clients.
    pub tx_bytes: Counter,
    pub connect_refused: Counter,
    pub connect_timeout: Counter,
    pub connect_error: Counter,
    pub no_healthy_upstream: Counter,
    pub idle_timeout: Counter,
    /// Connections ended by a socket error (reset) rather than EOF both ways.
    pub reset: Counter,
    /// HTTP requests received (including those refused as malformed).
    pub rq_total: Counter,
    pub rq_2xx: Counter,
    pub rq_3xx: Counter,
    pub rq_4xx: Counter,
    pub rq_5xx: Counter,
    /// TLS handshakes completed on a TLS listener.
    pub tls_handshake: Counter,
    /// Handshakes that failed (bad or missing certificate, protocol error, close mid-handshake).
    pub tls_handshake_error: Counter,
    /// Connections that did not finish the handshake within the TLS handshake timeout.
    pub tls_handshake_timeout: Counter,
    /// Plaintext connections refused by a listener that requires TLS (STRICT, ingress `tls`).
    pub tls_plaintext_refused: Counter,
    /// Plaintext connections let through by a PERMISSIVE listener.
    pub tls_plaintext_accepted: Counter,
    /// TLS passthrough connections whose SNI matched no route.
    pub no_route: Counter,
    /// Requests delayed by a route's `fault.delay`.
    pub fault_delay: Counter,
    /// Requests answered by a route's `fault.abort`.
    pub fault_abort: Counter,
    /// Inbound requests and connections AuthorizationPolicy let through, refused, and audited.
    pub rbac_allowed: Counter,
    pub rbac_denied: Counter,
    pub rbac_audited: Counter,
    /// Inbound requests with a valid JWT, and those refused for an invalid one.
    pub jwt_allowed: Counter,
    pub jwt_denied: Counter,
    /// Requests refused by a local rate limit.
    pub rate_limited: Counter,
    /// Outbound requests and connections refused by REGISTRY_ONLY.
    pub registry_only_refused: Counter,
    /// Connections on a capture port without an original destination (dialled directly).
    pub capture_refused: Counter,
    /// Connections of undeclared protocol taken for HTTP, and for TCP (or TLS), by detection.
    pub detected_http: Counter,
    pub detected_tcp: Counter,
    /// Requests by Envoy response flag (a request may have several), in the order of
    /// [`crate::http::proxy::Flags::names`].
    pub response_flags: [Counter; RESPONSE_FLAGS],
    /// HTTP/2 connection events, in the order of [`H2_EVENTS`].
    pub h2: [Counter; H2_EVENTS.len()],
}

/// HTTP/2 events counted per listener: connections and streams, and each defence that fired.
pub const H2_EVENTS: [&str; 14] = [
    "connections",
    "streams",
    "client_resets",
    "premature_reset_closes",
    "refused_streams",
    "continuation_floods",
    "control_floods",
    "empty_frame_floods",
    "window_update_floods",
    "outbound_floods",
    "header_lists_too_large",
    "send_window_timeouts",
    "connection_errors",
    "stream_errors",
];

/// Index of an event in [`H2_EVENTS`] (and [`ListenerCounters::h2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Event {
    Connection,
    Stream,
    ClientReset,
    PrematureResetClose,
    RefusedStream,
    ContinuationFlood,
    ControlFlood,
    EmptyFrameFlood,
    WindowUpdateFlood,
    OutboundFlood,
    HeaderListTooLarge,
    SendWindowTimeout,
    ConnectionError,
    StreamError,
}

impl ListenerCounters {
    /// Counts an HTTP/2 event.
    pub fn h2_event(&self, e: H2Event) {
        self.h2[e as usize].inc();
    }
}

/// How many response flags Keel sets.
pub const RESPONSE_FLAGS: usize = 13;

/// One worker's counters for one cluster.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct ClusterCounters {
    /// Requests sent to the cluster's endpoints, each try counted (Envoy's `upstream_rq_total`).
    pub rq_total: Counter,
    /// Upstream responses by status class, 1xx to 5xx (`upstream_rq_2xx`, ...), each try counted.
    pub rq_by_class: [Counter; 5],
    pub cx_total: Counter,
    pub cx_closed: Counter,
    pub connect_fail: Counter,
    pub connect_timeout: Counter,
    /// Connections not opened because `maxConnections` were open (TCP proxying).
    pub cx_overflow: Counter,
    /// Requests refused at once: `http2MaxRequests` in flight.
    pub rq_overflow: Counter,
    /// Requests refused because `http1MaxPendingRequests` already waited for a connection.
    pub rq_pending_overflow: Counter,
    /// Requests that waited for a connection (all `maxConnections` busy).
    pub rq_pending: Counter,
    /// Requests that timed out (route `timeout`).
    pub rq_timeout: Counter,
    /// Tries that timed out (`perTryTimeout`).
    pub rq_per_try_timeout: Counter,
    pub rq_retry: Counter,
    /// Requests whose retry got a response that was not retried again.
    pub rq_retry_success: Counter,
    /// Retries not made because the retry budget or `maxRetries` was exhausted.
    pub rq_retry_overflow: Counter,
    /// Requests that ran out of retries (`attempts`) on a retriable outcome.
    pub rq_retry_limit_exceeded: Counter,
    /// Requests sent again because an HTTP/2 upstream refused their stream (REFUSED_STREAM, or
    /// above its GOAWAY's last stream): never processed, so resent outside the retry policy.
    pub rq_refused_resent: Counter,
    /// Mirrored copies sent to this cluster.
    pub mirror_sent: Counter,
    /// Mirrored copies not sent (body too large to keep, too many in flight, or overflow).
    pub mirror_dropped: Counter,
    /// Endpoints ejected by outlier detection.
    pub outlier_ejections: Counter,
}

/// One worker's own counters.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub accepted: Counter,
    /// Downstream connections ended; `accepted - closed` is what a drain waits for.
    pub closed: Counter,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
}

/// A listener's counters across workers.
#[derive(Debug)]
pub struct ListenerStats {
    pub name: String,
    pub direction: &'static str,
    pub slots: Box<[ListenerCounters]>,
}

/// A cluster's counters across workers.
#[derive(Debug)]
pub struct ClusterStats {
    pub name: String,
    pub slots: Box<[ClusterCounters]>,
    /// What the circuit breakers count, shared by all workers and kept across reloads.
    pub breaker: crate::breaker::Gauges,
    /// A fingerprint of the name, so pooled connections are never shared between clusters.
    pub pool_key: u64,
    /// Outlier detection's record of each endpoint, by address, shared by all workers and kept
    /// across reloads.
    pub hosts:
        Mutex<std::collections::HashMap<std::net::SocketAddr, Arc<keel_lb::outlier::HostHealth>>>,
    /// Set once the cluster's first endpoint set is in place: later endpoints are newcomers.
    serving: std::sync::atomic::AtomicBool,
}

impl ClusterStats {
    pub fn new(name: &str, workers: usize) -> ClusterStats {
        ClusterStats {
            name: name.to_string(),
            slots: slots(workers),
            breaker: Default::default(),
            pool_key: keel_lb::hash::hash_bytes(name.as_bytes(), 0x6b65_656c),
            hosts: Mutex::default(),
            serving: Default::default(),
        }
    }

    /// The health records of `addrs`, in order, made for addresses seen for the first time. An
    /// address that joins a cluster already serving starts its slow start (which only clusters
    /// with `warmupDurationSecs` look at); those of a new cluster do not.
    pub fn health_of(
        &self,
        addrs: impl Iterator<Item = std::net::SocketAddr>,
    ) -> Vec<Arc<keel_lb::outlier::HostHealth>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        // Records no generation holds any more (endpoints a reload or a DNS answer removed) go,
        // so that churning addresses do not grow the map without end.
        hosts.retain(|_, h| Arc::strong_count(h) > 1);
        let serving = self
            .serving
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        let now = crate::generation::now_ms();
        addrs
            .map(|a| {
                hosts
                    .entry(a)
                    .or_insert_with(|| {
                        let h = Arc::new(keel_lb::outlier::HostHealth::default());
                        if serving {
                            h.start_warmup(now);
                        }
                        h
                    })
                    .clone()
            })
            .collect()
    }

    /// Endpoints failing their active health checks now.
    pub fn unhealthy(&self) -> usize {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.values().filter(|h| h.failed_health_check()).count()
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> usize {
        let now = crate::generation::now_ms();
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.values().filter(|h| h.is_ejected(now)).count()
    }
}

/// Picks one counter out of a listener's slot, for tables of metrics.
type ListenerField = fn(&ListenerCounters) -> &Counter;
/// Picks one counter out of a cluster's slot.
type ClusterField = fn(&ClusterCounters) -> &Counter;
/// Reads one circuit-breaker gauge of a cluster.
type GaugeField = fn(&crate::breaker::Gauges) -> u32;

fn slots<T: Default>(n: usize) -> Box<[T]> {
    (0..n).map(|_| T::default()).collect()
}

fn sum<T>(slots: &[T], f: impl Fn(&T) -> &Counter) -> u64 {
    slots.iter().map(|s| f(s).get()).fold(0, u64::wrapping_add)
}

/// The listener and cluster counters of one config version, indexed as its snapshot is.
///
/// A reload builds a new table that reuses the entries of listeners and clusters whose name (and
/// direction) did not change, so their counters carry on across reloads; the entries of removed
/// ones live only as long as the connections still counting into them.
#[derive(Debug, Default)]
pub struct CounterTable {
    pub listeners: Vec<Arc<ListenerStats>>,
    pub clusters: Vec<Arc<ClusterStats>>,
}

impl CounterTable {
    /// Counters for `snapshot`, reusing `previous`'s entries by name, with a slot per worker.
    pub fn for_snapshot(
        snapshot: &Snapshot,
        workers: usize,
        previous: Option<&CounterTable>,
    ) -> CounterTable {
        let listeners = snapshot
            .listeners
            .iter()
            .map(|l| {
                let direction = l.direction.as_str();
                previous
                    .and_then(|p| {
                        p.listeners
                            .iter()
                            .find(|x| x.name == l.name && x.direction == direction)
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(ListenerStats {
                            name: l.name.clone(),
                            direction,
                            slots: slots(workers),
                        })
                    })
            })
            .collect();
        let clusters = snapshot
            .clusters
            .iter()
            .map(|c| {
                previous
                    .and_then(|p| p.clusters.iter().find(|x| x.name == c.name))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(ClusterStats::new(&c.name, workers)))
            })
            .collect();
        CounterTable {
            listeners,
            clusters,
        }
    }
}

/// The config in force and its counters, as the admin endpoints show them.
#[derive(Debug, Clone)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    pub table: Arc<CounterTable>,
}

/// Outcomes of config reloads, counted by the thread that reloads.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub success: AtomicU64,
    pub failure: AtomicU64,
    /// Reloads asked for whose files had not changed (nothing to do).
    pub unchanged: AtomicU64,
    /// Milliseconds from the trigger to every worker serving the last successful reload.
    pub last_duration_ms: AtomicU64,
    /// Replaced configs still alive because a connection that began on them is open; anything
    /// above zero long after the last reload is a config held in memory (a long TCP connection, or
    /// a leak).
    pub retired: AtomicU64,
}

/// Every counter of the process, plus the facts the admin endpoints report.
#[derive(Debug)]
pub struct Stats {
    pub driver: IoDriver,
    pub workers: usize,
    pub per_worker: Box<[WorkerCounters]>,
    /// Each worker's Istio metric series, as it last published them.
    pub istio: Box<[crate::istio_metrics::Published]>,
    /// Each worker's request-duration histograms per listener, as it last published them.
    pub latency: Box<[crate::istio_metrics::PublishedLatency]>,
    pub reloads: ReloadCounters,
    published: Mutex<Published>,
    started: Instant,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Stats {
    /// Counters for every listener and cluster of `snapshot`, with a slot per worker.
    pub fn new(snapshot: &Arc<Snapshot>, driver: IoDriver, workers: usize) -> Arc<Stats> {
        Arc::new(Stats {
            driver,
            workers,
            per_worker: slots(workers),
            istio: slots(workers),
            latency: slots(workers),
            reloads: ReloadCounters::default(),
            published: Mutex::new(Published {
                snapshot: snapshot.clone(),
                table: Arc::new(CounterTable::for_snapshot(snapshot, workers, None)),
            }),
            started: Instant::now(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// The config in force and its counter table.
    pub fn published(&self) -> Published {
        match self.published.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `p` the config the admin endpoints report (after every worker has committed it).
    pub fn publish(&self, p: Published) {
        match self.published.lock() {
            Ok(mut g) => *g = p,
            Err(poisoned) => *poisoned.into_inner() = p,
        }
    }

    /// Downstream connections open on all workers.
    pub fn open_connections(&self) -> u64 {
        self.per_worker
            .iter()
            .map(|w| w.accepted.get().saturating_sub(w.closed.get()))
            .sum()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Serving and not draining: what `/ready` reports.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) && !self.draining.load(Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let Published { snapshot, table } = self.published();
        let l_metrics: [(&str, &str, &str, ListenerField); 16] = [
            (
                "keel_listener_rbac_allowed_total",
                "counter",
                "Inbound requests and connections an AuthorizationPolicy let through.",
                |c| &c.rbac_allowed,
            ),
            (
                "keel_listener_rbac_denied_total",
                "counter",
                "Inbound requests (403) and connections (closed) refused by AuthorizationPolicy.",
                |c| &c.rbac_denied,
            ),
            (
                "keel_listener_rbac_audited_total",
                "counter",
                "Inbound requests and connections an AUDIT policy matched.",
                |c| &c.rbac_audited,
            ),
            (
                "keel_listener_jwt_allowed_total",
                "counter",
                "Inbound requests carrying a valid JWT.",
                |c| &c.jwt_allowed,
            ),
            (
                "keel_listener_jwt_denied_total",
                "counter",
                "Inbound requests refused (401) for an invalid JWT.",
                |c| &c.jwt_denied,
            ),
            (
                "keel_listener_rate_limited_total",
                "counter",
                "Requests refused (429) by a local rate limit.",
                |c| &c.rate_limited,
            ),
            (
                "keel_listener_registry_only_refused_total",
                "counter",
                "Outbound requests and connections to destinations no ServiceEntry declares, refused by REGISTRY_ONLY.",
                |c| &c.registry_only_refused,
            ),
            (
                "keel_listener_fault_delays_total",
                "counter",
                "Requests delayed by fault injection.",
                |c| &c.fault_delay,
            ),
            (
                "keel_listener_fault_aborts_total",
                "counter",
                "Requests aborted by fault injection.",
                |c| &c.fault_abort,
            ),
            (
                "keel_listener_connections_accepted_total",
                "counter",
                "Downstream connections accepted.",
                |c| &c.accepted,
            ),
            (
                "keel_listener_downstream_rx_bytes_total",
                "counter",
                "Bytes received from downstream clients.",
                |c| &c.rx_bytes,
            ),
            (
                "keel_listener_downstream_tx_bytes_total",
                "counter",
                "Bytes sent to downstream clients.",
                |c| &c.tx_bytes,
            ),
            (
                "keel_listener_no_healthy_upstream_total",
                "counter",
                "Connections closed because the cluster had no endpoint.",
                |c| &c.no_healthy_upstream,
            ),
            (
                "keel_listener_no_route_total",
                "counter",
                "TLS passthrough connections whose SNI matched no route.",
                |c| &c.no_route,
            ),
            (
                "keel_listener_idle_timeouts_total",
                "counter",
                "Connections closed by the idle timeout.",
                |c| &c.idle_timeout,
            ),
            (
                "keel_listener_connections_reset_total",
                "counter",
                "Connections ended by a socket error.",
                |c| &c.reset,
            ),
        ];
        for (name, kind, help, f) in l_metrics {
            header(&mut out, name, kind, help);
            for l in &table.listeners {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",direction=\"{}\"}} {}",
                    escape(&l.name),
                    l.direction,
                    sum(&l.slots, f)
                );
            }
        }
        header(
            &mut out,
            "keel_listener_connections_active",
            "gauge",
            "Downstream connections open now.",
        );
        for l in &table.listeners {
            let active =
                sum(&l.slots, |c| &c.accepted).saturating_sub(sum(&l.slots, |c| &c.closed));
            let _ = writeln!(
                out,
                "keel_listener_connections_active{{listener=\"{}\",direction=\"{}\"}} {active}",
                escape(&l.name),
                l.direction
            );
        }
        header(
            &mut out,
            "keel_listener_upstream_connect_failures_total",
            "counter",
            "Upstream connects that failed, by reason.",
        );
        for l in &table.listeners {
            for (reason, f) in [
                (
                    "refused",
                    (|c| &c.connect_refused) as fn(&ListenerCounters) -> &Counter,
                ),
                ("timeout", |c| &c.connect_timeout),
                ("error", |c| &c.connect_error),
            ] {
                let _ = writeln!(out, "keel_listener_upstream_connect_failures_total{{listener=\"{}\",direction=\"{}\",reason=\"{reason}\"}} {}", escape(&l.name), l.direction, sum(&l.slots, f));
            }
        }
        header(
            &mut out,
            "keel_listener_tls_handshakes_total",
            "counter",
            "Downstream TLS handshakes, by result.",
        );
        for l in &table.listeners {
            for (result, f) in [
                (
                    "success",
                    (|c| &c.tls_handshake) as fn(&ListenerCounters) -> &Counter,
                ),
                ("error", |c| &c.tls_handshake_error),
                ("timeout", |c| &c.tls_handshake_timeout),
            ] {
                let _ = writeln!(out, "keel_listener_tls_handshakes_total{{listener=\"{}\",direction=\"{}\",result=\"{result}\"}} {}", escape(&l.name), l.direction, sum(&l.slots, f));
            }
        }
        header(
            &mut out,
            "keel_listener_tls_plaintext_connections_total",
            "counter",
            "Plaintext connections on TLS listeners: accepted (PERMISSIVE) or refused (STRICT).",
        );
        for l in &table.listeners {
            for (result, f) in [
                (
                    "accepted",
                    (|c| &c.tls_plaintext_accepted) as fn(&ListenerCounters) -> &Counter,
                ),
                ("refused", |c| &c.tls_plaintext_refused),
            ] {
                let _ = writeln!(out, "keel_listener_tls_plaintext_connections_total{{listener=\"{}\",direction=\"{}\",result=\"{result}\"}} {}", escape(&l.name), l.direction, sum(&l.slots, f));
            }
        }
        header(
            &mut out,
            "keel_listener_protocol_detected_total",
            "counter",
            "Connections of undeclared protocol on captured ports, by what their first bytes said.",
        );
        for l in &table.listeners {
            for (protocol, f) in [
                (
                    "http",
                    (|c| &c.detected_http) as fn(&ListenerCounters) -> &Counter,
                ),
                ("tcp", |c| &c.detected_tcp),
            ] {
                let _ = writeln!(out, "keel_listener_protocol_detected_total{{listener=\"{}\",direction=\"{}\",protocol=\"{protocol}\"}} {}", escape(&l.name), l.direction, sum(&l.slots, f));
            }
        }
        header(
            &mut out,
            "keel_listener_capture_refused_total",
            "counter",
            "Connections to a capture port that had no original destination (dialled directly).",
        );
        for l in &table.listeners {
            let _ = writeln!(
                out,
                "keel_listener_capture_refused_total{{listener=\"{}\",direction=\"{}\"}} {}",
                escape(&l.name),
                l.direction,
                sum(&l.slots, |c| &c.capture_refused)
            );
        }
        let c_metrics: [(&str, &str, ClusterField); 17] = [
            (
                "keel_cluster_upstream_cx_overflow_total",
                "TCP connections refused by maxConnections.",
                |c| &c.cx_overflow,
            ),
            (
                "keel_cluster_upstream_rq_overflow_total",
                "Requests refused by http2MaxRequests (503, flag UO).",
                |c| &c.rq_overflow,
            ),
            (
                "keel_cluster_upstream_rq_pending_overflow_total",
                "Requests refused by http1MaxPendingRequests (503, flag UO).",
                |c| &c.rq_pending_overflow,
            ),
            (
                "keel_cluster_upstream_rq_pending_total",
                "Requests that waited for a connection under maxConnections.",
                |c| &c.rq_pending,
            ),
            (
                "keel_cluster_upstream_rq_timeout_total",
                "Requests that hit the route timeout (flag UT).",
                |c| &c.rq_timeout,
            ),
            (
                "keel_cluster_upstream_rq_per_try_timeout_total",
                "Tries that hit perTryTimeout.",
                |c| &c.rq_per_try_timeout,
            ),
            (
                "keel_cluster_upstream_rq_retry_total",
                "Retries sent.",
                |c| &c.rq_retry,
            ),
            (
                "keel_cluster_upstream_rq_retry_success_total",
                "Retried requests that ended with a response not retried again.",
                |c| &c.rq_retry_success,
            ),
            (
                "keel_cluster_upstream_rq_retry_overflow_total",
                "Retries not sent: retry budget or maxRetries exhausted.",
                |c| &c.rq_retry_overflow,
            ),
            (
                "keel_cluster_upstream_rq_retry_limit_exceeded_total",
                "Requests out of retry attempts on a retriable outcome (flag URX).",
                |c| &c.rq_retry_limit_exceeded,
            ),
            (
                "keel_cluster_upstream_rq_refused_resent_total",
                "Requests sent again after an HTTP/2 upstream refused their stream (not processed).",
                |c| &c.rq_refused_resent,
            ),
            (
                "keel_cluster_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                |c| &c.outlier_ejections,
            ),
            (
                "keel_cluster_mirror_requests_total",
                "Mirrored copies sent to this cluster.",
                |c| &c.mirror_sent,
            ),
            (
                "keel_cluster_mirror_dropped_total",
                "Mirrored copies not sent (body over the buffer, too many in flight, overflow).",
                |c| &c.mirror_dropped,
            ),
            (
                "keel_cluster_upstream_cx_total",
                "Upstream connections attempted.",
                |c| &c.cx_total,
            ),
            (
                "keel_cluster_upstream_cx_connect_fail_total",
                "Upstream connects that failed (including timeouts).",
                |c| &c.connect_fail,
            ),
            (
                "keel_cluster_upstream_cx_connect_timeout_total",
                "Upstream connects that timed out.",
                |c| &c.connect_timeout,
            ),
        ];
        header(
            &mut out,
            "keel_cluster_upstream_rq_total",
            "counter",
            "Requests sent to the cluster's endpoints (each try).",
        );
        for c in &table.clusters {
            let _ = writeln!(
                out,
                "keel_cluster_upstream_rq_total{{cluster=\"{}\"}} {}",
                escape(&c.name),
                sum(&c.slots, |x| &x.rq_total)
            );
        }
        header(
            &mut out,
            "keel_cluster_upstream_rq_xx_total",
            "counter",
            "Upstream responses by status class (each try), as Envoy's upstream_rq_<N>xx.",
        );
        for c in &table.clusters {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keel_cluster_upstream_rq_xx_total{{cluster=\"{}\",response_code_class=\"{class}\"}} {}",
                    escape(&c.name),
                    sum(&c.slots, |x| &x.rq_by_class[i])
                );
            }
        }
        for (name, help, f) in c_metrics {
            header(&mut out, name, "counter", help);
            for c in &table.clusters {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\"}} {}",
                    escape(&c.name),
                    sum(&c.slots, f)
                );
            }
        }
        header(
            &mut out,
            "keel_cluster_upstream_cx_active",
            "gauge",
            "Upstream connections open now.",
        );
        for c in &table.clusters {
            let active =
                sum(&c.slots, |s| &s.cx_total).saturating_sub(sum(&c.slots, |s| &s.cx_closed));
            let _ = writeln!(
                out,
                "keel_cluster_upstream_cx_active{{cluster=\"{}\"}} {active}",
                escape(&c.name)
            );
        }
        let gauges: [(&str, &str, GaugeField); 4] = [
            (
                "keel_cluster_upstream_rq_active",
                "Requests in flight to the cluster, over all workers.",
                |g| g.requests(),
            ),
            (
                "keel_cluster_upstream_rq_pending_active",
                "Requests waiting for a connection, over all workers.",
                |g| g.pending(),
            ),
            (
                "keel_cluster_upstream_cx_open",
                "HTTP and TCP connections to the cluster open or opening (maxConnections counts these).",
                |g| g.connections(),
            ),
            (
                "keel_cluster_upstream_rq_retry_active",
                "Retries in flight.",
                |g| g.retries(),
            ),
        ];
        header(
            &mut out,
            "keel_listener_response_flags_total",
            "counter",
            "HTTP requests by Envoy response flag (UO overflow, UT timeout, URX retries exhausted, FI/DI fault, NR, UH, UF, UC, UPE, DPE, DC).",
        );
        for l in &table.listeners {
            for (i, flag) in crate::http::proxy::Flags::names().enumerate() {
                let _ = writeln!(
                    out,
                    "keel_listener_response_flags_total{{listener=\"{}\",direction=\"{}\",flag=\"{flag}\"}} {}",
                    escape(&l.name),
                    l.direction,
                    sum(&l.slots, |c| &c.response_flags[i])
                );
            }
        }
        header(
            &mut out,
            "keel_listener_http2_events_total",
            "counter",
            "HTTP/2 connections, streams, and the defences that fired (premature resets, floods, refused streams, errors).",
        );
        for l in &table.listeners {
            for (i, event) in H2_EVENTS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keel_listener_http2_events_total{{listener=\"{}\",direction=\"{}\",event=\"{event}\"}} {}",
                    escape(&l.name),
                    l.direction,
                    sum(&l.slots, |c| &c.h2[i])
                );
            }
        }
        header(
            &mut out,
            "keel_cluster_outlier_ejected",
            "gauge",
            "Endpoints ejected by outlier detection now.",
        );
        for c in &table.clusters {
            let _ = writeln!(
                out,
                "keel_cluster_outlier_ejected{{cluster=\"{}\"}} {}",
                escape(&c.name),
                c.ejected()
            );
        }
        header(
            &mut out,
            "keel_cluster_health_check_unhealthy",
            "gauge",
            "Endpoints failing their active health checks now.",
        );
        for c in &table.clusters {
            let _ = writeln!(
                out,
                "keel_cluster_health_check_unhealthy{{cluster=\"{}\"}} {}",
                escape(&c.name),
                c.unhealthy()
            );
        }
        for (name, help, f) in gauges {
            header(&mut out, name, "gauge", help);
            for c in &table.clusters {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\"}} {}",
                    escape(&c.name),
                    f(&c.breaker)
                );
            }
        }
        header(
            &mut out,
            "keel_access_log_dropped_total",
            "counter",
            "Access log lines dropped because the writer thread fell behind.",
        );
        let _ = writeln!(
            out,
            "keel_access_log_dropped_total {}",
            sum(&self.per_worker, |w| &w.access_log_dropped)
        );
        header(
            &mut out,
            "keel_worker_connections_accepted_total",
            "counter",
            "Connections accepted by each worker (per core).",
        );
        for (i, w) in self.per_worker.iter().enumerate() {
            let _ = writeln!(
                out,
                "keel_worker_connections_accepted_total{{worker=\"{i}\"}} {}",
                w.accepted.get()
            );
        }
        crate::istio_metrics::write(&self.istio, &mut out);
        header(
            &mut out,
            "keel_io_driver",
            "gauge",
            "The io driver in use (value 1).",
        );
        let _ = writeln!(out, "keel_io_driver{{driver=\"{}\"}} 1", self.driver);
        header(
            &mut out,
            "keel_workers",
            "gauge",
            "Worker threads (one runtime per core).",
        );
        let _ = writeln!(out, "keel_workers {}", self.workers);
        header(
            &mut out,
            "keel_config_info",
            "gauge",
            "The config version in force (value 1).",
        );
        let _ = writeln!(
            out,
            "keel_config_info{{version=\"{}\"}} 1",
            escape(&snapshot.version)
        );
        header(
            &mut out,
            "keel_tracing_spans_total",
            "counter",
            "Sampled spans by outcome: exported to the collectors, or dropped (queue full, collector failing).",
        );
        let t = &crate::trace::COUNTERS;
        for (result, n) in [("exported", &t.exported), ("dropped", &t.dropped)] {
            let _ = writeln!(
                out,
                "keel_tracing_spans_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        header(
            &mut out,
            "keel_tracing_export_failures_total",
            "counter",
            "Span batches a collector did not take (unreachable, or not a 2xx).",
        );
        let _ = writeln!(
            out,
            "keel_tracing_export_failures_total {}",
            t.export_failures.load(Relaxed)
        );
        header(
            &mut out,
            "keel_dns_lookups_total",
            "counter",
            "Lookups of DNS ServiceEntry names by result (a failed refresh keeps the last addresses).",
        );
        let dns = crate::dns::resolver();
        for (result, n) in [("success", &dns.success), ("failure", &dns.failure)] {
            let _ = writeln!(
                out,
                "keel_dns_lookups_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        header(
            &mut out,
            "keel_jwks_fetches_total",
            "counter",
            "Fetches of RequestAuthentication jwksUri key sets by result (a failure keeps the last keys).",
        );
        for (result, n) in [
            ("success", &crate::jwks::FETCHES.success),
            ("failure", &crate::jwks::FETCHES.failure),
        ] {
            let _ = writeln!(
                out,
                "keel_jwks_fetches_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        header(
            &mut out,
            "keel_config_reloads_total",
            "counter",
            "Config reloads by result (unchanged: the files had not changed).",
        );
        for (result, n) in [
            ("success", &self.reloads.success),
            ("failure", &self.reloads.failure),
            ("unchanged", &self.reloads.unchanged),
        ] {
            let _ = writeln!(
                out,
                "keel_config_reloads_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        header(
            &mut out,
            "keel_config_last_reload_duration_milliseconds",
            "gauge",
            "From the reload trigger to every worker serving the new config, for the last successful reload.",
        );
        let _ = writeln!(
            out,
            "keel_config_last_reload_duration_milliseconds {}",
            self.reloads.last_duration_ms.load(Relaxed)
        );
        header(
            &mut out,
            "keel_config_retired_snapshots",
            "gauge",
            "Replaced configs not freed yet: a connection that began on them is still open.",
        );
        let _ = writeln!(
            out,
            "keel_config_retired_snapshots {}",
            self.reloads.retired.load(Relaxed)
        );
        header(
            &mut out,
            "keel_uptime_seconds",
            "gauge",
            "Seconds since start.",
        );
        let _ = writeln!(
            out,
            "keel_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        out
    }

    /// The same figures as JSON, for `/stats`.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let Published { snapshot, table } = self.published();
        let latency = crate::istio_metrics::latency_json(&self.latency);
        json!({
            "io_driver": self.driver.as_str(),
            "workers": self.workers,
            "config_version": snapshot.version,
            "config_reloads": {
                "success": self.reloads.success.load(Relaxed),
                "failure": self.reloads.failure.load(Relaxed),
                "unchanged": self.reloads.unchanged.load(Relaxed),
                "last_duration_ms": self.reloads.last_duration_ms.load(Relaxed),
                "retired": self.reloads.retired.load(Relaxed),
            },
            "uptime_seconds": self.started.elapsed().as_secs(),
            "ready": self.is_ready(),
            "draining": self.is_draining(),
            "listeners": table.listeners.iter().map(|l| {
                let s = &l.slots;
                json!({
                    "name": l.name,
                    "direction": l.direction,
                    "request_duration_us": latency.get(&l.name),
                    "connections_accepted": sum(s, |c| &c.accepted),
                    "connections_active": sum(s, |c| &c.accepted).saturating_sub(sum(s, |c| &c.closed)),
                    "downstream_rx_bytes": sum(s, |c| &c.rx_bytes),
                    "downstream_tx_bytes": sum(s, |c| &c.tx_bytes),
                    "upstream_connect_refused": sum(s, |c| &c.connect_refused),
                    "upstream_connect_timeout": sum(s, |c| &c.connect_timeout),
                    "upstream_connect_error": sum(s, |c| &c.connect_error),
                    "no_healthy_upstream": sum(s, |c| &c.no_healthy_upstream),
                    "idle_timeouts": sum(s, |c| &c.idle_timeout),
                    "connections_reset": sum(s, |c| &c.reset),
                    "http_requests": sum(s, |c| &c.rq_total),
                    "http_2xx": sum(s, |c| &c.rq_2xx),
                    "http_3xx": sum(s, |c| &c.rq_3xx),
                    "http_4xx": sum(s, |c| &c.rq_4xx),
                    "http_5xx": sum(s, |c| &c.rq_5xx),
                    "tls_handshakes": sum(s, |c| &c.tls_handshake),
                    "tls_handshake_errors": sum(s, |c| &c.tls_handshake_error),
                    "tls_handshake_timeouts": sum(s, |c| &c.tls_handshake_timeout),
                    "tls_plaintext_accepted": sum(s, |c| &c.tls_plaintext_accepted),
                    "tls_plaintext_refused": sum(s, |c| &c.tls_plaintext_refused),
                    "no_route": sum(s, |c| &c.no_route),
                    "fault_delays": sum(s, |c| &c.fault_delay),
                    "fault_aborts": sum(s, |c| &c.fault_abort),
                    "rbac_allowed": sum(s, |c| &c.rbac_allowed),
                    "rbac_denied": sum(s, |c| &c.rbac_denied),
                    "rbac_audited": sum(s, |c| &c.rbac_audited),
                    "jwt_allowed": sum(s, |c| &c.jwt_allowed),
                    "jwt_denied": sum(s, |c| &c.jwt_denied),
                    "rate_limited": sum(s, |c| &c.rate_limited),
                    "registry_only_refused": sum(s, |c| &c.registry_only_refused),
                    "capture_refused": sum(s, |c| &c.capture_refused),
                    "protocol_detected_http": sum(s, |c| &c.detected_http),
                    "protocol_detected_tcp": sum(s, |c| &c.detected_tcp),
                    "response_flags": crate::http::proxy::Flags::names()
                        .enumerate()
                        .map(|(i, f)| (f.to_string(), json!(sum(s, |c| &c.response_flags[i]))))
                        .collect::<serde_json::Map<_, _>>(),
                    "http2": H2_EVENTS
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.to_string(), json!(sum(s, |c| &c.h2[i]))))
                        .collect::<serde_json::Map<_, _>>(),
                })
            }).collect::<Vec<_>>(),
            "clusters": table.clusters.iter().map(|c| {
                let s = &c.slots;
                json!({
                    "name": c.name,
                    "upstream_cx_total": sum(s, |x| &x.cx_total),
                    "upstream_cx_active": sum(s, |x| &x.cx_total).saturating_sub(sum(s, |x| &x.cx_closed)),
                    "upstream_cx_connect_fail": sum(s, |x| &x.connect_fail),
                    "upstream_cx_connect_timeout": sum(s, |x| &x.connect_timeout),
                    "upstream_cx_open": c.breaker.connections(),
                    "upstream_rq_active": c.breaker.requests(),
                    "upstream_rq_pending_active": c.breaker.pending(),
                    "upstream_rq_retry_active": c.breaker.retries(),
                    "upstream_rq_overflow": sum(s, |x| &x.rq_overflow),
                    "upstream_rq_pending_overflow": sum(s, |x| &x.rq_pending_overflow),
                    "upstream_rq_timeout": sum(s, |x| &x.rq_timeout),
                    "upstream_rq_retry": sum(s, |x| &x.rq_retry),
                    "upstream_rq_retry_success": sum(s, |x| &x.rq_retry_success),
                    "upstream_rq_total": sum(s, |x| &x.rq_total),
                    "upstream_rq_1xx": sum(s, |x| &x.rq_by_class[0]),
                    "upstream_rq_2xx": sum(s, |x| &x.rq_by_class[1]),
                    "upstream_rq_3xx": sum(s, |x| &x.rq_by_class[2]),
                    "upstream_rq_4xx": sum(s, |x| &x.rq_by_class[3]),
                    "upstream_rq_5xx": sum(s, |x| &x.rq_by_class[4]),
                    "upstream_rq_retry_overflow": sum(s, |x| &x.rq_retry_overflow),
                    "upstream_rq_refused_resent": sum(s, |x| &x.rq_refused_resent),
                    "upstream_rq_retry_limit_exceeded": sum(s, |x| &x.rq_retry_limit_exceeded),
                    "upstream_rq_per_try_timeout": sum(s, |x| &x.rq_per_try_timeout),
                    "upstream_rq_pending": sum(s, |x| &x.rq_pending),
                    "upstream_cx_overflow": sum(s, |x| &x.cx_overflow),
                    "mirror_dropped": sum(s, |x| &x.mirror_dropped),
                    "outlier_ejections": sum(s, |x| &x.outlier_ejections),
                    "outlier_ejected_active": c.ejected(),
                    "health_check_unhealthy": c.unhealthy(),
                    "mirror_requests": sum(s, |x| &x.mirror_sent),
                })
            }).collect::<Vec<_>>(),
            "workers_accepted": self.per_worker.iter().map(|w| w.accepted.get()).collect::<Vec<_>>(),
        })
    }
}

impl Stats {
    /// Each cluster's circuit breakers and each endpoint's weight, health, ejection state and
    /// requests in flight, as Envoy's `/clusters` lists them (`cluster::host::field::value`), or as
    /// JSON.
    pub fn clusters(&self, as_json: bool) -> String {
        let Published { snapshot, table } = self.published();
        let now = crate::generation::now_ms();
        let mut out = String::with_capacity(4096);
        let mut list = Vec::new();
        for (c, stats) in snapshot.clusters.iter().zip(&table.clusters) {
            let health = stats.health_of(c.endpoints.iter().map(|e| e.address));
            let l = &c.limits;
            let limits = [
                ("max_connections", l.max_connections),
                ("max_pending_requests", l.max_pending_requests),
                ("max_requests", l.max_requests),
                ("max_retries", l.max_retries.unwrap_or(u32::MAX)),
            ];
            let mut endpoints = Vec::new();
            for (e, h) in c.endpoints.iter().zip(&health) {
                let ejected = h.is_ejected(now);
                let flags = match (ejected, h.failed_health_check()) {
                    (false, false) => "healthy",
                    (true, false) => "/failed_outlier_check",
                    (false, true) => "/failed_active_hc",
                    (true, true) => "/failed_active_hc/failed_outlier_check",
                };
                if as_json {
                    endpoints.push(serde_json::json!({
                        "address": e.address.to_string(),
                        "weight": e.weight,
                        "labels": e.labels,
                        "health_flags": flags,
                        "ejected": ejected,
                        "failed_health_check": h.failed_health_check(),
                        "ejected_for_ms": h.ejected_until().saturating_sub(now),
                        "ejections": h.ejections(),
                        "rq_active": h.active(),
                    }));
                    continue;
                }
                let host = format!("{}::{}", c.name, e.address);
                let _ = writeln!(out, "{host}::weight::{}", e.weight);
                let _ = writeln!(out, "{host}::rq_active::{}", h.active());
                let _ = writeln!(out, "{host}::health_flags::{flags}");
                let _ = writeln!(out, "{host}::outlier_ejections::{}", h.ejections());
            }
            if as_json {
                list.push(serde_json::json!({
                    "name": c.name,
                    "circuit_breakers": limits.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                    "upstream_cx_open": stats.breaker.connections(),
                    "upstream_rq_active": stats.breaker.requests(),
                    "upstream_rq_pending_active": stats.breaker.pending(),
                    "outlier_detection": c.outlier.is_some(),
                    "health_check": c.health_check.is_some(),
                    "endpoints": endpoints,
                }));
                continue;
            }
            for (k, v) in limits {
                let _ = writeln!(out, "{}::default_priority::{k}::{v}", c.name);
            }
            let _ = writeln!(
                out,
                "{}::outlier_detection::{}",
                c.name,
                c.outlier.is_some()
            );
        }
        if as_json {
            let mut text = serde_json::to_string_pretty(&serde_json::json!({ "clusters": list }))
                .unwrap_or_default();
            text.push('\n');
            return text;
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_writer_counter() {
        let c = Counter::default();
        c.add(5);
        c.inc();
        assert_eq!(c.get(), 6);
    }

    #[test]
    fn escapes_labels() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
