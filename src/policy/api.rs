//! The host API scripts see: the `req` and `res` objects, the actions a hook can return
//! (`deny`, `redirect`, `respond`) and a few helpers (regex, base64, hashes, JSON, time, random).
//!
//! `req` and `res` are handles onto state the gateway owns: a hook changes the request that goes
//! upstream (or the response that goes back) through them, and `req.ctx` carries values from
//! `on_request` to `on_response`. Headers the gateway owns cannot be touched from a script.
//! Reference with one example each: `policies/README.md`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map};
use sha2::{Digest, Sha256};

use super::engine::INVALID_ACTION;
use crate::wire::StaticResponse;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// A change a hook made to the upstream request's headers, replayed in order on the headers the
/// proxy builds (after the route's own `request_headers` rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl HeaderEdit {
    pub fn apply(&self, headers: &mut HeaderMap) {
        match self {
            HeaderEdit::Set(n, v) => {
                headers.insert(n.clone(), v.clone());
            }
            HeaderEdit::Append(n, v) => {
                headers.append(n.clone(), v.clone());
            }
            HeaderEdit::Remove(n) => {
                headers.remove(n);
            }
        }
    }
}

/// The client's request as a hook is given it, for [`RequestState::new`].
pub struct RequestInit<'a> {
    pub method: &'a str,
    /// The normalised request path the route matched.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: &'a str,
    pub client_ip: IpAddr,
    /// The request's trace; `None` without `[tracing]`.
    pub trace_id: Option<crate::telemetry::trace::TraceId>,
    pub route: &'a str,
    /// The route's upstream; empty for `respond` routes.
    pub upstream: &'a str,
    /// The path the upstream will see when it is not `path` (the route rewrites it).
    pub upstream_path: Option<String>,
    pub params: Map,
    /// Verified JWT claims; converted for the script only when it reads `req.claims`.
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    pub config: Arc<Map>,
    /// The client's headers.
    pub headers: ClientHeaders,
}

/// The client's request headers as a hook reads them: name/value pairs in one buffer, a name's
/// values in the order they came. A hook looks up two or three names, so scanning a dozen short
/// names beats building a map for every request (parsing and hashing each name first).
#[derive(Debug, Default, Clone)]
pub struct ClientHeaders {
    bytes: Vec<u8>,
    /// Where each header's name and value end in `bytes`; each starts where the previous ended.
    ends: Vec<(usize, usize)>,
}

impl ClientHeaders {
    /// Room for `n` headers of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> ClientHeaders {
        ClientHeaders {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    /// The buffer and where each header's name and value end in it (see the fields), for a
    /// map made from them without a copy (the WASM plugins' request map).
    pub fn into_parts(self) -> (Vec<u8>, Vec<(usize, usize)>) {
        (self.bytes, self.ends)
    }

    /// Adds a header as received (HTTP parsers give names in lower case).
    pub fn push(&mut self, name: &str, value: &[u8]) {
        self.bytes.extend_from_slice(name.as_bytes());
        let name_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((name_end, self.bytes.len()));
    }

    /// The values of `name` (any case), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut start = 0;
        self.ends.iter().filter_map(move |&(name_end, end)| {
            let (n, v) = (
                self.bytes.get(start..name_end).unwrap_or_default(),
                self.bytes.get(name_end..end).unwrap_or_default(),
            );
            start = end;
            n.eq_ignore_ascii_case(name.as_bytes()).then_some(v)
        })
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, end)| {
            let n = self.bytes.get(start..name_end).unwrap_or_default();
            let v = self.bytes.get(name_end..end).unwrap_or_default();
            start = end;
            // Names were pushed as `&str`.
            (std::str::from_utf8(n).unwrap_or(""), v)
        })
    }
}

impl<'a> FromIterator<(&'a str, &'a [u8])> for ClientHeaders {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a [u8])>>(headers: I) -> ClientHeaders {
        let headers = headers.into_iter();
        let n = headers.size_hint().0;
        // Most request headers are short: one allocation for the usual request.
        let mut out = ClientHeaders {
            bytes: Vec::with_capacity(n * 48),
            ends: Vec::with_capacity(n),
        };
        for (name, value) in headers {
            out.push(name, value);
        }
        out
    }
}

