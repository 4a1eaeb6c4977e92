//! The proxy listener's connections, before HTTP sees them.
//!
//! ```text
//! accept ─► admit (max_connections, max_connections_per_ip) ─► TCP_NODELAY
//!        ─► [TLS handshake, within `header_timeout`: `server::tls`]
//!        ─► ClientIo (header timeout on every request head) ─► actix-http dispatcher ─► handler
//! ```
//!
//! What the handler may want to know about the connection (listener, TLS version, SNI, the
//! verified client certificate) is one [`ConnInfo`] per connection, read with [`conn_info`].
//!
//! Actix times only a connection's *first* request head (`client_request_timeout`); once a
//! keep-alive connection has served a request, bytes of the next head clear its keep-alive timer
//! and nothing times the rest. [`ClientIo`] wraps the socket and closes that gap: when bytes
//! arrive while no request of the connection is being handled, a head deadline starts; the
//! handler clears it when the head has been parsed ([`ConnState::begin`]). If the deadline
//! passes first, the client gets `408` and the connection is closed.
//!
//! [`ClientIo`] times the keep-alive idle too (the time between one request's end and the next
//! request's first bytes): when it passes, the dispatcher sees end of input and closes. Actix's
//! own keep-alive timer is off (`KeepAlive::Os`): it boxed and registered a new timer after
//! every response. Here one timer per connection serves both deadlines and is moved only when
//! it fires: a deadline is only ever set at least `min(header_timeout, keep_alive)` from now,
//! so a timer armed for no later than that is never late for one.
//!
//! The limits are read from the snapshot current at accept time, so a config swap applies to
//! the next connection.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::proxy::headers::ClientCert;
use crate::proxy::websocket::upgrade_is_websocket;
use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;
use crate::wire::chunked::{ChunkCheck, Fed};

/// The connection poll's clock reading (`util::clock`), as the timers take it.
fn now() -> Instant {
    Instant::from_std(crate::util::clock::now())
}

/// Facts about one client connection, shared by its requests. Inserted per connection by
/// `on_connect_ext` (HTTP/1) or into each request's extensions (HTTP/2); read with
/// [`conn_info`].
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// The `[[listener]]` name; `""` for `--listen`.
    #[allow(dead_code)] // for the HTTP/2 server and logs; kept with the connection
    pub listener: Arc<str>,
    /// Set when the connection came over TLS.
    pub tls: Option<TlsInfo>,
    /// A plain listener with `redirect_to_https`: every request gets 308 to this port.
    pub redirect_to: Option<u16>,
}

impl ConnInfo {
    /// `"https"` or `"http"`, for the access log.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// What the TLS handshake settled.
#[derive(Debug)]
#[allow(dead_code)] // `h2` routes to the HTTP/2 server; `version`/`sni` for logs and policies
pub(crate) struct TlsInfo {
    /// `"TLSv1_3"` or `"TLSv1_2"`.
    pub version: &'static str,
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// The client certificate, verified against `client_auth.ca`.
    pub client_cert: Option<ClientCert>,
}

/// The connection facts of an HTTP/2 request, in its extensions (where the HTTP/2 server puts
/// them; an HTTP/1 request finds them in its connection's [`ConnState`]).
pub(crate) fn conn_info(req: &actix_http::Request) -> Option<Rc<ConnInfo>> {
    actix_web::HttpMessage::extensions(req)
        .get::<Rc<ConnInfo>>()
        .cloned()
}

/// The client's byte stream: plain TCP or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A client whose next request head did not arrive in time (the header timeout).
const REQUEST_TIMEOUT: Refusal = Refusal {
    status: 408,
    message: "the request head was not received in time",
};

/// A request the listener refuses itself (a head before the parser has it whole, a head that
/// did not arrive in time, a malformed chunked body): its status and the message of the
/// gateway's JSON error ([`gateway_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    status: u16,
    message: &'static str,
}

/// A request head with a line ending in a bare line feed (SECURITY.md: bare CR or LF in a head
/// is a 400). Proxies and servers split such heads differently, which is what request
/// smuggling is made of.
const BARE_LF_HEAD: Refusal = Refusal {
    status: 400,
    message: "a line of the request head ends without a carriage return",
};

/// A request line longer than [`MAX_REQUEST_LINE`].
const URI_TOO_LONG: Refusal = Refusal {
    status: 414,
    message: "the request target is too long",
};

/// The gateway's answer to a request the listener refuses itself (a head refused before any
/// route saw it, a head that did not arrive in time), as the handler answers the requests it
/// refuses: a JSON error with a new request id, that id in `x-request-id`; then the connection
/// closes. A malformed chunked body is answered so under its request's id
/// ([`gateway_answer_as`]). Returns the answer and the id. Refusal paths
/// only: nothing here is built for a request that is served.
fn gateway_answer(status: u16, message: &str) -> (String, String) {
    let id = new_request_id();
    (gateway_answer_as(status, message, &id), id)
}

/// A new request id ([`super::handler::new_request_id`]) as text.
fn new_request_id() -> String {
    let (_, id) = super::handler::new_request_id();
    id.to_str().unwrap_or("unknown").to_owned()
}

/// The client's `x-request-id` in a whole request head (the first, as the handler reads it),
/// if it is one the handler takes.
fn client_request_id(head: &[u8]) -> Option<String> {
    let (_, mut fields) = head_lines(head);
    let (_, value) = fields.find(|(name, _)| name.eq_ignore_ascii_case(b"x-request-id"))?;
    crate::wire::headers::valid_request_id(value)
        .then(|| String::from_utf8_lossy(value).into_owned())
}

/// [`gateway_answer`] under a given request id.
fn gateway_answer_as(status: u16, message: &str, id: &str) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Bad Request");
    let body = serde_json::json!({ "error": message, "request_id": id }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The longest request line the listener lets through: the `http` crate refuses targets of
/// 65,534 bytes and more, which actix-http then answers with a bare 400. Targets over the
/// handler's 16 KiB limit and under this one get the handler's 414 (the connection serves on);
/// longer lines get [`URI_TOO_LONG`] here, and the connection is closed.
const MAX_REQUEST_LINE: usize = 65_000;

/// A request whose chunked body breaks the chunked grammar.
const MALFORMED_BODY: Refusal = Refusal {
    status: 400,
    message: "the chunked body is malformed",
};

/// The most of a request head cut across reads kept to find its end: actix-http's own limit
/// (its decoder answers a longer head with 431 and closes). Each read scans only its new bytes
/// (and the last line's start, see [`PartialHead`]), so a client sending a long head a byte at
/// a time costs a scan linear in the head.
const MAX_PARTIAL_HEAD: usize = 131_072;

/// What actix-http writes for `Expect: 100-continue`: not yet the request's response.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Open client connections, process-wide (all workers), for the connection limits.
#[derive(Default)]
pub(crate) struct ConnCounts {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// `rustygate_client_connections`, when exported.
    gauge: Option<prometheus::IntGauge>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

impl ConnCounts {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            gauge: Some(gauge),
            ..Self::default()
        }
    }

    /// Counts a new connection from `ip`, or refuses it when a limit is reached. The count is
    /// given back when the returned guard drops.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: Option<u32>,
    ) -> Result<ConnGuard, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::MaxConnections);
        }
        let ip = crate::util::canonical_ip(ip);
        if let Some(cap) = max_per_ip {
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= cap {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::MaxConnectionsPerIp);
            }
            *n += 1;
        }
        if let Some(g) = &self.gauge {
            g.inc();
        }
        Ok(ConnGuard {
            counts: Arc::clone(self),
            ip: max_per_ip.map(|_| ip),
        })
    }

    /// Open connections now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One admitted connection; gives its place back when dropped.
