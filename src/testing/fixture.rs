//! `tests/*.toml`: the fixture files `rustygate test` runs, read with spans like the config
//! itself, so a mistake in a fixture is a located diagnostic (file:line:col), never a panic or a
//! silently skipped case.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::config::load::serde_diagnostic;
use crate::config::{Diagnostic, Diagnostics, FileId, SourceFiles, Spanned};
use crate::decide::Claims;

/// A `tests/*.toml` file: a list of `[[test]]` cases.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestsFile {
    #[serde(default)]
    pub test: Vec<RawCase>,
}

/// One `[[test]]`: a request, what the upstream answers (synthetic), and what must happen.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCase {
    /// Shown in the output; unique across the repo's tests.
    pub name: Spanned<String>,
    /// The request a client sends.
    pub request: Spanned<RawRequest>,
    /// What the upstream answers when the request is forwarded (default: 200, no headers, empty).
    pub upstream_response: Option<Spanned<RawUpstreamResponse>>,
    /// What must happen; at least one check.
    pub expect: Spanned<RawExpect>,
}

/// The client's request.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    /// HTTP method (default "GET").
    pub method: Option<Spanned<String>>,
    /// `"http://api.example.com/orders/7?x=1"`, or a path (`"/orders/7"`) with the host taken
    /// from a `host` header (default "localhost").
    pub url: Spanned<String>,
    /// Request headers: name -> value.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// Request body (its length becomes `Content-Length` unless a header sets one).
    #[serde(default)]
    pub body: String,
    /// Verified JWT claims, as the auth filter would hand them to the policy (`req.claims`).
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// The client's address as the gateway sees the connection (default "127.0.0.1").
    pub client_ip: Option<Spanned<String>>,
}

/// The synthetic upstream response.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamResponse {
    /// Status code (default 200).
    #[schemars(range(min = 100, max = 599))]
    pub status: Option<Spanned<u16>>,
    /// Response headers: name -> value.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub body: String,
}

/// The checks of a case; each one given must hold.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    /// Status the client gets.
    #[schemars(range(min = 100, max = 599))]
    pub status: Option<Spanned<u16>>,
    /// Name of the route that matched.
    pub route: Option<String>,
    /// `true`: no route matches (the client gets 404 or 405).
    pub no_route: Option<bool>,
    /// Name of the upstream the request is forwarded to.
    pub upstream: Option<String>,
    /// Path the upstream receives.
    pub upstream_path: Option<String>,
    /// Query the upstream receives, without `?`; `""` means none.
    pub upstream_query: Option<String>,
    /// Headers sent upstream: a value to equal, `true` (present) or `false` (absent).
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<HeaderExpect>>,
    /// Headers the client gets: a value to equal, `true` (present) or `false` (absent).
    #[serde(default)]
    pub response_headers: BTreeMap<String, Spanned<HeaderExpect>>,
    /// Text the response body contains.
    pub body_contains: Option<String>,
    /// The trace id of the `traceparent` sent upstream: 32 hex digits to equal; `true`: the
    /// trace id of the case's own `traceparent` header (the client's trace is continued);
    /// `false`: the upstream does not get that trace id (a new trace, or no `traceparent`).
    pub upstream_trace_id: Option<Spanned<TraceIdExpect>>,
}

/// What the trace id sent upstream must be: a given one, or (not) the client's.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum TraceIdExpect {
    Equals(String),
    Client(bool),
}

