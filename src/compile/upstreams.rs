//! `[upstream.<name>]` tables → [`Upstream`]s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use super::gateway::Defaults;
use super::{Cx, UpstreamTable};
use crate::config::raw::{Balance, RawTarget, RawUpstream};
use crate::config::raw::{RawHealth, RawOutlier, RawRetries, RawRetryTable, StatusPattern};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::upstream::health::HealthCheck;
use crate::upstream::retry::MAX_ATTEMPTS;
use crate::upstream::{
    Balancer, DEFAULT_IDLE_TIMEOUT, HashKey, Limits, Outlier, PoolKey, Protocol, RetryBudget,
    RetryOverride, RetryPolicy, Target, Upstream, state,
};

/// Largest weight a target may have; keeps the round-robin cycle small.
const MAX_WEIGHT: u32 = 1000;

pub(crate) fn compile_upstreams(
    cx: &mut Cx<'_>,
    raw: &[(FileId, Spanned<String>, RawUpstream)],
    defaults: &Defaults,
) -> UpstreamTable {
    state::prune();
    let mut out: UpstreamTable = HashMap::new();
    for (file, name, u) in raw {
        let file = *file;
        if let Some(((first_file, first_span), _)) = out.get(name.get()) {
            cx.push(
                Diagnostic::error(
                    "duplicate-upstream",
                    format!("upstream `{}` is defined twice", name.get()),
                )
                .at(file, name.span(), "defined again here")
                .also(*first_file, first_span.clone(), "first defined here"),
            );
            continue;
        }
        if !valid_name(name.get()) {
            cx.push(
                Diagnostic::error("invalid-name", format!("upstream name `{}` has characters other than letters, digits, `-`, `_` and `.`", name.get()))
                    .at(file, name.span(), "invalid name"),
            );
        }
        let mut targets = compile_targets(cx, file, name, &u.targets);
        super::tls::apply(cx, file, name, u, &mut targets);
        let health = u
            .health
            .as_ref()
            .and_then(|h| health(cx, file, h))
            .map(Arc::new);
        // A target's state is keyed by how it is checked and reached too: a changed health check
        // or TLS setting starts a fresh verdict, and a checker with the new settings.
        let how = health.as_ref().map_or(0, |h| h.fingerprint());
        for t in &mut targets {
            t.state = state::target_state(name.get(), &t.url, how ^ t.pool_key.variant());
        }
        let connect_timeout = u
            .connect_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v))
            .unwrap_or(defaults.connect_timeout);
        let timeout = u.timeout.as_ref().and_then(|v| cx.duration(file, v));
        let total_timeout = u.total_timeout.as_ref().and_then(|v| cx.duration(file, v));
        let idle_timeout = u
            .idle_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v))
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let balancer = balancer(cx, file, name, u, &targets, &weights);
        let outlier = u
            .outlier
            .as_ref()
            .map(|o| outlier(cx, file, o))
            .unwrap_or_default();
        let (retry, budget) = match &u.retries {
            Some(r) => {
                let (o, budget) = retries(cx, file, r, true);
                (o.apply(&RetryPolicy::default()), budget)
            }
            None => (RetryPolicy::default(), RetryBudget::default()),
        };
        let limits = u
            .circuit_breaker
            .as_ref()
            .map(|c| Limits {
                max_requests: c
                    .max_requests
                    .as_ref()
                    .map(|v| positive(cx, file, v, "max_requests")),
                max_pending: c
                    .max_pending
                    .as_ref()
                    .map(|v| positive(cx, file, v, "max_pending")),
            })
            .unwrap_or_default();
        let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
        let shared = state::upstream_shared(name.get(), &urls);
        let upstream = Upstream {
            name: name.get().clone(),
            targets,
            balancer,
            connect_timeout,
            timeout,
            total_timeout,
            idle_timeout,
            fail_open: u.fail_open.unwrap_or(false),
            health,
            outlier,
            retry,
            budget,
            limits,
            shared,
        };
        out.insert(
            name.get().clone(),
            ((file, name.span()), Arc::new(upstream)),
        );
    }
    out
}

