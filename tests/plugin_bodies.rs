//! WASM plugins that read bodies (`proxy_on_request_body`, `proxy_on_response_body`) on a
//! running gateway, against real backends on loopback that check what they receive: rewrites
//! with exact lengths, per-chunk streaming, the route's body limit, traps, endless loops,
//! answers from a body callback, and clients and backends that break off mid-body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// A proxy-wasm module in WAT: a bump allocator reset per request, a few strings, and
/// `callbacks`.
fn wasm(callbacks: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (global $calls (mut i32) (i32.const 0))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32)
    (global.set $heap (i32.const 4096))
    (global.set $calls (i32.const 0)))
  (data (i32.const 0) "REWRITTEN")
  (data (i32.const 16) "!")
  (data (i32.const 32) "denied by body")
  {callbacks})"#
    ))
    .expect("valid WAT")
}

/// Pauses until the end of each body, then replaces it with "REWRITTEN".
const PAUSE_AND_REWRITE: &str = r#"
  (func $rewrite (param $buf i32) (param $size i32) (param $end i32) (result i32)
    (if (i32.eqz (local.get $end)) (then (return (i32.const 1))))
    (if (i32.ne (call $set_buf (local.get $buf) (i32.const 0) (local.get $size) (i32.const 0) (i32.const 9))
                (i32.const 0)) (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $rewrite (i32.const 0) (local.get 1) (local.get 2)))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (call $rewrite (i32.const 1) (local.get 1) (local.get 2)))"#;

/// Lets every chunk of the request body go at once, with "!" appended.
const APPEND_PER_CHUNK: &str = r#"
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (drop (call $set_buf (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 16) (i32.const 1)))
    (i32.const 0))"#;

/// Holds the request body until its end.
const PAUSE_UNTIL_END: &str = r#"
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $end i32) (result i32)
    (i32.eqz (local.get $end)))"#;

const TRAP_ON_REQUEST_BODY: &str = r#"
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) unreachable)"#;

const LOOP_ON_REQUEST_BODY: &str = r#"
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (loop $l (br $l)) (i32.const 0))"#;

/// Answers 403 itself when the whole body starts with "e" (evil).
const DENY_BY_BODY: &str = r#"
  (func (export "proxy_on_request_body") (param i32) (param $size i32) (param $end i32) (result i32)
    (if (i32.eqz (local.get $end)) (then (return (i32.const 1))))
    (if (i32.ne (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 64) (i32.const 68))
                (i32.const 0)) (then unreachable))
    (if (i32.eq (i32.load8_u (i32.load (i32.const 64))) (i32.const 101))
      (then
        (drop (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 14)
              (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 1))))
    (i32.const 0))"#;

/// Lets the first chunk of the response body go, traps on the next.
const RESPONSE_TRAP_ON_SECOND_CHUNK: &str = r#"
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.gt_u (global.get $calls) (i32.const 1)) (then unreachable))
    (i32.const 0))"#;

/// Holds the response body until its end.
const RESPONSE_PAUSE_UNTIL_END: &str = r#"
  (func (export "proxy_on_response_body") (param i32) (param i32) (param $end i32) (result i32)
    (i32.eqz (local.get $end)))"#;

/// A gateway with one worker, a plugin `name` built from `callbacks` on a catch-all route
/// to `upstream` (with `route_extra` keys). Each test names its plugin apart: the error
/// counter is the process's.
fn gateway(
    name: &str,
    callbacks: &str,
    decl_extra: &str,
    upstream: &str,
    route_extra: &str,
) -> Gateway {
    let bytes = wasm(callbacks);
    let dir = repo(&[
        (
            "gateway.toml",
            &format!(
                "[plugin.{name}]\nfile = \"plugins/p.wasm\"\nsha256 = \"{}\"\n{decl_extra}\n",
                hex::encode(Sha256::digest(&bytes))
            ),
        ),
        (
            "routes/all.toml",
            &format!(
                "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\nplugins = [{{ name = \"{name}\" }}]\n{route_extra}\n"
            ),
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [\"{upstream}\"]\n"),
        ),
    ]);
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join("plugins/p.wasm"), &bytes).unwrap();
    Gateway::start_one_worker(dir)
}

fn post(url: &str, body: &'static str) -> http::Request<Body> {
    http::Request::post(url).body(full(body)).unwrap()
}

fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, Body) {
    let (tx, rx) = mpsc::channel(2);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

fn metric(gw: &Gateway, plugin: &str, reason: &str) -> Option<f64> {
    scrape(gw)
        .get(&format!(
            "rustygate_plugin_errors_total{{plugin=\"{plugin}\",reason=\"{reason}\"}}"
        ))
        .copied()
}

#[test]
fn a_body_over_the_limit_while_a_plugin_holds_it_is_413_and_nothing_reaches_the_upstream() {
    let be = Backend::echo();
    let gw = gateway(
        "hold_limit",
        PAUSE_UNTIL_END,
        "",
        &be.url(),
        "max_body_size = \"1KiB\"",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Chunked, no length declared: the limit is met while the plugin holds the body.
        let (tx, body) = channel_body();
        let reply = tokio::spawn(send(http::Request::post(gw.url("/up")).body(body).unwrap()));
        for _ in 0..4 {
            if tx
                .send(Ok(Frame::data(Bytes::from(vec![b'x'; 512]))))
                .await
                .is_err()
            {
                break;
            }
        }
        drop(tx);
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, 413, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["request_id"].as_str(), reply.header("x-request-id"));
    });
    assert_eq!(
        be.connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the upstream was contacted"
    );
}

#[test]
fn a_trap_in_a_body_callback_fails_closed_before_the_upstream_or_is_skipped_when_fail_open() {
    let be = Backend::echo();
    let closed = gateway("body_trap_closed", TRAP_ON_REQUEST_BODY, "", &be.url(), "");
    let open = gateway(
        "body_trap_open",
        TRAP_ON_REQUEST_BODY,
        "on_error = \"fail_open\"",
        &be.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = send(post(&closed.url("/x"), "payload")).await;
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert_eq!(reply.json()["error"], "a plugin of this route failed");
        assert_eq!(
            be.connections.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the upstream was contacted"
        );

        let reply = send(post(&open.url("/x"), "payload")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["body"], "payload");
    });
    assert_eq!(metric(&closed, "body_trap_closed", "trap"), Some(1.0));
    assert_eq!(metric(&open, "body_trap_open", "trap"), Some(1.0));
}

#[test]
fn an_endless_body_callback_is_stopped_and_the_single_worker_keeps_serving() {
    let be = Backend::echo();
    let gw = gateway(
        "body_loop",
        LOOP_ON_REQUEST_BODY,
        "max_instructions = 1_000_000",
        &be.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..2 {
            let reply = send(post(&gw.url("/x"), "payload")).await;
            assert_eq!(reply.status, 500, "{}", reply.text());
            // Bodiless requests never call the body callback: the worker answers them.
            let reply = get(&gw.url("/x")).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    });
    assert_eq!(metric(&gw, "body_loop", "instructions"), Some(2.0));
}

#[test]
fn a_body_callback_can_deny_a_request_by_its_content() {
    let be = Backend::echo();
    let gw = gateway("deny_body", DENY_BY_BODY, "", &be.url(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let denied = send(post(&gw.url("/x"), "evil payload")).await;
        assert_eq!(denied.status, 403);
        assert_eq!(denied.text(), "denied by body");
        assert_eq!(be.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
        let fine = send(post(&gw.url("/x"), "good payload")).await;
        assert_eq!(fine.status, 200, "{}", fine.text());
        assert_eq!(fine.json()["body"], "good payload");
    });
}

/// One response read off `s`: its head and a `Content-Length` body.
fn read_one(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            return String::from_utf8_lossy(&got).into_owned();
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    got.extend_from_slice(&body);
    String::from_utf8_lossy(&got).into_owned()
}

/// A body a plugin read whole keeps the connection for the next request. The check that ends
/// a connection whose client is still sending a body the upstream did not wait for took a
/// plugin-read body for an unfinished one: every such POST closed its connection (found by
/// `scripts/pgo-build.sh`'s training: h2load's requests after the first on each connection
/// failed).
#[test]
fn a_body_a_plugin_read_whole_keeps_the_connection() {
    let be = Backend::echo();
    let gw = gateway("deny_body", DENY_BY_BODY, "", &be.url(), "");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..3 {
        s.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\n\r\ngood payload")
            .unwrap();
        let answer = read_one(&mut s);
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
}

#[test]
fn a_client_that_closes_mid_body_leaves_the_worker_serving() {
    let be = Backend::echo();
    let gw = gateway("hold_closed_client", PAUSE_UNTIL_END, "", &be.url(), "");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten b")
        .unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    // The held body never reaches the upstream; the one worker answers the next request.
    let (status, body) = http(&gw.addr.to_string(), "POST", "/x", &[], b"whole").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"body\":\"whole\""), "{body}");
    assert_eq!(be.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_backend_that_breaks_off_mid_body_while_a_plugin_holds_it_is_a_502() {
    // Promises 100 bytes, sends 7, closes.
    let addr = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial");
    let gw = gateway(
        "hold_broken_response",
        RESPONSE_PAUSE_UNTIL_END,
        "",
        &format!("http://{addr}"),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = get(&gw.url("/x")).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(reply.json()["request_id"].as_str().is_some());
    });
}

#[test]
fn a_trap_after_the_response_head_was_sent_aborts_the_connection() {
    // Two chunks with a pause between: the plugin lets the first go (the head goes with it)
    // and traps on the second.
    let be = Backend::start(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"second"))))
                .await;
        });
        http::Response::new(body)
    });
    let gw = gateway(
        "trap_second_chunk",
        RESPONSE_TRAP_ON_SECOND_CHUNK,
        "",
        &be.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Body>();
        let resp = client
            .request(http::Request::get(gw.url("/x")).body(full("")).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .expect("the body ended");
        assert!(body.is_err(), "the broken body ended normally: {body:?}");
    });
    assert_eq!(metric(&gw, "trap_second_chunk", "trap"), Some(1.0));
}