impl From<&HeaderMap> for ClientHeaders {
    fn from(headers: &HeaderMap) -> ClientHeaders {
        headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect()
    }
}

/// What a hook sees of the request and what it changed.
///
/// The request's own strings sit in one buffer and become script strings only when a script
/// reads them: a hook that reads two headers should not pay for six string allocations it never
/// looks at.
#[derive(Debug, Default)]
pub struct RequestState {
    /// method, path, host, query, route and upstream, back to back; `ends` marks where each stops.
    text: String,
    ends: [usize; 6],
    has_query: bool,
    client_ip: Option<IpAddr>,
    trace_id: Option<crate::telemetry::trace::TraceId>,
    /// Set by `set_upstream`.
    chosen_upstream: Option<ImmutableString>,
    /// Set by `set_query`; `Some(None)` drops the query.
    new_query: Option<Option<String>>,
    /// The path the upstream will see when it differs from `path` (rewrite, then `set_path`).
    upstream_path: Option<String>,
    pub params: Map,
    claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    claims_map: Option<Map>,
    pub config: Arc<Map>,
    pub ctx: Map,
    /// The client's headers as they came; reads see them through `edits` ([`Self::header_values`]).
    pub headers: ClientHeaders,
    pub edits: Vec<HeaderEdit>,
}

