use super::*;
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

use super::head::parse_head;
use super::response_body::find;
use crate::proxy::response::UpstreamHead;
use tokio::net::TcpListener;

/// An upstream that reads one request head, then writes `pieces` with a pause between
/// them (so that the client sees them in separate reads), then closes if `close`.
async fn upstream(
    pieces: Vec<&'static [u8]>,
    close: bool,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&got, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        for p in pieces {
            s.write_all(p).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if close {
            drop(s);
        } else {
            // Held open until the client is done.
            let _ = s.read(&mut buf).await;
        }
        got
    });
    (addr, task)
}

fn get(path: &str) -> http::Request<ProxyBody> {
    let mut r = http::Request::new(ProxyBody::Empty);
    *r.uri_mut() = path.parse().unwrap();
    r.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("up.example"));
    r
}

fn no_pool() -> Checkin {
    Checkin {
        pool: Weak::new(),
        key: PoolKey::new(http::uri::Authority::from_static("up.example"), 0),
        idle: Some(Duration::from_secs(60)),
    }
}

/// A response read here: its head and its body, which is always this module's.
fn own_parts(resp: Box<UpstreamResponse>) -> (UpstreamHead, ResponseBody) {
    match *resp {
        UpstreamResponse {
            head,
            body: UpstreamIncoming::H1(body),
        } => (head, body),
        UpstreamResponse { .. } => panic!("a response read by h1 has a hyper body"),
    }
}

async fn run(
    pieces: Vec<&'static [u8]>,
    close: bool,
    req: http::Request<ProxyBody>,
) -> (
    Result<
        (
            http::response::Parts,
            Result<http_body_util::Collected<Bytes>, H1Error>,
        ),
        H1Error,
    >,
    Vec<u8>,
) {
    run_traced(pieces, close, req, None).await
}

async fn run_traced(
    pieces: Vec<&'static [u8]>,
    close: bool,
    req: http::Request<ProxyBody>,
    traceparent: Option<&[u8; 55]>,
) -> (
    Result<
        (
            http::response::Parts,
            Result<http_body_util::Collected<Bytes>, H1Error>,
        ),
        H1Error,
    >,
    Vec<u8>,
) {
    let (addr, task) = upstream(pieces, close).await;
    let io = Io::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
    let idle = Duration::from_secs(60);
    let shape = HeadShape::Http;
    let head = RequestHead {
        req: &req,
        fields: None,
        traceparent,
    };
    let out = match exchange(Conn::new(io), head, no_pool(), idle, shape).await {
        Ok(resp) => {
            let (head, body) = own_parts(resp);
            Ok((head.into_http(), body.collect().await))
        }
        Err(e) => Err(e),
    };
    drop(req);
    let got = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    (out, got)
}

#[tokio::test]
async fn the_request_head_is_written_in_one_piece_with_its_length() {
    let mut req = get("/p?q=1");
    *req.method_mut() = http::Method::POST;
    *req.body_mut() = ProxyBody::Full(Some(Bytes::from_static(b"hello")));
    req.headers_mut()
        .insert("content-length", HeaderValue::from_static("999"));
    req.headers_mut()
        .insert("transfer-encoding", HeaderValue::from_static("chunked"));
    let (out, got) = run(
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        false,
        req,
    )
    .await;
    let (parts, body) = out.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(body.unwrap().to_bytes(), "ok");
    let got = String::from_utf8(got).unwrap();
    assert!(
        got.starts_with("POST /p?q=1 HTTP/1.1\r\nhost: up.example\r\n"),
        "{got}"
    );
    assert!(got.contains("content-length: 5\r\n"), "{got}");
    assert!(!got.contains("999") && !got.contains("chunked"), "{got}");
}

#[tokio::test]
async fn the_attempts_traceparent_replaces_any_in_the_headers_once() {
    const OURS: &[u8; 55] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ok: Vec<&'static [u8]> = vec![b"HTTP/1.1 204 No Content\r\n\r\n"];
    let mut req = get("/");
    // The client's (or a policy's) context, in two fields and with another case.
    for v in [
        "00-11111111111111111111111111111111-2222222222222222-01",
        "x",
    ] {
        req.headers_mut()
            .append("TraceParent", HeaderValue::from_static(v));
    }
    req.headers_mut()
        .insert("tracestate", HeaderValue::from_static("k=v"));
    let (out, got) = run_traced(ok.clone(), false, req, Some(OURS)).await;
    assert_eq!(out.unwrap().0.status, 204);
    let got = String::from_utf8(got).unwrap();
    let ours = std::str::from_utf8(OURS).unwrap();
    assert_eq!(got.matches("traceparent").count(), 1, "{got}");
    assert!(
        got.contains(&format!("\r\ntraceparent: {ours}\r\n")),
        "{got}"
    );
    assert!(got.contains("\r\ntracestate: k=v\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\n"), "{got}");

    // Without a trace, what the headers hold goes as it is.
    let mut req = get("/");
    req.headers_mut()
        .insert("traceparent", HeaderValue::from_static("kept"));
    let (_, got) = run_traced(ok, false, req, None).await;
    assert!(
        String::from_utf8(got)
            .unwrap()
            .contains("\r\ntraceparent: kept\r\n")
    );
}

