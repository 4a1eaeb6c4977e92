use super::*;

fn policy(src: &str, limits: &Limits) -> RoutePolicy {
    let engine = engine(limits);
    let p = compile(&engine, limits, "policies/t.rhai", src)
        .unwrap_or_else(|e| panic!("does not compile: {e:?}"));
    RoutePolicy {
        policy: Arc::new(p),
        config: Arc::new(Map::new()),
        route: Arc::from("r"),
    }
}

fn req() -> Req {
    Req(Arc::new(std::sync::Mutex::new(RequestState::new(
        RequestInit {
            method: "GET",
            path: "/a",
            query: None,
            host: "example.com",
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            trace_id: None,
            route: "r",
            upstream: "be",
            upstream_path: None,
            params: Map::new(),
            claims: None,
            config: Arc::new(Map::new()),
            headers: ClientHeaders::default(),
        },
    ))))
}

fn fails(src: &str, limits: &Limits) -> PolicyFailure {
    match policy(src, limits).on_request(&req()) {
        Err(f) => f,
        Ok(v) => panic!("script did not fail: {v:?}"),
    }
}

#[test]
fn endless_loop_stops_on_operations() {
    let f = fails("fn on_request(req) {\n  loop {}\n}", &Limits::default());
    assert_eq!(f.reason, Reason::Operations, "{f}");
    assert_eq!(f.hook, "on_request");
}

