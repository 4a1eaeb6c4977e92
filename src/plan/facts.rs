//! What a compiled config means, route by route and upstream by upstream, and how two of them
//! differ. Values are display text, so the Markdown and the JSON say exactly the same thing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;

use crate::config::FileId;
use crate::config::raw::{HeaderRules, RawRoute, SecretRef, ValueSource};
use crate::snapshot::{RouteAction, Snapshot, TemplatePart, UpstreamHost};
use crate::upstream::{Balancer, Upstream};

/// A route as the gateway would serve it, in words a reviewer compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteFacts {
    pub name: String,
    /// `None`: any host.
    pub host: Option<String>,
    pub path: Option<String>,
    pub prefix: Option<String>,
    /// `None`: every method.
    pub methods: Option<Vec<String>>,
    pub upstream: Option<String>,
    pub respond_status: Option<u16>,
    pub respond_body: Option<String>,
    pub respond_headers: Vec<String>,
    pub rewrite: Option<String>,
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
    /// Effective response-header timeout (route, else upstream, else gateway default).
    pub timeout: String,
    /// Effective request body limit.
    pub max_body_size: String,
    /// The `Host` header sent upstream: `client Host`, `target host:port` or the `host_rewrite`.
    pub upstream_host: String,
    pub request_headers: Vec<String>,
    pub response_headers: Vec<String>,
    /// WASM plugins in the order they run: name, module sha256 (short), configuration.
    pub plugins: Vec<String>,
    /// `provider <name>`, `(optional)` when a request without a token is let through.
    pub auth: Option<String>,
    /// `<requests> per <duration>, burst <n>, by <key>`.
    pub rate_limit: Option<String>,
    /// Origins, methods, headers, credentials, as compiled.
    pub cors: Option<String>,
    /// The script's path and the SHA-256 of its content (an edited script is a change).
    pub policy: Option<String>,
    /// The route's retry settings over its upstream's.
    pub retries: Option<String>,
    pub websocket: bool,
    /// Upstream URLs in `Location` & co. are rewritten to the client's origin (the default).
    pub rewrite_location: bool,
    /// What the safety checks compare, beyond the text above.
    #[serde(skip)]
    pub(super) safety: super::safety::RouteSafety,
}

/// An upstream as compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamFacts {
    pub name: String,
    /// Target URL as written -> weight (a target listed twice gets the sum).
    pub targets: BTreeMap<String, u32>,
    pub balance: String,
    pub connect_timeout: String,
    pub timeout: Option<String>,
    /// Health checks, outlier detection, retries, circuit breaker and the other timeouts, as
    /// short text per setting (absent: not set).
    pub settings: BTreeMap<String, String>,
}

/// One field that differs; `None` means unset on that side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// Something present on both sides that differs.
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub name: String,
    pub changes: Vec<FieldChange>,
}

/// Added, removed and changed items of one kind, sorted by name.
#[derive(Debug, Clone, Serialize)]
pub struct Changes<T> {
    pub added: Vec<T>,
    pub removed: Vec<T>,
    pub changed: Vec<Changed>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        }
    }
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Diff {
    /// No route, upstream or gateway setting serves differently.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.upstreams.is_empty() && self.gateway.is_empty()
    }
}

/// The route-level difference between two compiled configs.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    /// Safety-relevant changes (also listed in their section below).
    pub safety: Vec<super::safety::SafetyFlag>,
    pub routes: Changes<RouteFacts>,
    pub upstreams: Changes<UpstreamFacts>,
    /// Repo-wide settings kept in the snapshot (trusted proxies).
    pub gateway: Vec<FieldChange>,
}

/// What the router folds away, and header rules with secrets by name, from the raw config.
#[derive(Debug, Clone, Default)]
pub(super) struct RawRouteFacts {
    host: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
    methods: Option<Vec<String>>,
    request_headers: Vec<String>,
    response_headers: Vec<String>,
}

