//! JWT authentication end to end, with the JWKS served by a real local HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use auth_support::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

fn gateway(jwks_url: &str, be: &Backend, route_extra: &str, min_refresh: &str) -> Gateway {
    let gw_toml = format!(
        r#"
[auth.idp]
type = "jwt"
algorithms = ["ES256"]
jwks_url = "{jwks_url}"
jwks_min_refresh = "{min_refresh}"
issuers = ["https://issuer.test"]
audiences = ["orders-api"]
claims_to_headers = {{ sub = "x-user", tenant = "x-tenant" }}
"#
    );
    let routes = format!(
        "[[route]]\nname = \"orders\"\nprefix = \"/orders\"\nupstream = \"be\"\nauth = \"idp\"\n{route_extra}\n\n[[route]]\nname = \"maybe\"\nprefix = \"/maybe\"\nupstream = \"be\"\nauth = \"idp\"\nauth_optional = true\n"
    );
    Gateway::start(&[
        ("gateway.toml", &gw_toml),
        ("routes/r.toml", &routes),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ])
}

#[test]
fn jwks_tokens_are_verified_and_claims_reach_the_upstream() {
    let keys = Keys::new(7);
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk("k1")]}),
    ));
    let jwks = jwks_server(Arc::clone(&doc), Arc::clone(&hits));
    let be = Backend::echo();
    let gw = gateway(&format!("{}/jwks.json", jwks.url()), &be, "", "30s");
    let bearer = format!("Bearer {}", keys.token("k1", claims()));

    let (status, _, body) = req(
        &gw,
        "/orders/1",
        &[("Authorization", &bearer), ("X-User", "spoofed")],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        upstream_header(&body, "x-user"),
        vec!["ana"],
        "claims overwrite client headers"
    );
    assert_eq!(upstream_header(&body, "x-tenant"), vec!["acme"]);
    assert!(
        upstream_header(&body, "authorization").is_empty(),
        "the token is not forwarded"
    );

    // No token.
    let (status, head, body) = req(&gw, "/orders/1", &[]);
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
        "a valid token is required"
    );

    // Expired, wrong audience, wrong issuer.
    for (field, value) in [
        ("exp", serde_json::json!(now() - 3600)),
        ("aud", "other".into()),
        ("iss", "https://evil.test".into()),
    ] {
        let mut c = claims();
        c[field] = value;
        let (status, head, _) = req(
            &gw,
            "/orders/1",
            &[("Authorization", &format!("Bearer {}", keys.token("k1", c)))],
        );
        assert_eq!(status, 401, "{field}");
        assert!(head.contains("error=\"invalid_token\""), "{head}");
    }
    // Signed by another key under the same kid.
    let forged = Keys::new(9).token("k1", claims());
    assert_eq!(
        req(
            &gw,
            "/orders/1",
            &[("Authorization", &format!("Bearer {forged}"))]
        )
        .0,
        401
    );

    // Algorithm confusion: HS256 "signed" with the public key as the HMAC secret.
    let pem = keys.public_pem();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let confused = encode(&h, &claims(), &EncodingKey::from_secret(pem.as_bytes())).unwrap();
    assert_eq!(
        req(
            &gw,
            "/orders/1",
            &[("Authorization", &format!("Bearer {confused}"))]
        )
        .0,
        401
    );

    // alg none with an empty signature.
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims().to_string())
    );
    assert_eq!(
        req(
            &gw,
            "/orders/1",
            &[("Authorization", &format!("Bearer {none}"))]
        )
        .0,
        401
    );

    // Oversized token: refused before any crypto.
    let huge = format!("Bearer {}", "a".repeat(9000));
    assert_eq!(req(&gw, "/orders/1", &[("Authorization", &huge)]).0, 401);

    // The same token in two places.
    let path = format!("/orders/1?access_token={}", keys.token("k1", claims()));
    assert_eq!(req(&gw, &path, &[("Authorization", &bearer)]).0, 401);

    // Optional auth: no token passes, a bad one does not.
    assert_eq!(req(&gw, "/maybe", &[]).0, 200);
    assert_eq!(
        req(&gw, "/maybe", &[("Authorization", "Bearer garbage")]).0,
        401
    );
    // The scheme's case does not matter (RFC 9110 §11.1): a bad token in any case is checked.
    assert_eq!(
        req(&gw, "/maybe", &[("Authorization", "BEARER garbage")]).0,
        401
    );
    let upper = format!("BEARER {}", keys.token("k1", claims()));
    assert_eq!(req(&gw, "/orders/1", &[("Authorization", &upper)]).0, 200);

    let (_, metrics) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.contains(r#"rustygate_auth_failures_total{reason="missing",route="orders"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"rustygate_auth_failures_total{reason="expired",route="orders"} 1"#),
        "{metrics}"
    );
}

