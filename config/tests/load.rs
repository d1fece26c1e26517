//! The config pipeline end to end: YAML text in, a snapshot or located errors out.

use keel_config::{load_str, ConfigError, Direction, LbPolicy};

const PROXY: &str = "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: reviews-v1, namespace: default }
spec:
  workload:
    labels: { app: reviews, version: v1 }
  workers: 2
  admin: { address: 127.0.0.1:15000 }
";

fn errors(yaml: &str) -> Vec<ConfigError> {
    match load_str("test.yaml", yaml) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => e.0,
    }
}

fn one_error(yaml: &str) -> ConfigError {
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    e.into_iter().next().unwrap()
}

const SERVICES: &str = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: db }
spec:
  hosts: [db.example.com]
  ports: [{ number: 5432, name: pg, protocol: TCP }]
  resolution: STATIC
  endpoints:
  - { address: 127.0.0.1, ports: { pg: 15432 }, labels: { version: v1 } }
  - { address: 127.0.0.2, ports: { pg: 15432 }, labels: { version: v2 }, weight: 3 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db }
spec:
  host: db.example.com
  trafficPolicy:
    loadBalancer: { simple: RANDOM }
    connectionPool: { tcp: { connectTimeout: 250ms, idleTimeout: 30s } }
  subsets:
  - { name: v1, labels: { version: v1 } }
  - name: v2
    labels: { version: v2 }
    trafficPolicy: { connectionPool: { tcp: { connectTimeout: 1s } } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: db }
spec:
  hosts: [db.example.com]
  tcp:
  - match: [{ port: 5432 }]
    route:
    - { destination: { host: db.example.com, subset: v1 }, weight: 75 }
    - { destination: { host: db.example.com, subset: v2 }, weight: 25 }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: 9080, protocol: TCP, name: tcp }
    defaultEndpoint: 127.0.0.1:8080
    connectionPool: { tcp: { idleTimeout: 5m } }
  egress:
  - port: { number: 5432, protocol: TCP }
    hosts: [\"*/db.example.com\"]
";

fn full() -> String {
    format!("{PROXY}{SERVICES}")
}

#[test]
fn compiles_listeners_routes_and_clusters() {
    let snap = load_str("full.yaml", &full()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.proxy.workers, 2);
    assert_eq!(snap.proxy.admin_address.to_string(), "127.0.0.1:15000");
    assert_eq!(snap.listeners.len(), 2);
    let inbound = &snap.listeners[0];
    assert_eq!(inbound.name, "0.0.0.0_9080");
    assert_eq!(inbound.direction, Direction::Inbound);
    let c = &snap.clusters[inbound.route[0].cluster];
    assert_eq!(c.name, "inbound|9080||");
    assert_eq!(c.endpoints[0].address.to_string(), "127.0.0.1:8080");
    assert_eq!(c.idle_timeout.as_secs(), 300);
    assert_eq!(
        c.connect_timeout.as_secs(),
        10,
        "Istio's default connect timeout"
    );

    let outbound = &snap.listeners[1];
    assert_eq!(
        outbound.address.to_string(),
        "127.0.0.1:5432",
        "egress bind defaults to loopback"
    );
    assert_eq!(outbound.route.len(), 2);
    let v1 = &snap.clusters[outbound.route[0].cluster];
    let v2 = &snap.clusters[outbound.route[1].cluster];
    assert_eq!(
        (v1.name.as_str(), outbound.route[0].weight),
        ("outbound|5432|v1|db.example.com", 75)
    );
    assert_eq!(
        (v2.name.as_str(), outbound.route[1].weight),
        ("outbound|5432|v2|db.example.com", 25)
    );
    assert_eq!(v1.endpoints.len(), 1);
    assert_eq!(v1.endpoints[0].address.to_string(), "127.0.0.1:15432");
    assert_eq!(v2.endpoints[0].address.to_string(), "127.0.0.2:15432");
    assert_eq!(v2.endpoints[0].weight, 3);
    assert_eq!(v1.lb, LbPolicy::Random);
    assert_eq!(v1.connect_timeout.as_millis(), 250);
    assert_eq!(
        v2.connect_timeout.as_millis(),
        1000,
        "subset policy overrides the rule's"
    );
    assert_eq!(
        snap.dump()["listeners"].as_array().map(|a| a.len()),
        Some(2)
    );
    assert_eq!(snap.version.len(), 16);
}

#[test]
fn default_route_without_virtual_service() {
    let yaml = full()
        .replace("kind: VirtualService", "kind: VirtualService\n#")
        .replace(
            "  tcp:\n  - match: [{ port: 5432 }]",
            "  tcp:\n  - match: [{ port: 1 }]",
        );
    let snap = load_str("t.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    let c = &snap.clusters[snap.listeners[1].route[0].cluster];
    assert_eq!(c.name, "outbound|5432||db.example.com");
    assert_eq!(c.endpoints.len(), 2);
}

#[test]
fn unknown_field_has_position_and_suggestion() {
    let e = one_error(&format!("{PROXY}  wrokers: 3\n"));
    assert_eq!((e.line, e.column), (9, 3));
    assert_eq!(e.path, "spec.wrokers");
    assert!(e.message.contains("did you mean `workers`"), "{e}");
}

#[test]
fn nested_unknown_field_in_later_document() {
    let yaml = full().replace(
        "defaultEndpoint: 127.0.0.1:8080",
        "defaultEndpont: 127.0.0.1:8080",
    );
    let e = one_error(&yaml);
    assert_eq!(e.path, "spec.ingress[0].defaultEndpont");
    let line = yaml
        .lines()
        .position(|l| l.contains("defaultEndpont"))
        .unwrap()
        + 1;
    assert_eq!(e.line, line, "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "test.yaml:{line}:5: spec.ingress[0].defaultEndpont: unknown field"
        )),
        "{e}"
    );
    assert!(e.message.contains("did you mean `defaultEndpoint`"));
}

