//! Reading and parsing a response head: its status, fields, framing and keep-alive.

use std::io;

use bytes::BytesMut;
use http::header::HeaderMap;

use super::fields::{Known, Spans, known_name};
use super::response_body::{Chunk, Framing};
use super::{Conn, H1Error, MAX_HEAD, MAX_HEADERS, poll_fill};

use crate::proxy::response::{HeadShape, UpstreamHead};

/// A parsed response head.
pub(super) struct Head {
    pub(super) head: UpstreamHead,
    pub(super) framing: Framing,
    /// Whether the connection may carry another request (HTTP/1.1 or `keep-alive`, no
    /// `close`).
    pub(super) keep_alive: bool,
    /// The smallest `timeout=` of its `Keep-Alive` fields (seconds).
    pub(super) announced_idle: Option<u64>,
}

/// Reads and parses a response head; its bytes are removed from the buffer.
pub(super) async fn read_head(conn: &mut Conn, shape: HeadShape) -> Result<Head, H1Error> {
    let mut first = true;
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = parse_head(&mut conn.buf, shape)? {
                return Ok(head);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(H1Error::Invalid("response head too large"));
            }
        }
        let n = std::future::poll_fn(|cx| poll_fill(conn, cx)).await;
        match n {
            Ok(0) if first && conn.buf.is_empty() => {
                return Err(H1Error::Lost(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(0) => return Err(H1Error::Read(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) if first && conn.buf.is_empty() => return Err(H1Error::Lost(e)),
            Err(e) => return Err(H1Error::Read(e)),
        }
        first = false;
    }
}

/// Most response heads have fewer fields than this: parsed with room for these on the stack,
/// and again with room for [`MAX_HEADERS`] only when they are more.
const FEW_PARSED: usize = 32;

pub(super) fn parse_head(buf: &mut BytesMut, shape: HeadShape) -> Result<Option<Head>, H1Error> {
    let mut more = false;
    let parsed = parse_head_in::<FEW_PARSED>(buf, shape, &mut more);
    if more {
        return parse_head_with_many_fields(buf, shape);
    }
    parsed
}

/// A head with more than [`FEW_PARSED`] fields, parsed again. Out of line: its room for
/// [`MAX_HEADERS`] fields (4 KB) would otherwise be in the stack frame of every response's
/// parse, and of the request path's poll that it is inlined into.
#[cold]
#[inline(never)]
fn parse_head_with_many_fields(
    buf: &mut BytesMut,
    shape: HeadShape,
) -> Result<Option<Head>, H1Error> {
    parse_head_in::<MAX_HEADERS>(buf, shape, &mut false)
}

/// Parses a response head with room for `N` fields. A head with more, when `N` is not the most
/// a head may have, sets `more` (and is `Ok(None)`).
fn parse_head_in<const N: usize>(
    buf: &mut BytesMut,
    shape: HeadShape,
    more: &mut bool,
) -> Result<Option<Head>, H1Error> {
    // Uninitialised: zeroing the fields per response would cost more than parsing them.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; N];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        buf,
        &mut fields,
    );
    let len = match parsed {
        // A head that arrived whole in one read is held to the same cap as one still coming.
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return Err(H1Error::Invalid("response head too large"));
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) if N < MAX_HEADERS => {
            *more = true;
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid("too many header fields"));
        }
        Err(_) => return Err(H1Error::Invalid("malformed response head")),
    };
    let code = r.code.unwrap_or(0);
    // RFC 9110 §15 defines 100-599; `http` takes up to 999, which no client knows what to do
    // with.
    let status = http::StatusCode::from_u16(code)
        .ok()
        .filter(|_| code <= 599)
        .ok_or(H1Error::Invalid("invalid status code"))?;
    let http11 = r.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = !http11;
    let mut announced_idle = None::<u64>;
    // Names and values are slices of the head, taken out of the buffer whole once it is
    // parsed: one shared buffer instead of an allocation and a copy per value. Each field is
    // named by its place in the head until then.
    let base = buf.as_ptr() as usize;
    let place = |s: &[u8]| {
        let start = (s.as_ptr() as usize).wrapping_sub(base);
        // A head is at most MAX_HEAD bytes: its offsets fit in a u32.
        (start <= len && len - start >= s.len() && len <= u32::MAX as usize)
            .then_some((start as u32, (start + s.len()) as u32))
            .ok_or(H1Error::Invalid("malformed response head"))
    };
    let mut spans = Spans::new();
    for f in r.headers.iter() {
        // One lower-casing pass names the field for the framing rules here and for the map
        // it goes into (no comparison per rule, no parsing of a common name).
        let known = known_name(f.name.as_bytes());
        match known {
            Some(Known::ContentLength) => {
                let n = parse_length(f.value).ok_or(H1Error::Invalid("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Invalid("conflicting Content-Length"));
                }
                length = Some(n);
            }
            Some(Known::TransferEncoding) => {
                // Only `chunked`, once (several fields are one list). Any other coding would
                // reach the client undecoded once the framing is taken off, and an unknown one
                // cannot be framed at all: 502, and the connection is not reused (as nginx).
                for coding in f.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if coding.is_empty() {
                        continue;
                    }
                    if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(H1Error::Invalid("unsupported Transfer-Encoding"));
                    }
                    chunked = true;
                }
                if !chunked {
                    return Err(H1Error::Invalid("unsupported Transfer-Encoding"));
                }
            }
            Some(Known::Connection) => {
                close |= has_token(f.value, b"close");
                if !http11 && has_token(f.value, b"keep-alive") {
                    close = false;
                }
            }
            Some(Known::KeepAlive) => {
                if let Some(t) = crate::proxy::keepalive::announced_timeout(f.value) {
                    announced_idle = Some(announced_idle.map_or(t, |a| a.min(t)));
                }
            }
            _ => {}
        }
        spans.push(known, place(f.name.as_bytes())?, place(f.value)?);
    }
    let framing = match (chunked, length) {
        (true, Some(_)) => {
            return Err(H1Error::Invalid(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        (true, None) => Framing::Chunked(Chunk::Size),
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    };
    let n = spans.len();
    let fields = buf.split_to(len).freeze();
    let head = match shape {
        HeadShape::Http => {
            let mut headers = HeaderMap::with_capacity(n);
            spans.fill(&fields, &mut headers)?;
            let (mut parts, ()) = http::Response::new(()).into_parts();
            parts.status = status;
            parts.version = if http11 {
                http::Version::HTTP_11
            } else {
                http::Version::HTTP_10
            };
            parts.headers = headers;
            UpstreamHead::Http(parts)
        }
        HeadShape::Client => {
            // Room for a field or two a plugin adds (it edits this list in place).
            let mut list = Vec::with_capacity(n + 2);
            spans.fill(&fields, &mut list)?;
            UpstreamHead::Client {
                status,
                fields: list,
                length,
            }
        }
    };
    Ok(Some(Head {
        head,
        framing,
        keep_alive: !close,
        announced_idle,
    }))
}

/// A `Content-Length` value: digits only (several equal values joined by commas pass).
fn parse_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_values_are_kept_whole_for_many_fields_and_repeated_names() {
        let mut head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n".to_vec();
        for i in 0..40 {
            head.extend_from_slice(format!("X-H-{i}: value {i}\r\n").as_bytes());
            head.extend_from_slice(format!("set-cookie: c{i}=1\r\n").as_bytes());
        }
        head.extend_from_slice(b"X-Tab: a\tb\r\nX-Empty:\r\n\r\nokNEXT");
        let mut buf = BytesMut::from(&head[..]);
        let parsed = parse_head(&mut buf, HeadShape::Http).unwrap().unwrap();
        assert_eq!(
            (parsed.framing, parsed.keep_alive),
            (Framing::Length(2), true)
        );
        // What follows the head stays in the buffer.
        assert_eq!(&buf[..], b"okNEXT");
        let UpstreamHead::Http(parts) = parsed.head else {
            panic!("not an http head")
        };
        let h = &parts.headers;
        assert_eq!(h["server"], "nginx");
        for i in 0..40 {
            assert_eq!(
                h[format!("x-h-{i}").as_str()],
                format!("value {i}").as_str()
            );
        }
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies.len(), 40);
        assert!(
            cookies
                .iter()
                .enumerate()
                .all(|(i, c)| *c == format!("c{i}=1").as_str())
        );
        assert_eq!(h["x-tab"], "a\tb");
        assert_eq!(h["x-empty"], "");
    }

    #[test]
    fn heads_past_the_few_fields_parsed_at_first_are_parsed_whole_up_to_the_cap() {
        let head = |fields: usize, end: &str| {
            let mut h = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n".to_vec();
            for i in 1..fields {
                h.extend_from_slice(format!("X-H-{i}: {i}\r\n").as_bytes());
            }
            h.extend_from_slice(end.as_bytes());
            BytesMut::from(&h[..])
        };
        for fields in [FEW_PARSED, FEW_PARSED + 1, MAX_HEADERS] {
            // Still coming: more to read, whatever the count so far.
            assert!(matches!(
                parse_head(&mut head(fields, ""), HeadShape::Client),
                Ok(None)
            ));
            let parsed = parse_head(&mut head(fields, "\r\n"), HeadShape::Client);
            let Ok(Some(Head {
                head: UpstreamHead::Client { fields: list, .. },
                ..
            })) = parsed
            else {
                panic!("{fields} fields: not parsed");
            };
            assert_eq!(list.len(), fields, "{fields} fields");
        }
        let over = parse_head(&mut head(MAX_HEADERS + 1, "\r\n"), HeadShape::Client);
        assert!(matches!(
            over,
            Err(H1Error::Invalid("too many header fields"))
        ));
    }

    #[test]
    fn control_characters_in_response_fields_are_refused() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nx-a: b\r\n c\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nx-a: b\rc\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a: b\0c\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx a: b\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a\0: b\r\ncontent-length: 0\r\n\r\n",
        ] {
            for shape in [HeadShape::Http, HeadShape::Client] {
                let mut buf = BytesMut::from(head);
                assert!(
                    parse_head(&mut buf, shape).is_err(),
                    "{shape:?} {:?}",
                    String::from_utf8_lossy(head)
                );
            }
        }
    }

    /// A head parsed into the client's types holds what the `http` one holds.
    #[test]
    fn both_shapes_of_a_head_hold_the_same_fields() {
        let head = b"HTTP/1.1 404 Not Found\r\nServer: up\r\nSet-Cookie: a=1\r\n\
            set-cookie: b=2\r\nX-Tab: a\tb\r\nX-Empty:\r\nX-Obs: caf\xc3\xa9\r\n\
            Keep-Alive: timeout=9, max=5\r\nkeep-alive: timeout=4\r\nContent-Length: 0\r\n\r\n";
        let parse = |shape| {
            let mut buf = BytesMut::from(&head[..]);
            let parsed = parse_head(&mut buf, shape).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!(parsed.announced_idle, Some(4), "{shape:?}");
            assert_eq!(parsed.framing, Framing::Length(0), "{shape:?}");
            parsed.head
        };
        let http = parse(HeadShape::Http).into_http();
        let UpstreamHead::Client { status, fields, .. } = parse(HeadShape::Client) else {
            panic!("not a client head")
        };
        assert_eq!((status.as_u16(), http.status.as_u16()), (404, 404));
        let mut from_http: Vec<(String, Vec<u8>)> = http
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let mut from_client: Vec<(String, Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        from_http.sort();
        from_client.sort();
        assert_eq!(from_http.len(), 9);
        assert_eq!(from_http, from_client);
        // In the order they came, names lower-case.
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "server",
                "set-cookie",
                "set-cookie",
                "x-tab",
                "x-empty",
                "x-obs",
                "keep-alive",
                "keep-alive",
                "content-length"
            ]
        );
        assert_eq!(fields[2].1, "b=2");
    }

    /// Which connections may go back to the pool.
    #[test]
    fn reuse_needs_http11_no_close_and_a_framed_body() {
        let parse = |head: &[u8]| {
            let mut b = BytesMut::from(head);
            let parsed = parse_head(&mut b, HeadShape::Http).unwrap().unwrap();
            (parsed.framing, parsed.keep_alive)
        };
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), true)
        );
        assert!(!parse(b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 1\r\n\r\n").1);
        assert!(!parse(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").1);
        assert!(parse(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n").1);
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n\r\n").0, Framing::Close);
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked \r\n\r\n").0,
            Framing::Chunked(Chunk::Size)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n").0,
            Framing::Length(3)
        );
    }
}
