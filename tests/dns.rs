//! ServiceEntry resolution DNS and DNS_ROUND_ROBIN through the real binary, against a DNS server
//! the test runs on loopback (`Proxy.spec.dns.nameservers`): names resolved at load, answers that
//! change picked up on their TTL without disturbing open connections, failures keeping the last
//! addresses.

mod common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Names and their IPv4 addresses.
type Records = Arc<Mutex<Vec<(String, Vec<[u8; 4]>)>>>;

/// A DNS server on loopback: A records from a table it can be told to change, TTL 1 s; AAAA
/// questions get no answer; names it does not know get NXDOMAIN; `silent` drops every question.
struct DnsServer {
    addr: SocketAddr,
    records: Records,
    questions: Arc<AtomicUsize>,
    silent: Arc<AtomicBool>,
}

impl DnsServer {
    fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let records: Records = Arc::default();
        let questions = Arc::new(AtomicUsize::new(0));
        let silent = Arc::new(AtomicBool::new(false));
        let (r, q, quiet) = (records.clone(), questions.clone(), silent.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let msg = &buf[..n];
                q.fetch_add(1, Ordering::SeqCst);
                if quiet.load(Ordering::SeqCst) || n < 17 {
                    continue;
                }
                // The question: labels from byte 12, then type and class.
                let mut at = 12;
                let mut labels = Vec::new();
                while at < n && msg[at] != 0 {
                    let len = msg[at] as usize;
                    labels.push(String::from_utf8_lossy(&msg[at + 1..at + 1 + len]).to_string());
                    at += 1 + len;
                }
                let qend = at + 5;
                let name = labels.join(".").to_ascii_lowercase();
                let qtype = u16::from_be_bytes([msg[at + 1], msg[at + 2]]);
                let table = r.lock().unwrap();
                let known = table.iter().find(|(n, _)| *n == name);
                let mut out = msg[..qend].to_vec();
                out[2] = 0x81;
                out[3] = if known.is_some() { 0x80 } else { 0x83 };
                let answers: Vec<[u8; 4]> = match (known, qtype) {
                    (Some((_, ips)), 1) => ips.clone(),
                    _ => Vec::new(),
                };
                out[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
                for ip in answers {
                    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
                    out.extend_from_slice(&ip);
                }
                let _ = sock.send_to(&out, from);
            }
        });
        DnsServer {
            addr,
            records,
            questions,
            silent,
        }
    }

    fn set(&self, name: &str, ips: &[[u8; 4]]) {
        let mut t = self.records.lock().unwrap();
        t.retain(|(n, _)| n != name);
        t.push((name.to_string(), ips.to_vec()));
    }
}

/// An HTTP backend on `ip:port` answering with its own name.
fn backend_on(ip: &str, port: u16, name: &'static str) {
    let l = std::net::TcpListener::bind((ip, port)).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || loop {
                use std::io::Read;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                use std::io::Write;
                let body = name.as_bytes();
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if c.write_all(head.as_bytes())
                    .and_then(|_| c.write_all(body))
                    .is_err()
                {
                    return;
                }
            });
        }
    });
}

fn config(
    admin: u16,
    port: u16,
    dns: SocketAddr,
    target: u16,
    resolution: &str,
    endpoints: &str,
) -> String {
    proxy_yaml(admin, 2)
        + &format!(
            "  dns: {{ nameservers: [\"{dns}\"], refreshRate: 2s }}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: HTTP }}
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: backend }}
spec:
  hosts: [backend.example.test]
  ports: [{{ number: {port}, name: http, protocol: HTTP, targetPort: {target} }}]
  resolution: {resolution}
{endpoints}"
        )
}

fn who(s: &mut TcpStream) -> String {
    let (status, _, body) =
        http_request(s, b"GET / HTTP/1.1\r\nHost: backend.example.test\r\n\r\n");
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

#[test]
fn dns_answers_are_followed_and_a_failing_server_keeps_the_last_addresses() {
    let dns = DnsServer::start();
    let target = free_port();
    backend_on("127.0.0.1", target, "one");
    backend_on("127.0.0.2", target, "two");
    backend_on("127.0.0.3", target, "three");
    dns.set("backend.example.test", &[[127, 0, 0, 1]]);
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(
        &config(admin, port, dns.addr, target, "DNS", ""),
        admin,
        &[],
    );
    let mut kept = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(who(&mut kept), "one", "resolved at load");

    // The answer changes: picked up within the TTL (1 s) and a refresh, by a reload of its own.
    dns.set("backend.example.test", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 && Instant::now() < deadline {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let w = who(&mut s);
        if w != "one" {
            seen.insert(w);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["three", "two"],
        "both new addresses serve"
    );
    // The connection opened before the change still works.
    let w = who(&mut kept);
    assert!(["one", "two", "three"].contains(&w.as_str()), "{w}");
    assert!(keel.log_text().contains("DNS answer changed"));
    assert!(keel.stats()["config_reloads"]["success"].as_u64().unwrap() >= 1);

    // The server stops answering: the last addresses stay.
    dns.silent.store(true, Ordering::SeqCst);
    let asked = dns.questions.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    while dns.questions.load(Ordering::SeqCst) < asked + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dns.questions.load(Ordering::SeqCst) >= asked + 2,
        "asked again"
    );
    std::thread::sleep(Duration::from_secs(4));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let w = who(&mut s);
    assert!(["two", "three"].contains(&w.as_str()), "{w}");
    assert!(keel
        .log_text()
        .contains("DNS refresh failed; keeping the last addresses"));
}

#[test]
fn dns_round_robin_uses_one_address_and_endpoint_names_resolve() {
    let dns = DnsServer::start();
    let target = free_port();
    backend_on("127.0.0.4", target, "four");
    backend_on("127.0.0.5", target, "five");
    dns.set("backend.example.test", &[[127, 0, 0, 5], [127, 0, 0, 4]]);
    dns.set("pool.example.test", &[[127, 0, 0, 5]]);
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(
        &config(admin, port, dns.addr, target, "DNS_ROUND_ROBIN", ""),
        admin,
        &[],
    );
    for _ in 0..6 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(who(&mut s), "four", "the first (lowest) address only");
    }
    drop(keel);
    // DNS with endpoints named: each name resolved; an unknown name gives no endpoint, not an error.
    let (admin, port) = (free_port(), free_port());
    let endpoints = "  endpoints:
  - { address: pool.example.test }
  - { address: missing.example.test }
";
    let keel = Keel::start(
        &config(admin, port, dns.addr, target, "DNS", endpoints),
        admin,
        &[],
    );
    for _ in 0..4 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(who(&mut s), "five");
    }
    let (_, prom) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert!(
        prom.contains("keel_dns_lookups_total{result=\"success\"}"),
        "{prom}"
    );
}
