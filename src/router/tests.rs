use super::*;

fn exact(p: &str) -> PathPattern {
    PathPattern::Exact(p.into())
}

fn prefix(p: &str) -> PathPattern {
    PathPattern::Prefix(p.into())
}

fn host(h: &str) -> HostPattern {
    match h.strip_prefix('*') {
        Some(s) => HostPattern::Suffix(s.into()),
        None if h.is_empty() => HostPattern::Any,
        None => HostPattern::Exact(h.into()),
    }
}

/// Builds a router from (host, path, methods) with ids in order.
fn router(routes: &[(&str, PathPattern, Option<&[&str]>)]) -> Router {
    let mut r = Router::default();
    for (id, (h, p, m)) in routes.iter().enumerate() {
        let slots: Option<Vec<usize>> = m.map(|m| m.iter().map(|x| method_slot(x)).collect());
        r.insert(&host(h), p, slots.as_deref(), id).unwrap();
    }
    r.finish();
    r
}

fn hit(r: &Router, h: &str, m: &str, p: &str) -> Option<RouteId> {
    r.lookup(h, m, p).map(|x| x.route)
}

#[test]
fn exact_beats_param_beats_prefix() {
    let r = router(&[
        ("", prefix("/users"), None),
        ("", exact("/users/{id}"), None),
        ("", exact("/users/me"), None),
    ]);
    assert_eq!(hit(&r, "a", "GET", "/users/me"), Some(2));
    assert_eq!(hit(&r, "a", "GET", "/users/7"), Some(1));
    assert_eq!(hit(&r, "a", "GET", "/users/7/orders"), Some(0));
    assert_eq!(hit(&r, "a", "GET", "/users"), Some(0));
}

#[test]
fn longer_prefix_wins_and_prefixes_respect_segments() {
    let r = router(&[
        ("", prefix("/"), None),
        ("", prefix("/api"), None),
        ("", prefix("/api/v2"), None),
    ]);
    assert_eq!(hit(&r, "a", "GET", "/api/v2/x"), Some(2));
    assert_eq!(hit(&r, "a", "GET", "/api/v2"), Some(2));
    assert_eq!(hit(&r, "a", "GET", "/api/v2/"), Some(2));
    assert_eq!(hit(&r, "a", "GET", "/api/v3"), Some(1));
    assert_eq!(hit(&r, "a", "GET", "/apix"), Some(0));
    assert_eq!(hit(&r, "a", "GET", "/"), Some(0));
}

#[test]
fn host_specific_before_wildcard_before_hostless() {
    let r = router(&[
        ("", prefix("/"), None),
        ("*.example.com", prefix("/"), None),
        ("api.example.com", exact("/orders"), None),
        ("*.eu.example.com", prefix("/"), None),
    ]);
    assert_eq!(hit(&r, "api.example.com", "GET", "/orders"), Some(2));
    // The exact host's table has no match for this path: fall through to the wildcard.
    assert_eq!(hit(&r, "api.example.com", "GET", "/other"), Some(1));
    assert_eq!(hit(&r, "x.eu.example.com", "GET", "/"), Some(3));
    assert_eq!(hit(&r, "www.example.com", "GET", "/"), Some(1));
    // A wildcard does not match the bare domain.
    assert_eq!(hit(&r, "example.com", "GET", "/"), Some(0));
    assert_eq!(hit(&r, "other.org", "GET", "/"), Some(0));
}

#[test]
fn methods_have_their_own_tables() {
    let r = router(&[
        ("", exact("/orders"), Some(&["GET"])),
        ("", exact("/orders"), Some(&["POST", "PUT"])),
        ("", prefix("/"), Some(&["DELETE"])),
    ]);
    assert_eq!(hit(&r, "a", "GET", "/orders"), Some(0));
    assert_eq!(hit(&r, "a", "PUT", "/orders"), Some(1));
    assert_eq!(hit(&r, "a", "DELETE", "/orders"), Some(2));
    assert_eq!(hit(&r, "a", "PATCH", "/orders"), None);
    assert_eq!(
        r.allowed_methods("a", "/orders"),
        vec!["GET", "POST", "PUT", "DELETE"]
    );
}

