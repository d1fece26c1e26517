//! HTTP/1.1 proxying: read a request, route it, forward it over a pooled upstream connection, and
//! stream the response back; repeat on keep-alive connections, answering pipelined requests in order.
//!
//! Every failure before the response head is forwarded becomes a local reply with an Envoy response
//! flag (NR, UH, UF, UC, UPE, DPE, UO, UT, URX, FI); after that point the only honest signal is
//! closing the connection. Route policy lives here too: fault injection, the circuit breaker on
//! requests, tries and retries with their timeouts, and starting mirrors.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use keel_config::http_routes::{
    HeaderOps, HttpRoute, HttpRouteTable, RequestView, RouteAction, RouteTarget, StringMatch,
    UnknownHost,
};
use keel_config::{Direction, HttpLimits, UpstreamProtocol};
use keel_lb::outlier::Outcome;
use keel_tls::Transport;

use super::body::{BodySink, CopyError, H1Sink, Tap, UpstreamBody};
use super::conn::{BufferedStream, ReadBuf};
use super::connect::{acquire, give_back, AcquireError, Acquired};
use super::downstream::Downstream;
use super::h1::{encode, parse_request, parse_response, BodyKind, HeadError, Limits};
use super::h2::client::{ClientStream, StreamFailure};
use super::head::{RequestHead, ResponseHead, Version};
use super::headers::Headers;
use super::pool::PooledConn;
use super::replay::Replay;
use crate::idle::{IdleEntry, IdleGuard};
use crate::worker::{ListenerRef, Worker};

/// Envoy's response flags, recorded per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    None,
    /// No route (no virtual host or no matching route).
    NoRoute,
    /// No healthy upstream endpoint.
    NoHealthyUpstream,
    /// Upstream connect failed.
    UpstreamConnectFailure,
    /// Upstream connection ended before a complete response.
    UpstreamConnectionTermination,
    /// Upstream sent a malformed or ambiguous response.
    UpstreamProtocolError,
    /// Downstream sent a malformed or ambiguous request.
    DownstreamProtocolError,
    /// Downstream connection ended during the exchange.
    DownstreamConnectionTermination,
    /// A circuit breaker refused the request (connections, pending or requests overflow).
    UpstreamOverflow,
    /// The route timeout or a per-try timeout expired.
    UpstreamRequestTimeout,
    /// Retries exhausted on a retriable outcome.
    RetryLimitExceeded,
    /// Aborted by fault injection.
    FaultInjected,
    /// Delayed by fault injection.
    DelayInjected,
    /// Refused by a local rate limit.
    RateLimited,
}

/// The response flags of one request (a delayed request may also time out, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    const ALL: [Flag; crate::stats::RESPONSE_FLAGS] = [
        Flag::NoRoute,
        Flag::NoHealthyUpstream,
        Flag::UpstreamConnectFailure,
        Flag::UpstreamConnectionTermination,
        Flag::UpstreamProtocolError,
        Flag::DownstreamProtocolError,
        Flag::DownstreamConnectionTermination,
        Flag::UpstreamOverflow,
        Flag::UpstreamRequestTimeout,
        Flag::RetryLimitExceeded,
        Flag::FaultInjected,
        Flag::DelayInjected,
        Flag::RateLimited,
    ];

    pub fn insert(&mut self, flag: Flag) {
        if let Some(i) = Self::ALL.iter().position(|f| *f == flag) {
            self.0 |= 1 << i;
        }
    }

    /// The flags' names, in the order of [`ListenerCounters::response_flags`].
    ///
    /// [`ListenerCounters::response_flags`]: crate::stats::ListenerCounters::response_flags
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|f| f.as_str())
    }

    /// Counts each flag set, for the per-flag metric.
    pub fn record(self, lstats: &crate::stats::ListenerCounters) {
        if self.0 == 0 {
            return;
        }
        for (i, counter) in lstats.response_flags.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                counter.inc();
            }
        }
    }

    pub fn of(flag: Flag) -> Flags {
        let mut f = Flags::default();
        f.insert(flag);
        f
    }

    /// The set as bits (for metric keys).
    pub fn bits(self) -> u16 {
        self.0
    }

    pub fn contains(self, flag: Flag) -> bool {
        Self::ALL
            .iter()
            .position(|f| *f == flag)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

impl std::fmt::Display for Flags {
    /// As Envoy's `%RESPONSE_FLAGS%`: comma-separated, `-` for none.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for flag in Self::ALL.iter().filter(|x| self.contains(**x)) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
            first = false;
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

impl Flag {
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for a local reply with this flag.
    pub fn details(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "route_not_found",
            Flag::NoHealthyUpstream => "no_healthy_upstream",
            Flag::UpstreamConnectFailure => {
                "upstream_reset_before_response_started{connection_failure}"
            }
            Flag::UpstreamConnectionTermination => {
                "upstream_reset_before_response_started{connection_termination}"
            }
            Flag::UpstreamProtocolError => "upstream_reset_before_response_started{protocol_error}",
            Flag::DownstreamProtocolError => "codec_error",
            Flag::DownstreamConnectionTermination => "downstream_remote_disconnect",
            Flag::UpstreamOverflow => "overflow",
            Flag::UpstreamRequestTimeout => "response_timeout",
            Flag::RetryLimitExceeded => "via_upstream",
            Flag::FaultInjected => "fault_filter_abort",
            Flag::DelayInjected => "-",
            Flag::RateLimited => "local_rate_limited",
        }
    }

    /// The flag as Envoy prints it in access logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::UpstreamProtocolError => "UPE",
            Flag::DownstreamProtocolError => "DPE",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::UpstreamOverflow => "UO",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::RetryLimitExceeded => "URX",
            Flag::FaultInjected => "FI",
            Flag::DelayInjected => "DI",
            Flag::RateLimited => "RL",
        }
    }
}

/// Whether the downstream connection can carry another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    KeepAlive,
    Close,
}

/// Serves HTTP/1.1 on one accepted connection of HTTP listener `at`. Each request is routed by
/// the config generation in force when its head arrived.
///
/// The setup is done here, synchronously, and everything the connection keeps goes into one
/// [`Conn`] moved into the task: an `async fn` with these arguments would store them twice.
pub fn serve(
    worker: Rc<Worker>,
    at: ListenerRef,
    down: Transport,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    worker.connection_opened();
    at.counters(worker.id).accepted.inc();
    // TCP_NODELAY came from the listener (keel_io::listener::Acceptor).
    // The worker's idle sweeper closes the connection when no byte moves either way for
    // idleTimeout, between requests or in the middle of one (a client that stops reading).
    let idle = worker.idle.register(
        down.raw_fd(),
        at.gen.snapshot.proxy.http.idle_timeout,
        at.state.clone(),
    );
    requests(Conn {
        idle,
        down: BufferedStream::new(down),
        worker,
        at,
        peer_ip: peer.ip(),
        peer_port: peer.port(),
    })
}

/// One downstream HTTP/1.1 connection: all it holds between requests.
struct Conn {
    /// Declared before `down`, so it is dropped first and the sweeper forgets the fd before the
    /// stream closes it (and the number can be reused).
    idle: IdleGuard,
    down: BufferedStream,
    worker: Rc<Worker>,
    at: ListenerRef,
    /// The client's address, kept in 19 bytes rather than a 32-byte `SocketAddr`.
    peer_ip: IpAddr,
    peer_port: u16,
}

/// Serves requests on one connection until either side is done.
///
/// A plain `fn` returning an `async move` block that captures `c`: an `async fn` would move its
/// argument into a second copy inside the future (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)]
fn requests(mut c: Conn) -> impl std::future::Future<Output = ()> {
    async move {
        // A new plaintext connection waits for its first bytes here, as an idle one waits
        // between requests; telling HTTP/2 from HTTP/1.1 (timed reads, ~1 KB of state) is boxed
        // and exists only once bytes arrive, so it does not enlarge every connection's task.
        if c.down.stream.session().is_none() && !c.down.has_buffered() {
            c.idle.0.between_requests.set(true);
            let ready = c.down.stream.readable().await;
            c.idle.0.between_requests.set(false);
            if ready.is_err() {
                c.worker.connection_closed(&c.at.state);
                return;
            }
        }
        if Box::pin(sniff_h2(&mut c)).await {
            // HTTP/2: the connection is handed over whole.
            let Conn {
                idle,
                down,
                worker,
                mut at,
                peer_ip,
                peer_port,
            } = c;
            // Boxed: a task is as large as its largest await, and every idle HTTP/1.1
            // connection would otherwise carry the HTTP/2 server's state (~1.7 KB).
            Box::pin(super::h2::server::serve(
                &worker,
                &mut at,
                down,
                SocketAddr::new(peer_ip, peer_port),
                &idle.0,
            ))
            .await;
            drop(idle);
            worker.connection_closed(&at.state);
            return;
        }
        loop {
            // Between requests the connection waits here, and this wait is all the state an idle
            // keep-alive connection keeps besides its `Conn`: a readiness wait — no buffer, no
            // timer. Everything else (reading the head, the exchange, error replies) is one boxed
            // future that exists only while a request is in hand.
            if !c.down.has_buffered() {
                c.idle.0.between_requests.set(true);
                let ready = c.down.stream.readable().await;
                c.idle.0.between_requests.set(false);
                if ready.is_err() {
                    break;
                }
            }
            if Box::pin(one_request(&mut c)).await == Next::Close {
                break;
            }
        }
        c.worker.connection_closed(&c.at.state);
    }
}

/// Whether the connection speaks HTTP/2: ALPN `h2` on TLS, or the client preface first on a
/// plaintext connection (h2c with prior knowledge), so HTTP/1.1 and HTTP/2 share one port. Bytes
/// read to tell stay buffered for whichever protocol serves them.
async fn sniff_h2(c: &mut Conn) -> bool {
    use super::h2::frame::PREFACE;
    if let Some(session) = c.down.stream.session() {
        return matches!(session.alpn.as_deref(), Some(b"h2" | b"istio-h2"));
    }
    let timeout = c.at.gen.snapshot.proxy.http.request_headers_timeout;
    loop {
        let buffered = c.down.buffered();
        if buffered.len() >= PREFACE.len() {
            return buffered.starts_with(PREFACE);
        }
        if !PREFACE.starts_with(buffered) {
            return false;
        }
        let filled = if buffered.is_empty() {
            // Nothing read yet: an idle new connection holds no buffer, as between requests.
            c.idle.0.between_requests.set(true);
            let r = c.down.fill(&c.idle.0.activity).await;
            c.idle.0.between_requests.set(false);
            r
        } else {
            match keel_io::time::timeout(timeout, c.down.fill(&c.idle.0.activity)).await {
                Ok(r) => r,
                Err(_) => return false,
            }
        };
        if !matches!(filled, Ok(n) if n > 0) {
            return false;
        }
    }
}

