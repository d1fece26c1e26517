//! The server side of an HTTP/2 connection: the preface and SETTINGS exchange, frames read and
//! checked, streams opened and driven through their states, flow control both ways, and the
//! flood defences. Each request stream runs the same proxy path as an HTTP/1.1 request, in a task
//! of its own, through a [`StreamHandle`].
//!
//! One task reads and dispatches frames; one writes: stream tasks and the reader append whole
//! frames to the connection's output buffer and the writer sends what has gathered in one write.
//! Request DATA waits in its stream's queue until the stream's task forwards it; the stream's
//! receive window bounds what a slow upstream leaves queued, and windows are given back as the
//! bytes leave. Responses are sent as the peer's windows allow, and stall (up to
//! `sendWindowTimeout`) while they are shut.

use crate::fast_hash::FastMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use keel_config::Http2Limits;
use keel_tls::{Session, Transport};

use super::frame::{self, ErrorCode, Frame, FrameError, Head};
use super::hpack::{self, Decoder, HpackError};
use super::output::{Output, RecvWindow, SendError};
use super::rules::{
    apply_peer_settings, check_trailers, grow_window, parse_content_length, take_stream_data,
    PendingBlock,
};
use crate::generation::ListenerState;
use crate::http::body::{BodySink, CopyError, UpstreamBody};
use crate::http::conn::{BufferedStream, ReadBuf};
use crate::http::downstream::{Downstream, Progress};
use crate::http::h1::BodyKind;
use crate::http::head::{RequestHead, ResponseHead, Version};
use crate::http::headers::{Headers, REQUEST_HEADROOM};
use crate::http::proxy::{exchange, Next};
use crate::idle::IdleEntry;
use crate::stats::{H2Event, ListenerCounters};
use crate::worker::{ListenerRef, Worker};

/// Output bytes queued beyond which the peer is taken to have stopped reading while it keeps
/// asking for replies (PING, SETTINGS): the connection is closed.
const OUTPUT_LIMIT: usize = 4 * 1024 * 1024;
/// A stream reset by the client within this time of opening, before its response ended, counts
/// as a premature reset (Envoy's premature-reset rule).
const PREMATURE_RESET_AGE: Duration = Duration::from_secs(1);
/// The PING payload sent with a drain's first GOAWAY.
const DRAIN_PING: [u8; 8] = *b"keeldrn1";
/// WINDOW_UPDATE frames accepted per DATA frame sent, beyond a first allowance.
const WINDOW_UPDATES_PER_DATA: u64 = 10;
const WINDOW_UPDATE_ALLOWANCE: u64 = 100;

/// What the reader, the writer and every stream of one connection share.
struct Shared {
    transport: Transport,
    /// The listener's counters, for this worker.
    listener: Rc<ListenerState>,
    worker_id: usize,
    limits: Http2Limits,
    /// Frames for the writer, the peer's windows and settings.
    io: Output,
    /// HPACK state of the blocks we send (the client's decoder mirrors it).
    encoder: RefCell<hpack::Encoder>,
    /// What the peer may still send on the connection.
    recv: RecvWindow,
    streams: RefCell<FastMap<u32, Rc<StreamState>>>,
    /// Wakes the reader when the last stream ends after a GOAWAY either way.
    reader: Cell<Option<Waker>>,
}

impl Shared {
    fn count(&self, e: H2Event) {
        self.listener.stats.slots[self.worker_id].h2_event(e);
    }

    /// Queues bytes for the writer.
    fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        self.io.push(f)
    }

    fn close(&self) {
        self.io.close();
        for s in self.streams.borrow().values() {
            s.wake_rx();
        }
    }

    /// Gives back `n` consumed bytes of connection window, in batches of half the window.
    fn credit_connection(&self, n: usize) {
        if let Some(increment) = self.recv.credit(n) {
            self.push(|o| frame::write_window_update(o, 0, increment));
        }
    }
}

/// One stream's state, shared by the reader and the stream's task.
struct StreamState {
    id: u32,
    opened: Instant,
    /// Request DATA not yet forwarded.
    rx: RefCell<VecDeque<Vec<u8>>>,
    rx_end: Cell<bool>,
    rx_trailers: RefCell<Option<Headers>>,
    rx_waker: Cell<Option<Waker>>,
    /// What the peer may still send on the stream.
    recv: RecvWindow,
    /// Declared content-length, and DATA bytes received.
    content_length: Option<u64>,
    received: Cell<u64>,
    send_window: Cell<i64>,
    /// Reset by either side.
    reset: Cell<bool>,
    /// The response ended (END_STREAM sent).
    finished: Cell<bool>,
}

impl StreamState {
    fn wake_rx(&self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
    }
}

