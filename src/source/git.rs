//! Git as a config source: a bare mirror in the cache dir, fetched with git2, and one plain
//! directory per commit exported from it (the compiler only ever reads a directory). The
//! gateway's exports write the files the loader lists and fill the others only when the config
//! reads them ([`export_config_tree`]).
//!
//! Credentials come from the process, never from the repo: `RUSTYGATE_GIT_TOKEN` for HTTPS
//! (sent as the password, user `x-access-token` unless the URL names one) and
//! `RUSTYGATE_GIT_SSH_KEY` (a private key file) for SSH, falling back to the SSH agent.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use git2::{FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository};

mod credentials;
mod export;

pub use credentials::Credentials;
use credentials::host_key_check;
pub use export::{
    EXPORT_BYTES_CAP, EXPORT_ENTRIES_CAP, MirrorBlobs, export_config_tree, export_tree,
};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` names no commit in the repository")]
    UnknownRev(String),
    #[error(
        "`{0}` is both a tag and a branch, on different commits; name one in full \
         (`refs/tags/{0}` or `refs/heads/{0}`)"
    )]
    AmbiguousRev(String),
    #[error(
        "non-fast-forward: the new head {head} does not descend from the served commit {served} \
         (history was rewritten); still serving {served}. Force a reload, or start with \
         --allow-rewrites, to serve it"
    )]
    NonFastForward { served: String, head: String },
    #[error("{0}")]
    HostKey(String),
    #[error("subdirectory `{0}` does not exist at this commit")]
    NoSubdir(String),
    /// `--subdir` names a symlink or a file in the commit's tree: only a directory is exported.
    #[error("subdirectory `{0}` is {1} at this commit, not a directory; give the directory itself")]
    SubdirNotDir(String, &'static str),
    #[error("the commit holds an unsafe path `{0}`; refusing to export it")]
    UnsafePath(String),
    /// A tree entry whose name is not UTF-8, shown lossily (U+FFFD for each invalid byte).
    /// Skipping it would serve a config without that file, which `validate` on a checkout of
    /// the same commit rejects.
    #[error(
        "the commit holds `{0}`, whose name is not UTF-8 (each invalid byte shown as U+FFFD); \
         refusing to export it: rename it, config file names must be UTF-8"
    )]
    NameNotUtf8(String),
    #[error(
        "the commit's tree is too large to export: {0}; keep the config repo (or --subdir) \
         to the config and the files it names"
    )]
    TreeTooLarge(String),
    #[error("the fetch did not finish within {0:?}; its process was killed")]
    FetchTimedOut(Duration),
    /// A fetch run in a child process failed; its own message.
    #[error("{0}")]
    Fetch(String),
}

/// The ref in the mirror that keeps the served commit (see [`Mirror::mark_served`]).
pub const SERVED_REF: &str = "refs/rustygate/served";

/// Packs in the mirror past which it is repacked into one (each fetch adds one).
pub const MAX_PACKS: usize = 16;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |source| GitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a config version was built from, for `/status`, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub sha: String,
    pub subject: String,
    pub author: String,
    pub committed_at: SystemTime,
}

impl CommitInfo {
    pub fn of(commit: &git2::Commit<'_>) -> Self {
        let secs = commit.time().seconds().max(0) as u64;
        CommitInfo {
            sha: commit.id().to_string(),
            subject: commit.summary().unwrap_or("").to_owned(),
            author: commit.author().name().unwrap_or("").to_owned(),
            committed_at: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }
}

/// A bare mirror of the config repo, kept in the cache dir across restarts.
pub struct Mirror {
    repo: Repository,
    url: String,
}

impl Mirror {
    /// Opens the mirror for `url` under `cache_dir`, creating it on first use.
    pub fn open(cache_dir: &Path, url: &str) -> Result<Mirror, GitError> {
        let dir = cache_dir.join("mirror");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let repo = match Repository::open_bare(&dir) {
            Ok(r) => r,
            Err(_) => Repository::init_bare(&dir)?,
        };
        Ok(Mirror {
            repo,
            url: url.to_owned(),
        })
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Fetches `branch` alone into the mirror (`None`: every branch and tag, which a `--ref`
    /// pin needs to be looked up as a tag, a branch or a commit of any of them). Only the
    /// served branch: a push of a large blob to any other branch or tag must not fill the cache
    /// volume. Refs other than the branch and [`SERVED_REF`] (left by an earlier run, or from
    /// before) are deleted, so a repack drops their objects.
    /// Setting `cancel` aborts the transfer at its next progress report.
    pub fn fetch(
        &self,
        creds: &Credentials,
        cancel: &AtomicBool,
        branch: Option<&str>,
    ) -> Result<(), GitError> {
        let mut remote = self.repo.remote_anonymous(&self.url)?;
        let mut callbacks = RemoteCallbacks::new();
        callbacks.transfer_progress(|_| !cancel.load(Ordering::Relaxed));
        let mut tries = 0;
        let configured = self.url.as_str();
        callbacks.credentials(move |url, user, allowed| {
            // libgit2 asks again after a refused credential: answer once, then give up.
            tries += 1;
            if tries > 1 {
                return Err(git2::Error::from_str("authentication failed"));
            }
            creds
                .answer(configured, url, user, allowed)
                .unwrap_or_else(|| {
                    Err(git2::Error::from_str(
                        "no credentials configured for this URL",
                    ))
                })
        });
        // libgit2 replaces a refused host key's reason with a generic message: the check
        // keeps its own, to report instead.
        let refused = std::rc::Rc::new(std::cell::RefCell::new(None));
        if let Some((host, port)) = super::known_hosts::ssh_host_port(&self.url) {
            callbacks.certificate_check(host_key_check(host, port, Rc::clone(&refused))?);
        }
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks);
        opts.prune(git2::FetchPrune::On);
        // git's own default (`http.followRedirects=initial`): a redirect of the first request
        // only. The token is not sent to another host either way (see `Credentials::answer`).
        opts.follow_redirects(git2::RemoteRedirect::Initial);
        let refspecs = match branch {
            Some(b) => {
                opts.download_tags(git2::AutotagOption::None);
                vec![format!("+refs/heads/{b}:refs/heads/{b}")]
            }
            None => {
                opts.download_tags(git2::AutotagOption::All);
                vec![
                    "+refs/heads/*:refs/heads/*".to_owned(),
                    "+refs/tags/*:refs/tags/*".to_owned(),
                ]
            }
        };
        // What the mirror holds before: a remote that advertises none of it (an empty
        // repository, a host mid-migration, anyone on the path of `git://`) must not prune it,
        // or a restart while the host is down would have no cached commit to serve.
        let before = self.fetched_refs(branch);
        let fetched = remote.fetch(&refspecs, Some(&mut opts), None);
        drop(opts);
        match (fetched, refused.take()) {
            (Ok(()), _) => {}
            (Err(_), Some(why)) => return Err(GitError::HostKey(why)),
            (Err(e), None) => return Err(e.into()),
        }
        let after = self.fetched_refs(branch);
        if !before.is_empty() && after.is_empty() {
            for (name, oid) in &before {
                self.repo
                    .reference(name, *oid, true, "rustygate: kept, not advertised")?;
            }
            return Err(GitError::Fetch(match branch {
                Some(b) => format!(
                    "the remote does not have the branch `{b}` (it advertised no refs/heads/{b}); \
                     the mirror keeps the commit fetched before, but no new one is served"
                ),
                None => "the remote advertised no branches or tags; the mirror keeps the ones \
                         fetched before, but no new commit is served"
                    .to_owned(),
            }));
        }
        if let Some(b) = branch {
            self.drop_refs_but(&format!("refs/heads/{b}"))?;
        }
        Ok(())
    }

    /// The refs a fetch of `branch` (`None`: every branch and tag) writes, as the mirror holds
    /// them now.
    fn fetched_refs(&self, branch: Option<&str>) -> Vec<(String, git2::Oid)> {
        let Ok(refs) = self.repo.references() else {
            return Vec::new();
        };
        refs.flatten()
            .filter_map(|r| Some((r.name()?.to_owned(), r.target()?)))
            .filter(|(name, _)| match branch {
                Some(b) => name.strip_prefix("refs/heads/") == Some(b),
                None => name.starts_with("refs/heads/") || name.starts_with("refs/tags/"),
            })
            .collect()
    }

    /// Deletes every ref but `keep` and [`SERVED_REF`].
    fn drop_refs_but(&self, keep: &str) -> Result<(), GitError> {
        let mut names = Vec::new();
        for r in self.repo.references()?.flatten() {
            if let Some(name) = r.name()
                && name != keep
                && name != SERVED_REF
            {
                names.push(name.to_owned());
            }
        }
        for name in names {
            if let Ok(mut r) = self.repo.find_reference(&name) {
                r.delete()?;
            }
        }
        Ok(())
    }

    /// Points [`SERVED_REF`] at the commit being served, so that its objects outlive a
    /// rewrite of the branch (a restart while the head is broken serves it again).
    pub fn mark_served(&self, sha: &str) -> Result<(), GitError> {
        let oid = Oid::from_str(sha)?;
        self.repo
            .reference(SERVED_REF, oid, true, "rustygate: served commit")?;
        Ok(())
    }

    /// The pack files in the mirror.
    pub fn pack_count(&self) -> usize {
        std::fs::read_dir(self.repo.path().join("objects/pack"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// `git gc --auto` for the mirror: past [`MAX_PACKS`] packs, writes every object reachable
    /// from a ref into one new pack and deletes the others (objects no ref reaches any more, of
    /// a rewritten branch, go with them). Returns whether it repacked. The gateway holds the
    /// cache dir, so nothing else writes the mirror meanwhile; a repack cut short leaves at most
    /// an extra pack.
    pub fn maybe_repack(&self) -> Result<bool, GitError> {
        if self.pack_count() <= MAX_PACKS {
            return Ok(false);
        }
        let mut builder = self.repo.packbuilder()?;
        let mut walk = self.repo.revwalk()?;
        for r in self.repo.references()?.flatten() {
            let Some(target) = r.target() else { continue };
            match self.repo.find_object(target, None) {
                // An annotated tag: the tag object itself, then what it points at.
                Ok(o) if o.kind() == Some(ObjectType::Tag) => {
                    builder.insert_object(target, None)?;
                    if let Ok(c) = o.peel_to_commit() {
                        walk.push(c.id())?;
                    }
                }
                Ok(o) if o.kind() == Some(ObjectType::Commit) => walk.push(target)?,
                _ => {}
            }
        }
        builder.insert_walk(&mut walk)?;
        let dir = self.repo.path().join("objects/pack");
        builder.write(&dir, 0o444)?;
        let keep = builder
            .name()
            .map(|n| format!("pack-{n}"))
            .ok_or_else(|| git2::Error::from_str("the new pack has no name"))?;
        for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or("");
            let is_pack_file = name.starts_with("pack-")
                && [".pack", ".idx", ".rev"].iter().any(|x| name.ends_with(x));
            if is_pack_file && stem != keep {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        // Open pack files of the old set are dropped from this handle's view.
        self.repo.odb()?.refresh()?;
        Ok(true)
    }

    /// The commit to serve: `pin` (a tag, branch, full ref name or SHA) when given, else the
    /// branch head, `refs/heads/<branch>` only: a tag or any other revision of the same name
    /// does not stand in for it (where tags are less protected than the branch, a pushed tag
    /// would otherwise be served once the branch is gone).
    pub fn resolve(&self, branch: &str, pin: Option<&str>) -> Result<Oid, GitError> {
        match pin {
            Some(rev) => resolve(&self.repo, rev),
            None => resolve(&self.repo, &format!("refs/heads/{branch}")),
        }
    }
}

/// Resolves a full ref name (`refs/...`), a short tag or branch name, or a commit-ish to a
/// commit id. A short name is looked up as a tag first, then as a branch, then as a
/// remote-tracking branch (`origin/<name>`); a name that is both a tag and a branch on
/// different commits is refused as ambiguous, so pushing a branch named like a pinned tag can
/// never change what a pin resolves to.
pub fn resolve(repo: &Repository, rev: &str) -> Result<Oid, GitError> {
    let commit_of = |name: &str| {
        repo.revparse_single(name)
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id())
            .ok()
    };
    // `HEAD` (`HEAD~1`, `HEAD^`, ...) is the checked-out commit. Tried as `origin/HEAD` first, it
    // would be the remote's default branch, which every clone also has.
    let head_relative = rev == "HEAD" || rev.starts_with("HEAD~") || rev.starts_with("HEAD^");
    if head_relative || rev.starts_with("refs/") {
        return commit_of(rev).ok_or_else(|| GitError::UnknownRev(rev.to_owned()));
    }
    let tag = repo
        .find_reference(&format!("refs/tags/{rev}"))
        .ok()
        .and_then(|r| r.peel_to_commit().ok())
        .map(|c| c.id());
    let branch = repo
        .find_reference(&format!("refs/heads/{rev}"))
        .ok()
        .and_then(|r| r.peel_to_commit().ok())
        .map(|c| c.id());
    match (tag, branch) {
        (Some(t), Some(b)) if t != b => Err(GitError::AmbiguousRev(rev.to_owned())),
        (Some(id), _) | (None, Some(id)) => Ok(id),
        (None, None) => commit_of(&format!("refs/remotes/origin/{rev}"))
            .or_else(|| commit_of(rev))
            .ok_or_else(|| GitError::UnknownRev(rev.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pack per fetch, forever, was the old mirror; repacking keeps the count bounded and
    /// every ref's history (and an annotated tag) readable.
    #[test]
    fn the_mirror_is_repacked_so_its_pack_count_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("origin")).unwrap();
        let url = format!("file://{}", dir.path().join("origin").display());
        let mirror = Mirror::open(&dir.path().join("cache"), &url).unwrap();
        let never = AtomicBool::new(false);
        let sig = git2::Signature::now("t", "t@t").unwrap();
        let (mut most, mut repacks, mut commits) = (0, 0, Vec::new());
        for i in 0..MAX_PACKS * 3 {
            let blob = origin.blob(format!("n = {i}\n").as_bytes()).unwrap();
            let mut tb = origin.treebuilder(None).unwrap();
            tb.insert("main.toml", blob, 0o100644).unwrap();
            let tree = origin.find_tree(tb.write().unwrap()).unwrap();
            let parent = commits.last().map(|c| origin.find_commit(*c).unwrap());
            let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
            let c = origin
                .commit(Some("refs/heads/main"), &sig, &sig, "c", &tree, &parents)
                .unwrap();
            commits.push(c);
            if i == 3 {
                let target = origin.find_object(c, None).unwrap();
                origin.tag("v1", &target, &sig, "release", false).unwrap();
            }
            mirror.fetch(&Credentials::default(), &never, None).unwrap();
            most = most.max(mirror.pack_count());
            repacks += usize::from(mirror.maybe_repack().unwrap());
            assert!(mirror.pack_count() <= MAX_PACKS, "after fetch {i}");
            assert_eq!(mirror.resolve("main", None).unwrap(), c);
        }
        assert!(repacks >= 2, "{repacks} repacks");
        assert!(most <= MAX_PACKS + 1, "{most} packs at most");
        // A fresh handle (as the gateway's after a child fetch) reads everything.
        let reopened = Mirror::open(&dir.path().join("cache"), &url).unwrap();
        let mut walk = reopened.repo().revwalk().unwrap();
        walk.push(*commits.last().unwrap()).unwrap();
        assert_eq!(walk.count(), commits.len());
        assert_eq!(reopened.resolve("main", Some("v1")).unwrap(), commits[3]);
        let dest = dir.path().join("export");
        export_tree(reopened.repo(), commits[0], None, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("main.toml")).unwrap(),
            "n = 0\n"
        );
    }
}
