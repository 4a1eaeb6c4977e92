//! Exporting a commit of the mirror as a plain directory for the compiler: what is written
//! (every file, or for the gateway's cache only the files the loader lists, the rest as
//! stand-ins filled from the mirror when read), the caps an export stops at, and the checks
//! that keep a crafted tree from writing outside its directory or through a link. Nothing here
//! fetches or resolves refs (see [`super::Mirror`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use git2::{ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};

use super::{GitError, io};

/// Bytes of files one export writes at most: a small repository can unpack into gigabytes
/// (many copies of one large blob cost a pack almost nothing), and each checkout lives on the
/// cache volume. 100,000 routes take 13 MB.
pub const EXPORT_BYTES_CAP: u64 = 256 * 1024 * 1024;
/// Tree entries (files, directories, links) one export creates at most.
pub const EXPORT_ENTRIES_CAP: usize = 100_000;

/// Writes the files of `commit` (only those under `subdir`, if given) into `dest`, which must
/// not exist yet. Submodules are skipped.
///
/// Symlinks are exported as symlinks, so that a git source follows the same rule as a plain
/// directory: the config loader ([`crate::config::files`]) resolves every path and reports one
/// that a link leads out of the repo as a located error, instead of the file seeming absent.
/// They are created after every file and directory is written, so no write ever goes through a
/// link (a crafted tree can hold a link and a directory under one name).
///
/// A blob larger than the config file cap is not inflated: its file is written as a sparse file
/// just over the cap, which the loader then reports as too large.
pub fn export_tree(
    repo: &Repository,
    commit: Oid,
    subdir: Option<&Path>,
    dest: &Path,
) -> Result<(), GitError> {
    export_tree_capped(repo, commit, subdir, dest, EXPORT_CAPS, None)
}

/// An export's caps: bytes of files, entries.
const EXPORT_CAPS: (u64, usize) = (EXPORT_BYTES_CAP, EXPORT_ENTRIES_CAP);

/// [`export_tree`] for the gateway's cache: only the files the loader lists (`gateway.toml`,
/// `routes/*.toml`, `upstreams/*.toml`) are written; every other file is an empty stand-in,
/// filled from the mirror when the config reads it (see [`crate::config::deferred`]). A push of
/// docs, images or vendored code to the config repo then costs the cache volume nothing; the
/// returned [`MirrorBlobs`] is to be registered for `dest` (once renamed into place).
pub fn export_config_tree(
    repo: &Repository,
    commit: Oid,
    subdir: Option<&Path>,
    dest: &Path,
) -> Result<MirrorBlobs, GitError> {
    let mut deferred = std::collections::HashMap::new();
    export_tree_capped(repo, commit, subdir, dest, EXPORT_CAPS, Some(&mut deferred))?;
    Ok(MirrorBlobs {
        mirror: repo.path().to_path_buf(),
        root: PathBuf::new(),
        blobs: std::sync::Mutex::new(deferred),
        budget: std::sync::atomic::AtomicU64::new(EXPORT_BYTES_CAP),
    })
}

/// Whether the loader lists the file `name` in the directory `parent` (as the tree walk spells
/// it: `""` or `routes/`): those are exported whole, the rest on demand.
fn listed_by_loader(parent: &str, name: &str) -> bool {
    match parent {
        "" => name == "gateway.toml",
        "routes/" | "upstreams/" => name.ends_with(".toml"),
        _ => false,
    }
}

/// The stand-ins of one export and their blobs in the mirror.
pub struct MirrorBlobs {
    mirror: PathBuf,
    root: PathBuf,
    blobs: std::sync::Mutex<std::collections::HashMap<PathBuf, Oid>>,
    /// Bytes the stand-ins may still be filled with: the export's cap.
    budget: std::sync::atomic::AtomicU64,
}

