//! The proxy handler: one request from accept to response.
//!
//! Phases, in order (DESIGN.md, "The request path"), each a function of this module or of the
//! submodule of its phase: `admission` (request checks, Host, request id), `forward` (the
//! attempt loop and the outgoing body), `attempt` (one attempt's request and failure),
//! `response` (the client response) and `errors` (the gateway's own answers):
//! ```text
//! handle:        load snapshot ─► request checks ─► normalise path ─► CORS preflight
//!                ─► match host+method+path ─► auth ─► rate limit ─► policy (decide::request)
//! answer:        respond directly or deny                       ┐ or
//! forward:       WebSocket handshake, body limits ─► outgoing_body (read whole for retries, or
//!                stream; or plugin_body::request when a WASM plugin reads it)
//!                per attempt: pick target ─► attempt_request (header rules, policy edits)
//!                ─► send ─► client_response (response rules, stream back, access log when the
//!                body ends; plugin_body::Response when a plugin reads it) or attempt_failed
//!                ─► Retries::again
//! ```
//! The snapshot is loaded once and kept until the response head is out, so a config swap never
//! changes the rules under a request in flight. The long part of an exchange (a streamed body, a
//! WebSocket tunnel) keeps only its route's record and upstream ([`exchange::Exchange::release`]):
//! tunnels open for days must not keep every config they outlived.

use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;

use actix_http::{Payload, Request};
use actix_web::body::BodySize;
use actix_web::http::{StatusCode, header as ax};
use actix_web::{HttpMessage, HttpResponse, web};
use http::header::{HeaderName, HeaderValue};

use super::listener::{ConnInfo, ConnState};
use super::{WorkerState, edge};
use admission::{MAX_REQUEST_TARGET, check_request, content_length, host_of, is_grpc};
use errors::status_code;
use exchange::{Config, Exchange};
use forward::forward;

use crate::decide::{self, Incoming, Plan, Routed};
use crate::policy::ClientHeaders;
use crate::proxy::headers::{ClientCert, client_ip, valid_request_id};
use crate::router::{PathError, normalize_path_with};
use crate::telemetry::trace::RequestTrace;
use crate::util::{clock, cold};
use crate::wire::StaticResponse;

mod admission;
mod attempt;
mod errors;
mod exchange;
mod forward;
mod plugin_body;
mod response;

pub(super) use admission::host_part;
pub(crate) use admission::new_request_id;

