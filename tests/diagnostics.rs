#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every compiler check, seen from outside: a small config repo on disk, the real `compile_dir`,
//! and the exact code, severity and `file:line:col` of what it reports. The last tests run the
//! built `rustygate validate` binary to pin its CLI contract (exit codes, output formats).

use std::path::Path;
use std::process::{Command, Output};

use rustygate::compile::{CompileOptions, Compiled, compile_dir};
use rustygate::config::diag::Label;
use rustygate::config::{Diagnostic, Severity};
use tempfile::TempDir;

/// An upstream the route snippets below can use.
const ORDERS_UPSTREAM: (&str, &str) = (
    "upstreams/orders.toml",
    "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\n",
);

/// Writes a config repo: `(repo-relative path, content)` pairs.
fn repo(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn compile_with(dir: &Path, resolve_secrets: bool) -> Compiled {
    let opts = CompileOptions {
        resolve_secrets,
        // The tests keep their secret files in temp dirs; tests/file_boundary.rs checks roots.
        secret_roots: vec![std::env::temp_dir()],
        ..CompileOptions::default()
    };
    compile_dir(dir, &opts).unwrap()
}

fn compile(dir: &Path) -> Compiled {
    compile_with(dir, true)
}

fn location(c: &Compiled, label: &Label) -> String {
    let (line, col) = c.files.line_col(label.file, label.span.start);
    format!("{}:{line}:{col}", c.files.name(label.file))
}

/// Every diagnostic as `severity[code] file:line:col`, in the order they were reported.
fn summary(c: &Compiled) -> Vec<String> {
    c.diagnostics
        .iter()
        .map(|d| {
            let severity = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let at = d
                .primary
                .as_ref()
                .map(|p| location(c, p))
                .unwrap_or_default();
            format!("{severity}[{}] {at}", d.code)
        })
        .collect()
}

/// The one diagnostic with this code; fails if there is not exactly one.
fn the<'c>(c: &'c Compiled, code: &str) -> &'c Diagnostic {
    let found: Vec<_> = c.diagnostics.iter().filter(|d| d.code == code).collect();
    assert_eq!(found.len(), 1, "one `{code}` expected: {:#?}", summary(c));
    found[0]
}

/// Asserts the repo compiles to exactly `expected` (see [`summary`]) and returns the result.
fn expect(files: &[(&str, &str)], expected: &[&str]) -> Compiled {
    let dir = repo(files);
    let c = compile(dir.path());
    assert_eq!(summary(&c), expected);
    let has_error = expected.iter().any(|e| e.starts_with("error"));
    assert_eq!(
        c.snapshot.is_none(),
        has_error,
        "a snapshot exactly when there is no error"
    );
    c
}

#[test]
fn toml_syntax_error_is_located() {
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/x\"\nmethods = [\"GET\" \"POST\"]\nrespond = { status = 200 }\n",
        )],
        &["error[toml-syntax] routes/a.toml:4:18"],
    );
    let d = the(&c, "toml-syntax");
    assert!(d.message.contains("comma"), "{}", d.message);
}

#[test]
fn a_cors_preset_that_does_not_compile_is_reported_once_where_it_is_written() {
    let route = |name: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\npath = \"/{name}\"\nupstream = \"orders\"\ncors = \"app\"\n"
        )
    };
    let routes = format!("{}{}", route("a"), route("b"));
    let c = expect(
        &[
            (
                "gateway.toml",
                "[cors.app]\nallow_origins = [\"not a url\"]\n",
            ),
            ("routes/a.toml", &routes),
            ORDERS_UPSTREAM,
        ],
        &["error[invalid-cors] gateway.toml:1:1"],
    );
    assert!(c.diagnostics.iter().all(|d| d.code != "unknown-cors"));
}

#[test]
fn unknown_key_points_at_the_key() {
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = { status = 200 }\nupstrem = \"orders\"\n",
        )],
        &["error[unknown-key] routes/a.toml:5:1"],
    );
    let d = the(&c, "unknown-key");
    assert!(d.message.contains("`upstrem`"), "{}", d.message);
    assert!(d.message.contains("route `a`"), "{}", d.message);
    let p = d.primary.as_ref().unwrap();
    assert_eq!(&c.files.source(p.file)[p.span.clone()], "upstrem");
}

#[test]
fn unknown_key_inside_inline_tables_and_targets() {
    expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = { status = 200, bdy = \"x\" }\n",
        )],
        &["error[unknown-key] routes/a.toml:4:27"],
    );
    // A weighted target with a typo used to be accepted silently with weight 1.
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/x\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/orders.toml",
                "[upstream.orders]\ntargets = [{ url = \"http://127.0.0.1:8001\", wieght = 2 }]\n",
            ),
        ],
        &["error[unknown-key] upstreams/orders.toml:2:45"],
    );
    // A mistyped secret reference names the key, not "did not match any variant".
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = { status = 200 }\nresponse_headers = { set = { x-a = { evn = \"A\" } } }\n",
        )],
        &["error[unknown-key] routes/a.toml:5:38"],
    );
    assert!(the(&c, "unknown-key").message.contains("`evn`"));
}

