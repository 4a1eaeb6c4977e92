//! The one way the gateway opens a file a config names: routes, upstreams, `gateway.toml`,
//! fixtures, policy scripts, certificates and `{ file = ... }` secrets all come through here.
//!
//! A config repo is untrusted input (anyone who can push to it can name a path), so every read:
//! - resolves the path with symlinks followed and refuses anything that ends up outside the
//!   repo root (or, for secrets, outside the configured secret roots) *before* opening it, so
//!   no byte of an outside file is read or later shown in a diagnostic;
//! - opens only regular files, without blocking (`O_NONBLOCK`, so a FIFO swapped in after the
//!   check cannot hang the reader) and without following a last-moment symlink (`O_NOFOLLOW`);
//! - checks the size from the metadata of the opened file *and* reads at most cap + 1 bytes, so a
//!   file that lies about its size (`/proc`, a file still growing) is still bounded.
//!
//! What is refused is a [`FileError`]; callers turn it into a located diagnostic.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// A file of the config repo (`gateway.toml`, `routes/*.toml`, `upstreams/*.toml`,
/// `tests/*.toml`) or a certificate it names.
pub const CONFIG_FILE_CAP: u64 = 8 * 1024 * 1024;
/// A policy script.
pub const POLICY_CAP: u64 = 1024 * 1024;
/// A `{ file = ... }` secret.
pub const SECRET_CAP: u64 = 64 * 1024;
/// A WASM plugin (`plugins/*.wasm`).
pub const PLUGIN_CAP: u64 = 32 * 1024 * 1024;

/// Directories `{ file = ... }` secrets may be read from unless the operator adds more with
/// `--secret-root`: where container runtimes and Kubernetes mount secrets, and our own.
pub const DEFAULT_SECRET_ROOTS: [&str; 3] = ["/run/secrets", "/var/run/secrets", "/etc/rustygate"];

/// What kind of file is read: decides its size cap and how messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Config,
    Certificate,
    Policy,
    Secret,
    Plugin,
}

impl FileKind {
    pub fn cap(self) -> u64 {
        match self {
            FileKind::Config | FileKind::Certificate => CONFIG_FILE_CAP,
            FileKind::Policy => POLICY_CAP,
            FileKind::Secret => SECRET_CAP,
            FileKind::Plugin => PLUGIN_CAP,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FileKind::Config => "config file",
            FileKind::Certificate => "certificate file",
            FileKind::Policy => "policy",
            FileKind::Secret => "secret file",
            FileKind::Plugin => "plugin",
        }
    }
}

