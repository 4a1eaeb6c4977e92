//! Per-worker request metrics: no lock, no locked instruction and one hash lookup per count.
//!
//! Each recorder writes cells of its own in the request metric families ([`super::counts`]),
//! which `/metrics` sums over the workers. It keeps the cells it has asked for by the keys a
//! request already has (route index, method slot, status; upstream address, target index,
//! status), so a request costs one small hash lookup per family pair and plain stores. The
//! keys are only valid for one snapshot: they are dropped when the snapshot changes, so routes
//! and upstreams that disappear do not pin memory, and the cells, which the families keep,
//! carry the counts on.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use super::counts::{Count, Level, Timing, Writer};
use super::metrics::Metrics;
use crate::router::{METHODS, RouteId, method_slot};
use crate::snapshot::{RouteRecord, Snapshot};
use crate::upstream::Upstream;
use crate::util::FastMap as HashMap;

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "<none>";

/// (route index, or `usize::MAX` for no route; method slot << 16 | status).
type RequestKey = (usize, u32);

/// (upstream address, target index, status or 0 for failed).
type AttemptKey = (usize, usize, u16);

/// An attempt's cells. The weak reference keeps the upstream's allocation (so its address, the
/// key, cannot be taken by another upstream while the entry exists) without keeping its
/// targets alive.
struct AttemptCells {
    _upstream: Weak<Upstream>,
    count: Arc<Count>,
    /// `None` for failed attempts (status 0), which are not timed: an upstream that never
    /// answered has no histogram series, as before.
    timing: Option<Arc<Timing>>,
}

struct Cells {
    /// The snapshot the request keys are for, told apart by address: a pointer comparison per
    /// request instead of comparing version strings. The weak reference keeps the allocation,
    /// so no later snapshot can take its address.
    snapshot: Weak<Snapshot>,
    /// `requests_total` and `request_duration_seconds` cells.
    requests: HashMap<RequestKey, (Arc<Count>, Arc<Timing>)>,
    /// `upstream_requests_total` and `upstream_request_duration_seconds` cells.
    attempts: HashMap<AttemptKey, AttemptCells>,
}

/// A request head refused before any route saw it (malformed, oversized, not received in
/// time): one count in `requests_total` and one `request_duration_seconds` sample (`seconds`)
/// under `route="<none>"`, by the method its first bytes name (`OTHER` when they name none),
/// which is returned. Rare, and off any worker's request path: a lookup per call.
pub fn refused(metrics: &Metrics, method: &[u8], status: u16, seconds: f64) -> &'static str {
    thread_local!(static WRITER: Writer = Writer::new());
    let slot = method_slot(std::str::from_utf8(method).unwrap_or_default());
    let method = METHODS.get(slot).copied().unwrap_or("OTHER");
    WRITER.with(|w| {
        metrics
            .requests
            .cell(w, &[NO_ROUTE, method, &status.to_string()])
            .inc();
        metrics
            .request_duration
            .cell(w, &[NO_ROUTE])
            .observe(seconds);
    });
    method
}

/// Keys past this many are not kept (cells are looked up again each time): a bound on what
/// statuses and targets can make a worker hold.
const MAX_KEYS: usize = 10_000;

