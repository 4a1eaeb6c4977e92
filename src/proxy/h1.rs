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
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::header;
use tokio::io::AsyncWriteExt;

use super::body::{ProxyBody, UpstreamIncoming};
use super::headers::HeaderList;
use super::pool::LocalPool;
use super::response::{HeadShape, UpstreamResponse};
use head::read_head;
use response_body::{Framing, check_buffered_chunks};

use crate::telemetry::trace::Field;
use crate::upstream::PoolKey;
pub(crate) use crate::wire::connect::Io;

mod fields;
mod head;
mod response_body;
#[cfg(test)]
mod tests;

pub use response_body::ResponseBody;

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

/// Reads from the socket into the connection's buffer; `Ok(0)` at end of stream.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
}
