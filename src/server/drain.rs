//! A worker's graceful shutdown as one flag that its connections poll.
//!
//! actix-http's HTTP/1 dispatcher polls its shutdown signal on every poll of every connection,
//! twice a request. actix-server's signal is a `tokio::sync::watch` receiver, and each poll of
//! it locks the channel's list of waiters: 330 instructions a request. Here a poll reads a
//! `Cell` and compares the task's waker with the one kept; the shutdown wakes each waiting
//! connection once.
//!
//! One [`Drain`] serves one listener on one worker thread. It follows the server's signal
//! from the first time a connection waits on it (a task on the worker, spawned then).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_server::GracefulShutdownSignal;

#[derive(Clone)]
pub(crate) struct Drain(Rc<Inner>);

struct Inner {
    /// The server's signal; taken by the task that follows it.
    signal: Cell<Option<GracefulShutdownSignal>>,
    started: Cell<bool>,
    waiters: RefCell<Waiters>,
}

/// The wakers of the connections waiting, by slot; freed slots are reused.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Drain {
    pub(crate) fn new(signal: GracefulShutdownSignal) -> Self {
        Drain(Rc::new(Inner {
            signal: Cell::new(Some(signal)),
            started: Cell::new(false),
            waiters: RefCell::default(),
        }))
    }

    /// Resolves once the graceful shutdown has started (at once if it has).
    pub(crate) fn started(&self) -> Started {
        if let Some(signal) = self.0.signal.take() {
            let drain = self.clone();
            tokio::task::spawn_local(async move {
                signal.notified().await;
                drain.start();
            });
        }
        Started {
            inner: Rc::clone(&self.0),
            slot: None,
        }
    }

    fn start(&self) {
        self.0.started.set(true);
        // Taken first: a waker may run code that polls or drops a waiter.
        let wakers: Vec<Waker> = {
            let mut w = self.0.waiters.borrow_mut();
            w.slots.iter_mut().filter_map(Option::take).collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

/// One connection's wait for the shutdown.
pub(crate) struct Started {
    inner: Rc<Inner>,
    slot: Option<usize>,
}

impl Future for Started {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.inner.started.get() {
            return Poll::Ready(());
        }
        let mut w = this.inner.waiters.borrow_mut();
        match this.slot {
            Some(i) => {
                let kept = &mut w.slots[i];
                if !kept.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                    *kept = Some(cx.waker().clone());
                }
            }
            None => {
                let waker = Some(cx.waker().clone());
                let i = match w.free.pop() {
                    Some(i) => {
                        w.slots[i] = waker;
                        i
                    }
                    None => {
                        w.slots.push(waker);
                        w.slots.len() - 1
                    }
                };
                this.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let mut w = self.inner.waiters.borrow_mut();
            w.slots[i] = None;
            w.free.push(i);
        }
    }
}

/// When the process's shutdown grace ends, set once the shutdown signal has come: what the
/// server's stop drops then (requests, bodies, tunnels still open) was cut by the gateway.
static CUT_AT: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// When tunnels still open begin to close themselves ([`tunnels_close`]).
static TUNNELS_CLOSE_AT: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Wakes the tunnels waiting in [`tunnels_close`] once the deadlines above are set.
static CUT_SET: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// How long before the grace ends a tunnel starts its closing handshake: time for a close
/// frame to reach each end and the client's answer to come back. At most half the grace.
const TUNNEL_CLOSING: std::time::Duration = std::time::Duration::from_secs(1);

/// The shutdown signal has come: the server stops what is left `grace` from now.
pub(crate) fn cut_after(grace: std::time::Duration) {
    let now = std::time::Instant::now();
    let _ = TUNNELS_CLOSE_AT.set(now + grace - TUNNEL_CLOSING.min(grace / 2));
    let _ = CUT_AT.set(now + grace);
    CUT_SET.notify_waiters();
}

/// Resolves when a WebSocket tunnel still open should end itself with close frames, shortly
/// before the shutdown grace ends, rather than be dropped mid-stream by the server's stop
/// (its client would see no close frame: 1006, abnormal closure). Never resolves before a
/// shutdown. One waiter per tunnel, not per request.
pub(crate) async fn tunnels_close() {
    let at = loop {
        let set = CUT_SET.notified();
        tokio::pin!(set);
        // Registered before the deadline is read: a shutdown in between still wakes it.
        set.as_mut().enable();
        if let Some(at) = TUNNELS_CLOSE_AT.get() {
            break *at;
        }
        set.await;
    };
    tokio::time::sleep_until(at.into()).await;
}

/// Whether the process's shutdown grace is over: what ends unfinished now was dropped by the
/// server, not by its client. Read only on those ends, not per request.
pub(crate) fn cut_by_shutdown() -> bool {
    // The server's stop follows the deadline by a little.
    const EARLY: std::time::Duration = std::time::Duration::from_millis(100);
    CUT_AT
        .get()
        .is_some_and(|at| std::time::Instant::now() + EARLY >= *at)
}

/// Why a body or tunnel ended before its end, for the access log: `shutdown`
/// ([`cut_by_shutdown`]), else `client_gone` (its client closed or reset the connection).
pub(crate) fn gone_reason() -> &'static str {
    if cut_by_shutdown() {
        "shutdown"
    } else {
        "client_gone"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Started, waker: &Waker) -> Poll<()> {
        Pin::new(f).poll(&mut Context::from_waker(waker))
    }

    fn drain() -> Drain {
        let server = actix_server::Server::build();
        Drain::new(server.graceful_shutdown_signal())
    }

    #[test]
    fn each_waiting_connection_is_woken_once_and_then_ready() {
        let d = drain();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut a = Started {
            inner: Rc::clone(&d.0),
            slot: None,
        };
        let mut b = Started {
            inner: Rc::clone(&d.0),
            slot: None,
        };
        // Polled again and again with the same waker: kept once, not once per poll.
        for _ in 0..3 {
            assert!(poll(&mut a, &waker).is_pending());
        }
        assert!(poll(&mut b, &waker).is_pending());
        assert_eq!(d.0.waiters.borrow().slots.len(), 2);
        d.start();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(poll(&mut a, &waker).is_ready());
        assert!(poll(&mut b, &waker).is_ready());
    }

    #[test]
    fn a_dropped_wait_frees_its_slot_and_is_not_woken() {
        let d = drain();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        for _ in 0..100 {
            let mut a = Started {
                inner: Rc::clone(&d.0),
                slot: None,
            };
            assert!(poll(&mut a, &waker).is_pending());
        }
        // One slot, reused by each connection after the last closed.
        assert_eq!(d.0.waiters.borrow().slots.len(), 1);
        d.start();
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_new_waker_replaces_the_kept_one() {
        let d = drain();
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let mut a = Started {
            inner: Rc::clone(&d.0),
            slot: None,
        };
        assert!(poll(&mut a, &Waker::from(Arc::clone(&first))).is_pending());
        assert!(poll(&mut a, &Waker::from(Arc::clone(&second))).is_pending());
        d.start();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_begun_after_the_start_is_ready_at_once() {
        let d = drain();
        d.start();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let mut late = Started {
            inner: Rc::clone(&d.0),
            slot: None,
        };
        assert!(poll(&mut late, &Waker::from(count)).is_ready());
        assert!(d.0.waiters.borrow().slots.is_empty());
    }
}
