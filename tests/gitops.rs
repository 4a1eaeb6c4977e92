//! The GitOps loop end to end: the real binary following real git repositories (bare, over
//! `file://`), reloaded by the admin call, webhooks, polling and file watching.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hmac::{Hmac, Mac};

fn config(body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "routes/main.toml",
        format!(
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        ),
    )]
}

fn commit(
    repo: &git2::Repository,
    branch: &str,
    files: &[(&'static str, String)],
    msg: &str,
) -> String {
    commit_files(repo, branch, &as_refs(files), msg).to_string()
}

fn bare_repo() -> (tempfile::TempDir, git2::Repository, String) {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    (dir, repo, url)
}

fn wait_body(gw: &GatewayProcess, expected: &str) -> bool {
    wait_until(Duration::from_secs(15), || {
        gw.get("/").is_some_and(|(_, b)| b == expected)
    })
}

/// `rustygate serve` following `url` (no polling) with the cache dir `cache`.
fn serve_with_cache(url: &str, cache: &std::path::Path, envs: &[(&str, &str)]) -> GatewayProcess {
    let cache = cache.to_str().unwrap();
    GatewayProcess::start(&["--repo", url, "--cache-dir", cache, "--poll", "0"], envs)
}

const TOKEN: &str = "admin-t0ken";
const AUTH: (&str, &str) = ("Authorization", "Bearer admin-t0ken");

#[test]
fn git_source_applies_new_commits_and_keeps_the_last_good_one() {
    let (_d, repo, url) = bare_repo();
    let cache = tempfile::tempdir().unwrap();
    let v1 = commit(&repo, "main", &config("v1"), "first config");
    let gw = serve_with_cache(&url, cache.path(), &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)]);
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v1.as_str());
    assert_eq!(st["applied"]["subject"], "first config");
    assert_eq!(st["applied"]["ref"], "main");

    let v2 = commit(&repo, "main", &config("v2"), "second config");
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(wait_body(&gw, "v2"));
    assert_eq!(gw.status()["applied"]["sha"], v2.as_str());
    assert_eq!(
        gw.metric(&format!("rustygate_config_info{{sha=\"{v2}\"}}")),
        Some(1.0)
    );
    assert_eq!(
        gw.metric(&format!("rustygate_config_info{{sha=\"{v1}\"}}")),
        None
    );

    // A commit that does not compile is rejected and v2 keeps serving.
    let mut broken = config("v3");
    broken[0].1.push_str("timeout = \"soon\"\n");
    let bad = commit(&repo, "main", &broken, "broken config");
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == bad.as_str()
    ));
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v2.as_str());
    assert_eq!(st["attempted"]["ok"], false);
    let err = &st["attempted"]["errors"][0];
    assert_eq!(err["code"], "invalid-duration");
    assert_eq!(err["file"], "routes/main.toml");
    assert_eq!(err["line"], 5);
    assert_eq!(gw.get("/").unwrap(), (200, "v2".into()));
    assert_eq!(
        gw.metric("rustygate_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );

    // The failed SHA is not compiled again by an ordinary reload, only by a forced one.
    gw.admin_post("/admin/reload", &[AUTH], b"");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        gw.metric("rustygate_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    gw.admin_post("/admin/reload?force=true", &[AUTH], b"");
    assert!(wait_until(Duration::from_secs(15), || gw
        .metric("rustygate_config_reloads_total{result=\"failure\"}")
        == Some(2.0)));

    // A fixed commit is applied.
    let v4 = commit(&repo, "main", &config("v4"), "fixed");
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_body(&gw, "v4"));
    assert_eq!(gw.status()["attempted"]["ok"], true);
    assert_eq!(gw.status()["applied"]["sha"], v4.as_str());
    // Only the applied checkout is kept (cleaned right after the swap).
    let checkouts = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(cache.path().join("checkouts"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect()
    };
    let only_v4 = vec![std::ffi::OsString::from(&v4)];
    assert!(
        wait_until(Duration::from_secs(10), || checkouts() == only_v4),
        "{:?}",
        checkouts()
    );
}

#[test]
fn admin_reload_needs_the_token() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let without = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &[]);
    assert_eq!(without.admin_post("/admin/reload", &[AUTH], b"").0, 403);
    // One gateway per cache dir (the default one is per repository URL).
    drop(without);
    let with = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(with.admin_post("/admin/reload", &[], b"").0, 401);
    assert_eq!(
        with.admin_post("/admin/reload", &[("Authorization", "Bearer wrong")], b"")
            .0,
        401
    );
    assert_eq!(with.admin_post("/admin/reload", &[AUTH], b"").0, 202);
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A gateway serving `v1` of a new repository, with the webhook secret `secret`, and `v2`
/// committed after it started (for a push to bring). The repository dir and the repository too.
fn webhook_gateway(secret: &str) -> (tempfile::TempDir, git2::Repository, GatewayProcess) {
    let (d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_WEBHOOK_SECRET", secret)],
    );
    commit(&repo, "main", &config("v2"), "second");
    (d, repo, gw)
}

#[test]
fn github_webhook_reloads_only_on_a_signed_push_to_the_branch() {
    let secret = "hook-s3cret";
    let (_d, repo, gw) = webhook_gateway(secret);

    let push = br#"{"ref":"refs/heads/main","after":"abc"}"#;
    let ev = ("X-GitHub-Event", "push");
    assert_eq!(
        gw.admin_post("/hooks/github", &[ev], push).0,
        401,
        "unsigned"
    );
    let wrong = sign("not-the-secret", push);
    assert_eq!(
        gw.admin_post(
            "/hooks/github",
            &[ev, ("X-Hub-Signature-256", &wrong)],
            push
        )
        .0,
        401
    );
    let sha1_only = ("X-Hub-Signature", "sha1=0000");
    assert_eq!(
        gw.admin_post("/hooks/github", &[ev, sha1_only], push).0,
        401
    );
    // Same JSON, re-serialised: the signature no longer matches.
    let good = sign(secret, push);
    assert_eq!(
        gw.admin_post(
            "/hooks/github",
            &[ev, ("X-Hub-Signature-256", &good)],
            br#"{ "ref": "refs/heads/main", "after": "abc" }"#
        )
        .0,
        401
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        gw.get("/").unwrap().1,
        "v1",
        "no unauthenticated call may reload"
    );

    let ping = br#"{"zen":"hi"}"#;
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[
            ("X-GitHub-Event", "ping"),
            ("X-Hub-Signature-256", &sign(secret, ping)),
        ],
        ping,
    );
    assert_eq!((status, body.contains("pong")), (200, true));

    let other = br#"{"ref":"refs/heads/feature"}"#;
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, ("X-Hub-Signature-256", &sign(secret, other))],
        other,
    );
    assert_eq!((status, body.contains("another branch")), (202, true));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.get("/").unwrap().1, "v1");

    let delivery = ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    assert_eq!(
        gw.admin_post(
            "/hooks/github",
            &[ev, delivery, ("X-Hub-Signature-256", &good)],
            push
        )
        .0,
        202
    );
    assert!(wait_body(&gw, "v2"));
    // The same delivery again is acknowledged and ignored.
    commit(&repo, "main", &config("v3"), "third");
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, delivery, ("X-Hub-Signature-256", &good)],
        push,
    );
    assert_eq!((status, body.contains("already processed")), (200, true));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.get("/").unwrap().1, "v2");

    // Oversized payloads are refused before parsing.
    let huge = vec![b'x'; 2 << 20];
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, ("X-Hub-Signature-256", &sign(secret, &huge))],
        &huge,
    );
    assert_eq!(status, 413, "{body}");
    // Said in JSON as every other admin answer (it was actix's text/plain).
    let said: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        said["message"], "the webhook body is over 1024 KiB",
        "{body}"
    );
}