#[test]
fn unknown_kid_refreshes_once_and_a_down_jwks_keeps_cached_keys() {
    let (k1, k2) = (Keys::new(7), Keys::new(11));
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [k1.jwk("k1")]}),
    ));
    let jwks = jwks_server(Arc::clone(&doc), Arc::clone(&hits));
    let be = Backend::fixed(200, "ok");
    // A URL of its own: JWKS caches are shared by URL across the process.
    let gw = gateway(&format!("{}/rotate.json", jwks.url()), &be, "", "3s");
    let t1 = format!("Bearer {}", k1.token("k1", claims()));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &t1)]).0, 200);
    let after_first = hits.load(Ordering::SeqCst);
    assert_eq!(after_first, 1);

    // The issuer rotates to k2: a token with the new kid triggers one refetch, as soon as the
    // refresh interval (3 s) since the last fetch allows...
    *doc.lock().unwrap() = serde_json::json!({"keys": [k1.jwk("k1"), k2.jwk("k2")]});
    let t2 = format!("Bearer {}", k2.token("k2", claims()));
    assert!(wait_until(Duration::from_secs(10), || req(
        &gw,
        "/orders",
        &[("Authorization", &t2)]
    )
    .0 == 200));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // ...and a burst of unknown kids does not stampede the JWKS endpoint.
    let t3 = format!("Bearer {}", Keys::new(13).token("k3", claims()));
    for _ in 0..10 {
        assert_eq!(req(&gw, "/orders", &[("Authorization", &t3)]).0, 401);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "refreshes are rate limited");

    // The JWKS endpoint goes away: cached keys keep working.
    drop(jwks);
    assert!(wait_until(Duration::from_secs(5), || req(
        &gw,
        "/orders",
        &[("Authorization", &t1)]
    )
    .0 == 200));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &t2)]).0, 200);
}

/// The issuer replaces the key under the same `kid`: tokens signed by the new key got 401 until
/// the TTL (10 minutes) refreshed the JWKS. A signature the cached key does not verify now
/// refreshes it once (rate limited, as for an unknown kid) and tries the new key.
#[test]
fn a_key_replaced_under_its_kid_is_refetched_on_a_bad_signature() {
    let (old, new) = (Keys::new(7), Keys::new(11));
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [old.jwk("k1")]}),
    ));
    let jwks = jwks_server(Arc::clone(&doc), Arc::clone(&hits));
    let be = Backend::fixed(200, "ok");
    let gw = gateway(&format!("{}/same-kid.json", jwks.url()), &be, "", "3s");
    let t_old = format!("Bearer {}", old.token("k1", claims()));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &t_old)]).0, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    *doc.lock().unwrap() = serde_json::json!({"keys": [new.jwk("k1")]});
    let t_new = format!("Bearer {}", new.token("k1", claims()));
    assert!(wait_until(Duration::from_secs(10), || req(
        &gw,
        "/orders",
        &[("Authorization", &t_new)]
    )
    .0 == 200));
    // A token the new key does not verify either (forged under a known kid) is 401, and a burst
    // of them fetches at most once per refresh interval.
    let forged = format!("Bearer {}", Keys::new(13).token("k1", claims()));
    let before = hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(req(&gw, "/orders", &[("Authorization", &forged)]).0, 401);
    }
    assert!(hits.load(Ordering::SeqCst) <= before + 1, "rate limited");
    // The replaced key no longer verifies.
    assert!(wait_until(Duration::from_secs(5), || req(
        &gw,
        "/orders",
        &[("Authorization", &t_old)]
    )
    .0 == 401));
}

