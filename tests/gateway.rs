//! Keel as an ingress gateway: Gateway servers (HTTP, HTTPS SIMPLE and MUTUAL with a certificate
//! per host, TLS PASSTHROUGH, httpsRedirect) with VirtualServices bound by `gateways:`, checked
//! with curl using `--resolve` and SNI.

mod common;

use common::pki::{tls_terminator, Mesh, San};
use common::*;

fn gateway_proxy(admin: u16) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: ingressgateway, namespace: istio-system }}
spec:
  workload: {{ labels: {{ istio: ingressgateway }} }}
  workers: 2
  admin: {{ address: 127.0.0.1:{admin} }}
"
    )
}

fn service(
    name: &str,
    host: &str,
    port: u16,
    protocol: &str,
    backend: std::net::SocketAddr,
) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {name}, namespace: default }}
spec:
  hosts: [{host}]
  ports: [{{ number: {port}, name: p, protocol: {protocol}, targetPort: {} }}]
  resolution: STATIC
  endpoints: [{{ address: {} }}]
",
        backend.port(),
        backend.ip()
    )
}

/// curl with `--resolve name:port:127.0.0.1`; returns the exit code and the response head + body.
fn fetch(name: &str, port: u16, scheme: &str, path: &str, extra: &[&str]) -> (i32, String) {
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("{scheme}://{name}:{port}{path}");
    let mut args = vec!["-s", "-i", "--max-time", "5", "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    let (code, out) = curl(&args);
    (code, out.to_ascii_lowercase())
}

#[test]
fn http_gateway_serves_the_virtual_services_bound_to_it() {
    let productpage = RecordingBackend::echo("productpage");
    let reviews = RecordingBackend::echo("reviews");
    let (port, redirect_port, admin) = (free_port(), free_port(), free_port());
    let config = gateway_proxy(admin)
        + &service(
            "productpage",
            "productpage.default.svc.cluster.local",
            9080,
            "HTTP",
            productpage.addr,
        )
        + &service(
            "reviews",
            "reviews.default.svc.cluster.local",
            9080,
            "HTTP",
            reviews.addr,
        )
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: bookinfo-gateway, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {port}, name: http, protocol: HTTP }}
    hosts: [\"bookinfo.example.com\", \"*.apps.example.com\"]
  - port: {{ number: {redirect_port}, name: http-redirect, protocol: HTTP }}
    hosts: [\"*\"]
    tls: {{ httpsRedirect: true }}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: other, namespace: default }}
spec:
  selector: {{ istio: egressgateway }}
  servers:
  - port: {{ number: 1, name: http, protocol: HTTP }}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: bookinfo, namespace: default }}
