//! Upstreams against real loopback backends that can be stopped, slowed and made to fail:
//! balancing, active health checks, passive ejection, timeouts, retries and their budget,
//! circuit breaking, and state kept across config swaps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::Response;

/// A backend whose behaviour the test changes while it runs.
#[derive(Clone)]
struct Knobs {
    name: &'static str,
    /// Requests other than health checks.
    hits: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
    health_checks: Arc<AtomicUsize>,
    health_status: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl Knobs {
    fn new(name: &'static str) -> Knobs {
        Knobs {
            name,
            hits: Arc::default(),
            posts: Arc::default(),
            health_checks: Arc::default(),
            health_status: Arc::new(AtomicU16::new(200)),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::default(),
        }
    }

    fn slow(self, ms: u64) -> Knobs {
        self.delay_ms.store(ms, Ordering::SeqCst);
        self
    }

    fn failing(self, status: u16) -> Knobs {
        self.status.store(status, Ordering::SeqCst);
        self
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Serves on `addr` (or a free port): `/healthz` answers `health_status`, everything else
    /// waits `delay_ms` and answers `status` with `name:<request body>`.
    fn serve(&self, addr: Option<SocketAddr>) -> Backend {
        let k = self.clone();
        let handler = move |req: hyper::Request<hyper::body::Incoming>| {
            let k = k.clone();
            async move {
                if req.uri().path() == "/healthz" {
                    k.health_checks.fetch_add(1, Ordering::SeqCst);
                    let status = k.health_status.load(Ordering::SeqCst);
                    return Response::builder().status(status).body(full("")).unwrap();
                }
                k.hits.fetch_add(1, Ordering::SeqCst);
                if req.method() == hyper::Method::POST {
                    k.posts.fetch_add(1, Ordering::SeqCst);
                }
                let delay = k.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let status = k.status.load(Ordering::SeqCst);
                Response::builder()
                    .status(status)
                    .body(full(format!(
                        "{}:{}",
                        k.name,
                        String::from_utf8_lossy(&body)
                    )))
                    .unwrap()
            }
        };
        match addr {
            Some(a) => Backend::start_at(a, handler),
            None => Backend::start(handler),
        }
    }
}

fn target_available(gw: &Gateway, url: &str) -> bool {
    let snap = gw.store.load();
    let u = snap.upstreams.iter().find(|u| u.name == "be").unwrap();
    u.targets
        .iter()
        .find(|t| t.url == url)
        .unwrap()
        .state
        .available()
}

/// Runs `n` requests on `threads` threads at once; returns the statuses.
fn concurrent(gw: &Gateway, threads: usize, per_thread: usize, method: &'static str) -> Vec<u16> {
    let addr = gw.addr.to_string();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|_| http(&addr, method, "/x", &[], b"").map_or(0, |r| r.0))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn a_target_that_goes_down_is_checked_out_and_comes_back() {
    let (a, b, c) = (Knobs::new("a"), Knobs::new("b"), Knobs::new("c"));
    let (ba, bb, bc) = (a.serve(None), b.serve(None), c.serve(None));
    let urls = vec![ba.url(), bb.url(), bc.url()];
    let health = "health = { path = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", healthy_after = 2, unhealthy_after = 2 }";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls, health, "")));
    assert!(
        wait_until(Duration::from_secs(5), || b
            .health_checks
            .load(Ordering::SeqCst)
            >= 2),
        "health checks run in the background"
    );

    // b goes down: every idempotent request still succeeds (connect failures are retried on
    // another target) while the checks and passive detection take b out.
    let b_addr = bb.addr;
    drop(bb);
    for i in 0..60 {
        let (status, body) = gw.get("/x");
        assert_eq!(status, 200, "request {i} failed: {body}");
        assert!(!body.starts_with("b:"), "{body}");
    }
    assert!(wait_until(Duration::from_secs(5), || !target_available(
        &gw, &urls[1]
    )));
    let m = scrape(&gw);
    let healthy = |m: &HashMap<String, f64>, url: &str| {
        m.get(&format!(
            "rustygate_upstream_target_healthy{{target=\"{url}\",upstream=\"be\"}}"
        ))
        .copied()
    };
    assert_eq!(healthy(&m, &urls[1]), Some(0.0));
    assert_eq!(healthy(&m, &urls[0]), Some(1.0));
    assert!(
        m.get("rustygate_upstream_retries_total{reason=\"connect_failure\",upstream=\"be\"}")
            .is_some_and(|&n| n >= 1.0),
        "retries are counted"
    );

    // b comes back on the same port: the checks bring it back and traffic reaches it again.
    let bb = b.serve(Some(b_addr));
    let before = b.hits();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = gw.get("/x");
            b.hits() > before
        }),
        "b takes traffic again once healthy"
    );
    assert!(target_available(&gw, &urls[1]));
    drop((ba, bb, bc));
}

