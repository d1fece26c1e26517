//! Transparent interception, end to end: network namespaces made by the test (a "pod" with an
//! app and Keel behind `keel init-iptables` rules, a "server" with a backend), the app dialling
//! the server's address directly, and proof from Keel's metrics and access log that the call
//! went through it. Needs root, `ip netns` and iptables; without them each test says why and
//! passes without running.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::pki::Mesh;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// Why these tests cannot run here, if they cannot. Probed once per test process: the tests run
/// in parallel threads of one process, and a probe each (one namespace name per process) made
/// two of them race for the name, so one found it taken and skipped itself silently.
fn unavailable() -> Option<String> {
    static ONCE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(probe_unavailable).clone()
}

fn probe_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables-restore", "setpriv", "curl", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("keelprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("cannot create network namespaces".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

macro_rules! needs_netns {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: interception tests need root, ip netns and iptables: {why}");
            return;
        }
    };
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces joined by a veth pair: `a` at 10.x.y.1, `b` at 10.x.y.2. Deleted on drop.
struct Pair {
    a: String,
    b: String,
    a_ip: String,
    b_ip: String,
    children: Vec<Child>,
}

impl Pair {
    fn new() -> Pair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 10000, n);
        let (a, b) = (format!("kpa{id}"), format!("kpb{id}"));
        let subnet = format!("10.{}.{}", 100 + (std::process::id() % 100), 10 + n);
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let sh = |cmd: &str| {
            let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
            assert!(st.success(), "failed: {cmd}");
        };
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!("ip link add {va} type veth peer name {vb}"));
        sh(&format!(
            "ip link set {va} netns {a} && ip link set {vb} netns {b}"
        ));
        sh(&format!(
            "ip -n {a} addr add {subnet}.1/24 dev {va} && ip -n {b} addr add {subnet}.2/24 dev {vb}"
        ));
        sh(&format!(
            "ip -n {a} link set {va} up && ip -n {b} link set {vb} up && ip -n {a} link set lo up && ip -n {b} link set lo up"
        ));
        Pair {
            a,
            b,
            a_ip: format!("{subnet}.1"),
            b_ip: format!("{subnet}.2"),
            children: Vec::new(),
        }
    }

    /// Starts a long-running process in namespace `ns`; killed with the pair.
    fn spawn(&mut self, ns: &str, args: &[&str], log: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs a command in `ns` and returns its output.
fn exec(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An HTTP backend answering every request with its path and the request's headers.
const ECHO_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("%s %s\n%s" % (sys.argv[3], self.path, self.headers)).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    import socket
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// A server-first TCP service: a banner on connect, then an echo of one line.
const BANNER_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
def serve(c):
    c.sendall(b"220 banner " + sys.argv[2].encode() + b"\r\n")
    data = c.recv(100)
    c.sendall(b"250 " + data)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects (from namespace `ns`) to a server-first service and returns the banner, how long it
/// took to arrive, and the echo of a line sent after it.
const BANNER_CLIENT: &str = r#"
import socket, sys, time
t = time.time()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
banner = s.recv(100)
took = time.time() - t
s.sendall(b"HELO x\r\n")
echo = s.recv(100)
print("%.3f|%s|%s" % (took, banner.decode().strip(), echo.decode().strip()))
"#;

fn start_echo(pair: &mut Pair, ns: &str, bind: &str, port: u16, name: &str, dir: &Path) {
    let log = dir.join(format!("echo-{name}-{port}.log"));
    pair.spawn(
        ns,
        &["python3", "-c", ECHO_SERVER, bind, &port.to_string(), name],
        &log,
    );
    wait_port(ns, bind, port);
}

fn start_banner(pair: &mut Pair, ns: &str, bind: &str, port: u16, dir: &Path) {
    let log = dir.join(format!("banner-{port}.log"));
    pair.spawn(
        ns,
        &["python3", "-c", BANNER_SERVER, bind, &port.to_string()],
        &log,
    );
    wait_port(ns, bind, port);
}

/// Waits until something listens on `ip:port` in `ns`.
fn wait_port(ns: &str, ip: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = format!("ss -Htln 'sport = :{port}' | grep -q .");
    while Instant::now() < deadline {
        if exec(ns, &["sh", "-c", &probe]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {ip}:{port} in {ns}");
}

/// A Keel running in a namespace, as uid 1337 unless `as_root`.
struct PodKeel {
    ns: String,
    admin: u16,
    log: PathBuf,
    dir: PathBuf,
}

impl PodKeel {
    fn start(pair: &mut Pair, ns: &str, config: &str, admin: u16, as_root: bool) -> PodKeel {
        let dir = common::temp_dir("intercept");
        let cfg = dir.join("keel.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("keel.log");
        let stderr = std::fs::File::create(&log).unwrap();
        // The access log goes to /dev/stderr, which Keel (uid 1337) opens again by name.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        let cfg = cfg.to_str().unwrap().to_string();
        let mut args: Vec<&str> = Vec::new();
        if !as_root {
            args.extend(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]);
        }
        args.extend([KEEL, "run", "-c", &cfg, "--log-level", "debug"]);
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        pair.children.push(child);
        let keel = PodKeel {
            ns: ns.to_string(),
            admin,
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if keel.admin_get("/ready").0 == 200 {
                return keel;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("keel in {ns} not ready:\n{}", keel.log_text());
    }

    fn admin_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.admin);
        let o = exec(
            &self.ns,
            &["curl", "-s", "-m", "5", "-w", "\n%{http_code}", &url],
        );
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus text, after the workers have published (they do at every idle tick).
    fn metrics(&self) -> String {
        std::thread::sleep(Duration::from_millis(1200));
        self.admin_get("/stats/prometheus").1
    }

    fn reload(&self, config: &str) {
        let before = self.admin_get("/stats").1;
        std::fs::write(self.dir.join("keel.yaml"), config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.admin_get("/stats").1;
            let v: serde_json::Value = serde_json::from_str(&now).unwrap_or_default();
            let b: serde_json::Value = serde_json::from_str(&before).unwrap_or_default();
            if v["config_version"] != b["config_version"] {
                return;
            }
        }
        panic!("no reload:\n{}", self.log_text());
    }
}

/// The value of the series of `metric` whose labels include every one of `labels`.
fn series(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn install_rules(ns: &str, extra: &[&str]) {
    let mut args = vec![KEEL, "init-iptables"];
    args.extend_from_slice(extra);
    let o = exec(ns, &args);
    assert!(o.status.success(), "init-iptables: {}", text(&o));
}

fn proxy(admin: u16, name: &str, interception: &str, extra: &str) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: {name}, namespace: default }}
spec:
  workload: {{ labels: {{ app: {name} }}, serviceAccount: {name} }}
  workers: 1
  admin: {{ address: 127.0.0.1:{admin} }}
  interception: {interception}
  telemetry:
    accessLog: {{ path: /dev/stderr, format: json }}
{extra}"
    )
}

/// A STATIC ServiceEntry `name` for `host` with one port (`number`, `protocol`) and one endpoint.
fn static_service(name: &str, host: &str, number: u16, protocol: &str, ip: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {name}, namespace: default }}
spec:
  hosts: [{host}]
  ports: [{{ number: {number}, protocol: {protocol}, name: p{number} }}]
  resolution: STATIC
  endpoints: [{{ address: {ip} }}]
"
    )
}

