//! Start-up loading: the first load of a gateway and what it falls back on when the branch
//! head cannot be served as it is. A head that does not descend from the commit served before
//! the restart is held back, a fetch that does not finish in time serves the cached mirror, a
//! ref the mirror cannot resolve or a head that is rejected serves the commit served before.
//! Reloads of a running gateway go through [`super::Source::load`] alone.

use super::git::{self, GitError, Mirror};
use super::{GitSpec, Loaded, Source, SourceError, SourceSpec};
use crate::compile::CompileOptions;

impl Source {
    /// The first load of a gateway. Like a forced [`Source::load`], except that for a git
    /// source without `--allow-rewrites` the head must descend from the commit this cache dir
    /// served before the restart, as it must for a running gateway: a force-push held back
    /// before the restart is held back after it, and that commit is served instead
    /// ([`Candidate::held`](super::Candidate::held) says why) until a forced reload.
    pub fn load_first(&mut self, opts: &CompileOptions) -> Result<Loaded, SourceError> {
        let SourceSpec::Git(g) = self.spec.clone() else {
            return self.load(None, None, true, opts);
        };
        let served = self.served_to_keep(&g)?;
        let must = served.map(|o| o.to_string());
        match self.load_git(&g, |_| false, None, must.as_deref(), opts) {
            Err(SourceError::Git(e @ GitError::NonFastForward { .. })) => match served {
                Some(served) => self.held_back(&g, served, e.to_string(), None, opts),
                None => Err(SourceError::Git(e)),
            },
            r => r,
        }
    }

    /// The commit recorded as served in this cache dir, when a new head must descend from it at
    /// start-up: not with `--allow-rewrites`, nor when the mirror no longer holds it.
    fn served_to_keep(&mut self, g: &GitSpec) -> Result<Option<git2::Oid>, SourceError> {
        if g.allow_rewrites {
            return Ok(None);
        }
        let Some(served) = self.recorded_served(g) else {
            return Ok(None);
        };
        if self.mirror.is_none() {
            self.mirror = Some(Mirror::open(&g.cache_dir, &g.url)?);
        }
        Ok(self
            .mirror
            .as_ref()
            .filter(|m| m.repo().find_commit(served).is_ok())
            .map(|_| served))
    }

    /// The served commit `served` again, as the candidate of a start-up whose head is held
    /// back for `why`.
    fn held_back(
        &mut self,
        g: &GitSpec,
        served: git2::Oid,
        why: String,
        stale: Option<String>,
        opts: &CompileOptions,
    ) -> Result<Loaded, SourceError> {
        let loaded = self.candidate(g, served, Some(served), stale, |_| false, opts)?;
        Ok(match loaded {
            Loaded::Candidate(mut c) => {
                c.held = Some(why);
                Loaded::Candidate(c)
            }
            other => other,
        })
    }

    /// The first version from the cached mirror alone, without fetching: start-up when the
    /// fetch did not finish in time (`why`). Without a commit for the ref in the mirror, the
    /// commit served before (see `served_fallback`); `Err` when there is neither.
    pub fn load_cached(&mut self, why: &str, opts: &CompileOptions) -> Result<Loaded, SourceError> {
        let SourceSpec::Git(g) = self.spec.clone() else {
            return Err(SourceError::Stuck(why.to_owned()));
        };
        if self.mirror.is_none() {
            self.mirror = Some(Mirror::open(&g.cache_dir, &g.url)?);
        }
        let resolved = self
            .mirror
            .as_ref()
            .map(|m| m.resolve(&g.branch, g.pin.as_deref()));
        let (oid, why) = match resolved {
            Some(Ok(oid)) => (oid, why.to_owned()),
            Some(Err(unresolved)) => self
                .served_fallback(&g, &unresolved, Some(why))
                .ok_or_else(|| SourceError::Stuck(why.to_owned()))?,
            None => return Err(SourceError::Stuck(why.to_owned())),
        };
        // A rewritten head fetched (and held back) by an earlier run stays held back.
        if let Some(served) = self.served_to_keep(&g)?
            && oid != served
            && !self
                .mirror
                .as_ref()
                .is_some_and(|m| m.repo().graph_descendant_of(oid, served).unwrap_or(false))
        {
            let e = GitError::NonFastForward {
                served: served.to_string(),
                head: oid.to_string(),
            };
            return self.held_back(&g, served, e.to_string(), Some(why), opts);
        }
        let since = self.recorded_served(&g);
        self.candidate(&g, oid, since, Some(why), |_| false, opts)
    }

    /// At start-up, when the mirror cannot resolve the ref to serve (`unresolved`; the fetch
    /// failed with `fetch_error`, if it did): the commit this cache dir served before, from the
    /// mirror's [`git::SERVED_REF`] (or the `served` file), with why a stale commit is served.
    /// `None` when the mirror holds none.
    pub(super) fn served_fallback(
        &self,
        g: &GitSpec,
        unresolved: &GitError,
        fetch_error: Option<&str>,
    ) -> Option<(git2::Oid, String)> {
        let repo = self.mirror.as_ref()?.repo();
        let served = repo
            .refname_to_id(git::SERVED_REF)
            .ok()
            .or_else(|| self.recorded_served(g))
            .filter(|oid| repo.find_commit(*oid).is_ok())?;
        let wanted = g.pin.as_deref().unwrap_or(&g.branch);
        let fetch = fetch_error.map_or(String::new(), |e| format!("; the fetch failed: {e}"));
        Some((
            served,
            format!(
                "the mirror has no commit for `{wanted}` ({unresolved}){fetch}; serving the \
                 commit served before the restart"
            ),
        ))
    }

    /// The commit this cache dir last served, compiled again: start-up when the head does not
    /// compile (or is refused), so that a restart while the branch is broken serves what the
    /// gateway served before rather than nothing. `None` for a directory source, or when no
    /// commit was recorded or it is `head` itself.
    pub fn load_served(
        &mut self,
        head: &str,
        opts: &CompileOptions,
    ) -> Result<Option<Loaded>, SourceError> {
        let SourceSpec::Git(g) = self.spec.clone() else {
            return Ok(None);
        };
        let Some(served) = self.recorded_served(&g).filter(|s| s.to_string() != head) else {
            return Ok(None);
        };
        if self.mirror.is_none() {
            self.mirror = Some(Mirror::open(&g.cache_dir, &g.url)?);
        }
        // Signed as required when it was served; checked again, alone.
        self.candidate(&g, served, Some(served), None, |_| false, opts)
            .map(Some)
    }
}
