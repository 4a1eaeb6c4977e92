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
use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;

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

/// The connection facts of a request: the HTTP/1 connection's data, else the request's
/// extensions (where the HTTP/2 server puts them). `None` only outside the proxy listeners.
pub(crate) fn conn_info(req: &actix_http::Request) -> Option<Rc<ConnInfo>> {
    if let Some(i) = req.conn_data::<Rc<ConnInfo>>() {
        return Some(Rc::clone(i));
    }
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

/// Written to a client whose next request head did not arrive in time.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

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
    /// cleared by the next request's first bytes).
    idle_deadline: Cell<Option<Instant>>,
    /// End the connection once no request is in progress ([`ConnState::close`]).
    closing: Cell<bool>,
    /// The dispatcher waiting for input, woken by `close`.
    reader: Cell<Option<Waker>>,
}

impl ConnState {
    fn new(
        header_timeout: Duration,
        keep_alive: Option<Duration>,
        timeouts: prometheus::IntCounter,
    ) -> Self {
        Self {
            header_timeout,
            keep_alive,
            timeouts,
            busy: Cell::new(0),
            head_deadline: Cell::new(None),
            idle_deadline: Cell::new(None),
            closing: Cell::new(false),
            reader: Cell::new(None),
        }
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
    /// request is done).
    pub fn begin(self: &Rc<Self>) -> Busy {
        self.busy.set(self.busy.get() + 1);
        self.head_deadline.set(None);
        self.idle_deadline.set(None);
        Busy(Rc::clone(self))
    }

    /// The deadline that applies now: none while a request is being handled.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        if self.busy.get() > 0 {
            return None;
        }
        match (self.head_deadline.get(), self.idle_deadline.get()) {
            (Some(at), _) => Some((at, Expired::Head)),
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
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        let busy = state.busy.get().saturating_sub(1);
        state.busy.set(busy);
        if busy == 0
            && let Some(k) = state.keep_alive
        {
            // The timer need not move: it fires within `shortest_wait` of when it was armed.
            state.idle_deadline.set(Some(Instant::now() + k));
        }
        if state.closing.get() {
            state.wake_reader();
        }
    }
}

/// The accepted socket as the HTTP dispatcher sees it.
pub(crate) struct ClientIo {
    io: Stream,
    state: Rc<ConnState>,
    info: Rc<ConnInfo>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer last registered a wake-up for, while it has not fired since.
    timer_wakes: Option<Waker>,
    timed_out: bool,
    _guard: ConnGuard,
}

impl ClientIo {
    pub fn state(&self) -> &Rc<ConnState> {
        &self.state
    }

    pub fn info(&self) -> &Rc<ConnInfo> {
        &self.info
    }

    /// The stream and its place under the connection limits, for a protocol that times its
    /// requests itself (HTTP/2). Take [`ClientIo::info`] first to keep the connection facts.
    pub fn into_parts(self) -> (Stream, ConnGuard) {
        (self.io, self._guard)
    }

    /// Whether the client opens with the HTTP/2 preface (h2c with prior knowledge). Waits for
    /// the first bytes up to the header timeout; `None` if none came (the client got 408 and
    /// the connection is to be closed). Over TLS, ALPN decides and this is `Some(false)`.
    pub async fn starts_with_h2_preface(&self) -> Option<bool> {
        let Stream::Plain(io) = &self.io else {
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

    fn head_timed_out(&self, io: &TcpStream) -> Option<bool> {
        self.state.timeouts.inc();
        let _ = io.try_write(REQUEST_TIMEOUT);
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
        if this.timed_out || (this.state.closing.get() && this.state.busy.get() == 0) {
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
                let _ = Pin::new(&mut this.io).poll_write(cx, REQUEST_TIMEOUT);
                tracing::debug!("request head not received within the header timeout; closing");
                return Poll::Ready(Ok(()));
            }
            Some(Expired::Idle) => {
                this.timed_out = true;
                tracing::debug!("keep-alive connection idle past its timeout; closing");
                return Poll::Ready(Ok(()));
            }
            None => {}
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if res.is_pending() {
            let waker = this.state.reader.take();
            this.state.reader.set(match waker {
                Some(w) if w.will_wake(cx.waker()) => Some(w),
                _ => Some(cx.waker().clone()),
            });
        }
        if let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
            && this.state.busy.get() == 0
            && this.state.head_deadline.get().is_none()
        {
            this.state
                .head_deadline
                .set(Some(Instant::now() + this.state.header_timeout));
            this.state.idle_deadline.set(None);
            // Creates the timer for the connection's first head; registers its wake-up.
            let _ = this.expired(cx);
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
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
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

/// An admitted socket, before any TLS handshake.
pub(crate) struct Admitted {
    pub io: TcpStream,
    pub peer: Option<SocketAddr>,
    pub guard: ConnGuard,
    /// `[limits] header_timeout` at accept: for the handshake and every request head.
    pub header_timeout: Duration,
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
    })
}

/// Wraps the stream (plain, or TLS after its handshake) for the HTTP/1 dispatcher.
pub(crate) fn client_io(
    io: Stream,
    guard: ConnGuard,
    header_timeout: Duration,
    keep_alive: Option<Duration>,
    info: ConnInfo,
    metrics: &Metrics,
) -> ClientIo {
    ClientIo {
        io,
        state: Rc::new(ConnState::new(
            header_timeout,
            keep_alive,
            metrics.client_timeouts.with_label_values(&["header"]),
        )),
        info: Rc::new(info),
        timer: None,
        timer_wakes: None,
        timed_out: false,
        _guard: guard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
