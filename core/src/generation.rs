//! A worker's view of one config version: the snapshot, its counters, and the balancer state built
//! from it.
//!
//! A reload gives every worker a new [`Generation`]; the old one lives on, unchanged, in the
//! connections and requests that started on it, and is freed when the last of them ends. What must
//! outlive a generation — a listener's socket, drain state and counters — sits in [`ListenerState`],
//! which the new generation takes over from the old one when the listener is kept.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use keel_config::{Cluster, LbPolicy, Snapshot};
use keel_lb::{outlier, Balancer, LeastRequest, Maglev, RingHash, Rng, RoundRobin, WeightedRandom};
use tokio::sync::watch;

use crate::stats::{ClusterStats, CounterTable, ListenerStats};

/// One listener on one worker, for as long as its sockets are open, across config versions.
pub struct ListenerState {
    pub name: String,
    pub stats: Arc<ListenerStats>,
    /// Where the listener sits in the worker's current generation (stale once it is removed).
    pub index: Cell<usize>,
    /// Turns true when the listener drains: its accept loops stop (closing its sockets) and its
    /// HTTP connections close after the response in progress, or at once when idle.
    draining: watch::Sender<bool>,
    /// Set when a reload gives the same address to a listener of another kind (say, inbound
    /// instead of outbound): the sockets carry on accepting for that one instead of closing.
    successor: RefCell<Option<Rc<ListenerState>>>,
}

impl ListenerState {
    fn new(name: String, stats: Arc<ListenerStats>, index: usize) -> ListenerState {
        ListenerState {
            name,
            stats,
            index: Cell::new(index),
            draining: watch::Sender::new(false),
            successor: RefCell::new(None),
        }
    }

    /// Drains this listener's connections, but hands its sockets to `next` (same address).
    pub fn hand_over_to(&self, next: Rc<ListenerState>) {
        *self.successor.borrow_mut() = Some(next);
        self.drain();
    }

    /// Who takes this listener's sockets over, if anyone.
    pub fn successor(&self) -> Option<Rc<ListenerState>> {
        self.successor.borrow().clone()
    }