impl<'de> Deserialize<'de> for TraceIdExpect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TraceIdExpect;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a trace id (32 hex digits), `true` (the client's) or `false` (not the client's)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TraceIdExpect, E> {
                Ok(TraceIdExpect::Equals(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TraceIdExpect, E> {
                Ok(TraceIdExpect::Client(v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A checked `upstream_trace_id`: the trace id (lowercase hex) that the `traceparent` sent
/// upstream must carry, or must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceIdCheck {
    Is(String),
    IsNot(String),
}

/// What a header must be: equal to a value, or just present or absent.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum HeaderExpect {
    Equals(String),
    Present(bool),
}

// By hand, not `#[serde(untagged)]` (which only drives the schema): the error then says what is
// accepted instead of "data did not match any variant".
impl<'de> Deserialize<'de> for HeaderExpect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HeaderExpect;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a header value (string), `true` (present) or `false` (absent)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderExpect, E> {
                Ok(HeaderExpect::Equals(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<HeaderExpect, E> {
                Ok(HeaderExpect::Present(v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A checked case, ready to run.
#[derive(Debug, Clone)]
pub struct Case {
    pub file: FileId,
    /// Where the case's name is written.
    pub span: Range<usize>,
    pub name: String,
    pub method: String,
    /// Lower-case, without port.
    pub host: String,
    /// As sent (normalised when the case runs, like the server does).
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub claims: Option<Claims>,
    pub peer: IpAddr,
    pub upstream_response: UpstreamResponse,
    pub expect: Expect,
}

#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub status: Option<u16>,
    pub route: Option<String>,
    pub no_route: bool,
    pub upstream: Option<String>,
    pub upstream_path: Option<String>,
    pub upstream_query: Option<String>,
    pub headers: Vec<(HeaderName, HeaderExpect)>,
    pub response_headers: Vec<(HeaderName, HeaderExpect)>,
    pub body_contains: Option<String>,
    pub upstream_trace_id: Option<TraceIdCheck>,
}

/// Reads every `tests/*.toml` under `root` into `files`, in name order. Every problem, an
/// unreadable or refused file included, is a located diagnostic.
pub fn load(root: &Path, files: &mut SourceFiles, diags: &mut Diagnostics) -> Vec<Case> {
    // The same reader as the config files: inside the repo, regular files, size-capped.
    let mut cases = Vec::new();
    for f in crate::config::files::read_toml_dir(root, "tests") {
        let Some(id) = crate::config::load::add_file(files, diags, &f.name, f.text) else {
            continue;
        };
        for raw in parse_file(files, id, diags) {
            if let Some(c) = check(id, raw, diags) {
                cases.push(c);
            }
        }
    }
    let mut seen: HashMap<String, (FileId, Range<usize>)> = HashMap::new();
    for c in &cases {
        if let Some((file, span)) = seen.get(&c.name) {
            diags.push(
                Diagnostic::error(
                    "duplicate-test",
                    format!("two tests are named `{}`", c.name),
                )
                .at(c.file, c.span.clone(), "second test with this name")
                .also(*file, span.clone(), "first defined here")
                .help("names identify cases in the output and in --filter; make them unique"),
            );
        } else {
            seen.insert(c.name.clone(), (c.file, c.span.clone()));
        }
    }
    cases
}

/// The `[[test]]` tables of one file that fit the schema.
fn parse_file(files: &SourceFiles, id: FileId, diags: &mut Diagnostics) -> Vec<RawCase> {
    let (table, mut errors) = DeTable::parse_recoverable(files.source(id));
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.span().map(|s| (s.start, s.end)));
        for e in errors {
            diags.push(
                Diagnostic::error(
                    "toml-syntax",
                    format!("invalid TOML: {}", e.message().trim()),
                )
                .at(id, e.span().unwrap_or(0..0), "here"),
            );
        }
        return Vec::new();
    }
    let mut out = Vec::new();
    for (key, value) in table.into_inner() {
        if key.get_ref().as_ref() != "test" {
            diags.push(
                Diagnostic::error(
                    "unknown-key",
                    format!("unknown key `{}` in a tests file", key.get_ref()),
                )
                .at(id, key.span(), "unknown key")
                .help("a tests file holds only `[[test]]` tables"),
            );
            continue;
        }
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            diags.push(
                Diagnostic::error("wrong-type", "`test` must be an array of tables")
                    .at(id, span, "not an array")
                    .help("write each case as `[[test]]`"),
            );
            continue;
        };
        for item in items {
            let whole = item.span();
            let what = item
                .get_ref()
                .as_table()
                .and_then(|t| t.get("name"))
                .and_then(|n| n.get_ref().as_str())
                .map(|n| format!("test `{n}`"))
                .unwrap_or_else(|| "a test".into());
            match RawCase::deserialize(ValueDeserializer::from(item)) {
                Ok(c) => out.push(c),
                Err(e) => diags.push(serde_diagnostic(&e, id, whole, &what)),
            }
        }
    }
    out
}

/// Checks what the schema cannot: method, URL, header names and values, addresses, statuses.
fn check(file: FileId, raw: RawCase, diags: &mut Diagnostics) -> Option<Case> {
    let errors_before = diags.error_count();
    let mut err = |code: &'static str, msg: String, span: Range<usize>, label: &str| {
        diags.push(Diagnostic::error(code, msg).at(file, span, label));
    };
    let req = raw.request.get();
    let method = match &req.method {
        None => "GET".to_owned(),
        Some(m) if http::Method::from_bytes(m.as_bytes()).is_ok() && !m.is_empty() => {
            m.to_ascii_uppercase()
        }
        Some(m) => {
            err(
                "invalid-value",
                format!("`{}` is not an HTTP method", m.get()),
                m.span(),
                "not a method",
            );
            String::new()
        }
    };
    let mut headers = header_map(&req.headers, &mut err);
    let (host_header, host, path, query) = match split_url(req.url.get(), &headers) {
        Ok(parts) => parts,
        Err(why) => {
            err("invalid-url", why, req.url.span(), "not a request URL");
            Default::default()
        }
    };
    if !headers.contains_key(http::header::HOST)
        && let Ok(v) = HeaderValue::from_str(&host_header)
    {
        headers.insert(http::header::HOST, v);
    }
    if !req.body.is_empty() && !headers.contains_key(http::header::CONTENT_LENGTH) {
        headers.insert(http::header::CONTENT_LENGTH, req.body.len().into());
    }
    let peer = match &req.client_ip {
        None => IpAddr::from([127, 0, 0, 1]),
        Some(ip) => ip.parse().unwrap_or_else(|_| {
            err(
                "invalid-value",
                format!("`{}` is not an IP address", ip.get()),
                ip.span(),
                "not an address",
            );
            IpAddr::from([127, 0, 0, 1])
        }),
    };
    let upstream_response = match &raw.upstream_response {
        None => UpstreamResponse {
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        },
        Some(r) => UpstreamResponse {
            status: status(r.status.as_ref(), &mut err).unwrap_or(200),
            headers: header_map(&r.headers, &mut err),
            body: Bytes::from(r.body.clone()),
        },
    };
    let e = raw.expect.get();
    let expect = Expect {
        status: status(e.status.as_ref(), &mut err),
        route: e.route.clone(),
        no_route: e.no_route.unwrap_or(false),
        upstream: e.upstream.clone(),
        upstream_path: e.upstream_path.clone(),
        upstream_query: e.upstream_query.clone(),
        headers: expected_headers(&e.headers, &mut err),
        response_headers: expected_headers(&e.response_headers, &mut err),
        body_contains: e.body_contains.clone(),
        upstream_trace_id: e
            .upstream_trace_id
            .as_ref()
            .and_then(|t| trace_id_check(t, &headers, &mut err)),
    };
    let checks_nothing = expect.status.is_none()
        && expect.route.is_none()
        && !expect.no_route
        && expect.upstream.is_none()
        && expect.upstream_path.is_none()
        && expect.upstream_query.is_none()
        && expect.headers.is_empty()
        && expect.response_headers.is_empty()
        && expect.body_contains.is_none()
        && expect.upstream_trace_id.is_none();
    if checks_nothing {
        diags.push(
            Diagnostic::error("empty-expect", format!("test `{}` checks nothing", raw.name.get()))
                .at(file, raw.expect.span(), "no check here")
                .help("give at least one of status, route, no_route, upstream, upstream_path, upstream_query, headers, response_headers, body_contains, upstream_trace_id"),
        );
    }
    if expect.no_route && (expect.route.is_some() || expect.upstream.is_some()) {
        diags.push(
            Diagnostic::error(
                "invalid-value",
                "`no_route = true` cannot be combined with `route` or `upstream`",
            )
            .at(file, raw.expect.span(), "contradictory expectations"),
        );
    }
    if diags.error_count() > errors_before {
        return None;
    }
    Some(Case {
        file,
        span: raw.name.span(),
        name: raw.name.into_inner(),
        method,
        host,
        path,
        query,
        headers,
        body: Bytes::from(req.body.clone()),
        claims: req.claims.clone().map(std::sync::Arc::new),
        peer,
        upstream_response,
        expect,
    })
}

impl Case {
    /// A request given by hand, with nothing expected of it: the admin API's "which route
    /// would serve this request?" (`/api/v1/explain`), run by [`super::exchange::run`] like a
    /// fixture. `url` is a full `http(s)://` URL or a path; a `Host` header wins over the
    /// URL's host, as on the server. The client address is 127.0.0.1 and the upstream answers
    /// 200 with no body, as in a fixture that does not say otherwise.
    pub fn adhoc(method: &str, url: &str, mut headers: HeaderMap) -> Result<Case, String> {
        if method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err() {
            return Err(format!("`{method}` is not an HTTP method"));
        }
        let (host_header, host, path, query) = split_url(url, &headers)?;
        if !headers.contains_key(http::header::HOST) {
            let v = HeaderValue::from_str(&host_header)
                .map_err(|_| format!("`{host_header}` is not a valid Host"))?;
            headers.insert(http::header::HOST, v);
        }
        Ok(Case {
            file: 0,
            span: 0..0,
            name: "explain".to_owned(),
            method: method.to_ascii_uppercase(),
            host,
            path,
            query,
            headers,
            body: Bytes::new(),
            claims: None,
            peer: IpAddr::from([127, 0, 0, 1]),
            upstream_response: UpstreamResponse {
                status: 200,
                headers: HeaderMap::new(),
                body: Bytes::new(),
            },
            expect: Expect::default(),
        })
    }
}

/// `upstream_trace_id`, checked: a valid trace id, or a case that sends a `traceparent` for
/// `true`/`false` to compare with.
fn trace_id_check(
    t: &Spanned<TraceIdExpect>,
    headers: &HeaderMap,
    err: &mut impl FnMut(&'static str, String, Range<usize>, &str),
) -> Option<TraceIdCheck> {
    match t.get() {
        TraceIdExpect::Equals(id) => {
            let valid = id.len() == 32
                && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && id.bytes().any(|b| b != b'0');
            if valid {
                return Some(TraceIdCheck::Is(id.clone()));
            }
            err(
                "invalid-value",
                format!("`{id}` is not a trace id"),
                t.span(),
                "not 32 lowercase hex digits (and not all zero)",
            );
            None
        }
        TraceIdExpect::Client(keep) => {
            let client = headers
                .get("traceparent")
                .and_then(|v| crate::telemetry::trace::propagation::traceparent(v.as_bytes()));
            let Some(client) = client else {
                err(
                    "invalid-value",
                    "`upstream_trace_id = true|false` compares with the case's `traceparent` header, and the case sends no valid one".into(),
                    t.span(),
                    "no client trace to compare with",
                );
                return None;
            };
            let hex = client.trace_id.hex();
            let id = String::from_utf8_lossy(&hex).into_owned();
            Some(if *keep {
                TraceIdCheck::Is(id)
            } else {
                TraceIdCheck::IsNot(id)
            })
        }
    }
}

fn status(
    s: Option<&Spanned<u16>>,
    err: &mut impl FnMut(&'static str, String, Range<usize>, &str),
) -> Option<u16> {
    let s = s?;
    if (100..=599).contains(s.get()) {
        Some(*s.get())
    } else {
        err(
            "invalid-status",
            format!("status {} is outside 100-599", s.get()),
            s.span(),
            "not a status",
        );
        None
    }
}

fn header_map(
    h: &BTreeMap<String, Spanned<String>>,
    err: &mut impl FnMut(&'static str, String, Range<usize>, &str),
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (name, value) in h {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value.get()),
        ) {
            (Ok(n), Ok(v)) => {
                out.append(n, v);
            }
            (Err(_), _) => err(
                "invalid-header",
                format!("`{name}` is not a valid header name"),
                value.span(),
                "for this header",
            ),
            (_, Err(_)) => err(
                "invalid-header",
                format!("the value of `{name}` is not a valid header value"),
                value.span(),
                "invalid value",
            ),
        }
    }
    out
}

fn expected_headers(
    h: &BTreeMap<String, Spanned<HeaderExpect>>,
    err: &mut impl FnMut(&'static str, String, Range<usize>, &str),
) -> Vec<(HeaderName, HeaderExpect)> {
    let mut out = Vec::with_capacity(h.len());
    for (name, e) in h {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => out.push((n, e.get().clone())),
            Err(_) => err(
                "invalid-header",
                format!("`{name}` is not a valid header name"),
                e.span(),
                "for this header",
            ),
        }
    }
    out
}

/// The `Host` a client sends for this URL, then host (lower-case, no port), path and query.
type UrlParts = (String, String, String, Option<String>);

/// Splits a fixture URL as a client would send it.
fn split_url(url: &str, headers: &HeaderMap) -> Result<UrlParts, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(a)) => a.as_str(),
        (Some(s), _) => return Err(format!("`{url}`: only http and https URLs, not `{s}`")),
        (None, Some(_)) => return Err(format!("`{url}`: write \"http://{url}\" or a path")),
        (None, None) if url.starts_with('/') => "localhost",
        (None, None) => {
            return Err(format!(
                "`{url}`: write a full URL or a path starting with /"
            ));
        }
    };
    // Like the server: a `Host` header wins over the URL's authority.
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(authority)
        .to_owned();
    let normal = crate::router::normalize_host(&host).into_owned();
    let path = match uri.path() {
        "" => "/".to_owned(),
        p => p.to_owned(),
    };
    Ok((host, normal, path, uri.query().map(str::to_owned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_path_and_query() {
        let none = HeaderMap::new();
        let (raw, h, p, q) = split_url("http://API.example.com:8080/a/b?x=1", &none).unwrap();
        assert_eq!(raw, "API.example.com:8080");
        assert_eq!(
            (h.as_str(), p.as_str(), q.as_deref()),
            ("api.example.com", "/a/b", Some("x=1"))
        );
        let (_, h, p, q) = split_url("/a", &none).unwrap();
        assert_eq!((h.as_str(), p.as_str(), q), ("localhost", "/a", None));
        let mut with_host = HeaderMap::new();
        with_host.insert(http::header::HOST, HeaderValue::from_static("Shop.test"));
        assert_eq!(
            split_url("http://x.test/", &with_host).unwrap().1,
            "shop.test"
        );
        assert!(split_url("ftp://x/", &none).is_err());
        assert!(split_url("orders", &none).is_err());
    }
}
