//! Per-route edge filters, resolved at compile time so that the request path only walks a
//! prepared chain. Order (DESIGN.md): CORS preflight → auth → rate limit → policy → upstream.
//! Plain Rust types over `http` values: no actix types here, so each is unit-testable alone.

pub mod cors;
pub mod jwks;
pub mod jwt;
pub mod rate_limit;
