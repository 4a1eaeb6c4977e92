//! The reload loop: every trigger (poll, webhook, admin call, file watch) lands in one channel,
//! bursts are coalesced, and one reload runs at a time, off the actix workers.
//!
//! A reload fetches, compiles and, only if the compile produced a snapshot, publishes it. A
//! failure of any kind keeps the last-known-good snapshot serving and is reported in `/status`
//! (attempted vs applied, as Flux does), in the metrics and in the log. A version that failed is
//! not compiled again until a new version arrives or a reload is forced.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::{Loaded, Source, SourceSpec};
use crate::compile::CompileOptions;
use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::TraceContext;

mod off_loop;
mod status;
mod trigger;

pub use off_loop::{MAX_STUCK_LOADS, OffLoopError, load_off_loop};
pub use status::{Applied, Attempted, RELOAD_HISTORY, ReloadRecord, ReloadStatus, STATUS_ERRORS};
use status::{applied, millis, rfc3339, unix};
pub use trigger::{Trigger, WATCH_DEBOUNCE, spawn_poller, watch_dir};

/// Time a reload gets to fetch, export, read and compile (`serve --reload-timeout`).
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Reloader {
    source: Option<Source>,
    spec: SourceSpec,
    store: Arc<SnapshotStore>,
    status: Arc<Mutex<ReloadStatus>>,
    metrics: Arc<Metrics>,
    opts: CompileOptions,
    load_timeout: Duration,
    /// Load threads still running, the current one and any abandoned at their deadline.
    loads_running: Arc<AtomicUsize>,
    /// Set when a forced reload was asked for (see [`Reloader::with_force_flag`]).
    force_pending: Arc<AtomicBool>,
    /// Woken after every reload attempt (the fleet view publishes then).
    attempted: Option<Arc<tokio::sync::Notify>>,
}

/// Why the first load failed: nothing can be served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Source(#[from] super::SourceError),
    #[error("the config does not compile:\n{0}")]
    Invalid(String),
}

/// A gateway's config state right after the first successful load.
pub struct Started {
    pub reloader: Reloader,
    pub store: Arc<SnapshotStore>,
    pub status: Arc<Mutex<ReloadStatus>>,
}

