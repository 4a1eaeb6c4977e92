//! The compiled routing table: host → method → path, built once per snapshot.
//!
//! Precedence, fixed and tested:
//! 1. host: an exact host's table, then wildcard hosts (`*.example.com`, longest suffix first),
//!    then routes without a host. A table that has no match for the request falls through to the
//!    next one.
//! 2. path, inside one table: exact path > `{param}` path > prefix; among prefixes the longest wins.
//!    Prefixes match on segment boundaries (`/api` matches `/api` and `/api/x`, never `/apix`).
//! 3. method: each method has its own table, so a route only ever competes with routes that
//!    accept the same method. Two routes that accept the same host + method + path conflict, and
//!    that is a compile error, not an ordering rule.
//!
//! Matching always runs on the normalised path ([`normalize_path`]), and the proxy forwards that
//! same normalised path, so what was authorised is what the upstream sees.

use std::borrow::Cow;
use std::collections::HashMap;

/// Index of a route in [`crate::snapshot::Snapshot::routes`].
pub type RouteId = usize;

/// Methods with a table of their own; any other method only matches routes without `methods`.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];
const METHOD_SLOTS: usize = METHODS.len() + 1;

/// Table slot of a method.
pub fn method_slot(method: &str) -> usize {
    METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len())
}

/// A host scope a route can be bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

/// The path a route matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathPattern {
    /// Exact path, possibly with `{param}` segments (matchit syntax).
    Exact(String),
    /// Segment-boundary prefix, without trailing slash (except `/`).
    Prefix(String),
}

#[derive(Default)]
struct MethodTable {
    paths: matchit::Router<RouteId>,
    /// Exact patterns by [`shape`], to name the route a new one conflicts with.
    shapes: HashMap<String, RouteId>,
    prefixes: HashMap<String, RouteId>,
}

struct Table {
    methods: Vec<MethodTable>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            methods: (0..METHOD_SLOTS).map(|_| MethodTable::default()).collect(),
        }
    }
}

/// A successful lookup.
pub struct RouteMatch<'r, 'p> {
    pub route: RouteId,
    /// `{param}` values of an exact-path route, in the order they appear.
    pub params: Option<matchit::Params<'r, 'p>>,
}

/// Why a route could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertError {
    /// Another route already serves this host + method + path.
    Conflict {
        existing: RouteId,
        method: &'static str,
    },
    /// The path pattern is not one the router accepts.
    InvalidPath(String),
}

#[derive(Default)]
pub struct Router {
    exact_hosts: HashMap<String, Table>,
    /// Sorted longest suffix first by [`Router::finish`].
    suffix_hosts: Vec<(String, Table)>,
    any_host: Table,
}

impl Router {
    /// Adds a route for the given method slots (`None`: every method but `TRACE` and `CONNECT`,
    /// which a route must list to receive).
    pub fn insert(
        &mut self,
        host: &HostPattern,
        path: &PathPattern,
        methods: Option<&[usize]>,
        id: RouteId,
    ) -> Result<(), InsertError> {
        let table = match host {
            HostPattern::Any => &mut self.any_host,
            HostPattern::Exact(h) => self.exact_hosts.entry(h.clone()).or_default(),
            HostPattern::Suffix(s) => match self.suffix_hosts.iter().position(|(k, _)| k == s) {
                Some(i) => &mut self.suffix_hosts[i].1,
                None => {
                    self.suffix_hosts.push((s.clone(), Table::default()));
                    let last = self.suffix_hosts.len() - 1;
                    &mut self.suffix_hosts[last].1
                }
            },
        };
        // A gateway has no business tunnelling (CONNECT) or echoing requests back with their
        // credentials (TRACE) unless a route asks for it: those get 405 elsewhere.
        let all: Vec<usize> = (0..METHOD_SLOTS)
            .filter(|&s| !matches!(METHODS.get(s), Some(&("TRACE" | "CONNECT"))))
            .collect();
        let slots = methods.unwrap_or(&all);
        // Check every slot first so that a conflict leaves the table untouched.
        for &slot in slots {
            let t = &table.methods[slot];
            let existing = match path {
                PathPattern::Exact(p) => t.shapes.get(&shape(p)).copied(),
                PathPattern::Prefix(p) => t.prefixes.get(p).copied(),
            };
            if let Some(existing) = existing {
                return Err(InsertError::Conflict {
                    existing,
                    method: METHODS.get(slot).copied().unwrap_or("other methods"),
                });
            }
        }
        for &slot in slots {
            let t = &mut table.methods[slot];
            match path {
                PathPattern::Exact(p) => {
                    t.paths.insert(p.as_str(), id).map_err(|e| match e {
                        matchit::InsertError::Conflict { with } => {
                            match t.shapes.get(&shape(&with)) {
                                Some(&existing) => InsertError::Conflict {
                                    existing,
                                    method: METHODS.get(slot).copied().unwrap_or("other methods"),
                                },
                                None => {
                                    InsertError::InvalidPath(format!("conflicts with `{with}`"))
                                }
                            }
                        }
                        other => InsertError::InvalidPath(other.to_string()),
                    })?;
                    t.shapes.insert(shape(p), id);
                }
                PathPattern::Prefix(p) => {
                    t.prefixes.insert(p.clone(), id);
                }
            }
        }
        Ok(())
    }

