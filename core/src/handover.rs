//! Zero-downtime binary upgrade: the running process hands its listening sockets to a new one.
//!
//! The old process listens on a Unix SOCK_SEQPACKET socket (`--upgrade-socket`). A new process
//! started with `--upgrade-from` connects, says hello, and receives every listening socket (one
//! message per listener, the sockets attached with SCM_RIGHTS) and the admin socket. It starts
//! its workers on those very sockets — so connections already queued in them are accepted, not
//! reset — binds whatever else its config needs, and says READY. Only then does the old process
//! stop accepting, drain, and exit. If the new process dies before READY, the old one never
//! stopped serving.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use keel_io::unix_seqpacket::{SeqPacket, MAX_FDS};

use crate::fleet::Inherited;

const HELLO: &str = "KEEL-HANDOVER 1";
/// How long the new process may take from receiving the sockets to serving on them.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Old side: gives `sockets` (by listener name) and `admin` to the successor on `conn`, and waits
/// until it serves. `Ok(pid)` of the successor means this process must now drain and exit.
pub fn give(
    conn: &SeqPacket,
    sockets: &BTreeMap<String, Vec<OwnedFd>>,
    admin: Option<RawFd>,
) -> Result<u32, String> {
    // The socket file is 0600, and the peer must be our own user (or root) all the same.
    let peer = conn
        .peer_uid()
        .map_err(|e| format!("cannot identify the new process: {e}"))?;
    // SAFETY: getuid has no arguments and cannot fail.
    let ours = unsafe { libc::getuid() };
    if peer != ours && peer != 0 {
        return Err(format!(
            "refused: the new process runs as uid {peer}, this one as uid {ours}"
        ));
    }
    let (hello, _) = conn
        .recv(STEP_TIMEOUT)
        .map_err(|e| format!("no hello from the new process: {e}"))?;
    if hello != HELLO.as_bytes() {
        return Err(format!(
            "unexpected hello {:?}",
            String::from_utf8_lossy(&hello)
        ));
    }
    let send = |text: String, fds: &[RawFd]| {
        conn.send(text.as_bytes(), fds)
            .map_err(|e| format!("cannot send sockets: {e}"))
    };
    for (name, fds) in sockets {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for chunk in raw.chunks(MAX_FDS) {
            send(format!("L {name} {}", chunk.len()), chunk)?;
        }
    }
    if let Some(fd) = admin {
        send("A".into(), &[fd])?;
    }
    send(format!("E {}", std::process::id()), &[])?;
    let (ready, _) = conn
        .recv(START_TIMEOUT)
        .map_err(|e| format!("the new process did not start serving: {e}"))?;
    let pid = std::str::from_utf8(&ready)
        .ok()
        .and_then(|t| t.strip_prefix("READY "))
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| "the new process sent no READY".to_string())?;
    send("DRAINING".into(), &[])?;
    Ok(pid)
}

/// New side: the process being replaced, until it is told to drain.
pub struct Predecessor {
    conn: SeqPacket,
    pub pid: u32,
}

/// What a predecessor handed over.
pub struct Handed {
    pub predecessor: Predecessor,
    pub listeners: Inherited,
    pub admin: Option<TcpListener>,
}

/// New side: connects to the running process at `path` and takes its sockets.
pub fn take(path: &Path) -> Result<Handed, String> {
    let conn = SeqPacket::connect(path)
        .map_err(|e| format!("cannot reach the running keel at {}: {e}", path.display()))?;
    conn.send(HELLO.as_bytes(), &[])
        .map_err(|e| format!("handover: {e}"))?;
    let mut listeners = Inherited::new();
    let mut admin = None;
    loop {
        let (text, fds) = conn
            .recv(STEP_TIMEOUT)
            .map_err(|e| format!("handover: {e}"))?;
        let text = String::from_utf8_lossy(&text).into_owned();
        let mut words = text.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("L"), Some(name), Some(n)) if n.parse() == Ok(fds.len()) => {
                let group = listeners.entry(name.to_string()).or_default();
                for fd in fds {
                    group.push(listening(fd)?);
                }
            }
            (Some("A"), None, None) if fds.len() == 1 => {
                admin = fds.into_iter().next().map(listening).transpose()?;
            }
            (Some("E"), Some(pid), None) => {
                let pid = pid
                    .parse()
                    .map_err(|_| format!("handover: bad end message {text:?}"))?;
                return Ok(Handed {
                    predecessor: Predecessor { conn, pid },
                    listeners,
                    admin,
                });
            }
            _ => return Err(format!("handover: unexpected message {text:?}")),
        }
    }
}

/// A received fd as a non-blocking TCP listener, refusing anything else.
fn listening(fd: OwnedFd) -> Result<TcpListener, String> {
    let socket = socket2::Socket::from(fd);
    let listening = socket.is_listener().unwrap_or(false);
    let inet = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some();
    if !listening || !inet {
        return Err("handover: received a socket that is not a listening TCP socket".into());
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("handover: {e}"))?;
    Ok(socket.into())
}

impl Predecessor {
    /// Tells the old process that this one serves; it answers that it drains.
    pub fn release(self) -> Result<(), String> {
        self.conn
            .send(format!("READY {}", std::process::id()).as_bytes(), &[])
            .map_err(|e| format!("cannot tell the old process to drain: {e}"))?;
        match self.conn.recv(STEP_TIMEOUT) {
            Ok((text, _)) if text == b"DRAINING" => Ok(()),
            Ok((text, _)) => Err(format!(
                "unexpected answer from the old process: {:?}",
                String::from_utf8_lossy(&text)
            )),
            Err(e) => Err(format!("the old process did not confirm its drain: {e}")),
        }
    }
}
