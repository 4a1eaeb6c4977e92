//! Host calls under the plugin's limits, with plugins written in WAT: the work a host function
//! does for a plugin is charged to the call's instruction budget.

use super::tests::{errors, incoming, is_continue, is_failed, plugin_from};
use super::*;

/// A plugin whose `on_request_headers` runs `call` (WAT leaving an `i32` status) `times` times,
/// trapping unless each answers 0. Its allocator always answers the second page.
fn looping(imports: &str, data: &str, call: &str, times: u32) -> Vec<u8> {
    let src = format!(
        r#"(module
  {imports}
  (memory (export "memory") 2)
  {data}
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 65536))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    (loop $l
      (if (i32.ne {call} (i32.const 0)) (then unreachable))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {times}))))
    (i32.const 0)))"#
    );
    wat::parse_str(&src).expect("test module is valid WAT")
}

/// Host calls that move 4–64 KiB each, as (name, import, data, call).
const CALLS: &[(&str, &str, &str, &str)] = &[
    (
        "charge-random",
        r#"(import "wasi_snapshot_preview1" "random_get" (func $f (param i32 i32) (result i32)))"#,
        "",
        "(call $f (i32.const 0) (i32.const 65536))",
    ),
    (
        "charge-log",
        r#"(import "env" "proxy_log" (func $f (param i32 i32 i32) (result i32)))"#,
        "",
        "(call $f (i32.const 2) (i32.const 0) (i32.const 4096))",
    ),
    (
        "charge-fd-write",
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $f (param i32 i32 i32 i32) (result i32)))"#,
        // One iovec at 0: 65,520 bytes from 16; the count written at 8.
        r#"(data (i32.const 0) "\10\00\00\00\f0\ff\00\00")"#,
        "(call $f (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))",
    ),
    (
        "charge-config",
        r#"(import "env" "proxy_get_buffer_bytes" (func $f (param i32 i32 i32 i32 i32) (result i32)))"#,
        "",
        "(call $f (i32.const 7) (i32.const 0) (i32.const 65536) (i32.const 0) (i32.const 4))",
    ),
    (
        "charge-map-pairs",
        r#"(import "env" "proxy_get_header_map_pairs" (func $f (param i32 i32 i32) (result i32)))"#,
        "",
        "(call $f (i32.const 0) (i32.const 0) (i32.const 4))",
    ),
];

/// Runs `on_request_headers` of `name` (one of [`CALLS`]), looping `times`, under
/// `max_instructions`, with a 64 KiB configuration and a 48 KiB request header.
fn run(name: &str, times: u32, max_instructions: u64) -> Outcome {
    let (_, imports, data, call) = CALLS.iter().find(|c| c.0 == name).expect("a case of CALLS");
    let limits = Limits {
        max_instructions,
        ..Limits::default()
    };
    let u = plugin_from(
        name,
        &looping(imports, data, call, times),
        OnError::FailClosed,
        limits,
    );
    let u = Arc::new(PluginUse {
        plugin: Arc::clone(&u.plugin),
        config: Bytes::from(vec![b'c'; 64 * 1024]),
    });
    let inc = incoming();
    let info = RequestInfo {
        incoming: &inc,
        route: "orders",
        config_sha: "abc123",
    };
    let big = vec![b'v'; 48 * 1024];
    let client: ClientHeaders = [("x-big", &big[..])].into_iter().collect();
    on_request(&[u], &info, client).1
}

#[test]
fn host_calls_are_charged_by_the_bytes_they_move() {
    // A hundred calls are about a thousand instructions of the plugin's own, well inside
    // 20,000, but move megabytes: the charge stops the call.
    let ran: Vec<&str> = CALLS
        .iter()
        .map(|c| c.0)
        .filter(|name| !is_failed(&run(name, 100, 20_000)))
        .collect();
    assert!(ran.is_empty(), "a hundred large host calls ran: {ran:?}");
    for (name, ..) in CALLS {
        let reasons =
            ["instructions", "time", "memory", "trap", "refused"].map(|r| errors(name, r));
        assert_eq!(reasons, [1, 0, 0, 0, 0], "{name}: failures by reason");
        // One such call is well within the default budget.
        let out = run(name, 1, Limits::default().max_instructions);
        assert!(is_continue(&out), "{name}: one call failed");
    }
}

#[test]
fn random_get_outside_memory_is_a_fault_before_any_work() {
    // 1 MiB from the last byte of the two pages: EFAULT (21), not a charge the budget of 10
    // cannot cover, and nothing made.
    let wasm = looping(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $f (param i32 i32) (result i32)))"#,
        "",
        "(i32.sub (call $f (i32.const 131071) (i32.const 1048576)) (i32.const 21))",
        1,
    );
    let u = plugin_from(
        "random-outside",
        &wasm,
        OnError::FailClosed,
        Limits {
            max_instructions: 50,
            ..Limits::default()
        },
    );
    let inc = incoming();
    let info = RequestInfo {
        incoming: &inc,
        route: "orders",
        config_sha: "abc123",
    };
    let out = on_request(&[u], &info, ClientHeaders::default()).1;
    assert!(is_continue(&out));
}

#[test]
fn a_logging_loop_logs_at_most_the_rate_and_each_line_is_bounded() {
    // 500 proxy_log calls of 4 KiB each in one request, and 500 fd_write lines.
    let name = "log-flood";
    let wasm = looping(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))"#,
        // An iovec at 0: the 2 bytes "w\n" at 16; the count written at 8.
        r#"(data (i32.const 0) "\10\00\00\00\02\00\00\00") (data (i32.const 16) "w\n")"#,
        "(i32.or (call $log (i32.const 2) (i32.const 32) (i32.const 4096))
                 (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))",
        500,
    );
    let u = plugin_from(name, &wasm, OnError::FailClosed, Limits::default());
    let dropped = crate::telemetry::sink::dropped(crate::telemetry::sink::DropReason::RateLimited);
    let started = std::time::Instant::now();
    let (out, text) = crate::util::captured_logs(tracing::Level::INFO, || {
        let inc = incoming();
        let info = RequestInfo {
            incoming: &inc,
            route: "orders",
            config_sha: "abc123",
        };
        on_request(&[u], &info, ClientHeaders::default()).1
    });
    let seconds = started.elapsed().as_secs();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
    let most = (log::LINES_PER_SECOND as usize + 1) * (seconds as usize + 1);
    assert!(
        (log::LINES_PER_SECOND as usize..=most).contains(&lines.len()),
        "{} lines of 1000 logged in {seconds} s",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains("route=\"orders\"") || l.contains("route=orders")),
        "{}",
        lines[0]
    );
    // A 4 KiB message is cut to a line's worth, and says so.
    let long = lines
        .iter()
        .find(|l| l.contains("more bytes not logged"))
        .expect("a cut line");
    assert!(long.len() < log::MAX_LINE + 200, "{} bytes", long.len());
    assert!(long.contains("[2048 more bytes not logged]"), "{long}");
    let reasons = ["instructions", "time", "trap"].map(|r| errors(name, r));
    assert!(is_continue(&out), "failures by reason: {reasons:?}");
    let counted =
        crate::telemetry::sink::dropped(crate::telemetry::sink::DropReason::RateLimited) - dropped;
    assert!(
        counted as usize >= 1000 - most,
        "{counted} lines counted as dropped"
    );
}
