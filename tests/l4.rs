//! L4 proxying through the real binary: data integrity, half-close, failures, timeouts, workers, drain.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;

fn ingress_keel(upstream: SocketAddr, tcp: &str, workers: usize, driver: &str) -> (Keel, u16) {
    ingress_keel_with(upstream, tcp, workers, &["--io-driver", driver])
}

fn ingress_keel_with(
    upstream: SocketAddr,
    tcp: &str,
    workers: usize,
    args: &[&str],
) -> (Keel, u16) {
    let (admin, port) = (free_port(), free_port());
    let config = format!(
        "{}{}",
        proxy_yaml(admin, workers),
        ingress_yaml(port, upstream, tcp)
    );
    (Keel::start(&config, admin, args), port)
}

/// Every io driver × forwarding mechanism.
const MODES: [(&str, &str); 4] = [
    ("uring", "splice"),
    ("uring", "copy"),
    ("epoll", "splice"),
    ("epoll", "copy"),
];

/// 64 MiB each way at once, checked byte for byte on both ends, on each io driver and forwarding.
fn forwards_64_mib_both_ways(driver: &str, forwarding: &str) {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = backend.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = backend.accept().unwrap();
        let mut reader = conn.try_clone().unwrap();
        let check = std::thread::spawn(move || expect_pattern(&mut reader, 1, 64 * MIB));
        let mut writer = conn;
        send_pattern(&mut writer, 2, 64 * MIB);
        writer.shutdown(Shutdown::Write).unwrap();
        check.join().unwrap();
    });
    let (keel, port) = ingress_keel_with(
        upstream,
        "connectTimeout: 1s",
        1,
        &["--io-driver", driver, "--forwarding", forwarding],
    );
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut reader = client.try_clone().unwrap();
    let check = std::thread::spawn(move || expect_pattern(&mut reader, 2, 64 * MIB));
    let mut writer = client;
    send_pattern(&mut writer, 1, 64 * MIB);
    writer.shutdown(Shutdown::Write).unwrap();
    check.join().unwrap();
    server.join().unwrap();
    keel.wait_listener_stat("connections_active", 0);
    let stats = keel.stats();
    assert_eq!(
        stats["io_driver"],
        if driver == "uring" {
            "io_uring"
        } else {
            "epoll"
        }
    );
    let l = &stats["listeners"][0];
    assert_eq!(l["downstream_rx_bytes"], 64 * MIB as u64);
    assert_eq!(l["downstream_tx_bytes"], 64 * MIB as u64);
    assert_eq!(l["connections_accepted"], 1);
}

#[test]
fn forwards_64_mib_both_ways_io_uring_splice() {
    forwards_64_mib_both_ways("uring", "splice");
}

#[test]
fn forwards_64_mib_both_ways_io_uring_copy() {
    forwards_64_mib_both_ways("uring", "copy");
}

#[test]
fn forwards_64_mib_both_ways_epoll_splice() {
    forwards_64_mib_both_ways("epoll", "splice");
}

#[test]
fn forwards_64_mib_both_ways_epoll_copy() {
    forwards_64_mib_both_ways("epoll", "copy");
}

/// The client's FIN reaches the backend while the backend's answer still flows back.
#[test]
fn half_close_keeps_the_other_direction_open() {
    for (driver, forwarding) in MODES {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = backend.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = backend.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap(); // returns only once the client's FIN arrives
            std::thread::sleep(Duration::from_millis(100));
            c.write_all(format!("got {} bytes", got.len()).as_bytes())
                .unwrap();
        });
        let (_keel, port) = ingress_keel_with(
            upstream,
            "connectTimeout: 1s",
            1,
            &["--io-driver", driver, "--forwarding", forwarding],
        );
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello world").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut c), b"got 11 bytes", "{driver} {forwarding}");
        server.join().unwrap();
    }
}

/// Nothing listens upstream: the client is closed at once and the failure is counted.
#[test]
fn upstream_refused_closes_downstream_and_counts() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (keel, port) = ingress_keel(dead, "connectTimeout: 1s", 1, "auto");
    for _ in 0..3 {
        let start = Instant::now();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf);
        assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
    keel.wait_listener_stat("upstream_connect_refused", 3);
    let (_, prom) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert!(
        prom.contains("keel_cluster_upstream_cx_connect_fail_total{cluster=\"inbound|"),
        "{prom}"
    );
    assert!(
        prom.lines().any(
            |l| l.starts_with("keel_cluster_upstream_cx_connect_fail_total") && l.ends_with(" 3")
        ),
        "{prom}"
    );
    assert!(
        keel.log_text().contains("connection refused"),
        "a log line names the failure"
    );
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects hang.
fn blackhole() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    (addr, fillers, s)
}

