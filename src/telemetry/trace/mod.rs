//! Distributed tracing: a SERVER span per request, a CLIENT span per upstream attempt, W3C
//! (and B3) propagation, exported as OTLP/HTTP protobuf.
//!
//! ```text
//! request ─► start (ids: the client's trace continued, or a new one)
//!   ─► decide (after routing: the route's ratio; a client's sampled flag only if trusted)
//!   ─► attempt × n (a client span id each, `traceparent` set on the upstream request)
//!   ─► finish (when the body ends: spans built, handed to the exporter thread)
//! ```
//! This does not go through `tracing` layers or the OpenTelemetry SDK per request: ids come from
//! a per-thread generator, the request's facts stay on its exchange, and span records are only
//! built for sampled requests. Every request gets ids (they are in the access log), sampled or
//! not. Encoding and sending happen on the exporter's thread ([`export`]), which a slow or dead
//! collector can stall without a request noticing.

pub mod export;
pub mod ids;
pub mod otlp;
pub mod propagation;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use export::{Compression, DROPPED, ExportConfig, flush};
pub use ids::{SpanId, TraceId};
pub use propagation::{Parent, Propagators};

use otlp::{Attr, Event, Kind, SpanRecord, Value};

/// `[tracing]` of gateway.toml, compiled; part of the snapshot.
#[derive(Debug)]
pub struct TraceConfig {
    pub export: Arc<ExportConfig>,
    /// Share of new traces recorded, 0.0 to 1.0.
    pub sample_ratio: f64,
    /// Whether a client's `sampled` flag decides (parent-based sampling). Off by default: a
    /// client could otherwise make the gateway record (and export) every request it sends.
    pub trust_incoming_sampled: bool,
    pub propagators: Propagators,
}

/// A request's place in a trace, carried past the request itself: a reload a webhook asked for
/// logs the webhook request's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

impl TraceContext {
    /// A request's context when `cfg` is set: the client's trace continued (when it sent one the
    /// configured propagators read), a new trace otherwise; a span id of its own either way.
    /// `get` looks a request header up by its lowercase name.
    pub fn for_request<'h>(
        cfg: &TraceConfig,
        get: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> TraceContext {
        let parent = propagation::extract(&cfg.propagators, get);
        TraceContext {
            trace_id: parent.map_or_else(TraceId::random, |p| p.trace_id),
            span_id: SpanId::random(),
        }
    }

    /// `(trace_id, span_id)` in lowercase hex, as the access log writes them.
    pub fn hex(&self) -> (String, String) {
        (
            String::from_utf8_lossy(&self.trace_id.hex()).into_owned(),
            String::from_utf8_lossy(&self.span_id.hex()).into_owned(),
        )
    }
}

/// A route's tracing settings.
#[derive(Debug, Clone)]
pub struct RouteTrace {
    /// `tracing = false`: never recorded (ids are still made and propagated).
    pub enabled: bool,
    /// Overrides the gateway's ratio.
    pub sample_ratio: Option<f64>,
    /// Record `url.query` (off by default: query strings carry tokens and personal data).
    pub record_query: bool,
    /// `http.route`: the route's path pattern (`/orders/{id}`, or `/orders/*` for a prefix).
    pub http_route: Arc<str>,
}

impl Default for RouteTrace {
    fn default() -> Self {
        RouteTrace {
            enabled: true,
            sample_ratio: None,
            record_query: false,
            http_route: Arc::from(""),
        }
    }
}

