//! Runtime state of targets and upstreams, kept outside snapshots.
//!
//! A snapshot is immutable, but in-flight counts, health verdicts, outlier ejections, retry
//! budgets and circuit-breaker counters change with every request. They live here, in a
//! process-wide registry of weak references keyed by what identifies them:
//!
//! * a target's state by (upstream name, target URL, health-check settings): a config swap that
//!   keeps the target keeps its state; a changed health check starts a fresh verdict;
//! * an upstream's shared counters by (upstream name, its target list).
//!
//! Snapshots hold the strong references. When the last snapshot using a target is dropped, its
//! state is dropped with it and its health checker (which holds only a weak reference) stops.
//! Everything on the request path is an atomic load or add: no lock shared by workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

/// Milliseconds since the process started, plus one (so that 0 can mean "never").
pub fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// What one target is going through right now.
#[derive(Debug)]
pub struct TargetState {
    pub upstream: String,
    pub url: String,
    in_flight: AtomicU32,
    /// The active health checks' verdict; true until a check says otherwise.
    healthy: AtomicBool,
    /// `now_ms()` when the current ejection ends; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections so far in a row; each doubles the next ejection time.
    ejections: AtomicU32,
    /// When the last ejection started.
    last_ejected: AtomicU64,
    /// Ejections ever: a health checker counts its passing checks from the latest one.
    ejection_epoch: AtomicU64,
    consecutive_failures: AtomicU32,
    consecutive_5xx: AtomicU32,
    /// Set once a health checker runs for this state.
    pub(crate) checker: AtomicBool,
}

impl TargetState {
    fn new(upstream: &str, url: &str) -> Self {
        Self {
            upstream: upstream.to_owned(),
            url: url.to_owned(),
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_ejected: AtomicU64::new(0),
            ejection_epoch: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            checker: AtomicBool::new(false),
        }
    }

    /// A state that belongs to no registry (benches, unit tests).
    pub fn detached(upstream: &str, url: &str) -> Arc<Self> {
        Arc::new(Self::new(upstream, url))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts every ejection; a health check that passed ends an ejection only when enough
    /// checks started after it passed in a row (see `health::run`).
    pub fn ejection_epoch(&self) -> u64 {
        self.ejection_epoch.load(Ordering::Relaxed)
    }

    /// Ejections in the current streak (reset once the target stays in long enough).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Time left of the current ejection; `None` when the target is not ejected.
    pub fn ejected_for(&self) -> Option<Duration> {
        if !self.is_ejected() {
            return None;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        Some(Duration::from_millis(until.saturating_sub(now_ms())))
    }

    /// Connect failures, timeouts or resets in a row, and 5xx responses in a row (counted
    /// only where outlier detection counts them).
    pub fn streaks(&self) -> (u32, u32) {
        (
            self.consecutive_failures.load(Ordering::Relaxed),
            self.consecutive_5xx.load(Ordering::Relaxed),
        )
    }

    /// Counts a request to this target until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the target may receive requests: healthy and not ejected.
    #[inline]
    pub fn available(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    /// Whether the target is ejected now. The first caller after an ejection ends clears it.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now_ms() < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                upstream = self.upstream.as_str(),
                upstream_target = self.url.as_str(),
                from = "ejected",
                to = "available",
                reason = "ejection time over",
                "upstream target state changed"
            );
        }
        false
    }

