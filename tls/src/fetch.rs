//! A small blocking HTTP/1.1 GET client (plain or over TLS with the system roots), for documents
//! Keel fetches off the workers — a RequestAuthentication's `jwksUri`.
//!
//! It is deliberately plain: one request per connection (`Connection: close`), a deadline over
//! the whole exchange, a bounded body, redirects not followed, and strict framing (a response
//! whose length cannot be told is refused rather than guessed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

/// The most of a body read (a JWKS is a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;

/// An `http://` or `https://` URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub target: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}` is not an http:// or https:// URL"));
        };
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let target = target.split('#').next().unwrap_or("/").to_string();
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed `[` in the URL's host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port `{p}`"))?,
                None => default_port,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("bad port `{p}`"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(format!("`{url}`: a host (and no user info) is required"));
        }
        Ok(Url {
            tls,
            host,
            port,
            target,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// The client config for `https://`: the system's roots, ALPN http/1.1.
fn web_client() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = crate::contexts::system_root_store()?;
            let mut config =
                rustls::ClientConfig::builder_with_provider(crate::contexts::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// GETs `url` within `timeout`; the status and body of a complete response.
pub fn get(url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    let url = Url::parse(url)?;
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .collect();
    let mut last = format!("{} has no address", url.host);
    let mut tcp = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    let mut tcp = tcp.ok_or(last)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: keel\r\naccept: application/json\r\nconnection: close\r\n\r\n",
        url.target,
        url.host_header()
    );
    let raw = if url.tls {
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| format!("bad TLS server name {}: {e}", url.host))?;
        let conn = rustls::ClientConnection::new(web_client()?, name).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        exchange(&mut stream, request.as_bytes(), deadline, |s, d| {
            s.sock.set_read_timeout(Some(d))
        })?
    } else {
        exchange(&mut tcp, request.as_bytes(), deadline, |s, d| {
            s.set_read_timeout(Some(d))
        })?
    };
    parse_response(&raw)
}

/// Writes the request and reads until the peer closes, the deadline or the size bound.
fn exchange<S: Read + Write>(
    s: &mut S,
    request: &[u8],
    deadline: Instant,
    set_timeout: impl Fn(&mut S, Duration) -> std::io::Result<()>,
) -> Result<Vec<u8>, String> {
    let left = |what: &str| {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(format!("timed out {what}"))
        } else {
            Ok(d)
        }
    };
    set_timeout(s, left("connecting")?).map_err(|e| e.to_string())?;
    s.write_all(request)
        .and_then(|_| s.flush())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut raw = Vec::with_capacity(8192);
    let mut buf = [0u8; 8192];
    loop {
        set_timeout(s, left("reading the response")?).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY + 64 * 1024 {
                    return Err(format!("response larger than {MAX_BODY} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A TLS peer that closes without close_notify still sent a complete response when its
            // framing says so; parse_response decides.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(raw),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out reading the response".into())
            }
            Err(e) => return Err(format!("reading the response: {e}")),
        }
    }
}

/// A whole response read to EOF: status and de-framed body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut chunked = false;
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err("unsupported transfer-encoding".into());
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad content-length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting content-length".into());
            }
            length = Some(v);
        }
    }
    let body = &raw[head_len..];
    if chunked {
        return Ok((status, dechunk(body)?));
    }
    match length {
        Some(n) if body.len() < n => Err("response body cut short".into()),
        Some(n) => Ok((status, body[..n].to_vec())),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .map(|l| l.split(';').next().unwrap_or("").trim())
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or("bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 || &body[size..size + 2] != b"\r\n" {
            return Err("chunked body cut short".into());
        }
        if out.len() + size > MAX_BODY {
            return Err(format!("response larger than {MAX_BODY} bytes"));
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://idp.example.com/.well-known/jwks.json?x=1#f").unwrap();
        assert_eq!(
            u,
            Url {
                tls: true,
                host: "idp.example.com".into(),
                port: 443,
                target: "/.well-known/jwks.json?x=1".into()
            }
        );
        assert_eq!(u.host_header(), "idp.example.com");
        let u = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8080, "/"));
        assert_eq!(u.host_header(), "127.0.0.1:8080");
        let u = Url::parse("http://[::1]:9/k").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://user@x/").is_err());
        assert!(Url::parse("http://x:port/").is_err());
    }

    #[test]
    fn responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (_, b) = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{\"\r\n1;x=y\r\n}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, b"{\"}");
        let (_, b) = parse_response(b"HTTP/1.0 200 OK\r\n\r\nto eof").unwrap();
        assert_eq!(b, b"to eof");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{").is_err()
        );
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n{}"
        )
        .is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
