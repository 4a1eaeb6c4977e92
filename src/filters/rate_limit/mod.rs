//! Rate limiting: GCRA buckets (`governor`) per route and key, kept outside snapshots.
//!
//! Buckets are found by (route name, limit) in a process-wide registry, so a config swap that
//! keeps a route and its limit keeps its buckets, and a changed limit starts fresh ones. Idle keys
//! (whose bucket is full again, i.e. indistinguishable from a new one) are evicted periodically.
//! Memory is bounded by count and size whatever clients send: a key longer than
//! [`MAX_KEY_BYTES`] is stored as its SHA-256, and each limit holds at most
//! [`DEFAULT_MAX_KEYS`] keys, evicting the least recently used beyond (counted in
//! `rustygate_rate_limit_keys_evicted_total{route}`). Limits with `store = "redis"` keep their
//! buckets in the fleet's shared store instead ([`shared`]); routes see either through
//! [`RouteLimiter`].

mod shared;

pub use shared::{MAX_OVER_LIMIT_KEYS, SharedLimiter};

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderName;
use prometheus::{IntCounterVec, Opts};
use sha2::{Digest, Sha256};

/// How often idle keys are evicted.
pub const EVICT_EVERY: Duration = Duration::from_secs(10);

/// Longest key stored as it is; longer ones (a 30 KB header value) are stored as their SHA-256.
pub const MAX_KEY_BYTES: usize = 256;

/// Most live keys one limit holds; beyond, the least recently used are evicted.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// What a request is counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address (after trusted-proxy rules).
    ClientIp,
    /// A request header's value (several lines: joined with `", "`); a request without it
    /// counts by its client address.
    Header(HeaderName),
    /// One bucket for the whole route.
    Route,
    /// A verified JWT claim (the route must have `auth`); a request without it (no token on an
    /// `auth_optional` route, or no such claim) counts by its client address.
    Claim(String),
}

/// A compiled limit: `requests` per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: LimitKey,
    /// `store = "redis"`: the store the buckets live in; `None`: in this process.
    pub shared: Option<Arc<crate::store::StoreSpec>>,
    /// IPv6 client addresses count by this prefix (default [`DEFAULT_IPV6_PREFIX`]).
    pub ipv6_prefix: u8,
}

/// IPv6 clients are counted by /64: one subscriber line or host usually holds a whole /64, so
/// counting by /128 gave it 2^64 buckets (and a shared store that many keys to fill).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The key of a client address: IPv4 (and IPv4-mapped IPv6) as it is, IPv6 by its first
/// `ipv6_prefix` bits.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> KeyValue {
    KeyValue::Ip(crate::util::client_prefix(ip, ipv6_prefix))
}

/// A key value for one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Ip(IpAddr),
    /// Up to [`MAX_KEY_BYTES`], the value's bytes as they came (a header value need not be
    /// UTF-8: `a\xff`, `a\xfe` and `a\u{FFFD}` are three keys); build with [`KeyValue::text`].
    Text(Box<[u8]>),
    /// The SHA-256 of a longer key. A separate variant, so a short key can never equal a digest.
    Digest([u8; 32]),
    Whole,
}

impl KeyValue {
    /// A key from a header value or claim: kept as text up to [`MAX_KEY_BYTES`], hashed beyond,
    /// so a key costs at most that much memory whatever its length.
    pub fn text(bytes: &[u8]) -> KeyValue {
        if bytes.len() > MAX_KEY_BYTES {
            KeyValue::Digest(Sha256::digest(bytes).into())
        } else {
            KeyValue::Text(bytes.into())
        }
    }

    /// Heap bytes this key holds besides its own size (for memory accounting).
    fn heap_bytes(&self) -> usize {
        match self {
            KeyValue::Text(t) => t.len(),
            _ => 0,
        }
    }
}

