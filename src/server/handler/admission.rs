//! Request checks before routing (SECURITY.md): the request target, its framing and `Host`
//! fields, the request id, whether the request is a gRPC call.

use actix_http::Request;
use actix_web::HttpMessage;
use actix_web::http::header as ax;
use bytes::Bytes;
use http::header::HeaderValue;

use crate::router::normalize_host;

/// Whether the request is a gRPC call (`application/grpc` or `application/grpc+<codec>`; not
/// gRPC-Web, which is plain HTTP/1.1 to the gateway).
pub(super) fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(ax::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .is_some_and(|ct| {
            ct.strip_prefix(b"application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
        })
}

/// The longest request target (path and query) served; longer ones get 414. Twice nginx's
/// default (8 KiB for the whole request line), as CDNs allow: longer URLs break along the way.
pub(super) const MAX_REQUEST_TARGET: usize = 16 * 1024;

/// What the request's framing fields say, read once for all who need them.
#[derive(Clone, Copy)]
pub(super) struct Framing {
    /// A `Transfer-Encoding` field is there (actix-http takes only `chunked`).
    pub(super) transfer_encoding: bool,
    /// The `Content-Length`, if any (`Err`: not a length).
    pub(super) length: Result<Option<u64>, ()>,
}

/// Framing and header checks actix does not make itself (SECURITY.md), and the framing.
pub(super) fn check_request(req: &Request) -> Result<Framing, &'static str> {
    let h = req.headers();
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Err("the request target must be a path");
    }
    if req.version() == actix_web::http::Version::HTTP_2
        && req
            .extensions()
            .contains::<crate::server::h2::PaddedFieldValue>()
    {
        return Err("a header field value begins or ends with whitespace");
    }
    let transfer_encoding = h.contains_key(ax::TRANSFER_ENCODING);
    let mut lengths = h.get_all(ax::CONTENT_LENGTH);
    let length = lengths.next();
    if transfer_encoding && length.is_some() {
        return Err("both Transfer-Encoding and Content-Length are set");
    }
    if lengths.next().is_some() {
        return Err("more than one Content-Length header");
    }
    Ok(Framing {
        transfer_encoding,
        length: length.map_or(Ok(None), |v| content_length(v).map(Some)),
    })
}

/// The host the request is routed by (see [`routing_host`]), with what is wrong with its `Host`
/// fields, if anything: checked after [`check_request`]. A refused request still logs the
/// host it named, as [`normalize_host`] keys it.
pub(super) fn host_of(req: &Request) -> (String, Result<(), &'static str>) {
    let mut hosts = req.headers().get_all(ax::HOST);
    let (first, check) = match (hosts.next(), hosts.next()) {
        (Some(one), None) => match routing_host(one.as_bytes()) {
            Some(host) => return (host, Ok(())),
            None => (Some(one), Err("the Host header is not a valid host[:port]")),
        },
        (Some(first), Some(_)) => (Some(first), Err("more than one Host header")),
        (None, _) if req.version() == actix_web::http::Version::HTTP_11 => {
            (None, Err("HTTP/1.1 requests need a Host header"))
        }
        (None, _) => (None, Ok(())),
    };
    let host = first
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| normalize_host(h).into_owned())
        .unwrap_or_default();
    (host, check)
}

/// A valid `Host` value (see [`host_part`]) keyed as [`normalize_host`] keys it: lower-cased,
/// without the port and a trailing dot. `None` when the value is not a valid host.
fn routing_host(h: &[u8]) -> Option<String> {
    let host = host_part(h)?;
    if host.first() == Some(&b'[')
        && let Some(ip) = crate::router::ipv6_host(host)
    {
        return Some(ip);
    }
    let host = host.strip_suffix(b".").unwrap_or(host);
    // All ASCII (a registered name's bytes or an IP literal's): the text check passes.
    std::str::from_utf8(host).ok().map(str::to_ascii_lowercase)
}

/// Whether `h` is a valid `Host` value (see [`host_part`]).
#[cfg(test)]
fn valid_host(h: &[u8]) -> bool {
    host_part(h).is_some()
}

/// The host of a `host [ ":" port ]` value (RFC 9110 §7.2): a registered name (unreserved,
/// percent-encoded and sub-delimiter characters) or a bracketed IP literal, then an optional
/// decimal port. `None` when the value is not one. Spaces, `/`, `@`, `?`, `#` and `\` never
/// appear in one, and would confuse whatever reads the host after the gateway (routing,
/// redirects, logs). A registered name is checked in one pass up to the first byte that cannot
/// be in it, which must begin the port.
pub(crate) fn host_part(h: &[u8]) -> Option<&[u8]> {
    let end = if h.first() == Some(&b'[') {
        let close = h.iter().position(|&b| b == b']')?;
        let literal = &h[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return None;
        }
        close + 1
    } else {
        h.iter()
            .position(|&b| !REG_NAME[usize::from(b)])
            .unwrap_or(h.len())
    };
    let (host, port) = h.split_at(end);
    let port_ok = match port.split_first() {
        None => true,
        // At most 65535 (an empty port is allowed by RFC 3986).
        Some((b':', digits)) => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        Some(_) => false,
    };
    (!host.is_empty() && port_ok).then_some(host)
}

/// The bytes of a registered name: unreserved, percent-encoded and sub-delimiter characters.
/// A table: one lookup per byte of every request's Host instead of a chain of comparisons.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    table
};