    /// A lone listener state, for unit tests of what hangs off one.
    #[cfg(test)]
    pub fn for_test() -> Rc<ListenerState> {
        let stats = Arc::new(ListenerStats {
            name: "test".into(),
            direction: "inbound",
            slots: Box::new([]),
        });
        Rc::new(ListenerState::new("test".into(), stats, 0))
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Stops accepting on this listener and lets its connections finish.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// A receiver an accept loop waits on to learn that the listener drains.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }
}

/// One config version as one worker runs it.
pub struct Generation {
    pub snapshot: Arc<Snapshot>,
    /// A fingerprint of what this workload's side of Istio's metric labels is made of (name,
    /// namespace, app and version labels, identity): series keep their counts across reloads that
    /// leave it alone.
    pub labels_key: u64,
    /// A fingerprint of each listener's name, in the snapshot's order (metric series keys).
    pub listener_keys: Vec<u64>,
    /// The TLS contexts built for the snapshot (indexed as its listeners and clusters).
    pub tls: Arc<keel_tls::TlsContexts>,
    /// Per listener of the snapshot, in its order.
    pub listeners: Vec<Rc<ListenerState>>,
    /// Per cluster of the snapshot, in its order.
    pub clusters: Vec<Arc<ClusterStats>>,
    balancers: RefCell<Vec<Balancer>>,
    routes: Vec<Option<WeightedRandom>>,
    /// Virtual listeners by (inbound?, address): what a capture port looks up for each connection
    /// (an exact address, then the wildcard address of its port) without a scan of all listeners.
    virtual_listeners: std::collections::HashMap<(bool, std::net::SocketAddr), usize>,
    /// Per cluster with locality-prioritized balancing: its endpoints grouped by priority, best
    /// first (see [`pick_by_locality`]).
    localities: Vec<Option<Vec<Vec<usize>>>>,
    /// Per cluster: its outlier detection policy, if any, and its endpoints' shared records
    /// (ejection state, requests in flight), indexed as its endpoints.
    /// Whether the cluster has active health checks is the third field.
    health: Vec<(Option<outlier::Policy>, Vec<Arc<outlier::HostHealth>>, bool)>,
    /// JWT key sets and verified tokens for the snapshot's RequestAuthentications.
    pub security: crate::security::SecurityState,
    /// The snapshot's local rate limits (shared by all workers), in its order.
    pub rate_limits: Vec<Arc<crate::rate_limit::Limiter>>,
    /// What every span of this workload says about it (service, node, namespace).
    pub trace_source: Arc<crate::trace::Source>,
}

/// Milliseconds since the process started: outlier detection's clock, the same on every worker.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // Offset by one so that 0 ("never ejected") is in the past from the start.
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Generation {
    /// Worker `worker`'s generation for `snapshot`, taking over `previous`'s listener states for
    /// listeners that are kept (same name and direction). Round robin starts at a different
    /// endpoint per worker.
    pub fn new(
        worker: usize,
        snapshot: Arc<Snapshot>,
        tls: Arc<keel_tls::TlsContexts>,
        table: &CounterTable,
        previous: Option<&Generation>,
    ) -> Generation {
        let listeners = snapshot
            .listeners
            .iter()
            .zip(&table.listeners)
            .enumerate()
            .map(|(index, (l, stats))| {
                previous
                    .and_then(|p| {
                        p.listeners
                            .iter()
                            .find(|s| s.name == l.name && Arc::ptr_eq(&s.stats, stats))
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        Rc::new(ListenerState::new(l.name.clone(), stats.clone(), index))
                    })
            })
            .collect();
        let balancers = snapshot
            .clusters
            .iter()
            .map(|c| balancer_for(c, worker))
            .collect();
        let virtual_listeners = snapshot
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| l.binding == keel_config::Binding::Virtual)
            .map(|(i, l)| {
                (
                    (l.direction == keel_config::Direction::Inbound, l.address),
                    i,
                )
            })
            .collect();
        let routes = snapshot
            .listeners
            .iter()
            .map(|l| {
                (l.route.len() > 1).then(|| {
                    WeightedRandom::new(&l.route.iter().map(|w| w.weight).collect::<Vec<_>>())
                })
            })
            .collect();
        let health = snapshot
            .clusters
            .iter()
            .zip(&table.clusters)
            .map(|(c, stats)| {
                let policy = c.outlier.map(|od| outlier::Policy {
                    consecutive_5xx: od.consecutive_5xx,
                    consecutive_gateway: od.consecutive_gateway,
                    interval_ms: od.interval.as_millis() as u64,
                    base_ejection_ms: od.base_ejection.as_millis() as u64,
                    max_ejection_percent: od.max_ejection_percent,
                    min_health_percent: od.min_health_percent,
                });
                (
                    policy,
                    stats.health_of(c.endpoints.iter().map(|e| e.address)),
                    c.health_check.is_some(),
                )
            })
            .collect();
        let localities = snapshot
            .clusters
            .iter()
            .map(|c| {
                let mut levels: Vec<Vec<usize>> = vec![Vec::new(); 5];
                for (i, e) in c.endpoints.iter().enumerate() {
                    levels[usize::from(e.priority.min(4))].push(i);
                }
                levels.retain(|l| !l.is_empty());
                (levels.len() > 1).then_some(levels)
            })
            .collect();
        Generation {
            security: crate::security::SecurityState::new(&snapshot.security),
            rate_limits: crate::rate_limit::limiters(&snapshot.rate_limits),
            trace_source: Arc::new(crate::trace::Source::of_snapshot(&snapshot)),
            localities,
            labels_key: {
                let p = &snapshot.proxy;
                let id = tls.identity.as_ref().map_or("", |i| i.uri());
                let text = format!(
                    "{}\n{}\n{:?}\n{:?}\n{id}",
                    p.name,
                    p.namespace,
                    p.labels.get("app"),
                    p.labels.get("version")
                );
                keel_lb::hash::hash_bytes(text.as_bytes(), 0)
            },
            listener_keys: snapshot
                .listeners
                .iter()
                .map(|l| keel_lb::hash::hash_bytes(l.name.as_bytes(), 1))
                .collect(),
            health,
            clusters: table.clusters.clone(),
            snapshot,
            tls,
            listeners,
            balancers: RefCell::new(balancers),
            routes,
            virtual_listeners,
        }
    }

