//! Resilience and traffic policy through the real binary: circuit breakers, fault injection,
//! retries, timeouts, retry budget and mirroring, against real backends on loopback.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A backend answering every request with `status` after `delay`, counting requests.
fn backend(
    status: impl Fn(usize) -> (u16, Duration) + Send + Sync + 'static,
) -> (RecordingBackend, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let b = RecordingBackend::start(Arc::new(move |_head: &str, body: &[u8]| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let (code, delay) = status(n);
        std::thread::sleep(delay);
        let text = format!("request {n} body {}", String::from_utf8_lossy(body));
        format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        )
        .into_bytes()
    }));
    (b, count)
}

fn get(port: u16, headers: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_request(
        &mut s,
        format!("GET / HTTP/1.1\r\nHost: reviews\r\n{headers}\r\n").as_bytes(),
    )
}

fn vs(http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http:
{http}"
    )
}

/// A cluster's counters from `/stats`, by a part of its name.
fn cluster_stat(keel: &Keel, name: &str, field: &str) -> u64 {
    let stats = keel.stats();
    let clusters = stats["clusters"].as_array().unwrap();
    let c = clusters
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains(name))
        .unwrap_or_else(|| panic!("no cluster {name} in {clusters:?}"));
    c[field].as_u64().unwrap_or_else(|| panic!("no {field}"))
}

/// How many requests of the (first) listener carried response flag `flag`.
fn flagged(keel: &Keel, flag: &str) -> u64 {
    keel.stats()["listeners"][0]["response_flags"][flag]
        .as_u64()
        .unwrap_or_else(|| panic!("no flag {flag}"))
}

/// Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests 1,
/// maxRequestsPerConnection 1, three concurrent clients × 30 requests.
#[test]
fn circuit_breaker_overflows_with_503_and_overload_header() {
    let (b, _) = backend(|_| (200, Duration::from_millis(15)));
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";
    let (keel, port) = http_egress(&[(b.addr, "v1")], dr, "", 2);
    let clients: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut ok, mut overflow) = (0, 0);
                for _ in 0..30 {
                    let (status, head, _) =
                        http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
                    match status {
                        200 => ok += 1,
                        503 => {
                            assert!(head.contains("x-keel-overloaded: true"), "{head}");
                            overflow += 1;
                        }
                        other => panic!("unexpected {other}: {head}"),
                    }
                }
                (ok, overflow)
            })
        })
        .collect();
    let (ok, overflow) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(ok + overflow, 90);
    assert!(ok > 0 && overflow > 0, "ok {ok}, overflow {overflow}");
    assert_eq!(
        cluster_stat(&keel, "reviews", "upstream_rq_pending_overflow"),
        overflow
    );
    assert_eq!(flagged(&keel, "UO"), overflow);
    // maxRequestsPerConnection 1: every request had its own upstream connection, never two open.
    assert_eq!(b.connections.load(Ordering::SeqCst) as u64, ok);
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_cx_open"), 0);
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_rq_active"), 0);
}

#[test]
fn http2_max_requests_refuses_at_once() {
    let (b, _) = backend(|_| (200, Duration::from_millis(300)));
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy: { connectionPool: { http: { http2MaxRequests: 2 } } }
";
    let (keel, port) = http_egress(&[(b.addr, "v1")], dr, "", 1);
    let started = Instant::now();
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || get(port, "").0))
        .collect();
    let mut statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503]);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_rq_overflow"), 3);
}

/// The fault-injection task's delay, on a share of the traffic: a timer, so the delayed
/// requests overlap and the others are not held up.
#[test]
fn fault_delay_on_a_share_of_requests() {
    let (b, _) = backend(|_| (200, Duration::ZERO));
    let route = vs("  - fault:
      delay:
        percentage: { value: 50 }
        fixedDelay: 5s
    route: [{ destination: { host: reviews } }]
");
    let (keel, port) = http_egress(&[(b.addr, "v1")], &route, "", 1);
    let started = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                assert_eq!(get(port, "").0, 200);
                t.elapsed()
            })
        })
        .collect();
    let took: Vec<Duration> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let delayed = took
        .iter()
        .filter(|d| **d >= Duration::from_secs(5))
        .count();
    let quick = took.iter().filter(|d| **d < Duration::from_secs(1)).count();
    assert_eq!(delayed + quick, 20, "{took:?}");
    assert!((3..=17).contains(&delayed), "{delayed} of 20 delayed");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(keel.listener_stat("fault_delays"), delayed as u64);
    assert_eq!(flagged(&keel, "DI"), delayed as u64);
}

