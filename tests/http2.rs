//! HTTP/2 through the real binary: real clients (curl, nghttp, h2load, Python's `h2`), raw frames
//! for the RFC 9113 error cases, and an attack script per flood defence.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keel_core::http::h2::frame::{self, ErrorCode};
use keel_core::http::h2::hpack;

/// Keel with an HTTP egress listener for `reviews` on `backend`, plus `proxy_extra` Proxy lines.
fn keel_for(backend: SocketAddr, proxy_extra: &str) -> (Keel, u16) {
    http_egress(&[(backend, "v1")], "", proxy_extra, 1)
}

fn curl(args: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "--http2-prior-knowledge"])
        .args(args)
        .output()
        .expect("curl runs");
    (out.status.code().unwrap_or(-1), out.stdout)
}

fn h2_events(keel: &Keel) -> serde_json::Value {
    keel.stats()["listeners"][0]["http2"].clone()
}

fn h2_event(keel: &Keel, name: &str) -> u64 {
    h2_events(keel)[name].as_u64().unwrap_or(0)
}

#[test]
fn curl_prior_knowledge_and_http1_share_one_port() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    let url = format!("http://reviews:{port}/hello?q=1");
    let resolve = format!("reviews:{port}:127.0.0.1");
    let (code, body) = curl(&["--resolve", &resolve, "-H", "x-test: one", &url]);
    assert_eq!(code, 0);
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(text.starts_with("get /hello?q=1 http/1.1\r\n"), "{text}");
    assert!(text.contains("host: reviews"), "{text}");
    assert!(text.contains("x-test: one"), "{text}");
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    // A body with a length, and one without (curl -T - streams it: chunked to the upstream).
    let (_, body) = curl(&["--resolve", &resolve, "--data-binary", "abcdef", &url]);
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(
        text.contains("content-length: 6") && text.ends_with("abcdef"),
        "{text}"
    );
    let mut child = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "--resolve",
            &resolve,
            "-T",
            "-",
            &url,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"streamed").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("put "), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(text.ends_with("streamed"), "{text}");
    // HTTP/1.1 on the same port.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, _, _) = http_request(&mut s, b"GET /h1 HTTP/1.1\r\nHost: reviews\r\n\r\n");
    assert_eq!(status, 200);
    // Counted: requests as HTTP/2 streams on HTTP/2 connections.
    let events = h2_events(&keel);
    assert_eq!(events["connections"], 3, "{events}");
    assert_eq!(events["streams"], 3, "{events}");
    assert_eq!(keel.listener_stat("http_2xx"), 4);
}

