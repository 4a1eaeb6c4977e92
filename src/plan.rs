//! `rustygate plan`: what merging a change would do to the gateway, route by route.
//!
//! ```text
//! git working copy ──► resolve base/head ──► export_tree (each into a temp dir)
//!   ──► config::load_dir ──► compile::compile (the server's compiler) ──► facts ──► diff
//!   ──► Markdown for a PR comment, or JSON
//! ```
//! Both commits are compiled by the same `compile()` the server runs, so a plan that says "head
//! compiles cleanly" is the server's own answer. Facts are taken from the compiled snapshot where
//! it keeps them (upstream, rewrite, effective timeout and body limit, targets) and from the raw
//! config for what the router folds away (host, path, methods) and for header rules, whose
//! secret references are shown by name, never resolved: a plan is posted where anyone can read it.
//!
//! This module only reads: it never touches the working tree, the index or any ref.

mod facts;
mod render;
mod safety;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use git2::Repository;
use serde::Serialize;

use crate::compile::{CompileOptions, Compiled, compile};
use crate::config::{Diagnostics, LoadError, Severity, SourceFiles, load_dir};
use crate::snapshot::Snapshot;
use crate::source::git::{self, CommitInfo, GitError};
pub use facts::{Changed, Changes, Diff, FieldChange, RouteFacts, UpstreamFacts};
use facts::{
    RawRouteFacts, diff_by_name, diff_upstream, field_changes, gateway_fields, raw_route_facts,
    route_facts, upstream_facts,
};
/// The words `plan` uses for a route's rate limit and CORS and for an upstream, which the admin
/// API (`/api/v1/routes`, `/api/v1/upstreams`) shows too.
pub(crate) use facts::{cors as describe_cors, one_upstream, rate_limit as describe_rate_limit};
pub use safety::SafetyFlag;
use safety::safety_flags;

/// What to compare.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// A directory inside a git working copy: the config repo, possibly a subdirectory of it.
    pub dir: PathBuf,
    /// The commit the change starts from (branch, tag, SHA or any rev git understands).
    pub base: String,
    /// The commit the change leads to; the `HEAD` commit (not the working tree) by default.
    pub head: String,
    /// Resolve secret references while compiling (`--no-env` turns this off for CI).
    pub resolve_secrets: bool,
}

/// Why no plan could be made at all. Each is a usage or environment problem (exit 2); a head
/// that does not compile is not an error here but a [`Plan`] whose verdict says so.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path} is not inside a git working copy: {source}")]
    NotARepo {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("{0} is a bare repository; run plan inside a working copy")]
    Bare(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir} is not inside the working copy at {workdir}")]
    OutsideWorkdir { dir: PathBuf, workdir: PathBuf },
    #[error("{flag} `{rev}` names no commit in {repo}; fetch it first, or check the spelling")]
    UnknownRev {
        flag: &'static str,
        rev: String,
        repo: PathBuf,
    },
    #[error("the config directory `{dir}` does not exist at head commit {sha}")]
    NoConfigAtHead { dir: String, sha: String },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl From<git2::Error> for PlanError {
    fn from(e: git2::Error) -> Self {
        PlanError::Git(GitError::Git(e))
    }
}

/// One side of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub sha: String,
    pub short: String,
    pub subject: String,
    pub compiles: bool,
    pub errors: usize,
    pub warnings: usize,
    /// Why this side's routes are not what they seem (base that does not compile, no config dir).
    pub note: Option<String>,
}

/// A diagnostic, flattened and owned.
#[derive(Debug, Clone, Serialize)]
pub struct PlanDiagnostic {
    pub severity: Severity,
    pub code: String,
    pub message: String,
    /// Relative to the config repo.
    pub file: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl PlanDiagnostic {
    fn location(&self) -> Option<String> {
        let file = self.file.as_deref()?;
        Some(match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
            _ => file.to_owned(),
        })
    }
}

