//! `--require-signed` with real SSH signatures: keys made by `ssh-keygen`, commits signed the
//! way git signs them (`ssh-keygen -Y sign -n git` over the commit object, stored in the
//! `gpgsig` header), and one made by `git commit -S` with `gpg.format=ssh`. The gateway is the
//! real binary following a bare repository over `file://`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rustygate::source::signing::{RefusalReason, SignedMode, SigningPolicy, check};

const TOKEN: &str = "admin-t0ken";
const AUTH: (&str, &str) = ("Authorization", "Bearer admin-t0ken");

/// An ed25519 key pair made by `ssh-keygen`: the private key file and the public key line.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen (openssh-client) is needed for the signing tests")
        .success();
    assert!(ok, "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let fields: Vec<&str> = public.split_whitespace().take(2).collect();
    (path, fields.join(" "))
}

fn tree(repo: &git2::Repository, body: &str) -> git2::Oid {
    let route = format!(
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
    );
    let blob = repo.blob(route.as_bytes()).unwrap();
    let mut routes = repo.treebuilder(None).unwrap();
    routes.insert("main.toml", blob, 0o100644).unwrap();
    let routes = routes.write().unwrap();
    let mut root = repo.treebuilder(None).unwrap();
    root.insert("routes", routes, 0o040000).unwrap();
    root.write().unwrap()
}

/// Commits a config answering `body` on `main`, signed with `key` as git does (`None`:
/// unsigned), committed at `when` (unix seconds; `None`: now).
fn commit(repo: &git2::Repository, body: &str, key: Option<&Path>, when: Option<i64>) -> String {
    let tree = repo.find_tree(tree(repo, body)).unwrap();
    let sig = match when {
        Some(t) => git2::Signature::new("Ana", "ana@example.com", &git2::Time::new(t, 0)),
        None => git2::Signature::now("Ana", "ana@example.com"),
    }
    .unwrap();
    let parent = repo
        .find_reference("refs/heads/main")
        .ok()
        .and_then(|r| r.peel_to_commit().ok());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let oid = match key {
        None => repo
            .commit(None, &sig, &sig, body, &tree, &parents)
            .unwrap(),
        Some(key) => {
            let buf = repo
                .commit_create_buffer(&sig, &sig, body, &tree, &parents)
                .unwrap();
            let signature = ssh_sign(key, &buf);
            repo.commit_signed(std::str::from_utf8(&buf).unwrap(), &signature, None)
                .unwrap()
        }
    };
    repo.reference("refs/heads/main", oid, true, "test")
        .unwrap();
    oid.to_string()
}

/// `ssh-keygen -Y sign -n git`, what git runs for `gpg.format ssh`.
fn ssh_sign(key: &Path, data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("commit");
    std::fs::write(&file, data).unwrap();
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "git", "-f"])
        .arg(key)
        .arg(&file)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen -Y sign failed");
    std::fs::read_to_string(file.with_extension("sig")).unwrap()
}

struct Setup {
    keys: tempfile::TempDir,
    alice: PathBuf,
    mallory: PathBuf,
    allowed: PathBuf,
    repo_dir: tempfile::TempDir,
    repo: git2::Repository,
    url: String,
    cache: tempfile::TempDir,
}

/// A bare repo, keys for alice (listed) and mallory (not), and the allowed signers file with
/// alice's line as `alice_line` makes it (`{key}` is replaced by her public key).
fn setup(alice_line: &str) -> Setup {
    let keys = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = keygen(keys.path(), "alice");
    let (mallory, _) = keygen(keys.path(), "mallory");
    let allowed = keys.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!(
            "# who may change the gateway\n{}\n",
            alice_line.replace("{key}", &alice_pub)
        ),
    )
    .unwrap();
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(repo_dir.path()).unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    Setup {
        keys,
        alice,
        mallory,
        allowed,
        repo_dir,
        repo,
        url,
        cache: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn start(&self, mode: &str) -> GatewayProcess {
        GatewayProcess::start(
            &[
                "--repo",
                &self.url,
                "--cache-dir",
                self.cache.path().to_str().unwrap(),
                "--poll",
                "0",
                "--require-signed",
                mode,
                "--allowed-signers",
                self.allowed.to_str().unwrap(),
            ],
            &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
        )
    }

    /// `git verify-commit` with the same allowed signers file: git's own verdict.
    fn git_verifies(&self, sha: &str) -> bool {
        Command::new("git")
            .arg("-C")
            .arg(self.repo_dir.path())
            .arg("-c")
            .arg(format!(
                "gpg.ssh.allowedSignersFile={}",
                self.allowed.display()
            ))
            .args(["verify-commit", sha])
            .output()
            .expect("git is needed for this test")
            .status
            .success()
    }

    fn policy(&self, mode: SignedMode) -> SigningPolicy {
        SigningPolicy {
            mode,
            allowed_signers: self.allowed.clone(),
        }
    }
}

