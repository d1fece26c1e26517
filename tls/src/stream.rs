//! TLS over Keel's readiness-driven sockets: our own monoio ⇄ rustls adapter.
//!
//! rustls is a state machine over byte buffers; the socket is Keel's [`Stream`], read and written
//! with non-blocking syscalls after a readiness wait, so cancelling a wait (a timeout, a select)
//! never loses a byte, and an idle TLS connection holds no read buffer of ours. The connection is
//! reachable through `&self` (in a `RefCell`, never borrowed across an await), as a plain
//! [`Stream`] is, so one task can write a request body while another part reads the response.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use keel_io::Stream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::spiffe::{spiffe_ids, SpiffeId};

/// The socket as rustls's `Read`/`Write`: one non-blocking syscall per call.
struct SocketIo<'a>(&'a Stream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake established, kept for policy, headers, logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The peer's SPIFFE id, when it presented a certificate with one.
    pub peer_id: Option<SpiffeId>,
    /// SHA-256 of the peer's leaf certificate, lower-case hex (`Hash=` in x-forwarded-client-cert).
    pub peer_cert_sha256: Option<Box<str>>,
    /// Whether the peer presented a certificate at all.
    pub peer_authenticated: bool,
    pub sni: Option<Box<str>>,
    pub alpn: Option<Box<[u8]>>,
    /// The handshake resumed an earlier session.
    pub resumed: bool,
}