/// Reads one request head (or the close between requests) and handles the request.
async fn one_request(c: &mut Conn) -> Next {
    let peer = SocketAddr::new(c.peer_ip, c.peer_port);
    let Conn {
        idle,
        down,
        worker,
        at,
        ..
    } = c;
    let idle = &idle.0;
    let limits = at.gen.snapshot.proxy.http;
    let head_limits = Limits {
        max_head_bytes: limits.max_request_headers_bytes,
        max_headers: limits.max_headers,
        max_target_bytes: limits.max_request_target_bytes,
    };
    let read = match head_now(down, &head_limits, &idle.activity) {
        Some(read) => read,
        None => read_request(down, &head_limits, &limits, idle).await,
    };
    let lstats = at.counters(worker.id);
    let head = match read {
        Ok(Some(h)) => h,
        Ok(None) => return Next::Close,
        Err(ReadError::Head(e)) => {
            lstats.rq_total.inc();
            count_status(lstats, e.status);
            refused_entry(
                worker,
                at,
                peer,
                e.status,
                Flag::DownstreamProtocolError,
                "codec_error",
            );
            Flags::of(Flag::DownstreamProtocolError).record(lstats);
            tracing::debug!(%peer, status = e.status, reason = e.reason, flag = "DPE", "refused request");
            let _ = local_reply(&down.stream, e.status, e.reason, Next::Close, &[]).await;
            return Next::Close;
        }
        Err(ReadError::Timeout) => {
            lstats.rq_total.inc();
            count_status(lstats, 408);
            refused_entry(worker, at, peer, 408, Flag::None, "request_header_timeout");
            let _ = local_reply(&down.stream, 408, "request head timeout", Next::Close, &[]).await;
            return Next::Close;
        }
        Err(ReadError::Io) => return Next::Close,
    };
    lstats.rq_total.inc();
    at.refresh(worker);
    exchange(worker, at, down, head, peer, idle).await
}

/// Counts (Istio metrics) and logs (access log) a request refused before it had a head.
fn refused_entry(
    worker: &Rc<Worker>,
    at: &ListenerRef,
    peer: SocketAddr,
    status: u16,
    flag: Flag,
    details: &'static str,
) {
    let mut entry = crate::access_log::Entry::start(worker, at, false);
    entry.with(|r| {
        r.status = status;
        r.flags = Flags::of(flag);
        r.details = details;
        r.downstream_remote = Some(peer);
        r.downstream_local = Some(at.config().address);
    });
}

enum ReadError {
    Head(HeadError),
    Timeout,
    Io,
}

/// The next request head if it can be had without waiting: parsed from what is buffered, or from
/// one non-blocking read (a whole head usually arrives in one segment). `None` when more must be
/// awaited — a head in pieces, or a spurious wakeup — which [`read_request`] then does.
fn head_now(
    down: &mut BufferedStream,
    head_limits: &Limits,
    activity: &Cell<u32>,
) -> Option<Result<Option<(RequestHead, BodyKind)>, ReadError>> {
    let parse = |down: &mut BufferedStream| match parse_request(down.buffered(), head_limits) {
        Ok(Some((head, len, body))) => {
            down.consume(len);
            Some(Ok(Some((head, body))))
        }
        Ok(None) => None,
        Err(e) => Some(Err(ReadError::Head(e))),
    };
    if down.has_buffered() {
        return parse(down);
    }
    match down.try_fill(activity) {
        Ok(Some(0)) => Some(Ok(None)),
        Ok(Some(_)) => parse(down),
        Ok(None) => None,
        Err(_) => Some(Err(ReadError::Io)),
    }
}

/// Reads one request head: `Ok(None)` when the client closes (or idles out) between requests.
async fn read_request(
    down: &mut BufferedStream,
    head_limits: &Limits,
    limits: &HttpLimits,
    idle: &IdleEntry,
) -> Result<Option<(RequestHead, BodyKind)>, ReadError> {
    let activity = &idle.activity;
    let mut deadline: Option<Instant> = None;
    loop {
        if down.has_buffered() {
            match parse_request(down.buffered(), head_limits) {
                Ok(Some((head, len, body))) => {
                    down.consume(len);
                    return Ok(Some((head, body)));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Head(e)),
            }
            deadline.get_or_insert_with(|| Instant::now() + limits.request_headers_timeout);
        }
        // Waiting for the first byte of a request is bounded by the connection's idle watch; once a
        // head has started, it must complete within requestHeadersTimeout.
        let filled = match deadline {
            None => {
                // Nothing of a request read yet: a drain of the listener may close us now.
                idle.between_requests.set(!down.has_buffered());
                let r = down.fill(activity).await;
                idle.between_requests.set(false);
                r
            }
            // keel_io's timeout boxes its timer: it exists only while a head arrives in pieces.
            Some(d) => match keel_io::time::timeout(
                d.saturating_duration_since(Instant::now()),
                down.fill(activity),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => return Err(ReadError::Timeout),
            },
        };
        match filled {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(_) => return Err(ReadError::Io),
        }
    }
}

fn count_status(lstats: &crate::stats::ListenerCounters, status: u16) {
    match status / 100 {
        2 => lstats.rq_2xx.inc(),
        3 => lstats.rq_3xx.inc(),
        4 => lstats.rq_4xx.inc(),
        5 => lstats.rq_5xx.inc(),
        _ => {}
    }
}

/// What routing decided for a request.
enum Decision<'a> {
    Reply {
        status: u16,
        body: String,
        flag: Flag,
        extra: Vec<(String, String)>,
    },
    Forward {
        route: &'a HttpRoute,
        target: &'a RouteTarget,
        match_index: usize,
    },
}

