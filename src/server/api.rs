//! The dashboard's JSON API on the admin listener (`/api/v1/...`, documented in
//! docs/admin-api.md): what `/status` says plus routes, upstreams, the last reloads, sampled
//! traffic, the fleet of replicas ([`fleet`]), and "which route would serve this request?".
//! Read-only.
//!
//! Access: with `RUSTYGATE_ADMIN_TOKEN` set, every call needs `Authorization: Bearer <token>`
//! (compared in constant time; failures count towards the admin listener's per-address limit).
//! Without one, the API answers only when the admin listener is bound to loopback, and only
//! requests whose `Host` is a loopback name (a web page that rebinds its own domain to
//! 127.0.0.1 cannot read it). Answers are never cached.

mod fleet;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::admin::{AdminState, auth_failed, get_or_head, given_token};
use super::admin_limits::{cross_site, not_json};
use super::webhooks::secret_matches;
use crate::snapshot::{Route, RouteAction, Snapshot};

/// Largest `/api/v1/explain` body.
pub const MAX_EXPLAIN_BODY: usize = 64 * 1024;
/// Longest URL `/api/v1/explain` takes (what proxies commonly accept in a request line).
pub const MAX_EXPLAIN_URL: usize = 8 * 1024;
/// Most headers an explained request may carry, and the longest value.
pub const MAX_EXPLAIN_HEADERS: usize = 64;
pub const MAX_EXPLAIN_HEADER_VALUE: usize = 8 * 1024;
/// Routes one `/api/v1/routes` answer lists at most (`limit` can ask for fewer).
pub const MAX_ROUTES_LISTED: usize = 5_000;
const DEFAULT_ROUTES_LISTED: usize = 1_000;
/// Longest `q` filter of `/api/v1/routes`.
const MAX_FILTER: usize = 256;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .service(read("/status", status))
            .service(read("/routes", routes))
            .service(read("/upstreams", upstreams))
            .service(read("/reloads", reloads))
            .service(read("/traffic", traffic))
            .service(read("/fleet", fleet::fleet))
            .service(
                web::resource("/explain")
                    .route(web::post().to(explain))
                    .default_service(web::to(|req, state| wrong_method(req, state, "POST"))),
            )
            .default_service(web::to(not_found)),
    );
}

/// A `GET`/`HEAD` endpoint of the API. Another method gets its 405 only past the [`gate`]: which
/// endpoints exist is not told to a caller without the token.
fn read<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    get_or_head(path, handler)
        .default_service(web::to(|req, state| wrong_method(req, state, "GET, HEAD")))
}

/// `405` with `Allow`, for a caller the [`gate`] lets in.
async fn wrong_method(
    req: HttpRequest,
    state: web::Data<AdminState>,
    allow: &'static str,
) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    HttpResponse::MethodNotAllowed()
        .insert_header(("allow", allow))
        .finish()
}

/// An answer of this API: JSON, never cached, never sniffed.
pub(crate) fn answer(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("cache-control", "no-store"))
        .insert_header(("x-content-type-options", "nosniff"))
        .json(body)
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    answer(status, &json!({ "message": message }))
}

async fn not_found(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    error(StatusCode::NOT_FOUND, "no such API endpoint")
}

/// How a caller was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// With the admin token.
    Token,
    /// No token is configured and the admin listener is on loopback.
    Loopback,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Token => "token",
            Access::Loopback => "loopback-without-token",
        }
    }
}

