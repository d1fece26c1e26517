//! `handshake-load`: the load generator of compare.sh's `tls-handshake` workload — one request per
//! connection, each connection a full TLS 1.3 handshake.
//!
//! Why not wrk: wrk reconnects with `SSL_clear`, which keeps the OpenSSL session, so every
//! handshake after a connection's first resumes from the server's session ticket (PSK with
//! X25519, no certificate and no signature). Measured on nginx's `$ssl_session_reused`: 1,973 of
//! 1,977 handshakes in a second were resumptions. The workload is defined as full handshakes; this
//! client never resumes (rustls with resumption disabled keeps no tickets and offers no PSK).
//!
//! What it does per connection, on `-c` threads until `-d` seconds have passed: connect, the
//! handshake (X25519 offered first and TLS 1.3 only, as wrk's OpenSSL does; the server's
//! CertificateVerify signature is checked, its chain is not, as wrk checks none), `GET PATH` with
//! `Connection: close`, the response read to the end. `http://` URLs do the same without TLS (the
//! plaintext reference row).
//!
//! Output: the lines of wrk's report that compare.sh reads (`N requests in`, `Requests/sec:`,
//! the 50% and 99% latency lines, `Non-2xx or 3xx responses:` and `Socket errors:` when there are
//! any). Only complete 2xx/3xx responses count as requests.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = match Settings::parse(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("handshake-load: {e}");
            eprintln!("usage: handshake-load [-c CONNECTIONS] [-d SECONDS] http[s]://IP:PORT/PATH");
            std::process::exit(2);
        }
    };
    let report = run(&settings);
    print!("{}", report.render(settings.duration));
}

/// What to load and for how long.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    connections: usize,
    duration: Duration,
    tls: bool,
    addr: SocketAddr,
    /// `host:port` as written in the URL: the Host header.
    authority: String,
    path: String,
}