#[test]
fn endless_loop_stops_on_the_wall_clock() {
    let limits = Limits {
        max_operations: 0, // unlimited: only the budget stops it
        budget: Duration::from_millis(20),
        ..Limits::default()
    };
    let started = std::time::Instant::now();
    let f = fails("fn on_request(req) { loop { let x = 1; } }", &limits);
    assert_eq!(f.reason, Reason::Timeout, "{f}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn unbounded_recursion_stops_on_call_depth() {
    let f = fails(
        "fn down(n) { down(n + 1) }\nfn on_request(req) { down(0) }",
        &Limits::default(),
    );
    assert_eq!(f.reason, Reason::CallDepth, "{f}");
}

#[test]
fn doubling_a_string_stops_on_string_size() {
    let f = fails(
        "fn on_request(req) { let s = \"x\"; loop { s += s; } }",
        &Limits::default(),
    );
    assert_eq!(f.reason, Reason::StringSize, "{f}");
}

#[test]
fn growing_arrays_and_maps_stop_on_size() {
    let limits = Limits {
        max_array_size: 100,
        max_map_size: 100,
        // The size limits are under test, not the clock: room for a loaded machine.
        budget: Duration::from_secs(5),
        ..Limits::default()
    };
    let f = fails(
        "fn on_request(req) { let a = []; loop { a.push(1); } }",
        &limits,
    );
    assert_eq!(f.reason, Reason::ArraySize, "{f}");
    let f = fails(
        "fn on_request(req) { let a = []; a.pad(1000000, 0); }",
        &limits,
    );
    assert_eq!(f.reason, Reason::ArraySize, "{f}");
    let f = fails(
        "fn on_request(req) { let m = #{}; let i = 0; loop { let n = #{}; n[`k${i}`] = i; m += n; i += 1; } }",
        &limits,
    );
    assert_eq!(f.reason, Reason::MapSize, "{f}");
}

#[test]
fn huge_array_and_map_literals_do_not_compile() {
    let limits = Limits {
        max_array_size: 100,
        max_map_size: 100,
        // The size limits are under test, not the clock: room for a loaded machine.
        budget: Duration::from_secs(5),
        ..Limits::default()
    };
    let items: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let src = format!("fn on_request(req) {{ let a = [{}]; }}", items.join(","));
    let e = compile(&engine(&limits), &limits, "p.rhai", &src).unwrap_err();
    assert_eq!(e[0].code, "policy-too-large", "{e:?}");
    let entries: Vec<String> = (0..200).map(|i| format!("k{i}: {i}")).collect();
    let src = format!(
        "fn on_request(req) {{ let m = #{{{}}}; }}",
        entries.join(",")
    );
    let e = compile(&engine(&limits), &limits, "p.rhai", &src).unwrap_err();
    assert_eq!(e[0].code, "policy-too-large", "{e:?}");
}

#[test]
fn runtime_errors_fail_with_the_line() {
    let f = fails(
        "fn on_request(req) {\n\n  throw \"no\";\n}",
        &Limits::default(),
    );
    assert_eq!(f.reason, Reason::Runtime);
    assert_eq!(f.line, Some(3), "{f}");
    let f = fails(
        "fn on_request(req) { req.set_header(\"host\", \"evil\") }",
        &Limits::default(),
    );
    assert_eq!(f.reason, Reason::InvalidAction, "{f}");
    let f = fails("fn on_request(req) { 42 }", &Limits::default());
    assert_eq!(f.reason, Reason::InvalidAction, "{f}");
}

#[test]
fn a_failed_call_leaves_no_budget_behind() {
    let limits = Limits {
        budget: Duration::from_millis(5),
        ..Limits::default()
    };
    let p = policy(
        "fn on_request(req) { req.set_header(\"x-a\", \"1\") }",
        &limits,
    );
    let r = req();
    assert!(p.on_request(&r).unwrap().is_none());
    std::thread::sleep(Duration::from_millis(10));
    // A later call on this thread gets a fresh deadline, not the expired one.
    assert!(p.on_request(&r).unwrap().is_none());
    assert_eq!(r.state().edits.len(), 2);
}

#[test]
fn decisions_are_returned() {
    let p = policy(
        "fn on_request(req) { if req.method == \"GET\" { return deny(403, \"no\"); } }",
        &Limits::default(),
    );
    match p.on_request(&req()) {
        Ok(Some(Verdict::Deny { status, message })) => {
            assert_eq!((status, message.as_str()), (403, "no"));
        }
        other => panic!("{other:?}"),
    }
}

fn compile_errors(src: &str) -> Vec<ScriptError> {
    let limits = Limits::default();
    match compile(&engine(&limits), &limits, "p.rhai", src) {
        Ok(_) => panic!("compiled"),
        Err(e) => e,
    }
}

#[test]
fn compile_errors_are_located() {
    let e = compile_errors("fn on_request(req) {\n  let x = y;\n}");
    assert_eq!(e[0].code, "policy-unknown-variable");
    assert_eq!(e[0].span, 31..32);
    let e = compile_errors("fn on_request(req) {\n  let x = ;\n}");
    assert_eq!(e[0].code, "policy-syntax");
    let e = compile_errors("fn on_request(req, res) { }");
    assert_eq!(e[0].code, "policy-hook-arity");
    assert_eq!(e[0].span, 3..13);
    let e = compile_errors("fn helper(x) { x }");
    assert_eq!(e[0].code, "policy-no-hooks");
}

#[test]
fn policies_on_one_thread_keep_their_own_functions() {
    // Each thread caches what a script's calls resolve to, per policy: two scripts with a
    // function of the same name must each call their own.
    let limits = Limits::default();
    let a = policy(
        "fn pick() { \"a\" }\nfn on_request(req) { req.set_header(\"x-pick\", pick()) }",
        &limits,
    );
    let b = policy(
        "fn pick() { \"b\" }\nfn on_request(req) { req.set_header(\"x-pick\", pick()) }",
        &limits,
    );
    for _ in 0..3 {
        for (p, want) in [(&a, "a"), (&b, "b")] {
            let r = req();
            assert!(p.on_request(&r).unwrap().is_none());
            let s = r.state();
            assert_eq!(s.header_values("x-pick").next(), Some(want.as_bytes()));
        }
    }
}

#[test]
fn a_failure_leaves_the_next_call_clean() {
    let limits = Limits::default();
    let failing = policy(
        "fn on_request(req) { let a = 1; let b = 2; throw \"no\"; }",
        &limits,
    );
    let fine = policy(
        "fn on_request(req) { if req.path == \"/a\" { return deny(403, \"path\"); } }",
        &limits,
    );
    for _ in 0..3 {
        assert!(failing.on_request(&req()).is_err());
        assert!(matches!(
            fine.on_request(&req()),
            Ok(Some(Verdict::Deny { status: 403, .. }))
        ));
    }
}

#[test]
fn growing_a_map_by_index_or_property_stops_on_map_size() {
    let limits = Limits {
        max_map_size: 100,
        budget: Duration::from_secs(5),
        ..Limits::default()
    };
    for src in [
        "fn on_request(req) { let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; } }",
        "fn on_request(req) { let m = #{}; for i in 0..1000 { m[`k${i}`] = i; } }",
        "fn on_request(req) { let c = req.ctx; let i = 0; loop { c[`k${i}`] = i; i += 1; } }",
        "fn on_request(req) { let i = 0; loop { req.ctx[`k${i}`] = i; i += 1; } }",
    ] {
        let f = fails(src, &limits);
        assert_eq!(f.reason, Reason::MapSize, "{src}: {f}");
    }
}

#[test]
fn long_map_keys_count_against_the_string_limit() {
    // Rhai counts a map's entries and the strings in its values, not its keys: each of these
    // kept 1,000 keys of 60 KB (60 MB) within the default limits.
    let limits = Limits {
        max_operations: 0,
        budget: Duration::from_secs(30),
        ..Limits::default()
    };
    let long = r#"let k = "k"; k.pad(60000, "k");"#;
    for body in [
        "let m = #{}; for i in 0..1000 { m[`${k}${i}`] = i; }",
        "let m = #{}; for i in 0..1000 { m[`${i}${k}`] = (); } let n = m;",
        "for i in 0..1000 { req.ctx[`${k}${i}`] = i; }",
        "let a = []; for i in 0..1000 { let m = #{}; m[`${k}${i}`] = 1; a.push(m); }",
        "let m = #{}; for i in 0..1000 { m[`${i}`] = #{}; m[`${i}`][`${k}${i}`] = 1; }",
    ] {
        let src = format!("fn on_request(req) {{ {long} {body} }}");
        let f = fails(&src, &limits);
        assert_eq!(f.reason, Reason::MapSize, "{body}: {f}");
        assert!(f.message.contains("Keys of object maps"), "{body}: {f}");
    }
    // Keys up to the limit together are fine, in a variable and in `req.ctx`.
    let fine = r#"fn on_request(req) {
    let k = "k"; k.pad(30000, "k");
    let m = #{}; m[`${k}1`] = 1; m[`${k}2`] = 2;
    req.ctx[k] = m.len();
    if req.ctx[k] != 2 { throw "lost"; }
}"#;
    assert!(matches!(policy(fine, &limits).on_request(&req()), Ok(None)));
}

