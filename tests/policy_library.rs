#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The top-level `policies/` library on a real gateway with real loopback backends: the same
//! scripts the fixtures in examples/policies exercise in-process, here over sockets.

mod common;

use common::*;
use http::Request;
use hyper::Response;

fn library(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(name),
    )
    .unwrap()
}

/// A backend that answers `<label>:<x-tenant header>:<x-ab-variant header>`.
fn labelled(label: &'static str) -> Backend {
    Backend::start(
        move |req: hyper::Request<hyper::body::Incoming>| async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            let body = format!("{label}:{}:{}", h("x-tenant"), h("x-ab-variant"));
            Response::builder()
                .header("server", "backend")
                .body(full(body))
                .unwrap()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunset_tenants_and_ab_on_a_running_gateway() {
    let (api, eu, us, b) = (
        labelled("api"),
        labelled("eu"),
        labelled("us"),
        labelled("b"),
    );
    let upstreams = format!(
        "[upstream.api]\ntargets = [\"{}\"]\n[upstream.tenant-eu]\ntargets = [\"{}\"]\n[upstream.tenant-us]\ntargets = [\"{}\"]\n[upstream.shop-b]\ntargets = [\"{}\"]\n",
        api.url(),
        eu.url(),
        us.url(),
        b.url()
    );
    let routes = r#"
[[route]]
name = "versioned-api"
prefix = "/api"
strip_prefix = "/api"
upstream = "api"
policy = "policies/api-sunset.rhai"
policy_config = { versions = { "1" = { sunset = "Wed, 31 Dec 2025 23:59:59 GMT", retired = true, link = "https://example.com/v2" }, "2" = { sunset = "Fri, 31 Dec 2100 23:59:59 GMT" } } }

[[route]]
name = "tenants"
prefix = "/tenant"
upstream = "api"
policy = "policies/tenant-routing.rhai"
policy_config = { tenants = { acme = "tenant-eu", globex = "tenant-us" } }

[[route]]
name = "shop"
prefix = "/shop"
upstream = "api"
policy = "policies/ab-routing.rhai"
policy_config = { variants = [{ name = "control", upstream = "api", weight = 0 }, { name = "new", upstream = "shop-b", weight = 1 }] }
"#;
    let (sunset, tenants, ab) = (
        library("api-sunset.rhai"),
        library("tenant-routing.rhai"),
        library("ab-routing.rhai"),
    );
    let gw = Gateway::start(&[
        ("upstreams/u.toml", &upstreams),
        ("routes/r.toml", routes),
        ("policies/api-sunset.rhai", &sunset),
        ("policies/tenant-routing.rhai", &tenants),
        ("policies/ab-routing.rhai", &ab),
    ]);

    // A retired version: answered by the gateway, never reaching the backend.
    let r = get(&gw.url("/api/v1/orders")).await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert_eq!(r.header("sunset"), Some("Wed, 31 Dec 2025 23:59:59 GMT"));
    assert_eq!(
        r.header("link"),
        Some("<https://example.com/v2>; rel=\"sunset\"")
    );
    assert!(r.header("x-request-id").is_some());
    assert!(r.json()["error"].as_str().unwrap().contains("retired"));

    // A deprecated version: the backend answers, the response announces the sunset.
    let r = get(&gw.url("/api/v2/orders")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "api:-:-");
    assert_eq!(r.header("sunset"), Some("Fri, 31 Dec 2100 23:59:59 GMT"));
    assert_eq!(r.header("deprecation"), Some("true"));

    // Tenants: the header picks the backend, which learns the tenant.
    for (tenant, body) in [("acme", "eu:acme:-"), ("Globex", "us:globex:-")] {
        let r = send(
            Request::get(gw.url("/tenant/orders"))
                .header("x-tenant", tenant)
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!((r.status, r.text().as_str()), (200, body));
    }
    let r = send(
        Request::get(gw.url("/tenant/orders"))
            .header("x-tenant", "initech")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 403);

    // A/B: a new visitor lands on the only weighted variant and gets the cookie; the cookie
    // then keeps a visitor on control even though control has weight 0.
    let r = get(&gw.url("/shop/cart")).await;
    assert_eq!(r.text(), "b:-:new");
    assert_eq!(
        r.header("set-cookie"),
        Some("ab=new; Path=/; Max-Age=2592000; SameSite=Lax")
    );
    let r = send(
        Request::get(gw.url("/shop/cart"))
            .header("cookie", "x=1; ab=control")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.text(), "api:-:control");
    assert!(r.header("set-cookie").is_none());
}
