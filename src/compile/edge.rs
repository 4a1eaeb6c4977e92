//! Edge filter settings: CORS presets and per-route CORS, rate limits merged over the gateway
//! default.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::Cx;
use crate::config::raw::{GatewayFile, RawCors, RawCorsRef, RawLimitStore, RawRateLimit};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::filters::cors::{CorsPolicy, Origins};
use crate::filters::rate_limit::{LimitKey, LimitSpec};

/// Gateway-wide edge settings routes refer to.
#[derive(Default)]
pub(crate) struct EdgeDefaults {
    pub cors: HashMap<String, Arc<CorsPolicy>>,
    pub rate_limit: Option<(FileId, Spanned<RawRateLimit>)>,
    /// `[rate_limit_store]`, for limits with `store = "redis"`.
    pub store: super::store::StoreRef,
}

pub(crate) fn compile_edge_defaults(
    cx: &mut Cx<'_>,
    gateway: Option<&(FileId, GatewayFile)>,
) -> EdgeDefaults {
    let mut out = EdgeDefaults {
        store: super::store::compile_store(cx, gateway),
        ..EdgeDefaults::default()
    };
    let Some((file, g)) = gateway else {
        return out;
    };
    for (name, raw) in &g.cors {
        if let Some(p) = cors_policy(cx, *file, raw.get(), raw.span()) {
            out.cors.insert(name.clone(), Arc::new(p));
        }
    }
    if let Some(rl) = &g.rate_limit {
        // Checked once here, so that every route inheriting it is not reported again.
        if rl.enabled != Some(false)
            && let Err(d) = limit_spec(*file, rl.get(), rl.span(), &out.store)
        {
            cx.push(d);
        }
        out.rate_limit = Some((*file, rl.clone()));
    }
    out
}

fn cors_policy(
    cx: &mut Cx<'_>,
    file: FileId,
    raw: &RawCors,
    span: Range<usize>,
) -> Option<CorsPolicy> {
    let mut ok = true;
    let origins = match Origins::parse(&raw.allow_origins) {
        Ok(o) => o,
        Err(e) => {
            cx.push(Diagnostic::error("invalid-cors", e).at(file, span.clone(), "invalid origin"));
            return None;
        }
    };
    if raw.allow_origins.is_empty() {
        cx.push(
            Diagnostic::error(
                "invalid-cors",
                "`allow_origins` is empty, so no origin is allowed",
            )
            .at(file, span.clone(), "empty"),
        );
        ok = false;
    }
    if origins.any && raw.allow_credentials {
        cx.push(
            Diagnostic::error(
                "invalid-cors",
                "`allow_credentials = true` cannot be combined with the origin \"*\"",
            )
            .at(file, span.clone(), "credentials with any origin")
            .help("list the origins that may send credentials"),
        );
        ok = false;
    }
    let methods: Vec<String> = raw
        .allow_methods
        .clone()
        .unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()])
        .into_iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    let headers = raw.allow_headers.as_ref().map(|h| {
        h.iter()
            .map(|x| x.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    });
    for h in headers.iter().flatten().chain(raw.expose_headers.iter()) {
        if HeaderName::from_bytes(h.as_bytes()).is_err() {
            cx.push(
                Diagnostic::error("invalid-cors", format!("`{h}` is not a header name")).at(
                    file,
                    span.clone(),
                    "invalid header",
                ),
            );
            ok = false;
        }
    }
    let expose = (!raw.expose_headers.is_empty())
        .then(|| HeaderValue::from_str(&raw.expose_headers.join(", ")).ok())
        .flatten();
    let max_age = match &raw.max_age {
        None => None,
        Some(d) => match crate::config::units::parse_duration(&d.0) {
            Ok(d) => HeaderValue::from_str(&d.as_secs().to_string()).ok(),
            Err(e) => {
                cx.push(Diagnostic::error("invalid-duration", e).at(file, span.clone(), "max_age"));
                ok = false;
                None
            }
        },
    };
    ok.then_some(CorsPolicy {
        origins,
        methods,
        headers,
        expose,
        credentials: raw.allow_credentials,
        max_age,
    })
}

/// A route's CORS policy: a preset by name, or its own settings.
pub(crate) fn route_cors(
    cx: &mut Cx<'_>,
    file: FileId,
    r: &Spanned<RawCorsRef>,
    edge: &EdgeDefaults,
) -> Option<Arc<CorsPolicy>> {
    match r.get() {
        RawCorsRef::Preset(name) => {
            match edge.cors.get(name) {
                Some(p) => Some(Arc::clone(p)),
                None => {
                    let mut d =
                        Diagnostic::error("unknown-cors", format!("unknown CORS preset `{name}`"))
                            .at(file, r.span(), "no preset with this name");
                    d = match super::did_you_mean(name, edge.cors.keys().map(String::as_str)) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help("define it in gateway.toml as `[cors.<name>]`"),
                    };
                    cx.push(d);
                    None
                }
            }
        }
        RawCorsRef::Inline(raw) => cors_policy(cx, file, raw, r.span()).map(Arc::new),
    }
}

