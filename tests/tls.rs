//! TLS and mesh identity, end to end: the real `keel` binary with certificates made in the test,
//! and real clients (curl, openssl s_client, Python's ssl, another Keel as the mesh peer).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{proxy_with_identity, tls_terminator, Ca, Issued, Mesh, San};
use common::*;

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";

/// An inbound listener on `port` in front of `app`.
fn ingress(port: u16, protocol: &str, app: SocketAddr, namespace: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: {namespace} }}
spec:
  ingress:
  - port: {{ number: {port}, protocol: {protocol}, name: p }}
    bind: 127.0.0.1
    defaultEndpoint: {app}
"
    )
}

fn peer_authentication(mode: &str) -> String {
    format!(
        "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{ name: default, namespace: default }}
spec:
  mtls: {{ mode: {mode} }}
"
    )
}

/// The client side of the mesh: an egress listener on `port` for `reviews` at `target` (a Keel),
/// with the DestinationRule `tls` given.
fn egress_to_reviews(port: u16, protocol: &str, target: u16, tls: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: foo }}
spec:
  egress:
  - port: {{ number: {port}, protocol: {protocol} }}
    bind: 127.0.0.1
    hosts: [\"*/*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews, namespace: default }}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{{ number: {port}, name: p, protocol: {protocol}, targetPort: {target} }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews, namespace: default }}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    tls: {tls}
"
    )
}

/// curl over mTLS to `port` with the client certificate `id`, trusting `root`; the name checked
/// is the SPIFFE id's, which curl cannot, so the chain is checked with --cacert and the name not.
fn curl_mtls(port: u16, id: Option<&Issued>, root: &Path, extra: &[&str]) -> (i32, String) {
    let url = format!("https://127.0.0.1:{port}/mtls");
    let mut args: Vec<&str> = vec!["--cacert", path(root), "-k"];
    if let Some(id) = id {
        args.extend(["--cert", path(&id.cert), "--key", path(&id.key)]);
    }
    args.extend(extra);
    args.push(&url);
    curl(&args)
}

fn listener_stat(keel: &Keel, field: &str) -> u64 {
    keel.listener_stat(field)
}

#[test]
fn strict_mtls_refuses_plaintext_and_serves_mesh_peers() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let sleep = mesh.workload("sleep", SLEEP);
    let app = RecordingBackend::echo("app");
    for driver in DRIVERS {
        let (port, admin) = (free_port(), free_port());
        let config = proxy_with_identity(admin, &reviews, &mesh.root, "default", "")
            + &ingress(port, "HTTP", app.addr, "default")
            + &peer_authentication("STRICT");
        let keel = Keel::start(&config, admin, &["--io-driver", driver]);

        // The seed scenario: plaintext gets nothing (reset: curl 56), mTLS peers get 200.
        let (code, _) = curl(&[&format!("http://127.0.0.1:{port}/plain")]);
        assert_eq!(code, 56, "{driver}: plaintext on STRICT is reset");
        let (code, body) = curl_mtls(port, Some(&sleep), &mesh.root, &["-w", "%{http_code}"]);
        assert_eq!(code, 0, "{driver}: {body}");
        assert!(body.ends_with("200"), "{driver}: {body}");
        // The app learns who called, as Envoy tells it.
        let text = body.to_ascii_lowercase();
        assert!(text.contains("x-forwarded-proto: https"), "{text}");
        assert!(
            text.contains(&format!("x-forwarded-client-cert: by={REVIEWS};hash=")),
            "{text}"
        );
        assert!(text.contains(&format!(";uri={SLEEP}")), "{text}");
        // TLS without a client certificate is not mesh mTLS.
        let (code, _) = curl_mtls(port, None, &mesh.root, &[]);
        assert_ne!(code, 0, "{driver}: no client certificate is refused");
        // Keep-alive over TLS: several requests on one connection.
        let url = format!("https://127.0.0.1:{port}/again");
        let (code, body) = curl_mtls(
            port,
            Some(&sleep),
            &mesh.root,
            &["-w", "%{http_code}\n", &url, &url],
        );
        assert_eq!(code, 0);
        assert_eq!(body.matches("200\n").count(), 3, "{body}");
        assert_eq!(listener_stat(&keel, "tls_plaintext_refused"), 1);
        assert!(listener_stat(&keel, "tls_handshake_errors") >= 1);
        assert_eq!(listener_stat(&keel, "tls_handshakes"), 2);
        assert!(keel.log_text().contains("plaintext connection refused"));
    }
}

