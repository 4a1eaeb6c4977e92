//! The dashboard in a real browser (issue #20): headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver by `fantoccini`, against the real `rustygate serve`
//! binary following a real git repository (`file://`).
//!
//! One session walks the page as an operator would: token prompt, applied commit, the fleet of
//! two replicas sharing a real redis-server, routes table and its filter, "which route would
//! serve this request?", upstreams, traffic charts, then a broken commit pushed and reloaded,
//! whose diagnostic (file:line:col and the line) must appear, and the store killed, which the
//! fleet panel must say while the rest of the overview stays.
//! Screenshots of each step go to a temp dir (paths printed). At the end, Chromium's own network
//! log and the page's resource timing entries must name no host but the admin listener.
//!
//! Without Chromium the test is skipped, loudly, unless `CI` is set: CI must run it
//! (`.ci/run` installs the packages). Without `redis-server` (outside CI) it runs with one
//! replica and no store, and checks that the fleet panel says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{Backend, GatewayProcess, as_refs, commit_files, dead_port, wait_until};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt as _;
use serde_json::{Value, json};

const TOKEN: &str = "br0wser-token";

/// The flags this machine's Chromium needs: no sandbox (root), no GPU, and nothing that
/// reaches out to the network on its own (the network is closed; without these it stalls).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
];

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates.iter().find_map(|c| {
        let c = Path::new(c);
        if c.is_absolute() {
            return c.is_file().then(|| c.to_path_buf());
        }
        std::env::split_paths(&path)
            .map(|d| d.join(c))
            .find(|p| p.is_file())
    })
}

