//! HTTP/2 to upstreams, against the `h2` crate as the reference peer: the crate serves as the
//! backend (and acts as a client for the differential check), Keel's own client speaks to it.
//! Translation both ways (HTTP/1.1 and HTTP/2 clients), trailers, `te: trailers`, multiplexing
//! within the peer's and the cluster's stream limits, GOAWAY and REFUSED_STREAM without a failed
//! request.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// What the backend saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    method: String,
    path: String,
    authority: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    connection: usize,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Record {
    requests: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    /// Connections that have ended.
    closed: AtomicUsize,
    /// The most streams open at once on any one connection.
    max_streams_seen: AtomicUsize,
    refused: AtomicUsize,
}

/// How the backend behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    max_streams: Option<u32>,
    /// Sends a graceful GOAWAY (two steps) after this many streams on a connection.
    goaway_after: Option<usize>,
}

/// An `h2` crate server on loopback: echoes the request body, answers with trailers, records
/// what it saw. Paths: `/slow` waits 300 ms before answering; `/refuse-once` refuses its first
/// stream (REFUSED_STREAM).
fn h2_backend(behaviour: Behaviour) -> (SocketAddr, Arc<Record>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Record::default());
    let rec = record.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let n = rec.connections.fetch_add(1, SeqCst) + 1;
                tokio::spawn(serve_connection(sock, rec.clone(), behaviour, n));
            }
        });
    });
    (addr, record)
}

async fn serve_connection(
    sock: tokio::net::TcpStream,
    rec: Arc<Record>,
    behaviour: Behaviour,
    connection: usize,
) {
    let mut builder = h2::server::Builder::new();
    if let Some(m) = behaviour.max_streams {
        builder.max_concurrent_streams(m);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(sock).await else {
        return;
    };
    let open = Arc::new(AtomicUsize::new(0));
    let mut served = 0;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = match accepted {
            Ok(a) => a,
            Err(_) => break,
        };
        served += 1;
        if behaviour.goaway_after == Some(served) {
            conn.graceful_shutdown();
        }
        let now = open.fetch_add(1, SeqCst) + 1;
        rec.max_streams_seen.fetch_max(now, SeqCst);
        let (rec, open) = (rec.clone(), open.clone());
        tokio::spawn(async move {
            handle(req, respond, &rec, connection).await;
            open.fetch_sub(1, SeqCst);
        });
    }
    // After a GOAWAY, the streams already taken still need the connection driven to finish.
    let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
    rec.closed.fetch_add(1, SeqCst);
}

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    rec: &Record,
    connection: usize,
) {
    let (parts, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    let pairs = |h: &http::HeaderMap| -> Vec<(String, String)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect()
    };
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        headers: pairs(&parts.headers),
        body: data.clone(),
        trailers: pairs(&trailers),
        connection,
    };
    rec.requests.lock().unwrap().push(seen.clone());
    if seen.path == "/refuse-once" && rec.refused.fetch_add(1, SeqCst) == 0 {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    if seen.path == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let resp = http::Response::builder()
        .status(201)
        .header("x-backend", "h2")
        .header("content-type", "application/octet-stream")
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(resp, false) else {
        return;
    };
    let mut reply = format!("{} {} ", seen.method, seen.path).into_bytes();
    reply.extend_from_slice(&data);
    let _ = send.send_data(Bytes::from(reply), false);
    let mut t = http::HeaderMap::new();
    t.insert("x-trailer", http::HeaderValue::from_static("done"));
    let _ = send.send_trailers(t);
}

/// Keel in front of `backend` with an HTTP egress port for `reviews`, the ServiceEntry port's
/// protocol `HTTP2`; `extra` adds resources.
fn keel_for(backend: SocketAddr, extra: &str, workers: usize) -> (Keel, u16) {
    let (admin, port) = (free_port(), free_port());
    let config = keel_config_for_workers(backend, port, admin, extra, workers);
    (Keel::start(&config, admin, &[]), port)
}

/// The config [`keel_for`] starts Keel with, one worker.
fn keel_config_for(backend: SocketAddr, port: u16, admin: u16, extra: &str) -> String {
    keel_config_for_workers(backend, port, admin, extra, 1)
}