pub(super) fn raw_route_facts(
    routes: &[(FileId, Vec<RawRoute>)],
) -> HashMap<String, RawRouteFacts> {
    let mut out = HashMap::new();
    for r in routes.iter().flat_map(|(_, file)| file) {
        let methods = r.methods.as_ref().map(|m| {
            let set: BTreeSet<String> = m.iter().map(|s| s.to_ascii_uppercase()).collect();
            let mut v: Vec<String> = set.into_iter().collect();
            v.sort_by_key(|m| crate::router::method_slot(m));
            v
        });
        let facts = RawRouteFacts {
            // Same normalisation as the compiler's, so `API.example.com` is not a change.
            host: r.host.as_ref().map(|h| h.trim().to_ascii_lowercase()),
            path: r.path.as_ref().map(|p| p.get().clone()),
            prefix: r.prefix.as_ref().map(|p| {
                let t = p.trim_end_matches('/');
                if t.is_empty() {
                    "/".to_owned()
                } else {
                    t.to_owned()
                }
            }),
            methods,
            request_headers: header_rules(r.request_headers.as_deref()),
            response_headers: header_rules(r.response_headers.as_deref()),
        };
        out.entry(r.name.get().clone()).or_insert(facts);
    }
    out
}

fn header_rules(rules: Option<&HeaderRules>) -> Vec<String> {
    let Some(rules) = rules else {
        return Vec::new();
    };
    let mut out: Vec<String> = rules
        .set
        .iter()
        .map(|(name, v)| {
            let value = match v.get() {
                ValueSource::Literal(s) => format!("{s:?}"),
                ValueSource::Secret(SecretRef::Env(var)) => format!("env {var}"),
                ValueSource::Secret(SecretRef::File(path)) => format!("file {path}"),
            };
            format!("set {} = {value}", name.to_ascii_lowercase())
        })
        .collect();
    let mut removed: Vec<String> = rules
        .remove
        .iter()
        .map(|n| format!("remove {}", n.to_ascii_lowercase()))
        .collect();
    out.sort();
    removed.sort();
    out.extend(removed);
    out
}