pub(crate) struct ConnGuard {
    counts: Arc<ConnCounts>,
    /// Set when the connection was counted per IP.
    ip: Option<IpAddr>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(g) = &self.counts.gauge {
            g.dec();
        }
        if let Some(ip) = self.ip {
            let mut map = self.counts.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// What the connection and its requests share: whether a request is being handled, and the
/// deadline of the next head. Lives on the worker thread.
pub(crate) struct ConnState {
    header_timeout: Duration,
    /// Idle time allowed between requests; `None`: keep-alive is off.
    keep_alive: Option<Duration>,
    /// `rustygate_client_timeouts_total{phase="header"}`
    timeouts: prometheus::IntCounter,
    /// Requests of this connection between head parsed and response finished.
    busy: Cell<u32>,
    /// When the head being received must be complete (set on its first bytes).
    head_deadline: Cell<Option<Instant>>,
    /// When the connection, idle since its last request ended, is closed (set at that end,
    /// cleared by the next request's first bytes). Before the first request: when its head
    /// must have begun, `header_timeout` after the connection was served (`first` is set).
    idle_deadline: Cell<Option<Instant>>,
    /// No request has begun yet: the idle deadline is the first head's, answered as one.
    first: Cell<bool>,
    /// End the connection once no request is in progress ([`ConnState::close`]).
    closing: Cell<bool>,
    /// The dispatcher waiting for input, woken by `close`.
    reader: Cell<Option<Waker>>,
    /// Requests of this connection that have ended: when held pipelined bytes may go.
    ended: Cell<u64>,
    /// The request in progress has no body: whatever the client sends meanwhile is its next
    /// requests ([`ClientIo`] holds them).
    bodyless: Cell<bool>,
    /// [`ClientIo`] holds bytes of pipelined requests: wake it when a request ends.
    holding: Cell<bool>,
    /// The request's chunked body broke the chunked grammar: [`ClientIo`] has answered `400`
    /// (when no response had begun) and ends the connection.
    body_broken: Cell<bool>,
    /// The request id of that `400`, taken by the request if the handler did not have it yet.
    body_refusal_id: Cell<Option<String>>,
    /// The request being read has a chunked body that [`ClientIo`] checks.
    body_checked: Cell<bool>,
    /// The id the handler gave that request (the one its upstream gets): that `400` carries it.
    body_request_id: Cell<Option<actix_web::http::header::HeaderValue>>,
    /// The connection's facts, here too so that a request finds both in one lookup.
    info: Rc<ConnInfo>,
}

impl ConnState {
    fn new(
        header_timeout: Duration,
        keep_alive: Option<Duration>,
        timeouts: prometheus::IntCounter,
        info: Rc<ConnInfo>,
    ) -> Self {
        Self {
            header_timeout,
            keep_alive,
            timeouts,
            busy: Cell::new(0),
            head_deadline: Cell::new(None),
            // A connection that never sends a byte (after its TLS handshake, or with h2c off)
            // gets `header_timeout` too, not actix-http's first-request timeout.
            idle_deadline: Cell::new(Some(now() + header_timeout)),
            first: Cell::new(true),
            closing: Cell::new(false),
            reader: Cell::new(None),
            ended: Cell::new(0),
            bodyless: Cell::new(false),
            holding: Cell::new(false),
            body_broken: Cell::new(false),
            body_refusal_id: Cell::new(None),
            body_checked: Cell::new(false),
            body_request_id: Cell::new(None),
            info,
        }
    }

    /// The connection's facts.
    pub fn info(&self) -> &Rc<ConnInfo> {
        &self.info
    }

    /// Ends the connection as soon as the current response is out, whatever the client still
    /// sends: for a request whose body was abandoned half-way. Without it the dispatcher keeps
    /// the connection open waiting for the rest of that body.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_reader();
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// A request head has arrived: no head timeout until the returned guard drops (when the
    /// request is done). `bodyless`: the request has no body and is no upgrade, so that any
    /// bytes the client sends before its end are its next requests.
    pub fn begin(self: &Rc<Self>, bodyless: bool) -> Busy {
        self.busy.set(self.busy.get() + 1);
        self.bodyless.set(bodyless);
        self.head_deadline.set(None);
        self.idle_deadline.set(None);
        Busy(Rc::clone(self))
    }

    /// Counts the request being handled once more, until the returned guard drops: it is not
    /// over (nor are the bytes pipelined behind it let through) until both guards are gone.
    pub fn hold(self: &Rc<Self>) -> Busy {
        self.busy.set(self.busy.get() + 1);
        Busy(Rc::clone(self))
    }

    /// The deadline that applies now: none while a request is being handled.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        if self.busy.get() > 0 {
            return None;
        }
        match (self.head_deadline.get(), self.idle_deadline.get()) {
            (Some(at), _) => Some((at, Expired::Head)),
            (None, Some(at)) if self.first.get() => Some((at, Expired::Head)),
            (None, Some(at)) => Some((at, Expired::Idle)),
            (None, None) => None,
        }
    }

    /// How far ahead of now any deadline set from now on lies, at least: the timer may wait that
    /// long before looking again, never longer.
    fn shortest_wait(&self) -> Duration {
        self.keep_alive
            .map_or(self.header_timeout, |k| k.min(self.header_timeout))
    }
}

/// Which wait of a connection ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request head did not arrive whole in time: `408`, then close.
    Head,
    /// Nothing came after the last request within the keep-alive time: close.
    Idle,
}

/// A request being handled on its connection.
pub(crate) struct Busy(Rc<ConnState>);

impl Busy {
    /// See [`ConnState::close`].
    pub fn close_connection(&self) {
        self.0.close();
    }

    /// Whether the request's chunked body was malformed (its client has been told `400`).
    pub fn body_broken(&self) -> bool {
        self.0.body_broken.get()
    }

    /// Whether the request's body is chunked and checked by the listener, which answers a
    /// malformed one `400` itself ([`Busy::share_request_id`]).
    pub fn body_checked(&self) -> bool {
        self.0.body_checked.get()
    }

    /// Gives the request and the listener's `400` for its malformed chunked body one request
    /// id, the one its upstream gets and its access line names. A body that broke before the
    /// handler had the request was answered already: the request takes that answer's id (`id`
    /// and `reply` are replaced). Otherwise the request's own id is left for such an answer.
    pub fn share_request_id(
        &self,
        id: &mut http::HeaderValue,
        reply: &mut actix_web::http::header::HeaderValue,
    ) {
        let state = &self.0;
        if let Some(sent) = state.body_refusal_id.take() {
            if let (Ok(i), Ok(r)) = (
                http::HeaderValue::from_str(&sent),
                actix_web::http::header::HeaderValue::from_str(&sent),
            ) {
                (*id, *reply) = (i, r);
            }
        } else {
            state.body_request_id.set(Some(reply.clone()));
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        let busy = state.busy.get().saturating_sub(1);
        state.busy.set(busy);
        if busy == 0 {
            state.ended.set(state.ended.get() + 1);
            state.bodyless.set(false);
            if let Some(k) = state.keep_alive {
                // The timer need not move: it fires within `shortest_wait` of when it was
                // armed.
                state.idle_deadline.set(Some(now() + k));
            }
        }
        if state.closing.get() || (busy == 0 && state.holding.get()) {
            state.wake_reader();
        }
    }
}

/// The accepted socket as the HTTP dispatcher sees it.
pub(crate) struct ClientIo {
    /// The socket; its writes fail past the send timeout (see [`SendStall`]).
    io: SendLimited<Stream>,
    state: Rc<ConnState>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer last registered a wake-up for, while it has not fired since.
    timer_wakes: Option<Waker>,
    timed_out: bool,
    /// Pipelined requests, read but not yet given to the dispatcher (see [`Pipelined`]).
    held: Pipelined,
    /// The request's body as far as it has been read, when its head was found (see
    /// [`ClientIo::check_body`]).
    body: Option<BodyCheck>,
    /// The start of a request head that did not come whole in its first read, kept (up to
    /// [`MAX_PARTIAL_HEAD`]) and withheld from the dispatcher until it is whole: then it is
    /// checked and rewritten as a head that came whole is ([`ClientIo::head_completed`]).
    partial_head: PartialHead,
    /// A head put together across reads (with what came after it in its last read, up to its
    /// body's end), checked and rewritten: given to the dispatcher before anything else, as
    /// fast as it takes it, and not scanned again.
    ready: bytes::BytesMut,
    /// Bytes of the request's response (not a `100 Continue`) have been written.
    responded: bool,
    /// The gateway answered a malformed body itself: end of input for the dispatcher, and
    /// nothing it writes afterwards goes out.
    answered: bool,
    /// The first bytes of the latest request head (its method), for counting a head refused
    /// before any route saw it ([`ClientIo::refused`]).
    head_start: [u8; 8],
    /// Counts refused heads; the client's address for their log lines.
    metrics: Arc<Metrics>,
    peer: IpAddr,
    _guard: ConnGuard,
}

/// A client that stops taking what the gateway writes to it (its receive window and the
/// socket's buffer full): the write waits, and so would the request behind it, its upstream
/// connection and its places under the upstream's limits, for as long as the client likes.
/// Past `[limits] send_timeout` without a byte taken, the write fails and the connection ends.
/// Only a write that must wait reads the clock; the timer is made on the first such wait.
struct SendStall {
    timeout: Duration,
    /// A write is waiting; `timer` is then set to when it must have moved.
    waiting: bool,
    timer: Option<Pin<Box<Sleep>>>,
    /// `rustygate_client_timeouts_total{phase="send"}`
    timeouts: prometheus::IntCounter,
}

impl SendStall {
    /// `res` of a write or flush to the client: progress clears the deadline; a wait starts
    /// it (or keeps it) and, once it has passed, becomes an error that ends the connection.
    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if !res.is_pending() {
            self.waiting = false;
            return res;
        }
        // The clock is read when a wait begins, not on every poll of it.
        let timer = match &mut self.timer {
            Some(t) if self.waiting => t,
            Some(t) => {
                t.as_mut().reset(now() + self.timeout);
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.waiting = true;
        if timer.as_mut().poll(cx).is_pending() {
            return res;
        }
        self.timeouts.inc();
        tracing::debug!(
            timeout_s = self.timeout.as_secs_f64(),
            "client took nothing of its response within the send timeout; closing"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing within the send timeout",
        )))
    }
}

