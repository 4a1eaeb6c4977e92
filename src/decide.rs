//! What the gateway does with a request, decided without sockets: route match, path rewrite,
//! the route's policy hooks and the upstream they leave chosen.
//!
//! The proxy handler and `rustygate test` both go through here, so a fixture exercises the
//! decisions the server makes, not a copy of them:
//! ```text
//! route() ──► [filters: auth fills claims, rate limit, CORS] ──► request() ──► Plan
//!   request(): Rhai on_request ──► WASM plugins' on_request_headers
//!   Plan::Forward ──► (handler: pick target, send | test: synthetic response)
//!     ──► plugins_on_response() (WASM plugins, reverse order) ──► on_response() (Rhai)
//! ```

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http::HeaderMap;

use crate::plugins::{Outcome, PluginRun};
use crate::policy::{
    ClientHeaders, PolicyFailure, Req, RequestInit, RequestState, Res, ResponseState, RoutePolicy,
    Verdict,
};
use crate::router::{RouteId, RouteMatch};
use crate::snapshot::{Route, RouteAction, Snapshot};
use crate::telemetry::trace::TraceId;
use crate::upstream::Upstream;
use crate::wire::StaticResponse;

/// Verified JWT claims of a request, filled by the auth filter (empty until it has run).
pub type Claims = Arc<serde_json::Map<String, serde_json::Value>>;

/// The facts about a request that decisions depend on. `host` is lower-case without port,
/// `path` is normalised.
pub struct Incoming<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub client_ip: IpAddr,
    /// The seam for auth: verified claims, `None` when the route has no auth.
    pub claims: Option<Claims>,
    /// The request's trace (`req.trace_id`); `None` without `[tracing]`.
    pub trace_id: Option<TraceId>,
}

/// The outcome of matching a request against the snapshot's router.
pub enum Routed<'s, 'p> {
    Matched(RouteMatch<'s, 'p>),
    /// The path matches, but not with this method: these would.
    MethodNotAllowed(Vec<&'static str>),
    NoRoute,
}

/// Matches host, method and path.
pub fn route<'s, 'p>(snap: &'s Snapshot, inc: &Incoming<'p>) -> Routed<'s, 'p> {
    match snap.router.lookup(inc.host, inc.method, inc.path) {
        Some(m) => Routed::Matched(m),
        None => {
            let allowed = snap.router.allowed_methods(inc.host, inc.path);
            if allowed.is_empty() {
                Routed::NoRoute
            } else {
                Routed::MethodNotAllowed(allowed)
            }
        }
    }
}

/// What to do with a matched request.
pub enum Plan<'s> {
    /// Answer from the gateway: the route's `respond`, or a policy's `respond` / `redirect`.
    Respond(Cow<'s, StaticResponse>),
    /// A policy's `deny(status, message)`: a JSON error with the request id.
    Deny { status: u16, message: String },
    /// Proxy it.
    Forward(Forward),
    /// The policy failed or ran over a limit: 500, fail closed.
    Failed(PolicyFailure),
}

/// A request that goes upstream.
pub struct Forward {
    pub upstream: Arc<Upstream>,
    /// The path the upstream sees.
    pub path: String,
    /// The query the upstream sees, when a policy changed it; `None`: as the client sent it.
    pub query: Option<Option<String>>,
    /// The policy's state, for its header edits and `on_response`.
    pub policy: Option<PolicyRun>,
    /// The route's WASM plugins in this exchange: their header edits, `on_response_headers`,
    /// and `on_log` when dropped.
    pub plugins: Option<PluginRun>,
}

impl Forward {
    /// Whether a policy's `on_response` may see or change the response head (a plugin may
    /// too, in either shape of it: see `plugins::ResponseFields`).
    pub fn policy_edits_response(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|r| r.policy.policy.has_on_response())
    }
}

/// A policy in the middle of one exchange: the `req` both hooks see.
pub struct PolicyRun {
    pub policy: RoutePolicy,
    pub req: Req,
}

impl PolicyRun {
    /// Applies the header changes `on_request` made to the headers going upstream.
    pub fn apply_edits(&self, headers: &mut HeaderMap) {
        for e in &self.req.state().edits {
            e.apply(headers);
        }
    }
}