/// A delivery refused with 400 (a push without a ref) was recorded as seen all the same, so its
/// corrected redelivery under the same id was answered "already processed" and did nothing.
#[test]
fn a_refused_delivery_can_be_redelivered_under_its_id() {
    let secret = "hook-s3cret";
    let (_d, _repo, gw) = webhook_gateway(secret);
    let ev = ("X-GitHub-Event", "push");
    let delivery = ("X-GitHub-Delivery", "9f1c2a5e-0d3b-4c1e-8a77-5b2f0c6e4d10");
    let broken = br#"{"after":"abc"}"#;
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, delivery, ("X-Hub-Signature-256", &sign(secret, broken))],
        broken,
    );
    assert_eq!(status, 400, "{body}");
    let push = br#"{"ref":"refs/heads/main","after":"abc"}"#;
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, delivery, ("X-Hub-Signature-256", &sign(secret, push))],
        push,
    );
    assert_eq!(status, 202, "{body}");
    assert!(wait_body(&gw, "v2"));
    // Accepted now: the same id again is a replay.
    let (status, body) = gw.admin_post(
        "/hooks/github",
        &[ev, delivery, ("X-Hub-Signature-256", &sign(secret, push))],
        push,
    );
    assert_eq!(
        (status, body.contains("already processed")),
        (200, true),
        "{body}"
    );
}

#[test]
fn gitlab_webhook_checks_the_token() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_WEBHOOK_SECRET", "gl-token")],
    );
    commit(&repo, "main", &config("v2"), "second");
    let push = br#"{"object_kind":"push","ref":"refs/heads/main"}"#;
    let ev = ("X-Gitlab-Event", "Push Hook");
    assert_eq!(gw.admin_post("/hooks/gitlab", &[ev], push).0, 401);
    assert_eq!(
        gw.admin_post("/hooks/gitlab", &[ev, ("X-Gitlab-Token", "gl-tokeN")], push)
            .0,
        401
    );
    assert_eq!(
        gw.admin_post("/hooks/gitlab", &[ev, ("X-Gitlab-Token", "gl-token")], push)
            .0,
        202
    );
    assert!(wait_body(&gw, "v2"));
}

#[test]
fn webhooks_are_disabled_without_a_secret() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &[]);
    assert_eq!(
        gw.admin_post("/hooks/gitlab", &[("X-Gitlab-Token", "")], b"{}")
            .0,
        403
    );
    assert_eq!(gw.admin_post("/hooks/github", &[], b"{}").0, 403);
}

#[test]
fn polling_picks_up_new_commits() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "200ms"], &[]);
    commit(&repo, "main", &config("v2"), "second");
    assert!(wait_body(&gw, "v2"));
    assert_eq!(gw.status()["attempted"]["trigger"], "poll");
}

#[test]
fn subdir_and_pinned_ref() {
    let (_d, repo, url) = bare_repo();
    let in_subdir = |body: &str| {
        vec![
            ("gateway/routes/main.toml", config(body)[0].1.clone()),
            ("README.md", "monorepo".to_string()),
        ]
    };
    let v1 = commit_files(&repo, "main", &as_refs(&in_subdir("pinned")), "first");
    repo.tag_lightweight("v1", &repo.find_object(v1, None).unwrap(), false)
        .unwrap();
    commit(&repo, "main", &in_subdir("later"), "second");
    let gw = GatewayProcess::start(
        &[
            "--repo", &url, "--subdir", "gateway", "--ref", "v1", "--poll", "0",
        ],
        &[],
    );
    assert_eq!(gw.get("/").unwrap().1, "pinned");
    assert_eq!(gw.status()["applied"]["ref"], "v1");
}

#[test]
fn local_working_copy_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init(dir.path()).unwrap();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap(), "--poll", "200ms"],
        &[],
    );
    assert_eq!(gw.get("/").unwrap().1, "v1");
    commit(&repo, "main", &config("v2"), "second");
    assert!(wait_body(&gw, "v2"));
}

#[test]
fn directory_source_reloads_when_files_change() {
    let dir = repo(&as_refs(&config("v1")));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    write_files(dir.path(), &as_refs(&config("v2")));
    assert!(wait_body(&gw, "v2"));
    assert_eq!(gw.status()["attempted"]["trigger"], "watch");
    // A broken edit is rejected; the last good version keeps serving.
    write_files(dir.path(), &[("routes/main.toml", "[[route]\nname = ")]);
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["ok"] == false
    ));
    assert_eq!(gw.status()["attempted"]["errors"][0]["code"], "toml-syntax");
    assert_eq!(gw.get("/").unwrap().1, "v2");
}

