//! Per-worker request metrics without a shared lock on the request path.
//!
//! `prometheus`' labelled vectors take a read lock and hash the labels on every lookup. Each
//! worker instead keeps the handles it has resolved, by route name, in a `RefCell` only it
//! touches; a request then costs one small hash lookup and a few atomic adds. The cache is
//! dropped when the snapshot changes, so routes that disappear do not pin memory.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use prometheus::{Histogram, IntCounter};

use super::metrics::Metrics;
use crate::router::{METHODS, method_slot};
use crate::snapshot::Snapshot;
use crate::upstream::Upstream;
use crate::util::FastMap as HashMap;

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "<none>";

struct RouteHandles {
    duration: Histogram,
    /// By (method slot, status).
    requests: HashMap<(usize, u16), IntCounter>,
}

/// (upstream address, target index, status or 0).
type AttemptKey = (usize, usize, u16);

pub struct Recorder {
    metrics: Arc<Metrics>,
    /// The snapshot the handles are for, told apart by address: a pointer comparison per
    /// request instead of comparing version strings (byte by byte in musl's `memcmp`). The weak
    /// reference keeps the allocation, so no later snapshot can take its address.
    cache: RefCell<(Weak<Snapshot>, HashMap<String, RouteHandles>)>,
    /// `upstream_duration_seconds` handles by upstream address (as `attempts`).
    upstreams: RefCell<HashMap<usize, (Weak<Upstream>, Histogram)>>,
    /// `upstream_requests_total` handles by (upstream address, target index, status; 0 for
    /// failed). The weak reference keeps the upstream's allocation (so its address cannot be
    /// reused by another upstream while the entry exists) without keeping its targets alive.
    attempts: RefCell<HashMap<AttemptKey, (Weak<Upstream>, IntCounter)>>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            cache: RefCell::new((Weak::new(), HashMap::default())),
            upstreams: RefCell::new(HashMap::default()),
            attempts: RefCell::new(HashMap::default()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// One finished request.
    pub fn request(
        &self,
        snapshot: &Arc<Snapshot>,
        route: Option<&str>,
        method: &str,
        status: u16,
        seconds: f64,
    ) {
        let route = route.unwrap_or(NO_ROUTE);
        let mut cache = self.cache.borrow_mut();
        if !std::ptr::eq(cache.0.as_ptr(), Arc::as_ptr(snapshot)) {
            cache.0 = Arc::downgrade(snapshot);
            cache.1.clear();
            // Drops the old snapshot's upstreams too.
            self.attempts.borrow_mut().clear();
            self.upstreams.borrow_mut().clear();
        }
        let record = |h: &mut RouteHandles| {
            h.duration.observe(seconds);
            let slot = method_slot(method);
            let counter = h.requests.entry((slot, status)).or_insert_with(|| {
                let method = METHODS.get(slot).copied().unwrap_or("OTHER");
                self.metrics
                    .requests
                    .with_label_values(&[route, method, &status.to_string()])
            });
            counter.inc();
        };
        // One lookup for a route already seen.
        if let Some(h) = cache.1.get_mut(route) {
            record(h);
            return;
        }
        let mut handles = RouteHandles {
            duration: self.metrics.request_duration.with_label_values(&[route]),
            requests: HashMap::default(),
        };
        record(&mut handles);
        cache.1.insert(route.to_owned(), handles);
    }

    /// One attempt sent to target `target` of `upstream`: its status, or `None` when no
    /// response came.
    pub fn attempt(&self, upstream: &Arc<Upstream>, target: usize, status: Option<u16>) {
        let key = (Arc::as_ptr(upstream) as usize, target, status.unwrap_or(0));
        let mut cache = self.attempts.borrow_mut();
        if let Some((_, c)) = cache.get(&key) {
            c.inc();
            return;
        }
        let url = upstream.targets.get(target).map_or("", |t| t.url.as_str());
        let label = status.map_or_else(|| "failed".to_owned(), |s| s.to_string());
        let c = self.metrics.upstream_requests.with_label_values(&[
            upstream.name.as_str(),
            url,
            label.as_str(),
        ]);
        c.inc();
        if cache.len() < 10_000 {
            cache.insert(key, (Arc::downgrade(upstream), c));
        }
    }

    /// Time to the upstream's response head.
    pub fn upstream(&self, upstream: &Arc<Upstream>, seconds: f64) {
        let key = Arc::as_ptr(upstream) as usize;
        let mut cache = self.upstreams.borrow_mut();
        if let Some((_, h)) = cache.get(&key) {
            h.observe(seconds);
            return;
        }
        let h = self
            .metrics
            .upstream_duration
            .with_label_values(&[upstream.name.as_str()]);
        h.observe(seconds);
        if cache.len() < 10_000 {
            cache.insert(key, (Arc::downgrade(upstream), h));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::snapshot;

    #[test]
    fn the_route_cache_follows_the_snapshot_and_the_counts_carry_on() {
        let metrics = Arc::new(Metrics::new());
        let recorder = Recorder::new(Arc::clone(&metrics));
        let count = |route: &str| {
            metrics
                .requests
                .with_label_values(&[route, "GET", "200"])
                .get()
        };
        let old = Arc::new(snapshot("v1"));
        recorder.request(&old, Some("api"), "GET", 200, 0.01);
        recorder.request(&old, Some("gone"), "GET", 200, 0.01);
        recorder.request(&old, Some("api"), "GET", 200, 0.01);
        assert_eq!(recorder.cache.borrow().1.len(), 2);
        // A new snapshot, even of the same version: the handles are resolved again, and those
        // of routes it no longer sees are let go.
        let new = Arc::new(snapshot("v1"));
        recorder.request(&new, Some("api"), "GET", 200, 0.01);
        let cache = recorder.cache.borrow();
        assert_eq!(cache.1.keys().collect::<Vec<_>>(), ["api"]);
        assert!(std::ptr::eq(cache.0.as_ptr(), Arc::as_ptr(&new)));
        drop(cache);
        assert_eq!((count("api"), count("gone")), (3, 1));
    }
}
