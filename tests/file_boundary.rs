//! Every file a config names goes through one reader: inside the repo root after symlinks (or a
//! secret root for `{ file = ... }` secrets), a regular file, size-capped. Seen from outside:
//! real directories, real symlinks, a real FIFO, real git repositories, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustygate::compile::{CompileOptions, Compiled, compile_dir};
use rustygate::source::{Loaded, Source, SourceSpec};

const UPSTREAM: (&str, &str) = (
    "upstreams/orders.toml",
    "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\n",
);

/// Text that must never show up in a diagnostic: it lives outside the repo.
const OUTSIDE: &str = "OUTSIDE_THE_REPO_7Q2 = (";

fn route_with(extra: &str) -> String {
    format!("[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n{extra}\n")
}

fn compile_opts(roots: &[&Path]) -> CompileOptions {
    CompileOptions {
        resolve_secrets: true,
        secret_roots: roots.iter().map(|p| p.to_path_buf()).collect(),
        ..CompileOptions::default()
    }
}

fn compile(dir: &Path) -> Compiled {
    compile_dir(dir, &compile_opts(&[])).unwrap()
}

/// `code file:line:col` of every diagnostic.
fn summary(c: &Compiled) -> Vec<String> {
    c.diagnostics
        .iter()
        .map(|d| {
            let at = d.primary.as_ref().map(|p| {
                let (l, col) = c.files.line_col(p.file, p.span.start);
                format!("{}:{l}:{col}", c.files.name(p.file))
            });
            format!("{} {}", d.code, at.unwrap_or_default())
        })
        .collect()
}

/// Everything a user would see of the diagnostics, in every format.
fn rendered(c: &Compiled) -> String {
    format!(
        "{}{}{}",
        c.diagnostics.render_human(&c.files),
        c.diagnostics.render_short(&c.files),
        serde_json::to_string(&c.diagnostics.to_json(&c.files)).unwrap()
    )
}

/// A directory outside any repo holding `name` with [`OUTSIDE`] as content.
fn outside_file(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, OUTSIDE).unwrap();
    (dir, path)
}

fn assert_refused(c: &Compiled, expected: &[&str]) {
    assert_eq!(summary(c), expected);
    assert!(c.snapshot.is_none());
    let shown = rendered(c);
    assert!(!shown.contains("OUTSIDE_THE_REPO"), "{shown}");
}

#[test]
fn a_policy_symlinked_out_of_the_repo_is_a_located_error_showing_nothing_of_it() {
    let (_out, target) = outside_file("p.rhai");
    let dir = common::repo(&[
        UPSTREAM,
        ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
    ]);
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    symlink(&target, dir.path().join("policies/p.rhai")).unwrap();
    let c = compile(dir.path());
    assert_refused(&c, &["invalid-path routes/a.toml:5:10"]);
    assert!(
        c.diagnostics
            .iter()
            .next()
            .unwrap()
            .message
            .contains("outside the config repo")
    );
}

#[test]
fn a_symlinked_directory_leading_out_is_refused() {
    let (out, _) = outside_file("p.rhai");
    std::fs::write(out.path().join("evil.toml"), OUTSIDE).unwrap();
    let dir = common::repo(&[
        UPSTREAM,
        ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
    ]);
    symlink(out.path(), dir.path().join("policies")).unwrap();
    let c = compile(dir.path());
    assert_refused(&c, &["invalid-path routes/a.toml:5:10"]);

    // The whole `routes/` directory is a link out: one error, named after it.
    let dir = common::repo(&[UPSTREAM]);
    symlink(out.path(), dir.path().join("routes")).unwrap();
    let c = compile(dir.path());
    assert_refused(
        &c,
        &[
            "invalid-path routes:1:1",
            "unused-upstream upstreams/orders.toml:1:11",
        ],
    );

    // One routes file that is a link out.
    let dir = common::repo(&[UPSTREAM, ("routes/a.toml", &route_with(""))]);
    symlink(
        out.path().join("evil.toml"),
        dir.path().join("routes/evil.toml"),
    )
    .unwrap();
    let c = compile(dir.path());
    assert_refused(&c, &["invalid-path routes/evil.toml:1:1"]);
}

