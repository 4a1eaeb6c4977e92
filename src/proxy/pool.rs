//! Per-worker pools of upstream connections.
//!
//! Each actix worker is a single thread, so its pool needs no lock: `RefCell`s over connections
//! keyed by [`PoolKey`] (target address plus how the connection was made). Pools outlive
//! snapshots, so a config swap that keeps a target keeps its warm connections.
//!
//! HTTP/1.1: a connection goes back to the pool once hyper reports it ready, that is once its
//! previous response body has been read to the end; every pooled connection is idle. It is kept
//! for the upstream's `idle_timeout`, or less when the response announced `Keep-Alive:
//! timeout=N`; a reused connection that the upstream closed under the request is replaced by a
//! fresh one for that request (see [`super::keepalive`]).
//!
//! HTTP/2: one connection per target and worker, shared by every request (a cloned handle per
//! request). Requests that arrive while it is being opened wait for that one connection instead
//! of opening their own. A closed connection is dropped and the next request opens a new one.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{LocalBoxFuture, Shared};
use http::uri::{Authority, PathAndQuery};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::ForwardError;
use super::body::{BodyStats, ProxyBody, UpstreamIncoming};
use super::h1::{self, H1Error};
use super::headers::HeaderList;
use super::keepalive::{self, CountingIo, ReadCount};
use super::response::{HeadShape, UpstreamResponse};
use crate::upstream::state::{Overflow, Slot, UpstreamShared};
use crate::upstream::{PoolKey, Protocol, Target};
use crate::util::FastMap as HashMap;
use crate::util::{clock, cold};
use crate::wire::connect;
use crate::wire::tls::TargetTls;

/// How often expired idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Idle connections kept per target and worker.
pub const MAX_IDLE_PER_TARGET: usize = 512;

/// PINGs on upstream HTTP/2 connections: an upstream that vanished without closing (a host
/// gone, a NAT entry dropped) is otherwise found only by the requests that time out on it.
#[derive(Debug, Clone, Copy)]
pub struct H2Ping {
    /// Time without a frame from the upstream after which a PING is sent, idle or not.
    pub interval: Duration,
    /// Time its answer may take before the connection is closed and no longer used.
    pub timeout: Duration,
}

