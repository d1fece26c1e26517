//! `keel init-iptables`: the istio-init step. Installs the netfilter rules that capture a pod's
//! (or VM's) TCP traffic for Keel — inbound to its inbound port, outbound to its outbound port,
//! Keel's own traffic (by uid / gid) left alone — and removes them again with `--cleanup`.
//!
//! The rules are written as one `iptables-restore --noflush` script per address family, so they
//! go in atomically and leave other tables' rules alone; the chains are Keel's own (`KEEL_*`),
//! so `--cleanup` removes exactly what was installed. Works with iptables-nft and
//! iptables-legacy (`--backend`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// How inbound traffic is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// nat REDIRECT (the original destination from SO_ORIGINAL_DST).
    Redirect,
    /// mangle TPROXY for inbound (the client's address is kept; Keel needs CAP_NET_ADMIN).
    Tproxy,
}

/// Which iptables implementation writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The system's `iptables` (whichever alternative it points at).
    Auto,
    Nft,
    Legacy,
}

/// `keel init-iptables` options, named after istio-iptables' own.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// REDIRECT (nat) or TPROXY (mangle, inbound only; outbound is always REDIRECT).
    #[arg(long, value_enum, default_value = "redirect")]
    pub mode: Mode,
    /// The port captured inbound connections are sent to (Proxy.spec.interception.inboundPort).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The port captured outbound connections are sent to (Proxy.spec.interception.outboundPort).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The user id Keel runs as: its own connections are never captured.
    #[arg(long, default_value = "1337")]
    pub proxy_uid: String,
    /// The group id Keel runs as (also exempt); empty for none.
    #[arg(long, default_value = "1337")]
    pub proxy_gid: String,
    /// Inbound ports to capture, comma-separated; `*` for all.
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured (ssh, Keel's admin and health ports).
    #[arg(long, default_value = "22,15000,15020,15021,15090")]
    pub exclude_inbound_ports: String,
    /// Outbound destinations (CIDRs) to capture, comma-separated; `*` for all, empty for none.
    #[arg(long, default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Outbound destinations (CIDRs) never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// Outbound ports captured whatever the CIDR lists say.
    #[arg(long, default_value = "")]
    pub include_outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Also install the rules for IPv6 (ip6tables).
    #[arg(long)]
    pub ipv6: bool,
    /// The TPROXY packet mark and routing table.
    #[arg(long, default_value_t = 1337)]
    pub tproxy_mark: u32,
    #[arg(long, default_value_t = 133)]
    pub tproxy_table: u32,
    /// iptables implementation.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Print the rules and commands instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove Keel's rules (and the TPROXY routing) instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

fn list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks every list option, so that a typo fails before anything is installed.
fn check(o: &Options) -> Result<(), String> {
    let port_list = |name: &str, v: &str, star: bool| -> Result<(), String> {
        for p in list(v) {
            if star && p == "*" {
                continue;
            }
            match p.parse::<u16>() {
                Ok(n) if n > 0 => {}
                _ => return Err(format!("--{name}: `{p}` is not a port")),
            }
        }
        Ok(())
    };
    port_list("include-inbound-ports", &o.include_inbound_ports, true)?;
    port_list("exclude-inbound-ports", &o.exclude_inbound_ports, false)?;
    port_list("include-outbound-ports", &o.include_outbound_ports, false)?;
    port_list("exclude-outbound-ports", &o.exclude_outbound_ports, false)?;
    let cidr_list = |name: &str, v: &str, star: bool| -> Result<(), String> {
        for c in list(v) {
            if star && c == "*" {
                continue;
            }
            let (ip, len) = c.split_once('/').unwrap_or((c, ""));
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("--{name}: `{c}` is not a CIDR"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if !len.is_empty() && len.parse::<u8>().map_or(true, |l| l > max) {
                return Err(format!("--{name}: `{c}` is not a CIDR"));
            }
        }
        Ok(())
    };
    cidr_list("include-outbound-cidrs", &o.include_outbound_cidrs, true)?;
    cidr_list("exclude-outbound-cidrs", &o.exclude_outbound_cidrs, false)?;
    for (name, v) in [("proxy-uid", &o.proxy_uid), ("proxy-gid", &o.proxy_gid)] {
        if list(v).iter().any(|id| id.parse::<u32>().is_err()) {
            return Err(format!(
                "--{name}: `{v}` is not a number (or list of numbers)"
            ));
        }
    }
    if o.proxy_uid.trim().is_empty() {
        return Err("--proxy-uid is required: Keel's own traffic must not be captured".into());
    }
    if o.inbound_port == o.outbound_port {
        return Err("--inbound-port and --outbound-port must differ".into());
    }
    Ok(())
}

/// The `iptables-restore --noflush` script for one address family.
fn rules(o: &Options, family: Family) -> String {
    let cidr_family = |c: &str| -> bool {
        let ip = c.split('/').next().unwrap_or(c);
        ip.parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_ipv4() == (family == Family::V4))
    };
    let lo = family.loopback();
    let mut s = String::new();
    let line = |s: &mut String, l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    if o.mode == Mode::Tproxy {
        line(&mut s, "*mangle".into());
        for c in ["KEEL_DIVERT", "KEEL_TPROXY", "KEEL_INBOUND"] {
            line(&mut s, format!(":{c} - [0:0]"));
        }
        let mark = o.tproxy_mark;
        line(
            &mut s,
            format!("-A KEEL_DIVERT -j MARK --set-xmark {mark:#x}/0xffffffff"),
        );
        line(&mut s, "-A KEEL_DIVERT -j ACCEPT".into());
        line(&mut s, format!("-A KEEL_TPROXY ! -d {lo} -p tcp -j TPROXY --on-port {} --tproxy-mark {mark:#x}/0xffffffff", o.inbound_port));
        line(&mut s, "-A PREROUTING -p tcp -j KEEL_INBOUND".into());
        // Loopback traffic is local (the app, or Keel reaching it): never inbound capture.
        line(&mut s, "-A KEEL_INBOUND -i lo -j RETURN".into());
        for p in list(&o.exclude_inbound_ports) {
            line(
                &mut s,
                format!("-A KEEL_INBOUND -p tcp --dport {p} -j RETURN"),
            );
        }
        line(
            &mut s,
            "-A KEEL_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j KEEL_DIVERT"
                .into(),
        );
        capture_inbound(&mut s, o, "KEEL_TPROXY");
        line(&mut s, "COMMIT".into());
    }
    line(&mut s, "*nat".into());
    for c in [
        "KEEL_INBOUND",
        "KEEL_REDIRECT",
        "KEEL_IN_REDIRECT",
        "KEEL_OUTPUT",
    ] {
        line(&mut s, format!(":{c} - [0:0]"));
    }
    line(
        &mut s,
        format!(
            "-A KEEL_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            o.outbound_port
        ),
    );
    line(
        &mut s,
        format!(
            "-A KEEL_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            o.inbound_port
        ),
    );
    if o.mode == Mode::Redirect {
        line(&mut s, "-A PREROUTING -p tcp -j KEEL_INBOUND".into());
        for p in list(&o.exclude_inbound_ports) {
            line(
                &mut s,
                format!("-A KEEL_INBOUND -p tcp --dport {p} -j RETURN"),
            );
        }
        capture_inbound(&mut s, o, "KEEL_IN_REDIRECT");
    }
    line(&mut s, "-A OUTPUT -p tcp -j KEEL_OUTPUT".into());
    if family == Family::V4 {
        // Keel's inbound passthrough connects from 127.0.0.6: never captured again.
        line(
            &mut s,
            "-A KEEL_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into(),
        );
    }
    // Keel's own connections (by uid, then gid) go where they are sent — except, as in Istio, one
    // to this pod's own address over lo (a service whose endpoint is this pod), which goes through
    // the inbound side so that inbound policy applies to it too. The app's own traffic over lo is
    // not mesh traffic.
    for (flag, ids) in [("--uid-owner", &o.proxy_uid), ("--gid-owner", &o.proxy_gid)] {
        for id in list(ids) {
            // With TPROXY the inbound port takes only TPROXY'd connections: no hairpin.
            if family == Family::V4 && o.mode == Mode::Redirect {
                let hairpin = format!(
                    "-A KEEL_OUTPUT -o lo ! -d {lo} -m owner {flag} {id} -j KEEL_IN_REDIRECT"
                );
                line(&mut s, hairpin);
                line(
                    &mut s,
                    format!("-A KEEL_OUTPUT -o lo -m owner ! {flag} {id} -j RETURN"),
                );
            }
            line(
                &mut s,
                format!("-A KEEL_OUTPUT -m owner {flag} {id} -j RETURN"),
            );
        }
    }
    line(&mut s, "-A KEEL_OUTPUT -o lo -j RETURN".into());
    line(&mut s, format!("-A KEEL_OUTPUT -d {lo} -j RETURN"));
    for p in list(&o.exclude_outbound_ports) {
        line(
            &mut s,
            format!("-A KEEL_OUTPUT -p tcp --dport {p} -j RETURN"),
        );
    }
    for p in list(&o.include_outbound_ports) {
        line(
            &mut s,
            format!("-A KEEL_OUTPUT -p tcp --dport {p} -j KEEL_REDIRECT"),
        );
    }
    for c in list(&o.exclude_outbound_cidrs)
        .into_iter()
        .filter(|c| cidr_family(c))
    {
        line(&mut s, format!("-A KEEL_OUTPUT -d {c} -j RETURN"));
    }
    let include = list(&o.include_outbound_cidrs);
    if include.contains(&"*") {
        line(&mut s, "-A KEEL_OUTPUT -j KEEL_REDIRECT".into());
    } else {
        for c in include.into_iter().filter(|c| cidr_family(c)) {
            line(&mut s, format!("-A KEEL_OUTPUT -d {c} -j KEEL_REDIRECT"));
        }
    }
    line(&mut s, "COMMIT".into());
    s
}

/// The jumps that capture inbound ports (all, or those listed) into `chain`.
fn capture_inbound(s: &mut String, o: &Options, chain: &str) {
    let include = list(&o.include_inbound_ports);
    if include.contains(&"*") {
        let _ = writeln!(s, "-A KEEL_INBOUND -p tcp -j {chain}");
    } else {
        for p in include {
            let _ = writeln!(s, "-A KEEL_INBOUND -p tcp --dport {p} -j {chain}");
        }
    }
}

/// The `ip rule` / `ip route` commands TPROXY needs: marked packets are delivered locally.
fn tproxy_routing(o: &Options, family: Family, add: bool) -> Vec<Vec<String>> {
    if o.mode != Mode::Tproxy {
        return Vec::new();
    }
    let f = if family == Family::V4 { "-4" } else { "-6" };
    let verb = if add { "add" } else { "del" };
    let (mark, table) = (o.tproxy_mark.to_string(), o.tproxy_table.to_string());
    vec![
        ["ip", f, "rule", verb, "fwmark", &mark, "lookup", &table]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        [
            "ip", f, "route", verb, "local", "default", "dev", "lo", "table", &table,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ]
}

fn binary(o: &Options, family: Family, tool: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let backend = match o.backend {
        Backend::Auto => String::new(),
        Backend::Nft => "-nft".into(),
        Backend::Legacy => "-legacy".into(),
    };
    format!("{base}{backend}{tool}")
}

/// The commands that remove Keel's jumps and chains (each may fail harmlessly when absent).
fn cleanup_commands(o: &Options, family: Family) -> Vec<Vec<String>> {
    let ipt = binary(o, family, "");
    let mut out = Vec::new();
    let cmd = |args: &[&str]| -> Vec<String> {
        // -w: wait for the xtables lock (one per host, whichever namespace) instead of failing.
        [ipt.clone(), "-w".to_string()]
            .into_iter()
            .chain(args.iter().map(|s| s.to_string()))
            .collect()
    };
    out.push(cmd(&[
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-p",
        "tcp",
        "-j",
        "KEEL_INBOUND",
    ]));
    out.push(cmd(&[
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "KEEL_OUTPUT",
    ]));
    out.push(cmd(&[
        "-t",
        "mangle",
        "-D",
        "PREROUTING",
        "-p",
        "tcp",
        "-j",
        "KEEL_INBOUND",
    ]));
    // Every chain emptied before any is deleted: they jump to one another.
    let nat = [
        "KEEL_INBOUND",
        "KEEL_REDIRECT",
        "KEEL_IN_REDIRECT",
        "KEEL_OUTPUT",
    ];
    let mangle = ["KEEL_INBOUND", "KEEL_DIVERT", "KEEL_TPROXY"];
    for verb in ["-F", "-X"] {
        for c in nat {
            out.push(cmd(&["-t", "nat", verb, c]));
        }
        for c in mangle {
            out.push(cmd(&["-t", "mangle", verb, c]));
        }
    }
    let tproxy = Options {
        mode: Mode::Tproxy,
        ..o.clone()
    };
    out.extend(tproxy_routing(&tproxy, family, false));
    out
}

fn run(args: &[String], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", args[0]))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `keel init-iptables`; the text printed (dry run, or what was done) is returned.
pub fn main(o: &Options) -> Result<String, String> {
    check(o)?;
    let families: Vec<Family> = if o.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    };
    let mut report = String::new();
    if o.cleanup {
        for &f in &families {
            for c in cleanup_commands(o, f) {
                if o.dry_run {
                    let _ = writeln!(report, "{}", c.join(" "));
                } else {
                    // Absent rules and chains are what cleanup wants: their errors are not failures.
                    let _ = run(&c, None);
                }
            }
        }
        if !o.dry_run {
            report.push_str("keel: interception rules removed\n");
        }
        return Ok(report);
    }
    for &f in &families {
        let script = rules(o, f);
        let restore = vec![
            binary(o, f, "-restore"),
            "--noflush".to_string(),
            "-w".to_string(),
            "10".to_string(),
        ];
        let routing = tproxy_routing(o, f, true);
        if o.dry_run {
            let _ = writeln!(report, "# {} <<EOF", restore.join(" "));
            report.push_str(&script);
            report.push_str("# EOF\n");
            for r in &routing {
                let _ = writeln!(report, "{}", r.join(" "));
            }
            continue;
        }
        // Installed twice, the jumps would be doubled: start from a clean slate.
        for c in cleanup_commands(o, f) {
            let _ = run(&c, None);
        }
        run(&restore, Some(&script))?;
        for r in &routing {
            run(r, None)?;
        }
    }
    if !o.dry_run {
        let _ = writeln!(
            report,
            "keel: capturing {} traffic: inbound to :{}, outbound to :{} (uid {} exempt)",
            match o.mode {
                Mode::Redirect => "REDIRECT",
                Mode::Tproxy => "TPROXY",
            },
            o.inbound_port,
            o.outbound_port,
            o.proxy_uid
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        o: Options,
    }

    fn opts(args: &[&str]) -> Options {
        T::parse_from(std::iter::once("t").chain(args.iter().copied())).o
    }

    #[test]
    fn redirect_rules_capture_both_ways_and_exempt_the_proxy() {
        let r = rules(&opts(&[]), Family::V4);
        assert!(r.contains("-A KEEL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(r.contains("-A KEEL_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(r.contains("-A KEEL_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        // Istio's loopback handling: 127.0.0.6 passes, Keel to its own pod goes inbound, the app's
        // own loopback traffic passes.
        assert!(r.contains("-A KEEL_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"));
        assert!(r.contains(
            "-A KEEL_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j KEEL_IN_REDIRECT"
        ));
        assert!(r.contains("-A KEEL_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN"));
        assert!(r.contains("-A KEEL_INBOUND -p tcp --dport 22 -j RETURN"));
        assert!(r.contains("-A KEEL_INBOUND -p tcp -j KEEL_IN_REDIRECT"));
        assert!(r.contains("-A KEEL_OUTPUT -j KEEL_REDIRECT"));
        assert!(!r.contains("*mangle"));
        // The exemptions come before the catch-all.
        let uid = r.find("--uid-owner").unwrap();
        assert!(uid < r.find("-A KEEL_OUTPUT -j KEEL_REDIRECT").unwrap());
    }

    #[test]
    fn include_and_exclude_lists() {
        let o = opts(&[
            "--include-inbound-ports",
            "8080,9090",
            "--include-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--exclude-outbound-cidrs",
            "10.1.0.0/16",
            "--exclude-outbound-ports",
            "5432",
        ]);
        let r = rules(&o, Family::V4);
        assert!(r.contains("-A KEEL_INBOUND -p tcp --dport 8080 -j KEEL_IN_REDIRECT"));
        assert!(!r.contains("-A KEEL_INBOUND -p tcp -j KEEL_IN_REDIRECT"));
        assert!(r.contains("-A KEEL_OUTPUT -d 10.1.0.0/16 -j RETURN"));
        assert!(r.contains("-A KEEL_OUTPUT -d 10.0.0.0/8 -j KEEL_REDIRECT"));
        assert!(!r.contains("fd00::/8"));
        assert!(r.contains("-A KEEL_OUTPUT -p tcp --dport 5432 -j RETURN"));
        assert!(!r.contains("-A KEEL_OUTPUT -j KEEL_REDIRECT"));
        let r6 = rules(&o, Family::V6);
        assert!(r6.contains("-A KEEL_OUTPUT -d fd00::/8 -j KEEL_REDIRECT"));
        assert!(r6.contains("-A KEEL_OUTPUT -d ::1/128 -j RETURN"));
    }

    #[test]
    fn tproxy_marks_and_routes_inbound() {
        let o = opts(&["--mode", "tproxy"]);
        let r = rules(&o, Family::V4);
        assert!(r.starts_with("*mangle\n"));
        assert!(r.contains("-j TPROXY --on-port 15006 --tproxy-mark 0x539/0xffffffff"));
        assert!(r.contains("-A KEEL_INBOUND -i lo -j RETURN"));
        // Outbound is still nat REDIRECT; inbound is not redirected by nat.
        assert!(r.contains("-A KEEL_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(!r.contains("-A PREROUTING -p tcp -j KEEL_INBOUND\n-A KEEL_INBOUND -p tcp --dport 22 -j RETURN\n-A KEEL_INBOUND -p tcp -j KEEL_IN_REDIRECT"));
        let routing = tproxy_routing(&o, Family::V4, true);
        assert_eq!(
            routing[0].join(" "),
            "ip -4 rule add fwmark 1337 lookup 133"
        );
        assert_eq!(
            routing[1].join(" "),
            "ip -4 route add local default dev lo table 133"
        );
    }

    #[test]
    fn bad_lists_are_refused_before_anything_runs() {
        assert!(check(&opts(&["--exclude-inbound-ports", "22,ssh"])).is_err());
        assert!(check(&opts(&["--include-outbound-cidrs", "10.0.0.0/33"])).is_err());
        assert!(check(&opts(&["--proxy-uid", "keel"])).is_err());
        assert!(check(&opts(&["--inbound-port", "15001"])).is_err());
        assert!(check(&opts(&[])).is_ok());
    }

    #[test]
    fn backends_pick_the_binary() {
        let o = opts(&["--backend", "legacy"]);
        assert_eq!(
            binary(&o, Family::V6, "-restore"),
            "ip6tables-legacy-restore"
        );
        assert_eq!(binary(&opts(&[]), Family::V4, ""), "iptables");
    }
}