impl Reloader {
    /// Loads and compiles the first version; the gateway cannot start without one. The load
    /// gets `deadline`: past it (a git host that accepts the connection and never answers),
    /// a git source serves the commit its cached mirror holds, marked stale, and fails only
    /// when there is none.
    pub fn start(
        source: Source,
        opts: CompileOptions,
        metrics: Arc<Metrics>,
        deadline: Duration,
    ) -> Result<Started, StartError> {
        let began = Instant::now();
        let spec = source.spec().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let first_opts = opts.clone();
        std::thread::Builder::new()
            .name("rustygate-load".into())
            .spawn(move || {
                let mut source = source;
                let r = source.load_first(&first_opts);
                let _ = tx.send((source, r));
            })
            .map_err(|e| StartError::Invalid(format!("cannot start the load thread: {e}")))?;
        let (source, loaded) = match rx.recv_timeout(deadline) {
            Ok((source, r)) => (source, r?),
            Err(_) => {
                // The stuck fetch keeps its thread; the process does not wait for it.
                let why = format!("the first fetch did not finish within {deadline:?}");
                let mut source = Source::new(spec.clone());
                let r = source.load_cached(&why, &opts)?;
                (source, r)
            }
        };
        let Loaded::Candidate(c) = loaded else {
            return Err(StartError::Invalid("nothing to load".into()));
        };
        let mut source = source;
        let (c, rejected) = if c.snapshot.is_some() {
            (c, None)
        } else {
            metrics.reload_failed();
            if let Some(reason) = c.refused {
                metrics.commit_refused(reason);
                tracing::error!(version = %c.version_id, reason, signer = c.signer.as_deref().unwrap_or(""), "the commit to serve is not signed as --require-signed requires");
            }
            // A restart while the branch head is broken: the commit this cache dir served
            // before, if it still compiles, rather than no gateway at all.
            match source.load_served(&c.version_id, &opts) {
                Ok(Some(Loaded::Candidate(prev))) if prev.snapshot.is_some() => {
                    tracing::error!(
                        version = %c.version_id,
                        serving = %prev.version_id,
                        errors = c.diagnostics.error_count(),
                        diagnostics = %c.diagnostics.render_short(&c.files).trim_end(),
                        "the branch head is rejected: serving the commit served before the restart until a good one arrives"
                    );
                    (prev, Some(c))
                }
                _ => return Err(StartError::Invalid(c.diagnostics.render_human(&c.files))),
            }
        };
        let Some(mut snapshot) = c.snapshot else {
            return Err(StartError::Invalid("nothing to load".into()));
        };
        for d in c.diagnostics.iter() {
            tracing::warn!(code = d.code, version = %c.version_id, "{}", d.message);
        }
        if let Some(why) = &c.stale {
            tracing::error!(
                version = %c.version_id,
                error = %why,
                "serving a stale commit, cached from an earlier run, until a fetch of the ref succeeds (the config repo could not be fetched, or the mirror has no commit for the ref)"
            );
        }
        if let Some(why) = &c.held {
            tracing::error!(version = %c.version_id, error = %why, "the branch head does not descend from the commit served before the restart: still serving that commit until a forced reload (or --allow-rewrites)");
        }
        snapshot.version.commit = c.commit;
        snapshot.version.reference = source.reference();
        snapshot.version.source = spec.describe();
        let now = SystemTime::now();
        let mut status = ReloadStatus {
            applied: Some(Applied {
                signer: c.signer.clone(),
                ..applied(&snapshot)
            }),
            attempted: Some(Attempted::served(
                &c.version_id,
                "startup",
                now,
                c.signer.clone(),
            )),
            last_fetch_at: c.stale.is_none().then(|| rfc3339(now)),
            last_fetch_error: c.held.clone().or_else(|| c.stale.clone()),
            stale: c.stale.is_some(),
            failed: None,
            before_fetch_error: None,
            history: VecDeque::with_capacity(RELOAD_HISTORY),
        };
        status.record(ReloadRecord {
            at: rfc3339(now),
            trigger: "startup",
            from: None,
            to: Some(c.version_id.clone()),
            duration_ms: millis(began.elapsed()),
            result: "applied",
            errors: 0,
            message: None,
        });
        if let Some(why) = &c.held {
            // As a running gateway reports a held-back head: a failed attempt without a
            // version, the reason as its error.
            status.attempted = Some(Attempted {
                sha: None,
                ok: false,
                trigger: "startup",
                at: rfc3339(now),
                errors: serde_json::json!([{ "message": why }]),
                errors_total: 1,
                reason: None,
                signer: None,
            });
        }
        let head_ok = rejected.is_none() && c.held.is_none() && c.stale.is_none();
        if let Some(head) = rejected {
            // The head stays the failed attempt: /status and `rustygate status` say it, and
            // later reloads skip it until it changes (or one is forced).
            let from = Some(c.version_id.clone());
            let head_id = head.version_id.clone();
            status.rejected(*head, "startup", from, began.elapsed(), now);
            source.discard_checkout(&head_id, Some(&c.version_id));
        }
        metrics.reload_succeeded(None, &c.version_id, unix(now));
        // Serving, but not the head: it was rejected, held back, or not fetched.
        metrics.last_reload_ok(head_ok);
        metrics.stale(c.stale.is_some());
        source.clean_checkouts(&c.version_id);
        tracing::info!(version = %c.version_id, routes = snapshot.routes.len(), upstreams = snapshot.upstreams.len(), source = %spec.describe(), "config loaded");
        let store = Arc::new(SnapshotStore::new(snapshot));
        let status = Arc::new(Mutex::new(status));
        let reloader = Reloader {
            source: Some(source),
            spec,
            store: Arc::clone(&store),
            status: Arc::clone(&status),
            metrics,
            opts,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            loads_running: Arc::new(AtomicUsize::new(0)),
            force_pending: Arc::default(),
            attempted: None,
        };
        Ok(Started {
            reloader,
            store,
            status,
        })
    }

