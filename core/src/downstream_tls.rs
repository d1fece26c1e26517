//! Securing accepted connections as their listener says: mesh mTLS (PeerAuthentication STRICT or
//! PERMISSIVE) or TLS termination (Sidecar ingress `tls`).
//!
//! The first byte tells TLS from plaintext without consuming anything (a TLS record starts with
//! 0x16, handshake; no HTTP method or sane plaintext protocol does): PERMISSIVE lets plaintext
//! through on the same port, STRICT resets it. The wait for that byte and the handshake are each
//! bounded by the proxy's TLS handshake timeout, so a client that connects and stalls costs a
//! timer, not a worker.

use std::io;
use std::net::SocketAddr;

use keel_config::DownstreamTls;
use keel_io::Stream;
use keel_tls::{TlsStream, Transport};

use crate::worker::{ListenerRef, Worker};

/// The first byte of a TLS record carrying a handshake message (a ClientHello, here).
const TLS_HANDSHAKE: u8 = 0x16;

/// Why a connection was not secured.
enum Refused {
    Plaintext,
    Closed,
    Timeout,
    Handshake(io::Error),
}

async fn first_byte(stream: &Stream) -> io::Result<Option<u8>> {
    loop {
        match stream.try_peek_byte() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Tells TLS from plaintext by the first byte, then completes the handshake; each wait is bounded by
/// `timeout`. A PERMISSIVE listener whose client says nothing for `silence` treats the connection
/// as plaintext: a server-first protocol (a database greeting its client) works, after that wait.
async fn handshake(
    stream: Stream,
    config: std::sync::Arc<keel_tls::rustls::ServerConfig>,
    mode: &DownstreamTls,
    timeout: std::time::Duration,
    silence: std::time::Duration,
) -> Result<Transport, Refused> {
    let permissive = matches!(mode, DownstreamTls::Mesh { permissive: true });
    let first_wait = if permissive {
        silence.min(timeout)
    } else {
        timeout
    };
    let first = match keel_io::time::timeout(first_wait, first_byte(&stream)).await {
        Ok(Ok(Some(b))) => b,
        Ok(_) => return Err(Refused::Closed),
        Err(_) if permissive => return Ok(Transport::Plain(stream)),
        Err(_) => return Err(Refused::Timeout),
    };
    if first != TLS_HANDSHAKE {
        if permissive {
            return Ok(Transport::Plain(stream));
        }
        let _ = stream.reset_on_close();
        return Err(Refused::Plaintext);
    }
    match keel_io::time::timeout(timeout, TlsStream::accept(stream, config)).await {
        Ok(Ok(t)) => Ok(Transport::Tls(Box::new(t))),
        Ok(Err(e)) => Err(Refused::Handshake(e)),
        Err(_) => Err(Refused::Timeout),
    }
}

/// The connection, secured as listener `at` requires; `None` when it was refused (counted, and
/// logged at most once a second per worker).
pub async fn secure(
    worker: &Worker,
    at: &ListenerRef,
    stream: Stream,
    peer: SocketAddr,
) -> Option<Transport> {
    let listener = at.config();
    let Some(mode) = &listener.tls else {
        return Some(Transport::Plain(stream));
    };
    let lstats = at.counters(worker.id);
    let Some(config) = at.gen.tls.listeners.get(at.index).cloned().flatten() else {
        // Built with the snapshot for every TLS listener; its absence would be a bug, and failing
        // closed is the only safe answer.
        lstats.tls_handshake_error.inc();
        return None;
    };
    let proxy = &at.gen.snapshot.proxy;
    let timeout = proxy.tls_handshake_timeout;
    // On a captured port a silent client is a server-first protocol's, told after the detection
    // timeout (not the handshake timeout): capture must not stall what it did not stall before.
    let silence = match (listener.binding, &proxy.interception) {
        (keel_config::Binding::Bound, _) | (_, None) => timeout,
        (_, Some(ic)) => ic.detection_timeout,
    };
    let result = handshake(stream, config, mode, timeout, silence).await;
    match result {
        Ok(t) => {
            if t.session().is_some() {
                lstats.tls_handshake.inc();
            } else {
                lstats.tls_plaintext_accepted.inc();
            }
            Some(t)
        }
        // Connected and closed without a byte (a TCP health check): nothing went wrong.
        Err(Refused::Closed) => None,
        Err(Refused::Plaintext) => {
            lstats.tls_plaintext_refused.inc();
            worker.warn_downstream(
                &listener.name,
                peer,
                &format!(
                    "plaintext connection refused: listener requires TLS ({})",
                    mode.describe()
                ),
            );
            None
        }
        Err(Refused::Timeout) => {
            lstats.tls_handshake_timeout.inc();
            worker.warn_downstream(
                &listener.name,
                peer,
                &format!("TLS handshake not completed within {timeout:?}"),
            );
            None
        }
        Err(Refused::Handshake(e)) => {
            lstats.tls_handshake_error.inc();
            worker.warn_downstream(&listener.name, peer, &format!("TLS handshake failed: {e}"));
            None
        }
    }
}
