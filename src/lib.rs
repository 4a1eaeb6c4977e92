//! RustyGate: a declarative GitOps API gateway.
//!
//! ```text
//! config source ──► load ──► compile ──► Snapshot ──► publish ──► serve
//! (dir | git)      config::   compile::   snapshot::   SnapshotStore  server:: + proxy::
//! ```
//! Modules are listed in the order data flows through them.

// On x86_64 musl, whatever links this library (the binary, its tests) takes `memcpy`, `memmove`,
// `memcmp` and `bcmp` from crates/fastmem: musl's copy and compare short pieces byte by byte.
#[cfg(all(target_env = "musl", target_arch = "x86_64"))]
use fastmem as _;

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