#[test]
fn only_scripts_that_assign_into_containers_check_map_sizes_on_each_read() {
    let limits = Limits::default();
    let reads = policy(
        "fn on_request(req) { let t = req.header(\"x-tenant\"); let m = #{a: 1}; m += #{b: t}; }",
        &limits,
    );
    assert!(!reads.policy.grows_maps);
    for src in [
        "fn on_request(req) { let m = #{}; m.k = 1; }",
        "fn helper(m) { m[\"k\"] += 1; m }\nfn on_request(req) { helper(#{k: 1}); }",
        "fn on_request(req) { req.ctx.seen = true; }",
    ] {
        assert!(policy(src, &limits).policy.grows_maps, "{src}");
    }
}

#[test]
fn unknown_functions_do_not_compile() {
    for (src, span) in [
        (
            "fn on_request(req) {\n  req.set_heder(\"x-a\", \"1\");\n}",
            27..28,
        ),
        ("fn on_request(req) {\n  let x = sha265(\"a\");\n}", 31..32),
        ("fn on_request(req) {\n  req.header();\n}", 27..28),
        (
            "fn on_request(req) {\n  helper(1, 2);\n}\nfn helper(a) { a }",
            23..24,
        ),
    ] {
        let e = compile_errors(src);
        assert_eq!(e[0].code, "policy-unknown-function", "{src}: {e:?}");
        assert_eq!(e[0].span, span, "{src}: {e:?}");
    }
    let e = compile_errors("fn on_request(req) {\n  req.header();\n}");
    assert!(
        e[0].help
            .as_deref()
            .unwrap_or("")
            .contains("takes 1 argument"),
        "{e:?}"
    );
    // What Rhai resolves through values or by itself is left alone.
    let limits = Limits::default();
    for ok in [
        "fn on_request(req) { let f = Fn(\"helper\"); f.call(1); print(type_of(f)); }\nfn helper(a) { a }",
        "fn on_request(req) { let f = |x| x + 1; f(1); }",
        "fn on_request(req) { let o = #{ act: |x| x }; o.act(1); }",
        "fn on_request(req) { let s = \"abc\"; s.len(); \"a\".to_upper(); [1].push(2); req.header(\"a\"); }",
        "fn on_request(req) { 1.helper(); }\nfn helper() { this }",
    ] {
        if let Err(e) = compile(&engine(&limits), &limits, "p.rhai", ok) {
            panic!("{ok}: {e:?}");
        }
    }
}

#[test]
fn header_reads_see_the_edits_so_far() {
    let p = policy(
        r#"fn on_request(req) {
    let seen = [];
    seen.push(req.header("X-A"));          // client: 1, 2
    req.append_header("x-a", "3");
    seen.push(req.header_values("x-a"));   // 1, 2, 3
    req.set_header("x-a", "4");
    req.append_header("x-a", "5");
    seen.push(req.header_values("x-a"));   // 4, 5
    req.remove_header("x-a");
    seen.push(req.has_header("x-a"));      // false
    req.append_header("x-a", "6");
    seen.push(req.header_values("x-a"));   // 6
    seen.push(req.header("x-b"));          // untouched: b
    req.set_header("x-seen", to_json(seen));
}"#,
        &Limits::default(),
    );
    let r = req();
    {
        let mut s = r.state();
        s.headers.push("x-a", b"1");
        s.headers.push("x-b", b"b");
        s.headers.push("x-a", b"2");
    }
    assert!(p.on_request(&r).unwrap().is_none());
    let s = r.state();
    let seen = std::str::from_utf8(s.header_values("x-seen").next().unwrap()).unwrap();
    assert_eq!(seen, r#"["1",["1","2","3"],["4","5"],false,["6"],"b"]"#);
    // What goes upstream is the same replay.
    let mut upstream = http::HeaderMap::new();
    for (n, v) in [("x-a", "1"), ("x-b", "b"), ("x-a", "2")] {
        upstream.append(n, http::HeaderValue::from_static(v));
    }
    for e in &s.edits {
        e.apply(&mut upstream);
    }
    let a: Vec<_> = upstream.get_all("x-a").iter().collect();
    assert_eq!(a, ["6"]);
}

#[test]
fn max_call_depth_counts_calls_made_from_the_hook() {
    let limits = Limits {
        max_call_depth: 5,
        ..Limits::default()
    };
    let src = |depth: u32| {
        format!(
            "fn down(n) {{ if n > 1 {{ down(n - 1) }} }}\nfn on_request(req) {{ down({depth}) }}"
        )
    };
    assert!(policy(&src(5), &limits).on_request(&req()).is_ok());
    let f = policy(&src(6), &limits).on_request(&req()).unwrap_err();
    assert_eq!(f.reason, Reason::CallDepth, "{f}");
}
#[test]
fn hooks_run_their_own_body_with_closures_and_early_returns() {
    // A hook's body runs as statements (`Hook`): a closure it defines is a function of its
    // own, not part of the body, and `return` ends the body with its value.
    let p = policy(
        r#"
fn twice(x) { x * 2 }
fn on_request(r) {
    let add = |x| x + 1;
    r.set_header("x-a", add.call(twice(20)).to_string());
    if r.has_header("x-a") { return deny(418, "early"); }
    r.set_header("x-b", "never");
}
fn on_response(q, s) {
    let f = |n| n * 10;
    s.set_header("x-c", f.call(s.status).to_string());
}
"#,
        &Limits::default(),
    );
    let r = req();
    match p.on_request(&r) {
        Ok(Some(Verdict::Deny { status: 418, .. })) => {}
        other => panic!("expected the early deny, got {other:?}"),
    }
    let edits: Vec<_> = r.state().edits.iter().map(|e| format!("{e:?}")).collect();
    assert_eq!(edits.len(), 1, "{edits:?}");
    assert!(edits[0].contains("\"41\""), "{edits:?}");
    let res = Res(Arc::new(std::sync::Mutex::new(ResponseState {
        status: 204,
        headers: http::HeaderMap::new(),
    })));
    assert!(p.on_response(&r, &res).unwrap().is_none());
    assert_eq!(res.state().headers["x-c"], "2040");
}

