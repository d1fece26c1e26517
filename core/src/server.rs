//! Process lifecycle: bind everything, start the workers, serve; reload on SIGHUP or a file change;
//! drain on SIGTERM; hand the sockets to a new binary on upgrade.
//!
//! Every socket is bound and every worker's runtime is built before the process reports ready; if
//! any of that fails, nothing is left half-started and the error says what and where. After that,
//! one control thread (this one) handles every event in turn — signals, config changes, admin
//! requests, a successor asking for the sockets — so no two reloads or drains ever overlap.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_io::unix_seqpacket::SeqPacket;
use keel_io::{driver, worker as io_worker, DriverChoice};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::admin::{self, AdminState};
use crate::fleet::{self, Fleet, Inherited};
use crate::handover;
use crate::sd_notify;
use crate::stats::Stats;
use crate::worker::{self, DrainScope, NamedSockets, Worker};
/// What `keel run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Overrides `Proxy.spec.workers`.
    pub workers: Option<usize>,
    pub driver: DriverChoice,
    /// How long connections may finish after SIGTERM (and outbound listeners keep serving) before
    /// the process exits anyway.
    pub drain_timeout: Duration,
    /// How workers move bytes between sockets.
    pub forwarding: keel_io::Forwarding,
    /// Reload when the config files change (besides SIGHUP).
    pub watch: bool,
    /// Take the listening sockets of the keel listening on this upgrade socket, then tell it to drain.
    pub upgrade_from: Option<PathBuf>,
    /// Offer this process's sockets to a successor on this Unix socket (and re-execute the binary
    /// there on SIGUSR2).
    pub upgrade_socket: Option<PathBuf>,
    /// This process's command line, re-used for the successor SIGUSR2 starts.
    pub argv: Vec<OsString>,
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

/// What the control thread reacts to.
pub enum Event {
    Signal(i32),
    /// The watcher saw the config files change.
    ConfigChanged,
    /// A certificate or key file the config names changed (rotation).
    MaterialChanged,
    /// A DNS ServiceEntry's name resolves to other addresses now.
    DnsChanged,
    /// `POST /drain_listeners`; the answer goes back to the admin request.
    DrainListeners(DrainScope, mpsc::Sender<Result<(), String>>),
    /// A successor connected to the upgrade socket.
    Successor(SeqPacket),
}

