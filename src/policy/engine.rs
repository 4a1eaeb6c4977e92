//! The Rhai engine every policy of a snapshot runs on: hard limits, the wall-clock budget, no
//! file access, and the mapping from Rhai's errors to the reasons the gateway reports.
//!
//! Rhai has no timer of its own. The budget is enforced from the progress callback, which Rhai
//! calls on every operation: the deadline of the hook running on this thread sits in a
//! thread-local (a hook never yields, so one thread runs one hook at a time), and the callback
//! terminates the script once it has passed. Together with the operation limit this bounds how
//! long a policy can hold an actix worker.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine, EvalAltResult, Position};

/// Hard limits for policy scripts. Defaults in code, overridable in `gateway.toml`
/// `[policy_limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Rhai operations per hook call.
    pub max_operations: u64,
    /// Nested function calls (recursion depth).
    pub max_call_depth: usize,
    /// Nesting of expressions, checked when the script is compiled.
    pub max_expr_depth: usize,
    /// Longest string a script may build, in bytes.
    pub max_string_size: usize,
    /// Most elements in one array.
    pub max_array_size: usize,
    /// Most entries in one object map.
    pub max_map_size: usize,
    /// Wall-clock time one hook call may take.
    pub budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            budget: Duration::from_millis(50),
        }
    }
}

/// The wall clock is read every this many operations: often enough that a budget of a few
/// milliseconds holds, rarely enough to cost nothing measurable.
pub(crate) const CLOCK_EVERY: u64 = 256;

/// What the hook running on this thread is, for the budget and for `print`/`debug`.
struct Running {
    deadline: Cell<Option<Instant>>,
    /// The lowest stack address the running hook may reach (see [`STACK_BUDGET`]); 0 outside.
    stack_floor: Cell<usize>,
    /// The running script assigns into indexes or properties (see `on_var` in [`build`]).
    check_maps: Cell<bool>,
    who: RefCell<Option<(Arc<str>, Arc<str>)>>,
}

thread_local! {
    static RUNNING: Running = const {
        Running {
            deadline: Cell::new(None),
            stack_floor: Cell::new(0),
            check_maps: Cell::new(false),
            who: RefCell::new(None),
        }
    };
}

/// Marks a hook call on this thread; the budget ends when it is dropped.
pub(crate) struct CallGuard(());

impl CallGuard {
    /// `who` (route and script, for `print`/`debug`) is only given for scripts that may print.
    pub(crate) fn enter(
        budget: Duration,
        who: Option<(&Arc<str>, &Arc<str>)>,
        check_maps: bool,
    ) -> CallGuard {
        RUNNING.with(|r| {
            r.deadline.set(Some(Instant::now() + budget));
            r.stack_floor
                .set(stack_position().saturating_sub(STACK_BUDGET));
            r.check_maps.set(check_maps);
            if let Some((route, script)) = who {
                *r.who.borrow_mut() = Some((Arc::clone(route), Arc::clone(script)));
            }
        });
        CallGuard(())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| {
            r.deadline.set(None);
            r.stack_floor.set(0);
            r.check_maps.set(false);
            r.who.borrow_mut().take();
        });
    }
}

/// Stack a hook call may use below where it was entered. Rhai recurses on the thread's stack
/// for each call level and each nested expression, and `max_call_depth` × `max_expr_depth`
/// (32 × 64 by default) is deeper than a worker's 2 MiB allows in a debug build: an overflow
/// aborts the process. Past this budget the call ends as a call-depth failure instead. A
/// release build uses a fraction of it for the deepest scripts the limits let through.
pub(crate) const STACK_BUDGET: usize = 1 << 20;

/// The stack is measured every this many operations: one operation grows it by a few
/// kilobytes at most (in a debug build), so the budget overshoots by tens of kilobytes.
const STACK_EVERY: u64 = 8;

/// An address in the caller's stack frame, to measure how deep a call went.
#[inline(always)]
fn stack_position() -> usize {
    let here = 0u8;
    std::hint::black_box(std::ptr::addr_of!(here)) as usize
}

