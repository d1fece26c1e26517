//! The client side of HTTP/2: Keel's multiplexed connections to upstream endpoints.
//!
//! Each worker keeps, per endpoint and TLS context, the HTTP/2 connections it opened
//! ([`H2Pool`]). A request reserves a stream on one that has room — under the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS and the cluster's `maxConcurrentStreams` — or opens another
//! (within `maxConnections`). A connection being opened takes reservations at once, so a burst of
//! requests shares one connection instead of opening one each.
//!
//! One task per connection reads frames and hands response heads, DATA and trailers to the
//! streams; the writer is [`Output::write_loop`], as on the server side. Responses are
//! flow-controlled by what the client side consumes: a stream's window is given back as its
//! bytes leave towards the downstream, so a slow client slows its upstream stream and nothing
//! else. A GOAWAY from the peer stops new streams; those it did not take are refused (safe to
//! retry), the others finish.

use crate::fast_hash::FastMap;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use keel_config::Http2Limits;
use keel_tls::Transport;

use super::frame::{self, ErrorCode, Frame, FrameError, Head};
use super::hpack::{self, Decoder};
use super::output::{Output, RecvWindow, SendError};
use super::rules::{
    apply_peer_settings, check_trailers, grow_window, parse_content_length, take_stream_data,
    PendingBlock,
};
use crate::breaker::ConnSlot;
use crate::http::body::{BodySink, CopyError};
use crate::http::conn::ReadBuf;
use crate::http::h1::{encode, BodyKind};
use crate::http::head::{RequestHead, ResponseHead, Version};
use crate::http::headers::{Headers, RESPONSE_HEADROOM};
use crate::http::pool::PoolKey;

/// Streams reserved on a connection before the peer's SETTINGS say how many it takes (RFC 9113
/// §6.5.2 advises servers to allow at least 100).
const STREAMS_BEFORE_SETTINGS: u32 = 100;
/// Header list bytes accepted in a response (what Envoy accepts by default).
const MAX_RESPONSE_HEADERS: usize = 60 * 1024;
/// CONTINUATION frames accepted in one response header block.
const MAX_CONTINUATIONS: u32 = 32;
/// How long the last streams of a connection being shut (GOAWAY, reload) may take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Ready,
    Closed,
}

/// Why a stream got no (complete) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFailure {
    /// The peer did not take the stream (REFUSED_STREAM, or above a GOAWAY's last stream): it
    /// was not processed and may be sent again.
    Refused,
    /// Reset by the peer, or the connection ended.
    Reset,
    /// The peer broke the protocol on this stream (a malformed response).
    Protocol(&'static str),
}

/// One upstream HTTP/2 connection, shared by the streams of one worker.
pub(crate) struct ClientConn {
    io: Output,
    /// HPACK state of the blocks we send (the peer's decoder mirrors it).
    encoder: RefCell<hpack::Encoder>,
    phase: Cell<Phase>,
    /// Requests waiting for the connection to be established.
    ready_waiters: RefCell<Vec<Waker>>,
    recv: RecvWindow,
    stream_window: u32,
    streams: RefCell<FastMap<u32, Rc<StreamState>>>,
    next_id: Cell<u32>,
    /// Streams reserved or open.
    active: Cell<u32>,
    /// Streams reserved over the connection's life (for `maxRequestsPerConnection`).
    reserved_total: Cell<u32>,
    max_streams_config: u32,
    per_connection: u32,
    /// No new stream may start: the peer's GOAWAY, too many requests, a reload or an error.
    shut: Cell<bool>,
    settings_seen: Cell<bool>,
    /// Wakes the reader when the last stream ends (to idle out or finish a shutdown).
    reader: Cell<Option<Waker>>,
    idle_timeout: Duration,
    send_window_timeout: Duration,
    scheme: &'static str,
    /// Woken when a stream ends and requests wait for a connection (`maxConnections`).
    released: Rc<tokio::sync::Notify>,
    /// Counted against the cluster's `maxConnections` until the connection closes.
    slot: RefCell<Option<ConnSlot>>,
    endpoint: SocketAddr,
}

/// A stream's state, shared by the connection's reader and the request's task.
struct StreamState {
    id: u32,
    /// Response header blocks (interim ones, then the final one), fields as decoded.
    heads: RefCell<VecDeque<Headers>>,
    /// The final head came with END_STREAM: no body.
    head_ended: Cell<bool>,
    got_final: Cell<bool>,
    rx: RefCell<VecDeque<Vec<u8>>>,
    rx_end: Cell<bool>,
    trailers: RefCell<Option<Headers>>,
    waker: Cell<Option<Waker>>,
    failed: Cell<Option<StreamFailure>>,
    recv: RecvWindow,
    send_window: Cell<i64>,
    /// The request ended (END_STREAM sent).
    sent_end: Cell<bool>,
}