fn decide<'a>(
    worker: &Worker,
    lstats: &crate::stats::ListenerCounters,
    table: &'a HttpRouteTable,
    head: &RequestHead,
    port: u16,
    scheme: &'static str,
) -> Decision<'a> {
    let Some(vhost) = table.virtual_host(&head.authority) else {
        // A host no ServiceEntry declares: what the Sidecar's outboundTrafficPolicy says.
        return match &table.unknown_host {
            UnknownHost::NotFound => Decision::Reply {
                status: 404,
                body: String::new(),
                flag: Flag::NoRoute,
                extra: vec![],
            },
            UnknownHost::RegistryOnly => {
                lstats.registry_only_refused.inc();
                Decision::Reply {
                    status: 502,
                    body: String::new(),
                    flag: Flag::NoRoute,
                    extra: vec![],
                }
            }
            UnknownHost::Passthrough(route) => match &route.action {
                RouteAction::Forward { targets, .. } if !targets.is_empty() => Decision::Forward {
                    route,
                    target: &targets[0],
                    match_index: 0,
                },
                _ => Decision::Reply {
                    status: 404,
                    body: String::new(),
                    flag: Flag::NoRoute,
                    extra: vec![],
                },
            },
        };
    };
    let lookup = |name: &str| {
        head.headers
            .get(name.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let view = RequestView {
        method: &head.method,
        path: head.path_only(),
        query: head.query(),
        authority: &head.authority,
        scheme,
        port,
        header: &lookup,
    };
    let Some((route, match_index)) = HttpRouteTable::route(vhost, &view) else {
        return Decision::Reply {
            status: 404,
            body: String::new(),
            flag: Flag::NoRoute,
            extra: vec![],
        };
    };
    match &route.action {
        RouteAction::Direct { status, body } => Decision::Reply {
            status: *status,
            body: body.clone().unwrap_or_default(),
            flag: Flag::None,
            extra: vec![],
        },
        RouteAction::Redirect(r) => {
            let scheme = r.scheme.as_deref().unwrap_or("http");
            let host = r
                .authority
                .clone()
                .unwrap_or_else(|| super::head::strip_port(&head.authority).to_string());
            // A scheme's default port is left out, as Envoy does (`https_redirect` goes to 443).
            let default_port = match scheme {
                "https" => Some(443),
                "http" => Some(80),
                _ => None,
            };
            let port = r
                .port
                .map(|p| {
                    if Some(p) == default_port {
                        String::new()
                    } else {
                        format!(":{p}")
                    }
                })
                .unwrap_or_else(|| {
                    match (r.authority.is_some(), head.authority.rsplit_once(':')) {
                        (false, Some((_, p)))
                            if !head.authority.starts_with('[')
                                || head.authority.ends_with(&format!("]:{p}")) =>
                        {
                            format!(":{p}")
                        }
                        _ => String::new(),
                    }
                });
            let path = r.uri.clone().unwrap_or_else(|| head.path.clone());
            let location = format!("{scheme}://{host}{port}{path}");
            Decision::Reply {
                status: r.code,
                body: String::new(),
                flag: Flag::None,
                extra: vec![("location".into(), location)],
            }
        }
        RouteAction::Forward { targets, .. } => {
            let target = if targets.len() == 1 {
                &targets[0]
            } else {
                match worker.pick_weighted(targets.iter().map(|t| t.target.weight)) {
                    Some(i) => &targets[i],
                    None => {
                        return Decision::Reply {
                            status: 503,
                            body: "no healthy upstream".into(),
                            flag: Flag::NoHealthyUpstream,
                            extra: vec![],
                        }
                    }
                }
            };
            Decision::Forward {
                route,
                target,
                match_index,
            }
        }
    }
}

/// Handles one request from head to the end of its response.
pub(crate) async fn exchange<D: Downstream>(
    worker: &Rc<Worker>,
    at: &ListenerRef,
    down: &mut D,
    (mut head, body): (RequestHead, BodyKind),
    peer: SocketAddr,
    idle: &IdleEntry,
) -> Next {
    let activity = &idle.activity;
    let snapshot = &*at.gen.snapshot;
    let listener = at.config();
    let lstats = at.counters(worker.id);
    let limits = &snapshot.proxy.http;
    let started = Instant::now();
    // The access log line, written however this exchange ends (nothing when logging is off).
    // Istio metrics and the access log line, written however this exchange ends.
    let mut log = crate::access_log::Entry::start(worker, at, false);
    let session = down.session();
    let grpc = is_grpc(&head);
    // Tracing: this hop's span, in the caller's trace when it sent one.
    let span = snapshot.proxy.tracing.as_ref().map(|t| {
        crate::trace::Span::start(crate::trace::extract(&head.headers), t, &mut worker.rng())
    });
    if let Some(s) = &span {
        log.trace(s.clone());
    }
    log.with(|r| {
        r.grpc = grpc;
        r.mtls = session.is_some_and(|s| s.peer_authenticated);
        r.peer_uri_san = session
            .and_then(|s| s.peer_id.as_ref())
            .map(|p| p.uri().to_string());
    });
    if log.is_on() {
        log.with(|r| {
            r.method = head.method.clone();
            r.path = head.path.clone();
            r.authority = head.authority.clone();
            r.protocol = match head.version {
                Version::Http10 => "HTTP/1.0",
                _ => down.protocol(),
            };
            r.downstream_remote = Some(peer);
            r.downstream_local = Some(listener.address);
            r.details = "-";
            r.scheme = if session.is_some() { "https" } else { "http" };
            r.server_name = session.and_then(|s| s.sni.as_deref()).map(str::to_string);
        });
    }
    let mut next = client_wants(&head);
    if at.state.is_draining() {
        // The listener drains (removed by a reload, SIGTERM, /drain_listeners): this response
        // carries `Connection: close`.
        next = Next::Close;
    }

    if head.method == "CONNECT" {
        count_status(lstats, 405);
        log.with(|r| r.status = 405);
        let _ = down
            .local_reply(405, "CONNECT is not enabled", Next::Close, &[])
            .await;
        return Next::Close;
    }
    let websocket = head.headers.has_token(b"connection", b"upgrade")
        && head
            .headers
            .get(b"upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case(b"websocket"));
    let expect_continue = match head.headers.get(b"expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => {
            count_status(lstats, 417);
            log.with(|r| r.status = 417);
            let _ = down
                .local_reply(417, "unsupported Expect", Next::Close, &[])
                .await;
            return Next::Close;
        }
    };

    let Some(table) = &listener.http else {
        return Next::Close;
    };
    let scheme = if down.session().is_some() {
        "https"
    } else {
        "http"
    };
    // Inbound: RequestAuthentication, then AuthorizationPolicy, before any route is looked at.
    let security = &snapshot.security;
    if listener.direction == Direction::Inbound
        && (!security.jwt.is_empty() || !security.authz.is_empty())
    {
        let (auth, refused) = match at.gen.security.authenticate(&security.jwt, &head) {
            Ok(a) => {
                if a.is_some() {
                    lstats.jwt_allowed.inc();
                }
                (a, None)
            }
            Err(e) => {
                lstats.jwt_denied.inc();
                let realm = format!(
                    "Bearer realm=\"{scheme}://{}{}\", error=\"invalid_token\"",
                    head.authority,
                    head.path_only()
                );
                let reply = ErrorReply::new(401, e.message())
                    .details("jwt_authn_access_denied")
                    .header("www-authenticate", realm);
                (None, Some(reply))
            }
        };
        let refused = refused.or_else(|| {
            if security.authz.is_empty() {
                return None;
            }
            // The listener's address, unless it is a wildcard (then the socket says).
            let local = match listener.address.ip().is_unspecified() {
                true => down.local_addr().unwrap_or(listener.address),
                false => listener.address,
            };
            let conn = crate::security::connection(peer, local, down.session());
            let identity = auth.as_ref().map(|a| &*a.identity);
            let verdict = crate::security::authorize(security, &conn, &head, identity);
            if verdict.audited {
                lstats.rbac_audited.inc();
            }
            if verdict.allowed {
                lstats.rbac_allowed.inc();
                return None;
            }
            lstats.rbac_denied.inc();
            tracing::debug!(%peer, method = %head.method, path = %head.path, policy = verdict.policy.unwrap_or("(no ALLOW policy matched)"), "RBAC: access denied");
            Some(
                ErrorReply::new(403, "RBAC: access denied")
                    .details("rbac_access_denied_matched_policy"),
            )
        });
        if let Some(reply) = refused {
            if body != BodyKind::None {
                next = Next::Close;
            }
            let flags = Flags::default();
            return finish_local(
                down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
            )
            .await;
        }
        if let Some(a) = &auth {
            crate::security::apply_outputs(&mut head, &security.jwt[a.provider], a);
        }
    }
    let (route, target, match_index) = match decide(
        worker,
        lstats,
        table,
        &head,
        listener.address.port(),
        scheme,
    ) {
        Decision::Reply {
            status,
            body: text,
            flag,
            extra,
        } => {
            count_status(lstats, status);
            Flags::of(flag).record(lstats);
            log.with(|r| {
                r.status = status;
                r.flags = Flags::of(flag);
                r.details = if flag == Flag::None {
                    "direct_response"
                } else {
                    flag.details()
                };
                r.bytes_sent = text.len() as u64;
            });
            tracing::debug!(%peer, method = %head.method, path = %head.path, status, flag = flag.as_str(), "local reply");
            // Unread request body bytes would be taken for the next request: close instead.
            if body != BodyKind::None {
                next = Next::Close;
            }
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if down.local_reply(status, &text, next, &extra).await.is_err() {
                return Next::Close;
            }
            return next;
        }
        Decision::Forward {
            route,
            target,
            match_index,
        } => (route, target, match_index),
    };
    let cluster_index = target.target.cluster;
    let cluster = &snapshot.clusters[cluster_index];
    log.with(|r| r.cluster = Some(cluster_index));
    // Names for a log line (a span refers to the cluster by index).
    if log.logs() {
        log.with(|r| {
            r.route_name = Some(route.name.clone());
            r.upstream_cluster = Some(cluster.name.clone());
        });
    }
    let cluster_stats = &at.gen.clusters[cluster_index];
    let cstats = &cluster_stats.slots[worker.id];
    let policy = &route.policy;
    let mut flags = Flags::default();

    // A local rate limit: a token from the route's bucket (shared by all workers), or a 429.
    let rate_limit = policy
        .rate_limit
        .and_then(|i| at.gen.rate_limits.get(i))
        .map(|l| l.check(peer.ip()));
    if let Some(o) = rate_limit.filter(|o| !o.allowed) {
        lstats.rate_limited.inc();
        flags.insert(Flag::RateLimited);
        if body != BodyKind::None {
            next = Next::Close;
        }
        let mut reply = ErrorReply::new(429, "local_rate_limited").details("local_rate_limited");
        for (name, value) in ratelimit_headers(&o) {
            reply = reply.header(name, value);
        }
        return finish_local(
            down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
        )
        .await;
    }

    // ALLOW_ANY: a host no ServiceEntry declares goes where the request says.
    let passthrough = if cluster.original_dst {
        match passthrough_destination(&head.authority, snapshot, listener, down.transport()).await {
            Ok(addr) => Some(addr),
            Err(reply) => {
                flags.insert(Flag::NoHealthyUpstream);
                if body != BodyKind::None {
                    next = Next::Close;
                }
                return finish_local(
                    down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
                )
                .await;
            }
        }
    } else {
        None
    };

    // Fault injection: a delay (a timer; the worker serves others meanwhile), then an abort,
    // before any upstream is contacted.
    if let Some(fault) = &policy.fault {
        if let Some((delay, share)) = fault.delay {
            if share.hit(worker.rng().next_u64()) {
                lstats.fault_delay.inc();
                flags.insert(Flag::DelayInjected);
                keel_io::time::sleep(delay).await;
            }
        }
        if let Some((abort, share)) = fault.abort {
            if share.hit(worker.rng().next_u64()) {
                lstats.fault_abort.inc();
                flags.insert(Flag::FaultInjected);
                if body != BodyKind::None {
                    next = Next::Close;
                }
                let reply = match abort {
                    keel_config::http_routes::Abort::Http(status) => {
                        ErrorReply::new(status, "fault filter abort").details("fault_filter_abort")
                    }
                    keel_config::http_routes::Abort::Grpc(code) => {
                        ErrorReply::new(200, "fault filter abort")
                            .grpc(code)
                            .details("fault_filter_abort")
                    }
                };
                return finish_local(
                    down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
                )
                .await;
            }
        }
    }
    // The route timeout, shortened by a gRPC client's own deadline (`grpc-timeout`), which Istio
    // has Envoy honour.
    let grpc_deadline = if grpc {
        head.headers.get(b"grpc-timeout").and_then(grpc_timeout)
    } else {
        None
    };
    let deadline = match (policy.timeout, grpc_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .map(|t| Instant::now() + t);

    // Circuit breaker: requests in flight to the cluster, over all workers.
    let Some(_in_flight) = cluster_stats.breaker.request(cluster.limits.max_requests) else {
        cstats.rq_overflow.inc();
        flags.insert(Flag::UpstreamOverflow);
        if body != BodyKind::None {
            next = Next::Close;
        }
        let reply = ErrorReply::overflow();
        return finish_local(
            down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
        )
        .await;
    };

    // Counted in flight (least request) until this exchange ends.
    let (key, set_cookie) = match &cluster.hash_key {
        Some(k) => request_hash(k, &head, peer.ip(), &mut worker.rng()),
        None => (None, None),
    };
    // gRPC servers need `te: trailers`, a hop-by-hop field HTTP/2 keeps.
    let te_trailers = head.headers.has_token(b"te", b"trailers");
    rewrite_request(
        &mut head,
        route,
        target,
        match_index,
        peer.ip(),
        body,
        websocket,
        expect_continue,
        scheme,
        client_cert(at, down.session()),
    );
    if let Some(s) = &span {
        s.inject(&mut head.headers);
    }
    if log.is_on() {
        log.with(|r| {
            if head.path != r.path {
                r.original_path = Some(std::mem::replace(&mut r.path, head.path.clone()));
            }
        });
        // The whole header set for a log line; a span needs only two of them.
        if log.logs() {
            let wanted = snapshot
                .proxy
                .access_log
                .as_ref()
                .map_or(&[][..], |a| &a.request_headers[..]);
            log.with(|r| r.request_headers = Some(head.headers.only(wanted)));
        } else {
            let field = |name: &[u8]| {
                head.headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            log.with(|r| {
                r.request_id = field(b"x-request-id");
                r.user_agent = field(b"user-agent");
            });
        }
    }
    // HTTP/1.1 or HTTP/2 upstream, as the cluster says; an upgrade (WebSocket) always goes over
    // HTTP/1.1, the one that has it.
    let h2 = !websocket
        && match cluster.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Client => head.version == Version::Http2,
        };
    let mut head_bytes = Vec::new();
    if !h2 {
        head_bytes.reserve(512);
        encode::request(&head, &mut head_bytes);
    }
    if expect_continue
        && body != BodyKind::None
        && down
            .interim(&ResponseHead {
                status: 100,
                reason: "Continue".into(),
                version: Version::Http11,
                headers: Headers::default(),
            })
            .await
            .is_err()
    {
        return Next::Close;
    }

    let retry = policy.retry.as_ref();
    let mut replay = Replay::new(
        body,
        limits.max_request_buffer_bytes,
        retry.is_some() || !policy.mirrors.is_empty(),
    );
    let mut mirrored = false;
    // A request without a body is mirrored at once; one with a body once it is whole and kept
    // (`last`: after the tries, a body that could not be kept is counted as a dropped copy).
    let mirror = |replay: &Replay, mirrored: &mut bool, last: bool| {
        let kept = replay.kept();
        // An upgrade (WebSocket) is not mirrored: the copy would open a tunnel of its own.
        if *mirrored || policy.mirrors.is_empty() || websocket || (kept.is_none() && !last) {
            return;
        }
        *mirrored = true;
        for m in &policy.mirrors {
            if m.share.hit(worker.rng().next_u64()) {
                match kept {
                    Some(body) => super::mirror::send(
                        worker,
                        &at.gen,
                        m.cluster,
                        &head,
                        body,
                        te_trailers,
                        policy.timeout,
                    ),
                    None => at.gen.clusters[m.cluster].slots[worker.id]
                        .mirror_dropped
                        .inc(),
                }
            }
        }
    };
    mirror(&replay, &mut mirrored, false);

    // Tries: the first, then retries as the route's policy allows, each to another endpoint when
    // there is one.
    let try_spec = TrySpec {
        cluster: cluster_index,
        head: &head,
        head_bytes: &head_bytes,
        h2,
        te_trailers,
        method: &head.method,
        body,
        // Only an idempotent request without a body may be sent a second time on a fresh
        // connection when a pooled one turns out dead (RFC 9110 §9.2.2).
        replayable: body == BodyKind::None
            && matches!(
                head.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
            ),
        deadline,
        per_try: retry.and_then(|r| r.per_try_timeout),
    };
    let mut tried = Tried::default();
    let mut retries = 0u32;
    let mut _retry_slot = None;
    let mut endpoint_guard;
    let outcome = loop {
        endpoint_guard = match passthrough {
            Some(_) => None,
            None => pick_for_try(worker, at, cluster_index, key, &tried, retry),
        };
        let Some(endpoint) = passthrough.or_else(|| {
            endpoint_guard
                .as_ref()
                .and_then(|p| cluster.endpoints.get(p.endpoint))
                .map(|e| e.address)
        }) else {
            lstats.no_healthy_upstream.inc();
            break Err(Failure::NoHealthyUpstream);
        };
        tried.push(endpoint);
        let result = one_try(worker, at, down, idle, &try_spec, endpoint, &mut replay).await;
        cstats.rq_total.inc();
        if let Ok(a) = &result {
            if let Some(c) = cstats
                .rq_by_class
                .get(usize::from(a.resp.status / 100).wrapping_sub(1))
            {
                c.inc();
            }
        }
        // Outlier detection hears how the endpoint did.
        let outcome = match &result {
            Ok(a) => Some(Outcome::Status(a.resp.status)),
            Err(
                Failure::Connect
                | Failure::Reset
                | Failure::Protocol(_)
                | Failure::PerTryTimeout
                | Failure::Timeout,
            ) => Some(Outcome::LocalFailure),
            Err(_) => None,
        };
        if let (Some(outcome), Some(picked)) = (outcome, endpoint_guard.as_ref()) {
            at.gen
                .report(worker.id, cluster_index, picked.endpoint, outcome);
        }
        match &result {
            Err(Failure::PerTryTimeout) => cstats.rq_per_try_timeout.inc(),
            Err(Failure::Timeout) => cstats.rq_timeout.inc(),
            _ => {}
        }
        let wanted = match (&result, retry) {
            (Ok(a), Some(p)) => p.retries_response(a.resp.status, grpc_status(&a.resp)),
            (Err(f), Some(p)) => f.retriable(p.on),
            (_, None) => false,
        };
        let Some(policy) = retry.filter(|_| wanted) else {
            if retries > 0 {
                cstats.rq_retry_success.inc();
            }
            break result;
        };
        if retries >= policy.retries {
            cstats.rq_retry_limit_exceeded.inc();
            flags.insert(Flag::RetryLimitExceeded);
            break result;
        }
        if !replay.replayable() || deadline.is_some_and(|d| Instant::now() >= d) {
            break result;
        }
        let Some(slot) = cluster_stats.breaker.retry(cluster.limits.max_retries) else {
            cstats.rq_retry_overflow.inc();
            break result;
        };
        _retry_slot = Some(slot);
        // The failed try's connection (and any answer on it) goes now.
        drop(result);
        retries += 1;
        cstats.rq_retry.inc();
        let pause = backoff(retries, &mut worker.rng());
        let pause = match deadline {
            Some(d) => pause.min(d.saturating_duration_since(Instant::now())),
            None => pause,
        };
        keel_io::time::sleep(pause).await;
    };
    mirror(&replay, &mut mirrored, true);
    log.with(|r| {
        r.upstream_host = tried.last().copied();
        r.bytes_received = replay.body_bytes_now();
    });
    if !replay.body_done() {
        // Some of the request body is still unread: the connection cannot carry another request.
        next = Next::Close;
    }
    let answer = match outcome {
        Ok(a) => a,
        Err(Failure::Downstream) => return Next::Close,
        Err(f) => {
            flags.insert(f.flag());
            let reply = f.reply();
            if matches!(f, Failure::BadBody | Failure::Reset | Failure::Protocol(_)) {
                next = Next::Close;
            }
            tracing::debug!(%peer, method = %head.method, path = %head.path, upstream = ?tried.last(), retries, flags = %flags, "upstream failed");
            return finish_local(
                down, lstats, &head, peer, flags, reply, grpc, next, &mut log,
            )
            .await;
        }
    };
    let Answer {
        mut up,
        mut resp,
        mut resp_body,
        early,
        endpoint,
    } = answer;
    if early {
        next = Next::Close;
    }

    let _up_fd = match &up {
        Upstream::H1 { up, .. } => Some(UpstreamFd::new(idle, up.stream.raw_fd())),
        Upstream::H2(_) => None,
    };
    // Informational responses (100, 103) go to the client as they come; the final one follows.
    while (100..200).contains(&resp.status) && resp.status != 101 {
        if head.version != Version::Http10 && down.interim(&resp).await.is_err() {
            return Next::Close;
        }
        let next_head = match &mut up {
            Upstream::H1 { up, .. } => {
                read_response(&up.stream, &mut up.rb, &head.method, activity)
                    .await
                    .map_err(drop)
            }
            Upstream::H2(stream) => stream.response_head().await.map_err(drop),
        };
        match next_head {
            Ok((r, b)) => (resp, resp_body) = (r, b),
            Err(()) => return Next::Close,
        }
    }
    count_status(lstats, resp.status);
    log.with(|r| {
        r.status = resp.status;
        r.details = "via_upstream";
    });

    if resp.status == 101 {
        let Upstream::H1 { up, .. } = up else {
            let _ = down
                .local_reply(502, "101 from an HTTP/2 upstream", Next::Close, &[])
                .await;
            return Next::Close;
        };
        if !websocket {
            let _ = down
                .local_reply(502, "unexpected 101 from upstream", Next::Close, &[])
                .await;
            return Next::Close;
        }
        rewrite_response(
            &mut resp,
            route,
            target,
            Next::KeepAlive,
            BodyKind::None,
            true,
        );
        if let Some(c) = &set_cookie {
            resp.headers.push(b"set-cookie", c.as_bytes());
        }
        if down.interim(&resp).await.is_ok() {
            down.tunnel(up, activity, lstats).await;
        }
        return Next::Close;
    }

    let upstream_close =
        resp.headers.has_token(b"connection", b"close") || resp.version == Version::Http10;
    // HTTP/1.0 has no chunked coding: a 1.0 client gets an unknown-length body close-delimited
    // (de-chunked) and the connection ends; a 1.1 client gets a close-delimited body re-framed as
    // chunked, keeping its connection. (From HTTP/2, `Chunked` is a body of unknown length.)
    let out_body = match resp_body {
        BodyKind::CloseDelimited | BodyKind::Chunked if head.version == Version::Http10 => {
            next = Next::Close;
            BodyKind::CloseDelimited
        }
        BodyKind::CloseDelimited => BodyKind::Chunked,
        other => other,
    };
    rewrite_response(&mut resp, route, target, next, out_body, false);
    if let Some(c) = &set_cookie {
        resp.headers.push(b"set-cookie", c.as_bytes());
    }
    if let Some(o) = &rate_limit {
        for (name, value) in ratelimit_headers(o) {
            resp.headers.set(name.as_bytes(), value.as_bytes());
        }
    }
    if log.logs() {
        let wanted = at
            .gen
            .snapshot
            .proxy
            .access_log
            .as_ref()
            .map_or(&[][..], |a| &a.response_headers[..]);
        log.with(|r| r.response_headers = Some(resp.headers.only(wanted)));
    }
    let progress = super::downstream::Progress::default();
    let source = match &mut up {
        Upstream::H1 { up, .. } => UpstreamBody::H1 {
            up,
            kind: resp_body,
        },
        Upstream::H2(stream) => UpstreamBody::H2 {
            stream,
            kind: resp_body,
        },
    };
    let last = next == Next::Close;
    let copy = down.respond(&resp, source, out_body, last, activity, lstats, &progress);
    // The route timeout covers the response body too: past it the response is cut off.
    let copied = match deadline {
        None => copy.await,
        Some(d) => {
            match keel_io::time::timeout(d.saturating_duration_since(Instant::now()), copy).await {
                Ok(r) => r,
                Err(_) => {
                    cstats.rq_timeout.inc();
                    flags.insert(Flag::UpstreamRequestTimeout);
                    Err(CopyError::Read)
                }
            }
        }
    };
    log.with(|r| {
        r.bytes_sent = progress.sent.get();
        // A full-duplex body may have gone on flowing while the response did.
        r.bytes_received = replay.body_bytes_now();
        // gRPC's status: in the trailers, or in the head of a trailers-only response.
        if grpc {
            r.grpc_status = progress
                .grpc_status
                .get()
                .or(grpc_status(&resp).map(|c| c as u16));
        }
        r.flags = flags;
    });
    if copied.is_err() {
        flags.record(lstats);
        tracing::debug!(%peer, path = %head.path, flags = %flags, "response body interrupted");
        return Next::Close;
    }
    if let Upstream::H1 { up, slot, requests } = up {
        if !upstream_close && resp_body != BodyKind::CloseDelimited && !up.has_buffered() {
            let (stream, _) = up.into_parts();
            let key = (endpoint, crate::upstream::pool_key(&at.gen, cluster_index));
            give_back(
                worker,
                &at.gen,
                cluster_index,
                key,
                PooledConn {
                    stream,
                    slot,
                    requests,
                },
            );
        }
    }
    flags.record(lstats);
    tracing::debug!(%peer, method = %head.method, path = %head.path, status = resp.status, upstream = %endpoint, retries, flags = %flags, duration_us = started.elapsed().as_micros() as u64, "request");
    next
}

/// The endpoints a request has tried, kept inline for the usual one to three tries (no allocation
/// per request).
#[derive(Default)]
struct Tried {
    inline: [Option<SocketAddr>; 3],
    more: Vec<SocketAddr>,
}

impl Tried {
    fn push(&mut self, addr: SocketAddr) {
        match self.inline.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(addr),
            None => self.more.push(addr),
        }
    }

    fn is_empty(&self) -> bool {
        self.inline[0].is_none()
    }

    fn contains(&self, addr: &SocketAddr) -> bool {
        self.inline.iter().flatten().any(|a| a == addr) || self.more.contains(addr)
    }

    fn last(&self) -> Option<&SocketAddr> {
        self.more
            .last()
            .or_else(|| self.inline.iter().rev().flatten().next())
    }
}

/// The endpoint for the next try: with a retry policy that wants another host, up to five picks
/// to find one not tried yet (Istio's `previous_hosts` predicate), then the first endpoint not
/// tried; only when all were tried does a retry go to one again.
fn pick_for_try<'g>(
    worker: &Worker,
    at: &'g ListenerRef,
    cluster: usize,
    key: Option<u64>,
    tried: &Tried,
    retry: Option<&keel_config::http_routes::RetryPolicy>,
) -> Option<crate::generation::InFlight<'g>> {
    let endpoints = &at.gen.snapshot.clusters[cluster].endpoints;
    let avoid = !tried.is_empty() && retry.is_some_and(|r| r.other_host);
    let mut picked = None;
    for _ in 0..if avoid { 5 } else { 1 } {
        picked = at.gen.pick_endpoint(cluster, &mut worker.rng(), key);
        let fresh = picked
            .as_ref()
            .and_then(|p| endpoints.get(p.endpoint))
            .is_some_and(|e| !tried.contains(&e.address));
        if !avoid || fresh || picked.is_none() {
            return picked;
        }
    }
    match endpoints.iter().position(|e| !tried.contains(&e.address)) {
        Some(untried) => {
            drop(picked);
            at.gen.hold_endpoint(cluster, untried)
        }
        None => picked,
    }
}