    /// The virtual listener serving a connection captured in `direction` and bound for `dst`:
    /// the listener at that exact address, else the one at the wildcard address of its port
    /// (as [`keel_config::Listener::virtual_for`] finds it, by a hash lookup).
    pub fn virtual_listener(
        &self,
        direction: keel_config::Direction,
        dst: std::net::SocketAddr,
    ) -> Option<usize> {
        let inbound = direction == keel_config::Direction::Inbound;
        let any = match dst {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([0u8; 4]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
        };
        let v4_any = std::net::SocketAddr::new(std::net::IpAddr::from([0u8; 4]), dst.port());
        self.virtual_listeners
            .get(&(inbound, dst))
            .or_else(|| {
                self.virtual_listeners
                    .get(&(inbound, std::net::SocketAddr::new(any, dst.port())))
            })
            .or_else(|| self.virtual_listeners.get(&(inbound, v4_any)))
            .copied()
    }

    /// Points each listener state at its place in this generation; called when it goes live.
    pub fn adopt_listeners(&self) {
        for (i, l) in self.listeners.iter().enumerate() {
            l.index.set(i);
        }
    }

    /// Whether `state` is one of this generation's listeners (it was not removed).
    pub fn has_listener(&self, state: &Rc<ListenerState>) -> bool {
        self.listeners.iter().any(|s| Rc::ptr_eq(s, state))
    }

    /// The cluster a new connection on listener `listener` goes to (weighted when the route splits).
    pub fn pick_cluster(&self, listener: usize, rng: &mut Rng) -> Option<usize> {
        let route = &self.snapshot.listeners.get(listener)?.route;
        match self.routes.get(listener)? {
            None => route.first().map(|w| w.cluster),
            Some(picker) => picker.pick(rng).map(|i| route[i].cluster),
        }
    }

    /// The endpoint index of `cluster` for the next connection or request, counted as in flight
    /// (for least request) until the returned guard drops.
    /// `key` is the request's hash for consistent hashing (see [`Generation::hash_key`]).
    pub fn pick_endpoint(
        &self,
        cluster: usize,
        rng: &mut Rng,
        key: Option<u64>,
    ) -> Option<InFlight<'_>> {
        let mut balancers = self.balancers.borrow_mut();
        let balancer = balancers.get_mut(cluster)?;
        let (policy, hosts, checked) = self.health.get(cluster)?;
        let mut endpoint = match self.localities.get(cluster).and_then(Option::as_ref) {
            Some(levels) => {
                let weights = &self.snapshot.clusters[cluster].endpoints;
                pick_by_locality(levels, |i| weights[i].weight, hosts, rng, now_ms())?
            }
            None => balancer.pick_keyed(rng, key)?,
        };
        let by_locality = self.localities.get(cluster).is_some_and(Option::is_some);
        if (policy.is_some() || *checked) && !by_locality {
            // An ejected or unhealthy endpoint is picked again (at random, up to five times),
            // then passed over for the first one left — unless too few are left (minHealthPercent,
            // or none at all: then all take traffic, Envoy's panic mode).
            let now = now_ms();
            let ejected = |i: usize| hosts.get(i).is_some_and(|h| h.is_excluded(now));
            let min_health = policy.map_or(0, |p| p.min_health_percent);
            if ejected(endpoint)
                && outlier::exclusions_apply(min_health, hosts.iter().map(|h| &**h), now)
            {
                for _ in 0..5 {
                    endpoint = balancer.pick_keyed(rng, None)?;
                    if !ejected(endpoint) {
                        break;
                    }
                }
                if ejected(endpoint) {
                    endpoint = (0..hosts.len()).find(|i| !ejected(*i)).unwrap_or(endpoint);
                }
            }
        }
        // Slow start: an endpoint warming up keeps a pick with the share of its weight it has
        // reached, else another is drawn (twice at most), so its traffic ramps up.
        if let Some(window) = self.snapshot.clusters[cluster].warmup {
            let (now, window) = (now_ms(), window.as_millis() as u64);
            for _ in 0..2 {
                let f = hosts
                    .get(endpoint)
                    .map_or(1.0, |h| h.warmup_factor(now, window));
                if f >= 1.0 || (rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 < f {
                    break;
                }
                let again = match self.localities.get(cluster).and_then(Option::as_ref) {
                    Some(levels) => {
                        let weights = &self.snapshot.clusters[cluster].endpoints;
                        pick_by_locality(levels, |i| weights[i].weight, hosts, rng, now)
                    }
                    None => balancer.pick_keyed(rng, key),
                };
                match again {
                    Some(e) if !hosts.get(e).is_some_and(|h| h.is_excluded(now)) => endpoint = e,
                    _ => break,
                }
            }
        }
        balancer.started(endpoint);
        if let Some(h) = hosts.get(endpoint) {
            h.started();
        }
        Some(InFlight {
            gen: self,
            cluster,
            endpoint,
            started: balancer.wants_latency().then(std::time::Instant::now),
        })
    }

    /// Tells outlier detection how a request to `endpoint` of `cluster` went; counts an ejection
    /// on `worker`'s slot.
    pub fn report(
        &self,
        worker: usize,
        cluster: usize,
        endpoint: usize,
        outcome: outlier::Outcome,
    ) {
        let Some((Some(policy), hosts, _)) = self.health.get(cluster) else {
            return;
        };
        if outlier::report(policy, hosts, endpoint, outcome, now_ms()) {
            self.clusters[cluster].slots[worker].outlier_ejections.inc();
            tracing::warn!(
                cluster = %self.snapshot.clusters[cluster].name,
                endpoint = %self.snapshot.clusters[cluster].endpoints[endpoint].address,
                "outlier detection ejected an endpoint"
            );
        }
    }
}

impl Generation {
    /// Endpoint `endpoint` of `cluster`, chosen by the caller (a retry avoiding hosts already
    /// tried), counted as in flight like a balancer's pick.
    pub fn hold_endpoint(&self, cluster: usize, endpoint: usize) -> Option<InFlight<'_>> {
        let mut balancers = self.balancers.borrow_mut();
        let balancer = balancers.get_mut(cluster)?;
        if endpoint >= self.snapshot.clusters.get(cluster)?.endpoints.len() {
            return None;
        }
        balancer.started(endpoint);
        if let Some(h) = self
            .health
            .get(cluster)
            .and_then(|(_, h, _)| h.get(endpoint))
        {
            h.started();
        }
        Some(InFlight {
            gen: self,
            cluster,
            endpoint,
            started: balancer.wants_latency().then(std::time::Instant::now),
        })
    }
}

