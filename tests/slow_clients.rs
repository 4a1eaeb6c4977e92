//! Slow, idle, stalled and aborting peers (docs/security.md, "Slow clients", "Memory",
//! "Connections"): each is closed within its timeout + 1 s and gives back what it held. Raw
//! sockets on loopback, against the gateway in-process or the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rustygate::server::ServeOptions;

/// Reads until the peer closes (or `limit` passes): what arrived and when it ended.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// Reads one response with a `Content-Length` body from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    let head = read_head_response(s);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    head + String::from_utf8_lossy(&body).as_ref()
}

fn gateway(files: &[(&str, &str)], workers: usize) -> (Gateway, tempfile::TempDir) {
    let dir = repo(files);
    let gw = Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers,
            ..ServeOptions::default()
        },
    );
    (gw, dir)
}

/// `proxy_to` plus a gateway.toml.
fn with_gateway(
    mut files: Vec<(&'static str, String)>,
    gateway_toml: &str,
) -> Vec<(&'static str, String)> {
    files.push(("gateway.toml", gateway_toml.to_owned()));
    files
}

fn hello_route() -> (&'static str, &'static str) {
    (
        "routes/r.toml",
        "[[route]]\nname = \"hello\"\npath = \"/\"\nrespond = { status = 200, body = \"hi\" }\n",
    )
}

/// An upstream on 127.0.0.1:0 that runs `script` on each accepted connection (with its index),
/// each on its own thread.
fn scripted_upstream(script: fn(TcpStream, usize)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || script(s, i));
        }
    });
    addr
}

/// Reads a request head from an upstream connection; false when the peer closed first.
fn read_head(s: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

#[test]
fn slowloris_on_the_first_and_on_a_later_request_head_gets_408_and_close() {
    let (gw, _dir) = gateway(
        &[
            hello_route(),
            ("gateway.toml", "[limits]\nheader_timeout = \"1s\"\n"),
        ],
        1,
    );
    // First request: half a head, then silence.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n").unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 408"), "got {got:?}");
    assert_gateway_json_error(&got, "the request head was not received in time");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    // A later request on a kept-alive connection: one byte, then silence.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
    s.write_all(b"G").unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 408"), "got {got:?}");
    assert_gateway_json_error(&got, "the request head was not received in time");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    let m = scrape(&gw);
    assert_eq!(m["rustygate_client_timeouts_total{phase=\"header\"}"], 2.0);
}

#[test]
fn an_idle_keep_alive_connection_is_not_cut_by_the_header_timeout() {
    let (gw, _dir) = gateway(
        &[
            hello_route(),
            ("gateway.toml", "[limits]\nheader_timeout = \"1s\"\n"),
        ],
        1,
    );
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
    // Idle between requests is the keep-alive timeout's business (75 s), not the head's.
    std::thread::sleep(Duration::from_millis(2200));
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
}

/// A gateway with `keep_alive` and `header_timeout` as given (one worker).
fn gateway_with_keep_alive(
    keep_alive: Duration,
    header_timeout: &str,
) -> (Gateway, tempfile::TempDir) {
    let toml = format!("[limits]\nheader_timeout = \"{header_timeout}\"\n");
    let dir = repo(&[hello_route(), ("gateway.toml", &toml)]);
    let gw = Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers: 1,
            keep_alive,
            ..ServeOptions::default()
        },
    );
    (gw, dir)
}