    /// Records an active health check verdict; logs and returns true when it changed.
    pub fn set_healthy(&self, healthy: bool, reason: &str) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            let (from, to) = if healthy {
                ("unhealthy", "healthy")
            } else {
                ("healthy", "unhealthy")
            };
            if healthy {
                tracing::info!(
                    upstream = self.upstream.as_str(),
                    upstream_target = self.url.as_str(),
                    from,
                    to,
                    reason,
                    "upstream target state changed"
                );
            } else {
                tracing::warn!(
                    upstream = self.upstream.as_str(),
                    upstream_target = self.url.as_str(),
                    from,
                    to,
                    reason,
                    "upstream target state changed"
                );
            }
        }
        was != healthy
    }

    /// Ends an ejection early (an active health check passed); logs when there was one.
    pub fn unject(&self, reason: &str) {
        if self.ejected_until.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(
                upstream = self.upstream.as_str(),
                upstream_target = self.url.as_str(),
                from = "ejected",
                to = "available",
                reason,
                "upstream target state changed"
            );
        }
    }

    /// A response head arrived: resets the failure streaks (5xx counts as a failure only when
    /// `count_5xx`). Returns the 5xx streak length after this response.
    #[inline]
    pub(crate) fn record_response(&self, status: u16, count_5xx: bool) -> u32 {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if count_5xx && status >= 500 {
            return self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        }
        if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        0
    }

    /// A connect failure, timeout or reset; returns the streak length.
    pub(crate) fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ejects the target for `base * 2^(earlier ejections)`, capped at `max`; the streak of
    /// earlier ejections is forgotten once the target has stayed in for `max`.
    pub(crate) fn eject(&self, base: Duration, max: Duration, reason: &str) {
        let now = now_ms();
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ejected.swap(now, Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) > max_ms.saturating_mul(2) {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let ms = base_ms.saturating_mul(1u64 << n).min(max_ms).max(1);
        self.ejected_until.store(now + ms, Ordering::Relaxed);
        self.ejection_epoch.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        tracing::warn!(
            upstream = self.upstream.as_str(),
            upstream_target = self.url.as_str(),
            from = "available",
            to = "ejected",
            reason,
            ejection_seconds = ms as f64 / 1000.0,
            "upstream target state changed"
        );
    }
}

/// A request counted in a target's in-flight number; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<TargetState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters one upstream shares across workers and snapshots.
#[derive(Debug, Default)]
pub struct UpstreamShared {
    active: AtomicU32,
    pending: AtomicU32,
    /// Retry budget, in thousandths of a retry: requests deposit, retries withdraw.
    budget: AtomicI64,
    /// Retries allowed regardless of the budget, refilled every second.
    reserve: AtomicI64,
    reserve_refilled: AtomicU64,
}

/// Which circuit-breaker limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    MaxRequests,
    MaxPending,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPending => "max_pending",
        }
    }
}

/// Holds one slot of an upstream limit until dropped.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<UpstreamShared>,
    pending: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = if self.pending {
            &self.shared.pending
        } else {
            &self.shared.active
        };
        c.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Thousandths: the budget's unit.
const MILLI: i64 = 1000;