#[tokio::test]
async fn a_chunked_body_split_across_reads_keeps_its_bytes_and_trailers() {
    let (out, _) = run(
        vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r",
            b"\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n",
            b"x-t: y\r\n\r\n",
        ],
        false,
        get("/"),
    )
    .await;
    let (parts, body) = out.unwrap();
    assert_eq!(parts.status, 200);
    let body = body.unwrap();
    let trailers = body.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-t"], "y");
    assert_eq!(body.to_bytes(), "hello world");
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (out, _) = run(
        vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
            b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        ],
        false,
        get("/"),
    )
    .await;
    let (parts, body) = out.unwrap();
    assert_eq!(parts.status, 201);
    assert!(body.unwrap().to_bytes().is_empty());
}

/// A close after an interim response leaves a 1xx as the upstream's only answer: an
/// invalid response, not a lost connection (`Lost` would have the pool send the request
/// again on a fresh connection, so the upstream got it twice). A close in the middle of the
/// final head is a response cut short.
#[tokio::test]
async fn a_close_after_an_interim_response_is_not_a_lost_connection() {
    for interim in [
        &b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"[..],
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 199 Odd\r\n\r\n",
    ] {
        let pieces = vec![interim];
        let (out, _) = run(pieces, true, get("/")).await;
        assert!(
            matches!(out, Err(H1Error::Invalid(NO_FINAL_RESPONSE))),
            "{out:?}"
        );
    }
    let cut = vec![&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"[..]];
    let (out, _) = run(cut, true, get("/")).await;
    assert!(matches!(out, Err(H1Error::Read(_))), "{out:?}");
}

#[tokio::test]
async fn a_body_without_length_ends_when_the_upstream_closes() {
    let (out, _) = run(
        vec![b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"],
        true,
        get("/"),
    )
    .await;
    assert_eq!(out.unwrap().1.unwrap().to_bytes(), "all of it");
}

#[tokio::test]
async fn hostile_heads_are_refused() {
    for (head, why) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nok"[..],
            "both",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            "conflicting",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            "invalid Content-Length",
        ),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed"),
        (b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n", "invalid status code"),
        (b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n", "invalid status code"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "malformed"),
        // Transfer codings other than one `chunked` (SECURITY.md: invalid TE -> 502).
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nraw",
            "unsupported Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "unsupported Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            "unsupported Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "unsupported Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "unsupported Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\n\r\n",
            "unsupported Transfer-Encoding",
        ),
    ] {
        let (out, _) = run(vec![head], true, get("/")).await;
        let e = out
            .err()
            .unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(head)));
        assert!(
            e.to_string().contains(why),
            "{e} for {}",
            String::from_utf8_lossy(head)
        );
    }
}

#[tokio::test]
async fn a_head_that_never_ends_is_cut_at_the_cap() {
    static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
        while v.len() < MAX_HEAD + 4096 {
            v.extend_from_slice(
                b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        v
    });
    let (out, _) = run(vec![BIG.as_slice()], true, get("/")).await;
    let e = out.err().unwrap();
    assert!(e.to_string().contains("too"), "{e}");
}

#[tokio::test]
async fn a_whole_head_over_the_cap_in_one_read_is_refused_too() {
    static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut v = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        v.resize(MAX_HEAD + 4096, b'a');
        v.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
        v
    });
    let mut buf = BytesMut::from(BIG.as_slice());
    let e = parse_head(&mut buf, HeadShape::Http).err().unwrap();
    assert!(e.to_string().contains("too large"), "{e}");
    let (out, _) = run(vec![BIG.as_slice()], true, get("/")).await;
    let e = out.err().unwrap();
    assert!(e.to_string().contains("too"), "{e}");
}