fn keel_config_for_workers(
    backend: SocketAddr,
    port: u16,
    admin: u16,
    extra: &str,
    workers: usize,
) -> String {
    let endpoint = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http2: {} }} }}\n",
        backend.port()
    );
    format!(
        "{}{}{extra}",
        proxy_yaml(admin, workers),
        egress_service(port, "HTTP2", "reviews", "{ name: reviews }", &endpoint)
    )
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn http1_and_http2_clients_reach_an_http2_upstream_translated() {
    let (backend, rec) = h2_backend(Behaviour::default());
    let (_keel, port) = keel_for(backend, "", 1);
    let url = format!("http://reviews:{port}/items?x=1");
    let resolve = format!("reviews:{port}:127.0.0.1");

    // HTTP/1.1 client with a body: Host becomes :authority, hop-by-hop fields stay behind.
    let (code, out) = curl(&[
        "--resolve",
        &resolve,
        "-i",
        "-H",
        "Connection: keep-alive, x-hop",
        "-H",
        "x-hop: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "--data-binary",
        "hello",
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("x-backend: h2"), "{out}");
    // The body's length is unknown to an HTTP/1.1 client: chunked, trailers at its end (curl
    // prints them after the body).
    assert!(lower.contains("transfer-encoding: chunked"), "{out}");
    assert!(
        out.contains("\r\n\r\nPOST /items?x=1 hellox-trailer: done"),
        "{out}"
    );
    let seen = rec.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/items?x=1");
    assert_eq!(seen.authority, format!("reviews:{port}"));
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("content-length"), Some("5"));
    assert!(seen.header("x-forwarded-proto").is_some());
    for gone in [
        "connection",
        "keep-alive",
        "x-hop",
        "host",
        "transfer-encoding",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} forwarded: {seen:?}");
    }

    // A chunked HTTP/1.1 request with trailers: DATA then a trailing HEADERS frame; the
    // response's trailers come back as chunked trailers.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /chunked HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-client-trailer: yes\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.ends_with(b"\r\n\r\n") || !String::from_utf8_lossy(&raw).contains("x-trailer") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 201"), "{text}");
    assert!(text.contains("\r\n0\r\nx-trailer: done\r\n\r\n"), "{text}");
    let seen = rec.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.body, b"abcde");
    assert_eq!(
        seen.trailers,
        vec![("x-client-trailer".to_string(), "yes".to_string())]
    );
    assert_eq!(seen.header("te"), Some("trailers"), "{seen:?}");

    // HTTP/2 client (prior knowledge): trailers pass through as a trailing HEADERS frame.
    let out = std::process::Command::new("nghttp")
        .args(["-v", "-H", ":authority: reviews", "-H", "te: trailers"])
        .arg(format!("http://127.0.0.1:{port}/h2"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(":status: 201"), "{text}");
    assert!(text.contains("x-trailer: done"), "{text}");
    assert!(text.contains("GET /h2 "), "{text}");
    let seen = rec.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.header("te"), Some("trailers"));
    // Every request shared the one upstream connection (one worker).
    assert_eq!(rec.connections.load(SeqCst), 1);
}

/// One request with the `h2` crate as the client; returns status, x-backend, body and trailers.
fn h2_client_request(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> (u16, Option<String>, Vec<u8>, HashMap<String, String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::copy_from_slice(body);
    rt.block_on(async move {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = h2::client::handshake(sock).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method("PUT")
            .uri(format!("http://reviews{path}"))
            .header("x-test", "differential")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(body, false).unwrap();
        let mut t = http::HeaderMap::new();
        t.insert("x-sent-trailer", http::HeaderValue::from_static("1"));
        send.send_trailers(t).unwrap();
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let backend = resp
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string());
        let mut recv = resp.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = recv
            .trailers()
            .await
            .unwrap()
            .unwrap_or_default()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        (status, backend, data, trailers)
    })
}

#[test]
fn the_same_exchange_directly_and_through_keel_gives_the_same_result() {
    let (backend, rec) = h2_backend(Behaviour::default());
    let (_keel, port) = keel_for(backend, "", 1);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let direct = h2_client_request(backend, "/diff", &body);
    let through = h2_client_request(SocketAddr::from(([127, 0, 0, 1], port)), "/diff", &body);
    assert_eq!(direct.0, through.0);
    assert_eq!(direct.1, through.1);
    assert!(direct.2 == through.2, "bodies differ");
    assert_eq!(direct.3, through.3);
    let seen = rec.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(seen[0].trailers, seen[1].trailers);
    assert_eq!(seen[1].header("x-test"), Some("differential"));
}

