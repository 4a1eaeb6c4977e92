//! One attempt: its deadlines, the upstream request, the HTTP/2 upload places, what a failed
//! attempt means and the retry rules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::Request;
use actix_web::http::header as ax;
use actix_web::{HttpMessage, HttpResponse};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;

use super::errors::{body_timeout, client_body_failed, overloaded};
use super::exchange::Exchange;
use super::forward::{Buffered, TOO_MANY_BODIES};
use super::{AX_GRPC_TIMEOUT, plugin_body};

use crate::decide;
use crate::proxy::body::{BodyError, BodyStats, ProxyBody};
use crate::proxy::headers::{Forwarding, HeaderList, HeaderSink};
use crate::proxy::pool::{OutRequest, SendFailure};
use crate::proxy::{ForwardError, websocket};
use crate::server::h2::UploadSlots;
use crate::server::{WorkerState, edge};
use crate::snapshot::{Route, Snapshot};
use crate::upstream::{HashKey, RetryPolicy, RetryReason, Target, Upstream, hash_bytes};
use crate::util::clock;

/// Whether the client's `TE` header lists `trailers`.
fn accepts_trailers(req: &Request) -> bool {
    req.headers().get_all(ax::TE).any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        })
    })
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), gRPC over HTTP/2 spec.
fn grpc_timeout(v: &[u8]) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When the whole exchange must be over: the route's or upstream's total timeout, and a gRPC
/// client's own deadline (`grpc-timeout`; past it the client has given up).
pub(super) fn deadlines(
    route: &Route,
    upstream: &Upstream,
    req: &Request,
    grpc: bool,
) -> Deadlines {
    let own = route
        .total_timeout
        .or(upstream.total_timeout)
        .map(|t| clock::now() + t);
    let client = req
        .headers()
        .get(&AX_GRPC_TIMEOUT)
        .filter(|_| grpc)
        .and_then(|v| grpc_timeout(v.as_bytes()))
        .map(|t| clock::now() + t);
    Deadlines { own, client }
}

/// The deadlines of one exchange ([`deadlines`]).
#[derive(Clone, Copy)]
pub(super) struct Deadlines {
    /// The config's (`total_timeout`).
    own: Option<Instant>,
    /// The client's (`grpc-timeout`).
    client: Option<Instant>,
}

impl Deadlines {
    /// The sooner of the two.
    pub(super) fn first(self) -> Option<Instant> {
        match (self.own, self.client) {
            (Some(o), Some(c)) => Some(o.min(c)),
            (o, c) => o.or(c),
        }
    }

    /// Whether the client's deadline, not the config, is what ends an attempt that may take
    /// `timeout` from now: a timeout then says nothing about the target. Reads the clock only
    /// for a request with a deadline of its own (gRPC).
    pub(super) fn client_ends(self, timeout: Duration) -> bool {
        self.client
            .is_some_and(|c| c <= clock::now() + timeout && self.own.is_none_or(|o| c <= o))
    }
}

/// One attempt's request to `target`: the forwarding header rules, then the plugins' and the
/// policy's edits, then what the protocol needs (`TE: trailers` for gRPC over HTTP/2, the
/// upgrade headers of a WebSocket handshake). When nothing but the plugins edits the fields
/// and the request goes out on the gateway's own HTTP/1.1 client, they are a list written as
/// it is (the request's own map is then empty). `Err` names a client header that cannot be
/// forwarded (400).
#[allow(clippy::too_many_arguments)]
pub(super) fn attempt_request(
    req: &Request,
    ex: &Exchange,
    snap: &Snapshot,
    route: &Route,
    target: &Target,
    plan: &decide::Forward,
    websocket: bool,
    (method, uri): (&http::Method, &http::Uri),
    body: ProxyBody,
) -> Result<(OutRequest, Option<HeaderList>), String> {
    let mut upstream_req = Box::new(http::Request::new(body));
    *upstream_req.method_mut() = method.clone();
    *upstream_req.uri_mut() = uri.clone();
    let as_is = target.protocol == crate::upstream::Protocol::Http1
        && !matches!(upstream_req.body(), ProxyBody::Channel { .. })
        && plan.policy.is_none()
        && ex.plugin_stop.is_none()
        && ex.trace.is_none()
        && !websocket;
    let room = req.headers().len() + crate::proxy::headers::GATEWAY_FIELDS;
    if as_is {
        let mut list = upstream_headers(
            req,
            ex,
            snap,
            route,
            target,
            HeaderList::with_capacity(room),
        )?;
        if let Some(p) = &plan.plugins {
            p.apply_edits(&mut list);
        }
        return Ok((upstream_req, Some(list)));
    }
    let mut headers = upstream_headers(
        req,
        ex,
        snap,
        route,
        target,
        http::HeaderMap::with_capacity(room),
    )?;
    if target.protocol == crate::upstream::Protocol::Http2 && accepts_trailers(req) {
        // The one `TE` value that crosses a proxy; HTTP/2 gRPC servers require it.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // In the order they ran: the policy's edits, then the plugins' (which saw the policy's).
    if let Some(run) = &plan.policy {
        run.apply_edits(&mut headers);
    }
    if let Some(p) = &plan.plugins {
        p.apply_edits(&mut headers);
    }
    if ex.plugin_stop.is_some() {
        // A plugin may have changed the body: its length is the one sent whole, or none
        // (streamed chunked).
        headers.remove(header::CONTENT_LENGTH);
        if let ProxyBody::Full(Some(b)) = upstream_req.body() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
        }
    }
    if websocket {
        websocket::set_upgrade_headers(&mut headers);
    }
    *upstream_req.headers_mut() = headers;
    Ok((upstream_req, None))
}

