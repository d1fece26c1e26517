//! Transparent interception (`Proxy.spec.interception`): the two capture listeners (Istio's
//! `virtualOutbound` on 15001 and `virtualInbound` on 15006) and the virtual listeners they hand
//! connections to by original destination, as Envoy's `use_original_dst` does.
//!
//! Outbound, per port of every service the Sidecar's capturing egress admits:
//! - HTTP services (and those of undeclared protocol) share one virtual listener `0.0.0.0:port`
//!   whose route table picks the service by `Host`; with an undeclared protocol it sniffs, and
//!   what is not HTTP goes by TCP (to the one such service, else to the original destination);
//! - TLS / HTTPS services add SNI routes to that listener;
//! - TCP services get one virtual listener per endpoint address (`ip:port`), since only the
//!   original destination tells TCP services apart.
//!
//! A destination no virtual listener claims is served by the capture listener itself: sniffed,
//! then passed through to where it was going (ALLOW_ANY) or refused (REGISTRY_ONLY).
//! Inbound, each captured Sidecar ingress port is a virtual listener matched by port; any other
//! port is passed through to its original destination, under the mesh-wide PeerAuthentication.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{
    forward_route, listener_name, original_dst_cluster, Compiler, Registry, Rule, Service,
};
use crate::host::VisibleHosts;
use crate::http_routes::{self as hr, HttpRouteTable, VirtualHost};
use crate::load::{Located, Origin, RawConfig};
use crate::model::*;
use crate::snapshot::*;

/// Istio's capture ports.
const DEFAULT_INBOUND_PORT: u16 = 15006;
const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Istio's historical `protocolDetectionTimeout`: long enough for a client's first segment on
/// loopback or a LAN, short enough that a server-first protocol is not noticeably delayed.
const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// How a service port's declared protocol is served on a captured port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortKind {
    Http,
    Tls,
    Tcp,
    Undeclared,
}

fn port_kind(protocol: Option<&str>) -> Option<PortKind> {
    let Some(p) = protocol else {
        return Some(PortKind::Undeclared);
    };
    match p.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => Some(PortKind::Http),
        "TLS" | "HTTPS" => Some(PortKind::Tls),
        "TCP" | "MONGO" | "REDIS" | "MYSQL" => Some(PortKind::Tcp),
        // UDP is not proxied (and not captured: the rules are for TCP).
        _ => None,
    }
}

impl Compiler {
    /// `Proxy.spec.interception`, checked.
    pub(super) fn interception(
        &mut self,
        o: &Origin,
        spec: &InterceptionSpec,
        admin: SocketAddr,
    ) -> Option<Interception> {
        let at = "spec.interception";
        let mode = match spec.mode.as_deref() {
            None | Some("REDIRECT") => CaptureMode::Redirect,
            Some("TPROXY") => CaptureMode::Tproxy,
            Some(m) => {
                self.errors.push(o.error(
                    &format!("{at}.mode"),
                    format!("unknown mode `{m}`; expected REDIRECT or TPROXY"),
                ));
                return None;
            }
        };
        let mut port = |v: Option<u32>, default: u16, field: &str| -> Option<u16> {
            match v {
                None => Some(default),
                Some(n) if (1..=65535).contains(&n) => Some(n as u16),
                Some(n) => {
                    self.errors.push(o.error(
                        &format!("{at}.{field}"),
                        format!("port {n} is out of range 1-65535"),
                    ));
                    None
                }
            }
        };
        let inbound_port = port(spec.inbound_port, DEFAULT_INBOUND_PORT, "inboundPort")?;
        let outbound_port = port(spec.outbound_port, DEFAULT_OUTBOUND_PORT, "outboundPort")?;
        if inbound_port == outbound_port {
            self.errors.push(o.error(
                &format!("{at}.outboundPort"),
                format!("inboundPort and outboundPort are both {inbound_port}"),
            ));
            return None;
        }
        for (p, field) in [
            (inbound_port, "inboundPort"),
            (outbound_port, "outboundPort"),
        ] {
            if p == admin.port() {
                self.errors.push(o.error(
                    &format!("{at}.{field}"),
                    format!("port {p} is the admin port"),
                ));
                return None;
            }
        }
        let detection_timeout = spec
            .protocol_detection_timeout
            .map_or(DEFAULT_DETECTION_TIMEOUT, |d| d.0);
        if detection_timeout > Duration::from_secs(10) {
            self.errors.push(o.error(
                &format!("{at}.protocolDetectionTimeout"),
                "at most 10s: a server-first protocol on an undeclared port waits this long",
            ));
        }
        Some(Interception {
            mode,
            inbound_port,
            outbound_port,
            detection_timeout,
            ipv6: spec.ipv6.unwrap_or(false),
        })
    }