#[test]
fn exit_fails_the_request() {
    for src in [
        "fn on_request(req) {\n  exit();\n}",
        "fn on_request(req) {\n  exit(1);\n}",
    ] {
        let f = fails(src, &Limits::default());
        assert_eq!((f.reason, f.line), (Reason::Runtime, Some(2)), "{f}");
        assert!(f.message.contains("exit() is not available"), "{f}");
    }
}

#[test]
fn client_headers_match_names_in_any_case_and_keep_value_order() {
    let mut h = ClientHeaders::default();
    h.push("x-a", b"1");
    h.push("accept", b"*/*");
    h.push("x-a", b"2");
    h.push("x-bin", b"caf\xc3\xa9");
    let all: Vec<_> = h.get_all("X-A").collect();
    assert_eq!(all, [b"1".as_slice(), b"2"]);
    assert_eq!(h.get_all("x-").count(), 0);
    assert_eq!(h.get_all("accept-x").count(), 0);
    let p = policy(
        r#"fn on_request(req) {
    req.set_header("x-out", `${req.header("X-A")}|${req.header("x-bin") == ()}|${req.header_values("x-bin").len()}`);
}"#,
        &Limits::default(),
    );
    let r = req();
    r.state().headers = h;
    assert!(p.on_request(&r).unwrap().is_none());
    let s = r.state();
    assert_eq!(
        s.header_values("x-out").next(),
        Some(b"1|true|0".as_slice())
    );
}

#[test]
fn a_script_function_named_like_a_host_function_is_still_called() {
    // Calls the script cannot answer skip Rhai's script-function lookup (`native_calls`); a
    // name the script defines keeps it, so the script's own `header` wins as Rhai intends.
    let p = policy(
        r#"
fn header(name) { `script:${name}` }
fn on_request(req) {
    req.set_header("x-a", req.header("x-in"));
    req.set_header("x-b", header("y"));
    req.set_header("x-c", req.method);
}"#,
        &Limits::default(),
    );
    let r = req();
    assert!(p.on_request(&r).unwrap().is_none());
    let s = r.state();
    let get = |n| {
        s.header_values(n)
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get("x-a").as_deref(), Some("script:x-in"));
    assert_eq!(get("x-b").as_deref(), Some("script:y"));
    assert_eq!(get("x-c").as_deref(), Some("GET"));
}

#[test]
fn print_and_debug_log_with_route_and_script() {
    let quiet = policy("fn on_request(req) { let x = 1; }", &Limits::default());
    let p = policy(
        r#"fn on_request(req) { print("one"); debug("two"); }"#,
        &Limits::default(),
    );
    let ((), text) = crate::util::captured_logs(tracing::Level::DEBUG, || {
        quiet.on_request(&req()).unwrap();
        p.on_request(&req()).unwrap();
    });
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, said) in lines.iter().zip(["one", "\"two\""]) {
        assert!(line.contains(said), "{line}");
        assert!(
            line.contains("route=\"r\"") && line.contains("script=\"policies/t.rhai\""),
            "{line}"
        );
    }
}

/// `print` past the route's 100 lines a second is dropped and counted in
/// `rustygate_log_lines_dropped_total`, as plugin lines are (it was counted nowhere).
#[test]
fn prints_over_the_rate_are_counted_as_dropped() {
    let before = crate::telemetry::sink::dropped(crate::telemetry::sink::DropReason::RateLimited);
    // A route of its own: print windows are per route and process, and the other tests' route
    // "r" must keep its lines (sharing it made print_and_debug_log_with_route_and_script fail).
    let mut p = policy(
        "fn on_request(req) { for i in 0..150 { print(`line ${i}`); } }",
        &Limits::default(),
    );
    p.route = Arc::from("print-rate-test");
    p.on_request(&req()).unwrap();
    let dropped =
        crate::telemetry::sink::dropped(crate::telemetry::sink::DropReason::RateLimited) - before;
    assert!(dropped >= 50, "{dropped} counted");
}

#[test]
fn methods_on_a_rebound_parameter_keep_rhai_method_semantics() {
    // `req.m(..)` runs as `m(req, ..)` only while `req` is the hook's own parameter; once the body
    // rebinds the name (here to a map holding a function), Rhai's method call must decide.
    let p = policy(
        r#"fn on_request(req) {
    req.set_header("x-a", "1");
    let keep = req;
    let req = #{ set_header: |n, v| 7 };
    let v = req.set_header("x", "y");
    keep.set_header("x-b", `${v}`);
}"#,
        &Limits::default(),
    );
    let r = req();
    assert!(p.on_request(&r).unwrap().is_none());
    let s = r.state();
    assert_eq!(s.header_values("x-a").next(), Some(b"1".as_slice()));
    assert_eq!(s.header_values("x-b").next(), Some(b"7".as_slice()));
    assert_eq!(s.header_values("x").next(), None);
}

