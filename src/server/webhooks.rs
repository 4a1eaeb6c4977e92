//! Authenticating reload requests: GitHub and GitLab webhooks, and the admin bearer token.
//!
//! Everything here runs before any JSON is parsed, over the raw body, in constant time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Largest webhook body read by default (`--webhook-max-body`); larger gets 413 before any
/// byte of it is read.
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

    /// Forgets `id` again: its delivery was refused, so a corrected redelivery under the same id
    /// (GitHub's "Redeliver" keeps it) is acted on.
    pub fn forget(&self, id: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (order, seen) = &mut *g;
        if seen.remove(id) {
            order.retain(|o| o != id);
        }
    }
}

/// Failed authentications per client address, in fixed windows: the webhook and admin
/// endpoints' rate limit. Only failures count, and they are counted after the signature or token
/// check, so that forged calls (however many, from wherever) never turn away a valid signed one;
/// they only turn the forger's own 401s into 429s.
pub struct FailureLimit {
    inner: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    per_window: u32,
    window: Duration,
    /// Most client addresses tracked; a flood from many addresses evicts the oldest windows
    /// rather than growing the table.
    max_clients: usize,
}

impl FailureLimit {
    pub fn new(per_window: u32, window: Duration, max_clients: usize) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            per_window,
            window,
            max_clients: max_clients.max(1),
        }
    }

    /// Counts one failed authentication from `client`; true while the client is within its
    /// limit (answer 401), false once over it (answer 429).
    pub fn record_failure(&self, client: IpAddr) -> bool {
        self.record_failure_at(client, Instant::now())
    }

    fn record_failure_at(&self, client: IpAddr, now: Instant) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&client) && map.len() >= self.max_clients {
            let window = self.window;
            map.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            if map.len() >= self.max_clients
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(ip, _)| *ip)
            {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(client).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= self.per_window
    }

    /// Client addresses tracked (for tests).
    pub fn tracked(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The all-zero SHA GitHub and GitLab send as `after` when a ref is deleted.
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// What the gateway reads from a push event (GitHub `push`, GitLab `Push Hook`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The full ref, e.g. `refs/heads/main` or `refs/tags/v1`.
    pub reference: String,
    /// The commit the ref points to after the push; `None` when the payload has none.
    pub after: Option<String>,
    /// The push deleted the ref (GitHub `deleted: true`, or an all-zero `after`).
    pub deleted: bool,
}

/// Reads a push event from the body (already authenticated): JSON, or the JSON in the
/// `payload` field of a form (GitHub's default content type,
/// `application/x-www-form-urlencoded`). `None`: not a push payload.
pub fn parse_push(body: &[u8]) -> Option<Push> {
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => serde_json::from_slice(&form_field(body, b"payload")?).ok()?,
    };
    let reference = v.get("ref")?.as_str()?.to_owned();
    let after = v
        .get("after")
        .and_then(|a| a.as_str())
        .map(str::to_ascii_lowercase);
    let deleted = v.get("deleted").and_then(|d| d.as_bool()) == Some(true)
        || after.as_deref() == Some(ZERO_SHA);
    Some(Push {
        reference,
        after,
        deleted,
    })
}

/// What to do with an authenticated push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushAction {
    /// Queue a fetch of the tracked ref.
    Reload,
    /// Acknowledge (202) without acting, for the reason given.
    Ignore(&'static str),
}

/// Decides on a push. `tracked`: the followed branch (`None` for a pinned ref, which any push
/// may have moved); `seen`: whether a SHA was already applied or attempted, which a push for the
/// same commit (a redelivery, or a replay under a new delivery id) cannot change.
pub fn push_action(
    push: &Push,
    tracked: Option<&str>,
    seen: impl Fn(&str) -> Option<&'static str>,
) -> PushAction {
    if push.reference.starts_with("refs/tags/") && tracked.is_some() {
        return PushAction::Ignore("tag push ignored");
    }
    if let Some(tracked) = tracked {
        match push.reference.strip_prefix("refs/heads/") {
            Some(b) if b == tracked => {}
            Some(_) => return PushAction::Ignore("push to another branch ignored"),
            None => return PushAction::Ignore("push to a ref that is not a branch ignored"),
        }
    }
    if push.deleted {
        return PushAction::Ignore("ref deletion ignored; the applied config keeps serving");
    }
    if let Some(why) = push.after.as_deref().and_then(seen) {
        return PushAction::Ignore(why);
    }
    PushAction::Reload
}

