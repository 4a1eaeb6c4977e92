//! The control plane under hostile callers: the admin and webhook endpoints count failed
//! authentications per client, a signed push for a commit already applied or attempted queues
//! nothing whatever its delivery id, and authentic events the gateway does not act on are
//! acknowledged with 202. Real binary, real bare git repositories, GitHub-shaped payloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hmac::{Hmac, Mac};

const SECRET: &str = "hook-s3cret";
const TOKEN: &str = "admin-t0ken";
const ZERO: &str = "0000000000000000000000000000000000000000";

fn config(body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "routes/main.toml",
        format!(
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        ),
    )]
}

fn bare_repo() -> (tempfile::TempDir, git2::Repository, String) {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    (dir, repo, url)
}

fn commit(repo: &git2::Repository, files: &[(&'static str, String)], msg: &str) -> String {
    commit_files(repo, "main", &as_refs(files), msg).to_string()
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A push payload shaped like GitHub's (the fields GitHub sends, trimmed values).
fn github_push(reference: &str, before: &str, after: &str) -> Vec<u8> {
    let deleted = after == ZERO;
    serde_json::json!({
        "ref": reference,
        "before": before,
        "after": after,
        "repository": {
            "id": 1296269,
            "name": "gateway-config",
            "full_name": "octo-org/gateway-config",
            "private": true,
            "default_branch": "main"
        },
        "pusher": { "name": "octocat", "email": "octocat@example.com" },
        "sender": { "login": "octocat", "id": 583231, "type": "User" },
        "created": before == ZERO,
        "deleted": deleted,
        "forced": false,
        "base_ref": null,
        "compare": format!("https://github.com/octo-org/gateway-config/compare/{}...{}", &before[..12], &after[..12]),
        "commits": if deleted { serde_json::json!([]) } else { serde_json::json!([{
            "id": after,
            "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
            "distinct": true,
            "message": "routes: change",
            "timestamp": "2026-11-30T10:00:00Z",
            "author": { "name": "Octo Cat", "email": "octocat@example.com", "username": "octocat" },
            "added": [], "removed": [], "modified": ["routes/main.toml"]
        }]) },
        "head_commit": if deleted { serde_json::Value::Null } else { serde_json::json!({ "id": after }) }
    })
    .to_string()
    .into_bytes()
}

/// Posts a signed GitHub event with a fresh delivery id.
fn github(gw: &GatewayProcess, event: &str, body: &[u8]) -> (u16, String) {
    let delivery = uuid::Uuid::new_v4().to_string();
    gw.admin_post(
        "/hooks/github",
        &[
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", &delivery),
            ("X-Hub-Signature-256", &sign(SECRET, body)),
            ("User-Agent", "GitHub-Hookshot/abc123"),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

fn wait_body(gw: &GatewayProcess, expected: &str) -> bool {
    wait_until(Duration::from_secs(15), || {
        gw.get("/").is_some_and(|(_, b)| b == expected)
    })
}

/// Nothing reloads: the served body stays `expected` while a newer commit waits in the repo.
/// (Proving a negative needs a pause; a reload of this tiny repo takes well under it.)
fn stays(gw: &GatewayProcess, expected: &str) {
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(gw.get("/").unwrap().1, expected, "no reload may happen");
}

fn start(url: &str) -> GatewayProcess {
    GatewayProcess::start(
        &["--repo", url, "--poll", "0"],
        &[
            ("RUSTYGATE_WEBHOOK_SECRET", SECRET),
            ("RUSTYGATE_ADMIN_TOKEN", TOKEN),
        ],
    )
}

#[test]
fn forged_calls_never_lock_out_a_signed_webhook_or_a_valid_admin_call() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, &config("v1"), "first");
    let gw = start(&url);
    let v2 = commit(&repo, &config("v2"), "second");
    let push = github_push("refs/heads/main", &v1, &v2);

    // A flood of forged deliveries from this address: 401s, then 429s.
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let (status, _) = gw.admin_post(
            "/hooks/github",
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &sign("guessed", &push)),
            ],
            &push,
        );
        statuses.push(status);
    }
    assert_eq!(statuses[0], 401);
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429));
    // Forged admin calls from the same address are over the limit too.
    let (status, _) = gw.admin_post("/admin/reload", &[("Authorization", "Bearer nope")], b"");
    assert_eq!(status, 429);

    // The genuine delivery, from the same address, still gets through and reloads.
    let (status, body) = github(&gw, "push", &push);
    assert_eq!((status, body.contains("queued")), (202, true), "{body}");
    assert!(wait_body(&gw, "v2"));

    // So does a valid admin call (the scheme in any case, RFC 9110 §11.1).
    commit(&repo, &config("v3"), "third");
    let (status, body) = gw.admin_post(
        "/admin/reload",
        &[("Authorization", &format!("BEARER {TOKEN}"))],
        b"",
    );
    assert_eq!((status, body.contains("queued")), (202, true), "{body}");
    assert!(wait_body(&gw, "v3"));
}

