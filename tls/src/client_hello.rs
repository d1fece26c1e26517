//! A small, strict ClientHello reader for routing TLS by SNI without terminating it
//! (VirtualService `tls` routes, TLS passthrough).
//!
//! Only what routing needs is extracted — the server name (RFC 6066 §3) and the offered ALPN
//! protocols (RFC 7301) — from a ClientHello (RFC 8446 §4.1.2) that may span several TLS records
//! (RFC 8446 §5.1). Every length is checked against its container; anything inconsistent is an
//! error, never a panic, and the bytes looked at are capped.

/// The most ClientHello bytes (across records) read before giving up: real ones are a few KiB
/// (post-quantum key shares included).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What routing learns from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The `host_name` of the server_name extension, lower-cased; `None` when absent.
    pub server_name: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// Why the bytes are not a ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloError {
    /// The first record is not a TLS handshake record.
    NotTls,
    /// The handshake message is not a ClientHello.
    NotClientHello,
    /// A length or field is inconsistent.
    Malformed(&'static str),
    /// Larger than [`MAX_CLIENT_HELLO`].
    TooLarge,
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelloError::NotTls => f.write_str("not a TLS handshake record"),
            HelloError::NotClientHello => f.write_str("not a ClientHello"),
            HelloError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            HelloError::TooLarge => write!(f, "ClientHello larger than {MAX_CLIENT_HELLO} bytes"),
        }
    }
}

/// Parses the ClientHello at the start of `bytes` (the first bytes of a connection).
/// `Ok(None)` means more bytes are needed.
pub fn parse(bytes: &[u8]) -> Result<Option<ClientHelloInfo>, HelloError> {
    // Reassemble the handshake message from as many records as it spans.
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    let needed = loop {
        let Some(header) = bytes.get(at..at + 5) else {
            return Ok(None);
        };
        if header[0] != 0x16 {
            return Err(if at == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("record of another type inside the ClientHello")
            });
        }
        if header[1] != 0x03 {
            return Err(HelloError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16384 + 256 {
            return Err(HelloError::Malformed("record length"));
        }
        let Some(payload) = bytes.get(at + 5..at + 5 + len) else {
            return Ok(None);
        };
        message.extend_from_slice(payload);
        at += 5 + len;
        if message.len() > MAX_CLIENT_HELLO + 4 {
            return Err(HelloError::TooLarge);
        }
        if message.len() >= 4 {
            if message[0] != 0x01 {
                return Err(HelloError::NotClientHello);
            }
            let body = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if body > MAX_CLIENT_HELLO {
                return Err(HelloError::TooLarge);
            }
            if message.len() >= 4 + body {
                break body;
            }
        }
    };
    client_hello_body(&message[4..4 + needed]).map(Some)
}

/// A cursor that never reads past its slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1, what)?[0]))
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, HelloError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize, what: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = if width == 1 {
            self.u8(what)?
        } else {
            self.u16(what)?
        };
        Ok(Reader(self.take(n, what)?))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn client_hello_body(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session = r.vec(1, "legacy_session_id")?;
    if session.0.len() > 32 {
        return Err(HelloError::Malformed("legacy_session_id longer than 32"));
    }
    let suites = r.vec(2, "cipher_suites")?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    let compression = r.vec(1, "legacy_compression_methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("legacy_compression_methods"));
    }
    let mut info = ClientHelloInfo::default();
    if r.is_empty() {
        // No extensions at all (allowed before TLS 1.3): no SNI.
        return Ok(info);
    }
    let mut extensions = r.vec(2, "extensions")?;
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after extensions"));
    }
    let mut seen: Vec<usize> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let mut data = extensions.vec(2, "extension data")?;
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        seen.push(kind);
        match kind {
            0 => info.server_name = server_name(&mut data)?,
            16 => {
                let mut list = data.vec(2, "ALPN list")?;
                while !list.is_empty() {
                    let p = list.vec(1, "ALPN protocol")?;
                    if p.is_empty() {
                        return Err(HelloError::Malformed("empty ALPN protocol"));
                    }
                    info.alpn.push(p.0.to_vec());
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// The `host_name` of a server_name extension; other name types are skipped.
fn server_name(data: &mut Reader<'_>) -> Result<Option<String>, HelloError> {
    let mut list = data.vec(2, "server_name list")?;
    let mut found = None;
    while !list.is_empty() {
        let kind = list.u8("server_name type")?;
        let name = list.vec(2, "server_name")?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        let name = name.0;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid {
            return Err(HelloError::Malformed("server name is not a host name"));
        }
        found = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client for `name`.
    fn hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_and_alpn_from_a_real_client_hello() {
        let bytes = hello("Reviews.Example.COM", &[b"h2", b"http/1.1"]);
        let info = parse(&bytes).unwrap().unwrap();
        assert_eq!(info.server_name.as_deref(), Some("reviews.example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        // An IP address is not sent as SNI (RFC 6066 §3).
        let info = parse(&hello("127.0.0.1", &[])).unwrap().unwrap();
        assert_eq!(info.server_name, None);
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let bytes = hello("a.example", &[]);
        for n in 0..bytes.len() {
            assert_eq!(parse(&bytes[..n]), Ok(None), "prefix of {n} bytes");
        }
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let bytes = hello("split.example", &[b"h2"]);
        let payload = &bytes[5..];
        let mut split = Vec::new();
        for part in payload.chunks(100) {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let info = parse(&split).unwrap().unwrap();
        assert_eq!(info.server_name.as_deref(), Some("split.example"));
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        // An alert record.
        assert_eq!(
            parse(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
            Err(HelloError::NotTls)
        );
        // A ServerHello (type 2).
        assert_eq!(
            parse(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
            Err(HelloError::NotClientHello)
        );
        // A zero-length record, and one claiming a body far past the cap.
        assert!(parse(&[0x16, 0x03, 0x01, 0x00, 0x00]).is_err());
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff]),
            Err(HelloError::TooLarge)
        );
    }

    #[test]
    fn lengths_that_lie_are_errors() {
        let good = hello("lie.example", &[]);
        // Corrupt each byte of the body in turn: never a panic, and an answer either way.
        for i in 9..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = parse(&bad);
        }
        // A server_name entry longer than its list.
        let mut r = Reader(&[0x00, 0x05, 0x00, 0x00, 0x09, b'a']);
        assert!(server_name(&mut r).is_err());
    }
}