/// A failed attempt that another attempt may follow.
pub(super) struct Failed {
    pub(super) error: ForwardError,
    pub(super) reason: RetryReason,
    /// The request, when it was handed back unsent.
    pub(super) request: Option<OutRequest>,
}

/// Classifies a failed attempt: a failure of the client's side (body too large, too slow,
/// malformed) or the upstream's overload is answered at once (`Err`); an upstream failure is
/// recorded against the target, logged and counted, and returned for the retry rules.
// The failure path only; the answer is moved once.
#[allow(clippy::result_large_err)]
pub(super) fn attempt_failed(
    ex: &Exchange,
    state: &WorkerState,
    route: &Route,
    upstream: &Arc<Upstream>,
    index: usize,
    attempt: usize,
    failure: SendFailure,
) -> Result<Failed, HttpResponse> {
    let SendFailure { error, request } = failure;
    if let Some(t) = &ex.trace {
        t.attempt_done(None, Some(error.kind()));
    }
    if let Some(stop) = ex.plugin_stop.as_ref().and_then(|s| s.borrow_mut().take()) {
        // A plugin stopped the request body on its way, or what it held went over the worker's
        // cap: that answer, not the upstream's failure.
        return Err(plugin_body::halted(ex, &stop));
    }
    let too_large = ex.body.as_ref().is_some_and(|b| b.too_large.get());
    match &error {
        ForwardError::BodyTooLarge => {}
        ForwardError::ClientBody(_) | ForwardError::Upstream(_) if too_large => {}
        ForwardError::ClientBody(_) if ex.body.as_ref().is_some_and(|b| b.idle.get()) => {
            return Err(body_timeout(ex, state));
        }
        ForwardError::ClientBody(_) => return Err(client_body_failed(ex)),
        ForwardError::Overloaded(o) => return Err(overloaded(ex, state, upstream, *o)),
        _ => {
            // A stream the upstream reset on a connection it kept is an answer to this request,
            // not a sign the target is down, and the gateway's own shortage of sockets is not
            // the target's: neither counts towards ejecting it.
            if !matches!(
                error,
                ForwardError::StreamReset(_) | ForwardError::Refused(_) | ForwardError::Local(_)
            ) {
                upstream.record_failure(index, &error);
            }
            state.recorder.attempt(upstream, index, None);
            let reason = match &error {
                _ if request.is_some() => RetryReason::ConnectFailure,
                ForwardError::Connect(_)
                | ForwardError::Tls(_)
                | ForwardError::Local(_)
                | ForwardError::Refused(_) => RetryReason::ConnectFailure,
                ForwardError::Timeout(_) => RetryReason::Timeout,
                _ => RetryReason::Reset,
            };
            tracing::warn!(
                request_id = ex.request_id.to_str().unwrap_or(""),
                route = route.name.as_str(),
                upstream = upstream.name.as_str(),
                upstream_target = upstream.targets[index].url.as_str(),
                attempt,
                kind = error.kind(),
                error = %error,
                "upstream request failed"
            );
            // The error path only: a labelled lookup is fine here.
            state
                .recorder
                .metrics()
                .upstream_errors
                .with_label_values(&[upstream.name.as_str(), error.kind()])
                .inc();
            return Ok(Failed {
                error,
                reason,
                request,
            });
        }
    }
    Err(ex.error(413, "request body is larger than this route accepts"))
}