#[test]
fn unknown_methods_only_match_routes_without_methods() {
    let r = router(&[("", exact("/a"), Some(&["GET"])), ("", exact("/b"), None)]);
    assert_eq!(hit(&r, "h", "PURGE", "/a"), None);
    assert_eq!(hit(&r, "h", "PURGE", "/b"), Some(1));
}

#[test]
fn same_host_method_path_conflicts() {
    let mut r = Router::default();
    r.insert(&HostPattern::Any, &exact("/orders/{id}"), None, 0)
        .unwrap();
    let err = r
        .insert(
            &HostPattern::Any,
            &exact("/orders/{order}"),
            Some(&[method_slot("GET")]),
            1,
        )
        .unwrap_err();
    assert_eq!(
        err,
        InsertError::Conflict {
            existing: 0,
            method: "GET"
        }
    );
    r.insert(&HostPattern::Any, &prefix("/x"), Some(&[0, 2]), 2)
        .unwrap();
    let err = r
        .insert(&HostPattern::Any, &prefix("/x"), Some(&[2]), 3)
        .unwrap_err();
    assert_eq!(
        err,
        InsertError::Conflict {
            existing: 2,
            method: "POST"
        }
    );
    // Different hosts never conflict.
    r.insert(&host("a.com"), &exact("/orders/{id}"), None, 4)
        .unwrap();
}

#[test]
fn params_are_captured() {
    let r = router(&[("", exact("/orders/{id}/items/{item}"), None)]);
    let m = r.lookup("h", "GET", "/orders/7/items/x%2Fy").unwrap();
    let p = m.params.unwrap();
    assert_eq!(p.get("id"), Some("7"));
    assert_eq!(p.get("item"), Some("x%2Fy"));
}

#[test]
fn normalisation_rules() {
    let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
    assert_eq!(n("/a/b"), Ok("/a/b".into()));
    assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
    assert_eq!(n("/a//b///c"), Ok("/a/b/c".into()));
    assert_eq!(n("/a/./b/."), Ok("/a/b/".into()));
    assert_eq!(n("/public/../admin"), Ok("/admin".into()));
    assert_eq!(n("/public/%2e%2e/admin"), Ok("/admin".into()));
    assert_eq!(n("/public/%2E%2E/admin"), Ok("/admin".into()));
    assert_eq!(n("/%61dmin"), Ok("/admin".into()));
    assert_eq!(
        n("/a%2fb"),
        Err(PathError::EscapedSlash),
        "escaped slashes: reject by default"
    );
    assert_eq!(n("/a%252e"), Ok("/a%252e".into()));
    assert_eq!(n("/a/"), Ok("/a/".into()));
    assert_eq!(n("/.well-known/x"), Ok("/.well-known/x".into()));
    assert_eq!(n("/caf%C3%A9"), Ok("/caf%C3%A9".into()));
    assert_eq!(n("/../etc"), Err(PathError::AboveRoot));
    assert_eq!(n("/a/%2e%2e/%2e%2e/b"), Err(PathError::AboveRoot));
    assert_eq!(n("/a%00b"), Err(PathError::Nul));
    assert_eq!(n("/a\\b"), Err(PathError::Backslash));
    assert_eq!(n("/a%5cb"), Err(PathError::Backslash));
    assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
    assert_eq!(n("/a%2"), Err(PathError::BadEscape));
    assert_eq!(n("*"), Err(PathError::NotOriginForm));
    assert_eq!(n("http://x/y"), Err(PathError::NotOriginForm));
}

fn with(p: &str, escaped_slashes: EscapedSlashes) -> Result<String, PathError> {
    normalize_path_with(p, PathRules { escaped_slashes }).map(|c| c.into_owned())
}

/// Every way to spell `..` plus a slash through escapes, under each `escaped_slashes` choice.
const CLIMBS: [&str; 6] = [
    "/public/..%2fadmin",
    "/public/..%2Fadmin",
    "/public/%2e%2e%2fadmin",
    "/public/%2E%2E%2Fadmin",
    "/public/.%2e%2Fadmin",
    "/public/x%2F..%2F..%2Fadmin",
];

