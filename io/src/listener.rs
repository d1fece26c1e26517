//! Listening sockets: one SO_REUSEPORT socket per worker per listener, built with socket2.
//!
//! monoio's own `TcpListener::bind` turns SO_REUSEPORT on silently, so a second process on the same
//! port would share our connections without an error. We first probe the port with a plain socket,
//! which fails with EADDRINUSE if anyone (even another SO_REUSEPORT group) listens there.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::reactor::{Direction, Initial, Registered};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept queue length per worker socket.
pub const BACKLOG: i32 = 4096;

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

fn set_transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, name) = if addr.is_ipv4() {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    };
    // SAFETY: setsockopt on a socket we own, with a c_int option value of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("IP_TRANSPARENT (TPROXY needs CAP_NET_ADMIN): {e}"),
        ));
    }
    Ok(())
}

/// Fails with `AddrInUse` if something already listens on `addr`.
pub fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let socket = socket_for(addr)?;
    socket.bind(&addr.into())
}

/// Binds `count` SO_REUSEPORT sockets on `addr`, non-blocking, ready for `monoio::net::TcpListener::from_std`.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    bind_group_with(addr, count, false)
}

/// [`bind_group`], with IP_TRANSPARENT when `transparent`: the sockets then accept connections
/// TPROXY delivers for addresses that are not this host's (needs CAP_NET_ADMIN).
pub fn bind_group_with(
    addr: SocketAddr,
    count: usize,
    transparent: bool,
) -> io::Result<Vec<TcpListener>> {
    probe_free(addr)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = socket_for(addr)?;
        if transparent {
            set_transparent(&socket, addr)?;
        }
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        out.push(socket.into());
    }
    Ok(out)
}

/// How long the kernel holds a connection that has sent nothing before handing it over anyway
/// (TCP_DEFER_ACCEPT, in seconds; the kernel rounds it to its SYN-ACK retransmission steps).
pub const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Turns TCP_DEFER_ACCEPT on or off on a listening socket. On, a connection is accepted once its
/// first bytes arrive (or, silent, after [`DEFER_ACCEPT_SECS`]), so accepting it and reading its
/// first bytes take one wakeup instead of two. Only for listeners whose clients speak first.
pub fn set_defer_accept(fd: std::os::fd::RawFd, on: bool) -> io::Result<()> {
    let secs: libc::c_int = if on { DEFER_ACCEPT_SECS } else { 0 };
    // SAFETY: setsockopt on a socket fd the caller keeps open, with a c_int option value of the
    // size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listening socket on a worker's runtime, accepted from by readiness.
///
/// One readiness wait, then non-blocking accept4(2) until the queue is empty: a burst of connections
/// costs one wakeup, accepted sockets come non-blocking, and no accept is ever in flight to be
/// cancelled (monoio 0.2.4 leaks the fd of a cancelled in-flight accept).
pub struct Acceptor {
    io: Registered,
}

impl Acceptor {
    /// Registers a listener bound by [`bind_group`] (or handed over by a previous process) with
    /// the current worker's reactor. TCP_NODELAY is set here, once: Linux copies it into every
    /// socket the listener accepts, which saves a setsockopt per connection.
    pub fn from_std(listener: TcpListener) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        socket2::SockRef::from(&listener).set_nodelay(true)?;
        Ok(Acceptor {
            io: Registered::new(OwnedFd::from(listener), Initial::READY)?,
        })
    }

    /// The listening socket's fd, for duplicating it to hand over.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.io.fd()
    }

    /// Resolves when a connection is waiting (as far as the last accept and epoll's edges tell).
    pub fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + '_ {
        self.io.ready(Direction::Read)
    }

    /// One waiting connection, or `WouldBlock` when the queue is empty. `deferred`: the listener
    /// has TCP_DEFER_ACCEPT, so the connection's first bytes are most likely there already (it
    /// is only a hint: wrong either way, it costs one syscall or one loop pass, never a byte).
    pub fn try_accept(&self, deferred: bool) -> io::Result<(crate::Stream, SocketAddr)> {
        // SAFETY: an all-zero sockaddr_storage is a valid out-buffer for accept4(2).
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: accept4(2) on our listening fd, writing at most `len` bytes into `addr`.
        let fd = unsafe {
            libc::accept4(
                self.io.fd(),
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                // The queue is empty: the next wait parks until a connection raises an edge.
                self.io.not_ready(Direction::Read, false);
            }
            return Err(e);
        }
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        // SAFETY: accept4 filled `addr` with a socket address of `len` bytes.
        let peer = unsafe { socket2::SockAddr::new(addr, len) }
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a non-IP socket"))?;
        let stream = if deferred {
            crate::Stream::accepted_with_data(std_stream)?
        } else {
            crate::Stream::accepted(std_stream)?
        };
        Ok((stream, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_port_in_use_even_by_a_reuseport_group() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        let err = bind_group(addr, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(group);
        assert!(bind_group(addr, 1).is_ok());
    }
}
