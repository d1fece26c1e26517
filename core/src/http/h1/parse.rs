//! Request and response heads, parsed in place from the read buffer and checked against RFC 9112's
//! framing rules (§6.3) and the smuggling vectors that follow from breaking them.

use crate::http::head::{RequestHead, ResponseHead, Version};
use crate::http::headers::{Headers, REQUEST_HEADROOM, RESPONSE_HEADROOM};

/// Size limits for heads; exceeding them answers 431 (head) or 414 (target).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus fields plus the final empty line.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_target_bytes: usize,
}

impl Default for Limits {
    /// Envoy's defaults: 60 KiB of request head, 100 fields; targets up to 8 KiB.
    fn default() -> Self {
        Limits {
            max_head_bytes: 60 * 1024,
            max_headers: 100,
            max_target_bytes: 8 * 1024,
        }
    }
}

/// Why a head was refused, with the status to answer (or 502 for an upstream response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadError {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> HeadError {
    HeadError {
        status: 400,
        reason,
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body at all.
    None,
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    CloseDelimited,
}

/// Header slots kept on the stack; a larger `maxHeadersCount` allocates.
const STACK_FIELDS: usize = 100;

/// `max` header slots for httparse: on the stack when they fit (no allocation per message).
fn field_slots<'a, 'b>(
    max: usize,
    stack: &'a mut [httparse::Header<'b>; STACK_FIELDS],
    heap: &'a mut Vec<httparse::Header<'b>>,
) -> &'a mut [httparse::Header<'b>] {
    if max <= STACK_FIELDS {
        &mut stack[..max]
    } else {
        heap.resize(max, httparse::EMPTY_HEADER);
        heap
    }
}

/// The head's length once complete (`Ok(None)` while it is not), from one scan of its CRs and
/// LFs. A lone LF (not preceded by CR) anywhere in the head is refused: some parsers treat it as
/// a line end and others do not, the root of several smuggling vectors; so is a CR not followed
/// by LF. Only the head is checked: the bytes after it are a body and may hold anything. A head
/// still incomplete at `max` bytes is `too_big`; a bare LF is reported before a bare CR.
fn checked_head(
    buf: &[u8],
    max: usize,
    too_big: HeadError,
    bare_lf: HeadError,
    bare_cr: HeadError,
) -> Result<Option<usize>, HeadError> {
    let window = &buf[..buf.len().min(max)];
    let (mut lone_lf, mut lone_cr) = (false, false);
    let mut end = None;
    let mut i = 0;
    while i < window.len() {
        // Eight bytes at a time past the runs with neither CR nor LF (most of a head); a
        // memchr2 iterator costs a search setup per line end, two per line.
        if let Some(chunk) = window.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let found = cr_or_lf_bytes(u64::from_le_bytes(word));
            if found == 0 {
                i += 8;
                continue;
            }
            // The lowest flagged byte is exact: straight to the first CR or LF of the word.
            i += (found.trailing_zeros() / 8) as usize;
        }
        match window[i] {
            // While incomplete, a trailing CR may be the start of a CRLF still on its way.
            b'\r' => lone_cr |= window.get(i + 1).is_some_and(|n| *n != b'\n'),
            b'\n' if i == 0 || window[i - 1] != b'\r' => lone_lf = true,
            b'\n' if i >= 3 && window[i - 3..i - 1] == *b"\r\n" => {
                end = Some(i + 1);
                break;
            }
            _ => {}
        }
        i += 1;
    }
    if end.is_none() && buf.len() >= max {
        return Err(too_big);
    }
    if lone_lf {
        return Err(bare_lf);
    }
    if lone_cr {
        return Err(bare_cr);
    }
    Ok(end)
}

/// The high bit of each byte of `word` (little-endian) that may be CR or LF, zero when none is:
/// the classic has-zero-byte test on the word XORed with each. The lowest flagged byte is
/// always a CR or LF; bytes above it may be flagged falsely (a borrow), which callers ignore.
#[inline]
fn cr_or_lf_bytes(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    zero_bytes(word ^ (ONES * u64::from(b'\r'))) | zero_bytes(word ^ (ONES * u64::from(b'\n')))
}