impl Default for H2Ping {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// An HTTP/1.1 connection, with the count of bytes read from it.
pub(crate) struct H1Conn {
    send: SendRequest<ProxyBody>,
    read: ReadCount,
}

struct Idle {
    conn: H1Conn,
    expires: Instant,
}

type H2Result = Result<http2::SendRequest<ProxyBody>, ForwardError>;

/// A target's HTTP/2 connection on this worker.
enum H2Slot {
    Ready {
        conn: http2::SendRequest<ProxyBody>,
        expires: Instant,
    },
    /// Being opened; every request that needs it awaits the same future.
    Connecting(Shared<LocalBoxFuture<'static, H2Result>>),
}

/// An idle connection of the request-task client ([`super::h1`]).
struct IdleOwn {
    conn: h1::Conn,
    expires: Instant,
}

#[derive(Default)]
pub struct LocalPool {
    /// hyper HTTP/1.1 connections (requests with a streamed body).
    idle: RefCell<HashMap<PoolKey, Vec<Idle>>>,
    /// Connections of the request-task client (requests whose body is in hand).
    own: RefCell<HashMap<PoolKey, Vec<IdleOwn>>>,
    h2: RefCell<HashMap<PoolKey, H2Slot>>,
    /// The attempts' timers, kept for the next attempts (see [`LocalPool::within`]).
    timers: RefCell<Vec<Pin<Box<Sleep>>>>,
    h2_ping: H2Ping,
}

/// Timers kept per worker: as many as attempts ran at once, up to this.
const KEPT_TIMERS: usize = 1024;

/// How one attempt is made.
#[derive(Clone, Copy)]
pub struct SendOptions<'a> {
    /// When the attempt was sent: its `timeout` and the pool's idle deadlines count from then
    /// (one clock read for the attempt rather than one for each).
    pub started: Instant,
    pub connect_timeout: Duration,
    /// Time allowed until the response head, connecting included.
    pub timeout: Duration,
    /// How long the connection may then wait idle in the pool.
    pub idle_timeout: Duration,
    /// The upstream's counters and its `max_pending` limit for opening connections.
    pub pending: Option<(&'a Arc<UpstreamShared>, u32)>,
    /// The trace context's `traceparent` for this attempt, replacing any in the request's
    /// headers: written straight into an HTTP/1.1 head by [`super::h1`], set as a header on
    /// the other paths.
    pub traceparent: Option<[u8; 55]>,
    /// The request's header fields, when they are a list written as it is rather than the
    /// request's own map ([`super::h1`]; the paths through hyper move them into the map).
    pub fields: Option<&'a HeaderList>,
    /// The shape an HTTP/1.1 response head is parsed into ([`super::h1`]; hyper's are always
    /// `http` 1.x): the client's types for a head that is only relayed.
    pub head: HeadShape,
    /// A body streamed from the client as it arrives: `timeout` then counts from when the
    /// upstream last had to take a piece of it, or from its end ([`BodyStats::deadline`]).
    pub streamed: Option<&'a BodyStats>,
    /// The exchange's own end (`total_timeout`, the client's `grpc-timeout`), which a streamed
    /// body does not move.
    pub until: Option<Instant>,
}

impl SendOptions<'_> {
    /// A place under the upstream's `max_pending` for opening a connection (`None`: no limit).
    fn pending_slot(&self) -> Result<Option<Slot>, Overflow> {
        match self.pending {
            Some((shared, limit)) => shared.acquire_pending(Some(limit)),
            None => Ok(None),
        }
    }
}

/// An attempt's request, boxed: it is handed down through the attempt's futures and back in a
/// [`SendFailure`], and a box moves as a pointer where the request would be copied whole
/// (264 bytes) into each future's state.
pub type OutRequest = Box<http::Request<ProxyBody>>;

/// An attempt's outcome, its response boxed for the same reason as [`OutRequest`]: it is
/// returned up through as many futures (~300 bytes each time).
pub type Sent = Result<Box<UpstreamResponse>, SendFailure>;

/// `req` with the attempt's header fields (when they came as a list) and `traceparent` in its
/// map, for the paths that hand it to hyper.
fn for_hyper(req: OutRequest, opts: &SendOptions<'_>) -> http::Request<ProxyBody> {
    use crate::telemetry::trace::{Field, propagation};
    let mut req = *req;
    if let Some(fields) = opts.fields {
        fields.append_to(req.headers_mut());
    }
    if let Some(v) = opts
        .traceparent
        .as_ref()
        .and_then(propagation::traceparent_value)
    {
        req.headers_mut().insert(Field::TraceParent.header(), v);
    }
    req
}

/// A failed attempt, with the request when none of it was sent (so it can go elsewhere).
pub struct SendFailure {
    pub error: ForwardError,
    pub request: Option<OutRequest>,
}

impl LocalPool {
    /// A pool that drops expired idle connections in the background, for as long as it lives;
    /// its HTTP/2 connections are checked with `h2_ping`. Must be called on the worker's
    /// runtime.
    pub fn new(h2_ping: H2Ping) -> Rc<LocalPool> {
        let pool = Rc::new(LocalPool {
            h2_ping,
            ..LocalPool::default()
        });
        let weak = Rc::downgrade(&pool);
        actix_web::rt::spawn(sweep(weak));
        pool
    }

    /// Sends `req` to `target` on a pooled or new connection, waiting at most `opts.timeout`
    /// (connect included) for the response head.
    pub async fn send(
        self: &Rc<Self>,
        target: &Target,
        req: OutRequest,
        opts: &SendOptions<'_>,
    ) -> Sent {
        // Only a body still coming from the client moves the deadline.
        let streamed = match req.body() {
            ProxyBody::Channel { .. } => opts.streamed,
            _ => None,
        };
        // Pinned where it is: moved into the timeout, the whole attempt's state would be copied.
        let attempt = std::pin::pin!(async {
            match (target.protocol, req.body()) {
                (Protocol::Http1, ProxyBody::Empty | ProxyBody::Full(_)) => {
                    self.send_own(target, req, opts).await
                }
                // Boxed so that the HTTP/1.1 attempt, the benchmark path, does not grow, and
                // polled out of line (`util::Cold`).
                (Protocol::Http1, ProxyBody::Channel { len, .. }) => {
                    let unsized_body = len.is_none();
                    let mut req = for_hyper(req, opts);
                    if unsized_body {
                        // Said outright: for GET, HEAD and CONNECT, hyper takes a body of
                        // unknown length for no body at all (its other methods get `chunked`),
                        // and a chunked GET's body never reached the upstream.
                        req.headers_mut().insert(
                            http::header::TRANSFER_ENCODING,
                            http::HeaderValue::from_static("chunked"),
                        );
                    }
                    cold(self.send_inner(target, req, opts))
                        .await
                        .and_then(checked_hyper_response)
                }
                (Protocol::Http2, _) => cold(self.send_h2(target, for_hyper(req, opts), opts))
                    .await
                    .and_then(checked_hyper_response),
            }
        });
        let deadline = opts.started + opts.timeout;
        let later = streamed.map(|b| {
            move |now: tokio::time::Instant| {
                b.deadline(now.into_std(), opts.timeout, opts.until)
                    .map(tokio::time::Instant::from_std)
            }
        });
        match self.within(deadline.into(), later, attempt).await {
            Some(r) => r,
            None => Err(SendFailure {
                error: ForwardError::Timeout(opts.timeout),
                request: None,
            }),
        }
    }

