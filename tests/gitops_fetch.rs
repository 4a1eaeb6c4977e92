//! A git host that stops answering while the gateway runs: `git daemon` on loopback behind a TCP
//! proxy that, on command, accepts connections and never answers. Each fetch runs in a child
//! process killed at `--fetch-timeout`: the stuck connection is closed (nothing is left holding
//! it), the reload is reported failed, the next commit is served once the host answers again,
//! and SIGTERM during a stuck fetch ends the gateway and its fetch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const AUTH: (&str, &str) = ("Authorization", "Bearer admin-t0ken");

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `git daemon` serving the repositories under `base` on a loopback port; `None` (the test is
/// skipped, loudly) where git has no daemon.
fn git_daemon(base: &Path) -> Option<(Daemon, u16)> {
    let port = dead_port();
    let child = std::process::Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIPPED: no `git daemon` here");
        return None;
    };
    let daemon = Daemon(child);
    let up = wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    if !up {
        eprintln!("SKIPPED: `git daemon` did not start");
        return None;
    }
    Some((daemon, port))
}

/// A TCP proxy to `upstream` that, while `stall` is set, accepts connections and holds them
/// without a byte in either direction.
struct StallProxy {
    port: u16,
    stall: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl StallProxy {
    fn start(upstream: u16) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stall = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (s, h) = (Arc::clone(&stall), Arc::clone(&held));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if s.load(Ordering::SeqCst) {
                    h.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        StallProxy { port, stall, held }
    }

    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Whether held connection `i` was closed by the gateway's side (EOF after what it sent).
    fn closed(&self, i: usize) -> bool {
        let mut conn = self.held.lock().unwrap()[i].try_clone().unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn config(body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "routes/main.toml",
        format!(
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        ),
    )]
}

#[test]
fn a_stalled_fetch_is_killed_at_its_deadline_and_the_next_commit_is_served() {
    let base = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(base.path().join("config.git")).unwrap();
    commit_files(&repo, "main", &as_refs(&config("v1")), "first");
    let Some((_daemon, daemon_port)) = git_daemon(base.path()) else {
        return;
    };
    let proxy = StallProxy::start(daemon_port);
    let url = format!("git://127.0.0.1:{}/config.git", proxy.port);
    let cache = tempfile::tempdir().unwrap();
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--poll",
            "0",
            // Long enough for a healthy fetch on a loaded machine, short enough to wait out.
            "--fetch-timeout",
            "5s",
        ],
        &[("RUSTYGATE_ADMIN_TOKEN", "admin-t0ken")],
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    // The host stalls: the fetch is killed at its deadline, its connection closed, the reload
    // reported failed, and v1 keeps serving.
    proxy.stall.store(true, Ordering::SeqCst);
    commit_files(&repo, "main", &as_refs(&config("v2")), "second");
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(wait_until(Duration::from_secs(30), || {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish within"))
    }));
    assert_eq!(proxy.held(), 1);
    assert!(
        wait_until(Duration::from_secs(15), || proxy.closed(0)),
        "the stuck fetch's connection is still open"
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    // The host answers again: the next reload serves the new commit.
    proxy.stall.store(false, Ordering::SeqCst);
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(Duration::from_secs(30), || gw
        .get("/")
        .is_some_and(|(_, b)| b == "v2")));
    assert_eq!(gw.status()["last_fetch_error"], serde_json::Value::Null);

    // SIGTERM in the middle of a stuck fetch: the gateway exits, and the fetch with it.
    proxy.stall.store(true, Ordering::SeqCst);
    commit_files(&repo, "main", &as_refs(&config("v3")), "third");
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(Duration::from_secs(15), || proxy.held() == 2));
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert!(
        wait_until(Duration::from_secs(15), || matches!(
            gw.child.try_wait(),
            Ok(Some(s)) if s.success()
        )),
        "the gateway did not exit on SIGTERM during a stuck fetch"
    );
    assert!(
        wait_until(Duration::from_secs(15), || proxy.closed(1)),
        "the fetch outlived the gateway"
    );
    // Nothing was left writing the mirror: the next gateway on this cache dir starts and
    // serves the newest commit it can fetch.
    proxy.stall.store(false, Ordering::SeqCst);
    drop(gw);
    let gw = GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--poll",
            "0",
        ],
        &[],
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v3".into()));
    let _ = std::io::stderr().flush();
}

