//! At most one log line per interval for events that can come in floods (a store that does not
//! answer, a channel anyone with access to the store can publish on), with the count of the
//! lines left out in between. Lock-free: called from every worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Decides whether a line is logged now; see [`LogThrottle::due`].
#[derive(Debug)]
pub struct LogThrottle {
    every_ms: u64,
    started: Instant,
    /// Milliseconds since `started` of the last line logged (`u64::MAX`: none yet).
    logged_at: AtomicU64,
    left_out: AtomicU64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every_ms: every.as_millis() as u64,
            started: Instant::now(),
            logged_at: AtomicU64::new(u64::MAX),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event is to be logged, `n` being how many were left out since the
    /// last line; `None` (and counted) otherwise. The first event is always logged.
    pub fn due(&self) -> Option<u64> {
        self.due_at(self.started.elapsed().as_millis() as u64)
    }

    fn due_at(&self, now: u64) -> Option<u64> {
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= self.every_ms;
        if due
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(t.due_at(5), Some(0), "the first is logged");
        for now in 6..105 {
            assert_eq!(t.due_at(now), None);
        }
        assert_eq!(t.due_at(10_004), None, "not yet an interval");
        // An interval later the next one is logged, with the count, which starts over.
        assert_eq!(t.due_at(10_005), Some(100));
        assert_eq!(t.due_at(10_006), None);
        assert_eq!(t.due_at(30_000), Some(1));
    }
}
