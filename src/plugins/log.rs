//! Where a plugin's log lines (`proxy_log`, WASI `fd_write` to stdout/stderr) go: the
//! gateway's log, naming the plugin and the route, at most [`LINES_PER_SECOND`] lines per
//! second per plugin and route (the cap policies' `print` has, `policy::engine::PrintWindow`),
//! each at most [`MAX_LINE`] bytes. Lines over the rate are dropped before they are read from
//! the plugin's memory, counted in `rustygate_log_lines_dropped_total`, and reported as one
//! "suppressed N lines" line when the plugin next logs on that route after the second is over.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use crate::policy::engine::{PRINT_LINES_PER_SECOND, PrintWindow};

/// Lines one plugin may log per route and second.
pub const LINES_PER_SECOND: u32 = PRINT_LINES_PER_SECOND;

/// The longest line logged, in bytes (of text, after invalid UTF-8 is replaced); a longer one
/// is cut at a character boundary and says how much was left out.
pub const MAX_LINE: usize = 2048;

/// (plugin, route) pairs whose windows are remembered at once; beyond, quiet ones are forgotten.
const MAX_WINDOWS: usize = 10_000;

/// Windows by `plugin\0route`, shared by every worker (the cap is per process, as policies').
static WINDOWS: LazyLock<Mutex<HashMap<Box<str>, PrintWindow>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

thread_local! {
    /// The key of the current lookup, built here so that a lookup allocates nothing.
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Whether `plugin` may log a line on `route` (`""` outside a request: start-up) now. A line
/// refused is counted as dropped.
pub fn admit(plugin: &str, route: &str) -> bool {
    let now = Instant::now();
    let (admitted, suppressed) = KEY.with(|key| {
        let mut key = key.borrow_mut();
        key.clear();
        key.push_str(plugin);
        key.push('\0');
        key.push_str(route);
        let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = windows.get_mut(key.as_str()) {
            return w.admit(now);
        }
        if windows.len() >= MAX_WINDOWS {
            windows.retain(|_, w| !w.is_quiet(now));
        }
        let mut w = PrintWindow::new(now);
        let out = w.admit(now);
        windows.insert(Box::from(key.as_str()), w);
        out
    });
    if suppressed > 0 {
        tracing::warn!(
            plugin,
            route,
            suppressed,
            "plugin log: suppressed {suppressed} lines (over {LINES_PER_SECOND} lines per second)"
        );
    }
    if !admitted {
        crate::telemetry::sink::count_dropped(crate::telemetry::sink::DropReason::RateLimited, 1);
    }
    admitted
}

/// Logs `msg` (at most [`MAX_LINE`] bytes of it; `more` bytes were left out) at the
/// proxy-wasm `level` (0 trace … 4 critical).
pub fn line(plugin: &str, route: &str, level: i32, msg: &[u8], more: usize) {
    let text = String::from_utf8_lossy(msg);
    let mut end = text.len().min(MAX_LINE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end + more;
    let text = &text[..end];
    let truncated = if cut > 0 {
        format!(" [{cut} more bytes not logged]")
    } else {
        String::new()
    };
    match level {
        0 => tracing::trace!(plugin, route, "{text}{truncated}"),
        1 => tracing::debug!(plugin, route, "{text}{truncated}"),
        2 => tracing::info!(plugin, route, "{text}{truncated}"),
        3 => tracing::warn!(plugin, route, "{text}{truncated}"),
        _ => tracing::error!(plugin, route, "{text}{truncated}"),
    }
}
