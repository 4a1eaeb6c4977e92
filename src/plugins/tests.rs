//! Plugins written in WAT, each doing one thing (or one wrong thing), run through the same
//! `on_request` / `on_response` / drop path the handler uses.

use std::net::{IpAddr, Ipv4Addr};

use sha2::{Digest, Sha256};

use super::*;
use crate::decide::Incoming;

/// A minimal proxy-wasm module: a bump allocator, a context-create no-op, some strings in
/// memory, and the functions in `extra`.
pub(super) fn module(extra: &str) -> Vec<u8> {
    let src = format!(
        r#"(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (data (i32.const 0) "x-added")
  (data (i32.const 16) "yes")
  (data (i32.const 32) "x-drop")
  (data (i32.const 48) "user-agent")
  (data (i32.const 64) "replaced")
  (data (i32.const 80) "denied")
  (data (i32.const 96) "content-length")
  {extra}
)"#
    );
    wat::parse_str(&src).expect("test module is valid WAT")
}

pub(super) const NOOP_CREATE: &str = r#"(func (export "proxy_on_context_create") (param i32 i32))"#;

pub(super) fn plugin(name: &str, extra: &str, on_error: OnError, limits: Limits) -> Arc<PluginUse> {
    let bytes = module(&format!("{NOOP_CREATE}\n{extra}"));
    plugin_from(name, &bytes, on_error, limits)
}

pub(super) fn plugin_from(
    name: &str,
    bytes: &[u8],
    on_error: OnError,
    limits: Limits,
) -> Arc<PluginUse> {
    let sha = hex::encode(Sha256::digest(bytes));
    let p = Plugin::compile(name, "plugins/test.wasm", bytes, &sha, on_error, limits)
        .unwrap_or_else(|e| panic!("{name} compiles: {e}"));
    Arc::new(PluginUse {
        plugin: Arc::new(p),
        config: Bytes::new(),
    })
}

pub(super) fn incoming() -> Incoming<'static> {
    Incoming {
        method: "POST",
        host: "example.com",
        path: "/orders",
        query: Some("page=2"),
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        claims: None,
        trace_id: None,
    }
}

fn client() -> ClientHeaders {
    [
        ("user-agent", &b"curl"[..]),
        ("x-drop", b"1"),
        ("accept", b"*/*"),
    ]
    .into_iter()
    .collect()
}

pub(super) fn errors(name: &str, reason: &str) -> u64 {
    ERRORS.with_label_values(&[name, reason]).get()
}

pub(super) fn request(plugins: &[Arc<PluginUse>]) -> (PluginRun, Outcome) {
    let inc = incoming();
    let info = RequestInfo {
        incoming: &inc,
        route: "orders",
        config_sha: "abc123",
    };
    on_request(plugins, &info, client())
}

pub(super) fn is_continue(o: &Outcome) -> bool {
    matches!(o, Outcome::Continue)
}

pub(super) fn is_failed(o: &Outcome) -> bool {
    matches!(o, Outcome::Failed)
}

pub(super) const CONTINUE_ON_REQUEST: &str =
    r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))"#;

#[test]
fn an_endless_loop_is_stopped_by_metering_and_the_thread_keeps_serving() {
    let name = "loop-forever";
    let looping = plugin(
        name,
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (loop $l (br $l)) (i32.const 0))"#,
        OnError::FailClosed,
        Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        },
    );
    let (_, out) = request(std::slice::from_ref(&looping));
    assert!(is_failed(&out));
    assert_eq!(errors(name, "instructions"), 1);
    // The next request gets a fresh instance, stopped the same way: nothing hangs.
    let (_, out) = request(std::slice::from_ref(&looping));
    assert!(is_failed(&out));
    assert_eq!(errors(name, "instructions"), 2);
    // And the same thread serves other plugins as before.
    let fine = plugin(
        "fine-after-loop",
        CONTINUE_ON_REQUEST,
        OnError::FailClosed,
        Limits::default(),
    );
    let (_, out) = request(&[fine]);
    assert!(is_continue(&out));
}