/// `root`: the exported config directory the snapshot was compiled from (policy scripts are
/// hashed from there).
pub(super) fn route_facts(
    snap: &Snapshot,
    raw: &HashMap<String, RawRouteFacts>,
    root: &std::path::Path,
) -> BTreeMap<String, RouteFacts> {
    let mut out = BTreeMap::new();
    for r in &snap.routes {
        let raw = raw.get(&r.name).cloned().unwrap_or_default();
        let safety = super::safety::RouteSafety {
            auth_required: r.auth.as_ref().is_some_and(|a| !a.optional),
            rate: r
                .rate_limit
                .as_ref()
                .map(|l| (l.requests, l.per.as_millis())),
            cors_any_origin: r.cors.as_ref().is_some_and(|c| c.origins.any),
        };
        let mut f = RouteFacts {
            name: r.name.clone(),
            host: raw.host,
            path: raw.path,
            prefix: raw.prefix,
            methods: raw.methods,
            upstream: None,
            respond_status: None,
            respond_body: None,
            respond_headers: Vec::new(),
            rewrite: None,
            strip_prefix: None,
            add_prefix: None,
            timeout: duration(r.timeout),
            max_body_size: size(r.max_body_size),
            upstream_host: match &r.upstream_host {
                UpstreamHost::Preserve => "client Host".to_owned(),
                UpstreamHost::Target => "target host:port".to_owned(),
                UpstreamHost::Fixed(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            },
            request_headers: raw.request_headers,
            response_headers: raw.response_headers,
            plugins: r
                .plugins
                .iter()
                .map(|u| {
                    let p = &u.plugin;
                    let mut s = format!("{} (sha256 {})", p.name, p.sha256.get(..12).unwrap_or(""));
                    if !u.config.is_empty() {
                        s.push_str(&format!(" config {}", String::from_utf8_lossy(&u.config)));
                    }
                    s
                })
                .collect(),
            auth: r.auth.as_ref().map(|a| {
                format!(
                    "provider {}{}",
                    a.provider.name,
                    if a.optional { " (optional)" } else { "" }
                )
            }),
            rate_limit: r.rate_limit.as_ref().map(rate_limit),
            cors: r.cors.as_deref().map(cors),
            policy: r.policy.as_ref().map(|p| {
                use sha2::Digest;
                let path: &str = &p.policy.path;
                match std::fs::read(root.join(path)) {
                    Ok(text) => format!(
                        "{path} (sha256 {})",
                        &hex::encode(sha2::Sha256::digest(&text))[..12]
                    ),
                    Err(_) => path.to_owned(),
                }
            }),
            retries: r.retry.as_ref().map(retry_override),
            websocket: r.websocket,
            rewrite_location: r.rewrite_location,
            safety,
        };
        match &r.action {
            RouteAction::Proxy { upstream, rewrite } => {
                f.upstream = Some(upstream.name.clone());
                f.rewrite = rewrite.template.as_ref().map(|parts| {
                    parts
                        .iter()
                        .map(|p| match p {
                            TemplatePart::Literal(s) => s.clone(),
                            TemplatePart::Param(n) => format!("{{{n}}}"),
                        })
                        .collect()
                });
                f.strip_prefix = rewrite.strip_prefix.clone();
                f.add_prefix = rewrite.add_prefix.clone();
            }
            RouteAction::Respond(resp) => {
                f.respond_status = Some(resp.status);
                f.respond_body = Some(String::from_utf8_lossy(&resp.body).into_owned());
                let mut headers: Vec<String> = resp
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
                    .collect();
                headers.sort();
                f.respond_headers = headers;
            }
        }
        out.insert(r.name.clone(), f);
    }
    out
}

impl RouteFacts {
    /// Every compared field as display text, in the order a reviewer reads a route.
    pub(super) fn fields(&self) -> Vec<(&'static str, Option<String>)> {
        let list = |v: &[String]| (!v.is_empty()).then(|| v.join("; "));
        vec![
            (
                "host",
                Some(self.host.clone().unwrap_or_else(|| "any".into())),
            ),
            ("path", self.path.clone()),
            ("prefix", self.prefix.clone()),
            (
                "methods",
                Some(
                    self.methods
                        .as_ref()
                        .map(|m| m.join(" "))
                        .unwrap_or_else(|| "any".into()),
                ),
            ),
            ("upstream", self.upstream.clone()),
            ("respond.status", self.respond_status.map(|s| s.to_string())),
            ("respond.body", self.respond_body.as_deref().map(shorten)),
            ("respond.headers", list(&self.respond_headers)),
            ("rewrite", self.rewrite.clone()),
            ("strip_prefix", self.strip_prefix.clone()),
            ("add_prefix", self.add_prefix.clone()),
            ("timeout", Some(self.timeout.clone())),
            ("max_body_size", Some(self.max_body_size.clone())),
            ("upstream_host", Some(self.upstream_host.clone())),
            ("request_headers", list(&self.request_headers)),
            ("response_headers", list(&self.response_headers)),
            ("plugins", list(&self.plugins)),
            ("auth", self.auth.clone()),
            ("rate_limit", self.rate_limit.clone()),
            ("cors", self.cors.clone()),
            ("policy", self.policy.clone()),
            ("retries", self.retries.clone()),
            ("websocket", self.websocket.then(|| "on".to_owned())),
            (
                "rewrite_location",
                (!self.rewrite_location).then(|| "off".to_owned()),
            ),
        ]
    }
}

fn retry_override(o: &crate::upstream::RetryOverride) -> String {
    let mut parts = Vec::new();
    if let Some(n) = o.attempts {
        parts.push(format!("attempts {n}"));
    }
    if let Some((connect, timeout, reset, statuses)) = o.conditions {
        let mut on: Vec<String> = [
            (connect, "connect_failure"),
            (timeout, "timeout"),
            (reset, "reset"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, n)| (*n).to_owned())
        .collect();
        on.extend(
            (500u16..600)
                .filter(|s| statuses & (1u128 << (s - 500)) != 0)
                .map(|s| s.to_string()),
        );
        parts.push(format!("on [{}]", on.join(", ")));
    }
    if let Some(b) = o.backoff {
        parts.push(format!("backoff {}", duration(b)));
    }
    if let Some(b) = o.max_backoff {
        parts.push(format!("max_backoff {}", duration(b)));
    }
    if let Some(n) = o.non_idempotent {
        parts.push(format!("non_idempotent {n}"));
    }
    if let Some(n) = o.replay_body_limit {
        parts.push(format!("replay_body_limit {}", size(n)));
    }
    parts.join(", ")
}

pub(crate) fn rate_limit(l: &crate::filters::rate_limit::LimitSpec) -> String {
    use crate::filters::rate_limit::LimitKey;
    let key = match &l.key {
        LimitKey::ClientIp => "client_ip".to_owned(),
        LimitKey::Header(h) => format!("header:{h}"),
        LimitKey::Route => "route".to_owned(),
        LimitKey::Claim(c) => format!("claim:{c}"),
    };
    let store = if l.shared.is_some() {
        ", shared (redis)"
    } else {
        ""
    };
    format!(
        "{} per {}, burst {}, by {key}{store}",
        l.requests,
        duration(l.per),
        l.burst
    )
}

pub(crate) fn cors(c: &crate::filters::cors::CorsPolicy) -> String {
    let origins = if c.origins.any {
        "*".to_owned()
    } else {
        let mut o: Vec<String> = c.origins.exact.iter().cloned().collect();
        o.extend(
            c.origins
                .suffixes
                .iter()
                .map(|(scheme, suffix)| format!("{scheme}://*{suffix}")),
        );
        o.sort();
        o.join(" ")
    };
    let mut methods = c.methods.clone();
    methods.sort();
    let headers = match &c.headers {
        None => "any".to_owned(),
        Some(h) => {
            let mut h = h.clone();
            h.sort();
            h.join(" ")
        }
    };
    let show = |v: &Option<http::HeaderValue>| {
        v.as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "origins {origins}; methods {}; headers {headers}; credentials {}; expose {}; max_age {}",
        methods.join(" "),
        c.credentials,
        show(&c.expose),
        show(&c.max_age)
    )
}

pub(super) fn upstream_facts(snap: &Snapshot) -> BTreeMap<String, UpstreamFacts> {
    snap.upstreams
        .iter()
        .map(|u| (u.name.clone(), one_upstream(u)))
        .collect()
}

pub(crate) fn one_upstream(u: &Upstream) -> UpstreamFacts {
    let mut targets = BTreeMap::new();
    for t in &u.targets {
        *targets.entry(t.url.clone()).or_insert(0) += t.weight;
    }
    UpstreamFacts {
        name: u.name.clone(),
        targets,
        balance: match &u.balancer {
            Balancer::RoundRobin(_) => "round_robin".to_owned(),
            Balancer::LeastConnections { .. } => "least_connections".to_owned(),
            Balancer::RandomTwoChoices { .. } => "random_two_choices".to_owned(),
            Balancer::ConsistentHash { key, .. } => format!("consistent_hash on {}", hash_key(key)),
        },
        connect_timeout: duration(u.connect_timeout),
        timeout: u.timeout.map(duration),
        settings: upstream_settings(u),
    }
}

fn upstream_settings(u: &Upstream) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        out.insert(k.to_owned(), v);
    };
    if let Some(t) = u.total_timeout {
        put("total_timeout", duration(t));
    }
    put("idle_timeout", duration(u.idle_timeout));
    put("fail_open", u.fail_open.to_string());
    if let Some(h) = &u.health {
        put(
            "health",
            format!(
                "GET {} every {}, timeout {}, out after {}, back after {}",
                h.path,
                duration(h.interval),
                duration(h.timeout),
                h.unhealthy_after,
                h.healthy_after
            ),
        );
    }
    let o = &u.outlier;
    put(
        "outlier",
        format!(
            "eject after {} failures / {} 5xx (0 = off) for {}..{}, at most {}%",
            o.consecutive_failures,
            o.consecutive_5xx,
            duration(o.base_ejection),
            duration(o.max_ejection),
            o.max_ejected_percent
        ),
    );
    let r = &u.retry;
    let mut on = Vec::new();
    if r.on_connect_failure {
        on.push("connect_failure".to_owned());
    }
    if r.on_timeout {
        on.push("timeout".to_owned());
    }
    if r.on_reset {
        on.push("reset".to_owned());
    }
    on.extend(
        (500u16..600)
            .filter(|s| r.statuses & (1u128 << (s - 500)) != 0)
            .map(|s| s.to_string()),
    );
    put(
        "retries",
        format!(
            "{} on [{}], backoff {}..{}, budget {}% + {}/s{}",
            r.attempts,
            on.join(", "),
            duration(r.backoff),
            duration(r.max_backoff),
            u.budget.percent,
            u.budget.min_per_second,
            if r.non_idempotent {
                ", non-idempotent too"
            } else {
                ""
            }
        ),
    );
    if u.limits != crate::upstream::Limits::default() {
        let lim = |v: Option<u32>| v.map_or("none".to_owned(), |n| n.to_string());
        put(
            "circuit_breaker",
            format!(
                "max_requests {}, max_pending {}",
                lim(u.limits.max_requests),
                lim(u.limits.max_pending)
            ),
        );
    }
    out
}

