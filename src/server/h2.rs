//! HTTP/2 from clients: each stream becomes a request for the same actix application that
//! serves HTTP/1.1, so routing, filters, policies and logs are the same for both.
//!
//! ```text
//! connection ─► hyper h2 server (SETTINGS: streams, header list, windows; PING keep-alive)
//!   stream ─► actix Request (method, :path, :authority as Host, headers, body as a stream)
//!          ─► proxy service ─► actix Response ─► h2 HEADERS, DATA…, trailers (from the upstream)
//! ```
//!
//! actix-http's own HTTP/2 dispatcher cannot send trailers, which gRPC needs (`grpc-status`
//! comes last); hyper's can. The application is the same one the HTTP/1.1 dispatcher calls.
//!
//! The connection is bounded like an HTTP/1.1 one: its first request must arrive within the
//! header timeout, it is closed (GOAWAY) after the keep-alive time without streams, and a client
//! that resets more than `[limits] http2_max_resets_per_second` streams in a second — the 2023
//! "rapid reset" attack, where each reset stream costs the server work the client never waits
//! for — gets GOAWAY and its connection is dropped 100 ms later ([`RESETS_GRACE`]). h2's own
//! flood caps (streams reset before they were accepted, and others) end a connection with
//! GOAWAY(ENHANCE_YOUR_CALM) by themselves; it is counted when the connection ends. At the
//! server's shutdown, streams in progress get the shutdown grace and a connection without any
//! is dropped [`SHUTDOWN_IDLE_GRACE`] after its GOAWAY, its client's PING answer or not.
//!
//! Flow control: `[limits] http2_stream_window` and `http2_connection_window` bound what a
//! client sends ahead of the gateway's reads; h2 gives window back only as bodies are read.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{Payload, Request, Response};
use actix_service::Service;
use actix_web::HttpMessage;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http as ax;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::proxy::body::Trailers;
use crate::telemetry::metrics::Metrics;

/// How long a connection that went over `http2_max_resets_per_second` lives after its GOAWAY:
/// long enough for the GOAWAY to be written, not for more streams.
const RESETS_GRACE: Duration = Duration::from_millis(100);

/// How long a connection without streams lives after the server's shutdown GOAWAY: hyper ends
/// it itself once the client answers the GOAWAY's PING (one round trip), and a client that
/// never answers would otherwise hold it for the whole shutdown grace.
const SHUTDOWN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Adds the connection's facts (e.g. its TLS session) to each request of the connection.
pub(crate) type ConnExt = Rc<dyn Fn(&mut Request)>;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Per-connection settings, from `[limits]` in the snapshot current at accept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_resets_per_second: u32,
    /// `[limits] http2_max_streaming_uploads` ([`UploadSlots`]).
    pub max_streaming_uploads: u32,
    /// `[limits] http2_stream_window` (SETTINGS_INITIAL_WINDOW_SIZE): the most of a stream's
    /// request body that h2 takes in for the gateway before the gateway reads it. A body
    /// waiting for a slow upstream holds this much of its connection's window, never more.
    pub stream_window: u32,
    /// `[limits] http2_connection_window`: the most request data the connection holds unread,
    /// all its streams together. h2 gives window back only as the gateway reads (hyper's body
    /// releases each piece's capacity as it is polled), and the gateway reads a body only as
    /// fast as its upstream takes it.
    pub connection_window: u32,
    /// Time the first request has to arrive.
    pub header_timeout: Duration,
    /// Time a connection without streams stays open.
    pub idle_timeout: Duration,
    /// `[limits] send_timeout`: longest a response may wait for the client to take it.
    pub send_timeout: Duration,
}

/// Marks a request whose HTTP/2 stream carries a body (no END_STREAM on its HEADERS): HTTP/2
/// needs neither `Content-Length` nor `Transfer-Encoding` for one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamedBody;