#[test]
fn dotdot_and_absolute_paths_are_refused() {
    let (_out, target) = outside_file("ca.pem");
    for (path, col) in [("../x.rhai", 10), ("policies/../../x.rhai", 10)] {
        let dir = common::repo(&[
            UPSTREAM,
            (
                "routes/a.toml",
                &route_with(&format!("policy = \"{path}\"")),
            ),
        ]);
        assert_refused(
            &compile(dir.path()),
            &[&format!("invalid-path routes/a.toml:5:{col}")],
        );
    }
    let dir = common::repo(&[
        ("routes/a.toml", &route_with("")),
        (
            "upstreams/orders.toml",
            &format!(
                "[upstream.orders]\ntargets = [\"https://127.0.0.1:8443\"]\ntls = {{ ca_file = {:?} }}\n",
                target.display().to_string()
            ),
        ),
    ]);
    assert_refused(
        &compile(dir.path()),
        &["invalid-path upstreams/orders.toml:3:19"],
    );
}

#[test]
fn a_certificate_symlinked_out_is_refused() {
    let (_out, target) = outside_file("ca.pem");
    let dir = common::repo(&[
        ("routes/a.toml", &route_with("")),
        (
            "upstreams/orders.toml",
            "[upstream.orders]\ntargets = [\"https://127.0.0.1:8443\"]\ntls = { ca_file = \"certs/ca.pem\" }\n",
        ),
    ]);
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    symlink(&target, dir.path().join("certs/ca.pem")).unwrap();
    assert_refused(
        &compile(dir.path()),
        &["invalid-path upstreams/orders.toml:3:19"],
    );
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// Runs `f` on a thread and fails the test if it has not returned within 20 s.
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("reading the config hung")
}

#[test]
fn fifos_are_reported_not_opened() {
    let dir = common::repo(&[
        UPSTREAM,
        ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
    ]);
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    mkfifo(&dir.path().join("policies/p.rhai"));
    mkfifo(&dir.path().join("routes/b.toml"));
    mkfifo(&dir.path().join("gateway.toml"));
    let path = dir.path().to_path_buf();
    let c = within_20s(move || compile(&path));
    assert_refused(
        &c,
        &[
            "not-a-file gateway.toml:1:1",
            "not-a-file routes/b.toml:1:1",
            "not-a-file routes/a.toml:5:10",
        ],
    );
    assert!(
        c.diagnostics
            .iter()
            .next()
            .unwrap()
            .message
            .contains("FIFO")
    );
}

#[test]
fn files_over_their_cap_are_located_errors() {
    let big_comment = |n: usize| format!("{}\n", "#".repeat(n));
    // Policy: 1 MiB.
    let dir = common::repo(&[
        UPSTREAM,
        ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
        ("policies/p.rhai", &big_comment(1024 * 1024)),
    ]);
    assert_refused(&compile(dir.path()), &["file-too-large routes/a.toml:5:10"]);
    // Config file: 8 MiB.
    let dir = common::repo(&[
        UPSTREAM,
        ("routes/a.toml", &route_with("")),
        ("routes/b.toml", &big_comment(8 * 1024 * 1024)),
    ]);
    assert_refused(&compile(dir.path()), &["file-too-large routes/b.toml:1:1"]);
    // Secret: 64 KiB.
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("key");
    std::fs::write(&key, "k".repeat(64 * 1024 + 1)).unwrap();
    let dir = common::repo(&[
        UPSTREAM,
        (
            "routes/a.toml",
            &secret_route(&format!("{{ file = {:?} }}", key.display().to_string())),
        ),
    ]);
    let c = compile_dir(dir.path(), &compile_opts(&[secrets.path()])).unwrap();
    assert_refused(&c, &["file-too-large routes/a.toml:5:37"]);
    // Just under each cap is fine.
    std::fs::write(&key, "k".repeat(64 * 1024)).unwrap();
    let c = compile_dir(dir.path(), &compile_opts(&[secrets.path()])).unwrap();
    assert_eq!(summary(&c), Vec::<String>::new());
}

fn secret_route(reference: &str) -> String {
    route_with(&format!(
        "request_headers = {{ set = {{ x-key = {reference} }} }}"
    ))
}