#[test]
fn passive_detection_ejects_a_failing_target_without_health_checks() {
    let (a, b) = (Knobs::new("a"), Knobs::new("b").failing(500));
    let (ba, bb) = (a.serve(None), b.serve(None));
    let urls = vec![ba.url(), bb.url()];
    let gw = Gateway::start(&as_refs(&proxy_to(
        &urls,
        "outlier = { consecutive_5xx = 3, base_ejection = \"30s\" }",
        "",
    )));
    for _ in 0..20 {
        gw.get("/x");
    }
    // Three 5xx in a row ejected b; after that only a is used.
    assert_eq!(b.hits(), 3);
    assert!(!target_available(&gw, &urls[1]));
    let after = b.hits();
    for _ in 0..10 {
        assert_eq!(gw.get("/x").0, 200);
    }
    assert_eq!(b.hits(), after);
}

/// A target that fails every proxied request but passes its health checks: an ejection ends
/// early only after `healthy_after` checks that passed since the ejection, not at the next
/// passing check because it passed `healthy_after` checks long before.
#[test]
fn health_checks_end_a_passive_ejection_only_after_healthy_after_passes_since_it() {
    let (a, b) = (Knobs::new("a"), Knobs::new("b").failing(500));
    let (ba, bb) = (a.serve(None), b.serve(None));
    let urls = vec![ba.url(), bb.url()];
    let upstream = "health = { path = \"/healthz\", interval = \"50ms\", healthy_after = 4 }\n\
                    outlier = { consecutive_5xx = 2, base_ejection = \"60s\" }";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls, upstream, "")));
    // b has passed its checks many times over before it fails any request.
    assert!(wait_until(Duration::from_secs(5), || b
        .health_checks
        .load(Ordering::SeqCst)
        >= 6));
    eject_by_requests(&gw, &urls[1]);
    // Checks run one after another: once b has seen the third check after the ejection, the
    // verdicts of the two before it are in. Fewer than `healthy_after` passed since it.
    let at_ejection = b.health_checks.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || b
        .health_checks
        .load(Ordering::SeqCst)
        >= at_ejection + 3));
    assert!(
        !target_available(&gw, &urls[1]),
        "two passing checks after the ejection ended it (healthy_after = 4)"
    );
    // Four passing checks since the ejection end it well before its 60 s.
    assert!(
        wait_until(Duration::from_secs(10), || target_available(&gw, &urls[1])),
        "healthy_after passing checks end a passive ejection early"
    );
    drop((ba, bb));
}

/// Sends requests until `url` (failing each with a 5xx) is ejected; at most 20.
fn eject_by_requests(gw: &Gateway, url: &str) {
    for _ in 0..20 {
        if !target_available(gw, url) {
            break;
        }
        gw.get("/x");
    }
    assert!(!target_available(gw, url), "two 5xx in a row eject b");
}

/// `ends_ejections = false`: the checks keep passing, and the ejection still runs its time
/// (a target that resets every request but passes /healthz stays out).
#[test]
fn health_checks_that_do_not_end_ejections_leave_them_to_run_their_time() {
    let (a, b) = (Knobs::new("a"), Knobs::new("b").failing(500));
    let (ba, bb) = (a.serve(None), b.serve(None));
    let urls = vec![ba.url(), bb.url()];
    let upstream = "health = { path = \"/healthz\", interval = \"50ms\", healthy_after = 1, \
                    ends_ejections = false }\n\
                    outlier = { consecutive_5xx = 2, base_ejection = \"60s\" }";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls, upstream, "")));
    eject_by_requests(&gw, &urls[1]);
    let at_ejection = b.health_checks.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || b
        .health_checks
        .load(Ordering::SeqCst)
        >= at_ejection + 5));
    assert!(
        !target_available(&gw, &urls[1]),
        "passing checks ended the ejection although ends_ejections = false"
    );
    drop((ba, bb));
}