impl UpstreamShared {
    fn acquire(
        self: &Arc<Self>,
        pending: bool,
        limit: Option<u32>,
    ) -> Result<Option<Slot>, Overflow> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let (c, kind) = if pending {
            (&self.pending, Overflow::MaxPending)
        } else {
            (&self.active, Overflow::MaxRequests)
        };
        if c.fetch_add(1, Ordering::Relaxed) >= limit {
            c.fetch_sub(1, Ordering::Relaxed);
            return Err(kind);
        }
        Ok(Some(Slot {
            shared: Arc::clone(self),
            pending,
        }))
    }

    /// Requests holding a `max_requests` slot now (counted only when the limit is set).
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections being opened under `max_pending` now (counted only when the limit is set).
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A request slot under `max_requests`; `Ok(None)` when there is no limit.
    pub fn acquire_request(self: &Arc<Self>, limit: Option<u32>) -> Result<Option<Slot>, Overflow> {
        self.acquire(false, limit)
    }

    /// A slot for opening a connection under `max_pending`.
    pub fn acquire_pending(self: &Arc<Self>, limit: Option<u32>) -> Result<Option<Slot>, Overflow> {
        self.acquire(true, limit)
    }

    /// A request that may be retried deposits `percent` hundredths of a retry (capped so that a
    /// long quiet period does not save up a storm).
    pub fn deposit(&self, percent: u32) {
        let add = i64::from(percent) * MILLI / 100;
        let cap = 100 * MILLI;
        if self.budget.fetch_add(add, Ordering::Relaxed) > cap {
            self.budget.store(cap, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, or from the per-second reserve.
    pub fn withdraw(&self, min_per_second: u32) -> bool {
        if take(&self.budget, MILLI) {
            return true;
        }
        if min_per_second == 0 {
            return false;
        }
        let now = now_ms();
        let last = self.reserve_refilled.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .reserve_refilled
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.reserve
                .store(i64::from(min_per_second) * MILLI, Ordering::Relaxed);
        }
        take(&self.reserve, MILLI)
    }
}

fn take(c: &AtomicI64, n: i64) -> bool {
    let mut cur = c.load(Ordering::Relaxed);
    while cur >= n {
        match c.compare_exchange_weak(cur, cur - n, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
    false
}

#[derive(Default)]
struct Registry {
    targets: HashMap<(String, String, u64), Weak<TargetState>>,
    upstreams: HashMap<(String, Vec<String>), Weak<UpstreamShared>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live state of this target, or a fresh one. `health` identifies the health-check
/// settings, so that changing them starts a new verdict.
pub fn target_state(upstream: &str, url: &str, health: u64) -> Arc<TargetState> {
    let mut reg = registry();
    let key = (upstream.to_owned(), url.to_owned(), health);
    if let Some(s) = reg.targets.get(&key).and_then(Weak::upgrade) {
        return s;
    }
    let s = Arc::new(TargetState::new(upstream, url));
    reg.targets.insert(key, Arc::downgrade(&s));
    s
}

/// The live shared counters of this upstream, or fresh ones.
pub fn upstream_shared(upstream: &str, targets: &[&str]) -> Arc<UpstreamShared> {
    let mut reg = registry();
    let mut urls: Vec<String> = targets.iter().map(|t| (*t).to_owned()).collect();
    urls.sort();
    let key = (upstream.to_owned(), urls);
    if let Some(s) = reg.upstreams.get(&key).and_then(Weak::upgrade) {
        return s;
    }
    let s = Arc::new(UpstreamShared::default());
    reg.upstreams.insert(key, Arc::downgrade(&s));
    s
}

/// Forgets entries whose state has been dropped (called once per compile).
pub fn prune() {
    let mut reg = registry();
    reg.targets.retain(|_, w| w.strong_count() > 0);
    reg.upstreams.retain(|_, w| w.strong_count() > 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_returns_the_live_state_and_forgets_dropped_ones() {
        let a = target_state("u-reg", "http://127.0.0.1:1", 7);
        let b = target_state("u-reg", "http://127.0.0.1:1", 7);
        assert!(Arc::ptr_eq(&a, &b));
        let other_health = target_state("u-reg", "http://127.0.0.1:1", 8);
        assert!(!Arc::ptr_eq(&a, &other_health));
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none());
        let c = target_state("u-reg", "http://127.0.0.1:1", 7);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn in_flight_guard_counts() {
        let s = TargetState::detached("u", "t");
        let g1 = s.begin();
        let g2 = s.begin();
        assert_eq!(s.in_flight(), 2);
        drop(g1);
        assert_eq!(s.in_flight(), 1);
        drop(g2);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn ejection_grows_and_is_capped() {
        let s = TargetState::detached("u", "t");
        s.eject(Duration::from_secs(10), Duration::from_secs(25), "test");
        let first = s.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((9_000..=10_000).contains(&first), "{first}");
        s.eject(Duration::from_secs(10), Duration::from_secs(25), "test");
        let second = s.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((19_000..=20_000).contains(&second), "{second}");
        s.eject(Duration::from_secs(10), Duration::from_secs(25), "test");
        let third = s.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((24_000..=25_000).contains(&third), "{third}");
        assert!(s.is_ejected() && !s.available());
    }

    #[test]
    fn ejection_ends_by_itself() {
        let s = TargetState::detached("u", "t");
        s.eject(Duration::from_millis(1), Duration::from_millis(1), "test");
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.available());
    }

    #[test]
    fn budget_allows_a_share_of_requests() {
        let u = UpstreamShared::default();
        for _ in 0..100 {
            u.deposit(20);
        }
        let granted = (0..100).filter(|_| u.withdraw(0)).count();
        assert_eq!(granted, 20);
        let with_reserve = (0..100).filter(|_| u.withdraw(3)).count();
        assert_eq!(with_reserve, 3);
    }

    #[test]
    fn limits_turn_away_and_release() {
        let u = Arc::new(UpstreamShared::default());
        let a = u.acquire_request(Some(2)).unwrap();
        let b = u.acquire_request(Some(2)).unwrap();
        assert_eq!(
            u.acquire_request(Some(2)).unwrap_err(),
            Overflow::MaxRequests
        );
        drop(a);
        assert!(u.acquire_request(Some(2)).is_ok());
        drop(b);
        assert!(u.acquire_request(None).unwrap().is_none());
    }
}