#[test]
fn a_push_for_a_commit_already_applied_or_attempted_queues_nothing() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, &config("v1"), "first");
    let gw = start(&url);
    let v2 = commit(&repo, &config("v2"), "second");

    // A replay of the push that brought v1, under a new delivery id: nothing is fetched, so
    // the newer v2 waiting in the repo is not picked up.
    let (status, body) = github(&gw, "push", &github_push("refs/heads/main", ZERO, &v1));
    assert_eq!(status, 202);
    assert!(body.contains("already applied"), "{body}");
    stays(&gw, "v1");

    // The push for v2 reloads.
    let (status, body) = github(&gw, "push", &github_push("refs/heads/main", &v1, &v2));
    assert_eq!((status, body.contains("queued")), (202, true), "{body}");
    assert!(wait_body(&gw, "v2"));

    // A broken commit is attempted once; its push again (any delivery id) queues nothing.
    let mut broken = config("v3");
    broken[0].1.push_str("timeout = \"soon\"\n");
    let v3 = commit(&repo, &broken, "broken");
    let push3 = github_push("refs/heads/main", &v2, &v3);
    assert_eq!(github(&gw, "push", &push3).0, 202);
    assert!(wait_until(
        Duration::from_secs(15),
        || gw.status()["attempted"]["sha"] == v3.as_str()
    ));
    let failures = "rustygate_config_reloads_total{result=\"failure\"}";
    assert_eq!(gw.metric(failures), Some(1.0));
    for _ in 0..3 {
        let (status, body) = github(&gw, "push", &push3);
        assert_eq!(status, 202);
        assert!(body.contains("already attempted"), "{body}");
    }
    // GitLab's push for the same commit is answered the same way.
    let gl = serde_json::json!({
        "object_kind": "push", "event_name": "push", "before": v2, "after": v3,
        "ref": "refs/heads/main", "checkout_sha": v3, "user_username": "octocat",
        "project": { "path_with_namespace": "octo-org/gateway-config", "default_branch": "main" },
        "commits": [{ "id": v3, "message": "broken" }], "total_commits_count": 1
    })
    .to_string();
    let (status, body) = gw.admin_post(
        "/hooks/gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", SECRET)],
        gl.as_bytes(),
    );
    assert_eq!(
        (status, body.contains("already attempted")),
        (202, true),
        "{body}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.metric(failures), Some(1.0), "no second attempt");
    assert_eq!(gw.status()["applied"]["sha"], v2.as_str());
}

#[test]
fn tag_pushes_other_branch_deletes_and_unhandled_events_are_acknowledged_and_ignored() {
    let (_d, repo, url) = bare_repo();
    let v1 = commit(&repo, &config("v1"), "first");
    let gw = start(&url);
    let v2 = commit(&repo, &config("v2"), "second");

    let tag = github_push("refs/tags/v2.0.0", ZERO, &v2);
    let (status, body) = github(&gw, "push", &tag);
    assert_eq!((status, body.contains("ignored")), (202, true), "{body}");

    let delete = github_push("refs/heads/feature", &v2, ZERO);
    let (status, body) = github(&gw, "push", &delete);
    assert_eq!((status, body.contains("ignored")), (202, true), "{body}");

    // Deleting the tracked branch leaves the applied config serving.
    let delete_main = github_push("refs/heads/main", &v1, ZERO);
    let (status, body) = github(&gw, "push", &delete_main);
    assert_eq!((status, body.contains("ignored")), (202, true), "{body}");

    let issue = serde_json::json!({
        "action": "opened",
        "issue": { "number": 1347, "title": "Found a bug", "state": "open" },
        "repository": { "full_name": "octo-org/gateway-config" },
        "sender": { "login": "octocat" }
    })
    .to_string();
    let (status, body) = github(&gw, "issues", issue.as_bytes());
    assert_eq!((status, body.contains("ignored")), (202, true), "{body}");

    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":12345678}"#;
    assert_eq!(github(&gw, "ping", ping).0, 200);

    let gl_tag = serde_json::json!({
        "object_kind": "tag_push", "ref": "refs/tags/v2.0.0", "before": ZERO, "after": v2
    })
    .to_string();
    let (status, body) = gw.admin_post(
        "/hooks/gitlab",
        &[
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Token", SECRET),
        ],
        gl_tag.as_bytes(),
    );
    assert_eq!((status, body.contains("ignored")), (202, true), "{body}");

    stays(&gw, "v1");
    // The tracked branch's own push still works afterwards.
    assert_eq!(
        github(&gw, "push", &github_push("refs/heads/main", &v1, &v2)).0,
        202
    );
    assert!(wait_body(&gw, "v2"));
}