/// `n` concurrent GETs of `path` with h2load over one HTTP/2 connection to Keel; returns how
/// many succeeded (2xx).
fn h2load(port: u16, path: &str, n: usize) -> usize {
    let out = std::process::Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", "1", "-m", &n.to_string()])
        .args(["-H", ":authority: reviews"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("{text}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn streams_stay_within_the_peers_and_the_clusters_limits() {
    // The peer takes 3 streams per connection: 12 slow requests at once need 4 connections.
    let (backend, rec) = h2_backend(Behaviour {
        max_streams: Some(3),
        ..Default::default()
    });
    let (_keel, port) = keel_for(backend, "", 1);
    assert_eq!(h2load(port, "/slow", 12), 12);
    assert_eq!(rec.max_streams_seen.load(SeqCst), 3);
    assert!(
        rec.connections.load(SeqCst) >= 4,
        "{}",
        rec.connections.load(SeqCst)
    );

    // The DestinationRule's maxConcurrentStreams: 1 gives each request a connection of its own.
    let (backend, rec) = h2_backend(Behaviour::default());
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http: { maxConcurrentStreams: 1 }
";
    let (_keel, port) = keel_for(backend, rule, 1);
    assert_eq!(h2load(port, "/slow", 5), 5);
    assert_eq!(rec.max_streams_seen.load(SeqCst), 1);
    assert_eq!(rec.connections.load(SeqCst), 5);
}

#[test]
fn goaway_and_refused_streams_lose_no_request() {
    // The backend sends GOAWAY after every 4th stream of a connection: later requests move to a
    // new connection, those it did not take are sent again.
    let (backend, rec) = h2_backend(Behaviour {
        goaway_after: Some(4),
        ..Default::default()
    });
    let (_keel, port) = keel_for(backend, "", 1);
    for round in 0..3 {
        assert_eq!(h2load(port, "/", 10), 10, "round {round}");
    }
    // The crate's GOAWAY is graceful in two steps (RFC 9113 §6.8), so a round's burst is served
    // on the connection it started on; the next round cannot use that one any more.
    let used: std::collections::HashSet<usize> = rec
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.connection)
        .collect();
    assert!(used.len() >= 3, "{used:?}");

    // As a busy nginx at `keepalive_requests` (1000 there): after 100 streams, a GOAWAY naming the
    // last one served; with ~30 in flight, every connection's tail is refused and must be sent
    // again, and a resend may itself land on a connection about to end.
    let (upstream, connections) = raw_upstream(|s, first| {
        use keel_core::http::h2::frame;
        let respond = |s: &mut TcpStream, id: u32| {
            let mut out = Vec::new();
            // :status 200 (static index 8), then a 2-byte body.
            frame::write_headers(&mut out, id, &[0x88], false, 16_384);
            frame::write_head(&mut out, 2, frame::DATA, frame::END_STREAM, id);
            out.extend_from_slice(b"ok");
            s.write_all(&out)
        };
        let mut ack = Vec::new();
        frame::write_settings_ack(&mut ack);
        if s.write_all(&ack).is_err() || respond(s, first).is_err() {
            return;
        }
        let mut served = 1;
        while served < 100 {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).is_err() {
                return;
            }
            if head[3] == frame::HEADERS {
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                // A busy server: requests queue up behind each answer, so that streams are in
                // flight above the last one served when the GOAWAY goes.
                std::thread::sleep(Duration::from_micros(200));
                if respond(s, id).is_err() {
                    return;
                }
                served += 1;
                if served == 100 {
                    let mut goaway = Vec::new();
                    frame::write_goaway(&mut goaway, id, frame::ErrorCode::NoError, b"");
                    let _ = s.write_all(&goaway);
                }
            }
        }
        // A lingering close, as nginx's: unread bytes at close would reset the connection
        // and take the GOAWAY with them.
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(1..)) {}
    });
    let (nginx_like, like_port) = keel_for(upstream, "", 1);
    let out = std::process::Command::new("h2load")
        .args([
            "-n",
            "5000",
            "-c",
            "2",
            "-m",
            "16",
            "-H",
            ":authority: reviews",
        ])
        .arg(format!("http://127.0.0.1:{like_port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("5000 succeeded, 0 failed"),
        "{text}\n{}",
        nginx_like.stats()["listeners"][0]
    );
    // The resends are counted, per cluster.
    let resent = nginx_like.stats()["clusters"][0]["upstream_rq_refused_resent"]
        .as_u64()
        .unwrap_or(0);
    assert!(resent > 0, "{}", nginx_like.stats()["clusters"]);
    assert!(
        connections.load(SeqCst) >= 50,
        "{}",
        connections.load(SeqCst)
    );
    drop(nginx_like);

    // REFUSED_STREAM: not processed, so sent again (Istio's default retryOn has refused-stream).
    let (code, out) = curl(&[
        "--resolve",
        &format!("reviews:{port}:127.0.0.1"),
        &format!("http://reviews:{port}/refuse-once"),
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "GET /refuse-once ");
    let attempts = rec
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/refuse-once")
        .count();
    assert_eq!(attempts, 2);
}

/// A fake HTTP/2 upstream on loopback: for each connection, reads the client preface, sends its
/// SETTINGS (as a server does at once), reads frames up to the first HEADERS, then runs `script`
/// with the socket and that HEADERS' stream id.
fn raw_upstream(
    script: impl Fn(&mut TcpStream, u32) + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let script = Arc::new(script);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            count.fetch_add(1, SeqCst);
            let script = script.clone();
            std::thread::spawn(move || {
                sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut preface = [0u8; 24];
                if sock.read_exact(&mut preface).is_err() {
                    return;
                }
                let mut settings = Vec::new();
                keel_core::http::h2::frame::write_settings(&mut settings, &[]);
                if sock.write_all(&settings).is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if sock.read_exact(&mut head).is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if sock.read_exact(&mut payload).is_err() {
                        return;
                    }
                    if head[3] == keel_core::http::h2::frame::HEADERS {
                        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                        script(&mut sock, id);
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// Frames: the ACK of Keel's SETTINGS and a HEADERS frame with `fields` on `stream`.
fn settings_and_headers(stream: u32, fields: &[(&str, &str)], end: bool) -> Vec<u8> {
    use keel_core::http::h2::{frame, hpack};
    let mut out = Vec::new();
    frame::write_settings_ack(&mut out);
    let mut block = Vec::new();
    for (n, v) in fields {
        hpack::encode_field(n.as_bytes(), v.as_bytes(), &mut block);
    }
    frame::write_headers(&mut out, stream, &block, end, 16_384);
    out
}

fn get_status(port: u16, path: &str) -> (u16, Vec<u8>, Duration) {
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: reviews\r\n\r\n");
    let (status, head, body) = http_request(&mut s, request.as_bytes());
    let _ = head;
    (status, body, started.elapsed())
}

#[test]
fn broken_upstreams_get_clear_errors_never_a_hang() {
    use keel_core::http::h2::frame;
    // An HTTP/1.1 server on a port declared HTTP2: its answer to the preface is no frame.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let h1_only = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf);
            let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let (_keel, port) = keel_for(h1_only, "", 1);
    let (status, _, took) = get_status(port, "/");
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A server that accepts and never speaks: no SETTINGS within connectTimeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for sock in listener.incoming().flatten() {
            held.push(sock);
        }
    });
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy: { connectionPool: { tcp: { connectTimeout: 300ms } } }
";
    let (_keel, port) = keel_for(silent, rule, 1);
    let (status, _, took) = get_status(port, "/");
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Malformed response heads (RFC 9113 §8.3.2): 502, the stream reset, nothing forwarded.
    for fields in [
        &[(":status", "200"), ("Upper-Case", "x")][..],
        &[("content-type", "text/plain")],
        &[(":status", "200"), ("connection", "close")],
        &[(":status", "200"), (":path", "/")],
    ] {
        let reply = settings_and_headers(1, fields, true);
        let (upstream, _) = raw_upstream(move |s, _| {
            let _ = s.write_all(&reply);
            // Read what Keel sends back (its RST_STREAM) until it closes.
            let mut sink = [0u8; 1024];
            while matches!(s.read(&mut sink), Ok(1..)) {}
        });
        let (_keel, port) = keel_for(upstream, "", 1);
        let (status, _, _) = get_status(port, "/");
        assert_eq!(status, 502, "{fields:?}");
    }

    // A response cut off in its body: the client's connection is closed, never left waiting.
    let (upstream, _) = raw_upstream(|s, id| {
        let mut out =
            settings_and_headers(id, &[(":status", "200"), ("content-length", "100")], false);
        frame::write_head(&mut out, 10, frame::DATA, 0, id);
        out.extend_from_slice(b"0123456789");
        let _ = s.write_all(&out);
        // Then the connection dies.
    });
    let (_keel, port) = keel_for(upstream, "", 1);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("not closed: {e}: {}", String::from_utf8_lossy(&got)),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");

    // A whole response, then at once GOAWAY and the connection's end (as nginx after its last
    // stream): the response is still delivered whole, its end included (no content-length, so
    // an HTTP/1.1 client needs the last chunk), on either io driver.
    let body: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let sent = body.clone();
    let (upstream, _) = raw_upstream(move |s, id| {
        let mut out = settings_and_headers(id, &[(":status", "200")], false);
        for (i, chunk) in sent.chunks(16_000).enumerate() {
            let last = (i + 1) * 16_000 >= sent.len();
            frame::write_head(
                &mut out,
                chunk.len(),
                frame::DATA,
                if last { frame::END_STREAM } else { 0 },
                id,
            );
            out.extend_from_slice(chunk);
        }
        frame::write_goaway(&mut out, id, frame::ErrorCode::NoError, b"");
        // Corked: the response, the GOAWAY and the FIN arrive together, so Keel reads the end of
        // the connection before the stream's task has taken the response.
        let _ = socket2::SockRef::from(&*s).set_cork(true);
        let _ = s.write_all(&out);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(1..)) {}
    });
    for driver in DRIVERS {
        let (admin, port) = (free_port(), free_port());
        let _ = admin;
        let config = keel_config_for(upstream, port, admin, "");
        let keel = Keel::start(&config, admin, &["--io-driver", driver]);
        // One keep-alive connection: a response cut short would close it.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for i in 0..20 {
            let (status, head, got) =
                http_request(&mut s, b"GET /whole HTTP/1.1\r\nHost: reviews\r\n\r\n");
            assert_eq!(status, 200, "{driver} #{i}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "{head}"
            );
            assert!(got == body, "{driver} #{i}: {} bytes", got.len());
        }
        assert!(
            !keel.log_text().contains("response body interrupted"),
            "{driver}"
        );
        drop(keel);
    }

    // DATA beyond the declared content-length: the response is cut off, not passed on whole.
    let (upstream, _) = raw_upstream(|s, id| {
        let mut out =
            settings_and_headers(id, &[(":status", "200"), ("content-length", "3")], false);
        frame::write_head(&mut out, 5, frame::DATA, frame::END_STREAM, id);
        out.extend_from_slice(b"abcde");
        let _ = s.write_all(&out);
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(1..)) {}
    });
    let (_keel, port) = keel_for(upstream, "", 1);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("abcde"), "{text}");
}

