//! Upstreams: their targets, how a target is picked, and the state that outlives snapshots.
//!
//! The compiled [`Upstream`] is immutable and lives in a snapshot. What changes per request
//! (in-flight counts, health, ejections, retry budget, circuit-breaker counters) is in
//! [`state`], shared by reference with every snapshot that keeps the target. Picking never
//! takes a lock shared by workers.

pub mod balance;
pub mod health;
pub mod retry;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub use balance::{Balancer, HashKey, hash_bytes};
pub use retry::{RetryBudget, RetryOverride, RetryPolicy, RetryReason};
use state::{TargetState, UpstreamShared};

pub use crate::wire::Protocol;

/// Which pooled connections a request may reuse: the target's authority and, for anything but
/// plain HTTP/1.1, a fingerprint of how the connection was made (scheme, protocol, TLS roots,
/// SNI, client certificate). Two upstreams that reach one address with different TLS settings
/// never share a connection; a config swap that keeps the settings keeps the connections.
///
/// Its hash is computed once, when the target is compiled: the pool looks a key up twice per
/// request, and `Authority` hashes itself a byte at a time, lowercasing each.
#[derive(Debug, Clone)]
pub struct PoolKey {
    authority: Authority,
    /// 0 for plain HTTP/1.1.
    variant: u64,
    hash: u64,
}

