//! CORS: preflights answered by the gateway, response headers for allowed origins.

use std::collections::HashSet;

use http::{HeaderName, HeaderValue};

/// Which origins are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    pub any: bool,
    pub exact: HashSet<String>,
    /// `https://*.example.com` stored as `("https", ".example.com")`: that scheme, and
    /// subdomains of any depth on any port.
    pub suffixes: Vec<(String, String)>,
}

impl Origins {
    /// Parses `https://app.example.com`, `https://*.example.com`, or `*`. A wildcard without a
    /// scheme (`*.example.com`) is `https://` only: a page served over plain HTTP can be changed
    /// by anyone on its path, so it is let in only when written out (`http://*.example.com`).
    pub fn parse(list: &[String]) -> Result<Origins, String> {
        let mut o = Origins::default();
        for entry in list {
            let e = entry.trim().to_ascii_lowercase();
            let wildcard = if let Some(rest) = e.strip_prefix("https://*.") {
                Some(("https", rest))
            } else if let Some(rest) = e.strip_prefix("http://*.") {
                Some(("http", rest))
            } else {
                e.strip_prefix("*.").map(|rest| ("https", rest))
            };
            if e == "*" {
                o.any = true;
            } else if let Some((scheme, rest)) = wildcard {
                if rest.is_empty() || rest.contains('*') || rest.contains('/') {
                    return Err(format!("`{entry}` is not a valid wildcard origin"));
                }
                o.suffixes.push((scheme.to_owned(), format!(".{rest}")));
            } else {
                let valid = (e.starts_with("https://") || e.starts_with("http://"))
                    && !e.contains('*')
                    && !e
                        .trim_start_matches("https://")
                        .trim_start_matches("http://")
                        .contains('/');
                if !valid {
                    return Err(format!(
                        "`{entry}` is not an origin; write e.g. \"https://app.example.com\""
                    ));
                }
                o.exact.insert(e);
            }
        }
        Ok(o)
    }

    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let o = origin.to_ascii_lowercase();
        if self.exact.contains(&o) {
            return true;
        }
        // An origin is `scheme://host[:port]`; anything else matches no wildcard.
        let Some((scheme, host)) = o.split_once("://") else {
            return false;
        };
        let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        self.suffixes.iter().any(|(sch, suffix)| {
            sch == scheme && host.len() > suffix.len() && host.ends_with(suffix.as_str())
        })
    }
}

/// A compiled CORS policy.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    pub origins: Origins,
    /// Upper-case method names allowed cross-origin; `["*"]`: any (never with credentials).
    pub methods: Vec<String>,
    /// Lower-case request headers allowed; `None` allows what the preflight asks for.
    pub headers: Option<Vec<String>>,
    pub expose: Option<HeaderValue>,
    pub credentials: bool,
    pub max_age: Option<HeaderValue>,
}

/// Why a preflight was refused (the answer is 403 without CORS headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Origin,
    Method,
    Header(String),
}

const ACAO: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ACAC: HeaderName = HeaderName::from_static("access-control-allow-credentials");

impl CorsPolicy {
    fn allow_origin(&self, origin: &str) -> Option<HeaderValue> {
        if !self.origins.allows(origin) {
            return None;
        }
        if self.origins.any && !self.credentials {
            return Some(HeaderValue::from_static("*"));
        }
        HeaderValue::from_str(origin).ok()
    }

