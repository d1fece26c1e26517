//! Moving message bodies: HTTP/1.1 bodies read from a buffered stream in their framing
//! (Content-Length, chunked, close-delimited) and handed to a [`BodySink`] — an HTTP/1.1 peer in
//! the framing chosen for it, or an HTTP/2 stream as DATA frames.
//!
//! Data goes out from the buffer it was read into; only framing is written around it. What a
//! [`Tap`] keeps for a replay is the body itself (data and trailers), framed again by whichever
//! sink replays it.

use std::cell::Cell;
use std::io;

use keel_tls::Transport;

use super::conn::BufferedStream;
use super::h1::chunked::{self, Step};
use super::h1::BodyKind;
use super::h2::client::ClientStream;
use super::headers::Headers;
use super::replay::Replay;

/// Where a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyError {
    Read,
    Write,
    Framing,
}

/// The receiving end of a body: bytes in order, then the end (with trailers, when any came).
pub(crate) trait BodySink {
    async fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
    async fn finish(&mut self, trailers: &Headers) -> io::Result<()>;
}

/// An HTTP/1.1 peer: bytes as they are (Content-Length or close-delimited) or re-framed as
/// chunks.
pub(crate) struct H1Sink<'a> {
    pub to: &'a Transport,
    pub chunk: bool,
    header: Vec<u8>,
}

impl<'a> H1Sink<'a> {
    pub fn new(to: &'a Transport, chunk: bool) -> H1Sink<'a> {
        H1Sink {
            to,
            chunk,
            header: Vec::new(),
        }
    }
}

impl BodySink for H1Sink<'_> {
    async fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            // An empty chunk would end a chunked body.
            return Ok(());
        }
        if self.chunk {
            self.header.clear();
            chunked::chunk_header(bytes.len(), &mut self.header);
            self.to
                .write_all_vectored(&[&self.header, bytes, b"\r\n"])
                .await
        } else {
            self.to.write_all(bytes).await
        }
    }

    async fn finish(&mut self, trailers: &Headers) -> io::Result<()> {
        if !self.chunk {
            return Ok(());
        }
        let mut tail = Vec::with_capacity(64);
        chunked::last_chunk(trailers, &mut tail);
        self.to.write_all(&tail).await
    }
}

/// A sink that keeps what passes through it for a replay (retries, mirrors).
pub(crate) struct Tap<'a, S> {
    pub sink: &'a mut S,
    pub replay: &'a mut Replay,
}

impl<S: BodySink> BodySink for Tap<'_, S> {
    async fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.data(bytes).await?;
        self.replay.keep(bytes);
        Ok(())
    }

    async fn finish(&mut self, trailers: &Headers) -> io::Result<()> {
        self.sink.finish(trailers).await?;
        self.replay.keep_trailers(trailers);
        Ok(())
    }
}

/// Moves exactly `n` body bytes from `from` (buffered bytes first) to `to`.
pub(crate) async fn copy_length(
    from: &mut BufferedStream,
    to: &mut impl BodySink,
    mut n: u64,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<(), CopyError> {
    while n > 0 {
        if !from.has_buffered() && from.fill(activity).await.map_err(|_| CopyError::Read)? == 0 {
            return Err(CopyError::Read);
        }
        let take = (from.buffered().len() as u64).min(n) as usize;
        to.data(&from.buffered()[..take])
            .await
            .map_err(|_| CopyError::Write)?;
        count(take);
        from.consume(take);
        n -= take as u64;
    }
    to.finish(&Headers::default())
        .await
        .map_err(|_| CopyError::Write)
}

/// Decodes a chunked body strictly and hands over its data and trailers (extensions dropped);
/// returns the trailers.
pub(crate) async fn copy_chunked(
    from: &mut BufferedStream,
    to: &mut impl BodySink,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<Headers, CopyError> {
    let mut decoder = chunked::Decoder::default();
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
                to.data(&from.buffered()[range.clone()])
                    .await
                    .map_err(|_| CopyError::Write)?;
                count(range.len());
                from.consume(range.end);
            }
        }
    }
    to.finish(&decoder.trailers)
        .await
        .map_err(|_| CopyError::Write)?;
    Ok(std::mem::take(&mut decoder.trailers))
}

/// Copies until the peer closes.
pub(crate) async fn copy_until_close(
    from: &mut BufferedStream,
    to: &mut impl BodySink,
    activity: &Cell<u32>,
    mut count: impl FnMut(usize),
) -> Result<(), CopyError> {
    loop {
        if !from.has_buffered() && from.fill(activity).await.map_err(|_| CopyError::Read)? == 0 {
            break;
        }
        let n = from.buffered().len();
        to.data(from.buffered())
            .await
            .map_err(|_| CopyError::Write)?;
        count(n);
        from.consume(n);
    }
    to.finish(&Headers::default())
        .await
        .map_err(|_| CopyError::Write)
}

/// A response body coming from an upstream, in that upstream's framing.
pub(crate) enum UpstreamBody<'a> {
    /// From an HTTP/1.1 connection, framed as `kind` says.
    H1 {
        up: &'a mut BufferedStream,
        kind: BodyKind,
    },
    /// From an HTTP/2 stream: `Length` when it declared a content-length, `Chunked` when its
    /// length is unknown (and trailers may follow).
    H2 {
        stream: &'a ClientStream,
        kind: BodyKind,
    },
}

impl UpstreamBody<'_> {
    /// How the body is framed (or, from HTTP/2, what is known of its length).
    pub fn kind(&self) -> BodyKind {
        match self {
            UpstreamBody::H1 { kind, .. } | UpstreamBody::H2 { kind, .. } => *kind,
        }
    }

    /// Moves the body into `to`, and returns its trailers.
    pub async fn pipe(
        self,
        to: &mut impl BodySink,
        activity: &Cell<u32>,
        mut count: impl FnMut(usize),
    ) -> Result<Headers, CopyError> {
        match self {
            UpstreamBody::H1 { up, kind } => match kind {
                BodyKind::None => Ok(Headers::default()),
                BodyKind::Length(n) => copy_length(up, to, n, activity, count)
                    .await
                    .map(|()| Headers::default()),
                BodyKind::Chunked => copy_chunked(up, to, activity, count).await,
                BodyKind::CloseDelimited => copy_until_close(up, to, activity, count)
                    .await
                    .map(|()| Headers::default()),
            },
            UpstreamBody::H2 { stream, kind } => {
                if kind == BodyKind::None {
                    return Ok(Headers::default());
                }
                let declared = match kind {
                    BodyKind::Length(n) => Some(n),
                    _ => None,
                };
                let mut total = 0u64;
                while let Some(chunk) = stream.next_chunk().await? {
                    total += chunk.len() as u64;
                    if declared.is_some_and(|n| total > n) {
                        // More DATA than the content-length said (RFC 9113 §8.1.1).
                        return Err(CopyError::Framing);
                    }
                    to.data(&chunk).await.map_err(|_| CopyError::Write)?;
                    count(chunk.len());
                    activity.set(activity.get().wrapping_add(1));
                }
                if declared.is_some_and(|n| total != n) {
                    return Err(CopyError::Framing);
                }
                let trailers = stream.take_trailers();
                to.finish(&trailers).await.map_err(|_| CopyError::Write)?;
                Ok(trailers)
            }
        }
    }
}
