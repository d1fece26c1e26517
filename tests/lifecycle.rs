//! Config lifecycle through the real binary, under load: reload (SIGHUP, file watch, ConfigMap
//! symlink swap, invalid config), listeners added and removed live, SIGTERM drain (inbound
//! drained, outbound kept), /drain_listeners, and the zero-downtime binary upgrade.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// An HTTP egress listener on `port` for host `reviews` at `backend`, whose responses carry
/// `x-route: <route>`, plus egress listeners on `extra` ports for another service.
fn routed(admin: u16, port: u16, backend: SocketAddr, route: &str, extra: &[u16]) -> String {
    let listeners: String = extra
        .iter()
        .map(|p| format!("  - port: {{ number: {p}, protocol: HTTP }}\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n"))
        .collect();
    let ratings = if extra.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = extra
            .iter()
            .map(|p| format!("{{ number: {p}, name: http-{p}, protocol: HTTP }}"))
            .collect();
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: ratings }}\nspec:\n  hosts: [ratings]\n  ports: [{}]\n  resolution: STATIC\n  endpoints:\n  - {{ address: 127.0.0.1 }}\n",
            ports.join(", ")
        )
    };
    format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: HTTP }}
    hosts: [\"./*\"]
{listeners}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  ports: [{{ number: {port}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints:
  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{ host: reviews }}
    headers:
      response:
        set: {{ x-route: {route} }}
{ratings}",
        proxy_yaml(admin, 2),
        backend.port()
    )
}

/// One request on `s`: the status and the lower-cased head, or why it failed.
fn exchange(s: &mut TcpStream, host: &str) -> Result<(u16, String), String> {
    s.write_all(format!("GET /load HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => return Err(format!("closed after {} bytes of head", head.len())),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length: {head}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok((status, head))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// Client threads sending requests without pause, over keep-alive connections (reconnecting after
/// `Connection: close`) or a new connection per request. Every failure is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Responses by their `x-route` header.
    routes: Arc<Mutex<BTreeMap<String, usize>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, keepalive: usize, fresh: usize) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(Mutex::new(Vec::new())),
            routes: Arc::new(Mutex::new(BTreeMap::new())),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        for i in 0..keepalive + fresh {
            let reuse = i < keepalive;
            let (stop, ok, failures, routes) = (
                load.stop.clone(),
                load.ok.clone(),
                load.failures.clone(),
                load.routes.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut conn: Option<TcpStream> = None;
                while !stop.load(Ordering::Relaxed) {
                    let s = match conn.take() {
                        Some(s) => s,
                        None => match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(s) => {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                                s
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(format!("connect: {e}"));
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        },
                    };
                    let mut s = s;
                    match exchange(&mut s, "reviews") {
                        Ok((200, head)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let route = header(&head, "x-route").unwrap_or("-").to_string();
                            *routes.lock().unwrap().entry(route).or_default() += 1;
                            if reuse && header(&head, "connection") != Some("close") {
                                conn = Some(s);
                            }
                        }
                        Ok((status, head)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {status}: {head}")),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        Load { threads, ..load }
    }

    /// Stops the clients; the number of successful requests and the failures.
    fn finish(self) -> (usize, Vec<String>, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = self.failures.lock().unwrap().clone();
        let routes = self.routes.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, routes)
    }
}

fn reloads(keel: &Keel, result: &str) -> u64 {
    keel.stats()["config_reloads"][result].as_u64().unwrap()
}

fn route_now(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, head) = exchange(&mut s, "reviews").unwrap();
    assert_eq!(status, 200, "{head}");
    header(&head, "x-route").unwrap_or("-").to_string()
}

/// Waits until `f` holds, up to `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// SIGHUP every 100 ms for 10 s under steady load, each config changing the route and swapping one
/// listener for another: no request fails, both routes are served, and the last config is the one
/// in force, listeners included.
#[test]
fn reload_storm_under_load_loses_nothing() {
    let app = RecordingBackend::echo("app");
    let (admin, port, x, y) = (free_port(), free_port(), free_port(), free_port());
    let config = |n: usize| {
        if n % 2 == 1 {
            routed(admin, port, app.addr, "b", &[y])
        } else {
            routed(admin, port, app.addr, "a", &[x])
        }
    };
    let keel = Keel::start(&config(0), admin, &["--no-watch"]);
    assert_eq!(route_now(port), "a");
    let load = Load::start(port, 3, 1);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(10) {
        sent += 1;
        keel.write_config(&config(sent));
        keel.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (last, present, absent) = if sent % 2 == 1 {
        ("b", y, x)
    } else {
        ("a", x, y)
    };
    assert!(eventually(Duration::from_secs(5), || route_now(port) == last));
    let (ok, failures, routes) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 500, "only {ok} requests");
    assert!(
        routes.get("a").copied().unwrap_or(0) > 10 && routes.get("b").copied().unwrap_or(0) > 10,
        "{routes:?}"
    );
    assert!(TcpStream::connect(("127.0.0.1", present)).is_ok());
    assert!(TcpStream::connect(("127.0.0.1", absent)).is_err());
    assert_eq!(reloads(&keel, "failure"), 0);
    assert!(
        eventually(Duration::from_secs(5), || reloads(&keel, "success")
            >= sent as u64 / 2),
        "{}",
        keel.stats()["config_reloads"]
    );
}

/// A listener added and another removed by reloads while the one in between carries load, on
/// both io drivers.
#[test]
fn listeners_come_and_go_without_disturbing_the_others() {
    for driver in DRIVERS {
        listeners_come_and_go(driver);
    }
}

fn listeners_come_and_go(driver: &str) {
    let app = RecordingBackend::echo("app");
    let (admin, port, extra_a, extra_b) = (free_port(), free_port(), free_port(), free_port());
    let with_a = routed(admin, port, app.addr, "x", &[extra_a]);
    let with_b = routed(admin, port, app.addr, "x", &[extra_b]);
    let keel = Keel::start(&with_a, admin, &["--no-watch", "--io-driver", driver]);
    let serves = |p: u16| {
        TcpStream::connect(("127.0.0.1", p))
            .ok()
            .and_then(|mut s| exchange(&mut s, "reviews").ok())
            .map(|(status, _)| status)
    };
    assert!(serves(extra_a).is_some());
    assert!(serves(extra_b).is_none());
    let load = Load::start(port, 3, 1);
    // An open keep-alive connection on the listener about to be removed.
    let mut held = TcpStream::connect(("127.0.0.1", extra_a)).unwrap();
    assert!(exchange(&mut held, "reviews").is_ok());
    for round in 0..6 {
        let (config, present, absent) = if round % 2 == 0 {
            (&with_b, extra_b, extra_a)
        } else {
            (&with_a, extra_a, extra_b)
        };
        keel.write_config(config);
        keel.signal(libc::SIGHUP);
        assert!(
            eventually(Duration::from_secs(5), || serves(present).is_some()
                && serves(absent).is_none()),
            "{driver}: round {round}"
        );
        if round == 0 {
            // Removed under it: the held connection gets its answer with `Connection: close`.
            let (_, head) = exchange(&mut held, "reviews").unwrap();
            assert_eq!(header(&head, "connection"), Some("close"), "{head}");
        }
    }
    let (ok, failures, _) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 10, "only {ok} requests");
    // The admin view follows once every worker has committed.
    let listed = |port: u16| {
        keel.stats()["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"].as_str().unwrap().ends_with(&format!("_{port}")))
    };
    assert!(
        eventually(Duration::from_secs(5), || listed(extra_a)
            && !listed(extra_b)),
        "{}",
        keel.stats()["listeners"]
    );
}

/// An invalid config (by SIGHUP and by the file watch) changes nothing: requests keep flowing on
/// the running routes, the error names file, line and field, and the failure is counted.
#[test]
fn invalid_config_changes_nothing() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(&routed(admin, port, app.addr, "a", &[]), admin, &[]);
    let version = keel.stats()["config_version"].as_str().unwrap().to_string();
    let load = Load::start(port, 2, 1);
    let bad = routed(admin, port, app.addr, "b", &[]).replace(
        "destination: { host: reviews }",
        "destinaton: { host: reviews }",
    );
    keel.write_config(&bad);
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || reloads(
        &keel, "failure"
    ) >= 1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(route_now(port), "a");
    assert_eq!(keel.stats()["config_version"].as_str().unwrap(), version);
    let log = keel.log_text();
    assert!(
        log.contains("keel.yaml:")
            && log.contains("destinaton: unknown field")
            && log.contains("the running config stays"),
        "{log}"
    );
    // Fixed: the watch alone picks it up.
    keel.write_config(&routed(admin, port, app.addr, "b", &[]));
    assert!(eventually(Duration::from_secs(5), || route_now(port) == "b"));
    let (_, failures, _) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    let (status, body) = http_get(admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("keel_config_reloads_total{result=\"failure\"}"),
        "{body}"
    );
}

/// A Kubernetes ConfigMap mount: files are symlinks through `..data`, which the kubelet swaps.
#[test]
fn configmap_symlink_swap_reloads() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let dir = temp_dir("configmap");
    let mount = dir.join("mount");
    std::fs::create_dir_all(mount.join("..v1")).unwrap();
    std::fs::write(
        mount.join("..v1/keel.yaml"),
        routed(admin, port, app.addr, "a", &[]),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/keel.yaml", mount.join("keel.yaml")).unwrap();
    let log = dir.join("keel.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "-c"])
        .arg(&mount)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child);
    assert!(eventually(Duration::from_secs(15), || http_get(
        admin, "/ready"
    )
    .is_ok_and(|(s, _)| s == 200)));
    assert_eq!(route_now(port), "a");
    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    std::fs::write(
        mount.join("..v2/keel.yaml"),
        routed(admin, port, app.addr, "b", &[]),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || route_now(port) == "b"),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An inbound and an outbound HTTP listener, each in front of `app`.
fn both_directions(admin: u16, inbound: u16, outbound: u16, app: SocketAddr) -> String {
    format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  ingress:
  - port: {{ number: {inbound}, protocol: HTTP }}
    bind: 127.0.0.1
    defaultEndpoint: {app}
  egress:
  - port: {{ number: {outbound}, protocol: HTTP }}
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  ports: [{{ number: {outbound}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints:
  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}
",
        proxy_yaml(admin, 1),
        app.port()
    )
}

/// SIGTERM: inbound answers with `Connection: close` and stops accepting; outbound keeps
/// serving the app until the drain deadline, then the process exits.
#[test]
fn sigterm_drains_inbound_and_keeps_outbound_until_the_deadline() {
    let app = RecordingBackend::echo("app");
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let mut keel = Keel::start(
        &both_directions(admin, inbound, outbound, app.addr),
        admin,
        &["--drain-timeout", "2s"],
    );
    let mut inbound_conn = TcpStream::connect(("127.0.0.1", inbound)).unwrap();
    assert_eq!(exchange(&mut inbound_conn, "app").unwrap().0, 200);
    let mut outbound_conn = TcpStream::connect(("127.0.0.1", outbound)).unwrap();
    assert_eq!(exchange(&mut outbound_conn, "reviews").unwrap().0, 200);
    let start = Instant::now();
    keel.signal(libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(2), || TcpStream::connect((
            "127.0.0.1",
            inbound
        ))
        .is_err()),
        "inbound still accepting"
    );
    let (status, head) = exchange(&mut inbound_conn, "app").unwrap();
    assert_eq!(
        (status, header(&head, "connection")),
        (200, Some("close")),
        "{head}"
    );
    // Outbound: the open connection and new ones are served, without `Connection: close`.
    let (status, head) = exchange(&mut outbound_conn, "reviews").unwrap();
    assert_eq!((status, header(&head, "connection")), (200, None), "{head}");
    std::thread::sleep(Duration::from_millis(800));
    let mut fresh = TcpStream::connect(("127.0.0.1", outbound)).unwrap();
    assert_eq!(exchange(&mut fresh, "reviews").unwrap().0, 200);
    assert!(
        keel.wait_exit(Duration::from_millis(500)).is_none(),
        "exited before the deadline"
    );
    let status = keel
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit at the deadline");
    assert!(status.success());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// `POST /drain_listeners?inboundonly` drains inbound and leaves the process (and outbound) running.
#[test]
fn admin_drain_listeners() {
    let app = RecordingBackend::echo("app");
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let keel = Keel::start(
        &both_directions(admin, inbound, outbound, app.addr),
        admin,
        &[],
    );
    assert_eq!(
        http_get(admin, "/drain_listeners").unwrap().0,
        405,
        "GET must not drain"
    );
    let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.write_all(
        b"POST /drain_listeners?inboundonly HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(eventually(Duration::from_secs(2), || TcpStream::connect((
        "127.0.0.1",
        inbound
    ))
    .is_err()));
    let mut out = TcpStream::connect(("127.0.0.1", outbound)).unwrap();
    assert_eq!(exchange(&mut out, "reviews").unwrap().0, 200);
    assert_eq!(http_get(admin, "/ready").unwrap().0, 200);
    drop(keel);
}

