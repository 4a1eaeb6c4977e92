//! Metric families that each worker counts in cells of its own, summed when they are read.
//!
//! A series of a `prometheus` vector is shared by every worker, so each count is a locked
//! read-modify-write, and a histogram observation is four of them on three cache lines. The
//! request path instead writes cells that one [`Writer`] alone writes: a plain load and store,
//! no locked instruction, and one cache line for a fast request's timing. A scrape adds up every
//! writer's cell of each label set, so `/metrics` shows the same series, as up to date as
//! before.
//!
//! A writer asks for its cell of a label set once (the [`Recorder`] keeps it); the cells stay
//! in the family after that, so a count carries on across snapshots and never goes back. The
//! cells grow with the label sets seen per writer (a worker on one listener), where a
//! `prometheus` vector grows with the label sets seen: a route's latency histogram is 160
//! bytes per writer that served it, its shared `prometheus` one a few hundred bytes in all.
//!
//! [`Recorder`]: super::recorder::Recorder

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::metrics::LATENCY_BUCKETS;

/// The one writer of a set of cells. Not `Sync`: a writer, and so each of its cells, is
/// written from one thread at a time. Each [`Recorder`](super::recorder::Recorder) has its own.
#[derive(Debug)]
pub struct Writer {
    id: usize,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl Writer {
    pub fn new() -> Writer {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Writer {
            id: NEXT.fetch_add(1, Relaxed),
            _not_sync: PhantomData,
        }
    }
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds `n` to a cell that only its writer changes: readers see the old or the new value.
#[inline]
fn add(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

/// What a family's cells are: how one is written, and how a series is read from them.
pub trait Cell: Default + Send + Sync + 'static {
    const KIND: MetricType;

    /// One series from every writer's cell of its label set.
    fn read<'a>(cells: impl Iterator<Item = &'a Self>, into: &mut proto::Metric);
}

/// A counter's cell.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    /// Adds one. Only the cell's writer calls this.
    #[inline]
    pub fn inc(&self) {
        add(&self.0, 1);
    }

    /// Adds `n`. Only the cell's writer calls this.
    pub fn inc_by(&self, n: u64) {
        add(&self.0, n);
    }
}

impl Cell for Count {
    const KIND: MetricType = MetricType::COUNTER;

    fn read<'a>(cells: impl Iterator<Item = &'a Self>, into: &mut proto::Metric) {
        let total = cells.fold(0u64, |t, c| t.wrapping_add(c.0.load(Relaxed)));
        let mut counter = proto::Counter::default();
        counter.set_value(total as f64);
        into.set_counter(counter);
    }
}

/// A gauge's cell: what its writer has added and taken away. The series is the sum.
#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    /// Adds `n` (or takes it away). Only the cell's writer calls this.
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

impl Cell for Level {
    const KIND: MetricType = MetricType::GAUGE;

    fn read<'a>(cells: impl Iterator<Item = &'a Self>, into: &mut proto::Metric) {
        let total = cells.fold(0i64, |t, c| t.wrapping_add(c.0.load(Relaxed)));
        let mut gauge = proto::Gauge::default();
        gauge.set_value(total as f64);
        into.set_gauge(gauge);
    }
}

const BUCKETS: usize = LATENCY_BUCKETS.len();

/// A latency histogram's cell, in seconds, on [`LATENCY_BUCKETS`]. The sum comes first, next
/// to the first bucket (up to 0.5 ms), so that a fast request's observation writes one cache
/// line. Not aligned to a line: a cell per writer per label set is 160 bytes with its `Arc`
/// in mimalloc, 256 aligned, and the sum and first bucket share a line either way (blocks of
/// that size start 0 or 32 bytes into one).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Timing {
    /// The `f64` sum's bits.
    sum: AtomicU64,
    /// Observations per bucket, not cumulative; the last is those above every bound.
    buckets: [AtomicU64; BUCKETS + 1],
}

