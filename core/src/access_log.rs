//! Access logs: one line per HTTP request or TCP connection, in the configured format, written by
//! a thread of its own so that a worker never waits on the file.
//!
//! Each worker renders its lines into a buffer of its own, handed to the writer thread when it
//! fills and at every sweep tick (100 ms); a writer that falls behind (a full channel) makes the
//! workers drop their buffer and count the lines lost, never block. SIGUSR1 reopens the file (for
//! logrotate); a reload that names another file switches to it.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use keel_config::access_log::{Field, Format, Piece};

use crate::http::headers::Headers;
use crate::http::proxy::Flags;

/// A worker hands its buffer over past this many bytes (or at the next tick).
const FLUSH_BYTES: usize = 32 * 1024;
/// Buffers waiting for the writer; past this, workers drop lines rather than wait.
const QUEUE: usize = 256;

/// What the writer thread is told.
enum Message {
    Lines(Vec<u8>),
    /// Reopen the file (SIGUSR1), or open another one (a reload changed the path).
    Open(PathBuf),
}

static WRITER: OnceLock<SyncSender<Message>> = OnceLock::new();
static PATH: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Makes sure the writer thread runs and writes to `path` (called at start and at each reload).
pub fn configure(path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    let mut current = PATH.lock().unwrap_or_else(|e| e.into_inner());
    if current.as_deref() == Some(path) {
        return;
    }
    *current = Some(path.to_path_buf());
    let tx = WRITER.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || write_loop(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer");
        }
        tx
    });
    let _ = tx.send(Message::Open(path.to_path_buf()));
}

/// SIGUSR1: reopens the access log file (after logrotate moved it).
pub fn reopen() {
    let path = PATH.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let (Some(tx), Some(path)) = (WRITER.get(), path) {
        let _ = tx.send(Message::Open(path));
    }
}

fn write_loop(rx: Receiver<Message>) {
    let mut file: Option<std::fs::File> = None;
    let mut path = PathBuf::new();
    for message in rx {
        match message {
            Message::Open(p) => {
                path = p;
                file = match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot open the access log");
                        None
                    }
                };
            }
            Message::Lines(lines) => {
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&lines) {
                        tracing::warn!(path = %path.display(), error = %e, "access log write failed");
                    }
                }
            }
        }
    }
}

/// A worker's lines not yet handed to the writer.
#[derive(Default)]
pub struct WorkerLog {
    buf: RefCell<Vec<u8>>,
    /// Lines dropped because the writer fell behind, not yet counted in the worker's stats.
    dropped: Cell<u64>,
}

impl WorkerLog {
    /// Appends one rendered line; hands the buffer over when it is full.
    pub fn push(&self, render: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            render(&mut buf);
            buf.len() >= FLUSH_BYTES
        };
        if full {
            self.flush();
        }
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.replace(0)
    }

    /// Hands what is buffered to the writer (at every sweep tick and when full).
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let Some(tx) = WRITER.get() else {
            buf.clear();
            return;
        };
        let lines = std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_BYTES));
        let count = lines.iter().filter(|b| **b == b'\n').count() as u64;
        match tx.try_send(Message::Lines(lines)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.set(self.dropped.get() + count);
            }
        }
    }
}

/// Everything a line may print about one request or connection.
#[derive(Default)]
pub struct Record {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    pub method: String,
    pub path: String,
    /// The path before a `rewrite`, when there was one.
    pub original_path: Option<String>,
    pub authority: String,
    pub scheme: &'static str,
    /// `HTTP/1.1`, `HTTP/1.0`, or empty for TCP.
    pub protocol: &'static str,
    pub request_headers: Option<Headers>,
    pub response_headers: Option<Headers>,
    /// 0 when no response was sent (and for TCP).
    pub status: u16,
    pub flags: Flags,
    pub details: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    /// The cluster's index in the snapshot (for metrics).
    pub cluster: Option<usize>,
    /// The client connection is mesh mTLS (a verified peer certificate).
    pub mtls: bool,
    /// A gRPC request.
    pub grpc: bool,
    /// A gRPC request's status (`grpc_response_status`): from the response trailers, a
    /// trailers-only head, or Keel's own gRPC reply.
    pub grpc_status: Option<u16>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub peer_uri_san: Option<String>,
    pub server_name: Option<String>,
    pub route_name: Option<String>,
    /// The request's span, when tracing is on.
    pub span: Option<crate::trace::Span>,
    /// `x-request-id` and `user-agent`, for a span when no log line keeps the headers.
    pub request_id: Option<String>,
    pub user_agent: Option<String>,
}

