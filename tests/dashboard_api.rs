//! The dashboard's JSON API and page on the admin listener (issue #20): who may read them, what
//! they say about routes, upstreams (latency over the last window), reloads, traffic and the
//! fleet of replicas, and "which route would serve this request?" with hostile input. Real
//! gateways on loopback, a real backend, a real git repo, a real redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::redis_server::RedisServer;
use common::{
    Backend, Gateway, GatewayProcess, as_refs, commit_files, dead_port, full, wait_until,
};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::server::{Control, ServeOptions};
use rustygate::snapshot::SnapshotStore;
use serde_json::{Value, json};

const TOKEN: &str = "dashb0ard-token";

/// One HTTP/1.1 exchange with a chosen `Host`: status, lower-cased head, body.
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

fn call(
    addr: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before taking the whole body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Resp {
        status: head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A gateway in-process with `control`, its admin listener on `admin`, the traffic ring
/// sampled every 200 ms.
fn gateway(files: &[(&str, &str)], control: Control, admin: &str) -> (Gateway, String) {
    sampled(files, control, admin, Duration::from_millis(200))
}

/// [`gateway`], the traffic ring sampled `every` (its window is 180 samples).
fn sampled(
    files: &[(&str, &str)],
    control: Control,
    admin: &str,
    every: Duration,
) -> (Gateway, String) {
    let dir = common::repo(files);
    let compiled = compile_dir(
        dir.path(),
        &CompileOptions {
            resolve_secrets: true,
            version_id: None,
            source: dir.path().display().to_string(),
            secret_roots: vec![],
        },
    )
    .unwrap();
    let snapshot = compiled
        .snapshot
        .unwrap_or_else(|| panic!("{}", compiled.diagnostics.render_human(&compiled.files)));
    let opts = ServeOptions {
        workers: 1,
        admin_listen: admin.parse().unwrap(),
        traffic_sample_every: every,
        ..ServeOptions::default()
    };
    let mut gw = Gateway::serve_with(
        dir.path(),
        Arc::new(SnapshotStore::new(snapshot)),
        opts,
        control,
    );
    let admin = format!("127.0.0.1:{}", gw.admin_addr.port());
    gw.keep_repo(dir);
    (gw, admin)
}

fn routes_files(backend: &str, dead: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "routes/main.toml",
            "[[route]]\nname = \"orders\"\nhost = \"api.example.com\"\nprefix = \"/orders\"\n\
             methods = [\"GET\"]\nupstream = \"orders\"\nstrip_prefix = \"/orders\"\n\n\
             [[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"home\" }\n\n\
             [[route]]\nname = \"gone\"\nprefix = \"/dead\"\nupstream = \"dead\"\n"
                .to_owned(),
        ),
        (
            "upstreams/all.toml",
            format!(
                "[upstream.orders]\ntargets = [\"{backend}\"]\n\n\
                 [upstream.dead]\ntargets = [\"http://127.0.0.1:{dead}\"]\n"
            ),
        ),
    ]
}

