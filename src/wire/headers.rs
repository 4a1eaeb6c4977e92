//! Header rules that do not depend on any configuration: which headers are hop-by-hop, and
//! which request ids a client may supply. See SECURITY.md, "Hop-by-hop and headers the gateway
//! owns".

use http::HeaderName;

/// Headers that describe one connection and never cross the proxy, in either direction.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// True for a hop-by-hop header name (lower-case, as `http` stores names).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_str(name.as_str())
}

pub fn is_hop_by_hop_str(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Accepts a client-supplied request id only if it is short and plain.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
