//! The Upstreams view's latency over the traffic ring's window (15 minutes), not since the
//! start: at each sample of the ring ([`super::traffic`]) the bucket counts each upstream's
//! `rustygate_upstream_request_duration_seconds` histogram gained since the last sample are kept,
//! and p50/p99 are taken from their sum plus what the histogram gained since the last sample.
//! A sample that falls out of the ring takes its requests out of the window.
//!
//! Memory is bounded by upstreams × samples × buckets whatever the traffic: a sample holds only
//! the upstreams that answered requests in its interval. Off the request path, like the ring.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use prometheus::core::Collector;

use super::metrics::Metrics;
use super::traffic::quantile;

/// Each upstream's histogram: cumulative bucket counts, then the sample count.
pub type Counts = HashMap<Arc<str>, Vec<u64>>;

/// One sample: its Unix seconds, and the counts each upstream with requests in its interval
/// gained (upstreams without requests take nothing).
struct Sample {
    at: u64,
    gained: Vec<(Arc<str>, Vec<u64>)>,
}

/// Requests and quantiles of one upstream over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub requests: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// What each upstream's latency histogram gained, sample by sample.
pub struct UpstreamWindow {
    /// Oldest first.
    samples: VecDeque<Sample>,
    /// Every upstream's counts at the last sample.
    last: Counts,
    capacity: usize,
    /// Unix seconds where the window begins once a sample fell out; before that, it holds
    /// everything since the counters started.
    from: Option<u64>,
}

impl UpstreamWindow {
    /// A window of `capacity` samples.
    pub fn new(capacity: usize) -> UpstreamWindow {
        UpstreamWindow {
            samples: VecDeque::with_capacity(capacity),
            last: HashMap::new(),
            capacity: capacity.max(1),
            from: None,
        }
    }

    /// Every upstream's histogram now, and the bucket upper bounds in seconds (the same for
    /// every upstream, and for the life of the process).
    pub fn read(metrics: &Metrics) -> (Vec<f64>, Counts) {
        let mut bounds = Vec::new();
        let mut out = HashMap::new();
        for family in metrics.upstream_duration.collect() {
            for m in family.get_metric() {
                let Some(name) = m.get_label().iter().find(|l| l.name() == "upstream") else {
                    continue;
                };
                let h = m.get_histogram();
                if bounds.is_empty() {
                    bounds = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
                }
                let mut counts: Vec<u64> = h
                    .get_bucket()
                    .iter()
                    .map(|b| b.cumulative_count())
                    .collect();
                counts.push(h.get_sample_count());
                out.insert(Arc::from(name.value()), counts);
            }
        }
        (bounds, out)
    }

    /// Appends what each upstream gained since the last sample, as the sample at `at` (Unix
    /// seconds); past the capacity, the oldest sample leaves the window.
    pub fn sample(&mut self, now: Counts, at: u64) {
        let mut gained = Vec::new();
        for (name, counts) in &now {
            let d = diff(counts, self.last.get(name).map(Vec::as_slice));
            if d.last().is_some_and(|&n| n > 0) {
                gained.push((Arc::clone(name), d));
            }
        }
        if self.samples.len() >= self.capacity
            && let Some(gone) = self.samples.pop_front()
        {
            self.from = Some(gone.at);
        }
        self.samples.push_back(Sample { at, gained });
        self.last = now;
    }

    /// Each upstream's requests, p50 and p99 (milliseconds) over the window: the samples held
    /// plus what `live` (the histograms now, of buckets `bounds`) gained since the last one.
    pub fn window(&self, bounds: &[f64], live: &Counts) -> HashMap<Arc<str>, Latency> {
        let mut sums: HashMap<&str, Vec<u64>> = HashMap::new();
        for s in &self.samples {
            for (name, d) in &s.gained {
                add(sums.entry(name).or_default(), d);
            }
        }
        for (name, counts) in live {
            let d = diff(counts, self.last.get(name).map(Vec::as_slice));
            add(sums.entry(name).or_default(), &d);
        }
        let ms = |q, counts: &[u64]| quantile(q, bounds, counts).map(|s| s * 1000.0);
        sums.into_iter()
            .map(|(name, counts)| {
                let latency = Latency {
                    requests: counts.last().copied().unwrap_or(0),
                    p50_ms: ms(0.5, &counts),
                    p99_ms: ms(0.99, &counts),
                };
                (Arc::from(name), latency)
            })
            .collect()
    }

    /// Unix seconds where the window begins, once samples have fallen out of it.
    pub fn from(&self) -> Option<u64> {
        self.from
    }