fn reload_until_attempted(gw: &GatewayProcess, sha: &str) {
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(
        wait_until(Duration::from_secs(15), || gw.status()["attempted"]["sha"]
            == sha),
        "{}",
        gw.status()
    );
}

#[test]
fn signed_commits_are_served_unsigned_and_unknown_keys_are_held() {
    let s = setup("alice@example.com namespaces=\"git\" {key}");
    let v1 = commit(&s.repo, "v1", Some(&s.alice), None);
    let gw = s.start("head");
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v1.as_str());
    assert_eq!(st["applied"]["signer"], "alice@example.com");

    // Unsigned: held, the last good config keeps serving, reported everywhere.
    let v2 = commit(&s.repo, "v2", None, None);
    reload_until_attempted(&gw, &v2);
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v1.as_str());
    assert_eq!(st["attempted"]["ok"], false);
    assert_eq!(st["attempted"]["reason"], "unsigned-commit");
    assert_eq!(st["attempted"]["errors"][0]["code"], "unsigned-commit");
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    assert_eq!(
        gw.metric("rustygate_config_commits_refused_total{reason=\"unsigned-commit\"}"),
        Some(1.0)
    );
    assert_eq!(
        gw.metric("rustygate_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    // The log line carries the reason (the log is written in batches).
    assert!(wait_until(Duration::from_secs(10), || gw
        .logs
        .lock()
        .unwrap()
        .contains("\"reason\":\"unsigned-commit\"")));

    // Signed by a key that is not in the allowed signers file: held too.
    let v3 = commit(&s.repo, "v3", Some(&s.mallory), None);
    reload_until_attempted(&gw, &v3);
    let st = gw.status();
    assert_eq!(st["attempted"]["reason"], "bad-signature");
    assert!(st["attempted"].get("signer").is_none(), "{st}");
    let message = st["attempted"]["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("not in the allowed signers file"),
        "{message}"
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    // A forced reload does not get around the check.
    gw.admin_post("/admin/reload?force=true", &[AUTH], b"");
    assert!(wait_until(Duration::from_secs(15), || gw.metric(
        "rustygate_config_commits_refused_total{reason=\"bad-signature\"}"
    ) == Some(2.0)));
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    // Signed by alice again: served.
    let v4 = commit(&s.repo, "v4", Some(&s.alice), None);
    reload_until_attempted(&gw, &v4);
    assert_eq!(gw.get("/").unwrap(), (200, "v4".into()));
    assert_eq!(gw.status()["applied"]["signer"], "alice@example.com");
}

#[test]
fn all_mode_catches_an_unsigned_commit_in_the_middle() {
    let s = setup("alice@example.com {key}");
    let v1 = commit(&s.repo, "v1", Some(&s.alice), None);
    let gw = s.start("all");
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));

    let middle = commit(&s.repo, "v2", None, None);
    let head = commit(&s.repo, "v3", Some(&s.alice), None);
    // `head` alone would pass.
    let since = git2::Oid::from_str(&v1).unwrap();
    let head_oid = git2::Oid::from_str(&head).unwrap();
    assert!(
        check(&s.repo, head_oid, Some(since), &s.policy(SignedMode::Head))
            .unwrap()
            .is_ok()
    );
    let refusal = check(&s.repo, head_oid, Some(since), &s.policy(SignedMode::All))
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::Unsigned);
    assert_eq!(refusal.commit, middle);

    reload_until_attempted(&gw, &head);
    let st = gw.status();
    assert_eq!(st["attempted"]["reason"], "unsigned-commit");
    let message = st["attempted"]["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains(&middle[..12]), "{message}");
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    assert_eq!(st["applied"]["sha"], v1.as_str());
}