fn compile_targets(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &Spanned<String>,
    raw: &Spanned<Vec<Spanned<RawTarget>>>,
) -> Vec<Target> {
    if raw.is_empty() {
        cx.push(
            Diagnostic::error(
                "no-targets",
                format!("upstream `{}` has no targets", name.get()),
            )
            .at(file, raw.span(), "empty")
            .help("add at least one target, e.g. targets = [\"http://127.0.0.1:8001\"]"),
        );
        return Vec::new();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in raw.iter() {
        let (url, weight) = match t.get() {
            RawTarget::Url(u) => (u.as_str(), 1),
            RawTarget::Weighted { url, weight } => (url.as_str(), *weight),
        };
        if weight == 0 || weight > MAX_WEIGHT {
            cx.push(
                Diagnostic::error(
                    "invalid-value",
                    format!("target weight {weight} is out of range"),
                )
                .at(file, t.span(), "bad weight")
                .help(format!("weights go from 1 to {MAX_WEIGHT}")),
            );
            continue;
        }
        match parse_target(url) {
            Ok(target) => {
                if !seen.insert(target.authority.as_str().to_ascii_lowercase()) {
                    cx.push(
                        Diagnostic::warning(
                            "duplicate-target",
                            format!(
                                "target `{url}` is listed twice in upstream `{}`",
                                name.get()
                            ),
                        )
                        .at(file, t.span(), "listed again here")
                        .help("use `weight` to send it more traffic"),
                    );
                }
                out.push(Target { weight, ..target });
            }
            Err(why) => {
                // Never echo credentials: the message goes to /status and the logs.
                let shown = crate::source::redact_url(url);
                let d = Diagnostic::error(
                    "invalid-target",
                    format!("invalid target URL `{shown}`: {why}"),
                )
                .at(file, t.span(), "invalid target")
                .help("write targets as \"http://host:port\" or \"https://host:port\"");
                cx.push(if shown == *url { d } else { d.secret() });
            }
        }
    }
    out
}

fn parse_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    let scheme = uri.scheme().cloned().ok_or("no scheme")?;
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        other => return Err(format!("unsupported scheme `{other}`")),
    };
    let authority = uri.authority().cloned().ok_or("no host")?;
    if authority.host().is_empty() {
        return Err("no host".into());
    }
    if authority.as_str().contains('@') {
        return Err("credentials in a target URL are not allowed".into());
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(
            "a target is an origin only; use the route's `add_prefix` for a base path".into(),
        );
    }
    let port = authority.port_u16().unwrap_or(default_port);
    let connect_addr = format!("{}:{port}", authority.host());
    Ok(Target {
        url: url.to_owned(),
        scheme,
        pool_key: PoolKey::new(authority.clone(), 0),
        authority,
        connect_addr,
        weight: 1,
        protocol: Protocol::Http1,
        tls: None,
        // Replaced by the registry's state once the upstream's health and TLS are compiled.
        state: state::TargetState::detached("", url),
    })
}

fn balancer(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &Spanned<String>,
    u: &RawUpstream,
    targets: &[Target],
    weights: &[u32],
) -> Balancer {
    let key = match (&u.balance, &u.hash_key) {
        (Balance::ConsistentHash, None) => {
            cx.push(
                Diagnostic::error(
                    "missing-hash-key",
                    format!(
                        "upstream `{}` uses consistent_hash without a `hash_key`",
                        name.get()
                    ),
                )
                .at(file, name.span(), "no hash_key")
                .help("add e.g. hash_key = \"client_ip\" (or path, header:<name>, cookie:<name>)"),
            );
            None
        }
        (Balance::ConsistentHash, Some(k)) => match HashKey::parse(k.get()) {
            Ok(k) => Some(k),
            Err(why) => {
                cx.push(Diagnostic::error("invalid-hash-key", why).at(
                    file,
                    k.span(),
                    "invalid key",
                ));
                None
            }
        },
        (_, Some(k)) => {
            cx.push(
                Diagnostic::warning(
                    "unused-hash-key",
                    "`hash_key` only matters with balance = \"consistent_hash\"",
                )
                .at(file, k.span(), "ignored"),
            );
            None
        }
        (_, None) => None,
    };
    match u.balance {
        Balance::RoundRobin => Balancer::round_robin(weights),
        Balance::LeastConnections => Balancer::least_connections(),
        Balance::RandomTwoChoices => Balancer::random_two_choices(weights),
        Balance::ConsistentHash => match key {
            Some(k) => {
                let ids: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
                Balancer::consistent_hash(k, &ids, weights)
            }
            None => Balancer::round_robin(weights),
        },
    }
}

fn positive(cx: &mut Cx<'_>, file: FileId, v: &Spanned<u32>, what: &str) -> u32 {
    if *v.get() == 0 {
        cx.push(
            Diagnostic::error("invalid-value", format!("`{what}` must be at least 1")).at(
                file,
                v.span(),
                "zero",
            ),
        );
    }
    *v.get()
}

