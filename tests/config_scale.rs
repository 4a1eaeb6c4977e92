//! Config at scale (issue #14, item 7): a config repo of many routes compiles into a router that
//! matches what it was given, and swapping such a snapshot while requests are in flight frees the
//! old one off the request-serving threads. Figures (time, memory, latency) come from
//! `bench/config-scale.sh`, never from assertions here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::path::Path;

use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::decide::{Incoming, Routed, route};

/// The route mix of `bench/gen-routes.py`, written into `root`: per 10 routes 4 exact paths,
/// 3 `{param}` paths, 3 prefixes; 8 on exact hosts, 1 on a wildcard host, 1 on any host; some
/// with `methods`, auth, CORS, rate limits, header rules, timeouts; 20 upstreams.
pub fn write_routes(root: &Path, n: usize) {
    const RESOURCES: [&str; 8] = [
        "orders", "users", "items", "carts", "invoices", "payments", "search", "reports",
    ];
    let hosts = (n / 500).max(10);
    std::fs::create_dir_all(root.join("routes")).unwrap();
    std::fs::create_dir_all(root.join("upstreams")).unwrap();
    std::fs::write(
        root.join("gateway.toml"),
        "[cors.public]\nallow_origins = [\"https://app.example.com\"]\n\n\
         [auth.idp]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\n\
         secret = { env = \"SCALE_TEST_JWT_SECRET\" }\n",
    )
    .unwrap();
    let mut ups = String::new();
    for u in 0..20 {
        writeln!(
            ups,
            "[upstream.be{u}]\ntargets = [\"http://127.0.0.1:{}\"]\n",
            20000 + u
        )
        .unwrap();
    }
    std::fs::write(root.join("upstreams/all.toml"), ups).unwrap();
    for (part, start) in (0..n).step_by(500).enumerate() {
        let mut f = String::new();
        for i in start..n.min(start + 500) {
            f += &route_text(i, hosts, &RESOURCES);
        }
        std::fs::write(root.join(format!("routes/part{part:04}.toml")), f).unwrap();
    }
}

fn route_text(i: usize, hosts: usize, resources: &[&str]) -> String {
    let mut r = format!("[[route]]\nname = \"r{i}\"\n");
    match i % 10 {
        0 => {}
        1 => writeln!(r, "host = \"*.t{}.example.net\"", i % (hosts / 10).max(1)).unwrap(),
        _ => writeln!(r, "host = \"svc{}.example.com\"", i % hosts).unwrap(),
    }
    let res = resources[i % resources.len()];
    let v = i % 3 + 1;
    match (i / 10 + i) % 10 {
        0..=3 => writeln!(r, "path = \"/api/v{v}/{res}{i}\"").unwrap(),
        4..=6 if i.is_multiple_of(3) => {
            writeln!(r, "path = \"/api/v{v}/{res}{i}/{{id}}/lines/{{line}}\"").unwrap()
        }
        4..=6 => writeln!(r, "path = \"/api/v{v}/{res}{i}/{{id}}\"").unwrap(),
        _ => writeln!(r, "prefix = \"/static/{res}{i}\"").unwrap(),
    }
    match i % 10 {
        2 | 5 => r += "methods = [\"GET\", \"HEAD\"]\n",
        7 => r += "methods = [\"POST\", \"PUT\", \"PATCH\"]\n",
        _ => {}
    }
    if i % 100 == 42 {
        r += "respond = { status = 200, body = \"ok\" }\n\n";
        return r;
    }
    writeln!(r, "upstream = \"be{}\"", i % 20).unwrap();
    match i % 20 {
        3 | 13 => r += "auth = \"idp\"\n",
        4 | 14 => r += "cors = \"public\"\n",
        6 => r += "rate_limit = { requests = 100, per = \"1m\" }\n",
        8 => writeln!(
            r,
            "request_headers = {{ set = {{ \"x-route\" = \"r{i}\" }} }}"
        )
        .unwrap(),
        9 | 19 => r += "timeout = \"5s\"\n",
        _ => {}
    }
    r.push('\n');
    r
}

