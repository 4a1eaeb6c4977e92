//! Distributed tracing: a SERVER span per request, a CLIENT span per upstream attempt, W3C
//! (and B3) propagation, exported as OTLP/HTTP protobuf.
//!
//! ```text
//! request ─► start (ids: the client's trace continued, or a new one)
//!   ─► decide (after routing: the route's ratio; a client's sampled flag only if trusted)
//!   ─► attempt × n (a client span id each, `traceparent` set on the upstream request)
//!   ─► finish (when the body ends: spans encoded, handed to the exporter thread)
//! ```
//! This does not go through `tracing` layers or the OpenTelemetry SDK per request: ids come from
//! a per-thread generator, the request's facts stay on its exchange, and span records are only
//! built for sampled requests. Every request gets ids (they are in the access log), sampled or
//! not. A sampled request's spans are encoded as OTLP protobuf when it ends ([`otlp`], into
//! reused buffers); batching and sending happen on the exporter's thread ([`export`]), which a
//! slow or dead collector can stall without a request noticing.

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
pub use propagation::{Field, Parent, Propagators};

use otlp::{Event, Kind, SpanBody, SpanHead, Value};

/// `[tracing]` of gateway.toml, compiled; part of the snapshot.
#[derive(Debug)]
pub struct TraceConfig {
    pub export: Arc<ExportConfig>,
    /// Share of new traces recorded, 0.0 to 1.0.
    pub sample_ratio: f64,
    /// The largest ratio a request can be sampled with: `sample_ratio` or a route's own. A trace
    /// id outside it (and no trusted parent) is never recorded, so nothing is kept for its spans.
    pub max_ratio: f64,
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
    /// `get` looks a request header up.
    pub fn for_request<'h>(
        cfg: &TraceConfig,
        get: impl Fn(Field) -> Option<&'h [u8]>,
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

/// The propagation headers as actix names (`http` 0.2), by [`Field::index`].
static ACTIX_FIELDS: [actix_web::http::header::HeaderName; 6] = [
    actix_web::http::header::HeaderName::from_static(Field::TraceParent.name()),
    actix_web::http::header::HeaderName::from_static(Field::B3.name()),
    actix_web::http::header::HeaderName::from_static(Field::B3TraceId.name()),
    actix_web::http::header::HeaderName::from_static(Field::B3SpanId.name()),
    actix_web::http::header::HeaderName::from_static(Field::B3Sampled.name()),
    actix_web::http::header::HeaderName::from_static(Field::B3Flags.name()),
];

/// A client request's propagation header, looked up by a name made once; `None` when the
/// request has it more than once (two `traceparent` fields are not a context: W3C).
pub fn actix_field(headers: &actix_web::http::header::HeaderMap, f: Field) -> Option<&[u8]> {
    let mut values = headers.get_all(ACTIX_FIELDS.get(f.index())?);
    let first = values.next()?;
    values.next().is_none().then(|| first.as_bytes())
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

/// An address as text, written into `buf` (45 bytes hold the longest IPv6 form); IPv4 without
/// the formatting machinery (every sampled span has one or two).
fn ip_text(ip: IpAddr, buf: &mut [u8; 45]) -> &str {
    let mut len = 0;
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                let d = digits.format(octet).as_bytes();
                let sep = usize::from(i > 0);
                if let Some(dst) = buf.get_mut(len..len + sep + d.len()) {
                    dst[..sep].copy_from_slice(&b"."[..sep]);
                    dst[sep..].copy_from_slice(d);
                    len += sep + d.len();
                }
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut rest = &mut buf[..];
            if write!(rest, "{ip}").is_ok() {
                len = 45 - rest.len();
            }
        }
    }
    std::str::from_utf8(buf.get(..len).unwrap_or_default()).unwrap_or_default()
}

/// A host as `server.address` gives it: an IPv6 literal without the brackets a `Host` or URL
/// writes around it (`::1`, as the semantic conventions give an IP address), names as they are.
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
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

/// One request's trace: its ids, and (when sampled) what its spans will say. Small and not
/// boxed: most requests are not recorded and carry only their ids.
pub struct RequestTrace {
    cfg: Arc<TraceConfig>,
    pub trace_id: TraceId,
    /// The server span.
    pub span_id: SpanId,
    parent: Option<Parent>,
    sampled: Cell<Option<bool>>,
    /// Kept only while the request may be recorded (its trace id within the largest ratio, or
    /// a trusted sampled parent), and dropped once it is decided that it is not.
    rec: RefCell<Option<Box<Recording>>>,
}

struct Recording {
    started: Instant,
    /// Wall-clock start, read once the request is sampled (0 until then).
    start_ns: u64,
    peer: Option<IpAddr>,
    /// The port of the client's `Host` (absent when it has none).
    server_port: Option<u16>,
    user_agent: Option<actix_web::http::header::HeaderValue>,
    query: Option<String>,
    attempts: Vec<Attempt>,
    events: Vec<Event>,
}