#[test]
fn secret_reference_needs_exactly_one_key() {
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = { status = 200 }\nresponse_headers = { set = { x-a = { env = \"A\", file = \"/a\" } } }\n",
        )],
        &["error[invalid-value] routes/a.toml:5:36"],
    );
    assert!(the(&c, "invalid-value").message.contains("exactly one"));
}

#[test]
fn unknown_top_level_table_in_a_routes_file() {
    expect(
        &[(
            "routes/a.toml",
            "[[routes]]\nname = \"a\"\npath = \"/x\"\nrespond = { status = 200 }\n",
        )],
        &["error[unknown-key] routes/a.toml:1:3"],
    );
}

#[test]
fn wrong_type_points_at_the_value() {
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = 5\nrespond = { status = 200 }\n",
        )],
        &["error[wrong-type] routes/a.toml:3:8"],
    );
    assert!(the(&c, "wrong-type").message.contains("integer"));
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/x\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/orders.toml",
                "[upstream.orders]\ntargets = \"http://127.0.0.1:8001\"\n",
            ),
        ],
        &["error[wrong-type] upstreams/orders.toml:2:11"],
    );
}

#[test]
fn duplicate_route_name_shows_both_definitions() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"orders\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            (
                "routes/b.toml",
                "# second file\n[[route]]\nname = \"orders\"\npath = \"/b\"\nupstream = \"orders\"\n",
            ),
        ],
        &["error[duplicate-route] routes/b.toml:3:8"],
    );
    let d = the(&c, "duplicate-route");
    assert_eq!(d.secondary.len(), 1);
    assert_eq!(location(&c, &d.secondary[0]), "routes/a.toml:2:8");
    assert!(d.secondary[0].message.contains("first"));
}

#[test]
fn unknown_upstream_suggests_the_closest_name() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"order\"\n",
            ),
        ],
        &[
            "error[unknown-upstream] routes/a.toml:4:12",
            "warning[unused-upstream] upstreams/orders.toml:1:11",
        ],
    );
    let d = the(&c, "unknown-upstream");
    assert!(d.message.contains("`order`"), "{}", d.message);
    assert_eq!(d.help, ["did you mean `orders`?"]);
}

#[test]
fn upstream_that_failed_to_load_is_not_also_unknown() {
    // The typo in the upstream is the one error; the route using it is not blamed.
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/orders.toml",
                "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\nbalanse = \"round_robin\"\n",
            ),
        ],
        &["error[unknown-key] upstreams/orders.toml:3:1"],
    );
    // Nor is the upstream of a route that failed to load reported as unused.
    expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\nupstream = \"orders\"\n",
            ),
        ],
        &["error[toml-syntax] routes/a.toml:3:11"],
    );
}

#[test]
fn auth_provider_that_failed_to_compile_is_not_also_unknown() {
    // The provider's missing secret is the one error; the routes naming it are not blamed.
    let gateway = (
        "gateway.toml",
        "[auth.idp]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = { env = \"DIAGNOSTICS_TEST_UNSET_JWT_SECRET\" }\n",
    );
    let routes = (
        "routes/a.toml",
        "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\nauth = \"idp\"\n\n[[route]]\nname = \"b\"\npath = \"/b\"\nupstream = \"orders\"\nauth = \"idp\"\n",
    );
    expect(
        &[ORDERS_UPSTREAM, gateway, routes],
        &["error[missing-secret] gateway.toml:4:10"],
    );
    // A name that no provider declares is still unknown, next to the failed one.
    let typo = (
        "routes/a.toml",
        "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\nauth = \"idp2\"\n",
    );
    let c = expect(
        &[ORDERS_UPSTREAM, gateway, typo],
        &[
            "error[missing-secret] gateway.toml:4:10",
            "error[unknown-auth] routes/a.toml:5:8",
        ],
    );
    assert_eq!(the(&c, "unknown-auth").help, ["did you mean `idp`?"]);
}

#[test]
fn route_without_upstream_or_respond() {
    let c = expect(
        &[(
            "routes/a.toml",
            "[[route]]\nname = \"idle\"\npath = \"/a\"\n",
        )],
        &["error[no-action] routes/a.toml:2:8"],
    );
    assert!(the(&c, "no-action").message.contains("`idle`"));
}