/// The places of one connection's streams for streaming a request body that is still arriving
/// to an HTTP/1.1 upstream (`[limits] http2_max_streaming_uploads`), on each of its requests
/// with a body. Such a stream holds an upstream connection until its body has all arrived: over
/// HTTP/1.1 a client connection holds at most one that way, over HTTP/2 it would hold one per
/// stream (128 by default) for as long as its client trickles the bodies. A stream over the
/// cap has its body read whole before its attempt instead
/// (`server::handler::attempt::read_upload`); the place is given back when its body has all
/// arrived or stopped (`proxy::body::BodyStats::upload_slot`).
#[derive(Clone)]
pub(crate) struct UploadSlots(pub std::sync::Arc<tokio::sync::Semaphore>);

/// Marks a request with a field value that begins or ends with whitespace: malformed in HTTP/2
/// (RFC 9113 §8.2.1), so the handler answers it 400 as it does the requests its own checks
/// refuse, logged. HTTP/1.1's parser trims such whitespace; h2 refuses NUL, CR and LF itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PaddedFieldValue;

/// Runs `fut` on the worker's thread: the application and its bodies are not `Send`.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        // Each stream's and the connection's task shares one clock reading per poll.
        tokio::task::spawn_local(crate::util::clock::Turns::new(fut));
    }
}

/// What the streams of one connection share with the task driving it.
struct ConnShared {
    /// Streams between request and the end of their response.
    active: Cell<u32>,
    /// When `active` last became 0.
    idle_since: Cell<Instant>,
    /// Any request seen yet.
    started: Cell<bool>,
    /// Streams the client abandoned in the current one-second window.
    resets: Cell<u32>,
    window: Cell<Instant>,
    /// Set when the connection must stop taking streams.
    goaway: Cell<Option<&'static str>>,
    /// `[limits] http2_max_resets_per_second`
    max_resets: u32,
    wake: tokio::sync::Notify,
    /// Each stream's [`StreamGuard::waiting`], while the stream lasts.
    waits: std::cell::RefCell<Vec<std::rc::Weak<SendWait>>>,
    /// Given to the requests with a body only.
    uploads: UploadSlots,
}

impl ConnShared {
    fn new(max_resets: u32, max_uploads: u32) -> Self {
        let now = Instant::now();
        Self {
            active: Cell::new(0),
            idle_since: Cell::new(now),
            started: Cell::new(false),
            resets: Cell::new(0),
            window: Cell::new(now),
            goaway: Cell::new(None),
            max_resets,
            wake: tokio::sync::Notify::new(),
            waits: std::cell::RefCell::default(),
            uploads: UploadSlots(std::sync::Arc::new(tokio::sync::Semaphore::new(
                max_uploads as usize,
            ))),
        }
    }

    fn begin(self: &Rc<Self>) -> StreamGuard {
        self.active.set(self.active.get() + 1);
        self.started.set(true);
        let waiting = Rc::new(SendWait::default());
        let mut waits = self.waits.borrow_mut();
        // Streams that ended are forgotten here too, not only by the periodic look: a
        // connection running thousands of short streams between two looks keeps the list (and
        // the cells its weak pointers hold) to about twice its open streams.
        if waits.len() >= 2 * (self.active.get() as usize).max(16) {
            waits.retain(|w| w.strong_count() > 0);
        }
        waits.push(Rc::downgrade(&waiting));
        drop(waits);
        StreamGuard {
            conn: Rc::clone(self),
            done: false,
            waiting,
        }
    }

    /// Whether a stream's response has waited for the client to take it (flow-control window,
    /// or the socket) since before `limit` ago; marks each such stream [`SendWait::timed_out`]
    /// and forgets the streams that ended.
    fn stalled(&self, limit: Duration) -> bool {
        let now = Instant::now();
        let mut waits = self.waits.borrow_mut();
        waits.retain(|w| w.strong_count() > 0);
        let mut any = false;
        for w in waits.iter().filter_map(std::rc::Weak::upgrade) {
            if w.since
                .get()
                .is_some_and(|since| now.duration_since(since) >= limit)
            {
                w.timed_out.set(true);
                any = true;
            }
        }
        any
    }

