//! Rewriting the URLs an upstream puts in its response headers (`Location`, `Content-Location`,
//! `Refresh`) so that they name the gateway, not the upstream: what nginx's
//! `proxy_redirect default` does.
//!
//! An absolute URL whose origin (`scheme://host:port`) is one of the route's upstream's targets,
//! or the route's fixed `host_rewrite` (the name the upstream was told it has), gets the
//! client's scheme and `Host` instead; and when its path starts where the route's path rewrite
//! puts requests (`add_prefix`, or `/` after a `strip_prefix`), that rewrite is undone, so the
//! client is sent back into the same route. Relative URLs and URLs naming other hosts are left
//! as they are. Only a response that carries one of these headers pays anything.
//!
//! This module owns only the text of the rewrite; the handler decides which fields and when.

use crate::snapshot::PathRewrite;
use crate::upstream::Target;

/// Which header a value came from: `Refresh` carries its URL after a delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `Location` or `Content-Location`: the value is the URL.
    Url,
    /// `Refresh: 5; url=...`, read as browsers read it ([`split_refresh`]).
    Refresh,
}

/// What the rewrite needs to know about the exchange.
pub struct Context<'a> {
    /// The route's upstream's targets.
    pub targets: &'a [Target],
    /// The route's `host_rewrite`: the upstream may name itself by it.
    pub fixed_host: Option<&'a [u8]>,
    pub path: Option<&'a PathRewrite>,
    /// `http` or `https`, as the client reached the gateway.
    pub client_scheme: &'a str,
    /// The client's `Host` (or `:authority`), as sent.
    pub client_host: &'a [u8],
}

/// The header's new value, or `None` to keep it as it is.
pub fn rewrite(field: Field, value: &[u8], cx: &Context<'_>) -> Option<Vec<u8>> {
    let (before, url, closing) = match field {
        Field::Url => (&value[..0], value, &value[..0]),
        Field::Refresh => split_refresh(value)?,
    };
    let (scheme, rest) = split_scheme(url)?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !names_upstream(scheme, authority, cx) || cx.client_host.is_empty() {
        return None;
    }
    let path_end = tail
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(tail.len());
    let (path, after) = tail.split_at(path_end);
    let client_path = std::str::from_utf8(path)
        .ok()
        .and_then(|p| cx.path.and_then(|r| unrewrite(r, p)));
    let mut out = Vec::with_capacity(value.len() + cx.client_host.len() + 16);
    out.extend_from_slice(before);
    out.extend_from_slice(cx.client_scheme.as_bytes());
    out.extend_from_slice(b"://");
    out.extend_from_slice(cx.client_host);
    match &client_path {
        Some(p) => out.extend_from_slice(p.as_bytes()),
        None => out.extend_from_slice(path),
    }
    out.extend_from_slice(after);
    out.extend_from_slice(closing);
    Some(out)
}

/// `Refresh`, read as browsers read it (the HTML standard's "shared declarative refresh
/// steps"): a delay (digits and dots), then `;`, `,` or white space, then the URL, which may
/// follow `url` (any case) and `=` with white space around it, and may be quoted (up to the
/// closing quote, if any): `5; URL = 'http://a/'`, `0,url=http://a/`, `5 http://a/`. What comes
/// before the URL, the URL, and what follows it. `None` when there is no URL.
fn split_refresh(value: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let space = |i: usize| matches!(value.get(i), Some(b' ' | b'\t' | b'\n' | b'\x0c' | b'\r'));
    let skip_space = |mut i: usize| {
        while space(i) {
            i += 1;
        }
        i
    };
    let mut i = skip_space(0);
    let digits = value[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 && value.get(i) != Some(&b'.') {
        return None;
    }
    i += value[i..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'.')
        .count();
    if !(space(i) || matches!(value.get(i), Some(b';' | b','))) {
        return None;
    }
    i = skip_space(i);
    if matches!(value.get(i), Some(b';' | b',')) {
        i = skip_space(i + 1);
    }
    let mut start = i;
    if value
        .get(i..i + 3)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"url"))
    {
        let eq = skip_space(i + 3);
        if value.get(eq) == Some(&b'=') {
            start = skip_space(eq + 1);
        }
    }
    let quote = value.get(start).filter(|q| matches!(q, b'"' | b'\''));
    if quote.is_some() {
        start += 1;
    }
    let end = quote
        .and_then(|q| value[start..].iter().position(|b| b == q))
        .map_or(value.len(), |n| start + n);
    if start >= end {
        return None;
    }
    Some((&value[..start], &value[start..end], &value[end..]))
}

