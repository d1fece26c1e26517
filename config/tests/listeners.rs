//! Which listeners wait for the client's first bytes before taking a connection
//! (`Listener::client_speaks_first`, TCP_DEFER_ACCEPT at runtime): those whose every connection
//! opens with the client's bytes, never a port where the server may speak first.

use keel_config::{load_str, Binding, DownstreamTls, Listener, Protocol, Snapshot};

fn load(text: &str) -> Snapshot {
    load_str("listeners.yaml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn listener(s: &Snapshot, port: u16) -> &Listener {
    s.listeners
        .iter()
        .find(|l| l.address.port() == port && l.binds())
        .unwrap_or_else(|| panic!("no bound listener on port {port}"))
}

/// PEM files as config reads them (their content is checked later, when TLS contexts are built).
fn pem_files() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-listeners-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["cert.pem", "key.pem", "root.pem"] {
        std::fs::write(dir.join(name), "-----BEGIN CERTIFICATE-----\n").unwrap();
    }
    dir
}

#[test]
fn http_tls_and_sni_ports_wait_for_the_client_plain_tcp_does_not() {
    let dir = pem_files();
    let d = dir.display();
    let s = load(&format!(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: app, namespace: default }}
spec:
  workload: {{ labels: {{ app: app }} }}
  identity: {{ certificateChain: {d}/cert.pem, privateKey: {d}/key.pem, rootCertificates: {d}/root.pem }}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{ name: app, namespace: default }}
spec:
  selector: {{ matchLabels: {{ app: app }} }}
  mtls: {{ mode: DISABLE }}
  portLevelMtls:
    7001: {{ mode: STRICT }}
    7002: {{ mode: PERMISSIVE }}
    7003: {{ mode: PERMISSIVE }}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: api }}
spec:
  hosts: [api.example.com]
  ports: [{{ number: 7443, protocol: TLS, name: tls }}]
  resolution: STATIC
  endpoints: [{{ address: 10.1.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  ingress:
  - {{ port: {{ number: 7000, protocol: HTTP, name: http }}, bind: 127.0.0.1, defaultEndpoint: 127.0.0.1:9000 }}
  - {{ port: {{ number: 7001, protocol: TCP, name: strict }}, bind: 127.0.0.1, defaultEndpoint: 127.0.0.1:9001 }}
  - {{ port: {{ number: 7002, protocol: TCP, name: permissive }}, bind: 127.0.0.1, defaultEndpoint: 127.0.0.1:9002 }}
  - {{ port: {{ number: 7003, protocol: HTTP, name: permissive-http }}, bind: 127.0.0.1, defaultEndpoint: 127.0.0.1:9003 }}
  - {{ port: {{ number: 7004, protocol: TCP, name: plain }}, bind: 127.0.0.1, defaultEndpoint: 127.0.0.1:9004 }}
  - port: {{ number: 7005, protocol: TCP, name: terminated }}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:9005
    tls: {{ mode: SIMPLE, serverCertificate: {d}/cert.pem, privateKey: {d}/key.pem }}
  egress:
  - port: {{ number: 7443, protocol: TLS, name: tls }}
    bind: 127.0.0.1
    hosts: [\"./*\"]
"
    ));
    let waits = |port| listener(&s, port).client_speaks_first();
    assert!(waits(7000), "HTTP");
    assert!(waits(7001), "TCP under STRICT: a ClientHello first");
    assert!(
        !waits(7002),
        "TCP under PERMISSIVE: plaintext may be server-first"
    );
    assert!(
        waits(7003),
        "HTTP under PERMISSIVE: a request or a ClientHello first"
    );
    assert!(!waits(7004), "plain TCP");
    assert!(waits(7005), "TCP with TLS terminated");
    assert!(waits(7443), "TLS passthrough routed by SNI");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn capture_detected_and_virtual_listeners_never_wait() {
    let s = load(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: app, namespace: default }
spec:
  workload: { labels: { app: app } }
  interception: { mode: TPROXY }
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
",
    );
    for l in &s.listeners {
        let why = format!("{} ({:?}, {:?})", l.name, l.binding, l.protocol);
        match (&l.binding, &l.protocol) {
            (Binding::Bound, Protocol::Http) => assert!(l.client_speaks_first(), "{why}"),
            _ => assert!(!l.client_speaks_first(), "{why}"),
        }
    }
    assert!(s
        .listeners
        .iter()
        .any(|l| matches!(l.binding, Binding::Capture(_))));
    assert!(s
        .listeners
        .iter()
        .any(|l| l.binding == Binding::Virtual && l.protocol == Protocol::Http));
    assert!(s.listeners.iter().any(|l| l.protocol == Protocol::Auto));
    // The same TCP listener, by TLS setting alone.
    let mut l = s
        .listeners
        .iter()
        .find(|l| l.protocol == Protocol::Auto)
        .unwrap()
        .clone();
    l.binding = Binding::Bound;
    l.protocol = Protocol::Tcp;
    assert!(!l.client_speaks_first());
    l.tls = Some(DownstreamTls::Mesh { permissive: false });
    assert!(l.client_speaks_first());
    l.tls = Some(DownstreamTls::Mesh { permissive: true });
    assert!(!l.client_speaks_first());
}