/// Envoy's jittered exponential back-off before retry `n` (1-based): a random pause up to
/// (2^n - 1) × 25 ms, at most 250 ms.
fn backoff(n: u32, rng: &mut keel_lb::Rng) -> Duration {
    const BASE_MS: u64 = 25;
    const MAX_MS: u64 = 250;
    let ceiling = ((1u64 << n.min(16)) - 1)
        .saturating_mul(BASE_MS)
        .min(MAX_MS);
    Duration::from_micros(rng.next_u64() % (ceiling * 1000 + 1))
}

/// A `grpc-timeout` value (gRPC over HTTP/2 spec: up to 8 digits and a unit H, M, S, m, u, n).
fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A request with `content-type: application/grpc*`: local errors answer in gRPC's terms.
fn is_grpc(head: &RequestHead) -> bool {
    head.headers
        .get(b"content-type")
        .is_some_and(|v| v.starts_with(b"application/grpc"))
}

/// A response's `grpc-status`, when it carries one in its head (a trailers-only gRPC response).
fn grpc_status(resp: &ResponseHead) -> Option<u32> {
    std::str::from_utf8(resp.headers.get(b"grpc-status")?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What one try to send the request needs besides its endpoint.
struct TrySpec<'a> {
    cluster: usize,
    /// The request head as it goes upstream, and (HTTP/1.1) its encoding.
    head: &'a RequestHead,
    head_bytes: &'a [u8],
    /// Over HTTP/2 (else HTTP/1.1).
    h2: bool,
    /// The client asked for trailers (`te: trailers`).
    te_trailers: bool,
    method: &'a str,
    body: BodyKind,
    /// May be resent on a fresh connection when a pooled one turns out dead.
    replayable: bool,
    /// The route timeout's end.
    deadline: Option<Instant>,
    per_try: Option<Duration>,
}

/// What a try's answer came over.
enum Upstream {
    /// An HTTP/1.1 connection of the request's own, given back to the pool after a clean
    /// exchange.
    H1 {
        up: BufferedStream,
        slot: crate::breaker::ConnSlot,
        requests: u32,
    },
    /// A stream on a shared HTTP/2 connection, ended when dropped.
    H2(ClientStream),
}

/// An upstream answer to one try: the connection, its response head, and what comes next.
struct Answer {
    up: Upstream,
    resp: ResponseHead,
    resp_body: BodyKind,
    /// The upstream answered before the whole request body went up.
    early: bool,
    endpoint: SocketAddr,
}

/// Why a try (or the request) got no upstream answer.
enum Failure {
    NoHealthyUpstream,
    Connect,
    /// `maxConnections` busy and `http1MaxPendingRequests` waiting (or waited out).
    Overflow,
    /// The connection closed (or the HTTP/2 stream was reset) before a complete response head.
    Reset,
    /// An HTTP/2 upstream did not take the stream (REFUSED_STREAM, or past its GOAWAY): it was
    /// not processed.
    Refused,
    Protocol(HeadError),
    PerTryTimeout,
    Timeout,
    /// The client went away.
    Downstream,
    /// The client's chunked body broke the framing rules.
    BadBody,
}

impl From<StreamFailure> for Failure {
    fn from(f: StreamFailure) -> Failure {
        match f {
            StreamFailure::Refused => Failure::Refused,
            StreamFailure::Reset => Failure::Reset,
            StreamFailure::Protocol(reason) => Failure::Protocol(HeadError {
                status: 502,
                reason,
            }),
        }
    }
}

impl Failure {
    /// Whether a retry policy with conditions `on` retries this failure (Envoy's semantics: a
    /// connect failure is also a reset, and both are 5xx/gateway errors; a per-try timeout is a
    /// 5xx/gateway error).
    fn retriable(&self, on: keel_config::http_routes::RetryOn) -> bool {
        use keel_config::http_routes::RetryOn as R;
        match self {
            Failure::Connect => {
                on.has(R::CONNECT_FAILURE | R::RESET | R::FIVE_XX | R::GATEWAY_ERROR)
            }
            Failure::Reset | Failure::Protocol(_) => {
                on.has(R::RESET | R::FIVE_XX | R::GATEWAY_ERROR)
            }
            Failure::Refused => {
                on.has(R::REFUSED_STREAM | R::RESET | R::FIVE_XX | R::GATEWAY_ERROR)
            }
            Failure::PerTryTimeout => on.has(R::RESET | R::FIVE_XX | R::GATEWAY_ERROR),
            _ => false,
        }
    }

    fn flag(&self) -> Flag {
        match self {
            Failure::NoHealthyUpstream => Flag::NoHealthyUpstream,
            Failure::Connect => Flag::UpstreamConnectFailure,
            Failure::Overflow => Flag::UpstreamOverflow,
            Failure::Reset | Failure::Refused => Flag::UpstreamConnectionTermination,
            Failure::Protocol(_) => Flag::UpstreamProtocolError,
            Failure::PerTryTimeout | Failure::Timeout => Flag::UpstreamRequestTimeout,
            Failure::Downstream => Flag::DownstreamConnectionTermination,
            Failure::BadBody => Flag::DownstreamProtocolError,
        }
    }

    /// The local reply for this failure, as Envoy words it.
    fn reply(&self) -> ErrorReply {
        self.bare_reply().details(self.flag().details())
    }

    fn bare_reply(&self) -> ErrorReply {
        match self {
            Failure::NoHealthyUpstream => ErrorReply::new(503, "no healthy upstream"),
            Failure::Connect => ErrorReply::new(503, "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
            Failure::Overflow => ErrorReply::overflow(),
            Failure::Reset | Failure::Downstream => ErrorReply::new(503, "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
            Failure::Refused => ErrorReply::new(503, "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"),
            Failure::Protocol(h) => ErrorReply::new(502, h.reason),
            Failure::PerTryTimeout | Failure::Timeout => {
                // gRPC: DEADLINE_EXCEEDED.
                ErrorReply::new(504, "upstream request timeout").grpc(4)
            }
            Failure::BadBody => ErrorReply::new(400, "invalid chunked body"),
        }
    }
}

/// Where an ALLOW_ANY request goes: the address its authority names (the listener's port when
/// it names none), looked up off the worker when it is a name. A destination that is this very
/// listener would loop back into Keel, and is refused.
async fn passthrough_destination(
    authority: &str,
    snapshot: &keel_config::Snapshot,
    listener: &keel_config::Listener,
    down: &keel_tls::Transport,
) -> Result<SocketAddr, ErrorReply> {
    // A captured connection goes where it was going; a bound listener's, where its Host says.
    if let Some(dst) =
        crate::capture::original_destination(snapshot, listener.binding, listener.direction, down)
    {
        return match dst {
            Ok((dst, local)) if !crate::capture::is_capture_port(snapshot, dst, Some(local)) => {
                Ok(dst)
            }
            Ok(_) => Err(
                ErrorReply::new(502, "the destination is this proxy's capture port")
                    .details("passthrough_loop"),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "no original destination");
                Err(
                    ErrorReply::new(503, "no healthy upstream: no original destination")
                        .details("no_original_destination"),
                )
            }
        };
    }
    let addr = crate::resolve::resolve(authority, listener.address.port())
        .await
        .map_err(|e| {
            tracing::debug!(%authority, error = %e, "passthrough destination not resolved");
            ErrorReply::new(503, "no healthy upstream: the host does not resolve")
                .details("dns_resolution_failure")
        })?;
    let own = addr.port() == listener.address.port()
        && (addr.ip() == listener.address.ip()
            || (listener.address.ip().is_unspecified() && addr.ip().is_loopback()));
    if own {
        return Err(
            ErrorReply::new(502, "the destination is this listener itself")
                .details("passthrough_loop"),
        );
    }
    Ok(addr)
}

/// The `x-ratelimit-*` fields of a rate-limited route's responses (Envoy's draft-03 headers).
fn ratelimit_headers(o: &crate::rate_limit::Outcome) -> [(&'static str, String); 3] {
    [
        ("x-ratelimit-limit", o.limit.to_string()),
        ("x-ratelimit-remaining", o.remaining.to_string()),
        ("x-ratelimit-reset", o.reset_secs.to_string()),
    ]
}

/// A local error response: its HTTP status and text, and what a gRPC client is told instead.
struct ErrorReply {
    status: u16,
    text: &'static str,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for it.
    details: &'static str,
    /// The gRPC status for a gRPC request (else mapped from `status` as Envoy does).
    grpc: Option<u32>,
    overloaded: bool,
    /// Extra response fields (`www-authenticate`, `x-ratelimit-*`).
    headers: Vec<(&'static str, String)>,
}

impl ErrorReply {
    fn new(status: u16, text: &'static str) -> ErrorReply {
        ErrorReply {
            status,
            text,
            details: "-",
            grpc: None,
            overloaded: false,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: String) -> ErrorReply {
        self.headers.push((name, value));
        self
    }

    /// A circuit breaker's 503, marked with `x-keel-overloaded: true`.
    fn overflow() -> ErrorReply {
        ErrorReply {
            overloaded: true,
            ..ErrorReply::new(503, "upstream overflow: circuit breaker open").details("overflow")
        }
    }

    fn details(self, details: &'static str) -> ErrorReply {
        ErrorReply { details, ..self }
    }

    fn grpc(self, code: u32) -> ErrorReply {
        ErrorReply {
            grpc: Some(code),
            ..self
        }
    }

    /// The gRPC status a gRPC client gets (Envoy's HTTP-to-gRPC mapping).
    fn grpc_code(&self) -> u32 {
        self.grpc.unwrap_or(match self.status {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        })
    }
}

/// Sends a local error reply (in gRPC's terms to a gRPC client), counts and logs it.
#[allow(clippy::too_many_arguments)]
async fn finish_local<D: Downstream>(
    down: &mut D,
    lstats: &crate::stats::ListenerCounters,
    head: &RequestHead,
    peer: SocketAddr,
    flags: Flags,
    reply: ErrorReply,
    grpc: bool,
    next: Next,
    log: &mut crate::access_log::Entry,
) -> Next {
    let mut extra: Vec<(&str, String)> = Vec::new();
    if reply.overloaded {
        extra.push(("x-keel-overloaded", "true".into()));
    }
    extra.extend(reply.headers.iter().cloned());
    let (status, text) = if grpc {
        extra.push(("content-type", "application/grpc".into()));
        extra.push(("grpc-status", reply.grpc_code().to_string()));
        extra.push(("grpc-message", reply.text.into()));
        (200, "")
    } else {
        (reply.status, reply.text)
    };
    count_status(lstats, status);
    flags.record(lstats);
    log.with(|r| {
        r.status = status;
        r.flags = flags;
        r.details = reply.details;
        r.bytes_sent = text.len() as u64;
        if grpc {
            r.grpc_status = Some(reply.grpc_code() as u16);
        }
    });
    tracing::debug!(%peer, method = %head.method, path = %head.path, status, flags = %flags, "local reply");
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if down.local_reply(status, text, next, &extra).await.is_err() {
        return Next::Close;
    }
    next
}

/// How many times a stream an HTTP/2 upstream refused (never processed: above its GOAWAY's last
/// stream, or REFUSED_STREAM) is sent again within one try, route retries aside. A server that
/// ends connections after N streams (nginx's `keepalive_requests`) refuses a burst's tail on each
/// connection it ends, and a resend can land on another connection near its own end.
const MAX_REFUSED_RESENDS: u32 = 5;

/// One try: a connection (pooled or new, within the circuit breakers) or an HTTP/2 stream, the
/// request sent on it, and its response head awaited, bounded by the per-try timeout and the
/// route timeout.
async fn one_try<D: Downstream>(
    worker: &Rc<Worker>,
    at: &ListenerRef,
    down: &mut D,
    idle: &IdleEntry,
    spec: &TrySpec<'_>,
    endpoint: SocketAddr,
    replay: &mut Replay,
) -> Result<Answer, Failure> {
    let cluster = &at.gen.snapshot.clusters[spec.cluster];
    let mut fresh_only = false;
    let mut refused = 0u32;
    loop {
        // Waiting for a connection slot ends with the route timeout, or else the connect timeout.
        let now = Instant::now();
        let wait_until = spec
            .deadline
            .unwrap_or(now + cluster.connect_timeout)
            .min(now + cluster.connect_timeout);
        let acquired = acquire(
            worker,
            &at.gen,
            spec.cluster,
            endpoint,
            spec.replayable && !fresh_only,
            spec.h2,
            wait_until,
        );
        let acquired = match spec.deadline {
            None => acquired.await,
            Some(d) => {
                match keel_io::time::timeout(d.saturating_duration_since(now), acquired).await {
                    Ok(r) => r,
                    Err(_) => return Err(Failure::Timeout),
                }
            }
        };
        let (conn, reused) = match acquired {
            Ok(c) => c,
            Err(AcquireError::Connect(e)) => {
                worker.upstream_connect_failed(at, spec.cluster, endpoint, &e);
                return Err(Failure::Connect);
            }
            Err(AcquireError::SharedConnect) => return Err(Failure::Connect),
            Err(AcquireError::Overflow) => {
                at.gen.clusters[spec.cluster].slots[worker.id]
                    .rq_pending_overflow
                    .inc();
                return Err(Failure::Overflow);
            }
            Err(AcquireError::WaitTimeout) => {
                return Err(if spec.deadline.is_some_and(|d| Instant::now() >= d) {
                    Failure::Timeout
                } else {
                    at.gen.clusters[spec.cluster].slots[worker.id]
                        .rq_pending_overflow
                        .inc();
                    Failure::Overflow
                })
            }
        };
        // The try's own time limit: the per-try timeout, within the route timeout.
        let now = Instant::now();
        let per_try_end = spec.per_try.map(|t| now + t);
        let limit = match (per_try_end, spec.deadline) {
            (Some(p), Some(d)) => Some((p.min(d), p < d)),
            (Some(p), None) => Some((p, true)),
            (None, Some(d)) => Some((d, false)),
            (None, None) => None,
        };
        // A pooled connection the peer had closed (or, over HTTP/2, a stream it refused) is tried
        // once more on a fresh connection, when the request can be sent again.
        let result = match conn {
            Acquired::H1(PooledConn {
                stream,
                slot,
                requests,
            }) => {
                let mut up = BufferedStream::new(stream);
                let dead_pooled = reused && !fresh_only && spec.replayable && !idle.expired();
                match within(limit, send_and_await(&mut up, down, idle, spec, replay)).await {
                    Ok((resp, resp_body, early)) => Ok(Answer {
                        up: Upstream::H1 { up, slot, requests },
                        resp,
                        resp_body,
                        early,
                        endpoint,
                    }),
                    Err(Failure::Reset) if dead_pooled => Err(None),
                    Err(f) => Err(Some(f)),
                }
            }
            Acquired::H2(mut stream) => {
                let again = !fresh_only && !idle.expired();
                match within(limit, send_and_await_h2(&mut stream, down, spec, replay)).await {
                    Ok((resp, resp_body, early)) => Ok(Answer {
                        up: Upstream::H2(stream),
                        resp,
                        resp_body,
                        early,
                        endpoint,
                    }),
                    Err(Failure::Refused)
                        if refused < MAX_REFUSED_RESENDS
                            && replay.replayable()
                            && !idle.expired() =>
                    {
                        refused += 1;
                        at.gen.clusters[spec.cluster].slots[worker.id]
                            .rq_refused_resent
                            .inc();
                        Err(None)
                    }
                    Err(Failure::Reset) if again && reused && spec.replayable => Err(None),
                    Err(f) => Err(Some(f)),
                }
            }
        };
        match result {
            Ok(answer) => return Ok(answer),
            Err(None) => fresh_only = true,
            Err(Some(f)) => return Err(f),
        }
    }
}

/// A try's wait, cut off at `limit`'s instant (`true`: the per-try timeout's, else the route's).
async fn within<T>(
    limit: Option<(Instant, bool)>,
    sent: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match limit {
        None => sent.await,
        Some((end, per_try)) => {
            match keel_io::time::timeout(end.saturating_duration_since(Instant::now()), sent).await
            {
                Ok(r) => r,
                Err(_) if per_try => Err(Failure::PerTryTimeout),
                Err(_) => Err(Failure::Timeout),
            }
        }
    }
}

/// Waits for the response head while the request body goes up (from the client, or kept from an
/// earlier try), since an upstream may answer early (a 413, a redirect) and stop reading, and
/// its answer is what the client must get. `sent_early`: whether the head came before the body
/// was all sent.
async fn body_and_head(
    sending: impl std::future::Future<Output = Result<(), SendError>>,
    receiving: impl std::future::Future<Output = Result<(ResponseHead, BodyKind), Failure>>,
) -> Result<(ResponseHead, BodyKind, bool), Failure> {
    let mut sending = std::pin::pin!(sending);
    let mut receiving = std::pin::pin!(receiving);
    let mut sent: Option<Result<(), SendError>> = None;
    let (sent, response) = loop {
        monoio::select! {
            done = &mut sending, if sent.is_none() => {
                // A fault on the client's side ends the exchange; the response is not awaited.
                match done {
                    Err(SendError::Downstream) => return Err(Failure::Downstream),
                    Err(SendError::BadBody) => return Err(Failure::BadBody),
                    other => sent = Some(other),
                }
            },
            r = &mut receiving => {
                // A response before the whole body went up: the rest of the request is
                // abandoned, so neither connection can carry another message.
                let sent = sent.take().unwrap_or(Err(SendError::Upstream));
                break (if r.is_ok() && sent.is_err() { Err(SendError::EarlyResponse) } else { sent }, r);
            },
        }
    };
    let early = matches!(sent, Err(SendError::EarlyResponse));
    response.map(|(r, b)| (r, b, early))
}

/// Writes the request on an HTTP/1.1 connection and reads the response head.
async fn send_and_await<D: Downstream>(
    up: &mut BufferedStream,
    down: &mut D,
    idle: &IdleEntry,
    spec: &TrySpec<'_>,
    replay: &mut Replay,
) -> Result<(ResponseHead, BodyKind, bool), Failure> {
    let activity = &idle.activity;
    // UpstreamFd: while this upstream is in use, an idle timeout shuts it down too.
    let _up_fd = UpstreamFd::new(idle, up.stream.raw_fd());
    if up.stream.write_all(spec.head_bytes).await.is_err() {
        return Err(Failure::Reset);
    }
    let BufferedStream {
        stream: up_stream,
        rb: up_rb,
    } = up;
    let up_stream = &*up_stream;
    let receiving = async {
        read_response(up_stream, up_rb, spec.method, activity)
            .await
            .map_err(|e| match e {
                ResponseError::Head(h) => Failure::Protocol(h),
                ResponseError::Closed => Failure::Reset,
            })
    };
    if spec.body == BodyKind::None {
        return receiving.await.map(|(r, b)| (r, b, false));
    }
    // Boxed: a body's copy is a large future that requests without a body never need.
    let mut sink = H1Sink::new(up_stream, spec.body == BodyKind::Chunked);
    let sending = send_body(&mut sink, down, spec.body, activity, replay);
    Box::pin(body_and_head(sending, receiving)).await
}

/// Opens the request's HTTP/2 stream and awaits the response head. A body from an HTTP/2 client
/// moves in a task of its own ([`BodyPump`]) and keeps flowing once the response has started
/// (full duplex, which gRPC streaming needs); any other body goes up while the head is awaited,
/// as over HTTP/1.1.
async fn send_and_await_h2<D: Downstream>(
    stream: &mut ClientStream,
    down: &mut D,
    spec: &TrySpec<'_>,
    replay: &mut Replay,
) -> Result<(ResponseHead, BodyKind, bool), Failure> {
    let end = spec.body == BodyKind::None;
    stream
        .open(spec.head, end, spec.te_trailers)
        .map_err(|_| Failure::Reset)?;
    let stream = &*stream;
    let receiving = async { stream.response_head().await.map_err(Failure::from) };
    if end {
        return receiving.await.map(|(r, b)| (r, b, false));
    }
    let Some(upload) = stream.upload() else {
        return Err(Failure::Reset);
    };
    // Boxed: what moves a body is a large future that requests without a body never need.
    Box::pin(body_then_head_h2(upload, receiving, down, spec, replay)).await
}

/// [`send_and_await_h2`] for a request with a body.
async fn body_then_head_h2<D: Downstream>(
    mut upload: super::h2::client::Upload,
    receiving: impl std::future::Future<Output = Result<(ResponseHead, BodyKind), Failure>>,
    down: &mut D,
    spec: &TrySpec<'_>,
    replay: &mut Replay,
) -> Result<(ResponseHead, BodyKind, bool), Failure> {
    if replay.unread() {
        if let Some(reader) = down.duplex() {
            let read = Rc::new(Cell::new(0u64));
            let pump = BodyPump::start(
                reader,
                upload,
                std::mem::replace(replay, Replay::elsewhere(read.clone())),
                read,
            );
            let mut receiving = std::pin::pin!(receiving);
            let answer = monoio::select! {
                r = &mut receiving => r,
                failed = pump.failed() => {
                    if failed == SendError::Downstream {
                        // The client went away: its request is cancelled upstream.
                        return Err(Failure::Downstream);
                    }
                    // The upstream side failed (the pump reset the stream): what is left to hear
                    // is its answer or its error, which comes at once.
                    (&mut receiving).await
                },
            };
            // The body went whole before the head came: it is back for retries and mirrors.
            if let Some(done) = pump.take_replay() {
                *replay = done;
            }
            return answer.map(|(r, b)| (r, b, false));
        }
    }
    let activity = Cell::new(0);
    let sending = send_body(&mut upload, down, spec.body, &activity, replay);
    body_and_head(sending, receiving).await
}

/// A request body moving from an HTTP/2 client to an HTTP/2 upstream in a task of its own, so it
/// goes on flowing while the response streams back.
struct BodyPump {
    /// The body's replay state, handed back once the body went whole.
    replay: RefCell<Option<Replay>>,
    failed: Cell<Option<SendError>>,
    waker: Cell<Option<std::task::Waker>>,
}

impl BodyPump {
    /// Starts moving the body; `read` counts its bytes as they go (the request's access log and
    /// metrics read it when the exchange ends, whether or not the body has).
    fn start(
        reader: super::h2::server::StreamHandle,
        mut upload: super::h2::client::Upload,
        mut replay: Replay,
        read: Rc<Cell<u64>>,
    ) -> Rc<BodyPump> {
        let pump = Rc::new(BodyPump {
            replay: RefCell::new(None),
            failed: Cell::new(None),
            waker: Cell::new(None),
        });
        let me = pump.clone();
        monoio::spawn(async move {
            replay.start();
            let activity = Cell::new(0u32);
            let result = {
                let mut tap = Tap {
                    sink: &mut upload,
                    replay: &mut replay,
                };
                reader
                    .body_into(&mut tap, &activity, |n| read.set(read.get() + n as u64))
                    .await
            };
            replay.body_bytes += read.get();
            match result {
                Ok(()) => {
                    replay.finish();
                    *me.replay.borrow_mut() = Some(replay);
                }
                Err(e) => {
                    // Whichever side failed, the stream cannot complete: reset it (once), so
                    // that the response side hears it at once.
                    upload.cancel();
                    me.failed.set(Some(match e {
                        CopyError::Write => SendError::Upstream,
                        CopyError::Read => SendError::Downstream,
                        CopyError::Framing => SendError::BadBody,
                    }));
                }
            }
            if let Some(w) = me.waker.take() {
                w.wake();
            }
        });
        pump
    }

    /// Resolves when the pump has failed (never, while it runs or once it succeeded).
    async fn failed(&self) -> SendError {
        std::future::poll_fn(|cx| match self.failed.get() {
            Some(e) => std::task::Poll::Ready(e),
            None => {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }

    fn take_replay(&self) -> Option<Replay> {
        self.replay.borrow_mut().take()
    }
}

/// The request's hash for consistent hashing — `None` when it lacks the key (the pick is then
/// random, as Envoy's) — and, for a cookie key Keel had to make up, the `set-cookie` value that
/// pins the client to the same endpoint from its next request on.
fn request_hash(
    key: &keel_config::HashKey,
    head: &RequestHead,
    peer: IpAddr,
    rng: &mut keel_lb::Rng,
) -> (Option<u64>, Option<String>) {
    use keel_config::HashKey;
    use keel_lb::hash::hash_bytes;
    match key {
        HashKey::Header(name) => (
            head.headers.get(name.as_bytes()).map(|v| hash_bytes(v, 0)),
            None,
        ),
        HashKey::SourceIp => (Some(crate::generation::source_ip_hash(peer)), None),
        HashKey::QueryParameter(name) => (
            head.query().and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then(|| hash_bytes(v.as_bytes(), 0))
                })
            }),
            None,
        ),
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => {
            let sent = head.headers.get(b"cookie").and_then(|all| {
                all.split(|b| *b == b';').find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                    (k == name.as_bytes()).then(|| hash_bytes(&v[1..], 0))
                })
            });
            match (sent, ttl) {
                (Some(hash), _) => (Some(hash), None),
                (None, None) => (None, None),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", rng.next_u64());
                    let mut cookie = format!("{name}={value}");
                    if !ttl.is_zero() {
                        cookie.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
                    }
                    if let Some(p) = path {
                        cookie.push_str(&format!("; Path={p}"));
                    }
                    cookie.push_str("; HttpOnly");
                    for a in attributes {
                        cookie.push_str("; ");
                        cookie.push_str(a);
                    }
                    (Some(hash_bytes(value.as_bytes(), 0)), Some(cookie))
                }
            }
        }
    }
}

/// Registers an upstream socket with the connection's idle entry while it is in use.
struct UpstreamFd<'a>(&'a IdleEntry);