#[test]
fn permissive_serves_plaintext_and_mtls_on_one_port() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let sleep = mesh.workload("sleep", SLEEP);
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    // No PeerAuthentication: Istio's default, PERMISSIVE.
    let config = proxy_with_identity(admin, &reviews, &mesh.root, "default", "")
        + &ingress(port, "HTTP", app.addr, "default");
    let keel = Keel::start(&config, admin, &[]);
    let (code, body) = curl(&[
        "-H",
        "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://cluster.local/ns/admin/sa/root",
        &format!("http://127.0.0.1:{port}/plain"),
    ]);
    assert_eq!(code, 0);
    let text = body.to_ascii_lowercase();
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    assert!(
        !text.contains("x-forwarded-client-cert"),
        "a plaintext client cannot claim an identity: {text}"
    );
    let (code, body) = curl_mtls(port, Some(&sleep), &mesh.root, &[]);
    assert_eq!(code, 0);
    assert!(body.contains(SLEEP), "{body}");
    assert_eq!(listener_stat(&keel, "tls_plaintext_accepted"), 1);
    assert_eq!(listener_stat(&keel, "tls_handshakes"), 1);
}

#[test]
fn bad_peer_certificates_are_refused() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_with_identity(admin, &reviews, &mesh.root, "default", "")
        + &ingress(port, "HTTP", app.addr, "default")
        + &peer_authentication("STRICT");
    let keel = Keel::start(&config, admin, &[]);
    let other = Ca::new("another mesh");
    let bad = [
        (
            "other trust domain",
            mesh.ca.issue(
                &mesh.dir,
                "td",
                &[San::Uri("spiffe://evil.example/ns/foo/sa/sleep")],
                false,
            ),
        ),
        (
            "untrusted root",
            other.issue(&mesh.dir, "untrusted", &[San::Uri(SLEEP)], false),
        ),
        (
            "expired",
            mesh.ca
                .issue(&mesh.dir, "expired", &[San::Uri(SLEEP)], true),
        ),
        (
            "no SPIFFE id",
            mesh.ca
                .issue(&mesh.dir, "dns", &[San::Dns("sleep.example")], false),
        ),
    ];
    for (what, cert) in &bad {
        let (code, body) = curl_mtls(port, Some(cert), &mesh.root, &[]);
        assert_ne!(code, 0, "{what}: refused, got {body}");
    }
    keel.wait_listener_stat("tls_handshake_errors", bad.len() as u64);
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let log = keel.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn two_sidecars_talk_istio_mutual_over_http_and_tcp() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let sleep = mesh.workload("sleep", SLEEP);
    let app = RecordingBackend::echo("app");
    let echo = echo_backend().0;

    // Server side: STRICT, an HTTP port and a TCP port.
    let (http_in, tcp_in, admin_s) = (free_port(), free_port(), free_port());
    let server = proxy_with_identity(admin_s, &reviews, &mesh.root, "default", "")
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {http_in}, protocol: HTTP, name: http }}
    bind: 127.0.0.1
    defaultEndpoint: {}
  - port: {{ number: {tcp_in}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    defaultEndpoint: {echo}
",
            app.addr
        )
        + &peer_authentication("STRICT");
    let server = Keel::start(&server, admin_s, &[]);

    // Client side (namespace foo): HTTP egress with ISTIO_MUTUAL naming the server's identity.
    let (http_out, admin_c) = (free_port(), free_port());
    let tls = format!("{{ mode: ISTIO_MUTUAL, subjectAltNames: [\"{REVIEWS}\"] }}");
    let client = proxy_with_identity(admin_c, &sleep, &mesh.root, "foo", "")
        + &egress_to_reviews(http_out, "HTTP", http_in, &tls);
    let client = Keel::start(&client, admin_c, &[]);
    for i in 0..5 {
        let (code, body) = curl(&[
            "-H",
            "Host: reviews.default.svc.cluster.local",
            "-H",
            "x-forwarded-client-cert: By=spiffe://evil",
            &format!("http://127.0.0.1:{http_out}/r{i}"),
        ]);
        assert_eq!(code, 0);
        let text = body.to_ascii_lowercase();
        assert!(text.contains(&format!("get /r{i} http/1.1")), "{text}");
        // The outbound side dropped the forged header; the inbound side vouched for the caller.
        assert!(!text.contains("evil"), "{text}");
        assert!(text.contains(&format!("uri={SLEEP}")), "{text}");
    }
    // Pooled mTLS connections carried them: at most one per client worker.
    assert!(server.listener_stat("tls_handshakes") <= 2);

    // TCP over ISTIO_MUTUAL, bytes both ways.
    let tcp_out = free_port();
    let admin_t = free_port();
    let tcp_client = proxy_with_identity(admin_t, &sleep, &mesh.root, "foo", "")
        + &egress_to_reviews(tcp_out, "TCP", tcp_in, "{ mode: ISTIO_MUTUAL }");
    let _tcp_client = Keel::start(&tcp_client, admin_t, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", tcp_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_round_trip(&mut s, b"hello over mesh mTLS");
    // Megabytes each way, then a half-close that must reach the far end through TLS.
    let mut reader = s.try_clone().unwrap();
    let check = std::thread::spawn(move || expect_pattern(&mut reader, 7, 8 << 20));
    send_pattern(&mut s, 7, 8 << 20);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    check.join().unwrap();

    // A client expecting another identity refuses the server: 503, connect failure, counted.
    let (wrong_out, admin_w) = (free_port(), free_port());
    let tls = "{ mode: ISTIO_MUTUAL, subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/ratings\"] }";
    let wrong = proxy_with_identity(admin_w, &sleep, &mesh.root, "foo", "")
        + &egress_to_reviews(wrong_out, "HTTP", http_in, tls);
    let wrong = Keel::start(&wrong, admin_w, &[]);
    let (code, body) = curl(&[
        "-w",
        "%{http_code}",
        "-H",
        "Host: reviews.default.svc.cluster.local",
        &format!("http://127.0.0.1:{wrong_out}/"),
    ]);
    assert_eq!(code, 0);
    assert!(body.ends_with("503"), "{body}");
    // Istio's default retry policy retries a connect failure twice.
    assert_eq!(wrong.listener_stat("upstream_connect_error"), 3);
    assert!(wrong.log_text().contains("TLS handshake failed"));
    drop(client);
}

#[test]
fn ingress_tls_simple_and_mutual_for_clients_outside_the_mesh() {
    let pki = Mesh::new();
    let server = pki
        .ca
        .issue(&pki.dir, "server", &[San::Dns("localhost")], false);
    let client = pki
        .ca
        .issue(&pki.dir, "client", &[San::Dns("client.example")], false);
    let app = RecordingBackend::echo("app");
    for (mode, extra) in [
        ("SIMPLE", String::new()),
        (
            "MUTUAL",
            format!(
                "\n      caCertificates: {}\n      subjectAltNames: [client.example]",
                pki.root.display()
            ),
        ),
    ] {
        let (port, admin) = (free_port(), free_port());
        let config = proxy_yaml(admin, 1)
            + &format!(
                "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {port}, protocol: HTTP, name: https }}
    bind: 127.0.0.1
    defaultEndpoint: {}
    tls:
      mode: {mode}
      serverCertificate: {}
      privateKey: {}{extra}
",
                app.addr,
                server.cert.display(),
                server.key.display()
            );
        let _keel = Keel::start(&config, admin, &[]);
        let url = format!("https://localhost:{port}/x");
        let resolve = format!("localhost:{port}:127.0.0.1");
        let mut args = vec![
            "--resolve",
            &resolve,
            "--cacert",
            path(&pki.root),
            "-w",
            "%{http_code}",
        ];
        if mode == "MUTUAL" {
            // Without a client certificate: refused.
            let (code, _) = curl(&[args.as_slice(), &[url.as_str()]].concat());
            assert_ne!(code, 0, "MUTUAL needs a client certificate");
            args.extend(["--cert", path(&client.cert), "--key", path(&client.key)]);
        }
        // The server's name is verified by curl here (a DNS SAN), over TLS 1.2 and 1.3.
        for version in ["--tlsv1.2", "--tlsv1.3"] {
            let max = if version == "--tlsv1.2" { "1.2" } else { "1.3" };
            let (code, body) =
                curl(&[args.as_slice(), &[version, "--tls-max", max, url.as_str()]].concat());
            assert_eq!(code, 0, "{mode} {version}: {body}");
            assert!(body.ends_with("200"), "{mode} {version}: {body}");
        }
        // ALPN h2: HTTP/2 over TLS on the same listener.
        let (code, version) = curl(
            &[
                args.as_slice(),
                &[
                    "--http2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version}",
                    url.as_str(),
                ],
            ]
            .concat(),
        );
        assert_eq!((code, version.as_str()), (0, "2"), "{mode}: HTTP/2 by ALPN");
        // openssl s_client sees our certificate and the ALPN we offer.
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-alpn",
                "http/1.1",
            ])
            .args(["-servername", "localhost", "-CAfile", path(&pki.root)])
            .args(if mode == "MUTUAL" {
                vec!["-cert", path(&client.cert), "-key", path(&client.key)]
            } else {
                vec![]
            })
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
        assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
        // OpenSSL offers AES-256-GCM first; Keel picks by its own order, AES-128-GCM first
        // (as Envoy does), whose SHA-256 key schedule is the cheaper one.
        assert!(text.contains("Cipher is TLS_AES_128_GCM_SHA256"), "{text}");
    }
}