/// The values a terminated script carries: the reason, read back by [`classify`].
const TIMEOUT_TOKEN: &str = "timeout";
const STACK_TOKEN: &str = "stack";

fn over_budget(ops: u64) -> Option<Dynamic> {
    if !ops.is_multiple_of(STACK_EVERY) {
        return None;
    }
    RUNNING.with(|r| {
        // The stack grows down on every target this builds for.
        if stack_position() < r.stack_floor.get() {
            return Some(Dynamic::from(STACK_TOKEN));
        }
        match r.deadline.get() {
            Some(d) if ops.is_multiple_of(CLOCK_EVERY) && Instant::now() >= d => {
                Some(Dynamic::from(TIMEOUT_TOKEN))
            }
            _ => None,
        }
    })
}

/// Lines `print` and `debug` may log per route and second. Beyond, lines are dropped and
/// counted, and the count is logged as one "suppressed N lines" line with the route's next
/// print after the second is over: a policy cannot flood the logs, and the log says it tried.
pub const PRINT_LINES_PER_SECOND: u32 = 100;

/// Routes whose print windows are remembered at once; beyond, quiet windows are forgotten.
const MAX_PRINT_WINDOWS: usize = 10_000;

/// One route's current second of `print`/`debug` lines (and of a plugin's log lines on a
/// route, `plugins::log`).
#[derive(Debug)]
pub(crate) struct PrintWindow {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

impl PrintWindow {
    pub(crate) fn new(now: Instant) -> Self {
        PrintWindow {
            start: now,
            lines: 0,
            suppressed: 0,
        }
    }

    /// Whether the window may be forgotten: its second is over and it dropped nothing.
    pub(crate) fn is_quiet(&self, now: Instant) -> bool {
        self.suppressed == 0 && now.saturating_duration_since(self.start) >= Duration::from_secs(1)
    }

