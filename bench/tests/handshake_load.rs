//! handshake-load makes the handshakes compare.sh's `tls-handshake` row says it measures: every one
//! full, against a server that issues session tickets (wrk's resume), and counts what it got.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{mpsc, Arc};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{HandshakeKind, ServerConfig, ServerConnection};

/// A TLS 1.3 server (ECDSA P-256, two tickets per handshake, as OpenSSL sends) that answers
/// every connection's request with `status` and reports how each handshake went.
fn server(status: &'static str) -> (u16, mpsc::Receiver<HandshakeKind>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    config.send_tls13_tickets = 2;
    let config = Arc::new(config);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (kinds, kinds_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            let config = config.clone();
            let kinds = kinds.clone();
            std::thread::spawn(move || {
                let mut conn = ServerConnection::new(config).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut sock);
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                while !request.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                // Reported before the response goes, so the client cannot finish first.
                if let Some(kind) = tls.conn.handshake_kind() {
                    let _ = kinds.send(kind);
                }
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                if tls.write_all(response.as_bytes()).is_err() {
                    return;
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, kinds_rx)
}

fn run_load(port: u16) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_handshake-load"))
        .args([
            "-c",
            "2",
            "-d",
            "1",
            &format!("https://127.0.0.1:{port}/1k"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn requests(report: &str) -> usize {
    report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {report}"))
}

#[test]
fn every_handshake_is_a_full_one_and_every_response_is_counted() {
    let (port, kinds) = server("200 OK");
    let report = run_load(port);
    let seen: Vec<HandshakeKind> = kinds.try_iter().collect();
    assert!(seen.len() >= 10, "only {} handshakes: {report}", seen.len());
    let not_full = seen.iter().filter(|k| **k != HandshakeKind::Full).count();
    assert_eq!(
        not_full,
        0,
        "{not_full} of {} handshakes not full",
        seen.len()
    );
    assert_eq!(requests(&report), seen.len(), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
}

#[test]
fn error_responses_are_not_counted_as_requests() {
    let (port, kinds) = server("503 Service Unavailable");
    let report = run_load(port);
    let served = kinds.try_iter().count();
    assert!(served >= 10, "{report}");
    assert_eq!(requests(&report), 0, "{report}");
    assert!(
        report.contains(&format!("Non-2xx or 3xx responses: {served}\n")),
        "{report}"
    );
}
