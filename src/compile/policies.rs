//! Policy scripts: `[policy_limits]`, and each `policies/*.rhai` a route names, compiled once
//! per snapshot into an `Arc<Policy>` shared by every route that names it.
//!
//! A script's text is added to the snapshot's source files, so its diagnostics render with a
//! snippet like any TOML error and its content changes the config version.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use rhai::Engine;

use super::{Cx, UpstreamTable, did_you_mean};
use crate::config::files::FileKind;
use crate::config::raw::{GatewayFile, RawRoute};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::policy::{self, Limits, Policy, RoutePolicy};

/// Policy state for one compile: the engine and every script compiled so far, by path.
pub(crate) struct Policies {
    pub limits: Limits,
    engine: Option<Arc<Engine>>,
    /// `None` when the script failed (its errors are reported once, not per route).
    compiled: HashMap<String, Option<Arc<Policy>>>,
    /// Upstreams scripts choose with `set_upstream("literal")`: used, so not warned about.
    pub used_upstreams: HashSet<String>,
}

impl Policies {
    pub fn new(limits: Limits) -> Self {
        Policies {
            limits,
            engine: None,
            compiled: HashMap::new(),
            used_upstreams: HashSet::new(),
        }
    }
}

/// `[policy_limits]` from `gateway.toml`, over the defaults.
pub(crate) fn limits(cx: &mut Cx<'_>, gateway: Option<&(FileId, GatewayFile)>) -> Limits {
    let mut out = Limits::default();
    let Some((file, g)) = gateway else {
        return out;
    };
    let (file, l) = (*file, &g.policy_limits);
    let positive = |cx: &mut Cx<'_>, v: &Spanned<u64>, what: &str| -> Option<u64> {
        if *v.get() == 0 {
            cx.push(
                Diagnostic::error("invalid-value", format!("`{what}` must be at least 1"))
                    .at(file, v.span(), "zero")
                    .help("a limit of 0 would turn the limit off; policies always run bounded"),
            );
            return None;
        }
        Some(*v.get())
    };
    let widen = |v: &Spanned<u32>| Spanned::new(u64::from(*v.get()), v.span());
    if let Some(n) = l
        .max_operations
        .as_ref()
        .and_then(|v| positive(cx, v, "max_operations"))
    {
        out.max_operations = n;
    }
    if let Some(n) = l
        .max_call_depth
        .as_ref()
        .and_then(|v| positive(cx, &widen(v), "max_call_depth"))
    {
        out.max_call_depth = n as usize;
    }
    if let Some(n) = l
        .max_expr_depth
        .as_ref()
        .and_then(|v| positive(cx, &widen(v), "max_expr_depth"))
    {
        out.max_expr_depth = n as usize;
    }
    if let Some(n) = l
        .max_array_size
        .as_ref()
        .and_then(|v| positive(cx, &widen(v), "max_array_size"))
    {
        out.max_array_size = n as usize;
    }
    if let Some(n) = l
        .max_map_size
        .as_ref()
        .and_then(|v| positive(cx, &widen(v), "max_map_size"))
    {
        out.max_map_size = n as usize;
    }
    if let Some(v) = &l.max_string_size
        && let Some(n) = cx.size(file, v)
    {
        match usize::try_from(n) {
            Ok(n) if n > 0 => out.max_string_size = n,
            _ => {
                cx.push(
                    Diagnostic::error("invalid-value", "`max_string_size` must be at least 1 byte")
                        .at(file, v.span(), "out of range"),
                )
            }
        }
    }
    if let Some(d) = l.budget.as_ref().and_then(|v| cx.duration(file, v)) {
        out.budget = d;
    }
    out
}

/// The compiled policy for a route: its own, else the gateway default; `None` with diagnostics.
pub(crate) fn route_policy(
    cx: &mut Cx<'_>,
    file: FileId,
    r: &RawRoute,
    upstreams: &UpstreamTable,
    default: Option<&super::gateway::DefaultPolicy>,
) -> Option<RoutePolicy> {
    let (file, p, policy_config) = match (&r.policy, default) {
        (Some(p), _) => (file, p, r.policy_config.as_deref()),
        (None, Some(d)) => (d.file, &d.path, d.config.as_ref()),
        (None, None) => return None,
    };
    if let Some(c) = policy_config {
        // A policy that routes by config (`tenants = { acme = "tenant-eu" }`) names its
        // upstreams there: they are used, not worth an "unused upstream" warning.
        let mut names = Vec::new();
        strings_in(c.get(), &mut names);
        cx.policies.used_upstreams.extend(
            names
                .into_iter()
                .filter(|n| upstreams.contains_key(*n))
                .map(str::to_owned),
        );
    }
    let compiled = match cx.policies.compiled.get(p.get()) {
        Some(c) => c.clone(),
        None => {
            let c = load(cx, file, p, upstreams);
            cx.policies.compiled.insert(p.get().clone(), c.clone());
            c
        }
    }?;
    let config = policy_config
        .map(|c| policy::to_map(c.get()))
        .unwrap_or_default();
    Some(RoutePolicy {
        policy: compiled,
        config: Arc::new(config),
        route: Arc::from(r.name.get().as_str()),
    })
}