#[test]
fn timeouts_are_504_and_retried_on_another_target_but_post_is_not() {
    let (slow, fast) = (Knobs::new("slow").slow(3000), Knobs::new("fast"));
    let (bs, bf) = (slow.serve(None), fast.serve(None));
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[bs.url(), bf.url()],
        "retries = { attempts = 1, on = [\"timeout\"], budget_percent = 100 }\noutlier = { consecutive_failures = 0 }",
        "timeout = \"300ms\"",
    )));
    for i in 0..6 {
        let (status, body) = gw.get("/x");
        assert_eq!((status, body.as_str()), (200, "fast:"), "GET {i}");
    }
    assert!(
        slow.hits() >= 2,
        "round-robin sent some GETs to the slow target first"
    );

    let statuses = (0..6)
        .map(|_| http(&gw.addr.to_string(), "POST", "/x", &[], b"order").unwrap())
        .collect::<Vec<_>>();
    let timed_out = statuses.iter().filter(|(s, _)| *s == 504).count();
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!(timed_out >= 2, "{statuses:?}");
    assert_eq!(timed_out + ok, 6, "{statuses:?}");
    // Each POST reached exactly one target.
    assert_eq!(
        slow.posts.load(Ordering::SeqCst) + fast.posts.load(Ordering::SeqCst),
        6
    );
    assert!(
        statuses[..]
            .iter()
            .any(|(s, b)| *s == 504 && b.contains("did not answer in time"))
    );

    // A single slow target: 504, not a hang.
    let only_slow = Gateway::start(&as_refs(&proxy_to(&[bs.url()], "", "timeout = \"200ms\"")));
    assert_eq!(only_slow.get("/x").0, 504);
}

#[test]
fn the_retry_budget_caps_retries_when_every_target_fails() {
    let (a, b) = (Knobs::new("a").failing(503), Knobs::new("b").failing(503));
    let (ba, bb) = (a.serve(None), b.serve(None));
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[ba.url(), bb.url()],
        "retries = { attempts = 3, on = [\"503\"], backoff = \"1ms\", max_backoff = \"2ms\", budget_percent = 20, min_retries_per_second = 0 }",
        "",
    )));
    for _ in 0..50 {
        assert_eq!(gw.get("/x").0, 503);
    }
    // Without a budget: 50 * 4 = 200 attempts. With 20%: 50 + 10.
    let attempts = a.hits() + b.hits();
    assert!((58..=62).contains(&attempts), "{attempts} attempts");
    let m = scrape(&gw);
    let retries = m
        .get("rustygate_upstream_retries_total{reason=\"503\",upstream=\"be\"}")
        .copied()
        .unwrap_or(0.0);
    assert_eq!(retries as usize, attempts - 50);
    let per_target: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rustygate_upstream_requests_total{") && k.contains("status=\"503\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(per_target as usize, attempts);
}

#[test]
fn small_bodies_are_replayed_on_retry_and_large_ones_are_not() {
    let (bad, good) = (Knobs::new("bad").failing(503), Knobs::new("good"));
    let (bb, bg) = (bad.serve(None), good.serve(None));
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[bb.url(), bg.url()],
        "retries = { attempts = 1, on = [\"503\"], replay_body_limit = \"16\", budget_percent = 100 }",
        "",
    )));
    let addr = gw.addr.to_string();
    for _ in 0..4 {
        let (status, body) = http(&addr, "PUT", "/x", &[], b"small body").unwrap();
        assert_eq!((status, body.as_str()), (200, "good:small body"));
    }
    // Over the replay limit: streamed, so a 503 after the body went out is not retried.
    let big = vec![b'x'; 64];
    let statuses: Vec<u16> = (0..4)
        .map(|_| http(&addr, "PUT", "/x", &[], &big).unwrap().0)
        .collect();
    assert!(statuses.contains(&503), "{statuses:?}");
}