impl MirrorBlobs {
    /// The same stand-ins, at `root` (the export's resolved path once in place).
    pub fn at(self, root: PathBuf) -> Self {
        MirrorBlobs { root, ..self }
    }

    /// Writes blob `id` at `path`; `false` when only its size was (over `cap`), so that a read
    /// with a larger cap fills it again.
    fn write(&self, id: Oid, path: &Path, cap: u64) -> Result<bool, GitError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let repo = Repository::open_bare(&self.mirror)?;
        let (size, _) = repo.odb()?.read_header(id)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        let size = size as u64;
        if size > cap {
            // Sparse: the reader refuses it by its size, without a byte written.
            file.set_len(size).map_err(io(path))?;
            return Ok(false);
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(size)
            })
            .map_err(|_| {
                GitError::TreeTooLarge(format!(
                    "the config reads more than {} KiB of files",
                    EXPORT_BYTES_CAP / 1024
                ))
            })?;
        let blob = repo.find_blob(id)?;
        file.write_all(blob.content()).map_err(io(path))?;
        Ok(true)
    }
}

impl crate::config::deferred::DeferredFiles for MirrorBlobs {
    fn fill(&self, rel: &Path, cap: u64) -> Option<Result<(), String>> {
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let id = *blobs.get(rel)?;
        let written = self.write(id, &self.root.join(rel), cap);
        if matches!(written, Ok(true)) {
            blobs.remove(rel);
        }
        Some(written.map(drop).map_err(|e| e.to_string()))
    }
}

