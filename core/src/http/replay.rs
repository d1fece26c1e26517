//! The request body as it went upstream, kept (up to a bound) so that a retry or a mirror can
//! send it again after the client's bytes are gone.
//!
//! What is kept is the wire form — chunk framing and trailers included — so a replay is one write
//! of the same bytes after the same head. A body over the bound is streamed once and never kept.

use super::h1::BodyKind;

/// Where the request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read from the client yet.
    Unread,
    /// Being read from the client and sent upstream (or was, and the try was cut off).
    Streaming,
    /// Read whole and kept.
    Kept,
    /// Read whole, too large to keep.
    Lost,
}

/// A request body's replay state.
pub struct Replay {
    /// Body bytes read from the client (for the access log).
    pub body_bytes: u64,
    bytes: Vec<u8>,
    /// Whether bytes are still being kept (false once over the bound, or when nobody needs them).
    keeping: bool,
    limit: usize,
    state: State,
}

impl Replay {
    /// For a request with `body`; `wanted` when a retry policy or mirror may send it again.
    pub fn new(body: BodyKind, limit: usize, wanted: bool) -> Replay {
        let keeping = wanted
            && match body {
                BodyKind::Length(n) => n <= limit as u64,
                BodyKind::Chunked => true,
                BodyKind::None | BodyKind::CloseDelimited => false,
            };
        Replay {
            body_bytes: 0,
            bytes: Vec::new(),
            keeping,
            limit,
            state: if matches!(body, BodyKind::None | BodyKind::CloseDelimited) {
                State::Kept
            } else {
                State::Unread
            },
        }
    }

    /// Whether a new try can send the body: not yet read, or kept whole.
    pub fn replayable(&self) -> bool {
        matches!(self.state, State::Unread | State::Kept)
    }

    /// The whole body, when it was kept.
    pub fn kept(&self) -> Option<&[u8]> {
        (self.state == State::Kept).then_some(&self.bytes[..])
    }

    /// Whether the client's body was read to its end (the connection can carry another request).
    pub fn body_done(&self) -> bool {
        matches!(self.state, State::Kept | State::Lost)
    }

    /// Whether the body still has to come from the client.
    pub fn unread(&self) -> bool {
        self.state == State::Unread
    }

    /// The client's body starts to flow upstream.
    pub fn start(&mut self) {
        self.state = State::Streaming;
    }

    /// The client's body has been sent whole.
    pub fn finish(&mut self) {
        self.state = if self.keeping {
            State::Kept
        } else {
            State::Lost
        };
    }

    /// Records bytes written upstream.
    pub fn keep(&mut self, parts: &[&[u8]]) {
        if !self.keeping {
            return;
        }
        let more: usize = parts.iter().map(|p| p.len()).sum();
        if self.bytes.len() + more > self.limit {
            self.keeping = false;
            self.bytes = Vec::new();
            return;
        }
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_within_the_bound_lost_beyond() {
        let mut r = Replay::new(BodyKind::Chunked, 8, true);
        assert!(r.replayable() && !r.body_done());
        r.start();
        r.keep(&[b"3\r\n", b"abc", b"\r\n"]);
        assert!(!r.replayable());
        r.finish();
        assert_eq!(r.kept(), Some(&b"3\r\nabc\r\n"[..]));
        let mut r = Replay::new(BodyKind::Chunked, 8, true);
        r.start();
        r.keep(&[b"5\r\n", b"abcde", b"\r\n"]);
        r.finish();
        assert!(r.kept().is_none() && r.body_done() && !r.replayable());
        let r = Replay::new(BodyKind::Length(100), 8, true);
        assert!(!r.keeping);
        let r = Replay::new(BodyKind::None, 8, false);
        assert_eq!(r.kept(), Some(&b""[..]));
    }
}
