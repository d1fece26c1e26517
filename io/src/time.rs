//! Timers that keep monoio's timer entry out of the futures that use them.
//!
//! monoio 0.2.4 aligns its timer entry to 128 bytes (a cache-padded waker), so any future holding
//! a `Sleep` or `Timeout` inline is 128-byte aligned and padded to match, and every `Box` of such
//! a future goes through posix_memalign (~4× the instructions of a malloc, on every request
//! when the per-request future holds one). Here the timer is boxed on its own, and only when a
//! deadline is actually armed. For futures that are never boxed (a long-lived task's loop),
//! monoio's own timers are as good.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// `f`'s output, or `Elapsed` if `limit` passes first (`f` is dropped then). `f` is polled before
/// the timer, so a future that is ready at the deadline still wins.
pub async fn timeout<F: Future>(limit: Duration, f: F) -> Result<F::Output, Elapsed> {
    let mut f = pin!(f);
    let mut sleep = Box::pin(monoio::time::sleep(limit));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        sleep.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// Waits for `d`, the timer boxed.
pub async fn sleep(d: Duration) {
    Box::pin(monoio::time::sleep(d)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_future_done_in_time_wins_and_a_late_one_elapses() {
        run(async {
            assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
            let started = Instant::now();
            let late = timeout(Duration::from_millis(30), sleep(Duration::from_secs(5))).await;
            assert_eq!(late, Err(Elapsed));
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(30) && took < Duration::from_secs(2),
                "{took:?}"
            );
        });
    }

    #[test]
    fn futures_using_these_timers_need_no_over_alignment() {
        // The point of this module: monoio's own timeout makes its caller 128-byte aligned.
        run(async {
            let ours = timeout(Duration::from_secs(1), async { 1 });
            assert!(std::mem::align_of_val(&ours) <= 16);
            let theirs = monoio::time::timeout(Duration::from_secs(1), async { 1 });
            assert!(std::mem::align_of_val(&theirs) > 16);
        });
    }
}
