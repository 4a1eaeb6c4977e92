//! Where configs come from, and turning "something may have changed" into a compiled snapshot.
//!
//! ```text
//! Source::Dir  (plain directory)            ─┐
//! Source::Git  (bare mirror ──► export/SHA) ─┴─► Source::load ──► compile ──► Candidate
//! ```
//! `load` runs on its own thread with a deadline (git and the compiler do I/O and CPU work;
//! see [`reload::load_off_loop`]) and decides
//! whether there is anything new: a version that is already applied, or that already failed,
//! is not compiled again unless the reload is forced.

pub mod fetch;
pub mod git;
pub mod known_hosts;
pub mod reload;
pub mod signing;

mod cache_dir;
mod checkouts;
mod spec;
mod startup;

use cache_dir::remove_interrupted_leftovers;
pub use cache_dir::{CacheLock, lock_cache_dir};
pub use spec::{GitSpec, SourceSpec, redact_url};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::compile::CompileOptions;
use crate::config::{Diagnostics, SourceFiles, load_dir};
use crate::snapshot::Snapshot;
use git::{CommitInfo, GitError, Mirror};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("`{0}` is neither a directory nor a git URL")]
    NotFound(String),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Load(#[from] crate::config::LoadError),
    #[error("the reload was abandoned: the gateway is shutting down")]
    Cancelled,
    #[error("{0}")]
    Stuck(String),
    #[error("{0}; not serving any new commit until it is fixed")]
    Signers(#[from] signing::SignersError),
    #[error(
        "the cache dir {dir} is in use by another rustygate{holder}; give each gateway its own \
         --cache-dir"
    )]
    CacheInUse { dir: String, holder: String },
    #[error(
        "refusing the cache dir {dir}: {problem}; another local user could plant a mirror or a \
         checkout in it that would be served. Remove it, or give a --cache-dir of your own"
    )]
    UnsafeCacheDir { dir: String, problem: String },
}

/// A compiled (or failed) candidate config.
pub struct Candidate {
    pub version_id: String,
    pub commit: Option<CommitInfo>,
    pub snapshot: Option<Snapshot>,
    pub diagnostics: Diagnostics,
    pub files: SourceFiles,
    /// Why the remote could not be fetched, when this first version came from the cached
    /// mirror instead (start-up with the git host down).
    pub stale: Option<String>,
    /// With `--require-signed`: the allowed-signers principals of the commit's signer (also of
    /// a refused commit, when its key is listed).
    pub signer: Option<String>,
    /// With `--require-signed`: why the commit is not served (`unsigned-commit`,
    /// `bad-signature`); its diagnostics say the same.
    pub refused: Option<&'static str>,
    /// At start-up: the branch head does not descend from the commit this cache dir served
    /// before (a force-push the gateway was holding back), so this candidate is that commit
    /// and this says why (the `non-fast-forward` error of a running gateway).
    pub held: Option<String>,
}

/// What a load found.
pub enum Loaded {
    /// The version that would be loaded is the one already applied (or already failed, for an
    /// unforced reload).
    Unchanged {
        version_id: String,
    },
    Candidate(Box<Candidate>),
}

/// A config source with the state needed to fetch it again.
pub struct Source {
    spec: SourceSpec,
    mirror: Option<Mirror>,
    cancel: Arc<AtomicBool>,
}

