//! Persistent, edge-triggered readiness for Keel's sockets: one epoll set per worker thread,
//! itself waited on through the worker's monoio driver.
//!
//! Every read and write on a [`crate::Stream`] is Keel's own non-blocking syscall; monoio is only
//! asked to wait. monoio 0.2.4 waits badly for that use: on io_uring it arms a one-shot PollAdd
//! for every wait, and on its epoll driver it checks its cached readiness with an extra poll(2)
//! per wait (its cache cannot see our syscalls). Both cost more than the read itself. Here a
//! socket is registered once (`EPOLLET`), a read that comes back short or with `EAGAIN` marks it
//! not readable (a short read means the receive queue was emptied, and the next arrival raises a
//! new edge), and only a wait on a socket so marked parks the task. The epoll fd is the one
//! thing monoio waits on for all the worker's sockets: one readiness wait per loop iteration, not
//! one per socket per wait.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// What a newly registered fd is assumed ready for, before any syscall or edge says more.
///
/// Assuming "ready" costs one syscall when wrong (it returns EAGAIN and the socket parks);
/// assuming "not ready" costs nothing more than the wait, because EPOLL_CTL_ADD queues an event
/// for whatever the fd is already ready for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Initial {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

impl Initial {
    /// A socket with no history: try it first.
    pub(crate) const READY: Initial = Initial {
        readable: true,
        writable: true,
    };
    /// A socket whose connect is in flight: not writable until epoll says the handshake ended.
    pub(crate) const CONNECTING: Initial = Initial {
        readable: true,
        writable: false,
    };
    /// A socket just accepted: its client has usually not sent yet (the handshake's last ACK
    /// woke the listener), so the first read waits for epoll instead of failing with EAGAIN.
    pub(crate) const ACCEPTED: Initial = Initial {
        readable: false,
        writable: true,
    };
}

/// Which way a task waits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Direction {
    Read,
    Write,
}

/// One registered socket's readiness and the tasks waiting on it.
struct Slot {
    /// Bumped when the slot is freed, so an event for a closed socket whose slot was reused is
    /// told apart (it carries the old generation).
    generation: u32,
    readable: bool,
    writable: bool,
    /// epoll reported a hang-up or error (sticky): a short read or write no longer means "wait for
    /// the next edge", because the EOF or error it leaves pending will raise none.
    hung_up: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// A waiter beyond the first on one socket and direction (rare: e.g. a timed wait racing a
/// read); kept aside so that the common slot stays small.
struct ExtraWaiter {
    slot: u32,
    direction: Direction,
    waker: Waker,
}

/// The worker thread's epoll set and the readiness of every socket in it.
pub(crate) struct Reactor {
    /// Owned by the driving task's monoio handle, which closes it when the task is dropped with
    /// its runtime; by then `alive` is false and nothing here uses the fd again.
    epoll: RawFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    extra: RefCell<Vec<ExtraWaiter>>,
    /// False once the task that drives this set has ended (its runtime was dropped): the next
    /// registration on this thread starts a new set in the new runtime.
    alive: Cell<bool>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// Starts the current thread's reactor in the current monoio runtime, for as long as the
/// returned scope lives: a worker enters one before serving (so its fds are all open from the
/// start), and a thread that runs several runtimes one after another must enter one in each.
/// monoio never drops the tasks of a runtime that ends, so without the scope the next runtime
/// on the thread would find the old reactor, whose driving task no longer runs.
pub fn enter() -> io::Result<Scope> {
    current().map(Scope)
}

/// The span of one runtime's reactor on this thread; see [`enter`].
pub struct Scope(Rc<Reactor>);

impl Drop for Scope {
    fn drop(&mut self) {
        self.0.alive.set(false);
        let _ = CURRENT.try_with(|current| current.borrow_mut().take());
    }
}

/// The current thread's reactor, started in the current monoio runtime on first use.
pub(crate) fn current() -> io::Result<Rc<Reactor>> {
    CURRENT.with(|current| {
        let mut current = current.borrow_mut();
        if let Some(r) = current.as_ref().filter(|r| r.alive.get()) {
            return Ok(r.clone());
        }
        let r = Reactor::start()?;
        *current = Some(r.clone());
        Ok(r)
    })
}

/// Marks the reactor dead when the task driving it is dropped, whether or not it ever ran.
struct AliveGuard(Rc<Reactor>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        // Only marked: the runtime is being torn down, and its tasks with it.
        self.0.alive.set(false);
    }
}

const EVENTS_PER_WAIT: usize = 256;
const READ_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
const HANG_UP_EVENTS: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
const WRITE_EVENTS: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;

impl Reactor {
    fn start() -> io::Result<Rc<Reactor>> {
        // SAFETY: epoll_create1(2) takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // The epoll fd is handed to monoio as its smallest registered-fd type, used only to wait
        // for readability (a PollAdd on io_uring, a nested epoll registration on epoll): nothing
        // Unix-socket-specific of it is ever called. monoio owns and closes it.
        let waiter =
            monoio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(owned))?;
        let reactor = Rc::new(Reactor {
            epoll: fd,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            extra: RefCell::new(Vec::new()),
            alive: Cell::new(true),
        });
        let guard = AliveGuard(reactor.clone());
        drop(monoio::spawn(async move {
            let guard = guard;
            drive(&guard.0, waiter).await;
        }));
        Ok(reactor)
    }