fn get(s: &mut TcpStream) {
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert!(read_response(s).starts_with("HTTP/1.1 200"));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_time_and_a_busy_one_is_not() {
    let (gw, _dir) = gateway_with_keep_alive(Duration::from_secs(1), "10s");
    let mut idle = TcpStream::connect(gw.addr).unwrap();
    get(&mut idle);
    // Requests every 400 ms for 2.4 s: each one starts the idle time again.
    let mut busy = TcpStream::connect(gw.addr).unwrap();
    for _ in 0..6 {
        get(&mut busy);
        std::thread::sleep(Duration::from_millis(400));
    }
    get(&mut busy);
    // The idle connection was closed quietly (no 408: no head was under way) by then.
    let (got, took) = read_to_close(&mut idle, Duration::from_secs(5));
    assert_eq!(got, "");
    assert!(
        took < Duration::from_secs(1),
        "still open {took:?} after 2.8 s idle"
    );
    // And the busy one, once left alone, goes the same way about a second later.
    let (got, took) = read_to_close(&mut busy, Duration::from_secs(5));
    assert_eq!(got, "");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    let m = scrape(&gw);
    assert_eq!(m["rustygate_client_timeouts_total{phase=\"header\"}"], 0.0);
}

#[test]
fn a_head_begun_on_an_idle_connection_has_the_header_timeout_not_the_keep_alive() {
    // Keep-alive shorter than the header timeout: the head's first bytes end the idle wait.
    let (gw, _dir) = gateway_with_keep_alive(Duration::from_secs(1), "2s");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    get(&mut s);
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 408"), "got {got:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );

    // Keep-alive longer than the header timeout: the head is timed from its first bytes, however
    // far away the idle deadline is (1.5 s idle first: the connection's timer has fired once
    // since the last head, and must not have been moved out to the idle deadline).
    let (gw, _dir) = gateway_with_keep_alive(Duration::from_secs(30), "1s");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    get(&mut s);
    std::thread::sleep(Duration::from_millis(1500));
    s.write_all(b"G").unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 408"), "got {got:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
}

#[test]
fn stalled_uploads_get_408_replayable_streamed_and_chunked() {
    let echo = Backend::echo();
    let files = with_gateway(
        proxy_to(&[echo.url()], "", ""),
        "[limits]\nbody_idle_timeout = \"1s\"\n",
    );
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for (what, head) in [
        // PUT under the replay limit: read whole before it goes upstream.
        (
            "replayable",
            "PUT /x HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789",
        ),
        // POST: streamed to the upstream as it arrives.
        (
            "streamed",
            "POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789",
        ),
        (
            "chunked",
            "POST /x HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        ),
    ] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut first = [0u8; 12];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut first).unwrap();
        let answered = started.elapsed();
        assert_eq!(&first, b"HTTP/1.1 408", "{what}");
        assert!(
            answered >= Duration::from_millis(900) && answered < Duration::from_secs(2),
            "{what}: answered after {answered:?}"
        );
        // Then closed: the rest of the body may still come, so the connection cannot be
        // reused (actix lingers up to 1 s so that the 408 is not lost to a reset).
        let (_, took) = read_to_close(&mut s, Duration::from_secs(5));
        assert!(
            answered + took < Duration::from_secs(3),
            "{what}: closed after {took:?}"
        );
    }
    let m = scrape(&gw);
    assert_eq!(m["rustygate_client_timeouts_total{phase=\"body\"}"], 3.0);
}

/// POSTs a chunked body to `path` in `pieces` pieces `gap` apart, and reads the answer.
fn slow_upload(addr: SocketAddr, path: &str, pieces: usize, gap: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    for i in 0..pieces {
        if i > 0 {
            std::thread::sleep(gap);
        }
        // A client the gateway answered already may be gone: the answer is what counts.
        if s.write_all(format!("6\r\npiece{i}\r\n").as_bytes())
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    read_response(&mut s)
}

/// A client slow to upload, within the body idle timeout, is not the upstream's failure: the
/// attempt's `timeout` counts from when the upstream last had to take a piece of a streamed
/// body, or from its end. Before, it ran from the send: an upload longer than `timeout` got
/// 504 and counted towards ejecting the target, so a few slow clients took the only target
/// out for everyone. Where the exchange's own end (`total_timeout`) comes while the client is
/// still sending, the answer is 408 and the target is not blamed either.
#[test]
fn slow_uploads_neither_time_out_nor_eject_the_target() {
    let echo = Backend::echo();
    let files = [
        (
            "routes/r.toml",
            "[[route]]\nname = \"up\"\nprefix = \"/\"\nupstream = \"be\"\ntimeout = \"1s\"\n\n\
             [[route]]\nname = \"cut\"\nprefix = \"/cut\"\nupstream = \"be\"\ntimeout = \"1s\"\n\
             total_timeout = \"1s\"\n"
                .to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!(
                "[upstream.be]\ntargets = [\"{}\"]\noutlier = {{ consecutive_failures = 2 }}\n",
                echo.url()
            ),
        ),
    ];
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for _ in 0..3 {
        // 1.6 s of upload against a 1 s timeout.
        let answer = slow_upload(gw.addr, "/up", 5, Duration::from_millis(400));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("piece0piece1piece2piece3piece4"),
            "{answer}"
        );
    }
    for _ in 0..3 {
        let answer = slow_upload(gw.addr, "/cut", 3, Duration::from_millis(700));
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    // Not ejected: two failures in a row would have done it.
    let (status, body) = gw.get("/after");
    assert_eq!(status, 200, "{body}");
    let m = scrape(&gw);
    let errors: Vec<_> = m
        .iter()
        .filter(|(k, v)| k.starts_with("rustygate_upstream_errors_total") && **v != 0.0)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let healthy: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("rustygate_upstream_target_healthy"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(healthy, [1.0]);
    assert_eq!(m["rustygate_client_timeouts_total{phase=\"body\"}"], 3.0);
}

/// The other side of `slow_uploads_neither_time_out_nor_eject_the_target`: an upstream that
/// stops taking a body the client sends as fast as it can. Once the buffers on the way are
/// full, no piece moves for the route's `timeout`: 504, counted as the target's failure (the
/// client was not the slow one).
#[test]
fn an_upstream_that_stops_taking_the_body_times_out_at_the_timeout() {
    let upstream = scripted_upstream(|mut s, _| {
        let _ = read_head(&mut s);
        std::thread::sleep(Duration::from_secs(15));
    });
    let files = proxy_to(
        &[format!("http://{upstream}")],
        "",
        "timeout = \"1s\"\nmax_body_size = \"128MiB\"",
    );
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    // 64 MiB: more than the socket buffers on both hops and the gateway's channel hold.
    let len = 64 << 20;
    let writer = std::thread::spawn(move || {
        let head = format!("POST /up HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n");
        let _ = w.write_all(head.as_bytes());
        let piece = vec![b'a'; 64 * 1024];
        for _ in 0..len / piece.len() {
            if w.write_all(&piece).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut r = s;
    let answer = read_response(&mut r);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    drop(r);
    let _ = writer.join();
    let m = scrape(&gw);
    let timeouts: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rustygate_upstream_errors_total") && k.contains("timeout"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(timeouts, 1.0, "{m:?}");
}

/// An upstream that answers before it has read the body (413 at once): the client's connection
/// ends after that answer, and what the client still sends is never read as a request. Before,
/// the rest of a 100 KB body was taken for a new request head and answered with a second
/// response (414) after the one that said `Connection: close`.
#[test]
fn the_rest_of_a_body_the_upstream_did_not_wait_for_is_not_a_request() {
    let upstream = scripted_upstream(|mut s, _| {
        let _ = read_head(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!",
        );
        std::thread::sleep(Duration::from_millis(300));
    });
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The body, in a line of its own as long as a request line may not be.
    let _ = s.write_all(&[b'a'; 100_000]);
    let (answer, _) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
}

#[test]
fn a_stalled_upstream_body_aborts_the_client_and_the_log_says_why() {
    let upstream = scripted_upstream(|mut s, _| {
        if read_head(&mut s) {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
            std::thread::sleep(Duration::from_secs(10));
        }
    });
    let files = proxy_to(&[format!("http://{upstream}")], "", "read_timeout = \"1s\"");
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let mut s = TcpStream::connect(&gw.listen).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (got, took) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 200"), "got {got:?}");
    assert!(
        got.ends_with("0123456789"),
        "the first bytes are passed on: {got:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "aborted after {took:?}"
    );
    let logged = wait_until(Duration::from_secs(3), || {
        gw.logs.lock().unwrap().lines().any(|l| {
            l.contains("rustygate::access")
                && l.contains("\"error\":\"upstream_read_timeout\"")
                && l.contains(&format!("\"upstream_target\":\"http://{upstream}\""))
                && l.contains("\"completed\":false")
        })
    });
    assert!(logged, "access log:\n{}", gw.logs.lock().unwrap());
}

/// An upstream that sends its head and part of its body, then closes: the client gets the head
/// and the bytes that came, then the connection ends (a response cut short, not an empty
/// reply), every time.
#[test]
fn a_response_cut_right_after_its_head_reaches_the_client_as_far_as_it_came() {
    let upstream = scripted_upstream(|mut s, i| {
        if read_head(&mut s) {
            let cut: &[u8] = if i % 2 == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
            } else {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
            };
            let _ = s.write_all(cut);
        }
    });
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for round in 0..20 {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
        assert!(got.starts_with("HTTP/1.1 200"), "round {round}: {got:?}");
        assert!(got.contains("0123456789"), "round {round}: {got:?}");
    }
}

static STALLED_CLOSED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn clients_that_go_away_from_a_stalled_upstream_give_their_places_back() {
    // The first two upstream connections stall (and count when the gateway closes them); the
    // next ones answer at once.
    let upstream = scripted_upstream(|mut s, i| {
        if !read_head(&mut s) {
            return;
        }
        if i < 2 {
            let mut buf = [0u8; 64];
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            STALLED_CLOSED.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let files = proxy_to(
        &[format!("http://{upstream}")],
        "circuit_breaker = { max_requests = 2 }",
        "",
    );
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let mut clients: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 2.0
    }));
    // Both places are taken: a third request is turned away.
    assert_eq!(gw.get("/").0, 503);
    // One client closes its side (FIN), the other closes outright.
    clients[0].shutdown(std::net::Shutdown::Write).unwrap();
    clients.truncate(1);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || STALLED_CLOSED
            .load(Ordering::SeqCst)
            == 2),
        "upstream connections still open after {:?}",
        started.elapsed()
    );
    assert!(wait_until(Duration::from_secs(1), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 0.0
    }));
    assert_eq!(gw.get("/"), (200, "ok".to_owned()));
}

static SENDING_CLOSED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn clients_that_take_nothing_of_their_response_are_cut_at_the_send_timeout() {
    // The first two upstream connections send an endless body (and count when the gateway
    // closes them); the next ones answer at once.
    let upstream = scripted_upstream(|mut s, i| {
        if !read_head(&mut s) {
            return;
        }
        if i < 2 {
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let started = Instant::now();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n");
            let chunk = [b'x'; 64 * 1024];
            while started.elapsed() < Duration::from_secs(20) && s.write_all(&chunk).is_ok() {}
            SENDING_CLOSED.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let files = with_gateway(
        proxy_to(
            &[format!("http://{upstream}")],
            "circuit_breaker = { max_requests = 2 }",
            "read_timeout = \"30s\"",
        ),
        "[limits]\nsend_timeout = \"1s\"\n",
    );
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    // Two clients that ask and never read.
    let _clients: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 2.0
    }));
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || SENDING_CLOSED
            .load(Ordering::SeqCst)
            == 2),
        "upstream connections still open after {:?}",
        started.elapsed()
    );
    assert!(wait_until(Duration::from_secs(1), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 0.0
    }));
    let m = scrape(&gw);
    assert_eq!(m["rustygate_client_timeouts_total{phase=\"send\"}"], 2.0);
    assert_eq!(gw.get("/"), (200, "ok".to_owned()));
}

