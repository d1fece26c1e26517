//! Distributed tracing: the caller's trace context read from W3C `traceparent` or B3 (`b3`,
//! `x-b3-*`), a span for each HTTP exchange (SERVER on inbound listeners, CLIENT on outbound),
//! the context passed upstream in both formats with this span as the parent, and sampled spans
//! exported in batches by one thread — Zipkin v2 JSON and OTLP/HTTP JSON — so that the workers
//! never wait on a collector, and an unreachable one costs a counter. A worker queues its spans
//! and hands them over in batches (when 256 are queued, and at every idle tick), so the exporter
//! is woken a few times a second, not once per request.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_config::Tracing;

use crate::http::headers::Headers;

/// What the caller sent: its trace, its span (our parent) and its sampling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    pub trace_id: u128,
    pub parent_id: Option<u64>,
    pub sampled: Option<bool>,
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    if s.is_empty() || s.len() > 32 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex_u128(s).map(|v| v as u64).filter(|v| *v != 0)
}

/// The incoming context, W3C first, then B3 single, then B3 multi; None when the request has
/// none (or only malformed ones, which are ignored as the W3C spec asks).
pub fn extract(headers: &Headers) -> Option<Context> {
    if let Some(tp) = headers.get(b"traceparent") {
        let parts: Vec<&[u8]> = tp.split(|b| *b == b'-').collect();
        if let [version, trace, span, flags, ..] = parts[..] {
            let ok =
                version.len() == 2 && version != b"ff" && trace.len() == 32 && flags.len() == 2;
            let trace = hex_u128(trace).filter(|t| *t != 0);
            let span = hex_u64(span);
            let flags = std::str::from_utf8(flags)
                .ok()
                .and_then(|f| u8::from_str_radix(f, 16).ok());
            if let (true, Some(trace_id), Some(span), Some(flags)) = (ok, trace, span, flags) {
                return Some(Context {
                    trace_id,
                    parent_id: Some(span),
                    sampled: Some(flags & 1 == 1),
                });
            }
        }
    }
    if let Some(b3) = headers.get(b"b3") {
        let parts: Vec<&[u8]> = b3.split(|b| *b == b'-').collect();
        match parts[..] {
            [only] if only.len() == 1 => {
                // Sampling decision alone: `0`, `1`, `d`.
                return Some(Context {
                    trace_id: 0,
                    parent_id: None,
                    sampled: Some(only != b"0"),
                });
            }
            [trace, span, ref rest @ ..] => {
                if let (Some(trace_id), Some(span)) = (hex_u128(trace), hex_u64(span)) {
                    let sampled = rest.first().map(|s| *s != b"0");
                    return Some(Context {
                        trace_id,
                        parent_id: Some(span),
                        sampled,
                    });
                }
            }
            _ => {}
        }
    }
    let sampled = match (headers.get(b"x-b3-flags"), headers.get(b"x-b3-sampled")) {
        (Some(b"1"), _) => Some(true),
        (_, Some(s)) => Some(s == b"1" || s.eq_ignore_ascii_case(b"true")),
        _ => None,
    };
    let trace = headers.get(b"x-b3-traceid").and_then(hex_u128);
    let span = headers.get(b"x-b3-spanid").and_then(hex_u64);
    match (trace, span) {
        (Some(trace_id), Some(span)) if trace_id != 0 => Some(Context {
            trace_id,
            parent_id: Some(span),
            sampled,
        }),
        _ => sampled.map(|s| Context {
            trace_id: 0,
            parent_id: None,
            sampled: Some(s),
        }),
    }
}

/// This hop's span while the exchange runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub sampled: bool,
    pub start: SystemTime,
}

