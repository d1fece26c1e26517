//! `Gateway`: Keel as an ingress or egress gateway. Each selected Gateway's servers become
//! listeners (servers sharing an address share one), whose routes come from the VirtualServices
//! that name the Gateway in `gateways` and whose hosts the server admits:
//! - HTTP (HTTP, HTTP2, GRPC): the VirtualServices' `http` routes by Host; `tls.httpsRedirect`
//!   answers 301 to `https://`;
//! - HTTPS with SIMPLE / MUTUAL: the same behind TLS termination; several servers on one port
//!   each get their own certificate, chosen by SNI;
//! - TLS or HTTPS with PASSTHROUGH: the VirtualServices' `tls` routes by SNI, bytes untouched;
//! - TLS with SIMPLE / MUTUAL, and TCP: the first matching `tcp` route.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{check_port, labels_match, listener_name, parse_bind, Compiler, Registry, Rule};
use crate::host;
use crate::http_routes::{self as hr, HttpRoute, HttpRouteTable, VirtualHost};
use crate::load::{Located, Origin, RawConfig};
use crate::model::*;
use crate::snapshot::*;

/// How a server serves its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serves {
    Http,
    Https,
    Passthrough,
    TlsTcp,
    Tcp,
}

impl Serves {
    fn describe(self) -> &'static str {
        match self {
            Serves::Http => "plaintext HTTP",
            Serves::Https => "HTTPS (TLS terminated)",
            Serves::Passthrough => "TLS passthrough",
            Serves::TlsTcp => "TLS-terminated TCP",
            Serves::Tcp => "TCP",
        }
    }
}

/// One selected server, checked.
struct Server<'a> {
    gw: &'a Located<GatewaySpec>,
    at: String,
    port: u32,
    serves: Serves,
    /// `(namespace or "*", host)` per `hosts` entry.
    hosts: Vec<(String, String)>,
    tls: Option<ServerTls>,
    https_redirect: bool,
}

