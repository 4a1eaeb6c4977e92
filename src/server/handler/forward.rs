//! Forwarding: the WebSocket and body checks, the request body (read whole for retries,
//! streamed, or held by WASM plugins) and the attempt loop.

use std::rc::Rc;
use std::sync::Arc;

use actix_http::{Payload, Request};
use actix_web::http::header as ax;
use actix_web::{HttpMessage, HttpResponse};
use bytes::Bytes;

use super::admission::Framing;
use super::attempt::{
    Retries, attempt_failed, attempt_request, convert_method, deadlines, read_upload, request_hash,
    upload_slot, upstream_uri,
};
use super::errors::{body_timeout, client_body_failed, overloaded};
use super::exchange::Exchange;
use super::plugin_body;
use super::response::{Relay, client_response, relays_head_as_is};

use crate::decide;
use crate::proxy::body::{
    BodyError, BodyLimit, BodyStats, ProxyBody, read_request_body, stream_request_body,
};
use crate::proxy::pool::SendOptions;
use crate::proxy::response::HeadShape;
use crate::proxy::{ForwardError, websocket};
use crate::server::WorkerState;
use crate::server::h2::UploadSlots;
use crate::snapshot::{Route, Snapshot};
use crate::upstream::RetryReason;
use crate::util::{clock, cold};

/// The answer when a request body would take the worker past `max_buffered_bodies`.
pub(super) const TOO_MANY_BODIES: &str =
    "the gateway is holding too many request bodies; try again";

/// A request body's share of the worker's `max_buffered_bodies` (a body read whole for
/// retries, or what a WASM plugin holds), given back on drop.
pub(super) struct Buffered {
    total: Rc<std::cell::Cell<u64>>,
    pub(super) bytes: u64,
}

impl Buffered {
    /// A share of nothing yet, grown by [`Buffered::resize`].
    pub(super) fn empty(total: &Rc<std::cell::Cell<u64>>) -> Buffered {
        Buffered {
            total: Rc::clone(total),
            bytes: 0,
        }
    }

    pub(super) fn reserve(
        total: &Rc<std::cell::Cell<u64>>,
        bytes: u64,
        cap: u64,
    ) -> Option<Buffered> {
        let mut b = Buffered::empty(total);
        b.resize(bytes, cap).then_some(b)
    }

    /// Makes this share `bytes`: less always succeeds; more only within `cap` for the worker's
    /// total, else (`false`) it stays as it was.
    pub(super) fn resize(&mut self, bytes: u64, cap: u64) -> bool {
        let others = self.total.get().saturating_sub(self.bytes);
        if bytes > self.bytes && others.saturating_add(bytes) > cap {
            return false;
        }
        self.total.set(others.saturating_add(bytes));
        self.bytes = bytes;
        true
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.total.set(self.total.get().saturating_sub(self.bytes));
    }
}

/// What is sent as the request body on each attempt.
pub(super) enum Outgoing {
    Empty,
    /// Read whole beforehand: every attempt sends it again.
    Replayable(Bytes),
    /// To be streamed from the client, still unread: the first attempt that has a target
    /// starts reading it. Until then an answer given instead (no healthy target, the
    /// upstream's `max_requests`) leaves it to the handler, which drops a small body and keeps
    /// the connection.
    Unread {
        len: Option<u64>,
        limit: BodyLimit,
        idle: std::time::Duration,
    },
    /// Streamed from the client: sent once, and taken back only if none of it went out.
    Once(Option<ProxyBody>),
}

impl Outgoing {
    /// The body for the next attempt; `payload` is the client's, taken when first streamed.
    fn next(&mut self, payload: &mut Option<Payload>, ex: &mut Exchange) -> Option<ProxyBody> {
        match self {
            Outgoing::Empty => Some(ProxyBody::Empty),
            Outgoing::Replayable(b) => Some(ProxyBody::Full(Some(b.clone()))),
            Outgoing::Unread { len, limit, idle } => {
                let payload = payload.take().unwrap_or(Payload::None);
                let (body, stats) = stream_request_body(payload, *len, *limit, *idle);
                ex.body = Some(stats);
                *self = Outgoing::Once(None);
                Some(body)
            }
            Outgoing::Once(b) => b.take(),
        }
    }

