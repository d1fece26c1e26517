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

criterion_group!(benches, picks, buffers, config);
criterion_main!(benches);