#[test]
fn with_a_token_the_api_needs_it_and_failures_are_limited_per_address() {
    let files = [(
        "routes/main.toml",
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )];
    let control = Control {
        admin_token: Some(TOKEN.into()),
        ..Control::default()
    };
    let (_gw, admin) = gateway(&files, control, "127.0.0.1:0");
    let host = admin.as_str();
    let get = |path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        call(&admin, host, "GET", path, &headers, b"")
    };

    let none = get("/api/v1/status", None);
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.header("www-authenticate").as_deref(), Some("Bearer"));
    assert_eq!(get("/api/v1/routes", Some("Bearer wrong")).status, 401);
    assert_eq!(
        get("/api/v1/routes", Some(TOKEN)).status,
        401,
        "no `Bearer `"
    );

    // The scheme's case does not matter (RFC 9110 §11.1): `bearer` was refused.
    let lower = get("/api/v1/status", Some(&format!("bearer {TOKEN}")));
    assert_eq!(lower.status, 200, "{}", lower.body);
    let ok = get("/api/v1/status", Some(&bearer()));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        ok.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    let st = ok.json();
    assert_eq!(st["access"], "token");
    assert_eq!(st["routes"], 1);
    assert_eq!(st["gateway_version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_seconds"].as_u64().is_some());
    for path in [
        "/api/v1/upstreams",
        "/api/v1/reloads",
        "/api/v1/traffic",
        "/api/v1/fleet",
    ] {
        assert_eq!(get(path, None).status, 401, "{path}");
        assert_eq!(get(path, Some(&bearer())).status, 200, "{path}");
    }
    let unknown = get("/api/v1/nope", Some(&bearer()));
    assert_eq!(unknown.status, 404);
    assert_eq!(
        get("/api/v1/nope", None).status,
        401,
        "no probing without the token"
    );

    // The page itself carries no data: served without the token, under a strict CSP.
    let page = get("/ui/", None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"app.js\" defer></script>"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(
        csp.contains("connect-src 'self'") && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(page.header("x-frame-options").as_deref(), Some("DENY"));
    let js = get("/ui/app.js", None);
    assert_eq!(
        js.header("content-type").as_deref(),
        Some("text/javascript; charset=utf-8")
    );
    assert!(js.body.contains("sessionStorage"));
    assert_eq!(get("/ui/app.css", None).status, 200);
    assert_eq!(get("/ui/../admin/reload", None).status, 404);
    assert_eq!(get("/ui/missing.js", None).status, 404);
    let moved = get("/ui", None);
    assert_eq!(moved.status, 308);
    assert_eq!(moved.header("location").as_deref(), Some("/ui/"));

    // Forged tokens run into the failure limit; the valid token is never locked out.
    let mut limited = false;
    for _ in 0..40 {
        if get("/api/v1/status", Some("Bearer forged")).status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "40 forged tokens and no 429");
    assert_eq!(get("/api/v1/status", Some(&bearer())).status, 200);
}

#[test]
fn without_a_token_the_api_answers_only_on_loopback_and_for_loopback_names() {
    let files = [(
        "routes/main.toml",
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )];
    let (_gw, admin) = gateway(&files, Control::default(), "127.0.0.1:0");
    for host in [admin.clone(), "localhost".into(), "[::1]:8081".into()] {
        let r = call(&admin, &host, "GET", "/api/v1/status", &[], b"");
        assert_eq!(r.status, 200, "Host {host}: {}", r.body);
        assert_eq!(r.json()["access"], "loopback-without-token");
    }
    // A page on another site whose name was rebound to 127.0.0.1 cannot read it.
    for path in ["/api/v1/status", "/api/v1/routes", "/ui/"] {
        let r = call(&admin, "evil.example:8081", "GET", path, &[], b"");
        assert_eq!(r.status, 403, "{path}");
        assert!(
            r.body.contains("localhost, 127.0.0.1 or [::1]"),
            "{}",
            r.body
        );
    }
    assert_eq!(call(&admin, &admin, "GET", "/ui/", &[], b"").status, 200);

    // No shared store: one replica on its own, said plainly, not an error.
    let f = call(&admin, &admin, "GET", "/api/v1/fleet", &[], b"");
    assert_eq!(f.status, 200, "{}", f.body);
    let f = f.json();
    assert_eq!(f["state"], "single", "{f}");
    assert_eq!(f["replica"], Value::Null);
    assert!(
        f["verdict"]
            .as_str()
            .unwrap()
            .starts_with("single replica: this gateway has no [rate_limit_store]"),
        "{f}"
    );
    assert_eq!(
        (f["replicas"].clone(), f["error"].clone()),
        (json!([]), Value::Null)
    );

    // Bound to every address, with no token: disabled, and it says how to enable it.
    let (_open, admin) = gateway(&files, Control::default(), "0.0.0.0:0");
    for path in ["/api/v1/status", "/ui/"] {
        let r = call(&admin, &admin, "GET", path, &[], b"");
        assert_eq!(r.status, 403, "{path}");
        assert!(r.body.contains("RUSTYGATE_ADMIN_TOKEN"), "{}", r.body);
    }
}

#[test]
fn admin_endpoints_answer_head_and_refuse_other_methods_with_405() {
    let files = [(
        "routes/main.toml",
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )];
    let (_gw, admin) = gateway(&files, Control::default(), "127.0.0.1:0");
    let reads = [
        "/healthz",
        "/readyz",
        "/status",
        "/metrics",
        "/ui/",
        "/api/v1/status",
        "/api/v1/routes",
        "/api/v1/fleet",
    ];
    for path in reads {
        let get = call(&admin, &admin, "GET", path, &[], b"");
        assert_eq!(get.status, 200, "GET {path}: {}", get.body);
        // HEAD: the same status and length, no body.
        let head = call(&admin, &admin, "HEAD", path, &[], b"");
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path}: {}", head.body);
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let r = call(&admin, &admin, method, path, &[], b"");
            assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
            assert_eq!(
                r.header("allow").as_deref(),
                Some("GET, HEAD"),
                "{method} {path}"
            );
        }
    }
    for path in ["/api/v1/explain", "/admin/reload", "/hooks/github"] {
        let r = call(&admin, &admin, "GET", path, &[], b"");
        assert_eq!(r.status, 405, "GET {path}: {}", r.body);
        assert_eq!(r.header("allow").as_deref(), Some("POST"), "GET {path}");
    }
    // What does not exist stays 404, whatever the method.
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/api/v1/nope"),
        ("DELETE", "/nope"),
    ] {
        let r = call(&admin, &admin, method, path, &[], b"");
        assert_eq!(r.status, 404, "{method} {path}");
    }
}