/// [`export_tree`] with its caps (bytes of files, entries) given; with `deferred`, files the
/// loader does not list are empty stand-ins, recorded there with their blobs.
fn export_tree_capped(
    repo: &Repository,
    commit: Oid,
    subdir: Option<&Path>,
    dest: &Path,
    (bytes_cap, entries_cap): (u64, usize),
    mut deferred: Option<&mut std::collections::HashMap<PathBuf, Oid>>,
) -> Result<(), GitError> {
    let commit = repo.find_commit(commit)?;
    let mut tree = commit.tree()?;
    if let Some(sub) = subdir.filter(|s| !s.as_os_str().is_empty() && *s != Path::new(".")) {
        let entry = tree
            .get_path(sub)
            .map_err(|_| GitError::NoSubdir(sub.display().to_string()))?;
        let not_dir = match entry.filemode() {
            0o040000 => None,
            0o120000 => Some("a symlink"),
            0o160000 => Some("a submodule"),
            _ => Some("a file"),
        };
        if let Some(what) = not_dir {
            return Err(GitError::SubdirNotDir(sub.display().to_string(), what));
        }
        tree = entry
            .to_object(repo)?
            .into_tree()
            .map_err(|_| GitError::NoSubdir(sub.display().to_string()))?;
    }
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let odb = repo.odb()?;
    let mut failure: Option<GitError> = None;
    let mut links: Vec<(PathBuf, Oid)> = Vec::new();
    let (mut bytes, mut entries) = (0u64, 0usize);
    let walked = tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        let Some(name) = entry.name() else {
            // `parent` is UTF-8: a directory whose name is not never gets walked into.
            let lossy = String::from_utf8_lossy(entry.name_bytes());
            failure = Some(GitError::NameNotUtf8(format!("{parent}{lossy}")));
            return TreeWalkResult::Abort;
        };
        entries += 1;
        if entries > entries_cap {
            failure = Some(GitError::TreeTooLarge(format!(
                "more than {entries_cap} files and directories"
            )));
            return TreeWalkResult::Abort;
        }
        // Git objects are untrusted input: a crafted tree can hold names that climb out.
        if !safe_entry_name(name) {
            failure = Some(GitError::UnsafePath(format!("{parent}{name}")));
            return TreeWalkResult::Abort;
        }
        let path = dest.join(parent).join(name);
        let result = match entry.kind() {
            Some(ObjectType::Tree) => std::fs::create_dir_all(&path).map_err(io(&path)),
            Some(ObjectType::Blob) if entry.filemode() == 0o120000 => {
                links.push((path, entry.id()));
                Ok(())
            }
            Some(ObjectType::Blob)
                if deferred
                    .as_ref()
                    .is_some_and(|_| !listed_by_loader(parent, name)) =>
            {
                let placed = std::fs::File::create(&path).map(drop).map_err(io(&path));
                if let Some(d) = deferred.as_mut() {
                    d.insert(Path::new(parent).join(name), entry.id());
                }
                placed
            }
            Some(ObjectType::Blob) => match write_blob(repo, &odb, entry.id(), &path) {
                Ok(written) => {
                    bytes += written;
                    if bytes > bytes_cap {
                        failure = Some(GitError::TreeTooLarge(format!(
                            "more than {} KiB of files",
                            bytes_cap / 1024
                        )));
                        return TreeWalkResult::Abort;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        match result {
            Ok(()) => TreeWalkResult::Ok,
            Err(e) => {
                failure = Some(e);
                TreeWalkResult::Abort
            }
        }
    });
    // The callback's own error says more than libgit2's "callback returned -7".
    if let Some(e) = failure {
        return Err(e);
    }
    walked?;
    for (path, id) in links {
        write_link(repo, id, dest, &path)?;
    }
    Ok(())
}

/// Writes one regular blob, or a sparse stand-in when it is over the config file cap (which
/// takes no space: reading it says it is too large). The bytes written.
fn write_blob(
    repo: &Repository,
    odb: &git2::Odb<'_>,
    id: Oid,
    path: &Path,
) -> Result<u64, GitError> {
    let cap = crate::config::files::CONFIG_FILE_CAP;
    let (size, _) = odb.read_header(id)?;
    if size as u64 > cap {
        let f = std::fs::File::create(path).map_err(io(path))?;
        f.set_len(cap + 1).map_err(io(path))?;
        return Ok(0);
    }
    let blob = repo.find_blob(id)?;
    std::fs::write(path, blob.content()).map_err(io(path))?;
    Ok(blob.content().len() as u64)
}

/// Creates one symlink of the tree. Its parent must be a directory this export created (not a
/// link), and nothing may exist at its path yet.
fn write_link(repo: &Repository, id: Oid, dest: &Path, path: &Path) -> Result<(), GitError> {
    use std::os::unix::ffi::OsStrExt;
    let unsafe_path = || {
        GitError::UnsafePath(
            path.strip_prefix(dest)
                .unwrap_or(path)
                .display()
                .to_string(),
        )
    };
    let parent_is_dir = path
        .parent()
        .and_then(|p| std::fs::symlink_metadata(p).ok())
        .is_some_and(|m| m.file_type().is_dir());
    if !parent_is_dir {
        return Err(unsafe_path());
    }
    let blob = repo.find_blob(id)?;
    let target = std::ffi::OsStr::from_bytes(blob.content());
    if blob.content().len() > 4096 || blob.content().contains(&0) {
        return Err(unsafe_path());
    }
    std::os::unix::fs::symlink(target, path).map_err(io(path))
}

/// A tree entry name that stays inside the directory it is written to.
fn safe_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.eq_ignore_ascii_case(".git")
        && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_that_climb_out_are_refused() {
        for bad in ["", ".", "..", ".git", ".GIT", "a/b", "a\\b", "a\0b"] {
            assert!(!safe_entry_name(bad), "{bad:?}");
        }
        for ok in ["routes", "main.toml", "..hidden", ".gitignore"] {
            assert!(safe_entry_name(ok), "{ok:?}");
        }
    }

    #[test]
    fn a_tree_with_a_dotdot_entry_is_not_exported() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        let blob = repo.blob(b"escaped").unwrap();
        let mut inner = repo.treebuilder(None).unwrap();
        inner.insert("escaped.txt", blob, 0o100644).unwrap();
        let inner = inner.write().unwrap();
        // TreeBuilder refuses `..` itself; write the raw tree object as a hostile remote would.
        let mut raw = b"40000 ..\0".to_vec();
        raw.extend_from_slice(inner.as_bytes());
        let odb = repo.odb().unwrap();
        let tree = odb.write(ObjectType::Tree, &raw).unwrap();
        let sig = git2::Signature::now("t", "t@t").unwrap();
        let tree = repo.find_tree(tree).unwrap();
        let commit = repo.commit(None, &sig, &sig, "evil", &tree, &[]).unwrap();
        let dest = dir.path().join("out/export");
        let err = export_tree(&repo, commit, None, &dest).unwrap_err();
        assert!(matches!(err, GitError::UnsafePath(_)), "{err}");
        assert!(!dir.path().join("out/escaped.txt").exists());
    }

    /// A commit holding `entries` as its root tree, written raw: a hostile remote is not bound
    /// by what `TreeBuilder` allows (duplicate names).
    fn raw_commit(repo: &Repository, entries: &[(&str, &str, Oid)]) -> Oid {
        let mut raw = Vec::new();
        for (mode, name, oid) in entries {
            raw.extend_from_slice(format!("{mode} {name}\0").as_bytes());
            raw.extend_from_slice(oid.as_bytes());
        }
        let tree = repo.odb().unwrap().write(ObjectType::Tree, &raw).unwrap();
        let sig = git2::Signature::now("t", "t@t").unwrap();
        let tree = repo.find_tree(tree).unwrap();
        repo.commit(None, &sig, &sig, "c", &tree, &[]).unwrap()
    }

    #[test]
    fn a_link_and_a_directory_under_one_name_never_write_through_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        let target = repo
            .blob(outside.path().to_str().unwrap().as_bytes())
            .unwrap();
        let file = repo.blob(b"written").unwrap();
        let mut inner = repo.treebuilder(None).unwrap();
        inner.insert("a.toml", file, 0o100644).unwrap();
        let inner = inner.write().unwrap();
        // The link first, so a one-pass export would create it before writing `routes/a.toml`.
        let commit = raw_commit(
            &repo,
            &[("120000", "routes", target), ("40000", "routes", inner)],
        );
        let dest = dir.path().join("export");
        assert!(export_tree(&repo, commit, None, &dest).is_err());
        assert!(!outside.path().join("a.toml").exists());
        let meta = std::fs::symlink_metadata(dest.join("routes")).unwrap();
        assert!(meta.is_dir(), "the directory was written, the link refused");
    }

    #[test]
    fn links_are_exported_as_links_and_big_blobs_as_sparse_stand_ins() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        let cap = crate::config::files::CONFIG_FILE_CAP;
        let big = repo.blob(&vec![b'#'; cap as usize + 10]).unwrap();
        let small = repo.blob(b"x = 1").unwrap();
        let link = repo.blob(b"small.toml").unwrap();
        let commit = raw_commit(
            &repo,
            &[
                ("100644", "big.toml", big),
                ("120000", "link.toml", link),
                ("100644", "small.toml", small),
            ],
        );
        let dest = dir.path().join("export");
        export_tree(&repo, commit, None, &dest).unwrap();
        let meta = std::fs::metadata(dest.join("big.toml")).unwrap();
        assert_eq!(
            meta.len(),
            cap + 1,
            "just over the cap, not the blob's size"
        );
        let head = std::fs::read(dest.join("big.toml")).unwrap();
        assert!(head.iter().all(|b| *b == 0), "not inflated from the blob");
        assert_eq!(
            std::fs::read_link(dest.join("link.toml")).unwrap(),
            Path::new("small.toml")
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("link.toml")).unwrap(),
            "x = 1"
        );
    }

    /// The gateway's export writes what the loader lists and leaves the rest as stand-ins,
    /// filled when read, by the cap of what reads them: a 9 MiB plugin (over the 8 MiB config
    /// file cap, under the plugin cap) was exported as an 8 MiB sparse stand-in and never read
    /// whole.
    #[test]
    fn stand_ins_are_filled_when_read_by_the_cap_of_the_reader() {
        use crate::config::files::{FileError, FileKind, read_bytes_in_repo, read_in_repo};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        let size = 9 << 20;
        let wasm = repo.blob(&vec![b'w'; size]).unwrap();
        let gateway = repo.blob(b"# defaults").unwrap();
        let commit = raw_commit(
            &repo,
            &[
                ("100644", "big.wasm", wasm),
                ("100644", "gateway.toml", gateway),
            ],
        );
        let dest = dir.path().join("export");
        let stand_ins = export_config_tree(&repo, commit, None, &dest).unwrap();
        let len = |p: &str| std::fs::metadata(dest.join(p)).unwrap().len();
        assert_eq!((len("gateway.toml"), len("big.wasm")), (10, 0));
        let root = std::fs::canonicalize(&dest).unwrap();
        crate::config::deferred::register(
            root.clone(),
            std::sync::Arc::new(stand_ins.at(root.clone())),
        );
        let as_policy = read_in_repo(&root, Path::new("big.wasm"), FileKind::Policy);
        assert!(matches!(as_policy, Err(FileError::TooLarge { .. })));
        let as_plugin = read_bytes_in_repo(&root, Path::new("big.wasm"), FileKind::Plugin);
        let whole = as_plugin.is_ok_and(|b| b.len() == size && b.iter().all(|&x| x == b'w'));
        assert!(whole, "the plugin reads as in the commit");
        crate::config::deferred::forget(&root);
    }

    /// `--subdir` naming a symlink (or a file) said "does not exist at this commit".
    #[test]
    fn a_subdir_that_is_a_link_or_a_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        let target = repo.blob(b"config").unwrap();
        let file = repo.blob(b"x = 1").unwrap();
        let commit = raw_commit(
            &repo,
            // Sorted by name, as git writes trees.
            &[("100644", "file.toml", file), ("120000", "gateway", target)],
        );
        let dest = dir.path().join("export");
        for (sub, said) in [
            (
                "gateway",
                "subdirectory `gateway` is a symlink at this commit, not a directory",
            ),
            (
                "file.toml",
                "subdirectory `file.toml` is a file at this commit, not a directory",
            ),
            ("nope", "subdirectory `nope` does not exist at this commit"),
        ] {
            let e = export_tree(&repo, commit, Some(Path::new(sub)), &dest).unwrap_err();
            assert!(e.to_string().starts_with(said), "{sub}: {e}");
        }
    }

    #[test]
    fn an_export_stops_at_its_caps() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r")).unwrap();
        // Many names for one blob: the pack stays small, the checkout would not.
        let blob = repo.blob(&[b'#'; 4096]).unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("f{i:02}.toml")).collect();
        let files: Vec<(&str, &str, Oid)> =
            names.iter().map(|n| ("100644", n.as_str(), blob)).collect();
        let commit = raw_commit(&repo, &files);
        let capped = |dest: &Path, caps| export_tree_capped(&repo, commit, None, dest, caps, None);
        let dest = dir.path().join("a");
        let e = capped(&dest, (40 * 1024, 1000)).unwrap_err();
        assert!(matches!(e, GitError::TreeTooLarge(_)), "{e}");
        assert!(e.to_string().contains("more than 40 KiB of files"), "{e}");
        let written = std::fs::read_dir(&dest).unwrap().count();
        assert!(written <= 11, "stopped at the cap: {written} files");
        let e = capped(&dir.path().join("b"), (1 << 30, 10)).unwrap_err();
        assert!(e.to_string().contains("more than 10 files"), "{e}");
        capped(&dir.path().join("c"), (1 << 30, 1000)).unwrap();
    }
}