/// Whether `req` may read the API; otherwise the refusal to send.
pub(crate) fn gate(req: &HttpRequest, state: &AdminState) -> Result<Access, Box<HttpResponse>> {
    match state.control.admin_token.as_deref() {
        Some(token) => {
            if secret_matches(token, given_token(req)) {
                return Ok(Access::Token);
            }
            tracing::warn!(
                peer = super::admin_limits::logged_peer(req),
                path = req.path(),
                "dashboard API call with a missing or wrong token"
            );
            let unauthorized = HttpResponse::Unauthorized()
                .insert_header(("www-authenticate", "Bearer"))
                .insert_header(("cache-control", "no-store"))
                .json(json!({ "message": "a valid bearer token is required (RUSTYGATE_ADMIN_TOKEN)" }));
            Err(Box::new(auth_failed(req, state, unauthorized)))
        }
        None if !state.loopback => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "the dashboard is disabled: no RUSTYGATE_ADMIN_TOKEN is configured and the admin \
             listener is not bound to loopback; set a token or bind --admin-listen to 127.0.0.1",
        ))),
        None if !loopback_host(req) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "without an admin token the dashboard answers only requests for localhost, \
             127.0.0.1 or [::1] (the Host header names another host)",
        ))),
        None => Ok(Access::Loopback),
    }
}

/// Whether the request's `Host` names this machine's loopback.
fn loopback_host(req: &HttpRequest) -> bool {
    let Some(host) = req.headers().get("host").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // `[::1]:8081`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `GET /api/v1/status`: what `/status` says, with uptime, how the caller got in, and the
/// applied commit's page on its forge.
async fn status(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let access = match gate(&req, &state) {
        Ok(a) => a,
        Err(refusal) => return *refusal,
    };
    let snap = state.store.load();
    let (mut applied, attempted, last_fetch_at, last_fetch_error, stale) = {
        let s = state
            .control
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (
            serde_json::to_value(&s.applied).unwrap_or_default(),
            serde_json::to_value(&s.attempted).unwrap_or_default(),
            s.last_fetch_at.clone(),
            s.last_fetch_error.clone(),
            s.stale,
        )
    };
    let source = &snap.version.source;
    if let Some(obj) = applied.as_object_mut() {
        let url = obj
            .get("sha")
            .and_then(|s| s.as_str())
            .and_then(|sha| commit_url(source, sha));
        obj.insert("commit_url".into(), url.into());
    }
    let uptime = SystemTime::now()
        .duration_since(state.started_at)
        .unwrap_or(Duration::ZERO);
    answer(
        StatusCode::OK,
        &json!({
            "gateway_version": env!("CARGO_PKG_VERSION"),
            "started_at": rfc3339(state.started_at),
            "uptime_seconds": uptime.as_secs(),
            "access": access.name(),
            "version": snap.version.id,
            "source": source,
            "ref": snap.version.reference,
            "loaded_at": rfc3339(snap.version.loaded_at),
            "routes": snap.routes.len(),
            "upstreams": snap.upstreams.len(),
            "warnings": snap.warnings,
            "applied": applied,
            "attempted": attempted,
            "last_fetch_at": last_fetch_at,
            "last_fetch_error": last_fetch_error,
            "stale": stale,
        }),
    )
}

/// The web page of commit `sha` when `source` is a repository on GitHub or GitLab (gitlab.com
/// or a host named `gitlab.*`); `None` for anything else, or a directory's content hash.
pub fn commit_url(source: &str, sha: &str) -> Option<String> {
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (host, path) = if let Some((_, rest)) = source.split_once("://") {
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let (authority, path) = rest.split_once('/')?;
        (authority.split(':').next()?, path)
    } else {
        // scp-like `git@github.com:org/repo.git`
        let (head, path) = source.split_once(':')?;
        (head.rsplit_once('@').map_or(head, |(_, h)| h), path)
    };
    let host = host.to_ascii_lowercase();
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let safe = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
            && !s.split('/').any(|seg| seg.is_empty() || seg == "..")
    };
    if !safe(path) || !safe(&host) {
        return None;
    }
    if host == "github.com" && path.split('/').count() == 2 {
        Some(format!("https://github.com/{path}/commit/{sha}"))
    } else if (host == "gitlab.com" || host.starts_with("gitlab.")) && path.contains('/') {
        Some(format!("https://{host}/{path}/-/commit/{sha}"))
    } else {
        None
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesQuery {
    /// Case-insensitive substring of name, host, path, upstream or file.
    q: Option<String>,
    limit: Option<usize>,
}

fn query<T: for<'de> Deserialize<'de>>(req: &HttpRequest) -> Result<T, Box<HttpResponse>> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("invalid query string: {e}"),
            ))
        })
}

