//! `floor-proxy`: the least work any proxy can do on the HTTP/1.1 workloads of `bench/compare.sh`
//! (its `floor` rows), as a measuring stick, not a proxy anyone should run.
//!
//! Why it exists: the CPU-per-request targets are ratios against nginx and HAProxy, and on
//! loopback most of a proxy's CPU is the kernel's TCP work for the segments it moves. This program
//! does only that work, with the fewest syscalls (edge-triggered epoll, one `recv` and one `send`
//! per message, a short read counted as drained) and no parsing, routing, header edits or
//! telemetry. Its CPU time per request is therefore a lower bound for any proxy that uses the
//! socket API on this kernel.
//!
//! - `floor-proxy LISTEN BACKEND` (h1-small): each client connection is paired with a backend
//!   connection of its own and bytes go through unchanged.
//! - `floor-proxy --close LISTEN BACKEND` (h1-close: a new client connection per request, sent
//!   with `Connection: close`): backend connections are kept alive and reused as the peers do,
//!   so the one edit an HTTP proxy cannot avoid is made — the request's `Connection: close` line is
//!   dropped on the way up, and the client connection is closed once the response's
//!   Content-Length bytes have gone down.
//!
//! - `floor-proxy --tls CERT KEY LISTEN BACKEND` (tls-h1): as the first, with TLS terminated by
//!   rustls (ring) on the client side: a record is decrypted as its bytes arrive and the backend's
//!   bytes are encrypted as they arrive, still one `recv` and one `send` per message. What it
//!   adds over the plaintext floor is the least a rustls-based proxy adds (rustls's buffered API,
//!   as Keel uses it).
//!
//! - `floor-proxy --h2c PATH LISTEN BACKEND` (h2c-small): HTTP/2 with prior knowledge from the
//!   client, HTTP/1.1 to the backend; see `floor_h2c.rs` for what it does and leaves out.
//!
//! The listener has TCP_DEFER_ACCEPT (every floor's clients speak first) and a new connection is
//! read at once, as Keel's client-first listeners do since 2026-12-06.
//!
//! Addresses are IPv4 `ip:port`. Runs until killed.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::Arc;

#[path = "floor_h2c.rs"]
mod h2c;

/// What one socket is and what it still owes its peer.
#[derive(Default)]
struct Socket {
    /// The socket its bytes go to; -1 for an idle pooled backend connection.
    peer: i32,
    /// Bytes read from this socket that the peer did not take yet.
    pending: Vec<u8>,
    is_client: bool,
    /// Close mode, backend side: bytes of the current response still to come (None: its head).
    response_left: Option<usize>,
    /// TLS mode, client side: the session.
    tls: Option<Box<rustls::ServerConnection>>,
}

/// What a socket's event leads to.
enum Outcome {
    Open,
    /// Close this socket and its peer.
    Close,
    /// Close mode: the response is complete; close the client, pool the backend.
    ResponseDone,
}

