//! One fixture case through the compiled snapshot, in-process and without a network: the same
//! `decide` calls the proxy handler makes (route match, rewrite, policy hooks), the same header
//! rules, and a synthetic upstream response instead of a socket.
//!
//! ```text
//! Case ─► normalise path ─► [CORS preflight] ─► decide::route ─► decide::request ─► Plan
//!   Plan::Forward ─► upstream request recorded ─► synthetic response
//!     ─► decide::plugins_on_response ─► decide::on_response
//!   otherwise     ─► the gateway's own answer (respond, deny, 404/405/413/500)
//! ```
//! With `[tracing]`, the case's request gets a trace as on the server (the client's continued,
//! or a new one; `req.trace_id`) and the upstream request the gateway's `traceparent`, set
//! after the policy's edits. Rate limits are off: a fixture run must not depend on how many
//! cases ran before it. On a route with auth, a case's `claims` stand for a verified token (the
//! claim rules still apply); without them, the case's token is verified for real against static
//! keys (`--env` resolves the secret); JWKS keys would need the network, so such a case is
//! refused with a note.

use std::future::Future as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::fixture::Case;
use crate::decide::{self, Incoming, Plan, ResponsePlan, Routed};
use crate::proxy::headers::Forwarding;
use crate::proxy::headers::{client_ip, connection_tokens, is_hop_by_hop_str, valid_request_id};
use crate::router::normalize_path_with;
use crate::snapshot::{Route, Snapshot};
use crate::telemetry::trace::{self, Parent, SpanId, TraceConfig, TraceId, propagation};
use crate::wire::StaticResponse;

/// The request id of a case whose request does not bring a valid one.
pub const TEST_REQUEST_ID: &str = "rustygate-test";

/// The request the upstream would have received.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamRequest {
    pub upstream: String,
    /// The target a request would be sent to (the upstream's first: tests do not balance).
    pub target: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    #[serde(serialize_with = "ser_headers")]
    pub headers: HeaderMap,
}

/// What happened to a case's request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub status: u16,
    /// The matched route.
    pub route: Option<String>,
    /// Set when the request was forwarded.
    pub upstream_request: Option<UpstreamRequest>,
    #[serde(serialize_with = "ser_headers")]
    pub response_headers: HeaderMap,
    pub body: String,
    /// Why a policy failed (the client got 500), as the gateway logs it.
    pub policy_error: Option<String>,
    /// What the runner could not do as the server would, or why auth refused the request.
    pub note: Option<String>,
}

fn ser_headers<S: serde::Serializer>(h: &HeaderMap, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(h.len()))?;
    for (n, v) in h {
        m.serialize_entry(n.as_str(), &String::from_utf8_lossy(v.as_bytes()))?;
    }
    m.end()
}

struct Run<'a> {
    case: &'a Case,
    request_id: HeaderValue,
    /// Headers the edge filters add to any answer (CORS).
    extra: Vec<(HeaderName, HeaderValue)>,
    route: Option<String>,
    /// The peer is a trusted proxy: its forwarding headers are believed.
    trusted: bool,
    /// From auth: headers set from claims, where the token was (not forwarded), and the query
    /// without it.
    auth_headers: Vec<(HeaderName, HeaderValue)>,
    drop_token: Option<crate::filters::jwt::TokenPlace>,
    query_without_token: Option<Option<String>>,
    /// `[headers] allow_underscores`.
    allow_underscores: bool,
    /// The request's trace, when `[tracing]` is on.
    trace: Option<CaseTrace>,
}

/// A case's trace, made as the server makes a request's.
struct CaseTrace {
    cfg: Arc<TraceConfig>,
    /// The client's context, when the configured propagators read one.
    parent: Option<Parent>,
    trace_id: TraceId,
}

impl CaseTrace {
    fn start(cfg: &Arc<TraceConfig>, headers: &HeaderMap) -> CaseTrace {
        // A field given more than once is not read (as the server does).
        let parent = propagation::extract(&cfg.propagators, |f| {
            let mut values = headers.get_all(f.header()).iter();
            let first = values.next()?;
            values.next().is_none().then(|| first.as_bytes())
        });
        CaseTrace {
            cfg: Arc::clone(cfg),
            parent,
            trace_id: parent.map_or_else(TraceId::random, |p| p.trace_id),
        }
    }

    /// Sets the context the upstream gets, as the server's first attempt does.
    fn inject(&self, route: &Route, headers: &mut HeaderMap) {
        let sampled = trace::sampled(&self.cfg, Some(&route.tracing), self.parent, &self.trace_id);
        propagation::inject(
            &self.cfg.propagators,
            headers,
            self.parent.as_ref(),
            &self.trace_id,
            &SpanId::random(),
            sampled,
        );
    }
}

