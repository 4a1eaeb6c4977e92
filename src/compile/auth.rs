//! `[auth.<name>]` providers → [`JwtProvider`]s, and a route's `auth` → [`RouteAuth`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::Cx;
use super::routes::resolve_secret;
use crate::config::raw::{GatewayFile, RawAuthProvider, ValueSource};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::filters::jwks::JwksCache;
use crate::filters::jwt::{ClaimRule, JwtProvider, Keys, TokenSource, algorithm};

use crate::snapshot::RouteAuth;

/// Every declared provider by name; `None` for one that failed to compile (its own error is
/// already reported, so a route naming it is not blamed again as naming an unknown provider).
pub(crate) type Providers = HashMap<String, Option<Arc<JwtProvider>>>;

pub(crate) fn compile_providers(
    cx: &mut Cx<'_>,
    gateway: Option<&(FileId, GatewayFile)>,
) -> Providers {
    let mut out = HashMap::new();
    let Some((file, g)) = gateway else {
        return out;
    };
    for (name, raw) in &g.auth {
        let compiled = provider(cx, *file, name, raw, g.headers.allow_underscores);
        out.insert(name.clone(), compiled.map(Arc::new));
    }
    out
}

fn err(
    cx: &mut Cx<'_>,
    file: FileId,
    span: std::ops::Range<usize>,
    msg: impl Into<String>,
    help: &str,
) {
    cx.push(
        Diagnostic::error("invalid-auth", msg)
            .at(file, span, "here")
            .help(help),
    );
}

fn duration(
    cx: &mut Cx<'_>,
    file: FileId,
    span: std::ops::Range<usize>,
    v: Option<&crate::config::raw::DurationText>,
    default: Duration,
) -> Duration {
    match v.map(|d| crate::config::units::parse_duration(&d.0)) {
        None => default,
        Some(Ok(d)) if d > super::MAX_DURATION => {
            cx.push(
                Diagnostic::error(
                    "invalid-duration",
                    "a duration longer than 365 days is not allowed",
                )
                .at(file, span, "too long")
                .help("a leeway this long would overflow the clock when tokens are checked"),
            );
            default
        }
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            cx.push(Diagnostic::error("invalid-duration", e).at(file, span, "invalid duration"));
            default
        }
    }
}

