//! Security policy end to end: AuthorizationPolicy on HTTP and TCP with mesh identities from two
//! namespaces, JWT RequestAuthentication with keys and tokens made in the test (Python's PyJWT),
//! a jwksUri served from loopback that goes away, local rate limits, and REGISTRY_ONLY egress.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{proxy_with_identity, Issued, Mesh};
use common::*;

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const SLEEP_FOO: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
const SLEEP_BAR: &str = "spiffe://cluster.local/ns/bar/sa/sleep";
const ISSUER: &str = "https://issuer.test";

/// `curl -i` to `url` with extra args: (status, whole response text).
fn curl_i(url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-i", "--path-as-is"];
    args.extend(extra);
    args.push(url);
    let (code, out) = curl(&args);
    assert_eq!(code, 0, "curl {url} {extra:?}: exit {code}");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// Inbound listeners of a Sidecar in `namespace`: (port, protocol, app) each.
fn ingress(namespace: &str, ports: &[(u16, &str, SocketAddr)]) -> String {
    let mut y = format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default, namespace: {namespace} }}
spec:
  ingress:
"
    );
    for (port, protocol, app) in ports {
        y += &format!(
            "  - port: {{ number: {port}, protocol: {protocol}, name: p{port} }}
    bind: 127.0.0.1
    defaultEndpoint: {app}
"
        );
    }
    y
}

fn resource(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "---
apiVersion: security.istio.io/v1
kind: {kind}
metadata: {{ name: {name}, namespace: default }}
spec:
{spec}"
    )
}

