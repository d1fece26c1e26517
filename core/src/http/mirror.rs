//! Mirroring (`mirror`, `mirrors`): a copy of a request goes to another cluster with its Host
//! suffixed `-shadow`, as Envoy does, over that cluster's protocol (HTTP/1.1 or HTTP/2), and the
//! answer is read and dropped.
//!
//! Each copy is a task of its own on the worker, started once the request body is whole and kept
//! (a body over `maxRequestBufferBytes` is not mirrored), so a slow or dead mirror never delays or
//! fails the request it copies. Copies in flight per worker are bounded, and each one is bounded
//! in time.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use keel_config::UpstreamProtocol;

use super::body::BodySink;
use super::conn::BufferedStream;
use super::connect::{acquire, give_back, Acquired};
use super::h1::{chunked, encode, BodyKind};
use super::head::{RequestHead, Version};
use super::headers::Headers;
use crate::generation::Generation;
use crate::worker::Worker;

/// Mirrored requests in flight per worker; more are dropped (and counted).
const MAX_IN_FLIGHT: u32 = 1024;
/// How long a mirrored request may take when its route sets no timeout (Envoy's default route
/// timeout).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// `host[:port]` with `-shadow` after the host, as Envoy names a shadow request's authority.
pub fn shadow_host(authority: &str) -> String {
    let host = super::head::strip_port(authority);
    format!("{host}-shadow{}", &authority[host.len()..])
}

/// Starts a copy of the request (`head` as sent upstream, `body` its kept data and trailers) to
/// `cluster`, over the protocol that cluster speaks.
#[allow(clippy::too_many_arguments)]
pub fn send(
    worker: &Rc<Worker>,
    gen: &Rc<Generation>,
    cluster: usize,
    head: &RequestHead,
    (data, trailers): (&[u8], &Headers),
    te_trailers: bool,
    timeout: Option<Duration>,
) {
    let stats = &gen.clusters[cluster].slots[worker.id];
    if worker.mirrors_in_flight.get() >= MAX_IN_FLIGHT {
        stats.mirror_dropped.inc();
        return;
    }
    stats.mirror_sent.inc();
    let mut shadow = head.clone();
    shadow.authority = shadow_host(&head.authority);
    let h2 = match gen.snapshot.clusters[cluster].protocol {
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Client => head.version == Version::Http2,
    };
    let copy = if h2 {
        Copy::H2 {
            head: shadow,
            data: data.to_vec(),
            trailers: trailers.clone(),
            te_trailers,
        }
    } else {
        let mut bytes = Vec::with_capacity(512 + data.len());
        encode::request(&shadow, &mut bytes);
        if shadow.headers.has_token(b"transfer-encoding", b"chunked") {
            if !data.is_empty() {
                chunked::chunk_header(data.len(), &mut bytes);
                bytes.extend_from_slice(data);
                bytes.extend_from_slice(b"\r\n");
            }
            chunked::last_chunk(trailers, &mut bytes);
        } else {
            bytes.extend_from_slice(data);
        }
        Copy::H1(bytes)
    };
    worker
        .mirrors_in_flight
        .set(worker.mirrors_in_flight.get() + 1);
    monoio::spawn(run(
        worker.clone(),
        gen.clone(),
        cluster,
        copy,
        head.method == "HEAD",
        timeout.unwrap_or(DEFAULT_TIMEOUT),
    ));
}

/// A mirrored request, ready for its protocol.
enum Copy {
    /// The whole HTTP/1.1 message.
    H1(Vec<u8>),
    H2 {
        head: RequestHead,
        data: Vec<u8>,
        trailers: Headers,
        te_trailers: bool,
    },
}

async fn run(
    worker: Rc<Worker>,
    gen: Rc<Generation>,
    cluster: usize,
    request: Copy,
    head_method: bool,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    let done = keel_io::time::timeout(
        limit,
        exchange(&worker, &gen, cluster, &request, head_method, deadline),
    )
    .await;
    if !matches!(done, Ok(true)) {
        tracing::debug!(cluster = %gen.snapshot.clusters[cluster].name, "mirrored request failed");
    }
    worker
        .mirrors_in_flight
        .set(worker.mirrors_in_flight.get() - 1);
}

