//! Moving bytes one way between two sockets: read into a pooled buffer, write from that same buffer.

use std::io;

use std::str::FromStr;

use crate::buffer::Buffer;
use crate::stream::Stream;

/// How bytes move between two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forwarding {
    /// splice(2) through a pooled pipe: no copy through user space (the default: measured cheaper).
    #[default]
    Splice,
    /// recv/send through a pooled user-space buffer.
    Copy,
}

impl FromStr for Forwarding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "splice" => Ok(Forwarding::Splice),
            "copy" => Ok(Forwarding::Copy),
            _ => Err(format!("unknown forwarding `{s}`: expected splice or copy")),
        }
    }
}

/// What copy forwarding needs of a connection, so plaintext sockets and TLS connections (in the
/// TLS crate) move bytes through the same loop.
#[allow(async_fn_in_trait)]
pub trait Duplex {
    /// Resolves when a read would not block.
    async fn readable(&self) -> io::Result<()>;
    /// One non-blocking read: `WouldBlock` when nothing is ready, `Ok(0)` at EOF.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    async fn write_all(&self, buf: &[u8]) -> io::Result<()>;
    /// Ends this direction (FIN; for TLS, close_notify first).
    async fn shutdown_write(&self) -> io::Result<()>;
}

impl Duplex for Stream {
    async fn readable(&self) -> io::Result<()> {
        Stream::readable(self).await
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Stream::try_read(self, buf)
    }
    async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        Stream::write_all(self, buf).await
    }
    async fn shutdown_write(&self) -> io::Result<()> {
        Stream::shutdown_write(self)
    }
}

/// Moves `src` to `dst` until EOF with the chosen mechanism; see [`forward`].
pub async fn forward_with(
    how: Forwarding,
    src: &Stream,
    dst: &Stream,
    on_chunk: impl FnMut(usize),
) -> io::Result<u64> {
    match how {
        Forwarding::Splice => crate::splice::forward_splice(src, dst, on_chunk).await,
        Forwarding::Copy => forward(src, dst, on_chunk).await,
    }
}

/// Copies `src` to `dst` until `src` reaches EOF, then half-closes `dst` (FIN) and returns the byte
/// count. `on_chunk` sees each chunk's size after it was written, for counters and idle tracking.
///
/// No buffer is held while waiting for `src`; one is held while a chunk is in flight to `dst`, so a
/// slow reader on `dst` applies backpressure to `src` with bounded memory.
pub async fn forward<S: Duplex, D: Duplex>(
    src: &S,
    dst: &D,
    mut on_chunk: impl FnMut(usize),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let mut buf = Buffer::take();
        loop {
            match src.try_read(&mut buf) {
                Ok(0) => {
                    drop(buf);
                    dst.shutdown_write().await?;
                    return Ok(total);
                }
                Ok(n) => {
                    dst.write_all(&buf[..n]).await?;
                    total += n as u64;
                    on_chunk(n);
                    // A short read means the socket is (almost surely) drained: go back to waiting
                    // without a buffer rather than spend a syscall on EAGAIN.
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
