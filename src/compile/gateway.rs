//! `gateway.toml`: repo-wide defaults and client address rules.

use std::time::Duration;

use ipnet::IpNet;

use super::{
    Cx, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_BODY_SIZE, DEFAULT_READ_TIMEOUT, DEFAULT_TIMEOUT,
    DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
};
use crate::config::Spanned;
use crate::config::raw::{GatewayFile, RawEscapedSlashes, SizeText};
use crate::config::{Diagnostic, FileId};
use crate::router::{EscapedSlashes, PathRules};
use crate::snapshot::{ClientIpRules, Limits};

/// Values routes and upstreams inherit.
pub(crate) struct Defaults {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_size: u64,
    pub read_timeout: Duration,
    /// `websocket`: whether routes proxy WebSocket upgrades unless they say otherwise.
    pub websocket: bool,
    pub websocket_idle_timeout: Duration,
    pub client_ip: ClientIpRules,
    pub limits: Limits,
    /// The default policy (with its config), from the gateway file.
    pub policy: Option<DefaultPolicy>,
    /// `[headers] allow_underscores`.
    pub allow_underscores: bool,
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
        read_timeout: DEFAULT_READ_TIMEOUT,
        websocket: true,
        websocket_idle_timeout: DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
        client_ip: ClientIpRules::default(),
        limits: Limits::default(),
        policy: None,
        allow_underscores: false,
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
    out.allow_underscores = g.headers.allow_underscores;
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
    if let Some(d) = g
        .defaults
        .read_timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.read_timeout = d;
    }
    out.websocket = g.defaults.websocket.unwrap_or(true);
    if let Some(d) = g
        .defaults
        .websocket_idle_timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.websocket_idle_timeout = d;
    }
    out.limits = limits(cx, file, &g.limits);
    for entry in &g.client_ip.trusted_proxies {
        let text = entry.get().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out
                .client_ip
                .trusted_proxies
                .push(as_peers_are_matched(n.trunc())),
            Err(_) => cx.push(
                Diagnostic::error(
                    "invalid-value",
                    format!("`{text}` is not an IP address or CIDR range"),
                )
                .at(file, entry.span(), "not an address")
                .help("write e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"fd00::/8\""),
            ),
        }
    }
    out
}

/// `net` in the form peers are matched against: an IPv4-mapped range (`::ffff:10.0.0.1`,
/// `::ffff:10.0.0.0/104`, what `ss` shows for IPv4 peers of a dual-stack `[::]` listener) as
/// its IPv4 range, since a mapped peer is matched as its IPv4 address (`canonical_ip`); kept
/// as written, it could never match anything.
fn as_peers_are_matched(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        other => other,
    }
}

