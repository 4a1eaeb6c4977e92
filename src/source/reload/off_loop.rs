//! Running one load off the reload loop: on a thread of its own, with a deadline, and with a
//! bound on the loads abandoned at their deadline that are still stuck on I/O. What a load does
//! is the caller's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Loads given up on at their deadline whose thread is still stuck (on a hung network file
/// system, a fetch that never answers): past this many, reloads fail at once instead of piling
/// up threads.
pub const MAX_STUCK_LOADS: usize = 4;

/// Why a load run off the reload loop gave no result.
#[derive(Debug, thiserror::Error)]
pub enum OffLoopError {
    #[error("the load did not finish within {0:?} (a read or fetch is stuck); abandoned")]
    TimedOut(Duration),
    #[error("{0} earlier loads are still stuck on I/O; not starting another")]
    TooManyStuck(usize),
    #[error("the load thread could not start: {0}")]
    Spawn(std::io::Error),
    #[error("the load failed unexpectedly (panic); the next reload starts afresh")]
    Panicked,
}

/// Runs `load` on its own thread and waits at most `deadline` for it. A load past its deadline
/// is abandoned, not stopped (a thread blocked in a read cannot be): it is counted in `running`
/// until it ends, and new loads are refused while [`MAX_STUCK_LOADS`] are. A plain thread, not
/// `spawn_blocking`: the runtime waits for its blocking tasks when it shuts down, and a stuck read
/// must never hold SIGTERM past the grace period.
pub async fn load_off_loop<T: Send + 'static>(
    deadline: Duration,
    running: &Arc<AtomicUsize>,
    load: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffLoopError> {
    let now_running = running.load(Ordering::SeqCst);
    if now_running >= MAX_STUCK_LOADS {
        return Err(OffLoopError::TooManyStuck(now_running));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    running.fetch_add(1, Ordering::SeqCst);
    let count = Arc::clone(running);
    let spawned = std::thread::Builder::new()
        .name("rustygate-load".into())
        .spawn(move || {
            // Decrements even if `load` panics.
            struct Done(Arc<AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _done = Done(count);
            let _ = tx.send(load());
        });
    if let Err(e) = spawned {
        running.fetch_sub(1, Ordering::SeqCst);
        return Err(OffLoopError::Spawn(e));
    }
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(OffLoopError::Panicked),
        Err(_) => Err(OffLoopError::TimedOut(deadline)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::files::{FileError, FileKind, read_capped};

    /// A reader that blocks until released, as a read on a hung network file system does.
    struct SlowReader(std::sync::mpsc::Receiver<()>);

    impl std::io::Read for SlowReader {
        fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
            let _ = self.0.recv_timeout(Duration::from_secs(30));
            Ok(0)
        }
    }

    fn wait_for(limit: Duration, cond: impl Fn() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond()
    }

    #[tokio::test]
    async fn a_stuck_read_is_abandoned_at_its_deadline_and_later_loads_still_run() {
        let running = Arc::new(AtomicUsize::new(0));
        let (release, blocked) = std::sync::mpsc::channel();
        let started = Instant::now();
        let stuck = load_off_loop(Duration::from_millis(300), &running, move || {
            read_capped(SlowReader(blocked), 0, FileKind::Config)
        })
        .await;
        assert!(matches!(stuck, Err(OffLoopError::TimedOut(_))), "{stuck:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            running.load(Ordering::SeqCst),
            1,
            "the stuck thread is counted"
        );

        // The next load runs while the first is still stuck.
        let next = load_off_loop(Duration::from_secs(10), &running, || {
            read_capped(&b"ok"[..], 2, FileKind::Config)
        })
        .await;
        assert_eq!(next.unwrap().unwrap(), "ok");

        release.send(()).unwrap();
        assert!(wait_for(Duration::from_secs(10), || running
            .load(Ordering::SeqCst)
            == 0));
    }

    #[tokio::test]
    async fn stuck_loads_are_bounded() {
        let running = Arc::new(AtomicUsize::new(0));
        let mut releases = Vec::new();
        for _ in 0..MAX_STUCK_LOADS {
            let (release, blocked) = std::sync::mpsc::channel::<()>();
            releases.push(release);
            let r = load_off_loop(Duration::from_millis(50), &running, move || {
                read_capped(SlowReader(blocked), 0, FileKind::Config)
            })
            .await;
            assert!(matches!(r, Err(OffLoopError::TimedOut(_))), "{r:?}");
        }
        let r = load_off_loop(Duration::from_secs(1), &running, || {
            Err::<String, FileError>(FileError::NotFound)
        })
        .await;
        assert!(
            matches!(r, Err(OffLoopError::TooManyStuck(n)) if n == MAX_STUCK_LOADS),
            "{r:?}"
        );
        for r in releases {
            r.send(()).unwrap();
        }
        assert!(wait_for(Duration::from_secs(10), || running
            .load(Ordering::SeqCst)
            == 0));
    }
}