impl Source {
    pub fn new(spec: SourceSpec) -> Source {
        Source {
            spec,
            mirror: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A source that answers to an existing cancel flag: the one that replaces a load that was
    /// abandoned at its deadline keeps obeying shutdown.
    pub fn with_cancel(spec: SourceSpec, cancel: Arc<AtomicBool>) -> Source {
        Source {
            spec,
            mirror: None,
            cancel,
        }
    }

    pub fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    /// Set to abandon a reload in progress (fetches stop at their next progress report).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Fetches (for git) and compiles, unless the version is `applied` or, without `force`, is
    /// `failed`. Blocking: call on a blocking thread.
    pub fn load(
        &mut self,
        applied: Option<&str>,
        failed: Option<&str>,
        force: bool,
        opts: &CompileOptions,
    ) -> Result<Loaded, SourceError> {
        // A forced reload always compiles again: a secret may have been rotated under an
        // unchanged commit.
        let skip = |id: &str| !force && (applied == Some(id) || failed == Some(id));
        match self.spec.clone() {
            SourceSpec::Dir(dir) => {
                // A directory's version is everything the compile reads (policies,
                // certificates and secrets too), so it is known only once compiled.
                let raw = load_dir(&dir)?;
                let compiled = crate::compile::compile(
                    raw,
                    &CompileOptions {
                        version_id: None,
                        ..opts.clone()
                    },
                );
                let id = compiled.inputs_id.clone();
                if skip(&id) {
                    return Ok(Loaded::Unchanged { version_id: id });
                }
                Ok(Loaded::Candidate(Box::new(Candidate {
                    version_id: id,
                    commit: None,
                    snapshot: compiled.snapshot,
                    diagnostics: compiled.diagnostics,
                    files: compiled.files,
                    stale: None,
                    signer: None,
                    refused: None,
                    held: None,
                })))
            }
            SourceSpec::Git(g) => {
                // A forced reload may serve a rewritten history; otherwise the served commit
                // must be an ancestor of the new one.
                let served = applied.filter(|_| !force && !g.allow_rewrites);
                self.load_git(&g, skip, applied, served, opts)
            }
        }
    }

    fn load_git(
        &mut self,
        g: &GitSpec,
        skip: impl Fn(&str) -> bool,
        applied: Option<&str>,
        must_descend_from: Option<&str>,
        opts: &CompileOptions,
    ) -> Result<Loaded, SourceError> {
        let first = applied.is_none();
        if self.mirror.is_none() {
            self.mirror = Some(Mirror::open(&g.cache_dir, &g.url)?);
        }
        let fetched = match &g.fetch {
            fetch::FetchMode::InProcess => {
                let Some(mirror) = self.mirror.as_ref() else {
                    return Err(SourceError::Cancelled);
                };
                let fetched = mirror.fetch(&g.credentials, &self.cancel, g.fetched_branch());
                if fetched.is_ok()
                    && let Err(e) = mirror.maybe_repack()
                {
                    tracing::warn!(error = %e, "repacking the git mirror failed; it is tried again after the next fetch");
                }
                fetched
            }
            fetch::FetchMode::Child {
                exe,
                deadline,
                ssl_cert_file,
            } => {
                let fetched = fetch::fetch_in_child(
                    exe,
                    &g.cache_dir,
                    &g.url,
                    g.fetched_branch(),
                    *deadline,
                    ssl_cert_file.as_deref(),
                    &self.cancel,
                );
                // The child may have repacked: a fresh handle sees the mirror's packs as they
                // are now, not the files it had open.
                self.mirror = Some(Mirror::open(&g.cache_dir, &g.url)?);
                fetched
            }
        };
        if self.cancel.load(Ordering::Relaxed) {
            return Err(SourceError::Cancelled);
        }
        let Some(mirror) = self.mirror.as_ref() else {
            return Err(SourceError::Cancelled);
        };
        // Nothing served yet and the remote unreachable: the commit the cached mirror holds
        // for the ref beats not starting at all; so does, when the mirror cannot resolve the
        // ref, the commit this cache dir served before. Later reloads only ever serve fetched
        // commits.
        let (oid, stale) = match (fetched, mirror.resolve(&g.branch, g.pin.as_deref())) {
            (Ok(()), Ok(oid)) => (oid, None),
            (Err(e), Ok(oid)) if first => (oid, Some(e.to_string())),
            (fetched, Err(unresolved)) if first => {
                let fetch_error = fetched.as_ref().err().map(|e| e.to_string());
                match self.served_fallback(g, &unresolved, fetch_error.as_deref()) {
                    Some((served, why)) => (served, Some(why)),
                    None => return Err(fetched.err().unwrap_or(unresolved).into()),
                }
            }
            (Err(e), _) | (Ok(()), Err(e)) => return Err(e.into()),
        };
        let Some(mirror) = self.mirror.as_ref() else {
            return Err(SourceError::Cancelled);
        };
        if let Some(served) = must_descend_from.and_then(|s| git2::Oid::from_str(s).ok())
            && oid != served
            && !mirror
                .repo()
                .graph_descendant_of(oid, served)
                .unwrap_or(false)
        {
            return Err(GitError::NonFastForward {
                served: served.to_string(),
                head: oid.to_string(),
            }
            .into());
        }
        let since = applied
            .and_then(|s| git2::Oid::from_str(s).ok())
            .or_else(|| self.recorded_served(g));
        self.candidate(g, oid, since, stale, skip, opts)
    }

    /// The ref followed, for `/status`.
    pub fn reference(&self) -> Option<String> {
        match &self.spec {
            SourceSpec::Dir(_) => None,
            SourceSpec::Git(g) => Some(g.pin.clone().unwrap_or_else(|| g.branch.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(loaded: &Loaded) -> (&'static str, String) {
        match loaded {
            Loaded::Unchanged { version_id } => ("unchanged", version_id.clone()),
            Loaded::Candidate(c) => ("candidate", c.version_id.clone()),
        }
    }

    /// A directory's version covers the secrets it resolves: a rotated secret file is a new
    /// version; the same inputs are the same version, skipped unless forced.
    #[test]
    fn a_rotated_secret_is_a_new_directory_version_and_force_always_compiles() {
        let secrets = tempfile::tempdir().unwrap();
        let secret = secrets.path().join("api-key");
        std::fs::write(&secret, "one\n").unwrap();
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(repo.path().join("routes")).unwrap();
        std::fs::write(
            repo.path().join("routes/main.toml"),
            format!(
                "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200 }}\n\
                 request_headers = {{ set = {{ \"x-key\" = {{ file = \"{}\" }} }} }}\n",
                secret.display()
            ),
        )
        .unwrap();
        let opts = CompileOptions {
            resolve_secrets: true,
            secret_roots: vec![secrets.path().to_path_buf()],
            ..CompileOptions::default()
        };
        let mut source = Source::new(SourceSpec::Dir(repo.path().to_path_buf()));
        let first = source.load(None, None, false, &opts).unwrap();
        let (kind, id1) = id_of(&first);
        assert_eq!(kind, "candidate");
        if let Loaded::Candidate(c) = &first {
            assert!(c.snapshot.is_some(), "{:?}", c.diagnostics);
        }
        let again = source.load(Some(&id1), None, false, &opts).unwrap();
        assert_eq!(id_of(&again), ("unchanged", id1.clone()));
        let forced = source.load(Some(&id1), None, true, &opts).unwrap();
        assert_eq!(id_of(&forced), ("candidate", id1.clone()));

        std::fs::write(&secret, "two\n").unwrap();
        let rotated = source.load(Some(&id1), None, false, &opts).unwrap();
        let (kind, id2) = id_of(&rotated);
        assert_eq!(kind, "candidate");
        assert_ne!(id1, id2);
    }
}