/// What a limiter decided for one request. `limit` is the bucket's burst; `reset` the time
/// until the bucket is full again (the whole burst available).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    Limited {
        limit: u32,
        retry_after: Duration,
        reset: Duration,
    },
    /// Let through without being counted (the shared store could not be asked and its
    /// `on_store_error` is `allow`): nothing is known about the bucket.
    Uncounted,
}

/// A rate limiter backend.
pub trait Limiter: Send + Sync {
    fn check(&self, key: &KeyValue) -> Decision;
    /// Keys currently tracked.
    fn tracked_keys(&self) -> usize;
    /// Drops keys whose bucket is full again.
    fn evict_idle(&self);
    /// Bytes the tracked keys and their state hold, roughly (for tests and capacity planning).
    fn held_bytes(&self) -> usize;
}

/// One live key's state.
struct Slot {
    /// GCRA's theoretical arrival time, as governor keeps it.
    tat: u64,
    /// When the key was last checked, in [`KeyTable`] ticks: the eviction order.
    used: u64,
}

/// A keyed state store for governor that holds at most `max_keys` keys, evicting the least
/// recently used. Sharded by key hash so that workers rarely wait on one another; each shard
/// holds its share of the cap and evicts in batches (a sixteenth of its share at a time), which
/// keeps a flood of new keys at O(1) amortised per request. The cap is a hard bound; since
/// keys do not spread perfectly evenly, the first evictions come a little before it (at about
/// 97% for 100,000 keys).
pub struct KeyTable {
    shards: Box<[Mutex<HashMap<KeyValue, Slot>>]>,
    per_shard: usize,
    hasher: RandomState,
    tick: AtomicU64,
    evicted: AtomicU64,
    counter: Option<RouteCounter>,
}

/// A route's series of a counter family, found by its label values each time it is counted
/// (a batch of evictions, a failed store call: never per allowed request), not kept: a reload
/// that removes the route drops its series (see [`Metrics::follow_config`]), and a limiter
/// kept for the route meanwhile counts into the family again if the route comes back.
///
/// [`Metrics::follow_config`]: crate::telemetry::metrics::Metrics::follow_config
#[derive(Clone)]
pub struct RouteCounter {
    family: IntCounterVec,
    /// The route, then the other labels' values but the last, given at each count.
    labels: Box<[Box<str>]>,
}

impl RouteCounter {
    /// `family`'s series `labels` (the route first, all but the last label), which exist at 0
    /// from now for each `last` value given.
    pub fn new(family: &IntCounterVec, labels: &[&str], last: &[&str]) -> RouteCounter {
        let c = RouteCounter {
            family: family.clone(),
            labels: labels.iter().map(|l| Box::from(*l)).collect(),
        };
        for v in last {
            c.inc_by(v, 0);
        }
        c
    }

    /// Adds `n` to the series whose last label is `last` (`""` for a family with no more).
    pub fn inc_by(&self, last: &str, n: u64) {
        let mut values: Vec<&str> = self.labels.iter().map(|l| &**l).collect();
        if !last.is_empty() {
            values.push(last);
        }
        if let Ok(c) = self.family.get_metric_with_label_values(&values) {
            c.inc_by(n);
        }
    }
}

/// The governor state store: a handle on a [`KeyTable`] that the limiter also keeps, to count and
/// measure its keys.
#[derive(Clone)]
pub struct CappedStore(Arc<KeyTable>);

impl KeyTable {
    fn new(max_keys: usize, counter: Option<RouteCounter>) -> KeyTable {
        let max_keys = max_keys.max(1);
        let shards = if max_keys >= 1024 { 16 } else { 1 };
        KeyTable {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(shards),
            hasher: RandomState::new(),
            tick: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            counter,
        }
    }

