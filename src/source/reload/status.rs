//! What the gateway reports about its reloads: the version applied, the last attempt and its
//! errors (capped for `/status`), the history of the last reloads for `/api/v1/reloads`, and the
//! time and record helpers the reload loop fills them with. Nothing here loads or publishes a
//! config (see [`super::Reloader`]).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// The version being served.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub sha: String,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub subject: Option<String>,
    pub author: Option<String>,
    pub committed_at: Option<String>,
    pub loaded_at: String,
    pub routes: usize,
    pub upstreams: usize,
    /// With `--require-signed`: the allowed-signers principals of the commit's signer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// The last version the gateway tried to load, successful or not.
#[derive(Debug, Clone, Serialize)]
pub struct Attempted {
    pub sha: Option<String>,
    pub ok: bool,
    pub trigger: &'static str,
    pub at: String,
    /// Located diagnostics (`file`, `line`, `column`, `code`, `message`) or a fetch error: the
    /// first [`STATUS_ERRORS`] only, `/status` needs no token and is polled.
    pub errors: serde_json::Value,
    /// How many diagnostics the version had in all (`errors` holds the first of them).
    pub errors_total: usize,
    /// With `--require-signed`: why the commit was not served (`unsigned-commit`,
    /// `bad-signature`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// With `--require-signed`: the allowed-signers principals of the commit's signer, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

impl Attempted {
    /// An attempt that served `sha`.
    pub(super) fn served(
        sha: &str,
        trigger: &'static str,
        now: SystemTime,
        signer: Option<String>,
    ) -> Attempted {
        Attempted {
            sha: Some(sha.to_owned()),
            ok: true,
            trigger,
            at: rfc3339(now),
            errors: serde_json::Value::Array(Vec::new()),
            errors_total: 0,
            reason: None,
            signer,
        }
    }
}

/// Diagnostics of a rejected version kept in its status record (`attempted.errors`); the
/// total is in `attempted.errors_total`. All of them were 5.5 MB for 20,000, in a record that
/// needs no token and that the dashboard fetches every 3 s.
pub const STATUS_ERRORS: usize = 50;

/// Reloads kept in [`ReloadStatus::history`]: the dashboard's "last 50 reloads".
pub const RELOAD_HISTORY: usize = 50;

/// One reload that tried a version (or failed to fetch one), for `/api/v1/reloads`. A reload
/// that found nothing new (a poll of an unchanged branch) is not one: polls would push every
/// real reload out of the history within minutes.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    /// When it finished.
    pub at: String,
    pub trigger: &'static str,
    /// The version served before it.
    pub from: Option<String>,
    /// The version it tried; `None` when the fetch failed before one was known.
    pub to: Option<String>,
    pub duration_ms: u64,
    /// `applied`, `rejected` (did not compile or not signed as required) or `fetch-failed`.
    pub result: &'static str,
    /// Errors found in the version tried.
    pub errors: usize,
    /// The first error, in one line.
    pub message: Option<String>,
}

/// Reload state for `/status`. Behind a mutex: read by the admin listener, written by the
/// reload loop, never touched by the request path.
#[derive(Debug, Default, Serialize)]
pub struct ReloadStatus {
    pub applied: Option<Applied>,
    pub attempted: Option<Attempted>,
    pub last_fetch_at: Option<String>,
    pub last_fetch_error: Option<String>,
    /// The version served came from the cached mirror because the remote could not be
    /// fetched at start-up; cleared by the next successful fetch.
    pub stale: bool,
    #[serde(skip)]
    pub(super) failed: Option<String>,
    /// The last attempt that reached a commit, while a fetch failure stands in `attempted`:
    /// put back when a fetch works again and finds the same commit.
    #[serde(skip)]
    pub(super) before_fetch_error: Option<Attempted>,
    /// The last [`RELOAD_HISTORY`] reloads, oldest first.
    #[serde(skip)]
    pub(super) history: VecDeque<ReloadRecord>,
}

