//! Istio's standard metrics through the real binary, parsed by Prometheus' own Python parser
//! (`prometheus_client`) and checked against exactly the traffic sent.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The Debian python (the one with python3-prometheus-client), else whatever `python3` is.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Parses Prometheus text with `prometheus_client` and returns one JSON object per sample:
/// `{"name", "labels", "value"}`.
fn parse(text: &str) -> Vec<serde_json::Value> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (scripts/setup.sh installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "prometheus_client refused the output");
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn samples<'a>(
    all: &'a [serde_json::Value],
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a serde_json::Value> {
    all.iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .collect()
}

fn sum(all: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(all, name, labels)
        .iter()
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

/// Scrapes until `istio_requests_total` reaches `want` (series are published every 100 ms).
fn scrape(keel: &Keel, want: f64) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = http_get(keel.admin, "/stats/prometheus").unwrap();
        let all = parse(&text);
        if sum(&all, "istio_requests_total", &[]) >= want || std::time::Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn requests_codes_flags_and_bytes_match_the_traffic() {
    let app = RecordingBackend::start(std::sync::Arc::new(|head: &str, _body: &[u8]| {
        if head.starts_with("GET /missing") {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789".to_vec()
        }
    }));
    let (keel, port) = http_egress(&[(app.addr, "v1")], "", "", 2);
    for _ in 0..7 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (status, _, _) = http_request(
            &mut s,
            b"POST /ok HTTP/1.1\r\nHost: reviews\r\ncontent-length: 3\r\n\r\nabc",
        );
        assert_eq!(status, 200);
    }
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (status, _, _) =
            http_request(&mut s, b"GET /missing HTTP/1.1\r\nHost: reviews\r\n\r\n");
        assert_eq!(status, 404);
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(
        http_request(&mut s, b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n").0,
        502
    );
    let all = scrape(&keel, 11.0);
    let ok = [
        ("reporter", "source"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("source_workload", "test"),
        ("source_workload_namespace", "default"),
        ("source_app", "test"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "http"),
    ];
    assert_eq!(sum(&all, "istio_requests_total", &ok), 7.0);
    assert_eq!(
        sum(
            &all,
            "istio_requests_total",
            &[("response_code", "404"), ("response_flags", "-")]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &all,
            "istio_requests_total",
            &[("response_code", "502"), ("response_flags", "NR")]
        ),
        1.0
    );
    // Histograms: counts, sums of bytes, cumulative buckets.
    assert_eq!(
        sum(&all, "istio_request_duration_milliseconds_count", &ok),
        7.0
    );
    assert_eq!(sum(&all, "istio_request_bytes_sum", &ok), 21.0);
    assert_eq!(sum(&all, "istio_response_bytes_sum", &ok), 70.0);
    assert_eq!(
        sum(
            &all,
            "istio_response_bytes_bucket",
            &[("response_code", "200"), ("le", "10")]
        ),
        7.0
    );
    assert_eq!(
        sum(
            &all,
            "istio_response_bytes_bucket",
            &[("response_code", "200"), ("le", "1")]
        ),
        0.0
    );
    assert_eq!(
        sum(
            &all,
            "istio_request_duration_milliseconds_bucket",
            &[("response_code", "200"), ("le", "+Inf")]
        ),
        7.0
    );
    // /stats: request-duration percentiles per listener, from hdrhistogram, over both workers.
    let latency = &keel.stats()["listeners"][0]["request_duration_us"];
    assert_eq!(latency["count"], 11, "{latency}");
    let (p50, p99, max) = (
        latency["p50"].as_u64().unwrap(),
        latency["p99"].as_u64().unwrap(),
        latency["max"].as_u64().unwrap(),
    );
    assert!(
        p50 >= 1 && p50 <= p99 && p99 <= max && max < 5_000_000,
        "{latency}"
    );
}

#[test]
fn tcp_connections_and_bytes() {
    let (echo, _) = echo_backend();
    let admin = free_port();
    let port = free_port();
    let config = format!("{}{}", proxy_yaml(admin, 1), ingress_yaml(port, echo, ""));
    let keel = Keel::start(&config, admin, &[]);
    for msg in [&b"hello"[..], b"tcp metrics"] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        echo_round_trip(&mut s, msg);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut all;
    loop {
        let (_, text) = http_get(keel.admin, "/stats/prometheus").unwrap();
        all = parse(&text);
        if sum(&all, "istio_tcp_connections_closed_total", &[]) >= 2.0
            || std::time::Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let inbound = [
        ("reporter", "destination"),
        ("request_protocol", "tcp"),
        ("destination_workload", "test"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        sum(&all, "istio_tcp_connections_opened_total", &inbound),
        2.0
    );
    assert_eq!(
        sum(&all, "istio_tcp_connections_closed_total", &inbound),
        2.0
    );
    assert_eq!(sum(&all, "istio_tcp_received_bytes_total", &inbound), 16.0);
    assert_eq!(sum(&all, "istio_tcp_sent_bytes_total", &inbound), 16.0);
}

/// A selector in a dashboard expression: the metric, its matchers (label, op, value), and the
/// labels it is aggregated `by`.
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
    by: Vec<String>,
}

/// The selectors of a PromQL expression (the subset Istio's dashboards use: `name{k="v",...}`,
/// `=`, `!=`, `=~`, `!~`, `by (...)`).
fn selectors(expr: &str) -> Vec<Selector> {
    let by: Vec<String> = expr
        .split(" by (")
        .skip(1)
        .flat_map(|s| s.split(')').next().unwrap_or("").split(','))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && l != "le")
        .collect();
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &expr[start..i];
        let is_metric = word.starts_with("istio_") || word.starts_with("keel_");
        if is_metric {
            let mut matchers = Vec::new();
            if bytes.get(i) == Some(&b'{') {
                let end = expr[i..].find('}').map_or(expr.len(), |e| i + e);
                for m in expr[i + 1..end].split(',').filter(|m| !m.is_empty()) {
                    let op = ["=~", "!~", "!=", "="]
                        .into_iter()
                        .find(|op| m.contains(op))
                        .unwrap();
                    let (k, v) = m.split_once(op).unwrap();
                    matchers.push((
                        k.trim().into(),
                        op.into(),
                        v.trim().trim_matches('"').into(),
                    ));
                }
                i = end;
            }
            out.push(Selector {
                metric: word.to_string(),
                matchers,
                by: by.clone(),
            });
        }
        i += 1;
    }
    out
}

/// `=~` / `!~` for the patterns the dashboard uses: `.*` anything, `x.*` a prefix.
fn matches(op: &str, pattern: &str, value: &str) -> bool {
    let pattern = pattern.replace("$service", ".*").replace("$workload", ".*");
    let hit = match pattern.strip_suffix(".*") {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    };
    match op {
        "=" => value == pattern,
        "!=" => value != pattern,
        "=~" => hit,
        _ => !hit,
    }
}

/// The Grafana dashboard in docs/grafana (Istio's dashboards' queries and Keel's own) selects
/// series that exist in Keel's output: every metric, label matcher and `by` label of every panel.
#[test]
fn grafana_dashboard_queries_match_the_output() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../docs/grafana/keel-dashboard.json")).unwrap();
    let app = RecordingBackend::echo("app");
    let (echo, _) = echo_backend();
    let (admin, http, tcp, inbound) = (free_port(), free_port(), free_port(), free_port());
    let config = proxy_yaml(admin, 1)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  ingress:
  - port: {{ number: {inbound}, protocol: HTTP, name: http }}
    bind: 127.0.0.1
    defaultEndpoint: {}
  egress:
  - port: {{ number: {http}, protocol: HTTP }}
    hosts: [\"./*\"]
  - port: {{ number: {tcp}, protocol: TCP }}
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  ports: [{{ number: {http}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ http: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: db }}
spec:
  hosts: [db.example.com]
  ports: [{{ number: {tcp}, name: tcp, protocol: TCP }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ tcp: {} }} }}]
