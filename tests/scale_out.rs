//! Scale-out against a real Redis: limits shared by several gateways, every `on_store_error`
//! mode with Redis killed and back, `NOSCRIPT` recovery, a stalled store held to its timeout,
//! the fleet view during a partial rollout, and the webhook fan-out (docs/scale-out.md).
//!
//! Each test starts its own `redis-server` on a free loopback port, without persistence, and
//! kills it at the end. Without the binary the tests are skipped with a loud message, except
//! under CI (`CI` set), where a missing `redis-server` fails them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use hmac::{Hmac, Mac};

/// A config repo whose routes `names` answer 200 under `limit` (a TOML inline table), with
/// `store` as `[rate_limit_store]`.
fn limited_repo(store: &str, limit: &str, names: &[&str]) -> Vec<(&'static str, String)> {
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (*n, limit)).collect();
    repo_of(store, &pairs)
}

/// [`limited_repo`] with a limit per route.
fn repo_of(store: &str, routes_and_limits: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut routes = String::new();
    for (n, limit) in routes_and_limits {
        routes.push_str(&format!(
            "[[route]]\nname = \"{n}\"\npath = \"/{n}\"\nrespond = {{ status = 200, body = \"ok\" }}\nrate_limit = {limit}\n\n"
        ));
    }
    vec![
        ("gateway.toml", format!("[rate_limit_store]\n{store}\n")),
        ("routes/main.toml", routes),
    ]
}

fn gateway(files: &[(&'static str, String)]) -> Gateway {
    Gateway::start(&as_refs(files))
}

/// The status of `GET path`, and the whole response head.
fn get_head(gw: &Gateway, path: &str) -> (u16, String) {
    let text = raw(
        gw.addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    (status, head)
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::to_owned)
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    scrape(gw).get(series).copied().unwrap_or(0.0)
}

#[test]
fn three_gateways_share_one_limit_in_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let files = repo_of(
        &format!("url = \"{}\"", redis.url()),
        &[
            (
                "shared",
                "{ requests = 60, per = \"1h\", key = \"route\", store = \"redis\" }",
            ),
            (
                "flood",
                "{ requests = 2, per = \"1m\", key = \"route\", store = \"redis\" }",
            ),
        ],
    );
    let gws = [gateway(&files), gateway(&files), gateway(&files)];
    let mut clients: Vec<KeepAlive> = gws
        .iter()
        .map(|g| KeepAlive::connect(&g.addr.to_string()).unwrap())
        .collect();
    let mut allowed = [0u32; 3];
    let mut limited = 0;
    for i in 0..150 {
        match clients[i % 3].get("/shared").unwrap().0 {
            200 => allowed[i % 3] += 1,
            429 => limited += 1,
            s => panic!("status {s}"),
        }
    }
    let total: u32 = allowed.iter().sum();
    assert!(
        (58..=62).contains(&total),
        "60/h shared by three gateways allowed {total} ({allowed:?}), {limited} limited"
    );
    assert!(
        allowed.iter().all(|&a| a > 0),
        "every gateway served some: {allowed:?}"
    );
    // The answer carries the store's own numbers: one request a minute refills (an hour's
    // window: with a minute's, a refill a second made the count depend on the loop's speed).
    let (status, head) = get_head(&gws[1], "/shared");
    assert_eq!(status, 429, "{head}");
    assert_eq!(
        header(&head, "retry-after").as_deref(),
        Some("60"),
        "{head}"
    );
    assert_eq!(header(&head, "ratelimit-limit").as_deref(), Some("60"));
    assert_eq!(header(&head, "ratelimit-remaining").as_deref(), Some("0"));

    // One bucket for the three gateways, expiring when it is full again (within the window).
    let keys = redis.keys("rustygate:rl:shared:*");
    assert_eq!(
        keys,
        vec!["rustygate:rl:shared:60-3600000-60:all".to_owned()]
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut redis.conn())
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "bucket TTL {ttl} ms");

    // A key over its limit is answered from the local cache until its reset (30 s here): a
    // flood costs Redis nothing.
    let statuses: Vec<u16> = (0..3)
        .map(|_| clients[0].get("/flood").unwrap().0)
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    let before = redis.calls("evalsha");
    for _ in 0..200 {
        assert_eq!(clients[0].get("/flood").unwrap().0, 429);
    }
    let after = redis.calls("evalsha");
    assert_eq!(
        after, before,
        "script calls for 200 requests over the limit"
    );
    assert_eq!(
        metric(
            &gws[0],
            "rustygate_rate_limit_store_errors_total{reason=\"timeout\",route=\"shared\"}"
        ),
        0.0
    );
}