    /// Whether this line is logged, and how many lines the window that just ended suppressed.
    pub(crate) fn admit(&mut self, now: Instant) -> (bool, u64) {
        let mut ended_suppressed = 0;
        if now.saturating_duration_since(self.start) >= Duration::from_secs(1) {
            ended_suppressed = std::mem::take(&mut self.suppressed);
            self.start = now;
            self.lines = 0;
        }
        if self.lines < PRINT_LINES_PER_SECOND {
            self.lines += 1;
            (true, ended_suppressed)
        } else {
            self.suppressed += 1;
            (false, ended_suppressed)
        }
    }
}

/// Print windows by route name, shared by every worker (a route's limit is per process).
static PRINT_WINDOWS: LazyLock<Mutex<HashMap<Arc<str>, PrintWindow>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn admit_print(route: &Arc<str>, now: Instant) -> (bool, u64) {
    let mut windows = PRINT_WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
    if !windows.contains_key(route) && windows.len() >= MAX_PRINT_WINDOWS {
        windows.retain(|_, w| !w.is_quiet(now));
    }
    windows
        .entry(Arc::clone(route))
        .or_insert_with(|| PrintWindow::new(now))
        .admit(now)
}

fn log_print(text: &str, level: &'static str) {
    RUNNING.with(|r| {
        let who = r.who.borrow();
        let (log, suppressed) = match who.as_ref() {
            Some((route, _)) => admit_print(route, Instant::now()),
            None => (true, 0),
        };
        let (route, script) = who
            .as_ref()
            .map(|(r, s)| (r.as_ref(), s.as_ref()))
            .unwrap_or(("", ""));
        if suppressed > 0 {
            tracing::warn!(
                target: "rustygate::policy",
                route,
                script,
                suppressed,
                "print/debug: suppressed {suppressed} lines (over {PRINT_LINES_PER_SECOND} lines per second)"
            );
        }
        if !log {
            crate::telemetry::sink::count_dropped(crate::telemetry::sink::DropReason::RateLimited, 1);
            return;
        }
        if level == "debug" {
            tracing::debug!(target: "rustygate::policy", route, script, "{text}");
        } else {
            tracing::info!(target: "rustygate::policy", route, script, "{text}");
        }
    });
}

/// One engine configuration for every policy in a snapshot.
pub fn build(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(limits.max_operations)
        // A hook's body runs at level 0 (see `Hook` in `policy`): each call it makes is a level.
        .set_max_call_levels(limits.max_call_depth)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(false)
        // Rhai interns the strings `let` binds behind one engine-wide lock; every worker shares
        // this engine, so interning would serialise them for a memory saving policies don't need.
        .set_max_strings_interned(0);
    // Policies are self-contained: no `import` of files, no `eval` of strings built at run time.
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    // Rhai's `exit` ends a script with a value. A hook's body runs as statements (see `Hook` in
    // `policy`), where that value would quietly become the hook's result; keep what a called
    // function does with it, an error that fails the request. (The engine's own functions
    // are found before the standard library's.)
    let exit = || -> Result<(), Box<EvalAltResult>> {
        Err("exit() is not available in policies: end a hook with `return`".into())
    };
    engine
        .register_fn("exit", exit)
        .register_fn("exit", move |_: Dynamic| exit());
    engine.on_progress(over_budget);
    let max_map = limits.max_map_size;
    let max_key_bytes = limits.max_string_size;
    // Rhai checks the size of a value assigned into a map (`m[k] = v`), not of the map that
    // grew by one key; check a map's own size each time a script names its variable, so a
    // loop adding keys stops one key over the limit. (A map nested in another one is counted
    // when the outer one is returned, assigned with `+=`, or passed to a function.) Only scripts
    // that assign into an index or property pay for the size. Every array or map read is checked
    // for nesting (see `sizes::MAX_DEPTH`), and for its maps' keys, which count against
    // `max_string_size` as Rhai counts the strings in values: a value nests at most one
    // expression deeper, and its keys grow by at most one expression's, before it is read again.
    #[allow(deprecated)] // `on_var` is marked volatile, not going away
    engine.on_var(move |name, _, cx| {
        let Some(v) = cx.scope().get(name) else {
            return Ok(None);
        };
        if !v.is_array() && !v.is_map() {
            return Ok(None);
        }
        if max_map > 0
            && RUNNING.with(|r| r.check_maps.get())
            && v.as_map_ref().is_ok_and(|m| m.len() > max_map)
        {
            return Err(map_too_large());
        }
        super::sizes::check_value(v, max_key_bytes)?;
        Ok(None)
    });
    engine.on_print(|s| log_print(s, "print"));
    engine.on_debug(|s, _, _| log_print(s, "debug"));
    super::sizes::register(&mut engine, limits.max_string_size);
    super::api::register(&mut engine, limits);
    engine
}

/// The error Rhai raises for a map over `max_map_size`, for the places Rhai does not check.
pub(crate) fn map_too_large() -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge("Size of object map".into(), Position::NONE).into()
}

/// Why a hook failed, as it appears in logs and in `rustygate_policy_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Over `max_operations`.
    Operations,
    /// Over `max_call_depth`.
    CallDepth,
    StringSize,
    ArraySize,
    MapSize,
    /// Arrays and maps nested deeper than `sizes::MAX_DEPTH`.
    Nesting,
    /// Over the wall-clock budget.
    Timeout,
    /// `set_upstream` named an upstream the snapshot does not have.
    UnknownUpstream,
    /// A hook asked for something invalid: a bad status, header, path or return value.
    InvalidAction,
    /// Any other error the script raised (type errors, `throw`, missing map keys used as
    /// values, ...).
    Runtime,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Operations => "operations",
            Reason::CallDepth => "call_depth",
            Reason::StringSize => "string_size",
            Reason::ArraySize => "array_size",
            Reason::MapSize => "map_size",
            Reason::Nesting => "nesting",
            Reason::Timeout => "timeout",
            Reason::UnknownUpstream => "unknown_upstream",
            Reason::InvalidAction => "invalid_action",
            Reason::Runtime => "runtime_error",
        }
    }
}

