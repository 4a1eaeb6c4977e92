//! JWT authentication: where the token is read, how it is verified, what the route learns.
//!
//! The accepted algorithms come from config, never from the token: `alg: none` and algorithm
//! confusion (an HS256 token "signed" with an RSA public key) fail before any key is used.
//! Oversized tokens are refused before any crypto, and so is a header whose `crit` names an
//! extension (RFC 7515 §4.1.11: we implement none, so we cannot honour any). Keys are static
//! (secret or PEM) or come from a JWKS URL through [`super::jwks::JwksCache`], which outlives
//! snapshots. `exp`, `nbf` and `iat` are judged here, not by `jsonwebtoken`, by the one reading the
//! verified-token cache uses too (see [`cache`]).

mod cache;
mod places;
#[cfg(test)]
mod tests;

pub use cache::MAX_AGE_SECS;
pub(crate) use places::cookie;
pub use places::{
    DEFAULT_QUERY_PARAM, TokenPlace, TokenPlaces, without_cookie, without_query_param,
};

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
    /// Signature, algorithms, issuer, audience and required claims. Its `validate_exp` and
    /// `validate_nbf` are off: [`cache::Window`] checks the dates (with `leeway` from here) for
    /// the verifier and the cache alike.
    pub validation: Validation,
    pub keys: Keys,
    pub source: TokenSource,
    pub rules: Vec<ClaimRule>,
    /// Claim name → upstream header. The client's headers of these names are removed on every
    /// request to a route with this provider; the header is set only from a verified claim.
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
    /// One place given twice: two `Authorization` headers, the query parameter or the cookie
    /// twice (400).
    Duplicate,
    /// The header's `crit` names extensions, none of which we implement.
    Critical,
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
    /// A claim named in `claims_to_headers` cannot be a header value (an object, an array,
    /// control characters).
    ClaimHeader(String),
}

impl AuthError {
    /// The metric label and log reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Ambiguous => "ambiguous",
            AuthError::Duplicate => "duplicate",
            AuthError::Critical => "crit",
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
            AuthError::ClaimHeader(_) => "claim_header",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 403,
            AuthError::Duplicate => 400,
            _ => 401,
        }
    }

    /// The `error` of the JSON body: what kind of problem, never the details.
    pub fn message(&self) -> &'static str {
        match self.status() {
            400 => "the token is given more than once",
            403 => "forbidden",
            _ => "a valid token is required",
        }
    }

    /// `WWW-Authenticate` for a 401: says what kind of problem, never the details.
    pub fn www_authenticate(&self) -> HeaderValue {
        match self {
            AuthError::Missing => HeaderValue::from_static("Bearer"),
            AuthError::Forbidden(_) => {
                HeaderValue::from_static("Bearer error=\"insufficient_scope\"")
            }
            AuthError::Duplicate => HeaderValue::from_static("Bearer error=\"invalid_request\""),
            _ => HeaderValue::from_static("Bearer error=\"invalid_token\""),
        }
    }
}

impl JwtProvider {
    /// Verifies a token and applies the claim rules.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, unix_now()).await
    }

    /// [`Self::verify`] at `now` (seconds since the epoch), using this worker's cache.
    pub(crate) async fn verify_at(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        if let Some(hit) = cache::lookup(self, token, now) {
            return Ok(hit);
        }
        let (claims, window, key) = self.verify_uncached_at(token, now).await?;
        let claims = Arc::new(claims);
        cache::remember(self, token, &claims, window, key, now);
        Ok(claims)
    }

    /// Full verification at `now`, without the cache.
    async fn verify_uncached_at(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Map<String, Value>, cache::Window, Option<cache::KeyUsed>), AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        // jsonwebtoken wants every listed algorithm to fit the key: with RS256 and ES256 both
        // listed, each token is checked against its own (already allowed) algorithm only.
        let single;
        let validation = if self.validation.algorithms.len() > 1 {
            let mut v = self.validation.clone();
            v.algorithms = vec![header.alg];
            single = v;
            &single
        } else {
            &self.validation
        };
        let (claims, used) = match &self.keys {
            Keys::Static(keys) => {
                let mut last = AuthError::Signature;
                let mut ok = None;
                for key in keys {
                    match decode(token, key, validation) {
                        Ok(c) => {
                            ok = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                (ok.ok_or(last)?, None)
            }
            Keys::Jwks(cache) => {
                let kid = header.kid.as_deref();
                let mut key = cache
                    .key(kid, header.alg)
                    .await
                    .ok_or(AuthError::UnknownKey)?;
                let claims = match decode(token, &key, validation) {
                    // The key under this `kid` may have been replaced since the last fetch:
                    // one (rate-limited) refresh, and one more try with the key it brings.
                    Err(AuthError::Signature) => {
                        key = cache
                            .replaced_key(kid, header.alg, &key)
                            .await
                            .ok_or(AuthError::Signature)?;
                        decode(token, &key, validation)?
                    }
                    other => other?,
                };
                let used = cache::KeyUsed {
                    kid: header.kid,
                    key,
                };
                (claims, Some(used))
            }
        };
        // RFC 7519 §4.1.1: `iss` is one StringOrURI. jsonwebtoken also takes an array and
        // matches any entry of it; here anything but a string (or `null`, absent) is
        // malformed, whether issuers are configured or not.
        if claims
            .get("iss")
            .is_some_and(|v| !matches!(v, Value::String(_) | Value::Null))
        {
            return Err(AuthError::Malformed);
        }
        let window = cache::Window::read(&claims)?;
        window.check(now, self.validation.leeway)?;
        for rule in &self.rules {
            check_rule(&claims, rule)?;
        }
        Ok((claims, window, used))
    }

    /// The claim rules alone, for claims that were verified elsewhere (`rustygate test` cases
    /// that give `claims` instead of a token).
    pub fn check_rules(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        self.rules.iter().try_for_each(|r| check_rule(claims, r))
    }

    /// Upstream headers from claims: strings as they are, numbers and booleans as JSON writes
    /// them; an absent (or `null`) claim sends nothing. A claim that cannot be a header value
    /// (an object, an array, a string with control characters) is an error: the request is
    /// refused rather than forwarded without it, or with the client's copy.
    pub fn claim_headers(
        &self,
        claims: &Map<String, Value>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, AuthError> {
        let mut out = Vec::with_capacity(self.claims_to_headers.len());
        for (claim, header) in &self.claims_to_headers {
            let text = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Some(Value::Array(_) | Value::Object(_)) => {
                    return Err(AuthError::ClaimHeader(claim.clone()));
                }
            };
            let value = (!text.chars().any(char::is_control))
                .then(|| HeaderValue::from_str(&text).ok())
                .flatten()
                .ok_or_else(|| AuthError::ClaimHeader(claim.clone()))?;
            out.push((header.clone(), value));
        }
        Ok(out)
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
            K::InvalidToken | K::InvalidClaimFormat(_) | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                AuthError::Malformed
            }
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
