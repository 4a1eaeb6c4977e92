//! The dashboard's traffic charts without Prometheus: every [`SAMPLE_EVERY`] the admin listener
//! reads the request counters and latency histograms of the metrics registry and keeps, per
//! route, what changed since the last sample (requests/s, 4xx/s, 5xx/s, p99) in a ring of the
//! last [`SAMPLES`] samples (15 minutes).
//!
//! Memory is bounded by routes × [`SAMPLES`], whatever the traffic: a sample holds one point per
//! route that answered requests in its interval (idle routes take nothing), and only the routes
//! of the served snapshot (plus `<none>`, the unmatched requests) are followed. Nothing here is
//! on the request path: the workers only ever touch their prometheus handles.
//!
//! The same samples keep the upstreams' latency histograms over the window
//! ([`super::latency`]), for the Upstreams view's p50/p99.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use serde::Serialize;

use super::metrics::Metrics;
use super::recorder::NO_ROUTE;
use crate::snapshot::Snapshot;

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes at [`SAMPLE_EVERY`].
pub const SAMPLES: usize = 180;

/// What one route did during one sample's interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Requests answered in the interval.
    #[serde(skip)]
    pub requests: u64,
    pub requests_per_second: f64,
    /// 4xx responses per second.
    pub rate_4xx: f64,
    /// 5xx responses per second.
    pub rate_5xx: f64,
    /// 99th percentile of the time to the last response byte, interpolated within the
    /// histogram's buckets as Prometheus' `histogram_quantile` does; `None` without requests.
    pub p99_ms: Option<f64>,
}

struct Sample {
    /// Unix seconds at the end of the interval.
    at: u64,
    total: Point,
    routes: Vec<(Arc<str>, Point)>,
}

/// A route's counters at the last sample.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    requests: u64,
    r4xx: u64,
    r5xx: u64,
    /// Cumulative bucket counts of `rustygate_request_duration_seconds`, then the sample count.
    buckets: Vec<u64>,
}

/// The ring of samples and the counters it takes differences of.
pub struct Traffic {
    samples: VecDeque<Sample>,
    /// Every route's counters at the last sample (routes that never answered are absent).
    last: HashMap<Arc<str>, Counts>,
    /// Bucket upper bounds of the duration histogram, in seconds.
    bounds: Vec<f64>,
    /// Names of the served snapshot's routes, and the version they are of.
    routes: (String, HashSet<Arc<str>>),
    /// Sample interval, for the answer's `interval_seconds`.
    every: Duration,
    /// Set once the first read (the baseline) is done.
    started: bool,
    /// The upstreams' latency over the same window, sampled at the same times.
    upstreams: super::latency::UpstreamWindow,
}

/// The `/api/v1/traffic` answer.
#[derive(Debug, Serialize)]
pub struct TrafficView {
    pub interval_seconds: f64,
    pub capacity: usize,
    /// Unix seconds of each sample, oldest first; every series below has one entry per time.
    pub times: Vec<u64>,
    /// All routes together.
    pub total: Series,
    /// The busiest routes over the window (most requests first), at most the `limit` asked for.
    pub routes: Vec<RouteSeries>,
    /// Routes with requests in the window, including those left out by the limit.
    pub routes_with_traffic: usize,
}

/// Columns of points; `null` where a route answered nothing in that interval.
#[derive(Debug, Default, Serialize)]
pub struct Series {
    pub requests_per_second: Vec<f64>,
    pub rate_4xx: Vec<f64>,
    pub rate_5xx: Vec<f64>,
    pub p99_ms: Vec<Option<f64>>,
}

#[derive(Debug, Serialize)]
pub struct RouteSeries {
    pub route: String,
    /// Requests in the window.
    pub requests: u64,
    #[serde(flatten)]
    pub series: Series,
}

impl Series {
    fn push(&mut self, p: Option<&Point>) {
        let p = p.copied().unwrap_or(IDLE);
        self.requests_per_second.push(p.requests_per_second);
        self.rate_4xx.push(p.rate_4xx);
        self.rate_5xx.push(p.rate_5xx);
        self.p99_ms.push(p.p99_ms);
    }
}

