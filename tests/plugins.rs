//! WASM plugins on a running gateway: the example plugin (built from Rust with the proxy-wasm
//! SDK) changes real requests and responses; a trapping plugin fails closed with a JSON 500 or
//! is skipped when `fail_open`; a reload swaps a plugin; config mistakes are located errors.
//!
//! `RUSTYGATE_TAG_WASM` names a freshly built example plugin (`.ci/run` builds it from
//! source); without it the module committed in `examples/plugins/plugins/` is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rustygate::compile::{CompileOptions, compile_dir};
use sha2::{Digest, Sha256};

fn example_wasm() -> Vec<u8> {
    let path = std::env::var_os("RUSTYGATE_TAG_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins/plugins/tag.wasm")
        });
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A config repo with `plugins/<name>.wasm` = `wasm`, declared with `decl_extra`, and one
/// catch-all route to `upstream` running `uses`.
fn plugin_repo(
    name: &str,
    wasm: &[u8],
    decl_extra: &str,
    upstream: &str,
    uses: &str,
) -> tempfile::TempDir {
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[plugin.{name}]\nfile = \"plugins/{name}.wasm\"\nsha256 = \"{}\"\n{decl_extra}\n",
                sha(wasm)
            ),
        ),
        (
            "routes/all.toml",
            &format!(
                "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\nplugins = [{uses}]\n"
            ),
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{upstream}\"]\n"),
        ),
    ]);
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join(format!("plugins/{name}.wasm")), wasm).unwrap();
    dir
}

#[test]
fn the_example_plugin_tags_responses_tells_the_upstream_and_can_deny() {
    let be = Backend::echo();
    let dir = plugin_repo(
        "tag",
        &example_wasm(),
        "",
        &be.url(),
        r#"{ name = "tag", config = { value = "from-test", deny_header = "x-block-me", deny_body_contains = "DROP TABLE" } }"#,
    );
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = get(&gw.url("/orders")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-rustygate-plugin"), Some("from-test"));
        // The SDK exports the body callbacks (they continue by default): a response whose
        // declared length arrives in one piece still goes out with that length.
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str()),
            "{:?}",
            reply.headers
        );
        let echo = reply.json();
        assert_eq!(
            Backend::echoed_header(&echo, "x-rustygate-plugin-seen").as_deref(),
            Some("from-test"),
            "{echo}"
        );

        let denied = send(
            http::Request::get(gw.url("/orders"))
                .header("x-block-me", "1")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(denied.status, 403);
        assert_eq!(denied.text(), "denied by plugin\n");

        // The SDK's body callback: it holds the body to its end, reads it whole, and denies
        // or lets it go to the upstream unchanged, with its length.
        let post = |body: &'static str| {
            http::Request::post(gw.url("/orders"))
                .body(full(body))
                .unwrap()
        };
        let denied = send(post("{\"q\": \"1; DROP TABLE orders\"}")).await;
        assert_eq!(denied.status, 403, "{}", denied.text());
        assert_eq!(denied.text(), "denied by plugin (body)\n");
        let fine = send(post("{\"q\": \"1\"}")).await;
        assert_eq!(fine.status, 200, "{}", fine.text());
        let echo = fine.json();
        assert_eq!(echo["body"], "{\"q\": \"1\"}");
        assert_eq!(
            Backend::echoed_header(&echo, "content-length").as_deref(),
            Some("10")
        );

        // A body of a megabyte fits in the default instruction budget (the example's search
        // once ran out of it at ~300 KB and answered 500): text full of near misses goes
        // through whole, and the text at its very end is found.
        let filler = "{\"note\": \"DROP TABL\", \"id\": 12345}, ".repeat(1024 * 1024 / 36);
        let big = |tail: &str| {
            http::Request::post(gw.url("/orders"))
                .body(full(format!("{filler}{tail}")))
                .unwrap()
        };
        let fine = send(big("")).await;
        assert_eq!(fine.status, 200, "{}", fine.text());
        assert_eq!(
            fine.json()["body"].as_str().map(str::len),
            Some(filler.len())
        );
        let denied = send(big("DROP TABLE")).await;
        assert_eq!(denied.status, 403, "{}", denied.text());
        assert_eq!(denied.text(), "denied by plugin (body)\n");
    });
}