    /// Whether another attempt could send the body (from its start).
    fn can_resend(&self) -> bool {
        !matches!(self, Outgoing::Once(None))
    }
}

/// Forwards the request to the plan's upstream, retrying as its rules allow, and relays the
/// response. Phases: read or stream the body ([`outgoing_body`]), then per attempt pick a
/// target, build the request ([`attempt_request`]), send it, and either relay the response
/// ([`client_response`]) or classify the failure ([`attempt_failed`]) and try again.
///
/// One async function on purpose: splitting the attempt loop into an async function of its
/// own made the handler's future larger by several KB (its arguments are held twice), and every
/// request pays for moving it (+8.9k instructions per request, measured).
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    mut ex: Box<Exchange>,
    req: &Request,
    payload: &mut Option<Payload>,
    state: &WorkerState,
    snap: &Snapshot,
    route: &Route,
    plan: &mut decide::Forward,
    framing: Framing,
) -> HttpResponse {
    let upstream = Arc::clone(&plan.upstream);
    ex.upstream = Some(Arc::clone(&upstream));
    // WebSocket (proxy::websocket): a handshake goes out without a body on a connection of its
    // own; what the client sends after the 101 is this request's payload.
    // A handshake is HTTP/1.1's: to an HTTP/2 upstream it goes as a plain request (its
    // upgrade headers are hop-by-hop). Sent as a handshake, the HTTP/2-only target failed it
    // and was ejected after five.
    let websocket = match websocket::handshake(req, route.websocket) {
        Ok(h) => h == websocket::Handshake::WebSocket && upstream.speaks_http1(),
        Err(why) => return ex.error(400, why),
    };
    // Browsers send no preflight for a WebSocket and the response's CORS headers do not bind
    // it: on a route with CORS, the handshake's Origin is checked here (cross-site WebSocket
    // hijacking). A client that sends no Origin is not a browser page and is let through.
    if websocket
        && let Some(cors) = &route.cors
        && let Some(origin) = req.headers().get(ax::ORIGIN)
        && !origin.to_str().is_ok_and(|o| cors.origins.allows(o))
    {
        return ex.error(403, "this origin may not open a WebSocket on this route");
    }
    let declared_len = match framing.length {
        Ok(n) => n,
        Err(()) => return ex.error(400, "invalid Content-Length"),
    };
    let has_body = has_body(req, framing.transfer_encoding, declared_len);
    if declared_len.is_some_and(|n| n > route.max_body_size) {
        return ex.error(413, "request body is larger than this route accepts");
    }
    let method = convert_method(req.method());
    let retry = match &route.retry {
        Some(o) => o.apply(&upstream.retry),
        None => upstream.retry,
    };
    // Retrying after (part of) the request went out needs an idempotent method, or the
    // route's permission.
    let may_resend = retry.allows_method(&method);
    if retry.attempts > 0 {
        upstream.shared.deposit(upstream.budget.percent);
    }
    let (mut body, mut tunnel_in) = if websocket {
        ex.body = Some(Rc::new(BodyStats::default()));
        (Outgoing::Empty, payload.take())
    } else if let Some(filter) = plan
        .plugins
        .as_ref()
        .filter(|_| has_body)
        .and_then(|p| p.request_body(route.max_body_size))
    {
        // Boxed: only requests whose body a plugin reads pay for this future's size.
        let payload = payload.take().unwrap_or(Payload::None);
        let read = plugin_body::request(&mut ex, snap, payload, state, route, declared_len, filter);
        match cold(read).await {
            Ok(b) => (b, None),
            Err(resp) => return resp,
        }
    } else {
        let replay_limit = may_resend.then_some(retry.replay_body_limit);
        match outgoing_body(
            &mut ex,
            snap,
            payload,
            state,
            route,
            declared_len,
            has_body,
            replay_limit,
        )
        .await
        {
            Ok(b) => (b, None),
            Err(resp) => return resp,
        }
    };
    let query = match &plan.query {
        Some(q) => q.as_deref(),
        None => req.uri().query(),
    };
    let Some(uri) = upstream_uri(std::mem::take(&mut plan.path), query) else {
        return ex.error(400, "the request path cannot be forwarded");
    };
    let key = upstream
        .balancer
        .hash_key()
        .and_then(|k| request_hash(k, req, &ex, snap, route));
    let opts_base = SendOptions {
        // Set again when each attempt is sent.
        started: ex.started,
        connect_timeout: route.connect_timeout.unwrap_or(upstream.connect_timeout),
        timeout: route.timeout,
        idle_timeout: upstream.idle_timeout,
        pending: upstream.limits.max_pending.map(|l| (&upstream.shared, l)),
        traceparent: None,
        fields: None,
        head: if relays_head_as_is(&ex, route, plan, websocket) {
            HeadShape::Client
        } else {
            HeadShape::Http
        },
        streamed: None,
        until: None,
    };
    let mut retries = Retries {
        policy: retry,
        tried: Vec::new(),
        deadlines: deadlines(route, &upstream, req, ex.grpc),
    };
    // The upstream's place is taken only now that the request can go out: a client slow to
    // send a replayable body holds no place under the upstream's `max_requests`.
    match upstream
        .shared
        .acquire_request(upstream.limits.max_requests)
    {
        Ok(slot) => ex.slot = slot,
        Err(o) => return overloaded(&ex, state, &upstream, o),
    }
    loop {
        let Some(index) = upstream.pick(key, &retries.tried) else {
            state
                .recorder
                .metrics()
                .upstream_no_target
                .with_label_values(&[upstream.name.as_str()])
                .inc();
            return ex.error(503, "no healthy upstream target is available");
        };
        let target = &upstream.targets[index];
        ex.target = Some(index);
        let Some(attempt_body) = body.next(payload, &mut ex) else {
            return ex.error(502, "the upstream could not be reached");
        };
        let (mut upstream_req, fields) = match attempt_request(
            req,
            &ex,
            snap,
            route,
            target,
            plan,
            websocket,
            (&method, &uri),
            attempt_body,
        ) {
            Ok(r) => r,
            Err(why) => return ex.error(400, &why),
        };
        let mut opts = opts_base;
        opts.fields = fields.as_ref();
        // A body streamed from the client: the attempt waits on the client as long as its body
        // keeps coming (`BodyStats::deadline`).
        let streamed = matches!(upstream_req.body(), ProxyBody::Channel { .. })
            .then(|| ex.body.clone())
            .flatten();
        opts.streamed = streamed.as_deref();
        opts.until = retries.deadlines.first();
        if let Some(t) = &ex.trace {
            // After the policy's edits: the gateway owns the trace context it sends.
            let port = if target.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            };
            let resend = retries.tried.len() as u32;
            opts.traceparent = t.attempt(
                upstream_req.headers_mut(),
                &method,
                &target.authority,
                port,
                resend,
            );
        }
        let client_ends = retries.deadlines.client_ends(opts.timeout);
        if let Some(d) = retries.deadlines.first() {
            let left = d.saturating_duration_since(clock::now());
            if left.is_zero() {
                return ex.error(504, "the upstream did not answer in time");
            }
            opts.timeout = opts.timeout.min(left);
        }

        // An HTTP/2 stream streaming a body still arriving to an HTTP/1.1 upstream holds a
        // connection of its own: a place among its connection's first (`UploadSlots`).
        let uploads = match &streamed {
            Some(_)
                if !websocket
                    && target.protocol == crate::upstream::Protocol::Http1
                    && ex.version == actix_web::http::Version::HTTP_2 =>
            {
                req.extensions().get::<UploadSlots>().cloned()
            }
            _ => None,
        };
        if let (Some(slots), Some(stats)) = (uploads, &streamed)
            && !upload_slot(&slots, stats)
        {
            // No place: the body is read whole first, as nginx reads request bodies, within
            // the worker's `max_buffered_bodies`; no upstream connection waits for it.
            if let Err(resp) =
                cold(read_upload(&mut ex, snap, state, upstream_req.body_mut())).await
            {
                return resp;
            }
        }
        ex.in_flight = Some(target.state.begin());
        // Read again: routing, auth and the policy ran since the poll's first reading.
        let sent_at = clock::fresh();
        opts.started = sent_at;
        let sent = if websocket {
            // Boxed: only WebSocket handshakes pay for the hyper handshake's future.
            cold(state.pool.send_upgrade(target, upstream_req, &opts)).await
        } else {
            state.pool.send(target, upstream_req, &opts).await
        };
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if let Some(t) = &ex.trace {
                    t.attempt_done(Some(status), None);
                }
                upstream.record_response(index, status);
                let head = clock::fresh()
                    .saturating_duration_since(sent_at)
                    .as_secs_f64();
                state
                    .recorder
                    .attempt(&upstream, index, Some((status, head)));
                let reason = RetryReason::Status(status);
                // A switched connection is never sent again (retries name only 5xx statuses
                // today; this keeps it so if that changes).
                let allowed = may_resend && body.can_resend() && status != 101;
                if retries
                    .again(&ex, state, &upstream, index, reason, allowed)
                    .await
                {
                    continue;
                }
                return match client_response(
                    ex,
                    req,
                    state,
                    snap,
                    route,
                    plan,
                    resp,
                    tunnel_in.take(),
                ) {
                    Relay::Now(r) => r,
                    // Boxed: only responses whose body a plugin reads pay for this future.
                    Relay::ThroughPlugins(r) => cold(r.send()).await,
                };
            }
            Err(failure) => {
                ex.in_flight = None;
                let timed_out = matches!(failure.error, ForwardError::Timeout(_));
                if timed_out && streamed.as_ref().is_some_and(|b| b.awaits_client()) {
                    // The exchange's own end came while the client was still sending its
                    // body: the client was slow, the target is not to blame.
                    return body_timeout(&ex, state);
                }
                if client_ends && timed_out {
                    // The client's own deadline ended the attempt: it has given up, so no
                    // retry, and the target is not to blame (a client choosing a short
                    // `grpc-timeout` must not be able to eject it).
                    if let Some(t) = &ex.trace {
                        t.attempt_done(None, Some("deadline"));
                    }
                    return ex.error(
                        504,
                        "the upstream did not answer within the client's deadline",
                    );
                }
                let attempt = retries.tried.len() + 1;
                let failed =
                    match attempt_failed(&ex, state, route, &upstream, index, attempt, failure) {
                        Ok(f) => f,
                        Err(resp) => return resp,
                    };
                // A request handed back was never sent, and one an HTTP/2 upstream refused
                // unprocessed was never acted on: like a connect failure, whatever the method.
                let unsent =
                    failed.request.is_some() || matches!(failed.error, ForwardError::Refused(_));
                if let (Some(r), Outgoing::Once(slot)) = (failed.request, &mut body) {
                    *slot = Some((*r).into_body());
                }
                let allowed = (unsent || may_resend) && body.can_resend();
                if retries
                    .again(&ex, state, &upstream, index, failed.reason, allowed)
                    .await
                {
                    continue;
                }
                let message = match &failed.error {
                    ForwardError::Timeout(_) => "the upstream did not answer in time",
                    ForwardError::StreamReset(_) | ForwardError::Refused(_) => {
                        "the upstream refused the request"
                    }
                    ForwardError::Invalid(_) => "the upstream sent an invalid response",
                    ForwardError::Local(_) => "the gateway could not open a connection",
                    _ => "the upstream could not be reached",
                };
                return ex.error(failed.error.status(), message);
            }
        }
    }
}

