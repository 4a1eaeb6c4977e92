//! Files of a config directory whose content is written only when the config reads them.
//!
//! A git export ([`crate::source::git::export_config_tree`]) writes the files the loader lists
//! (`gateway.toml`, `routes/*.toml`, `upstreams/*.toml`) and leaves every other file of the
//! commit (docs, images, vendored code) as an empty stand-in, registered here. The one reader of
//! config files ([`super::files`]) fills a stand-in from the git mirror just before it opens it,
//! so what a config names (a policy, a certificate, a plugin) reads as in the commit, through the
//! same path and symlink checks, and the cache volume holds only what the config uses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

/// Where the content of the stand-ins under one directory comes from.
pub trait DeferredFiles: Send + Sync {
    /// Writes the content of the stand-in at `rel` (relative to the registered directory), or
    /// a sparse file of its size when that is over `cap` (the reader then refuses it as too
    /// large). `None`: `rel` is no stand-in, or was filled already.
    fn fill(&self, rel: &Path, cap: u64) -> Option<Result<(), String>>;
}

/// Directories with stand-ins, by resolved path (few: the served export and a candidate).
type Registry = Vec<(PathBuf, Arc<dyn DeferredFiles>)>;

static DEFERRED: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    DEFERRED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers the stand-ins of `root` (a resolved path), replacing any registered for it before.
pub fn register(root: PathBuf, files: Arc<dyn DeferredFiles>) {
    let mut reg = registry();
    reg.retain(|(r, _)| *r != root);
    reg.push((root, files));
}

/// Forgets the stand-ins of `root` (its directory is being removed).
pub fn forget(root: &Path) {
    registry().retain(|(r, _)| r != root);
}

/// Fills `path` (resolved, inside a config root) if it is a stand-in, before it is opened.
pub(crate) fn fill(path: &Path, cap: u64) -> Result<(), super::files::FileError> {
    let found = registry().iter().find_map(|(root, files)| {
        let rel = path.strip_prefix(root).ok()?;
        Some((rel.to_path_buf(), Arc::clone(files)))
    });
    let Some((rel, files)) = found else {
        return Ok(());
    };
    match files.fill(&rel, cap) {
        None | Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(super::files::FileError::Io(std::io::Error::other(e))),
    }
}
