//! Per-worker pools of upstream connections.
//!
//! Each actix worker is a single thread, so its pool needs no lock: `RefCell`s over connections
//! keyed by [`PoolKey`] (target address plus how the connection was made). Pools outlive
//! snapshots, so a config swap that keeps a target keeps its warm connections.
//!
//! HTTP/1.1: a connection goes back to the pool once hyper reports it ready, that is once its
//! previous response body has been read to the end; every pooled connection is idle. It is kept
//! for the upstream's `idle_timeout`, or less when the response announced `Keep-Alive:
//! timeout=N`, or until a reload removes its target; a reused connection that the upstream
//! closed under the request is replaced by a fresh one for that request (see
//! [`super::keepalive`]).
//!
//! HTTP/2: one connection per target and worker, shared by every request (a cloned handle per
//! request). Requests that arrive while it is being opened wait for that one connection instead
//! of opening their own. A closed connection is dropped and the next request opens a new one.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Sleep;

use super::ForwardError;
use super::body::{BodyStats, ProxyBody, UpstreamIncoming};
use super::h1::{self, H1Error};
use super::headers::HeaderList;
use super::keepalive::{self, ReadCount};
use super::response::{HeadShape, UpstreamResponse};
use h2_shared::H2Slot;
use handshake::{connect_h1, connect_io, connect_upgradable};
use idle::{Idle, IdleOwn, sweep};

use crate::snapshot::SnapshotStore;
use crate::upstream::state::{Overflow, Slot, UpstreamShared};
use crate::upstream::{PoolKey, Protocol, Target};
use crate::util::{FastMap as HashMap, cold};

mod h2_shared;
mod handshake;
mod idle;
mod timer;

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
    /// A pool that drops expired idle connections in the background, for as long as it lives,
    /// and those to targets that a snapshot published in `store` no longer has; its HTTP/2
    /// connections are checked with `h2_ping`. Must be called on the worker's runtime.
    pub fn new(h2_ping: H2Ping, store: std::sync::Weak<SnapshotStore>) -> Rc<LocalPool> {
        let pool = Rc::new(LocalPool {
            h2_ping,
            ..LocalPool::default()
        });
        let weak = Rc::downgrade(&pool);
        actix_web::rt::spawn(sweep(weak, store));
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
