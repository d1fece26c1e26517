//! Local rate limits: token buckets shared by every worker, so a route's limit is the process's,
//! not a worker's share of it.
//!
//! A route's bucket is one atomic word (fill epoch and tokens, updated by compare-and-swap); a
//! per-client limit keeps one such word per client address in a sharded map. Buckets are named by
//! their config (see `LocalRateLimit::key`), so a reload that keeps a limit keeps its bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use keel_config::http_routes::LocalRateLimit;

/// Per-client entries kept per shard before full (idle) buckets are dropped.
const MAX_CLIENTS_PER_SHARD: usize = 4096;
const SHARDS: usize = 16;

/// What a request learns from a bucket: its limit, what is left, and when it next fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the next fill, rounded up (`x-ratelimit-reset`).
    pub reset_secs: u64,
}

/// A bucket's arithmetic, on a packed word: the fill epoch (fill intervals since `start`) in the
/// high half, tokens in the low half.
#[derive(Debug)]
struct Rule {
    max: u32,
    per_fill: u32,
    interval: Duration,
    start: Instant,
}

impl Rule {
    fn full(&self, epoch: u32) -> u64 {
        (u64::from(epoch) << 32) | u64::from(self.max)
    }

    fn epoch(&self, now: Instant) -> (u32, Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        let n = elapsed.as_nanos() / self.interval.as_nanos().max(1);
        let into = elapsed.as_nanos() - n * self.interval.as_nanos();
        let left = self
            .interval
            .saturating_sub(Duration::from_nanos(into as u64));
        (u32::try_from(n).unwrap_or(u32::MAX), left)
    }

    /// The word after taking a token at epoch `now_epoch`, or None when there is none.
    fn take(&self, word: u64, now_epoch: u32) -> (Option<u64>, u32) {
        let (epoch, tokens) = ((word >> 32) as u32, word as u32);
        let tokens = if now_epoch > epoch {
            let added = u64::from(now_epoch - epoch) * u64::from(self.per_fill);
            (u64::from(tokens) + added).min(u64::from(self.max)) as u32
        } else {
            tokens
        };
        let epoch = epoch.max(now_epoch);
        if tokens == 0 {
            return (None, 0);
        }
        let left = tokens - 1;
        (Some((u64::from(epoch) << 32) | u64::from(left)), left)
    }

    fn outcome(&self, allowed: bool, remaining: u32, left: Duration) -> Outcome {
        Outcome {
            allowed,
            limit: self.max,
            remaining,
            reset_secs: left.as_millis().div_ceil(1000) as u64,
        }
    }
}

/// Per-client bucket words of the clients hashed to one shard.
type ClientShard = Mutex<HashMap<IpAddr, u64>>;

/// One route's limiter.
#[derive(Debug)]
pub struct Limiter {
    rule: Rule,
    shared: AtomicU64,
    /// Per-client buckets (when `perClient`), sharded by address.
    clients: Option<Box<[ClientShard]>>,
}