/// The fault-injection task's abort (HTTP 400 on a share), and a gRPC abort.
#[test]
fn fault_abort_http_and_grpc() {
    let (b, count) = backend(|_| (200, Duration::ZERO));
    let route = vs(
        "  - match: [{ headers: { content-type: { prefix: application/grpc } } }]
    fault: { abort: { grpcStatus: UNAVAILABLE, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews } }]
  - fault:
      abort:
        percentage: { value: 50 }
        httpStatus: 400
    route: [{ destination: { host: reviews } }]
",
    );
    let (keel, port) = http_egress(&[(b.addr, "v1")], &route, "", 1);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut aborted = 0;
    for _ in 0..1000 {
        let (status, _, body) = http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
        match status {
            400 => {
                assert_eq!(body, b"fault filter abort");
                aborted += 1;
            }
            200 => {}
            other => panic!("{other}"),
        }
    }
    assert!((420..=580).contains(&aborted), "{aborted} of 1000 aborted");
    assert_eq!(count.load(Ordering::SeqCst), 1000 - aborted);
    assert_eq!(keel.listener_stat("fault_aborts"), aborted as u64);
    assert_eq!(flagged(&keel, "FI"), aborted as u64);
    let (status, head, _) = get(port, "content-type: application/grpc\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("grpc-status: 14"), "{head}");
    assert!(head.contains("content-type: application/grpc"), "{head}");
}

/// A backend that fails every other request: retries turn it into all 200s, request bodies
/// included; without a matching retryOn the failures come through.
#[test]
fn retries_turn_a_flaky_backend_into_all_200() {
    let (b, count) = backend(|n| (if n % 2 == 0 { 500 } else { 200 }, Duration::ZERO));
    let route = vs("  - match: [{ uri: { prefix: /noretry } }]
    route: [{ destination: { host: reviews } }]
  - retries: { attempts: 3, retryOn: 5xx }
    route: [{ destination: { host: reviews } }]
");
    let (keel, port) = http_egress(&[(b.addr, "v1")], &route, "", 1);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for i in 0..40 {
        let req = format!(
            "POST /r HTTP/1.1\r\nHost: reviews\r\ncontent-length: 7\r\n\r\nbody-{:02}",
            i
        );
        let (status, _, body) = http_request(&mut s, req.as_bytes());
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        assert!(text.ends_with(&format!("body body-{i:02}")), "{text}");
    }
    // Chunked too: the body as sent (framing and all) is replayed.
    let (status, _, body) = http_request(
        &mut s,
        b"POST /r HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).ends_with("body hello"));
    assert_eq!(count.load(Ordering::SeqCst), 82);
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_rq_retry"), 41);
    assert_eq!(
        cluster_stat(&keel, "reviews", "upstream_rq_retry_success"),
        41
    );
    // Istio's default policy retries 503 only: a 500 comes through.
    let statuses: Vec<u16> = (0..4).map(|_| get_path(port, "/noretry")).collect();
    assert!(statuses.contains(&500), "{statuses:?}");
}

fn get_path(port: u16, path: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_request(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: reviews\r\n\r\n").as_bytes(),
    )
    .0
}

/// Retries go to another endpoint than the one that failed.
#[test]
fn retry_goes_to_another_host() {
    let (bad, bad_count) = backend(|_| (503, Duration::ZERO));
    let (good, _) = backend(|_| (200, Duration::ZERO));
    let random = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy: { loadBalancer: { simple: RANDOM } }
";
    let (keel, port) = http_egress(&[(bad.addr, "v1"), (good.addr, "v2")], random, "", 1);
    for _ in 0..40 {
        assert_eq!(get(port, "").0, 200, "Istio's default policy retries a 503");
    }
    // Random picks send about half the first tries to the bad host, and no retry.
    let bad = bad_count.load(Ordering::SeqCst) as u64;
    assert!(bad > 0 && bad < 40, "{bad}");
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_rq_retry"), bad);
}

/// perTryTimeout cuts a slow try and retries; the route timeout answers 504 on time.
#[test]
fn per_try_timeout_and_route_timeout() {
    let (b, _) = backend(|n| {
        let slow = n % 2 == 0;
        (200, Duration::from_millis(if slow { 1500 } else { 0 }))
    });
    let route = vs("  - match: [{ uri: { prefix: /slow } }]
    timeout: 300ms
    retries: { attempts: 0 }
    route: [{ destination: { host: reviews } }]
  - retries: { attempts: 2, perTryTimeout: 200ms, retryOn: 5xx }
    route: [{ destination: { host: reviews } }]
");
    let (keel, port) = http_egress(&[(b.addr, "v1")], &route, "", 1);
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(get(port, "").0, 200);
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
    }
    assert!(cluster_stat(&keel, "reviews", "upstream_rq_per_try_timeout") >= 1);
    // The next request the backend sees is a slow one (it alternates); and then it is one that
    // needs the retry to be slow too: the route timeout answers first.
    let mut saw_timeout = false;
    for _ in 0..2 {
        let t = Instant::now();
        let (status, _, body) = {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            http_request(&mut s, b"GET /slow HTTP/1.1\r\nHost: reviews\r\n\r\n")
        };
        if status == 504 {
            assert_eq!(body, b"upstream request timeout");
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(290) && took < Duration::from_millis(1000),
                "{took:?}"
            );
            saw_timeout = true;
        }
    }
    assert!(saw_timeout);
    assert!(cluster_stat(&keel, "reviews", "upstream_rq_timeout") >= 1);
    assert!(flagged(&keel, "UT") >= 1);
    // A gRPC client is told DEADLINE_EXCEEDED.
    let mut grpc_timeout = false;
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (status, head, _) = http_request(
            &mut s,
            b"POST /slow HTTP/1.1\r\nHost: reviews\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\n\r\n",
        );
        if head.contains("grpc-status: 4") {
            assert_eq!(status, 200);
            grpc_timeout = true;
        }
    }
    assert!(grpc_timeout);
}