/// The value of field `name` of a form body (`a=1&payload=...`), decoded (`+` is a space,
/// `%XX` a byte).
fn form_field(body: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let value = body.split(|&b| b == b'&').find_map(|kv| {
        let eq = kv.iter().position(|&b| b == b'=')?;
        (&kv[..eq] == name).then(|| &kv[eq + 1..])
    })?;
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let (h, l) = (
                    value.get(i + 1).copied().and_then(hex)?,
                    value.get(i + 2).copied().and_then(hex)?,
                );
                out.push(h * 16 + l);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
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
    fn failures_are_limited_per_client_and_window() {
        let l = FailureLimit::new(2, Duration::from_secs(60), 100);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        assert!(l.record_failure_at(a, t0));
        assert!(l.record_failure_at(a, t0));
        assert!(!l.record_failure_at(a, t0), "third failure in the window");
        assert!(
            l.record_failure_at(b, t0),
            "another client has its own window"
        );
        assert!(
            l.record_failure_at(a, t0 + Duration::from_secs(61)),
            "a new window starts afresh"
        );
    }

    #[test]
    fn failure_table_is_capped() {
        let l = FailureLimit::new(1, Duration::from_secs(60), 3);
        let t0 = Instant::now();
        for i in 0..10u8 {
            l.record_failure_at(
                IpAddr::from([10, 0, 0, i]),
                t0 + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(l.tracked(), 3);
        // The newest client is still tracked: its second failure is over the limit.
        assert!(!l.record_failure_at(IpAddr::from([10, 0, 0, 9]), t0 + Duration::from_millis(20)));
    }

    fn push(reference: &str, after: &str) -> Push {
        let body =
            serde_json::json!({ "ref": reference, "after": after, "before": "1".repeat(40) });
        parse_push(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn push_decisions() {
        let sha = "a".repeat(40);
        let never = |_: &str| None;
        let main = Some("main");
        assert_eq!(
            push_action(&push("refs/heads/main", &sha), main, never),
            PushAction::Reload
        );
        assert!(matches!(
            push_action(&push("refs/heads/feature", &sha), main, never),
            PushAction::Ignore(w) if w.contains("another branch")
        ));
        assert!(matches!(
            push_action(&push("refs/tags/v1", &sha), main, never),
            PushAction::Ignore(w) if w.contains("tag")
        ));
        assert!(matches!(
            push_action(&push("refs/heads/feature", ZERO_SHA), main, never),
            PushAction::Ignore(_)
        ));
        assert!(matches!(
            push_action(&push("refs/heads/main", ZERO_SHA), main, never),
            PushAction::Ignore(w) if w.contains("deletion")
        ));
        let applied = |s: &str| (s == "a".repeat(40)).then_some("commit already applied");
        assert_eq!(
            push_action(
                &push("refs/heads/main", &sha.to_ascii_uppercase()),
                main,
                applied
            ),
            PushAction::Ignore("commit already applied")
        );
        assert_eq!(
            push_action(&push("refs/heads/main", &"b".repeat(40)), main, applied),
            PushAction::Reload
        );
        // A pinned ref may be a tag or any branch: every push of a new commit is looked at.
        assert_eq!(
            push_action(&push("refs/tags/v1", &sha), None, never),
            PushAction::Reload
        );
        assert_eq!(parse_push(b"not json"), None);
        assert_eq!(parse_push(br#"{"zen":"hi"}"#), None);
        // GitHub's default content type: the JSON in a form's `payload` field.
        let form = b"payload=%7B%22ref%22%3A+%22refs%2Fheads%2Fmain%22%2C%22after%22%3A%22AB%22%7D";
        assert_eq!(
            parse_push(form),
            Some(Push {
                reference: "refs/heads/main".into(),
                after: Some("ab".into()),
                deleted: false,
            })
        );
        assert_eq!(parse_push(b"payload=%7B%22ref"), None);
        assert_eq!(parse_push(b"payload=%zz"), None);
    }
}
