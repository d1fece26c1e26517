//! The client side of an exchange, whichever protocol it speaks: the proxy path reads the request
//! body and writes the response through [`Downstream`], implemented by an HTTP/1.1 connection
//! ([`BufferedStream`]) and by an HTTP/2 stream (`h2::server::StreamHandle`).

use std::cell::Cell;
use std::io;

use keel_tls::{Session, Transport};

use super::body::{copy_chunked, copy_length, copy_until_close, CopyError, H1Sink};
use super::conn::BufferedStream;
use super::h1::{encode, BodyKind};
use super::head::ResponseHead;
use super::headers::Headers;
use super::proxy::{local_reply, Next};
use super::replay::Replay;
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

    /// Streams the request body (`body`: how it is framed towards the upstream) to an HTTP/1.1
    /// upstream, keeping the wire bytes in `tap` for a replay.
    async fn body_to(
        &mut self,
        up: &Transport,
        body: BodyKind,
        activity: &Cell<u32>,
        count: impl FnMut(usize),
        tap: &mut Replay,
    ) -> Result<(), CopyError>;

    /// Sends the response head, then the body read from an HTTP/1.1 upstream (`resp_body`, its
    /// framing there; `out_body`, the framing an HTTP/1.1 client gets).
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &mut self,
        resp: &ResponseHead,
        up: &mut BufferedStream,
        resp_body: BodyKind,
        out_body: BodyKind,
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
        up: &Transport,
        body: BodyKind,
        activity: &Cell<u32>,
        count: impl FnMut(usize),
        tap: &mut Replay,
    ) -> Result<(), CopyError> {
        match body {
            BodyKind::None | BodyKind::CloseDelimited => Ok(()),
            BodyKind::Length(n) => {
                let mut sink = H1Sink::new(up, false, Some(tap));
                copy_length(self, &mut sink, n, activity, count).await
            }
            BodyKind::Chunked => {
                let mut sink = H1Sink::new(up, true, Some(tap));
                copy_chunked(self, &mut sink, activity, count)
                    .await
                    .map(drop)
            }
        }
    }

    async fn respond(
        &mut self,
        resp: &ResponseHead,
        up: &mut BufferedStream,
        resp_body: BodyKind,
        out_body: BodyKind,
        activity: &Cell<u32>,
        lstats: &ListenerCounters,
        progress: &Progress,
    ) -> Result<(), CopyError> {
        let mut bytes = Vec::with_capacity(512);
        encode::response(resp, &mut bytes);
        // The head and whatever of a Content-Length body is already buffered leave in one sendmsg.
        let early = match resp_body {
            BodyKind::Length(n) => (up.buffered().len() as u64).min(n) as usize,
            _ => 0,
        };
        self.stream
            .write_all_vectored(&[&bytes, &up.buffered()[..early]])
            .await
            .map_err(|_| CopyError::Write)?;
        lstats.tx_bytes.add(early as u64);
        up.consume(early);
        progress.add(early as u64);
        let count = |n: usize| {
            lstats.tx_bytes.add(n as u64);
            progress.add(n as u64);
        };
        let mut sink = H1Sink::new(&self.stream, out_body == BodyKind::Chunked, None);
        match resp_body {
            BodyKind::None => Ok(()),
            BodyKind::Length(n) => {
                copy_length(up, &mut sink, n - early as u64, activity, count).await
            }
            BodyKind::Chunked => {
                let trailers = copy_chunked(up, &mut sink, activity, count).await?;
                progress.trailers(&trailers);
                Ok(())
            }
            BodyKind::CloseDelimited => copy_until_close(up, &mut sink, activity, count).await,
        }
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
