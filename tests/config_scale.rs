//! Config at scale (issue #14, item 7): a config repo of many routes compiles into a router that
//! matches what it was given. Figures (time, memory, latency) come from
//! `bench/config-scale.sh`, never from assertions here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::path::Path;

use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::decide::{Incoming, Routed, route};

/// The route mix of `bench/gen-routes.py`, written into `root`: per 10 routes 4 exact paths,
/// 3 `{param}` paths, 3 prefixes; 8 on exact hosts, 1 on a wildcard host, 1 on any host; some
/// with `methods`, auth, CORS, rate limits, header rules, timeouts; 20 upstreams.
pub fn write_routes(root: &Path, n: usize) {
    const RESOURCES: [&str; 8] = [
        "orders", "users", "items", "carts", "invoices", "payments", "search", "reports",
    ];
    let hosts = (n / 500).max(10);
    std::fs::create_dir_all(root.join("routes")).unwrap();
    std::fs::create_dir_all(root.join("upstreams")).unwrap();
    std::fs::write(
        root.join("gateway.toml"),
        "[cors.public]\nallow_origins = [\"https://app.example.com\"]\n\n\
         [auth.idp]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\n\
         secret = { env = \"SCALE_TEST_JWT_SECRET\" }\n",
    )
    .unwrap();
    let mut ups = String::new();
    for u in 0..20 {
        writeln!(
            ups,
            "[upstream.be{u}]\ntargets = [\"http://127.0.0.1:{}\"]\n",
            20000 + u
        )
        .unwrap();
    }
    std::fs::write(root.join("upstreams/all.toml"), ups).unwrap();
    for (part, start) in (0..n).step_by(500).enumerate() {
        let mut f = String::new();
        for i in start..n.min(start + 500) {
            f += &route_text(i, hosts, &RESOURCES);
        }
        std::fs::write(root.join(format!("routes/part{part:04}.toml")), f).unwrap();
    }
}

fn route_text(i: usize, hosts: usize, resources: &[&str]) -> String {
    let mut r = format!("[[route]]\nname = \"r{i}\"\n");
    match i % 10 {
        0 => {}
        1 => writeln!(r, "host = \"*.t{}.example.net\"", i % (hosts / 10).max(1)).unwrap(),
        _ => writeln!(r, "host = \"svc{}.example.com\"", i % hosts).unwrap(),
    }
    let res = resources[i % resources.len()];
    let v = i % 3 + 1;
    match (i / 10 + i) % 10 {
        0..=3 => writeln!(r, "path = \"/api/v{v}/{res}{i}\"").unwrap(),
        4..=6 if i.is_multiple_of(3) => {
            writeln!(r, "path = \"/api/v{v}/{res}{i}/{{id}}/lines/{{line}}\"").unwrap()
        }
        4..=6 => writeln!(r, "path = \"/api/v{v}/{res}{i}/{{id}}\"").unwrap(),
        _ => writeln!(r, "prefix = \"/static/{res}{i}\"").unwrap(),
    }
    match i % 10 {
        2 | 5 => r += "methods = [\"GET\", \"HEAD\"]\n",
        7 => r += "methods = [\"POST\", \"PUT\", \"PATCH\"]\n",
        _ => {}
    }
    if i % 100 == 42 {
        r += "respond = { status = 200, body = \"ok\" }\n\n";
        return r;
    }
    writeln!(r, "upstream = \"be{}\"", i % 20).unwrap();
    match i % 20 {
        3 | 13 => r += "auth = \"idp\"\n",
        4 | 14 => r += "cors = \"public\"\n",
        6 => r += "rate_limit = { requests = 100, per = \"1m\" }\n",
        8 => writeln!(
            r,
            "request_headers = {{ set = {{ \"x-route\" = \"r{i}\" }} }}"
        )
        .unwrap(),
        9 | 19 => r += "timeout = \"5s\"\n",
        _ => {}
    }
    r.push('\n');
    r
}

fn compile_opts() -> CompileOptions {
    CompileOptions {
        resolve_secrets: false,
        ..CompileOptions::default()
    }
}

#[test]
fn ten_thousand_routes_compile_and_each_matches_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_routes(dir.path(), 10_000);
    let compiled = compile_dir(dir.path(), &compile_opts()).unwrap();
    let diags = compiled.diagnostics.render_short(&compiled.files);
    let snap = compiled.snapshot.unwrap_or_else(|| panic!("{diags}"));
    assert_eq!(snap.routes.len(), 10_000, "{diags}");
    assert_eq!(compiled.diagnostics.len(), 0, "{diags}");

    let hosts = 20;
    let mut checked = 0;
    for i in (0..10_000).step_by(7) {
        let host = match i % 10 {
            0 => "any.example.org".to_owned(),
            1 => format!("a.t{}.example.net", i % (hosts / 10)),
            _ => format!("svc{}.example.com", i % hosts),
        };
        let res = [
            "orders", "users", "items", "carts", "invoices", "payments", "search", "reports",
        ][i % 8];
        let v = i % 3 + 1;
        let path = match (i / 10 + i) % 10 {
            0..=3 => format!("/api/v{v}/{res}{i}"),
            4..=6 if i.is_multiple_of(3) => format!("/api/v{v}/{res}{i}/7/lines/2"),
            4..=6 => format!("/api/v{v}/{res}{i}/7"),
            _ => format!("/static/{res}{i}/css/site.css"),
        };
        let method = if i % 10 == 7 { "PUT" } else { "GET" };
        let inc = Incoming {
            method,
            host: &host,
            path: &path,
            query: None,
            client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            claims: None,
        };
        match route(&snap, &inc) {
            Routed::Matched(m) => assert_eq!(
                snap.routes[m.route].name,
                format!("r{i}"),
                "{method} {host}{path}"
            ),
            _ => panic!("{method} {host}{path} matched nothing"),
        }
        checked += 1;
    }
    assert!(checked > 1000);
}

