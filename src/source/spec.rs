//! What `--repo` and its companion flags say about where configs come from: a plain directory
//! or a git repository (URL, branch or pin, subdirectory, cache dir, credentials, signing and
//! fetch settings), and how a repo URL is shown without its credentials. Nothing here touches
//! the disk beyond telling a directory from a git repository.

use std::path::{Path, PathBuf};

use super::cache_dir::default_cache_dir;
use super::git::Credentials;
use super::{SourceError, fetch, signing};

/// How the config repo is reached, from `--repo` and its companion flags.
// One per gateway, made once at start-up: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A plain directory, reloaded when its files change.
    Dir(PathBuf),
    Git(GitSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSpec {
    /// Remote URL, or a local repository path.
    pub url: String,
    pub branch: String,
    /// A tag, branch or commit to serve instead of the branch head.
    pub pin: Option<String>,
    /// The config repo's directory inside the git repository.
    pub subdir: Option<PathBuf>,
    /// Where the mirror and checkouts live.
    pub cache_dir: PathBuf,
    pub credentials: Credentials,
    /// Serve a new head that does not descend from the served commit (`--allow-rewrites`);
    /// otherwise such a head is held back until a forced reload.
    pub allow_rewrites: bool,
    /// `--require-signed` with `--allowed-signers`: only commits signed by an allowed key are
    /// served.
    pub signing: Option<signing::SigningPolicy>,
    /// In this process, or in a child process killed at a deadline (`serve`).
    pub fetch: fetch::FetchMode,
}

impl GitSpec {
    /// The one branch fetched, when not pinned (a pin may name any tag, branch or commit).
    pub(super) fn fetched_branch(&self) -> Option<&str> {
        self.pin.is_none().then_some(self.branch.as_str())
    }
}

impl SourceSpec {
    /// Classifies `--repo`: a local git working copy or a URL is a git source; any other
    /// directory is a plain directory.
    pub fn from_repo_arg(
        repo: &str,
        branch: &str,
        pin: Option<String>,
        subdir: Option<PathBuf>,
        cache_dir: Option<PathBuf>,
    ) -> Result<SourceSpec, SourceError> {
        let path = Path::new(repo);
        let is_url = repo.contains("://") || is_scp_like(repo);
        if !is_url && path.is_dir() && !path.join(".git").exists() && !looks_bare(path) {
            return Ok(SourceSpec::Dir(
                subdir
                    .map(|s| path.join(s))
                    .unwrap_or_else(|| path.to_path_buf()),
            ));
        }
        if !is_url && !path.is_dir() {
            return Err(SourceError::NotFound(repo.to_owned()));
        }
        let url = if is_url {
            repo.to_owned()
        } else {
            std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string()
        };
        let cache_dir = cache_dir.unwrap_or_else(|| default_cache_dir(&url));
        Ok(SourceSpec::Git(GitSpec {
            url,
            // `--branch refs/heads/main` names the branch `main`: webhooks name it so too.
            branch: branch
                .strip_prefix("refs/heads/")
                .unwrap_or(branch)
                .to_owned(),
            pin,
            subdir,
            cache_dir,
            credentials: Credentials::from_env(),
            allow_rewrites: false,
            signing: None,
            fetch: fetch::FetchMode::InProcess,
        }))
    }

    /// For `/status` and logs: never includes credentials.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Dir(p) => p.display().to_string(),
            SourceSpec::Git(g) => redact_url(&g.url),
        }
    }
}

/// `git@host:org/repo.git`
fn is_scp_like(s: &str) -> bool {
    let Some(colon) = s.find(':') else {
        return false;
    };
    let head = &s[..colon];
    head.contains('@') && !head.contains('/')
}

fn looks_bare(p: &Path) -> bool {
    p.join("HEAD").is_file() && p.join("objects").is_dir() && p.join("refs").is_dir()
}

/// Drops `user:password@` from a URL: everything of its authority up to the last `@`, which
/// a password may contain unencoded.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{scheme}://{}", &rest[at + 1..]);
        }
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_argument_classification() {
        let plain = tempfile::tempdir().unwrap();
        let spec =
            SourceSpec::from_repo_arg(plain.path().to_str().unwrap(), "main", None, None, None)
                .unwrap();
        assert_eq!(spec, SourceSpec::Dir(plain.path().to_path_buf()));

        let work = tempfile::tempdir().unwrap();
        git2::Repository::init(work.path()).unwrap();
        let spec =
            SourceSpec::from_repo_arg(work.path().to_str().unwrap(), "main", None, None, None)
                .unwrap();
        assert!(matches!(spec, SourceSpec::Git(_)));

        for url in [
            "https://git.example/org/cfg.git",
            "ssh://git@git.example/org/cfg.git",
            "git@git.example:org/cfg.git",
            "file:///srv/cfg.git",
        ] {
            let spec = SourceSpec::from_repo_arg(url, "main", None, None, None).unwrap();
            assert!(
                matches!(spec, SourceSpec::Git(ref g) if g.url == url),
                "{url}"
            );
        }
        assert!(SourceSpec::from_repo_arg("/no/such/dir", "main", None, None, None).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:tok@git.example/org/cfg.git"),
            "https://git.example/org/cfg.git"
        );
        assert_eq!(
            redact_url("git@git.example:org/cfg.git"),
            "git@git.example:org/cfg.git"
        );
        assert_eq!(redact_url("file:///srv/cfg.git"), "file:///srv/cfg.git");
        // A password with an unencoded `@`, a URL without a path, an `@` in the path only.
        assert_eq!(
            redact_url("redis://default:p@ss@redis.internal:6379"),
            "redis://redis.internal:6379"
        );
        assert_eq!(
            redact_url("redis://:pw@10.0.0.1:6379/0?timeout=1"),
            "redis://10.0.0.1:6379/0?timeout=1"
        );
        assert_eq!(
            redact_url("https://git.example/org/@cfg.git"),
            "https://git.example/org/@cfg.git"
        );
    }
}