#[test]
fn malformed_yaml() {
    let e = one_error("apiVersion: keel.dev/v1alpha1\nkind: Proxy\nmetadata: { name: x\n");
    assert!(e.message.starts_with("YAML syntax error"), "{e}");
    assert!(e.line >= 3, "{e}");
}

#[test]
fn unknown_kind() {
    let e = one_error(&format!("{PROXY}---\napiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {{name: x}}\nspec: {{}}\n"));
    assert_eq!((e.line, e.path.as_str()), (11, "kind"));
    assert!(
        e.message.contains("unknown kind `VirtualServce`")
            && e.message.contains("did you mean `VirtualService`"),
        "{e}"
    );
}

#[test]
fn known_but_unimplemented_kind() {
    let e = one_error(&format!("{PROXY}---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: x}}\nspec: {{}}\n"));
    assert!(
        e.message.contains("WorkloadEntry is not supported yet"),
        "{e}"
    );
}

#[test]
fn wrong_api_version() {
    let e = one_error(
        "apiVersion: networking.istio.io/v1\nkind: Proxy\nmetadata: {name: x}\nspec: {}\n",
    );
    assert_eq!(e.path, "apiVersion");
    assert!(e.message.contains("keel.dev/v1alpha1"), "{e}");
}

#[test]
fn missing_proxy() {
    let e = one_error(SERVICES.trim_start_matches("---\n"));
    assert!(e.message.contains("no `Proxy` resource"), "{e}");
}

#[test]
fn two_proxies() {
    let e = one_error(&format!("{PROXY}---\n{PROXY}"));
    assert!(e.message.contains("a second `Proxy`"), "{e}");
    assert_eq!(e.line, 11);
}

#[test]
fn duplicate_listener_ports() {
    let yaml = full().replace("  egress:\n  - port: { number: 5432, protocol: TCP }", "  - port: { number: 9080, protocol: TCP }\n    bind: 127.0.0.1\n    defaultEndpoint: 127.0.0.1:8081\n  egress:\n  - port: { number: 5432, protocol: TCP }");
    let e = one_error(&yaml);
    assert_eq!(e.path, "spec.ingress[1].port.number");
    assert!(e.message.contains("port 9080 is already used"), "{e}");
    let line = yaml
        .lines()
        .position(|l| l.contains("number: 9080"))
        .unwrap()
        + 1;
    assert!(e.line > line, "points at the second listener: {e}");
}

