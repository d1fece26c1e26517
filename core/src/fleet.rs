//! The process's hold on its workers: swapping a new config in on all of them at once, draining
//! their listeners, and collecting their listening sockets for a successor process.
//!
//! A reload is compiled here, off the workers, then applied in two phases: every worker prepares
//! the new generation (and registers the sockets of new listeners), and only when all have said yes
//! does every worker commit; one no, or one worker too slow to answer, aborts it everywhere and the
//! running config stays.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use keel_config::Snapshot;
use tokio::sync::mpsc::UnboundedSender;

use crate::stats::{CounterTable, Published, Stats};
use crate::worker::{Control, DrainScope, NamedSockets};

/// How long a worker may take to answer a prepare, commit or drain before the step fails.
const WORKER_ANSWER: Duration = Duration::from_secs(10);

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new config is in force on every worker.
    Applied,
    /// The files had not changed; nothing was done.
    Unchanged,
}

/// Listening sockets handed over by a predecessor process, by listener name.
pub type Inherited = BTreeMap<String, Vec<TcpListener>>;

/// The workers, and what the process knows of the config they run.
pub struct Fleet {
    workers: Vec<UnboundedSender<Control>>,
    stats: Arc<Stats>,
    current: Arc<Snapshot>,
    /// Replaced snapshots still used by connections on some worker. Holding a reference here means
    /// the last one is always dropped by [`Fleet::reap`] on this thread, never by a worker: freeing a
    /// large config (10,000 routes: milliseconds) must not stall requests.
    retired: Vec<Arc<Snapshot>>,
}

impl Fleet {
    pub fn new(
        workers: Vec<UnboundedSender<Control>>,
        stats: Arc<Stats>,
        current: Arc<Snapshot>,
    ) -> Fleet {
        Fleet {
            workers,
            stats,
            current,
            retired: Vec::new(),
        }
    }

    /// Frees the retired snapshots no worker uses any more.
    pub fn reap(&mut self) {
        self.retired.retain(|s| Arc::strong_count(s) > 1);
        self.stats
            .reloads
            .retired
            .store(self.retired.len() as u64, Relaxed);
    }

    /// Whether some replaced config is still waiting for a worker to let go of it.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// The config in force.
    pub fn current(&self) -> &Arc<Snapshot> {
        &self.current
    }

