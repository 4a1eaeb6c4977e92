//! HTTP/2 from clients (h2c with prior knowledge on the plain listener) and gRPC through it:
//! hyper's h2 client against the gateway, HTTP/1.1 and h2c backends on loopback. gRPC messages
//! are framed by hand (1-byte flag, 4-byte length, payload), as the gRPC over HTTP/2 spec says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{
    Backend, Body, Gateway, as_refs, full, h2_frame, proxy_to, scrape, scripted_upstream,
};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustygate::server::ServeOptions;

type Sender = hyper::client::conn::http2::SendRequest<Body>;

/// An h2c connection to `addr`; the connection task ends when the server closes it.
async fn connect(addr: SocketAddr) -> (Sender, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

fn get(path: &str) -> Request<Body> {
    Request::get(format!("http://gateway.test{path}"))
        .body(full(""))
        .unwrap()
}

/// A gRPC message frame.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

fn grpc_call(path: &str, msg: &[u8], extra: &[(&str, &str)]) -> Request<Body> {
    let mut r = Request::post(format!("http://gateway.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (n, v) in extra {
        r = r.header(*n, *v);
    }
    r.body(full(grpc_frame(msg))).unwrap()
}

/// A whole response: status, headers, body, trailers.
struct Whole {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

async fn whole(resp: Response<Incoming>) -> Whole {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Whole {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// An h2c (HTTP/2 with prior knowledge) backend on 127.0.0.1:0.
struct H2Backend {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl H2Backend {
    fn start<F, Fut>(handler: F) -> H2Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
    {
        H2Backend::start_fallible(move |req| {
            let fut = handler(req);
            async move { Ok(fut.await) }
        })
    }

    /// [`H2Backend::start`] with a handler that may fail: hyper then resets the stream
    /// (RST_STREAM) and keeps the connection.
    fn start_fallible<F, Fut>(handler: F) -> H2Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Response<Body>, std::io::Error>> + Send + 'static,
    {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let handler = Arc::clone(&handler);
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handler(req));
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        H2Backend { addr, _stop: stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A gRPC-shaped h2c backend: answers each call with the frames `reply` makes of the request
/// body, then the trailers `grpc-status: 0`, `grpc-message: ok`; records the `te` header seen.
fn grpc_backend(te_seen: Arc<std::sync::Mutex<Vec<String>>>) -> H2Backend {
    H2Backend::start(move |req: Request<Incoming>| {
        let te_seen = Arc::clone(&te_seen);
        async move {
            te_seen.lock().unwrap().push(
                req.headers()
                    .get("te")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
            );
            if req.uri().path().ends_with("/Missing") {
                // Trailers-only: the status in the HEADERS frame that ends the stream.
                return Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "not found")
                    .body(full(""))
                    .unwrap();
            }
            if req.uri().path().ends_with("/Collect") {
                // Client streaming: one answer with every byte the client's messages held.
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                let frames = vec![
                    Ok::<_, std::io::Error>(Frame::data(grpc_frame(
                        format!("got {} bytes", body.len()).as_bytes(),
                    ))),
                    Ok(Frame::trailers(t)),
                ];
                return Response::builder()
                    .header("content-type", "application/grpc")
                    .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                        frames,
                    ))))
                    .unwrap();
            }
            let streaming = req.uri().path().ends_with("/Stream");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let msg = body.slice(5.min(body.len())..);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                let count = if streaming { 3 } else { 1 };
                for i in 0..count {
                    let mut m = msg.to_vec();
                    m.extend_from_slice(format!("#{i}").as_bytes());
                    if tx.send(Ok(Frame::data(grpc_frame(&m)))).await.is_err() {
                        return;
                    }
                    if streaming {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "ok".parse().unwrap());
                let _ = tx.send(Ok(Frame::trailers(t))).await;
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
    })
}

fn start(files: &[(&str, &str)], keep_alive: Duration) -> Gateway {
    let dir = common::repo(files);
    let opts = ServeOptions {
        workers: 1,
        keep_alive,
        ..ServeOptions::default()
    };
    let mut gw = Gateway::start_dir(dir.path(), opts);
    gw.keep_repo(dir);
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_are_routed_and_forwarded_like_http1_requests() {
    let be = Backend::echo();
    let files = proxy_to(&[be.url()], "", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;

    let r = whole(h2.send_request(get("/items?x=1")).await.unwrap()).await;
    assert_eq!(r.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["uri"], "/items?x=1");
    let headers = echo["headers"].as_array().unwrap();
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    // `:authority` stands for Host; the upstream is spoken to in HTTP/1.1.
    assert_eq!(header("x-forwarded-host").as_deref(), Some("gateway.test"));
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert!(r.headers.contains_key("x-request-id"));

    // Cookies sent one per field (as browsers do over HTTP/2) reach an HTTP/1.1 upstream as
    // one field (RFC 9113 §8.2.3).
    let mut req = get("/cookies");
    req.headers_mut().append("cookie", "a=1".parse().unwrap());
    req.headers_mut().append("cookie", "b=2".parse().unwrap());
    let r = whole(h2.send_request(req).await.unwrap()).await;
    let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let cookies: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "cookie")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1; b=2"]);

    // A body without Content-Length (END_STREAM comes with the last DATA frame) is forwarded.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let req = Request::post("http://gateway.test/upload")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let pending = h2.send_request(req);
    let feeder = tokio::spawn(async move {
        for part in ["one,", "two,", "three"] {
            tx.send(Ok(Frame::data(Bytes::from(part)))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let r = whole(pending.await.unwrap()).await;
    feeder.await.unwrap();
    assert_eq!(r.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echo["body"], "one,two,three");

    // Many streams at once on the one connection, each answered for itself.
    let calls = (0..40).map(|i| {
        let mut h2 = h2.clone();
        async move {
            let r = whole(h2.send_request(get(&format!("/n/{i}"))).await.unwrap()).await;
            let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            (r.status, echo["uri"].as_str().unwrap().to_owned(), i)
        }
    });
    for (status, uri, i) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
        assert_eq!(uri, format!("/n/{i}"));
    }

    // Gateway answers keep their meaning: no route is 404, over HTTP/2 too.
    let files = vec![(
        "routes/all.toml",
        "[[route]]\nname = \"only\"\npath = \"/only\"\nrespond = { status = 204 }\n".to_owned(),
    )];
    gw.swap(&as_refs(&files));
    let r = whole(h2.send_request(get("/elsewhere")).await.unwrap()).await;
    assert_eq!(r.status, 404);
    let r = whole(h2.send_request(get("/only")).await.unwrap()).await;
    assert_eq!(r.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_streams_fast_gets_goaway() {
    // The upstream never answers in time: every stream the client cancels was work started.
    let be = Backend::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Response::new(full("late"))
    });
    let gw = start_with_limits(&be, "[limits]\nhttp2_max_resets_per_second = 10\n");
    let (h2, conn) = connect(gw.addr).await;
    // One stream the client keeps: after a GOAWAY for resets it gets no grace (it held the
    // connection, and the client's chance to go on opening streams, for the 10 s header
    // timeout).
    let mut kept = h2.clone();
    let kept = tokio::spawn(async move { kept.send_request(get("/kept")).await });

    // 40 streams opened and cancelled at once (hyper sends RST_STREAM(CANCEL) when a response
    // future is dropped).
    for round in 0..4 {
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let mut h2 = h2.clone();
                tokio::spawn(async move { h2.send_request(get(&format!("/r/{round}/{i}"))).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for c in calls {
            c.abort();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection is told to go away and ends at once, the stream still open with it.
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "the connection should have been closed");
    assert!(kept.await.unwrap().is_err(), "the kept stream ends with it");
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_http2_goaway_total{reason="resets"}"#),
        Some(&1.0)
    );

    // A well-behaved client on a new connection is served.
    let (mut h2, _conn) = connect(gw.addr).await;
    let quick = Backend::fixed(200, "fine");
    gw.swap(&as_refs(&proxy_to(&[quick.url()], "", "")));
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!(r.status, 200);
}

/// Streams reset before hyper took them in (HEADERS and RST_STREAM in one write) never reach
/// the gateway's own count: h2's cap on them sends GOAWAY(ENHANCE_YOUR_CALM), counted with a
/// reason of its own. That GOAWAY was not counted at all.
// One thread: the client's connection task runs only when the test yields, so the 50 streams
// and resets are queued before any of them is written (with a second thread, the gateway's
// GOAWAY came in while they were queued, and the connection then ended without its error).
#[tokio::test]
async fn h2s_own_reset_flood_goaway_is_counted() {
    let be = Backend::fixed(200, "ok");
    let gw = start_with_limits(&be, "[limits]\nhttp2_max_resets_per_second = 10\n");
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    client = client.ready().await.unwrap();
    // Queued without yielding: h2 writes the 50 HEADERS and RST_STREAMs together.
    for i in 0..50 {
        let req = http::Request::get(format!("http://gateway.test/r/{i}"))
            .body(())
            .unwrap();
        let (_resp, mut stream) = client.send_request(req, false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection should have been closed")
        .unwrap();
    // The GOAWAY, unless the client was still writing when the gateway closed (EPIPE).
    let e = ended.expect_err("ended by the gateway");
    assert!(
        e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io(),
        "{e:?}"
    );
    // Counted once the gateway's side of the connection has ended too.
    let counted = tokio::task::spawn_blocking(move || {
        let series = r#"rustygate_http2_goaway_total{reason="enhance_your_calm"}"#;
        common::wait_until(Duration::from_secs(5), || {
            scrape(&gw).get(series).is_some_and(|n| *n >= 1.0)
        })
        .then(|| scrape(&gw).get(series).copied())
    })
    .await
    .unwrap();
    assert_eq!(counted, Some(Some(1.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_http2_connections_are_closed() {
    let be = Backend::start(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Response::new(full("ok"))
    });
    let mut files = proxy_to(&[be.url()], "", "");
    files.push((
        "gateway.toml",
        "[limits]\nheader_timeout = \"300ms\"\n".to_owned(),
    ));
    let gw = start(&as_refs(&files), Duration::from_millis(300));

    // A stream longer than the idle time is not cut: idle means no stream at all.
    let (mut h2, conn) = connect(gw.addr).await;
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!(r.status, 200);
    let r = whole(h2.send_request(get("/slow")).await.unwrap()).await;
    assert_eq!(r.status, 200);
    // Then idle past the keep-alive time: GOAWAY and close.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .is_ok(),
        "an idle connection should be closed"
    );

    // The preface and nothing else: closed after the header timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a silent HTTP/2 connection should be closed");

    // Half a preface, then silence: the sniffing step times out too (408, closed).
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a half preface should not hold the connection"
    );
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"));

    let m = scrape(&gw);
    assert!(
        m.get(r#"rustygate_http2_goaway_total{reason="idle"}"#)
            .copied()
            >= Some(1.0)
    );
    assert!(
        m.get(r#"rustygate_http2_goaway_total{reason="header_timeout"}"#)
            .copied()
            >= Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_are_refused_per_stream() {
    let be = Backend::fixed(200, "ok");
    let gw = start_with_limits(&be, "[limits]\nhttp2_max_header_list_size = \"4KiB\"\n");
    let (mut h2, _conn) = connect(gw.addr).await;
    let big = "a".repeat(8 * 1024);
    let req = Request::get("http://gateway.test/")
        .header("x-big", big.as_str())
        .body(full(""))
        .unwrap();
    // h2 answers a header list over the advertised size with 431 and ends the stream.
    let resp = h2.send_request(req).await.expect("answered");
    assert_eq!(resp.status().as_u16(), 431);
    // The connection and its other streams are fine.
    let (mut h2, _conn) = connect(gw.addr).await;
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!(r.status, 200);
}

/// A gateway proxying everything to `be`, with `gateway.toml` set to `limits` (a `[limits]`
/// table), and a 75 s keep-alive.
fn start_with_limits(be: &Backend, limits: &str) -> Gateway {
    let mut files = proxy_to(&[be.url()], "", "");
    files.push(("gateway.toml", limits.to_owned()));
    start(&as_refs(&files), Duration::from_secs(75))
}

/// A backend that answers `hi` to everything, and how many requests it got.
fn counting_backend() -> (Backend, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hits);
    let be = Backend::start(move |_req| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Response::new(full("hi")) }
    });
    (be, hits)
}

/// A field value that begins or ends with whitespace (SP or HTAB) makes an HTTP/2 request
/// malformed (RFC 9113 §8.2.1): it is answered 400 like the gateway's other refused requests
/// and never reaches the upstream. Such values were forwarded as they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_values_beginning_or_ending_with_whitespace_are_refused() {
    let (be, hits) = counting_backend();
    let files = proxy_to(&[be.url()], "", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;
    let padded = [
        ("x-a", " b"),
        ("x-a", "b "),
        ("x-a", "\tb"),
        ("x-a", "b\t"),
        ("x-a", " "),
        ("cookie", "a=1 "),
        ("host", "gateway.test "),
    ];
    for (name, value) in padded {
        let mut req = get("/");
        req.headers_mut()
            .append(name, http::HeaderValue::from_static(value));
        let r = whole(h2.send_request(req).await.unwrap()).await;
        assert_eq!(r.status, 400, "{name}: {value:?}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "forwarded");
    // Whitespace inside a value, and an empty value, are fine; the connection still serves.
    let mut req = get("/");
    req.headers_mut().append("x-a", "b \t c".parse().unwrap());
    req.headers_mut().append("x-e", "".parse().unwrap());
    let r = whole(h2.send_request(req).await.unwrap()).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"hi"[..]));
}

/// A client-streaming call: `msgs`, each framed, `gap` apart, no Content-Length; the whole
/// answer.
async fn collect_call(h2: &mut Sender, msgs: Vec<Vec<u8>>, gap: Duration) -> Whole {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let req = Request::post("http://gateway.test/echo.Echo/Collect")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let pending = h2.send_request(req);
    let feeder = tokio::spawn(async move {
        for m in msgs {
            if tx.send(Ok(Frame::data(grpc_frame(&m)))).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let r = whole(pending.await.unwrap()).await;
    let _ = feeder.await;
    r
}

/// A gRPC stream is held to the route's `max_body_size` message by message, not in total: a
/// stream may carry any number of messages. Before, a stream was cut once its messages added
/// up to the limit (10 MiB by default: a grpcio bidi stream of 40 × 256 KiB messages got
/// RST_STREAM(INTERNAL_ERROR) after 39 of them). One message over the limit is still refused,
/// the gRPC way (RESOURCE_EXHAUSTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_is_limited_per_message_not_in_total() {
    let be = grpc_backend(Arc::new(std::sync::Mutex::new(Vec::new())));
    let files = proxy_to(
        &[be.url()],
        "protocol = \"http2\"",
        "max_body_size = \"64KiB\"",
    );
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;

    // 40 messages of 16 KiB: 640 KiB in all, each well under 64 KiB.
    let r = collect_call(&mut h2, vec![vec![7u8; 16 * 1024]; 40], Duration::ZERO).await;
    assert_eq!(r.status, 200);
    let total = 40 * (5 + 16 * 1024);
    assert_eq!(r.body, grpc_frame(format!("got {total} bytes").as_bytes()));
    assert_eq!(r.trailers.expect("trailers")["grpc-status"], "0");

    // One message of 100 KiB, after a small one: over the limit, refused as gRPC does.
    let small_then_big = vec![b"small".to_vec(), vec![1u8; 100 * 1024]];
    let r = collect_call(&mut h2, small_then_big, Duration::ZERO).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "8", "{:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_get_their_trailers_and_te_reaches_the_upstream() {
    let te_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let be = grpc_backend(Arc::clone(&te_seen));
    let files = proxy_to(&[be.url()], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;

    // Unary.
    let r = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"hello", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(r.body, grpc_frame(b"hello#0"));
    let t = r.trailers.expect("trailers relayed");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "ok");

    // Server streaming: three messages, in order, then the trailers.
    let resp = h2
        .send_request(grpc_call("/echo.Echo/Stream", b"s", &[]))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.extend_from_slice(&grpc_frame(format!("s#{i}").as_bytes()));
    }
    assert_eq!(data, expected);
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

    // Client streaming: three messages, no Content-Length, the last DATA frame ends the stream.
    let msgs = vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()];
    let r = collect_call(&mut h2, msgs, Duration::from_millis(10)).await;
    // 3 frames: 5-byte prefixes and 3 + 3 + 5 bytes of messages.
    assert_eq!(r.body, grpc_frame(b"got 26 bytes"));
    assert_eq!(r.trailers.expect("trailers")["grpc-status"], "0");

    // Trailers-only stays trailers-only: the client's HEADERS frame ends the stream (gRPC
    // clients refuse a status followed by an empty DATA frame).
    let resp = h2
        .send_request(grpc_call("/echo.Echo/Missing", b"x", &[]))
        .await
        .unwrap();
    assert_eq!(resp.headers()["grpc-status"], "5");
    assert!(
        http_body::Body::is_end_stream(resp.body()),
        "END_STREAM on the response HEADERS"
    );
    assert!(
        !resp.headers().contains_key("content-length"),
        "{:?}",
        resp.headers()
    );

    // `te: trailers` went to the HTTP/2 upstream on every call.
    assert_eq!(
        *te_seen.lock().unwrap(),
        vec!["trailers", "trailers", "trailers", "trailers"]
    );
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_grpc_requests_total{grpc_status="0",route="all"}"#),
        Some(&3.0)
    );
    assert_eq!(
        m.get(r#"rustygate_grpc_requests_total{grpc_status="5",route="all"}"#),
        Some(&1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_reach_grpc_clients_as_grpc_statuses() {
    // Nothing listens upstream: 502 → UNAVAILABLE.
    let dead = format!("http://127.0.0.1:{}", common::dead_port());
    let files = proxy_to(&[dead], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;
    let r = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"x", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "14");
    assert!(r.headers.contains_key("grpc-message"));
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert!(
        !r.headers.contains_key("content-length"),
        "a trailers-only answer carries no length: {:?}",
        r.headers
    );
    assert!(r.body.is_empty());
    // The same failure for a plain HTTP client stays a 502.
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!(r.status, 502);

    // A slow upstream and the client's own deadline: DEADLINE_EXCEEDED, not the route's 30 s.
    let slow = H2Backend::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        Response::new(full(""))
    });
    gw.swap(&as_refs(&proxy_to(
        &[slow.url()],
        "protocol = \"http2\"",
        "timeout = \"30s\"",
    )));
    let call = h2.send_request(grpc_call(
        "/echo.Echo/Unary",
        b"x",
        &[("grpc-timeout", "200m")],
    ));
    let r = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("answered before the upstream")
        .unwrap();
    let r = whole(r).await;
    assert_eq!(r.headers["grpc-status"], "4");

    // Rate limited: RESOURCE_EXHAUSTED, with Retry-After kept.
    let be = grpc_backend(Arc::default());
    gw.swap(&as_refs(&proxy_to(
        &[be.url()],
        "protocol = \"http2\"",
        "rate_limit = { requests = 1, per = \"1m\" }",
    )));
    let first = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"x", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first.trailers.unwrap()["grpc-status"], "0");
    let second = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"x", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["grpc-status"], "8");
    assert!(second.headers.contains_key("retry-after"));

    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_grpc_requests_total{grpc_status="14",route="all"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"rustygate_grpc_requests_total{grpc_status="4",route="all"}"#),
        Some(&1.0)
    );
    // Counted by the status that went on the wire (200), the gRPC code beside it; the plain
    // client's 502 as a 502.
    let count = |method: &str, status: &str| {
        m.get(&format!(
            r#"rustygate_requests_total{{method="{method}",route="all",status="{status}"}}"#
        ))
        .copied()
    };
    assert_eq!(
        [
            count("POST", "200"),
            count("POST", "502"),
            count("POST", "504"),
            count("POST", "429"),
            count("GET", "502"),
        ],
        [Some(4.0), None, None, None, Some(1.0)]
    );
}

static FLOOD_ENDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A client that keeps its connection (it answers PINGs) but never makes room for a response
/// (its stream window stays full) is cut at the send timeout, and the upstream connection with
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_grants_no_window_is_cut_at_the_send_timeout() {
    let flooding = scripted_upstream(|s| {
        use std::io::Write;
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = std::time::Instant::now();
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n");
        let chunk = [b'x'; 64 * 1024];
        while started.elapsed() < Duration::from_secs(20) && s.write_all(&chunk).is_ok() {}
        FLOOD_ENDED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let mut files = proxy_to(&[format!("http://{flooding}")], "", "");
    files.push((
        "gateway.toml",
        "[limits]\nsend_timeout = \"1s\"\n".to_owned(),
    ));
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;
    // The head is read, the body never: the client's window for the stream stays full.
    let resp = h2.send_request(get("/big")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    let ended = tokio::task::spawn_blocking(|| {
        common::wait_until(Duration::from_secs(6), || {
            FLOOD_ENDED.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
    })
    .await
    .unwrap();
    assert!(
        ended,
        "upstream still sending after {:?}",
        started.elapsed()
    );
    assert_eq!(
        scrape(&gw).get(r#"rustygate_client_timeouts_total{phase="send"}"#),
        Some(&1.0)
    );
    drop(resp);
}

/// Streams the gateway itself ends (an upstream stalled past `read_timeout`) are not resets by
/// the client: however many, they never bring the rapid-reset GOAWAY on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_gateway_aborts_do_not_count_as_client_resets() {
    let stalling = scripted_upstream(|s| {
        use std::io::Write;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123");
        std::thread::sleep(Duration::from_secs(5));
    });
    let mut files = proxy_to(
        &[format!("http://{stalling}")],
        "",
        "read_timeout = \"300ms\"",
    );
    files.push((
        "gateway.toml",
        "[limits]\nhttp2_max_resets_per_second = 2\n".to_owned(),
    ));
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (h2, _conn) = connect(gw.addr).await;
    let calls = (0..6).map(|i| {
        let mut h2 = h2.clone();
        async move {
            let resp = h2.send_request(get(&format!("/s/{i}"))).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(resp.into_body().collect().await.is_err(), "cut short");
        }
    });
    futures_util::future::join_all(calls).await;
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_http2_goaway_total{reason="resets"}"#)
            .copied()
            .unwrap_or(0.0),
        0.0,
        "GOAWAY for resets the client did not make"
    );
    // The connection still serves.
    let quick = Backend::fixed(200, "fine");
    gw.swap(&as_refs(&proxy_to(&[quick.url()], "", "")));
    let mut h2 = h2.clone();
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!(r.status, 200);
}

/// Neither a deadline the client chose nor a stream the upstream refused says the target is
/// down: a client sending either, however often, must not get it ejected for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_deadline_or_a_refused_stream_never_ejects_the_target() {
    let be = H2Backend::start_fallible(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/echo.Echo/Slow" => tokio::time::sleep(Duration::from_millis(600)).await,
            "/echo.Echo/Refuse" => return Err(std::io::Error::other("refused")),
            _ => {}
        }
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(full(""))
            .unwrap())
    });
    // The default passive ejection: five failures in a row take a target out.
    let files = proxy_to(&[be.url()], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;
    for _ in 0..6 {
        let call = grpc_call("/echo.Echo/Slow", b"x", &[("grpc-timeout", "50m")]);
        let r = whole(h2.send_request(call).await.unwrap()).await;
        assert_eq!(r.headers["grpc-status"], "4", "{:?}", r.headers);
    }
    for _ in 0..6 {
        let call = grpc_call("/echo.Echo/Refuse", b"x", &[]);
        let r = whole(h2.send_request(call).await.unwrap()).await;
        assert_eq!(r.headers["grpc-status"], "14", "{:?}", r.headers);
        assert_eq!(
            r.headers["grpc-message"], "the upstream refused the request",
            "{:?}",
            r.headers
        );
    }
    let r = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"x", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.headers["grpc-status"], "0",
        "still in rotation: {:?}",
        r.headers
    );
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_upstream_errors_total{kind="stream_reset",upstream="be"}"#),
        Some(&6.0),
        "{m:?}"
    );
}

/// A WebSocket handshake is HTTP/1.1's. To a route whose upstream speaks HTTP/2 it went out as
/// a handshake on an HTTP/1.1 connection: the HTTP/2-only target failed it, and five such
/// handshakes (anyone's) ejected the target for everyone. It goes as a plain request now,
/// without its upgrade headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_to_an_http2_upstream_go_as_plain_requests() {
    let upgrades = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&upgrades);
    let be = H2Backend::start(move |req: Request<Incoming>| {
        if req.headers().contains_key("upgrade") || req.headers().contains_key("connection") {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        async { Response::new(full("h2")) }
    });
    let files = proxy_to(&[be.url()], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let handshake = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for _ in 0..6 {
        let reply = common::raw(
            gw.addr,
            format!("GET /chat HTTP/1.1\r\nHost: test\r\n{handshake}\r\n").as_bytes(),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("h2"), "{reply}");
    }
    assert_eq!(
        upgrades.load(Ordering::SeqCst),
        0,
        "upgrade headers forwarded"
    );
    // Still in rotation.
    let (status, body) = common::http(&gw.addr.to_string(), "GET", "/", &[], b"").unwrap();
    assert_eq!((status, body.as_str()), (200, "h2"));
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_upstream_errors_total{kind="connect",upstream="be"}"#),
        Some(&0.0),
        "{m:?}"
    );
}

/// An h2c upstream on 127.0.0.1:0, on a thread of its own: `serve` serves each connection it
/// accepts (with the `h2` crate, frame by frame).
fn h2_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock));
            }
        });
    });
    addr
}

/// An h2c upstream that refuses every other stream with `REFUSED_STREAM` (RFC 9113 §8.7: not
/// processed) and answers the rest "ok".
fn refusing_h2_upstream(refused: Arc<AtomicUsize>) -> SocketAddr {
    let streams = Arc::new(AtomicUsize::new(0));
    h2_upstream(move |sock| {
        let (streams, refused) = (Arc::clone(&streams), Arc::clone(&refused));
        async move {
            let Ok(mut conn) = h2::server::handshake(sock).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                if streams.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                    refused.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                } else if let Ok(mut body) = respond.send_response(
                    http::Response::builder()
                        .header("content-length", "2")
                        .body(())
                        .unwrap(),
                    false,
                ) {
                    let _ = body.send_data(Bytes::from_static(b"ok"), true);
                }
            }
        }
    })
}

/// A stream an HTTP/2 upstream refused unprocessed (`REFUSED_STREAM`, or left out by a graceful
/// GOAWAY, as upstreams restarting do) is sent again like a request that never left, and is
/// not the target's failure. It was a 502, not retried, counting towards ejection (a GOAWAY'd
/// stream) or not retried (a refused one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_an_http2_upstream_refused_unprocessed_are_sent_again() {
    let refused = Arc::new(AtomicUsize::new(0));
    let be = refusing_h2_upstream(Arc::clone(&refused));
    let files = proxy_to(&[format!("http://{be}")], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    for _ in 0..6 {
        let (status, body) = common::http(&gw.addr.to_string(), "GET", "/", &[], b"").unwrap();
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    assert_eq!(
        refused.load(Ordering::SeqCst),
        6,
        "each request refused once"
    );
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_upstream_errors_total{kind="refused",upstream="be"}"#),
        Some(&6.0),
        "{m:?}"
    );
}

/// A TCP relay on 127.0.0.1:0 to `to` whose connections can be made to go silent, as if the
/// upstream's host had vanished without closing them: what the gateway sends is read and
/// dropped, nothing comes back, the socket stays open.
struct SilencingRelay {
    addr: SocketAddr,
    /// One flag per connection accepted, set to silence it.
    silenced: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    /// Connections the gateway closed.
    closed: Arc<AtomicUsize>,
}

impl SilencingRelay {
    fn start(to: SocketAddr) -> SilencingRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let silenced: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> =
            Arc::default();
        let closed = Arc::new(AtomicUsize::new(0));
        let (flags, closed_count) = (Arc::clone(&silenced), Arc::clone(&closed));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((gateway, _)) = listener.accept().await {
                    let upstream = tokio::net::TcpStream::connect(to).await.unwrap();
                    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    flags.lock().unwrap().push(Arc::clone(&silent));
                    let closed = Arc::clone(&closed_count);
                    let (mut gr, mut gw) = gateway.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let quiet = Arc::clone(&silent);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match gr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) if !quiet.load(Ordering::SeqCst) => {
                                    if uw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => {}
                            }
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = ur.read(&mut buf).await {
                            if n == 0 || silent.load(Ordering::SeqCst) {
                                break;
                            }
                            if gw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        // Silent from here on, the socket held open.
                        std::future::pending::<()>().await;
                        drop(gw);
                    });
                }
            });
        });
        SilencingRelay {
            addr,
            silenced,
            closed,
        }
    }

    /// Silences every connection accepted so far.
    fn silence(&self) {
        for f in self.silenced.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }

    fn accepted(&self) -> usize {
        self.silenced.lock().unwrap().len()
    }
}