// ---- The direct form of simple hooks against Rhai ----

/// `src` compiled twice: as the gateway runs it, and with every direct form removed (Rhai only).
fn direct_and_interpreted(src: &str, limits: &Limits) -> (RoutePolicy, RoutePolicy) {
    let direct = policy(src, limits);
    let mut interpreted = policy(src, limits);
    let p = Arc::get_mut(&mut interpreted.policy).expect("not shared yet");
    for h in p.hooks.iter_mut().flatten() {
        h.direct = None;
    }
    (direct, interpreted)
}

fn has_direct(p: &RoutePolicy) -> [bool; 2] {
    p.policy
        .hooks
        .each_ref()
        .map(|h| h.as_ref().is_some_and(|h| h.direct.is_some()))
}

/// A request with `headers` (values as bytes: some are not text) and query `q`.
fn req_with(headers: &[(&str, &[u8])], query: Option<&str>) -> Req {
    Req(Arc::new(std::sync::Mutex::new(RequestState::new(
        RequestInit {
            method: "POST",
            path: "/api/orders/7",
            query,
            host: "example.com",
            client_ip: std::net::IpAddr::from([10, 0, 0, 9]),
            trace_id: Some(crate::telemetry::trace::TraceId(
                *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36",
            )),
            route: "orders",
            upstream: "be",
            upstream_path: None,
            params: Map::new(),
            claims: None,
            config: Arc::new(Map::new()),
            headers: headers.iter().map(|(n, v)| (*n, *v)).collect(),
        },
    ))))
}

/// What a hook did, in a form two runs can be compared by.
fn outcome(out: Result<Option<Verdict>, PolicyFailure>) -> String {
    match out {
        Ok(v) => format!("ok {v:?}"),
        Err(f) => format!("failed {:?} line {:?}: {}", f.reason, f.line, f.message),
    }
}

fn request_effects(r: &Req) -> String {
    let s = r.state();
    format!(
        "edits {:?} upstream {:?} query {:?} path {:?}",
        s.edits,
        s.chosen_upstream(),
        s.new_query(),
        s.upstream_path()
    )
}

fn response(status: u16, headers: &[(&str, &str)]) -> Res {
    let mut h = http::HeaderMap::new();
    for (n, v) in headers {
        h.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    Res(Arc::new(std::sync::Mutex::new(ResponseState {
        status,
        headers: h,
    })))
}

/// Requests that take the test scripts down their different paths.
fn sample_requests() -> Vec<Req> {
    let long = "v".repeat(300);
    vec![
        req_with(&[], None),
        req_with(
            &[
                ("x-tenant", b"acme"),
                ("x-api-version", b"2"),
                ("user-agent", b"t/1"),
            ],
            Some("page=2&debug=1"),
        ),
        req_with(
            &[("X-Tenant", b"other"), ("x-api-version", b"1")],
            Some("debug"),
        ),
        req_with(&[("x-tenant", b"\xff\xfe"), ("x-api-version", b"2")], None),
        // Within a 64-byte string limit, but not twice over.
        req_with(&[("x-tenant", "ACME".repeat(10).as_bytes())], None),
        req_with(
            &[("x-tenant", long.as_bytes()), ("x-api-version", b"2")],
            None,
        ),
        req_with(
            &[
                ("x-tenant", b"acme"),
                ("x-tenant", b"beta"),
                ("accept", b"*/*"),
            ],
            None,
        ),
    ]
}

/// Runs every hook of `src` both ways on each sample and asserts they did the same; returns
/// which hooks had a direct form.
fn same_both_ways(src: &str, limits: &Limits) -> [bool; 2] {
    let (direct, interpreted) = direct_and_interpreted(src, limits);
    assert_eq!(has_direct(&interpreted), [false; 2]);
    let responses = || {
        [
            response(200, &[("content-type", "application/json")]),
            response(503, &[("cache-control", "no-cache"), ("server", "be")]),
        ]
    };
    for (a, b) in sample_requests().into_iter().zip(sample_requests()) {
        let (oa, ob) = (direct.on_request(&a), interpreted.on_request(&b));
        assert_eq!(outcome(oa), outcome(ob), "on_request of:\n{src}");
        assert_eq!(
            request_effects(&a),
            request_effects(&b),
            "on_request of:\n{src}"
        );
        for (ra, rb) in responses().into_iter().zip(responses()) {
            let (oa, ob) = (
                direct.on_response(&a, &ra),
                interpreted.on_response(&b, &rb),
            );
            assert_eq!(outcome(oa), outcome(ob), "on_response of:\n{src}");
            let (sa, sb) = (ra.state(), rb.state());
            assert_eq!(
                (sa.status, &sa.headers),
                (sb.status, &sb.headers),
                "on_response of:\n{src}"
            );
        }
    }
    has_direct(&direct)
}

/// Scripts the direct form takes, each run both ways.
const DIRECT_SCRIPTS: &[&str] = &[
    include_str!("../../bench/typical.rhai"),
    r#"fn on_request(req) {
    let t = req.header("x-tenant") ?? "anonymous";
    if !req.has_header("x-api-version") || req.header("x-api-version") == "1" {
        return deny(410, `API v1 is gone for ${t}`);
    }
    req.set_header("x-tenant-id", t);
    req.append_header("x-seen", `${req.method} ${req.path} ${1 + 0 == 1}`);
}"#,
    r#"fn on_request(req) {
    let v = req.header("x-api-version");
    if v == () { req.remove_header("x-debug"); } else if v != "2" { req.set_upstream("legacy"); } else {
        let v = `${v}!`;
        req.set_header("x-v", v);
    }
    req.set_header("x-q", `${req.query_param("page")}/${req.query}/${req.host}/${req.client_ip}`);
    req.set_header("x-r", `${req.route}|${req.upstream}|${req.upstream_path}|${true}|${()}|${42}`);
    req.set_header("x-trace", req.trace_id);
}"#,
    // The value of the last statement is what the hook returns.
    r#"fn on_request(req) {
    deny(403, "discarded");
    if req.header("x-tenant") == "acme" { deny(403, "acme is blocked") }
}"#,
    r#"fn on_request(req) {
    req.header("x-tenant")
}"#,
    r#"fn on_request(req) {
    if req.header("x-tenant") != () { return redirect(302, `/t/${req.header("x-tenant")}`); }
    req.set_path("/v2/orders");
    req.set_query("a=1");
    { let x = "inner"; req.set_header("x-inner", x); }
    return;
}"#,
    // Errors: a header the gateway owns, a bad status, a path that is not normalised.
    r#"fn on_request(req) {
    if req.header("x-tenant") == "acme" {
        req.set_header("host", "evil");
    }
    if req.header("x-api-version") == "1" { return deny(200, "no"); }
    if req.header("x-tenant") == () { req.set_path("/a/../b"); }
}"#,
    r#"fn on_request(req) {
    req.set_header("x-t", `${req.header("x-tenant")}${req.header("x-tenant")}`);
}"#,
    // Chains, string methods and `+`.
    r#"fn on_request(req) {
    if req.path.starts_with("/api/") && !req.path.ends_with("/7") { return deny(404, "no"); }
    let t = (req.header("x-tenant") ?? "").to_lower();
    if t.contains("cm") || t.len() > 100 || req.method.to_upper() == "GET" {
        req.set_header("x-t", "t-" + t + ());
    }
}"#,
    r#"fn on_request(req) {
    req.set_header("x-l", `${req.path.len} ${"ÄÖ".to_lower()} ${"straße".to_upper()} ${"".to_upper()}`);
    let long = req.header("x-tenant") ?? "";
    req.set_header("x-long", long + long);
    if req.header("x-api-version") + "" == "2" { req.append_header("x-v", () + "two"); }
}"#,
    r#"fn on_response(req, res) {
    let ct = res.header("content-type");
    if res.status >= 500 && res.status < 600 {
        res.set_status(502);
        res.set_header("retry-after", "5");
        res.remove_header("server");
    } else if ct == "application/json" && res.header("cache-control") == () {
        res.append_header("cache-control", "no-store");
    }
    if req.header("x-tenant") == "other" && !res.has_header("x-a") { return deny(451, "legal"); }
    if res.status <= 200 || res.status > 999 { res.set_status(700); }
}"#,
];