fn provider(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &str,
    raw: &Spanned<RawAuthProvider>,
    allow_underscores: bool,
) -> Option<JwtProvider> {
    let span = raw.span();
    let r = raw.get();
    if r.kind != "jwt" {
        err(
            cx,
            file,
            span,
            format!("auth provider `{name}` has unknown type `{}`", r.kind),
            "the supported type is \"jwt\"",
        );
        return None;
    }
    let mut algs = Vec::new();
    for a in &r.algorithms {
        match algorithm(a) {
            Some(alg) => algs.push(alg),
            None => err(
                cx,
                file,
                span.clone(),
                format!("unknown JWT algorithm `{a}`"),
                "use HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA",
            ),
        }
    }
    if algs.is_empty() {
        err(
            cx,
            file,
            span.clone(),
            format!("auth provider `{name}` accepts no algorithm"),
            "list the algorithms your issuer signs with, e.g. algorithms = [\"RS256\"]",
        );
        return None;
    }
    let hmac = algs
        .iter()
        .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512));
    let asymmetric = algs
        .iter()
        .any(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512));
    if hmac && asymmetric {
        // One provider mixing both is how algorithm confusion happens.
        err(
            cx,
            file,
            span.clone(),
            format!("auth provider `{name}` mixes HMAC and public-key algorithms"),
            "use two providers",
        );
        return None;
    }
    let sources = [
        r.secret.is_some(),
        r.public_key_pem.is_some(),
        r.jwks_url.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if sources != 1 {
        err(
            cx,
            file,
            span.clone(),
            format!(
                "auth provider `{name}` needs exactly one of `secret`, `public_key_pem`, `jwks_url`"
            ),
            "HS* algorithms use `secret`; others `public_key_pem` or `jwks_url`",
        );
        return None;
    }
    let keys = if let Some(s) = &r.secret {
        if !hmac {
            err(
                cx,
                file,
                s.span(),
                "`secret` is for HS* algorithms",
                "use `public_key_pem` or `jwks_url`",
            );
            return None;
        }
        let ValueSource::Secret(secret) = s.get() else {
            cx.push(
                Diagnostic::error(
                    "inline-secret",
                    "a JWT secret must not be written in the repo",
                )
                .at(file, s.span(), "inline secret")
                .help("write secret = { env = \"JWT_SECRET\" } or { file = \"/run/secrets/jwt\" }"),
            );
            return None;
        };
        let text = resolve_secret(cx, file, s.span(), secret)?;
        if cx.opts.resolve_secrets && text.len() < 32 {
            err(
                cx,
                file,
                s.span(),
                "the HMAC secret is shorter than 32 bytes",
                "use a random secret of at least 32 bytes",
            );
        }
        Keys::Static(vec![DecodingKey::from_secret(text.as_bytes())])
    } else if let Some(p) = &r.public_key_pem {
        if hmac {
            err(
                cx,
                file,
                p.span(),
                "`public_key_pem` is for public-key algorithms",
                "HS* algorithms use `secret`",
            );
            return None;
        }
        let pem = match p.get() {
            ValueSource::Literal(text) => text.clone(),
            ValueSource::Secret(s) => resolve_secret(cx, file, p.span(), s)?,
        };
        if !cx.opts.resolve_secrets && !matches!(p.get(), ValueSource::Literal(_)) {
            Keys::Static(Vec::new())
        } else {
            let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                .or_else(|_| DecodingKey::from_ec_pem(pem.as_bytes()))
                .or_else(|_| DecodingKey::from_ed_pem(pem.as_bytes()));
            match key {
                Ok(k) => Keys::Static(vec![k]),
                Err(_) => {
                    err(
                        cx,
                        file,
                        p.span(),
                        "`public_key_pem` is not an RSA, EC or Ed25519 public key in PEM form",
                        "",
                    );
                    return None;
                }
            }
        }
    } else if let Some(u) = &r.jwks_url {
        if hmac {
            err(
                cx,
                file,
                u.span(),
                "a JWKS holds public keys; HS* algorithms use `secret`",
                "",
            );
            return None;
        }
        let ok_scheme = u.starts_with("https://") || u.starts_with("http://");
        if !ok_scheme || u.parse::<http::Uri>().is_err() {
            err(
                cx,
                file,
                u.span(),
                format!("`{}` is not an http(s) URL", u.get()),
                "",
            );
            return None;
        }
        if let Some(host) = plain_http_remote_host(u.get()) {
            cx.push(
                Diagnostic::warning(
                    "insecure-jwks-url",
                    format!(
                        "auth provider `{name}` fetches its signing keys over plain http from `{host}`"
                    ),
                )
                .at(file, u.span(), "not https")
                .help(
                    "anyone on the path can replace the keys and sign any token: use https:// \
                     (plain http is accepted quietly only for a loopback host)",
                ),
            );
        }
        let ttl = duration(
            cx,
            file,
            span.clone(),
            r.jwks_ttl.as_ref(),
            Duration::from_secs(600),
        );
        let min = duration(
            cx,
            file,
            span.clone(),
            r.jwks_min_refresh.as_ref(),
            Duration::from_secs(30),
        );
        Keys::Jwks(JwksCache::for_url(u.get(), ttl, min))
    } else {
        return None;
    };
    let mut validation = Validation::new(algs[0]);
    validation.algorithms = algs;
    // `exp` and `nbf` are checked by the provider itself, by the same rules its token cache
    // uses (`filters::jwt`): whenever present, whatever `require_exp` says.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = duration(
        cx,
        file,
        span.clone(),
        r.leeway.as_ref(),
        Duration::from_secs(30),
    )
    .as_secs();
    let mut required: Vec<String> = r.required_claims.clone();
    if r.require_exp != Some(false) {
        required.push("exp".into());
    }
    if !r.issuers.is_empty() {
        validation.set_issuer(&r.issuers);
        required.push("iss".into());
    }
    if r.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&r.audiences);
        required.push("aud".into());
    }
    validation.set_required_spec_claims(&required);
    let mut rules: Vec<ClaimRule> = r
        .required_claims
        .iter()
        .map(|c| ClaimRule::Present(c.clone()))
        .collect();
    for rule in &r.claim_rules {
        match (&rule.equals, &rule.contains) {
            (Some(v), None) => rules.push(ClaimRule::Equals(rule.claim.clone(), v.clone())),
            (None, Some(v)) => rules.push(ClaimRule::Contains(rule.claim.clone(), v.clone())),
            _ => err(
                cx,
                file,
                span.clone(),
                format!(
                    "claim rule on `{}` needs exactly one of `equals`, `contains`",
                    rule.claim
                ),
                "",
            ),
        }
    }
    let source = match r.token.as_ref().map(|t| (t.span(), t.get().as_str())) {
        None | Some((_, "bearer")) => TokenSource::Bearer,
        Some((s, t)) => match t.split_once(':') {
            Some(("header", h)) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => {
                    if h.as_str().contains('_') && !allow_underscores {
                        cx.push(
                            Diagnostic::warning(
                                "token-header-underscore",
                                format!("the token header `{h}` has `_` in its name"),
                            )
                            .at(file, s.clone(), "never read")
                            .help(
                                "client headers with `_` are dropped unless gateway.toml sets \
                                 [headers] allow_underscores = true: rename the header",
                            ),
                        );
                    }
                    TokenSource::Header(h)
                }
                Err(_) => {
                    err(cx, file, s, format!("`{h}` is not a header name"), "");
                    return None;
                }
            },
            Some(("query", q)) if !q.is_empty() => TokenSource::Query(q.to_owned()),
            Some(("cookie", c)) if !c.is_empty() => TokenSource::Cookie(c.to_owned()),
            _ => {
                err(
                    cx,
                    file,
                    s,
                    format!("unknown token location `{t}`"),
                    "use \"bearer\", \"header:<name>\", \"query:<name>\" or \"cookie:<name>\"",
                );
                return None;
            }
        },
    };
    let mut claims_to_headers = Vec::new();
    for (claim, header) in &r.claims_to_headers {
        match HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => claims_to_headers.push((claim.clone(), h)),
            Err(_) => err(
                cx,
                file,
                span.clone(),
                format!("`{header}` is not a header name"),
                "",
            ),
        }
    }
    Some(JwtProvider {
        id: crate::filters::jwt::next_provider_id(),
        name: name.to_owned(),
        validation,
        keys,
        source,
        rules,
        claims_to_headers,
        forward_token: r.forward_token.unwrap_or(false),
    })
}

/// The host of a plain `http://` URL that is not a loopback address (`localhost`,
/// `127.0.0.0/8`, `::1`).
fn plain_http_remote_host(url: &str) -> Option<String> {
    let uri = url.parse::<http::Uri>().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| crate::util::canonical_ip(ip).is_loopback());
    (!loopback).then(|| host.to_owned())
}

/// A route's `auth = "<name>"`.
pub(crate) fn route_auth(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &Spanned<String>,
    optional: bool,
    providers: &Providers,
) -> Option<RouteAuth> {
    match providers.get(name.get()) {
        Some(Some(p)) => Some(RouteAuth {
            provider: Arc::clone(p),
            optional,
        }),
        Some(None) => None,
        // Declared in a gateway.toml that did not load: that error is reported already.
        None if cx.unloaded.auth.contains(name.get()) => None,
        None => {
            let mut d = Diagnostic::error(
                "unknown-auth",
                format!("unknown auth provider `{}`", name.get()),
            )
            .at(file, name.span(), "no provider with this name");
            d = match super::did_you_mean(name.get(), providers.keys().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help("define it in gateway.toml as `[auth.<name>]` with type = \"jwt\""),
            };
            cx.push(d);
            None
        }
    }
}
