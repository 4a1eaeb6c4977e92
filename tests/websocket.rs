//! WebSocket tunnels through the gateway: a real tokio-tungstenite client and echo server on
//! loopback, the unhappy paths first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the echo server saw.
#[derive(Debug)]
enum Event {
    /// A handshake it accepted, with its request headers (lower-case names).
    Open(Vec<(String, String)>),
    /// The client's close frame: code and reason.
    ClientClose(u16, String),
    /// The connection ended.
    Gone,
}

/// A tokio-tungstenite server on 127.0.0.1:0 that echoes every message. Text commands:
/// `close:<code>:<reason>` closes with that code, `drop` drops the TCP connection without a
/// close frame, `reset` resets it.
struct WsBackend {
    addr: SocketAddr,
    events: mpsc::Receiver<Event>,
}

impl WsBackend {
    fn start() -> WsBackend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, tx.clone()));
                }
            });
        });
        WsBackend { addr, events }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next event, waiting up to 10 s.
    fn next(&self) -> Event {
        self.events
            .recv_timeout(Duration::from_secs(10))
            .expect("the echo server reported within 10 s")
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, tx: mpsc::Sender<Event>) {
    let seen = tx.clone();
    let callback = move |req: &tungstenite::handshake::server::Request,
                         resp: tungstenite::handshake::server::Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let _ = seen.send(Event::Open(headers));
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        let _ = tx.send(Event::Gone);
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) if t.as_str() == "drop" => break,
            Message::Text(t) if t.as_str() == "reset" => {
                // RST instead of FIN.
                let _ = ws.get_ref().set_zero_linger();
                break;
            }
            Message::Text(t) if t.as_str().starts_with("close:") => {
                let mut parts = t.as_str().splitn(3, ':').skip(1);
                let code: u16 = parts.next().unwrap().parse().unwrap();
                let reason = parts.next().unwrap_or("").to_owned();
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    }))
                    .await;
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                    .unwrap_or((0, String::new()));
                let _ = tx.send(Event::ClientClose(code, reason));
            }
            m @ (Message::Text(_) | Message::Binary(_)) => {
                let echoed = ws.send(m).await;
                if echoed.is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    drop(ws);
    let _ = tx.send(Event::Gone);
}

async fn connect(addr: SocketAddr, path: &str) -> Result<Client, tungstenite::Error> {
    connect_with_head(addr, path).await.map(|(ws, _)| ws)
}

/// A handshake through the gateway: the client and the 101 it got.
async fn connect_with_head(
    addr: SocketAddr,
    path: &str,
) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
    let url = format!("ws://{addr}{path}");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("the handshake finished within 10 s")
}

/// The handshake's HTTP status when the gateway refused it.
async fn refused(addr: SocketAddr, path: &str) -> u16 {
    match connect(addr, path).await {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected the handshake to be refused"),
    }
}

/// The next message from the gateway, waiting up to 10 s; `None` when the connection ended
/// (closed or broken).
async fn recv(ws: &mut Client) -> Option<Message> {
    match tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the tunnel answered or ended within 10 s")
    {
        Some(Ok(m)) => Some(m),
        Some(Err(_)) | None => None,
    }
}

/// Reads until the connection ends (a close frame may come first); panics after 10 s.
async fn until_end(ws: &mut Client) {
    while recv(ws).await.is_some() {}
}