impl RequestState {
    pub fn new(init: RequestInit<'_>) -> RequestState {
        let parts = [
            init.method,
            init.path,
            init.host,
            init.query.unwrap_or(""),
            init.route,
            init.upstream,
        ];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0; 6];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.push_str(part);
            *end = text.len();
        }
        RequestState {
            text,
            ends,
            has_query: init.query.is_some(),
            client_ip: Some(crate::util::canonical_ip(init.client_ip)),
            trace_id: init.trace_id,
            upstream_path: init.upstream_path,
            params: init.params,
            claims: init.claims,
            config: init.config,
            headers: init.headers,
            ..RequestState::default()
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..self.ends[i]).unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.part(0)
    }

    /// The normalised request path the route matched.
    pub fn path(&self) -> &str {
        self.part(1)
    }

    pub fn host(&self) -> &str {
        self.part(2)
    }

    /// The query as the upstream will see it (the client's, unless `set_query` changed it).
    pub fn query(&self) -> Option<&str> {
        match &self.new_query {
            Some(q) => q.as_deref(),
            None => self.has_query.then(|| self.part(3)),
        }
    }

    pub fn route(&self) -> &str {
        self.part(4)
    }

    /// The route's upstream, or the one `set_upstream` chose; empty for `respond` routes.
    pub fn upstream(&self) -> &str {
        match &self.chosen_upstream {
            Some(u) => u.as_str(),
            None => self.part(5),
        }
    }

    /// The upstream `set_upstream` chose, if it was called.
    pub fn chosen_upstream(&self) -> Option<&str> {
        self.chosen_upstream.as_ref().map(|u| u.as_str())
    }

    /// The query `set_query` set, if it was called (`Some(None)`: drop the query).
    pub fn new_query(&self) -> Option<Option<&str>> {
        self.new_query.as_ref().map(|q| q.as_deref())
    }

    /// The path the upstream will see (after the route's rewrite, then `set_path`).
    pub fn upstream_path(&self) -> &str {
        self.upstream_path.as_deref().unwrap_or_else(|| self.path())
    }

    /// The values of header `name` (any case) as the upstream will get them: the client's,
    /// changed by the hook's `set_header` / `append_header` / `remove_header` so far. The edits
    /// are replayed on reads instead of on a copy of the headers: most hooks set a header or two
    /// and never read it back.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        let named = |n: &HeaderName| n.as_str().eq_ignore_ascii_case(name);
        let last_reset = self.edits.iter().rposition(|e| match e {
            HeaderEdit::Set(n, _) | HeaderEdit::Remove(n) => named(n),
            HeaderEdit::Append(..) => false,
        });
        let (client, set, appended) = match last_reset.map(|i| (i, &self.edits[i])) {
            None => (Some(self.headers.get_all(name)), None, &self.edits[..]),
            Some((i, HeaderEdit::Set(_, v))) => (None, Some(v.as_bytes()), &self.edits[i + 1..]),
            Some((i, _)) => (None, None, &self.edits[i + 1..]),
        };
        let appended = appended.iter().filter_map(move |e| match e {
            HeaderEdit::Append(n, v) if n.as_str().eq_ignore_ascii_case(name) => Some(v.as_bytes()),
            _ => None,
        });
        client.into_iter().flatten().chain(set).chain(appended)
    }

    /// The request headers as the upstream will get them from the policy (the client's, with
    /// the hook's edits made): what the route's plugins see after `on_request`. Names the hook
    /// did not touch keep their place; the ones it set, appended or removed follow, as
    /// [`Self::header_values`] reads them.
    pub fn edited_headers(&self) -> ClientHeaders {
        if self.edits.is_empty() {
            return self.headers.clone();
        }
        let mut touched: Vec<&str> = Vec::new();
        for e in &self.edits {
            let (HeaderEdit::Set(n, _) | HeaderEdit::Append(n, _) | HeaderEdit::Remove(n)) = e;
            if !touched.contains(&n.as_str()) {
                touched.push(n.as_str());
            }
        }
        let mut out =
            ClientHeaders::with_capacity(self.headers.ends.len(), self.headers.bytes.len());
        for (n, v) in self.headers.iter() {
            if !touched.iter().any(|t| t.eq_ignore_ascii_case(n)) {
                out.push(n, v);
            }
        }
        for name in touched {
            for v in self.header_values(name) {
                out.push(name, v);
            }
        }
        out
    }

    fn client_ip_string(&self) -> ImmutableString {
        self.client_ip
            .map(|ip| ImmutableString::from(ip.to_string()))
            .unwrap_or_default()
    }

    /// The trace id in lowercase hex (as in `traceparent` and the access log); `""` without
    /// `[tracing]`. Made only when a script reads it.
    fn trace_id_string(&self) -> ImmutableString {
        self.trace_id
            .map(|t| {
                let hex = t.hex();
                ImmutableString::from(std::str::from_utf8(&hex).unwrap_or(""))
            })
            .unwrap_or_default()
    }

    fn claims(&mut self) -> Map {
        if self.claims_map.is_none() {
            let m = self
                .claims
                .as_deref()
                .map(super::to_map)
                .unwrap_or_default();
            self.claims_map = Some(m);
        }
        self.claims_map.clone().unwrap_or_default()
    }
}

/// What `on_response` sees of the response and changes.
#[derive(Debug, Default)]
pub struct ResponseState {
    pub status: u16,
    pub headers: HeaderMap,
}

/// `req` in a script.
#[derive(Clone)]
pub struct Req(pub Arc<Mutex<RequestState>>);

/// `res` in a script.
#[derive(Clone)]
pub struct Res(pub Arc<Mutex<ResponseState>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a hook cannot leave the state half-written in a way that matters: the
    // request that owned it fails anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Req {
    pub fn state(&self) -> MutexGuard<'_, RequestState> {
        lock(&self.0)
    }
}

impl Res {
    pub fn state(&self) -> MutexGuard<'_, ResponseState> {
        lock(&self.0)
    }
}

/// What a hook returned to answer the request itself.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A gateway error: JSON body with the message and the request id.
    Deny { status: u16, message: String },
    /// A response built by the script (`respond`, `redirect`).
    Respond(StaticResponse),
}

impl Verdict {
    pub fn status(&self) -> u16 {
        match self {
            Verdict::Deny { status, .. } => *status,
            Verdict::Respond(r) => r.status,
        }
    }
}

fn invalid(msg: impl std::fmt::Display) -> Box<EvalAltResult> {
    format!("{INVALID_ACTION}{msg}").into()
}