impl Span {
    /// The span for a request: the caller's trace (or a new one), a new id, the caller's
    /// sampling decision (or one drawn at `tracing`'s rate).
    pub fn start(ctx: Option<Context>, tracing: &Tracing, rng: &mut keel_lb::Rng) -> Span {
        let ctx = ctx.unwrap_or_default();
        let trace_id = match ctx.trace_id {
            0 => (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())).max(1),
            t => t,
        };
        let sampled = ctx
            .sampled
            .unwrap_or_else(|| tracing.sampling.hit(rng.next_u64()));
        Span {
            trace_id,
            span_id: rng.next_u64().max(1),
            parent_id: ctx.parent_id,
            sampled,
            start: SystemTime::now(),
        }
    }

    /// Passes the context upstream with this span as the parent, in W3C and B3 forms (whichever
    /// the next hop reads); `tracestate` and `x-request-id` travel as they came.
    pub fn inject(&self, headers: &mut Headers) {
        let flag = if self.sampled { "01" } else { "00" };
        let tp = format!("00-{:032x}-{:016x}-{flag}", self.trace_id, self.span_id);
        headers.set(b"traceparent", tp.as_bytes());
        headers.remove(b"b3");
        headers.set(
            b"x-b3-traceid",
            format!("{:032x}", self.trace_id).as_bytes(),
        );
        headers.set(b"x-b3-spanid", format!("{:016x}", self.span_id).as_bytes());
        match self.parent_id {
            Some(p) => headers.set(b"x-b3-parentspanid", format!("{p:016x}").as_bytes()),
            None => {
                headers.remove(b"x-b3-parentspanid");
            }
        }
        headers.set(b"x-b3-sampled", if self.sampled { b"1" } else { b"0" });
        headers.remove(b"x-b3-flags");
    }
}

/// What every span of this workload says about it, made once per config generation.
#[derive(Debug, Clone)]
pub struct Source {
    /// Where its spans go (the generation's `telemetry.tracing`), shared, not copied per span.
    pub tracing: Option<std::sync::Arc<Tracing>>,
    /// `<app>.<namespace>`: the span's service.
    pub service: String,
    pub app: String,
    pub namespace: String,
    pub node_id: String,
}

impl Source {
    pub fn of(p: &keel_config::ProxySettings) -> Source {
        let app = p
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| p.name.clone());
        Source {
            tracing: p.tracing.clone().map(std::sync::Arc::new),
            service: format!("{app}.{}", p.namespace),
            node_id: format!("sidecar~{}.{}", p.name, p.namespace),
            app,
            namespace: p.namespace.clone(),
        }
    }
}

/// A finished span: its record's fields, moved (not copied) from the request's record; the tags
/// are formatted on the exporter thread, not the worker.
#[derive(Debug, Clone)]
pub struct Finished {
    pub span: Span,
    /// SERVER (an inbound listener) or CLIENT (outbound).
    pub inbound: bool,
    pub duration: Duration,
    pub method: String,
    pub scheme: &'static str,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    pub flags: crate::http::proxy::Flags,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_cluster: Option<String>,
    pub request_id: Option<String>,
    pub user_agent: Option<String>,
    pub downstream: Option<std::net::SocketAddr>,
    /// The other end: the client (inbound) or the upstream (outbound).
    pub peer: Option<std::net::SocketAddr>,
    /// The listener's port (in the span's name).
    pub port: u16,
    pub source: std::sync::Arc<Source>,
}

impl Finished {
    /// Istio's operation name: `<host>:<port>/*`.
    fn name(&self) -> String {
        format!(
            "{}:{}/*",
            keel_config::host::strip_port(&self.authority),
            self.port
        )
    }

    fn error(&self) -> bool {
        self.status >= 500 || self.status == 0
    }

    /// Envoy's and Istio's tags.
    fn tags(&self) -> Vec<(&'static str, String)> {
        let dash = || "-".to_string();
        let src = &self.source;
        vec![
            ("component", "proxy".into()),
            ("node_id", src.node_id.clone()),
            ("istio.canonical_service", src.app.clone()),
            ("istio.namespace", src.namespace.clone()),
            ("istio.mesh_id", "cluster.local".into()),
            ("http.method", self.method.clone()),
            (
                "http.url",
                format!("{}://{}{}", self.scheme, self.authority, self.path),
            ),
            ("http.protocol", self.protocol.into()),
            ("http.status_code", self.status.to_string()),
            ("response_flags", self.flags.to_string()),
            ("request_size", self.bytes_received.to_string()),
            ("response_size", self.bytes_sent.to_string()),
            (
                "upstream_cluster",
                self.upstream_cluster.clone().unwrap_or_else(dash),
            ),
            (
                "upstream_cluster.name",
                self.upstream_cluster.clone().unwrap_or_else(dash),
            ),
            (
                "guid:x-request-id",
                self.request_id.clone().unwrap_or_else(dash),
            ),
            ("user_agent", self.user_agent.clone().unwrap_or_else(dash)),
            (
                "peer.address",
                self.downstream.map_or_else(dash, |a| a.ip().to_string()),
            ),
        ]
    }
}