    /// Reads the config at `path` and, if it is valid and differs from the one in force, swaps it in
    /// on every worker. On any error nothing changes, the error is logged with its file, line and
    /// field, and the failure is counted.
    pub fn reload(&mut self, path: &Path, trigger: &str) -> Result<ReloadOutcome, String> {
        let started = Instant::now();
        // The version covers certificate files too, so an unchanged one needs no TLS contexts built.
        let mut load_ms = 0.0;
        let loaded = keel_config::load_with(path, crate::dns::resolver()).and_then(|snapshot| {
            load_ms = started.elapsed().as_secs_f64() * 1000.0;
            if snapshot.version == self.current.version {
                return Ok(None);
            }
            let tls = keel_tls::build(&snapshot).map_err(keel_config::ConfigErrors)?;
            // Remote key sets it names for the first time are fetched now, before it serves.
            crate::jwks::register(&snapshot);
            crate::dns::resolver().adopt(&snapshot);
            Ok(Some((snapshot, tls)))
        });
        let result = match loaded {
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(trigger, "config reload rejected: {e}");
                }
                Err(format!("{} config error(s)", errors.0.len()))
            }
            Ok(None) => Ok(ReloadOutcome::Unchanged),
            Ok(Some((snapshot, tls))) => self
                .apply(snapshot, tls, &mut Inherited::new())
                .map(|()| ReloadOutcome::Applied),
        };
        // Serving starts at the commit: freeing the replaced config comes after, off the clock.
        let elapsed = started.elapsed();
        self.reap();
        let reloads = &self.stats.reloads;
        match &result {
            Ok(ReloadOutcome::Applied) => {
                reloads.success.fetch_add(1, Relaxed);
                reloads
                    .last_duration_ms
                    .store(elapsed.as_millis() as u64, Relaxed);
                tracing::info!(
                    trigger,
                    config_version = %self.current.version,
                    listeners = self.current.listeners.len(),
                    clusters = self.current.clusters.len(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    load_ms,
                    "config reloaded"
                );
            }
            Ok(ReloadOutcome::Unchanged) => {
                reloads.unchanged.fetch_add(1, Relaxed);
                tracing::info!(trigger, config_version = %self.current.version, "config unchanged; nothing to reload");
            }
            Err(e) => {
                reloads.failure.fetch_add(1, Relaxed);
                tracing::error!(trigger, config_version = %self.current.version, "config reload failed, the running config stays: {e}");
            }
        }
        result
    }

    /// Swaps `next` in on every worker, binding its new listeners (or taking them from
    /// `inherited`); all or nothing.
    pub fn apply(
        &mut self,
        next: Snapshot,
        tls: keel_tls::TlsContexts,
        inherited: &mut Inherited,
    ) -> Result<(), String> {
        let capture = |s: &Snapshot| {
            s.proxy
                .interception
                .as_ref()
                .map(|i| (i.mode, i.inbound_port, i.outbound_port, i.ipv6))
        };
        if capture(&self.current) != capture(&next) {
            // The capture sockets (and the iptables rules behind them) are set up at start.
            return Err("Proxy.spec.interception (mode, ports, ipv6) changed: that needs a restart, with `keel init-iptables` run again to match".into());
        }
        let next = Arc::new(next);
        let tls = Arc::new(tls);
        self.refuse_restart_only_changes(&next);
        crate::access_log::configure(next.proxy.access_log.as_ref().map(|a| a.path.as_path()));
        let previous = self.stats.published();
        let table = Arc::new(CounterTable::for_snapshot(
            &next,
            self.workers.len(),
            Some(&previous.table),
        ));
        let mut per_worker: Vec<NamedSockets> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        for l in next.listeners.iter().filter(|l| l.binds()) {
            if self
                .current
                .listeners
                .iter()
                .any(|c| c.name == l.name && c.binds())
            {
                continue;
            }
            let group = match inherited.remove(&l.name) {
                Some(g) => g,
                None => bind(l, self.workers.len()).map_err(|e| {
                    format!(
                        "listener {} ({}): cannot bind {}: {e}",
                        l.name,
                        l.direction.as_str(),
                        l.address
                    )
                })?,
            };
            distribute(&mut per_worker, &l.name, group);
        }

        let (tx, rx) = mpsc::channel();
        for (worker, sockets) in self.workers.iter().zip(per_worker) {
            let sent = worker.send(Control::Prepare {
                snapshot: next.clone(),
                tls: tls.clone(),
                table: table.clone(),
                sockets,
                reply: tx.clone(),
            });
            if sent.is_err() {
                self.abort();
                return Err("a worker has stopped".into());
            }
        }
        if let Err(e) = collect(&rx, self.workers.len()) {
            self.abort();
            return Err(format!("prepare failed: {e}"));
        }
        for worker in &self.workers {
            let _ = worker.send(Control::Commit { reply: tx.clone() });
        }
        // Every worker prepared, so a commit cannot fail; an error here is a worker gone or stuck.
        // The commit was sent to all, so the new config is what the live workers run: record it
        // as current either way, or the next reload would compare against a config nobody runs.
        if let Err(e) = collect(&rx, self.workers.len()) {
            tracing::error!("config commit: {e}; the workers that answered serve the new config");
        }
        self.stats.publish(Published {
            snapshot: next.clone(),
            table,
        });
        let old = std::mem::replace(&mut self.current, next);
        self.retired.push(old);
        Ok(())
    }

    fn abort(&self) {
        for worker in &self.workers {
            let _ = worker.send(Control::Abort);
        }
    }

    /// Settings only a restart can change: they are logged, and the running values stay.
    fn refuse_restart_only_changes(&self, next: &Snapshot) {
        let (now, then) = (&self.current.proxy, &next.proxy);
        if now.workers != then.workers {
            tracing::warn!(
                running = now.workers,
                configured = then.workers,
                "Proxy.spec.workers changed: takes effect at the next restart or upgrade"
            );
        }
        if now.admin_address != then.admin_address {
            tracing::warn!(
                running = %now.admin_address,
                configured = %then.admin_address,
                "Proxy.spec.admin.address changed: takes effect at the next restart or upgrade"
            );
        }
    }

    /// Stops accepting on the listeners in `scope` on every worker; their connections finish.
    pub fn drain(&self, scope: DrainScope) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        for worker in &self.workers {
            let _ = worker.send(Control::Drain {
                scope,
                reply: tx.clone(),
            });
        }
        collect(&rx, self.workers.len())
    }

    /// Copies of every listening socket still accepting, by listener name, for a successor.
    pub fn export_sockets(&self) -> Result<BTreeMap<String, Vec<OwnedFd>>, String> {
        let (tx, rx) = mpsc::channel();
        for worker in &self.workers {
            let _ = worker.send(Control::Export { reply: tx.clone() });
        }
        let mut out: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for _ in 0..self.workers.len() {
            match rx.recv_timeout(WORKER_ANSWER) {
                Ok(Ok(list)) => {
                    for (name, fd) in list {
                        out.entry(name).or_default().push(fd);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("a worker did not answer".into()),
            }
        }
        Ok(out)
    }

    /// Addresses of the listeners in force, by name.
    pub fn listener_addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.current
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.address))
            .collect()
    }
}

/// Hands `group` out over the workers: one socket each when the counts match; with fewer
/// sockets than workers, some workers have none for this listener; with more, some have several.
pub fn distribute(per_worker: &mut [NamedSockets], name: &str, group: Vec<TcpListener>) {
    let n = per_worker.len().max(1);
    for (i, socket) in group.into_iter().enumerate() {
        if let Some(slot) = per_worker.get_mut(i % n) {
            slot.push((name.to_string(), socket));
        }
    }
}

/// Waits for `n` answers; the first error, or a worker too slow, fails the step.
fn collect(rx: &mpsc::Receiver<Result<(), String>>, n: usize) -> Result<(), String> {
    let deadline = Instant::now() + WORKER_ANSWER;
    let mut first_error = None;
    for _ in 0..n {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => return Err("a worker did not answer in time".into()),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Binds listener `l`'s sockets, one per worker; a TPROXY capture port's with IP_TRANSPARENT.
pub fn bind(
    l: &keel_config::Listener,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let transparent = l.binding == keel_config::Binding::Capture(keel_config::CaptureMode::Tproxy);
    keel_io::listener::bind_group_with(l.address, workers, transparent)
}
