//! Outlier detection (passive health checking): an endpoint answering with errors too many times
//! in a row is ejected — left out of picks — for a while, as Envoy's consecutive-5xx and
//! consecutive-gateway-failure detectors do.
//!
//! Unlike balancer state, what an endpoint has done is shared by all workers (errors seen on one
//! core eject the host on all of them), so [`HostHealth`] is a few relaxed atomics; a race between
//! two cores costs at most an error counted once more or less. Time is the caller's, in ms.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// When to eject and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// 5xx answers and local failures in a row that eject (0: off).
    pub consecutive_5xx: u32,
    /// 502/503/504 answers and local failures in a row that eject (0: off).
    pub consecutive_gateway: u32,
    /// A host's count of past ejections decays by one per interval without one.
    pub interval_ms: u64,
    pub base_ejection_ms: u64,
    pub max_ejection_percent: u32,
    /// Below this share of hosts not ejected, ejections are ignored.
    pub min_health_percent: u32,
}

/// The longest ejection, unless the base is longer (Envoy's default `max_ejection_time`).
const MAX_EJECTION_MS: u64 = 300_000;

/// What one request to a host came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: connect failure, reset, timeout (counted as a 503, as Envoy does when local
    /// and external errors are not split).
    LocalFailure,
}

/// One host's error and ejection record, and its requests in flight over all workers.
#[derive(Debug, Default)]
pub struct HostHealth {
    errors_5xx: AtomicU32,
    errors_gateway: AtomicU32,
    /// Ejected until this time (ms); 0 when never ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    active: AtomicU32,
    /// Active health checking: the host failed its checks (and has not passed enough since).
    hc_failed: std::sync::atomic::AtomicBool,
    /// Consecutive passed / failed checks.
    hc_passes: AtomicU32,
    hc_fails: AtomicU32,
    /// Slow start (`warmupDurationSecs`): when the host started warming up (ms), 0 = it is not.
    warm_from: AtomicU64,
}

impl HostHealth {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Relaxed) > now_ms
    }

    /// Until when the host is ejected (ms; in the past when it is not).
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Relaxed)
    }

    /// How many times the host was ejected (after decay), for reports.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }

    /// Whether active health checks have marked the host unhealthy.
    pub fn failed_health_check(&self) -> bool {
        self.hc_failed.load(Relaxed)
    }

    /// Starts the host's slow start (it joined a cluster that was already serving, or passed its
    /// health checks again).
    pub fn start_warmup(&self, now_ms: u64) {
        self.warm_from.store(now_ms.max(1), Relaxed);
    }

    /// The share of its weight the host takes `now_ms` into a slow start of `window_ms`: rising
    /// linearly from 10% (Envoy's default `min_weight_percent`) to 1 at the window's end.
    pub fn warmup_factor(&self, now_ms: u64, window_ms: u64) -> f64 {
        let from = self.warm_from.load(Relaxed);
        if from == 0 || window_ms == 0 {
            return 1.0;
        }
        let elapsed = now_ms.saturating_sub(from);
        if elapsed >= window_ms {
            return 1.0;
        }
        (elapsed as f64 / window_ms as f64).max(0.1)
    }

    /// Left out of picks: ejected by outlier detection or failing its health checks.
    pub fn is_excluded(&self, now_ms: u64) -> bool {
        self.is_ejected(now_ms) || self.failed_health_check()
    }

    /// Records an active health check's result: `unhealthy_after` failures in a row mark the host
    /// unhealthy, `healthy_after` passes in a row healthy again. True when the state changed.
    pub fn health_checked(&self, passed: bool, unhealthy_after: u32, healthy_after: u32) -> bool {
        if passed {
            self.hc_fails.store(0, Relaxed);
            let passes = self.hc_passes.fetch_add(1, Relaxed) + 1;
            if self.failed_health_check() && passes >= healthy_after {
                self.hc_failed.store(false, Relaxed);
                return true;
            }
        } else {
            self.hc_passes.store(0, Relaxed);
            let fails = self.hc_fails.fetch_add(1, Relaxed) + 1;
            if !self.failed_health_check() && fails >= unhealthy_after {
                self.hc_failed.store(true, Relaxed);
                return true;
            }
        }
        false
    }

    /// Requests (or TCP connections) in flight to the host, over all workers.
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }

    pub fn started(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    pub fn finished(&self) {
        self.active.fetch_sub(1, Relaxed);
    }
}

/// Whether exclusions (ejections, failed health checks) apply to `hosts` now: the share not
/// excluded is at least `min_health_percent`, and at least one host is left. Otherwise the pick
/// goes across all hosts (Envoy's panic mode).
pub fn exclusions_apply<'a>(
    min_health_percent: u32,
    hosts: impl ExactSizeIterator<Item = &'a HostHealth>,
    now_ms: u64,
) -> bool {
    let total = hosts.len();
    let healthy = hosts.filter(|h| !h.is_excluded(now_ms)).count();
    healthy > 0 && healthy * 100 >= min_health_percent as usize * total
}

