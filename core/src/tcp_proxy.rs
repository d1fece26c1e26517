//! L4 proxying: a downstream connection is paired with an upstream one and bytes flow both ways,
//! each direction half-closing independently, until both ends are done, an error, or the idle timeout.

use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;

use keel_io::forward::forward_with;
use keel_tls::Transport;

use crate::http::proxy::{Flag, Flags};
use crate::worker::{ActiveGuard, ListenerRef, Worker};

/// Proxies one accepted connection on listener `at`, with the config generation it was accepted
/// under for its whole life.
pub async fn handle(worker: Rc<Worker>, at: ListenerRef, down: Transport, peer: SocketAddr) {
    let _active = ActiveGuard::new(&worker, &at.state);
    let snapshot = &*at.gen.snapshot;
    let listener = at.config();
    let lstats = at.counters(worker.id);
    lstats.accepted.inc();
    // TCP_NODELAY came from the listener (keel_io::listener::Acceptor).
    // The access log line for the connection, written however it ends.
    let mut log = crate::access_log::Entry::start(&worker, &at, true);
    log.with(|r| {
        r.downstream_remote = Some(peer);
        r.downstream_local = Some(listener.address);
        r.details = "-";
        if let Some(s) = down.session() {
            r.mtls = s.peer_authenticated;
            r.peer_uri_san = s.peer_id.as_ref().map(|p| p.uri().to_string());
        }
    });
    let (received, sent) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));

    // Inbound: AuthorizationPolicy judges the connection (HTTP-only fields cannot apply; see
    // keel_config::authz). Refused connections are closed, as Envoy's network RBAC filter does.
    let authz = &snapshot.security.authz;
    if listener.direction == keel_config::Direction::Inbound && !authz.is_empty() {
        let local = down.local_addr().unwrap_or(listener.address);
        let conn = crate::security::connection(peer, local, down.session());
        let verdict = authz.evaluate(&conn, None);
        if verdict.audited {
            lstats.rbac_audited.inc();
        }
        if !verdict.allowed {
            lstats.rbac_denied.inc();
            log.with(|r| r.details = "rbac_access_denied_matched_policy");
            tracing::debug!(%peer, listener = %listener.name, policy = verdict.policy.unwrap_or("(no ALLOW policy matched)"), "RBAC: connection refused");
            return;
        }
        lstats.rbac_allowed.inc();
    }

    // TLS passthrough: the ClientHello's SNI picks the route; its bytes go upstream first.
    let mut hello = Vec::new();
    let picked_cluster = if listener.sni_routes.is_empty() {
        at.gen.pick_cluster(at.index, &mut worker.rng())
    } else {
        let timeout = snapshot.proxy.tls_handshake_timeout;
        let read = keel_io::time::timeout(timeout, read_client_hello(&down, &mut hello)).await;
        let info = match read {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                lstats.tls_handshake_error.inc();
                worker.warn_downstream(&listener.name, peer, &format!("TLS passthrough: {e}"));
                return;
            }
            Err(_) => {
                lstats.tls_handshake_timeout.inc();
                return;
            }
        };
        log.with(|r| r.server_name = info.server_name.clone());
        let route = listener.sni_route(info.server_name.as_deref());
        if route.is_none() && !listener.route.is_empty() {
            // A captured port's SNI routes fall back to its TCP route (e.g. passthrough).
            at.gen.pick_cluster(at.index, &mut worker.rng())
        } else {
            let Some(route) = route else {
                lstats.no_route.inc();
                log.with(|r| r.flags = Flags::of(Flag::NoRoute));
                let name = info.server_name.as_deref().unwrap_or("(none)");
                worker.warn_downstream(
                    &listener.name,
                    peer,
                    &format!("TLS passthrough: no route for SNI {name}"),
                );
                return;
            };
            match route.route.as_slice() {
                [one] => Some(one.cluster),
                many => worker
                    .pick_weighted(many.iter().map(|w| w.weight))
                    .map(|i| many[i].cluster),
            }
        }
    };
    let Some(cluster_index) = picked_cluster else {
        if listener.route.is_empty() && listener.binding != keel_config::Binding::Bound {
            // A captured connection no service claims, under REGISTRY_ONLY (BlackHoleCluster).
            lstats.registry_only_refused.inc();
            log.with(|r| r.flags = Flags::of(Flag::NoRoute));
            worker.warn_downstream(
                &listener.name,
                peer,
                &"connection refused: its destination is no registered service (REGISTRY_ONLY)",
            );
            return;
        }
        lstats.no_healthy_upstream.inc();
        log.with(|r| r.flags = Flags::of(Flag::NoHealthyUpstream));
        return;
    };
    let cluster = &snapshot.clusters[cluster_index];
    log.with(|r| {
        r.cluster = Some(cluster_index);
        if r.start.is_some() {
            r.upstream_cluster = Some(cluster.name.clone());
        }
    });
    log.opened();
    let cstats = &at.gen.clusters[cluster_index].slots[worker.id];
    // Counted in flight (least request) for as long as the connection lasts.
    // A TCP connection can be hashed only by its source address; other keys balance at random.
    let key = matches!(cluster.hash_key, Some(keel_config::HashKey::SourceIp))
        .then(|| crate::generation::source_ip_hash(peer.ip()));
    // A passthrough cluster goes where the captured connection was going.
    let original = if cluster.original_dst {
        let dst = crate::capture::original_destination(
            snapshot,
            listener.binding,
            listener.direction,
            &down,
        );
        match dst {
            Some(Ok((dst, local)))
                if !crate::capture::is_capture_port(snapshot, dst, Some(local)) =>
            {
                Some(dst)
            }
            _ => {
                lstats.no_healthy_upstream.inc();
                log.with(|r| r.flags = Flags::of(Flag::NoHealthyUpstream));
                worker.warn_downstream(
                    &listener.name,
                    peer,
                    &"passthrough: no usable original destination",
                );
                return;
            }
        }
    } else {
        None
    };
    let picked = match original {
        Some(_) => None,
        None => at.gen.pick_endpoint(cluster_index, &mut worker.rng(), key),
    };
    let Some(endpoint_address) = original.or_else(|| {
        picked
            .as_ref()
            .and_then(|p| cluster.endpoints.get(p.endpoint))
            .map(|e| e.address)
    }) else {
        lstats.no_healthy_upstream.inc();
        log.with(|r| r.flags = Flags::of(Flag::NoHealthyUpstream));
        tracing::debug!(listener = %listener.name, cluster = %cluster.name, "no endpoint");
        return;
    };
    log.with(|r| r.upstream_host = Some(endpoint_address));
    // Counted against maxConnections (and as attempted) until the upstream socket closes.
    let Some(_slot) = crate::breaker::ConnSlot::open(
        &at.gen.clusters[cluster_index],
        cluster.limits.max_connections,
        worker.id,
    ) else {
        cstats.cx_overflow.inc();
        log.with(|r| r.flags = Flags::of(Flag::UpstreamOverflow));
        worker.warn_upstream(
            &listener.name,
            &cluster.name,
            endpoint_address,
            &"overflow: maxConnections reached, connection closed",
        );
        return;
    };
    let endpoint_index = picked.as_ref().map_or(0, |p| p.endpoint);
    let up = match crate::upstream::open(
        &at.gen,
        cluster_index,
        endpoint_address,
        crate::upstream::Carries::Tcp,
    )
    .await
    {
        Ok(up) => up,
        Err(e) => {
            worker.upstream_connect_failed(&at, cluster_index, endpoint_address, &e);
            log.with(|r| r.flags = Flags::of(Flag::UpstreamConnectFailure));
            at.gen.report(
                worker.id,
                cluster_index,
                endpoint_index,
                keel_lb::outlier::Outcome::LocalFailure,
            );
            return;
        }
    };
    // For outlier detection, a TCP connection that opens is a success.
    at.gen.report(
        worker.id,
        cluster_index,
        endpoint_index,
        keel_lb::outlier::Outcome::Status(200),
    );
    tracing::trace!(%peer, upstream = %endpoint_address, "connected");
    if !hello.is_empty() && up.write_all(&hello).await.is_err() {
        return;
    }
    lstats.rx_bytes.add(hello.len() as u64);
    received.set(hello.len() as u64);
    drop(hello);

    // The worker's idle sweeper shuts both sockets down when no byte moves either way for the
    // cluster's idleTimeout; the guard (declared after both streams) forgets them before they close.
    let idle = worker
        .idle
        .register(down.raw_fd(), cluster.idle_timeout, at.state.clone());
    idle.0.set_upstream(up.raw_fd());
    let activity = &idle.0.activity;
    let mut to_upstream = pin!(forward(worker.forwarding, &down, &up, |n| {
        lstats.rx_bytes.add(n as u64);
        received.set(received.get() + n as u64);
        activity.set(activity.get().wrapping_add(1));
    }));
    let mut to_downstream = pin!(forward(worker.forwarding, &up, &down, |n| {
        lstats.tx_bytes.add(n as u64);
        sent.set(sent.get() + n as u64);
        activity.set(activity.get().wrapping_add(1));
    }));
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let failed = monoio::select! {
            r = &mut to_upstream, if !up_done => match r {
                Ok(_) => { up_done = true; false }
                Err(_) => true,
            },
            r = &mut to_downstream, if !down_done => match r {
                Ok(_) => { down_done = true; false }
                Err(_) => true,
            },
        };
        if failed {
            // An idle-timeout shutdown is counted by the sweeper, not as a reset.
            if !idle.0.expired() {
                lstats.reset.inc();
            }
            break;
        }
    }
    if idle.0.expired() {
        tracing::debug!(%peer, listener = %listener.name, "idle timeout");
    }
    log.with(|r| {
        r.bytes_received = received.get();
        r.bytes_sent = sent.get();
    });
    // Dropping both streams closes both sockets (and `log`, declared first, logs after).
}