fn health(cx: &mut Cx<'_>, file: FileId, h: &Spanned<RawHealth>) -> Option<HealthCheck> {
    let errors = cx.diags.error_count();
    let path = h.path.get();
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        cx.push(
            Diagnostic::error(
                "invalid-value",
                "a health check path starts with `/` and has no spaces",
            )
            .at(file, h.path.span(), "invalid path"),
        );
    }
    let interval = h
        .interval
        .as_ref()
        .and_then(|v| cx.duration(file, v))
        .unwrap_or(Duration::from_secs(5));
    let timeout = h
        .timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
        .unwrap_or(Duration::from_secs(2));
    if let Some(t) = &h.timeout
        && timeout > interval
    {
        cx.push(
            Diagnostic::warning(
                "health-timeout",
                "the health check timeout is longer than its interval",
            )
            .at(file, t.span(), "longer than `interval`"),
        );
    }
    let (mut codes, mut classes) = (Vec::new(), Vec::new());
    match &h.expect_status {
        None => classes.extend([2, 3]),
        Some(list) => {
            for p in list.iter() {
                match p.get() {
                    StatusPattern::Code(c @ 100..=599) => codes.push(*c),
                    StatusPattern::Text(t)
                        if t.len() == 3
                            && matches!(t.as_bytes()[0], b'1'..=b'5')
                            && t[1..].eq_ignore_ascii_case("xx") =>
                    {
                        classes.push(u16::from(t.as_bytes()[0] - b'0'));
                    }
                    StatusPattern::Text(t)
                        if t.parse::<u16>().is_ok_and(|c| (100..600).contains(&c)) =>
                    {
                        codes.extend(t.parse::<u16>().ok());
                    }
                    _ => cx.push(
                        Diagnostic::error(
                            "invalid-value",
                            "expected a status code (200) or class (\"2xx\")",
                        )
                        .at(file, p.span(), "not a status"),
                    ),
                }
            }
        }
    }
    let count = |cx: &mut Cx<'_>, v: &Option<Spanned<u32>>, what: &str, default: u32| match v {
        None => default,
        Some(v) => positive(cx, file, v, what),
    };
    let healthy_after = count(cx, &h.healthy_after, "healthy_after", 2);
    let unhealthy_after = count(cx, &h.unhealthy_after, "unhealthy_after", 3);
    let host = h.host.as_ref().map(|v| v.get().clone());
    if let Some(v) = &h.host
        && http::HeaderValue::from_str(v.get()).is_err()
    {
        cx.push(
            Diagnostic::error("invalid-value", "not a valid Host header value").at(
                file,
                v.span(),
                "invalid",
            ),
        );
    }
    (cx.diags.error_count() == errors).then(|| HealthCheck {
        path: path.clone(),
        interval,
        timeout,
        expect_codes: codes,
        expect_classes: classes,
        healthy_after,
        unhealthy_after,
        host,
        ends_ejections: h.ends_ejections.unwrap_or(true),
    })
}

fn outlier(cx: &mut Cx<'_>, file: FileId, o: &Spanned<RawOutlier>) -> Outlier {
    let d = Outlier::default();
    let max_ejected_percent =
        match &o.max_ejected_percent {
            Some(v) if *v.get() > 100 => {
                cx.push(
                    Diagnostic::error("invalid-value", "`max_ejected_percent` goes from 0 to 100")
                        .at(file, v.span(), "out of range"),
                );
                d.max_ejected_percent
            }
            Some(v) => *v.get(),
            None => d.max_ejected_percent,
        };
    let base_ejection = o
        .base_ejection
        .as_ref()
        .and_then(|v| cx.duration(file, v))
        .unwrap_or(d.base_ejection);
    let max_ejection = o
        .max_ejection
        .as_ref()
        .and_then(|v| cx.duration(file, v))
        .unwrap_or(d.max_ejection.max(base_ejection));
    if max_ejection < base_ejection
        && let Some(v) = &o.max_ejection
    {
        cx.push(
            Diagnostic::error(
                "invalid-value",
                "`max_ejection` is shorter than `base_ejection`",
            )
            .at(file, v.span(), "too short"),
        );
    }
    Outlier {
        consecutive_failures: o
            .consecutive_failures
            .as_ref()
            .map_or(d.consecutive_failures, |v| *v.get()),
        consecutive_5xx: o
            .consecutive_5xx
            .as_ref()
            .map_or(d.consecutive_5xx, |v| *v.get()),
        base_ejection,
        max_ejection,
        max_ejected_percent,
    }
}

