//! Test harness: the real `keel` binary on loopback with real config files, and small real backends.
#![allow(dead_code)]

pub mod pki;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const DRIVERS: [&str; 2] = ["uring", "epoll"];

/// A port free to listen on, taken below the kernel's ephemeral range (where outgoing connections get
/// their local ports), so no client connection of a test running in parallel can take it before Keel
/// binds it. Each test process walks its own stretch of ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().filter_map(|x| x.parse::<usize>().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32768, 60999));
    // Below the ephemeral range when there is room for it, else above it.
    let (base, span) = if low > 12000 {
        (10000, low - 10000)
    } else {
        (high + 1, 65535 - high)
    };
    let offset = (std::process::id() as usize * 397) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port left");
        let port = (base + (offset + n) % span) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keel-it-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        tag
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn proxy_yaml(admin: u16, workers: usize) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: test, namespace: default }}
spec:
  workload: {{ labels: {{ app: test, version: v1 }} }}
  workers: {workers}
  admin: {{ address: 127.0.0.1:{admin} }}
"
    )
}

/// A Sidecar with one TCP ingress listener in front of `upstream`, with `tcp` extra pool settings.
pub fn ingress_yaml(port: u16, upstream: SocketAddr, tcp: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {port}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    defaultEndpoint: {upstream}
    connectionPool:
      tcp: {{ {tcp} }}
"
    )
}

pub struct Keel {
    pub child: Child,
    pub admin: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Keel {
    /// Starts keel on `config` with extra CLI args and waits for `/ready`.
    pub fn start(config: &str, admin: u16, args: &[&str]) -> Keel {
        let keel = Self::spawn(config, admin, args);
        keel.wait_ready();
        keel
    }

    /// Starts keel without waiting for readiness.
    pub fn spawn(config: &str, admin: u16, args: &[&str]) -> Keel {
        let dir = temp_dir("keel");
        let cfg = dir.join("keel.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("keel.log");
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("run")
            .arg("-c")
            .arg(&cfg)
            .args(["--log-level", "debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Keel {
            child,
            admin,
            dir,
            log,
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(self.admin, "/ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("keel did not become ready; log:\n{}", self.log_text());
    }

    /// The config file this keel was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("keel.yaml")
    }

    /// Replaces the config file atomically (write aside, then rename), as a deploy tool would.
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.join(".keel.yaml.tmp");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is passed.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for exit up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/stats").unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    pub fn listener_stat(&self, field: &str) -> u64 {
        self.stats()["listeners"][0][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field}"))
    }

    /// Waits until a listener counter reaches `want` (counters update as connections finish).
    pub fn wait_listener_stat(&self, field: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while Instant::now() < deadline {
            got = self.listener_stat(field);
            if got == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{field}: got {got}, want {want}; stats: {:#}", self.stats());
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A one-shot HTTP GET to the admin port.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs `keel validate -c path`.
pub fn validate(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("validate")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Deterministic pseudo-random bytes, so both ends can check a stream without storing it.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes (chunks of 64 KiB, so the pattern is the same however it is read).
pub fn send_pattern(s: &mut TcpStream, seed: u64, len: usize) {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 65536];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

/// Reads until EOF and checks the bytes are exactly the `len`-byte pattern of `seed`.
pub fn expect_pattern(s: &mut TcpStream, seed: u64, len: usize) {
    let mut p = Pattern::new(seed);
    let mut expected = vec![0u8; 65536];
    let (mut exp_len, mut exp_pos) = (0usize, 0usize);
    let mut got = vec![0u8; 65536];
    let mut offset = 0usize;
    loop {
        let n = s.read(&mut got).unwrap();
        if n == 0 {
            break;
        }
        let mut i = 0;
        while i < n {
            if exp_pos == exp_len {
                let chunk = (len - offset).min(65536);
                assert!(chunk > 0, "more than {len} bytes received");
                p.fill(&mut expected[..chunk]);
                (exp_len, exp_pos) = (chunk, 0);
            }
            let take = (n - i).min(exp_len - exp_pos);
            assert!(
                got[i..i + take] == expected[exp_pos..exp_pos + take],
                "bytes differ at offset {offset}"
            );
            i += take;
            exp_pos += take;
            offset += take;
        }
    }
    assert_eq!(offset, len, "stream ended early");
}

/// A backend that echoes every connection until EOF, then closes its side.
pub fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, h)
}

/// A backend that greets each connection with `banner` and closes.
pub fn banner_backend(banner: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(banner.as_bytes());
        }
    });
    addr
}

/// Reads everything until EOF.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_end(&mut out).unwrap();
    out
}

/// A round trip of `msg` through an echoing path.
pub fn echo_round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// What a [`RecordingBackend`] answers: it sees the request head and body and writes raw bytes.
pub type Responder = dyn Fn(&str, &[u8]) -> Vec<u8> + Send + Sync;

/// An HTTP/1.1 backend that records every byte it receives (to prove what Keel forwarded) and answers
/// each request with `respond(head, body)`. Keep-alive; bodies by Content-Length or chunked.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pub connections: std::sync::Arc<AtomicUsize>,
}

impl RecordingBackend {
    pub fn start(respond: std::sync::Arc<Responder>) -> RecordingBackend {
        Self::start_on("127.0.0.1:0", respond)
    }