    /// Sets the time a reload gets before it is abandoned (default [`DEFAULT_LOAD_TIMEOUT`]).
    /// The flag a forced reload request sets when it is queued (see `server::Control`).
    pub fn with_force_flag(mut self, flag: Arc<AtomicBool>) -> Reloader {
        self.force_pending = flag;
        self
    }

    /// Wakes `notify` after every reload attempt, whatever its outcome.
    pub fn with_notify(mut self, notify: Arc<tokio::sync::Notify>) -> Reloader {
        self.attempted = Some(notify);
        self
    }

    pub fn with_load_timeout(mut self, timeout: Duration) -> Reloader {
        self.load_timeout = timeout;
        self
    }

    /// Handle to abandon a reload in progress (on shutdown).
    pub fn cancel_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.source.as_ref().map(Source::cancel_flag)
    }

    /// Serves triggers until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Trigger>) {
        while let Some(first) = rx.recv().await {
            let mut force = first.force();
            // The logs follow the first request that asked (a poll that a webhook joined is
            // still the webhook's doing, as far as anyone will look for it).
            let mut trace = first.trace();
            if first == Trigger::Watch {
                // Wait for the files to settle: each new event restarts the quiet period.
                loop {
                    match tokio::time::timeout(WATCH_DEBOUNCE, rx.recv()).await {
                        Ok(Some(t)) => {
                            force |= t.force();
                            trace = trace.or(t.trace());
                        }
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
            }
            // Everything queued meanwhile is answered by this one reload, and a force that
            // found the queue full.
            while let Ok(t) = rx.try_recv() {
                force |= t.force();
                trace = trace.or(t.trace());
            }
            force |= self.force_pending.swap(false, Ordering::SeqCst);
            self.reload(first.name(), force, trace).await;
            if let Some(n) = &self.attempted {
                n.notify_one();
            }
        }
    }

    /// One reload, start to finish. `cause`: the trace of the request that asked for it, whose
    /// ids the reload's log lines carry.
    pub async fn reload(
        &mut self,
        trigger: &'static str,
        force: bool,
        cause: Option<TraceContext>,
    ) {
        let started = Instant::now();
        let ids = cause.map(|c| c.hex());
        let trace_id = ids.as_ref().map(|i| i.0.as_str());
        let span_id = ids.as_ref().map(|i| i.1.as_str());
        let (applied_id, failed_id) = {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            (s.applied.as_ref().map(|a| a.sha.clone()), s.failed.clone())
        };
        let mut source = self
            .source
            .take()
            .unwrap_or_else(|| Source::new(self.spec.clone()));
        let cancel = source.cancel_flag();
        let opts = self.opts.clone();
        // Off the reload loop and with a deadline: a read that hangs (a stuck network file
        // system, a fetch that never answers) fails this reload, never the next ones.
        let served = self.store.load();
        let joined = load_off_loop(self.load_timeout, &self.loads_running, move || {
            // A certificate renewed in place (same config version): compile this version again,
            // also after a failed attempt (the renewal may have been half-written then).
            let renewed = served.tls_files_changed();
            let applied_id = applied_id.filter(|_| !renewed);
            let failed_id = failed_id.filter(|_| !renewed);
            let r = source.load(applied_id.as_deref(), failed_id.as_deref(), force, &opts);
            (source, r)
        })
        .await;
        let result = match joined {
            Ok((source, r)) => {
                self.source = Some(source);
                r
            }
            Err(e) => {
                // The stuck load keeps its `Source`; the next reload opens the mirror afresh,
                // still answering to the shutdown flag.
                self.source = Some(Source::with_cancel(self.spec.clone(), cancel));
                Err(super::SourceError::Stuck(e.to_string()))
            }
        };
        let now = SystemTime::now();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut candidate = match result {
            Err(e) => {
                tracing::warn!(trigger, trace_id, span_id, error = %e, "config fetch failed; still serving the last good config");
                status.last_fetch_error = Some(e.to_string());
                if status.attempted.as_ref().is_some_and(|a| a.sha.is_some()) {
                    status.before_fetch_error = status.attempted.take();
                }
                status.attempted = Some(Attempted {
                    sha: None,
                    ok: false,
                    trigger,
                    at: rfc3339(now),
                    errors: serde_json::json!([{ "message": e.to_string() }]),
                    errors_total: 1,
                    reason: None,
                    signer: None,
                });
                let from = status.applied.as_ref().map(|a| a.sha.clone());
                status.record(ReloadRecord {
                    at: rfc3339(now),
                    trigger,
                    from,
                    to: None,
                    duration_ms: millis(started.elapsed()),
                    result: "fetch-failed",
                    errors: 1,
                    message: Some(e.to_string()),
                });
                self.metrics.reload_failed();
                return;
            }
            Ok(Loaded::Unchanged { version_id }) => {
                status.last_fetch_at = Some(rfc3339(now));
                status.last_fetch_error = None;
                status.stale = false;
                self.metrics.stale(false);
                // A fetch that failed for a while found the commit tried before it: that
                // attempt (its success, or its located errors) is the last one again.
                if status.attempted.as_ref().is_some_and(|a| a.sha.is_none())
                    && let Some(before) = status.before_fetch_error.take()
                    && before.sha.as_deref() == Some(version_id.as_str())
                {
                    status.attempted = Some(before);
                }
                status.back_to_applied(&version_id, trigger, now);
                self.metrics
                    .last_reload_ok(status.failed.as_deref() != Some(version_id.as_str()));
                tracing::debug!(trigger, trace_id, span_id, version = %version_id, "config unchanged");
                return;
            }
            Ok(Loaded::Candidate(c)) => c,
        };
        status.last_fetch_at = Some(rfc3339(now));
        status.last_fetch_error = None;
        status.stale = false;
        self.metrics.stale(false);
        let served_routes = self.store.load().routes.len();
        if !force
            && served_routes > 0
            && candidate
                .snapshot
                .as_ref()
                .is_some_and(|s| s.routes.is_empty())
        {
            // Deleting every route is almost always an accident; it is held back like a
            // rewritten history, until a forced reload says it is meant.
            candidate.snapshot = None;
            candidate.diagnostics = hold_empty(served_routes, candidate.diagnostics);
        }
        let id = candidate.version_id.clone();
        let Some(mut snapshot) = candidate.snapshot else {
            if let Some(reason) = candidate.refused {
                self.metrics.commit_refused(reason);
                tracing::warn!(
                    trigger,
                    version = %id,
                    reason,
                    signer = candidate.signer.as_deref().unwrap_or(""),
                    "commit not served: it is not signed as --require-signed requires; still serving the last good config"
                );
            }
            tracing::warn!(
                trigger,
                trace_id,
                span_id,
                version = %id,
                errors = candidate.diagnostics.error_count(),
                diagnostics = %candidate.diagnostics.render_short(&candidate.files).trim_end(),
                "config rejected; still serving the last good config"
            );
            // Counted before /status says so: whoever reads the one finds the other.
            self.metrics.reload_failed();
            let from = status.applied.as_ref().map(|a| a.sha.clone());
            status.rejected(*candidate, trigger, from.clone(), started.elapsed(), now);
            drop(status);
            if let Some(s) = &self.source {
                s.discard_checkout(&id, from.as_deref());
            }
            return;
        };
        snapshot.version.commit = candidate.commit;
        snapshot.version.reference = self.source.as_ref().and_then(Source::reference);
        snapshot.version.source = self.spec.describe();
        let info = Applied {
            signer: candidate.signer.clone(),
            ..applied(&snapshot)
        };
        let previous = self.store.publish(snapshot);
        crate::server::warn_listener_changes(&previous, &self.store.load());
        self.metrics
            .reload_succeeded(Some(&previous.version.id), &id, unix(now));
        // The series of routes and upstreams the reload removed go now, not at the next scrape.
        self.metrics.follow_config(&self.store.load());
        tracing::info!(
            trigger,
            trace_id,
            span_id,
            from = %previous.version.id,
            to = %id,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            routes = info.routes,
            warnings = candidate.diagnostics.warning_count(),
            "config reloaded"
        );
        status.applied = Some(info);
        status.failed = None;
        status.record(ReloadRecord {
            at: rfc3339(now),
            trigger,
            from: Some(previous.version.id.clone()),
            to: Some(id.clone()),
            duration_ms: millis(started.elapsed()),
            result: "applied",
            errors: 0,
            message: None,
        });
        status.attempted = Some(Attempted::served(&id, trigger, now, candidate.signer));
        drop(status);
        if let Some(s) = &self.source {
            s.clean_checkouts(&id);
        }
    }
}