#[test]
fn route_conflict_shows_both_routes() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\nhost = \"api.example.com\"\npath = \"/orders/{id}\"\nmethods = [\"GET\"]\nupstream = \"orders\"\n",
            ),
            (
                "routes/b.toml",
                "[[route]]\nname = \"b\"\nhost = \"API.example.com\"\nmethods = [\"POST\", \"GET\"]\npath = \"/orders/{id}\"\nupstream = \"orders\"\n",
            ),
        ],
        &["error[route-conflict] routes/b.toml:5:8"],
    );
    let d = the(&c, "route-conflict");
    assert!(d.message.contains("`a` and `b`"), "{}", d.message);
    assert!(d.message.contains("GET"), "{}", d.message);
    assert_eq!(d.secondary.len(), 1);
    assert_eq!(location(&c, &d.secondary[0]), "routes/a.toml:4:8");
}

#[test]
fn same_path_with_other_method_or_host_is_no_conflict() {
    expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/x\"\nmethods = [\"GET\"]\nupstream = \"orders\"\n\n\
                 [[route]]\nname = \"b\"\npath = \"/x\"\nmethods = [\"POST\"]\nupstream = \"orders\"\n\n\
                 [[route]]\nname = \"c\"\nhost = \"a.example.com\"\npath = \"/x\"\nupstream = \"orders\"\n",
            ),
        ],
        &[],
    );
}

#[test]
fn unreachable_route_is_a_warning() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a//b\"\nupstream = \"orders\"\n",
            ),
        ],
        &["warning[unreachable-route] routes/a.toml:3:8"],
    );
    assert_eq!(the(&c, "unreachable-route").help, ["write `/a/b`"]);
}

#[test]
fn a_websocket_route_to_an_http2_upstream_is_a_warning() {
    let h2 = (
        "upstreams/grpc.toml",
        "[upstream.grpc]\ntargets = [\"http://127.0.0.1:50051\"]\nprotocol = \"http2\"\n",
    );
    let c = expect(
        &[
            h2,
            (
                "routes/a.toml",
                "[[route]]\nname = \"chat\"\nprefix = \"/chat\"\nupstream = \"grpc\"\nwebsocket = true\n",
            ),
        ],
        &["warning[websocket-http2-upstream] routes/a.toml:2:8"],
    );
    assert!(
        the(&c, "websocket-http2-upstream")
            .message
            .contains("handshakes are forwarded as plain requests"),
        "{:?}",
        the(&c, "websocket-http2-upstream")
    );
    // Left to its default (upgrades taken where the upstream can), nothing to say.
    expect(
        &[
            h2,
            (
                "routes/a.toml",
                "[[route]]\nname = \"chat\"\nprefix = \"/chat\"\nupstream = \"grpc\"\n",
            ),
        ],
        &[],
    );
}

#[test]
fn upstream_without_targets() {
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            ("upstreams/orders.toml", "[upstream.orders]\ntargets = []\n"),
        ],
        &["error[no-targets] upstreams/orders.toml:2:11"],
    );
}

#[test]
fn invalid_target_url_points_at_the_target() {
    let c = expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/orders.toml",
                "[upstream.orders]\ntargets = [\n  \"http://127.0.0.1:8001\",\n  \"127.0.0.1:8002\",\n]\n",
            ),
        ],
        &["error[invalid-target] upstreams/orders.toml:4:3"],
    );
    assert!(the(&c, "invalid-target").message.contains("127.0.0.1:8002"));
}

#[test]
fn invalid_duration_and_size() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\ntimeout = \"5\"\nmax_body_size = \"10 MiBs\"\n",
            ),
            ("gateway.toml", "[defaults]\nconnect_timeout = \"soon\"\n"),
        ],
        &[
            "error[invalid-duration] gateway.toml:2:19",
            "error[invalid-duration] routes/a.toml:5:11",
            "error[invalid-size] routes/a.toml:6:17",
        ],
    );
    let messages: Vec<&str> = c.diagnostics.iter().map(|d| d.message.as_str()).collect();
    assert!(
        messages[0].contains("`soon` is not a duration"),
        "{messages:?}"
    );
    assert!(messages[1].contains("`5` has no unit"), "{messages:?}");
    assert!(
        messages[2].contains("`10 MiBs` is not a size"),
        "{messages:?}"
    );
}

#[test]
fn missing_policy_file() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\npolicy = \"policies/a.rhai\"\n",
            ),
        ],
        &["error[missing-file] routes/a.toml:5:10"],
    );
    assert!(the(&c, "missing-file").message.contains("policies/a.rhai"));
}

/// A route to `orders` and `[upstream.orders]` with an https target and these extra lines.
fn tls_repo(upstream_lines: &str, files: &[(&str, &str)]) -> TempDir {
    let upstream =
        format!("[upstream.orders]\ntargets = [\"https://127.0.0.1:8443\"]\n{upstream_lines}\n");
    let mut all = vec![
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
        ),
        ("upstreams/orders.toml", upstream.as_str()),
    ];
    all.extend_from_slice(files);
    repo(&all)
}

