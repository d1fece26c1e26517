//! Criterion benches of per-connection hot paths: the balancer picks (and consistent-hash table
//! builds), the pooled buffer round trip, config compilation, the HTTP/1 parsers and the HTTP/2 codec.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use keel_lb::hash::hash_bytes;
use keel_lb::{LeastRequest, Maglev, PeakEwma, RingHash, Rng, RoundRobin, WeightedRandom};

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [10usize, 100, 1000] {
        let equal = vec![1u32; n];
        let weighted: Vec<u32> = (0..n as u32).map(|i| 1 + i % 7).collect();
        let mut rr = RoundRobin::new(&equal, 0);
        group.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            b.iter(|| black_box(rr.pick()))
        });
        let mut swrr = RoundRobin::new(&weighted, 0);
        group.bench_with_input(
            BenchmarkId::new("smooth_weighted_round_robin", n),
            &n,
            |b, _| b.iter(|| black_box(swrr.pick())),
        );
        let wr = WeightedRandom::new(&weighted);
        let mut rng = Rng::new(7);
        group.bench_with_input(BenchmarkId::new("weighted_random", n), &n, |b, _| {
            b.iter(|| black_box(wr.pick(&mut rng)))
        });
        let mut p2c = LeastRequest::new(&equal);
        for i in 0..n {
            for _ in 0..(i % 5) {
                p2c.started(i);
            }
        }
        group.bench_with_input(BenchmarkId::new("least_request_p2c", n), &n, |b, _| {
            b.iter(|| black_box(p2c.pick(&mut rng)))
        });
        let mut wp2c = LeastRequest::new(&weighted);
        group.bench_with_input(BenchmarkId::new("least_request_weighted", n), &n, |b, _| {
            b.iter(|| black_box(wp2c.pick(&mut rng)))
        });
        let mut ewma = PeakEwma::new(&equal);
        for i in 0..n {
            ewma.started(i);
            ewma.finished(
                i,
                std::time::Duration::from_micros(100 + (i % 13) as u64 * 50),
            );
        }
        group.bench_with_input(BenchmarkId::new("peak_ewma_p2c", n), &n, |b, _| {
            b.iter(|| black_box(ewma.pick(&mut rng)))
        });
        // Consistent hashing: the key's hash is part of every pick (a 24-byte header value).
        let names: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250))
            .collect();
        let hosts: Vec<(&str, u32)> = names.iter().map(|h| (h.as_str(), 1)).collect();
        let ring = RingHash::new(&hosts, keel_lb::ring_hash::DEFAULT_MIN_RING_SIZE);
        let maglev = Maglev::new(&hosts, keel_lb::maglev::DEFAULT_TABLE_SIZE).expect("prime size");
        let key = b"user-3f9a1c27-5e1d-44b2-a";
        group.bench_with_input(BenchmarkId::new("ring_hash_with_hash", n), &n, |b, _| {
            b.iter(|| black_box(ring.pick(hash_bytes(black_box(key), 0))))
        });
        group.bench_with_input(BenchmarkId::new("maglev_with_hash", n), &n, |b, _| {
            b.iter(|| black_box(maglev.pick(hash_bytes(black_box(key), 0))))
        });
    }
    group.finish();
}

fn table_builds(c: &mut Criterion) {
    let names: Vec<String> = (0..1000)
        .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250))
        .collect();
    let hosts: Vec<(&str, u32)> = names.iter().map(|h| (h.as_str(), 1)).collect();
    c.bench_function("ring_hash_build_1000_hosts", |b| {
        b.iter(|| {
            black_box(RingHash::new(
                &hosts,
                keel_lb::ring_hash::DEFAULT_MIN_RING_SIZE,
            ))
        })
    });
    c.bench_function("maglev_build_1000_hosts_65537", |b| {
        b.iter(|| black_box(Maglev::new(&hosts, keel_lb::maglev::DEFAULT_TABLE_SIZE)))
    });
}

fn buffers(c: &mut Criterion) {
    c.bench_function("buffer_take_return", |b| {
        b.iter(|| {
            let buf = keel_io::Buffer::take();
            black_box(buf.len())
        })
    });
}