fn curl_in(ns: &str, args: &[&str]) -> (String, String) {
    let mut a = vec!["curl", "-s", "-m", "10", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let o = exec(ns, &a);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().to_string(), body.to_string())
}

#[test]
fn outbound_calls_are_captured_routed_by_host_and_passed_through() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-out");
    let (pod, server) = (pair.a.clone(), pair.b.clone());
    let server_ip = pair.b_ip.clone();
    start_echo(&mut pair, &server, &server_ip, 8080, "backend", &dir);
    start_echo(&mut pair, &server, &server_ip, 9090, "unknown", &dir);
    start_banner(&mut pair, &server, &server_ip, 5432, &dir);
    install_rules(&pod, &[]);
    let admin = 15000;
    let services = static_service("backend", "backend.example.com", 8080, "HTTP", &server_ip)
        + &static_service("db", "db.example.com", 5432, "TCP", &server_ip)
        + "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: backend, namespace: default }
spec:
  hosts: [backend.example.com]
  http:
  - route: [{ destination: { host: backend.example.com } }]
    headers: { request: { set: { x-routed-by: keel } } }
";
    let config = proxy(admin, "app", "{ mode: REDIRECT }", &services);
    let keel = PodKeel::start(&mut pair, &pod, &config, admin, false);

    // The app dials the server's address; the Host names the service.
    let url = "http://backend.example.com:8080/hello";
    let resolve = format!("backend.example.com:8080:{server_ip}");
    let (code, body) = curl_in(&pod, &["--resolve", &resolve, url]);
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("backend /hello"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("x-routed-by: keel"),
        "not routed by Keel: {body}"
    );

    // An address on a port no service has: passed through (ALLOW_ANY), still seen as HTTP.
    let (code, body) = curl_in(&pod, &[&format!("http://{server_ip}:9090/other")]);
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("unknown /other"), "{body}");

    // HTTP/2 with prior knowledge on the same undeclared port: detected by its preface.
    let (code, body) = curl_in(
        &pod,
        &[
            "--http2-prior-knowledge",
            &format!("http://{server_ip}:9090/h2"),
        ],
    );
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("unknown /h2"), "{body}");

    // A TCP service, told by its address: the server speaks first.
    let o = exec(&pod, &["python3", "-c", BANNER_CLIENT, &server_ip, "5432"]);
    let out = text(&o);
    assert!(out.contains("|220 banner 5432|250 HELO x"), "{out}");

    let m = keel.metrics();
    let backend = series(
        &m,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"backend.example.com\"",
            "response_code=\"200\"",
        ],
    );
    assert_eq!(backend, Some(1.0), "{m}");
    let passthrough = series(
        &m,
        "keel_listener_protocol_detected_total",
        &["listener=\"virtualOutbound\"", "protocol=\"http\""],
    );
    assert_eq!(passthrough, Some(2.0), "{m}");
    let db = series(
        &m,
        "istio_tcp_connections_opened_total",
        &["destination_service=\"db.example.com\""],
    );
    assert_eq!(db, Some(1.0), "{m}");
    let log = keel.log_text();
    assert!(
        log.contains("\"upstream_cluster\":\"outbound|8080||backend.example.com\""),
        "{log}"
    );
    assert!(
        log.contains("\"upstream_cluster\":\"PassthroughCluster\""),
        "{log}"
    );

    // REGISTRY_ONLY: what is not registered is refused, what is still works.
    let registry_only = format!(
        "{services}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  egress:
  - hosts: [\"*/*\"]
  outboundTrafficPolicy: {{ mode: REGISTRY_ONLY }}
"
    );
    keel.reload(&proxy(admin, "app", "{ mode: REDIRECT }", &registry_only));
    let (code, _) = curl_in(&pod, &[&format!("http://{server_ip}:9090/other")]);
    assert_eq!(code, "502", "{}", keel.log_text());
    let (code, body) = curl_in(&pod, &["--resolve", &resolve, url]);
    assert_eq!(code, "200", "{body}");
    // Keel's own connections are not captured: it reaches the backend directly.
    let (code, _) = curl_in(&pod, &["-m", "3", "http://127.0.0.1:15001/"]);
    assert_ne!(
        code, "200",
        "a direct connection to the capture port must not be served"
    );
    // Moving the capture ports needs a restart (and new rules): the reload is refused, and the
    // running config keeps serving.
    std::fs::write(
        keel.dir.join("keel.yaml"),
        proxy(
            admin,
            "app",
            "{ mode: REDIRECT, outboundPort: 15002 }",
            &registry_only,
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !keel.log_text().contains("needs a restart") {
        assert!(Instant::now() < deadline, "{}", keel.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = curl_in(&pod, &["--resolve", &resolve, url]);
    assert_eq!(code, "200");
    install_rules(&pod, &["--cleanup"]);
    let o = exec(&pod, &["iptables-save"]);
    assert!(!text(&o).contains("KEEL_"), "{}", text(&o));
}

#[test]
fn server_first_protocols_do_not_stall() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-first");
    let (pod, server) = (pair.a.clone(), pair.b.clone());
    let server_ip = pair.b_ip.clone();
    start_banner(&mut pair, &server, &server_ip, 2525, &dir);
    start_banner(&mut pair, &server, &server_ip, 3306, &dir);
    install_rules(&pod, &[]);
    let admin = 15000;
    let services = static_service("mysql", "mysql.example.com", 3306, "TCP", &server_ip);
    // A long detection wait, to tell "waited, then fell back" from "did not wait".
    let config = proxy(
        admin,
        "app",
        "{ mode: REDIRECT, protocolDetectionTimeout: 1500ms }",
        &services,
    );
    let keel = PodKeel::start(&mut pair, &pod, &config, admin, false);
    let banner = |port: &str| -> (f64, String) {
        let o = exec(&pod, &["python3", "-c", BANNER_CLIENT, &server_ip, port]);
        let out = text(&o);
        let (took, rest) = out.trim().split_once('|').unwrap_or(("99", ""));
        (took.parse().unwrap_or(99.0), rest.to_string())
    };
    // Declared TCP: no sniffing, the banner comes at once.
    let (took, rest) = banner("3306");
    assert_eq!(rest, "220 banner 3306|250 HELO x", "{}", keel.log_text());
    assert!(took < 1.0, "declared TCP waited {took}s");
    // Undeclared (passthrough): the wait, then TCP; the server's banner gets through intact.
    let (took, rest) = banner("2525");
    assert_eq!(rest, "220 banner 2525|250 HELO x", "{}", keel.log_text());
    assert!((1.3..6.0).contains(&took), "undeclared port took {took}s");
    // A client that starts what could be a request line and stops: taken for TCP after the wait
    // too (never a busy loop, never a stall), and its bytes reach the server.
    let partial = r#"
import socket, sys, time
t = time.time()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
s.sendall(b"GE")
f = s.makefile("rb")
# The greeting and the echo of "GE" may come in one segment: read them as lines.
banner = f.readline()
echo = f.readline()
print("%.3f|%s|%s" % (time.time() - t, banner.decode().strip(), echo.decode().strip()))
"#;
    let o = exec(&pod, &["python3", "-c", partial, &server_ip, "2525"]);
    let out = text(&o);
    let (took, rest) = out.trim().split_once('|').unwrap_or(("99", ""));
    assert_eq!(rest, "220 banner 2525|250 GE", "{out}\n{}", keel.log_text());
    let took: f64 = took.parse().unwrap_or(99.0);
    assert!(
        (1.3..6.0).contains(&took),
        "partial request line took {took}s"
    );
    let m = keel.metrics();
    assert_eq!(
        series(
            &m,
            "keel_listener_protocol_detected_total",
            &["listener=\"virtualOutbound\"", "protocol=\"tcp\""]
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "istio_tcp_connections_opened_total",
            &["destination_service=\"mysql.example.com\""]
        ),
        Some(1.0),
        "{m}"
    );
}

/// Two pods, each with Keel behind REDIRECT rules: the client pod's app calls the server pod's
/// address; Keel originates mesh mTLS, the server pod's Keel terminates it (STRICT) and hands the
/// request to its app with the client's SPIFFE identity.
#[test]
fn mtls_between_two_captured_pods() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-mtls");
    let (client, server) = (pair.a.clone(), pair.b.clone());
    let server_ip = pair.b_ip.clone();
    let mesh = Mesh::new();
    let a_id = mesh.workload("a", "spiffe://cluster.local/ns/default/sa/a");
    let b_id = mesh.workload("b", "spiffe://cluster.local/ns/default/sa/b");
    start_echo(&mut pair, &server, "0.0.0.0", 8080, "reviews", &dir);
    start_echo(&mut pair, &server, "0.0.0.0", 9090, "undeclared", &dir);
    install_rules(&client, &[]);
    install_rules(&server, &[]);
    let identity = |id: &common::pki::Issued| {
        format!(
            "  identity:
    certificateChain: {}
    privateKey: {}
    rootCertificates: {}
",
            id.cert.display(),
            id.key.display(),
            mesh.root.display()
        )
    };
    let server_config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: 8080, protocol: HTTP, name: http }}
    defaultEndpoint: 127.0.0.1:8080
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{ name: default, namespace: default }}
spec:
  mtls: {{ mode: STRICT }}