impl Timing {
    /// Records one observation. Only the cell's writer calls this.
    #[inline]
    pub fn observe(&self, seconds: f64) {
        // As `prometheus`: a value on a bound is in that bound's bucket.
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS);
        add(&self.buckets[i], 1);
        let sum = f64::from_bits(self.sum.load(Relaxed)) + seconds;
        self.sum.store(sum.to_bits(), Relaxed);
    }
}

impl Cell for Timing {
    const KIND: MetricType = MetricType::HISTOGRAM;

    fn read<'a>(cells: impl Iterator<Item = &'a Self>, into: &mut proto::Metric) {
        let mut counts = [0u64; BUCKETS + 1];
        let mut sum = 0.0;
        for c in cells {
            for (n, b) in counts.iter_mut().zip(&c.buckets) {
                *n = n.wrapping_add(b.load(Relaxed));
            }
            sum += f64::from_bits(c.sum.load(Relaxed));
        }
        // Cumulative from the same reads, so `+Inf` (the sample count) is never below the
        // last bound's bucket.
        let mut seen = 0u64;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(counts)
            .map(|(bound, n)| {
                seen = seen.wrapping_add(n);
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(seen);
                b
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(seen.wrapping_add(counts[BUCKETS]));
        h.set_sample_sum(sum);
        into.set_histogram(h);
    }
}

/// Label values → each writer's cell (by writer id).
type Series<C> = HashMap<Box<[Box<str>]>, Vec<(usize, Arc<C>)>>;

/// One metric family: its series by label values, each counted in one cell per writer.
/// Registered in a `prometheus::Registry` like a vector; clones share the series.
pub struct Family<C> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    desc: Desc,
    /// Read-locked by scrapes and by a writer finding a cell it has; write-locked only to add
    /// one, so a scrape holds up no request whose cell exists.
    series: RwLock<Series<C>>,
}