#[test]
fn a_send_timeout_under_a_second_is_refused() {
    let dir = repo(&[
        hello_route(),
        ("gateway.toml", "[limits]\nsend_timeout = \"100ms\"\n"),
    ]);
    let compiled = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
    let err = compiled
        .diagnostics
        .iter()
        .find(|d| d.message.contains("send_timeout"))
        .expect("a diagnostic for send_timeout");
    assert_eq!(err.code, "invalid-duration");
    assert!(compiled.snapshot.is_none(), "not served");
}

/// The admin listener takes webhooks from the internet: a body that never ends is cut at the
/// admin request timeout, and a flood of them leaves the proxy listener serving.
#[test]
fn admin_requests_whose_body_never_ends_are_cut_and_the_proxy_serves_on() {
    let dir = repo(&[hello_route()]);
    let compiled = rustygate::compile::compile_dir(dir.path(), &Default::default()).unwrap();
    let control = rustygate::server::Control {
        webhook_secret: Some("hook-secret".into()),
        ..Default::default()
    };
    let opts = ServeOptions {
        workers: 1,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        admin_request_timeout: Duration::from_secs(1),
        // All 40 come from 127.0.0.1: more than one address may hold by default.
        admin_connections_per_client: 64,
        ..ServeOptions::default()
    };
    let gw = Gateway::serve_with(
        dir.path(),
        std::sync::Arc::new(rustygate::snapshot::SnapshotStore::new(
            compiled.snapshot.unwrap(),
        )),
        opts,
        control,
    );
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(gw.admin_addr).unwrap();
            s.write_all(
                b"POST /hooks/github HTTP/1.1\r\nHost: a\r\nX-GitHub-Event: push\r\n\
                  X-Hub-Signature-256: sha256=00\r\nContent-Length: 100000\r\n\r\n{",
            )
            .unwrap();
            s
        })
        .collect();
    assert_eq!(gw.get("/"), (200, "hi".to_owned()));
    for s in &mut slow {
        let (resp, _) = read_to_close(s, Duration::from_secs(5));
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = http(&gw.admin_addr.to_string(), "GET", "/healthz", &[], b"").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[test]
fn a_slow_replayable_body_holds_no_place_under_the_upstreams_limit() {
    let echo = Backend::echo();
    let files = proxy_to(&[echo.url()], "circuit_breaker = { max_requests = 1 }", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.write_all(b"PUT /a HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 2.0
    }));
    let (status, _) = gw.get("/b");
    assert_eq!(status, 200, "two slow uploads must not close the upstream");
    // And the slow ones still go through once their bodies arrive.
    for s in &mut slow {
        s.write_all(b"hello").unwrap();
        assert!(read_response(s).starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn bodies_held_for_retries_are_capped_per_worker() {
    let echo = Backend::echo();
    let files = with_gateway(
        proxy_to(&[echo.url()], "", ""),
        "[limits]\nmax_buffered_bodies = \"100B\"\n",
    );
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let mut held = TcpStream::connect(gw.addr).unwrap();
    held.write_all(b"PUT /a HTTP/1.1\r\nHost: test\r\nContent-Length: 80\r\n\r\n")
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&gw)["rustygate_in_flight_requests"] == 1.0
    }));
    let body = [b'x'; 80];
    let (status, text) = http(&gw.addr.to_string(), "PUT", "/b", &[], &body).unwrap();
    assert_eq!(status, 503, "{text}");
    // A streamed body (POST) is not held, so it is not refused.
    assert_eq!(
        http(&gw.addr.to_string(), "POST", "/c", &[], &body)
            .unwrap()
            .0,
        200
    );
    held.write_all(&body).unwrap();
    assert!(read_response(&mut held).starts_with("HTTP/1.1 200"));
    // Given back once the first request ended.
    assert_eq!(
        http(&gw.addr.to_string(), "PUT", "/d", &[], &body)
            .unwrap()
            .0,
        200
    );
}