/// Grows memory a page at a time until `memory.grow` refuses, then checks (inside the plugin)
/// that it stopped at exactly 4 pages: the 256 KiB cap.
const GROW_UNTIL_REFUSED: &str = r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (block $done
      (loop $more
        (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
    (if (i32.ne (memory.size) (i32.const 4)) (then unreachable))
    (i32.const 0))"#;

#[test]
fn memory_cannot_grow_past_max_memory() {
    let p = plugin(
        "grow-to-cap",
        GROW_UNTIL_REFUSED,
        OnError::FailClosed,
        Limits {
            max_memory: 4 * PAGE,
            ..Limits::default()
        },
    );
    let (_, out) = request(&[p]);
    assert!(is_continue(&out), "memory.grow went past the 4-page cap");
}

#[test]
fn tables_cannot_grow_past_the_cap() {
    // Traps unless growing by 5,000,000 answers -1, growing to the cap (100,000) answers the
    // old size, and one more element answers -1.
    let bytes = wat::parse_str(
        r#"(module
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.ne (table.grow $t (ref.null func) (i32.const 5000000)) (i32.const -1)) (then unreachable))
    (if (i32.ne (table.grow $t (ref.null func) (i32.const 99999)) (i32.const 1)) (then unreachable))
    (if (i32.ne (table.grow $t (ref.null func) (i32.const 1)) (i32.const -1)) (then unreachable))
    (i32.const 0)))"#,
    )
    .expect("test module is valid WAT");
    let p = plugin_from("table-grow", &bytes, OnError::FailClosed, Limits::default());
    let (_, out) = request(&[p]);
    assert!(
        is_continue(&out),
        "table.grow went past the cap (trap: {})",
        errors("table-grow", "trap")
    );
}

#[test]
fn running_out_of_memory_is_a_memory_failure_and_fail_open_goes_on() {
    let name = "oom-open";
    let p = plugin(
        name,
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (block $done
               (loop $more
                 (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
                 (br $more)))
             unreachable)"#,
        OnError::FailOpen,
        Limits {
            max_memory: 2 * PAGE,
            ..Limits::default()
        },
    );
    let (run, out) = request(&[p]);
    assert!(is_continue(&out));
    assert_eq!(errors(name, "memory"), 1);
    // The failed plugin's context is gone: it gets no response or log callbacks.
    assert!(run.active.is_empty());
}

