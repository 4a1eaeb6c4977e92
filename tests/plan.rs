#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `rustygate plan` on real git repositories made with git2 in a temp dir: the library's facts
//! for the diff itself, and the built binary for the CLI contract (output, exit codes).

use std::process::Command;

use rustygate::plan::{FieldChange, plan};

mod plan_support;
use plan_support::{Repo, options, run, stdout};

const ORDERS: &str = r#"
[[route]]
name = "orders"
host = "api.example.com"
prefix = "/orders"
methods = ["GET", "POST"]
upstream = "orders"
timeout = "5s"

[[route]]
name = "legacy"
path = "/cart.php"
respond = { status = 410, body = "gone" }
"#;

const UPSTREAMS: &str = r#"
[upstream.orders]
targets = ["http://127.0.0.1:8001", { url = "http://127.0.0.1:8002", weight = 1 }]

[upstream.orders-v2]
targets = ["http://127.0.0.1:9001"]
"#;

/// `legacy` removed, `users` added, `orders` moved to `orders-v2` with a longer timeout.
const ORDERS_HEAD: &str = r#"
[[route]]
name = "orders"
host = "api.example.com"
prefix = "/orders"
methods = ["GET", "POST"]
upstream = "orders-v2"
timeout = "10s"

[[route]]
name = "users"
path = "/users/{id}"
methods = ["GET"]
upstream = "orders"
rewrite = "/v1/users/{id}"
"#;

fn change(field: &str, old: Option<&str>, new: Option<&str>) -> FieldChange {
    FieldChange {
        field: field.to_owned(),
        old: old.map(str::to_owned),
        new: new.map(str::to_owned),
    }
}

fn two_commits(repo: &Repo) -> (String, String) {
    let base = repo.commit(
        "Orders and legacy cart",
        &[
            ("routes/orders.toml", Some(ORDERS)),
            ("upstreams/orders.toml", Some(UPSTREAMS)),
        ],
    );
    let head = repo.commit(
        "Move orders to v2, add users",
        &[("routes/orders.toml", Some(ORDERS_HEAD))],
    );
    (base, head)
}

#[test]
fn routes_added_removed_and_changed_fields() {
    let repo = Repo::new();
    let (base, head) = two_commits(&repo);
    let p = plan(&options(repo.path(), &base)).unwrap();
    assert!(p.head_compiles());
    assert_eq!(
        (p.base.sha.as_str(), p.head.sha.as_str()),
        (base.as_str(), head.as_str())
    );
    assert_eq!(p.head.subject, "Move orders to v2, add users");
    let diff = p.diff.as_ref().unwrap();
    let names =
        |v: &[rustygate::plan::RouteFacts]| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&diff.routes.added), ["users"]);
    assert_eq!(names(&diff.routes.removed), ["legacy"]);
    assert_eq!(diff.routes.changed.len(), 1);
    assert_eq!(diff.routes.changed[0].name, "orders");
    assert_eq!(
        diff.routes.changed[0].changes,
        [
            change("upstream", Some("orders"), Some("orders-v2")),
            change("timeout", Some("5s"), Some("10s")),
        ]
    );
    // `orders-v2` was unused in base and is used in head: a warning went away, none came.
    assert!(p.new_warnings.is_empty());
    assert!(diff.upstreams.is_empty());

    let md = p.to_markdown();
    let short = |s: &str| s[..7].to_owned();
    assert!(md.starts_with(&format!(
        "### rustygate plan: `{}` Orders and legacy cart → `{}` Move orders to v2, add users\n",
        short(&base),
        short(&head)
    )));
    for line in [
        "#### Routes added (1)",
        "- `users`: GET, any host, path `/users/{id}` → upstream `orders`",
        "#### Routes removed (1)",
        "- `legacy`: any method, any host, path `/cart.php` → respond 410",
        "#### Routes changed (1)",
        "- `orders`",
        "  - upstream: `orders` → `orders-v2`",
        "  - timeout: `5s` → `10s`",
        "**Verdict:** 1 route changed, 1 added, 1 removed; head compiles cleanly.",
    ] {
        assert!(md.lines().any(|l| l == line), "missing {line:?} in\n{md}");
    }
}