/// Whether a trace is in the `ratio` share, as OpenTelemetry's `TraceIdRatioBased` decides.
pub fn in_ratio(trace_id: &TraceId, ratio: f64) -> bool {
    let bound = (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
    trace_id.sampling_value() < bound
}

/// Whether a request is recorded, for the server and `rustygate test` alike: never on a route
/// with `tracing = false`; as the client's `sampled` flag says when that is trusted; otherwise
/// by the route's ratio, else the gateway's. `route`: the matched route's settings, if any.
pub fn sampled(
    cfg: &TraceConfig,
    route: Option<&RouteTrace>,
    parent: Option<Parent>,
    trace_id: &TraceId,
) -> bool {
    match (route, parent) {
        (Some(r), _) if !r.enabled => false,
        (_, Some(p)) if cfg.trust_incoming_sampled => p.sampled,
        (r, _) => in_ratio(
            trace_id,
            r.and_then(|r| r.sample_ratio).unwrap_or(cfg.sample_ratio),
        ),
    }
}

/// An address as text; IPv4 without the formatting machinery (every sampled span has one or two).
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            out
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// The port of a `Host` value (`example.com:8080`, `[::1]:8080`), scanned by hand: this runs
/// for every request, sampled or not.
fn port_of(host: &[u8]) -> Option<u16> {
    let colon = host.iter().rposition(|&b| b == b':')?;
    let digits = host.get(colon + 1..)?;
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).ok()
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// One request's trace: its ids, and (when sampled) what its spans will say.
pub struct RequestTrace {
    cfg: Arc<TraceConfig>,
    pub trace_id: TraceId,
    /// The server span.
    pub span_id: SpanId,
    parent: Option<Parent>,
    sampled: Cell<Option<bool>>,
    /// Wall-clock start, read only once the request is sampled (0 until then): most requests
    /// never need it.
    start_ns: Cell<u64>,
    started: Instant,
    peer: Option<IpAddr>,
    /// The port of the client's `Host` (absent when it has none).
    server_port: Option<u16>,
    user_agent: Option<actix_web::http::header::HeaderValue>,
    /// Filled only for sampled requests.
    rec: RefCell<Option<Box<Recording>>>,
}

#[derive(Default)]
struct Recording {
    query: Option<String>,
    attempts: Vec<Attempt>,
    events: Vec<Event>,
}

struct Attempt {
    span_id: SpanId,
    start_ns: u64,
    end_ns: u64,
    method: String,
    address: String,
    port: u16,
    resend: u32,
    status: Option<u16>,
    error: Option<&'static str>,
}

/// What the server span says about the finished request.
pub struct ServerFacts<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'a str,
    pub client_ip: IpAddr,
    pub status: u16,
    /// The matched route's name and settings.
    pub route: Option<(&'a str, &'a RouteTrace)>,
    pub upstream: Option<&'a str>,
    pub config_sha: &'a str,
    /// How the response ended early, if it did.
    pub error: Option<&'a str>,
}

impl RequestTrace {
    /// Ids for a new request when `cfg` is set: the client's trace continued when it sent one
    /// the configured propagators read, a new trace otherwise.
    pub fn start(
        cfg: &Arc<TraceConfig>,
        req: &actix_web::HttpRequest,
        started: Instant,
    ) -> RequestTrace {
        let headers = req.headers();
        let parent =
            propagation::extract(&cfg.propagators, |n| headers.get(n).map(|v| v.as_bytes()));
        let server_port = headers
            .get(actix_web::http::header::HOST)
            .and_then(|h| port_of(h.as_bytes()));
        RequestTrace {
            cfg: Arc::clone(cfg),
            trace_id: parent.map_or_else(TraceId::random, |p| p.trace_id),
            span_id: SpanId::random(),
            parent,
            sampled: Cell::new(None),
            start_ns: Cell::new(0),
            started,
            peer: req.peer_addr().map(|a| a.ip()),
            server_port,
            user_agent: headers.get(actix_web::http::header::USER_AGENT).cloned(),
            rec: RefCell::new(None),
        }
    }

    /// Decides whether this request is recorded, with the matched route's settings (`None`:
    /// no route). Later calls keep the first decision.
    pub fn decide(&self, route: Option<&RouteTrace>, req: Option<&actix_web::HttpRequest>) -> bool {
        if let Some(s) = self.sampled.get() {
            return s;
        }
        let sampled = sampled(&self.cfg, route, self.parent, &self.trace_id);
        self.sampled.set(Some(sampled));
        if sampled {
            // The wall clock when the request started: now, less the time it has taken so far.
            let taken = self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            self.start_ns
                .set(unix_nanos(SystemTime::now()).saturating_sub(taken));
            let query = route
                .filter(|r| r.record_query)
                .and(req)
                .and_then(|r| r.uri().query())
                .map(str::to_owned);
            *self.rec.borrow_mut() = Some(Box::new(Recording {
                query,
                ..Recording::default()
            }));
        }
        sampled
    }

