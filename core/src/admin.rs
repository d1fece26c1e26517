//! The admin listener: readiness, health, stats and config dump over plain HTTP/1.1.
//!
//! It runs on its own thread with blocking sockets, off the workers' cores' hot path, and serves one
//! short request per connection (`Connection: close`), which is all probes and scrapers need.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_config::Snapshot;

use crate::stats::Stats;

/// Admin requests served at once; more are refused with 503 rather than queued without bound.
const MAX_CONCURRENT: usize = 16;
/// Largest request head accepted.
const MAX_HEAD: usize = 8192;

/// What the admin endpoints read.
pub struct AdminState {
    pub stats: Arc<Stats>,
    pub snapshot: Arc<Snapshot>,
}

/// Serves the admin API on `listener` until the process exits.
pub fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("keel-admin".into())
        .spawn(move || {
            let busy = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = respond(&mut conn, 503, "text/plain", b"admin busy\n");
                    continue;
                }
                let (state, busy) = (state.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("keel-admin-conn".into())
                    .spawn(move || {
                        handle(conn, &state);
                        busy.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    tracing::warn!("admin: cannot spawn a thread for a request");
                }
            }
        })
}

fn handle(mut conn: TcpStream, state: &AdminState) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            let _ = respond(&mut conn, 431, "text/plain", b"request head too large\n");
            return;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        let _ = respond(&mut conn, 405, "text/plain", b"method not allowed\n");
        return;
    }
    let (status, kind, body): (u16, &str, Vec<u8>) = match path {
        "/ready" if state.stats.is_ready() => (200, "text/plain", b"LIVE\n".to_vec()),
        "/ready" if state.stats.is_draining() => (503, "text/plain", b"DRAINING\n".to_vec()),
        "/ready" => (503, "text/plain", b"NOT READY\n".to_vec()),
        "/healthz" => (200, "text/plain", b"OK\n".to_vec()),
        "/stats" => (200, "application/json", json(&state.stats.json())),
        "/stats/prometheus" => (
            200,
            "text/plain; version=0.0.4",
            state.stats.prometheus().into_bytes(),
        ),
        "/config_dump" => (200, "application/json", json(&state.snapshot.dump)),
        "/" => (
            200,
            "text/plain",
            b"keel admin: /ready /healthz /stats /stats/prometheus /config_dump\n".to_vec(),
        ),
        _ => (404, "text/plain", b"not found\n".to_vec()),
    };
    let body = if method == "HEAD" { Vec::new() } else { body };
    let _ = respond(&mut conn, status, kind, &body);
}

fn json(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn respond(conn: &mut TcpStream, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!("HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}
