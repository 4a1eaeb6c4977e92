//! The git cache dir a gateway owns: where it is by default, the ownership and permission
//! checks that keep another local user from planting a mirror or checkout in it, the lock that
//! keeps a second gateway out, and the clean-up of what a crash left in the mirror. What lives
//! inside it (mirror, checkouts, the served record) belongs to the other `source` modules.

use std::path::{Path, PathBuf};

use super::SourceError;
use super::git::GitError;

/// The exclusive hold of one gateway on its git cache dir, for as long as it runs: two gateways
/// sharing one would delete each other's checkouts and fight over the mirror's ref locks.
pub struct CacheLock {
    _file: std::fs::File,
}

/// Takes the cache dir for this process (a lock file the OS releases when the process ends,
/// however it ends), then removes the `*.lock` files and temporary packs a crash left in the
/// mirror: with the dir held, no other process can be writing them.
pub fn lock_cache_dir(dir: &Path) -> Result<CacheLock, SourceError> {
    use std::io::{Read, Seek, Write};
    let io = |source: std::io::Error| GitError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let default_parent = std::env::temp_dir().join(DEFAULT_CACHE_PARENT);
    if dir.parent() == Some(default_parent.as_path()) {
        // Under the shared temp dir: every level the gateway made must be its own and private,
        // and no level above may let another user swap them.
        safe_ancestors(dir, &std::env::temp_dir(), true)?;
        private_dir(&default_parent, true)?;
        private_dir(dir, true)?;
    } else {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        safe_ancestors(dir, parent.unwrap_or(Path::new(".")), false)?;
        private_dir(dir, false)?;
    }
    let path = dir.join("instance.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(SourceError::CacheInUse {
                dir: dir.display().to_string(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e).into()),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    remove_interrupted_leftovers(&dir.join("mirror"));
    Ok(CacheLock { _file: file })
}

/// The parent of the default cache dirs, under the temp dir.
const DEFAULT_CACHE_PARENT: &str = "rustygate-cache";

/// Creates `dir` (mode 0700) if it is missing, then refuses it if another local user could
/// have written it: a symlink, not a directory, owned by a user other than this process's
/// (or root), or (when `strict`, the default cache dir under the shared temp dir) writable by
/// group or others. An explicit `--cache-dir` that is group- or world-writable is only warned
/// about: container volumes (a Kubernetes `emptyDir`) are made that way, private to the pod.
fn private_dir(dir: &Path, strict: bool) -> Result<(), SourceError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |problem: String| SourceError::UnsafeCacheDir {
        dir: dir.display().to_string(),
        problem,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(GitError::Io {
                path: dir.to_path_buf(),
                source,
            }
            .into());
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| GitError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".to_owned()));
    }
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".to_owned()));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid && (strict || meta.uid() != 0) {
        return Err(refuse(format!(
            "it is owned by uid {}, not by this process's uid {euid}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let problem = format!("it is writable by group or others (mode {mode:04o})");
        if strict {
            return Err(refuse(problem));
        }
        tracing::warn!(dir = %dir.display(), mode = %format!("{mode:04o}"), "the cache dir is writable by group or others: any local user who can write it can plant a mirror that is served; fine for a volume private to the gateway (a Kubernetes emptyDir), not on a shared host");
    }
    Ok(())
}

/// Checks `top` and every directory above it up to `/` (symlinks resolved), as ssh's
/// `StrictModes` does for the files it trusts: one owned by another user than this process's
/// (or root), or writable by group or others without the sticky bit, lets that user rename
/// the cache dir `dir` away and put one of their own in its place. Refused when `strict` (the
/// default cache dir); for an explicit `--cache-dir` the operator chose, a warning.
fn safe_ancestors(dir: &Path, top: &Path, strict: bool) -> Result<(), SourceError> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::canonicalize(top).map_err(|source| GitError::Io {
        path: top.to_path_buf(),
        source,
    })?;
    let euid = rustix::process::geteuid().as_raw();
    for a in top.ancestors() {
        let Ok(meta) = std::fs::metadata(a) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        let problem = if meta.uid() != euid && meta.uid() != 0 {
            format!("{} above it is owned by uid {}", a.display(), meta.uid())
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            format!(
                "{} above it is writable by group or others without the sticky bit (mode {mode:04o})",
                a.display()
            )
        } else {
            continue;
        };
        if strict {
            return Err(SourceError::UnsafeCacheDir {
                dir: dir.display().to_string(),
                problem,
            });
        }
        tracing::warn!(dir = %dir.display(), problem, "another local user could replace the cache dir: fine for a volume private to the gateway, not on a shared host");
    }
    Ok(())
}

/// Removes what an interrupted git operation left in the mirror `dir`: every `*.lock` file
/// (ref, index and pack locks) and the temporary pack files of a fetch cut short (libgit2's
/// `objects/pack/pack_git2_*`, git's `tmp_pack_*` / `tmp_idx_*`), which no later fetch
/// reuses: each killed fetch would leave one more on the cache volume.
pub(super) fn remove_interrupted_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let temp_pack = ["pack_git2_", "tmp_pack_", "tmp_idx_"]
            .iter()
            .any(|p| name.starts_with(p))
            && dir.ends_with("objects/pack");
        match e.file_type() {
            Ok(t) if t.is_dir() => remove_interrupted_leftovers(&path),
            Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "lock") => {
                tracing::warn!(path = %path.display(), "removing a lock file left by an interrupted git operation");
                let _ = std::fs::remove_file(&path);
            }
            Ok(t) if t.is_file() && temp_pack => {
                tracing::warn!(path = %path.display(), "removing a temporary pack file left by an interrupted fetch");
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

pub(super) fn default_cache_dir(url: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(url.as_bytes()));
    std::env::temp_dir()
        .join(DEFAULT_CACHE_PARENT)
        .join(&h[..16])
}
