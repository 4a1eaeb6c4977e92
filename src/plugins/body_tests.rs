//! Body callbacks (`proxy_on_request_body`, `proxy_on_response_body`) of plugins written in
//! WAT, driven through [`BodyFilter`] chunk by chunk as the handler drives it.

use super::tests::{
    CONTINUE_ON_REQUEST, NOOP_CREATE, errors, is_continue, module, plugin, plugin_from, request,
};
use super::*;

/// Strings the body plugins below use, past the ones `module` lays out.
const DATA: &str = r#"(data (i32.const 128) "REWRITTEN")
  (data (i32.const 144) "!")
  (data (i32.const 150) "a")
  (data (i32.const 151) "b")"#;

/// A request body callback with `body` as its instructions (params `$ctx $size $end`).
fn on_request_body(body: &str) -> String {
    format!(
        r#"{DATA}
  {CONTINUE_ON_REQUEST}
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $end i32) (result i32)
    {body})"#
    )
}

const LIMIT: u64 = 1024;

fn filter(run: &PluginRun) -> BodyFilter {
    run.request_body(LIMIT)
        .expect("a plugin of this run reads request bodies")
}

fn chunk(f: &mut BodyFilter, data: &'static [u8], end: bool) -> Bytes {
    match f.chunk(Bytes::from_static(data), end) {
        Ok(b) => b,
        Err(e) => panic!("the body was stopped: {e:?}"),
    }
}

#[test]
fn a_plugin_that_pauses_sees_the_whole_body_at_the_end_and_rewrites_it() {
    // Traps unless the last call sees all 6 bytes, "ab" + "cd" + "ef", in its buffer.
    let p = plugin(
        "pause-rewrite",
        &on_request_body(
            r#"(if (i32.eqz (local.get $end)) (then (return (i32.const 1))))
               (if (i32.ne (local.get $size) (i32.const 6)) (then unreachable))
               (if (i32.ne (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204))
                           (i32.const 0)) (then unreachable))
               (if (i32.ne (i32.load (i32.const 204)) (i32.const 6)) (then unreachable))
               (if (i32.ne (i32.load8_u (i32.load (i32.const 200))) (i32.const 97)) (then unreachable))
               (if (i32.ne (i32.load8_u (i32.add (i32.load (i32.const 200)) (i32.const 5))) (i32.const 102))
                 (then unreachable))
               (if (i32.ne (call $set_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 128) (i32.const 9))
                           (i32.const 0)) (then unreachable))
               (i32.const 0)"#,
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, out) = request(&[p]);
    assert!(is_continue(&out));
    let mut f = filter(&run);
    assert_eq!(f.held(), 0);
    assert_eq!(chunk(&mut f, b"ab", false), "");
    assert_eq!(f.held(), 2);
    assert_eq!(chunk(&mut f, b"cd", false), "");
    assert_eq!(f.held(), 4);
    assert_eq!(chunk(&mut f, b"ef", true), "REWRITTEN");
    // Let go: held no more.
    assert_eq!(f.held(), 0);
    assert_eq!(errors("pause-rewrite", "trap"), 0);
}

#[test]
fn a_plugin_that_continues_gets_each_chunk_and_may_append_to_it() {
    // Appends "!" (start past the end) to every chunk it lets go, the empty last one too.
    let p = plugin(
        "append",
        &on_request_body(
            r#"(if (i32.ne (call $set_buf (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 144) (i32.const 1))
                           (i32.const 0)) (then unreachable))
               (i32.const 0)"#,
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = filter(&run);
    assert_eq!(chunk(&mut f, b"ab", false), "ab!");
    assert_eq!(chunk(&mut f, b"cd", false), "cd!");
    assert_eq!(chunk(&mut f, b"", true), "!");
}