#[test]
fn large_bodies_both_ways_are_byte_exact() {
    // The echo backend returns the request body after its head: 8 MiB up, 8 MiB+ down, through
    // windows far smaller than the bodies (64 KiB stream window here).
    let app = RecordingBackend::echo("app");
    let (_keel, port) = keel_for(
        app.addr,
        "  http2: { initialStreamWindowSize: 65535, initialConnectionWindowSize: 131072 }\n",
    );
    let dir = temp_dir("h2-large");
    let input = dir.join("in.bin");
    let mut data = vec![0u8; 8 << 20];
    Pattern::new(7).fill(&mut data);
    std::fs::write(&input, &data).unwrap();
    let url = format!("http://reviews:{port}/up");
    let resolve = format!("reviews:{port}:127.0.0.1");
    let (code, body) = curl(&[
        "--resolve",
        &resolve,
        "--data-binary",
        &format!("@{}", input.display()),
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(body.len() > data.len());
    assert!(
        body.ends_with(&data),
        "the body came back whole and in order"
    );
}

#[test]
fn h2load_many_streams_succeed_and_trip_no_defence() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    let out = Command::new("h2load")
        .args([
            "-n",
            "3000",
            "-c",
            "4",
            "-m",
            "32",
            "-H",
            ":authority: reviews",
        ])
        .arg(format!("http://127.0.0.1:{port}/load"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3000 succeeded"), "{text}");
    let events = h2_events(&keel);
    assert_eq!(events["streams"], 3000, "{events}");
    for defence in [
        "premature_reset_closes",
        "refused_streams",
        "continuation_floods",
        "control_floods",
        "empty_frame_floods",
        "window_update_floods",
        "connection_errors",
        "stream_errors",
    ] {
        assert_eq!(events[defence], 0, "{defence}: {events}");
    }
}

#[test]
fn nghttp_and_python_h2_see_trailers_pass_through() {
    // A gRPC-style backend: chunked response with trailers.
    let app = RecordingBackend::start(Arc::new(|_head: &str, _body: &[u8]| {
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n".to_vec()
    }));
    let (keel, port) = keel_for(app.addr, "");
    let out = Command::new("nghttp")
        .args(["-v", "-H", ":authority: reviews"])
        .arg(format!("http://127.0.0.1:{port}/svc/Method"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("grpc-status: 0"), "{text}");
    assert!(text.contains("hello"), "{text}");
    // Python's h2 as the client: request trailers go up (as chunked trailers), response trailers
    // come back as a trailing HEADERS frame.
    let script = format!(
        r#"
import socket, h2.connection, h2.events, h2.config
s = socket.create_connection(("127.0.0.1", {port}))
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/svc/M"), (":authority", "reviews"), ("te", "trailers"), ("content-type", "application/grpc")])
c.send_data(1, b"abc")
c.send_headers(1, [("x-req-trailer", "t1")], end_stream=True)
s.sendall(c.data_to_send())
got = {{}}
done = False
while not done:
    data = s.recv(65536)
    if not data: break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived): got["status"] = dict(e.headers)[b":status"]
        if isinstance(e, h2.events.DataReceived): got["data"] = got.get("data", b"") + e.data; c.acknowledge_received_data(len(e.data), 1)
        if isinstance(e, h2.events.TrailersReceived): got["trailers"] = dict(e.headers)
        if isinstance(e, h2.events.StreamEnded): done = True
    s.sendall(c.data_to_send())
print(got["status"].decode(), got["data"].decode(), got["trailers"][b"grpc-status"].decode())
"#
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "200 hello 0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = app.received_text().to_ascii_lowercase();
    assert!(seen.contains("x-req-trailer: t1"), "{seen}");
    // Istio's metric carries the gRPC status from the response trailers.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = http_get(keel.admin, "/stats/prometheus").unwrap().1;
        if text.contains("request_protocol=\"grpc\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("request_protocol=\"grpc\""))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("grpc_response_status=\"0\""), "{line}");
    assert!(
        seen.contains("te: trailers") || !seen.contains("te:"),
        "{seen}"
    );
}

/// A raw HTTP/2 client: frames written by hand, read back one by one.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A frame as read: type, flags, stream, payload.
type RawFrame = (u8, u8, u32, Vec<u8>);

impl Raw {
    /// Connects, sends the preface and `settings`, and reads the server's SETTINGS.
    fn connect(port: u16, settings: &[(u16, u32)]) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        let mut out = frame::PREFACE.to_vec();
        frame::write_settings(&mut out, settings);
        r.send(&out);
        let f = r.read().expect("server SETTINGS");
        assert_eq!(f.0, frame::SETTINGS);
        r
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = Vec::new();
        frame::write_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        self.send(&out);
    }

    /// A request head block for `path`, plus `extra` fields.
    fn block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "reviews"),
        ]
        .iter()
        .chain(extra)
        {
            hpack::encode_field(n.as_bytes(), v.as_bytes(), &mut b);
        }
        b
    }

    fn request(&mut self, stream: u32, path: &str, end_stream: bool) {
        let block = Raw::block(path, &[]);
        let flags = frame::END_HEADERS | if end_stream { frame::END_STREAM } else { 0 };
        self.frame(frame::HEADERS, flags, stream, &block);
    }

    /// The next frame, or `None` at EOF or timeout.
    fn read(&mut self) -> Option<RawFrame> {
        loop {
            if self.buf.len() >= 9 {
                let h = frame::Head::parse(self.buf[..9].try_into().unwrap());
                let total = 9 + h.len as usize;
                if self.buf.len() >= total {
                    let payload = self.buf[9..total].to_vec();
                    self.buf.drain(..total);
                    return Some((h.kind, h.flags, h.stream, payload));
                }
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Reads until a frame of `kind` (on `stream`, when given) arrives; its payload.
    fn expect(&mut self, kind: u8, stream: Option<u32>) -> Option<RawFrame> {
        while let Some(f) = self.read() {
            if f.0 == kind && stream.is_none_or(|s| s == f.2) {
                return Some(f);
            }
        }
        None
    }

    /// The GOAWAY's error code; the connection must then close.
    fn goaway_code(&mut self) -> u32 {
        let f = self.expect(frame::GOAWAY, None).expect("GOAWAY");
        u32::from_be_bytes(f.3[4..8].try_into().unwrap())
    }

    fn rst_code(&mut self, stream: u32) -> u32 {
        let f = self
            .expect(frame::RST_STREAM, Some(stream))
            .expect("RST_STREAM");
        u32::from_be_bytes(f.3[..4].try_into().unwrap())
    }

    /// The response status on `stream`.
    fn status(&mut self, stream: u32) -> u16 {
        let f = self
            .expect(frame::HEADERS, Some(stream))
            .expect("response HEADERS");
        let mut d = hpack::Decoder::new(4096);
        let mut status = 0;
        d.decode(&f.3, 1 << 20, |n, v| {
            if n == b":status" {
                status = std::str::from_utf8(v).unwrap().parse().unwrap();
            }
        })
        .unwrap();
        status
    }
}

#[test]
fn rfc_9113_connection_errors_answer_goaway_with_the_right_code() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    type Case = (&'static str, Box<dyn Fn(&mut Raw)>, ErrorCode);
    let cases: Vec<Case> = vec![
        (
            "DATA on stream 0",
            Box::new(|r| r.frame(frame::DATA, 0, 0, b"x")),
            ErrorCode::Protocol,
        ),
        (
            "frame too large",
            Box::new(|r| r.frame(frame::DATA, 0, 1, &vec![0; 20_000])),
            ErrorCode::FrameSize,
        ),
        (
            "PING of 7 bytes",
            Box::new(|r| r.frame(frame::PING, 0, 0, &[0; 7])),
            ErrorCode::FrameSize,
        ),
        (
            "SETTINGS on a stream",
            Box::new(|r| r.frame(frame::SETTINGS, 0, 1, &[])),
            ErrorCode::Protocol,
        ),
        (
            "INITIAL_WINDOW_SIZE above 2^31-1",
            Box::new(|r| r.frame(frame::SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0])),
            ErrorCode::FlowControl,
        ),
        (
            "CONTINUATION without HEADERS",
            Box::new(|r| r.frame(frame::CONTINUATION, frame::END_HEADERS, 1, &[0x82])),
            ErrorCode::Protocol,
        ),
        (
            "even stream id",
            Box::new(|r| r.request(2, "/", true)),
            ErrorCode::Protocol,
        ),
        (
            "bad HPACK index",
            Box::new(|r| {
                r.frame(
                    frame::HEADERS,
                    frame::END_HEADERS | frame::END_STREAM,
                    1,
                    &[0xff, 0x7f],
                )
            }),
            ErrorCode::Compression,
        ),
        (
            "WINDOW_UPDATE of 0 on the connection",
            Box::new(|r| r.frame(frame::WINDOW_UPDATE, 0, 0, &[0; 4])),
            ErrorCode::Protocol,
        ),
        (
            "DATA on an idle stream",
            Box::new(|r| r.frame(frame::DATA, 0, 9, b"x")),
            ErrorCode::Protocol,
        ),
        (
            "PUSH_PROMISE from a client",
            Box::new(|r| r.frame(frame::PUSH_PROMISE, frame::END_HEADERS, 1, &[0, 0, 0, 2])),
            ErrorCode::Protocol,
        ),
        (
            "HEADERS interrupted by another frame",
            Box::new(|r| {
                r.frame(frame::HEADERS, 0, 1, &Raw::block("/", &[]));
                r.frame(frame::PING, 0, 0, &[0; 8]);
            }),
            ErrorCode::Protocol,
        ),
    ];
    for (name, act, code) in cases {
        let mut r = Raw::connect(port, &[]);
        act(&mut r);
        let got = r
            .expect(frame::GOAWAY, None)
            .unwrap_or_else(|| panic!("{name}: no GOAWAY"));
        let got = u32::from_be_bytes(got.3[4..8].try_into().unwrap());
        assert_eq!(got, code as u32, "{name}");
        assert!(r.read().is_none(), "{name}: the connection closes");
    }
    // Something like the preface but not it is not HTTP/2: HTTP/1.1 refuses its version (505).
    let reply = raw_exchange(port, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 505"), "{reply}");
    assert!(h2_event(&keel, "connection_errors") >= 12);
}

#[test]
fn rfc_9113_stream_errors_reset_only_the_stream() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    let mut r = Raw::connect(port, &[]);
    let mut stream = 1;
    let malformed: [(&str, Vec<(&str, &str)>); 5] = [
        ("upper-case name", vec![("X-Upper", "1")]),
        ("connection-specific field", vec![("connection", "close")]),
        ("te other than trailers", vec![("te", "gzip")]),
        (
            "pseudo-header after a field",
            vec![("x-a", "1"), (":method", "GET")],
        ),
        ("unknown pseudo-header", vec![(":protocol", "x")]),
    ];
    for (name, extra) in malformed {
        let block = Raw::block("/", &extra);
        r.frame(
            frame::HEADERS,
            frame::END_HEADERS | frame::END_STREAM,
            stream,
            &block,
        );
        assert_eq!(r.rst_code(stream), ErrorCode::Protocol as u32, "{name}");
        stream += 2;
    }
    // content-length that the DATA does not match.
    let block = Raw::block("/", &[("content-length", "5")]);
    r.frame(frame::HEADERS, frame::END_HEADERS, stream, &block);
    r.frame(frame::DATA, frame::END_STREAM, stream, b"abc");
    assert_eq!(
        r.rst_code(stream),
        ErrorCode::Protocol as u32,
        "content-length"
    );
    stream += 2;
    // WINDOW_UPDATE of 0 on an open stream.
    r.request(stream, "/slow", false);
    r.frame(frame::WINDOW_UPDATE, 0, stream, &[0; 4]);
    assert_eq!(
        r.rst_code(stream),
        ErrorCode::Protocol as u32,
        "WINDOW_UPDATE 0"
    );
    stream += 2;
    // The connection still serves.
    r.request(stream, "/after", true);
    assert_eq!(r.status(stream), 200);
    assert!(h2_event(&keel, "stream_errors") >= 7);
    assert_eq!(h2_event(&keel, "connection_errors"), 0);
}

#[test]
fn rapid_reset_closes_the_connection_past_the_threshold() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    let mut r = Raw::connect(port, &[]);
    let started = Instant::now();
    // CVE-2023-44487: open and reset at once, far more than the threshold.
    let mut out = Vec::new();
    let block = Raw::block("/", &[]);
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        frame::write_headers(&mut out, id, &block, true, 16_384);
        frame::write_rst(&mut out, id, ErrorCode::Cancel);
    }
    r.send(&out);
    assert_eq!(r.goaway_code(), ErrorCode::EnhanceYourCalm as u32);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(h2_event(&keel, "premature_reset_closes"), 1);
}

