//! `floor-proxy --h2c PATH LISTEN BACKEND`: the floor of the `h2c-small` workload (HTTP/2 with
//! prior knowledge downstream, HTTP/1.1 upstream), the least work any proxy can do there.
//!
//! What every such proxy must do, and all this does: read the client's frames (batched: h2load
//! sends many streams' HEADERS in one segment); for each request, one HTTP/1.1 exchange on a
//! kept-alive backend connection (one `send`, one `recv`); each response as a HEADERS and a DATA
//! frame, gathered per client connection and sent once per event-loop pass, so responses that
//! arrive together leave together. Edge-triggered epoll, a short read counted as drained.
//!
//! What it leaves out, so it is a lower bound and not a proxy: it does not decode HPACK (every
//! request is sent upstream as `GET PATH` — the workload asks for one path), it encodes every
//! response head as `:status: 200` alone, it keeps no stream state beyond the exchange in flight,
//! and it ignores flow control (h2load opens its windows to 2^30 − 1, and each response is 1 KiB).

use std::io;
use std::net::SocketAddrV4;

use super::{connect_to, find, response_size, would_block, Fds};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The default SETTINGS_MAX_FRAME_SIZE, which the floor never raises.
const MAX_FRAME: usize = 16_384;

/// A client connection speaking HTTP/2.
#[derive(Default)]
struct Client {
    input: Vec<u8>,
    output: Vec<u8>,
    preface_seen: bool,
    /// In the list of clients to flush at the end of this pass.
    dirty: bool,
}

/// A backend connection: idle in the pool, or carrying one stream's exchange.
struct Backend {
    /// The client the response goes to, and its stream (None: idle).
    owner: Option<(i32, u32)>,
    input: Vec<u8>,
    /// Request bytes the socket has not taken yet (a connect in progress).
    unsent: Vec<u8>,
}

enum Conn {
    Client(Client),
    Backend(Backend),
}

struct H2cFloor {
    backend: SocketAddrV4,
    request: Vec<u8>,
    conns: Fds<Conn>,
    dirty: Vec<i32>,
    buf: Vec<u8>,
}

/// Appends a frame head to `out`.
fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// The response's frames: HEADERS with `:status: 200` (static table entry 8), then the body in
/// DATA frames, the last one ending the stream.
fn response_frames(out: &mut Vec<u8>, stream: u32, body: &[u8]) {
    let headers_flags = if body.is_empty() {
        END_HEADERS | END_STREAM
    } else {
        END_HEADERS
    };
    frame_head(out, 1, HEADERS, headers_flags, stream);
    out.push(0x88);
    let mut chunks = body.chunks(MAX_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_STREAM
        } else {
            0
        };
        frame_head(out, chunk.len(), DATA, flags, stream);
        out.extend_from_slice(chunk);
    }
}

/// What a client's buffered input asks for: streams whose request head is complete, and frames
/// to answer with (SETTINGS and PING acknowledgements). Consumes whole frames only; Err when the
/// bytes are not HTTP/2 or a request head is split into CONTINUATION frames (not handled).
fn parse_client(client: &mut Client, requests: &mut Vec<u32>) -> Result<(), ()> {
    let mut at = 0;
    if !client.preface_seen {
        if client.input.len() < PREFACE.len() {
            return if PREFACE.starts_with(&client.input) {
                Ok(())
            } else {
                Err(())
            };
        }
        if !client.input.starts_with(PREFACE) {
            return Err(());
        }
        client.preface_seen = true;
        at = PREFACE.len();
        // The server's preface: SETTINGS with nothing changed.
        frame_head(&mut client.output, 0, SETTINGS, 0, 0);
    }
    while client.input.len() - at >= FRAME_HEAD {
        let head = &client.input[at..at + FRAME_HEAD];
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        if client.input.len() - at - FRAME_HEAD < len {
            break;
        }
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let payload = at + FRAME_HEAD..at + FRAME_HEAD + len;
        match kind {
            HEADERS if flags & END_HEADERS == 0 => return Err(()),
            HEADERS => requests.push(stream),
            SETTINGS if flags & ACK == 0 => frame_head(&mut client.output, 0, SETTINGS, ACK, 0),
            PING if flags & ACK == 0 && len == 8 => {
                let opaque: [u8; 8] = client.input[payload].try_into().map_err(|_| ())?;
                frame_head(&mut client.output, 8, PING, ACK, 0);
                client.output.extend_from_slice(&opaque);
            }
            // WINDOW_UPDATE, PRIORITY, DATA (no bodies here), RST_STREAM, GOAWAY: nothing to do.
            _ => {}
        }
        at += FRAME_HEAD + len;
    }
    client.input.drain(..at);
    Ok(())
}

