use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECRET: &[u8] = b"s3cret-s3cret-s3cret-s3cret-s3cret";

fn validation(leeway: u64, require_exp: bool) -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&["https://issuer.test"]);
    v.set_audience(&["api"]);
    v.leeway = leeway;
    // As compiled providers have it: the dates are checked by `cache::Window`.
    v.validate_exp = false;
    v.validate_nbf = false;
    let mut required = vec!["iss", "aud"];
    if require_exp {
        required.push("exp");
    }
    v.set_required_spec_claims(&required);
    v
}

fn provider_with(rules: Vec<ClaimRule>, v: Validation) -> JwtProvider {
    JwtProvider {
        id: next_provider_id(),
        name: "t".into(),
        validation: v,
        keys: Keys::Static(vec![DecodingKey::from_secret(SECRET)]),
        source: TokenSource::Bearer,
        rules,
        claims_to_headers: vec![("sub".into(), HeaderName::from_static("x-user"))],
        forward_token: false,
    }
}

fn provider(rules: Vec<ClaimRule>) -> JwtProvider {
    provider_with(rules, validation(5, true))
}

fn now() -> i64 {
    unix_now() as i64
}

fn token(alg: Algorithm, claims: serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn good_claims() -> serde_json::Value {
    serde_json::json!({"sub": "ana", "iss": "https://issuer.test", "aud": "api", "exp": now() + 60, "scope": "orders:read orders:write"})
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

#[test]
fn valid_token_yields_claims_and_headers() {
    let p = provider(vec![ClaimRule::Contains(
        "scope".into(),
        "orders:read".into(),
    )]);
    let claims = block_on(p.verify(&token(Algorithm::HS256, good_claims(), SECRET))).unwrap();
    assert_eq!(claims["sub"], "ana");
    assert_eq!(
        p.claim_headers(&claims).unwrap(),
        vec![(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("ana")
        )]
    );
}

#[test]
fn claims_that_cannot_be_header_values_are_errors_and_absent_ones_send_nothing() {
    let p = provider(vec![]);
    let with = |v: serde_json::Value| {
        let mut m = Map::new();
        m.insert("sub".into(), v);
        p.claim_headers(&m)
    };
    for bad in [
        serde_json::json!({"a": 1}),
        serde_json::json!(["a"]),
        serde_json::json!("ana\r\nx-admin: 1"),
        serde_json::json!("tab\there"),
        serde_json::json!("nul\u{0}"),
        serde_json::json!("del\u{7f}"),
        serde_json::json!("c1\u{85}"),
    ] {
        assert_eq!(
            with(bad.clone()),
            Err(AuthError::ClaimHeader("sub".into())),
            "{bad}"
        );
    }
    assert_eq!(with(serde_json::Value::Null), Ok(vec![]));
    assert_eq!(p.claim_headers(&Map::new()), Ok(vec![]));
    assert_eq!(
        with(serde_json::json!(42)).unwrap()[0].1,
        HeaderValue::from_static("42")
    );
    assert_eq!(
        with(serde_json::json!("José")).unwrap()[0].1.as_bytes(),
        "José".as_bytes()
    );
}

#[test]
fn every_bad_token_is_refused_for_its_reason() {
    let p = provider(vec![]);
    let v = |t: &str| block_on(p.verify(t)).unwrap_err();
    let mut c = good_claims();
    c["exp"] = (now() - 60).into();
    assert_eq!(v(&token(Algorithm::HS256, c, SECRET)), AuthError::Expired);
    let mut c = good_claims();
    c["nbf"] = (now() + 600).into();
    assert_eq!(
        v(&token(Algorithm::HS256, c, SECRET)),
        AuthError::NotYetValid
    );
    let mut c = good_claims();
    c["iss"] = "https://evil.test".into();
    assert_eq!(v(&token(Algorithm::HS256, c, SECRET)), AuthError::Issuer);
    let mut c = good_claims();
    c["aud"] = "other".into();
    assert_eq!(v(&token(Algorithm::HS256, c, SECRET)), AuthError::Audience);
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        v(&token(Algorithm::HS256, c, SECRET)),
        AuthError::MissingClaim("exp".into())
    );
    assert_eq!(
        v(&token(
            Algorithm::HS256,
            good_claims(),
            b"wrong-secret-wrong-secret-wrong!"
        )),
        AuthError::Signature
    );
    assert_eq!(
        v(&token(Algorithm::HS384, good_claims(), SECRET)),
        AuthError::Algorithm
    );
    assert_eq!(v("not.a.jwt"), AuthError::Malformed);
    assert_eq!(v(&"a".repeat(MAX_TOKEN_BYTES + 1)), AuthError::TooLarge);
    // alg none, in any case, with an empty signature.
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    for alg in ["none", "None", "NONE"] {
        let t = format!(
            "{}.{}.",
            b64(&format!("{{\"alg\":\"{alg}\",\"typ\":\"JWT\"}}")),
            b64(&good_claims().to_string())
        );
        let e = v(&t);
        assert!(
            matches!(e, AuthError::Malformed | AuthError::Algorithm),
            "{alg}: {e:?}"
        );
    }
}

#[test]
fn a_crit_header_is_refused_whatever_it_names() {
    let p = provider(vec![]);
    let signed = |crit: Option<Vec<String>>| {
        let mut h = Header::new(Algorithm::HS256);
        h.crit = crit;
        encode(&h, &good_claims(), &EncodingKey::from_secret(SECRET)).unwrap()
    };
    assert!(block_on(p.verify(&signed(None))).is_ok());
    for crit in [vec![], vec!["exp".to_owned()], vec!["b64".to_owned()]] {
        assert_eq!(
            block_on(p.verify(&signed(Some(crit.clone())))),
            Err(AuthError::Critical),
            "{crit:?}"
        );
    }
}

#[test]
fn claim_rules_fail_with_403() {
    let p = provider(vec![ClaimRule::Contains("scope".into(), "admin".into())]);
    let e = block_on(p.verify(&token(Algorithm::HS256, good_claims(), SECRET))).unwrap_err();
    assert_eq!(e, AuthError::Forbidden("scope".into()));
    assert_eq!(e.status(), 403);
}

#[test]
fn cached_tokens_are_rechecked_for_time_and_scoped_to_their_provider() {
    let rt = runtime();
    let p = provider(vec![]);
    let mut c = good_claims();
    // A fraction, as PyJWT writes `time.time() + 60.5`.
    c["exp"] = serde_json::json!(now() as f64 + 60.5);
    let t = token(Algorithm::HS256, c, SECRET);
    let at = |n: i64| rt.block_on(p.verify_at(&t, n as u64));
    let first = at(now()).unwrap();
    assert!(cache::holds(p.id, &t), "verified tokens are remembered");
    assert!(cache::lookup(&provider(vec![]), &t, now() as u64).is_none());
    assert_eq!(at(now()).unwrap(), first);
    // exp + leeway (5 s) is the last second it is valid, cached or not.
    assert!(at(now() + 65).is_ok());
    assert_eq!(at(now() + 66), Err(AuthError::Expired));
    assert!(!cache::holds(p.id, &t), "an expired entry is dropped");
}

#[test]
fn an_entry_without_exp_still_has_a_bound() {
    let rt = runtime();
    let p = provider_with(vec![], validation(0, false));
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("exp");
    let t = token(Algorithm::HS256, c, SECRET);
    let t0 = now() as u64;
    rt.block_on(p.verify_at(&t, t0)).unwrap();
    assert!(cache::lookup(&p, &t, t0 + MAX_AGE_SECS).is_some());
    assert!(cache::lookup(&p, &t, t0 + MAX_AGE_SECS + 1).is_none());
    assert!(!cache::holds(p.id, &t));
}

/// A random NumericDate or something that is not one.
fn random_date(rng: &mut StdRng, base: i64) -> Option<serde_json::Value> {
    use serde_json::json;
    let near = base + rng.random_range(-400..400);
    Some(match rng.random_range(0..12) {
        0 => return None,
        1 | 2 => json!(near),
        3 | 4 => json!(near as f64 + rng.random_range(0.0..1.0)),
        5 => json!(near as f64 + 0.5),
        6 => json!([u64::MAX, i64::MAX as u64, 1u64 << 53][rng.random_range(0..3)]),
        7 => json!([1e19, 1e300, f64::MAX][rng.random_range(0..3)]),
        8 => json!([-1, -near, i64::MIN][rng.random_range(0..3)]),
        9 => json!([-0.5, -1e300][rng.random_range(0..2)]),
        10 => json!([near.to_string(), String::new()][rng.random_range(0..2)]),
        _ => json!(null),
    })
}

/// For random `exp`/`nbf` (integers, fractions, huge, negative, strings) and random instants in
/// any order, the cached verdict equals the uncached one.
#[test]
fn cached_and_uncached_verdicts_agree_at_every_instant() {
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(0x5eed_0012);
    let base = 1_800_000_000_i64;
    let mut answered_from_cache = 0;
    for round in 0..300 {
        let leeway = [0, 1, 5, 30][rng.random_range(0..4)];
        let p = provider_with(vec![], validation(leeway, rng.random_bool(0.5)));
        let mut c = good_claims();
        let m = c.as_object_mut().unwrap();
        m.remove("exp");
        for name in ["exp", "nbf"] {
            if let Some(v) = random_date(&mut rng, base) {
                m.insert(name.into(), v);
            }
        }
        let t = token(Algorithm::HS256, c.clone(), SECRET);
        let mut instants: Vec<u64> = (0..30)
            .map(|_| (base + rng.random_range(-500..500 + MAX_AGE_SECS as i64)) as u64)
            .collect();
        // Mostly as a clock runs (so the cache answers), sometimes in any order (clock steps).
        if round % 4 != 0 {
            instants.sort_unstable();
        }
        for at in instants {
            let hit = cache::lookup(&p, &t, at).is_some();
            let uncached = rt.block_on(p.verify_uncached_at(&t, at)).map(|r| r.0);
            let cached = rt.block_on(p.verify_at(&t, at)).map(|c| (*c).clone());
            assert_eq!(cached, uncached, "round {round}, at {at}, claims {c}");
            answered_from_cache += usize::from(hit);
        }
    }
    assert!(
        answered_from_cache > 500,
        "the cache answered {answered_from_cache} times: the test must exercise it"
    );
}

/// RFC 7519 and PyJWT: `iss` is one string (an array naming the issuer is not it), `iat` a
/// NumericDate, and an `iat` beyond the leeway in the future is not yet valid (PyJWT's
/// ImmatureSignatureError), cached or not.
#[test]
fn iss_must_be_a_string_and_iat_a_date_not_in_the_future() {
    let v = |p: &JwtProvider, c: serde_json::Value| {
        block_on(p.verify(&token(Algorithm::HS256, c, SECRET)))
    };
    let p = provider(vec![]);
    let mut without_issuers = validation(5, true);
    without_issuers.iss = None;
    without_issuers.set_required_spec_claims(&["aud", "exp"]);
    let lax = provider_with(vec![], without_issuers);
    for bad_iss in [
        serde_json::json!(["https://issuer.test"]),
        serde_json::json!(["https://issuer.test", "https://other.test"]),
        serde_json::json!(42),
        serde_json::json!({"iss": "https://issuer.test"}),
    ] {
        let mut c = good_claims();
        c["iss"] = bad_iss.clone();
        // With issuers configured jsonwebtoken itself calls some of these missing; refused
        // either way.
        assert!(v(&p, c.clone()).is_err(), "{bad_iss}");
        assert_eq!(
            v(&lax, c),
            Err(AuthError::Malformed),
            "no issuers: {bad_iss}"
        );
    }
    for bad_iat in [
        serde_json::json!("x"),
        serde_json::json!("1700000000"),
        serde_json::json!(-1),
        serde_json::json!(true),
    ] {
        let mut c = good_claims();
        c["iat"] = bad_iat.clone();
        assert_eq!(v(&p, c), Err(AuthError::Malformed), "{bad_iat}");
    }
    let mut c = good_claims();
    c["iat"] = (now() + 86_400).into();
    assert_eq!(v(&p, c), Err(AuthError::NotYetValid), "a day ahead");
    // Within the leeway (5 s), now, in the past, fractional, or null: fine.
    for ok_iat in [
        serde_json::json!(now() + 3),
        serde_json::json!(now()),
        serde_json::json!(now() - 3600),
        serde_json::json!(now() as f64 - 0.5),
        serde_json::Value::Null,
    ] {
        let mut c = good_claims();
        c["iat"] = ok_iat.clone();
        assert!(v(&p, c).is_ok(), "{ok_iat}");
    }
}
