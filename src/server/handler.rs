//! The proxy handler: one request from accept to response.
//!
//! Phases, in order (DESIGN.md, "The request path"), each a function here:
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
//! The snapshot is loaded once and kept for the whole exchange, so a config swap never changes
//! the rules under a request in flight.

use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{Payload, Request};
use actix_web::body::BodySize;
use actix_web::http::{StatusCode, header as ax};
use actix_web::{HttpMessage, HttpResponse, HttpResponseBuilder, web};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;

use super::h2::UploadSlots;
use super::listener::{Busy, ConnInfo, ConnState};
use super::{WorkerState, edge};
use crate::decide::{self, Incoming, Plan, ResponsePlan, Routed};
use crate::plugins::ResponseFields;
use crate::policy::ClientHeaders;
use crate::proxy::ForwardError;
use crate::proxy::body::{
    BodyError, BodyStats, Ended, OnFinish, ProxyBody, Trailers, UpstreamBody, read_request_body,
    stream_request_body,
};
use crate::proxy::headers::{
    ClientCert, Forwarding, HeaderList, HeaderSink, client_ip, connection_tokens,
    is_hop_by_hop_str, valid_request_id,
};
use crate::proxy::location;
use crate::proxy::pool::{OutRequest, SendFailure, SendOptions};
use crate::proxy::response::{HeadShape, UpstreamHead, UpstreamResponse};
use crate::proxy::websocket;
use crate::router::{PathError, RouteId, normalize_host, normalize_path_with};
use crate::snapshot::{Route, Snapshot};
use crate::telemetry::recorder::NO_ROUTE;
use crate::telemetry::trace::{RequestTrace, ServerFacts};
use crate::upstream::state::{InFlight, Overflow, Slot};
use crate::upstream::{HashKey, RetryPolicy, RetryReason, Target, Upstream, hash_bytes};
use crate::util::{clock, cold};
use crate::wire::StaticResponse;
use crate::wire::headers::actix_name;

mod plugin_body;

/// Per-request facts for the access log, emitted once when the exchange ends.
struct Exchange {
    snapshot: Arc<Snapshot>,
    started: Instant,
    request_id: HeaderValue,
    /// The same id in the client side's type, for the response.
    reply_id: ax::HeaderValue,
    client_ip: IpAddr,
    method: actix_web::http::Method,
    version: actix_web::http::Version,
    host: String,
    path: String,
    route: Option<RouteId>,
    upstream: Option<Arc<Upstream>>,
    target: Option<usize>,
    body: Option<Rc<BodyStats>>,
    log: bool,
    state: web::Data<WorkerState>,
    /// Headers the edge filters add to whatever response this request gets (CORS).
    extra: Vec<(HeaderName, HeaderValue)>,
    /// The route's rate limit's `RateLimit-*` numbers, for whatever response this request gets.
    rate_limit: Option<edge::RateHeaders>,
    /// The route answers CORS itself: the upstream's `Access-Control-*` headers are dropped,
    /// so that a browser sees one answer, the route's (not two, nor the upstream's alone).
    cors: bool,
    /// Headers from verified claims, set on the upstream request over the client's.
    auth_headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the token was found, removed before forwarding (unless configured not to).
    drop_token: Option<crate::filters::jwt::TokenPlace>,
    /// Counts this request in its target's in-flight number until the response ends.
    in_flight: Option<InFlight>,
    /// This request's place under the upstream's `max_requests`.
    slot: Option<Slot>,
    /// Bytes of this request's body held for retries, counted against the worker's cap.
    buffered: Option<Buffered>,
    /// Keeps the connection's head timeout off until this request is done (absent when
    /// served outside the proxy listener).
    busy: Option<Busy>,
    /// The connection's facts (TLS, listener), looked up once per request.
    conn: Option<Rc<ConnInfo>>,
    /// `http` or `https`, for the access log.
    scheme: &'static str,
    /// A gRPC call (`content-type: application/grpc…`): the gateway's own errors are answered
    /// the gRPC way, and the call's status is logged and counted.
    grpc: bool,
    /// The upstream's `grpc-status` response header (a trailers-only response).
    grpc_status: Option<http::HeaderValue>,
    /// Where the upstream's trailers land (HTTP/2 clients), read for `grpc-status`.
    trailers: Option<Trailers>,
    /// Trace ids and, when sampled, span facts (`[tracing]` on). Not boxed: it is small, and
    /// what only a recorded request needs is boxed inside it.
    trace: Option<RequestTrace>,
    /// Set when the request body goes through WASM plugins: why one stopped it, if one did.
    plugin_stop: Option<plugin_body::Stop>,
    /// The exchange has been recorded (metrics, access log); one that is dropped before (the
    /// client went away while it was in progress) is recorded then, as 499.
    recorded: std::cell::Cell<bool>,
}

/// The answer when a request body would take the worker past `max_buffered_bodies`.
const TOO_MANY_BODIES: &str = "the gateway is holding too many request bodies; try again";

/// A request body's share of the worker's `max_buffered_bodies` (a body read whole for
/// retries, or what a WASM plugin holds), given back on drop.
struct Buffered {
    total: Rc<std::cell::Cell<u64>>,
    bytes: u64,
}

impl Buffered {
    /// A share of nothing yet, grown by [`Buffered::resize`].
    fn empty(total: &Rc<std::cell::Cell<u64>>) -> Buffered {
        Buffered {
            total: Rc::clone(total),
            bytes: 0,
        }
    }

    fn reserve(total: &Rc<std::cell::Cell<u64>>, bytes: u64, cap: u64) -> Option<Buffered> {
        let mut b = Buffered::empty(total);
        b.resize(bytes, cap).then_some(b)
    }

    /// Makes this share `bytes`: less always succeeds; more only within `cap` for the worker's
    /// total, else (`false`) it stays as it was.
    fn resize(&mut self, bytes: u64, cap: u64) -> bool {
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

/// The status recorded for a request whose client went away before its response was given
/// (nginx's "client closed request").
const CLIENT_CLOSED: u16 = 499;

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.recorded.get() {
            // The dispatcher dropped the request before any response: its client closed or
            // reset the connection, or sent a malformed chunked body (the listener answered
            // 400). It may have reached the upstream, so it is logged too.
            if self.busy.as_ref().is_some_and(Busy::body_broken) {
                // Under the id the 400 carried (`Busy::share_request_id`).
                self.emit(400, 0, Err("client_body"));
            } else if super::drain::cut_by_shutdown() {
                // Still in progress when the shutdown grace ended: the gateway cut it.
                self.emit(503, 0, Err("shutdown"));
            } else {
                self.emit(CLIENT_CLOSED, 0, Err("client_gone"));
            }
        }
        self.state.recorder.ended();
    }
}