/// Entry point for every request on the proxy listener. `conn`: the connection's facts;
/// `conn_state`: what an HTTP/1.1 connection shares with its requests.
pub(crate) async fn handle(
    req: Request,
    payload: Payload,
    state: web::Data<WorkerState>,
    conn: Option<Rc<ConnInfo>>,
    conn_state: Option<Rc<ConnState>>,
) -> HttpResponse {
    // The requests pipelined behind one with a body stay unread until its answer is out, also
    // while the body is read after an answer given without forwarding: one of them saying
    // `Connection: close` would otherwise close the connection after this answer.
    let _hold = match payload {
        Payload::None => None,
        _ => conn_state.as_ref().map(ConnState::hold),
    };
    let mut body = Some(payload);
    let resp = 'answer: {
        let (req, state) = (&req, &state);
        let started = clock::now();
        let snapshot = state.store.load();
        let heads = req.headers();
        let (request_id, reply_id) = heads
            .get(&AX_REQUEST_ID)
            .filter(|v| valid_request_id(v.as_bytes()))
            .and_then(|v| Some((HeaderValue::from_bytes(v.as_bytes()).ok()?, v.clone())))
            .unwrap_or_else(new_request_id);
        let peer = req
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        // Looked up only if read: only from a trusted proxy.
        let forwarded_for = std::iter::once(())
            .flat_map(|()| heads.get_all(&AX_FORWARDED_FOR))
            .map(|v| v.as_bytes());
        let client = client_ip(peer, forwarded_for, &snapshot.client_ip);
        let (host, host_check) = host_of(req);
        let trace = snapshot
            .tracing
            .as_ref()
            .map(|c| RequestTrace::start(c, req, started));
        // Boxed: the exchange (~500 bytes) is moved into the forwarding future and then into the
        // response body's completion; a pointer moves for it each time. Written into a box
        // allocated first, so that it is built there rather than on the stack and copied.
        let mut ex = Box::write(
            Box::new_uninit(),
            Exchange {
                // The handler keeps `snapshot` for deciding the request (`snap` below).
                config: Config::Whole(Arc::clone(&snapshot)),
                started,
                request_id,
                reply_id,
                client_ip: client,
                method: req.method().clone(),
                version: req.version(),
                host,
                path: req.uri().path().to_owned(),
                route: None,
                upstream: None,
                target: None,
                body: None,
                log: state.access_log,
                state: state.clone(),
                extra: Vec::new(),
                rate_limit: None,
                cors: false,
                auth_headers: Vec::new(),
                drop_token: None,
                in_flight: None,
                slot: None,
                buffered: None,
                busy: conn_state
                    .as_ref()
                    .map(|c| c.begin(matches!(body, None | Some(Payload::None)) && !req.upgrade())),
                scheme: conn.as_ref().map_or("http", |c| c.scheme()),
                conn,
                grpc: is_grpc(req),
                grpc_status: None,
                // Only the HTTP/2 server sets it: no extensions lookup for the others.
                h2: if req.version() == actix_web::http::Version::HTTP_2 {
                    req.extensions().get::<super::h2::StreamExt>().cloned()
                } else {
                    None
                },
                trace,
                plugin_stop: None,
                recorded: std::cell::Cell::new(false),
            },
        );
        state.recorder.began();
        let e = &mut *ex;
        if let Some(busy) = e.busy.as_ref().filter(|b| b.body_checked()) {
            busy.share_request_id(&mut e.request_id, &mut e.reply_id);
        }

        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_REQUEST_TARGET {
            break 'answer ex.error(414, "the request target is too long");
        }
        let framing = match (check_request(req), host_check) {
            (Ok(f), Ok(())) => f,
            (Err(why), _) | (Ok(_), Err(why)) => break 'answer ex.error(400, why),
        };
        let path = match normalize_path_with(req.uri().path(), snapshot.paths) {
            Ok(p) => p,
            Err(PathError::NotOriginForm)
                if req.method() == actix_web::http::Method::OPTIONS && req.uri() == "*" =>
            {
                ex.emit(200, 0, Ok(()));
                break 'answer HttpResponse::Ok()
                    .insert_header(("x-request-id", ex.request_id.as_bytes()))
                    .finish();
            }
            Err(e) => break 'answer ex.error(400, &e.to_string()),
        };
        if let std::borrow::Cow::Owned(p) = &path {
            // Otherwise the path is the client's, already there.
            ex.path.clone_from(p);
        }
        let snap = snapshot;
        // The client's query without the token, when auth took it out.
        let mut query_without_token: Option<Option<String>> = None;
        let mut incoming = Incoming {
            method: req.method().as_str(),
            host: &ex.host,
            path: &path,
            query: req.uri().query(),
            client_ip: ex.client_ip,
            // Filled by the auth filter with the verified claims.
            claims: None,
            trace_id: ex.trace.as_ref().map(|t| t.trace_id),
        };
        // A CORS preflight is routed by the method it asks about, and answered here when that
        // route has CORS; otherwise it is an ordinary OPTIONS request.
        if let Some(asked) = edge::preflight_method(req) {
            let probe = Incoming {
                method: asked,
                host: &ex.host,
                path: &path,
                query: None,
                client_ip: ex.client_ip,
                claims: None,
                trace_id: None,
            };
            if let Routed::Matched(pm) = decide::route(&snap, &probe)
                && let Some(cors) = snap.routes.get(pm.route).and_then(|r| r.cors.as_ref())
            {
                ex.route = Some(pm.route);
                let (status, resp) = edge::preflight(cors, req, asked, &ex.request_id);
                ex.emit(status, 0, Ok(()));
                break 'answer resp;
            }
        }
        let m = match decide::route(&snap, &incoming) {
            Routed::Matched(m) => m,
            Routed::NoRoute => break 'answer ex.error(404, "no route matches this request"),
            Routed::MethodNotAllowed(allowed) => {
                // The route whose path it is (the one the first allowed method reaches), named
                // in the access line and the metrics.
                ex.route = allowed
                    .first()
                    .and_then(|m| snap.router.lookup(incoming.host, m, incoming.path))
                    .map(|m| m.route);
                let mut resp = ex.error(405, "method not allowed on this route");
                if let Ok(v) = ax::HeaderValue::from_str(&allowed.join(", ")) {
                    resp.headers_mut().insert(ax::ALLOW, v);
                }
                break 'answer resp;
            }
        };
        ex.route = Some(m.route);
        let Some(route) = snap.routes.get(m.route) else {
            break 'answer ex.error(500, "internal routing error");
        };
        if let Some(t) = &ex.trace {
            t.decide(Some(&route.tracing), Some(req));
        }
        // Whichever listener the request came in on: the Host of an mTLS-only route sent to a
        // plain listener finds it too.
        if route.require_client_cert && ex.client_cert().is_none() {
            break 'answer ex.error(403, "this route requires a verified client certificate");
        }
        // The client headers that exist from here on, for auth, the policy and the upstream.
        let inbound = crate::proxy::headers::Inbound::for_route(&snap, route);
        if let Some(cors) = &route.cors {
            ex.extra = edge::cors_headers(cors, req);
            ex.cors = true;
        }
        if let Some(auth) = &route.auth {
            match edge::authenticate(auth, req, inbound).await {
                Ok(Some(verified)) => {
                    ex.auth_headers = verified.headers;
                    ex.drop_token = verified.drop_token;
                    incoming.claims = Some(verified.claims);
                    query_without_token = verified.query;
                    if let Some(q) = &query_without_token {
                        incoming.query = q.as_deref();
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(t) = &ex.trace {
                        let provider = auth.provider.name.as_str();
                        let attrs = [
                            ("rustygate.auth.provider", provider),
                            ("rustygate.reason", e.reason()),
                        ];
                        t.event("auth.denied", &attrs);
                    }
                    tracing::info!(
                        request_id = ex.request_id.to_str().unwrap_or(""),
                        route = route.name.as_str(),
                        provider = auth.provider.name.as_str(),
                        reason = e.reason(),
                        "authentication failed"
                    );
                    state
                        .recorder
                        .metrics()
                        .auth_failures
                        .with_label_values(&[route.name.as_str(), e.reason()])
                        .inc();
                    let mut resp = ex.error(e.status(), e.message());
                    if let Ok(v) = ax::HeaderValue::from_bytes(e.www_authenticate().as_bytes()) {
                        resp.headers_mut().insert(ax::WWW_AUTHENTICATE, v);
                    }
                    break 'answer resp;
                }
            }
        }
        // Allowed: the `RateLimit-*` numbers go on the response, whatever it is.
        if let Err(limited) = state
            .limiters
            .check(
                &snap,
                m.route,
                route,
                edge::KeySource {
                    req,
                    inbound: &inbound,
                    verified: &ex.auth_headers,
                    client_cert: ex.client_cert(),
                },
                ex.client_ip,
                incoming.claims.as_ref(),
                &ex.request_id,
            )
            .await
            .map(|rate| ex.rate_limit = rate)
        {
            state
                .recorder
                .metrics()
                .rate_limited
                .with_label_values(&[route.name.as_str()])
                .inc();
            if let Some(t) = &ex.trace {
                t.event(
                    "rate_limit.denied",
                    &[("rustygate.route", route.name.as_str())],
                );
            }
            if ex.grpc {
                // Keeps Retry-After and the RateLimit headers on the gRPC answer.
                let mut resp = ex.error(429, "rate limit exceeded");
                for (n, v) in limited.headers() {
                    if n.as_str().starts_with("ratelimit") || n == ax::RETRY_AFTER {
                        resp.headers_mut().insert(n.clone(), v.clone());
                    }
                }
                break 'answer resp;
            }
            ex.emit(429, 0, Ok(()));
            break 'answer ex.with_extra(limited);
        }
        let (_, mut plan) = decide::request(&snap, &m, &incoming, || {
            client_headers(req, inbound, ex.client_cert())
        });
        if let (Plan::Forward(f), Some(q)) = (&mut plan, query_without_token)
            && f.query.is_none()
        {
            f.query = Some(q);
        }
        // The plan stays here and `forward` borrows it: moved into its future, its bytes would be
        // copied once more per request.
        // `forward` takes the body only when it reads it: one it answers without reading
        // (no healthy target, `max_requests`, too many bodies held) is dropped below.
        if let Plan::Forward(f) = &mut plan {
            break 'answer forward(ex, req, &mut body, state, &snap, route, f, framing).await;
        }
        answer(&ex, state, plan)
    };
    let resp = if req.version() == actix_web::http::Version::HTTP_10 {
        for_http10(resp)
    } else {
        resp
    };
    match body {
        // Answered without forwarding: the body was not read.
        // Boxed: its timer would otherwise make every request's future larger.
        Some(unread) if !matches!(unread, Payload::None) => {
            cold(discard_unread(&req, unread, &state, resp)).await
        }
        _ => resp,
    }
}