/// Reads a whole ClientHello into `into` (consumed from the socket: the caller forwards it).
async fn read_client_hello(
    down: &Transport,
    into: &mut Vec<u8>,
) -> Result<keel_tls::client_hello::ClientHelloInfo, String> {
    use keel_tls::client_hello::{parse, MAX_CLIENT_HELLO};
    let mut chunk = [0u8; 2048];
    loop {
        down.readable().await.map_err(|e| e.to_string())?;
        match down.try_read(&mut chunk) {
            Ok(0) => return Err("connection closed before a complete ClientHello".into()),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
        match parse(into) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) if into.len() <= MAX_CLIENT_HELLO + 1024 => {}
            Ok(None) => return Err("ClientHello too large".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Moves `src` to `dst` until EOF: by the worker's mechanism (splice or copy) between plaintext
/// sockets, through a buffer (decrypting and encrypting) when either side is TLS.
async fn forward(
    how: keel_io::Forwarding,
    src: &Transport,
    dst: &Transport,
    on_chunk: impl FnMut(usize),
) -> std::io::Result<u64> {
    match (src.plain(), dst.plain()) {
        (Some(s), Some(d)) => forward_with(how, s, d, on_chunk).await,
        _ => keel_io::forward::forward(src, dst, on_chunk).await,
    }
}