    fn shard(&self, key: &KeyValue) -> std::sync::MutexGuard<'_, HashMap<KeyValue, Slot>> {
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the least recently used sixteenth of a full shard.
    fn evict_lru(&self, map: &mut HashMap<KeyValue, Slot>) {
        let batch = (self.per_shard / 16).max(1);
        let mut used: Vec<u64> = map.values().map(|s| s.used).collect();
        if used.len() < batch {
            return;
        }
        // Ticks are unique, so exactly `batch` keys are at or below the threshold.
        let (_, &mut threshold, _) = used.select_nth_unstable(batch - 1);
        let before = map.len();
        map.retain(|_, s| s.used > threshold);
        let n = (before - map.len()) as u64;
        self.evicted.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = &self.counter {
            c.inc_by("", n);
        }
    }
}

impl StateStore for CappedStore {
    type Key = KeyValue;

    fn measure_and_replace<T, F, E>(&self, key: &KeyValue, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let this = &*self.0;
        let used = this.tick.fetch_add(1, Ordering::Relaxed);
        let mut map = this.shard(key);
        if let Some(slot) = map.get_mut(key) {
            // A limited key is in use too: touching it keeps a busy abuser's bucket.
            slot.used = used;
            let (t, tat) = f(Some(Nanos::from(slot.tat)))?;
            slot.tat = tat.into();
            return Ok(t);
        }
        let (t, tat) = f(None)?;
        if map.len() >= this.per_shard {
            this.evict_lru(&mut map);
        }
        map.insert(
            key.clone(),
            Slot {
                tat: tat.into(),
                used,
            },
        );
        Ok(t)
    }
}

impl ShrinkableKeyedStateStore<KeyValue> for CappedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let below: u64 = drop_below.into();
        for shard in &self.0.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, s| s.tat > below);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in &self.0.shards {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Keyed = RateLimiter<KeyValue, CappedStore, DefaultClock, StateInformationMiddleware>;

/// In-process buckets.
pub struct LocalLimiter {
    limit: u32,
    /// One request's share of the window (`per ÷ requests`).
    interval: Duration,
    buckets: Keyed,
    keys: Arc<KeyTable>,
    clock: DefaultClock,
}

impl LocalLimiter {
    pub fn new(spec: &LimitSpec) -> Option<LocalLimiter> {
        LocalLimiter::with_max_keys(spec, DEFAULT_MAX_KEYS, None)
    }

    /// A limiter holding at most `max_keys` keys; evictions are added to `evicted`.
    pub fn with_max_keys(
        spec: &LimitSpec,
        max_keys: usize,
        evicted: Option<RouteCounter>,
    ) -> Option<LocalLimiter> {
        let requests = spec.requests.max(1);
        let period = spec.per.checked_div(requests)?;
        let burst = NonZeroU32::new(spec.burst.max(1))?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        let clock = DefaultClock::default();
        let keys = Arc::new(KeyTable::new(max_keys, evicted));
        Some(LocalLimiter {
            limit: spec.burst.max(1),
            interval: period,
            buckets: Keyed::new(quota, CappedStore(Arc::clone(&keys)), clock.clone()),
            keys,
            clock,
        })
    }

    /// Keys evicted to stay under the cap so far.
    pub fn evicted(&self) -> u64 {
        self.keys.evicted.load(Ordering::Relaxed)
    }
}

impl Limiter for LocalLimiter {
    fn check(&self, key: &KeyValue) -> Decision {
        match self.buckets.check_key(key) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Decision::Allowed {
                    limit: self.limit,
                    remaining,
                    // governor does not tell the bucket's arrival time: with `remaining` left
                    // it is full again within this, less one interval at most.
                    reset: self.interval * self.limit.saturating_sub(remaining),
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                Decision::Limited {
                    limit: self.limit,
                    retry_after,
                    // One request back at `retry_after`, the rest of the burst one an interval.
                    reset: retry_after + self.interval * (self.limit - 1),
                }
            }
        }
    }

    fn tracked_keys(&self) -> usize {
        self.buckets.len()
    }

    fn evict_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    fn held_bytes(&self) -> usize {
        let store = &*self.keys;
        let entry = std::mem::size_of::<(KeyValue, Slot)>() + 8; // + hashbrown's control bytes
        store
            .shards
            .iter()
            .map(|s| {
                let map = s.lock().unwrap_or_else(|p| p.into_inner());
                map.capacity() * entry + map.keys().map(KeyValue::heap_bytes).sum::<usize>()
            })
            .sum()
    }
}

