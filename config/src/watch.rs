//! Watching the config for changes with inotify, debounced, on a thread of its own.
//!
//! The **directory** is watched, never the file: editors replace files by rename, and a Kubernetes
//! ConfigMap mount swaps a `..data` symlink (`..data_tmp` renamed over `..data`), after which a
//! watch on the old file would be silently dead. Only events that can change what [`crate::load`]
//! reads count: a config file (`*.yaml`, `*.yml`, or the file named on the command line) written,
//! created, renamed or removed, or `..data` replaced. Reads (ours included) are not subscribed to.
//! A burst of events — a ConfigMap swap fires several — yields one call after `debounce` of quiet.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What is watched for a config given as `path`: the directory, and the one name that matters in
/// it when `path` is a file.
fn target(path: &Path) -> (PathBuf, Option<Vec<u8>>) {
    if path.is_dir() {
        return (path.to_path_buf(), None);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.as_bytes().to_vec());
    (dir, name)
}

/// Whether an event on `name` in the watched directory can change the config.
fn relevant(name: &[u8], only: Option<&[u8]>) -> bool {
    if name == b"..data" {
        return true;
    }
    match only {
        Some(file) => name == file,
        None => !name.starts_with(b".") && (name.ends_with(b".yaml") || name.ends_with(b".yml")),
    }
}

/// Starts watching the config at `path`; `on_change` runs on the watcher's thread after each
/// debounced burst of relevant events. Fails if the directory cannot be watched.
pub fn spawn(
    path: &Path,
    debounce: Duration,
    mut on_change: impl FnMut() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    let (dir, only) = target(path);
    let fd = Inotify::new()?;
    fd.watch(&dir)?;
    std::thread::Builder::new()
        .name("keel-config-watch".into())
        .spawn(move || {
            let mut pending = false;
            loop {
                let wait = if pending {
                    debounce.as_millis().min(i32::MAX as u128) as i32
                } else {
                    -1
                };
                match fd.wait(wait) {
                    Ok(true) => {
                        let mut changed = false;
                        if fd
                            .read_names(|name| changed |= relevant(name, only.as_deref()))
                            .is_err()
                        {
                            return;
                        }
                        pending |= changed;
                    }
                    Ok(false) => {
                        if pending {
                            pending = false;
                            on_change();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), error = %e, "config watch failed; reload with SIGHUP");
                        return;
                    }
                }
            }
        })
}

/// Watches the certificate and key files a config names, so that a rotated file reloads the
/// config (which reads them). The set changes with the config: [`FilesWatch::watch`] adds the
/// directories of new files (a directory stays watched; events for names no longer wanted are
/// ignored). A Kubernetes Secret mount's `..data` swap counts as a change of every file in it.
pub struct FilesWatch {
    fd: std::sync::Arc<Inotify>,
    /// Watch descriptor → file names wanted in that directory.
    wanted: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i32, Vec<Vec<u8>>>>>,
}

impl FilesWatch {
    /// Starts the watcher thread; `on_change` runs on it after each debounced burst of events on
    /// a wanted file.
    pub fn spawn(
        debounce: Duration,
        mut on_change: impl FnMut() + Send + 'static,
    ) -> io::Result<FilesWatch> {
        let fd = std::sync::Arc::new(Inotify::new()?);
        let wanted: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i32, Vec<Vec<u8>>>>> =
            Default::default();
        let (thread_fd, thread_wanted) = (fd.clone(), wanted.clone());
        std::thread::Builder::new()
            .name("keel-cert-watch".into())
            .spawn(move || {
                let mut pending = false;
                loop {
                    let wait = if pending {
                        debounce.as_millis().min(i32::MAX as u128) as i32
                    } else {
                        -1
                    };
                    match thread_fd.wait(wait) {
                        Ok(true) => {
                            let mut changed = false;
                            let read = thread_fd.read_events(|wd, name| {
                                let wanted = thread_wanted.lock().unwrap_or_else(|e| e.into_inner());
                                changed |= name == b"..data"
                                    || wanted.get(&wd).is_some_and(|names| names.iter().any(|n| n == name));
                            });
                            if read.is_err() {
                                return;
                            }
                            pending |= changed;
                        }
                        Ok(false) => {
                            if pending {
                                pending = false;
                                on_change();
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!(error = %e, "certificate watch failed; reload with SIGHUP after rotating");
                            return;
                        }
                    }
                }
            })?;
        Ok(FilesWatch { fd, wanted })
    }

    /// Makes sure every file of `files` is watched (its directory, for its name).
    pub fn watch(&self, files: &[PathBuf]) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        for file in files {
            let (dir, name) = target(file);
            let Some(name) = name else { continue };
            match self.fd.watch(&dir) {
                Ok(wd) => {
                    let names = wanted.entry(wd).or_default();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot watch for certificate rotation; reload with SIGHUP after rotating")
                }
            }
        }
    }
}

