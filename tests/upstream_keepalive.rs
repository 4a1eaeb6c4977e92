//! Keep-alive races with upstreams, against raw-TCP upstreams on loopback that close a reused
//! connection at the worst moment: just as the gateway wrote a request on it, before any
//! response byte.
//!
//! * An idempotent request is sent once more on a fresh connection, invisibly: no 502, no
//!   passive-ejection failure, no `upstream_errors`, no retry counted.
//! * A POST that was written is never sent twice.
//! * A response cut short is a real failure, not a stale connection.
//! * The pool stops reusing a connection before the upstream drops it: by default after 4 s
//!   (below Node's 5 s), and after N-1 s when the upstream announced `Keep-Alive: timeout=N`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rustygate::server::ServeOptions;

/// What the upstream does with a request it will not answer.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Close {
    /// Reads the whole request, then closes (FIN).
    Fin,
    /// Reads one byte of it and closes with the rest unread (the kernel sends a reset).
    Reset,
    /// Reads the request, writes the start of a response head, then closes.
    PartialHead,
}

#[derive(Clone, Copy)]
struct Behaviour {
    /// Requests answered per connection; the next one on it is dropped.
    per_connection: usize,
    /// A request arriving after the connection was idle this long is dropped: the upstream's
    /// idle close racing with the request.
    idle_close: Option<Duration>,
    close: Close,
    /// Sent with every response.
    keep_alive: Option<&'static str>,
}

impl Behaviour {
    /// One request per connection, the next one dropped.
    fn one_per_connection(close: Close) -> Behaviour {
        Behaviour {
            per_connection: 1,
            idle_close: None,
            close,
            keep_alive: Some("timeout=60"),
        }
    }

    /// Any number of requests, but one after `idle` of silence is dropped.
    fn idle_close(idle: Duration, keep_alive: Option<&'static str>) -> Behaviour {
        Behaviour {
            per_connection: usize::MAX,
            idle_close: Some(idle),
            close: Close::Fin,
            keep_alive,
        }
    }
}