/// Runs the route's action, its policy's `on_request` and then its plugins' `on_request_headers`.
/// `headers` gives the client's request headers; it is called only when the route has a policy
/// or plugins.
pub fn request<'s>(
    snap: &'s Snapshot,
    m: &RouteMatch<'_, '_>,
    inc: &Incoming<'_>,
    headers: impl FnOnce() -> ClientHeaders,
) -> (RouteId, Plan<'s>) {
    let id = m.route;
    let Some(route) = snap.routes.get(id) else {
        // The router only holds ids of compiled routes.
        return (id, Plan::Respond(Cow::Owned(internal_error())));
    };
    let (upstream, mut rewritten) = match &route.action {
        RouteAction::Respond(r) if route.policy.is_none() && route.plugins.is_empty() => {
            return (id, Plan::Respond(Cow::Borrowed(r)));
        }
        RouteAction::Respond(_) => (None, None),
        RouteAction::Proxy { upstream, rewrite } => {
            let path = (!rewrite.is_identity()).then(|| rewrite.apply(inc.path, m.params.as_ref()));
            (Some(upstream), path)
        }
    };
    // The fixed order (DESIGN.md, "The request path"): the Rhai policy's `on_request`, then
    // the WASM plugins, which see the headers as the policy left them.
    let mut headers = Some(headers);
    let policy = match &route.policy {
        None => None,
        Some(policy) => {
            let client = headers.take().map(|f| f()).unwrap_or_default();
            let run = policy_run(policy, m, inc, route, upstream, rewritten.take(), client);
            match policy.on_request(&run.req) {
                Err(f) => return (id, Plan::Failed(f)),
                Ok(Some(v)) => return (id, verdict(v)),
                Ok(None) => Some(run),
            }
        }
    };
    let plugins = if route.plugins.is_empty() {
        None
    } else {
        let client = match &policy {
            Some(run) => run.req.state().edited_headers(),
            None => headers.take().map(|f| f()).unwrap_or_default(),
        };
        let info = crate::plugins::RequestInfo {
            incoming: inc,
            route: &route.name,
            config_sha: &snap.version.id,
        };
        match crate::plugins::on_request(&route.plugins, &info, client) {
            (run, Outcome::Continue) => Some(run),
            (_, Outcome::Respond(r)) => return (id, Plan::Respond(Cow::Owned(r))),
            (_, Outcome::Failed) => return (id, plugin_failed()),
        }
    };
    match (policy, &route.action) {
        (Some(run), _) => (id, after_on_request(snap, route, upstream, run, plugins)),
        (None, RouteAction::Respond(r)) => (id, Plan::Respond(Cow::Borrowed(r))),
        (None, RouteAction::Proxy { .. }) => {
            let upstream = upstream.map(Arc::clone);
            let path = rewritten.unwrap_or_else(|| inc.path.to_owned());
            (id, forward_or_internal(upstream, path, None, None, plugins))
        }
    }
}