    /// A request whose body is in hand, on this task ([`super::h1`]): a pooled connection, or
    /// a new one. A reused connection that turns out closed before any response byte is
    /// replaced by a fresh one for an idempotent request (the upstream closed it while idle).
    async fn send_own(
        self: &Rc<Self>,
        target: &Target,
        req: OutRequest,
        opts: &SendOptions<'_>,
    ) -> Sent {
        let replayable = crate::upstream::retry::is_idempotent(req.method());
        for fresh in [false, true] {
            let pooled = if fresh {
                None
            } else {
                self.checkout_own(&target.pool_key, opts.started)
            };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let _slot = match opts.pending_slot() {
                        Ok(slot) => slot,
                        Err(o) => {
                            return Err(SendFailure {
                                error: ForwardError::Overloaded(o),
                                request: Some(req),
                            });
                        }
                    };
                    // Boxed and polled out of line (`util::Cold`): a new connection is the
                    // rare case, and its TCP and TLS handshake futures would otherwise weigh
                    // on every request's future and on its poll's stack frame.
                    let connect = connect_io(
                        &target.connect_addr,
                        target.tls.as_ref(),
                        opts.connect_timeout,
                    );
                    match cold(connect).await {
                        Ok(io) => h1::Conn::new(io),
                        Err(error) => {
                            return Err(SendFailure {
                                error,
                                request: Some(req),
                            });
                        }
                    }
                }
            };
            let checkin = h1::Checkin {
                pool: Rc::downgrade(self),
                key: target.pool_key.clone(),
                idle: Some(opts.idle_timeout),
            };
            let traceparent = opts.traceparent.as_ref();
            let idle = opts.idle_timeout;
            let head = h1::RequestHead {
                req: &req,
                fields: opts.fields,
                traceparent,
            };
            match h1::exchange(conn, head, checkin, idle, opts.head).await {
                Ok(resp) => return Ok(resp),
                Err(H1Error::Lost(e) | H1Error::Write(e)) if reused && replayable => {
                    tracing::debug!(
                        upstream_target = target.url.as_str(),
                        error = %e,
                        "a reused upstream connection closed under the request; \
                         sending it again on a fresh connection"
                    );
                }
                Err(e) => {
                    let error = match e {
                        H1Error::Invalid(why) => ForwardError::Invalid(why.into()),
                        e => ForwardError::Upstream(e.to_string()),
                    };
                    return Err(SendFailure {
                        error,
                        request: None,
                    });
                }
            }
        }
        Err(SendFailure {
            error: ForwardError::Upstream("no connection could take the request".into()),
            request: None,
        })
    }

    async fn send_inner(
        self: &Rc<Self>,
        target: &Target,
        mut req: http::Request<ProxyBody>,
        opts: &SendOptions<'_>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        // A pooled connection can close between the check and the send; hyper then hands the
        // untouched request back and it is sent once more on a fresh connection. If it closes
        // just after the request was written, before any response byte, an idempotent request
        // is sent again from a copy: the target did nothing wrong, so the caller never sees it.
        for fresh in [false, true] {
            let pooled = if fresh {
                None
            } else {
                self.checkout(&target.pool_key)
            };
            let replay = pooled.as_ref().and_then(|_| keepalive::replay_copy(&req));
            let mut conn = match pooled {
                Some(c) => c,
                None => {
                    let _slot = match opts.pending_slot() {
                        Ok(slot) => slot,
                        Err(o) => {
                            return Err(SendFailure {
                                error: ForwardError::Overloaded(o),
                                request: Some(Box::new(req)),
                            });
                        }
                    };
                    let tls = target.tls.as_ref();
                    match connect_h1(&target.connect_addr, tls, opts.connect_timeout).await {
                        Ok(c) => c,
                        Err(error) => {
                            return Err(SendFailure {
                                error,
                                request: Some(Box::new(req)),
                            });
                        }
                    }
                }
            };
            let read_before = conn.read.get();
            // Set when hyper skips an interim (1xx) response: a close after it is no lost
            // connection but a response without a final status (see `h1::NO_FINAL_RESPONSE`).
            let interim = Arc::new(AtomicBool::new(false));
            let seen = Arc::clone(&interim);
            hyper::ext::on_informational(&mut req, move |_| seen.store(true, Ordering::Relaxed));
            match conn.send.try_send_request(req).await {
                Ok(resp) => {
                    if let Some(idle) = keepalive::idle_limit(resp.headers(), opts.idle_timeout) {
                        self.checkin_when_ready(target.pool_key.clone(), conn, idle);
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    let stale = replay.is_some()
                        && e.message().is_none()
                        && keepalive::is_connection_lost(e.error())
                        && conn.read.get() == read_before;
                    match (stale, replay) {
                        (true, Some(copy)) => {
                            tracing::debug!(
                                upstream_target = target.url.as_str(),
                                error = %e.error(),
                                "a reused upstream connection closed under the request; \
                                 sending it again on a fresh connection"
                            );
                            req = copy;
                        }
                        _ => {
                            req = resend_or_fail(e, fresh).map_err(|mut failure| {
                                if interim.load(Ordering::Relaxed)
                                    && let ForwardError::Upstream(why) = &failure.error
                                {
                                    failure.error = ForwardError::Invalid(format!(
                                        "{} ({why})",
                                        h1::NO_FINAL_RESPONSE
                                    ));
                                }
                                failure
                            })?;
                        }
                    }
                }
            }
        }
        Err(SendFailure {
            error: ForwardError::Upstream("no connection could take the request".into()),
            request: None,
        })
    }

    /// Sends a WebSocket handshake to `target` on a new HTTP/1.1 connection that can be
    /// upgraded (`hyper::upgrade::on` on the response), whatever the target's `protocol`. The
    /// connection is never pooled: after a 101 it belongs to the tunnel, otherwise it closes
    /// with the response. Waits at most `opts.timeout` (connect included) for the response head.
    pub async fn send_upgrade(
        &self,
        target: &Target,
        req: OutRequest,
        opts: &SendOptions<'_>,
    ) -> Sent {
        let req = for_hyper(req, opts);
        let attempt = async {
            let _slot = match opts.pending_slot() {
                Ok(slot) => slot,
                Err(o) => {
                    return Err(SendFailure {
                        error: ForwardError::Overloaded(o),
                        request: Some(Box::new(req)),
                    });
                }
            };
            let tls = target.tls.as_ref();
            let mut send =
                match connect_upgradable(&target.connect_addr, tls, opts.connect_timeout).await {
                    Ok(c) => c,
                    Err(error) => {
                        return Err(SendFailure {
                            error,
                            request: Some(Box::new(req)),
                        });
                    }
                };
            drop(_slot);
            send.try_send_request(req)
                .await
                .map_err(|mut e| {
                    let request = e.take_message().map(Box::new);
                    SendFailure {
                        error: super::classify(&e.into_error()),
                        request,
                    }
                })
                .and_then(checked_hyper_response)
        };
        match tokio::time::timeout(opts.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(SendFailure {
                error: ForwardError::Timeout(opts.timeout),
                request: None,
            }),
        }
    }

    /// A pooled connection still usable at `now`.
    fn checkout_own(&self, key: &PoolKey, now: Instant) -> Option<h1::Conn> {
        let mut idle = self.own.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if now < i.expires && i.conn.is_usable() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to the end ([`h1::ResponseBody`]).
    pub(crate) fn checkin_own(&self, key: &PoolKey, conn: h1::Conn, idle_timeout: Duration) {
        let mut idle = self.own.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(IdleOwn {
                conn,
                expires: clock::now() + idle_timeout,
            });
        }
    }

    fn checkout(&self, key: &PoolKey) -> Option<H1Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = clock::now();
        while let Some(i) = list.pop() {
            if !i.conn.send.is_closed() && now < i.expires {
                return Some(i.conn);
            }
        }
        None
    }

    /// Pools the connection once its current response has been read to the end (hyper then
    /// reports it ready); a connection that closes first is simply dropped.
    fn checkin_when_ready(self: &Rc<Self>, key: PoolKey, mut conn: H1Conn, idle_timeout: Duration) {
        let pool = Rc::downgrade(self);
        actix_web::rt::spawn(async move {
            if conn.send.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.checkin(&key, conn, idle_timeout);
            }
        });
    }

    fn checkin(&self, key: &PoolKey, conn: H1Conn, idle_timeout: Duration) {
        let mut idle = self.idle.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                conn,
                expires: clock::now() + idle_timeout,
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|i| !i.conn.send.is_closed() && now < i.expires);
            !list.is_empty()
        });
        self.own.borrow_mut().retain(|_, list| {
            list.retain(|i| now < i.expires && i.conn.is_usable());
            !list.is_empty()
        });
        // Requests in flight hold their own handle: dropping the pool's only stops reuse.
        self.h2.borrow_mut().retain(|_, slot| match slot {
            H2Slot::Ready { conn, expires } => !conn.is_closed() && now < *expires,
            H2Slot::Connecting(_) => true,
        });
    }

    /// Idle HTTP/1.1 connections held for `authority`, whatever their TLS settings (for tests
    /// and status).
    pub fn idle_count(&self, authority: &Authority) -> usize {
        let hyper: usize = self
            .idle
            .borrow()
            .iter()
            .filter(|(k, _)| k.authority() == authority)
            .map(|(_, l)| l.len())
            .sum();
        let own: usize = self
            .own
            .borrow()
            .iter()
            .filter(|(k, _)| k.authority() == authority)
            .map(|(_, l)| l.len())
            .sum();
        hyper + own
    }

    /// Sends on the target's shared HTTP/2 connection, opening it if there is none.
    async fn send_h2(
        self: &Rc<Self>,
        target: &Target,
        mut req: http::Request<ProxyBody>,
        opts: &SendOptions<'_>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        to_h2_request(&mut req, target);
        // The shared connection may have gone away (GOAWAY, reset) with the request unsent:
        // then it is sent once more on a new connection.
        for fresh in [false, true] {
            let mut conn = match self.h2_conn(target, opts, fresh).await {
                Ok(c) => c,
                Err(error) => {
                    return Err(SendFailure {
                        error,
                        request: Some(Box::new(req)),
                    });
                }
            };
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => req = resend_or_fail(e, fresh)?,
            }
        }
        Err(SendFailure {
            error: ForwardError::Upstream("no connection could take the request".into()),
            request: None,
        })
    }

    /// The target's HTTP/2 connection on this worker: the pooled one unless `fresh` (or it is
    /// closed), else the one being opened, else a new one.
    async fn h2_conn(
        self: &Rc<Self>,
        target: &Target,
        opts: &SendOptions<'_>,
        fresh: bool,
    ) -> H2Result {
        let key = &target.pool_key;
        let opening = {
            let mut map = self.h2.borrow_mut();
            match map.get_mut(key) {
                Some(H2Slot::Ready { conn, expires }) if !fresh && !conn.is_closed() => {
                    *expires = clock::now() + opts.idle_timeout;
                    return Ok(conn.clone());
                }
                Some(H2Slot::Connecting(f)) => f.clone(),
                _ => {
                    let slot = opts.pending_slot().map_err(ForwardError::Overloaded)?;
                    let addr = target.connect_addr.clone();
                    let tls = target.tls.clone();
                    let timeout = opts.connect_timeout;
                    let ping = self.h2_ping;
                    let f = async move {
                        let _slot = slot;
                        connect_h2(&addr, tls.as_ref(), timeout, ping).await
                    }
                    .boxed_local()
                    .shared();
                    map.insert(key.clone(), H2Slot::Connecting(f.clone()));
                    f
                }
            }
        };
        // A shared future keeps going when the request that started it is dropped: the next
        // one to await it drives it on.
        let result = opening.clone().await;
        let mut map = self.h2.borrow_mut();
        if let Some(H2Slot::Connecting(f)) = map.get(key)
            && f.ptr_eq(&opening)
        {
            match &result {
                Ok(conn) => {
                    map.insert(
                        key.clone(),
                        H2Slot::Ready {
                            conn: conn.clone(),
                            expires: clock::now() + opts.idle_timeout,
                        },
                    );
                }
                Err(_) => {
                    map.remove(key);
                }
            }
        }
        result
    }
}

