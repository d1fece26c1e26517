//! Running Keel as a service: the install script, the systemd unit and its readiness protocol,
//! the `keel ready` probe, and the Kubernetes example's config.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn install_script_stages_binary_unit_docs_and_a_valid_config() {
    let dest = temp_dir("install");
    let out = Command::new(Path::new(ROOT).join("scripts/install.sh"))
        .args([
            "--destdir",
            dest.to_str().unwrap(),
            "--binary",
            env!("CARGO_BIN_EXE_keel"),
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("valid:"),
        "the staged config is validated: {text}"
    );
    for f in [
        "usr/local/bin/keel",
        "usr/local/share/doc/keel/operations.md",
        "etc/keel/00-proxy.yaml",
        "etc/keel/10-sidecar.yaml",
        "etc/systemd/system/keel.service",
    ] {
        assert!(dest.join(f).is_file(), "{f} missing");
    }
    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/keel.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/keel run -c /etc/keel",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitMEMLOCK=infinity",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(line), "unit lacks {line}:\n{unit}");
    }
    assert!(
        !unit.contains("@BINDIR@") && !unit.contains("@CONFDIR@") && !unit.contains("@DOCDIR@"),
        "placeholders left:\n{unit}"
    );
    // A second run keeps the operator's config.
    std::fs::write(dest.join("etc/keel/10-sidecar.yaml"), "# mine\n").unwrap();
    let again = Command::new(Path::new(ROOT).join("scripts/install.sh"))
        .args([
            "--destdir",
            dest.to_str().unwrap(),
            "--binary",
            env!("CARGO_BIN_EXE_keel"),
            "--no-systemd",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept the existing config"));
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/keel/10-sidecar.yaml")).unwrap(),
        "# mine\n"
    );
}

/// systemd's own checker accepts the unit, when systemd-analyze is installed.
#[test]
fn systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("systemd-analyze not installed; skipped");
        return;
    }
    let dir = temp_dir("unit");
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/keel.service"))
        .unwrap()
        .replace(
            "@BINDIR@",
            Path::new(env!("CARGO_BIN_EXE_keel"))
                .parent()
                .unwrap()
                .to_str()
                .unwrap(),
        )
        .replace(
            "@CONFDIR@",
            &format!("{ROOT}/deploy/kubernetes/keel-config"),
        )
        .replace("@DOCDIR@", &format!("{ROOT}/docs"));
    let path = dir.join("keel.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("keel.service"),
        "{text}"
    );
}

/// Type=notify: READY=1 once serving, RELOADING=1 then READY=1 around a reload, STOPPING=1 on SIGTERM.
#[test]
fn tells_systemd_ready_reloading_and_stopping() {
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let config = format!("{}{}", proxy_yaml(admin, 1), ingress_yaml(port, echo, ""));
    let cfg = dir.join("keel.yaml");
    std::fs::write(&cfg, &config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--no-watch", "-c"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("no notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    assert_eq!(
        http_get(admin, "/ready").unwrap().0,
        200,
        "ready means ready"
    );
    std::fs::write(
        &cfg,
        config.replace("connectTimeout", "connectTimeout: 2s #"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn ready_probe_reflects_the_admin_ready_endpoint() {
    let probe = |admin: u16| {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["ready", "--admin", &format!("127.0.0.1:{admin}")])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let nobody = free_port();
    assert!(!probe(nobody), "nothing listens there");
    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let keel = Keel::start(
        &format!("{}{}", proxy_yaml(admin, 1), ingress_yaml(port, echo, "")),
        admin,
        &[],
    );
    assert!(probe(admin));
    keel.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!probe(admin), "draining is not ready");
}

/// The Kubernetes examples' configs (plain, and with captured traffic) are valid, and each
/// kustomization ships every file of its config.
#[test]
fn kubernetes_example_config_is_valid_and_complete() {
    for example in ["deploy/kubernetes", "deploy/kubernetes/captured"] {
        kubernetes_example(example);
    }
}

fn kubernetes_example(example: &str) {
    let dir = Path::new(ROOT).join(example).join("keel-config");
    let (ok, out) = validate(&dir);
    assert!(ok, "{example}: {out}");
    let kustomization =
        std::fs::read_to_string(Path::new(ROOT).join(example).join("kustomization.yaml")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            kustomization.contains(&format!("keel-config/{name}")),
            "{name} not in kustomization.yaml"
        );
    }
    let dockerfile =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/container/Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER 65532") && dockerfile.contains("\"ready\""));
}
