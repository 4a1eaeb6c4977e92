//! The access log of the real binary: one JSON object per line with the documented keys, under
//! load, nothing lost on a graceful shutdown, the `RUST_LOG` filter and `--access-log false`
//! obeyed, and a log reader that stops reading never stalls traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

const KEYS: [&str; 23] = [
    "timestamp",
    "level",
    "request_id",
    "client_ip",
    "method",
    "protocol",
    "host",
    "path",
    "route",
    "upstream",
    "upstream_target",
    "scheme",
    "status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "completed",
    "error",
    "grpc_status",
    "config_version",
    "trace_id",
    "span_id",
    "target",
];

fn access_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("\"target\":\"rustygate::access\""))
        .collect()
}

/// The access lines of the requests for `path`, parsed, once there is one (within 15 s; else
/// the test fails with the log).
fn logged_for(gw: &GatewayProcess, path: &str) -> Vec<serde_json::Value> {
    let key = format!("\"path\":\"{path}\"");
    let found = || -> Vec<serde_json::Value> {
        access_lines(&gw.logs.lock().unwrap())
            .iter()
            .filter(|l| l.contains(&key))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(15), || !found().is_empty()),
        "no access line for {path}: {}",
        gw.logs.lock().unwrap()
    );
    found()
}

#[test]
fn every_request_under_load_is_one_json_line_and_none_is_lost_on_shutdown() {
    let backend = Backend::fixed(200, "hello");
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let mut gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    const CLIENTS: usize = 4;
    const EACH: usize = 400;
    // A few paths, one with a query (not logged).
    let paths = ["/plain", "/q%22uote", "/caf%C3%A9?x=%22y%22", "/a%20b"];
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let listen = gw.listen.clone();
            s.spawn(move || {
                let mut conn = KeepAlive::connect(&listen).unwrap();
                for i in 0..EACH {
                    let (status, _) = conn.get(paths[(c + i) % paths.len()]).unwrap();
                    assert_eq!(status, 200);
                }
            });
        }
    });
    // Graceful shutdown right after the last response: what is buffered must still be written.
    sigterm(&gw.child);
    let exited = wait_until(Duration::from_secs(20), || {
        matches!(gw.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "the gateway did not stop on SIGTERM");
    let total = CLIENTS * EACH;
    wait_until(Duration::from_secs(5), || {
        access_lines(&gw.logs.lock().unwrap()).len() >= total
    });
    let logs = gw.logs.lock().unwrap().clone();
    let lines = access_lines(&logs);
    assert_eq!(lines.len(), total, "one line per request, none lost");
    let mut paths_seen = std::collections::HashSet::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        let o = v.as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = KEYS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want, "{l}");
        // The raw text has each key once (a JSON parser would hide a duplicate).
        for k in KEYS {
            assert_eq!(l.matches(&format!("\"{k}\":")).count(), 1, "{k} in {l}");
        }
        assert_eq!(o["status"], 200);
        assert_eq!(o["level"], "INFO");
        assert_eq!(o["upstream_target"], backend.url().as_str());
        assert_eq!(o["client_ip"], "127.0.0.1");
        assert_eq!(o["completed"], true);
        assert!(o["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
        assert!(
            o["timestamp"]
                .as_str()
                .is_some_and(|t| t.len() == 27 && t.ends_with('Z'))
        );
        paths_seen.insert(o["path"].as_str().unwrap().to_owned());
    }
    // Paths are logged as normalised (escapes kept), without the query.
    assert_eq!(paths_seen.len(), paths.len(), "{paths_seen:?}");
    assert!(paths_seen.contains("/caf%C3%A9"), "{paths_seen:?}");
    // Ids are unique.
    let ids: std::collections::HashSet<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string())
        .collect();
    assert_eq!(ids.len(), total);
}

#[test]
fn the_log_filter_and_the_flag_turn_access_lines_off_and_keep_the_rest() {
    let backend = Backend::fixed(200, "hello");
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let path = dir.path().to_str().unwrap();
    let on = GatewayProcess::start(&["--repo", path], &[]);
    let filtered = GatewayProcess::start(
        &["--repo", path],
        &[("RUST_LOG", "info,rustygate::access=off")],
    );
    let flagged = GatewayProcess::start(&["--repo", path, "--access-log", "false"], &[]);
    for gw in [&on, &filtered, &flagged] {
        for _ in 0..5 {
            assert_eq!(gw.get("/x").unwrap().0, 200);
        }
    }
    assert!(wait_until(Duration::from_secs(5), || {
        access_lines(&on.logs.lock().unwrap()).len() == 5
    }));
    // The others had as long (and the same flush tick) to write theirs.
    std::thread::sleep(Duration::from_millis(300));
    for gw in [&filtered, &flagged] {
        let logs = gw.logs.lock().unwrap();
        assert!(access_lines(&logs).is_empty(), "{logs}");
        assert!(
            logs.contains("\"level\":\"INFO\""),
            "other events still logged: {logs}"
        );
    }
}