#[test]
fn a_streamed_post_goes_to_another_target_when_the_first_refuses_the_connection() {
    let good = Knobs::new("good");
    let bg = good.serve(None);
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let gw = Gateway::start(&as_refs(&proxy_to(&[dead, bg.url()], "", "")));
    for _ in 0..4 {
        let (status, body) = http(&gw.addr.to_string(), "POST", "/x", &[], b"payload").unwrap();
        assert_eq!((status, body.as_str()), (200, "good:payload"));
    }
}

#[test]
fn least_connections_sends_fewer_requests_to_a_slow_target() {
    let (slow, fast) = (Knobs::new("slow").slow(300), Knobs::new("fast").slow(5));
    let (bs, bf) = (slow.serve(None), fast.serve(None));
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[bs.url(), bf.url()],
        "balance = \"least_connections\"",
        "",
    )));
    let statuses = concurrent(&gw, 6, 10, "GET");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let (s, f) = (slow.hits(), fast.hits());
    assert_eq!(s + f, 60);
    assert!(s * 3 < f, "slow {s}, fast {f}");
}

#[test]
fn consistent_hash_keeps_keys_and_moves_few_when_a_target_is_added() {
    let knobs: Vec<Knobs> = ["t0", "t1", "t2", "t3"]
        .into_iter()
        .map(Knobs::new)
        .collect();
    let backends: Vec<Backend> = knobs.iter().map(|k| k.serve(None)).collect();
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let hashed = "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls[..3], hashed, "")));
    let addr = gw.addr.to_string();
    let owner = |user: usize| {
        let (status, body) = http(
            &addr,
            "GET",
            "/x",
            &[("x-user", &format!("user-{user}"))],
            b"",
        )
        .unwrap();
        assert_eq!(status, 200);
        body.trim_end_matches(':').to_owned()
    };
    let before: Vec<String> = (0..120).map(owner).collect();
    for (u, t) in before.iter().enumerate().take(40) {
        assert_eq!(&owner(u), t, "user-{u} stays on its target");
    }
    let spread: std::collections::HashSet<&String> = before.iter().collect();
    assert_eq!(spread.len(), 3, "keys spread over every target");

    gw.swap(&as_refs(&proxy_to(&urls, hashed, "")));
    let after: Vec<String> = (0..120).map(owner).collect();
    let moved: Vec<usize> = (0..120).filter(|&u| before[u] != after[u]).collect();
    assert!(
        moved.iter().all(|&u| after[u] == "t3"),
        "keys only move to the new target"
    );
    assert!(
        (12..=55).contains(&moved.len()),
        "about a quarter of the keys move, not {}",
        moved.len()
    );
}

#[test]
fn a_hash_header_sent_on_several_lines_is_one_key() {
    let knobs: Vec<Knobs> = ["t0", "t1", "t2"].into_iter().map(Knobs::new).collect();
    let backends: Vec<Backend> = knobs.iter().map(|k| k.serve(None)).collect();
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let hashed = "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls, hashed, "")));
    let addr = gw.addr.to_string();
    let owner = |headers: &[(&str, &str)]| {
        let (status, body) = http(&addr, "GET", "/x", headers, b"").unwrap();
        assert_eq!(status, 200);
        body.trim_end_matches(':').to_owned()
    };
    // The upstream reads both lines as one value, `user-N, eu`: so does the hash.
    for u in 0..30 {
        let user = format!("user-{u}");
        let split = owner(&[("x-user", &user), ("x-user", "eu")]);
        let joined = owner(&[("x-user", &format!("{user}, eu"))]);
        assert_eq!(split, joined, "{user}");
    }
}

