//! `[upstream.<name>]` tables → [`Upstream`]s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::Uri;

use super::gateway::Defaults;
use super::{Cx, UpstreamTable};
use crate::config::raw::{Balance, RawTarget, RawUpstream};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::upstream::{Balancer, Target, Upstream};

/// Largest weight a target may have; keeps the round-robin cycle small.
const MAX_WEIGHT: u32 = 1000;

pub(crate) fn compile_upstreams(
    cx: &mut Cx<'_>,
    raw: &[(FileId, Spanned<String>, RawUpstream)],
    defaults: &Defaults,
) -> UpstreamTable {
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
        let targets = compile_targets(cx, file, name, &u.targets);
        let connect_timeout = u
            .connect_timeout
            .as_ref()
            .and_then(|v| cx.duration(file, v))
            .unwrap_or(defaults.connect_timeout);
        let timeout = u.timeout.as_ref().and_then(|v| cx.duration(file, v));
        let balancer = match u.balance {
            Balance::RoundRobin => {
                Balancer::round_robin(&targets.iter().map(|t| t.weight).collect::<Vec<_>>())
            }
        };
        let upstream = Upstream {
            name: name.get().clone(),
            targets,
            balancer,
            connect_timeout,
            timeout,
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
            Err(why) => cx.push(
                Diagnostic::error(
                    "invalid-target",
                    format!("invalid target URL `{url}`: {why}"),
                )
                .at(file, t.span(), "invalid target")
                .help("write targets as \"http://host:port\""),
            ),
        }
    }
    out
}

fn parse_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    let scheme = uri.scheme().cloned().ok_or("no scheme")?;
    match scheme.as_str() {
        "http" => {}
        "https" => return Err("https targets are not supported by this build yet".into()),
        other => return Err(format!("unsupported scheme `{other}`")),
    }
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
    let port = authority.port_u16().unwrap_or(80);
    let connect_addr = format!("{}:{port}", authority.host());
    Ok(Target {
        url: url.to_owned(),
        scheme,
        authority,
        connect_addr,
        weight: 1,
    })
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
        assert!(parse_target("http://x/base").is_err());
        assert!(parse_target("http://u:p@x").is_err());
        assert!(parse_target("http://").is_err());
    }
}