#[test]
fn a_log_reader_that_stops_reading_does_not_stall_requests() {
    let backend = Backend::fixed(200, "hello");
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    // stderr is a pipe nobody reads: once its 64 KiB are full the log writer blocks.
    let mut gw = GatewayProcess::start_undrained(&["--repo", dir.path().to_str().unwrap()], &[]);
    // ~400 bytes a line: 4,000 requests are ~25 pipe buffers of log.
    let mut conn = KeepAlive::connect(&gw.listen).unwrap();
    for i in 0..4_000 {
        let got = conn.get(&format!("/r{i}"));
        assert!(
            got.as_ref().is_some_and(|(s, _)| *s == 200),
            "request {i} stalled or failed: {got:?}"
        );
    }
    // Reading now releases the writer: the lines it kept come out.
    let mut stderr = gw.stderr.take().unwrap();
    sigterm(&gw.child);
    let mut out = Vec::new();
    stderr.read_to_end(&mut out).unwrap();
    let _ = gw.child.wait();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(
        access_lines(&text).len(),
        4_000,
        "every line kept while stalled"
    );
}

#[test]
fn events_about_an_upstream_target_name_it_once_beside_the_events_own_target() {
    // Nothing listens there: each request fails to connect, is retried, and the target is
    // ejected, and each of those events names the target.
    let gone = format!("http://127.0.0.1:{}", dead_port());
    let files = proxy_to(
        std::slice::from_ref(&gone),
        "outlier = { consecutive_failures = 1 }",
        "",
    );
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    // 502, or 503 once the only target is ejected (a retry can find it so).
    for _ in 0..2 {
        let status = gw.get("/x").unwrap().0;
        assert!(status == 502 || status == 503, "{status}");
    }
    let named = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains(&format!("\"upstream_target\":\"{gone}\"")))
            .count()
    };
    // The two access lines, and at least the failed attempt before them.
    assert!(wait_until(Duration::from_secs(5), || named(
        &gw.logs.lock().unwrap()
    ) > 2));
    let logs = gw.logs.lock().unwrap().clone();
    let mut failed = 0;
    for l in logs.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        // A duplicate key would be lost to every JSON reader: each appears once in the text.
        for k in v.as_object().unwrap().keys() {
            assert_eq!(
                l.matches(&format!("\"{k}\":")).count(),
                1,
                "{k} twice in {l}"
            );
        }
        if v["message"] == "upstream request failed" {
            failed += 1;
            assert_eq!(v["upstream_target"], gone.as_str(), "{l}");
            assert!(
                v["target"].as_str().unwrap().starts_with("rustygate::"),
                "{l}"
            );
        }
    }
    assert!(failed >= 1, "no failed attempt was logged: {logs}");
}

#[test]
fn a_request_whose_client_leaves_before_the_response_is_logged_as_499() {
    // An upstream that takes the request and never answers.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { continue };
            let seen = seen_tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).is_ok_and(|n| n > 0) {
                    let _ = seen.send(());
                }
                std::thread::sleep(Duration::from_secs(20));
            });
        }
    });
    let files = proxy_all(&format!("http://{addr}"), "");
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
    std::io::Write::write_all(&mut s, b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    seen_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the request reached the upstream");
    drop(s);
    let v = &logged_for(&gw, "/gone")[0];
    assert_eq!(v["status"], 499, "{v}");
    assert_eq!(v["completed"], false, "{v}");
    assert_eq!(v["error"], "client_gone", "{v}");
    assert_eq!(v["upstream_target"], format!("http://{addr}"), "{v}");
    // And counted.
    assert!(
        gw.metric("rustygate_requests_total{method=\"GET\",route=\"all\",status=\"499\"}")
            .is_some_and(|n| n == 1.0),
        "{:?}",
        gw.metric("rustygate_requests_total{method=\"GET\",route=\"all\",status=\"499\"}")
    );
}