/// Waits for the echo server's connection to end (passing over a close frame it got).
fn gone(be: &WsBackend) {
    loop {
        match be.next() {
            Event::Gone => return,
            Event::ClientClose(..) => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }
}

fn opened(be: &WsBackend) -> Vec<(String, String)> {
    match be.next() {
        Event::Open(h) => h,
        other => panic!("expected a handshake, got {other:?}"),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn gateway(be_url: &str, route_extra: &str) -> Gateway {
    Gateway::start(&as_refs(&proxy_all(be_url, route_extra)))
}

fn ws_gauge(gw: &Gateway) -> f64 {
    scrape(gw)
        .get("rustygate_websocket_connections")
        .copied()
        .unwrap_or(-1.0)
}

// ---- refusals and plain forwarding ----

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_refusing_the_upgrade_has_its_status_relayed() {
    for status in [403u16, 426] {
        let be = Backend::fixed(status, "no websockets here");
        let gw = gateway(&be.url(), "");
        assert_eq!(refused(gw.addr, "/chat").await, status);
        assert_eq!(ws_gauge(&gw), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_101_without_a_valid_accept_is_a_502() {
    let upstream = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n",
    );
    let gw = gateway(&format!("http://{upstream}"), "");
    assert_eq!(refused(gw.addr, "/chat").await, 502);
    let no_upgrade = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    );
    let gw = gateway(&format!("http://{no_upgrade}"), "");
    assert_eq!(refused(gw.addr, "/chat").await, 502);
    assert_eq!(ws_gauge(&gw), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_closes_before_answering_is_a_502() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let gw = gateway(&format!("http://{addr}"), "");
    assert_eq!(refused(gw.addr, "/chat").await, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_runs_on_the_handshake_and_can_refuse_it() {
    let be = WsBackend::start();
    let files = proxy_all(&be.url(), "policy = \"policies/guard.rhai\"");
    let mut files = as_refs(&files);
    files.push((
        "policies/guard.rhai",
        "fn on_request(req) {\n    if req.path == \"/denied\" { return deny(403, \"no sockets\"); }\n    req.set_header(\"x-policy\", \"ran\");\n}\n",
    ));
    let gw = Gateway::start(&files);
    assert_eq!(refused(gw.addr, "/denied").await, 403);
    let mut ws = connect(gw.addr, "/allowed").await.unwrap();
    let headers = opened(&be);
    assert_eq!(header(&headers, "x-policy"), Some("ran"));
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Some(Message::text("hi")));
}

/// A handshake with this `Origin` (none: no such field, as a non-browser client).
async fn connect_from(
    addr: SocketAddr,
    origin: Option<&str>,
) -> Result<Client, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/chat").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("the handshake finished within 10 s")
    .map(|(ws, _)| ws)
}

/// Browsers send no preflight for WebSockets: on a route with CORS the handshake's Origin is
/// checked by the gateway (cross-site WebSocket hijacking).
#[tokio::test(flavor = "multi_thread")]
async fn a_route_with_cors_refuses_handshakes_from_other_origins() {
    let be = WsBackend::start();
    let gw = gateway(
        &be.url(),
        "cors = { allow_origins = [\"https://app.example.com\"] }",
    );
    for origin in ["https://evil.example.net", "null", "http://app.example.com"] {
        match connect_from(gw.addr, Some(origin)).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403, "{origin}"),
            other => panic!("{origin}: expected a 403, got {:?}", other.map(|_| ())),
        }
    }
    for origin in [Some("https://app.example.com"), None] {
        let mut ws = connect_from(gw.addr, origin).await.unwrap();
        opened(&be);
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Some(Message::text("hi")), "{origin:?}");
        drop(ws);
        gone(&be);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_with_websocket_false_forwards_a_plain_request() {
    let be = Backend::echo();
    let gw = gateway(&be.url(), "websocket = false");
    let reply = raw(
        gw.addr,
        b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "got {reply:?}");
    let body = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
    let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
    let names: Vec<&str> = echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"upgrade"), "{names:?}");
    assert!(!names.contains(&"connection"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_whose_policy_has_on_response_takes_no_upgrades_unless_it_says_so() {
    let be = WsBackend::start();
    let policy = "fn on_response(req, res) {\n    res.set_header(\"x-seen\", \"1\");\n}\n";
    let default_files = proxy_all(&be.url(), "policy = \"policies/resp.rhai\"");
    let mut files = as_refs(&default_files);
    files.push(("policies/resp.rhai", policy));
    let gw = Gateway::start(&files);
    // Forwarded without its upgrade headers: the echo server refuses a non-upgrade request.
    assert!(connect(gw.addr, "/chat").await.is_err());
    let opted_in = proxy_all(
        &be.url(),
        "policy = \"policies/resp.rhai\"\nwebsocket = true",
    );
    let mut files = as_refs(&opted_in);
    files.push(("policies/resp.rhai", policy));
    let gw = Gateway::start(&files);
    let (mut ws, head) = connect_with_head(gw.addr, "/chat").await.unwrap();
    // on_response ran on the 101's head.
    assert_eq!(head.headers().get("x-seen").unwrap(), "1");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Some(Message::text("hi")));
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_and_other_upgrade_tokens_are_never_forwarded() {
    let be = Backend::echo();
    let gw = gateway(&be.url(), "");
    let reply = raw(
        gw.addr,
        b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "got {reply:?}");
    let lower = reply.to_ascii_lowercase();
    assert!(!lower.contains("\"upgrade\""), "{reply}");
    assert!(!lower.contains("http2-settings"), "{reply}");
    assert!(!lower.contains("h2c"), "{reply}");

    // Served as a plain request, it keeps its connection (`curl --http2` on an http:// URL
    // sends this upgrade with every request): the next request on it is answered too.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    for path in ["/one", "/two"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{h2c}\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(path) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: upgrade"), "{head}");
    }
}

/// actix-http takes a head for a WebSocket handshake only when an `Upgrade` field is exactly
/// `websocket`; `websocket, foo` was a handshake to the gateway and not to actix: the upstream's
/// 101 reached the client chunk-encoded and the client's next bytes were parsed as requests.
/// Such a head is a plain request, on a connection that stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_listing_websocket_among_others_is_a_plain_request() {
    let be = Backend::echo();
    let gw = gateway(&be.url(), "");
    use std::io::{Read, Write};
    for upgrade in ["websocket, foo", "foo, websocket"] {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for path in ["/one", "/two"] {
            s.write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\
                     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains(path) {
                let n = s.read(&mut buf).unwrap();
                assert!(
                    n > 0,
                    "{upgrade}: closed after {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
            let reply = String::from_utf8_lossy(&got).to_ascii_lowercase();
            assert!(reply.starts_with("http/1.1 200"), "{upgrade}: {reply}");
            assert!(
                !reply.contains("\"upgrade\""),
                "{upgrade}: forwarded {reply}"
            );
            assert!(!reply.contains("connection: upgrade"), "{upgrade}: {reply}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_with_a_body_or_another_method_are_refused() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let head = "Host: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let with_body = format!("GET /chat HTTP/1.1\r\n{head}Content-Length: 5\r\n\r\nhello");
    assert!(raw(gw.addr, with_body.as_bytes()).starts_with("HTTP/1.1 400"));
    let chunked =
        format!("GET /chat HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(raw(gw.addr, chunked.as_bytes()).starts_with("HTTP/1.1 400"));
    let post = format!("POST /chat HTTP/1.1\r\n{head}\r\n");
    assert!(raw(gw.addr, post.as_bytes()).starts_with("HTTP/1.1 400"));
    let no_key = "GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n";
    assert!(raw(gw.addr, no_key.as_bytes()).starts_with("HTTP/1.1 400"));
    // None of them reached the upstream.
    assert!(be.events.recv_timeout(Duration::from_millis(200)).is_err());
}

/// A handshake that also asks `Expect: 100-continue` (no client does, but nothing forbids it)
/// gets its 101 and its tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_that_asks_for_100_continue_still_opens_its_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let head_end = loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(at) = text.find("HTTP/1.1 101")
            && let Some(end) = text[at..].find("\r\n\r\n")
        {
            break at + end + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the 101 within 5 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let before = String::from_utf8_lossy(&got[..head_end]).into_owned();
    // The handshake has no body to wait for: no `100 Continue` (which WebSocket clients would
    // take for the handshake's answer), the 101 alone.
    assert!(before.starts_with("HTTP/1.1 101"), "{before}");
    // A masked text frame "hi"; the echo comes back unmasked.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 2];
    frame.extend_from_slice(&mask);
    frame.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    s.write_all(&frame).await.unwrap();
    let mut echo = got[head_end..].to_vec();
    while echo.len() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the echo within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the echo");
        echo.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&echo[..4], &[0x81, 2, b'h', b'i']);
}

// ---- tunnels ending badly ----

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_dropping_the_tunnel_ends_the_client_connection() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    ws.send(Message::text("drop")).await.unwrap();
    until_end(&mut ws).await;
    gone(&be);
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_resetting_the_tunnel_ends_the_client_connection() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    ws.send(Message::text("reset")).await.unwrap();
    until_end(&mut ws).await;
    gone(&be);
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_vanishing_closes_the_upstream_connection() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Some(Message::text("hi")));
    assert_eq!(ws_gauge(&gw), 1.0);
    // No close frame: the TCP connection just goes.
    drop(ws);
    assert!(matches!(be.next(), Event::Gone));
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_tunnel_is_closed_on_both_sides() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "websocket_idle_timeout = \"300ms\"");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    until_end(&mut ws).await;
    gone(&be);
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

// ---- tunnels that work ----

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_messages_echo_in_order() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    let headers = opened(&be);
    assert_eq!(header(&headers, "upgrade"), Some("websocket"));
    assert!(header(&headers, "x-forwarded-for").is_some());
    assert!(header(&headers, "x-request-id").is_some());
    for i in 0..100 {
        ws.send(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    for i in 0..100 {
        assert_eq!(
            recv(&mut ws).await,
            Some(Message::text(format!("message {i}")))
        );
    }
    assert_eq!(ws_gauge(&gw), 1.0);
    ws.close(None).await.unwrap();
    until_end(&mut ws).await;
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_mib_binary_message_goes_both_ways() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match recv(&mut ws).await {
        Some(Message::Binary(b)) => assert!(b.as_ref() == big.as_slice(), "echo differs"),
        other => panic!("expected the binary echo, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_codes_are_relayed_both_ways() {
    let be = WsBackend::start();
    let gw = gateway(&be.url(), "");
    // The upstream closes: the client gets its code and reason.
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    ws.send(Message::text("close:1000:done")).await.unwrap();
    match recv(&mut ws).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1000);
            assert_eq!(f.reason.as_str(), "done");
        }
        other => panic!("expected the upstream's close frame, got {other:?}"),
    }
    until_end(&mut ws).await;
    gone(&be);
    // The client closes: the upstream gets its code and reason.
    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match be.next() {
        Event::ClientClose(code, reason) => {
            assert_eq!(code, 1001);
            assert_eq!(reason, "bye");
        }
        other => panic!("expected the client's close frame, got {other:?}"),
    }
    until_end(&mut ws).await;
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
}

/// The real binary: the access-log line written when a tunnel closes.
#[test]
fn the_access_log_line_at_close_has_bytes_and_duration() {
    let be = WsBackend::start();
    let files = proxy_all(&be.url(), "");
    let dir = repo(&as_refs(&files));
    let idle_files = [(
        "routes/idle.toml",
        "[[route]]\nname = \"idle\"\nprefix = \"/idle\"\nupstream = \"be\"\nwebsocket_idle_timeout = \"300ms\"\n",
    )];
    write_files(dir.path(), &idle_files);
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let addr: SocketAddr = gw.listen.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ws = connect(addr, "/chat").await.unwrap();
        ws.send(Message::text("0123456789")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Some(Message::text("0123456789")));
        assert_eq!(gw.metric("rustygate_websocket_connections"), Some(1.0));
        ws.close(None).await.unwrap();
        until_end(&mut ws).await;
        let mut idle = connect(addr, "/idle").await.unwrap();
        until_end(&mut idle).await;
    });
    let line = |route: &str| {
        gw.logs
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains("rustygate::access"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v.get("fields").cloned().unwrap_or(v))
            .find(|f| f["route"] == route && f["status"] == 101)
    };
    assert!(
        wait_until(Duration::from_secs(5), || line("all").is_some()
            && line("idle").is_some()),
        "access log:\n{}",
        gw.logs.lock().unwrap()
    );
    let closed = line("all").unwrap();
    // A masked frame of 10 bytes is 16 bytes on the wire, and the close frame follows.
    assert!(closed["bytes_in"].as_u64().unwrap() >= 16, "{closed}");
    assert!(closed["bytes_out"].as_u64().unwrap() >= 12, "{closed}");
    assert!(closed["duration_ms"].as_f64().unwrap() > 0.0, "{closed}");
    assert_eq!(closed["completed"], true, "{closed}");
    let idle = line("idle").unwrap();
    assert_eq!(idle["completed"], false, "{idle}");
    assert_eq!(idle["error"], "websocket_idle_timeout", "{idle}");
    assert!(wait_until(Duration::from_secs(5), || gw
        .metric("rustygate_websocket_connections")
        == Some(0.0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_holds_its_max_requests_place_until_it_closes() {
    let be = WsBackend::start();
    let files = proxy_to(&[be.url()], "circuit_breaker = { max_requests = 1 }", "");
    let gw = Gateway::start(&as_refs(&files));
    let mut first = connect(gw.addr, "/chat").await.unwrap();
    opened(&be);
    assert_eq!(refused(gw.addr, "/chat").await, 503);
    first.close(None).await.unwrap();
    until_end(&mut first).await;
    assert!(wait_until(Duration::from_secs(5), || ws_gauge(&gw) == 0.0));
    let mut again = connect(gw.addr, "/chat").await.unwrap();
    again.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv(&mut again).await, Some(Message::text("hi")));
}

/// The real binary: on SIGTERM an open tunnel keeps working for the grace period, then both
/// of its connections are closed, each with a close frame 1001 (Going Away).
#[test]
fn sigterm_gives_tunnels_the_grace_period_then_closes_them() {
    let be = WsBackend::start();
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "3s",
        ],
        &[],
    );
    let addr: SocketAddr = gw.listen.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ws = connect(addr, "/chat").await.unwrap();
        opened(&be);
        sigterm(&gw);
        // Shutdown has begun once the listener stops taking connections.
        let listen = gw.listen.clone();
        let stopped = tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(5), || {
                std::net::TcpStream::connect(&listen).is_err()
            })
        });
        assert!(
            stopped.await.unwrap(),
            "the listener still accepts after SIGTERM"
        );
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Some(Message::text("still here")));
        match recv(&mut ws).await {
            Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected a close frame 1001 before the end, got {other:?}"),
        }
        until_end(&mut ws).await;
    });
    match be.next() {
        Event::ClientClose(code, _) => assert_eq!(code, 1001),
        other => panic!("expected the upstream to get a close frame 1001, got {other:?}"),
    }
    assert!(matches!(be.next(), Event::Gone));
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .child
            .try_wait()
            .unwrap()
            .is_some()),
        "the gateway exited after the grace period"
    );
    let logs = gw.logs.lock().unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("rustygate::access") && l.contains("\"status\":101"))
        .unwrap_or_else(|| panic!("no access line for the tunnel:\n{logs}"));
    assert!(line.contains("\"error\":\"shutdown\""), "{line}");
}