/// A pick across locality priorities, as Envoy's priority load with its overprovisioning factor
/// of 1.4: the best priority takes min(100%, 1.4 × its healthy share) of the traffic, the next
/// the rest up to its own, and so on; within a priority, endpoints are drawn by weight among the
/// healthy ones. With no healthy endpoint anywhere, all of the best priority take traffic.
fn pick_by_locality(
    levels: &[Vec<usize>],
    weight: impl Fn(usize) -> u32,
    hosts: &[Arc<outlier::HostHealth>],
    rng: &mut Rng,
    now: u64,
) -> Option<usize> {
    let healthy = |i: usize| hosts.get(i).is_none_or(|h| !h.is_excluded(now));
    // At most five ranks (same subzone, zone, region, the failover region, elsewhere): no
    // allocation per pick.
    let mut loads = [0f64; 5];
    let mut remaining = 100.0f64;
    for (load, level) in loads.iter_mut().zip(levels) {
        let share = level.iter().filter(|i| healthy(**i)).count() as f64 / level.len() as f64;
        *load = (140.0 * share).min(remaining);
        remaining -= *load;
    }
    let total: f64 = loads.iter().sum();
    let mut level = levels.first()?;
    if total > 0.0 {
        let mut x = (rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 * total;
        for (l, load) in levels.iter().zip(loads) {
            if x < load {
                level = l;
                break;
            }
            x -= load;
        }
    }
    // By weight among the rank's healthy endpoints (all of them when none is healthy).
    let any_up = level.iter().any(|i| healthy(*i));
    let eligible = |i: usize| !any_up || healthy(i);
    let total: u64 = level
        .iter()
        .filter(|i| eligible(**i))
        .map(|i| u64::from(weight(*i).max(1)))
        .sum();
    let mut x = rng.below(total.max(1));
    for i in level.iter().copied().filter(|i| eligible(*i)) {
        let w = u64::from(weight(i).max(1));
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    level.first().copied()
}

/// The hash of a client's IP address, for `consistentHash.useSourceIp`.
pub fn source_ip_hash(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => keel_lb::hash::hash_bytes(&v4.octets(), 0),
        std::net::IpAddr::V6(v6) => keel_lb::hash::hash_bytes(&v6.octets(), 0),
    }
}

/// A picked endpoint, counted as busy by its cluster's balancer while this lives.
pub struct InFlight<'a> {
    gen: &'a Generation,
    cluster: usize,
    pub endpoint: usize,
    /// When the request began, for balancers that learn from latency (peak EWMA).
    started: Option<std::time::Instant>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.gen.balancers.borrow_mut().get_mut(self.cluster) {
            b.finished(
                self.endpoint,
                self.started
                    .map_or(std::time::Duration::ZERO, |t| t.elapsed()),
            );
        }
        if let Some(h) = self
            .gen
            .health
            .get(self.cluster)
            .and_then(|(_, h, _)| h.get(self.endpoint))
        {
            h.finished();
        }
    }
}

