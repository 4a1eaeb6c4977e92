//! The config repo as written: raw TOML types with spans, loading, and diagnostics.
//!
//! ```text
//! repo dir ──► load_dir ──► RawConfig (+ Diagnostics) ──► compile::compile ──► Snapshot
//! ```
//! This module owns syntax only; it must not decide what a config means.

pub mod deferred;
pub mod diag;
pub mod files;
pub mod load;
pub mod raw;
pub mod raw_tracing;
mod spanned;
pub mod units;

pub use diag::{Diagnostic, Diagnostics, FileId, Severity, SourceFiles};
pub use load::{LoadError, RawConfig, Unloaded, load_dir};
pub use spanned::Spanned;