/// Spans exported, dropped (queue full or collector failing) and failed export requests.
#[derive(Debug, Default)]
pub struct Counters {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub export_failures: AtomicU64,
}

/// Counted by the exporter; exported as `keel_tracing_*` metrics.
pub static COUNTERS: Counters = Counters {
    exported: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    export_failures: AtomicU64::new(0),
};

/// Batches queued at most before new ones are dropped.
const QUEUE: usize = 256;
/// A worker hands its spans over in batches of at most this many, and at every idle tick.
const BATCH: usize = 256;

type Batch = Vec<Finished>;

fn exporter() -> &'static Mutex<Option<SyncSender<Batch>>> {
    static E: OnceLock<Mutex<Option<SyncSender<Batch>>>> = OnceLock::new();
    E.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("keel-trace-export".into())
            .spawn(move || export_loop(rx));
        Mutex::new(spawned.ok().map(|_| tx))
    })
}

thread_local! {
    static SENDER: std::cell::RefCell<Option<SyncSender<Batch>>> = const { std::cell::RefCell::new(None) };
    /// This worker's spans not handed over yet: waking the exporter once per span would cost a
    /// context switch per request, so they go in batches (as the access log's lines do).
    static PENDING: std::cell::RefCell<Batch> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Queues a finished, sampled span for the exporter thread; never blocks.
pub fn submit(span: Finished) {
    let full = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.push(span);
        p.len() >= BATCH
    });
    if full {
        flush();
    }
}

/// Hands this worker's queued spans to the exporter (at every idle tick, and when a batch is
/// full); a full queue drops them, counted.
pub fn flush() {
    let batch = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if batch.is_empty() {
        return;
    }
    SENDER.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            *s = exporter().lock().unwrap_or_else(|e| e.into_inner()).clone();
        }
        let n = batch.len() as u64;
        let Some(tx) = s.as_ref() else {
            COUNTERS.dropped.fetch_add(n, Relaxed);
            return;
        };
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                COUNTERS.dropped.fetch_add(n, Relaxed);
            }
        }
    });
}

fn export_loop(rx: Receiver<Batch>) {
    while let Ok(mut rest) = rx.recv() {
        // Spans of one config go to its collectors; a reload in between splits the batch.
        while let Some(first) = rest.first() {
            let Some(tracing) = first.source.tracing.clone() else {
                rest.remove(0);
                continue;
            };
            let (same, other): (Vec<_>, Vec<_>) = rest
                .into_iter()
                .partition(|s| s.source.tracing.as_deref() == Some(&*tracing));
            send_batch(&same, &tracing);
            rest = other;
        }
    }
}

fn send_batch(spans: &[Finished], tracing: &Tracing) {
    let mut ok = true;
    if let Some((addr, path)) = &tracing.zipkin {
        ok &= post(addr, path, || zipkin_json(spans)).is_ok();
    }
    if let Some((addr, path)) = &tracing.otlp {
        ok &= post(addr, path, || otlp_json(spans)).is_ok();
    }
    if ok {
        COUNTERS.exported.fetch_add(spans.len() as u64, Relaxed);
    } else {
        COUNTERS.export_failures.fetch_add(1, Relaxed);
        COUNTERS.dropped.fetch_add(spans.len() as u64, Relaxed);
    }
}

/// POSTs a JSON body to `http://addr path`; Ok on a 2xx. The body is only made once connected
/// (a collector that is down costs a failed connect, not a serialization).
fn post(addr: &str, path: &str, body: impl FnOnce() -> String) -> Result<(), String> {
    let timeout = Duration::from_secs(2);
    let target = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body.as_bytes()))
        .map_err(|e| e.to_string())?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status).map_err(|e| e.to_string())?;
    match &status[9..10] {
        b"2" => Ok(()),
        _ => Err(format!(
            "status {}",
            String::from_utf8_lossy(&status[9..12])
        )),
    }
}

