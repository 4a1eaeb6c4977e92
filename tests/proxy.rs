//! The proxy end to end: real backends on loopback, the gateway in-process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Request;

fn header_of(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_method_path_query_headers_and_body() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let reply = send(
        Request::post(gw.url("/orders/7?x=1&y=%20z"))
            .header("x-custom", "hello")
            .header("content-type", "text/plain")
            .body(full("the body"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let echo = reply.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/orders/7?x=1&y=%20z");
    assert_eq!(echo["body"], "the body");
    assert_eq!(header_of(&echo, "x-custom"), vec!["hello"]);
    assert_eq!(header_of(&echo, "content-length"), vec!["8"]);
    // The client's Host is preserved by default.
    assert_eq!(header_of(&echo, "host"), vec![gw.addr.to_string()]);
    assert_eq!(header_of(&echo, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        header_of(&echo, "x-forwarded-host"),
        vec![gw.addr.to_string()]
    );
    // A request id is generated, sent upstream and returned.
    let id = reply.header("x-request-id").unwrap().to_owned();
    assert_eq!(header_of(&echo, "x-request-id"), vec![id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_is_forwarded() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    for m in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let reply = send(
            Request::builder()
                .method(m)
                .uri(gw.url("/x"))
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.json()["method"], m);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_request_id_is_propagated_when_plain() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let reply = send(
        Request::get(gw.url("/"))
            .header("x-request-id", "abc-123")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    assert_eq!(header_of(&reply.json(), "x-request-id"), vec!["abc-123"]);
    let reply = send(
        Request::get(gw.url("/"))
            .header("x-request-id", "bad id <script>")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_ne!(reply.header("x-request-id"), Some("bad id <script>"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_stripped_towards_the_upstream() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let reply = send(
        Request::get(gw.url("/"))
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("trailer", "x-foo")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("upgrade", "websocket")
            .header("x-kept", "yes")
            .body(full(""))
            .unwrap(),
    )
    .await;
    let echo = reply.json();
    for h in [
        "x-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(header_of(&echo, h).is_empty(), "{h} reached the upstream");
    }
    assert_eq!(header_of(&echo, "x-kept"), vec!["yes"]);
}

/// docs/security.md, "Request paths": the target ends at `#`, for routing and the upstream.
#[test]
fn a_fragment_in_the_request_target_reaches_neither_routing_nor_the_upstream() {
    let be = Backend::echo();
    let mut files = proxy_all(&be.url(), "");
    files.push((
        "routes/admin.toml",
        "[[route]]\nname = \"admin\"\nprefix = \"/admin\"\nrespond = { status = 403 }\n".into(),
    ));
    let gw = Gateway::start(&as_refs(&files));
    let resp = raw(
        gw.addr,
        b"GET /a?q=1#/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = resp.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.starts_with("HTTP/1.1 200"), "{resp}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["uri"], "/a?q=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_naming_a_gateway_header_is_refused() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    for named in ["X-Forwarded-For", "host", "x-forwarded-proto"] {
        let reply = send(
            Request::get(gw.url("/"))
                .header("connection", named)
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 400, "Connection: {named}");
    }
}

#[test]
fn hop_by_hop_headers_are_stripped_from_the_response() {
    let be = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\nok",
    );
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 200"), "{resp}");
    assert!(resp.contains("x-kept: yes"), "{resp}");
    for h in ["x-internal", "keep-alive:", "proxy-connection", "upgrade"] {
        assert!(!resp.contains(h), "{h} reached the client: {resp}");
    }
}

/// `Proxy-Authenticate` challenges the next client on the response chain (RFC 9110 §11.7.1):
/// the gateway, which never answers it (the client's `Proxy-Authorization` is dropped too). A
/// client that reached an origin, not a proxy it chose, has nothing to answer it with.
#[test]
fn an_upstreams_proxy_challenge_is_not_relayed() {
    let be = raw_backend(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 2\r\n\
          Proxy-Authenticate: Basic realm=\"internal\"\r\nWWW-Authenticate: Bearer\r\n\r\nno",
    );
    for route_extra in ["", r#"response_headers = { set = { "x-rule" = "1" } }"#] {
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), route_extra)));
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .to_ascii_lowercase();
        assert!(resp.starts_with("http/1.1 407"), "{resp}");
        assert!(resp.contains("www-authenticate: bearer"), "{resp}");
        assert!(
            !resp.contains("proxy-authenticate"),
            "{route_extra}: {resp}"
        );
    }
}

/// A head only relayed (parsed straight into the client's types) and one a header rule edits
/// (parsed into `http` 1.x, then converted) reach the client with the same fields.
#[test]
fn relayed_and_edited_response_heads_carry_the_same_fields() {
    let be = raw_backend(
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nX-Request-Id: from-upstream\r\n\
          Connection: x-internal\r\nX-Internal: secret\r\nX-Custom-Thing: caf\xc3\xa9\r\n\
          set-cookie: b=2\r\nContent-Type: text/plain\r\nKeep-Alive: timeout=5\r\n\r\nok",
    );
    let fields = |route_extra: &str| {
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), route_extra)));
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: from-client-0123\r\nConnection: close\r\n\r\n",
        );
        let (head, body) = resp.split_once("\r\n\r\n").expect("a whole response");
        assert_eq!(body, "ok");
        let mut lines: Vec<String> = head
            .lines()
            .skip(1)
            .map(str::to_ascii_lowercase)
            .filter(|l| !l.starts_with("date:") && !l.starts_with("x-rule:"))
            .collect();
        lines.sort();
        (head.lines().next().unwrap_or("").to_owned(), lines)
    };
    let (status, relayed) = fields("");
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert_eq!(
        relayed,
        [
            "connection: close",
            "content-length: 2",
            "content-type: text/plain",
            "set-cookie: a=1",
            "set-cookie: b=2",
            "x-custom-thing: café",
            "x-request-id: from-client-0123",
        ],
    );
    let edited = fields(r#"response_headers = { set = { "x-rule" = "1" } }"#);
    assert_eq!(edited, (status, relayed));
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_from_an_untrusted_peer_is_replaced() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let reply = send(
        Request::get(gw.url("/"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=6.6.6.6")
            .header("x-real-ip", "6.6.6.6")
            .body(full(""))
            .unwrap(),
    )
    .await;
    let echo = reply.json();
    assert_eq!(header_of(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(header_of(&echo, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        header_of(&echo, "x-forwarded-host"),
        vec![gw.addr.to_string()]
    );
    assert!(header_of(&echo, "forwarded").is_empty());
    assert!(header_of(&echo, "x-real-ip").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_from_a_trusted_peer_is_appended() {
    let be = Backend::echo();
    let mut files = proxy_all(&be.url(), "");
    files.push((
        "gateway.toml",
        "[client_ip]\ntrusted_proxies = [\"127.0.0.0/8\"]\n".into(),
    ));
    let gw = Gateway::start(&as_refs(&files));
    let reply = send(
        Request::get(gw.url("/"))
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-proto", "https")
            .body(full(""))
            .unwrap(),
    )
    .await;
    let echo = reply.json();
    assert_eq!(
        header_of(&echo, "x-forwarded-for"),
        vec!["1.2.3.4, 127.0.0.1"]
    );
    assert_eq!(header_of(&echo, "x-forwarded-proto"), vec!["https"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_errors_are_json_with_the_right_status() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&[
        ("routes/r.toml", "[[route]]\nname = \"only\"\npath = \"/only\"\nmethods = [\"GET\"]\nupstream = \"be\"\n".into()),
        ("upstreams/u.toml", format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url())),
    ]));
    let reply = get(&gw.url("/nothing-here")).await;
    assert_eq!(reply.status, 404);
    let body = reply.json();
    assert_eq!(body["error"], "no route matches this request");
    assert_eq!(body["request_id"], reply.header("x-request-id").unwrap());
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let reply = send(Request::delete(gw.url("/only")).body(full("")).unwrap()).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_502_without_leaking_its_address() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let gw = Gateway::start(&as_refs(&proxy_all(&url, "")));
    let reply = get(&gw.url("/")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "the upstream could not be reached");
    assert!(!reply.text().contains("127.0.0.1"), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_504() {
    let be = Backend::start(|_req| async {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        http::Response::new(full("late"))
    });
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "timeout = \"200ms\"")));
    let started = std::time::Instant::now();
    let reply = get(&gw.url("/")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"], "the upstream did not answer in time");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn body_over_the_limit_is_413_by_length_and_while_streaming() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "max_body_size = \"1KiB\"")));
    let reply = send(
        Request::post(gw.url("/"))
            .body(full(vec![b'a'; 2048]))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 413);
    assert_eq!(
        reply.json()["error"],
        "request body is larger than this route accepts"
    );
    // Exactly at the limit passes.
    let reply = send(
        Request::post(gw.url("/"))
            .body(full(vec![b'a'; 1024]))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    // Chunked, with no length announced: counted while streaming.
    let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n400\r\n";
    let mut req = chunked.to_vec();
    req.extend_from_slice(&[b'a'; 1024]);
    req.extend_from_slice(b"\r\n400\r\n");
    req.extend_from_slice(&[b'a'; 1024]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let resp = raw(gw.addr, &req);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

/// Reads from `s` until `end` has been seen (or 5 s pass): what came.
fn read_until(s: &mut std::net::TcpStream, end: &str) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(end) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn expect_100_continue_is_answered_by_the_route_before_the_body_is_sent() {
    use std::io::Write;
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "max_body_size = \"1KiB\"")));
    // Announced over the limit: the 413 instead of `100 Continue`, so the client never starts
    // sending what would be refused.
    let resp = raw(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\nExpect: 100-continue\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(!resp.contains("100 Continue"), "{resp}");
    // Within the limit, read whole (it can be sent again), or streamed (chunked, read by a task
    // of its own): `100 Continue` first, then the body goes through.
    for (framing, body) in [
        ("Content-Length: 5", "hello"),
        ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        let head =
            format!("POST /up HTTP/1.1\r\nHost: a\r\n{framing}\r\nExpect: 100-continue\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let interim = read_until(&mut s, "\r\n\r\n");
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n", "{framing}");
        s.write_all(body.as_bytes()).unwrap();
        let resp = read_until(&mut s, "hello\"");
        assert!(resp.starts_with("HTTP/1.1 200"), "{framing}: {resp}");
        assert!(resp.contains("\"body\":\"hello\""), "{framing}: {resp}");
    }
    // The method the gateway marks a continued exchange with, sent by a client: served as any.
    let resp = raw(
        gw.addr,
        b"RUSTYGATE-CONTINUED /m HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("\"method\":\"RUSTYGATE-CONTINUED\""),
        "{resp}"
    );
    // No route, no body wanted: the 404 alone.
    let gw = Gateway::start(&[("routes/none.toml", "")]);
    let resp = raw(
        gw.addr,
        b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

/// A chunked request body that breaks the chunked grammar gets `400` and the connection
/// closes, whether the bad bytes come with the head, in a later read, after good chunks or
/// after `100 Continue`. actix-http alone took such a body for a client that had left and
/// closed the connection without an answer.
#[test]
fn malformed_chunked_request_bodies_are_400() {
    use std::io::{Read, Write};
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let head = "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n";
    let cases: &[(&str, &[&str])] = &[
        ("bad size with the head", &["\r\nzz\r\nhello\r\n0\r\n\r\n"]),
        ("data not followed by CRLF", &["\r\n5\r\nhelloXX0\r\n\r\n"]),
        ("bad size in a later read", &["\r\n", "zz\r\n"]),
        ("head cut across reads", &["x-a: 1\r\n", "\r\nzz\r\n"]),
        ("after a good chunk", &["\r\n5\r\nhello\r\n", "3\r\nabcXX"]),
        ("bare LF after the size", &["\r\n", "5\nhello\r\n0\r\n\r\n"]),
        (
            "after 100 Continue",
            &["Expect: 100-continue\r\n\r\n", "5\r\nhello\r\nq\r\n"],
        ),
    ];
    // A head of 20 KiB (a long cookie) cut into 1 KiB reads: followed as far as actix-http
    // takes a head (128 KiB), not only the first 8 KiB.
    let long_head = format!("cookie: {}\r\n\r\nzz\r\n", "c".repeat(20 * 1024));
    let long_head: Vec<&str> = long_head
        .as_bytes()
        .chunks(1024)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let cases = cases
        .iter()
        .copied()
        .chain([("a 20 KiB head cut across 1 KiB reads", &long_head[..])]);
    for (name, parts) in cases {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(head.as_bytes()).unwrap();
        for (i, part) in parts.iter().enumerate() {
            s.write_all(part.as_bytes()).unwrap();
            if i == 0 && part.contains("Expect") {
                assert_eq!(
                    read_until(&mut s, "\r\n\r\n"),
                    "HTTP/1.1 100 Continue\r\n\r\n"
                );
            } else {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let mut resp = Vec::new();
        // The connection closes after the answer: read to its end.
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400 "), "{name}: {resp:?}");
        assert!(resp.contains("connection: close"), "{name}: {resp:?}");
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{name}: {resp:?}");
        // The gateway's JSON error, its request id in `x-request-id` too.
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{name}: {resp:?}"
        );
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{name}: no x-request-id: {resp:?}"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "the chunked body is malformed", "{name}");
        assert_eq!(json["request_id"], id, "{name}");
    }
    // Well-formed bodies, however they are cut, still go through, with extensions and
    // trailers.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    for part in [head, "\r\n5;x=1\r\nhe", "llo\r\n0\r", "\nx-t: 1\r\n\r\n"] {
        s.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let resp = read_until(&mut s, "hello\"");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = raw(
        gw.addr,
        format!("{head}Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n").as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"body\":\"hello\""), "{resp}");
}

#[test]
fn oversized_header_block_is_431() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..200 {
        req.extend_from_slice(format!("x-filler-{i}: {}\r\n", "v".repeat(500)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let resp = raw(gw.addr, &req);
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
}

#[test]
fn smuggling_shapes_are_refused() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let cases: [&[u8]; 5] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ];
    for case in cases {
        let resp = raw(gw.addr, case);
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{:?} -> {resp}",
            String::from_utf8_lossy(case)
        );
    }
}

#[test]
fn upstream_with_both_framing_headers_is_502() {
    let be = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
}

/// Response heads the gateway does not relay get 502 "invalid response" whichever client sends
/// the request: a GET goes through the gateway's own HTTP/1.1 client, a POST with a body
/// streamed from the client through hyper, which took statuses up to 999, a 70 KB head, and
/// read `gzip, chunked` as chunked and `xchunked` as a body until close (the client got 200
/// with gzip bytes and no `Content-Encoding`, or the chunk framing as the body).
#[test]
fn invalid_response_heads_are_502_on_every_request_path() {
    let big_head: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
            "a".repeat(70_000)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw",
        b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
        big_head,
    ] {
        let be = raw_backend(response);
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
        for request in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody",
        ] {
            let resp = raw(gw.addr, request);
            let shown = String::from_utf8_lossy(&response[..response.len().min(60)]);
            let req_line = String::from_utf8_lossy(&request[..6]);
            assert!(
                resp.starts_with("HTTP/1.1 502"),
                "{req_line} {shown}: {}",
                &resp[..resp.len().min(300)]
            );
            assert!(resp.contains("invalid response"), "{shown}: {resp}");
        }
    }
}

/// A broken chunked body that comes with its head is a 502, not a response cut off before any
/// of it reached the client.
#[test]
fn upstream_chunks_broken_in_the_first_read_are_502() {
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nfffffffffffffffff\r\n",
    ] {
        let be = raw_backend(response);
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    }
}

#[test]
fn paths_are_normalised_before_matching_and_forwarding() {
    let be = Backend::echo();
    let gw = Gateway::start(&as_refs(&[
        ("routes/r.toml", "[[route]]\nname = \"public\"\nprefix = \"/public\"\nupstream = \"be\"\n\n[[route]]\nname = \"admin\"\nprefix = \"/admin\"\nrespond = { status = 403, body = \"admin needs auth\" }\n".into()),
        ("upstreams/u.toml", format!("[upstream.be]\ntargets = [\"{}\"]\n", be.url())),
    ]));
    let resp = raw(
        gw.addr,
        b"GET /public/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let resp = raw(
        gw.addr,
        b"GET /public/%2e%2e/admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let resp = raw(
        gw.addr,
        b"GET /public//x/./y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.contains("\"uri\":\"/public/x/y\""), "{resp}");
    for bad in [
        "/public/%00",
        "/public/a\\b",
        "/../etc/passwd",
        "/public/%zz",
    ] {
        let resp = raw(
            gw.addr,
            format!("GET {bad} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "{bad} -> {resp}");
    }
    let resp = raw(
        gw.addr,
        b"GET http://a/public HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "absolute-form -> {resp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn respond_routes_answer_directly() {
    let gw = Gateway::start(&[(
        "routes/r.toml",
        "[[route]]\nname = \"health\"\npath = \"/\"\nrespond = { status = 200, body = \"RustyGate is running\", headers = { \"x-served-by\" = \"gw\" } }\n",
    )]);
    let reply = get(&gw.url("/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "RustyGate is running");
    assert_eq!(reply.header("x-served-by"), Some("gw"));
}

#[tokio::test(flavor = "multi_thread")]
async fn head_keeps_the_upstream_length() {
    let be = Backend::fixed(200, "twelve bytes");
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let reply = send(Request::head(gw.url("/")).body(full("")).unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-length"), Some("12"));
    assert!(reply.body.is_empty());
}

#[test]
fn slow_request_head_is_408() {
    let be = Backend::echo();
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let opts = rustygate::server::ServeOptions {
        client_request_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let gw = Gateway::start_dir(dir.path(), opts);
    // Half a request head, then silence.
    let started = std::time::Instant::now();
    let resp = raw(gw.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ");
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn upstream_connections_are_reused() {
    let be = Backend::fixed(200, "ok");
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let opts = rustygate::server::ServeOptions {
        workers: 1,
        ..Default::default()
    };
    let gw = Gateway::start_dir(dir.path(), opts);
    for _ in 0..20 {
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(be.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn an_upstream_that_closes_after_each_response_is_reconnected() {
    // Announces keep-alive, then closes: the pooled connection is dead by the next request.
    let be = raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let dir = repo(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    let opts = rustygate::server::ServeOptions {
        workers: 1,
        ..Default::default()
    };
    let gw = Gateway::start_dir(dir.path(), opts);
    for i in 0..10 {
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "request {i}: {resp}");
        // Let the backend close its side.
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// A GET, HEAD or DELETE with a chunked body reaches the upstream with it (chunked): hyper
/// took a GET's or HEAD's body of unknown length for none, and the upstream got the request
/// without it. Over HTTP/1.1 here (an HTTP/2 request without `content-length` takes the same
/// path).
#[test]
fn chunked_bodies_on_get_and_head_reach_the_upstream() {
    let be = Backend::echo();
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let gw = Gateway::start_dir(dir.path(), Default::default());
    for method in ["GET", "DELETE", "POST"] {
        let resp = raw(
            gw.addr,
            format!(
                "{method} /q HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\n7\r\n{{\"q\":1}}\r\n0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{method}: {resp}");
        let echo: serde_json::Value =
            serde_json::from_str(&resp[resp.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(echo["method"], method, "{echo}");
        assert_eq!(echo["body"], "{\"q\":1}", "{method}: {echo}");
        assert_eq!(
            header_of(&echo, "transfer-encoding"),
            vec!["chunked"],
            "{method}: {echo}"
        );
    }
}

/// A HEAD response announces the length the upstream announced, and none when it announced
/// none; a 304 announces none (it may: RFC 9110 §8.6). The gateway wrote `content-length: 0`
/// for both, telling clients and caches that the resource was empty.
#[test]
fn head_and_304_responses_announce_no_length_of_their_own() {
    for (upstream_head, method, want) in [
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            "HEAD",
            None,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            "HEAD",
            Some("12"),
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
            "GET",
            None,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 12\r\n\r\n",
            "GET",
            None,
        ),
    ] {
        let be = raw_backend(upstream_head);
        let dir = repo(&as_refs(&proxy_all(&format!("http://{be}"), "")));
        let gw = Gateway::start_dir(dir.path(), Default::default());
        let resp = raw(
            gw.addr,
            format!("{method} / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let head = resp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 200") || head.starts_with("http/1.1 304"),
            "{method} {:?}: {resp:?}",
            String::from_utf8_lossy(upstream_head)
        );
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(str::to_owned);
        assert_eq!(length.as_deref(), want, "{method} {resp}");
        assert!(resp.ends_with("\r\n\r\n"), "no body: {resp:?}");
    }
}

/// A status without a standard reason phrase is relayed with an empty one, on the relayed and
/// the edited head alike: actix-http wrote `<unknown status code>` in its place.
#[test]
fn statuses_without_a_standard_reason_are_relayed_with_an_empty_one() {
    let be = raw_backend(b"HTTP/1.1 599 Custom Thing\r\nContent-Length: 2\r\n\r\nok");
    for route_extra in ["", r#"response_headers = { set = { "x-rule" = "1" } }"#] {
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), route_extra)));
        let resp = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(
            resp.starts_with("HTTP/1.1 599 \r\n"),
            "{route_extra}: {resp:?}"
        );
        assert!(resp.ends_with("\r\n\r\nok"), "{resp:?}");
    }
}

/// An upstream that switches protocols (101) for a request that did not ask to is an invalid
/// response: `502`, counted under `kind="invalid_response"` like the others. It was answered
/// 502 but counted nowhere among the upstream errors.
#[test]
fn a_101_to_a_request_that_did_not_ask_to_switch_is_counted_as_an_invalid_response() {
    let be = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    );
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    for request in [
        "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        "HEAD /b HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let resp = raw(gw.addr, request.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
        assert!(
            resp.contains(r#"{"error":"the upstream sent an invalid response""#)
                || request.starts_with("HEAD"),
            "{resp}"
        );
    }
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_upstream_errors_total{kind="invalid_response",upstream="be"}"#),
        Some(&2.0),
        "{m:?}"
    );
}

/// An upstream whose only answer is an interim (1xx) response before it closes sent no
/// response to relay: `502` "the upstream sent an invalid response", counted and logged as
/// `invalid_response`, like any other response the gateway does not relay; with a body in
/// hand (the gateway's own client) or streamed (chunked, through hyper). Such a close was told
/// as an upstream that "could not be reached" (kind `upstream`). Interim responses before a
/// final one still let it through.
#[test]
fn an_interim_response_without_a_final_one_is_an_invalid_response() {
    use std::io::Write;
    let interims: [&'static [u8]; 3] = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 199 Odd\r\n\r\n",
    ];
    let chunked =
        "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    for interim in interims {
        let be = raw_backend(interim);
        let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
        for request in ["GET / HTTP/1.1\r\nHost: a\r\n\r\n", chunked] {
            let resp = raw(gw.addr, request.as_bytes());
            let what = String::from_utf8_lossy(interim);
            assert!(resp.starts_with("HTTP/1.1 502"), "{what:?}: {resp}");
            assert!(resp.contains("x-request-id: "), "{what:?}: {resp}");
            assert!(
                resp.contains(r#"{"error":"the upstream sent an invalid response""#),
                "{what:?}: {resp}"
            );
        }
        let m = scrape(&gw);
        assert_eq!(
            m.get(r#"rustygate_upstream_errors_total{kind="invalid_response",upstream="be"}"#),
            Some(&2.0),
            "{m:?}"
        );
        // At 0 from the start (its labels are known from the config).
        assert_eq!(
            m.get(r#"rustygate_upstream_errors_total{kind="upstream",upstream="be"}"#),
            Some(&0.0)
        );
    }
    // Early hints, then the response: the response reaches the client.
    let be = raw_backend(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    for request in ["GET / HTTP/1.1\r\nHost: a\r\n\r\n", chunked] {
        let resp = raw(gw.addr, request.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
    }
    // `Expect: 100-continue`: the client gets its `100 Continue`, sends the body, and gets the
    // upstream's response after the upstream's own `100 Continue`.
    let be = raw_backend(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    );
    let gw = Gateway::start(&as_refs(&proxy_all(&format!("http://{be}"), "")));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert_eq!(
        read_until(&mut s, "\r\n\r\n"),
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    s.write_all(b"hello").unwrap();
    let resp = read_until(&mut s, "\r\n\r\nok");
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
}

/// A head actix-http's parser refuses (a request target with bytes RFC 3986 does not allow:
/// `<`, `>`, `` ` ``, `"` in the query, DEL, bytes over 0x7f, a control byte in a field; a head
/// over 128 KiB) gets the gateway's own answer, like the requests the handler refuses: a JSON
/// error with the request id, and that id in `x-request-id`; still counted under
/// `route="<none>"`, and the connection closes. actix-http's bare `400` (or `431`), with
/// neither a body nor a request id, went out before. A good request pipelined ahead of a bad
/// one is answered as usual.
#[test]
fn heads_the_parser_refuses_get_the_gateways_json_error_and_request_id() {
    use std::io::{Read, Write};
    let be = Backend::fixed(200, "hello");
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "")));
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: a\r\n{}\r\n",
        format!("X-Filler: {}\r\n", "f".repeat(100)).repeat(1400)
    );
    let mut cases: Vec<(Vec<u8>, &str)> = [
        &b"/a<b"[..],
        b"/a>b",
        b"/a`b",
        b"/a?q=\"x\"",
        b"/a\x7fb",
        b"/a\x80b",
    ]
    .iter()
    .map(|t| {
        (
            [b"GET ", *t, b" HTTP/1.1\r\nHost: a\r\n\r\n"].concat(),
            "400",
        )
    })
    .collect();
    cases.push((
        b"GET /c HTTP/1.1\r\nHost: a\r\nX-C: a\x01b\r\n\r\n".to_vec(),
        "400",
    ));
    cases.push((
        b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /a<b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        "400",
    ));
    cases.push((big.into_bytes(), "431"));
    for (request, status) in &cases {
        let what = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(request);
        let mut got = Vec::new();
        // The connection closes after the answer.
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got).into_owned();
        let answer = match got.strip_prefix("HTTP/1.1 200 OK\r\n") {
            Some(rest) => &rest[rest.find("HTTP/1.1").unwrap_or(0)..],
            None => &got[..],
        };
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what:?}: {got:?}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("content-type: application/json"),
            "{what:?}: {got:?}"
        );
        assert!(head.contains("connection: close"), "{what:?}: {got:?}");
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{what:?}: no x-request-id: {got:?}"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["request_id"], id, "{what:?}");
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .starts_with("the request head is"),
            "{what:?}: {json}"
        );
    }
    let m = scrape(&gw);
    assert_eq!(
        m.get(r#"rustygate_requests_total{method="GET",route="<none>",status="400"}"#),
        Some(&8.0),
        "{m:?}"
    );
    assert_eq!(
        m.get(r#"rustygate_requests_total{method="GET",route="<none>",status="431"}"#),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(gw.get("/fine").0, 200);
}
