//! What host calls cost a call into a plugin. Wasmer's metering counts the plugin's own
//! instructions; the work a host function does for it (copying a body, serialising a header
//! map, filling random bytes, writing a log line) it does not see, so a plugin looping on a host
//! call would get megabytes moved per iteration for a handful of instructions. Each host call
//! is therefore charged against the same budget by the bytes it moves, and a call that keeps the
//! host busy is also bounded in wall-clock time.
//!
//! This module owns the charge and the clock; the host functions (`host.rs`) call
//! [`Meter::charge`] before doing the work they are charged for.

use std::time::{Duration, Instant};

use wasmer::{AsStoreMut, Global, RuntimeError, Value};

/// Bytes a host call moves (reads from or writes into the plugin's memory, serialises or scans)
/// per instruction point it is charged, rounded up. Copying in WebAssembly costs about one
/// point per one or two bytes; the host copies several times faster.
pub const BYTES_PER_POINT: u64 = 4;

/// Points of host work (plus one per host call) between two readings of the clock: a call that
/// moves little never reads it.
const CLOCK_EVERY: u64 = 16 * 1024;

/// The least wall-clock time one call may keep the host busy, counted from the first reading
/// of the clock (after [`CLOCK_EVERY`] points of host work).
const MIN_CALL_TIME: Duration = Duration::from_millis(100);

/// Nanoseconds of wall-clock time allowed per point of `max_instructions`, above
/// [`MIN_CALL_TIME`]: several times what a point costs on a loaded machine, so only a call
/// that the charge does not describe (a host call slower than its bytes say) reaches it.
const NANOS_PER_POINT: u64 = 20;

/// The wall-clock bound of one call into a plugin with this instruction budget.
pub fn call_time(max_instructions: u64) -> Duration {
    MIN_CALL_TIME.max(Duration::from_nanos(
        max_instructions.saturating_mul(NANOS_PER_POINT),
    ))
}

/// Why the host stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A host call's charge was more than what was left of the instruction budget.
    Instructions,
    /// The call ran past [`call_time`].
    Time,
}

/// The charge of the current call into one instance.
pub(crate) struct Meter {
    /// The metering middleware's `remaining_points` and `points_exhausted` globals.
    globals: Option<(Global, Global)>,
    max_time: Duration,
    /// Points (and host calls) since the clock was last read.
    since_clock: u64,
    /// The call's first reading of the clock, once it has done enough host work to take one.
    started: Option<Instant>,
    stopped: Option<Stop>,
}

impl Meter {
    pub fn new(max_time: Duration) -> Meter {
        Meter {
            globals: None,
            max_time,
            since_clock: 0,
            started: None,
            stopped: None,
        }
    }

    /// The metering globals of the instance, once it exists.
    pub fn attach(&mut self, remaining: Global, exhausted: Global) {
        self.globals = Some((remaining, exhausted));
    }

    /// A new call begins: nothing charged, no clock read, nothing stopped.
    pub fn begin(&mut self) {
        self.since_clock = 0;
        self.started = None;
        self.stopped = None;
    }

    /// Why the host stopped the current call, if it did.
    pub fn stopped(&self) -> Option<Stop> {
        self.stopped
    }

    /// Charges `bytes` of host work to the current call, before the work is done: `Err` (a trap
    /// that fails the call) when the budget does not cover it, with the metering's exhausted
    /// flag set so that the call fails as one that ran out of instructions, or when the call
    /// has run past its time.
    pub fn charge(&mut self, store: &mut impl AsStoreMut, bytes: u64) -> Result<(), RuntimeError> {
        let points = bytes.div_ceil(BYTES_PER_POINT);
        if points > 0
            && let Some((remaining, exhausted)) = &self.globals
        {
            // The budget is set from a u64 capped at i64::MAX and only ever goes down.
            let left = match remaining.get(store) {
                Value::I64(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            };
            if left < points {
                // What the metering itself does when the plugin's code runs out.
                remaining.set(store, Value::I64(0))?;
                exhausted.set(store, Value::I32(1))?;
                self.stopped = Some(Stop::Instructions);
                return Err(RuntimeError::new(format!(
                    "a host call moving {bytes} bytes ({points} points) ran over the instruction budget"
                )));
            }
            remaining.set(store, Value::I64((left - points) as i64))?;
        }
        if self.over_time(points, Instant::now) {
            self.stopped = Some(Stop::Time);
            return Err(RuntimeError::new(format!(
                "the call kept the host busy for more than {:?}",
                self.max_time
            )));
        }
        Ok(())
    }

    /// Counts `points` of host work; every [`CLOCK_EVERY`] reads the clock (`now`) and tells
    /// whether the call has run past its time since the first reading.
    fn over_time(&mut self, points: u64, now: impl FnOnce() -> Instant) -> bool {
        self.since_clock = self.since_clock.saturating_add(points.saturating_add(1));
        if self.since_clock < CLOCK_EVERY {
            return false;
        }
        self.since_clock = 0;
        let now = now();
        let started = *self.started.get_or_insert(now);
        now.saturating_duration_since(started) > self.max_time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_read_only_after_enough_host_work_and_bounds_the_call() {
        let mut m = Meter::new(Duration::from_millis(100));
        let t0 = Instant::now();
        // Small calls: no reading at all.
        for _ in 0..100 {
            assert!(!m.over_time(10, || panic!("the clock was read for small calls")));
        }
        // A large one reads it and starts the count.
        assert!(!m.over_time(CLOCK_EVERY, || t0));
        assert!(!m.over_time(CLOCK_EVERY, || t0 + Duration::from_millis(100)));
        assert!(m.over_time(CLOCK_EVERY, || t0 + Duration::from_millis(101)));
        // The next call starts afresh.
        m.begin();
        assert!(!m.over_time(CLOCK_EVERY, || t0 + Duration::from_secs(10)));
        assert!(m.stopped().is_none());
    }

    #[test]
    fn the_time_bound_grows_with_the_instruction_budget() {
        assert_eq!(call_time(1_000), MIN_CALL_TIME);
        assert_eq!(call_time(10_000_000), Duration::from_millis(200));
        assert_eq!(call_time(u64::MAX), Duration::from_nanos(u64::MAX));
    }
}