/// Every limiter, by route name and limit. Only touched when a worker first meets a route in a
/// new snapshot, and by the eviction task. A limiter stays while it has keys or a worker holds
/// it; once neither (its buckets are all full again) it is dropped, which cannot be told apart
/// from keeping it.
pub struct Limiters {
    map: Mutex<HashMap<(String, LimitSpec), Arc<dyn Limiter>>>,
    shared: Mutex<HashMap<(String, LimitSpec), Arc<SharedLimiter>>>,
    /// Open stores by spec: one connection per store, whatever the number of limits.
    stores: Mutex<HashMap<crate::store::StoreSpec, Arc<crate::store::Store>>>,
    store_metrics: crate::store::StoreMetrics,
    sha: Arc<str>,
    max_keys: usize,
    /// `rustygate_rate_limit_keys_evicted_total{route}`; registered with the gateway's metrics
    /// by the admin listener.
    evicted: IntCounterVec,
}

impl Default for Limiters {
    fn default() -> Self {
        Limiters::with_max_keys(DEFAULT_MAX_KEYS)
    }
}

impl Limiters {
    /// A registry whose limiters hold at most `max_keys` keys each.
    pub fn with_max_keys(max_keys: usize) -> Limiters {
        let evicted = IntCounterVec::new(
            Opts::new(
                "rustygate_rate_limit_keys_evicted_total",
                "Rate-limit keys evicted (least recently used first) to keep a limit under its key cap, by route.",
            ),
            &["route"],
        );
        Limiters {
            map: Mutex::default(),
            shared: Mutex::default(),
            stores: Mutex::default(),
            store_metrics: crate::store::StoreMetrics::default(),
            sha: crate::store::gcra::script_sha().into(),
            max_keys,
            evicted: evicted.unwrap_or_else(|_| invalid_metric()),
        }
    }

    /// The eviction counter, to register with the gateway's metrics.
    pub fn evicted_metric(&self) -> IntCounterVec {
        self.evicted.clone()
    }

    /// The shared store's metrics (errors, per-check latency), to register with the gateway's.
    pub fn store_metrics(&self) -> crate::store::StoreMetrics {
        self.store_metrics.clone()
    }

    /// The limiter of a route's limit: in-process, or in the shared store for
    /// `store = "redis"`. Kept across swaps while any snapshot still uses it.
    pub fn route_limiter(&self, route: &str, spec: &LimitSpec) -> Option<RouteLimiter> {
        let Some(store_spec) = &spec.shared else {
            return self.get(route, spec).map(RouteLimiter::Local);
        };
        let key = (route.to_owned(), spec.clone());
        if let Some(live) = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(RouteLimiter::Shared(Arc::clone(live)));
        }
        let store = {
            let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
            match stores.get(&**store_spec) {
                Some(s) => Arc::clone(s),
                None => {
                    let s = Arc::new(crate::store::Store::new(
                        Arc::clone(store_spec),
                        self.store_metrics.clone(),
                    ));
                    s.warm_up();
                    stores.insert((**store_spec).clone(), Arc::clone(&s));
                    s
                }
            }
        };
        let fresh = Arc::new(SharedLimiter::new(
            route,
            spec,
            store,
            Arc::clone(&self.sha),
        ));
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let live = shared.entry(key).or_insert(fresh);
        Some(RouteLimiter::Shared(Arc::clone(live)))
    }

    /// The limiter for this route and limit, shared with every worker and kept across swaps
    /// while any snapshot still uses it.
    pub fn get(&self, route: &str, spec: &LimitSpec) -> Option<Arc<dyn Limiter>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (route.to_owned(), spec.clone());
        if let Some(live) = map.get(&key) {
            return Some(Arc::clone(live));
        }
        let counter = RouteCounter::new(&self.evicted, &[route], &[""]);
        let fresh: Arc<dyn Limiter> = Arc::new(LocalLimiter::with_max_keys(
            spec,
            self.max_keys,
            Some(counter),
        )?);
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
        drop(map);
        let shared: Vec<Arc<SharedLimiter>> = {
            let map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        for l in &shared {
            l.evict_idle();
        }
        drop(shared);
        // A shared limiter's buckets are in the store: forgetting it loses only the local
        // over-limit memory and fallback of keys whose reset has passed.
        let mut map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1 || l.tracked_keys() > 0);
        let live: std::collections::HashSet<crate::store::StoreSpec> = map
            .keys()
            .filter_map(|(_, s)| s.shared.as_deref().cloned())
            .collect();
        drop(map);
        // Stores no limit uses any more (a changed URL or password) are closed.
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores.retain(|spec, _| live.contains(spec));
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

