//! Inputs the fuzz targets in `fuzz/` found, kept as tests that run with `cargo test` (the
//! inputs themselves are under `fuzz/regressions/<target>/`, replayed by `fuzz/run.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustygate::compile::{CompileOptions, compile_dir};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// config_compile: a `leeway` longer than the time since 1970 compiled, and the verifier then
/// computed `now - leeway` and overflowed: a panic with overflow checks, and every token
/// "expired" without them. Input: fuzz/regressions/config_compile/jwt-leeway-overflow (there
/// `"100y"`: `y` is not a duration unit, so it is written here in days).
#[test]

fn a_jwt_leeway_beyond_the_epoch_is_refused_or_verifies_without_overflow() {
    let repo = common::repo(&[
        (
            "gateway.toml",
            "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = { env = \"FUZZ_UNSET_SECRET\" }\nleeway = \"36500d\"\n",
        ),
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\nprefix = \"/\"\nauth = \"idp\"\nrespond = { status = 200 }\n",
        ),
    ]);
    let opts = CompileOptions {
        resolve_secrets: false,
        ..CompileOptions::default()
    };
    let compiled = compile_dir(repo.path(), &opts).unwrap();
    let Some(snapshot) = compiled.snapshot else {
        // Refused at compile time, with a located error: the fix taken.
        let text = compiled.diagnostics.render_human(&compiled.files);
        assert!(text.contains("longer than 365 days"), "{text}");
        assert!(text.contains("gateway.toml:1:"), "{text}");
        return;
    };
    let provider = &snapshot.routes[0].auth.as_ref().unwrap().provider;
    let claims = serde_json::json!({"exp": now() + 60, "sub": "a"});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b""),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let verdict = rt.block_on(provider.verify(&token));
    assert!(verdict.is_ok(), "{verdict:?}");
}

/// config_compile: `total_timeout = "300000000000y"` compiled, and every request on the route
/// then panicked in `Instant::now() + total_timeout` (the client got an empty reply; seen by
/// hand against `rustygate serve`). Input:
/// fuzz/regressions/config_compile/total-timeout-instant-overflow (there `"300000000000y"`: `y`
/// is not a duration unit, so it is written here in hours).
#[test]

fn a_timeout_past_the_clock_range_is_refused() {
    let repo = common::repo(&[
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"u\"\ntotal_timeout = \"300000000000h\"\n",
        ),
        (
            "upstreams/u.toml",
            "[upstream.u]\ntargets = [\"http://127.0.0.1:1\"]\nidle_timeout = \"300000000000h\"\n",
        ),
    ]);
    let compiled = compile_dir(repo.path(), &CompileOptions::default()).unwrap();
    let Some(snapshot) = compiled.snapshot else {
        let text = compiled.diagnostics.render_human(&compiled.files);
        assert!(text.contains("longer than 365 days"), "{text}");
        assert!(text.contains("routes/a.toml:5:"), "{text}");
        assert!(text.contains("upstreams/u.toml:3:"), "{text}");
        return;
    };
    let now = std::time::Instant::now();
    let route = &snapshot.routes[0];
    let upstream = &snapshot.upstreams[0];
    for d in [route.total_timeout, Some(upstream.idle_timeout)]
        .into_iter()
        .flatten()
    {
        assert!(now.checked_add(d).is_some(), "{d:?} compiled");
    }
}
