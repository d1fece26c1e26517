//! Resolution of ServiceEntry hosts with resolution DNS / DNS_ROUND_ROBIN, off the workers.
//!
//! A config load asks [`Resolver`] (as `keel_config`'s [`Dns`]) for each name: a name seen before
//! answers from the cache, a new one is resolved there and then (the load runs on the control
//! thread). A background thread resolves every name again when its record's TTL runs out (at
//! least every second, at most every `Proxy.spec.dns.refreshRate`); when an answer changes it
//! asks for a reload, which compiles a snapshot with the new endpoints and swaps it in on every
//! worker like any other — open connections are untouched. A failed lookup keeps the last
//! addresses, as Envoy does.
//!
//! Keel asks the name servers itself (UDP, TCP when the answer is truncated) rather than through
//! `getaddrinfo`, so that a test or an operator can point it at a server of their choosing.

pub mod wire;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use keel_config::compile::Dns;

/// One attempt's wait for an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How soon a failed lookup is tried again.
const FAILURE_RETRY: Duration = Duration::from_secs(5);

/// A name's last answer and when to ask again.
#[derive(Debug, Clone)]
struct Entry {
    servers: Vec<SocketAddr>,
    addresses: Vec<IpAddr>,
    next: Instant,
}

/// The process's resolver: the cache of names the config resolves, and its refresh thread.
pub struct Resolver {
    entries: Mutex<HashMap<String, Entry>>,
    /// `Proxy.spec.dns.refreshRate` of the config in force, in ms.
    refresh_ms: AtomicU64,
    /// Called (on the refresh thread) when an answer changed.
    on_change: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Lookups by outcome, for `/stats/prometheus` (`keel_dns_lookups_total`).
    pub success: AtomicU64,
    pub failure: AtomicU64,
}

/// The process's resolver.
pub fn resolver() -> Arc<Resolver> {
    static R: OnceLock<Arc<Resolver>> = OnceLock::new();
    R.get_or_init(|| {
        Arc::new(Resolver {
            entries: Mutex::new(HashMap::new()),
            refresh_ms: AtomicU64::new(60_000),
            on_change: Mutex::new(None),
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
        })
    })
    .clone()
}

impl Dns for Resolver {
    fn lookup(&self, servers: &[SocketAddr], name: &str) -> Option<Vec<IpAddr>> {
        if let Some(e) = self.lock().get(name).filter(|e| e.servers == servers) {
            return Some(e.addresses.clone());
        }
        let (addresses, next) = match resolve(servers, name) {
            Ok((a, ttl)) => {
                self.success.fetch_add(1, Relaxed);
                (a, Instant::now() + self.interval(ttl))
            }
            Err(e) => {
                self.failure.fetch_add(1, Relaxed);
                tracing::warn!(%name, error = %e, "DNS lookup failed; the cluster has no endpoints from this name until it resolves");
                (Vec::new(), Instant::now() + FAILURE_RETRY)
            }
        };
        self.lock().insert(
            name.to_string(),
            Entry {
                servers: servers.to_vec(),
                addresses: addresses.clone(),
                next,
            },
        );
        Some(addresses)
    }
}

impl Resolver {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When to ask again after an answer with `ttl`.
    fn interval(&self, ttl: u32) -> Duration {
        let max = Duration::from_millis(self.refresh_ms.load(Relaxed).max(1000));
        Duration::from_secs(u64::from(ttl)).clamp(Duration::from_secs(1), max)
    }

    /// After a load: keep only the names `snapshot` uses, with its refresh rate.
    pub fn adopt(&self, snapshot: &keel_config::Snapshot) {
        self.refresh_ms
            .store(snapshot.proxy.dns_refresh.as_millis() as u64, Relaxed);
        self.lock()
            .retain(|name, _| snapshot.dns_names.iter().any(|n| n == name));
    }

