//! Where a request carries its token, and how the token is taken out again.
//!
//! A token is looked for in every place a client could put one (`Authorization`, the provider's
//! header, query parameter or cookie, and `access_token` in the query). Two tokens, or one
//! place given twice, are refused: which copy would the upstream believe? When the provider
//! does not forward the token, it is removed from the one place it was found in, whichever
//! that was, so the upstream never sees an unverified copy next to the verified request.

use http::HeaderName;

use super::{AuthError, JwtProvider, TokenSource};

/// The query parameter a bearer or header provider also reads (RFC 6750 §2.3).
pub const DEFAULT_QUERY_PARAM: &str = "access_token";

/// Where a request's token was found; what is removed when the token is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPlace {
    /// `Authorization: Bearer <token>`.
    Authorization,
    /// The provider's own header (`token = "header:<name>"`).
    Header(HeaderName),
    /// A query parameter of this name.
    Query(String),
    /// A cookie of this name.
    Cookie(String),
}

/// The parts of a request a token can be in, read from the client's headers.
#[derive(Debug, Default)]
pub struct TokenPlaces<'a> {
    authorization: Vec<&'a [u8]>,
    header: Vec<&'a [u8]>,
    query: Option<&'a str>,
    cookies: Vec<&'a [u8]>,
}

impl<'a> TokenPlaces<'a> {
    /// Collects what `provider` may read from the client's headers (lower-case names, raw
    /// values) and query. Pass only the headers the gateway keeps (see
    /// `proxy::headers::Inbound`).
    pub fn collect(
        provider: &JwtProvider,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        query: Option<&'a str>,
    ) -> Self {
        let mut out = TokenPlaces {
            query,
            ..TokenPlaces::default()
        };
        let named = match &provider.source {
            TokenSource::Header(h) => Some(h.as_str()),
            _ => None,
        };
        for (name, value) in headers {
            match name {
                "authorization" => out.authorization.push(value),
                "cookie" => out.cookies.push(value),
                n if Some(n) == named => out.header.push(value),
                _ => {}
            }
        }
        out
    }
}

/// The bytes of `s` with `%XX` escapes decoded, for comparing query parameter names: an
/// upstream framework decodes `access%5Ftoken` to `access_token`, so the gateway must too.
fn decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The values of every `name=` parameter in `query`, in order.
fn query_params<'q>(query: &'q str, name: &str) -> Vec<&'q str> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decoded(k) == name.as_bytes()).then_some(v)
        })
        .collect()
}

/// `query` without any `name=` parameter; `None` when nothing is left.
pub fn without_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| decoded(kv.split_once('=').map_or(*kv, |(k, _)| k)) != name.as_bytes())
        .collect();
    let joined = kept.join("&");
    (!joined.is_empty()).then_some(joined)
}

/// The values of every `name` cookie in one `Cookie` header value, in order.
fn cookies<'c>(header: &'c str, name: &str) -> impl Iterator<Item = &'c str> {
    header.split(';').filter_map(move |c| {
        let (k, v) = c.trim().split_once('=')?;
        (k.trim() == name).then_some(v.trim())
    })
}

/// The first `name` cookie in a `Cookie` header value (for consistent hashing).
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    cookies(header, name).next()
}

/// One `Cookie` header value without any `name` cookie; `None` when nothing is left.
pub fn without_cookie(header: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(k, _)| k.trim() != name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's case does not matter
/// (RFC 9110 §11.1). `None` for another scheme.
fn bearer(value: &str) -> Option<&str> {
    // Cut at ASCII bytes: still text.
    crate::util::bearer(value.as_bytes()).and_then(|t| std::str::from_utf8(t).ok())
}

fn text(v: &[u8]) -> &str {
    // A value that is not text cannot be a token; "" fails verification as malformed.
    std::str::from_utf8(v).unwrap_or("")
}

impl JwtProvider {
    /// Finds the token and where it was. Tokens in several places at once are refused (401);
    /// one place given twice (two `Authorization` headers, `access_token` twice in the query,
    /// two cookies of the name) is refused as a bad request (400).
    pub fn token<'a>(
        &self,
        places: &TokenPlaces<'a>,
    ) -> Result<Option<(&'a str, TokenPlace)>, AuthError> {
        let mut found: Vec<(&'a str, TokenPlace)> = Vec::new();
        let one = |values: &[&'a str]| -> Result<Option<&'a str>, AuthError> {
            match values {
                [] => Ok(None),
                [v] => Ok(Some(*v)),
                _ => Err(AuthError::Duplicate),
            }
        };
        // Every Authorization header counts, not only bearer ones: two of them are never
        // valid, and which one an upstream reads is anyone's guess.
        let auth: Vec<&str> = places.authorization.iter().copied().map(text).collect();
        if let Some(a) = one(&auth)?
            && let Some(t) = bearer(a)
        {
            found.push((t, TokenPlace::Authorization));
        }
        if let TokenSource::Header(h) = &self.source {
            let values: Vec<&str> = places.header.iter().copied().map(text).collect();
            if let Some(t) = one(&values)? {
                found.push((t.trim(), TokenPlace::Header(h.clone())));
            }
        }
        // `access_token` always (RFC 6750 §2.3), and a query provider's own parameter too: a
        // token there would otherwise reach the upstream unverified next to the verified one.
        let own = match &self.source {
            TokenSource::Query(n) if n != DEFAULT_QUERY_PARAM => Some(n.as_str()),
            _ => None,
        };
        if let Some(q) = places.query {
            for param in std::iter::once(DEFAULT_QUERY_PARAM).chain(own) {
                if let Some(t) = one(&query_params(q, param))? {
                    found.push((t, TokenPlace::Query(param.to_owned())));
                }
            }
        }
        if let TokenSource::Cookie(n) = &self.source {
            let values: Vec<&str> = places
                .cookies
                .iter()
                .flat_map(|v| cookies(text(v), n))
                .collect();
            if let Some(t) = one(&values)? {
                found.push((t, TokenPlace::Cookie(n.clone())));
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(AuthError::Ambiguous),
        }
    }

    /// Where the token must be removed before forwarding: `None` when the provider forwards it.
    pub fn removal(&self, found: TokenPlace) -> Option<TokenPlace> {
        (!self.forward_token).then_some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_are_compared_decoded() {
        assert_eq!(
            query_params("a=1&access%5Ftoken=x&access_token=y", "access_token"),
            vec!["x", "y"]
        );
        assert_eq!(
            without_query_param("a=1&access%5ftoken=x&b=2", "access_token").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(without_query_param("access_token=x", "access_token"), None);
        assert_eq!(decoded("%zz%4"), b"%zz%4");
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        assert_eq!(bearer("Bearer a.b.c"), Some("a.b.c"));
        assert_eq!(bearer("BEARER  a.b.c "), Some("a.b.c"));
        assert_eq!(bearer("bEaReR\ta.b.c"), Some("a.b.c"));
        assert_eq!(bearer("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearerx a.b.c"), None);
    }

    #[test]
    fn cookies_are_removed_by_name_only() {
        assert_eq!(
            without_cookie("a=1; jwt=t; jwtx=2", "jwt").as_deref(),
            Some("a=1; jwtx=2")
        );
        assert_eq!(without_cookie(" jwt=t ", "jwt"), None);
        assert_eq!(cookie("a=1; jwt=t", "jwt"), Some("t"));
    }
}
