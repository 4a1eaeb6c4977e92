//! A default policy in gateway.toml applies to every route that does not name its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_default_policy_runs_where_a_route_names_none() {
    let be = Backend::echo();
    let gw = Gateway::start(&[
        (
            "gateway.toml",
            "policy = \"policies/default.rhai\"\npolicy_config = { team = \"platform\" }\n",
        ),
        (
            "policies/default.rhai",
            "fn on_request(req) {\n    req.set_header(\"x-policy\", \"default-\" + req.config.team);\n}\n",
        ),
        (
            "policies/own.rhai",
            "fn on_request(req) {\n    req.set_header(\"x-policy\", \"own\");\n}\n",
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"plain\"\nprefix = \"/plain\"\nupstream = \"be\"\n\n[[route]]\nname = \"own\"\nprefix = \"/own\"\nupstream = \"be\"\npolicy = \"policies/own.rhai\"\n",
        ),
        (
            "upstreams/u.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    let seen = |r: Reply| -> Vec<String> {
        r.json()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == "x-policy")
            .map(|h| h[1].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(seen(get(&gw.url("/plain")).await), vec!["default-platform"]);
    assert_eq!(seen(get(&gw.url("/own")).await), vec!["own"]);
}

#[test]
fn a_missing_default_policy_is_located_in_gateway_toml() {
    let dir = repo(&[
        ("gateway.toml", "policy = \"policies/nope.rhai\"\n"),
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = { status = 200 }\n",
        ),
    ]);
    let c = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
    let d = c
        .diagnostics
        .iter()
        .find(|d| d.code == "missing-file")
        .expect("missing-file diagnostic");
    let p = d.primary.as_ref().unwrap();
    assert_eq!(c.files.name(p.file), "gateway.toml");
    assert_eq!(c.files.line_col(p.file, p.span.start), (1, 10));
}