#[test]
fn direct_hooks_do_what_rhai_does() {
    for src in DIRECT_SCRIPTS {
        let direct = same_both_ways(src, &Limits::default());
        assert!(direct.iter().any(|d| *d), "no direct form for:\n{src}");
        // A small string limit: long header values and interpolations fail the same way.
        let small = Limits {
            max_string_size: 64,
            ..Limits::default()
        };
        same_both_ways(src, &small);
    }
}

#[test]
fn direct_form_operation_bound_holds_in_rhai() {
    for src in DIRECT_SCRIPTS {
        let p = policy(src, &Limits::default());
        for (i, h) in p.policy.hooks.iter().enumerate() {
            let Some(bound) = h
                .as_ref()
                .and_then(|h| h.direct.as_ref())
                .map(|d| d.ops_bound)
            else {
                continue;
            };
            // Rhai with exactly the bound as its operation limit never runs out.
            let limits = Limits {
                max_operations: bound,
                ..Limits::default()
            };
            let (_, interpreted) = direct_and_interpreted(src, &limits);
            for r in sample_requests() {
                let res = response(503, &[]);
                let out = if i == 0 {
                    interpreted.on_request(&r)
                } else {
                    interpreted.on_response(&r, &res)
                };
                if let Err(f) = out {
                    assert_ne!(
                        f.reason,
                        Reason::Operations,
                        "bound {bound} too low for:\n{src}"
                    );
                }
            }
        }
    }
}