/// Headers that only the gateway may set or remove: framing, hop-by-hop and forwarding
/// (`wire::headers::is_gateway_owned_str`, the list plugins are refused too).
pub fn gateway_owned(name: &HeaderName) -> bool {
    crate::wire::headers::is_gateway_owned_str(name.as_str())
}

fn header_name(name: &str) -> RhaiResult<HeaderName> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(format!("`{name}` is not a valid header name")))?;
    if gateway_owned(&n) {
        return Err(invalid(format!(
            "header `{name}` is managed by the gateway"
        )));
    }
    Ok(n)
}

fn header_value(name: &str, value: &str) -> RhaiResult<HeaderValue> {
    HeaderValue::from_str(value).map_err(|_| {
        invalid(format!(
            "the value for header `{name}` is not a valid header value"
        ))
    })
}

/// A header a script sets or appends (`edit` is `HeaderEdit::Set` or `Append`), checked.
fn checked_edit(
    name: &str,
    value: &str,
    edit: fn(HeaderName, HeaderValue) -> HeaderEdit,
) -> RhaiResult<HeaderEdit> {
    Ok(edit(header_name(name)?, header_value(name, value)?))
}

/// Records a header change to the upstream request (replayed by the proxy, see [`HeaderEdit`]).
fn edit_request(r: &Req, edit: RhaiResult<HeaderEdit>) -> RhaiResult<Dynamic> {
    r.state().edits.push(edit?);
    Ok(Dynamic::UNIT)
}

/// Makes a header change to the response the client gets.
fn edit_response(r: &Res, edit: RhaiResult<HeaderEdit>) -> RhaiResult<Dynamic> {
    edit?.apply(&mut r.state().headers);
    Ok(Dynamic::UNIT)
}

fn get_header(h: &HeaderMap, name: &str) -> Dynamic {
    first_text(h.get(name).map(HeaderValue::as_bytes).into_iter())
}

fn header_values(h: &HeaderMap, name: &str) -> Array {
    texts(h.get_all(name).iter().map(HeaderValue::as_bytes))
}

/// The first value, as a script string; `()` when there is none or it is not text.
fn first_text<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Dynamic {
    values
        .next()
        .and_then(text)
        .map(|s| Dynamic::from(ImmutableString::from(s)))
        .unwrap_or(Dynamic::UNIT)
}

/// The values that are text, as script strings.
fn texts<'a>(values: impl Iterator<Item = &'a [u8]>) -> Array {
    values
        .filter_map(text)
        .map(|s| Dynamic::from(ImmutableString::from(s)))
        .collect()
}

/// A header value as text: visible ASCII, spaces and tabs (what `HeaderValue::to_str` accepts).
fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

fn status_in(status: i64, range: std::ops::RangeInclusive<i64>, what: &str) -> RhaiResult<u16> {
    if range.contains(&status) {
        Ok(status as u16)
    } else {
        Err(invalid(format!(
            "{what} status {status} is outside {}-{}",
            range.start(),
            range.end()
        )))
    }
}

fn query_param(query: Option<&str>, name: &str) -> Dynamic {
    let Some(q) = query else {
        return Dynamic::UNIT;
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return Dynamic::from(ImmutableString::from(percent_decode(v)));
        }
    }
    Dynamic::UNIT
}

/// `%XX` and `+` decoding for query values; invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Registers the host API on `engine`.
pub(crate) fn register(engine: &mut Engine, limits: &super::Limits) {
    register_request(engine, limits.max_map_size, limits.max_string_size);
    register_response(engine);
    register_actions(engine);
    register_host_calls(engine);
    register_helpers(engine);
}

/// What a call in [`HOST_CALLS`] gives back, for the direct form's type check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Returns {
    Text,
    /// A string, or `()` when there is none (a header that is not there).
    TextOrUnit,
    Bool,
    Int,
    Unit,
    Decision,
}