impl Record {
    /// Writes the line for this record in `format`.
    pub fn render(&self, format: &Format, out: &mut Vec<u8>) {
        let mut s = String::with_capacity(256);
        match format {
            Format::Text(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Literal(l) => s.push_str(l),
                        Piece::Field(f, max) => {
                            let at = s.len();
                            self.field(f, &mut s);
                            if let Some(max) = max {
                                let mut end = (at + max).min(s.len());
                                while !s.is_char_boundary(end) {
                                    end -= 1;
                                }
                                s.truncate(end);
                            }
                        }
                    }
                }
                if !s.ends_with('\n') {
                    s.push('\n');
                }
            }
            Format::Json(fields) => {
                s.push('{');
                let mut value = String::with_capacity(64);
                for (i, (key, f)) in fields.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    json_string(key, &mut s);
                    s.push(':');
                    value.clear();
                    self.field(f, &mut value);
                    if value == "-" {
                        s.push_str("null");
                    } else if f.is_number() {
                        s.push_str(&value);
                    } else {
                        json_string(&value, &mut s);
                    }
                }
                s.push_str("}\n");
            }
        }
        out.extend_from_slice(s.as_bytes());
    }

    fn field(&self, f: &Field, s: &mut String) {
        let dash = |s: &mut String, v: Option<&str>| match v {
            Some(v) if !v.is_empty() => s.push_str(v),
            _ => s.push('-'),
        };
        match f {
            Field::StartTime => match self.start {
                Some(t) => iso8601(t, s),
                None => s.push('-'),
            },
            Field::Req(name, alt) => {
                let v = self
                    .request(name)
                    .or_else(|| alt.as_deref().and_then(|a| self.request(a)));
                dash(s, v.as_deref());
            }
            Field::Resp(name, alt) => {
                let get = |n: &str| {
                    self.response_headers
                        .as_ref()
                        .and_then(|h| h.get(n.as_bytes()))
                        .map(String::from_utf8_lossy)
                };
                let v = get(name).or_else(|| alt.as_deref().and_then(get));
                dash(s, v.as_deref());
            }
            Field::Protocol => dash(s, Some(self.protocol)),
            Field::ResponseCode => {
                let _ = write!(s, "{}", self.status);
            }
            Field::ResponseFlags => {
                let _ = write!(s, "{}", self.flags);
            }
            Field::ResponseCodeDetails => dash(s, Some(self.details)),
            Field::ConnectionTerminationDetails | Field::UpstreamTransportFailureReason => {
                s.push('-')
            }
            Field::BytesReceived => {
                let _ = write!(s, "{}", self.bytes_received);
            }
            Field::BytesSent => {
                let _ = write!(s, "{}", self.bytes_sent);
            }
            Field::Duration => {
                let _ = write!(s, "{}", self.duration.as_millis());
            }
            Field::UpstreamHost => addr(self.upstream_host, s),
            Field::UpstreamCluster => dash(s, self.upstream_cluster.as_deref()),
            Field::UpstreamLocalAddress => s.push('-'),
            Field::DownstreamLocalAddress => addr(self.downstream_local, s),
            Field::DownstreamRemoteAddress => addr(self.downstream_remote, s),
            Field::DownstreamRemoteAddressWithoutPort => match self.downstream_remote {
                Some(a) => {
                    let _ = write!(s, "{}", a.ip());
                }
                None => s.push('-'),
            },
            Field::DownstreamPeerUriSan => dash(s, self.peer_uri_san.as_deref()),
            Field::RequestedServerName => dash(s, self.server_name.as_deref()),
            Field::RouteName => dash(s, self.route_name.as_deref()),
        }
    }

    /// A request header or pseudo-header by lower-case name (borrowed: a log line copies it
    /// once, into the line).
    fn request(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        let pseudo = match name {
            ":method" => Some(self.method.as_str()),
            ":path" => Some(self.path.as_str()),
            ":authority" | "host" => Some(self.authority.as_str()),
            "x-envoy-original-path" => self.original_path.as_deref(),
            ":scheme" => Some(self.scheme),
            _ => None,
        };
        if let Some(v) = pseudo {
            return (!v.is_empty()).then_some(Cow::Borrowed(v));
        }
        if name.starts_with(':') {
            return None;
        }
        self.request_headers
            .as_ref()?
            .get(name.as_bytes())
            .map(String::from_utf8_lossy)
    }
}

