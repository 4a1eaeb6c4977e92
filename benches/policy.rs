//! A typical policy per hook: read 3 headers, one condition, set 1 header. Measured through
//! `decide::request` / `decide::on_response`, the same calls the proxy handler makes, so the
//! figure includes building `req`/`res` and the fresh scope, not just the Rhai call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::decide::{self, Incoming, Plan, ResponsePlan, Routed};
use rustygate::policy::ClientHeaders;

/// `on_request` is the one the whole-proxy runs use; `on_response` has the same shape.
const POLICY: &str = concat!(
    include_str!("../bench/typical.rhai"),
    r#"
fn on_response(req, res) {
    let ct = res.header("content-type");
    let cache = res.header("cache-control");
    let server = res.header("server");
    if cache == () && ct == "application/json" {
        res.set_header("cache-control", "no-store");
    }
}
"#
);

/// The typical `on_request` building its header with `tenant + "-v" + 2`: the direct form does
/// not add integers to strings, so this one runs in Rhai's evaluator (see `docs/policies.md`,
/// "Speed").
const INTERPRETED: &str = r#"
fn on_request(req) {
    let tenant = req.header("x-tenant");
    let version = req.header("x-api-version");
    let agent = req.header("user-agent");
    if version == "2" && tenant != () {
        req.set_header("x-route-hint", tenant + "-v" + 2);
    }
}
"#;

fn snapshot(policy: &str) -> rustygate::snapshot::Snapshot {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in [
        (
            "routes/r.toml",
            "[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"be\"\npolicy = \"policies/p.rhai\"\n",
        ),
        (
            "upstreams/u.toml",
            "[upstream.be]\ntargets = [\"http://127.0.0.1:1\"]\n",
        ),
        ("policies/p.rhai", policy),
    ] {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    compile_dir(dir.path(), &CompileOptions::default())
        .unwrap()
        .snapshot
        .expect("bench config compiles")
}

/// The client's headers as the proxy hands them over (copied from the parsed request).
fn request_headers() -> ClientHeaders {
    [
        ("x-tenant", "acme"),
        ("x-api-version", "2"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
    ]
    .into_iter()
    .map(|(n, v)| (n, v.as_bytes()))
    .collect()
}

fn bench(c: &mut Criterion) {
    let snap = snapshot(POLICY);
    let inc = Incoming {
        method: "GET",
        host: "api.example.com",
        path: "/api/orders/7",
        query: Some("page=2"),
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        claims: None,
        trace_id: None,
    };
    let Routed::Matched(m) = decide::route(&snap, &inc) else {
        panic!("no route")
    };
    c.bench_function(
        "policy on_request (3 headers, 1 condition, set 1 header)",
        |b| {
            b.iter(|| {
                let (_, plan) = decide::request(&snap, &m, black_box(&inc), request_headers);
                match plan {
                    Plan::Forward(f) => black_box(f),
                    _ => panic!("not forwarded"),
                };
            })
        },
    );
    let interpreted = snapshot(INTERPRETED);
    let Routed::Matched(im) = decide::route(&interpreted, &inc) else {
        panic!("no route")
    };
    c.bench_function("policy on_request, the same in Rhai's evaluator", |b| {
        b.iter(|| {
            let (_, plan) = decide::request(&interpreted, &im, black_box(&inc), request_headers);
            match plan {
                Plan::Forward(f) => black_box(f),
                _ => panic!("not forwarded"),
            };
        })
    });
    let (_, Plan::Forward(f)) = decide::request(&snap, &m, &inc, request_headers) else {
        panic!("not forwarded")
    };
    let run = f.policy.expect("policy ran");
    let mut response = HeaderMap::new();
    response.insert("content-type", HeaderValue::from_static("application/json"));
    response.insert("server", HeaderValue::from_static("upstream"));
    c.bench_function(
        "policy on_response (3 headers, 1 condition, set 1 header)",
        |b| {
            b.iter(|| {
                let mut status = 200;
                let mut headers = response.clone();
                let out = decide::on_response(&run, &mut status, &mut headers);
                assert!(matches!(out, ResponsePlan::Pass));
                black_box(headers);
            })
        },
    );
    c.bench_function("route without policy (baseline for the ones above)", |b| {
        let plain = {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("routes")).unwrap();
            std::fs::create_dir_all(dir.path().join("upstreams")).unwrap();
            std::fs::write(
                dir.path().join("routes/r.toml"),
                "[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"be\"\n",
            )
            .unwrap();
            std::fs::write(
                dir.path().join("upstreams/u.toml"),
                "[upstream.be]\ntargets = [\"http://127.0.0.1:1\"]\n",
            )
            .unwrap();
            compile_dir(dir.path(), &CompileOptions::default())
                .unwrap()
                .snapshot
                .unwrap()
        };
        let Routed::Matched(pm) = decide::route(&plain, &inc) else {
            panic!("no route")
        };
        b.iter(|| {
            let (_, plan) = decide::request(&plain, &pm, black_box(&inc), request_headers);
            black_box(matches!(plan, Plan::Forward(_)));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