#[test]
fn escaped_slashes_are_rejected_by_default() {
    for p in CLIMBS {
        assert_eq!(normalize_path(p), Err(PathError::EscapedSlash), "{p}");
    }
    assert_eq!(
        with("/projects/group%2Fproject", EscapedSlashes::Reject),
        Err(PathError::EscapedSlash)
    );
}

#[test]
fn kept_escaped_slashes_never_hide_a_dot_segment() {
    let keep = |p| with(p, EscapedSlashes::Keep);
    for p in CLIMBS {
        assert_eq!(keep(p), Err(PathError::EscapedDotSegment), "{p}");
    }
    assert_eq!(keep("/public/%2F..%2Fx"), Err(PathError::EscapedDotSegment));
    assert_eq!(keep("/public/a%2F."), Err(PathError::EscapedDotSegment));
    assert_eq!(
        keep("/projects/group%2fproject/x"),
        Ok("/projects/group%2Fproject/x".into())
    );
    assert_eq!(keep("/a%2F...%2Fb"), Ok("/a%2F...%2Fb".into()));
}

#[test]
fn decoded_escaped_slashes_are_resolved_like_real_ones() {
    let decode = |p| with(p, EscapedSlashes::Decode);
    for p in &CLIMBS[..5] {
        assert_eq!(decode(p), Ok("/admin".into()), "{p}");
    }
    assert_eq!(decode(CLIMBS[5]), Ok("/admin".into()));
    assert_eq!(
        decode("/projects/group%2Fproject"),
        Ok("/projects/group/project".into())
    );
    assert_eq!(decode("/a/..%2F..%2Fetc"), Err(PathError::AboveRoot));
}

#[test]
fn backslash_climbs_are_refused_under_every_choice() {
    for mode in [
        EscapedSlashes::Reject,
        EscapedSlashes::Keep,
        EscapedSlashes::Decode,
    ] {
        for p in [
            "/public/..%5cadmin",
            "/public/..%5Cadmin",
            "/public/%2e%2e%5cadmin",
            "/public/..\\admin",
        ] {
            assert_eq!(with(p, mode), Err(PathError::Backslash), "{p} {mode:?}");
        }
    }
}

#[test]
fn dot_segments_with_parameters_are_refused() {
    for mode in [
        EscapedSlashes::Reject,
        EscapedSlashes::Keep,
        EscapedSlashes::Decode,
    ] {
        for p in [
            "/public/..;/admin",
            "/public/..;jsessionid=x/admin",
            "/public/.;/admin",
            "/public/%2e%2e;/admin",
            "/public/..%3b/admin",
            "/public/..;",
        ] {
            assert_eq!(
                with(p, mode),
                Err(PathError::DotSegmentParams),
                "{p} {mode:?}"
            );
        }
    }
    assert_eq!(
        with("/a%2F..;%2Fb", EscapedSlashes::Keep),
        Err(PathError::EscapedDotSegment)
    );
    // Parameters on ordinary segments are the upstream's business.
    assert_eq!(
        normalize_path("/a;v=1/b..;/c"),
        Ok(Cow::Borrowed("/a;v=1/b..;/c"))
    );
    assert_eq!(normalize_path("/a/...;/b"), Ok(Cow::Borrowed("/a/...;/b")));
}

#[test]
fn hosts_are_normalised() {
    assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
    assert_eq!(normalize_host("example.com."), "example.com");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
}

/// The router as it was built before the per-host layout (one `matchit` tree and two maps per
/// method slot): the definition of the precedence rules the new layout must keep.
mod reference {
    use super::super::{
        HostPattern, METHOD_SLOTS, METHODS, PathPattern, RouteId, method_slot, shape,
    };
    use std::collections::HashMap;

    /// A route and its `{param}` values, as (name, value) pairs.
    pub type Found = (RouteId, Option<Vec<(String, String)>>);

    #[derive(Default)]
    struct MethodTable {
        paths: matchit::Router<RouteId>,
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

    #[derive(Default)]
    pub struct Router {
        exact_hosts: HashMap<String, Table>,
        suffix_hosts: Vec<(String, Table)>,
        any_host: Table,
    }

