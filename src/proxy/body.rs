//! Bodies, streamed both ways and never buffered whole.
//!
//! Actix's request payload is tied to its worker thread, while the hyper client wants a `Send`
//! body; a small bounded channel bridges the two (backpressure: the client is read only as fast
//! as the upstream takes it). The request size limit is counted while streaming, so a chunked
//! body that grows past it aborts the upstream request.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// Chunks in flight between the client reader and the upstream writer.
pub(crate) const CHANNEL_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the client's body failed: {0}")]
    Client(String),
    #[error("the client sent nothing of its body for {0:?}")]
    Idle(Duration),
    /// A filter on the way (a WASM plugin) stopped the body; the handler knows why.
    #[error("the request body was stopped on its way")]
    Stopped,
}

/// The request body sent upstream.
pub enum ProxyBody {
    Empty,
    /// A body read whole beforehand (small enough to replay on a retry).
    Full(Option<Bytes>),
    Channel {
        rx: mpsc::Receiver<Result<Bytes, BodyError>>,
        len: Option<u64>,
    },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Channel { rx, .. } => {
                Poll::Ready(ready!(rx.poll_recv(cx)).map(|r| r.map(Frame::data)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty | ProxyBody::Channel { len: Some(0), .. } => true,
            ProxyBody::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            ProxyBody::Channel { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Channel { len: Some(n), .. } => SizeHint::with_exact(*n),
            ProxyBody::Channel { len: None, .. } => SizeHint::default(),
        }
    }
}

/// What the request-body reader saw, read by the handler after the fact.
#[derive(Default)]
pub struct BodyStats {
    pub bytes: Cell<u64>,
    pub too_large: Cell<bool>,
    /// The client paused longer than the body idle timeout.
    pub idle: Cell<bool>,
    /// The body stopped because the client went away before its end (end of input or a reset
    /// before the declared length, its HTTP/2 stream cancelled or its connection closed), not
    /// because what it sent was malformed ([`client_went_away`]).
    pub gone: Cell<bool>,
    /// Where a streamed body stands: whose turn it is.
    pub progress: Cell<BodyProgress>,
    /// A reader of the client's body began and has not reached its end (the end of a streamed
    /// body, of one read whole, of one the plugins read): what the client still sends on the
    /// connection is the rest of it.
    pub unfinished: Cell<bool>,
    /// The reader of a streamed body has stopped: the body ended, failed or was dropped.
    pub reader_done: Cell<bool>,
    /// The HTTP/2 connection's place for streaming this body ([`crate::server::h2::UploadSlots`]),
    /// given back when the reader stops.
    pub upload_slot: std::cell::RefCell<Option<tokio::sync::OwnedSemaphorePermit>>,
}

/// Where a body streamed to the upstream stands, for the attempt's timeout
/// ([`BodyStats::deadline`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyProgress {
    /// Waiting for the client's next piece (its own idle timeout bounds the wait).
    #[default]
    Client,
    /// Since then a piece waits for the upstream to take it.
    Upstream(std::time::Instant),
    /// The whole body was handed on then.
    Sent(std::time::Instant),
}

impl BodyStats {
    /// When an attempt that streams this body and may wait `timeout` for its response head
    /// ends, seen `now` (at or after its first deadline): `timeout` after the upstream last
    /// had to take a piece, or after the body ended; never while the client is still to send
    /// (a client slow to upload is not the upstream's failure); never after `until`.
    pub fn deadline(
        &self,
        now: std::time::Instant,
        timeout: Duration,
        until: Option<std::time::Instant>,
    ) -> Option<std::time::Instant> {
        let from = match self.progress.get() {
            BodyProgress::Client => now,
            BodyProgress::Upstream(at) | BodyProgress::Sent(at) => at,
        };
        let at = until.map_or(from + timeout, |u| (from + timeout).min(u));
        (at > now).then_some(at)
    }

    /// Whether no reader of the body stopped before its end.
    pub fn whole_sent(&self) -> bool {
        !self.unfinished.get()
    }