/// A TLS connection over a [`Stream`].
pub struct TlsStream {
    io: Stream,
    conn: RefCell<Connection>,
    /// Decrypted bytes rustls holds that have not been read yet.
    plaintext: Cell<usize>,
    /// The peer closed its TCP side.
    eof: Cell<bool>,
    session: Session,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl TlsStream {
    /// Completes a server handshake on an accepted connection.
    pub async fn accept(io: Stream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = ServerConnection::new(config).map_err(tls_error)?;
        Self::handshake(io, Connection::Server(conn)).await
    }

    /// Completes a client handshake with `name` as SNI and the name verified.
    pub async fn connect(
        io: Stream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<TlsStream> {
        let conn = ClientConnection::new(config, name).map_err(tls_error)?;
        Self::handshake(io, Connection::Client(conn)).await
    }

    async fn handshake(io: Stream, conn: Connection) -> io::Result<TlsStream> {
        let mut tls = TlsStream {
            io,
            conn: RefCell::new(conn),
            plaintext: Cell::new(0),
            eof: Cell::new(false),
            session: Session::default(),
        };
        loop {
            tls.flush().await?;
            if !tls.conn.borrow().is_handshaking() {
                break;
            }
            match tls.read_records() {
                Ok(()) => {}
                Err(e) if would_block(&e) => tls.io.readable().await?,
                Err(e) => {
                    // An alert may be queued for the peer: one attempt to send it.
                    let _ = tls.try_flush();
                    return Err(e);
                }
            }
            if tls.eof.get() && tls.conn.borrow().is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
        }
        // TLS 1.3 session tickets (server) go out now rather than with the first response.
        tls.flush().await?;
        tls.session = session_of(&tls.conn.borrow());
        Ok(tls)
    }

    /// Reads whatever ciphertext is ready and processes it: `WouldBlock` when none was.
    fn read_records(&self) -> io::Result<()> {
        let mut conn = self.conn.borrow_mut();
        let n = loop {
            match conn.read_tls(&mut SocketIo(&self.io)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            self.eof.set(true);
        }
        let state = conn.process_new_packets().map_err(tls_error)?;
        self.plaintext.set(state.plaintext_bytes_to_read());
        if state.peer_has_closed() {
            self.eof.set(true);
        }
        Ok(())
    }

    /// Sends queued records without waiting: true when none are left.
    fn try_flush(&self) -> io::Result<bool> {
        let mut conn = self.conn.borrow_mut();
        while conn.wants_write() {
            match conn.write_tls(&mut SocketIo(&self.io)) {
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Sends every queued record, waiting for the socket as needed.
    async fn flush(&self) -> io::Result<()> {
        while !self.try_flush()? {
            self.io.writable().await?;
        }
        Ok(())
    }

    /// Resolves when a read would not block: decrypted bytes are waiting, the peer has closed, or
    /// the socket has something.
    pub async fn readable(&self) -> io::Result<()> {
        if self.plaintext.get() > 0 || self.eof.get() {
            return Ok(());
        }
        self.io.readable().await
    }

    /// One non-blocking read of decrypted bytes: `WouldBlock` when none are ready, `Ok(0)` at the
    /// end (close_notify, or the peer's TCP close without one, which a proxy passes on as EOF).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.plaintext.get() > 0 || self.eof.get() {
                let mut conn = self.conn.borrow_mut();
                match conn.reader().read(buf) {
                    Ok(n) => {
                        self.plaintext.set(self.plaintext.get().saturating_sub(n));
                        return Ok(n);
                    }
                    Err(e) if would_block(&e) => self.plaintext.set(0),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.eof.get() {
                    return Ok(0);
                }
            }
            if let Err(e) = self.read_records() {
                if !would_block(&e) {
                    let _ = self.try_flush();
                }
                return Err(e);
            }
            // Post-handshake messages (key updates, tickets) may have queued an answer.
            if self.conn.borrow().wants_write() {
                self.try_flush()?;
            }
        }
    }

    /// Encrypts and sends all of `parts` in order: records carry bytes from several parts (a
    /// chunk header, its data and the CRLF share one record).
    pub async fn write_all_vectored(&self, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0usize;
        while done < total {
            {
                let mut slices: [IoSlice<'_>; 4] = [IoSlice::new(&[]); 4];
                let mut n = 0;
                let mut skip = done;
                for part in parts {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if n == slices.len() {
                        break;
                    }
                    slices[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
                let mut conn = self.conn.borrow_mut();
                let took = conn.writer().write_vectored(&slices[..n])?;
                if took == 0 && !conn.wants_write() {
                    // Nothing accepted and nothing to send: the session cannot take data (closed).
                    return Err(io::ErrorKind::WriteZero.into());
                }
                done += took;
            }
            // rustls buffers up to its limit; sending it all keeps memory bounded.
            self.flush().await?;
        }
        Ok(())
    }

    /// Encrypts and sends all of `buf`.
    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&[buf]).await
    }

    /// Ends our direction: close_notify, then FIN.
    pub async fn shutdown_write(&self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        self.io.shutdown_write()
    }

    /// Whether an idle pooled connection can carry another request: records that arrived while it
    /// sat idle (TLS 1.3 tickets) are processed; any data, close or error means no.
    pub fn is_reusable(&self) -> bool {
        loop {
            match self.read_records() {
                Ok(()) => {
                    if self.eof.get() || self.plaintext.get() > 0 {
                        return false;
                    }
                }
                Err(e) => return would_block(&e),
            }
        }
    }

    /// The socket underneath.
    pub fn socket(&self) -> &Stream {
        &self.io
    }

    /// What the handshake established.
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Drop for TlsStream {
    /// A connection closed without `shutdown_write` still says goodbye properly: close_notify,
    /// sent if the socket takes it now (never waited for).
    fn drop(&mut self) {
        let conn = self.conn.get_mut();
        if !conn.is_handshaking() && !self.eof.get() {
            conn.send_close_notify();
            let _ = self.try_flush();
        }
    }
}

fn session_of(conn: &Connection) -> Session {
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let (peer_id, peer_cert_sha256) = match leaf {
        Some(cert) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            (spiffe_ids(cert).into_iter().next(), Some(hex.into()))
        }
        None => (None, None),
    };
    let sni = match conn {
        Connection::Server(s) => s.server_name().map(Into::into),
        Connection::Client(_) => None,
    };
    Session {
        peer_authenticated: leaf.is_some(),
        peer_id,
        peer_cert_sha256,
        sni,
        alpn: conn.alpn_protocol().map(Into::into),
        resumed: matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
    }
}