#[test]
fn turning_off_location_rewriting_is_a_route_change() {
    let repo = Repo::new();
    let base = repo.commit(
        "Orders",
        &[
            ("routes/orders.toml", Some(ORDERS)),
            ("upstreams/orders.toml", Some(UPSTREAMS)),
        ],
    );
    let off = ORDERS.replacen(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nrewrite_location = false",
        1,
    );
    repo.commit(
        "Relay Location as it comes",
        &[("routes/orders.toml", Some(&off))],
    );
    let p = plan(&options(repo.path(), &base)).unwrap();
    let diff = p.diff.as_ref().unwrap();
    assert_eq!(diff.routes.changed.len(), 1);
    assert_eq!(
        diff.routes.changed[0].changes,
        [change("rewrite_location", None, Some("off"))]
    );
}

#[test]
fn upstream_target_weight_change_and_new_target() {
    let repo = Repo::new();
    let base = repo.commit(
        "Orders",
        &[
            ("routes/orders.toml", Some(ORDERS)),
            ("upstreams/orders.toml", Some(UPSTREAMS)),
        ],
    );
    let weighted = UPSTREAMS
        .replace("weight = 1", "weight = 3")
        .replace(
            "targets = [\"http://127.0.0.1:9001\"]",
            "targets = [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9002\"]\nconnect_timeout = \"1s\"",
        );
    repo.commit(
        "Shift orders traffic",
        &[("upstreams/orders.toml", Some(&weighted))],
    );
    let p = plan(&options(repo.path(), &base)).unwrap();
    let diff = p.diff.as_ref().unwrap();
    assert!(diff.routes.is_empty());
    let changed: Vec<_> = diff
        .upstreams
        .changed
        .iter()
        .map(|c| (c.name.as_str(), c.changes.clone()))
        .collect();
    assert_eq!(
        changed,
        [
            (
                "orders",
                vec![change(
                    "target http://127.0.0.1:8002 weight",
                    Some("1"),
                    Some("3")
                )]
            ),
            (
                "orders-v2",
                vec![
                    change("target", None, Some("http://127.0.0.1:9002 (weight 1)")),
                    change("connect_timeout", Some("5s"), Some("1s")),
                ]
            ),
        ]
    );

    let out = run(repo.path(), &["--base", &base]);
    assert_eq!(out.status.code(), Some(3));
    let md = stdout(&out);
    for line in [
        "#### Upstreams changed (2)",
        "  - target `http://127.0.0.1:8002` weight: `1` → `3`",
        "  - target added: `http://127.0.0.1:9002 (weight 1)`",
        "  - connect_timeout: `5s` → `1s`",
        "**Verdict:** 0 routes changed, 0 added, 0 removed; 2 upstreams changed, 0 added, 0 removed; head compiles with 1 warning (none new).",
    ] {
        assert!(md.lines().any(|l| l == line), "missing {line:?} in\n{md}");
    }
}