/// An upstream HTTP/2 connection whose peer went silent without closing it is found by its
/// unanswered PING, closed, and no longer used: the next request opens a new one. Without
/// PINGs the pool kept handing out the dead connection, and each request on it waited for its
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_http2_connection_that_stops_answering_pings_is_replaced() {
    let be = H2Backend::start(|_req| async { Response::new(full("ok")) });
    let relay = SilencingRelay::start(be.addr);
    // Kept in the pool far longer than the test: only a PING can end it.
    let files = proxy_to(
        &[format!("http://{}", relay.addr)],
        "protocol = \"http2\"\nidle_timeout = \"5m\"",
        "timeout = \"30s\"",
    );
    let dir = common::repo(&as_refs(&files));
    let opts = ServeOptions {
        workers: 1,
        upstream_h2_ping: rustygate::proxy::pool::H2Ping {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
        },
        ..ServeOptions::default()
    };
    let mut gw = Gateway::start_dir(dir.path(), opts);
    gw.keep_repo(dir);
    let get = |addr: SocketAddr| common::http(&addr.to_string(), "GET", "/", &[], b"").unwrap();

    let (status, body) = tokio::task::spawn_blocking(move || get(gw.addr))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(relay.accepted(), 1);
    // Answered PINGs keep the connection.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        relay.closed.load(Ordering::SeqCst),
        0,
        "an answering upstream"
    );

    relay.silence();
    let closed = Arc::clone(&relay.closed);
    let dropped = tokio::task::spawn_blocking(move || {
        common::wait_until(Duration::from_secs(5), || {
            closed.load(Ordering::SeqCst) == 1
        })
    })
    .await
    .unwrap();
    assert!(dropped, "the silent connection is still open");

    let addr = gw.addr;
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || get(addr)),
    )
    .await
    .expect("answered on a new connection, not after the timeout")
    .unwrap();
    assert_eq!((answered.0, answered.1.as_str()), (200, "ok"));
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_share_the_listener() {
    let (be, hits) = counting_backend();
    let files = proxy_to(&[be.url()], "", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    // HTTP/1.1 methods that start like the preface (`P…`) are still HTTP/1.1.
    for method in ["GET", "POST", "PUT", "PATCH"] {
        let (status, body) =
            common::http(&gw.addr.to_string(), method, "/", &[], b"").expect("answer");
        assert_eq!((status, body.as_str()), (200, "hi"), "{method}");
    }
    let (mut h2, _conn) = connect(gw.addr).await;
    let r = whole(h2.send_request(get("/")).await.unwrap()).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"hi"[..]));
    assert_eq!(hits.load(Ordering::SeqCst), 5);
}