fn version(v: Option<u8>) -> Result<Version, HeadError> {
    match v {
        Some(0) => Ok(Version::Http10),
        Some(1) => Ok(Version::Http11),
        _ => Err(HeadError {
            status: 505,
            reason: "unsupported HTTP version",
        }),
    }
}

fn map_httparse(e: httparse::Error, too_many: HeadError) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => too_many,
        httparse::Error::HeaderName => bad("invalid header name (whitespace before the colon?)"),
        httparse::Error::HeaderValue => bad("invalid character in a header value"),
        httparse::Error::NewLine => bad("invalid line ending"),
        httparse::Error::Version => HeadError {
            status: 505,
            reason: "unsupported HTTP version",
        },
        httparse::Error::Token => bad("invalid method"),
        httparse::Error::Status => bad("invalid status line"),
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, or the head, its length in `buf`, and how the
/// body is framed.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize, BodyKind)>, HeadError> {
    // A request line longer than the target limit, still unterminated, is a 414 before anything else.
    let line_end = memchr::memmem::find(buf, b"\r\n");
    if line_end.unwrap_or(buf.len()) > limits.max_target_bytes + 32 {
        return Err(HeadError {
            status: 414,
            reason: "request target too long",
        });
    }
    let too_big = HeadError {
        status: 431,
        reason: "request head too large",
    };
    let len = match checked_head(
        buf,
        limits.max_head_bytes,
        too_big,
        bad("bare LF in request head"),
        bad("bare CR in request head"),
    )? {
        Some(len) => len,
        None => return Ok(None),
    };
    let raw = &buf[..len];
    let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
    let mut heap = Vec::new();
    let mut req = httparse::Request::new(field_slots(limits.max_headers, &mut stack, &mut heap));
    match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Ok(_) => return Err(bad("malformed head")),
        Err(e) => return Err(map_httparse(e, too_big)),
    }
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let version = version(req.version)?;
    if target.len() > limits.max_target_bytes {
        return Err(HeadError {
            status: 414,
            reason: "request target too long",
        });
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
        return Err(bad("invalid request target"));
    }

    let (bytes, count) = REQUEST_HEADROOM;
    let mut headers = Headers::with_capacity(len + bytes, req.headers.len() + count);
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(h.value.trim_ascii());
        } else {
            headers.push(h.name.as_bytes(), h.value.trim_ascii());
        }
    }
    if hosts > 1 {
        return Err(bad("more than one Host header"));
    }

    // Request target forms (RFC 9112 §3.2).
    let (path, authority) = if target.starts_with('/') {
        (target.to_string(), host)
    } else if let Some(rest) = strip_scheme(target) {
        // absolute-form: the target's authority wins over Host.
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        (path, Some(auth.as_bytes()))
    } else if target == "*" && method == "OPTIONS" {
        ("*".to_string(), host)
    } else if method == "CONNECT" {
        (String::new(), Some(target.as_bytes()))
    } else {
        return Err(bad("invalid request target"));
    };
    if version == Version::Http11 && hosts == 0 {
        return Err(bad("missing Host header"));
    }
    let authority = match authority {
        Some(a) => {
            if a.is_empty()
                && version == Version::Http11
                && method != "CONNECT"
                && hosts == 1
                && host.is_some_and(|h| !h.is_empty())
            {
                return Err(bad("invalid Host header"));
            }
            if !a
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]@".contains(b))
            {
                return Err(bad("invalid Host header"));
            }
            // Checked above: ASCII only, so one lower-cased copy is the string (made in one
            // pass over the bytes, not char by char).
            String::from_utf8(a.to_ascii_lowercase()).map_err(|_| bad("invalid Host header"))?
        }
        None => String::new(),
    };

    let body = request_framing(&headers, version)?;
    Ok(Some((
        RequestHead {
            method: method.to_string(),
            path,
            authority,
            version,
            headers,
        },
        len,
        body,
    )))
}