impl PoolKey {
    pub fn new(authority: Authority, variant: u64) -> PoolKey {
        // FNV-1a over the lowercased authority, then the variant: equal keys (the authority
        // compares without case) hash alike. The keys come from the config, not from clients.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = authority.as_str().bytes().map(|b| b.to_ascii_lowercase());
        for b in bytes.chain(variant.to_le_bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        PoolKey {
            authority,
            variant,
            hash,
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn variant(&self) -> u64 {
        self.variant
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &PoolKey) -> bool {
        let (a, b) = (self.authority.as_str(), other.authority.as_str());
        // A key and its clones share the authority's bytes: the pool's lookups are found by
        // address, without `Authority`'s byte-by-byte comparison that ignores case (~300
        // instructions per lookup). Keys of an earlier snapshot still compare by content.
        self.hash == other.hash
            && self.variant == other.variant
            && (std::ptr::eq(a, b) || self.authority == other.authority)
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// One address an upstream can send requests to.
#[derive(Debug)]
pub struct Target {
    /// As written in config, e.g. `http://127.0.0.1:8001`; safe to log, never sent to clients.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `host:port` to connect to (the scheme's default port filled in).
    pub connect_addr: String,
    pub weight: u32,
    pub protocol: Protocol,
    /// Set for `https://` targets.
    pub tls: Option<crate::wire::tls::TargetTls>,
    pub pool_key: PoolKey,
    /// In-flight count, health and ejection, shared across snapshots.
    pub state: Arc<TargetState>,
}

#[cfg(test)]
impl Target {
    /// A target with detached state, for unit tests.
    pub fn for_tests(url: &str, weight: u32) -> Target {
        let authority: Authority = url
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        Target {
            url: url.to_owned(),
            scheme: Scheme::HTTP,
            connect_addr: authority.as_str().to_owned(),
            pool_key: PoolKey::new(authority.clone(), 0),
            authority,
            weight,
            protocol: Protocol::Http1,
            tls: None,
            state: TargetState::detached("test", url),
        }
    }
}

/// Passive outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive connect failures, timeouts or resets that eject (0: never).
    pub consecutive_failures: u32,
    /// Consecutive 5xx responses that eject (0: never).
    pub consecutive_5xx: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            consecutive_5xx: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Circuit-breaker limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: Option<u32>,
    pub max_pending: Option<u32>,
}

/// A named group of targets.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    /// Response-header timeout per attempt, unless the route sets its own.
    pub timeout: Option<Duration>,
    /// Deadline for all attempts together, unless the route sets its own.
    pub total_timeout: Option<Duration>,
    /// How long idle pooled connections are kept.
    pub idle_timeout: Duration,
    /// Use every target when none is usable, instead of answering 503.
    pub fail_open: bool,
    pub health: Option<Arc<health::HealthCheck>>,
    pub outlier: Outlier,
    pub retry: RetryPolicy,
    pub budget: RetryBudget,
    pub limits: Limits,
    /// Retry budget and circuit-breaker counters, shared across workers and snapshots.
    pub shared: Arc<UpstreamShared>,
}

/// Default idle time for pooled upstream connections: below the keep-alive timeouts upstreams
/// commonly use (Node.js 5 s, Apache 5 s, nginx 75 s), so that the gateway, not the upstream,
/// is the side that closes an idle connection, and requests rarely meet one being closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

impl Upstream {
    /// Whether its targets speak HTTP/1.1 (`protocol` is the upstream's, the same for each):
    /// the only protocol a WebSocket handshake can go to.
    pub fn speaks_http1(&self) -> bool {
        self.targets.iter().all(|t| t.protocol == Protocol::Http1)
    }

    /// The target for the next attempt: a usable one not tried yet; else a usable one; else,
    /// with `fail_open`, any; else `None` (the caller answers 503).
    pub fn pick(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        let targets = &self.targets;
        let usable = |i: usize| targets[i].state.available();
        let retry = !tried.is_empty();
        if !retry {
            if let Some(i) = self.balancer.pick(targets, key, &usable, false) {
                return Some(i);
            }
        } else {
            let fresh = |i: usize| !tried.contains(&i) && usable(i);
            if let Some(i) = self
                .balancer
                .pick(targets, key, &fresh, true)
                .or_else(|| self.balancer.pick(targets, key, &usable, true))
            {
                return Some(i);
            }
        }
        if self.fail_open {
            return self.balancer.pick(targets, key, &|_| true, retry);
        }
        None
    }

    /// Passive outlier detection: a response head from target `i`.
    #[inline]
    pub fn record_response(&self, i: usize, status: u16) {
        let Some(t) = self.targets.get(i) else {
            return;
        };
        let limit = self.outlier.consecutive_5xx;
        let streak = t.state.record_response(status, limit > 0);
        if limit > 0 && streak >= limit {
            self.maybe_eject(i, &format!("{streak} consecutive 5xx responses"));
        }
    }

    /// Passive outlier detection: a connect failure, timeout, reset or invalid response on
    /// target `i`; `what` says which, for the ejection's log line.
    pub fn record_failure(&self, i: usize, what: &dyn std::fmt::Display) {
        let Some(t) = self.targets.get(i) else {
            return;
        };
        let streak = t.state.record_failure();
        let limit = self.outlier.consecutive_failures;
        if limit > 0 && streak >= limit {
            self.maybe_eject(
                i,
                &format!("{streak} failed attempts in a row, the last: {what}"),
            );
        }
    }

    fn maybe_eject(&self, i: usize, reason: &str) {
        let n = self.targets.len();
        let ejected = self.targets.iter().filter(|t| t.state.is_ejected()).count();
        let cap = (n * self.outlier.max_ejected_percent as usize / 100).max(1);
        if ejected >= cap {
            tracing::debug!(
                upstream = self.name.as_str(),
                upstream_target = self.targets[i].url.as_str(),
                reason,
                "not ejected: the upstream's ejection cap is reached"
            );
            return;
        }
        if self.targets[i].state.is_ejected() {
            return;
        }
        self.targets[i].state.eject(
            self.outlier.base_ejection,
            self.outlier.max_ejection,
            reason,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keys_are_one_key_whatever_the_case_and_apart_by_variant() {
        use std::hash::BuildHasher;
        let hasher = foldhash::fast::RandomState::default();
        let a = PoolKey::new(Authority::from_static("API.example:8080"), 0);
        let b = PoolKey::new(Authority::from_static("api.example:8080"), 0);
        assert_eq!(a, b);
        assert_eq!(hasher.hash_one(&a), hasher.hash_one(&b));
        let tls = PoolKey::new(Authority::from_static("api.example:8080"), 7);
        assert_ne!(a, tls);
        assert_ne!(
            a,
            PoolKey::new(Authority::from_static("api.example:8081"), 0)
        );
        let mut pool = crate::util::FastMap::default();
        pool.insert(a, "plain");
        pool.insert(tls, "tls");
        assert_eq!(pool.get(&b), Some(&"plain"));
        assert_eq!(pool.len(), 2);
    }

    fn upstream(n: usize, outlier: Outlier, fail_open: bool) -> Upstream {
        let targets: Vec<Target> = (0..n)
            .map(|i| Target::for_tests(&format!("http://10.1.0.{i}:80"), 1))
            .collect();
        Upstream {
            name: "u".into(),
            balancer: Balancer::round_robin(&vec![1; n]),
            targets,
            connect_timeout: Duration::from_secs(1),
            timeout: None,
            total_timeout: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            fail_open,
            health: None,
            outlier,
            retry: RetryPolicy::default(),
            budget: RetryBudget::default(),
            limits: Limits::default(),
            shared: Arc::default(),
        }
    }

    #[test]
    fn failures_eject_up_to_the_cap() {
        let u = upstream(4, Outlier::default(), false);
        for _ in 0..5 {
            u.record_failure(0, &"refused");
        }
        assert!(!u.targets[0].state.available());
        for _ in 0..5 {
            u.record_failure(1, &"refused");
        }
        assert!(!u.targets[1].state.available());
        // 50% of 4: a third target is not ejected.
        for _ in 0..5 {
            u.record_failure(2, &"refused");
        }
        assert!(u.targets[2].state.available());
        // Picks avoid the ejected targets.
        for _ in 0..20 {
            let i = u.pick(None, &[]).unwrap();
            assert!(i >= 2);
        }
    }

    #[test]
    fn an_ejection_names_the_failures_that_caused_it() {
        let u = upstream(2, Outlier::default(), false);
        let timeout = crate::proxy::ForwardError::Timeout(Duration::from_secs(1));
        let ((), logged) = crate::util::captured_logs(tracing::Level::WARN, || {
            for _ in 0..5 {
                u.record_failure(0, &timeout);
            }
        });
        assert!(!u.targets[0].state.available());
        assert!(
            logged.contains(
                "5 failed attempts in a row, the last: the upstream did not answer in 1s"
            ),
            "{logged}"
        );
        assert!(!logged.contains("connection failures"), "{logged}");
    }

    #[test]
    fn a_success_resets_the_streak_and_5xx_counts_when_asked() {
        let u = upstream(
            2,
            Outlier {
                consecutive_5xx: 3,
                ..Outlier::default()
            },
            false,
        );
        for _ in 0..4 {
            u.record_failure(0, &"refused");
        }
        u.record_response(0, 200);
        u.record_failure(0, &"refused");
        assert!(u.targets[0].state.available());
        u.record_response(1, 500);
        u.record_response(1, 503);
        u.record_response(1, 404);
        u.record_response(1, 500);
        assert!(u.targets[1].state.available());
        u.record_response(1, 500);
        u.record_response(1, 502);
        assert!(!u.targets[1].state.available());
    }

    #[test]
    fn nothing_usable_is_none_unless_fail_open() {
        let closed = upstream(2, Outlier::default(), false);
        let open = upstream(2, Outlier::default(), true);
        for u in [&closed, &open] {
            for t in &u.targets {
                t.state.set_healthy(false, "test");
            }
        }
        assert_eq!(closed.pick(None, &[]), None);
        assert!(open.pick(None, &[]).is_some());
    }

    #[test]
    fn retries_go_to_another_target_when_there_is_one() {
        let u = upstream(3, Outlier::default(), false);
        for _ in 0..10 {
            let first = u.pick(None, &[]).unwrap();
            let second = u.pick(None, &[first]).unwrap();
            assert_ne!(first, second);
            let third = u.pick(None, &[first, second]).unwrap();
            assert!(third != first && third != second);
            // Everything tried: a usable one again.
            assert!(u.pick(None, &[0, 1, 2]).is_some());
        }
    }
}