/// Opens a connection from `source` (any 127.0.0.0/8 address) and proves it is served.
fn served_from(source: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((source, 0))).unwrap();
        sock.connect(to).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    let mut s = stream;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    let mut rest = [0u8; 512];
    let _ = s.read(&mut rest);
    buf.starts_with(b"HTTP/1.1 200").then_some(s)
}

#[test]
fn connection_limits_refuse_early_and_count() {
    let (gw, _dir) = gateway(
        &[
            hello_route(),
            (
                "gateway.toml",
                "[limits]\nmax_connections = 3\nmax_connections_per_ip = 2\n",
            ),
        ],
        2,
    );
    let a1 = served_from([127, 0, 0, 1], gw.addr).expect("first from .1");
    let a2 = served_from([127, 0, 0, 1], gw.addr).expect("second from .1");
    assert!(
        served_from([127, 0, 0, 1], gw.addr).is_none(),
        "third from .1 is over its cap"
    );
    let b1 = served_from([127, 0, 0, 2], gw.addr).expect("first from .2");
    assert!(
        served_from([127, 0, 0, 2], gw.addr).is_none(),
        "over max_connections"
    );
    let m = scrape(&gw);
    assert_eq!(m["rustygate_client_connections"], 3.0);
    assert_eq!(
        m["rustygate_client_connections_refused_total{limit=\"max_connections_per_ip\"}"],
        1.0
    );
    assert_eq!(
        m["rustygate_client_connections_refused_total{limit=\"max_connections\"}"],
        1.0
    );
    drop(a1);
    assert!(wait_until(Duration::from_secs(2), || {
        scrape(&gw)["rustygate_client_connections"] == 2.0
    }));
    let a3 = served_from([127, 0, 0, 1], gw.addr).expect("a place was given back");
    drop((a2, a3, b1));
}

#[test]
fn memory_follows_the_bytes_received_not_the_limits() {
    let echo = Backend::echo();
    let files = proxy_to(
        &[echo.url()],
        "retries = { replay_body_limit = \"10MiB\" }",
        "max_body_size = \"100MiB\"",
    );
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let pid = gw.child.id();
    // Warm up: the first requests allocate the worker's pools and buffers.
    for _ in 0..5 {
        assert_eq!(gw.get("/warm").map(|r| r.0), Some(200));
    }
    let before = rss(pid);
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(&gw.listen).unwrap();
        s.write_all(b"PUT /a HTTP/1.1\r\nHost: test\r\nContent-Length: 16\r\n\r\nabc")
            .unwrap();
        conns.push(s);
    }
    assert!(wait_until(Duration::from_secs(10), || {
        gw.metric("rustygate_in_flight_requests") == Some(300.0)
    }));
    let grown = rss(pid).saturating_sub(before);
    eprintln!("RSS grew by {} KiB for 300 slow PUTs", grown / 1024);
    assert!(grown < 30 << 20, "RSS grew by {} MiB", grown >> 20);
    for s in &mut conns {
        s.write_all(b"defghijklmnop").unwrap();
    }
    for s in &mut conns {
        assert!(read_response(s).starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn responses_written_in_two_pieces_do_not_stall_a_kept_alive_client() {
    // Like gunicorn: the head in one write, the body 5 ms later in another.
    let upstream = scripted_upstream(|mut s, _| {
        s.set_nodelay(true).unwrap();
        while read_head(&mut s) {
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                .is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            if s.write_all(b"hello").is_err() {
                return;
            }
        }
    });
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    // Like python's http.client or curl: each request leaves in one write, no TCP_NODELAY.
    let mut client = TcpStream::connect(gw.addr).unwrap();
    let mut get = || {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        read_response(&mut client)
    };
    assert!(get().ends_with("\r\n\r\nhello"));
    let started = Instant::now();
    for _ in 0..50 {
        assert!(get().ends_with("\r\n\r\nhello"));
    }
    let took = started.elapsed();
    eprintln!("50 kept-alive requests: {took:?}");
    // 50 × 5 ms of upstream pause is 0.25 s; a 40 ms delayed-ACK stall each would be 2 s+.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

#[test]
fn trace_and_connect_need_a_route_that_lists_them() {
    let (gw, _dir) = gateway(
        &[(
            "routes/r.toml",
            "[[route]]\nname = \"any\"\nprefix = \"/\"\nrespond = { status = 200, body = \"any\" }\n\n\
             [[route]]\nname = \"traced\"\npath = \"/trace\"\nmethods = [\"TRACE\"]\n\
             respond = { status = 200, body = \"traced\" }\n",
        )],
        1,
    );
    let addr = gw.addr.to_string();
    let (status, _) = http(&addr, "TRACE", "/", &[], b"").unwrap();
    assert_eq!(status, 405);
    let (status, _) = http(&addr, "CONNECT", "/", &[], b"").unwrap();
    assert_eq!(status, 405);
    // In any case: upstreams that upper-case the method would take these for TRACE, CONNECT.
    for m in ["trace", "Connect"] {
        assert_eq!(http(&addr, m, "/", &[], b"").unwrap().0, 405, "{m}");
    }
    assert_eq!(
        http(&addr, "trace", "/trace", &[], b"").unwrap(),
        (200, "traced".to_owned())
    );
    assert_eq!(
        http(&addr, "TRACE", "/trace", &[], b"").unwrap(),
        (200, "traced".to_owned())
    );
    assert_eq!(http(&addr, "GET", "/", &[], b"").unwrap().0, 200);
}

#[test]
fn a_request_target_over_16_kib_gets_414_and_the_connection_serves_on() {
    let (gw, _dir) = gateway(&[hello_route()], 1);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    // The route is `/`: the query makes the length.
    let long = format!("/?q={}", "b".repeat(16 * 1024));
    let path = format!("/{}", "a".repeat(20 * 1024));
    for (target, want) in [(&long[..16 * 1024], "200"), (&long, "414"), (&path, "414")] {
        write!(s, "GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // One response: its head, then its JSON or text body.
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{}: {text}",
            target.len()
        );
        // What is left of the body, so that the next response starts clean.
        let len: usize = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let head = text.find("\r\n\r\n").unwrap() + 4;
        let mut have = got.len() - head;
        while have < len {
            have += s.read(&mut buf).unwrap();
        }
    }
    // Past what the `http` crate takes (65,534 bytes) actix-http answered a bare 400: the
    // listener answers 414 first, in one write or cut across writes, and closes.
    for (target, pieces) in [(70_000, 1), (100_000, 7)] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        let req = format!("GET /?q={} HTTP/1.1\r\nHost: a\r\n\r\n", "c".repeat(target));
        let step = req.len().div_ceil(pieces);
        for chunk in req.as_bytes().chunks(step) {
            // The gateway may close before the last piece: a refused write is fine.
            if s.write_all(chunk).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
        assert!(got.starts_with("HTTP/1.1 414"), "{target}: {got:?}");
        assert_gateway_json_error(&got, "the request target is too long");
    }
}

/// `answer` is the gateway's own JSON error with `message`, its request id also in
/// `x-request-id`, and `connection: close`.
fn assert_gateway_json_error(answer: &str, message: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    assert!(
        head.contains("content-type: application/json"),
        "{answer:?}"
    );
    assert!(head.contains("connection: close"), "{answer:?}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no x-request-id: {answer:?}"));
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["error"], message, "{answer:?}");
    assert_eq!(json["request_id"], id, "{answer:?}");
}

#[test]
fn a_host_that_is_not_host_and_port_gets_400() {
    let (gw, _dir) = gateway(&[hello_route()], 1);
    for bad in [
        "evil.com/x",
        "user@evil.com",
        "a b",
        "evil.com?x",
        "evil.com:80x",
        "evil.com:99999",
    ] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
        assert!(got.starts_with("HTTP/1.1 400"), "Host {bad:?}: {got:?}");
    }
    for good in ["example.com", "example.com:8080", "[::1]:8080", "127.0.0.1"] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {good}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
        assert!(got.starts_with("HTTP/1.1 200"), "Host {good:?}: {got:?}");
    }
}

