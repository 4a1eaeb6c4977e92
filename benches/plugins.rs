//! The example plugin (Rust, proxy-wasm SDK) on a warm instance: one request's
//! `on_request_headers` (with the context it creates), its `on_response_headers`, a small body
//! through `on_request_body`, and a whole request's lifecycle. Module compile time, cold and from
//! the sha256 cache, is measured too: that is what a reload pays per changed plugin.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use rustygate::decide::Incoming;
use rustygate::plugins::{self, Limits, OnError, Plugin, PluginUse, RequestInfo};
use rustygate::policy::ClientHeaders;
use sha2::{Digest, Sha256};

const TAG: &[u8] = include_bytes!("../examples/plugins/plugins/tag.wasm");

fn example() -> Arc<PluginUse> {
    let sha = hex::encode(Sha256::digest(TAG));
    let p = Plugin::compile(
        "tag",
        "plugins/tag.wasm",
        TAG,
        &sha,
        OnError::FailClosed,
        Limits::default(),
    )
    .unwrap();
    Arc::new(PluginUse {
        plugin: Arc::new(p),
        config: Bytes::from_static(br#"{"value":"bench","deny_header":"x-block-me"}"#),
    })
}

fn client() -> ClientHeaders {
    [
        ("host", &b"api.example.com"[..]),
        ("user-agent", b"bench/1.0"),
        ("accept", b"application/json"),
        ("x-tenant", b"acme"),
        ("x-api-version", b"2"),
        ("x-request-id", b"0f8e2a8c-0000-4000-8000-000000000000"),
    ]
    .into_iter()
    .collect()
}

fn bench(c: &mut Criterion) {
    let u = example();
    let plugins = vec![Arc::clone(&u)];
    let incoming = Incoming {
        method: "GET",
        host: "api.example.com",
        path: "/orders/42",
        query: None,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        claims: None,
        trace_id: None,
    };
    let info = RequestInfo {
        incoming: &incoming,
        route: "orders",
        config_sha: "0123456789ab",
    };
    let headers = client();
    // Warm: the worker's instance exists.
    drop(plugins::on_request(&plugins, &info, headers.clone()));

    c.bench_function("plugin/on_request_headers (warm, example)", |b| {
        b.iter_with_large_drop(|| plugins::on_request(black_box(&plugins), &info, headers.clone()))
    });
    let (run, _) = plugins::on_request(&plugins, &info, headers.clone());
    let mut response = HeaderMap::new();
    response.insert("content-type", HeaderValue::from_static("application/json"));
    response.insert("content-length", HeaderValue::from_static("42"));
    c.bench_function("plugin/on_response_headers (warm, example)", |b| {
        b.iter(|| {
            let mut h = response.clone();
            black_box(run.on_response("orders", 200, &mut h));
            h
        })
    });
    // One body in one piece (1 KiB, end_of_stream) through the example's body callback (the
    // SDK's default: continue), as a small POST costs on a route with an SDK plugin.
    let body = Bytes::from(vec![b'x'; 1024]);
    c.bench_function(
        "plugin/on_request_body (warm, example, 1 KiB in one piece)",
        |b| {
            b.iter(|| {
                let mut f = run.request_body(1 << 20).unwrap();
                black_box(f.chunk(body.clone(), true).ok())
            })
        },
    );
    drop(run);
    c.bench_function(
        "plugin/request lifecycle (create, headers, log, done, delete)",
        |b| {
            b.iter(|| {
                drop(plugins::on_request(
                    black_box(&plugins),
                    &info,
                    headers.clone(),
                ))
            })
        },
    );

    let mut g = c.benchmark_group("plugin/compile");
    g.sample_size(10);
    g.bench_function("example module, cold (new sha256 each time)", |b| {
        let mut n = 0u64;
        b.iter(|| {
            // A different key each time: the cache cannot answer.
            n += 1;
            let sha = format!("{:064x}", n);
            Plugin::compile(
                "tag",
                "t.wasm",
                TAG,
                &sha,
                OnError::FailClosed,
                Limits::default(),
            )
            .unwrap()
        })
    });
    g.bench_function("example module, cached (unchanged sha256)", |b| {
        let sha = hex::encode(Sha256::digest(TAG));
        // The running snapshot holds the module, as during a reload.
        let _held = Plugin::compile(
            "tag",
            "t.wasm",
            TAG,
            &sha,
            OnError::FailClosed,
            Limits::default(),
        )
        .unwrap();
        b.iter(|| {
            Plugin::compile(
                "tag",
                "t.wasm",
                TAG,
                &sha,
                OnError::FailClosed,
                Limits::default(),
            )
            .unwrap()
        })
    });
    g.finish();
    drop(u);
}

criterion_group!(benches, bench);
criterion_main!(benches);
