//! JWT authentication: where the token is read, how it is verified, what the route learns.
//!
//! The accepted algorithms come from config, never from the token: `alg: none` and algorithm
//! confusion (an HS256 token "signed" with an RSA public key) fail before any key is used.
//! Oversized tokens are refused before any crypto. Keys are static (secret or PEM) or come from
//! a JWKS URL through [`super::jwks::JwksCache`], which outlives snapshots.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::JwksCache;

/// Largest token looked at; anything longer is refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Verified claims.
pub type Claims = Arc<Map<String, Value>>;

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (default).
    Bearer,
    Header(HeaderName),
    Query(String),
    Cookie(String),
}

/// A claim check beyond signature and registered claims; failing one is 403.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRule {
    /// The claim is present.
    Present(String),
    /// The claim equals this string.
    Equals(String, String),
    /// The claim (a space-separated string, like `scope`, or an array) contains this value.
    Contains(String, String),
}

pub enum Keys {
    Static(Vec<DecodingKey>),
    Jwks(Arc<JwksCache>),
}

pub struct JwtProvider {
    /// Unique for each compiled provider (see [`next_provider_id`]): keys the verified-token
    /// cache, so a recompiled provider never trusts what an older one verified.
    pub id: u64,
    pub name: String,
    pub validation: Validation,
    pub keys: Keys,
    pub source: TokenSource,
    pub rules: Vec<ClaimRule>,
    /// Claim name → upstream header, set over anything the client sent.
    pub claims_to_headers: Vec<(String, HeaderName)>,
    /// Pass the token on to the upstream (default: removed).
    pub forward_token: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    /// Tokens in more than one place (header, query, cookie).
    Ambiguous,
    TooLarge,
    Malformed,
    Algorithm,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    MissingClaim(String),
    /// A claim rule failed (403).
    Forbidden(String),
}

impl AuthError {
    /// The metric label and log reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Ambiguous => "ambiguous",
            AuthError::TooLarge => "too_large",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "issuer",
            AuthError::Audience => "audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Forbidden(_) => "forbidden",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 403,
            _ => 401,
        }
    }

    /// `WWW-Authenticate` for a 401: says what kind of problem, never the details.
    pub fn www_authenticate(&self) -> HeaderValue {
        match self {
            AuthError::Missing => HeaderValue::from_static("Bearer"),
            AuthError::Forbidden(_) => {
                HeaderValue::from_static("Bearer error=\"insufficient_scope\"")
            }
            _ => HeaderValue::from_static("Bearer error=\"invalid_token\""),
        }
    }
}

/// The parts of a request a token can be in.
pub struct TokenPlaces<'a> {
    pub authorization: Option<&'a str>,
    pub header: Option<&'a str>,
    pub query: Option<&'a str>,
    pub cookie: Option<&'a str>,
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

pub(crate) fn cookie<'a>(cookies: &'a str, name: &str) -> Option<&'a str> {
    cookies
        .split(';')
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

impl JwtProvider {
    /// Finds the token. Tokens in several places at once are refused: which one would the
    /// upstream believe?
    pub fn token<'a>(&self, places: &TokenPlaces<'a>) -> Result<Option<&'a str>, AuthError> {
        let bearer = places.authorization.and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
                .map(str::trim)
        });
        let from_query = places.query.and_then(|q| match &self.source {
            TokenSource::Query(n) => query_param(q, n),
            _ => query_param(q, "access_token"),
        });
        let from_cookie = match &self.source {
            TokenSource::Cookie(n) => places.cookie.and_then(|c| cookie(c, n)),
            _ => None,
        };
        let from_header = match &self.source {
            TokenSource::Header(_) => places.header,
            _ => None,
        };
        let found: Vec<&str> = [bearer, from_header, from_query, from_cookie]
            .into_iter()
            .flatten()
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(AuthError::Ambiguous),
        }
    }

    /// Verifies a token and applies the claim rules.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        if let Some(hit) = cached(self.id, token, self.validation.leeway) {
            return hit;
        }
        let claims = self.verify_uncached(token).await?;
        remember(self.id, token, &claims);
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let claims = match &self.keys {
            Keys::Static(keys) => {
                let mut last = AuthError::Signature;
                let mut ok = None;
                for key in keys {
                    match decode(token, key, &self.validation) {
                        Ok(c) => {
                            ok = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                ok.ok_or(last)?
            }
            Keys::Jwks(cache) => {
                let key = cache
                    .key(header.kid.as_deref(), header.alg)
                    .await
                    .ok_or(AuthError::UnknownKey)?;
                decode(token, &key, &self.validation)?
            }
        };
        for rule in &self.rules {
            check_rule(&claims, rule)?;
        }
        Ok(Arc::new(claims))
    }

    /// The claim rules alone, for claims that were verified elsewhere (`rustygate test` cases
    /// that give `claims` instead of a token).
    pub fn check_rules(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        self.rules.iter().try_for_each(|r| check_rule(claims, r))
    }

    /// Upstream headers from claims (strings as they are, other JSON values serialised).
    pub fn claim_headers(&self, claims: &Map<String, Value>) -> Vec<(HeaderName, HeaderValue)> {
        self.claims_to_headers
            .iter()
            .filter_map(|(claim, header)| {
                let v = claims.get(claim)?;
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((header.clone(), HeaderValue::from_str(&text).ok()?))
            })
            .collect()
    }
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Map<String, Value>, AuthError> {
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidIssuer => AuthError::Issuer,
            K::InvalidAudience => AuthError::Audience,
            K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
                AuthError::Algorithm
            }
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::Malformed,
            _ => AuthError::Signature,
        })
}