",
        proxy(15000, "b", "{ mode: REDIRECT }", &identity(&b_id))
    );
    let client_config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews, namespace: default }}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports:
  - {{ number: 8080, protocol: HTTP, name: http }}
  - {{ number: 9090, name: undeclared }}
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{ address: {server_ip} }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews, namespace: default }}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy: {{ tls: {{ mode: ISTIO_MUTUAL }} }}
",
        proxy(15000, "a", "{ mode: REDIRECT }", &identity(&a_id))
    );
    let b = PodKeel::start(&mut pair, &server, &server_config, 15000, false);
    let a = PodKeel::start(&mut pair, &client, &client_config, 15000, false);

    let resolve = format!("reviews.default.svc.cluster.local:8080:{server_ip}");
    let (code, body) = curl_in(
        &client,
        &[
            "--resolve",
            &resolve,
            "http://reviews.default.svc.cluster.local:8080/ratings",
        ],
    );
    assert_eq!(
        code,
        "200",
        "{body}\nA:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(body.starts_with("reviews /ratings"), "{body}");
    let lower = body.to_ascii_lowercase();
    assert!(
        lower.contains("x-forwarded-client-cert:")
            && body.contains("URI=spiffe://cluster.local/ns/default/sa/a"),
        "the server pod's app did not get the client's identity: {body}"
    );

    // A port the server pod declares nothing for: mTLS still (PeerAuthentication is mesh-wide),
    // the protocol told by the ALPN the client's Keel offers, passed through to the app.
    let resolve9 = format!("reviews.default.svc.cluster.local:9090:{server_ip}");
    let (code, body) = curl_in(
        &client,
        &[
            "--resolve",
            &resolve9,
            "http://reviews.default.svc.cluster.local:9090/any",
        ],
    );
    assert_eq!(
        code,
        "200",
        "{body}\nA:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(body.starts_with("undeclared /any"), "{body}");

    let mb = b.metrics();
    let inbound = series(
        &mb,
        "istio_requests_total",
        &[
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/a\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_code=\"200\"",
        ],
    );
    assert_eq!(inbound, Some(2.0), "{mb}");
    let ma = a.metrics();
    let outbound = series(
        &ma,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"reviews.default.svc.cluster.local\"",
            "response_code=\"200\"",
        ],
    );
    assert_eq!(outbound, Some(2.0), "{ma}");

    // Plaintext from outside the mesh (the client pod's Keel uid is exempt from capture, so
    // this is a direct call) is refused by STRICT.
    let o = exec(
        &client,
        &[
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{server_ip}:8080/"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "000",
        "STRICT let plaintext in"
    );
}

/// A service whose endpoint is this very pod: Keel's outbound connection to its own address goes
/// through its inbound side (Istio's hairpin), so the request is counted — and policed — inbound too.
#[test]
fn a_call_to_a_service_on_this_pod_goes_through_the_inbound_side() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-hairpin");
    let pod = pair.a.clone();
    let (pod_ip, other_ip) = (pair.a_ip.clone(), pair.b_ip.clone());
    start_echo(&mut pair, &pod, "0.0.0.0", 8080, "self", &dir);
    install_rules(&pod, &[]);
    let config = format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: 8080, protocol: HTTP, name: http }}
    defaultEndpoint: 127.0.0.1:8080
