//! `[[route]]` tables → compiled [`Route`]s and the [`Router`].

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::gateway::Defaults;
use super::upstreams::valid_name;
use super::{Cx, UpstreamTable, did_you_mean};
// Secrets are resolved in one place; re-exported here, where the other compile modules look.
pub(super) use super::secrets::resolve_secret;
use crate::config::raw::{HeaderRules, RawRespond, RawRoute, ValueSource};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::router::{
    HostPattern, InsertError, METHODS, PathPattern, Router, method_slot, normalize_path,
};
use crate::snapshot::{
    HeaderOps, PathRewrite, Route, RouteAction, RouteRecord, RouteSource, TemplatePart,
    UpstreamHost, strip_segment_prefix,
};
use crate::upstream::Upstream;
use crate::wire::StaticResponse;
use crate::wire::headers::is_hop_by_hop;

pub(crate) struct CompiledRoutes {
    pub router: Router,
    pub routes: Vec<Route>,
    pub used_upstreams: HashSet<String>,
    /// Where `require_client_cert = true` is written: an error unless a listener has
    /// `client_auth` (checked once the listeners are compiled).
    pub client_cert_required: Vec<(FileId, Range<usize>)>,
}

/// Compiles the routes of every file, in order, freeing each file's raw routes once compiled:
/// with 100,000 routes the raw and the compiled forms need not be held together.
pub(crate) fn compile_routes(
    cx: &mut Cx<'_>,
    raw: Vec<(FileId, Vec<RawRoute>)>,
    upstreams: &UpstreamTable,
    defaults: &Defaults,
    edge: &super::edge::EdgeDefaults,
    providers: &super::auth::Providers,
) -> CompiledRoutes {
    let count = raw.iter().map(|(_, routes)| routes.len()).sum();
    let mut b = Builder {
        upstreams,
        defaults,
        edge,
        providers,
        out: CompiledRoutes {
            router: Router::default(),
            routes: Vec::with_capacity(count),
            used_upstreams: HashSet::new(),
            client_cert_required: Vec::new(),
        },
        names: HashMap::with_capacity(count),
        path_spans: Vec::with_capacity(count),
        file_name: None,
        unversioned: Arc::from(""),
    };
    for (file, routes) in raw {
        for r in routes {
            b.route(cx, file, r);
        }
    }
    b.out.router.finish();
    b.out
}

/// The routes compiled so far, and what every route may refer to.
struct Builder<'a> {
    upstreams: &'a UpstreamTable,
    defaults: &'a Defaults,
    edge: &'a super::edge::EdgeDefaults,
    providers: &'a super::auth::Providers,
    out: CompiledRoutes,
    /// Where each route name was first used.
    names: HashMap<String, (FileId, Range<usize>)>,
    /// The routes' records' version until the snapshot's is known.
    unversioned: Arc<str>,
    /// Where each compiled route's path was written, by RouteId, for conflict messages.
    path_spans: Vec<(FileId, Range<usize>)>,
    /// The name of the file being compiled, shared by its routes' [`RouteSource`].
    file_name: Option<(FileId, Arc<str>)>,
}

