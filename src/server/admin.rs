//! The admin listener: health, readiness, status, metrics, the reload triggers (admin call and
//! git webhooks), and the read-only operator dashboard (`/ui/`, see `ui`) with its JSON API
//! (`/api/v1/...`, see `api`). Bound to loopback by default. Endpoints that change state need a
//! secret; with none configured they are disabled (403), as the start-up log says.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use super::Control;
use super::admin_limits::BodyBudget;
use super::webhooks::{
    FailureLimit, PushAction, ReplayGuard, github_signature_ok, parse_push, push_action,
    secret_matches,
};
use crate::snapshot::SnapshotStore;
use crate::source::reload::Trigger;
use crate::telemetry::trace::TraceContext;

pub(crate) struct AdminState {
    pub store: Arc<SnapshotStore>,
    pub control: Control,
    pub started_at: SystemTime,
    pub deliveries: ReplayGuard,
    /// Failed authentications per client address (admin token and webhook secrets alike).
    pub failures: FailureLimit,
    /// The admin listener is bound to a loopback address: without an admin token, the
    /// dashboard and its API answer only then.
    pub loopback: bool,
    /// The dashboard's traffic ring, filled by [`crate::telemetry::traffic::run`].
    pub traffic: Arc<Mutex<crate::telemetry::traffic::Traffic>>,
    /// The bytes of webhook bodies read at once, and the largest body.
    pub bodies: BodyBudget,
    /// The last fleet view read from the store, and when (see [`AdminState::fleet_view`]).
    fleet_view: tokio::sync::Mutex<Option<(Instant, Arc<FleetAnswer>)>>,
}

/// A fleet view as [`Fleet::view`](crate::store::fleet::Fleet::view) gives it.
pub(crate) type FleetAnswer =
    Option<Result<crate::store::fleet::FleetView, crate::store::StoreError>>;

/// How long a fleet view read from the store answers `/status?fleet=true` and
/// `/api/v1/fleet`: the first needs no token, and each read is two round trips to the store.
const FLEET_VIEW_FOR: Duration = Duration::from_secs(1);

/// Failed authentications a client address may make per [`FAILURE_WINDOW`] before its further
/// failures are answered 429 instead of 401.
pub(crate) const MAX_FAILURES: u32 = 30;
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses whose failures are remembered at once.
const MAX_FAILING_CLIENTS: usize = 10_000;

impl AdminState {
    pub fn new(
        store: Arc<SnapshotStore>,
        control: Control,
        bound: SocketAddr,
        traffic: Arc<Mutex<crate::telemetry::traffic::Traffic>>,
        webhook_max_body: usize,
    ) -> Self {
        // Registered once per registry; a second admin listener on the same metrics keeps the
        // first registration (AlreadyReg), which serves the same counters.
        let _ = control
            .metrics
            .register_by_route(control.limiters.evicted_metric());
        let shared = control.limiters.store_metrics();
        let _ = control.metrics.register_by_route(shared.errors);
        let _ = control.metrics.register(Box::new(shared.latency));
        if let Some(f) = &control.fleet {
            let _ = control.metrics.register(Box::new(f.gauge.clone()));
        }
        let bodies = BodyBudget::new(webhook_max_body);
        let _ = control.metrics.register(Box::new(bodies.metric()));
        Self {
            store,
            control,
            started_at: SystemTime::now(),
            deliveries: ReplayGuard::new(4096),
            failures: FailureLimit::new(MAX_FAILURES, FAILURE_WINDOW, MAX_FAILING_CLIENTS),
            loopback: bound.ip().is_loopback(),
            traffic,
            bodies,
            fleet_view: Default::default(),
        }
    }

    /// The fleet view, read from the store at most once per [`FLEET_VIEW_FOR`], one read at a
    /// time: callers that come while a read is in flight wait for it (at most the store's call
    /// timeout) and take its answer, so a flood of calls is one read a second, not one each.
    pub async fn fleet_view(&self, fleet: &crate::store::fleet::Fleet) -> Arc<FleetAnswer> {
        let mut last = self.fleet_view.lock().await;
        if let Some((at, view)) = last.as_ref()
            && at.elapsed() < FLEET_VIEW_FOR
        {
            return Arc::clone(view);
        }
        let view = Arc::new(fleet.view().await);
        *last = Some((Instant::now(), Arc::clone(&view)));
        view
    }
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.configure(super::api::configure)
        .configure(super::ui::configure)
        .service(get_or_head("/healthz", healthz))
        .service(get_or_head("/readyz", readyz))
        .service(get_or_head("/status", status))
        .service(get_or_head("/metrics", metrics))
        .service(web::resource("/admin/reload").route(web::post().to(admin_reload)))
        .service(web::resource("/hooks/github").route(web::post().to(github)))
        .service(web::resource("/hooks/gitlab").route(web::post().to(gitlab)));
}

