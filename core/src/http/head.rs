//! Protocol-neutral message heads: what routing and filters see, whichever codec produced them.

use super::headers::Headers;

/// HTTP version of a message on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
    Http2,
}

/// A request head. `authority` is the Host header (HTTP/1) or `:authority` (HTTP/2); `path` the
/// origin-form target including any query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub version: Version,
    /// All fields except Host (held in `authority`).
    pub headers: Headers,
}

impl RequestHead {
    /// The path without its query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// The query string after `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// The authority without a port, lower-cased by the codec.
    pub fn host(&self) -> &str {
        strip_port(&self.authority)
    }
}

pub use keel_config::host::strip_port;

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub version: Version,
    pub headers: Headers,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }
}