/// One route as the API lists it.
fn route_json(r: &Route) -> Value {
    let s = &r.source;
    let (upstream, respond) = match &r.action {
        RouteAction::Proxy { upstream, .. } => (Some(upstream.name.as_str()), None),
        RouteAction::Respond(resp) => (None, Some(resp.status)),
    };
    json!({
        "name": r.name,
        "host": s.host,
        "path": (!s.prefix).then_some(&*s.path),
        "prefix": s.prefix.then_some(&*s.path),
        "methods": s.methods,
        "upstream": upstream,
        "respond_status": respond,
        "auth": r.auth.as_ref().map(|a| format!(
            "{}{}",
            a.provider.name,
            if a.optional { " (optional)" } else { "" }
        )),
        "rate_limit": r.rate_limit.as_ref().map(crate::plan::describe_rate_limit),
        "cors": r.cors.as_deref().map(crate::plan::describe_cors),
        "policy": r.policy.as_ref().map(|p| p.policy.path.to_string()),
        "plugins": r.plugins.iter().map(|u| u.plugin.name.to_string()).collect::<Vec<_>>(),
        "websocket": r.websocket,
        "source": { "file": &*s.file, "line": s.line, "column": s.column },
    })
}

fn route_matches(r: &Route, q: &str) -> bool {
    let s = &r.source;
    let has = |field: &str| field.to_ascii_lowercase().contains(q);
    has(&r.name)
        || s.host.as_deref().is_some_and(has)
        || has(&s.path)
        || has(&s.file)
        || match &r.action {
            RouteAction::Proxy { upstream, .. } => has(&upstream.name),
            RouteAction::Respond(_) => false,
        }
}

/// `GET /api/v1/routes[?q=<filter>&limit=<n>]`: the served routes in config order.
async fn routes(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    let q: RoutesQuery = match query(&req) {
        Ok(q) => q,
        Err(e) => return *e,
    };
    let filter = q.q.unwrap_or_default().trim().to_ascii_lowercase();
    if filter.len() > MAX_FILTER {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("q is longer than {MAX_FILTER} bytes"),
        );
    }
    let limit = q
        .limit
        .unwrap_or(DEFAULT_ROUTES_LISTED)
        .min(MAX_ROUTES_LISTED);
    let snap = state.store.load();
    let mut matched = 0usize;
    let mut listed = Vec::new();
    for r in snap.routes.iter() {
        if filter.is_empty() || route_matches(r, &filter) {
            matched += 1;
            if listed.len() < limit {
                listed.push(route_json(r));
            }
        }
    }
    answer(
        StatusCode::OK,
        &json!({
            "version": snap.version.id,
            "total": snap.routes.len(),
            "matched": matched,
            "truncated": matched > listed.len(),
            "routes": listed,
        }),
    )
}