/// A route's limiter, as workers hold it.
#[derive(Clone)]
pub enum RouteLimiter {
    Local(Arc<dyn Limiter>),
    Shared(Arc<SharedLimiter>),
}

impl RouteLimiter {
    /// Checks one request. Only a shared limit awaits (the store's round-trip).
    pub async fn check(&self, key: &KeyValue) -> Decision {
        match self {
            RouteLimiter::Local(l) => l.check(key),
            RouteLimiter::Shared(s) => s.check(key).await,
        }
    }
}

/// The metric definition above is a constant; prometheus only rejects invalid names.
#[cold]
fn invalid_metric<T>() -> T {
    panic!("invalid built-in metric definition")
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
            shared: None,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = client_key(ip("2001:db8:1:2:aaaa::1"), 64);
        assert_eq!(a, client_key(ip("2001:db8:1:2:ffff::9"), 64));
        assert_eq!(a, KeyValue::Ip(ip("2001:db8:1:2::")));
        assert_ne!(a, client_key(ip("2001:db8:1:3::1"), 64));
        assert_eq!(
            client_key(ip("2001:db8::1"), 128),
            KeyValue::Ip(ip("2001:db8::1"))
        );
        assert_eq!(client_key(ip("2001:db8::1"), 0), KeyValue::Ip(ip("::")));
        // IPv4, mapped or not, is one address whatever the prefix.
        assert_eq!(
            client_key(ip("::ffff:192.0.2.7"), 64),
            KeyValue::Ip(ip("192.0.2.7"))
        );
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let l = LocalLimiter::new(&spec(3, Duration::from_secs(60), 3)).unwrap();
        let k = KeyValue::text(b"a");
        for expected in [2, 1, 0] {
            assert_eq!(
                l.check(&k),
                Decision::Allowed {
                    limit: 3,
                    remaining: expected,
                    reset: Duration::from_secs(20) * (3 - expected),
                }
            );
        }
        match l.check(&k) {
            Decision::Limited {
                limit,
                retry_after,
                reset,
            } => {
                assert_eq!(limit, 3);
                assert!(
                    retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20)
                );
                assert_eq!(reset, retry_after + Duration::from_secs(40));
            }
            d => panic!("{d:?}"),
        }
        // Other keys have their own bucket.
        assert!(matches!(
            l.check(&KeyValue::text(b"b")),
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
        // A cap well above the keys used: this is about idle eviction, not the cap.
        let l = LocalLimiter::with_max_keys(
            &spec(1000, Duration::from_millis(100), 1000),
            200_000,
            None,
        )
        .unwrap();
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

    #[test]
    fn long_keys_are_stored_as_their_digest() {
        let short = vec![b'a'; MAX_KEY_BYTES];
        assert!(matches!(KeyValue::text(&short), KeyValue::Text(t) if t.len() == MAX_KEY_BYTES));
        let mut long = vec![b'a'; 30 * 1024];
        let a = KeyValue::text(&long);
        assert!(matches!(a, KeyValue::Digest(_)));
        assert_eq!(a, KeyValue::text(&long), "the same value, the same key");
        *long.last_mut().unwrap() = b'b';
        assert_ne!(a, KeyValue::text(&long), "one byte apart, another key");

        let l = LocalLimiter::new(&spec(1, Duration::from_secs(60), 1)).unwrap();
        assert!(matches!(l.check(&a), Decision::Allowed { .. }));
        assert!(matches!(l.check(&a), Decision::Limited { .. }));
        assert!(matches!(
            l.check(&KeyValue::text(&long)),
            Decision::Allowed { .. }
        ));
        assert!(
            l.held_bytes() < 4096,
            "{} bytes for two 30 KB keys",
            l.held_bytes()
        );
    }

    #[test]
    fn live_keys_are_capped_least_recently_used_first() {
        let family = IntCounterVec::new(Opts::new("evicted", "test"), &["route"]).unwrap();
        let counter = family.with_label_values(&["r"]);
        let l = LocalLimiter::with_max_keys(
            &spec(1, Duration::from_secs(60), 1),
            100,
            Some(RouteCounter::new(&family, &["r"], &[""])),
        )
        .unwrap();
        let key = |i: u32| KeyValue::text(format!("client-{i}").as_bytes());
        let busy = KeyValue::text(b"busy");
        assert!(matches!(l.check(&busy), Decision::Allowed { .. }));
        for i in 0..1000 {
            assert!(matches!(l.check(&key(i)), Decision::Allowed { .. }));
            if i % 10 == 0 {
                // Recently used (even while limited): never the one evicted.
                assert!(matches!(l.check(&busy), Decision::Limited { .. }), "at {i}");
            }
            assert!(l.tracked_keys() <= 100, "{} keys at {i}", l.tracked_keys());
        }
        assert!(l.evicted() >= 900, "{}", l.evicted());
        assert_eq!(counter.get(), l.evicted());
        assert!(matches!(l.check(&busy), Decision::Limited { .. }));
        assert!(
            matches!(l.check(&key(999)), Decision::Limited { .. }),
            "newest key kept"
        );
        assert!(
            matches!(l.check(&key(0)), Decision::Allowed { .. }),
            "the oldest key was evicted: it starts afresh"
        );
    }

    #[test]
    fn evictions_are_counted_per_route_in_the_gateway_metrics() {
        let metrics = crate::telemetry::metrics::Metrics::new();
        let reg = Limiters::with_max_keys(10);
        metrics.register_by_route(reg.evicted_metric()).unwrap();
        let l = reg
            .get("orders", &spec(1, Duration::from_secs(60), 1))
            .unwrap();
        for i in 0..30u8 {
            l.check(&KeyValue::Ip(IpAddr::from([10, 0, 0, i])));
        }
        assert!(l.tracked_keys() <= 10);
        let text = metrics.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("rustygate_rate_limit_keys_evicted_total{route=\"orders\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 20, "{line}");

        // A reload removes the route: its series goes. The limiter, kept while it has keys,
        // serves the route again when a later reload brings it back: its evictions are
        // counted in the series again, not into one no scrape reads.
        metrics.follow_config(&std::sync::Arc::new(
            crate::telemetry::traffic::tests::snapshot(&["other"]),
        ));
        assert!(!metrics.render().contains("route=\"orders\""));
        for i in 30..60u8 {
            l.check(&KeyValue::Ip(IpAddr::from([10, 0, 0, i])));
        }
        let text = metrics.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("rustygate_rate_limit_keys_evicted_total{route=\"orders\"}")),
            "{text}"
        );
    }
}