",
        proxy(15000, "app", "{ mode: REDIRECT }", ""),
        static_service("self", "self.example.com", 8080, "HTTP", &pod_ip)
    );
    let keel = PodKeel::start(&mut pair, &pod, &config, 15000, false);
    // The app dials some captured address on the port; the Host picks the service.
    let resolve = format!("self.example.com:8080:{other_ip}");
    let (code, body) = curl_in(
        &pod,
        &["--resolve", &resolve, "http://self.example.com:8080/me"],
    );
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("self /me"), "{body}");
    let m = keel.metrics();
    for reporter in ["source", "destination"] {
        let n = series(
            &m,
            "istio_requests_total",
            &[&format!("reporter=\"{reporter}\""), "response_code=\"200\""],
        );
        assert_eq!(n, Some(1.0), "{reporter}: {m}");
    }
}

/// PERMISSIVE mTLS on a captured inbound port waits for a silent client only as long as protocol
/// detection does (not the 10 s TLS handshake timeout): a server-first protocol from outside the
/// mesh still gets its greeting at once.
#[test]
fn permissive_capture_does_not_stall_server_first_protocols() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-permissive");
    let (client, pod) = (pair.a.clone(), pair.b.clone());
    let pod_ip = pair.b_ip.clone();
    let mesh = Mesh::new();
    let id = mesh.workload("db", "spiffe://cluster.local/ns/default/sa/db");
    start_banner(&mut pair, &pod, "0.0.0.0", 3307, &dir);
    install_rules(&pod, &[]);
    let config = proxy(
        15000,
        "db",
        "{ mode: REDIRECT, protocolDetectionTimeout: 300ms }",
        &format!(
            "  identity:
    certificateChain: {}
    privateKey: {}
    rootCertificates: {}
",
            id.cert.display(),
            id.key.display(),
            mesh.root.display()
        ),
    );
    let keel = PodKeel::start(&mut pair, &pod, &config, 15000, false);
    let o = exec(&client, &["python3", "-c", BANNER_CLIENT, &pod_ip, "3307"]);
    let out = text(&o);
    let (took, rest) = out.trim().split_once('|').unwrap_or(("99", ""));
    assert_eq!(
        rest,
        "220 banner 3307|250 HELO x",
        "{out}\n{}",
        keel.log_text()
    );
    let took: f64 = took.parse().unwrap_or(99.0);
    assert!(
        took < 3.0,
        "a silent client waited {took}s on a PERMISSIVE captured port"
    );
    let m = keel.metrics();
    assert_eq!(
        series(
            &m,
            "keel_listener_tls_plaintext_connections_total",
            &["listener=\"virtualInbound\"", "result=\"accepted\""]
        ),
        Some(1.0),
        "{m}"
    );
}