/// `path` answering `GET` and `HEAD` (the same head, no body) with `handler`; another method
/// gets 405 with `Allow`. (`App::route` answered 404 for another method, as if the path did not
/// exist, and 404 for `HEAD`.)
pub(crate) fn get_or_head<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready once a snapshot is being served, which is from the first successful compile on.
async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let snap = state.store.load();
    HttpResponse::Ok()
        .content_type("text/plain")
        .body(format!("ready {}\n", snap.version.id))
}

/// `GET /status`; with `?fleet=true` also every live replica of the fleet (from the store of
/// `[rate_limit_store]`; `"fleet": null` without one).
async fn status(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let fleet = req
        .query_string()
        .split('&')
        .any(|kv| kv == "fleet=true" || kv == "fleet=1");
    let snap = state.store.load();
    let reload = state
        .control
        .status
        .lock()
        .map(|s| serde_json::to_value(&*s).unwrap_or_default())
        .unwrap_or_default();
    let body = json!({
        "version": snap.version.id,
        "source": snap.version.source,
        "loaded_at": humantime::format_rfc3339_seconds(snap.version.loaded_at).to_string(),
        "routes": snap.routes.len(),
        "upstreams": snap.upstreams.len(),
        "warnings": snap.warnings,
        "applied": reload.get("applied"),
        "attempted": reload.get("attempted"),
        "last_fetch_at": reload.get("last_fetch_at"),
        "last_fetch_error": reload.get("last_fetch_error"),
        "stale": reload.get("stale"),
        "started_at": humantime::format_rfc3339_seconds(state.started_at).to_string(),
        "gateway_version": env!("CARGO_PKG_VERSION"),
    });
    let mut body = body;
    if let Some(f) = &state.control.fleet {
        body["replica"] = json!(f.replica);
    }
    if fleet {
        let view = match &state.control.fleet {
            Some(f) => match &*state.fleet_view(f).await {
                Some(Ok(v)) => serde_json::to_value(v).unwrap_or_default(),
                Some(Err(e)) => json!({ "error": format!("the store did not answer: {e}") }),
                None => serde_json::Value::Null,
            },
            None => serde_json::Value::Null,
        };
        body["fleet"] = view;
    }
    HttpResponse::Ok().json(body)
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let snapshot = state.store.load();
    state.control.metrics.observe_upstreams(&snapshot);
    state.control.metrics.observe_certificates(&snapshot);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.control.metrics.render())
}

pub(crate) fn reply(status: u16, message: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .json(json!({ "message": message }))
}