/// Heads refused before any route saw them, by the gateway's reader (a bare line feed) or by
/// actix-http's parser (a bad field name, a control byte, an unknown method's bad token, a head
/// over the limit), are counted under `route="<none>"` and logged at debug with the client;
/// actix-http's own `ERROR` line for each (without the client) is not written. Before, none
/// was counted, and three of the five kinds wrote an `ERROR` line per request.
#[test]
fn heads_refused_before_routing_are_counted_and_logged_without_actix_error_lines() {
    let backend = Backend::fixed(200, "hello");
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let filter = format!(
        "{},rustygate::server::listener=debug",
        rustygate::telemetry::DEFAULT_FILTER
    );
    let gw = GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap()],
        &[("RUST_LOG", &filter)],
    );
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: t\r\n{}\r\n",
        "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
            .repeat(2000)
    );
    let heads: [(&[u8], &str); 5] = [
        (b"GET /a HTTP/1.1\nHost: t\n\n", "HTTP/1.1 400"),
        (
            b"GET /b HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"GET /c HTTP/1.1\r\nHost: t\r\nX-C: a\x01b\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (big.as_bytes(), "HTTP/1.1 431"),
        (b"G'T /d HTTP/1.1\r\nHost: t\r\n\r\n", "HTTP/1.1 400"),
    ];
    for (head, answer) in heads {
        let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = std::io::Write::write_all(&mut s, head);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(answer), "{answer}: {got:?}");
    }
    let count = |method: &str, status: &str| {
        gw.metric(&format!(
            "rustygate_requests_total{{method=\"{method}\",route=\"<none>\",status=\"{status}\"}}"
        ))
    };
    assert!(
        wait_until(Duration::from_secs(10), || count("GET", "400") == Some(3.0)
            && count("GET", "431") == Some(1.0)
            && count("OTHER", "400") == Some(1.0)),
        "GET 400 {:?}, GET 431 {:?}, OTHER 400 {:?}",
        count("GET", "400"),
        count("GET", "431"),
        count("OTHER", "400")
    );
    let refused = || {
        gw.logs
            .lock()
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("request head refused") && l.contains("\"client_ip\":\"127.0.0.1\"")
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || refused() == 5),
        "{}",
        gw.logs.lock().unwrap()
    );
    let logs = gw.logs.lock().unwrap();
    assert!(!logs.contains("\"level\":\"ERROR\""), "{logs}");
    // The server still answers.
    drop(logs);
    assert_eq!(http(&gw.listen, "GET", "/", &[], b"").unwrap().0, 200);
}

/// The listener answers a malformed chunked body itself (the request's handler may not have it
/// yet): the 400's `x-request-id` is the id of the request's access line (400, `client_body`),
/// whether the bad chunk comes with the head or later. The line had an id the client never saw.
#[test]
fn a_malformed_chunked_body_is_logged_under_the_id_its_400_carries() {
    use std::io::Write;
    let backend = Backend::echo();
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let head = "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut ids = Vec::new();
    for parts in [
        &[head, "zz\r\n"][..],
        &[head, "5\r\nhello\r\n", "ZZ\r\n"][..],
    ] {
        let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for part in parts {
            s.write_all(part.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp:?}");
        let id = resp
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no x-request-id: {resp:?}"))
            .to_owned();
        ids.push(id);
    }
    let logged = |id: &str| {
        access_lines(&gw.logs.lock().unwrap())
            .iter()
            .find(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            .map(|l| l.to_string())
    };
    for id in &ids {
        assert!(
            wait_until(Duration::from_secs(5), || logged(id).is_some()),
            "no access line with {id}: {}",
            gw.logs.lock().unwrap()
        );
        let v: serde_json::Value = serde_json::from_str(&logged(id).unwrap()).unwrap();
        assert_eq!(v["status"], 400);
        assert_eq!(v["error"], "client_body");
    }
}

/// A chunked body that breaks after its request went upstream: the client's 400, the request's
/// access line and the upstream all have the request's one id. The 400 (and the access line)
/// carried a new id of their own, one the upstream never saw. A client's own `x-request-id`
/// comes back on the 400 when the bad chunk comes with the head.
#[test]
fn a_malformed_chunked_body_is_answered_under_the_id_its_upstream_got() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    let backend = Backend::start(move |req: hyper::Request<hyper::body::Incoming>| {
        let id = req
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        record.lock().unwrap().push(id);
        async move {
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            hyper::Response::new(full("done"))
        }
    });
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let answer = |s: &mut std::net::TcpStream| {
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp:?}");
        resp.lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no x-request-id: {resp:?}"))
            .to_owned()
    };
    let logged = |id: &str| {
        wait_until(Duration::from_secs(5), || {
            access_lines(&gw.logs.lock().unwrap()).iter().any(|l| {
                l.contains(&format!("\"request_id\":\"{id}\"")) && l.contains("\"status\":400")
            })
        })
    };
    let head = "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n";

    // The request and its first chunk reach the upstream; then a chunk that breaks the grammar.
    let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{head}\r\n5\r\nhello\r\n").as_bytes())
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || seen
        .lock()
        .unwrap()
        .len()
        == 1));
    s.write_all(b"ZZ\r\n").unwrap();
    let id = answer(&mut s);
    let upstream_id = seen.lock().unwrap()[0].clone();
    assert_eq!(
        id, upstream_id,
        "the 400's id is not the one the upstream got"
    );
    assert!(
        logged(&id),
        "no access line with {id}: {}",
        gw.logs.lock().unwrap()
    );

    // The client's own id, its bad chunk in the head's read.
    let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{head}x-request-id: client-7\r\n\r\nzz\r\n").as_bytes())
        .unwrap();
    assert_eq!(answer(&mut s), "client-7");
    assert!(logged("client-7"), "{}", gw.logs.lock().unwrap());
}