    fn reset_seen(&self) {
        let now = Instant::now();
        if now.duration_since(self.window.get()) >= Duration::from_secs(1) {
            self.window.set(now);
            self.resets.set(0);
        }
        self.resets.set(self.resets.get() + 1);
        if self.resets.get() > self.max_resets && self.goaway.get().is_none() {
            self.goaway.set(Some("resets"));
            self.wake.notify_one();
        }
    }
}

/// How a stream's response waits for its client, shared by the stream, its connection's
/// stall check and the request (the access log's `send_timeout`).
#[derive(Default)]
pub(crate) struct SendWait {
    /// Since when the response has a frame out that the client has not made room for: hyper
    /// polls the body for the next frame only once the client's window allows it. `None`
    /// while the body itself waits (for the upstream).
    since: Cell<Option<Instant>>,
    /// The connection is being closed because this stream waited past `send_timeout`.
    timed_out: Cell<bool>,
}

impl SendWait {
    /// Whether the stream's response was cut because its client took none of it within the
    /// send timeout (not because the client went away).
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.get()
    }
}

/// What the gateway's handler finds of its HTTP/2 stream, in the request's extensions.
#[derive(Clone)]
pub(crate) struct StreamExt {
    /// Where the upstream's trailers land.
    pub trailers: Trailers,
    pub send: Rc<SendWait>,
}

/// One stream in progress; when dropped before its response ended, the client reset it.
struct StreamGuard {
    conn: Rc<ConnShared>,
    done: bool,
    waiting: Rc<SendWait>,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        c.active.set(c.active.get().saturating_sub(1));
        if c.active.get() == 0 {
            c.idle_since.set(Instant::now());
            c.wake.notify_one();
        }
        if !self.done {
            // Any stream that ends without its response ending: reset by the client, or its
            // connection went away (then the count no longer matters).
            c.reset_seen();
        }
    }
}