impl H2cFloor {
    fn accept(&mut self, listener: i32) {
        loop {
            // SAFETY: accept4 on the listener without asking for the peer address.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            if self.conns.add(fd, Conn::Client(Client::default())).is_err() {
                // SAFETY: not registered, so closed here once.
                unsafe { libc::close(fd) };
                continue;
            }
            // Accepted with its first bytes (TCP_DEFER_ACCEPT): read them now.
            self.client_readable(fd);
        }
    }

    /// Reads what `fd` has into `input`: false at EOF or on an error.
    fn read_into(&mut self, fd: i32) -> bool {
        loop {
            // SAFETY: recv into a buffer we own, of its length.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n == 0 {
                return false;
            }
            if n < 0 {
                return would_block();
            }
            let n = n as usize;
            let input = match self.conns.entries.get_mut(fd as usize) {
                Some(Some(Conn::Client(c))) => &mut c.input,
                Some(Some(Conn::Backend(b))) => &mut b.input,
                _ => return false,
            };
            input.extend_from_slice(&self.buf[..n]);
            if n < self.buf.len() {
                return true;
            }
        }
    }

    /// Sends as much of `bytes` as `fd` takes; returns how much, or None on an error.
    fn send_some(fd: i32, bytes: &[u8]) -> Option<usize> {
        if bytes.is_empty() {
            return Some(0);
        }
        // SAFETY: send from an initialised buffer of the given length.
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return would_block().then_some(0);
        }
        Some(n as usize)
    }

    fn mark_dirty(&mut self, fd: i32) {
        if let Some(Some(Conn::Client(c))) = self.conns.entries.get_mut(fd as usize) {
            if !c.dirty && !c.output.is_empty() {
                c.dirty = true;
                self.dirty.push(fd);
            }
        }
    }

    /// Sends what a client connection has gathered; closes it on an error.
    fn flush_client(&mut self, fd: i32) {
        let Some(Some(Conn::Client(c))) = self.conns.entries.get_mut(fd as usize) else {
            return;
        };
        c.dirty = false;
        match Self::send_some(fd, &c.output) {
            Some(n) => {
                c.output.drain(..n);
            }
            None => self.conns.close(fd),
        }
    }

    fn client_readable(&mut self, fd: i32) {
        let open = self.read_into(fd);
        let mut requests = Vec::new();
        let parsed = match self.conns.entries.get_mut(fd as usize) {
            Some(Some(Conn::Client(c))) => parse_client(c, &mut requests),
            _ => return,
        };
        for stream in requests {
            self.start_exchange(fd, stream);
        }
        self.mark_dirty(fd);
        if !open || parsed.is_err() {
            self.conns.close(fd);
        }
    }

    /// Sends the request for `stream` of client `fd` on an idle backend connection, or a new one.
    fn start_exchange(&mut self, client: i32, stream: u32) {
        let backend = match self.conns.idle_backends.pop() {
            Some(fd) => fd,
            None => match connect_to(self.backend) {
                Ok(fd) => {
                    let conn = Conn::Backend(Backend {
                        owner: None,
                        input: Vec::new(),
                        unsent: Vec::new(),
                    });
                    if self.conns.add(fd, conn).is_err() {
                        // SAFETY: not registered, so closed here once.
                        unsafe { libc::close(fd) };
                        return self.refuse(client, stream);
                    }
                    fd
                }
                Err(_) => return self.refuse(client, stream),
            },
        };
        let Some(sent) = Self::send_some(backend, &self.request) else {
            self.conns.close(backend);
            return self.refuse(client, stream);
        };
        if let Some(Some(Conn::Backend(b))) = self.conns.entries.get_mut(backend as usize) {
            b.owner = Some((client, stream));
            b.unsent.extend_from_slice(&self.request[sent..]);
        }
    }

    /// Ends a stream that could not be proxied (RST_STREAM, REFUSED_STREAM).
    fn refuse(&mut self, client: i32, stream: u32) {
        if let Some(Some(Conn::Client(c))) = self.conns.entries.get_mut(client as usize) {
            frame_head(&mut c.output, 4, RST_STREAM, 0, stream);
            c.output.extend_from_slice(&7u32.to_be_bytes());
        }
        self.mark_dirty(client);
    }

    fn backend_writable(&mut self, fd: i32) {
        let Some(Some(Conn::Backend(b))) = self.conns.entries.get_mut(fd as usize) else {
            return;
        };
        match Self::send_some(fd, &b.unsent) {
            Some(n) => {
                b.unsent.drain(..n);
            }
            None => self.backend_failed(fd),
        }
    }

    fn backend_readable(&mut self, fd: i32) {
        if !self.read_into(fd) {
            return self.backend_failed(fd);
        }
        let Some(Some(Conn::Backend(b))) = self.conns.entries.get_mut(fd as usize) else {
            return;
        };
        let Some(total) = response_size(&b.input) else {
            return;
        };
        if b.input.len() < total {
            return;
        }
        let Some((client, stream)) = b.owner.take() else {
            // Bytes nobody asked for.
            return self.conns.close(fd);
        };
        let head_end = find(&b.input, b"\r\n\r\n").map_or(total, |at| at + 4);
        let input = std::mem::take(&mut b.input);
        if let Some(Some(Conn::Client(c))) = self.conns.entries.get_mut(client as usize) {
            response_frames(&mut c.output, stream, &input[head_end..total]);
        }
        if let Some(Some(Conn::Backend(b))) = self.conns.entries.get_mut(fd as usize) {
            b.input = input;
            b.input.clear();
        }
        self.conns.idle_backends.push(fd);
        self.mark_dirty(client);
    }

    fn backend_failed(&mut self, fd: i32) {
        let owner = match self.conns.entries.get(fd as usize) {
            Some(Some(Conn::Backend(b))) => b.owner,
            _ => None,
        };
        self.conns.close(fd);
        if let Some((client, stream)) = owner {
            self.refuse(client, stream);
        }
    }

    fn handle(&mut self, fd: i32, events: u32) {
        let is_client = match self.conns.entries.get(fd as usize) {
            Some(Some(Conn::Client(_))) => true,
            Some(Some(Conn::Backend(_))) => false,
            _ => return,
        };
        let writable = events & libc::EPOLLOUT as u32 != 0;
        let readable = events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
        if is_client {
            if writable {
                self.flush_client(fd);
            }
            if readable {
                self.client_readable(fd);
            }
        } else {
            if writable {
                self.backend_writable(fd);
            }
            if readable {
                self.backend_readable(fd);
            }
        }
    }
}

