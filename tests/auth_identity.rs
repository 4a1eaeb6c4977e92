//! Identity headers come only from verified claims; client headers with `_` are dropped; a token
//! that is not forwarded is removed from wherever it was; a token place given twice is a 400.
//! A real gateway, a real JWKS server and an echo upstream, all on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;

use auth_support::*;
use common::*;

const PROVIDER: &str = r#"type = "jwt"
algorithms = ["ES256"]
jwks_url = "URL"
issuers = ["https://issuer.test"]
audiences = ["orders-api"]
claims_to_headers = { sub = "x-user-id", tenant = "x-tenant" }
"#;

/// What the policy saw of the client request, echoed to the upstream as headers.
const POLICY: &str = r#"fn on_request(req) {
    if req.has_header("x-user-id") { req.set_header("x-policy-saw", req.header("x-user-id")); }
    if req.has_header("x-tenant") { req.set_header("x-policy-saw-tenant", req.header("x-tenant")); }
    req.set_header("x-policy-query", "q=" + req.query);
}
"#;

fn gateway(url: &str, be: &Backend, headers_section: &str) -> Gateway {
    let provider = |extra: &str| format!("{}{extra}\n", PROVIDER.replace("URL", url));
    let gw = format!(
        "policy = \"policies/see.rhai\"\n{headers_section}\n\n[auth.idp]\n{}\n[auth.q]\n{}\n[auth.c]\n{}\n[auth.h]\n{}\n[auth.fwd]\n{}",
        provider(""),
        provider("token = \"query:jwt\""),
        provider("token = \"cookie:jwt\""),
        provider("token = \"header:x-token\""),
        provider("token = \"query:jwt\"\nforward_token = true"),
    );
    let route = |name: &str, extra: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nprefix = \"/{name}\"\nupstream = \"be\"\n{extra}\n\n"
        )
    };
    let routes = [
        route("orders", "auth = \"idp\""),
        route("maybe", "auth = \"idp\"\nauth_optional = true"),
        route("open", ""),
        route("q", "auth = \"q\""),
        route("c", "auth = \"c\""),
        route("h", "auth = \"h\""),
        route("fwd", "auth = \"fwd\""),
    ]
    .concat();
    Gateway::start(&[
        ("gateway.toml", &gw),
        ("routes/r.toml", &routes),
        ("policies/see.rhai", POLICY),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ])
}

/// A client trying to pass as `admin`, in every spelling.
const SPOOF: [(&str, &str); 4] = [
    ("X-User-Id", "admin"),
    ("X_User_Id", "admin"),
    ("X-Tenant", "evil"),
    ("x_tenant", "evil"),
];

fn with_spoof<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = SPOOF.to_vec();
    h.extend_from_slice(extra);
    h
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap()
}

#[test]
fn identity_headers_come_only_from_verified_claims() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "identity.json");
    let be = Backend::echo();
    let gw = gateway(&url, &be, "");
    let mut no_tenant = claims();
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let bearer = format!("Bearer {}", keys.token("k1", no_tenant));

    // A valid token without `tenant`, an optional route without a token, and an optional route
    // with that token: the client's copies never reach the upstream, nor the policy.
    for (path, auth) in [
        ("/orders", Some(bearer.as_str())),
        ("/maybe", None),
        ("/maybe", Some(bearer.as_str())),
    ] {
        let extra: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, _, body) = req(&gw, path, &with_spoof(&extra));
        assert_eq!(status, 200, "{path}: {body}");
        let want_user: Vec<String> = auth.map(|_| "ana".to_owned()).into_iter().collect();
        assert_eq!(upstream_header(&body, "x-user-id"), want_user, "{path}");
        assert!(
            upstream_header(&body, "x-tenant").is_empty(),
            "{path}: {body}"
        );
        assert!(
            !upstream_header_names(&body).iter().any(|n| n.contains('_')),
            "{path}: {body}"
        );
        assert!(
            upstream_header(&body, "x-policy-saw").is_empty(),
            "{path}: {body}"
        );
        assert!(
            upstream_header(&body, "x-policy-saw-tenant").is_empty(),
            "{path}"
        );
    }

    // Without a token on a required route: 401, nothing forwarded.
    let (status, _, body) = req(&gw, "/orders", &with_spoof(&[]));
    assert_eq!(status, 401);
    assert_eq!(json(&body)["error"], "a valid token is required");

    // A route without auth passes X-User-Id on (nothing there claims it), never `_` names.
    let (status, _, body) = req(&gw, "/open", &with_spoof(&[]));
    assert_eq!(status, 200);
    assert_eq!(upstream_header(&body, "x-user-id"), vec!["admin"]);
    assert!(!upstream_header_names(&body).iter().any(|n| n.contains('_')));

    // Claims that cannot be header values refuse the request; the client's copy never goes.
    for bad in [
        serde_json::json!({"id": "admin"}),
        serde_json::json!(["admin"]),
        serde_json::json!("admin\u{7}"),
        serde_json::json!("admin\tx"),
    ] {
        let mut c = claims();
        c["tenant"] = bad.clone();
        let auth = format!("Bearer {}", keys.token("k1", c));
        let (status, head, body) = req(&gw, "/maybe", &with_spoof(&[("Authorization", &auth)]));
        assert_eq!(status, 401, "{bad}: {body}");
        assert!(head.contains("error=\"invalid_token\""), "{head}");
        assert_eq!(json(&body)["error"], "a valid token is required");
    }
    // Numbers are written as JSON writes them.
    let mut c = claims();
    c["sub"] = 42.into();
    let auth = format!("Bearer {}", keys.token("k1", c));
    let (status, _, body) = req(&gw, "/orders", &[("Authorization", &auth)]);
    assert_eq!(status, 200);
    assert_eq!(upstream_header(&body, "x-user-id"), vec!["42"]);
}