fn sigterm(gw: &GatewayProcess) {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// The real binary and python's `websockets` client (the interpreter in `RUSTYGATE_TEST_PYTHON`,
/// else `python3`; skipped with a note when it has no `websockets`): at the end of the
/// shutdown grace it sees a clean close with 1001, not 1006 (abnormal closure), while it keeps
/// exchanging 100 kB messages (each in many reads, so the end finds frames under way), and no
/// echo it got was corrupted.
#[test]
fn a_python_websockets_client_gets_1001_going_away_at_shutdown() {
    let python = std::env::var("RUSTYGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_websockets = std::process::Command::new(&python)
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_websockets {
        eprintln!("skipped: {python} has no `websockets` (set RUSTYGATE_TEST_PYTHON)");
        return;
    }
    let be = WsBackend::start();
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "2s",
        ],
        &[],
    );
    const CLIENT: &str = r#"
import asyncio, os, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], max_size=None, compression=None) as ws:
        big = os.urandom(100_000)
        await ws.send(big)
        assert await ws.recv() == big
        print("open", flush=True)
        sys.stdin.readline()
        echoes = 0
        try:
            while echoes < 100_000:
                await ws.send(big)
                assert await ws.recv() == big, "a corrupted echo"
                echoes += 1
        except websockets.ConnectionClosed as e:
            print("closed", ws.close_code, e.rcvd.code if e.rcvd else None, flush=True)