/// A backend that always fails, many clients at once: the retry budget (20% of active requests,
/// at least 3) caps the retries in flight, and `maxRetries` caps them harder.
#[test]
fn retry_budget_stops_a_storm() {
    let (b, count) = backend(|_| (503, Duration::from_millis(100)));
    let route = vs("  - retries: { attempts: 5, retryOn: 5xx }
    route: [{ destination: { host: reviews } }]
");
    let (keel, port) = http_egress(&[(b.addr, "v1")], &route, "", 1);
    let clients: Vec<_> = (0..30)
        .map(|_| std::thread::spawn(move || get(port, "").0))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), 503);
    }
    let sent = count.load(Ordering::SeqCst);
    // Without a budget: 30 × 6 = 180 tries.
    assert!(sent < 120, "{sent} tries reached the backend");
    assert!(cluster_stat(&keel, "reviews", "upstream_rq_retry_overflow") > 0);
    // Requests that used all 5 retries (if any did) end with URX; none of them came back 200.
    assert_eq!(
        flagged(&keel, "URX"),
        cluster_stat(&keel, "reviews", "upstream_rq_retry_limit_exceeded")
    );
    assert_eq!(
        cluster_stat(&keel, "reviews", "upstream_rq_retry_active"),
        0
    );
}

/// Mirroring: copies go to the mirror with `-shadow` hosts and bodies; a dead or silent mirror
/// neither fails nor slows the primary.
#[test]
fn mirroring_copies_and_a_bad_mirror_does_not_hurt() {
    let primary = RecordingBackend::echo("primary");
    let mirror = RecordingBackend::echo("mirror");
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let services = format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: mirrors }}
spec:
  hosts: [mirror, silent, dead]
  ports: [{{ number: 1, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints:
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, labels: {{ role: mirror }} }}
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, labels: {{ role: silent }} }}
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, labels: {{ role: dead }} }}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: mirrors }}
spec:
  host: mirror
  subsets:
  - {{ name: up, labels: {{ role: mirror }} }}
  - {{ name: silent, labels: {{ role: silent }} }}
  - {{ name: dead, labels: {{ role: dead }} }}