/// `GET /api/v1/upstreams`: targets with their health, in-flight requests, ejections, the
/// circuit breaker, and latency from the metrics over the traffic ring's window (15 minutes).
async fn upstreams(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    let snap = state.store.load();
    let metrics = &state.control.metrics;
    let (bounds, live) = crate::telemetry::latency::UpstreamWindow::read(metrics);
    let (latency, window_seconds, from) = {
        let t = state.traffic.lock().unwrap_or_else(|p| p.into_inner());
        (
            t.upstreams().window(&bounds, &live),
            t.window_seconds(),
            t.upstreams().from(),
        )
    };
    // Where the window begins: after the last sample that left it, or at the start.
    let since = from
        .map(|at| SystemTime::UNIX_EPOCH + Duration::from_secs(at))
        .unwrap_or(state.started_at);
    let overflow = counter_by(&metrics.upstream_overflow, "upstream", "limit");
    let list: Vec<Value> = snap
        .upstreams
        .iter()
        .map(|u| {
            let facts = crate::plan::one_upstream(u);
            let targets: Vec<Value> = u
                .targets
                .iter()
                .map(|t| {
                    let st = &t.state;
                    let ejected_for = st.ejected_for();
                    let (failures, fives) = st.streaks();
                    json!({
                        "url": t.url,
                        "weight": t.weight,
                        "available": st.available(),
                        "active_health": match &u.health {
                            None => "not checked",
                            Some(_) if st.is_healthy() => "healthy",
                            Some(_) => "unhealthy",
                        },
                        "passive_health": if ejected_for.is_some() { "ejected" } else { "ok" },
                        "ejected_for_ms": ejected_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                        "ejections": st.ejections(),
                        "consecutive_failures": failures,
                        "consecutive_5xx": fives,
                        "in_flight": st.in_flight(),
                    })
                })
                .collect();
            let lat = latency.get(u.name.as_str()).copied();
            let active = u.shared.active();
            let pending = u.shared.pending();
            let full = u.limits.max_requests.is_some_and(|m| active >= m)
                || u.limits.max_pending.is_some_and(|m| pending >= m);
            json!({
                "name": u.name,
                "balance": facts.balance,
                "health_check": u.health.as_ref().map(|h| json!({
                    "path": h.path,
                    "interval_ms": u64::try_from(h.interval.as_millis()).unwrap_or(u64::MAX),
                })),
                "settings": facts.settings,
                "targets": targets,
                "breaker": {
                    "state": if full { "open" } else { "closed" },
                    "max_requests": u.limits.max_requests,
                    "max_pending": u.limits.max_pending,
                    "active": active,
                    "pending": pending,
                    "overflowed": overflow.get(&u.name).cloned().unwrap_or_default(),
                },
                "latency": {
                    "requests": lat.map_or(0, |l| l.requests),
                    "p50_ms": lat.and_then(|l| l.p50_ms),
                    "p99_ms": lat.and_then(|l| l.p99_ms),
                    "window_seconds": window_seconds,
                    "since": rfc3339(since),
                },
            })
        })
        .collect();
    answer(
        StatusCode::OK,
        &json!({ "version": snap.version.id, "upstreams": list }),
    )
}

/// A counter's values by its `key` label, then its `sub` label.
fn counter_by(
    c: &prometheus::IntCounterVec,
    key: &str,
    sub: &str,
) -> HashMap<String, HashMap<String, u64>> {
    use prometheus::core::Collector;
    let mut out: HashMap<String, HashMap<String, u64>> = HashMap::new();
    for family in c.collect() {
        for m in family.get_metric() {
            let label = |n: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == n)
                    .map(|l| l.value().to_owned())
            };
            if let (Some(k), Some(s)) = (label(key), label(sub)) {
                out.entry(k)
                    .or_default()
                    .insert(s, m.get_counter().get_value() as u64);
            }
        }
    }
    out
}