#[test]
fn claim_rules_answer_403_and_policies_see_claims() {
    let keys = Keys::new(7);
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk("k1")]}),
    ));
    let jwks = jwks_server(doc, hits);
    let be = Backend::echo();
    let url = format!("{}/rules.json", jwks.url());
    let gw_toml = format!(
        "[auth.strict]\ntype = \"jwt\"\nalgorithms = [\"ES256\"]\njwks_url = \"{url}\"\nclaim_rules = [{{ claim = \"scope\", contains = \"orders:write\" }}]\n\n[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"ES256\"]\njwks_url = \"{url}\"\n"
    );
    let routes = "[[route]]\nname = \"write\"\nprefix = \"/write\"\nupstream = \"be\"\nauth = \"strict\"\n\n[[route]]\nname = \"read\"\nprefix = \"/read\"\nupstream = \"be\"\nauth = \"idp\"\npolicy = \"policies/tenant.rhai\"\n";
    let policy =
        "fn on_request(req) {\n    req.set_header(\"x-policy-tenant\", req.claims.tenant);\n}\n";
    let gw = Gateway::start(&[
        ("gateway.toml", &gw_toml),
        ("routes/r.toml", routes),
        ("policies/tenant.rhai", policy),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let bearer = format!("Bearer {}", keys.token("k1", claims()));
    let (status, head, _) = req(&gw, "/write", &[("Authorization", &bearer)]);
    assert_eq!(status, 403);
    assert!(head.contains("insufficient_scope"), "{head}");
    let (status, _, body) = req(&gw, "/read", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream_header(&body, "x-policy-tenant"), vec!["acme"]);
}

#[test]
fn auth_config_is_checked_at_compile_time() {
    let check = |gw: &str, route: &str| -> Vec<String> {
        let dir = repo(&[
            ("gateway.toml", gw),
            (
                "routes/r.toml",
                &format!(
                    "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = {{ status = 200 }}\n{route}\n"
                ),
            ),
        ]);
        let c = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
        c.diagnostics.iter().map(|d| d.code.to_string()).collect()
    };
    assert_eq!(
        check(
            "[auth.a]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"inline-secret\"\n",
            ""
        ),
        vec!["inline-secret"]
    );
    assert_eq!(
        check(
            "[auth.a]\ntype = \"jwt\"\nalgorithms = [\"HS256\", \"RS256\"]\njwks_url = \"https://x/jwks\"\n",
            ""
        ),
        vec!["invalid-auth"]
    );
    assert_eq!(
        check(
            "[auth.a]\ntype = \"jwt\"\nalgorithms = [\"none\"]\njwks_url = \"https://x/jwks\"\n",
            ""
        ),
        vec!["invalid-auth", "invalid-auth"]
    );
    assert_eq!(
        check(
            "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://x/jwks\"\n",
            "auth = \"ipd\""
        ),
        vec!["unknown-auth"]
    );
    assert!(
        check(
            "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://x/jwks\"\n",
            "auth = \"idp\""
        )
        .is_empty()
    );
}

#[test]
fn rate_limits_can_key_on_a_verified_claim() {
    let keys = Keys::new(7);
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk("k1")]}),
    ));
    let jwks = jwks_server(doc, Arc::new(AtomicUsize::new(0)));
    let be = Backend::fixed(200, "ok");
    let gw = gateway(
        &format!("{}/claimkey.json", jwks.url()),
        &be,
        "rate_limit = { requests = 1, per = \"1m\", key = \"claim:sub\" }",
        "30s",
    );
    let token_for = |sub: &str| {
        let mut c = claims();
        c["sub"] = sub.into();
        format!("Bearer {}", keys.token("k1", c))
    };
    let (ana, bo) = (token_for("ana"), token_for("bo"));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &ana)]).0, 200);
    assert_eq!(req(&gw, "/orders", &[("Authorization", &ana)]).0, 429);
    assert_eq!(
        req(&gw, "/orders", &[("Authorization", &bo)]).0,
        200,
        "another subject, another bucket"
    );
}