fn micros(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Zipkin v2 (`POST /api/v2/spans`): a JSON array of spans.
pub fn zipkin_json(spans: &[Finished]) -> String {
    let items: Vec<serde_json::Value> = spans
        .iter()
        .map(|f| {
            let mut tags: serde_json::Map<String, serde_json::Value> = f
                .tags()
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect();
            if f.error() {
                tags.insert("error".into(), "true".into());
            }
            let mut span = serde_json::json!({
                "traceId": format!("{:032x}", f.span.trace_id),
                "id": format!("{:016x}", f.span.span_id),
                "name": f.name(),
                "kind": if f.inbound { "SERVER" } else { "CLIENT" },
                "timestamp": micros(f.span.start) as u64,
                "duration": (f.duration.as_micros() as u64).max(1),
                "localEndpoint": { "serviceName": f.source.service },
                "tags": tags,
            });
            if let Some(p) = f.span.parent_id {
                span["parentId"] = format!("{p:016x}").into();
            }
            if let Some(peer) = f.peer {
                let key = if peer.is_ipv4() { "ipv4" } else { "ipv6" };
                span["remoteEndpoint"] =
                    serde_json::json!({ key: peer.ip().to_string(), "port": peer.port() });
            }
            span
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// OTLP/HTTP with the JSON encoding (`POST /v1/traces`): ids as hex, times as nanosecond strings.
pub fn otlp_json(spans: &[Finished]) -> String {
    let service = spans.first().map_or("keel", |f| f.source.service.as_str());
    let items: Vec<serde_json::Value> = spans
        .iter()
        .map(|f| {
            let start = f
                .span
                .start
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let end = start + f.duration.as_nanos();
            let attributes: Vec<serde_json::Value> = f
                .tags()
                .into_iter()
                .map(|(k, v)| serde_json::json!({ "key": k, "value": { "stringValue": v } }))
                .collect();
            let mut span = serde_json::json!({
                "traceId": format!("{:032x}", f.span.trace_id),
                "spanId": format!("{:016x}", f.span.span_id),
                "name": f.name(),
                "kind": if f.inbound { 2 } else { 3 },
                "startTimeUnixNano": start.to_string(),
                "endTimeUnixNano": end.to_string(),
                "attributes": attributes,
                "status": { "code": if f.error() { 2 } else { 0 } },
            });
            if let Some(p) = f.span.parent_id {
                span["parentSpanId"] = format!("{p:016x}").into();
            }
            span
        })
        .collect();
    format!(
        "{{\"resourceSpans\":[{{\"resource\":{{\"attributes\":[{{\"key\":\"service.name\",\"value\":{{\"stringValue\":{}}}}}]}},\"scopeSpans\":[{{\"scope\":{{\"name\":\"keel\"}},\"spans\":{}}}]}}]}}",
        json_str(service),
        serde_json::Value::Array(items)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut h = Headers::default();
        for (k, v) in pairs {
            h.push(k.as_bytes(), v.as_bytes());
        }
        h
    }

    #[test]
    fn w3c_and_b3_contexts() {
        // W3C Trace Context's example.
        let c = extract(&headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]))
        .unwrap();
        assert_eq!(c.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(c.parent_id, Some(0xb7ad6b7169203331));
        assert_eq!(c.sampled, Some(true));
        // Invalid ones are ignored: all-zero trace, version ff, short span.
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71-01",
            "garbage",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
        // B3 single and multi (64-bit trace ids too).
        let c = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(
            (c.parent_id, c.sampled),
            (Some(0xe457b5a2e4d86bd1), Some(true))
        );
        assert_eq!(
            extract(&headers(&[("b3", "0")])).unwrap().sampled,
            Some(false)
        );
        let c = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]))
        .unwrap();
        assert_eq!(c.trace_id, 0x463ac35c9f6413ad);
        assert_eq!(c.sampled, Some(false));
        assert_eq!(extract(&headers(&[])), None);
    }

    #[test]
    fn inject_both_formats() {
        let span = Span {
            trace_id: 0xabc,
            span_id: 0x1234,
            parent_id: Some(0x99),
            sampled: true,
            start: UNIX_EPOCH,
        };
        let mut h = headers(&[("b3", "x"), ("x-b3-flags", "1")]);
        span.inject(&mut h);
        assert_eq!(
            h.get(b"traceparent").unwrap(),
            b"00-00000000000000000000000000000abc-0000000000001234-01"
        );
        assert_eq!(h.get(b"x-b3-spanid").unwrap(), b"0000000000001234");
        assert_eq!(h.get(b"x-b3-parentspanid").unwrap(), b"0000000000000099");
        assert_eq!(h.get(b"x-b3-sampled").unwrap(), b"1");
        assert!(h.get(b"b3").is_none() && h.get(b"x-b3-flags").is_none());
    }
}
