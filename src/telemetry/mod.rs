//! Logs, metrics (and, in a later issue, traces).
//!
//! Structured `tracing` events: JSON when stderr is not a terminal or when asked, human-readable
//! otherwise. Access-log events use the target `rustygate::access`. Events are written by a
//! background thread: a slow log consumer never blocks a worker (when its buffer is full, events
//! are dropped and counted rather than stalling traffic).

pub mod metrics;
pub mod recorder;

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

/// Lines buffered for the log writer thread before events are dropped.
const LOG_BUFFER_LINES: usize = 128 * 1024;

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level. Keep the
/// returned guard until exit: dropping it flushes what is buffered.
pub fn init_logging(format: LogFormat) -> Option<WorkerGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
    // Already installed (tests start several gateways in one process): keep the first.
    result.ok().map(|()| guard)
}
