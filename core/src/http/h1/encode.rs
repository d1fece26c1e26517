//! Serialising heads for the wire (HTTP/1.1).

use crate::http::head::{RequestHead, ResponseHead};

/// Writes `head` as an HTTP/1.1 request with `host` as its Host header.
pub fn request(head: &RequestHead, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(head.authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers.iter() {
        field(name, value, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `head` as an HTTP/1.1 response.
pub fn response(head: &ResponseHead, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    status_code(head.status, out);
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers.iter() {
        field(name, value, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a status code's digits: three of them for every code Keel sends (100–999, what the
/// parser accepts and local replies use), without the formatting machinery on every response.
fn status_code(status: u16, out: &mut Vec<u8>) {
    if (100..=999).contains(&status) {
        let digit = |d: u16| b'0' + (d % 10) as u8;
        out.extend_from_slice(&[digit(status / 100), digit(status / 10), digit(status)]);
    } else {
        use std::io::Write;
        let _ = write!(out, "{status}");
    }
}

fn field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The standard reason phrase, for responses Keel makes itself.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::status_code;

    #[test]
    fn status_codes_are_written_as_their_digits() {
        for status in [
            0u16, 7, 42, 100, 101, 200, 204, 304, 404, 503, 599, 999, 1000, 65535,
        ] {
            let mut out = Vec::new();
            status_code(status, &mut out);
            assert_eq!(out, status.to_string().as_bytes(), "{status}");
        }
    }
}