impl Run<'_> {
    fn finish(&self, status: u16, mut headers: HeaderMap, body: Bytes) -> Outcome {
        headers.insert(
            HeaderName::from_static("x-request-id"),
            self.request_id.clone(),
        );
        for (n, v) in &self.extra {
            headers.append(n.clone(), v.clone());
        }
        Outcome {
            status,
            route: self.route.clone(),
            upstream_request: None,
            response_headers: headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            policy_error: None,
            note: None,
        }
    }

    /// An error answered by the gateway: JSON with the request id, like the handler's.
    fn error(&self, status: u16, message: &str) -> Outcome {
        let body = serde_json::json!({
            "error": message,
            "request_id": self.request_id.to_str().unwrap_or(""),
        })
        .to_string();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.finish(status, h, Bytes::from(body))
    }

    fn respond(&self, r: &StaticResponse) -> Outcome {
        let mut h = HeaderMap::new();
        for (n, v) in &r.headers {
            h.append(n.clone(), v.clone());
        }
        self.finish(r.status, h, r.body.clone())
    }

    fn answer(&self, plan: Plan<'_>) -> Outcome {
        match plan {
            Plan::Respond(r) => self.respond(&r),
            Plan::Deny { status, message } => self.error(status, &message),
            Plan::Failed(f) => {
                f.log(self.request_id.to_str().unwrap_or(""));
                let mut out = self.error(500, "the route's policy failed");
                out.policy_error = Some(f.to_string());
                out
            }
            Plan::Forward(_) => self.error(500, "internal routing error"),
        }
    }
}

/// Runs one case against `snap`.
pub fn run(snap: &Snapshot, case: &Case) -> Outcome {
    let request_id = case
        .headers
        .get("x-request-id")
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or(HeaderValue::from_static(TEST_REQUEST_ID));
    let mut run = Run {
        case,
        request_id,
        extra: Vec::new(),
        route: None,
        trusted: snap.client_ip.is_trusted(case.peer),
        auth_headers: Vec::new(),
        drop_token: None,
        query_without_token: None,
        allow_underscores: snap.allow_underscores,
        trace: snap
            .tracing
            .as_ref()
            .map(|c| CaseTrace::start(c, &case.headers)),
    };
    let client = client_ip(
        case.peer,
        case.headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes()),
        &snap.client_ip,
    );
    let path = match normalize_path_with(&case.path, snap.paths) {
        Ok(p) => p.into_owned(),
        Err(e) => return run.error(400, &e.to_string()),
    };
    let mut incoming = Incoming {
        method: &case.method,
        host: &case.host,
        path: &path,
        query: case.query.as_deref(),
        client_ip: client,
        // Claims exist only where auth verified them.
        claims: None,
        trace_id: run.trace.as_ref().map(|t| t.trace_id),
    };
    if let Some(out) = preflight(snap, &mut run, &incoming) {
        return out;
    }
    let m = match decide::route(snap, &incoming) {
        Routed::Matched(m) => m,
        Routed::NoRoute => return run.error(404, "no route matches this request"),
        Routed::MethodNotAllowed(allowed) => {
            let mut out = run.error(405, "method not allowed on this route");
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                out.response_headers.insert(http::header::ALLOW, v);
            }
            return out;
        }
    };
    let Some(route) = snap.routes.get(m.route) else {
        return run.error(500, "internal routing error");
    };
    run.route = Some(route.name.clone());
    if let Some(cors) = &route.cors {
        if let Some(origin) = header(&case.headers, "origin") {
            run.extra = cors.response_headers(origin);
        }
        run.extra
            .push((http::header::VARY, HeaderValue::from_static("Origin")));
    }
    let inbound = crate::proxy::headers::Inbound::for_route(snap, route);
    match (&route.auth, &case.claims) {
        (Some(auth), _) => match authenticate(&mut run, auth, inbound) {
            Ok(claims) => incoming.claims = claims,
            Err(out) => return *out,
        },
        (None, Some(_)) => {
            let mut out = run.error(500, "this case gives claims to a route without auth");
            out.note = Some(format!(
                "route `{}` has no `auth`, so the gateway hands its policy no claims; remove `claims` from the case or add auth to the route",
                route.name
            ));
            return out;
        }
        (None, None) => {}
    }
    if let Some(q) = &run.query_without_token {
        incoming.query = q.as_deref();
    }
    let kept = || {
        case.headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .filter(|(n, _)| inbound.keeps(n))
            .collect()
    };
    let (_, plan) = decide::request(snap, &m, &incoming, kept);
    match plan {
        Plan::Forward(mut f) => {
            if f.query.is_none() {
                f.query.clone_from(&run.query_without_token);
            }
            forward(&run, route, f)
        }
        other => run.answer(other),
    }
}