#[test]
fn each_on_store_error_mode_while_redis_is_down_and_recovery() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let port = redis.port;
    let limit = "{ requests = 4, per = \"1m\", key = \"route\", store = \"redis\" }";
    let routes = ["before", "outage", "probe", "after"];
    let modes = ["allow", "deny", "local"];
    let gws: Vec<Gateway> = modes
        .iter()
        .map(|mode| {
            // Not the default 25 ms: a Redis answer slower than that on a loaded CI machine
            // is a store error, and this test's exact statuses would then count the fallback
            // instead of the store. Timeouts themselves: a_stalled_store_costs_...; with Redis
            // down, at most one check a pause waits, so a request still stays under a second.
            let store = format!(
                "url = \"{}\"\ntimeout = \"500ms\"\non_store_error = \"{mode}\"\nexpected_replicas = 2\nkey_prefix = \"{mode}:\"",
                redis.url()
            );
            gateway(&limited_repo(&store, limit, &routes))
        })
        .collect();
    // With Redis: 4 allowed, then limited, in every mode.
    for gw in &gws {
        let statuses: Vec<u16> = (0..5).map(|_| gw.get("/before").0).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 429]);
    }

    drop(redis);
    let mut slowest = Duration::ZERO;
    let mut outage = |gw: &Gateway| -> Vec<u16> {
        (0..6)
            .map(|_| {
                let t = Instant::now();
                let s = gw.get("/outage").0;
                slowest = slowest.max(t.elapsed());
                s
            })
            .collect()
    };
    assert_eq!(outage(&gws[0]), [200; 6], "allow: every request passes");
    assert_eq!(outage(&gws[1]), [429; 6], "deny: every request is refused");
    assert_eq!(
        outage(&gws[2]),
        [200, 200, 429, 429, 429, 429],
        "local: this replica's share, 4 ÷ 2 expected replicas"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?} with Redis down"
    );
    for gw in &gws {
        let errors: f64 = scrape(gw)
            .iter()
            .filter(|(k, _)| {
                k.starts_with("rustygate_rate_limit_store_errors_total") && k.contains("outage")
            })
            .map(|(_, v)| v)
            .sum();
        assert_eq!(errors, 6.0, "every check without the store is counted");
    }
    let (_, head) = get_head(&gws[1], "/outage");
    assert_eq!(header(&head, "retry-after").as_deref(), Some("1"), "{head}");

    // Redis comes back (empty, on the same port): each gateway uses it again within moments.
    redis = RedisServer::start_on(port, &[]);
    for (gw, mode) in gws.iter().zip(modes) {
        let key = format!("{mode}:rl:probe:*");
        assert!(
            wait_until(Duration::from_secs(10), || {
                gw.get("/probe");
                !redis.keys(&key).is_empty()
            }),
            "{mode}: the store was not used again after it came back"
        );
        let statuses: Vec<u16> = (0..5).map(|_| gw.get("/after").0).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 429], "{mode} after recovery");
    }
}