/// A broken edit of a directory, then reverted: the content is the applied version again, so
/// nothing is compiled. `/status` said `attempted: {ok: false}` and `rustygate status` exited 1
/// for ever, while `rustygate_config_last_reload_successful` was 1. All three say it is fine.
#[test]
fn a_reverted_broken_edit_of_a_directory_is_the_last_attempt_no_more() {
    let dir = repo(&as_refs(&config("v1")));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let applied = gw.status()["applied"]["sha"].clone();
    write_files(dir.path(), &[("routes/main.toml", "[[route]\nname = ")]);
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["ok"] == false
    ));
    assert_eq!(rustygate_status(&gw, &[]).0, Some(1));
    write_files(dir.path(), &as_refs(&config("v1")));
    assert!(
        wait_until(Duration::from_secs(15), || gw.status()["attempted"]["ok"]
            == true),
        "{}",
        gw.status()
    );
    let st = gw.status();
    assert_eq!(st["attempted"]["sha"], applied, "{st}");
    assert_eq!(st["applied"]["sha"], applied, "{st}");
    assert_eq!(st["attempted"]["errors"], serde_json::json!([]), "{st}");
    assert_eq!(
        gw.metric("rustygate_config_last_reload_successful"),
        Some(1.0)
    );
    let (code, out) = rustygate_status(&gw, &[]);
    assert_eq!(code, Some(0), "{out}");
    // The broken edit, back again, is a new failed attempt, not skipped as seen before.
    write_files(dir.path(), &[("routes/main.toml", "[[route]\nname = ")]);
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["ok"] == false
    ));
    assert_eq!(
        gw.metric("rustygate_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(gw.get("/").unwrap().1, "v1");
}

#[test]
fn config_swaps_under_load_fail_no_request() {
    let be = Backend::fixed(200, "from backend");
    let files = |n: usize| {
        let mut f = proxy_all(
            &be.url(),
            &format!("response_headers = {{ set = {{ \"x-config\" = \"{n}\" }} }}"),
        );
        f.push(("routes/extra.toml", format!("[[route]]\nname = \"extra{n}\"\npath = \"/extra/{n}\"\nrespond = {{ status = 204 }}\n")));
        f
    };
    let dir = repo(&as_refs(&files(0)));
    let gw = GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap(), "--watch", "false"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop, ok, failed) = (
                gw.listen.clone(),
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
            );
            std::thread::spawn(move || {
                // Bounded in count and time whatever happens to the swaps.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let Some(mut conn) = KeepAlive::connect(&addr) else {
                    failed.fetch_add(1, Relaxed);
                    return;
                };
                for _ in 0..50_000 {
                    if stop.load(Relaxed) || std::time::Instant::now() > deadline {
                        break;
                    }
                    match conn.get("/x") {
                        Some((200, body)) if body == "from backend" => ok.fetch_add(1, Relaxed),
                        _ => failed.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    for n in 1..=10 {
        // Let traffic flow on this config before swapping it out.
        let seen = ok.load(Relaxed);
        wait_until(Duration::from_secs(10), || ok.load(Relaxed) >= seen + 200);
        write_files(dir.path(), &as_refs(&files(n)));
        let posted = gw.admin_post("/admin/reload", &[AUTH], b"");
        assert!(
            wait_until(Duration::from_secs(10), || http(
                &gw.listen,
                "GET",
                &format!("/extra/{n}"),
                &[],
                b""
            )
            .is_some_and(|(s, _)| s == 204)),
            "swap {n} applied: reload answered {posted:?}"
        );
    }
    let seen = ok.load(Relaxed);
    wait_until(Duration::from_secs(10), || ok.load(Relaxed) >= seen + 200);
    stop.store(true, Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    assert!(ok >= 2000, "only {ok} requests ran");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across 10 swaps",
        ok + failed
    );
    assert_eq!(
        gw.metric("rustygate_config_reloads_total{result=\"success\"}"),
        Some(11.0)
    );
}

/// A directory's version covers every file the compile reads: an edit to a policy script alone
/// is a new version, applied like any other (it was once skipped as "already applied").
#[test]
fn a_policy_edit_alone_is_a_new_version_of_a_directory() {
    let policy =
        |body: &str| format!("fn on_request(req) {{\n    respond(200, #{{}}, \"{body}\")\n}}\n");
    let files = [
        (
            "routes/main.toml",
            "[[route]]\nname = \"home\"\npath = \"/\"\nupstream = \"api\"\npolicy = \"policies/p.rhai\"\n"
                .to_string(),
        ),
        (
            "upstreams/api.toml",
            "[upstream.api]\ntargets = [\"http://127.0.0.1:9\"]\n".to_string(),
        ),
        ("policies/p.rhai", policy("p1")),
    ];
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    assert_eq!(gw.get("/").unwrap().1, "p1");
    let first = gw.status()["applied"]["sha"].clone();
    write_files(dir.path(), &as_refs(&[("policies/p.rhai", policy("p2"))]));
    assert!(wait_body(&gw, "p2"));
    assert_ne!(gw.status()["applied"]["sha"], first);
}

/// `--ref v1` pins the tag: a branch pushed under the same name never changes what is served;
/// the reload that meets both is refused with the reason, and the tag's commit keeps serving.
#[test]
fn a_branch_named_like_the_pinned_tag_changes_nothing() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit_files(&repo, "main", &as_refs(&config("tagged")), "first");
    repo.tag_lightweight("v1", &repo.find_object(v1, None).unwrap(), false)
        .unwrap();
    let gw = GatewayProcess::start(&["--repo", &url, "--ref", "v1", "--poll", "200ms"], &[]);
    assert_eq!(gw.get("/").unwrap().1, "tagged");
    commit(
        &repo,
        "v1",
        &config("branch"),
        "a branch named like the tag",
    );
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.contains("both a tag and a branch"))
    }));
    assert_eq!(gw.get("/").unwrap().1, "tagged");
    assert_eq!(gw.status()["applied"]["sha"], v1.to_string());
}

/// Without `--ref` the branch is `refs/heads/<branch>` only: once it is deleted, a tag pushed
/// under its name is not served (tags are often less protected than the branch).
#[test]
fn a_tag_named_like_the_branch_is_not_served_when_the_branch_is_gone() {
    let (_d, repo, url) = bare_repo();
    let good = commit(&repo, "main", &config("branch"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(gw.get("/").unwrap().1, "branch");
    // A commit that descends from the served one, pushed as the tag `main`; then the branch
    // is deleted.
    let next = commit(&repo, "main", &config("from-tag"), "pushed as a tag");
    let oid = git2::Oid::from_str(&next).unwrap();
    repo.tag_lightweight("main", &repo.find_object(oid, None).unwrap(), false)
        .unwrap();
    repo.set_head("refs/heads/other").unwrap();
    repo.find_reference("refs/heads/main")
        .unwrap()
        .delete()
        .unwrap();
    let (status, _) = gw.admin_post("/admin/reload", &[AUTH], b"");
    assert_eq!(status, 202);
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
            || gw.status()["attempted"]["ok"] == false
    }));
    assert_eq!(gw.get("/").unwrap().1, "branch");
    assert_eq!(gw.status()["applied"]["sha"], good);
}