/// Whether a real peer's tool is here; outside CI a missing one skips its part (CI installs it,
/// so there the test always runs).
fn installed(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is installed by .ci/run"
        );
        eprintln!("{name} not installed: skipped");
    }
    found
}

#[test]
fn curl_and_h2load_speak_http2_to_the_gateway() {
    let be = Backend::fixed(200, "hello");
    let files = proxy_to(&[be.url()], "", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    if installed("curl") {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-o",
                "-",
                "-w",
                "\n%{http_version}",
            ])
            .arg(gw.url("/x"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n2");
    }
    if installed("h2load") {
        let out = std::process::Command::new("h2load")
            .args(["-n", "2000", "-c", "4", "-m", "10"])
            .arg(gw.url("/"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("2000 succeeded, 0 failed") && text.contains("2000 2xx"),
            "{text}"
        );
        // Streams that end normally never count as resets, however fast they come.
        let m = scrape(&gw);
        assert_eq!(
            m.get(r#"rustygate_http2_goaway_total{reason="resets"}"#),
            Some(&0.0)
        );
    }
}

/// A graceful stop: a stream in flight finishes, and both the busy and the idle connection are
/// closed right after, not at the end of the grace period (30 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_lets_the_stream_in_flight_finish_and_closes_the_connections() {
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let be = Backend::start(move |req: Request<Incoming>| {
        let arrived_tx = arrived_tx.clone();
        async move {
            if req.uri().path() == "/slow" {
                let _ = arrived_tx.send(());
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            Response::new(full("ok"))
        }
    });
    let gw = Gateway::start(&as_refs(&proxy_to(&[be.url()], "", "")));
    let (mut busy, busy_conn) = connect(gw.addr).await;
    let (mut idle, idle_conn) = connect(gw.addr).await;
    for tx in [&mut busy, &mut idle] {
        let r = whole(tx.send_request(get("/")).await.unwrap()).await;
        assert_eq!(r.status, 200);
    }

    let slow = tokio::spawn(async move {
        let resp = busy.send_request(get("/slow")).await.unwrap();
        whole(resp).await
    });
    tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("the slow request reached the backend");
    let stopping = gw.stop_gracefully();

    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the stream in flight finished")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ok");
    for (name, conn) in [("idle", idle_conn), ("busy", busy_conn)] {
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .unwrap_or_else(|_| panic!("the {name} connection was left open"))
            .unwrap();
    }
    // New connections are refused once the stop has begun.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
    tokio::task::spawn_blocking(move || stopping.join().unwrap())
        .await
        .unwrap();
}

/// A gRPC call that no route matches is counted under `route="<none>"`, as every other family
/// counts unmatched requests (it was `route=""`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_grpc_calls_are_counted_under_no_route() {
    let files = [(
        "routes/r.toml",
        "[[route]]\nname = \"health\"\npath = \"/healthz\"\nrespond = { status = 200 }\n",
    )];
    let gw = start(&files, Duration::from_secs(75));
    let (mut h2, _conn) = connect(gw.addr).await;
    let r = whole(
        h2.send_request(grpc_call("/echo.Echo/Unary", b"hello", &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = scrape(&gw);
    let unmatched: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("rustygate_grpc_requests_total{"))
        .collect();
    assert_eq!(unmatched.len(), 1, "{unmatched:?}");
    assert!(unmatched[0].0.contains("route=\"<none>\""), "{unmatched:?}");
}

/// A backend that reads each request (its `Content-Length` body) and answers with the body's
/// length, keeping its connections alive; and how many connections it has accepted.
fn upload_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((n, v)) = line.split_once(':')
                            && n.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let text = len.to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if out.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// One HTTP/2 client connection with 128 streams, each announcing a body of 1000 bytes and
/// sending 1: over HTTP/1.1 a client connection holds at most one upstream connection that
/// way, and here at most `http2_max_streaming_uploads` (8) are held while the bodies trickle;
/// the other streams' bodies are read whole first, and all 128 are answered, their bodies
/// forwarded whole. Each of them held an upstream connection of its own until
/// `body_idle_timeout` (128 accepted). With 0 places every body is read whole first: none is
/// held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_trickling_bodies_hold_at_most_the_capped_upstream_connections() {
    trickle(8).await;
    trickle(0).await;
}

async fn trickle(cap: usize) {
    const STREAMS: usize = 128;
    let (be, accepted) = upload_backend();
    let mut files = proxy_to(&[format!("http://{be}")], "", "");
    files.push((
        "gateway.toml",
        format!("[limits]\nhttp2_max_streaming_uploads = {cap}\n"),
    ));
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let req = http::Request::post(format!("http://gateway.test/up/{i}"))
            .header("content-length", "1000")
            .body(())
            .unwrap();
        let (resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(Bytes::from_static(b"x"), false).unwrap();
        streams.push((resp, body));
        client = client.ready().await.unwrap();
    }
    // The first `cap` streams reach the backend; the others' bodies are read first.
    let count = Arc::clone(&accepted);
    let reached = tokio::task::spawn_blocking(move || {
        common::wait_until(Duration::from_secs(10), || {
            count.load(Ordering::SeqCst) >= cap
        })
    })
    .await
    .unwrap();
    assert!(reached, "{} accepted", accepted.load(Ordering::SeqCst));
    // A moment for any stream over the cap to connect too (it never should).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), cap);
    // The bodies end: every stream is answered, with its whole body forwarded.
    let mut answers = Vec::new();
    for (resp, mut body) in streams {
        body.send_data(Bytes::from(vec![b'y'; 999]), true).unwrap();
        answers.push(resp);
    }
    for (i, resp) in answers.into_iter().enumerate() {
        assert_eq!(
            h2_answer(resp).await,
            (200, "1000".to_owned()),
            "stream {i}"
        );
    }
}

/// Uploads over the cap whose bodies are larger than the connection's flow-control window, sent
/// half of each body first, then the other halves (64 streams of 400 kB on one connection, 8
/// places): all are answered. Had the streams over the cap waited for a place, their unread
/// data would have filled the connection's window (1 MiB), and the streams with a place, their
/// second halves queued behind it, would never have received the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_cap_larger_than_the_window_all_complete() {
    const STREAMS: usize = 64;
    const HALF: usize = 200_000;
    let (be, _accepted) = upload_backend();
    let mut files = proxy_to(&[format!("http://{be}")], "", "");
    files.push((
        "gateway.toml",
        "[limits]\nhttp2_max_streaming_uploads = 8\n".to_owned(),
    ));
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let req = http::Request::post(format!("http://gateway.test/big/{i}"))
            .header("content-length", (2 * HALF).to_string())
            .body(())
            .unwrap();
        let (resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(Bytes::from(vec![b'a'; HALF]), false)
            .unwrap();
        streams.push((resp, body));
        client = client.ready().await.unwrap();
    }
    let mut answers = Vec::new();
    for (resp, mut body) in streams {
        body.send_data(Bytes::from(vec![b'b'; HALF]), true).unwrap();
        answers.push(resp);
    }
    for (i, resp) in answers.into_iter().enumerate() {
        assert_eq!(
            h2_answer(resp).await,
            (200, (2 * HALF).to_string()),
            "stream {i}"
        );
    }
}

/// An h2c connection to the gateway with the `h2` crate's client, which sends a body in as
/// many pieces as a test likes.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

/// Sends a POST with `body` on a new stream (ending it with the body if `end`).
async fn h2_upload(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    body: Vec<u8>,
    end: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    *client = client.clone().ready().await.unwrap();
    let req = http::Request::post(format!("http://gateway.test{path}"))
        .body(())
        .unwrap();
    let (resp, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(Bytes::from(body), end).unwrap();
    (resp, stream)
}

/// The status and body of an `h2` response, within 30 s.
async fn h2_answer(resp: h2::client::ResponseFuture) -> (u16, String) {
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("no answer within 30 s")
        .unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&got).into_owned())
}