/// Prefix of errors raised by the host API for an invalid action.
pub(crate) const INVALID_ACTION: &str = "invalid action: ";

/// The reason, the innermost position (a line inside the function that failed, not the call
/// site of the hook) and a message for the log.
pub(crate) fn classify(err: &EvalAltResult) -> (Reason, Position, String) {
    let mut e = err;
    let mut pos = err.position();
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, p) = e {
        if !p.is_none() {
            pos = *p;
        }
        e = inner;
    }
    if !e.position().is_none() {
        pos = e.position();
    }
    let reason = match e {
        EvalAltResult::ErrorTooManyOperations(_) => Reason::Operations,
        EvalAltResult::ErrorStackOverflow(_) => Reason::CallDepth,
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            let what = what.to_ascii_lowercase();
            if what.starts_with("nesting") {
                Reason::Nesting
            } else if what.contains("string") {
                Reason::StringSize
            } else if what.contains("map") {
                Reason::MapSize
            } else {
                Reason::ArraySize
            }
        }
        EvalAltResult::ErrorTerminated(token, _) => match token.clone().into_string().as_deref() {
            Ok(TIMEOUT_TOKEN) => Reason::Timeout,
            Ok(STACK_TOKEN) => Reason::CallDepth,
            _ => Reason::Runtime,
        },
        EvalAltResult::ErrorRuntime(v, _)
            if v.is_string()
                && v.clone()
                    .into_string()
                    .is_ok_and(|s| s.starts_with(INVALID_ACTION)) =>
        {
            Reason::InvalidAction
        }
        _ => Reason::Runtime,
    };
    let message = match e {
        EvalAltResult::ErrorTerminated(..) if reason == Reason::CallDepth => {
            "calls and expressions nest deeper than the worker's stack allows".to_owned()
        }
        EvalAltResult::ErrorTerminated(..) => "the wall-clock budget ran out".to_owned(),
        EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        other => {
            // Rhai appends the position itself; the log carries the line separately.
            let text = other.to_string();
            match text.rfind(" (line ") {
                Some(i) => text[..i].to_owned(),
                None => text,
            }
        }
    };
    (reason, pos, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_print_window_logs_its_share_then_reports_what_it_dropped() {
        let t0 = Instant::now();
        let mut w = PrintWindow::new(t0);
        let logged = (0..250).filter(|_| w.admit(t0).0).count();
        assert_eq!(logged, PRINT_LINES_PER_SECOND as usize);
        // The next second: its first line is logged, after one line for the 150 dropped.
        assert_eq!(w.admit(t0 + Duration::from_millis(1000)), (true, 150));
        assert_eq!(w.admit(t0 + Duration::from_millis(1001)), (true, 0));
        // A quiet second reports nothing.
        assert_eq!(w.admit(t0 + Duration::from_secs(3)), (true, 0));
    }

    #[test]
    fn a_printing_loop_logs_at_most_the_limit_per_second() {
        let engine = build(&Limits::default());
        let (route, script): (Arc<str>, Arc<str>) =
            ("print-flood-test".into(), "policies/flood.rhai".into());
        let started = Instant::now();
        let (run, text) = crate::util::captured_logs(tracing::Level::DEBUG, || {
            let _guard = CallGuard::enter(Duration::from_secs(30), Some((&route, &script)), false);
            engine
                .run("for i in 0..500 { print(`line ${i}`); debug(i); }")
                .map_err(|e| e.to_string())
        });
        run.unwrap_or_else(|e| panic!("{e}"));
        let seconds = started.elapsed().as_secs();
        let lines = text
            .lines()
            .filter(|l| l.contains("print-flood-test"))
            .count();
        let most = (PRINT_LINES_PER_SECOND as u64 + 1) * (seconds + 1);
        assert!(
            lines >= PRINT_LINES_PER_SECOND as usize,
            "{lines} lines:\n{text}"
        );
        assert!(lines as u64 <= most, "{lines} lines of 1000 in {seconds} s");
        assert!(
            text.contains("line 0"),
            "the first lines are the ones logged"
        );
    }
}
