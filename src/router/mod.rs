//! The compiled routing table: host → method → path, built once per snapshot.
//!
//! Precedence, fixed and tested:
//! 1. host: an exact host's table, then wildcard hosts (`*.example.com`, longest suffix first),
//!    then routes without a host. A table that has no match for the request falls through to the
//!    next one.
//! 2. path, inside one table: exact path > `{param}` path > prefix; among prefixes the longest wins.
//!    Prefixes match on segment boundaries (`/api` matches `/api` and `/api/x`, never `/apix`).
//! 3. method: each method is matched as if it had a table of its own, so a route only ever
//!    competes with routes that accept the same method. Two routes that accept the same host +
//!    method + path conflict, and that is a compile error, not an ordering rule.
//!
//! Matching always runs on the normalised path ([`normalize_path`]), and the proxy forwards that
//! same normalised path, so what was authorised is what the upstream sees.
//!
//! Layout, chosen so that a table of 100,000 routes stays small and quick to build: each path is
//! stored once per host with the route of every method beside it (`Slots`). Exact paths without
//! parameters and prefixes are hash lookups; `{param}` patterns go to `matchit` radix trees, one
//! per group of methods that received the same patterns (usually two or three trees, not one per
//! method). A path that equals an exact path wins over every `{param}` pattern, as it does inside
//! one `matchit` tree, which tries static segments first and backtracks.

use std::borrow::Cow;
use std::collections::HashMap;

/// Index of a route in [`crate::snapshot::Snapshot::routes`].
pub type RouteId = usize;

/// Methods with a table of their own; any other method only matches routes without `methods`.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];
const METHOD_SLOTS: usize = METHODS.len() + 1;

/// The methods a route may list, in any case, as an ECMA-262 regular expression for the JSON
/// Schema (the compiler upper-cases a route's methods and looks them up in [`METHODS`]).
pub fn methods_pattern() -> String {
    let any_case = |m: &str| -> String {
        m.chars()
            .map(|c| format!("[{c}{}]", c.to_ascii_lowercase()))
            .collect()
    };
    let methods: Vec<String> = METHODS.iter().map(|m| any_case(m)).collect();
    format!("^({})$", methods.join("|"))
}

/// Table slot of a method.
pub fn method_slot(method: &str) -> usize {
    METHODS
        .iter()
        .position(|m| *m == method)
        // `trace` and `connect` are other methods to HTTP, but many servers upper-case the
        // method they get: those two in any case have TRACE's and CONNECT's slots (405 unless
        // a route lists them).
        .or_else(|| (TRACE_SLOT..METHODS.len()).find(|&s| METHODS[s].eq_ignore_ascii_case(method)))
        .unwrap_or(METHODS.len())
}

/// The slot of `TRACE`; `CONNECT`'s follows.
const TRACE_SLOT: usize = 7;

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

/// Hashing for the router's maps. Their keys come from the config, not from requests, so there is
/// nothing for a client to flood; foldhash hashes a short path several times faster than SipHash.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A set of method slots, bit `i` for slot `i`.
type SlotMask = u16;

/// The route of each method slot for one path. Route ids are kept as `u32` to keep this small.
#[derive(Clone, Copy)]
struct Slots([u32; METHOD_SLOTS]);

const NO_ROUTE: u32 = u32::MAX;

impl Slots {
    const EMPTY: Slots = Slots([NO_ROUTE; METHOD_SLOTS]);

    fn get(&self, slot: usize) -> Option<RouteId> {
        match self.0[slot] {
            NO_ROUTE => None,
            id => Some(id as RouteId),
        }
    }
}

/// `{param}` patterns for a group of method slots that received exactly the same patterns.
#[derive(Clone)]
struct ParamTree {
    slots: SlotMask,
    paths: matchit::Router<u32>,
    /// Patterns inserted; an empty tree is not searched.
    len: usize,
}

/// The routes of one host scope.
#[derive(Default)]
struct Table {
    /// Exact paths without `{param}` segments.
    exact: Map<Box<str>, Slots>,
    /// Trees of `{param}` patterns; every method slot is in at most one tree's `slots`.
    trees: Vec<ParamTree>,
    /// Segment-boundary prefixes, without trailing slash (except `/`).
    prefixes: Map<Box<str>, Slots>,
    /// `{param}` patterns by [`shape`], to find the route a new one conflicts with. Only needed
    /// while the table is built: [`Router::finish`] drops it.
    shapes: Map<Box<str>, Slots>,
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
    exact_hosts: Map<Box<str>, Table>,
    /// Wildcard hosts by suffix (`.example.com`): a host's suffixes are looked up from the
    /// longest down, one per label.
    suffix_hosts: Map<Box<str>, Table>,
    any_host: Table,
}