/// Serves one HTTP/2 connection until the client closes it, it idles out, or the server stops.
pub(crate) async fn serve<IO, S>(
    io: IO,
    peer: Option<SocketAddr>,
    app: Rc<S>,
    settings: Settings,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
    conn_ext: Option<ConnExt>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
    S: Service<Request, Response = Response<BoxBody>, Error = actix_web::Error> + 'static,
{
    let shared = Rc::new(ConnShared::new(
        settings.max_resets_per_second,
        settings.max_streaming_uploads,
    ));
    let mut builder = hyper::server::conn::http2::Builder::new(LocalExec);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        // Fixed windows, not hyper's `adaptive_window`: its BDP estimate sets the connection's
        // window equal to the stream's, so one upload stuck on its upstream would hold the
        // connection's whole window again, and it grows to 16 MiB whatever `[limits]` says.
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        // hyper's own guard against streams reset before they are accepted.
        .max_pending_accept_reset_streams(Some(settings.max_resets_per_second as usize))
        .max_local_error_reset_streams(Some(1024))
        // A peer that stops answering PINGs is gone, even mid-stream.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        // The upstream's Date header is passed on; the gateway adds none of its own.
        .auto_date_header(false);
    let service = {
        let shared = Rc::clone(&shared);
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = shared.begin();
            let app = Rc::clone(&app);
            let ext = conn_ext.clone();
            async move { Ok::<_, Infallible>(call(&app, req, peer, guard, ext.as_deref()).await) }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::pin!(shutdown);
    // A client that keeps its connection alive (it answers PINGs) but grants a stream no
    // window holds that stream, its upstream connection and its places: looked at twice per
    // send timeout while streams are open.
    let mut stall_check = tokio::time::interval(settings.send_timeout / 2);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set when the gateway sent GOAWAY: the time left for the client's last streams before
    // the connection is dropped (a client that never answers the GOAWAY's PING holds nothing).
    let mut closing: Option<Instant> = None;
    // When the server's shutdown began.
    let mut stopping: Option<Instant> = None;
    // When the connection is due to close, as things stand (`None`: a stream is in progress).
    let due = |closing: Option<Instant>, stopping: Option<Instant>| {
        if closing.is_some() {
            closing
        } else if shared.active.get() > 0 {
            None
        } else if let Some(at) = stopping {
            // Streams in progress have the shutdown grace; without any, only the PING's.
            Some(at.max(shared.idle_since.get()) + SHUTDOWN_IDLE_GRACE)
        } else if shared.started.get() {
            Some(shared.idle_since.get() + settings.idle_timeout)
        } else {
            Some(shared.idle_since.get() + settings.header_timeout)
        }
    };
    loop {
        let deadline = due(closing, stopping);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let goaway = |reason: &'static str, conn: Pin<&mut _>| {
            metrics.http2_goaway.with_label_values(&[reason]).inc();
            hyper::server::conn::http2::Connection::graceful_shutdown(conn);
            // A client over the reset rate gets no grace: hyper's graceful GOAWAY takes new
            // streams until the client answers its PING, and one that never did went on opening
            // and resetting streams (750 a second, for the whole grace) after it.
            let grace = if reason == "resets" {
                RESETS_GRACE
            } else {
                settings.header_timeout.max(Duration::from_secs(1))
            };
            Some(Instant::now() + grace)
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    // Not when the gateway's own GOAWAY went first: one connection, one count.
                    if closing.is_none() && is_h2_calm_goaway(&e) {
                        metrics.http2_goaway.with_label_values(&["enhance_your_calm"]).inc();
                        tracing::info!(
                            client = peer.map(tracing::field::display),
                            reason = "enhance_your_calm",
                            error = %e,
                            "HTTP/2 connection sent GOAWAY"
                        );
                    }
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            () = sleep => {
                // A stream may have begun (or ended, moving the idle start) while asleep.
                if closing.is_none() && due(None, stopping).is_none_or(|d| Instant::now() < d) {
                    continue;
                }
                if closing.is_some() || stopping.is_some() {
                    tracing::debug!(client = peer.map(tracing::field::display), "HTTP/2 connection dropped after GOAWAY");
                    return;
                }
                let reason = if shared.started.get() { "idle" } else { "header_timeout" };
                if reason == "header_timeout" {
                    metrics.client_timeouts.with_label_values(&["header"]).inc();
                }
                closing = goaway(reason, conn.as_mut());
            }
            () = shared.wake.notified(), if closing.is_none() => {
                if let Some(reason) = shared.goaway.get() {
                    tracing::info!(client = peer.map(tracing::field::display), reason, "HTTP/2 connection sent GOAWAY");
                    closing = goaway(reason, conn.as_mut());
                }
            }
            // Always armed: a branch disabled here would stay so until another one fired.
            _ = stall_check.tick() => {
                if shared.active.get() > 0 && shared.stalled(settings.send_timeout) {
                    metrics.client_timeouts.with_label_values(&["send"]).inc();
                    tracing::debug!(client = peer.map(tracing::field::display), "HTTP/2 client took none of a response within the send timeout; closing");
                    return;
                }
            }
            () = &mut shutdown, if stopping.is_none() && closing.is_none() => {
                // The server's own shutdown: streams in progress get the shutdown grace
                // period (actix ends the connection when it is over); once none is left, the
                // connection gets [`SHUTDOWN_IDLE_GRACE`].
                stopping = Some(Instant::now());
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Whether h2 ended the connection with its own GOAWAY(ENHANCE_YOUR_CALM): one of its flood
/// caps was reached (streams reset before they were accepted, `too_many_resets`; streams it had
/// to reset itself; CONTINUATION frames; a header list far over the limit; small DATA frames).
/// Which one is only in the GOAWAY's debug data, which h2 shows in its error's text alone.
fn is_h2_calm_goaway(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|e| {
            e.is_go_away() && e.is_library() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        })
}

/// The request's `cookie` fields as one value, joined with "; "; `None` without any.
fn joined_cookies(headers: &http::HeaderMap) -> Option<ax::header::HeaderValue> {
    let mut fields = headers.get_all(http::header::COOKIE).iter();
    let first = fields.next()?;
    let mut joined = first.as_bytes().to_vec();
    for v in fields {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    ax::header::HeaderValue::from_bytes(&joined).ok()
}

/// One stream: the request into the application, its response back.
async fn call<S>(
    app: &S,
    req: hyper::Request<Incoming>,
    peer: Option<SocketAddr>,
    mut guard: StreamGuard,
    conn_ext: Option<&dyn Fn(&mut Request)>,
) -> hyper::Response<H2Body>
where
    S: Service<Request, Response = Response<BoxBody>, Error = actix_web::Error>,
{
    let (parts, body) = req.into_parts();
    let streamed = !body.is_end_stream();
    let head_only = parts.method == http::Method::HEAD;
    let mut padded = false;
    let mut areq = if streamed {
        let payload: actix_http::BoxedPayloadStream = Box::pin(RequestStream(body));
        Request::with_payload(Payload::Stream { payload })
    } else {
        Request::with_payload(Payload::None)
    };
    {
        let head = areq.head_mut();
        head.method =
            ax::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap_or(ax::Method::GET);
        head.version = ax::Version::HTTP_2;
        head.peer_addr = peer;
        // The origin-form target; the authority is the Host header below.
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        head.uri = target.parse().unwrap_or_else(|_| ax::Uri::from_static("/"));
        let headers = &mut head.headers;
        headers.reserve(parts.headers.len() + 1);
        for (name, value) in &parts.headers {
            padded |= is_padded(value.as_bytes());
            if name == http::header::COOKIE {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                ax::header::HeaderName::from_bytes(name.as_str().as_bytes()),
                ax::header::HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.append(n, v);
            }
        }
        // RFC 9113 §8.2.3: browsers send each cookie in a field of its own over HTTP/2; they
        // are one field again (joined with "; ") before an HTTP/1.1 hop, where many
        // applications read only the first `Cookie` line.
        if let Some(cookie) = joined_cookies(&parts.headers) {
            headers.append(ax::header::COOKIE, cookie);
        }
        // RFC 9113 §8.3.1: `:authority` stands for Host, and wins over a Host header.
        if let Some(auth) = parts.uri.authority()
            && let Ok(v) = ax::header::HeaderValue::from_str(auth.as_str())
        {
            headers.insert(ax::header::HOST, v);
        }
    }
    let trailers = Trailers::default();
    {
        let mut ext = areq.extensions_mut();
        ext.insert(StreamExt {
            trailers: trailers.clone(),
            send: Rc::clone(&guard.waiting),
        });
        if streamed {
            ext.insert(StreamedBody);
            ext.insert(guard.conn.uploads.clone());
        }
        if padded {
            ext.insert(PaddedFieldValue);
        }
    }
    if let Some(f) = conn_ext {
        f(&mut areq);
    }
    let resp: Response<BoxBody> = match app.call(areq).await {
        Ok(resp) => resp,
        Err(e) => e.as_response_error().error_response().into(),
    };
    let (head, body) = resp.into_parts();
    let status = head.status().as_u16();
    let size = body.size();
    let bodiless = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let mut headers = http::HeaderMap::with_capacity(head.headers().len() + 1);
    for (name, value) in head.headers() {
        if is_connection_specific(name.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    // A gRPC trailers-only answer (the status in the one HEADERS frame) carries no length: a
    // gRPC client shows every field of that frame to the application as trailing metadata.
    let grpc_trailers_only = matches!(size, BodySize::Sized(0))
        && headers.contains_key("grpc-status")
        && headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if let BodySize::Sized(n) = size
        && (head_only || !bodiless)
        && !grpc_trailers_only
    {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
    }
    let empty = bodiless || matches!(size, BodySize::None | BodySize::Sized(0));
    let h2_body = if empty {
        guard.finish();
        H2Body::empty()
    } else {
        H2Body {
            inner: Some(body),
            trailers: Some(trailers),
            guard: Some(guard),
        }
    };
    let mut out = hyper::Response::new(h2_body);
    *out.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    *out.headers_mut() = headers;
    out
}

/// Whether a field value begins or ends with SP or HTAB. Its first and last bytes only: h2 has
/// checked every byte against the field-value characters (RFC 9110 §5.5) as it decoded it.
fn is_padded(value: &[u8]) -> bool {
    matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t'))
}

/// Headers that mean something only on an HTTP/1.1 connection; HTTP/2 forbids them
/// (RFC 9113 §8.2.2).
fn is_connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

/// The client's request body, as the actix payload stream.
struct RequestStream(Incoming);

impl futures_util::Stream for RequestStream {
    type Item = Result<Bytes, actix_http::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let body = &mut self.get_mut().0;
        loop {
            match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    // Request trailers are not forwarded (no gRPC client sends any).
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    // A stream h2 reset itself broke the protocol (DATA beyond or short of its
                    // `content-length`): a malformed body. Anything else (the client cancelled
                    // the stream, the connection closed) is a client gone away.
                    let kind = if broke_protocol(&e) {
                        std::io::ErrorKind::InvalidData
                    } else {
                        std::io::ErrorKind::ConnectionReset
                    };
                    return Poll::Ready(Some(Err(actix_http::error::PayloadError::Io(
                        std::io::Error::new(kind, e),
                    ))));
                }
            }
        }
    }
}

/// Whether h2 reset the request's stream itself for a protocol violation by the client.
fn broke_protocol(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.is_library() && h.is_reset())
}

/// Why a response body stopped early; the stream is reset.
#[derive(Debug)]
pub(crate) struct BodyFailed(String);

impl std::fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyFailed {}

/// The response body as hyper sends it: the application's body, then the upstream's trailers
/// if it sent any.
pub(crate) struct H2Body {
    inner: Option<BoxBody>,
    trailers: Option<Trailers>,
    guard: Option<StreamGuard>,
}

impl H2Body {
    fn empty() -> Self {
        Self {
            inner: None,
            trailers: None,
            guard: None,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        let this = self.get_mut();
        if let Some(g) = &this.guard {
            // Polled: the client made room for what came before.
            g.waiting.since.set(None);
        }
        if let Some(inner) = &mut this.inner {
            match std::task::ready!(Pin::new(inner).poll_next(cx)) {
                Some(Ok(data)) => {
                    if let Some(g) = &this.guard {
                        g.waiting.since.set(Some(Instant::now()));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.inner = None;
                    // The gateway ends this stream (an upstream that broke off or stalled past
                    // `read_timeout`): not a reset by the client, so not counted towards the
                    // rapid-reset limit.
                    if let Some(g) = &mut this.guard {
                        g.finish();
                    }
                    this.guard = None;
                    return Poll::Ready(Some(Err(BodyFailed(e.to_string()))));
                }
                None => this.inner = None,
            }
        }
        if let Some(g) = &mut this.guard {
            g.finish();
        }
        this.guard = None;
        match this.trailers.take().and_then(|t| t.take()) {
            Some(t) if !t.is_empty() => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.as_ref().map(MessageBody::size) {
            Some(BodySize::Sized(n)) => SizeHint::with_exact(n),
            None => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waits_of_ended_streams_are_forgotten_as_new_ones_begin() {
        let conn = Rc::new(ConnShared::new(100, 16));
        let open: Vec<StreamGuard> = (0..10).map(|_| conn.begin()).collect();
        for _ in 0..10_000 {
            let mut g = conn.begin();
            g.finish();
        }
        assert!(
            conn.waits.borrow().len() <= 32,
            "{}",
            conn.waits.borrow().len()
        );
        // A stream still open and waiting is still seen.
        open[3]
            .waiting
            .since
            .set(Some(Instant::now() - Duration::from_secs(5)));
        assert!(conn.stalled(Duration::from_secs(1)));
        assert!(!conn.stalled(Duration::from_secs(10)));
    }
}
