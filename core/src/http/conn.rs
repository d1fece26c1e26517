//! A stream with a read buffer that exists only while there are unread bytes: an idle keep-alive
//! connection holds no buffer, and bytes read past one message (pipelining) wait for the next.

use std::cell::Cell;
use std::io;

use keel_io::{Buffer, Stream};

/// A connection and the unread bytes already taken from it.
pub struct BufferedStream {
    pub stream: Stream,
    buf: Option<Buffer>,
    start: usize,
    end: usize,
}

impl BufferedStream {
    pub fn new(stream: Stream) -> BufferedStream {
        BufferedStream {
            stream,
            buf: None,
            start: 0,
            end: 0,
        }
    }

    /// Bytes read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start..self.end],
            None => &[],
        }
    }

    /// Marks `n` buffered bytes as used; gives the buffer back when nothing is left in it.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes after those buffered, waiting for readiness before taking a buffer.
    /// Returns how many arrived (0 at EOF). `activity` ticks for idle tracking.
    pub async fn fill(&mut self, activity: &Cell<u64>) -> io::Result<usize> {
        if self.buf.is_none() {
            self.stream.readable().await?;
            self.buf = Some(Buffer::take_http());
        }
        loop {
            let Some(buf) = self.buf.as_mut() else {
                return Ok(0);
            };
            if self.end == buf.len() {
                if self.start == 0 {
                    return Err(io::Error::other("read buffer full"));
                }
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.stream.try_read(&mut buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    activity.set(activity.get().wrapping_add(1));
                    if n == 0 && self.start == self.end {
                        self.buf = None;
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether any byte is held (a partial or pipelined message).
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// Takes the stream back, with any bytes still buffered (for an upgrade tunnel).
    pub fn into_parts(self) -> (Stream, Vec<u8>) {
        let rest = self.buffered().to_vec();
        (self.stream, rest)
    }
}