/// Slots a route without `methods` accepts, in order: every method but `TRACE` and `CONNECT`.
/// A gateway has no business tunnelling (CONNECT) or echoing requests back with their
/// credentials (TRACE) unless a route asks for it: those get 405 elsewhere.
const DEFAULT_SLOTS: [usize; METHOD_SLOTS - 2] = [0, 1, 2, 3, 4, 5, 6, 9];

fn method_name(slot: usize) -> &'static str {
    METHODS.get(slot).copied().unwrap_or("other methods")
}

/// The first of `slots` that already has a route in `taken`, with that route.
fn first_taken(taken: &Slots, slots: &[usize]) -> Option<(RouteId, usize)> {
    slots
        .iter()
        .find_map(|&slot| taken.get(slot).map(|id| (id, slot)))
}

/// Which map of a [`Table`] a path goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    Param,
    Prefix,
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
        let id = u32::try_from(id)
            .ok()
            .filter(|&id| id != NO_ROUTE)
            .ok_or_else(|| InsertError::InvalidPath("too many routes".into()))?;
        let slots = methods.unwrap_or(&DEFAULT_SLOTS);
        if slots.iter().any(|&s| s >= METHOD_SLOTS) {
            return Err(InsertError::InvalidPath("unknown method slot".into()));
        }
        let table = match host {
            HostPattern::Any => &mut self.any_host,
            HostPattern::Exact(h) => self.exact_hosts.entry(h.as_str().into()).or_default(),
            HostPattern::Suffix(s) => self.suffix_hosts.entry(s.as_str().into()).or_default(),
        };
        table.insert(path, slots, id)
    }

    /// Frees what was only needed to detect conflicts. Call once, after the last insert.
    pub fn finish(&mut self) {
        for t in self
            .exact_hosts
            .values_mut()
            .chain(self.suffix_hosts.values_mut())
            .chain(std::iter::once(&mut self.any_host))
        {
            t.shapes = Map::default();
            t.exact.shrink_to_fit();
            t.prefixes.shrink_to_fit();
        }
        self.exact_hosts.shrink_to_fit();
        self.suffix_hosts.shrink_to_fit();
    }

    /// Finds the route for a request. `host` must be lower-case without port; `path` normalised.
    pub fn lookup<'r, 'p>(
        &'r self,
        host: &str,
        method: &str,
        path: &'p str,
    ) -> Option<RouteMatch<'r, 'p>> {
        let slot = method_slot(method);
        self.tables_for(host).find_map(|t| t.lookup(slot, path))
    }

    /// Methods that would match this host and path: for a 405's `Allow` header.
    pub fn allowed_methods(&self, host: &str, path: &str) -> Vec<&'static str> {
        METHODS
            .iter()
            .enumerate()
            .filter(|(slot, _)| {
                self.tables_for(host)
                    .any(|t| t.lookup(*slot, path).is_some())
            })
            .map(|(_, m)| *m)
            .collect()
    }

    /// The tables that may hold a route for `host`, in precedence order.
    fn tables_for<'r, 'h>(
        &'r self,
        host: &'h str,
    ) -> impl Iterator<Item = &'r Table> + use<'r, 'h> {
        let exact = self.exact_hosts.get(host);
        // `.example.com` matches `a.example.com` and `a.b.example.com`, never `example.com`:
        // the suffixes of `host` that start at a dot after its first character, longest first.
        let suffixes = (!self.suffix_hosts.is_empty())
            .then(|| {
                host.char_indices()
                    .skip(1)
                    .filter(|&(_, c)| c == '.')
                    .filter_map(|(i, _)| self.suffix_hosts.get(&host[i..]))
            })
            .into_iter()
            .flatten();
        exact
            .into_iter()
            .chain(suffixes)
            .chain(std::iter::once(&self.any_host))
    }
}

impl Table {
    /// Adds `path` for `slots` (conflicts are reported for the first slot in this order).
    fn insert(&mut self, path: &PathPattern, slots: &[usize], id: u32) -> Result<(), InsertError> {
        let mask = slots.iter().fold(0, |m, &s| m | (1 << s));
        let (kind, key): (Kind, Box<str>) = match path {
            PathPattern::Prefix(p) => (Kind::Prefix, p.as_str().into()),
            PathPattern::Exact(p) if !p.contains(['{', '}']) => (Kind::Exact, p.as_str().into()),
            PathPattern::Exact(p) => (Kind::Param, shape(p).into()),
        };
        // Check first, so that a conflict leaves the table untouched.
        if let Some((existing, slot)) = self
            .map(kind)
            .get(&key)
            .and_then(|taken| first_taken(taken, slots))
        {
            return Err(InsertError::Conflict {
                existing,
                method: method_name(slot),
            });
        }
        if let PathPattern::Exact(p) = path
            && kind == Kind::Param
        {
            self.insert_param(p, slots, mask, id)?;
        }
        let entry = self.map_mut(kind).entry(key).or_insert(Slots::EMPTY);
        for &slot in slots {
            entry.0[slot] = id;
        }
        Ok(())
    }