#[test]
fn underscore_headers_pass_only_when_allowed_and_never_as_an_identity_header() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "underscores.json");
    let be = Backend::echo();
    let gw = gateway(&url, &be, "[headers]\nallow_underscores = true");
    let (status, _, body) = req(&gw, "/open", &[("X_Trace_Id", "t1")]);
    assert_eq!(status, 200);
    assert_eq!(upstream_header(&body, "x_trace_id"), vec!["t1"]);
    // On a route with auth, a spelling of a claims header with `_` is still removed.
    let (status, _, body) = req(&gw, "/maybe", &with_spoof(&[("X_Trace_Id", "t1")]));
    assert_eq!(status, 200);
    assert!(upstream_header(&body, "x_user_id").is_empty(), "{body}");
    assert!(upstream_header(&body, "x_tenant").is_empty(), "{body}");
    assert_eq!(upstream_header(&body, "x_trace_id"), vec!["t1"]);
}

#[test]
fn a_token_that_is_not_forwarded_is_removed_from_wherever_it_was() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "removal.json");
    let be = Backend::echo();
    let gw = gateway(&url, &be, "");
    let t = keys.token("k1", claims());

    let (status, _, body) = req(&gw, &format!("/q?a=1&jwt={t}&b=2"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_uri(&body), "/q?a=1&b=2");
    assert_eq!(upstream_header(&body, "x-policy-query"), vec!["q=a=1&b=2"]);
    let (_, _, body) = req(&gw, &format!("/q?jwt={t}"), &[]);
    assert_eq!(upstream_uri(&body), "/q");
    // A bearer provider also reads `access_token` from the query (RFC 6750 §2.3).
    let (status, _, body) = req(&gw, &format!("/orders/1?access_token={t}&x=y"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_uri(&body), "/orders/1?x=y");
    assert_eq!(upstream_header(&body, "x-user-id"), vec!["ana"]);

    let cookie = format!("a=1; jwt={t}; jwtx=2");
    let (status, _, body) = req(&gw, "/c", &[("Cookie", &cookie)]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_header(&body, "cookie"), vec!["a=1; jwtx=2"]);
    let (_, _, body) = req(&gw, "/c", &[("Cookie", &format!("jwt={t}"))]);
    assert!(upstream_header(&body, "cookie").is_empty(), "{body}");

    let (status, _, body) = req(&gw, "/h", &[("X-Token", &t)]);
    assert_eq!(status, 200, "{body}");
    assert!(upstream_header(&body, "x-token").is_empty());

    // A query provider reads `access_token` too: a second token there is not passed on
    // unverified next to the verified one.
    let (status, _, body) = req(&gw, &format!("/q?jwt={t}&access_token=forged.x.y"), &[]);
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = req(&gw, &format!("/q?access_token={t}&x=1"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_uri(&body), "/q?x=1");

    // forward_token = true keeps it where it was.
    let (status, _, body) = req(&gw, &format!("/fwd?jwt={t}"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_uri(&body), format!("/fwd?jwt={t}"));
}

#[test]
fn a_token_place_given_twice_is_a_bad_request() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "twice.json");
    let be = Backend::echo();
    let gw = gateway(&url, &be, "");
    let t = keys.token("k1", claims());
    let bearer = format!("Bearer {t}");
    let twice_cookie = format!("jwt={t}; jwt={t}");
    let one_cookie = format!("jwt={t}");
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("/orders?access_token={t}&access_token={t}"), vec![]),
        (format!("/orders?access_token={t}&access%5Ftoken=x"), vec![]),
        (format!("/maybe?access_token={t}&access_token=x"), vec![]),
        (format!("/q?jwt={t}&jwt={t}"), vec![]),
        (
            "/orders".into(),
            vec![("Authorization", &bearer), ("Authorization", &bearer)],
        ),
        (
            "/maybe".into(),
            vec![
                ("Authorization", &bearer),
                ("Authorization", "Basic Zm9vOmJhcg=="),
            ],
        ),
        ("/h".into(), vec![("X-Token", &t), ("X-Token", &t)]),
        ("/c".into(), vec![("Cookie", &twice_cookie)]),
        (
            "/c".into(),
            vec![("Cookie", &one_cookie), ("Cookie", &one_cookie)],
        ),
    ];
    for (path, headers) in &cases {
        let (status, head, body) = req(&gw, path, headers);
        assert_eq!(status, 400, "{path} {headers:?}: {body}");
        assert!(head.contains("error=\"invalid_request\""), "{head}");
        assert_eq!(json(&body)["error"], "the token is given more than once");
    }
    // Once is fine.
    assert_eq!(req(&gw, &format!("/q?jwt={t}"), &[]).0, 200);
    assert_eq!(req(&gw, "/c", &[("Cookie", &one_cookie)]).0, 200);
}

