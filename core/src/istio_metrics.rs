//! Istio's standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_*`), with Istio's labels, so that
//! dashboards written for Istio's sidecars work on Keel's `/stats/prometheus`.
//!
//! A label set is formatted once, the first time a worker sees its combination (listener, cluster,
//! status, flags, peer identity — by name fingerprints, so series carry on across reloads); after
//! that a request costs a hash lookup of a small integer key and a few additions to core-local
//! memory. Each worker publishes what changed
//! at its sweep tick (100 ms) into its own slot, which the scrape merges by label set.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Istio's default buckets for request durations, in ms.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's default buckets for request and response sizes, in bytes.
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1e6, 1e7, 1e8];

/// A worker's published series: label set → numbers.
pub type Published = Mutex<Vec<(Arc<str>, Series)>>;

/// Picks one counter of a series.
type SeriesField = fn(&Series) -> u64;

/// A histogram with fixed upper bounds (and +Inf).
#[derive(Debug, Clone, Default)]
pub struct Hist {
    counts: Vec<u64>,
    sum: f64,
}

impl Hist {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    fn merge(&mut self, other: &Hist) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let mut cumulative = 0;
        for (i, b) in bounds.iter().enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts.get(bounds.len()).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// One label set's numbers.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub requests: u64,
    pub duration: Hist,
    pub request_bytes: Hist,
    pub response_bytes: Hist,
    pub tcp_opened: u64,
    pub tcp_closed: u64,
    pub tcp_sent: u64,
    pub tcp_received: u64,
}

impl Series {
    fn merge(&mut self, o: &Series) {
        self.requests += o.requests;
        self.duration.merge(&o.duration);
        self.request_bytes.merge(&o.request_bytes);
        self.response_bytes.merge(&o.response_bytes);
        self.tcp_opened += o.tcp_opened;
        self.tcp_closed += o.tcp_closed;
        self.tcp_sent += o.tcp_sent;
        self.tcp_received += o.tcp_received;
    }
}

/// What distinguishes one label set from another on a worker (all small integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The fingerprint of this workload's labels (see `Generation::labels_key`).
    pub version: u64,
    /// The listener's name fingerprint.
    pub listener: u64,
    /// The cluster's name fingerprint; 0 when no cluster was chosen.
    pub cluster: u64,
    pub code: u16,
    pub flags: u16,
    /// The peer's SPIFFE id, interned on the worker (0: none).
    pub peer: u32,
    pub tcp: bool,
    /// A gRPC request (`request_protocol="grpc"`).
    pub grpc: bool,
    /// Mutual TLS downstream (`connection_security_policy`).
    pub mtls: bool,
    pub grpc_status: Option<u16>,
}

use crate::fast_hash::FastMap;

/// One worker's series, and the slot it publishes them to.
#[derive(Default)]
pub struct WorkerMetrics {
    index: RefCell<FastMap<Key, usize>>,
    series: RefCell<Vec<(Arc<str>, Series)>>,
    peers: RefCell<HashMap<Box<str>, u32>>,
    dirty: Cell<bool>,
    /// Request durations per listener (name fingerprint) → (listener name, histogram), in µs.
    latency: RefCell<FastMap<u64, NamedLatency>>,
    latency_dirty: Cell<bool>,
}

/// Request durations in µs, 1 µs to 1 h, two significant digits (about 30 KiB).
pub type Latency = hdrhistogram::Histogram<u64>;

/// A listener's name and its latency histogram.
type NamedLatency = (Arc<str>, Latency);

/// A worker's published latency histograms: listener name → histogram.
pub type PublishedLatency = Mutex<Vec<(Arc<str>, Latency)>>;

fn new_latency() -> Option<Latency> {
    Latency::new_with_bounds(1, 3_600_000_000, 2).ok()
}

impl WorkerMetrics {
    /// The interned number of a peer identity (0 for none).
    pub fn peer(&self, id: Option<&str>) -> u32 {
        let Some(id) = id else { return 0 };
        let mut peers = self.peers.borrow_mut();
        let next = peers.len() as u32 + 1;
        *peers.entry(id.into()).or_insert(next)
    }

    /// Adds to the series of `key`, formatting its labels with `labels` the first time.
    pub fn record(&self, key: Key, labels: impl FnOnce() -> String, f: impl FnOnce(&mut Series)) {
        let mut index = self.index.borrow_mut();
        let mut series = self.series.borrow_mut();
        let i = *index.entry(key).or_insert_with(|| {
            series.push((labels().into(), Series::default()));
            series.len() - 1
        });
        f(&mut series[i].1);
        self.dirty.set(true);
    }