/// The route's effective rate limit: its own fields over the gateway default.
pub(crate) fn route_rate_limit(
    cx: &mut Cx<'_>,
    file: FileId,
    own: Option<&Spanned<RawRateLimit>>,
    edge: &EdgeDefaults,
) -> Option<LimitSpec> {
    let default = edge.rate_limit.as_ref();
    let (merged, at_file, span) = match (own, default) {
        (None, None) => return None,
        (None, Some((f, d))) => {
            if d.enabled == Some(false) {
                return None;
            }
            // Already reported by compile_edge_defaults if wrong; not again for every route.
            return limit_spec(*f, d.get(), d.span(), &edge.store).ok();
        }
        (Some(o), d) => {
            let d = d.map(|(_, d)| d.get().clone()).unwrap_or_default();
            let o = o.get();
            let merged = RawRateLimit {
                requests: o.requests.or(d.requests),
                per: o.per.clone().or(d.per),
                burst: o.burst.or(d.burst),
                key: o.key.clone().or(d.key),
                // A default turned off (`[rate_limit] enabled = false`) means no limit for the
                // routes that set none; a route that gives its own numbers has its own limit.
                enabled: o.enabled.or(if o.requests.is_some() || o.per.is_some() {
                    Some(true)
                } else {
                    d.enabled
                }),
                store: o.store.or(d.store),
            };
            (merged, file, own.map(Spanned::span).unwrap_or_default())
        }
    };
    if merged.enabled == Some(false) {
        return None;
    }
    match limit_spec(at_file, &merged, span, &edge.store) {
        Ok(s) => Some(s),
        Err(d) => {
            cx.push(d);
            None
        }
    }
}

// Built once per config load, never on the request path: the size of the error does not matter.
#[allow(clippy::result_large_err)]
fn limit_spec(
    file: FileId,
    raw: &RawRateLimit,
    span: Range<usize>,
    store: &super::store::StoreRef,
) -> Result<LimitSpec, Diagnostic> {
    let (Some(requests), Some(per)) = (raw.requests, raw.per.as_ref()) else {
        return Err(Diagnostic::error(
            "invalid-rate-limit",
            "a rate limit needs `requests` and `per`",
        )
        .at(file, span, "incomplete rate limit")
        .help("e.g. rate_limit = { requests = 100, per = \"1m\" }"));
    };
    let per = match crate::config::units::parse_duration(&per.0) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) | Err(_) => {
            return Err(Diagnostic::error(
                "invalid-duration",
                format!("`{}` is not a valid window; write e.g. \"1m\"", per.0),
            )
            .at(file, span, "invalid `per`"));
        }
    };
    if requests == 0 || raw.burst == Some(0) {
        return Err(Diagnostic::error(
            "invalid-rate-limit",
            "`requests` and `burst` must be at least 1",
        )
        .at(file, span, "zero"));
    }
    let key = match raw.key.as_deref().unwrap_or("client_ip") {
        "client_ip" => LimitKey::ClientIp,
        "route" => LimitKey::Route,
        k => match k
            .strip_prefix("header:")
            .map(|h| HeaderName::from_bytes(h.trim().as_bytes()))
        {
            Some(Ok(h)) => LimitKey::Header(h),
            _ if k
                .strip_prefix("claim:")
                .is_some_and(|c| !c.trim().is_empty()) =>
            {
                LimitKey::Claim(k["claim:".len()..].trim().to_owned())
            }
            _ => {
                let help = "use `client_ip`, `route`, `header:<name>` or `claim:<name>`";
                return Err(Diagnostic::error(
                    "invalid-rate-limit",
                    format!("unknown rate-limit key `{k}`"),
                )
                .at(file, span, "unknown key")
                .help(help));
            }
        },
    };
    let shared = match raw.store {
        None | Some(RawLimitStore::Local) => None,
        Some(RawLimitStore::Redis) => {
            match (&store.spec, store.declared) {
                (Some(s), _) => Some(Arc::clone(s)),
                // `[rate_limit_store]` has errors of its own, already reported; the limit is
                // compiled as local so that its other errors are still found.
                (None, true) => None,
                (None, false) => {
                    return Err(Diagnostic::error(
                    "invalid-rate-limit",
                    "a limit with `store = \"redis\"` needs `[rate_limit_store]` in gateway.toml",
                )
                .at(file, span, "no store")
                .help("add [rate_limit_store] with url = { env = \"REDIS_URL\" } (docs/scale-out.md)"));
                }
            }
        }
    };
    Ok(LimitSpec {
        requests,
        per,
        burst: raw.burst.unwrap_or(requests),
        key,
        shared,
    })
}