impl Builder<'_> {
    /// Compiles one route into `self.out`, or reports why it cannot be.
    fn route(&mut self, cx: &mut Cx<'_>, file: FileId, r: RawRoute) {
        let Builder {
            upstreams,
            defaults,
            edge,
            providers,
            out,
            names,
            path_spans,
            file_name,
            unversioned,
        } = self;
        let (upstreams, defaults, edge, providers) = (*upstreams, *defaults, *edge, *providers);
        let errors_before = cx.diags.error_count();
        let name = r.name.get().as_str();
        if !valid_name(name) {
            cx.push(
                Diagnostic::error(
                    "invalid-name",
                    format!("route name `{name}` must be 1-128 letters, digits, `-`, `_` or `.`"),
                )
                .at(file, r.name.span(), "invalid name"),
            );
        }
        if let Some((first_file, first_span)) = names.get(name) {
            cx.push(
                Diagnostic::error(
                    "duplicate-route",
                    format!("route name `{name}` is used twice"),
                )
                .at(file, r.name.span(), "used again here")
                .also(*first_file, first_span.clone(), "first used here")
                .help("route names must be unique across all files"),
            );
        } else {
            names.insert(name.to_owned(), (file, r.name.span()));
        }
        if let Some(u) = &r.upstream
            && !out.used_upstreams.contains(u.get())
        {
            out.used_upstreams.insert(u.get().clone());
        }

        let host = r
            .host
            .as_ref()
            .and_then(|h| host_pattern(cx, file, h))
            .unwrap_or(HostPattern::Any);
        let path = path_pattern(cx, file, &r);
        let methods = r.methods.as_ref().and_then(|m| method_slots(cx, file, m));
        let upstream_host = upstream_host(cx, file, &r);
        let cors = r
            .cors
            .as_ref()
            .and_then(|c| super::edge::route_cors(cx, file, c, edge));
        let rate_limit = super::edge::route_rate_limit(cx, file, r.rate_limit.as_deref(), edge);
        let auth = r.auth.as_ref().and_then(|a| {
            super::auth::route_auth(cx, file, a, r.auth_optional.unwrap_or(false), providers)
        });
        if let Some(crate::filters::rate_limit::LimitSpec {
            key: crate::filters::rate_limit::LimitKey::Claim(c),
            ..
        }) = &rate_limit
            && r.auth.is_none()
        {
            let span = r
                .rate_limit
                .as_ref()
                .map(|s| s.span())
                .unwrap_or_else(|| r.name.span());
            cx.push(
                Diagnostic::error(
                    "invalid-rate-limit",
                    format!("route `{name}` limits by claim `{c}` but has no `auth`"),
                )
                .at(file, span, "no verified claims on this route")
                .help("add `auth = \"<provider>\"`, or key by `client_ip`"),
            );
        }
        let request_headers = r
            .request_headers
            .as_ref()
            .map(|h| header_ops(cx, file, h, true))
            .unwrap_or_default();
        let response_headers = r
            .response_headers
            .as_ref()
            .map(|h| header_ops(cx, file, h, false))
            .unwrap_or_default();
        let route_timeout = r.timeout.as_ref().and_then(|v| cx.duration(file, v));
        let connect_timeout = r
            .connect_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v));
        let total_timeout = r.total_timeout.as_ref().and_then(|v| cx.duration(file, v));
        let read_timeout = r
            .read_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v))
            .unwrap_or(defaults.read_timeout);
        let retry = r
            .retries
            .as_ref()
            .map(|v| super::upstreams::retries(cx, file, v, false).0);
        let max_body_size = r
            .max_body_size
            .as_ref()
            .and_then(|v| cx.size(file, v))
            .unwrap_or(defaults.max_body_size);
        let policy =
            super::policies::route_policy(cx, file, &r, upstreams, defaults.policy.as_ref());
        // A policy's `on_response` sees the handshake's head only, never what the tunnel
        // carries: such routes take upgrades only when they say so.
        let require_client_cert = r.require_client_cert.as_ref().is_some_and(|v| *v.get());
        if require_client_cert && let Some(v) = &r.require_client_cert {
            out.client_cert_required.push((file, v.span()));
        }
        let websocket = r.websocket.unwrap_or_else(|| {
            defaults.websocket && !policy.as_ref().is_some_and(|p| p.policy.has_on_response())
        });
        let websocket_idle_timeout = r
            .websocket_idle_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v))
            .unwrap_or(defaults.websocket_idle_timeout);
        let action = action(cx, file, &r, path.as_ref(), upstreams);
        let plugins = super::plugins::route_plugins(cx, file, r.plugins.as_ref());

        let (Some((path, path_span)), Some(action)) = (path, action) else {
            return;
        };
        if r.websocket == Some(true)
            && let RouteAction::Proxy { upstream, .. } = &action
            && !upstream.speaks_http1()
        {
            cx.push(
                Diagnostic::warning(
                    "websocket-http2-upstream",
                    format!(
                        "route `{name}` takes WebSocket upgrades, but its upstream `{}` speaks HTTP/2: handshakes are forwarded as plain requests",
                        upstream.name
                    ),
                )
                .at(file, r.name.span(), "WebSocket upgrades go nowhere")
                .help("point the route at an HTTP/1.1 upstream, or drop `websocket = true`"),
            );
        }
        let tracing = super::trace_config::route_trace(cx, file, r.tracing.as_ref(), &path);
        if cx.diags.error_count() > errors_before {
            return;
        }
        let timeout = route_timeout
            .or(match &action {
                RouteAction::Proxy { upstream, .. } => upstream.timeout,
                RouteAction::Respond(_) => None,
            })
            .unwrap_or(defaults.timeout);
        let id = out.routes.len();
        match out.router.insert(&host, &path, methods.as_deref(), id) {
            Ok(()) => {}
            Err(InsertError::Conflict { existing, method }) => {
                let (ef, es) = path_spans[existing].clone();
                let ename = &out.routes[existing].name;
                cx.push(
                    Diagnostic::error(
                        "route-conflict",
                        format!(
                            "routes `{ename}` and `{name}` both match {method} {}{}",
                            host_label(&host),
                            pattern_label(&path)
                        ),
                    )
                    .at(file, path_span, format!("`{name}` matches here"))
                    .also(ef, es, format!("`{ename}` already matches here"))
                    .help("give one of them a different host, path or `methods`"),
                );
                return;
            }
            Err(InsertError::InvalidPath(why)) => {
                cx.push(
                    Diagnostic::error(
                        "invalid-path",
                        format!("path of route `{name}` is not valid: {why}"),
                    )
                    .at(file, path_span, "invalid path"),
                );
                return;
            }
        }
        path_spans.push((file, path_span));
        let file_name = match file_name {
            Some((id, n)) if *id == file => Arc::clone(n),
            _ => {
                let n: Arc<str> = Arc::from(cx.files.name(file));
                *file_name = Some((file, Arc::clone(&n)));
                n
            }
        };
        let (line, column) = cx.files.line_col(file, r.name.span().start);
        let source = RouteSource {
            file: file_name,
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
            host: match &host {
                HostPattern::Any => None,
                h => Some(host_label(h).into_boxed_str()),
            },
            prefix: matches!(path, PathPattern::Prefix(_)),
            path: match path {
                PathPattern::Exact(p) | PathPattern::Prefix(p) => p.into_boxed_str(),
            },
            methods: methods.map(|slots| {
                slots
                    .iter()
                    .filter_map(|s| METHODS.get(*s).copied())
                    .collect()
            }),
        };
        let name = r.name.into_inner();
        out.routes.push(Route {
            // The version is filled in when the snapshot is assembled.
            record: Arc::new(RouteRecord {
                name: name.clone(),
                tracing: tracing.clone(),
                version: Arc::clone(unversioned),
            }),
            name,
            action,
            timeout,
            connect_timeout,
            total_timeout,
            read_timeout,
            retry,
            max_body_size,
            request_headers,
            response_headers,
            upstream_host,
            rewrite_location: r.rewrite_location.as_ref().is_none_or(|v| *v.get()),
            policy,
            cors,
            rate_limit,
            auth,
            require_client_cert,
            websocket,
            websocket_idle_timeout,
            plugins,
            tracing,
            source,
        });
    }
}

