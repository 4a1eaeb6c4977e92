//! Edge filter settings: CORS presets and per-route CORS, rate limits merged over the gateway
//! default.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::Cx;
use crate::config::raw::{GatewayFile, RawCors, RawCorsRef, RawLimitStore, RawRateLimit};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::filters::cors::{CorsPolicy, Origins};
use crate::filters::rate_limit::{DEFAULT_IPV6_PREFIX, LimitKey, LimitSpec};

/// Gateway-wide edge settings routes refer to.
#[derive(Default)]
pub(crate) struct EdgeDefaults {
    pub cors: HashMap<String, Arc<CorsPolicy>>,
    /// Presets that did not compile (reported once, where they are written).
    pub broken_cors: std::collections::HashSet<String>,
    pub rate_limit: Option<(FileId, Spanned<RawRateLimit>)>,
    /// `[rate_limit_store]`, for limits with `store = "redis"`.
    pub store: super::store::StoreRef,
    /// `[headers] allow_underscores`: whether a client header named with `_` reaches a key.
    pub allow_underscores: bool,
    /// Headers the auth providers set from verified claims (`claims_to_headers`), lower case:
    /// a key may name one with `_`, since the gateway sets it.
    pub identity_headers: std::collections::HashSet<String>,
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
    out.allow_underscores = g.headers.allow_underscores;
    out.identity_headers = g
        .auth
        .values()
        .flat_map(|p| p.get().claims_to_headers.values())
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    for (name, raw) in &g.cors {
        match cors_policy(cx, *file, raw.get(), raw.span()) {
            Some(p) => {
                out.cors.insert(name.clone(), Arc::new(p));
            }
            None => {
                out.broken_cors.insert(name.clone());
            }
        }
    }
    if let Some(rl) = &g.rate_limit {
        // Checked once here, so that every route inheriting it is not reported again.
        if rl.enabled != Some(false) {
            match limit_spec(*file, rl.get(), rl.span(), &out) {
                Ok(s) => {
                    if let Some(w) = shared_key_warning(*file, rl.span(), &s, &out) {
                        cx.push(w);
                    }
                }
                Err(d) => cx.push(d),
            }
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
        .map(|m| m.trim().to_ascii_uppercase())
        .collect();
    let headers = raw.allow_headers.as_ref().map(|h| {
        h.iter()
            .map(|x| x.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    });
    // `"*"` means any method or header, as in the Fetch standard, which reads it so only for
    // requests without credentials: with them a browser takes it for a method or header named
    // `*`, and every preflight would fail. Refused here rather than answered in a way that
    // never works.
    let any_method = methods.iter().any(|m| m == "*");
    let any_header = headers.iter().flatten().any(|h| h == "*");
    for (field, wild) in [("allow_methods", any_method), ("allow_headers", any_header)] {
        if wild && raw.allow_credentials {
            cx.push(
                Diagnostic::error(
                    "invalid-cors",
                    format!(
                        "`allow_credentials = true` cannot be combined with \"*\" in `{field}`"
                    ),
                )
                .at(file, span.clone(), "credentials with a wildcard")
                .help(format!(
                    "browsers read \"*\" literally on credentialed requests: list the {} \
                     allowed",
                    if field == "allow_methods" {
                        "methods"
                    } else {
                        "headers"
                    }
                )),
            );
            ok = false;
        }
    }
    for m in methods.iter().filter(|m| *m != "*") {
        if http::Method::from_bytes(m.as_bytes()).is_err() {
            cx.push(
                Diagnostic::error("invalid-cors", format!("`{m}` is not a method name")).at(
                    file,
                    span.clone(),
                    "invalid method",
                ),
            );
            ok = false;
        }
    }
    for h in headers
        .iter()
        .flatten()
        .filter(|h| *h != "*")
        .chain(raw.expose_headers.iter())
    {
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
        methods: if any_method {
            vec!["*".to_owned()]
        } else {
            methods
        },
        // Any header: what the preflight asks for is answered, as without `allow_headers`.
        headers: if any_header { None } else { headers },
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
                // Defined, with its errors reported at the preset.
                None if edge.broken_cors.contains(name) => None,
                // Declared in a gateway.toml that did not load: that error is reported already.
                None if cx.unloaded.cors.contains(name) => None,
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
            return limit_spec(*f, d.get(), d.span(), edge).ok();
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
                ipv6_prefix: o.ipv6_prefix.or(d.ipv6_prefix),
            };
            (merged, file, own.map(Spanned::span).unwrap_or_default())
        }
    };
    if merged.enabled == Some(false) {
        return None;
    }
    match limit_spec(at_file, &merged, span.clone(), edge) {
        Ok(s) => {
            if let Some(w) = shared_key_warning(at_file, span, &s, edge) {
                cx.push(w);
            }
            Some(s)
        }
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
    edge: &EdgeDefaults,
) -> Result<LimitSpec, Diagnostic> {
    let store = &edge.store;
    let (Some(requests), Some(per)) = (raw.requests, raw.per.as_ref()) else {
        return Err(Diagnostic::error(
            "invalid-rate-limit",
            "a rate limit needs `requests` and `per`",
        )
        .at(file, span, "incomplete rate limit")
        .help("e.g. rate_limit = { requests = 100, per = \"1m\" }"));
    };
    let per_text = per.0.as_str();
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
    // One request every `per / requests`: the in-process limiter counts in nanoseconds and the
    // shared store in microseconds. Below that the interval was 0 (no limit at all) or rounded
    // up to the store's 1 µs (a lower limit than written).
    let redis = raw.store == Some(RawLimitStore::Redis);
    let (tick, unit) = if redis {
        (Duration::from_micros(1), "microsecond")
    } else {
        (Duration::from_nanos(1), "nanosecond")
    };
    if per / requests < tick {
        return Err(Diagnostic::error(
            "invalid-rate-limit",
            format!(
                "{requests} requests per \"{per_text}\" is more than one a {unit}, which the {} \
                 limiter cannot count",
                if redis { "shared" } else { "in-process" }
            ),
        )
        .at(file, span, format!("interval under a {unit}"))
        .help("lower `requests` or lengthen `per`; to turn the limit off, write enabled = false"));
    }
    let key = match raw.key.as_deref().unwrap_or("client_ip") {
        "client_ip" => LimitKey::ClientIp,
        "route" => LimitKey::Route,
        k => match k
            .strip_prefix("header:")
            .map(|h| HeaderName::from_bytes(h.trim().as_bytes()))
        {
            Some(Ok(h)) => {
                // Client headers named with `_` are dropped before any filter sees them, so
                // such a key would never be found and every request would count by address.
                if h.as_str().contains('_')
                    && !edge.allow_underscores
                    && !edge.identity_headers.contains(h.as_str())
                {
                    return Err(Diagnostic::error(
                        "invalid-rate-limit",
                        format!(
                            "the key header `{h}` has `_` in its name, and client headers named \
                             with `_` are dropped: the key would never be found, and every request would \
                             count by its address"
                        ),
                    )
                    .at(file, span, "never read")
                    .help(
                        "rename the header (e.g. with `-`), or set [headers] \
                         allow_underscores = true in gateway.toml",
                    ));
                }
                LimitKey::Header(h)
            }
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
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
    if ipv6_prefix == 0 || ipv6_prefix > 128 {
        return Err(Diagnostic::error(
            "invalid-rate-limit",
            format!("`ipv6_prefix = {ipv6_prefix}` is not a prefix length from 1 to 128"),
        )
        .at(file, span, "invalid prefix")
        .help("64 (the default) counts a /64 as one client; 128 counts every address"));
    }
    Ok(LimitSpec {
        requests,
        per,
        burst: raw.burst.unwrap_or(requests),
        key,
        shared,
        ipv6_prefix,
    })
}

/// New keys a second the warning below sizes Redis for: what one client can send.
const FLOOD_KEYS_PER_SECOND: u64 = 10_000;
/// Roughly what one bucket costs in Redis (`MEMORY USAGE`: 104 bytes keyed by address; a header
/// key is up to 256 bytes or its digest).
const REDIS_BYTES_PER_KEY: u64 = 150;

/// A shared limit keyed on a header the client chooses (not one the gateway sets from claims or
/// a client certificate) holds one Redis key per value the client sends, for `per / requests`
/// after one request (and up to `per` for a full bucket). Nothing caps their number: a client
/// sending new values fills Redis, and at `maxmemory` every shared check fails. Warned about
/// when one value holds its key for a second or more.
fn shared_key_warning(
    file: FileId,
    span: Range<usize>,
    spec: &LimitSpec,
    edge: &EdgeDefaults,
) -> Option<Diagnostic> {
    let LimitKey::Header(h) = &spec.key else {
        return None;
    };
    let gateway_set = edge.identity_headers.contains(h.as_str())
        || h == crate::proxy::headers::CLIENT_CERT_SUBJECT
        || h == crate::proxy::headers::CLIENT_CERT_SHA256;
    let interval = spec.per / spec.requests.max(1);
    if spec.shared.is_none() || gateway_set || interval < Duration::from_secs(1) {
        return None;
    }
    let keys = FLOOD_KEYS_PER_SECOND.saturating_mul(interval.as_secs());
    let mib = keys.saturating_mul(REDIS_BYTES_PER_KEY) / (1024 * 1024);
    Some(
        Diagnostic::warning(
            "shared-limit-client-key",
            format!(
                "this shared limit keys on `{h}`, which the client chooses: each value holds a \
                 Redis key for {}s after one request, so a client sending {FLOOD_KEYS_PER_SECOND} \
                 new values a second holds about {keys} keys (~{mib} MiB)",
                interval.as_secs()
            ),
        )
        .at(file, span, "client-chosen key in Redis")
        .help(
            "key on a verified identity (`claim:<name>`, or a header set by claims_to_headers), \
             shorten `per / requests`, keep the limit local, or cap Redis memory with \
             `maxmemory-policy volatile-ttl` (docs/scale-out.md)",
        ),
    )
}
