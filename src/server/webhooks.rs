//! Authenticating reload requests: GitHub and GitLab webhooks, and the admin bearer token.
//!
//! Everything here runs before any JSON is parsed, over the raw body, in constant time.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Largest webhook body read; larger gets 413 before any parsing.
pub const MAX_WEBHOOK_BODY: usize = 1 << 20;

/// Constant-time equality; an empty expected value never matches.
pub fn secret_matches(expected: &str, given: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let e = expected.as_bytes();
    let mut diff = (e.len() ^ given.len()) as u8 | u8::from(e.len() != given.len());
    for (i, b) in e.iter().enumerate() {
        diff |= b ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Checks GitHub's `X-Hub-Signature-256: sha256=<hex>` over the raw body.
pub fn github_signature_ok(secret: &str, body: &[u8], header: Option<&[u8]>) -> bool {
    if secret.is_empty() {
        return false;
    }
    let Some(sig) = header.and_then(|h| h.strip_prefix(b"sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Delivery ids seen recently, to answer replays without acting on them.
pub struct ReplayGuard {
    inner: Mutex<(VecDeque<String>, HashSet<String>)>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((VecDeque::new(), HashSet::new())),
            capacity,
        }
    }

    /// True the first time an id is seen.
    pub fn first_time(&self, id: &str) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (order, seen) = &mut *g;
        if seen.contains(id) {
            return false;
        }
        if order.len() >= self.capacity
            && let Some(old) = order.pop_front()
        {
            seen.remove(&old);
        }
        order.push_back(id.to_owned());
        seen.insert(id.to_owned());
        true
    }
}

/// A fixed-window limit for the webhook and admin endpoints.
pub struct WindowLimit {
    inner: Mutex<(Instant, u32)>,
    per_window: u32,
    window: Duration,
}

impl WindowLimit {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            inner: Mutex::new((Instant::now(), 0)),
            per_window,
            window,
        }
    }

    pub fn allow(&self) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(g.0) >= self.window {
            *g = (now, 0);
        }
        g.1 += 1;
        g.1 <= self.per_window
    }
}

/// The branch a push event is for (`refs/heads/main` → `main`), read from the JSON body.
pub fn pushed_branch(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("ref")?
        .as_str()?
        .strip_prefix("refs/heads/")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn github_signatures() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let good = sign("s3cret", body);
        assert!(github_signature_ok("s3cret", body, Some(good.as_bytes())));
        assert!(!github_signature_ok("other", body, Some(good.as_bytes())));
        // Re-serialised body (same JSON, other bytes) does not verify.
        assert!(!github_signature_ok(
            "s3cret",
            br#"{ "ref": "refs/heads/main" }"#,
            Some(good.as_bytes())
        ));
        assert!(!github_signature_ok("s3cret", body, None));
        assert!(!github_signature_ok("s3cret", body, Some(b"sha1=abcdef")));
        assert!(!github_signature_ok("s3cret", body, Some(b"sha256=zz")));
        assert!(!github_signature_ok(
            "",
            body,
            Some(sign("", body).as_bytes())
        ));
    }

    #[test]
    fn tokens_compare_exactly_and_empty_never_matches() {
        assert!(secret_matches("tok", b"tok"));
        assert!(!secret_matches("tok", b"tok2"));
        assert!(!secret_matches("tok", b"to"));
        assert!(!secret_matches("tok", b""));
        assert!(!secret_matches("", b""));
    }

    #[test]
    fn replays_are_recognised_within_capacity() {
        let g = ReplayGuard::new(2);
        assert!(g.first_time("a"));
        assert!(!g.first_time("a"));
        assert!(g.first_time("b"));
        assert!(g.first_time("c"));
        assert!(g.first_time("a"), "evicted ids are forgotten");
    }

    #[test]
    fn window_limit() {
        let l = WindowLimit::new(2, Duration::from_secs(60));
        assert!(l.allow());
        assert!(l.allow());
        assert!(!l.allow());
    }

    #[test]
    fn push_branch() {
        assert_eq!(
            pushed_branch(br#"{"ref":"refs/heads/main"}"#).as_deref(),
            Some("main")
        );
        assert_eq!(pushed_branch(br#"{"ref":"refs/tags/v1"}"#), None);
        assert_eq!(pushed_branch(b"not json"), None);
    }
}