/// TPROXY: inbound connections keep their client's address all the way to Keel, which finds the
/// original destination in its socket's own local address.
#[test]
fn tproxy_inbound_capture() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-tproxy");
    let (client, pod) = (pair.a.clone(), pair.b.clone());
    let (client_ip, pod_ip) = (pair.a_ip.clone(), pair.b_ip.clone());
    start_echo(&mut pair, &pod, "0.0.0.0", 8080, "app", &dir);
    start_echo(&mut pair, &pod, "0.0.0.0", 7070, "other", &dir);
    // Keel runs as root here (IP_TRANSPARENT needs CAP_NET_ADMIN), so root is the exempt uid.
    install_rules(
        &pod,
        &["--mode", "tproxy", "--proxy-uid", "0", "--proxy-gid", ""],
    );
    let config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: 8080, protocol: HTTP, name: http }}
    defaultEndpoint: 127.0.0.1:8080
",
        proxy(15000, "app", "{ mode: TPROXY }", "")
    );
    let keel = PodKeel::start(&mut pair, &pod, &config, 15000, true);
    let (code, body) = curl_in(&client, &[&format!("http://{pod_ip}:8080/in")]);
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("app /in"), "{body}");
    // A port without an ingress listener: passed through to the app on it.
    let (code, body) = curl_in(&client, &[&format!("http://{pod_ip}:7070/pass")]);
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("other /pass"), "{body}");
    let m = keel.metrics();
    let inbound = series(
        &m,
        "istio_requests_total",
        &["reporter=\"destination\"", "response_code=\"200\""],
    );
    assert!(inbound.is_some(), "{m}");
    // The access log has the client's own address: TPROXY does not rewrite it.
    let log = keel.log_text();
    assert!(
        log.contains(&format!("\"downstream_remote_address\":\"{client_ip}:")),
        "{log}"
    );
    install_rules(&pod, &["--mode", "tproxy", "--cleanup"]);
    let o = exec(&pod, &["ip", "rule"]);
    assert!(!text(&o).contains("lookup 133"), "{}", text(&o));
}