",
        mirror.addr.port(),
        silent_addr.port(),
        dead.port()
    );
    let route = vs("  - match: [{ uri: { prefix: /bad } }]
    mirrors:
    - { destination: { host: mirror, subset: silent, port: { number: 1 } } }
    - { destination: { host: mirror, subset: dead, port: { number: 1 } } }
    route: [{ destination: { host: reviews } }]
  - mirror: { host: mirror, subset: up, port: { number: 1 } }
    mirrorPercentage: { value: 100 }
    route: [{ destination: { host: reviews } }]
");
    let (keel, port) = http_egress(
        &[(primary.addr, "v1")],
        &format!("{services}{route}"),
        "",
        1,
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, _, body) = http_request(
        &mut s,
        b"POST /copy HTTP/1.1\r\nHost: reviews\r\ncontent-length: 5\r\n\r\nhello",
    );
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).ends_with("hello"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mirror.received_text().contains("hello") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = mirror.received_text();
    assert!(seen.contains("host: reviews-shadow"), "{seen}");
    assert!(
        seen.starts_with("POST /copy HTTP/1.1") && seen.ends_with("hello"),
        "{seen}"
    );

    // Under load, with one mirror that never answers and one that is down.
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                for _ in 0..100 {
                    let (status, _, _) =
                        http_request(&mut s, b"GET /bad HTTP/1.1\r\nHost: reviews\r\n\r\n");
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cluster_stat(&keel, "|silent|", "mirror_requests"), 400);
    assert_eq!(cluster_stat(&keel, "|dead|", "mirror_requests"), 400);
    drop(silent);
}

/// Outlier detection and retries together: the failing endpoint is ejected after its first 5xx,
/// the retry goes to the healthy one, and every client request succeeds.
#[test]
fn outlier_detection_and_retries_together() {
    let (bad, bad_count) = backend(|_| (503, Duration::ZERO));
    let (good, _) = backend(|_| (200, Duration::ZERO));
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";
    let (keel, port) = http_egress(&[(bad.addr, "v1"), (good.addr, "v2")], dr, "", 2);
    for _ in 0..30 {
        assert_eq!(get(port, "").0, 200);
    }
    // Ejected on every worker at once: one 503 reached the client-facing retry, no more.
    assert_eq!(bad_count.load(Ordering::SeqCst), 1);
    assert_eq!(cluster_stat(&keel, "reviews", "outlier_ejections"), 1);
    assert_eq!(cluster_stat(&keel, "reviews", "outlier_ejected_active"), 1);
    let (_, metrics) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert!(
        metrics.contains("keel_cluster_outlier_ejected{cluster=\"outbound|"),
        "{metrics}"
    );
}

/// `maxConnections` holds for TCP proxying too: a connection over it is closed at once, and a
/// slot freed by a closed connection serves the next.
#[test]
fn tcp_max_connections() {
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let endpoint = format!(
        "  - {{ address: 127.0.0.1, ports: {{ tcp: {} }} }}\n",
        echo.port()
    );
    let config = format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: svc }}
spec:
  host: svc
  trafficPolicy: {{ connectionPool: {{ tcp: {{ maxConnections: 1 }} }} }}
",
        proxy_yaml(admin, 2),
        egress_service(port, "TCP", "svc", "{ name: svc }", &endpoint),
    );
    let keel = Keel::start(&config, admin, &[]);
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo_round_trip(&mut first, b"one");
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(read_all(&mut second).is_empty(), "closed at once");
    assert_eq!(cluster_stat(&keel, "svc", "upstream_cx_overflow"), 1);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster_stat(&keel, "svc", "upstream_cx_open") != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo_round_trip(&mut third, b"three");
}

/// An endpoint answering 5xx is ejected (on every worker; `/clusters` shows it) and comes back
/// after `baseEjectionTime`.
#[test]
fn ejected_endpoint_comes_back_after_base_ejection_time() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let (a, a_count) = backend(move |_| {
        let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
        (status, Duration::ZERO)
    });
    let (b, _) = backend(|_| (200, Duration::ZERO));
    let config = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: { consecutive5xxErrors: 1, baseEjectionTime: 1s, maxEjectionPercent: 50 }