impl Recording {
    fn now_ns(&self) -> u64 {
        self.start_ns
            .saturating_add(self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64)
    }
}

struct Attempt {
    span_id: SpanId,
    start_ns: u64,
    end_ns: u64,
    method: http::Method,
    authority: http::uri::Authority,
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
        req: &actix_http::Request,
        started: Instant,
    ) -> RequestTrace {
        let headers = actix_http::HttpMessage::headers(req);
        let parent = propagation::extract(&cfg.propagators, |f| actix_field(headers, f));
        let trace_id = parent.map_or_else(TraceId::random, |p| p.trace_id);
        // No route's ratio can take a trace outside the largest one in: what `sampled` decides
        // is known now for most requests that are not recorded.
        let may_record = match parent {
            Some(p) if cfg.trust_incoming_sampled => p.sampled,
            _ => in_ratio(&trace_id, cfg.max_ratio),
        };
        let rec = may_record.then(|| {
            Box::new(Recording {
                started,
                start_ns: 0,
                // As `client.address` is: an IPv4 client of a dual-stack listener by its IPv4
                // address, not `::ffff:a.b.c.d`.
                peer: req.peer_addr().map(|a| crate::util::canonical_ip(a.ip())),
                server_port: headers
                    .get(actix_web::http::header::HOST)
                    .and_then(|h| port_of(h.as_bytes())),
                user_agent: headers.get(actix_web::http::header::USER_AGENT).cloned(),
                query: None,
                attempts: Vec::new(),
                events: Vec::new(),
            })
        });
        RequestTrace {
            cfg: Arc::clone(cfg),
            trace_id,
            span_id: SpanId::random(),
            parent,
            sampled: Cell::new((!may_record).then_some(false)),
            rec: RefCell::new(rec),
        }
    }

    /// Decides whether this request is recorded, with the matched route's settings (`None`:
    /// no route). Later calls keep the first decision.
    #[inline]
    pub fn decide(&self, route: Option<&RouteTrace>, req: Option<&actix_http::Request>) -> bool {
        match self.sampled.get() {
            Some(s) => s,
            None => self.decide_first(route, req),
        }
    }

    fn decide_first(&self, route: Option<&RouteTrace>, req: Option<&actix_http::Request>) -> bool {
        let sampled = sampled(&self.cfg, route, self.parent, &self.trace_id);
        self.sampled.set(Some(sampled));
        let mut rec = self.rec.borrow_mut();
        if !sampled {
            *rec = None;
        } else if let Some(rec) = rec.as_deref_mut() {
            // The wall clock when the request started: now, less the time it has taken so far.
            let taken = rec.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            rec.start_ns = unix_nanos(SystemTime::now()).saturating_sub(taken);
            rec.query = route
                .filter(|r| r.record_query)
                .and(req)
                .and_then(|r| r.uri().query())
                .map(str::to_owned);
        }
        sampled
    }

    /// One upstream attempt starts: our context goes on its request. `resend` is how many
    /// attempts came before it. The `traceparent` is returned, not set: it goes in the
    /// attempt's [`SendOptions`](crate::proxy::pool::SendOptions) for the connection to write.
    pub fn attempt(
        &self,
        headers: &mut http::HeaderMap,
        method: &http::Method,
        authority: &http::uri::Authority,
        default_port: u16,
        resend: u32,
    ) -> Option<[u8; 55]> {
        let sampled = self.decide(None, None);
        let mut rec = self.rec.borrow_mut();
        let span_id = match rec.as_deref_mut() {
            Some(rec) if sampled => {
                let span_id = SpanId::random();
                let now = rec.now_ns();
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
                    method: method.clone(),
                    authority: authority.clone(),
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
        propagation::inject_but_traceparent(
            &self.cfg.propagators,
            headers,
            self.parent.as_ref(),
            &self.trace_id,
            &span_id,
            sampled,
        )
    }

    /// The current attempt got a response head (`status`), or failed (`error`: its kind).
    pub fn attempt_done(&self, status: Option<u16>, error: Option<&'static str>) {
        if let Some(rec) = self.rec.borrow_mut().as_deref_mut() {
            // A failure ends the attempt; a response ends it when its body does.
            let end_ns = if status.is_none() { rec.now_ns() } else { 0 };
            if let Some(a) = rec.attempts.last_mut() {
                a.status = status;
                a.error = error;
                if status.is_none() {
                    a.end_ns = end_ns;
                }
            }
        }
    }

    /// A decision inside the request (authentication refused, rate limited, policy failed),
    /// as an event on the server span.
    pub fn event(&self, name: &'static str, attrs: &[(&'static str, &str)]) {
        if let Some(rec) = self.rec.borrow_mut().as_deref_mut() {
            rec.events.push(Event {
                time_ns: rec.now_ns(),
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

    /// The request ended: when it was recorded, its spans go to the exporter, encoded here
    /// (into this thread's buffers: a request's spans cost one allocation, the copy handed over).
    /// `facts` is only called for a request that may still be recorded.
    pub fn finish<'a>(&self, facts: impl FnOnce() -> ServerFacts<'a>) {
        if self.sampled.get() == Some(false) {
            return;
        }
        let f = &facts();
        let sampled = self.decide(f.route.map(|(_, r)| r), None);
        if !sampled {
            return;
        }
        let Some(rec) = self.rec.borrow_mut().take() else {
            return;
        };
        let end_ns = rec.now_ns();
        let count = 1 + rec.attempts.len();
        let encoded = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => {
                let (spans, body) = &mut *scratch;
                spans.clear();
                self.encode(spans, body, &rec, f, end_ns);
                spans.as_slice().to_vec()
            }
            // Not reached (nothing here calls back into tracing); correct all the same.
            Err(_) => {
                let mut spans = Vec::new();
                self.encode(&mut spans, &mut Vec::new(), &rec, f, end_ns);
                spans
            }
        });
        export::submit(&self.cfg.export, encoded, count);
    }

    /// The server span, then a client span per attempt.
    fn encode(
        &self,
        spans: &mut Vec<u8>,
        body: &mut Vec<u8>,
        rec: &Recording,
        f: &ServerFacts<'_>,
        end_ns: u64,
    ) {
        let route_name: &[&str] = match f.route {
            Some((_, r)) if !r.http_route.is_empty() => &[f.method, " ", &r.http_route],
            _ => &[f.method],
        };
        let mut s = SpanBody::start(
            body,
            &SpanHead {
                trace_id: &self.trace_id,
                span_id: &self.span_id,
                parent: self.parent.as_ref().map(|p| &p.span_id),
                name: route_name,
                kind: Kind::Server,
                start_ns: rec.start_ns,
                end_ns,
            },
        );
        s.str("http.request.method", f.method);
        s.str("url.path", f.path);
        s.str("url.scheme", f.scheme);
        if let Some(q) = &rec.query {
            s.str("url.query", q);
        }
        if !f.host.is_empty() {
            s.str("server.address", unbracketed(f.host));
        }
        if let Some(p) = rec.server_port {
            s.int("server.port", i64::from(p));
        }
        let mut ip = [0; 45];
        let client = ip_text(f.client_ip, &mut ip);
        s.str("client.address", client);
        match rec.peer {
            Some(p) if p == f.client_ip => s.str("network.peer.address", client),
            Some(p) => s.str("network.peer.address", ip_text(p, &mut [0; 45])),
            None => {}
        }
        let version = f.protocol.strip_prefix("HTTP/").unwrap_or(f.protocol);
        s.str("network.protocol.version", version);
        if let Some(ua) = rec.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
            s.str("user_agent.original", ua);
        }
        if let Some((name, r)) = f.route {
            if !r.http_route.is_empty() {
                s.str("http.route", &r.http_route);
            }
            s.str("rustygate.route", name);
        }
        if let Some(u) = f.upstream {
            s.str("rustygate.upstream", u);
        }
        s.str("rustygate.config.sha", f.config_sha);
        s.int("http.response.status_code", i64::from(f.status));
        // Semantic conventions: a server span is an error for 5xx, not for 4xx (the client's).
        let mut digits = itoa::Buffer::new();
        let status_text = digits.format(f.status);
        let error = (f.status >= 500).then(|| f.error.unwrap_or(status_text));
        if let Some(e) = error.or(f.error) {
            s.str("error.type", e);
        }
        for e in &rec.events {
            s.event(e);
        }
        s.finish(error, self.parent.is_some());
        otlp::push_span(spans, body);

        for a in &rec.attempts {
            let mut s = SpanBody::start(
                body,
                &SpanHead {
                    trace_id: &self.trace_id,
                    span_id: &a.span_id,
                    parent: Some(&self.span_id),
                    name: &[a.method.as_str()],
                    kind: Kind::Client,
                    start_ns: a.start_ns,
                    end_ns: if a.end_ns == 0 { end_ns } else { a.end_ns },
                },
            );
            s.str("http.request.method", a.method.as_str());
            s.str("server.address", unbracketed(a.authority.host()));
            s.int("server.port", i64::from(a.port));
            if a.resend > 0 {
                s.int("http.request.resend_count", i64::from(a.resend));
            }
            if let Some(st) = a.status {
                s.int("http.response.status_code", i64::from(st));
            }
            let mut digits = itoa::Buffer::new();
            let error = match (a.status, a.error) {
                (_, Some(kind)) => Some(kind),
                (Some(st), None) if st >= 400 => Some(digits.format(st)),
                _ => None,
            };
            if let Some(e) = error {
                s.str("error.type", e);
            }
            s.finish(error, false);
            otlp::push_span(spans, body);
        }
    }
}

thread_local! {
    /// A worker's span encoding buffers: the request's spans, and the span being written.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = RefCell::new((Vec::with_capacity(2048), Vec::with_capacity(1024)));
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
            assert_eq!(ip_text(ip, &mut [0; 45]), ip.to_string());
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