/// Chromium and chromedriver, or `None` (the test skips) when they are missing outside CI.
fn browser() -> Option<(PathBuf, PathBuf)> {
    // Debian's /usr/bin/chromium is a shell wrapper that adds flags of its own; the binary
    // behind it takes exactly ours.
    let chromium = find(
        "RUSTYGATE_CHROMIUM",
        // Debian's Chromium first; then Google Chrome, whose chromedriver GitHub's Ubuntu image
        // puts on PATH beside it (the versions must match).
        &[
            "/usr/lib/chromium/chromium",
            "google-chrome",
            "chromium",
            "chromium-browser",
        ],
    );
    let driver = find("RUSTYGATE_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = format!(
                "chromium {}, chromedriver {}",
                if c.is_some() { "found" } else { "MISSING" },
                if d.is_some() { "found" } else { "MISSING" }
            );
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set and the browser tests cannot run: {missing}; install Debian's \
                     `chromium` and `chromium-driver` (.ci/run does)"
                );
            }
            // Straight to the process's stderr: libtest would hide an `eprintln!` of a test
            // that passes.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "\n==== SKIPPED: the dashboard browser tests did not run ({missing}). \
                 apt-get install chromium chromium-driver to run them; CI runs them. ====\n"
            );
            None
        }
    }
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(exe: &Path) -> Driver {
        let port = dead_port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr = format!("127.0.0.1:{port}");
        let ready = wait_until(Duration::from_secs(20), || {
            let (s, b) = get(&addr, &addr, "/status");
            s == 200 && b.contains("\"ready\":true")
        });
        assert!(ready, "chromedriver did not become ready on {addr}");
        Driver {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One of Chromium's logs, drained on each call: `performance` (DevTools events) or `browser`
/// (the console: script errors, CSP violations, failed loads). chromedriver's
/// `POST /session/{id}/se/log`, which fantoccini has no method for.
#[derive(Debug)]
struct Log(&'static str);

impl WebDriverCompatibleCommand for Log {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        let body = json!({ "type": self.0 }).to_string();
        (http::Method::POST, Some(body))
    }
}

/// The console messages of level SEVERE (errors) in a drained browser log.
async fn console_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(Log("browser")).await.expect("browser log");
    log.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The http(s) and ws(s) URLs the browser asked for, from a drained performance log.
async fn requested_urls(c: &Client) -> Vec<String> {
    let log = c
        .issue_cmd(Log("performance"))
        .await
        .expect("performance log");
    let mut urls = Vec::new();
    for entry in log.as_array().cloned().unwrap_or_default() {
        let Some(msg) = entry["message"].as_str() else {
            continue;
        };
        let Ok(m) = serde_json::from_str::<Value>(msg) else {
            continue;
        };
        let m = &m["message"];
        let url = match m["method"].as_str() {
            Some("Network.requestWillBeSent") => m["params"]["request"]["url"].as_str(),
            Some("Network.webSocketCreated") => m["params"]["url"].as_str(),
            Some("Page.frameStartedNavigating") => m["params"]["url"].as_str(),
            _ => None,
        };
        let web = ["http://", "https://", "ws://", "wss://"];
        if let Some(u) = url.filter(|u| web.iter().any(|w| u.starts_with(w))) {
            urls.push(u.to_owned());
        }
    }
    urls
}

/// Screenshots of the steps, in a temp dir kept after the test.
struct Shots {
    dir: PathBuf,
    n: usize,
}

impl Shots {
    async fn take(&mut self, c: &Client, name: &str) -> PathBuf {
        self.n += 1;
        let path = self.dir.join(format!("{:02}-{name}.png", self.n));
        let png = c.screenshot().await.expect("screenshot");
        std::fs::write(&path, &png).unwrap();
        println!("screenshot: {} ({} bytes)", path.display(), png.len());
        path
    }
}

/// Runs `script` until it returns something truthy, for at most 15 s; panics with the last
/// value (and a screenshot) otherwise.
/// The text of the element `at` finds (the test fails if there is none).
async fn text_of(c: &Client, at: Locator<'_>) -> String {
    c.find(at).await.unwrap().text().await.unwrap()
}

async fn wait_for(c: &Client, shots: &mut Shots, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = c.execute(script, vec![]).await.expect("script runs");
        let truthy = match &last {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shot = shots.take(c, "timeout").await;
    let text = c
        .execute("return document.body.innerText", vec![])
        .await
        .unwrap_or_default();
    panic!(
        "timed out waiting for {what}; last value {last}; screenshot {}; page text:\n{}",
        shot.display(),
        text.as_str().unwrap_or("")
    );
}

/// The config repo: six routes (one more, to a missing upstream, when `broken`), with `store`
/// (a Redis URL) as `[rate_limit_store]`.
fn config(backend: &str, broken: bool, store: Option<&str>) -> Vec<(&'static str, String)> {
    let mut routes = String::from(
        "[[route]]\nname = \"orders\"\nhost = \"api.example.com\"\nprefix = \"/orders\"\n\
         methods = [\"GET\", \"POST\"]\nupstream = \"orders\"\nstrip_prefix = \"/orders\"\n",
    );
    for name in ["users", "invoices", "carts", "search"] {
        routes.push_str(&format!(
            "\n[[route]]\nname = \"{name}\"\nhost = \"api.example.com\"\nprefix = \"/{name}\"\nupstream = \"accounts\"\n"
        ));
    }
    routes.push_str(
        "\n[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"home\" }\n",
    );
    let mut files = Vec::new();
    if broken {
        routes.push_str(
            "\n[[route]]\nname = \"reports\"\nprefix = \"/reports\"\nupstream = \"order\"\n",
        );
        // A file of one long line, the missing upstream near its 5,000th character.
        files.push((
            "routes/one-line.toml",
            format!(
                "route = [{{ name = \"one-line\", prefix = \"/one-line\",{}upstream = \"order\" }}]\n",
                " ".repeat(4_950)
            ),
        ));
    }
    files.extend([
        ("routes/main.toml", routes),
        (
            "upstreams/all.toml",
            format!(
                "[upstream.orders]\ntargets = [\"{backend}\"]\n\n\
                 [upstream.accounts]\ntargets = [\"{backend}\"]\n"
            ),
        ),
    ]);
    if let Some(url) = store {
        files.push((
            "gateway.toml",
            format!("[rate_limit_store]\nurl = \"{url}\"\n"),
        ));
    }
    files
}

/// `GET path` on `addr` with `Host: host` (chromedriver refuses other names than its own, the
/// proxy routes by it): status and body.
fn get(addr: &str, host: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "current_thread")]
async fn the_dashboard_in_headless_chromium() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let started = Instant::now();
    let backend = Backend::fixed(200, "order");
    // Outside CI, without redis-server: one replica, no store (the panel says so).
    let mut redis = RedisServer::start();
    let store = redis.as_ref().map(RedisServer::url);
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(repo_dir.path()).unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    let v1 = commit_files(
        &repo,
        "main",
        &as_refs(&config(&backend.url(), false, store.as_deref())),
        "Route orders and users to the orders service",
    )
    .to_string();
    let replica = |id: &str, cache: &Path| {
        GatewayProcess::start(
            &[
                "--repo",
                &url,
                "--cache-dir",
                cache.to_str().unwrap(),
                "--poll",
                "0",
                "--replica-id",
                id,
            ],
            &[("RUSTYGATE_ADMIN_TOKEN", TOKEN)],
        )
    };
    let cache = tempfile::tempdir().unwrap();
    let gw = replica("gw-a", cache.path());
    // The second replica of the fleet, on the same repository and store.
    let other_cache = tempfile::tempdir().unwrap();
    let _other = redis.is_some().then(|| replica("gw-b", other_cache.path()));
    for _ in 0..5 {
        assert_eq!(get(&gw.listen, "api.example.com", "/orders/7").0, 200);
    }
    let admin = gw.admin.clone();
    let page = format!("http://{admin}/ui/");

    let driver = Driver::start(&chromedriver);
    let profile = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium, "args": args },
        "goog:loggingPrefs": { "performance": "ALL", "browser": "ALL" },
    });
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let c = ClientBuilder::new(connector)
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&driver.url)
        .await
        .expect("a Chromium session");
    let shots_dir = tempfile::Builder::new()
        .prefix("rustygate-dashboard-")
        .tempdir()
        .unwrap()
        .keep();
    println!("screenshots in {}", shots_dir.display());
    let mut shots = Shots {
        dir: shots_dir,
        n: 0,
    };

    // The walk, as an operator would do it. Whatever happens in it, the browser session is
    // closed after (Chromium is chromedriver's child: killing the driver alone may leave it).
    let walk = AssertUnwindSafe(async {
        // What the browser does on its own at start-up (its home page) is not the page's doing.
        c.goto("about:blank").await.unwrap();
        let startup = requested_urls(&c).await;
        let _ = console_errors(&c).await;
        println!(
            "browser start-up, before the page: {} http(s) requests {startup:?} (not the page's)",
            startup.len()
        );

        // 1. The token prompt, then the applied commit.
        c.goto(&page).await.unwrap();
        wait_for(
            &c,
            &mut shots,
            "the token prompt",
            "return !document.getElementById('login').hidden",
        )
        .await;
        c.find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        c.find(Locator::Id("token-go"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let sha = wait_for(
            &c,
            &mut shots,
            "the applied sha",
            "const e = document.getElementById('applied-sha'); return e && e.dataset.sha",
        )
        .await;
        assert_eq!(sha, json!(v1));
        let shown = text_of(&c, Locator::Id("applied")).await;
        assert!(shown.contains(&v1[..12]), "{shown}");
        assert!(
            shown.contains("Route orders and users to the orders service"),
            "{shown}"
        );
        let stored = c
            .execute(
                "return sessionStorage.getItem('rustygate.admin-token')",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(stored, json!(TOKEN), "the token is kept for the tab");
        let reloads = wait_for(
            &c,
            &mut shots,
            "the reload history",
            "return document.querySelector('#reloads tbody').innerText",
        )
        .await;
        assert!(reloads.as_str().unwrap().contains("startup"), "{reloads}");
        // The fleet: both replicas on the applied commit, or, without a store, one replica.
        if store.is_some() {
            let verdict = wait_for(
                &c,
                &mut shots,
                "two replicas in the fleet panel",
                "const v = document.getElementById('fleet-verdict'); \
                 return document.querySelectorAll('#fleet tr.fleet-row').length === 2 && v.textContent",
            )
            .await;
            assert_eq!(verdict, json!(format!("all 2 replicas serve {}", &v1[..12])));
            let rows = text_of(&c, Locator::Id("fleet")).await;
            assert!(
                rows.contains("gw-a (this one)") && rows.contains("gw-b"),
                "{rows}"
            );
            assert_eq!(
                rows.matches(&v1[..12]).count(),
                4,
                "applied and attempted, for each replica: {rows}"
            );
            let class = c
                .find(Locator::Id("fleet-verdict"))
                .await
                .unwrap()
                .attr("class")
                .await
                .unwrap();
            assert_eq!(class.as_deref(), Some("ok"));
        } else {
            let verdict = wait_for(
                &c,
                &mut shots,
                "the single-replica fleet panel",
                "const v = document.getElementById('fleet-verdict'); \
                 return v.dataset.state === 'single' && v.textContent",
            )
            .await;
            assert!(
                verdict.as_str().unwrap().starts_with("single replica: "),
                "{verdict}"
            );
            assert!(
                !c.find(Locator::Id("fleet")).await.unwrap().is_displayed().await.unwrap(),
                "no replicas listed for a single replica"
            );
        }
        shots.take(&c, "overview").await;

        // 2. The routes table, filtered.
        c.find(Locator::Css("#tabs button[data-view=routes]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(
            &c,
            &mut shots,
            "six routes",
            "return document.querySelectorAll('#routes tr.route-row').length === 6",
        )
        .await;
        c.find(Locator::Id("route-filter"))
            .await
            .unwrap()
            .send_keys("ORDER")
            .await
            .unwrap();
        let rows = wait_for(
            &c,
            &mut shots,
            "the filtered table",
            "const r = [...document.querySelectorAll('#routes tr.route-row')]; \
             return r.length === 1 && r[0].dataset.name",
        )
        .await;
        assert_eq!(rows, json!("orders"));
        let source = text_of(&c, Locator::Css("#routes tr.route-row code.source")).await;
        assert_eq!(source, "routes/main.toml:2:8");
        let count = text_of(&c, Locator::Id("routes-count")).await;
        assert_eq!(count, "1 of 6 routes");

        // 3. Which route would serve this request?
        c.find(Locator::Id("explain-url"))
            .await
            .unwrap()
            .send_keys("http://api.example.com/orders/7?x=1")
            .await
            .unwrap();
        c.find(Locator::Id("explain-go"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let route = wait_for(&c, &mut shots, "the explanation", "const e = document.querySelector('#explain-result .explain-route'); return e && e.textContent").await;
        assert_eq!(route, json!("orders"));
        let answer = text_of(&c, Locator::Id("explain-result")).await;
        assert!(
            answer.starts_with("200 route orders routes/main.toml:2:8 → upstream orders /7?x=1"),
            "{answer}"
        );
        assert!(
            answer.contains("forwarded to upstream `orders`"),
            "{answer}"
        );
        shots.take(&c, "routes-and-explain").await;
        let input = c.find(Locator::Id("explain-url")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys("orders/7").await.unwrap();
        c.find(Locator::Id("explain-go"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let refused = wait_for(
            &c,
            &mut shots,
            "the refusal",
            "const e = document.getElementById('explain-error'); return e && e.textContent",
        )
        .await;
        assert!(
            refused
                .as_str()
                .unwrap()
                .contains("`orders/7` is not a URL"),
            "{refused}"
        );

        // 4. Upstreams and 5. traffic.
        c.find(Locator::Css("#tabs button[data-view=upstreams]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let target = wait_for(&c, &mut shots, "the orders upstream", "const e = document.querySelector('.upstream[data-name=orders] tr.target'); return e && e.innerText").await;
        let target = target.as_str().unwrap();
        assert!(
            target.contains(&backend.url()) && target.contains("not checked") && target.contains("ok"),
            "{target}"
        );
        let latency = text_of(&c, Locator::Css(".upstream[data-name=orders] dl")).await;
        assert!(
            latency.contains("5 requests in the last 15 min"),
            "{latency}"
        );
        shots.take(&c, "upstreams").await;
        c.find(Locator::Css("#tabs button[data-view=traffic]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(
            &c,
            &mut shots,
            "the charts",
            "return document.querySelectorAll('#charts .chart svg').length >= 3",
        )
        .await;
        shots.take(&c, "traffic").await;

        // 6. A broken commit, reloaded: the attempted commit and its diagnostic, located.
        let bad = commit_files(
            &repo,
            "main",
            &as_refs(&config(&backend.url(), true, store.as_deref())),
            "Add reports",
        )
        .to_string();
        let (status, _) = gw.admin_post(
            "/admin/reload",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            b"",
        );
        assert_eq!(status, 202);
        c.find(Locator::Css("#tabs button[data-view=overview]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let attempted = wait_for(
            &c,
            &mut shots,
            "the rejected commit",
            "const e = document.getElementById('attempted-sha'); \
             return document.getElementById('attempted-result').textContent === 'rejected' && e.dataset.sha",
        )
        .await;
        assert_eq!(attempted, json!(bad));
        let diag = text_of(&c, Locator::Css("#attempted .diag")).await;
        assert!(
            diag.starts_with("routes/main.toml:41:12 unknown-upstream unknown upstream `order`"),
            "{diag}"
        );
        assert!(
            diag.contains("41 | upstream = \"order\"\n   |            ^ "),
            "{diag}"
        );
        assert!(diag.contains("help: did you mean `orders`?"), "{diag}");
        // The one-line file's: the line cut around the place, the caret under its `"order"`.
        // Before, the snippet was the line's first 240 characters (all spaces) and the caret
        // 5,012 spaces in.
        let long = text_of(&c, Locator::Css("#attempted .diag + .diag")).await;
        assert!(
            long.starts_with("routes/one-line.toml:1:5013 unknown-upstream"),
            "{long}"
        );
        let lines: Vec<&str> = long.lines().collect();
        let at = lines.iter().position(|l| l.starts_with("1 | ")).unwrap();
        let (line, caret) = (lines[at], lines[at + 1]);
        assert!(line.chars().count() < 220, "not cut: {line}");
        let quote = line.find("\"order\"").map(|i| line[..i].chars().count());
        assert_eq!(caret.chars().position(|c| c == '^'), quote, "{line}\n{caret}");
        let still = c
            .find(Locator::Id("applied-sha"))
            .await
            .unwrap()
            .attr("data-sha")
            .await
            .unwrap();
        assert_eq!(
            still.as_deref(),
            Some(v1.as_str()),
            "the last good commit still serves"
        );
        let history = text_of(&c, Locator::Css("#reloads tbody tr")).await;
        assert!(
            history.contains("admin") && history.contains("rejected") && history.contains(&bad[..12]),
            "{history}"
        );
        // Sized to what the overview shows, for the README's picture.
        c.set_window_size(1200, 720).await.unwrap();
        let overview = shots.take(&c, "rejected-commit").await;
        if let Some(to) = std::env::var_os("RUSTYGATE_DASHBOARD_SCREENSHOT") {
            std::fs::copy(&overview, &to).unwrap();
            println!("screenshot copied to {}", Path::new(&to).display());
        }

        // 7. The store killed: the fleet panel says it did not answer; the rest stays.
        if let Some(server) = redis.take() {
            drop(server);
            let down = wait_for(
                &c,
                &mut shots,
                "the fleet panel's error",
                "const v = document.getElementById('fleet-verdict'); \
                 return v.dataset.state === 'error' && v.textContent",
            )
            .await;
            let down = down.as_str().unwrap();
            assert!(
                down.starts_with(&format!(
                    "the shared store {} did not answer: ",
                    store.as_deref().unwrap()
                )),
                "{down}"
            );
            assert!(
                !c.find(Locator::Id("fleet")).await.unwrap().is_displayed().await.unwrap(),
                "no replicas listed without the store"
            );
            let applied = text_of(&c, Locator::Id("applied")).await;
            assert!(applied.contains(&v1[..12]), "{applied}");
            let history = text_of(&c, Locator::Css("#reloads tbody tr")).await;
            assert!(history.contains(&bad[..12]), "{history}");
            shots.take(&c, "store-down").await;
        }

        // 8. Nothing but the admin listener was asked for anything, and the console has no error
        // but the API's own refusals (the 401 before the token, the 400 of the refused URL): no
        // script error, no CSP violation (a blocked load never reaches the network log).
        let urls = requested_urls(&c).await;
        let errors = console_errors(&c).await;
        let timing = c
            .execute(
                "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]",
                vec![],
            )
            .await
            .unwrap();
        let origin = format!("http://{admin}/");
        let mut all: Vec<String> = urls.clone();
        all.extend(
            timing
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
        let unexpected: Vec<&String> = errors
            .iter()
            .filter(|e| {
                !(e.starts_with(&format!("{origin}api/v1/"))
                    && (e.contains("status of 401") || e.contains("status of 400")))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "console errors: {unexpected:?} (all: {errors:?})"
        );
        assert!(
            errors.iter().any(|e| e.contains("status of 401")),
            "the console log is read: the 401 before the token is in it ({errors:?})"
        );
        let elsewhere: Vec<&String> = all.iter().filter(|u| !u.starts_with(&origin)).collect();
        assert!(
            elsewhere.is_empty(),
            "the page asked other hosts: {elsewhere:?}"
        );
        let api_calls = urls
            .iter()
            .filter(|u| u.starts_with(&format!("{origin}api/v1/")))
            .count();
        assert!(
            urls.iter().any(|u| u == &page),
            "the page load is in the log: {urls:?}"
        );
        assert!(
            api_calls >= 8,
            "only {api_calls} API calls in the log: {urls:?}"
        );
        println!(
            "{} requests, all to {origin} ({api_calls} API calls)",
            all.len()
        );

    })
    .catch_unwind()
    .await;
    let closed = c.close().await;
    drop(driver);
    if let Err(panic) = walk {
        std::panic::resume_unwind(panic);
    }
    closed.unwrap();
    println!("browser test took {:?}", started.elapsed());
}