asyncio.run(main())
"#;
    let mut client = std::process::Command::new(&python)
        .args(["-c", CLIENT, &format!("ws://{}/chat", gw.listen)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "open");
    opened(&be);
    sigterm(&gw);
    std::io::Write::write_all(client.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || client
            .try_wait()
            .unwrap()
            .is_some()),
        "the python client ended"
    );
    assert_eq!(line.trim(), "closed 1001 1001", "the python client's close");
    match be.next() {
        Event::ClientClose(code, _) => assert_eq!(code, 1001),
        other => panic!("expected the upstream to get a close frame 1001, got {other:?}"),
    }
    assert!(wait_until(Duration::from_secs(10), || gw
        .child
        .try_wait()
        .unwrap()
        .is_some()));
}

/// The real binary, with raw sockets on both sides: when the grace ends with a frame half-way
/// through in each direction, no close frame is put into the middle of it (that would corrupt
/// the stream). Each side gets exactly the bytes the other sent, then its connection ends.
#[test]
fn a_frame_half_sent_when_the_grace_ends_is_not_cut_into() {
    use base64::Engine as _;
    use sha1::Digest as _;
    use std::io::{Read, Write};

    fn read_head(s: &mut std::net::TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "the head ended early");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }
    fn read_to_end(s: &mut std::net::TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        // A reset after the bytes counts as an end too.
        let _ = s.read_to_end(&mut out);
        out
    }
    // A binary frame of 1,000 bytes, of which only the head and 10 bytes are ever sent.
    let from_upstream: Vec<u8> = [0x82, 126, 0x03, 0xe8]
        .into_iter()
        .chain([b'u'; 10])
        .collect();
    let from_client: Vec<u8> = [0x82, 0x80 | 126, 0x03, 0xe8, 1, 2, 3, 4]
        .into_iter()
        .chain([b'c'; 10])
        .collect();

    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let be_url = format!("http://{}", upstream.local_addr().unwrap());
    let sent = from_upstream.clone();
    let expected = from_client.len();
    let (arrived, upstream_has_it) = mpsc::channel();
    let got_upstream = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let head = read_head(&mut s);
        let key = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_owned())
            })
            .unwrap();
        let mut sha = sha1::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        write!(
            s,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .unwrap();
        s.write_all(&sent).unwrap();
        let mut got = vec![0u8; expected];
        s.read_exact(&mut got).unwrap();
        arrived.send(()).unwrap();
        got.extend(read_to_end(&mut s));
        got
    });
    let dir = repo(&as_refs(&proxy_all(&be_url, "")));
    let gw = GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "1s",
        ],
        &[],
    );
    let mut client = std::net::TcpStream::connect(&gw.listen).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        client,
        "GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut client);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.write_all(&from_client).unwrap();
    // Both halves are under way before the shutdown.
    let mut first = vec![0u8; from_upstream.len()];
    client.read_exact(&mut first).unwrap();
    assert_eq!(first, from_upstream);
    upstream_has_it
        .recv_timeout(Duration::from_secs(10))
        .expect("the client's half frame reached the upstream");
    sigterm(&gw);
    assert_eq!(
        read_to_end(&mut client),
        b"",
        "the client got bytes after the upstream's half frame"
    );
    assert_eq!(
        got_upstream.join().unwrap(),
        from_client,
        "the upstream got other bytes than the client's half frame"
    );
}