/// `upstreams/orders.toml:3:<column of needle>`: where a key on the upstream's third line is.
fn at_line_3(upstream_lines: &str, needle: &str) -> String {
    let line = upstream_lines.lines().next().unwrap();
    format!("upstreams/orders.toml:3:{}", line.find(needle).unwrap() + 1)
}

/// A CA certificate, a client certificate it signs and that certificate's key, in PEM.
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["gateway".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

#[test]
fn tls_settings_that_are_valid_compile_into_a_snapshot() {
    let (ca, cert, key) = test_pki();
    let secrets = tempfile::tempdir().unwrap();
    let key_path = secrets.path().join("client.key");
    std::fs::write(&key_path, key).unwrap();
    let lines = format!(
        "protocol = \"http2\"\ntls = {{ ca_file = \"certs/ca.pem\", server_name = \"orders.internal\", client_cert_file = \"certs/client.pem\", client_key = {{ file = {:?} }} }}",
        key_path.display().to_string()
    );
    let dir = tls_repo(
        &lines,
        &[("certs/ca.pem", &ca), ("certs/client.pem", &cert)],
    );
    let c = compile(dir.path());
    assert!(c.diagnostics.is_empty(), "{:#?}", summary(&c));
    let snapshot = c.snapshot.unwrap();
    let target = &snapshot.upstreams[0].targets[0];
    assert_eq!(target.connect_addr, "127.0.0.1:8443");
    let tls = target.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.to_str(), "orders.internal");
    assert_eq!(tls.config.alpn_protocols, [b"h2".to_vec()]);
    assert!(tls.config.client_auth_cert_resolver.has_certs());

    // Without secrets (`validate --no-env`) the key is not read and the rest is still checked.
    let lines = "tls = { ca_file = \"certs/ca.pem\", client_cert_file = \"certs/client.pem\", client_key = { env = \"TEST_UNSET_KEY_5C1D\" } }";
    let dir = tls_repo(lines, &[("certs/ca.pem", &ca), ("certs/client.pem", &cert)]);
    assert!(compile_with(dir.path(), false).diagnostics.is_empty());
    assert_eq!(
        summary(&compile(dir.path())),
        [format!(
            "error[missing-secret] {}",
            at_line_3(lines, "{ env")
        )]
    );
}

#[test]
fn missing_ca_file_is_located() {
    let lines = "tls = { ca_file = \"certs/ca.pem\" }";
    let dir = tls_repo(lines, &[]);
    let c = compile(dir.path());
    assert_eq!(
        summary(&c),
        [format!(
            "error[missing-file] {}",
            at_line_3(lines, "\"certs")
        )]
    );
    assert!(the(&c, "missing-file").message.contains("certs/ca.pem"));
    assert!(c.snapshot.is_none());

    let lines = "tls = { ca_file = \"../ca.pem\" }";
    let dir = tls_repo(lines, &[]);
    assert_eq!(
        summary(&compile(dir.path())),
        [format!("error[invalid-path] {}", at_line_3(lines, "\"../"))]
    );
}

#[test]
fn bad_pem_is_located() {
    let lines = "tls = { ca_file = \"certs/ca.pem\" }";
    let at = at_line_3(lines, "\"certs");
    for (pem, says) in [
        ("just text\n", "no PEM certificate"),
        (
            "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
            "not valid PEM",
        ),
        (
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
            "not a valid CA",
        ),
    ] {
        let dir = tls_repo(lines, &[("certs/ca.pem", pem)]);
        let c = compile(dir.path());
        assert_eq!(summary(&c), [format!("error[invalid-tls] {at}")], "{pem}");
        let d = the(&c, "invalid-tls");
        assert!(d.message.contains(says), "{}", d.message);
        assert!(d.message.contains("certs/ca.pem"), "{}", d.message);
    }
}

#[test]
fn client_certificate_and_key_go_together() {
    let (ca, cert, _) = test_pki();
    let files = [
        ("certs/ca.pem", ca.as_str()),
        ("certs/client.pem", cert.as_str()),
    ];
    let lines = "tls = { ca_file = \"certs/ca.pem\", client_cert_file = \"certs/client.pem\" }";
    expect_tls(lines, &files, &[("error[invalid-tls]", "\"certs/client")]);
    let lines = "tls = { ca_file = \"certs/ca.pem\", client_key = { env = \"HOME\" } }";
    expect_tls(lines, &files, &[("error[invalid-tls]", "{ env")]);
    // A private key is never written in the repo.
    let lines = "tls = { client_cert_file = \"certs/client.pem\", client_key = \"-----BEGIN PRIVATE KEY-----\" }";
    expect_tls(lines, &files, &[("error[inline-secret]", "\"-----")]);
    // A key that is not PEM.
    let secrets = tempfile::tempdir().unwrap();
    let key_path = secrets.path().join("client.key");
    std::fs::write(&key_path, "not a key").unwrap();
    let lines = format!(
        "tls = {{ client_cert_file = \"certs/client.pem\", client_key = {{ file = {:?} }} }}",
        key_path.display().to_string()
    );
    expect_tls(&lines, &files, &[("error[invalid-tls]", "{ file")]);
}