impl StreamState {
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn fail(&self, why: StreamFailure) {
        if self.failed.get().is_none() {
            self.failed.set(Some(why));
        }
        self.wake();
    }
}

/// How a new connection is set up, from its cluster's policy.
pub(crate) struct ConnSettings {
    pub limits: Http2Limits,
    pub max_concurrent_streams: u32,
    pub max_requests_per_connection: u32,
    pub idle_timeout: Duration,
    pub tls: bool,
}

impl ClientConn {
    /// A connection about to be opened to `endpoint`, with one stream reserved for the request
    /// opening it.
    pub fn new(
        settings: ConnSettings,
        slot: ConnSlot,
        released: Rc<tokio::sync::Notify>,
        endpoint: SocketAddr,
    ) -> Rc<ClientConn> {
        let conn = Rc::new(ClientConn {
            io: Output::new(),
            encoder: RefCell::new(hpack::Encoder::default()),
            phase: Cell::new(Phase::Connecting),
            ready_waiters: RefCell::new(Vec::new()),
            recv: RecvWindow::new(settings.limits.connection_window),
            stream_window: settings.limits.stream_window,
            streams: RefCell::new(FastMap::default()),
            next_id: Cell::new(1),
            active: Cell::new(0),
            reserved_total: Cell::new(0),
            max_streams_config: settings.max_concurrent_streams,
            per_connection: settings.max_requests_per_connection,
            shut: Cell::new(false),
            settings_seen: Cell::new(false),
            reader: Cell::new(None),
            idle_timeout: settings.idle_timeout,
            send_window_timeout: settings.limits.send_window_timeout,
            scheme: if settings.tls { "https" } else { "http" },
            released,
            slot: RefCell::new(Some(slot)),
            endpoint,
        });
        conn.reserve();
        conn
    }

    /// The most streams open at once: the peer's limit and ours.
    fn max_streams(&self) -> u32 {
        let peer = if self.settings_seen.get() {
            self.io
                .peer
                .get()
                .max_concurrent_streams
                .unwrap_or(u32::MAX)
        } else {
            STREAMS_BEFORE_SETTINGS
        };
        peer.min(self.max_streams_config)
    }

    /// Whether a new stream can be had here.
    fn has_room(&self) -> bool {
        self.phase.get() != Phase::Closed
            && !self.shut.get()
            && self.active.get() < self.max_streams()
            && (self.per_connection == 0 || self.reserved_total.get() < self.per_connection)
            // Stream ids are 31 bits; well before they run out the connection is retired.
            && self.next_id.get() < (1 << 30)
    }

    /// Takes a stream slot if there is room.
    fn reserve(&self) -> bool {
        if !self.has_room() {
            return false;
        }
        self.active.set(self.active.get() + 1);
        self.reserved_total.set(self.reserved_total.get() + 1);
        if self.per_connection != 0 && self.reserved_total.get() >= self.per_connection {
            // Spent: it finishes its streams and closes.
            self.shut.set(true);
        }
        true
    }