/// A TLS client with a mesh certificate: sends `msg` and returns what came back before EOF.
fn tls_echo(port: u16, id: &Issued, root: &Path, msg: &str) -> String {
    let script = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(sys.argv[2])
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
got = b""
try:
    t = ctx.wrap_socket(s)
    t.sendall(sys.argv[5].encode())
    while len(got) < len(sys.argv[5]):
        b = t.recv(4096)
        if not b:
            break
        got += b
except (ssl.SSLError, OSError):
    pass
sys.stdout.write(got.decode())
"#;
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &port.to_string(),
            path(root),
            path(&id.cert),
            path(&id.key),
            msg,
        ])
        .output()
        .expect("python3 runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn deny_sources_outside_namespace_foo_on_http_and_tcp() {
    let mesh = Mesh::new();
    let reviews = mesh.workload("reviews", REVIEWS);
    let foo = mesh.workload("sleep-foo", SLEEP_FOO);
    let bar = mesh.workload("sleep-bar", SLEEP_BAR);
    let app = RecordingBackend::echo("app");
    let (echo, _) = echo_backend();
    for driver in DRIVERS {
        let (http, tcp, admin) = (free_port(), free_port(), free_port());
        // Istio's example, as written: deny requests from sources not in namespace foo.
        let config = proxy_with_identity(admin, &reviews, &mesh.root, "default", "")
            + &ingress("default", &[(http, "HTTP", app.addr), (tcp, "TCP", echo)])
            + &resource(
                "PeerAuthentication",
                "default",
                "  mtls: { mode: STRICT }\n",
            )
            + &resource(
                "AuthorizationPolicy",
                "deny-others",
                "  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: [\"foo\"]
",
            );
        let keel = Keel::start(&config, admin, &["--io-driver", driver]);
        let url = format!("https://127.0.0.1:{http}/x");
        let mtls = |id: &Issued| {
            let args = [
                "-k",
                "--cert",
                path(&id.cert),
                "--key",
                path(&id.key),
                "-w",
                "\n%{http_code}",
                &url,
            ];
            curl(&args).1
        };
        assert!(mtls(&foo).ends_with("\n200"), "{driver}: foo is allowed");
        let refused = mtls(&bar);
        assert!(refused.ends_with("\n403"), "{driver}: {refused}");
        assert!(refused.starts_with("RBAC: access denied"), "{refused}");
        // TCP: the allowed peer gets its echo, the other a closed connection.
        assert_eq!(
            tls_echo(tcp, &foo, &mesh.root, "hello"),
            "hello",
            "{driver}"
        );
        assert_eq!(tls_echo(tcp, &bar, &mesh.root, "hello"), "", "{driver}");
        let stats = keel.stats();
        let sum = |field: &str| -> u64 {
            stats["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l[field].as_u64().unwrap_or(0))
                .sum()
        };
        assert_eq!(sum("rbac_denied"), 2, "{driver}: {stats}");
        assert_eq!(sum("rbac_allowed"), 2, "{driver}");
    }
}

#[test]
fn get_only_rule_with_normalized_paths_and_selectors() {
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_yaml(admin, 1)
        + &ingress("default", &[(port, "HTTP", app.addr)])
        // Allow GET (and HEAD) under /public/ and /healthz, for this workload.
        + &resource(
            "AuthorizationPolicy",
            "get-only",
            "  selector: { matchLabels: { app: test } }
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [\"GET\", \"HEAD\"]
        paths: [\"/public/*\"]
  - to:
    - operation:
        paths: [\"/healthz\"]
",
        )
        + &resource(
            "AuthorizationPolicy",
            "no-secrets",
            "  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/public/secret*\"]
  - when:
    - key: request.headers[x-evil]
      values: [\"*\"]
",
        )
        // Selects another workload: not enforced here.
        + &resource(
            "AuthorizationPolicy",
            "deny-all-other-app",
            "  selector: { matchLabels: { app: other } }
  action: DENY
  rules: [{}]
",
        );
    let keel = Keel::start(&config, admin, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let status = |p: &str, extra: &[&str]| curl_i(&format!("{base}{p}"), extra).0;
    assert_eq!(status("/public/a", &[]), 200);
    assert_eq!(
        status("/public/a?q=1", &[]),
        200,
        "the query is not the path"
    );
    assert_eq!(status("/healthz", &["-X", "POST"]), 200);
    assert_eq!(status("/public/a", &["-X", "POST"]), 403);
    assert_eq!(status("/private", &[]), 403);
    // Dot segments and percent-encoded letters are resolved before matching.
    assert_eq!(status("/public/../private", &[]), 403);
    assert_eq!(status("/%70ublic/a", &[]), 200);
    assert_eq!(status("/public/secret", &[]), 403);
    assert_eq!(status("/public/%73ecret", &[]), 403);
    assert_eq!(status("/public/x/../secret", &[]), 403);
    assert_eq!(status("/public/a", &["-H", "x-evil: 1"]), 403);
    let (_, text) = curl_i(&format!("{base}/private"), &[]);
    assert!(text.ends_with("RBAC: access denied"), "{text}");
    assert!(
        !app.received_text().contains("/private"),
        "refused requests never reach the app"
    );
    assert_eq!(keel.listener_stat("rbac_denied"), 8);
}

/// Keys, JWKS and tokens from tests/jwt/make_tokens.py.
struct Tokens {
    jwks: String,
    tokens: serde_json::Value,
}

impl Tokens {
    fn make(audience: &str) -> Tokens {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jwt/make_tokens.py");
        let out = Command::new("/usr/bin/python3")
            .args([script, ISSUER, audience])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Tokens {
            jwks: v["jwks"].to_string(),
            tokens: v["tokens"].clone(),
        }
    }

    fn get(&self, name: &str) -> &str {
        self.tokens[name].as_str().unwrap()
    }
}

/// Authorization for `/secure*`: a JWT from the issuer whose `groups` claim has `ops`; the rest
/// is open.
const SECURE_POLICY: &str = "  action: ALLOW
  rules:
  - to:
    - operation:
        notPaths: [\"/secure*\"]
  - from:
    - source:
        requestPrincipals: [\"https://issuer.test/*\"]
    to:
    - operation:
        paths: [\"/secure*\"]
    when:
    - key: request.auth.claims[groups]
      values: [\"ops\"]
";

#[test]
fn jwt_valid_expired_wrong_issuer_audience_tampered_and_missing() {
    let t = Tokens::make("api");
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_yaml(admin, 2)
        + &ingress("default", &[(port, "HTTP", app.addr)])
        + &resource(
            "RequestAuthentication",
            "jwt",
            &format!(
                "  jwtRules:
  - issuer: {ISSUER}
    audiences: [api]
    jwks: '{}'
    outputClaimToHeaders:
    - {{ header: x-jwt-sub, claim: sub }}
    - {{ header: x-jwt-team, claim: team }}
",
                t.jwks
            ),
        )
        + &resource("AuthorizationPolicy", "secure", SECURE_POLICY);
    let keel = Keel::start(&config, admin, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let with = |p: &str, token: &str| {
        let auth = format!("authorization: Bearer {token}");
        curl_i(&format!("{base}{p}"), &["-H", &auth])
    };
    // Every algorithm, each twice (the second from the verified-token cache).
    for alg in [
        "rs256", "rs384", "rs512", "ps256", "ps512", "es256", "es384", "eddsa",
    ] {
        for _ in 0..2 {
            let (status, text) = with("/open", t.get(alg));
            assert_eq!(status, 200, "{alg}: {text}");
            let text = text.to_ascii_lowercase();
            assert!(text.contains("x-jwt-sub: alice"), "{alg}: {text}");
            assert!(text.contains("x-jwt-team: core"), "{text}");
            assert!(
                !text.contains("authorization:"),
                "the token is not forwarded: {text}"
            );
        }
    }
    for (name, message) in [
        ("expired", "Jwt is expired"),
        ("not_yet", "Jwt not yet valid"),
        ("wrong_issuer", "Jwt issuer is not configured"),
        ("wrong_audience", "Audiences in Jwt are not allowed"),
        ("tampered", "Jwt verification fails"),
        ("other_key", "Jwt verification fails"),
        (
            "garbage",
            "Jwt is not in the form of Header.Payload.Signature",
        ),
    ] {
        let (status, text) = with("/open", t.get(name));
        assert_eq!(status, 401, "{name}: {text}");
        assert!(text.contains(message), "{name}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm="),
            "{text}"
        );
    }
    // Missing: allowed where no policy asks for a principal, refused where one does.
    assert_eq!(curl_i(&format!("{base}/open"), &[]).0, 200);
    assert_eq!(curl_i(&format!("{base}/secure"), &[]).0, 403);
    assert_eq!(with("/secure", t.get("rs256")).0, 200);
    assert_eq!(with("/secure", t.get("bob")).0, 403, "bob is not in ops");
    // Istio's second default location: the access_token query parameter.
    let q = format!("{base}/secure?access_token={}", t.get("es256"));
    assert_eq!(curl_i(&q, &[]).0, 200);
    // HTTP/2 clients go through the same checks.
    let (code, out) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_code}",
        &format!("{base}/secure"),
    ]);
    assert_eq!(code, 0);
    assert!(out.ends_with("RBAC: access denied\n403"), "{out}");
    assert_eq!(keel.listener_stat("jwt_denied"), 7);
    assert!(keel.listener_stat("jwt_allowed") >= 19);
}

#[test]
fn jwt_token_locations_and_outputs() {
    let t = Tokens::make("api");
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let config = proxy_yaml(admin, 1)
        + &ingress("default", &[(port, "HTTP", app.addr)])
        + &resource(
            "RequestAuthentication",
            "jwt",
            &format!(
                "  jwtRules:
  - issuer: {ISSUER}
    jwks: '{}'
    fromHeaders: [{{ name: x-token, prefix: \"Token \" }}]
    fromCookies: [session]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
",
                t.jwks
            ),
        );
    let _keel = Keel::start(&config, admin, &[]);
    let url = format!("http://127.0.0.1:{port}/x");
    let token = t.get("es256");
    let header = format!("x-token: Token {token}");
    let (status, text) = curl_i(&url, &["-H", &header]);
    assert_eq!(status, 200, "{text}");
    let text = text.to_ascii_lowercase();
    assert!(
        text.contains(&format!("x-token: token {}", token.to_ascii_lowercase())),
        "forwarded: {text}"
    );
    let payload = token.split('.').nth(1).unwrap().to_ascii_lowercase();
    assert!(
        text.contains(&format!("x-jwt-payload: {payload}")),
        "{text}"
    );
    // From a cookie; a bad token there is refused too.
    let cookie = format!("cookie: a=b; session={token}");
    assert_eq!(curl_i(&url, &["-H", &cookie]).0, 200);
    let bad = format!("cookie: session={}", t.get("tampered"));
    assert_eq!(curl_i(&url, &["-H", &bad]).0, 401);
    // The default locations are not looked at when others are configured.
    let bearer = format!("authorization: Bearer {}", t.get("tampered"));
    assert_eq!(curl_i(&url, &["-H", &bearer]).0, 200);
    // A header without the prefix is no token.
    let plain = format!("x-token: {}", t.get("tampered"));
    assert_eq!(curl_i(&url, &["-H", &plain]).0, 200);
}

/// A JWKS server on loopback that counts fetches and can be taken down.
struct JwksServer {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(jwks: String) -> JwksServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (f, d) = (fetches.clone(), down.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                if d.load(Ordering::SeqCst) {
                    // Down: the listener goes, and with it every later connect.
                    return;
                }
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                f.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                    jwks.len()
                );
            }
        });
        JwksServer {
            addr,
            fetches,
            down,
        }
    }

    fn take_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and closes the listener.
        let _ = TcpStream::connect(self.addr);
    }
}

fn prometheus_value(admin: u16, series: &str) -> u64 {
    let (_, text) = http_get(admin, "/stats/prometheus").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn jwks_uri_keeps_the_last_keys_when_its_server_goes_down() {
    let t = Tokens::make("api");
    let server = JwksServer::start(t.jwks.clone());
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let dead = free_port();
    let config = proxy_yaml(admin, 2)
        + &ingress("default", &[(port, "HTTP", app.addr)])
        + &format!(
            "---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: default
  annotations:
    jwt.keel.dev/jwks-refresh-interval: 200ms
spec:
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: http://{}/.well-known/jwks.json
    timeout: 1s
  - issuer: https://never-up.test
    jwksUri: http://127.0.0.1:{dead}/jwks
    timeout: 200ms
",
            server.addr
        );
    let keel = Keel::start(&config, admin, &[]);
    let url = format!("http://127.0.0.1:{port}/x");
    let auth = format!("authorization: Bearer {}", t.get("rs256"));
    assert_eq!(curl_i(&url, &["-H", &auth]).0, 200);
    assert!(server.fetches.load(Ordering::SeqCst) >= 1);
    // Refreshed on the interval while the server is up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.fetches.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.fetches.load(Ordering::SeqCst) >= 3, "refreshed");
    server.take_down();
    let failures = prometheus_value(admin, "keel_jwks_fetches_total{result=\"failure\"}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while prometheus_value(admin, "keel_jwks_fetches_total{result=\"failure\"}") < failures + 2
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        prometheus_value(admin, "keel_jwks_fetches_total{result=\"failure\"}") >= failures + 2,
        "refreshes fail once the server is down"
    );
    // The last keys fetched still verify: a new token (not cached) passes, a forged one does not.
    let es = format!("authorization: Bearer {}", t.get("es256"));
    assert_eq!(curl_i(&url, &["-H", &es]).0, 200);
    let forged = format!("authorization: Bearer {}", t.get("tampered"));
    assert_eq!(curl_i(&url, &["-H", &forged]).0, 401);
    assert!(keel.log_text().contains("JWKS refresh failed"));
    // A provider whose keys were never fetched refuses its tokens, saying why.
    let never = {
        let script = "import jwt,sys; print(jwt.encode({'iss':'https://never-up.test','sub':'x'}, 'k'*32, algorithm='HS256'))";
        let out = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (status, text) = curl_i(&url, &["-H", &format!("authorization: Bearer {never}")]);
    assert_eq!(status, 401);
    assert!(text.contains("Jwks remote fetch is failed"), "{text}");
}

#[test]
fn security_config_errors_name_the_field() {
    let admin = free_port();
    let dir = temp_dir("security-errors");
    let file = dir.join("keel.yaml");
    let config = proxy_yaml(admin, 1)
        + &resource(
            "AuthorizationPolicy",
            "custom",
            "  action: CUSTOM\n  provider: { name: ext }\n",
        )
        + &resource(
            "AuthorizationPolicy",
            "bad",
            "  rules:
  - to:
    - operation:
        ports: [\"http\"]
    when:
    - key: request.header[x]
      values: [a]
    - key: source.ip
      values: [\"10.0.0.0/40\"]
",
        )
        + &resource(
            "RequestAuthentication",
            "bad-jwt",
            "  jwtRules:
  - issuer: https://a
    jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'
  - issuer: https://b
  - issuer: https://c
    jwksUri: ftp://x/keys
",
        );
    std::fs::write(&file, config).unwrap();
    let (ok, out) = validate(&file);
    assert!(!ok, "{out}");
    for needle in [
        "spec.action: action CUSTOM",
        "spec.provider",
        "spec.rules[0].to[0].operation.ports[0]",
        "spec.rules[0].when[0].key",
        "did you mean `request.headers[<name>]`",
        "spec.rules[0].when[1].values[0]",
        "spec.jwtRules[0].jwks: invalid JWKS",
        "jwt.keel.dev/allow-hmac",
        "spec.jwtRules[1].jwks: jwks or jwksUri is required",
        "spec.jwtRules[2].jwksUri",
    ] {
        assert!(out.contains(needle), "missing {needle}:\n{out}");
    }
}

/// An egress HTTP port for `reviews` (endpoint `backend`), its Sidecar saying `outbound` (a
/// whole `outboundTrafficPolicy` line, or nothing), and `vs_annotations` on a VirtualService
/// with one route named `api`.
fn egress_config(
    admin: u16,
    port: u16,
    backend: SocketAddr,
    outbound: &str,
    vs_annotations: &str,
    workers: usize,
) -> String {
    let endpoint = format!(
        "  - {{ address: 127.0.0.1, ports: {{ http: {} }} }}\n",
        backend.port()
    );
    proxy_yaml(admin, workers)
        + &egress_service_with(
            port,
            "HTTP",
            "reviews",
            "{ name: reviews }",
            &endpoint,
            outbound,
        )
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  annotations:
{vs_annotations}
spec:
  hosts: [reviews]
  http:
  - name: api
    route: [{{ destination: {{ host: reviews }} }}]
"
        )
}

/// One GET for `host` on a keep-alive connection: (status, head).
fn get_host(s: &mut TcpStream, host: &str) -> (u16, String) {
    let req = format!("GET /r HTTP/1.1\r\nhost: {host}\r\n\r\n");
    let (status, head, _) = http_request(s, req.as_bytes());
    (status, head)
}

#[test]
fn local_rate_limit_is_accurate_over_time_and_shared_by_workers() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let annotation = "    ratelimit.keel.dev/local: |
      - routes: [api]
        maxTokens: 5
        tokensPerFill: 5
        fillInterval: 500ms
";
    let config = egress_config(admin, port, app.addr, "", annotation, 2);
    let keel = Keel::start(&config, admin, &[]);
    // Two connections (on different workers, most likely) draw from one bucket.
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut allowed, mut limited) = (0, 0);
    let started = Instant::now();
    let mut last_429 = String::new();
    while started.elapsed() < Duration::from_millis(2_600) {
        for s in [&mut a, &mut b] {
            let (status, head) = get_host(s, "reviews");
            match status {
                200 => {
                    allowed += 1;
                    assert!(head.contains("x-ratelimit-limit: 5"), "{head}");
                }
                429 => {
                    limited += 1;
                    last_429 = head;
                }
                other => panic!("status {other}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // 5 at once, then 5 per 500 ms: 2.6 s holds 5 (or 6) fills after the first burst (a fill
    // that lands while this client is held up by a busy machine is capped at the bucket's size).
    assert!((25..=35).contains(&allowed), "allowed {allowed}");
    assert!(limited > 100, "limited {limited}");
    assert!(last_429.contains("x-ratelimit-remaining: 0"), "{last_429}");
    assert!(last_429.contains("x-ratelimit-reset:"), "{last_429}");
    assert_eq!(keel.listener_stat("rate_limited"), limited);
}

#[test]
fn local_rate_limit_per_client_address() {
    let app = RecordingBackend::echo("app");
    let (admin, port) = (free_port(), free_port());
    let annotation = "    ratelimit.keel.dev/local: |
      - maxTokens: 2
        fillInterval: 1m
        perClient: true
";
    let config = egress_config(admin, port, app.addr, "", annotation, 1);
    let _keel = Keel::start(&config, admin, &[]);
    let from = |ip: &str| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let src: SocketAddr = format!("{ip}:0").parse().unwrap();
        s.bind(&src.into()).unwrap();
        let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        s.connect(&dst.into()).unwrap();
        TcpStream::from(s)
    };
    let mut one = from("127.0.0.1");
    let statuses: Vec<u16> = (0..3).map(|_| get_host(&mut one, "reviews").0).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let mut two = from("127.0.0.2");
    assert_eq!(
        get_host(&mut two, "reviews").0,
        200,
        "another client has its own bucket"
    );
    assert_eq!(get_host(&mut one, "reviews").0, 429);
}

#[test]
fn registry_only_refuses_unknown_hosts_and_allow_any_passes_them() {
    let app = RecordingBackend::echo("app");
    let other = RecordingBackend::echo("outside");
    let (admin, port) = (free_port(), free_port());
    let outbound = "  outboundTrafficPolicy: { mode: REGISTRY_ONLY }\n";
    let config = egress_config(admin, port, app.addr, outbound, "    {}", 1);
    let keel = Keel::start(&config, admin, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(get_host(&mut s, "reviews").0, 200);
    let unknown = format!("127.0.0.1:{}", other.addr.port());
    assert_eq!(get_host(&mut s, &unknown).0, 502);
    assert_eq!(get_host(&mut s, "unknown.example.com").0, 502);
    assert_eq!(keel.listener_stat("registry_only_refused"), 2);
    assert!(other.received_text().is_empty());
    drop(keel);

    // ALLOW_ANY (Istio's default, here by leaving the policy out): the request goes where its
    // authority says, by address or by name.
    let (admin, port) = (free_port(), free_port());
    let config = egress_config(admin, port, app.addr, "", "    {}", 1);
    let keel = Keel::start(&config, admin, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, head) = get_host(&mut s, &unknown);
    assert_eq!(status, 200);
    assert!(head.contains("x-backend: outside"), "{head}");
    let by_name = format!("localhost:{}", other.addr.port());
    let (status, head) = get_host(&mut s, &by_name);
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("x-backend: outside"), "{head}");
    assert!(other.received_text().contains(&format!("host: {by_name}")));
    // Known hosts still route by the registry.
    assert!(get_host(&mut s, "reviews").1.contains("x-backend: app"));
    // Not into Keel itself, and not to a name that does not resolve.
    assert_eq!(get_host(&mut s, &format!("127.0.0.1:{port}")).0, 502);
    assert_eq!(get_host(&mut s, "no-such-host.invalid").0, 503);
    assert_eq!(keel.listener_stat("registry_only_refused"), 0);
}

#[test]
fn a_reload_that_adds_a_jwks_uri_fetches_it_before_serving() {
    let t = Tokens::make("api");
    let server = JwksServer::start(t.jwks.clone());
    let app = RecordingBackend::echo("app");
    let (port, admin) = (free_port(), free_port());
    let base = proxy_yaml(admin, 1) + &ingress("default", &[(port, "HTTP", app.addr)]);
    let keel = Keel::start(&base, admin, &[]);
    let url = format!("http://127.0.0.1:{port}/x");
    let forged = format!("authorization: Bearer {}", t.get("tampered"));
    assert_eq!(
        curl_i(&url, &["-H", &forged]).0,
        200,
        "no policy yet: not looked at"
    );
    let with_jwt = base
        + &resource(
            "RequestAuthentication",
            "jwt",
            &format!(
                "  jwtRules:\n  - issuer: {ISSUER}\n    jwksUri: http://{}/keys\n",
                server.addr
            ),
        );
    keel.write_config(&with_jwt);
    keel.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while keel.stats()["config_reloads"]["success"].as_u64() != Some(1) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.fetches.load(Ordering::SeqCst),
        1,
        "fetched by the reload"
    );
    let good = format!("authorization: Bearer {}", t.get("eddsa"));
    assert_eq!(curl_i(&url, &["-H", &good]).0, 200);
    assert_eq!(curl_i(&url, &["-H", &forged]).0, 401);
}