    /// Orders wildcard hosts longest suffix first. Call once after the last insert.
    pub fn finish(&mut self) {
        self.suffix_hosts
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    }

    /// Finds the route for a request. `host` must be lower-case without port; `path` normalised.
    pub fn lookup<'r, 'p>(
        &'r self,
        host: &str,
        method: &str,
        path: &'p str,
    ) -> Option<RouteMatch<'r, 'p>> {
        let slot = method_slot(method);
        self.tables_for(host)
            .find_map(|t| t.methods[slot].lookup(path))
    }

    /// Methods that would match this host and path: for a 405's `Allow` header.
    pub fn allowed_methods(&self, host: &str, path: &str) -> Vec<&'static str> {
        METHODS
            .iter()
            .enumerate()
            .filter(|(slot, _)| {
                self.tables_for(host)
                    .any(|t| t.methods[*slot].lookup(path).is_some())
            })
            .map(|(_, m)| *m)
            .collect()
    }

    fn tables_for<'r, 'h>(
        &'r self,
        host: &'h str,
    ) -> impl Iterator<Item = &'r Table> + use<'r, 'h> {
        let exact = self.exact_hosts.get(host);
        let suffixes = self
            .suffix_hosts
            .iter()
            .filter(move |(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
            .map(|(_, t)| t);
        exact
            .into_iter()
            .chain(suffixes)
            .chain(std::iter::once(&self.any_host))
    }
}

impl MethodTable {
    fn lookup<'r, 'p>(&'r self, path: &'p str) -> Option<RouteMatch<'r, 'p>> {
        if let Ok(m) = self.paths.at(path) {
            return Some(RouteMatch {
                route: *m.value,
                params: Some(m.params),
            });
        }
        if self.prefixes.is_empty() {
            return None;
        }
        let mut p = path;
        if p.len() > 1 && p.ends_with('/') {
            p = &p[..p.len() - 1];
        }
        loop {
            if let Some(&id) = self.prefixes.get(p) {
                return Some(RouteMatch {
                    route: id,
                    params: None,
                });
            }
            if p == "/" {
                return None;
            }
            p = match p.rfind('/') {
                Some(0) | None => "/",
                Some(i) => &p[..i],
            };
        }
    }
}

/// `/orders/{id}` → `/orders/{}`: the part of a pattern that decides conflicts.
pub fn shape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut in_param = false;
    for c in pattern.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push('{');
            }
            '}' => {
                in_param = false;
                out.push('}');
            }
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

/// What an escaped slash (`%2F`) in a request path means: gateway.toml
/// `[paths] escaped_slashes`, after Envoy's `path_with_escaped_slashes_action`.
///
/// The gateway sees `a%2Fb` as one segment; many upstreams decode it into two (Spring, Express
/// route params, Tomcat with encoded slashes allowed, nginx `proxy_pass` with a URI), so
/// `/public/..%2Fadmin` can match `/public` here and reach `/admin` there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// 400 for any path with `%2F`: the only choice that cannot disagree with an upstream.
    #[default]
    Reject,
    /// `%2F` stays inside its segment and is forwarded as `%2F` (APIs with slashes in ids,
    /// e.g. `/projects/group%2Fproject`); a segment with a `.` or `..` piece between escaped
    /// slashes (`..%2Fadmin`) is still refused, since an upstream that decodes it would climb.
    Keep,
    /// `%2F` is decoded to `/` before dot segments are resolved; the upstream gets the decoded,
    /// resolved path (`/public/..%2Fadmin` is routed and forwarded as `/admin`).
    Decode,
}

