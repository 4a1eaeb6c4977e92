//! The JWT filter on untrusted tokens: finding the token in a request, verifying it (header and
//! claims JSON parsed before and after the signature check), the per-worker verified-token
//! cache, and the headers made from claims.
//!
//! Two providers with different secrets:
//! * tokens the fuzzer writes itself (`Raw`) go to one whose secret it never sees: every
//!   verdict must be a refusal (fail closed, whatever the bytes);
//! * header and claims JSON the fuzzer writes (`Signed`) are signed here with the other's secret,
//!   so the claims parser, the time checks and the cache see arbitrary JSON behind a valid
//!   signature. `NOW` in the claims is replaced by the current Unix time, so a corpus entry
//!   stays "fresh" (`NOW`), "expired" (`1NOW` is larger, `NOW` with a digit cut off smaller...).
//!
//! A verified token must have `alg` HS256 in its header, the claims that were signed, an `exp`
//! that is a number and not past (with leeway), and give the same verdict again from the cache.
#![no_main]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use rustygate::filters::jwt::{
    ClaimRule, JwtProvider, Keys, TokenPlace, TokenPlaces, TokenSource, next_provider_id,
};
use serde_json::{Map, Value};
use sha2::Sha256;

const LEEWAY: u64 = 60;
const SIGNING_SECRET: &[u8] = b"fuzz-signing-secret-of-32-bytes!!";
const UNKNOWN_SECRET: &[u8] = b"a-secret-the-fuzzer-never-sees-32";

/// The input is text-like so that corpus entries can be written by hand (see README.md):
/// the first byte picks the mode; for `Signed` the rest is `header JSON \n claims JSON`, for
/// `Raw` it is four lines (`Authorization`, the token header, the query, `Cookie`; an empty
/// line is an absent value) and the first byte also picks where the provider looks.
enum Input<'a> {
    Raw {
        places: [Option<&'a str>; 4],
        source: u8,
    },
    Signed {
        header: &'a [u8],
        claims: &'a [u8],
    },
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Input<'a>> {
        let (&mode, rest) = data.split_first()?;
        if mode % 2 == 0 {
            let split = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            let (header, claims) = rest.split_at(split);
            let claims = claims.get(1..).unwrap_or_default();
            return Some(Input::Signed { header, claims });
        }
        let text = std::str::from_utf8(rest).ok()?;
        let mut lines = text.split('\n').map(|l| Some(l).filter(|l| !l.is_empty()));
        let mut places = [None; 4];
        for p in &mut places {
            *p = lines.next().flatten();
        }
        Some(Input::Raw {
            places,
            source: mode / 2,
        })
    }
}

fn provider(secret: &[u8], source: TokenSource) -> JwtProvider {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&["https://issuer.test"]);
    v.set_audience(&["api"]);
    v.leeway = LEEWAY;
    v.validate_nbf = true;
    JwtProvider {
        id: next_provider_id(),
        name: "fuzz".into(),
        validation: v,
        keys: Keys::Static(vec![DecodingKey::from_secret(secret)]),
        source,
        rules: vec![ClaimRule::Contains("scope".into(), "read".into())],
        claims_to_headers: vec![
            ("sub".into(), HeaderName::from_static("x-user")),
            ("tenant".into(), HeaderName::from_static("x-tenant")),
        ],
        forward_token: false,
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    signed: JwtProvider,
    raw: Vec<JwtProvider>,
}

thread_local! {
    static FIXTURE: Fixture = Fixture {
        rt: match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt,
            Err(e) => panic!("no runtime: {e}"),
        },
        signed: provider(SIGNING_SECRET, TokenSource::Bearer),
        raw: vec![
            provider(UNKNOWN_SECRET, TokenSource::Bearer),
            provider(UNKNOWN_SECRET, TokenSource::Header(HeaderName::from_static("x-token"))),
            provider(UNKNOWN_SECRET, TokenSource::Query("token".into())),
            provider(UNKNOWN_SECRET, TokenSource::Cookie("session".into())),
        ],
    };
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET) else {
        unreachable!("HMAC takes keys of any length");
    };
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

fn replace_now(claims: &[u8], now: u64) -> Vec<u8> {
    let now = now.to_string();
    let mut out = Vec::with_capacity(claims.len() + 16);
    let mut rest = claims;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(b"NOW") {
            out.extend_from_slice(now.as_bytes());
            rest = after;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fn raw(f: &Fixture, places: [Option<&str>; 4], source: u8) {
    let p = &f.raw[usize::from(source) % f.raw.len()];
    let [authorization, header, query, cookie] = places;
    let headers = [
        ("authorization", authorization),
        ("x-token", header),
        ("cookie", cookie),
    ];
    let collected = TokenPlaces::collect(
        p,
        headers
            .iter()
            .filter_map(|(n, v)| v.map(|v| (*n, v.as_bytes()))),
        query,
    );
    let Ok(Some((token, place))) = p.token(&collected) else {
        return;
    };
    // A query value may be percent-decoded; every other place hands the token over verbatim.
    if !matches!(place, TokenPlace::Query(_)) {
        let from_a_place = places.iter().flatten().any(|s| s.contains(token));
        assert!(from_a_place, "token {token:?} is not from the request");
    }
    let verdict = f.rt.block_on(p.verify(token));
    assert!(
        verdict.is_err(),
        "a token the fuzzer wrote verified: {token:?}"
    );
}

fn signed(f: &Fixture, header: &[u8], claims: &[u8]) {
    let before = unix_now();
    let claims = replace_now(claims, before);
    let token = sign(header, &claims);
    let first = f.rt.block_on(f.signed.verify(&token));
    let again = f.rt.block_on(f.signed.verify(&token));
    let after = unix_now();
    if before == after {
        assert_eq!(first, again, "the cache changed the verdict on {token:?}");
    }
    let Ok(verified) = first else {
        return;
    };

    let alg = serde_json::from_slice::<Value>(header)
        .ok()
        .and_then(|h| h.get("alg").and_then(Value::as_str).map(str::to_owned));
    assert_eq!(alg.as_deref(), Some("HS256"), "header {header:?}");

    let parsed: Map<String, Value> = match serde_json::from_slice(&claims) {
        Ok(m) => m,
        Err(e) => panic!("verified claims that do not parse ({e}): {claims:?}"),
    };
    assert_eq!(*verified, parsed, "the claims are not what was signed");

    let exp = verified.get("exp").and_then(Value::as_f64);
    let Some(exp) = exp else {
        panic!("verified without a numeric exp: {:?}", verified.get("exp"));
    };
    assert!(
        exp + LEEWAY as f64 + 1.0 >= before as f64,
        "verified an expired token: exp {exp}, now {before}"
    );
    if let Some(nbf) = verified.get("nbf").and_then(Value::as_f64) {
        assert!(
            nbf - LEEWAY as f64 - 1.0 <= after as f64,
            "verified a token not yet valid: nbf {nbf}, now {after}"
        );
    }

    for (name, value) in f.signed.claim_headers(&verified).unwrap_or_default() {
        let claim = if name == "x-user" { "sub" } else { "tenant" };
        if let Some(Value::String(s)) = verified.get(claim) {
            assert_eq!(value.as_bytes(), s.as_bytes(), "header {name} from {s:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    FIXTURE.with(|f| match input {
        Input::Raw { places, source } => raw(f, places, source),
        Input::Signed { header, claims } => signed(f, header, claims),
    });
});