    impl Router {
        /// `Err` with the conflicting route, or `None` for an invalid path.
        pub fn insert(
            &mut self,
            host: &HostPattern,
            path: &PathPattern,
            methods: Option<&[usize]>,
            id: RouteId,
        ) -> Result<(), Option<(RouteId, &'static str)>> {
            let table = match host {
                HostPattern::Any => &mut self.any_host,
                HostPattern::Exact(h) => self.exact_hosts.entry(h.clone()).or_default(),
                HostPattern::Suffix(s) => {
                    match self.suffix_hosts.iter().position(|(k, _)| k == s) {
                        Some(i) => &mut self.suffix_hosts[i].1,
                        None => {
                            self.suffix_hosts.push((s.clone(), Table::default()));
                            let last = self.suffix_hosts.len() - 1;
                            &mut self.suffix_hosts[last].1
                        }
                    }
                }
            };
            let all: Vec<usize> = (0..METHOD_SLOTS)
                .filter(|&s| !matches!(METHODS.get(s), Some(&("TRACE" | "CONNECT"))))
                .collect();
            let slots = methods.unwrap_or(&all);
            let name = |slot: usize| METHODS.get(slot).copied().unwrap_or("other methods");
            for &slot in slots {
                let t = &table.methods[slot];
                let existing = match path {
                    PathPattern::Exact(p) => t.shapes.get(&shape(p)).copied(),
                    PathPattern::Prefix(p) => t.prefixes.get(p).copied(),
                };
                if let Some(existing) = existing {
                    return Err(Some((existing, name(slot))));
                }
            }
            for &slot in slots {
                let t = &mut table.methods[slot];
                match path {
                    PathPattern::Exact(p) => {
                        t.paths.insert(p.as_str(), id).map_err(|_| None)?;
                        t.shapes.insert(shape(p), id);
                    }
                    PathPattern::Prefix(p) => {
                        t.prefixes.insert(p.clone(), id);
                    }
                }
            }
            Ok(())
        }

        pub fn finish(&mut self) {
            self.suffix_hosts
                .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        }

        /// The route and its params as (name, value) pairs.
        pub fn lookup(&self, host: &str, method: &str, path: &str) -> Option<Found> {
            let slot = method_slot(method);
            self.tables_for(host)
                .find_map(|t| lookup_in(&t.methods[slot], path))
        }

        pub fn allowed_methods(&self, host: &str, path: &str) -> Vec<&'static str> {
            METHODS
                .iter()
                .enumerate()
                .filter(|(slot, _)| {
                    self.tables_for(host)
                        .any(|t| lookup_in(&t.methods[*slot], path).is_some())
                })
                .map(|(_, m)| *m)
                .collect()
        }

        fn tables_for<'r>(&'r self, host: &'r str) -> impl Iterator<Item = &'r Table> + 'r {
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