    /// [`RecordingBackend::start`] on a given address (another loopback IP, a given port).
    pub fn start_on(addr: &str, respond: std::sync::Arc<Responder>) -> RecordingBackend {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = std::sync::Arc::new(AtomicUsize::new(0));
        let (rec, conns) = (received.clone(), connections.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                conns.fetch_add(1, Ordering::Relaxed);
                let (rec, respond) = (rec.clone(), respond.clone());
                std::thread::spawn(move || serve_recorded(c, &rec, &*respond));
            }
        });
        RecordingBackend {
            addr,
            received,
            connections,
        }
    }

    /// A backend that echoes the request head and body it got, naming itself in `x-backend`.
    pub fn echo(name: &'static str) -> RecordingBackend {
        Self::start(std::sync::Arc::new(move |head: &str, body: &[u8]| {
            let mut text = format!("{head}\n\n").into_bytes();
            text.extend_from_slice(body);
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: {}\r\n\r\n",
                text.len()
            )
            .into_bytes();
            out.extend_from_slice(&text);
            out
        }))
    }

    pub fn received_text(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).to_string()
    }
}

fn serve_recorded(mut c: TcpStream, rec: &std::sync::Mutex<Vec<u8>>, respond: &Responder) {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = [0u8; 65536];
    let mut fill = |c: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        match c.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                rec.lock().unwrap().extend_from_slice(&tmp[..n]);
                buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    };
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut c, &mut buf) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end - 4]).to_string();
        buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if lower.contains("\r\ntransfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !fill(&mut c, &mut buf) {
                        return;
                    }
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .unwrap_or(0);
                buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers up to the empty line.
                    loop {
                        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                            let line = buf.drain(..i + 2).collect::<Vec<u8>>();
                            if line == b"\r\n" {
                                break;
                            }
                            body.extend_from_slice(b"[trailer ");
                            body.extend_from_slice(&line[..line.len() - 2]);
                            body.extend_from_slice(b"]");
                        } else if !fill(&mut c, &mut buf) {
                            return;
                        }
                    }
                    break;
                }
                while buf.len() < size + 2 {
                    if !fill(&mut c, &mut buf) {
                        return;
                    }
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else if let Some(cl) = lower
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < cl {
                if !fill(&mut c, &mut buf) {
                    return;
                }
            }
            body = buf.drain(..cl).collect();
        }
        let out = respond(&head, &body);
        if c.write_all(&out).is_err() {
            return;
        }
        if lower.contains("\r\nconnection: close") {
            return;
        }
    }
}