/// The error `Plugin::compile` refuses `bytes` with, as text.
fn refused(name: &str, bytes: &[u8]) -> String {
    let sha = hex::encode(Sha256::digest(bytes));
    match Plugin::compile(
        name,
        "plugins/test.wasm",
        bytes,
        &sha,
        OnError::FailClosed,
        Limits::default(),
    ) {
        Ok(_) => panic!("{name} compiled, but should have been refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn imports_outside_the_subset_are_refused_by_name() {
    let bytes = wat::parse_str(
        r#"(module
             (import "env" "proxy_frobnicate" (func (param i32) (result i32)))
             (import "wasi_snapshot_preview1" "path_open" (func (param i32) (result i32)))
             (memory (export "memory") 1))"#,
    )
    .unwrap();
    let msg = refused("bad", &bytes);
    assert!(msg.contains("env.proxy_frobnicate"), "{msg}");
    assert!(msg.contains("wasi_snapshot_preview1.path_open"), "{msg}");
}

#[test]
fn a_module_that_imports_its_memory_is_refused() {
    let bytes = wat::parse_str(r#"(module (import "env" "memory" (memory 1)))"#).unwrap();
    let msg = refused("mem", &bytes);
    assert!(msg.contains("env.memory"), "{msg}");
}

#[test]
fn an_sdk_import_outside_the_subset_answers_unimplemented() {
    // proxy_http_call is imported by every Rust SDK plugin; calling it gets status 12.
    let p = plugin(
        "calls-out",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (if (i32.ne (call $http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                   (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
                   (i32.const 12))
               (then unreachable))
             (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (_, out) = request(&[p]);
    assert!(is_continue(&out));
}

const TRAP: &str = "unreachable";

#[test]
fn a_trap_at_start_up_or_a_refused_configuration_fails_the_check() {
    let vm_start = plugin(
        "trap-vm-start",
        &format!(r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) {TRAP})"#),
        OnError::FailClosed,
        Limits::default(),
    );
    assert_eq!(vm_start.check().unwrap_err().reason(), "trap");
    let configure = plugin(
        "refuse-config",
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let e = configure.check().unwrap_err();
    assert!(e.to_string().contains("proxy_on_configure"), "{e}");
    // The trap in `proxy_on_context_create` of the root context.
    let bytes = module(&format!(
        r#"(func (export "proxy_on_context_create") (param i32 i32) {TRAP})"#
    ));
    let create = plugin_from(
        "trap-create",
        &bytes,
        OnError::FailClosed,
        Limits::default(),
    );
    assert_eq!(create.check().unwrap_err().reason(), "trap");
}

#[test]
fn a_trap_in_on_request_headers_fails_closed_or_goes_on_without_the_plugins_edits() {
    let body = format!(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $add (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)))
             {TRAP})"#
    );
    let closed = plugin(
        "trap-req-closed",
        &body,
        OnError::FailClosed,
        Limits::default(),
    );
    let (_, out) = request(&[closed]);
    assert!(is_failed(&out));
    assert_eq!(errors("trap-req-closed", "trap"), 1);

    let open = plugin("trap-req-open", &body, OnError::FailOpen, Limits::default());
    let (run, out) = request(&[open]);
    assert!(is_continue(&out));
    assert_eq!(errors("trap-req-open", "trap"), 1);
    let mut upstream = HeaderMap::new();
    run.apply_edits(&mut upstream);
    assert!(
        upstream.is_empty(),
        "the trapped plugin's edit was kept: {upstream:?}"
    );
}

#[test]
fn a_trap_in_on_response_headers_fails_closed_or_goes_on() {
    let body = format!(
        r#"{CONTINUE_ON_REQUEST}
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (drop (call $add (i32.const 2) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)))
             (drop (call $replace (i32.const 2) (i32.const 48) (i32.const 10) (i32.const 64) (i32.const 8)))
             (drop (call $remove (i32.const 2) (i32.const 32) (i32.const 6)))
             {TRAP})"#
    );
    let closed = plugin(
        "trap-res-closed",
        &body,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[closed]);
    assert!(is_continue(&out));
    let mut h = HeaderMap::new();
    assert!(is_failed(&run.on_response("orders", 200, &mut h)));
    assert_eq!(errors("trap-res-closed", "trap"), 1);

    let open = plugin("trap-res-open", &body, OnError::FailOpen, Limits::default());
    let (run, _) = request(&[open]);
    // Its changes, made in place before it trapped, are undone.
    let mut h = HeaderMap::new();
    h.insert("user-agent", HeaderValue::from_static("upstream"));
    h.append("user-agent", HeaderValue::from_static("again"));
    h.insert("x-drop", HeaderValue::from_static("1"));
    let before = h.clone();
    assert!(is_continue(&run.on_response("orders", 200, &mut h)));
    assert_eq!(errors("trap-res-open", "trap"), 1);
    assert_eq!(h, before);

    // The same on a head in the client's types (a list, as the gateway's HTTP/1.1 client parses
    // a head only plugins edit): the same values again.
    let open = plugin(
        "trap-res-open-list",
        &body,
        OnError::FailOpen,
        Limits::default(),
    );
    let (run, _) = request(&[open]);
    let field = |n: &'static str, v: &'static str| {
        (
            actix_http::header::HeaderName::from_static(n),
            actix_http::header::HeaderValue::from_static(v),
        )
    };
    let before = vec![
        field("user-agent", "upstream"),
        field("x-drop", "1"),
        field("user-agent", "again"),
    ];
    let mut l = before.clone();
    assert!(is_continue(&run.on_response_list("orders", 200, &mut l)));
    assert_eq!(errors("trap-res-open-list", "trap"), 1);
    let values = |l: &[(
        actix_http::header::HeaderName,
        actix_http::header::HeaderValue,
    )],
                  n: &str| {
        l.iter()
            .filter(|(m, _)| m.as_str() == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(l.len(), before.len());
    for n in ["user-agent", "x-drop"] {
        assert_eq!(values(&l, n), values(&before, n), "{n}");
    }
}

#[test]
fn a_trap_leaves_the_other_requests_in_the_instance_to_finish() {
    // Contexts 2 and 3 are the first two requests' in a fresh instance; the second traps.
    let body = format!(
        r#"{CONTINUE_ON_REQUEST}
           (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
             (if (i32.eq (local.get $ctx) (i32.const 3)) (then {TRAP}))
             (i32.const 0))
           (func (export "proxy_on_log") (param $ctx i32)
             (if (i32.eq (local.get $ctx) (i32.const 3)) (then {TRAP})))"#
    );
    let p = plugin("neighbours", &body, OnError::FailClosed, Limits::default());
    let (first, out) = request(&[Arc::clone(&p)]);
    assert!(is_continue(&out));
    let (second, out) = request(&[Arc::clone(&p)]);
    assert!(is_continue(&out));
    let mut h = HeaderMap::new();
    assert!(is_failed(&second.on_response("orders", 200, &mut h)));
    // The first request is still in the instance that trapped, and finishes there.
    assert!(is_continue(&first.on_response("orders", 200, &mut h)));
    // A new request gets a fresh instance (its context is 2 there, which does not trap).
    let (third, out) = request(&[Arc::clone(&p)]);
    assert!(is_continue(&out));
    assert!(is_continue(&third.on_response("orders", 200, &mut h)));
    drop((first, third));
    // The context that failed is not called again (its on_log would trap).
    drop(second);
    assert_eq!(errors("neighbours", "trap"), 1);
    assert_eq!(errors("neighbours", "refused"), 0);
}

#[test]
fn a_trap_in_on_log_is_counted() {
    let body = format!(
        r#"{CONTINUE_ON_REQUEST}
           (func (export "proxy_on_log") (param i32) {TRAP})"#
    );
    let p = plugin("trap-log", &body, OnError::FailClosed, Limits::default());
    let (run, out) = request(&[p]);
    assert!(is_continue(&out));
    assert_eq!(errors("trap-log", "trap"), 0);
    drop(run);
    assert_eq!(errors("trap-log", "trap"), 1);
}

#[test]
fn header_edits_reach_the_upstream_and_the_client() {
    let p = plugin(
        "edits",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $add (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)))
             (drop (call $replace (i32.const 0) (i32.const 48) (i32.const 10) (i32.const 64) (i32.const 8)))
             (drop (call $remove (i32.const 0) (i32.const 32) (i32.const 6)))
             (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (drop (call $add (i32.const 2) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)))
             (drop (call $remove (i32.const 2) (i32.const 32) (i32.const 6)))
             (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[p]);
    assert!(is_continue(&out));
    // What the policy sees next.
    let seen = run.client_headers();
    assert_eq!(
        seen.get_all("x-added").collect::<Vec<_>>(),
        vec![&b"yes"[..]]
    );
    assert_eq!(
        seen.get_all("user-agent").collect::<Vec<_>>(),
        vec![&b"replaced"[..]]
    );
    assert_eq!(seen.get_all("x-drop").count(), 0);
    // What the upstream gets: the gateway's own headers stay.
    let mut up = HeaderMap::new();
    up.insert("user-agent", HeaderValue::from_static("curl"));
    up.insert("x-drop", HeaderValue::from_static("1"));
    up.insert("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
    run.apply_edits(&mut up);
    assert_eq!(up.get("x-added").unwrap(), "yes");
    assert_eq!(up.get("user-agent").unwrap(), "replaced");
    assert!(up.get("x-drop").is_none());
    assert_eq!(up.get("x-forwarded-for").unwrap(), "127.0.0.1");
    // The response side.
    let mut res = HeaderMap::new();
    res.insert("x-drop", HeaderValue::from_static("1"));
    res.insert("content-type", HeaderValue::from_static("text/plain"));
    assert!(is_continue(&run.on_response("orders", 200, &mut res)));
    assert_eq!(res.get("x-added").unwrap(), "yes");
    assert!(res.get("x-drop").is_none());
    assert_eq!(res.get("content-type").unwrap(), "text/plain");
}

#[test]
fn a_header_replaced_with_the_clients_own_value_leaves_the_gateways() {
    // `user-agent` replaced with what the client sent ("curl"): upstream, the gateway's value
    // (as for a header it sets from verified data) stays; a real change still lands.
    let p = plugin(
        "same-value",
        r#"(data (i32.const 128) "curl")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $replace (i32.const 0) (i32.const 48) (i32.const 10) (i32.const 128) (i32.const 4)))
             (drop (call $replace (i32.const 0) (i32.const 32) (i32.const 6) (i32.const 16) (i32.const 3)))
             (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[p]);
    assert!(is_continue(&out));
    let mut up = HeaderMap::new();
    up.insert("user-agent", HeaderValue::from_static("set-by-the-gateway"));
    up.insert("x-drop", HeaderValue::from_static("1"));
    run.apply_edits(&mut up);
    assert_eq!(up.get("user-agent").unwrap(), "set-by-the-gateway");
    assert_eq!(up.get("x-drop").unwrap(), "yes");
}

#[test]
fn framing_headers_cannot_be_set() {
    // The plugin traps unless adding `content-length` is refused with BAD_ARGUMENT (2).
    let p = plugin(
        "framing",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (if (i32.ne (call $add (i32.const 0) (i32.const 96) (i32.const 14) (i32.const 16) (i32.const 3))
                         (i32.const 2))
               (then unreachable))
             (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (_, out) = request(&[p]);
    assert!(is_continue(&out));
}

/// The headers the gateway writes for the upstream (and `x-request-id` for the client too).
const GATEWAY_OWNED: [&str; 6] = [
    "x-forwarded-for",
    "x-request-id",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

#[test]
fn headers_the_gateway_owns_cannot_be_set_or_removed() {
    // For each name (at 256 + 32 i): add, replace and remove answer BAD_ARGUMENT (2), on the
    // request and on the response; anything else traps.
    let mut data = String::new();
    let mut checks = String::new();
    for (i, name) in GATEWAY_OWNED.iter().enumerate() {
        let at = 256 + 32 * i;
        let len = name.len();
        data.push_str(&format!("(data (i32.const {at}) \"{name}\")\n"));
        checks.push_str(&format!(
            "(if (i32.ne (call $replace (local.get $map) (i32.const {at}) (i32.const {len}) (i32.const 64) (i32.const 8)) (i32.const 2)) (then unreachable))
             (if (i32.ne (call $add (local.get $map) (i32.const {at}) (i32.const {len}) (i32.const 64) (i32.const 8)) (i32.const 2)) (then unreachable))
             (if (i32.ne (call $remove (local.get $map) (i32.const {at}) (i32.const {len})) (i32.const 2)) (then unreachable))\n"
        ));
    }
    let p = plugin(
        "gateway-owned",
        &format!(
            r#"{data}
           (func $checks (param $map i32) {checks})
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $checks (i32.const 0)) (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (call $checks (i32.const 2)) (i32.const 0))"#
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[p]);
    assert!(
        is_continue(&out),
        "a request header the gateway owns was set (trap: {})",
        errors("gateway-owned", "trap")
    );
    // The upstream gets the gateway's values.
    let mut up = HeaderMap::new();
    up.insert("x-request-id", HeaderValue::from_static("real-id"));
    up.insert("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
    run.apply_edits(&mut up);
    assert_eq!(up.get("x-request-id").unwrap(), "real-id");
    assert_eq!(up.get("x-forwarded-for").unwrap(), "127.0.0.1");
    let mut res = HeaderMap::new();
    res.insert("x-request-id", HeaderValue::from_static("real-id"));
    assert!(
        is_continue(&run.on_response("orders", 200, &mut res)),
        "a response header the gateway owns was set"
    );
    assert_eq!(res.get("x-request-id").unwrap(), "real-id");
}

#[test]
fn a_header_map_written_back_whole_may_keep_but_not_change_the_gateways_headers() {
    // The map read with get_header_map_pairs and written back as it is: OK (0), though it
    // holds the client's X-Forwarded-For; one whose x-request-id is "evil": BAD_ARGUMENT (2).
    let bytes = wat::parse_str(
        r#"(module
  (import "env" "proxy_get_header_map_pairs" (func $get (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "\01\00\00\00\0c\00\00\00\04\00\00\00x-request-id\00evil\00")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.ne (call $get (i32.const 0) (i32.const 0) (i32.const 4)) (i32.const 0)) (then unreachable))
    (if (i32.ne (call $set (i32.const 0) (i32.load (i32.const 0)) (i32.load (i32.const 4))) (i32.const 0))
      (then unreachable))
    (if (i32.ne (call $set (i32.const 0) (i32.const 16) (i32.const 30)) (i32.const 2)) (then unreachable))
    (i32.const 0)))"#,
    )
    .expect("test module is valid WAT");
    let p = plugin_from(
        "pairs-owned",
        &bytes,
        OnError::FailClosed,
        Limits::default(),
    );
    let inc = incoming();
    let info = RequestInfo {
        incoming: &inc,
        route: "orders",
        config_sha: "abc123",
    };
    let client: ClientHeaders = [
        ("user-agent", &b"curl"[..]),
        ("x-forwarded-for", b"10.0.0.1"),
    ]
    .into_iter()
    .collect();
    let (run, out) = on_request(&[p], &info, client);
    assert!(
        is_continue(&out),
        "(trap: {})",
        errors("pairs-owned", "trap")
    );
    let mut up = HeaderMap::new();
    up.insert("x-request-id", HeaderValue::from_static("real-id"));
    up.insert(
        "x-forwarded-for",
        HeaderValue::from_static("10.0.0.1, 127.0.0.1"),
    );
    run.apply_edits(&mut up);
    assert_eq!(up.get("x-request-id").unwrap(), "real-id");
    assert_eq!(up.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
}

#[test]
fn content_length_can_be_removed_but_not_replaced() {
    // What the SDKs' body examples do in on_response_headers before changing a body: the
    // removal answers OK (0), a replacement BAD_ARGUMENT (2); anything else traps.
    let p = plugin(
        "drop-length",
        r#"(func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (if (i32.ne (call $replace (i32.const 2) (i32.const 96) (i32.const 14) (i32.const 16) (i32.const 3))
                         (i32.const 2))
               (then unreachable))
             (if (i32.ne (call $remove (i32.const 2) (i32.const 96) (i32.const 14)) (i32.const 0))
               (then unreachable))
             (i32.const 0))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut res = HeaderMap::new();
    res.insert("content-length", HeaderValue::from_static("42"));
    assert!(is_continue(&run.on_response("orders", 200, &mut res)));
    assert!(res.get("content-length").is_none(), "{res:?}");
}

#[test]
fn a_local_response_answers_the_request() {
    let p = plugin(
        "deny",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 80) (i32.const 6)
                   (i32.const 0) (i32.const 0) (i32.const -1)))
             (i32.const 1))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let never = plugin(
        "after-deny",
        CONTINUE_ON_REQUEST,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[p, never]);
    let Outcome::Respond(r) = out else {
        panic!("expected the plugin's response")
    };
    assert_eq!(r.status, 403);
    assert_eq!(&r.body[..], b"denied");
    // The plugin after it did not run.
    assert_eq!(run.active.len(), 1);
}

#[test]
fn pausing_without_answering_is_refused() {
    let name = "pauses";
    let p = plugin(
        name,
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 1))"#,
        OnError::FailClosed,
        Limits::default(),
    );
    let (_, out) = request(&[p]);
    assert!(is_failed(&out));
    assert_eq!(errors(name, "refused"), 1);
}