#[test]
fn the_signers_window_is_checked_at_the_commit_time() {
    // 2020-01-01 .. 2021-01-01 (UTC).
    let s = setup("alice@example.com valid-after=\"20200101Z\",valid-before=\"20210101Z\" {key}");
    let inside = commit(&s.repo, "inside", Some(&s.alice), Some(1_590_969_600)); // 2020-06-01
    let policy = s.policy(SignedMode::Head);
    let oid = |sha: &str| git2::Oid::from_str(sha).unwrap();
    assert_eq!(
        check(&s.repo, oid(&inside), None, &policy).unwrap(),
        Ok("alice@example.com".to_owned())
    );
    assert!(s.git_verifies(&inside), "git disagrees");
    for (when, word) in [(1_640_995_200, "before"), (1_546_300_800, "after")] {
        let outside = commit(&s.repo, "outside", Some(&s.alice), Some(when));
        let refusal = check(&s.repo, oid(&outside), None, &policy)
            .unwrap()
            .unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::BadSignature);
        assert_eq!(refusal.principal.as_deref(), Some("alice@example.com"));
        assert!(
            refusal.message.contains(&format!("valid only {word}")),
            "{}",
            refusal.message
        );
        assert!(!s.git_verifies(&outside), "git disagrees");
    }

    // Served end to end: a commit made now is outside the window and is not served; with
    // nothing good to serve the gateway does not start.
    commit(&s.repo, "now", Some(&s.alice), None);
    let out = serve_expecting_exit(&s, "head");
    assert_eq!(out.0, Some(1), "{}", out.1);
    assert!(out.1.contains("bad-signature"), "{}", out.1);
    assert!(out.1.contains("valid only before"), "{}", out.1);
}

#[test]
fn a_key_listed_for_other_namespaces_does_not_sign_commits() {
    let s = setup("alice@example.com namespaces=\"file\" {key}");
    let sha = commit(&s.repo, "v1", Some(&s.alice), None);
    let refusal = check(
        &s.repo,
        git2::Oid::from_str(&sha).unwrap(),
        None,
        &s.policy(SignedMode::Head),
    )
    .unwrap()
    .unwrap_err();
    assert_eq!(refusal.reason, RefusalReason::BadSignature);
    assert!(
        refusal.message.contains("namespaces"),
        "{}",
        refusal.message
    );
    assert!(!s.git_verifies(&sha), "git disagrees");
}

/// Runs `serve`, expecting it to exit by itself (it refuses to start); (exit code, stderr).
fn serve_expecting_exit(s: &Setup, mode: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["serve", "--repo", &s.url, "--cache-dir"])
        .arg(s.cache.path())
        .args(["--poll", "0", "--require-signed", mode, "--allowed-signers"])
        .arg(&s.allowed)
        .args(["--listen", &format!("127.0.0.1:{}", dead_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", dead_port())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn an_unsigned_head_at_start_up_is_not_served() {
    let s = setup("alice@example.com {key}");
    commit(&s.repo, "v1", None, None);
    let (code, stderr) = serve_expecting_exit(&s, "head");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unsigned-commit"), "{stderr}");
}

/// A working copy signed by `git commit -S` with `gpg.format=ssh`, the setup the README
/// documents; `validate --require-signed` checks its HEAD as CI would.
#[test]
fn git_commit_dash_s_is_verified_and_validate_checks_head() {
    let s = setup("alice@example.com namespaces=\"git\" {key}");
    let work = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(work.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", s.keys.path())
            .output()
            .expect("git is needed for this test");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["config", "user.name", "Alice"]);
    git(&["config", "user.email", "alice@example.com"]);
    git(&["config", "gpg.format", "ssh"]);
    git(&["config", "user.signingkey", s.alice.to_str().unwrap()]);
    write_files(
        work.path(),
        &[(
            "routes/main.toml",
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
        )],
    );
    git(&["add", "."]);
    git(&["commit", "-q", "-S", "-m", "signed by git"]);
    let base = String::from_utf8(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(work.path())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();

    let validate = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .arg("validate")
            .arg(work.path())
            .args(["--allowed-signers", s.allowed.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = validate(&["--require-signed", "head"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("signed by alice@example.com"), "{stderr}");

    // An unsigned commit on top, then a signed one: `head` passes, `all --base` does not.
    std::fs::write(work.path().join("README"), "unsigned\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "--no-gpg-sign", "-m", "unsigned"]);
    let (code, stderr) = validate(&["--require-signed", "head"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unsigned-commit"), "{stderr}");
    std::fs::write(work.path().join("README"), "signed again\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-S", "-m", "signed again"]);
    assert_eq!(validate(&["--require-signed", "head"]).0, Some(0));
    let (code, stderr) = validate(&["--require-signed", "all", "--base", base.trim()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unsigned-commit"), "{stderr}");
    // `all` needs --base.
    assert_eq!(validate(&["--require-signed", "all"]).0, Some(2));
}