/// Sends raw bytes on a fresh connection and returns everything read until the peer closes (or 5 s).
pub fn raw_exchange(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// A minimal HTTP/1.1 client over one keep-alive connection: sends `request`, reads one response
/// with a Content-Length or chunked body. Returns (status, lower-case head, body).
pub fn http_request(s: &mut TcpStream, request: &[u8]) -> (u16, String, Vec<u8>) {
    s.write_all(request).unwrap();
    read_response(s)
}

/// Reads one response, and not a byte more: pipelined responses that arrive together stay in the
/// socket for the next call.
pub fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    // Generous: 2 cores run every test of a binary at once, some moving hundreds of MiB.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = s.read(&mut byte).unwrap();
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let line = |s: &mut TcpStream| {
        let mut l = Vec::new();
        while !l.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                s.read(&mut byte).unwrap(),
                1,
                "closed inside a chunked body"
            );
            l.push(byte[0]);
        }
        l.truncate(l.len() - 2);
        l
    };
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if let Some(cl) = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        let mut body = vec![0u8; cl];
        s.read_exact(&mut body).unwrap();
        body
    } else if head.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let size_line = line(s);
            let size = usize::from_str_radix(
                std::str::from_utf8(&size_line)
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim(),
                16,
            )
            .unwrap();
            if size == 0 {
                // Trailers, if any, up to the empty line.
                while !line(s).is_empty() {}
                break;
            }
            let at = body.len();
            body.resize(at + size, 0);
            s.read_exact(&mut body[at..]).unwrap();
            assert!(line(s).is_empty(), "chunk not followed by CRLF");
        }
        body
    } else {
        Vec::new()
    };
    (status, head, body)
}

/// Keel with one HTTP egress listener for the service `reviews`, whose endpoints are `endpoints`
/// (address, version label); `extra` adds resources, `proxy_extra` lines to the Proxy spec.
pub fn http_egress(
    endpoints: &[(SocketAddr, &str)],
    extra: &str,
    proxy_extra: &str,
    workers: usize,
) -> (Keel, u16) {
    let (admin, port) = (free_port(), free_port());
    let eps: String = endpoints
        .iter()
        .map(|(a, v)| {
            format!(
                "  - {{ address: 127.0.0.1, ports: {{ http: {} }}, labels: {{ version: {v} }} }}\n",
                a.port()
            )
        })
        .collect();
    let config = format!(
        "{}{proxy_extra}{}{extra}",
        proxy_yaml(admin, workers),
        egress_service(port, "HTTP", "reviews", "{ name: reviews }", &eps)
    );
    (Keel::start(&config, admin, &[]), port)
}

/// A Sidecar egress port (`protocol`) and the ServiceEntry `host` on it, as YAML documents
/// (REGISTRY_ONLY, so that a host the registry does not know gets Keel's own 502 NR):
/// `metadata` is the ServiceEntry's metadata (a flow mapping, or a block starting with a newline),
/// `endpoints` its endpoint lines (`  - { address: ..., ports: { <protocol lower-case>: N } }`).
pub fn egress_service(
    port: u16,
    protocol: &str,
    host: &str,
    metadata: &str,
    endpoints: &str,
) -> String {
    let outbound = "  outboundTrafficPolicy: { mode: REGISTRY_ONLY }\n";
    egress_service_with(port, protocol, host, metadata, endpoints, outbound)
}

/// [`egress_service`] with the Sidecar's `outbound` lines as given (empty: Istio's default).
pub fn egress_service_with(
    port: u16,
    protocol: &str,
    host: &str,
    metadata: &str,
    endpoints: &str,
    outbound: &str,
) -> String {
    let name = protocol.to_ascii_lowercase();
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: {protocol} }}
    hosts: [\"./*\"]
{outbound}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {metadata}
spec:
  hosts: [{host}]
  ports: [{{ number: {port}, name: {name}, protocol: {protocol} }}]
  resolution: STATIC
  endpoints:
{endpoints}"
    )
}

/// Runs curl (silent, 5 s at most); its exit code and what it printed.
pub fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// A path as the `&str` a command line takes.
pub fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A DestinationRule for `reviews` with the `trafficPolicy` lines given (indented four spaces).
pub fn reviews_rule(traffic_policy: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy:
{traffic_policy}"
    )
}
