//! Token edge cases through a real gateway: `crit`, fractional dates with the per-worker cache,
//! and cached tokens whose `kid` a JWKS refresh no longer lists. One worker, so every request
//! meets the cache the first one filled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_support::*;
use common::*;
use jsonwebtoken::Header;
use rustygate::server::ServeOptions;

/// A one-worker gateway whose `/orders` needs an ES256 token from the JWKS at `url`.
fn gateway(url: &str, provider_extra: &str) -> (Gateway, Backend, tempfile::TempDir) {
    gateway_for(url, "[\"ES256\"]", provider_extra)
}

/// [`gateway`] with the provider's `algorithms` list.
fn gateway_for(
    url: &str,
    algorithms: &str,
    provider_extra: &str,
) -> (Gateway, Backend, tempfile::TempDir) {
    let be = Backend::fixed(200, "ok");
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[auth.idp]\ntype = \"jwt\"\nalgorithms = {algorithms}\njwks_url = \"{url}\"\nissuers = [\"https://issuer.test\"]\naudiences = [\"orders-api\"]\n{provider_extra}\n"
            ),
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"orders\"\nprefix = \"/orders\"\nupstream = \"be\"\nauth = \"idp\"\n",
        ),
        (
            "upstreams/u.toml",
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
    (gw, be, dir)
}

fn status(gw: &Gateway, token: &str) -> u16 {
    req(
        gw,
        "/orders",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .0
}

#[test]
fn a_crit_header_is_refused() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "crit.json");
    let (gw, _be, _dir) = gateway(&url, "");
    assert_eq!(status(&gw, &keys.token("k1", claims())), 200);
    for crit in [
        vec!["b64".to_owned()],
        vec!["urn:example:ext".to_owned()],
        vec![],
    ] {
        let h = Header {
            crit: Some(crit.clone()),
            ..Header::default()
        };
        let (code, head, _) = req(
            &gw,
            "/orders",
            &[(
                "Authorization",
                &format!("Bearer {}", keys.token_with("k1", h, claims())),
            )],
        );
        assert_eq!(code, 401, "{crit:?}");
        assert!(head.contains("error=\"invalid_token\""), "{head}");
    }
}

#[test]
fn a_fractional_exp_expires_on_time_whether_or_not_cached() {
    let keys = Keys::new(7);
    let (_jwks, url) = static_jwks(&keys, "k1", "fraction.json");
    let (gw, _be, _dir) = gateway(&url, "leeway = \"0s\"");
    // As PyJWT writes `time.time() + 4.5` (3.5 to 4.5 s from now: room for the first JWKS
    // fetch on a loaded machine).
    let mut c = claims();
    c["exp"] = serde_json::json!(now() as f64 + 4.5);
    let t = keys.token("k1", c);
    assert_eq!(status(&gw, &t), 200);
    assert_eq!(status(&gw, &t), 200, "answered from the cache");
    assert!(
        wait_until(Duration::from_secs(15), || status(&gw, &t) == 401),
        "the cached token never expired"
    );
    for _ in 0..5 {
        assert_eq!(status(&gw, &t), 401);
    }
    // Already expired by a fraction: refused the first time and every time after.
    let mut c = claims();
    c["exp"] = serde_json::json!(now() as f64 - 1.5);
    let t = keys.token("k1", c);
    for _ in 0..3 {
        assert_eq!(status(&gw, &t), 401);
    }
    // Not a NumericDate at all.
    for bad in [serde_json::json!("2999999999"), serde_json::json!(-5)] {
        let mut c = claims();
        c["exp"] = bad;
        assert_eq!(status(&gw, &keys.token("k1", c)), 401);
    }
}

