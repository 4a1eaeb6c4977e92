//! The client's response from the upstream's: the head checked and edited, its fields relayed
//! (URLs naming the upstream rewritten), the body streamed back, or the WebSocket tunnel after
//! a 101.

use actix_http::{Payload, Request};
use actix_web::body::BodySize;
use actix_web::http::header as ax;
use actix_web::{HttpMessage, HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use http::header::{self, HeaderValue};

use super::errors::{INVALID_RESPONSE, invalid_response, status_code};
use super::exchange::Exchange;
use super::{
    AX_FORWARDED_PROTO, AX_REQUEST_ID, AX_SEC_WEBSOCKET_KEY, GRPC_STATUS, X_REQUEST_ID, answer,
    plugin_body,
};

use crate::decide::{self, ResponsePlan};
use crate::plugins::ResponseFields;
use crate::proxy::body::{OnFinish, UpstreamBody};
use crate::proxy::headers::{connection_tokens, is_hop_by_hop_str};
use crate::proxy::response::{UpstreamHead, UpstreamResponse};
use crate::proxy::{location, websocket};
use crate::server::WorkerState;
use crate::snapshot::{Route, Snapshot};

use crate::wire::headers::actix_name;

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
pub(super) enum Relay {
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
pub(super) fn relays_head_as_is(
    ex: &Exchange,
    route: &Route,
    plan: &decide::Forward,
    websocket: bool,
) -> bool {
    !websocket && !ex.grpc && route.response_headers.is_empty() && !plan.policy_edits_response()
}

/// Turns the upstream's response into the client's, streaming the body. `tunnel_in` is the
/// client's payload when the request is a WebSocket handshake.
#[allow(clippy::too_many_arguments)]
pub(super) fn client_response(
    mut ex: Box<Exchange>,
    req: &Request,
    state: &WorkerState,
    snap: &Snapshot,
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
                snap,
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
            let (out, status, declared) = match edited_head(
                &mut ex, req, state, snap, route, plan, &mut parts, handshake,
            ) {
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
    let trailers = ex.h2.as_ref().map(|s| s.trailers.clone());
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
                ex.release();
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
    // The body may stream for hours: from here the exchange keeps its route's record, not the
    // snapshot, so that reloads meanwhile free theirs.
    ex.release();
    let on_finish: OnFinish = Box::new(move |bytes, end| {
        // Cut because the client took nothing within the send timeout, not because it left.
        let end = match end {
            Err("client_gone") if ex.send_timed_out() => Err("send_timeout"),
            end => end,
        };
        ex.emit(status, bytes, end)
    });
    out.body(
        UpstreamBody::new(body, size, route.read_timeout, Some(on_finish)).with_trailers(trailers),
    )
    .into()
}

/// The client's response head from an `http` 1.x one: checked (a 101 only for a WebSocket
/// `handshake`, framing), edited by the route's response header rules, the policy's
/// `on_response` and the plugins, then relayed. Returns it with its status and declared
/// `Content-Length`, or the answer that replaces it.
#[allow(clippy::too_many_arguments)]
fn edited_head(
    ex: &mut Exchange,
    req: &Request,
    state: &WorkerState,
    snap: &Snapshot,
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
        snap,
        req,
        parts.headers.iter_mut().map(|(n, v)| (n.as_str(), v)),
        |b| http::HeaderValue::from_maybe_shared(b).ok(),
    );
    route.response_headers.apply(&mut parts.headers);
    // The plugins first, then the policy, which sees what they left (DESIGN.md, "The request
    // path"). A replaced response drops the upstream body unread; its connection is not reused.
    if let Some(p) = &plan.plugins
        && let ResponsePlan::Replace(plan) =
            decide::plugins_on_response(p, &route.name, status, &mut parts.headers)
    {
        return Err(Box::new(answer(ex, state, plan)));
    }
    if let Some(run) = &plan.policy
        && let ResponsePlan::Replace(plan) =
            decide::on_response(run, &mut status, &mut parts.headers)
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
    snap: &Snapshot,
    req: &Request,
    fields: impl Iterator<Item = (&'a str, &'a mut V)>,
    make: impl Fn(Bytes) -> Option<V>,
) {
    for (name, value) in fields {
        if let Some(v) = url_field(name).and_then(|f| client_url(ex, snap, req, f, value.as_ref()))
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
fn client_url(
    ex: &Exchange,
    snap: &Snapshot,
    req: &Request,
    field: location::Field,
    value: &[u8],
) -> Option<Bytes> {
    let route = snap.routes.get(ex.route?)?;
    let crate::snapshot::RouteAction::Proxy { upstream, rewrite } = &route.action else {
        return None;
    };
    if !route.rewrite_location {
        return None;
    }
    // A trusted proxy in front says which scheme the client used.
    let trusted = req
        .peer_addr()
        .is_some_and(|a| snap.client_ip.is_trusted(a.ip()));
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

/// The client's 101, whose body is the tunnel (see [`websocket::Tunnel`]). The exchange (its
/// `max_requests` slot, in-flight counts and `Busy`) lives until the tunnel closes, and is
/// logged then.
fn websocket_tunnel(
    mut ex: Box<Exchange>,
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
    // A tunnel may live for days: it keeps its route's record, not the snapshot.
    ex.release();
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
