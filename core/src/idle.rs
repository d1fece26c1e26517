//! Idle timeouts for all of a worker's connections, enforced by one periodic sweep instead of a
//! timer per connection.
//!
//! A connection registers a small [`IdleEntry`] and bumps its activity counter as bytes move. Every
//! [`TICK`] the worker's sweeper compares each counter with what it saw last; an entry quiet for its
//! whole timeout has its sockets shut down (`shutdown(2)`, both directions), which wakes whatever
//! the connection task waits on with EOF or an error, and the task ends as for any close. An idle
//! connection thus costs a few dozen bytes here, not a timer in its task.
//!
//! The same sweep closes the connections of a draining listener that sit between requests (an
//! idle HTTP keep-alive connection), so a drain does not wait for their idle timeout.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::generation::ListenerState;

/// Sweep period: idle timeouts fire between the timeout and the timeout plus one tick.
pub const TICK: Duration = Duration::from_millis(100);

/// How long a keep-alive connection of a draining listener must have been idle before the sweep
/// closes it. A client busy on it gets `Connection: close` on its next response instead; the grace
/// keeps the close from racing a request the client is just sending.
const DRAIN_GRACE_TICKS: u32 = 5;

/// One connection's idle state.
pub struct IdleEntry {
    /// Bumped by the connection whenever bytes move either way.
    pub activity: Cell<u32>,
    seen: Cell<u32>,
    /// Sweep tick (modulo 2^32: 13 years of ticks) since which nothing has moved.
    quiet_since: Cell<u32>,
    timeout_ticks: u32,
    /// Sockets to shut down on expiry: downstream, and the upstream while one is in use.
    fds: [Cell<RawFd>; 2],
    expired: Cell<bool>,
    /// The connection's listener: its idle-timeout counter, and whether it drains.
    pub listener: Rc<ListenerState>,
    /// Set by the connection while it waits for a new request with nothing read of it.
    pub between_requests: Cell<bool>,
}

impl IdleEntry {
    /// Whether the sweeper closed this connection for idleness.
    pub fn expired(&self) -> bool {
        self.expired.get()
    }

    /// Sets or clears (`-1`) the upstream socket shut down on expiry.
    pub fn set_upstream(&self, fd: RawFd) {
        self.fds[1].set(fd);
    }
}

/// Clears an entry's sockets when dropped. Declare it after the streams it names, so it drops (and
/// the sweeper forgets the fds) before they close and their numbers can be reused.
pub struct IdleGuard(pub Rc<IdleEntry>);

impl Drop for IdleGuard {
    fn drop(&mut self) {
        self.0.fds[0].set(-1);
        self.0.fds[1].set(-1);
    }
}

/// A worker's idle entries and the sweep clock.
#[derive(Default)]
pub struct IdleSweep {
    entries: RefCell<Vec<Weak<IdleEntry>>>,
    tick: Cell<u32>,
}

impl IdleSweep {
    /// Registers a connection whose downstream socket is `fd`.
    pub fn register(&self, fd: RawFd, timeout: Duration, listener: Rc<ListenerState>) -> IdleGuard {
        let ticks = timeout
            .as_millis()
            .div_ceil(TICK.as_millis())
            .clamp(1, u32::MAX as u128) as u32;
        let entry = Rc::new(IdleEntry {
            activity: Cell::new(0),
            seen: Cell::new(0),
            // Counted from the next sweep, as activity is: a timeout never fires early.
            quiet_since: Cell::new(self.tick.get().wrapping_add(1)),
            timeout_ticks: ticks,
            fds: [Cell::new(fd), Cell::new(-1)],
            expired: Cell::new(false),
            listener,
            between_requests: Cell::new(false),
        });
        self.entries.borrow_mut().push(Rc::downgrade(&entry));
        IdleGuard(entry)
    }

    /// Advances the clock one tick; calls `on_expire` for each entry that has just expired, after
    /// shutting its sockets down. Forgets entries whose connection has ended.
    pub fn sweep(&self, mut on_expire: impl FnMut(&IdleEntry)) {
        let t = self.tick.get().wrapping_add(1);
        self.tick.set(t);
        self.entries.borrow_mut().retain(|weak| {
            let Some(e) = weak.upgrade() else {
                return false;
            };
            let a = e.activity.get();
            let quiet = t.wrapping_sub(e.quiet_since.get());
            if a != e.seen.get() {
                e.seen.set(a);
                e.quiet_since.set(t);
            } else if e.between_requests.get()
                && e.listener.is_draining()
                && quiet >= DRAIN_GRACE_TICKS
            {
                // A keep-alive connection of a draining listener, idle between requests: close it
                // rather than wait for its idle timeout. Busy ones get `Connection: close` instead.
                for fd in &e.fds {
                    keel_io::stream::shutdown_fd(fd.get());
                }
            } else if !e.expired.get() && quiet >= e.timeout_ticks {
                e.expired.set(true);
                for fd in &e.fds {
                    keel_io::stream::shutdown_fd(fd.get());
                }
                on_expire(&e);
            }
            true
        });
    }

    /// Connections currently registered.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_after_quiet_ticks_and_activity_resets() {
        let sweep = IdleSweep::default();
        let guard = sweep.register(-1, Duration::from_millis(300), ListenerState::for_test());
        let mut expired = 0;
        sweep.sweep(|_| expired += 1);
        sweep.sweep(|_| expired += 1);
        guard.0.activity.set(1);
        sweep.sweep(|_| expired += 1);
        sweep.sweep(|_| expired += 1);
        sweep.sweep(|_| expired += 1);
        assert_eq!(expired, 0, "activity restarted the count");
        sweep.sweep(|_| expired += 1);
        assert_eq!(expired, 1);
        assert!(guard.0.expired());
        sweep.sweep(|_| expired += 1);
        assert_eq!(expired, 1, "expires once");
        drop(guard);
        sweep.sweep(|_| {});
        assert!(sweep.is_empty(), "ended connections are forgotten");
    }
}