/// A TCP proxy to `upstream` that passes at most `limit` bytes from the server to each client,
/// then holds the connection without a byte more (a host that stalls mid-pack).
struct CutProxy {
    port: u16,
    limit: Arc<std::sync::atomic::AtomicUsize>,
    /// Past the limit, close the connection (a failed fetch) instead of holding it.
    close: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(upstream: u16) -> CutProxy {
        use std::sync::atomic::AtomicUsize;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let limit = Arc::new(AtomicUsize::new(usize::MAX));
        let close = Arc::new(AtomicBool::new(false));
        let (l, cl) = (Arc::clone(&limit), Arc::clone(&close));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                let cap = l.load(Ordering::SeqCst);
                let close = cl.load(Ordering::SeqCst);
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut passed = 0usize;
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min(cap - passed),
                        };
                        if c_out.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        passed += n;
                        if passed >= cap {
                            if close {
                                let _ = c_out.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            // Hold the connection until the client gives up on it.
                            let _ = c_out.read(&mut [0u8; 1]);
                            return;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CutProxy { port, limit, close }
    }
}

fn temp_packs(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("mirror/objects/pack"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pack_git2_") || n.starts_with("tmp_pack_"))
        .collect()
}

/// A fetch killed at `--fetch-timeout` in the middle of a pack leaves no temporary pack file
/// in the mirror (each would stay on the cache volume for good), and one left by a crash is
/// removed at start-up.
#[test]
fn a_fetch_killed_mid_pack_leaves_no_temporary_pack() {
    let base = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(base.path().join("config.git")).unwrap();
    commit_files(&repo, "main", &as_refs(&config("v1")), "first");
    let Some((_daemon, daemon_port)) = git_daemon(base.path()) else {
        return;
    };
    let proxy = CutProxy::start(daemon_port);
    let url = format!("git://127.0.0.1:{}/config.git", proxy.port);
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--repo",
        &url,
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--poll",
        "0",
        "--fetch-timeout",
        "5s",
    ];
    let gw = GatewayProcess::start(&args, &[("RUSTYGATE_ADMIN_TOKEN", "admin-t0ken")]);
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    // 4 MiB that do not compress, so the pack is far larger than what the host sends.
    let mut files = config("v2");
    files.push(("assets/noise.txt", noise(4 << 20)));
    commit_files(&repo, "main", &as_refs(&files), "big");
    proxy.limit.store(512 * 1024, Ordering::SeqCst);
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(wait_until(Duration::from_secs(30), || {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish within"))
    }));
    assert_eq!(temp_packs(cache.path()), Vec::<String>::new());
    drop(gw);

    // One left by a crash: gone once the next gateway has the cache dir.
    let left = cache.path().join("mirror/objects/pack/pack_git2_XyZ123");
    std::fs::write(&left, b"PACK partial").unwrap();
    proxy.limit.store(usize::MAX, Ordering::SeqCst);
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap(), (200, "v2".into()));
    assert!(!left.exists());
    assert_eq!(temp_packs(cache.path()), Vec::<String>::new());
}

/// The in-process fetch (the library's default, and `serve` where it cannot start its fetch
/// process) leaves no temporary `pack_git2_*` in the mirror when the host cuts the pack short
/// or the fetch is cancelled: libgit2 unlinks a pack it did not commit when its indexer is
/// freed (`git_packfile_free(pack, !pack_committed)`), so unlike the killed fetch process it
/// needs no cleanup of ours. This keeps that true across libgit2 upgrades.
#[test]
fn an_in_process_fetch_cut_mid_pack_leaves_no_temporary_pack() {
    use rustygate::compile::CompileOptions;
    use rustygate::source::{Loaded, Source, SourceSpec};
    let base = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(base.path().join("config.git")).unwrap();
    let v1 = commit_files(&repo, "main", &as_refs(&config("v1")), "first").to_string();
    let Some((_daemon, daemon_port)) = git_daemon(base.path()) else {
        return;
    };
    let proxy = CutProxy::start(daemon_port);
    let url = format!("git://127.0.0.1:{}/config.git", proxy.port);
    let cache = tempfile::tempdir().unwrap();
    let spec =
        SourceSpec::from_repo_arg(&url, "main", None, None, Some(cache.path().to_path_buf()))
            .unwrap();
    let opts = CompileOptions::default();
    let mut source = Source::new(spec);
    let first = source.load_first(&opts).unwrap();
    assert!(matches!(first, Loaded::Candidate(c) if c.version_id == v1));

    let mut files = config("v2");
    files.push(("assets/noise.txt", noise(4 << 20)));
    commit_files(&repo, "main", &as_refs(&files), "big");
    proxy.limit.store(512 * 1024, Ordering::SeqCst);
    proxy.close.store(true, Ordering::SeqCst);
    let Err(e) = source.load(Some(&v1), None, false, &opts) else {
        panic!("the cut fetch succeeded");
    };
    assert!(e.to_string().contains("could not read from remote"), "{e}");
    assert_eq!(temp_packs(cache.path()), Vec::<String>::new());
    // Cancelled (shutdown) at its first progress report, mid-pack.
    proxy.limit.store(usize::MAX, Ordering::SeqCst);
    proxy.close.store(false, Ordering::SeqCst);
    source.cancel_flag().store(true, Ordering::SeqCst);
    let Err(e) = source.load(Some(&v1), None, false, &opts) else {
        panic!("the cancelled fetch succeeded");
    };
    assert!(
        matches!(e, rustygate::source::SourceError::Cancelled),
        "{e}"
    );
    assert_eq!(temp_packs(cache.path()), Vec::<String>::new());
}

/// `len` bytes of printable noise that does not compress.
fn noise(len: usize) -> String {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// The command lines of the children of `pid` (`/proc/<child>/cmdline`, NULs as spaces).
fn children_cmdlines(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after its `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid)
            && let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
        {
            out.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    out
}

/// The git URL's password is not on the fetch process's command line, which any local user
/// can read (`ps`); the fetch still gets the URL.
#[test]
fn the_fetch_process_command_line_holds_no_url_password() {
    // Accepts, never answers: the fetch child stays up long enough to be looked at.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let url = format!("http://alice:URL-PASSWORD@127.0.0.1:{port}/cfg.git");
    let cache = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args([
            "serve",
            "--repo",
            &url,
            "--poll",
            "0",
            "--fetch-timeout",
            "20s",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut fetch = None;
    let seen = wait_until(Duration::from_secs(15), || {
        fetch = children_cmdlines(child.id())
            .into_iter()
            .find(|c| c.contains("__fetch"));
        fetch.is_some() && !held.lock().unwrap().is_empty()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "no fetch process reached the host");
    let fetch = fetch.unwrap();
    assert!(!fetch.contains("URL-PASSWORD"), "{fetch}");
}
