//! The attempts' deadlines: one timer per attempt, lent from those the worker keeps
//! ([`LocalPool::within`]).
//!
//! [`LocalPool::within`]: super::LocalPool::within

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::Sleep;

use super::LocalPool;

/// Timers kept per worker: as many as attempts ran at once, up to this.
const KEPT_TIMERS: usize = 1024;

impl LocalPool {
    /// `fut`'s output, or `None` once `deadline` has passed first: `tokio::time::timeout_at`,
    /// except for two things.
    /// - The timer is polled only when it has fired or another task polls
    ///   ([`crate::util::poll_timer`]; `Timeout` polls it whenever `fut` is pending).
    /// - The timer is one the worker kept from an earlier attempt. A new tokio timer is entered
    ///   into the timer wheel on its first poll and taken out when dropped (about 600
    ///   instructions per attempt).
    /// - A kept timer set for no later than `deadline` (an earlier attempt's, with the same
    ///   timeout) is left as it is: when it fires before `deadline`, it is set to `deadline`
    ///   then. Attempts with one timeout set it about once per timeout, not once each.
    ///
    /// `later`, when given, is asked at the deadline whether the attempt may go on, and until
    /// when (a streamed request body: [`SendOptions::streamed`]).
    ///
    /// [`SendOptions::streamed`]: super::SendOptions::streamed
    pub(super) async fn within<F: Future>(
        &self,
        deadline: tokio::time::Instant,
        later: Option<impl Fn(tokio::time::Instant) -> Option<tokio::time::Instant>>,
        fut: Pin<&mut F>,
    ) -> Option<F::Output> {
        let mut fut = fut;
        let mut deadline = deadline;
        let mut timer = Lent::new(&self.timers, deadline);
        let mut wakes: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            // Taken only when the attempt ends.
            let Some(sleep) = timer.sleep.as_mut() else {
                return Poll::Pending;
            };
            while crate::util::poll_timer(sleep.as_mut(), &mut wakes, cx).is_ready() {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    match later.as_ref().and_then(|l| l(now)) {
                        Some(at) => deadline = at,
                        None => return Poll::Ready(None),
                    }
                }
                // Fired for an earlier deadline: set for this one, and polled again for this
                // task (a timer that has fired holds no wake-up).
                sleep.as_mut().reset(deadline);
                wakes = None;
            }
            Poll::Pending
        })
        .await
    }
}