    fn map(&self, kind: Kind) -> &Map<Box<str>, Slots> {
        match kind {
            Kind::Exact => &self.exact,
            Kind::Param => &self.shapes,
            Kind::Prefix => &self.prefixes,
        }
    }

    fn map_mut(&mut self, kind: Kind) -> &mut Map<Box<str>, Slots> {
        match kind {
            Kind::Exact => &mut self.exact,
            Kind::Param => &mut self.shapes,
            Kind::Prefix => &mut self.prefixes,
        }
    }

    /// Adds a `{param}` pattern to the trees of `mask`'s slots, first splitting off the slots of
    /// a tree that `mask` covers only in part (the split-off tree starts as a copy).
    fn insert_param(
        &mut self,
        pattern: &str,
        slots: &[usize],
        mask: SlotMask,
        id: u32,
    ) -> Result<(), InsertError> {
        if self.trees.is_empty() {
            self.trees.push(ParamTree {
                slots: (1 << METHOD_SLOTS) - 1,
                paths: matchit::Router::new(),
                len: 0,
            });
        }
        // Bounded: a tree is split at most once per method slot.
        for i in 0..self.trees.len() {
            let inside = self.trees[i].slots & mask;
            if inside == 0 {
                continue;
            }
            let tree = if inside == self.trees[i].slots {
                i
            } else {
                let mut split = self.trees[i].clone();
                split.slots = inside;
                self.trees[i].slots &= !inside;
                self.trees.push(split);
                self.trees.len() - 1
            };
            let inserted = self.trees[tree].paths.insert(pattern, id);
            if let Err(e) = inserted {
                return Err(match e {
                    matchit::InsertError::Conflict { with } => {
                        match self
                            .shapes
                            .get(shape(&with).as_str())
                            .and_then(|taken| first_taken(taken, slots))
                        {
                            Some((existing, slot)) => InsertError::Conflict {
                                existing,
                                method: method_name(slot),
                            },
                            None => InsertError::InvalidPath(format!("conflicts with `{with}`")),
                        }
                    }
                    other => InsertError::InvalidPath(other.to_string()),
                });
            }
            self.trees[tree].len += 1;
        }
        Ok(())
    }

    fn lookup<'r, 'p>(&'r self, slot: usize, path: &'p str) -> Option<RouteMatch<'r, 'p>> {
        if let Some(route) = self.exact.get(path).and_then(|s| s.get(slot)) {
            return Some(RouteMatch {
                route,
                params: Some(matchit::Params::new()),
            });
        }
        if let Some(tree) = self
            .trees
            .iter()
            .find(|t| t.len > 0 && t.slots & (1 << slot) != 0)
            && let Ok(m) = tree.paths.at(path)
        {
            return Some(RouteMatch {
                route: *m.value as RouteId,
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
            if let Some(route) = self.prefixes.get(p).and_then(|s| s.get(slot)) {
                return Some(RouteMatch {
                    route,
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

/// A bracketed IPv6 literal host (`[0:0::1]`, `[2001:DB8::A]`) in the one form routes are
/// compiled to: compressed, lower case, in brackets (`[::1]`, `[2001:db8::a]`). `None` for any
/// other host.
pub fn ipv6_host(host: &[u8]) -> Option<String> {
    let inner = host.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let ip: std::net::Ipv6Addr = std::str::from_utf8(inner).ok()?.parse().ok()?;
    Some(format!("[{ip}]"))
}

/// Lower-cases a `Host` value and drops the port and a trailing dot; an IPv6 literal is written
/// as [`ipv6_host`] writes it.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let without_port = if host.starts_with('[') {
        // IPv6 literal: keep up to the closing bracket.
        host.find(']').map(|i| &host[..=i]).unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    if let Some(ip) = ipv6_host(without_port.as_bytes()) {
        return Cow::Owned(ip);
    }
    let h = without_port.strip_suffix('.').unwrap_or(without_port);
    if h.bytes().any(|c| c.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests;
