//! HTTP/1.1 proxying: read a request, route it, forward it over a pooled upstream connection, and
//! stream the response back; repeat on keep-alive connections, answering pipelined requests in order.
//!
//! Every failure before the response head is forwarded becomes a local reply with an Envoy response
//! flag (NR, UH, UF, UC, UPE, DPE); after that point the only honest signal is closing the connection.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use keel_config::http_routes::{
    HeaderOps, HttpRoute, HttpRouteTable, RequestView, RouteAction, RouteTarget, StringMatch,
};
use keel_config::HttpLimits;
use keel_io::ConnectError;
use keel_tls::Transport;

use super::conn::{BufferedStream, ReadBuf};
use super::h1::chunked::{self, Step};
use super::h1::{encode, parse_request, parse_response, BodyKind, HeadError, Limits};
use super::head::{RequestHead, ResponseHead, Version};
use super::headers::Headers;
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
}

impl Flag {
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
        }
    }
}

/// Whether the downstream connection can carry another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
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
    let _ = down.set_nodelay();
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

impl Drop for Conn {
    fn drop(&mut self) {
        self.worker.connection_closed(&self.at.state);
    }
}

/// Serves requests on one connection until either side is done.
///
/// A plain `fn` returning an `async move` block that captures `c`: an `async fn` would move its
/// argument into a second copy inside the future (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)]
fn requests(mut c: Conn) -> impl std::future::Future<Output = ()> {
    async move {
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
            tracing::debug!(%peer, status = e.status, reason = e.reason, flag = "DPE", "refused request");
            let _ = local_reply(&down.stream, e.status, e.reason, Next::Close, &[]).await;
            return Next::Close;
        }
        Err(ReadError::Timeout) => {
            lstats.rq_total.inc();
            count_status(lstats, 408);
            let _ = local_reply(&down.stream, 408, "request head timeout", Next::Close, &[]).await;
            return Next::Close;
        }
        Err(ReadError::Io) => return Next::Close,
    };
    lstats.rq_total.inc();
    at.refresh(worker);
    exchange(worker, at, down, head, peer, idle).await
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
            // Boxed: the timer exists only while a head arrives in pieces, not in the state every
            // idle connection carries.
            Some(d) => match Box::pin(monoio::time::timeout(
                d.saturating_duration_since(Instant::now()),
                down.fill(activity),
            ))
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
    table: &'a HttpRouteTable,
    head: &RequestHead,
    port: u16,
    scheme: &'static str,
) -> Decision<'a> {
    let Some(vhost) = table.virtual_host(&head.authority) else {
        return Decision::Reply {
            status: 404,
            body: String::new(),
            flag: Flag::NoRoute,
            extra: vec![],
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
            let port = r.port.map(|p| format!(":{p}")).unwrap_or_else(|| {
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
async fn exchange(
    worker: &Rc<Worker>,
    at: &ListenerRef,
    down: &mut BufferedStream,
    (mut head, body): (RequestHead, BodyKind),
    peer: SocketAddr,
    idle: &IdleEntry,
) -> Next {
    let activity = &idle.activity;
    let snapshot = &*at.gen.snapshot;
    let listener = at.config();
    let lstats = at.counters(worker.id);
    let started = Instant::now();
    let mut next = client_wants(&head);
    if at.state.is_draining() {
        // The listener drains (removed by a reload, SIGTERM, /drain_listeners): this response
        // carries `Connection: close`.
        next = Next::Close;
    }

    if head.method == "CONNECT" {
        count_status(lstats, 405);
        let _ = local_reply(
            &down.stream,
            405,
            "CONNECT is not enabled",
            Next::Close,
            &[],
        )
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
            let _ = local_reply(&down.stream, 417, "unsupported Expect", Next::Close, &[]).await;
            return Next::Close;
        }
    };

    let Some(table) = &listener.http else {
        return Next::Close;
    };
    let scheme = if down.stream.session().is_some() {
        "https"
    } else {
        "http"
    };
    let (route, target, match_index) = match decide(
        worker,
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
            tracing::debug!(%peer, method = %head.method, path = %head.path, status, flag = flag.as_str(), "local reply");
            // Unread request body bytes would be taken for the next request: close instead.
            if body != BodyKind::None {
                next = Next::Close;
            }
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if local_reply(&down.stream, status, &text, next, &extra)
                .await
                .is_err()
            {
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
    let cluster = &snapshot.clusters[target.target.cluster];
    // Counted in flight (least request) until this exchange ends.
    let (key, set_cookie) = match &cluster.hash_key {
        Some(k) => request_hash(k, &head, peer.ip(), &mut worker.rng()),
        None => (None, None),
    };
    let picked = at
        .gen
        .pick_endpoint(target.target.cluster, &mut worker.rng(), key);
    let Some(endpoint) = picked
        .as_ref()
        .and_then(|p| cluster.endpoints.get(p.endpoint))
    else {
        lstats.no_healthy_upstream.inc();
        count_status(lstats, 503);
        if body != BodyKind::None {
            next = Next::Close;
        }
        let _ = local_reply(&down.stream, 503, "no healthy upstream", next, &[]).await;
        return next;
    };

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
        client_cert(at, &down.stream),
    );
    let mut head_bytes = Vec::with_capacity(512);
    encode::request(&head, &mut head_bytes);
    if expect_continue
        && body != BodyKind::None
        && down
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return Next::Close;
    }

    // Send the request; a pooled connection that turns out dead before any response byte is
    // replaced once by a fresh one when the request has no body to replay.
    // Only an idempotent request without a body may be sent a second time (RFC 9110 §9.2.2).
    let replayable = body == BodyKind::None
        && matches!(
            head.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        );
    let mut attempt = 0;
    let (mut up, response, early) = loop {
        attempt += 1;
        let (up_stream, reused) = match upstream(
            worker,
            &at.gen,
            target.target.cluster,
            endpoint.address,
            replayable && attempt == 1,
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                worker.upstream_connect_failed(at, target.target.cluster, endpoint.address, &e);
                count_status(lstats, 503);
                if body != BodyKind::None {
                    next = Next::Close;
                }
                let _ = local_reply(&down.stream, 503, "upstream connect error or disconnect/reset before headers. reset reason: connection failure", next, &[]).await;
                return next;
            }
        };
        let mut up = BufferedStream::new(up_stream);
        // While this upstream is in use, an idle timeout shuts it down too (declared after `up`,
        // so the fd is forgotten before `up` can close it).
        let _up_fd = UpstreamFd::new(idle, up.stream.raw_fd());
        if up.stream.write_all(&head_bytes).await.is_err() {
            if reused && attempt == 1 && replayable && !idle.expired() {
                continue;
            }
            count_status(lstats, 503);
            let _ = local_reply(&down.stream, 503, "upstream connect error or disconnect/reset before headers. reset reason: connection termination", Next::Close, &[]).await;
            return Next::Close;
        }
        // The body goes up while the response head is awaited: an upstream may answer early (a 413,
        // a redirect) and stop reading, and its answer is what the client must get.
        let (sent, response) = if body == BodyKind::None {
            (
                Ok(()),
                read_response(&up.stream, &mut up.rb, &head.method, activity).await,
            )
        } else {
            let BufferedStream {
                stream: up_stream,
                rb: up_rb,
            } = &mut up;
            let up_stream = &*up_stream;
            let mut sending = std::pin::pin!(send_body(up_stream, down, body, activity));
            let mut receiving =
                std::pin::pin!(read_response(up_stream, up_rb, &head.method, activity));
            let mut sent: Option<Result<(), SendError>> = None;
            loop {
                monoio::select! {
                    done = &mut sending, if sent.is_none() => {
                        // A fault on the client's side ends the exchange; the response is not awaited
                        // (the placeholder below is never looked at: the send error is handled first).
                        if matches!(done, Err(SendError::Downstream) | Err(SendError::BadBody)) {
                            break (done, Err(ResponseError::Closed));
                        }
                        sent = Some(done);
                    },
                    r = &mut receiving => {
                        // A response before the whole body went up: the rest of the request is
                        // abandoned, so neither connection can carry another message.
                        let sent = sent.take().unwrap_or(Err(SendError::Upstream));
                        break (if r.is_ok() && sent.is_err() { Err(SendError::EarlyResponse) } else { sent }, r);
                    },
                }
            }
        };
        let early = matches!(sent, Err(SendError::EarlyResponse));
        match sent {
            Err(SendError::Downstream) => return Next::Close,
            Err(SendError::BadBody) => {
                // The upstream connection is dropped with the partial request; the client is told.
                count_status(lstats, 400);
                tracing::debug!(%peer, path = %head.path, flag = Flag::DownstreamProtocolError.as_str(), "invalid chunked request body");
                let _ =
                    local_reply(&down.stream, 400, "invalid chunked body", Next::Close, &[]).await;
                return Next::Close;
            }
            _ => {}
        }
        match response {
            Ok(r) => break (up, r, early),
            Err(ResponseError::Closed)
                if reused && attempt == 1 && replayable && !idle.expired() =>
            {
                continue
            }
            Err(e) => {
                let (status, text, flag) = match e {
                    ResponseError::Head(h) => (502, h.reason, Flag::UpstreamProtocolError),
                    _ => (503, "upstream connect error or disconnect/reset before headers. reset reason: connection termination", Flag::UpstreamConnectionTermination),
                };
                count_status(lstats, status);
                tracing::debug!(%peer, method = %head.method, path = %head.path, status, flag = flag.as_str(), upstream = %endpoint.address, "upstream failed");
                let _ = local_reply(&down.stream, status, text, Next::Close, &[]).await;
                return Next::Close;
            }
        }
    };
    if early {
        next = Next::Close;
    }

    let _up_fd = UpstreamFd::new(idle, up.stream.raw_fd());
    // Informational responses (100, 103) go to the client as they come; the final one follows.
    let (mut resp, mut resp_body) = response;
    while (100..200).contains(&resp.status) && resp.status != 101 {
        if head.version == Version::Http11 {
            let mut bytes = Vec::new();
            encode::response(&resp, &mut bytes);
            if down.stream.write_all(&bytes).await.is_err() {
                return Next::Close;
            }
        }
        match read_response(&up.stream, &mut up.rb, &head.method, activity).await {
            Ok((r, b)) => (resp, resp_body) = (r, b),
            Err(_) => return Next::Close,
        }
    }
    count_status(lstats, resp.status);

    if resp.status == 101 {
        if !websocket {
            let _ = local_reply(
                &down.stream,
                502,
                "unexpected 101 from upstream",
                Next::Close,
                &[],
            )
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
        let mut bytes = Vec::new();
        encode::response(&resp, &mut bytes);
        if down.stream.write_all(&bytes).await.is_ok() {
            tunnel(down, up, activity, lstats).await;
        }
        return Next::Close;
    }

    let upstream_close =
        resp.headers.has_token(b"connection", b"close") || resp.version == Version::Http10;
    // A close-delimited body reaches an HTTP/1.1 client re-framed as chunked; an HTTP/1.0 client
    // gets it close-delimited and the connection ends.
    // HTTP/1.0 has no chunked coding: a 1.0 client gets an unknown-length body close-delimited
    // (de-chunked) and the connection ends; a 1.1 client gets a close-delimited body re-framed as
    // chunked, keeping its connection.
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
    let mut bytes = Vec::with_capacity(512);
    encode::response(&resp, &mut bytes);
    // The head and whatever of a Content-Length body is already buffered leave in one sendmsg.
    let early = match resp_body {
        BodyKind::Length(n) => (up.buffered().len() as u64).min(n) as usize,
        _ => 0,
    };
    if down
        .stream
        .write_all_vectored(&[&bytes, &up.buffered()[..early]])
        .await
        .is_err()
    {
        return Next::Close;
    }
    lstats.tx_bytes.add(early as u64);
    up.consume(early);
    let resp_body = match resp_body {
        BodyKind::Length(n) => BodyKind::Length(n - early as u64),
        other => other,
    };
    let copied = match resp_body {
        BodyKind::None => Ok(()),
        BodyKind::Length(n) => {
            copy_length(&mut up, &down.stream, n, activity, |n| {
                lstats.tx_bytes.add(n as u64)
            })
            .await
        }
        BodyKind::Chunked => {
            copy_chunked(
                &mut up,
                &down.stream,
                out_body == BodyKind::Chunked,
                activity,
                |n| lstats.tx_bytes.add(n as u64),
            )
            .await
        }
        BodyKind::CloseDelimited => {
            copy_until_close(
                &mut up,
                &down.stream,
                out_body == BodyKind::Chunked,
                activity,
                |n| lstats.tx_bytes.add(n as u64),
            )
            .await
        }
    };
    if copied.is_err() {
        tracing::debug!(%peer, path = %head.path, "response body interrupted");
        return Next::Close;
    }
    if !upstream_close && resp_body != BodyKind::CloseDelimited && !up.has_buffered() {
        let (stream, _) = up.into_parts();
        let key = (
            endpoint.address,
            crate::upstream::pool_key(&at.gen, target.target.cluster),
        );
        worker.pool.borrow_mut().put(key, stream);
    }
    tracing::debug!(%peer, method = %head.method, path = %head.path, status = resp.status, upstream = %endpoint.address, duration_us = started.elapsed().as_micros() as u64, "request");
    next
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
        HashKey::Cookie { name, path, ttl } => {
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
    let named: Vec<Vec<u8>> = headers
        .get_all(b"connection")
        .flat_map(|v| {
            v.split(|b| *b == b',')
                .map(|t| t.trim_ascii().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !(t.is_empty() || keep_upgrade && t == b"upgrade"))
        .collect();
    for name in named {
        headers.remove(&name);
    }
    for name in [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"trailer",
        b"http2-settings",
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(b"upgrade");
    }
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
fn client_cert(at: &ListenerRef, down: &Transport) -> Option<String> {
    if at.config().direction != keel_config::Direction::Inbound {
        return None;
    }
    let session = down.session()?;
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
        BodyKind::Length(n) => h.push(b"content-length", n.to_string().as_bytes()),
        BodyKind::Chunked => h.push(b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if websocket {
        h.push(b"connection", b"upgrade");
    }
    // As Envoy: append the client's address to x-forwarded-for, default x-forwarded-proto, and make
    // sure every request carries an x-request-id.
    let xff = match h.get(b"x-forwarded-for") {
        Some(prev) => format!("{}, {peer}", String::from_utf8_lossy(prev)),
        None => peer.to_string(),
    };
    h.set(b"x-forwarded-for", xff.as_bytes());
    forwarded_security(h, scheme, client_cert);
    if !h.contains(b"x-request-id") {
        h.push(b"x-request-id", request_id().as_bytes());
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

/// A random version-4 UUID, as Envoy generates for x-request-id.
fn request_id() -> String {
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
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A pooled connection to `addr` or a new one; `replayable` requests (no body, first attempt) skip
/// the liveness probe, because a dead pooled connection is answered by resending them once on a
/// fresh one.
async fn upstream(
    worker: &Worker,
    gen: &crate::generation::Generation,
    cluster: usize,
    addr: SocketAddr,
    replayable: bool,
) -> Result<(Transport, bool), ConnectError> {
    let key = (addr, crate::upstream::pool_key(gen, cluster));
    let max_idle = gen.snapshot.clusters[cluster].idle_timeout;
    if let Some(s) = worker.pool.borrow_mut().take(key, max_idle, !replayable) {
        return Ok((s, true));
    }
    crate::upstream::open(gen, cluster, addr)
        .await
        .map(|s| (s, false))
}

enum SendError {
    Upstream,
    Downstream,
    /// The client's chunked body broke the framing rules: nothing more is forwarded.
    BadBody,
    /// The upstream answered before the whole body was sent.
    EarlyResponse,
}

/// Streams the request body from the client to the upstream.
async fn send_body(
    up: &Transport,
    down: &mut BufferedStream,
    body: BodyKind,
    activity: &Cell<u32>,
) -> Result<(), SendError> {
    let result = match body {
        BodyKind::None | BodyKind::CloseDelimited => Ok(()),
        BodyKind::Length(n) => copy_length(down, up, n, activity, |_| {}).await,
        BodyKind::Chunked => copy_chunked(down, up, true, activity, |_| {}).await,
    };
    result.map_err(|e| match e {
        CopyError::Write => SendError::Upstream,
        CopyError::Read => SendError::Downstream,
        CopyError::Framing => SendError::BadBody,
    })
}

enum ResponseError {
    Head(HeadError),
    Closed,
}

async fn read_response(
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

enum CopyError {
    Read,
    Write,
    Framing,
}

/// Moves exactly `n` body bytes from `from` (buffered bytes first) to `to`.
async fn copy_length(
    from: &mut BufferedStream,
    to: &Transport,
    mut n: u64,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<(), CopyError> {
    while n > 0 {
        if !from.has_buffered() && from.fill(activity).await.map_err(|_| CopyError::Read)? == 0 {
            return Err(CopyError::Read);
        }
        let take = (from.buffered().len() as u64).min(n) as usize;
        to.write_all(&from.buffered()[..take])
            .await
            .map_err(|_| CopyError::Write)?;
        count(take);
        from.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// Decodes a chunked body strictly and re-encodes it (extensions dropped, trailers kept).
/// With `chunk` false the data is written as it is (for an HTTP/1.0 client, close-delimited).
async fn copy_chunked(
    from: &mut BufferedStream,
    to: &Transport,
    chunk: bool,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<(), CopyError> {
    let mut decoder = chunked::Decoder::default();
    let mut header = Vec::with_capacity(20);
    while !decoder.is_done() {
        if !from.has_buffered() && from.fill(activity).await.map_err(|_| CopyError::Read)? == 0 {
            return Err(CopyError::Read);
        }
        match decoder
            .decode(from.buffered())
            .map_err(|_| CopyError::Framing)?
        {
            Step::Framing { consumed } => from.consume(consumed),
            Step::Data { range } => {
                let data = &from.buffered()[range.clone()];
                let written = if chunk {
                    header.clear();
                    chunked::chunk_header(range.len(), &mut header);
                    to.write_all_vectored(&[&header, data, b"\r\n"]).await
                } else {
                    to.write_all(data).await
                };
                written.map_err(|_| CopyError::Write)?;
                count(range.len());
                from.consume(range.end);
            }
        }
    }
    if !chunk {
        return Ok(());
    }
    let mut tail = b"0\r\n".to_vec();
    for (name, value) in decoder.trailers.iter() {
        tail.extend_from_slice(name);
        tail.extend_from_slice(b": ");
        tail.extend_from_slice(value);
        tail.extend_from_slice(b"\r\n");
    }
    tail.extend_from_slice(b"\r\n");
    to.write_all(&tail).await.map_err(|_| CopyError::Write)
}

/// Copies until the upstream closes, re-framing as chunked when `chunk` is set.
async fn copy_until_close(
    from: &mut BufferedStream,
    to: &Transport,
    chunk: bool,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<(), CopyError> {
    let mut header = Vec::with_capacity(20);
    loop {
        if !from.has_buffered() && from.fill(activity).await.map_err(|_| CopyError::Read)? == 0 {
            break;
        }
        let data = from.buffered();
        let n = data.len();
        if chunk {
            header.clear();
            chunked::chunk_header(n, &mut header);
            to.write_all_vectored(&[&header, data, b"\r\n"])
                .await
                .map_err(|_| CopyError::Write)?;
        } else {
            to.write_all(data).await.map_err(|_| CopyError::Write)?;
        }
        count(n);
        from.consume(n);
    }
    if chunk {
        to.write_all(b"0\r\n\r\n")
            .await
            .map_err(|_| CopyError::Write)?;
    }
    Ok(())
}

/// After a 101: bytes both ways until either side is done, as an L4 proxy would.
async fn tunnel(
    down: &mut BufferedStream,
    up: BufferedStream,
    activity: &Cell<u32>,
    lstats: &crate::stats::ListenerCounters,
) {
    // Bytes that arrived with the heads go first.
    let pending_down = down.buffered().to_vec();
    down.consume(pending_down.len());
    let (up, pending_up) = up.into_parts();
    if (!pending_down.is_empty() && up.write_all(&pending_down).await.is_err())
        || (!pending_up.is_empty() && down.stream.write_all(&pending_up).await.is_err())
    {
        return;
    }
    let to_up = keel_io::forward::forward(&down.stream, &up, |n| {
        lstats.rx_bytes.add(n as u64);
        activity.set(activity.get().wrapping_add(1));
    });
    let to_down = keel_io::forward::forward(&up, &down.stream, |n| {
        lstats.tx_bytes.add(n as u64);
        activity.set(activity.get().wrapping_add(1));
    });
    let _ = monoio::join!(to_up, to_down);
}

/// A response Keel makes itself.
async fn local_reply(
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
    stream.write_all(&out).await?;
    if next == Next::Close {
        // Let the client read the reply before the close: half-close, then give it a moment.
        let _ = stream.shutdown_write().await;
        let _ = monoio::time::timeout(Duration::from_millis(200), stream.readable()).await;
    }
    Ok(())
}