/// `http://` or `https://` (any case): the lower-case scheme and what follows `//`.
fn split_scheme(url: &[u8]) -> Option<(&'static str, &[u8])> {
    for scheme in ["http", "https"] {
        if url.len() > scheme.len() + 3
            && url[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
            && &url[scheme.len()..scheme.len() + 3] == b"://"
        {
            return Some((scheme, &url[scheme.len() + 3..]));
        }
    }
    None
}

/// Whether `scheme://authority` is the origin of one of the upstream's targets, or the route's
/// fixed upstream `Host` on one of their schemes.
fn names_upstream(scheme: &str, authority: &[u8], cx: &Context<'_>) -> bool {
    // Userinfo (`user@host`) is never part of an origin a target has.
    if authority.contains(&b'@') {
        return false;
    }
    let Some((host, port)) = host_port(authority, scheme) else {
        return false;
    };
    // The route's fixed `Host`, on any target's scheme; parsed once, not per target.
    let fixed = cx
        .fixed_host
        .and_then(|f| host_port(f, scheme))
        .is_some_and(|(fh, fp)| fh.eq_ignore_ascii_case(host) && fp == port);
    cx.targets.iter().any(|t| {
        t.scheme.as_str() == scheme
            && (fixed
                || (host.eq_ignore_ascii_case(t.authority.host().as_bytes())
                    && port == t.authority.port_u16().unwrap_or(default_port(scheme))))
    })
}

/// The port a URL of `scheme` names when it writes none.
fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// An authority's host (IPv6 literals with their brackets) and port (the scheme's default when
/// none is written).
fn host_port<'a>(authority: &'a [u8], scheme: &str) -> Option<(&'a [u8], u16)> {
    let default = default_port(scheme);
    let colon = match authority.iter().rposition(|b| *b == b':') {
        Some(i) if !authority[i..].contains(&b']') => Some(i),
        _ => None,
    };
    let Some(i) = colon else {
        return (!authority.is_empty()).then_some((authority, default));
    };
    let port = &authority[i + 1..];
    let port = if port.is_empty() {
        default
    } else {
        std::str::from_utf8(port).ok()?.parse().ok()?
    };
    Some((&authority[..i], port))
}

