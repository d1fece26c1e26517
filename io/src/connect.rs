//! Upstream connects with a deadline that cannot leak a file descriptor.
//!
//! monoio 0.2.4 leaks the fd when an in-flight connect op is cancelled (e.g. by a timeout). We own
//! the socket instead: a non-blocking connect(2), then a writability wait under the timeout. If the
//! timeout wins, dropping our stream closes our fd.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::stream::Stream;

/// Why an upstream connect failed; each kind has its own counter.
#[derive(Debug)]
pub enum ConnectError {
    /// The peer answered with a reset (nothing listening).
    Refused(io::Error),
    /// No answer within the connect timeout.
    Timeout,
    /// Anything else: unreachable network, out of fds...
    Other(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) => write!(f, "connection refused: {e}"),
            ConnectError::Timeout => write!(f, "connect timeout"),
            ConnectError::Other(e) => write!(f, "connect failed: {e}"),
        }
    }
}

/// TCP keepalive settings for an upstream socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepaliveOpts {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub retries: Option<u32>,
}

fn classify(e: io::Error) -> ConnectError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ConnectError::Refused(e)
    } else {
        ConnectError::Other(e)
    }
}

/// Connects to `addr` within `timeout`, with TCP_NODELAY and optional keepalive, from `source`
/// when given (an address of the same family; the port is picked at connect time, so binding
/// first does not use up ports).
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<KeepaliveOpts>,
    source: Option<IpAddr>,
) -> Result<Stream, ConnectError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Other)?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a c_int option value of the size we pass.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(ConnectError::Other(io::Error::last_os_error()));
        }
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(ConnectError::Other)?;
    }
    socket.set_nonblocking(true).map_err(ConnectError::Other)?;
    socket.set_nodelay(true).map_err(ConnectError::Other)?;
    if let Some(k) = keepalive {
        let mut ka = TcpKeepalive::new();
        if let Some(t) = k.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = k.interval {
            ka = ka.with_interval(i);
        }
        if let Some(r) = k.retries {
            ka = ka.with_retries(r);
        }
        socket.set_tcp_keepalive(&ka).map_err(ConnectError::Other)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(classify(e)),
    }
    let stream = Stream::connecting(socket.into()).map_err(ConnectError::Other)?;
    match monoio::time::timeout(timeout, stream.writable()).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(())) => {}
    }
    match stream.take_error() {
        Ok(None) => Ok(stream),
        Ok(Some(e)) | Err(e) => Err(classify(e)),
    }
}