#[test]
fn destination_rule_simple_verifies_the_upstream_name() {
    let pki = Mesh::new();
    let server = pki.ca.issue(
        &pki.dir,
        "server",
        &[San::Dns("reviews.default.svc.cluster.local")],
        false,
    );
    // The TLS upstream: a Keel terminating SIMPLE TLS in front of the app.
    let (_upstream, tls_port, _app) = tls_terminator(&server, "app");
    for (sni, want) in [(None, "200"), (Some("other.example"), "503")] {
        let (out, admin) = (free_port(), free_port());
        let sni = sni.map(|s| format!(", sni: {s}")).unwrap_or_default();
        let tls = format!(
            "{{ mode: SIMPLE, caCertificates: {}{sni} }}",
            pki.root.display()
        );
        let config = proxy_yaml(admin, 1).replace("namespace: default", "namespace: foo")
            + &egress_to_reviews(out, "HTTP", tls_port, &tls);
        let _keel = Keel::start(&config, admin, &[]);
        let (code, body) = curl(&[
            "-w",
            "%{http_code}",
            "-H",
            "Host: reviews.default.svc.cluster.local",
            &format!("http://127.0.0.1:{out}/"),
        ]);
        assert_eq!(code, 0, "sni {sni}: {body}; {}", _keel.log_text());
        assert!(body.ends_with(want), "sni {sni}: {body}");
    }
}