impl super::EventLoop for H2cFloor {
    fn accept(&mut self, listener: i32) {
        H2cFloor::accept(self, listener);
    }
    fn handle(&mut self, fd: i32, events: u32) {
        H2cFloor::handle(self, fd, events);
    }
    /// Everything this pass gathered for a client leaves in one send.
    fn end_of_pass(&mut self) {
        for fd in std::mem::take(&mut self.dirty) {
            self.flush_client(fd);
        }
    }
}

/// Runs the h2c floor until killed.
pub(crate) fn run(listen: SocketAddrV4, backend: SocketAddrV4, path: &str) -> io::Result<()> {
    super::serve(listen, |epoll| H2cFloor {
        backend,
        request: format!("GET {path} HTTP/1.1\r\nHost: {backend}\r\n\r\n").into_bytes(),
        conns: Fds::new(epoll),
        dirty: Vec::new(),
        buf: vec![0u8; 64 * 1024],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= FRAME_HEAD {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    #[test]
    fn a_response_is_a_status_head_then_data_ending_the_stream() {
        let mut out = Vec::new();
        let body = vec![7u8; MAX_FRAME + 10];
        response_frames(&mut out, 5, &body);
        assert_eq!(
            frames(&out),
            vec![
                (HEADERS, END_HEADERS, 5, vec![0x88]),
                (DATA, 0, 5, body[..MAX_FRAME].to_vec()),
                (DATA, END_STREAM, 5, body[MAX_FRAME..].to_vec()),
            ]
        );
        let mut out = Vec::new();
        response_frames(&mut out, 1, b"");
        assert_eq!(
            frames(&out),
            vec![(HEADERS, END_HEADERS | END_STREAM, 1, vec![0x88])]
        );
    }

    #[test]
    fn the_client_preface_settings_ping_and_headers_are_answered_and_counted() {
        let mut input = PREFACE.to_vec();
        frame_head(&mut input, 0, SETTINGS, 0, 0);
        frame_head(&mut input, 8, PING, 0, 0);
        input.extend_from_slice(b"12345678");
        for stream in [1, 3] {
            frame_head(&mut input, 3, HEADERS, END_HEADERS | END_STREAM, stream);
            input.extend_from_slice(&[0x82, 0x86, 0x84]);
        }
        // Half of the next frame: left for the next read.
        frame_head(&mut input, 3, HEADERS, END_HEADERS | END_STREAM, 5);
        let mut client = Client {
            input,
            ..Client::default()
        };
        let mut requests = Vec::new();
        assert!(parse_client(&mut client, &mut requests).is_ok());
        assert_eq!(requests, vec![1, 3]);
        assert_eq!(client.input.len(), FRAME_HEAD);
        assert_eq!(
            frames(&client.output),
            vec![
                (SETTINGS, 0, 0, vec![]),
                (SETTINGS, ACK, 0, vec![]),
                (PING, ACK, 0, b"12345678".to_vec()),
            ]
        );
    }

    #[test]
    fn anything_but_http2_or_a_split_head_is_refused() {
        let mut client = Client {
            input: b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            ..Client::default()
        };
        assert!(parse_client(&mut client, &mut Vec::new()).is_err());
        let mut client = Client {
            input: PREFACE[..10].to_vec(),
            ..Client::default()
        };
        assert!(parse_client(&mut client, &mut Vec::new()).is_ok());
        let mut input = PREFACE.to_vec();
        frame_head(&mut input, 1, HEADERS, END_STREAM, 1);
        input.push(0x82);
        let mut client = Client {
            input,
            ..Client::default()
        };
        assert!(parse_client(&mut client, &mut Vec::new()).is_err());
    }
}
