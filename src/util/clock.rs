//! One clock reading per wake-up of a connection.
//!
//! A proxied request used to read the clock eight times (its start, the header deadline, the
//! send time, the pool's expiries, the response head's latency, the request's duration, the
//! idle deadline), at ~34 ns a read on a virtual machine's TSC: ~2% of the worker's time per
//! request. Most of those readings are taken within microseconds of each other, in one poll
//! of the connection's task. While a [`Turns`] future is polled, [`now`] reads the clock once
//! and hands that reading to every later call of the same poll; [`fresh`] reads it again (for
//! a stamp that must not include work done earlier in the poll, such as an upstream request's
//! send time after a policy ran) and holds the new reading. Outside a `Turns` poll both read
//! the clock every time.
//!
//! A held reading is at most one poll old: a deadline computed from it is early by that much,
//! a duration measured from it long by that much; polls take microseconds, deadlines are
//! seconds, and a duration's two ends are each read in their own poll.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

thread_local! {
    /// `Some` while a [`Turns`] future is polled on this thread, holding the poll's first
    /// reading once one is taken.
    static HELD: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// The current poll's reading (taken now if it is the first), or the clock outside one.
pub fn now() -> Instant {
    HELD.with(|held| match held.get() {
        Some(Some(at)) => at,
        Some(None) => {
            let at = Instant::now();
            held.set(Some(Some(at)));
            at
        }
        None => Instant::now(),
    })
}

/// A new reading of the clock, which later [`now`] calls of the same poll then give.
pub fn fresh() -> Instant {
    let at = Instant::now();
    HELD.with(|held| {
        if held.get().is_some() {
            held.set(Some(Some(at)));
        }
    });
    at
}

pin_project_lite::pin_project! {
    /// `F`, each of whose polls shares one clock reading ([the module](self)).
    pub struct Turns<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Turns<F> {
    pub fn new(inner: F) -> Self {
        Turns { inner }
    }
}

impl<F: Future> Future for Turns<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The reading of a poll around this one (none on a task's own poll) comes back when
        // this one ends, panics included.
        struct Restore(Option<Option<Instant>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                HELD.with(|held| held.set(self.0));
            }
        }
        let _restore = Restore(HELD.with(|held| held.replace(Some(None))));
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Polls `f` once, inside a `Turns`.
    fn in_one_poll<T>(f: impl FnOnce() -> T) -> T {
        let mut f = Some(f);
        let fut = Turns::new(std::future::poll_fn(move |_| {
            Poll::Ready((f.take().expect("polled once"))())
        }));
        let waker = std::task::Waker::noop();
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut Context::from_waker(waker)) {
            Poll::Ready(v) => v,
            Poll::Pending => unreachable!("ready at once"),
        }
    }

    #[test]
    fn one_poll_shares_its_first_reading_until_a_fresh_one() {
        let (a, b, c, d) = in_one_poll(|| {
            let a = now();
            std::thread::sleep(Duration::from_millis(5));
            let b = now();
            let c = fresh();
            let d = now();
            (a, b, c, d)
        });
        assert_eq!(a, b, "later reads of a poll give its first reading");
        assert!(c >= a + Duration::from_millis(5), "fresh reads the clock");
        assert_eq!(c, d, "and is held for the rest of the poll");
    }

    #[test]
    fn outside_a_poll_and_in_the_next_poll_the_clock_is_read_again() {
        let first = in_one_poll(now);
        std::thread::sleep(Duration::from_millis(5));
        let outside = now();
        assert!(outside >= first + Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(5));
        let second = in_one_poll(now);
        assert!(second >= outside + Duration::from_millis(5));
        // Nothing is held once the poll has ended, even after a fresh reading inside it.
        in_one_poll(fresh);
        std::thread::sleep(Duration::from_millis(5));
        let after = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() >= after + Duration::from_millis(5));
    }

    #[test]
    fn a_panicking_poll_leaves_nothing_held() {
        let caught = std::panic::catch_unwind(|| {
            in_one_poll(|| {
                now();
                panic!("in the poll");
            })
        });
        assert!(caught.is_err());
        let a = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() >= a + Duration::from_millis(5));
    }
}