fn config(c: &mut Criterion) {
    let text = include_str!("../../examples/demo.yaml");
    c.bench_function("config_compile_demo", |b| {
        b.iter(|| black_box(keel_config::load_str("demo.yaml", text).is_ok()))
    });
}

fn http1(c: &mut Criterion) {
    use keel_core::http::h1::{chunked, parse_request, Limits};
    let head = b"GET /api/v1/reviews?id=42 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Request-Id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\r\nX-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\nX-B3-SpanId: e457b5a2e4d86bd1\r\nX-B3-Sampled: 1\r\nCookie: session=abc; theme=dark\r\n\r\n";
    let limits = Limits::default();
    c.bench_function("h1_parse_request_head", |b| {
        b.iter(|| black_box(parse_request(black_box(head), &limits).is_ok()))
    });
    let mut body = Vec::new();
    for _ in 0..16 {
        body.extend_from_slice(b"400\r\n");
        body.extend_from_slice(&[b'x'; 1024]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    c.bench_function("h1_chunked_decode_16k", |b| {
        b.iter(|| {
            let mut d = chunked::Decoder::default();
            let mut rest = &body[..];
            let mut n = 0;
            while !d.is_done() {
                match d.decode(rest) {
                    Ok(chunked::Step::Framing { consumed }) => rest = &rest[consumed..],
                    Ok(chunked::Step::Data { range }) => {
                        n += range.len();
                        rest = &rest[range.end..];
                    }
                    Err(_) => break,
                }
            }
            black_box(n)
        })
    });
}

/// HTTP/2: HPACK encode and decode of a typical request head (as curl or a gRPC client sends it,
/// Huffman-coded), and frame header parsing plus payload checks.
fn http2(c: &mut Criterion) {
    use keel_core::http::h2::{frame, hpack};
    let fields: [(&[u8], &[u8]); 8] = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/reviews/v1/products/12345?detail=full"),
        (b":authority", b"reviews.default.svc.cluster.local"),
        (b"user-agent", b"grpc-go/1.60.0"),
        (b"accept", b"*/*"),
        (b"x-request-id", b"6c3ef2b6-6f1e-4d8a-9e3b-2f0c1a7d5e44"),
        (
            b"traceparent",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let mut block = Vec::new();
    for (n, v) in fields {
        hpack::encode_field(n, v, &mut block);
    }
    c.bench_function("h2/hpack_encode_request_head", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            for (n, v) in fields {
                hpack::encode_field(n, v, &mut out);
            }
            black_box(out.len())
        })
    });
    // A connection's encoder on the same head again: what every request after the first costs
    // (the table indexes all but the per-request fields).
    c.bench_function("h2/hpack_encoder_repeated_request_head", |b| {
        let mut enc = hpack::Encoder::default();
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            enc.begin(&mut out);
            for (n, v) in fields {
                enc.field(n, v, &mut out);
            }
            black_box(out.len())
        })
    });
    c.bench_function("h2/hpack_decode_request_head", |b| {
        let mut d = hpack::Decoder::new(4096);
        b.iter(|| {
            let mut n = 0usize;
            d.decode(black_box(&block), 1 << 16, |name, value| {
                n += name.len() + value.len()
            })
            .unwrap();
            black_box(n)
        })
    });
    let mut frames = Vec::new();
    frame::write_headers(&mut frames, 1, &block, true, 16_384);
    frame::write_head(&mut frames, 1024, frame::DATA, frame::END_STREAM, 3);
    frames.extend_from_slice(&[7u8; 1024]);
    frame::write_window_update(&mut frames, 0, 1 << 20);
    c.bench_function("h2/parse_three_frames", |b| {
        b.iter(|| {
            let mut rest = black_box(&frames[..]);
            let mut n = 0;
            while rest.len() >= frame::HEADER_LEN {
                let head = frame::Head::parse(rest[..frame::HEADER_LEN].try_into().unwrap());
                let end = frame::HEADER_LEN + head.len as usize;
                if frame::decode(head, &rest[frame::HEADER_LEN..end]).is_ok() {
                    n += 1;
                }
                rest = &rest[end..];
            }
            black_box(n)
        })
    });
}

criterion_group!(benches, picks, table_builds, buffers, config, http1, http2);
criterion_main!(benches);