#[test]
fn what_a_pausing_plugin_holds_is_bounded_by_the_limit() {
    let p = plugin(
        "pause-forever",
        &on_request_body("(i32.const 1)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = run.request_body(4).unwrap();
    assert_eq!(chunk(&mut f, b"abc", false), "");
    assert!(matches!(
        f.chunk(Bytes::from_static(b"de"), false),
        Err(BodyStop::TooLarge)
    ));
}

#[test]
fn a_plugin_cannot_grow_a_body_past_the_limit() {
    // Appends its whole 64 KiB memory page until refused with BAD_ARGUMENT (2): with a limit
    // under 1 MiB, 1 MiB is the bound; never refused in 100 appends traps.
    let p = plugin(
        "grow-body",
        &on_request_body(
            r#"(local $i i32) (local $st i32)
               (block $done
                 (loop $more
                   (local.set $st (call $set_buf (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0) (i32.const 65536)))
                   (br_if $done (i32.eq (local.get $st) (i32.const 2)))
                   (if (i32.ne (local.get $st) (i32.const 0)) (then unreachable))
                   (local.set $i (i32.add (local.get $i) (i32.const 1)))
                   (br_if $more (i32.lt_u (local.get $i) (i32.const 100)))
                   unreachable))
               (i32.const 0)"#,
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = run.request_body(8).unwrap();
    // 15 pages fit with the 4 bytes under 1 MiB; the 16th does not.
    assert_eq!(chunk(&mut f, b"body", true).len(), 4 + 15 * 65536);
}

#[test]
fn a_chunk_that_only_passes_is_not_held_to_the_limit() {
    let p = plugin(
        "pass-big-chunk",
        &on_request_body("(i32.const 0)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = run.request_body(4).unwrap();
    assert_eq!(
        chunk(&mut f, b"longer than four", false),
        "longer than four"
    );
    // A plugin that pauses on it holds it: over the limit.
    let held = plugin(
        "hold-big-chunk",
        &on_request_body("(i32.const 1)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[held]);
    let mut f = run.request_body(4).unwrap();
    assert!(matches!(
        f.chunk(Bytes::from_static(b"longer than four"), false),
        Err(BodyStop::TooLarge)
    ));
}

#[test]
fn a_trap_in_a_body_callback_fails_closed_or_lets_the_body_go_on_unchanged() {
    let traps = on_request_body(
        r#"(drop (call $set_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 128) (i32.const 9)))
           unreachable"#,
    );
    let closed = plugin(
        "body-trap-closed",
        &traps,
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[closed]);
    let mut f = filter(&run);
    assert!(matches!(
        f.chunk(Bytes::from_static(b"ab"), false),
        Err(BodyStop::Failed)
    ));
    assert_eq!(errors("body-trap-closed", "trap"), 1);

    let open = plugin(
        "body-trap-open",
        &traps,
        OnError::FailOpen,
        Limits::default(),
    );
    let (run, _) = request(&[open]);
    let mut f = filter(&run);
    // Its rewrite in the failed call is dropped; later chunks pass without calling it.
    assert_eq!(chunk(&mut f, b"ab", false), "ab");
    assert_eq!(chunk(&mut f, b"cd", true), "cd");
    assert_eq!(errors("body-trap-open", "trap"), 1);
}

#[test]
fn an_endless_body_callback_is_stopped_by_metering_and_the_thread_keeps_serving() {
    let name = "body-loop";
    let looping = plugin(
        name,
        &on_request_body("(loop $l (br $l)) (i32.const 0)"),
        OnError::FailClosed,
        Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        },
    );
    for n in 1..=2 {
        let (run, out) = request(std::slice::from_ref(&looping));
        assert!(is_continue(&out));
        let mut f = filter(&run);
        assert!(matches!(
            f.chunk(Bytes::from_static(b"x"), true),
            Err(BodyStop::Failed)
        ));
        assert_eq!(errors(name, "instructions"), n);
    }
    let fine = plugin(
        "body-fine-after-loop",
        &on_request_body("(i32.const 0)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[fine]);
    assert_eq!(chunk(&mut filter(&run), b"ok", true), "ok");
}

#[test]
fn a_body_callback_can_answer_the_request_itself() {
    // Denies a body starting with "e" (evil), once it has all of it.
    let p = plugin(
        "deny-body",
        &on_request_body(
            r#"(if (i32.eqz (local.get $end)) (then (return (i32.const 1))))
               (drop (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204)))
               (if (i32.eq (i32.load8_u (i32.load (i32.const 200))) (i32.const 101))
                 (then
                   (drop (call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 80) (i32.const 6)
                         (i32.const 0) (i32.const 0) (i32.const -1)))
                   (return (i32.const 1))))
               (i32.const 0)"#,
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(std::slice::from_ref(&p));
    let mut f = filter(&run);
    assert_eq!(chunk(&mut f, b"ev", false), "");
    match f.chunk(Bytes::from_static(b"il"), true) {
        Err(BodyStop::Respond(r)) => {
            assert_eq!(r.status, 403);
            assert_eq!(&r.body[..], b"denied");
        }
        other => panic!("expected the plugin's answer, got {other:?}"),
    }
    let (run, _) = request(&[p]);
    assert_eq!(chunk(&mut filter(&run), b"good", true), "good");
}

#[test]
fn pausing_at_the_end_of_the_body_fails_the_plugin() {
    let p = plugin(
        "pause-at-end",
        &on_request_body("(i32.const 1)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = filter(&run);
    assert!(matches!(
        f.chunk(Bytes::from_static(b"x"), true),
        Err(BodyStop::Failed)
    ));
    assert_eq!(errors("pause-at-end", "refused"), 1);
}

#[test]
fn plugins_without_body_callbacks_leave_bodies_alone() {
    let p = plugin(
        "headers-only",
        CONTINUE_ON_REQUEST,
        OnError::FailClosed,
        Limits::default(),
    );
    assert!(!p.plugin.reads_request_bodies() && !p.plugin.reads_response_bodies());
    let (run, _) = request(&[p]);
    assert!(run.request_body(LIMIT).is_none());
    assert!(!run.reads_response_body());
    // A callback with another signature is not a body callback.
    let bytes = module(&format!(
        r#"{NOOP_CREATE}
           (func (export "proxy_on_request_body") (param i32 i32) (result i32) (i32.const 0))"#
    ));
    let odd = plugin_from("odd-body", &bytes, OnError::FailClosed, Limits::default());
    assert!(!odd.plugin.reads_request_bodies());
}

/// Appends the byte at `ptr` to every chunk of the body `buffer` (0: request, 1: response).
fn appender(name: &str, ptr: u32) -> Arc<PluginUse> {
    let append = |export: &str, buffer: u32| {
        format!(
            r#"(func (export "{export}") (param i32 i32 i32) (result i32)
                 (if (i32.ne (call $set_buf (i32.const {buffer}) (i32.const -1) (i32.const 0) (i32.const {ptr}) (i32.const 1))
                             (i32.const 0)) (then unreachable))
                 (i32.const 0))"#
        )
    };
    plugin(
        name,
        &format!(
            "{DATA}\n{CONTINUE_ON_REQUEST}\n{}\n{}",
            append("proxy_on_request_body", 0),
            append("proxy_on_response_body", 1)
        ),
        OnError::FailClosed,
        Limits::default(),
    )
}

#[test]
fn request_bodies_go_through_plugins_in_order_responses_in_reverse() {
    let (a, b) = (appender("append-a", 150), appender("append-b", 151));
    let (run, _) = request(&[a, b]);
    let mut req = filter(&run);
    assert_eq!(chunk(&mut req, b"x", true), "xab");
    let mut res = run
        .into_response_body(LIMIT, 200, HeaderMap::new())
        .ok()
        .expect("plugins read the response");
    assert_eq!(chunk(&mut res, b"x", true), "xba");
}

#[test]
fn a_response_body_filter_ends_the_contexts_when_it_is_dropped() {
    let name = "body-then-log-trap";
    let p = plugin(
        name,
        &format!(
            r#"{DATA}
               {CONTINUE_ON_REQUEST}
               (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (i32.const 0))
               (func (export "proxy_on_log") (param i32) unreachable)"#
        ),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut res = run
        .into_response_body(LIMIT, 200, HeaderMap::new())
        .ok()
        .unwrap();
    assert_eq!(chunk(&mut res, b"x", false), "x");
    // on_log (which traps, and is counted) has not run while the body goes on.
    assert_eq!(errors(name, "trap"), 0);
    drop(res);
    assert_eq!(errors(name, "trap"), 1);
}

#[test]
fn a_request_body_still_on_its_way_after_the_exchange_ended_is_stopped() {
    let name = "body-after-end";
    let p = plugin(
        name,
        &on_request_body("(i32.const 0)"),
        OnError::FailClosed,
        Limits::default(),
    );
    let (run, _) = request(&[p]);
    let mut f = filter(&run);
    drop(run);
    // The context is gone (on_delete ran): the plugin is not called, and not blamed.
    assert!(matches!(
        f.chunk(Bytes::from_static(b"late"), false),
        Err(BodyStop::Failed)
    ));
    for reason in ["refused", "trap"] {
        assert_eq!(errors(name, reason), 0, "{reason}");
    }
}
