//! `keel`: a thread-per-core service-mesh sidecar proxy configured with Istio's YAML resources.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use keel_io::DriverChoice;

mod init_iptables;

#[derive(Parser)]
#[command(
    name = "keel",
    about = "A thread-per-core service-mesh sidecar proxy driven by Istio YAML",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: SIGHUP or a config file change reloads, SIGTERM drains and exits, SIGINT
    /// exits at once, SIGUSR2 starts the binary again to take over (with --upgrade-socket).
    Run {
        /// A YAML file (documents separated by ---) or a directory of *.yaml / *.yml files.
        #[arg(short, long)]
        config: PathBuf,
        /// Worker threads, one runtime per core; overrides Proxy.spec.workers (0 = one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// io driver: io_uring when the kernel and sandbox allow it, else epoll.
        #[arg(long, value_enum, default_value = "auto")]
        io_driver: Driver,
        /// Log level: error, warn, info, debug, trace (or a tracing filter such as keel_core=debug).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// How long open connections may finish after SIGTERM — and outbound listeners keep serving
        /// the app — before the process exits (e.g. 5s, 500ms, 1m).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// How bytes move between sockets: splice (zero-copy through a pipe) or copy (user-space buffer).
        #[arg(long, value_enum, default_value = "splice")]
        forwarding: ForwardingArg,
        /// Do not watch the config files; reload only on SIGHUP.
        #[arg(long)]
        no_watch: bool,
        /// Take over the listening sockets of the keel serving this upgrade socket, then have it
        /// drain and exit (zero-downtime binary upgrade).
        #[arg(long, value_name = "SOCKET")]
        upgrade_from: Option<PathBuf>,
        /// Offer this process's listening sockets to a successor on this Unix socket; SIGUSR2
        /// starts the binary again with --upgrade-from it.
        #[arg(long, value_name = "SOCKET")]
        upgrade_socket: Option<PathBuf>,
    },
    /// Parse, validate and compile a config; print every error and exit non-zero on any.
    Validate {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Exit 0 when the keel whose admin listens at ADDR is ready (GET /ready answers 200), else 1:
    /// an exec probe for Kubernetes and container health checks, needing no curl in the image.
    Ready {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// Install the netfilter rules that capture this pod's (or VM's) TCP traffic for Keel, as
    /// istio-init does; run as root (or with CAP_NET_ADMIN) before Keel starts.
    InitIptables(init_iptables::Options),
    /// Print the version.
    Version,
}

/// `keel ready`: one GET /ready to the admin listener, with short timeouts.
fn probe_ready(admin: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)
        .map_err(|e| format!("{admin}: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{admin}: {e}"))?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("no answer");
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("{admin}: {status}"))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Driver {
    Auto,
    Uring,
    Epoll,
}

#[derive(Clone, Copy, ValueEnum)]
enum ForwardingArg {
    Splice,
    Copy,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    keel_config::duration::parse(s)
}

/// The log filter for `level`, with rustls held to errors unless the filter names it. rustls
/// logs what a peer did wrong at warn — an IP address as SNI (wrk sends one), a warning alert, an
/// unexpected message — once per connection and unthrottled, so any client could make Keel write
/// a line per connection. Keel counts and logs those failures itself, rate-limited
/// (`tls_handshake_errors`); rustls's own lines come back with e.g. `info,rustls=debug`.
fn log_filter(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

fn init_logging(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(level))
        .map_err(|e| format!("invalid --log-level `{level}`: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    // The admin API's `POST /logging?level=` swaps the filter at run time.
    let result = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            log_level_control(builder.reload_handle());
            builder.try_init()
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            log_level_control(builder.reload_handle());
            builder.try_init()
        }
    };
    result.map_err(|e| format!("cannot start logging: {e}"))
}

/// Hands the admin API a way to change the log filter.
fn log_level_control<S: 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) {
    keel_core::admin::set_log_level_control(Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(log_filter(level))
            .map_err(|e| format!("invalid level `{level}`: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log level: {e}"))
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ready { admin } => match probe_ready(admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel: not ready: {e}");
                ExitCode::FAILURE
            }
        },
        Command::InitIptables(o) => match init_iptables::main(&o) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keel init-iptables: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("keel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Validate { config } => match keel_core::config::load(&config) {
            Ok((s, _)) => {
                println!(
                    "{}: valid: {} listeners, {} clusters, version {}",
                    config.display(),
                    s.listeners.len(),
                    s.clusters.len(),
                    s.version
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!("{}: invalid: {} error(s)", config.display(), errors.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            workers,
            io_driver,
            log_level,
            log_format,
            drain_timeout,
            forwarding,
            no_watch,
            upgrade_from,
            upgrade_socket,
        } => {
            if let Err(e) = init_logging(&log_level, log_format) {
                eprintln!("keel: {e}");
                return ExitCode::FAILURE;
            }
            let driver = match io_driver {
                Driver::Auto => DriverChoice::Auto,
                Driver::Uring => DriverChoice::Uring,
                Driver::Epoll => DriverChoice::Epoll,
            };
            let forwarding = match forwarding {
                ForwardingArg::Splice => keel_io::Forwarding::Splice,
                ForwardingArg::Copy => keel_io::Forwarding::Copy,
            };
            let opts = keel_core::RunOptions {
                config,
                workers,
                driver,
                drain_timeout,
                forwarding,
                watch: !no_watch,
                upgrade_from,
                upgrade_socket,
                argv: std::env::args_os().collect(),
            };
            match keel_core::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(keel_core::StartError::Config(errors)) => {
                    for e in &errors.0 {
                        tracing::error!("{e}");
                    }
                    tracing::error!("invalid config: {} error(s); not started", errors.0.len());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!("not started: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn rustls_is_held_to_errors_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,rustls=error");
        assert_eq!(
            log_filter("keel_core=debug,warn"),
            "keel_core=debug,warn,rustls=error"
        );
        assert_eq!(log_filter("info,rustls=debug"), "info,rustls=debug");
        // Every result is a filter tracing takes.
        for level in [
            "error",
            "warn",
            "info",
            "debug",
            "trace",
            "keel_core=trace,info",
        ] {
            assert!(tracing_subscriber::EnvFilter::try_new(log_filter(level)).is_ok());
        }
    }
}
