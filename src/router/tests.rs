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