fn addr(a: Option<SocketAddr>, s: &mut String) {
    match a {
        Some(a) => {
            let _ = write!(s, "{a}");
        }
        None => s.push('-'),
    }
}

fn json_string(v: &str, out: &mut String) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `2026-11-22T11:40:05.123Z`, as Envoy's default `%START_TIME%`.
fn iso8601(t: SystemTime, s: &mut String) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        s,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// A request's or connection's record while it is under way: counted in Istio's metrics when
/// dropped — however the exchange ends — and, with an access log, logged. Cheap fields are always
/// filled (`with`); what only a log line needs (strings, headers) is filled under `is_on()`.
pub struct Entry {
    record: Record,
    started: std::time::Instant,
    log: bool,
    /// The detail fields are wanted: for the access log, or for a sampled span.
    detail: bool,
    tcp: bool,
    /// A TCP connection counted as opened (so it is counted as closed).
    opened: bool,
    worker: std::rc::Rc<crate::worker::Worker>,
    gen: std::rc::Rc<crate::generation::Generation>,
    listener: usize,
}

impl Entry {
    /// Starts the record of a request (or, `tcp`, a connection) on listener `at`.
    pub fn start(
        worker: &std::rc::Rc<crate::worker::Worker>,
        at: &crate::worker::ListenerRef,
        tcp: bool,
    ) -> Entry {
        let log = at.gen.snapshot.proxy.access_log.is_some();
        Entry {
            record: Record {
                start: log.then(SystemTime::now),
                ..Default::default()
            },
            started: std::time::Instant::now(),
            log,
            detail: log,
            tcp,
            opened: false,
            worker: worker.clone(),
            gen: at.gen.clone(),
            listener: at.index,
        }
    }

    /// Counts a TCP connection as opened, once its peer and cluster are filled in (it is counted
    /// as closed, with its bytes, when the entry drops).
    pub fn opened(&mut self) {
        self.opened = true;
        self.count(|s| s.tcp_opened += 1);
    }