#[test]
fn a_stalled_handshake_times_out() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_with_identity(
        admin,
        &reviews,
        &mesh.root,
        "default",
        "  tls: { handshakeTimeout: 300ms }\n",
    ) + &ingress(port, "TCP", app.addr, "default")
        + &peer_authentication("STRICT");
    let keel = Keel::start(&config, admin, &[]);
    // Silent after connecting, and half a ClientHello (a record header promising more).
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut partial = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut partial, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let started = Instant::now();
    for mut s in [silent, partial] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    keel.wait_listener_stat("tls_handshake_timeouts", 2);
}

/// Serves TLS connections to `port` in a loop until `stop`, counting failures.
fn mtls_load(
    port: u16,
    id: &Issued,
    root: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    let (cert, key, root) = (id.cert.clone(), id.key.clone(), root.to_path_buf());
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let url = format!("https://127.0.0.1:{port}/load");
            // Three requests per connection: new handshakes and kept connections both.
            let (code, body) = curl(&[
                "--cacert",
                path(&root),
                "-k",
                "--cert",
                path(&cert),
                "--key",
                path(&key),
                "-w",
                "%{http_code}\n",
                &url,
                &url,
                &url,
            ]);
            let good = body.matches("200\n").count();
            ok += good;
            if code != 0 || good != 3 {
                eprintln!("mtls_load: curl exit {code}, {good} of 3 answered: {body}");
                failed += 1;
            }
        }
        (ok, failed)
    })
}