struct Floor {
    backend: SocketAddrV4,
    close_mode: bool,
    sockets: Fds<Socket>,
    buf: Vec<u8>,
    /// TLS mode: the server settings every client session starts from.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS mode: records (or plaintext) on their way to a socket.
    tls_out: Vec<u8>,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn would_block() -> bool {
    io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

fn set_nodelay(fd: i32) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a c_int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A non-blocking TCP connection to `addr`, in progress or made, with TCP_NODELAY.
fn connect_to(addr: SocketAddrV4) -> io::Result<i32> {
    // SAFETY: plain socket(2); the fd is returned or closed on error.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    set_nodelay(fd);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect with a sockaddr_in that lives across the call.
    let rc = unsafe {
        libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        let err = last_error();
        // SAFETY: closing the socket this function opened.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    Ok(fd)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The head's length and the body's Content-Length, once a whole head is in `bytes`.
fn response_size(bytes: &[u8]) -> Option<usize> {
    let head_end = find(bytes, b"\r\n\r\n")? + 4;
    let head = &bytes[..head_end];
    let lower: Vec<u8> = head.iter().map(u8::to_ascii_lowercase).collect();
    let at = find(&lower, b"\r\ncontent-length:")? + 17;
    let digits: usize = head[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .try_fold(0usize, |n, d| {
            n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
        })?;
    Some(head_end + digits)
}

/// A floor's sockets, indexed by fd, in its epoll set, and the idle backend connections among them.
struct Fds<T> {
    epoll: i32,
    entries: Vec<Option<T>>,
    idle_backends: Vec<i32>,
}

impl<T> Fds<T> {
    fn new(epoll: i32) -> Fds<T> {
        Fds {
            epoll,
            entries: Vec::new(),
            idle_backends: Vec::new(),
        }
    }

    /// Adds `fd` to the epoll set (edge-triggered, both ways) with `entry` as its state.
    fn add(&mut self, fd: i32, entry: T) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: fd as u64,
        };
        // SAFETY: epoll_ctl with our epoll fd, an open socket and an initialised event.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(last_error());
        }
        let slot = fd as usize;
        if self.entries.len() <= slot {
            self.entries.resize_with(slot + 1, || None);
        }
        self.entries[slot] = Some(entry);
        Ok(())
    }

    /// Closes `fd` (which takes it out of the epoll set) if it is ours.
    fn close(&mut self, fd: i32) {
        if fd < 0 {
            return;
        }
        if let Some(slot) = self.entries.get_mut(fd as usize) {
            if slot.take().is_some() {
                self.idle_backends.retain(|idle| *idle != fd);
                // SAFETY: an fd is closed once, when its entry is removed.
                unsafe { libc::close(fd) };
            }
        }
    }
}

impl Floor {
    fn connect_backend(&mut self) -> io::Result<i32> {
        let fd = connect_to(self.backend)?;
        let socket = Socket {
            peer: -1,
            ..Socket::default()
        };
        if let Err(err) = self.sockets.add(fd, socket) {
            // SAFETY: not registered, so closed here once.
            unsafe { libc::close(fd) };
            return Err(err);
        }
        Ok(fd)
    }

    fn accept(&mut self, listener: i32) {
        loop {
            // SAFETY: accept4 on the listener without asking for the peer address.
            let client = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if client < 0 {
                return;
            }
            let upstream = match self.sockets.idle_backends.pop() {
                Some(fd) if self.close_mode => Ok(fd),
                _ => self.connect_backend(),
            };
            let upstream = match upstream {
                Ok(fd) => fd,
                Err(err) => {
                    eprintln!("floor-proxy: connect {}: {err}", self.backend);
                    // SAFETY: closing the client just accepted, never registered.
                    unsafe { libc::close(client) };
                    continue;
                }
            };
            let tls = match &self.tls {
                Some(config) => match rustls::ServerConnection::new(config.clone()) {
                    Ok(conn) => Some(Box::new(conn)),
                    Err(err) => {
                        eprintln!("floor-proxy: TLS session: {err}");
                        // SAFETY: closing the client just accepted, never registered.
                        unsafe { libc::close(client) };
                        self.sockets.close(upstream);
                        continue;
                    }
                },
                None => None,
            };
            let socket = Socket {
                peer: upstream,
                is_client: true,
                tls,
                ..Socket::default()
            };
            if self.sockets.add(client, socket).is_err() {
                // SAFETY: not registered, so closed here once.
                unsafe { libc::close(client) };
                continue;
            }
            if let Some(Some(backend)) = self.sockets.entries.get_mut(upstream as usize) {
                backend.peer = client;
                backend.response_left = None;
            }
            // The listener defers accepts: the client's first bytes are already here.
            self.handle(client, libc::EPOLLIN as u32);
        }
    }

    /// Sends `bytes` (from `from`) to its peer, keeping what the peer does not take.
    fn send(&mut self, from: i32, to: i32, bytes_from_buf: usize, response_head: bool) -> bool {
        let mut bytes = &self.buf[..bytes_from_buf];
        let edited;
        if self.close_mode && response_head {
            // The client asked to close: say so, as every peer does, so that it does not send
            // another request on this connection.
            if let Some(at) = find(bytes, b"\r\n\r\n") {
                edited = [&bytes[..at + 2], b"Connection: close\r\n", &bytes[at + 2..]].concat();
                bytes = &edited;
            }
        } else if self.close_mode {
            if let Some(at) = find(bytes, b"Connection: close\r\n") {
                edited = [&bytes[..at], &bytes[at + 19..]].concat();
                bytes = &edited;
            }
        }
        Self::send_slice(&mut self.sockets.entries, from, to, bytes)
    }

    /// Sends `bytes` to `to`, queueing on `from` what `to` does not take now.
    fn send_slice(sockets: &mut [Option<Socket>], from: i32, to: i32, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        // SAFETY: send from an initialised buffer of the given length.
        let sent =
            unsafe { libc::send(to, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        let sent = if sent < 0 {
            if !would_block() {
                return false;
            }
            0
        } else {
            sent as usize
        };
        if sent < bytes.len() {
            if let Some(Some(socket)) = sockets.get_mut(from as usize) {
                socket.pending.extend_from_slice(&bytes[sent..]);
            }
        }
        true
    }

    /// TLS mode: what the client's `n` bytes in `buf` come to — the plaintext goes on to the
    /// backend, handshake records back to the client. False when the session failed.
    fn decrypt_upward(&mut self, client: i32, backend: i32, n: usize) -> bool {
        let mut plaintext = std::mem::take(&mut self.tls_out);
        plaintext.clear();
        let mut records = Vec::new();
        let ok = (|| {
            let Some(Some(socket)) = self.sockets.entries.get_mut(client as usize) else {
                return false;
            };
            let Some(conn) = socket.tls.as_mut() else {
                return false;
            };
            let mut input = &self.buf[..n];
            let mut chunk = [0u8; 16384];
            while !input.is_empty() {
                // rustls takes what fits its buffers: decrypt and drain, then feed it the rest.
                if conn.read_tls(&mut input).is_err() || conn.process_new_packets().is_err() {
                    return false;
                }
                loop {
                    match std::io::Read::read(&mut conn.reader(), &mut chunk) {
                        Ok(0) => break,
                        Ok(got) => plaintext.extend_from_slice(&chunk[..got]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return false,
                    }
                }
            }
            if conn.wants_write() && conn.write_tls(&mut records).is_err() {
                return false;
            }
            // Handshake records go to the client (queued on its peer, as bytes for it are).
            Self::send_slice(&mut self.sockets.entries, backend, client, &records)
                && (backend < 0
                    || Self::send_slice(&mut self.sockets.entries, client, backend, &plaintext))
        })();
        self.tls_out = plaintext;
        ok
    }

    /// TLS mode: the backend's `n` bytes in `buf`, encrypted and sent to the client.
    fn encrypt_downward(&mut self, backend: i32, client: i32, n: usize) -> bool {
        let mut out = std::mem::take(&mut self.tls_out);
        let ok = (|| {
            let Some(Some(socket)) = self.sockets.entries.get_mut(client as usize) else {
                return false;
            };
            let Some(conn) = socket.tls.as_mut() else {
                return false;
            };
            if std::io::Write::write_all(&mut conn.writer(), &self.buf[..n]).is_err() {
                return false;
            }
            out.clear();
            while conn.wants_write() {
                if conn.write_tls(&mut out).is_err() {
                    return false;
                }
            }
            Self::send_slice(&mut self.sockets.entries, backend, client, &out)
        })();
        self.tls_out = out;
        ok
    }

    /// Whether `fd` is a client connection with TLS.
    fn is_tls(&self, fd: i32) -> bool {
        matches!(self.sockets.entries.get(fd.max(0) as usize), Some(Some(s)) if s.tls.is_some())
    }

    /// Moves what `fd` has to its peer.
    fn forward(&mut self, fd: i32) -> Outcome {
        let (peer, blocked) = match self.sockets.entries.get(fd as usize) {
            Some(Some(socket)) => (socket.peer, !socket.pending.is_empty()),
            _ => return Outcome::Open,
        };
        if blocked {
            // The peer is not taking bytes: leave these queued in the kernel (backpressure).
            return Outcome::Open;
        }
        loop {
            // SAFETY: recv into a buffer we own, of its length.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n == 0 {
                return Outcome::Close;
            }
            if n < 0 {
                return if would_block() {
                    Outcome::Open
                } else {
                    Outcome::Close
                };
            }
            let n = n as usize;
            if peer < 0 {
                // Bytes on an idle backend connection: nothing asked for them.
                return Outcome::Close;
            }
            let mut done = false;
            let mut response_head = false;
            if self.close_mode {
                if let Some(Some(socket)) = self.sockets.entries.get_mut(fd as usize) {
                    if !socket.is_client {
                        response_head = socket.response_left.is_none();
                        let left = match socket.response_left {
                            Some(left) => left,
                            None => response_size(&self.buf[..n]).unwrap_or(usize::MAX),
                        };
                        let left = left.saturating_sub(n);
                        socket.response_left = Some(left);
                        done = left == 0;
                    }
                }
            }
            let sent = if self.is_tls(fd) {
                self.decrypt_upward(fd, peer, n)
            } else if self.is_tls(peer) {
                self.encrypt_downward(fd, peer, n)
            } else {
                self.send(fd, peer, n, response_head)
            };
            if !sent {
                return Outcome::Close;
            }
            if done {
                return Outcome::ResponseDone;
            }
            if n < self.buf.len() {
                // A short read emptied the receive queue; the next segment raises a new edge.
                return Outcome::Open;
            }
            if matches!(self.sockets.entries.get(fd as usize), Some(Some(s)) if !s.pending.is_empty())
            {
                return Outcome::Open;
            }
        }
    }

    /// Writes `fd`'s peer's queued bytes to `fd`; then reads on from the peer.
    fn flush_to(&mut self, fd: i32) -> Outcome {
        let peer = match self.sockets.entries.get(fd as usize) {
            Some(Some(socket)) => socket.peer,
            _ => return Outcome::Open,
        };
        let Some(Some(from)) = self.sockets.entries.get_mut(peer.max(0) as usize) else {
            return Outcome::Open;
        };
        if peer < 0 || from.pending.is_empty() {
            return Outcome::Open;
        }
        let mut pending = std::mem::take(&mut from.pending);
        while !pending.is_empty() {
            // SAFETY: send from an initialised buffer of the given length.
            let n = unsafe {
                libc::send(
                    fd,
                    pending.as_ptr().cast(),
                    pending.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                if !would_block() {
                    return Outcome::Close;
                }
                if let Some(Some(from)) = self.sockets.entries.get_mut(peer as usize) {
                    from.pending = pending;
                }
                return Outcome::Open;
            }
            pending.drain(..n as usize);
        }
        // The peer's edge came while its bytes waited: read on.
        self.forward(peer)
    }

    fn handle(&mut self, fd: i32, events: u32) {
        let mut outcome = Outcome::Open;
        let mut source = fd;
        if events & libc::EPOLLOUT as u32 != 0 {
            outcome = self.flush_to(fd);
            source = self
                .sockets
                .entries
                .get(fd as usize)
                .and_then(|s| s.as_ref())
                .map_or(fd, |s| s.peer);
        }
        if matches!(outcome, Outcome::Open)
            && events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0
        {
            outcome = self.forward(fd);
            source = fd;
        }
        let peer = match self.sockets.entries.get(source.max(0) as usize) {
            Some(Some(socket)) => socket.peer,
            _ => -1,
        };
        match outcome {
            Outcome::Open => {}
            Outcome::Close => {
                self.sockets.close(source);
                self.sockets.close(peer);
            }
            Outcome::ResponseDone => {
                // `source` is the backend: the client connection ends, the backend goes back.
                self.sockets.close(peer);
                if let Some(Some(backend)) = self.sockets.entries.get_mut(source as usize) {
                    backend.peer = -1;
                    backend.response_left = None;
                    self.sockets.idle_backends.push(source);
                }
            }
        }
    }
}

fn parse_v4(text: &str) -> Result<SocketAddrV4, String> {
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(addr)) => Ok(addr),
        _ => Err(format!("floor-proxy: not an IPv4 ip:port: {text}")),
    }
}

/// What an event loop of [`serve`] drives.
trait EventLoop {
    fn accept(&mut self, listener: i32);
    fn handle(&mut self, fd: i32, events: u32);
    /// After each batch of events.
    fn end_of_pass(&mut self) {}
}

impl EventLoop for Floor {
    fn accept(&mut self, listener: i32) {
        Floor::accept(self, listener);
    }
    fn handle(&mut self, fd: i32, events: u32) {
        Floor::handle(self, fd, events);
    }
}

/// Listens on `listen` (TCP_NODELAY, inherited by accepted sockets) and runs the loop `make`
/// builds around a new edge-triggered epoll set, until an error.
fn serve<L: EventLoop>(listen: SocketAddrV4, make: impl FnOnce(i32) -> L) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    set_nodelay(listener.as_raw_fd());
    // Every floor's clients speak first: a connection is accepted with its first bytes, so
    // taking it and reading them is one wakeup (as Keel's client-first listeners do).
    let defer: libc::c_int = 1;
    // SAFETY: setsockopt on the listening socket with a c_int option value of the size passed.
    if unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&defer as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } < 0
    {
        return Err(last_error());
    }
    let listen_fd = listener.into_raw_fd();
    // SAFETY: plain epoll_create1.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(last_error());
    }
    let mut event_loop = make(epoll);
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: listen_fd as u64,
    };
    // SAFETY: registering the listener with our epoll fd.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, listen_fd, &mut event) } < 0 {
        return Err(last_error());
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: the events array has the length passed.
        let ready =
            unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if ready < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(last_error());
        }
        for event in &events[..ready as usize] {
            let fd = event.u64 as i32;
            if fd == listen_fd {
                event_loop.accept(listen_fd);
            } else {
                event_loop.handle(fd, event.events);
            }
        }
        event_loop.end_of_pass();
    }
}