/// A reload that adds a listener on a port someone else holds is refused whole.
#[test]
fn reload_with_a_busy_port_is_refused_whole() {
    let app = RecordingBackend::echo("app");
    let (admin, port, busy) = (free_port(), free_port(), free_port());
    let _holder = std::net::TcpListener::bind(("127.0.0.1", busy)).unwrap();
    let keel = Keel::start(
        &routed(admin, port, app.addr, "a", &[]),
        admin,
        &["--no-watch"],
    );
    keel.write_config(&routed(admin, port, app.addr, "b", &[busy]));
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || reloads(
        &keel, "failure"
    ) == 1));
    assert_eq!(
        route_now(port),
        "a",
        "the route change must not apply either"
    );
    assert!(
        keel.log_text().contains("cannot bind"),
        "{}",
        keel.log_text()
    );
}

/// The binary upgrade under load: the new process takes the sockets, the old one drains and exits,
/// and no request fails. Then the new one can be upgraded in turn (SIGUSR2 re-executes it).
#[test]
fn binary_upgrade_under_load_loses_nothing() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let dir = temp_dir("upgrade");
    let socket = dir.join("upgrade.sock");
    let socket_arg = socket.to_str().unwrap();
    let config = routed(admin, port, app.addr, "old", &[]);
    let mut old = Keel::start(&config, admin, &["--upgrade-socket", socket_arg]);
    let load = Load::start(port, 3, 2);
    std::thread::sleep(Duration::from_millis(500));
    let new = Keel::spawn(
        &routed(admin, port, app.addr, "new", &[]),
        admin,
        &["--upgrade-from", socket_arg, "--upgrade-socket", socket_arg],
    );
    let status = old.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "the old process did not exit:\n{}\n---\n{}",
            old.log_text(),
            new.log_text()
        )
    });
    assert!(status.success());
    assert!(eventually(Duration::from_secs(5), || route_now(port) == "new"));
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures, routes) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}\nold:\n{}\nnew:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        old.log_text(),
        new.log_text()
    );
    assert!(
        routes.contains_key("old") && routes.contains_key("new"),
        "{routes:?} after {ok}"
    );
    assert!(
        old.log_text().contains("upgrade: the new process serves"),
        "{}",
        old.log_text()
    );
    assert!(
        new.log_text().contains("took over from the old process"),
        "{}",
        new.log_text()
    );
    assert_eq!(http_get(admin, "/ready").unwrap().0, 200);

    // SIGUSR2 on the new one starts the same binary again, which takes over from it.
    let mut new = new;
    let load = Load::start(port, 2, 1);
    new.signal(libc::SIGUSR2);
    let status = new
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("did not hand over on SIGUSR2:\n{}", new.log_text()));
    assert!(status.success());
    assert_eq!(route_now(port), "new");
    let (_, failures, _) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(http_get(admin, "/ready").unwrap().0, 200);
    // The third process was started by the second, not by us: stop it through its admin pid.
    let pid = third_pid(&new.log_text());
    // SAFETY: kill(2) on the pid the second keel logged as the process it started.
    unsafe { libc::kill(pid, libc::SIGINT) };
}

