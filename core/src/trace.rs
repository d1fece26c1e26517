//! Distributed tracing: the caller's trace context read from W3C `traceparent` or B3 (`b3`,
//! `x-b3-*`), a span for each HTTP exchange (SERVER on inbound listeners, CLIENT on outbound),
//! the context passed upstream in both formats with this span as the parent, and sampled spans
//! exported in batches by one thread — Zipkin v2 JSON and OTLP/HTTP JSON — so that the workers
//! never wait on a collector, and an unreachable one costs a counter. A worker queues its spans
//! and hands them over in batches (when 1024 are queued, and at every idle tick), so the exporter
//! is woken a few times a second, not once per request.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender};
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
    /// the next hop reads); `tracestate` and `x-request-id` travel as they came. The ids are
    /// written as hex into stack buffers: a traced request allocates nothing here.
    pub fn inject(&self, headers: &mut Headers) {
        // traceparent, x-b3-traceid, -spanid, -parentspanid and -sampled, names included.
        headers.reserve(200, 5);
        let mut trace = [0u8; 32];
        let mut span = [0u8; 16];
        hex_into(&mut trace, self.trace_id);
        hex_into(&mut span, u128::from(self.span_id));
        // 00-<trace>-<span>-<flags>
        let mut tp = [0u8; 55];
        tp[..3].copy_from_slice(b"00-");
        tp[3..35].copy_from_slice(&trace);
        tp[35] = b'-';
        tp[36..52].copy_from_slice(&span);
        tp[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        headers.set(b"traceparent", &tp);
        headers.remove(b"b3");
        headers.set(b"x-b3-traceid", &trace);
        headers.set(b"x-b3-spanid", &span);
        match self.parent_id {
            Some(p) => {
                let mut parent = [0u8; 16];
                hex_into(&mut parent, u128::from(p));
                headers.set(b"x-b3-parentspanid", &parent);
            }
            None => {
                headers.remove(b"x-b3-parentspanid");
            }
        }
        headers.set(b"x-b3-sampled", if self.sampled { b"1" } else { b"0" });
        headers.remove(b"x-b3-flags");
    }
}

/// Writes the low `out.len() * 4` bits of `v` as lower-case hex, zero-padded, into `out`.
fn hex_into(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
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
    /// The generation's snapshot, whose names (clusters) spans refer to by index rather than
    /// copy per request.
    pub snapshot: Option<std::sync::Arc<keel_config::Snapshot>>,
    /// The tags every span of the generation has (component, node, canonical service,
    /// namespace, mesh), written as Zipkin tag members and as OTLP attributes once, not per span.
    zipkin_tags: String,
    otlp_attributes: String,
}

