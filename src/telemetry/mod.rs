//! Logs, metrics and traces ([`trace`]).
//!
//! Structured `tracing` events: JSON when stderr is not a terminal or when asked, human-readable
//! otherwise. Access-log lines ([`access`]) are formatted without `tracing` in the JSON format and
//! carry `"target":"rustygate::access"`. Every line goes through one buffer that a background
//! thread writes ([`sink`]): a slow log consumer never blocks a worker (past the buffer's cap,
//! lines are dropped and counted rather than stalling traffic).

pub mod access;
pub mod counts;
pub mod latency;
pub mod metrics;
pub mod recorder;
pub mod sink;
pub mod throttle;
pub mod trace;
pub mod traffic;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

/// `info`, but rustls only at `error`: its warnings are about what a peer sent (an IP address
/// as SNI, a renegotiation attempt), which any client could then write into the log at will.
/// The gateway logs failed handshakes itself, at debug, and counts them. Likewise actix-http's
/// HTTP/1.1 dispatcher and decoder not at all: they log an `ERROR` without the client for each
/// malformed request and for each connection a client or an upstream body ends badly. The
/// gateway counts refused heads (`requests_total`, `route="<none>"`) and logs them at debug with
/// the client; the access log has the rest, with the request.
pub const DEFAULT_FILTER: &str =
    "info,rustls=error,actix_http::h1::dispatcher=off,actix_http::h1::decoder=off";

/// Installs the global subscriber. `RUST_LOG` overrides the default filter ([`DEFAULT_FILTER`]).
/// Keep the returned guard until exit: dropping it writes what is buffered.
pub fn init_logging(format: LogFormat) -> Option<sink::LogGuard> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // Already installed (tests start several gateways in one process): keep the first.
    let guard = sink::install_stderr()?;
    let writer = sink::SinkWriter(sink::global()?);
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
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    result.ok()?;
    access::configure(json);
    Some(guard)
}