fn compile_opts() -> CompileOptions {
    CompileOptions {
        resolve_secrets: false,
        ..CompileOptions::default()
    }
}

#[test]
fn ten_thousand_routes_compile_and_each_matches_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_routes(dir.path(), 10_000);
    let compiled = compile_dir(dir.path(), &compile_opts()).unwrap();
    let diags = compiled.diagnostics.render_short(&compiled.files);
    let snap = compiled.snapshot.unwrap_or_else(|| panic!("{diags}"));
    assert_eq!(snap.routes.len(), 10_000, "{diags}");
    assert_eq!(compiled.diagnostics.len(), 0, "{diags}");

    let hosts = 20;
    let mut checked = 0;
    for i in (0..10_000).step_by(7) {
        let host = match i % 10 {
            0 => "any.example.org".to_owned(),
            1 => format!("a.t{}.example.net", i % (hosts / 10)),
            _ => format!("svc{}.example.com", i % hosts),
        };
        let res = [
            "orders", "users", "items", "carts", "invoices", "payments", "search", "reports",
        ][i % 8];
        let v = i % 3 + 1;
        let path = match (i / 10 + i) % 10 {
            0..=3 => format!("/api/v{v}/{res}{i}"),
            4..=6 if i.is_multiple_of(3) => format!("/api/v{v}/{res}{i}/7/lines/2"),
            4..=6 => format!("/api/v{v}/{res}{i}/7"),
            _ => format!("/static/{res}{i}/css/site.css"),
        };
        let method = if i % 10 == 7 { "PUT" } else { "GET" };
        let inc = Incoming {
            method,
            host: &host,
            path: &path,
            query: None,
            client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            claims: None,
            trace_id: None,
        };
        match route(&snap, &inc) {
            Routed::Matched(m) => assert_eq!(
                snap.routes[m.route].name,
                format!("r{i}"),
                "{method} {host}{path}"
            ),
            _ => panic!("{method} {host}{path} matched nothing"),
        }
        checked += 1;
    }
    assert!(checked > 1000);
}

/// Mistakes among 10,000 good routes are each reported where they were written, with the
/// other route named, as in a small repo.
#[test]
fn mistakes_among_ten_thousand_routes_are_located() {
    let dir = tempfile::tempdir().unwrap();
    write_routes(dir.path(), 10_000);
    // r0 is `/api/v1/orders0` on any host, r12 `/api/v2/search12` on svc12 (GET and HEAD).
    std::fs::write(
        dir.path().join("routes/zz-bad.toml"),
        "[[route]]\nname = \"r5000\"\npath = \"/fresh\"\nupstream = \"be1\"\n\n\
         [[route]]\nname = \"same-path\"\npath = \"/api/v1/orders0\"\nupstream = \"be1\"\n\n\
         [[route]]\nname = \"typo\"\npath = \"/typo\"\nupstream = \"be_1\"\n",
    )
    .unwrap();
    let compiled = compile_dir(dir.path(), &compile_opts()).unwrap();
    assert!(compiled.snapshot.is_none());
    let short = compiled.diagnostics.render_short(&compiled.files);
    let lines: Vec<&str> = short.lines().collect();
    assert_eq!(
        lines,
        [
            "routes/zz-bad.toml:2:8: error[duplicate-route]: route name `r5000` is used twice",
            "routes/zz-bad.toml:8:8: error[route-conflict]: routes `r0` and `same-path` both match GET /api/v1/orders0",
            "routes/zz-bad.toml:14:12: error[unknown-upstream]: unknown upstream `be_1`",
        ],
        "{short}"
    );
    let human = compiled.diagnostics.render_human(&compiled.files);
    assert!(
        human.contains("routes/part0010.toml:"),
        "the first r5000: {human}"
    );
    assert!(human.contains("did you mean `be1`?"), "{human}");
}

