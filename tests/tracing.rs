//! Distributed tracing through the real binary: W3C and B3 contexts read and passed on, spans
//! exported to a collector on loopback as Zipkin v2 JSON and OTLP/HTTP JSON, parent and child ids
//! following the propagated headers, sampling honoured, an unreachable collector only counted.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A collector: records each POST's path and JSON body, answers 202.
struct Collector {
    port: u16,
    posts: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Collector {
    fn start() -> Collector {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let posts: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
        let p = posts.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut raw = Vec::new();
                let mut buf = [0u8; 65536];
                let (head_end, len) = loop {
                    let n = c.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break (0, 0);
                    }
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0usize);
                        break (i + 4, len);
                    }
                };
                while raw.len() < head_end + len {
                    let n = c.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let body =
                    serde_json::from_slice(&raw[head_end..]).unwrap_or(serde_json::Value::Null);
                p.lock().unwrap().push((path, body));
                let _ = c.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
            }
        });
        Collector { port, posts }
    }

    /// Zipkin spans and OTLP spans received so far.
    fn spans(&self) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
        let posts = self.posts.lock().unwrap();
        let mut zipkin = Vec::new();
        let mut otlp = Vec::new();
        for (path, body) in posts.iter() {
            if path == "/api/v2/spans" {
                zipkin.extend(body.as_array().cloned().unwrap_or_default());
            } else if path == "/v1/traces" {
                for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        otlp.extend(ss["spans"].as_array().cloned().unwrap_or_default());
                    }
                }
            }
        }
        (zipkin, otlp)
    }

    fn wait_for(&self, zipkin: usize) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (z, o) = self.spans();
            if (z.len() >= zipkin && o.len() >= zipkin) || Instant::now() > deadline {
                return (z, o);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn get(port: u16, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!("GET /t HTTP/1.1\r\nHost: reviews\r\n{headers}\r\n");
    let (status, _, body) = http_request(&mut s, req.as_bytes());
    (status, String::from_utf8_lossy(&body).to_ascii_lowercase())
}

/// The value of `name` in the echoed request head.
fn echoed<'a>(body: &'a str, name: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or("")
        .trim()
}

#[test]
fn contexts_propagate_and_spans_reach_zipkin_and_otlp() {
    let collector = Collector::start();
    let app = RecordingBackend::echo("app");
    let tracing = format!(
        "  telemetry:\n    tracing: {{ zipkin: {{ address: 127.0.0.1:{0} }}, otlp: {{ address: 127.0.0.1:{0} }}, sampling: 0 }}\n",
        collector.port
    );
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", &tracing, 2);

    // W3C from the caller, sampled: our span is its child, and the app's parent.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, body) = get(
        port,
        &format!(
            "traceparent: 00-{trace}-b7ad6b7169203331-01\r\ntracestate: congo=t61rcWkgMzE\r\n"
        ),
    );
    assert_eq!(status, 200);
    let tp = echoed(&body, "traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{body}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace, "01"));
    let our_span = parts[2].to_string();
    assert_ne!(our_span, "b7ad6b7169203331");
    assert_eq!(echoed(&body, "x-b3-traceid"), trace);
    assert_eq!(echoed(&body, "x-b3-spanid"), our_span);
    assert_eq!(echoed(&body, "x-b3-parentspanid"), "b7ad6b7169203331");
    assert_eq!(
        echoed(&body, "tracestate"),
        "congo=t61rcwkgmze",
        "tracestate passes"
    );

    // B3 multi from the caller, 64-bit trace id, sampled.
    let (status, body) = get(
        port,
        "x-b3-traceid: 463ac35c9f6413ad\r\nx-b3-spanid: a2fb4a1d1a96d312\r\nx-b3-sampled: 1\r\n",
    );
    assert_eq!(status, 200);
    assert_eq!(
        echoed(&body, "x-b3-traceid"),
        "0000000000000000463ac35c9f6413ad"
    );
    assert_eq!(echoed(&body, "x-b3-parentspanid"), "a2fb4a1d1a96d312");
    let b3_span = echoed(&body, "x-b3-spanid").to_string();

    // Not sampled by the caller (and sampling 0% here): propagated, not exported.
    let (_, body) = get(
        port,
        &format!("traceparent: 00-{}-b7ad6b7169203331-00\r\n", "1".repeat(32)),
    );
    assert!(echoed(&body, "traceparent").ends_with("-00"), "{body}");
    assert_eq!(echoed(&body, "x-b3-sampled"), "0");
    // No context, 0% sampling: a new trace, not sampled.
    let (_, body) = get(port, "");
    assert!(echoed(&body, "traceparent").ends_with("-00"), "{body}");

    let (zipkin, otlp) = collector.wait_for(2);
    assert_eq!(zipkin.len(), 2, "{zipkin:?}");
    assert_eq!(otlp.len(), 2, "{otlp:?}");
    let z = zipkin
        .iter()
        .find(|s| s["traceId"] == trace)
        .expect("the W3C trace");
    assert_eq!(z["id"], our_span.as_str());
    assert_eq!(z["parentId"], "b7ad6b7169203331");
    assert_eq!(z["kind"], "CLIENT", "an outbound listener's span");
    assert_eq!(z["tags"]["http.status_code"], "200");
    assert_eq!(z["tags"]["http.method"], "GET");
    assert!(z["tags"]["upstream_cluster"]
        .as_str()
        .unwrap()
        .starts_with("outbound|"));
    assert!(z["name"].as_str().unwrap().starts_with("reviews:"), "{z}");
    assert_eq!(z["localEndpoint"]["serviceName"], "test.default");
    let o = otlp
        .iter()
        .find(|s| s["traceId"] == trace)
        .expect("the W3C trace in OTLP");
    assert_eq!(o["spanId"], our_span.as_str());
    assert_eq!(o["parentSpanId"], "b7ad6b7169203331");
    assert_eq!(o["kind"], 3);
    let z = zipkin
        .iter()
        .find(|s| s["id"] == b3_span.as_str())
        .expect("the B3 trace");
    assert_eq!(z["parentId"], "a2fb4a1d1a96d312");
    let (_, prom) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert!(
        prom.contains("keel_tracing_spans_total{result=\"exported\"} 2"),
        "{prom}"
    );
}

#[test]
fn an_unreachable_collector_costs_a_counter() {
    let app = RecordingBackend::echo("app");
    let dead = free_port();
    let tracing = format!(
        "  telemetry:\n    tracing: {{ zipkin: {{ address: 127.0.0.1:{dead} }}, sampling: 100 }}\n"
    );
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", &tracing, 1);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, prom) = http_get(keel.admin, "/stats/prometheus").unwrap();
        if prom.contains("keel_tracing_spans_total{result=\"dropped\"} 20") {
            assert!(
                !prom.contains("keel_tracing_export_failures_total 0\n"),
                "{prom}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{prom}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
