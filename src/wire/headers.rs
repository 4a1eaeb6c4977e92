//! Header rules that do not depend on any configuration: which headers are hop-by-hop, and
//! which request ids a client may supply. See SECURITY.md, "Hop-by-hop and headers the gateway
//! owns".

use http::{HeaderName, HeaderValue};

/// Headers that describe one connection and never cross the proxy, in either direction.
/// `Proxy-Authenticate` and `Proxy-Authorization` are between a client and the proxy it chose
/// (RFC 9110 §11.7): the gateway is the origin to its clients and the client of its upstreams,
/// so neither is relayed (as Go's `httputil.ReverseProxy` and RFC 2616 §13.5.1's list).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// True for a hop-by-hop header name (lower-case, as `http` stores names).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_str(name.as_str())
}

pub fn is_hop_by_hop_str(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Headers that only the gateway sets or removes: framing, hop-by-hop, the host, the
/// forwarding headers it writes for the upstream and the request id. The one list policies
/// (`policy::api`) and plugins (`plugins::host`) are refused (lower-case names).
pub fn is_gateway_owned_str(name: &str) -> bool {
    is_hop_by_hop_str(name) || GATEWAY_OWNED.contains(&name)
}

/// The headers [`is_gateway_owned_str`] names besides the hop-by-hop ones.
pub const GATEWAY_OWNED: [&str; 8] = [
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "x-request-id",
];

/// Accepts a client-supplied request id only if it is short and plain.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Where request header fields are built: an `http` 1.x map, or a [`HeaderList`].
pub trait HeaderSink {
    fn append(&mut self, name: HeaderName, value: HeaderValue);
    /// Removes every field named `name`.
    fn remove(&mut self, name: &HeaderName);
    /// Replaces every field named `name` with this one.
    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        self.remove(&name);
        self.append(name, value);
    }
    /// The values of the fields named `name`, in order.
    fn values(&self, name: &HeaderName) -> Vec<HeaderValue>;
}

impl HeaderSink for http::HeaderMap {
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        http::HeaderMap::append(self, name, value);
    }

    fn remove(&mut self, name: &HeaderName) {
        http::HeaderMap::remove(self, name);
    }

    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        http::HeaderMap::insert(self, name, value);
    }

    fn values(&self, name: &HeaderName) -> Vec<HeaderValue> {
        self.get_all(name).iter().cloned().collect()
    }
}

/// Header fields in the order they were added: for a request head written out as it is (a
/// list of a dozen fields is cheaper to build, look through and write than a hash map).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList(Vec<(HeaderName, HeaderValue)>);

impl HeaderList {
    pub fn with_capacity(n: usize) -> HeaderList {
        HeaderList(Vec::with_capacity(n))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same fields in an `http` 1.x map.
    pub fn to_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::with_capacity(self.0.len());
        self.append_to(&mut map);
        map
    }

    /// Appends a copy of each field to `map`.
    pub fn append_to(&self, map: &mut http::HeaderMap) {
        map.reserve(self.0.len());
        for (n, v) in &self.0 {
            map.append(n.clone(), v.clone());
        }
    }
}

impl HeaderSink for HeaderList {
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.0.push((name, value));
    }

    fn remove(&mut self, name: &HeaderName) {
        self.0.retain(|(n, _)| n != name);
    }

    fn values(&self, name: &HeaderName) -> Vec<HeaderValue> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Declares the common standard header names once, for the lookups below.
macro_rules! common_names {
    ($($konst:ident = $text:literal),* $(,)?) => {
        /// The `http` name for a lower-case header name: a constant for the common standard
        /// names (no parsing, no allocation), parsed otherwise. `None` when it is not a valid
        /// header name.
        pub fn header_name(name: &str) -> Option<HeaderName> {
            match name {
                $($text => Some(http::header::$konst),)*
                _ => HeaderName::from_bytes(name.as_bytes()).ok(),
            }
        }

        /// The same name in actix's `http` 0.2 types: a constant for the common standard names,
        /// parsed otherwise.
        pub fn actix_name(name: &HeaderName) -> Option<actix_http::header::HeaderName> {
            $(if *name == http::header::$konst {
                return Some(actix_http::header::$konst);
            })*
            actix_http::header::HeaderName::from_bytes(name.as_str().as_bytes()).ok()
        }

        #[cfg(test)]
        const COMMON_NAMES: &[&str] = &[$($text),*];
    };
}