fn third_pid(log: &str) -> i32 {
    log.lines()
        .find(|l| l.contains("SIGUSR2: started the new binary"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid logged:\n{log}"))
}

/// A request in flight when a reload commits finishes on the config it started with; the next
/// request on the same keep-alive connection uses the new one. A listener whose protocol changes
/// (HTTP to TCP on the same port) keeps its socket: nothing is refused while it switches.
#[test]
fn in_flight_requests_keep_their_config_and_changed_listeners_keep_serving() {
    let backend = RecordingBackend::start(Arc::new(|head: &str, _: &[u8]| {
        if head.starts_with("GET /slow ") {
            std::thread::sleep(Duration::from_millis(800));
        }
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
    }));
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(
        &routed(admin, port, backend.addr, "a", &[]),
        admin,
        &["--no-watch"],
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    keel.write_config(&routed(admin, port, backend.addr, "b", &[]));
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || route_now(port) == "b"));
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert_eq!(header(&head, "x-route"), Some("a"), "{head}");
    let mut body = [0u8; 2];
    s.read_exact(&mut body).unwrap();
    let (_, head) = exchange(&mut s, "reviews").unwrap();
    assert_eq!(
        header(&head, "x-route"),
        Some("b"),
        "the next request: {head}"
    );

    // The same port turned into a TCP listener in front of an echo server: the socket stays.
    let (echo, _) = echo_backend();
    let tcp = format!(
        "{}{}",
        proxy_yaml(admin, 2),
        ingress_yaml(port, echo, "connectTimeout: 1s")
    );
    keel.write_config(&tcp);
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).is_ok() && &got == b"ping"
    }));
    // The idle HTTP keep-alive connection from before belonged to the HTTP listener, which drained:
    // it has been closed (a busy one would have had `Connection: close` on its next response).
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "still open");
}

