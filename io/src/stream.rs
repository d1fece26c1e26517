//! A connected TCP socket driven by readiness: wait until readable, then read into a pooled buffer.
//!
//! monoio's owned-buffer reads keep a buffer inside the kernel for as long as a read is pending,
//! which for an idle connection is forever. Waiting for readiness first lets an idle connection
//! hold no buffer, and makes cancelling a wait harmless: no bytes are ever lost in a dropped read.
//! Readiness is tracked by the worker's [`crate::reactor`] (one edge-triggered epoll
//! registration per socket), from what Keel's own syscalls report.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};

use crate::reactor::{Direction, Initial, Registered};

/// Shuts a socket down both ways, waking whatever waits on it; `-1` is ignored. The caller must know
/// `fd` is open (the idle sweeper clears its fds before their streams close).
pub fn shutdown_fd(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: shutdown(2) on an fd the caller guarantees open; no memory is passed. Errors
        // (e.g. ENOTCONN on an already closed connection) leave nothing to do.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// A TCP stream registered with the worker's reactor.
///
/// Every read and write is Keel's own non-blocking syscall; each one that finds the socket not
/// ready (EAGAIN, or fewer bytes than asked) tells the reactor, so a wait parks only when there is
/// nothing to do. 16 bytes: the fd, its slot, and the reactor.
pub struct Stream {
    pub(crate) io: Registered,
}

fn inet(addr: socket2::SockAddr) -> io::Result<SocketAddr> {
    addr.as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket address"))
}

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

impl Stream {
    /// Registers a connected socket with the current worker's reactor (made non-blocking).
    pub fn from_std(stream: std::net::TcpStream) -> io::Result<Stream> {
        stream.set_nonblocking(true)?;
        Stream::register(stream, Initial::READY)
    }

    /// A socket just accepted with SOCK_NONBLOCK (no FIONBIO needed). It starts not readable:
    /// a client's first bytes usually arrive after the accept, and epoll reports them either way,
    /// so the first read does not cost an EAGAIN.
    pub fn accepted(stream: std::net::TcpStream) -> io::Result<Stream> {
        Stream::register(stream, Initial::ACCEPTED)
    }

    /// A socket accepted from a listener with TCP_DEFER_ACCEPT: the kernel handed it over
    /// because its first bytes had arrived, so the first read is tried at once instead of
    /// waiting for epoll's report of them (one loop pass less per connection).
    pub fn accepted_with_data(stream: std::net::TcpStream) -> io::Result<Stream> {
        Stream::register(stream, Initial::READY)
    }

    /// Registers a non-blocking socket whose connect is in progress: not writable until epoll
    /// says the handshake ended (either way).
    pub fn connecting(stream: std::net::TcpStream) -> io::Result<Stream> {
        Stream::register(stream, Initial::CONNECTING)
    }

    fn register(stream: std::net::TcpStream, initial: Initial) -> io::Result<Stream> {
        Ok(Stream {
            io: Registered::new(OwnedFd::from(stream), initial)?,
        })
    }

    /// Resolves when a read would not block (data, EOF or an error is pending), as far as the
    /// reads so far and epoll's edges tell; it costs no syscall.
    pub fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + '_ {
        self.io.ready(Direction::Read)
    }

    /// Resolves when a write would not block (or the connect in progress ended).
    pub fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + '_ {
        self.io.ready(Direction::Write)
    }

    /// For a syscall made on [`Stream::raw_fd`] (splice, a peek) that found nothing to read
    /// (EAGAIN): the next [`Stream::readable`] waits for a new edge. Without it, that wait would
    /// return at once.
    pub fn read_blocked(&self) {
        self.io.not_ready(Direction::Read, false);
    }

    /// For a syscall made on [`Stream::raw_fd`] that found no room to write (EAGAIN).
    pub fn write_blocked(&self) {
        self.io.not_ready(Direction::Write, false);
    }

    /// A consuming `recv` moved fewer bytes than asked: the socket was drained, unless a hang-up
    /// is pending. (Not for splice: a pipe can run out of page slots first.)
    fn read_drained(&self) {
        self.io.not_ready(Direction::Read, true);
    }

    /// A `send` moved fewer bytes than offered: the send buffer is full (the kernel then signals
    /// room with a new edge).
    fn write_filled(&self) {
        self.io.not_ready(Direction::Write, true);
    }

    /// Tells the reactor what a read of `asked` bytes found.
    #[inline]
    fn after_read(&self, result: &io::Result<usize>, asked: usize) {
        match result {
            // A short read emptied the receive queue: the next byte raises a new edge. EOF (0)
            // stays readable.
            Ok(n) if *n > 0 && *n < asked => self.read_drained(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.read_blocked(),
            _ => {}
        }
    }

    /// Tells the reactor what a write of `offered` bytes found.
    #[inline]
    fn after_write(&self, result: &io::Result<usize>, offered: usize) {
        match result {
            Ok(n) if *n < offered => self.write_filled(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked(),
            _ => {}
        }
    }

    /// One non-blocking `recv`; `WouldBlock` when nothing is there, `Ok(0)` at EOF.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the duration of the call,
        // and the fd is owned by `self` and open.
        let result = cvt(unsafe {
            libc::recv(
                self.fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        });
        self.after_read(&result, buf.len());
        result
    }

    /// One non-blocking `send`; never raises SIGPIPE.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, readable region of `buf.len()` bytes for the duration of the call,
        // and the fd is owned by `self` and open.
        let result = cvt(unsafe {
            libc::send(
                self.fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        });
        self.after_write(&result, buf.len());
        result
    }

    /// One non-blocking `sendmsg` of `bufs` in order; never raises SIGPIPE.
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; it then points at `bufs`, whose IoSlices are
        // ABI-compatible with iovec on Unix and outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        let bufs = &bufs[..bufs.len().min(1024)];
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: sendmsg(2) only reads the iovecs set above, on an fd owned by `self`.
        let result =
            cvt(unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) });
        self.after_write(&result, bufs.iter().map(|b| b.len()).sum());
        result
    }

    /// Writes all of `buf`, waiting for writability whenever the socket buffer is full.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `parts` in order with as few `sendmsg` calls as the kernel allows (a chunk
    /// header, its data and the CRLF after it leave in one call, the data from the buffer it was
    /// read into).
    pub async fn write_all_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        self.send_all_vectored(parts, 0).await
    }

    /// Writes `parts` as the last bytes this direction carries, then half-closes it: the FIN
    /// leaves in the same segment as the data's tail (MSG_MORE holds the tail back until the
    /// shutdown pushes it), one segment fewer on every connection that closes after a response.
    pub async fn write_final_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        self.send_all_vectored(parts, libc::MSG_MORE).await?;
        self.shutdown_write()
    }

    async fn send_all_vectored(&self, parts: &[&[u8]], flags: libc::c_int) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut written = 0usize;
        while written < total {
            let mut iov: [libc::iovec; 4] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 4];
            let mut n = 0;
            let mut offered = 0;
            let mut skip = written;
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if n == iov.len() {
                    break;
                }
                let rest = &part[skip..];
                skip = 0;
                iov[n] = libc::iovec {
                    iov_base: rest.as_ptr() as *mut libc::c_void,
                    iov_len: rest.len(),
                };
                offered += rest.len();
                n += 1;
            }
            // SAFETY: an all-zero msghdr is valid; we then point it at `n` initialised iovecs that
            // borrow `parts`, which outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n as _;
            // SAFETY: sendmsg(2) reads only the iovecs set above, on an fd owned by `self`.
            let result = cvt(unsafe {
                libc::sendmsg(
                    self.fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
                )
            });
            self.after_write(&result, offered);
            match result {
                Ok(k) => written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Peeks at the first byte waiting, without consuming it: `Ok(None)` at EOF, `WouldBlock` when
    /// nothing has arrived.
    pub fn try_peek_byte(&self) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        // SAFETY: recv(2) with MSG_PEEK into a 1-byte stack buffer; the fd is owned by `self`.
        let result = cvt(unsafe {
            libc::recv(
                self.fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        });
        // A peek consumes nothing, so only EAGAIN (never a short count) means "wait for more".
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.read_blocked();
        }
        let n = result?;
        Ok((n == 1).then_some(b[0]))
    }

    /// Makes the coming close a reset (SO_LINGER 0): how a connection is refused outright, so
    /// the client sees "connection reset" rather than an empty reply.
    pub fn reset_on_close(&self) -> io::Result<()> {
        self.with_socket(|s| s.set_linger(Some(std::time::Duration::ZERO)))
    }

    /// Whether an idle connection is still usable: open, and with nothing unexpected to read.
    /// A pooled upstream connection that the peer closed (or that sent stray bytes) fails this.
    pub fn is_reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        // SAFETY: recv(2) with MSG_PEEK into a 1-byte stack buffer; the fd is owned by `self`.
        let r = cvt(unsafe {
            libc::recv(
                self.fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        });
        let idle = matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        if idle {
            self.read_blocked();
        }
        idle
    }

    /// Sends FIN: the peer sees EOF while our read side stays open (half-close).
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on an fd owned by `self`; no memory is passed.
        let ret = unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // The peer is already gone: nothing left to tell it.
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// The pending socket error (SO_ERROR), which is how a non-blocking connect reports failure.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes into `err`, a live c_int on our stack.
        let ret = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
    }

    /// Disables Nagle: without it, small writes wait for delayed ACKs (measured ~70× slower here).
    pub fn set_nodelay(&self) -> io::Result<()> {
        self.with_socket(|s| s.set_nodelay(true))
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.with_socket(|s| inet(s.peer_addr()?))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.with_socket(|s| inet(s.local_addr()?))
    }

    /// Runs `f` with the socket borrowed for socket2's option and address calls.
    pub(crate) fn with_socket<R>(&self, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
        // SAFETY: the fd is open for as long as `self` lives, which outlasts this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.io.fd()) };
        f(socket2::SockRef::from(&fd))
    }

    fn fd(&self) -> RawFd {
        self.io.fd()
    }

    /// The socket's fd, for syscalls made directly (splice, the idle sweeper's shutdown).
    pub fn raw_fd(&self) -> RawFd {
        self.io.fd()
    }
}
