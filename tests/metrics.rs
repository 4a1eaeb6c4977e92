//! `/metrics` scraped and parsed after real traffic: counts and histograms match what was sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn request_counts_and_latency_histograms_match_the_traffic() {
    let be = Backend::fixed(200, "ok");
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let gw = Gateway::start(&as_refs(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"be\"\n\n[[route]]\nname = \"down\"\nprefix = \"/down\"\nmethods = [\"POST\"]\nupstream = \"dead\"\n".into(),
        ),
        ("upstreams/u.toml", format!("[upstream.be]\ntargets = [\"{}\"]\n[upstream.dead]\ntargets = [\"{dead}\"]\n", be.url())),
    ]));
    let addr = gw.addr.to_string();
    for _ in 0..7 {
        assert_eq!(http(&addr, "GET", "/api/x", &[], b"").unwrap().0, 200);
    }
    for _ in 0..3 {
        assert_eq!(http(&addr, "GET", "/nowhere", &[], b"").unwrap().0, 404);
    }
    for _ in 0..2 {
        assert_eq!(http(&addr, "POST", "/down", &[], b"").unwrap().0, 502);
    }
    let m = scrape(&gw);
    let get = |k: &str| {
        m.get(k).copied().unwrap_or_else(|| {
            panic!(
                "no series {k} in {:#?}",
                m.keys()
                    .filter(|k| k.starts_with("rustygate_requests"))
                    .collect::<Vec<_>>()
            )
        })
    };
    assert_eq!(
        get(r#"rustygate_requests_total{method="GET",route="api",status="200"}"#),
        7.0
    );
    assert_eq!(
        get(r#"rustygate_requests_total{method="GET",route="<none>",status="404"}"#),
        3.0
    );
    assert_eq!(
        get(r#"rustygate_requests_total{method="POST",route="down",status="502"}"#),
        2.0
    );
    assert_eq!(
        get(r#"rustygate_request_duration_seconds_count{route="api"}"#),
        7.0
    );
    assert_eq!(
        get(r#"rustygate_request_duration_seconds_bucket{route="api",le="+Inf"}"#),
        7.0
    );
    // Buckets are cumulative and the sum is a real duration.
    let b1 = get(r#"rustygate_request_duration_seconds_bucket{route="api",le="0.001"}"#);
    let b30 = get(r#"rustygate_request_duration_seconds_bucket{route="api",le="30"}"#);
    assert!(b1 <= b30 && b30 == 7.0);
    assert!(get(r#"rustygate_request_duration_seconds_sum{route="api"}"#) > 0.0);
    assert_eq!(
        get(r#"rustygate_upstream_request_duration_seconds_count{upstream="be"}"#),
        7.0
    );
    // Errors count attempts: the default retries a refused connection once.
    assert_eq!(
        get(r#"rustygate_upstream_errors_total{kind="connect",upstream="dead"}"#),
        4.0
    );
    assert_eq!(
        get(&format!(
            r#"rustygate_upstream_requests_total{{status="failed",target="{dead}",upstream="dead"}}"#
        )),
        4.0
    );
    assert_eq!(
        get(&format!(
            r#"rustygate_upstream_requests_total{{status="200",target="{}",upstream="be"}}"#,
            be.url()
        )),
        7.0
    );
    assert_eq!(get("rustygate_in_flight_requests"), 0.0);
    // No raw paths in labels: bounded cardinality.
    assert!(
        !m.keys()
            .any(|k| k.contains("/api/x") || k.contains("/nowhere"))
    );
}

/// A gRPC call's status label is one of the 17 codes, `none` or `invalid`: an upstream whose
/// `grpc-status` carried other text (here, echoed from the query) made a new series of
/// `rustygate_grpc_requests_total` for each value, kept for ever.
#[test]
fn grpc_status_labels_are_the_codes_whatever_the_upstream_sends() {
    use hyper::Response;
    let be = Backend::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        let status = req.uri().query().unwrap_or("").to_owned();
        Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", status)
            .body(full(""))
            .unwrap()
    });
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let addr = gw.addr.to_string();
    let grpc = [("content-type", "application/grpc")];
    for query in ["0", "14", "x1", "99", "007", "weird%20value", "16", "17"] {
        let path = format!("/svc/M?{query}");
        assert_eq!(http(&addr, "POST", &path, &grpc, b"").unwrap().0, 200);
    }
    let m = scrape(&gw);
    let mut labels: Vec<(String, f64)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("rustygate_grpc_requests_total"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    let series = |code: &str| {
        format!("rustygate_grpc_requests_total{{grpc_status=\"{code}\",route=\"all\"}}")
    };
    assert_eq!(
        labels,
        [
            (series("0"), 1.0),
            (series("14"), 1.0),
            (series("16"), 1.0),
            (series("invalid"), 5.0),
        ]
    );
}

/// Every family is on a fresh gateway's `/metrics`: at 0 where its labels are known from the
/// start or from the config, by its `HELP` and `TYPE` alone where they come from events.
#[test]
fn a_fresh_gateway_lists_every_metric_family() {
    let gw = Gateway::start(&as_refs(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"be\"\n\
             rate_limit = { requests = 10, per = \"1m\" }\n"
                .into(),
        ),
        (
            "upstreams/u.toml",
            format!(
                "[upstream.be]\ntargets = [\"http://127.0.0.1:{}\"]\n",
                dead_port()
            ),
        ),
    ]));
    let (status, text) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    for family in [
        "rustygate_requests_total",
        "rustygate_request_duration_seconds",
        "rustygate_upstream_request_duration_seconds",
        "rustygate_upstream_requests_total",
        "rustygate_upstream_errors_total",
        "rustygate_upstream_retries_total",
        "rustygate_upstream_overflow_total",
        "rustygate_upstream_no_target_total",
        "rustygate_auth_failures_total",
        "rustygate_rate_limited_total",
        "rustygate_rate_limit_keys_evicted_total",
        "rustygate_policy_errors_total",
        "rustygate_plugin_errors_total",
        "rustygate_grpc_requests_total",
        "rustygate_client_connections_refused_total",
        "rustygate_client_timeouts_total",
        "rustygate_tls_handshakes_total",
        "rustygate_http2_goaway_total",
        "rustygate_config_commits_refused_total",
        "rustygate_trace_spans_dropped_total",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {family} ")),
            "{family} missing from a fresh gateway:\n{text}"
        );
    }
    let m = scrape(&gw);
    for series in [
        r#"rustygate_upstream_errors_total{kind="timeout",upstream="be"}"#,
        r#"rustygate_upstream_no_target_total{upstream="be"}"#,
        r#"rustygate_upstream_overflow_total{limit="max_requests",upstream="be"}"#,
        r#"rustygate_rate_limited_total{route="api"}"#,
        r#"rustygate_client_timeouts_total{phase="header"}"#,
        r#"rustygate_http2_goaway_total{reason="resets"}"#,
        r#"rustygate_config_commits_refused_total{reason="bad-signature"}"#,
    ] {
        assert_eq!(m.get(series), Some(&0.0), "{series}");
    }
    promtool_check(&text);
}

/// JWKS fetches that failed (the issuer down: tokens with a new kid get 401 while the cached
/// keys keep working) and a stale cached commit had no metric to alert on. Both series of
/// `rustygate_jwks_fetches_total` and `rustygate_config_stale` are there from start-up at 0.
#[test]
fn jwks_fetch_failures_and_a_stale_config_are_metrics_from_the_start() {
    let jwks = format!("http://127.0.0.1:{}/jwks.json", dead_port());
    let dir = repo(&as_refs(&[
        (
            "gateway.toml",
            format!(
                "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"ES256\"]\njwks_url = \"{jwks}\"\n"
            ),
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"api\"\npath = \"/\"\nauth = \"idp\"\nrespond = { status = 200 }\n"
                .to_owned(),
        ),
    ]));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let failures = "rustygate_jwks_fetches_total{result=\"failure\"}";
    assert_eq!(gw.metric(failures), Some(0.0));
    assert_eq!(
        gw.metric("rustygate_jwks_fetches_total{result=\"success\"}"),
        Some(0.0)
    );
    assert_eq!(gw.metric("rustygate_config_stale"), Some(0.0));

    // `{"alg":"ES256","kid":"k1"}`, `{}`, a signature no key makes.
    let token = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.e30.AAAA";
    let (status, _) = http(
        &gw.listen,
        "GET",
        "/",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .unwrap();
    assert_eq!(status, 401);
    assert!(wait_until(std::time::Duration::from_secs(10), || gw
        .metric(failures)
        .is_some_and(|n| n >= 1.0)));
    let (_, body) = http(&gw.admin, "GET", "/metrics", &[], b"").unwrap();
    promtool_check(&body);
}

/// A reload that renames a route and an upstream: the old names' series (requests, latency,
/// attempts, upstream errors, zero series...) leave `/metrics` instead of staying at their last
/// value for the gateway's life, and the series of the route and upstream still there keep
/// their counts.
#[test]
fn a_reload_removes_the_series_of_renamed_routes_and_upstreams() {
    let be = Backend::fixed(200, "ok");
    let gone = Backend::fixed(200, "ok");
    let config = |route: &str, upstream: &str, url: &str| {
        vec![
            (
                "routes/r.toml",
                format!(
                    "[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"be\"\n\
                     [[route]]\nname = \"{route}\"\nprefix = \"/other\"\nupstream = \"{upstream}\"\n\
                     rate_limit = {{ requests = 100, per = \"1m\" }}\n"
                ),
            ),
            (
                "upstreams/u.toml",
                format!(
                    "[upstream.be]\ntargets = [\"{}\"]\n[upstream.{upstream}]\ntargets = [\"{url}\"]\n",
                    be.url()
                ),
            ),
        ]
    };
    let gw = Gateway::start(&as_refs(&config("old", "old_be", &gone.url())));
    let addr = gw.addr.to_string();
    for path in ["/api/x", "/api/x", "/api/x", "/other", "/other"] {
        assert_eq!(http(&addr, "GET", path, &[], b"").unwrap().0, 200);
    }
    let api = r#"rustygate_requests_total{method="GET",route="api",status="200"}"#;
    let api_latency = r#"rustygate_request_duration_seconds_count{route="api"}"#;
    let be_latency = r#"rustygate_upstream_request_duration_seconds_count{upstream="be"}"#;
    let before = scrape(&gw);
    assert_eq!(before.get(api), Some(&3.0));
    let old = |m: &std::collections::HashMap<String, f64>| -> Vec<String> {
        let mut old: Vec<String> = m
            .keys()
            .filter(|k| k.contains("\"old") || k.contains(&format!("\"{}\"", gone.url())))
            .cloned()
            .collect();
        old.sort();
        old
    };
    assert!(old(&before).len() >= 10, "{:?}", old(&before));

    let renamed = Backend::fixed(200, "ok");
    gw.swap(&as_refs(&config("new", "new_be", &renamed.url())));
    let after = scrape(&gw);
    assert_eq!(old(&after), Vec::<String>::new());
    for series in [api, api_latency, be_latency] {
        assert_eq!(after.get(series), Some(&3.0), "{series}");
    }
    assert_eq!(
        after.get(r#"rustygate_upstream_no_target_total{upstream="new_be"}"#),
        Some(&0.0)
    );
    assert_eq!(
        after.get(r#"rustygate_rate_limited_total{route="new"}"#),
        Some(&0.0)
    );
    assert_eq!(http(&addr, "GET", "/api/x", &[], b"").unwrap().0, 200);
    assert_eq!(http(&addr, "GET", "/other", &[], b"").unwrap().0, 200);
    let (_, text) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    let m = scrape(&gw);
    assert_eq!(m.get(api), Some(&4.0));
    assert_eq!(
        m.get(r#"rustygate_requests_total{method="GET",route="new",status="200"}"#),
        Some(&1.0)
    );
    promtool_check(&text);
}