/// The client's path for an upstream path the route's rewrite could have made: `add_prefix`
/// taken off and `strip_prefix` put back. `None` when the path is not under the rewritten
/// prefix, or the route rewrites by template (no way back from it).
fn unrewrite(r: &PathRewrite, path: &str) -> Option<String> {
    if r.template.is_some() || r.is_identity() {
        return None;
    }
    let rest = match &r.add_prefix {
        Some(added) => crate::snapshot::strip_segment_prefix(path, added)?,
        None if path.starts_with('/') => path,
        None => return None,
    };
    let stripped = r
        .strip_prefix
        .as_deref()
        .map_or("", |p| p.strip_suffix('/').unwrap_or(p));
    let rest = if rest.is_empty() { "/" } else { rest };
    if stripped.is_empty() {
        return Some(rest.to_owned());
    }
    Some(format!("{stripped}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(field: Field, value: &str, path: Option<&PathRewrite>, fixed: Option<&str>) -> String {
        let targets = [
            Target::for_tests("http://10.0.0.5:8080", 1),
            Target::for_tests("http://10.0.0.6", 1),
        ];
        let cx = Context {
            targets: &targets,
            fixed_host: fixed.map(str::as_bytes),
            path,
            client_scheme: "https",
            client_host: b"api.example.com",
        };
        match rewrite(field, value.as_bytes(), &cx) {
            Some(v) => String::from_utf8(v).unwrap(),
            None => value.to_owned(),
        }
    }

    fn strip_add(strip: Option<&str>, add: Option<&str>) -> PathRewrite {
        PathRewrite {
            strip_prefix: strip.map(Into::into),
            add_prefix: add.map(Into::into),
            template: None,
        }
    }

    #[test]
    fn a_url_naming_a_target_gets_the_clients_origin() {
        let url = |v| run(Field::Url, v, None, None);
        assert_eq!(
            url("http://10.0.0.5:8080/app/login?next=%2F#top"),
            "https://api.example.com/app/login?next=%2F#top"
        );
        assert_eq!(url("HTTP://10.0.0.5:8080"), "https://api.example.com");
        // The second target, on the scheme's default port written or not.
        assert_eq!(url("http://10.0.0.6/x"), "https://api.example.com/x");
        assert_eq!(url("http://10.0.0.6:80/x"), "https://api.example.com/x");
        // Others are left alone.
        for kept in [
            "/app/login",
            "app/login",
            "//10.0.0.5:8080/x",
            "http://10.0.0.5:8081/x",
            "https://10.0.0.5:8080/x",
            "http://example.org/x",
            "http://user@10.0.0.5:8080/x",
            "http://10.0.0.50:8080/x",
        ] {
            assert_eq!(url(kept), kept);
        }
    }

    #[test]
    fn the_routes_prefix_rewrite_is_undone_when_the_path_is_under_it() {
        let strip = strip_add(Some("/app"), None);
        let both = strip_add(Some("/shop/"), Some("/v2"));
        let add = strip_add(None, Some("/v2"));
        let url = |v, r| run(Field::Url, v, Some(r), None);
        let to = |p: &str| format!("https://api.example.com{p}");
        assert_eq!(url("http://10.0.0.5:8080/login", &strip), to("/app/login"));
        assert_eq!(url("http://10.0.0.5:8080/", &strip), to("/app/"));
        assert_eq!(
            url("http://10.0.0.5:8080/v2/cart?x=1", &both),
            to("/shop/cart?x=1")
        );
        assert_eq!(url("http://10.0.0.5:8080/v2", &both), to("/shop/"));
        assert_eq!(url("http://10.0.0.5:8080/v2/cart", &add), to("/cart"));
        // Not under the added prefix: only the origin changes.
        assert_eq!(url("http://10.0.0.5:8080/v22/cart", &both), to("/v22/cart"));
        assert_eq!(url("http://10.0.0.5:8080/other", &add), to("/other"));
        // A template has no way back.
        let template = PathRewrite {
            template: Some(vec![crate::snapshot::TemplatePart::Literal("/v2/x".into())]),
            ..PathRewrite::default()
        };
        assert_eq!(url("http://10.0.0.5:8080/v2/x", &template), to("/v2/x"));
    }

    #[test]
    fn refresh_and_the_fixed_host_are_rewritten_too() {
        assert_eq!(
            run(Field::Refresh, "5; URL=http://10.0.0.6/next", None, None),
            "5; URL=https://api.example.com/next"
        );
        assert_eq!(
            run(Field::Refresh, "0;url='http://10.0.0.6/n'", None, None),
            "0;url='https://api.example.com/n'"
        );
        assert_eq!(run(Field::Refresh, "5", None, None), "5");
        // As browsers read it: `url` in any case, white space around `=`, `,` or white space
        // after the delay, no `url=` at all, a fractional delay, text after a closing quote.
        for (value, rewritten) in [
            (
                "5; URL = http://10.0.0.6/next",
                "5; URL = https://api.example.com/next",
            ),
            ("5;Url=http://10.0.0.6/", "5;Url=https://api.example.com/"),
            ("0,url=http://10.0.0.6/", "0,url=https://api.example.com/"),
            (
                "5 url\t=\thttp://10.0.0.6/",
                "5 url\t=\thttps://api.example.com/",
            ),
            ("5; http://10.0.0.6/n", "5; https://api.example.com/n"),
            (
                " 1.5 ; uRL= \"http://10.0.0.6\" x",
                " 1.5 ; uRL= \"https://api.example.com\" x",
            ),
            (
                ".5;url='http://10.0.0.6/a'",
                ".5;url='https://api.example.com/a'",
            ),
        ] {
            assert_eq!(run(Field::Refresh, value, None, None), rewritten, "{value}");
        }
        // Not a refresh to the upstream, as browsers read them.
        for kept in [
            "x; url=http://10.0.0.6/",
            "5x; url=http://10.0.0.6/",
            "5; urlx=http://10.0.0.6/",
            "5; url=",
            "5; url=''",
        ] {
            assert_eq!(run(Field::Refresh, kept, None, None), kept);
        }
        let fixed = Some("internal.svc");
        assert_eq!(
            run(Field::Url, "http://internal.svc/a", None, fixed),
            "https://api.example.com/a"
        );
        assert_eq!(
            run(Field::Url, "http://internal.svc:81/a", None, fixed),
            "http://internal.svc:81/a"
        );
    }
}