";
    let (keel, port) = http_egress(&[(a.addr, "v1"), (b.addr, "v2")], config, "", 2);
    let statuses: Vec<u16> = (0..10).map(|_| get(port, "").0).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(a_count.load(Ordering::SeqCst), 1);
    let (_, clusters) = http_get(keel.admin, "/clusters?format=json").unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let eps = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains("reviews"))
        .unwrap()["endpoints"]
        .clone();
    let ejected: Vec<bool> = eps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ejected"].as_bool().unwrap())
        .collect();
    assert_eq!(ejected, vec![true, false], "{eps}");
    let (_, text) = http_get(keel.admin, "/clusters").unwrap();
    assert!(
        text.contains(&format!(
            "::{}::health_flags::/failed_outlier_check",
            a.addr
        )),
        "{text}"
    );
    failing.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..10 {
        assert_eq!(get(port, "").0, 200);
    }
    assert!(a_count.load(Ordering::SeqCst) > 1, "back in rotation");
}

/// A body over `maxRequestBufferBytes` streams through once and is not replayed; a small one is.
/// `connectionPool.http.idleTimeout` closes idle upstream connections.
#[test]
fn large_bodies_are_not_retried_and_idle_upstreams_close() {
    // Fails the 1st and the 3rd request it sees.
    let (b, count) = backend(|n| (if n == 0 || n == 2 { 503 } else { 200 }, Duration::ZERO));
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy: { connectionPool: { http: { idleTimeout: 200ms } } }
";
    let (keel, port) = http_egress(
        &[(b.addr, "v1")],
        dr,
        "  http: { maxRequestBufferBytes: 1024 }\n",
        1,
    );
    let big = "x".repeat(4096);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nHost: reviews\r\ncontent-length: {}\r\n\r\n{big}",
        big.len()
    );
    assert_eq!(http_request(&mut s, req.as_bytes()).0, 503, "not replayed");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let small = "POST / HTTP/1.1\r\nHost: reviews\r\ncontent-length: 5\r\n\r\nsmall";
    // The second request succeeds at once, the third is replayed after its 503.
    assert_eq!(http_request(&mut s, small.as_bytes()).0, 200);
    assert_eq!(http_request(&mut s, small.as_bytes()).0, 200);
    assert_eq!(cluster_stat(&keel, "reviews", "upstream_rq_retry"), 1);
    let before = b.connections.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(http_request(&mut s, small.as_bytes()).0, 200);
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        before + 1,
        "the pooled connection idled out"
    );
}

/// Active health checks (ServiceEntry annotations): an endpoint failing its HTTP check leaves
/// the rotation on every worker and comes back once it passes; a dead one fails its check too.
#[test]
fn active_health_checks_take_endpoints_out_and_back() {
    let sick = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s2 = sick.clone();
    let a_count = Arc::new(AtomicUsize::new(0));
    let a_seen = a_count.clone();
    let a = RecordingBackend::start(Arc::new(move |head: &str, _: &[u8]| {
        if head.starts_with("GET /health") {
            let code = if s2.load(Ordering::SeqCst) { 503 } else { 200 };
            return format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").into_bytes();
        }
        a_seen.fetch_add(1, Ordering::SeqCst);
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na".to_vec()
    }));
    let b = RecordingBackend::echo("b");
    let (admin, port) = (free_port(), free_port());
    let metadata = "
  name: reviews
  annotations:
    health.keel.dev/path: /health
    health.keel.dev/interval: 100ms
    health.keel.dev/timeout: 100ms
    health.keel.dev/unhealthy-threshold: \"2\"
    health.keel.dev/healthy-threshold: \"1\"";
    let endpoints: String = [a.addr, b.addr]
        .iter()
        .map(|e| {
            format!(
                "  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}\n",
                e.port()
            )
        })
        .collect();
    let config = format!(
        "{}{}",
        proxy_yaml(admin, 2),
        egress_service(port, "HTTP", "reviews", metadata, &endpoints)
    );
    let keel = Keel::start(&config, admin, &[]);
    let unhealthy = || cluster_stat(&keel, "reviews", "health_check_unhealthy");
    let deadline = Instant::now() + Duration::from_secs(5);
    while unhealthy() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(unhealthy(), 1);
    let before = a_count.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(
        a_count.load(Ordering::SeqCst),
        before,
        "no traffic to the unhealthy endpoint"
    );
    let (_, text) = http_get(keel.admin, "/clusters").unwrap();
    assert!(
        text.contains(&format!("::{}::health_flags::/failed_active_hc", a.addr)),
        "{text}"
    );
    sick.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while unhealthy() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(unhealthy(), 0);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    assert!(a_count.load(Ordering::SeqCst) > before, "back in rotation");
}