/// The diagnostics of a commit with no routes, held back while `served` routes are served: the
/// reason first (so `/status`, `rustygate status` and the dashboard lead with it), then what
/// the compile said.
fn hold_empty(served: usize, found: crate::config::Diagnostics) -> crate::config::Diagnostics {
    let mut held = crate::config::Diagnostics::default();
    held.push(
        crate::config::Diagnostic::error(
            "no-routes-held",
            format!(
                "held back: this version has no routes, the served config has {served}; still \
                 serving it. Force a reload (POST /admin/reload?force=true) to serve a config \
                 without routes"
            ),
        )
        .help("a commit that deletes every route is usually a bad merge or a moved directory"),
    );
    held.extend(found);
    held
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A forced reload asked while the queue is full is answered by the reload already queued,
    /// still forced: the flag set by the admin call is read with the queued triggers.
    #[tokio::test]
    async fn a_force_that_found_the_queue_full_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("routes")).unwrap();
        std::fs::write(
            dir.path().join("routes/main.toml"),
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
        )
        .unwrap();
        let attempted_trigger = |forced: bool| {
            let source = Source::new(SourceSpec::Dir(dir.path().to_path_buf()));
            let started = Reloader::start(
                source,
                CompileOptions::default(),
                Arc::new(Metrics::new()),
                DEFAULT_LOAD_TIMEOUT,
            )
            .unwrap();
            let flag = Arc::new(AtomicBool::new(false));
            let reloader = started.reloader.with_force_flag(Arc::clone(&flag));
            let (tx, rx) = mpsc::channel(1);
            // The queue is full with an unforced trigger; the forced call only sets the flag.
            tx.try_send(Trigger::Poll).unwrap();
            flag.store(forced, Ordering::SeqCst);
            drop(tx);
            let status = Arc::clone(&started.status);
            async move {
                reloader.run(rx).await;
                assert!(!flag.load(Ordering::SeqCst), "the flag is consumed");
                let s = status.lock().unwrap();
                s.attempted.as_ref().unwrap().trigger
            }
        };
        // Unchanged files: unforced, nothing is compiled again; forced, it is.
        assert_eq!(attempted_trigger(false).await, "startup");
        assert_eq!(attempted_trigger(true).await, "poll");
    }

    /// A reload that renames a route removes the old name's series from the metrics at once,
    /// scraped or not; the series of the route still there keeps its count.
    #[tokio::test]
    async fn a_reload_removes_the_series_of_a_renamed_route() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("routes")).unwrap();
        let routes = |other: &str| {
            let route = |name: &str| {
                format!(
                    "[[route]]\nname = \"{name}\"\npath = \"/{name}\"\nrespond = {{ status = 200 }}\n"
                )
            };
            let text = format!("{}{}", route("api"), route(other));
            std::fs::write(dir.path().join("routes/main.toml"), text).unwrap();
        };
        routes("old");
        let metrics = Arc::new(Metrics::new());
        let started = Reloader::start(
            Source::new(SourceSpec::Dir(dir.path().to_path_buf())),
            CompileOptions::default(),
            Arc::clone(&metrics),
            DEFAULT_LOAD_TIMEOUT,
        )
        .unwrap();
        for route in ["api", "old"] {
            metrics.rate_limited.with_label_values(&[route]).inc();
        }
        routes("new");
        let mut reloader = started.reloader;
        reloader.reload("poll", false, None).await;
        let text = metrics.render();
        assert!(!text.contains("route=\"old\""), "{text}");
        assert!(
            text.contains("rustygate_rate_limited_total{route=\"api\"} 1\n"),
            "{text}"
        );
    }
}
