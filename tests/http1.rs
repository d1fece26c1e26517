//! HTTP/1.1 through the real binary: routing, rewriting, framing, strictness, pooling, upgrades.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Keel with an HTTP egress listener on `port` for `reviews` (endpoints labelled by version), plus
/// `extra` resources (DestinationRule, VirtualService...).
fn egress(endpoints: &[(SocketAddr, &str)], extra: &str, proxy_extra: &str) -> (Keel, u16) {
    http_egress(endpoints, extra, proxy_extra, 1)
}

fn get(port: u16, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_request(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: reviews\r\n{headers}\r\n").as_bytes(),
    )
}

const SUBSETS: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
  - { name: v3, labels: { version: v3 } }
";

#[test]
fn ingress_forwards_to_the_app_with_forwarding_headers_and_no_hop_by_hop() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let config = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{ name: default }}\nspec:\n  ingress:\n  - port: {{ number: {port}, protocol: HTTP }}\n    bind: 127.0.0.1\n    defaultEndpoint: {}\n",
        proxy_yaml(admin, 1),
        app.addr
    );
    let keel = Keel::start(&config, admin, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, head, body) = http_request(
        &mut s,
        b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-Forwarded-For: 10.1.1.1\r\nX-Keep: yes\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(head.contains("x-backend: app"));
    let seen = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(seen.starts_with("get /a?b=c http/1.1\r\n"), "{seen}");
    assert!(seen.contains("host: example.com"));
    assert!(seen.contains("x-keep: yes"));
    assert!(
        seen.contains("x-forwarded-for: 10.1.1.1, 127.0.0.1"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http"));
    assert!(seen.contains("x-request-id: "));
    for hop in [
        "x-hop",
        "keep-alive:",
        "proxy-connection",
        "te:",
        "connection:",
    ] {
        assert!(!seen.contains(hop), "{hop} forwarded: {seen}");
    }
    let s2 = keel.stats();
    assert_eq!(s2["listeners"][0]["http_requests"], 1);
    assert_eq!(s2["listeners"][0]["http_2xx"], 1);
}

#[test]
fn header_route_for_jason_and_a_50_25_25_split() {
    let (v1, v2, v3) = (
        RecordingBackend::echo("v1"),
        RecordingBackend::echo("v2"),
        RecordingBackend::echo("v3"),
    );
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - match: [{ headers: { end-user: { exact: jason } } }]
    route: [{ destination: { host: reviews, subset: v2 } }]
  - route:
    - { destination: { host: reviews, subset: v1 }, weight: 50 }
    - { destination: { host: reviews, subset: v2 }, weight: 25 }
    - { destination: { host: reviews, subset: v3 }, weight: 25 }
";
    let (_keel, port) = egress(
        &[(v1.addr, "v1"), (v2.addr, "v2"), (v3.addr, "v3")],
        &format!("{SUBSETS}{vs}"),
        "",
    );
    for _ in 0..20 {
        let (_, head, _) = get(port, "/", "end-user: jason\r\n");
        assert!(head.contains("x-backend: v2"), "{head}");
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut counts = std::collections::HashMap::new();
    let n = 2000;
    for _ in 0..n {
        let (_, head, _) = http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
        let b = head
            .split("x-backend: ")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .to_string();
        *counts.entry(b).or_insert(0) += 1;
    }
    for (name, share) in [("v1", 0.5), ("v2", 0.25), ("v3", 0.25)] {
        let got = f64::from(counts.get(name).copied().unwrap_or(0)) / f64::from(n);
        assert!(
            (got - share).abs() < 0.05,
            "{name}: {got} of traffic, want {share}: {counts:?}"
        );
    }
}

#[test]
fn matches_rewrites_header_ops_redirects_and_direct_responses() {
    let (v1, v2) = (RecordingBackend::echo("v1"), RecordingBackend::echo("v2"));
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - name: exact-ping
    match: [{ uri: { exact: /ping }, method: { exact: GET } }]
    directResponse: { status: 200, body: { string: pong } }
  - match: [{ uri: { regex: \"/v[0-9]+/.*\" }, queryParams: { debug: { exact: \"1\" } } }]
    directResponse: { status: 202, body: { string: debug } }
  - match: [{ uri: { prefix: /old } }]
    redirect: { uri: /new, authority: elsewhere.example, redirectCode: 308 }
  - match: [{ uri: { prefix: /api/ } }]
    rewrite: { uri: /v2/, authority: reviews.internal }
    headers:
      request: { set: { x-set: s }, add: { x-add: a }, remove: [x-drop] }
      response: { set: { x-resp: r }, remove: [x-backend] }
    route: [{ destination: { host: reviews, subset: v2 } }]
  - match: [{ withoutHeaders: { x-beta: {} } }]
    route: [{ destination: { host: reviews, subset: v1 } }]
  - match: [{ authority: { prefix: reviews } }]
    route: [{ destination: { host: reviews, subset: v2 } }]
";
    let (_keel, port) = egress(
        &[(v1.addr, "v1"), (v2.addr, "v2")],
        &format!("{SUBSETS}{vs}"),
        "",
    );
    assert_eq!(get(port, "/ping", "").2, b"pong");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, _, _) = http_request(
        &mut s,
        b"POST /ping HTTP/1.1\r\nHost: reviews\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(
        status, 200,
        "POST /ping falls through to a route (method match failed)"
    );
    assert_eq!(get(port, "/v1/x?debug=1", "").0, 202);
    assert_ne!(get(port, "/v1/x?debug=2", "").0, 202);
    assert_ne!(get(port, "/nov1/x?debug=1", "").0, 202, "regex is anchored");
    let (status, head, _) = get(port, "/old/page", "");
    assert_eq!(status, 308);
    assert!(
        head.contains("location: http://elsewhere.example/new\r\n"),
        "{head}"
    );

    let (status, head, body) = get(port, "/api/items?x=1", "X-Drop: 1\r\nX-Set: client\r\n");
    assert_eq!(status, 200);
    let seen = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(seen.starts_with("get /v2/items?x=1 http/1.1"), "{seen}");
    assert!(seen.contains("host: reviews.internal"));
    assert!(seen.contains("x-set: s") && !seen.contains("x-set: client"));
    assert!(seen.contains("x-add: a") && !seen.contains("x-drop"));
    assert!(
        head.contains("x-resp: r") && !head.contains("x-backend"),
        "{head}"
    );

    assert!(get(port, "/other", "").1.contains("x-backend: v1"));
    assert!(get(port, "/other", "x-beta: 1\r\n")
        .1
        .contains("x-backend: v2"));
}

#[test]
fn unknown_host_no_endpoint_and_dead_upstream() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let empty_subset = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  subsets: [{ name: none, labels: { version: nothing } }, { name: v1, labels: { version: v1 } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - match: [{ uri: { prefix: /empty } }]
    route: [{ destination: { host: reviews, subset: none } }]
  - route: [{ destination: { host: reviews, subset: v1 } }]
";
    let (keel, port) = egress(&[(dead, "v1")], empty_subset, "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(
        http_request(&mut s, b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n").0,
        502
    );
    assert_eq!(
        http_request(&mut s, b"GET /empty HTTP/1.1\r\nHost: reviews\r\n\r\n").0,
        503
    );
    let (status, _, body) = http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("connection failure"));
    let l = &keel.stats()["listeners"][0];
    assert_eq!(l["no_healthy_upstream"], 1);
    // Istio's default retry policy (2 retries on connect-failure) tried three times.
    assert_eq!(l["upstream_connect_refused"], 3);
    assert_eq!(l["http_4xx"], 0);
    assert_eq!(l["http_5xx"], 3);
    assert_eq!(l["registry_only_refused"], 1);
}

#[test]
fn bodies_content_length_chunked_with_trailers_and_pipelining() {
    let app = RecordingBackend::echo("app");
    let (_keel, port) = egress(&[(app.addr, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_, _, body) = http_request(
        &mut s,
        b"POST /cl HTTP/1.1\r\nHost: reviews\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert!(body.ends_with(b"\n\nhello world"));
    let (_, _, body) = http_request(&mut s, b"POST /ch HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n");
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.contains("transfer-encoding: chunked"), "{seen}");
    assert!(
        seen.ends_with("hello world[trailer x-checksum: abc]"),
        "{seen}"
    );
    // Three pipelined requests in one write come back in order.
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: reviews\r\n\r\nGET /2 HTTP/1.1\r\nHost: reviews\r\n\r\nGET /3 HTTP/1.1\r\nHost: reviews\r\n\r\n").unwrap();
    for i in 1..=3 {
        let (status, _, body) = read_response(&mut s);
        assert_eq!(status, 200);
        assert!(
            body.starts_with(format!("GET /{i} HTTP/1.1").as_bytes()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn head_204_304_have_no_body_and_100_continue() {
    let backend = RecordingBackend::start(Arc::new(|head: &str, _: &[u8]| {
        let path = head.split(' ').nth(1).unwrap_or("");
        match path {
            "/204" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/304" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789".to_vec(),
        }
    }));
    let (_keel, port) = egress(&[(backend.addr, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, head, body) = http_request(&mut s, b"GET /204 HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert_eq!((status, body.len()), (204, 0));
    assert!(!head.contains("transfer-encoding"));
    let (status, head, _) = http_request(&mut s, b"GET /304 HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert_eq!(status, 304);
    assert!(
        head.contains("content-length: 10"),
        "kept as metadata: {head}"
    );
    // The connection is still in sync: the next response is the right one.
    let (status, _, body) = http_request(&mut s, b"GET /x HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert_eq!((status, body.as_slice()), (200, &b"0123456789"[..]));

    // Expect: 100-continue: Keel answers 100 itself, then forwards the body.
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: reviews\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"body").unwrap();
    assert_eq!(read_response(&mut s).0, 200);
    assert!(!backend
        .received_text()
        .to_ascii_lowercase()
        .contains("expect:"));
}

#[test]
fn head_request_reads_no_body() {
    let backend = RecordingBackend::start(Arc::new(|_: &str, _: &[u8]| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec()
    }));
    let (_keel, port) = egress(&[(backend.addr, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for _ in 0..3 {
        s.write_all(b"HEAD / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(
            text.starts_with("http/1.1 200")
                && text.contains("content-length: 1000")
                && text.ends_with("\r\n\r\n"),
            "{text}"
        );
    }
}

/// Smuggling and malformed-head vectors (PortSwigger / http-garden classes): each is refused with
/// 4xx before anything reaches the backend.
#[test]
fn ambiguous_requests_are_refused_and_never_forwarded() {
    let backend = RecordingBackend::echo("app");
    let (_keel, port) = egress(&[(backend.addr, "v1")], "", "");
    let vectors: &[(&str, &[u8], u16)] = &[
        ("CL.TE", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
        ("TE.CL", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
        ("TE.TE dup", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n", 400),
        ("TE space before colon", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
        ("TE quoted", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n", 400),
        ("TE vertical tab", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
        ("TE chunked, identity", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
        ("TE obs-fold", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("duplicate CL", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        ("CL list differs", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 1, 2\r\n\r\nab", 400),
        ("CL sign", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: +2\r\n\r\nab", 400),
        ("CL hex", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 0x2\r\n\r\nab", 400),
        ("CL overflow", b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 99999999999999999999\r\n\r\nab", 400),
        ("bare LF line end", b"GET / HTTP/1.1\nHost: reviews\n\n", 400),
        ("bare LF in field", b"GET / HTTP/1.1\r\nHost: reviews\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: reviews\r\nX: a\rb\r\n\r\n", 400),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: reviews\r\nX: a\x00b\r\n\r\n", 400),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: reviews\r\nX: a\r\n b\r\n\r\n", 400),
        ("space in name", b"GET / HTTP/1.1\r\nHost: reviews\r\nX Y: a\r\n\r\n", 400),
        ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: reviews\r\nHost: other\r\n\r\n", 400),
        ("bad method", b"G(T / HTTP/1.1\r\nHost: reviews\r\n\r\n", 400),
        ("bad target", b"GET foo HTTP/1.1\r\nHost: reviews\r\n\r\n", 400),
        ("fragment", b"GET /#x HTTP/1.1\r\nHost: reviews\r\n\r\n", 400),
        ("HTTP/2.0 line", b"GET / HTTP/2.0\r\nHost: reviews\r\n\r\n", 505),
        ("chunk size hex prefix", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
        ("chunk size bare LF", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
        ("chunk data overrun", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", 400),
        ("chunk ext LF", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", 400),
        ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", 400),
        ("negative chunk", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
        ("CONNECT", b"CONNECT reviews:443 HTTP/1.1\r\nHost: reviews:443\r\n\r\n", 405),
    ];
    for (name, bytes, want) in vectors {
        let before = backend.received.lock().unwrap().len();
        let answer = raw_exchange(port, bytes);
        let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert_eq!(status, *want, "{name}: {answer:?}");
        // Bytes Keel forwarded arrive at the recording thread asynchronously: let them land.
        std::thread::sleep(Duration::from_millis(50));
        let forwarded = backend.received.lock().unwrap()[before..].to_vec();
        let forwarded = String::from_utf8_lossy(&forwarded).to_string();
        // Body-level errors are found after the head went upstream: the backend then holds an
        // unterminated chunked request that it never sees completed; nothing smuggled follows.
        assert!(
            !forwarded.contains("SMUGGLED") && !forwarded.contains("hello"),
            "{name}: backend got {forwarded:?}"
        );
        if !name.starts_with("chunk") && !name.starts_with("negative") {
            assert!(forwarded.is_empty(), "{name}: forwarded {forwarded:?}");
        }
    }
}

#[test]
fn size_limits_answer_431_and_414() {
    let backend = RecordingBackend::echo("app");
    let (_keel, port) = egress(
        &[(backend.addr, "v1")],
        "",
        "  http: { maxRequestHeadersKb: 8, maxRequestTargetBytes: 1024, maxHeadersCount: 20 }\n",
    );
    let big = format!(
        "GET / HTTP/1.1\r\nHost: reviews\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert!(raw_exchange(port, big.as_bytes()).starts_with("HTTP/1.1 431"));
    let many = format!(
        "GET / HTTP/1.1\r\nHost: reviews\r\n{}\r\n",
        "X: y\r\n".repeat(25)
    );
    assert!(raw_exchange(port, many.as_bytes()).starts_with("HTTP/1.1 431"));
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: reviews\r\n\r\n",
        "a".repeat(2000)
    );
    assert!(raw_exchange(port, long.as_bytes()).starts_with("HTTP/1.1 414"));
    assert!(backend.received.lock().unwrap().is_empty());
}

#[test]
fn upstream_garbage_is_502_and_the_connection_discarded() {
    let bad = RecordingBackend::start(Arc::new(|head: &str, _: &[u8]| {
        match head.split(' ').nth(1).unwrap_or("") {
            "/garbage" => b"garbage\r\n\r\n".to_vec(),
            "/both" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok"
                    .to_vec()
            }
            "/lf" => b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        }
    }));
    let (_keel, port) = egress(&[(bad.addr, "v1")], "", "");
    for path in ["/garbage", "/both", "/lf"] {
        let (status, ..) = get(port, path, "");
        assert_eq!(status, 502, "{path}");
    }
    let conns = bad.connections.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(port, "/fine", "").0, 200);
    assert_eq!(
        bad.connections.load(std::sync::atomic::Ordering::Relaxed),
        conns + 1,
        "a connection that sent garbage is never reused"
    );
}

#[test]
fn pooled_connections_are_reused_and_a_closed_one_is_not() {
    // The backend closes after each response without saying so: Keel must notice before reuse.
    let closing = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        addr
    };
    let (_keel, port) = egress(&[(closing, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for _ in 0..20 {
        assert_eq!(
            http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n").0,
            200
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let app = RecordingBackend::echo("app");
    let (_keel2, port2) = egress(&[(app.addr, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port2)).unwrap();
    for _ in 0..20 {
        assert_eq!(
            http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n").0,
            200
        );
    }
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one upstream connection serves sequential requests"
    );
}

#[test]
fn slowloris_head_times_out() {
    let backend = RecordingBackend::echo("app");
    let (_keel, port) = egress(
        &[(backend.addr, "v1")],
        "",
        "  http: { requestHeadersTimeout: 500ms }\n",
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = Instant::now();
    let mut closed = false;
    for b in
        b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
    {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.read_to_string(&mut out);
    assert!(closed || out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_client_that_stops_reading_costs_bounded_memory_and_is_closed() {
    let big = RecordingBackend::start(Arc::new(|_: &str, _: &[u8]| {
        let mut out =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 256 << 20).into_bytes();
        out.resize(out.len() + (256 << 20), b'x');
        out
    }));
    let (keel, port) = egress(&[(big.addr, "v1")], "", "  http: { idleTimeout: 1s }\n");
    let before = keel.rss_kib();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let grew = keel.rss_kib().saturating_sub(before);
    assert!(
        grew < 8192,
        "RSS grew {grew} KiB for a client that does not read"
    );
    keel.wait_listener_stat("idle_timeouts", 1);
}

#[test]
fn streams_large_uploads_and_downloads_without_buffering_them() {
    let sink = RecordingBackend::start(Arc::new(|_: &str, body: &[u8]| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            body.len().to_string().len(),
            body.len()
        )
        .into_bytes()
    }));
    let (keel, port) = egress(&[(sink.addr, "v1")], "", "");
    let before = keel.rss_kib();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let len = 64usize << 20;
    s.write_all(
        format!("POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    send_pattern(&mut s, 9, len);
    let (status, _, body) = read_response(&mut s);
    assert_eq!(
        (status, String::from_utf8_lossy(&body).to_string()),
        (200, len.to_string())
    );
    let grew = keel.rss_kib().saturating_sub(before);
    assert!(grew < 8192, "RSS grew {grew} KiB for a 64 MiB upload");
}

#[test]
fn websocket_upgrade_becomes_a_tunnel_and_h2c_upgrade_is_not_forwarded() {
    let ws = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = c.read(&mut buf).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if text.contains("upgrade: websocket") {
                        c.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
                        loop {
                            let n = c.read(&mut buf).unwrap_or(0);
                            if n == 0 || c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                    let body = if text.contains("upgrade") || text.contains("http2-settings") {
                        "leaked"
                    } else {
                        "clean"
                    };
                    let _ = c.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        addr
    };
    let (_keel, port) = egress(&[(ws, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: reviews\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 101") && text.contains("upgrade: websocket"),
        "{text}"
    );
    echo_round_trip(&mut s, b"\x81\x05hello frames both ways");

    let (status, _, body) = get(port, "/", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n");
    assert_eq!((status, body.as_slice()), (200, &b"clean"[..]));
}

#[test]
fn curl_and_python_clients() {
    let app = RecordingBackend::echo("app");
    let (_keel, port) = egress(&[(app.addr, "v1")], "", "");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Host: reviews",
            "-d",
            "from curl",
            &format!("http://127.0.0.1:{port}/c"),
            &format!("http://127.0.0.1:{port}/d"),
        ])
        .output()
        .expect("curl is installed by scripts/setup.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.matches("from curl").count() == 2,
        "{text}"
    );
    let script = r#"
import http.client
c = http.client.HTTPConnection('127.0.0.1', PORT)
for i in range(3):
    c.request('POST', '/py', body=iter([b'chunk-a', b'chunk-b']), headers={'Host': 'reviews'}, encode_chunked=True)
    r = c.getresponse(); b = r.read()
    assert r.status == 200 and b.endswith(b'chunk-achunk-b'), b
print('ok')
"#
    .replace("PORT", &port.to_string());
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// HTTP/1.0 has no chunked coding: a chunked upstream body reaches a 1.0 client de-chunked, ended by
/// the close; a 1.1 client on the same route gets it chunked on a connection that stays open.
#[test]
fn http10_clients_never_get_chunked_bodies() {
    let chunky = RecordingBackend::start(Arc::new(|_: &str, _: &[u8]| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec()
    }));
    let (_keel, port) = egress(&[(chunky.addr, "v1")], "", "");
    let answer = raw_exchange(port, b"GET / HTTP/1.0\r\nHost: reviews\r\n\r\n");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.starts_with("http/1.1 200")
            && !lower.contains("transfer-encoding")
            && lower.contains("connection: close"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nhello world"), "{answer:?}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for _ in 0..2 {
        let (status, head, body) = http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
        assert_eq!((status, body.as_slice()), (200, &b"hello world"[..]));
        assert!(head.contains("transfer-encoding: chunked"));
    }
}

/// An upstream that answers before reading the body (413) and stops reading: its answer reaches the
/// client, and the client's connection is closed afterwards (its unread body cannot be resynchronised).
#[test]
fn an_early_upstream_answer_reaches_the_client() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = c.write_all(
                    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!",
                );
                std::thread::sleep(Duration::from_secs(5));
            });
        }
    });
    let (_keel, port) = egress(&[(addr, "v1")], "", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: reviews\r\nContent-Length: 16777216\r\n\r\n")
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b'x'; 65536];
        for _ in 0..256 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let (status, head, body) = read_response(&mut s);
    assert_eq!((status, body.as_slice()), (413, &b"too big!"[..]));
    assert!(head.contains("connection: close"), "{head}");
}

#[test]
fn a_closing_response_arrives_whole_then_eof() {
    // Keel sends the last response of a closing connection with its FIN (MSG_MORE, then a
    // half-close): the client must get every byte and then EOF at once, for a proxied response
    // and for one of Keel's own (502 for a host outside the registry).
    let v1 = RecordingBackend::echo("v1");
    let (_keel, port) = egress(&[(v1.addr, "v1")], "", "");
    for (request, status) in [
        (
            "GET /closing HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
            "200",
        ),
        (
            "GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n",
            "502",
        ),
        ("GET /old HTTP/1.0\r\nHost: reviews\r\n\r\n", "200"),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("no EOF after the response");
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&got);
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .expect("content-length")
            .parse()
            .unwrap();
        assert_eq!(body.len(), length, "{text}");
        // Keel's own replies wait up to 200 ms for the client after the half-close: the bytes and
        // the FIN must not wait with them.
        assert!(
            took < Duration::from_millis(150),
            "{request:?}: EOF after {took:?}"
        );
    }
}

/// GETs `path` with `headers`, expects 200, and returns the `x-backend` that answered.
fn served_by(port: u16, path: &str, headers: &str) -> String {
    let (status, head, _) = get(port, path, headers);
    assert_eq!(status, 200);
    head.lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// LEAST_REQUEST: requests go to the endpoint with fewer in flight, so a slow endpoint that
/// holds its requests gets few new ones (round robin would give it half).
#[test]
fn least_request_avoids_the_busy_endpoint() {
    let slow = RecordingBackend::start(Arc::new(|_: &str, _: &[u8]| {
        std::thread::sleep(Duration::from_millis(1500));
        b"HTTP/1.1 200 OK\r\nx-backend: slow\r\ncontent-length: 0\r\n\r\n".to_vec()
    }));
    let fast = RecordingBackend::echo("fast");
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: { simple: LEAST_REQUEST }
";
    let (_keel, port) = egress(&[(slow.addr, "v1"), (fast.addr, "v2")], rule, "");
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(30));
            std::thread::spawn(move || served_by(port, &format!("/{i}"), ""))
        })
        .collect();
    let backends: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let to_slow = backends.iter().filter(|b| *b == "slow").count();
    assert!(to_slow <= 3, "{backends:?}");
    assert_eq!(
        backends.len() - to_slow,
        backends.iter().filter(|b| *b == "fast").count()
    );
}

/// consistentHash on a header: the same value always reaches the same endpoint; different values
/// spread over both; a request without the header is still served.
#[test]
fn consistent_hash_on_a_header_is_sticky() {
    for table in [
        "ringHash: { minimumRingSize: 1024 }",
        "maglev: { tableSize: 65537 }",
    ] {
        let (a, b) = (RecordingBackend::echo("a"), RecordingBackend::echo("b"));
        let rule = format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {{ consistentHash: {{ httpHeaderName: x-user, {table} }} }}
"
        );
        let (_keel, port) = egress(&[(a.addr, "v1"), (b.addr, "v2")], &rule, "");
        let backend_of = |headers: &str| served_by(port, "/", headers);
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..20 {
            let first = backend_of(&format!("x-user: user-{user}\r\n"));
            for _ in 0..3 {
                assert_eq!(
                    backend_of(&format!("x-user: user-{user}\r\n")),
                    first,
                    "{table}"
                );
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 2, "{table}: 20 users all on one endpoint");
        assert!(!backend_of("").is_empty());
    }
}

/// consistentHash on a cookie with a ttl: a client without the cookie gets one (Set-Cookie with
/// Max-Age and Path) and, sending it back, stays on the endpoint that served it first.
#[test]
fn consistent_hash_on_a_generated_cookie_is_sticky() {
    let (a, b) = (RecordingBackend::echo("a"), RecordingBackend::echo("b"));
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: session
          path: /
          ttl: 1h
          attributes: [{ name: SameSite, value: Strict }, { name: Partitioned }]
";
    let (_keel, port) = egress(&[(a.addr, "v1"), (b.addr, "v2")], rule, "");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, head, _) = get(port, "/", "");
        assert_eq!(status, 200);
        let set = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .unwrap_or_else(|| panic!("no set-cookie: {head}"))
            .trim()
            .to_string();
        assert!(
            set.starts_with("session=")
                && set.ends_with("; max-age=3600; path=/; httponly; samesite=strict; partitioned"),
            "{set}"
        );
        let first = head
            .lines()
            .find_map(|l| l.strip_prefix("x-backend: "))
            .unwrap()
            .trim()
            .to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        for _ in 0..3 {
            let (_, head, _) = get(port, "/", &format!("Cookie: theme=dark; {cookie}\r\n"));
            assert!(
                !head.contains("set-cookie"),
                "no new cookie once sent: {head}"
            );
            assert!(head.contains(&format!("x-backend: {first}")), "{head}");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "20 sessions all on one endpoint");

    // The same with curl and a cookie jar, as a browser would.
    let jar = temp_dir("cookies").join("jar");
    let curl = || {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
                "Host: reviews",
                "-c",
            ])
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .expect("curl runs");
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        head.lines()
            .find_map(|l| l.strip_prefix("x-backend: "))
            .unwrap_or_else(|| panic!("no answer: {head}"))
            .trim()
            .to_string()
    };
    let first = curl();
    for _ in 0..4 {
        assert_eq!(curl(), first);
    }
}

/// An idle keep-alive connection holds no read buffer and a few hundred bytes of task: what the
/// `idle-mem` bench measures (0.5 KiB per connection), bounded loosely enough for any allocator.
/// A state machine that grows the connection task (an inline HTTP/2 sniff once cost 2 KiB per
/// idle connection) fails this.
#[test]
fn idle_keep_alive_connections_cost_little_memory() {
    const CONNS: usize = 1500;
    raise_fd_limit(4 * CONNS as u64);
    let app = RecordingBackend::start(Arc::new(|_: &str, _: &[u8]| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'x', 1024))
            .collect()
    }));
    let (keel, port) = egress(&[(app.addr, "v1")], "", "");
    let one = |s: &mut TcpStream| {
        let (status, _, body) = http_request(s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
        assert_eq!((status, body.len()), (200, 1024));
    };
    // Warm up (pools, first-touch pages) with connections that come and go.
    for _ in 0..200 {
        one(&mut TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    let before = keel.rss_kib();
    let mut idle = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        one(&mut s);
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let per_conn = keel.rss_kib().saturating_sub(before) as f64 / CONNS as f64;
    assert!(per_conn < 1.25, "{per_conn:.2} KiB per idle connection");
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit(2) read and write one rlimit struct on our stack.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