#[test]
fn hooks_outside_the_direct_form_run_in_rhai() {
    for src in [
        // A loop, a script function, a map, a method on a string, a print.
        "fn on_request(req) { for i in 0..2 { req.set_header(`x-${i}`, \"v\"); } }",
        "fn t(req) { req.header(\"x-tenant\") }\nfn on_request(req) { req.set_header(\"x-t\", t(req) ?? \"\"); }",
        "fn on_request(req) { let c = req.config; if c.x != () { req.set_header(\"x\", \"y\"); } }",
        // A string method on a value that may be `()`, a string method Rhai has but the direct
        // form does not, `()` + `()` possible.
        "fn on_request(req) { if req.header(\"x-tenant\").starts_with(\"a\") { req.set_header(\"x\", \"y\"); } }",
        "fn on_request(req) { let t = req.header(\"x-tenant\") ?? \"\"; req.set_header(\"x-t\", t.sub_string(1)); }",
        "fn on_request(req) { let t = req.header(\"x-tenant\"); if t + t == () { req.set_header(\"x\", \"y\"); } }",
        "fn on_request(req) { print(\"hi\"); }",
        // A call whose argument may be `()` at run time: Rhai refuses it, the direct form would have to.
        "fn on_request(req) { req.set_header(\"x-t\", req.header(\"x-tenant\")); }",
        // A script function shadowing a host function.
        "fn deny(a, b) { () }\nfn on_request(req) { return deny(403, \"x\"); }",
    ] {
        assert_eq!(same_both_ways(src, &Limits::default()), [false; 2], "{src}");
    }
    // Over the operation limit, the direct form is not used and Rhai stops the hook.
    let tiny = Limits {
        max_operations: 5,
        ..Limits::default()
    };
    let src = include_str!("../../bench/typical.rhai");
    assert_eq!(same_both_ways(src, &tiny), [false; 2]);
    let f = policy(src, &tiny)
        .on_request(&sample_requests()[1])
        .unwrap_err();
    assert_eq!(f.reason, Reason::Operations, "{f}");
}

#[test]
fn req_trace_id_is_the_requests_trace_in_hex_and_empty_without_tracing() {
    // `interpolated` goes through Rhai (string interpolation), `direct` through the direct form.
    let limits = Limits::default();
    let interpolated = policy(
        "fn on_request(req) { let t = req.trace_id; req.set_header(\"x-trace\", `${t}|${t.len()}`) }",
        &limits,
    );
    let direct = policy(
        "fn on_request(req) { req.set_header(\"x-trace\", req.trace_id) }",
        &limits,
    );
    let traced = || req_with(&[], None);
    for (p, r, want) in [
        (
            &interpolated,
            traced(),
            "4bf92f3577b34da6a3ce929d0e0e4736|32",
        ),
        (&interpolated, req(), "|0"),
        (&direct, traced(), "4bf92f3577b34da6a3ce929d0e0e4736"),
        (&direct, req(), ""),
    ] {
        assert!(p.on_request(&r).unwrap().is_none());
        assert_eq!(
            r.state().header_values("x-trace").next(),
            Some(want.as_bytes())
        );
    }
}

/// Runs the test `name` (this module's) alone in a child process, where `body` runs: a test
/// that measures the process's peak memory, or that might overflow a stack and abort, cannot
/// take the other tests (or the harness) with it. In the child, runs `body`.
pub(super) fn in_child(name: &str, body: impl FnOnce()) {
    const CHILD: &str = "RUSTYGATE_TEST_CHILD";
    let full = format!("policy::tests::{name}");
    if std::env::var(CHILD).as_deref() == Ok(full.as_str()) {
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("test binary: {e}"));
    let out = std::process::Command::new(exe)
        .args([full.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, &full)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the child: {e}"));
    assert!(
        out.status.success(),
        "{full} in a child process: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This process's peak resident memory (`VmHWM`), in bytes.
#[cfg(target_os = "linux")]
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(target_os = "linux")]
#[test]
fn replace_fails_on_string_size_before_building_the_result() {
    in_child(
        "replace_fails_on_string_size_before_building_the_result",
        || {
            let before = peak_rss();
            // 2000 matches of a 65000-byte replacement: a 130 MB result, each argument within
            // the default 64 KiB.
            let f = fails(
                "fn on_request(req) {\n let s = \"a\"; s.pad(2000, 'a');\n let t = \"b\"; t.pad(65000, 'b');\n s.replace(\"a\", t);\n }",
                &Limits::default(),
            );
            assert_eq!(f.reason, Reason::StringSize, "{f}");
            assert_eq!(f.line, Some(4), "{f}");
            let grew = peak_rss().saturating_sub(before);
            assert!(grew < 32 << 20, "peak memory grew by {} MiB", grew >> 20);
            for src in [
                "s.replace(\"\", t)",
                "s.replace('a', t)",
                "t.replace(\"b\", s)",
                "t.replace('b', '😀')",
                "s.pad(70000, 'x')",
                "s.pad(20000, '😀')",
                "s.pad(70000, \"xy\")",
            ] {
                let f = fails(
                    &format!(
                        "fn on_request(req) {{\n let s = \"a\"; s.pad(2000, 'a');\n let t = \"b\"; t.pad(65000, 'b');\n {src};\n }}"
                    ),
                    &Limits::default(),
                );
                assert_eq!(f.reason, Reason::StringSize, "{src}: {f}");
            }
        },
    );
}

#[test]
fn results_within_the_limit_are_what_rhai_builds() {
    let p = policy(
        r#"fn on_request(req) {
            let s = "hello, world! hello";
            s.replace("hello", "hey"); s.replace('!', "?!"); s.replace("o", '0'); s.replace(',', ';');
            let e = "ab"; e.replace("", "-");
            let p = "hi"; p.pad(5, '😀'); p.pad(9, "xy");
            let big = "a"; big.pad(1000, 'a'); big.replace("a", "bb");
            req.set_header("x-s", s);
            req.set_header("x-e", e);
            req.set_header("x-p", p);
            req.set_header("x-n", `${big.len}`);
        }"#,
        &Limits {
            max_string_size: 2000,
            ..Limits::default()
        },
    );
    let r = req();
    p.on_request(&r).unwrap_or_else(|e| panic!("{e}"));
    let st = r.state();
    let get = |n: &str| {
        st.header_values(n)
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get("x-s").as_deref(), Some("hey; w0rld?! hey"));
    assert_eq!(get("x-e").as_deref(), Some("-a-b-"));
    assert_eq!(get("x-p").as_deref(), Some("hi😀😀😀xyxy"));
    assert_eq!(get("x-n").as_deref(), Some("2000"));
}

#[test]
fn padding_with_an_empty_string_returns() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let p = policy(
            "fn on_request(req) { let s = \"x\"; s.pad(10, \"\"); req.set_header(\"x-s\", s); }",
            &Limits::default(),
        );
        let _ = tx.send(p.on_request(&req()).map(|_| ()).map_err(|e| e.to_string()));
    });
    let out = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(out, Ok(Ok(()))),
        "pad with \"\" did not return in 10 s: {out:?}"
    );
}