fn strip_scheme(target: &str) -> Option<&str> {
    let lower = target
        .get(..8)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if lower.starts_with("http://") {
        Some(&target[7..])
    } else if lower.starts_with("https://") {
        Some(&target[8..])
    } else {
        None
    }
}

/// The one Content-Length all values agree on, or why not.
fn content_length(headers: &Headers) -> Result<Option<u64>, &'static str> {
    let mut found: Option<u64> = None;
    for value in headers.get_all(b"content-length") {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("invalid Content-Length")?;
            if found.is_some_and(|f| f != n) {
                return Err("conflicting Content-Length values");
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// The transfer codings, lower-cased; an empty or malformed element is an error.
fn transfer_codings(headers: &Headers) -> Result<Option<Vec<String>>, &'static str> {
    let mut codings = Vec::new();
    let mut present = false;
    for value in headers.get_all(b"transfer-encoding") {
        present = true;
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty()
                || !part
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            {
                return Err("invalid Transfer-Encoding");
            }
            codings.push(String::from_utf8_lossy(part).to_ascii_lowercase());
        }
    }
    Ok(present.then_some(codings))
}

fn request_framing(headers: &Headers, version: Version) -> Result<BodyKind, HeadError> {
    let te = transfer_codings(headers).map_err(bad)?;
    let cl = content_length(headers).map_err(bad)?;
    match (te, cl) {
        (Some(_), Some(_)) => Err(bad("both Transfer-Encoding and Content-Length")),
        (Some(_), None) if version == Version::Http10 => {
            Err(bad("Transfer-Encoding in an HTTP/1.0 request"))
        }
        (Some(codings), None) => match codings.as_slice() {
            [only] if only == "chunked" => Ok(BodyKind::Chunked),
            [.., last]
                if last == "chunked" && codings.iter().filter(|c| *c == "chunked").count() == 1 =>
            {
                Err(HeadError {
                    status: 501,
                    reason: "transfer coding not implemented",
                })
            }
            _ => Err(bad("Transfer-Encoding must end with a single chunked")),
        },
        (None, Some(0)) | (None, None) => Ok(BodyKind::None),
        (None, Some(n)) => Ok(BodyKind::Length(n)),
    }
}