/// The gateway's JSON log lines so far.
fn log_lines(gw: &GatewayProcess) -> Vec<serde_json::Value> {
    gw.logs
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits for the log line with `message` whose `key` is `value`.
fn wait_line(gw: &GatewayProcess, message: &str, key: &str, value: &str) -> serde_json::Value {
    let find = || {
        log_lines(gw)
            .into_iter()
            .find(|l| l["message"] == message && l[key] == value)
    };
    wait_until(Duration::from_secs(15), || find().is_some());
    find().unwrap_or_else(|| {
        panic!(
            "no `{message}` line with {key} = {value}:\n{}",
            gw.logs.lock().unwrap()
        )
    })
}

#[test]
fn reload_logs_carry_the_trace_of_the_request_that_asked_for_them() {
    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let auth = format!("Bearer {TOKEN}");
    // Ratio 0: the ids exist for requests that are not recorded, too.
    let traced = |body: &str| {
        let mut files = config(body);
        files.push((
            "gateway.toml",
            "[tracing]\nendpoint = \"http://127.0.0.1:9/v1/traces\"\nsample_ratio = 0.0\n".into(),
        ));
        files
    };
    let (_dir, repo, url) = bare_repo();
    commit(&repo, &traced("one"), "one");
    let gw = start(&url);
    assert_eq!(gw.get("/").unwrap().1, "one");

    // An admin call that brings its caller's trace: the reload continues it.
    let two = commit(&repo, &traced("two"), "two");
    let (status, _) = gw.admin_post(
        "/admin/reload",
        &[("Authorization", &auth), ("traceparent", &caller)],
        b"",
    );
    assert_eq!(status, 202);
    let queued = wait_line(&gw, "reload queued", "trace_id", CALLER_TRACE);
    assert_eq!(queued["trigger"], "admin");
    let span = queued["span_id"].as_str().unwrap().to_owned();
    assert_eq!(span.len(), 16);
    assert_ne!(span, CALLER_SPAN, "the admin request's own span");
    let applied = wait_line(&gw, "config reloaded", "to", &two);
    assert_eq!(applied["trace_id"], CALLER_TRACE, "{applied}");
    assert_eq!(applied["span_id"], span.as_str(), "{applied}");

    // A signed push without a trace context starts a trace of its own.
    let three = commit(&repo, &traced("three"), "three");
    assert_eq!(
        github(&gw, "push", &github_push("refs/heads/main", &two, &three)).0,
        202
    );
    let applied = wait_line(&gw, "config reloaded", "to", &three);
    assert_eq!(applied["trigger"], "github");
    let trace = applied["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(trace.len(), 32);
    assert_ne!(trace, CALLER_TRACE);
    let queued = wait_line(&gw, "reload queued", "trace_id", &trace);
    assert_eq!(queued["trigger"], "github");
    assert_eq!(queued["span_id"], applied["span_id"]);

    // A rejected version: the failure is logged under the trace of the push that brought it.
    let bad = commit(
        &repo,
        &[
            ("routes/main.toml", "[[route]]\nname = 1\n".to_owned()),
            ("gateway.toml", "[tracing]\nsample_ratio = 0.0\n".to_owned()),
        ],
        "bad",
    );
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _) = gw.admin_post(
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "d-bad"),
            (
                "X-Hub-Signature-256",
                &sign(SECRET, &github_push("refs/heads/main", &three, &bad)),
            ),
            ("traceparent", other),
        ],
        &github_push("refs/heads/main", &three, &bad),
    );
    assert_eq!(status, 202);
    let rejected = wait_line(
        &gw,
        "config rejected; still serving the last good config",
        "version",
        &bad,
    );
    assert_eq!(rejected["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(rejected["span_id"], "b7ad6b7169203331");

    // Tracing off: no ids, on the request's line or the reload's.
    let four = commit(&repo, &config("four"), "four");
    let (status, _) = gw.admin_post(
        "/admin/reload",
        &[("Authorization", &auth), ("traceparent", &caller)],
        b"",
    );
    assert_eq!(status, 202);
    let applied = wait_line(&gw, "config reloaded", "to", &four);
    assert_eq!(
        applied["trace_id"], CALLER_TRACE,
        "asked while tracing was on"
    );
    let five = commit(&repo, &config("five"), "five");
    let (status, _) = gw.admin_post(
        "/admin/reload",
        &[("Authorization", &auth), ("traceparent", &caller)],
        b"",
    );
    assert_eq!(status, 202);
    let applied = wait_line(&gw, "config reloaded", "to", &five);
    assert!(applied.get("trace_id").is_none(), "{applied}");
    assert!(applied.get("span_id").is_none(), "{applied}");
}