/// An HTTP/1.0 client knows no chunked framing (RFC 9112 §6.1: never sent to it): a body of
/// unknown length is written as it comes and ended by closing the connection, also when the
/// client asked to keep it alive.
fn for_http10(mut resp: HttpResponse) -> HttpResponse {
    if matches!(
        actix_web::body::MessageBody::size(resp.body()),
        BodySize::Stream
    ) {
        let head = resp.head_mut();
        head.no_chunking(true);
        head.set_connection_type(actix_web::http::ConnectionType::Close);
    }
    resp
}

/// At most this much of a request body is read and dropped after an answer given without
/// forwarding (404, 401, 429, a policy's answer...), so that the connection carries the next
/// request instead of closing: a small body has usually arrived with its head. A longer one is
/// left unread and actix-http closes the connection after the answer, as it does when reading
/// it stops short.
const DISCARD_MAX: u64 = 64 * 1024;

/// How long the answer may wait for that body, at most (less when the body idle timeout is
/// shorter): a client still sending it then has its connection closed after the answer.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of an unread `Content-Length` body of at most [`DISCARD_MAX`]
/// bytes, within [`DISCARD_TIME`] in all, then gives the answer. Chunked bodies are left
/// to actix-http, which drains them itself once the body is dropped; a `400` closes the
/// connection (the request's framing may be what was wrong); a request with `Expect`
/// never sent its body (it was answered instead of `100 Continue`); HTTP/2 streams end alone.
async fn discard_unread(
    req: &Request,
    mut payload: Payload,
    state: &WorkerState,
    resp: HttpResponse,
) -> HttpResponse {
    use futures_util::StreamExt as _;
    let head = req.head();
    let small = head
        .headers()
        .get(ax::CONTENT_LENGTH)
        .and_then(|v| content_length(v).ok())
        .is_some_and(|n| n <= DISCARD_MAX);
    if !small
        || head.version > actix_web::http::Version::HTTP_11
        || head.connection_type() != actix_web::http::ConnectionType::KeepAlive
        || head.headers().contains_key(ax::EXPECT)
        // A request refused for its form (its framing among others) ends its connection.
        || resp.status() == StatusCode::BAD_REQUEST
        || !resp.head().keep_alive()
    {
        return resp;
    }
    let limit = DISCARD_TIME.min(state.store.load().limits.body_idle_timeout);
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = payload.next().await {
            read += chunk.len() as u64;
            if read > DISCARD_MAX {
                break;
            }
        }
    };
    // Not in time, cut short or over: the body stays unfinished and the connection closes.
    let _ = tokio::time::timeout(limit, drain).await;
    resp
}