    /// Counts held in the samples, all upstreams together: what the memory bound is about.
    pub fn held(&self) -> usize {
        self.samples
            .iter()
            .flat_map(|s| s.gained.iter().map(|(_, d)| d.len()))
            .sum()
    }
}

/// `now - before`, bucket by bucket (`before` missing: zeros). Counters only grow; a smaller
/// value (a histogram made anew) counts as zero.
fn diff(now: &[u64], before: Option<&[u64]>) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(before.and_then(|b| b.get(i)).copied().unwrap_or(0)))
        .collect()
}

fn add(total: &mut Vec<u64>, d: &[u64]) {
    if total.len() < d.len() {
        total.resize(d.len(), 0);
    }
    for (t, n) in total.iter_mut().zip(d) {
        *t += n;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];

    /// Cumulative counts of `fast` requests of ≤ 10 ms and `slow` ones in (100 ms, 1 s].
    fn hist(fast: u64, slow: u64) -> Vec<u64> {
        vec![fast, fast, fast + slow, fast + slow]
    }

    fn counts(pairs: &[(&str, Vec<u64>)]) -> Counts {
        pairs
            .iter()
            .map(|(n, c)| (Arc::from(*n), c.clone()))
            .collect()
    }

    #[test]
    fn quantiles_come_from_the_difference_and_old_samples_fall_out() {
        let mut w = UpstreamWindow::new(3);
        // Before the first sample: everything since the start is in the window.
        let live = counts(&[("orders", hist(0, 10))]);
        let l = w.window(&BOUNDS, &live)["orders"];
        assert_eq!(l.requests, 10);
        assert!(l.p50_ms.unwrap() > 100.0, "{l:?}");

        // 10 slow requests in the first interval, then 100 fast ones in the next.
        w.sample(counts(&[("orders", hist(0, 10))]), 1_000);
        w.sample(counts(&[("orders", hist(100, 10))]), 1_005);
        let live = counts(&[("orders", hist(100, 10))]);
        let l = w.window(&BOUNDS, &live)["orders"];
        assert_eq!(l.requests, 110);
        assert!(l.p50_ms.unwrap() <= 10.0, "{l:?}");
        assert!(
            l.p99_ms.unwrap() > 100.0,
            "the slow ones are in the window: {l:?}"
        );
        assert_eq!(w.from(), None);

        // Two idle samples: the slow interval falls out of a 3-sample window, the fast stays.
        w.sample(counts(&[("orders", hist(100, 10))]), 1_010);
        w.sample(counts(&[("orders", hist(100, 10))]), 1_015);
        let l = w.window(&BOUNDS, &live)["orders"];
        assert_eq!(l.requests, 100, "{l:?}");
        assert!(l.p99_ms.unwrap() <= 10.0, "{l:?}");
        assert_eq!(
            w.from(),
            Some(1_000),
            "the window starts after the sample that left"
        );

        // Requests since the last sample count at once: 5 slow ones are 5 of 105.
        let live = counts(&[("orders", hist(100, 15))]);
        let l = w.window(&BOUNDS, &live)["orders"];
        assert_eq!(l.requests, 105);
        assert!(l.p99_ms.unwrap() > 100.0, "{l:?}");

        // The sample that takes those 5, and three idle ones: nothing left, no quantiles.
        for at in [1_020, 1_025, 1_030, 1_035] {
            w.sample(live.clone(), at);
        }
        let l = w.window(&BOUNDS, &live)["orders"];
        assert_eq!((l.requests, l.p50_ms, l.p99_ms), (0, None, None));
        assert_eq!(w.held(), 0, "idle intervals hold nothing");
    }

    /// Traffic a thousand times larger takes no more room: one entry per busy upstream per
    /// sample, however many requests it counts.
    #[test]
    fn memory_is_bounded_by_upstreams_times_samples() {
        let mut w = UpstreamWindow::new(180);
        let mut n = 0;
        for i in 0..400u64 {
            n += if i < 200 { 10 } else { 10_000 };
            let now = counts(&[("busy", hist(n, 0)), ("idle", hist(0, 0))]);
            w.sample(now, i * 5);
            if i == 199 {
                assert_eq!(w.held(), 180 * 4);
            }
        }
        assert_eq!(w.held(), 180 * 4, "180 samples of one upstream's 4 counts");
        let live = counts(&[("busy", hist(n, 0))]);
        assert_eq!(w.window(&BOUNDS, &live)["busy"].requests, 180 * 10_000);
    }
}
