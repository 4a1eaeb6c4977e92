//! The proxy listener's connections, before HTTP sees them.
//!
//! ```text
//! accept ─► admit (max_connections, max_connections_per_ip) ─► TCP_NODELAY
//!        ─► ClientIo (header timeout on every request head) ─► actix-http dispatcher ─► handler
//! ```
//!
//! Actix times only a connection's *first* request head (`client_request_timeout`); once a
//! keep-alive connection has served a request, bytes of the next head clear its keep-alive timer
//! and nothing times the rest. [`ClientIo`] wraps the socket and closes that gap: when bytes
//! arrive while no request of the connection is being handled, a head deadline starts; the
//! handler clears it when the head has been parsed ([`ConnState::begin`]). If the deadline
//! passes first, the client gets `408` and the connection is closed.
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

use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;

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
        let ip = crate::snapshot::canonical_ip(ip);
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
    /// `rustygate_client_timeouts_total{phase="header"}`
    timeouts: prometheus::IntCounter,
    /// Requests of this connection between head parsed and response finished.
    busy: Cell<u32>,
    /// When the head being received must be complete (set on its first bytes).
    head_deadline: Cell<Option<Instant>>,
    /// End the connection once no request is in progress ([`ConnState::close`]).
    closing: Cell<bool>,
    /// The dispatcher waiting for input, woken by `close`.
    reader: Cell<Option<Waker>>,
}

impl ConnState {
    fn new(header_timeout: Duration, timeouts: prometheus::IntCounter) -> Self {
        Self {
            header_timeout,
            timeouts,
            busy: Cell::new(0),
            head_deadline: Cell::new(None),
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
        Busy(Rc::clone(self))
    }
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
        self.0.busy.set(self.0.busy.get().saturating_sub(1));
        if self.0.closing.get() {
            self.0.wake_reader();
        }
    }
}

/// The accepted socket as the HTTP dispatcher sees it.
pub(crate) struct ClientIo {
    io: TcpStream,
    state: Rc<ConnState>,
    timer: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    _guard: ConnGuard,
}

impl ClientIo {
    pub fn state(&self) -> &Rc<ConnState> {
        &self.state
    }

    /// The socket and its place under the connection limits, for a protocol that times its
    /// requests itself (HTTP/2).
    pub fn into_parts(self) -> (TcpStream, ConnGuard) {
        (self.io, self._guard)
    }

    /// Whether the client opens with the HTTP/2 preface (h2c with prior knowledge). Waits for
    /// the first bytes up to the header timeout; `None` if none came (the client got 408 and
    /// the connection is to be closed).
    pub async fn starts_with_h2_preface(&self) -> Option<bool> {
        let preface = super::h2::PREFACE;
        let deadline = Instant::now() + self.state.header_timeout;
        let mut buf = [0u8; 24];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.io.peek(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => return None,
                Err(_) => return self.head_timed_out(),
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
                return self.head_timed_out();
            }
        }
    }

    fn head_timed_out(&self) -> Option<bool> {
        self.state.timeouts.inc();
        let _ = self.io.try_write(REQUEST_TIMEOUT);
        None
    }

    /// Whether the head deadline has passed; arms the timer's wake-up otherwise.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(at) = self.state.head_deadline.get() else {
            return false;
        };
        if self.state.busy.get() > 0 {
            return false;
        }
        let timer = match &mut self.timer {
            Some(t) => {
                if t.deadline() != at {
                    t.as_mut().reset(at);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        timer.as_mut().poll(cx).is_ready()
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
        if this.head_expired(cx) {
            // Best effort: the client learns why; the dispatcher sees end of input and closes.
            this.timed_out = true;
            this.state.timeouts.inc();
            let _ = this.io.try_write(REQUEST_TIMEOUT);
            tracing::debug!("request head not received within the header timeout; closing");
            return Poll::Ready(Ok(()));
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
            // Registers the timer's wake-up.
            let _ = this.head_expired(cx);
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

/// Admits an accepted socket: limits, `TCP_NODELAY`, the head-timeout wrapper. `None` when the
/// connection is refused (it is closed by dropping it).
pub(crate) fn accept(
    io: TcpStream,
    store: &SnapshotStore,
    counts: &Arc<ConnCounts>,
    metrics: &Metrics,
) -> Option<(ClientIo, Option<SocketAddr>)> {
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
    let io = ClientIo {
        io,
        state: Rc::new(ConnState::new(
            limits.header_timeout,
            metrics.client_timeouts.with_label_values(&["header"]),
        )),
        timer: None,
        timed_out: false,
        _guard: guard,
    };
    Some((io, peer))
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