/// Why a file was not read. The messages never quote the file's content.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("is an absolute path; paths are relative to the config repo root")]
    Absolute,
    #[error("climbs out of the config repo with `..`")]
    ParentDir,
    #[error("resolves outside the config repo root (through a symlink)")]
    OutsideRepo,
    #[error("is a relative path; a secret file is named by its absolute path")]
    RelativeSecret,
    #[error("is not under an allowed secrets directory ({roots}); add one with `--secret-root`")]
    OutsideSecretRoots { roots: String },
    #[error("does not exist")]
    NotFound,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is larger than the {cap}-byte limit for a {kind}")]
    TooLarge { cap: u64, kind: &'static str },
    /// Where the first byte that is not UTF-8 is (1-based; the column counts characters).
    #[error("is not UTF-8 text: an invalid byte at line {line}, column {column}")]
    NotUtf8 { line: usize, column: usize },
    /// The file's own name is not UTF-8 (shown with U+FFFD for each invalid byte): nothing in
    /// the config can name it, and a git source cannot export it.
    #[error("has a name that is not UTF-8 (each invalid byte shown as U+FFFD)")]
    NameNotUtf8,
    #[error("cannot be read: {0}")]
    Io(#[source] std::io::Error),
}

impl FileError {
    /// The diagnostic code for this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            FileError::Absolute
            | FileError::ParentDir
            | FileError::OutsideRepo
            | FileError::RelativeSecret
            | FileError::OutsideSecretRoots { .. } => "invalid-path",
            FileError::NotFound => "missing-file",
            FileError::NameNotUtf8 => "invalid-file-name",
            FileError::NotRegular(_) => "not-a-file",
            FileError::TooLarge { .. } => "file-too-large",
            FileError::NotUtf8 { .. } | FileError::Io(_) => "unreadable-file",
        }
    }

    /// A short label for the place in the config that named the file.
    pub fn label(&self) -> &'static str {
        match self {
            FileError::Absolute
            | FileError::ParentDir
            | FileError::OutsideRepo
            | FileError::OutsideSecretRoots { .. } => "outside the allowed directories",
            FileError::RelativeSecret => "not an absolute path",
            FileError::NotFound => "file not found",
            FileError::NameNotUtf8 => "file name not UTF-8",
            FileError::NotRegular(_) => "not a regular file",
            FileError::TooLarge { .. } => "file too large",
            FileError::NotUtf8 { .. } => "not UTF-8",
            FileError::Io(_) => "cannot be read",
        }
    }

    /// What to do about this refusal, for the diagnostic's help line.
    pub fn help(&self) -> &'static str {
        match self {
            FileError::NameNotUtf8 => "rename the file: config file names must be UTF-8",
            FileError::NotUtf8 { .. } => {
                "save the file as UTF-8 (a file saved as Latin-1 or UTF-16 reads so)"
            }
            _ => "config files are regular files inside the config repo",
        }
    }

    fn from_io(e: std::io::Error) -> FileError {
        match e.kind() {
            std::io::ErrorKind::NotFound => FileError::NotFound,
            _ if e.raw_os_error() == Some(libc::ELOOP) => FileError::NotRegular("a symlink"),
            _ if e.raw_os_error() == Some(libc::ENXIO) => FileError::NotRegular("a socket"),
            _ => FileError::Io(e),
        }
    }
}

/// Resolves `rel`, a path the config wrote relative to the repo `root`, to a path inside the
/// root with every symlink followed. Refuses absolute paths and `..` by their spelling, then
/// anything a symlink (of the file or of a directory on the way) leads out of the root.
pub fn resolve_in_repo(root: &Path, rel: &Path) -> Result<PathBuf, FileError> {
    if rel.is_absolute() || rel.has_root() {
        return Err(FileError::Absolute);
    }
    if rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(FileError::ParentDir);
    }
    let root = std::fs::canonicalize(root).map_err(FileError::from_io)?;
    let path = std::fs::canonicalize(root.join(rel)).map_err(|e| {
        // Say "outside the repo" rather than "does not exist" when the part of the path that
        // exists already leads out: validate output must not tell a pusher which files exist
        // outside the repo.
        if e.kind() == std::io::ErrorKind::NotFound
            && existing_part_leads_out(&root, &root.join(rel))
        {
            FileError::OutsideRepo
        } else {
            FileError::from_io(e)
        }
    })?;
    if !path.starts_with(&root) {
        return Err(FileError::OutsideRepo);
    }
    Ok(path)
}

/// For a path that does not resolve: whether its longest existing prefix is outside `root`
/// (a symlinked directory out, or a dangling link whose target is outside).
fn existing_part_leads_out(root: &Path, path: &Path) -> bool {
    // Bounded: one step per component of `path`.
    for p in path.ancestors() {
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        return match std::fs::canonicalize(p) {
            Ok(resolved) => !resolved.starts_with(root),
            Err(_) => link_points_out(root, p),
        };
    }
    false
}

/// Whether `path` is a symlink whose target is absolute or climbs with `..` out of `root`.
fn link_points_out(root: &Path, path: &Path) -> bool {
    let Ok(target) = std::fs::read_link(path) else {
        return false;
    };
    let Some(parent) = path.parent() else {
        return true;
    };
    let mut lexical = PathBuf::new();
    for c in parent.join(target).components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    !lexical.starts_with(root)
}

/// Reads a file of the repo named by a repo-relative path. See the module docs for the rules.
pub fn read_in_repo(root: &Path, rel: &Path, kind: FileKind) -> Result<String, FileError> {
    let path = resolve_in_repo(root, rel)?;
    super::deferred::fill(&path, kind.cap())?;
    read_regular(&path, kind)
}