/// Serves HTTP/2 on a connection whose preface is at the start of `down`'s buffer.
pub(crate) async fn serve(
    worker: &Rc<Worker>,
    at: &mut ListenerRef,
    down: BufferedStream,
    peer: SocketAddr,
    idle: &Rc<IdleEntry>,
) {
    let limits = at.gen.snapshot.proxy.http2;
    let lstats = at.counters(worker.id);
    lstats.h2_event(H2Event::Connection);
    let BufferedStream { stream, rb } = down;
    let shared = Rc::new(Shared {
        transport: stream,
        listener: at.state.clone(),
        worker_id: worker.id,
        limits,
        io: Output::new(),
        encoder: RefCell::new(hpack::Encoder::default()),
        recv: RecvWindow::new(limits.connection_window),
        streams: RefCell::new(FastMap::default()),
        reader: Cell::new(None),
    });
    let http = at.gen.snapshot.proxy.http;
    shared.push(|o| {
        frame::write_settings(
            o,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    limits.max_concurrent_streams,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    http.max_request_headers_bytes as u32,
                ),
            ],
        );
        if limits.connection_window > frame::DEFAULT_WINDOW {
            frame::write_window_update(o, 0, limits.connection_window - frame::DEFAULT_WINDOW);
        }
    });
    let writer = monoio::spawn(write_loop(shared.clone(), idle.clone()));
    let mut conn = Connection {
        shared: shared.clone(),
        worker: worker.clone(),
        peer,
        idle: idle.clone(),
        decoder: Decoder::new(4096),
        last_stream: 0,
        pending: None,
        goaway_sent: false,
        drain_warned: false,
        peer_goaway: false,
        streams_opened: 0,
        premature_resets: 0,
        control_epoch: Instant::now(),
        control_frames: 0,
        empty_run: 0,
        window_updates: 0,
        max_list: http.max_request_headers_bytes,
        max_headers: http.max_headers,
    };
    let exit = conn.run(at, rb).await;
    if let Exit::Error(code, why) = exit {
        shared.count(H2Event::ConnectionError);
        tracing::debug!(%peer, error = code.name(), why, "HTTP/2 connection error");
        shared.push(|o| frame::write_goaway(o, conn.last_stream, code, why.as_bytes()));
    }
    shared.close();
    let _ = writer.await;
    // Half-close and give the client a moment to read the GOAWAY before the socket closes.
    if matches!(exit, Exit::Error(..) | Exit::Drained) {
        let _ = shared.transport.shutdown_write().await;
        let _ =
            keel_io::time::timeout(Duration::from_millis(200), shared.transport.readable()).await;
    }
}

/// Sends what the connection has queued, in one write per wakeup.
async fn write_loop(shared: Rc<Shared>, idle: Rc<IdleEntry>) {
    shared
        .io
        .write_loop(&shared.transport, || {
            idle.activity.set(idle.activity.get().wrapping_add(1))
        })
        .await;
    shared.close();
}