/// A `grpc-status` as the metrics and the access log name it: one of the 17 codes (0-16),
/// `none` when there is none, else `invalid`. The upstream's own text would make a label value
/// any upstream (or a client that gets an upstream to echo it) could multiply without end.
fn grpc_status_label(v: Option<&http::HeaderValue>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let Some(v) = v else {
        return "none";
    };
    std::str::from_utf8(v.as_bytes())
        .ok()
        .filter(|s| (1..=2).contains(&s.len()) && !(s.len() == 2 && s.starts_with('0')))
        .and_then(|s| s.parse::<usize>().ok())
        .and_then(|n| CODES.get(n).copied())
        .unwrap_or("invalid")
}

impl Exchange {
    /// The client certificate the connection's TLS handshake verified.
    fn client_cert(&self) -> Option<&ClientCert> {
        self.conn
            .as_ref()
            .and_then(|c| c.tls.as_ref())
            .and_then(|t| t.client_cert.as_ref())
    }

    /// Adds the edge filters' response headers.
    fn with_extra(&self, mut resp: HttpResponse) -> HttpResponse {
        if let Some(rate) = &self.rate_limit {
            rate.append(|n, v| {
                resp.headers_mut().insert(n, v);
            });
        }
        for (n, v) in &self.extra {
            if let (Ok(n), Ok(v)) = (
                ax::HeaderName::from_bytes(n.as_str().as_bytes()),
                ax::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                resp.headers_mut().append(n, v);
            }
        }
        resp
    }

    /// Records the finished request: metrics always, the access log when enabled.
    fn emit(&self, status: u16, bytes_out: u64, end: Ended) {
        let grpc = if self.grpc {
            let from_upstream = self
                .grpc_status
                .clone()
                .or_else(|| self.trailers.as_ref().and_then(|t| t.get("grpc-status")));
            Some(grpc_status_label(from_upstream.as_ref()))
        } else {
            None
        };
        self.emit_as(status, bytes_out, end, grpc);
    }

    /// [`Exchange::emit`] with the call's gRPC status given (`None`: not a gRPC call).
    fn emit_as(&self, status: u16, bytes_out: u64, end: Ended, grpc: Option<&str>) {
        if self.recorded.replace(true) {
            return;
        }
        let route = self
            .route
            .and_then(|r| self.snapshot.routes.get(r))
            .map(|r| r.name.as_str());
        if let Some(code) = grpc {
            self.state
                .recorder
                .metrics()
                .grpc_requests
                .with_label_values(&[route.unwrap_or(NO_ROUTE), code])
                .inc();
        }
        let elapsed = clock::now().saturating_duration_since(self.started);
        self.state.recorder.request(
            &self.snapshot,
            self.route,
            self.method.as_str(),
            status,
            elapsed.as_secs_f64(),
        );
        if let Some(t) = &self.trace {
            t.finish(|| ServerFacts {
                method: self.method.as_str(),
                scheme: self.scheme,
                host: &self.host,
                path: &self.path,
                protocol: protocol_name(self.version),
                client_ip: self.client_ip,
                status,
                route: self
                    .route
                    .and_then(|r| self.snapshot.routes.get(r))
                    .map(|r| (r.name.as_str(), &r.tracing)),
                upstream: self.upstream.as_ref().map(|u| u.name.as_str()),
                config_sha: &self.snapshot.version.id,
                error: end.err(),
            });
        }
        if !self.log {
            return;
        }
        let target = match (&self.upstream, self.target) {
            (Some(u), Some(t)) => u.targets.get(t).map(|t| t.url.as_str()),
            _ => None,
        };
        let ids = self.trace.as_ref().map(|t| t.hex_ids());
        crate::telemetry::access::AccessLine {
            // The id is ASCII (a checked client id or hex): `from_utf8` checks it a word at a time,
            // where `to_str` took a byte at a time.
            request_id: std::str::from_utf8(self.request_id.as_bytes()).unwrap_or(""),
            client_ip: self.client_ip,
            method: self.method.as_str(),
            protocol: protocol_name(self.version),
            host: self.host.as_str(),
            path: self.path.as_str(),
            route: route.unwrap_or(""),
            upstream: self.upstream.as_ref().map_or("", |u| u.name.as_str()),
            upstream_target: target.unwrap_or(""),
            scheme: self.scheme,
            status,
            duration: elapsed,
            bytes_in: self.body.as_ref().map_or(0, |b| b.bytes.get()),
            bytes_out,
            completed: end.is_ok(),
            error: end.err().unwrap_or(""),
            grpc_status: grpc.unwrap_or(""),
            config_version: self.snapshot.version.id.as_str(),
            trace_id: ids.as_ref().map_or("", |i| id_str(&i.0)),
            span_id: ids.as_ref().map_or("", |i| id_str(&i.1)),
        }
        .log();
    }

    /// An error answered by the gateway itself: JSON body, request id, logged. A gRPC call gets
    /// it the gRPC way instead ([`grpc_error`]).
    fn error(&self, status: u16, message: &str) -> HttpResponse {
        if self.grpc {
            let (resp, code) = grpc_error(status, message, &self.request_id);
            self.emit_as(status, 0, Ok(()), Some(code));
            return self.with_extra(resp);
        }
        let body = Bytes::from(
            serde_json::json!({
                "error": message,
                "request_id": self.request_id.to_str().unwrap_or(""),
            })
            .to_string(),
        );
        let len = body.len() as u64;
        let mut resp = HttpResponse::build(status_code(status));
        resp.insert_header((ax::CONTENT_TYPE, "application/json"));
        resp.insert_header(("x-request-id", self.request_id.as_bytes()));
        self.emit(status, len, Ok(()));
        self.with_extra(resp.body(body))
    }
}

/// Whether the request is a gRPC call (`application/grpc` or `application/grpc+<codec>`; not
/// gRPC-Web, which is plain HTTP/1.1 to the gateway).
fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(ax::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .is_some_and(|ct| {
            ct.strip_prefix(b"application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
        })
}

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

/// The gRPC status for an error the gateway answers with HTTP `status`, as Envoy maps them.
fn grpc_code(status: u16) -> &'static str {
    match status {
        400 => "13",       // INTERNAL
        401 => "16",       // UNAUTHENTICATED
        403 => "7",        // PERMISSION_DENIED
        404 | 405 => "12", // UNIMPLEMENTED
        408 | 504 => "4",  // DEADLINE_EXCEEDED
        413 | 429 => "8",  // RESOURCE_EXHAUSTED
        502 | 503 => "14", // UNAVAILABLE
        500 => "13",
        _ => "2", // UNKNOWN
    }
}