#[test]
fn floods_are_cut_off_each_with_its_counter() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = keel_for(app.addr, "");
    // CONTINUATION flood (CVE-2024-27316 class): a header block that never ends.
    let mut r = Raw::connect(port, &[]);
    r.frame(frame::HEADERS, 0, 1, &Raw::block("/", &[]));
    for _ in 0..200 {
        r.frame(frame::CONTINUATION, 0, 1, &[0x40, 1, b'a', 1, b'b']);
    }
    assert_eq!(
        r.goaway_code(),
        ErrorCode::EnhanceYourCalm as u32,
        "CONTINUATION flood"
    );
    // PING flood.
    let mut r = Raw::connect(port, &[]);
    let mut out = Vec::new();
    for _ in 0..5000 {
        frame::write_ping(&mut out, false, [1; 8]);
    }
    r.send(&out);
    assert_eq!(
        r.goaway_code(),
        ErrorCode::EnhanceYourCalm as u32,
        "PING flood"
    );
    // SETTINGS flood.
    let mut r = Raw::connect(port, &[]);
    let mut out = Vec::new();
    for _ in 0..5000 {
        frame::write_settings(&mut out, &[]);
    }
    r.send(&out);
    assert_eq!(
        r.goaway_code(),
        ErrorCode::EnhanceYourCalm as u32,
        "SETTINGS flood"
    );
    // Empty DATA frames.
    let mut r = Raw::connect(port, &[]);
    r.request(1, "/", false);
    for _ in 0..10 {
        r.frame(frame::DATA, 0, 1, &[]);
    }
    assert_eq!(
        r.goaway_code(),
        ErrorCode::EnhanceYourCalm as u32,
        "empty DATA"
    );
    // WINDOW_UPDATE flood with no data sent.
    let mut r = Raw::connect(port, &[]);
    let mut out = Vec::new();
    for _ in 0..1000 {
        frame::write_window_update(&mut out, 0, 1);
    }
    r.send(&out);
    assert_eq!(
        r.goaway_code(),
        ErrorCode::EnhanceYourCalm as u32,
        "WINDOW_UPDATE flood"
    );
    let events = h2_events(&keel);
    for e in [
        "continuation_floods",
        "control_floods",
        "empty_frame_floods",
        "window_update_floods",
    ] {
        assert!(events[e].as_u64().unwrap() >= 1, "{e}: {events}");
    }
    assert!(keel.rss_kib() < 200 * 1024, "memory stays bounded");
}