/// How a call in [`HOST_CALLS`] is made: on `req` or `res` (a property or a method), or a
/// function of an integer and a string.
#[derive(Debug, Clone, Copy)]
pub(super) enum HostCall {
    /// `req.name`.
    ReqProp(fn(&RequestState) -> ImmutableString),
    /// `res.name`.
    ResProp(fn(&ResponseState) -> i64),
    /// `req.name(text)`.
    Req1(fn(&Req, &str) -> RhaiResult<Dynamic>),
    /// `req.name(text, text)`.
    Req2(fn(&Req, &str, &str) -> RhaiResult<Dynamic>),
    /// `res.name(text)`.
    Res1(fn(&Res, &str) -> RhaiResult<Dynamic>),
    /// `res.name(text, text)`.
    Res2(fn(&Res, &str, &str) -> RhaiResult<Dynamic>),
    /// `res.name(integer)`.
    ResInt(fn(&Res, i64) -> RhaiResult<Dynamic>),
    /// `name(integer, text)`.
    IntText(fn(i64, &str) -> RhaiResult<Dynamic>),
}

/// A host function whose arguments are strings and integers.
pub(super) struct HostFn {
    pub name: &'static str,
    pub call: HostCall,
    pub returns: Returns,
}

const fn host(name: &'static str, returns: Returns, call: HostCall) -> HostFn {
    HostFn {
        name,
        call,
        returns,
    }
}

/// The host functions a simple hook calls. The engine registers them from this table, and the
/// direct form of simple hooks (`super::direct`) calls the same entries, so both run one piece
/// of code per function. The host API that takes or gives maps and arrays is registered below.
pub(super) const HOST_CALLS: &[HostFn] = {
    use HostCall::*;
    use Returns::*;
    &[
        host("method", Text, ReqProp(|s| s.method().into())),
        host("path", Text, ReqProp(|s| s.path().into())),
        host("query", Text, ReqProp(|s| s.query().unwrap_or("").into())),
        host("host", Text, ReqProp(|s| s.host().into())),
        host("client_ip", Text, ReqProp(|s| s.client_ip_string())),
        host("trace_id", Text, ReqProp(|s| s.trace_id_string())),
        host("route", Text, ReqProp(|s| s.route().into())),
        host("upstream", Text, ReqProp(|s| s.upstream().into())),
        host("upstream_path", Text, ReqProp(|s| s.upstream_path().into())),
        host(
            "header",
            TextOrUnit,
            Req1(|r, name| Ok(first_text(r.state().header_values(name)))),
        ),
        host(
            "has_header",
            Bool,
            Req1(|r, name| Ok(r.state().header_values(name).next().is_some().into())),
        ),
        host(
            "query_param",
            TextOrUnit,
            Req1(|r, name| Ok(query_param(r.state().query(), name))),
        ),
        host(
            "set_header",
            Unit,
            Req2(|r, name, value| edit_request(r, checked_edit(name, value, HeaderEdit::Set))),
        ),
        host(
            "append_header",
            Unit,
            Req2(|r, name, value| edit_request(r, checked_edit(name, value, HeaderEdit::Append))),
        ),
        host(
            "remove_header",
            Unit,
            Req1(|r, name| edit_request(r, header_name(name).map(HeaderEdit::Remove))),
        ),
        host(
            "set_path",
            Unit,
            Req1(|r, path| {
                let normal = crate::router::normalize_path(path)
                    .map_err(|e| invalid(format!("set_path(\"{path}\"): {e}")))?;
                if normal != path || path.contains('?') {
                    return Err(invalid(format!(
                        "set_path(\"{path}\"): write a normalised path without a query (\"{normal}\")"
                    )));
                }
                r.state().upstream_path = Some(path.to_owned());
                Ok(Dynamic::UNIT)
            }),
        ),
        host(
            "set_query",
            Unit,
            Req1(|r, q| {
                if q.bytes().any(|b| b <= b' ' || b == b'#' || b >= 0x7f) {
                    return Err(invalid("set_query: the query must be percent-encoded"));
                }
                r.state().new_query =
                    Some((!q.is_empty()).then(|| q.trim_start_matches('?').to_owned()));
                Ok(Dynamic::UNIT)
            }),
        ),
        host(
            "set_upstream",
            Unit,
            Req1(|r, name| {
                r.state().chosen_upstream = Some(name.into());
                Ok(Dynamic::UNIT)
            }),
        ),
        host("status", Int, ResProp(|s| s.status as i64)),
        host(
            "set_status",
            Unit,
            ResInt(|r, status| {
                r.state().status = status_in(status, 200..=599, "set_status")?;
                Ok(Dynamic::UNIT)
            }),
        ),
        host(
            "header",
            TextOrUnit,
            Res1(|r, name| Ok(get_header(&r.state().headers, name))),
        ),
        host(
            "has_header",
            Bool,
            Res1(|r, name| Ok(r.state().headers.contains_key(name).into())),
        ),
        host(
            "set_header",
            Unit,
            Res2(|r, name, value| edit_response(r, checked_edit(name, value, HeaderEdit::Set))),
        ),
        host(
            "append_header",
            Unit,
            Res2(|r, name, value| edit_response(r, checked_edit(name, value, HeaderEdit::Append))),
        ),
        host(
            "remove_header",
            Unit,
            Res1(|r, name| edit_response(r, header_name(name).map(HeaderEdit::Remove))),
        ),
        host(
            "deny",
            Decision,
            IntText(|status, message| {
                Ok(Dynamic::from(Verdict::Deny {
                    status: status_in(status, 400..=599, "deny")?,
                    message: message.to_owned(),
                }))
            }),
        ),
        host(
            "redirect",
            Decision,
            IntText(|status, location| {
                let status = status_in(status, 300..=399, "redirect")?;
                let v = header_value("location", location)?;
                Ok(Dynamic::from(Verdict::Respond(StaticResponse {
                    status,
                    headers: vec![(http::header::LOCATION, v)],
                    body: Bytes::new(),
                })))
            }),
        ),
    ]
};