/// A new request id, for the upstream's request and for the client's response: a random
/// (version 4) UUID in its simple form, 32 lower-case hex digits. Both values share one buffer
/// that owns its 32 bytes and their count: one allocation, and each copy of either value (into
/// the upstream's request, into the response) takes no other. Two values made each from its
/// own text (`from_str`) took two, and each of their copies one more.
pub(crate) fn new_request_id() -> (HeaderValue, ax::HeaderValue) {
    // The UUID as one number, its first byte the most significant: the version (4) is the high
    // nibble of byte 6 and the variant (`10`) the top bits of byte 8 (RFC 9562, §5.4). Written
    // as hex from the number itself: `uuid`'s `new_v4` and `encode_lower` went through two byte
    // arrays on the stack, read back cold (~18 data-cache misses per request under callgrind).
    const FIXED: u128 = 0xf << 76 | 0x3 << 62;
    const SET: u128 = 0x4 << 76 | 0x2 << 62;
    let id = rand::random::<u128>() & !FIXED | SET;
    let mut buf = [0u8; 32];
    for (i, digits) in buf.chunks_exact_mut(8).enumerate() {
        digits.copy_from_slice(&hex8((id >> (96 - 32 * i)) as u32));
    }
    let shared = Bytes::from_owner(buf);
    match (
        HeaderValue::from_maybe_shared(shared.clone()),
        ax::HeaderValue::from_maybe_shared(shared),
    ) {
        (Ok(upstream), Ok(client)) => (upstream, client),
        _ => (
            HeaderValue::from_static("unknown"),
            ax::HeaderValue::from_static("unknown"),
        ),
    }
}

/// `x` as eight lower-case hex digits, most significant first, worked out for all eight at once
/// in one `u64` (a digit a byte) instead of a table lookup per digit.
fn hex8(x: u32) -> [u8; 8] {
    const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    // Each nibble to a byte of its own, the least significant nibble in the lowest byte.
    let mut n = u64::from(x);
    n = (n | (n << 16)) & 0x0000_ffff_0000_ffff;
    n = (n | (n << 8)) & 0x00ff_00ff_00ff_00ff;
    n = (n | (n << 4)) & LOW;
    // 1 in each byte whose nibble is 10 or more (adding 6 carries it into bit 4).
    let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (n + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
}

pub(super) fn content_length(v: &ax::HeaderValue) -> Result<u64, ()> {
    let s = v.to_str().map_err(|_| ())?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    s.parse().map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::{hex8, new_request_id, routing_host, valid_host};

    #[test]
    fn a_new_request_id_is_a_random_uuid_in_both_values() {
        let (upstream, client) = new_request_id();
        let id = upstream.to_str().unwrap().to_owned();
        assert_eq!(client.to_str().unwrap(), id);
        let parsed = uuid::Uuid::try_parse(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 4, "{id}");
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
        assert_eq!(parsed.simple().to_string(), id);
        // Copies share the bytes and keep them after the first values are gone.
        let copies = (upstream.clone(), client.clone());
        drop((upstream, client));
        assert_eq!(copies.0.as_bytes(), id.as_bytes());
        assert_eq!(copies.1.as_bytes(), id.as_bytes());
        assert_ne!(new_request_id().0, copies.0);
    }

    #[test]
    fn hex_digits_are_written_most_significant_first_in_lower_case() {
        let mut x = 0x9e37_79b9_u32;
        for n in [
            0,
            9,
            10,
            15,
            16,
            0x0123_abcd,
            0xfedc_ba98,
            0xa0a0_a0a0,
            u32::MAX,
        ] {
            assert_eq!(hex8(n), *format!("{n:08x}").as_bytes(), "{n:#x}");
        }
        for _ in 0..10_000 {
            x = x.wrapping_mul(0x0019_660d).wrapping_add(0x3c6e_f35f);
            assert_eq!(hex8(x), *format!("{x:08x}").as_bytes(), "{x:#x}");
        }
    }

    #[test]
    fn every_bit_of_a_request_id_but_its_version_and_variant_is_random() {
        // Over 256 ids each free bit is 0 in one and 1 in another (a bit stuck by a wrong mask
        // would be seen; a random one stays the same in all with odds of 2^-255).
        let (mut any, mut all) = (0u128, u128::MAX);
        for _ in 0..256 {
            let (id, _) = new_request_id();
            let n = uuid::Uuid::try_parse(id.to_str().unwrap())
                .unwrap()
                .as_u128();
            any |= n;
            all &= n;
        }
        let version_and_variant = 0xf << 76 | 0x3 << 62;
        assert_eq!(
            any | version_and_variant,
            u128::MAX,
            "bits never set: {:032x}",
            !any
        );
        assert_eq!(all & !version_and_variant, 0, "bits always set: {all:032x}");
        assert_eq!(all >> 76 & 0xf, 4);
        assert_eq!(all >> 62 & 0x3, 2);
    }

    #[test]
    fn host_header_must_be_host_and_port() {
        for ok in [
            "example.com",
            "api.example.com:8443",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[2001:db8::1]",
            "xn--bcher-kva.example",
            "under_score.internal",
            "example.com:",
            "Example.COM.:443",
            "[2001:DB8::A]:8443",
            "a.",
            "example.com:65535",
            "example.com:0",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok} should be valid");
            // Checked and keyed in one pass, as the two steps do it.
            assert_eq!(
                routing_host(ok.as_bytes()).as_deref(),
                Some(&*crate::router::normalize_host(ok)),
                "{ok}"
            );
        }
        for bad in [
            "",
            "a b.com",
            "evil.com/path",
            "user@evil.com",
            "evil.com?x=1",
            "evil.com#frag",
            "a\\b.com",
            "example.com:80a",
            "example.com:123456",
            "example.com:65536",
            "example.com:99999",
            "[::1]:70000",
            ":80",
            "[::1",
            "[]:80",
            "[evil.com]",
            "example.com:80:90",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} should be refused");
            assert_eq!(routing_host(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