const IDLE: Point = Point {
    requests: 0,
    requests_per_second: 0.0,
    rate_4xx: 0.0,
    rate_5xx: 0.0,
    p99_ms: None,
};

impl Traffic {
    pub fn new(every: Duration) -> Traffic {
        Traffic {
            samples: VecDeque::with_capacity(SAMPLES),
            last: HashMap::new(),
            bounds: Vec::new(),
            routes: (String::new(), HashSet::new()),
            every,
            started: false,
            upstreams: super::latency::UpstreamWindow::new(SAMPLES),
        }
    }

    /// The upstreams' latency over the window (see [`super::latency`]).
    pub fn upstreams(&self) -> &super::latency::UpstreamWindow {
        &self.upstreams
    }

    /// Seconds the ring spans when full.
    pub fn window_seconds(&self) -> f64 {
        SAMPLES as f64 * self.secs()
    }

    /// Samples held now (at most [`SAMPLES`]).
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Points held now, all samples and routes together: what the memory bound is about.
    pub fn points(&self) -> usize {
        self.samples.iter().map(|s| s.routes.len()).sum()
    }

    /// Reads the counters and, from the second call on, appends what changed since the last
    /// call as a sample at `at` (Unix seconds) spanning `elapsed`.
    pub fn sample(&mut self, metrics: &Metrics, snap: &Snapshot, at: u64, elapsed: Duration) {
        if self.routes.0 != snap.version.id {
            let mut names: HashSet<Arc<str>> = snap
                .routes
                .iter()
                .map(|r| Arc::from(r.name.as_str()))
                .collect();
            names.insert(Arc::from(NO_ROUTE));
            self.routes = (snap.version.id.clone(), names);
        }
        let (_, upstreams) = super::latency::UpstreamWindow::read(metrics);
        self.upstreams.sample(upstreams, at);
        let now = self.read(metrics);
        let secs = elapsed.as_secs_f64().max(0.001);
        let mut routes = Vec::new();
        let mut total = Counts::default();
        let mut total_before = Counts::default();
        for (name, c) in &now {
            let before = self.last.get(name).cloned().unwrap_or_default();
            add(&mut total, c);
            add(&mut total_before, &before);
            if c.requests > before.requests
                && let Some(p) = self.point(c, &before, secs)
            {
                routes.push((Arc::clone(name), p));
            }
        }
        self.last = now;
        if !std::mem::replace(&mut self.started, true) {
            // Counters from before the first read are not an interval's.
            return;
        }
        let total = self.point(&total, &total_before, secs).unwrap_or(IDLE);
        if self.samples.len() >= SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at, total, routes });
    }

    /// Every followed route's counters now.
    fn read(&mut self, metrics: &Metrics) -> HashMap<Arc<str>, Counts> {
        let names = &self.routes.1;
        let mut out: HashMap<Arc<str>, Counts> = HashMap::new();
        for family in metrics.requests.collect() {
            for m in family.get_metric() {
                let (mut route, mut status) = (None, None);
                for l in m.get_label() {
                    match l.name() {
                        "route" => route = names.get(l.value()),
                        "status" => status = l.value().parse::<u16>().ok(),
                        _ => {}
                    }
                }
                let Some(route) = route else { continue };
                let n = m.get_counter().get_value() as u64;
                let c = out.entry(Arc::clone(route)).or_default();
                c.requests += n;
                match status {
                    Some(400..=499) => c.r4xx += n,
                    Some(500..=599) => c.r5xx += n,
                    _ => {}
                }
            }
        }
        for family in metrics.request_duration.collect() {
            for m in family.get_metric() {
                let Some(route) = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "route")
                    .and_then(|l| names.get(l.value()))
                else {
                    continue;
                };
                let h = m.get_histogram();
                if self.bounds.is_empty() {
                    self.bounds = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
                }
                let mut buckets: Vec<u64> = h
                    .get_bucket()
                    .iter()
                    .map(|b| b.cumulative_count())
                    .collect();
                buckets.push(h.get_sample_count());
                out.entry(Arc::clone(route)).or_default().buckets = buckets;
            }
        }
        out
    }

    fn point(&self, now: &Counts, before: &Counts, secs: f64) -> Option<Point> {
        let requests = now.requests.checked_sub(before.requests)?;
        let delta = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let buckets: Vec<u64> = now
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(before.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        Some(Point {
            requests,
            requests_per_second: requests as f64 / secs,
            rate_4xx: delta(now.r4xx, before.r4xx),
            rate_5xx: delta(now.r5xx, before.r5xx),
            p99_ms: quantile(0.99, &self.bounds, &buckets).map(|s| s * 1000.0),
        })
    }

    /// The samples as columns: all routes, and the `limit` busiest routes (`route`: only that
    /// one, if it has traffic).
    pub fn view(&self, limit: usize, route: Option<&str>) -> TrafficView {
        let mut requests: HashMap<&str, u64> = HashMap::new();
        for s in &self.samples {
            for (name, p) in &s.routes {
                *requests.entry(name).or_default() += p.requests;
            }
        }
        let routes_with_traffic = requests.len();
        let mut busiest: Vec<(&str, u64)> = requests
            .into_iter()
            .filter(|(name, _)| route.is_none_or(|r| r == *name))
            .collect();
        busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        busiest.truncate(limit);
        let mut total = Series::default();
        let mut routes: Vec<RouteSeries> = busiest
            .iter()
            .map(|(name, n)| RouteSeries {
                route: (*name).to_owned(),
                requests: *n,
                series: Series::default(),
            })
            .collect();
        let index: HashMap<&str, usize> = busiest
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (*name, i))
            .collect();
        let mut row: Vec<Option<Point>> = vec![None; routes.len()];
        for s in &self.samples {
            total.push(Some(&s.total));
            row.iter_mut().for_each(|p| *p = None);
            for (name, p) in &s.routes {
                if let Some(&i) = index.get(&**name) {
                    row[i] = Some(*p);
                }
            }
            for (r, p) in routes.iter_mut().zip(&row) {
                r.series.push(p.as_ref());
            }
        }
        TrafficView {
            interval_seconds: self.secs(),
            capacity: SAMPLES,
            times: self.samples.iter().map(|s| s.at).collect(),
            total,
            routes,
            routes_with_traffic,
        }
    }

    fn secs(&self) -> f64 {
        self.every.as_secs_f64()
    }
}