/// Keel with an `HTTP` port for `reviews` on `backend` (HTTP/1.1 unless `rule` upgrades it).
fn keel_http_port(backend: SocketAddr, rule: &str) -> (Keel, u16) {
    let (admin, port) = (free_port(), free_port());
    let config = keel_config_for(backend, port, admin, rule).replace(
        "name: http2, protocol: HTTP2",
        "name: http2, protocol: HTTP",
    );
    (Keel::start(&config, admin, &[]), port)
}

#[test]
fn upgrade_policy_and_client_protocol_pick_the_upstream_protocol() {
    let (backend, _rec) = h2_backend(Behaviour::default());
    let rule = |http: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy: {{ connectionPool: {{ http: {http} }} }}
"
        )
    };
    let get = |port: u16, h2: bool| {
        let url = format!("http://reviews:{port}/p");
        let resolve = format!("reviews:{port}:127.0.0.1");
        let mut args = vec![
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &resolve,
        ];
        if h2 {
            args.push("--http2-prior-knowledge");
        }
        args.push(&url);
        curl(&args).1
    };
    // An HTTP port speaks HTTP/1.1 upstream: the HTTP/2-only backend does not answer it.
    let (_plain, port) = keel_http_port(backend, "");
    assert_ne!(get(port, false), "201");
    // UPGRADE: HTTP/2 upstream whatever the client speaks.
    let (_upgraded, port) = keel_http_port(backend, &rule("{ h2UpgradePolicy: UPGRADE }"));
    assert_eq!(get(port, false), "201");
    assert_eq!(get(port, true), "201");
    // useClientProtocol: an HTTP/2 client's request goes over HTTP/2, an HTTP/1.1 one's does not.
    let (_client, port) = keel_http_port(backend, &rule("{ useClientProtocol: true }"));
    assert_eq!(get(port, true), "201");
    assert_ne!(get(port, false), "201");
}

