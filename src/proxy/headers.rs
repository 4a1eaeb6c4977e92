//! Header rules for both directions: hop-by-hop stripping, `Connection`-named headers, the
//! forwarding headers and the client address. See SECURITY.md, "Hop-by-hop and headers the
//! gateway owns".

use std::net::IpAddr;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::filters::jwt::{TokenPlace, without_cookie};
use crate::snapshot::{ClientIpRules, HeaderOps, Route, Snapshot, UpstreamHost};
use crate::util::canonical_ip;
pub use crate::wire::headers::{
    HOP_BY_HOP, HeaderList, HeaderSink, header_name, is_hop_by_hop, is_hop_by_hop_str,
    valid_request_id,
};

/// Room for the fields the gateway adds to the client's (forwarding headers, request id, host,
/// client certificate) and a plugin's or policy's additions, so that the map need not grow.
pub const GATEWAY_FIELDS: usize = 8;

/// Headers the gateway sets for the upstream; a client cannot name them in `Connection` to have
/// them removed.
const GATEWAY_SET: [&str; 9] = [
    CLIENT_CERT_SUBJECT,
    CLIENT_CERT_SHA256,
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "forwarded",
    "x-real-ip",
];

/// The longest text of an address: IPv6 ending in an IPv4 address.
const MAX_IP_TEXT: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const CLIENT_CERT_SUBJECT_NAME: HeaderName = HeaderName::from_static(CLIENT_CERT_SUBJECT);
const CLIENT_CERT_SHA256_NAME: HeaderName = HeaderName::from_static(CLIENT_CERT_SHA256);

/// `value` as a header value shared from `values` (copied to its end, then split off), or
/// `None` when it is not a valid value (CR, LF, NUL and other controls but tab are refused).
fn shared_value(values: &mut BytesMut, value: &[u8]) -> Option<HeaderValue> {
    values.extend_from_slice(value);
    HeaderValue::from_maybe_shared(values.split().freeze()).ok()
}

/// Set from the client certificate verified by a listener's `client_auth` (mutual TLS): its
/// subject DN and the SHA-256 of its DER, lower-case hex. Always removed from the client's own
/// request first, on every listener, so only the gateway can send them.
pub const CLIENT_CERT_SUBJECT: &str = "x-client-cert-subject";
pub const CLIENT_CERT_SHA256: &str = "x-client-cert-sha256";

/// A client certificate verified during the TLS handshake, as header values.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub subject: HeaderValue,
    pub sha256: HeaderValue,
}

impl ClientCert {
    /// The headers the gateway sets from it, as a policy, a plugin or a key sees them.
    pub fn fields(&self) -> [(&'static str, &HeaderValue); 2] {
        [
            (CLIENT_CERT_SUBJECT, &self.subject),
            (CLIENT_CERT_SHA256, &self.sha256),
        ]
    }

    /// The value of the header `name` (lower-case) the gateway sets from it, if it is one.
    pub fn field(&self, name: &str) -> Option<&HeaderValue> {
        self.fields()
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
    }
}

/// Whether a client header could stand for one the gateway sets from the client certificate
/// (`_` and `-` alike, as for identity headers).
fn is_client_cert_header(name: &str) -> bool {
    [CLIENT_CERT_SUBJECT, CLIENT_CERT_SHA256].iter().any(|h| {
        h.len() == name.len()
            && h.bytes()
                .zip(name.bytes())
                .all(|(x, y)| x == y || (x == b'-' && y == b'_'))
    })
}

/// The extra header names a `Connection` header asks to drop, lower-cased. `Err` when it names a
/// header the gateway owns: the request is refused (400) rather than half-honoured.
pub fn connection_tokens<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for v in values {
        // Split as bytes: most values say only `keep-alive` or `close`, and no text is made for
        // them. Any byte outside ASCII lands in a token that is neither, and is refused there.
        for token in v.split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.is_empty()
                || t.eq_ignore_ascii_case(b"close")
                || t.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            let Ok(t) = std::str::from_utf8(t) else {
                return Err("Connection header is not valid text".into());
            };
            // Only the names to drop are copied.
            let t = t.to_ascii_lowercase();
            if GATEWAY_SET.contains(&t.as_str()) || t.starts_with("x-forwarded-") {
                return Err(format!(
                    "Connection header names `{t}`, which the gateway sets"
                ));
            }
            out.push(t);
        }
    }
    Ok(out)
}

