#![allow(clippy::unwrap_used, clippy::expect_used)]
//! URLs in the upstream's response headers: `Location`, `Content-Location` and `Refresh` that
//! name the upstream's own origin reach the client as the gateway's (nginx's `proxy_redirect
//! default`).

mod common;

use common::{Backend, full, send};
use hyper::{Request, Response};

/// A backend whose every answer is a 302 naming its own address, with the path it was asked
/// for under `/login`, plus a relative and a foreign URL.
fn redirecting() -> Backend {
    let addr = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let own = std::sync::Arc::clone(&addr);
    let b = Backend::start(move |req: Request<hyper::body::Incoming>| {
        let origin = own.get().cloned().unwrap_or_default();
        async move {
            Response::builder()
                .status(302)
                .header(
                    "location",
                    format!("{origin}/v2/login?from={}", req.uri().path()),
                )
                .header("content-location", format!("{origin}/v2/page"))
                .header("refresh", format!("3; url={origin}/elsewhere"))
                .header("x-relative", "/v2/login")
                .header("link", format!("<{origin}/v2/x>; rel=next"))
                .body(full(""))
                .unwrap()
        }
    });
    addr.set(b.url()).unwrap();
    b
}

/// GET `path` with `Host: shop.example:8443`: the response's headers.
async fn get_as_client(gw: &common::Gateway, path: &str) -> http::HeaderMap {
    let req = Request::get(gw.url(path))
        .header("host", "shop.example:8443")
        .body(full(""))
        .unwrap();
    let reply = send(req).await;
    assert_eq!(reply.status, 302);
    reply.headers
}

fn config(backend: &Backend, route_extra: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "routes/shop.toml",
            format!(
                "[[route]]\nname = \"shop\"\nprefix = \"/shop\"\nupstream = \"be\"\n\
                 strip_prefix = \"/shop\"\nadd_prefix = \"/v2\"\n{route_extra}\n"
            ),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"{}\"]\n", backend.url()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_the_upstreams_origin_names_the_gateway_and_the_routes_path() {
    let backend = redirecting();
    // Relayed as it came, and edited on the way (a response header rule).
    for extra in ["", "response_headers = { remove = [\"server\"] }"] {
        let gw = common::Gateway::start(&common::as_refs(&config(&backend, extra)));
        let h = get_as_client(&gw, "/shop/cart").await;
        assert_eq!(
            h["location"], "http://shop.example:8443/shop/login?from=/v2/cart",
            "{extra}"
        );
        assert_eq!(h["content-location"], "http://shop.example:8443/shop/page");
        // Not under the route's `add_prefix`: the origin only.
        assert_eq!(h["refresh"], "3; url=http://shop.example:8443/elsewhere");
        // Other headers, and relative URLs, are not the gateway's to touch.
        assert_eq!(h["x-relative"], "/v2/login");
        let link = h["link"].to_str().unwrap();
        assert!(
            link.starts_with(&format!("<{}/v2/x>", backend.url())),
            "{link}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_proxy_says_which_scheme_the_client_used() {
    let backend = redirecting();
    let mut files = config(&backend, "");
    files.push((
        "gateway.toml",
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n".to_owned(),
    ));
    let gw = common::Gateway::start(&common::as_refs(&files));
    let req = Request::get(gw.url("/shop/"))
        .header("host", "shop.example")
        .header("x-forwarded-proto", "https")
        .body(full(""))
        .unwrap();
    let reply = send(req).await;
    assert_eq!(
        reply.headers["location"],
        "https://shop.example/shop/login?from=/v2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrite_location_false_relays_the_upstreams_urls() {
    let backend = redirecting();
    let gw = common::Gateway::start(&common::as_refs(&config(
        &backend,
        "rewrite_location = false",
    )));
    let h = get_as_client(&gw, "/shop/cart").await;
    assert_eq!(
        h["location"],
        format!("{}/v2/login?from=/v2/cart", backend.url()).as_str()
    );
    assert_eq!(
        h["content-location"],
        format!("{}/v2/page", backend.url()).as_str()
    );
}

/// A plugin that copies the response's `Location`, as it reads it, into `x-seen-location`.
const SEES_LOCATION: &str = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "location")
  (data (i32.const 16) "x-seen-location")
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 2) (i32.const 0) (i32.const 8) (i32.const 64) (i32.const 68)))
      (then (drop (call $add (i32.const 2) (i32.const 16) (i32.const 15)
        (i32.load (i32.const 64)) (i32.load (i32.const 68))))))
    (i32.const 0)))"#;

/// A plugin reading the response head sees the `Location` the client gets, whether the head
/// is relayed as it came or edited on the way: the rewrite comes first, as nginx's
/// `proxy_redirect` comes before its output filters.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_read_the_url_the_client_gets() {
    use sha2::Digest;
    let backend = redirecting();
    let wasm = wat::parse_str(SEES_LOCATION).unwrap();
    for extra in ["", "response_headers = { remove = [\"server\"] }"] {
        let mut files = config(
            &backend,
            &format!("{extra}\nplugins = [{{ name = \"sees\" }}]"),
        );
        files.push((
            "gateway.toml",
            format!(
                "[plugin.sees]\nfile = \"plugins/sees.wasm\"\nsha256 = \"{}\"\n",
                hex::encode(sha2::Sha256::digest(&wasm))
            ),
        ));
        let dir = common::repo(&common::as_refs(&files));
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("plugins/sees.wasm"), &wasm).unwrap();
        let gw = common::Gateway::start_one_worker(dir);
        let h = get_as_client(&gw, "/shop/cart").await;
        let client = "http://shop.example:8443/shop/login?from=/v2/cart";
        assert_eq!(h["location"], client, "{extra}");
        assert_eq!(h["x-seen-location"], client, "{extra}");
    }
}