/// `[limits]`: unset fields keep their defaults; zero counts are errors (they would refuse
/// every connection).
fn limits(cx: &mut Cx<'_>, file: FileId, raw: &crate::config::raw::RawLimits) -> Limits {
    let mut out = Limits::default();
    if let Some(d) = raw
        .header_timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.header_timeout = d;
    }
    if let Some(d) = raw
        .body_idle_timeout
        .as_ref()
        .and_then(|v| cx.duration(file, v))
    {
        out.body_idle_timeout = d;
    }
    if let Some(v) = &raw.send_timeout
        && let Some(d) = cx.duration(file, v)
    {
        if d < Duration::from_secs(1) {
            cx.push(
                Diagnostic::error("invalid-duration", "`send_timeout` must be at least 1s")
                    .at(file, v.span(), "too short")
                    .help("a client on a slow link takes longer than this to drain a full buffer"),
            );
        } else {
            out.send_timeout = d;
        }
    }
    for (v, what) in [
        (&raw.max_connections, "max_connections"),
        (&raw.max_connections_per_ip, "max_connections_per_ip"),
        (
            &raw.http2_max_concurrent_streams,
            "http2_max_concurrent_streams",
        ),
        (
            &raw.http2_max_resets_per_second,
            "http2_max_resets_per_second",
        ),
    ] {
        let Some(v) = v else { continue };
        let n = *v.get();
        if n == 0 {
            let why = if what.starts_with("http2") {
                "would refuse every HTTP/2 request"
            } else {
                "would refuse every connection"
            };
            cx.push(
                Diagnostic::error("invalid-limit", format!("`{what}` must be at least 1")).at(
                    file,
                    v.span(),
                    why,
                ),
            );
            continue;
        }
        match what {
            "max_connections" => out.max_connections = n as usize,
            "max_connections_per_ip" => out.max_connections_per_ip = Some(n),
            "http2_max_concurrent_streams" => out.http2_max_concurrent_streams = n,
            _ => out.http2_max_resets_per_second = n,
        }
    }
    // 0 is allowed: every request body of an HTTP/2 client is then read whole first.
    if let Some(v) = &raw.http2_max_streaming_uploads {
        out.http2_max_streaming_uploads = *v.get();
    }
    if let Some(v) = &raw.http2_max_header_list_size
        && let Some(n) = cx.size(file, v)
    {
        // Below 1 KiB not even a browser's request fits; above 16 MiB it is no limit.
        if !(1024..=16 * 1024 * 1024).contains(&n) {
            cx.push(
                Diagnostic::error(
                    "invalid-limit",
                    "`http2_max_header_list_size` must be between 1KiB and 16MiB",
                )
                .at(file, v.span(), "out of range"),
            );
        } else {
            out.http2_max_header_list_size = n as u32;
        }
    }
    h2_windows(cx, file, raw, &mut out);
    if let Some(n) = raw
        .max_buffered_bodies
        .as_ref()
        .and_then(|v| cx.size(file, v))
    {
        out.max_buffered_bodies = n;
    }
    out
}

/// The largest HTTP/2 flow-control window accepted for a stream or a connection: far above
/// any link's bandwidth-delay product, and a bound on what one connection holds unread.
const MAX_H2_WINDOW: u64 = 1 << 30;

/// `http2_stream_window` and `http2_connection_window`: each between 64 KiB (HTTP/2's own
/// initial window) and 1 GiB, the connection's at least one stream's.
fn h2_windows(
    cx: &mut Cx<'_>,
    file: FileId,
    raw: &crate::config::raw::RawLimits,
    out: &mut Limits,
) {
    let stream = h2_window(
        cx,
        file,
        raw.http2_stream_window.as_ref(),
        "http2_stream_window",
    );
    let conn = h2_window(
        cx,
        file,
        raw.http2_connection_window.as_ref(),
        "http2_connection_window",
    );
    if let Some((n, _)) = stream {
        out.http2_stream_window = n;
    }
    if let Some((n, _)) = conn {
        out.http2_connection_window = n;
    }
    if out.http2_connection_window < out.http2_stream_window {
        let at = conn.or(stream).map(|(_, span)| span);
        if let Some(span) = at {
            cx.push(
                Diagnostic::error(
                    "invalid-limit",
                    format!(
                        "`http2_connection_window` ({}) is smaller than `http2_stream_window` ({})",
                        out.http2_connection_window, out.http2_stream_window
                    ),
                )
                .at(file, span, "no stream could use its whole window")
                .help("raise `http2_connection_window` to at least `http2_stream_window`"),
            );
        }
        out.http2_connection_window = out.http2_stream_window;
    }
}

/// One window's value and where it was written, or `None` (unset, or reported).
fn h2_window(
    cx: &mut Cx<'_>,
    file: FileId,
    v: Option<&Spanned<SizeText>>,
    what: &str,
) -> Option<(u32, std::ops::Range<usize>)> {
    let v = v?;
    let n = cx.size(file, v)?;
    if !(64 * 1024..=MAX_H2_WINDOW).contains(&n) {
        cx.push(
            Diagnostic::error(
                "invalid-limit",
                format!("`{what}` must be between 64KiB and 1GiB"),
            )
            .at(file, v.span(), "out of range")
            .help("the window is what one HTTP/2 client may send ahead of the gateway's reads"),
        );
        return None;
    }
    Some((n as u32, v.span()))
}