/// The bodies an HTTP/2 client streams to an HTTP/1.1 upstream when no place among the
/// connection's streamed uploads is free (here none: `http2_max_streaming_uploads = 0`) are
/// read whole first, and that reading keeps the limits: a body over the route's
/// `max_body_size` gets 413, one that would take the worker past `max_buffered_bodies` 503 (the
/// share is given back: a smaller body goes through after it), one that pauses past
/// `body_idle_timeout` 408. None of them reaches the upstream. No body declares its length, so
/// none is refused before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_read_whole_keep_the_size_room_and_idle_limits() {
    let (be, hits) = counting_backend();
    let files = vec![
        (
            "routes/r.toml",
            "[[route]]\nname = \"small\"\nprefix = \"/small\"\nupstream = \"be\"\n\
             max_body_size = \"1KiB\"\n\n\
             [[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n"
                .to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url()),
        ),
        (
            "gateway.toml",
            "[limits]\nhttp2_max_streaming_uploads = 0\nmax_buffered_bodies = \"8KiB\"\n\
             body_idle_timeout = \"1s\"\n"
                .to_owned(),
        ),
    ];
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let mut client = h2_client(gw.addr).await;
    let error = |body: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["error"].as_str().unwrap().to_owned()
    };

    let (resp, _s) = h2_upload(&mut client, "/small/x", vec![b'a'; 2048], true).await;
    let (status, body) = h2_answer(resp).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        error(&body),
        "request body is larger than this route accepts"
    );

    let (resp, _s) = h2_upload(&mut client, "/big", vec![b'b'; 16 * 1024], true).await;
    let (status, body) = h2_answer(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        error(&body),
        "the gateway is holding too many request bodies; try again"
    );
    let (resp, _s) = h2_upload(&mut client, "/fits", vec![b'c'; 4096], true).await;
    assert_eq!(h2_answer(resp).await, (200, "hi".to_owned()));

    // Part of a body, then nothing (the stream stays open): 408 once the idle time is over.
    let (resp, _s) = h2_upload(&mut client, "/pause", vec![b'd'; 100], false).await;
    let (status, body) = h2_answer(resp).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(error(&body), "the request body was not received in time");
    assert_eq!(
        scrape(&gw).get("rustygate_client_timeouts_total{phase=\"body\"}"),
        Some(&1.0)
    );

    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "only the body that fit went upstream"
    );
}

