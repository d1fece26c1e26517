//! Opening upstream connections: a TCP connect with the cluster's timeout and keepalive, then the
//! TLS handshake when the cluster originates TLS (DestinationRule `tls`), bounded by the same
//! connect timeout.

use std::io;
use std::net::SocketAddr;

use keel_io::{connect, ConnectError, KeepaliveOpts};
use keel_tls::{TlsStream, Transport};

use crate::generation::Generation;

/// The pool key of connections to `cluster`'s endpoints: a fingerprint of the cluster's name and,
/// with TLS, of its TLS settings and identity, so a pooled connection never serves another cluster
/// (whose circuit breakers it would count against) or another TLS context.
pub fn pool_key(gen: &Generation, cluster: usize) -> u64 {
    let tls = gen
        .tls
        .clusters
        .get(cluster)
        .and_then(Option::as_ref)
        .map_or(0, |c| c.pool_key);
    tls ^ gen.clusters.get(cluster).map_or(0, |c| c.pool_key)
}

/// What an upstream connection will carry, which decides the ALPN offered over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    Tcp,
    Http1,
    /// Offers ALPN `h2`.
    Http2,
}

/// A new connection to endpoint `addr` of `cluster`, secured as the cluster says.
pub async fn open(
    gen: &Generation,
    cluster: usize,
    addr: SocketAddr,
    carries: Carries,
) -> Result<Transport, ConnectError> {
    let c = &gen.snapshot.clusters[cluster];
    let keepalive = c.keepalive.map(|k| KeepaliveOpts {
        time: k.time,
        interval: k.interval,
        retries: k.probes,
    });
    let stream = connect(addr, c.connect_timeout, keepalive, c.bind_source).await?;
    let Some(ctx) = gen.tls.clusters.get(cluster).and_then(Option::as_ref) else {
        return Ok(Transport::Plain(stream));
    };
    let config = match carries {
        Carries::Tcp => &ctx.config,
        Carries::Http1 => &ctx.config_http1,
        Carries::Http2 => &ctx.config_h2,
    };
    let handshake = TlsStream::connect(stream, config.clone(), ctx.server_name.clone());
    match keel_io::time::timeout(c.connect_timeout, handshake).await {
        Ok(Ok(tls)) => Ok(Transport::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(ConnectError::Other(io::Error::new(
            e.kind(),
            format!("TLS handshake failed: {e}"),
        ))),
        Err(_) => Err(ConnectError::Other(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        ))),
    }
}