/// A restart while the git host is down serves the commit cached by the earlier run (loudly,
/// `stale` in `/status`) instead of exiting; the first fetch that works clears it.
#[test]
fn a_restart_with_the_remote_down_serves_the_cached_commit() {
    let (remote, repo, url) = bare_repo();
    let sha = commit(&repo, "main", &config("cached"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "200ms"];
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "cached");
    assert_eq!(gw.status()["stale"], false);
    assert_eq!(gw.metric("rustygate_config_stale"), Some(0.0));
    drop(gw);

    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).unwrap();
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "cached");
    let status = gw.status();
    assert_eq!(status["stale"], true);
    assert_eq!(status["applied"]["sha"], sha);
    assert_eq!(gw.metric("rustygate_config_stale"), Some(1.0));
    assert!(
        status["last_fetch_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );
    // The rollout gate does not pass a gateway that cannot fetch: it printed `attempted ok`
    // and exited 0.
    let (code, out) = rustygate_status(&gw, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("stale") && out.contains("fetch      FAILED"),
        "{out}"
    );

    std::fs::rename(&away, remote.path()).unwrap();
    assert!(wait_until(Duration::from_secs(15), || gw.status()["stale"] == false));
    assert!(gw.status()["last_fetch_error"].is_null());
    assert_eq!(gw.metric("rustygate_config_stale"), Some(0.0));
    let (code, out) = rustygate_status(&gw, &[]);
    assert_eq!(code, Some(0), "{out}");
}

/// A restart with the remote down and no commit for the branch in the mirror (its ref gone)
/// exited ("names no commit"), though the mirror still held the commit served before
/// (`refs/rustygate/served`). It now serves that commit, stale and saying why.
#[test]
fn a_restart_that_cannot_resolve_the_branch_serves_the_commit_served_before() {
    let (remote, repo, url) = bare_repo();
    let sha = commit(&repo, "main", &config("served"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "200ms"];
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "served");
    drop(gw);

    let mirror = git2::Repository::open_bare(cache.path().join("mirror")).unwrap();
    mirror
        .find_reference("refs/heads/main")
        .unwrap()
        .delete()
        .unwrap();
    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).unwrap();
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "served");
    let status = gw.status();
    assert_eq!(
        (status["stale"].clone(), status["applied"]["sha"].clone()),
        (true.into(), sha.clone().into())
    );
    let why = status["last_fetch_error"].as_str().unwrap_or("").to_owned();
    assert!(
        why.contains("no commit for `main`") && why.contains("served before"),
        "{why}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .logs
            .lock()
            .unwrap()
            .contains("serving a stale commit")),
        "{}",
        gw.logs.lock().unwrap()
    );

    // The host back: the branch is fetched and served again, no longer stale.
    std::fs::rename(&away, remote.path()).unwrap();
    assert!(wait_until(Duration::from_secs(15), || gw.status()["stale"] == false));
    assert_eq!(gw.status()["applied"]["sha"], sha);
}

/// With the fleet's store down, `rustygate status --fleet` cannot know whether the replicas
/// agree: it exits 2 ("cannot tell"). A missing `agree` was read as agreement, exit 0.
#[test]
fn status_fleet_with_the_store_down_cannot_tell() {
    let (_d, repo, url) = bare_repo();
    let mut files = config("v1");
    files.push((
        "gateway.toml",
        format!(
            "[rate_limit_store]\nurl = \"redis://127.0.0.1:{}/\"\n",
            dead_port()
        ),
    ));
    commit(&repo, "main", &files, "first");
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &[]);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    let (code, out) = rustygate_status(&gw, &["--fleet"]);
    assert!(out.contains("fleet      unknown"), "{out}");
    assert_eq!(code, Some(2), "{out}");
}

/// A restart while the branch head does not compile serves the commit this cache dir served
/// before (the head is the failed attempt in `/status`) instead of not starting; the next good
/// commit is picked up as usual.
#[test]
fn a_restart_while_the_head_is_broken_serves_the_commit_served_before() {
    let (_d, repo, url) = bare_repo();
    let good = commit(&repo, "main", &config("good"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "200ms"];
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "good");
    drop(gw);

    let mut broken = config("broken");
    broken.push((
        "routes/bad.toml",
        "[[route]]\nname = \"bad\"\nprefix = \"/bad\"\nupstream = \"nosuch\"\n".to_owned(),
    ));
    let bad = commit(&repo, "main", &broken, "a route to no upstream");
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "good");
    let status = gw.status();
    assert_eq!(status["applied"]["sha"], good);
    assert_eq!(status["attempted"]["sha"], bad);
    assert_eq!(status["attempted"]["ok"], false);
    assert!(
        status["attempted"]["errors"].to_string().contains("nosuch"),
        "{status}"
    );
    // `rustygate status` says so, and why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["status", "--admin", &format!("http://{}", gw.admin)])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("attempted  {bad} FAILED")), "{said}");
    assert!(said.contains("routes/bad.toml:4:"), "{said}");

    commit(&repo, "main", &config("fixed"), "fixed");
    assert!(wait_body(&gw, "fixed"));
    assert_eq!(gw.status()["attempted"]["ok"], true);
}

/// A fetch that fails for a while stands as the last attempt only while it fails: once the
/// remote answers again with the same (rejected) head, that head's located errors are the last
/// attempt again, not the old fetch error.
#[test]
fn a_passing_fetch_failure_gives_back_the_attempt_before_it() {
    let (remote, repo, url) = bare_repo();
    commit(&repo, "main", &config("good"), "first");
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "200ms"], &[]);
    let mut broken = config("broken");
    broken.push((
        "routes/bad.toml",
        "[[route]]\nname = \"bad\"\nprefix = \"/bad\"\nupstream = \"nosuch\"\n".to_owned(),
    ));
    let bad = commit(&repo, "main", &broken, "a route to no upstream");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == bad
    ));
    let away = remote.path().with_extension("away");
    std::fs::rename(remote.path(), &away).unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["attempted"]["sha"].is_null()
    }));
    std::fs::rename(&away, remote.path()).unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["last_fetch_error"].is_null()
    }));
    let status = gw.status();
    assert_eq!(status["attempted"]["sha"], bad, "{status}");
    assert_eq!(status["attempted"]["ok"], false);
    assert!(
        status["attempted"]["errors"].to_string().contains("nosuch"),
        "{status}"
    );
    assert_eq!(gw.get("/").unwrap().1, "good");
}

/// Two gateways on one cache dir would delete each other's checkouts: the second refuses to
/// start and says which process holds it.
#[test]
fn a_second_gateway_on_the_same_cache_dir_refuses_to_start() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("one"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let gw = GatewayProcess::start(&["--repo", &url, "--cache-dir", cache_dir], &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["serve", "--repo", &url, "--cache-dir", cache_dir])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another rustygate (pid "),
        "{stderr}"
    );
    assert_eq!(gw.get("/").unwrap().1, "one");
}