/// A decision answered by the gateway itself (not forwarded).
fn answer(ex: &Exchange, state: &WorkerState, plan: Plan<'_>) -> HttpResponse {
    match plan {
        Plan::Respond(r) => respond(ex, &r),
        Plan::Deny { status, message } => ex.error(status, &message),
        Plan::Failed(f) => {
            if let Some(t) = &ex.trace {
                t.event("policy.failed", &[("rustygate.reason", f.reason.as_str())]);
            }
            f.log(ex.request_id.to_str().unwrap_or(""));
            state
                .recorder
                .metrics()
                .policy_errors
                .with_label_values(&[f.route.as_ref(), f.reason.as_str()])
                .inc();
            ex.error(500, "the route's policy failed")
        }
        Plan::Forward(_) => ex.error(500, "internal routing error"),
    }
}

/// The client's request headers as the policy and the WASM plugins see them (only built for
/// routes with either): those `inbound` keeps.
/// The request's headers as a policy or plugin sees them: the client's the route keeps, and
/// those set from a verified client certificate (never the client's own copies).
fn client_headers(
    req: &Request,
    inbound: crate::proxy::headers::Inbound<'_>,
    cert: Option<&ClientCert>,
) -> ClientHeaders {
    let n = req.headers().len();
    // Sized once (a filtered iterator would grow it from nothing): room for the usual request's
    // headers, and for the plugins' pseudo-headers and a usual edit, as their map reuses it.
    let mut out = ClientHeaders::with_capacity(n + 6, n * 48 + 192);
    for (name, v) in req.headers().iter() {
        if inbound.keeps(name.as_str()) {
            out.push(name.as_str(), v.as_bytes());
        }
    }
    for (name, v) in cert.iter().flat_map(|c| c.fields()) {
        out.push(name, v.as_bytes());
    }
    out
}

fn respond(ex: &Exchange, r: &StaticResponse) -> HttpResponse {
    let mut resp = HttpResponse::build(status_code(r.status));
    for (name, value) in &r.headers {
        resp.append_header((name.as_str(), value.as_bytes()));
    }
    resp.insert_header(("x-request-id", ex.request_id.as_bytes()));
    ex.emit(r.status, r.body.len() as u64, Ok(()));
    ex.with_extra(resp.body(r.body.clone()))
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
// Looked up by constant names: a name given as text is parsed on every lookup.
const AX_REQUEST_ID: ax::HeaderName = ax::HeaderName::from_static("x-request-id");
const AX_FORWARDED_FOR: ax::HeaderName = ax::HeaderName::from_static("x-forwarded-for");
const AX_FORWARDED_PROTO: ax::HeaderName = ax::HeaderName::from_static("x-forwarded-proto");
const AX_GRPC_TIMEOUT: ax::HeaderName = ax::HeaderName::from_static("grpc-timeout");
const AX_SEC_WEBSOCKET_KEY: ax::HeaderName = ax::HeaderName::from_static("sec-websocket-key");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