#[test]
fn noscript_after_script_flush_recovers_without_an_error() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let files = limited_repo(
        &format!("url = \"{}\"", redis.url()),
        "{ requests = 3, per = \"1m\", key = \"route\", store = \"redis\" }",
        &["r"],
    );
    let gw = gateway(&files);
    assert_eq!(gw.get("/r").0, 200);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .unwrap();
    // The bucket survives (keys are not scripts): 2 more, then limited.
    let statuses: Vec<u16> = (0..3).map(|_| gw.get("/r").0).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let sha = rustygate::store::gcra::script_sha();
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(exists, [1], "the script was loaded again");
    let errors: f64 = scrape(&gw)
        .iter()
        .filter(|(k, _)| k.starts_with("rustygate_rate_limit_store_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(errors, 0.0, "NOSCRIPT is handled inside the check");
}

#[test]
fn a_stalled_store_costs_a_request_at_most_its_timeout() {
    let Some(redis) = RedisServer::start_on_debug() else {
        return;
    };
    // A listener that accepts and never answers: every call to it times out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("redis://{}/", silent.local_addr().unwrap());
    let limit = "{ requests = 1000, per = \"1m\", key = \"route\", store = \"redis\" }";
    let stalled = gateway(&limited_repo(
        &format!("url = \"{silent_url}\"\ntimeout = \"25ms\"\non_store_error = \"allow\""),
        limit,
        &["r"],
    ));
    let mut client = KeepAlive::connect(&stalled.addr.to_string()).unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(client.get("/r").unwrap().0, 200);
        slowest = slowest.max(t.elapsed());
    }
    // 25 ms of budget, plus the request itself on a loaded machine (a check held by the stall
    // would take the 1 s connect timeout, or forever).
    assert!(
        slowest < Duration::from_millis(500),
        "slowest request {slowest:?}"
    );
    let m = scrape(&stalled);
    assert!(
        m.get("rustygate_rate_limit_store_errors_total{reason=\"timeout\",route=\"r\"}")
            .copied()
            .unwrap_or(0.0)
            >= 1.0,
        "{m:?}"
    );
    drop(silent);

    // A real Redis that stalls (DEBUG SLEEP): requests keep their budget, and the store is
    // used again once it answers.
    let gw = gateway(&limited_repo(
        &format!(
            "url = \"{}\"\ntimeout = \"25ms\"\non_store_error = \"allow\"",
            redis.url()
        ),
        limit,
        &["r"],
    ));
    let mut client = KeepAlive::connect(&gw.addr.to_string()).unwrap();
    assert_eq!(client.get("/r").unwrap().0, 200);
    let url = redis.url();
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1")
            .query(&mut c)
            .unwrap();
    });
    let timeouts = |gw: &Gateway| {
        metric(
            gw,
            "rustygate_rate_limit_store_errors_total{reason=\"timeout\",route=\"r\"}",
        )
    };
    // Requests until one has met the stall (the sleeper's command may take a while to start
    // on a loaded machine; a fixed wait for it was a guess).
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while timeouts(&gw) < 1.0 && started.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        assert_eq!(client.get("/r").unwrap().0, 200);
        slowest = slowest.max(t.elapsed());
    }
    // DEBUG SLEEP holds Redis for 1 s: a request waiting for it would take most of that.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest request during DEBUG SLEEP {slowest:?}"
    );
    sleeper.join().unwrap();
    assert!(timeouts(&gw) >= 1.0);
    let before = redis.calls("evalsha");
    assert!(
        wait_until(Duration::from_secs(5), || {
            client.get("/r");
            redis.calls("evalsha") > before
        }),
        "the store was not used again after the stall"
    );
}

impl RedisServer {
    /// A server that accepts `DEBUG` (off by default since Redis 7).
    fn start_on_debug() -> Option<RedisServer> {
        RedisServer::installed()
            .then(|| RedisServer::start_on(dead_port(), &["--enable-debug-command", "yes"]))
    }
}