impl<C> Clone for Family<C> {
    fn clone(&self) -> Self {
        Family {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: Cell> Family<C> {
    pub fn new(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Family<C>> {
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        let desc = Desc::new(name.to_owned(), help.to_owned(), labels, HashMap::new())?;
        Ok(Family {
            inner: Arc::new(Inner {
                desc,
                series: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// `writer`'s cell of the series `values` (in the order the family's labels were given),
    /// made the first time. A lock and a hash of the values: keep the cell, as the recorder
    /// does, rather than calling this per request.
    pub fn cell(&self, writer: &Writer, values: &[&str]) -> Arc<C> {
        debug_assert_eq!(values.len(), self.inner.desc.variable_labels.len());
        let key: Box<[Box<str>]> = values.iter().map(|v| Box::from(*v)).collect();
        let mine = |cells: &[(usize, Arc<C>)]| {
            cells
                .iter()
                .find(|(id, _)| *id == writer.id)
                .map(|(_, c)| Arc::clone(c))
        };
        let found = self
            .inner
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .and_then(|cells| mine(cells));
        if let Some(cell) = found {
            return cell;
        }
        let mut series = self
            .inner
            .series
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let cells = series.entry(key).or_default();
        // Only this writer adds its cells, but it costs nothing to look again.
        if let Some(cell) = mine(cells) {
            return cell;
        }
        let cell = Arc::new(C::default());
        cells.push((writer.id, Arc::clone(&cell)));
        cell
    }

    /// Drops the series whose `(label, value)` pairs `gone` says are no longer wanted (a route
    /// or upstream a reload removed), with their cells: a writer still holding one counts into
    /// nothing that is read, and a writer asking again starts a new series at 0.
    pub fn remove_where(&self, gone: impl Fn(&[(&str, &str)]) -> bool) {
        let names = &self.inner.desc.variable_labels;
        self.inner
            .series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|values, _| {
                let pairs: Vec<(&str, &str)> = names
                    .iter()
                    .map(String::as_str)
                    .zip(values.iter().map(|v| &**v))
                    .collect();
                !gone(&pairs)
            });
    }

    /// Label pairs in the order `prometheus` writes them: sorted by name.
    fn labels(&self, values: &[Box<str>]) -> Vec<LabelPair> {
        let mut pairs: Vec<LabelPair> = self
            .inner
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut p = LabelPair::default();
                p.set_name(name.clone());
                p.set_value(value.to_string());
                p
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        pairs
    }
}

impl<C: Cell> Collector for Family<C> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self
            .inner
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let metrics = series
            .iter()
            .map(|(values, by_writer)| {
                let mut m = proto::Metric::from_label(self.labels(values));
                C::read(by_writer.iter().map(|(_, c)| &**c), &mut m);
                m
            })
            .collect();
        drop(series);
        let mut family = MetricFamily::default();
        family.set_name(self.inner.desc.fq_name.clone());
        family.set_help(self.inner.desc.help.clone());
        family.set_field_type(C::KIND);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, TextEncoder};

    fn text(c: impl Collector + 'static) -> String {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(c)).unwrap();
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    /// The same observations through `prometheus`' own vectors and through three writers'
    /// cells read out the same text, byte for byte: labels in the same order, the same
    /// cumulative buckets, values on a bound in that bound's bucket, and values past every
    /// bound only in `+Inf`.
    #[test]
    fn three_writers_read_out_as_prometheus_vectors_would() {
        let labels = ["route", "method", "status"];
        let theirs = IntCounterVec::new(Opts::new("t_total", "help"), &labels).unwrap();
        let ours = Family::<Count>::new("t_total", "help", &labels).unwrap();
        let their_h = HistogramVec::new(
            HistogramOpts::new("t_seconds", "help").buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap();
        let our_h = Family::<Timing>::new("t_seconds", "help", &["route"]).unwrap();
        let writers = [Writer::new(), Writer::new(), Writer::new()];
        let seconds = [
            0.0, 0.0004, 0.0005, 0.0007, 0.001, 0.3, 2.5, 29.0, 30.0, 31.0, 1e9,
        ];
        for (i, s) in seconds.iter().enumerate() {
            let w = &writers[i % 3];
            let route = if i % 2 == 0 { "api" } else { "web" };
            let status = if i % 4 == 0 { "200" } else { "503" };
            theirs.with_label_values(&[route, "GET", status]).inc();
            ours.cell(w, &[route, "GET", status]).inc();
            their_h.with_label_values(&[route]).observe(*s);
            our_h.cell(w, &[route]).observe(*s);
        }
        theirs.with_label_values(&["api", "PUT", "200"]).inc_by(7);
        ours.cell(&writers[1], &["api", "PUT", "200"]).inc_by(7);
        assert_eq!(text(ours), text(theirs));
        // The sums are added in another order (by writer), so they may differ in the last
        // bits: compared apart, within rounding.
        let split = |text: String| {
            let (sums, rest): (Vec<_>, Vec<_>) = text
                .lines()
                .map(str::to_owned)
                .partition(|l| l.contains("_sum{"));
            let sums: Vec<f64> = sums
                .iter()
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
                .collect();
            (sums, rest.join("\n"))
        };
        let ours = text(our_h);
        let (our_sums, our_rest) = split(ours.clone());
        let (their_sums, their_rest) = split(text(their_h));
        assert_eq!(our_rest, their_rest);
        assert_eq!(our_sums.len(), 2);
        for (a, b) in our_sums.iter().zip(&their_sums) {
            assert!((a - b).abs() <= b.abs() * 1e-12, "{a} {b}");
        }
        assert!(
            ours.contains("t_seconds_bucket{route=\"api\",le=\"+Inf\"} 6"),
            "{ours}"
        );
    }

    /// A gauge without labels reads as `prometheus`' own: the writers' levels summed, and a
    /// series from the first cell on, at 0.
    #[test]
    fn a_gauge_is_the_sum_of_its_writers_levels() {
        let theirs = prometheus::IntGauge::new("g", "help").unwrap();
        let ours = Family::<Level>::new("g", "help", &[]).unwrap();
        let (a, b) = (Writer::new(), Writer::new());
        let (la, lb) = (ours.cell(&a, &[]), ours.cell(&b, &[]));
        assert_eq!(text(ours.clone()), text(theirs.clone()));
        la.add(3);
        lb.add(1);
        la.add(-2);
        theirs.add(2);
        assert_eq!(text(ours), text(theirs));
    }

    /// A writer gets back the cell it has, and another writer a cell of its own; both count
    /// in the one series.
    #[test]
    fn each_writer_has_one_cell_per_series() {
        let family = Family::<Count>::new("c_total", "help", &["route"]).unwrap();
        let (a, b) = (Writer::new(), Writer::new());
        let first = family.cell(&a, &["x"]);
        assert!(Arc::ptr_eq(&first, &family.cell(&a, &["x"])));
        assert!(!Arc::ptr_eq(&first, &family.cell(&b, &["x"])));
        first.inc();
        family.cell(&b, &["x"]).inc_by(2);
        family.cell(&a, &["y"]).inc();
        let out = text(family);
        assert!(out.contains("c_total{route=\"x\"} 3\n"), "{out}");
        assert!(out.contains("c_total{route=\"y\"} 1\n"), "{out}");
    }

    /// A scrape in progress (its read lock held) holds up no writer whose cell exists: a
    /// request after a snapshot swap finds its cells again without waiting for it.
    #[test]
    fn a_scrape_in_progress_holds_up_no_writer_with_its_cell() {
        let family = Family::<Count>::new("c_total", "help", &["route"]).unwrap();
        let w = Writer::new();
        family.cell(&w, &["x"]);
        let scrape = family.inner.series.read().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = family.clone();
        std::thread::spawn(move || {
            other.cell(&w, &["x"]).inc();
            let _ = tx.send(());
        });
        let found = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(scrape);
        assert!(found.is_ok(), "the writer waited for the scrape");
        let out = text(family);
        assert!(out.contains("c_total{route=\"x\"} 1\n"), "{out}");
    }

    /// Writers on their own threads while a reader scrapes: every scrape is a valid
    /// histogram (cumulative buckets never fall, `+Inf` is the count), counts never go back,
    /// and the last read has every observation.
    #[test]
    fn scrapes_while_writers_count_see_growing_consistent_series() {
        let family = Family::<Timing>::new("r_seconds", "help", &["route"]).unwrap();
        let per_writer = 20_000u64;
        let reader = family.clone();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|n| {
                let family = family.clone();
                std::thread::spawn(move || {
                    let w = Writer::new();
                    let cell = family.cell(&w, &["r"]);
                    for i in 0..per_writer {
                        cell.observe(if (i + n) % 2 == 0 { 0.0001 } else { 0.2 });
                    }
                })
            })
            .collect();
        let scraper = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut last = 0;
                let mut scrapes = 0;
                while !done.load(Relaxed) || scrapes == 0 {
                    for m in reader.collect()[0].get_metric() {
                        let h = m.get_histogram();
                        let cumulative: Vec<u64> = h
                            .get_bucket()
                            .iter()
                            .map(|b| b.cumulative_count())
                            .collect();
                        assert!(cumulative.windows(2).all(|w| w[0] <= w[1]));
                        assert!(*cumulative.last().unwrap() <= h.get_sample_count());
                        assert!(h.get_sample_count() >= last, "a count went back");
                        last = h.get_sample_count();
                    }
                    scrapes += 1;
                }
                scrapes
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Relaxed);
        assert!(scraper.join().unwrap() > 0);
        let h = family.collect()[0].get_metric()[0].get_histogram().clone();
        assert_eq!(h.get_sample_count(), 3 * per_writer);
        let fast = h.get_bucket()[0].cumulative_count();
        assert_eq!(fast, 3 * per_writer / 2, "0.1 ms observations");
        let expected = 30_000.0 * 0.0001 + 30_000.0 * 0.2;
        assert!((h.get_sample_sum() - expected).abs() < 1e-6);
    }
}