/// The rules go in, and come out again, with iptables-legacy as with iptables-nft.
#[test]
fn init_iptables_with_either_backend() {
    needs_netns!();
    let pair = Pair::new();
    for (backend, save) in [
        ("nft", "iptables-nft-save"),
        ("legacy", "iptables-legacy-save"),
    ] {
        install_rules(
            &pair.a,
            &[
                "--backend",
                backend,
                "--exclude-outbound-cidrs",
                "10.9.0.0/16",
            ],
        );
        let o = exec(&pair.a, &[save]);
        let rules = text(&o);
        assert!(
            rules.contains("-A KEEL_OUTPUT -d 10.9.0.0/16 -j RETURN"),
            "{backend}: {rules}"
        );
        assert!(
            rules.contains("-A OUTPUT -p tcp -j KEEL_OUTPUT"),
            "{backend}: {rules}"
        );
        // Installing again replaces rather than doubles.
        install_rules(&pair.a, &["--backend", backend]);
        let again = text(&exec(&pair.a, &[save]));
        assert_eq!(
            again.matches("-j KEEL_OUTPUT").count(),
            1,
            "{backend}: {again}"
        );
        install_rules(&pair.a, &["--backend", backend, "--cleanup"]);
        let after = text(&exec(&pair.a, &[save]));
        assert!(!after.contains("KEEL_"), "{backend}: {after}");
    }
}