fn balancer_for(cluster: &Cluster, worker: usize) -> Balancer {
    let weights: Vec<u32> = cluster.endpoints.iter().map(|e| e.weight).collect();
    // Consistent hashing places hosts by name (`ip:port`), so every worker builds the same table.
    let names: Vec<String> = cluster
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    let hosts: Vec<(&str, u32)> = names
        .iter()
        .zip(&weights)
        .map(|(n, w)| (n.as_str(), *w))
        .collect();
    match cluster.lb {
        LbPolicy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(&weights, worker)),
        LbPolicy::Random => Balancer::Random(WeightedRandom::new(&weights)),
        LbPolicy::LeastRequest => Balancer::LeastRequest(LeastRequest::new(&weights)),
        LbPolicy::PeakEwma => Balancer::PeakEwma(keel_lb::PeakEwma::new(&weights)),
        LbPolicy::RingHash { min_ring_size } => {
            Balancer::RingHash(RingHash::new(&hosts, min_ring_size))
        }
        // The size was checked to be prime when the config was compiled.
        LbPolicy::Maglev { table_size } => match Maglev::new(&hosts, table_size) {
            Ok(m) => Balancer::Maglev(m),
            Err(_) => Balancer::RingHash(RingHash::new(&hosts, 1024)),
        },
    }
}
