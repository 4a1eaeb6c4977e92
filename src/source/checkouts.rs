//! The per-commit checkouts in the cache dir and the record of the one served: exporting and
//! compiling one commit of the mirror (its signatures checked first, with `--require-signed`),
//! which exports this process made itself and may compile, removing those not served, and the
//! `served` file that names the commit a restart starts from. Fetching and choosing the commit
//! are the caller's ([`super::Source::load`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::git::{self, CommitInfo, GitError};
use super::{Candidate, GitSpec, Loaded, Source, SourceError, SourceSpec, signing};
use crate::compile::CompileOptions;
use crate::config::{Diagnostics, SourceFiles};

/// The file in the cache dir naming the commit last served.
const SERVED_FILE: &str = "served";

impl Source {
    /// The commit this cache dir last served (see [`Source::clean_checkouts`]), for
    /// `--require-signed all` after a restart.
    pub(super) fn recorded_served(&self, g: &GitSpec) -> Option<git2::Oid> {
        let text = std::fs::read_to_string(g.cache_dir.join(SERVED_FILE)).ok()?;
        git2::Oid::from_str(text.trim()).ok()
    }

    /// Exports and compiles commit `oid` of the mirror, unless `skip` says it is known. With
    /// `--require-signed`, checks the signatures first (of the commits since `since`, the last
    /// served one, in `all` mode): a refused commit is a candidate without a snapshot, handled
    /// like one that does not compile.
    pub(super) fn candidate(
        &mut self,
        g: &GitSpec,
        oid: git2::Oid,
        since: Option<git2::Oid>,
        stale: Option<String>,
        skip: impl Fn(&str) -> bool,
        opts: &CompileOptions,
    ) -> Result<Loaded, SourceError> {
        let Some(mirror) = self.mirror.as_ref() else {
            return Err(SourceError::Cancelled);
        };
        let sha = oid.to_string();
        if skip(&sha) {
            return Ok(Loaded::Unchanged { version_id: sha });
        }
        let commit = mirror.repo().find_commit(oid).map_err(GitError::from)?;
        let info = CommitInfo::of(&commit);
        let mut signer = None;
        if let Some(policy) = &g.signing {
            match signing::check(mirror.repo(), oid, since, policy)? {
                Ok(principal) => signer = Some(principal),
                Err(refusal) => {
                    let mut diagnostics = Diagnostics::default();
                    diagnostics.push(refusal.to_diagnostic());
                    return Ok(Loaded::Candidate(Box::new(Candidate {
                        version_id: sha,
                        commit: Some(info),
                        snapshot: None,
                        diagnostics,
                        files: SourceFiles::default(),
                        stale,
                        signer: refusal.principal,
                        refused: Some(refusal.reason.code()),
                        held: None,
                    })));
                }
            }
        }
        let checkouts = g.cache_dir.join("checkouts");
        let dest = checkouts.join(&sha);
        let partial = checkouts.join(format!(".{sha}.partial"));
        // Only an export this process made is compiled: one found on disk (an earlier run's,
        // or planted by whoever could write the cache dir) is exported again.
        let ours = exported_checkouts().contains(&dest)
            && std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir());
        if !ours {
            remove_any(&dest);
            let _ = std::fs::remove_dir_all(&partial);
            let stand_ins =
                match git::export_config_tree(mirror.repo(), oid, g.subdir.as_deref(), &partial) {
                    Ok(stand_ins) => stand_ins,
                    Err(e) => {
                        // A half-written export is never used; it would only fill the cache.
                        let _ = std::fs::remove_dir_all(&partial);
                        let Some((diagnostics, files)) = export_refusal(&e) else {
                            return Err(e.into());
                        };
                        return Ok(Loaded::Candidate(Box::new(Candidate {
                            version_id: sha,
                            commit: Some(info),
                            snapshot: None,
                            diagnostics,
                            files,
                            stale,
                            signer,
                            refused: None,
                            held: None,
                        })));
                    }
                };
            std::fs::rename(&partial, &dest).map_err(|source| GitError::Io {
                path: dest.clone(),
                source,
            })?;
            let root = std::fs::canonicalize(&dest).map_err(|source| GitError::Io {
                path: dest.clone(),
                source,
            })?;
            crate::config::deferred::register(root.clone(), Arc::new(stand_ins.at(root)));
            exported_checkouts().insert(dest.clone());
        }
        let compiled = crate::compile::compile_dir(
            &dest,
            &CompileOptions {
                version_id: Some(sha.clone()),
                ..opts.clone()
            },
        )?;
        Ok(Loaded::Candidate(Box::new(Candidate {
            version_id: sha,
            commit: Some(info),
            snapshot: compiled.snapshot,
            diagnostics: compiled.diagnostics,
            files: compiled.files,
            stale,
            signer,
            refused: None,
            held: None,
        })))
    }

    /// Removes the export of `sha`, a version that was not served (rejected or held back): only
    /// the served export is kept, so rejected commits cannot pile up on the cache volume. The
    /// served one is never removed.
    pub fn discard_checkout(&self, sha: &str, served: Option<&str>) {
        let SourceSpec::Git(g) = &self.spec else {
            return;
        };
        if served == Some(sha) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return;
        }
        let checkouts = g.cache_dir.join("checkouts");
        remove_checkout(&checkouts.join(sha));
        let _ = std::fs::remove_dir_all(checkouts.join(format!(".{sha}.partial")));
    }

    /// Removes exported checkouts other than `keep`, the commit now served, and records it as
    /// served in the cache dir (and in the mirror, so its objects outlive a branch rewrite).
    pub fn clean_checkouts(&self, keep: &str) {
        let SourceSpec::Git(g) = &self.spec else {
            return;
        };
        if let Err(e) = std::fs::write(g.cache_dir.join(SERVED_FILE), format!("{keep}\n")) {
            tracing::warn!(error = %e, "cannot record the served commit in the cache dir");
        }
        if let Some(m) = &self.mirror
            && let Err(e) = m.mark_served(keep)
        {
            tracing::warn!(error = %e, "cannot mark the served commit in the git mirror");
        }
        let Ok(entries) = std::fs::read_dir(g.cache_dir.join("checkouts")) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy() != keep {
                remove_checkout(&e.path());
            }
        }
    }
}