/// Keel's PEAK_EWMA balancer (DestinationRule annotation) sends most requests to the faster
/// endpoint once it has seen both.
#[test]
fn peak_ewma_prefers_the_faster_endpoint() {
    let (slow, slow_count) = backend(|_| (200, Duration::from_millis(60)));
    let (fast, fast_count) = backend(|_| (200, Duration::ZERO));
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  annotations: { keel.dev/load-balancer: PEAK_EWMA }
spec:
  host: reviews
";
    let (_keel, port) = http_egress(&[(slow.addr, "v1"), (fast.addr, "v2")], dr, "", 1);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for _ in 0..40 {
        let (status, _, _) = http_request(&mut s, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n");
        assert_eq!(status, 200);
    }
    let (slow_n, fast_n) = (
        slow_count.load(Ordering::SeqCst),
        fast_count.load(Ordering::SeqCst),
    );
    assert!(fast_n >= 34, "slow {slow_n}, fast {fast_n}");
}

/// A gRPC client's `grpc-timeout` is honoured as the request's deadline (as Istio has Envoy do).
#[test]
fn grpc_timeout_header_is_a_deadline() {
    let (b, _) = backend(|_| (200, Duration::from_millis(1500)));
    let (_keel, port) = http_egress(&[(b.addr, "v1")], "", "", 1);
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, head, _) = http_request(
        &mut s,
        b"POST /svc/Method HTTP/1.1\r\nHost: reviews\r\ncontent-type: application/grpc\r\ngrpc-timeout: 200m\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
}

/// Locality-prioritized balancing (with outlier detection, as Istio): requests stay in this
/// proxy's zone while it has healthy endpoints, and fail over to another region when it has none.
#[test]
fn locality_failover() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = failing.clone();
    let (local, local_count) = backend(move |_| {
        let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
        (status, Duration::ZERO)
    });
    let (remote, remote_count) = backend(|_| (200, Duration::ZERO));
    let (admin, port) = (free_port(), free_port());
    let endpoints = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http: {} }}, locality: us-east/zone-a }}
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, locality: us-west/zone-b }}
",
        local.addr.port(),
        remote.addr.port()
    );
    let config = |enabled: bool| {
        format!(
            "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: test, namespace: default }}
spec:
  workload: {{ labels: {{ app: test }}, locality: us-east/zone-a }}
  workers: 2
  admin: {{ address: 127.0.0.1:{admin} }}
{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {{ localityLbSetting: {{ enabled: {enabled} }} }}
    outlierDetection: {{ consecutive5xxErrors: 1, baseEjectionTime: 1m, maxEjectionPercent: 100 }}
",
            egress_service(port, "HTTP", "reviews", "{ name: reviews }", &endpoints)
        )
    };
    let keel = Keel::start(&config(true), admin, &[]);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(
        local_count.load(Ordering::SeqCst),
        20,
        "all in the local zone"
    );
    assert_eq!(remote_count.load(Ordering::SeqCst), 0);
    failing.store(true, Ordering::SeqCst);
    // The first 500 ejects the local endpoint (the default retry policy does not retry a 500).
    assert_eq!(get(port, "").0, 500);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(remote_count.load(Ordering::SeqCst), 20, "failed over");
    // Turned off, the localities share the traffic (new config: the local endpoint is still
    // ejected by the shared record, so heal it first).
    failing.store(false, Ordering::SeqCst);
    drop(keel);
    let keel = Keel::start(&config(false), admin, &[]);
    let before = (
        local_count.load(Ordering::SeqCst),
        remote_count.load(Ordering::SeqCst),
    );
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    let local_n = local_count.load(Ordering::SeqCst) - before.0;
    let remote_n = remote_count.load(Ordering::SeqCst) - before.1;
    assert!(
        local_n > 0 && remote_n > 0,
        "local {local_n}, remote {remote_n}"
    );
    drop(keel);
}