async fn sweep(pool: Weak<LocalPool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

/// An HTTP/2 request carries its target in `:scheme` and `:authority`: the URI becomes
/// absolute, with the `Host` the request would have had as its authority.
fn to_h2_request(req: &mut http::Request<ProxyBody>, target: &Target) {
    let authority = req
        .headers_mut()
        .remove(http::header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| target.authority.clone());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// After `try_send_request` failed: the request back, for one more try on a fresh connection,
/// when hyper returned it unsent from a pooled connection; else the failure (with the request
/// when it was never sent, so that the caller may try another target).
// Both sides carry a request; boxing would not make the result smaller.
#[allow(clippy::result_large_err)]
fn resend_or_fail(
    mut e: hyper::client::conn::TrySendError<http::Request<ProxyBody>>,
    fresh: bool,
) -> Result<http::Request<ProxyBody>, SendFailure> {
    match e.take_message() {
        Some(returned) if !fresh => Ok(returned),
        returned => Err(SendFailure {
            error: super::classify(&e.into_error()),
            request: returned.map(Box::new),
        }),
    }
}

/// A response through hyper, as an attempt returns it.
fn hyper_response(r: http::Response<Incoming>) -> Box<UpstreamResponse> {
    Box::new(r.map(UpstreamIncoming::Hyper).into())
}

/// A response hyper read, held to the rules the gateway's own HTTP/1.1 client applies
/// ([`h1`]): a status of at most 599, no `Transfer-Encoding` but one `chunked`, a head of at
/// most [`h1::MAX_HEAD`] bytes. hyper takes statuses up to 999, reads `gzip, chunked` as
/// chunked (the client would then get gzip bytes without a `Content-Encoding`) and `xchunked`
/// as a body until close, and its `max_buf_size` lets a head whose last read crosses it in.
fn checked_hyper_response(r: http::Response<Incoming>) -> Sent {
    let invalid = |why: &str| {
        Err(SendFailure {
            error: ForwardError::Invalid(why.into()),
            request: None,
        })
    };
    if r.status().as_u16() > 599 {
        return invalid("status over 599");
    }
    // Each field as a line of the head: name, ": ", value, CRLF.
    let head: usize = r
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if head > h1::MAX_HEAD {
        return invalid("response head too large");
    }
    let mut chunked = false;
    for v in r.headers().get_all(http::header::TRANSFER_ENCODING) {
        for coding in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                return invalid("unsupported Transfer-Encoding");
            }
            chunked = true;
        }
    }
    Ok(hyper_response(r))
}