/// An h2c upstream that grants no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0) and
/// never answers: the gateway can send it none of a request's body.
fn windowless_h2_upstream() -> SocketAddr {
    h2_upstream(|sock| async move {
        let handshake = h2::server::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(sock);
        let Ok(mut conn) = handshake.await else {
            return;
        };
        let mut held = Vec::new();
        while let Some(Ok(stream)) = conn.accept().await {
            held.push(stream);
        }
    })
}

/// A 31-bit window size or increment at the start of `p` (SETTINGS value, WINDOW_UPDATE).
fn word(p: &[u8]) -> i64 {
    i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff)
}

/// A bare HTTP/2 client that keeps count of its send windows itself, from the frames the
/// gateway sends (no client library tells how much of its connection's window is left).
struct RawH2 {
    tcp: std::net::TcpStream,
    conn_window: i64,
    /// SETTINGS_INITIAL_WINDOW_SIZE as the gateway last set it.
    initial: i64,
    windows: std::collections::HashMap<u32, i64>,
    /// Whether the gateway's PINGs are answered.
    answer_pings: bool,
}

impl RawH2 {
    fn connect(addr: SocketAddr) -> RawH2 {
        use std::io::Write;
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut c = RawH2 {
            tcp,
            conn_window: 65_535,
            initial: 65_535,
            windows: std::collections::HashMap::new(),
            answer_pings: true,
        };
        c.frame(0x4, 0, 0, &[]);
        // The gateway's SETTINGS come first.
        while c.next_frame().0 != 0x4 {}
        c
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        use std::io::Write;
        self.tcp
            .write_all(&h2_frame(kind, flags, stream, payload))
            .unwrap();
    }

