//! Route matching with 1,000 routes, compiled by the real compiler: the per-request lookup cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::router::normalize_path;

/// 1,000 routes: 400 exact, 300 `{param}`, 300 prefixes, spread over 10 hosts and no host.
fn thousand_routes() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut routes = String::new();
    for i in 0..1000 {
        let host = match i % 11 {
            10 => String::new(),
            h => format!("host = \"svc{h}.example.com\"\n"),
        };
        let path = match i % 10 {
            0..=3 => format!("path = \"/api/v{}/resource{i}\"", i % 3),
            4..=6 => format!("path = \"/api/v{}/items{i}/{{id}}/detail\"", i % 3),
            _ => format!("prefix = \"/static/team{i}\""),
        };
        writeln!(
            routes,
            "[[route]]\nname = \"r{i}\"\n{host}{path}\nupstream = \"be\"\n"
        )
        .unwrap();
    }
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::create_dir_all(dir.path().join("upstreams")).unwrap();
    std::fs::write(dir.path().join("routes/r.toml"), routes).unwrap();
    std::fs::write(
        dir.path().join("upstreams/u.toml"),
        "[upstream.be]\ntargets = [\"http://127.0.0.1:1\"]\n",
    )
    .unwrap();
    dir
}

fn bench(c: &mut Criterion) {
    let dir = thousand_routes();
    let compiled = compile_dir(dir.path(), &CompileOptions::default()).unwrap();
    let snap = compiled.snapshot.expect("bench config compiles");
    assert_eq!(snap.routes.len(), 1000);
    let router = &snap.router;

    let mut g = c.benchmark_group("route_match_1000");
    let cases = [
        ("exact", "svc4.example.com", "/api/v1/resource4"),
        ("param", "svc5.example.com", "/api/v2/items5/12345/detail"),
        ("prefix", "svc7.example.com", "/static/team7/css/site.css"),
        (
            "hostless_fallthrough",
            "unknown.example.org",
            "/api/v0/resource120",
        ),
        ("miss", "svc1.example.com", "/nothing/here/at/all"),
    ];
    for (name, host, path) in cases {
        g.bench_function(name, |b| {
            b.iter(|| {
                router
                    .lookup(black_box(host), black_box("GET"), black_box(path))
                    .map(|m| m.route)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("normalize_path");
    g.bench_function("clean", |b| {
        b.iter(|| normalize_path(black_box("/api/v1/items/12345/detail")).map(|p| p.len()))
    });
    g.bench_function("dirty", |b| {
        b.iter(|| {
            normalize_path(black_box("/api//v1/./items/%31%32/../12345/detail")).map(|p| p.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