    /// Adds `fd` to the set, ready as `initial` says until a syscall or an edge says otherwise;
    /// returns its slot.
    pub(crate) fn register(&self, fd: RawFd, initial: Initial) -> io::Result<u32> {
        let (slot, generation) = {
            let mut slots = self.slots.borrow_mut();
            let slot = match self.free.borrow_mut().pop() {
                Some(s) => s,
                None => {
                    let s = u32::try_from(slots.len())
                        .map_err(|_| io::Error::other("too many sockets on one worker"))?;
                    slots.push(Slot {
                        generation: 0,
                        readable: false,
                        writable: false,
                        hung_up: false,
                        reader: None,
                        writer: None,
                    });
                    s
                }
            };
            let entry = &mut slots[slot as usize];
            entry.readable = initial.readable;
            entry.writable = initial.writable;
            entry.hung_up = false;
            (slot, entry.generation)
        };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: (u64::from(generation) << 32) | u64::from(slot),
        };
        // SAFETY: epoll_ctl(2) on our epoll fd with a live epoll_event; `fd` is an open socket
        // owned by the caller.
        let r = unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.release(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Frees `slot` when its socket closes (closing the fd takes it out of the epoll set).
    pub(crate) fn release(&self, slot: u32) {
        let wakers = {
            let mut slots = self.slots.borrow_mut();
            let Some(entry) = slots.get_mut(slot as usize) else {
                return;
            };
            entry.generation = entry.generation.wrapping_add(1);
            entry.readable = false;
            entry.writable = false;
            (entry.reader.take(), entry.writer.take())
        };
        self.free.borrow_mut().push(slot);
        self.extra.borrow_mut().retain(|w| w.slot != slot);
        drop(wakers);
    }

    /// Whether the socket may be read or written without blocking; if not, the task waits.
    pub(crate) fn poll_ready(
        &self,
        slot: u32,
        direction: Direction,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.alive.get() {
            return Poll::Ready(Err(io::Error::other("the worker's io runtime has ended")));
        }
        let mut slots = self.slots.borrow_mut();
        let Some(entry) = slots.get_mut(slot as usize) else {
            return Poll::Ready(Err(io::Error::other("socket not registered")));
        };
        let (ready, waiter) = match direction {
            Direction::Read => (entry.readable, &mut entry.reader),
            Direction::Write => (entry.writable, &mut entry.writer),
        };
        if ready {
            return Poll::Ready(Ok(()));
        }
        match waiter {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => {
                // Kept at most once per task: the newcomer leaves the overflow list (if it was
                // there), the one it displaces joins it unless already there.
                let other = std::mem::replace(w, cx.waker().clone());
                let mut extra = self.extra.borrow_mut();
                let same = |e: &ExtraWaiter, waker: &Waker| {
                    e.slot == slot && e.direction == direction && e.waker.will_wake(waker)
                };
                extra.retain(|e| !same(e, cx.waker()));
                if !extra.iter().any(|e| same(e, &other)) {
                    extra.push(ExtraWaiter {
                        slot,
                        direction,
                        waker: other,
                    });
                }
            }
            None => *waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Records that a syscall found the socket not ready: the next wait parks until epoll
    /// reports a new edge. `short` is a read or write that moved fewer bytes than asked, which
    /// proves the socket drained only while no hang-up is pending (data and FIN that arrived
    /// together are read as data, then EOF, with no edge between).
    #[inline]
    pub(crate) fn not_ready(&self, slot: u32, direction: Direction, short: bool) {
        if let Some(entry) = self.slots.borrow_mut().get_mut(slot as usize) {
            if short && entry.hung_up {
                return;
            }
            match direction {
                Direction::Read => entry.readable = false,
                Direction::Write => entry.writable = false,
            }
        }
    }

    /// Takes the events waiting in the set (never blocks) and wakes their tasks; returns how many.
    fn dispatch(
        &self,
        events: &mut [libc::epoll_event],
        wake: &mut Vec<Waker>,
    ) -> io::Result<usize> {
        // SAFETY: epoll_wait(2) writes at most `events.len()` entries into `events`, which is live
        // and writable; a zero timeout never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        {
            let mut slots = self.slots.borrow_mut();
            for event in &events[..n] {
                let data = event.u64;
                let slot = data as u32;
                let Some(entry) = slots.get_mut(slot as usize) else {
                    continue;
                };
                if entry.generation != (data >> 32) as u32 {
                    continue;
                }
                let flags = event.events;
                if flags & HANG_UP_EVENTS != 0 {
                    entry.hung_up = true;
                }
                if flags & READ_EVENTS != 0 {
                    entry.readable = true;
                    wake.extend(entry.reader.take());
                }
                if flags & WRITE_EVENTS != 0 {
                    entry.writable = true;
                    wake.extend(entry.writer.take());
                }
            }
        }
        {
            let mut extra = self.extra.borrow_mut();
            if !extra.is_empty() {
                let slots = self.slots.borrow();
                extra.retain(|w| {
                    let ready = slots
                        .get(w.slot as usize)
                        .is_some_and(|e| match w.direction {
                            Direction::Read => e.readable,
                            Direction::Write => e.writable,
                        });
                    if ready {
                        wake.push(w.waker.clone());
                    }
                    !ready
                });
            }
        }
        for w in wake.drain(..) {
            w.wake();
        }
        Ok(n)
    }

    /// Marks every socket ready and wakes every waiter, so each retries its syscall and sees the
    /// socket's real state: what is left when readiness can no longer be tracked.
    fn wake_all(&self) {
        let mut wake = Vec::new();
        for entry in self.slots.borrow_mut().iter_mut() {
            entry.readable = true;
            entry.writable = true;
            wake.extend(entry.reader.take());
            wake.extend(entry.writer.take());
        }
        wake.extend(self.extra.borrow_mut().drain(..).map(|w| w.waker));
        for w in wake {
            w.wake();
        }
    }
}

/// An fd in the current worker's epoll set, taken out (and closed) on drop: what a
/// [`crate::Stream`] and a listening [`crate::listener::Acceptor`] wait through.
pub(crate) struct Registered {
    fd: OwnedFd,
    pub(crate) slot: u32,
    reactor: Rc<Reactor>,
}

impl Registered {
    /// Registers `fd` (non-blocking) with the current thread's reactor, ready as `initial` says.
    pub(crate) fn new(fd: OwnedFd, initial: Initial) -> io::Result<Registered> {
        let reactor = current()?;
        let slot = reactor.register(fd.as_raw_fd(), initial)?;
        Ok(Registered { fd, slot, reactor })
    }

    #[inline]
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Resolves when the fd may be read or written without blocking, as far as the syscalls so
    /// far and epoll's edges tell; it costs no syscall.
    pub(crate) fn ready(
        &self,
        direction: Direction,
    ) -> impl std::future::Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| self.reactor.poll_ready(self.slot, direction, cx))
    }