#[test]
fn a_plugin_that_pauses_until_the_end_rewrites_both_bodies_with_their_exact_lengths() {
    let be = Backend::echo();
    let gw = gateway("rewrite_both", PAUSE_AND_REWRITE, "", &be.url(), "");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 11\r\n\r\nhello world",
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    // The client's side: the upstream's echo, rewritten whole, with its new length.
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 9\r\n"),
        "{raw}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{raw}"
    );
    assert_eq!(body, "REWRITTEN");

    // The upstream's side, seen through a plugin-free echo of what it received.
    let be_seen = Backend::echo();
    let gw2 = gateway(
        "rewrite_request",
        &PAUSE_AND_REWRITE.replace("proxy_on_response_body", "unused_response_body"),
        "",
        &be_seen.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reply = send(post(&gw2.url("/x"), "hello world")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["body"], "REWRITTEN");
        assert_eq!(
            Backend::echoed_header(&echo, "content-length").as_deref(),
            Some("9")
        );
        assert_eq!(Backend::echoed_header(&echo, "transfer-encoding"), None);
    });
}

/// A backend that reports each piece of request body it receives on the returned channel
/// and answers with JSON: its `transfer-encoding`, `content-length` and the whole body.
fn recording_backend() -> (Backend, mpsc::UnboundedReceiver<Bytes>) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel::<Bytes>();
    let be = Backend::start(move |req| {
        let seen = seen_tx.clone();
        async move {
            let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            let (te, cl) = (header("transfer-encoding"), header("content-length"));
            let mut body = req.into_body();
            let mut all = Vec::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(data) = f.into_data() {
                            let _ = seen.send(data.clone());
                            all.extend_from_slice(&data);
                        }
                    }
                    Err(_) => {
                        return http::Response::builder()
                            .status(599)
                            .body(full("the request body broke off"))
                            .unwrap();
                    }
                }
            }
            let json = serde_json::json!({
                "te": te,
                "cl": cl,
                "body": String::from_utf8_lossy(&all),
            });
            http::Response::new(full(json.to_string()))
        }
    });
    (be, seen_rx)
}

/// Sends `first`, waits until the upstream has it (so it went on before the body's end), then
/// `rest`; `length` is declared as `Content-Length` when given.
async fn send_in_two(
    gw: &Gateway,
    seen: &mut mpsc::UnboundedReceiver<Bytes>,
    length: Option<usize>,
    (first, rest): (&'static [u8], &'static [u8]),
) -> (Bytes, Reply) {
    let (tx, body) = channel_body();
    let mut req = http::Request::post(gw.url("/x"));
    if let Some(n) = length {
        req = req.header("content-length", n);
    }
    let reply = tokio::spawn(send(req.body(body).unwrap()));
    tx.send(Ok(Frame::data(Bytes::from_static(first))))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the first chunk reached the upstream before the body ended")
        .unwrap();
    let _ = tx.send(Ok(Frame::data(Bytes::from_static(rest)))).await;
    drop(tx);
    (got, reply.await.unwrap())
}