/// Opens a TCP connection to `addr`, with TLS when `tls` is set (offering `http/1.1`);
/// `timeout` bounds the connect and the handshake together.
async fn connect_io(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<h1::Io, ForwardError> {
    Ok(connect::connect(addr, tls, Protocol::Http1, timeout).await?)
}

/// Opens a hyper HTTP/1.1 connection; the connection task runs on the current worker.
async fn connect_h1(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<H1Conn, ForwardError> {
    h1_handshake(connect_io(addr, tls, timeout).await?, addr).await
}

/// Opens an HTTP/1.1 connection whose responses can be upgraded (TLS offers only
/// `http/1.1`); the connection task runs on the current worker until the upgrade takes its IO.
async fn connect_upgradable(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<SendRequest<ProxyBody>, ForwardError> {
    h1_upgradable(connect_io(addr, tls, timeout).await?, addr).await
}

async fn h1_upgradable<I>(io: I, addr: &str) -> Result<SendRequest<ProxyBody>, ForwardError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        // The own client's limits ([`h1`]): a larger head is an error, not a response.
        .max_headers(h1::MAX_HEADERS)
        .max_buf_size(h1::MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

async fn h1_handshake<I>(io: I, addr: &str) -> Result<H1Conn, ForwardError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, read) = CountingIo::new(io);
    let (sender, conn) = http1::Builder::new()
        // The own client's limits ([`h1`]): a larger head is an error, not a response.
        .max_headers(h1::MAX_HEADERS)
        .max_buf_size(h1::MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(H1Conn { send: sender, read })
}

impl LocalPool {
    /// `fut`'s output, or `None` once `deadline` has passed first: `tokio::time::timeout_at`,
    /// except for two things.
    /// - The timer is polled only when it has fired or another task polls
    ///   ([`crate::util::poll_timer`]; `Timeout` polls it whenever `fut` is pending).
    /// - The timer is one the worker kept from an earlier attempt. A new tokio timer is entered
    ///   into the timer wheel on its first poll and taken out when dropped (about 600
    ///   instructions per attempt).
    /// - A kept timer set for no later than `deadline` (an earlier attempt's, with the same
    ///   timeout) is left as it is: when it fires before `deadline`, it is set to `deadline`
    ///   then. Attempts with one timeout set it about once per timeout, not once each.
    ///
    /// `later`, when given, is asked at the deadline whether the attempt may go on, and until
    /// when (a streamed request body: [`SendOptions::streamed`]).
    async fn within<F: Future>(
        &self,
        deadline: tokio::time::Instant,
        later: Option<impl Fn(tokio::time::Instant) -> Option<tokio::time::Instant>>,
        fut: Pin<&mut F>,
    ) -> Option<F::Output> {
        let mut fut = fut;
        let mut deadline = deadline;
        let mut timer = Lent::new(&self.timers, deadline);
        let mut wakes: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            // Taken only when the attempt ends.
            let Some(sleep) = timer.sleep.as_mut() else {
                return Poll::Pending;
            };
            while crate::util::poll_timer(sleep.as_mut(), &mut wakes, cx).is_ready() {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    match later.as_ref().and_then(|l| l(now)) {
                        Some(at) => deadline = at,
                        None => return Poll::Ready(None),
                    }
                }
                // Fired for an earlier deadline: set for this one, and polled again for this
                // task (a timer that has fired holds no wake-up).
                sleep.as_mut().reset(deadline);
                wakes = None;
            }
            Poll::Pending
        })
        .await
    }
}