/// Compiles `retries` (an upstream's when `upstream` is true, else a route's).
pub(crate) fn retries(
    cx: &mut Cx<'_>,
    file: FileId,
    r: &Spanned<RawRetries>,
    upstream: bool,
) -> (RetryOverride, RetryBudget) {
    let too_many =
        |cx: &mut Cx<'_>, n: u32| {
            if n > MAX_ATTEMPTS {
                cx.push(
                    Diagnostic::error("invalid-value", format!("at most {MAX_ATTEMPTS} retries"))
                        .at(file, r.span(), "too many retries"),
                );
            }
        };
    let t: RawRetryTable = match r.get() {
        RawRetries::Attempts(n) => {
            too_many(cx, *n);
            return (
                RetryOverride {
                    attempts: Some(*n),
                    ..RetryOverride::default()
                },
                RetryBudget::default(),
            );
        }
        RawRetries::Table(t) => (**t).clone(),
    };
    if let Some(n) = t.attempts {
        too_many(cx, n);
    }
    let mut o = RetryOverride {
        attempts: t.attempts,
        non_idempotent: t.non_idempotent,
        ..RetryOverride::default()
    };
    if let Some(on) = &t.on {
        let mut p = RetryPolicy::default();
        match p.set_conditions(on.iter().map(|c| c.get().as_str())) {
            Ok(()) => {
                o.conditions = Some((p.on_connect_failure, p.on_timeout, p.on_reset, p.statuses))
            }
            Err(bad) => {
                let span = on
                    .iter()
                    .find(|c| c.get() == bad)
                    .map_or(on.span(), |c| c.span());
                cx.push(
                    Diagnostic::error("invalid-value", format!("unknown retry condition `{bad}`"))
                        .at(file, span, "unknown condition")
                        .help("use connect_failure, timeout, reset, 5xx or a status like \"503\""),
                );
            }
        }
    }
    o.backoff = t.backoff.as_ref().and_then(|v| cx.duration(file, v));
    o.max_backoff = t.max_backoff.as_ref().and_then(|v| cx.duration(file, v));
    o.replay_body_limit = t.replay_body_limit.as_ref().and_then(|v| cx.size(file, v));
    let mut budget = RetryBudget::default();
    for (field, value) in [
        ("budget_percent", &t.budget_percent),
        ("min_retries_per_second", &t.min_retries_per_second),
    ] {
        let Some(v) = value else { continue };
        if !upstream {
            cx.push(
                Diagnostic::error(
                    "upstream-only",
                    format!("`{field}` is set on the upstream, not on a route"),
                )
                .at(file, v.span(), "route setting")
                .help("the retry budget is shared by every route that uses the upstream"),
            );
        } else if field == "budget_percent" {
            if *v.get() > 100 {
                cx.push(
                    Diagnostic::error("invalid-value", "`budget_percent` goes from 0 to 100").at(
                        file,
                        v.span(),
                        "out of range",
                    ),
                );
            }
            budget.percent = *v.get();
        } else {
            budget.min_per_second = *v.get();
        }
    }
    (o, budget)
}

pub(crate) fn warn_unused(
    cx: &mut Cx<'_>,
    raw: &[(FileId, Spanned<String>, RawUpstream)],
    used: &HashSet<String>,
) {
    for (file, name, _) in raw {
        if !used.contains(name.get()) && !cx.unloaded.route_upstreams.contains(name.get()) {
            cx.push(
                Diagnostic::warning(
                    "unused-upstream",
                    format!("upstream `{}` is not used by any route", name.get()),
                )
                .at(*file, name.span(), "unused"),
            );
        }
    }
}

/// Names end up in logs and metric labels: keep them plain.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls() {
        assert!(parse_target("http://127.0.0.1:8001").is_ok());
        assert!(parse_target("http://backend").is_ok());
        assert!(parse_target("http://127.0.0.1:8001/").is_ok());
        assert!(parse_target("127.0.0.1:8001").is_err());
        assert!(parse_target("ftp://x").is_err());
        let t = parse_target("https://orders.internal").unwrap();
        assert_eq!(t.connect_addr, "orders.internal:443");
        assert_eq!(
            parse_target("https://10.0.0.1:8443").unwrap().connect_addr,
            "10.0.0.1:8443"
        );
        assert!(parse_target("http://x/base").is_err());
        assert!(parse_target("http://u:p@x").is_err());
        assert!(parse_target("http://").is_err());
    }
}