/// A client that goes away half-way through a body the gateway reads whole before sending it
/// (a `PUT` on a route with retries): over HTTP/1.1 it closes the connection, or shuts its side
/// down and waits; over HTTP/2 it cancels the stream, or closes the connection. Each is logged
/// once as `499 client_gone`, not completed, counted as 499, and the client that still reads
/// gets no answer. Each was logged `400`, completed, with no error, and counted as a 400 (the
/// client that still read got a `400` for a body it never finished).
#[test]
fn a_client_that_leaves_mid_upload_of_a_body_read_for_retries_is_logged_as_499() {
    use std::io::Write;
    let backend = Backend::echo();
    let files = proxy_to(
        &[backend.url()],
        "retries = { attempts = 2, on = [\"connect_failure\"] }",
        "",
    );
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let part = vec![b'a'; 10_000];
    let upload = |path: &str| {
        let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
        let head = format!("PUT {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 50000\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&part).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s
    };
    drop(upload("/h1-close"));
    let mut s = upload("/h1-shutdown");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "",
        "an answer to a client gone"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (path, cancel) in [("/h2-cancel", true), ("/h2-close", false)] {
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(&gw.listen).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let mut client = client.ready().await.unwrap();
            let req = http::Request::put(format!("http://t{path}"))
                .header("content-length", "50000")
                .body(())
                .unwrap();
            let (_resp, mut stream) = client.send_request(req, false).unwrap();
            stream
                .send_data(bytes::Bytes::from(part.clone()), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            if cancel {
                stream.send_reset(h2::Reason::CANCEL);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // Dropped with its task: the socket closes.
            conn.abort();
            let _ = conn.await;
        });
    }
    for path in ["/h1-close", "/h1-shutdown", "/h2-cancel", "/h2-close"] {
        let lines = logged_for(&gw, path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v = &lines[0];
        assert_eq!(
            (&v["status"], &v["completed"], &v["error"]),
            (
                &serde_json::json!(499),
                &serde_json::json!(false),
                &serde_json::json!("client_gone")
            ),
            "{path}: {v}"
        );
    }
    let count = |status: &str| {
        gw.metric(&format!(
            "rustygate_requests_total{{method=\"PUT\",route=\"all\",status=\"{status}\"}}"
        ))
    };
    assert_eq!((count("499"), count("400")), (Some(4.0), None));
}

/// Every head refused before any route saw it (a bare line feed, a bad field name, a head too
/// large, both framings, two lengths, a head not received in time) is one request: one access
/// line under the request id its answer carried, with its status, method, path when known and
/// why, and the version of the config it was refused under, as a routed request's; one count
/// and one duration sample under `route="<none>"`. They were counted, but had no access line
/// (a debug line only) and no duration sample; then their `config_version` was empty.
#[test]
fn heads_refused_before_routing_get_one_access_line_and_a_duration_sample_each() {
    use std::io::Write;
    let backend = Backend::fixed(200, "hello");
    let mut files = proxy_all(&backend.url(), "");
    files.push((
        "gateway.toml",
        "[limits]\nheader_timeout = \"1s\"\n".to_owned(),
    ));
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    assert_eq!(http(&gw.listen, "GET", "/routed", &[], b"").unwrap().0, 200);
    let version = logged_for(&gw, "/routed")[0]["config_version"].clone();
    assert!(version.as_str().is_some_and(|v| !v.is_empty()), "{version}");
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(140_000)
    );
    let cases: [(&[u8], u16, &str, &str); 6] = [
        (b"GET /lf HTTP/1.1\r\nHost: t\nFoo: y\r\n\r\n", 400, "malformed_head", "/lf"),
        (b"GET /bad HTTP/1.1\r\nHost: t\r\nBad Name: y\r\n\r\n", 400, "malformed_head", ""),
        (big.as_bytes(), 431, "head_too_large", ""),
        (
            b"POST /clte HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "malformed_head",
            "",
        ),
        (
            b"POST /twocl HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
            400,
            "malformed_head",
            "",
        ),
        (b"GET /slow HTTP/1.1\r\nHost: t\r\n", 408, "header_timeout", "/slow"),
    ];
    for (head, status, error, path) in cases {
        let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(head);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got:?}");
        let id = got
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no x-request-id: {got:?}"))
            .to_owned();
        let line = || {
            access_lines(&gw.logs.lock().unwrap())
                .iter()
                .filter(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
        };
        assert!(
            wait_until(Duration::from_secs(10), || !line().is_empty()),
            "no access line for {:?} ({id}): {}",
            String::from_utf8_lossy(&head[..head.len().min(40)]),
            gw.logs.lock().unwrap()
        );
        let lines = line();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["error"], error, "{v}");
        assert_eq!(v["route"], "", "{v}");
        assert_eq!(v["config_version"], version, "{v}");
        let method = if head.starts_with(b"POST") {
            "POST"
        } else {
            "GET"
        };
        assert_eq!(v["method"], method, "{v}");
        if !path.is_empty() {
            assert_eq!(v["path"], path, "{v}");
        }
        if status == 408 {
            assert!(v["duration_ms"].as_f64().unwrap() >= 900.0, "{v}");
        }
    }
    let counted = || {
        let text = http(&gw.admin, "GET", "/metrics", &[], b"").unwrap().1;
        let sum = |prefix: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix) && l.contains("route=\"<none>\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (
            sum("rustygate_requests_total{"),
            sum("rustygate_request_duration_seconds_count{"),
        )
    };
    assert_eq!(counted(), (6.0, 6.0));
    assert_eq!(
        access_lines(&gw.logs.lock().unwrap())
            .iter()
            .filter(|l| l.contains("\"route\":\"\""))
            .count(),
        6
    );
}