impl ReloadStatus {
    /// Records a version that was not served (it does not compile, or is not signed as
    /// required): the failed attempt, skipped by later reloads until it changes, and a
    /// `rejected` line in the history.
    pub(super) fn rejected(
        &mut self,
        c: crate::source::Candidate,
        trigger: &'static str,
        from: Option<String>,
        took: Duration,
        now: SystemTime,
    ) {
        let errors = serde_json::Value::Array(
            c.diagnostics
                .to_json_with_snippets_first(&c.files, STATUS_ERRORS),
        );
        let errors_total = c.diagnostics.len();
        self.failed = Some(c.version_id.clone());
        self.record(ReloadRecord {
            at: rfc3339(now),
            trigger,
            from,
            to: Some(c.version_id.clone()),
            duration_ms: millis(took),
            result: "rejected",
            errors: c.diagnostics.error_count(),
            message: first_error(&errors),
        });
        self.attempted = Some(Attempted {
            sha: Some(c.version_id),
            ok: false,
            trigger,
            at: rfc3339(now),
            errors,
            errors_total,
            reason: c.refused,
            signer: c.signer,
        });
    }

    /// A reload found the applied version again after an attempt at another one (a broken
    /// edit of a directory reverted, a branch reset to the served commit): nothing is compiled,
    /// and that version, served, is the last attempt. The failure recorded before no longer
    /// stands, so `/status`, `rustygate status` and `rustygate_config_last_reload_successful`
    /// agree; the failed version, should it come back, is compiled again.
    pub(super) fn back_to_applied(&mut self, found: &str, trigger: &'static str, now: SystemTime) {
        let Some(applied) = self.applied.as_ref().filter(|a| a.sha == found) else {
            return;
        };
        if self.attempted.as_ref().and_then(|a| a.sha.as_deref()) == Some(found) {
            return;
        }
        self.attempted = Some(Attempted::served(
            found,
            trigger,
            now,
            applied.signer.clone(),
        ));
        self.failed = None;
    }

    /// Whether `sha` is the version being served or the last one tried (successful or not).
    /// A push for such a commit cannot change what a reload would do, so the webhook endpoints
    /// answer it without queueing one, whatever its delivery id.
    pub fn seen(&self, sha: &str) -> Option<&'static str> {
        if self.applied.as_ref().is_some_and(|a| a.sha == sha) {
            return Some("commit already applied");
        }
        let attempted = self.attempted.as_ref().and_then(|a| a.sha.as_deref());
        if attempted == Some(sha) || self.failed.as_deref() == Some(sha) {
            return Some("commit already attempted");
        }
        None
    }

    /// The last [`RELOAD_HISTORY`] reloads, oldest first.
    pub fn history(&self) -> &VecDeque<ReloadRecord> {
        &self.history
    }

    pub(super) fn record(&mut self, r: ReloadRecord) {
        if self.history.len() >= RELOAD_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(r);
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first line of a failed reload's first error.
fn first_error(errors: &serde_json::Value) -> Option<String> {
    let e = errors.get(0)?;
    let message = e.get("message")?.as_str()?;
    let line = message.lines().next().unwrap_or("");
    Some(
        match (e.get("file").and_then(|f| f.as_str()), e.get("line")) {
            (Some(file), Some(l)) => format!("{file}:{l}: {line}"),
            _ => line.to_owned(),
        },
    )
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(super) fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn applied(s: &crate::snapshot::Snapshot) -> Applied {
    let commit = s.version.commit.as_ref();
    Applied {
        sha: s.version.id.clone(),
        reference: s.version.reference.clone(),
        subject: commit.map(|c| c.subject.clone()),
        author: commit.map(|c| c.author.clone()),
        committed_at: commit.map(|c| rfc3339(c.committed_at)),
        loaded_at: rfc3339(s.version.loaded_at),
        routes: s.routes.len(),
        upstreams: s.upstreams.len(),
        signer: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_history_keeps_the_last_fifty_oldest_first() {
        let mut s = ReloadStatus::default();
        for i in 0..RELOAD_HISTORY + 10 {
            s.record(ReloadRecord {
                at: String::new(),
                trigger: "poll",
                from: None,
                to: Some(format!("v{i}")),
                duration_ms: 1,
                result: "applied",
                errors: 0,
                message: None,
            });
        }
        assert_eq!(s.history().len(), RELOAD_HISTORY);
        assert_eq!(s.history()[0].to.as_deref(), Some("v10"));
        assert_eq!(s.history()[RELOAD_HISTORY - 1].to.as_deref(), Some("v59"));
        assert_eq!(
            first_error(
                &serde_json::json!([{"message": "unknown upstream `a`\nmore", "file": "routes/a.toml", "line": 4}])
            ),
            Some("routes/a.toml:4: unknown upstream `a`".to_owned())
        );
    }
}
