//! Logs (and, in later issues, metrics and traces).
//!
//! Structured `tracing` events: JSON when stderr is not a terminal or when asked, human-readable
//! otherwise. Access-log events use the target `rustygate::access`.

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
    let _ = result;
}