#[test]
fn routes_upstreams_and_traffic_describe_what_is_served() {
    let backend = Backend::fixed(200, "order");
    let dead = dead_port();
    let files = routes_files(&backend.url(), dead);
    let control = Control {
        admin_token: Some(TOKEN.into()),
        ..Control::default()
    };
    let (gw, admin) = gateway(&as_refs(&files), control, "127.0.0.1:0");
    let auth = bearer();
    let get = |path: &str| {
        call(
            &admin,
            &admin,
            "GET",
            path,
            &[("Authorization", &auth)],
            b"",
        )
    };

    let r = get("/api/v1/routes").json();
    assert_eq!(
        (r["total"].clone(), r["matched"].clone()),
        (json!(3), json!(3))
    );
    assert_eq!(
        r["routes"][0],
        json!({
            "name": "orders",
            "host": "api.example.com",
            "path": null,
            "prefix": "/orders",
            "methods": ["GET"],
            "upstream": "orders",
            "respond_status": null,
            "auth": null,
            "rate_limit": null,
            "cors": null,
            "policy": null,
            "plugins": [],
            "websocket": true,
            "source": { "file": "routes/main.toml", "line": 2, "column": 8 },
        })
    );
    assert_eq!(r["routes"][1]["respond_status"], 200);
    assert_eq!(r["routes"][2]["source"]["line"], 15);
    let f = get("/api/v1/routes?q=DEAD").json();
    assert_eq!(
        (f["matched"].clone(), f["routes"][0]["name"].clone()),
        (json!(1), json!("gone"))
    );
    let t = get("/api/v1/routes?limit=1").json();
    assert_eq!(
        (
            t["truncated"].clone(),
            t["routes"].as_array().unwrap().len()
        ),
        (json!(true), 1)
    );
    let bad = get("/api/v1/routes?bogus=1");
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("invalid query string")
    );
    assert_eq!(
        get(&format!("/api/v1/routes?q={}", "a".repeat(300))).status,
        400
    );

    // Traffic: served requests, and the dead upstream's failures until its target is ejected.
    let proxy = gw.addr.to_string();
    for _ in 0..3 {
        assert_eq!(
            call(&proxy, "api.example.com", "GET", "/orders/7", &[], b"").status,
            200
        );
    }
    for _ in 0..6 {
        assert_eq!(call(&proxy, "x", "GET", "/dead", &[], b"").status / 100, 5);
    }
    let u = get("/api/v1/upstreams").json();
    let upstream = |name: &str| {
        u["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .cloned()
            .unwrap()
    };
    let orders = upstream("orders");
    assert_eq!(orders["name"], "orders");
    assert_eq!(orders["balance"], "round_robin");
    assert_eq!(orders["breaker"]["state"], "closed");
    assert_eq!(orders["targets"][0]["url"], backend.url());
    assert_eq!(orders["targets"][0]["active_health"], "not checked");
    assert_eq!(orders["targets"][0]["passive_health"], "ok");
    assert_eq!(orders["targets"][0]["in_flight"], 0);
    assert_eq!(orders["latency"]["requests"], 3);
    assert!(orders["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        orders["latency"]["window_seconds"], 36.0,
        "180 samples of 200 ms"
    );
    let dead_target = &upstream("dead")["targets"][0];
    assert_eq!(dead_target["passive_health"], "ejected", "{dead_target}");
    assert_eq!(dead_target["available"], false);
    assert!(dead_target["ejections"].as_u64().unwrap() >= 1);
    assert!(dead_target["ejected_for_ms"].as_u64().unwrap() > 0);

    // Sampled every 200 ms here: the requests above show up as rates per route.
    let mut seen = Value::Null;
    let found = wait_until(Duration::from_secs(10), || {
        seen = get("/api/v1/traffic").json();
        let routes = seen["routes"].as_array().cloned().unwrap_or_default();
        let rate = |name: &str, key: &str| {
            routes
                .iter()
                .filter(|r| r["route"] == name)
                .flat_map(|r| r[key].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .sum::<f64>()
        };
        rate("orders", "requests_per_second") > 0.0 && rate("gone", "rate_5xx") > 0.0
    });
    assert!(found, "{seen}");
    assert_eq!(seen["capacity"], 180);
    assert_eq!(seen["interval_seconds"], 0.2);
    let n = seen["times"].as_array().unwrap().len();
    assert_eq!(
        seen["total"]["requests_per_second"]
            .as_array()
            .unwrap()
            .len(),
        n
    );
    let orders = seen["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "orders")
        .unwrap();
    assert_eq!(orders["requests"], 3);
    assert_eq!(
        get("/api/v1/traffic?route=home").json()["routes"],
        json!([])
    );
}

#[test]
fn explain_answers_with_the_decision_code_and_refuses_hostile_input_clearly() {
    let backend = Backend::fixed(200, "order");
    let files = routes_files(&backend.url(), dead_port());
    let control = Control {
        admin_token: Some(TOKEN.into()),
        ..Control::default()
    };
    let (_gw, admin) = gateway(&as_refs(&files), control, "127.0.0.1:0");
    let auth = bearer();
    let explain = |body: &[u8]| {
        call(
            &admin,
            &admin,
            "POST",
            "/api/v1/explain",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };

    let r = explain(br#"{"url": "http://API.example.com/orders/7?x=1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let v = r.json();
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"]["name"], "orders");
    assert_eq!(
        v["upstream"],
        json!({"name": "orders", "target": backend.url(), "path": "/7", "query": "x=1"})
    );
    let why = v["why"][0].as_str().unwrap();
    assert!(
        why.contains("matches route `orders` (routes/main.toml:2:8)"),
        "{why}"
    );
    assert!(why.contains("prefix `/orders`, methods GET"), "{why}");

    let v = explain(br#"{"method": "POST", "url": "http://api.example.com/orders/7"}"#).json();
    assert_eq!(v["status"], 405);
    assert!(
        v["why"][0]
            .as_str()
            .unwrap()
            .contains("not the method POST"),
        "{v}"
    );
    let v = explain(br#"{"url": "/nothing/here", "headers": {"Host": "other.example"}}"#).json();
    assert_eq!(v["status"], 404);
    assert_eq!(v["route"], Value::Null);
    assert_eq!(v["request"]["host"], "other.example");
    // Dot segments are resolved before matching, as on the proxy.
    let v = explain(br#"{"url": "http://x/dead/../"}"#).json();
    assert_eq!(
        (v["route"]["name"].clone(), v["status"].clone()),
        (json!("home"), json!(200))
    );
    assert_eq!(v["request"]["normalized_path"], "/");
    // A path the proxy refuses before routing is explained with the proxy's own answer.
    let v = explain(br#"{"url": "http://x/a%00b"}"#).json();
    assert_eq!(
        (v["status"].clone(), v["route"].clone()),
        (json!(400), Value::Null)
    );
    assert_eq!(v["request"]["normalized_path"], Value::Null);
    assert!(
        v["why"][0]
            .as_str()
            .unwrap()
            .starts_with("answered 400 before routing: "),
        "{v}"
    );

    let huge_url = format!(r#"{{"url": "http://x/{}"}}"#, "a".repeat(10_000));
    let huge_header = format!(
        r#"{{"url": "/", "headers": {{"x-big": "{}"}}}}"#,
        "v".repeat(9_000)
    );
    let many: Vec<String> = (0..65).map(|i| format!("\"x-h{i}\": \"v\"")).collect();
    let many = format!(r#"{{"url": "/", "headers": {{{}}}}}"#, many.join(","));
    for (body, says) in [
        (&b"{"[..], "not an explain request"),
        (b"[]", "not an explain request"),
        (br#"{"url": "/", "body": "x"}"#, "unknown field `body`"),
        (br#"{"url": "orders/7"}"#, "`orders/7` is not a URL"),
        (br#"{"url": "http://[::1/"}"#, "is not a URL"),
        (huge_url.as_bytes(), "at most 8192 are taken"),
        (huge_header.as_bytes(), "header `x-big` is 9000 bytes long"),
        (many.as_bytes(), "65 headers given; at most 64"),
        (
            br#"{"url": "/", "headers": {"x\u0000y": "1"}}"#,
            "not a valid header name",
        ),
        (br#"{"url": "/", "method": "GE T"}"#, "not an HTTP method"),
    ] {
        let r = explain(body);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{message} (wanted {says})");
        assert!(
            message.len() < 400,
            "the message quotes too much: {message}"
        );
    }
    // One byte over: the whole body is read, so the answer is not lost to a reset.
    let r = explain(&vec![b' '; 64 * 1024 + 1]);
    assert_eq!(r.status, 413);
    assert!(r.body.contains("larger than 65536 bytes"), "{}", r.body);
    // The admin listener still answers.
    assert_eq!(explain(br#"{"url": "/"}"#).json()["route"]["name"], "home");
}

#[test]
fn reloads_and_the_attempted_commit_with_its_located_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    let cache = tempfile::tempdir().unwrap();
    let good = |body: &str| {
        vec![(
            "routes/main.toml",
            format!(
                "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
            ),
        )]
    };
    let v1 = commit_files(&repo, "main", &as_refs(&good("v1")), "first config").to_string();
    let gw = GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--poll",
            "0",
        ],
        &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
    );
    let auth = bearer();
    let get = |path: &str| admin_get(&gw, path);
    // The binary always has a fleet; without [rate_limit_store] it is a single replica.
    let f = get("/api/v1/fleet");
    assert_eq!(f["state"], "single", "{f}");
    assert!(f["replica"].is_string(), "{f}");
    assert_eq!(f["replicas"], json!([]));
    let h = get("/api/v1/reloads");
    assert_eq!(h["capacity"], 50);
    assert_eq!(h["reloads"][0]["trigger"], "startup");
    assert_eq!(h["reloads"][0]["to"], v1.as_str());
    assert_eq!(h["reloads"][0]["result"], "applied");

    let mut broken = good("v2");
    broken[0]
        .1
        .push_str("\n[[route]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"order\"\n");
    let bad = commit_files(
        &repo,
        "main",
        &as_refs(&broken),
        "route to a missing upstream",
    )
    .to_string();
    let (s, _) = gw.admin_post("/admin/reload", &[("Authorization", &auth)], b"");
    assert_eq!(s, 202);
    assert!(wait_until(Duration::from_secs(20), || get(
        "/api/v1/status"
    )["attempted"]["sha"]
        == bad.as_str()));
    let st = get("/api/v1/status");
    assert_eq!(st["applied"]["sha"], v1.as_str());
    assert_eq!(st["applied"]["subject"], "first config");
    assert_eq!(st["applied"]["author"], "Config Author");
    assert_eq!(
        st["applied"]["commit_url"],
        Value::Null,
        "file:// is no forge"
    );
    assert_eq!(st["attempted"]["ok"], false);
    let d = &st["attempted"]["errors"][0];
    assert_eq!(
        (
            d["file"].clone(),
            d["line"].clone(),
            d["column"].clone(),
            d["code"].clone()
        ),
        (
            json!("routes/main.toml"),
            json!(9),
            json!(12),
            json!("unknown-upstream")
        )
    );
    assert_eq!(d["snippet"], "upstream = \"order\"");
    let h = get("/api/v1/reloads");
    let last = &h["reloads"][0];
    assert_eq!(
        (last["trigger"].clone(), last["result"].clone()),
        (json!("admin"), json!("rejected"))
    );
    assert_eq!(
        (last["from"].clone(), last["to"].clone()),
        (json!(v1), json!(bad))
    );
    assert_eq!(last["errors"], 1);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("routes/main.toml:9: unknown upstream `order`"),
        "{last}"
    );
    assert!(last["duration_ms"].as_u64().is_some());
    assert_eq!(h["reloads"].as_array().unwrap().len(), 2);
}

/// An upstream whose answers take `delay` milliseconds (changeable while it runs).
fn slow_backend(delay: Arc<AtomicU64>) -> Backend {
    Backend::start(move |_req| {
        let ms = delay.load(Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            hyper::Response::new(full("ok"))
        }
    })
}

#[test]
fn upstream_latency_covers_the_last_window_not_the_time_since_start() {
    let delay = Arc::new(AtomicU64::new(600));
    let backend = slow_backend(Arc::clone(&delay));
    let files = common::proxy_all(&backend.url(), "");
    // Sampled every 100 ms: the window is 180 samples, 18 s.
    let (gw, admin) = sampled(
        &as_refs(&files),
        Control::default(),
        "127.0.0.1:0",
        Duration::from_millis(100),
    );
    let latency = || {
        let u = call(&admin, &admin, "GET", "/api/v1/upstreams", &[], b"").json();
        u["upstreams"][0]["latency"].clone()
    };
    let proxy = gw.addr.to_string();
    let send = |n: usize| {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let proxy = proxy.clone();
                std::thread::spawn(move || call(&proxy, "x", "GET", "/", &[], b"").status)
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 200);
        }
    };

    // `since` has whole seconds: the slow answers go in a later second than the gateway's
    // start (`since` until the window first fills), so that the window's start after they
    // leave it is a different `since` however the seconds fall.
    std::thread::sleep(Duration::from_millis(1500));
    // Three answers of 600 ms: p50 in the histogram's (500 ms, 1 s] bucket.
    send(3);
    let slow = latency();
    assert_eq!(slow["requests"], 3, "{slow}");
    assert!(slow["p50_ms"].as_f64().unwrap() > 500.0, "{slow}");
    assert_eq!(slow["window_seconds"], 18.0, "{slow}");
    assert!(slow["since"].is_string(), "{slow}");

    // Once their samples have left the window, they count no more.
    let mut seen = Value::Null;
    let gone = wait_until(Duration::from_secs(60), || {
        seen = latency();
        seen["requests"] == 0
    });
    assert!(gone, "the slow requests never left the window: {seen}");
    assert_eq!(
        (seen["p50_ms"].clone(), seen["p99_ms"].clone()),
        (Value::Null, Value::Null)
    );

    // Fast answers now: the quantiles are theirs alone (since the start, 3 of 8 would be slow
    // and p99 above 500 ms).
    delay.store(0, Ordering::SeqCst);
    send(5);
    let fast = latency();
    assert_eq!(fast["requests"], 5, "{fast}");
    assert!(fast["p99_ms"].as_f64().unwrap() < 500.0, "{fast}");
    assert_ne!(fast["since"], slow["since"], "the window moved on: {fast}");
}

// ---- the fleet: real `rustygate serve` replicas sharing one redis-server ----

/// Two replicas, `a` and `b`, of one bare repository (`--poll 0`), sharing `redis`.
fn two_replicas(url: &str) -> (Vec<GatewayProcess>, Vec<tempfile::TempDir>) {
    GatewayProcess::replicas(url, &["a", "b"], &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)])
}

/// `GET path` on a replica's admin listener with the token: the JSON of a 200.
fn admin_get(gw: &GatewayProcess, path: &str) -> Value {
    let auth = bearer();
    let r = call(
        &gw.admin,
        &gw.admin,
        "GET",
        path,
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

#[test]
fn the_fleet_agrees_then_says_who_serves_which_commit_and_survives_a_stalled_or_dead_store() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    let v1 = commit_files(&repo, "main", &as_refs(&redis.fleet_config("v1")), "v1").to_string();
    let (gws, _caches) = two_replicas(&url);
    let fleet = |gw: &GatewayProcess| admin_get(gw, "/api/v1/fleet");

    let mut f = Value::Null;
    let both = wait_until(Duration::from_secs(20), || {
        f = fleet(&gws[0]);
        f["replicas"].as_array().is_some_and(|r| r.len() == 2)
    });
    assert!(both, "{f}");
    assert_eq!(f["state"], "ok", "{f}");
    assert_eq!(f["agree"], true, "{f}");
    assert_eq!(f["replica"], "a");
    assert_eq!(f["verdict"], format!("all 2 replicas serve {}", &v1[..12]));
    assert_eq!(f["commits"], json!([{ "sha": v1, "replicas": ["a", "b"] }]));
    for (r, (name, this)) in f["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .zip([("a", true), ("b", false)])
    {
        assert_eq!(
            (
                r["replica"].clone(),
                r["this"].clone(),
                r["applied"].clone(),
                r["ok"].clone()
            ),
            (json!(name), json!(this), json!(v1), json!(true)),
            "{r}"
        );
        // Both wrote their entry moments ago: a heartbeat, not stale.
        assert!(r["heartbeat_age_ms"].is_u64(), "{r}");
        assert_eq!(r["stale"], false, "{r}");
    }

    // A new commit, applied by `a` only (polling is off, no webhook): they disagree, and `b`
    // says which replica serves which commit.
    let v2 = commit_files(&repo, "main", &as_refs(&redis.fleet_config("v2")), "v2").to_string();
    let auth = bearer();
    assert_eq!(
        gws[0]
            .admin_post("/admin/reload", &[("Authorization", &auth)], b"")
            .0,
        202
    );
    let split = wait_until(Duration::from_secs(20), || {
        f = fleet(&gws[1]);
        f["agree"] == false
    });
    assert!(split, "{f}");
    assert_eq!(f["state"], "ok", "{f}");
    assert_eq!(f["replica"], "b");
    let verdict = f["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("replicas disagree: "), "{verdict}");
    assert!(
        verdict.contains(&format!("1 on {} (a)", &v2[..12])),
        "{verdict}"
    );
    assert!(
        verdict.contains(&format!("1 on {} (b)", &v1[..12])),
        "{verdict}"
    );
    let commits = f["commits"].as_array().unwrap();
    assert!(
        commits.contains(&json!({ "sha": v2, "replicas": ["a"] })),
        "{f}"
    );
    assert!(
        commits.contains(&json!({ "sha": v1, "replicas": ["b"] })),
        "{f}"
    );

    // Redis stalls (SIGSTOP: the port is open, nothing answers). The fleet view answers with
    // the error within its bound (a hung call would leave this read with nothing), and the
    // rest of the status is intact.
    redis.signal("STOP");
    let stalled = fleet(&gws[0]);
    assert_eq!(stalled["state"], "error", "{stalled}");
    assert_eq!(
        stalled["verdict"],
        "unknown: the shared store did not answer"
    );
    let error = stalled["error"].as_str().unwrap();
    // Redis answered everything before the stop: this first call waited its whole bound.
    assert_eq!(
        error,
        format!(
            "the shared store {} did not answer: no answer within 2s",
            redis.url()
        )
    );
    assert_eq!(stalled["timeout_ms"], 2000);
    assert_eq!(stalled["replicas"], json!([]));
    let st = admin_get(&gws[0], "/api/v1/status");
    assert_eq!(st["applied"]["sha"], v2.as_str(), "{st}");
    assert_eq!(st["routes"], 1);
    assert_eq!(gws[0].get("/").unwrap(), (200, "v2".to_owned()));

    // Redis killed: the same, from the other replica.
    redis.signal("CONT");
    let store = redis.url();
    drop(redis);
    let dead = fleet(&gws[1]);
    assert_eq!(dead["state"], "error", "{dead}");
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("the shared store {store} did not answer: ")),
        "{dead}"
    );
    let st = admin_get(&gws[1], "/api/v1/status");
    assert_eq!(st["applied"]["sha"], v1.as_str(), "{st}");
    assert_eq!(gws[1].get("/").unwrap(), (200, "v1".to_owned()));
}