#[test]
fn compiled_modules_are_cached_by_sha256() {
    let bytes = module(&format!("{NOOP_CREATE}\n(func $unique_to_cache_test)"));
    let sha = hex::encode(Sha256::digest(&bytes));
    assert!(!is_cached(&sha, DEFAULT_MAX_MEMORY));
    let a = Plugin::compile(
        "c",
        "p.wasm",
        &bytes,
        &sha,
        OnError::FailClosed,
        Limits::default(),
    )
    .unwrap();
    assert!(is_cached(&sha, DEFAULT_MAX_MEMORY));
    let b = Plugin::compile(
        "c",
        "p.wasm",
        &bytes,
        &sha,
        OnError::FailClosed,
        Limits::default(),
    )
    .unwrap();
    assert!(Arc::ptr_eq(&a.compiled, &b.compiled));
    drop((a, b));
    // Nothing holds it any more: a later snapshot compiles it afresh.
    assert!(!is_cached(&sha, DEFAULT_MAX_MEMORY));
}

#[test]
fn instances_of_an_earlier_config_are_freed_when_the_next_one_starts() {
    let count = || INSTANCES.with(|m| m.borrow().current.len());
    let old = plugin(
        "old-config",
        CONTINUE_ON_REQUEST,
        OnError::FailClosed,
        Limits::default(),
    );
    drop(request(std::slice::from_ref(&old)));
    assert_eq!(count(), 1);
    // A reload: no snapshot holds the old use any more.
    drop(old);
    let new = plugin(
        "new-config",
        CONTINUE_ON_REQUEST,
        OnError::FailClosed,
        Limits::default(),
    );
    drop(request(&[new]));
    assert_eq!(count(), 1, "the old config's instance is still held");
}