/// The request body as the attempts will send it: none (`has_body`: [`has_body`]); read whole
/// first, when the request may be sent again and its declared length (already checked against
/// the route's limit) is within `replay_limit` (counted against the worker's cap before a byte
/// is read); or streamed from the client by the first attempt, sent once. `Err` is the answer
/// when the body is refused or cannot be read. `payload` is taken only once it is read: refused
/// unread, it stays with the handler.
#[allow(clippy::too_many_arguments)]
async fn outgoing_body(
    ex: &mut Exchange,
    snap: &Snapshot,
    payload: &mut Option<Payload>,
    state: &WorkerState,
    route: &Route,
    declared_len: Option<u64>,
    has_body: bool,
    replay_limit: Option<u64>,
) -> Result<Outgoing, HttpResponse> {
    if !has_body {
        // Nothing to read (an HTTP/2 stream ended with its headers): dropped here, as read.
        payload.take();
        return Ok(Outgoing::Empty);
    }
    let Some(expected) = declared_len.filter(|&n| replay_limit.is_some_and(|l| n <= l)) else {
        // A gRPC call's messages are held to the limit one by one: a stream may go on for
        // as long as the call does.
        let limit = if ex.grpc {
            BodyLimit::GrpcMessage(route.max_body_size)
        } else {
            BodyLimit::Total(route.max_body_size)
        };
        return Ok(Outgoing::Unread {
            len: declared_len,
            limit,
            idle: snap.limits.body_idle_timeout,
        });
    };
    // Held whole so that a retry can send it again.
    let cap = snap.limits.max_buffered_bodies;
    match Buffered::reserve(&state.buffered, expected, cap) {
        Some(b) => ex.buffered = Some(b),
        None => return Err(ex.error(503, TOO_MANY_BODIES)),
    }
    let stats = Rc::new(BodyStats::default());
    ex.body = Some(Rc::clone(&stats));
    let mut payload = payload.take().unwrap_or(Payload::None);
    // Read before any attempt, so the client gets the route's timeout to send it (a streamed
    // body by the body idle timeout between pieces: `BodyStats::deadline`).
    let idle = snap.limits.body_idle_timeout;
    let read = read_request_body(&mut payload, route.max_body_size, expected, idle, &stats);
    match tokio::time::timeout(route.timeout, read).await {
        Ok(Ok(b)) => Ok(Outgoing::Replayable(b)),
        Ok(Err(BodyError::TooLarge { .. })) => {
            Err(ex.error(413, "request body is larger than this route accepts"))
        }
        Ok(Err(BodyError::Client(_) | BodyError::Stopped)) => Err(client_body_failed(ex)),
        Ok(Err(BodyError::Idle(_))) | Err(_) => Err(body_timeout(ex, state)),
    }
}

