#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `rustygate test`, the binary: the example repos' fixtures pass, a failing fixture fails with a
//! readable expected-vs-got, fixture mistakes are located diagnostics, and the exit codes hold
//! (0 all pass, 1 a failure or a config/fixture error, 2 usage or I/O error).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rustygate_test(args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .arg("test")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of examples/policies to break on purpose.
fn policies_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("examples/policies"), dir.path());
    dir
}

fn example_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_example_repo_passes_its_own_tests() {
    for dir in example_dirs() {
        let (code, out, err) = rustygate_test(&[dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{}:\n{out}\n{err}", dir.display());
        assert!(out.contains("test result: ok."), "{out}");
    }
    let (_, out, _) = rustygate_test(&[root().join("examples/policies").to_str().unwrap()]);
    let line = out.lines().find(|l| l.starts_with("test result")).unwrap();
    assert!(line.contains("31 passed; 0 failed"), "{line}");
    for policy in [
        "ab",
        "guards",
        "headers",
        "maintenance",
        "sunset",
        "tenants",
    ] {
        assert!(
            out.contains(&format!("test {policy}: ")),
            "{policy} untested:\n{out}"
        );
    }
}

#[test]
fn the_example_scripts_are_the_library_scripts() {
    let lib = root().join("policies");
    let mut names: Vec<_> = std::fs::read_dir(&lib)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".rhai"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 6, "{names:?}");
    for name in names {
        let original = std::fs::read_to_string(lib.join(&name)).unwrap();
        let copy = std::fs::read_to_string(root().join("examples/policies/policies").join(&name))
            .unwrap_or_default();
        assert!(
            original == copy,
            "examples/policies/policies/{name} differs from policies/{name}: run `cp policies/*.rhai examples/policies/policies/`"
        );
    }
}

#[test]
fn a_failing_case_shows_expected_and_got() {
    let dir = policies_copy();
    std::fs::write(
        dir.path().join("tests/zz-broken.toml"),
        r#"
[[test]]
name = "deliberately wrong"
request = { url = "/api/v1/orders" }
expect = { status = 200, upstream = "api", response_headers = { "sunset" = "never" } }
"#,
    )
    .unwrap();
    let (code, out, _) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("test deliberately wrong ... FAILED"), "{out}");
    assert!(
        out.contains("---- deliberately wrong (tests/zz-broken.toml:3:8) ----"),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    for expected in [
        "status                    expected 200",
        "got 410",
        "upstream                  expected \"api\"",
        "got not forwarded: the gateway answered 410",
        "response header `sunset`  expected \"never\"",
        "got \"Wed, 31 Dec 2025 23:59:59 GMT\"",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    assert!(
        out.contains("test result: FAILED. 31 passed; 1 failed; 0 filtered out"),
        "{out}"
    );

    // --filter runs only the matching cases.
    let (code, out, _) = rustygate_test(&[dir.path().to_str().unwrap(), "--filter", "sunset"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 passed; 0 failed; 28 filtered out"), "{out}");
    let (code, _, _) = rustygate_test(&[dir.path().to_str().unwrap(), "--filter", "zz-broken"]);
    assert_eq!(code, 1, "a filter matches file names too");
}

/// Case names and fixture file names are printed with their control characters escaped, and no
/// line of the output begins with one: GitHub's runner reads a line that begins with `::` as a
/// workflow command. Before, the name below printed a line `::error file=...` of its own and a
/// raw OSC sequence (a terminal title), and the failures list began a line with a name.
#[test]
fn names_from_the_fixtures_cannot_write_lines_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(
        dir.path().join("routes/r.toml"),
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tests/t.toml"),
        r#"
[[test]]
name="x\n::error file=routes/r.toml,line=1::injected workflow command\u001b]0;title\u0007"
request={url="/"}
expect={status=200}

[[test]]
name="::add-mask::secret"
request={url="/"}
expect={status=404}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tests/\u{1b}[31mred.toml"),
        "[[test]]\nname = \"fails too\"\nrequest = { url = \"/\" }\nexpect = { status = 500 }\n",
    )
    .unwrap();
    let (code, out, err) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    for line in out.lines().chain(err.lines()) {
        assert!(!line.trim_start().starts_with("::"), "{line:?} in:\n{out}");
        assert!(
            !line.contains(['\u{1b}', '\u{7}', '\r']),
            "{line:?} in:\n{out}"
        );
    }
    assert!(
        out.contains(
            "test x\\n::error file=routes/r.toml,line=1::injected workflow command\\u{1b}]0;title\\u{7} ... ok"
        ),
        "{out}"
    );
    assert!(
        out.contains("    tests/t.toml:8:6: ::add-mask::secret\n"),
        "{out}"
    );
    assert!(
        out.contains("---- fails too (tests/\\u{1b}[31mred.toml:2:8) ----"),
        "{out}"
    );
}

/// What GitHub's runner (actions/runner, `ActionCommand.TryParse`/`TryParseV2`) would take for
/// a workflow command in a line: `##[name]` anywhere in it (found with `IndexOf`), or `::`
/// once the line's leading white space is trimmed (.NET's `TrimStart()`: Unicode white space).
fn runner_command_in(line: &str) -> bool {
    line.contains("##[") || line.trim_start().starts_with("::")
}

/// A hostile case name or expectation cannot make a step's output say `##[error]` or
/// `##[set-output ...]` in the middle of a line, in text or JSON, and a name after white space
/// the runner trims (U+3000, U+00A0, U+2003) never leads a line with `::`. Before, the text
/// printed `test x ##[error]injected ... ok`, which the runner reads as an error annotation
/// (and `##[set-output name=deploy;]yes` as a step output), and JSON carried the same text.
#[test]
fn names_from_the_fixtures_cannot_become_runner_commands_mid_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(
        dir.path().join("routes/r.toml"),
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tests/t.toml"),
        r###"
[[test]]
name = "x ##[error]injected"
request = { url = "/" }
expect = { status = 200 }

[[test]]
name = "\u3000::error::after an ideographic space ###[warning]w"
request = { url = "/" }
expect = { status = 404, upstream_path = "##[set-output name=deploy;]yes" }

[[test]]
name = "\u00a0\u2003::add-mask::x"
request = { url = "/" }
expect = { status = 500 }
"###,
    )
    .unwrap();
    let (code, out, err) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    for line in out.lines().chain(err.lines()) {
        assert!(!runner_command_in(line), "{line:?} in:\n{out}");
    }
    assert!(
        out.contains("test x ##\\u{5b}error]injected ... ok"),
        "{out}"
    );
    let (_, json, _) = rustygate_test(&[dir.path().to_str().unwrap(), "--format", "json"]);
    for line in json.lines() {
        assert!(!runner_command_in(line), "{line:?} in:\n{json}");
    }
    // The escape is JSON's own: the values are the names as written.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"x ##[error]injected"), "{names:?}");
}

#[test]
fn json_output_carries_every_case_and_what_it_got() {
    let dir = policies_copy();
    std::fs::write(
        dir.path().join("tests/zz-broken.toml"),
        "[[test]]\nname = \"tenant: wrong upstream\"\nrequest = { url = \"/tenant/x\", headers = { \"x-tenant\" = \"acme\" } }\nexpect = { upstream = \"tenant-us\" }\n",
    )
    .unwrap();
    let (code, out, _) = rustygate_test(&[
        dir.path().to_str().unwrap(),
        "--format",
        "json",
        "--filter",
        "tenant",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["passed"], 5);
    assert_eq!(v["failed"], 1);
    let case = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tenant: wrong upstream")
        .unwrap();
    assert_eq!(case["location"], "tests/zz-broken.toml:2:8");
    assert_eq!(case["mismatches"][0]["check"], "upstream");
    assert_eq!(case["mismatches"][0]["expected"], "\"tenant-us\"");
    assert_eq!(case["mismatches"][0]["got"], "\"tenant-eu\"");
    assert_eq!(
        case["got"]["upstream_request"]["headers"]["x-tenant"],
        "acme"
    );
    assert_eq!(
        case["got"]["upstream_request"]["target"],
        "http://127.0.0.1:9011"
    );
}

#[test]
fn fixture_mistakes_are_located_diagnostics() {
    let dir = common::repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\nprefix = \"/\"\nrespond = { status = 200 }\n",
        ),
        (
            "tests/a.toml",
            "[[test]]\nname = \"one\"\nrequest = { url = \"/\", methd = \"GET\" }\nexpect = { status = 200 }\n\n[[test]]\nname = \"two\"\nrequest = { url = \"/\", method = \"G T\" }\nexpect = { status = 200 }\n\n[[test]]\nname = \"three\"\nrequest = { url = \"/\" }\nexpect = { }\n",
        ),
        ("tests/b.toml", "[[test]]\nname = \"x\nexpect = 1\n"),
        (
            "tests/c.toml",
            "[[test]]\nname = \"four\"\nrequest = { url = \"/\" }\nexpect = { status = 200, headers = { \"x\" = 3 } }\n\n[[test]]\nname = \"five\"\nrequest = { url = \"/\" }\nexpect = { status = 200 }\n\n[[test]]\nname = \"five\"\nrequest = { url = \"/\" }\nexpect = { status = 200 }\n",
        ),
    ]);
    let (code, out, err) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!out.contains("test result"), "nothing runs:\n{out}");
    for expected in [
        "error[unknown-key]: unknown field `methd`",
        "tests/a.toml:3:24",
        "error[invalid-value]: `G T` is not an HTTP method",
        "tests/a.toml:8:33",
        "error[empty-expect]: test `three` checks nothing",
        "tests/a.toml:14:10",
        "error[toml-syntax]: invalid TOML",
        "tests/b.toml:2:",
        "error[wrong-type]",
        "tests/c.toml:4:",
        "error[duplicate-test]: two tests are named `five`",
        "no test ran",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn a_config_that_does_not_compile_runs_nothing() {
    let dir = common::repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"nope\"\n",
        ),
        (
            "tests/a.toml",
            "[[test]]\nname = \"one\"\nrequest = { url = \"/\" }\nexpect = { status = 200 }\n",
        ),
    ]);
    let (code, out, err) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("routes/r.toml:4:12"), "{err}");
    assert!(err.contains("unknown-upstream"), "{err}");
    assert!(!out.contains("test result"), "{out}");

    let (code, _, err) = rustygate_test(&[dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = rustygate_test(&["--format", "yaml"]);
    assert_eq!(code, 2);
}

#[test]
fn a_failing_policy_names_its_script_and_line() {
    let dir = common::repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"u\"\npolicy = \"policies/p.rhai\"\n",
        ),
        (
            "upstreams/u.toml",
            "[upstream.u]\ntargets = [\"http://127.0.0.1:9\"]\n",
        ),
        (
            "policies/p.rhai",
            "fn on_request(req) {\n    let n = req.header(\"x-n\");\n    req.set_header(\"x-double\", `${n * 2}`);\n}\n",
        ),
        (
            "tests/a.toml",
            "[[test]]\nname = \"doubles\"\nrequest = { url = \"/\", headers = { \"x-n\" = \"2\" } }\nexpect = { status = 200 }\n",
        ),
    ]);
    let (code, out, _) = rustygate_test(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("got 500"), "{out}");
    assert!(
        out.contains("note: policies/p.rhai:3: on_request failed (runtime_error)"),
        "{out}"
    );
}