/// A lock file left in the mirror by a crash mid-fetch does not stop the next run from
/// fetching (and serving) the new commit.
#[test]
fn a_lock_file_left_by_a_crash_is_cleared_at_start_up() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("old"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "0"];
    drop(GatewayProcess::start(&args, &[]));
    let lock = cache.path().join("mirror/refs/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    commit(&repo, "main", &config("new"), "second");
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "new");
    assert_eq!(gw.status()["stale"], false);
    assert!(!lock.exists());
}

/// A git host that accepts the connection and never answers: start-up waits for the fetch no
/// longer than `--reload-timeout`, then serves the commit cached by an earlier run (stale), and
/// answers requests; without a cached commit it exits with the reason instead of hanging.
#[test]
fn a_git_host_that_never_answers_does_not_hang_start_up() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("cached"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    drop(GatewayProcess::start(
        &["--repo", &url, "--cache-dir", cache_dir, "--poll", "0"],
        &[],
    ));

    // Accepts, reads, never writes a byte.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/config.git", silent.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = std::sync::Arc::clone(&held);
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });

    let started = std::time::Instant::now();
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            &silent_url,
            "--cache-dir",
            cache_dir,
            "--poll",
            "200ms",
            "--reload-timeout",
            "2s",
        ],
        &[],
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(gw.get("/").unwrap().1, "cached");
    let status = gw.status();
    assert_eq!(status["stale"], true);
    assert!(
        status["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish within")),
        "{status}"
    );
    // A poll's fetch is stuck on the host too; SIGTERM still ends the process promptly.
    assert!(wait_until(Duration::from_secs(15), || held
        .lock()
        .unwrap()
        .len()
        >= 2));
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exited = wait_until(
        Duration::from_secs(15),
        || matches!(gw.child.try_wait(), Ok(Some(s)) if s.success()),
    );
    assert!(
        exited,
        "the gateway did not exit on SIGTERM during a stuck fetch"
    );
    drop(gw);

    // Nothing cached for this cache dir: a clear failure, not a hang.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args([
            "serve",
            "--repo",
            &silent_url,
            "--poll",
            "0",
            "--reload-timeout",
            "1s",
        ])
        .args(["--cache-dir", empty.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not finish within"), "{stderr}");
}

/// A force-push that rewrites the branch is held back: the served commit stays, `/status` says
/// non-fast-forward; a forced reload serves the new head.
#[test]
fn a_rewritten_branch_is_held_until_a_forced_reload() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit_files(&repo, "main", &as_refs(&config("v1")), "first");
    commit(&repo, "main", &config("v2"), "second");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "200ms"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(gw.get("/").unwrap().1, "v2");
    // Rewind main to v1 and commit on top: the new head does not descend from v2.
    repo.reference("refs/heads/main", v1, true, "force-push")
        .unwrap();
    let rewritten = commit(&repo, "main", &config("rewritten"), "rewritten");
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("non-fast-forward") && e.contains(&rewritten))
    }));
    assert_eq!(gw.get("/").unwrap().1, "v2");
    assert_eq!(
        gw.admin_post("/admin/reload?force=true", &[AUTH], b"").0,
        202
    );
    assert!(wait_body(&gw, "rewritten"));
    assert_eq!(gw.status()["applied"]["sha"], rewritten);
}

/// Every file of a commit was written to the cache volume at each export (up to 8 MiB each,
/// 256 MiB in all), docs and vendored files no config names included. Now the files the loader
/// lists are written, every other one is an empty stand-in filled when the config reads it: a
/// policy, and route files reached through a symlinked `routes` directory, still work.
#[test]
fn the_export_holds_only_the_files_the_config_reads() {
    let (_d, repo, url) = bare_repo();
    let cache = tempfile::tempdir().unwrap();
    let big = "#".repeat(3 << 20);
    let policy = "fn on_request(req) {\n    respond(200, #{}, \"from policy\")\n}\n";
    let files = [
        (
            "conf/routes/main.toml",
            "[[route]]\nname = \"home\"\npath = \"/\"\nupstream = \"api\"\npolicy = \"policies/p.rhai\"\n"
                .to_string(),
        ),
        (
            "upstreams/api.toml",
            "[upstream.api]\ntargets = [\"http://127.0.0.1:9\"]\n".to_string(),
        ),
        ("policies/p.rhai", policy.to_string()),
        ("docs/manual.bin", big.clone()),
        ("vendor/lib/blob.txt", big.clone() + "2"),
    ];
    let base = commit_files(&repo, "main", &as_refs(&files), "config and docs");
    let base = repo.find_commit(base).unwrap();
    let mut root = repo.treebuilder(Some(&base.tree().unwrap())).unwrap();
    let link = repo.blob(b"conf/routes").unwrap();
    root.insert("routes", link, 0o120000).unwrap();
    let tree = repo.find_tree(root.write().unwrap()).unwrap();
    let sig = git2::Signature::now("Config Author", "author@example.com").unwrap();
    let sha = repo
        .commit(Some("refs/heads/main"), &sig, &sig, "link", &tree, &[&base])
        .unwrap()
        .to_string();
    let gw = serve_with_cache(&url, cache.path(), &[]);
    assert_eq!(gw.get("/").unwrap().1, "from policy");
    assert_eq!(gw.status()["applied"]["sha"], sha.as_str());
    let export = cache.path().join("checkouts").join(&sha);
    let len = |p: &str| std::fs::metadata(export.join(p)).unwrap().len();
    assert_eq!(len("policies/p.rhai"), policy.len() as u64);
    assert!(len("conf/routes/main.toml") > 0);
    assert_eq!((len("docs/manual.bin"), len("vendor/lib/blob.txt")), (0, 0));
    let out = std::process::Command::new("du")
        .args(["-sk"])
        .arg(&export)
        .output()
        .unwrap();
    let kib: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kib < 1024, "the export takes {kib} KiB");
}