#[test]
fn a_cached_token_stops_working_once_a_refresh_drops_its_kid() {
    let (k1, k2) = (Keys::new(7), Keys::new(11));
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = Arc::new(Mutex::new(serde_json::json!({"keys": [k1.jwk("k1")]})));
    let jwks = jwks_server(Arc::clone(&doc), Arc::clone(&hits));

    // A refresh prompted by an unknown kid (the TTL is long: nothing else refreshes).
    let (gw, _be, _dir) = gateway(
        &format!("{}/unknown-kid.json", jwks.url()),
        "jwks_ttl = \"1h\"\njwks_min_refresh = \"1s\"",
    );
    let t1 = k1.token("k1", claims());
    let t2 = k2.token("k2", claims());
    assert_eq!(status(&gw, &t1), 200);
    assert_eq!(status(&gw, &t1), 200, "answered from the cache");
    *doc.lock().unwrap() = serde_json::json!({"keys": [k2.jwk("k2")]});
    assert!(wait_until(Duration::from_secs(10), || status(&gw, &t2) == 200));
    for _ in 0..3 {
        assert_eq!(status(&gw, &t1), 401, "k1 is no longer published");
    }
    drop(gw);

    // A refresh prompted by the TTL, while the token is only ever answered from the cache.
    *doc.lock().unwrap() = serde_json::json!({"keys": [k1.jwk("k1"), k2.jwk("k2")]});
    let before = hits.load(Ordering::SeqCst);
    let (gw, _be, _dir) = gateway(
        &format!("{}/ttl.json", jwks.url()),
        "jwks_ttl = \"1s\"\njwks_min_refresh = \"1s\"",
    );
    assert_eq!(status(&gw, &t1), 200);
    assert_eq!(status(&gw, &t2), 200);
    *doc.lock().unwrap() = serde_json::json!({"keys": [k2.jwk("k2")]});
    assert!(
        wait_until(Duration::from_secs(10), || status(&gw, &t1) == 401),
        "a cached token outlived its kid"
    );
    assert!(hits.load(Ordering::SeqCst) >= before + 2);
    // The key that is still published keeps working, from the same refreshed set.
    assert_eq!(status(&gw, &t2), 200);
}

#[test]
fn a_plain_http_jwks_url_to_another_host_is_a_warning() {
    let provider = |url: &str| {
        format!("[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_url = \"{url}\"\n")
    };
    let route =
        "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = { status = 200 }\nauth = \"idp\"\n";
    let codes = |url: &str| -> Vec<String> {
        let dir = repo(&[("gateway.toml", &provider(url)), ("routes/r.toml", route)]);
        let c = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
        c.diagnostics.iter().map(|d| d.code.to_string()).collect()
    };
    for remote in [
        "http://idp.example.com/jwks",
        "http://10.0.0.7:8080/jwks",
        "http://localhost.example.com/jwks",
    ] {
        assert_eq!(codes(remote), vec!["insecure-jwks-url"], "{remote}");
    }
    for fine in [
        "https://idp.example.com/jwks",
        "http://localhost:9000/jwks",
        "http://127.0.0.1:9000/jwks",
        "http://127.8.0.1/jwks",
        "http://[::1]:9000/jwks",
    ] {
        assert!(codes(fine).is_empty(), "{fine}: {:?}", codes(fine));
    }

    // `validate` shows it located, and fails with it under --deny-warnings.
    let dir = repo(&[
        ("gateway.toml", &provider("http://idp.example.com/jwks")),
        ("routes/r.toml", route),
    ]);
    let validate = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .arg("validate")
            .args(args)
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = validate(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("warning[insecure-jwks-url]"), "{stderr}");
    assert!(stderr.contains("gateway.toml:4:"), "{stderr}");
    let out = validate(&["--deny-warnings"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error[insecure-jwks-url]"));
}

/// Two public-key families listed at once (ES256 and EdDSA): each token is checked with its
/// own algorithm, and each verifies against its key in one JWKS.
#[test]
fn tokens_of_two_listed_key_families_each_verify() {
    use base64::Engine as _;
    let es = Keys::new(7);
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ed.public_key_raw());
    let doc = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!({"keys": [
        es.jwk("es"),
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "ed", "alg": "EdDSA", "use": "sig"},
    ]})));
    let jwks = jwks_server(doc, std::sync::Arc::default());
    let url = format!("{}/mixed.json", jwks.url());
    let (gw, _be, _dir) = gateway_for(&url, "[\"ES256\", \"EdDSA\"]", "");
    assert_eq!(status(&gw, &es.token("es", claims())), 200);
    let mut h = Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("ed".into());
    let key = jsonwebtoken::EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&h, &claims(), &key).unwrap();
    assert_eq!(status(&gw, &token), 200);
    // Each key still verifies only its own algorithm's tokens.
    h.kid = Some("es".into());
    let token = jsonwebtoken::encode(&h, &claims(), &key).unwrap();
    assert_eq!(status(&gw, &token), 401);
}
