//! Route matching, rewriting and balancing through the running proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Request;

async fn get_host(gw: &Gateway, host: &str, path: &str) -> Reply {
    send(
        Request::get(gw.url(path))
            .header("host", host)
            .body(full(""))
            .unwrap(),
    )
    .await
}

fn tagged(tag: &'static str) -> Backend {
    Backend::start(move |req| async move {
        let body = format!("{tag} {}", req.uri());
        http::Response::new(full(body))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_rewrites_and_templates() {
    let be = Backend::echo();
    let routes = r#"
[[route]]
name = "strip"
prefix = "/orders"
strip_prefix = "/orders"
upstream = "be"

[[route]]
name = "strip-and-add"
prefix = "/legacy/items"
strip_prefix = "/legacy"
add_prefix = "/v2"
upstream = "be"

[[route]]
name = "template"
path = "/users/{id}/avatar"
rewrite = "/avatars/{id}.png"
upstream = "be"
"#;
    let gw = Gateway::start(&[
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let uri = |r: Reply| r.json()["uri"].as_str().unwrap().to_owned();
    assert_eq!(uri(get(&gw.url("/orders/7?full=1")).await), "/7?full=1");
    assert_eq!(uri(get(&gw.url("/orders")).await), "/");
    assert_eq!(uri(get(&gw.url("/legacy/items/3")).await), "/v2/items/3");
    assert_eq!(
        uri(get(&gw.url("/users/42/avatar")).await),
        "/avatars/42.png"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_wildcards_and_precedence() {
    let (a, b, c, d, e) = (
        tagged("exact-host"),
        tagged("wildcard"),
        tagged("param"),
        tagged("static"),
        tagged("fallback"),
    );
    let routes = r#"
[[route]]
name = "api-orders"
host = "api.example.com"
prefix = "/orders"
upstream = "a"

[[route]]
name = "tenants"
host = "*.example.com"
prefix = "/"
upstream = "b"

[[route]]
name = "user-by-id"
path = "/users/{id}"
upstream = "c"

[[route]]
name = "user-me"
path = "/users/me"
upstream = "d"

[[route]]
name = "fallback"
prefix = "/"
upstream = "e"
"#;
    let ups = format!(
        "[upstream.a]\ntargets = [\"{}\"]\n[upstream.b]\ntargets = [\"{}\"]\n[upstream.c]\ntargets = [\"{}\"]\n[upstream.d]\ntargets = [\"{}\"]\n[upstream.e]\ntargets = [\"{}\"]\n",
        a.url(),
        b.url(),
        c.url(),
        d.url(),
        e.url()
    );
    let gw = Gateway::start(&[("routes/r.toml", routes), ("upstreams/u.toml", &ups)]);
    assert_eq!(
        get_host(&gw, "api.example.com", "/orders/1").await.text(),
        "exact-host /orders/1"
    );
    assert_eq!(
        get_host(&gw, "API.Example.com:8080", "/orders")
            .await
            .text(),
        "exact-host /orders"
    );
    // The exact host has no match for this path: the wildcard takes it.
    assert_eq!(
        get_host(&gw, "api.example.com", "/other").await.text(),
        "wildcard /other"
    );
    assert_eq!(
        get_host(&gw, "shop.example.com", "/users/me").await.text(),
        "wildcard /users/me"
    );
    assert_eq!(
        get_host(&gw, "example.com", "/users/me").await.text(),
        "static /users/me"
    );
    assert_eq!(
        get_host(&gw, "other.org", "/users/7").await.text(),
        "param /users/7"
    );
    assert_eq!(
        get_host(&gw, "other.org", "/users/7/x").await.text(),
        "fallback /users/7/x"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_follows_weights() {
    let (a, b) = (tagged("a"), tagged("b"));
    let ups = format!(
        "[upstream.be]\ntargets = [\"{}\", {{ url = \"{}\", weight = 3 }}]\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n",
        ),
        ("upstreams/u.toml", &ups),
    ]);
    let (mut na, mut nb) = (0, 0);
    for _ in 0..400 {
        match &get(&gw.url("/")).await.text()[..1] {
            "a" => na += 1,
            _ => nb += 1,
        }
    }
    assert_eq!((na, nb), (100, 300));
}

#[tokio::test(flavor = "multi_thread")]
async fn header_rules_and_env_secrets() {
    let be = Backend::echo();
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("api-key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    // `cargo test` sets CARGO_PKG_NAME for the test process: a real variable to resolve.
    let routes = format!(
        r#"
[[route]]
name = "all"
prefix = "/"
upstream = "be"
host_rewrite = "internal.svc"
request_headers = {{ set = {{ "x-api-key" = {{ file = "{}" }}, "x-pkg" = {{ env = "CARGO_PKG_NAME" }}, "x-env" = "prod" }}, remove = ["cookie"] }}
response_headers = {{ set = {{ "x-frame-options" = "DENY" }}, remove = ["content-type"] }}
"#,
        key_file.display()
    );
    let gw = Gateway::start(&[
        ("routes/r.toml", &routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let reply = send(
        Request::get(gw.url("/"))
            .header("cookie", "session=1")
            .header("x-api-key", "client-supplied")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
    assert_eq!(reply.header("content-type"), None);
    let echo = reply.json();
    let h = |n: &str| -> Vec<String> {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x[0] == n)
            .map(|x| x[1].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(h("x-api-key"), vec!["s3cret"]);
    assert_eq!(h("x-env"), vec!["prod"]);
    assert_eq!(h("x-pkg"), vec!["rustygate"]);
    assert!(h("cookie").is_empty());
    assert_eq!(h("host"), vec!["internal.svc"]);
}

/// `..` spelled through an escaped slash or hidden behind path parameters must never reach a
/// route other than the one matched, and the upstream gets exactly the path that was matched.
#[test]
fn escaped_slash_and_matrix_climbs_follow_the_paths_setting() {
    let be = Backend::echo();
    let routes = r#"
[[route]]
name = "public"
prefix = "/public"
upstream = "be"

[[route]]
name = "admin"
prefix = "/admin"
respond = { status = 403, body = "admin route" }
"#;
    let ups = format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url());
    let files = |paths: &str| {
        vec![
            ("routes/r.toml", routes.to_owned()),
            ("upstreams/u.toml", ups.clone()),
            ("gateway.toml", paths.to_owned()),
        ]
    };
    let climbs = [
        "/public/..%2fadmin",
        "/public/..%2Fadmin",
        "/public/%2e%2e%2fadmin",
        "/public/%2E%2E%2Fadmin",
        "/public/x%2F..%2F..%2Fadmin",
    ];
    let refused = |gw: &Gateway, path: &str| {
        let (status, body) = gw.get(path);
        assert_eq!(status, 400, "{path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(json["error"].is_string(), "{body}");
    };
    let gw = Gateway::start(&as_refs(&files("")));
    let connections = || be.connections.load(std::sync::atomic::Ordering::SeqCst);

    // Default: every escaped slash is refused; so are backslashes and dot segments with params.
    for p in climbs {
        refused(&gw, p);
    }
    refused(&gw, "/public/group%2Fproject");
    for p in [
        "/public/..%5cadmin",
        "/public/..%5Cadmin",
        "/public/..\\admin",
        "/public/..;/admin",
        "/public/..;jsessionid=1/admin",
        "/public/%2e%2e;/admin",
        "/public/..%3B/admin",
    ] {
        refused(&gw, p);
    }
    assert_eq!(connections(), 0, "nothing refused reached the upstream");

    // "keep": an escaped slash inside an id is forwarded as it came; one hiding `..` is refused.
    gw.swap(&as_refs(&files("[paths]\nescaped_slashes = \"keep\"\n")));
    for p in climbs {
        refused(&gw, p);
    }
    refused(&gw, "/public/..;/admin");
    assert_eq!(connections(), 0);
    let (status, body) = gw.get("/public/group%2fproject/x");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["uri"], "/public/group%2Fproject/x");

    // "decode": the escaped slash is a slash; the climb is resolved before matching, so it is
    // the admin route that answers, and the public upstream never sees it.
    gw.swap(&as_refs(&files("[paths]\nescaped_slashes = \"decode\"\n")));
    let before = connections();
    for p in climbs {
        assert_eq!(gw.get(p), (403, "admin route".to_owned()), "{p}");
    }
    refused(&gw, "/public/..;/admin");
    assert_eq!(connections(), before);
    let (status, body) = gw.get("/public/group%2Fproject");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["uri"], "/public/group/project");
}

#[test]
fn an_unknown_escaped_slashes_choice_is_a_located_error() {
    let dir = repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = { status = 200 }\n",
        ),
        ("gateway.toml", "[paths]\nescaped_slashes = \"ignore\"\n"),
    ]);
    let compiled =
        rustygate::compile::compile_dir(dir.path(), &rustygate::compile::CompileOptions::default())
            .unwrap();
    assert!(compiled.snapshot.is_none());
    let text = compiled.diagnostics.render_short(&compiled.files);
    assert!(text.contains("gateway.toml:2:"), "{text}");
    assert!(text.contains("reject") && text.contains("decode"), "{text}");
}