/// A worker's timer, lent to one attempt and given back when the attempt ends.
struct Lent<'a> {
    kept: &'a RefCell<Vec<Pin<Box<Sleep>>>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<'a> Lent<'a> {
    fn new(kept: &'a RefCell<Vec<Pin<Box<Sleep>>>>, deadline: tokio::time::Instant) -> Self {
        let taken = kept.borrow_mut().pop();
        let sleep = match taken {
            // Firing no later than `deadline`, it need not move (see `within`).
            Some(s) if s.deadline() <= deadline => s,
            Some(mut s) => {
                s.as_mut().reset(deadline);
                s
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Lent {
            kept,
            sleep: Some(sleep),
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(mut sleep) = self.sleep.take() else {
            return;
        };
        // It would wake the attempt's task when its deadline comes: it wakes nobody instead.
        if !sleep.is_elapsed() {
            let _ = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        }
        let mut kept = self.kept.borrow_mut();
        if kept.len() < KEPT_TIMERS {
            kept.push(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    use super::LocalPool;

    /// No streamed body: the first deadline is the last.
    const NO_LATER: Option<fn(tokio::time::Instant) -> Option<tokio::time::Instant>> = None;

    fn after(d: Duration) -> tokio::time::Instant {
        tokio::time::Instant::now() + d
    }

    #[tokio::test]
    async fn within_gives_the_output_of_a_future_that_ends_in_time() {
        let fut = pin!(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7
        });
        let pool = LocalPool::default();
        assert_eq!(
            pool.within(after(Duration::from_secs(5)), NO_LATER, fut)
                .await,
            Some(7)
        );
    }

    /// Pending again and again in the same task: the timer is polled once, and must fire.
    #[tokio::test]
    async fn within_ends_a_future_that_keeps_waking_its_task_but_never_ends() {
        let restless = pin!(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
        let pool = LocalPool::default();
        let bounded = pool.within(after(Duration::from_millis(50)), NO_LATER, restless);
        let out = tokio::time::timeout(Duration::from_secs(10), bounded).await;
        assert_eq!(out.ok(), Some(None::<()>));
    }

    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polled from another task, the timer wakes that one.
    #[tokio::test]
    async fn within_wakes_the_task_that_polled_it_last() {
        let never = pin!(std::future::pending::<()>());
        let pool = LocalPool::default();
        let mut bounded = pin!(pool.within(after(Duration::from_millis(30)), NO_LATER, never));
        let (a, b) = (
            Arc::new(Wakes(AtomicUsize::new(0))),
            Arc::new(Wakes(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(
            bounded
                .as_mut()
                .poll(&mut Context::from_waker(&wa))
                .is_pending()
        );
        assert!(
            bounded
                .as_mut()
                .poll(&mut Context::from_waker(&wb))
                .is_pending()
        );
        for _ in 0..1000 {
            if b.0.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            b.0.load(Ordering::SeqCst),
            1,
            "the last task polling is woken"
        );
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "the task before it is not");
        let ready = bounded.as_mut().poll(&mut Context::from_waker(&wb));
        assert!(matches!(ready, Poll::Ready(None)));
    }

    /// A kept timer left set for an earlier attempt's deadline fires before this attempt's:
    /// the attempt goes on until its own deadline, and ends then.
    #[tokio::test]
    async fn within_outlives_a_kept_timer_set_for_an_earlier_deadline() {
        let pool = LocalPool::default();
        let quick = pin!(async { 1 });
        assert_eq!(
            pool.within(after(Duration::from_millis(20)), NO_LATER, quick)
                .await,
            Some(1)
        );
        let started = std::time::Instant::now();
        let slow = pin!(async {
            tokio::time::sleep(Duration::from_millis(120)).await;
            2
        });
        assert_eq!(
            pool.within(after(Duration::from_millis(400)), NO_LATER, slow)
                .await,
            Some(2),
            "not ended by the kept timer's 20 ms"
        );
        assert!(started.elapsed() >= Duration::from_millis(120));
        let never = pin!(std::future::pending::<()>());
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            pool.within(after(Duration::from_millis(150)), NO_LATER, never),
        )
        .await;
        assert_eq!(out.ok(), Some(None), "ended at its own deadline");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(pool.timers.borrow().len(), 1, "one timer throughout");
    }

    /// Attempts one after another share one timer. Set to an earlier deadline than the one it
    /// had, it fires at the new one; an attempt that ended never hears from it again.
    #[tokio::test]
    async fn within_reuses_one_timer_and_it_keeps_each_deadline() {
        let pool = LocalPool::default();
        for _ in 0..3 {
            let quick = pin!(async { 1 });
            assert_eq!(
                pool.within(after(Duration::from_secs(60)), NO_LATER, quick)
                    .await,
                Some(1)
            );
        }
        assert_eq!(pool.timers.borrow().len(), 1, "one timer, kept");

        // Entered for 60 s above; this attempt's deadline is 30 ms.
        let started = std::time::Instant::now();
        let never = pin!(std::future::pending::<()>());
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            pool.within(after(Duration::from_millis(30)), NO_LATER, never),
        )
        .await;
        assert_eq!(out.ok(), Some(None), "the earlier deadline fired");
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(pool.timers.borrow().len(), 1);

        // An attempt that ends before its deadline: the kept timer must not wake its task.
        let woken = Arc::new(Wakes(AtomicUsize::new(0)));
        {
            let waker = Waker::from(Arc::clone(&woken));
            let short = pin!(tokio::time::sleep(Duration::from_millis(5)));
            let mut attempt = pin!(pool.within(after(Duration::from_millis(20)), NO_LATER, short));
            let cx = &mut Context::from_waker(&waker);
            while attempt.as_mut().poll(cx).is_pending() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Ended: its timer is back with the pool.
            let seen = woken.0.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert_eq!(
                woken.0.load(Ordering::SeqCst),
                seen,
                "woken after its attempt ended"
            );
        }
        // A second attempt while the first is running takes a timer of its own.
        let a = pin!(std::future::pending::<()>());
        let b = pin!(std::future::pending::<()>());
        let (ra, rb) = tokio::join!(
            pool.within(after(Duration::from_millis(20)), NO_LATER, a),
            pool.within(after(Duration::from_millis(40)), NO_LATER, b)
        );
        assert_eq!((ra, rb), (None, None));
        assert_eq!(pool.timers.borrow().len(), 2);
    }
}