    /// Records a request's duration on the listener with name fingerprint `listener`, named by
    /// `name()`.
    pub fn latency(&self, listener: u64, name: impl FnOnce() -> Arc<str>, d: Duration) {
        let mut map = self.latency.borrow_mut();
        let entry = match map.entry(listener) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let Some(h) = new_latency() else { return };
                v.insert((name(), h))
            }
        };
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = entry.1.record(us);
        self.latency_dirty.set(true);
    }

    /// Copies the latency histograms into `slot` when they changed (merged by listener name).
    pub fn publish_latency(&self, slot: &PublishedLatency) {
        if !self.latency_dirty.replace(false) {
            return;
        }
        let mut by_name: Vec<(Arc<str>, Latency)> = Vec::new();
        for (name, h) in self.latency.borrow().values() {
            match by_name.iter_mut().find(|(n, _)| n == name) {
                Some((_, into)) => {
                    let _ = into.add(h);
                }
                None => by_name.push((name.clone(), h.clone())),
            }
        }
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = by_name;
    }

    /// Copies the series into `slot` when they changed (at the worker's sweep tick).
    pub fn publish(&self, slot: &Published) {
        if !self.dirty.replace(false) {
            return;
        }
        let copy = self.series.borrow().clone();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = copy;
    }
}

/// Observes one HTTP request.
pub fn observe_request(
    s: &mut Series,
    duration: Duration,
    request_bytes: u64,
    response_bytes: u64,
) {
    s.requests += 1;
    s.duration
        .observe(&DURATION_BUCKETS_MS, duration.as_secs_f64() * 1000.0);
    s.request_bytes.observe(&SIZE_BUCKETS, request_bytes as f64);
    s.response_bytes
        .observe(&SIZE_BUCKETS, response_bytes as f64);
}

/// Writes every worker's published series, merged by label set, in Prometheus text format.
pub fn write(slots: &[Published], out: &mut String) {
    let mut merged: std::collections::BTreeMap<Arc<str>, Series> = Default::default();
    for slot in slots {
        for (labels, s) in slot.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            merged.entry(labels.clone()).or_default().merge(s);
        }
    }
    let http: Vec<_> = merged.iter().filter(|(_, s)| s.requests > 0).collect();
    let tcp: Vec<_> = merged.iter().filter(|(_, s)| s.tcp_opened > 0).collect();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(
        out,
        "istio_requests_total",
        "counter",
        "Requests, as Istio's sidecars count them.",
    );
    for (l, s) in &http {
        let _ = writeln!(out, "istio_requests_total{{{l}}} {}", s.requests);
    }
    header(
        out,
        "istio_request_duration_milliseconds",
        "histogram",
        "Request durations in milliseconds.",
    );
    for (l, s) in &http {
        s.duration.write(
            out,
            "istio_request_duration_milliseconds",
            l,
            &DURATION_BUCKETS_MS,
        );
    }
    header(
        out,
        "istio_request_bytes",
        "histogram",
        "Request body sizes in bytes.",
    );
    for (l, s) in &http {
        s.request_bytes
            .write(out, "istio_request_bytes", l, &SIZE_BUCKETS);
    }
    header(
        out,
        "istio_response_bytes",
        "histogram",
        "Response body sizes in bytes.",
    );
    for (l, s) in &http {
        s.response_bytes
            .write(out, "istio_response_bytes", l, &SIZE_BUCKETS);
    }
    let tcp_metrics: [(&str, &str, SeriesField); 4] = [
        (
            "istio_tcp_connections_opened_total",
            "TCP connections opened.",
            |s| s.tcp_opened,
        ),
        (
            "istio_tcp_connections_closed_total",
            "TCP connections closed.",
            |s| s.tcp_closed,
        ),
        (
            "istio_tcp_sent_bytes_total",
            "Bytes sent to the client of a TCP connection.",
            |s| s.tcp_sent,
        ),
        (
            "istio_tcp_received_bytes_total",
            "Bytes received from the client of a TCP connection.",
            |s| s.tcp_received,
        ),
    ];
    for (name, help, f) in tcp_metrics {
        header(out, name, "counter", help);
        for (l, s) in &tcp {
            let _ = writeln!(out, "{name}{{{l}}} {}", f(s));
        }
    }
}

/// Istio's label set for one series, formatted as `k="v",…`.
pub struct Labels<'a> {
    pub inbound: bool,
    pub workload: &'a str,
    pub namespace: &'a str,
    pub app: &'a str,
    pub version: &'a str,
    /// Our SPIFFE id.
    pub own_principal: Option<&'a str>,
    /// The client's SPIFFE id (inbound mTLS).
    pub peer_principal: Option<&'a str>,
    /// The destination service host (outbound), e.g. `reviews.default.svc.cluster.local`.
    pub service: Option<&'a str>,
    pub protocol: &'a str,
    pub code: u16,
    pub flags: &'a str,
    pub grpc_status: Option<u16>,
    pub mtls: bool,
}