fn hash_key(k: &crate::upstream::HashKey) -> String {
    use crate::upstream::HashKey;
    match k {
        HashKey::ClientIp => "client_ip".to_owned(),
        HashKey::Path => "path".to_owned(),
        HashKey::Header(h) => format!("header:{h}"),
        HashKey::Cookie(c) => format!("cookie:{c}"),
    }
}

pub(super) fn diff_upstream(old: &UpstreamFacts, new: &UpstreamFacts) -> Vec<FieldChange> {
    let mut out = Vec::new();
    let urls: BTreeSet<&String> = old.targets.keys().chain(new.targets.keys()).collect();
    for url in urls {
        let (o, n) = (old.targets.get(url), new.targets.get(url));
        let change = match (o, n) {
            (Some(o), Some(n)) if o != n => Some((
                format!("target {url} weight"),
                Some(o.to_string()),
                Some(n.to_string()),
            )),
            (None, Some(n)) => Some((
                "target".to_owned(),
                None,
                Some(format!("{url} (weight {n})")),
            )),
            (Some(o), None) => Some((
                "target".to_owned(),
                Some(format!("{url} (weight {o})")),
                None,
            )),
            _ => None,
        };
        if let Some((field, old, new)) = change {
            out.push(FieldChange { field, old, new });
        }
    }
    out.extend(field_changes(
        &[
            ("balance", Some(old.balance.clone())),
            ("connect_timeout", Some(old.connect_timeout.clone())),
            ("timeout", old.timeout.clone()),
        ],
        &[
            ("balance", Some(new.balance.clone())),
            ("connect_timeout", Some(new.connect_timeout.clone())),
            ("timeout", new.timeout.clone()),
        ],
    ));
    let keys: BTreeSet<&String> = old.settings.keys().chain(new.settings.keys()).collect();
    for k in keys {
        let (o, n) = (old.settings.get(k), new.settings.get(k));
        if o != n {
            out.push(FieldChange {
                field: k.clone(),
                old: o.cloned(),
                new: n.cloned(),
            });
        }
    }
    out
}