/// `localityLbSetting.failover` sends a failed region's traffic to the region it names, before
/// any other; `distribute` splits traffic by locality shares, leaving unlisted localities out.
#[test]
fn locality_failover_target_and_distribute() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = failing.clone();
    let (local, local_count) = backend(move |_| {
        let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
        (status, Duration::ZERO)
    });
    let (eu, eu_count) = backend(|_| (200, Duration::ZERO));
    let (ap, ap_count) = backend(|_| (200, Duration::ZERO));
    let (admin, port) = (free_port(), free_port());
    let endpoints = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http: {} }}, locality: us-east/zone-a }}
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, locality: eu-west/zone-b }}
  - {{ address: 127.0.0.1, ports: {{ http: {} }}, locality: ap-south/zone-c }}
",
        local.addr.port(),
        eu.addr.port(),
        ap.addr.port()
    );
    let config = |setting: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: test, namespace: default }}
spec:
  workload: {{ labels: {{ app: test }}, locality: us-east/zone-a }}
  workers: 2
  admin: {{ address: 127.0.0.1:{admin} }}
{}{}",
            egress_service(port, "HTTP", "reviews", "{ name: reviews }", &endpoints),
            reviews_rule(&format!("    loadBalancer: {{ localityLbSetting: {setting} }}\n    outlierDetection: {{ consecutive5xxErrors: 1, baseEjectionTime: 1m, maxEjectionPercent: 100 }}\n"))
        )
    };
    let keel = Keel::start(
        &config("{ failover: [{ from: us-east, to: ap-south }] }"),
        admin,
        &[],
    );
    for _ in 0..10 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(local_count.load(Ordering::SeqCst), 10);
    failing.store(true, Ordering::SeqCst);
    assert_eq!(get(port, "").0, 500);
    for _ in 0..20 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(
        ap_count.load(Ordering::SeqCst),
        20,
        "to the failover region"
    );
    assert_eq!(eu_count.load(Ordering::SeqCst), 0, "not to another region");
    drop(keel);

    // distribute: 80% stays in the zone, 20% goes to eu-west, ap-south gets none.
    failing.store(false, Ordering::SeqCst);
    let keel = Keel::start(
        &config("{ distribute: [{ from: \"us-east/zone-a/*\", to: { \"us-east/zone-a/*\": 80, \"eu-west/*\": 20 } }] }"),
        admin,
        &[],
    );
    let before = [&local_count, &eu_count, &ap_count].map(|c| c.load(Ordering::SeqCst));
    for _ in 0..1000 {
        assert_eq!(get(port, "").0, 200);
    }
    let got: Vec<usize> = [&local_count, &eu_count, &ap_count]
        .iter()
        .zip(before)
        .map(|(c, b)| c.load(Ordering::SeqCst) - b)
        .collect();
    assert!((720..=880).contains(&got[0]), "{got:?}");
    assert!((120..=280).contains(&got[1]), "{got:?}");
    assert_eq!(got[2], 0, "{got:?}");
    drop(keel);
}

