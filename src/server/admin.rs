//! The admin listener: health, readiness and status. Bound to loopback by default.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::snapshot::SnapshotStore;

pub(crate) struct AdminState {
    pub store: Arc<SnapshotStore>,
    pub started_at: SystemTime,
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/status", web::get().to(status));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready once a snapshot is being served, which is from the first successful compile on.
async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let snap = state.store.load();
    HttpResponse::Ok()
        .content_type("text/plain")
        .body(format!("ready {}\n", snap.version.id))
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn status(state: web::Data<AdminState>) -> HttpResponse {
    let snap = state.store.load();
    let body = json!({
        "version": snap.version.id,
        "source": snap.version.source,
        "loaded_at": humantime::format_rfc3339_seconds(snap.version.loaded_at).to_string(),
        "loaded_at_unix": unix_seconds(snap.version.loaded_at),
        "routes": snap.routes.len(),
        "upstreams": snap.upstreams.len(),
        "warnings": snap.warnings,
        "started_at": humantime::format_rfc3339_seconds(state.started_at).to_string(),
        "gateway_version": env!("CARGO_PKG_VERSION"),
    });
    HttpResponse::Ok().json(body)
}
