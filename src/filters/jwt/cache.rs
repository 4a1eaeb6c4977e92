//! Token dates, and the verified-token cache kept per worker thread.
//!
//! Both the verifier and the cache judge time through [`Window`], read once from the claims by
//! one set of rules, so a cached and an uncached verdict cannot differ at any instant: the
//! cache answers only "still valid", and anything else (expired, not yet valid, past the
//! entry's own bound, a JWKS key no longer published) drops the entry and sends the token back
//! through full verification, which gives the reason.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::DecodingKey;
use serde_json::{Map, Value};

use super::{AuthError, Claims, JwtProvider, Keys};

/// Verified tokens kept per worker thread.
pub(super) const ENTRIES: usize = 4096;

/// Longest a verified token is answered from the cache before it is verified again, whatever
/// its `exp` says (and for tokens without `exp`, when a provider allows them).
pub const MAX_AGE_SECS: u64 = 300;

/// A token's `exp`, `nbf` and `iat` as whole seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    exp: Option<u64>,
    nbf: Option<u64>,
    /// When the token says it was issued: one from the future (beyond the leeway) is not yet
    /// valid, as PyJWT has it (`ImmatureSignatureError`).
    iat: Option<u64>,
}

/// Reads a NumericDate (RFC 7519 §2): a non-negative JSON number, fractions allowed (PyJWT
/// writes `time.time() + N`). Fractions round to the stricter side: `exp` down, `nbf` up.
/// Anything else present (a string, a negative number, `true`) makes the token malformed;
/// `null` counts as absent.
fn numeric_date(v: Option<&Value>, round_up: bool) -> Result<Option<u64>, AuthError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(_) => return Err(AuthError::Malformed),
    };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        // `as` saturates: 1e300 is "never" (u64::MAX), which the checks handle.
        Some(f) if f.is_finite() && f >= 0.0 => {
            Ok(Some(if round_up { f.ceil() } else { f.floor() } as u64))
        }
        _ => Err(AuthError::Malformed),
    }
}

impl Window {
    pub(super) fn read(claims: &Map<String, Value>) -> Result<Window, AuthError> {
        Ok(Window {
            exp: numeric_date(claims.get("exp"), false)?,
            nbf: numeric_date(claims.get("nbf"), true)?,
            iat: numeric_date(claims.get("iat"), true)?,
        })
    }

    /// Whether the token is valid at `now` (seconds), allowing `leeway` seconds of clock skew
    /// either way: expired when `now > exp + leeway`, not yet valid when `now + leeway < nbf`
    /// or `now + leeway < iat`.
    pub(super) fn check(&self, now: u64, leeway: u64) -> Result<(), AuthError> {
        if self.exp.is_some_and(|exp| now > exp.saturating_add(leeway)) {
            return Err(AuthError::Expired);
        }
        let not_before = self.nbf.max(self.iat);
        if not_before.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
            return Err(AuthError::NotYetValid);
        }
        Ok(())
    }
}

/// The JWKS key a token was verified with: a cache hit is trusted only while the JWKS still
/// publishes this very key under this `kid`.
pub(super) struct KeyUsed {
    pub kid: Option<String>,
    pub key: Arc<DecodingKey>,
}

struct Entry {
    claims: Claims,
    window: Window,
    /// When the entry was stored, and the last second it may answer (never later than
    /// `exp + leeway`, nor `MAX_AGE_SECS` after it was stored).
    stored: u64,
    until: u64,
    key: Option<KeyUsed>,
}

thread_local! {
    /// Tokens this worker verified recently, by (provider id, token). Signature, issuer,
    /// audience and claim rules depend only on the token and the provider, so a hit skips the
    /// crypto and the JSON; time and the JWKS key are checked again on every use.
    static TOKENS: RefCell<HashMap<(u64, Box<str>), Entry>> = RefCell::new(HashMap::new());
}

fn key_still_published(p: &JwtProvider, used: Option<&KeyUsed>) -> bool {
    match (&p.keys, used) {
        (Keys::Static(_), None) => true,
        (Keys::Jwks(jwks), Some(u)) => jwks.still_publishes(u.kid.as_deref(), &u.key),
        _ => false,
    }
}

/// The claims of a token `p` verified before, if the entry still answers at `now`. An entry
/// that does not is removed.
pub(super) fn lookup(p: &JwtProvider, token: &str, now: u64) -> Option<Claims> {
    TOKENS.with(|t| {
        let mut t = t.borrow_mut();
        let key = (p.id, Box::<str>::from(token));
        let e = t.get(&key)?;
        let answers = (e.stored..=e.until).contains(&now)
            && e.window.check(now, p.validation.leeway).is_ok()
            && key_still_published(p, e.key.as_ref());
        if answers {
            Some(Arc::clone(&e.claims))
        } else {
            t.remove(&key);
            None
        }
    })
}

/// Remembers a token `p` verified at `now`.
pub(super) fn remember(
    p: &JwtProvider,
    token: &str,
    claims: &Claims,
    window: Window,
    key: Option<KeyUsed>,
    now: u64,
) {
    let leeway = p.validation.leeway;
    let mut until = now.saturating_add(MAX_AGE_SECS);
    if let Some(exp) = window.exp {
        until = until.min(exp.saturating_add(leeway));
    }
    TOKENS.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() >= ENTRIES {
            t.retain(|_, e| e.until >= now);
            if t.len() >= ENTRIES {
                t.clear();
            }
        }
        t.insert(
            (p.id, token.into()),
            Entry {
                claims: Arc::clone(claims),
                window,
                stored: now,
                until,
                key,
            },
        );
    });
}

/// Whether this worker holds an entry for the token (tests).
#[cfg(test)]
pub(super) fn holds(provider: u64, token: &str) -> bool {
    TOKENS.with(|t| {
        t.borrow()
            .contains_key(&(provider, Box::<str>::from(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(v: Value) -> Result<Option<u64>, AuthError> {
        numeric_date(Some(&v), false)
    }

    #[test]
    fn numeric_dates_are_read_like_the_rfc_says() {
        assert_eq!(date(serde_json::json!(10)), Ok(Some(10)));
        assert_eq!(date(serde_json::json!(10.9)), Ok(Some(10)));
        assert_eq!(
            numeric_date(Some(&serde_json::json!(10.1)), true),
            Ok(Some(11))
        );
        assert_eq!(date(serde_json::json!(1e300)), Ok(Some(u64::MAX)));
        assert_eq!(date(Value::Null), Ok(None));
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(-0.5),
            serde_json::json!("10"),
            serde_json::json!(true),
            serde_json::json!([1]),
        ] {
            assert_eq!(date(bad.clone()), Err(AuthError::Malformed), "{bad}");
        }
    }

    #[test]
    fn window_edges() {
        let w = Window {
            exp: Some(100),
            nbf: Some(50),
            iat: None,
        };
        assert_eq!(w.check(105, 5), Ok(()));
        assert_eq!(w.check(106, 5), Err(AuthError::Expired));
        assert_eq!(w.check(45, 5), Ok(()));
        assert_eq!(w.check(44, 5), Err(AuthError::NotYetValid));
        let never = Window {
            exp: Some(u64::MAX),
            nbf: None,
            iat: None,
        };
        assert_eq!(never.check(u64::MAX, u64::MAX), Ok(()));
    }
}
