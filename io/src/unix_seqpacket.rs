//! A Unix SOCK_SEQPACKET socket carrying short messages with file descriptors (SCM_RIGHTS): how a
//! new Keel process takes the listening sockets of the one it replaces.
//!
//! Sequenced packets keep message boundaries, so each message's descriptors arrive with exactly the
//! text that names them. Everything here is blocking, with timeouts: it runs on the process's
//! control thread, never on a worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 253;
/// Longest message text.
pub const MAX_TEXT: usize = 4096;

/// A listening or connected SOCK_SEQPACKET socket.
pub struct SeqPacket(OwnedFd);

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid; we fill family and path below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unusable socket path {}", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl SeqPacket {
    /// Listens at `path`, replacing a stale socket file left there.
    pub fn listen(path: &Path) -> io::Result<SeqPacket> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; the fd is ours.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        // Whoever connects is handed every listening socket: only our own user may.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        // SAFETY: listen(2) on our bound socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
        Ok(SeqPacket(fd))
    }

    /// The user id of the process at the other end of a connected socket (SO_PEERCRED).
    pub fn peer_uid(&self) -> io::Result<u32> {
        // SAFETY: an all-zero ucred is a valid out-buffer.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
        check(unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok(cred.uid)
    }

    /// Connects to the socket listening at `path`.
    pub fn connect(path: &Path) -> io::Result<SeqPacket> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; the fd is ours.
        check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        Ok(SeqPacket(fd))
    }

    /// Waits up to `timeout` for a connection; `Ok(None)` when none came.
    pub fn accept(&self, timeout: Duration) -> io::Result<Option<SeqPacket>> {
        if !self.wait(timeout)? {
            return Ok(None);
        }
        // SAFETY: accept4(2) on our listening fd without asking for the peer address.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: accept4 returned a new fd that nothing else owns.
        Ok(Some(SeqPacket(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd owned by this frame.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n >= 0 {
                return Ok(n > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `text` with `fds` attached, as one message.
    pub fn send(&self, text: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.len() > MAX_FDS || text.len() > MAX_TEXT || text.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too large",
            ));
        }
        let mut iov = libc::iovec {
            iov_base: text.as_ptr() as *mut libc::c_void,
            iov_len: text.len(),
        };
        let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
        // SAFETY: an all-zero msghdr is valid; we point it at our iovec and control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            // SAFETY: the control buffer holds CMSG_SPACE(fds) bytes, aligned for cmsghdr, so the
            // first header and its data (the fds) fit in it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: `msg` points at buffers that live through the call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one message within `timeout`: its text and the descriptors it carried.
    pub fn recv(&self, timeout: Duration) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        if !self.wait(timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no message in time",
            ));
        }
        let mut text = vec![0u8; MAX_TEXT];
        let mut iov = libc::iovec {
            iov_base: text.as_mut_ptr().cast(),
            iov_len: text.len(),
        };
        let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
        // SAFETY: an all-zero msghdr is valid; we point it at our buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = (control.len() * 8) as _;
        // SAFETY: `msg` points at buffers that live through the call; received fds get CLOEXEC.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into our buffer, bounded by
        // msg_controllen; SCM_RIGHTS data is an array of fds now owned by this process.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 && fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message truncated",
            ));
        }
        text.truncate(n as usize);
        Ok((text, fds))
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn passes_text_and_descriptors() {
        let path = std::env::temp_dir().join(format!("keel-seqpacket-{}", std::process::id()));
        let server = SeqPacket::listen(&path).unwrap();
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let c = SeqPacket::connect(&path).unwrap();
                let (text, fds) = c.recv(Duration::from_secs(5)).unwrap();
                assert_eq!(text, b"L one 1");
                let mut f = std::fs::File::from(fds.into_iter().next().unwrap());
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                assert_eq!(s, "carried");
                c.send(b"READY", &[]).unwrap();
            }
        });
        let conn = server.accept(Duration::from_secs(5)).unwrap().unwrap();
        // SAFETY: getuid has no arguments and cannot fail.
        assert_eq!(conn.peer_uid().unwrap(), unsafe { libc::getuid() });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let file_path = path.with_extension("txt");
        std::fs::File::create(&file_path)
            .unwrap()
            .write_all(b"carried")
            .unwrap();
        let file = std::fs::File::open(&file_path).unwrap();
        conn.send(b"L one 1", &[file.as_raw_fd()]).unwrap();
        let (text, fds) = conn.recv(Duration::from_secs(5)).unwrap();
        assert_eq!(text, b"READY");
        assert!(fds.is_empty());
        client.join().unwrap();
        assert_eq!(
            conn.recv(Duration::from_secs(5)).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&file_path);
    }
}
