//! The changes a reviewer must not miss: a route that loses its auth or its rate limit, a rate
//! limit raised more than tenfold, CORS opened to any origin, traffic to a new upstream host.
//! `plan` lists them first.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::facts::{RouteFacts, UpstreamFacts};

/// A route's safety-relevant settings, as numbers and flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RouteSafety {
    /// A token is required (auth set and not optional).
    pub(super) auth_required: bool,
    /// Requests and period in milliseconds.
    pub(super) rate: Option<(u32, u128)>,
    pub(super) cors_any_origin: bool,
}

/// A change a reviewer must not miss, listed before everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SafetyFlag {
    /// `auth-removed`, `rate-limit-removed`, `rate-limit-raised`, `cors-any-origin`,
    /// `new-upstream-host`.
    pub kind: &'static str,
    /// The route or upstream it concerns.
    pub name: String,
    pub message: String,
}

/// The safety-relevant changes between two configs: routes that lose their auth or rate
/// limit, rate limits raised more than tenfold, CORS opened to any origin, and upstream hosts
/// the base never sent traffic to.
pub(super) fn safety_flags(
    old_routes: &BTreeMap<String, RouteFacts>,
    new_routes: &BTreeMap<String, RouteFacts>,
    old_upstreams: &BTreeMap<String, UpstreamFacts>,
    new_upstreams: &BTreeMap<String, UpstreamFacts>,
) -> Vec<SafetyFlag> {
    let mut out = Vec::new();
    let mut flag = |kind, name: &str, message: String| {
        out.push(SafetyFlag {
            kind,
            name: name.to_owned(),
            message,
        })
    };
    for (name, new) in new_routes {
        let Some(old) = old_routes.get(name) else {
            continue;
        };
        let (o, n) = (&old.safety, &new.safety);
        if o.auth_required && !n.auth_required {
            let now = match &new.auth {
                Some(a) => format!("now {a}"),
                None => "no auth any more".to_owned(),
            };
            flag(
                "auth-removed",
                name,
                format!("route `{name}` no longer requires a token ({now})"),
            );
        }
        match (o.rate, n.rate) {
            (Some(_), None) => flag(
                "rate-limit-removed",
                name,
                format!("route `{name}` loses its rate limit"),
            ),
            // new/new_per > 10 * old/old_per, in integers.
            (Some((or, op)), Some((nr, np))) if u128::from(nr) * op > 10 * u128::from(or) * np => {
                flag(
                    "rate-limit-raised",
                    name,
                    format!(
                        "route `{name}`'s rate limit is raised more than tenfold: {} → {}",
                        old.rate_limit.as_deref().unwrap_or(""),
                        new.rate_limit.as_deref().unwrap_or("")
                    ),
                )
            }
            _ => {}
        }
        if n.cors_any_origin && !o.cors_any_origin {
            flag(
                "cors-any-origin",
                name,
                format!("route `{name}` now allows cross-origin requests from any origin (`*`)"),
            );
        }
    }
    let hosts = |ups: &BTreeMap<String, UpstreamFacts>| -> BTreeSet<String> {
        ups.values()
            .flat_map(|u| u.targets.keys())
            .filter_map(|url| target_host(url))
            .collect()
    };
    let known = hosts(old_upstreams);
    for (name, up) in new_upstreams {
        let mut new_hosts: Vec<String> = up
            .targets
            .keys()
            .filter_map(|url| target_host(url))
            .filter(|h| !known.contains(h))
            .collect();
        new_hosts.dedup();
        for host in new_hosts {
            flag(
                "new-upstream-host",
                name,
                format!("upstream `{name}` sends traffic to a new host `{host}`"),
            );
        }
    }
    out
}

/// The host of a target URL, lower-cased, without its port.
fn target_host(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(uri.host()?.to_ascii_lowercase())
}
