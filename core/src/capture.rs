//! Captured connections: where a connection the kernel redirected to a capture port was going
//! (which picks the virtual listener that serves it), and what a connection on a port of
//! undeclared protocol speaks, told from its first bytes without consuming them.
//!
//! Detection never stalls a server-first protocol: a client that sends nothing for the
//! listener's detection timeout is taken for TCP and connected upstream at once, so a database
//! or SMTP server can speak first (the wait is Istio's `protocolDetectionTimeout`, 100 ms by
//! default, not linkerd's 10 s).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_config::{Binding, CaptureMode, Direction, Protocol, Snapshot};
use keel_tls::Transport;

/// The original destination of a connection accepted on a listener with `binding` (a capture
/// port, or a virtual listener reached through one) in `snapshot`, with the connection's local
/// address; `None` for a bound listener.
pub fn original_destination(
    snapshot: &Snapshot,
    binding: Binding,
    direction: Direction,
    stream: &Transport,
) -> Option<std::io::Result<(SocketAddr, SocketAddr)>> {
    let mode = match binding {
        Binding::Bound => return None,
        Binding::Capture(mode) => mode,
        Binding::Virtual => match direction {
            Direction::Outbound => CaptureMode::Redirect,
            Direction::Inbound => snapshot.proxy.interception.as_ref()?.mode,
        },
    };
    Some(destination(stream.raw_fd(), mode))
}

/// Where the connection on socket `fd`, captured with `mode`, was going, and its local address.
pub fn destination(
    fd: std::os::fd::RawFd,
    mode: CaptureMode,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let local = keel_io::capture::local_addr(fd)?;
    let dst = match mode {
        CaptureMode::Redirect => keel_io::capture::original_dst(fd, local)?,
        CaptureMode::Tproxy => local,
    };
    Ok((dst, local))
}

/// Whether `dst` is one of the capture ports on this host itself: a connection "to" it was not
/// captured but dialled there, and passing it through would loop.
pub fn is_capture_port(snapshot: &Snapshot, dst: SocketAddr, local: Option<SocketAddr>) -> bool {
    let Some(ic) = &snapshot.proxy.interception else {
        return false;
    };
    let ours = dst.ip().is_loopback()
        || dst.ip().is_unspecified()
        || Some(dst.ip()) == local.map(|l| l.ip());
    ours && (dst.port() == ic.inbound_port || dst.port() == ic.outbound_port)
}

/// What the first bytes of a connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line or the HTTP/2 client preface.
    Http,
    /// A TLS record (a ClientHello): routed by SNI, bytes passed through.
    Tls,
    /// Anything else.
    Tcp,
    /// Consistent with HTTP so far: more bytes are needed to tell.
    NeedMore,
}

/// Longest request line worth waiting for before taking the connection for TCP.
const MAX_SNIFF: usize = 1024;

/// Longest method taken for one (the registered ones are far shorter).
const MAX_METHOD: usize = 20;

/// Classifies the first bytes of a connection.
pub fn classify(bytes: &[u8]) -> Sniffed {
    use crate::http::h2::frame::PREFACE;
    if bytes.is_empty() {
        return Sniffed::NeedMore;
    }
    if bytes[0] == 0x16 {
        return Sniffed::Tls;
    }
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] == PREFACE[..n] {
        return if n == PREFACE.len() {
            Sniffed::Http
        } else {
            Sniffed::NeedMore
        };
    }
    // method SP request-target SP HTTP/1.x CRLF (RFC 9112 §3), judged as far as it has come.
    let line_end = bytes.iter().position(|&b| b == b'\n');
    let line = &bytes[..line_end.unwrap_or(bytes.len())];
    let method_char = |b: &u8| b.is_ascii_uppercase() || *b == b'-' || *b == b'_';
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        let token = line.iter().all(method_char);
        return if token && line_end.is_none() && line.len() <= MAX_METHOD {
            Sniffed::NeedMore
        } else {
            Sniffed::Tcp
        };
    };
    let method = &line[..sp];
    if method.is_empty() || method.len() > MAX_METHOD || !method.iter().all(method_char) {
        return Sniffed::Tcp;
    }
    let Some(end) = line_end else {
        return if bytes.len() < MAX_SNIFF {
            Sniffed::NeedMore
        } else {
            Sniffed::Tcp
        };
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.rsplit(|&b| b == b' ').next() {
        Some(v) if line.len() > sp + 1 && (v == b"HTTP/1.1" || v == b"HTTP/1.0") && end > sp => {
            Sniffed::Http
        }
        _ => Sniffed::Tcp,
    }
}