#[test]
fn file_secrets_are_read_only_under_secret_roots() {
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let (_out, outside) = outside_file("key");
    symlink(&outside, secrets.path().join("link")).unwrap();
    let file_ref = |p: &Path| secret_route(&format!("{{ file = {:?} }}", p.display().to_string()));

    // Not under a root: refused whether or not secrets are read.
    let dir = common::repo(&[UPSTREAM, ("routes/a.toml", &file_ref(&key))]);
    assert_refused(&compile(dir.path()), &["invalid-path routes/a.toml:5:37"]);
    let no_env = CompileOptions::default();
    assert_refused(
        &compile_dir(dir.path(), &no_env).unwrap(),
        &["invalid-path routes/a.toml:5:37"],
    );
    // Under a root given by the operator: read.
    let c = compile_dir(dir.path(), &compile_opts(&[secrets.path()])).unwrap();
    assert_eq!(summary(&c), Vec::<String>::new());
    assert!(c.snapshot.is_some());
    // A link in the root that leads out of it, a relative path, a path climbing out.
    for p in [
        secrets.path().join("link"),
        "key".into(),
        secrets.path().join("../key"),
    ] {
        let dir = common::repo(&[UPSTREAM, ("routes/a.toml", &file_ref(&p))]);
        let c = compile_dir(dir.path(), &compile_opts(&[secrets.path()])).unwrap();
        assert_refused(&c, &["invalid-path routes/a.toml:5:37"]);
    }
}

#[test]
fn env_secrets_never_name_the_gateways_own_variables() {
    for var in [
        "RUSTYGATE_ADMIN_TOKEN",
        "RUSTYGATE_WEBHOOK_SECRET",
        "rustygate_git_token",
    ] {
        let dir = common::repo(&[
            UPSTREAM,
            (
                "routes/a.toml",
                &secret_route(&format!("{{ env = \"{var}\" }}")),
            ),
        ]);
        for resolve_secrets in [true, false] {
            let opts = CompileOptions {
                resolve_secrets,
                ..CompileOptions::default()
            };
            let c = compile_dir(dir.path(), &opts).unwrap();
            assert_eq!(
                summary(&c),
                ["forbidden-secret routes/a.toml:5:37"],
                "{var}"
            );
            assert!(c.snapshot.is_none());
        }
    }
}

