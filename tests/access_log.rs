//! Access logs through the real binary: Istio's text and JSON formats, Envoy format strings, TCP
//! connections, SIGUSR1 reopening, and refused formats.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The lines of `path` once there are `n` (lines reach the file within a sweep tick or two).
fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() > deadline {
            assert_eq!(lines.len(), n, "{text}");
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn request(port: u16, req: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_request(&mut s, req.as_bytes()).0
}

fn telemetry(path: &Path, format: &str) -> String {
    format!(
        "  telemetry:\n    accessLog: {{ path: {}, format: {format} }}\n",
        path.display()
    )
}

#[test]
fn istio_text_format_field_by_field() {
    let dir = temp_dir("access-text");
    let log = dir.join("access.log");
    let app = RecordingBackend::echo("app");
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", &telemetry(&log, "text"), 1);
    assert_eq!(
        request(
            port,
            "POST /hello?x=1 HTTP/1.1\r\nHost: reviews\r\nUser-Agent: tester/1\r\nx-request-id: rid-1\r\ncontent-length: 3\r\n\r\nabc"
        ),
        200
    );
    assert_eq!(
        request(port, "GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n"),
        502
    );
    let got = lines(&log, 2);
    let line = &got[0];
    // [START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "FAILURE" RX TX DURATION ...
    assert!(
        line.starts_with('[') && line[1..25].ends_with('Z'),
        "{line}"
    );
    let rest = &line[line.find("] ").unwrap() + 2..];
    assert!(
        rest.starts_with("\"POST /hello?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 3 "),
        "{rest}"
    );
    assert!(
        rest.contains("\"tester/1\" \"rid-1\" \"reviews\""),
        "{rest}"
    );
    assert!(
        rest.contains(&format!("\"{}\" outbound|", app.addr)),
        "{rest}"
    );
    assert!(
        rest.contains("|reviews.default.svc.cluster.local - 127.0.0.1:"),
        "{rest}"
    );
    // The response body size is counted exactly.
    let bytes_sent: u64 = rest.split(" ").nth(9).unwrap().parse().unwrap();
    assert!(bytes_sent > 50, "{rest}");
    let nr = &got[1];
    assert!(
        nr.contains("\"GET / HTTP/1.1\" 502 NR route_not_found"),
        "{nr}"
    );
    drop(keel);
}

#[test]
fn json_format_and_failures() {
    let dir = temp_dir("access-json");
    let log = dir.join("access.log");
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (keel, port) = http_egress(&[(dead, "v1")], "", &telemetry(&log, "json"), 1);
    assert_eq!(
        request(port, "GET /x HTTP/1.1\r\nHost: reviews\r\n\r\n"),
        503
    );
    let got = lines(&log, 1);
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/x");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["response_code"], 503);
    assert_eq!(v["response_flags"], "UF,URX");
    assert_eq!(
        v["response_code_details"],
        "upstream_reset_before_response_started{connection_failure}"
    );
    assert_eq!(v["upstream_host"], dead.to_string());
    assert_eq!(v["authority"], "reviews");
    assert_eq!(v["user_agent"], serde_json::Value::Null);
    assert!(v["request_id"].as_str().unwrap().len() == 36);
    assert!(v["duration"].as_u64().is_some());
    // A request refused before it had a head is logged too.
    let answer = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let got = lines(&log, 2);
    let v: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
    assert_eq!(v["response_code"], 400);
    assert_eq!(v["response_flags"], "DPE");
    assert_eq!(v["response_code_details"], "codec_error");
    drop(keel);
}

#[test]
fn envoy_format_string_tcp_and_sigusr1_reopen() {
    let dir = temp_dir("access-custom");
    let log = dir.join("access.log");
    let app = RecordingBackend::echo("app");
    let format = "'%REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(X-NAME):4% %BYTES_RECEIVED% %UPSTREAM_CLUSTER%'";
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", &telemetry(&log, format), 1);
    assert_eq!(
        request(
            port,
            "GET / HTTP/1.1\r\nHost: reviews\r\nx-name: abcdefgh\r\n\r\n"
        ),
        200
    );
    let got = lines(&log, 1);
    assert!(
        got[0].starts_with("GET 200 - abcd 0 outbound|"),
        "{}",
        got[0]
    );
    // logrotate: move the file away, SIGUSR1, and the next line goes to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    keel.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        request(
            port,
            "PUT / HTTP/1.1\r\nHost: reviews\r\ncontent-length: 2\r\n\r\nhi"
        ),
        200
    );
    let got = lines(&log, 1);
    assert!(got[0].starts_with("PUT 200 - - 2 "), "{}", got[0]);
    assert_eq!(lines(&rotated, 1).len(), 1);
}

#[test]
fn tcp_connections_are_logged() {
    let dir = temp_dir("access-tcp");
    let log = dir.join("access.log");
    let (echo, _) = echo_backend();
    let admin = free_port();
    let port = free_port();
    let config = format!(
        "{}{}{}",
        proxy_yaml(admin, 1),
        telemetry(&log, "json"),
        ingress_yaml(port, echo, "")
    );
    let keel = Keel::start(&config, admin, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_round_trip(&mut s, b"hello tcp");
    drop(s);
    let got = lines(&log, 1);
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["response_code"], 0);
    assert_eq!(v["bytes_received"], 9);
    assert_eq!(v["bytes_sent"], 9);
    assert_eq!(v["upstream_host"], echo.to_string());
    assert_eq!(v["upstream_cluster"], format!("inbound|{port}||"));
    assert_eq!(v["method"], serde_json::Value::Null);
    drop(keel);
}

#[test]
fn unknown_operator_is_refused_with_its_field() {
    let dir = temp_dir("access-bad");
    let path = dir.join("keel.yaml");
    let config = format!(
        "{}  telemetry:\n    accessLog: {{ path: access.log, format: '%RESPONSE_COD%' }}\n",
        proxy_yaml(free_port(), 1)
    );
    std::fs::write(&path, config).unwrap();
    let (ok, out) = validate(&path);
    assert!(!ok);
    assert!(out.contains("spec.telemetry.accessLog.format"), "{out}");
    assert!(out.contains("did you mean `RESPONSE_CODE`"), "{out}");
}

/// `POST /logging?level=` changes the log level at run time (GET is refused, a bad level is 400).
#[test]
fn admin_logging_level() {
    let app = RecordingBackend::echo("app");
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", "", 1);
    let post = |query: &str| {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", keel.admin)).unwrap();
        s.write_all(
            format!("POST /logging{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    assert_eq!(http_get(keel.admin, "/logging").unwrap().0, 405);
    assert!(post("?level=nonsense[").starts_with("HTTP/1.1 400"));
    let count = || keel.log_text().matches("local reply").count();
    // Debug (the harness's level): the 404 is logged.
    request(port, "GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(2);
    while count() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = count();
    assert!(before >= 1);
    assert!(post("?level=warn").starts_with("HTTP/1.1 200"));
    request(port, "GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(), before, "not logged at warn");
    assert!(post("?level=debug").starts_with("HTTP/1.1 200"));
    request(port, "GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(2);
    while count() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count(), before + 1);
}