/// A log output whose reader has gone (each write fails with `EPIPE`): every access line that
/// could not be written is counted in `rustygate_log_lines_dropped_total`. None was.
#[test]
fn access_lines_a_failing_log_output_loses_are_counted_as_dropped() {
    let backend = Backend::fixed(200, "hello");
    let files = proxy_all(&backend.url(), "");
    let dir = repo(&as_refs(&files));
    let mut gw = GatewayProcess::start_undrained(&["--repo", dir.path().to_str().unwrap()], &[]);
    drop(gw.stderr.take());
    let dropped = || {
        gw.metric("rustygate_log_lines_dropped_total{reason=\"write_failed\"}")
            .unwrap_or(0.0)
    };
    let before = dropped();
    for _ in 0..50 {
        assert_eq!(http(&gw.listen, "GET", "/x", &[], b"").unwrap().0, 200);
    }
    assert!(
        wait_until(Duration::from_secs(10), || dropped() >= before + 50.0),
        "dropped {} -> {}",
        before,
        dropped()
    );
}

/// Requests the gateway answers itself (a `respond` route, no route, a method the route does
/// not take, a body over a proxied route's limit before any target is tried) are timed: their
/// duration is not zero. Every one was `0.000`: both ends were read in the same poll, which
/// shares one clock reading.
#[test]
fn requests_the_gateway_answers_itself_have_a_duration() {
    let dir = repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"hi\"\npath = \"/hi\"\nrespond = { status = 200, body = \"hi\" }\n\
             [[route]]\nname = \"get\"\npath = \"/get\"\nmethods = [\"GET\"]\n\
             respond = { status = 200, body = \"ok\" }\n\
             [[route]]\nname = \"small\"\npath = \"/small\"\nupstream = \"nowhere\"\n\
             max_body_size = \"1KiB\"\n",
        ),
        (
            "upstreams/u.toml",
            "[upstream.nowhere]\ntargets = [\"http://127.0.0.1:9\"]\n",
        ),
    ]);
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let big = [b'x'; 2048];
    for (method, path, body, status) in [
        ("GET", "/hi", &b""[..], 200),
        ("GET", "/nope", b"", 404),
        ("POST", "/get", b"", 405),
        // Refused on its Content-Length: the route has an upstream, no target was tried.
        ("POST", "/small", &big[..], 413),
    ] {
        for _ in 0..5 {
            assert_eq!(http(&gw.listen, method, path, &[], body).unwrap().0, status);
        }
    }
    let lines = || {
        access_lines(&gw.logs.lock().unwrap())
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || lines().len() == 20),
        "{}",
        gw.logs.lock().unwrap()
    );
    for v in lines() {
        assert!(v["duration_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
}

/// A gateway with `send_timeout = "1s"` in front of an upstream that sends an endless body for
/// up to 20 s to each request.
fn endless_response_gateway() -> (GatewayProcess, tempfile::TempDir) {
    let addr = scripted_upstream(|s| {
        use std::io::Write;
        let started = std::time::Instant::now();
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n");
        let chunk = [b'x'; 64 * 1024];
        while started.elapsed() < Duration::from_secs(20) && s.write_all(&chunk).is_ok() {}
    });
    let mut files = proxy_all(&format!("http://{addr}"), "read_timeout = \"30s\"");
    files.push((
        "gateway.toml",
        "[limits]\nsend_timeout = \"1s\"\n".to_owned(),
    ));
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    (gw, dir)
}

/// A client that takes nothing of its response is cut at the send timeout: its access line
/// says `send_timeout`, not `client_gone` (it never left). It said `client_gone`.
#[test]
fn a_response_cut_at_the_send_timeout_is_logged_as_such() {
    use std::io::Write;
    let (gw, _dir) = endless_response_gateway();
    let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
    s.write_all(b"GET /never-read HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let v = &logged_for(&gw, "/never-read")[0];
    assert_eq!(v["completed"], false, "{v}");
    assert_eq!(v["error"], "send_timeout", "{v}");
    drop(s);
}

/// The same over HTTP/2: a client that keeps its connection but grants its stream no window
/// (SETTINGS_INITIAL_WINDOW_SIZE 0) has its stream ended at the send timeout, and the access
/// line says `send_timeout`, as over HTTP/1.1. It said `client_gone`.
#[test]
fn an_http2_response_cut_at_the_send_timeout_is_logged_as_such() {
    use std::io::Write;
    let (gw, _dir) = endless_response_gateway();
    let mut s = std::net::TcpStream::connect(&gw.listen).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // SETTINGS: INITIAL_WINDOW_SIZE (4) = 0; then a GET that ends its stream.
    s.write_all(&h2_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]))
        .unwrap();
    s.write_all(&h2_frame(
        0x1,
        0x5,
        1,
        &h2_request_block("GET", "/never-read-h2"),
    ))
    .unwrap();
    let v = &logged_for(&gw, "/never-read-h2")[0];
    assert_eq!(v["protocol"], "HTTP/2", "{v}");
    assert_eq!(v["completed"], false, "{v}");
    assert_eq!(v["error"], "send_timeout", "{v}");
    drop(s);
}

/// A method the matched path's route does not take: the 405's access line and count name that
/// route. They had route "" and `route="<none>"`, as if no route matched.
#[test]
fn a_405_is_logged_and_counted_under_the_route_whose_path_matched() {
    let dir = repo(&[(
        "routes/r.toml",
        "[[route]]\nname = \"getonly\"\nprefix = \"/getonly\"\nmethods = [\"GET\"]\n\
         respond = { status = 200, body = \"ok\" }\n",
    )]);
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    assert_eq!(
        http(&gw.listen, "POST", "/getonly/x", &[], b"").unwrap().0,
        405
    );
    let v = &logged_for(&gw, "/getonly/x")[0];
    assert_eq!(
        (&v["status"], &v["route"]),
        (&serde_json::json!(405), &serde_json::json!("getonly")),
        "{v}"
    );
    assert_eq!(
        gw.metric("rustygate_requests_total{method=\"POST\",route=\"getonly\",status=\"405\"}"),
        Some(1.0)
    );
}