/// Connect timeouts under churn: every one counted, and no fd left behind.
#[test]
fn connect_timeout_churn_leaks_no_fds() {
    for driver in DRIVERS {
        let (hole, _fillers, _sock) = blackhole();
        let (keel, port) = ingress_keel(hole, "connectTimeout: 100ms", 1, driver);
        let before = keel.open_fds();
        let mut rounds = Vec::new();
        for _ in 0..10 {
            let conns: Vec<TcpStream> = (0..20)
                .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
                .collect();
            rounds.push(std::thread::spawn(move || {
                for mut c in conns {
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut b = [0u8; 1];
                    let r = c.read(&mut b);
                    assert!(matches!(r, Ok(0)) || r.is_err());
                }
            }));
        }
        for r in rounds {
            r.join().unwrap();
        }
        keel.wait_listener_stat("upstream_connect_timeout", 200);
        keel.wait_listener_stat("connections_active", 0);
        let after = keel.open_fds();
        assert!(
            after <= before,
            "{driver}: fds before {before}, after {after}"
        );
    }
}

/// A client that connects and sends nothing is closed by the idle timeout; activity keeps it open.
#[test]
fn idle_timeout_closes_silent_connections() {
    for driver in DRIVERS {
        let (echo, _) = echo_backend();
        let (keel, port) = ingress_keel(echo, "idleTimeout: 400ms", 1, driver);
        let start = Instant::now();
        let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(read_all(&mut silent).is_empty());
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "{driver}: closed after {waited:?}"
        );

        let mut busy = TcpStream::connect(("127.0.0.1", port)).unwrap();
        for _ in 0..10 {
            echo_round_trip(&mut busy, b"ping");
            std::thread::sleep(Duration::from_millis(150));
        }
        keel.wait_listener_stat("idle_timeouts", 1);
    }
}

/// Several workers share one port through SO_REUSEPORT, and each serves connections.
#[test]
fn workers_share_one_port() {
    for driver in DRIVERS {
        let (echo, _) = echo_backend();
        let (keel, port) = ingress_keel(echo, "connectTimeout: 1s", 2, driver);
        for i in 0..64u32 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            echo_round_trip(&mut c, &i.to_le_bytes());
        }
        let stats = keel.stats();
        assert_eq!(stats["workers"], 2);
        let per_worker: Vec<u64> = stats["workers_accepted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(per_worker.iter().sum::<u64>(), 64);
        assert!(
            per_worker.iter().all(|n| *n > 0),
            "{driver}: {per_worker:?}"
        );
    }
}

/// Admin figures match the traffic sent exactly.
#[test]
fn admin_figures_match_traffic() {
    let (echo, _) = echo_backend();
    let (keel, port) = ingress_keel(echo, "connectTimeout: 1s", 2, "auto");
    let mut total = 0u64;
    for i in 1..=10usize {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let msg = vec![b'x'; i * 1000];
        echo_round_trip(&mut c, &msg);
        total += msg.len() as u64;
    }
    let open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    keel.wait_listener_stat("connections_active", 1);
    drop(open);
    keel.wait_listener_stat("connections_active", 0);
    let s = keel.stats();
    let l = &s["listeners"][0];
    assert_eq!(l["connections_accepted"], 11);
    assert_eq!(l["downstream_rx_bytes"], total);
    assert_eq!(l["downstream_tx_bytes"], total);
    assert_eq!(s["clusters"][0]["upstream_cx_total"], 11);
    assert_eq!(s["clusters"][0]["upstream_cx_active"], 0);

    let (status, prom) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    let name = format!("listener=\"127.0.0.1_{port}\",direction=\"inbound\"");
    assert!(
        prom.contains(&format!(
            "keel_listener_connections_accepted_total{{{name}}} 11"
        )),
        "{prom}"
    );
    assert!(
        prom.contains(&format!(
            "keel_listener_downstream_rx_bytes_total{{{name}}} {total}"
        )),
        "{prom}"
    );
    assert!(
        prom.contains(&format!("keel_listener_connections_active{{{name}}} 0")),
        "{prom}"
    );
    assert!(prom.contains("keel_workers 2"));
    assert!(prom.contains("keel_io_driver{driver=\""));
    for line in prom.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
    }

    assert_eq!(http_get(keel.admin, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(keel.admin, "/ready").unwrap().0, 200);
    assert_eq!(http_get(keel.admin, "/nope").unwrap().0, 404);
    let (status, dump) = http_get(keel.admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["version"], s["config_version"]);
    assert_eq!(dump["listeners"][0]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(dump["resources"].as_array().unwrap().len(), 2);
}

/// Egress: a VirtualService tcp route picks a subset; without one, round robin over all endpoints.
#[test]
fn egress_routes_to_service_entry_endpoints() {
    let (a, b) = (banner_backend("A"), banner_backend("B"));
    let (admin, port) = (free_port(), free_port());
    let services = format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: TCP }}
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: svc }}
spec:
  hosts: [svc]
  ports: [{{ number: {port}, name: tcp, protocol: TCP }}]
  resolution: STATIC
  endpoints:
  - {{ address: 127.0.0.1, ports: {{ tcp: {} }}, labels: {{ version: a }} }}
  - {{ address: 127.0.0.1, ports: {{ tcp: {} }}, labels: {{ version: b }} }}