/// The route's auth filter: the verified claims, or the 401/403 the client gets.
fn authenticate(
    run: &mut Run<'_>,
    auth: &crate::snapshot::RouteAuth,
    inbound: crate::proxy::headers::Inbound<'_>,
) -> Result<Option<decide::Claims>, Box<Outcome>> {
    use crate::filters::jwt::{AuthError, Keys, TokenPlace, TokenPlaces, without_query_param};
    let p = &auth.provider;
    let h = &run.case.headers;
    let refused = |run: &Run<'_>, e: AuthError, note: Option<String>| {
        let mut out = run.error(e.status(), e.message());
        out.response_headers
            .insert(http::header::WWW_AUTHENTICATE, e.www_authenticate());
        out.note = note.or_else(|| Some(format!("auth refused the request: {}", e.reason())));
        Box::new(out)
    };
    let mut place = None;
    let claims = if let Some(given) = &run.case.claims {
        p.check_rules(given).map_err(|e| refused(run, e, None))?;
        Arc::clone(given)
    } else {
        let kept = h
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .filter(|(n, _)| inbound.keeps(n));
        let places = TokenPlaces::collect(p, kept, run.case.query.as_deref());
        let token = match p.token(&places) {
            Ok(Some((t, found))) => {
                place = Some(found);
                t
            }
            Ok(None) if auth.optional => return Ok(None),
            Ok(None) => return Err(refused(run, AuthError::Missing, None)),
            Err(e) => return Err(refused(run, e, None)),
        };
        if matches!(p.keys, Keys::Jwks(_)) {
            let note = "the route's provider fetches keys from a JWKS URL, which a test does not do: give the case `claims` instead of a token".to_owned();
            return Err(refused(run, AuthError::UnknownKey, Some(note)));
        }
        // Static keys: verifying never waits on anything, so one poll finishes it.
        let mut verify = std::pin::pin!(p.verify(token));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match verify.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(c)) => c,
            std::task::Poll::Ready(Err(e)) => return Err(refused(run, e, None)),
            std::task::Poll::Pending => {
                return Err(refused(
                    run,
                    AuthError::UnknownKey,
                    Some("token verification would wait on the network".into()),
                ));
            }
        }
    };
    run.auth_headers = p
        .claim_headers(&claims)
        .map_err(|e| refused(run, e, None))?;
    run.drop_token = place.and_then(|found| p.removal(found));
    if let (Some(TokenPlace::Query(name)), Some(q)) = (&run.drop_token, &run.case.query) {
        run.query_without_token = Some(without_query_param(q, name));
    }
    Ok(Some(claims))
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Answers a CORS preflight for a route with CORS, as the handler does.
fn preflight(snap: &Snapshot, run: &mut Run<'_>, inc: &Incoming<'_>) -> Option<Outcome> {
    let h = &run.case.headers;
    if inc.method != "OPTIONS" || !h.contains_key("origin") {
        return None;
    }
    let asked = header(h, "access-control-request-method")?;
    let probe = Incoming {
        method: asked,
        host: inc.host,
        path: inc.path,
        query: None,
        client_ip: inc.client_ip,
        claims: None,
        trace_id: None,
    };
    let Routed::Matched(pm) = decide::route(snap, &probe) else {
        return None;
    };
    let route = snap.routes.get(pm.route)?;
    let cors = route.cors.as_ref()?;
    run.route = Some(route.name.clone());
    let origin = header(h, "origin").unwrap_or("");
    Some(
        match cors.preflight(origin, asked, header(h, "access-control-request-headers")) {
            Ok(headers) => {
                let mut out = HeaderMap::new();
                for (n, v) in headers {
                    out.insert(n, v);
                }
                run.finish(204, out, Bytes::new())
            }
            Err(_) => {
                let mut out = run.error(403, "CORS preflight refused");
                out.response_headers
                    .insert(http::header::VARY, HeaderValue::from_static("Origin"));
                out
            }
        },
    )
}

