//! Request path and `Host` normalisation, then a route lookup on the result.
//!
//! Beyond "does not panic", this checks the promises the router's docs make:
//! * a normalised path starts with `/`, has no empty, `.` or `..` segment, no backslash, no
//!   `%00`, and every escape is two upper-case hex digits of a byte that is not unreserved;
//! * normalising is idempotent, and a borrowed result is the input itself;
//! * a prefix route only matches on a segment boundary;
//! * a normalised host has no ASCII upper case and is never longer than the input.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use rustygate::router::{
    HostPattern, PathPattern, Router, method_slot, normalize_host, normalize_path,
};

/// A table with every kind of route, built once.
fn router() -> &'static (Router, Vec<PathPattern>) {
    static R: std::sync::OnceLock<(Router, Vec<PathPattern>)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let routes = [
            (HostPattern::Any, PathPattern::Prefix("/".into())),
            (HostPattern::Any, PathPattern::Prefix("/api".into())),
            (
                HostPattern::Any,
                PathPattern::Prefix("/api/v1/admin".into()),
            ),
            (HostPattern::Any, PathPattern::Exact("/orders/{id}".into())),
            (
                HostPattern::Any,
                PathPattern::Exact("/orders/{id}/items".into()),
            ),
            (
                HostPattern::Exact("a.example".into()),
                PathPattern::Prefix("/".into()),
            ),
            (
                HostPattern::Suffix(".example".into()),
                PathPattern::Prefix("/admin".into()),
            ),
        ];
        let mut router = Router::default();
        let mut patterns = Vec::new();
        for (id, (host, path)) in routes.into_iter().enumerate() {
            let slots = [method_slot("GET")];
            if router.insert(&host, &path, Some(&slots), id).is_err() {
                panic!("fixture route {id} does not insert");
            }
            patterns.push(path);
        }
        router.finish();
        (router, patterns)
    })
}

fn check_normal(path: &str) {
    assert!(path.starts_with('/'), "{path:?} does not start with /");
    assert!(!path.contains('\\'), "{path:?} has a backslash");
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, s) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        assert!(!(s.is_empty() && !last), "{path:?} has an empty segment");
        assert!(*s != "." && *s != "..", "{path:?} has a dot segment");
    }
    let b = path.as_bytes();
    for (i, _) in b.iter().enumerate().filter(|(_, c)| **c == b'%') {
        let hex = b.get(i + 1..i + 3);
        let Some(&[hi, lo]) = hex else {
            panic!("{path:?} has a cut escape");
        };
        let upper = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
        assert!(
            upper(hi) && upper(lo),
            "{path:?} has a non-canonical escape"
        );
        let byte = u8::from_str_radix(&path[i + 1..i + 3], 16).unwrap_or(0);
        assert!(byte != 0, "{path:?} has %00");
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "{path:?} keeps an escaped unreserved character"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is a Host value, the rest a path.
    let (host, path) = text.split_once('\n').unwrap_or(("", text));

    let h = normalize_host(host);
    assert!(h.len() <= host.len());
    assert!(!h.bytes().any(|c| c.is_ascii_uppercase()), "{h:?}");

    let Ok(normal) = normalize_path(path) else {
        return;
    };
    check_normal(&normal);
    match &normal {
        Cow::Borrowed(b) => assert_eq!(*b, path),
        Cow::Owned(_) => {}
    }
    let again = normalize_path(&normal);
    assert!(
        matches!(&again, Ok(p) if **p == *normal),
        "not idempotent: {path:?} -> {normal:?} -> {again:?}"
    );

    let (router, patterns) = router();
    if let Some(m) = router.lookup(&h, "GET", &normal) {
        if let PathPattern::Prefix(p) = &patterns[m.route] {
            assert!(
                p == "/" || *normal == **p || normal.starts_with(&format!("{p}/")),
                "prefix {p:?} matched {normal:?} off a segment boundary"
            );
        }
    }
    let _ = router.allowed_methods(&h, &normal);
});