    /// Fills in the record.
    #[inline]
    pub fn with(&mut self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record);
    }

    /// Whether an access log line or a span will be written (fill the fields only they need).
    pub fn is_on(&self) -> bool {
        self.detail
    }

    /// Gives the request its span; a sampled one is exported when the entry drops, and turns on
    /// the detail fields it is made of.
    pub fn trace(&mut self, span: crate::trace::Span) {
        if span.sampled {
            self.detail = true;
            self.record.start.get_or_insert(span.start);
        }
        self.record.span = Some(span);
    }

    /// Whether an access log line will be written (the whole header sets are kept only for it).
    pub fn logs(&self) -> bool {
        self.log
    }

    /// Hands a sampled request's span to the exporter, its fields moved out of the record (the
    /// log line, if any, is written first); the tags are formatted on the exporter thread.
    fn finished_span(&mut self) {
        let r = &mut self.record;
        let Some(span) = r.span.take().filter(|s| s.sampled) else {
            return;
        };
        let snap = &self.gen.snapshot;
        let Some(listener) = snap.listeners.get(self.listener) else {
            return;
        };
        let header = |h: &Option<Headers>, name: &[u8]| {
            h.as_ref()
                .and_then(|h| h.get(name))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let request_id = r
            .request_id
            .take()
            .or_else(|| header(&r.request_headers, b"x-request-id"));
        let user_agent = r
            .user_agent
            .take()
            .or_else(|| header(&r.request_headers, b"user-agent"));
        let inbound = listener.direction == keel_config::Direction::Inbound;
        crate::trace::submit(crate::trace::Finished {
            span,
            inbound,
            duration: r.duration,
            method: std::mem::take(&mut r.method),
            scheme: r.scheme,
            authority: std::mem::take(&mut r.authority),
            path: std::mem::take(&mut r.path),
            protocol: r.protocol,
            status: r.status,
            flags: r.flags,
            bytes_received: r.bytes_received,
            bytes_sent: r.bytes_sent,
            cluster: r.cluster,
            request_id,
            user_agent,
            downstream: r.downstream_remote,
            peer: if inbound {
                r.downstream_remote
            } else {
                r.upstream_host
            },
            port: listener.address.port(),
            source: self.gen.trace_source.clone(),
        });
    }

    /// Adds to the Istio metric series this record belongs to.
    fn count(&self, f: impl FnOnce(&mut crate::istio_metrics::Series)) {
        use crate::istio_metrics::{Key, Labels};
        let gen = &self.gen;
        let snap = &gen.snapshot;
        let Some(listener) = snap.listeners.get(self.listener) else {
            return;
        };
        let r = &self.record;
        let metrics = &self.worker.metrics;
        let key = Key {
            version: gen.labels_key,
            listener: gen.listener_keys.get(self.listener).copied().unwrap_or(0),
            cluster: r
                .cluster
                .and_then(|c| gen.clusters.get(c))
                .map_or(0, |c| c.pool_key),
            code: r.status,
            flags: r.flags.bits(),
            peer: metrics.peer(r.peer_uri_san.as_deref()),
            tcp: self.tcp,
            grpc: r.grpc,
            mtls: r.mtls,
            grpc_status: r.grpc_status,
        };
        let labels = || {
            let proxy = &snap.proxy;
            let label = |k: &str| proxy.labels.get(k).map_or("unknown", String::as_str);
            let service = r
                .cluster
                .and_then(|c| snap.clusters.get(c))
                .and_then(|c| c.name.strip_prefix("outbound|"))
                .and_then(|rest| rest.rsplit('|').next())
                .filter(|h| !h.is_empty());
            let flags = r.flags.to_string();
            Labels {
                inbound: listener.direction == keel_config::Direction::Inbound,
                workload: &proxy.name,
                namespace: &proxy.namespace,
                app: label("app"),
                version: label("version"),
                own_principal: gen.tls.identity.as_ref().map(|i| i.uri()),
                peer_principal: r.peer_uri_san.as_deref(),
                service,
                protocol: if self.tcp {
                    "tcp"
                } else if r.grpc {
                    "grpc"
                } else {
                    "http"
                },
                code: r.status,
                flags: &flags,
                grpc_status: r.grpc_status,
                mtls: r.mtls,
            }
            .format()
        };
        metrics.record(key, labels, f);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        self.record.duration = duration;
        let (tcp, rx, tx) = (self.tcp, self.record.bytes_received, self.record.bytes_sent);
        if !tcp {
            let snap = &self.gen.snapshot;
            let listener = self.listener;
            self.worker.metrics.latency(
                self.gen.listener_keys.get(listener).copied().unwrap_or(0),
                || {
                    snap.listeners
                        .get(listener)
                        .map_or("-", |l| l.name.as_str())
                        .into()
                },
                duration,
            );
        }
        if !tcp || self.opened {
            self.count(|s| {
                if tcp {
                    s.tcp_closed += 1;
                    s.tcp_received += rx;
                    s.tcp_sent += tx;
                } else {
                    crate::istio_metrics::observe_request(s, duration, rx, tx);
                }
            });
        }
        if self.log {
            if let Some(log) = &self.gen.snapshot.proxy.access_log {
                let record = &self.record;
                self.worker
                    .access
                    .push(|buf| record.render(&log.format, buf));
            }
        }
        if self.record.span.is_some() {
            self.finished_span();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::access_log::{istio_json, parse, ISTIO_TEXT_FORMAT};

    fn record() -> Record {
        let mut headers = Headers::default();
        headers.push(b"user-agent", b"curl/8");
        headers.push(b"x-request-id", b"abc");
        Record {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)),
            duration: Duration::from_millis(12),
            method: "GET".into(),
            path: "/p".into(),
            authority: "reviews".into(),
            protocol: "HTTP/1.1",
            request_headers: Some(headers),
            status: 503,
            flags: Flags::of(crate::http::proxy::Flag::UpstreamOverflow),
            details: "upstream_overflow",
            bytes_sent: 41,
            upstream_cluster: Some("outbound|9080||reviews".into()),
            downstream_remote: Some("127.0.0.1:5000".parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn istio_text_line() {
        let mut out = Vec::new();
        record().render(&Format::Text(parse(ISTIO_TEXT_FORMAT).unwrap()), &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.starts_with("[2026-11-18T11:06:40.123Z] \"GET /p HTTP/1.1\" 503 UO upstream_overflow - \"-\" 0 41 12 - \"-\" \"curl/8\" \"abc\" \"reviews\" \"-\" outbound|9080||reviews - - 127.0.0.1:5000 - -"),
            "{line}"
        );
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn json_line() {
        let mut out = Vec::new();
        record().render(&istio_json(), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UO");
        assert_eq!(v["user_agent"], "curl/8");
        assert_eq!(v["upstream_host"], serde_json::Value::Null);
        assert_eq!(v["duration"], 12);
    }

    #[test]
    fn civil_dates() {
        let mut s = String::new();
        iso8601(SystemTime::UNIX_EPOCH, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        iso8601(
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
            &mut s,
        );
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
    }
}
