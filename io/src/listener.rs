//! Listening sockets: one SO_REUSEPORT socket per worker per listener, built with socket2.
//!
//! monoio's own `TcpListener::bind` turns SO_REUSEPORT on silently, so a second process on the same
//! port would share our connections without an error. We first probe the port with a plain socket,
//! which fails with EADDRINUSE if anyone (even another SO_REUSEPORT group) listens there.

use std::io;
use std::net::{SocketAddr, TcpListener};

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

/// Fails with `AddrInUse` if something already listens on `addr`.
pub fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let socket = socket_for(addr)?;
    socket.bind(&addr.into())
}

/// Binds `count` SO_REUSEPORT sockets on `addr`, non-blocking, ready for `monoio::net::TcpListener::from_std`.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    probe_free(addr)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = socket_for(addr)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        out.push(socket.into());
    }
    Ok(out)
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