",
            app.addr,
            app.addr.port(),
            echo.port()
        );
    let keel = Keel::start(&config, admin, &[]);
    for port in [http, inbound] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(
            http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n").0,
            200
        );
    }
    let mut s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    echo_round_trip(&mut s, b"ping");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let all = scrape(&keel, 2.0);
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let sels = selectors(expr);
            assert!(!sels.is_empty(), "no metric in {expr}");
            for sel in sels {
                let samples: Vec<&serde_json::Value> = all
                    .iter()
                    .filter(|s| {
                        let name = s["name"].as_str().unwrap_or("");
                        name == sel.metric
                    })
                    .collect();
                assert!(
                    !samples.is_empty(),
                    "{}: not in the output ({expr})",
                    sel.metric
                );
                let hit = samples.iter().any(|s| {
                    let label = |k: &str| s["labels"][k].as_str().map(str::to_string);
                    sel.matchers
                        .iter()
                        .all(|(k, op, v)| label(k).is_some_and(|value| matches(op, v, &value)))
                        && sel.by.iter().all(|l| label(l).is_some())
                });
                assert!(hit, "no {} series matches {expr}", sel.metric);
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked}");
    // Envoy-style per-cluster counts by class: one 2xx for each HTTP cluster used.
    let stats = keel.stats();
    let clusters = stats["clusters"].as_array().unwrap();
    let reviews = clusters
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .ends_with("|reviews.default.svc.cluster.local")
        })
        .unwrap();
    assert_eq!(reviews["upstream_rq_total"], 1, "{reviews}");
    assert_eq!(reviews["upstream_rq_2xx"], 1);
    assert_eq!(reviews["upstream_rq_5xx"], 0);
}