/// Whether the connection goes back to the pool after `head` (and nothing else).
async fn reused_after(head: &'static [u8]) -> bool {
    let (addr, _task) = upstream(vec![head], false).await;
    let io = Io::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
    let req = get("/");
    let head = RequestHead {
        req: &req,
        fields: None,
        traceparent: None,
    };
    let idle = Duration::from_secs(60);
    let resp = exchange(Conn::new(io), head, no_pool(), idle, HeadShape::Http)
        .await
        .unwrap();
    own_parts(resp).1.checkin.idle.is_some()
}

#[tokio::test]
async fn a_204_that_announces_a_body_does_not_leave_its_connection_to_the_next_request() {
    // Whatever follows such a head (a body sent anyway, or a whole second response) would
    // be read as the next request's response.
    assert!(!reused_after(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n").await);
    assert!(!reused_after(b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n").await);
    // Without one, and a 304 whose length is the representation's, they are reused.
    assert!(reused_after(b"HTTP/1.1 204 No Content\r\n\r\n").await);
    assert!(reused_after(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await);
    assert!(reused_after(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n").await);
    assert!(reused_after(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await);
}

#[tokio::test]
async fn bodies_cut_short_and_bad_chunks_are_errors() {
    for pieces in [
        vec![&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..]],
        vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"],
        vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"],
        vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n"],
    ] {
        let (out, _) = run(pieces.clone(), true, get("/")).await;
        // A broken chunk that came with the head fails the exchange itself.
        let failed = out.map_or(true, |(_, body)| body.is_err());
        assert!(failed, "{:?}", String::from_utf8_lossy(pieces[0]));
    }
}

#[tokio::test]
async fn a_broken_chunk_that_came_with_the_head_fails_before_the_head_is_relayed() {
    for response in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n10000000000000000\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabcde",
    ] {
        let (out, _) = run(vec![response], false, get("/")).await;
        assert!(
            matches!(out, Err(H1Error::Invalid(_))),
            "{:?}",
            String::from_utf8_lossy(response)
        );
    }
    // Whole and good, or good as far as it came: the head is handed on.
    for (response, body) in [
        (
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"[..],
            &b"hello!"[..],
        ),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel", b"hel"),
    ] {
        let (out, _) = run(vec![response], true, get("/")).await;
        let (_, got) = out.expect("the head is relayed");
        match got {
            Ok(c) => assert_eq!(&c.to_bytes()[..], body),
            // Cut short by the close: an error, but only once the head went on.
            Err(_) => assert!(body.len() < 6),
        }
    }
}

#[tokio::test]
async fn a_connection_closed_before_any_response_byte_is_lost_not_invalid() {
    let (out, _) = run(vec![], true, get("/")).await;
    assert!(matches!(out, Err(H1Error::Lost(_))), "{:?}", out.err());
}

/// Fields given as a list are written as the same fields in the request's map are.
#[test]
fn listed_fields_are_written_like_the_requests_own() {
    use super::super::headers::HeaderSink;
    let mut with_map = http::Request::new(ProxyBody::Full(Some(Bytes::from_static(b"hi"))));
    *with_map.method_mut() = http::Method::PUT;
    *with_map.uri_mut() = "/p?q=1".parse().unwrap();
    let mut list = HeaderList::default();
    for (n, v) in [
        ("host", "up.example"),
        ("x-a", "1"),
        ("x-a", "2"),
        ("content-length", "999"),
        ("traceparent", "00-client-value"),
    ] {
        let (n, v) = (HeaderName::from_static(n), HeaderValue::from_static(v));
        with_map.headers_mut().append(n.clone(), v.clone());
        list.append(n, v);
    }
    let mut with_list = http::Request::new(ProxyBody::Full(Some(Bytes::from_static(b"hi"))));
    *with_list.method_mut() = http::Method::PUT;
    *with_list.uri_mut() = "/p?q=1".parse().unwrap();
    let tp = [b'0'; 55];
    let encode = |req: &http::Request<ProxyBody>, fields: Option<&HeaderList>| {
        let mut out = BytesMut::new();
        let head = RequestHead {
            req,
            fields,
            traceparent: Some(&tp),
        };
        let body = encode_head(&head, &mut out).map(<[u8]>::to_vec);
        (String::from_utf8(out.to_vec()).unwrap(), body)
    };
    let (from_map, body) = encode(&with_map, None);
    assert_eq!(encode(&with_list, Some(&list)), (from_map.clone(), body));
    assert_eq!(
        from_map,
        format!(
            "PUT /p?q=1 HTTP/1.1\r\nhost: up.example\r\nx-a: 1\r\nx-a: 2\r\n\
             traceparent: {}\r\ncontent-length: 2\r\n\r\n",
            "0".repeat(55)
        )
    );
}