/// Everything `rustygate plan` reports. Render with [`Plan::to_markdown`] or serialise as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub base: Side,
    pub head: Side,
    /// The config repo's directory inside the git repository (`.` for its root).
    pub config_dir: String,
    /// `None` when head does not compile.
    pub diff: Option<Diff>,
    /// Warnings in head whose code and message base did not have.
    pub new_warnings: Vec<PlanDiagnostic>,
    /// Every head diagnostic, when head does not compile.
    pub head_diagnostics: Vec<PlanDiagnostic>,
    /// Head's diagnostics rendered like rustc, when head does not compile.
    pub head_diagnostics_rendered: Option<String>,
    pub verdict: String,
}

impl Plan {
    /// Whether merging head would give the gateways a config they accept.
    pub fn head_compiles(&self) -> bool {
        self.head.compiles
    }

    /// Whether head compiles and serves differently from base (`plan` exits 3).
    pub fn has_changes(&self) -> bool {
        self.diff.as_ref().is_some_and(|d| !d.is_empty())
    }
}

/// Compares the config at `base` and `head`. `Ok` whether or not head compiles.
pub fn plan(opts: &PlanOptions) -> Result<Plan, PlanError> {
    let repo = Repository::discover(&opts.dir).map_err(|source| PlanError::NotARepo {
        path: opts.dir.clone(),
        source,
    })?;
    let workdir = repo
        .workdir()
        .ok_or_else(|| PlanError::Bare(repo.path().to_path_buf()))?;
    let subdir = relative_dir(&opts.dir, workdir)?;
    let config_dir = if subdir.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        subdir.to_string_lossy().into_owned()
    };
    let resolve = |flag, rev: &str| {
        git::resolve(&repo, rev).map_err(|e| match e {
            GitError::UnknownRev(rev) => PlanError::UnknownRev {
                flag,
                rev,
                repo: workdir.to_path_buf(),
            },
            other => PlanError::Git(other),
        })
    };
    let base_oid = resolve("--base", &opts.base)?;
    let head_oid = resolve("--head", &opts.head)?;

    let tmp = TempDir::new()?;
    let base = side(&repo, base_oid, &subdir, &tmp.0.join("base"), opts)?;
    let head = side(&repo, head_oid, &subdir, &tmp.0.join("head"), opts)?;
    let Some(head) = head else {
        return Err(PlanError::NoConfigAtHead {
            dir: config_dir,
            sha: head_oid.to_string(),
        });
    };
    let base = base.unwrap_or_else(|| CommitConfig::missing(&repo, base_oid, &config_dir));
    Ok(assemble(base, head, config_dir))
}

/// `dir` relative to the working copy root (empty for the root itself).
fn relative_dir(dir: &Path, workdir: &Path) -> Result<PathBuf, PlanError> {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).map_err(|source| PlanError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let (dir_abs, work_abs) = (canon(dir)?, canon(workdir)?);
    dir_abs
        .strip_prefix(&work_abs)
        .map(Path::to_path_buf)
        .map_err(|_| PlanError::OutsideWorkdir {
            dir: dir_abs.clone(),
            workdir: work_abs.clone(),
        })
}

/// One commit, exported and compiled.
struct CommitConfig {
    side: Side,
    compiled: Option<Compiled>,
    raw_routes: HashMap<String, RawRouteFacts>,
    /// The exported config directory.
    root: PathBuf,
}

impl CommitConfig {
    /// A base without the config directory: an empty config, so every head route is new.
    fn missing(repo: &Repository, oid: git2::Oid, dir: &str) -> CommitConfig {
        let info = repo.find_commit(oid).ok().map(|c| CommitInfo::of(&c));
        let sha = oid.to_string();
        CommitConfig {
            side: Side {
                short: short(&sha),
                subject: info.map(|i| i.subject).unwrap_or_default(),
                sha,
                compiles: true,
                errors: 0,
                warnings: 0,
                note: Some(format!(
                    "base has no `{dir}` directory: every route in head is listed as added"
                )),
            },
            compiled: None,
            raw_routes: HashMap::new(),
            root: PathBuf::new(),
        }
    }

