//! The edge filters' actix side: reading what they need from the request, and their answers.
//! The decisions themselves live in `crate::filters`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use actix_http::header as ax;
use actix_http::{HttpMessage as _, Request};
use actix_web::HttpResponse;
use http::{HeaderName, HeaderValue};

use crate::filters::cors::CorsPolicy;
use crate::filters::rate_limit::{
    Decision, KeyValue, LimitKey, Limiters, RouteLimiter, client_key,
};
use crate::router::RouteId;
use crate::snapshot::{Route, Snapshot};
use crate::util::digits;

/// The method a CORS preflight asks about, if this request is one (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`).
pub(crate) fn preflight_method(req: &Request) -> Option<&str> {
    if req.method() != actix_web::http::Method::OPTIONS || !req.headers().contains_key("origin") {
        return None;
    }
    req.headers()
        .get("access-control-request-method")?
        .to_str()
        .ok()
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Answers a preflight: 204 with the CORS headers, or 403 without any.
pub(crate) fn preflight(
    cors: &CorsPolicy,
    req: &Request,
    method: &str,
    request_id: &HeaderValue,
) -> (u16, HttpResponse) {
    let origin = header(req, "origin").unwrap_or("");
    match cors.preflight(
        origin,
        method,
        header(req, "access-control-request-headers"),
    ) {
        Ok(headers) => {
            let mut resp = HttpResponse::NoContent();
            for (n, v) in &headers {
                resp.insert_header((n.as_str(), v.as_bytes()));
            }
            resp.insert_header(("x-request-id", request_id.as_bytes()));
            (204, resp.finish())
        }
        Err(why) => {
            tracing::debug!(origin, ?why, "CORS preflight refused");
            let resp = HttpResponse::Forbidden()
                .insert_header(("x-request-id", request_id.as_bytes()))
                .insert_header(("vary", "Origin"))
                .json(serde_json::json!({
                    "error": "CORS preflight refused",
                    "request_id": request_id.to_str().unwrap_or(""),
                }));
            (403, resp)
        }
    }
}

/// CORS headers for the response to an actual request on a route with CORS (always `Vary`).
pub(crate) fn cors_headers(cors: &CorsPolicy, req: &Request) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = match header(req, "origin") {
        Some(origin) => cors.response_headers(origin),
        None => Vec::new(),
    };
    out.push((http::header::VARY, HeaderValue::from_static("Origin")));
    out
}

/// Where a `header:<name>` rate-limit or hash key is read: the headers the gateway sets from
/// verified claims and from a verified client certificate first, then the client's headers the
/// route keeps. A client's own copy of an identity or client-certificate header, or a header
/// with `_` that is dropped, never picks the bucket it is counted in.
pub(crate) struct KeySource<'a> {
    pub req: &'a Request,
    pub inbound: &'a crate::proxy::headers::Inbound<'a>,
    pub verified: &'a [(HeaderName, HeaderValue)],
    pub client_cert: Option<&'a crate::proxy::headers::ClientCert>,
}

impl KeySource<'_> {
    /// A header the gateway set from verified data, whatever the client sent under its name.
    fn gateway_set(&self, name: &str) -> Option<&[u8]> {
        if let Some((_, v)) = self.verified.iter().find(|(n, _)| n.as_str() == name) {
            return Some(v.as_bytes());
        }
        self.client_cert
            .and_then(|c| c.field(name))
            .map(|v| v.as_bytes())
    }

    /// The header as a rate-limit or hash key: the gateway's own value when it sets the header,
    /// else the client's if the route keeps it. A client header sent on several lines is their
    /// values joined with `", "`, the one field value the upstream reads them as (RFC 9110
    /// §5.3), rather than whichever line comes first.
    pub(crate) fn header_value(&self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        if let Some(v) = self.gateway_set(name) {
            return Some(Cow::Borrowed(v));
        }
        if !self.inbound.keeps(name) {
            return None;
        }
        let mut lines = self.req.headers().get_all(name);
        let first = lines.next()?.as_bytes();
        let Some(second) = lines.next() else {
            return Some(Cow::Borrowed(first));
        };
        let mut joined = first.to_vec();
        for v in std::iter::once(second).chain(lines) {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(v.as_bytes());
        }
        Some(Cow::Owned(joined))
    }
}

/// Each worker's limiters for the current snapshot, found in the shared registry once per route
/// and snapshot version; afterwards a check is a vector index and the limiter's own atomics.
/// Limiters by route for one snapshot version.
type LimiterCache = (String, HashMap<RouteId, Option<RouteLimiter>>);

pub(crate) struct WorkerLimiters {
    registry: Arc<Limiters>,
    cache: RefCell<LimiterCache>,
}

impl WorkerLimiters {
    pub fn new(registry: Arc<Limiters>) -> Self {
        Self {
            registry,
            cache: RefCell::new((String::new(), HashMap::new())),
        }
    }

    fn limiter(&self, snap: &Snapshot, id: RouteId, route: &Route) -> Option<RouteLimiter> {
        let spec = route.rate_limit.as_ref()?;
        let mut cache = self.cache.borrow_mut();
        if cache.0 != snap.version.id {
            cache.0.clone_from(&snap.version.id);
            cache.1.clear();
        }
        cache
            .1
            .entry(id)
            .or_insert_with(|| self.registry.route_limiter(&route.name, spec))
            .clone()
    }