/// 10,000 routes swapped by the real reload path (compiled on its own thread, published, the
/// previous snapshot let go) while a client keeps sending requests, and while a request that
/// started on the old snapshot is still running on a worker: every request succeeds, and every
/// swapped-out snapshot is freed by the background dropper, never by the worker that let go of it
/// last (that would stall its other requests while 10,000 routes are freed).
#[test]
fn swapping_ten_thousand_routes_under_load_frees_old_snapshots_off_the_workers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use common::{Backend, Gateway, KeepAlive, full, wait_until};
    use rustygate::snapshot::freed_snapshots;
    use rustygate::source::reload::Reloader;
    use rustygate::source::{Source, SourceSpec};

    // A backend that holds each request until the test lets it go (at most 30 s).
    let arrived = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let backend = {
        let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
        Backend::start(move |_req| {
            let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
            async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(30);
                while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                hyper::Response::new(full("slow"))
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    write_routes(dir.path(), 10_000);
    std::fs::write(
        dir.path().join("upstreams/slow.toml"),
        format!("[upstream.slow]\ntargets = [\"http://{}\"]\n", backend.addr),
    )
    .unwrap();
    let bench_route = |k: usize| {
        format!(
            "[[route]]\nname = \"bench\"\npath = \"/bench\"\nrespond = {{ status = 200, body = \"v{k}\" }}\n\n\
             [[route]]\nname = \"slow\"\npath = \"/slow\"\nupstream = \"slow\"\n"
        )
    };
    std::fs::write(dir.path().join("routes/zz-bench.toml"), bench_route(0)).unwrap();

    let metrics = Arc::new(rustygate::telemetry::metrics::Metrics::new());
    let started = Reloader::start(
        Source::new(SourceSpec::Dir(dir.path().to_path_buf())),
        compile_opts(),
        metrics,
        rustygate::source::reload::DEFAULT_LOAD_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut reloader = started.reloader;
    let store = started.store;
    let gw = Gateway::serve_store(
        dir.path(),
        Arc::clone(&store),
        rustygate::server::ServeOptions {
            workers: 2,
            ..Default::default()
        },
    );
    assert_eq!(store.load().routes.len(), 10_002);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The client: requests back to back on one connection, until told to stop (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (addr, stop) = (gw.addr.to_string(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut conn = KeepAlive::connect(&addr).unwrap();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::SeqCst) && ok < 1_000_000 && Instant::now() < deadline {
                match conn.get("/bench") {
                    Some((200, body)) if body.starts_with('v') => ok += 1,
                    other => {
                        failed.push(format!("{other:?}"));
                        conn = KeepAlive::connect(&addr).unwrap();
                    }
                }
            }
            (ok, failed)
        })
    };

    let freed_before = freed_snapshots();
    const SWAPS: usize = 3;
    for k in 1..=SWAPS {
        // A request on the current snapshot that outlasts the swap.
        release.store(false, Ordering::SeqCst);
        let seen = arrived.load(Ordering::SeqCst);
        let slow = {
            let addr = gw.addr.to_string();
            std::thread::spawn(move || common::http(&addr, "GET", "/slow", &[], b""))
        };
        assert!(wait_until(Duration::from_secs(10), || arrived
            .load(Ordering::SeqCst)
            > seen));
        let old = Arc::downgrade(&store.load());
        std::fs::write(dir.path().join("routes/zz-bench.toml"), bench_route(k)).unwrap();
        rt.block_on(reloader.reload("test", false, None));
        let now = store.load();
        assert_ne!(
            now.version.id,
            old.upgrade().unwrap().version.id,
            "swap {k} did not happen"
        );
        drop(now);
        assert!(
            old.upgrade().is_some(),
            "the request in flight holds the old snapshot"
        );
        // The worker lets go of the old snapshot last when the slow request ends.
        release.store(true, Ordering::SeqCst);
        assert_eq!(slow.join().unwrap().map(|(s, _)| s), Some(200));
        assert!(
            wait_until(Duration::from_secs(10), || old.upgrade().is_none()),
            "swap {k}: the old snapshot is never released"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = client.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
    assert!(ok > 0);
    assert!(
        wait_until(Duration::from_secs(10), || freed_snapshots().in_background
            >= freed_before.in_background + SWAPS as u64),
        "{:?} -> {:?}",
        freed_before,
        freed_snapshots()
    );
    assert_eq!(
        freed_snapshots().in_place,
        0,
        "a snapshot was freed by the thread that let go of it"
    );
}