fn add(total: &mut Counts, c: &Counts) {
    total.requests += c.requests;
    total.r4xx += c.r4xx;
    total.r5xx += c.r5xx;
    if total.buckets.len() < c.buckets.len() {
        total.buckets.resize(c.buckets.len(), 0);
    }
    for (t, n) in total.buckets.iter_mut().zip(&c.buckets) {
        *t += n;
    }
}

/// The `q` quantile of a histogram: `bounds` are the finite bucket upper bounds, `counts` the
/// cumulative counts of those buckets followed by the total. Linear within the bucket, as
/// Prometheus' `histogram_quantile`; past the last finite bound, that bound. `None` when empty.
pub fn quantile(q: f64, bounds: &[f64], counts: &[u64]) -> Option<f64> {
    let total = *counts.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (i, &upper) in bounds.iter().enumerate() {
        let c = counts.get(i).copied().unwrap_or(total);
        if c as f64 >= rank {
            let inside = c.saturating_sub(below);
            if inside == 0 {
                return Some(upper);
            }
            let frac = (rank - below as f64) / inside as f64;
            return Some(lower + (upper - lower) * frac.clamp(0.0, 1.0));
        }
        below = c;
        lower = upper;
    }
    bounds.last().copied()
}

/// Samples `traffic` every `every` for as long as both it and the store exist.
pub async fn run(
    traffic: std::sync::Weak<std::sync::Mutex<Traffic>>,
    store: std::sync::Weak<crate::snapshot::SnapshotStore>,
    metrics: Arc<Metrics>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = std::time::Instant::now();
    loop {
        tick.tick().await;
        let (Some(traffic), Some(store)) = (traffic.upgrade(), store.upgrade()) else {
            return;
        };
        let snap = store.load();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let elapsed = last.elapsed();
        last = std::time::Instant::now();
        traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(&metrics, &snap, at, elapsed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let bounds = [0.1, 0.2, 0.4];
        // 10 in (0, 0.1], 10 in (0.1, 0.2], none above.
        assert_eq!(quantile(0.5, &bounds, &[10, 20, 20, 20]), Some(0.1));
        let p99 = quantile(0.99, &bounds, &[10, 20, 20, 20]).unwrap();
        assert!((p99 - 0.198).abs() < 1e-9, "{p99}");
        // Everything past the last finite bound: that bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0, 5]), Some(0.4));
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0, 0]), None);
        assert_eq!(quantile(0.99, &bounds, &[]), None);
    }

    /// A snapshot of `routes`, each answering 200 itself.
    pub(crate) fn snapshot(routes: &[&str]) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for r in routes {
            text += &format!(
                "[[route]]\nname = \"{r}\"\npath = \"/{r}\"\nrespond = {{ status = 200 }}\n"
            );
        }
        std::fs::create_dir_all(dir.path().join("routes")).unwrap();
        std::fs::write(dir.path().join("routes/r.toml"), text).unwrap();
        crate::compile::compile_dir(dir.path(), &Default::default())
            .unwrap()
            .snapshot
            .unwrap()
    }

    /// 200 samples of growing traffic: the ring keeps 180, one point per busy route each, and
    /// traffic a hundred times larger takes no more room. Routes not in the served snapshot are
    /// not followed.
    #[test]
    fn memory_is_bounded_by_routes_times_samples_whatever_the_traffic() {
        let metrics = Metrics::new();
        let snap = snapshot(&["busy", "idle"]);
        let mut t = Traffic::new(SAMPLE_EVERY);
        let every = SAMPLE_EVERY;
        let mut at = 1_000_000;
        let w = crate::telemetry::counts::Writer::new();
        let mut tick = |t: &mut Traffic, per_interval: u64| {
            let requests = |labels: &[&str], n| metrics.requests.cell(&w, labels).inc_by(n);
            requests(&["busy", "GET", "200"], per_interval * 99 / 100);
            requests(&["busy", "GET", "503"], per_interval / 100);
            requests(&["gone", "GET", "200"], per_interval);
            let h = metrics.request_duration.cell(&w, &["busy"]);
            for _ in 0..per_interval / 100 {
                h.observe(0.003);
            }
            at += 5;
            t.sample(&metrics, &snap, at, every);
        };
        tick(&mut t, 0);
        assert!(t.is_empty(), "the first read is the baseline, not a sample");
        for _ in 0..200 {
            tick(&mut t, 1000);
        }
        assert_eq!(t.len(), SAMPLES);
        assert_eq!(t.points(), SAMPLES, "one point per sample, for `busy` only");
        let v = t.view(10, None);
        assert_eq!(v.times.len(), SAMPLES);
        assert_eq!(v.routes.len(), 1);
        assert_eq!(v.routes[0].route, "busy");
        let last = v.routes[0]
            .series
            .requests_per_second
            .last()
            .copied()
            .unwrap();
        assert!((last - 200.0).abs() < 1e-9, "{last}");
        assert!((v.routes[0].series.rate_5xx[0] - 2.0).abs() < 1e-9);
        let p99 = v.routes[0].series.p99_ms[0].unwrap();
        assert!(p99 > 2.5 && p99 <= 5.0, "{p99}");
        assert_eq!(v.total.requests_per_second.last().copied(), Some(200.0));

        for _ in 0..SAMPLES {
            tick(&mut t, 100_000);
        }
        assert_eq!(t.len(), SAMPLES);
        assert_eq!(t.points(), SAMPLES);
        let last = t.view(10, None).routes[0].series.requests_per_second[SAMPLES - 1];
        assert!((last - 20_000.0).abs() < 1e-6, "{last}");
        assert!(t.view(10, Some("idle")).routes.is_empty());
    }
}