/// Whether the request has a body to send (a declared length over 0, chunked, or an HTTP/2
/// stream that did not end with its headers).
fn has_body(req: &Request, transfer_encoding: bool, declared_len: Option<u64>) -> bool {
    declared_len.is_some_and(|n| n > 0)
        || transfer_encoding
        || (declared_len.is_none()
            && req.version() == actix_web::http::Version::HTTP_2
            && req
                .extensions()
                .contains::<crate::server::h2::StreamedBody>())
}

#[cfg(test)]
mod tests {
    use super::Buffered;
    use std::rc::Rc;

    #[test]
    fn buffered_shares_grow_within_the_cap_shrink_freely_and_are_given_back_on_drop() {
        let total = Rc::new(std::cell::Cell::new(0));
        let mut a = Buffered::reserve(&total, 0, 100).unwrap();
        let b = Buffered::reserve(&total, 30, 100).unwrap();
        assert!(a.resize(70, 100));
        assert_eq!(total.get(), 100);
        // One byte more for either is past the cap, and changes nothing.
        assert!(!a.resize(71, 100));
        assert!(Buffered::reserve(&total, 1, 100).is_none());
        assert_eq!((a.bytes, total.get()), (70, 100));
        // Shrinking always works, even past a cap lowered meanwhile.
        assert!(a.resize(20, 10));
        assert_eq!(total.get(), 50);
        drop(b);
        assert_eq!(total.get(), 20);
        drop(a);
        assert_eq!(total.get(), 0);
    }
}