#[test]
fn upstream_trace_id_checks_the_traceparent_the_gateway_sends_upstream() {
    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let routes = "[[route]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"be\"\npolicy = \"policies/t.rhai\"\n";
    let files = |gateway: &'static str| {
        vec![
            ("gateway.toml", gateway.to_owned()),
            ("routes/r.toml", routes.to_owned()),
            (
                "upstreams/be.toml",
                "[upstream.be]\ntargets = [\"http://127.0.0.1:9011\"]\n".to_owned(),
            ),
            // The policy sees the trace id, and cannot choose the context sent upstream.
            (
                "policies/t.rhai",
                "fn on_request(req) {\n    req.set_header(\"x-trace\", `[${req.trace_id}]`);\n    req.set_header(\"traceparent\", \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\");\n}\n".to_owned(),
            ),
            (
                "tests/t.toml",
                format!(
                    r#"[[test]]
name = "continued"
request = {{ url = "/a", headers = {{ "traceparent" = "{CLIENT}" }} }}
expect = {{ upstream_trace_id = true, headers = {{ "x-trace" = "[4bf92f3577b34da6a3ce929d0e0e4736]" }} }}

[[test]]
name = "continued, written out"
request = {{ url = "/a", headers = {{ "traceparent" = "{CLIENT}" }} }}
expect = {{ upstream_trace_id = "4bf92f3577b34da6a3ce929d0e0e4736" }}

[[test]]
name = "wrongly expected new"
request = {{ url = "/a", headers = {{ "traceparent" = "{CLIENT}" }} }}
expect = {{ upstream_trace_id = false }}

[[test]]
name = "new trace"
request = {{ url = "/a" }}
expect = {{ headers = {{ "traceparent" = true }}, upstream_trace_id = "0af7651916cd43dd8448eb211c80319c" }}
"#
                ),
            ),
        ]
    };
    let traced = common::repo(&common::as_refs(&files(
        "[tracing]\nendpoint = \"http://127.0.0.1:9/v1/traces\"\nsample_ratio = 1.0\n",
    )));
    let (code, out, _) = rustygate_test(&[traced.path().to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let case = |name: &str| {
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no case {name} in {out}"))
            .clone()
    };
    for passing in ["continued", "continued, written out"] {
        let c = case(passing);
        assert_eq!(c["mismatches"], serde_json::json!([]), "{c}");
        // The gateway's own span is the upstream's parent, not the client's span, and the
        // policy's traceparent is replaced.
        let sent = c["got"]["upstream_request"]["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(!sent.contains("00f067aa0ba902b7"), "{sent}");
        assert!(sent.ends_with("-01"), "sampled at ratio 1: {sent}");
    }
    let wrong = case("wrongly expected new");
    assert_eq!(wrong["mismatches"][0]["check"], "upstream_trace_id");
    assert_eq!(
        wrong["mismatches"][0]["expected"],
        "a trace id other than the client's \"4bf92f3577b34da6a3ce929d0e0e4736\""
    );
    assert!(
        wrong["mismatches"][0]["got"]
            .as_str()
            .unwrap()
            .starts_with("traceparent \"00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{wrong}"
    );
    // Without a client trace the gateway starts its own: a random one, not the policy's.
    let new = case("new trace");
    assert_eq!(new["mismatches"].as_array().unwrap().len(), 1, "{new}");
    assert_eq!(new["mismatches"][0]["check"], "upstream_trace_id");
    let sent = new["got"]["upstream_request"]["headers"]["traceparent"]
        .as_str()
        .unwrap();
    assert!(!sent.contains("0af7651916cd43dd8448eb211c80319c"), "{sent}");
    assert_eq!(
        new["got"]["upstream_request"]["headers"]["x-trace"],
        format!("[{}]", &sent[3..35])
    );

    // Without `[tracing]` headers pass through untouched and `req.trace_id` is empty: here the
    // policy's traceparent is what the upstream gets.
    let plain = common::repo(&common::as_refs(&files("")));
    let (_, out, _) = rustygate_test(&[plain.path().to_str().unwrap(), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "continued")
        .unwrap();
    assert_eq!(c["got"]["upstream_request"]["headers"]["x-trace"], "[]");
    let m = c["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["check"] == "upstream_trace_id")
        .unwrap();
    assert_eq!(
        m["got"],
        "traceparent \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\""
    );
    let n = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "new trace")
        .unwrap();
    assert_eq!(n["mismatches"], serde_json::json!([]), "{n}");

    // Mistakes in the check itself are located diagnostics.
    let bad = common::repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\nprefix = \"/\"\nrespond = { status = 200 }\n",
        ),
        (
            "tests/a.toml",
            "[[test]]\nname = \"one\"\nrequest = { url = \"/\" }\nexpect = { upstream_trace_id = \"4BF9\" }\n\n[[test]]\nname = \"two\"\nrequest = { url = \"/\" }\nexpect = { upstream_trace_id = true }\n",
        ),
    ]);
    let (code, out, err) = rustygate_test(&[bad.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    for expected in [
        "error[invalid-value]: `4BF9` is not a trace id",
        "tests/a.toml:4:32",
        "compares with the case's `traceparent` header, and the case sends no valid one",
        "tests/a.toml:9:32",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
