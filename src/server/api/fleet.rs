//! `GET /api/v1/fleet`: the replicas sharing this gateway's store (`store::fleet`), whether they
//! serve one commit, and which serves which; for the dashboard's Overview. A separate call from
//! `/api/v1/status` so that a store that is down or stalls holds up the fleet panel only, and
//! that for at most [`CALL_TIMEOUT`] (`Fleet::view`).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::{answer, gate};
use crate::server::admin::AdminState;
use crate::store::fleet::{CALL_TIMEOUT, FleetView, STALE_AFTER};

/// What the page shows when there is no fleet view.
pub const SINGLE: &str = "single replica: this gateway has no [rate_limit_store], so there is \
    no fleet view (docs/scale-out.md)";

pub(crate) async fn fleet(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(refusal) = gate(&req, &state) {
        return *refusal;
    }
    let Some(f) = &state.control.fleet else {
        return answer(StatusCode::OK, &single(None));
    };
    let body = match &*state.fleet_view(f).await {
        None => single(Some(&f.replica)),
        Some(Ok(view)) => shown(view, &f.replica),
        Some(Err(e)) => {
            let store = f.store_url().unwrap_or_default();
            json!({
                "state": "error",
                "replica": f.replica,
                "verdict": "unknown: the shared store did not answer",
                "agree": null,
                "replicas": [],
                "commits": [],
                "error": format!("the shared store {store} did not answer: {e}"),
                "timeout_ms": CALL_TIMEOUT.as_millis() as u64,
                "stale_after_ms": STALE_AFTER.as_millis() as u64,
            })
        }
    };
    answer(StatusCode::OK, &body)
}

/// No store: one replica on its own, which is not an error.
fn single(replica: Option<&str>) -> Value {
    json!({
        "state": "single",
        "replica": replica,
        "verdict": SINGLE,
        "agree": null,
        "replicas": [],
        "commits": [],
        "error": null,
        "timeout_ms": CALL_TIMEOUT.as_millis() as u64,
        "stale_after_ms": STALE_AFTER.as_millis() as u64,
    })
}

/// The view as the API gives it; `this` marks the replica that answered.
fn shown(view: &FleetView, this: &str) -> Value {
    let replicas: Vec<Value> = view
        .replicas
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["this"] = json!(r.replica == this);
            v
        })
        .collect();
    let commits: Vec<Value> = view
        .commits()
        .into_iter()
        .map(|(sha, names)| json!({ "sha": sha, "replicas": names }))
        .collect();
    json!({
        "state": "ok",
        "replica": this,
        "verdict": view.verdict(),
        "agree": view.agree,
        "replicas": replicas,
        "commits": commits,
        "error": null,
        "timeout_ms": CALL_TIMEOUT.as_millis() as u64,
        "stale_after_ms": STALE_AFTER.as_millis() as u64,
    })
}