    /// A stream slot is given back.
    fn release(&self) {
        self.active.set(self.active.get().saturating_sub(1));
        if self.active.get() == 0 {
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
        if self.wanted_elsewhere() {
            self.released.notify_waiters();
        }
    }

    /// Whether requests of the cluster wait for a connection slot (`maxConnections`).
    fn wanted_elsewhere(&self) -> bool {
        self.slot
            .borrow()
            .as_ref()
            .is_some_and(|s| s.stats().breaker.pending() > 0)
    }

    /// Stops new streams; the connection closes once the open ones end.
    pub fn shut_down(&self) {
        self.shut.set(true);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn is_closed(&self) -> bool {
        self.phase.get() == Phase::Closed
    }

    /// Whether the connection is closed, or shut with no stream left (nothing will use it).
    fn is_done(&self) -> bool {
        self.is_closed() || (self.shut.get() && self.active.get() == 0)
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.set(phase);
        for w in self.ready_waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Waits until the connection is established; false when it failed or closed.
    async fn ready(&self) -> bool {
        poll_fn(|cx| match self.phase.get() {
            Phase::Ready => Poll::Ready(true),
            Phase::Closed => Poll::Ready(false),
            Phase::Connecting => {
                self.ready_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The connect failed: every request waiting on it fails too.
    pub fn fail(&self) {
        self.close();
    }

    fn close(&self) {
        self.set_phase(Phase::Closed);
        self.io.close();
        // The slot is free at once, for a request waiting on this core or another.
        let was_wanted = self.wanted_elsewhere();
        drop(self.slot.borrow_mut().take());
        if was_wanted {
            self.released.notify_waiters();
        }
        for s in self.streams.borrow().values() {
            if s.rx_end.get() {
                // Its response came whole: what is queued of it is still delivered.
                s.wake();
            } else {
                s.fail(StreamFailure::Reset);
            }
        }
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// The socket is connected (and secured): the preface and our SETTINGS go out, and the
    /// connection's reader and writer run on this worker until it ends. It is ready for streams
    /// once the peer's SETTINGS have come (and with them its stream limit).
    pub fn start(self: &Rc<Self>, transport: Transport) {
        let _ = transport.set_nodelay();
        self.io.push(|o| {
            o.extend_from_slice(frame::PREFACE);
            frame::write_settings(
                o,
                &[
                    (frame::SETTINGS_ENABLE_PUSH, 0),
                    (frame::SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window),
                    (
                        frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                        MAX_RESPONSE_HEADERS as u32,
                    ),
                ],
            );
            if self.recv.size() > frame::DEFAULT_WINDOW {
                frame::write_window_update(o, 0, self.recv.size() - frame::DEFAULT_WINDOW);
            }
        });
        monoio::spawn(run(self.clone(), transport));
    }
}

/// A connection's life after its connect: reader and writer until either ends.
async fn run(conn: Rc<ClientConn>, transport: Transport) {
    let reading = async {
        let mut reader = Reader {
            conn: &conn,
            decoder: Decoder::new(4096),
            pending: None,
        };
        let exit = reader.run(&transport).await;
        if let Err((code, why)) = exit {
            tracing::debug!(upstream = %conn.endpoint, error = code.name(), why, "HTTP/2 upstream connection error");
            let last = conn.next_id.get().saturating_sub(2);
            conn.io
                .push(|o| frame::write_goaway(o, last, code, why.as_bytes()));
        }
        conn.close();
    };
    let writing = conn.io.write_loop(&transport, || {});
    monoio::join!(reading, writing);
    let _ = transport.shutdown_write().await;
}

/// The reading side of a connection.
struct Reader<'a> {
    conn: &'a ClientConn,
    decoder: Decoder,
    pending: Option<PendingBlock>,
}

impl Reader<'_> {
    async fn run(&mut self, transport: &Transport) -> Result<(), (ErrorCode, &'static str)> {
        let mut rb = ReadBuf::default();
        let activity = Cell::new(0u32);
        let mut idle_since = Instant::now();
        let mut shut_since: Option<Instant> = None;
        loop {
            while rb.buffered().len() >= frame::HEADER_LEN {
                let head_bytes: [u8; frame::HEADER_LEN] = rb.buffered()[..frame::HEADER_LEN]
                    .try_into()
                    .map_err(|_| (ErrorCode::Internal, "frame header"))?;
                let head = Head::parse(&head_bytes);
                if head.len > frame::DEFAULT_MAX_FRAME {
                    return Err((
                        ErrorCode::FrameSize,
                        "frame larger than SETTINGS_MAX_FRAME_SIZE",
                    ));
                }
                let total = frame::HEADER_LEN + head.len as usize;
                if rb.buffered().len() < total {
                    break;
                }
                let result = self.on_frame(head, &rb.buffered()[frame::HEADER_LEN..total]);
                rb.consume(total);
                match result {
                    Ok(()) => {}
                    Err(FrameError::Connection(code, why)) => return Err((code, why)),
                    Err(FrameError::Stream(id, code, why)) => self.reset(id, code, why),
                }
            }
            let conn = self.conn;
            if conn.is_closed() {
                return Ok(());
            }
            if conn.active.get() > 0 {
                idle_since = Instant::now();
            }
            if conn.shut.get() {
                if conn.active.get() == 0 {
                    conn.io.push(|o| {
                        frame::write_goaway(o, 0, ErrorCode::NoError, b"");
                    });
                    return Ok(());
                }
                shut_since.get_or_insert_with(Instant::now);
            }
            // The next bytes, bounded by the idle timeout while no stream is open (and by the
            // grace of a shutdown); the last stream's end wakes the wait.
            let deadline = match shut_since {
                Some(t) => Some(t + SHUTDOWN_GRACE),
                None if conn.active.get() == 0 => Some(idle_since + conn.idle_timeout),
                None => None,
            };
            let mut fill = std::pin::pin!(rb.fill(transport, &activity));
            let was_active = conn.active.get() > 0;
            let was_shut = conn.shut.get();
            let mut timer = deadline.map(|d| {
                Box::pin(monoio::time::sleep(
                    d.saturating_duration_since(Instant::now()),
                ))
            });
            let filled = poll_fn(|cx| {
                if let Poll::Ready(r) = fill.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if let Some(t) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                }
                if (was_active && conn.active.get() == 0)
                    || (!was_shut && conn.shut.get())
                    || (!was_active && conn.active.get() > 0)
                    || conn.is_closed()
                {
                    return Poll::Ready(Some(Ok(usize::MAX)));
                }
                conn.reader.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            match filled {
                None if conn.active.get() == 0 => {
                    // Idle past the cluster's idle timeout, or a shutdown's grace is over.
                    conn.shut.set(true);
                    conn.io.push(|o| {
                        frame::write_goaway(o, 0, ErrorCode::NoError, b"");
                    });
                    return Ok(());
                }
                None if shut_since.is_some() => return Ok(()),
                None => {}
                Some(Ok(0)) | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            }
        }
    }

    fn stream(&self, id: u32) -> Option<Rc<StreamState>> {
        self.conn.streams.borrow().get(&id).cloned()
    }

    /// A stream error of the peer's: the stream is reset and its request fails.
    fn reset(&mut self, id: u32, code: ErrorCode, why: &'static str) {
        tracing::debug!(upstream = %self.conn.endpoint, stream = id, error = code.name(), why, "HTTP/2 upstream stream error");
        if let Some(s) = self.stream(id) {
            s.fail(StreamFailure::Protocol(why));
        }
        self.conn.io.push(|o| frame::write_rst(o, id, code));
    }

    fn on_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), FrameError> {
        let f = frame::decode(head, payload)?;
        if let Some(p) = &self.pending {
            if !matches!(f, Frame::Continuation { stream, .. } if stream == p.stream) {
                return Err(FrameError::Connection(
                    ErrorCode::Protocol,
                    "frame other than CONTINUATION inside a header block",
                ));
            }
        }
        let conn = self.conn;
        match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => {
                if !conn.recv.take(flow_len) {
                    return Err(FrameError::Connection(
                        ErrorCode::FlowControl,
                        "DATA beyond the connection window",
                    ));
                }
                let Some(s) = self.stream(stream) else {
                    // A stream we reset or forgot: its bytes still count on the connection.
                    self.credit_connection(flow_len as usize);
                    if stream >= conn.next_id.get() {
                        return Err(FrameError::Connection(
                            ErrorCode::Protocol,
                            "DATA on an idle stream",
                        ));
                    }
                    return Ok(());
                };
                if !s.got_final.get() || s.rx_end.get() {
                    self.credit_connection(flow_len as usize);
                    return Err(FrameError::Stream(
                        stream,
                        ErrorCode::Protocol,
                        "DATA before the response head or after END_STREAM",
                    ));
                }
                let padding = take_stream_data(&s.recv, stream, flow_len, data.len(), |n| {
                    self.credit_connection(n)
                })?;
                if padding > 0 {
                    self.credit_connection(padding);
                    credit_stream(conn, &s, padding);
                }
                if !data.is_empty() {
                    s.rx.borrow_mut().push_back(data.to_vec());
                }
                if end_stream {
                    s.rx_end.set(true);
                }
                s.wake();
                Ok(())
            }
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if end_headers {
                    self.on_header_block(stream, end_stream, block)
                } else {
                    self.pending = Some(PendingBlock::new(stream, end_stream, block));
                    Ok(())
                }
            }
            Frame::Continuation {
                end_headers, block, ..
            } => {
                let Some(mut p) = self.pending.take() else {
                    return Err(FrameError::Connection(
                        ErrorCode::Protocol,
                        "CONTINUATION without HEADERS",
                    ));
                };
                p.push(block, MAX_CONTINUATIONS, MAX_RESPONSE_HEADERS + 16 * 1024)?;
                if end_headers {
                    self.on_header_block(p.stream, p.end_stream, &p.block)
                } else {
                    self.pending = Some(p);
                    Ok(())
                }
            }
            Frame::Priority { .. } | Frame::Unknown => Ok(()),
            Frame::RstStream { stream, code } => {
                if stream >= conn.next_id.get() {
                    return Err(FrameError::Connection(
                        ErrorCode::Protocol,
                        "RST_STREAM on an idle stream",
                    ));
                }
                tracing::debug!(upstream = %conn.endpoint, stream, code, "HTTP/2 RST_STREAM from the upstream");
                if let Some(s) = self.stream(stream) {
                    let refused = code == ErrorCode::RefusedStream as u32;
                    s.fail(if refused {
                        StreamFailure::Refused
                    } else if code == ErrorCode::NoError as u32 && s.rx_end.get() {
                        // The response is whole; the peer just wants no more of the request.
                        return Ok(());
                    } else {
                        StreamFailure::Reset
                    });
                    conn.io.wake_senders();
                }
                Ok(())
            }
            Frame::Settings { ack, payload } => {
                if ack {
                    return Ok(());
                }
                {
                    let streams = conn.streams.borrow();
                    apply_peer_settings(
                        &conn.io,
                        &conn.encoder,
                        payload,
                        streams.values().map(|s| &s.send_window),
                    )?;
                }
                conn.settings_seen.set(true);
                if conn.phase.get() == Phase::Connecting {
                    conn.set_phase(Phase::Ready);
                }
                Ok(())
            }
            Frame::PushPromise => Err(FrameError::Connection(
                ErrorCode::Protocol,
                "PUSH_PROMISE although SETTINGS_ENABLE_PUSH is 0",
            )),
            Frame::Ping { ack, data } => {
                if !ack {
                    conn.io.push(|o| frame::write_ping(o, true, data));
                }
                Ok(())
            }
            Frame::GoAway { last_stream, code } => {
                tracing::debug!(upstream = %conn.endpoint, code, last_stream, open = conn.streams.borrow().len(), "HTTP/2 GOAWAY from the upstream");
                conn.shut.set(true);
                // Streams above the last one were never processed: refused, so they can be
                // sent again elsewhere.
                for (id, s) in conn.streams.borrow().iter() {
                    if *id > last_stream {
                        s.fail(StreamFailure::Refused);
                    }
                }
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                if stream == 0 {
                    if !grow_window(&conn.io.send_window, increment as i64) {
                        return Err(FrameError::Connection(
                            ErrorCode::FlowControl,
                            "connection window above 2^31-1",
                        ));
                    }
                } else if let Some(s) = self.stream(stream) {
                    if !grow_window(&s.send_window, increment as i64) {
                        return Err(FrameError::Stream(
                            stream,
                            ErrorCode::FlowControl,
                            "stream window above 2^31-1",
                        ));
                    }
                }
                conn.io.wake_senders();
                Ok(())
            }
        }
    }

    /// A complete header block: an interim or final response head, or trailers.
    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), FrameError> {
        let mut fields = Headers::with_capacity(hpack::decoded_capacity(block.len()), 16);
        let decoded = self
            .decoder
            .decode(block, MAX_RESPONSE_HEADERS, |n, v| fields.push_raw(n, v));
        if let Err(hpack::HpackError::Compression(why)) = decoded {
            return Err(FrameError::Connection(ErrorCode::Compression, why));
        }
        if id.is_multiple_of(2) || id >= self.conn.next_id.get() {
            return Err(FrameError::Connection(
                ErrorCode::Protocol,
                "HEADERS on a stream Keel did not open",
            ));
        }
        let Some(s) = self.stream(id) else {
            // A stream we reset: its block was decoded to keep the table in step.
            return Ok(());
        };
        if decoded.is_err() {
            return Err(FrameError::Stream(
                id,
                ErrorCode::Protocol,
                "response header list too large",
            ));
        }
        if s.rx_end.get() {
            return Err(FrameError::Stream(
                id,
                ErrorCode::StreamClosed,
                "HEADERS after END_STREAM",
            ));
        }
        if s.got_final.get() {
            check_trailers(id, end_stream, &fields)?;
            *s.trailers.borrow_mut() = Some(fields);
            s.rx_end.set(true);
            s.wake();
            return Ok(());
        }
        let interim = status_of(&fields).is_some_and(|st| (100..200).contains(&st));
        if interim && end_stream {
            return Err(FrameError::Stream(
                id,
                ErrorCode::Protocol,
                "1xx response with END_STREAM",
            ));
        }
        if !interim {
            s.got_final.set(true);
            s.head_ended.set(end_stream);
            s.rx_end.set(end_stream);
        }
        s.heads.borrow_mut().push_back(fields);
        s.wake();
        Ok(())
    }

    fn credit_connection(&self, n: usize) {
        if let Some(increment) = self.conn.recv.credit(n) {
            self.conn
                .io
                .push(|o| frame::write_window_update(o, 0, increment));
        }
    }
}

/// Gives back consumed bytes of a stream's window, once its response is still coming.
fn credit_stream(conn: &ClientConn, s: &StreamState, n: usize) {
    if s.rx_end.get() || s.failed.get().is_some() {
        return;
    }
    if let Some(increment) = s.recv.credit(n) {
        conn.io
            .push(|o| frame::write_window_update(o, s.id, increment));
    }
}

/// `:status` of a decoded response block, when it is three digits.
fn status_of(fields: &Headers) -> Option<u16> {
    let v = fields.get(b":status")?;
    if v.len() != 3 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2), left out of what Keel sends, and `host`, which
/// becomes `:authority`.
fn left_out_of_request(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"transfer-encoding"
            | b"upgrade"
            | b"te"
            | b"host"
            | b"http2-settings"
    )
}

/// A request's stream on an upstream connection: reserved when made, opened by [`Self::open`],
/// given back (reset when unfinished) when dropped.
pub(crate) struct ClientStream {
    conn: Rc<ClientConn>,
    state: Option<Rc<StreamState>>,
    /// The request's method (a HEAD response has no body).
    head_request: bool,
}

impl ClientStream {
    /// Waits for the connection to be up (the peer's SETTINGS in): false when it failed.
    pub async fn ready(&self) -> bool {
        self.conn.ready().await
    }

    /// Whether the stream can be opened now, within the peer's limit: streams reserved before
    /// that limit was known may be more than it allows, and those go elsewhere.
    pub fn fits(&self) -> bool {
        (self.conn.streams.borrow().len() as u32) < self.conn.max_streams()
    }

    /// Whether the peer's SETTINGS allow no stream at all (then no connection to it will do).
    pub fn peer_allows_none(&self) -> bool {
        self.conn.max_streams() == 0
    }

    /// Fails the connection this stream was to open (its handshake did not finish in time).
    pub fn fail_connection(&self) {
        self.conn.fail();
    }

    /// Sends the request head; `end`: the request has no body. `te_trailers`: the client asked
    /// for trailers (`te: trailers`, which gRPC servers require), forwarded as HTTP/2 allows.
    pub fn open(&mut self, head: &RequestHead, end: bool, te_trailers: bool) -> io::Result<()> {
        let conn = &self.conn;
        if conn.is_closed() || self.state.is_some() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let id = conn.next_id.get();
        conn.next_id.set(id + 2);
        let mut block = Vec::with_capacity(256);
        // Encoded and queued with no await between (blocks reach the wire in table order).
        let mut enc = conn.encoder.borrow_mut();
        enc.begin(&mut block);
        enc.field(b":method", head.method.as_bytes(), &mut block);
        enc.field(b":scheme", conn.scheme.as_bytes(), &mut block);
        enc.field(b":authority", head.authority.as_bytes(), &mut block);
        enc.field(b":path", head.path.as_bytes(), &mut block);
        for (n, v) in head.headers.iter() {
            if !left_out_of_request(n) {
                enc.field(n, v, &mut block);
            }
        }
        if te_trailers {
            enc.field(b"te", b"trailers", &mut block);
        }
        drop(enc);
        let state = Rc::new(StreamState {
            id,
            heads: RefCell::new(VecDeque::new()),
            head_ended: Cell::new(false),
            got_final: Cell::new(false),
            rx: RefCell::new(VecDeque::new()),
            rx_end: Cell::new(false),
            trailers: RefCell::new(None),
            waker: Cell::new(None),
            failed: Cell::new(None),
            recv: RecvWindow::new(conn.stream_window),
            send_window: Cell::new(conn.io.peer.get().initial_window_size as i64),
            sent_end: Cell::new(end),
        });
        conn.streams.borrow_mut().insert(id, state.clone());
        let max_frame = conn.io.peer.get().max_frame_size as usize;
        conn.io
            .push(|o| frame::write_headers(o, id, &block, end, max_frame));
        self.head_request = head.method == "HEAD";
        self.state = Some(state);
        Ok(())
    }

    /// The next response head (interim ones first), translated for the proxy path, with how its
    /// body comes: `Length(0)` when the head ended the stream (and `content-length: 0` added, so
    /// an HTTP/1.1 client is not left waiting for a close), `Length(n)` with a content-length,
    /// else `Chunked` — a body of unknown length, possibly with trailers.
    pub async fn response_head(&self) -> Result<(ResponseHead, BodyKind), StreamFailure> {
        let Some(s) = &self.state else {
            return Err(StreamFailure::Reset);
        };
        let fields = poll_fn(|cx| {
            if let Some(h) = s.heads.borrow_mut().pop_front() {
                return Poll::Ready(Ok(h));
            }
            if let Some(f) = s.failed.get() {
                return Poll::Ready(Err(f));
            }
            if self.conn.is_closed() {
                return Poll::Ready(Err(StreamFailure::Reset));
            }
            s.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await?;
        let (mut resp, content_length) = response_head(fields).map_err(|why| {
            self.conn
                .io
                .push(|o| frame::write_rst(o, s.id, ErrorCode::Protocol));
            s.fail(StreamFailure::Protocol(why));
            StreamFailure::Protocol(why)
        })?;
        let no_body = self.head_request
            || (100..200).contains(&resp.status)
            || resp.status == 204
            || resp.status == 304;
        let body = if no_body {
            BodyKind::None
        } else if s.head_ended.get() {
            if content_length.is_some_and(|n| n != 0) {
                return Err(StreamFailure::Protocol("content-length without DATA"));
            }
            if content_length.is_none() {
                resp.headers.push(b"content-length", b"0");
            }
            BodyKind::Length(0)
        } else {
            match content_length {
                Some(n) => BodyKind::Length(n),
                None => BodyKind::Chunked,
            }
        };
        Ok((resp, body))
    }

    /// The next piece of the response body, its window given back as it is taken; `None` at
    /// its end.
    pub async fn next_chunk(&self) -> Result<Option<Vec<u8>>, CopyError> {
        let Some(s) = &self.state else {
            return Err(CopyError::Read);
        };
        let chunk = poll_fn(|cx| {
            if let Some(c) = s.rx.borrow_mut().pop_front() {
                return Poll::Ready(Ok(Some(c)));
            }
            // A response that ended whole stays whole, whatever happens to the connection after.
            if s.rx_end.get() && !matches!(s.failed.get(), Some(StreamFailure::Protocol(_))) {
                return Poll::Ready(Ok(None));
            }
            if s.failed.get().is_some() || self.conn.is_closed() {
                return Poll::Ready(Err(CopyError::Read));
            }
            s.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await?;
        if let Some(c) = &chunk {
            if let Some(increment) = self.conn.recv.credit(c.len()) {
                self.conn
                    .io
                    .push(|o| frame::write_window_update(o, 0, increment));
            }
            credit_stream(&self.conn, s, c.len());
        }
        Ok(chunk)
    }

    /// The response's trailers, once its body has ended.
    pub fn take_trailers(&self) -> Headers {
        self.state
            .as_ref()
            .and_then(|s| s.trailers.borrow_mut().take())
            .unwrap_or_default()
    }

    /// The sending side of the opened stream, for the request body.
    pub fn upload(&self) -> Option<Upload> {
        Some(Upload {
            conn: self.conn.clone(),
            state: self.state.clone()?,
        })
    }
}

/// The request body's way onto an opened stream; owned, so that it can outlive the request's own
/// task's borrows (a full-duplex body moves in a task of its own).
pub(crate) struct Upload {
    conn: Rc<ClientConn>,
    state: Rc<StreamState>,
}

impl Upload {
    fn gone(&self) -> bool {
        self.conn.io.closed.get() || self.state.failed.get().is_some()
    }

    /// Sends request body bytes as DATA, as the peer's windows allow.
    async fn send(&self, data: &[u8], end: bool) -> io::Result<()> {
        let s = &self.state;
        if s.sent_end.get() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let sent = self
            .conn
            .io
            .send_data(
                s.id,
                &s.send_window,
                || self.gone(),
                data,
                end,
                self.conn.send_window_timeout,
            )
            .await;
        match sent {
            Ok(()) => {
                if end {
                    s.sent_end.set(true);
                }
                Ok(())
            }
            Err(SendError::WindowTimeout) => {
                tracing::debug!(upstream = %self.conn.endpoint, stream = s.id, "HTTP/2 upstream kept its window shut");
                self.cancel();
                Err(SendError::WindowTimeout.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends trailers, ending the request.
    fn send_trailers(&self, trailers: &Headers) -> io::Result<()> {
        let s = &self.state;
        if self.gone() || s.sent_end.get() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut block = Vec::with_capacity(64);
        let mut enc = self.conn.encoder.borrow_mut();
        enc.begin(&mut block);
        for (n, v) in trailers.iter() {
            if !left_out_of_request(n) {
                enc.field(n, v, &mut block);
            }
        }
        drop(enc);
        let max_frame = self.conn.io.peer.get().max_frame_size as usize;
        self.conn
            .io
            .push(|o| frame::write_headers(o, s.id, &block, true, max_frame));
        s.sent_end.set(true);
        Ok(())
    }

    /// The request cannot be completed (its client went away): the stream is reset, and the
    /// response side sees it fail.
    pub fn cancel(&self) {
        if !self.gone() {
            self.conn
                .io
                .push(|o| frame::write_rst(o, self.state.id, ErrorCode::Cancel));
        }
        self.state.fail(StreamFailure::Reset);
    }
}

impl BodySink for Upload {
    async fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.send(bytes, false).await
    }

    async fn finish(&mut self, trailers: &Headers) -> io::Result<()> {
        if trailers.iter().next().is_some() {
            self.send_trailers(trailers)
        } else {
            self.send(&[], true).await
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let conn = &self.conn;
        if let Some(s) = self.state.take() {
            conn.streams.borrow_mut().remove(&s.id);
            let unfinished = !(s.rx_end.get() && s.sent_end.get());
            if !conn.is_closed() && s.failed.get().is_none() && unfinished {
                // The request or the response was cut off: the peer stops the stream too.
                let code = if s.rx_end.get() {
                    ErrorCode::NoError
                } else {
                    ErrorCode::Cancel
                };
                conn.io.push(|o| frame::write_rst(o, s.id, code));
            }
            // A body still moving in a task of its own stops.
            s.fail(StreamFailure::Reset);
            let queued: usize = s.rx.borrow_mut().drain(..).map(|c| c.len()).sum();
            if queued > 0 {
                if let Some(increment) = conn.recv.credit(queued) {
                    conn.io
                        .push(|o| frame::write_window_update(o, 0, increment));
                }
            }
        }
        conn.release();
    }
}

/// Builds a response head from a decoded field list (RFC 9113 §8.3.2): `:status` first and
/// alone among pseudo-headers, names lower-case, no connection-specific fields, no CR, LF or NUL
/// in a value; returns the content-length too.
fn response_head(fields: Headers) -> Result<(ResponseHead, Option<u64>), &'static str> {
    let mut status = None;
    let (bytes, count) = RESPONSE_HEADROOM;
    let mut headers = Headers::with_capacity(fields.byte_len() + bytes, fields.len() + count);
    let mut content_length = None;
    let mut regular_seen = false;
    for (n, v) in fields.iter() {
        if v.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err("CR, LF or NUL in a response field value");
        }
        if n.starts_with(b":") {
            if n != b":status" || status.is_some() || regular_seen {
                return Err("malformed response pseudo-headers");
            }
            status = Some(status_of(&fields).ok_or("invalid :status")?);
            continue;
        }
        regular_seen = true;
        if n.is_empty() || n.iter().any(|b| b.is_ascii_uppercase() || *b <= b' ') {
            return Err("invalid or upper-case response field name");
        }
        match n {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Err("connection-specific field in a response"),
            b"content-length" => {
                let parsed =
                    parse_content_length(v).ok_or("malformed content-length in a response")?;
                if content_length.is_some_and(|c| c != parsed) {
                    return Err("differing content-length values in a response");
                }
                if content_length.is_some() {
                    continue;
                }
                content_length = Some(parsed);
            }
            _ => {}
        }
        headers.push(n, v);
    }
    let status = status.ok_or("no :status")?;
    Ok((
        ResponseHead {
            status,
            reason: encode::reason(status).to_string(),
            version: Version::Http2,
            headers,
        },
        content_length,
    ))
}

/// The HTTP/2 connections of one worker, per endpoint and TLS context.
#[derive(Default)]
pub struct H2Pool {
    conns: HashMap<PoolKey, Vec<Rc<ClientConn>>>,
}

impl H2Pool {
    /// A stream on a connection to `key` that has room (an established one first), if any.
    pub(crate) fn reserve(&mut self, key: PoolKey) -> Option<ClientStream> {
        let list = self.conns.get_mut(&key)?;
        list.retain(|c| !c.is_done());
        let conn = list
            .iter()
            .filter(|c| c.has_room())
            .min_by_key(|c| (c.phase.get() != Phase::Ready, c.active.get()))?
            .clone();
        conn.reserve().then(|| ClientStream {
            conn,
            state: None,
            head_request: false,
        })
    }

    /// Adds a new connection (with the stream reserved for the request that opens it).
    pub(crate) fn insert(&mut self, key: PoolKey, conn: Rc<ClientConn>) -> ClientStream {
        self.conns.entry(key).or_default().push(conn.clone());
        ClientStream {
            conn,
            state: None,
            head_request: false,
        }
    }

    /// Shuts the connections to endpoints for which `keep` is false (after a reload): their open
    /// streams finish, no new one starts.
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr) -> bool) {
        self.conns.retain(|(addr, _), list| {
            let kept = keep(addr);
            if !kept {
                for c in list.iter() {
                    c.shut_down();
                }
            }
            kept
        });
    }

    /// Closes connections without streams of clusters whose requests wait for a connection
    /// slot (`maxConnections`), so that the slot serves a request waiting on another core.
    pub fn release_for_waiters(&mut self) {
        for list in self.conns.values_mut() {
            list.retain(|c| {
                let idle_and_wanted = c.active.get() == 0 && c.wanted_elsewhere();
                if idle_and_wanted {
                    c.shut_down();
                }
                !idle_and_wanted && !c.is_done()
            });
        }
        self.conns.retain(|_, list| !list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Headers {
        let mut h = Headers::default();
        for (n, v) in list {
            h.push_raw(n.as_bytes(), v.as_bytes());
        }
        h
    }

    #[test]
    fn response_heads_are_checked_as_rfc_9113_says() {
        let (head, cl) = response_head(fields(&[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("content-length", "5"),
        ]))
        .unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.reason, "OK");
        assert_eq!(cl, Some(5));
        assert_eq!(
            head.headers.get(b"content-type"),
            Some(&b"application/grpc"[..])
        );
        for bad in [
            &[("content-type", "x")][..],
            &[(":status", "20")],
            &[(":status", "200"), (":status", "200")],
            &[(":status", "200"), (":path", "/")],
            &[("x", "1"), (":status", "200")],
            &[(":status", "200"), ("Upper", "1")],
            &[(":status", "200"), ("connection", "close")],
            &[(":status", "200"), ("transfer-encoding", "chunked")],
            &[(":status", "200"), ("content-length", "1x")],
            &[
                (":status", "200"),
                ("content-length", "1"),
                ("content-length", "2"),
            ],
            &[(":status", "200"), ("x", "a\r\nb")],
        ] {
            assert!(response_head(fields(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_fields_that_http2_forbids_are_left_out() {
        for n in ["connection", "transfer-encoding", "te", "host", "upgrade"] {
            assert!(left_out_of_request(n.as_bytes()));
        }
        assert!(!left_out_of_request(b"content-type"));
    }
}
