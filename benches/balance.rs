//! One target pick per balancer, through the compiled `Upstream::pick` (health and ejection
//! checks included): the per-request cost of balancing. Targets come from the real compiler.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::upstream::{Upstream, hash_bytes};

/// An upstream named `be` with `n` targets and the given balancer settings.
fn upstream(n: usize, settings: &str) -> Arc<Upstream> {
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = (0..n)
        .map(|i| format!("\"http://127.0.0.{}:8080\"", i + 1))
        .collect();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::create_dir_all(dir.path().join("upstreams")).unwrap();
    std::fs::write(
        dir.path().join("routes/r.toml"),
        "[[route]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"be\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("upstreams/u.toml"),
        format!(
            "[upstream.be]\ntargets = [{}]\n{settings}\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let compiled = compile_dir(dir.path(), &CompileOptions::default()).unwrap();
    let snapshot = compiled.snapshot.expect("bench config compiles");
    Arc::clone(&snapshot.upstreams[0])
}

fn pick(c: &mut Criterion) {
    let cases = [
        ("round_robin", "balance = \"round_robin\""),
        ("least_connections", "balance = \"least_connections\""),
        ("random_two_choices", "balance = \"random_two_choices\""),
        (
            "consistent_hash",
            "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"",
        ),
    ];
    let key = hash_bytes(b"user-4711");
    for n in [2, 10] {
        let mut group = c.benchmark_group(format!("pick/{n}_targets"));
        for (name, settings) in cases {
            let u = upstream(n, settings);
            let key = u.balancer.hash_key().map(|_| key);
            group.bench_function(name, |b| b.iter(|| black_box(u.pick(black_box(key), &[]))));
        }
        group.finish();
    }
    // A retry: one target already tried, one of ten ejected-or-unhealthy.
    let u = upstream(10, "balance = \"round_robin\"");
    u.targets[3].state.set_healthy(false, "bench");
    c.bench_function("pick/10_targets/round_robin_retry_one_unhealthy", |b| {
        b.iter(|| black_box(u.pick(None, black_box(&[1]))))
    });
}

criterion_group!(benches, pick);
criterion_main!(benches);