impl Server<'_> {
    /// Whether this server takes VirtualService host `vs_host` from namespace `ns`; the name
    /// served is the more specific of the two.
    fn admits(&self, ns: &str, vs_host: &str) -> Vec<String> {
        self.hosts
            .iter()
            .filter_map(|(hns, h)| {
                if hns != "*" && hns != ns {
                    return None;
                }
                if host::matches(h, vs_host) {
                    Some(vs_host.to_string())
                } else if host::matches(vs_host, h) {
                    Some(h.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Whether VirtualService `vs` names this server's Gateway in `gateways`.
    fn bound(&self, vs: &Located<VirtualServiceSpec>) -> bool {
        let (gns, gname) = (
            self.gw.value.metadata.namespace(),
            self.gw.value.metadata.name.as_str(),
        );
        let vns = vs.value.metadata.namespace();
        vs.value
            .spec
            .gateways
            .iter()
            .flatten()
            .any(|g| match g.split_once('/') {
                Some((ns, name)) => name == gname && (ns == gns || (ns == "." && vns == gns)),
                None => g == gname && vns == gns,
            })
    }
}

/// Whether a VirtualService applies to the sidecar (its `gateways` absent, or naming `mesh`).
pub(super) fn applies_to_mesh(vs: &Located<VirtualServiceSpec>) -> bool {
    match &vs.value.spec.gateways {
        None => true,
        Some(g) => g.is_empty() || g.iter().any(|g| g == "mesh"),
    }
}

/// Domains a virtual host answers for `name` on `port`.
fn domains(name: &str, port: u32) -> Vec<String> {
    if name == "*" {
        return vec!["*".into()];
    }
    let name = name.to_ascii_lowercase();
    vec![name.clone(), format!("{name}:{port}")]
}

impl Compiler {
    /// Listeners for every server of the Gateways that select this workload.
    pub(super) fn gateway_listeners(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        out: &mut Vec<Listener>,
    ) {
        self.check_gateway_refs(raw);
        let mut groups: BTreeMap<(String, u32), Vec<Server>> = BTreeMap::new();
        let mut addresses: BTreeMap<(String, u32), SocketAddr> = BTreeMap::new();
        for gw in raw
            .gateways
            .iter()
            .filter(|g| labels_match(&g.value.spec.selector, &proxy.labels))
        {
            if gw.value.spec.servers.is_empty() {
                self.errors.push(
                    gw.origin
                        .error("spec.servers", "at least one server is required"),
                );
            }
            for (i, s) in gw.value.spec.servers.iter().enumerate() {
                let at = format!("spec.servers[{i}]");
                let Some(server) = self.gateway_server(gw, s, &at) else {
                    continue;
                };
                let Some(ip) = parse_bind(
                    &mut self.errors,
                    &gw.origin,
                    s.bind.as_deref(),
                    "0.0.0.0",
                    &format!("{at}.bind"),
                ) else {
                    continue;
                };
                let key = (ip.to_string(), server.port);
                addresses.insert(key.clone(), SocketAddr::new(ip, server.port as u16));
                groups.entry(key).or_default().push(server);
            }
        }
        for (key, servers) in groups {
            let address = addresses[&key];
            if let Some(l) = out.iter().find(|l| {
                l.binding != Binding::Virtual
                    && l.address.port() == address.port()
                    && (l.address.ip() == address.ip()
                        || l.address.ip().is_unspecified()
                        || address.ip().is_unspecified())
            }) {
                let s = &servers[0];
                self.errors.push(s.gw.origin.error(
                    &format!("{}.port.number", s.at),
                    format!(
                        "port {} is already used by listener {}",
                        address.port(),
                        l.name
                    ),
                ));
                continue;
            }
            if let Some(l) = self.gateway_listener(raw, registry, rules, proxy, address, &servers) {
                out.push(l);
            }
        }
    }

    /// Every `gateways` entry of every VirtualService must name `mesh` or a Gateway of the
    /// config (selected or not): a typo would silently route nothing.
    fn check_gateway_refs(&mut self, raw: &RawConfig) {
        for vs in &raw.virtual_services {
            let vns = vs.value.metadata.namespace();
            for (i, g) in vs.value.spec.gateways.iter().flatten().enumerate() {
                if g == "mesh" {
                    continue;
                }
                let (ns, name) = match g.split_once('/') {
                    Some((".", n)) => (vns, n),
                    Some((ns, n)) => (ns, n),
                    None => (vns, g.as_str()),
                };
                let found = raw.gateways.iter().any(|gw| {
                    gw.value.metadata.name == name && gw.value.metadata.namespace() == ns
                });
                if !found {
                    self.errors.push(vs.origin.error(
                        &format!("spec.gateways[{i}]"),
                        format!("no Gateway `{ns}/{name}` (and `mesh` is the sidecar)"),
                    ));
                }
            }
        }
    }

    /// One server, checked: its port, hosts, protocol and TLS.
    fn gateway_server<'a>(
        &mut self,
        gw: &'a Located<GatewaySpec>,
        s: &GatewayServer,
        at: &str,
    ) -> Option<Server<'a>> {
        let o = &gw.origin;
        if s.default_endpoint.is_some() {
            self.errors.push(o.error(
                &format!("{at}.defaultEndpoint"),
                "field `defaultEndpoint` is not supported yet",
            ));
        }
        if !check_port(
            &mut self.errors,
            o,
            s.port.number,
            &format!("{at}.port.number"),
        ) {
            return None;
        }
        if s.hosts.is_empty() {
            self.errors.push(o.error(
                &format!("{at}.hosts"),
                "at least one host is required (e.g. \"*\" or \"bookinfo.example.com\")",
            ));
            return None;
        }
        let hosts = s
            .hosts
            .iter()
            .map(|h| match h.split_once('/') {
                Some((".", host)) => (
                    gw.value.metadata.namespace().to_string(),
                    host.to_ascii_lowercase(),
                ),
                Some((ns, host)) => (ns.to_string(), host.to_ascii_lowercase()),
                None => ("*".to_string(), h.to_ascii_lowercase()),
            })
            .collect();
        let protocol = s
            .port
            .protocol
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_uppercase();
        let tls_at = format!("{at}.tls");
        let mode = s.tls.as_ref().and_then(|t| t.mode);
        let https_redirect = s.tls.as_ref().and_then(|t| t.https_redirect) == Some(true);
        let serves = match (protocol.as_str(), mode) {
            ("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB", None) => Serves::Http,
            ("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB", Some(_)) => {
                self.errors.push(o.error(
                    &format!("{tls_at}.mode"),
                    "a plaintext HTTP server has no TLS mode (use protocol HTTPS to terminate TLS)",
                ));
                return None;
            }
            ("HTTPS" | "TLS", Some(ServerTlsMode::Passthrough)) => Serves::Passthrough,
            ("HTTPS", Some(ServerTlsMode::Simple | ServerTlsMode::Mutual)) => Serves::Https,
            ("TLS", Some(ServerTlsMode::Simple | ServerTlsMode::Mutual)) => Serves::TlsTcp,
            ("HTTPS" | "TLS", None) => {
                self.errors.push(o.error(
                    &tls_at,
                    format!("protocol {protocol} needs tls.mode: SIMPLE, MUTUAL or PASSTHROUGH"),
                ));
                return None;
            }
            ("HTTPS" | "TLS", Some(m)) => {
                self.errors.push(o.error(
                    &format!("{tls_at}.mode"),
                    format!("tls mode {m:?} on a Gateway is not supported yet (SIMPLE, MUTUAL and PASSTHROUGH are)"),
                ));
                return None;
            }
            ("TCP" | "MONGO" | "REDIS" | "MYSQL", None) => Serves::Tcp,
            ("TCP" | "MONGO" | "REDIS" | "MYSQL", Some(_)) => {
                self.errors.push(o.error(
                    &format!("{tls_at}.mode"),
                    "a TCP server has no TLS mode (use protocol TLS)",
                ));
                return None;
            }
            (p, _) => {
                self.errors.push(o.error(
                    &format!("{at}.port.protocol"),
                    format!("Gateway server protocol {p} is not supported (HTTP, HTTPS, HTTP2, GRPC, TLS, TCP are)"),
                ));
                return None;
            }
        };
        if https_redirect && serves != Serves::Http {
            self.errors.push(o.error(
                &format!("{tls_at}.httpsRedirect"),
                "httpsRedirect is for plaintext HTTP servers",
            ));
        }
        let tls = match (serves, &s.tls) {
            (Serves::Https | Serves::TlsTcp, Some(t)) => Some(self.ingress_tls(o, &tls_at, t)?),
            _ => None,
        };
        Some(Server {
            gw,
            at: at.to_string(),
            port: s.port.number,
            serves,
            hosts,
            tls,
            https_redirect,
        })
    }

    /// The listener of the servers sharing `address`.
    fn gateway_listener(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        address: SocketAddr,
        servers: &[Server],
    ) -> Option<Listener> {
        let first = &servers[0];
        let o = &first.gw.origin;
        if let Some(other) = servers.iter().find(|s| s.serves != first.serves) {
            self.errors.push(other.gw.origin.error(
                &format!("{}.port", other.at),
                format!(
                    "servers on port {} must all be {} like {}/{} {}",
                    address.port(),
                    first.serves.describe(),
                    first.gw.value.metadata.namespace(),
                    first.gw.value.metadata.name,
                    first.at
                ),
            ));
            return None;
        }
        let tls = match first.serves {
            Serves::Https | Serves::TlsTcp => Some(DownstreamTls::Terminate(Box::new(
                self.combined_tls(servers)?,
            ))),
            _ => None,
        };
        let port = first.port;
        let mut listener = Listener {
            name: listener_name(address),
            address,
            direction: Direction::Outbound,
            protocol: Protocol::Tcp,
            route: Vec::new(),
            http: None,
            tls,
            sni_routes: Vec::new(),
            binding: Binding::Bound,
        };
        match first.serves {
            Serves::Http | Serves::Https => {
                listener.protocol = Protocol::Http;
                listener.http = Some(self.gateway_routes(raw, registry, rules, proxy, servers));
            }
            Serves::Passthrough => {
                for s in servers {
                    self.gateway_sni_routes(raw, registry, rules, s, &mut listener.sni_routes);
                }
                if listener.sni_routes.is_empty() {
                    self.errors.push(o.error(
                        &format!("{}.hosts", first.at),
                        format!("no VirtualService bound to this Gateway has a tls route for these hosts on port {port}"),
                    ));
                    return None;
                }
            }
            Serves::TlsTcp | Serves::Tcp => {
                listener.route = servers
                    .iter()
                    .find_map(|s| self.gateway_tcp_route(raw, registry, rules, s))
                    .or_else(|| {
                        self.errors.push(o.error(
                            &format!("{}.hosts", first.at),
                            format!("no VirtualService bound to this Gateway has a tcp route for port {port}"),
                        ));
                        None
                    })?;
            }
        }
        Some(listener)
    }

    /// One TLS setup for servers sharing a port: the first server's certificate by default, and
    /// each server's for its own hosts (SNI); client verification and versions must agree.
    fn combined_tls(&mut self, servers: &[Server]) -> Option<ServerTls> {
        let mut tls = servers[0].tls.clone()?;
        if servers.len() == 1 {
            return Some(tls);
        }
        for s in servers {
            let t = s.tls.as_ref()?;
            let same_ca =
                t.client_ca.as_ref().map(|c| &c.bytes) == tls.client_ca.as_ref().map(|c| &c.bytes);
            if !same_ca || t.subject_alt_names != tls.subject_alt_names {
                self.errors.push(s.gw.origin.error(
                    &format!("{}.tls", s.at),
                    "servers sharing a port must verify clients alike (same mode, caCertificates and subjectAltNames)",
                ));
                return None;
            }
            if (t.min_version, t.max_version) != (tls.min_version, tls.max_version) {
                self.errors.push(s.gw.origin.error(
                    &format!("{}.tls.minProtocolVersion", s.at),
                    "servers sharing a port must offer the same TLS versions",
                ));
                return None;
            }
            tls.sni_certificates.push(SniCertificate {
                server_names: s.hosts.iter().map(|(_, h)| h.clone()).collect(),
                certificate_chain: t.certificate_chain.clone(),
                private_key: t.private_key.clone(),
            });
        }
        Some(tls)
    }

    /// The HTTP routing table of HTTP / HTTPS servers sharing a port.
    fn gateway_routes(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        proxy: &ProxySettings,
        servers: &[Server],
    ) -> HttpRouteTable {
        let mut virtual_hosts: Vec<VirtualHost> = Vec::new();
        let taken =
            |vh: &[VirtualHost], d: &str| vh.iter().any(|v| v.domains.iter().any(|x| x == d));
        for s in servers {
            if s.https_redirect {
                for (_, h) in &s.hosts {
                    let d = domains(h, s.port);
                    if taken(&virtual_hosts, &d[0]) {
                        continue;
                    }
                    virtual_hosts.push(VirtualHost {
                        name: format!("{h}:{}:https_redirect", s.port),
                        domains: d,
                        routes: vec![HttpRoute {
                            name: "https_redirect".into(),
                            matches: Vec::new(),
                            action: hr::RouteAction::Redirect(hr::Redirect {
                                uri: None,
                                authority: None,
                                port: Some(443),
                                scheme: Some("https".into()),
                                code: 301,
                            }),
                            request_headers: Default::default(),
                            response_headers: Default::default(),
                            policy: Default::default(),
                        }],
                    });
                }
                continue;
            }
            for vs in raw.virtual_services.iter().filter(|vs| s.bound(vs)) {
                if vs.value.spec.http.is_empty() {
                    continue;
                }
                let ns = vs.value.metadata.namespace();
                let names: Vec<String> = vs
                    .value
                    .spec
                    .hosts
                    .iter()
                    .flat_map(|h| s.admits(ns, &host::qualify(h, ns)))
                    .collect();
                if names.is_empty() {
                    continue;
                }
                let routes = self.http_routes(vs, registry, rules, proxy, Some(s.port));
                for name in names {
                    let d = domains(&name, s.port);
                    if taken(&virtual_hosts, &d[0]) {
                        continue;
                    }
                    virtual_hosts.push(VirtualHost {
                        name: format!("{name}:{}", s.port),
                        domains: d,
                        routes: routes.clone(),
                    });
                }
            }
        }
        HttpRouteTable {
            virtual_hosts,
            unknown_host: hr::UnknownHost::NotFound,
        }
    }

    /// The SNI routes a PASSTHROUGH server takes from the `tls` routes of its VirtualServices.
    fn gateway_sni_routes(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        s: &Server,
        out: &mut Vec<SniRoute>,
    ) {
        for vs in raw.virtual_services.iter().filter(|vs| s.bound(vs)) {
            let ns = vs.value.metadata.namespace();
            for (i, r) in vs.value.spec.tls.iter().enumerate() {
                let names: Vec<String> = r
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|p| p == s.port))
                    .flat_map(|m| m.sni_hosts.iter())
                    .flat_map(|h| s.admits(ns, h))
                    .filter(|h| !out.iter().any(|r| r.server_names.contains(h)))
                    .collect();
                if names.is_empty() {
                    continue;
                }
                let route = self.destinations(
                    registry,
                    rules,
                    &vs.origin,
                    ns,
                    &r.route,
                    &format!("spec.tls[{i}]"),
                );
                if !route.is_empty() {
                    out.push(SniRoute {
                        server_names: names,
                        route,
                    });
                }
            }
        }
    }

    /// The first `tcp` route of a VirtualService bound to the server that matches its port.
    fn gateway_tcp_route(
        &mut self,
        raw: &RawConfig,
        registry: &Registry,
        rules: &[Rule],
        s: &Server,
    ) -> Option<Vec<WeightedCluster>> {
        for vs in raw.virtual_services.iter().filter(|vs| s.bound(vs)) {
            let ns = vs.value.metadata.namespace();
            if !vs
                .value
                .spec
                .hosts
                .iter()
                .any(|h| !s.admits(ns, h).is_empty())
            {
                continue;
            }
            for (i, r) in vs.value.spec.tcp.iter().enumerate() {
                let applies = r.matches.is_empty()
                    || r.matches.iter().any(|m| m.port.is_none_or(|p| p == s.port));
                if applies {
                    let route = self.destinations(
                        registry,
                        rules,
                        &vs.origin,
                        ns,
                        &r.route,
                        &format!("spec.tcp[{i}]"),
                    );
                    return (!route.is_empty()).then_some(route);
                }
            }
        }
        None
    }

    /// Weighted clusters of a `tls` / `tcp` route's destinations (zero weights dropped).
    pub(super) fn destinations(
        &mut self,
        registry: &Registry,
        rules: &[Rule],
        o: &Origin,
        ns: &str,
        route: &[RouteDestination],
        at: &str,
    ) -> Vec<WeightedCluster> {
        let mut out = Vec::new();
        for (k, rd) in route.iter().enumerate() {
            let dest = host::qualify(&rd.destination.host, ns);
            match self.cluster_for(
                registry,
                rules,
                &dest,
                rd.destination.subset.as_deref(),
                rd.destination.port.as_ref().map_or(0, |p| p.number),
            ) {
                Ok(cluster) => out.push(WeightedCluster {
                    cluster,
                    weight: if route.len() == 1 {
                        1
                    } else {
                        rd.weight.unwrap_or(0)
                    },
                }),
                Err(m) => self.push_unique(o.error(&format!("{at}.route[{k}].destination"), m)),
            }
        }
        out.retain(|w| w.weight > 0);
        out
    }
}