    /// See [`Reactor::not_ready`].
    #[inline]
    pub(crate) fn not_ready(&self, direction: Direction, short: bool) {
        self.reactor.not_ready(self.slot, direction, short);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // The fd closes right after (dropping `fd`), which takes it out of the epoll set.
        self.reactor.release(self.slot);
    }
}

/// The worker's readiness loop: wait (through monoio) until the epoll set has events, take them,
/// wake their tasks, and wait again.
async fn drive(reactor: &Reactor, waiter: monoio::net::UnixStream) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut wake = Vec::with_capacity(EVENTS_PER_WAIT);
    loop {
        if let Err(e) = waiter.readable(false).await {
            tracing::error!(error = %e, "waiting on the worker's epoll set failed");
            reactor.wake_all();
            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        loop {
            match reactor.dispatch(&mut events, &mut wake) {
                Ok(n) if n == EVENTS_PER_WAIT => continue,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the worker's epoll set failed");
                    reactor.wake_all();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::task::Context;
    use std::time::Duration;

    use crate::Stream;

    /// Runs `f` on each io driver, each on a worker thread as Keel runs them.
    fn on_both_drivers<F, Fut>(f: F)
    where
        F: Fn() -> Fut + Send + Clone + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let mut drivers = vec![crate::IoDriver::Epoll];
        if monoio::utils::detect_uring() {
            drivers.push(crate::IoDriver::Uring);
        }
        for driver in drivers {
            let f = f.clone();
            let worker = crate::worker::spawn(0, None, driver, f).unwrap();
            match worker.join() {
                Ok(r) => r.unwrap(),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    #[test]
    fn each_runtime_on_a_thread_gets_a_working_reactor() {
        // monoio never drops an ended runtime's tasks: the second runtime needs its own reactor.
        for round in 0..2 {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            rt.block_on(async {
                let _scope = super::enter().unwrap();
                let (ours, mut peer) = pair();
                let mut buf = [0u8; 8];
                assert!(ours.try_read(&mut buf).is_err());
                peer.write_all(b"z").unwrap();
                let what = format!("round {round}");
                within(&what, ours.readable()).await.unwrap();
            });
        }
    }

    #[test]
    fn an_accepted_socket_is_read_on_epolls_word_even_if_its_bytes_came_first() {
        on_both_drivers(|| async {
            let group = crate::listener::bind_group("127.0.0.1:0".parse().unwrap(), 1).unwrap();
            let addr = group[0].local_addr().unwrap();
            let acceptor =
                crate::listener::Acceptor::from_std(group.into_iter().next().unwrap()).unwrap();
            let accept = || async {
                loop {
                    match acceptor.try_accept(false) {
                        Ok((s, _)) => return s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            acceptor.readable().await.unwrap()
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            };
            let mut buf = [0u8; 64];
            // Bytes queued before the accept: no read has been tried, and EPOLL_CTL_ADD
            // reports them.
            let mut early = TcpStream::connect(addr).unwrap();
            early.write_all(b"early").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let ours = within("accept", accept()).await;
            within("readable", ours.readable()).await.unwrap();
            assert_eq!(within("early bytes", read_some(&ours, &mut buf)).await, 5);
            // TCP_NODELAY came from the listener.
            assert!(ours.with_socket(|s| s.nodelay()).unwrap());
            // Accepted before its bytes: the socket starts not readable (no EAGAIN read to find
            // out) and the bytes' edge wakes the wait.
            let mut late = TcpStream::connect(addr).unwrap();
            let ours = within("accept", accept()).await;
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(
                std::future::Future::poll(std::pin::pin!(ours.readable()), &mut cx).is_pending()
            );
            late.write_all(b"late").unwrap();
            within("late readable", ours.readable()).await.unwrap();
            assert_eq!(within("late bytes", read_some(&ours, &mut buf)).await, 4);
            drop((early, late));
        });
    }

    /// A connected pair: Keel's end registered, the peer a plain blocking socket.
    fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        (Stream::from_std(ours).unwrap(), peer)
    }

    async fn read_some(s: &Stream, buf: &mut [u8]) -> usize {
        loop {
            match s.try_read(buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.readable().await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        match monoio::time::timeout(Duration::from_secs(5), f).await {
            Ok(v) => v,
            Err(_) => panic!("hung: {what}"),
        }
    }

    #[test]
    fn a_short_read_waits_for_the_next_bytes() {
        on_both_drivers(|| async {
            let (ours, mut peer) = pair();
            let mut buf = [0u8; 64];
            peer.write_all(b"one").unwrap();
            assert_eq!(within("first", read_some(&ours, &mut buf)).await, 3);
            // The short read marked the socket drained: a wait now parks until more comes.
            let later = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                peer.write_all(b"two").unwrap();
                peer
            });
            assert_eq!(within("second", read_some(&ours, &mut buf)).await, 3);
            assert_eq!(&buf[..3], b"two");
            drop(later.join().unwrap());
            assert_eq!(within("eof", read_some(&ours, &mut buf)).await, 0);
        });
    }

    #[test]
    fn data_and_fin_arriving_together_give_the_data_then_eof() {
        on_both_drivers(|| async {
            let (ours, mut peer) = pair();
            let mut buf = [0u8; 64];
            // Nothing yet: the socket is marked not readable, so the wait below takes an edge.
            assert!(ours.try_read(&mut buf).is_err());
            peer.write_all(b"last words").unwrap();
            drop(peer);
            // Let both arrive before epoll is read: one edge, with RDHUP.
            std::thread::sleep(Duration::from_millis(20));
            within("edge", ours.readable()).await.unwrap();
            assert_eq!(within("data", read_some(&ours, &mut buf)).await, 10);
            // No edge follows the short read: a wait must still see the pending EOF.
            within("eof", ours.readable()).await.unwrap();
            assert_eq!(ours.try_read(&mut buf).unwrap(), 0);
        });
    }

    #[test]
    fn two_tasks_waiting_on_one_socket_are_both_woken() {
        on_both_drivers(|| async {
            let (ours, mut peer) = pair();
            let ours = std::rc::Rc::new(ours);
            let mut buf = [0u8; 8];
            // Drain to "not readable" so both waits park.
            assert!(ours.try_read(&mut buf).is_err());
            let a = monoio::spawn({
                let s = ours.clone();
                async move { s.readable().await.is_ok() }
            });
            let b = monoio::spawn({
                let s = ours.clone();
                async move { s.readable().await.is_ok() }
            });
            monoio::time::sleep(Duration::from_millis(20)).await;
            peer.write_all(b"x").unwrap();
            assert!(within("first waiter", a).await);
            assert!(within("second waiter", b).await);
        });
    }

    #[test]
    fn alternating_waiters_keep_one_entry_each() {
        on_both_drivers(|| async {
            let (ours, _peer) = pair();
            let mut buf = [0u8; 8];
            assert!(ours.try_read(&mut buf).is_err());
            let reactor = super::current().unwrap();
            let (a, b) = (std::task::Waker::noop(), other_waker());
            let ready = || {
                reactor.poll_ready(
                    ours.io.slot,
                    super::Direction::Read,
                    &mut Context::from_waker(a),
                )
            };
            let ready_b = || {
                reactor.poll_ready(
                    ours.io.slot,
                    super::Direction::Read,
                    &mut Context::from_waker(&b),
                )
            };
            for _ in 0..100 {
                assert!(ready().is_pending());
                assert!(ready_b().is_pending());
            }
            assert_eq!(reactor.extra.borrow().len(), 1);
        });
    }

    /// A waker that `will_wake` tells apart from `Waker::noop()`.
    fn other_waker() -> std::task::Waker {
        struct Nothing;
        impl std::task::Wake for Nothing {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        std::task::Waker::from(std::sync::Arc::new(Nothing))
    }

    #[test]
    fn a_wait_on_a_drained_socket_parks_instead_of_spinning() {
        on_both_drivers(|| async {
            let (ours, mut peer) = pair();
            let mut buf = [0u8; 8];
            assert!(ours.try_read(&mut buf).is_err());
            // Nothing arrives: the wait times out (a stale "ready" would return at once).
            let r = monoio::time::timeout(Duration::from_millis(100), ours.readable()).await;
            assert!(r.is_err(), "a drained socket reported readable");
            // A peek that found nothing marks it too, as the raw-fd users (splice) do.
            peer.write_all(b"y").unwrap();
            within("peek", ours.readable()).await.unwrap();
            assert_eq!(ours.try_peek_byte().unwrap(), Some(b'y'));
            assert_eq!(within("read", read_some(&ours, &mut buf)).await, 1);
            let mut sink = [0u8; 1];
            peer.set_nonblocking(true).unwrap();
            assert!(peer.read(&mut sink).is_err());
        });
    }

    #[test]
    fn a_final_write_delivers_every_byte_then_eof_with_no_stall() {
        on_both_drivers(|| async {
            // A small response (all of it held back by MSG_MORE until the shutdown) and one
            // larger than the socket buffers (partial writes, waits for room, then a sub-MSS
            // tail): each must arrive whole and then EOF, well before any timer could push it.
            for (head, body) in [(100usize, 77usize), (333, (4 << 20) + 5)] {
                let (ours, mut peer) = pair();
                let head_bytes = vec![b'h'; head];
                let body_bytes: Vec<u8> = (0..body).map(|i| (i % 251) as u8).collect();
                let expected = [head_bytes.clone(), body_bytes.clone()].concat();
                let reader = std::thread::spawn(move || {
                    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut got = Vec::new();
                    let started = std::time::Instant::now();
                    peer.read_to_end(&mut got).map(|_| (got, started.elapsed()))
                });
                within(
                    "final write",
                    ours.write_final_vectored(&[&head_bytes, &body_bytes]),
                )
                .await
                .unwrap();
                // The socket stays open on our side: the FIN came from the shutdown.
                let (got, took) = reader.join().unwrap().expect("EOF did not come");
                assert!(got == expected, "{} of {} bytes", got.len(), expected.len());
                assert!(took < Duration::from_secs(1), "stalled for {took:?}");
                drop(ours);
            }
        });
    }

    #[test]
    fn a_full_send_buffer_waits_for_room() {
        on_both_drivers(|| async {
            let (ours, mut peer) = pair();
            let chunk = vec![7u8; 1 << 16];
            // Fill our send buffer and the peer's receive buffer.
            let mut sent = 0usize;
            loop {
                match ours.try_write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let r = monoio::time::timeout(Duration::from_millis(100), ours.writable()).await;
            assert!(r.is_err(), "a full socket reported writable");
            let reader = std::thread::spawn(move || {
                let mut total = 0usize;
                let mut buf = vec![0u8; 1 << 16];
                while total < sent + chunk.len() {
                    match peer.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                total
            });
            within("room", ours.write_all(&vec![7u8; 1 << 16]))
                .await
                .unwrap();
            drop(ours);
            assert_eq!(reader.join().unwrap(), sent + (1 << 16));
        });
    }
}