impl Settings {
    fn parse(args: &[String]) -> Result<Settings, String> {
        let mut connections = 16;
        let mut duration = Duration::from_secs(10);
        let mut url = None;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "-c" => {
                    let v = it.next().ok_or("-c needs a value")?;
                    connections = v
                        .parse()
                        .ok()
                        .filter(|&c| c > 0)
                        .ok_or(format!("-c: not a positive number: {v}"))?;
                }
                "-d" => {
                    let v = it.next().ok_or("-d needs a value")?;
                    let secs: f64 = v
                        .trim_end_matches('s')
                        .parse()
                        .ok()
                        .filter(|&s: &f64| s > 0.0 && s.is_finite())
                        .ok_or(format!("-d: not a positive number of seconds: {v}"))?;
                    duration = Duration::from_secs_f64(secs);
                }
                other if url.is_none() && !other.starts_with('-') => url = Some(other.to_string()),
                other => return Err(format!("unexpected argument `{other}`")),
            }
        }
        let url = url.ok_or("no URL")?;
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}`: only http:// and https:// URLs"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .map_err(|_| format!("`{authority}`: the URL's host must be IP:PORT"))?;
        Ok(Settings {
            connections,
            duration,
            tls,
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// What every connection thread counted.
#[derive(Debug, Default)]
struct Report {
    /// Latency of each complete 2xx/3xx exchange, connect to last byte, in microseconds.
    latencies_us: Vec<u64>,
    bytes: u64,
    non_2xx_3xx: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
}

impl Report {
    fn add(&mut self, other: Report) {
        self.latencies_us.extend(other.latencies_us);
        self.bytes += other.bytes;
        self.non_2xx_3xx += other.non_2xx_3xx;
        self.connect_errors += other.connect_errors;
        self.read_errors += other.read_errors;
        self.write_errors += other.write_errors;
    }

    /// wrk's report lines, as far as compare.sh reads them.
    fn render(mut self, duration: Duration) -> String {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        let secs = duration.as_secs_f64();
        let mut out = format!(
            "  {n} requests in {secs:.2}s, {:.2}MB read\n",
            self.bytes as f64 / 1048576.0
        );
        out.push_str("  Latency Distribution\n");
        for p in [50, 75, 90, 99] {
            out.push_str(&format!(
                "     {p}%  {}\n",
                wrk_time(percentile(&self.latencies_us, p))
            ));
        }
        if self.non_2xx_3xx > 0 {
            out.push_str(&format!(
                "  Non-2xx or 3xx responses: {}\n",
                self.non_2xx_3xx
            ));
        }
        if self.connect_errors + self.read_errors + self.write_errors > 0 {
            out.push_str(&format!(
                "  Socket errors: connect {}, read {}, write {}, timeout 0\n",
                self.connect_errors, self.read_errors, self.write_errors
            ));
        }
        out.push_str(&format!("Requests/sec: {:.2}\n", n as f64 / secs));
        out
    }
}

/// The `p`th percentile of sorted values (nearest rank); 0 when there are none.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// A duration in microseconds as wrk writes it (`850.00us`, `1.23ms`, `1.02s`).
fn wrk_time(us: u64) -> String {
    if us < 1000 {
        format!("{us}.00us")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

fn run(settings: &Settings) -> Report {
    let config = client_config();
    let deadline = Instant::now() + settings.duration;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        settings.path, settings.authority
    );
    let threads: Vec<_> = (0..settings.connections)
        .map(|_| {
            let settings = settings.clone();
            let config = config.clone();
            let request = request.clone();
            std::thread::spawn(move || connection_loop(&settings, &config, &request, deadline))
        })
        .collect();
    let mut report = Report::default();
    for t in threads {
        if let Ok(r) = t.join() {
            report.add(r);
        }
    }
    report
}

/// How one exchange failed.
enum Failure {
    Connect,
    Write,
    Read,
}

fn connection_loop(
    settings: &Settings,
    config: &Arc<ClientConfig>,
    request: &str,
    deadline: Instant,
) -> Report {
    let mut report = Report::default();
    let mut response = Vec::with_capacity(4096);
    while Instant::now() < deadline {
        let start = Instant::now();
        response.clear();
        match exchange(settings, config, request.as_bytes(), &mut response) {
            Ok(()) => {
                report.bytes += response.len() as u64;
                if complete_success(&response) {
                    report.latencies_us.push(start.elapsed().as_micros() as u64);
                } else {
                    report.non_2xx_3xx += 1;
                }
            }
            Err(Failure::Connect) => {
                report.connect_errors += 1;
                // A refused connect returns at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Failure::Write) => report.write_errors += 1,
            Err(Failure::Read) => report.read_errors += 1,
        }
    }
    report
}

/// One connection, one request, the whole response into `response`.
fn exchange(
    settings: &Settings,
    config: &Arc<ClientConfig>,
    request: &[u8],
    response: &mut Vec<u8>,
) -> Result<(), Failure> {
    let mut sock = TcpStream::connect(settings.addr).map_err(|_| Failure::Connect)?;
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    if !settings.tls {
        sock.write_all(request).map_err(|_| Failure::Write)?;
        return read_to_close(&mut sock, response);
    }
    let name = ServerName::IpAddress(settings.addr.ip().into());
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|_| Failure::Connect)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(request).map_err(|_| Failure::Write)?;
    read_to_close(&mut tls, response)
}

/// Reads until the server closes: close_notify, or a bare TCP close after a complete response.
fn read_to_close(from: &mut impl Read, response: &mut Vec<u8>) -> Result<(), Failure> {
    let mut chunk = [0u8; 16384];
    loop {
        match from.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && complete(response) => {
                return Ok(())
            }
            Err(_) => return Err(Failure::Read),
        }
    }
}

/// The response's head has arrived and as many body bytes as its Content-Length says.
fn complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]);
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    match length {
        Some(len) => response.len() - (end + 4) == len,
        // Close-delimited: whatever came before the close is the body.
        None => true,
    }
}

/// A complete response whose status is 2xx or 3xx.
fn complete_success(response: &[u8]) -> bool {
    let status_ok = response.len() > 12
        && response.starts_with(b"HTTP/1.")
        && matches!(response[9], b'2' | b'3');
    status_ok && complete(response)
}

fn client_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SignaturesOnly(provider.clone()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        })
        .unwrap_or_else(|e| {
            eprintln!("handshake-load: TLS 1.3 with ring: {e}");
            std::process::exit(1)
        });
    // No tickets kept, no PSK offered: every handshake is a full one.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Accepts any certificate chain (the bench's is self-signed, and wrk checks none) but verifies
/// the handshake signature made with its key, as every TLS client must: the server does its full
/// share of the handshake's work.
#[derive(Debug)]
struct SignaturesOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn settings_from_wrk_like_arguments() {
        let s = Settings::parse(&args("-c 4 -d 2 https://127.0.0.1:8443/1k")).unwrap();
        assert_eq!(s.connections, 4);
        assert_eq!(s.duration, Duration::from_secs(2));
        assert!(s.tls);
        assert_eq!(s.addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(
            (s.authority.as_str(), s.path.as_str()),
            ("127.0.0.1:8443", "/1k")
        );
        let s = Settings::parse(&args("http://127.0.0.1:80 -d 1.5s")).unwrap();
        assert!(!s.tls);
        assert_eq!(s.path, "/");
        assert_eq!(s.duration, Duration::from_millis(1500));
        for bad in [
            "",
            "ftp://127.0.0.1:1/",
            "https://localhost:1/",
            "-c 0 http://127.0.0.1:1/",
            "-d -1 http://127.0.0.1:1/",
            "-c",
            "http://127.0.0.1:1/ http://127.0.0.1:2/",
        ] {
            assert!(Settings::parse(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_response_counts_only_when_complete_and_successful() {
        assert!(complete_success(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        ));
        assert!(complete_success(
            b"HTTP/1.1 301 Moved\r\ncontent-length:0\r\n\r\n"
        ));
        assert!(complete_success(b"HTTP/1.0 200 OK\r\n\r\nclose-delimited"));
        assert!(!complete_success(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabc"
        ));
        assert!(!complete_success(
            b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!complete_success(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
        ));
        assert!(!complete_success(b""));
    }

    #[test]
    fn report_reads_as_wrk_output() {
        let report = Report {
            latencies_us: (1..=100).map(|i| i * 100).collect(),
            bytes: 1048576,
            non_2xx_3xx: 2,
            read_errors: 1,
            ..Report::default()
        };
        let text = report.render(Duration::from_secs(2));
        assert!(
            text.contains("  100 requests in 2.00s, 1.00MB read\n"),
            "{text}"
        );
        assert!(text.contains("     50%  5.00ms\n"), "{text}");
        assert!(text.contains("     99%  9.90ms\n"), "{text}");
        assert!(text.contains("Non-2xx or 3xx responses: 2\n"), "{text}");
        assert!(
            text.contains("Socket errors: connect 0, read 1, write 0"),
            "{text}"
        );
        assert!(text.ends_with("Requests/sec: 50.00\n"), "{text}");
        assert_eq!(wrk_time(850), "850.00us");
        assert_eq!(wrk_time(1_020_000), "1.02s");
        assert_eq!(percentile(&[], 99), 0);
        assert_eq!(percentile(&[7], 50), 7);
    }
}