/// Commits `files` plus one more routes file whose name is the raw bytes `name` (not
/// necessarily UTF-8, which `commit_files` cannot write) holding `content`.
fn commit_with_raw_route_name(
    repo: &git2::Repository,
    files: &[(&'static str, String)],
    name: &[u8],
    content: &str,
) -> String {
    let base = commit(repo, "main", files, "base for a raw name");
    let base = repo
        .find_commit(git2::Oid::from_str(&base).unwrap())
        .unwrap();
    let tree = base.tree().unwrap();
    let routes = tree.get_name("routes").unwrap().to_object(repo).unwrap();
    let mut sub = repo.treebuilder(Some(routes.as_tree().unwrap())).unwrap();
    sub.insert(name, repo.blob(content.as_bytes()).unwrap(), 0o100644)
        .unwrap();
    let sub = sub.write().unwrap();
    let mut root = repo.treebuilder(Some(&tree)).unwrap();
    root.insert("routes", sub, 0o040000).unwrap();
    let root = repo.find_tree(root.write().unwrap()).unwrap();
    let sig = git2::Signature::now("Config Author", "author@example.com").unwrap();
    repo.commit(
        Some("refs/heads/main"),
        &sig,
        &sig,
        "a route file named in Latin-1",
        &root,
        &[&base],
    )
    .unwrap()
    .to_string()
}

/// A route file whose name is not UTF-8 used to be skipped by the export: the gateway served
/// the commit without it (routes vanished unsaid) while `validate` on a checkout rejected it.
/// The commit is now rejected, the error names the file, and the last good config keeps serving.
#[test]
fn a_file_name_that_is_not_utf8_rejects_the_commit() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(gw.get("/").unwrap().1, "v1");
    let bad = commit_with_raw_route_name(
        &repo,
        &config("v2"),
        b"x\xff.toml",
        "[[route]]\nname = \"nu\"\npath = \"/nu\"\nupstream = \"does-not-exist\"\n",
    );
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(
        wait_until(Duration::from_secs(15), || gw.status()["attempted"]["sha"]
            == bad.as_str()),
        "{}",
        gw.status()
    );
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v1.as_str(), "{st}");
    assert_eq!(st["attempted"]["ok"], false, "{st}");
    let err = &st["attempted"]["errors"][0];
    assert_eq!(err["code"], "invalid-file-name", "{st}");
    assert_eq!(err["file"], "routes/x\u{FFFD}.toml", "{st}");
    assert!(
        err["message"].as_str().unwrap().contains("not UTF-8"),
        "{st}"
    );
    assert_eq!(gw.get("/").unwrap().1, "v1");
}

/// `rustygate status --admin <gw> [extra...]`: its exit code and stdout.
fn rustygate_status(gw: &GatewayProcess, extra: &[&str]) -> (Option<i32>, String) {
    let admin = format!("http://{}", gw.admin);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["status", "--admin", &admin])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A commit that deletes every config file used to be swapped in without a word (every request
/// 404). It is held back, and /status and `rustygate status` say why, until a forced reload.
#[test]
fn a_commit_without_routes_is_held_until_a_forced_reload() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(gw.get("/").unwrap().1, "v1");
    let empty = commit(&repo, "main", &[], "delete everything");
    assert_eq!(gw.admin_post("/admin/reload", &[AUTH], b"").0, 202);
    assert!(
        wait_until(Duration::from_secs(15), || gw.status()["attempted"]["sha"]
            == empty.as_str()),
        "{}",
        gw.status()
    );
    let st = gw.status();
    assert_eq!(st["applied"]["sha"], v1.as_str(), "{st}");
    assert_eq!(st["attempted"]["ok"], false, "{st}");
    assert_eq!(
        st["attempted"]["errors"][0]["code"], "no-routes-held",
        "{st}"
    );
    assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    let (code, out) = rustygate_status(&gw, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAILED") && out.contains("held back"), "{out}");

    // Forced, it is served: the operator meant it.
    assert_eq!(
        gw.admin_post("/admin/reload?force=true", &[AUTH], b"").0,
        202
    );
    assert!(
        wait_until(Duration::from_secs(15), || gw.status()["applied"]["sha"]
            == empty.as_str()),
        "{}",
        gw.status()
    );
    assert_eq!(gw.get("/").unwrap().0, 404);
}

/// `/status` (no token needed, polled by the dashboard) carried every diagnostic of a rejected
/// commit: 5.5 MB for 20,000. It keeps the first 50 and their total.
#[test]
fn a_rejected_commit_with_many_errors_keeps_the_first_in_status() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(
        &["--repo", &url, "--poll", "0"],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    let mut routes = String::new();
    for i in 0..300 {
        routes.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\npath = \"/r{i}\"\nupstream = \"missing{i}\"\n"
        ));
    }
    let bad = commit(
        &repo,
        "main",
        &[("routes/main.toml", routes)],
        "300 unknown upstreams",
    );
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == bad.as_str()
    ));
    let st = gw.status();
    let errors = st["attempted"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 50, "{}", errors.len());
    assert_eq!(errors[0]["code"], "unknown-upstream");
    assert_eq!(errors[0]["line"], 4);
    assert_eq!(st["attempted"]["errors_total"], 300);
    let (_, body) = http(&gw.admin, "GET", "/api/v1/status", &[AUTH], b"").unwrap();
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api["attempted"]["errors"].as_array().unwrap().len(), 50);
    assert_eq!(api["attempted"]["errors_total"], 300);
    let (code, out) = rustygate_status(&gw, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("... and 297 more"), "{out}");
}