impl Labels<'_> {
    pub fn format(&self) -> String {
        let unknown = "unknown";
        let peer_ns = self
            .peer_principal
            .and_then(|p| p.split("/ns/").nth(1))
            .and_then(|rest| rest.split('/').next())
            .unwrap_or(unknown);
        let (service, service_name, service_ns) = match self.service {
            Some(host) => {
                let mut parts = host.split('.');
                let name = parts.next().unwrap_or(unknown);
                let ns = if host.ends_with(".svc.cluster.local") {
                    parts.next().unwrap_or(unknown)
                } else {
                    unknown
                };
                (host, name, ns)
            }
            None => (unknown, unknown, unknown),
        };
        let own = self.own_principal.unwrap_or(unknown);
        let (reporter, src_wl, src_ns, src_principal, src_app, src_ver) = if self.inbound {
            (
                "destination",
                unknown,
                peer_ns,
                self.peer_principal.unwrap_or(unknown),
                unknown,
                unknown,
            )
        } else {
            (
                "source",
                self.workload,
                self.namespace,
                own,
                self.app,
                self.version,
            )
        };
        let (dst_wl, dst_ns, dst_principal, dst_app, dst_ver) = if self.inbound {
            (self.workload, self.namespace, own, self.app, self.version)
        } else {
            (unknown, service_ns, unknown, unknown, unknown)
        };
        let security = match (self.inbound, self.mtls) {
            (true, true) => "mutual_tls",
            (true, false) => "none",
            (false, _) => unknown,
        };
        let grpc = self.grpc_status.map(|g| g.to_string()).unwrap_or_default();
        let pairs = [
            ("reporter", reporter),
            ("source_workload", src_wl),
            ("source_workload_namespace", src_ns),
            ("source_principal", src_principal),
            ("source_app", src_app),
            ("source_version", src_ver),
            ("source_cluster", unknown),
            ("destination_workload", dst_wl),
            ("destination_workload_namespace", dst_ns),
            ("destination_principal", dst_principal),
            ("destination_app", dst_app),
            ("destination_version", dst_ver),
            ("destination_service", service),
            ("destination_service_name", service_name),
            ("destination_service_namespace", service_ns),
            ("destination_cluster", unknown),
            ("request_protocol", self.protocol),
            ("response_flags", self.flags),
            ("connection_security_policy", security),
        ];
        let mut out = String::with_capacity(700);
        for (k, v) in pairs {
            let _ = write!(out, "{k}=\"{}\",", escape(v));
        }
        if self.protocol != "tcp" {
            let _ = write!(
                out,
                "response_code=\"{}\",grpc_response_status=\"{grpc}\"",
                self.code
            );
        } else {
            out.pop();
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per listener name, the request-duration percentiles over all workers (µs), for `/stats`.
pub fn latency_json(slots: &[PublishedLatency]) -> serde_json::Map<String, serde_json::Value> {
    let mut merged: Vec<(Arc<str>, Latency)> = Vec::new();
    for slot in slots {
        for (name, h) in slot.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            match merged.iter_mut().find(|(n, _)| n == name) {
                Some((_, into)) => {
                    let _ = into.add(h);
                }
                None => merged.push((name.clone(), h.clone())),
            }
        }
    }
    merged
        .into_iter()
        .map(|(name, h)| {
            let v = serde_json::json!({
                "count": h.len(),
                "p50": h.value_at_quantile(0.5),
                "p90": h.value_at_quantile(0.9),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
            });
            (name.to_string(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_merge() {
        let mut a = Series::default();
        observe_request(&mut a, Duration::from_millis(3), 0, 2000);
        let mut b = Series::default();
        observe_request(&mut b, Duration::from_secs(4000), 10, 5);
        a.merge(&b);
        let mut out = String::new();
        a.duration
            .write(&mut out, "d", "x=\"1\"", &DURATION_BUCKETS_MS);
        assert!(out.contains("d_bucket{x=\"1\",le=\"1\"} 0\n"), "{out}");
        assert!(out.contains("d_bucket{x=\"1\",le=\"5\"} 1\n"), "{out}");
        assert!(
            out.contains("d_bucket{x=\"1\",le=\"3600000\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("d_bucket{x=\"1\",le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("d_count{x=\"1\"} 2\n"), "{out}");
    }

    #[test]
    fn labels_for_outbound_and_inbound() {
        let l = Labels {
            inbound: false,
            workload: "productpage-v1",
            namespace: "default",
            app: "productpage",
            version: "v1",
            own_principal: Some("spiffe://cluster.local/ns/default/sa/productpage"),
            peer_principal: None,
            service: Some("reviews.default.svc.cluster.local"),
            protocol: "http",
            code: 200,
            flags: "-",
            grpc_status: None,
            mtls: false,
        }
        .format();
        assert!(
            l.starts_with("reporter=\"source\",source_workload=\"productpage-v1\""),
            "{l}"
        );
        assert!(
            l.contains(
                "destination_service_name=\"reviews\",destination_service_namespace=\"default\""
            ),
            "{l}"
        );
        assert!(
            l.ends_with("response_code=\"200\",grpc_response_status=\"\""),
            "{l}"
        );
    }
}