#[test]
fn tls_and_protocol_values_are_checked() {
    expect_tls(
        "tls = { server_name = \"not a name!\" }",
        &[],
        &[("error[invalid-tls]", "\"not")],
    );
    // An IPv6 address is taken with or without its brackets (as a target's host is written);
    // brackets around anything else are not a name.
    expect_tls("tls = { server_name = \"[::1]\" }", &[], &[]);
    expect_tls("tls = { server_name = \"2001:db8::1\" }", &[], &[]);
    expect_tls(
        "tls = { server_name = \"[orders.internal]\" }",
        &[],
        &[("error[invalid-tls]", "\"[orders")],
    );
    expect_tls(
        "protocol = \"http3\"",
        &[],
        &[("error[invalid-value]", "\"http3")],
    );
    // `tls` on an upstream without https:// targets does nothing: a warning.
    let upstream = "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\ntls = { ca_file = \"certs/ca.pem\" }\n";
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            ("upstreams/orders.toml", upstream),
        ],
        &["warning[unused-tls] upstreams/orders.toml:3:7"],
    );
}

/// Compiles [`tls_repo`] and expects exactly these `(severity[code], needle)` diagnostics.
fn expect_tls(lines: &str, files: &[(&str, &str)], expected: &[(&str, &str)]) {
    let dir = tls_repo(lines, files);
    let c = compile(dir.path());
    let expected: Vec<String> = expected
        .iter()
        .map(|(code, needle)| format!("{code} {}", at_line_3(lines, needle)))
        .collect();
    assert_eq!(summary(&c), expected, "{lines}");
}

#[test]
fn cli_validate_catches_a_bad_certificate() {
    let dir = tls_repo(
        "tls = { ca_file = \"certs/ca.pem\" }",
        &[("certs/ca.pem", "not a certificate\n")],
    );
    let out = validate(&["--format", "short", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("upstreams/orders.toml:3:19: error[invalid-tls]"),
        "{stderr}"
    );
}

#[test]
fn unused_upstream_is_a_warning() {
    expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/spare.toml",
                "# nothing routes here\n[upstream.spare]\ntargets = [\"http://127.0.0.1:8009\"]\n",
            ),
        ],
        &["warning[unused-upstream] upstreams/spare.toml:2:11"],
    );
}

const SECRET_ROUTE: &str = "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n\
    request_headers = { set = { x-api-key = { env = \"TEST_UNSET_SECRET_7F3A\" } } }\n";

#[test]
fn missing_env_secret_is_an_error_only_when_secrets_are_resolved() {
    let dir = repo(&[ORDERS_UPSTREAM, ("routes/a.toml", SECRET_ROUTE)]);
    let c = compile_with(dir.path(), true);
    assert_eq!(summary(&c), ["error[missing-secret] routes/a.toml:5:41"]);
    assert!(
        the(&c, "missing-secret")
            .message
            .contains("TEST_UNSET_SECRET_7F3A")
    );
    assert!(c.snapshot.is_none());

    let c = compile_with(dir.path(), false);
    assert!(c.diagnostics.is_empty(), "{:#?}", summary(&c));
    assert!(c.snapshot.is_some());
}

#[test]
fn file_secret_is_read_or_reported() {
    let secrets = tempfile::tempdir().unwrap();
    let present = secrets.path().join("key");
    std::fs::write(&present, "s3cret\n").unwrap();
    let absent = secrets.path().join("absent");
    let route = |path: &Path| {
        format!(
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\nrequest_headers = {{ set = {{ x-key = {{ file = {:?} }} }} }}\n",
            path.display().to_string()
        )
    };
    expect(&[ORDERS_UPSTREAM, ("routes/a.toml", &route(&present))], &[]);
    expect(
        &[ORDERS_UPSTREAM, ("routes/a.toml", &route(&absent))],
        &["error[missing-secret] routes/a.toml:5:37"],
    );
}

