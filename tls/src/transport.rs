//! A connection as the proxy sees it: plaintext or TLS, with one set of operations for both.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use keel_io::Stream;

use crate::stream::{Session, TlsStream};

/// A downstream or upstream connection. The plaintext arm is the socket itself; TLS is boxed, so
/// a plaintext connection costs no more than before.
pub enum Transport {
    Plain(Stream),
    Tls(Box<TlsStream>),
}

impl From<Stream> for Transport {
    fn from(s: Stream) -> Transport {
        Transport::Plain(s)
    }
}

impl Transport {
    /// Resolves when a read would not block.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.readable().await,
            Transport::Tls(t) => t.readable().await,
        }
    }

    /// One non-blocking read: `WouldBlock` when nothing is ready, `Ok(0)` at EOF.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.try_read(buf),
            Transport::Tls(t) => t.try_read(buf),
        }
    }

    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(buf).await,
            Transport::Tls(t) => t.write_all(buf).await,
        }
    }

    /// Writes `parts` in order, in as few syscalls (and TLS records) as possible.
    pub async fn write_all_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all_vectored(parts).await,
            Transport::Tls(t) => t.write_all_vectored(parts).await,
        }
    }

    /// Writes `parts` as the last bytes of our direction, then ends it (for TLS, close_notify
    /// after them); on plaintext the FIN rides in the data's last segment.
    pub async fn write_final_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_final_vectored(parts).await,
            Transport::Tls(t) => {
                t.write_all_vectored(parts).await?;
                t.shutdown_write().await
            }
        }
    }

    /// Ends our direction (for TLS, close_notify first); the read side stays open.
    pub async fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown_write(),
            Transport::Tls(t) => t.shutdown_write().await,
        }
    }

    /// Whether an idle pooled connection is still usable.
    pub fn is_reusable(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_reusable(),
            Transport::Tls(t) => t.is_reusable(),
        }
    }

    /// The socket underneath (options, addresses, the idle sweeper's shutdown).
    pub fn socket(&self) -> &Stream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => t.socket(),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket().raw_fd()
    }

    pub fn set_nodelay(&self) -> io::Result<()> {
        self.socket().set_nodelay()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket().peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket().local_addr()
    }

    /// The TLS session, when this is a TLS connection.
    pub fn session(&self) -> Option<&Session> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => Some(t.session()),
        }
    }

    /// The plaintext socket, when bytes can move by splice(2).
    pub fn plain(&self) -> Option<&Stream> {
        match self {
            Transport::Plain(s) => Some(s),
            Transport::Tls(_) => None,
        }
    }
}

impl keel_io::forward::Duplex for Transport {
    async fn readable(&self) -> io::Result<()> {
        Transport::readable(self).await
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Transport::try_read(self, buf)
    }
    async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        Transport::write_all(self, buf).await
    }
    async fn shutdown_write(&self) -> io::Result<()> {
        Transport::shutdown_write(self).await
    }
}