/// A replaced config is freed once nothing uses it — the start-up config included, which the
/// start-up code once held for the life of the process (30 MB at 10,000 routes) — and is kept
/// exactly as long as a TCP connection that began on it is open.
#[test]
fn replaced_configs_are_freed_once_no_connection_uses_them() {
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let config = |timeout: &str| {
        format!(
            "{}{}",
            proxy_yaml(admin, 2),
            ingress_yaml(port, echo, &format!("connectTimeout: {timeout}"))
        )
    };
    let keel = Keel::start(&config("1s"), admin, &["--no-watch"]);
    let retired = || keel.stats()["config_reloads"]["retired"].as_u64().unwrap();

    // Nothing open: the start-up config goes as soon as the first reload has replaced it.
    keel.write_config(&config("2s"));
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || reloads(
        &keel, "success"
    ) == 1));
    assert!(
        eventually(Duration::from_secs(2), || retired() == 0),
        "the start-up config is still alive"
    );

    // A TCP connection keeps the config it began on for its whole life, and only that long.
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    echo_round_trip(&mut held, b"begun on the second config");
    keel.write_config(&config("3s"));
    keel.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || reloads(
        &keel, "success"
    ) == 2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        retired(),
        1,
        "the open connection's config was freed under it"
    );
    echo_round_trip(&mut held, b"still served");
    drop(held);
    assert!(
        eventually(Duration::from_secs(2), || retired() == 0),
        "the config outlived its last connection"
    );
    let prom = http_get(admin, "/stats/prometheus").unwrap().1;
    assert!(prom.contains("keel_config_retired_snapshots 0"), "{prom}");
}