common_names! {
    ACCEPT = "accept",
    ACCEPT_ENCODING = "accept-encoding",
    ACCEPT_LANGUAGE = "accept-language",
    ACCEPT_RANGES = "accept-ranges",
    ACCESS_CONTROL_ALLOW_CREDENTIALS = "access-control-allow-credentials",
    ACCESS_CONTROL_ALLOW_HEADERS = "access-control-allow-headers",
    ACCESS_CONTROL_ALLOW_METHODS = "access-control-allow-methods",
    ACCESS_CONTROL_ALLOW_ORIGIN = "access-control-allow-origin",
    ACCESS_CONTROL_EXPOSE_HEADERS = "access-control-expose-headers",
    ACCESS_CONTROL_MAX_AGE = "access-control-max-age",
    AGE = "age",
    AUTHORIZATION = "authorization",
    CACHE_CONTROL = "cache-control",
    CONNECTION = "connection",
    CONTENT_DISPOSITION = "content-disposition",
    CONTENT_ENCODING = "content-encoding",
    CONTENT_LANGUAGE = "content-language",
    CONTENT_LENGTH = "content-length",
    CONTENT_LOCATION = "content-location",
    CONTENT_RANGE = "content-range",
    CONTENT_SECURITY_POLICY = "content-security-policy",
    CONTENT_TYPE = "content-type",
    COOKIE = "cookie",
    DATE = "date",
    ETAG = "etag",
    EXPECT = "expect",
    EXPIRES = "expires",
    FORWARDED = "forwarded",
    HOST = "host",
    IF_MATCH = "if-match",
    IF_MODIFIED_SINCE = "if-modified-since",
    IF_NONE_MATCH = "if-none-match",
    IF_RANGE = "if-range",
    IF_UNMODIFIED_SINCE = "if-unmodified-since",
    LAST_MODIFIED = "last-modified",
    LINK = "link",
    LOCATION = "location",
    ORIGIN = "origin",
    PRAGMA = "pragma",
    PROXY_AUTHORIZATION = "proxy-authorization",
    RANGE = "range",
    REFERER = "referer",
    RETRY_AFTER = "retry-after",
    SERVER = "server",
    SET_COOKIE = "set-cookie",
    STRICT_TRANSPORT_SECURITY = "strict-transport-security",
    TE = "te",
    TRAILER = "trailer",
    TRANSFER_ENCODING = "transfer-encoding",
    UPGRADE = "upgrade",
    USER_AGENT = "user-agent",
    VARY = "vary",
    VIA = "via",
    WWW_AUTHENTICATE = "www-authenticate",
    X_CONTENT_TYPE_OPTIONS = "x-content-type-options",
    X_FRAME_OPTIONS = "x-frame-options",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_map_to_the_same_name_in_both_crates() {
        for text in COMMON_NAMES {
            let name = header_name(text).unwrap();
            assert_eq!(name.as_str(), *text);
            assert_eq!(name, HeaderName::from_static(text));
            assert_eq!(actix_name(&name).unwrap().as_str(), *text);
        }
    }

    #[test]
    fn other_names_are_parsed_and_bad_ones_refused() {
        let n = header_name("x-custom-thing").unwrap();
        assert_eq!(n.as_str(), "x-custom-thing");
        assert_eq!(actix_name(&n).unwrap().as_str(), "x-custom-thing");
        for bad in ["", "a b", "a\r\nb", "a\0b", "host:", "x:y", "caf\u{e9}"] {
            assert!(header_name(bad).is_none(), "{bad:?}");
        }
    }
}
