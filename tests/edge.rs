//! CORS and rate limiting through the running proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

fn gateway_with(be: &Backend, gateway_toml: &str, route_extra: &str) -> Gateway {
    let mut files = proxy_all(&be.url(), route_extra);
    files.push(("gateway.toml", gateway_toml.to_owned()));
    Gateway::start(&as_refs(&files))
}

/// Sends a raw request and returns (status, lower-cased head, body).
fn exchange(gw: &Gateway, req: &str) -> (u16, String, String) {
    let resp = raw(gw.addr, req.as_bytes());
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_owned(),
    )
}

const CORS: &str = r#"
[cors.app]
allow_origins = ["https://app.example.com", "https://*.example.org"]
allow_methods = ["GET", "POST"]
allow_headers = ["content-type", "authorization"]
expose_headers = ["x-request-id"]
allow_credentials = true
max_age = "10m"
"#;

#[test]
fn preflight_is_answered_by_the_gateway() {
    let be = Backend::echo();
    let gw = gateway_with(&be, CORS, "cors = \"app\"");
    let (status, head, _) = exchange(
        &gw,
        "OPTIONS /items HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: Content-Type\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example.com"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods: get, post"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: content-type"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
    assert!(head.contains("access-control-max-age: 600"), "{head}");
    // Never reached the upstream: the echo backend would have answered 200 with JSON.
    let (status, head, _) = exchange(
        &gw,
        "OPTIONS /items HTTP/1.1\r\nHost: a\r\nOrigin: https://evil.example.net\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 403);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    let (status, _, _) = exchange(
        &gw,
        "OPTIONS /items HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: DELETE\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 403);
}

/// `"*"` in `allow_methods` and `allow_headers` means any, as the Fetch standard reads it
/// without credentials (it used to be taken for a method and a header named `*`, refusing
/// every preflight).
#[test]
fn a_wildcard_allows_any_method_and_header() {
    let be = Backend::echo();
    let preset = "[cors.any]\nallow_origins = [\"https://app.example.com\"]\n\
                  allow_methods = [\"*\"]\nallow_headers = [\"*\"]\n";
    let gw = gateway_with(&be, preset, "cors = \"any\"");
    let (status, head, _) = exchange(
        &gw,
        "OPTIONS /items HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: X-Anything\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-methods: put"), "{head}");
    assert!(
        head.contains("access-control-allow-headers: x-anything"),
        "{head}"
    );
}

#[test]
fn actual_requests_get_cors_headers_only_for_allowed_origins() {
    let be = Backend::echo();
    let gw = gateway_with(&be, CORS, "cors = \"app\"");
    let (status, head, _) = exchange(
        &gw,
        "GET /x HTTP/1.1\r\nHost: a\r\nOrigin: https://shop.example.org\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("access-control-allow-origin: https://shop.example.org"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: x-request-id"),
        "{head}"
    );
    assert!(head.contains("vary: origin"), "{head}");
    let (status, head, _) = exchange(
        &gw,
        "GET /x HTTP/1.1\r\nHost: a\r\nOrigin: https://evil.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    assert!(head.contains("vary: origin"), "{head}");
}

#[test]
fn the_routes_cors_answer_replaces_the_upstreams() {
    // An upstream that answers CORS on its own, for any origin.
    let be = raw_backend(
        b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: x-secret\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    );
    let mut files = proxy_all(&format!("http://{be}"), "cors = \"app\"");
    files.push(("gateway.toml", CORS.to_owned()));
    let gw = Gateway::start(&as_refs(&files));
    let acao = |head: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.strip_prefix("access-control-allow-origin: "))
            .map(str::to_owned)
            .collect()
    };
    let (status, head, _) = exchange(
        &gw,
        "GET /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{head}");
    assert_eq!(acao(&head), ["https://app.example.com"], "{head}");
    assert!(
        head.contains("access-control-expose-headers: x-request-id"),
        "{head}"
    );
    assert!(!head.contains("x-secret"), "{head}");
    // An origin the route refuses gets no CORS header, not the upstream's `*`; nor does a
    // wildcard's subdomain on another scheme.
    for origin in ["https://evil.com", "http://shop.example.org"] {
        let (status, head, _) = exchange(
            &gw,
            &format!("GET /x HTTP/1.1\r\nHost: a\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "{head}");
        assert!(acao(&head).is_empty(), "{origin}: {head}");
        assert!(!head.contains("access-control-allow-credentials"), "{head}");
    }
}

#[test]
fn a_route_without_cors_forwards_options_upstream() {
    let be = Backend::echo();
    let gw = gateway_with(&be, CORS, "");
    let (status, _, body) = exchange(
        &gw,
        "OPTIONS /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(body.contains("\"method\":\"OPTIONS\""), "{body}");
}

#[test]
fn rate_limit_answers_429_with_headers_and_counts_it() {
    let be = Backend::fixed(200, "ok");
    let gw = gateway_with(&be, "[rate_limit]\nrequests = 3\nper = \"1m\"\n", "");
    for _ in 0..3 {
        assert_eq!(
            exchange(
                &gw,
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            .0,
            200
        );
    }
    let (status, head, body) = exchange(
        &gw,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 429, "{head}");
    let header = |name: &str| rate_header(&head, name);
    assert!((15..=20).contains(&header("retry-after")), "{head}");
    assert_eq!(header("ratelimit-limit"), 3);
    assert_eq!(header("ratelimit-remaining"), 0);
    assert!(header("ratelimit-reset") >= 1);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "rate limit exceeded");
    let (_, metrics) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.contains("rustygate_rate_limited_total{route=\"all\"} 1"),
        "{metrics}"
    );
}

