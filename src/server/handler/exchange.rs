//! The exchange: one request's facts from accept to the end of its response, recorded once
//! (metrics, access log, trace) when it ends or is dropped; the gateway's own error answer.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::Instant;

use actix_web::http::header as ax;
use actix_web::{HttpResponse, web};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

use super::errors::{grpc_error, status_code};
use super::forward::Buffered;
use super::plugin_body;

use crate::proxy::body::{BodyStats, Ended};
use crate::proxy::headers::ClientCert;
use crate::router::RouteId;
use crate::server::listener::{Busy, ConnInfo};
use crate::server::{WorkerState, edge};
use crate::snapshot::{RouteRecord, Snapshot};
use crate::telemetry::recorder::NO_ROUTE;
use crate::telemetry::trace::{RequestTrace, ServerFacts};
use crate::upstream::Upstream;
use crate::upstream::state::{InFlight, Slot};
use crate::util::clock;

/// The config an exchange is recorded under.
pub(super) enum Config {
    /// The snapshot the request is decided and forwarded on.
    Whole(Arc<Snapshot>),
    /// Once the response head is out ([`Exchange::release`]): the route's record, and the
    /// snapshot only weakly (the recorder tells snapshots apart by address), so that a reload
    /// frees the snapshot while a body streams or a tunnel lives for days.
    Released(Arc<RouteRecord>, RouteId, Weak<Snapshot>),
}

/// Per-request facts for the access log, emitted once when the exchange ends.
pub(super) struct Exchange {
    pub(super) config: Config,
    pub(super) started: Instant,
    pub(super) request_id: HeaderValue,
    /// The same id in the client side's type, for the response.
    pub(super) reply_id: ax::HeaderValue,
    pub(super) client_ip: IpAddr,
    pub(super) method: actix_web::http::Method,
    pub(super) version: actix_web::http::Version,
    pub(super) host: String,
    pub(super) path: String,
    pub(super) route: Option<RouteId>,
    pub(super) upstream: Option<Arc<Upstream>>,
    pub(super) target: Option<usize>,
    pub(super) body: Option<Rc<BodyStats>>,
    pub(super) log: bool,
    pub(super) state: web::Data<WorkerState>,
    /// Headers the edge filters add to whatever response this request gets (CORS).
    pub(super) extra: Vec<(HeaderName, HeaderValue)>,
    /// The route's rate limit's `RateLimit-*` numbers, for whatever response this request gets.
    pub(super) rate_limit: Option<edge::RateHeaders>,
    /// The route answers CORS itself: the upstream's `Access-Control-*` headers are dropped,
    /// so that a browser sees one answer, the route's (not two, nor the upstream's alone).
    pub(super) cors: bool,
    /// Headers from verified claims, set on the upstream request over the client's.
    pub(super) auth_headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the token was found, removed before forwarding (unless configured not to).
    pub(super) drop_token: Option<crate::filters::jwt::TokenPlace>,
    /// Counts this request in its target's in-flight number until the response ends.
    pub(super) in_flight: Option<InFlight>,
    /// This request's place under the upstream's `max_requests`.
    pub(super) slot: Option<Slot>,
    /// Bytes of this request's body held for retries, counted against the worker's cap.
    pub(super) buffered: Option<Buffered>,
    /// Keeps the connection's head timeout off until this request is done (absent when
    /// served outside the proxy listener).
    pub(super) busy: Option<Busy>,
    /// The connection's facts (TLS, listener), looked up once per request.
    pub(super) conn: Option<Rc<ConnInfo>>,
    /// `http` or `https`, for the access log.
    pub(super) scheme: &'static str,
    /// A gRPC call (`content-type: application/grpc…`): the gateway's own errors are answered
    /// the gRPC way, and the call's status is logged and counted.
    pub(super) grpc: bool,
    /// The upstream's `grpc-status` response header (a trailers-only response).
    pub(super) grpc_status: Option<http::HeaderValue>,
    /// The HTTP/2 stream (HTTP/2 clients): where the upstream's trailers land, read for
    /// `grpc-status`, and whether the send timeout cut its response.
    pub(super) h2: Option<crate::server::h2::StreamExt>,
    /// Trace ids and, when sampled, span facts (`[tracing]` on). Not boxed: it is small, and
    /// what only a recorded request needs is boxed inside it.
    pub(super) trace: Option<RequestTrace>,
    /// Set when the request body goes through WASM plugins: why one stopped it, if one did.
    pub(super) plugin_stop: Option<plugin_body::Stop>,
    /// The exchange has been recorded (metrics, access log); one that is dropped before (the
    /// client went away while it was in progress) is recorded then, as 499.
    pub(super) recorded: std::cell::Cell<bool>,
}