fn register_host_calls(engine: &mut Engine) {
    for h in HOST_CALLS {
        match h.call {
            HostCall::ReqProp(f) => {
                engine.register_get(h.name, move |r: &mut Req| f(&r.state()));
            }
            HostCall::ResProp(f) => {
                engine.register_get(h.name, move |r: &mut Res| f(&r.state()));
            }
            HostCall::Req1(f) => {
                engine.register_fn(h.name, move |r: &mut Req, a: &str| f(r, a));
            }
            HostCall::Req2(f) => {
                engine.register_fn(h.name, move |r: &mut Req, a: &str, b: &str| f(r, a, b));
            }
            HostCall::Res1(f) => {
                engine.register_fn(h.name, move |r: &mut Res, a: &str| f(r, a));
            }
            HostCall::Res2(f) => {
                engine.register_fn(h.name, move |r: &mut Res, a: &str, b: &str| f(r, a, b));
            }
            HostCall::ResInt(f) => {
                engine.register_fn(h.name, move |r: &mut Res, a: i64| f(r, a));
            }
            HostCall::IntText(f) => {
                engine.register_fn(h.name, move |a: i64, b: &str| f(a, b));
            }
        }
    }
}

fn register_request(engine: &mut Engine, max_map_size: usize, max_key_bytes: usize) {
    engine.register_type_with_name::<Req>("Request");
    engine
        .register_get("params", |r: &mut Req| r.state().params.clone())
        .register_get("claims", |r: &mut Req| r.state().claims())
        .register_get("config", |r: &mut Req| (*r.state().config).clone())
        .register_get_set(
            "ctx",
            |r: &mut Req| r.state().ctx.clone(),
            // `req.ctx[k] = v` sets the whole map back: Rhai does not check its size here.
            move |r: &mut Req, m: Map| -> RhaiResult<()> {
                if max_map_size > 0 && m.len() > max_map_size {
                    return Err(super::engine::map_too_large());
                }
                // Kept past the call (and given to `on_response`): never deeper, nor with
                // longer keys, than a script may read.
                super::sizes::check_map(&m, max_key_bytes)?;
                r.state().ctx = m;
                Ok(())
            },
        )
        .register_fn("header_values", |r: &mut Req, name: &str| {
            texts(r.state().header_values(name))
        });
}