#[test]
fn every_error_in_every_file_is_reported_at_once() {
    let c = expect(
        &[
            ("gateway.toml", "[defaults]\ntimeout = \"forever\"\n"),
            ("routes/a.toml", "[[route]]\nname = \"a\"\npath = \"/a\n"),
            (
                "routes/b.toml",
                "[[route]]\nname = \"b\"\npath = \"/b\"\nupstream = \"orders\"\ntimeot = \"1s\"\n",
            ),
            (
                "routes/c.toml",
                "[[route]]\nname = \"c\"\npath = \"/c\"\nupstream = \"billing\"\n\n\
                 [[route]]\nname = \"d\"\npath = \"/d\"\n",
            ),
            (
                "upstreams/orders.toml",
                "[upstream.orders]\ntargets = [\"ftp://127.0.0.1:21\"]\n",
            ),
        ],
        &[
            "error[toml-syntax] routes/a.toml:3:11",
            "error[unknown-key] routes/b.toml:5:1",
            "error[invalid-duration] gateway.toml:2:11",
            "error[invalid-target] upstreams/orders.toml:2:12",
            "error[unknown-upstream] routes/c.toml:4:12",
            "error[no-action] routes/c.toml:7:8",
        ],
    );
    assert_eq!(c.diagnostics.error_count(), 6);
}

#[test]
fn warnings_alone_still_yield_a_snapshot() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a//b\"\nupstream = \"orders\"\n",
            ),
            (
                "upstreams/spare.toml",
                "[upstream.spare]\ntargets = [\"http://127.0.0.1:8009\"]\n",
            ),
        ],
        &[
            "warning[unreachable-route] routes/a.toml:3:8",
            "warning[unused-upstream] upstreams/spare.toml:1:11",
        ],
    );
    assert!(c.snapshot.is_some());
    assert_eq!(c.diagnostics.warning_count(), 2);
}

#[test]
fn one_error_among_warnings_yields_no_snapshot() {
    let c = expect(
        &[
            ORDERS_UPSTREAM,
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\npath = \"/a//b\"\nupstream = \"orders\"\n\n\
                 [[route]]\nname = \"b\"\npath = \"/b\"\n",
            ),
        ],
        &[
            "warning[unreachable-route] routes/a.toml:3:8",
            "error[no-action] routes/a.toml:7:8",
        ],
    );
    assert!(c.snapshot.is_none());
}

#[test]
fn json_rendering_carries_file_line_and_column() {
    let dir = repo(&[
        ORDERS_UPSTREAM,
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"order\"\n",
        ),
    ]);
    let c = compile(dir.path());
    let json = serde_json::to_value(c.diagnostics.to_json(&c.files)).unwrap();
    assert_eq!(
        json[0],
        serde_json::json!({
            "severity": "error",
            "code": "unknown-upstream",
            "message": "unknown upstream `order`",
            "file": "routes/a.toml",
            "line": 4,
            "column": 12,
            "help": ["did you mean `orders`?"],
        })
    );
}

// ---- the `rustygate validate` command line ------------------------------------------------

fn validate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .arg("validate")
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn valid_repo() -> TempDir {
    repo(&[
        ORDERS_UPSTREAM,
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
        ),
    ])
}

fn invalid_repo() -> TempDir {
    repo(&[
        ORDERS_UPSTREAM,
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"order\"\n",
        ),
    ])
}

fn warning_only_repo() -> TempDir {
    repo(&[
        ORDERS_UPSTREAM,
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
        ),
        (
            "upstreams/spare.toml",
            "[upstream.spare]\ntargets = [\"http://127.0.0.1:8009\"]\n",
        ),
    ])
}

