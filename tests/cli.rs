//! The `keel` command line: validate, version, and refusing to start on bad config or a busy port.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = temp_dir("cli");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const SIDECAR: &str = "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: 18080, protocol: TCP }
    defaultEndpoint: 127.0.0.1:8080
";

/// Each class of config error: exit non-zero, and the message names file, line, column and field.
#[test]
fn validate_reports_each_error_class_with_location() {
    let proxy = proxy_yaml(15999, 1);
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed YAML", format!("{proxy}  admin: [oops\n"), "YAML syntax error"),
        ("unknown kind", format!("{proxy}---\napiVersion: networking.istio.io/v1\nkind: Sidecarr\nmetadata: {{name: x}}\nspec: {{}}\n"), ": kind: unknown kind `Sidecarr` (did you mean `Sidecar`?)"),
        ("missing Proxy", SIDECAR.to_string(), "no `Proxy` resource"),
        ("unknown field", format!("{proxy}{}", SIDECAR.replace("defaultEndpoint", "defaultEndpont")), "spec.ingress[0].defaultEndpont: unknown field"),
        ("duplicate listener ports", format!("{proxy}{SIDECAR}  - port: {{ number: 18080, protocol: TCP }}\n    defaultEndpoint: 127.0.0.1:8081\n"), "spec.ingress[1].port.number: port 18080 is already used"),
        ("unresolvable address", format!("{proxy}{}", SIDECAR.replace("127.0.0.1:8080", "app:8080")), "spec.ingress[0].defaultEndpoint: `app:8080` is not an IP:port address"),
        ("not supported yet", format!("{proxy}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: x}}\nspec: {{hosts: [a.example.com], exportTo: [.], ports: [{{number: 80, protocol: HTTP}}], resolution: STATIC, endpoints: [{{address: 10.0.0.2}}]}}\n"), "spec.exportTo: field `spec.exportTo` is not supported yet"),
    ];
    for (what, text, expect) in cases {
        let path = write_config("bad.yaml", &text);
        let (ok, out) = validate(&path);
        assert!(!ok, "{what}: accepted");
        assert!(
            out.contains(expect),
            "{what}: expected {expect:?} in:\n{out}"
        );
        let located = out.lines().next().unwrap_or_default();
        let prefix = format!("{}:", path.display());
        assert!(
            located.starts_with(&prefix),
            "{what}: no file in {located:?}"
        );
        if what != "missing Proxy" {
            let rest = &located[prefix.len()..];
            let mut nums = rest.split(':').take(2).map(|n| n.parse::<usize>());
            assert!(
                matches!((nums.next(), nums.next()), (Some(Ok(l)), Some(Ok(c))) if l > 0 && c > 0),
                "{what}: no line:col in {located:?}"
            );
        }
    }
}

#[test]
fn validate_accepts_the_examples() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, out) = validate(&path);
            assert!(ok, "{}: {out}", path.display());
        }
    }
}

#[test]
fn version_prints() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("keel "));
}

/// Invalid config: `run` exits non-zero at once and binds nothing.
#[test]
fn run_refuses_invalid_config_without_starting() {
    let (admin, port) = (free_port(), free_port());
    let config = format!(
        "{}{}",
        proxy_yaml(admin, 1),
        SIDECAR
            .replace("18080", &port.to_string())
            .replace("protocol: TCP", "protocol: TPC")
    );
    let mut keel = Keel::spawn(&config, admin, &[]);
    let status = keel
        .wait_exit(Duration::from_secs(5))
        .expect("still running");
    assert!(!status.success());
    let log = keel.log_text();
    assert!(
        log.contains("spec.ingress[0].port.protocol: unknown protocol `TPC` (did you mean `TCP`?)"),
        "{log}"
    );
    assert!(
        TcpListener::bind(("127.0.0.1", admin)).is_ok(),
        "admin port left bound"
    );
}

/// A listener port already in use: a clear error, exit non-zero, nothing half-started.
#[test]
fn run_refuses_a_port_in_use() {
    let busy = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let admin = free_port();
    let config = format!(
        "{}{}",
        proxy_yaml(admin, 2),
        SIDECAR.replace("18080", &port.to_string())
    );
    let mut keel = Keel::spawn(&config, admin, &[]);
    let status = keel
        .wait_exit(Duration::from_secs(5))
        .expect("still running");
    assert!(!status.success());
    let log = keel.log_text();
    assert!(
        log.contains(&format!("cannot bind 0.0.0.0:{port}")) && log.contains("in use"),
        "{log}"
    );
    drop(keel);
    assert!(
        TcpListener::bind(("127.0.0.1", admin)).is_ok(),
        "admin port left bound"
    );
}

/// `--io-driver uring` where io_uring is refused fails loudly instead of falling back.
#[test]
fn forced_epoll_via_environment_refuses_uring() {
    let admin = free_port();
    let config = format!(
        "{}{}",
        proxy_yaml(admin, 1),
        SIDECAR.replace("18080", &free_port().to_string())
    );
    let dir = temp_dir("env");
    let path = dir.join("k.yaml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--io-driver", "uring", "-c"])
        .arg(&path)
        .env("MONOIO_FORCE_LEGACY_DRIVER", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("io_uring is not available"));
}

/// A config directory, as a Kubernetes ConfigMap mount lays it out, runs.
#[test]
fn runs_from_a_config_directory() {
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let dir = temp_dir("dir");
    std::fs::write(dir.join("00-proxy.yaml"), proxy_yaml(admin, 1)).unwrap();
    std::fs::write(
        dir.join("10-sidecar.yml"),
        ingress_yaml(port, echo, "connectTimeout: 1s"),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--log-format", "json", "-c"])
        .arg(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(admin, "/ready").map(|r| r.0).ok() != Some(200) {
        assert!(std::time::Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    echo_round_trip(
        &mut std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        b"from a directory",
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let first: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap()).expect("JSON log lines");
    assert_eq!(first["message"], "keel ready");
}