#[test]
fn a_plugin_that_lets_each_chunk_go_streams_the_body_chunked() {
    let (be, mut seen) = recording_backend();
    let gw = gateway("append_chunks", APPEND_PER_CHUNK, "", &be.url(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (got, reply) = send_in_two(&gw, &mut seen, None, (b"first", b"second")).await;
        assert_eq!(&got[..], b"first!");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json = reply.json();
        // The last "!" is the plugin's answer to the (empty) end of the body.
        assert_eq!(json["body"], "first!second!!");
        assert_eq!(json["te"], "chunked");
        assert_eq!(json["cl"], serde_json::Value::Null);
        while seen.try_recv().is_ok() {}

        // A declared length no longer holds once the plugin changed the body: it is dropped.
        let (got, reply) = send_in_two(&gw, &mut seen, Some(11), (b"hello", b" world")).await;
        assert_eq!(&got[..], b"hello!");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json = reply.json();
        // With a declared length, the end comes with the last bytes.
        assert_eq!(json["body"], "hello! world!");
        assert_eq!(json["te"], "chunked");
        assert_eq!(json["cl"], serde_json::Value::Null);
    });
}

/// Lets the first chunk of the request body go, traps on the next.
const REQUEST_TRAP_ON_SECOND_CHUNK: &str = r#"
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.gt_u (global.get $calls) (i32.const 1)) (then unreachable))
    (i32.const 0))"#;

#[test]
fn a_trap_after_request_bytes_went_upstream_aborts_it_and_answers_500() {
    let (be, mut seen) = recording_backend();
    let gw = gateway(
        "trap_request_second_chunk",
        REQUEST_TRAP_ON_SECOND_CHUNK,
        "",
        &be.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (got, reply) = send_in_two(&gw, &mut seen, None, (b"first", b"second")).await;
        assert_eq!(&got[..], b"first");
        // The upstream's request was cut off; the client hears of the plugin, not of that.
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert_eq!(reply.json()["error"], "a plugin of this route failed");
    });
    assert_eq!(metric(&gw, "trap_request_second_chunk", "trap"), Some(1.0));
}

const RESPONSE_TRAP: &str = r#"
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) unreachable)"#;

#[test]
fn a_response_body_over_the_limit_or_a_trap_before_its_head_gets_a_proper_answer() {
    // 4 KiB, chunked: the plugin pauses on it before its end.
    let big = Backend::start(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(vec![b'z'; 4096]))))
                .await;
        });
        http::Response::new(body)
    });
    let held = gateway(
        "hold_big_response",
        RESPONSE_PAUSE_UNTIL_END,
        "",
        &big.url(),
        "max_body_size = \"1KiB\"",
    );
    let trapped = gateway("trap_response", RESPONSE_TRAP, "", &big.url(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Over the route's limit while the plugin holds it: the upstream's fault, 502.
        let reply = get(&held.url("/x")).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert_eq!(
            reply.json()["request_id"].as_str(),
            reply.header("x-request-id")
        );
        // A trap before anything went to the client: fail_closed still answers 500.
        let reply = get(&trapped.url("/x")).await;
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert_eq!(reply.json()["error"], "a plugin of this route failed");
    });
    assert_eq!(metric(&trapped, "trap_response", "trap"), Some(1.0));
}

/// Held request bodies count against this cap, per worker.
const SMALL_CAP: &str = "\n[limits]\nmax_buffered_bodies = \"1KiB\"";

/// Waits until the one worker has no request in flight: every exchange has ended, so what it
/// held is given back.
fn wait_idle(gw: &Gateway) {
    assert!(
        wait_until(Duration::from_secs(10), || {
            scrape(gw).get("rustygate_in_flight_requests") == Some(&0.0)
        }),
        "requests still in flight"
    );
}