/// How the reader ended.
enum Exit {
    /// The peer closed, or the socket failed.
    Closed,
    /// GOAWAY exchanged (either way, or a drain) and every stream done.
    Drained,
    /// A connection error: GOAWAY with this code, then close.
    Error(ErrorCode, &'static str),
}

/// The reader's state.
struct Connection {
    shared: Rc<Shared>,
    worker: Rc<Worker>,
    peer: SocketAddr,
    idle: Rc<IdleEntry>,
    decoder: Decoder,
    /// Highest stream id the client has opened.
    last_stream: u32,
    pending: Option<PendingBlock>,
    goaway_sent: bool,
    /// A drain's first GOAWAY went out.
    drain_warned: bool,
    peer_goaway: bool,
    streams_opened: u64,
    premature_resets: u64,
    control_epoch: Instant,
    control_frames: u32,
    empty_run: u32,
    window_updates: u64,
    max_list: usize,
    max_headers: usize,
}

impl Connection {
    async fn run(&mut self, at: &mut ListenerRef, mut rb: ReadBuf) -> Exit {
        let listener = at.state.clone();
        let lstats = &listener.stats.slots[self.worker.id];
        let mut drain = listener.drain_signal();
        // The client preface, then frames.
        let mut preface_seen = false;
        loop {
            if !preface_seen {
                if rb.buffered().len() >= frame::PREFACE.len() {
                    if !rb.buffered().starts_with(frame::PREFACE) {
                        return Exit::Error(ErrorCode::Protocol, "bad connection preface");
                    }
                    rb.consume(frame::PREFACE.len());
                    preface_seen = true;
                    continue;
                }
            } else if rb.buffered().len() >= frame::HEADER_LEN {
                let head_bytes: [u8; frame::HEADER_LEN] =
                    match rb.buffered()[..frame::HEADER_LEN].try_into() {
                        Ok(h) => h,
                        Err(_) => return Exit::Error(ErrorCode::Internal, "frame header"),
                    };
                let head = Head::parse(&head_bytes);
                if head.len > frame::DEFAULT_MAX_FRAME {
                    return Exit::Error(
                        ErrorCode::FrameSize,
                        "frame larger than SETTINGS_MAX_FRAME_SIZE",
                    );
                }
                let total = frame::HEADER_LEN + head.len as usize;
                if rb.buffered().len() >= total {
                    let result = self.on_frame(at, head, &rb.buffered()[frame::HEADER_LEN..total]);
                    rb.consume(total);
                    match result {
                        Ok(()) => {}
                        Err(FrameError::Connection(code, why)) => return Exit::Error(code, why),
                        Err(FrameError::Stream(id, code, why)) => {
                            lstats.h2_event(H2Event::StreamError);
                            tracing::debug!(peer = %self.peer, stream = id, error = code.name(), why, "HTTP/2 stream error");
                            self.reset_stream(id, code);
                        }
                    }
                    if self.shared.io.queued() > OUTPUT_LIMIT {
                        lstats.h2_event(H2Event::OutboundFlood);
                        return Exit::Closed;
                    }
                    continue;
                }
            }
            if self.shared.io.closed.get() {
                return Exit::Closed;
            }
            // Drain, in two steps (RFC 9113 §6.8): a GOAWAY naming the largest stream id warns
            // the client, with a PING; once that PING comes back (streams the client opened in
            // the meantime have arrived) or no stream is left, the final GOAWAY names the last
            // stream served. Those open finish; later ones are refused.
            if at.state.is_draining() && !self.drain_warned {
                self.drain_warned = true;
                self.shared.push(|o| {
                    frame::write_goaway(o, (1 << 31) - 1, ErrorCode::NoError, b"");
                    frame::write_ping(o, false, DRAIN_PING);
                });
            }
            if self.drain_warned && !self.goaway_sent && self.shared.streams.borrow().is_empty() {
                self.final_goaway();
            }
            if (self.goaway_sent || self.peer_goaway)
                && self.shared.streams.borrow().is_empty()
                && self.pending.is_none()
            {
                return Exit::Drained;
            }
            // More bytes, or (after a GOAWAY) the last stream's end.
            let idle_between = !rb.has_buffered() && self.shared.streams.borrow().is_empty();
            self.idle.between_requests.set(idle_between);
            let shared = self.shared.clone();
            let filled = {
                let fill = rb.fill(&shared.transport, &self.idle.activity);
                let mut fill = std::pin::pin!(fill);
                // The start of a drain wakes the wait too, so the warning GOAWAY goes at once.
                let drain_started = drain.wait_for(|d| *d);
                let mut drain_started = std::pin::pin!(drain_started);
                let watch_drain = !self.drain_warned;
                poll_fn(|cx| {
                    if let Poll::Ready(r) = fill.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    if watch_drain && drain_started.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    // A stream's end wakes this wait: time to send a drain's GOAWAY, or to
                    // close after one.
                    let draining = (at.state.is_draining() && !self.drain_warned)
                        || (self.drain_warned
                            && !self.goaway_sent
                            && shared.streams.borrow().is_empty());
                    if draining
                        || ((self.goaway_sent || self.peer_goaway)
                            && shared.streams.borrow().is_empty())
                    {
                        return Poll::Ready(None);
                    }
                    shared.reader.set(Some(cx.waker().clone()));
                    Poll::Pending
                })
                .await
            };
            self.idle.between_requests.set(false);
            match filled {
                None => continue,
                Some(Ok(0)) | Some(Err(_)) => return Exit::Closed,
                Some(Ok(n)) => lstats.rx_bytes.add(n as u64),
            }
        }
    }