    /// Checks the route's limit: the numbers for the response's `RateLimit-*` headers, or the
    /// 429 response when the request is over it. Awaits only for a limit in the shared store.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        snap: &Snapshot,
        id: RouteId,
        route: &Route,
        keys: KeySource<'_>,
        client: std::net::IpAddr,
        claims: Option<&crate::filters::jwt::Claims>,
        request_id: &HeaderValue,
    ) -> Result<Option<RateHeaders>, HttpResponse> {
        let Some(spec) = route.rate_limit.as_ref() else {
            return Ok(None);
        };
        let Some(limiter) = self.limiter(snap, id, route) else {
            return Ok(None);
        };
        let key = match &spec.key {
            LimitKey::ClientIp => client_key(client, spec.ipv6_prefix),
            LimitKey::Route => KeyValue::Whole,
            // Long values are hashed by `KeyValue::text`, so a key holds at most 256 bytes.
            // A request without the key counts by its client address (as Kong does): one
            // shared bucket let one client without it lock out every other.
            LimitKey::Header(name) => match keys.header_value(name.as_str()) {
                Some(v) => KeyValue::text(&v),
                None => client_key(client, spec.ipv6_prefix),
            },
            // A number and the string of its digits (`42`, `"42"`) are one key.
            LimitKey::Claim(c) => match claims.and_then(|m| m.get(c)) {
                Some(serde_json::Value::String(s)) => KeyValue::text(s.as_bytes()),
                Some(other) => KeyValue::text(other.to_string().as_bytes()),
                None => client_key(client, spec.ipv6_prefix),
            },
        };
        match limiter.check(&key).await {
            Decision::Allowed {
                remaining, reset, ..
            } => Ok(Some(RateHeaders {
                limit: spec.requests,
                remaining,
                reset: whole_seconds(reset),
            })),
            Decision::Uncounted => Ok(None),
            Decision::Limited {
                retry_after, reset, ..
            } => {
                let mut resp = HttpResponse::TooManyRequests();
                resp.insert_header((ax::RETRY_AFTER, whole_seconds(retry_after)));
                let rate = RateHeaders {
                    limit: spec.requests,
                    remaining: 0,
                    reset: whole_seconds(reset),
                };
                rate.append(|n, v| {
                    resp.insert_header((n, v));
                });
                Err(resp
                    .insert_header(("x-request-id", request_id.as_bytes()))
                    .json(serde_json::json!({
                        "error": "rate limit exceeded",
                        "request_id": request_id.to_str().unwrap_or(""),
                    })))
            }
        }
    }
}

/// `d` in seconds, rounded up.
fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// What a response of a rate-limited route says about the client's quota (the IETF draft's
/// `RateLimit-*` fields, as Kong sends them): `limit` requests a window, `remaining` of them
/// now, the whole quota back in `reset` seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateHeaders {
    limit: u32,
    remaining: u32,
    reset: u64,
}

impl RateHeaders {
    /// Hands the three headers to `add`, without allocating for values under 10,000.
    pub fn append(&self, mut add: impl FnMut(ax::HeaderName, ax::HeaderValue)) {
        add(RATELIMIT_LIMIT, digits::header_value(self.limit.into()));
        add(
            RATELIMIT_REMAINING,
            digits::header_value(self.remaining.into()),
        );
        add(RATELIMIT_RESET, digits::header_value(self.reset));
    }
}

const RATELIMIT_LIMIT: ax::HeaderName = ax::HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: ax::HeaderName = ax::HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: ax::HeaderName = ax::HeaderName::from_static("ratelimit-reset");

/// What a successful authentication hands to the rest of the request.
pub(crate) struct Verified {
    pub claims: crate::filters::jwt::Claims,
    /// Headers from verified claims, set on the upstream request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the token was found, when it is not forwarded.
    pub drop_token: Option<crate::filters::jwt::TokenPlace>,
    /// The client's query without the token, when it was found there and is not forwarded
    /// (`Some(None)`: nothing is left).
    pub query: Option<Option<String>>,
}

/// Runs the route's auth filter over the client headers `inbound` keeps. `Ok(None)`: no token
/// on an optional route.
pub(crate) async fn authenticate(
    auth: &crate::snapshot::RouteAuth,
    req: &Request,
    inbound: crate::proxy::headers::Inbound<'_>,
) -> Result<Option<Verified>, crate::filters::jwt::AuthError> {
    use crate::filters::jwt::{AuthError, TokenPlace, TokenPlaces, without_query_param};
    let p = &auth.provider;
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .filter(|(n, _)| inbound.keeps(n));
    let places = TokenPlaces::collect(p, headers, req.uri().query());
    let Some((token, place)) = p.token(&places)? else {
        return if auth.optional {
            Ok(None)
        } else {
            Err(AuthError::Missing)
        };
    };
    let claims = p.verify(token).await?;
    let headers = p.claim_headers(&claims)?;
    let drop_token = p.removal(place);
    let query = match (&drop_token, req.uri().query()) {
        (Some(TokenPlace::Query(name)), Some(q)) => Some(without_query_param(q, name)),
        _ => None,
    };
    Ok(Some(Verified {
        claims,
        headers,
        drop_token,
        query,
    }))
}