",
        a.port(),
        b.port()
    );
    let keel = Keel::start(&format!("{}{services}", proxy_yaml(admin, 1)), admin, &[]);
    let picks: Vec<Vec<u8>> = (0..10)
        .map(|_| read_all(&mut TcpStream::connect(("127.0.0.1", port)).unwrap()))
        .collect();
    assert_eq!(
        picks.iter().filter(|p| p.as_slice() == b"A").count(),
        5,
        "round robin"
    );
    assert_eq!(
        picks.iter().filter(|p| p.as_slice() == b"B").count(),
        5,
        "round robin"
    );
    drop(keel);

    let routed = format!(
        "{services}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: svc }}
spec:
  host: svc
  subsets:
  - {{ name: a, labels: {{ version: a }} }}
  - {{ name: b, labels: {{ version: b }} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: svc }}
spec:
  hosts: [svc]
  tcp:
  - match: [{{ port: {port} }}]
    route:
    - {{ destination: {{ host: svc, subset: b }}, weight: 100 }}
    - {{ destination: {{ host: svc, subset: a }}, weight: 0 }}
"
    );
    let _keel = Keel::start(&format!("{}{routed}", proxy_yaml(admin, 1)), admin, &[]);
    for _ in 0..10 {
        assert_eq!(
            read_all(&mut TcpStream::connect(("127.0.0.1", port)).unwrap()),
            b"B"
        );
    }
}

/// A client that floods an upstream that never reads costs bounded memory.
#[test]
fn flooding_client_costs_bounded_memory() {
    for forwarding in ["splice", "copy"] {
        flood(forwarding);
    }
}

fn flood(forwarding: &str) {
    let stuck = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = stuck.local_addr().unwrap();
    let _hold = std::thread::spawn(move || {
        let conns: Vec<_> = stuck.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(conns);
    });
    let (keel, port) = ingress_keel_with(
        upstream,
        "connectTimeout: 1s",
        1,
        &["--forwarding", forwarding],
    );
    let before = keel.rss_kib();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let grew = keel.rss_kib().saturating_sub(before);
    assert!(
        sent > 0 && sent < 256 << 20,
        "sent {sent}: backpressure must stop the client"
    );
    assert!(
        grew < 4096,
        "{forwarding}: RSS grew {grew} KiB while a client flooded a stuck upstream"
    );
}

/// SIGTERM: new connections are refused, open ones keep working, exit 0 once they close.
#[test]
fn sigterm_drains_open_connections() {
    let (echo, _) = echo_backend();
    let (mut keel, port) = ingress_keel(echo, "connectTimeout: 1s", 2, "auto");
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    echo_round_trip(&mut open, b"before");
    keel.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(http_get(keel.admin, "/ready").unwrap().0, 503);
    echo_round_trip(&mut open, b"during drain");
    assert!(
        keel.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a connection open"
    );
    drop(open);
    let status = keel
        .wait_exit(Duration::from_secs(3))
        .expect("did not exit after the last connection closed");
    assert!(status.success(), "{status:?}");
    assert!(keel.log_text().contains("drained"));
}

/// Sends `signal` to a one-worker Keel (started with `--drain-timeout drain`) that has a
/// connection open which never closes; returns how long the process took to exit 0.
fn exit_time_with_an_open_connection(drain: &str, signal: i32) -> Duration {
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let config = format!(
        "{}{}",
        proxy_yaml(admin, 1),
        ingress_yaml(port, echo, "connectTimeout: 1s")
    );
    let mut keel = Keel::start(&config, admin, &["--drain-timeout", drain]);
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    echo_round_trip(&mut open, b"x");
    let start = Instant::now();
    keel.signal(signal);
    let status = keel.wait_exit(Duration::from_secs(5)).expect("no exit");
    assert!(status.success());
    start.elapsed()
}