/// Queues a reload; a full queue means one is already pending, which answers this one too (a
/// force is carried by [`Control::force_pending`](super::Control::force_pending) then).
fn queue(tx: &mpsc::Sender<Trigger>, trigger: Trigger) -> HttpResponse {
    let ids = trigger.trace().map(|t| t.hex());
    let trace_id = ids.as_ref().map(|i| i.0.as_str());
    let span_id = ids.as_ref().map(|i| i.1.as_str());
    match tx.try_send(trigger) {
        Ok(()) => {
            tracing::info!(trigger = trigger.name(), trace_id, span_id, "reload queued");
            reply(202, "reload queued")
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::info!(
                trigger = trigger.name(),
                trace_id,
                span_id,
                "reload already pending; it answers this request too"
            );
            reply(202, "reload queued")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => reply(503, "the gateway is shutting down"),
    }
}

/// The trace of a request that asks for a reload, when `[tracing]` is on: the caller's (a CI
/// job that sends a `traceparent`) continued, or a new one. The reload's log lines carry it.
fn request_trace(req: &HttpRequest, store: &SnapshotStore) -> Option<TraceContext> {
    let snapshot = store.load();
    let cfg = snapshot.tracing.as_ref()?;
    let headers = req.headers();
    Some(TraceContext::for_request(cfg, |f| {
        crate::telemetry::trace::actix_field(headers, f)
    }))
}

/// The answer to a failed authentication: 401, or 429 once this client failed too often. Only
/// called after the check, so valid calls never reach it.
pub(crate) fn auth_failed(
    req: &HttpRequest,
    state: &AdminState,
    unauthorized: HttpResponse,
) -> HttpResponse {
    let client = req
        .peer_addr()
        .map(|a| super::admin_limits::client_key(a.ip()))
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if state.failures.record_failure(client) {
        unauthorized
    } else {
        reply(429, "too many failed authentications from this address")
    }
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a [u8]> {
    req.headers().get(name).map(|v| v.as_bytes())
}

/// The bearer token of `req`; empty without one, and with more than one `Authorization` header
/// (which of them counts would be a guess: none does, and the call fails as unauthenticated).
pub(crate) fn given_token(req: &HttpRequest) -> &[u8] {
    let mut all = req.headers().get_all("authorization");
    match (all.next(), all.next()) {
        (Some(one), None) => crate::util::bearer(one.as_bytes()).unwrap_or(b""),
        _ => b"",
    }
}

/// `POST /admin/reload[?force=true]` with `Authorization: Bearer <RUSTYGATE_ADMIN_TOKEN>`.
async fn admin_reload(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let Some(token) = state.control.admin_token.as_deref() else {
        return reply(
            403,
            "admin endpoints are disabled: no admin token is configured",
        );
    };
    if let Some(refusal) = super::admin_limits::cross_site(&req) {
        return refusal;
    }
    if !secret_matches(token, given_token(&req)) {
        tracing::warn!(
            peer = super::admin_limits::logged_peer(&req),
            "admin call with a missing or wrong token"
        );
        let unauthorized = HttpResponse::Unauthorized()
            .insert_header(("www-authenticate", "Bearer"))
            .json(json!({ "message": "a valid bearer token is required" }));
        return auth_failed(&req, &state, unauthorized);
    }
    let Some(tx) = &state.control.reload else {
        return reply(409, "this gateway has no reloadable source");
    };
    let force = req
        .query_string()
        .split('&')
        .any(|kv| kv == "force=true" || kv == "force=1");
    if force {
        state
            .control
            .force_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let trace = request_trace(&req, &state.store);
    queue(tx, Trigger::Admin { force, trace })
}

/// The checks every webhook shares: configured, authentic (`verify` gets the secret; failures
/// count towards the client's limit), and not a replay of a delivery id already seen. `Some` is
/// the refusal to send.
fn webhook_refusal(
    req: &HttpRequest,
    state: &AdminState,
    source: &str,
    verify: impl FnOnce(&str) -> bool,
    delivery_header: &str,
) -> Option<HttpResponse> {
    let Some(secret) = state.control.webhook_secret.as_deref() else {
        return Some(reply(
            403,
            "webhooks are disabled: no webhook secret is configured",
        ));
    };
    if !verify(secret) {
        tracing::warn!(
            peer = super::admin_limits::logged_peer(req),
            source,
            "webhook with a missing or wrong signature or token"
        );
        return Some(auth_failed(
            req,
            state,
            reply(401, "invalid signature or token"),
        ));
    }
    if let Some(id) = header(req, delivery_header).and_then(|v| std::str::from_utf8(v).ok())
        && !state.deliveries.first_time(id)
    {
        return Some(reply(200, "delivery already processed"));
    }
    None
}

/// `answer` to an authentic delivery. [`webhook_refusal`] took its id as seen; it stays seen only
/// when the delivery was accepted (2xx), so that one refused (a push without a ref, a gateway
/// shutting down) can be corrected and sent again under the same id, as GitHub's "Redeliver"
/// does.
fn keep_delivery_if_accepted(
    req: &HttpRequest,
    state: &AdminState,
    delivery_header: &str,
    answer: HttpResponse,
) -> HttpResponse {
    if !answer.status().is_success()
        && let Some(id) = header(req, delivery_header).and_then(|v| std::str::from_utf8(v).ok())
    {
        state.deliveries.forget(id);
    }
    answer
}

/// `then` with a webhook's body; a body over [`MAX_WEBHOOK_BODY`] or broken is refused in JSON
/// by [`webhook_body`] (the cap is `--webhook-max-body`, by default `MAX_WEBHOOK_BODY`), and
/// that refusal is the answer instead.
fn with_body(
    body: Result<Bytes, HttpResponse>,
    then: impl FnOnce(Bytes) -> HttpResponse,
) -> HttpResponse {
    match body {
        Ok(body) => then(body),
        Err(refusal) => refusal,
    }
}

/// A webhook's body, read only when its headers can lead somewhere: webhooks are configured
/// (else 403), the header that authenticates it is there (else 401, counted as a failed
/// authentication), and so is its event header (else 400). Then within the listener's
/// [`BodyBudget`]. None of these refusals reads a byte of the body, so a flood of heads with
/// large `Content-Length`s holds no memory.
async fn webhook_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AdminState,
    auth_header: &str,
    event_header: &str,
) -> Result<Bytes, HttpResponse> {
    if state.control.webhook_secret.is_none() {
        return Err(reply(
            403,
            "webhooks are disabled: no webhook secret is configured",
        ));
    }
    if header(req, auth_header).is_none_or(<[u8]>::is_empty) {
        tracing::warn!(
            peer = super::admin_limits::logged_peer(req),
            header = auth_header,
            "webhook without its signature or token header"
        );
        let message = format!("the {auth_header} header is required");
        return Err(auth_failed(req, state, reply(401, &message)));
    }
    if header(req, event_header).is_none() {
        return Err(reply(
            400,
            &format!("the {event_header} header is required"),
        ));
    }
    state.bodies.read(req, payload).await
}

/// `POST /hooks/github`: HMAC-SHA256 of the raw body, checked before anything is parsed.
async fn github(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let body = webhook_body(
        &req,
        payload,
        &state,
        "x-hub-signature-256",
        "x-github-event",
    )
    .await;
    with_body(body, |body| {
        let verify =
            |secret: &str| github_signature_ok(secret, &body, header(&req, "x-hub-signature-256"));
        if let Some(answer) = webhook_refusal(&req, &state, "github", verify, "x-github-delivery") {
            return answer;
        }
        let answer = match header(&req, "x-github-event") {
            Some(b"ping") => reply(200, "pong"),
            Some(b"push") => push(&req, &state, &body, "github"),
            _ => reply(202, "event ignored"),
        };
        keep_delivery_if_accepted(&req, &state, "x-github-delivery", answer)
    })
}

/// `POST /hooks/gitlab`: the `X-Gitlab-Token` secret, compared in constant time.
async fn gitlab(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let body = webhook_body(&req, payload, &state, "x-gitlab-token", "x-gitlab-event").await;
    with_body(body, |body| {
        let verify =
            |secret: &str| secret_matches(secret, header(&req, "x-gitlab-token").unwrap_or(b""));
        if let Some(answer) = webhook_refusal(&req, &state, "gitlab", verify, "x-gitlab-event-uuid")
        {
            return answer;
        }
        let answer = match header(&req, "x-gitlab-event") {
            Some(b"Push Hook") => push(&req, &state, &body, "gitlab"),
            _ => reply(202, "event ignored"),
        };
        keep_delivery_if_accepted(&req, &state, "x-gitlab-event-uuid", answer)
    })
}

/// A push of a new commit to the tracked branch (or any push, for a pinned ref) queues a fetch.
/// Everything else that is authentic is acknowledged with 202 so that GitHub and GitLab do not
/// mark the delivery as failed.
fn push(req: &HttpRequest, state: &AdminState, body: &[u8], source: &'static str) -> HttpResponse {
    let Some(tx) = &state.control.reload else {
        return reply(409, "this gateway has no reloadable source");
    };
    let Some(event) = parse_push(body) else {
        return reply(400, "push event without a ref");
    };
    let action = {
        let status = state
            .control
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        push_action(&event, state.control.branch.as_deref(), |sha| {
            status.seen(sha)
        })
    };
    match action {
        PushAction::Reload => {
            let trace = request_trace(req, &state.store);
            if let Some(f) = &state.control.fleet {
                f.announce_head(event.after.clone());
            }
            queue(tx, Trigger::Webhook { source, trace })
        }
        PushAction::Ignore(why) => {
            tracing::debug!(source, reference = %event.reference, after = ?event.after, why, "push ignored");
            reply(202, why)
        }
    }
}