// ---- what a tunnel keeps of the config ----

/// A tunnel lives across reloads without keeping their configs: every snapshot it outlived is
/// freed while it is open, and upstreams that a reload removed are no longer health-checked,
/// neither one the tunnel never used nor its own. Before, the tunnel's exchange held its whole
/// snapshot (10 MB per generation for 10,000 routes), and with it every upstream's checker.
#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_keeps_neither_old_snapshots_nor_health_checks_of_removed_upstreams() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let be = WsBackend::start();
    // Another upstream, health-checked, that the reloads remove.
    let checks = Arc::new(AtomicUsize::new(0));
    let checked = {
        let checks = Arc::clone(&checks);
        Backend::start(move |_req| {
            checks.fetch_add(1, Ordering::SeqCst);
            async { hyper::Response::new(full("ok")) }
        })
    };
    // The tunnel's own upstream is health-checked too: the echo server refuses a plain GET
    // (`Event::Gone`), which `unhealthy_after` lets pass for the test's length.
    let health = "health = { path = \"/healthz\", interval = \"50ms\", timeout = \"1s\", \
                  unhealthy_after = 100000 }";
    let mut files = proxy_to(&[be.url()], health, "");
    files.push((
        "upstreams/checked.toml",
        format!(
            "[upstream.checked]\ntargets = [\"{}\"]\n{health}\n",
            checked.url()
        ),
    ));
    files.push((
        "routes/checked.toml",
        "[[route]]\nname = \"checked\"\nprefix = \"/checked\"\nupstream = \"checked\"\n".into(),
    ));
    let gw = Gateway::start(&as_refs(&files));
    // The echo server's health checks, counted as they end (a refused handshake).
    let gone = Arc::new(AtomicUsize::new(0));
    let count_gone = |events: &mpsc::Receiver<Event>| {
        while let Ok(e) = events.try_recv() {
            if matches!(e, Event::Gone) {
                gone.fetch_add(1, Ordering::SeqCst);
            }
        }
        gone.load(Ordering::SeqCst)
    };
    assert!(
        wait_until(Duration::from_secs(10), || checks.load(Ordering::SeqCst)
            >= 2
            && count_gone(&be.events) >= 2),
        "both upstreams are health-checked before the reloads"
    );

    let mut ws = connect(gw.addr, "/chat").await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Some(Message::text("before")));

    // Reloads, each config different: the catch-all now answers itself, so neither upstream
    // is in any config after the first.
    let mut old = vec![Arc::downgrade(&gw.store.load())];
    for k in 0..5 {
        std::fs::remove_file(gw.dir.join("upstreams/checked.toml")).ok();
        std::fs::remove_file(gw.dir.join("routes/checked.toml")).ok();
        std::fs::remove_file(gw.dir.join("upstreams/be.toml")).ok();
        gw.swap(&[(
            "routes/all.toml",
            &format!(
                "[[route]]\nname = \"all\"\nprefix = \"/\"\nrespond = {{ status = 200, body = \"v{k}\" }}\n"
            ),
        )]);
        if k < 4 {
            old.push(Arc::downgrade(&gw.store.load()));
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || old
            .iter()
            .all(|s| s.upgrade().is_none())),
        "{} of {} replaced snapshots are still held while the tunnel is open",
        old.iter().filter(|s| s.upgrade().is_some()).count(),
        old.len()
    );

    // Process-wide (other tests' gateways count too): present, and at least the served one.
    assert!(
        scrape(&gw)
            .get("rustygate_config_snapshots_live")
            .copied()
            .unwrap_or(0.0)
            >= 1.0
    );

    // A check under way at the swap may still end; none starts after it.
    let settled = |n: &dyn Fn() -> usize| {
        let mut last = n();
        wait_until(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = n();
            std::mem::replace(&mut last, now) == now
        })
    };
    assert!(settled(&|| checks.load(Ordering::SeqCst)));
    let (a, b) = (checks.load(Ordering::SeqCst), count_gone(&be.events));
    std::thread::sleep(Duration::from_secs(1));
    let (a2, b2) = (checks.load(Ordering::SeqCst), count_gone(&be.events));
    assert_eq!(
        (a2 - a, b2 - b),
        (0, 0),
        "health checks in 1 s (20 intervals) of the removed upstreams (other, the tunnel's own)"
    );

    // The tunnel itself is untouched.
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Some(Message::text("after")));
    assert_eq!(gw.get("/x"), (200, "v4".to_owned()));
    ws.close(None).await.unwrap();
    until_end(&mut ws).await;
}