/// [`read_in_repo`] for a binary file (a WASM plugin): the same rules, no UTF-8 check.
pub fn read_bytes_in_repo(root: &Path, rel: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    let path = resolve_in_repo(root, rel)?;
    super::deferred::fill(&path, kind.cap())?;
    read_regular_bytes(&path, kind)
}

/// The secret roots to use: the defaults plus the operator's, each resolved (symlinks followed,
/// `/var/run` is often a link to `/run`); roots that do not exist are left out.
pub fn secret_roots(extra: &[PathBuf]) -> Vec<PathBuf> {
    DEFAULT_SECRET_ROOTS
        .iter()
        .map(PathBuf::from)
        .chain(extra.iter().cloned())
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect()
}

/// Checks a `{ file = ... }` secret path by its spelling alone: absolute, no `..`, under one of
/// the roots as written. Used when secrets are not read (`validate --no-env`).
pub fn check_secret_path(path: &Path, extra_roots: &[PathBuf]) -> Result<(), FileError> {
    if !path.is_absolute() {
        return Err(FileError::RelativeSecret);
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(FileError::ParentDir);
    }
    let written: Vec<PathBuf> = DEFAULT_SECRET_ROOTS
        .iter()
        .map(PathBuf::from)
        .chain(extra_roots.iter().cloned())
        .collect();
    if written.iter().any(|r| path.starts_with(r)) {
        Ok(())
    } else {
        Err(outside_roots(extra_roots))
    }
}

fn outside_roots(extra_roots: &[PathBuf]) -> FileError {
    let roots = DEFAULT_SECRET_ROOTS
        .iter()
        .map(|s| s.to_string())
        .chain(extra_roots.iter().map(|p| p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    FileError::OutsideSecretRoots { roots }
}

/// Reads a `{ file = ... }` secret: an absolute path that, with symlinks followed, is inside a
/// secret root (defaults plus `extra_roots`). Trailing newlines are trimmed by the caller.
pub fn read_secret(path: &Path, extra_roots: &[PathBuf]) -> Result<String, FileError> {
    check_secret_path(path, extra_roots)?;
    let resolved = std::fs::canonicalize(path).map_err(FileError::from_io)?;
    if !secret_roots(extra_roots)
        .iter()
        .any(|r| resolved.starts_with(r))
    {
        return Err(outside_roots(extra_roots));
    }
    read_regular(&resolved, FileKind::Secret)
}

/// Opens `path` (already resolved and checked) if it is a regular file and reads it, bounded by
/// the kind's cap.
pub fn read_regular(path: &Path, kind: FileKind) -> Result<String, FileError> {
    text(read_regular_bytes(path, kind)?)
}

/// `bytes` as text, or where its first byte that is not UTF-8 is.
fn text(bytes: Vec<u8>) -> Result<String, FileError> {
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let before = std::str::from_utf8(&valid[line_start..]).map_or(0, |s| s.chars().count());
        FileError::NotUtf8 {
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            column: before + 1,
        }
    })
}

/// [`read_regular`] without the UTF-8 check.
pub fn read_regular_bytes(path: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Refuse by type before opening: opening a FIFO or a device can block or have effects.
    let meta = std::fs::symlink_metadata(path).map_err(FileError::from_io)?;
    not_regular(&meta.file_type())?;
    // Between the check and the open the path may be swapped: O_NONBLOCK makes opening a FIFO
    // return at once, O_NOFOLLOW refuses a symlink put in its place.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(FileError::from_io)?;
    let meta = file.metadata().map_err(FileError::from_io)?;
    not_regular(&meta.file_type())?;
    if on_pseudo_fs(&meta) {
        return Err(FileError::NotRegular("a /proc or /sys file"));
    }
    read_capped_bytes(file, meta.len(), kind)
}

/// `/proc` and `/sys` files look regular (size 0) but are generated on read: the environment,
/// memory maps, kernel state. They are told apart by the device of the file system they are on.
fn on_pseudo_fs(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    ["/proc", "/sys"]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .any(|m| m.dev() == meta.dev())
}

/// Reads at most cap + 1 bytes of `reader`, refusing a declared or actual size over the cap.
pub fn read_capped(reader: impl Read, declared: u64, kind: FileKind) -> Result<String, FileError> {
    text(read_capped_bytes(reader, declared, kind)?)
}

