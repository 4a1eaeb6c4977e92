//! Rate limiting: GCRA buckets (`governor`) per route and key, kept outside snapshots.
//!
//! Buckets are found by (route name, limit) in a process-wide registry, so a config swap that
//! keeps a route and its limit keeps its buckets, and a changed limit starts fresh ones. Idle keys
//! (whose bucket is full again, i.e. indistinguishable from a new one) are evicted periodically,
//! which bounds memory under many distinct keys. [`Limiter`] is the seam for a shared backend
//! (several replicas) later: routes only ever see the trait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderName;

/// How often idle keys are evicted.
pub const EVICT_EVERY: Duration = Duration::from_secs(10);

/// What a request is counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address (after trusted-proxy rules).
    ClientIp,
    /// A request header's value; requests without it share one bucket.
    Header(HeaderName),
    /// One bucket for the whole route.
    Route,
    /// A verified JWT claim (the route must have `auth`); requests without it share one bucket.
    Claim(String),
}

/// A compiled limit: `requests` per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: LimitKey,
}

/// A key value for one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Ip(IpAddr),
    Text(Box<str>),
    Whole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { limit: u32, remaining: u32 },
    Limited { limit: u32, retry_after: Duration },
}

/// A rate limiter backend.
pub trait Limiter: Send + Sync {
    fn check(&self, key: &KeyValue) -> Decision;
    /// Keys currently tracked.
    fn tracked_keys(&self) -> usize;
    /// Drops keys whose bucket is full again.
    fn evict_idle(&self);
}

type Keyed = RateLimiter<
    KeyValue,
    DefaultKeyedStateStore<KeyValue>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// In-process buckets.
pub struct LocalLimiter {
    limit: u32,
    buckets: Keyed,
    clock: DefaultClock,
}

impl LocalLimiter {
    pub fn new(spec: &LimitSpec) -> Option<LocalLimiter> {
        let requests = spec.requests.max(1);
        let period = spec.per.checked_div(requests)?;
        let burst = NonZeroU32::new(spec.burst.max(1))?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        let clock = DefaultClock::default();
        Some(LocalLimiter {
            limit: spec.burst.max(1),
            buckets: RateLimiter::dashmap_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
        })
    }
}

impl Limiter for LocalLimiter {
    fn check(&self, key: &KeyValue) -> Decision {
        match self.buckets.check_key(key) {
            Ok(state) => Decision::Allowed {
                limit: self.limit,
                remaining: state.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Limited {
                limit: self.limit,
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    fn tracked_keys(&self) -> usize {
        self.buckets.len()
    }

    fn evict_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// Every limiter, by route name and limit. Only touched when a worker first meets a route in a
/// new snapshot, and by the eviction task. A limiter stays while it has keys or a worker holds
/// it; once neither (its buckets are all full again) it is dropped, which cannot be told apart
/// from keeping it.
#[derive(Default)]
pub struct Limiters {
    map: Mutex<HashMap<(String, LimitSpec), Arc<dyn Limiter>>>,
}

impl Limiters {
    /// The limiter for this route and limit, shared with every worker and kept across swaps
    /// while any snapshot still uses it.
    pub fn get(&self, route: &str, spec: &LimitSpec) -> Option<Arc<dyn Limiter>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (route.to_owned(), spec.clone());
        if let Some(live) = map.get(&key) {
            return Some(Arc::clone(live));
        }
        let fresh: Arc<dyn Limiter> = Arc::new(LocalLimiter::new(spec)?);
        map.insert(key, Arc::clone(&fresh));
        Some(fresh)
    }

    /// Evicts idle keys everywhere, then forgets limiters that no worker holds and that have
    /// no keys left.
    pub fn evict_idle(&self) {
        let all: Vec<Arc<dyn Limiter>> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        for l in &all {
            l.evict_idle();
        }
        drop(all);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1 || l.tracked_keys() > 0);
    }

    /// Runs eviction every [`EVICT_EVERY`] until the registry is dropped.
    pub async fn evict_forever(this: Weak<Limiters>) {
        let mut tick = tokio::time::interval(EVICT_EVERY);
        loop {
            tick.tick().await;
            match this.upgrade() {
                Some(l) => l.evict_idle(),
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(requests: u32, per: Duration, burst: u32) -> LimitSpec {
        LimitSpec {
            requests,
            per,
            burst,
            key: LimitKey::ClientIp,
        }
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let l = LocalLimiter::new(&spec(3, Duration::from_secs(60), 3)).unwrap();
        let k = KeyValue::Text("a".into());
        for expected in [2, 1, 0] {
            assert_eq!(
                l.check(&k),
                Decision::Allowed {
                    limit: 3,
                    remaining: expected
                }
            );
        }
        match l.check(&k) {
            Decision::Limited { limit, retry_after } => {
                assert_eq!(limit, 3);
                assert!(
                    retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20)
                );
            }
            d => panic!("{d:?}"),
        }
        // Other keys have their own bucket.
        assert!(matches!(
            l.check(&KeyValue::Text("b".into())),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn same_route_and_limit_share_buckets_changed_limit_does_not() {
        let reg = Limiters::default();
        let s = spec(1, Duration::from_secs(60), 1);
        let a = reg.get("r", &s).unwrap();
        let k = KeyValue::Whole;
        assert!(matches!(a.check(&k), Decision::Allowed { .. }));
        let again = reg.get("r", &s).unwrap();
        assert!(
            matches!(again.check(&k), Decision::Limited { .. }),
            "buckets survive"
        );
        let changed = reg.get("r", &spec(2, Duration::from_secs(60), 2)).unwrap();
        assert!(matches!(changed.check(&k), Decision::Allowed { .. }));
        drop((a, again, changed));
        reg.evict_idle();
        assert_eq!(
            reg.map.lock().unwrap().len(),
            2,
            "limiters whose keys are live are kept"
        );
        let unused = reg.get("unused", &s).unwrap();
        drop(unused);
        reg.evict_idle();
        assert_eq!(
            reg.map.lock().unwrap().len(),
            2,
            "a limiter with no keys and no holder is forgotten"
        );
    }

    #[test]
    fn a_hundred_thousand_keys_are_evicted_once_idle() {
        // 1,000 requests per 100 ms: a key that made one request is full again 0.1 ms later.
        let l = LocalLimiter::new(&spec(1000, Duration::from_millis(100), 1000)).unwrap();
        for i in 0..100_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            assert!(matches!(
                l.check(&KeyValue::Ip(ip)),
                Decision::Allowed { .. }
            ));
        }
        assert_eq!(l.tracked_keys(), 100_000);
        std::thread::sleep(Duration::from_millis(5));
        l.evict_idle();
        assert_eq!(l.tracked_keys(), 0);
    }
}