/// A gateway error for a gRPC client: HTTP 200 and a trailers-only response carrying
/// `grpc-status` and `grpc-message` (percent-encoded, gRPC over HTTP/2 spec), as gRPC clients
/// read only those.
fn grpc_error(
    status: u16,
    message: &str,
    request_id: &HeaderValue,
) -> (HttpResponse, &'static str) {
    let code = grpc_code(status);
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let resp = HttpResponse::Ok()
        .insert_header((ax::CONTENT_TYPE, "application/grpc"))
        .insert_header(("grpc-status", code))
        .insert_header(("grpc-message", encoded))
        .insert_header(("x-request-id", request_id.as_bytes()))
        .finish();
    (resp, code)
}

fn protocol_name(v: actix_web::http::Version) -> &'static str {
    use actix_web::http::Version;
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/1.1",
    }
}

/// Hex ids as text (always ASCII).
fn id_str(hex: &[u8]) -> &str {
    crate::telemetry::trace::ids::as_str(hex)
}

fn status_code(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The builder of a relayed response with the upstream's status. A status without a standard
/// reason phrase (599, 299, an upstream's own) goes with an empty one (RFC 9112 §4 allows it):
/// actix-http's own text for them is `<unknown status code>`.
fn relayed(status: u16) -> HttpResponseBuilder {
    let code = status_code(status);
    let mut out = HttpResponseBuilder::new(code);
    if code.canonical_reason().is_none() {
        out.reason("");
    }
    out
}

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
                snapshot,
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
                // Only the HTTP/2 server sets them: no extensions lookup for the others.
                trailers: if req.version() == actix_web::http::Version::HTTP_2 {
                    req.extensions().get::<Trailers>().cloned()
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
        let path = match normalize_path_with(req.uri().path(), ex.snapshot.paths) {
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
        let snap = Arc::clone(&ex.snapshot);
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
            break 'answer forward(ex, req, &mut body, state, route, f, framing).await;
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

/// The longest request target (path and query) served; longer ones get 414. Twice nginx's
/// default (8 KiB for the whole request line), as CDNs allow: longer URLs break along the way.
const MAX_REQUEST_TARGET: usize = 16 * 1024;

/// What the request's framing fields say, read once for all who need them.
#[derive(Clone, Copy)]
struct Framing {
    /// A `Transfer-Encoding` field is there (actix-http takes only `chunked`).
    transfer_encoding: bool,
    /// The `Content-Length`, if any (`Err`: not a length).
    length: Result<Option<u64>, ()>,
}

/// Framing and header checks actix does not make itself (SECURITY.md), and the framing.
fn check_request(req: &Request) -> Result<Framing, &'static str> {
    let h = req.headers();
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Err("the request target must be a path");
    }
    if req.version() == actix_web::http::Version::HTTP_2
        && req.extensions().contains::<super::h2::PaddedFieldValue>()
    {
        return Err("a header field value begins or ends with whitespace");
    }
    let transfer_encoding = h.contains_key(ax::TRANSFER_ENCODING);
    let mut lengths = h.get_all(ax::CONTENT_LENGTH);
    let length = lengths.next();
    if transfer_encoding && length.is_some() {
        return Err("both Transfer-Encoding and Content-Length are set");
    }
    if lengths.next().is_some() {
        return Err("more than one Content-Length header");
    }
    Ok(Framing {
        transfer_encoding,
        length: length.map_or(Ok(None), |v| content_length(v).map(Some)),
    })
}

/// The host the request is routed by (see [`routing_host`]), with what is wrong with its `Host`
/// fields, if anything: checked after [`check_request`]. A refused request still logs the
/// host it named, as [`normalize_host`] keys it.
fn host_of(req: &Request) -> (String, Result<(), &'static str>) {
    let mut hosts = req.headers().get_all(ax::HOST);
    let (first, check) = match (hosts.next(), hosts.next()) {
        (Some(one), None) => match routing_host(one.as_bytes()) {
            Some(host) => return (host, Ok(())),
            None => (Some(one), Err("the Host header is not a valid host[:port]")),
        },
        (Some(first), Some(_)) => (Some(first), Err("more than one Host header")),
        (None, _) if req.version() == actix_web::http::Version::HTTP_11 => {
            (None, Err("HTTP/1.1 requests need a Host header"))
        }
        (None, _) => (None, Ok(())),
    };
    let host = first
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| normalize_host(h).into_owned())
        .unwrap_or_default();
    (host, check)
}

/// A valid `Host` value (see [`host_part`]) keyed as [`normalize_host`] keys it: lower-cased,
/// without the port and a trailing dot. `None` when the value is not a valid host.
fn routing_host(h: &[u8]) -> Option<String> {
    let host = host_part(h)?;
    let host = host.strip_suffix(b".").unwrap_or(host);
    // All ASCII (a registered name's bytes or an IP literal's): the text check passes.
    std::str::from_utf8(host).ok().map(str::to_ascii_lowercase)
}

/// Whether `h` is a valid `Host` value (see [`host_part`]).
#[cfg(test)]
fn valid_host(h: &[u8]) -> bool {
    host_part(h).is_some()
}

/// The host of a `host [ ":" port ]` value (RFC 9110 §7.2): a registered name (unreserved,
/// percent-encoded and sub-delimiter characters) or a bracketed IP literal, then an optional
/// decimal port. `None` when the value is not one. Spaces, `/`, `@`, `?`, `#` and `\` never
/// appear in one, and would confuse whatever reads the host after the gateway (routing,
/// redirects, logs). A registered name is checked in one pass up to the first byte that cannot
/// be in it, which must begin the port.
pub(super) fn host_part(h: &[u8]) -> Option<&[u8]> {
    let end = if h.first() == Some(&b'[') {
        let close = h.iter().position(|&b| b == b']')?;
        let literal = &h[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return None;
        }
        close + 1
    } else {
        h.iter()
            .position(|&b| !REG_NAME[usize::from(b)])
            .unwrap_or(h.len())
    };
    let (host, port) = h.split_at(end);
    let port_ok = match port.split_first() {
        None => true,
        // At most 65535 (an empty port is allowed by RFC 3986).
        Some((b':', digits)) => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        Some(_) => false,
    };
    (!host.is_empty() && port_ok).then_some(host)
}

/// The bytes of a registered name: unreserved, percent-encoded and sub-delimiter characters.
/// A table: one lookup per byte of every request's Host instead of a chain of comparisons.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    table
};