    /// Whether the client still has to send more of the body.
    pub fn awaits_client(&self) -> bool {
        self.progress.get() == BodyProgress::Client
    }
}

/// The next piece of the client's body, or `Idle` if none comes within `idle`.
pub(crate) async fn next_chunk(
    payload: &mut actix_web::dev::Payload,
    idle: Duration,
    stats: &BodyStats,
) -> Option<Result<Bytes, BodyError>> {
    match tokio::time::timeout(idle, payload.next()).await {
        Ok(chunk) => chunk.map(|c| {
            c.map_err(|e| {
                if client_went_away(&e) {
                    stats.gone.set(true);
                }
                BodyError::Client(e.to_string())
            })
        }),
        Err(_) => {
            stats.idle.set(true);
            Some(Err(BodyError::Idle(idle)))
        }
    }
}

/// Whether a body read failed because the client went away rather than because what it sent
/// was malformed: actix-http's HTTP/1.1 dispatcher reports a connection that ended (or was
/// reset) before the body's end as `Incomplete`, the HTTP/2 server a cancelled stream or a
/// closed connection as a reset ([`crate::server::h2`]).
pub(crate) fn client_went_away(e: &actix_http::error::PayloadError) -> bool {
    use actix_http::error::PayloadError;
    use std::io::ErrorKind;
    match e {
        PayloadError::Incomplete(_) => true,
        PayloadError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// What a streamed request body is held to: the route's `max_body_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLimit {
    /// Its whole length.
    Total(u64),
    /// Each of its gRPC messages: a gRPC stream may carry any number of them, for as long as
    /// the call lasts.
    GrpcMessage(u64),
}

/// gRPC's length-prefixed messages (a flag byte, a 4-byte big-endian length, the message)
/// followed through a body piece by piece, however the pieces cut them.
#[derive(Default)]
struct GrpcMessages {
    /// The prefix of the next message, as far as it has come.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    left: u64,
}

impl GrpcMessages {
    /// Follows `piece`; `false` when a message it begins declares more than `limit` bytes.
    fn within(&mut self, mut piece: &[u8], limit: u64) -> bool {
        while !piece.is_empty() {
            if self.left > 0 {
                let take = usize::try_from(self.left).map_or(piece.len(), |l| l.min(piece.len()));
                self.left -= take as u64;
                piece = &piece[take..];
                continue;
            }
            let take = (self.prefix.len() - self.have).min(piece.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&piece[..take]);
            self.have += take;
            piece = &piece[take..];
            if self.have == self.prefix.len() {
                self.have = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = u64::from(u32::from_be_bytes([a, b, c, d]));
                if len > limit {
                    return false;
                }
                self.left = len;
            }
        }
        true
    }
}

/// Starts reading the client's body on this worker and returns the upstream side of it.
/// `len` is the declared `Content-Length`, if any; a pause longer than `idle` between pieces
/// ends the body with [`BodyError::Idle`] (time spent waiting for the upstream to take a piece
/// does not count).
pub fn stream_request_body(
    mut payload: actix_web::dev::Payload,
    len: Option<u64>,
    limit: BodyLimit,
    idle: Duration,
) -> (ProxyBody, Rc<BodyStats>) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let stats = Rc::new(BodyStats::default());
    stats.unfinished.set(true);
    let seen = Rc::clone(&stats);
    let (limit, mut messages) = match limit {
        BodyLimit::Total(n) => (n, None),
        BodyLimit::GrpcMessage(n) => (n, Some(GrpcMessages::default())),
    };
    actix_web::rt::spawn(async move {
        loop {
            seen.progress.set(BodyProgress::Client);
            let Some(chunk) = next_chunk(&mut payload, idle, &seen).await else {
                seen.progress
                    .set(BodyProgress::Sent(std::time::Instant::now()));
                seen.unfinished.set(false);
                break;
            };
            seen.progress
                .set(BodyProgress::Upstream(std::time::Instant::now()));
            let msg = match chunk {
                Ok(bytes) => {
                    let total = seen.bytes.get() + bytes.len() as u64;
                    seen.bytes.set(total);
                    let over = match &mut messages {
                        Some(m) => !m.within(&bytes, limit),
                        None => total > limit,
                    };
                    if over {
                        seen.too_large.set(true);
                        Err(BodyError::TooLarge { limit })
                    } else {
                        Ok(bytes)
                    }
                }
                Err(e) => Err(e),
            };
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
        seen.reader_done.set(true);
        seen.upload_slot.borrow_mut().take();
    });
    (ProxyBody::Channel { rx, len }, stats)
}

/// Reads the client's whole body (at most `limit` bytes), so that it can be sent again on a
/// retry. Memory follows the bytes that arrive: the buffer starts at the declared length
/// (`expected`, itself capped by `limit`), never at the limit.
pub async fn read_request_body(
    payload: &mut actix_web::dev::Payload,
    limit: u64,
    expected: u64,
    idle: Duration,
    stats: &BodyStats,
) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(expected.min(limit)).unwrap_or(0));
    stats.unfinished.set(true);
    while let Some(chunk) = next_chunk(payload, idle, stats).await {
        let bytes = chunk?;
        let total = stats.bytes.get() + bytes.len() as u64;
        stats.bytes.set(total);
        if total > limit {
            stats.too_large.set(true);
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&bytes);
    }
    stats.unfinished.set(false);
    Ok(buf.freeze())
}