    /// Reads one frame and keeps the windows: `(type, flags, stream, payload)`. Panics when
    /// none comes within 10 s, or when it ends a stream or the connection.
    fn next_frame(&mut self) -> (u8, u8, u32, Vec<u8>) {
        let frame = self
            .read_frame()
            .expect("no frame from the gateway within 10 s");
        if matches!(frame.0, 0x3 | 0x7) {
            panic!("the gateway ended stream {} or the connection", frame.2);
        }
        frame
    }

    /// Like [`RawH2::next_frame`], but `None` when no frame comes within the socket's read
    /// timeout, and RST_STREAM and GOAWAY are returned like any frame.
    fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        use std::io::Read;
        let mut head = [0u8; 9];
        self.tcp.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.tcp.read_exact(&mut payload).unwrap();
        match head[3] {
            // SETTINGS (not an ACK): INITIAL_WINDOW_SIZE moves every stream's window.
            0x4 if head[4] & 1 == 0 => {
                for s in payload.chunks(6) {
                    if s[..2] == [0, 4] {
                        let new = word(&s[2..]);
                        for w in self.windows.values_mut() {
                            *w += new - self.initial;
                        }
                        self.initial = new;
                    }
                }
                self.frame(0x4, 1, 0, &[]);
            }
            0x8 if stream == 0 => self.conn_window += word(&payload),
            0x8 => *self.windows.entry(stream).or_insert(0) += word(&payload),
            // PING: answered.
            0x6 if head[4] & 1 == 0 && self.answer_pings => self.frame(0x6, 1, 0, &payload),
            _ => {}
        }
        Some((head[3], head[4], stream, payload))
    }

    /// Reads frames until GOAWAY; its error code. Panics when none comes within 10 s.
    fn goaway(&mut self) -> u32 {
        self.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            match self.read_frame() {
                Some((0x7, _, _, p)) => return u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                Some(_) => {}
                None => panic!("no GOAWAY from the gateway within 10 s"),
            }
        }
    }

    /// Opens stream `id`: a POST to `path`, its body to come.
    fn post(&mut self, id: u32, path: &str) {
        self.frame(0x1, 0x4, id, &common::h2_request_block("POST", path));
        self.windows.insert(id, self.initial);
    }

    /// What stream `id` may send now.
    fn room(&self, id: u32) -> i64 {
        self.windows[&id].min(self.conn_window)
    }

    fn data(&mut self, id: u32, bytes: &[u8], end: bool) {
        let n = bytes.len() as i64;
        assert!(self.room(id) >= n);
        self.conn_window -= n;
        *self.windows.get_mut(&id).unwrap() -= n;
        self.frame(0x0, u8::from(end), id, bytes);
    }
}

/// A stream whose upstream takes none of its body holds at most its own flow-control window
/// (64 KiB) of its connection's: when it has used all of its window, the connection still has
/// room, and another stream's upload goes through. With hyper's defaults a stream's window was
/// the connection's whole window (1 MiB each): the stuck upload used up both at once. The
/// gateway gives back only what it reads of that body (a few pieces, then its upstream takes
/// no more), and the stuck stream's own window grows back by as much, so in the end it held
/// the connection's whole window and no other stream of the connection could send a byte.
#[test]
fn an_upload_stuck_on_its_upstream_leaves_window_for_the_other_streams() {
    let stuck = windowless_h2_upstream();
    let bodies: Arc<std::sync::Mutex<Vec<Bytes>>> = Arc::default();
    let seen = Arc::clone(&bodies);
    let echo = Backend::start(move |req: Request<Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(body);
            Response::new(full("ok"))
        }
    });
    let files = vec![
        (
            "routes/r.toml",
            "[[route]]\nname = \"stuck\"\nprefix = \"/stuck\"\nupstream = \"stuck\"\n\n\
             [[route]]\nname = \"echo\"\nprefix = \"/\"\nupstream = \"echo\"\n"
                .to_owned(),
        ),
        (
            "upstreams/u.toml",
            format!(
                "[upstream.stuck]\ntargets = [\"http://{stuck}\"]\nprotocol = \"http2\"\n\n\
                 [upstream.echo]\ntargets = [\"{}\"]\n",
                echo.url()
            ),
        ),
    ];
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    let mut c = RawH2::connect(gw.addr);
    c.post(1, "/stuck/up");
    // The stuck stream sends until its own window is used up (at most 8 MiB, 16 KiB a frame);
    // while the connection's window stops it first, the client waits for the gateway to give
    // some back.
    let piece = vec![b's'; 16 * 1024];
    let mut sent = 0usize;
    while c.windows[&1] > 0 {
        assert!(sent < 8 << 20, "the stuck stream was never stopped");
        let n = c.room(1).min(piece.len() as i64) as usize;
        if n == 0 {
            c.next_frame();
            continue;
        }
        c.data(1, &piece[..n], false);
        sent += n;
    }
    assert!(
        c.conn_window > 0,
        "the stuck stream took the connection's whole window ({sent} bytes sent)"
    );
    c.post(3, "/echo");
    c.data(3, b"ping", true);
    // The answer's HEADERS on stream 3.
    while !matches!(c.next_frame(), (0x1, _, 3, _)) {}
    assert_eq!(*bodies.lock().unwrap(), [Bytes::from_static(b"ping")]);
}