#[test]
fn cli_valid_repo_exits_0() {
    let dir = valid_repo();
    let out = validate(&[dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("valid"));
}

#[test]
fn cli_invalid_repo_exits_1_with_located_human_diagnostics() {
    let dir = invalid_repo();
    let out = validate(&[dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("error[unknown-upstream]"), "{stderr}");
    assert!(stderr.contains("routes/a.toml:4:12"), "{stderr}");
    assert!(stderr.contains("upstream = \"order\""), "snippet: {stderr}");
    assert!(stderr.contains("did you mean `orders`?"), "{stderr}");
    assert!(stderr.contains("1 error(s)"), "{stderr}");
}

#[test]
fn cli_short_format_is_one_line_each() {
    let dir = invalid_repo();
    let out = validate(&["--format", "short", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().collect::<Vec<_>>(),
        [
            "routes/a.toml:4:12: error[unknown-upstream]: unknown upstream `order`",
            "upstreams/orders.toml:1:11: warning[unused-upstream]: upstream `orders` is not used by any route",
        ]
    );
}

#[test]
fn cli_json_format_is_an_array_on_stdout() {
    let dir = invalid_repo();
    let out = validate(&["--format", "json", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = json.as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        for key in ["file", "line", "column", "severity", "code", "message"] {
            assert!(item.get(key).is_some(), "`{key}` missing in {item}");
        }
    }
    assert_eq!(items[0]["file"], "routes/a.toml");
    assert_eq!(items[0]["line"], 4);
    assert_eq!(items[0]["column"], 12);
    assert_eq!(items[0]["severity"], "error");
    assert_eq!(items[0]["code"], "unknown-upstream");
    assert_eq!(items[1]["severity"], "warning");

    let dir = valid_repo();
    let out = validate(&["--format", "json", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, serde_json::json!([]));
}

#[test]
fn cli_deny_warnings_fails_a_warning_only_repo() {
    let dir = warning_only_repo();
    let path = dir.path().to_str().unwrap();
    let out = validate(&[path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning[unused-upstream]"));

    let out = validate(&["--deny-warnings", path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("error[unused-upstream]"));
}

#[test]
fn cli_no_env_skips_secrets() {
    let dir = repo(&[ORDERS_UPSTREAM, ("routes/a.toml", SECRET_ROUTE)]);
    let path = dir.path().to_str().unwrap();
    let out = validate(&[path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing-secret"));
    let out = validate(&["--no-env", path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn cli_missing_directory_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-repo");
    let out = validate(&[missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no-such-repo"));
}

/// A route on `be` plus an `[upstream.be]` with `extra` settings.
fn upstream_with(extra: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"be\"\n".to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"http://127.0.0.1:8001\"]\n{extra}\n"),
        ),
    ]
}

fn expect_upstream(extra: &str, expected: &[&str]) -> Compiled {
    let files = upstream_with(extra);
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    expect(&refs, expected)
}

#[test]
fn upstream_resilience_settings_are_checked_and_located() {
    // Every setting at once, valid.
    expect_upstream(
        "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"\nfail_open = true\n\
         health = { path = \"/healthz\", interval = \"2s\", timeout = \"1s\", expect_status = [200, \"3xx\"], healthy_after = 1, unhealthy_after = 2, host = \"be.internal\" }\n\
         outlier = { consecutive_failures = 3, consecutive_5xx = 5, base_ejection = \"10s\", max_ejection = \"1m\", max_ejected_percent = 30 }\n\
         retries = { attempts = 2, on = [\"connect_failure\", \"timeout\", \"5xx\"], backoff = \"10ms\", max_backoff = \"100ms\", replay_body_limit = \"8KiB\", budget_percent = 10, min_retries_per_second = 2 }\n\
         circuit_breaker = { max_requests = 100, max_pending = 10 }\n\
         total_timeout = \"10s\"\nidle_timeout = \"30s\"",
        &[],
    );
    let c = expect_upstream(
        "balance = \"consistent_hash\"",
        &["error[missing-hash-key] upstreams/be.toml:1:11"],
    );
    assert!(!the(&c, "missing-hash-key").help.is_empty());
    expect_upstream(
        "balance = \"consistent_hash\"\nhash_key = \"ip\"",
        &["error[invalid-hash-key] upstreams/be.toml:4:12"],
    );
    expect_upstream(
        "hash_key = \"path\"",
        &["warning[unused-hash-key] upstreams/be.toml:3:12"],
    );
    expect_upstream(
        "balance = \"fastest\"",
        &["error[invalid-value] upstreams/be.toml:3:11"],
    );
    let c = expect_upstream(
        "retries = { attempts = 2, on = [\"timeout\", \"sometimes\"] }",
        &["error[invalid-value] upstreams/be.toml:3:44"],
    );
    assert!(the(&c, "invalid-value").message.contains("`sometimes`"));
    expect_upstream(
        "retries = 11",
        &["error[invalid-value] upstreams/be.toml:3:11"],
    );
    expect_upstream(
        "retries = { attemps = 2 }",
        &["error[unknown-key] upstreams/be.toml:3:13"],
    );
    expect_upstream(
        "health = { path = \"healthz\", expect_status = [\"2yy\"], unhealthy_after = 0 }",
        &[
            "error[invalid-value] upstreams/be.toml:3:19",
            "error[invalid-value] upstreams/be.toml:3:47",
            "error[invalid-value] upstreams/be.toml:3:73",
        ],
    );
    expect_upstream(
        "health = { path = \"/h\", interval = \"1s\", timeout = \"5s\" }",
        &["warning[health-timeout] upstreams/be.toml:3:52"],
    );
    expect_upstream(
        "outlier = { max_ejected_percent = 150, base_ejection = \"1m\", max_ejection = \"10s\" }",
        &[
            "error[invalid-value] upstreams/be.toml:3:35",
            "error[invalid-value] upstreams/be.toml:3:77",
        ],
    );
    expect_upstream(
        "circuit_breaker = { max_requests = 0 }",
        &["error[invalid-value] upstreams/be.toml:3:36"],
    );
    expect_upstream(
        "idle_timeout = \"soon\"",
        &["error[invalid-duration] upstreams/be.toml:3:16"],
    );
}

#[test]
fn route_retry_overrides_cannot_set_the_upstream_budget() {
    let files = [
        (
            "routes/a.toml",
            "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"orders\"\nretries = { attempts = 1, budget_percent = 50 }\nconnect_timeout = \"1s\"\ntotal_timeout = \"5s\"\n",
        ),
        ORDERS_UPSTREAM,
    ];
    let c = expect(&files, &["error[upstream-only] routes/a.toml:5:44"]);
    assert!(the(&c, "upstream-only").message.contains("budget_percent"));
    expect(
        &[
            (
                "routes/a.toml",
                "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"orders\"\nretries = 3\n",
            ),
            ORDERS_UPSTREAM,
        ],
        &[],
    );
}

#[test]
fn http2_limits_are_checked_where_written() {
    expect(
        &[(
            "gateway.toml",
            "[limits]\nhttp2_max_concurrent_streams = 0\nhttp2_max_resets_per_second = 0\nhttp2_max_header_list_size = \"100B\"\n",
        )],
        &[
            "error[invalid-limit] gateway.toml:2:32",
            "error[invalid-limit] gateway.toml:3:31",
            "error[invalid-limit] gateway.toml:4:30",
        ],
    );
    // Windows: each within 64KiB..1GiB, the connection's at least a stream's.
    expect(
        &[(
            "gateway.toml",
            "[limits]\nhttp2_stream_window = \"16KiB\"\nhttp2_connection_window = \"2GiB\"\n",
        )],
        &[
            "error[invalid-limit] gateway.toml:2:23",
            "error[invalid-limit] gateway.toml:3:27",
        ],
    );
    expect(
        &[(
            "gateway.toml",
            "[limits]\nhttp2_stream_window = \"4MiB\"\nhttp2_connection_window = \"1MiB\"\n",
        )],
        &["error[invalid-limit] gateway.toml:3:27"],
    );
    expect(
        &[(
            "gateway.toml",
            "[limits]\nhttp2_stream_window = \"32MiB\"\n",
        )],
        &["error[invalid-limit] gateway.toml:2:23"],
    );
    expect(
        &[(
            "gateway.toml",
            "[limits]\nhttp2_stream_window = \"256KiB\"\nhttp2_connection_window = \"256KiB\"\n",
        )],
        &["warning[no-routes] "],
    );
}

/// A gateway.toml that does not load (here `plugins = [...]` written after `[plugin.tag]`,
/// which makes it a key of that table) is one error. Its plugins, auth providers and CORS
/// presets are unknown, but the routes naming them got "unknown plugin `tag`" (and auth,
/// CORS) on top, as if they were not declared. A name declared nowhere is still reported.
#[test]
fn names_declared_in_a_gateway_toml_that_does_not_load_are_not_unknown() {
    let gateway = "[plugin.tag]\nfile = \"plugins/tag.wasm\"\nsha256 = \"00\"\n\
                   plugins = [{ name = \"tag\" }]\n\n\
                   [auth.idp]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"k\"\n\n\
                   [cors.public]\nallow_origins = [\"*\"]\n";
    let routes = "[[route]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"orders\"\n\
                  plugins = [{ name = \"tag\" }]\nauth = \"idp\"\ncors = \"public\"\n\n\
                  [[route]]\nname = \"b\"\nprefix = \"/b\"\nupstream = \"orders\"\n\
                  plugins = [{ name = \"tagg\" }]\n";
    expect(
        &[
            ORDERS_UPSTREAM,
            ("gateway.toml", gateway),
            ("routes/a.toml", routes),
        ],
        &[
            "error[unknown-key] gateway.toml:4:1",
            "error[unknown-plugin] routes/a.toml:13:21",
        ],
    );
}

/// A TLS listener with `client_auth` whose own settings have an error is reported there; a
/// route with `require_client_cert` also got "no listener verifies one", which the file
/// contradicts. Without any listener with `client_auth` it is still an error.
#[test]
fn a_client_auth_listener_with_an_error_is_not_missing() {
    let missing = std::env::temp_dir().join("rustygate-no-such-dir");
    let file = |name: &str| missing.join(name).display().to_string();
    let gateway = format!(
        "[[listener]]\nname = \"mtls\"\naddress = \"127.0.0.1:8443\"\n\
         tls = {{ certificates = [{{ cert = {{ file = {:?} }}, key = {{ file = {:?} }} }}], client_auth = {{ ca = {{ file = {:?} }} }} }}\n",
        file("api.crt"),
        file("api.key"),
        file("ca.pem"),
    );
    let route = "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"orders\"\n\
                 require_client_cert = true\n";
    let dir = repo(&[
        ORDERS_UPSTREAM,
        ("gateway.toml", &gateway),
        ("routes/a.toml", route),
    ]);
    let c = compile(dir.path());
    let codes = summary(&c);
    assert!(c.diagnostics.error_count() > 0, "{codes:#?}");
    assert!(
        !codes.iter().any(|d| d.contains("no-client-auth")),
        "{codes:#?}"
    );
    expect(
        &[ORDERS_UPSTREAM, ("routes/a.toml", route)],
        &["error[no-client-auth] routes/a.toml:5:23"],
    );
}