/// How request paths are normalised: the `[paths]` block of gateway.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathRules {
    pub escaped_slashes: EscapedSlashes,
}

/// Why a request path was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not an absolute path")]
    NotOriginForm,
    #[error("the path has an invalid percent-encoding")]
    BadEscape,
    #[error("the path contains an encoded NUL")]
    Nul,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("the path contains an escaped slash (%2F)")]
    EscapedSlash,
    #[error("the path hides a `.` or `..` segment behind an escaped slash")]
    EscapedDotSegment,
    #[error("the path has a `.` or `..` segment with parameters (`..;`)")]
    DotSegmentParams,
}

/// [`normalize_path_with`] under the default [`PathRules`].
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    normalize_path_with(path, PathRules::default())
}

/// Normalises a request path once, before matching:
/// * percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, once; other
///   escapes are kept, with upper-case hex (`%252e` stays `%252e`);
/// * an escaped slash (`%2F`) is refused, kept or decoded as [`EscapedSlashes`] says;
/// * `//` is merged, `.` segments dropped, `..` segments resolved (above the root: refused);
/// * `%00`, backslashes (raw or `%5C`), malformed escapes and dot segments with parameters
///   (`..;/`, `.;x/`, `..%3B/`, which Tomcat and Jetty read as `..`) are refused.
///
/// Returns the input unchanged (borrowed) when it is already normal, which is the common case.
pub fn normalize_path_with(path: &str, rules: PathRules) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let b = path.as_bytes();
    let needs_work =
        b.iter().any(|&c| c == b'%' || c == b'\\') || path.contains("//") || path.contains("/.");
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    // Decode pass.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            return Err(PathError::Backslash);
        }
        if c == b'%' {
            let hi = b.get(i + 1).and_then(|h| (*h as char).to_digit(16));
            let lo = b.get(i + 2).and_then(|h| (*h as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            let byte = (hi * 16 + lo) as u8;
            match byte {
                0 => return Err(PathError::Nul),
                b'\\' => return Err(PathError::Backslash),
                b'/' => match rules.escaped_slashes {
                    EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                    EscapedSlashes::Keep => decoded.push_str("%2F"),
                    EscapedSlashes::Decode => decoded.push('/'),
                },
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    decoded.push(byte as char)
                }
                _ => {
                    decoded.push('%');
                    decoded.push_str(&format!("{byte:02X}"));
                }
            }
            i += 3;
            continue;
        }
        // `path` is valid UTF-8 and we only split at ASCII bytes, so copy the char whole.
        let ch_len = utf8_len(c);
        decoded.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    // Segment pass.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s if dot_with_params(s) => return Err(PathError::DotSegmentParams),
            // Only `Keep` leaves escaped slashes in a segment.
            s if s.contains("%2F")
                && s.split("%2F")
                    .any(|piece| piece == "." || piece == ".." || dot_with_params(piece)) =>
            {
                return Err(PathError::EscapedDotSegment);
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// `..;x`, `.;`, `..%3B`: a dot segment followed by path parameters, which servlet containers
/// strip before resolving dot segments.
fn dot_with_params(seg: &str) -> bool {
    let rest = seg
        .strip_prefix("..")
        .or_else(|| seg.strip_prefix('.'))
        .unwrap_or(seg);
    rest.len() < seg.len() && (rest.starts_with(';') || rest.starts_with("%3B"))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Lower-cases a `Host` value and drops the port and a trailing dot.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let without_port = if host.starts_with('[') {
        // IPv6 literal: keep up to the closing bracket.
        host.find(']').map(|i| &host[..=i]).unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    let h = without_port.strip_suffix('.').unwrap_or(without_port);
    if h.bytes().any(|c| c.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests;
