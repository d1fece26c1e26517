//! `Proxy.spec.interception` in config: the capture listeners and the virtual listeners behind
//! them, what each serves, and the errors a wrong setup gets.

use keel_config::{load_str, Binding, CaptureMode, Direction, Protocol, Snapshot};

const PROXY: &str = "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: app, namespace: default }
spec:
  workload: { labels: { app: app } }
  interception: { mode: TPROXY, protocolDetectionTimeout: 250ms }
";

const SERVICES: &str = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: web }
spec:
  hosts: [web.example.com]
  ports: [{ number: 80, protocol: HTTP, name: http }, { number: 8443, protocol: TLS, name: tls }]
  resolution: STATIC
  endpoints: [{ address: 10.1.0.1 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: db }
spec:
  hosts: [db.example.com]
  ports: [{ number: 5432, protocol: TCP, name: pg }]
  resolution: STATIC
  endpoints: [{ address: 10.1.0.2 }, { address: 10.1.0.3 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: cache }
spec:
  hosts: [cache.example.com]
  ports: [{ number: 6379, name: redis }]
  resolution: STATIC
  endpoints: [{ address: 10.1.0.4 }]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: 9080, protocol: HTTP, name: http }
    defaultEndpoint: 127.0.0.1:9080
  - port: { number: 7000, name: unknown }
    defaultEndpoint: 127.0.0.1:7000
  - port: { number: 9999, protocol: TCP, name: direct }
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8999
  egress:
  - hosts: [\"*/*\"]
";

fn load(text: &str) -> Snapshot {
    load_str("interception.yaml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn listener<'a>(s: &'a Snapshot, name: &str) -> &'a keel_config::Listener {
    s.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| {
            let names: Vec<_> = s.listeners.iter().map(|l| l.name.as_str()).collect();
            panic!("no listener {name} in {names:?}")
        })
}

#[test]
fn capture_ports_and_virtual_listeners() {
    let s = load(&format!("{PROXY}{SERVICES}"));
    let ic = s.proxy.interception.as_ref().unwrap();
    assert_eq!(ic.mode, CaptureMode::Tproxy);
    assert_eq!((ic.inbound_port, ic.outbound_port), (15006, 15001));
    assert_eq!(ic.detection_timeout.as_millis(), 250);

    let out = listener(&s, "virtualOutbound");
    assert_eq!(out.binding, Binding::Capture(CaptureMode::Redirect));
    assert_eq!(out.address.port(), 15001);
    assert_eq!(out.protocol, Protocol::Auto);
    // ALLOW_ANY by default: unknown destinations pass through.
    assert_eq!(s.clusters[out.route[0].cluster].name, "PassthroughCluster");
    let inb = listener(&s, "virtualInbound");
    assert_eq!(inb.binding, Binding::Capture(CaptureMode::Tproxy));
    assert_eq!(
        s.clusters[inb.route[0].cluster].name,
        "InboundPassthroughCluster"
    );

    // HTTP by Host on 0.0.0.0:80; TLS by SNI on 0.0.0.0:8443; TCP by address.
    let web = listener(&s, "virtual_outbound_0.0.0.0_80");
    assert_eq!(
        (web.binding, web.protocol),
        (Binding::Virtual, Protocol::Http)
    );
    let tls = listener(&s, "virtual_outbound_0.0.0.0_8443");
    assert_eq!(tls.protocol, Protocol::Tcp);
    assert_eq!(tls.sni_routes[0].server_names, vec!["web.example.com"]);
    for ip in ["10.1.0.2", "10.1.0.3"] {
        let db = listener(&s, &format!("virtual_outbound_{ip}_5432"));
        assert_eq!(db.protocol, Protocol::Tcp);
        assert_eq!(
            s.clusters[db.route[0].cluster].name,
            "outbound|5432||db.example.com"
        );
    }
    // Undeclared: sniffed; HTTP by Host, else TCP to the one service.
    let cache = listener(&s, "virtual_outbound_0.0.0.0_6379");
    assert_eq!(cache.protocol, Protocol::Auto);
    assert_eq!(
        s.clusters[cache.route[0].cluster].name,
        "outbound|6379||cache.example.com"
    );

    // Captured ingress ports are virtual (matched by port); captureMode NONE stays bound.
    let http_in = listener(&s, "virtual_inbound_9080");
    assert_eq!(
        (http_in.binding, http_in.direction),
        (Binding::Virtual, Direction::Inbound)
    );
    assert_eq!(http_in.protocol, Protocol::Http);
    assert_eq!(
        listener(&s, "virtual_inbound_7000").protocol,
        Protocol::Auto
    );
    assert_eq!(listener(&s, "127.0.0.1_9999").binding, Binding::Bound);

    // The lookup a capture port does: an exact address first, then the port's wildcard.
    let find = |d, a: &str| {
        keel_config::Listener::virtual_for(&s.listeners, d, a.parse().unwrap())
            .map(|i| s.listeners[i].name.as_str())
    };
    assert_eq!(
        find(Direction::Outbound, "10.1.0.3:5432"),
        Some("virtual_outbound_10.1.0.3_5432")
    );
    assert_eq!(find(Direction::Outbound, "10.9.9.9:5432"), None);
    assert_eq!(
        find(Direction::Outbound, "10.9.9.9:80"),
        Some("virtual_outbound_0.0.0.0_80")
    );
    assert_eq!(
        find(Direction::Inbound, "10.0.0.5:9080"),
        Some("virtual_inbound_9080")
    );
    assert_eq!(find(Direction::Inbound, "10.0.0.5:80"), None);
}

#[test]
fn registry_only_refuses_what_no_service_claims() {
    let text = format!(
        "{PROXY}{}  outboundTrafficPolicy: {{ mode: REGISTRY_ONLY }}\n",
        SERVICES
    );
    let s = load(&text);
    assert!(listener(&s, "virtualOutbound").route.is_empty());
}

#[test]
fn resolution_none_goes_to_the_original_destination() {
    let text = format!(
        "{PROXY}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: ext }}
spec:
  hosts: [ext.example.com]
  ports: [{{ number: 3306, protocol: TCP, name: mysql }}]
"
    );
    let s = load(&text);
    let l = listener(&s, "virtual_outbound_0.0.0.0_3306");
    assert!(s.clusters[l.route[0].cluster].original_dst);
    // Without interception the same entry is an error.
    let plain = text.replace(
        "  interception: { mode: TPROXY, protocolDetectionTimeout: 250ms }\n",
        "",
    );
    let e = load_str("interception.yaml", &plain)
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.resolution"), "{e}");
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            PROXY.replace("mode: TPROXY", "mode: NAT"),
            "spec.interception.mode: unknown mode `NAT`",
        ),
        (
            PROXY.replace("protocolDetectionTimeout: 250ms", "inboundPort: 15001"),
            "inboundPort and outboundPort are both 15001",
        ),
        (
            PROXY.replace("250ms", "30s"),
            "spec.interception.protocolDetectionTimeout: at most 10s",
        ),
        (
            format!(
                "{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - hosts: [\"*/*\"]
",
                PROXY.replace(
                    "  interception: { mode: TPROXY, protocolDetectionTimeout: 250ms }\n",
                    ""
                )
            ),
            "needs `Proxy.spec.interception`",
        ),
        (
            format!(
                "{PROXY}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  ingress:
  - port: {{ number: 15006, protocol: TCP }}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:8080
"
            ),
            "spec.interception.inboundPort: listener 127.0.0.1_15006 uses port 15006, the capture port of virtualInbound",
        ),
    ];
    for (text, want) in cases {
        let e = match load_str("interception.yaml", &text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "expected {want:?} in {e}");
    }
}
