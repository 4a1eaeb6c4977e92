#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `rustygate plan` compares what the gateway would do, not the text: the no-ops (a default
//! written out, reordered methods, a moved route, `1m` vs `60s`) and the safety flags (auth
//! lost, rate limit removed or raised tenfold, CORS opened to `*`, a new upstream host), on real
//! git repositories made with git2 in a temp dir.

use rustygate::plan::plan;

mod plan_support;
use plan_support::{Repo, options, run, stdout};

const UPSTREAMS: &str = r#"
[upstream.orders]
targets = ["http://127.0.0.1:8001", { url = "http://127.0.0.1:8002", weight = 1 }]

[upstream.orders-v2]
targets = ["http://127.0.0.1:9001"]
"#;

/// A config with auth, CORS, a rate limit and one upstream: the base of the meaning tests.
const MEANING_GATEWAY: &str = r#"
[auth.idp]
type = "jwt"
algorithms = ["HS256"]
secret = { env = "PLAN_TEST_JWT_SECRET" }

[cors.public]
allow_origins = ["https://app.example.com"]
allow_methods = ["GET"]
"#;

const MEANING_ROUTES: &str = r#"
[[route]]
name = "orders"
prefix = "/orders"
methods = ["GET", "POST"]
upstream = "orders"
auth = "idp"
cors = "public"
rate_limit = { requests = 10, per = "1m" }
"#;

const MEANING_UPSTREAMS: &str = r#"
[upstream.orders]
targets = ["http://127.0.0.1:8001"]
"#;

/// Commits the meaning base, then `files` on top; the plan between them (secrets not resolved).
fn meaning_plan(files: &[(&str, Option<&str>)]) -> (Repo, String, rustygate::plan::Plan) {
    let repo = Repo::new();
    let base = repo.commit(
        "Orders with auth, CORS and a rate limit",
        &[
            ("gateway.toml", Some(MEANING_GATEWAY)),
            ("routes/orders.toml", Some(MEANING_ROUTES)),
            ("upstreams/orders.toml", Some(MEANING_UPSTREAMS)),
        ],
    );
    repo.commit("Change", files);
    let mut opts = options(repo.path(), &base);
    opts.resolve_secrets = false;
    let plan = plan(&opts).unwrap();
    assert!(plan.head_compiles(), "{:?}", plan.head_diagnostics);
    (repo, base, plan)
}

fn routes_with(from: &str, to: &str) -> String {
    assert!(MEANING_ROUTES.contains(from), "{from}");
    MEANING_ROUTES.replace(from, to)
}