/// Bytes of requests that came after one still in progress (HTTP/1.1 pipelining), given to the
/// dispatcher only once it has ended. actix-http keeps one HEAD flag, HTTP version and
/// connection type per connection, set by the last head it parsed and read when it writes a
/// response head: a pipelined HEAD parsed early dropped the body of the response before it
/// (and the client read the next response as that body), and a request after a HEAD had the
/// HEAD's response written as its own. Only what follows a request without a body is held:
/// bytes after a head with a body are that body.
#[derive(Default)]
struct Pipelined {
    bytes: bytes::BytesMut,
    /// Bytes at the front that may be given now (the next request's head).
    free: usize,
    /// Bytes read are held until `until` requests of the connection have ended.
    gated: bool,
    until: u64,
}

/// Where the first request head in `bytes` ends, when it is whole and a plain request without
/// a body (no `Transfer-Encoding` or `Upgrade`, no `Content-Length` but one of `0`; not
/// `CONNECT`); `None` otherwise (a head cut short, a body, anything odd): then nothing after
/// it is held.
fn bodyless_head_end(bytes: &[u8]) -> Option<usize> {
    let end = head_end(bytes)?;
    is_plain_bodyless(&bytes[..end]).then_some(end)
}

/// Where the first head in `bytes` ends (after its empty line), if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    scan_head(bytes).filter(|h| !h.bare_lf).map(|h| h.end)
}

/// A whole head found at the start of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    /// Just past its empty line.
    end: usize,
    /// One of its lines starts with `transfer-encoding:` (in any case).
    transfer_encoding: bool,
    /// One of its lines starts with `content-length:` (in any case).
    content_length: bool,
    /// One of its lines starts with `upgrade:`, or with `connection:` and names `upgrade`
    /// (in any case): the head may be rewritten by [`plain_if_not_websocket`].
    upgrade: bool,
    /// A line ends in a bare line feed (no carriage return before it): the head is refused
    /// (`end` is then just past that line feed, not the head's end).
    bare_lf: bool,
}

/// Finds the first head in `bytes` (see [`Head`]). Every request's first read is looked at:
/// line feeds are found eight bytes at a time (a word XORed with `\n`s has a zero byte where one
/// was; the test may also flag a byte after a real one, which the check of the four bytes
/// ending there rules out). A substring search cost ~390 instructions a request to set up,
/// `memchr` per line feed ~270. At each line feed, the next line's first byte and one more
/// tell whether it could be `Transfer-Encoding`, `Content-Length`, `Upgrade` or `Connection`.
fn scan_head(bytes: &[u8]) -> Option<Head> {
    const LF: u64 = u64::from_ne_bytes([b'\n'; 8]);
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut names = Names::default();
    let words = bytes.chunks_exact(8);
    let tail = bytes.len() - words.remainder().len();
    for (k, w) in words.enumerate() {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) ^ LF;
        let mut found = w.wrapping_sub(ONES) & !w & HIGH;
        while found != 0 {
            let i = k * 8 + (found.trailing_zeros() / 8) as usize;
            if bytes[i] == b'\n'
                && let Some(head) = names.at_lf(bytes, i)
            {
                return Some(head);
            }
            found &= found - 1;
        }
    }
    for i in tail..bytes.len() {
        if bytes[i] == b'\n'
            && let Some(head) = names.at_lf(bytes, i)
        {
            return Some(head);
        }
    }
    None
}

/// The names [`scan_head`] has seen so far.
#[derive(Default)]
struct Names {
    transfer_encoding: bool,
    content_length: bool,
    upgrade: bool,
}

impl Names {
    const TE: &[u8] = b"transfer-encoding:";
    const CL: &[u8] = b"content-length:";
    const UPGRADE: &[u8] = b"upgrade:";
    const CONNECTION: &[u8] = b"connection:";
    /// How far past a line feed [`Names::at_lf`] looks: the longer name's length.
    const NAME_LOOKAHEAD: usize = Self::TE.len();

    /// At the line feed `bytes[i]`: the head, if it ends there; else notes the next line's name.
    #[inline(always)]
    fn at_lf(&mut self, bytes: &[u8], i: usize) -> Option<Head> {
        const { assert!(Names::CL.len() < Names::NAME_LOOKAHEAD) };
        let bare_lf = i == 0 || bytes[i - 1] != b'\r';
        if bare_lf || (i >= 3 && bytes[i - 3..=i] == *b"\r\n\r\n") {
            return Some(Head {
                end: i + 1,
                transfer_encoding: self.transfer_encoding,
                content_length: self.content_length,
                upgrade: self.upgrade,
                bare_lf,
            });
        }
        // The next line's first letter picks the one name it could be (for `c`, where its
        // colon is).
        let (name, seen) = match bytes.get(i + 1).map(|b| b | 0x20) {
            Some(b't') => (Self::TE, &mut self.transfer_encoding),
            Some(b'u') => (Self::UPGRADE, &mut self.upgrade),
            Some(b'c') if bytes.get(i + Self::CONNECTION.len()) == Some(&b':') => {
                let value = i + Self::CONNECTION.len() + 1;
                if bytes[i + 1..value].eq_ignore_ascii_case(Self::CONNECTION)
                    && may_name_upgrade(&bytes[value..])
                {
                    self.upgrade = true;
                }
                return None;
            }
            Some(b'c') => (Self::CL, &mut self.content_length),
            _ => return None,
        };
        if bytes.get(i + name.len()) == Some(&b':')
            && bytes[i + 1..=i + name.len()].eq_ignore_ascii_case(name)
        {
            *seen = true;
        }
        None
    }
}

/// Whether the `Connection` value that starts `rest` (up to its line feed) may name
/// `upgrade`: `Connection: upgrade` alone, without an `Upgrade` field, made actix-http treat
/// the request as an upgrade and end the connection after its response. A value whose line
/// feed has not come yet may.
fn may_name_upgrade(rest: &[u8]) -> bool {
    memchr::memchr(b'\n', rest).is_none_or(|n| {
        rest[..n]
            .windows(7)
            .any(|w| w.eq_ignore_ascii_case(b"upgrade"))
    })
}

/// A request head cut across reads, as far as it came, scanned as it grows: the same
/// [`Names`] and line feeds [`scan_head`] looks at, each line feed once, except the last one
/// while the name of the line after it may still be coming.
#[derive(Default)]
struct PartialHead {
    bytes: Vec<u8>,
    names: Names,
    /// Where the next scan starts: the last line feed when the bytes after it do not yet tell
    /// the next line's name, else the end of what was scanned.
    next: usize,
}