#[test]
fn a_reload_swaps_the_plugin_configuration() {
    let be = Backend::echo();
    let wasm = example_wasm();
    let dir = plugin_repo(
        "tag",
        &wasm,
        "",
        &be.url(),
        r#"{ name = "tag", config = { value = "one" } }"#,
    );
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(get(&gw.url("/")).await.header("x-rustygate-plugin"), Some("one"));
        gw.swap(&[(
            "routes/all.toml",
            "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\nplugins = [{ name = \"tag\", config = { value = \"two\" } }]\n",
        )]);
        assert_eq!(get(&gw.url("/")).await.header("x-rustygate-plugin"), Some("two"));
        // And away: a route without plugins.
        gw.swap(&[(
            "routes/all.toml",
            "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n",
        )]);
        assert_eq!(get(&gw.url("/")).await.header("x-rustygate-plugin"), None);
    });
}

/// A plugin that traps in `on_request_headers`.
const TRAPS: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable))"#;

/// A plugin that never returns from `on_request_headers`.
const LOOPS: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $l (br $l)) (i32.const 0)))"#;

#[test]
fn a_trapping_plugin_fails_closed_with_a_json_500_and_the_request_id() {
    let be = Backend::echo();
    let wasm = wat::parse_str(TRAPS).unwrap();
    let dir = plugin_repo("traps", &wasm, "", &be.url(), r#"{ name = "traps" }"#);
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = get(&gw.url("/x")).await;
        assert_eq!(reply.status, 500, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["error"], "a plugin of this route failed");
        assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(body["request_id"].as_str(), reply.header("x-request-id"));
    });
    let m = scrape(&gw);
    assert_eq!(
        m.get("rustygate_plugin_errors_total{plugin=\"traps\",reason=\"trap\"}"),
        Some(&1.0),
        "{m:?}"
    );
}

#[test]
fn a_fail_open_plugin_that_traps_is_skipped_and_counted() {
    let be = Backend::echo();
    let wasm = wat::parse_str(TRAPS).unwrap();
    let dir = plugin_repo(
        "traps_open",
        &wasm,
        "on_error = \"fail_open\"",
        &be.url(),
        r#"{ name = "traps_open" }"#,
    );
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..2 {
            let reply = get(&gw.url("/x")).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    });
    let m = scrape(&gw);
    assert_eq!(
        m.get("rustygate_plugin_errors_total{plugin=\"traps_open\",reason=\"trap\"}"),
        Some(&2.0),
        "{m:?}"
    );
}

#[test]
fn an_endless_plugin_is_stopped_and_the_single_worker_keeps_serving() {
    let be = Backend::echo();
    let looping = wat::parse_str(LOOPS).unwrap();
    let tag = example_wasm();
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[plugin.loops]\nfile = \"plugins/loops.wasm\"\nsha256 = \"{}\"\n\n[plugin.tag]\nfile = \"plugins/tag.wasm\"\nsha256 = \"{}\"\n",
                sha(&looping),
                sha(&tag)
            ),
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"loops\"\nprefix = \"/loop\"\nupstream = \"be\"\nplugins = [{ name = \"loops\" }]\n\n[[route]]\nname = \"ok\"\nprefix = \"/ok\"\nupstream = \"be\"\nplugins = [{ name = \"tag\", config = { value = \"still-here\" } }]\n",
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
    ]);
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join("plugins/loops.wasm"), &looping).unwrap();
    std::fs::write(dir.path().join("plugins/tag.wasm"), &tag).unwrap();
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..2 {
            let reply = get(&gw.url("/loop")).await;
            assert_eq!(reply.status, 500, "{}", reply.text());
            let ok = get(&gw.url("/ok")).await;
            assert_eq!(ok.status, 200);
            assert_eq!(ok.header("x-rustygate-plugin"), Some("still-here"));
        }
    });
    let m = scrape(&gw);
    assert_eq!(
        m.get("rustygate_plugin_errors_total{plugin=\"loops\",reason=\"instructions\"}"),
        Some(&2.0),
        "{m:?}"
    );
}