/// A TCP relay on loopback to `to` that holds every piece it forwards for `delay`, both ways:
/// a client link with a round trip of twice `delay`, for this test only (no netem).
fn delay_relay(to: SocketAddr, delay: Duration) -> SocketAddr {
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
        let writer = tokio::spawn(async move {
            while let Some((due, piece)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&piece).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
    }
    h2_upstream(move |client| async move {
        let Ok(gateway) = tokio::net::TcpStream::connect(to).await else {
            return;
        };
        let (cr, cw) = client.into_split();
        let (gr, gw) = gateway.into_split();
        tokio::join!(pipe(cr, gw, delay), pipe(gr, cw, delay));
    })
}

/// An upload over a link with a 60 ms round trip (a relay that holds each piece 30 ms each
/// way) has 1 MiB (`http2_stream_window`'s default) out at once before the gateway's window
/// updates come back, and its 4 MiB reach the backend whole. With a 64 KiB window the client
/// stalled after each 64 KiB: 64 round trips for 4 MiB, about 1.1 MB/s at 60 ms.
#[test]
fn an_upload_over_a_long_round_trip_has_a_mebibyte_in_flight() {
    const UPLOAD: usize = 4 << 20;
    let got = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&got);
    let echo = Backend::start(move |req: Request<Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.store(body.len(), Ordering::SeqCst);
            Response::new(full("ok"))
        }
    });
    let gw = start(
        &as_refs(&proxy_to(&[echo.url()], "", "")),
        Duration::from_secs(75),
    );
    let relay = delay_relay(gw.addr, Duration::from_millis(30));
    let mut c = RawH2::connect(relay);
    let started = std::time::Instant::now();
    c.post(1, "/up");
    let piece = vec![b'u'; 16 * 1024];
    let (mut sent, mut most_in_flight, mut stalls) = (0usize, 0i64, 0usize);
    while sent < UPLOAD {
        let n = c.room(1).min(piece.len() as i64) as usize;
        if n == 0 {
            // Sent and not yet given back by the gateway (its window updates on the stream).
            most_in_flight = most_in_flight.max(c.initial - c.windows[&1]);
            stalls += 1;
            c.next_frame();
            continue;
        }
        let n = n.min(UPLOAD - sent);
        sent += n;
        c.data(1, &piece[..n], sent == UPLOAD);
    }
    while !matches!(c.next_frame(), (0x1, _, 1, _)) {}
    let took = started.elapsed();
    eprintln!(
        "4 MiB through a 60 ms round trip: {took:?} ({:.1} MB/s), {stalls} stalls, at most {most_in_flight} bytes in flight, stream window {}",
        UPLOAD as f64 / took.as_secs_f64() / 1e6,
        c.initial
    );
    assert_eq!(got.load(Ordering::SeqCst), UPLOAD);
    assert!(
        most_in_flight >= 1 << 20,
        "the client never had more than {most_in_flight} bytes out before a window update"
    );
}

/// A client that sends all the window it is given on 32 streams whose upstream takes nothing
/// makes the gateway hold no more than the connection's window (`http2_connection_window`,
/// 16 MiB by default): the gateway gives window back only for the few pieces of each body it
/// has taken towards the upstream. One DATA frame past the window ends the connection with
/// GOAWAY(FLOW_CONTROL_ERROR); the gateway's memory grew by about what it held.
#[test]
fn a_client_filling_every_window_of_a_stuck_upstream_is_held_to_the_connection_window() {
    const WINDOW: usize = 16 << 20;
    let stuck = windowless_h2_upstream();
    let files = vec![
        (
            "routes/r.toml",
            "[[route]]\nname = \"stuck\"\nprefix = \"/\"\nupstream = \"stuck\"\n".to_owned(),
        ),
        (
            "upstreams/u.toml",
            format!("[upstream.stuck]\ntargets = [\"http://{stuck}\"]\nprotocol = \"http2\"\n"),
        ),
    ];
    let dir = common::repo(&as_refs(&files));
    let gw = common::GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let pid = gw.child.id();
    let before = common::rss(pid);
    let mut c = RawH2::connect(gw.listen.parse().unwrap());
    let ids: Vec<u32> = (0..32).map(|i| 2 * i + 1).collect();
    for &id in &ids {
        c.post(id, "/up");
    }
    let piece = vec![b'h'; 16 * 1024];
    let mut sent = 0usize;
    // Send all the room there is, take in what the gateway gives back, until it gives none.
    c.tcp
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..50 {
        for &id in &ids {
            while c.room(id) > 0 {
                let n = c.room(id).min(piece.len() as i64) as usize;
                c.data(id, &piece[..n], false);
                sent += n;
            }
        }
        let mut given_back = false;
        while let Some((kind, _, _, _)) = c.read_frame() {
            assert!(!matches!(kind, 0x3 | 0x7), "the gateway ended a stream");
            given_back |= kind == 0x8;
        }
        if !given_back {
            break;
        }
    }
    let grown = common::rss(pid).saturating_sub(before);
    eprintln!(
        "sent {sent} bytes on {} streams; the gateway's RSS grew by {} KiB",
        ids.len(),
        grown >> 10
    );
    assert!(sent >= WINDOW, "only {sent} bytes were let in");
    // The connection's window, and the pieces each stream's body has in flight towards its
    // upstream (a channel of 8, one being read, one being written; 16 KiB frames).
    assert!(
        sent <= WINDOW + ids.len() * 10 * 16 * 1024,
        "{sent} bytes were let in"
    );
    assert!(grown <= 2 * sent as u64, "RSS grew by {} MiB", grown >> 20);
    // Past the window: a stream with room of its own, none on the connection.
    let id = *ids.iter().find(|id| c.windows[id] > 0).unwrap();
    assert!(c.conn_window <= 0);
    c.frame(0x0, 0, id, &piece);
    assert_eq!(c.goaway(), 0x3, "not FLOW_CONTROL_ERROR");
}

impl RawH2 {
    /// Reads frames (a GOAWAY among them) until stream `id` ends: whether its status was 200,
    /// and its DATA. Panics when the stream is reset or nothing comes within 10 s.
    fn answer(&mut self, id: u32) -> (bool, Vec<u8>) {
        let (mut ok, mut body) = (false, Vec::new());
        loop {
            let (kind, flags, stream, payload) = self
                .read_frame()
                .expect("the connection closed, or nothing came for 10 s, before the answer");
            if stream != id {
                continue;
            }
            match kind {
                // HEADERS: the gateway's HPACK encoder writes `:status: 200` as the indexed
                // field 8 (RFC 7541 Appendix A), first in the block.
                0x1 => ok |= payload.first() == Some(&0x88),
                0x0 => body.extend_from_slice(&payload),
                0x3 => panic!("the gateway reset stream {id}"),
                _ => {}
            }
            if flags & 0x1 != 0 {
                return (ok, body);
            }
        }
    }