/// A worker's timer, lent to one attempt and given back when the attempt ends.
struct Lent<'a> {
    kept: &'a RefCell<Vec<Pin<Box<Sleep>>>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<'a> Lent<'a> {
    fn new(kept: &'a RefCell<Vec<Pin<Box<Sleep>>>>, deadline: tokio::time::Instant) -> Self {
        let taken = kept.borrow_mut().pop();
        let sleep = match taken {
            // Firing no later than `deadline`, it need not move (see `within`).
            Some(s) if s.deadline() <= deadline => s,
            Some(mut s) => {
                s.as_mut().reset(deadline);
                s
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Lent {
            kept,
            sleep: Some(sleep),
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(mut sleep) = self.sleep.take() else {
            return;
        };
        // It would wake the attempt's task when its deadline comes: it wakes nobody instead.
        if !sleep.is_elapsed() {
            let _ = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        }
        let mut kept = self.kept.borrow_mut();
        if kept.len() < KEPT_TIMERS {
            kept.push(sleep);
        }
    }
}

/// Opens an HTTP/2 connection (h2c with prior knowledge without `tls`); the connection task
/// runs on the current worker.
async fn connect_h2(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
    ping: H2Ping,
) -> H2Result {
    let deadline = tokio::time::Instant::now() + timeout;
    let io = connect::connect(addr, tls, Protocol::Http2, timeout).await?;
    connect::by(deadline, timeout, h2_handshake(io, addr, ping)).await
}

/// Cancelled streams an upstream HTTP/2 connection remembers at once (a few hundred bytes
/// each): frames for them are dropped; past it, for forgotten ones, answered with a reset.
const MAX_H2_RESETS_REMEMBERED: usize = 1024;

/// The flow-control window of each stream on an upstream HTTP/2 connection: the most of one
/// response the upstream can send ahead of a client that is slow to take it.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;

/// The upstream connection's own window: HTTP/2's largest (2^31-1), so that it never runs out
/// before its streams' windows do. A stream holds what it received until its client takes it;
/// with hyper's 5 MiB for the connection, three slow clients of large responses (2 MiB streams)
/// held all of it and every other request on the connection, other clients' too, got its
/// response head and no byte of its body. What the connection holds is bounded by its streams'
/// windows instead.
const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

async fn h2_handshake<I>(io: I, addr: &str, ping: H2Ping) -> H2Result
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        // One connection per target carries every client's streams. Streams the gateway
        // cancels (their clients went away) are remembered long enough for the frames already
        // on their way to be dropped quietly, and such frames are never counted as the
        // upstream's errors. With h2's defaults (50 streams for 1 s, then 1,024 frames for
        // the connection's life) one client dropping 120 streaming gRPC calls made the
        // gateway send GOAWAY on the shared connection: every client's calls failed, and the
        // target was ejected.
        .max_concurrent_reset_streams(MAX_H2_RESETS_REMEMBERED)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .reset_stream_duration(Duration::from_secs(10))
        .max_local_error_reset_streams(None)
        // A connection whose PING goes unanswered ends, and with it `is_closed`: the pool
        // opens a new one for the next request. Also while idle, so that a pooled connection
        // is checked before a request is given to it.
        .timer(TokioTimer::new())
        .keep_alive_interval(ping.interval)
        .keep_alive_timeout(ping.timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: HTTP/2 handshake failed: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    use super::LocalPool;

    /// No streamed body: the first deadline is the last.
    const NO_LATER: Option<fn(tokio::time::Instant) -> Option<tokio::time::Instant>> = None;

    fn after(d: Duration) -> tokio::time::Instant {
        tokio::time::Instant::now() + d
    }

    #[tokio::test]
    async fn within_gives_the_output_of_a_future_that_ends_in_time() {
        let fut = pin!(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7
        });
        let pool = LocalPool::default();
        assert_eq!(
            pool.within(after(Duration::from_secs(5)), NO_LATER, fut)
                .await,
            Some(7)
        );
    }

    /// Pending again and again in the same task: the timer is polled once, and must fire.
    #[tokio::test]
    async fn within_ends_a_future_that_keeps_waking_its_task_but_never_ends() {
        let restless = pin!(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
        let pool = LocalPool::default();
        let bounded = pool.within(after(Duration::from_millis(50)), NO_LATER, restless);
        let out = tokio::time::timeout(Duration::from_secs(10), bounded).await;
        assert_eq!(out.ok(), Some(None::<()>));
    }

    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polled from another task, the timer wakes that one.
    #[tokio::test]
    async fn within_wakes_the_task_that_polled_it_last() {
        let never = pin!(std::future::pending::<()>());
        let pool = LocalPool::default();
        let mut bounded = pin!(pool.within(after(Duration::from_millis(30)), NO_LATER, never));
        let (a, b) = (
            Arc::new(Wakes(AtomicUsize::new(0))),
            Arc::new(Wakes(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(
            bounded
                .as_mut()
                .poll(&mut Context::from_waker(&wa))
                .is_pending()
        );
        assert!(
            bounded
                .as_mut()
                .poll(&mut Context::from_waker(&wb))
                .is_pending()
        );
        for _ in 0..1000 {
            if b.0.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            b.0.load(Ordering::SeqCst),
            1,
            "the last task polling is woken"
        );
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "the task before it is not");
        let ready = bounded.as_mut().poll(&mut Context::from_waker(&wb));
        assert!(matches!(ready, Poll::Ready(None)));
    }

    /// A kept timer left set for an earlier attempt's deadline fires before this attempt's:
    /// the attempt goes on until its own deadline, and ends then.
    #[tokio::test]
    async fn within_outlives_a_kept_timer_set_for_an_earlier_deadline() {
        let pool = LocalPool::default();
        let quick = pin!(async { 1 });
        assert_eq!(
            pool.within(after(Duration::from_millis(20)), NO_LATER, quick)
                .await,
            Some(1)
        );
        let started = std::time::Instant::now();
        let slow = pin!(async {
            tokio::time::sleep(Duration::from_millis(120)).await;
            2
        });
        assert_eq!(
            pool.within(after(Duration::from_millis(400)), NO_LATER, slow)
                .await,
            Some(2),
            "not ended by the kept timer's 20 ms"
        );
        assert!(started.elapsed() >= Duration::from_millis(120));
        let never = pin!(std::future::pending::<()>());
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            pool.within(after(Duration::from_millis(150)), NO_LATER, never),
        )
        .await;
        assert_eq!(out.ok(), Some(None), "ended at its own deadline");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(pool.timers.borrow().len(), 1, "one timer throughout");
    }

    /// Attempts one after another share one timer. Set to an earlier deadline than the one it
    /// had, it fires at the new one; an attempt that ended never hears from it again.
    #[tokio::test]
    async fn within_reuses_one_timer_and_it_keeps_each_deadline() {
        let pool = LocalPool::default();
        for _ in 0..3 {
            let quick = pin!(async { 1 });
            assert_eq!(
                pool.within(after(Duration::from_secs(60)), NO_LATER, quick)
                    .await,
                Some(1)
            );
        }
        assert_eq!(pool.timers.borrow().len(), 1, "one timer, kept");

        // Entered for 60 s above; this attempt's deadline is 30 ms.
        let started = std::time::Instant::now();
        let never = pin!(std::future::pending::<()>());
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            pool.within(after(Duration::from_millis(30)), NO_LATER, never),
        )
        .await;
        assert_eq!(out.ok(), Some(None), "the earlier deadline fired");
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(pool.timers.borrow().len(), 1);

        // An attempt that ends before its deadline: the kept timer must not wake its task.
        let woken = Arc::new(Wakes(AtomicUsize::new(0)));
        {
            let waker = Waker::from(Arc::clone(&woken));
            let short = pin!(tokio::time::sleep(Duration::from_millis(5)));
            let mut attempt = pin!(pool.within(after(Duration::from_millis(20)), NO_LATER, short));
            let cx = &mut Context::from_waker(&waker);
            while attempt.as_mut().poll(cx).is_pending() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Ended: its timer is back with the pool.
            let seen = woken.0.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert_eq!(
                woken.0.load(Ordering::SeqCst),
                seen,
                "woken after its attempt ended"
            );
        }
        // A second attempt while the first is running takes a timer of its own.
        let a = pin!(std::future::pending::<()>());
        let b = pin!(std::future::pending::<()>());
        let (ra, rb) = tokio::join!(
            pool.within(after(Duration::from_millis(20)), NO_LATER, a),
            pool.within(after(Duration::from_millis(40)), NO_LATER, b)
        );
        assert_eq!((ra, rb), (None, None));
        assert_eq!(pool.timers.borrow().len(), 2);
    }
}