fn check_rule(claims: &Map<String, Value>, rule: &ClaimRule) -> Result<(), AuthError> {
    let ok = match rule {
        ClaimRule::Present(c) => claims.contains_key(c),
        ClaimRule::Equals(c, want) => claims.get(c).and_then(Value::as_str) == Some(want.as_str()),
        ClaimRule::Contains(c, want) => match claims.get(c) {
            Some(Value::String(s)) => s.split(' ').any(|x| x == want),
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(want.as_str())),
            _ => false,
        },
    };
    if ok {
        Ok(())
    } else {
        let name = match rule {
            ClaimRule::Present(c) | ClaimRule::Equals(c, _) | ClaimRule::Contains(c, _) => {
                c.clone()
            }
        };
        Err(AuthError::Forbidden(name))
    }
}

/// A fresh id for a compiled provider.
pub fn next_provider_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Verified tokens kept per worker thread.
const TOKEN_CACHE_ENTRIES: usize = 4096;

struct Verified {
    claims: Claims,
    exp: Option<u64>,
    nbf: Option<u64>,
}

thread_local! {
    /// Tokens this worker verified recently, by (provider id, token). Signature, issuer,
    /// audience and claim rules depend only on the token and the provider, so a hit skips the
    /// crypto and the JSON; time-based claims are checked again on every use.
    static TOKENS: std::cell::RefCell<std::collections::HashMap<(u64, Box<str>), Verified>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cached(provider: u64, token: &str, leeway: u64) -> Option<Result<Claims, AuthError>> {
    TOKENS.with(|t| {
        let t = t.borrow();
        let v = t.get(&(provider, Box::<str>::from(token)))?;
        let now = unix_now();
        if v.exp.is_some_and(|exp| now > exp.saturating_add(leeway)) {
            return Some(Err(AuthError::Expired));
        }
        if v.nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
            return Some(Err(AuthError::NotYetValid));
        }
        Some(Ok(Arc::clone(&v.claims)))
    })
}

fn remember(provider: u64, token: &str, claims: &Claims) {
    let num = |k: &str| claims.get(k).and_then(Value::as_u64);
    TOKENS.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() >= TOKEN_CACHE_ENTRIES {
            let now = unix_now();
            t.retain(|_, v| v.exp.is_none_or(|e| e > now));
            if t.len() >= TOKEN_CACHE_ENTRIES {
                t.clear();
            }
        }
        t.insert(
            (provider, token.into()),
            Verified {
                claims: Arc::clone(claims),
                exp: num("exp"),
                nbf: num("nbf"),
            },
        );
    });
}

/// Every algorithm a provider may accept, by config name.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn provider(rules: Vec<ClaimRule>) -> JwtProvider {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["https://issuer.test"]);
        v.set_audience(&["api"]);
        v.leeway = 5;
        v.validate_nbf = true;
        JwtProvider {
            id: next_provider_id(),
            name: "t".into(),
            validation: v,
            keys: Keys::Static(vec![DecodingKey::from_secret(
                b"s3cret-s3cret-s3cret-s3cret-s3cret",
            )]),
            source: TokenSource::Bearer,
            rules,
            claims_to_headers: vec![("sub".into(), HeaderName::from_static("x-user"))],
            forward_token: false,
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
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

    const SECRET: &[u8] = b"s3cret-s3cret-s3cret-s3cret-s3cret";

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
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
            p.claim_headers(&claims),
            vec![(
                HeaderName::from_static("x-user"),
                HeaderValue::from_static("ana")
            )]
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
    fn claim_rules_fail_with_403() {
        let p = provider(vec![ClaimRule::Contains("scope".into(), "admin".into())]);
        let e = block_on(p.verify(&token(Algorithm::HS256, good_claims(), SECRET))).unwrap_err();
        assert_eq!(e, AuthError::Forbidden("scope".into()));
        assert_eq!(e.status(), 403);
    }

    #[test]
    fn cached_tokens_are_rechecked_for_time_and_scoped_to_their_provider() {
        let p = provider(vec![]);
        let t = token(Algorithm::HS256, good_claims(), SECRET);
        let first = block_on(p.verify(&t)).unwrap();
        assert!(
            cached(p.id, &t, 0).is_some(),
            "verified tokens are remembered"
        );
        assert!(
            cached(next_provider_id(), &t, 0).is_none(),
            "another provider does not trust it"
        );
        assert_eq!(block_on(p.verify(&t)).unwrap(), first);
        let mut stale = (*first).clone();
        stale.insert("exp".into(), (now() - 100).into());
        remember(p.id, "stale-token", &Arc::new(stale));
        assert_eq!(
            cached(p.id, "stale-token", 5),
            Some(Err(AuthError::Expired))
        );
    }

    #[test]
    fn tokens_in_several_places_are_refused() {
        let p = provider(vec![]);
        let places = TokenPlaces {
            authorization: Some("Bearer abc"),
            header: None,
            query: Some("access_token=abc"),
            cookie: None,
        };
        assert_eq!(p.token(&places), Err(AuthError::Ambiguous));
        let places = TokenPlaces {
            authorization: Some("Bearer abc"),
            header: None,
            query: Some("x=1"),
            cookie: None,
        };
        assert_eq!(p.token(&places), Ok(Some("abc")));
        let places = TokenPlaces {
            authorization: Some("Basic Zm9v"),
            header: None,
            query: None,
            cookie: None,
        };
        assert_eq!(p.token(&places), Ok(None));
    }
}