    /// Starts the refresh thread; `on_change` asks for a reload.
    pub fn start(self: &Arc<Self>, on_change: impl Fn() + Send + 'static) {
        *self.on_change.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(on_change));
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("keel-dns".into())
            .spawn(move || me.refresh_loop());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the DNS refresh thread; names are resolved at reloads only");
        }
    }

    fn refresh_loop(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = Instant::now();
            let due: Vec<(String, Vec<SocketAddr>)> = self
                .lock()
                .iter()
                .filter(|(_, e)| e.next <= now)
                .map(|(n, e)| (n.clone(), e.servers.clone()))
                .collect();
            let mut changed = false;
            for (name, servers) in due {
                let result = resolve(&servers, &name);
                let mut entries = self.lock();
                let Some(e) = entries.get_mut(&name) else {
                    continue;
                };
                match result {
                    Ok((addresses, ttl)) => {
                        self.success.fetch_add(1, Relaxed);
                        e.next = Instant::now() + self.interval(ttl);
                        if addresses != e.addresses {
                            tracing::info!(%name, from = ?e.addresses, to = ?addresses, "DNS answer changed");
                            e.addresses = addresses;
                            changed = true;
                        }
                    }
                    Err(err) => {
                        self.failure.fetch_add(1, Relaxed);
                        e.next = Instant::now() + FAILURE_RETRY;
                        tracing::warn!(%name, error = %err, "DNS refresh failed; keeping the last addresses");
                    }
                }
            }
            if changed {
                if let Some(f) = &*self.on_change.lock().unwrap_or_else(|e| e.into_inner()) {
                    f();
                }
            }
        }
    }
}

/// The name servers of /etc/resolv.conf (port 53), or loopback's if it names none.
fn system_servers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if servers.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 53))]
    } else {
        servers
    }
}

/// A/AAAA for `name` from the first server that answers: addresses (sorted) and the smallest TTL.
pub fn resolve(servers: &[SocketAddr], name: &str) -> Result<(Vec<IpAddr>, u32), String> {
    let system;
    let servers = if servers.is_empty() {
        system = system_servers();
        &system
    } else {
        servers
    };
    let mut last = String::from("no name server");
    for server in servers {
        let mut all = Vec::new();
        let mut ttl = u32::MAX;
        let mut ok = true;
        for qtype in [wire::TYPE_A, wire::TYPE_AAAA] {
            match ask(*server, name, qtype) {
                Ok(a) => {
                    all.extend(a.addresses);
                    if a.ttl > 0 {
                        ttl = ttl.min(a.ttl);
                    }
                }
                Err(e) => {
                    last = format!("{server}: {e}");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            all.sort();
            all.dedup();
            return Ok((all, if ttl == u32::MAX { 0 } else { ttl }));
        }
    }
    Err(last)
}

/// One question to one server: UDP, again over TCP if the answer is truncated.
fn ask(server: SocketAddr, name: &str, qtype: u16) -> Result<wire::Answer, String> {
    let id = random_id();
    let q = wire::query(id, name, qtype).map_err(|e| format!("{e:?}"))?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.connect(server).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(ATTEMPT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    for _attempt in 0..2 {
        sock.send(&q).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + ATTEMPT_TIMEOUT;
        while Instant::now() < deadline {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e.to_string()),
            };
            match wire::parse_response(&buf[..n], id, name) {
                Ok(a) => return Ok(a),
                // A stray datagram (another id): keep waiting for ours.
                Err(wire::WireError::NotOurs) => continue,
                Err(wire::WireError::Truncated) => return ask_tcp(server, &q, id, name),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    }
    Err("no answer".into())
}

fn ask_tcp(server: SocketAddr, q: &[u8], id: u16, name: &str) -> Result<wire::Answer, String> {
    let mut s = TcpStream::connect_timeout(&server, ATTEMPT_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(ATTEMPT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    s.write_all(&framed).map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).map_err(|e| e.to_string())?;
    wire::parse_response(&msg, id, name).map_err(|e| format!("{e:?}"))
}

/// A query id nobody on the path can guess (it and the source port are what a spoofed answer
/// must match).
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return t as u16;
    }
    u16::from_be_bytes(b)
}