/// Runs Keel until SIGTERM (drain), SIGINT (fast exit) or a completed upgrade, then returns.
pub fn run(opts: RunOptions) -> Result<(), StartError> {
    // Signals first: a SIGTERM during start-up must drain, not kill.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2])
        .map_err(|e| StartError::Other(format!("cannot install signal handlers: {e}")))?;
    let (snapshot, tls) =
        crate::config::load_resolving(&opts.config).map_err(StartError::Config)?;
    crate::dns::resolver().adopt(&snapshot);
    // Remote JWKS are fetched before the first request is served.
    crate::jwks::register(&snapshot);
    let (snapshot, tls) = (Arc::new(snapshot), Arc::new(tls));
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

    let mut handed = match &opts.upgrade_from {
        Some(path) => Some(handover::take(path).map_err(StartError::Other)?),
        None => None,
    };
    let inherited_admin = handed
        .as_mut()
        .and_then(|h| h.admin.take())
        .filter(|l| l.local_addr().ok() == Some(snapshot.proxy.admin_address));
    let admin_listener = match inherited_admin {
        Some(l) => {
            l.set_nonblocking(false)
                .map_err(|e| StartError::Other(format!("admin socket: {e}")))?;
            l
        }
        None => TcpListener::bind(snapshot.proxy.admin_address).map_err(|e| {
            StartError::Other(format!(
                "admin listener {}: {e}",
                snapshot.proxy.admin_address
            ))
        })?,
    };
    let mut inherited = handed
        .as_mut()
        .map(|h| std::mem::take(&mut h.listeners))
        .unwrap_or_default();
    let per_worker = initial_sockets(&snapshot, workers, &mut inherited)?;
    // Sockets of listeners the new config no longer has close here; the old process drains them.
    drop(inherited);

    crate::access_log::configure(snapshot.proxy.access_log.as_ref().map(|a| a.path.as_path()));
    let stats = Stats::new(&snapshot, driver, workers);
    crate::health_check::start(stats.clone())
        .map_err(|e| StartError::Other(format!("cannot start the health-check thread: {e}")))?;
    let table = stats.published().table;
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(workers);
    let mut controls = Vec::with_capacity(workers);
    for (id, sockets) in per_worker.into_iter().enumerate() {
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        controls.push(control_tx);
        let (snapshot, tls, table, stats, ready, forwarding) = (
            snapshot.clone(),
            tls.clone(),
            table.clone(),
            stats.clone(),
            ready_tx.clone(),
            opts.forwarding,
        );
        let core = cores.get(id % cores.len().max(1)).copied();
        let handle = io_worker::spawn(id, core, driver, move || {
            let w = Rc::new(Worker::new(id, snapshot, tls, &table, stats, forwarding));
            worker::run(w, sockets, control_rx, ready)
        })
        .map_err(|e| StartError::Other(format!("cannot start worker {id}: {e}")))?;
        handles.push(handle);
    }
    drop(ready_tx);
    wait_ready(&ready_rx, &mut handles, workers).map_err(StartError::Other)?;
    let mut fleet = Fleet::new(controls, stats.clone(), snapshot.clone());

    let (events_tx, events) = mpsc::channel();
    let admin_stop = Arc::new(AtomicBool::new(false));
    let admin_fd = admin_listener.as_raw_fd();
    admin::serve(
        admin_listener,
        Arc::new(AdminState {
            stats: stats.clone(),
            events: events_tx.clone(),
            stop: admin_stop.clone(),
        }),
    )
    .map_err(|e| StartError::Other(format!("cannot start admin thread: {e}")))?;
    {
        let tx = events_tx.clone();
        std::thread::Builder::new()
            .name("keel-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if tx.send(Event::Signal(signal)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StartError::Other(format!("cannot start the signal thread: {e}")))?;
    }
    {
        let tx = events_tx.clone();
        crate::dns::resolver().start(move || {
            let _ = tx.send(Event::DnsChanged);
        });
    }
    if opts.watch {
        let tx = events_tx.clone();
        if let Err(e) = keel_config::watch::spawn(&opts.config, WATCH_DEBOUNCE, move || {
            let _ = tx.send(Event::ConfigChanged);
        }) {
            tracing::warn!(config = %opts.config.display(), error = %e, "cannot watch the config; reload with SIGHUP");
        }
    }
    let material = if opts.watch {
        let tx = events_tx.clone();
        match keel_config::watch::FilesWatch::spawn(WATCH_DEBOUNCE, move || {
            let _ = tx.send(Event::MaterialChanged);
        }) {
            Ok(w) => {
                w.watch(&snapshot.material_files);
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch certificate files; reload with SIGHUP after rotating");
                None
            }
        }
    } else {
        None
    };

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
        match l.binding {
            keel_config::Binding::Bound => {
                tracing::info!(listener = %l.name, direction = l.direction.as_str(), address = %l.address, "listening")
            }
            keel_config::Binding::Capture(mode) => {
                tracing::info!(listener = %l.name, direction = l.direction.as_str(), address = %l.address, mode = mode.as_str(), "capturing")
            }
            keel_config::Binding::Virtual => {
                tracing::debug!(listener = %l.name, direction = l.direction.as_str(), address = %l.address, "serving captured connections to")
            }
        }
    }
    if let Some(h) = handed {
        let pid = h.predecessor.pid;
        // systemd follows the new main PID (NotifyAccess=all) before the old process exits.
        sd_notify::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        match h.predecessor.release() {
            Ok(()) => tracing::info!(old_pid = pid, "took over from the old process; it drains"),
            Err(e) => tracing::warn!(old_pid = pid, "upgrade: {e}"),
        }
    } else {
        sd_notify::notify("READY=1");
    }
    let successors = match &opts.upgrade_socket {
        Some(path) => Some(offer_sockets(path, events_tx.clone()).map_err(StartError::Other)?),
        None => None,
    };
    drop(events_tx);
    // The fleet holds the config in force from here on; this start-up reference would otherwise
    // keep the first config (tens of MB at 10,000 routes) alive for the life of the process.
    drop((snapshot, tls));

    let control = Control {
        opts: &opts,
        stats: &stats,
        admin_fd,
        admin_stop: &admin_stop,
        material,
    };
    schedule_as_batch();
    let result = control.serve(&mut fleet, &events);
    if let (Some((stop, inode)), Some(path)) = (successors, &opts.upgrade_socket) {
        stop.store(true, Ordering::Relaxed);
        // After an upgrade the path is the successor's socket: remove only our own.
        if result != Exit::Upgraded && inode_of(path) == Some(inode) {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

/// Puts the control thread (which parses and compiles reloads) under SCHED_BATCH: it keeps its fair
/// share of the CPU, so a reload is never starved, but waking up does not preempt the worker it
/// shares a core with, so a reload does not cut into requests in flight. Linux schedules threads
/// individually; the workers keep the normal policy. Failure only costs latency: logged, ignored.
fn schedule_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this thread (pid 0) with a valid, owned sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot set SCHED_BATCH on the control thread");
    }
}

/// How long the watcher waits for a burst of file events to end before reloading.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);

/// Binds (or takes from `inherited`) every listener of `snapshot`, spread over `workers`.
fn initial_sockets(
    snapshot: &keel_config::Snapshot,
    workers: usize,
    inherited: &mut Inherited,
) -> Result<Vec<NamedSockets>, StartError> {
    let mut per_worker: Vec<NamedSockets> = (0..workers).map(|_| Vec::new()).collect();
    for l in snapshot.listeners.iter().filter(|l| l.binds()) {
        let group = match inherited.remove(&l.name) {
            Some(group) => group,
            None => bind_patiently(l, workers).map_err(|e| {
                StartError::Other(format!(
                    "listener {} ({}): cannot bind {}: {e}",
                    l.name,
                    l.direction.as_str(),
                    l.address
                ))
            })?,
        };
        fleet::distribute(&mut per_worker, &l.name, group);
    }
    Ok(per_worker)
}

fn inode_of(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Binds a listener's sockets, waiting up to a second for a port that is busy: when Keel restarts
/// on io_uring, the kernel closes the old process's listening sockets a few milliseconds after it
/// exits (the ring is torn down asynchronously), and a restart must not fail for that. A port that
/// stays busy is refused as before.
fn bind_patiently(l: &keel_config::Listener, workers: usize) -> std::io::Result<Vec<TcpListener>> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match fleet::bind(l, workers) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Accepts successors on the upgrade socket at `path` (each becomes an [`Event::Successor`]);
/// returns the flag that stops the thread, and the socket file's inode.
fn offer_sockets(
    path: &std::path::Path,
    events: mpsc::Sender<Event>,
) -> Result<(Arc<AtomicBool>, u64), String> {
    let listener =
        SeqPacket::listen(path).map_err(|e| format!("upgrade socket {}: {e}", path.display()))?;
    let inode =
        inode_of(path).ok_or_else(|| format!("upgrade socket {}: vanished", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("keel-upgrade".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept(Duration::from_millis(200)) {
                    Ok(Some(conn)) => {
                        if events.send(Event::Successor(conn)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade socket: accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the upgrade thread: {e}"))?;
    Ok((stop, inode))
}

/// How the control loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Drained,
    Upgraded,
    Interrupted,
}

/// The control thread's view of the process.
struct Control<'a> {
    opts: &'a RunOptions,
    stats: &'a Arc<Stats>,
    admin_fd: std::os::fd::RawFd,
    admin_stop: &'a AtomicBool,
    /// Watches the certificate and key files of the config in force.
    material: Option<keel_config::watch::FilesWatch>,
}

impl Control<'_> {
    /// Handles events until the process must exit.
    fn serve(&self, fleet: &mut Fleet, events: &mpsc::Receiver<Event>) -> Exit {
        loop {
            // A replaced config is freed soon after the last worker lets go of it (not only when
            // the control thread has been idle for a second), so that the next reload reuses its
            // memory instead of faulting in fresh pages: at 10,000 routes that is ~30 MB.
            fleet.reap();
            let wait = if fleet.has_retired() {
                Duration::from_millis(50)
            } else {
                Duration::from_secs(1)
            };
            let event = match events.recv_timeout(wait) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Exit::Interrupted,
            };
            match event {
                Event::Signal(SIGHUP) => self.reload(fleet, "SIGHUP"),
                Event::ConfigChanged => self.reload(fleet, "file change"),
                Event::MaterialChanged => self.reload(fleet, "certificate file change"),
                Event::DnsChanged => self.reload(fleet, "DNS change"),
                Event::Signal(SIGTERM) => {
                    return self.shut_down(fleet, events, DrainScope::Inbound, "SIGTERM")
                }
                Event::Signal(SIGINT) => {
                    tracing::info!("SIGINT: exiting without draining");
                    return Exit::Interrupted;
                }
                Event::Signal(SIGUSR2) => self.start_successor(),
                Event::Signal(SIGUSR1) => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    crate::access_log::reopen();
                }
                Event::Signal(other) => tracing::debug!(signal = other, "ignored signal"),
                Event::DrainListeners(scope, answer) => {
                    tracing::info!(?scope, "draining listeners on request");
                    let _ = answer.send(fleet.drain(scope));
                }
                Event::Successor(conn) => {
                    if self.hand_over(fleet, &conn) {
                        return self.shut_down(fleet, events, DrainScope::All, "upgrade");
                    }
                }
            }
        }
    }

    fn reload(&self, fleet: &mut Fleet, trigger: &str) {
        sd_notify::reloading();
        let _ = fleet.reload(&self.opts.config, trigger);
        if let Some(w) = &self.material {
            w.watch(&fleet.current().material_files);
        }
        sd_notify::notify("READY=1");
    }

    /// Gives the sockets to the successor on `conn`; true once it serves on them.
    fn hand_over(&self, fleet: &Fleet, conn: &SeqPacket) -> bool {
        let sockets = match fleet.export_sockets() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("upgrade refused: {e}");
                return false;
            }
        };
        match handover::give(conn, &sockets, Some(self.admin_fd)) {
            Ok(pid) => {
                tracing::info!(new_pid = pid, "upgrade: the new process serves; draining");
                // The successor accepts on the admin socket from now on.
                self.admin_stop.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!("upgrade abandoned, this process keeps serving: {e}");
                false
            }
        }
    }

    /// SIGUSR2: starts the binary again (as found on disk now) to take over through the
    /// upgrade socket — the systemd-friendly way, since the new process is in the unit's cgroup.
    fn start_successor(&self) {
        let Some(socket) = &self.opts.upgrade_socket else {
            tracing::warn!("SIGUSR2 ignored: no --upgrade-socket to hand the listeners over on");
            return;
        };
        let Some((program, args)) = self.opts.argv.split_first() else {
            return;
        };
        let mut keep = Vec::new();
        let mut skip = false;
        for a in args {
            if skip {
                skip = false;
                continue;
            }
            if a == "--upgrade-from" {
                skip = true;
                continue;
            }
            if a.to_string_lossy().starts_with("--upgrade-from=") {
                continue;
            }
            keep.push(a.clone());
        }
        match std::process::Command::new(program)
            .args(&keep)
            .arg("--upgrade-from")
            .arg(socket)
            .spawn()
        {
            Ok(child) => tracing::info!(pid = child.id(), "SIGUSR2: started the new binary"),
            Err(e) => {
                tracing::error!(program = %program.to_string_lossy(), error = %e, "SIGUSR2: cannot start the new binary")
            }
        }
    }

    /// Drains the listeners in `scope` and returns when their connections have closed — or, for a
    /// SIGTERM with outbound listeners (the app may still be finishing requests through them), when
    /// the drain timeout expires. A SIGINT meanwhile exits at once.
    fn shut_down(
        &self,
        fleet: &Fleet,
        events: &mpsc::Receiver<Event>,
        scope: DrainScope,
        why: &str,
    ) -> Exit {
        self.stats.set_draining();
        sd_notify::notify("STOPPING=1");
        let serve_outbound = scope == DrainScope::Inbound
            && fleet
                .current()
                .listeners
                .iter()
                .any(|l| l.direction == keel_config::Direction::Outbound);
        tracing::info!(
            drain_timeout = ?self.opts.drain_timeout,
            outbound_kept = serve_outbound,
            "{why}: draining: stopped accepting, waiting for open connections"
        );
        if let Err(e) = fleet.drain(scope) {
            tracing::warn!("drain: {e}");
        }
        let deadline = Instant::now() + self.opts.drain_timeout;
        loop {
            if !serve_outbound && self.stats.open_connections() == 0 {
                tracing::info!("drained");
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match events.recv_timeout(left.min(Duration::from_millis(10))) {
                Ok(Event::Signal(SIGINT)) => {
                    tracing::info!("SIGINT during the drain: exiting now");
                    return Exit::Interrupted;
                }
                Ok(Event::DrainListeners(_, answer)) => {
                    let _ = answer.send(Err("already draining".into()));
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left.min(Duration::from_millis(10)))
                }
            }
        }
        let open = self.stats.open_connections();
        if open > 0 {
            tracing::info!(
                open,
                "drain timeout reached; closing the remaining connections"
            );
        } else if serve_outbound {
            tracing::info!("drained");
        }
        if why == "upgrade" {
            Exit::Upgraded
        } else {
            Exit::Drained
        }
    }
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