/// The SHA-256 of the certificate the server presents, as Python's ssl sees it.
fn served_certificate(port: u16) -> String {
    let script = format!(
        "import ssl,socket,hashlib\nc=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\nc.check_hostname=False\nc.verify_mode=ssl.CERT_NONE\ns=c.wrap_socket(socket.create_connection(('127.0.0.1',{port})))\nprint(hashlib.sha256(s.getpeercert(True)).hexdigest())"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn pem_sha256(pem: &str) -> String {
    let script = "import ssl,sys,hashlib\nprint(hashlib.sha256(ssl.PEM_cert_to_DER_cert(sys.stdin.read())).hexdigest())";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), pem.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn certificates_rotate_under_traffic_and_a_bad_file_keeps_the_old_ones() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let sleep = mesh.workload("sleep", SLEEP);
    let app = RecordingBackend::echo("app");
    // PERMISSIVE, so the served certificate can be looked at by a client without one too.
    let (port, admin) = (free_port(), free_port());
    let config = proxy_with_identity(admin, &reviews, &mesh.root, "default", "")
        + &ingress(port, "HTTP", app.addr, "default");
    let keel = Keel::start(&config, admin, &[]);
    let before = served_certificate(port);
    assert_eq!(before, pem_sha256(&reviews.cert_pem));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = mtls_load(port, &sleep, &mesh.root, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // The certificate manager writes a new key and certificate (same identity) in place.
    let rotated = mesh.workload("reviews", REVIEWS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(port) != pem_sha256(&rotated.cert_pem) {
        assert!(Instant::now() < deadline, "the new certificate is served");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "no request failed across the rotation ({ok} served)"
    );

    // A broken key: the reload fails, is counted and logged, and the rotated material stays.
    let failures = keel.stats()["config_reloads"]["failure"].as_u64().unwrap();
    common::pki::write_atomically(
        &rotated.key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while keel.stats()["config_reloads"]["failure"].as_u64().unwrap() == failures {
        assert!(Instant::now() < deadline, "the bad key is noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(served_certificate(port), pem_sha256(&rotated.cert_pem));
    let (code, _) = curl_mtls(port, Some(&sleep), &mesh.root, &[]);
    assert_eq!(code, 0, "still serving with the last good material");
    let log = keel.log_text();
    assert!(log.contains("reviews-key.pem"), "the log names the file");
}

#[test]
fn tls_config_errors_name_the_field() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let other = Ca::new("other");
    let stranger = other.issue(&mesh.dir, "stranger", &[San::Uri(REVIEWS)], false);
    let no_id = mesh
        .ca
        .issue(&mesh.dir, "noid", &[San::Dns("reviews.example")], false);
    let app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            proxy_yaml(free_port(), 1)
                + &ingress(free_port(), "HTTP", app, "default")
                + &peer_authentication("STRICT"),
            "STRICT mTLS needs this workload's certificate",
        ),
        (
            proxy_yaml(free_port(), 1)
                + &egress_to_reviews(free_port(), "HTTP", 9, "{ mode: ISTIO_MUTUAL }"),
            "ISTIO_MUTUAL presents this workload's certificate",
        ),
        (
            proxy_with_identity(
                free_port(),
                &reviews,
                Path::new("/nonexistent/root.pem"),
                "default",
                "",
            ),
            "spec.identity.rootCertificates: cannot read /nonexistent/root.pem",
        ),
        (
            proxy_with_identity(free_port(), &stranger, &mesh.root, "default", ""),
            "does not verify against",
        ),
        (
            proxy_with_identity(free_port(), &no_id, &mesh.root, "default", ""),
            "no spiffe://cluster.local/... URI SAN",
        ),
        (
            proxy_with_identity(
                free_port(),
                &Issued {
                    cert: reviews.cert.clone(),
                    key: no_id.key.clone(),
                    cert_pem: String::new(),
                },
                &mesh.root,
                "default",
                "",
            ),
            "does not go with",
        ),
    ];
    for (config, want) in cases {
        let dir = temp_dir("tls-invalid");
        let file = dir.join("keel.yaml");
        std::fs::write(&file, &config).unwrap();
        let (ok, out) = validate(&file);
        assert!(!ok, "{want}: rejected");
        assert!(out.contains(want), "want `{want}` in:\n{out}");
    }
}

#[test]
fn tls_passthrough_routes_by_sni() {
    let pki = Mesh::new();
    let a_cert = pki
        .ca
        .issue(&pki.dir, "a", &[San::Dns("a.example.com")], false);
    let b_cert = pki.ca.issue(
        &pki.dir,
        "b",
        &[San::Dns("b.example.com"), San::Dns("x.wild.example")],
        false,
    );
    let (_a, a_port, _a_app) = tls_terminator(&a_cert, "a");
    let (_b, b_port, _b_app) = tls_terminator(&b_cert, "b");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_yaml(admin, 2)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: TLS }}
    bind: 127.0.0.1
    hosts: [\"*/*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: a, namespace: default }}
spec:
  hosts: [a.example.com]
  ports: [{{ number: {port}, name: tls, protocol: TLS, targetPort: {a_port} }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: b, namespace: default }}
spec:
  hosts: [b.example.com]
  ports: [{{ number: {port}, name: tls, protocol: TLS, targetPort: {b_port} }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: b, namespace: default }}
spec:
  hosts: [b.example.com]
  tls:
  - match: [{{ sniHosts: [b.example.com, \"*.wild.example\"] }}]
    route: [{{ destination: {{ host: b.example.com }} }}]
"
        );
    let keel = Keel::start(&config, admin, &[]);
    for (name, backend) in [
        ("a.example.com", "a"),
        ("b.example.com", "b"),
        ("x.wild.example", "b"),
    ] {
        // The client's TLS session ends at the backend: curl verifies the backend's certificate
        // for the name it asked for, through Keel, which never decrypts.
        let resolve = format!("{name}:{port}:127.0.0.1");
        let url = format!("https://{name}:{port}/sni");
        let out = Command::new("curl")
            .args([
                "-s",
                "-i",
                "--max-time",
                "5",
                "--resolve",
                &resolve,
                "--cacert",
                path(&pki.root),
                &url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(out.status.success(), "{name}: {text}");
        assert!(
            text.contains(&format!("x-backend: {backend}")),
            "{name}: {text}"
        );
    }
    // An SNI no route names, and no SNI at all: the connection is closed, and counted.
    let resolve = format!("c.example.com:{port}:127.0.0.1");
    let (code, _) = curl(&[
        "--resolve",
        &resolve,
        "-k",
        &format!("https://c.example.com:{port}/"),
    ]);
    assert_ne!(code, 0);
    let (code, _) = curl(&["-k", &format!("https://127.0.0.1:{port}/")]);
    assert_ne!(code, 0);
    // Plaintext on a TLS port is not a ClientHello.
    let (code, _) = curl(&[&format!("http://127.0.0.1:{port}/")]);
    assert_ne!(code, 0);
    keel.wait_listener_stat("no_route", 2);
    assert_eq!(keel.listener_stat("tls_handshake_errors"), 1);
}

#[test]
fn permissive_lets_a_server_first_protocol_through_after_the_wait() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    // A database-like backend that speaks first; its client waits for the greeting.
    let db = banner_backend("220 ready\r\n");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_with_identity(
        admin,
        &reviews,
        &mesh.root,
        "default",
        "  tls: { handshakeTimeout: 300ms }\n",
    ) + &ingress(port, "TCP", db, "default");
    let keel = Keel::start(&config, admin, &[]);
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 32];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"220 ready\r\n");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    keel.wait_listener_stat("tls_plaintext_accepted", 1);
    assert_eq!(keel.listener_stat("tls_handshake_timeouts"), 0);
}

/// What a client does wrong in its handshake cannot make Keel write a line per connection:
/// rustls's own per-connection warnings (here, an IP address sent as SNI, as wrk does) are held
/// back unless the log filter names rustls — at start (the harness's `--log-level debug`) and
/// after `POST /logging` — and the handshakes themselves succeed and are counted.
#[test]
fn a_client_cannot_fill_the_log_through_rustls() {
    use std::io::{Read, Write};
    let pki = Mesh::new();
    let server = pki
        .ca
        .issue(&pki.dir, "server", &[San::Dns("localhost")], false);
    let (keel, port, _app) = tls_terminator(&server, "app");
    let admin = keel.admin;
    let handshakes_with_ip_as_sni = |done: u64| {
        for _ in 0..5 {
            let out = Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
                .args(["-servername", "127.0.0.1"])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("TLSv1.3"), "{text}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while listener_stat(&keel, "tls_handshakes") < done + 5 {
            assert!(Instant::now() < deadline, "handshakes not counted");
            std::thread::sleep(Duration::from_millis(20));
        }
        keel.log_text().matches("Illegal SNI").count()
    };
    assert_eq!(
        handshakes_with_ip_as_sni(0),
        0,
        "a line per connection from rustls"
    );

    // Asked for by name, rustls's lines come back.
    let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.write_all(
        b"POST /logging?level=debug%2Crustls%3Dwarn HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(handshakes_with_ip_as_sni(5) >= 1, "{}", keel.log_text());
}