/// A new request id, for the upstream's request and for the client's response: a random
/// (version 4) UUID in its simple form, 32 lower-case hex digits. Both values share one buffer
/// that owns its 32 bytes and their count: one allocation, and each copy of either value (into
/// the upstream's request, into the response) takes no other. Two values made each from its
/// own text (`from_str`) took two, and each of their copies one more.
pub(crate) fn new_request_id() -> (HeaderValue, ax::HeaderValue) {
    // The UUID as one number, its first byte the most significant: the version (4) is the high
    // nibble of byte 6 and the variant (`10`) the top bits of byte 8 (RFC 9562, §5.4). Written
    // as hex from the number itself: `uuid`'s `new_v4` and `encode_lower` went through two byte
    // arrays on the stack, read back cold (~18 data-cache misses per request under callgrind).
    const FIXED: u128 = 0xf << 76 | 0x3 << 62;
    const SET: u128 = 0x4 << 76 | 0x2 << 62;
    let id = rand::random::<u128>() & !FIXED | SET;
    let mut buf = [0u8; 32];
    for (i, digits) in buf.chunks_exact_mut(8).enumerate() {
        digits.copy_from_slice(&hex8((id >> (96 - 32 * i)) as u32));
    }
    let shared = Bytes::from_owner(buf);
    match (
        HeaderValue::from_maybe_shared(shared.clone()),
        ax::HeaderValue::from_maybe_shared(shared),
    ) {
        (Ok(upstream), Ok(client)) => (upstream, client),
        _ => (
            HeaderValue::from_static("unknown"),
            ax::HeaderValue::from_static("unknown"),
        ),
    }
}

