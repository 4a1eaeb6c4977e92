//! `[rate_limit_store]`: the Redis a fleet shares. Checked here, opened only by a running
//! gateway: `validate` never connects, so it needs no reachable Redis.

use std::sync::Arc;

use super::Cx;
use super::secrets::resolve_secret;
use crate::config::raw::{GatewayFile, RawOnStoreError, ValueSource};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::store::{DEFAULT_KEY_PREFIX, DEFAULT_TIMEOUT, OnStoreError, StoreSpec};

/// The store, as limits refer to it.
#[derive(Default)]
pub(crate) struct StoreRef {
    /// `None` when there is no `[rate_limit_store]` or it has errors.
    pub spec: Option<Arc<StoreSpec>>,
    /// `[rate_limit_store]` is written (with errors or not): a limit with `store = "redis"`
    /// is not reported again for it.
    pub declared: bool,
}

pub(crate) fn compile_store(cx: &mut Cx<'_>, gateway: Option<&(FileId, GatewayFile)>) -> StoreRef {
    let Some((file, g)) = gateway else {
        return StoreRef::default();
    };
    let Some(raw) = &g.rate_limit_store else {
        return StoreRef::default();
    };
    let file = *file;
    let before = cx.diags.error_count();
    let url = value(cx, file, &raw.url, true);
    let username = raw.username.as_ref().and_then(|u| value(cx, file, u, true));
    let password = raw
        .password
        .as_ref()
        .and_then(|p| value(cx, file, p, false));
    // An empty URL stands in for a secret that was not read (`validate --no-env`).
    if let Some(u) = url.as_deref().filter(|u| !u.is_empty()) {
        check_url(cx, file, &raw.url, u);
    }
    let timeout = match &raw.timeout {
        Some(t) => cx.duration(file, t).unwrap_or(DEFAULT_TIMEOUT),
        None => DEFAULT_TIMEOUT,
    };
    let expected_replicas =
        match &raw.expected_replicas {
            Some(n) if *n.get() == 0 => {
                cx.push(
                    Diagnostic::error("invalid-store", "`expected_replicas` must be at least 1")
                        .at(file, n.span(), "zero"),
                );
                1
            }
            Some(n) => *n.get(),
            None => 1,
        };
    let key_prefix = raw
        .key_prefix
        .as_ref()
        .map(|p| p.get().clone())
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    if cx.diags.error_count() > before {
        return StoreRef {
            spec: None,
            declared: true,
        };
    }
    let spec = StoreSpec {
        url: url.unwrap_or_default(),
        username,
        password,
        timeout,
        on_error: match raw.on_store_error {
            RawOnStoreError::Allow => OnStoreError::Allow,
            RawOnStoreError::Deny => OnStoreError::Deny,
            RawOnStoreError::Local => OnStoreError::Local,
        },
        expected_replicas,
        key_prefix,
    };
    StoreRef {
        spec: Some(Arc::new(spec)),
        declared: true,
    }
}

/// A field's text: a literal (where `literal_ok`) or a resolved secret reference.
fn value(
    cx: &mut Cx<'_>,
    file: FileId,
    v: &Spanned<ValueSource>,
    literal_ok: bool,
) -> Option<String> {
    match v.get() {
        ValueSource::Literal(text) if literal_ok => Some(text.clone()),
        ValueSource::Literal(_) => {
            cx.push(
                Diagnostic::error(
                    "inline-secret",
                    "the store's password must not be written in the repo",
                )
                .at(file, v.span(), "inline secret")
                .help("write password = { env = \"REDIS_PASSWORD\" } or { file = \"/run/secrets/redis\" }"),
            );
            None
        }
        ValueSource::Secret(s) => resolve_secret(cx, file, v.span(), s),
    }
}

fn check_url(cx: &mut Cx<'_>, file: FileId, at: &Spanned<ValueSource>, url: &str) {
    let literal = matches!(at.get(), ValueSource::Literal(_));
    // Never echo a URL read from a secret: it may hold a password.
    let redacted = crate::store::redact_store_url(url);
    let shown = if literal {
        redacted.as_str()
    } else {
        "the URL"
    };
    // A literal URL with a password: its line is not shown either.
    let mark = |d: Diagnostic| if redacted != url { d.secret() } else { d };
    let parsed = match redis::parse_redis_url(url) {
        Some(u) if crate::store::STORE_SCHEMES.contains(&u.scheme()) => u,
        _ => {
            cx.push(mark(
                Diagnostic::error(
                    "invalid-store",
                    format!("{shown} is not a redis://, rediss://, redis+unix://, valkey:// or valkeys:// URL"),
                )
                .at(file, at.span(), "invalid store URL")
                .help("e.g. url = \"redis://redis.internal:6379/0\", rediss:// for TLS, or redis+unix:///run/redis/redis.sock"),
            ));
            return;
        }
    };
    // A Unix-socket URL carries its password as `?pass=`, where redis-rs reads it.
    let password = parsed.password().is_some()
        || (crate::store::is_unix_scheme(parsed.scheme())
            && parsed.query_pairs().any(|(k, _)| k == "pass"));
    if literal && password {
        cx.push(
            Diagnostic::error(
                "inline-secret",
                "the store URL holds a password, which must not be written in the repo",
            )
            .at(file, at.span(), "password in the URL")
            .help("remove it from the URL and write password = { env = \"REDIS_PASSWORD\" }"),
        );
        return;
    }
    if redis::IntoConnectionInfo::into_connection_info(url).is_err() {
        cx.push(mark(
            Diagnostic::error("invalid-store", format!("{shown} is not a valid store URL"))
                .at(file, at.span(), "invalid store URL")
                .help("e.g. url = \"redis://redis.internal:6379/0\""),
        ));
    }
}