    /// Counts a control frame (SETTINGS, PING, PRIORITY) against the per-second allowance.
    fn control_frame(&mut self, lstats: &ListenerCounters) -> Result<(), FrameError> {
        let now = Instant::now();
        if now.duration_since(self.control_epoch) >= Duration::from_secs(1) {
            self.control_epoch = now;
            self.control_frames = 0;
        }
        self.control_frames += 1;
        if self.control_frames > self.shared.limits.max_control_frames_per_second {
            lstats.h2_event(H2Event::ControlFlood);
            return Err(FrameError::Connection(
                ErrorCode::EnhanceYourCalm,
                "control frame flood",
            ));
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        at: &mut ListenerRef,
        head: Head,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        let listener = at.state.clone();
        let lstats = &listener.stats.slots[self.worker.id];
        let f = frame::decode(head, payload)?;
        // While a header block is open, only its CONTINUATION frames may come (§6.10).
        if let Some(p) = &self.pending {
            match f {
                Frame::Continuation { stream, .. } if stream == p.stream => {}
                _ => {
                    return Err(FrameError::Connection(
                        ErrorCode::Protocol,
                        "frame other than CONTINUATION inside a header block",
                    ))
                }
            }
        }
        match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(lstats, stream, end_stream, data, flow_len),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if end_headers {
                    self.on_header_block(at, stream, end_stream, block)
                } else {
                    self.pending = Some(PendingBlock::new(stream, end_stream, block));
                    Ok(())
                }
            }
            Frame::Continuation {
                stream,
                end_headers,
                block,
            } => {
                let Some(mut p) = self.pending.take() else {
                    return Err(FrameError::Connection(
                        ErrorCode::Protocol,
                        "CONTINUATION without HEADERS",
                    ));
                };
                let limit = self.shared.limits.max_continuation_frames;
                if let Err(e) = p.push(block, limit, self.max_list + 16 * 1024) {
                    lstats.h2_event(H2Event::ContinuationFlood);
                    return Err(e);
                }
                if end_headers {
                    self.on_header_block(at, stream, p.end_stream, &p.block)
                } else {
                    self.pending = Some(p);
                    Ok(())
                }
            }
            Frame::Priority { .. } => self.control_frame(lstats),
            Frame::RstStream { stream, .. } => {
                if stream > self.last_stream {
                    return Err(FrameError::Connection(
                        ErrorCode::Protocol,
                        "RST_STREAM on an idle stream",
                    ));
                }
                lstats.h2_event(H2Event::ClientReset);
                let removed = self.shared.streams.borrow_mut().remove(&stream);
                if let Some(s) = removed {
                    if !s.finished.get() && s.opened.elapsed() < PREMATURE_RESET_AGE {
                        self.premature_resets += 1;
                    }
                    self.end_stream_state(&s);
                }
                let l = self.shared.limits;
                if self.streams_opened >= l.premature_reset_min_streams as u64
                    && self.premature_resets * 100
                        >= self.streams_opened * l.premature_reset_percent as u64
                {
                    lstats.h2_event(H2Event::PrematureResetClose);
                    return Err(FrameError::Connection(
                        ErrorCode::EnhanceYourCalm,
                        "too many streams reset before their response",
                    ));
                }
                Ok(())
            }
            Frame::Settings { ack, payload } => {
                if ack {
                    return Ok(());
                }
                self.control_frame(lstats)?;
                let streams = self.shared.streams.borrow();
                apply_peer_settings(
                    &self.shared.io,
                    &self.shared.encoder,
                    payload,
                    streams.values().map(|s| &s.send_window),
                )
            }
            Frame::PushPromise => Err(FrameError::Connection(
                ErrorCode::Protocol,
                "PUSH_PROMISE from a client",
            )),
            Frame::Ping { ack, data } => {
                if ack && data == DRAIN_PING && self.drain_warned && !self.goaway_sent {
                    self.final_goaway();
                }
                if !ack {
                    self.control_frame(lstats)?;
                    self.shared.push(|o| frame::write_ping(o, true, data));
                }
                Ok(())
            }
            Frame::GoAway { code, .. } => {
                tracing::debug!(peer = %self.peer, code, "HTTP/2 GOAWAY from the client");
                self.peer_goaway = true;
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                self.window_updates += 1;
                if self.window_updates
                    > WINDOW_UPDATE_ALLOWANCE
                        + WINDOW_UPDATES_PER_DATA * self.shared.io.data_frames_sent.get()
                        + self.streams_opened
                {
                    lstats.h2_event(H2Event::WindowUpdateFlood);
                    return Err(FrameError::Connection(
                        ErrorCode::EnhanceYourCalm,
                        "WINDOW_UPDATE flood",
                    ));
                }
                if stream == 0 {
                    if !grow_window(&self.shared.io.send_window, increment as i64) {
                        return Err(FrameError::Connection(
                            ErrorCode::FlowControl,
                            "connection window above 2^31-1",
                        ));
                    }
                } else {
                    if stream > self.last_stream {
                        return Err(FrameError::Connection(
                            ErrorCode::Protocol,
                            "WINDOW_UPDATE on an idle stream",
                        ));
                    }
                    let streams = self.shared.streams.borrow();
                    if let Some(s) = streams.get(&stream) {
                        if !grow_window(&s.send_window, increment as i64) {
                            return Err(FrameError::Stream(
                                stream,
                                ErrorCode::FlowControl,
                                "stream window above 2^31-1",
                            ));
                        }
                    }
                }
                self.shared.io.wake_senders();
                Ok(())
            }
            Frame::Unknown => Ok(()),
        }
    }