/// SIGTERM with a connection that never closes: exit 0 when the drain timeout expires.
#[test]
fn drain_timeout_bounds_shutdown() {
    let took = exit_time_with_an_open_connection("500ms", libc::SIGTERM);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// SIGINT exits at once, open connections or not.
#[test]
fn sigint_exits_without_draining() {
    let took = exit_time_with_an_open_connection("10s", libc::SIGINT);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// SIGHUP is not a reason to die.
#[test]
fn sighup_keeps_serving() {
    let (echo, _) = echo_backend();
    let (keel, port) = ingress_keel(echo, "connectTimeout: 1s", 1, "auto");
    keel.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(100));
    echo_round_trip(
        &mut TcpStream::connect(("127.0.0.1", port)).unwrap(),
        b"still here",
    );
}

/// A client that resets mid-stream: the upstream connection is closed too and a reset is counted.
#[test]
fn downstream_reset_tears_down_upstream() {
    for (driver, forwarding) in MODES {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = backend.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = backend.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).unwrap();
            // Keep sending until Keel closes this side: it must, once the client has reset.
            let chunk = [1u8; 16384];
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.write_all(&chunk).is_err() {
                    return true;
                }
            }
            false
        });
        let (keel, port) = ingress_keel_with(
            upstream,
            "connectTimeout: 1s",
            1,
            &["--io-driver", driver, "--forwarding", forwarding],
        );
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"ping").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c); // close with linger 0 sends RST
        assert!(
            server.join().unwrap(),
            "{driver} {forwarding}: upstream left open after the client reset"
        );
        keel.wait_listener_stat("connections_active", 0);
        assert_eq!(
            keel.listener_stat("connections_reset"),
            1,
            "{driver} {forwarding}"
        );
    }
}

/// consistentHash with useSourceIp on a TCP route: every connection from one client address lands
/// on the same endpoint (round robin would alternate).
#[test]
fn consistent_hash_on_source_ip_pins_tcp_clients() {
    let (a, b) = (banner_backend("A"), banner_backend("B"));
    let (admin, port) = (free_port(), free_port());
    let config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: TCP }}
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: svc }}
spec:
  hosts: [svc]
  ports: [{{ number: {port}, name: tcp, protocol: TCP }}]
  resolution: STATIC
  endpoints:
  - {{ address: 127.0.0.1, ports: {{ tcp: {} }} }}
  - {{ address: 127.0.0.1, ports: {{ tcp: {} }} }}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: svc }}
spec:
  host: svc
  trafficPolicy:
    loadBalancer: {{ consistentHash: {{ useSourceIp: true }} }}
",
        proxy_yaml(admin, 2),
        a.port(),
        b.port()
    );
    let _keel = Keel::start(&config, admin, &[]);
    let picks: Vec<Vec<u8>> = (0..10)
        .map(|_| read_all(&mut TcpStream::connect(("127.0.0.1", port)).unwrap()))
        .collect();
    assert!(picks.iter().all(|p| *p == picks[0]), "{picks:?}");
}

/// Ports whose clients speak first (HTTP here) take a connection once its first bytes arrive
/// (TCP_DEFER_ACCEPT: one wakeup for the accept and the first read); a plain TCP port, where the
/// server may speak first, takes it at once — also when a reload redeclares the HTTP port as TCP
/// and its listening socket is carried over.
#[test]
fn only_ports_whose_clients_speak_first_wait_for_the_first_bytes() {
    let http = RecordingBackend::echo("b");
    let greeting = banner_backend("220 ready\r\n");
    let (admin, port) = (free_port(), free_port());
    let config = |protocol: &str, upstream: SocketAddr| {
        format!(
            "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {port}, protocol: {protocol}, name: p }}
    bind: 127.0.0.1
    defaultEndpoint: {upstream}
",
            proxy_yaml(admin, 1)
        )
    };
    let keel = Keel::start(&config("HTTP", http.addr), admin, &[]);

    // A client that has sent nothing is not handed over yet; its request, when it comes, is served.
    let mut quiet = TcpStream::connect(("127.0.0.1", port)).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(keel.listener_stat("connections_accepted"), 0);
    let (status, _, _) = http_request(&mut quiet, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert_eq!(keel.listener_stat("connections_accepted"), 1);

    // The same port as TCP in front of a server that greets first: the greeting comes at once.
    let reloaded = keel.stats()["config_reloads"]["success"].as_u64().unwrap();
    keel.write_config(&config("TCP", greeting));
    let deadline = Instant::now() + Duration::from_secs(10);
    while keel.stats()["config_reloads"]["success"].as_u64().unwrap() == reloaded {
        assert!(Instant::now() < deadline, "the reload did not happen");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3 {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"220 ready\r\n");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the greeting took {:?}: the TCP port still waits for the client",
            started.elapsed()
        );
    }
}