impl<'a> UpstreamFd<'a> {
    fn new(idle: &'a IdleEntry, fd: std::os::fd::RawFd) -> UpstreamFd<'a> {
        idle.set_upstream(fd);
        UpstreamFd(idle)
    }
}

impl Drop for UpstreamFd<'_> {
    fn drop(&mut self) {
        self.0.set_upstream(-1);
    }
}

/// Whether the client asked to keep the connection (HTTP/1.1 default) or to close it.
fn client_wants(head: &RequestHead) -> Next {
    let close = head.headers.has_token(b"connection", b"close");
    let keep = head.headers.has_token(b"connection", b"keep-alive");
    match head.version {
        Version::Http10 if !keep => Next::Close,
        _ if close => Next::Close,
        _ => Next::KeepAlive,
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) and those the message's Connection header names.
fn strip_hop_by_hop(headers: &mut Headers, keep_upgrade: bool) {
    headers.remove_hop_by_hop(keep_upgrade);
}

fn apply_ops(headers: &mut Headers, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name.as_bytes());
    }
    for (name, value) in &ops.set {
        headers.set(name.as_bytes(), value.as_bytes());
    }
    for (name, value) in &ops.add {
        headers.push(name.as_bytes(), value.as_bytes());
    }
}

/// The `x-forwarded-client-cert` element for a request on an mTLS connection of an inbound
/// listener, as Envoy writes it (`By=<our SPIFFE id>;Hash=<SHA-256 of the peer's
/// certificate>;URI=<the peer's SPIFFE id>`); `None` elsewhere.
fn client_cert(at: &ListenerRef, session: Option<&keel_tls::Session>) -> Option<String> {
    if at.config().direction != keel_config::Direction::Inbound {
        return None;
    }
    let session = session?;
    let hash = session.peer_cert_sha256.as_deref()?;
    let mut element = String::with_capacity(200);
    if let Some(me) = &at.gen.tls.identity {
        element.push_str("By=");
        element.push_str(me.uri());
        element.push(';');
    }
    element.push_str("Hash=");
    element.push_str(hash);
    if let Some(peer) = &session.peer_id {
        element.push_str(";URI=");
        element.push_str(peer.uri());
    }
    Some(element)
}

