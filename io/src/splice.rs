//! Zero-copy forwarding: socket → pipe → socket with splice(2), no bytes through user space.
//!
//! monoio 0.2.4's splice moves 4 KiB per call and runs on io_uring's io-wq threads off the pinned
//! core (measured slower than copying). Here splice is called directly, non-blocking, after the same
//! readiness waits as the copying path, through a per-worker pool of 1 MiB pipes. A pipe is only
//! held while bytes are in flight, and returns to the pool empty.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::stream::Stream;

/// Pipe capacity asked for with F_SETPIPE_SZ: one splice can then move up to this much.
pub const PIPE_SIZE: usize = 1024 * 1024;
/// Empty pipes kept per worker.
const POOL_MAX: usize = 64;

/// A pipe used as a splice buffer.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2(2) writes two fds into the 2-element array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl(2) on a pipe fd we own; no memory is passed. A refusal (pipe-max-size) keeps the default.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let capacity = if size > 0 { size as usize } else { 64 * 1024 };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// A pipe from this worker's pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to the pool. A pipe that may still hold bytes must be dropped instead.
    fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice(2) between two fds we hold open, with null offsets (both are pipes or sockets);
    // no user memory is involved.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Like [`crate::forward::forward`], but the bytes never enter user space.
pub async fn forward_splice(
    src: &Stream,
    dst: &Stream,
    mut on_chunk: impl FnMut(usize),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let pipe = Pipe::take()?;
        loop {
            let n = match splice(src.raw_fd(), pipe.write.as_raw_fd(), pipe.capacity) {
                Ok(0) => {
                    pipe.give_back();
                    dst.shutdown_write()?;
                    return Ok(total);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.read_blocked();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut left = n;
            while left > 0 {
                match splice(pipe.read.as_raw_fd(), dst.raw_fd(), left) {
                    // A short splice into a socket does not prove it full (a pipe moves one
                    // page-buffer at a time): only EAGAIN marks it.
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.write_blocked();
                        dst.writable().await?
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The pipe may still hold bytes: it is dropped, not pooled.
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            on_chunk(n);
            if n < pipe.capacity {
                // Not proof the socket is drained (the pipe may have run out of page slots
                // first): the next wait returns at once and the next splice tells.
                break;
            }
        }
        pipe.give_back();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::forward_splice;
    use crate::{IoDriver, Stream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// A body sent with sendfile(2) from an odd file offset (as nginx serves files) arrives as
    /// page-cache fragments that straddle pages, so a splice into a pipe can run out of page
    /// slots before it runs out of bytes. That short splice must not park the forwarder waiting
    /// for an edge that will never come: the sender is quiet after the body.
    #[test]
    fn a_short_splice_with_bytes_left_does_not_park() {
        const TOTAL: usize = 3 << 20;
        let path = std::env::temp_dir().join(format!("keel-splice-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![5u8; TOTAL + 100]).unwrap();
        drop(file);
        let mut drivers = vec![IoDriver::Epoll];
        if monoio::utils::detect_uring() {
            drivers.push(IoDriver::Uring);
        }
        for driver in drivers {
            let (sender, src) = pair();
            let (dst, mut receiver) = pair();
            let file = std::fs::File::open(&path).unwrap();
            let body = std::thread::spawn(move || {
                let mut offset: libc::off_t = 100;
                let mut left = TOTAL;
                while left > 0 {
                    // SAFETY: sendfile(2) between two fds this thread owns; `offset` is a live
                    // off_t it updates.
                    let n = unsafe {
                        libc::sendfile(sender.as_raw_fd(), file.as_raw_fd(), &mut offset, left)
                    };
                    assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
                    left -= n as usize;
                }
                sender
            });
            let worker = crate::worker::spawn(0, None, driver, move || async move {
                let src = Stream::from_std(src).unwrap();
                let dst = Stream::from_std(dst).unwrap();
                let _ = forward_splice(&src, &dst, |_| {}).await;
            })
            .unwrap();
            receiver
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < TOTAL {
                match receiver.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("{driver:?}: stalled after {got} of {TOTAL} bytes: {e}"),
                }
            }
            assert_eq!(got, TOTAL, "{driver:?}");
            // Quiet until here; closing ends the forwarder and its worker.
            drop(body.join().unwrap());
            let _ = worker.join();
        }
        let _ = std::fs::remove_file(&path);
    }
}
