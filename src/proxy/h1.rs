//! HTTP/1.1 to upstreams, driven by the request's own task.
//!
//! hyper's client runs every connection as a task of its own and hands each request and
//! response across channels to it; a proxied request then costs two task switches, two
//! channel hand-offs and (for pooling) a third task that waits for the connection to be ready
//! again. Here the request's future writes the request and reads the response head itself, and
//! the response body reads the rest straight from the socket: when it has read the last byte,
//! the connection goes back to the worker's pool from there, with no task, channel or timer.
//!
//! Used for requests whose body is in hand (none, or read whole for retries). A streamed
//! request body, an upgrade and HTTP/2 go through hyper (see [`super::pool`]).
//!
//! What it accepts from upstreams follows RFC 9112 as strictly as hyper does: a head of at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, one `Content-Length` value (or several equal
//! ones), `Transfer-Encoding` whose last coding is `chunked` (else the body ends at close), no
//! `Content-Length` with `Transfer-Encoding`, `1xx` interim responses skipped. A connection is
//! reused only when its response was read to the end with nothing after it, the upstream did
//! not say `Connection: close`, and the version is HTTP/1.1.

use std::io;
use std::pin::Pin;
use std::rc::Weak;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_http::header as ax;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use super::body::{ProxyBody, UpstreamIncoming};
use super::headers::HeaderList;
use super::pool::LocalPool;
use super::response::{HeadShape, UpstreamHead, UpstreamResponse};
use crate::telemetry::trace::Field;
use crate::upstream::PoolKey;
pub(crate) use crate::wire::connect::Io;

/// Largest response head read (status line and fields).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions) or trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Largest request-head buffer an idle connection keeps.
const KEEP_OUT: usize = 4 * 1024;
/// Bodies up to this size are copied behind the head and written in one `write`.
const COALESCE_BODY: usize = 16 * 1024;

/// An idle HTTP/1.1 connection: its socket and what was read from it but not yet used.
pub(crate) struct Conn {
    io: Io,
    buf: BytesMut,
    /// Where request heads are written, kept for the next request on this connection.
    out: BytesMut,
}

impl Conn {
    pub(crate) fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// Whether the upstream has closed or written to this idle connection (it may not be
    /// used then). Costs a system call only when the reactor saw the socket readable.
    pub(crate) fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match self.io.tcp().try_read(&mut probe) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // Closed (0), or bytes nobody asked for.
            Ok(_) => false,
        }
    }
}

/// The upstream closed the connection after interim (1xx) responses and before a final one.
pub(crate) const NO_FINAL_RESPONSE: &str = "an interim (1xx) response without a final response";

/// Why an exchange failed.
#[derive(Debug)]
pub enum H1Error {
    /// The connection closed or failed before a byte of the response came: on a reused
    /// connection, the upstream most likely closed it while idle.
    Lost(io::Error),
    /// Writing the request failed.
    Write(io::Error),
    /// Reading the response failed after it began, or it is not valid HTTP/1.1.
    Read(io::Error),
    Invalid(&'static str),
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Lost(e) => write!(f, "connection closed before the response: {e}"),
            H1Error::Write(e) => write!(f, "writing the request failed: {e}"),
            H1Error::Read(e) => write!(f, "reading the response failed: {e}"),
            H1Error::Invalid(why) => write!(f, "invalid response: {why}"),
        }
    }
}

impl std::error::Error for H1Error {}

/// Where the connection goes back to when its response has been read whole.
pub(crate) struct Checkin {
    pub pool: Weak<LocalPool>,
    pub key: PoolKey,
    /// How long it may wait idle; `None`: not reusable (announced `timeout=0`).
    pub idle: Option<Duration>,
}

/// A request as written on the connection.
pub(crate) struct RequestHead<'a> {
    pub req: &'a http::Request<ProxyBody>,
    /// Header fields written after the request's own (a list built for this head).
    pub fields: Option<&'a HeaderList>,
    /// Written in place of any `traceparent` in the fields.
    pub traceparent: Option<&'a [u8; 55]>,
}