/// An upstream that answers each request on its connection after 30 ms, with its path as the
/// body (and only the head for HEAD), so that a client's pipelined requests pile up meanwhile.
fn slow_echo_upstream() -> SocketAddr {
    scripted_upstream(|mut s, _| {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let mut line = head.split(' ');
            let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
            std::thread::sleep(Duration::from_millis(30));
            let body = if method == "HEAD" { "" } else { path };
            let out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                path.len()
            );
            if s.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// Reads a response head (all of the response to a HEAD) from a kept-alive connection.
fn read_head_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head");
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pipelined_requests_around_a_head_each_get_their_own_response() {
    let upstream = slow_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = |p: &str| format!("HEAD {p} HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    let check_get = |s: &mut TcpStream, p: &str| {
        let r = read_response(s);
        assert!(r.starts_with("HTTP/1.1 200"), "{p}: {r:?}");
        assert!(r.ends_with(&format!("\r\n\r\n{p}")), "{p}: {r:?}");
    };
    let check_head = |s: &mut TcpStream, p: &str| {
        let r = read_head_response(s);
        assert!(r.starts_with("HTTP/1.1 200"), "{p}: {r:?}");
        assert!(
            r.to_ascii_lowercase()
                .contains(&format!("content-length: {}\r\n", p.len())),
            "{p}: {r:?}"
        );
    };
    // All in one write: a GET, a HEAD behind it, a GET behind that.
    s.write_all(
        [get("/one"), head("/two-"), get("/three")]
            .concat()
            .as_bytes(),
    )
    .unwrap();
    check_get(&mut s, "/one");
    check_head(&mut s, "/two-");
    check_get(&mut s, "/three");
    // A HEAD first.
    s.write_all([head("/four"), get("/five-")].concat().as_bytes())
        .unwrap();
    check_head(&mut s, "/four");
    check_get(&mut s, "/five-");
    // The same sent piece by piece while the first is still at the upstream.
    for (i, r) in [get("/six"), head("/seven"), get("/eight-")]
        .iter()
        .enumerate()
    {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        s.write_all(r.as_bytes()).unwrap();
    }
    check_get(&mut s, "/six");
    check_head(&mut s, "/seven");
    check_get(&mut s, "/eight-");
    // An upgrade to something else than WebSocket is a plain request: a HEAD behind it waits
    // for it too.
    s.write_all(
        [
            "GET /nine HTTP/1.1\r\nHost: t\r\nUpgrade: foo\r\n\r\n".to_owned(),
            head("/ten-"),
            get("/eleven"),
        ]
        .concat()
        .as_bytes(),
    )
    .unwrap();
    check_get(&mut s, "/nine");
    check_head(&mut s, "/ten-");
    check_get(&mut s, "/eleven");
}

/// A request head with a line ending in a bare line feed is refused (400, close), in one read
/// or cut across reads, and never reaches the upstream: proxies and servers split such heads
/// differently (request smuggling).
#[test]
fn a_head_line_without_its_carriage_return_gets_400_and_close() {
    let upstream = slow_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for pieces in [
        &[&b"GET /a HTTP/1.1\nHost: t\n\n"[..]][..],
        &[b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: 1\n\r\n"],
        &[b"GET /a HTTP/1.1\r\nHo", b"st: t\n\r\n"],
        // Pipelined behind a good request: that one is answered, then the connection ends.
        &[b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\nHost: t\n\n"],
    ] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            s.write_all(p).unwrap();
        }
        let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
        let last = got.rfind("HTTP/1.1 ").unwrap_or(0);
        assert!(got[last..].starts_with("HTTP/1.1 400"), "{got:?}");
        assert_gateway_json_error(
            &got[last..],
            "a line of the request head ends without a carriage return",
        );
        assert!(
            !got.contains("\r\n\r\n/a") && !got.contains("/b"),
            "{got:?}"
        );
    }
    assert_eq!(gw.get("/fine").0, 200);
}

/// Sends `pieces` on a new connection to `gw`, each a read of its own (50 ms apart).
fn send_in_pieces(gw: &Gateway, pieces: &[&[u8]]) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_nodelay(true).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        s.write_all(p).unwrap();
    }
    s
}