/// The checkouts this process exported, by path.
fn exported_checkouts() -> std::sync::MutexGuard<'static, std::collections::HashSet<PathBuf>> {
    static EXPORTED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
        std::sync::LazyLock::new(Default::default);
    EXPORTED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the export at `path`, and what is registered of its files not yet read.
fn remove_checkout(path: &Path) {
    if let Ok(root) = std::fs::canonicalize(path) {
        crate::config::deferred::forget(&root);
    }
    let _ = std::fs::remove_dir_all(path);
}

/// Removes `path` whatever it is (a symlink itself, not what it points to).
fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// A commit whose tree cannot be exported as it stands (a name that is not UTF-8 or that climbs
/// out, a tree over the caps, no `--subdir` directory): the commit itself is rejected, with a
/// diagnostic located at the offending path when there is one, like a commit that does not
/// compile. `None` for errors of the machine (I/O, git), which stay reload failures.
fn export_refusal(e: &GitError) -> Option<(Diagnostics, SourceFiles)> {
    let (code, path, label) = match e {
        GitError::NameNotUtf8(p) => ("invalid-file-name", Some(p), "file name not UTF-8"),
        GitError::UnsafePath(p) => ("unsafe-path", Some(p), "unsafe path"),
        GitError::TreeTooLarge(_) => ("tree-too-large", None, ""),
        GitError::NoSubdir(_) | GitError::SubdirNotDir(..) => ("missing-subdir", None, ""),
        _ => return None,
    };
    let mut files = SourceFiles::default();
    let mut diagnostics = Diagnostics::default();
    let mut d = crate::config::Diagnostic::error(code, e.to_string());
    if let Some(path) = path {
        let id = files.add(path.clone(), String::new());
        d = d.at(id, 0..0, label);
    }
    diagnostics.push(d);
    Some((diagnostics, files))
}