    /// The capture listeners and the outbound virtual listeners behind them. `visible` are the
    /// hosts of the Sidecar's capturing egress (every host when there is no Sidecar); the inbound
    /// virtual listeners are the Sidecar's captured ingress ports, compiled with the others.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn captured_listeners(
        &mut self,
        ic: &Interception,
        o: Option<&Origin>,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        visible: &[VisibleHosts],
        mode: OutboundMode,
        out: &mut Vec<Listener>,
    ) {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let passthrough = self.passthrough_route();
        let passthrough_cluster = self
            .cluster_index
            .get("PassthroughCluster")
            .map(|&cluster| WeightedCluster { cluster, weight: 1 });
        let unknown_host = || match mode {
            OutboundMode::RegistryOnly => hr::UnknownHost::RegistryOnly,
            OutboundMode::AllowAny => hr::UnknownHost::Passthrough(Box::new(passthrough.clone())),
        };
        let fallback_tcp: Vec<WeightedCluster> = match mode {
            OutboundMode::RegistryOnly => Vec::new(),
            OutboundMode::AllowAny => passthrough_cluster.into_iter().collect(),
        };

        // Outbound: services by port, with how each declares it.
        let mut by_port: BTreeMap<u32, Vec<(&Service, PortKind)>> = BTreeMap::new();
        for s in registry
            .services
            .iter()
            .filter(|s| visible.iter().any(|v| v.admits(&s.namespace, &s.host)))
        {
            for p in &s.entry.value.spec.ports {
                if let Some(kind) = port_kind(p.protocol.as_deref()) {
                    by_port.entry(p.number).or_default().push((s, kind));
                }
            }
        }
        let at = "spec.interception";
        // Errors about routes are reported at the Sidecar, or at the Proxy without one.
        let Some(origin) = o.or(raw.proxies.first().map(|p| &p.origin)).cloned() else {
            return;
        };
        let mut exact: Vec<(SocketAddr, String)> = Vec::new();
        for (port, services) in &by_port {
            let port = *port;
            let http: Vec<&Service> = services
                .iter()
                .filter(|(_, k)| matches!(k, PortKind::Http | PortKind::Undeclared))
                .map(|(s, _)| *s)
                .collect();
            let undeclared: Vec<&Service> = services
                .iter()
                .filter(|(_, k)| *k == PortKind::Undeclared)
                .map(|(s, _)| *s)
                .collect();
            let tls: Vec<&Service> = services
                .iter()
                .filter(|(_, k)| *k == PortKind::Tls)
                .map(|(s, _)| *s)
                .collect();
            let mut sni_routes = Vec::new();
            for s in &tls {
                self.sni_routes_for(raw, registry, rules, proxy, s, port, &mut sni_routes);
            }
            if !http.is_empty() || !sni_routes.is_empty() {
                let mut virtual_hosts = Vec::new();
                for s in &http {
                    if let Some(vh) =
                        self.virtual_host(raw, registry, rules, proxy, s, port, &origin, at)
                    {
                        virtual_hosts.push(vh);
                    }
                }
                // What is not HTTP goes by TCP: to the one service that may speak it, else on.
                let route = match undeclared.as_slice() {
                    [one] => self
                        .tcp_route_for(raw, registry, rules, proxy, &one.host, port)
                        .or_else(|| {
                            self.cluster_for(registry, rules, &one.host, None, port)
                                .ok()
                                .map(|cluster| vec![WeightedCluster { cluster, weight: 1 }])
                        })
                        .unwrap_or_else(|| fallback_tcp.clone()),
                    _ => fallback_tcp.clone(),
                };
                let protocol = if !undeclared.is_empty() || (!http.is_empty() && !tls.is_empty()) {
                    Protocol::Auto
                } else if http.is_empty() {
                    Protocol::Tcp
                } else {
                    Protocol::Http
                };
                let address = SocketAddr::new(any.ip(), port as u16);
                out.push(Listener {
                    name: format!("virtual_outbound_{}", listener_name(address)),
                    address,
                    direction: Direction::Outbound,
                    protocol,
                    route,
                    http: (!http.is_empty()).then(|| HttpRouteTable {
                        virtual_hosts,
                        unknown_host: unknown_host(),
                    }),
                    tls: None,
                    sni_routes,
                    binding: Binding::Virtual,
                });
            }
            // TCP services: told apart by the address the app dialled.
            for (s, kind) in services {
                if *kind != PortKind::Tcp {
                    continue;
                }
                let own = match self.cluster_for(registry, rules, &s.host, None, port) {
                    Ok(c) => c,
                    Err(m) => {
                        self.push_unique(origin.error(at, m));
                        continue;
                    }
                };
                let route = self
                    .tcp_route_for(raw, registry, rules, proxy, &s.host, port)
                    .unwrap_or_else(|| {
                        vec![WeightedCluster {
                            cluster: own,
                            weight: 1,
                        }]
                    });
                if self.clusters[own].original_dst {
                    // resolution NONE: the service is wherever the app dialled on this port.
                    let address = SocketAddr::new(any.ip(), port as u16);
                    if !out.iter().any(|l| {
                        l.binding == Binding::Virtual
                            && l.direction == Direction::Outbound
                            && l.address == address
                    }) {
                        out.push(virtual_tcp(address, route.clone()));
                    }
                    continue;
                }
                let ips: Vec<IpAddr> = {
                    let mut v: Vec<IpAddr> = self.clusters[own]
                        .endpoints
                        .iter()
                        .map(|e| e.address.ip())
                        .collect();
                    v.sort();
                    v.dedup();
                    v
                };
                for ip in ips {
                    let address = SocketAddr::new(ip, port as u16);
                    if let Some((_, other)) = exact.iter().find(|(a, _)| *a == address) {
                        if *other != s.host {
                            self.push_unique(s.entry.origin.error(
                                "spec.endpoints",
                                format!("TCP services `{other}` and `{}` both have endpoint {address}: a captured connection to it cannot be told apart", s.host),
                            ));
                        }
                        continue;
                    }
                    exact.push((address, s.host.clone()));
                    out.push(virtual_tcp(address, route.clone()));
                }
            }
        }

        // The capture listeners themselves, serving whatever no virtual listener claims.
        let mut families = vec![("", any.ip())];
        if ic.ipv6 {
            families.push(("6", IpAddr::from([0u16; 8])));
        }
        for (suffix, ip) in families {
            self.capture_listeners(ic, proxy, suffix, ip, &unknown_host(), &fallback_tcp, out);
        }
    }

    /// The outbound and inbound capture listeners on `ip` (named with `suffix`).
    #[allow(clippy::too_many_arguments)]
    fn capture_listeners(
        &mut self,
        ic: &Interception,
        proxy: &ProxySettings,
        suffix: &str,
        ip: IpAddr,
        unknown_host: &hr::UnknownHost,
        fallback_tcp: &[WeightedCluster],
        out: &mut Vec<Listener>,
    ) {
        out.push(Listener {
            name: format!("virtualOutbound{suffix}"),
            address: SocketAddr::new(ip, ic.outbound_port),
            direction: Direction::Outbound,
            protocol: Protocol::Auto,
            route: fallback_tcp.to_vec(),
            http: Some(HttpRouteTable {
                virtual_hosts: Vec::new(),
                unknown_host: unknown_host.clone(),
            }),
            tls: None,
            sni_routes: Vec::new(),
            // Outbound capture is always nat REDIRECT (TPROXY only sees arriving packets).
            binding: Binding::Capture(CaptureMode::Redirect),
        });
        let inbound_cluster = self.add_cluster(Cluster {
            bind_source: Some(super::INBOUND_SOURCE),
            ..original_dst_cluster("InboundPassthroughCluster")
        });
        let inbound_target = WeightedCluster {
            cluster: inbound_cluster,
            weight: 1,
        };
        let tls = match proxy.identity {
            None => None,
            Some(_) => match self.peer_authn.mode_for(0, 0) {
                MtlsMode::Strict => Some(DownstreamTls::Mesh { permissive: false }),
                MtlsMode::Disable => None,
                MtlsMode::Permissive | MtlsMode::Unset => {
                    Some(DownstreamTls::Mesh { permissive: true })
                }
            },
        };
        out.push(Listener {
            name: format!("virtualInbound{suffix}"),
            address: SocketAddr::new(ip, ic.inbound_port),
            direction: Direction::Inbound,
            protocol: Protocol::Auto,
            route: vec![inbound_target],
            http: Some(HttpRouteTable {
                virtual_hosts: vec![VirtualHost {
                    name: "inbound|http|passthrough".into(),
                    domains: vec!["*".into()],
                    routes: vec![forward_route(
                        "passthrough",
                        inbound_target,
                        String::new(),
                        hr::RoutePolicy::default(),
                    )],
                }],
                unknown_host: hr::UnknownHost::NotFound,
            }),
            tls,
            sni_routes: Vec::new(),
            binding: Binding::Capture(ic.mode),
        });
    }
}