/// Records `outcome` for `hosts[i]`; ejects it when it reaches a threshold and fewer than
/// `max_ejection_percent` of the hosts are ejected (one host may always be). True when it was
/// ejected now.
pub fn report(
    policy: &Policy,
    hosts: &[Arc<HostHealth>],
    i: usize,
    outcome: Outcome,
    now_ms: u64,
) -> bool {
    let Some(host) = hosts.get(i) else {
        return false;
    };
    let status = match outcome {
        Outcome::Status(s) => s,
        Outcome::LocalFailure => 503,
    };
    if status < 500 {
        host.errors_5xx.store(0, Relaxed);
        host.errors_gateway.store(0, Relaxed);
        return false;
    }
    let n5xx = host.errors_5xx.fetch_add(1, Relaxed) + 1;
    let gateway = matches!(status, 502..=504);
    let ngw = if gateway {
        host.errors_gateway.fetch_add(1, Relaxed) + 1
    } else {
        host.errors_gateway.store(0, Relaxed);
        0
    };
    let tripped = (policy.consecutive_5xx > 0 && n5xx >= policy.consecutive_5xx)
        || (policy.consecutive_gateway > 0 && ngw >= policy.consecutive_gateway);
    if !tripped || host.is_ejected(now_ms) {
        return false;
    }
    let ejected = hosts.iter().filter(|h| h.is_ejected(now_ms)).count();
    if ejected > 0 && (ejected + 1) * 100 > policy.max_ejection_percent as usize * hosts.len() {
        return false;
    }
    // Past ejections decay by one per interval since the last one ended.
    let times = host.ejections.load(Relaxed);
    let last_end = host.ejected_until.load(Relaxed);
    let decayed = match policy.interval_ms {
        0 => 0,
        interval => (now_ms.saturating_sub(last_end) / interval).min(u32::MAX as u64) as u32,
    };
    let times = times.saturating_sub(decayed).saturating_add(1);
    host.ejections.store(times, Relaxed);
    let cap = MAX_EJECTION_MS.max(policy.base_ejection_ms);
    let length = policy
        .base_ejection_ms
        .saturating_mul(times as u64)
        .min(cap);
    host.ejected_until.store(now_ms + length, Relaxed);
    host.errors_5xx.store(0, Relaxed);
    host.errors_gateway.store(0, Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval_ms: 1000,
            base_ejection_ms: 10_000,
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_errors_eject_and_success_resets() {
        let hosts: Vec<Arc<HostHealth>> = (0..4).map(|_| Arc::default()).collect();
        let refs = &hosts;
        let p = policy();
        assert!(!report(&p, refs, 0, Outcome::Status(500), 0));
        assert!(!report(&p, refs, 0, Outcome::LocalFailure, 0));
        assert!(!report(&p, refs, 0, Outcome::Status(200), 0));
        assert!(!report(&p, refs, 0, Outcome::Status(500), 0));
        assert!(!report(&p, refs, 0, Outcome::Status(500), 0));
        assert!(report(&p, refs, 0, Outcome::Status(503), 0));
        assert!(hosts[0].is_ejected(9_999) && !hosts[0].is_ejected(10_000));
        // Ejected again soon after: twice as long.
        for _ in 0..3 {
            report(&p, refs, 0, Outcome::Status(500), 10_500);
        }
        assert!(hosts[0].is_ejected(30_000) && !hosts[0].is_ejected(30_500));
    }

    #[test]
    fn max_ejection_percent_and_min_health() {
        let hosts: Vec<Arc<HostHealth>> = (0..4).map(|_| Arc::default()).collect();
        let refs = &hosts;
        let p = policy();
        for i in 0..4 {
            for _ in 0..3 {
                report(&p, refs, i, Outcome::LocalFailure, 0);
            }
        }
        // 50%: two of four.
        assert_eq!(hosts.iter().filter(|h| h.is_ejected(1)).count(), 2);
        let strict = Policy {
            min_health_percent: 75,
            ..p
        };
        assert!(!exclusions_apply(
            strict.min_health_percent,
            hosts.iter().map(|h| &**h),
            1
        ));
        assert!(exclusions_apply(
            p.min_health_percent,
            hosts.iter().map(|h| &**h),
            1
        ));
    }

    #[test]
    fn health_checks_mark_unhealthy_and_healthy_by_thresholds() {
        let h = HostHealth::default();
        // Slow start: 10% at first, linear to full weight over the window.
        assert_eq!(h.warmup_factor(5_000, 1_000), 1.0, "not warming");
        h.start_warmup(1_000);
        assert_eq!(h.warmup_factor(1_000, 1_000), 0.1);
        assert!((h.warmup_factor(1_500, 1_000) - 0.5).abs() < 1e-9);
        assert_eq!(h.warmup_factor(2_000, 1_000), 1.0);
        assert!(!h.health_checked(false, 2, 2));
        assert!(h.health_checked(false, 2, 2), "second failure marks it");
        assert!(h.is_excluded(0));
        assert!(!h.health_checked(true, 2, 2));
        assert!(
            !h.health_checked(false, 2, 2),
            "a failure resets the passes"
        );
        assert!(!h.health_checked(true, 2, 2));
        assert!(h.health_checked(true, 2, 2));
        assert!(!h.is_excluded(0));
    }

    #[test]
    fn gateway_errors_count_only_502_to_504() {
        let hosts: Vec<Arc<HostHealth>> = vec![Arc::default()];
        let refs = &hosts;
        let p = Policy {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            max_ejection_percent: 100,
            ..policy()
        };
        assert!(!report(&p, refs, 0, Outcome::Status(502), 0));
        assert!(!report(&p, refs, 0, Outcome::Status(500), 0));
        assert!(!report(&p, refs, 0, Outcome::Status(504), 0));
        assert!(report(&p, refs, 0, Outcome::Status(503), 0));
    }
}