    fn snapshot(&self) -> Option<&Snapshot> {
        self.compiled.as_ref().and_then(|c| c.snapshot.as_ref())
    }

    fn diagnostics(&self) -> Option<(&Diagnostics, &SourceFiles)> {
        self.compiled.as_ref().map(|c| (&c.diagnostics, &c.files))
    }
}

/// Exports and compiles one commit; `None` when the config directory does not exist there.
fn side(
    repo: &Repository,
    oid: git2::Oid,
    subdir: &Path,
    dest: &Path,
    opts: &PlanOptions,
) -> Result<Option<CommitConfig>, PlanError> {
    let sub = (!subdir.as_os_str().is_empty()).then_some(subdir);
    match git::export_tree(repo, oid, sub, dest) {
        Ok(()) => {}
        Err(GitError::NoSubdir(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let info = CommitInfo::of(&repo.find_commit(oid)?);
    let raw = load_dir(dest)?;
    let raw_routes = raw_route_facts(&raw.routes);
    let compiled = compile(
        raw,
        &CompileOptions {
            resolve_secrets: opts.resolve_secrets,
            version_id: Some(info.sha.clone()),
            source: format!("{}@{}", opts.dir.display(), info.sha),
            secret_roots: Vec::new(),
        },
    );
    let (errors, warnings) = (
        compiled.diagnostics.error_count(),
        compiled.diagnostics.warning_count(),
    );
    Ok(Some(CommitConfig {
        side: Side {
            short: short(&info.sha),
            sha: info.sha,
            subject: info.subject,
            compiles: compiled.snapshot.is_some(),
            errors,
            warnings,
            note: None,
        },
        compiled: Some(compiled),
        raw_routes,
        root: dest.to_path_buf(),
    }))
}

fn assemble(mut base: CommitConfig, head: CommitConfig, config_dir: String) -> Plan {
    let head_diags = head
        .diagnostics()
        .map(|(d, f)| flatten(d, f))
        .unwrap_or_default();
    let base_warnings: BTreeSet<(String, String)> = base
        .diagnostics()
        .map(|(d, f)| flatten(d, f))
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.severity == Severity::Warning)
        .map(|d| (d.code, d.message))
        .collect();
    let new_warnings: Vec<PlanDiagnostic> = head_diags
        .iter()
        .filter(|d| {
            d.severity == Severity::Warning
                && !base_warnings.contains(&(d.code.clone(), d.message.clone()))
        })
        .cloned()
        .collect();

    let Some(head_snap) = head.snapshot() else {
        let rendered = head.diagnostics().map(|(d, f)| d.render_human(f));
        let verdict = format!(
            "head `{}` does not compile: {}, {}. Gateways would refuse it and keep serving the config they have.",
            head.side.short,
            plural(head.side.errors, "error"),
            plural(head.side.warnings, "warning"),
        );
        return Plan {
            base: base.side,
            head: head.side,
            config_dir,
            diff: None,
            new_warnings,
            head_diagnostics: head_diags,
            head_diagnostics_rendered: rendered,
            verdict,
        };
    };
    if base.compiled.is_some() && base.snapshot().is_none() {
        base.side.note = Some(format!(
            "base `{}` does not compile ({}): every route in head is listed as added",
            base.side.short,
            plural(base.side.errors, "error")
        ));
    }
    let base_routes = base
        .snapshot()
        .map(|s| route_facts(s, &base.raw_routes, &base.root))
        .unwrap_or_default();
    let base_upstreams = base.snapshot().map(upstream_facts).unwrap_or_default();
    let head_routes = route_facts(head_snap, &head.raw_routes, &head.root);
    let head_upstreams = upstream_facts(head_snap);
    let diff = Diff {
        // Against an empty base everything is new: every route is listed as added instead.
        safety: match base.snapshot() {
            Some(_) => safety_flags(&base_routes, &head_routes, &base_upstreams, &head_upstreams),
            None => Vec::new(),
        },
        routes: diff_by_name(&base_routes, &head_routes, |o, n| {
            field_changes(&o.fields(), &n.fields())
        }),
        upstreams: diff_by_name(&base_upstreams, &head_upstreams, diff_upstream),
        gateway: field_changes(
            &base.snapshot().map(gateway_fields).unwrap_or_default(),
            &gateway_fields(head_snap),
        ),
    };
    let verdict = verdict(
        &diff,
        &head.side,
        new_warnings.len(),
        base.side.note.is_some(),
    );
    Plan {
        base: base.side,
        head: head.side,
        config_dir,
        diff: Some(diff),
        new_warnings,
        head_diagnostics: Vec::new(),
        head_diagnostics_rendered: None,
        verdict,
    }
}

fn verdict(diff: &Diff, head: &Side, new_warnings: usize, base_note: bool) -> String {
    let (r, u) = (&diff.routes, &diff.upstreams);
    let mut parts = Vec::new();
    if !diff.safety.is_empty() {
        parts.push(format!(
            "{} to review",
            plural(diff.safety.len(), "safety-relevant change")
        ));
    }
    if diff.is_empty() {
        parts.push("no route, upstream or gateway changes".to_owned());
    } else {
        parts.push(format!(
            "{} changed, {} added, {} removed",
            plural(r.changed.len(), "route"),
            r.added.len(),
            r.removed.len()
        ));
        if !u.is_empty() {
            parts.push(format!(
                "{} changed, {} added, {} removed",
                plural(u.changed.len(), "upstream"),
                u.added.len(),
                u.removed.len()
            ));
        }
        if !diff.gateway.is_empty() {
            parts.push("gateway settings changed".to_owned());
        }
    }
    let health = match (head.warnings, new_warnings) {
        (0, _) => "head compiles cleanly".to_owned(),
        (w, 0) => format!("head compiles with {} (none new)", plural(w, "warning")),
        (w, n) => format!("head compiles with {} ({n} new)", plural(w, "warning")),
    };
    let base = if base_note {
        " (compared against an empty base)"
    } else {
        ""
    };
    format!("{}; {health}{base}.", parts.join("; "))
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn short(sha: &str) -> String {
    sha.chars().take(7).collect()
}

fn flatten(diags: &Diagnostics, files: &SourceFiles) -> Vec<PlanDiagnostic> {
    diags
        .iter()
        .map(|d| {
            let loc = d.primary.as_ref().map(|p| {
                let (line, col) = files.line_col(p.file, p.span.start);
                (files.name(p.file).to_owned(), line, col)
            });
            PlanDiagnostic {
                severity: d.severity,
                code: d.code.to_owned(),
                message: d.message.clone(),
                file: loc.as_ref().map(|l| l.0.clone()),
                line: loc.as_ref().map(|l| l.1),
                column: loc.as_ref().map(|l| l.2),
            }
        })
        .collect()
}

/// A directory under the system temp dir, removed on drop. (`tempfile` is a dev-dependency only.)
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, PlanError> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last = None;
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "rustygate-plan-{}-{nanos:x}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(source) => return Err(PlanError::Io { path, source }),
            }
        }
        Err(PlanError::Io {
            path: base,
            source: last.unwrap_or_else(|| std::io::Error::other("no free temp dir name")),
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_says_when_nothing_changed() {
        let diff = Diff {
            safety: Vec::new(),
            routes: Changes::default(),
            upstreams: Changes::default(),
            gateway: Vec::new(),
        };
        let side = Side {
            sha: "a".repeat(40),
            short: "aaaaaaa".into(),
            subject: String::new(),
            compiles: true,
            errors: 0,
            warnings: 2,
            note: None,
        };
        assert_eq!(
            verdict(&diff, &side, 0, false),
            "no route, upstream or gateway changes; head compiles with 2 warnings (none new)."
        );
    }
}
