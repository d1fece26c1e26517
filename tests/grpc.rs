//! gRPC through the real binary: Python `grpcio` as client and as server (HTTP/2 both sides, Keel's
//! own HTTP/2 client upstream): unary, server, client and bidirectional streaming, status codes,
//! deadlines, and Keel's own gRPC answers when no upstream can be had.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::pki::{proxy_with_identity, Ca, San};
use common::*;

/// The Debian python, which has python3-grpcio (setup.sh installs it).
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn script(name: &str) -> String {
    format!("{}/tests/grpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A grpcio server on loopback, killed when dropped.
struct GrpcServer {
    child: Child,
    addr: SocketAddr,
}

impl GrpcServer {
    fn start(name: &str) -> GrpcServer {
        let mut child = Command::new(python())
            .arg(script("server.py"))
            .arg(name)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server prints its port");
        GrpcServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keel with a GRPC egress port for `greeter` on `endpoints`, with `extra` resources, writing
/// each request's path and body byte counts to `access_log` when one is given.
fn keel_for(endpoints: &[SocketAddr], extra: &str) -> (Keel, u16) {
    keel_logging(endpoints, extra, None)
}

fn keel_logging(
    endpoints: &[SocketAddr],
    extra: &str,
    access_log: Option<&std::path::Path>,
) -> (Keel, u16) {
    let (admin, port) = (free_port(), free_port());
    let eps: String = endpoints
        .iter()
        .map(|a| {
            format!(
                "  - {{ address: 127.0.0.1, ports: {{ grpc: {} }} }}\n",
                a.port()
            )
        })
        .collect();
    let telemetry = access_log.map_or(String::new(), |p| {
        format!(
            "  telemetry:\n    accessLog: {{ path: {}, format: '%REQ(:PATH)% %BYTES_RECEIVED% %BYTES_SENT%' }}\n",
            p.display()
        )
    });
    let config = format!(
        "{}{telemetry}{}{extra}",
        proxy_yaml(admin, 2),
        egress_service(port, "GRPC", "greeter", "{ name: greeter }", &eps)
    );
    (Keel::start(&config, admin, &[]), port)
}

fn run_client(port: u16) -> (bool, String) {
    let out = Command::new(python())
        .arg(script("client.py"))
        .arg(port.to_string())
        .arg("greeter")
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn grpcio_calls_of_every_kind_pass_through_keel() {
    let server = GrpcServer::start("backend-a");
    let log = temp_dir("grpc-log").join("access.log");
    let (keel, port) = keel_logging(&[server.addr], "", Some(&log));
    let (ok, text) = run_client(port);
    assert!(ok, "{text}");
    // The bidirectional call's request body flowed in a task of its own while its response
    // did; its bytes are still counted: 20 messages (m0..m19, 2-3 bytes), each framed in 5.
    let mut bidi = None;
    for _ in 0..100 {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        bidi = logged
            .lines()
            .find(|l| l.starts_with("/keel.Test/Bidi "))
            .map(str::to_string);
        if bidi.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let bidi = bidi.expect("the bidi call is logged");
    let received: u64 = bidi.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(received, 10 * (5 + 2) + 10 * (5 + 3), "{bidi}");
    for check in [
        "ok unary",
        "ok status",
        "ok deadline",
        "ok server streaming",
        "ok client streaming",
        "ok bidi ping-pong",
        "ok 300 concurrent unary",
    ] {
        assert!(text.contains(check), "{check} missing:\n{text}");
    }
    // Streams share a few upstream HTTP/2 connections (at most one per worker, as the server
    // takes 100+ streams each) instead of one per call.
    let stats = keel.stats();
    let opened = stats["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap_or("").contains("greeter"))
        .map(|c| c["upstream_cx_total"].as_u64().unwrap_or(0));
    assert!(
        opened.is_some_and(|n| (1..=4).contains(&n)),
        "connections opened: {opened:?}\n{stats}"
    );
}

#[test]
fn grpc_requests_get_grpc_answers_when_no_upstream_can_be_had() {
    // Nothing listens on the endpoint: the connect fails and the client hears UNAVAILABLE (14),
    // as a trailers-only response.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_keel, port) = keel_for(&[dead], "");
    let code = format!(
        "import grpc, sys
ch = grpc.insecure_channel('127.0.0.1:{port}', options=[('grpc.default_authority', 'greeter')])
try:
    ch.unary_unary('/keel.Test/Unary')(b'x', timeout=10)
    sys.exit('no error')
except grpc.RpcError as e:
    print(e.code().name)
"
    );
    let out = Command::new(python()).arg("-c").arg(code).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "UNAVAILABLE",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// gRPC between two sidecars over mesh mTLS (ISTIO_MUTUAL): the client's Keel speaks HTTP/2 over
/// TLS to the server's Keel (ALPN `h2`), which speaks HTTP/2 to the gRPC app. Every call kind
/// works across both hops, and the server side sees the caller's SPIFFE identity.
#[test]
fn grpc_across_two_sidecars_over_mesh_mtls() {
    const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/greeter";
    const CLIENT_ID: &str = "spiffe://cluster.local/ns/foo/sa/caller";
    let dir = temp_dir("grpc-pki");
    let ca = Ca::new("mesh root");
    let root = ca.write(&dir, "root");
    let server_cert = ca.issue(&dir, "greeter", &[San::Uri(SERVER_ID)], false);
    let client_cert = ca.issue(&dir, "caller", &[San::Uri(CLIENT_ID)], false);
    let app = GrpcServer::start("behind-mtls");
    // Server side: STRICT mTLS, an inbound GRPC port in front of the app.
    let (inbound, admin_s) = (free_port(), free_port());
    let server = proxy_with_identity(admin_s, &server_cert, &root, "default", "")
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: default }}
spec:
  ingress:
  - port: {{ number: {inbound}, protocol: GRPC, name: grpc }}
    bind: 127.0.0.1
    defaultEndpoint: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{ name: default, namespace: default }}
spec:
  mtls: {{ mode: STRICT }}
",
            app.addr
        );
    let server = Keel::start(&server, admin_s, &[]);
    // Client side: an egress GRPC port for greeter, ISTIO_MUTUAL to the server's Keel.
    let (outbound, admin_c) = (free_port(), free_port());
    let client = proxy_with_identity(admin_c, &client_cert, &root, "foo", "")
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: foo }}
spec:
  egress:
  - port: {{ number: {outbound}, protocol: GRPC }}
    bind: 127.0.0.1
    hosts: [\"*/*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: greeter, namespace: foo }}
spec:
  hosts: [greeter]
  ports: [{{ number: {outbound}, name: grpc, protocol: GRPC, targetPort: {inbound} }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1 }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: greeter, namespace: foo }}
spec:
  host: greeter
  trafficPolicy:
    tls: {{ mode: ISTIO_MUTUAL, subjectAltNames: [\"{SERVER_ID}\"] }}
"
        );
    let _client = Keel::start(&client, admin_c, &[]);
    let (ok, text) = run_client(outbound);
    assert!(ok, "{text}");
    assert!(text.contains("ok bidi ping-pong"), "{text}");
    // The app heard who called: the server side's x-forwarded-client-cert.
    assert!(text.contains(&format!("URI={CLIENT_ID}")), "{text}");
    // The calls crossed mTLS on a few multiplexed connections, not one handshake per call.
    let handshakes = server.stats()["listeners"][0]["tls_handshakes"]
        .as_u64()
        .unwrap_or(0);
    assert!((1..=4).contains(&handshakes), "{handshakes}");
}