pub(super) fn gateway_fields(snap: &Snapshot) -> Vec<(&'static str, Option<String>)> {
    let proxies: Vec<String> = snap
        .client_ip
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    vec![(
        "trusted_proxies",
        (!proxies.is_empty()).then(|| proxies.join(", ")),
    )]
}

/// Fields whose text differs. Both lists come from the same function, so they line up; a field
/// missing on one side (an empty base) counts as unset.
pub(super) fn field_changes(
    old: &[(&'static str, Option<String>)],
    new: &[(&'static str, Option<String>)],
) -> Vec<FieldChange> {
    new.iter()
        .filter_map(|(field, n)| {
            let o = old
                .iter()
                .find(|(f, _)| f == field)
                .and_then(|(_, v)| v.clone());
            (o != *n).then(|| FieldChange {
                field: (*field).to_owned(),
                old: o,
                new: n.clone(),
            })
        })
        .collect()
}

pub(super) fn diff_by_name<T: Clone>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    compare: impl Fn(&T, &T) -> Vec<FieldChange>,
) -> Changes<T> {
    let mut out = Changes::default();
    for (name, n) in new {
        match old.get(name) {
            None => out.added.push(n.clone()),
            Some(o) => {
                let changes = compare(o, n);
                if !changes.is_empty() {
                    out.changed.push(Changed {
                        name: name.clone(),
                        changes,
                    });
                }
            }
        }
    }
    out.removed = old
        .iter()
        .filter(|(name, _)| !new.contains_key(*name))
        .map(|(_, o)| o.clone())
        .collect();
    out
}

/// A body quoted, cut to a length that fits a comment line.
fn shorten(body: &str) -> String {
    const MAX: usize = 80;
    if body.chars().count() <= MAX {
        return format!("{body:?}");
    }
    let cut: String = body.chars().take(MAX).collect();
    format!("{cut:?}…")
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", n / unit))
        .unwrap_or_else(|| format!("{n}B"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_config() {
        assert_eq!(size(10 * 1024 * 1024), "10MiB");
        assert_eq!(size(1536), "1536B");
        assert_eq!(size(2048), "2KiB");
    }

    #[test]
    fn target_weights_are_compared_by_url() {
        let up = |targets: &[(&str, u32)]| UpstreamFacts {
            name: "orders".into(),
            targets: targets.iter().map(|(u, w)| ((*u).to_owned(), *w)).collect(),
            balance: "round_robin".into(),
            connect_timeout: "5s".into(),
            timeout: None,
            settings: BTreeMap::new(),
        };
        let changes = diff_upstream(
            &up(&[("http://a", 1), ("http://b", 1)]),
            &up(&[("http://a", 3), ("http://c", 1)]),
        );
        let fields: Vec<_> = changes
            .iter()
            .map(|c| (c.field.as_str(), c.old.as_deref(), c.new.as_deref()))
            .collect();
        assert_eq!(
            fields,
            vec![
                ("target http://a weight", Some("1"), Some("3")),
                ("target", Some("http://b (weight 1)"), None),
                ("target", None, Some("http://c (weight 1)")),
            ]
        );
    }
}