spec:
  hosts: [bookinfo.example.com]
  gateways: [bookinfo-gateway]
  http:
  - match: [{{ uri: {{ prefix: /productpage }} }}]
    route: [{{ destination: {{ host: productpage, port: {{ number: 9080 }} }} }}]
  - route: [{{ destination: {{ host: reviews, port: {{ number: 9080 }} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: apps, namespace: default }}
spec:
  hosts: [\"shop.apps.example.com\"]
  gateways: [default/bookinfo-gateway, mesh]
  http:
  - route: [{{ destination: {{ host: reviews, port: {{ number: 9080 }} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: not-on-this-gateway, namespace: default }}
spec:
  hosts: [other.example.com]
  gateways: [other]
  http:
  - route: [{{ destination: {{ host: productpage, port: {{ number: 9080 }} }} }}]
"
        );
    let keel = Keel::start(&config, admin, &[]);
    let (code, out) = fetch("bookinfo.example.com", port, "http", "/productpage", &[]);
    assert_eq!(code, 0, "{out}\n{}", keel.log_text());
    assert!(out.starts_with("http/1.1 200"), "{out}");
    assert!(out.contains("x-backend: productpage"), "{out}");
    let (_, out) = fetch("bookinfo.example.com", port, "http", "/reviews/1", &[]);
    assert!(out.contains("x-backend: reviews"), "{out}");
    let (_, out) = fetch("shop.apps.example.com", port, "http", "/", &[]);
    assert!(out.contains("x-backend: reviews"), "{out}");
    // A host this server does not take, and one bound only to another Gateway.
    for host in ["unknown.example.com", "other.example.com"] {
        let (_, out) = fetch(host, port, "http", "/", &[]);
        assert!(out.starts_with("http/1.1 404"), "{host}: {out}");
    }
    // httpsRedirect: a 301 to the same host and path over https (port 443).
    let (_, out) = fetch(
        "bookinfo.example.com",
        redirect_port,
        "http",
        "/login?next=/",
        &[],
    );
    assert!(out.starts_with("http/1.1 301"), "{out}");
    assert!(
        out.contains("location: https://bookinfo.example.com/login?next=/"),
        "{out}"
    );
    // Workers publish their counts at every idle tick.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (_, m) = http_get(keel.admin, "/stats/prometheus").unwrap();
    assert!(
        m.contains("destination_service=\"productpage.default.svc.cluster.local\""),
        "{m}"
    );
}

#[test]
fn https_gateway_picks_the_certificate_by_sni_and_verifies_clients_on_mutual() {
    let pki = Mesh::new();
    let a = pki
        .ca
        .issue(&pki.dir, "a", &[San::Dns("a.example.com")], false);
    let b = pki.ca.issue(
        &pki.dir,
        "b",
        &[San::Dns("b.example.com"), San::Dns("*.b.example.com")],
        false,
    );
    let client = pki
        .ca
        .issue(&pki.dir, "client", &[San::Dns("client.example.com")], false);
    let app = RecordingBackend::echo("app");
    let (port, mtls_port, admin) = (free_port(), free_port(), free_port());
    let tls = |cert: &common::pki::Issued| {
        format!(
            "serverCertificate: {}, privateKey: {}",
            cert.cert.display(),
            cert.key.display()
        )
    };
    let config = gateway_proxy(admin)
        + &service(
            "app",
            "app.default.svc.cluster.local",
            8000,
            "HTTP",
            app.addr,
        )
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: web, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {port}, name: https-a, protocol: HTTPS }}
    hosts: [a.example.com]
    tls: {{ mode: SIMPLE, {} }}
  - port: {{ number: {port}, name: https-b, protocol: HTTPS }}
    hosts: [\"b.example.com\", \"*.b.example.com\"]
    tls: {{ mode: SIMPLE, {} }}
  - port: {{ number: {mtls_port}, name: https-mutual, protocol: HTTPS }}
    hosts: [a.example.com]
    tls: {{ mode: MUTUAL, {}, caCertificates: {} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: web, namespace: default }}
spec:
  hosts: [\"*.example.com\"]
  gateways: [web]
  http:
  - route: [{{ destination: {{ host: app, port: {{ number: 8000 }} }} }}]
",
            tls(&a),
            tls(&b),
            tls(&a),
            pki.root.display()
        );
    let keel = Keel::start(&config, admin, &[]);
    // curl checks the certificate against the name it asked for: each name gets its own.
    for name in ["a.example.com", "b.example.com", "x.b.example.com"] {
        let (code, out) = fetch(name, port, "https", "/", &["--cacert", path(&pki.root)]);
        assert_eq!(code, 0, "{name}: {out}\n{}", keel.log_text());
        assert!(out.contains("x-backend: app"), "{name}: {out}");
    }
    // MUTUAL: no client certificate, no request; with one from the CA, served.
    let (code, _) = fetch(
        "a.example.com",
        mtls_port,
        "https",
        "/",
        &["--cacert", path(&pki.root)],
    );
    assert_ne!(code, 0, "MUTUAL served a client without a certificate");
    let (code, out) = fetch(
        "a.example.com",
        mtls_port,
        "https",
        "/",
        &[
            "--cacert",
            path(&pki.root),
            "--cert",
            path(&client.cert),
            "--key",
            path(&client.key),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("x-backend: app"), "{out}");
}

#[test]
fn passthrough_gateway_routes_by_sni_without_decrypting() {
    let pki = Mesh::new();
    let db_cert = pki
        .ca
        .issue(&pki.dir, "db", &[San::Dns("db.example.com")], false);
    let (_db, db_port, _db_app) = tls_terminator(&db_cert, "db");
    let (port, admin) = (free_port(), free_port());
    let backend: std::net::SocketAddr = format!("127.0.0.1:{db_port}").parse().unwrap();
    let config = gateway_proxy(admin)
        + &service("db", "db.example.com", 443, "TLS", backend)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: passthrough, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {port}, name: tls, protocol: TLS }}
    hosts: [\"*.example.com\"]
    tls: {{ mode: PASSTHROUGH }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: db, namespace: default }}
spec:
  hosts: [db.example.com]
  gateways: [passthrough]
  tls:
  - match: [{{ port: {port}, sniHosts: [db.example.com] }}]
    route: [{{ destination: {{ host: db.example.com, port: {{ number: 443 }} }} }}]
"
        );
    let keel = Keel::start(&config, admin, &[]);
    // The backend's own certificate reaches curl: the gateway never decrypted.
    let (code, out) = fetch(
        "db.example.com",
        port,
        "https",
        "/q",
        &["--cacert", path(&pki.root)],
    );
    assert_eq!(code, 0, "{out}\n{}", keel.log_text());
    assert!(out.contains("x-backend: db"), "{out}");
    let (code, _) = fetch("nope.example.com", port, "https", "/", &["-k"]);
    assert_ne!(code, 0);
}

#[test]
fn gateway_errors_name_the_field() {
    let admin = free_port();
    let base = gateway_proxy(admin);
    let cases = [
        (
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: v, namespace: default }
spec:
  hosts: [a.example.com]
  gateways: [missing-gateway]
  http: [{ directResponse: { status: 200 } }]
",
            "spec.gateways[0]: no Gateway `default/missing-gateway`",
        ),
        (
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: { name: g, namespace: default }
spec:
  selector: { istio: ingressgateway }
  servers:
  - port: { number: 18443, name: https, protocol: HTTPS }
    hosts: [a.example.com]
",
            "spec.servers[0].tls: protocol HTTPS needs tls.mode",
        ),
        (
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: { name: g, namespace: default }
spec:
  selector: { istio: ingressgateway }
  servers:
  - port: { number: 18443, name: https, protocol: HTTPS }
    hosts: [a.example.com]
    tls: { mode: ISTIO_MUTUAL }
",
            "spec.servers[0].tls.mode: tls mode IstioMutual on a Gateway is not supported yet",
        ),
        (
            "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: { name: g, namespace: default }
spec:
  selector: { istio: ingressgateway }
  servers:
  - port: { number: 18080, name: http, protocol: HTTP }
    hosts: []
",
            "spec.servers[0].hosts: at least one host is required",
        ),
    ];
    for (extra, want) in cases {
        let dir = temp_dir("gateway-errors");
        let file = dir.join("bad.yaml");
        std::fs::write(&file, format!("{base}{extra}")).unwrap();
        let (ok, out) = validate(&file);
        assert!(!ok, "{want}: accepted");
        assert!(out.contains(want), "want `{want}` in:\n{out}");
    }
}
