//! Policy scripts in `validate`: every problem is a located diagnostic, and a bad script never
//! produces a snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use rustygate::compile::{CompileOptions, Compiled, compile_dir};

const UPSTREAM: (&str, &str) = (
    "upstreams/be.toml",
    "[upstream.be]\ntargets = [\"http://127.0.0.1:9\"]\n",
);
const ROUTE: (&str, &str) = (
    "routes/r.toml",
    "[[route]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"be\"\npolicy = \"policies/p.rhai\"\n",
);

fn compile_with(script: &str, extra: &[(&str, &str)]) -> Compiled {
    let mut files = vec![UPSTREAM, ROUTE, ("policies/p.rhai", script)];
    files.extend_from_slice(extra);
    let dir = repo(&files);
    compile_dir(
        dir.path(),
        &CompileOptions {
            resolve_secrets: true,
            version_id: None,
            source: String::new(),
            secret_roots: Vec::new(),
        },
    )
    .unwrap()
}

/// `file:line:col: severity[code]` of each diagnostic.
fn short(c: &Compiled) -> Vec<String> {
    c.diagnostics
        .render_short(&c.files)
        .lines()
        .map(|l| l.split(": ").take(2).collect::<Vec<_>>().join(": "))
        .map(|l| l.split_once(']').map(|(a, _)| format!("{a}]")).unwrap_or(l))
        .collect()
}

#[test]
fn a_valid_policy_compiles_into_the_snapshot() {
    let c = compile_with(
        "fn on_request(req) { req.set_header(\"x-a\", \"1\"); }",
        &[],
    );
    assert!(c.diagnostics.is_empty(), "{:?}", short(&c));
    let snap = c.snapshot.unwrap();
    assert!(snap.routes[0].policy.is_some());
}

#[test]
fn syntax_errors_are_located_in_the_script_with_a_snippet() {
    let c = compile_with("fn on_request(req) {\n    let x = ;\n}\n", &[]);
    assert!(c.snapshot.is_none());
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:2:13: error[policy-syntax]"]
    );
    let human = c.diagnostics.render_human(&c.files);
    assert!(human.contains("let x = ;"), "{human}");
    assert!(
        human.contains("routes/r.toml"),
        "the route using it is named: {human}"
    );
}

#[test]
fn unknown_variables_hooks_and_upstreams_are_errors() {
    let c = compile_with(
        "fn on_request(req) {\n  req.set_header(\"a\", tenant);\n}",
        &[],
    );
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:2:23: error[policy-unknown-variable]"]
    );
    let c = compile_with("fn on_request() { }", &[]);
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:1:4: error[policy-hook-arity]"]
    );
    let c = compile_with("fn helper(x) { x }", &[]);
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:1:1: error[policy-no-hooks]"]
    );
    let c = compile_with("fn on_request(req) { req.set_upstream(\"bee\"); }", &[]);
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:1:39: error[unknown-upstream]"]
    );
    assert!(c.diagnostics.iter().next().unwrap().help[0].contains("`be`"));
    let c = compile_with("fn on_request(req) { regex_match(\"(\", req.path) }", &[]);
    assert_eq!(
        short(&c),
        vec!["policies/p.rhai:1:34: error[invalid-regex]"]
    );
}

#[test]
fn policy_limits_are_checked_and_applied() {
    let c = compile_with(
        "fn on_request(req) { }",
        &[(
            "gateway.toml",
            "[policy_limits]\nmax_operations = 0\nbudget = \"soon\"\n",
        )],
    );
    assert_eq!(
        short(&c),
        vec![
            "gateway.toml:2:18: error[invalid-value]",
            "gateway.toml:3:10: error[invalid-duration]"
        ]
    );
    let items: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let script = format!("fn on_request(req) {{ let a = [{}]; }}", items.join(","));
    let c = compile_with(
        &script,
        &[("gateway.toml", "[policy_limits]\nmax_array_size = 10\n")],
    );
    assert_eq!(short(&c).len(), 1);
    assert!(
        short(&c)[0].ends_with("error[policy-too-large]"),
        "{:?}",
        short(&c)
    );
}

#[test]
fn the_script_is_part_of_the_config_version() {
    let a = compile_with("fn on_request(req) { }", &[])
        .snapshot
        .unwrap();
    let b = compile_with("fn on_request(req) { req.set_header(\"x\", \"1\"); }", &[])
        .snapshot
        .unwrap();
    assert_ne!(a.version.id, b.version.id);
}

#[test]
fn unknown_functions_are_located_errors() {
    let c = compile_with(
        "fn on_request(req) {\n  req.set_heder(\"x-a\", \"1\");\n  let h = sha265(req.path);\n}",
        &[],
    );
    assert!(c.snapshot.is_none());
    assert_eq!(
        short(&c),
        vec![
            "policies/p.rhai:2:7: error[policy-unknown-function]",
            "policies/p.rhai:3:11: error[policy-unknown-function]"
        ]
    );
    let c = compile_with("fn on_request(req) {\n  req.header();\n}", &[]);
    let d = c.diagnostics.iter().next().unwrap();
    assert!(d.help[0].contains("takes 1 argument"), "{:?}", d.help);
}
