//! Rhai policies on a running gateway: hooks change real requests and responses, and every
//! hard limit stops a runaway script with a 500 while the same worker keeps serving others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Request;
use rustygate::server::ServeOptions;

const RUNAWAYS: &[(&str, &str, &str)] = &[
    ("loop", "fn on_request(req) { loop { } }", "operations"),
    (
        "recursion",
        "fn down(n) { down(n + 1) }\nfn on_request(req) { down(0) }",
        "call_depth",
    ),
    (
        "doubling",
        "fn on_request(req) { let s = \"x\"; loop { s += s; } }",
        "string_size",
    ),
    (
        "array",
        "fn on_request(req) { let a = []; loop { a.push(a.len()); } }",
        "array_size",
    ),
    (
        "map",
        "fn on_request(req) { let m = #{}; let i = 0; loop { let n = #{}; n[`k${i}`] = i; m += n; i += 1; } }",
        "map_size",
    ),
];

/// One route per runaway script, plus a healthy route, on a single worker.
fn runaway_repo(be: &str) -> Vec<(String, String)> {
    let mut files = vec![
        (
            "upstreams/be.toml".to_owned(),
            format!("[upstream.be]\ntargets = [\"{be}\"]\n"),
        ),
        (
            // Small limits keep the test quick; the defaults are checked in the unit tests. A
            // long wall-clock budget, so that on a loaded machine each script still meets the
            // limit it is about, not the clock (the budget has its own test below).
            "gateway.toml".to_owned(),
            "[policy_limits]\nmax_array_size = 1000\nmax_map_size = 200\nmax_string_size = \"16KiB\"\nbudget = \"5s\"\n".to_owned(),
        ),
    ];
    let mut routes = String::from(
        "[[route]]\nname = \"healthy\"\nprefix = \"/ok\"\nupstream = \"be\"\npolicy = \"policies/ok.rhai\"\n",
    );
    files.push((
        "policies/ok.rhai".into(),
        "fn on_request(req) { req.set_header(\"x-policy\", \"ran\"); }".into(),
    ));
    for (name, src, _) in RUNAWAYS {
        routes.push_str(&format!(
            "\n[[route]]\nname = \"{name}\"\nprefix = \"/{name}\"\nupstream = \"be\"\npolicy = \"policies/{name}.rhai\"\n"
        ));
        files.push((format!("policies/{name}.rhai"), (*src).to_owned()));
    }
    files.push(("routes/r.toml".into(), routes));
    files
}

#[test]
fn runaway_scripts_fail_closed_and_the_worker_keeps_serving() {
    let be = Backend::echo();
    let files = runaway_repo(&be.url());
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    write_files(dir.path(), &refs);
    // One worker: every request below is served by the thread the runaways ran on.
    let gw = Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers: 1,
            ..ServeOptions::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for (name, _, reason) in RUNAWAYS {
            let reply = get(&gw.url(&format!("/{name}"))).await;
            assert_eq!(reply.status, 500, "{name}: {}", reply.text());
            let body = reply.json();
            assert_eq!(body["error"], "the route's policy failed", "{name}");
            assert_eq!(
                body["request_id"].as_str(),
                reply.header("x-request-id"),
                "{name}"
            );
            // The single worker is free again: a healthy request right after is served.
            let ok = get(&gw.url("/ok/x")).await;
            assert_eq!(ok.status, 200, "after {name}");
            let echo = ok.json();
            assert!(
                echo["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h[0] == "x-policy" && h[1] == "ran"),
                "after {name}: {echo}"
            );
            let (_, metrics) =
                http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
            let series =
                format!("rustygate_policy_errors_total{{reason=\"{reason}\",route=\"{name}\"}} 1");
            assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
        }
    });
}

#[test]
fn the_wall_clock_budget_stops_a_script_the_operation_limit_allows() {
    let be = Backend::echo();
    let dir = repo(&[
        (
            "gateway.toml",
            "[policy_limits]\nmax_operations = 1000000000000\nbudget = \"30ms\"\n",
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"clock\"\nprefix = \"/\"\nupstream = \"be\"\npolicy = \"policies/clock.rhai\"\n",
        ),
        ("policies/clock.rhai", "fn on_request(req) { loop { } }"),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let gw = Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers: 1,
            ..ServeOptions::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let reply = get(&gw.url("/x")).await;
            assert_eq!(reply.status, 500);
            // Generous: the budget is 30ms; a hung worker would never answer.
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
        }
    });
    let (_, metrics) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.contains("rustygate_policy_errors_total{reason=\"timeout\",route=\"clock\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_change_the_request_and_the_response() {
    let be = Backend::echo();
    let gw = Gateway::start(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"orders\"\npath = \"/orders/{id}\"\nupstream = \"be\"\npolicy = \"policies/p.rhai\"\npolicy_config = { tenant_header = \"x-tenant\" }\n",
        ),
        (
            "policies/p.rhai",
            r#"
fn on_request(req) {
    if req.header("x-api-version") == "1" { return deny(410, "API v1 is retired"); }
    if req.params.id == "0" { return redirect(302, "/orders/1"); }
    req.set_header(req.config.tenant_header, "acme");
    req.remove_header("cookie");
    req.set_path(`/v2/orders/${req.params.id}`);
    req.ctx.started = "yes";
}
fn on_response(req, res) {
    res.set_header("x-seen", req.ctx.started);
    res.remove_header("x-internal");
}
"#,
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let reply = send(
        Request::get(gw.url("/orders/7?q=1"))
            .header("cookie", "secret")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["uri"], "/v2/orders/7?q=1");
    let headers = echo["headers"].as_array().unwrap();
    assert!(headers.iter().any(|h| h[0] == "x-tenant" && h[1] == "acme"));
    assert!(!headers.iter().any(|h| h[0] == "cookie"));
    assert_eq!(reply.header("x-seen"), Some("yes"));

    let denied = send(
        Request::get(gw.url("/orders/7"))
            .header("x-api-version", "1")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(denied.status, 410);
    assert_eq!(denied.json()["error"], "API v1 is retired");
    assert!(denied.json()["request_id"].is_string());

    let moved = get(&gw.url("/orders/0")).await;
    assert_eq!(moved.status, 302);
    assert_eq!(moved.header("location"), Some("/orders/1"));
}