/// `GET /api/v1/reloads`: the last reloads that tried a version, newest first.
async fn reloads(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    let list: Vec<Value> = {
        let s = state
            .control
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        s.history()
            .iter()
            .rev()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
            .collect()
    };
    answer(
        StatusCode::OK,
        &json!({
            "capacity": crate::source::reload::RELOAD_HISTORY,
            "reloads": list,
        }),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficQuery {
    /// How many of the busiest routes to give series for (default 10, at most 50).
    limit: Option<usize>,
    /// Only this route.
    route: Option<String>,
}

/// `GET /api/v1/traffic[?limit=<n>&route=<name>]`: the sampled ring.
async fn traffic(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    let q: TrafficQuery = match query(&req) {
        Ok(q) => q,
        Err(e) => return *e,
    };
    let limit = q.limit.unwrap_or(10).min(50);
    let view = state
        .traffic
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .view(limit, q.route.as_deref());
    answer(
        StatusCode::OK,
        &serde_json::to_value(view).unwrap_or_default(),
    )
}

/// The body of `POST /api/v1/explain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
}

fn get() -> String {
    "GET".to_owned()
}

/// Reads a request body up to `cap` bytes; `None` past it.
pub(crate) async fn read_capped(
    mut payload: web::Payload,
    cap: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Checks an explain request's fields: a case to run, or why not.
fn explain_case(body: &[u8]) -> Result<crate::testing::Case, String> {
    let r: ExplainRequest = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an explain request: {e}"))?;
    if r.method.len() > 32 {
        return Err("method is longer than 32 bytes".into());
    }
    if r.url.is_empty() {
        return Err("url is empty: give a full URL (http://host/path) or a path".into());
    }
    if r.url.len() > MAX_EXPLAIN_URL {
        return Err(format!(
            "url is {} bytes long; at most {MAX_EXPLAIN_URL} are taken",
            r.url.len()
        ));
    }
    if r.headers.len() > MAX_EXPLAIN_HEADERS {
        return Err(format!(
            "{} headers given; at most {MAX_EXPLAIN_HEADERS} are taken",
            r.headers.len()
        ));
    }
    let mut headers = http::HeaderMap::new();
    for (name, value) in &r.headers {
        let Some(value) = value.as_str() else {
            return Err(format!(
                "header `{}`: the value must be a string",
                shorten(name)
            ));
        };
        if value.len() > MAX_EXPLAIN_HEADER_VALUE {
            return Err(format!(
                "header `{}` is {} bytes long; at most {MAX_EXPLAIN_HEADER_VALUE} are taken",
                shorten(name),
                value.len()
            ));
        }
        let n = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{}` is not a valid header name", shorten(name)))?;
        let v = http::HeaderValue::from_str(value)
            .map_err(|_| format!("header `{n}` has a value that is not valid in HTTP"))?;
        headers.append(n, v);
    }
    crate::testing::Case::adhoc(&r.method, &r.url, headers).map_err(|e| shorten(&e))
}

/// At most 200 characters of `s`, for messages that quote the caller's input.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 200 {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(200).collect();
    out.push('…');
    out
}

/// `POST /api/v1/explain` with `{"method": "GET", "url": "http://host/path", "headers": {..}}`:
/// which route would serve the request, and what would happen to it, decided by the code
/// `rustygate test` runs (route match, auth, the route's plugins and policy) against the served
/// snapshot. Nothing is sent anywhere.
async fn explain(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AdminState>,
) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    if let Some(refusal) = cross_site(&req).or_else(|| not_json(&req)) {
        return refusal;
    }
    let body = match read_capped(payload, MAX_EXPLAIN_BODY).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is larger than {MAX_EXPLAIN_BODY} bytes"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let case = match explain_case(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let snap = state.store.load();
    // Policies and plugins run under their limits; still, off the admin listener's thread.
    let decided = web::block(move || {
        let outcome = crate::testing::exchange::run(&snap, &case);
        explanation(&snap, &case, &outcome)
    })
    .await;
    match decided {
        Ok(v) => answer(StatusCode::OK, &v),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the explanation could not be computed",
        ),
    }
}

/// The answer of `explain`: the outcome and, in words, why.
fn explanation(
    snap: &Snapshot,
    case: &crate::testing::Case,
    out: &crate::testing::Outcome,
) -> Value {
    let normalized = crate::router::normalize_path_with(&case.path, snap.paths)
        .map(|p| p.into_owned())
        .ok();
    let route = out
        .route
        .as_deref()
        .and_then(|name| snap.routes.iter().find(|r| r.name == name));
    let mut why = Vec::new();
    let at = format!(
        "host `{}`, path `{}`",
        case.host,
        normalized.as_deref().unwrap_or(&case.path)
    );
    match route {
        Some(r) => {
            let s = &r.source;
            why.push(format!(
                "{} {at} matches route `{}` ({}:{}:{}): host {}, {} `{}`, methods {}",
                case.method,
                r.name,
                s.file,
                s.line,
                s.column,
                s.host.as_deref().unwrap_or("any"),
                if s.prefix { "prefix" } else { "path" },
                s.path,
                s.methods
                    .as_ref()
                    .map(|m| m.join(" "))
                    .unwrap_or_else(|| "any".into())
            ));
        }
        None if out.status == 405 => why.push(format!(
            "a route matches {at}, but not the method {}",
            case.method
        )),
        None if out.status == 404 => why.push(format!("no route matches {at}")),
        // Refused before routing (a path that does not normalise): the gateway's message.
        None => why.push(format!(
            "answered {} before routing: {}",
            out.status,
            out.body.chars().take(200).collect::<String>()
        )),
    }
    match &out.upstream_request {
        Some(u) => why.push(format!(
            "forwarded to upstream `{}` (first target {}) as {} {}{}",
            u.upstream,
            u.target,
            u.method,
            u.path,
            u.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        )),
        None if route.is_some() => why.push(format!("answered {} by the gateway", out.status)),
        None => {}
    }
    if let Some(e) = &out.policy_error {
        why.push(format!("the policy failed: {e}"));
    }
    if let Some(n) = &out.note {
        why.push(n.clone());
    }
    let body: String = out.body.chars().take(1024).collect();
    json!({
        "request": {
            "method": case.method,
            "host": case.host,
            "path": case.path,
            "normalized_path": normalized,
            "query": case.query,
        },
        "status": out.status,
        "route": route.map(route_json),
        "upstream": out.upstream_request.as_ref().map(|u| json!({
            "name": u.upstream,
            "target": u.target,
            "path": u.path,
            "query": u.query,
        })),
        "body": body,
        "policy_error": out.policy_error,
        "note": out.note,
        "why": why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_urls_for_known_forges_only() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        for (source, want) in [
            (
                "https://github.com/acme/gw-config.git",
                Some(format!("https://github.com/acme/gw-config/commit/{sha}")),
            ),
            (
                "git@github.com:acme/gw-config.git",
                Some(format!("https://github.com/acme/gw-config/commit/{sha}")),
            ),
            (
                "ssh://git@github.com:22/acme/gw-config",
                Some(format!("https://github.com/acme/gw-config/commit/{sha}")),
            ),
            (
                "https://gitlab.com/acme/platform/gw.git",
                Some(format!(
                    "https://gitlab.com/acme/platform/gw/-/commit/{sha}"
                )),
            ),
            (
                "https://gitlab.example.net/ops/gw",
                Some(format!("https://gitlab.example.net/ops/gw/-/commit/{sha}")),
            ),
            ("https://git.example.net/ops/gw.git", None),
            ("file:///srv/gw.git", None),
            ("/srv/config", None),
            ("https://github.com/acme/../evil", None),
            ("https://github.com/acme/gw\"onload=x", None),
        ] {
            assert_eq!(commit_url(source, sha), want, "{source}");
        }
        assert_eq!(
            commit_url("https://github.com/acme/gw.git", "sha256:0123456789ab"),
            None
        );
    }

    #[test]
    fn explain_input_is_bounded_and_named() {
        let ok =
            explain_case(br#"{"url": "http://api.example.com/a?b=1", "headers": {"x-a": "1"}}"#)
                .unwrap();
        assert_eq!(
            (ok.method.as_str(), ok.host.as_str(), ok.path.as_str()),
            ("GET", "api.example.com", "/a")
        );
        assert_eq!(ok.query.as_deref(), Some("b=1"));
        let long_url = format!(r#"{{"url": "http://x/{}"}}"#, "a".repeat(MAX_EXPLAIN_URL));
        for (body, says) in [
            (&b"not json"[..], "not an explain request"),
            (br#"{"url": "http://x/", "extra": 1}"#, "unknown field"),
            (br#"{"url": ""}"#, "url is empty"),
            (long_url.as_bytes(), "at most 8192 are taken"),
            (br#"{"url": "ftp://x/"}"#, "only http and https"),
            (
                br#"{"url": "http://x/", "method": "G E T"}"#,
                "not an HTTP method",
            ),
            (
                br#"{"url": "http://x/", "headers": {"bad name": "v"}}"#,
                "not a valid header name",
            ),
            (
                br#"{"url": "http://x/", "headers": {"x-a": "line\nbreak"}}"#,
                "not valid in HTTP",
            ),
            (
                br#"{"url": "http://x/", "headers": {"x-a": 1}}"#,
                "must be a string",
            ),
        ] {
            let e = explain_case(body).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