#[test]
fn a_reload_moves_requests_and_closes_connections_to_endpoints_gone() {
    let (a, rec_a) = h2_backend(Behaviour::default());
    let (b, rec_b) = h2_backend(Behaviour::default());
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(&keel_config_for(a, port, admin, ""), admin, &[]);
    let get = || {
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &format!("reviews:{port}:127.0.0.1"),
            &format!("http://reviews:{port}/p"),
        ])
        .1
    };
    for _ in 0..5 {
        assert_eq!(get(), "201");
    }
    assert_eq!(rec_a.connections.load(SeqCst), 1);
    // The endpoint moves to B: new requests go there, and the pooled connection to A, idle
    // now, is closed (GOAWAY, then the socket) rather than kept for the idle timeout.
    keel.write_config(&keel_config_for(b, port, admin, ""));
    let moved = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        get() == "201" && !rec_b.requests.lock().unwrap().is_empty()
    });
    assert!(moved, "requests never reached the new endpoint");
    let before = rec_b.requests.lock().unwrap().len();
    for _ in 0..5 {
        assert_eq!(get(), "201");
    }
    assert_eq!(rec_b.requests.lock().unwrap().len(), before + 5);
    let closed = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        rec_a.closed.load(SeqCst) == rec_a.connections.load(SeqCst)
    });
    assert!(closed, "the connection to the old endpoint stayed open");
}

