//! An upstream's response as the pool hands it back: its head, in one of two shapes, and its
//! body.
//!
//! The client side speaks actix's header types (`http` 0.2), the upstream side `http` 1.x.
//! A head that is only relayed (no policy, plugin or header rule edits it, no protocol switch
//! or gRPC status is read from it) is parsed by [`super::h1`] straight into the client side's
//! types, so that each field is parsed and checked once and then moved, not converted. Every
//! other head, and every head from hyper (HTTP/2, upgrades, streamed request bodies), is an
//! `http` 1.x head, which is what policies and plugins edit.

use actix_http::header as ax;
use bytes::Bytes;

use super::body::UpstreamIncoming;

/// An upstream's response head.
pub enum UpstreamHead {
    /// `http` 1.x: from hyper, or parsed for a response something will edit.
    Http(http::response::Parts),
    /// Parsed from an HTTP/1.1 head for the client's response, in its types: the fields in
    /// the order they came (a list, not a map: they are only looked through and moved).
    Client {
        status: http::StatusCode,
        fields: Vec<(ax::HeaderName, ax::HeaderValue)>,
        /// What its `Content-Length` fields say, already checked by the parser (digits, and
        /// several only when they agree): the length is not parsed again.
        length: Option<u64>,
    },
}

/// Which shape [`super::h1`] parses a response head into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadShape {
    Http,
    Client,
}

impl UpstreamHead {
    pub fn status(&self) -> http::StatusCode {
        match self {
            UpstreamHead::Http(p) => p.status,
            UpstreamHead::Client { status, .. } => *status,
        }
    }

    /// The head as `http` 1.x parts (a copy of each field when it was in the client's types).
    /// A field `http` 1.x refuses is dropped; both check names and values the same way.
    pub fn into_http(self) -> http::response::Parts {
        match self {
            UpstreamHead::Http(p) => p,
            UpstreamHead::Client { status, fields, .. } => {
                let (mut parts, ()) = http::Response::new(()).into_parts();
                parts.status = status;
                parts.headers.reserve(fields.len());
                for (name, value) in fields {
                    let value = Bytes::copy_from_slice(value.as_bytes());
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(name.as_str().as_bytes()),
                        http::HeaderValue::from_maybe_shared(value),
                    ) {
                        parts.headers.append(n, v);
                    }
                }
                parts
            }
        }
    }
}

/// An upstream's response: its head and its body.
pub struct UpstreamResponse {
    pub head: UpstreamHead,
    pub body: UpstreamIncoming,
}

impl UpstreamResponse {
    pub fn status(&self) -> http::StatusCode {
        self.head.status()
    }
}

impl From<http::Response<UpstreamIncoming>> for UpstreamResponse {
    fn from(r: http::Response<UpstreamIncoming>) -> UpstreamResponse {
        let (parts, body) = r.into_parts();
        UpstreamResponse {
            head: UpstreamHead::Http(parts),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_head_turns_into_the_same_http_head() {
        let custom = ax::HeaderName::from_static("x-custom");
        let fields = vec![
            (ax::CONTENT_TYPE, ax::HeaderValue::from_static("text/plain")),
            (ax::SET_COOKIE, ax::HeaderValue::from_static("a=1")),
            (ax::SET_COOKIE, ax::HeaderValue::from_static("b=2")),
            (custom, ax::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()),
        ];
        let head = UpstreamHead::Client {
            status: http::StatusCode::IM_A_TEAPOT,
            fields,
            length: None,
        };
        assert_eq!(head.status(), 418);
        let parts = head.into_http();
        assert_eq!(parts.status, 418);
        assert_eq!(parts.headers.len(), 4);
        assert_eq!(parts.headers["content-type"], "text/plain");
        let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(parts.headers["x-custom"].as_bytes(), b"caf\xc3\xa9");
    }
}
