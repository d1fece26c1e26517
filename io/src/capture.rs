//! What transparent interception needs of a socket: the original destination of a connection the
//! kernel redirected to us (SO_ORIGINAL_DST, IPv4 and IPv6), IP_TRANSPARENT on listeners that
//! TPROXY delivers to, and peeking at a connection's first bytes without consuming them.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` (netfilter_ipv6/ip6_tables.h):
/// both 80, at SOL_IP and SOL_IPV6.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The address a connection accepted after a nat REDIRECT was sent to, from conntrack.
/// Fails with `ENOENT` for a connection that was not redirected (someone dialled the port itself).
pub fn original_dst(fd: RawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    if local.is_ipv4() {
        // SAFETY: an all-zero sockaddr_in is a valid out-buffer.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: getsockopt on a socket fd we hold, writing at most `len` bytes into `addr`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    } else {
        // SAFETY: an all-zero sockaddr_in6 is a valid out-buffer.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: getsockopt on a socket fd we hold, writing at most `len` bytes into `addr`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        // An IPv4 destination of a dual-stack socket comes back mapped.
        if let Some(v4) = ip.to_ipv4_mapped() {
            return Ok(SocketAddr::V4(SocketAddrV4::new(
                v4,
                u16::from_be(addr.sin6_port),
            )));
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            0,
            addr.sin6_scope_id,
        )))
    }
}

/// The socket's own local address (with TPROXY, the original destination).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is a valid out-buffer for getsockname(2).
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname on a socket fd we hold, writing at most `len` bytes into `addr`.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getsockname filled `addr` with a socket address of `len` bytes.
    unsafe { socket2::SockAddr::new(addr, len) }
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

/// Copies the bytes waiting on `fd` into `into` without consuming them; `Ok(0)` is end of
/// stream, `WouldBlock` is nothing yet.
pub fn peek(fd: RawFd, into: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) with MSG_PEEK writes at most `into.len()` bytes into our buffer.
    let n = unsafe {
        libc::recv(
            fd,
            into.as_mut_ptr().cast(),
            into.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        assert!(original_dst(s.as_raw_fd(), local).is_err());
        assert_eq!(local_addr(s.as_raw_fd()).unwrap(), local);
    }

    #[test]
    fn peeking_leaves_the_bytes_for_the_reader() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            peek(s.as_raw_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        c.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(peek(s.as_raw_fd(), &mut buf[..3]).unwrap(), 3);
        assert_eq!(&buf[..3], b"GET");
        let mut all = [0u8; 16];
        use std::io::Read;
        (&s).read_exact(&mut all).unwrap();
        assert_eq!(&all, b"GET / HTTP/1.1\r\n");
    }
}