/// The git cache is bounded by what is served: the mirror fetched every branch and tag (a
/// large blob pushed to any branch landed on the cache volume), the export of every rejected
/// commit stayed in `checkouts/` until the next successful apply, and so did a failed export's
/// `.partial` directory.
#[test]
fn the_cache_holds_the_served_branch_and_the_served_export_only() {
    let (_d, repo, url) = bare_repo();
    let cache = tempfile::tempdir().unwrap();
    let v1 = commit(&repo, "main", &config("v1"), "first");
    let gw = serve_with_cache(&url, cache.path(), &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)]);
    // Another branch and a tag, each with a commit the served branch never reaches.
    let side = commit(&repo, "feature", &config("side"), "side branch");
    let side_oid = git2::Oid::from_str(&side).unwrap();
    let tagged = commit(&repo, "release", &config("tagged"), "tagged");
    let target = repo
        .find_object(git2::Oid::from_str(&tagged).unwrap(), None)
        .unwrap();
    repo.tag_lightweight("v9", &target, false).unwrap();
    repo.find_reference("refs/heads/release")
        .unwrap()
        .delete()
        .unwrap();
    // Two rejected commits on main: one that does not compile, one that does not export.
    let mut broken = config("v2");
    broken[0].1.push_str("timeout = \"soon\"\n");
    let bad = commit(&repo, "main", &broken, "broken");
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == bad.as_str()
    ));
    let unexportable =
        commit_with_raw_route_name(&repo, &config("v3"), b"x\xff.toml", "[[route]]\n");
    gw.admin_post("/admin/reload", &[AUTH], b"");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == unexportable.as_str()
    ));
    assert_eq!(gw.status()["applied"]["sha"], v1.as_str());

    let mirror = git2::Repository::open_bare(cache.path().join("mirror")).unwrap();
    let refs: Vec<String> = mirror
        .references()
        .unwrap()
        .flatten()
        .filter_map(|r| r.name().map(str::to_owned))
        .collect();
    assert!(
        !refs
            .iter()
            .any(|r| r.contains("feature") || r.contains("v9")),
        "{refs:?}"
    );
    // Over file:// libgit2's local transport packs what every remote ref reaches, whatever
    // the refspec (a smart transport sends only what is wanted): no ref keeps the side
    // branch's commit, so the next repack drops it.
    assert!(
        mirror
            .references()
            .unwrap()
            .flatten()
            .filter_map(|r| r.peel_to_commit().ok())
            .all(|c| c.id() != side_oid),
        "{refs:?}"
    );
    let checkouts: Vec<String> = std::fs::read_dir(cache.path().join("checkouts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(checkouts, vec![v1.clone()], "{checkouts:?}");
}

/// `serve --repo URL` with `envs`, expected to fail: its stderr.
/// `rustygate serve` that must refuse to start: its stderr. A gateway that starts instead is
/// stopped after 20 s and the test fails (it used to wait for it for good).
fn serve_fails(url: &str, extra: &[&str], envs: &[(&str, &str)]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["serve", "--repo", url, "--poll", "0"])
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(exited, "the gateway started instead of refusing: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    stderr
}

/// The default cache dir lives under the shared temp dir, where another local user may have
/// made it first to plant a checkout: a parent or cache dir that is writable by others, owned
/// by someone else, or a symlink is refused with the path and the reason. One the gateway
/// makes itself is private (0700).
#[test]
fn a_default_cache_dir_another_user_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let parent = tmp.path().join("rustygate-cache");
    let env = [("TMPDIR", tmpdir)];

    // A gateway that makes the dirs itself makes them private, and serves.
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &env);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    drop(gw);
    let cache = std::fs::read_dir(&parent)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for dir in [&parent, &cache] {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }

    // World-writable (as if made by another user with umask 000): refused, either level.
    for dir in [&parent, &cache] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let stderr = serve_fails(&url, &[], &env);
        assert!(
            stderr.contains(&format!("refusing the cache dir {}", dir.display()))
                && stderr.contains("writable by group or others (mode 0777)"),
            "{stderr}"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    // Owned by another user (tests that run as root can make one).
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
        let stderr = serve_fails(&url, &[], &env);
        assert!(
            stderr.contains(&format!("refusing the cache dir {}", cache.display()))
                && stderr.contains("owned by uid 65534"),
            "{stderr}"
        );
        std::os::unix::fs::chown(&cache, Some(0), Some(0)).unwrap();
    }

    // A symlink to a dir of someone else's choosing.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &cache).unwrap();
    let stderr = serve_fails(&url, &[], &env);
    assert!(
        stderr.contains(&format!("refusing the cache dir {}", cache.display()))
            && stderr.contains("symbolic link"),
        "{stderr}"
    );
}

/// Only the default cache dir and its parent were checked: under a temp dir that another user
/// can write (no sticky bit) or owns, it was accepted, though that user can rename the
/// gateway's dirs away and put their own in place. Every level above is checked now, as ssh's
/// `StrictModes` does; a sticky one (`/tmp`) is fine, and an explicit `--cache-dir` there is
/// only warned about.
#[test]
fn a_default_cache_dir_under_a_dir_others_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let mode = |m: u32| std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(m));
    mode(0o777).unwrap();
    let env = [("TMPDIR", shared.to_str().unwrap())];
    let stderr = serve_fails(&url, &[], &env);
    assert!(
        stderr.contains("refusing the cache dir")
            && stderr.contains(&format!(
                "{} above it is writable by group or others without the sticky bit (mode 0777)",
                shared.display()
            )),
        "{stderr}"
    );

    mode(0o1777).unwrap();
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &env);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    drop(gw);

    if rustix::process::geteuid().is_root() {
        mode(0o755).unwrap();
        std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).unwrap();
        let stderr = serve_fails(&url, &[], &env);
        assert!(
            stderr.contains(&format!(
                "{} above it is owned by uid 65534",
                shared.display()
            )),
            "{stderr}"
        );
        std::os::unix::fs::chown(&shared, Some(0), Some(0)).unwrap();
    }

    // An explicit --cache-dir there is the operator's choice: served, with a warning.
    mode(0o777).unwrap();
    let explicit = shared.join("explicit");
    let gw = serve_with_cache(&url, &explicit, &[]);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    assert!(wait_until(Duration::from_secs(5), || gw
        .logs
        .lock()
        .unwrap()
        .contains("another local user could replace the cache dir")));
    drop(gw);
    mode(0o700).unwrap();
}

/// A checkout found in the cache dir (planted, or left by an earlier run) is never compiled
/// as it stands: the gateway exports the commit itself and serves what the commit holds.
#[test]
fn a_checkout_planted_in_the_cache_dir_is_not_served() {
    let (_d, repo, url) = bare_repo();
    let head = commit(&repo, "main", &config("real"), "first");
    let cache = tempfile::tempdir().unwrap();
    write_files(
        &cache.path().join("checkouts").join(&head),
        &[(
            "routes/main.toml",
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"planted\" }\n",
        )],
    );
    let gw = serve_with_cache(&url, cache.path(), &[]);
    assert_eq!(gw.get("/").unwrap().1, "real");
    assert_eq!(gw.status()["applied"]["sha"], head);
}

/// A force-push held back by a running gateway stays held back after a restart: the commit
/// served before is served again and `/status` says non-fast-forward, until a forced reload.
#[test]
fn a_rewritten_branch_held_back_stays_held_after_a_restart() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit_files(&repo, "main", &as_refs(&config("v1")), "first");
    let v2 = commit(&repo, "main", &config("v2"), "second");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "200ms"];
    let env = [("RUSTYGATE_ADMIN_TOKEN", TOKEN)];
    let gw = GatewayProcess::start(&args, &env);
    assert_eq!(gw.get("/").unwrap().1, "v2");
    repo.reference("refs/heads/main", v1, true, "force-push")
        .unwrap();
    let rewritten = commit(&repo, "main", &config("rewritten"), "rewritten");
    let held = |gw: &GatewayProcess| {
        gw.status()["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("non-fast-forward") && e.contains(&rewritten))
    };
    assert!(wait_until(Duration::from_secs(15), || held(&gw)));
    drop(gw);

    let gw = GatewayProcess::start(&args, &env);
    assert_eq!(gw.get("/").unwrap().1, "v2");
    let status = gw.status();
    assert_eq!(status["applied"]["sha"], v2, "{status}");
    assert!(held(&gw), "{status}");
    assert_eq!(status["attempted"]["ok"], false, "{status}");
    // Polls keep holding it; a forced reload serves it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.get("/").unwrap().1, "v2");
    assert_eq!(
        gw.admin_post("/admin/reload?force=true", &[AUTH], b"").0,
        202
    );
    assert!(wait_body(&gw, "rewritten"));
}