/// An inotify instance (closed on drop).
struct Inotify(i32);

impl Inotify {
    fn new() -> io::Result<Inotify> {
        // SAFETY: inotify_init1 takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Inotify(fd))
    }

    /// Watches `dir` (again: the kernel returns the same descriptor); returns its descriptor.
    fn watch(&self, dir: &Path) -> io::Result<i32> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ONLYDIR;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; the fd is ours.
        let wd = unsafe { libc::inotify_add_watch(self.0, c.as_ptr(), mask) };
        if wd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot watch {}: {e}", dir.display()),
            ));
        }
        Ok(wd)
    }

    /// Waits up to `timeout_ms` (-1: forever) for events; true when some are ready.
    fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n > 0)
    }

    /// Reads the waiting events and calls `each` with the name of every one that has a name.
    fn read_names(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        self.read_events(|_, name| each(name))
    }

    /// Reads the waiting events and calls `each` with the watch descriptor and name of every one
    /// that has a name.
    fn read_events(&self, mut each: impl FnMut(i32, &[u8])) -> io::Result<()> {
        // Aligned for `inotify_event`; large enough for many events with maximal names.
        #[repr(C, align(8))]
        struct Buf([u8; 16384]);
        let mut buf = Buf([0; 16384]);
        // SAFETY: reading into our own buffer of the length given.
        let n = unsafe { libc::read(self.0, buf.0.as_mut_ptr().cast(), buf.0.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let bytes = &buf.0[..n as usize];
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + header <= bytes.len() {
            // Fields by offset (wd, mask, cookie: 4 bytes each; then the name length).
            let wd = i32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            let len = u32::from_ne_bytes([
                bytes[at + 12],
                bytes[at + 13],
                bytes[at + 14],
                bytes[at + 15],
            ]) as usize;
            let end = (at + header + len).min(bytes.len());
            let name = &bytes[at + header..end];
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if !name.is_empty() {
                each(wd, name);
            }
            at = end;
        }
        Ok(())
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: closing the fd this value owns, once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn filters_names() {
        assert!(relevant(b"..data", None));
        assert!(relevant(b"10-routes.yaml", None));
        assert!(relevant(b"a.yml", None));
        assert!(!relevant(b".a.yaml.swp", None));
        assert!(!relevant(b"a.yaml~", None));
        assert!(!relevant(b"..2026_11_22_10_00_00.123", None));
        assert!(relevant(b"keel.conf", Some(b"keel.conf")));
        assert!(!relevant(b"other.yaml", Some(b"keel.conf")));
    }

    #[test]
    fn sees_a_configmap_style_symlink_swap_once() {
        let dir = std::env::temp_dir().join(format!("keel-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v1/keel.yaml"), "a").unwrap();
        std::fs::write(dir.join("..v2/keel.yaml"), "b").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/keel.yaml", dir.join("keel.yaml")).unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = spawn(&dir, Duration::from_millis(50), move || {
            let _ = tx.send(());
        })
        .unwrap();
        // What the kubelet does: a new symlink under a temporary name, renamed over `..data`.
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the swap is seen");
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "one call per burst"
        );
        assert_eq!(std::fs::read_to_string(dir.join("keel.yaml")).unwrap(), "b");
        // A file written in place is seen too; a stray swap file is not.
        std::fs::write(dir.join(".keel.yaml.swp"), "x").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        std::fs::write(dir.join("20-more.yaml"), "c").unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a new file is seen");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