fn diagnostics(dir: &Path) -> String {
    let c = compile_dir(dir, &CompileOptions::default()).unwrap();
    assert!(c.snapshot.is_none(), "expected errors");
    c.diagnostics.render_human(&c.files)
}

#[test]
fn a_sha256_mismatch_is_a_located_error() {
    let wasm = example_wasm();
    let dir = plugin_repo(
        "tag",
        &wasm,
        "",
        "http://127.0.0.1:9",
        r#"{ name = "tag" }"#,
    );
    // The file changes; the pin does not.
    let mut changed = wasm.clone();
    changed.extend_from_slice(&[0, 0]);
    std::fs::write(dir.path().join("plugins/tag.wasm"), &changed).unwrap();
    let out = diagnostics(dir.path());
    assert!(out.contains("plugin-sha256-mismatch"), "{out}");
    assert!(out.contains(&sha(&changed)), "{out}");
    assert!(
        out.contains("gateway.toml:3:"),
        "not located at the pin:\n{out}"
    );
}

#[test]
fn plugin_files_stay_inside_the_repo() {
    let outside = tempfile::tempdir().unwrap();
    let wasm = example_wasm();
    std::fs::write(outside.path().join("evil.wasm"), &wasm).unwrap();
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[plugin.evil]\nfile = \"{}\"\nsha256 = \"{}\"\n\n[plugin.up]\nfile = \"../evil.wasm\"\nsha256 = \"{}\"\n",
                outside.path().join("evil.wasm").display(),
                sha(&wasm),
                sha(&wasm)
            ),
        ),
        (
            "routes/r.toml",
            "[[route]]\nname = \"r\"\nprefix = \"/\"\nrespond = { status = 200 }\nplugins = [{ name = \"evil\" }, { name = \"up\" }]\n",
        ),
    ]);
    let out = diagnostics(dir.path());
    assert!(out.contains("absolute"), "{out}");
    assert!(out.contains("gateway.toml:2:"), "{out}");
    assert!(out.contains("gateway.toml:6:"), "{out}");
}

#[test]
fn an_unknown_plugin_and_a_bad_import_are_named() {
    let bad = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "path_open" (func (param i32) (result i32)))
                   (memory (export "memory") 1))"#,
    )
    .unwrap();
    let dir = plugin_repo(
        "badimport",
        &bad,
        "",
        "http://127.0.0.1:9",
        r#"{ name = "badimprt" }"#,
    );
    let out = diagnostics(dir.path());
    assert!(out.contains("wasi_snapshot_preview1.path_open"), "{out}");
    assert!(out.contains("unknown plugin `badimprt`"), "{out}");
    assert!(out.contains("did you mean `badimport`?"), "{out}");
}

#[test]
fn an_over_large_table_is_a_located_error() {
    let big = wat::parse_str(
        r#"(module
  (memory (export "memory") 1)
  (table 5000000 funcref)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32)))"#,
    )
    .unwrap();
    let dir = plugin_repo(
        "tables",
        &big,
        "",
        "http://127.0.0.1:9",
        r#"{ name = "tables" }"#,
    );
    let out = diagnostics(dir.path());
    assert!(out.contains("invalid-plugin"), "{out}");
    assert!(out.contains("tables of 5000000 elements at start"), "{out}");
    assert!(
        out.contains("gateway.toml:2:"),
        "not located at the file:\n{out}"
    );
}

/// A plugin that removes the response's `Content-Length`.
const DROPS_LENGTH: &str = r#"(module
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "content-length")
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $remove (i32.const 2) (i32.const 0) (i32.const 14)))
    (i32.const 0)))"#;

