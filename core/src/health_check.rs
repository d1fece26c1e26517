//! Active health checks (the ServiceEntry's `health.keel.dev/*` annotations): a thread of its own,
//! off the workers, probes each endpoint of each checked cluster every interval — a TCP connect, or
//! an HTTP GET whose status must be one of the expected ones — and marks the endpoint unhealthy
//! after `unhealthy-threshold` failures in a row, healthy again after `healthy-threshold` passes.
//! Every worker reads the same shared record, so all of them leave an unhealthy endpoint out.
//!
//! Each probe runs in a short-lived thread of its own, so a slow or silent endpoint never delays
//! the others; a probe is bounded by the check's timeout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::HealthCheck;

use crate::stats::Stats;

/// How often the scheduler looks for checks that are due.
const TICK: Duration = Duration::from_millis(100);

/// Starts the health-check thread (it runs for the life of the process and follows reloads).
pub fn start(stats: Arc<Stats>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keel-health".into())
        .spawn(move || schedule(stats))
        .map(|_| ())
}

fn schedule(stats: Arc<Stats>) {
    let mut due: HashMap<(String, SocketAddr), Instant> = HashMap::new();
    loop {
        std::thread::sleep(TICK);
        let published = stats.published();
        let (snapshot, table) = (&published.snapshot, &published.table);
        let now = Instant::now();
        let mut seen = Vec::new();
        for (cluster, cstats) in snapshot.clusters.iter().zip(&table.clusters) {
            let Some(check) = &cluster.health_check else {
                continue;
            };
            let hosts = cstats.health_of(cluster.endpoints.iter().map(|e| e.address));
            for (endpoint, host) in cluster.endpoints.iter().zip(hosts) {
                let key = (cluster.name.clone(), endpoint.address);
                seen.push(key.clone());
                let next = due.entry(key).or_insert(now);
                if now < *next {
                    continue;
                }
                *next = now + check.interval;
                let (check, addr, name) = (check.clone(), endpoint.address, cluster.name.clone());
                let spawned = std::thread::Builder::new()
                    .name("keel-health-probe".into())
                    .spawn(move || {
                        let passed = probe(&check, addr);
                        if host.health_checked(
                            passed,
                            check.unhealthy_threshold,
                            check.healthy_threshold,
                        ) {
                            if passed {
                                // Back from unhealthy: warmed up again, as Envoy's slow start
                                // does (a no-op for clusters without warmupDurationSecs).
                                host.start_warmup(crate::generation::now_ms());
                                tracing::info!(cluster = %name, endpoint = %addr, "health check: endpoint healthy again");
                            } else {
                                tracing::warn!(cluster = %name, endpoint = %addr, "health check: endpoint unhealthy");
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a health probe");
                }
            }
        }
        due.retain(|k, _| seen.contains(k));
    }
}

/// One probe: true when the endpoint passed.
pub fn probe(check: &HealthCheck, addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, check.timeout) else {
        return false;
    };
    let Some(path) = &check.http_path else {
        return true;
    };
    let deadline = Instant::now() + check.timeout;
    let _ = stream.set_write_timeout(Some(check.timeout));
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: keel-health-check\r\nconnection: close\r\n\r\n",
        check.host
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    // The status line is all a check needs.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    status.is_some_and(|s| check.statuses.iter().any(|(a, b)| (*a..=*b).contains(&s)))
}