/// `x-forwarded-proto` from the downstream connection when the client did not set it, and
/// `x-forwarded-client-cert`: with a verified client certificate our element is appended to what
/// came (Envoy's APPEND_FORWARD, Istio's sidecar default); without one the header is removed, so
/// a client cannot claim an identity it did not prove.
fn forwarded_security(h: &mut Headers, scheme: &str, client_cert: Option<String>) {
    if !h.contains(b"x-forwarded-proto") {
        h.push(b"x-forwarded-proto", scheme.as_bytes());
    }
    match client_cert {
        None => {
            h.remove(b"x-forwarded-client-cert");
        }
        Some(element) => {
            let value = match h.get(b"x-forwarded-client-cert") {
                Some(prev) if !prev.is_empty() => {
                    format!("{},{element}", String::from_utf8_lossy(prev))
                }
                _ => element,
            };
            h.set(b"x-forwarded-client-cert", value.as_bytes());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn rewrite_request(
    head: &mut RequestHead,
    route: &HttpRoute,
    target: &RouteTarget,
    match_index: usize,
    peer: IpAddr,
    body: BodyKind,
    websocket: bool,
    expect_continue: bool,
    scheme: &str,
    client_cert: Option<String>,
) {
    let h = &mut head.headers;
    strip_hop_by_hop(h, websocket);
    if expect_continue {
        h.remove(b"expect");
    }
    h.remove(b"content-length");
    match body {
        BodyKind::Length(n) => h.push(b"content-length", Decimal::of(n).as_bytes()),
        BodyKind::Chunked => h.push(b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if websocket {
        h.push(b"connection", b"upgrade");
    }
    // As Envoy: append the client's address to x-forwarded-for, default x-forwarded-proto, and make
    // sure every request carries an x-request-id.
    match h.get(b"x-forwarded-for") {
        Some(prev) => {
            let xff = format!("{}, {peer}", String::from_utf8_lossy(prev));
            h.set(b"x-forwarded-for", xff.as_bytes());
        }
        None => {
            // The usual case, without an allocation: an address fits in 45 bytes.
            let mut buf = [0u8; 48];
            let n = write_ip(peer, &mut buf);
            h.set(b"x-forwarded-for", &buf[..n]);
        }
    }
    forwarded_security(h, scheme, client_cert);
    if !h.contains(b"x-request-id") {
        h.push(b"x-request-id", &request_id());
    }
    apply_ops(h, &route.request_headers);
    apply_ops(h, &target.request_headers);
    if let RouteAction::Forward {
        rewrite: Some(rw), ..
    } = &route.action
    {
        if let Some(uri) = &rw.uri {
            let prefix = route.matches.get(match_index).and_then(|m| match &m.uri {
                Some(StringMatch::Prefix(p)) => Some(p.as_str()),
                _ => None,
            });
            head.path = match prefix {
                Some(p) if head.path.starts_with(p) => format!("{uri}{}", &head.path[p.len()..]),
                _ => match head.query() {
                    Some(q) => format!("{uri}?{q}"),
                    None => uri.clone(),
                },
            };
        }
        if let Some(a) = &rw.authority {
            head.authority = a.clone();
        }
    }
}

fn rewrite_response(
    resp: &mut ResponseHead,
    route: &HttpRoute,
    target: &RouteTarget,
    next: Next,
    body: BodyKind,
    upgrade: bool,
) {
    let h = &mut resp.headers;
    strip_hop_by_hop(h, upgrade);
    match body {
        BodyKind::Length(_) => {}
        BodyKind::Chunked => {
            h.remove(b"content-length");
            h.push(b"transfer-encoding", b"chunked");
        }
        BodyKind::CloseDelimited => {
            h.remove(b"content-length");
        }
        BodyKind::None => {}
    }
    if upgrade {
        h.push(b"connection", b"upgrade");
    } else if next == Next::Close {
        h.push(b"connection", b"close");
    }
    apply_ops(h, &route.response_headers);
    apply_ops(h, &target.response_headers);
}

/// A random version-4 UUID, as Envoy generates for x-request-id, in its 36-byte text form.
fn request_id() -> [u8; 36] {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1);
    }
    let next = || {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    };
    let (a, b) = (next(), next());
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    // 8-4-4-4-12 hex digits: `a` gives the first 16, `b` the last 16.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut digit = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        let word = if digit < 16 { a } else { b };
        let shift = 60 - 4 * (digit % 16);
        *slot = HEX[((word >> shift) & 0xf) as usize];
        digit += 1;
    }
    out
}

/// Writes `ip` as text into `buf` (IPv4 by hand, the common case; IPv6 through `Display`) and
/// returns its length.
fn write_ip(ip: IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let digits = Decimal::of(u64::from(octet));
                let digits = digits.as_bytes();
                buf[n..n + digits.len()].copy_from_slice(digits);
                n += digits.len();
            }
            n
        }
        IpAddr::V6(_) => {
            let mut w = &mut buf[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
            48 - w.len()
        }
    }
}

