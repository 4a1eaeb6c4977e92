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
    assert_eq!(n("/a%2fb"), Ok("/a%2Fb".into()));
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

#[test]
fn hosts_are_normalised() {
    assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
    assert_eq!(normalize_host("example.com."), "example.com");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
}