/// How often a connection that has sent part of a request line is looked at again: the bytes
/// are peeked, not read, so readiness stays set and cannot be waited on for more.
const RESNIFF: Duration = Duration::from_millis(2);

/// What a connection on a listener of undeclared protocol speaks. Over TLS the ALPN tells (the
/// mesh peers offer `istio-http/1.1`, `istio-h2`, `h2`); a plaintext connection is peeked at until
/// its first bytes decide, it closes, or `timeout` passes in silence (then it is TCP).
pub async fn detect(stream: &Transport, timeout: Duration) -> (Protocol, Sniffed) {
    if let Some(session) = stream.session() {
        let http = matches!(
            session.alpn.as_deref(),
            Some(
                b"h2"
                    | b"http/1.1"
                    | b"http/1.0"
                    | b"istio-http/1.1"
                    | b"istio-http/1.0"
                    | b"istio-h2"
            )
        );
        return if http {
            (Protocol::Http, Sniffed::Http)
        } else {
            (Protocol::Tcp, Sniffed::Tcp)
        };
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_SNIFF];
    loop {
        // What has arrived is looked at first, so a wait already used up still reads it.
        match keel_io::capture::peek(stream.raw_fd(), &mut buf) {
            Ok(0) => return (Protocol::Tcp, Sniffed::Tcp),
            Ok(n) => match classify(&buf[..n]) {
                Sniffed::Http => return (Protocol::Http, Sniffed::Http),
                Sniffed::Tls => return (Protocol::Tcp, Sniffed::Tls),
                Sniffed::Tcp => return (Protocol::Tcp, Sniffed::Tcp),
                Sniffed::NeedMore if n == buf.len() => return (Protocol::Tcp, Sniffed::Tcp),
                Sniffed::NeedMore => {
                    // Part of a request line, then nothing for the whole wait: not HTTP.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return (Protocol::Tcp, Sniffed::Tcp);
                    }
                    keel_io::time::sleep(RESNIFF.min(left)).await;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stream.socket().read_blocked();
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return (Protocol::Tcp, Sniffed::Tcp);
                }
                let ready = keel_io::time::timeout(left, stream.readable()).await;
                if !matches!(ready, Ok(Ok(()))) {
                    // Silent for the whole wait (a server-first protocol), or gone: TCP decides
                    // the rest.
                    return (Protocol::Tcp, Sniffed::Tcp);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (Protocol::Tcp, Sniffed::Tcp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_tls_and_tcp_apart() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Sniffed::Http
        );
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\r\n"), Sniffed::Http);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Http);
        assert_eq!(classify(b"PRI * HTTP/2"), Sniffed::NeedMore);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Sniffed::Tls);
        assert_eq!(classify(b"GET"), Sniffed::NeedMore);
        assert_eq!(classify(b"GET /index"), Sniffed::NeedMore);
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"GET / SMTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"EHLO example.com\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Sniffed::Tcp);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"PING\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b""), Sniffed::NeedMore);
        // Found by the fuzzer: a long token is TCP whether or not its space has arrived.
        assert_eq!(classify(b"__GHZTEUUUUUUUUUUUU__ _"), Sniffed::Tcp);
        assert_eq!(classify(b"__GHZTEUUUUUUUUUUUU__"), Sniffed::Tcp);
    }
}
