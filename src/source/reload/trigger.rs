//! What asks for a reload: the [`Trigger`] each source of one sends (poll, file watch, webhook,
//! admin call, peer, SIGHUP), the poller that sends one on a timer and the watcher that sends
//! one when the config directory changes. How triggers are coalesced and served is the reload
//! loop's ([`super::Reloader::run`]).

use std::time::Duration;

use tokio::sync::mpsc;

use crate::telemetry::trace::TraceContext;

/// Quiet time after the last file event before a directory is reloaded (editor save storms).
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

/// Why a reload was asked for. A request that asks for one (webhook, admin call) brings its
/// trace context when `[tracing]` is on, and the reload's log lines carry its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Poll,
    Watch,
    /// A push webhook; `source` is `github` or `gitlab`.
    Webhook {
        source: &'static str,
        trace: Option<TraceContext>,
    },
    /// `POST /admin/reload`; `force` recompiles even a version that already failed.
    Admin {
        force: bool,
        trace: Option<TraceContext>,
    },
    /// Another replica announced a new head on the fleet's store (`store::fleet`).
    Peer,
    /// SIGHUP: reload now, as nginx and most daemons do (not forced).
    Signal,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Poll => "poll",
            Trigger::Watch => "watch",
            Trigger::Webhook { source, .. } => source,
            Trigger::Admin { .. } => "admin",
            Trigger::Peer => "peer",
            Trigger::Signal => "sighup",
        }
    }

    pub(super) fn force(self) -> bool {
        matches!(self, Trigger::Admin { force: true, .. })
    }

    /// The trace of the request that asked for this reload.
    pub fn trace(self) -> Option<TraceContext> {
        match self {
            Trigger::Webhook { trace, .. } | Trigger::Admin { trace, .. } => trace,
            Trigger::Poll | Trigger::Watch | Trigger::Peer | Trigger::Signal => None,
        }
    }
}

/// Sends a poll trigger every `every`, plus up to 10% jitter so a fleet does not fetch in step.
/// A poll is dropped when a reload is already queued.
pub fn spawn_poller(tx: mpsc::Sender<Trigger>, every: Duration) {
    actix_web::rt::spawn(async move {
        loop {
            let jitter = every.mul_f64(rand::random::<f64>() * 0.1);
            tokio::time::sleep(every + jitter).await;
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Trigger::Poll) {
                return;
            }
        }
    });
}

/// Watches a config directory and sends a trigger on every change. Keep the returned watcher
/// alive for as long as the directory should be watched.
pub fn watch_dir(
    dir: &std::path::Path,
    tx: mpsc::Sender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && matches!(
                e.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
        {
            let _ = tx.try_send(Trigger::Watch);
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}