/// [`read_capped`] without the UTF-8 check.
pub fn read_capped_bytes(
    reader: impl Read,
    declared: u64,
    kind: FileKind,
) -> Result<Vec<u8>, FileError> {
    let cap = kind.cap();
    let too_large = FileError::TooLarge {
        cap,
        kind: kind.name(),
    };
    if declared > cap {
        return Err(too_large);
    }
    let mut buf = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    reader
        .take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(FileError::from_io)?;
    if buf.len() as u64 > cap {
        return Err(too_large);
    }
    Ok(buf)
}

fn not_regular(t: &std::fs::FileType) -> Result<(), FileError> {
    use std::os::unix::fs::FileTypeExt;
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(FileError::NotRegular(what))
}

/// One `*.toml` entry of a config directory: its repo-relative name and its text, or why it
/// was not read.
pub struct DirFile {
    pub name: String,
    pub text: Result<String, FileError>,
}

/// Reads every `*.toml` file directly in `root/dir`, in name order. A directory that does not
/// exist holds nothing; one that is not readable or leads out of the repo is one entry named
/// after the directory, with the error. Entries that are not regular files are errors too (a
/// `routes/a.toml` FIFO must be reported, not skipped or opened).
pub fn read_toml_dir(root: &Path, dir: &str) -> Vec<DirFile> {
    let refused = |text| {
        vec![DirFile {
            name: dir.to_owned(),
            text: Err(text),
        }]
    };
    let resolved = match resolve_in_repo(root, Path::new(dir)) {
        Ok(p) => p,
        Err(FileError::NotFound) => return Vec::new(),
        Err(e) => return refused(e),
    };
    if !resolved.is_dir() {
        return refused(FileError::NotRegular("not a directory"));
    }
    let entries = match std::fs::read_dir(&resolved) {
        Ok(e) => e,
        Err(e) => return refused(FileError::Io(e)),
    };
    // (name, whether it is UTF-8): a name that is not cannot be opened by its lossy spelling,
    // and must be reported as what it is, not as missing.
    let mut names = Vec::new();
    // Bounded: a directory is listed once; each entry is looked at once.
    for entry in entries {
        match entry {
            Ok(e) => {
                let name = e.file_name();
                if Path::new(&name).extension().is_some_and(|x| x == "toml") {
                    match name.into_string() {
                        Ok(name) => names.push((name, true)),
                        Err(raw) => names.push((raw.to_string_lossy().into_owned(), false)),
                    }
                }
            }
            Err(e) => return refused(FileError::Io(e)),
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|(name, utf8)| {
            let rel = format!("{dir}/{name}");
            let text = if utf8 {
                read_in_repo(root, Path::new(&rel), FileKind::Config)
            } else {
                Err(FileError::NameNotUtf8)
            };
            DirFile { name: rel, text }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn paths_leaving_the_repo_are_refused_before_reading() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), "outside").unwrap();
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path();
        std::fs::create_dir(root.join("policies")).unwrap();
        std::fs::write(root.join("policies/ok.rhai"), "1").unwrap();
        symlink(
            outside.path().join("secret.txt"),
            root.join("policies/out.rhai"),
        )
        .unwrap();
        symlink(outside.path(), root.join("linked")).unwrap();
        symlink("ok.rhai", root.join("policies/in.rhai")).unwrap();
        symlink("/nonexistent/x", root.join("policies/dangling.rhai")).unwrap();

        let read = |p: &str| read_in_repo(root, Path::new(p), FileKind::Policy);
        assert_eq!(read("policies/ok.rhai").unwrap(), "1");
        assert_eq!(
            read("policies/in.rhai").unwrap(),
            "1",
            "a link inside is fine"
        );
        assert!(matches!(read("../x"), Err(FileError::ParentDir)));
        assert!(matches!(
            read("policies/../../x"),
            Err(FileError::ParentDir)
        ));
        let abs = outside.path().join("secret.txt");
        assert!(matches!(
            read(abs.to_str().unwrap()),
            Err(FileError::Absolute)
        ));
        assert!(matches!(
            read("policies/out.rhai"),
            Err(FileError::OutsideRepo)
        ));
        assert!(matches!(
            read("linked/secret.txt"),
            Err(FileError::OutsideRepo)
        ));
        assert!(matches!(
            read("policies/dangling.rhai"),
            Err(FileError::OutsideRepo)
        ));
        assert!(matches!(
            read("policies/none.rhai"),
            Err(FileError::NotFound)
        ));
    }

    #[test]
    fn only_regular_files_are_opened_and_a_fifo_does_not_block() {
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path();
        mkfifo(&root.join("pipe.toml"));
        std::fs::create_dir(root.join("dir.toml")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let root2 = root.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(read_in_repo(
                &root2,
                Path::new("pipe.toml"),
                FileKind::Config,
            ));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO must not block");
        assert!(matches!(r, Err(FileError::NotRegular("a FIFO"))), "{r:?}");
        // The swap race: the type check passed, the open must not block either.
        let r = read_regular_without_precheck(&root.join("pipe.toml"));
        assert!(r.is_ok(), "O_NONBLOCK open of a FIFO returns at once");
        let r = read_in_repo(root, Path::new("dir.toml"), FileKind::Config);
        assert!(
            matches!(r, Err(FileError::NotRegular("a directory"))),
            "{r:?}"
        );
        let r = read_regular(Path::new("/dev/zero"), FileKind::Config);
        assert!(matches!(r, Err(FileError::NotRegular("a device"))), "{r:?}");
    }

    /// The open half of [`read_regular`] alone, to show it cannot block on a FIFO.
    fn read_regular_without_precheck(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)
    }

    #[test]
    fn sizes_are_capped_by_metadata_and_by_bytes_read() {
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path();
        let at_cap = vec![b'#'; POLICY_CAP as usize];
        std::fs::write(root.join("at_cap.rhai"), &at_cap).unwrap();
        std::fs::write(root.join("over.rhai"), [&at_cap[..], b"#"].concat()).unwrap();
        let read = |p: &str| read_in_repo(root, Path::new(p), FileKind::Policy);
        assert_eq!(read("at_cap.rhai").unwrap().len(), POLICY_CAP as usize);
        assert!(matches!(read("over.rhai"), Err(FileError::TooLarge { .. })));
        // A source that declares 0 bytes (as /proc files do) and yields more is still cut off.
        let endless = std::io::repeat(b'a');
        let r = read_capped(endless, 0, FileKind::Secret);
        assert!(
            matches!(
                r,
                Err(FileError::TooLarge {
                    cap: SECRET_CAP,
                    ..
                })
            ),
            "{r:?}"
        );
        let r = read_capped(&b"\xff\xfe"[..], 2, FileKind::Secret);
        assert!(matches!(r, Err(FileError::NotUtf8 { line: 1, column: 1 })));
    }

    #[test]
    fn secrets_are_read_only_under_their_roots() {
        let roots = tempfile::tempdir().unwrap();
        let extra = vec![roots.path().to_path_buf()];
        std::fs::write(roots.path().join("key"), "k\n").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("key"), "no").unwrap();
        symlink(elsewhere.path().join("key"), roots.path().join("link")).unwrap();

        assert_eq!(
            read_secret(&roots.path().join("key"), &extra).unwrap(),
            "k\n"
        );
        let r = read_secret(&elsewhere.path().join("key"), &extra);
        assert!(
            matches!(r, Err(FileError::OutsideSecretRoots { .. })),
            "{r:?}"
        );
        let r = read_secret(&roots.path().join("link"), &extra);
        assert!(
            matches!(r, Err(FileError::OutsideSecretRoots { .. })),
            "{r:?}"
        );
        let r = read_secret(&roots.path().join("key"), &[]);
        assert!(
            matches!(r, Err(FileError::OutsideSecretRoots { .. })),
            "{r:?}"
        );
        let r = read_secret(Path::new("key"), &extra);
        assert!(matches!(r, Err(FileError::RelativeSecret)));
        let sneaky = roots.path().join("../x");
        let r = read_secret(&sneaky, &extra);
        assert!(matches!(r, Err(FileError::ParentDir)));
        let r = read_secret(Path::new("/proc/self/environ"), &[PathBuf::from("/proc")]);
        assert!(r.is_err(), "a /proc file is not a secret: {r:?}");
    }
}