impl PartialHead {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn clear(&mut self) {
        *self = PartialHead::default();
    }

    /// Adds the next bytes of the head; the head, once whole (its `end` counts from the
    /// head's first byte).
    fn extend(&mut self, new: &[u8]) -> Option<Head> {
        self.bytes.extend_from_slice(new);
        let bytes = &self.bytes[..];
        let mut last_lf = None;
        for i in self.next..bytes.len() {
            if bytes[i] == b'\n' {
                if let Some(head) = self.names.at_lf(bytes, i) {
                    return Some(head);
                }
                last_lf = Some(i);
            }
        }
        // `at_lf` looks at most `NAME_LOOKAHEAD` bytes past a line feed.
        self.next = match last_lf {
            Some(i) if i + Names::NAME_LOOKAHEAD >= bytes.len() => i,
            _ => bytes.len(),
        };
        None
    }
}

/// Whether a whole request head (ending with its empty line) gets a chunked body from
/// actix-http's decoder: HTTP/1.1 and exactly one `Transfer-Encoding` field, `chunked`.
fn is_chunked_request(head: &[u8]) -> bool {
    let (request_line, fields) = head_lines(head);
    if !request_line.ends_with(b" HTTP/1.1") {
        return false;
    }
    let mut values = fields
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"transfer-encoding"))
        .map(|(_, value)| value);
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.eq_ignore_ascii_case(b"chunked")
    )
}

/// A whole request head's request line, and its fields as name and value (the value without
/// the whitespace around it); lines without a colon are left out.
fn head_lines(head: &[u8]) -> (&[u8], impl Iterator<Item = (&[u8], &[u8])>) {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let fields = lines.filter_map(|l| {
        let colon = l.iter().position(|&b| b == b':')?;
        Some((&l[..colon], l[colon + 1..].trim_ascii()))
    });
    (request_line, fields)
}

/// Where a request's body stands, as far as the client has sent it: the listener follows each
/// body to its end so that what comes after it (pipelined requests) waits for the request to
/// end, as after a request without a body (see [`Pipelined`]).
struct BodyCheck {
    left: Left,
    /// [`ConnState::ended`] once the body's request has ended: what follows the body is held
    /// only while the request is in progress.
    owner: u64,
}

enum Left {
    /// A chunked body, checked as it passes (see [`ClientIo::check_body`]).
    Chunks(ChunkCheck),
    /// Bytes of a `Content-Length` body still to come.
    Bytes(u64),
}

/// How actix-http's decoder frames the body of the whole request head `bytes` (found by
/// [`scan_head`] as `head`): chunked, by a length, or not followed here (no body, an upgrade,
/// `CONNECT`, or a head the decoder refuses with `400`).
fn request_body(head: Head, bytes: &[u8]) -> Option<Left> {
    if head.transfer_encoding {
        return is_chunked_request(bytes).then(|| Left::Chunks(ChunkCheck::new()));
    }
    if !head.content_length {
        return None;
    }
    content_length_of(bytes).filter(|&n| n > 0).map(Left::Bytes)
}

/// The length of the body of a whole request head that actix-http's decoder reads by
/// `Content-Length`: one such field whose value is digits that fit in a `u64`; `None` with an
/// `Upgrade` field (what follows a handshake is the tunnel's), `Transfer-Encoding`, or `CONNECT`.
fn content_length_of(head: &[u8]) -> Option<u64> {
    let (request_line, fields) = head_lines(head);
    if request_line.starts_with(b"CONNECT ") {
        return None;
    }
    let mut length = None;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(value).ok()?.parse::<u64>().ok()?);
        } else if name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            return None;
        }
    }
    length
}

/// A head with `Upgrade` to something else than WebSocket (`h2c` from `curl --http2`, ...), or
/// with `Connection: upgrade` and no `Upgrade` field at all, is served as a plain request, but
/// actix-http reads `Connection: upgrade` as an upgrade and ends the connection after the
/// response (answering `connection: upgrade`). The `upgrade` token of its `Connection` fields
/// is blanked in place (same length, so nothing else moves); the field is hop-by-hop and goes
/// no further either way. nginx keeps such connections open too.
fn plain_if_not_websocket(head: &mut [u8]) {
    if head_lines(head)
        .1
        .any(|(name, value)| name.eq_ignore_ascii_case(b"upgrade") && upgrade_is_websocket(value))
    {
        return;
    }
    let mut at = 0;
    while let Some(nl) = memchr::memchr(b'\n', &head[at..]) {
        // The line without its line feed and carriage return.
        let cr = usize::from(nl > 0 && head[at + nl - 1] == b'\r');
        let line = at..at + nl - cr;
        at += nl + 1;
        let Some(colon) = memchr::memchr(b':', &head[line.clone()]) else {
            continue;
        };
        if !head[line.start..line.start + colon].eq_ignore_ascii_case(b"connection") {
            continue;
        }
        let mut start = line.start + colon + 1;
        let mut tokens = Vec::new();
        for piece in head[start..line.end].split(|&b| b == b',') {
            let end = start + piece.len();
            if piece.trim_ascii().eq_ignore_ascii_case(b"upgrade") {
                tokens.push(start..end);
            }
            start = end + 1;
        }
        for t in tokens {
            head[t].fill(b' ');
        }
    }
}

/// Whether the first line of `head` (as far as it came) is longer than [`MAX_REQUEST_LINE`].
fn line_too_long(head: &[u8]) -> bool {
    head.len() > MAX_REQUEST_LINE && memchr::memchr(b'\n', &head[..=MAX_REQUEST_LINE]).is_none()
}

/// Whether a whole request head (ending with its empty line) is a plain request without a
/// body (see [`bodyless_head_end`]).
fn is_plain_bodyless(head: &[u8]) -> bool {
    // A method is a token; `get` is one too (another method than `GET`, and forwarded).
    if !head.first().is_some_and(u8::is_ascii_alphabetic) {
        return false;
    }
    let (request_line, fields) = head_lines(head);
    if request_line.starts_with(b"CONNECT ")
        || memchr::memmem::find(request_line, b" HTTP/1.").is_none()
    {
        return false;
    }
    let mut length_field = false;
    for (name, value) in fields {
        // What follows a WebSocket handshake may be its first frames; any other upgrade (h2c,
        // ...) is served as a plain request, and what follows it is its next request.
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"upgrade") && upgrade_is_websocket(value))
        {
            return false;
        }
        length_field |= name.eq_ignore_ascii_case(b"content-length");
    }
    // `Content-Length: 0` (as POSTs without a body often say): no body either.
    !length_field || content_length_of(head) == Some(0)
}

impl ClientIo {
    pub fn state(&self) -> &Rc<ConnState> {
        &self.state
    }

    pub fn info(&self) -> &Rc<ConnInfo> {
        &self.state.info
    }

    /// The stream (its writes still under the send timeout) and its place under the
    /// connection limits, for a protocol that times its requests itself (HTTP/2). Take
    /// [`ClientIo::info`] first to keep the connection facts.
    pub fn into_parts(self) -> (SendLimited<Stream>, ConnGuard) {
        (self.io, self._guard)
    }

