//! The admin listener: readiness, health, stats and config dump over plain HTTP/1.1.
//!
//! It runs on its own thread with blocking sockets, off the workers' cores' hot path, and serves one
//! short request per connection (`Connection: close`), which is all probes and scrapers need.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::server::Event;
use crate::stats::Stats;
use crate::worker::DrainScope;

/// Admin requests served at once; more are refused with 503 rather than queued without bound.
const MAX_CONCURRENT: usize = 16;
/// Largest request head accepted.
const MAX_HEAD: usize = 8192;

/// What the admin endpoints read, and where they send what they ask of the process.
pub struct AdminState {
    pub stats: Arc<Stats>,
    pub events: mpsc::Sender<Event>,
    /// Set when a successor process has taken the admin socket over: this thread stops accepting.
    pub stop: Arc<AtomicBool>,
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
            while !state.stop.load(Ordering::Relaxed) {
                if !readable(&listener, 200) {
                    continue;
                }
                let Ok((mut conn, _)) = listener.accept() else {
                    continue;
                };
                let _ = conn.set_nonblocking(false);
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

/// Waits up to `ms` for a connection on `listener` (so the loop can notice `stop`).
fn readable(listener: &TcpListener, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd owned by this frame.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
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
    if path == "/drain_listeners" {
        // As Envoy's: POST only (a probe or a browser must not drain by accident); `?inboundonly`
        // drains only the listeners facing the mesh.
        if method != "POST" {
            let _ = respond(&mut conn, 405, "text/plain", b"use POST\n");
            return;
        }
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let scope = if query.split('&').any(|p| p == "inboundonly") {
            DrainScope::Inbound
        } else {
            DrainScope::All
        };
        let (tx, rx) = mpsc::channel();
        let answer = if state.events.send(Event::DrainListeners(scope, tx)).is_ok() {
            rx.recv_timeout(Duration::from_secs(15))
                .unwrap_or_else(|_| Err("no answer".into()))
        } else {
            Err("the process is shutting down".into())
        };
        let _ = match answer {
            Ok(()) => respond(&mut conn, 200, "text/plain", b"OK\n"),
            Err(e) => respond(&mut conn, 503, "text/plain", format!("{e}\n").as_bytes()),
        };
        return;
    }
    if path == "/logging" {
        // As Envoy's: POST only; `?level=debug` (or any tracing filter, e.g. `keel_core=trace,info`).
        if method != "POST" {
            let _ = respond(
                &mut conn,
                405,
                "text/plain",
                b"use POST /logging?level=LEVEL\n",
            );
            return;
        }
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let Some(level) = query.split('&').find_map(|p| p.strip_prefix("level=")) else {
            let _ = respond(&mut conn, 400, "text/plain", b"missing ?level=\n");
            return;
        };
        let level = level.replace("%2C", ",").replace("%3D", "=");
        let answer = match LOG_LEVEL.get() {
            Some(set) => set(&level),
            None => Err("logging is not adjustable in this process".into()),
        };
        let _ = match answer {
            Ok(()) => {
                tracing::info!(level = %level, "log level changed through the admin API");
                respond(
                    &mut conn,
                    200,
                    "text/plain",
                    format!("level: {level}\n").as_bytes(),
                )
            }
            Err(e) => respond(&mut conn, 400, "text/plain", format!("{e}\n").as_bytes()),
        };
        return;
    }
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
        "/clusters" => {
            let query = target.split_once('?').map_or("", |(_, q)| q);
            let as_json = query.split('&').any(|p| p == "format=json");
            let kind = if as_json {
                "application/json"
            } else {
                "text/plain"
            };
            (200, kind, state.stats.clusters(as_json).into_bytes())
        }
        "/config_dump" => (
            200,
            "application/json",
            json(&state.stats.published().snapshot.dump()),
        ),
        "/" => (
            200,
            "text/plain",
            b"keel admin: /ready /healthz /stats /stats/prometheus /clusters[?format=json] /config_dump, POST /drain_listeners[?inboundonly], POST /logging?level=LEVEL\n".to_vec(),
        ),
        _ => (404, "text/plain", b"not found\n".to_vec()),
    };
    let body = if method == "HEAD" { Vec::new() } else { body };
    let _ = respond(&mut conn, status, kind, &body);
}

/// Changes the log filter (set by the binary, which owns the subscriber).
pub type LogLevelControl = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL: std::sync::OnceLock<LogLevelControl> = std::sync::OnceLock::new();

/// Lets `POST /logging?level=` change the log level (called once, at start, by the binary).
pub fn set_log_level_control(control: LogLevelControl) {
    let _ = LOG_LEVEL.set(control);
}

fn json(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn respond(conn: &mut TcpStream, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
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
