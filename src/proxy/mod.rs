//! Forwarding to upstreams: the pooled hyper client, header rules and streaming bodies.
//!
//! Connection pools live outside any snapshot, per worker, keyed by target address: a config swap
//! that keeps a target keeps its warm connections.

pub mod body;
pub mod h1;
pub mod headers;
pub mod keepalive;
pub mod location;
pub mod pool;
pub mod response;
pub mod websocket;

use std::error::Error as _;
use std::time::Duration;

use body::BodyError;

impl From<crate::wire::connect::ConnectError> for ForwardError {
    fn from(e: crate::wire::connect::ConnectError) -> Self {
        use crate::wire::connect::ConnectError;
        match e {
            ConnectError::Refused(m) => ForwardError::Connect(m),
            ConnectError::Tls(m) => ForwardError::Tls(m),
            ConnectError::Timeout(t) => ForwardError::Timeout(t),
            ConnectError::Local(m) => ForwardError::Local(m),
        }
    }
}

/// Why forwarding failed, and so which status the client gets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// 502: the target refused or reset the connection.
    #[error("connecting to the upstream failed: {0}")]
    Connect(String),
    /// 502: the TLS handshake with the target failed (certificate not trusted, name mismatch,
    /// client certificate refused, protocol not agreed).
    #[error("the TLS handshake with the upstream failed: {0}")]
    Tls(String),
    /// 504: connecting or waiting for the response headers took too long.
    #[error("the upstream did not answer in {0:?}")]
    Timeout(Duration),
    /// 413: the client's body went over the route's limit while streaming.
    #[error("the request body is too large")]
    BodyTooLarge,
    /// 400: the client's body broke off or was malformed.
    #[error("{0}")]
    ClientBody(String),
    /// 502: the upstream broke the protocol or the connection.
    #[error("the upstream failed: {0}")]
    Upstream(String),
    /// 502: the upstream's response head is not one the gateway relays (a status over 599, a
    /// `Transfer-Encoding` other than `chunked`, conflicting framing, too large a head).
    #[error("the upstream sent an invalid response: {0}")]
    Invalid(String),
    /// 502: an HTTP/2 upstream reset this request's stream (RST_STREAM) and kept the
    /// connection: it answered, and turned this request down. Not the target's failure (a
    /// client can provoke one with a request the upstream refuses).
    #[error("the upstream reset the request's stream: {0}")]
    StreamReset(String),
    /// 502: an HTTP/2 upstream refused the stream unprocessed (`REFUSED_STREAM`, or a GOAWAY
    /// whose last stream is below it: RFC 9113 §8.7). Sent again like a request that never
    /// left, whatever its method, and not the target's failure (an upstream restarting
    /// gracefully refuses streams this way).
    #[error("the upstream refused the request unprocessed: {0}")]
    Refused(String),
    /// 503: the gateway could not open a connection for want of file descriptors, memory or
    /// local ports; not the target's failure.
    #[error("the gateway could not open a connection: {0}")]
    Local(String),
    /// 503: a circuit-breaker limit of the upstream is reached.
    #[error("the upstream's {} limit is reached", .0.as_str())]
    Overloaded(crate::upstream::state::Overflow),
}

impl ForwardError {
    pub fn status(&self) -> u16 {
        match self {
            ForwardError::Connect(_)
            | ForwardError::Tls(_)
            | ForwardError::Upstream(_)
            | ForwardError::Invalid(_)
            | ForwardError::StreamReset(_)
            | ForwardError::Refused(_) => 502,
            ForwardError::Timeout(_) => 504,
            ForwardError::BodyTooLarge => 413,
            ForwardError::ClientBody(_) => 400,
            ForwardError::Overloaded(_) | ForwardError::Local(_) => 503,
        }
    }

    /// A short kind for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Tls(_) => "tls",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::BodyTooLarge => "body_too_large",
            ForwardError::ClientBody(_) => "client_body",
            ForwardError::Upstream(_) => "upstream",
            ForwardError::Invalid(_) => "invalid_response",
            ForwardError::StreamReset(_) => "stream_reset",
            ForwardError::Refused(_) => "refused",
            ForwardError::Overloaded(_) => "overloaded",
            ForwardError::Local(_) => "local",
        }
    }
}

/// Maps a hyper error to what the client is told.
pub(crate) fn classify(e: &hyper::Error) -> ForwardError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge { .. } => ForwardError::BodyTooLarge,
                BodyError::Client(m) => ForwardError::ClientBody(m.clone()),
                BodyError::Idle(_) | BodyError::Stopped => ForwardError::ClientBody(b.to_string()),
            };
        }
        if let Some(h) = s.downcast_ref::<h2::Error>()
            && h.is_remote()
        {
            // A stream a graceful GOAWAY (NO_ERROR) left out was never processed: hyper fails
            // it with that GOAWAY, while the streams the upstream took go on. (After a GOAWAY
            // with an error code, streams it took may fail the same way: not resent.)
            let refused = (h.is_go_away() && h.reason() == Some(h2::Reason::NO_ERROR))
                || (h.is_reset() && h.reason() == Some(h2::Reason::REFUSED_STREAM));
            if refused {
                return ForwardError::Refused(chain(e));
            }
            if h.is_reset() {
                return ForwardError::StreamReset(chain(e));
            }
        }
        source = s.source();
    }
    ForwardError::Upstream(chain(e))
}

/// The error and its causes on one line, for logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