/// How a response body ended: `Ok` when whole, else why not (`client_gone`,
/// `upstream_error`, `upstream_read_timeout`).
pub type Ended = Result<(), &'static str>;

/// Called once when a response body ends: bytes sent, and how it ended.
pub type OnFinish = Box<dyn FnOnce(u64, Ended)>;

/// Where the upstream's response trailers are left for the client side, when the client's
/// connection can carry them (HTTP/2); shared by the response body and whoever writes it out.
#[derive(Clone, Default)]
pub struct Trailers(Rc<std::cell::RefCell<Option<http::HeaderMap>>>);

impl Trailers {
    pub fn set(&self, t: http::HeaderMap) {
        *self.0.borrow_mut() = Some(t);
    }

    pub fn take(&self) -> Option<http::HeaderMap> {
        self.0.borrow_mut().take()
    }

    /// Reads a trailer without taking it (for the access log).
    pub fn get(&self, name: &str) -> Option<http::HeaderValue> {
        self.0.borrow().as_ref().and_then(|t| t.get(name).cloned())
    }
}

/// Why an upstream's response body could not be passed on; the client's connection is aborted.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error("reading the upstream's response body failed: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("reading the upstream's response body failed: {0}")]
    H1(#[from] super::h1::H1Error),
    #[error("the upstream sent nothing of its response body for {0:?}")]
    Idle(Duration),
}

/// An upstream's response body: from hyper's client (HTTP/2, streamed requests, upgrades) or
/// read by the request's own task ([`super::h1`]).
pub enum UpstreamIncoming {
    Hyper(hyper::body::Incoming),
    H1(super::h1::ResponseBody),
}

impl UpstreamIncoming {
    /// The whole body, when it is already received (see [`super::h1::ResponseBody::take_whole`]);
    /// `None` leaves it to be streamed.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        match self {
            UpstreamIncoming::Hyper(_) => None,
            UpstreamIncoming::H1(b) => b.take_whole(),
        }
    }
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match self.get_mut() {
            UpstreamIncoming::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamIncoming::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamIncoming::Hyper(b) => b.is_end_stream(),
            UpstreamIncoming::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamIncoming::Hyper(b) => b.size_hint(),
            UpstreamIncoming::H1(b) => b.size_hint(),
        }
    }
}

/// The upstream's response body, handed to actix as it arrives.
pub struct UpstreamBody {
    inner: UpstreamIncoming,
    size: BodySize,
    sent: u64,
    on_finish: Option<OnFinish>,
    /// Longest pause between two pieces of the body.
    idle: Duration,
    /// Armed the first time the upstream makes us wait; `last` moves on with every piece, so
    /// the timer is reset only when it fires early.
    timer: Option<Pin<Box<Sleep>>>,
    last: Option<Instant>,
    /// Where trailers go; `None` when the client cannot receive them (HTTP/1.1).
    trailers: Option<Trailers>,
    /// The upstream's error, held for one turn (see [`UpstreamBody::poll_next`]).
    failed: Option<UpstreamBodyError>,
}

impl UpstreamBody {
    pub fn new(
        inner: UpstreamIncoming,
        size: BodySize,
        idle: Duration,
        on_finish: Option<OnFinish>,
    ) -> Self {
        Self {
            inner,
            size,
            sent: 0,
            on_finish,
            idle,
            timer: None,
            last: None,
            trailers: None,
            failed: None,
        }
    }

    /// Keeps the upstream's trailers in `slot` for a client side that sends them.
    pub fn with_trailers(mut self, slot: Option<Trailers>) -> Self {
        self.trailers = slot;
        self
    }

    fn finish(&mut self, end: Ended) {
        if let Some(f) = self.on_finish.take() {
            f(self.sent, end);
        }
    }