#[test]
fn stream_limits_refuse_and_oversized_heads_get_431() {
    // A backend that holds each request for a while keeps streams open.
    let app = RecordingBackend::start(Arc::new(|_h: &str, _b: &[u8]| {
        std::thread::sleep(Duration::from_millis(300));
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
    }));
    let (keel, port) = keel_for(app.addr, "  http2: { maxConcurrentStreams: 2 }\n");
    let mut r = Raw::connect(port, &[]);
    for id in [1, 3, 5] {
        r.request(id, "/", true);
    }
    assert_eq!(r.rst_code(5), ErrorCode::RefusedStream as u32);
    assert_eq!(r.status(1), 200);
    assert_eq!(h2_event(&keel, "refused_streams"), 1);
    // A head over the header list limit (60 KiB by default): 431 on the stream, and the HPACK
    // state stays in step (the next request on the connection works).
    let mut r = Raw::connect(port, &[]);
    let big = "v".repeat(8000);
    let extra: Vec<(&str, &str)> = (0..10).map(|_| ("x-big", big.as_str())).collect();
    let block = Raw::block("/", &extra);
    let mut out = Vec::new();
    frame::write_headers(&mut out, 1, &block, true, 16_384);
    r.send(&out);
    assert_eq!(r.status(1), 431);
    r.request(3, "/", true);
    assert_eq!(r.status(3), 200);
    assert_eq!(h2_event(&keel, "header_lists_too_large"), 1);
}