/// A mirror in another protocol: the request goes to an HTTP/1.1 primary, its copy to an HTTP/2
/// cluster, re-framed from the body Keel kept (a chunked body with trailers becomes DATA and a
/// trailing HEADERS frame), with the `-shadow` authority.
#[test]
fn a_mirror_copy_goes_out_in_the_mirror_clusters_protocol() {
    let primary = RecordingBackend::echo("primary");
    let (mirror, rec) = h2_backend(Behaviour::default());
    let (admin, port) = (free_port(), free_port());
    let primary_ep = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}\n",
        primary.addr.port()
    );
    let config = format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: shadowed }}
spec:
  hosts: [shadowed]
  ports: [{{ number: 1, name: h2, protocol: HTTP2 }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ h2: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http:
  - mirror: {{ host: shadowed, port: {{ number: 1 }} }}
    mirrorPercentage: {{ value: 100 }}
    route: [{{ destination: {{ host: reviews }} }}]
",
        proxy_yaml(admin, 1),
        egress_service(port, "HTTP", "reviews", "{ name: reviews }", &primary_ep),
        mirror.port()
    );
    let _keel = Keel::start(&config, admin, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, _, _) = http_request(
        &mut s,
        b"POST /copy HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n",
    );
    assert_eq!(status, 200);
    let mut copy = None;
    for _ in 0..250 {
        copy = rec.requests.lock().unwrap().first().cloned();
        if copy.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let copy = copy.expect("the mirror got its copy over HTTP/2");
    assert_eq!(copy.method, "POST");
    assert_eq!(copy.path, "/copy");
    assert_eq!(copy.authority, "reviews-shadow");
    assert_eq!(copy.body, b"abcde");
    assert_eq!(copy.trailers, vec![("x-t".to_string(), "1".to_string())]);
    assert!(copy.header("transfer-encoding").is_none(), "{copy:?}");
    // The primary got the request over HTTP/1.1, chunked, as before.
    let seen = primary.received_text();
    assert!(
        seen.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{seen}"
    );
}
