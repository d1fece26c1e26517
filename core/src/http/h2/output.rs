//! The sending half of an HTTP/2 connection, the same for Keel as a server (to clients) and as a
//! client (to upstreams): frames gathered in one output buffer for a single writer task, the
//! peer's connection window and SETTINGS, and the stream tasks waiting for window or for room.
//!
//! Stream tasks never write to the socket: they append whole frames and wake the writer, which
//! sends what has gathered in one write, so frames of many streams leave together.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::task::{Poll, Waker};
use std::time::Duration;

use keel_tls::Transport;

use super::frame::{self, Settings};

/// Output bytes queued beyond which DATA waits for the writer.
pub(super) const OUTPUT_HIGH_WATER: usize = 256 * 1024;

/// Frames waiting for the writer, and what governs sending DATA.
pub(super) struct Output {
    pub out: RefCell<Vec<u8>>,
    writer: Cell<Option<Waker>>,
    /// Tasks waiting for send window or for room in `out`.
    send_waiters: RefCell<Vec<Waker>>,
    /// What the peer lets us send on the connection.
    pub send_window: Cell<i64>,
    pub peer: Cell<Settings>,
    pub data_frames_sent: Cell<u64>,
    /// The connection is over: writes fail, waiters stop waiting.
    pub closed: Cell<bool>,
}

/// Why DATA could not go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendError {
    /// The stream or the connection is gone.
    Gone,
    /// The peer kept its window shut for longer than allowed.
    WindowTimeout,
}

impl From<SendError> for io::Error {
    fn from(e: SendError) -> io::Error {
        match e {
            SendError::Gone => io::ErrorKind::BrokenPipe.into(),
            SendError::WindowTimeout => io::ErrorKind::TimedOut.into(),
        }
    }
}

impl Output {
    pub fn new() -> Output {
        Output {
            out: RefCell::new(Vec::with_capacity(1024)),
            writer: Cell::new(None),
            send_waiters: RefCell::new(Vec::new()),
            send_window: Cell::new(frame::DEFAULT_WINDOW as i64),
            peer: Cell::new(Settings::default()),
            data_frames_sent: Cell::new(0),
            closed: Cell::new(false),
        }
    }

    /// Queues bytes for the writer.
    pub fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.out.borrow_mut());
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.borrow().len()
    }

    pub fn wake_senders(&self) {
        for w in self.send_waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Ends the connection's sending: the writer flushes what is queued and stops.
    pub fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        self.wake_senders();
    }

    /// How many of `want` bytes may go now on a stream whose send window is `window` (both
    /// windows open, room in the output): at least one, unless `want` is 0; None to wait.
    fn window_now(
        &self,
        window: &Cell<i64>,
        gone: &impl Fn() -> bool,
        want: usize,
    ) -> Option<Result<usize, SendError>> {
        if self.closed.get() || gone() {
            return Some(Err(SendError::Gone));
        }
        if want == 0 {
            return Some(Ok(0));
        }
        let max_frame = self.peer.get().max_frame_size as i64;
        let allowed = window
            .get()
            .min(self.send_window.get())
            .min(max_frame)
            .min(want as i64);
        if allowed > 0 && self.out.borrow().len() < OUTPUT_HIGH_WATER {
            return Some(Ok(allowed as usize));
        }
        None
    }

    /// Waits until [`Self::window_now`] lets some of `want` bytes go, and says how many.
    async fn window_for(
        &self,
        window: &Cell<i64>,
        gone: &impl Fn() -> bool,
        want: usize,
    ) -> Result<usize, SendError> {
        poll_fn(|cx| match self.window_now(window, gone, want) {
            Some(r) => Poll::Ready(r),
            None => {
                self.send_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Sends `data` on stream `id` as DATA frames as the windows allow (`end`: the last carries
    /// END_STREAM; empty `data` with `end` is one empty END_STREAM frame). Each wait for window
    /// is bounded by `timeout`.
    pub async fn send_data(
        &self,
        id: u32,
        window: &Cell<i64>,
        gone: impl Fn() -> bool,
        mut data: &[u8],
        end: bool,
        timeout: Duration,
    ) -> Result<(), SendError> {
        loop {
            // Most sends find the windows open: the timer (boxed, so that monoio's 128-byte
            // aligned entry does not make every stream's task 128-byte aligned and its spawn a
            // posix_memalign) is armed only for a real wait.
            let n = match self.window_now(window, &gone, data.len()) {
                Some(r) => r?,
                None => {
                    match keel_io::time::timeout(
                        timeout,
                        self.window_for(window, &gone, data.len()),
                    )
                    .await
                    {
                        Ok(r) => r?,
                        Err(_) => return Err(SendError::WindowTimeout),
                    }
                }
            };
            let (now, rest) = data.split_at(n);
            let last = rest.is_empty();
            self.push(|o| {
                frame::write_head(
                    o,
                    now.len(),
                    frame::DATA,
                    if last && end { frame::END_STREAM } else { 0 },
                    id,
                );
                o.extend_from_slice(now);
            });
            self.data_frames_sent.set(self.data_frames_sent.get() + 1);
            window.set(window.get() - n as i64);
            self.send_window.set(self.send_window.get() - n as i64);
            data = rest;
            if last {
                return Ok(());
            }
        }
    }

    /// Sends what is queued, in one write per wakeup, until the connection is closed and
    /// everything queued has gone (or a write fails). `wrote` hears of each write.
    pub async fn write_loop(&self, transport: &Transport, mut wrote: impl FnMut()) {
        let mut spare = Vec::with_capacity(1024);
        loop {
            poll_fn(|cx| {
                if !self.out.borrow().is_empty() || self.closed.get() {
                    Poll::Ready(())
                } else {
                    self.writer.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            if self.out.borrow().is_empty() {
                return;
            }
            std::mem::swap(&mut *self.out.borrow_mut(), &mut spare);
            self.wake_senders();
            if transport.write_all(&spare).await.is_err() {
                self.close();
                return;
            }
            wrote();
            spare.clear();
            if spare.capacity() > OUTPUT_HIGH_WATER * 2 {
                spare = Vec::with_capacity(1024);
            }
        }
    }
}

/// A receive window (connection or stream): what the peer may still send, and bytes consumed
/// since the last WINDOW_UPDATE, given back in batches of half the window.
pub(super) struct RecvWindow {
    window: Cell<i64>,
    unacked: Cell<u32>,
    size: u32,
}

impl RecvWindow {
    pub fn new(size: u32) -> RecvWindow {
        RecvWindow {
            window: Cell::new(size as i64),
            unacked: Cell::new(0),
            size,
        }
    }

    /// The window's full size.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Takes `n` bytes of flow-controlled payload; false when they exceed the window.
    pub fn take(&self, n: u32) -> bool {
        let w = self.window.get() - n as i64;
        self.window.set(w);
        w >= 0
    }

    /// Gives back `n` consumed bytes: the increment to announce, once half the window is due.
    pub fn credit(&self, n: usize) -> Option<u32> {
        let unacked = self.unacked.get() + n as u32;
        if unacked >= self.size / 2 {
            self.unacked.set(0);
            self.window.set(self.window.get() + unacked as i64);
            Some(unacked)
        } else {
            self.unacked.set(unacked);
            None
        }
    }
}
