//! The floor proxy forwards exactly what a proxy must, or the `floor` rows of compare.sh measure
//! something else: bytes unchanged both ways on a kept-alive pair, and in `--close` mode the one
//! edit (no `Connection: close` upstream, one added downstream), the client closed after the
//! response, and the backend connection reused.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const BODY: &[u8] = b"0123456789abcdef";

/// A backend that answers every request head with a fixed response, and reports each request it
/// read and each connection it accepted.
fn backend() -> (u16, mpsc::Receiver<Vec<u8>>, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (requests, requests_rx) = mpsc::channel();
    let (accepted, accepted_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = accepted.send(());
            let requests = requests.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let _ = requests.send(head);
                        let mut response =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", BODY.len())
                                .into_bytes();
                        response.extend_from_slice(BODY);
                        if conn.write_all(&response).is_err() {
                            return;
                        }
                    }
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, requests_rx, accepted_rx)
}

struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(mode: &[&str], backend: u16) -> (Floor, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_floor-proxy"))
        .args(mode)
        .arg(format!("127.0.0.1:{port}"))
        .arg(format!("127.0.0.1:{backend}"))
        .spawn()
        .unwrap();
    let floor = Floor(child);
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (floor, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("floor-proxy did not listen on {port}");
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one response (head and Content-Length body).
fn read_response(s: &mut impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "EOF inside a head: {got:?}");
        got.push(byte[0]);
    }
    let mut body = vec![0u8; BODY.len()];
    s.read_exact(&mut body).unwrap();
    got.extend_from_slice(&body);
    got
}

#[test]
fn keep_alive_pairs_forward_bytes_unchanged() {
    let (backend_port, requests, _) = backend();
    let (_floor, port) = start(&[], backend_port);
    let mut client = connect(port);
    for path in ["/a", "/b"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nX-Any: 1\r\n\r\n");
        client.write_all(request.as_bytes()).unwrap();
        let response = read_response(&mut client);
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n"));
        assert!(response.ends_with(BODY));
        let seen = requests.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen, request.as_bytes());
    }
}

#[test]
fn close_mode_edits_the_connection_field_closes_the_client_and_reuses_the_backend() {
    let (backend_port, requests, accepted) = backend();
    let (_floor, port) = start(&["--close"], backend_port);
    // start() probed the listener with connections of its own; each was paired with a backend
    // connection, closed with it.
    std::thread::sleep(Duration::from_millis(100));
    while accepted.try_recv().is_ok() {}
    for _ in 0..3 {
        let mut client = connect(port);
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .unwrap();
        let response = read_response(&mut client);
        assert_eq!(
            &response[..],
            &[
                &b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\n"[..],
                BODY
            ]
            .concat()[..]
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the response: {rest:?}");
        let _ = client.shutdown(Shutdown::Both);
        let seen = requests.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n");
    }
    // One backend connection served all three clients.
    assert!(accepted.recv_timeout(Duration::from_secs(1)).is_ok());
    assert!(accepted.recv_timeout(Duration::from_millis(200)).is_err());
}

/// A self-signed certificate for `localhost` and its key, as PEM files in a fresh directory.
fn certificate_files() -> (
    std::path::PathBuf,
    rustls::pki_types::CertificateDer<'static>,
) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("floor-tls-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    (dir, cert.der().clone())
}

#[test]
fn tls_mode_terminates_tls_and_forwards_the_plaintext_unchanged() {
    let (backend_port, requests, _) = backend();
    let (dir, cert) = certificate_files();
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    let (_floor, port) = start(
        &[
            "--tls",
            cert_file.to_str().unwrap(),
            key_file.to_str().unwrap(),
        ],
        backend_port,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut client = rustls::StreamOwned::new(conn, connect(port));
    // The third request spans several TLS records (16 KiB of plaintext each at most).
    let padding = "p".repeat(40_000);
    for extra in ["X-Any: 1", "X-Other: 2", &format!("X-Pad: {padding}")] {
        let request = format!("GET /t HTTP/1.1\r\nHost: h\r\n{extra}\r\n\r\n");
        client.write_all(request.as_bytes()).unwrap();
        let response = read_response(&mut client);
        assert_eq!(
            &response[..],
            &[&b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n"[..], BODY].concat()[..]
        );
        let seen = requests.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen, request.as_bytes());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Appends an HTTP/2 frame to `out`.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads one HTTP/2 frame: (type, flags, stream, payload).
fn read_h2_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    (head[3], head[4], stream, payload)
}

#[test]
fn h2c_mode_makes_one_backend_exchange_per_stream_and_frames_each_response() {
    let (backend_port, requests, accepted) = backend();
    let (_floor, port) = start(&["--h2c", "/x"], backend_port);
    let mut client = connect(port);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut hello, 0x4, 0, 0, &[]);
    client.write_all(&hello).unwrap();
    let mut backend_connections = 0;
    for round in 0..2u32 {
        // Three streams at once: GET, http, / from the static table, :authority "h".
        let mut batch = Vec::new();
        let streams: Vec<u32> = (0..3).map(|i| 1 + 2 * (3 * round + i)).collect();
        for &stream in &streams {
            h2_frame(
                &mut batch,
                0x1,
                0x5,
                stream,
                &[0x82, 0x86, 0x84, 0x01, 0x01, b'h'],
            );
        }
        client.write_all(&batch).unwrap();
        let mut ended = Vec::new();
        let mut headers = Vec::new();
        while ended.len() < streams.len() {
            match read_h2_frame(&mut client) {
                (0x4, _, 0, _) => {}
                (0x1, 0x4, stream, block) => {
                    assert_eq!(block, vec![0x88], "a :status 200 head");
                    headers.push(stream);
                }
                (0x0, 0x1, stream, body) => {
                    assert!(headers.contains(&stream), "DATA before HEADERS");
                    assert_eq!(body, BODY);
                    ended.push(stream);
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        ended.sort_unstable();
        assert_eq!(ended, streams);
        for _ in &streams {
            let seen = requests.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(
                seen,
                format!("GET /x HTTP/1.1\r\nHost: 127.0.0.1:{backend_port}\r\n\r\n").as_bytes()
            );
        }
        while accepted.try_recv().is_ok() {
            backend_connections += 1;
        }
    }
    // The second round went over the first round's backend connections.
    assert!(
        (1..=3).contains(&backend_connections),
        "{backend_connections} backend connections for two rounds of three streams"
    );
}