#[test]
fn fixtures_follow_the_same_rules() {
    let (out, _) = outside_file("t.toml");
    let dir = common::repo(&[UPSTREAM, ("routes/a.toml", &route_with(""))]);
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    symlink(out.path().join("t.toml"), dir.path().join("tests/t.toml")).unwrap();
    mkfifo(&dir.path().join("tests/pipe.toml"));
    let path = dir.path().to_path_buf();
    let report = within_20s(move || rustygate::testing::run_dir(&path).unwrap());
    let got: Vec<_> = report
        .diagnostics
        .iter()
        .map(|d| {
            (
                d.code,
                report
                    .files
                    .name(d.primary.as_ref().unwrap().file)
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("not-a-file", "tests/pipe.toml".to_owned()),
            ("invalid-path", "tests/t.toml".to_owned())
        ]
    );
    assert!(report.invalid());
}

/// A git working copy with `files`, plus `links` (path, target) as symlinks, committed on main.
fn git_repo_with_links(files: &[(&str, &str)], links: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = common::repo(files);
    for (path, target) in links {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }
    let repo = git2::Repository::init(dir.path()).unwrap();
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    repo.commit(Some("refs/heads/main"), &sig, &sig, "config", &tree, &[])
        .unwrap();
    dir
}

fn load_git(dir: &Path, cache: &Path) -> rustygate::source::Candidate {
    let spec = SourceSpec::from_repo_arg(
        dir.to_str().unwrap(),
        "main",
        None,
        None,
        Some(cache.to_path_buf()),
    )
    .unwrap();
    assert!(matches!(spec, SourceSpec::Git(_)));
    match Source::new(spec)
        .load(None, None, true, &compile_opts(&[]))
        .unwrap()
    {
        Loaded::Candidate(c) => *c,
        Loaded::Unchanged { .. } => panic!("nothing loaded"),
    }
}

#[test]
fn git_exports_follow_the_same_rules_as_directories() {
    let (out, target) = outside_file("p.rhai");
    let cache = tempfile::tempdir().unwrap();
    let dir = git_repo_with_links(
        &[
            UPSTREAM,
            ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
            ("policies/inside.rhai", "fn on_request(req) { }\n"),
        ],
        &[
            ("policies/p.rhai", target.to_str().unwrap()),
            ("linked", out.path().to_str().unwrap()),
        ],
    );
    let c = load_git(dir.path(), cache.path());
    let shown = c.diagnostics.render_human(&c.files);
    let got: Vec<_> = c.diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(got, ["invalid-path"], "{shown}");
    assert!(shown.contains("routes/a.toml:5:10"), "{shown}");
    assert!(!shown.contains("OUTSIDE_THE_REPO"), "{shown}");
    assert!(c.snapshot.is_none());

    // A link that stays inside the export works as it does in a directory.
    let cache = tempfile::tempdir().unwrap();
    let dir = git_repo_with_links(
        &[
            UPSTREAM,
            ("routes/a.toml", &route_with("policy = \"policies/p.rhai\"")),
            ("policies/inside.rhai", "fn on_request(req) { }\n"),
        ],
        &[("policies/p.rhai", "inside.rhai")],
    );
    let c = load_git(dir.path(), cache.path());
    assert!(
        c.diagnostics.is_empty(),
        "{}",
        c.diagnostics.render_human(&c.files)
    );
    assert!(c.snapshot.is_some());
}

#[test]
fn cli_secret_root_flag_allows_a_secret_directory() {
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let dir = common::repo(&[
        UPSTREAM,
        (
            "routes/a.toml",
            &secret_route(&format!("{{ file = {:?} }}", key.display().to_string())),
        ),
    ]);
    let validate = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .args(["validate", "--format", "short"])
            .args(extra)
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = validate(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes/a.toml:5:37: error[invalid-path]"),
        "{err}"
    );
    assert!(err.contains("--secret-root"), "{err}");
    let out = validate(&["--secret-root", secrets.path().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const TOKEN: &str = "admin-t0ken";
const AUTH: (&str, &str) = ("Authorization", "Bearer admin-t0ken");

fn respond_config(body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "routes/main.toml",
        format!(
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        ),
    )]
}

/// A reload whose read really blocks: an object of the new commit in the remote is a FIFO,
/// which libgit2 opens (and blocks on) while packing it for the fetch. The reload is abandoned at
/// `--reload-timeout`, the next one applies the new commit while the first is still stuck, and
/// SIGTERM still exits within the grace period.
#[test]
fn a_reload_stuck_on_io_never_blocks_later_reloads_or_sigterm() {
    let remote = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(remote.path()).unwrap();
    let url = format!("file://{}", remote.path().display());
    let cache = tempfile::tempdir().unwrap();
    common::commit_files(&repo, "main", &common::as_refs(&respond_config("v1")), "v1");
    let mut gw = common::GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--poll",
            "0",
            "--reload-timeout",
            "2s",
            "--shutdown-grace",
            "3s",
        ],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    let v2 = respond_config("v2");
    common::commit_files(&repo, "main", &common::as_refs(&v2), "v2");
    // The new commit's one new blob becomes a FIFO: packing it for the fetch opens it.
    let blob = git2::Oid::hash_object(git2::ObjectType::Blob, v2[0].1.as_bytes()).unwrap();
    let hex = blob.to_string();
    let object = remote
        .path()
        .join("objects")
        .join(&hex[..2])
        .join(&hex[2..]);
    let saved = std::fs::read(&object).unwrap();
    std::fs::remove_file(&object).unwrap();
    mkfifo(&object);
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    let stuck = common::wait_until(Duration::from_secs(20), || {
        gw.status()["attempted"]["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not finish"))
    });
    assert!(stuck, "the stuck reload was not abandoned: {}", gw.status());
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()), "still serving");

    // The object is readable again; the stuck thread stays blocked on the FIFO it opened.
    std::fs::remove_file(&object).unwrap();
    std::fs::write(&object, saved).unwrap();
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    let applied = common::wait_until(Duration::from_secs(20), || {
        gw.get("/").is_some_and(|(_, b)| b == "v2")
    });
    assert!(applied, "a later reload did not apply: {}", gw.status());

    let started = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exited = common::wait_until(Duration::from_secs(15), || {
        matches!(gw.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "SIGTERM did not end the gateway");
    assert!(
        started.elapsed() < Duration::from_secs(3 + 5),
        "exit took {:?}",
        started.elapsed()
    );
}