/// `x` as eight lower-case hex digits, most significant first, worked out for all eight at once
/// in one `u64` (a digit a byte) instead of a table lookup per digit.
fn hex8(x: u32) -> [u8; 8] {
    const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    // Each nibble to a byte of its own, the least significant nibble in the lowest byte.
    let mut n = u64::from(x);
    n = (n | (n << 16)) & 0x0000_ffff_0000_ffff;
    n = (n | (n << 8)) & 0x00ff_00ff_00ff_00ff;
    n = (n | (n << 4)) & LOW;
    // 1 in each byte whose nibble is 10 or more (adding 6 carries it into bit 4).
    let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (n + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
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

/// What is sent as the request body on each attempt.
enum Outgoing {
    Empty,
    /// Read whole beforehand: every attempt sends it again.
    Replayable(Bytes),
    /// To be streamed from the client, still unread: the first attempt that has a target
    /// starts reading it. Until then an answer given instead (no healthy target, the
    /// upstream's `max_requests`) leaves it to the handler, which drops a small body and keeps
    /// the connection.
    Unread {
        len: Option<u64>,
        limit: u64,
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
async fn forward(
    mut ex: Box<Exchange>,
    req: &Request,
    payload: &mut Option<Payload>,
    state: &WorkerState,
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
        let read = plugin_body::request(&mut ex, payload, state, route, declared_len, filter);
        match cold(read).await {
            Ok(b) => (b, None),
            Err(resp) => return resp,
        }
    } else {
        let replay_limit = may_resend.then_some(retry.replay_body_limit);
        match outgoing_body(
            &mut ex,
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
        .and_then(|k| request_hash(k, req, &ex, route));
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
            if let Err(resp) = cold(read_upload(&mut ex, state, upstream_req.body_mut())).await {
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
                return match client_response(ex, req, state, route, plan, resp, tunnel_in.take()) {
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
async fn outgoing_body(
    ex: &mut Exchange,
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
        return Ok(Outgoing::Unread {
            len: declared_len,
            limit: route.max_body_size,
            idle: ex.snapshot.limits.body_idle_timeout,
        });
    };
    // Held whole so that a retry can send it again.
    let cap = ex.snapshot.limits.max_buffered_bodies;
    match Buffered::reserve(&state.buffered, expected, cap) {
        Some(b) => ex.buffered = Some(b),
        None => return Err(ex.error(503, TOO_MANY_BODIES)),
    }
    let stats = Rc::new(BodyStats::default());
    ex.body = Some(Rc::clone(&stats));
    let mut payload = payload.take().unwrap_or(Payload::None);
    // Read before any attempt, so the client gets the route's timeout to send it (a streamed
    // body by the body idle timeout between pieces: `BodyStats::deadline`).
    let idle = ex.snapshot.limits.body_idle_timeout;
    let read = read_request_body(&mut payload, route.max_body_size, expected, idle, &stats);
    match tokio::time::timeout(route.timeout, read).await {
        Ok(Ok(b)) => Ok(Outgoing::Replayable(b)),
        Ok(Err(BodyError::TooLarge { .. })) => {
            Err(ex.error(413, "request body is larger than this route accepts"))
        }
        Ok(Err(BodyError::Client(_) | BodyError::Stopped)) => {
            Err(ex.error(400, "the request body could not be read"))
        }
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
            && req.extensions().contains::<super::h2::StreamedBody>())
}

/// When the whole exchange must be over: the route's or upstream's total timeout, and a gRPC
/// client's own deadline (`grpc-timeout`; past it the client has given up).
fn deadlines(route: &Route, upstream: &Upstream, req: &Request, grpc: bool) -> Deadlines {
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
struct Deadlines {
    /// The config's (`total_timeout`).
    own: Option<Instant>,
    /// The client's (`grpc-timeout`).
    client: Option<Instant>,
}

impl Deadlines {
    /// The sooner of the two.
    fn first(self) -> Option<Instant> {
        match (self.own, self.client) {
            (Some(o), Some(c)) => Some(o.min(c)),
            (o, c) => o.or(c),
        }
    }

    /// Whether the client's deadline, not the config, is what ends an attempt that may take
    /// `timeout` from now: a timeout then says nothing about the target. Reads the clock only
    /// for a request with a deadline of its own (gRPC).
    fn client_ends(self, timeout: Duration) -> bool {
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
fn attempt_request(
    req: &Request,
    ex: &Exchange,
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
        let mut list = upstream_headers(req, ex, route, target, HeaderList::with_capacity(room))?;
        if let Some(p) = &plan.plugins {
            p.apply_edits(&mut list);
        }
        return Ok((upstream_req, Some(list)));
    }
    let mut headers =
        upstream_headers(req, ex, route, target, http::HeaderMap::with_capacity(room))?;
    if target.protocol == crate::upstream::Protocol::Http2 && accepts_trailers(req) {
        // The one `TE` value that crosses a proxy; HTTP/2 gRPC servers require it.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(p) = &plan.plugins {
        p.apply_edits(&mut headers);
    }
    if let Some(run) = &plan.policy {
        run.apply_edits(&mut headers);
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
struct Failed {
    error: ForwardError,
    reason: RetryReason,
    /// The request, when it was handed back unsent.
    request: Option<OutRequest>,
}

/// Classifies a failed attempt: a failure of the client's side (body too large, too slow,
/// malformed) or the upstream's overload is answered at once (`Err`); an upstream failure is
/// recorded against the target, logged and counted, and returned for the retry rules.
// The failure path only; the answer is moved once.
#[allow(clippy::result_large_err)]
fn attempt_failed(
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
        ForwardError::ClientBody(_) => {
            return Err(ex.error(400, "the request body could not be read"));
        }
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
struct Retries {
    policy: RetryPolicy,
    tried: Vec<usize>,
    deadlines: Deadlines,
}

impl Retries {
    /// Whether another attempt follows the failure of target `index` for `reason`. `allowed`
    /// says whether this request may be sent again at all (method, body). Checks the rules, the
    /// attempts left, the deadline and the upstream's budget; logs and counts the retry, then
    /// waits its backoff.
    async fn again(
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

/// 408: the client paused too long while sending its body.
fn body_timeout(ex: &Exchange, state: &WorkerState) -> HttpResponse {
    state
        .recorder
        .metrics()
        .client_timeouts
        .with_label_values(&["body"])
        .inc();
    let mut resp = ex.error(408, "the request body was not received in time");
    // The rest of the body may still be on its way: the connection cannot carry another request.
    resp.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    if let Some(busy) = &ex.busy {
        busy.close_connection();
    }
    resp
}

/// 503 from an upstream's circuit breaker.
fn overloaded(
    ex: &Exchange,
    state: &WorkerState,
    upstream: &Upstream,
    o: Overflow,
) -> HttpResponse {
    state
        .recorder
        .metrics()
        .upstream_overflow
        .with_label_values(&[upstream.name.as_str(), o.as_str()])
        .inc();
    ex.error(503, "the upstream is at its concurrency limit")
}

/// The consistent-hash key of this request, if it has one.
fn request_hash(key: &HashKey, req: &Request, ex: &Exchange, route: &Route) -> Option<u64> {
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
            inbound: &crate::proxy::headers::Inbound::for_route(&ex.snapshot, route),
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

fn content_length(v: &ax::HeaderValue) -> Result<u64, ()> {
    let s = v.to_str().map_err(|_| ())?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    s.parse().map_err(|_| ())
}

fn convert_method(m: &actix_web::http::Method) -> http::Method {
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
            trusted: peer.is_some_and(|p| ex.snapshot.client_ip.is_trusted(p)),
            request_id: &ex.request_id,
            upstream_host: &route.upstream_host,
            target_authority: target.authority.as_str(),
            inbound: crate::proxy::headers::Inbound::for_route(&ex.snapshot, route),
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
fn upstream_uri(mut path: String, query: Option<&str>) -> Option<http::Uri> {
    if let Some(q) = query {
        path.reserve_exact(1 + q.len());
        path.push('?');
        path.push_str(q);
    }
    // The string's own buffer becomes the URI's: no copy.
    let pq = PathAndQuery::from_maybe_shared(Bytes::from(path)).ok()?;
    Some(http::Uri::from(pq))
}

/// The empty body of a HEAD response, sized like the GET body would be.
struct HeadBody(u64);

impl actix_web::body::MessageBody for HeadBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.0)
    }

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Bytes, Self::Error>>> {
        std::task::Poll::Ready(None)
    }
}

/// The client's response: ready now, or a body a plugin reads before the head may go.
enum Relay {
    Now(HttpResponse),
    ThroughPlugins(Box<plugin_body::Response>),
}

impl From<HttpResponse> for Relay {
    fn from(r: HttpResponse) -> Relay {
        Relay::Now(r)
    }
}

/// Whether the response head goes to the client as the upstream sent it, but for the
/// forwarding rules ([`relay_client_head`]) and the route's plugins' edits: no header rule,
/// policy, gRPC status or protocol switch reads or edits it on the way.
fn relays_head_as_is(
    ex: &Exchange,
    route: &Route,
    plan: &decide::Forward,
    websocket: bool,
) -> bool {
    !websocket && !ex.grpc && route.response_headers.is_empty() && !plan.policy_edits_response()
}

/// Turns the upstream's response into the client's, streaming the body. `tunnel_in` is the
/// client's payload when the request is a WebSocket handshake.
fn client_response(
    mut ex: Box<Exchange>,
    req: &Request,
    state: &WorkerState,
    route: &Route,
    plan: &mut decide::Forward,
    resp: Box<UpstreamResponse>,
    tunnel_in: Option<Payload>,
) -> Relay {
    let UpstreamResponse { head, mut body } = *resp;
    // The upstream answered before the client's body had all arrived: what the client still
    // sends is the rest of it, never a request. The connection ends after this response.
    if ex.body.as_ref().is_some_and(|b| !b.whole_sent())
        && let Some(busy) = &ex.busy
    {
        busy.close_connection();
    }
    let reads_body = plan
        .plugins
        .as_ref()
        .is_some_and(|p| p.reads_response_body());
    // The head in the client's types is relayed as it is, edited in place by the plugins; any
    // other is read and edited first.
    let (mut out, status, declared, seen) = match head {
        UpstreamHead::Client {
            status,
            mut fields,
            length,
        } if status != http::StatusCode::SWITCHING_PROTOCOLS
            && tunnel_in.is_none()
            && relays_head_as_is(&ex, route, plan, false) =>
        {
            // What the upstream sent decides these, as for an edited head: the fields it named
            // in `Connection`, and its length (a plugin that removes `Content-Length` does not
            // change the body's).
            let dropped = connection_dropped(&fields);
            client_urls(
                &ex,
                req,
                fields.iter_mut().map(|(n, v)| (n.as_str(), v)),
                |b| ax::HeaderValue::from_maybe_shared(b).ok(),
            );
            if let Some(p) = &plan.plugins
                && let ResponsePlan::Replace(r) =
                    decide::plugins_on_response_list(p, &route.name, status.as_u16(), &mut fields)
            {
                return answer(&ex, state, r).into();
            }
            // The body's plugins see the fields as the client gets them: a copy, when one reads.
            let seen = reads_body.then(|| ResponseFields::List(fields.clone()));
            let out = relay_client_head(status, fields, &dropped, &ex);
            (out, status.as_u16(), length, seen)
        }
        head => {
            let mut parts = head.into_http();
            let handshake = tunnel_in.is_some();
            let (out, status, declared) =
                match edited_head(&mut ex, req, state, route, plan, &mut parts, handshake) {
                    Ok(h) => h,
                    Err(resp) => return (*resp).into(),
                };
            // The policy may have turned the 101 into something else: then there is no tunnel.
            if let (Some(payload), 101) = (tunnel_in, status) {
                return websocket_tunnel(ex, state, route, out, &mut parts, payload).into();
            }
            let seen = reads_body.then(|| ResponseFields::Map(std::mem::take(&mut parts.headers)));
            (out, status, declared, seen)
        }
    };

    let no_body = req.method() == actix_web::http::Method::HEAD
        || status == 204
        || status == 304
        || (100..200).contains(&status);
    if no_body {
        ex.emit(status, 0, Ok(()));
        // A HEAD response announces the length of the body it does not carry, as the upstream
        // did; others, and one whose upstream announced none, announce none (`finish` wrote
        // `content-length: 0`, telling clients and caches the resource was empty). A 304 may
        // not carry its representation's length here: actix-http would wait for that body.
        return match declared {
            Some(n) if req.method() == actix_web::http::Method::HEAD => out.body(HeadBody(n)),
            _ => out.body(actix_web::body::None::new()),
        }
        .into();
    }
    if http_body::Body::is_end_stream(&body) {
        // Nothing follows the head (over HTTP/2: END_STREAM on the upstream's HEADERS, as in a
        // gRPC trailers-only response): the client's response ends with its head too.
        ex.emit(status, 0, Ok(()));
        return out.finish().into();
    }
    let trailers = ex.trailers.clone();
    if let Some(seen) = seen
        && let Some(run) = plan.plugins.take()
    {
        match run.into_response_body(route.max_body_size, status, seen) {
            Ok(filter) => {
                if let Some(data) = body.take_whole() {
                    return plugin_body::whole(&ex, out, status, data, filter).into();
                }
                let body = UpstreamBody::new(body, BodySize::Stream, route.read_timeout, None)
                    .with_trailers(trailers);
                return Relay::ThroughPlugins(Box::new(plugin_body::Response {
                    ex,
                    out,
                    status,
                    body,
                    declared,
                    filter,
                }));
            }
            Err(run) => plan.plugins = Some(run),
        }
    }
    // A body already received whole (most small ones come with their head) goes out as bytes
    // with the head: nothing left to stream, so the exchange is recorded now.
    if let Some(whole) = body.take_whole() {
        ex.emit(status, whole.len() as u64, Ok(()));
        return out.body(whole).into();
    }
    let size = match declared {
        Some(n) => BodySize::Sized(n),
        None => BodySize::Stream,
    };
    // Metrics and the access log are recorded when the body ends, so they count its bytes and
    // time; the exchange (and its in-flight count) lives until then.
    let on_finish: OnFinish = Box::new(move |bytes, end| ex.emit(status, bytes, end));
    out.body(
        UpstreamBody::new(body, size, route.read_timeout, Some(on_finish)).with_trailers(trailers),
    )
    .into()
}

/// Takes a place among the HTTP/2 connection's streamed uploads for the body `stats` follows,
/// if one is free; the place is the body's until its reader stops. A body whose reader stopped
/// (it has all arrived, or failed) needs none, nor one that has its place already.
fn upload_slot(slots: &UploadSlots, stats: &BodyStats) -> bool {
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
async fn read_upload(
    ex: &mut Exchange,
    state: &WorkerState,
    body: &mut ProxyBody,
) -> Result<(), HttpResponse> {
    let ProxyBody::Channel { rx, .. } = body else {
        return Ok(());
    };
    let cap = ex.snapshot.limits.max_buffered_bodies;
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
                break Some(ex.error(400, "the request body could not be read"));
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

/// The kind of [`ForwardError::Invalid`], for a response refused once its head has arrived.
const INVALID_RESPONSE: &str = "invalid_response";

/// 502 for an upstream response whose head arrived but may not be relayed (a 101 to a request
/// that did not ask to switch, or a failed WebSocket handshake; both framings at once): counted
/// like the invalid responses the upstream client refuses itself ([`attempt_failed`]), under
/// `rustygate_upstream_errors_total{kind="invalid_response"}` and against the target.
fn invalid_response(ex: &Exchange, state: &WorkerState) -> HttpResponse {
    if let Some(upstream) = &ex.upstream {
        if let Some(index) = ex.target {
            upstream.record_failure(index, &"the upstream sent an invalid response");
        }
        // The error path only: a labelled lookup is fine here.
        state
            .recorder
            .metrics()
            .upstream_errors
            .with_label_values(&[upstream.name.as_str(), INVALID_RESPONSE])
            .inc();
    }
    ex.error(502, "the upstream sent an invalid response")
}

/// The client's response head from an `http` 1.x one: checked (a 101 only for a WebSocket
/// `handshake`, framing), edited by the route's response header rules, the policy's
/// `on_response` and the plugins, then relayed. Returns it with its status and declared
/// `Content-Length`, or the answer that replaces it.
fn edited_head(
    ex: &mut Exchange,
    req: &Request,
    state: &WorkerState,
    route: &Route,
    plan: &decide::Forward,
    parts: &mut http::response::Parts,
    handshake: bool,
) -> Result<(HttpResponseBuilder, u16, Option<u64>), Box<HttpResponse>> {
    let mut status = parts.status.as_u16();
    if ex.grpc {
        ex.grpc_status = parts.headers.get(&GRPC_STATUS).cloned();
    }
    // WebSocket (proxy::websocket): a 101 only answers a handshake, and only from a WebSocket
    // server. Any other answer to a handshake is relayed as a normal response.
    if status == 101 {
        let key = req.headers().get(&AX_SEC_WEBSOCKET_KEY);
        let checked = match (handshake, key) {
            (true, Some(k)) => websocket::check_switch(&parts.headers, k.as_bytes()),
            _ => Err("the upstream switched protocols for a request that did not ask to"),
        };
        if let Err(why) = checked {
            tracing::warn!(
                request_id = ex.request_id.to_str().unwrap_or(""),
                route = route.name.as_str(),
                kind = INVALID_RESPONSE,
                error = why,
                "WebSocket handshake refused"
            );
            return Err(Box::new(invalid_response(ex, state)));
        }
    }
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        // hyper refuses such responses already; this is the belt to its braces.
        return Err(Box::new(invalid_response(ex, state)));
    }
    let dropped = connection_tokens(
        parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .map(|v| v.as_bytes()),
    )
    .unwrap_or_default();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    client_urls(
        ex,
        req,
        parts.headers.iter_mut().map(|(n, v)| (n.as_str(), v)),
        |b| http::HeaderValue::from_maybe_shared(b).ok(),
    );
    route.response_headers.apply(&mut parts.headers);
    if let Some(run) = &plan.policy
        && let ResponsePlan::Replace(plan) =
            decide::on_response(run, &mut status, &mut parts.headers)
    {
        // The upstream body is dropped unread; its connection is not reused.
        return Err(Box::new(answer(ex, state, plan)));
    }
    if let Some(p) = &plan.plugins
        && let ResponsePlan::Replace(plan) =
            decide::plugins_on_response(p, &route.name, status, &mut parts.headers)
    {
        return Err(Box::new(answer(ex, state, plan)));
    }
    let mut out = relayed(status);
    relay_headers(&mut out, &parts.headers, &dropped, ex);
    Ok((out, status, declared))
}

/// The upstream's response headers on the client's response: all but hop-by-hop, the ones its
/// `Connection` header named (`dropped`) and `Content-Length` (actix sets it from the body),
/// then the request id and the edge filters' headers. Names of the common standard headers
/// are mapped without parsing; the values are copied into one buffer and shared from it.
fn relay_headers(
    out: &mut HttpResponseBuilder,
    headers: &http::HeaderMap,
    dropped: &[String],
    ex: &Exchange,
) {
    let total = headers.iter().map(|(_, v)| v.len()).sum::<usize>() + own_headers_len(ex);
    let mut values = bytes::BytesMut::with_capacity(total);
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop_str(n) || name == header::CONTENT_LENGTH || dropped.iter().any(|d| d == n)
        {
            continue;
        }
        if name == X_REQUEST_ID || (ex.cors && is_cors_response_header(n)) {
            // Replaced by the gateway's own below.
            continue;
        }
        append_copy(out, &mut values, actix_name(name), value);
    }
    own_headers(out, &mut values, ex);
}

/// The names a head in the client's types drops: its `Connection` tokens.
fn connection_dropped(fields: &[(ax::HeaderName, ax::HeaderValue)]) -> Vec<String> {
    connection_tokens(
        fields
            .iter()
            .filter(|(n, _)| *n == ax::CONNECTION)
            .map(|(_, v)| v.as_bytes()),
    )
    .unwrap_or_default()
}

/// [`relay_headers`] for a head already in the client's types: its fields are moved, not
/// copied (`dropped`: [`connection_dropped`]). `Content-Length` is left to the body.
fn relay_client_head(
    status: http::StatusCode,
    fields: Vec<(ax::HeaderName, ax::HeaderValue)>,
    dropped: &[String],
    ex: &Exchange,
) -> HttpResponseBuilder {
    let mut out = relayed(status.as_u16());
    for (name, value) in fields {
        let n = name.as_str();
        if name == ax::CONTENT_LENGTH
            || is_hop_by_hop_str(n)
            || name == AX_REQUEST_ID
            || (ex.cors && is_cors_response_header(n))
            || dropped.iter().any(|d| d == n)
        {
            continue;
        }
        out.append_header((name, value));
    }
    // Empty (no allocation) unless edge filters added headers.
    let mut values = bytes::BytesMut::with_capacity(own_headers_len(ex));
    own_headers(&mut out, &mut values, ex);
    out
}

/// Which of the response headers that carry a URL `proxy::location` rewrites `name` (lower
/// case) is, if any.
fn url_field(name: &str) -> Option<location::Field> {
    match name {
        "location" | "content-location" => Some(location::Field::Url),
        "refresh" => Some(location::Field::Refresh),
        _ => None,
    }
}

/// Rewrites the response headers that carry a URL naming the upstream ([`client_url`]), before
/// the route's header rules, policy and plugins read the head (nginx's `proxy_redirect`, ahead
/// of its output filters): they see the URL the client gets, and one they set is theirs.
/// `make` turns the new value into the head's type.
fn client_urls<'a, V: AsRef<[u8]> + 'a>(
    ex: &Exchange,
    req: &Request,
    fields: impl Iterator<Item = (&'a str, &'a mut V)>,
    make: impl Fn(Bytes) -> Option<V>,
) {
    for (name, value) in fields {
        if let Some(v) = url_field(name).and_then(|f| client_url(ex, req, f, value.as_ref()))
            && let Some(v) = make(v)
        {
            *value = v;
        }
    }
}

/// The client's value of a response header that carries a URL ([`url_field`]): the upstream's
/// origin replaced by the one the client used (`proxy::location`); `None` keeps it. Out of
/// line: only responses with such a header call it.
#[cold]
#[inline(never)]
fn client_url(ex: &Exchange, req: &Request, field: location::Field, value: &[u8]) -> Option<Bytes> {
    let route = ex.snapshot.routes.get(ex.route?)?;
    let crate::snapshot::RouteAction::Proxy { upstream, rewrite } = &route.action else {
        return None;
    };
    if !route.rewrite_location {
        return None;
    }
    // A trusted proxy in front says which scheme the client used.
    let trusted = req
        .peer_addr()
        .is_some_and(|a| ex.snapshot.client_ip.is_trusted(a.ip()));
    let forwarded = req
        .headers()
        .get(&AX_FORWARDED_PROTO)
        .filter(|_| trusted)
        .map(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii()
        });
    let client_scheme = match forwarded {
        Some(p) if p.eq_ignore_ascii_case(b"https") => "https",
        Some(p) if p.eq_ignore_ascii_case(b"http") => "http",
        _ => ex.scheme,
    };
    let client_host = match req.headers().get(ax::HOST) {
        Some(h) => h.as_bytes(),
        None => req
            .uri()
            .authority()
            .map_or(&b""[..], |a| a.as_str().as_bytes()),
    };
    let fixed_host = match &route.upstream_host {
        crate::snapshot::UpstreamHost::Fixed(h) => Some(h.as_bytes()),
        _ => None,
    };
    let cx = location::Context {
        targets: &upstream.targets,
        fixed_host,
        path: Some(rewrite),
        client_scheme,
        client_host,
    };
    location::rewrite(field, value, &cx).map(Bytes::from)
}

/// `Access-Control-Allow-Origin` and the other CORS response headers (lower-case `name`).
fn is_cors_response_header(name: &str) -> bool {
    name.starts_with("access-control-")
}

/// The request id and the edge filters' headers (CORS), on every relayed response.
fn own_headers(out: &mut HttpResponseBuilder, values: &mut bytes::BytesMut, ex: &Exchange) {
    out.append_header((AX_REQUEST_ID, ex.reply_id.clone()));
    if let Some(rate) = &ex.rate_limit {
        rate.append(|n, v| {
            out.insert_header((n, v));
        });
    }
    for (n, v) in &ex.extra {
        append_copy(out, values, actix_name(n), v);
    }
}

fn own_headers_len(ex: &Exchange) -> usize {
    ex.extra.iter().map(|(_, v)| v.len()).sum::<usize>()
}

/// Appends `value` to the response under `name` (none: not a valid name there), copied into
/// `values` and shared from it.
fn append_copy(
    out: &mut HttpResponseBuilder,
    values: &mut bytes::BytesMut,
    name: Option<ax::HeaderName>,
    value: &HeaderValue,
) {
    values.extend_from_slice(value.as_bytes());
    let shared = values.split().freeze();
    if let (Some(n), Ok(v)) = (name, ax::HeaderValue::from_maybe_shared(shared)) {
        out.append_header((n, v));
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
// Looked up by constant names: a name given as text is parsed on every lookup.
const AX_REQUEST_ID: ax::HeaderName = ax::HeaderName::from_static("x-request-id");
const AX_FORWARDED_FOR: ax::HeaderName = ax::HeaderName::from_static("x-forwarded-for");
const AX_FORWARDED_PROTO: ax::HeaderName = ax::HeaderName::from_static("x-forwarded-proto");
const AX_GRPC_TIMEOUT: ax::HeaderName = ax::HeaderName::from_static("grpc-timeout");
const AX_SEC_WEBSOCKET_KEY: ax::HeaderName = ax::HeaderName::from_static("sec-websocket-key");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The client's 101, whose body is the tunnel (see [`websocket::Tunnel`]). The exchange (its
/// `max_requests` slot, in-flight counts and `Busy`) lives until the tunnel closes, and is
/// logged then.
fn websocket_tunnel(
    ex: Box<Exchange>,
    state: &WorkerState,
    route: &Route,
    mut out: HttpResponseBuilder,
    parts: &mut http::response::Parts,
    payload: Payload,
) -> HttpResponse {
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return ex.error(502, "the upstream sent an invalid response");
    };
    let stats = ex.body.clone().unwrap_or_default();
    let gauge = state.recorder.metrics().websocket_connections.clone();
    let on_finish: OnFinish = Box::new(move |bytes, end| ex.emit(101, bytes, end));
    out.upgrade("websocket").body(websocket::Tunnel::new(
        on_upgrade,
        payload,
        route.websocket_idle_timeout,
        stats,
        gauge,
        on_finish,
    ))
}

#[cfg(test)]
mod tests {
    use super::{
        Buffered, grpc_code, grpc_timeout, hex8, new_request_id, routing_host, upstream_uri,
        valid_host,
    };
    use std::rc::Rc;

    #[test]
    fn a_new_request_id_is_a_random_uuid_in_both_values() {
        let (upstream, client) = new_request_id();
        let id = upstream.to_str().unwrap().to_owned();
        assert_eq!(client.to_str().unwrap(), id);
        let parsed = uuid::Uuid::try_parse(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 4, "{id}");
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
        assert_eq!(parsed.simple().to_string(), id);
        // Copies share the bytes and keep them after the first values are gone.
        let copies = (upstream.clone(), client.clone());
        drop((upstream, client));
        assert_eq!(copies.0.as_bytes(), id.as_bytes());
        assert_eq!(copies.1.as_bytes(), id.as_bytes());
        assert_ne!(new_request_id().0, copies.0);
    }

    #[test]
    fn hex_digits_are_written_most_significant_first_in_lower_case() {
        let mut x = 0x9e37_79b9_u32;
        for n in [
            0,
            9,
            10,
            15,
            16,
            0x0123_abcd,
            0xfedc_ba98,
            0xa0a0_a0a0,
            u32::MAX,
        ] {
            assert_eq!(hex8(n), *format!("{n:08x}").as_bytes(), "{n:#x}");
        }
        for _ in 0..10_000 {
            x = x.wrapping_mul(0x0019_660d).wrapping_add(0x3c6e_f35f);
            assert_eq!(hex8(x), *format!("{x:08x}").as_bytes(), "{x:#x}");
        }
    }

    #[test]
    fn every_bit_of_a_request_id_but_its_version_and_variant_is_random() {
        // Over 256 ids each free bit is 0 in one and 1 in another (a bit stuck by a wrong mask
        // would be seen; a random one stays the same in all with odds of 2^-255).
        let (mut any, mut all) = (0u128, u128::MAX);
        for _ in 0..256 {
            let (id, _) = new_request_id();
            let n = uuid::Uuid::try_parse(id.to_str().unwrap())
                .unwrap()
                .as_u128();
            any |= n;
            all &= n;
        }
        let version_and_variant = 0xf << 76 | 0x3 << 62;
        assert_eq!(
            any | version_and_variant,
            u128::MAX,
            "bits never set: {:032x}",
            !any
        );
        assert_eq!(all & !version_and_variant, 0, "bits always set: {all:032x}");
        assert_eq!(all >> 76 & 0xf, 4);
        assert_eq!(all >> 62 & 0x3, 2);
    }
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

    #[test]
    fn gateway_errors_map_to_grpc_codes_as_envoy_does() {
        for (http, grpc) in [
            (502, "14"),
            (503, "14"),
            (504, "4"),
            (401, "16"),
            (429, "8"),
            (404, "12"),
            (403, "7"),
            (400, "13"),
            (418, "2"),
        ] {
            assert_eq!(grpc_code(http), grpc, "{http}");
        }
    }

    #[test]
    fn host_header_must_be_host_and_port() {
        for ok in [
            "example.com",
            "api.example.com:8443",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[2001:db8::1]",
            "xn--bcher-kva.example",
            "under_score.internal",
            "example.com:",
            "Example.COM.:443",
            "[2001:DB8::A]:8443",
            "a.",
            "example.com:65535",
            "example.com:0",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok} should be valid");
            // Checked and keyed in one pass, as the two steps do it.
            assert_eq!(
                routing_host(ok.as_bytes()).as_deref(),
                Some(&*crate::router::normalize_host(ok)),
                "{ok}"
            );
        }
        for bad in [
            "",
            "a b.com",
            "evil.com/path",
            "user@evil.com",
            "evil.com?x=1",
            "evil.com#frag",
            "a\\b.com",
            "example.com:80a",
            "example.com:123456",
            "example.com:65536",
            "example.com:99999",
            "[::1]:70000",
            ":80",
            "[::1",
            "[]:80",
            "[evil.com]",
            "example.com:80:90",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} should be refused");
            assert_eq!(routing_host(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