impl Source {
    pub fn of(p: &keel_config::ProxySettings) -> Source {
        let app = p
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| p.name.clone());
        let node_id = format!("sidecar~{}.{}", p.name, p.namespace);
        let fixed = [
            ("component", "proxy"),
            ("node_id", node_id.as_str()),
            ("istio.canonical_service", app.as_str()),
            ("istio.namespace", p.namespace.as_str()),
            ("istio.mesh_id", "cluster.local"),
        ];
        let (mut zipkin_tags, mut otlp_attributes) = (String::new(), String::new());
        for (i, (k, v)) in fixed.iter().enumerate() {
            if i > 0 {
                zipkin_tags.push(',');
                otlp_attributes.push(',');
            }
            push_json_str(&mut zipkin_tags, k);
            zipkin_tags.push(':');
            push_json_str(&mut zipkin_tags, v);
            otlp_attributes.push_str("{\"key\":");
            push_json_str(&mut otlp_attributes, k);
            otlp_attributes.push_str(",\"value\":{\"stringValue\":");
            push_json_str(&mut otlp_attributes, v);
            otlp_attributes.push_str("}}");
        }
        Source {
            tracing: p.tracing.clone().map(std::sync::Arc::new),
            service: format!("{app}.{}", p.namespace),
            node_id,
            app,
            namespace: p.namespace.clone(),
            snapshot: None,
            zipkin_tags,
            otlp_attributes,
        }
    }

    /// [`Source::of`] the snapshot's Proxy, keeping the snapshot for the names spans refer to.
    pub fn of_snapshot(snapshot: &std::sync::Arc<keel_config::Snapshot>) -> Source {
        Source {
            snapshot: Some(snapshot.clone()),
            ..Source::of(&snapshot.proxy)
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
    /// Index of the upstream cluster in the span's snapshot (its name is a tag).
    pub cluster: Option<usize>,
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
    fn error(&self) -> bool {
        self.status >= 500 || self.status == 0
    }

    /// Envoy's and Istio's tags of this request (those of the workload are the source's), each
    /// handed to `tag` as its name and the JSON string of its value, written straight into the
    /// body (no string is made per tag).
    fn tags(&self, mut tag: impl FnMut(&str, &dyn Fn(&mut String))) {
        let src = &self.source;
        tag("http.method", &text(&self.method));
        tag("http.url", &|out: &mut String| {
            out.push('"');
            push_json_inner(out, self.scheme);
            out.push_str("://");
            push_json_inner(out, &self.authority);
            push_json_inner(out, &self.path);
            out.push('"');
        });
        tag("http.protocol", &text(self.protocol));
        let display = |v: &dyn std::fmt::Display, out: &mut String| {
            use std::fmt::Write;
            out.push('"');
            let _ = write!(out, "{v}");
            out.push('"');
        };
        tag("http.status_code", &|out: &mut String| {
            display(&self.status, out)
        });
        tag("response_flags", &|out: &mut String| {
            display(&self.flags, out)
        });
        tag("request_size", &|out: &mut String| {
            display(&self.bytes_received, out)
        });
        tag("response_size", &|out: &mut String| {
            display(&self.bytes_sent, out)
        });
        let cluster = self
            .cluster
            .and_then(|c| src.snapshot.as_ref()?.clusters.get(c))
            .map_or("-", |c| c.name.as_str());
        tag("upstream_cluster", &text(cluster));
        tag("upstream_cluster.name", &text(cluster));
        tag(
            "guid:x-request-id",
            &text(self.request_id.as_deref().unwrap_or("-")),
        );
        tag(
            "user_agent",
            &text(self.user_agent.as_deref().unwrap_or("-")),
        );
        tag("peer.address", &|out: &mut String| match self.downstream {
            Some(a) => display(&a.ip(), out),
            None => out.push_str("\"-\""),
        });
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
const BATCH: usize = 1024;

/// A worker's spans, and where to send them back once exported: the worker frees them itself.
/// Memory freed by another thread goes back to the allocating thread's arena under its lock and
/// bypasses its thread cache, which cost the worker more in malloc than the spans' own making.
struct Batch {
    spans: Vec<Finished>,
    back: SyncSender<Vec<Finished>>,
}

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

/// A worker's line to the exporter, and the way its batches come back.
struct Line {
    to: SyncSender<Batch>,
    back: SyncSender<Vec<Finished>>,
    returned: Receiver<Vec<Finished>>,
}

thread_local! {
    static LINE: std::cell::RefCell<Option<Line>> = const { std::cell::RefCell::new(None) };
    /// This worker's spans not handed over yet: waking the exporter once per span would cost a
    /// context switch per request, so they go in batches (as the access log's lines do).
    static PENDING: std::cell::RefCell<Vec<Finished>> = const { std::cell::RefCell::new(Vec::new()) };
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
/// full), and frees those it has sent back; a full queue drops them, counted.
pub fn flush() {
    LINE.with(|l| {
        let mut l = l.borrow_mut();
        // Exported batches come back to be freed here; one keeps its capacity for the next.
        let mut spare = None;
        if let Some(line) = l.as_ref() {
            while let Ok(mut done) = line.returned.try_recv() {
                done.clear();
                spare = Some(done);
            }
        }
        let batch = PENDING.with(|p| {
            let mut p = p.borrow_mut();
            if p.is_empty() {
                if let (Some(s), true) = (spare.take(), p.capacity() == 0) {
                    *p = s;
                }
                return Vec::new();
            }
            std::mem::replace(&mut *p, spare.take().unwrap_or_default())
        });
        if batch.is_empty() {
            return;
        }
        if l.is_none() {
            let to = exporter().lock().unwrap_or_else(|e| e.into_inner()).clone();
            *l = to.map(|to| {
                let (back, returned) = mpsc::sync_channel(QUEUE);
                Line { to, back, returned }
            });
        }
        let n = batch.len() as u64;
        let Some(line) = l.as_ref() else {
            COUNTERS.dropped.fetch_add(n, Relaxed);
            return;
        };
        let sent = line.to.try_send(Batch {
            spans: batch,
            back: line.back.clone(),
        });
        if sent.is_err() {
            COUNTERS.dropped.fetch_add(n, Relaxed);
        }
    });
}

fn export_loop(rx: Receiver<Batch>) {
    while let Ok(batch) = rx.recv() {
        // Spans of one config go to its collectors; a reload in between splits the batch into
        // runs, each sent to its own generation's collectors.
        let spans = &batch.spans;
        let mut start = 0;
        while start < spans.len() {
            let tracing = spans[start].source.tracing.clone();
            let end = spans[start..]
                .iter()
                .position(|s| s.source.tracing.as_deref() != tracing.as_deref())
                .map_or(spans.len(), |n| start + n);
            if let Some(t) = &tracing {
                send_batch(&spans[start..end], t);
            }
            start = end;
        }
        // Back to the worker that made them (if it is gone, they are freed here).
        let Batch { spans, back } = batch;
        let _ = back.try_send(spans);
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

/// A tag value that is a plain string.
fn text(v: &str) -> impl Fn(&mut String) + '_ {
    move |out: &mut String| push_json_str(out, v)
}

/// Appends `s` as a JSON string (quoted, escaped).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    push_json_inner(out, s);
    out.push('"');
}

/// Appends `s` escaped for the inside of a JSON string (RFC 8259 §7). The characters that need
/// it are all ASCII, so the scan is by byte, and runs without any are copied whole.
fn push_json_inner(out: &mut String, s: &str) {
    use std::fmt::Write;
    let bytes = s.as_bytes();
    // Most values need no escaping: one pass without early exit (which vectorizes), one copy.
    let special = bytes.iter().fold(false, |any, &b| {
        any | (b == b'"') | (b == b'\\') | (b < 0x20)
    });
    if !special {
        out.push_str(s);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// Appends the 16 or 32 hex digits of an id, quoted.
fn push_hex_id(out: &mut String, v: u128, digits: usize) {
    let mut buf = [0u8; 32];
    hex_into(&mut buf[..digits], v);
    out.push('"');
    // Hex digits are ASCII.
    out.push_str(std::str::from_utf8(&buf[..digits]).unwrap_or_default());
    out.push('"');
}

/// Zipkin v2 (`POST /api/v2/spans`): a JSON array of spans, written straight into one string.
pub fn zipkin_json(spans: &[Finished]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(spans.len() * 900);
    out.push('[');
    for (n, f) in spans.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str("{\"traceId\":");
        push_hex_id(&mut out, f.span.trace_id, 32);
        out.push_str(",\"id\":");
        push_hex_id(&mut out, u128::from(f.span.span_id), 16);
        if let Some(p) = f.span.parent_id {
            out.push_str(",\"parentId\":");
            push_hex_id(&mut out, u128::from(p), 16);
        }
        // Istio's operation name: `<host>:<port>/*`.
        out.push_str(",\"name\":\"");
        push_json_inner(&mut out, keel_config::host::strip_port(&f.authority));
        let _ = write!(out, ":{}/*\"", f.port);
        out.push_str(if f.inbound {
            ",\"kind\":\"SERVER\""
        } else {
            ",\"kind\":\"CLIENT\""
        });
        let _ = write!(
            out,
            ",\"timestamp\":{},\"duration\":{}",
            micros(f.span.start) as u64,
            (f.duration.as_micros() as u64).max(1)
        );
        out.push_str(",\"localEndpoint\":{\"serviceName\":");
        push_json_str(&mut out, &f.source.service);
        out.push('}');
        if let Some(peer) = f.peer {
            let key = if peer.is_ipv4() { "ipv4" } else { "ipv6" };
            let _ = write!(
                out,
                ",\"remoteEndpoint\":{{\"{key}\":\"{}\",\"port\":{}}}",
                peer.ip(),
                peer.port()
            );
        }
        out.push_str(",\"tags\":{");
        out.push_str(&f.source.zipkin_tags);
        f.tags(|k, v| {
            out.push(',');
            // Tag names are this file's own constants: nothing in them needs escaping.
            out.push('"');
            out.push_str(k);
            out.push('"');
            out.push(':');
            v(&mut out);
        });
        if f.error() {
            out.push_str(",\"error\":\"true\"");
        }
        out.push_str("}}");
    }
    out.push(']');
    out
}

/// OTLP/HTTP with the JSON encoding (`POST /v1/traces`): ids as hex, times as nanosecond strings.
pub fn otlp_json(spans: &[Finished]) -> String {
    use std::fmt::Write;
    let service = spans.first().map_or("keel", |f| f.source.service.as_str());
    let mut out = String::with_capacity(spans.len() * 1200 + 200);
    out.push_str("{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\",\"value\":{\"stringValue\":");
    push_json_str(&mut out, service);
    out.push_str("}}]},\"scopeSpans\":[{\"scope\":{\"name\":\"keel\"},\"spans\":[");
    for (n, f) in spans.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let start = f
            .span
            .start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let end = start + f.duration.as_nanos();
        out.push_str("{\"traceId\":");
        push_hex_id(&mut out, f.span.trace_id, 32);
        out.push_str(",\"spanId\":");
        push_hex_id(&mut out, u128::from(f.span.span_id), 16);
        if let Some(p) = f.span.parent_id {
            out.push_str(",\"parentSpanId\":");
            push_hex_id(&mut out, u128::from(p), 16);
        }
        out.push_str(",\"name\":\"");
        push_json_inner(&mut out, keel_config::host::strip_port(&f.authority));
        let _ = write!(
            out,
            ":{}/*\",\"kind\":{},\"startTimeUnixNano\":\"{start}\",\"endTimeUnixNano\":\"{end}\",\"attributes\":[",
            f.port,
            if f.inbound { 2 } else { 3 }
        );
        out.push_str(&f.source.otlp_attributes);
        f.tags(|k, v| {
            out.push(',');
            out.push_str("{\"key\":");
            // Tag names are this file's own constants: nothing in them needs escaping.
            out.push('"');
            out.push_str(k);
            out.push('"');
            out.push_str(",\"value\":{\"stringValue\":");
            v(&mut out);
            out.push_str("}}");
        });
        let _ = write!(
            out,
            "],\"status\":{{\"code\":{}}}}}",
            if f.error() { 2 } else { 0 }
        );
    }
    out.push_str("]}]}]}");
    out
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

    fn finished(authority: &str, path: &str) -> Finished {
        let mut p = keel_config::load_str(
            "t.yaml",
            "apiVersion: keel.dev/v1alpha1\nkind: Proxy\nmetadata: { name: app }\nspec: { workload: { labels: { app: app } } }\n",
        )
        .unwrap()
        .proxy;
        p.name = "app".into();
        let source = Source::of(&p);
        Finished {
            span: Span {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7,
                parent_id: Some(0x1234),
                sampled: true,
                start: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            },
            inbound: true,
            duration: Duration::from_micros(1500),
            method: "GET".into(),
            scheme: "http",
            authority: authority.into(),
            path: path.into(),
            protocol: "HTTP/1.1",
            status: 503,
            flags: crate::http::proxy::Flags::default(),
            bytes_received: 10,
            bytes_sent: 20,
            cluster: None,
            request_id: None,
            user_agent: Some("curl/8".into()),
            downstream: Some("10.0.0.1:5555".parse().unwrap()),
            peer: Some("[::1]:80".parse().unwrap()),
            port: 8080,
            source: std::sync::Arc::new(source),
        }
    }

    #[test]
    fn spans_serialize_to_valid_json_with_every_field_escaped() {
        let spans = [
            finished("a.example.com:8080", "/x"),
            finished("we\"ird\\host", "/p?q=\u{1}\n\u{e9}"),
        ];
        let z: serde_json::Value = serde_json::from_str(&zipkin_json(&spans)).unwrap();
        assert_eq!(z[0]["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(z[0]["id"], "00f067aa0ba902b7");
        assert_eq!(z[0]["parentId"], "0000000000001234");
        assert_eq!(z[0]["name"], "a.example.com:8080/*");
        assert_eq!(z[0]["kind"], "SERVER");
        assert_eq!(z[0]["timestamp"], 1_700_000_000_123_456u64);
        assert_eq!(z[0]["duration"], 1500);
        assert_eq!(z[0]["remoteEndpoint"]["ipv6"], "::1");
        assert_eq!(z[0]["tags"]["http.url"], "http://a.example.com:8080/x");
        assert_eq!(z[0]["tags"]["http.status_code"], "503");
        assert_eq!(z[0]["tags"]["response_flags"], "-");
        assert_eq!(z[0]["tags"]["guid:x-request-id"], "-");
        assert_eq!(z[0]["tags"]["upstream_cluster"], "-");
        assert_eq!(z[0]["tags"]["node_id"], "sidecar~app.default");
        assert_eq!(z[0]["tags"]["istio.canonical_service"], "app");
        assert_eq!(z[0]["localEndpoint"]["serviceName"], "app.default");
        assert_eq!(z[0]["tags"]["peer.address"], "10.0.0.1");
        assert_eq!(z[0]["tags"]["error"], "true");
        assert_eq!(
            z[1]["tags"]["http.url"],
            "http://we\"ird\\host/p?q=\u{1}\n\u{e9}"
        );
        let o: serde_json::Value = serde_json::from_str(&otlp_json(&spans)).unwrap();
        let span = &o["resourceSpans"][0]["scopeSpans"][0]["spans"][1];
        assert_eq!(span["name"], "we\"ird\\host:8080/*");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(span["startTimeUnixNano"], "1700000000123456000");
        let url = span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "http.url")
            .unwrap();
        assert_eq!(
            url["value"]["stringValue"],
            "http://we\"ird\\host/p?q=\u{1}\n\u{e9}"
        );
        let keys: Vec<&str> = span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["key"].as_str())
            .collect();
        assert_eq!(
            &keys[..6],
            [
                "component",
                "node_id",
                "istio.canonical_service",
                "istio.namespace",
                "istio.mesh_id",
                "http.method"
            ]
        );
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