/// The status recorded for a request whose client went away before its response was given
/// (nginx's "client closed request").
pub(super) const CLIENT_CLOSED: u16 = 499;

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.recorded.get() {
            // The dispatcher dropped the request before any response: its client closed or
            // reset the connection, or sent a malformed chunked body (the listener answered
            // 400). It may have reached the upstream, so it is logged too.
            if self.busy.as_ref().is_some_and(Busy::body_broken) {
                // Under the id the 400 carried (`Busy::share_request_id`).
                self.emit(400, 0, Err("client_body"));
            } else if crate::server::drain::cut_by_shutdown() {
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
    /// Lets go of the snapshot, keeping what the end of the exchange records (its route's
    /// record): called once the response head is out, before the long part of the exchange (a
    /// streamed body, a WebSocket tunnel). What it still holds of the config is its route's
    /// record and its upstream (`upstream`), not the other routes and upstreams.
    pub(super) fn release(&mut self) {
        if let (Config::Whole(snapshot), Some(route)) = (&self.config, self.route)
            && let Some(r) = snapshot.routes.get(route)
        {
            self.config = Config::Released(Arc::clone(&r.record), route, Arc::downgrade(snapshot));
        }
    }

    /// The route's name and tracing settings, and the config version.
    fn recorded_config(&self) -> (Option<&RouteRecord>, &str) {
        match &self.config {
            Config::Whole(s) => (
                self.route.and_then(|r| s.routes.get(r)).map(|r| &*r.record),
                s.version.id.as_str(),
            ),
            Config::Released(record, _, _) => (Some(&**record), &*record.version),
        }
    }

    /// Whether the send timeout cut the response (the client took none of it in time, on
    /// its HTTP/1.1 connection or its HTTP/2 stream), rather than the client going away.
    pub(super) fn send_timed_out(&self) -> bool {
        self.busy.as_ref().is_some_and(Busy::send_timed_out)
            || self.h2.as_ref().is_some_and(|s| s.send.timed_out())
    }

    /// The client certificate the connection's TLS handshake verified.
    pub(super) fn client_cert(&self) -> Option<&ClientCert> {
        self.conn
            .as_ref()
            .and_then(|c| c.tls.as_ref())
            .and_then(|t| t.client_cert.as_ref())
    }

    /// Adds the edge filters' response headers.
    pub(super) fn with_extra(&self, mut resp: HttpResponse) -> HttpResponse {
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
    pub(super) fn emit(&self, status: u16, bytes_out: u64, end: Ended) {
        let grpc = if self.grpc {
            let from_upstream = self
                .grpc_status
                .clone()
                .or_else(|| self.h2.as_ref().and_then(|s| s.trailers.get("grpc-status")));
            Some(grpc_status_label(from_upstream.as_ref()))
        } else {
            None
        };
        self.emit_as(status, bytes_out, end, grpc);
    }

    /// [`Exchange::emit`] with the call's gRPC status given (`None`: not a gRPC call).
    pub(super) fn emit_as(&self, status: u16, bytes_out: u64, end: Ended, grpc: Option<&str>) {
        if self.recorded.replace(true) {
            return;
        }
        let (record, config_version) = self.recorded_config();
        let route = record.map(|r| r.name.as_str());
        if let Some(code) = grpc {
            self.state
                .recorder
                .metrics()
                .grpc_requests
                .with_label_values(&[route.unwrap_or(NO_ROUTE), code])
                .inc();
        }
        // A request the gateway answered itself, no target tried (a respond route, 404, 413 on
        // its Content-Length, 503 without a target...), may end in the poll it began in: its end
        // is read afresh (proxied requests end in a poll of their own).
        let ended_at = if self.target.is_none() {
            clock::fresh()
        } else {
            clock::now()
        };
        let elapsed = ended_at.saturating_duration_since(self.started);
        let recorder = &self.state.recorder;
        match &self.config {
            Config::Whole(snapshot) => recorder.request(
                snapshot,
                self.route,
                self.method.as_str(),
                status,
                elapsed.as_secs_f64(),
            ),
            Config::Released(record, route, snapshot) => recorder.released_request(
                snapshot,
                *route,
                record,
                self.method.as_str(),
                status,
                elapsed.as_secs_f64(),
            ),
        }
        if let Some(t) = &self.trace {
            t.finish(|| ServerFacts {
                method: self.method.as_str(),
                scheme: self.scheme,
                host: &self.host,
                path: &self.path,
                protocol: protocol_name(self.version),
                client_ip: self.client_ip,
                status,
                route: record.map(|r| (r.name.as_str(), &r.tracing)),
                upstream: self.upstream.as_ref().map(|u| u.name.as_str()),
                config_sha: config_version,
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
            config_version,
            trace_id: ids.as_ref().map_or("", |i| id_str(&i.0)),
            span_id: ids.as_ref().map_or("", |i| id_str(&i.1)),
        }
        .log();
    }

    /// An error answered by the gateway itself: JSON body, request id, logged. A gRPC call gets
    /// it the gRPC way instead ([`grpc_error`]).
    pub(super) fn error(&self, status: u16, message: &str) -> HttpResponse {
        if self.grpc {
            let (resp, code) = grpc_error(status, message, &self.request_id);
            // Logged and counted as sent (200), the call's status in `grpc_status`, as Envoy.
            self.emit_as(200, 0, Ok(()), Some(code));
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