/// A raw HTTP/1.1 upstream on 127.0.0.1:0, and what it saw.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections that ended (the gateway closed them, or `serve` gave up on them).
    closed: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    /// Method and body of every request read whole (dropped ones included, except resets).
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl RawUpstream {
    fn start(b: Behaviour) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let u = RawUpstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            closed: Arc::default(),
            answered: Arc::default(),
            dropped: Arc::default(),
            seen: Arc::default(),
        };
        let closed = Arc::clone(&u.closed);
        let (conns, answered, dropped, seen) = (
            Arc::clone(&u.connections),
            Arc::clone(&u.answered),
            Arc::clone(&u.dropped),
            Arc::clone(&u.seen),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                let Ok(s) = stream else { continue };
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let (answered, dropped, seen) = (
                    Arc::clone(&answered),
                    Arc::clone(&dropped),
                    Arc::clone(&seen),
                );
                let closed = Arc::clone(&closed);
                std::thread::spawn(move || {
                    serve(s, n, b, &answered, &dropped, &seen);
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        u
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    /// Connections open now.
    fn open(&self) -> usize {
        Self::get(&self.connections) - Self::get(&self.closed)
    }
}

fn serve(
    mut s: TcpStream,
    conn: usize,
    b: Behaviour,
    answered: &AtomicUsize,
    dropped: &AtomicUsize,
    seen: &Mutex<Vec<(String, String)>>,
) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut last = Instant::now();
    for served in 0..1000 {
        let mut first = [0u8; 1];
        if !matches!(s.read(&mut first), Ok(1)) {
            return;
        }
        let expired = b.idle_close.is_some_and(|t| last.elapsed() > t);
        let drop_it = expired || served >= b.per_connection;
        if drop_it && b.close == Close::Reset {
            dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let Some((method, body)) = read_request(&mut s, first[0]) else {
            return;
        };
        seen.lock().unwrap().push((method.clone(), body));
        if drop_it {
            dropped.fetch_add(1, Ordering::SeqCst);
            if b.close == Close::PartialHead {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le");
                let _ = s.flush();
            }
            return;
        }
        let body = if method == "HEAD" {
            String::new()
        } else {
            format!("{conn}:{served}")
        };
        let length = if method == "HEAD" { 3 } else { body.len() };
        let keep_alive = b
            .keep_alive
            .map(|k| format!("Keep-Alive: {k}\r\n"))
            .unwrap_or_default();
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n{keep_alive}\r\n{body}");
        // Counted before the write: the client may read the answer and look at the count
        // before this thread runs again.
        answered.fetch_add(1, Ordering::SeqCst);
        if s.write_all(resp.as_bytes()).is_err() {
            answered.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        last = Instant::now();
    }
}

/// Reads one request (head and `Content-Length` body) whose first byte was `first`.
fn read_request(s: &mut TcpStream, first: u8) -> Option<(String, String)> {
    let mut head = vec![first];
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || !matches!(s.read(&mut byte), Ok(1)) {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    let method = head.split(' ').next().unwrap_or("").to_owned();
    Some((method, String::from_utf8_lossy(&body).into_owned()))
}

/// A one-worker gateway (one pool, so reuse is predictable) routing everything to `url`.
fn gateway(url: &str, upstream_extra: &str, route_extra: &str) -> (Gateway, tempfile::TempDir) {
    let files = proxy_to(&[url.to_owned()], upstream_extra, route_extra);
    let dir = repo(&as_refs(&files));
    let gw = Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers: 1,
            ..ServeOptions::default()
        },
    );
    (gw, dir)
}

/// Series of `/metrics` for upstream `be` whose name starts with `prefix`.
fn series(gw: &Gateway, prefix: &str) -> Vec<(String, f64)> {
    scrape(gw)
        .into_iter()
        // Series that counted something (the upstream's start at 0).
        .filter(|(k, v)| k.starts_with(prefix) && k.contains("upstream=\"be\"") && *v != 0.0)
        .collect()
}

fn target_available(gw: &Gateway) -> bool {
    let snap = gw.store.load();
    let u = snap.upstreams.iter().find(|u| u.name == "be").unwrap();
    u.targets[0].state.available()
}

/// Any counted failure would eject the only target for a minute (then 503).
const STRICT_OUTLIER: &str = "outlier = { consecutive_failures = 1, base_ejection = \"60s\" }";

#[test]
fn a_post_written_on_a_connection_the_upstream_then_closes_is_not_sent_again() {
    let up = RawUpstream::start(Behaviour::one_per_connection(Close::Fin));
    let (gw, _dir) = gateway(&up.url(), "", "");
    let addr = gw.addr.to_string();
    // With a body (streamed) and without one (nothing to stream, so only the method stops it).
    for (i, body) in ["order", ""].iter().enumerate() {
        let first = http(&addr, "POST", "/orders", &[], body.as_bytes()).unwrap();
        assert_eq!(first, (200, format!("{i}:0")));
        // The next POST goes out on the pooled connection, which the upstream closes unanswered.
        let second = http(&addr, "POST", "/orders", &[], body.as_bytes()).unwrap();
        assert_eq!(second.0, 502, "{body:?}: {second:?}");
        assert!(second.1.contains("could not be reached"), "{second:?}");
    }
    // The upstream saw each POST once: the written ones were not silently resent.
    let seen = up.seen.lock().unwrap().clone();
    let expected = ["order", "order", "", ""].map(|b| ("POST".to_owned(), b.to_owned()));
    assert_eq!(seen, expected);
    assert_eq!(RawUpstream::get(&up.connections), 2);
    // Ordinary upstream failures: counted.
    let errors = series(&gw, "rustygate_upstream_errors_total");
    assert_eq!(
        errors.iter().map(|(_, v)| v).sum::<f64>(),
        2.0,
        "{errors:?}"
    );
}

#[test]
fn a_response_cut_short_on_a_reused_connection_is_a_failure_not_a_stale_connection() {
    let up = RawUpstream::start(Behaviour::one_per_connection(Close::PartialHead));
    let (gw, _dir) = gateway(&up.url(), "", "retries = 0");
    assert_eq!(gw.get("/x"), (200, "0:0".to_owned()));
    let (status, _) = gw.get("/x");
    assert_eq!(status, 502);
    // Not sent again: the upstream had started to answer.
    assert_eq!(RawUpstream::get(&up.connections), 1);
    assert_eq!(up.seen.lock().unwrap().len(), 2);
    let errors = series(&gw, "rustygate_upstream_errors_total");
    assert_eq!(
        errors.iter().map(|(_, v)| v).sum::<f64>(),
        1.0,
        "{errors:?}"
    );
}

/// Sends `n` requests one after the other through a fresh gateway to an upstream that drops
/// every reused connection as the request arrives; each must succeed.
fn all_succeed_against_a_closing_upstream(close: Close, method: &str, body: &[u8], n: usize) {
    let up = RawUpstream::start(Behaviour::one_per_connection(close));
    // Retries off for the route: what saves these requests is not a retry.
    let (gw, _dir) = gateway(&up.url(), STRICT_OUTLIER, "retries = 0");
    let addr = gw.addr.to_string();
    for i in 0..n {
        let (status, reply) = http(&addr, method, "/x", &[], body).unwrap();
        assert_eq!(status, 200, "{close:?} {method} #{i}: {reply}");
    }
    let dropped = RawUpstream::get(&up.dropped);
    // The race was really run: nearly every request first met a pooled connection that the
    // upstream then closed.
    assert!(
        dropped >= n * 9 / 10,
        "{close:?}: only {dropped} of {n} met a closing connection"
    );
    assert_eq!(RawUpstream::get(&up.answered), n);
    if close != Close::Reset {
        let seen = up.seen.lock().unwrap();
        assert!(
            seen.iter()
                .all(|(m, b)| m == method && b.as_bytes() == body),
            "{close:?}: the body was not sent whole every time"
        );
    }
    // Invisible to health and metrics.
    assert!(target_available(&gw), "{close:?}: the target was ejected");
    assert_eq!(series(&gw, "rustygate_upstream_errors_total"), []);
    assert_eq!(series(&gw, "rustygate_upstream_retries_total"), []);
}

#[test]
fn get_on_a_reused_connection_closed_under_it_is_sent_again_on_a_fresh_one() {
    all_succeed_against_a_closing_upstream(Close::Fin, "GET", b"", 100);
}

#[test]
fn get_on_a_reused_connection_reset_under_it_is_sent_again_on_a_fresh_one() {
    all_succeed_against_a_closing_upstream(Close::Reset, "GET", b"", 100);
}

#[test]
fn idempotent_methods_with_a_buffered_body_are_sent_again_whole() {
    // `retries = 0` streams bodies (nothing to replay from), so these use the default
    // retries: what they change is only that the small body is buffered.
    let up = RawUpstream::start(Behaviour::one_per_connection(Close::Fin));
    let (gw, _dir) = gateway(&up.url(), STRICT_OUTLIER, "");
    let addr = gw.addr.to_string();
    for (i, method) in ["PUT", "DELETE", "OPTIONS", "HEAD"]
        .iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        let body: &[u8] = if *method == "PUT" { b"payload" } else { b"" };
        let (status, _) = http(&addr, method, "/x", &[], body).unwrap();
        assert_eq!(status, 200, "{method} #{i}");
    }
    assert!(RawUpstream::get(&up.dropped) >= 18);
    let seen = up.seen.lock().unwrap();
    assert!(
        seen.iter()
            .filter(|(m, _)| m == "PUT")
            .all(|(_, b)| b == "payload"),
        "{seen:?}"
    );
    assert!(target_available(&gw));
    assert_eq!(series(&gw, "rustygate_upstream_errors_total"), []);
    assert_eq!(series(&gw, "rustygate_upstream_retries_total"), []);
}

#[test]
fn an_announced_keep_alive_timeout_of_one_second_is_honoured() {
    // The upstream drops a request that comes after more than 1 s of idle; POSTs, so that a
    // stale connection would not be saved by sending again.
    let up = RawUpstream::start(Behaviour::idle_close(
        Duration::from_secs(1),
        Some("timeout=1"),
    ));
    let (gw, _dir) = gateway(&up.url(), STRICT_OUTLIER, "");
    let addr = gw.addr.to_string();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1200));
        }
        // A connection that is not pooled still delivers its response whole.
        let reply = http(&addr, "POST", "/x", &[], b"p").unwrap();
        assert_eq!(reply, (200, format!("{i}:0")), "POST #{i}");
    }
    assert_eq!(RawUpstream::get(&up.dropped), 0);
    assert_eq!(RawUpstream::get(&up.connections), 3);
}