    /// Headers answering a preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`), or why it is refused.
    pub fn preflight(
        &self,
        origin: &str,
        method: &str,
        request_headers: Option<&str>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Refused> {
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Err(Refused::Origin);
        };
        let any_method = self.methods.iter().any(|m| m == "*");
        if !any_method && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
            return Err(Refused::Method);
        }
        let asked: Vec<String> = request_headers
            .map(|h| {
                h.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(allowed) = &self.headers
            && let Some(bad) = asked.iter().find(|h| !allowed.contains(h))
        {
            return Err(Refused::Header(bad.clone()));
        }
        let mut out = vec![(ACAO, allow_origin)];
        // Any method: the one asked for, which a browser reads the same with or without
        // credentials.
        let methods = if any_method {
            HeaderValue::from_str(method)
        } else {
            HeaderValue::from_str(&self.methods.join(", "))
        };
        if let Ok(v) = methods {
            out.push((HeaderName::from_static("access-control-allow-methods"), v));
        }
        if !asked.is_empty()
            && let Ok(v) = HeaderValue::from_str(&asked.join(", "))
        {
            out.push((HeaderName::from_static("access-control-allow-headers"), v));
        }
        if self.credentials {
            out.push((ACAC, HeaderValue::from_static("true")));
        }
        if let Some(age) = &self.max_age {
            out.push((
                HeaderName::from_static("access-control-max-age"),
                age.clone(),
            ));
        }
        out.push((
            http::header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        ));
        Ok(out)
    }

    /// Headers for the response to an actual cross-origin request; empty for a disallowed
    /// origin (the browser then blocks the response).
    pub fn response_headers(&self, origin: &str) -> Vec<(HeaderName, HeaderValue)> {
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Vec::new();
        };
        let mut out = vec![(ACAO, allow_origin)];
        if self.credentials {
            out.push((ACAC, HeaderValue::from_static("true")));
        }
        if let Some(expose) = &self.expose {
            out.push((
                HeaderName::from_static("access-control-expose-headers"),
                expose.clone(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> CorsPolicy {
        CorsPolicy {
            origins: Origins::parse(&origins.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap(),
            methods: vec!["GET".into(), "POST".into()],
            headers: Some(vec!["content-type".into(), "authorization".into()]),
            expose: Some(HeaderValue::from_static("x-request-id")),
            credentials,
            max_age: Some(HeaderValue::from_static("600")),
        }
    }

    fn get<'a>(h: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a str> {
        h.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn origins_exact_wildcard_and_any() {
        let o =
            Origins::parse(&["https://app.example.com".into(), "*.example.org".into()]).unwrap();
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!o.allows("https://evil.com"));
        assert!(!o.allows("https://app.example.com.evil.com"));
        assert!(o.allows("https://a.example.org"));
        assert!(o.allows("https://a.b.example.org:8443"));
        assert!(!o.allows("https://example.org"));
        assert!(!o.allows("https://notexample.org"));
        // A wildcard keeps its scheme; one written without is https only.
        assert!(!o.allows("http://a.example.org"));
        assert!(!o.allows("ftp://a.example.org"));
        assert!(!o.allows("a.example.org"));
        let plain = Origins::parse(&["http://*.example.org".into()]).unwrap();
        assert!(plain.allows("http://a.example.org"));
        assert!(!plain.allows("https://a.example.org"));
        assert!(Origins::parse(&["example.com".into()]).is_err());
        assert!(Origins::parse(&["https://a.com/path".into()]).is_err());
    }

    #[test]
    fn preflight_allowed_and_refused() {
        let p = policy(&["https://app.example.com"], true);
        let h = p
            .preflight("https://app.example.com", "POST", Some("Content-Type"))
            .unwrap();
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get(&h, "access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            get(&h, "access-control-allow-headers"),
            Some("content-type")
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(get(&h, "access-control-max-age"), Some("600"));
        assert_eq!(
            p.preflight("https://evil.com", "POST", None),
            Err(Refused::Origin)
        );
        assert_eq!(
            p.preflight("https://app.example.com", "DELETE", None),
            Err(Refused::Method)
        );
        assert_eq!(
            p.preflight("https://app.example.com", "GET", Some("x-evil")),
            Err(Refused::Header("x-evil".into()))
        );
    }

    #[test]
    fn any_origin_without_credentials_is_a_star() {
        let p = policy(&["*"], false);
        let h = p.response_headers("https://whoever.net");
        assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            get(&h, "access-control-expose-headers"),
            Some("x-request-id")
        );
        assert!(
            policy(&["https://a.com"], false)
                .response_headers("https://b.com")
                .is_empty()
        );
    }
}