#[test]
fn unresolvable_addresses() {
    let yaml = full()
        .replace(
            "defaultEndpoint: 127.0.0.1:8080",
            "defaultEndpoint: app.local:8080",
        )
        .replace("address: 127.0.0.2", "address: db2.internal");
    let e = errors(&yaml);
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"spec.ingress[0].defaultEndpoint"), "{e:#?}");
    assert!(paths.contains(&"spec.endpoints[1].address"), "{e:#?}");
    let bind = one_error(&full().replace(
        "  egress:\n  - port: { number: 5432, protocol: TCP }",
        "  egress:\n  - port: { number: 5432, protocol: TCP }\n    bind: localhost",
    ));
    assert!(
        bind.message.contains("`localhost` is not an IP address"),
        "{bind}"
    );
}

#[test]
fn not_supported_fields_are_named() {
    let yaml = full().replace(
        "    loadBalancer: { simple: RANDOM }",
        "    loadBalancer: { simple: RANDOM }\n    tunnel: { protocol: CONNECT, targetHost: x, targetPort: 1 }",
    );
    let e = one_error(&yaml);
    assert_eq!(e.path, "spec.trafficPolicy.tunnel");
    assert!(e.message.contains("not supported yet"), "{e}");
    let e = one_error(&format!(
        "{PROXY}  identity: {{ trustDomain: cluster.local }}\n"
    ));
    assert_eq!(e.path, "spec.identity");
}

#[test]
fn bad_enum_and_duration() {
    let e = one_error(&full().replace("resolution: STATIC", "resolution: STATC"));
    assert!(e.message.contains("did you mean `STATIC`"), "{e}");
    let e = one_error(&full().replace("connectTimeout: 250ms", "connectTimeout: 250"));
    assert_eq!(
        e.path,
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout"
    );
    assert!(e.message.contains("invalid duration"), "{e}");
}

#[test]
fn unknown_subset_and_host() {
    let e = errors(&full().replace("subset: v2 }", "subset: v3 }"));
    assert!(
        e.iter().any(|e| e.message.contains("no subset `v3`")
            && e.path == "spec.tcp[0].route[1].destination"),
        "{e:#?}"
    );
    let e = errors(&full().replace(
        "{ destination: { host: db.example.com, subset: v1 }",
        "{ destination: { host: db.exampel.com, subset: v1 }",
    ));
    assert!(
        e.iter()
            .any(|e| e.message.contains("did you mean `db.example.com`")),
        "{e:#?}"
    );
}

#[test]
fn strict_booleans_and_types() {
    let e = one_error(&PROXY.replace("workers: 2", "workers: yes"));
    assert_eq!(e.path, "spec.workers", "{e}");
}

#[test]
fn several_errors_reported_at_once() {
    let yaml = format!("{PROXY}  wrokers: 3\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: g}}\nspec: {{}}\n");
    assert_eq!(errors(&yaml).len(), 2);
}