/// Writes the request and reads the response head, parsed into `shape`. The body (none when
/// `head_only`) reads the rest and hands the connection to `checkin` at its end. Boxed: the
/// response goes up through the attempt's futures as a pointer (see `pool::Sent`).
pub(crate) async fn exchange(
    mut conn: Conn,
    request: RequestHead<'_>,
    checkin: Checkin,
    idle_timeout: Duration,
    shape: HeadShape,
) -> Result<Box<UpstreamResponse>, H1Error> {
    let req = request.req;
    let head_only = req.method() == http::Method::HEAD;
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    out.reserve(512);
    let body = encode_head(&request, &mut out);
    match body {
        Some(b) if b.len() <= COALESCE_BODY => {
            out.extend_from_slice(b);
            conn.io.write_all(&out).await.map_err(H1Error::Write)?;
        }
        Some(b) => {
            conn.io.write_all(&out).await.map_err(H1Error::Write)?;
            conn.io.write_all(b).await.map_err(H1Error::Write)?;
        }
        None => conn.io.write_all(&out).await.map_err(H1Error::Write)?,
    }
    // Kept for the next request unless a body made it grow: an idle connection holds little.
    if out.capacity() <= KEEP_OUT {
        conn.out = out;
    }
    let mut answered = false;
    let head = loop {
        let head = match read_head(&mut conn, shape).await {
            // After an interim response the upstream has answered: a close before the next head
            // leaves a 1xx as its only response, which is no response to relay (as an invalid
            // one), and never a stale connection to send the request on again.
            Err(H1Error::Lost(_)) if answered => return Err(H1Error::Invalid(NO_FINAL_RESPONSE)),
            r => r?,
        };
        // Interim responses (100 Continue, 103 Early Hints) are skipped.
        let status = head.head.status();
        if status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS {
            answered = true;
            continue;
        }
        break head;
    };
    let status = head.head.status().as_u16();
    let framing = if head_only || status == 204 || status == 304 || status == 101 {
        Framing::Length(0)
    } else {
        head.framing
    };
    // Chunks that came with the head are checked before the head is relayed.
    if let Framing::Chunked(_) = framing {
        check_buffered_chunks(&conn.buf)?;
    }
    // A 204 that announces a body (it may have none, RFC 9110 15.3.5) is from an upstream
    // whose next bytes cannot be trusted to start the next response: were they a body sent
    // anyway, the next request on the connection would get them as its answer.
    let bodiless_204_with_a_body =
        status == 204 && matches!(head.framing, Framing::Length(1..) | Framing::Chunked(_));
    let reusable = head.keep_alive
        && status != 101
        && !bodiless_204_with_a_body
        && !matches!(framing, Framing::Close);
    let idle = if reusable {
        super::keepalive::idle_limit_of(head.announced_idle, idle_timeout)
    } else {
        None
    };
    let mut body = ResponseBody {
        conn: Some(conn),
        framing,
        checkin: Checkin {
            idle: idle.filter(|_| checkin.idle.is_some()),
            ..checkin
        },
    };
    body.end_if_done();
    Ok(Box::new(UpstreamResponse {
        head: head.head,
        body: UpstreamIncoming::H1(body),
    }))
}

