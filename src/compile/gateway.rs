//! `gateway.toml`: repo-wide defaults and client address rules.

use std::time::Duration;

use ipnet::IpNet;

use super::{Cx, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_BODY_SIZE, DEFAULT_TIMEOUT};
use crate::config::raw::{GatewayFile, RawEscapedSlashes};
use crate::config::{Diagnostic, FileId};
use crate::router::{EscapedSlashes, PathRules};
use crate::snapshot::ClientIpRules;

/// Values routes and upstreams inherit.
pub(crate) struct Defaults {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_size: u64,
    pub client_ip: ClientIpRules,
    /// The default policy (with its config), from the gateway file.
    pub policy: Option<DefaultPolicy>,
    /// `[paths]`: how request paths are normalised before routing.
    pub paths: PathRules,
}

/// `policy` / `policy_config` in gateway.toml.
pub(crate) struct DefaultPolicy {
    pub file: FileId,
    pub path: crate::config::Spanned<String>,
    pub config: Option<crate::config::Spanned<serde_json::Map<String, serde_json::Value>>>,
}

pub(crate) fn compile_defaults(
    cx: &mut Cx<'_>,
    gateway: Option<&(FileId, GatewayFile)>,
) -> Defaults {
    let mut out = Defaults {
        timeout: DEFAULT_TIMEOUT,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        max_body_size: DEFAULT_MAX_BODY_SIZE,
        client_ip: ClientIpRules::default(),
        policy: None,
        paths: PathRules::default(),
    };
    let Some((file, g)) = gateway else {
        return out;
    };
    out.policy = g.policy.as_ref().map(|p| DefaultPolicy {
        file: *file,
        path: p.clone(),
        config: g.policy_config.clone(),
    });
    if let Some(choice) = g.paths.escaped_slashes {
        out.paths.escaped_slashes = match choice {
            RawEscapedSlashes::Reject => EscapedSlashes::Reject,
            RawEscapedSlashes::Keep => EscapedSlashes::Keep,
            RawEscapedSlashes::Decode => EscapedSlashes::Decode,
        };
    }
    let file = *file;
    if let Some(d) = g
        .defaults
        .timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.timeout = d;
    }
    if let Some(d) = g
        .defaults
        .connect_timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.connect_timeout = d;
    }
    if let Some(n) = g
        .defaults
        .max_body_size
        .as_ref()
        .and_then(|v| cx.size(file, v))
    {
        out.max_body_size = n;
    }
    for entry in &g.client_ip.trusted_proxies {
        let text = entry.get().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out.client_ip.trusted_proxies.push(n.trunc()),
            Err(_) => cx.push(
                Diagnostic::error(
                    "invalid-value",
                    format!("`{text}` is not an IP address or CIDR range"),
                )
                .at(file, entry.span(), "not an address")
                .help("write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""),
            ),
        }
    }
    out
}