    fn on_data(
        &mut self,
        lstats: &ListenerCounters,
        id: u32,
        end_stream: bool,
        data: &[u8],
        flow_len: u32,
    ) -> Result<(), FrameError> {
        let shared = &self.shared;
        if !shared.recv.take(flow_len) {
            return Err(FrameError::Connection(
                ErrorCode::FlowControl,
                "DATA beyond the connection window",
            ));
        }
        if data.is_empty() && !end_stream {
            self.empty_run += 1;
            if self.empty_run > shared.limits.max_consecutive_empty_frames {
                lstats.h2_event(H2Event::EmptyFrameFlood);
                return Err(FrameError::Connection(
                    ErrorCode::EnhanceYourCalm,
                    "empty DATA flood",
                ));
            }
        } else {
            self.empty_run = 0;
        }
        let stream = shared.streams.borrow().get(&id).cloned();
        let Some(s) = stream else {
            // Whatever comes for a stream that is gone still counts against the connection.
            shared.credit_connection(flow_len as usize);
            if id > self.last_stream {
                return Err(FrameError::Connection(
                    ErrorCode::Protocol,
                    "DATA on an idle stream",
                ));
            }
            return Err(FrameError::Stream(
                id,
                ErrorCode::StreamClosed,
                "DATA on a closed stream",
            ));
        };
        if s.rx_end.get() {
            shared.credit_connection(flow_len as usize);
            return Err(FrameError::Stream(
                id,
                ErrorCode::StreamClosed,
                "DATA after END_STREAM",
            ));
        }
        // Padding is given back at once.
        let padding = take_stream_data(&s.recv, id, flow_len, data.len(), |n| {
            shared.credit_connection(n)
        })?;
        if padding > 0 {
            shared.credit_connection(padding);
            credit_stream(shared, &s, padding);
        }
        let received = s.received.get() + data.len() as u64;
        s.received.set(received);
        if let Some(cl) = s.content_length {
            if received > cl || (end_stream && received != cl) {
                return Err(FrameError::Stream(
                    id,
                    ErrorCode::Protocol,
                    "DATA length differs from content-length",
                ));
            }
        }
        if !data.is_empty() {
            s.rx.borrow_mut().push_back(data.to_vec());
        }
        if end_stream {
            s.rx_end.set(true);
        }
        s.wake_rx();
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn on_header_block(
        &mut self,
        at: &mut ListenerRef,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), FrameError> {
        let listener = at.state.clone();
        let lstats = &listener.stats.slots[self.worker.id];
        // Decoded whatever happens next: the table must stay in step with the client's.
        let mut fields = Headers::with_capacity(hpack::decoded_capacity(block.len()), 16);
        let decoded = self
            .decoder
            .decode(block, self.max_list, |n, v| fields.push_raw(n, v));
        if let Err(HpackError::Compression(why)) = decoded {
            return Err(FrameError::Connection(ErrorCode::Compression, why));
        }
        let existing = self.shared.streams.borrow().get(&id).cloned();
        if let Some(s) = existing {
            // Trailers: they end the request.
            if s.rx_end.get() {
                return Err(FrameError::Stream(
                    id,
                    ErrorCode::StreamClosed,
                    "HEADERS after END_STREAM",
                ));
            }
            check_trailers(id, end_stream, &fields)?;
            if let Some(cl) = s.content_length {
                if s.received.get() != cl {
                    return Err(FrameError::Stream(
                        id,
                        ErrorCode::Protocol,
                        "DATA length differs from content-length",
                    ));
                }
            }
            *s.rx_trailers.borrow_mut() = Some(fields);
            s.rx_end.set(true);
            s.wake_rx();
            return Ok(());
        }
        if id.is_multiple_of(2) || id <= self.last_stream {
            return Err(FrameError::Connection(
                if id <= self.last_stream {
                    ErrorCode::StreamClosed
                } else {
                    ErrorCode::Protocol
                },
                "HEADERS on a closed or even-numbered stream",
            ));
        }
        self.last_stream = id;
        self.streams_opened += 1;
        lstats.h2_event(H2Event::Stream);
        if self.goaway_sent
            || self.shared.streams.borrow().len()
                >= self.shared.limits.max_concurrent_streams as usize
        {
            lstats.h2_event(H2Event::RefusedStream);
            self.shared
                .push(|o| frame::write_rst(o, id, ErrorCode::RefusedStream));
            return Ok(());
        }
        let peer_window = self.shared.io.peer.get().initial_window_size as i64;
        let limits = self.shared.limits;
        let (head, content_length) = match decoded {
            Err(_) => {
                // Over the header list limit: answered 431, as an HTTP/1.1 client would be.
                lstats.h2_event(H2Event::HeaderListTooLarge);
                (None, None)
            }
            Ok(()) => match request_head(fields, self.max_headers) {
                Ok((h, cl)) => (Some(h), cl),
                Err(why) => return Err(FrameError::Stream(id, ErrorCode::Protocol, why)),
            },
        };
        if end_stream && content_length.is_some_and(|n| n != 0) {
            return Err(FrameError::Stream(
                id,
                ErrorCode::Protocol,
                "content-length without DATA",
            ));
        }
        let state = Rc::new(StreamState {
            id,
            opened: Instant::now(),
            rx: RefCell::new(VecDeque::new()),
            rx_end: Cell::new(end_stream),
            rx_trailers: RefCell::new(None),
            rx_waker: Cell::new(None),
            recv: RecvWindow::new(limits.stream_window),
            content_length,
            received: Cell::new(0),
            send_window: Cell::new(peer_window),
            reset: Cell::new(false),
            finished: Cell::new(false),
        });
        self.shared.streams.borrow_mut().insert(id, state.clone());
        let body = if end_stream {
            BodyKind::None
        } else {
            match content_length {
                Some(n) => BodyKind::Length(n),
                None => BodyKind::Chunked,
            }
        };
        at.refresh(&self.worker);
        let stream_at = ListenerRef {
            gen: at.gen.clone(),
            state: at.state.clone(),
            index: at.index,
        };
        lstats.rq_total.inc();
        let handle = StreamHandle {
            shared: self.shared.clone(),
            state,
        };
        monoio::spawn(run_stream(
            self.worker.clone(),
            stream_at,
            handle,
            head,
            body,
            self.peer,
            self.idle.clone(),
        ));
        Ok(())
    }

    /// Sends the GOAWAY that ends a graceful close: no stream above the last one is served.
    fn final_goaway(&mut self) {
        self.goaway_sent = true;
        let last = self.last_stream;
        self.shared
            .push(|o| frame::write_goaway(o, last, ErrorCode::NoError, b""));
    }

    /// Resets a stream for a stream error.
    fn reset_stream(&mut self, id: u32, code: ErrorCode) {
        let removed = self.shared.streams.borrow_mut().remove(&id);
        if let Some(s) = removed {
            self.end_stream_state(&s);
        }
        self.shared.push(|o| frame::write_rst(o, id, code));
    }

    /// A stream is gone from the map: its task stops, its queued bytes are given back.
    fn end_stream_state(&self, s: &StreamState) {
        s.reset.set(true);
        let queued: usize = s.rx.borrow_mut().drain(..).map(|c| c.len()).sum();
        if queued > 0 {
            self.shared.credit_connection(queued);
        }
        s.wake_rx();
        self.shared.io.wake_senders();
    }
}

/// Gives back `n` consumed bytes of a stream's window, in batches of half the window.
fn credit_stream(shared: &Shared, s: &StreamState, n: usize) {
    if s.rx_end.get() || s.reset.get() {
        return;
    }
    if let Some(increment) = s.recv.credit(n) {
        shared.push(|o| frame::write_window_update(o, s.id, increment));
    }
}

/// Builds the request head from a decoded field list (RFC 9113 §8.3.1): pseudo-header fields
/// first, each once, the required ones present; no connection-specific fields; `te` only
/// `trailers`; names lower-case; no CR, LF or NUL in values. Cookie fields are joined for an
/// HTTP/1.1 upstream (§8.2.3).
fn request_head(
    fields: Headers,
    max_headers: usize,
) -> Result<(RequestHead, Option<u64>), &'static str> {
    let mut method = None;
    let mut scheme = None;
    let mut path = None;
    let mut authority = None;
    let (bytes, count) = REQUEST_HEADROOM;
    let mut headers = Headers::with_capacity(fields.byte_len() + bytes, fields.len() + count);
    let mut cookies: Vec<u8> = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut host = None;
    let mut regular_seen = false;
    let mut count = 0;
    for (n, v) in fields.iter() {
        if v.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err("CR, LF or NUL in a field value");
        }
        if let Some(pseudo) = n.strip_prefix(b":") {
            if regular_seen {
                return Err("pseudo-header after a regular field");
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"path" => &mut path,
                b"authority" => &mut authority,
                _ => return Err("unknown pseudo-header"),
            };
            if slot.is_some() {
                return Err("repeated pseudo-header");
            }
            *slot = Some(String::from_utf8(v.to_vec()).map_err(|_| "pseudo-header not UTF-8")?);
            continue;
        }
        regular_seen = true;
        if n.is_empty() || !n.iter().all(|&b| is_token(b) && !b.is_ascii_uppercase()) {
            return Err("invalid or upper-case field name");
        }
        match n {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Err("connection-specific field"),
            b"te" if v != b"trailers" => return Err("te other than trailers"),
            b"content-length" => {
                let parsed = parse_content_length(v).ok_or("malformed content-length")?;
                if content_length.is_some_and(|c| c != parsed) {
                    return Err("differing content-length values");
                }
                content_length = Some(parsed);
                continue;
            }
            b"cookie" => {
                if !cookies.is_empty() {
                    cookies.extend_from_slice(b"; ");
                }
                cookies.extend_from_slice(v);
                continue;
            }
            b"host" => {
                host = Some(String::from_utf8(v.to_vec()).map_err(|_| "host not UTF-8")?);
                continue;
            }
            _ => {}
        }
        count += 1;
        if count > max_headers {
            return Err("too many header fields");
        }
        headers.push(n, v);
    }
    if !cookies.is_empty() {
        headers.push(b"cookie", &cookies);
    }
    let method = method.ok_or("no :method")?;
    let authority = authority.or(host).unwrap_or_default().to_ascii_lowercase();
    let path = if method == "CONNECT" {
        // Answered 405 by the proxy path (CONNECT is not enabled); `:path` is absent.
        path.unwrap_or_default()
    } else {
        if scheme.is_none() {
            return Err("no :scheme");
        }
        let p = path.ok_or("no :path")?;
        if p.is_empty() || !(p.starts_with('/') || (p == "*" && method == "OPTIONS")) {
            return Err("invalid :path");
        }
        p
    };
    if !method.bytes().all(is_token) || method.is_empty() {
        return Err("invalid :method");
    }
    Ok((
        RequestHead {
            method,
            path,
            authority,
            version: Version::Http2,
            headers,
        },
        content_length,
    ))
}