/// Sends the copy and reads the answer to its end; true when that went cleanly.
async fn exchange(
    worker: &Rc<Worker>,
    gen: &Rc<Generation>,
    cluster: usize,
    request: &Copy,
    head_method: bool,
    deadline: Instant,
) -> bool {
    let picked = gen.pick_endpoint(cluster, &mut worker.rng(), None);
    let Some(addr) = picked
        .as_ref()
        .and_then(|p| gen.snapshot.clusters[cluster].endpoints.get(p.endpoint))
        .map(|e| e.address)
    else {
        return false;
    };
    let h2 = matches!(request, Copy::H2 { .. });
    let Ok((conn, _)) = acquire(worker, gen, cluster, addr, false, h2, deadline).await else {
        return false;
    };
    match (conn, request) {
        (Acquired::H1(conn), Copy::H1(bytes)) => {
            exchange_h1(worker, gen, cluster, addr, conn, bytes, head_method).await
        }
        (
            Acquired::H2(mut stream),
            Copy::H2 {
                head,
                data,
                trailers,
                te_trailers,
            },
        ) => {
            let end = data.is_empty() && trailers.is_empty();
            if stream.open(head, end, *te_trailers).is_err() {
                return false;
            }
            if !end {
                let Some(mut upload) = stream.upload() else {
                    return false;
                };
                if upload.data(data).await.is_err() || upload.finish(trailers).await.is_err() {
                    return false;
                }
            }
            if stream.response_head().await.is_err() {
                return false;
            }
            loop {
                match stream.next_chunk().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return true,
                    Err(_) => return false,
                }
            }
        }
        _ => false,
    }
}

/// The HTTP/1.1 copy: written whole, answer read and dropped, connection pooled when clean.
async fn exchange_h1(
    worker: &Rc<Worker>,
    gen: &Rc<Generation>,
    cluster: usize,
    addr: std::net::SocketAddr,
    conn: super::pool::PooledConn,
    request: &[u8],
    head_method: bool,
) -> bool {
    let super::pool::PooledConn {
        stream,
        slot,
        requests,
    } = conn;
    let mut up = BufferedStream::new(stream);
    if up.stream.write_all(request).await.is_err() {
        return false;
    }
    let activity = Cell::new(0);
    let method = if head_method { "HEAD" } else { "GET" };
    let Ok((resp, body)) =
        super::proxy::read_response(&up.stream, &mut up.rb, method, &activity).await
    else {
        return false;
    };
    if !discard(&mut up, body, &activity).await {
        return false;
    }
    let reusable = !resp.headers.has_token(b"connection", b"close")
        && resp.version != super::head::Version::Http10
        && body != BodyKind::CloseDelimited
        && !up.has_buffered();
    if reusable {
        let (stream, _) = up.into_parts();
        let key = (addr, crate::upstream::pool_key(gen, cluster));
        give_back(
            worker,
            gen,
            cluster,
            key,
            super::pool::PooledConn {
                stream,
                slot,
                requests,
            },
        );
    }
    true
}

/// Reads a response body to its end and drops it; false when it broke off.
async fn discard(up: &mut BufferedStream, body: BodyKind, activity: &Cell<u32>) -> bool {
    match body {
        BodyKind::None => true,
        BodyKind::Length(mut n) => {
            while n > 0 {
                if !up.has_buffered() && !matches!(up.fill(activity).await, Ok(1..)) {
                    return false;
                }
                let take = (up.buffered().len() as u64).min(n) as usize;
                up.consume(take);
                n -= take as u64;
            }
            true
        }
        BodyKind::Chunked => {
            let mut decoder = chunked::Decoder::default();
            while !decoder.is_done() {
                if !up.has_buffered() && !matches!(up.fill(activity).await, Ok(1..)) {
                    return false;
                }
                match decoder.decode(up.buffered()) {
                    Ok(chunked::Step::Framing { consumed }) => up.consume(consumed),
                    Ok(chunked::Step::Data { range }) => up.consume(range.end),
                    Err(_) => return false,
                }
            }
            true
        }
        BodyKind::CloseDelimited => {
            while matches!(up.fill(activity).await, Ok(1..)) {
                let n = up.buffered().len();
                up.consume(n);
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_names() {
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
    }
}