#[test]
fn config_in_a_subdirectory() {
    let repo = Repo::new();
    let base = repo.commit(
        "Gateway config lives in deploy/gateway",
        &[
            ("README.md", Some("app repo\n")),
            ("deploy/gateway/routes/orders.toml", Some(ORDERS)),
            ("deploy/gateway/upstreams/orders.toml", Some(UPSTREAMS)),
            // Outside the config dir: must not be read as config.
            ("routes/broken.toml", Some("[[route]\n")),
        ],
    );
    repo.commit(
        "Move orders to v2",
        &[
            ("deploy/gateway/routes/orders.toml", Some(ORDERS_HEAD)),
            ("README.md", Some("app repo, changed\n")),
        ],
    );
    // DIR given from the repo root...
    let out = run(repo.path(), &["--base", &base, "deploy/gateway"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = stdout(&out);
    assert!(md.contains("Config directory: `deploy/gateway`"), "{md}");
    assert!(
        md.contains("**Verdict:** 1 route changed, 1 added, 1 removed; head compiles cleanly."),
        "{md}"
    );
    // ...and `.` from inside it give the same plan.
    let inside = run(&repo.path().join("deploy/gateway"), &["--base", &base]);
    assert_eq!(stdout(&inside), md);
}

#[test]
fn base_without_the_config_dir_lists_every_route_as_added() {
    let repo = Repo::new();
    let base = repo.commit("Empty start", &[("README.md", Some("x\n"))]);
    repo.commit(
        "Add gateway config",
        &[
            ("gw/routes/orders.toml", Some(ORDERS)),
            ("gw/upstreams/orders.toml", Some(UPSTREAMS)),
        ],
    );
    let p = plan(&options(&repo.path().join("gw"), &base)).unwrap();
    let diff = p.diff.as_ref().unwrap();
    assert_eq!(diff.routes.added.len(), 2);
    assert_eq!(diff.upstreams.added.len(), 2);
    assert!(
        p.base
            .note
            .as_deref()
            .unwrap()
            .contains("base has no `gw` directory")
    );
}

#[test]
fn head_that_fails_to_compile_exits_1_with_the_diagnostic() {
    let repo = Repo::new();
    let (base, _) = two_commits(&repo);
    let head = repo.commit(
        "Typo in upstream",
        &[(
            "routes/orders.toml",
            Some(&ORDERS_HEAD.replace("upstream = \"orders-v2\"", "upstream = \"order-v2\"")),
        )],
    );
    let out = run(repo.path(), &["--base", &base]);
    assert_eq!(out.status.code(), Some(1));
    let md = stdout(&out);
    assert!(md.contains("Head does not compile:"), "{md}");
    assert!(
        md.contains("error[unknown-upstream]: unknown upstream `order-v2`"),
        "{md}"
    );
    // file:line:col relative to the config repo, as the server would report it.
    assert!(md.contains("routes/orders.toml:7:12"), "{md}");
    assert!(md.contains("did you mean `orders-v2`?"), "{md}");
    assert!(
        md.contains(&format!(
            "**Verdict:** head `{}` does not compile: 1 error, 1 warning.",
            &head[..7]
        )),
        "{md}"
    );
    assert!(!md.contains("Routes changed"), "{md}");

    let json = run(repo.path(), &["--base", &base, "--format", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["head"]["compiles"], false);
    assert_eq!(v["diff"], serde_json::Value::Null);
    assert_eq!(v["head_diagnostics"][0]["code"], "unknown-upstream");
    assert_eq!(v["head_diagnostics"][0]["file"], "routes/orders.toml");
    assert_eq!(v["head_diagnostics"][0]["line"], 7);
}

#[test]
fn base_that_fails_to_compile_still_shows_head() {
    let repo = Repo::new();
    let base = repo.commit(
        "Broken",
        &[
            ("routes/orders.toml", Some(ORDERS)),
            (
                "upstreams/orders.toml",
                Some("[upstream.orders]\ntargets = []\n"),
            ),
        ],
    );
    repo.commit("Fixed", &[("upstreams/orders.toml", Some(UPSTREAMS))]);
    let out = run(repo.path(), &["--base", &base]);
    assert_eq!(out.status.code(), Some(3));
    let md = stdout(&out);
    assert!(
        md.contains(&format!(
            "> **Note:** base `{}` does not compile (1 error)",
            &base[..7]
        )),
        "{md}"
    );
    assert!(md.contains("#### Routes added (2)"), "{md}");
    assert!(md.contains("(compared against an empty base)."), "{md}");
}

#[test]
fn json_format_has_the_same_facts() {
    let repo = Repo::new();
    let (base, head) = two_commits(&repo);
    let out = run(
        repo.path(),
        &["--base", &base, "--head", &head, "--format", "json"],
    );
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["base"]["sha"], base.as_str());
    assert_eq!(v["head"]["short"], &head[..7]);
    assert_eq!(v["head"]["compiles"], true);
    assert_eq!(v["config_dir"], ".");
    let routes = &v["diff"]["routes"];
    assert_eq!(routes["added"][0]["name"], "users");
    assert_eq!(routes["added"][0]["rewrite"], "/v1/users/{id}");
    assert_eq!(routes["added"][0]["methods"], serde_json::json!(["GET"]));
    assert_eq!(routes["removed"][0]["respond_status"], 410);
    assert_eq!(routes["changed"][0]["name"], "orders");
    assert_eq!(
        routes["changed"][0]["changes"][0],
        serde_json::json!({"field": "upstream", "old": "orders", "new": "orders-v2"})
    );
    assert_eq!(
        v["verdict"],
        "1 route changed, 1 added, 1 removed; head compiles cleanly."
    );
}

#[test]
fn new_warnings_are_listed_with_their_location() {
    let repo = Repo::new();
    let (base, _) = two_commits(&repo);
    repo.commit(
        "Add an unused upstream",
        &[(
            "upstreams/spare.toml",
            Some("[upstream.spare]\ntargets = [\"http://127.0.0.1:7000\"]\n"),
        )],
    );
    let p = plan(&options(repo.path(), &base)).unwrap();
    let codes: Vec<_> = p.new_warnings.iter().map(|w| w.code.as_str()).collect();
    assert_eq!(codes, ["unused-upstream"]);
    let md = p.to_markdown();
    assert!(
        md.contains("- `upstreams/spare.toml:1:11` warning[unused-upstream]: upstream `spare` is not used by any route"),
        "{md}"
    );
    assert!(md.contains("head compiles with 1 warning (1 new)."), "{md}");
}

#[test]
fn secrets_are_named_never_resolved_into_the_plan() {
    let repo = Repo::new();
    let (base, _) = two_commits(&repo);
    let with_secret = ORDERS_HEAD.replace(
        "timeout = \"10s\"",
        "timeout = \"10s\"\nrequest_headers = { set = { \"X-Api-Key\" = { env = \"PLAN_TEST_KEY\" } }, remove = [\"cookie\"] }",
    );
    repo.commit(
        "Send the API key",
        &[("routes/orders.toml", Some(&with_secret))],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["plan", "--base", &base])
        .current_dir(repo.path())
        .env("PLAN_TEST_KEY", "hunter2-secret")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = stdout(&out);
    assert!(
        md.contains(
            "  - request_headers: (none) → `set x-api-key = env PLAN_TEST_KEY; remove cookie`"
        ),
        "{md}"
    );
    assert!(!md.contains("hunter2"), "{md}");

    // Without the secret the head does not compile, unless --no-env says not to resolve it.
    let missing = run(repo.path(), &["--base", &base]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stdout(&missing).contains("missing-secret"));
    let no_env = run(repo.path(), &["--base", &base, "--no-env"]);
    assert_eq!(no_env.status.code(), Some(3));
}

#[test]
fn head_is_the_checked_out_commit_in_a_clone_too() {
    // A clone has `refs/remotes/origin/HEAD` (the remote's default branch): `--head HEAD`, the
    // default, must still be the commit checked out here, as on a CI runner's pull request.
    let origin = Repo::new();
    let (_, base) = two_commits(&origin);
    let clone_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", origin.path().display());
    let clone = Repo {
        repo: git2::Repository::clone(&url, clone_dir.path()).unwrap(),
        dir: clone_dir,
    };
    assert!(
        clone
            .repo
            .find_reference("refs/remotes/origin/HEAD")
            .is_ok()
    );
    clone.commit("Add carts", &[("routes/carts.toml", Some(CARTS))]);
    let out = run(clone.path(), &["--base", &base]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let md = stdout(&out);
    assert!(md.contains("→ `") && md.contains("Add carts"), "{md}");
    assert!(md.contains("#### Routes added (1)"), "{md}");
    // HEAD~1 is relative to the checkout as well: the base itself, so nothing changed.
    let out = run(clone.path(), &["--base", &base, "--head", "HEAD~1"]);
    assert!(
        stdout(&out).contains("No route, upstream or gateway changes."),
        "{}",
        stdout(&out)
    );
}

const CARTS: &str = r#"
[[route]]
name = "carts"
path = "/carts/{id}"
upstream = "orders"
"#;

#[test]
fn no_changes_says_so() {
    let repo = Repo::new();
    let (_, head) = two_commits(&repo);
    repo.commit(
        "Docs only",
        &[("README.md", Some("nothing for the gateway\n"))],
    );
    let out = run(repo.path(), &["--base", &head]);
    assert_eq!(out.status.code(), Some(0));
    let md = stdout(&out);
    assert!(
        md.contains("No route, upstream or gateway changes."),
        "{md}"
    );
    assert!(
        md.contains("**Verdict:** no route, upstream or gateway changes; head compiles cleanly."),
        "{md}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let repo = Repo::new();
    two_commits(&repo);
    let unknown = run(repo.path(), &["--base", "no-such-branch"]);
    assert_eq!(unknown.status.code(), Some(2));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("--base `no-such-branch` names no commit"),
        "{err}"
    );
    assert!(unknown.stdout.is_empty());

    let unknown_head = run(repo.path(), &["--base", "HEAD", "--head", "deadbeef"]);
    assert_eq!(unknown_head.status.code(), Some(2));

    let plain = tempfile::tempdir().unwrap();
    let not_git = run(plain.path(), &["--base", "main"]);
    assert_eq!(not_git.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&not_git.stderr).contains("is not inside a git working copy"));

    let bad_format = run(repo.path(), &["--base", "HEAD", "--format", "yaml"]);
    assert_eq!(bad_format.status.code(), Some(2));
}

#[test]
fn a_tree_entry_named_dotdot_is_refused_not_exported() {
    let repo = Repo::new();
    let (base, _) = two_commits(&repo);
    // A hand-written tree object (git itself would refuse to make one): `../../escaped.txt`.
    let odb = repo.repo.odb().unwrap();
    let tree = |name: &str, mode: &str, id: git2::Oid| {
        let mut raw = format!("{mode} {name}\0").into_bytes();
        raw.extend_from_slice(id.as_bytes());
        odb.write(git2::ObjectType::Tree, &raw).unwrap()
    };
    let blob = repo.repo.blob(b"written outside the export dir\n").unwrap();
    let inner = tree("escaped.txt", "100644", blob);
    let outer = tree("..", "40000", tree("..", "40000", inner));
    let sig = git2::Signature::now("Plan Test", "plan@example.com").unwrap();
    let head = repo
        .repo
        .commit(
            None,
            &sig,
            &sig,
            "crafted",
            &repo.repo.find_tree(outer).unwrap(),
            &[],
        )
        .unwrap()
        .to_string();

    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["plan", "--base", &base, "--head", &head])
        .current_dir(repo.path())
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsafe path `..`"), "{err}");
    assert!(!tmp.path().join("escaped.txt").exists());
    // The plan's own temp dir is gone too.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn health_retries_and_circuit_breaker_changes_are_listed() {
    let repo = Repo::new();
    let base = repo.commit(
        "Orders",
        &[
            ("routes/orders.toml", Some(ORDERS)),
            ("upstreams/orders.toml", Some(UPSTREAMS)),
        ],
    );
    let resilient = UPSTREAMS.replace(
        "targets = [\"http://127.0.0.1:9001\"]",
        "targets = [\"http://127.0.0.1:9001\"]\nhealth = { path = \"/healthz\", interval = \"2s\" }\nretries = { attempts = 2, on = [\"connect_failure\", \"503\"] }\ncircuit_breaker = { max_requests = 100 }",
    );
    repo.commit(
        "Orders v2: checks, retries, breaker",
        &[("upstreams/orders.toml", Some(&resilient))],
    );
    let p = plan(&options(repo.path(), &base)).unwrap();
    let diff = p.diff.as_ref().unwrap();
    let changed: Vec<_> = diff
        .upstreams
        .changed
        .iter()
        .map(|c| (c.name.as_str(), c.changes.clone()))
        .collect();
    assert_eq!(
        changed,
        [(
            "orders-v2",
            vec![
                change(
                    "circuit_breaker",
                    None,
                    Some("max_requests 100, max_pending none")
                ),
                change(
                    "health",
                    None,
                    Some("GET /healthz every 2s, timeout 2s, out after 3, back after 2")
                ),
                change(
                    "retries",
                    Some("1 on [connect_failure], backoff 25ms..250ms, budget 20% + 10/s"),
                    Some("2 on [connect_failure, 503], backoff 25ms..250ms, budget 20% + 10/s")
                ),
            ]
        )]
    );
}
