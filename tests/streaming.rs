//! Bodies stream through the proxy both ways: 100 MiB up and down, never buffered whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

const MIB: usize = 1 << 20;
const TOTAL_MIB: usize = 100;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, Body) {
    let (tx, rx) = mpsc::channel(2);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_of_100_mib_streams_to_the_upstream() {
    let (first_tx, first_rx) = oneshot::channel::<()>();
    let first_tx = std::sync::Mutex::new(Some(first_tx));
    let be = Backend::start(move |req| {
        let first = first_tx.lock().unwrap().take();
        async move {
            let mut body = req.into_body();
            let mut total = 0usize;
            let mut first = first;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
            }
            http::Response::new(full(total.to_string()))
        }
    });
    let gw = Gateway::start(&as_refs(&proxy_all(
        &be.url(),
        "max_body_size = \"200MiB\"",
    )));
    let rss_before = rss_kib();

    let (tx, body) = channel_body();
    let req = http::Request::post(gw.url("/upload")).body(body).unwrap();
    let response = tokio::spawn(send(req));
    let chunk = Bytes::from(vec![b'x'; MIB]);
    tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
    // The upstream sees the first MiB while the client still holds the other 99.
    tokio::time::timeout(Duration::from_secs(10), first_rx)
        .await
        .expect("the upstream received the first bytes before the client sent the rest")
        .unwrap();
    for _ in 1..TOTAL_MIB {
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
    }
    drop(tx);
    let reply = response.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), (TOTAL_MIB * MIB).to_string());
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 50,
        "resident memory grew by {grown_mib} MiB for a 100 MiB upload"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn download_of_100_mib_streams_to_the_client() {
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = std::sync::Mutex::new(Some(go_rx));
    let be = Backend::start(move |_req| {
        let go = go_rx.lock().unwrap().take();
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'y'; MIB]);
                tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
                // Produce the rest only once the client has the first MiB in hand.
                if let Some(go) = go {
                    go.await.unwrap();
                }
                for _ in 1..TOTAL_MIB {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                }
            });
            http::Response::new(body)
        }
    });
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let rss_before = rss_kib();

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let resp = client
        .request(
            http::Request::get(gw.url("/download"))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut total = 0usize;
    let mut go = Some(go_tx);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the client received bytes before the upstream produced the whole body")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len();
            if total >= MIB
                && let Some(go) = go.take()
            {
                go.send(()).unwrap();
            }
        }
    }
    assert_eq!(total, TOTAL_MIB * MIB);
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 50,
        "resident memory grew by {grown_mib} MiB for a 100 MiB download"
    );
}

/// An HTTP/1.0 client gets a body of unknown length as it comes, ended by the close of the
/// connection: never `Transfer-Encoding: chunked`, which it cannot read (RFC 9112 §6.1), also
/// when it asked for keep-alive. Before, actix-http chunked it, and with `Connection:
/// keep-alive` kept the connection: the client read the chunk framing as the body and could
/// not find where it ended.
#[test]
fn http_1_0_clients_get_a_streamed_body_ended_by_close() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    // Chunked, its second piece a moment after the head: streamed, not sent whole.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let be = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                );
                std::thread::sleep(Duration::from_millis(150));
                let _ = s.write_all(b"6\r\n world\r\n0\r\n\r\n");
                std::thread::sleep(Duration::from_millis(500));
            });
        }
    });
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    for connection in ["", "Connection: keep-alive\r\n"] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET /s HTTP/1.0\r\nHost: test\r\n{connection}\r\n").as_bytes())
            .unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("http/1.0 200"), "{text}");
        assert!(!head.contains("transfer-encoding"), "{text}");
        assert!(!head.contains("keep-alive"), "{text}");
        assert_eq!(body, "hello world", "{connection}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "closed at its end"
        );
    }
}