    fn lookup_in(t: &MethodTable, path: &str) -> Option<Found> {
        if let Ok(m) = t.paths.at(path) {
            let params = m
                .params
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            return Some((*m.value, Some(params)));
        }
        let mut p = path;
        if p.len() > 1 && p.ends_with('/') {
            p = &p[..p.len() - 1];
        }
        loop {
            if let Some(&id) = t.prefixes.get(p) {
                return Some((id, None));
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

/// A small deterministic generator (xorshift64*), so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

const SEGMENTS: [&str; 6] = ["a", "b", "ab", "v1", "{x}", "{y}"];
const REQUEST_SEGMENTS: [&str; 7] = ["a", "b", "ab", "v1", "7", "v", "{x}"];
const HOSTS: [&str; 5] = ["", "h.com", "x.h.com", "*.h.com", "*.x.h.com"];
const REQUEST_HOSTS: [&str; 5] = ["h.com", "x.h.com", "a.x.h.com", "b.h.com", "other"];
const REQUEST_METHODS: [&str; 13] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PURGE", "get",
    "trace", "Connect",
];

fn random_path(rng: &mut Rng, segments: &[&str], params: bool) -> String {
    let depth = 1 + rng.below(3);
    let mut p = String::new();
    for _ in 0..depth {
        p.push('/');
        let mut s = rng.pick(segments);
        while !params && s.starts_with('{') {
            s = rng.pick(segments);
        }
        p.push_str(s);
    }
    if rng.below(8) == 0 {
        p.push('/');
    }
    if rng.below(10) == 0 { "/".into() } else { p }
}

/// Random route tables (hosts, wildcards, exact and `{param}` paths, prefixes, method lists,
/// conflicts) and random requests: the router answers every lookup, every `Allow` list and
/// every insert error exactly as the per-method reference does.
#[test]
fn matches_the_per_method_reference_on_random_tables() {
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut new = Router::default();
        let mut old = reference::Router::default();
        let mut id = 0;
        let routes = 1 + rng.below(40);
        for _ in 0..routes {
            let host = host(rng.pick(&HOSTS));
            let path = if rng.below(3) == 0 {
                let p = random_path(&mut rng, &SEGMENTS, false);
                let t = p.trim_end_matches('/');
                prefix(if t.is_empty() { "/" } else { t })
            } else {
                exact(&random_path(&mut rng, &SEGMENTS, true))
            };
            let methods: Option<Vec<usize>> = (rng.below(2) == 0).then(|| {
                let n = 1 + rng.below(3);
                // Without repeats, as the compiler gives them.
                let mut m: Vec<usize> = Vec::new();
                for _ in 0..n {
                    let slot = rng.below(METHODS.len());
                    if !m.contains(&slot) {
                        m.push(slot);
                    }
                }
                m
            });
            let a = new.insert(&host, &path, methods.as_deref(), id);
            let b = old.insert(&host, &path, methods.as_deref(), id);
            let ctx = format!("seed {seed}: insert {host:?} {path:?} {methods:?}");
            match (&a, &b) {
                (Ok(()), Ok(())) => id += 1,
                (Err(InsertError::Conflict { existing, method }), Err(Some((e, m)))) => {
                    assert_eq!((existing, method), (e, m), "{ctx}")
                }
                (Err(InsertError::InvalidPath(_)), Err(None)) => {}
                _ => panic!("{ctx}: {a:?} vs {b:?}"),
            }
        }
        new.finish();
        old.finish();
        for _ in 0..100 {
            let h = rng.pick(&REQUEST_HOSTS);
            let m = rng.pick(&REQUEST_METHODS);
            let p = random_path(&mut rng, &REQUEST_SEGMENTS, true);
            let got = new.lookup(h, m, &p).map(|x| {
                let params = x.params.map(|ps| {
                    ps.iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect::<Vec<_>>()
                });
                (x.route, params)
            });
            assert_eq!(got, old.lookup(h, m, &p), "seed {seed}: {m} {h}{p}");
            assert_eq!(
                new.allowed_methods(h, &p),
                old.allowed_methods(h, &p),
                "seed {seed}: allowed {h}{p}"
            );
        }
    }
}

#[test]
fn routes_without_methods_take_every_method_but_trace_and_connect() {
    let names: Vec<&str> = DEFAULT_SLOTS.iter().map(|&s| method_name(s)).collect();
    assert_eq!(
        names,
        [
            "GET",
            "HEAD",
            "POST",
            "PUT",
            "DELETE",
            "PATCH",
            "OPTIONS",
            "other methods"
        ]
    );
    let r = router(&[("", exact("/a"), None)]);
    assert_eq!(hit(&r, "h", "PURGE", "/a"), Some(0));
    assert_eq!(hit(&r, "h", "TRACE", "/a"), None);
    assert_eq!(hit(&r, "h", "CONNECT", "/a"), None);
    // In any case: servers that upper-case the method would take them for TRACE and CONNECT.
    for m in ["trace", "Trace", "connect", "cONNECT"] {
        assert_eq!(hit(&r, "h", m, "/a"), None, "{m}");
    }
    let r = router(&[("", exact("/a"), Some(&["TRACE"]))]);
    assert_eq!(hit(&r, "h", "trace", "/a"), Some(0));
    assert_eq!(hit(&r, "h", "get", "/a"), None);
}