/// Runs `src`'s `on_request` on a thread with an actix worker's stack (2 MiB, Rust's default).
fn on_worker_stack(src: &str, limits: &Limits) -> Result<Option<Verdict>, PolicyFailure> {
    let (src, limits) = (src.to_owned(), limits.clone());
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || policy(&src, &limits).on_request(&req()))
        .unwrap_or_else(|e| panic!("cannot start a thread: {e}"))
        .join()
        .unwrap_or_else(|_| panic!("the hook panicked"))
}

#[test]
fn deeply_nested_values_stop_on_nesting_not_the_stack() {
    // Without the depth limit this overflowed the stack, which aborts the process: hence the
    // child process, so the harness reports it.
    in_child("deeply_nested_values_stop_on_nesting_not_the_stack", || {
        let limits = Limits {
            max_operations: 0,
            budget: Duration::from_secs(60),
            ..Limits::default()
        };
        for src in [
            "fn on_request(req) { let a = []; for i in 0..9000 { a = [take(a)]; } }",
            "fn on_request(req) { let a = []; for i in 0..9000 { a = [a]; } }",
            "fn on_request(req) { let m = #{}; for i in 0..9000 { m = #{ k: [take(m)] }; } }",
            "fn on_request(req) { let a = []; for i in 0..9000 { let b = [a]; a = b; } print(a); }",
            "fn on_request(req) { for i in 0..9000 { req.ctx = #{ k: req.ctx }; } }",
        ] {
            match on_worker_stack(src, &limits) {
                Err(f) => assert_eq!(f.reason, Reason::Nesting, "{src}: {f}"),
                Ok(v) => panic!("{src}: did not fail: {v:?}"),
            }
        }
        // Values up to the limit are fine, and what the script does with them works.
        let ok = format!(
            "fn on_request(req) {{ let a = []; for i in 0..{} {{ a = [a]; }} let s = to_json(a); let b = a; req.ctx = #{{ k: b }}; if a != b {{ throw \"differ\"; }} }}",
            super::sizes::MAX_DEPTH - 2
        );
        on_worker_stack(&ok, &limits).unwrap_or_else(|f| panic!("{f}"));
        // Script functions that return nested literals nest without reading a variable: at
        // most `max_call_depth` times one expression (here 14 x 10 levels), and that is read
        // before it goes deeper. (30 x 6 levels end on the stack budget in a debug build.)
        let nest = format!("{}down(n - 1){}", "[".repeat(10), "]".repeat(10));
        let src = format!(
            "fn down(n) {{ if n == 0 {{ [] }} else {{ {nest} }} }}\nfn on_request(req) {{ let a = down(14); let s = to_json(down(14)); print(down(14)); let b = [a]; }}"
        );
        match on_worker_stack(&src, &limits) {
            Err(f) => assert_eq!(f.reason, Reason::Nesting, "{f}"),
            Ok(v) => panic!("did not fail: {v:?}"),
        }
    });
}

#[test]
fn recursion_deeper_than_the_stack_fails_the_call_not_the_process() {
    // Rhai recurses on the thread's stack. With the default limits (31 calls of a body nesting
    // 20 expressions) a debug build overflowed a worker's 2 MiB stack, which aborts the process;
    // a config may raise `max_call_depth` until a release build does too.
    in_child(
        "recursion_deeper_than_the_stack_fails_the_call_not_the_process",
        || {
            let body = |calls: u32| {
                let nest = format!("{}f(n - 1){}", "(1 + ".repeat(20), ")".repeat(20));
                format!(
                    "fn f(n) {{ if n == 0 {{ 0 }} else {{ {nest} }} }}\nfn on_request(req) {{ let a = f({calls}); if a != {calls} * 20 {{ throw \"wrong\"; }} }}"
                )
            };
            let limits = Limits {
                max_call_depth: 5000,
                max_operations: 0,
                budget: Duration::from_secs(60),
                ..Limits::default()
            };
            for calls in [31, 4000] {
                match on_worker_stack(&body(calls), &limits) {
                    Err(f) => {
                        assert_eq!(f.reason, Reason::CallDepth, "{f}");
                        assert!(f.message.contains("stack"), "{f}");
                    }
                    // A release build fits the default limits' depth in the budget.
                    Ok(v) if calls == 31 && !cfg!(debug_assertions) => assert!(v.is_none()),
                    Ok(v) => panic!("{calls} calls did not fail: {v:?}"),
                }
            }
            // Recursion well within the budget runs and gets its value.
            on_worker_stack(&body(3), &limits).unwrap_or_else(|f| panic!("{f}"));
        },
    );
}
