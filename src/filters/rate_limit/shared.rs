//! Limits with `store = "redis"`: one bucket per route, limit and key, shared by every replica
//! through the store ([`crate::store::gcra`]), so "100 per minute" means 100 per minute for
//! the fleet, not per replica.
//!
//! The request path pays one round-trip per check, bounded by the store's `timeout`, except:
//! * a key found over its limit is answered locally until its reset time (a flood costs the
//!   store nothing; the answer is the one the store would give, since refused requests do not
//!   move a GCRA bucket);
//! * when the store fails or times out, `on_store_error` decides (`allow`, `deny`, or `local`:
//!   this replica's in-process buckets at `requests ÷ expected_replicas`), and the store is
//!   skipped for [`crate::store::PAUSE_AFTER_ERROR`] before it is tried again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Decision, KeyValue, LimitSpec, Limiter, LocalLimiter, RouteCounter};
use crate::store::{OnStoreError, Store, StoreError, gcra};

/// Most keys one limit remembers as over their limit; beyond, new ones are not remembered
/// (they cost a round-trip each until entries expire).
pub const MAX_OVER_LIMIT_KEYS: usize = 10_000;

/// Keys over their limit, until their reset.
#[derive(Default)]
struct OverLimit(Mutex<HashMap<KeyValue, Instant>>);

impl OverLimit {
    fn until(&self, key: &KeyValue, now: Instant) -> Option<Instant> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().filter(|&until| until > now)
    }

    fn insert(&self, key: &KeyValue, until: Instant, now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_OVER_LIMIT_KEYS {
            map.retain(|_, u| *u > now);
            if map.len() >= MAX_OVER_LIMIT_KEYS {
                return;
            }
        }
        map.insert(key.clone(), until);
    }

    fn evict_expired(&self) {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, u| *u > now);
        map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A limit whose buckets live in the store.
pub struct SharedLimiter {
    store: Arc<Store>,
    sha: Arc<str>,
    /// `<key_prefix>rl:<route>:<requests>-<per ms>-<burst>:`: a changed limit starts fresh
    /// buckets, as in-process limits do. Route names have no `:`.
    prefix: String,
    interval: Duration,
    burst: u32,
    over: OverLimit,
    /// `on_store_error = "local"`: this replica's share of the limit.
    local: Option<LocalLimiter>,
    /// `rustygate_rate_limit_store_errors_total{route, reason}`, by reason.
    errors: RouteCounter,
}

/// `reason` of `rustygate_rate_limit_store_errors_total`.
const REASONS: [&str; 3] = ["timeout", "error", "unavailable"];

impl SharedLimiter {
    pub fn new(route: &str, spec: &LimitSpec, store: Arc<Store>, sha: Arc<str>) -> SharedLimiter {
        let requests = spec.requests.max(1);
        let burst = spec.burst.max(1);
        let interval = spec.per / requests;
        let local = (store.spec.on_error == OnStoreError::Local)
            .then(|| {
                let n = store.spec.expected_replicas.max(1);
                let share = LimitSpec {
                    requests: (requests / n).max(1),
                    burst: (burst / n).max(1),
                    shared: None,
                    ..spec.clone()
                };
                LocalLimiter::new(&share)
            })
            .flatten();
        let errors = RouteCounter::new(&store.metrics.errors, &[route], &REASONS);
        SharedLimiter {
            prefix: store.spec.key(&format!(
                "rl:{route}:{requests}-{}-{burst}:",
                spec.per.as_millis()
            )),
            store,
            sha,
            interval,
            burst,
            over: OverLimit::default(),
            local,
            errors,
        }
    }

    /// The store key of a bucket.
    pub fn bucket_key(&self, key: &KeyValue) -> Vec<u8> {
        let mut k = self.prefix.as_bytes().to_vec();
        match key {
            KeyValue::Ip(ip) => k.extend_from_slice(format!("ip:{ip}").as_bytes()),
            KeyValue::Text(t) => {
                k.extend_from_slice(b"t:");
                k.extend_from_slice(t);
            }
            KeyValue::Digest(d) => k.extend_from_slice(format!("d:{}", hex::encode(d)).as_bytes()),
            KeyValue::Whole => k.extend_from_slice(b"all"),
        }
        k
    }

    pub async fn check(&self, key: &KeyValue) -> Decision {
        let now = Instant::now();
        if let Some(until) = self.over.until(key, now) {
            let retry_after = until - now;
            return Decision::Limited {
                limit: self.burst,
                retry_after,
                reset: retry_after + self.interval * self.burst.saturating_sub(1),
            };
        }
        let bucket = self.bucket_key(key);
        let (interval, burst) = (self.interval, self.burst);
        let r = self
            .store
            .call(|conn| gcra::check(conn, &self.sha, &bucket, interval, burst))
            .await;
        match r {
            Ok(o) => {
                self.store
                    .metrics
                    .latency
                    .observe(now.elapsed().as_secs_f64());
                if o.allowed {
                    Decision::Allowed {
                        limit: self.burst,
                        remaining: o.remaining,
                        reset: o.reset,
                    }
                } else {
                    self.over.insert(key, now + o.retry_after, now);
                    Decision::Limited {
                        limit: self.burst,
                        retry_after: o.retry_after,
                        reset: o.reset,
                    }
                }
            }
            Err(e) => self.on_error(key, &e),
        }
    }

    /// Counts the failure and lets `on_store_error` decide.
    fn on_error(&self, key: &KeyValue, e: &StoreError) -> Decision {
        self.errors.inc_by(e.reason(), 1);
        self.fallback(key)
    }

    fn fallback(&self, key: &KeyValue) -> Decision {
        match (self.store.spec.on_error, &self.local) {
            (OnStoreError::Local, Some(local)) => local.check(key),
            (OnStoreError::Deny, _) => Decision::Limited {
                limit: self.burst,
                retry_after: Duration::from_secs(1),
                reset: Duration::from_secs(1),
            },
            _ => Decision::Uncounted,
        }
    }

    /// Keys remembered as over their limit, and keys of the local fallback.
    pub fn tracked_keys(&self) -> usize {
        self.over.len() + self.local.as_ref().map_or(0, |l| l.tracked_keys())
    }

    /// Forgets keys whose reset has passed, and idle keys of the local fallback.
    pub fn evict_idle(&self) {
        self.over.evict_expired();
        if let Some(l) = &self.local {
            l.evict_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_limit_cache_is_capped_and_forgets_keys_at_their_reset() {
        let cache = OverLimit::default();
        let now = Instant::now();
        let soon = now + Duration::from_millis(20);
        let later = now + Duration::from_secs(60);
        for i in 0..MAX_OVER_LIMIT_KEYS as u32 {
            cache.insert(&KeyValue::Ip(i.to_be_bytes().into()), soon, now);
        }
        let extra = KeyValue::text(b"extra");
        cache.insert(&extra, later, now);
        assert_eq!(cache.len(), MAX_OVER_LIMIT_KEYS, "full: not remembered");
        assert_eq!(cache.until(&extra, now), None);
        assert_eq!(
            cache.until(&KeyValue::Ip([0, 0, 0, 1].into()), now),
            Some(soon)
        );
        // Once their reset has passed, keys are answered by the store again and make room.
        std::thread::sleep(Duration::from_millis(30));
        let now = Instant::now();
        assert_eq!(cache.until(&KeyValue::Ip([0, 0, 0, 1].into()), now), None);
        cache.insert(&extra, later, now);
        assert_eq!(cache.until(&extra, now), Some(later));
        cache.evict_expired();
        assert_eq!(cache.len(), 1);
    }
}