/// The address to treat as the client: the socket peer, unless the peer is a trusted proxy, in
/// which case `X-Forwarded-For` is walked from the right past trusted hops.
pub fn client_ip<'a>(
    peer: IpAddr,
    xff: impl Iterator<Item = &'a [u8]>,
    rules: &ClientIpRules,
) -> IpAddr {
    let peer = canonical_ip(peer);
    if rules.trusted_proxies.is_empty() || !rules.is_trusted(peer) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    for v in xff {
        let Ok(s) = std::str::from_utf8(v) else {
            return peer;
        };
        hops.extend(s.split(','));
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = forwarded_ip(hop.trim()) else {
            // A hop we cannot read: stop at the last address we could trust.
            return client;
        };
        let ip = canonical_ip(ip);
        client = ip;
        if !rules.is_trusted(ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry as an address: a plain IPv4 or IPv6 address, or one of the
/// forms load balancers also write, the port dropped: `[2001:db8::1]` (brackets, as some
/// firewalls send IPv6), `[2001:db8::1]:4711` and `192.0.2.1:4711` (Azure Application Gateway,
/// IIS ARR). A bare IPv6 address is never split at a colon (`2001:db8::1:8080` is an address,
/// not `2001:db8::1` and a port). Zone ids (`fe80::1%eth0`), quotes, names: not addresses.
fn forwarded_ip(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    let is_port = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = hop.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = hop.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Which of the client's request headers exist for the gateway once a route is matched: the
/// ones the auth filter, the policy and the upstream may see. Decided once per request, so
/// every step sees the same client request.
///
/// * Names with `_` are dropped unless `[headers] allow_underscores = true` (nginx's
///   `underscores_in_headers off`): many upstream frameworks read `X_User_Id` as `X-User-Id`.
/// * On a route with `auth`, the headers named in `claims_to_headers` are dropped whatever the
///   auth outcome: they come only from verified claims.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub allow_underscores: bool,
    /// Claim name → header, from the route's auth provider.
    pub identity: &'a [(String, HeaderName)],
}

impl<'a> Inbound<'a> {
    /// The rules for a request matched to `route`.
    pub fn for_route(snap: &Snapshot, route: &'a Route) -> Self {
        Self::new(snap.allow_underscores, route)
    }

    pub fn new(allow_underscores: bool, route: &'a Route) -> Self {
        Inbound {
            allow_underscores,
            identity: route
                .auth
                .as_ref()
                .map_or(&[][..], |a| a.provider.claims_to_headers.as_slice()),
        }
    }

    /// Whether the client's header `name` (lower-case) is kept. An identity header is matched
    /// with `_` and `-` alike, so even with underscores allowed `X_User_Id` cannot stand in
    /// for `X-User-Id` at an upstream that folds one into the other. The client's own
    /// client-certificate headers are never kept: policies, plugins, rate-limit and hash keys
    /// see only the ones the gateway sets from a verified certificate ([`ClientCert::fields`]).
    pub fn keeps(&self, name: &str) -> bool {
        if !self.allow_underscores && name.contains('_') {
            return false;
        }
        if is_client_cert_header(name) {
            return false;
        }
        let same = |a: &str, b: &str| {
            a.len() == b.len()
                && a.bytes()
                    .zip(b.bytes())
                    .all(|(x, y)| x == y || (matches!(x, b'_' | b'-') && matches!(y, b'_' | b'-')))
        };
        !self.identity.iter().any(|(_, h)| same(h.as_str(), name))
    }
}

/// What, besides the client's own headers, decides the headers an upstream gets.
pub struct Forwarding<'a> {
    /// The socket peer.
    pub peer: Option<IpAddr>,
    /// Whether the peer is a trusted proxy (its `X-Forwarded-*` headers are kept).
    pub trusted: bool,
    pub request_id: &'a HeaderValue,
    pub upstream_host: &'a UpstreamHost,
    /// `host:port` of the target the request goes to.
    pub target_authority: &'a str,
    /// Which client headers are kept at all.
    pub inbound: Inbound<'a>,
    /// Where the token was found, when it is not forwarded: its header, or its cookie, is
    /// removed (a query parameter is removed from the query by the caller).
    pub drop_token: Option<&'a TokenPlace>,
    /// Headers from verified claims, set over the client's.
    pub auth_headers: &'a [(HeaderName, HeaderValue)],
    /// The route's `request_headers` rules, applied last (a policy's edits come after).
    pub rules: &'a HeaderOps,
    /// The client connection is TLS: `X-Forwarded-Proto: https` (unless a trusted proxy said).
    pub https: bool,
    /// The verified client certificate, sent as [`CLIENT_CERT_SUBJECT`] / [`CLIENT_CERT_SHA256`].
    pub client_cert: Option<&'a ClientCert>,
}

/// The request headers for the upstream: the client's, minus hop-by-hop and `Connection`-named
/// ones, with the forwarding headers set by the gateway, the claims headers and the route's
/// rules. `client` lists the client's headers (name lower-case, raw value) each time it is
/// called. Used by the proxy and by `rustygate test`, so both send the same headers.
pub fn upstream_headers<'h, I>(
    client: impl Fn() -> I,
    len: usize,
    f: &Forwarding<'_>,
) -> Result<HeaderMap, String>
where
    I: Iterator<Item = (&'h str, &'h [u8])>,
{
    forwarded_headers(client, HeaderMap::with_capacity(len + GATEWAY_FIELDS), f)
}

/// [`upstream_headers`] into `out`: an `http` 1.x map, or a [`HeaderList`] for a head written
/// as it is.
pub fn forwarded_headers<'h, I, S: HeaderSink>(
    client: impl Fn() -> I,
    mut out: S,
    f: &Forwarding<'_>,
) -> Result<S, String>
where
    I: Iterator<Item = (&'h str, &'h [u8])>,
{
    // One pass for the `Connection` values and the room the values take.
    let mut room = 0;
    let mut connection: Vec<&[u8]> = Vec::new();
    for (n, v) in client() {
        room += v.len();
        if n == "connection" {
            connection.push(v);
        } else if n == "x-forwarded-for" {
            room += 2; // the ", " after it
        }
    }
    let dropped = connection_tokens(connection.into_iter())?;
    // The route's `request_headers.set` and its claim headers are the gateway's too: naming
    // one in `Connection` is refused as naming `Host` is (the gateway's value would be sent
    // anyway; the client asked for something that cannot be).
    if let Some(t) = dropped.iter().find(|t| {
        let t = t.as_str();
        f.rules.set.iter().any(|(n, _)| n.as_str() == t)
            || f.inbound.identity.iter().any(|(_, h)| h.as_str() == t)
    }) {
        return Err(format!(
            "Connection header names `{t}`, which the gateway sets"
        ));
    }
    let mut client_host = None;
    let mut prior_xff: Vec<&str> = Vec::new();
    // The kept values and X-Forwarded-For are copied into one buffer and shared from it: one
    // allocation for all.
    let mut values = BytesMut::with_capacity(room + MAX_IP_TEXT);
    let (mut has_proto, mut has_forwarded_host) = (false, false);
    for (n, value) in client() {
        match n {
            "host" => {
                client_host = shared_value(&mut values, value);
                continue;
            }
            "x-forwarded-for" => {
                if f.trusted
                    && let Ok(v) = std::str::from_utf8(value)
                {
                    prior_xff.push(v);
                }
                continue;
            }
            "x-request-id" | "expect" => continue,
            "x-forwarded-proto" | "x-forwarded-host" | "forwarded" | "x-real-ip" if !f.trusted => {
                continue;
            }
            // Client-address headers of CDNs and other proxies, which upstreams often believe:
            // only from a trusted proxy (a CDN in front is one), never from the client itself.
            "true-client-ip"
            | "cf-connecting-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "fastly-client-ip"
            | "client-ip"
            | "x-originating-ip"
            | "x-remote-addr"
            | "x-remote-ip"
            | "x-proxyuser-ip"
            | "x-envoy-external-address"
            | "x-forwarded"
            | "forwarded-for"
            // The client's scheme, as the forwarding headers give it.
            | "front-end-https"
            | "x-url-scheme"
                if !f.trusted =>
            {
                continue;
            }
            // The rest of the family (Port, Prefix, Server, Ssl...) from an untrusted peer too:
            // frameworks believe them as they believe Proto and Host.
            n if !f.trusted && n.starts_with("x-forwarded-") => continue,
            _ => {}
        }
        if is_hop_by_hop_str(n)
            || dropped.iter().any(|d| d == n)
            || !f.inbound.keeps(n)
            || is_client_cert_header(n)
        {
            continue;
        }
        let Some(name) = header_name(n) else {
            continue;
        };
        let Some(v) = shared_value(&mut values, value) else {
            continue;
        };
        has_proto |= name == X_FORWARDED_PROTO;
        has_forwarded_host |= name == X_FORWARDED_HOST;
        out.append(name, v);
    }
    // X-Forwarded-For: what trusted hops said, then the peer, shared from the same buffer (the
    // first pass counted its room).
    for hop in &prior_xff {
        if !values.is_empty() {
            values.extend_from_slice(b", ");
        }
        values.extend_from_slice(hop.as_bytes());
    }
    if let Some(p) = f.peer {
        if !values.is_empty() {
            values.extend_from_slice(b", ");
        }
        crate::util::push_ip(&mut values, canonical_ip(p));
    }
    // The client's own X-Forwarded-For, X-Request-Id, Host and client-certificate headers were
    // skipped above: these are the only ones, and are appended.
    if let Ok(v) = HeaderValue::from_maybe_shared(values.split().freeze()) {
        out.append(X_FORWARDED_FOR, v);
    }
    if !has_proto {
        out.append(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if f.https { "https" } else { "http" }),
        );
    }
    if let Some(c) = f.client_cert {
        out.append(CLIENT_CERT_SUBJECT_NAME, c.subject.clone());
        out.append(CLIENT_CERT_SHA256_NAME, c.sha256.clone());
    }
    if !has_forwarded_host && let Some(v) = &client_host {
        out.append(X_FORWARDED_HOST, v.clone());
    }
    out.append(X_REQUEST_ID, f.request_id.clone());
    let host = match f.upstream_host {
        UpstreamHost::Preserve => {
            client_host.or_else(|| HeaderValue::from_str(f.target_authority).ok())
        }
        UpstreamHost::Target => HeaderValue::from_str(f.target_authority).ok(),
        UpstreamHost::Fixed(v) => Some(v.clone()),
    };
    if let Some(v) = host {
        out.append(http::header::HOST, v);
    }
    match f.drop_token {
        Some(TokenPlace::Authorization) => {
            out.remove(&http::header::AUTHORIZATION);
        }
        Some(TokenPlace::Header(h)) => {
            out.remove(h);
        }
        Some(TokenPlace::Cookie(name)) => {
            let kept: Vec<HeaderValue> = out
                .values(&http::header::COOKIE)
                .iter()
                .filter_map(|v| {
                    let text = v.to_str().ok()?;
                    HeaderValue::from_str(&without_cookie(text, name)?).ok()
                })
                .collect();
            out.remove(&http::header::COOKIE);
            for v in kept {
                out.append(http::header::COOKIE, v);
            }
        }
        Some(TokenPlace::Query(_)) | None => {}
    }
    for (n, v) in f.auth_headers {
        out.insert(n.clone(), v.clone());
    }
    f.rules.apply(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn rules(nets: &[&str]) -> ClientIpRules {
        ClientIpRules {
            trusted_proxies: nets.iter().map(|n| n.parse::<IpNet>().unwrap()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let r = rules(&[]);
        let xff = [b"1.2.3.4".as_slice()];
        assert_eq!(client_ip(ip("9.9.9.9"), xff.into_iter(), &r), ip("9.9.9.9"));
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let r = rules(&["10.0.0.0/8"]);
        let xff = [b"6.6.6.6, 1.2.3.4, 10.0.0.5".as_slice()];
        assert_eq!(
            client_ip(ip("10.0.0.1"), xff.into_iter(), &r),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let r = rules(&["10.0.0.0/8"]);
        let xff = [b"1.2.3.4, bogus".as_slice()];
        assert_eq!(
            client_ip(ip("10.0.0.1"), xff.into_iter(), &r),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn forwarded_entries_with_ports_and_brackets_are_read_bare_ipv6_is_never_split() {
        for (hop, want) in [
            ("192.0.2.1", Some("192.0.2.1")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:4711", Some("2001:db8::1")),
            ("192.0.2.1:4711", Some("192.0.2.1")),
            ("[::ffff:192.0.2.1]:80", Some("::ffff:192.0.2.1")),
            // An address whose last group looks like a port is the address.
            ("2001:db8::1:8080", Some("2001:db8::1:8080")),
            ("fe80::1%eth0", None),
            ("[fe80::1%eth0]:80", None),
            ("[192.0.2.1]:80", None),
            ("[2001:db8::1]:", None),
            ("[2001:db8::1]:123456", None),
            ("[2001:db8::1]x", None),
            ("[2001:db8::1", None),
            ("192.0.2.1:", None),
            ("192.0.2.1:+80", None),
            ("192.0.2.1:80:80", None),
            ("\"[2001:db8::1]\"", None),
            ("unknown", None),
            ("", None),
        ] {
            assert_eq!(forwarded_ip(hop), want.map(ip), "{hop}");
        }
    }

    #[test]
    fn trusted_hops_with_ports_are_walked_like_bare_ones() {
        let r = rules(&["10.0.0.0/8", "fd00::/8"]);
        let xff = [b"[2001:db8::7]:4711, 10.0.0.5:80, [fd00::1]".as_slice()];
        assert_eq!(
            client_ip(ip("10.0.0.1"), xff.into_iter(), &r),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn mapped_v6_peer_matches_v4_rule() {
        let r = rules(&["127.0.0.0/8"]);
        let xff = [b"5.5.5.5".as_slice()];
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), xff.into_iter(), &r),
            ip("5.5.5.5")
        );
    }

    #[test]
    fn connection_cannot_drop_gateway_headers() {
        assert!(connection_tokens([b"close, X-Forwarded-For".as_slice()].into_iter()).is_err());
        assert!(connection_tokens([b"host".as_slice()].into_iter()).is_err());
        assert_eq!(
            connection_tokens([b"keep-alive, X-Secret".as_slice()].into_iter()).unwrap(),
            vec!["x-secret".to_string()]
        );
    }

    #[test]
    fn connection_tokens_are_split_trimmed_and_lower_cased_across_values() {
        let values = [
            b"Keep-Alive".as_slice(),
            b" CLOSE ,\tX-A , ,x-b".as_slice(),
            b"".as_slice(),
            b"Upgrade".as_slice(),
        ];
        assert_eq!(
            connection_tokens(values.into_iter()).unwrap(),
            vec!["x-a", "x-b", "upgrade"]
        );
        assert!(
            connection_tokens([b"keep-alive".as_slice(), b"close".as_slice()].into_iter())
                .unwrap()
                .is_empty()
        );
        // A byte that is not text, even beside `keep-alive`, is refused.
        assert!(connection_tokens([b"keep-alive, x-\xff".as_slice()].into_iter()).is_err());
        assert!(connection_tokens([b"keep-alive\xff".as_slice()].into_iter()).is_err());
    }

    #[test]
    fn inbound_drops_underscores_and_identity_headers() {
        let identity = [("sub".to_owned(), HeaderName::from_static("x-user-id"))];
        let strict = Inbound {
            allow_underscores: false,
            identity: &identity,
        };
        assert!(strict.keeps("x-trace-id"));
        assert!(!strict.keeps("x_trace_id"));
        assert!(!strict.keeps("x-user-id"));
        let lax = Inbound {
            allow_underscores: true,
            ..strict
        };
        assert!(lax.keeps("x_trace_id"));
        assert!(!lax.keeps("x_user_id"));
        assert!(!lax.keeps("x-user_id"));
        assert!(lax.keeps("x-user-ids"));
    }

    /// The upstream headers for `client` (lower-case names, raw values) from an untrusted or
    /// trusted peer, with the default rules.
    fn forward(client: &[(&str, &[u8])], trusted: bool) -> Result<HeaderMap, String> {
        forward_from(client, trusted, ip("192.0.2.7"))
    }

    fn forward_from(
        client: &[(&str, &[u8])],
        trusted: bool,
        peer: IpAddr,
    ) -> Result<HeaderMap, String> {
        let rid = HeaderValue::from_static("rid-1");
        let rules = HeaderOps::default();
        let f = Forwarding {
            peer: Some(peer),
            trusted,
            request_id: &rid,
            upstream_host: &UpstreamHost::Preserve,
            target_authority: "10.0.0.1:8080",
            inbound: Inbound {
                allow_underscores: false,
                identity: &[],
            },
            drop_token: None,
            auth_headers: &[],
            rules: &rules,
            https: false,
            client_cert: None,
        };
        upstream_headers(|| client.iter().copied(), client.len(), &f)
    }

    /// The fields built as a list are the fields built as a map: token removal, claims
    /// headers set over the client's, the route's rules, and the gateway's own headers.
    #[test]
    fn a_list_and_a_map_get_the_same_fields() {
        let client: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("cookie", b"session=tok; theme=dark"),
            ("cookie", b"other=1"),
            ("authorization", b"Bearer tok"),
            ("x-user", b"forged"),
            ("x-strip", b"1"),
            ("x-a", b"1"),
            ("x-a", b"2"),
            ("x-forwarded-for", b"203.0.113.9"),
            ("connection", b"x-hop"),
            ("x-hop", b"dropped"),
        ];
        let rid = HeaderValue::from_static("rid-1");
        let rules = HeaderOps {
            set: vec![(
                HeaderName::from_static("x-set"),
                HeaderValue::from_static("s"),
            )],
            remove: vec![HeaderName::from_static("x-strip")],
        };
        let claims = [(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("alice"),
        )];
        let places = [
            TokenPlace::Cookie("session".into()),
            TokenPlace::Authorization,
            TokenPlace::Header(HeaderName::from_static("x-a")),
        ];
        for place in &places {
            for trusted in [false, true] {
                let f = Forwarding {
                    peer: Some(ip("192.0.2.7")),
                    trusted,
                    request_id: &rid,
                    upstream_host: &UpstreamHost::Target,
                    target_authority: "10.0.0.1:8080",
                    inbound: Inbound {
                        allow_underscores: false,
                        identity: &[],
                    },
                    drop_token: Some(place),
                    auth_headers: &claims,
                    rules: &rules,
                    https: true,
                    client_cert: None,
                };
                let fields = || client.iter().copied();
                let map = forwarded_headers(fields, HeaderMap::new(), &f).unwrap();
                let list = forwarded_headers(fields, HeaderList::default(), &f).unwrap();
                let sorted = |h: &HeaderMap| {
                    let mut v: Vec<(String, Vec<u8>)> = h
                        .iter()
                        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect();
                    v.sort();
                    v
                };
                assert_eq!(sorted(&list.to_map()), sorted(&map), "{place:?} {trusted}");
                assert_eq!(all(&map, "x-user"), [b"alice"]);
                assert!(map.get("x-strip").is_none() && map.get("x-hop").is_none());
                assert_eq!(all(&map, "x-set"), [b"s"]);
            }
        }
    }

    fn all<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
        h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
    }

    #[test]
    fn the_gateway_sets_its_own_headers_over_the_clients() {
        let client: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("x-forwarded-for", b"6.6.6.6"),
            ("x-request-id", b"forged"),
            ("x-forwarded-proto", b"https"),
            ("x-forwarded-host", b"evil.example"),
            ("forwarded", b"for=6.6.6.6"),
            ("x-real-ip", b"6.6.6.6"),
            ("x-forwarded-port", b"443"),
            ("x-forwarded-prefix", b"/admin"),
            ("true-client-ip", b"6.6.6.6"),
            ("cf-connecting-ip", b"6.6.6.6"),
            ("x-client-ip", b"6.6.6.6"),
            ("client-ip", b"6.6.6.6"),
            ("x-originating-ip", b"6.6.6.6"),
            ("x-remote-addr", b"6.6.6.6"),
            ("x-proxyuser-ip", b"6.6.6.6"),
            ("x-envoy-external-address", b"6.6.6.6"),
            ("x-forwarded", b"for=6.6.6.6"),
            ("forwarded-for", b"6.6.6.6"),
            ("front-end-https", b"on"),
            ("x-url-scheme", b"https"),
            ("x-client-cert-subject", b"CN=admin"),
            ("x-client-cert-sha256", b"00"),
            ("x_client_cert_subject", b"CN=admin"),
            ("user-agent", b"curl/8"),
        ];
        let out = forward(client, false).unwrap();
        assert_eq!(all(&out, "host"), [b"a.example"]);
        assert_eq!(all(&out, "x-forwarded-for"), [b"192.0.2.7"]);
        assert_eq!(all(&out, "x-request-id"), [b"rid-1"]);
        assert_eq!(all(&out, "x-forwarded-proto"), [b"http"]);
        assert_eq!(all(&out, "x-forwarded-host"), [b"a.example"]);
        assert_eq!(all(&out, "user-agent"), [b"curl/8"]);
        for gone in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "true-client-ip",
            "cf-connecting-ip",
            "x-client-ip",
            "client-ip",
            "x-originating-ip",
            "x-remote-addr",
            "x-proxyuser-ip",
            "x-envoy-external-address",
            "x-forwarded",
            "forwarded-for",
            "front-end-https",
            "x-url-scheme",
            "x-client-cert-subject",
            "x-client-cert-sha256",
            "x_client_cert_subject",
        ] {
            assert!(!out.contains_key(gone), "{gone} was forwarded");
        }
        // From a trusted proxy its forwarding headers are kept, and the peer is appended.
        let out = forward(client, true).unwrap();
        assert_eq!(all(&out, "x-forwarded-for"), [b"6.6.6.6, 192.0.2.7"]);
        assert_eq!(all(&out, "x-forwarded-proto"), [b"https"]);
        assert_eq!(all(&out, "x-forwarded-host"), [b"evil.example"]);
        assert_eq!(all(&out, "x-forwarded-port"), [b"443"]);
        assert_eq!(all(&out, "cf-connecting-ip"), [b"6.6.6.6"]);
        assert_eq!(all(&out, "x-originating-ip"), [b"6.6.6.6"]);
        assert_eq!(all(&out, "x-request-id"), [b"rid-1"]);
        assert!(!out.contains_key("x-client-cert-subject"));
    }

    #[test]
    fn x_forwarded_for_is_written_after_the_other_values_into_their_buffer() {
        // Several trusted hops and the longest peer addresses, written into the buffer after
        // the values already shared from it: each of those keeps its bytes.
        let client: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("x-forwarded-for", b"198.51.100.1, 198.51.100.2"),
            ("user-agent", b"curl/8"),
            ("x-forwarded-for", b"2001:db8::1"),
            ("x-kept", b"k"),
        ];
        let long_v6 = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff";
        for (peer, trusted, want) in [
            ("192.0.2.7", false, "192.0.2.7".to_owned()),
            (long_v6, false, long_v6.to_owned()),
            (
                "255.255.255.255",
                true,
                "198.51.100.1, 198.51.100.2, 2001:db8::1, 255.255.255.255".to_owned(),
            ),
            (
                long_v6,
                true,
                format!("198.51.100.1, 198.51.100.2, 2001:db8::1, {long_v6}"),
            ),
        ] {
            let out = forward_from(client, trusted, ip(peer)).unwrap();
            assert_eq!(all(&out, "x-forwarded-for"), [want.as_bytes()], "{peer}");
            assert_eq!(all(&out, "host"), [b"a.example"]);
            assert_eq!(all(&out, "x-forwarded-host"), [b"a.example"]);
            assert_eq!(all(&out, "user-agent"), [b"curl/8"]);
            assert_eq!(all(&out, "x-kept"), [b"k"]);
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_not_forwarded() {
        let client: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("connection", b"keep-alive, X-Secret , x-other"),
            ("keep-alive", b"timeout=5"),
            ("proxy-connection", b"keep-alive"),
            ("te", b"trailers"),
            ("trailer", b"x-t"),
            ("transfer-encoding", b"chunked"),
            ("upgrade", b"h2c"),
            ("proxy-authorization", b"Basic eA=="),
            ("x-secret", b"1"),
            ("x-other", b"2"),
            ("x-kept", b"3"),
            ("expect", b"100-continue"),
        ];
        let out = forward(client, false).unwrap();
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "host",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-kept",
                "x-request-id"
            ]
        );
        for owned in [
            "host",
            "Host",
            "x-forwarded-for",
            "X-Forwarded-Anything",
            "x-request-id",
        ] {
            let value = format!("close, {owned}");
            let client: &[(&str, &[u8])] = &[("host", b"a"), ("connection", value.as_bytes())];
            assert!(forward(client, false).is_err(), "{owned}");
        }
    }

    /// SECURITY.md: a `Connection` header naming a header the gateway sets is 400; the route's
    /// `request_headers.set` and its claim headers are set by the gateway too.
    #[test]
    fn connection_cannot_name_route_or_claim_headers() {
        let rid = HeaderValue::from_static("rid-1");
        let rules = HeaderOps {
            set: vec![(
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("acme"),
            )],
            remove: vec![],
        };
        let identity = [("sub".to_owned(), HeaderName::from_static("x-user-id"))];
        let f = Forwarding {
            peer: Some(ip("192.0.2.7")),
            trusted: false,
            request_id: &rid,
            upstream_host: &UpstreamHost::Preserve,
            target_authority: "10.0.0.1:8080",
            inbound: Inbound {
                allow_underscores: false,
                identity: &identity,
            },
            drop_token: None,
            auth_headers: &[],
            rules: &rules,
            https: false,
            client_cert: None,
        };
        for (value, refused) in [
            ("close, X-Tenant", true),
            ("x-user-id", true),
            ("keep-alive, x-other", false),
        ] {
            let client: &[(&str, &[u8])] = &[("host", b"a"), ("connection", value.as_bytes())];
            let out = upstream_headers(|| client.iter().copied(), client.len(), &f);
            assert_eq!(out.is_err(), refused, "{value}: {out:?}");
            if let Err(e) = out {
                assert!(e.contains("which the gateway sets"), "{e}");
            }
        }
    }

    #[test]
    fn control_characters_never_reach_the_upstream() {
        let client: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("x-crlf", b"a\r\nx-injected: 1"),
            ("x-lf", b"a\nb"),
            ("x-cr", b"a\rb"),
            ("x-nul", b"a\0b"),
            ("x-fold", b"a\r\n b"),
            ("x injected", b"1"),
            ("x-injected\r\nx", b"1"),
            ("x_under", b"1"),
            ("x-tab", b"a\tb"),
            ("x-obs-text", b"caf\xe9"),
        ];
        let out = forward(client, false).unwrap();
        for (name, _) in client
            .iter()
            .filter(|(n, _)| !matches!(*n, "host" | "x-tab" | "x-obs-text"))
        {
            assert!(!out.contains_key(*name), "{name:?} was forwarded");
        }
        assert!(!out.contains_key("x-injected"));
        assert_eq!(all(&out, "x-tab"), [b"a\tb"]);
        assert_eq!(all(&out, "x-obs-text"), [b"caf\xe9"]);
        for (_, v) in &out {
            assert!(!v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
        }
    }

    #[test]
    fn many_headers_and_repeated_names_keep_their_values_and_order() {
        let names: Vec<String> = (0..300).map(|i| format!("x-h-{i}")).collect();
        let values: Vec<String> = (0..300).map(|i| format!("value {i}")).collect();
        let mut client: Vec<(&str, &[u8])> = vec![("host", b"a.example")];
        for (n, v) in names.iter().zip(&values) {
            client.push((n.as_str(), v.as_bytes()));
        }
        for v in ["one", "two", "three"] {
            client.push(("accept", v.as_bytes()));
            client.push(("x-dup", v.as_bytes()));
        }
        let out = forward(&client, false).unwrap();
        for (n, v) in names.iter().zip(&values) {
            assert_eq!(all(&out, n), [v.as_bytes()]);
        }
        assert_eq!(all(&out, "accept"), [&b"one"[..], b"two", b"three"]);
        assert_eq!(all(&out, "x-dup"), [&b"one"[..], b"two", b"three"]);
    }

    #[test]
    fn one_host_goes_out_even_when_the_client_sent_two() {
        // The handler refuses a request with two (400); this is the rule beneath it.
        let client: &[(&str, &[u8])] = &[("host", b"a.example"), ("host", b"b.example")];
        let out = forward(client, false).unwrap();
        assert_eq!(all(&out, "host").len(), 1);
        assert_eq!(all(&out, "x-forwarded-host").len(), 1);
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 200]));
    }
}