    fn now_ns(&self) -> u64 {
        self.start_ns
            .get()
            .saturating_add(self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64)
    }

    /// One upstream attempt starts: our context goes on its request. `resend` is how many
    /// attempts came before it.
    pub fn attempt(
        &self,
        headers: &mut http::HeaderMap,
        method: &http::Method,
        authority: &http::uri::Authority,
        default_port: u16,
        resend: u32,
    ) {
        let sampled = self.decide(None, None);
        let mut rec = self.rec.borrow_mut();
        let span_id = match rec.as_deref_mut() {
            Some(rec) if sampled => {
                let span_id = SpanId::random();
                let now = self.now_ns();
                // A previous attempt that got an answer ends when this one starts.
                if let Some(prev) = rec.attempts.last_mut()
                    && prev.end_ns == 0
                {
                    prev.end_ns = now;
                }
                rec.attempts.push(Attempt {
                    span_id,
                    start_ns: now,
                    end_ns: 0,
                    method: method.as_str().to_owned(),
                    address: authority.host().to_owned(),
                    port: authority.port_u16().unwrap_or(default_port),
                    resend,
                    status: None,
                    error: None,
                });
                span_id
            }
            // Not recorded: the upstream's work hangs under our (unrecorded) server span.
            _ => self.span_id,
        };
        propagation::inject(
            &self.cfg.propagators,
            headers,
            &self.trace_id,
            &span_id,
            sampled,
        );
    }

    /// The current attempt got a response head (`status`), or failed (`error`: its kind).
    pub fn attempt_done(&self, status: Option<u16>, error: Option<&'static str>) {
        if let Some(rec) = self.rec.borrow_mut().as_deref_mut()
            && let Some(a) = rec.attempts.last_mut()
        {
            a.status = status;
            a.error = error;
            // A failure ends the attempt; a response ends it when its body does.
            if status.is_none() {
                a.end_ns = self.now_ns();
            }
        }
    }