fn host_label(h: &HostPattern) -> String {
    match h {
        HostPattern::Any => String::new(),
        HostPattern::Exact(h) => h.clone(),
        HostPattern::Suffix(s) => format!("*{s}"),
    }
}

fn pattern_label(p: &PathPattern) -> String {
    match p {
        PathPattern::Exact(p) => p.clone(),
        PathPattern::Prefix(p) => format!("{p} (prefix)"),
    }
}

fn host_pattern(cx: &mut Cx<'_>, file: FileId, h: &Spanned<String>) -> Option<HostPattern> {
    let lower = h.trim().to_ascii_lowercase();
    let (suffix, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    // An IPv6 literal, bracketed or not: matched as a `Host` carries it, in brackets
    // (`Host: [::1]:8080` is host `[::1]`), in its compressed form.
    let bare = rest
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(rest);
    if !suffix && let Ok(ip) = bare.parse::<std::net::Ipv6Addr>() {
        return Some(HostPattern::Exact(format!("[{ip}]")));
    }
    let valid = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !rest.starts_with('.')
        && !rest.ends_with('.');
    if !valid {
        let help = if rest.starts_with('[') || rest.matches(':').count() > 1 {
            "an IPv6 address is written without the port, e.g. \"[2001:db8::1]\" or \"::1\""
        } else if rest.contains(':') {
            "hosts are matched without the port"
        } else if rest.contains('*') {
            "only a leading `*.` wildcard is supported, e.g. \"*.example.com\""
        } else {
            "write a host name such as \"api.example.com\" or \"*.example.com\""
        };
        cx.push(
            Diagnostic::error("invalid-host", format!("`{}` is not a valid host", h.get()))
                .at(file, h.span(), "invalid host")
                .help(help),
        );
        return None;
    }
    Some(if suffix {
        HostPattern::Suffix(format!(".{rest}"))
    } else {
        HostPattern::Exact(rest.to_owned())
    })
}

fn path_pattern(
    cx: &mut Cx<'_>,
    file: FileId,
    r: &RawRoute,
) -> Option<(PathPattern, Range<usize>)> {
    let name = r.name.get();
    let (text, is_prefix) = match (&r.path, &r.prefix) {
        (Some(p), None) => (p, false),
        (None, Some(p)) => (p, true),
        (Some(p), Some(q)) => {
            cx.push(
                Diagnostic::error(
                    "path-and-prefix",
                    format!("route `{name}` sets both `path` and `prefix`"),
                )
                .at(file, q.span(), "prefix here")
                .also(file, p.span(), "path here")
                .help("a route matches either an exact `path` or a `prefix`"),
            );
            return None;
        }
        (None, None) => {
            cx.push(
                Diagnostic::error(
                    "no-path",
                    format!("route `{name}` has neither `path` nor `prefix`"),
                )
                .at(file, r.name.span(), "this route matches nothing")
                .help("add e.g. `prefix = \"/\"` to match every path"),
            );
            return None;
        }
    };
    let p = text.get().as_str();
    if !p.starts_with('/') {
        cx.push(
            Diagnostic::error("invalid-path", format!("`{p}` must start with `/`")).at(
                file,
                text.span(),
                "invalid path",
            ),
        );
        return None;
    }
    if is_prefix && (p.contains('{') || p.contains('}')) {
        cx.push(
            Diagnostic::error("invalid-path", "a `prefix` cannot have `{param}` segments")
                .at(file, text.span(), "invalid prefix")
                .help("use `path` for parameters"),
        );
        return None;
    }
    if p.contains("{*") {
        cx.push(
            Diagnostic::error(
                "invalid-path",
                "catch-all segments are written as a `prefix`",
            )
            .at(file, text.span(), "invalid path")
            .help("replace `path = \"/a/{*rest}\"` with `prefix = \"/a\"`"),
        );
        return None;
    }
    if let Ok(normal) = normalize_path(p) {
        if normal != p {
            cx.push(
                Diagnostic::warning("unreachable-route", format!("route `{name}` can never match: requests are normalised to `{normal}` before matching"))
                    .at(file, text.span(), "never matches")
                    .help(format!("write `{normal}`")),
            );
        }
    } else {
        cx.push(
            Diagnostic::warning(
                "unreachable-route",
                format!(
                    "route `{name}` can never match: requests with this path are refused with 400"
                ),
            )
            .at(file, text.span(), "never matches"),
        );
    }
    let pattern = if is_prefix {
        let trimmed = if p.len() > 1 {
            p.trim_end_matches('/')
        } else {
            p
        };
        PathPattern::Prefix(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    } else {
        PathPattern::Exact(p.to_owned())
    };
    Some((pattern, text.span()))
}

fn method_slots(
    cx: &mut Cx<'_>,
    file: FileId,
    m: &Spanned<Vec<Spanned<String>>>,
) -> Option<Vec<usize>> {
    if m.is_empty() {
        cx.push(
            Diagnostic::error(
                "invalid-methods",
                "`methods` is empty, so the route matches nothing",
            )
            .at(file, m.span(), "empty")
            .help("remove `methods` to match every method"),
        );
        return None;
    }
    let mut slots = Vec::new();
    for entry in m.iter() {
        let upper = entry.to_ascii_uppercase();
        let slot = method_slot(&upper);
        if slot >= METHODS.len() {
            cx.push(
                Diagnostic::error(
                    "invalid-methods",
                    format!("unknown method `{}`", entry.get()),
                )
                .at(file, entry.span(), "unknown method")
                .help(format!("methods are {}", METHODS.join(", "))),
            );
            continue;
        }
        if slots.contains(&slot) {
            cx.push(
                Diagnostic::warning(
                    "duplicate-method",
                    format!("method `{upper}` is listed twice"),
                )
                .at(file, entry.span(), "listed again"),
            );
            continue;
        }
        slots.push(slot);
    }
    Some(slots)
}

fn action(
    cx: &mut Cx<'_>,
    file: FileId,
    r: &RawRoute,
    path: Option<&(PathPattern, Range<usize>)>,
    upstreams: &UpstreamTable,
) -> Option<RouteAction> {
    let name = r.name.get();
    match (&r.upstream, &r.respond) {
        (Some(u), Some(resp)) => {
            cx.push(
                Diagnostic::error(
                    "upstream-and-respond",
                    format!("route `{name}` sets both `upstream` and `respond`"),
                )
                .at(file, resp.span(), "respond here")
                .also(file, u.span(), "upstream here"),
            );
            None
        }
        (None, None) => {
            cx.push(
                Diagnostic::error("no-action", format!("route `{name}` has neither `upstream` nor `respond`"))
                    .at(file, r.name.span(), "this route does nothing")
                    .help("add `upstream = \"<name>\"` to proxy, or `respond = { status = 200 }` to answer directly"),
            );
            None
        }
        (None, Some(resp)) => {
            let span = |v: Option<&Spanned<String>>| v.map(Spanned::span);
            for (field, v) in [
                ("strip_prefix", span(r.strip_prefix.as_ref())),
                ("add_prefix", span(r.add_prefix.as_ref())),
                ("rewrite", span(r.rewrite.as_ref())),
                (
                    "rewrite_location",
                    r.rewrite_location.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(v) = v {
                    cx.push(
                        Diagnostic::warning(
                            "ignored-field",
                            format!("`{field}` has no effect on a `respond` route"),
                        )
                        .at(file, v, "ignored"),
                    );
                }
            }
            respond(cx, file, resp).map(RouteAction::Respond)
        }
        (Some(u), None) => {
            let Some((_, upstream)) = upstreams.get(u.get()) else {
                if cx.unloaded.upstreams.contains(u.get()) {
                    // Defined, with an error of its own already reported.
                    return None;
                }
                let mut d = Diagnostic::error(
                    "unknown-upstream",
                    format!("unknown upstream `{}`", u.get()),
                )
                .at(file, u.span(), "no upstream with this name");
                if let Some(s) = did_you_mean(u.get(), upstreams.keys().map(String::as_str)) {
                    d = d.help(format!("did you mean `{s}`?"));
                } else if upstreams.is_empty() {
                    d = d.help("define it in upstreams/*.toml as `[upstream.<name>]`");
                }
                cx.push(d);
                return None;
            };
            let rewrite = path.and_then(|(p, _)| rewrite(cx, file, r, p))?;
            Some(RouteAction::Proxy {
                upstream: Arc::clone(upstream) as Arc<Upstream>,
                rewrite,
            })
        }
    }
}

fn rewrite(cx: &mut Cx<'_>, file: FileId, r: &RawRoute, path: &PathPattern) -> Option<PathRewrite> {
    let mut out = PathRewrite::default();
    let (pattern_text, is_prefix) = match path {
        PathPattern::Exact(p) => (p.as_str(), false),
        PathPattern::Prefix(p) => (p.as_str(), true),
    };
    let mut ok = true;
    if let Some(t) = &r.rewrite {
        if r.strip_prefix.is_some() || r.add_prefix.is_some() {
            cx.push(
                Diagnostic::error("conflicting-rewrite", "`rewrite` replaces the whole path; it cannot be combined with `strip_prefix` or `add_prefix`")
                    .at(file, t.span(), "rewrite here"),
            );
            return None;
        }
        if is_prefix {
            cx.push(
                Diagnostic::error("conflicting-rewrite", "`rewrite` needs an exact `path`; for a `prefix` route use `strip_prefix` / `add_prefix`")
                    .at(file, t.span(), "rewrite here"),
            );
            return None;
        }
        let params: Vec<String> = template_parts(pattern_text)
            .into_iter()
            .filter_map(|p| match p {
                TemplatePart::Param(n) => Some(n),
                TemplatePart::Literal(_) => None,
            })
            .collect();
        let parts = template_parts(t.get());
        if !t.starts_with('/') {
            cx.push(
                Diagnostic::error("invalid-rewrite", "`rewrite` must start with `/`").at(
                    file,
                    t.span(),
                    "invalid rewrite",
                ),
            );
            ok = false;
        }
        for part in &parts {
            if let TemplatePart::Param(n) = part
                && !params.contains(n)
            {
                {
                    let mut d = Diagnostic::error(
                        "invalid-rewrite",
                        format!("`rewrite` uses `{{{n}}}`, which the route's path does not have"),
                    )
                    .at(file, t.span(), "unknown parameter");
                    if let Some(s) = did_you_mean(n, params.iter().map(String::as_str)) {
                        d = d.help(format!("did you mean `{{{s}}}`?"));
                    }
                    cx.push(d);
                    ok = false;
                }
            }
        }
        out.template = Some(parts);
    }
    if let Some(s) = &r.strip_prefix {
        let static_part = pattern_text.split('{').next().unwrap_or("");
        let applies = s.starts_with('/')
            && (strip_segment_prefix(pattern_text, s).is_some()
                || strip_segment_prefix(static_part.trim_end_matches('/'), s).is_some());
        if !applies {
            cx.push(
                Diagnostic::error("invalid-rewrite", format!("`strip_prefix = \"{}\"` is not a prefix of the route's path `{pattern_text}`, so it would never apply", s.get()))
                    .at(file, s.span(), "never applies"),
            );
            ok = false;
        }
        out.strip_prefix = Some(s.get().trim_end_matches('/').to_owned());
    }
    if let Some(a) = &r.add_prefix {
        let trimmed = a.trim_end_matches('/');
        if !a.starts_with('/') || normalize_path(a).map(|n| n != a.as_str()).unwrap_or(true) {
            cx.push(
                Diagnostic::error(
                    "invalid-rewrite",
                    "`add_prefix` must be a plain path such as \"/v2\"",
                )
                .at(file, a.span(), "invalid prefix"),
            );
            ok = false;
        }
        if !trimmed.is_empty() {
            out.add_prefix = Some(trimmed.to_owned());
        }
    }
    ok.then_some(out)
}

/// Splits `/items/{id}/x` into literals and params.
fn template_parts(t: &str) -> Vec<TemplatePart> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(TemplatePart::Literal(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            parts.push(TemplatePart::Literal(rest[open..].to_owned()));
            return parts;
        };
        parts.push(TemplatePart::Param(rest[open + 1..open + close].to_owned()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest.to_owned()));
    }
    parts
}

fn upstream_host(cx: &mut Cx<'_>, file: FileId, r: &RawRoute) -> UpstreamHost {
    match (r.preserve_host, &r.host_rewrite) {
        (Some(true), Some(h)) => {
            cx.push(
                Diagnostic::error(
                    "conflicting-host",
                    "`preserve_host = true` and `host_rewrite` contradict each other",
                )
                .at(file, h.span(), "host_rewrite here"),
            );
            UpstreamHost::Preserve
        }
        (_, Some(h)) => match HeaderValue::from_str(h.get()) {
            Ok(v) if !h.is_empty() => UpstreamHost::Fixed(v),
            _ => {
                cx.push(
                    Diagnostic::error(
                        "invalid-header",
                        "`host_rewrite` is not a valid Host header value",
                    )
                    .at(file, h.span(), "invalid host"),
                );
                UpstreamHost::Preserve
            }
        },
        (Some(false), None) => UpstreamHost::Target,
        _ => UpstreamHost::Preserve,
    }
}

/// Headers that only the gateway may set: framing, hop-by-hop and the forwarding headers.
fn gateway_owned(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name.as_str(),
            "content-length"
                | "host"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "forwarded"
        )
}

fn header_ops(cx: &mut Cx<'_>, file: FileId, rules: &HeaderRules, request: bool) -> HeaderOps {
    let mut ops = HeaderOps::default();
    for (name, value) in &rules.set {
        let Some(hn) = header_name(cx, file, name, value.span()) else {
            continue;
        };
        if gateway_owned(&hn) {
            let help = if request && hn == http::header::HOST {
                "use `host_rewrite` to change the Host header"
            } else {
                "the gateway sets this header itself"
            };
            cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("header `{name}` cannot be set by config"),
                )
                .at(file, value.span(), "gateway-owned header")
                .help(help),
            );
            continue;
        }
        let text = match value.get() {
            ValueSource::Literal(s) => Some(s.clone()),
            ValueSource::Secret(secret) => resolve_secret(cx, file, value.span(), secret),
        };
        let Some(text) = text else { continue };
        match HeaderValue::from_str(&text) {
            Ok(mut v) => {
                if matches!(value.get(), ValueSource::Secret(_)) {
                    v.set_sensitive(true);
                }
                ops.set.push((hn, v));
            }
            Err(_) => cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("the value for header `{name}` is not a valid header value"),
                )
                .at(file, value.span(), "invalid value"),
            ),
        }
    }
    for name in &rules.remove {
        if let Some(hn) = header_name(cx, file, name.get(), name.span()) {
            if gateway_owned(&hn) {
                cx.push(
                    Diagnostic::error(
                        "invalid-header",
                        format!("header `{}` is managed by the gateway", name.get()),
                    )
                    .at(file, name.span(), "gateway-owned header"),
                );
                continue;
            }
            ops.remove.push(hn);
        }
    }
    ops
}