impl Limiter {
    fn new(spec: &LocalRateLimit) -> Limiter {
        let rule = Rule {
            max: spec.max_tokens,
            per_fill: spec.tokens_per_fill,
            interval: spec.fill_interval,
            start: Instant::now(),
        };
        let shared = AtomicU64::new(rule.full(0));
        Limiter {
            rule,
            shared,
            clients: spec
                .per_client
                .then(|| (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect()),
        }
    }

    /// Takes a token for a request from `client`.
    pub fn check(&self, client: IpAddr) -> Outcome {
        let (epoch, left) = self.rule.epoch(Instant::now());
        match &self.clients {
            None => {
                let mut word = self.shared.load(Ordering::Relaxed);
                loop {
                    let (next, remaining) = self.rule.take(word, epoch);
                    let Some(next) = next else {
                        return self.rule.outcome(false, 0, left);
                    };
                    match self.shared.compare_exchange_weak(
                        word,
                        next,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return self.rule.outcome(true, remaining, left),
                        Err(now) => word = now,
                    }
                }
            }
            Some(shards) => {
                let client = client.to_canonical();
                let shard = shard_of(client);
                let mut map = shards[shard].lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= MAX_CLIENTS_PER_SHARD && !map.contains_key(&client) {
                    // Buckets that have filled up again say nothing a new one would not.
                    let rule = &self.rule;
                    map.retain(|_, w| rule.take(*w, epoch).1 + 1 < rule.max);
                    if map.len() >= MAX_CLIENTS_PER_SHARD {
                        map.clear();
                    }
                }
                let word = map.entry(client).or_insert_with(|| self.rule.full(epoch));
                let (next, remaining) = self.rule.take(*word, epoch);
                match next {
                    Some(n) => {
                        *word = n;
                        self.rule.outcome(true, remaining, left)
                    }
                    None => self.rule.outcome(false, 0, left),
                }
            }
        }
    }
}

fn shard_of(ip: IpAddr) -> usize {
    let h = match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            (n as u64) ^ ((n >> 64) as u64)
        }
    };
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS
}

/// The limiters of a snapshot, in the order of `Snapshot::rate_limits`: existing ones (same key)
/// are shared across workers and carried across reloads.
pub fn limiters(specs: &[LocalRateLimit]) -> Vec<Arc<Limiter>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Limiter>>>> = OnceLock::new();
    let mut reg = REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    reg.retain(|_, w| w.strong_count() > 0);
    specs
        .iter()
        .map(|s| match reg.get(&s.key).and_then(Weak::upgrade) {
            Some(l) => l,
            None => {
                let l = Arc::new(Limiter::new(s));
                reg.insert(s.key.clone(), Arc::downgrade(&l));
                l
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u32, per_fill: u32, ms: u64, per_client: bool) -> LocalRateLimit {
        LocalRateLimit {
            key: format!("test/{max}/{per_fill}/{ms}/{per_client}"),
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(ms),
            per_client,
        }
    }

    #[test]
    fn bucket_drains_and_refills() {
        let l = Limiter::new(&spec(3, 1, 100, false));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let got: Vec<bool> = (0..4).map(|_| l.check(ip).allowed).collect();
        assert_eq!(got, [true, true, true, false]);
        assert_eq!(l.check(ip).remaining, 0);
        std::thread::sleep(Duration::from_millis(120));
        let o = l.check(ip);
        assert!(o.allowed && o.remaining == 0, "{o:?}");
        assert!(!l.check(ip).allowed);
        assert_eq!(o.limit, 3);
        assert!(o.reset_secs <= 1);
    }

    #[test]
    fn refill_is_capped() {
        let r = Rule {
            max: 5,
            per_fill: 2,
            interval: Duration::from_secs(1),
            start: Instant::now(),
        };
        let word = (u64::from(3u32) << 32) | 1;
        let (next, left) = r.take(word, 100);
        assert_eq!(left, 4);
        assert_eq!(next, Some((100u64 << 32) | 4));
        let (_, left) = r.take(word, 4);
        assert_eq!(left, 2, "one fill of 2 onto 1, minus the one taken");
    }

    #[test]
    fn per_client_buckets_are_separate() {
        let l = Limiter::new(&spec(1, 1, 60_000, true));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert!(l.check(a).allowed);
        assert!(!l.check(a).allowed);
        assert!(l.check(b).allowed);
        assert!(!l.check("10.0.0.2".parse().unwrap()).allowed, "mapped = v4");
    }

    #[test]
    fn buckets_are_shared_by_key() {
        let s = spec(2, 2, 60_000, false);
        let one = limiters(std::slice::from_ref(&s));
        let two = limiters(std::slice::from_ref(&s));
        assert!(Arc::ptr_eq(&one[0], &two[0]));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(one[0].check(ip).allowed);
        assert!(two[0].check(ip).allowed);
        assert!(!one[0].check(ip).allowed);
    }
}