    /// A decision inside the request (authentication refused, rate limited, policy failed),
    /// as an event on the server span.
    pub fn event(&self, name: &'static str, attrs: &[(&'static str, &str)]) {
        if let Some(rec) = self.rec.borrow_mut().as_deref_mut() {
            rec.events.push(Event {
                time_ns: self.now_ns(),
                name,
                attrs: attrs
                    .iter()
                    .map(|(k, v)| (*k, Value::Str((*v).to_owned())))
                    .collect(),
            });
        }
    }

    /// `(trace_id, span_id)` in hex, for the access log.
    pub fn hex_ids(&self) -> ([u8; 32], [u8; 16]) {
        (self.trace_id.hex(), self.span_id.hex())
    }

    /// The request ended: when it was recorded, its spans go to the exporter.
    pub fn finish(&self, f: &ServerFacts<'_>) {
        let sampled = self.decide(f.route.map(|(_, r)| r), None);
        if !sampled {
            return;
        }
        let Some(rec) = self.rec.borrow_mut().take() else {
            return;
        };
        let end_ns = self.now_ns();
        let mut spans = Vec::with_capacity(1 + rec.attempts.len());
        for a in rec.attempts {
            let mut attrs: Vec<Attr> = vec![
                ("http.request.method", Value::Str(a.method.clone())),
                ("server.address", Value::Str(a.address)),
                ("server.port", Value::Int(i64::from(a.port))),
            ];
            if a.resend > 0 {
                attrs.push(("http.request.resend_count", Value::Int(i64::from(a.resend))));
            }
            if let Some(s) = a.status {
                attrs.push(("http.response.status_code", Value::Int(i64::from(s))));
            }
            let error = match (a.status, a.error) {
                (_, Some(kind)) => Some(kind.to_owned()),
                (Some(s), None) if s >= 400 => Some(s.to_string()),
                _ => None,
            };
            if let Some(e) = &error {
                attrs.push(("error.type", Value::Str(e.clone())));
            }
            spans.push(SpanRecord {
                trace_id: self.trace_id,
                span_id: a.span_id,
                parent: Some(self.span_id),
                name: a.method,
                kind: Kind::Client,
                start_ns: a.start_ns,
                end_ns: if a.end_ns == 0 { end_ns } else { a.end_ns },
                attrs,
                events: Vec::new(),
                error,
                remote_parent: false,
            });
        }
        let name = match f.route {
            Some((_, r)) if !r.http_route.is_empty() => {
                let mut name = String::with_capacity(f.method.len() + 1 + r.http_route.len());
                name.push_str(f.method);
                name.push(' ');
                name.push_str(&r.http_route);
                name
            }
            _ => f.method.to_owned(),
        };
        let mut attrs: Vec<Attr> = Vec::with_capacity(18);
        let s = |v: &str| Value::Str(v.to_owned());
        attrs.push(("http.request.method", s(f.method)));
        attrs.push(("url.path", s(f.path)));
        attrs.push(("url.scheme", s(f.scheme)));
        if let Some(q) = &rec.query {
            attrs.push(("url.query", s(q)));
        }
        if !f.host.is_empty() {
            attrs.push(("server.address", s(f.host)));
        }
        if let Some(p) = self.server_port {
            attrs.push(("server.port", Value::Int(i64::from(p))));
        }
        let client = ip_text(f.client_ip);
        let peer = self.peer.map(|p| {
            if p == f.client_ip {
                client.clone()
            } else {
                ip_text(p)
            }
        });
        attrs.push(("client.address", Value::Str(client)));
        if let Some(p) = peer {
            attrs.push(("network.peer.address", Value::Str(p)));
        }
        let version = f.protocol.strip_prefix("HTTP/").unwrap_or(f.protocol);
        attrs.push((
            "network.protocol.version",
            s(if version == "2" { "2" } else { version }),
        ));
        if let Some(ua) = self.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
            attrs.push(("user_agent.original", s(ua)));
        }
        if let Some((name, r)) = f.route {
            if !r.http_route.is_empty() {
                attrs.push(("http.route", s(&r.http_route)));
            }
            attrs.push(("rustygate.route", s(name)));
        }
        if let Some(u) = f.upstream {
            attrs.push(("rustygate.upstream", s(u)));
        }
        attrs.push(("rustygate.config.sha", s(f.config_sha)));
        attrs.push(("http.response.status_code", Value::Int(i64::from(f.status))));
        // Semantic conventions: a server span is an error for 5xx, not for 4xx (the client's).
        let error = if f.status >= 500 {
            Some(f.error.map_or_else(|| f.status.to_string(), str::to_owned))
        } else {
            None
        };
        if let Some(e) = error.as_deref().or(f.error) {
            attrs.push(("error.type", s(e)));
        }
        spans.insert(
            0,
            SpanRecord {
                trace_id: self.trace_id,
                span_id: self.span_id,
                parent: self.parent.map(|p| p.span_id),
                name,
                kind: Kind::Server,
                start_ns: self.start_ns.get(),
                end_ns,
                attrs,
                events: rec.events,
                error,
                remote_parent: self.parent.is_some(),
            },
        );
        export::submit(&self.cfg.export, spans);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.4",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn ports_are_read_from_host_values_as_rsplit_and_parse_would() {
        for (host, want) in [
            ("example.com:8080", Some(8080)),
            ("example.com", None),
            ("[::1]:443", Some(443)),
            ("[::1]", None),
            ("example.com:", None),
            ("example.com:65535", Some(65535)),
            ("example.com:65536", None),
            ("example.com:123456", None),
            ("example.com:8o", None),
        ] {
            let parsed = host
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            assert_eq!(port_of(host.as_bytes()), want, "{host}");
            assert_eq!(parsed, want, "{host}");
        }
    }

    #[test]
    fn ratio_sampling_follows_the_trace_id_and_its_bounds() {
        let ids: Vec<TraceId> = (0..20_000).map(|_| TraceId::random()).collect();
        assert!(ids.iter().all(|t| in_ratio(t, 1.0)));
        assert!(!ids.iter().any(|t| in_ratio(t, 0.0)));
        let tenth = ids.iter().filter(|t| in_ratio(t, 0.1)).count();
        assert!((1_500..2_500).contains(&tenth), "{tenth} of 20000 at 0.1");
        // The same trace id gets the same decision every time.
        assert!(ids.iter().all(|t| in_ratio(t, 0.5) == in_ratio(t, 0.5)));
    }
}