#[test]
fn a_connection_is_still_reused_within_the_announced_keep_alive() {
    let up = RawUpstream::start(Behaviour::idle_close(
        Duration::from_secs(3),
        Some("timeout=3, max=100"),
    ));
    let (gw, _dir) = gateway(&up.url(), "", "");
    let addr = gw.addr.to_string();
    for i in 0..5 {
        // Time for the connection to go back to the pool (not observable from here).
        std::thread::sleep(Duration::from_millis(50));
        let (status, body) = http(&addr, "POST", "/x", &[], b"p").unwrap();
        assert_eq!(status, 200, "POST #{i}: {body}");
    }
    let conns = RawUpstream::get(&up.connections);
    assert!(
        conns < 5,
        "no connection was reused: {conns} for 5 requests"
    );
    assert_eq!(RawUpstream::get(&up.dropped), 0);
}

#[test]
fn the_default_idle_timeout_is_below_a_node_upstreams_keep_alive() {
    // Node.js closes connections idle for 5 s and says nothing about it in its responses.
    let up = RawUpstream::start(Behaviour::idle_close(Duration::from_secs(5), None));
    let (gw, _dir) = gateway(&up.url(), STRICT_OUTLIER, "");
    let addr = gw.addr.to_string();
    assert_eq!(http(&addr, "POST", "/x", &[], b"p").unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(5300));
    let (status, body) = http(&addr, "POST", "/x", &[], b"p").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(RawUpstream::get(&up.dropped), 0);

    let snap = gw.store.load();
    let idle = snap.upstreams[0].idle_timeout;
    assert!(
        idle < Duration::from_secs(5),
        "default idle_timeout {idle:?}"
    );
}