#[test]
fn a_client_that_never_opens_its_window_is_timed_out() {
    let app = RecordingBackend::start(Arc::new(|_h: &str, _b: &[u8]| {
        let body = vec![b'x'; 100_000];
        let mut out =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(&body);
        out
    }));
    let (keel, port) = keel_for(app.addr, "  http2: { sendWindowTimeout: 300ms }\n");
    // Initial stream window 0: the response head goes, no DATA can.
    let mut r = Raw::connect(port, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)]);
    r.request(1, "/", true);
    assert_eq!(r.status(1), 200);
    assert_eq!(r.rst_code(1), ErrorCode::Cancel as u32);
    assert_eq!(h2_event(&keel, "send_window_timeouts"), 1);
}

#[test]
fn a_drain_finishes_open_streams_then_sends_goaway() {
    let app = RecordingBackend::start(Arc::new(|_h: &str, _b: &[u8]| {
        std::thread::sleep(Duration::from_millis(400));
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
    }));
    let (keel, port) = keel_for(app.addr, "");
    let mut r = Raw::connect(port, &[]);
    r.request(1, "/slow", true);
    std::thread::sleep(Duration::from_millis(100));
    let mut s = TcpStream::connect(("127.0.0.1", keel.admin)).unwrap();
    s.write_all(b"POST /drain_listeners HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    // Two steps: a GOAWAY naming 2^31-1 (with a PING), the stream in flight answered whole, then
    // the final GOAWAY(NO_ERROR) naming it as the last one.
    let first = r.expect(frame::GOAWAY, None).expect("first GOAWAY");
    assert_eq!(
        u32::from_be_bytes(first.3[..4].try_into().unwrap()),
        (1 << 31) - 1
    );
    assert_eq!(r.status(1), 200);
    let goaway = r.expect(frame::GOAWAY, None).expect("GOAWAY on drain");
    assert_eq!(u32::from_be_bytes(goaway.3[..4].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_be_bytes(goaway.3[4..8].try_into().unwrap()),
        ErrorCode::NoError as u32
    );
    assert!(r.read().is_none(), "then the connection closes");
}