/// The requests that come in the same read as the end of a head cut across reads are checked
/// and held like those behind a head that came whole: each pipelined request gets its own
/// response, a bare line feed or a malformed chunk in them gets 400, and a head cut again is
/// put together again. They went to the parser unchecked: a valid request got 400 when its
/// last line feed came alone, a bare-LF head and a bad chunk reached the upstream, and a HEAD
/// lost the response before it.
#[test]
fn requests_behind_a_head_cut_across_reads_are_checked_like_any_other() {
    let upstream = slow_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let get_ok = |s: &mut TcpStream, p: &str| {
        let r = read_response(s);
        assert!(r.starts_with("HTTP/1.1 200"), "{p}: {r:?}");
        assert!(r.ends_with(&format!("\r\n\r\n{p}")), "{p}: {r:?}");
    };
    let cut: &[u8] = b"GET /a HT";
    let rest = "TP/1.1\r\nHost: t\r\n\r\n";

    // A valid request behind it, its own head cut before its last line feed.
    let second = format!("{rest}GET /b HTTP/1.1\r\nHost: t\r\n\r");
    let mut s = send_in_pieces(&gw, &[cut, second.as_bytes(), b"\n"]);
    get_ok(&mut s, "/a");
    get_ok(&mut s, "/b");

    // A HEAD and a GET behind it: each its own response.
    let more = format!(
        "{rest}HEAD /two- HTTP/1.1\r\nHost: t\r\n\r\nGET /three HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    let mut s = send_in_pieces(&gw, &[cut, more.as_bytes()]);
    get_ok(&mut s, "/a");
    let r = read_head_response(&mut s);
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(
        r.to_ascii_lowercase().contains("content-length: 5\r\n"),
        "{r:?}"
    );
    get_ok(&mut s, "/three");

    // A head with bare line feeds behind it: 400 and close, and it never reaches the upstream.
    let bare = format!("{rest}GET /bare HTTP/1.1\nHost: t\n\n");
    let mut s = send_in_pieces(&gw, &[cut, bare.as_bytes()]);
    get_ok(&mut s, "/a");
    let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(got.contains("without a carriage return"), "{got:?}");
    assert!(!got.contains("/bare"), "{got:?}");

    // A malformed chunked body behind it: 400 and close.
    let upstream = body_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let chunked = format!(
        "{rest}POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;\x01=1\r\nhello\r\n0\r\n\r\n"
    );
    let mut s = send_in_pieces(&gw, &[cut, chunked.as_bytes()]);
    let r = read_response(&mut s);
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("/a 0"),
        "{r:?}"
    );
    let (got, _) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(got.contains("chunked"), "{got:?}");
    assert_eq!(gw.get("/fine").0, 200);
}

/// Sends a GET with `fields` on a new connection, whole or cut across two reads at `cut`, with
/// a GET pipelined behind it; checks that both are answered as plain requests (no
/// `connection:` in the responses) and that the connection then serves a third.
fn served_as_plain_request(gw: &Gateway, fields: &str, cut: Option<usize>) {
    let get_ok = |s: &mut TcpStream, p: &str| {
        let r = read_response(s);
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "{fields:?} {cut:?} {p}: {r:?}"
        );
        assert!(
            r.ends_with(&format!("\r\n\r\n{p}")),
            "{fields:?} {cut:?} {p}: {r:?}"
        );
        assert!(
            !r.to_ascii_lowercase().contains("connection:"),
            "{fields:?} {cut:?} {p}: {r:?}"
        );
    };
    let head = format!("GET /a HTTP/1.1\r\nHost: t\r\n{fields}\r\n");
    let all = format!("{head}GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    let cut = cut.map(|c| c.min(head.len() - 3));
    let mut s = match cut {
        Some(c) => send_in_pieces(gw, &[&all.as_bytes()[..c], &all.as_bytes()[c..]]),
        None => send_in_pieces(gw, &[all.as_bytes()]),
    };
    get_ok(&mut s, "/a");
    get_ok(&mut s, "/b");
    s.write_all(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    get_ok(&mut s, "/c");
}

/// A head cut across reads with an `Upgrade` other than WebSocket (`h2c`, `foo`) is served as
/// a plain request, like one that came whole: its response does not say `connection: upgrade`,
/// the connection stays open and the requests pipelined behind it are answered. Its first
/// pieces went to actix-http as they came, before the `Upgrade` field was seen: it answered
/// `connection: upgrade` and closed, and the request behind it was lost.
#[test]
fn an_upgrade_other_than_websocket_cut_across_reads_is_a_plain_request() {
    let upstream = slow_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for fields in [
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
        "Upgrade: foo\r\nConnection: upgrade\r\n",
    ] {
        // Cut in the request line, and after the `Upgrade` and `Connection` fields.
        for cut in [None, Some(9), Some(usize::MAX)] {
            served_as_plain_request(&gw, fields, cut);
        }
    }
}

/// `Connection: upgrade` without an `Upgrade` field is an ordinary request, whole or cut
/// across reads: the connection stays open for the requests behind it (nginx keeps it too).
/// actix-http took it for an upgrade: it answered `connection: upgrade` and closed, and the
/// pipelined request was lost.
#[test]
fn connection_upgrade_without_an_upgrade_field_keeps_the_connection() {
    let upstream = slow_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    for fields in [
        "Connection: upgrade\r\n",
        "Connection: keep-alive, Upgrade\r\nX-A: b\r\n",
        "connection: keep-alive\r\nCONNECTION: UPGRADE\r\n",
    ] {
        for cut in [None, Some(9), Some(usize::MAX)] {
            served_as_plain_request(&gw, fields, cut);
        }
    }
}

/// What an upstream has read from its connection and not used yet.
struct Received {
    s: TcpStream,
    pending: Vec<u8>,
}

impl Received {
    /// Reads until at least `n` bytes are pending; false when the peer closed first.
    fn fill(&mut self, n: usize) -> bool {
        let mut buf = [0u8; 16384];
        while self.pending.len() < n {
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(k) => self.pending.extend_from_slice(&buf[..k]),
            }
        }
        true
    }

    /// The next `n` bytes; `None` when the peer closed first.
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        self.fill(n).then(|| self.pending.drain(..n).collect())
    }

    /// The bytes up to the next `end` (taken with it, returned without it).
    fn until(&mut self, end: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = self.pending.windows(end.len()).position(|w| w == end) {
                let mut line = self.take(at + end.len())?;
                line.truncate(at);
                return Some(line);
            }
            if !self.fill(self.pending.len() + 1) {
                return None;
            }
        }
    }
}

