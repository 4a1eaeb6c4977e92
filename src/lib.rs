//! RustyGate: a declarative GitOps API gateway.
//!
//! ```text
//! config source ──► load ──► compile ──► Snapshot ──► publish ──► serve
//! (dir | git)      config::   compile::   snapshot::   SnapshotStore  server:: + proxy::
//! ```
//! Modules are listed in the order data flows through them.

pub mod compile;
pub mod config;
pub mod decide;
pub mod filters;
pub mod plan;
pub mod plugins;
pub mod policy;
pub mod proxy;
pub mod router;
pub mod schema;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod upstream;
pub mod util;
pub mod wire;
