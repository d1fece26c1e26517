//! Criterion benches of per-connection hot paths: the balancer picks and the pooled buffer round trip.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use keel_lb::{Rng, RoundRobin, WeightedRandom};

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
    }
    group.finish();
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

criterion_group!(benches, picks, buffers, config, http1);
criterion_main!(benches);
