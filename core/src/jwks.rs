//! Remote key sets (`jwksUri`): fetched by one background thread, never by a worker, refreshed
//! on an interval, and the last good set kept when a fetch fails.
//!
//! A config load registers every URI its RequestAuthentications name; a URI seen for the first
//! time is fetched there and then (bounded by the rule's `timeout`), so a new config serves with
//! its keys in place. Workers hold an [`Arc<Slot>`] per provider and take the current set from it
//! when they verify a token they have not seen before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use keel_config::jwt::{Jwks, KeySource};
use keel_config::Snapshot;

/// One remote key set.
#[derive(Debug)]
pub struct Slot {
    pub uri: String,
    allow_hmac: bool,
    /// The last set fetched successfully; None until the first success.
    keys: Mutex<Option<Arc<Jwks>>>,
    /// Bumped on every change of the set, so cached verifications made with old keys are redone.
    pub version: AtomicU64,
    timing: Mutex<Timing>,
}

#[derive(Debug)]
struct Timing {
    timeout: Duration,
    refresh: Duration,
    next: Instant,
    /// Consecutive failures, for the retry backoff.
    failures: u32,
    /// When a config load last named it (a set no generation holds is dropped a while after).
    registered: Instant,
}

impl Slot {
    /// The current set, if one was ever fetched.
    pub fn keys(&self) -> Option<Arc<Jwks>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the set once; on success it replaces the current one.
    fn fetch(&self) -> Result<(), String> {
        let timeout = self
            .timing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .timeout;
        let result = keel_tls::fetch::get(&self.uri, timeout).and_then(|(status, body)| {
            if status != 200 {
                return Err(format!("status {status}"));
            }
            let text = String::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
            Jwks::parse(&text, self.allow_hmac)
        });
        let mut timing = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(jwks) => {
                let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
                if keys.as_deref() != Some(&jwks) {
                    *keys = Some(Arc::new(jwks));
                    self.version.fetch_add(1, Relaxed);
                }
                timing.failures = 0;
                timing.next = Instant::now() + timing.refresh;
                FETCHES.success.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                // Retry sooner than the refresh interval: 1 s, doubling, at most the interval.
                timing.failures = timing.failures.saturating_add(1);
                let backoff = Duration::from_secs(1 << timing.failures.min(8).saturating_sub(1));
                timing.next = Instant::now() + backoff.min(timing.refresh);
                FETCHES.failure.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }
}

/// JWKS fetches by outcome, over the process's life.
#[derive(Debug, Default)]
pub struct FetchCounters {
    pub success: AtomicU64,
    pub failure: AtomicU64,
}

/// Counted by the fetches; exported at `/stats/prometheus` as `keel_jwks_fetches_total`.
pub static FETCHES: FetchCounters = FetchCounters {
    success: AtomicU64::new(0),
    failure: AtomicU64::new(0),
};

struct Registry {
    slots: Mutex<HashMap<(String, bool), Arc<Slot>>>,
    wake: Condvar,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("keel-jwks".into())
            .spawn(refresh_loop);
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the JWKS refresh thread; remote keys will not be refreshed");
        }
        Registry {
            slots: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
        }
    })
}

/// Registers every remote key set `snapshot` names, fetching new ones now (off the workers: this
/// runs where configs are loaded). A failed first fetch is logged and retried in the background;
/// until it succeeds, tokens for that provider are refused ("Jwks remote fetch is failed").
pub fn register(snapshot: &Snapshot) {
    for p in &snapshot.security.jwt {
        if let KeySource::Remote {
            uri,
            timeout,
            refresh,
        } = &p.keys
        {
            let (slot, new) = {
                let reg = registry();
                let mut slots = reg.slots.lock().unwrap_or_else(|e| e.into_inner());
                let key = (uri.clone(), p.allow_hmac);
                match slots.get(&key) {
                    Some(s) => {
                        let mut t = s.timing.lock().unwrap_or_else(|e| e.into_inner());
                        t.timeout = *timeout;
                        t.refresh = *refresh;
                        t.next = t.next.min(Instant::now() + *refresh);
                        t.registered = Instant::now();
                        (s.clone(), false)
                    }
                    None => {
                        let s = Arc::new(Slot {
                            uri: uri.clone(),
                            allow_hmac: p.allow_hmac,
                            keys: Mutex::new(None),
                            version: AtomicU64::new(0),
                            timing: Mutex::new(Timing {
                                timeout: *timeout,
                                refresh: *refresh,
                                // Fetched just below, on this thread; the refresh thread
                                // takes over from the next one.
                                next: Instant::now() + *refresh,
                                failures: 0,
                                registered: Instant::now(),
                            }),
                        });
                        slots.insert(key, s.clone());
                        (s, true)
                    }
                }
            };
            if new {
                match slot.fetch() {
                    Ok(()) => tracing::info!(uri = %uri, issuer = %p.issuer, "JWKS fetched"),
                    Err(e) => {
                        tracing::warn!(uri = %uri, issuer = %p.issuer, error = %e, "JWKS fetch failed; tokens of this issuer are refused until it succeeds")
                    }
                }
            }
            registry().wake.notify_all();
        }
    }
}

/// The slot for `uri` (registered by the load that produced the snapshot).
pub fn slot(uri: &str, allow_hmac: bool) -> Option<Arc<Slot>> {
    let slots = registry().slots.lock().unwrap_or_else(|e| e.into_inner());
    slots.get(&(uri.to_string(), allow_hmac)).cloned()
}

/// The background thread: fetches each set when it is due; drops sets no config uses any more.
fn refresh_loop() {
    loop {
        let reg = registry();
        let due: Vec<Arc<Slot>> = {
            let mut slots = reg.slots.lock().unwrap_or_else(|e| e.into_inner());
            // Only the registry holds it, and no load named it lately: no config uses it any more.
            slots.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.timing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .registered
                        .elapsed()
                        < Duration::from_secs(60)
            });
            let now = Instant::now();
            let due: Vec<Arc<Slot>> = slots
                .values()
                .filter(|s| s.timing.lock().unwrap_or_else(|e| e.into_inner()).next <= now)
                .cloned()
                .collect();
            if due.is_empty() {
                let wait = slots
                    .values()
                    .map(|s| {
                        s.timing
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .next
                            .saturating_duration_since(now)
                    })
                    .min()
                    .unwrap_or(Duration::from_secs(60))
                    .clamp(Duration::from_millis(10), Duration::from_secs(60));
                let _ = reg.wake.wait_timeout(slots, wait);
                continue;
            }
            due
        };
        for slot in due {
            if let Err(e) = slot.fetch() {
                tracing::warn!(uri = %slot.uri, error = %e, "JWKS refresh failed; keeping the last keys fetched");
            }
        }
    }
}