pub struct Recorder {
    metrics: Arc<Metrics>,
    writer: Writer,
    /// This worker's share of `in_flight_requests`.
    in_flight: Arc<Level>,
    cells: RefCell<Cells>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let writer = Writer::new();
        // Made now, so that the series is there (at 0) before the first request.
        let in_flight = metrics.in_flight.cell(&writer, &[]);
        Self {
            metrics,
            writer,
            in_flight,
            cells: RefCell::new(Cells {
                snapshot: Weak::new(),
                requests: HashMap::default(),
                attempts: HashMap::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A request has begun; [`Recorder::ended`] follows once for it, on this worker.
    #[inline]
    pub fn began(&self) {
        self.in_flight.add(1);
    }

    /// A request begun with [`Recorder::began`] has ended.
    #[inline]
    pub fn ended(&self) {
        self.in_flight.add(-1);
    }

    /// One finished request, answered under `snapshot` by its route `route` (an index into
    /// `snapshot.routes`; `None`: no route matched).
    pub fn request(
        &self,
        snapshot: &Arc<Snapshot>,
        route: Option<RouteId>,
        method: &str,
        status: u16,
        seconds: f64,
    ) {
        let name = || {
            route
                .and_then(|r| snapshot.routes.get(r))
                .map_or(NO_ROUTE, |r| r.name.as_str())
        };
        let generation = || Arc::downgrade(snapshot);
        self.count_request(
            Arc::as_ptr(snapshot),
            generation,
            route,
            name,
            method,
            status,
            seconds,
        );
    }

    /// [`Recorder::request`] for a request that let go of its snapshot once its response head
    /// was out (a streamed body, a WebSocket tunnel): `snapshot` may be freed by now, and the
    /// route's name comes from its `record`.
    pub fn released_request(
        &self,
        snapshot: &Weak<Snapshot>,
        route: RouteId,
        record: &RouteRecord,
        method: &str,
        status: u16,
        seconds: f64,
    ) {
        let name = || record.name.as_str();
        let generation = || snapshot.clone();
        self.count_request(
            snapshot.as_ptr(),
            generation,
            Some(route),
            name,
            method,
            status,
            seconds,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn count_request<'n>(
        &self,
        snapshot: *const Snapshot,
        generation: impl FnOnce() -> Weak<Snapshot>,
        route: Option<RouteId>,
        name: impl FnOnce() -> &'n str,
        method: &str,
        status: u16,
        seconds: f64,
    ) {
        let mut cells = self.cells.borrow_mut();
        if !std::ptr::eq(cells.snapshot.as_ptr(), snapshot) {
            cells.snapshot = generation();
            cells.requests.clear();
            // Lets the old snapshot's upstreams go too.
            cells.attempts.clear();
        }
        let slot = method_slot(method);
        let key = (
            route.unwrap_or(usize::MAX),
            (slot as u32) << 16 | u32::from(status),
        );
        if let Some((count, timing)) = cells.requests.get(&key) {
            count.inc();
            timing.observe(seconds);
            return;
        }
        let name = name();
        let method = METHODS.get(slot).copied().unwrap_or("OTHER");
        let m = &self.metrics;
        let count = m
            .requests
            .cell(&self.writer, &[name, method, &status.to_string()]);
        let timing = m.request_duration.cell(&self.writer, &[name]);
        count.inc();
        timing.observe(seconds);
        if cells.requests.len() < MAX_KEYS {
            cells.requests.insert(key, (count, timing));
        }
    }

    pub fn attempt(&self, upstream: &Arc<Upstream>, target: usize, response: Option<(u16, f64)>) {
        let status = response.map_or(0, |(s, _)| s);
        let key = (Arc::as_ptr(upstream) as usize, target, status);
        let mut cells = self.cells.borrow_mut();
        let record = |c: &AttemptCells| {
            c.count.inc();
            if let (Some(timing), Some((_, seconds))) = (&c.timing, response) {
                timing.observe(seconds);
            }
        };
        if let Some(c) = cells.attempts.get(&key) {
            record(c);
            return;
        }
        let url = upstream.targets.get(target).map_or("", |t| t.url.as_str());
        let label = response.map_or_else(|| "failed".to_owned(), |(s, _)| s.to_string());
        let name = upstream.name.as_str();
        let m = &self.metrics;
        let c = AttemptCells {
            _upstream: Arc::downgrade(upstream),
            count: m
                .upstream_requests
                .cell(&self.writer, &[name, url, label.as_str()]),
            timing: response.map(|_| m.upstream_duration.cell(&self.writer, &[name])),
        };
        record(&c);
        if cells.attempts.len() < MAX_KEYS {
            cells.attempts.insert(key, c);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    /// A snapshot with `routes` in that order, each to the upstream `be` (two targets).
    fn snapshot(routes: &[&str]) -> Arc<Snapshot> {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for r in routes {
            text += &format!("[[route]]\nname = \"{r}\"\npath = \"/{r}\"\nupstream = \"be\"\n");
        }
        std::fs::create_dir_all(dir.path().join("routes")).unwrap();
        std::fs::create_dir_all(dir.path().join("upstreams")).unwrap();
        std::fs::write(dir.path().join("routes/r.toml"), text).unwrap();
        std::fs::write(
            dir.path().join("upstreams/be.toml"),
            "[upstream.be]\ntargets = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n",
        )
        .unwrap();
        let compiled = crate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
        Arc::new(compiled.snapshot.unwrap())
    }

    /// Every series of `family` as "label=value,...: value", histograms by their count.
    fn series(family: &impl Collector) -> Vec<String> {
        let mut out: Vec<String> = family.collect()[0]
            .get_metric()
            .iter()
            .map(|m| {
                let labels: Vec<String> = m
                    .get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect();
                let value = if m.get_histogram().get_bucket().is_empty() {
                    m.get_counter().get_value()
                } else {
                    m.get_histogram().get_sample_count() as f64
                };
                format!("{}: {value}", labels.join(","))
            })
            .collect();
        out.sort();
        out
    }

    /// Route indices are per snapshot: after a swap that reorders the routes, the counts still
    /// land on the right names, carry on from before, and the keys of the old snapshot are
    /// let go. Two recorders (two workers) count in one series.
    #[test]
    fn counts_follow_route_names_across_snapshots_and_workers() {
        let metrics = Arc::new(Metrics::new());
        let worker = Recorder::new(Arc::clone(&metrics));
        let other = Recorder::new(Arc::clone(&metrics));
        let old = snapshot(&["api", "gone"]);
        worker.request(&old, Some(0), "GET", 200, 0.0001);
        worker.request(&old, Some(1), "GET", 200, 0.0001);
        worker.request(&old, Some(0), "GET", 200, 0.0001);
        worker.request(&old, None, "BREW", 404, 0.0001);
        other.request(&old, Some(0), "GET", 200, 0.0001);
        assert_eq!(worker.cells.borrow().requests.len(), 3);
        // The same routes in another order, and one new.
        let new = snapshot(&["new", "api"]);
        worker.request(&new, Some(1), "GET", 200, 0.2);
        worker.request(&new, Some(0), "POST", 503, 0.0001);
        {
            let cells = worker.cells.borrow();
            assert_eq!(cells.requests.len(), 2);
            assert!(std::ptr::eq(cells.snapshot.as_ptr(), Arc::as_ptr(&new)));
        }
        assert_eq!(
            series(&metrics.requests),
            [
                "method=GET,route=api,status=200: 4",
                "method=GET,route=gone,status=200: 1",
                "method=OTHER,route=<none>,status=404: 1",
                "method=POST,route=new,status=503: 1",
            ]
        );
        assert_eq!(
            series(&metrics.request_duration),
            [
                "route=<none>: 1",
                "route=api: 4",
                "route=gone: 1",
                "route=new: 1"
            ]
        );
        let api = metrics.request_duration.collect()[0]
            .get_metric()
            .iter()
            .find(|m| m.get_label()[0].value() == "api")
            .unwrap()
            .get_histogram()
            .clone();
        assert_eq!(api.get_bucket()[0].cumulative_count(), 3);
        assert!((api.get_sample_sum() - 0.2003).abs() < 1e-9);
    }

    /// Attempts by target and status (`failed` without a response); only answered ones are
    /// timed. An upstream of a new snapshot at the old one's address cannot inherit its keys:
    /// the keys hold the old allocation.
    #[test]
    fn attempts_count_by_target_and_status_and_time_the_answered_ones() {
        let metrics = Arc::new(Metrics::new());
        let worker = Recorder::new(Arc::clone(&metrics));
        let snap = snapshot(&["api"]);
        let be = &snap.upstreams[0];
        worker.attempt(be, 1, None);
        // An upstream that has not answered yet has no histogram series.
        assert!(series(&metrics.upstream_duration).is_empty());
        worker.attempt(be, 0, Some((200, 0.001)));
        worker.attempt(be, 0, Some((200, 0.001)));
        worker.attempt(be, 1, Some((503, 0.002)));
        let t0 = &be.targets[0].url;
        let t1 = &be.targets[1].url;
        assert_eq!(
            series(&metrics.upstream_requests),
            [
                format!("status=200,target={t0},upstream=be: 2"),
                format!("status=503,target={t1},upstream=be: 1"),
                format!("status=failed,target={t1},upstream=be: 1"),
            ]
        );
        assert_eq!(series(&metrics.upstream_duration), ["upstream=be: 3"]);

        // A request under a new snapshot lets the old upstream's keys go.
        let new = snapshot(&["api"]);
        worker.request(&new, Some(0), "GET", 200, 0.001);
        assert!(worker.cells.borrow().attempts.is_empty());
        worker.attempt(&new.upstreams[0], 0, Some((200, 0.001)));
        assert_eq!(
            series(&metrics.upstream_requests)[0],
            format!("status=200,target={t0},upstream=be: 3")
        );
    }
}
