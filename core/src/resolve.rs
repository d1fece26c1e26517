//! Name resolution for destinations only known at request time (ALLOW_ANY passthrough), kept off
//! the workers: an IP literal needs none; a name is looked up by `getaddrinfo` on a short-lived
//! thread while the worker serves others, and the answer is cached per worker for a while.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a looked-up address is reused (Envoy's DNS refresh default is 5 s for the dynamic
/// forward proxy's hosts; names in a mesh rarely move faster than this).
const TTL: Duration = Duration::from_secs(30);
/// Lookups in flight at once over the process; beyond this a request fails rather than queue.
const MAX_LOOKUPS: usize = 64;
/// Names cached per worker before the cache is emptied.
const MAX_CACHED: usize = 1024;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CACHE: RefCell<HashMap<(String, u16), (SocketAddr, Instant)>> = RefCell::new(HashMap::new());
}

/// `host:port` (or `[v6]:port`, or a host alone with `default_port`) as an address.
pub async fn resolve(authority: &str, default_port: u16) -> io::Result<SocketAddr> {
    let (host, port) = split_authority(authority, default_port)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad authority"))?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad host name"));
    }
    let key = (host.to_ascii_lowercase(), port);
    let cached = CACHE.with(|c| {
        c.borrow()
            .get(&key)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(a, _)| *a)
    });
    if let Some(a) = cached {
        return Ok(a);
    }
    if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_LOOKUPS {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "too many name lookups in flight",
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = key.0.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-resolve".into())
        .spawn(move || {
            let r = (name.as_str(), port)
                .to_socket_addrs()
                .map(|mut a| a.next());
            IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return Err(e);
    }
    let addr = rx
        .await
        .map_err(|_| io::Error::other("resolver thread ended"))??
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= MAX_CACHED {
            c.clear();
        }
        c.insert(key, (addr, Instant::now()));
    });
    Ok(addr)
}

/// Splits an authority into host and port.
fn split_authority(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority, default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.b:81", 80), Some(("a.b", 81)));
        assert_eq!(split_authority("a.b", 80), Some(("a.b", 80)));
        assert_eq!(split_authority("[::1]:9", 80), Some(("::1", 9)));
        assert_eq!(split_authority("[::1]", 80), Some(("::1", 80)));
        assert_eq!(split_authority("a:b", 80), None);
        assert_eq!(split_authority("::1", 80), None);
    }

    #[test]
    fn literals_and_names() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(
                resolve("127.0.0.1:8080", 80).await.unwrap(),
                "127.0.0.1:8080".parse().unwrap()
            );
            let a = resolve("localhost:7", 80).await.unwrap();
            assert!(a.ip().is_loopback() && a.port() == 7);
            assert!(resolve("bad host!", 80).await.is_err());
        });
    }
}