/// The body is the upstream's whatever a plugin does to the head: with `Content-Length`
/// removed, a small body (in the buffer with its head), a large one (streamed) and a HEAD
/// response still go out with the upstream's length, and the connection stays usable.
#[test]
fn a_plugin_removing_content_length_leaves_the_upstreams_length() {
    let big = "b".repeat(300_000);
    let big_len = big.len().to_string();
    let be = Backend::start(move |req: http::Request<hyper::body::Incoming>| {
        let body = if req.uri().path() == "/big" {
            big.clone()
        } else {
            "small".to_owned()
        };
        async move { http::Response::new(full(body)) }
    });
    let wasm = wat::parse_str(DROPS_LENGTH).unwrap();
    let dir = plugin_repo("drops", &wasm, "", &be.url(), r#"{ name = "drops" }"#);
    let gw = Gateway::start_one_worker(dir);
    let mut conn = KeepAlive::connect(&gw.addr.to_string()).unwrap();
    let (status, small) = conn.get("/small").unwrap();
    assert_eq!((status, small.as_str()), (200, "small"));
    let (status, body) = conn.get("/big").unwrap();
    assert_eq!((status, body.len()), (200, 300_000));

    let head = |path: &str| {
        let resp = raw(
            gw.addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .to_ascii_lowercase();
        let (head, body) = resp.split_once("\r\n\r\n").expect("a whole head");
        assert!(body.is_empty(), "{resp}");
        head.to_owned()
    };
    assert!(head("/small").contains("content-length: 5\r\n"));
    assert!(head("/big").contains(&format!("content-length: {big_len}\r\n")));
}

/// DESIGN.md's fixed order: the Rhai policy's `on_request`, then the WASM plugins, which see
/// the headers as the policy left them and whose edits the upstream gets last; on the way back
/// the plugins first, then the policy's `on_response`, which sees what they added.
#[test]
fn the_policy_runs_before_the_plugins_and_after_them_on_the_way_back() {
    let be = Backend::echo();
    let wasm = example_wasm();
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[plugin.tag]\nfile = \"plugins/tag.wasm\"\nsha256 = \"{}\"\n",
                sha(&wasm)
            ),
        ),
        (
            "routes/all.toml",
            "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n\
             policy = \"policies/order.rhai\"\n\
             plugins = [{ name = \"tag\", config = { value = \"from-plugin\", deny_header = \"x-block-me\" } }]\n",
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
        (
            "policies/order.rhai",
            r#"
fn on_request(req) {
    let seen = if req.has_header("x-rustygate-plugin-seen") { "yes" } else { "no" };
    req.set_header("x-policy-saw-plugin", seen);
    req.set_header("x-rustygate-plugin-seen", "from-policy");
    if req.path == "/blocked" {
        req.set_header("x-block-me", "1");
    }
}

fn on_response(req, res) {
    let v = res.header("x-rustygate-plugin");
    res.set_header("x-policy-saw-response", if v == () { "none" } else { v });
}
"#,
        ),
    ]);
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join("plugins/tag.wasm"), &wasm).unwrap();
    let gw = Gateway::start_one_worker(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = get(&gw.url("/orders")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echo = reply.json();
        // The policy ran first: the plugin's request header was not there yet...
        assert_eq!(
            Backend::echoed_header(&echo, "x-policy-saw-plugin").as_deref(),
            Some("no"),
            "{echo}"
        );
        // ...and the plugin's edit of the same header, made after the policy's, is the one
        // the upstream gets.
        assert_eq!(
            Backend::echoed_header(&echo, "x-rustygate-plugin-seen").as_deref(),
            Some("from-plugin"),
            "{echo}"
        );
        // On the way back the plugin ran first: the policy saw its header.
        assert_eq!(reply.header("x-rustygate-plugin"), Some("from-plugin"));
        assert_eq!(reply.header("x-policy-saw-response"), Some("from-plugin"));

        // The plugin sees a header only the policy set, and answers the request itself.
        let denied = get(&gw.url("/blocked")).await;
        assert_eq!(denied.status, 403, "{}", denied.text());
        assert_eq!(denied.text(), "denied by plugin\n");
    });
}
