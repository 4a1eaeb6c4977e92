//! The admin listener under hostile clients: webhook bodies are read only when they can lead
//! somewhere and within a fixed budget, one client address cannot take the listener's
//! connections, and every answer says it is not to be cached or sniffed. Real gateways on
//! loopback, raw sockets for what a well-behaved client would not send.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, repo, scrape, wait_until};
use rustygate::server::{Control, ServeOptions};
use rustygate::snapshot::SnapshotStore;

const SECRET: &str = "hook-s3cret";

/// A gateway serving one route, with `control` on its admin side and `opts`' admin settings.
fn gateway(control: Control, opts: ServeOptions) -> (Gateway, tempfile::TempDir) {
    let dir = repo(&[(
        "routes/main.toml",
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"hi\" }\n",
    )]);
    let compiled = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
    let opts = ServeOptions {
        workers: 1,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..opts
    };
    let store = Arc::new(SnapshotStore::new(compiled.snapshot.unwrap()));
    (Gateway::serve_with(dir.path(), store, opts, control), dir)
}

fn with_secret() -> Control {
    Control {
        webhook_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

/// One response read from `s`: its head (lower-cased) and its body (`Content-Length`), or
/// what came before the connection closed or `limit` passed.
fn response(s: &mut TcpStream, limit: Duration) -> (String, String) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                return (head, body.to_owned());
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&out).to_ascii_lowercase(), text),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` (a head, and as much of its body as it holds: none, for a head that
/// announces one, to see what is answered before it) and reads the answer.
fn exchange(admin: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    response(&mut s, Duration::from_secs(10))
}

fn status(head: &str) -> &str {
    head.get(9..12).unwrap_or(head)
}

/// Webhook heads that cannot lead anywhere (webhooks off, no signature or token, no event, a
/// body over the cap) are answered before any byte of their body: a flood of them holds no
/// memory. Before, each body was read whole (up to 1 MiB) and the refusal came after it, or
/// at the request timeout (408) for a body that never came.
#[test]
fn webhooks_that_cannot_lead_anywhere_are_refused_before_their_body() {
    let opts = ServeOptions {
        admin_request_timeout: Duration::from_secs(3),
        webhook_max_body: 64 * 1024,
        ..ServeOptions::default()
    };
    let (off, _d1) = gateway(Control::default(), opts.clone());
    let (on, _d2) = gateway(with_secret(), opts);
    let post = |path: &str, headers: &str, len: usize| {
        format!("POST {path} HTTP/1.1\r\nHost: a\r\n{headers}Content-Length: {len}\r\n\r\n")
    };
    let cases = [
        (
            &off,
            post(
                "/hooks/github",
                "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n",
                60_000,
            ),
            "403",
            "webhooks are disabled",
        ),
        (
            &off,
            post(
                "/hooks/gitlab",
                "X-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: t\r\n",
                60_000,
            ),
            "403",
            "webhooks are disabled",
        ),
        (
            &on,
            post("/hooks/github", "X-GitHub-Event: push\r\n", 60_000),
            "401",
            "x-hub-signature-256 header is required",
        ),
        (
            &on,
            post("/hooks/gitlab", "X-Gitlab-Event: Push Hook\r\n", 60_000),
            "401",
            "x-gitlab-token header is required",
        ),
        (
            &on,
            post(
                "/hooks/github",
                "X-Hub-Signature-256: sha256=00\r\n",
                60_000,
            ),
            "400",
            "x-github-event header is required",
        ),
        (
            &on,
            post(
                "/hooks/github",
                "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n",
                64 * 1024 + 1,
            ),
            "413",
            "over 64 KiB",
        ),
    ];
    for (gw, head, want, says) in cases {
        let (got, body) = exchange(gw.admin_addr, &head);
        assert_eq!(status(&got), want, "{head}\n{got}\n{body}");
        assert!(got.contains("application/json"), "{got}");
        assert!(body.contains(says), "{head}\n{body}");
    }
    // Nothing of a body was ever reserved.
    assert_eq!(scrape(&on)["rustygate_admin_webhook_body_bytes"], 0.0);
}

/// Bodies that may be read reserve their `Content-Length` (the cap without one) before their
/// first byte, from a budget of four bodies at the cap: a fifth that finds no room within the
/// wait is answered 503 with `Retry-After` instead of growing memory with the connections.
/// Before, every connection read its own body (the audit: 200 bodies of 1 MiB, 555 MB).
#[test]
fn webhook_bodies_read_at_once_stay_within_a_fixed_budget() {
    const CAP: usize = 16 * 1024;
    let (gw, _d) = gateway(
        with_secret(),
        ServeOptions {
            webhook_max_body: CAP,
            ..ServeOptions::default()
        },
    );
    let head = |len: &str| {
        format!(
            "POST /hooks/github HTTP/1.1\r\nHost: a\r\nX-GitHub-Event: push\r\n\
             X-Hub-Signature-256: sha256=00\r\n{len}\r\n{{"
        )
    };
    // Three with a length at the cap, one chunked (no length: it reserves the cap).
    let mut holders: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(gw.admin_addr).unwrap();
            let len = if i < 3 {
                format!("Content-Length: {CAP}\r\n")
            } else {
                "Transfer-Encoding: chunked\r\n\r\n1".to_owned()
            };
            s.write_all(head(&len).as_bytes()).unwrap();
            s
        })
        .collect();
    let reserved = || {
        scrape(&gw)
            .get("rustygate_admin_webhook_body_bytes")
            .copied()
    };
    assert!(
        wait_until(Duration::from_secs(10), || reserved()
            == Some((4 * CAP) as f64)),
        "four bodies at the cap are being read: {:?}",
        reserved()
    );
    let (got, body) = exchange(gw.admin_addr, &head(&format!("Content-Length: {CAP}\r\n")));
    assert_eq!(status(&got), "503", "{got}\n{body}");
    assert!(got.contains("retry-after: 5"), "{got}");
    assert!(body.contains("too many webhook bodies"), "{body}");

    // A holder that goes gives its room back: a whole (forged) body is read and checked.
    drop(holders.remove(0));
    assert!(
        wait_until(Duration::from_secs(10), || reserved()
            == Some((3 * CAP) as f64)),
        "{:?}",
        reserved()
    );
    let mut s = TcpStream::connect(gw.admin_addr).unwrap();
    s.write_all(head(&format!("Content-Length: {CAP}\r\n")).as_bytes())
        .unwrap();
    s.write_all(&vec![b' '; CAP - 1]).unwrap();
    let (got, body) = response(&mut s, Duration::from_secs(10));
    assert_eq!(status(&got), "401", "{got}\n{body}");
    drop(holders);
    assert!(wait_until(Duration::from_secs(10), || reserved() == Some(0.0)));
}

/// A connection from `local` (another loopback address) to `to`.
fn connect_from(local: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((local, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// One client address holds at most its share of the admin listener's connections (nginx's
/// `limit_conn`): past it a connection is closed before its request is read, and the kubelet's
/// probes from another address are answered. Before, the listener's 256 places were anyone's
/// (the audit's 800 held heads timed out every probe for 40 s).
#[test]
fn one_client_address_cannot_take_the_admin_listener() {
    let (gw, _d) = gateway(
        Control::default(),
        ServeOptions {
            admin_connections_per_client: 4,
            ..ServeOptions::default()
        },
    );
    let holders: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 1], gw.admin_addr);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                .unwrap();
            s
        })
        .collect();
    // A fifth from the same address: closed without an answer, whole request or not.
    let mut fifth = connect_from([127, 0, 0, 1], gw.admin_addr);
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let (got, _) = response(&mut fifth, Duration::from_secs(10));
    assert_eq!(got, "", "the fifth connection is closed unanswered");
    // The probe, from another address, is answered.
    let mut probe = connect_from([127, 0, 0, 2], gw.admin_addr);
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, body) = response(&mut probe, Duration::from_secs(10));
    assert_eq!((status(&got), body.trim()), ("200", "ok"), "{got}");
    // Closing one gives the address its place back.
    drop(holders);
    let scraped = {
        let mut last = None;
        wait_until(Duration::from_secs(10), || {
            let mut s = connect_from([127, 0, 0, 1], gw.admin_addr);
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap();
            last = Some(response(&mut s, Duration::from_secs(10)));
            last.as_ref().is_some_and(|(h, _)| status(h) == "200")
        });
        last.unwrap().1
    };
    // The fifth, and any retry above made before the holders' places were given back.
    let refused: f64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("rustygate_admin_connections_refused_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "{scraped}");
}

/// Every admin answer, probes and errors included, is `Cache-Control: no-store` and
/// `X-Content-Type-Options: nosniff` (docs/admin-api.md said so; only `/api/v1/*` and `/ui/`
/// were); the page keeps its own `no-cache`.
#[test]
fn every_admin_answer_is_no_store_and_nosniff() {
    let (gw, _d) = gateway(with_secret(), ServeOptions::default());
    let admin = gw.admin_addr;
    for (method, path, want) in [
        ("GET", "/healthz", "200"),
        ("GET", "/readyz", "200"),
        ("GET", "/status", "200"),
        ("GET", "/metrics", "200"),
        ("GET", "/nope", "404"),
        ("POST", "/admin/reload", "403"),
        ("POST", "/hooks/github", "401"),
        ("DELETE", "/healthz", "405"),
    ] {
        let (got, _) = exchange(
            admin,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-GitHub-Event: push\r\n\r\n"
            ),
        );
        assert_eq!(status(&got), want, "{method} {path}: {got}");
        assert!(
            got.contains("cache-control: no-store"),
            "{method} {path}: {got}"
        );
        assert!(
            got.contains("x-content-type-options: nosniff"),
            "{method} {path}: {got}"
        );
    }
    let (got, _) = exchange(admin, "GET /ui/ HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(got.contains("cache-control: no-cache"), "{got}");
}

/// `rustygate serve` with `envs` on a config that sets a header from the secret file `key`;
/// its exit status and stderr when it stops on its own within 20 s, `None` when it serves.
fn serve_exits(dir: &std::path::Path, envs: &[(&str, &str)]) -> Option<(i32, String)> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["serve", "--repo", dir.to_str().unwrap(), "--poll", "0"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("RUSTYGATE_ADMIN_TOKEN")
        .env_remove("RUSTYGATE_WEBHOOK_SECRET")
        .env_remove("RUSTYGATE_SECRET_ROOT")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = common::exit_within(&mut child, Duration::from_secs(20))?;
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Some((code.code().unwrap_or(-1), err))
}

/// Secrets from the environment lose the whitespace around them (what `kubectl create secret
/// --from-file` leaves), as the bearer token a client sends does; one that is empty once
/// trimmed stops the start with a message naming it. Before, `tok\n` never matched (401) and
/// an empty one silently disabled its endpoints. `--webhook-max-body` and
/// `RUSTYGATE_SECRET_ROOT` (the one serve flag without a variable) are read too.
#[test]
fn environment_secrets_are_trimmed_and_an_empty_one_stops_the_start() {
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("key");
    std::fs::write(&key, "k3y\n").unwrap();
    let dir = repo(&[(
        "routes/main.toml",
        &format!(
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"hi\" }}\n\
             response_headers = {{ set = {{ x-key = {{ file = {:?} }} }} }}\n",
            key.display().to_string()
        ),
    )]);
    let root = secrets.path().to_str().unwrap();
    let gw = common::GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap(), "--poll", "0"],
        &[
            ("RUSTYGATE_ADMIN_TOKEN", "tok\n"),
            ("RUSTYGATE_WEBHOOK_SECRET", " whsec\r\n"),
            ("RUSTYGATE_SECRET_ROOT", &format!("/nonexistent:{root}")),
            ("RUSTYGATE_WEBHOOK_MAX_BODY", "2KiB"),
        ],
    );
    let (status, body) = gw.admin_post("/admin/reload", &[("Authorization", "Bearer tok")], b"");
    assert_eq!(status, 202, "{body}");
    let gitlab = |body: &[u8]| {
        gw.admin_post(
            "/hooks/gitlab",
            &[("X-Gitlab-Token", "whsec"), ("X-Gitlab-Event", "Note Hook")],
            body,
        )
    };
    let (status, body) = gitlab(b"{}");
    assert_eq!(
        (status, body.contains("event ignored")),
        (202, true),
        "{body}"
    );
    let (status, body) = gitlab(&[b' '; 3000]);
    assert_eq!((status, body.contains("over 2 KiB")), (413, true), "{body}");
    drop(gw);

    for (name, value) in [
        ("RUSTYGATE_ADMIN_TOKEN", ""),
        ("RUSTYGATE_WEBHOOK_SECRET", " \n"),
    ] {
        let envs = [(name, value), ("RUSTYGATE_SECRET_ROOT", root)];
        let (code, err) = serve_exits(dir.path(), &envs)
            .unwrap_or_else(|| panic!("{name}={value:?}: the gateway started"));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("{name} is set but empty")), "{err}");
    }
    // Without the secret root the config's file is outside every root: not served.
    let (code, err) = serve_exits(dir.path(), &[]).expect("refused");
    assert_eq!(code, 1, "{err}");
}

/// A web page on another site cannot make the operator's browser run `/api/v1/explain` on a
/// token-less loopback gateway (its policies and plugins): a cross-site `Origin` or
/// `Sec-Fetch-Site` is refused 403, a body not declared JSON (all a page can send without a
/// CORS preflight) 415; the dashboard's own same-origin JSON call is answered. Before, the
/// audit's `text/plain` POST with `Origin: https://evil.example` got 200.
#[test]
fn cross_site_browser_requests_cannot_run_explain() {
    let (gw, _d) = gateway(Control::default(), ServeOptions::default());
    let admin = gw.admin_addr;
    let body = r#"{"url": "/"}"#;
    let post = |headers: &str| {
        exchange(
            admin,
            &format!(
                "POST /api/v1/explain HTTP/1.1\r\nHost: {admin}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let json = "Content-Type: application/json\r\n";
    for (headers, want, says) in [
        (
            "Content-Type: text/plain\r\nOrigin: https://evil.example\r\n".to_owned(),
            "403",
            "cross-site",
        ),
        (format!("{json}Origin: null\r\n"), "403", "cross-site"),
        (
            format!("{json}Sec-Fetch-Site: cross-site\r\n"),
            "403",
            "cross-site",
        ),
        (
            "Content-Type: text/plain\r\n".to_owned(),
            "415",
            "must be JSON",
        ),
        ("".to_owned(), "415", "must be JSON"),
        (
            format!("{json}Origin: http://{admin}\r\nSec-Fetch-Site: same-origin\r\n"),
            "200",
            "\"route\"",
        ),
        (json.to_owned(), "200", "\"route\""),
    ] {
        let (got, answer) = post(&headers);
        assert_eq!(status(&got), want, "{headers}: {got}\n{answer}");
        assert!(answer.contains(says), "{headers}: {answer}");
    }
}

/// With a token, the API tells nothing to a caller without it, not even which endpoints exist
/// (a wrong method got 405 with `Allow` before the token was checked), and two
/// `Authorization` headers are no token at all (the first won, whatever the second said).
#[test]
fn the_api_checks_the_token_first_and_refuses_two_of_them() {
    let control = Control {
        admin_token: Some("t0ken".into()),
        ..Default::default()
    };
    let (gw, _d) = gateway(control, ServeOptions::default());
    let admin = gw.admin_addr;
    let ask = |method: &str, path: &str, auth: &str| {
        let (head, _) = exchange(
            admin,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\n\r\n"
            ),
        );
        head
    };
    let good = "Authorization: Bearer t0ken\r\n";
    for (method, path, allow) in [
        ("DELETE", "/api/v1/status", "get, head"),
        ("PUT", "/api/v1/routes", "get, head"),
        ("GET", "/api/v1/explain", "post"),
    ] {
        let head = ask(method, path, "");
        assert_eq!(status(&head), "401", "{method} {path}: {head}");
        assert!(!head.contains("allow:"), "{method} {path}: {head}");
        let head = ask(method, path, good);
        assert_eq!(status(&head), "405", "{method} {path}: {head}");
        assert!(
            head.contains(&format!("allow: {allow}")),
            "{method} {path}: {head}"
        );
    }
    assert_eq!(status(&ask("GET", "/api/v1/status", good)), "200");
    let two = format!("{good}Authorization: Bearer wrong\r\n");
    assert_eq!(status(&ask("GET", "/api/v1/status", &two)), "401");
    assert_eq!(status(&ask("POST", "/admin/reload", &two)), "401");
    // A cross-site page cannot ask for a reload either (it could not send the token anyway).
    let evil = format!("{good}Origin: https://evil.example\r\n");
    assert_eq!(status(&ask("POST", "/admin/reload", &evil)), "403");
}

/// `/status?fleet=true` needs no token: a flood of it reads the fleet from the store once a
/// second, not once a call. Before, each call was an SMEMBERS and a pipeline (the audit: 301
/// SMEMBERS for 300 calls). The bound is loose on purpose: 100 calls would have to take 50 s
/// for it to fail with the cache working.
#[test]
fn the_fleet_view_is_read_from_the_store_once_a_second_not_once_a_call() {
    let Some(redis) = common::redis_server::RedisServer::start() else {
        return;
    };
    let files = redis.fleet_config("v1");
    let dir = repo(&common::as_refs(&files));
    let gw = common::GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--poll",
            "0",
            "--replica-id",
            "a",
        ],
        &[],
    );
    let fleet = || {
        let (status, body) =
            common::http(&gw.admin, "GET", "/status?fleet=true", &[], b"").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert!(wait_until(Duration::from_secs(20), || {
        fleet()["fleet"]["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
    }));
    let before = redis.calls("smembers");
    for _ in 0..100 {
        assert_eq!(fleet()["fleet"]["agree"], true);
    }
    let read = redis.calls("smembers") - before;
    assert!(read < 50, "{read} reads of the fleet for 100 calls");
}

/// The admin listener's warnings name the client as an address (`"peer":"127.0.0.1:5"`), not
/// in Rust's debug form of an optional one (`"peer":"Some(127.0.0.1:5)"`, which log queries on
/// the address never matched).
#[test]
fn admin_warnings_log_the_peer_address_itself() {
    let dir = repo(&[(
        "routes/main.toml",
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )]);
    let gw = common::GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap(), "--poll", "0"],
        &[
            ("RUSTYGATE_ADMIN_TOKEN", "tok"),
            ("RUSTYGATE_WEBHOOK_SECRET", "whsec"),
        ],
    );
    let wrong = ("Authorization", "Bearer wrong");
    let evil = ("Origin", "https://evil.example");
    gw.admin_post("/admin/reload", &[wrong], b"");
    gw.admin_post(
        "/admin/reload",
        &[("Authorization", "Bearer tok"), evil],
        b"",
    );
    let gitlab = [("X-Gitlab-Token", "wrong"), ("X-Gitlab-Event", "Push Hook")];
    gw.admin_post("/hooks/gitlab", &gitlab, b"{}");
    gw.admin_post("/hooks/github", &[], b"{}");
    common::http(&gw.admin, "GET", "/api/v1/status", &[wrong], b"");
    let warnings = [
        "admin call with a missing or wrong token",
        "cross-site admin request refused",
        "webhook with a missing or wrong signature or token",
        "webhook without its signature or token header",
        "dashboard API call with a missing or wrong token",
    ];
    let logs = || gw.logs.lock().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let logs = logs();
            warnings.iter().all(|w| logs.contains(w))
        }),
        "{}",
        logs()
    );
    for line in logs()
        .lines()
        .filter(|l| warnings.iter().any(|w| l.contains(w)))
    {
        assert!(line.contains("\"peer\":\"127.0.0.1:"), "{line}");
    }
}
