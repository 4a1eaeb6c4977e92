//! What both the proxy and the rest of the gateway need to speak HTTP, below either of them:
//! the hop-by-hop header rules, the connection to a target (TCP, TLS, ALPN), and a response the
//! gateway answers itself.
//!
//! This module imports nothing from the rest of the crate. The policy engine, the snapshot, the
//! proxy and the health checks all build on it, so none of them has to import another to share
//! a rule or a socket.

pub mod chunked;
pub mod connect;
pub mod headers;
pub mod tls;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// The HTTP version spoken to a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    Http1,
    /// h2c with prior knowledge on `http://`, ALPN `h2` on `https://`.
    Http2,
}

/// A response answered by the gateway itself: a route's `respond`, or a policy's.
#[derive(Debug, Clone)]
pub struct StaticResponse {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}
