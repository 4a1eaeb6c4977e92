//! Fetching in a child process, so that a fetch that hangs can be stopped.
//!
//! libgit2 has no socket timeouts unless set through an `unsafe` global option (this crate
//! forbids `unsafe`), and its cancel flag is only read in the transfer-progress callback, which
//! never runs on a connection that goes silent. A thread stuck in such a fetch cannot be stopped,
//! only abandoned, keeping its socket and its thread for good. A child process can be killed:
//! `serve` runs each fetch as `rustygate __fetch` (the same binary, the same git2 code, the same
//! credentials and known-hosts check, inherited through the environment) and kills it at the
//! deadline or on shutdown, so a stuck fetch leaves nothing behind. The child also stops itself
//! at the deadline and when its parent is gone, so it never outlives the gateway.
//!
//! Only the fetch runs in the child; resolving refs, exporting and compiling stay in the
//! gateway. The child writes nothing but the mirror; the lock files a killed child leaves there
//! are removed before the next fetch starts (the gateway holds the cache dir, so no other
//! process writes the mirror).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::git::{Credentials, GitError, Mirror};

/// The hidden subcommand of the `rustygate` binary that runs one fetch.
pub const SUBCOMMAND: &str = "__fetch";

/// How a git source fetches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FetchMode {
    /// On the loading thread: used by the library and its tests; a stuck fetch can only be
    /// abandoned (see [`super::reload::load_off_loop`]).
    #[default]
    InProcess,
    /// In a child process running `exe __fetch`, killed after `deadline`. `ssl_cert_file`: the
    /// trust roots for git over HTTPS (see [`write_ca_bundle`]), given to the child's OpenSSL as
    /// `SSL_CERT_FILE`.
    Child {
        exe: PathBuf,
        deadline: Duration,
        ssl_cert_file: Option<PathBuf>,
    },
}

/// Writes `cache_dir/https-ca-bundle.pem`: the system's trust roots plus the certificates of
/// `ca_file` (`--git-ca-file`), for git over HTTPS to a host whose certificate a private CA
/// issued. libgit2 takes a CA file only through an `unsafe` global option; the child fetch
/// process gets it as OpenSSL's `SSL_CERT_FILE` instead, which replaces only the default file
/// (hence the system roots in the bundle), and touches nothing in the gateway itself.
pub fn write_ca_bundle(ca_file: &Path, cache_dir: &Path) -> Result<PathBuf, GitError> {
    use base64::Engine as _;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GitError::Io { path, source }
    };
    let extra = std::fs::read_to_string(ca_file).map_err(io(ca_file))?;
    if !extra.contains("-----BEGIN CERTIFICATE-----") {
        return Err(GitError::Fetch(format!(
            "--git-ca-file {}: no PEM certificate (`-----BEGIN CERTIFICATE-----`) in it",
            ca_file.display()
        )));
    }
    let mut bundle = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        bundle.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            bundle.push_str(&String::from_utf8_lossy(line));
            bundle.push('\n');
        }
        bundle.push_str("-----END CERTIFICATE-----\n");
    }
    bundle.push_str(&extra);
    if !extra.ends_with('\n') {
        bundle.push('\n');
    }
    let path = cache_dir.join("https-ca-bundle.pem");
    std::fs::write(&path, bundle).map_err(io(&path))?;
    Ok(path)
}

/// One fetch child at a time: the cleanup after a kill must not remove the lock files of a
/// fetch that is still running.
static FETCHING: Mutex<()> = Mutex::new(());

/// Runs one fetch of `url` into the mirror in `cache_dir` in a child process and waits for it,
/// at most `deadline` and only while `cancel` is unset; past either, the child is killed.
pub fn fetch_in_child(
    exe: &Path,
    cache_dir: &Path,
    url: &str,
    branch: Option<&str>,
    deadline: Duration,
    ssl_cert_file: Option<&Path>,
    cancel: &AtomicBool,
) -> Result<(), GitError> {
    let _one = FETCHING.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = Command::new(exe);
    if let Some(file) = ssl_cert_file {
        cmd.env("SSL_CERT_FILE", file);
    }
    // The URL may hold `user:password@`: in the environment (readable by this user and root
    // only), never on the command line, which every local user sees in `ps`.
    let mut child = cmd
        .env("RUSTYGATE_FETCH_URL", url)
        .arg(SUBCOMMAND)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--deadline-ms")
        .arg(deadline.as_millis().to_string())
        .args(branch.map(|b| ["--branch", b]).into_iter().flatten())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GitError::Io {
            path: exe.to_path_buf(),
            source,
        })?;
    // Read on a thread, so a child that writes much never blocks on a full pipe; the read ends
    // when the child does, however it ends.
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr {
            let _ = s.take(64 * 1024).read_to_string(&mut text);
        }
        text
    });
    let end = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => break None,
        }
        if cancel.load(Ordering::Relaxed) || Instant::now() >= end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        super::remove_interrupted_leftovers(&cache_dir.join("mirror"));
        return Err(GitError::FetchTimedOut(deadline));
    };
    let text = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    // The child may have stopped itself at its deadline, mid-pack.
    super::remove_interrupted_leftovers(&cache_dir.join("mirror"));
    let text = text.trim();
    Err(GitError::Fetch(if text.is_empty() {
        format!("the fetch process ended with {status}")
    } else {
        text.to_owned()
    }))
}

/// `rustygate __fetch`: fetches once into the mirror, then repacks it if needed. Stops itself
/// after `deadline`, or as soon as the process that started it is gone.
/// `branch`: fetch that branch alone (see [`Mirror::fetch`]).
pub fn child_main(
    cache_dir: PathBuf,
    url: String,
    branch: Option<String>,
    deadline: Duration,
) -> ExitCode {
    let parent = std::os::unix::process::parent_id();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("rustygate-fetch".into())
        .spawn(move || {
            let r = Mirror::open(&cache_dir, &url).and_then(|m| {
                m.fetch(
                    &Credentials::from_env(),
                    &AtomicBool::new(false),
                    branch.as_deref(),
                )?;
                // The fetch succeeded whatever the repack does; it is tried again next time.
                if let Err(e) = m.maybe_repack() {
                    eprintln!("repacking the git mirror failed: {e}");
                }
                Ok(())
            });
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        eprintln!("cannot start the fetch thread: {e}");
        return ExitCode::from(1);
    }
    let end = Instant::now() + deadline;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(())) => return ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("the fetch failed unexpectedly (panic)");
                return ExitCode::from(1);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= end {
            eprintln!("{}", GitError::FetchTimedOut(deadline));
            return ExitCode::from(1);
        }
        if std::os::unix::process::parent_id() != parent {
            return ExitCode::from(1);
        }
    }
}