#[test]
fn validate_needs_no_redis_and_locates_store_errors() {
    let ok = repo(&as_refs(&limited_repo(
        "url = \"redis://127.0.0.1:1/\"",
        "{ requests = 5, per = \"1s\", store = \"redis\" }",
        &["r"],
    )));
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["validate", "--deny-warnings"])
        .arg(ok.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = repo(&[
        (
            "gateway.toml",
            "[rate_limit_store]\nurl = \"redis://:hunter2@redis.internal/\"\npassword = \"plain\"\nexpected_replicas = 0\n",
        ),
        (
            "routes/main.toml",
            "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = { status = 200 }\nrate_limit = { requests = 5, per = \"1s\", store = \"redis\" }\n",
        ),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["validate", "--format", "short"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("gateway.toml:2:7: error[inline-secret]"),
        "{text}"
    );
    assert!(
        text.contains("gateway.toml:3:12: error[inline-secret]"),
        "{text}"
    );
    assert!(
        text.contains("gateway.toml:4:21: error[invalid-store]"),
        "{text}"
    );

    let no_store = repo(&[(
        "routes/main.toml",
        "[[route]]\nname = \"r\"\npath = \"/\"\nrespond = { status = 200 }\nrate_limit = { requests = 5, per = \"1s\", store = \"redis\" }\n",
    )]);
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["validate", "--format", "short"])
        .arg(no_store.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("routes/main.toml:5:14: error[invalid-rate-limit]")
            && text.contains("[rate_limit_store]"),
        "{text}"
    );
}

// ---- the fleet: real `rustygate serve` processes on one git repository ----

const TOKEN: &str = "admin-t0ken";
const SECRET: &str = "hook-s3cret";

/// Three replicas of one bare repository, `--poll 0`, each with its own cache dir.
fn three_replicas(url: &str) -> (Vec<GatewayProcess>, Vec<tempfile::TempDir>) {
    let envs = [
        ("RUSTYGATE_ADMIN_TOKEN", TOKEN),
        ("RUSTYGATE_WEBHOOK_SECRET", SECRET),
    ];
    GatewayProcess::replicas(url, &["a", "b", "c"], &envs)
}

fn fleet(gw: &GatewayProcess) -> serde_json::Value {
    let (status, body) = http(&gw.admin, "GET", "/status?fleet=true", &[], b"").unwrap();
    assert_eq!(status, 200);
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["fleet"].clone()
}

fn rustygate_status(gw: &GatewayProcess) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args([
            "status",
            "--admin",
            &format!("http://{}", gw.admin),
            "--fleet",
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_fleet_view_shows_a_partial_rollout_then_agreement() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    let v1 = commit_files(&repo, "main", &as_refs(&redis.fleet_config("v1")), "v1").to_string();
    let (gws, _caches) = three_replicas(&url);
    assert!(
        wait_until(Duration::from_secs(10), || fleet(&gws[0])["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 3)),
        "{}",
        fleet(&gws[0])
    );
    let f = fleet(&gws[1]);
    assert_eq!(f["agree"], true, "{f}");
    assert_eq!(f["shas"][v1.as_str()], 3, "{f}");

    // A new commit, applied by one replica only (no webhook, polling off).
    let v2 = commit_files(&repo, "main", &as_refs(&redis.fleet_config("v2")), "v2").to_string();
    let auth = ("Authorization", "Bearer admin-t0ken");
    assert_eq!(gws[0].admin_post("/admin/reload", &[auth], b"").0, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fleet(&gws[2])["shas"]
            [v2.as_str()]
            == 1),
        "{}",
        fleet(&gws[2])
    );
    let f = fleet(&gws[2]);
    assert_eq!(f["agree"], false, "{f}");
    assert_eq!(f["shas"][v1.as_str()], 2, "{f}");
    let names: Vec<&str> = f["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(
        gws[2].metric(&format!("rustygate_fleet_replicas{{sha=\"{v1}\"}}")),
        Some(2.0)
    );
    assert_eq!(
        gws[2].metric(&format!("rustygate_fleet_replicas{{sha=\"{v2}\"}}")),
        Some(1.0)
    );
    let (code, out) = rustygate_status(&gws[1]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("3 replica(s), 2 commit(s): NOT in agreement"),
        "{out}"
    );

    for gw in &gws[1..] {
        assert_eq!(gw.admin_post("/admin/reload", &[auth], b"").0, 202);
    }
    assert!(
        wait_until(Duration::from_secs(10), || fleet(&gws[0])["agree"] == true),
        "{}",
        fleet(&gws[0])
    );
    assert_eq!(fleet(&gws[0])["shas"][v2.as_str()], 3);
    let (code, out) = rustygate_status(&gws[0]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("3 replica(s), 1 commit(s): in agreement"),
        "{out}"
    );
    drop(redis);
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn one_webhook_makes_every_replica_serve_the_new_commit_within_2s() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    commit_files(&repo, "main", &as_refs(&redis.fleet_config("v1")), "v1");
    let (gws, _caches) = three_replicas(&url);
    // Every replica follows the heads channel.
    assert!(wait_until(Duration::from_secs(10), || {
        let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("rustygate:heads")
            .query(&mut redis.conn())
            .unwrap();
        n.first().is_some_and(|(_, n)| *n == 3)
    }));
    for gw in &gws {
        assert_eq!(gw.get("/").unwrap(), (200, "v1".into()));
    }

    let v2 = commit_files(&repo, "main", &as_refs(&redis.fleet_config("v2")), "v2").to_string();
    let push = format!(r#"{{"ref":"refs/heads/main","after":"{v2}"}}"#);
    let signature = sign(push.as_bytes());
    let started = Instant::now();
    let (status, _) = gws[1].admin_post(
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "fanout-1"),
            ("X-Hub-Signature-256", &signature),
        ],
        push.as_bytes(),
    );
    assert_eq!(status, 202);
    let mut served = [None; 3];
    while started.elapsed() < Duration::from_secs(5) && served.iter().any(Option::is_none) {
        for (i, gw) in gws.iter().enumerate() {
            if served[i].is_none() && gw.get("/").is_some_and(|(_, b)| b == "v2") {
                served[i] = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("webhook fan-out: replicas serving the new commit after {served:?}");
    let slowest = served
        .iter()
        .map(|s| s.expect("every replica serves v2"))
        .max()
        .unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "converged in {slowest:?}: {served:?}"
    );
    for gw in &gws {
        assert_eq!(gw.status()["applied"]["sha"], v2.as_str());
    }
    // The gateway's log is written out every 100 ms: the line may come after the swap.
    let said = || {
        gws[0]
            .logs
            .lock()
            .unwrap()
            .contains("another replica saw a new head")
    };
    assert!(
        wait_until(Duration::from_secs(5), said),
        "{}",
        gws[0].logs.lock().unwrap()
    );
}

/// A private CA and a `localhost` server certificate it issued, as PEM files in a new directory:
/// `ca.pem`, `cert.pem`, `key.pem`.
fn store_pki() -> tempfile::TempDir {
    let (ca_pem, cert, key) = localhost_pki("rustygate store test CA");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    dir
}

/// `rediss://`: the gateway's own TLS connection to a real `redis-server` speaking TLS shares a
/// limit, and a store whose certificate the system's roots do not vouch for is refused (the
/// check fails as `on_store_error` says) rather than trusted.
#[test]
fn a_tls_store_is_verified_and_shares_limits() {
    if !RedisServer::installed() {
        return;
    }
    let pki = store_pki();
    let file = |n: &str| pki.path().join(n).to_str().unwrap().to_owned();
    let tls_port = dead_port();
    let tls_port_text = tls_port.to_string();
    let (ca, cert, key) = (file("ca.pem"), file("cert.pem"), file("key.pem"));
    // The plain port stays open for the test's own reads; the gateway is given the TLS one.
    let redis = RedisServer::start_on(
        dead_port(),
        &[
            "--tls-port",
            &tls_port_text,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    let store = format!(
        "url = \"rediss://localhost:{tls_port}/\"\ntimeout = \"1s\"\non_store_error = \"deny\"\nkey_prefix = \"tls:\""
    );
    let files = repo_of(
        &store,
        &[(
            "tls",
            "{ requests = 3, per = \"1h\", key = \"route\", store = \"redis\" }",
        )],
    );
    let repo_dir = repo(&as_refs(&files));
    let repo_path = repo_dir.path().to_str().unwrap();

    // The private CA as the only root (rustls-native-certs reads SSL_CERT_FILE): verified.
    let trusting = GatewayProcess::start(&["--repo", repo_path], &[("SSL_CERT_FILE", &ca)]);
    let statuses: Vec<u16> = (0..4)
        .map(|_| trusting.get("/tls").map_or(0, |(s, _)| s))
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "{}",
        trusting.logs.lock().unwrap()
    );
    // The route's bucket and the replica's fleet entry, written over TLS.
    let keys = redis.keys("tls:*");
    assert!(
        keys.iter().any(|k| k.starts_with("tls:rl:tls:")),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| k.starts_with("tls:fleet:")), "{keys:?}");

    // The same store without that root: the handshake fails, the check is a store error and
    // `deny` answers 429 from the first request; nothing is written to Redis.
    redis::cmd("FLUSHALL")
        .query::<()>(&mut redis.conn())
        .unwrap();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("none.pem"), "").unwrap();
    let none = other.path().join("none.pem");
    let refusing = GatewayProcess::start(
        &["--repo", repo_path],
        &[("SSL_CERT_FILE", none.to_str().unwrap())],
    );
    let first = refusing.get("/tls").map_or(0, |(s, _)| s);
    assert_eq!(first, 429, "{}", refusing.logs.lock().unwrap());
    assert!(redis.keys("tls:*").is_empty(), "nothing reached Redis");
}

/// `redis+unix://`: a store on a Unix socket (a Redis beside the gateway, no TCP) shares a limit
/// like one on TCP.
#[test]
fn a_unix_socket_store_shares_limits() {
    if !RedisServer::installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let socket_text = socket.to_str().unwrap();
    let redis = RedisServer::start_on(
        dead_port(),
        &["--unixsocket", socket_text, "--unixsocketperm", "700"],
    );
    let store = format!(
        "url = \"redis+unix://{socket_text}\"\ntimeout = \"1s\"\non_store_error = \"deny\"\nkey_prefix = \"unix:\""
    );
    let gw = gateway(&repo_of(
        &store,
        &[(
            "u",
            "{ requests = 3, per = \"1h\", key = \"route\", store = \"redis\" }",
        )],
    ));
    let statuses: Vec<u16> = (0..4).map(|_| get_head(&gw, "/u").0).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    let keys = redis.keys("unix:*");
    assert!(keys.iter().any(|k| k.starts_with("unix:rl:u:")), "{keys:?}");
}

/// `validate` takes a Unix-socket store URL, and refuses one that carries a password in the repo
/// (`?pass=`, where redis-rs reads it for these URLs) without printing it.
#[test]
fn a_unix_socket_url_validates_and_its_password_stays_out_of_the_repo() {
    let validate = |url: &str| {
        let dir = repo(&as_refs(&limited_repo(
            &format!("url = \"{url}\""),
            "{ requests = 5, per = \"1s\", store = \"redis\" }",
            &["r"],
        )));
        let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .args(["validate", "--format", "short"])
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for good in [
        "redis+unix:///run/redis/redis.sock",
        "unix:///run/redis.sock?db=2",
    ] {
        let (code, text) = validate(good);
        assert_eq!(code, Some(0), "{good}: {text}");
    }
    let (code, text) = validate("redis+unix:///run/redis.sock?db=1&pass=hunter2");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("gateway.toml:2:7: error[inline-secret]"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let (code, text) = validate("redis+unix://redis.internal/run/redis.sock");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("gateway.toml:2:7: error[invalid-store]"),
        "{text}"
    );
}