/// The retry side of one request: its rules, the targets tried so far, its deadlines.
pub(super) struct Retries {
    pub(super) policy: RetryPolicy,
    pub(super) tried: Vec<usize>,
    pub(super) deadlines: Deadlines,
}

impl Retries {
    /// Whether another attempt follows the failure of target `index` for `reason`. `allowed`
    /// says whether this request may be sent again at all (method, body). Checks the rules, the
    /// attempts left, the deadline and the upstream's budget; logs and counts the retry, then
    /// waits its backoff.
    pub(super) async fn again(
        &mut self,
        ex: &Exchange,
        state: &WorkerState,
        upstream: &Upstream,
        index: usize,
        reason: RetryReason,
        allowed: bool,
    ) -> bool {
        let retry = &self.policy;
        if !allowed || !retry.retries_on(reason) || self.tried.len() >= retry.attempts as usize {
            return false;
        }
        let retry_no = self.tried.len() as u32 + 1;
        let wait = retry.backoff_for(retry_no);
        if self
            .deadlines
            .first()
            .is_some_and(|d| Instant::now() + wait >= d)
        {
            return false;
        }
        if !upstream.shared.withdraw(upstream.budget.min_per_second) {
            tracing::info!(
                request_id = ex.request_id.to_str().unwrap_or(""),
                upstream = upstream.name.as_str(),
                reason = reason.label().as_ref(),
                "not retried: the upstream's retry budget is spent"
            );
            return false;
        }
        self.tried.push(index);
        let label = reason.label();
        tracing::info!(
            request_id = ex.request_id.to_str().unwrap_or(""),
            upstream = upstream.name.as_str(),
            upstream_target = upstream.targets.get(index).map_or("", |t| t.url.as_str()),
            attempt = retry_no + 1,
            reason = label.as_ref(),
            backoff_ms = wait.as_secs_f64() * 1000.0,
            "retrying upstream request"
        );
        state
            .recorder
            .metrics()
            .upstream_retries
            .with_label_values(&[upstream.name.as_str(), label.as_ref()])
            .inc();
        tokio::time::sleep(wait).await;
        true
    }
}

/// The consistent-hash key of this request, if it has one.
pub(super) fn request_hash(
    key: &HashKey,
    req: &Request,
    ex: &Exchange,
    snap: &Snapshot,
    route: &Route,
) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match crate::util::canonical_ip(ex.client_ip) {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
        HashKey::Path => Some(hash_bytes(ex.path.as_bytes())),
        // Read as a rate-limit key is: a client's copy of a header the gateway sets never
        // picks the target, and one sent on several lines is one value.
        HashKey::Header(name) => edge::KeySource {
            req,
            inbound: &crate::proxy::headers::Inbound::for_route(snap, route),
            verified: &ex.auth_headers,
            client_cert: ex.client_cert(),
        }
        .header_value(name.as_str())
        .map(|v| hash_bytes(&v)),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(ax::COOKIE)
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| crate::filters::jwt::cookie(c, name))
            .map(|v| hash_bytes(v.as_bytes())),
    }
}

pub(super) fn convert_method(m: &actix_web::http::Method) -> http::Method {
    use actix_web::http::Method as A;
    match *m {
        A::GET => http::Method::GET,
        A::POST => http::Method::POST,
        A::PUT => http::Method::PUT,
        A::DELETE => http::Method::DELETE,
        A::HEAD => http::Method::HEAD,
        A::OPTIONS => http::Method::OPTIONS,
        A::PATCH => http::Method::PATCH,
        A::TRACE => http::Method::TRACE,
        A::CONNECT => http::Method::CONNECT,
        _ => http::Method::from_bytes(m.as_str().as_bytes()).unwrap_or(http::Method::GET),
    }
}

/// Request headers for the upstream, into `out` (see
/// [`crate::proxy::headers::upstream_headers`]).
fn upstream_headers<S: HeaderSink>(
    req: &Request,
    ex: &Exchange,
    snap: &Snapshot,
    route: &Route,
    target: &Target,
    out: S,
) -> Result<S, String> {
    let peer = req.peer_addr().map(|a| a.ip());
    let h = req.headers();
    let tls = ex.conn.as_ref().and_then(|c| c.tls.as_ref());
    // The trace context's `traceparent` is written by the connection, not kept here.
    crate::proxy::headers::forwarded_headers(
        || h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        out,
        &Forwarding {
            peer,
            trusted: peer.is_some_and(|p| snap.client_ip.is_trusted(p)),
            request_id: &ex.request_id,
            upstream_host: &route.upstream_host,
            target_authority: target.authority.as_str(),
            inbound: crate::proxy::headers::Inbound::for_route(snap, route),
            drop_token: ex.drop_token.as_ref(),
            auth_headers: &ex.auth_headers,
            rules: &route.request_headers,
            https: tls.is_some(),
            client_cert: ex.client_cert(),
        },
    )
}