fn forward(run: &Run<'_>, route: &Route, mut plan: decide::Forward) -> Outcome {
    let case = run.case;
    let Some(target) = plan.upstream.targets.first() else {
        return run.error(503, "no upstream target is available");
    };
    let declared = match case.headers.get(http::header::CONTENT_LENGTH) {
        None => Some(case.body.len() as u64),
        Some(v) => match v.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return run.error(400, "invalid Content-Length"),
        },
    };
    if declared.is_some_and(|n| n > route.max_body_size)
        || case.body.len() as u64 > route.max_body_size
    {
        return run.error(413, "request body is larger than this route accepts");
    }
    // The body, whole, through the plugins that read it, as the server does for a body that
    // arrives in one piece.
    if !case.body.is_empty()
        && let Some(mut filter) = plan
            .plugins
            .as_ref()
            .and_then(|p| p.request_body(route.max_body_size))
        && let Err(stop) = filter.chunk(case.body.clone(), true)
    {
        return body_stopped(run, stop, true);
    }
    let mut headers = match upstream_headers(run, route, target.authority.as_str()) {
        Ok(h) => h,
        Err(why) => return run.error(400, &why),
    };
    if let Some(p) = &plan.policy {
        p.apply_edits(&mut headers);
    }
    if let Some(p) = &plan.plugins {
        p.apply_edits(&mut headers);
    }
    if let Some(t) = &run.trace {
        t.inject(route, &mut headers);
    }
    let query = match &plan.query {
        Some(q) => q.clone(),
        None => case.query.clone(),
    };
    let sent = UpstreamRequest {
        upstream: plan.upstream.name.clone(),
        target: target.url.clone(),
        method: case.method.clone(),
        path: plan.path.clone(),
        query,
        headers,
    };
    let resp = &case.upstream_response;
    let mut status = resp.status;
    let mut rh = resp.headers.clone();
    route.response_headers.apply(&mut rh);
    let plugins_plan = plan
        .plugins
        .as_ref()
        .map(|p| decide::plugins_on_response(p, &route.name, status, &mut rh));
    let decided = match plugins_plan {
        Some(ResponsePlan::Replace(p)) => Some(p),
        _ => match plan
            .policy
            .as_ref()
            .map(|p| decide::on_response(p, &mut status, &mut rh))
        {
            Some(ResponsePlan::Replace(p)) => Some(p),
            _ => None,
        },
    };
    let mut out = match decided {
        Some(p) => run.answer(p),
        _ => {
            let dropped = connection_tokens(
                rh.get_all(http::header::CONNECTION)
                    .iter()
                    .map(|v| v.as_bytes()),
            )
            .unwrap_or_default();
            let mut client_headers = HeaderMap::with_capacity(rh.len());
            for (n, v) in &rh {
                let s = n.as_str();
                if is_hop_by_hop_str(s) || s == "content-length" || dropped.iter().any(|d| d == s) {
                    continue;
                }
                client_headers.append(n.clone(), v.clone());
            }
            let no_body = case.method == "HEAD" || matches!(status, 204 | 304 | 100..=199);
            let body = if no_body {
                Ok(Bytes::new())
            } else {
                response_body(&mut plan, route, status, &client_headers, &resp.body)
            };
            match body {
                Ok(body) => run.finish(status, client_headers, body),
                Err(stop) => body_stopped(run, stop, false),
            }
        }
    };
    out.upstream_request = Some(sent);
    out
}

/// The upstream's response body, whole, through the plugins that read it.
fn response_body(
    plan: &mut decide::Forward,
    route: &Route,
    status: u16,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Bytes, crate::plugins::BodyStop> {
    let Some(run) = plan
        .plugins
        .take_if(|p| p.reads_response_body() && !body.is_empty())
    else {
        return Ok(body.clone());
    };
    // The filter takes a copy of the headers; the client gets `headers`.
    match run.into_response_body(route.max_body_size, status, headers.clone()) {
        Ok(mut filter) => filter.chunk(body.clone(), true),
        Err(run) => {
            plan.plugins = Some(run);
            Ok(body.clone())
        }
    }
}

/// The answer for a body a plugin stopped, as the server gives it before anything was sent.
fn body_stopped(run: &Run<'_>, stop: crate::plugins::BodyStop, request: bool) -> Outcome {
    use crate::plugins::BodyStop;
    match stop {
        BodyStop::Respond(r) => run.respond(&r),
        BodyStop::Failed => run.error(500, "a plugin of this route failed"),
        BodyStop::TooLarge if request => {
            run.error(413, "request body is larger than this route accepts")
        }
        BodyStop::TooLarge => run.error(
            502,
            "the upstream's response body is larger than this route's plugins may hold",
        ),
    }
}

/// The headers the upstream gets: the proxy's own function, so both agree.
fn upstream_headers(
    run: &Run<'_>,
    route: &Route,
    target_authority: &str,
) -> Result<HeaderMap, String> {
    let h = &run.case.headers;
    crate::proxy::headers::upstream_headers(
        || h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        h.len(),
        &Forwarding {
            peer: Some(run.case.peer),
            trusted: run.trusted,
            request_id: &run.request_id,
            upstream_host: &route.upstream_host,
            target_authority,
            inbound: crate::proxy::headers::Inbound::new(run.allow_underscores, route),
            drop_token: run.drop_token.as_ref(),
            auth_headers: &run.auth_headers,
            rules: &route.request_headers,
            https: false,
            client_cert: None,
        },
    )
}