fn header_name(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &str,
    span: Range<usize>,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("`{name}` is not a valid header name"),
                )
                .at(file, span, "invalid header name"),
            );
            None
        }
    }
}

fn respond(cx: &mut Cx<'_>, file: FileId, r: &Spanned<RawRespond>) -> Option<StaticResponse> {
    let status = *r.status.get();
    if !(200..=599).contains(&status) {
        cx.push(
            Diagnostic::error(
                "invalid-status",
                format!("status {status} is not a final HTTP status"),
            )
            .at(file, r.status.span(), "use 200-599"),
        );
        return None;
    }
    let mut headers = Vec::new();
    for (name, value) in &r.headers {
        let Some(hn) = header_name(cx, file, name, value.span()) else {
            continue;
        };
        if gateway_owned(&hn) {
            cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("header `{name}` is managed by the gateway"),
                )
                .at(file, value.span(), "gateway-owned header"),
            );
            continue;
        }
        match HeaderValue::from_str(value.get()) {
            Ok(v) => headers.push((hn, v)),
            Err(_) => cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("the value for header `{name}` is not valid"),
                )
                .at(file, value.span(), "invalid value"),
            ),
        }
    }
    Some(StaticResponse {
        status,
        headers,
        body: Bytes::from(r.body.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_into_parts() {
        assert_eq!(
            template_parts("/v2/items/{id}/x"),
            vec![
                TemplatePart::Literal("/v2/items/".into()),
                TemplatePart::Param("id".into()),
                TemplatePart::Literal("/x".into()),
            ]
        );
        assert_eq!(template_parts("/"), vec![TemplatePart::Literal("/".into())]);
    }
}