/// An upstream that reads each request on its connection with its body (`Content-Length` or
/// chunked) and answers after 30 ms with `{path} {body bytes}` as the body.
fn body_echo_upstream() -> SocketAddr {
    scripted_upstream(|s, _| {
        let mut r = Received {
            s,
            pending: Vec::new(),
        };
        while let Some(head) = r.until(b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            let mut body = 0;
            if let Some(n) = length {
                let Some(got) = r.take(n) else { return };
                body = got.len();
            } else if head.contains("transfer-encoding: chunked") {
                loop {
                    let Some(line) = r.until(b"\r\n") else { return };
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let size =
                        usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
                    let Some(_) = r.take(size + 2) else { return };
                    body += size;
                    if size == 0 {
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(30));
            let text = format!("{path} {body}");
            let out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if r.s.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn pipelined_requests_behind_requests_with_bodies_each_get_their_own_response() {
    let upstream = body_echo_upstream();
    let files = proxy_to(&[format!("http://{upstream}")], "", "");
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let big = "a".repeat(70_000);
    let chunked = |p: &str, body: &str| {
        format!(
            "POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    let chunked_head =
        |p: &str| format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunked_rest = |body: &str| format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let sized_head =
        |p: &str, n: usize| format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n");
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: t\r\n\r\n");
    let last = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    // Each case: what is written (one write per piece, 20 ms apart), then the answers due, in
    // order; the last request says `Connection: close`, which only its own response may carry.
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "a chunked body and a request behind it in one write",
            vec![[chunked("/one", "hello"), last("/two")].concat()],
            vec!["/one 5", "/two 0"],
        ),
        (
            "a chunked head, then its body with a request behind it",
            vec![
                chunked_head("/one"),
                [chunked_rest(&big), last("/two")].concat(),
            ],
            vec!["/one 70000", "/two 0"],
        ),
        (
            "a sized head, then its body with a request behind it",
            vec![
                sized_head("/one", big.len()),
                [big.clone(), last("/two")].concat(),
            ],
            vec!["/one 70000", "/two 0"],
        ),
        (
            "a 20 KiB head cut across writes, then its body with a request behind it",
            {
                let head = format!(
                    "POST /one HTTP/1.1\r\nHost: t\r\ncookie: {}\r\nContent-Length: 5\r\n\r\n",
                    "c".repeat(20 * 1024)
                );
                let mut pieces: Vec<String> = head
                    .as_bytes()
                    .chunks(4096)
                    .map(|c| String::from_utf8(c.to_vec()).unwrap())
                    .collect();
                pieces.push(["hello".to_owned(), last("/two")].concat());
                pieces
            },
            vec!["/one 5", "/two 0"],
        ),
        (
            "a sized body cut across writes, a request behind it",
            vec![
                [sized_head("/one", big.len()), big[..30_000].to_owned()].concat(),
                [big[30_000..].to_owned(), last("/two")].concat(),
            ],
            vec!["/one 70000", "/two 0"],
        ),
        (
            "bodies and bodyless requests mixed, all behind a slow first",
            vec![
                chunked_head("/one"),
                [
                    chunked_rest(&big),
                    get("/two"),
                    sized_head("/three", 5),
                    "hello".to_owned(),
                    chunked("/four", &big),
                    last("/five"),
                ]
                .concat(),
            ],
            vec!["/one 70000", "/two 0", "/three 5", "/four 70000", "/five 0"],
        ),
    ];
    for (case, writes, answers) in cases {
        let answers: Vec<String> = answers.iter().map(|a| format!("200 {a}")).collect();
        expect_answers(&mut write_apart(gw.addr, &writes), case, &answers);
    }
}

/// Connects and writes each piece, 20 ms apart.
fn write_apart(addr: SocketAddr, writes: &[String]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    for (i, w) in writes.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        s.write_all(w.as_bytes()).unwrap();
    }
    s
}

/// A request with a `Content-Length` body.
fn sized(m: &str, p: &str, body: &str) -> String {
    format!(
        "{m} {p} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A GET that ends its connection.
fn last(p: &str) -> String {
    format!("GET {p} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
}

/// Reads the answers due, in order: each a status, then optionally a space and the whole body.
/// Only the last one may say `Connection: close`, and nothing may come after it.
fn expect_answers(s: &mut TcpStream, case: &str, answers: &[String]) {
    for (i, want) in answers.iter().enumerate() {
        let r = read_response(s);
        let (status, body) = want.split_once(' ').unwrap_or((want, ""));
        assert!(
            r.starts_with(&format!("HTTP/1.1 {status} ")),
            "{case}: {want}: {r:?}"
        );
        if !body.is_empty() {
            assert!(
                r.ends_with(&format!("\r\n\r\n{body}")),
                "{case}: {want}: {r:?}"
            );
        }
        let closes = r.to_ascii_lowercase().contains("\r\nconnection: close\r\n");
        assert_eq!(closes, i + 1 == answers.len(), "{case}: {want}: {r:?}");
    }
    let (rest, _) = read_to_close(s, Duration::from_secs(5));
    assert_eq!(rest, "", "{case}: nothing after the last response");
}

/// Answers the gateway gives without forwarding (404, 405) read a small sized body and keep
/// the connection for the requests behind it, mixed with forwarded requests with bodies. A
/// declared body over 64 KiB, one that stalls or one whose client goes away is not waited for
/// long: the answer closes the connection, as does one to a request that asked `Expect`.
#[test]
fn answers_given_without_forwarding_read_a_small_body_and_keep_the_connection() {
    let upstream = body_echo_upstream();
    let files = vec![
        (
            "routes/api.toml",
            "[[route]]\nname = \"api\"\nprefix = \"/api\"\nmethods = [\"GET\", \"POST\"]\nupstream = \"be\"\n"
                .to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"http://{upstream}\"]\n"),
        ),
    ];
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let at_limit = "b".repeat(64 * 1024);
    let mut mixed = Vec::new();
    let mut mixed_answers = Vec::new();
    for i in 0..10 {
        mixed.push(sized("POST", &format!("/nope/{i}"), &"x".repeat(100 * i)));
        mixed_answers.push("404".to_owned());
        mixed.push(sized("POST", &format!("/api/{i}"), &"y".repeat(1000 * i)));
        mixed_answers.push(format!("200 /api/{i} {}", 1000 * i));
    }
    mixed.push(last("/api/end"));
    mixed_answers.push("200 /api/end 0".to_owned());
    // Each case: what is written (one write per piece, 20 ms apart), then the answers due, in
    // order ("404", or "200 " and the upstream's body); only the last may close.
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "a 404 with a body, a request behind it in the same write",
            vec![[sized("POST", "/nope", "hello"), last("/api/two")].concat()],
            vec!["404".into(), "200 /api/two 0".into()],
        ),
        (
            "a 405 whose body comes in two writes",
            vec![
                sized("PUT", "/api/one", &"z".repeat(2048))[..100].to_owned(),
                [
                    sized("PUT", "/api/one", &"z".repeat(2048))[100..].to_owned(),
                    last("/api/two"),
                ]
                .concat(),
            ],
            vec!["405".into(), "200 /api/two 0".into()],
        ),
        (
            "a 404 with a body of exactly 64 KiB",
            vec![[sized("POST", "/nope", &at_limit), last("/api/two")].concat()],
            vec!["404".into(), "200 /api/two 0".into()],
        ),
        (
            "404s and forwarded requests with bodies, alternating, in one write",
            vec![mixed.concat()],
            mixed_answers,
        ),
    ];
    for (case, writes, answers) in cases {
        expect_answers(&mut write_apart(gw.addr, &writes), case, &answers);
    }

    // Answers that close: (case, what is written, then whether the write side shuts, and how
    // long the answer may take at most).
    let over = "POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 65537\r\n\r\nabc".to_owned();
    let stalled = "POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc".to_owned();
    let expect =
        "POST /nope HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            .to_owned();
    let absolute = "POST http://t/nope HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /api/x HTTP/1.1\r\nHost: t\r\n\r\n".to_owned();
    let closing = [
        ("a declared body over 64 KiB", over, false, 1.5),
        (
            "a 400 (its body and what follows are not read)",
            absolute,
            false,
            1.5,
        ),
        ("a body that stalls", stalled.clone(), false, 4.0),
        ("a client that stops sending", stalled, true, 1.5),
        ("Expect: 100-continue", expect, false, 1.5),
    ];
    for (case, write, shut, within) in closing {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.write_all(write.as_bytes()).unwrap();
        if shut {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let (out, took) = read_to_close(&mut s, Duration::from_secs(10));
        assert!(
            out.starts_with("HTTP/1.1 404 ") || out.starts_with("HTTP/1.1 400 "),
            "{case}: {out:?}"
        );
        assert!(
            out.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n")
                || shut,
            "{case}: {out:?}"
        );
        assert!(!out.contains("100 Continue"), "{case}: {out:?}");
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{case}: {out:?}");
        assert!(took.as_secs_f64() < within, "{case}: took {took:?}");
    }
    // The worker is still there for the next client.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(last("/api/after").as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert!(r.ends_with("\r\n\r\n/api/after 0"), "{r:?}");
}

/// Answers given after routing but before anything goes upstream (the upstream's
/// `max_requests` all taken, no healthy target, too many bodies held for retries) read a small
/// unread body too: the connection carries the request behind it, as after a 404.
#[test]
fn answers_given_before_sending_upstream_read_a_small_body_and_keep_the_connection() {
    // The upstream of /full: each request is held until its client goes away.
    let holding = scripted_upstream(|mut s, _| {
        if read_head(&mut s) {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    // The upstream of /down: every answer (health checks too) is a 503.
    let failing = scripted_upstream(|mut s, _| {
        while read_head(&mut s) {
            let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
            if s.write_all(answer).is_err() {
                break;
            }
        }
    });
    let echo = body_echo_upstream();
    let route = |name: &str, methods: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nprefix = \"/{name}\"\nmethods = [{methods}]\nupstream = \"{name}\"\n"
        )
    };
    let files = vec![
        (
            "routes/full.toml",
            route("full", "\"GET\", \"POST\", \"PUT\""),
        ),
        ("routes/down.toml", route("down", "\"GET\", \"POST\"")),
        ("routes/held.toml", route("held", "\"GET\", \"PUT\"")),
        (
            "upstreams/full.toml",
            format!(
                "[upstream.full]\ntargets = [\"http://{holding}\"]\ncircuit_breaker = {{ max_requests = 1 }}\n"
            ),
        ),
        (
            "upstreams/down.toml",
            format!(
                "[upstream.down]\ntargets = [\"http://{failing}\"]\nhealth = {{ path = \"/healthz\", interval = \"100ms\", unhealthy_after = 1 }}\n"
            ),
        ),
        (
            "upstreams/held.toml",
            format!("[upstream.held]\ntargets = [\"http://{echo}\"]\n"),
        ),
        (
            "gateway.toml",
            "[limits]\nmax_buffered_bodies = \"100B\"\n".to_owned(),
        ),
    ];
    let (gw, _dir) = gateway(&as_refs(&files), 1);
    let in_flight = |n: f64| {
        wait_until(Duration::from_secs(5), || {
            scrape(&gw)["rustygate_in_flight_requests"] == n
        })
    };

    // max_requests: one request holds the only place. A POST (streamed, never resent) is
    // turned away with its body unread; a PUT's body is read whole for retries before the
    // place is asked for, so its connection stays either way.
    let mut holder = TcpStream::connect(gw.addr).unwrap();
    holder
        .write_all(b"GET /full/hold HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(in_flight(1.0));
    for m in ["POST", "PUT"] {
        let writes = [sized(m, "/full/a", &"p".repeat(3000)), last("/full/b")];
        let case = format!("{m} over max_requests");
        expect_answers(
            &mut write_apart(gw.addr, &writes),
            &case,
            &["503".into(), "503".into()],
        );
    }
    drop(holder);
    assert!(in_flight(0.0));

    // No healthy target.
    assert!(wait_until(Duration::from_secs(5), || {
        gw.get("/down/x").1.contains("no healthy upstream target")
    }));
    let writes = [sized("POST", "/down/a", &"d".repeat(5000)), last("/down/b")];
    expect_answers(
        &mut write_apart(gw.addr, &writes),
        "no healthy target",
        &["503".into(), "503".into()],
    );

    // Too many bodies held: a PUT whose 80 bytes are awaited holds 80 of the 100.
    let mut held = TcpStream::connect(gw.addr).unwrap();
    held.write_all(b"PUT /held/a HTTP/1.1\r\nHost: t\r\nContent-Length: 80\r\n\r\n")
        .unwrap();
    assert!(in_flight(1.0));
    let writes = [sized("PUT", "/held/b", &"h".repeat(50)), last("/held/c")];
    expect_answers(
        &mut write_apart(gw.addr, &writes),
        "too many bodies held",
        &["503".into(), "200 /held/c 0".into()],
    );
    // The held one goes through once its body arrives.
    held.write_all(&[b'x'; 80]).unwrap();
    let r = read_response(&mut held);
    assert!(r.ends_with("\r\n\r\n/held/a 80"), "{r:?}");
}
