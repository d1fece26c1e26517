//! The request body as it went upstream, kept (up to a bound) so that a retry or a mirror can
//! send it again after the client's bytes are gone.
//!
//! What is kept is the body itself — its data and its trailers — so that it can be sent again in
//! whatever framing the next try or the mirror speaks (HTTP/1.1 chunks or lengths, HTTP/2 DATA
//! frames). A body over the bound is streamed once and never kept.

use std::cell::Cell;
use std::rc::Rc;

use super::h1::BodyKind;
use super::headers::Headers;

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
    trailers: Headers,
    /// Whether bytes are still being kept (false once over the bound, or when nobody needs them).
    keeping: bool,
    limit: usize,
    state: State,
    /// Bytes counted by whoever streams the body (see [`Replay::elsewhere`]).
    elsewhere: Option<Rc<Cell<u64>>>,
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
            trailers: Headers::default(),
            keeping,
            limit,
            state: if matches!(body, BodyKind::None | BodyKind::CloseDelimited) {
                State::Kept
            } else {
                State::Unread
            },
            elsewhere: None,
        }
    }

    /// Whether a new try can send the body: not yet read, or kept whole.
    pub fn replayable(&self) -> bool {
        matches!(self.state, State::Unread | State::Kept)
    }

    /// The whole body (data, then trailers), when it was kept.
    pub fn kept(&self) -> Option<(&[u8], &Headers)> {
        (self.state == State::Kept).then_some((&self.bytes[..], &self.trailers))
    }

    /// A body being streamed by someone else (a full-duplex HTTP/2 exchange), who counts its
    /// bytes in `count`: neither kept nor done, until it is handed back.
    pub fn elsewhere(count: Rc<Cell<u64>>) -> Replay {
        Replay {
            body_bytes: 0,
            bytes: Vec::new(),
            trailers: Headers::default(),
            keeping: false,
            limit: 0,
            state: State::Streaming,
            elsewhere: Some(count),
        }
    }

    /// Body bytes read from the client so far, wherever they were counted.
    pub fn body_bytes_now(&self) -> u64 {
        self.body_bytes + self.elsewhere.as_ref().map_or(0, |c| c.get())
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

    /// Records body bytes sent upstream.
    pub fn keep(&mut self, data: &[u8]) {
        if !self.keeping {
            return;
        }
        if self.bytes.len() + data.len() > self.limit {
            self.keeping = false;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(data);
    }

    /// Records the body's trailers.
    pub fn keep_trailers(&mut self, trailers: &Headers) {
        if self.keeping {
            self.trailers = trailers.clone();
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
        r.keep(b"abc");
        let mut t = Headers::default();
        t.push(b"grpc-status", b"0");
        r.keep_trailers(&t);
        assert!(!r.replayable());
        r.finish();
        assert_eq!(r.kept(), Some((&b"abc"[..], &t)));
        let mut r = Replay::new(BodyKind::Chunked, 8, true);
        r.start();
        r.keep(b"abcde");
        r.keep(b"fghij");
        r.finish();
        assert!(r.kept().is_none() && r.body_done() && !r.replayable());
        let r = Replay::new(BodyKind::Length(100), 8, true);
        assert!(!r.keeping);
        let r = Replay::new(BodyKind::None, 8, false);
        assert_eq!(r.kept().map(|(d, _)| d), Some(&b""[..]));
    }
}