#[test]
fn health_and_in_flight_counts_survive_a_swap_that_keeps_the_target() {
    let (a, b) = (Knobs::new("a"), Knobs::new("b").slow(1500));
    b.health_status.store(500, Ordering::SeqCst);
    let (ba, bb) = (a.serve(None), b.serve(None));
    let urls = vec![ba.url(), bb.url()];
    let health = "health = { path = \"/healthz\", interval = \"100ms\", healthy_after = 1, unhealthy_after = 1 }\nfail_open = false";
    let gw = Gateway::start(&as_refs(&proxy_to(&urls, health, "")));
    assert!(wait_until(Duration::from_secs(5), || !target_available(
        &gw, &urls[1]
    )));

    // A change elsewhere in the config: b stays unhealthy, with no new check needed.
    let mut files = proxy_to(&urls, health, "");
    files.push((
        "routes/other.toml",
        "[[route]]\nname = \"other\"\npath = \"/other\"\nrespond = { status = 204 }\n".into(),
    ));
    gw.swap(&as_refs(&files));
    assert!(
        !target_available(&gw, &urls[1]),
        "a fresh state would start healthy"
    );
    // Moving the upstream's lines around (a comment above it) is not a new health check.
    let upstream_file = files
        .iter()
        .position(|(p, _)| *p == "upstreams/be.toml")
        .unwrap();
    files[upstream_file]
        .1
        .insert_str(0, "# Backends of the catch-all route.\n\n");
    gw.swap(&as_refs(&files));
    assert!(
        !target_available(&gw, &urls[1]),
        "same settings, same state"
    );
    assert_eq!(gw.get("/other").0, 204);

    // In-flight counts: a slow request to b (made healthy) is still counted after a swap.
    b.health_status.store(200, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || target_available(
        &gw, &urls[1]
    )));
    let addr = gw.addr.to_string();
    let slow_requests: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http(&addr, "GET", "/x", &[], b"").map(|r| r.0))
        })
        .collect();
    let in_flight = |gw: &Gateway| {
        let snap = gw.store.load();
        snap.upstreams[0].targets[1].state.in_flight()
    };
    assert!(wait_until(Duration::from_secs(3), || in_flight(&gw) == 1));
    files.push((
        "routes/third.toml",
        "[[route]]\nname = \"third\"\npath = \"/third\"\nrespond = { status = 204 }\n".into(),
    ));
    gw.swap(&as_refs(&files));
    assert_eq!(
        in_flight(&gw),
        1,
        "the new snapshot sees the request in flight"
    );
    for h in slow_requests {
        assert_eq!(h.join().unwrap(), Some(200));
    }
    assert!(wait_until(Duration::from_secs(2), || in_flight(&gw) == 0));

    // A swap that removes b drops its state and stops its checks.
    let weak = Arc::downgrade(&gw.store.load().upstreams[0].targets[1].state);
    gw.swap(&as_refs(&proxy_to(&urls[..1], health, "")));
    assert!(wait_until(Duration::from_secs(2), || weak
        .upgrade()
        .is_none()));
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = b.health_checks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.health_checks.load(Ordering::SeqCst),
        stopped_at,
        "no more checks of b"
    );
}

#[test]
fn no_usable_target_is_503_unless_fail_open() {
    let a = Knobs::new("a");
    a.health_status.store(503, Ordering::SeqCst);
    let ba = a.serve(None);
    let health = "health = { path = \"/healthz\", interval = \"100ms\", unhealthy_after = 1 }";
    let closed = Gateway::start(&as_refs(&proxy_to(&[ba.url()], health, "")));
    let open = Gateway::start(&as_refs(&proxy_to(
        &[ba.url()],
        &format!("{health}\nfail_open = true"),
        "",
    )));
    assert!(wait_until(Duration::from_secs(5), || !target_available(
        &closed,
        &ba.url()
    )
        && !target_available(&open, &ba.url())));
    let (status, body) = closed.get("/x");
    assert_eq!(status, 503);
    assert!(body.contains("no healthy upstream target"), "{body}");
    assert_eq!(open.get("/x"), (200, "a:".to_owned()));
}

