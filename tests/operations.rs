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

/// The container image's entry point, as its Dockerfile gives it, where the runtime's default
/// seccomp profile refuses io_uring (Docker's and containerd's return EPERM for the three
/// io_uring calls) and as the image's non-root user: Keel picks epoll, says so, serves, and the
/// image's health check command answers. No container engine runs here, so the test applies the
/// same restrictions to the process itself: a seccomp filter and (as root) uid/gid 65532.
#[test]
fn container_entrypoint_serves_without_io_uring_as_the_image_user() {
    let dockerfile =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/container/Dockerfile")).unwrap();
    let json_args = |directive: &str| -> Vec<String> {
        let line = dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(directive))
            .unwrap_or_else(|| panic!("no {directive} in the Dockerfile"));
        let list = &line[line.find('[').unwrap()..=line.rfind(']').unwrap()];
        serde_json::from_str(list).unwrap()
    };
    let entrypoint = json_args("ENTRYPOINT ");
    let healthcheck = json_args("HEALTHCHECK ");
    assert_eq!(entrypoint[0], "/usr/local/bin/keel");

    let (echo, _) = echo_backend();
    let (admin, port) = (free_port(), free_port());
    let dir = temp_dir("container");
    std::fs::write(dir.join("00-proxy.yaml"), proxy_yaml(admin, 1)).unwrap();
    std::fs::write(dir.join("10-sidecar.yaml"), ingress_yaml(port, echo, "")).unwrap();
    let args: Vec<String> = entrypoint[1..]
        .iter()
        .map(|a| {
            if a == "/etc/keel" {
                dir.to_string_lossy().into_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let as_image_user = unsafe { libc::geteuid() } == 0;
    let restricted = |program: &str, args: &[String]| {
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: between fork and exec the closure only makes prctl/setgid/setuid calls on a
        // filter built before the fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                refuse_io_uring()?;
                if as_image_user
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65532) != 0
                        || libc::setuid(65532) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    };
    let mut keel = restricted(env!("CARGO_BIN_EXE_keel"), &args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(admin, "/ready").map(|r| r.0).ok() != Some(200) {
        if std::time::Instant::now() > deadline || keel.try_wait().unwrap().is_some() {
            let _ = keel.kill();
            let out = keel.wait_with_output().unwrap();
            panic!("not ready: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, stats) = http_get(admin, "/stats").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["io_driver"], "epoll", "{stats}");
    echo_round_trip(
        &mut std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        b"inside the container",
    );
    let health: Vec<String> = healthcheck[healthcheck.iter().position(|a| a == "ready").unwrap()..]
        .iter()
        .map(|a| a.replace("127.0.0.1:15000", &format!("127.0.0.1:{admin}")))
        .collect();
    let probe = restricted(env!("CARGO_BIN_EXE_keel"), &health)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(probe.success(), "health check {health:?} failed");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(keel.id() as i32, libc::SIGTERM) };
    let out = keel.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    let ready = log
        .lines()
        .find(|l| l.contains("keel ready"))
        .unwrap_or_else(|| panic!("no ready line: {log}"));
    let ready: serde_json::Value = serde_json::from_str(ready).expect("JSON log lines");
    assert!(
        ready.to_string().contains("\"io_driver\":\"epoll\""),
        "the ready line says which driver runs: {ready}"
    );
}

/// Installs a seccomp filter returning EPERM for io_uring_setup, io_uring_enter and
/// io_uring_register (syscalls 425-427 on every Linux architecture), as container runtimes' default
/// profiles do; everything else is allowed.
fn refuse_io_uring() -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
    let filter = [
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(JGE_K, 425, 0, 2),
        jump(JGT_K, 427, 1, 0),
        stmt(RET_K, ERRNO_EPERM),
        stmt(RET_K, ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid, live filter program; no_new_privs first, as unprivileged
    // seccomp requires.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