/// A number's decimal digits on the stack, for header values built per request.
struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    fn of(mut n: u64) -> Decimal {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Decimal { digits, start }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendError {
    Upstream,
    Downstream,
    /// The client's chunked body broke the framing rules: nothing more is forwarded.
    BadBody,
    /// The upstream answered before the whole body was sent.
    EarlyResponse,
}

/// Sends the request body upstream: the kept copy on a retry, else streamed from the client (and
/// kept on the way, within the bound, for later tries and mirrors).
async fn send_body<D: Downstream>(
    to: &mut impl BodySink,
    down: &mut D,
    body: BodyKind,
    activity: &Cell<u32>,
    replay: &mut Replay,
) -> Result<(), SendError> {
    if let Some((data, trailers)) = replay.kept() {
        to.data(data).await.map_err(|_| SendError::Upstream)?;
        return to.finish(trailers).await.map_err(|_| SendError::Upstream);
    }
    if !replay.unread() {
        // Read (in part) by an earlier try and not kept: nothing can be sent again.
        return Err(SendError::Downstream);
    }
    replay.start();
    let read = Cell::new(0u64);
    let counted = |n: usize| read.set(read.get() + n as u64);
    let result = {
        let mut tap = Tap { sink: to, replay };
        down.body_to(&mut tap, body, activity, counted).await
    };
    replay.body_bytes += read.get();
    if result.is_ok() {
        replay.finish();
    }
    result.map_err(|e| match e {
        CopyError::Write => SendError::Upstream,
        CopyError::Read => SendError::Downstream,
        CopyError::Framing => SendError::BadBody,
    })
}

pub(crate) enum ResponseError {
    Head(HeadError),
    Closed,
}

/// Reads a response head from an upstream connection (`method`: the request's, for HEAD).
pub(crate) async fn read_response(
    stream: &Transport,
    rb: &mut ReadBuf,
    method: &str,
    activity: &Cell<u32>,
) -> Result<(ResponseHead, BodyKind), ResponseError> {
    let limits = Limits::default();
    loop {
        if rb.has_buffered() {
            match parse_response(rb.buffered(), method, &limits) {
                Ok(Some((head, len, body))) => {
                    rb.consume(len);
                    return Ok((head, body));
                }
                Ok(None) => {}
                Err(e) => return Err(ResponseError::Head(e)),
            }
        }
        match rb.fill(stream, activity).await {
            Ok(0) | Err(_) => return Err(ResponseError::Closed),
            Ok(_) => {}
        }
    }
}

/// A response Keel makes itself.
pub(crate) async fn local_reply(
    stream: &Transport,
    status: u16,
    body: &str,
    next: Next,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let mut out = Vec::with_capacity(160 + body.len());
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n",
        encode::reason(status),
        body.len()
    );
    for (k, v) in extra {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if next == Next::Close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    if next == Next::Close {
        // Let the client read the reply before the close: half-close (the FIN with the reply),
        // then give it a moment.
        stream.write_final_vectored(&[&out]).await?;
        let _ = keel_io::time::timeout(Duration::from_millis(200), stream.readable()).await;
    } else {
        stream.write_all(&out).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = super::request_id();
            let text = std::str::from_utf8(&id).unwrap();
            let groups: Vec<&str> = text.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(text
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(groups[2].starts_with('4'), "{text}");
            assert!(
                matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "{text}"
            );
            assert!(seen.insert(text.to_string()));
        }
    }

    #[test]
    fn addresses_written_on_the_stack() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.20.3.199",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut buf = [0u8; 48];
            let n = super::write_ip(ip, &mut buf);
            assert_eq!(&buf[..n], ip.to_string().as_bytes());
        }
    }

    #[test]
    fn decimals_on_the_stack() {
        for n in [0u64, 7, 10, 1024, u64::MAX] {
            assert_eq!(super::Decimal::of(n).as_bytes(), n.to_string().as_bytes());
        }
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            super::grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(super::grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(super::grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(super::grpc_timeout(b"123456789m"), None, "at most 8 digits");
        assert_eq!(super::grpc_timeout(b"5x"), None);
        assert_eq!(super::grpc_timeout(b"m"), None);
    }
}