/// Parses an upstream response head. `request_method` decides whether a body can follow.
/// Errors carry status 502: an upstream that breaks framing rules is not forwarded.
pub fn parse_response(
    buf: &[u8],
    request_method: &str,
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize, BodyKind)>, HeadError> {
    let gateway = |reason| HeadError {
        status: 502,
        reason,
    };
    let len = match checked_head(
        buf,
        limits.max_head_bytes,
        gateway("upstream response head too large"),
        gateway("bare LF in upstream response head"),
        gateway("bare CR in upstream response head"),
    )? {
        Some(len) => len,
        None => return Ok(None),
    };
    let raw = &buf[..len];
    let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
    let mut heap = Vec::new();
    let mut resp = httparse::Response::new(field_slots(limits.max_headers, &mut stack, &mut heap));
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Ok(_) => return Err(gateway("malformed upstream response head")),
        Err(_) => return Err(gateway("malformed upstream response head")),
    }
    let status = resp.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err(gateway("invalid upstream status"));
    }
    let version =
        version(resp.version).map_err(|_| gateway("unsupported upstream HTTP version"))?;
    let (bytes, count) = RESPONSE_HEADROOM;
    let mut headers = Headers::with_capacity(len + bytes, resp.headers.len() + count);
    for h in resp.headers.iter() {
        headers.push(h.name.as_bytes(), h.value.trim_ascii());
    }
    let te = transfer_codings(&headers).map_err(gateway)?;
    let cl = content_length(&headers).map_err(gateway)?;
    let no_body =
        request_method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let body = match (te, cl) {
        _ if no_body => BodyKind::None,
        (Some(_), Some(_)) => {
            return Err(gateway(
                "upstream sent both Transfer-Encoding and Content-Length",
            ))
        }
        (Some(codings), None) => match codings.as_slice() {
            [only] if only == "chunked" => BodyKind::Chunked,
            _ => {
                return Err(gateway(
                    "upstream Transfer-Encoding is not a single chunked",
                ))
            }
        },
        (None, Some(0)) => BodyKind::None,
        (None, Some(n)) => BodyKind::Length(n),
        (None, None) => BodyKind::CloseDelimited,
    };
    let reason = resp.reason.unwrap_or_default().to_string();
    Ok(Some((
        ResponseHead {
            status,
            reason,
            version,
            headers,
        },
        len,
        body,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three-pass check `checked_head` replaced, kept as its reference.
    fn checked_head_reference(buf: &[u8], max: usize) -> Result<Option<usize>, u16> {
        let window = &buf[..buf.len().min(max)];
        let end = match window.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => Some(i + 4),
            None if buf.len() >= max => return Err(431),
            None => None,
        };
        let head = &buf[..end.unwrap_or(buf.len().min(max))];
        let lf = head
            .iter()
            .enumerate()
            .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
        let cr = head
            .iter()
            .enumerate()
            .any(|(i, b)| *b == b'\r' && head.get(i + 1).is_some_and(|n| *n != b'\n'));
        match (lf, cr) {
            (true, _) => Err(1),
            (false, true) => Err(2),
            _ => Ok(end),
        }
    }

    #[test]
    fn head_scan_agrees_with_the_three_pass_reference() {
        let e = |status| HeadError { status, reason: "" };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|k| b"\r\n\r\nab"[((seed >> (8 + 2 * k)) % 6) as usize])
                .collect();
            let max = 4 + (round % 20);
            let ours = checked_head(&buf, max, e(431), e(1), e(2)).map_err(|h| h.status);
            assert_eq!(ours, checked_head_reference(&buf, max), "{buf:?} max {max}");
        }
        // Longer heads, mostly text with CRs and LFs here and there, so that the eight-byte
        // skip meets line ends at every offset within a word and at the window's edge.
        for round in 0..100_000 {
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let len = (next() % 160) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| match next() % 32 {
                    0..=2 => b'\r',
                    3..=5 => b'\n',
                    6..=9 => b"\r\n"[(next() % 2) as usize],
                    _ => b'a' + (next() % 26) as u8,
                })
                .collect();
            let max = 4 + (round % 170);
            let ours = checked_head(&buf, max, e(431), e(1), e(2)).map_err(|h| h.status);
            assert_eq!(ours, checked_head_reference(&buf, max), "{buf:?} max {max}");
            // The same text made well formed: every LF after a CR, every CR before an LF.
            let mut good = Vec::new();
            for &b in &buf {
                match b {
                    b'\r' | b'\n' => good.extend_from_slice(b"\r\n"),
                    _ => good.push(b),
                }
            }
            let ours = checked_head(&good, max, e(431), e(1), e(2)).map_err(|h| h.status);
            assert_eq!(
                ours,
                checked_head_reference(&good, max),
                "{good:?} max {max}"
            );
        }
        // Every position of a stray byte within and across eight-byte words.
        for at in 0..40 {
            for stray in [b'\r', b'\n'] {
                let mut head =
                    b"GET /abcdefghijklmnopqrstuvwxyz HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
                if head[at] == b'\r' || head[at] == b'\n' {
                    continue;
                }
                head[at] = stray;
                let ours = checked_head(&head, 1024, e(431), e(1), e(2)).map_err(|h| h.status);
                assert_eq!(ours, checked_head_reference(&head, 1024), "{head:?}");
                assert!(ours.is_err(), "{head:?}");
            }
        }
    }

    #[test]
    fn the_word_test_finds_the_first_cr_or_lf_of_every_word() {
        assert_eq!(cr_or_lf_bytes(u64::from_le_bytes(*b"abcdefgh")), 0);
        let near = [0x0c, 0x0e, 0x8d, 0x8a, 0, 0xff, 0x0b, 0x09];
        assert_eq!(cr_or_lf_bytes(u64::from_le_bytes(near)), 0);
        let first = |word: [u8; 8]| match cr_or_lf_bytes(u64::from_le_bytes(word)) {
            0 => None,
            m => Some((m.trailing_zeros() / 8) as usize),
        };
        // Every word over an alphabet of CR, LF and their neighbours: the lowest flag is exact.
        let alphabet = [b'\r', b'\n', 0x0c, 0x0d ^ 0x80, 0x00];
        for n in 0..5u32.pow(8) {
            let word: [u8; 8] =
                std::array::from_fn(|k| alphabet[(n / 5u32.pow(k as u32)) as usize % 5]);
            let want = word.iter().position(|b| *b == b'\r' || *b == b'\n');
            assert_eq!(first(word), want, "{word:?}");
        }
    }

    fn req(s: &str) -> Result<Option<(RequestHead, usize, BodyKind)>, HeadError> {
        parse_request(s.as_bytes(), &Limits::default())
    }

    fn status(s: &str) -> u16 {
        match req(s) {
            Err(e) => e.status,
            Ok(Some(_)) => 200,
            Ok(None) => 0,
        }
    }

    #[test]
    fn rfc9112_request_example() {
        let text = "GET /hello.txt HTTP/1.1\r\nUser-Agent: curl/7.64.1\r\nHost: www.example.com\r\nAccept-Language: en, mi\r\n\r\n";
        let (h, len, body) = req(&format!("{text}extra")).unwrap().unwrap();
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.authority.as_str()),
            ("GET", "/hello.txt", "www.example.com")
        );
        assert_eq!(h.headers.get(b"accept-language"), Some(&b"en, mi"[..]));
        assert_eq!(len, text.len(), "the head ends before the next bytes");
        assert_eq!(body, BodyKind::None);
    }

    #[test]
    fn incomplete_is_none() {
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
    }

    #[test]
    fn absolute_form_authority_wins() {
        let (h, ..) = req("GET http://Example.com:8080/a?b HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.authority.as_str(), h.path.as_str()),
            ("example.com:8080", "/a?b")
        );
    }

    #[test]
    fn framing() {
        let (_, _, b) = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(b, BodyKind::Length(5));
        let (_, _, b) = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(b, BodyKind::Chunked);
        let (_, _, b) = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(b, BodyKind::Length(5));
    }

    #[test]
    fn ambiguous_framing_is_400() {
        for s in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET nopath HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        ] {
            assert_eq!(status(s), 400, "{s:?}");
        }
    }

    #[test]
    fn body_bytes_after_the_head_are_not_head_checked() {
        let text = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n";
        let (_, len, body) = req(&format!("{text}a\nb\rc")).unwrap().unwrap();
        assert_eq!((len, body), (text.len(), BodyKind::Length(6)));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\n\n",
            "GET",
            &Limits::default(),
        );
        assert!(matches!(r, Ok(Some((_, _, BodyKind::Length(2))))));
    }

    #[test]
    fn gzip_then_chunked_is_501() {
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
    }

    #[test]
    fn limits() {
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        assert_eq!(status(&long_target), 414);
        let big_head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        assert_eq!(status(&big_head), 431);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(101)
        );
        assert_eq!(status(&many), 431);
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
    }

    #[test]
    fn responses() {
        let r = |s: &str, m: &str| parse_response(s.as_bytes(), m, &Limits::default());
        let (h, _, b) = r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "GET")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, b), (200, BodyKind::Length(3)));
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD")
                .unwrap()
                .unwrap()
                .2,
            BodyKind::None
        );
        assert_eq!(
            r(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
                "GET"
            )
            .unwrap()
            .unwrap()
            .2,
            BodyKind::None
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\n\r\n", "GET").unwrap().unwrap().2,
            BodyKind::CloseDelimited
        );
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "GET"
            )
            .unwrap()
            .unwrap()
            .2,
            BodyKind::Chunked
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert_eq!(
                r(bad, "GET").map(|_| ()).unwrap_err().status,
                502,
                "{bad:?}"
            );
        }
    }
}