/// Every provider also looks in `Authorization: Bearer` (docs/security.md): on a route whose
/// provider reads `X-Token`, a bearer token alone is verified as the token (and removed), and a
/// bearer credential beside the verified `X-Token` makes the request ambiguous (401), so that
/// no unverified bearer token reaches the upstream.
#[test]
fn a_header_provider_also_reads_the_authorization_bearer_token() {
    let keys = Keys::new(8);
    let (_jwks, url) = static_jwks(&keys, "k1", "bearer.json");
    let be = Backend::echo();
    let gw = gateway(&url, &be, "");
    let t = keys.token("k1", claims());
    let bearer = format!("Bearer {t}");
    let (status, _, body) = req(&gw, "/h", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.to_ascii_lowercase().contains("authorization"),
        "{body}"
    );
    let (status, _, body) = req(
        &gw,
        "/h",
        &[
            ("X-Token", &t),
            ("Authorization", "Bearer upstream-api-key"),
        ],
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(req(&gw, "/h", &[("X-Token", &t)]).0, 200);
}

#[test]
fn a_rate_limit_keyed_on_an_identity_header_counts_the_verified_value_not_the_clients() {
    let keys = Keys::new(9);
    let (_jwks, url) = static_jwks(&keys, "k1", "limit.json");
    let be = Backend::echo();
    let gw_toml = format!("[auth.idp]\n{}", PROVIDER.replace("URL", &url));
    let routes = "[[route]]\nname = \"per-user\"\nprefix = \"/per-user\"\nupstream = \"be\"\n\
                  auth = \"idp\"\nauth_optional = true\n\
                  rate_limit = { requests = 2, per = \"1m\", key = \"header:x-user-id\" }\n";
    let gw = Gateway::start(&[
        ("gateway.toml", gw_toml.as_str()),
        ("routes/r.toml", routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let bearer = format!("Bearer {}", keys.token("k1", claims()));
    // The same verified user, posing as someone new each time: one bucket, the verified one.
    let statuses: Vec<u16> = (0..4)
        .map(|i| {
            let spoof = format!("someone-{i}");
            req(
                &gw,
                "/per-user",
                &[
                    ("Authorization", bearer.as_str()),
                    ("X-User-Id", spoof.as_str()),
                ],
            )
            .0
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429]);
    // Without a token the client's copy is gone too: anonymous requests count by client
    // address (all of these come from 127.0.0.1), whatever X-User-Id or X_User_Id they send.
    let anonymous: Vec<u16> = (0..3)
        .map(|i| {
            let spoof = format!("anon-{i}");
            req(
                &gw,
                "/per-user",
                &[("X-User-Id", spoof.as_str()), ("X_User_Id", spoof.as_str())],
            )
            .0
        })
        .collect();
    assert_eq!(anonymous, [200, 200, 429]);
}