/// RFC 9110 `tchar`.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One stream's task: the proxy path, then the stream's end.
async fn run_stream(
    worker: Rc<Worker>,
    at: ListenerRef,
    mut handle: StreamHandle,
    head: Option<RequestHead>,
    body: BodyKind,
    peer: SocketAddr,
    idle: Rc<IdleEntry>,
) {
    match head {
        Some(head) => {
            exchange(&worker, &at, &mut handle, (head, body), peer, &idle).await;
        }
        None => {
            let lstats = at.counters(worker.id);
            lstats.rq_4xx.inc();
            let _ = handle
                .local_reply(431, "request header fields too large", Next::KeepAlive, &[])
                .await;
        }
    }
    handle.end();
}

/// One stream as the proxy path's client side.
#[derive(Clone)]
pub(crate) struct StreamHandle {
    shared: Rc<Shared>,
    state: Rc<StreamState>,
}

impl StreamHandle {
    fn gone(&self) -> bool {
        self.shared.io.closed.get() || self.state.reset.get()
    }

    /// The stream's task is done: reset it if its response did not end, ask the client to stop
    /// sending if its request did not, and forget it.
    fn end(&mut self) {
        let s = &self.state;
        let removed = self.shared.streams.borrow_mut().remove(&s.id).is_some();
        if removed && !self.gone() {
            if !s.finished.get() {
                self.shared
                    .push(|o| frame::write_rst(o, s.id, ErrorCode::Cancel));
            } else if !s.rx_end.get() {
                self.shared
                    .push(|o| frame::write_rst(o, s.id, ErrorCode::NoError));
            }
        }
        let queued: usize = s.rx.borrow_mut().drain(..).map(|c| c.len()).sum();
        if queued > 0 {
            self.shared.credit_connection(queued);
        }
        if let Some(w) = self.shared.reader.take() {
            w.wake();
        }
    }