#[test]
fn bodies_plugins_hold_count_against_the_workers_cap_and_are_given_back() {
    let be = Backend::echo();
    let gw = gateway("hold_cap", PAUSE_UNTIL_END, SMALL_CAP, &be.url(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Two bodies of 600 bytes, neither ended: once the gateway has read both, the plugin
        // would hold 1200 bytes, past the 1 KiB cap. Whichever is read second is refused.
        let (tx_a, body_a) = channel_body();
        let (tx_b, body_b) = channel_body();
        let mut a = tokio::spawn(send(
            http::Request::post(gw.url("/a")).body(body_a).unwrap(),
        ));
        let mut b = tokio::spawn(send(
            http::Request::post(gw.url("/b")).body(body_b).unwrap(),
        ));
        for (tx, byte) in [(&tx_a, b'a'), (&tx_b, b'b')] {
            tx.send(Ok(Frame::data(Bytes::from(vec![byte; 600]))))
                .await
                .unwrap();
        }
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                r = &mut a => (r.unwrap(), b, tx_b, b'b'),
                r = &mut b => (r.unwrap(), a, tx_a, b'a'),
            }
        })
        .await
        .expect("one of the two held bodies was refused");
        let (refused, other, tx, byte) = first;
        assert_eq!(refused.status, 503, "{}", refused.text());
        let json = refused.json();
        assert_eq!(
            json["error"],
            "the gateway is holding too many request bodies; try again"
        );
        assert_eq!(json["request_id"].as_str(), refused.header("x-request-id"));

        // The other goes through whole once it ends.
        tx.send(Ok(Frame::data(Bytes::from_static(b"!"))))
            .await
            .unwrap();
        drop(tx);
        let passed = other.await.unwrap();
        assert_eq!(passed.status, 200, "{}", passed.text());
        let mut expected = String::from_utf8(vec![byte; 600]).unwrap();
        expected.push('!');
        assert_eq!(passed.json()["body"], expected);
    });
    assert_eq!(be.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Both ended: all of the cap is free again, for a body of nearly its size.
    wait_idle(&gw);
    let body = [b'c'; 1000];
    let (status, text) = http(&gw.addr.to_string(), "POST", "/c", &[], &body).unwrap();
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_client_that_closes_while_a_plugin_holds_its_body_gives_its_share_back() {
    let be = Backend::echo();
    let gw = gateway("hold_cap_gone", PAUSE_UNTIL_END, SMALL_CAP, &be.url(), "");
    let addr = gw.addr.to_string();
    let full_cap = [b'x'; 1024];
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n")
        .unwrap();
    s.write_all(&[b'y'; 1000]).unwrap();
    // Held: a body of the cap's size is refused (once the gateway has read the 1000 bytes;
    // until then it may pass).
    let mut refused = false;
    for _ in 0..100 {
        let (status, text) = http(&addr, "POST", "/probe", &[], &full_cap).unwrap();
        if status == 503 {
            refused = true;
            break;
        }
        assert_eq!(status, 200, "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "the held bytes never counted against the cap");
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    wait_idle(&gw);
    let (status, text) = http(&addr, "POST", "/after", &[], &full_cap).unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&"x".repeat(1024)), "{text}");
}

/// Lets the first chunk of the request body go, then holds the rest until its end.
const LET_FIRST_GO_THEN_HOLD: &str = r#"
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $end i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.eq (global.get $calls) (i32.const 1)) (then (return (i32.const 0))))
    (i32.eqz (local.get $end)))"#;

static OVER_SMALL_CAP: [u8; 1100] = [b'z'; 1100];

#[test]
fn a_body_held_past_the_cap_after_bytes_went_upstream_aborts_it_and_answers_503() {
    let (be, mut seen) = recording_backend();
    let gw = gateway(
        "hold_cap_streamed",
        LET_FIRST_GO_THEN_HOLD,
        SMALL_CAP,
        &be.url(),
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (got, reply) = send_in_two(&gw, &mut seen, None, (b"first", &OVER_SMALL_CAP[..])).await;
        assert_eq!(&got[..], b"first");
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(
            reply.json()["error"],
            "the gateway is holding too many request bodies; try again"
        );
    });
    wait_idle(&gw);
    let (status, text) = http(&gw.addr.to_string(), "POST", "/after", &[], &[b'c'; 1000]).unwrap();
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_held_body_sent_whole_stays_counted_until_its_exchange_ends() {
    // Reports each body it receives, and answers only once `release` says so.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<usize>();
    let (release, gate) = tokio::sync::watch::channel(false);
    let be = Backend::start(move |req| {
        let arrived = arrived_tx.clone();
        let mut gate = gate.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let _ = arrived.send(body.len());
            let _ = gate.wait_for(|open| *open).await;
            http::Response::new(full(body))
        }
    });
    let gw = gateway("hold_cap_whole", PAUSE_UNTIL_END, SMALL_CAP, &be.url(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let post = |byte| {
            let req = http::Request::post(gw.url("/x")).body(full(vec![byte; 600]));
            send(req.unwrap())
        };
        let a = tokio::spawn(post(b'a'));
        let got = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
            .await
            .expect("the first body reached the upstream");
        assert_eq!(got, Some(600));
        // The plugin let it go whole; the gateway holds it (for a retry) until the upstream
        // answers, so a second one does not fit.
        let b = post(b'b').await;
        assert_eq!(b.status, 503, "{}", b.text());
        release.send(true).unwrap();
        let a = a.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.body, vec![b'a'; 600]);
    });
}