/// Writes the request head into `out`, with `traceparent` in place of any in the request's
/// headers; returns the body bytes to send after it.
fn encode_head<'a>(head: &RequestHead<'a>, out: &mut BytesMut) -> Option<&'a [u8]> {
    let (req, traceparent) = (head.req, head.traceparent);
    let body: Option<&[u8]> = match req.body() {
        ProxyBody::Full(Some(b)) => Some(b),
        _ => None,
    };
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.extend_from_slice(b" ");
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if pq.is_empty() { b"/" } else { pq.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let trace_name = Field::TraceParent.header();
    let listed = head.fields.into_iter().flat_map(HeaderList::iter);
    for (name, value) in req.headers().iter().chain(listed) {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || (traceparent.is_some() && name == trace_name)
        {
            continue;
        }
        has_host |= name == header::HOST;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_host && let Some(a) = req.uri().authority() {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(a.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(tp) = traceparent {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(tp);
        out.extend_from_slice(b"\r\n");
    }
    let len = body.map_or(0, <[u8]>::len);
    // A length for every body, and `0` where the method defines a body (as hyper does).
    let m = req.method();
    if len > 0 || m == http::Method::POST || m == http::Method::PUT || m == http::Method::PATCH {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    body.filter(|b| !b.is_empty())
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a `size[;ext]\r\n` line.
    Size,
    /// Bytes of the current chunk still to come.
    Data(u64),
    /// The `\r\n` after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// Reads from the socket into the connection's buffer; `Ok(0)` at end of stream.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
}

/// A parsed response head.
struct Head {
    head: UpstreamHead,
    framing: Framing,
    /// Whether the connection may carry another request (HTTP/1.1 or `keep-alive`, no
    /// `close`).
    keep_alive: bool,
    /// The smallest `timeout=` of its `Keep-Alive` fields (seconds).
    announced_idle: Option<u64>,
}

/// Reads and parses a response head; its bytes are removed from the buffer.
async fn read_head(conn: &mut Conn, shape: HeadShape) -> Result<Head, H1Error> {
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

fn parse_head(buf: &mut BytesMut, shape: HeadShape) -> Result<Option<Head>, H1Error> {
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
                if let Some(t) = super::keepalive::announced_timeout(f.value) {
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

/// A header map a parsed head's fields go into, named and valued by slices of the head.
trait Fields {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error>;
}

impl Fields for HeaderMap {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error> {
        let name = match known {
            Some(k) => KNOWN[k as usize].1.clone(),
            None => {
                HeaderName::from_bytes(name).map_err(|_| H1Error::Invalid("invalid header name"))?
            }
        };
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::Invalid("invalid header value"))?;
        self.append(name, value);
        Ok(())
    }
}

impl Fields for Vec<(ax::HeaderName, ax::HeaderValue)> {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error> {
        let name = match known {
            Some(k) => KNOWN[k as usize].0.clone(),
            None => ax::HeaderName::from_bytes(name)
                .map_err(|_| H1Error::Invalid("invalid header name"))?,
        };
        let value = ax::HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::Invalid("invalid header value"))?;
        self.push((name, value));
        Ok(())
    }
}

/// Names most responses carry, and those the framing rules read: [`known_name`] finds them
/// with one pass over the name, and their `HeaderName`s are taken from [`KNOWN`], not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    ContentType,
    ContentLength,
    Date,
    Server,
    Connection,
    KeepAlive,
    CacheControl,
    TransferEncoding,
}

/// The names of [`Known`], in its order, in both `http` versions. A `static`: a `const` array
/// of names would be built and dropped at each use.
static KNOWN: [(ax::HeaderName, HeaderName); 8] = [
    (ax::CONTENT_TYPE, header::CONTENT_TYPE),
    (ax::CONTENT_LENGTH, header::CONTENT_LENGTH),
    (ax::DATE, header::DATE),
    (ax::SERVER, header::SERVER),
    (ax::CONNECTION, header::CONNECTION),
    (
        ax::HeaderName::from_static("keep-alive"),
        HeaderName::from_static("keep-alive"),
    ),
    (ax::CACHE_CONTROL, header::CACHE_CONTROL),
    (ax::TRANSFER_ENCODING, header::TRANSFER_ENCODING),
];

/// Which [`Known`] name `name` is, in any case: picked by its length, then compared eight
/// bytes at a time. The first cut lowered the name into a buffer and matched the buffer, which
/// compared it with musl's `memcmp`, a byte at a time (~100 instructions a field).
fn known_name(name: &[u8]) -> Option<Known> {
    let (known, lower): (Known, &[u8]) = match name.len() {
        4 => (Known::Date, b"date"),
        6 => (Known::Server, b"server"),
        10 if name[0] | 0x20 == b'c' => (Known::Connection, b"connection"),
        10 => (Known::KeepAlive, b"keep-alive"),
        12 => (Known::ContentType, b"content-type"),
        13 => (Known::CacheControl, b"cache-control"),
        14 => (Known::ContentLength, b"content-length"),
        17 => (Known::TransferEncoding, b"transfer-encoding"),
        _ => return None,
    };
    is_name(name, lower).then_some(known)
}

/// Whether the field name `name` is `lower` (lower-case letters and `-`) in any case.
///
/// Compared eight bytes at a time: where `lower` has a letter, the name's byte is compared with
/// its `0x20` bit set (`A`-`Z` lowered; no other byte becomes a letter so); elsewhere as it is.
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    // Bit 0x40 is set in every letter and in no `-`; shifted, it is the case bit of the letters.
    const LETTER: u64 = 0x4040_4040_4040_4040;
    // Eight bytes from `at`, those past the end zero.
    fn word(bytes: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        let part = bytes.get(at..).unwrap_or_default();
        let n = part.len().min(8);
        w[..n].copy_from_slice(&part[..n]);
        u64::from_le_bytes(w)
    }
    if name.len() != lower.len() {
        return false;
    }
    // Whole words, the last one overlapping the one before when the length is no multiple of 8.
    let last = name.len().saturating_sub(8);
    let mut at = 0;
    loop {
        let from = at.min(last);
        let want = word(lower, from);
        if (word(name, from) | ((want & LETTER) >> 1)) != want {
            return false;
        }
        at += 8;
        if at >= name.len() {
            return true;
        }
    }
}

/// Where a field's name and value lie in the head (offsets: a head is at most [`MAX_HEAD`]
/// bytes), and which known name it has.
#[derive(Clone, Copy)]
struct Span {
    known: Option<Known>,
    name: (u32, u32),
    value: (u32, u32),
}

/// The fields of a head being parsed. Most heads have a few fields, held on the stack; more go
/// to the heap.
struct Spans {
    few: [Span; FEW_FIELDS],
    len: usize,
    more: Vec<Span>,
}

const FEW_FIELDS: usize = 16;

impl Spans {
    fn new() -> Spans {
        const NONE: Span = Span {
            known: None,
            name: (0, 0),
            value: (0, 0),
        };
        Spans {
            few: [NONE; FEW_FIELDS],
            len: 0,
            more: Vec::new(),
        }
    }

    fn push(&mut self, known: Option<Known>, name: (u32, u32), value: (u32, u32)) {
        let span = Span { known, name, value };
        match self.few.get_mut(self.len) {
            Some(slot) => *slot = span,
            None => self.more.push(span),
        }
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Appends the fields, in the order they came, to `map`.
    fn fill(&self, head: &Bytes, map: &mut impl Fields) -> Result<(), H1Error> {
        let few = &self.few[..self.len.min(FEW_FIELDS)];
        let range = |(start, end): (u32, u32)| start as usize..end as usize;
        for s in few.iter().chain(&self.more) {
            map.append_field(s.known, &head[range(s.name)], head.slice(range(s.value)))?;
        }
        Ok(())
    }
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

/// The upstream's response body, read from the connection as the client side asks for it.
pub struct ResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    checkin: Checkin,
}

impl ResponseBody {
    /// Once the body is complete: the connection back to the pool when it can be reused.
    fn end_if_done(&mut self) {
        if !matches!(self.framing, Framing::Length(0) | Framing::Done) {
            return;
        }
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let (Some(idle), Some(pool)) = (self.checkin.idle, self.checkin.pool.upgrade())
            && conn.buf.is_empty()
        {
            pool.checkin_own(&self.checkin.key, conn, idle);
        }
    }

    /// The whole body when all of it is already in the buffer (a `Content-Length` body that
    /// came with its head, as most small ones do): taken at once, and the connection goes
    /// back to the pool as after the last read. `None` leaves the body as it was.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        let Framing::Length(left) = self.framing else {
            return None;
        };
        let conn = self.conn.as_mut()?;
        let left = usize::try_from(left)
            .ok()
            .filter(|&n| n <= conn.buf.len())?;
        let data = conn.buf.split_to(left).freeze();
        self.framing = Framing::Length(0);
        self.end_if_done();
        Some(data)
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e)))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What the buffer already holds.
            match this.framing {
                Framing::Done => {
                    this.end_if_done();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.end_if_done();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.end_if_done();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) if !conn.buf.is_empty() => {
                    match chunk_step(&mut conn.buf, state) {
                        Ok(Step::Need) => {}
                        Ok(Step::State(s)) => {
                            this.framing = Framing::Chunked(s);
                            continue;
                        }
                        Ok(Step::Data(data, s)) => {
                            this.framing = Framing::Chunked(s);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Step::End(trailers)) => {
                            this.framing = Framing::Done;
                            this.end_if_done();
                            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                        }
                        Err(e) => return this.fail(e),
                    }
                }
                _ => {}
            }
            // More from the socket.
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(poll_fill(conn, cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(H1Error::Read(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(_) => {}
                Err(e) => return this.fail(H1Error::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Length(0) | Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    /// More bytes are needed.
    Need,
    State(Chunk),
    Data(Bytes, Chunk),
    /// The body ended, with its trailer fields if it had any.
    End(Option<HeaderMap>),
}

/// One step of the chunked decoder over what the buffer holds.
fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Step, H1Error> {
    match state {
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(H1Error::Invalid("chunk size line too long"));
                }
                return Ok(Step::Need);
            };
            let size = chunk_size(&buf[..end])?;
            buf.advance(end + 2);
            Ok(Step::State(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Step::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::Need);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Invalid("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::State(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let Some(end) = find(buf, b"\r\n\r\n") else {
                if buf.len() > MAX_TRAILERS {
                    return Err(H1Error::Invalid("trailer section too large"));
                }
                return Ok(Step::Need);
            };
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let parsed = httparse::parse_headers(&buf[..end + 4], &mut fields)
                .map_err(|_| H1Error::Invalid("malformed trailer section"))?;
            let mut map = HeaderMap::new();
            if let httparse::Status::Complete((_, fields)) = parsed {
                for f in fields {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(f.name.as_bytes()),
                        HeaderValue::from_bytes(f.value),
                    ) {
                        map.append(n, v);
                    }
                }
            }
            buf.advance(end + 4);
            Ok(Step::End(Some(map)))
        }
    }
}

/// The size on a chunk's `size[;ext]` line (without its CRLF).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let size_part = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if size_part.is_empty() || size_part.len() > 15 || !size_part.iter().all(u8::is_ascii_hexdigit)
    {
        return Err(H1Error::Invalid("invalid chunk size"));
    }
    u64::from_str_radix(std::str::from_utf8(size_part).unwrap_or("x"), 16)
        .map_err(|_| H1Error::Invalid("invalid chunk size"))
}

/// Checks the chunks that `buf` (the bytes read past the head) already holds, without taking
/// them: a body that came with its head and is broken fails the exchange (a 502) instead of
/// failing once its head is relayed, when the client could only be cut off. What has not come
/// yet is checked as it is decoded.
fn check_buffered_chunks(buf: &[u8]) -> Result<(), H1Error> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(end) = find_crlf(rest) else {
            if rest.len() > MAX_CHUNK_LINE {
                return Err(H1Error::Invalid("chunk size line too long"));
            }
            return Ok(());
        };
        let size = chunk_size(&rest[..end])?;
        if size == 0 {
            // Trailers are checked as they are decoded.
            return Ok(());
        }
        let Some(data_end) = usize::try_from(size)
            .ok()
            .and_then(|n| (at + end + 2).checked_add(n))
        else {
            return Ok(());
        };
        match buf.get(data_end..data_end.saturating_add(2)) {
            Some(b"\r\n") => at = data_end + 2,
            Some(_) => return Err(H1Error::Invalid("chunk data not followed by CRLF")),
            None => return Ok(()),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n")
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
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
        assert!(
            !reused_after(b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n").await
        );
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

    #[test]
    fn buffered_chunks_are_checked_as_far_as_they_came() {
        for (bytes, ok) in [
            (&b""[..], true),
            (b"5", true),
            (b"5\r\nhel", true),
            (b"5\r\nhello", true),
            (b"5\r\nhello\r", true),
            (b"5\r\nhello\r\n0\r\nx-t: 1\r\n", true),
            (b"a\r\n0123456789\r\n0\r\n\r\n", true),
            (b"fffffffffffffff\r\nab", true),
            (b"zz\r\n", false),
            (b"\r\n", false),
            (b"5\r\nhelloXY", false),
            (b"1\r\na\r\n2\r\nabc\r\n", false),
            (b"1000000000000000\r\n", false),
        ] {
            assert_eq!(
                check_buffered_chunks(bytes).is_ok(),
                ok,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(check_buffered_chunks(&long).is_err());
    }

    #[tokio::test]
    async fn a_connection_closed_before_any_response_byte_is_lost_not_invalid() {
        let (out, _) = run(vec![], true, get("/")).await;
        assert!(matches!(out, Err(H1Error::Lost(_))), "{:?}", out.err());
    }

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

    /// Known names are found in any case, and only whole: a name that starts or ends like one
    /// is another field.
    #[test]
    fn known_names_are_matched_whole_in_any_case() {
        for (name, known) in [
            (&b"Content-Length"[..], Some(Known::ContentLength)),
            (b"TRANSFER-ENCODING", Some(Known::TransferEncoding)),
            (b"keep-ALIVE", Some(Known::KeepAlive)),
            (b"date", Some(Known::Date)),
            (b"content-lengths", None),
            (b"content-lengt", None),
            (b"transfer-encodings", None),
            (b"x-content-type", None),
            (b"", None),
            // The length of a known name, another name; and CR where the name has `-`.
            (b"connectiox", None),
            (b"keep_alive", None),
            (b"keep\ralive", None),
            (b"content-typf", None),
            (b"Dat", None),
        ] {
            assert_eq!(known_name(name), known, "{}", String::from_utf8_lossy(name));
        }
        for (k, (ax_name, name)) in KNOWN.iter().enumerate() {
            assert_eq!(ax_name.as_str(), name.as_str());
            let known = known_name(name.as_str().to_ascii_uppercase().as_bytes());
            assert_eq!(known.map(|k| k as usize), Some(k), "{name}");
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