    /// Sends a header block (HEADERS and CONTINUATION frames, together).
    fn send_headers(
        &self,
        status: Option<u16>,
        fields: &Headers,
        extra: &[(&str, &str)],
        end: bool,
    ) -> io::Result<()> {
        if self.gone() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut block = Vec::with_capacity(256);
        // Encoded and queued with no await between, so blocks reach the wire in the order the
        // connection's table saw them.
        let mut enc = self.shared.encoder.borrow_mut();
        enc.begin(&mut block);
        if let Some(status) = status {
            enc.field(b":status", status.to_string().as_bytes(), &mut block);
        }
        for (n, v) in fields.iter() {
            if !is_connection_specific(n) {
                enc.field(n, v, &mut block);
            }
        }
        for (n, v) in extra {
            enc.field(n.as_bytes(), v.as_bytes(), &mut block);
        }
        drop(enc);
        let max_frame = self.shared.io.peer.get().max_frame_size as usize;
        let id = self.state.id;
        self.shared
            .push(|o| frame::write_headers(o, id, &block, end, max_frame));
        if end {
            self.state.finished.set(true);
        }
        Ok(())
    }

    /// Sends `data` as DATA frames as the windows allow; a window shut for longer than
    /// `sendWindowTimeout` resets the stream.
    async fn send_data(&self, data: &[u8], end: bool) -> io::Result<()> {
        let s = &self.state;
        let sent = self
            .shared
            .io
            .send_data(
                s.id,
                &s.send_window,
                || s.reset.get(),
                data,
                end,
                self.shared.limits.send_window_timeout,
            )
            .await;
        match sent {
            Ok(()) => {
                if end {
                    s.finished.set(true);
                }
                Ok(())
            }
            Err(SendError::WindowTimeout) => {
                self.shared.count(H2Event::SendWindowTimeout);
                tracing::debug!(stream = s.id, "HTTP/2 send window stayed shut");
                self.shared
                    .push(|o| frame::write_rst(o, s.id, ErrorCode::Cancel));
                s.reset.set(true);
                Err(SendError::WindowTimeout.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves the request body into `to` as it arrives, giving window back as it leaves.
    pub(crate) async fn body_into(
        &self,
        to: &mut impl BodySink,
        activity: &Cell<u32>,
        mut count: impl FnMut(usize),
    ) -> Result<(), CopyError> {
        while let Some(chunk) = self.next_chunk().await? {
            to.data(&chunk).await.map_err(|_| CopyError::Write)?;
            count(chunk.len());
            activity.set(activity.get().wrapping_add(1));
            self.shared.credit_connection(chunk.len());
            credit_stream(&self.shared, &self.state, chunk.len());
        }
        let trailers = self
            .state
            .rx_trailers
            .borrow_mut()
            .take()
            .unwrap_or_default();
        to.finish(&trailers).await.map_err(|_| CopyError::Write)
    }

    /// The next piece of request body: `None` at its end.
    async fn next_chunk(&self) -> Result<Option<Vec<u8>>, CopyError> {
        poll_fn(|cx| {
            if self.gone() {
                return Poll::Ready(Err(CopyError::Read));
            }
            if let Some(c) = self.state.rx.borrow_mut().pop_front() {
                return Poll::Ready(Ok(Some(c)));
            }
            if self.state.rx_end.get() {
                return Poll::Ready(Ok(None));
            }
            self.state.rx_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2), left out whatever an HTTP/1.1 upstream sent.
fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"transfer-encoding"
            | b"upgrade"
            | b"te"
    )
}

/// A response body going out as DATA frames; the end is an empty END_STREAM DATA frame, or the
/// trailers as a last HEADERS frame.
struct H2Sink<'a>(&'a StreamHandle);

impl BodySink for H2Sink<'_> {
    async fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.0.send_data(bytes, false).await
    }

    async fn finish(&mut self, trailers: &Headers) -> io::Result<()> {
        if trailers.iter().next().is_some() {
            self.0.send_headers(None, trailers, &[], true)
        } else {
            self.0.send_data(&[], true).await
        }
    }
}

impl Downstream for StreamHandle {
    fn session(&self) -> Option<&Session> {
        self.shared.transport.session()
    }

    fn protocol(&self) -> &'static str {
        "HTTP/2"
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.transport.local_addr().ok()
    }

    fn transport(&self) -> &keel_tls::Transport {
        &self.shared.transport
    }

    async fn local_reply(
        &mut self,
        status: u16,
        body: &str,
        _next: Next,
        extra: &[(&str, &str)],
    ) -> io::Result<()> {
        let length = body.len().to_string();
        let mut fields: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 2);
        if !extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            fields.push(("content-type", "text/plain"));
        }
        if !body.is_empty() {
            fields.push(("content-length", &length));
        }
        fields.extend_from_slice(extra);
        self.send_headers(Some(status), &Headers::default(), &fields, body.is_empty())?;
        if !body.is_empty() {
            self.send_data(body.as_bytes(), true).await?;
        }
        Ok(())
    }

    async fn interim(&mut self, resp: &ResponseHead) -> io::Result<()> {
        self.send_headers(Some(resp.status), &resp.headers, &[], false)
    }

    async fn body_to(
        &mut self,
        to: &mut impl BodySink,
        body: BodyKind,
        activity: &Cell<u32>,
        count: impl FnMut(usize),
    ) -> Result<(), CopyError> {
        if body == BodyKind::None {
            return Ok(());
        }
        self.body_into(to, activity, count).await
    }

    fn duplex(&self) -> Option<StreamHandle> {
        Some(self.clone())
    }

    async fn respond(
        &mut self,
        resp: &ResponseHead,
        body: UpstreamBody<'_>,
        _out_body: BodyKind,
        _last: bool,
        activity: &Cell<u32>,
        lstats: &ListenerCounters,
        progress: &Progress,
    ) -> Result<(), CopyError> {
        let kind = body.kind();
        let end = kind == BodyKind::None || kind == BodyKind::Length(0);
        self.send_headers(Some(resp.status), &resp.headers, &[], end)
            .map_err(|_| CopyError::Write)?;
        if end {
            return Ok(());
        }
        let count = |n: usize| {
            lstats.tx_bytes.add(n as u64);
            progress.add(n as u64);
        };
        let mut sink = H2Sink(self);
        let trailers = body.pipe(&mut sink, activity, count).await?;
        progress.trailers(&trailers);
        Ok(())
    }

    async fn tunnel(
        &mut self,
        _up: BufferedStream,
        _activity: &Cell<u32>,
        _lstats: &ListenerCounters,
    ) {
    }
}