/// Every string value in a JSON object, at any depth.
fn strings_in<'a>(m: &'a serde_json::Map<String, serde_json::Value>, out: &mut Vec<&'a str>) {
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(m) => m.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    m.values().for_each(|v| walk(v, out));
}

/// Reads and compiles one script, reporting every problem in it.
fn load(
    cx: &mut Cx<'_>,
    file: FileId,
    p: &Spanned<String>,
    upstreams: &UpstreamTable,
) -> Option<Arc<Policy>> {
    let source = cx.read_repo_file(file, p, FileKind::Policy, "policy", "policies/orders.rhai")?;
    let script = cx.files.add(p.get().clone(), source.clone());
    let engine = Arc::clone(
        cx.policies
            .engine
            .get_or_insert_with(|| policy::engine(&cx.policies.limits)),
    );
    let errors_before = cx.diags.error_count();
    check_literals(cx, script, &source, upstreams);
    match policy::compile(&engine, &cx.policies.limits, p.get(), &source) {
        Ok(policy) if cx.diags.error_count() == errors_before => Some(Arc::new(policy)),
        Ok(_) => None,
        Err(errors) => {
            for e in errors {
                let mut d = Diagnostic::error(e.code, e.message)
                    .at(script, e.span, e.label)
                    .also(file, p.span(), "policy used here");
                if let Some(h) = e.help {
                    d = d.help(h);
                }
                cx.push(d);
            }
            None
        }
    }
}

/// Checks what can be known from string literals: `set_upstream("name")` names an upstream that
/// exists, and `regex_match("pattern", ..)` / `regex_captures` patterns compile (and are then
/// cached, so they are compiled once, here).
fn check_literals(cx: &mut Cx<'_>, script: FileId, source: &str, upstreams: &UpstreamTable) {
    for (name, span) in literal_args(source, "set_upstream") {
        cx.policies.used_upstreams.insert(name.clone());
        if upstreams.contains_key(&name) || cx.unloaded.upstreams.contains(&name) {
            continue;
        }
        let mut d = Diagnostic::error(
            "unknown-upstream",
            format!("policy chooses unknown upstream `{name}`"),
        )
        .at(script, span, "no upstream with this name");
        if let Some(s) = did_you_mean(&name, upstreams.keys().map(String::as_str)) {
            d = d.help(format!("did you mean `{s}`?"));
        }
        cx.push(d);
    }
    for f in ["regex_match", "regex_captures"] {
        for (pattern, span) in literal_args(source, f) {
            if let Err(e) = policy::check_regex(&pattern) {
                cx.push(
                    Diagnostic::error(
                        "invalid-regex",
                        format!(
                            "invalid regular expression: {}",
                            e.to_string()
                                .lines()
                                .last()
                                .unwrap_or("")
                                .trim_start_matches("error: ")
                        ),
                    )
                    .at(script, span, "does not compile"),
                );
            }
        }
    }
}

/// First arguments of `function("literal"...)` calls: the unescaped text and the span of the
/// literal. Literals with escapes other than `\\` and `\"` are skipped (checked at run time).
fn literal_args(source: &str, function: &str) -> Vec<(String, Range<usize>)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = source[from..].find(function) {
        let at = from + i;
        from = at + function.len();
        let before_ok = source[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let rest = source[from..].trim_start();
        let Some(rest) = rest.strip_prefix('(') else {
            continue;
        };
        let rest_trim = rest.trim_start();
        let Some(body) = rest_trim.strip_prefix('"') else {
            continue;
        };
        if !before_ok {
            continue;
        }
        let start = source.len() - rest_trim.len();
        let mut text = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        let mut plain = true;
        while let Some((j, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(j);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('\\' | '"'))) => text.push(e),
                    _ => plain = false,
                },
                c => text.push(c),
            }
        }
        if let (Some(j), true) = (end, plain) {
            out.push((text, start..start + j + 2));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_arguments_are_found_with_spans() {
        let src = r#"req.set_upstream( "orders-v2"); x.set_upstream(name); set_upstream("a\"b")"#;
        let found = literal_args(src, "set_upstream");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, "orders-v2");
        assert_eq!(&src[found[0].1.clone()], "\"orders-v2\"");
        assert_eq!(found[1].0, "a\"b");
    }
}
