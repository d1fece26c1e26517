//! Process lifecycle: bind everything, start the workers, serve, and drain on SIGTERM/SIGINT.
//!
//! Every socket is bound and every worker's runtime is built before the process reports ready; if
//! any of that fails, nothing is left half-started and the error says what and where.

use std::net::TcpListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_io::{driver, worker as io_worker, DriverChoice};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::admin::{self, AdminState};
use crate::stats::Stats;
use crate::worker::{self, Worker};

/// What `keel run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Overrides `Proxy.spec.workers`.
    pub workers: Option<usize>,
    pub driver: DriverChoice,
    /// How long open connections may finish after SIGTERM before the process exits anyway.
    pub drain_timeout: Duration,
    /// How workers move bytes between sockets.
    pub forwarding: keel_io::Forwarding,
}

/// Why `keel run` could not start.
#[derive(Debug)]
pub enum StartError {
    /// The config is invalid; each error names its file, line and field.
    Config(keel_config::ConfigErrors),
    /// Anything else, already phrased for the operator.
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Other(e) => f.write_str(e),
        }
    }
}

/// Runs Keel until SIGTERM or SIGINT, then drains and returns.
pub fn run(opts: RunOptions) -> Result<(), StartError> {
    // Signals first: a SIGTERM during start-up must drain, not kill.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| StartError::Other(format!("cannot install signal handlers: {e}")))?;
    let snapshot = Arc::new(keel_config::load(&opts.config).map_err(StartError::Config)?);
    let driver = driver::resolve(opts.driver).map_err(StartError::Other)?;
    let cores = io_worker::allowed_cores();
    let workers = opts
        .workers
        .filter(|n| *n > 0)
        .unwrap_or(if snapshot.proxy.workers > 0 {
            snapshot.proxy.workers
        } else {
            cores.len()
        });

    let admin_listener = TcpListener::bind(snapshot.proxy.admin_address).map_err(|e| {
        StartError::Other(format!(
            "admin listener {}: {e}",
            snapshot.proxy.admin_address
        ))
    })?;
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    for l in &snapshot.listeners {
        let group = keel_io::listener::bind_group(l.address, workers).map_err(|e| {
            StartError::Other(format!(
                "listener {} ({}): cannot bind {}: {e}",
                l.name,
                l.direction.as_str(),
                l.address
            ))
        })?;
        for (slot, socket) in per_worker.iter_mut().zip(group) {
            slot.push(socket);
        }
    }

    let stats = Stats::new(&snapshot, driver, workers);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(workers);
    for (id, listeners) in per_worker.into_iter().enumerate() {
        let (snapshot, stats, shutdown, ready, forwarding) = (
            snapshot.clone(),
            stats.clone(),
            shutdown_rx.clone(),
            ready_tx.clone(),
            opts.forwarding,
        );
        let core = cores.get(id % cores.len().max(1)).copied();
        let handle = io_worker::spawn(id, core, driver, move || {
            let w = Rc::new(Worker::new(id, snapshot, stats, forwarding));
            worker::run(w, listeners, shutdown, ready)
        })
        .map_err(|e| StartError::Other(format!("cannot start worker {id}: {e}")))?;
        handles.push(handle);
    }
    drop(ready_tx);
    if let Err(e) = wait_ready(&ready_rx, &mut handles, workers) {
        let _ = shutdown_tx.send(true);
        return Err(StartError::Other(e));
    }

    admin::serve(
        admin_listener,
        Arc::new(AdminState {
            stats: stats.clone(),
            snapshot: snapshot.clone(),
        }),
    )
    .map_err(|e| StartError::Other(format!("cannot start admin thread: {e}")))?;
    stats.set_ready();
    tracing::info!(
        io_driver = %driver,
        forwarding = ?opts.forwarding,
        workers,
        listeners = snapshot.listeners.len(),
        admin = %snapshot.proxy.admin_address,
        config_version = %snapshot.version,
        "keel ready"
    );
    for l in &snapshot.listeners {
        tracing::info!(listener = %l.name, direction = l.direction.as_str(), address = %l.address, "listening");
    }

    for signal in signals.forever() {
        match signal {
            SIGHUP => tracing::warn!(
                "SIGHUP received: config reload is not supported yet; the running config stays"
            ),
            _ => break,
        }
    }
    stats.set_draining();
    tracing::info!(drain_timeout = ?opts.drain_timeout, "draining: stopped accepting, waiting for open connections");
    let _ = shutdown_tx.send(true);
    let deadline = Instant::now() + opts.drain_timeout;
    while Instant::now() < deadline && handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let open: u64 = stats
        .listeners
        .iter()
        .flat_map(|l| l.slots.iter())
        .map(|c| c.accepted.get().saturating_sub(c.closed.get()))
        .sum();
    if open > 0 {
        tracing::info!(
            open,
            "drain timeout reached; closing the remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    Ok(())
}

/// Waits until every worker has registered its listeners, or reports the first that could not.
fn wait_ready(
    ready: &mpsc::Receiver<Result<usize, String>>,
    handles: &mut Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    workers: usize,
) -> Result<(), String> {
    let mut started = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while started < workers {
        match ready.recv_timeout(Duration::from_millis(20)) {
            Ok(Ok(_)) => started += 1,
            Ok(Err(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Disconnected) if started < workers => {
                return Err(finished_error(handles)
                    .unwrap_or_else(|| "a worker exited during start-up".into()));
            }
            Err(_) => {
                if let Some(e) = finished_error(handles) {
                    return Err(e);
                }
                if Instant::now() > deadline {
                    return Err("workers did not start within 30 s".into());
                }
            }
        }
    }
    Ok(())
}

fn finished_error(
    handles: &mut Vec<std::thread::JoinHandle<std::io::Result<()>>>,
) -> Option<String> {
    let i = handles.iter().position(|h| h.is_finished())?;
    let h = handles.swap_remove(i);
    Some(match h.join() {
        Ok(Err(e)) => format!("worker runtime failed to start: {e}"),
        Ok(Ok(())) => "a worker exited during start-up".into(),
        Err(_) => "a worker panicked during start-up".into(),
    })
}
