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