/// The upstream request target, in origin form (`/path?query`): the connection already names
/// the target, and HTTP/1.1 servers expect origin form.
pub(super) fn upstream_uri(mut path: String, query: Option<&str>) -> Option<http::Uri> {
    if let Some(q) = query {
        path.reserve_exact(1 + q.len());
        path.push('?');
        path.push_str(q);
    }
    // The string's own buffer becomes the URI's: no copy.
    let pq = PathAndQuery::from_maybe_shared(Bytes::from(path)).ok()?;
    Some(http::Uri::from(pq))
}

/// Takes a place among the HTTP/2 connection's streamed uploads for the body `stats` follows,
/// if one is free; the place is the body's until its reader stops. A body whose reader stopped
/// (it has all arrived, or failed) needs none, nor one that has its place already.
pub(super) fn upload_slot(slots: &UploadSlots, stats: &BodyStats) -> bool {
    if stats.reader_done.get() || stats.upload_slot.borrow().is_some() {
        return true;
    }
    match Arc::clone(&slots.0).try_acquire_owned() {
        Ok(p) => {
            *stats.upload_slot.borrow_mut() = Some(p);
            true
        }
        Err(_) => false,
    }
}

/// Reads the rest of a streamed request body (`body`, a [`ProxyBody::Channel`]) whole, and
/// makes it the body the attempt sends: for an HTTP/2 stream that found no place among its
/// connection's streamed uploads ([`UploadSlots`]). What it holds counts against the worker's
/// `max_buffered_bodies` as it grows (over it: 503); the body's reader keeps the route's size
/// limit (413) and the body idle timeout (408). Waiting for waiting streams instead would
/// deadlock: their unread data fills the connection's flow-control window, and the streams
/// with a place could then receive nothing more.
pub(super) async fn read_upload(
    ex: &mut Exchange,
    snap: &Snapshot,
    state: &WorkerState,
    body: &mut ProxyBody,
) -> Result<(), HttpResponse> {
    let ProxyBody::Channel { rx, .. } = body else {
        return Ok(());
    };
    let cap = snap.limits.max_buffered_bodies;
    let mut held = ex
        .buffered
        .take()
        .unwrap_or_else(|| Buffered::empty(&state.buffered));
    let mut buf = bytes::BytesMut::new();
    let failed = loop {
        match rx.recv().await {
            None => break None,
            Some(Ok(piece)) => {
                if !held.resize(held.bytes + piece.len() as u64, cap) {
                    break Some(ex.error(503, TOO_MANY_BODIES));
                }
                buf.extend_from_slice(&piece);
            }
            Some(Err(BodyError::TooLarge { .. })) => {
                break Some(ex.error(413, "request body is larger than this route accepts"));
            }
            Some(Err(BodyError::Idle(_))) => break Some(body_timeout(ex, state)),
            Some(Err(BodyError::Client(_) | BodyError::Stopped)) => {
                break Some(client_body_failed(ex));
            }
        }
    };
    ex.buffered = Some(held);
    if let Some(resp) = failed {
        return Err(resp);
    }
    *body = ProxyBody::Full(Some(buf.freeze()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{grpc_timeout, upstream_uri};
    use std::time::Duration;

    #[test]
    fn the_upstream_target_is_the_path_and_query_or_nothing() {
        let uri = upstream_uri("/a/b".to_owned(), Some("x=1&y")).unwrap();
        assert_eq!(uri.to_string(), "/a/b?x=1&y");
        assert_eq!(upstream_uri("/".to_owned(), None).unwrap().to_string(), "/");
        assert_eq!(
            upstream_uri("/p".to_owned(), Some("")).unwrap().to_string(),
            "/p?"
        );
        for bad in ["/a b", "/a\r\nHost: x", "/a\0"] {
            assert!(upstream_uri(bad.to_owned(), None).is_none(), "{bad:?}");
        }
        assert!(upstream_uri("/a".to_owned(), Some("q=\r\n")).is_none());
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_the_rest() {
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(grpc_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