#[test]
fn the_circuit_breaker_answers_503_beyond_its_limit() {
    let slow = Knobs::new("slow").slow(2000);
    let bs = slow.serve(None);
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[bs.url()],
        "circuit_breaker = { max_requests = 2 }",
        "",
    )));
    let statuses = concurrent(&gw, 6, 1, "GET");
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!((ok, refused), (2, 4), "{statuses:?}");
    assert_eq!(slow.hits(), 2);
    let m = scrape(&gw);
    assert_eq!(
        m.get("rustygate_upstream_overflow_total{limit=\"max_requests\",upstream=\"be\"}"),
        Some(&4.0)
    );
}

#[test]
fn max_pending_caps_requests_waiting_for_a_new_connection() {
    // A target that accepts TCP but never answers the TLS handshake: every new connection to
    // it stays pending until the connect timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten().take(16) {
            held.push(s);
        }
    });
    let gw = Gateway::start(&as_refs(&proxy_to(
        &[format!("https://{addr}")],
        "connect_timeout = \"2s\"\ncircuit_breaker = { max_pending = 1 }\nretries = 0",
        "",
    )));
    let addr = gw.addr.to_string();
    let first = {
        let addr = addr.clone();
        std::thread::spawn(move || http(&addr, "GET", "/x", &[], b"").map(|r| r.0))
    };
    // Wait until the first request holds the pending slot.
    assert!(wait_until(Duration::from_secs(2), || {
        scrape(&gw)
            .get("rustygate_in_flight_requests")
            .is_some_and(|&n| n >= 1.0)
    }));
    std::thread::sleep(Duration::from_millis(100));
    // A waiting request would end in 504 after the connect timeout; these are refused.
    for _ in 0..2 {
        let (status, body) = gw.get("/x");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("concurrency limit"), "{body}");
    }
    assert_eq!(first.join().unwrap(), Some(504));
    assert_eq!(
        scrape(&gw).get("rustygate_upstream_overflow_total{limit=\"max_pending\",upstream=\"be\"}"),
        Some(&2.0)
    );
}

#[test]
fn a_replayable_body_that_never_arrives_is_408_after_the_route_timeout() {
    let good = Knobs::new("good");
    let bg = good.serve(None);
    let gw = Gateway::start(&as_refs(&proxy_to(&[bg.url()], "", "timeout = \"300ms\"")));
    // PUT is retryable and small, so the gateway buffers the body; only half of it is sent.
    let reply = raw(
        gw.addr,
        b"PUT /x HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nhalf!",
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("not received in time"), "{reply}");
    assert_eq!(good.hits(), 0, "nothing was sent upstream");
}

/// The gateway running out of file descriptors is its own shortage, not the target's failure:
/// such connects are 503 and eject nothing. (One client holding enough WebSocket tunnels made
/// every connect fail with EMFILE, and five in a row ejected a healthy target for 30 s.)
#[test]
fn running_out_of_file_descriptors_is_503_and_ejects_no_target() {
    // `Connection: close` on every answer: each request needs a new upstream connection.
    let be = Backend::start(|_req| async {
        Response::builder()
            .header("connection", "close")
            .body(full("ok"))
            .unwrap()
    });
    let files = proxy_all(&be.url(), "");
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let pid = gw.child.id().to_string();
    let mut client = KeepAlive::connect(&gw.listen).unwrap();
    assert_eq!(client.get("/").unwrap(), (200, "ok".into()));
    let nofile = |limit: &str| {
        let ok = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={limit}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "prlimit --nofile={limit}");
    };
    let before = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--raw",
            "--noheadings",
            "-o",
            "SOFT,HARD",
        ])
        .output()
        .unwrap();
    let before = String::from_utf8_lossy(&before.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(":");
    // The lowest descriptor number free is the next one a socket would get: a limit there
    // leaves none to open (the client's connection is open already).
    let used: std::collections::HashSet<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
    nofile(&format!(
        "{lowest_free}:{}",
        before.split(':').nth(1).unwrap()
    ));
    for _ in 0..6 {
        let (status, body) = client.get("/").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("could not open a connection"), "{body}");
    }
    nofile(&before);
    assert_eq!(
        client.get("/").unwrap(),
        (200, "ok".into()),
        "the target is still in rotation"
    );
    let logs = gw.logs.lock().unwrap().clone();
    assert!(!logs.contains("ejected"), "{logs}");
}