/// `warmupDurationSecs`: an endpoint that joins a serving cluster (here by a reload) starts with a
/// small share of its weight and reaches its full share by the end of the window.
#[test]
fn warmup_ramps_a_new_endpoint_up() {
    let (a, a_count) = backend(|_| (200, Duration::ZERO));
    let (b, b_count) = backend(|_| (200, Duration::ZERO));
    let (admin, port) = (free_port(), free_port());
    let config = |eps: &[u16]| {
        let endpoints: String = eps
            .iter()
            .map(|p| format!("  - {{ address: 127.0.0.1, ports: {{ http: {p} }} }}\n"))
            .collect();
        proxy_yaml(admin, 1)
            + &egress_service(port, "HTTP", "reviews", "{ name: reviews }", &endpoints)
            + &reviews_rule("    loadBalancer: { simple: ROUND_ROBIN, warmupDurationSecs: 3s }\n")
    };
    let keel = Keel::start(&config(&[a.addr.port()]), admin, &[]);
    for _ in 0..10 {
        assert_eq!(get(port, "").0, 200);
    }
    assert_eq!(
        a_count.load(Ordering::SeqCst),
        10,
        "the first endpoints do not warm up"
    );
    keel.write_config(&config(&[a.addr.port(), b.addr.port()]));
    keel.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while keel.stats()["config_reloads"]["success"].as_u64() != Some(1) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let share = |n: usize| {
        let (a0, b0) = (
            a_count.load(Ordering::SeqCst),
            b_count.load(Ordering::SeqCst),
        );
        for _ in 0..n {
            assert_eq!(get(port, "").0, 200);
        }
        let (da, db) = (
            a_count.load(Ordering::SeqCst) - a0,
            b_count.load(Ordering::SeqCst) - b0,
        );
        db as f64 / (da + db) as f64
    };
    let early = share(200);
    assert!(
        early < 0.3,
        "new endpoint's share right after joining: {early}"
    );
    std::thread::sleep(Duration::from_millis(3_200));
    let late = share(400);
    assert!((0.4..=0.6).contains(&late), "after the window: {late}");
}

/// `loadBalancer.simple: PASSTHROUGH`: an HTTP request goes to the address its authority names
/// (no balancing over the ServiceEntry's endpoints); a TCP port cannot know it and is refused.
#[test]
fn passthrough_load_balancer_forwards_to_the_authority() {
    let (listed, listed_count) = backend(|_| (200, Duration::ZERO));
    let (admin, port) = (free_port(), free_port());
    // The address the requests name: another loopback IP, on the listener's own port.
    let named_count = Arc::new(AtomicUsize::new(0));
    let seen = named_count.clone();
    let _named = RecordingBackend::start_on(
        &format!("127.0.0.2:{port}"),
        Arc::new(move |_: &str, _: &[u8]| {
            seen.fetch_add(1, Ordering::SeqCst);
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()
        }),
    );
    let endpoints = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}\n",
        listed.addr.port()
    );
    let config = proxy_yaml(admin, 1)
        + &egress_service(
            port,
            "HTTP",
            "direct.example.test",
            "{ name: direct }",
            &endpoints,
        )
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: named }}
spec:
  hosts: [\"127.0.0.2\"]
  ports: [{{ number: {port}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: named }}
spec:
  host: \"127.0.0.2\"
  trafficPolicy:
    loadBalancer: {{ simple: PASSTHROUGH }}
"
        );
    let keel = Keel::start(&config, admin, &[]);
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let req = b"GET / HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n";
        assert_eq!(http_request(&mut s, req).0, 200);
    }
    assert_eq!(named_count.load(Ordering::SeqCst), 3);
    assert_eq!(
        listed_count.load(Ordering::SeqCst),
        0,
        "the listed endpoint is not used"
    );
    // The registry's other hosts still balance over their endpoints.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: direct.example.test\r\n\r\n";
    assert_eq!(http_request(&mut s, req).0, 200);
    assert_eq!(listed_count.load(Ordering::SeqCst), 1);
    drop(keel);

    let dir = temp_dir("passthrough-tcp");
    let file = dir.join("keel.yaml");
    let tcp_endpoints = endpoints.replace("http", "tcp");
    let tcp = proxy_yaml(free_port(), 1)
        + &egress_service(
            free_port(),
            "TCP",
            "db.example.com",
            "{ name: db }",
            &tcp_endpoints,
        )
        + "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db }
spec:
  host: db.example.com
  trafficPolicy:
    loadBalancer: { simple: PASSTHROUGH }
";
    std::fs::write(&file, tcp).unwrap();
    let (ok, out) = validate(&file);
    assert!(!ok);
    assert!(
        out.contains(
            "PASSTHROUGH for `db.example.com` on a TCP port needs the original destination"
        ),
        "{out}"
    );
}