/// The policy's view of the request, for its `on_request` and `on_response`.
fn policy_run(
    policy: &RoutePolicy,
    m: &RouteMatch<'_, '_>,
    inc: &Incoming<'_>,
    route: &Route,
    upstream: Option<&Arc<Upstream>>,
    upstream_path: Option<String>,
    headers: ClientHeaders,
) -> PolicyRun {
    let params = m
        .params
        .as_ref()
        .map(|p| {
            p.iter()
                .map(|(k, v)| {
                    (
                        k.into(),
                        rhai::Dynamic::from(rhai::ImmutableString::from(v)),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let state = RequestState::new(RequestInit {
        method: inc.method,
        path: inc.path,
        query: inc.query,
        host: inc.host,
        client_ip: inc.client_ip,
        trace_id: inc.trace_id,
        route: &route.name,
        upstream: upstream.map(|u| u.name.as_str()).unwrap_or(""),
        upstream_path,
        params,
        claims: inc.claims.clone(),
        config: Arc::clone(&policy.config),
        headers,
    });
    PolicyRun {
        policy: policy.clone(),
        req: Req(Arc::new(Mutex::new(state))),
    }
}

fn after_on_request<'s>(
    snap: &'s Snapshot,
    route: &'s Route,
    upstream: Option<&Arc<Upstream>>,
    run: PolicyRun,
    plugins: Option<PluginRun>,
) -> Plan<'s> {
    let (chosen, path, query) = {
        let s = run.req.state();
        let chosen = s.chosen_upstream().map(str::to_owned);
        let query = s.new_query().map(|q| q.map(str::to_owned));
        (chosen, s.upstream_path().to_owned(), query)
    };
    let upstream = match chosen {
        None => upstream.map(Arc::clone),
        Some(name) => match snap.upstreams.iter().find(|u| u.name == name) {
            Some(u) => Some(Arc::clone(u)),
            None => {
                return Plan::Failed(PolicyFailure {
                    route: Arc::clone(&run.policy.route),
                    script: Arc::clone(&run.policy.policy.path),
                    hook: "on_request",
                    reason: crate::policy::Reason::UnknownUpstream,
                    line: None,
                    message: format!("set_upstream(\"{name}\"): this config has no such upstream"),
                });
            }
        },
    };
    match (upstream, &route.action) {
        (None, RouteAction::Respond(r)) => Plan::Respond(Cow::Borrowed(r)),
        (upstream, _) => forward_or_internal(upstream, path, query, Some(run), plugins),
    }
}

fn forward_or_internal<'s>(
    upstream: Option<Arc<Upstream>>,
    path: String,
    query: Option<Option<String>>,
    policy: Option<PolicyRun>,
    plugins: Option<PluginRun>,
) -> Plan<'s> {
    match upstream {
        Some(upstream) => Plan::Forward(Forward {
            upstream,
            path,
            query,
            policy,
            plugins,
        }),
        None => Plan::Respond(Cow::Owned(internal_error())),
    }
}

fn verdict<'s>(v: Verdict) -> Plan<'s> {
    match v {
        Verdict::Deny { status, message } => Plan::Deny { status, message },
        Verdict::Respond(r) => Plan::Respond(Cow::Owned(r)),
    }
}

/// A `fail_closed` plugin failed (logged and counted by `plugins`): a 500 with the request id.
fn plugin_failed<'s>() -> Plan<'s> {
    Plan::Deny {
        status: 500,
        message: "a plugin of this route failed".to_owned(),
    }
}

fn internal_error() -> StaticResponse {
    StaticResponse {
        status: 500,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"internal routing error"),
    }
}

/// What `on_response` decided about a response.
pub enum ResponsePlan<'s> {
    /// Send the (possibly changed) upstream response.
    Pass,
    Replace(Plan<'s>),
}

/// Runs `on_response` on the status and headers the client would get, changing them in place.
pub fn on_response<'s>(
    run: &PolicyRun,
    status: &mut u16,
    headers: &mut HeaderMap,
) -> ResponsePlan<'s> {
    if !run.policy.policy.has_on_response() {
        return ResponsePlan::Pass;
    }
    let res = Res(Arc::new(Mutex::new(ResponseState {
        status: *status,
        headers: std::mem::take(headers),
    })));
    let out = run.policy.on_response(&run.req, &res);
    let mut s = res.state();
    *status = s.status;
    *headers = std::mem::take(&mut s.headers);
    match out {
        Ok(None) => ResponsePlan::Pass,
        Ok(Some(v)) => ResponsePlan::Replace(verdict(v)),
        Err(f) => ResponsePlan::Replace(Plan::Failed(f)),
    }
}

/// Runs the route's plugins' `on_response_headers`, in reverse order, before the policy's
/// `on_response`, changing the headers in place.
pub fn plugins_on_response<'s>(
    run: &PluginRun,
    route: &str,
    status: u16,
    headers: &mut HeaderMap,
) -> ResponsePlan<'s> {
    plugins_plan(run.on_response(route, status, headers))
}

/// [`plugins_on_response`] on a head in the client side's types, as a list.
pub fn plugins_on_response_list<'s>(
    run: &PluginRun,
    route: &str,
    status: u16,
    fields: &mut Vec<(
        actix_http::header::HeaderName,
        actix_http::header::HeaderValue,
    )>,
) -> ResponsePlan<'s> {
    plugins_plan(run.on_response_list(route, status, fields))
}

fn plugins_plan<'s>(o: Outcome) -> ResponsePlan<'s> {
    match o {
        Outcome::Continue => ResponsePlan::Pass,
        Outcome::Respond(r) => ResponsePlan::Replace(Plan::Respond(Cow::Owned(r))),
        Outcome::Failed => ResponsePlan::Replace(plugin_failed()),
    }
}
