//! A stream with a read buffer that exists only while there are unread bytes: an idle keep-alive
//! connection holds no buffer, and bytes read past one message (pipelining) wait for the next.

use std::cell::Cell;
use std::io;

use keel_io::Buffer;
use keel_tls::Transport;

/// Bytes read from a stream but not consumed yet; the buffer is pooled and held only while
/// non-empty. Kept apart from the stream so one task can write to the stream while another part
/// of it reads (a request body going up while the response head is awaited).
#[derive(Default)]
pub struct ReadBuf {
    buf: Option<Buffer>,
    /// Offsets into `buf` (at most 64 KiB), as u32: this sits in every idle connection's state.
    start: u32,
    end: u32,
}

impl ReadBuf {
    /// Bytes read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start as usize..self.end as usize],
            None => &[],
        }
    }

    /// Marks `n` buffered bytes as used; gives the buffer back when nothing is left in it.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start as usize + n).min(self.end as usize) as u32;
        if self.start == self.end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether any byte is held (a partial or pipelined message).
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// One non-blocking read into the buffer (taken from the pool for it, and given back if
    /// nothing came): `Ok(Some(n))` bytes arrived (0 at EOF), `Ok(None)` none were ready.
    pub fn try_fill(
        &mut self,
        stream: &Transport,
        activity: &Cell<u32>,
    ) -> io::Result<Option<usize>> {
        let buf = self.buf.get_or_insert_with(Buffer::take_http);
        if self.end as usize == buf.len() {
            if self.start == 0 {
                return Err(io::Error::other("read buffer full"));
            }
            buf.copy_within(self.start as usize..self.end as usize, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let result = stream.try_read(&mut buf[self.end as usize..]);
        let result = match result {
            Ok(n) => {
                self.end += n as u32;
                activity.set(activity.get().wrapping_add(1));
                Ok(Some(n))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
        if self.start == self.end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        }
        result
    }

    /// Reads more bytes from `stream` after those buffered, waiting for readiness before taking a
    /// buffer. Returns how many arrived (0 at EOF). `activity` ticks for idle tracking.
    pub async fn fill(&mut self, stream: &Transport, activity: &Cell<u32>) -> io::Result<usize> {
        if self.buf.is_none() {
            stream.readable().await?;
            self.buf = Some(Buffer::take_http());
        }
        loop {
            let Some(buf) = self.buf.as_mut() else {
                return Ok(0);
            };
            if self.end as usize == buf.len() {
                if self.start == 0 {
                    return Err(io::Error::other("read buffer full"));
                }
                buf.copy_within(self.start as usize..self.end as usize, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match stream.try_read(&mut buf[self.end as usize..]) {
                Ok(n) => {
                    self.end += n as u32;
                    activity.set(activity.get().wrapping_add(1));
                    if n == 0 && self.start == self.end {
                        self.buf = None;
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection and the unread bytes already taken from it.
pub struct BufferedStream {
    pub stream: Transport,
    pub rb: ReadBuf,
}

impl BufferedStream {
    pub fn new(stream: Transport) -> BufferedStream {
        BufferedStream {
            stream,
            rb: ReadBuf::default(),
        }
    }

    pub fn buffered(&self) -> &[u8] {
        self.rb.buffered()
    }

    pub fn consume(&mut self, n: usize) {
        self.rb.consume(n)
    }

    pub fn has_buffered(&self) -> bool {
        self.rb.has_buffered()
    }

    /// See [`ReadBuf::try_fill`].
    pub fn try_fill(&mut self, activity: &Cell<u32>) -> io::Result<Option<usize>> {
        self.rb.try_fill(&self.stream, activity)
    }

    /// See [`ReadBuf::fill`].
    pub async fn fill(&mut self, activity: &Cell<u32>) -> io::Result<usize> {
        self.rb.fill(&self.stream, activity).await
    }

    /// Takes the stream back, with any bytes still buffered (for an upgrade tunnel).
    pub fn into_parts(self) -> (Transport, Vec<u8>) {
        let rest = self.rb.buffered().to_vec();
        (self.stream, rest)
    }
}