#[test]
fn directory_in_name_order_ignoring_hidden_entries() {
    let dir = std::env::temp_dir().join(format!("keel-config-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..2026_11_22")).unwrap();
    std::fs::write(dir.join("..2026_11_22/proxy.yaml"), PROXY).unwrap();
    std::fs::write(dir.join("..2026_11_22/services.yaml"), SERVICES).unwrap();
    std::os::unix::fs::symlink("..2026_11_22", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/proxy.yaml", dir.join("proxy.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/services.yaml", dir.join("services.yaml")).unwrap();
    std::fs::write(dir.join("README.txt"), "not yaml").unwrap();
    let snap = keel_config::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.listeners.len(), 2);
    std::fs::write(dir.join("zz.yaml"), "kind: Proxy\n").unwrap();
    let e = keel_config::load(&dir).unwrap_err();
    assert!(e.0[0].file.ends_with("zz.yaml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn selector_picks_sidecar() {
    let other = "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: other }\nspec:\n  workloadSelector: { labels: { app: ratings } }\n  ingress:\n  - port: { number: 7000 }\n    defaultEndpoint: 127.0.0.1:7001\n";
    let snap = load_str("t.yaml", &format!("{}{other}", full())).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        snap.listeners.iter().all(|l| l.address.port() != 7000),
        "a Sidecar for another workload is ignored"
    );
    let mine = other.replace("ratings", "reviews");
    let snap = load_str("t.yaml", &format!("{}{mine}", full())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        snap.listeners.len(),
        1,
        "a selecting Sidecar wins over the namespace default"
    );
}

#[test]
fn consistent_hash_policies_and_their_errors() {
    let with = |lb: &str| {
        full().replace(
            "    loadBalancer: { simple: RANDOM }",
            &format!("    loadBalancer: {lb}"),
        )
    };
    let snap = load_str(
        "test.yaml",
        &with("{ consistentHash: { httpHeaderName: X-User, maglev: { tableSize: 251 } } }"),
    )
    .unwrap();
    let db = snap
        .clusters
        .iter()
        .find(|c| c.name.ends_with("|v1|db.example.com"))
        .unwrap();
    assert_eq!(db.lb, keel_config::LbPolicy::Maglev { table_size: 251 });
    assert_eq!(
        db.hash_key,
        Some(keel_config::HashKey::Header("x-user".into()))
    );
    let snap = load_str(
        "test.yaml",
        &with("{ consistentHash: { useSourceIp: true } }"),
    )
    .unwrap();
    let db = &snap
        .clusters
        .iter()
        .find(|c| c.name.ends_with("|v1|db.example.com"))
        .unwrap();
    assert_eq!(
        db.lb,
        keel_config::LbPolicy::RingHash {
            min_ring_size: 1024
        }
    );
    assert_eq!(db.hash_key, Some(keel_config::HashKey::SourceIp));

    for (lb, path, message) in [
        (
            "{ consistentHash: { ringHash: { minimumRingSize: 64 } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "needs one of",
        ),
        (
            "{ consistentHash: { useSourceIp: true, httpHeaderName: x } }",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "only one of",
        ),
        (
            "{ consistentHash: { httpQueryParameterName: u, maglev: { tableSize: 65536 } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "not a prime",
        ),
        (
            "{ consistentHash: { httpCookie: { name: s, ttl: 0s, attributes: [{ name: x, value: \"a; b\" }] } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[0]",
            "without `;`",
        ),
        (
            "{ consistentHash: { httpCookie: { name: \"a b\", ttl: 0s } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "not a valid cookie name",
        ),
        (
            "{ consistentHash: { httpCookie: { name: s, path: x } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "not a cookie path",
        ),
        (
            "{ simple: RANDOM, consistentHash: { useSourceIp: true } }",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "not both",
        ),
    ] {
        let e = errors(&with(lb));
        assert!(
            e.iter()
                .any(|e| e.path == path && e.message.contains(message)),
            "{lb}: {e:#?}"
        );
    }
}

/// An HTTP route's destination without a port takes the listener's (as docs/config.md says), even
/// when the service has several ports; a VirtualService no listener uses still needs the port
/// spelled out for such a service, since there is no listener port to take.
#[test]
fn route_destination_port_defaults_to_the_listener_port() {
    let service = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: web }
spec:
  hosts: [web.example.com]
  ports: [{ number: 80, name: http, protocol: HTTP }, { number: 8080, name: admin, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1, ports: { http: 18080, admin: 18081 } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: web }
spec:
  hosts: [web.example.com]
  http:
  - match: [{ uri: { prefix: /api } }]
    route: [{ destination: { host: web.example.com } }]
";
    let listener = "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  egress:
  - port: { number: 80, protocol: HTTP }
    bind: 127.0.0.1
    hosts: [\"./*\"]
";
    let snapshot = load_str("test.yaml", &format!("{PROXY}{service}{listener}")).unwrap();
    assert!(snapshot
        .clusters
        .iter()
        .any(|c| c.name == "outbound|80||web.example.com"));
    let e = one_error(&format!("{PROXY}{service}"));
    assert!(e.to_string().contains("several ports"), "{e}");
}
