//! The client side of an exchange, whichever protocol it speaks: the proxy path reads the request
//! body and writes the response through [`Downstream`], implemented by an HTTP/1.1 connection
//! ([`BufferedStream`]) and by an HTTP/2 stream (`h2::server::StreamHandle`).

use std::cell::Cell;
use std::io;

use keel_tls::Session;

use super::body::{copy_chunked, copy_length, BodySink, CopyError, H1Sink, UpstreamBody};
use super::conn::BufferedStream;
use super::h1::{encode, BodyKind};
use super::head::ResponseHead;
use super::headers::Headers;
use super::proxy::{local_reply, Next};
use crate::stats::ListenerCounters;

/// How a response went out: body bytes sent, and the gRPC status its trailers carried.
#[derive(Default)]
pub(crate) struct Progress {
    pub sent: Cell<u64>,
    pub grpc_status: Cell<Option<u16>>,
}

impl Progress {
    /// Counts `n` body bytes sent.
    pub fn add(&self, n: u64) {
        self.sent.set(self.sent.get() + n);
    }

    /// Notes the `grpc-status` of the response's trailers.
    pub fn trailers(&self, trailers: &Headers) {
        if let Some(code) = trailers
            .get(b"grpc-status")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
        {
            self.grpc_status.set(Some(code));
        }
    }
}

/// What an exchange needs of its client.
pub(crate) trait Downstream {
    /// The TLS session the request came over, if any.
    fn session(&self) -> Option<&Session>;

    /// The protocol name for logs and metrics.
    fn protocol(&self) -> &'static str;

    /// The connection's local address (the destination the client connected to).
    fn local_addr(&self) -> Option<std::net::SocketAddr>;

    /// The client connection itself (for its original destination when it was captured).
    fn transport(&self) -> &keel_tls::Transport;

    /// Sends a response Keel makes itself: `status`, a text body and extra fields.
    async fn local_reply(
        &mut self,
        status: u16,
        body: &str,
        next: Next,
        extra: &[(&str, &str)],
    ) -> io::Result<()>;

    /// Sends an interim (1xx) response.
    async fn interim(&mut self, resp: &ResponseHead) -> io::Result<()>;

    /// Streams the request body (`body`: how it came from the client) into `to`: an upstream,
    /// whichever protocol it speaks, through a tap that keeps it for a replay when one is wanted.
    async fn body_to(
        &mut self,
        to: &mut impl BodySink,
        body: BodyKind,
        activity: &Cell<u32>,
        count: impl FnMut(usize),
    ) -> Result<(), CopyError>;

    /// An owned handle on the rest of the request body, for moving it in a task of its own while
    /// the response streams back (full duplex, as gRPC streaming needs): an HTTP/2 stream gives
    /// one; an HTTP/1.1 connection, whose one socket carries both, does not.
    fn duplex(&self) -> Option<super::h2::server::StreamHandle> {
        None
    }

    /// Sends the response head, then the upstream's body (`out_body`: the framing an HTTP/1.1
    /// client gets). `last`: the connection closes after this response, so an HTTP/1.1
    /// connection can half-close with its last bytes.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &mut self,
        resp: &ResponseHead,
        body: UpstreamBody<'_>,
        out_body: BodyKind,
        last: bool,
        activity: &Cell<u32>,
        lstats: &ListenerCounters,
        progress: &Progress,
    ) -> Result<(), CopyError>;

    /// After a 101 to an upgrade: bytes both ways (HTTP/1.1 only; an HTTP/2 request never
    /// asks for an upgrade).
    async fn tunnel(&mut self, up: BufferedStream, activity: &Cell<u32>, lstats: &ListenerCounters);
}

impl Downstream for BufferedStream {
    fn session(&self) -> Option<&Session> {
        self.stream.session()
    }

    fn protocol(&self) -> &'static str {
        "HTTP/1.1"
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.local_addr().ok()
    }

    fn transport(&self) -> &keel_tls::Transport {
        &self.stream
    }

    async fn local_reply(
        &mut self,
        status: u16,
        body: &str,
        next: Next,
        extra: &[(&str, &str)],
    ) -> io::Result<()> {
        local_reply(&self.stream, status, body, next, extra).await
    }

    async fn interim(&mut self, resp: &ResponseHead) -> io::Result<()> {
        let mut bytes = Vec::new();
        encode::response(resp, &mut bytes);
        self.stream.write_all(&bytes).await
    }

    async fn body_to(
        &mut self,
        to: &mut impl BodySink,
        body: BodyKind,
        activity: &Cell<u32>,
        count: impl FnMut(usize),
    ) -> Result<(), CopyError> {
        match body {
            BodyKind::None | BodyKind::CloseDelimited => Ok(()),
            BodyKind::Length(n) => copy_length(self, to, n, activity, count).await,
            BodyKind::Chunked => copy_chunked(self, to, activity, count).await.map(drop),
        }
    }

    async fn respond(
        &mut self,
        resp: &ResponseHead,
        mut body: UpstreamBody<'_>,
        out_body: BodyKind,
        last: bool,
        activity: &Cell<u32>,
        lstats: &ListenerCounters,
        progress: &Progress,
    ) -> Result<(), CopyError> {
        let mut bytes = Vec::with_capacity(512);
        encode::response(resp, &mut bytes);
        // The head and whatever of a Content-Length body is already buffered leave in one sendmsg.
        let mut early: &[u8] = &[];
        let mut whole = body.kind() == BodyKind::None;
        if let UpstreamBody::H1 {
            up,
            kind: BodyKind::Length(n),
        } = &body
        {
            early = &up.buffered()[..(up.buffered().len() as u64).min(*n) as usize];
            whole = early.len() as u64 == *n;
        }
        let parts = [&bytes[..], early];
        let sent = if last && whole {
            // Nothing follows on this connection: the FIN leaves with the response.
            self.stream.write_final_vectored(&parts).await
        } else {
            self.stream.write_all_vectored(&parts).await
        };
        sent.map_err(|_| CopyError::Write)?;
        let early = early.len();
        if let UpstreamBody::H1 {
            up,
            kind: BodyKind::Length(n),
        } = &mut body
        {
            up.consume(early);
            *n -= early as u64;
        }
        lstats.tx_bytes.add(early as u64);
        progress.add(early as u64);
        let count = |n: usize| {
            lstats.tx_bytes.add(n as u64);
            progress.add(n as u64);
        };
        let mut sink = H1Sink::new(&self.stream, out_body == BodyKind::Chunked);
        let trailers = body.pipe(&mut sink, activity, count).await?;
        progress.trailers(&trailers);
        Ok(())
    }

    async fn tunnel(
        &mut self,
        up: BufferedStream,
        activity: &Cell<u32>,
        lstats: &ListenerCounters,
    ) {
        // Bytes that arrived with the heads go first.
        let pending_down = self.buffered().to_vec();
        self.consume(pending_down.len());
        let (up, pending_up) = up.into_parts();
        if (!pending_down.is_empty() && up.write_all(&pending_down).await.is_err())
            || (!pending_up.is_empty() && self.stream.write_all(&pending_up).await.is_err())
        {
            return;
        }
        let to_up = keel_io::forward::forward(&self.stream, &up, |n| {
            lstats.rx_bytes.add(n as u64);
            activity.set(activity.get().wrapping_add(1));
        });
        let to_down = keel_io::forward::forward(&up, &self.stream, |n| {
            lstats.tx_bytes.add(n as u64);
            activity.set(activity.get().wrapping_add(1));
        });
        let _ = monoio::join!(to_up, to_down);
    }
}