    /// Whether the gateway has closed the connection: reads (and drops) frames until the
    /// socket ends, or until nothing comes for `limit`.
    fn closed_within(&mut self, limit: Duration) -> bool {
        use std::io::Read;
        self.tcp.set_read_timeout(Some(limit)).unwrap();
        while self.read_frame().is_some() {}
        self.tcp
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        match self.tcp.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

/// On SIGTERM an HTTP/2 connection without streams is closed soon after its GOAWAY even when
/// its client never answers the GOAWAY's PING, while one with a stream in flight keeps the
/// shutdown grace for it (its client does not answer either). The idle connection was held
/// until the end of the grace (60 s here): hyper waits for the PING's answer before it ends a
/// connection it sent GOAWAY on.
#[test]
fn at_shutdown_an_idle_http2_connection_that_never_answers_ping_is_closed_at_once() {
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel::<()>();
    let arrived_tx = std::sync::Mutex::new(arrived_tx);
    let be = Backend::start(move |req: Request<Incoming>| {
        let slow = req.uri().path() == "/slow";
        if slow {
            let _ = arrived_tx.lock().unwrap().send(());
        }
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Response::new(full("answer"))
        }
    });
    let dir = common::repo(&as_refs(&proxy_to(&[be.url()], "", "")));
    let mut gw = common::GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "60s",
        ],
        &[],
    );
    let addr: SocketAddr = gw.listen.parse().unwrap();
    let mut idle = RawH2::connect(addr);
    idle.answer_pings = false;
    idle.post(1, "/");
    idle.data(1, b"x", true);
    assert_eq!(idle.answer(1), (true, b"answer".to_vec()));
    let mut busy = RawH2::connect(addr);
    busy.answer_pings = false;
    busy.post(1, "/slow");
    busy.data(1, b"x", true);
    arrived_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the slow request reached the backend");

    common::sigterm(&gw.child);
    // Well before the 60 s grace; the gateway allows 1 s for the PING's answer.
    assert!(
        idle.closed_within(Duration::from_secs(10)),
        "the idle connection was left open after GOAWAY"
    );
    // The stream in flight (3 s at the backend) is answered whole, then its connection ends.
    assert_eq!(busy.answer(1), (true, b"answer".to_vec()));
    assert!(
        busy.closed_within(Duration::from_secs(10)),
        "the connection was left open after its last stream"
    );
    assert!(
        common::exit_within(&mut gw.child, Duration::from_secs(10)).is_some_and(|s| s.success()),
        "the gateway did not exit cleanly"
    );
}

/// What [`window_counting_h2_upstream`] knows of its connection: its send windows, counted from
/// the gateway's frames, and its streams.
#[derive(Default)]
struct UpstreamWindows {
    conn: i64,
    /// SETTINGS_INITIAL_WINDOW_SIZE as the gateway last set it.
    initial: i64,
    /// Stream id -> (window, bytes still to send, head sent); in the order the requests came.
    streams: std::collections::BTreeMap<u32, (i64, usize, bool)>,
    closed: bool,
}

/// A bare h2c upstream that answers its first `big` streams with 64 MiB each and later streams
/// with "ok", sending as much as the gateway's flow-control windows allow; it counts them from
/// the gateway's frames itself (no server library tells how much of its connection's window is
/// left). `stuck` is set once each of the big streams has used up its own window.
fn window_counting_h2_upstream(
    big: usize,
    stuck: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    use std::io::{Read, Write};
    use std::sync::{Condvar, Mutex};
    const BIG: usize = 64 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut reader) = sock else { return };
            let out = Arc::new(Mutex::new(reader.try_clone().unwrap()));
            let state = Arc::new((
                Mutex::new(UpstreamWindows {
                    conn: 65_535,
                    initial: 65_535,
                    ..UpstreamWindows::default()
                }),
                Condvar::new(),
            ));
            let frame =
                |out: &Mutex<std::net::TcpStream>, kind: u8, flags: u8, id: u32, p: &[u8]| {
                    out.lock()
                        .unwrap()
                        .write_all(&h2_frame(kind, flags, id, p))
                        .is_ok()
                };
            // Reads the gateway's frames and keeps the windows.
            let (r_state, r_out) = (Arc::clone(&state), Arc::clone(&out));
            std::thread::spawn(move || {
                let mut preface = [0u8; 24];
                let mut ok = reader.read_exact(&mut preface).is_ok();
                while ok {
                    let mut head = [0u8; 9];
                    if reader.read_exact(&mut head).is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut p = vec![0u8; len];
                    if reader.read_exact(&mut p).is_err() {
                        break;
                    }
                    let (lock, wake) = &*r_state;
                    let mut s = lock.lock().unwrap();
                    match head[3] {
                        0x4 if head[4] & 1 == 0 => {
                            for setting in p.chunks(6) {
                                if setting[..2] == [0, 4] {
                                    let new = word(&setting[2..]);
                                    let delta = new - s.initial;
                                    for w in s.streams.values_mut() {
                                        w.0 += delta;
                                    }
                                    s.initial = new;
                                }
                            }
                            ok = frame(&r_out, 0x4, 1, 0, &[]);
                        }
                        0x8 if id == 0 => s.conn += word(&p),
                        0x8 => {
                            if let Some(w) = s.streams.get_mut(&id) {
                                w.0 += word(&p);
                            }
                        }
                        0x1 => {
                            let body = if s.streams.len() < big { BIG } else { 2 };
                            let initial = s.initial;
                            s.streams.insert(id, (initial, body, false));
                        }
                        0x3 => {
                            s.streams.remove(&id);
                        }
                        0x6 if head[4] & 1 == 0 => ok = frame(&r_out, 0x6, 1, 0, &p),
                        0x7 => ok = false,
                        _ => {}
                    }
                    wake.notify_all();
                }
                r_state.0.lock().unwrap().closed = true;
                r_state.1.notify_all();
            });
            // Sends what the windows allow.
            let stuck = Arc::clone(&stuck);
            std::thread::spawn(move || {
                let (lock, wake) = &*state;
                let piece = vec![b'x'; 16 * 1024];
                frame(&out, 0x4, 0, 0, &[]);
                let mut s = lock.lock().unwrap();
                while !s.closed {
                    // :status 200 (static index 8), content-length (static 28) for the small ones.
                    let work =
                        s.streams.iter().find_map(|(&id, &(window, left, head))| {
                            let room = window.min(s.conn).min(piece.len() as i64).max(0) as usize;
                            (!head || (left > 0 && room > 0 && (left > 2 || room >= 2)))
                                .then_some((id, left, head, room.min(left)))
                        });
                    let Some((id, left, head, n)) = work else {
                        let big_streams: Vec<i64> = s
                            .streams
                            .values()
                            .filter(|w| w.1 > 2)
                            .map(|w| w.0)
                            .collect();
                        if big_streams.len() == big && big_streams.iter().all(|&w| w <= 0) {
                            stuck.store(true, Ordering::SeqCst);
                        }
                        s = wake.wait(s).unwrap();
                        continue;
                    };
                    let ok = if head {
                        let w = s.streams.get_mut(&id).unwrap();
                        w.0 -= n as i64;
                        w.1 -= n;
                        s.conn -= n as i64;
                        let end = u8::from(left == n);
                        let bytes = if left > 2 { &piece[..n] } else { &b"ok"[..] };
                        frame(&out, 0x0, end, id, bytes)
                    } else {
                        s.streams.get_mut(&id).unwrap().2 = true;
                        let block: &[u8] = if left > 2 {
                            &[0x88]
                        } else {
                            &[0x88, 0x0f, 0x0d, 0x01, b'2']
                        };
                        frame(&out, 0x1, 0x4, id, block)
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Clients slow to take large responses from an HTTP/2 upstream hold at most their streams'
/// windows (1 MiB each) of the upstream connection's: another client's request on the same
/// connection still gets its response. With hyper's defaults (2 MiB streams, 5 MiB connection)
/// three such clients held the connection's whole window before their streams' own were used
/// up, and every other response on the connection (any client's) got its head and no byte more:
/// seen by hand with curl, 200 and 0 bytes after 5 s.
#[test]
fn clients_slow_to_take_responses_leave_the_upstream_connection_window_to_the_others() {
    use std::io::Write;
    const SLOW: usize = 3;
    let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = window_counting_h2_upstream(SLOW, Arc::clone(&stuck));
    let files = proxy_to(&[format!("http://{up}")], "protocol = \"http2\"", "");
    let gw = start(&as_refs(&files), Duration::from_secs(75));
    // Clients that ask for a large response and read none of it (a small receive buffer, so
    // that little of it fits in the sockets).
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&gw.addr.into()).unwrap();
        let mut s: std::net::TcpStream = sock.into();
        s.write_all(format!("GET /big/{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        slow.push(s);
    }
    let held = common::wait_until(Duration::from_secs(20), || stuck.load(Ordering::SeqCst));
    assert!(
        held,
        "the upstream connection's window ran out before the slow streams' own windows did"
    );
    let answer = common::http(&gw.addr.to_string(), "GET", "/small", &[], b"");
    assert_eq!(answer, Some((200, "ok".to_owned())));
}