    /// Whether the client opens with the HTTP/2 preface (h2c with prior knowledge). Waits for
    /// the first bytes up to the header timeout; `None` if none came (the client got 408 and
    /// the connection is to be closed). Over TLS, ALPN decides and this is `Some(false)`.
    pub async fn starts_with_h2_preface(&self) -> Option<bool> {
        let Stream::Plain(io) = &self.io.io else {
            return Some(false);
        };
        let preface = super::h2::PREFACE;
        let deadline = Instant::now() + self.state.header_timeout;
        let mut buf = [0u8; 24];
        loop {
            let n = match tokio::time::timeout_at(deadline, io.peek(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => return None,
                Err(_) => return self.head_timed_out(io),
            };
            if buf[..n] != preface[..n] {
                return Some(false);
            }
            if n == preface.len() {
                return Some(true);
            }
            // A preface cut into pieces: wait for the rest (rare; bounded by the deadline).
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
                .await
                .is_err()
            {
                return self.head_timed_out(io);
            }
        }
    }

    /// Waits for input: registers the dispatcher's wake-up for `close` and held requests.
    fn pending(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        let waker = self.state.reader.take();
        self.state.reader.set(match waker {
            Some(w) if w.will_wake(cx.waker()) => Some(w),
            _ => Some(cx.waker().clone()),
        });
        Poll::Pending
    }

    /// Takes what `buf` holds from `from` on back from the dispatcher, to be given once the
    /// request in progress (or whose head it has just got) has ended.
    fn hold(&mut self, buf: &mut ReadBuf<'_>, from: usize) {
        let held = &mut self.held;
        if !held.gated {
            held.gated = true;
            held.until = self.state.ended.get() + 1;
        }
        held.bytes.extend_from_slice(&buf.filled()[from..]);
        buf.set_filled(from);
        self.state.holding.set(true);
    }

    /// Held bytes the dispatcher may have now (`Some(Ready)`), or none while the request
    /// before them is in progress (`Some(Pending)`); `None`: nothing held, read the socket.
    /// The next held request goes alone when it has no body: what follows waits for it to end.
    fn held_or_gated(&mut self, buf: &mut ReadBuf<'_>) -> Option<Poll<io::Result<()>>> {
        let ended = self.state.ended.get();
        let held = &mut self.held;
        if held.gated && ended >= held.until {
            held.gated = false;
        }
        if held.free == 0 && !held.gated && !held.bytes.is_empty() {
            held.free = match bodyless_head_end(&held.bytes) {
                Some(end) => {
                    held.gated = true;
                    held.until = ended + 1;
                    end
                }
                None => held.bytes.len(),
            };
        }
        if held.free > 0 {
            let n = held.free.min(buf.remaining());
            buf.put_slice(&held.bytes[..n]);
            bytes::Buf::advance(&mut held.bytes, n);
            held.free -= n;
            self.state.holding.set(held.gated || !held.bytes.is_empty());
            return Some(Poll::Ready(Ok(())));
        }
        // Gated with bytes held: nothing more is read meanwhile (it would only be held).
        (held.gated && !held.bytes.is_empty()).then_some(Poll::Pending)
    }

    /// Follows the request body's bytes in `buf` from `from` on before the dispatcher gets
    /// them. Where the body ends before the bytes do, the rest (the next requests) is held until
    /// the body's request has ended: actix-http would parse the next head at once, and a
    /// `Connection: close` in it closed the connection before its response (and went out on the
    /// response before it). The body's start is known from its head: whole in the request's
    /// first read, or put together from reads up to [`MAX_PARTIAL_HEAD`]; past that the body is
    /// left to actix-http alone.
    ///
    /// A chunked body is checked as well. actix-http takes a body that breaks the chunked
    /// grammar for a client that went away: it drops the connection without a word, and the
    /// request is logged as 499. Here the client is told `400` (unless its response has begun),
    /// the dispatcher gets the bytes before the bad one and then end of input, and nothing it
    /// writes afterwards goes out.
    ///
    /// `buf` holds the body's head from `head_from` to `from` when the head came in this read
    /// (else the two are equal).
    fn check_body(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        head_from: usize,
        from: usize,
    ) {
        let Some(check) = &mut self.body else {
            return;
        };
        let new = &buf.filled()[from..];
        let body_ends = match &mut check.left {
            Left::Bytes(left) => {
                let n = (*left).min(new.len() as u64);
                *left -= n;
                // `n` is at most `new.len()`.
                (*left == 0).then_some(n as usize)
            }
            Left::Chunks(chunks) => match chunks.feed(new) {
                Fed::More => None,
                Fed::Ended(at) => Some(at),
                Fed::Broken(at) => {
                    self.body = None;
                    // What is left of this read may be empty: end of input at once.
                    buf.set_filled(from + at);
                    self.state.body_broken.set(true);
                    let mut request_id = String::new();
                    if !self.responded {
                        // Like the 408: a plain socket sends it at once (nothing else is queued
                        // before a response begins); over TLS it leaves with the dispatcher's
                        // flush. It carries the request's id ([`Busy::share_request_id`]): the
                        // handler's when it has the request (its upstream may have it too),
                        // else the client's from the head in this read, else a new one, which
                        // the handler then takes.
                        request_id = self
                            .state
                            .body_request_id
                            .take()
                            .and_then(|v| v.to_str().ok().map(str::to_owned))
                            .or_else(|| client_request_id(&buf.filled()[head_from..from]))
                            .unwrap_or_else(new_request_id);
                        let answer = gateway_answer_as(
                            MALFORMED_BODY.status,
                            MALFORMED_BODY.message,
                            &request_id,
                        );
                        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
                        self.state.body_refusal_id.set(Some(request_id.clone()));
                    }
                    self.answered = true;
                    tracing::debug!(request_id, "malformed chunked request body; closing");
                    return;
                }
            },
        };
        let Some(at) = body_ends else {
            return;
        };
        let owner = check.owner;
        self.body = None;
        if from + at < buf.filled().len() && self.state.ended.get() < owner {
            self.hold_next(buf, from + at, owner);
        }
    }

    /// Takes what follows a request's body in `buf` (from `from` on) back from the dispatcher,
    /// to be given once `until` requests have ended. The bytes may be held ones being given:
    /// they go back in front of the rest.
    fn hold_next(&mut self, buf: &mut ReadBuf<'_>, from: usize, until: u64) {
        self.hold_in_front(&buf.filled()[from..], until);
        buf.set_filled(from);
    }

    /// Holds `rest` in front of what is held already, until `until` requests have ended.
    fn hold_in_front(&mut self, rest: &[u8], until: u64) {
        let held = &mut self.held;
        let mut bytes = bytes::BytesMut::with_capacity(rest.len() + held.bytes.len());
        bytes.extend_from_slice(rest);
        bytes.extend_from_slice(&held.bytes);
        held.bytes = bytes;
        held.free = 0;
        held.gated = true;
        held.until = until;
        self.state.holding.set(true);
    }

    /// The next bytes of a head cut across reads, withheld from the dispatcher like those
    /// before them. Once the head is whole it is treated as one that came whole in one read:
    /// an upgrade other than WebSocket is rewritten into a plain request
    /// ([`plain_if_not_websocket`]), the requests behind a head without a body are held until
    /// it has ended, and its body is followed (and checked, when chunked). The head and what is
    /// left of the read go to [`ClientIo::ready`]; past [`MAX_PARTIAL_HEAD`] without an end,
    /// what came is given as it is (actix-http answers it). `Err`: the head is refused with
    /// that answer.
    fn head_completed(&mut self, cx: &mut Context<'_>, new: &[u8]) -> Result<(), Refusal> {
        let Some(head) = self.partial_head.extend(new) else {
            if line_too_long(&self.partial_head.bytes) {
                return Err(URI_TOO_LONG);
            }
            if self.partial_head.bytes.len() > MAX_PARTIAL_HEAD {
                let bytes = std::mem::take(&mut self.partial_head.bytes);
                self.partial_head.clear();
                self.ready.extend_from_slice(&bytes);
            }
            return Ok(());
        };
        if head.bare_lf {
            return Err(BARE_LF_HEAD);
        }
        if head.end > MAX_REQUEST_LINE && line_too_long(&self.partial_head.bytes) {
            return Err(URI_TOO_LONG);
        }
        let mut bytes = std::mem::take(&mut self.partial_head.bytes);
        self.partial_head.clear();
        let end = head.end;
        if head.upgrade {
            plain_if_not_websocket(&mut bytes[..end]);
        }
        let whole = &bytes[..end];
        let until = self.state.ended.get() + 1;
        if is_plain_bodyless(whole) {
            if end < bytes.len() {
                self.hold_in_front(&bytes[end..], until);
                bytes.truncate(end);
            }
        } else if let Some(left) = request_body(head, whole) {
            self.state.body_checked.set(matches!(left, Left::Chunks(_)));
            self.body = Some(BodyCheck { left, owner: until });
            // The body's bytes in this read, checked as if the dispatcher read them.
            let len = bytes.len();
            let mut given = ReadBuf::new(&mut bytes);
            given.set_filled(len);
            self.check_body(cx, &mut given, 0, end);
            let kept = given.filled().len();
            bytes.truncate(kept);
        }
        self.ready.extend_from_slice(&bytes);
        Ok(())
    }

    /// Gives what [`ClientIo::ready`] holds, as much as `buf` takes.
    fn give_ready(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ready.len().min(buf.remaining());
        buf.put_slice(&self.ready[..n]);
        bytes::Buf::advance(&mut self.ready, n);
    }

    /// Refuses a request head ([`BARE_LF_HEAD`], [`URI_TOO_LONG`]) before the parser has a
    /// whole head, with the gateway's answer ([`gateway_answer`]): the dispatcher gets none of
    /// this read and then end of input; nothing it writes goes out.
    fn refuse_head(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        before: usize,
        refusal: Refusal,
    ) {
        buf.set_filled(before);
        let (answer, id) = gateway_answer(refusal.status, refusal.message);
        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
        self.answered = true;
        self.partial_head.clear();
        self.refused(refusal.status, refusal.message, &id);
    }

    /// A request head refused before any route saw it: by this reader ([`ClientIo::refuse_head`],
    /// the header timeout) or by actix-http's parser (a malformed or oversized head, which it
    /// answers itself: seen in [`ClientIo::wrote`]). Counted under `route="<none>"` and logged
    /// at debug with the client's address and the answer's `request_id`; actix-http's own line
    /// for its refusals (an `ERROR` without the client, one per bad request) is filtered out
    /// ([`crate::telemetry`]).
    fn refused(&self, status: u16, reason: &str, request_id: &str) {
        let token = self
            .head_start
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default();
        crate::telemetry::recorder::refused(&self.metrics, token, status);
        tracing::debug!(
            client_ip = %self.peer,
            status,
            reason,
            request_id,
            "request head refused; closing"
        );
    }

    /// Notes what the dispatcher writes: whether the request's response has begun; and an
    /// answer of its own to a head it refused (no request in progress, a head begun, and the
    /// shape of actix-http's answer: `400` or `431` with no body, its length first, none of
    /// the gateway's headers), whose status is returned: [`ClientIo::answer_refused`]
    /// answers in its place. (The HTTPS redirect's own `400` for a bad `Host` is no refused
    /// head: it was counted as one too when any error status without `x-request-id` was.)
    fn wrote(&mut self, bytes: &[u8]) -> Option<u16> {
        if self.state.busy.get() > 0 {
            if !self.responded && bytes != CONTINUE {
                self.responded = true;
            }
        } else if self.state.head_deadline.get().is_some()
            && let Some(status @ (400 | 431)) = status_of(bytes)
            && memchr::memchr(b'\n', bytes)
                .is_some_and(|nl| bytes[nl + 1..].starts_with(b"content-length: 0\r\n"))
            && memchr::memmem::find(bytes, b"x-request-id:").is_none()
        {
            // Once: the dispatcher closes the connection after it.
            self.state.head_deadline.set(None);
            return Some(status);
        }
        None
    }

    /// Answers a head actix-http's parser refused (a request target with bytes RFC 3986 does
    /// not allow, such as `<`, `>`, `` ` ``, `"` in the query, control bytes; a malformed field;
    /// a head over its 128 KiB) the way the handler answers the requests it refuses: a JSON
    /// error and an `x-request-id`, instead of actix-http's bare `400` (or `431`) without
    /// either. It is written in place of actix-http's answer, best effort like the listener's
    /// other answers (nothing else is queued on a connection whose head was refused); the
    /// connection then ends. Only refused heads pay for this: the parser's reason is not known
    /// here (keeping each head's bytes for it would cost every request), so the message says
    /// what kind of refusal it is.
    fn answer_refused(&mut self, cx: &mut Context<'_>, status: u16) {
        let message = match status {
            431 => "the request head is too large",
            _ => "the request head is malformed",
        };
        let (answer, id) = gateway_answer(status, message);
        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
        self.answered = true;
        self.refused(status, "malformed or oversized request head", &id);
    }

    /// Bytes were read and all withheld (a head still incomplete): nothing for the
    /// dispatcher yet. The socket had bytes, so no wake-up is registered with it: the task is
    /// woken to read it again.
    fn withheld(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn head_timed_out(&self, io: &TcpStream) -> Option<bool> {
        self.state.timeouts.inc();
        let (answer, _) = gateway_answer(REQUEST_TIMEOUT.status, REQUEST_TIMEOUT.message);
        let _ = io.try_write(answer.as_bytes());
        None
    }

    /// Which deadline has passed, if one has; keeps the timer's wake-up registered otherwise.
    /// The clock is read only when the timer fires (see the module doc), and the timer is
    /// polled only when it has fired or another task reads ([`crate::util::poll_timer`]).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        let timer = match &mut self.timer {
            Some(t) => t,
            None => {
                let (at, _) = self.state.deadline()?;
                let at = at.min(Instant::now() + self.state.shortest_wait());
                self.timer_wakes = None;
                self.timer.insert(Box::pin(tokio::time::sleep_until(at)))
            }
        };
        let mut fired = crate::util::poll_timer(timer.as_mut(), &mut self.timer_wakes, cx);
        while fired.is_ready() {
            let now = Instant::now();
            let latest = now + self.state.shortest_wait();
            let next = match self.state.deadline() {
                Some((at, why)) if at <= now => return Some(why),
                Some((at, _)) => at.min(latest),
                None => latest,
            };
            timer.as_mut().reset(next);
            // Moved: polled at once, for this task, in case the new deadline has passed too.
            fired = timer.as_mut().poll(cx);
        }
        None
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out
            || (this.answered && this.ready.is_empty())
            || (this.state.closing.get() && this.state.busy.get() == 0)
        {
            // End of input: the dispatcher flushes what it has written, then closes.
            return Poll::Ready(Ok(()));
        }
        match this.expired(cx) {
            Some(Expired::Head) => {
                // Best effort: the client learns why; the dispatcher sees end of input and
                // closes.
                this.timed_out = true;
                this.state.timeouts.inc();
                // A plain socket sends it at once if it has room; over TLS it is encrypted into
                // the session and leaves with the dispatcher's flush before the close.
                let (answer, id) = gateway_answer(REQUEST_TIMEOUT.status, REQUEST_TIMEOUT.message);
                let _ = Pin::new(&mut this.io).poll_write(cx, answer.as_bytes());
                this.refused(
                    408,
                    "request head not received within the header timeout",
                    &id,
                );
                return Poll::Ready(Ok(()));
            }
            Some(Expired::Idle) => {
                this.timed_out = true;
                tracing::debug!("keep-alive connection idle past its timeout; closing");
                return Poll::Ready(Ok(()));
            }
            None => {}
        }
        if !this.ready.is_empty() {
            // Checked when it was put together: given as it is.
            this.give_ready(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let (res, read) = match this.held_or_gated(buf) {
            Some(given) => (given, false),
            None => (Pin::new(&mut this.io).poll_read(cx, buf), true),
        };
        if read
            && let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
            && (this.held.gated || (this.state.busy.get() > 0 && this.state.bodyless.get()))
        {
            // Sent while a request without a body is in progress (or before it began): the
            // next requests.
            this.hold(buf, before);
            return this.pending(cx);
        }
        if res.is_pending() {
            return this.pending(cx);
        }
        let mut body_from = before;
        if let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
            && this.state.busy.get() == 0
            && this.state.head_deadline.get().is_none()
        {
            // A new request's first bytes as read; more requests behind it wait for it.
            let new = &buf.filled()[before..];
            let k = new.len().min(this.head_start.len());
            this.head_start = [0; 8];
            this.head_start[..k].copy_from_slice(&new[..k]);
            this.body = None;
            this.partial_head.clear();
            this.responded = false;
            this.state.body_broken.set(false);
            this.state.body_checked.set(false);
            this.state.body_request_id.set(None);
            // Most reads hold one whole head: only where more follows, or the head has a
            // `Transfer-Encoding` or `Content-Length`, is the head looked at further.
            match scan_head(new) {
                Some(head) if head.bare_lf => {
                    this.refuse_head(cx, buf, before, BARE_LF_HEAD);
                    return Poll::Ready(Ok(()));
                }
                Some(head) if head.end > MAX_REQUEST_LINE && line_too_long(new) => {
                    this.refuse_head(cx, buf, before, URI_TOO_LONG);
                    return Poll::Ready(Ok(()));
                }
                None if line_too_long(new) => {
                    this.refuse_head(cx, buf, before, URI_TOO_LONG);
                    return Poll::Ready(Ok(()));
                }
                Some(head) => {
                    let end = head.end;
                    if head.upgrade {
                        plain_if_not_websocket(&mut buf.filled_mut()[before..before + end]);
                    }
                    let new = &buf.filled()[before..];
                    // Held bytes being given go out one bodyless request at a time already.
                    if end < new.len()
                        && this.held.bytes.is_empty()
                        && is_plain_bodyless(&new[..end])
                    {
                        this.hold(buf, before + end);
                    } else if let Some(left) = request_body(head, &new[..end]) {
                        this.state.body_checked.set(matches!(left, Left::Chunks(_)));
                        this.body = Some(BodyCheck {
                            left,
                            owner: this.state.ended.get() + 1,
                        });
                        body_from = before + end;
                    }
                }
                // A head cut across reads (rare): kept, and withheld from the dispatcher, until
                // it is whole.
                None if new.len() <= MAX_PARTIAL_HEAD => {
                    // Scanned again from its start with the next read: once.
                    this.partial_head.bytes.extend_from_slice(new);
                    buf.set_filled(before);
                }
                None => {}
            }
            this.state
                .head_deadline
                .set(Some(now() + this.state.header_timeout));
            this.state.idle_deadline.set(None);
            this.state.first.set(false);
            // Creates the timer for the connection's first head; registers its wake-up.
            let _ = this.expired(cx);
            if !this.partial_head.is_empty() {
                return this.withheld(cx);
            }
        } else if !this.partial_head.is_empty()
            && let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
        {
            // The dispatcher has none of the head yet: no request can be in progress.
            // Completed, the head is given as if it had come whole, and so are the requests
            // after it: held until it has ended, then given (and scanned) one at a time. Given
            // to the dispatcher at once, they were never scanned: a bare line feed or a bad
            // chunk in them went through, a pipelined HEAD lost the response before it, and
            // the rest of a head cut again was scanned as a new one (a valid one got 400 when
            // its last line feed came alone). Given as they came, the first pieces of the
            // head could not be rewritten any more: an `Upgrade: h2c` cut across reads ended
            // the connection after its response.
            let new = buf.filled()[before..].to_vec();
            buf.set_filled(before);
            if let Err(answer) = this.head_completed(cx, &new) {
                this.refuse_head(cx, buf, before, answer);
                return Poll::Ready(Ok(()));
            }
            if this.ready.is_empty() {
                return this.withheld(cx);
            }
            this.give_ready(buf);
            return Poll::Ready(Ok(()));
        }
        if this.body.is_some() && buf.filled().len() > body_from {
            this.check_body(cx, buf, before, body_from);
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answered {
            // The client has its answer (see `check_body`): the dispatcher's is dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        if let Some(status) = this.wrote(buf) {
            // actix-http's answer to a head it refused: the gateway's goes instead.
            this.answer_refused(cx, status);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answered {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(status) = this.wrote(first)
        {
            this.answer_refused(cx, status);
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A stream whose writes fail once the client has taken nothing for the send timeout (see
/// [`SendStall`]); reads pass through.
pub(crate) struct SendLimited<T> {
    io: T,
    send: SendStall,
}

impl<T: AsyncRead + Unpin> AsyncRead for SendLimited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendLimited<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        this.send.check(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.send.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_flush(cx);
        this.send.check(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_shutdown(cx);
        this.send.check(cx, res)
    }
}

/// An admitted socket, before any TLS handshake.
pub(crate) struct Admitted {
    pub io: TcpStream,
    pub peer: Option<SocketAddr>,
    pub guard: ConnGuard,
    /// `[limits] header_timeout` at accept: for the handshake and every request head.
    pub header_timeout: Duration,
    /// `[limits] send_timeout` at accept.
    pub send_timeout: Duration,
}

/// Admits an accepted socket: limits, `TCP_NODELAY`. `None` when the connection is refused (it
/// is closed by dropping it).
pub(crate) fn admit(
    io: TcpStream,
    store: &SnapshotStore,
    counts: &Arc<ConnCounts>,
    metrics: &Metrics,
) -> Option<Admitted> {
    let peer = io.peer_addr().ok();
    let snap = store.load();
    let limits = &snap.limits;
    let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    let guard = match counts.admit(ip, limits.max_connections, limits.max_connections_per_ip) {
        Ok(g) => g,
        Err(why) => {
            metrics
                .connections_refused
                .with_label_values(&[why.as_str()])
                .inc();
            tracing::debug!(client_ip = %ip, limit = why.as_str(), "connection refused");
            return None;
        }
    };
    // Small responses and the head of streamed ones leave at once: without it, a head and a
    // body written separately meet the client's delayed ACK (a 40 ms stall per response).
    if let Err(e) = io.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    Some(Admitted {
        io,
        peer,
        guard,
        header_timeout: limits.header_timeout,
        send_timeout: limits.send_timeout,
    })
}

/// The status of a response whose head starts `bytes`, if they are one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let code = bytes.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Wraps the stream (plain, or TLS after its handshake) for the HTTP/1 dispatcher.
pub(crate) fn client_io(
    io: Stream,
    (guard, peer): (ConnGuard, Option<SocketAddr>),
    (header_timeout, send_timeout): (Duration, Duration),
    keep_alive: Option<Duration>,
    info: ConnInfo,
    metrics: &Arc<Metrics>,
) -> ClientIo {
    ClientIo {
        io: SendLimited {
            io,
            send: SendStall {
                timeout: send_timeout,
                waiting: false,
                timer: None,
                timeouts: metrics.client_timeouts.with_label_values(&["send"]),
            },
        },
        state: Rc::new(ConnState::new(
            header_timeout,
            keep_alive,
            metrics.client_timeouts.with_label_values(&["header"]),
            Rc::new(info),
        )),
        timer: None,
        timer_wakes: None,
        timed_out: false,
        body: None,
        partial_head: PartialHead::default(),
        ready: bytes::BytesMut::new(),
        responded: false,
        answered: false,
        head_start: [0; 8],
        metrics: Arc::clone(metrics),
        peer: peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip()),
        held: Pipelined::default(),
        _guard: guard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_request_heads_are_told_as_actix_http_tells_them() {
        let te = |h: &[u8]| scan_head(h).map(|h| h.transfer_encoding);
        assert_eq!(
            te(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(true)
        );
        assert_eq!(
            te(b"POST / HTTP/1.1\r\nTRANSFER-ENCODING:chunked\r\n\r\n"),
            Some(true)
        );
        assert_eq!(
            te(b"POST / HTTP/1.1\r\nx-transfer-encoding: a\r\n\r\n"),
            Some(false)
        );
        assert_eq!(te(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"), Some(false));
        assert_eq!(
            te(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n"),
            None
        );
        for (head, chunked) in [
            (&b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], true),
            (b"POST / HTTP/1.1\r\ntransfer-encoding:  Chunked \r\nhost: a\r\n\r\n", true),
            (b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", true),
            // HTTP/1.0 ignores it; two fields, or another coding, are a 400 before any body.
            (b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\n", false),
        ] {
            assert_eq!(is_chunked_request(head), chunked, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_head_cut_across_reads_is_found_as_whole_and_each_byte_is_scanned_a_bounded_number_of_times()
     {
        let long = format!("cookie: {}\r\n", "c".repeat(3000));
        let heads = [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
            "POST / HTTP/1.1\r\nhost: a\r\nCONTENT-LENGTH: 5\r\n\r\nhello".to_owned(),
            format!("POST / HTTP/1.1\r\n{long}transfer-encoding: chunked\r\n{long}\r\n5\r\n"),
            format!("GET / HTTP/1.1\r\n{long}x-content-length: 1\r\n\r\nGET /"),
            format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(5000)),
        ];
        for whole in &heads {
            let whole = whole.as_bytes();
            let want = scan_head(whole).expect("a whole head");
            for piece in [1, 2, 3, 7, 17, 18, 19, 64, 1000] {
                let mut partial = PartialHead::default();
                let mut found = None;
                for chunk in whole.chunks(piece) {
                    if let Some(head) = partial.extend(chunk) {
                        found = Some(head);
                        break;
                    }
                    // What the next read scans again: at most the last line's first bytes.
                    let again = partial.bytes.len() - partial.next;
                    assert!(again <= Names::NAME_LOOKAHEAD, "{piece}: {again}");
                }
                assert_eq!(found, Some(want), "pieces of {piece}");
            }
        }
    }

    #[test]
    fn sized_request_bodies_are_told_as_actix_http_tells_them() {
        let body = |h: &[u8]| {
            let head = scan_head(h).expect("a whole head");
            match request_body(head, &h[..head.end]) {
                Some(Left::Bytes(n)) => Some(n),
                Some(Left::Chunks(_)) => Some(u64::MAX),
                None => None,
            }
        };
        for (head, want) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
                Some(5),
            ),
            (
                b"POST / HTTP/1.1\r\nhost: a\r\nCONTENT-LENGTH:12\r\n\r\n",
                Some(12),
            ),
            (
                b"GET / HTTP/1.0\r\ncontent-length: 18446744073709551615\r\n\r\n",
                Some(u64::MAX),
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                Some(u64::MAX),
            ),
            // No body: none announced, or zero.
            (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nx-content-length: 5\r\n\r\n", None),
            // Refused by the decoder (400, then close): a sign, not digits, two fields, too big.
            (b"POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\ncontent-length: 5 5\r\n\r\n", None),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
                None,
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 18446744073709551616\r\n\r\n",
                None,
            ),
            // What follows is a tunnel's.
            (
                b"GET / HTTP/1.1\r\nupgrade: websocket\r\ncontent-length: 5\r\n\r\n",
                None,
            ),
            (b"CONNECT a:443 HTTP/1.1\r\ncontent-length: 5\r\n\r\n", None),
        ] {
            assert_eq!(body(head), want, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn an_upgrade_other_than_websocket_loses_its_connection_token() {
        let mut h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
            Upgrade: h2c\r\nconnection: keep-alive,upgrade\r\n\r\n"
            .to_vec();
        plain_if_not_websocket(&mut h2c);
        assert_eq!(
            String::from_utf8(h2c).unwrap(),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection:        , HTTP2-Settings\r\n\
             Upgrade: h2c\r\nconnection: keep-alive,       \r\n\r\n"
        );
        let ws = b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let mut kept = ws.to_vec();
        plain_if_not_websocket(&mut kept);
        assert_eq!(kept, ws);
    }

    #[test]
    fn a_connection_field_naming_upgrade_marks_the_head_for_the_rewrite() {
        let flagged = |h: &[u8]| scan_head(h).expect("a whole head").upgrade;
        for head in [
            &b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: a\r\nCONNECTION:keep-alive, Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
        ] {
            assert!(flagged(head), "{}", String::from_utf8_lossy(head));
        }
        for head in [
            &b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nx-connection: upgrade\r\ncontent-type: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nconnection: close\r\nx-a: upgrade\r\n\r\n",
        ] {
            assert!(!flagged(head), "{}", String::from_utf8_lossy(head));
        }
        // Blanked without an `Upgrade` field too: an ordinary request.
        let mut alone = b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n".to_vec();
        plain_if_not_websocket(&mut alone);
        assert_eq!(alone, b"GET / HTTP/1.1\r\nConnection:        \r\n\r\n");
        // Cut before the value's line feed: flagged, to be looked at whole.
        let mut partial = PartialHead::default();
        assert_eq!(
            partial.extend(b"GET / HTTP/1.1\r\nConnection: keep-alive, upgr"),
            None
        );
        let head = partial.extend(b"ade\r\n\r\n").expect("whole");
        assert!(head.upgrade);
    }

    #[test]
    fn a_line_feed_without_its_carriage_return_marks_the_head_refused() {
        for (bytes, at) in [
            (&b"GET / HTTP/1.1\nHost: a\n\n"[..], 15),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 24),
            (b"\nGET / HTTP/1.1\r\n\r\n", 1),
        ] {
            let head = scan_head(bytes).expect("refused at the bare line feed");
            assert!(head.bare_lf, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(head.end, at, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(head_end(bytes), None);
        }
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nmore";
        assert!(
            !scan_head(whole).unwrap().bare_lf,
            "after the head: the body's"
        );
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET"), Some(24));
        assert_eq!(head_end(b"\r\n\r\n"), Some(4));
        for cut in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"GET / HTTP/1.1\r\n\r",
            b"\n\n\n",
            b"",
        ] {
            assert_eq!(head_end(cut), None, "{}", String::from_utf8_lossy(cut));
        }
        // Against the plain definition, with the empty line at every offset and after bytes
        // that may fool the word test (0x0b, 0x01, 0x8a, more line feeds).
        let naive = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        for fill in [b'a', 0x0b, 0x01, 0x8a, b'\r'] {
            for at in 0..40 {
                let mut b = vec![fill; at];
                b.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
                assert_eq!(head_end(&b), naive(&b), "fill {fill:#x} at {at}");
                b.truncate(at + 3);
                assert_eq!(head_end(&b), naive(&b), "cut: fill {fill:#x} at {at}");
            }
        }
    }

    #[test]
    fn only_what_follows_a_whole_plain_head_without_a_body_is_held() {
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(bodyless_head_end(get), Some(get.len()));
        let two = [&get[..], b"HEAD /b HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(bodyless_head_end(&two), Some(get.len()));
        let empty = b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        let two = [&empty[..], get].concat();
        assert_eq!(bodyless_head_end(&two), Some(empty.len()));
        // Served as plain requests: an upgrade to something else than WebSocket, a method in
        // lower case.
        for plain in [
            &b"GET /a HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"[..],
            b"GET /a HTTP/1.1\r\nUpgrade: foo\r\n\r\n",
            // WebSocket among other tokens: not a handshake to actix-http either.
            b"GET /ws HTTP/1.1\r\nUpgrade: foo, WebSocket\r\nConnection: upgrade\r\n\r\n",
            b"get /a HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let two = [plain, get].concat();
            assert_eq!(bodyless_head_end(&two), Some(plain.len()));
        }
        for framed in [
            &b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\ncontent-length:2\r\n\r\nok",
            b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nframes",
            b"CONNECT a:443 HTTP/1.1\r\n\r\ntunnel",
            // Cut short, leading empty lines, not HTTP/1.x: nothing is held.
            b"GET /a HTTP/1.1\r\nHost: x\r\n",
            b"\r\nGET /a HTTP/1.1\r\n\r\n",
            b"GET /a\r\n\r\n",
            b"",
        ] {
            assert_eq!(
                bodyless_head_end(framed),
                None,
                "{}",
                String::from_utf8_lossy(framed)
            );
        }
    }

    #[test]
    fn connection_limits_count_and_give_back() {
        let counts = Arc::new(ConnCounts::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let g1 = counts.admit(a, 3, Some(2)).expect("first");
        let g2 = counts.admit(a, 3, Some(2)).expect("second");
        assert_eq!(
            counts.admit(a, 3, Some(2)).err(),
            Some(Refused::MaxConnectionsPerIp)
        );
        let g3 = counts.admit(b, 3, Some(2)).expect("other ip");
        assert_eq!(
            counts.admit(b, 3, Some(2)).err(),
            Some(Refused::MaxConnections)
        );
        assert_eq!(counts.open(), 3);
        drop(g1);
        let g4 = counts.admit(a, 3, Some(2)).expect("place given back");
        drop((g2, g3, g4));
        assert_eq!(counts.open(), 0);
        assert!(counts.per_ip.lock().expect("lock").is_empty());
        // Without a per-IP cap nothing is kept per address.
        let g = counts.admit(a, 3, None).expect("no cap");
        assert!(counts.per_ip.lock().expect("lock").is_empty());
        drop(g);
    }
}