/// The header `name` of a lower-cased head, as a number.
fn rate_header(head: &str, name: &str) -> u64 {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {head}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn every_response_of_a_limited_route_says_the_quota_left() {
    // 60 a minute in bursts of 3: one request back every second.
    let be = Backend::fixed(200, "ok");
    let gw = gateway_with(
        &be,
        "[rate_limit]\nrequests = 60\nper = \"1m\"\nburst = 3\n",
        "",
    );
    let get = || {
        exchange(
            &gw,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, head, _) = get();
        assert_eq!(status, 200, "{head}");
        // The quota configured, not the burst; the burst back within a second a request.
        assert_eq!(rate_header(&head, "ratelimit-limit"), 60, "{head}");
        let remaining = rate_header(&head, "ratelimit-remaining");
        let reset = rate_header(&head, "ratelimit-reset");
        assert_eq!(reset, 3 - remaining, "{head}");
        seen.push(remaining);
    }
    // A second or more between two requests could give one back: never more than the burst.
    assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
    assert!(seen.iter().all(|&r| r < 3), "{seen:?}");
    // The first of 10 tries (`pause` apart) answered with `status`: its head.
    let first = |status: u16, pause: Duration| {
        (0..10).find_map(|_| {
            let (s, head, _) = get();
            std::thread::sleep(pause);
            (s == status).then_some(head)
        })
    };
    // Exhaust it: quick requests, one back a second at most.
    let head = first(429, Duration::ZERO).expect("a burst of 3 is exhausted within 10 requests");
    assert_eq!(rate_header(&head, "ratelimit-limit"), 60, "{head}");
    assert_eq!(rate_header(&head, "ratelimit-remaining"), 0, "{head}");
    let reset = rate_header(&head, "ratelimit-reset");
    assert!((2..=3).contains(&reset), "{head}");
    assert!(rate_header(&head, "retry-after") <= 1, "{head}");
    // The gateway's own answers (here: the upstream is gone) carry them too.
    drop(be);
    let answered = first(502, Duration::from_millis(200));
    let head = answered.expect("a 502 once the quota is back");
    assert_eq!(rate_header(&head, "ratelimit-limit"), 60, "{head}");
    assert!(rate_header(&head, "ratelimit-reset") <= 3, "{head}");
}

#[test]
fn rate_limit_keys_by_header_and_routes_can_opt_out() {
    let be = Backend::fixed(200, "ok");
    let routes = r#"
[[route]]
name = "keyed"
prefix = "/keyed"
upstream = "be"
rate_limit = { requests = 1, per = "1m", key = "header:x-api-key" }

[[route]]
name = "free"
prefix = "/free"
upstream = "be"
rate_limit = { enabled = false }
"#;
    let gw = Gateway::start(&[
        ("gateway.toml", "[rate_limit]\nrequests = 1\nper = \"1m\"\n"),
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let keyed = |key: &str| {
        exchange(
            &gw,
            &format!(
                "GET /keyed HTTP/1.1\r\nHost: a\r\nX-Api-Key: {key}\r\nConnection: close\r\n\r\n"
            ),
        )
        .0
    };
    assert_eq!(keyed("alice"), 200);
    assert_eq!(keyed("alice"), 429);
    assert_eq!(keyed("bob"), 200, "each key has its own bucket");
    for _ in 0..5 {
        assert_eq!(
            exchange(
                &gw,
                "GET /free HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            .0,
            200
        );
    }
}

/// A request without the key header counts by its client address: one client without it no
/// longer locks out every other client without it (they shared one bucket). A header sent on
/// two lines is one key, their values joined as the upstream reads them.
#[test]
fn a_request_without_the_key_counts_by_its_client_address() {
    let be = Backend::fixed(200, "ok");
    let routes = r#"
[[route]]
name = "keyed"
prefix = "/keyed"
upstream = "be"
rate_limit = { requests = 1, per = "1m", key = "header:x-api-key" }
"#;
    let gw = Gateway::start(&[
        (
            "gateway.toml",
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        ),
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let send = |client: &str, key_lines: &str| {
        exchange(
            &gw,
            &format!(
                "GET /keyed HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {client}\r\n{key_lines}\
                 Connection: close\r\n\r\n"
            ),
        )
        .0
    };
    assert_eq!(send("203.0.113.1", ""), 200);
    assert_eq!(
        send("203.0.113.1", ""),
        429,
        "the same client, still limited"
    );
    assert_eq!(
        send("203.0.113.2", ""),
        200,
        "another client without the key has a bucket of its own"
    );
    // Two lines, one key: "a, b", neither "a" nor "b".
    let two = "X-Api-Key: a\r\nX-Api-Key: b\r\n";
    assert_eq!(send("203.0.113.3", two), 200);
    assert_eq!(send("203.0.113.4", two), 429, "the key, not the address");
    assert_eq!(send("203.0.113.5", "X-Api-Key: a\r\n"), 200);
    assert_eq!(send("203.0.113.5", "X-Api-Key: a, b\r\n"), 429);
}

/// IPv6 clients count by /64 (by default): a client owning a /64 could use a fresh address,
/// and so a fresh bucket, for every request. `ipv6_prefix = 128` counts each address.
#[test]
fn ipv6_clients_count_by_their_64_prefix() {
    let be = Backend::fixed(200, "ok");
    let routes = r#"
[[route]]
name = "by64"
prefix = "/by64"
upstream = "be"
rate_limit = { requests = 1, per = "1m" }

[[route]]
name = "by128"
prefix = "/by128"
upstream = "be"
rate_limit = { requests = 1, per = "1m", ipv6_prefix = 128 }
"#;
    let gw = Gateway::start(&[
        (
            "gateway.toml",
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        ),
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let send = |path: &str, client: &str| {
        exchange(
            &gw,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {client}\r\n\
                 Connection: close\r\n\r\n"
            ),
        )
        .0
    };
    assert_eq!(send("/by64", "2001:db8:0:1::1"), 200);
    assert_eq!(
        send("/by64", "2001:db8:0:1::2"),
        429,
        "another address of the same /64 is the same client"
    );
    assert_eq!(send("/by64", "2001:db8:0:2::1"), 200, "another /64");
    assert_eq!(send("/by128", "2001:db8:0:1::1"), 200);
    assert_eq!(send("/by128", "2001:db8:0:1::2"), 200);
}

#[test]
fn a_default_turned_off_leaves_the_limits_routes_set_themselves() {
    let be = Backend::fixed(200, "ok");
    let routes = r#"
[[route]]
name = "login"
prefix = "/login"
upstream = "be"
rate_limit = { requests = 1, per = "1m" }

[[route]]
name = "keyed"
prefix = "/keyed"
upstream = "be"
rate_limit = { key = "route" }
"#;
    let gw = Gateway::start(&[
        (
            "gateway.toml",
            "[rate_limit]\nrequests = 1\nper = \"1m\"\nenabled = false\n",
        ),
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let get = |path: &str| {
        exchange(
            &gw,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
        .0
    };
    assert_eq!(get("/login"), 200);
    assert_eq!(get("/login"), 429, "the route's own limit holds");
    for _ in 0..3 {
        assert_eq!(
            get("/keyed"),
            200,
            "no numbers of its own: the default, which is off"
        );
    }
}

#[test]
fn buckets_survive_a_swap_that_keeps_the_route_and_its_limit() {
    let be = Backend::fixed(200, "ok");
    let gw = gateway_with(&be, "[rate_limit]\nrequests = 2\nper = \"1m\"\n", "");
    for _ in 0..2 {
        assert_eq!(
            exchange(
                &gw,
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            .0,
            200
        );
    }
    // Recompile the same config (plus an unrelated route) and publish it.
    write_files(
        &gw.dir,
        &[(
            "routes/other.toml",
            "[[route]]\nname = \"other\"\npath = \"/other\"\nrespond = { status = 204 }\n",
        )],
    );
    let compiled = rustygate::compile::compile_dir(&gw.dir, &Default::default()).unwrap();
    gw.store.publish(compiled.snapshot.unwrap());
    assert!(wait_until(Duration::from_secs(5), || exchange(
        &gw,
        "GET /other HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .0 == 204));
    assert_eq!(
        exchange(
            &gw,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .0,
        429,
        "the bucket was kept"
    );
}

fn compile_errors(files: &[(&str, &str)]) -> Vec<(String, String)> {
    let dir = repo(files);
    let c = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
    c.diagnostics
        .iter()
        .map(|d| (d.code.to_string(), d.message.clone()))
        .collect()
}

#[test]
fn edge_settings_are_checked_at_compile_time() {
    let route = |extra: &str| {
        format!("[[route]]\nname = \"r\"\npath = \"/\"\nrespond = {{ status = 200 }}\n{extra}\n")
    };
    let creds_any = "[cors.open]\nallow_origins = [\"*\"]\nallow_credentials = true\n";
    let d = compile_errors(&[
        ("gateway.toml", creds_any),
        ("routes/r.toml", &route("cors = \"open\"")),
    ]);
    assert!(
        d.iter()
            .any(|(c, m)| c == "invalid-cors" && m.contains("allow_credentials")),
        "{d:?}"
    );
    let d = compile_errors(&[
        (
            "gateway.toml",
            "[cors.public]\nallow_origins = [\"https://a.com\"]\n",
        ),
        ("routes/r.toml", &route("cors = \"pubic\"")),
    ]);
    assert!(
        d.iter()
            .any(|(c, m)| c == "unknown-cors" && m.contains("pubic")),
        "{d:?}"
    );
    let d = compile_errors(&[("routes/r.toml", &route("rate_limit = { requests = 10 }"))]);
    assert!(d.iter().any(|(c, _)| c == "invalid-rate-limit"), "{d:?}");
    let d = compile_errors(&[(
        "routes/r.toml",
        &route("rate_limit = { requests = 10, per = \"1m\", key = \"claim:sub\" }"),
    )]);
    assert!(
        d.iter()
            .any(|(c, m)| c == "invalid-rate-limit" && m.contains("limits by claim `sub`")),
        "{d:?}"
    );
    let d = compile_errors(&[(
        "routes/r.toml",
        &route(
            "cors = { allow_origins = [\"https://a.com\"] }\nrate_limit = { requests = 10, per = \"1m\", key = \"header:x-api-key\" }",
        ),
    )]);
    assert!(d.is_empty(), "{d:?}");
}

/// Settings that were accepted but could never work: a key header with `_` (client headers
/// with `_` are dropped, so every request counted by address), a limit of more than one request
/// a nanosecond (its interval was 0: no limit at all), CORS methods and headers that are not
/// tokens, and `"*"` in them with credentials (browsers read it literally then).
#[test]
fn settings_that_could_never_work_are_compile_errors() {
    let route = |extra: &str| {
        format!("[[route]]\nname = \"r\"\npath = \"/\"\nrespond = {{ status = 200 }}\n{extra}\n")
    };
    let has = |d: &[(String, String)], code: &str, text: &str| {
        d.iter().any(|(c, m)| c == code && m.contains(text))
    };
    let underscored =
        route("rate_limit = { requests = 10, per = \"1m\", key = \"header:x_api_key\" }");
    let d = compile_errors(&[("routes/r.toml", &underscored)]);
    assert!(
        has(&d, "invalid-rate-limit", "`x_api_key` has `_`"),
        "{d:?}"
    );
    // Unless underscores are kept.
    let d = compile_errors(&[
        ("gateway.toml", "[headers]\nallow_underscores = true\n"),
        ("routes/r.toml", &underscored),
    ]);
    assert!(d.is_empty(), "{d:?}");

    let d = compile_errors(&[(
        "routes/r.toml",
        &route("rate_limit = { requests = 4000000000, per = \"1s\" }"),
    )]);
    assert!(
        has(&d, "invalid-rate-limit", "more than one a nanosecond"),
        "{d:?}"
    );
    let d = compile_errors(&[(
        "routes/r.toml",
        &route("rate_limit = { requests = 1000000000, per = \"1s\" }"),
    )]);
    assert!(d.is_empty(), "one a nanosecond is countable: {d:?}");

    let d = compile_errors(&[(
        "routes/r.toml",
        &route(
            "cors = { allow_origins = [\"https://a.com\"], allow_methods = [\"GET\", \"FOO BAR\"], allow_headers = [\"x-a b\"] }",
        ),
    )]);
    assert!(
        has(&d, "invalid-cors", "`FOO BAR` is not a method"),
        "{d:?}"
    );
    assert!(has(&d, "invalid-cors", "`x-a b` is not a header"), "{d:?}");
    let d = compile_errors(&[(
        "routes/r.toml",
        &route(
            "cors = { allow_origins = [\"https://a.com\"], allow_methods = [\"*\"], allow_headers = [\"*\"], allow_credentials = true }",
        ),
    )]);
    assert!(has(&d, "invalid-cors", "\"*\" in `allow_methods`"), "{d:?}");
    assert!(has(&d, "invalid-cors", "\"*\" in `allow_headers`"), "{d:?}");
    let d = compile_errors(&[(
        "routes/r.toml",
        &route("rate_limit = { requests = 10, per = \"1m\", ipv6_prefix = 129 }"),
    )]);
    assert!(has(&d, "invalid-rate-limit", "ipv6_prefix = 129"), "{d:?}");
}

/// A shared limit keyed on a header the client chooses, where each value holds its Redis key
/// for a second or more, is a warning: nothing caps the keys a client can make.
#[test]
fn a_shared_limit_on_a_client_chosen_header_is_a_warning() {
    let route = |extra: &str| {
        format!("[[route]]\nname = \"r\"\npath = \"/\"\nrespond = {{ status = 200 }}\n{extra}\n")
    };
    let store = "[rate_limit_store]\nurl = \"redis://127.0.0.1:1/0\"\n";
    let warned = |limit: &str| {
        compile_errors(&[("gateway.toml", store), ("routes/r.toml", &route(limit))])
            .iter()
            .any(|(c, _)| c == "shared-limit-client-key")
    };
    assert!(warned(
        "rate_limit = { requests = 100, per = \"1h\", key = \"header:x-api-key\", store = \"redis\" }"
    ));
    // Local, a short interval, or a key the client does not choose: no warning.
    assert!(!warned(
        "rate_limit = { requests = 100, per = \"1h\", key = \"header:x-api-key\" }"
    ));
    assert!(!warned(
        "rate_limit = { requests = 600, per = \"1m\", key = \"header:x-api-key\", store = \"redis\" }"
    ));
    assert!(!warned(
        "rate_limit = { requests = 100, per = \"1h\", key = \"header:x-client-cert-sha256\", store = \"redis\" }"
    ));
}