/// An upstream that writes more than its `Content-Length` after the body (here, a second,
/// forged response in the same write): the client gets the declared body only, and the
/// connection is not reused, so the extra bytes are never read as the next request's response.
/// The body arrives with its head, as a small one usually does (the path that takes it whole).
#[test]
fn bytes_past_the_declared_length_are_never_read_as_the_next_response() {
    const REPLY: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=60\r\n\r\nok\
        HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                // Every request on the connection gets the same over-long answer.
                let mut first = [0u8; 1];
                while matches!(s.read(&mut first), Ok(1)) {
                    if read_request(&mut s, first[0]).is_none() || s.write_all(REPLY).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (gw, _dir) = gateway(&url, "", "");
    let addr = gw.addr.to_string();
    for i in 0..3 {
        // Time for a reusable connection to go back to the pool.
        std::thread::sleep(Duration::from_millis(50));
        let (status, body) = http(&addr, "GET", "/x", &[], b"").unwrap();
        assert_eq!((status, body.as_str()), (200, "ok"), "request #{i}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "a connection with bytes left over was reused"
    );
}

/// A reload that removes an upstream closes the gateway's idle connections to it on every
/// worker at once, rather than at their `idle_timeout` (up to 365 days), and keeps those to the
/// upstreams it keeps (a reload does not flush pools needlessly).
#[test]
fn a_reload_closes_idle_connections_to_a_removed_upstream_and_keeps_the_others() {
    let never_closes = || Behaviour::idle_close(Duration::from_secs(3600), None);
    let (removed, kept) = (
        RawUpstream::start(never_closes()),
        RawUpstream::start(never_closes()),
    );
    let mut files = proxy_to(&[removed.url()], "idle_timeout = \"300s\"", "");
    files.push((
        "upstreams/kept.toml",
        format!(
            "[upstream.kept]\ntargets = [\"{}\"]\nidle_timeout = \"300s\"\n",
            kept.url()
        ),
    ));
    files.push((
        "routes/kept.toml",
        "[[route]]\nname = \"kept\"\nprefix = \"/kept\"\nupstream = \"kept\"\n".into(),
    ));
    // Two workers: each has its own pool.
    let gw = Gateway::start(&as_refs(&files));
    let addr = gw.addr.to_string();
    // Requests in parallel, so that each pool holds several connections.
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let path = if i % 2 == 0 { "/x" } else { "/kept/x" };
                    assert_eq!(http(&addr, "GET", path, &[], b"").map(|r| r.0), Some(200));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert!(wait_until(Duration::from_secs(10), || removed.open() >= 1
        && kept.open() >= 1));
    let kept_before = kept.open();
    let opened = RawUpstream::get(&removed.connections);

    std::fs::remove_file(gw.dir.join("upstreams/be.toml")).unwrap();
    gw.swap(&[(
        "routes/all.toml",
        "[[route]]\nname = \"all\"\nprefix = \"/\"\nrespond = { status = 200, body = \"v2\" }\n",
    )]);
    assert_eq!(
        http(&addr, "GET", "/x", &[], b"").map(|r| r.1),
        Some("v2".into())
    );
    assert!(
        wait_until(Duration::from_secs(10), || removed.open() == 0),
        "{} of {opened} connections to the removed upstream still open 10 s after the reload",
        removed.open()
    );
    assert_eq!(kept.open(), kept_before, "connections to the kept upstream");
    // And they are still used: no new connection for the next request.
    let kept_opened = RawUpstream::get(&kept.connections);
    assert_eq!(
        http(&addr, "GET", "/kept/x", &[], b"").map(|r| r.0),
        Some(200)
    );
    assert_eq!(RawUpstream::get(&kept.connections), kept_opened);
}