/// A remote that advertises no refs (an empty repository here; a host mid-migration, or
/// anyone on the path of `git://`) is a failed fetch, not a deleted branch: the mirror keeps
/// the branch, so a restart serves the cached commit (stale) instead of failing.
#[test]
fn a_remote_advertising_no_refs_does_not_prune_the_cached_branch() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, "main", &config("v1"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    drop(GatewayProcess::start(
        &["--repo", &url, "--cache-dir", cache_dir, "--poll", "0"],
        &[],
    ));

    let (_e, _empty, empty_url) = bare_repo();
    let args = [
        "--repo",
        &empty_url,
        "--cache-dir",
        cache_dir,
        "--poll",
        "0",
    ];
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    let status = gw.status();
    assert_eq!(status["stale"], true, "{status}");
    assert!(
        status["last_fetch_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not have the branch `main`")),
        "{status}"
    );
    drop(gw);
    // The branch is still in the mirror: the next start falls back to it again.
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.status()["applied"]["sha"], v1);
}

/// A commit that writes secrets literally is refused, and the refusal does not publish them:
/// not in `/status` (token-less), `/api/v1/status`, `/api/v1/reloads`, `rustygate status`, the
/// log, nor `validate`; the errors still name the file and line.
#[test]
fn refused_literal_secrets_are_not_shown_in_status_logs_or_validate() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let gw = GatewayProcess::start(&["--repo", &url, "--poll", "200ms"], &[]);
    let mut files = config("v2");
    files.push((
        "gateway.toml",
        "[rate_limit_store]\nurl = \"redis://default:REDIS-PASSWORD@127.0.0.1:6379\"\n\n\
         [auth.legacy]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"hunter2-LITERAL-KEY\"\n"
            .to_owned(),
    ));
    files.push((
        "upstreams/b.toml",
        "[upstream.billing]\ntargets = [\"http://svc:UPSTREAM-PASSWORD@127.0.0.1:9\"]\n".to_owned(),
    ));
    let bad = commit(&repo, "main", &files, "oops");
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == bad
    ));
    let secrets = ["hunter2", "UPSTREAM-PASSWORD", "REDIS-PASSWORD"];
    let clean = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows {s}: {text}");
        }
    };
    let status = gw.status().to_string();
    clean("/status", &status);
    assert!(
        status.contains("inline-secret") && status.contains("gateway.toml"),
        "{status}"
    );
    assert!(
        status.contains("invalid target URL `http://127.0.0.1:9`"),
        "{status}"
    );
    assert!(
        status.contains("the store URL holds a password"),
        "{status}"
    );
    assert!(
        status.contains("a JWT secret must not be written"),
        "{status}"
    );
    for path in ["/api/v1/status", "/api/v1/reloads"] {
        let (_, body) = http(&gw.admin, "GET", path, &[], b"").unwrap();
        clean(path, &body);
    }
    let (_, out) = rustygate_status(&gw, &[]);
    clean("rustygate status", &out);
    assert!(out.contains("gateway.toml:7:"), "{out}");
    clean("the log", &gw.logs.lock().unwrap());

    // The config author's own check says where, without echoing the value either.
    let work = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    write_files(work.path(), &refs);
    for format in ["human", "short", "json"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .args(["validate", "--format", format])
            .arg(work.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        clean(&format!("validate --format {format}"), &text);
        assert!(text.contains("gateway.toml"), "{text}");
    }
}

/// SIGHUP reloads, as for nginx: a commit pushed with polling off is served after a real
/// SIGHUP to the real process, which keeps running. Without a handler it ended the process.
#[test]
fn sighup_reloads_the_config_and_the_gateway_keeps_running() {
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("v1"), "first");
    let mut gw = GatewayProcess::start(&["--repo", &url, "--poll", "0"], &[]);
    assert_eq!(gw.get("/").unwrap().1, "v1");
    let v2 = commit(&repo, "main", &config("v2"), "second");
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert!(wait_body(&gw, "v2"), "{}", gw.logs.lock().unwrap());
    assert!(matches!(gw.child.try_wait(), Ok(None)));
    let status = gw.status();
    assert_eq!(status["applied"]["sha"], v2);
    assert_eq!(status["attempted"]["trigger"], "sighup", "{status}");
}

/// `rustygate_config_last_reload_successful` says whether the head is what is served: 0 while
/// a rejected head stands (also across polls that find it again, and after a restart that
/// serves the commit served before it), 1 once a good commit is served.
#[test]
fn the_last_reload_successful_gauge_follows_a_rejected_head() {
    const GAUGE: &str = "rustygate_config_last_reload_successful";
    let (_d, repo, url) = bare_repo();
    commit(&repo, "main", &config("good"), "first");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = ["--repo", &url, "--cache-dir", cache_dir, "--poll", "200ms"];
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.metric(GAUGE), Some(1.0));
    let mut broken = config("broken");
    broken.push((
        "routes/bad.toml",
        "[[route]]\nname = \"bad\"\nprefix = \"/bad\"\nupstream = \"nosuch\"\n".to_owned(),
    ));
    let bad = commit(&repo, "main", &broken, "a route to no upstream");
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["attempted"]["sha"] == bad
    }));
    assert_eq!(gw.metric(GAUGE), Some(0.0));
    // Later polls find the same rejected head: still 0.
    let polled = gw.status()["last_fetch_at"].clone();
    assert!(wait_until(Duration::from_secs(15), || {
        gw.status()["last_fetch_at"] != polled
    }));
    assert_eq!(gw.metric(GAUGE), Some(0.0));
    // The exposition stays valid for Prometheus.
    let (_, text) = http(&gw.admin, "GET", "/metrics", &[], b"").unwrap();
    promtool_check(&text);
    drop(gw);

    // A restart serves the commit served before; the head is still rejected.
    let gw = GatewayProcess::start(&args, &[]);
    assert_eq!(gw.get("/").unwrap().1, "good");
    assert_eq!(gw.metric(GAUGE), Some(0.0));
    commit(&repo, "main", &config("fixed"), "fixed");
    assert!(wait_body(&gw, "fixed"));
    assert_eq!(gw.metric(GAUGE), Some(1.0));
}