fn register_response(engine: &mut Engine) {
    engine.register_type_with_name::<Res>("Response");
    engine.register_fn("header_values", |r: &mut Res, name: &str| {
        header_values(&r.state().headers, name)
    });
}

fn register_actions(engine: &mut Engine) {
    engine.register_type_with_name::<Verdict>("Decision");
    engine
        .register_fn(
            "respond",
            |status: i64, headers: Map, body: &str| -> RhaiResult<Verdict> {
                let status = status_in(status, 200..=599, "respond")?;
                let mut out = Vec::with_capacity(headers.len());
                for (k, v) in headers {
                    let n = header_name(&k)?;
                    let text = v.to_string();
                    out.push((n, header_value(&k, &text)?));
                }
                Ok(Verdict::Respond(StaticResponse {
                    status,
                    headers: out,
                    body: Bytes::from(body.to_owned()),
                }))
            },
        )
        .register_get("status", |v: &mut Verdict| v.status() as i64);
}

fn register_helpers(engine: &mut Engine) {
    engine
        .register_fn(
            "regex_match",
            |pattern: &str, text: &str| -> RhaiResult<bool> {
                Ok(super::regex_cache::get(pattern)
                    .map_err(|e| invalid(format!("regex `{pattern}`: {e}")))?
                    .is_match(text))
            },
        )
        .register_fn(
            "regex_captures",
            |pattern: &str, text: &str| -> RhaiResult<Dynamic> {
                let re = super::regex_cache::get(pattern)
                    .map_err(|e| invalid(format!("regex `{pattern}`: {e}")))?;
                Ok(match re.captures(text) {
                    Some(c) => Dynamic::from_array(
                        c.iter()
                            .map(|m| {
                                m.map(|m| Dynamic::from(ImmutableString::from(m.as_str())))
                                    .unwrap_or(Dynamic::UNIT)
                            })
                            .collect(),
                    ),
                    None => Dynamic::UNIT,
                })
            },
        )
        .register_fn("base64_encode", |s: &str| {
            base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
        })
        .register_fn("base64_decode", |s: &str| -> RhaiResult<String> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| -> Box<EvalAltResult> { format!("base64_decode: {e}").into() })?;
            String::from_utf8(bytes)
                .map_err(|_| "base64_decode: the decoded bytes are not UTF-8".into())
        })
        .register_fn("sha256", |s: &str| {
            hex::encode(Sha256::digest(s.as_bytes()))
        })
        .register_fn("hmac_sha256", |key: &str, msg: &str| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(msg.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        })
        .register_fn("parse_json", |s: &str| -> RhaiResult<Dynamic> {
            let v: serde_json::Value = serde_json::from_str(s)
                .map_err(|e| -> Box<EvalAltResult> { format!("parse_json: {e}").into() })?;
            rhai::serde::to_dynamic(v)
        })
        .register_fn("to_json", |v: Dynamic| -> RhaiResult<String> {
            serde_json::to_string(&v)
                .map_err(|e| -> Box<EvalAltResult> { format!("to_json: {e}").into() })
        })
        .register_fn("unix_time", || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        })
        .register_fn("unix_time_ms", || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        })
        .register_fn("random", rand::random::<f64>)
        .register_fn("random_int", |lo: i64, hi: i64| -> RhaiResult<i64> {
            if lo > hi {
                return Err(format!("random_int({lo}, {hi}): the range is empty").into());
            }
            Ok(rand::random_range(lo..=hi))
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param(Some("a=1&b=x%20y+z&c"), "b").into_string().ok(),
            Some("x y z".into())
        );
        assert!(query_param(Some("a=1"), "b").is_unit());
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn gateway_owned_headers_are_refused() {
        assert!(header_name("host").is_err());
        assert!(header_name("X-Forwarded-For").is_err());
        assert!(header_name("x-real-ip").is_err());
        assert!(header_name("x-request-id").is_err());
        assert!(header_name("x-tenant").is_ok());
    }
}