fn assert_no_change(files: &[(&str, Option<&str>)]) {
    let (repo, base, p) = meaning_plan(files);
    let diff = p.diff.as_ref().unwrap();
    assert!(diff.is_empty() && diff.safety.is_empty(), "{diff:#?}");
    assert!(!p.has_changes());
    let out = run(repo.path(), &["--base", &base, "--no-env"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("No route, upstream or gateway changes."));
}

#[test]
fn a_value_written_out_equal_to_its_default_is_no_change() {
    let routes = routes_with(
        "rate_limit = { requests = 10, per = \"1m\" }",
        "rate_limit = { requests = 10, per = \"1m\", burst = 10, key = \"client_ip\" }\ntimeout = \"30s\"",
    );
    assert_no_change(&[("routes/orders.toml", Some(&routes))]);
}

#[test]
fn reordered_methods_are_no_change() {
    let routes = routes_with("[\"GET\", \"POST\"]", "[\"POST\", \"GET\"]");
    assert_no_change(&[("routes/orders.toml", Some(&routes))]);
}

#[test]
fn a_route_moved_to_another_file_is_no_change() {
    assert_no_change(&[
        ("routes/orders.toml", None),
        ("routes/shop.toml", Some(MEANING_ROUTES)),
    ]);
}

#[test]
fn one_minute_written_as_sixty_seconds_is_no_change() {
    let routes = routes_with("per = \"1m\"", "per = \"60s\"");
    assert_no_change(&[("routes/orders.toml", Some(&routes))]);
}

/// The plan's safety flags as (kind, name).
fn flags(p: &rustygate::plan::Plan) -> Vec<(&'static str, String)> {
    p.diff
        .as_ref()
        .unwrap()
        .safety
        .iter()
        .map(|f| (f.kind, f.name.clone()))
        .collect()
}

#[test]
fn a_route_losing_auth_is_flagged_first() {
    let routes = routes_with("auth = \"idp\"\n", "");
    let (repo, base, p) = meaning_plan(&[("routes/orders.toml", Some(&routes))]);
    assert_eq!(flags(&p), vec![("auth-removed", "orders".to_owned())]);
    let out = run(repo.path(), &["--base", &base, "--no-env"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let md = stdout(&out);
    let flagged = md.find("Safety-relevant changes (1)").expect(&md);
    let changed = md.find("#### Routes changed (1)").expect(&md);
    assert!(flagged < changed, "{md}");
    assert!(md.contains("- **auth-removed**: route `orders` no longer requires a token"));
    assert!(md.contains("  - auth: `provider idp` → (none)"), "{md}");
    assert!(md.contains("1 safety-relevant change to review"), "{md}");

    // Optional auth lets requests without a token through: that is losing it too.
    let optional = routes_with("auth = \"idp\"\n", "auth = \"idp\"\nauth_optional = true\n");
    let (_, _, p) = meaning_plan(&[("routes/orders.toml", Some(&optional))]);
    assert_eq!(flags(&p), vec![("auth-removed", "orders".to_owned())]);
}

#[test]
fn a_rate_limit_removed_or_raised_tenfold_is_flagged() {
    let removed = routes_with(
        "rate_limit = { requests = 10, per = \"1m\" }",
        "rate_limit = { enabled = false }",
    );
    let (_, _, p) = meaning_plan(&[("routes/orders.toml", Some(&removed))]);
    assert_eq!(flags(&p), vec![("rate-limit-removed", "orders".to_owned())]);

    // 10/min -> 200/min: twenty times.
    let raised = routes_with(
        "requests = 10, per = \"1m\"",
        "requests = 200, per = \"1m\"",
    );
    let (_, _, p) = meaning_plan(&[("routes/orders.toml", Some(&raised))]);
    assert_eq!(flags(&p), vec![("rate-limit-raised", "orders".to_owned())]);

    // 10/min -> 5/s is thirty times, though the number got smaller.
    let per_second = routes_with("requests = 10, per = \"1m\"", "requests = 5, per = \"1s\"");
    let (_, _, p) = meaning_plan(&[("routes/orders.toml", Some(&per_second))]);
    assert_eq!(flags(&p), vec![("rate-limit-raised", "orders".to_owned())]);

    // Five times is a change, not a flag.
    let five = routes_with("requests = 10, per = \"1m\"", "requests = 50, per = \"1m\"");
    let (_, _, p) = meaning_plan(&[("routes/orders.toml", Some(&five))]);
    assert!(flags(&p).is_empty());
    assert!(p.has_changes());
}

#[test]
fn cors_opened_to_any_origin_is_flagged() {
    let gateway = MEANING_GATEWAY.replace("[\"https://app.example.com\"]", "[\"*\"]");
    let (_, _, p) = meaning_plan(&[("gateway.toml", Some(&gateway))]);
    assert_eq!(flags(&p), vec![("cors-any-origin", "orders".to_owned())]);
    let changed = &p.diff.as_ref().unwrap().routes.changed;
    assert_eq!(changed[0].changes[0].field, "cors");
}

#[test]
fn a_new_upstream_host_is_flagged_a_new_port_on_a_known_host_is_not() {
    let new_host = MEANING_UPSTREAMS.replace(
        "[\"http://127.0.0.1:8001\"]",
        "[\"http://127.0.0.1:8001\", \"https://orders.partner.example:8443\"]",
    );
    let (_, _, p) = meaning_plan(&[("upstreams/orders.toml", Some(&new_host))]);
    assert_eq!(flags(&p), vec![("new-upstream-host", "orders".to_owned())]);
    let msg = &p.diff.as_ref().unwrap().safety[0].message;
    assert!(msg.contains("orders.partner.example"), "{msg}");

    let new_port = MEANING_UPSTREAMS.replace(
        "[\"http://127.0.0.1:8001\"]",
        "[\"http://127.0.0.1:8001\", \"http://127.0.0.1:9001\"]",
    );
    let (_, _, p) = meaning_plan(&[("upstreams/orders.toml", Some(&new_port))]);
    assert!(flags(&p).is_empty());
    assert!(p.has_changes());
}

#[test]
fn an_edited_policy_script_is_a_change() {
    let repo = Repo::new();
    let routes = "[[route]]\nname = \"orders\"\nprefix = \"/orders\"\nupstream = \"orders\"\npolicy = \"policies/legacy.rhai\"\n";
    let base = repo.commit(
        "Legacy with a policy",
        &[
            ("routes/orders.toml", Some(routes)),
            ("upstreams/orders.toml", Some(UPSTREAMS)),
            ("policies/legacy.rhai", Some("fn on_request(req) { }\n")),
        ],
    );
    repo.commit(
        "Policy edited",
        &[(
            "policies/legacy.rhai",
            Some("fn on_request(req) { req.set_header(\"x-a\", \"1\"); }\n"),
        )],
    );
    let p = plan(&options(repo.path(), &base)).unwrap();
    let changed = &p.diff.as_ref().unwrap().routes.changed;
    assert_eq!(changed.len(), 1, "{changed:#?}");
    assert_eq!(changed[0].changes[0].field, "policy");
}