#[test]
fn init_iptables_dry_run_prints_the_rules() {
    let o = Command::new(KEEL)
        .args(["init-iptables", "--dry-run", "--ipv6", "--mode", "tproxy"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("# iptables-restore --noflush"), "{out}");
    assert!(out.contains("# ip6tables-restore --noflush"), "{out}");
    assert!(out.contains("-j TPROXY --on-port 15006"), "{out}");
    assert!(
        out.contains("ip -4 rule add fwmark 1337 lookup 133"),
        "{out}"
    );
    let bad = Command::new(KEEL)
        .args([
            "init-iptables",
            "--dry-run",
            "--exclude-inbound-ports",
            "ssh",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad).contains("`ssh` is not a port"), "{}", text(&bad));
}

#[test]
fn ipv6_is_captured_too() {
    needs_netns!();
    let mut pair = Pair::new();
    let dir = common::temp_dir("intercept-v6");
    let (pod, server) = (pair.a.clone(), pair.b.clone());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (pod_ip, server_ip) = (format!("fd00:77:{n}::1"), format!("fd00:77:{n}::2"));
    for (ns, ip) in [(&pod, &pod_ip), (&server, &server_ip)] {
        let dev = exec(ns, &["sh", "-c", "ls /sys/class/net | grep -v lo"]);
        let dev = String::from_utf8_lossy(&dev.stdout).trim().to_string();
        let o = exec(
            ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                &dev,
                "nodad",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    start_echo(&mut pair, &server, "::", 9090, "v6", &dir);
    install_rules(&pod, &["--ipv6"]);
    let config = proxy(15000, "app", "{ mode: REDIRECT, ipv6: true }", "");
    let keel = PodKeel::start(&mut pair, &pod, &config, 15000, false);
    let (code, body) = curl_in(&pod, &["-g", &format!("http://[{server_ip}]:9090/six")]);
    assert_eq!(code, "200", "{body}\n{}", keel.log_text());
    assert!(body.starts_with("v6 /six"), "{body}");
    let m = keel.metrics();
    assert_eq!(
        series(
            &m,
            "keel_listener_protocol_detected_total",
            &["listener=\"virtualOutbound6\"", "protocol=\"http\""]
        ),
        Some(1.0),
        "{m}"
    );
    install_rules(&pod, &["--ipv6", "--cleanup"]);
    let o = exec(&pod, &["ip6tables-save"]);
    assert!(!text(&o).contains("KEEL_"), "{}", text(&o));
}