    /// Whether the upstream has been silent for longer than `idle` (arms the wake-up if not).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let last = *self.last.get_or_insert_with(Instant::now);
        let due = last + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl MessageBody for UpstreamBody {
    type Error = UpstreamBodyError;

    fn size(&self) -> BodySize {
        self.size
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamBodyError>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            let Poll::Ready(frame) = polled else {
                if this.stalled(cx) {
                    this.finish(Err("upstream_read_timeout"));
                    return Poll::Ready(Some(Err(UpstreamBodyError::Idle(this.idle))));
                }
                return Poll::Pending;
            };
            if this.timer.is_some() {
                this.last = Some(Instant::now());
            }
            match frame {
                Some(Ok(frame)) => {
                    // Trailers (HTTP/2 upstreams, e.g. gRPC's `grpc-status`) go to an HTTP/2
                    // client; HTTP/1.1 responses are written without them.
                    match frame.into_data() {
                        Ok(data) => {
                            this.sent += data.len() as u64;
                            return Poll::Ready(Some(Ok(data)));
                        }
                        Err(frame) => match (frame.into_trailers(), &this.trailers) {
                            (Ok(t), Some(slot)) => slot.set(relayable_trailers(t)),
                            (Ok(t), None) => tracing::debug!(
                                trailers = t.len(),
                                "upstream response trailers dropped: the client side is HTTP/1.1"
                            ),
                            (Err(_), _) => {}
                        },
                    }
                }
                Some(Err(e)) => {
                    this.finish(Err("upstream_error"));
                    // Held for one turn: the dispatcher writes out what it has (the head, the
                    // body so far) before the error ends the connection. Given at once, the
                    // error dropped its unwritten buffer, and a response cut short right after
                    // its head reached the client as nothing at all.
                    this.failed = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                None => {
                    this.finish(Ok(()));
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away before the end (or the shutdown
        // grace ended).
        self.finish(Err(crate::server::drain::gone_reason()));
    }
}

/// An upstream's trailers as the client gets them: without the fields a trailer must not
/// carry (RFC 9110 §6.5.1: framing, routing, hop-by-hop). A `content-length` trailer made
/// curl fail the response; a `host` one was passed on.
pub(crate) fn relayable_trailers(mut trailers: http::HeaderMap) -> http::HeaderMap {
    const NEVER: [&str; 7] = [
        "content-length",
        "content-type",
        "content-encoding",
        "content-range",
        "host",
        "authorization",
        "set-cookie",
    ];
    // Removed by name: no list of the trailers' own names is built for each response.
    for name in NEVER.iter().chain(&crate::wire::headers::HOP_BY_HOP) {
        trailers.remove(*name);
    }
    trailers
}

#[cfg(test)]
mod trailer_tests {
    use super::relayable_trailers;

    #[test]
    fn trailers_keep_grpc_fields_and_lose_framing_routing_and_hop_by_hop_ones() {
        let mut t = http::HeaderMap::new();
        for (n, v) in [
            ("grpc-status", "0"),
            ("grpc-message", "ok"),
            ("x-checksum", "abc"),
            ("content-length", "5"),
            ("host", "evil"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("connection", "close"),
            ("set-cookie", "a=b"),
            ("content-type", "text/html"),
        ] {
            t.append(
                http::HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            );
        }
        let kept = relayable_trailers(t);
        let mut names: Vec<&str> = kept.keys().map(http::HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-message", "grpc-status", "x-checksum"]);
    }
}

#[cfg(test)]
mod grpc_limit_tests {
    use super::GrpcMessages;

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f
    }

    /// However the pieces cut the messages (inside a prefix, between messages, one byte at a
    /// time), each message is measured by its own prefix.
    #[test]
    fn each_message_is_measured_however_the_pieces_cut_it() {
        let mut body = Vec::new();
        for len in [0, 10, 100, 3, 100] {
            body.extend(frame(len));
        }
        for cut in [1, 2, 3, 5, 6, 7, 64, body.len()] {
            let mut m = GrpcMessages::default();
            assert!(
                body.chunks(cut).all(|p| m.within(p, 100)),
                "pieces of {cut}"
            );
            let mut m = GrpcMessages::default();
            assert!(
                !body.chunks(cut).all(|p| m.within(p, 99)),
                "pieces of {cut}"
            );
        }
        // The prefix alone tells: a message declared over the limit is refused before its bytes.
        let mut m = GrpcMessages::default();
        assert!(m.within(&frame(5), 5));
        assert!(!m.within(&[1, 0, 0, 0, 6], 5));
    }
}