/// Only signature keys verify tokens, and only for their own algorithm: a JWK with
/// `use: "enc"`, or whose `alg` names another algorithm (or an encryption one), is not used,
/// even under the token's `kid` (RFC 7517 4.2/4.4, RFC 8725 3.1).
#[test]
fn jwks_keys_for_encryption_or_another_algorithm_do_not_verify() {
    let keys = Keys::new(7);
    let mut enc = keys.jwk("enc");
    enc["use"] = "enc".into();
    let mut es384 = keys.jwk("es384");
    es384["alg"] = "ES384".into();
    let mut oaep = keys.jwk("oaep");
    oaep["alg"] = "RSA-OAEP".into();
    let mut bare = keys.jwk("bare");
    bare.as_object_mut().unwrap().remove("alg");
    bare.as_object_mut().unwrap().remove("use");
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk("ok"), enc, es384, oaep, bare]}),
    ));
    let jwks = jwks_server(doc, Arc::new(AtomicUsize::new(0)));
    let be = Backend::fixed(200, "ok");
    let gw = gateway(&format!("{}/use-alg.json", jwks.url()), &be, "", "30s");
    for (kid, want) in [
        ("ok", 200),
        ("bare", 200),
        ("enc", 401),
        ("es384", 401),
        ("oaep", 401),
    ] {
        let bearer = format!("Bearer {}", keys.token(kid, claims()));
        assert_eq!(
            req(&gw, "/orders", &[("Authorization", &bearer)]).0,
            want,
            "{kid}"
        );
    }
}

/// The JWKS cache is kept by URL: a config that changes only `jwks_ttl` / `jwks_min_refresh`
/// keeps the cached keys (no fetch), and the new TTL applies to them.
#[test]
fn changing_the_jwks_ttl_keeps_the_cached_keys_and_applies_the_new_ttl() {
    let keys = Keys::new(7);
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk("k1")]}),
    ));
    let jwks = jwks_server(doc, Arc::clone(&hits));
    let be = Backend::fixed(200, "ok");
    let url = format!("{}/ttl-change.json", jwks.url());
    let files = |ttl: &str, min: &str| {
        vec![
            (
                "gateway.toml",
                format!(
                    "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"ES256\"]\njwks_url = \"{url}\"\n\
                     jwks_ttl = \"{ttl}\"\njwks_min_refresh = \"{min}\"\n"
                ),
            ),
            (
                "routes/r.toml",
                "[[route]]\nname = \"orders\"\nprefix = \"/orders\"\nupstream = \"be\"\nauth = \"idp\"\n"
                    .to_owned(),
            ),
            (
                "upstreams/u.toml",
                format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
            ),
        ]
    };
    let gw = Gateway::start(&as_refs(&files("1h", "30s")));
    let bearer = format!("Bearer {}", keys.token("k1", claims()));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &bearer)]).0, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    gw.swap(&as_refs(&files("2h", "1m")));
    assert_eq!(req(&gw, "/orders", &[("Authorization", &bearer)]).0, 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the cached keys were dropped"
    );

    // A TTL short enough to be over: the same cache refreshes.
    gw.swap(&as_refs(&files("1s", "1s")));
    assert!(wait_until(Duration::from_secs(15), || {
        req(&gw, "/orders", &[("Authorization", &bearer)]).0 == 200
            && hits.load(Ordering::SeqCst) >= 2
    }));
}