fn run(
    listen: SocketAddrV4,
    backend: SocketAddrV4,
    close_mode: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    serve(listen, |epoll| Floor {
        backend,
        close_mode,
        sockets: Fds::new(epoll),
        buf: vec![0u8; 64 * 1024],
        tls,
        tls_out: Vec::new(),
    })
}

/// A TLS 1.3 and 1.2 server with `cert` (a PEM chain) and `key` (a PEM private key), on ring.
fn tls_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let close_mode = args.first().is_some_and(|a| a == "--close");
    if close_mode {
        args.remove(0);
    }
    if args.first().is_some_and(|a| a == "--h2c") && args.len() == 4 {
        let parsed = parse_v4(&args[2]).and_then(|l| parse_v4(&args[3]).map(|b| (l, b)));
        match parsed {
            Ok((listen, backend)) if args[1].starts_with('/') => {
                if let Err(err) = h2c::run(listen, backend, &args[1]) {
                    eprintln!("floor-proxy: {err}");
                    std::process::exit(1);
                }
                return;
            }
            Ok(_) => eprintln!("floor-proxy: --h2c PATH must start with /"),
            Err(message) => eprintln!("{message}"),
        }
        std::process::exit(2);
    }
    let mut tls = None;
    if !close_mode && args.first().is_some_and(|a| a == "--tls") && args.len() == 5 {
        match tls_config(&args[1], &args[2]) {
            Ok(config) => tls = Some(config),
            Err(message) => {
                eprintln!("floor-proxy: {message}");
                std::process::exit(2);
            }
        }
        args.drain(..3);
    }
    if args.len() != 2 {
        eprintln!(
            "usage: floor-proxy [--close | --tls CERT_PEM KEY_PEM | --h2c PATH] LISTEN_ADDR BACKEND_ADDR"
        );
        std::process::exit(2);
    }
    let parsed = parse_v4(&args[0]).and_then(|l| parse_v4(&args[1]).map(|b| (l, b)));
    let (listen, backend) = match parsed {
        Ok(addrs) => addrs,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(err) = run(listen, backend, close_mode, tls) {
        eprintln!("floor-proxy: {err}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::response_size;

    #[test]
    fn a_response_size_is_its_head_plus_its_content_length() {
        let head = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 1024\r\n\r\n";
        assert_eq!(response_size(head), Some(head.len() + 1024));
        let lower = b"HTTP/1.1 200 OK\r\ncontent-length:7\r\n\r\nabcdefg";
        assert_eq!(response_size(lower), Some(lower.len()));
    }

    #[test]
    fn no_size_without_a_whole_head_or_a_length() {
        assert_eq!(
            response_size(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"),
            None
        );
        assert_eq!(response_size(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"), None);
        assert_eq!(
            response_size(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            None
        );
    }
}