/// The virtual outbound listener of a TCP service at `address`.
fn virtual_tcp(address: SocketAddr, route: Vec<WeightedCluster>) -> Listener {
    Listener {
        name: format!("virtual_outbound_{}", listener_name(address)),
        address,
        direction: Direction::Outbound,
        protocol: Protocol::Tcp,
        route,
        http: None,
        tls: None,
        sni_routes: Vec::new(),
        binding: Binding::Virtual,
    }
}

/// Whether a Sidecar listener with `capture_mode` is captured (not bound) under interception.
pub(super) fn captured(capture_mode: Option<&str>, bind: Option<&str>) -> bool {
    capture_mode != Some("NONE") && bind.is_none()
}

/// The Sidecar's capturing egress hosts: those of its egress listeners without `port`, or every
/// host when it has none (Istio's default egress).
pub(super) fn capturing_egress(sc: Option<&Located<SidecarSpec>>) -> Vec<VisibleHosts> {
    let Some(sc) = sc.filter(|sc| !sc.value.spec.egress.is_empty()) else {
        return vec![VisibleHosts::all()];
    };
    let ns = sc.value.metadata.namespace();
    let hosts: Vec<VisibleHosts> = sc
        .value
        .spec
        .egress
        .iter()
        .filter(|e| e.port.is_none())
        .flat_map(|e| e.hosts.iter())
        .filter_map(|h| VisibleHosts::parse(h, ns).ok())
        .collect();
    // Egress listeners with ports only: nothing else is imported, and captured traffic to any
    // other service is passed through (or refused), as with Istio.
    hosts
}
