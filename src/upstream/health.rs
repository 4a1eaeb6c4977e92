//! Active health checks: background tasks, never on the request path.
//!
//! A supervisor watches the snapshot store. For every target of an upstream with `health`
//! settings it starts one checker, unless one already runs for that target's state (a swap
//! that keeps the target keeps its checker and verdict). A checker holds only a weak
//! reference to the state, and the supervisor stops it when a published snapshot no longer
//! has its target, even if a long request of an older snapshot still holds the state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;

use super::Protocol;
use super::state::TargetState;
use crate::snapshot::SnapshotStore;
use crate::wire::connect::{ConnectError, Io, connect};
use crate::wire::tls::TargetTls;

/// `health = { ... }`, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Healthy statuses: exact codes and classes (`2` for 2xx).
    pub expect_codes: Vec<u16>,
    pub expect_classes: Vec<u16>,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub host: Option<String>,
    /// `healthy_after` passing checks since a passive ejection end it early. Part of the
    /// fingerprint: changing it starts a fresh state and checker, as other settings do.
    pub ends_ejections: bool,
}

impl HealthCheck {
    pub fn expects(&self, status: u16) -> bool {
        self.expect_codes.contains(&status) || self.expect_classes.contains(&(status / 100))
    }

    /// Identifies these settings in the state registry.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Where a checker connects, copied out of the snapshot's target (never the target itself,
/// which would keep its state alive).
struct Probe {
    connect_addr: String,
    scheme: Scheme,
    authority: Authority,
    protocol: Protocol,
    tls: Option<TargetTls>,
    check: Arc<HealthCheck>,
}

/// Starts checkers for the current snapshot and for every snapshot published after it, and
/// stops those of targets that a published snapshot no longer has: whatever still holds such a
/// target's state (a WebSocket tunnel or a download begun on an older snapshot holds its
/// upstream until it ends), the target is not checked past the swap. Runs until the store is
/// dropped. Must run on an actix (local) runtime.
pub async fn supervise(store: Weak<SnapshotStore>) {
    let Some(mut changes) = store.upgrade().map(|s| s.subscribe()) else {
        return;
    };
    // The checkers this supervisor started, by their state's address (the weak reference
    // keeps the address from being reused while the entry exists).
    let mut running: HashMap<usize, (Weak<TargetState>, JoinHandle<()>)> = HashMap::new();
    loop {
        let Some(snapshot) = store.upgrade().map(|s| s.load()) else {
            return;
        };
        let mut current = HashSet::new();
        for upstream in &snapshot.upstreams {
            let Some(check) = &upstream.health else {
                continue;
            };
            for t in &upstream.targets {
                let key = Arc::as_ptr(&t.state) as usize;
                current.insert(key);
                if t.state.checker.swap(true, Ordering::Relaxed) {
                    continue;
                }
                let probe = Probe {
                    connect_addr: t.connect_addr.clone(),
                    scheme: t.scheme.clone(),
                    authority: t.authority.clone(),
                    protocol: t.protocol,
                    tls: t.tls.clone(),
                    check: Arc::clone(check),
                };
                let task = actix_web::rt::spawn(run(Arc::downgrade(&t.state), probe));
                running.insert(key, (Arc::downgrade(&t.state), task));
            }
        }
        drop(snapshot);
        running.retain(|key, (state, task)| {
            if current.contains(key) {
                return true;
            }
            task.abort();
            // A later snapshot that has the target again starts a checker for it.
            if let Some(s) = state.upgrade() {
                s.checker.store(false, Ordering::Relaxed);
            }
            false
        });
        if changes.changed().await.is_err() {
            return;
        }
    }
}

async fn run(state: Weak<TargetState>, probe: Probe) {
    let (mut passes, mut fails) = (0u32, 0u32);
    // Passing checks in a row that started after the latest passive ejection (`epoch`): only
    // `healthy_after` of these end it early. Counting from before the ejection would let any
    // target that once passed `healthy_after` checks be let back in by the next passing check,
    // however fast it fails proxied requests.
    let (mut passes_since_ejection, mut epoch) = (0u32, 0u64);
    // Spread the checks of many targets over the interval instead of firing them together.
    let first = probe.check.interval.mul_f64(rand::random::<f64>() * 0.1);
    tokio::time::sleep(first).await;
    loop {
        if state.strong_count() == 0 {
            return;
        }
        let epoch_at_start = match state.upgrade() {
            Some(s) => s.ejection_epoch(),
            None => return,
        };
        let verdict = check_once(&probe).await;
        let Some(s) = state.upgrade() else {
            return;
        };
        let epoch_now = s.ejection_epoch();
        if epoch_now != epoch {
            epoch = epoch_now;
            passes_since_ejection = 0;
        }
        match verdict {
            Ok(Some(why)) => {
                tracing::debug!(
                    upstream = s.upstream.as_str(),
                    upstream_target = s.url.as_str(),
                    error = why.as_str(),
                    "health check not run"
                );
            }
            Ok(None) => {
                passes += 1;
                fails = 0;
                // A check that was under way when the target was ejected says nothing about
                // the target after the ejection.
                if epoch_at_start == epoch_now {
                    passes_since_ejection += 1;
                }
                if passes >= probe.check.healthy_after && !s.is_healthy() {
                    s.set_healthy(true, &format!("{passes} health checks passed in a row"));
                }
                // Like Envoy: a target the checks find healthy again is not kept out by an
                // earlier passive ejection, once `healthy_after` checks since it passed.
                if probe.check.ends_ejections && passes_since_ejection >= probe.check.healthy_after
                {
                    s.unject(&format!(
                        "{passes_since_ejection} health checks passed in a row since the ejection"
                    ));
                }
            }
            Err(why) => {
                fails += 1;
                passes = 0;
                passes_since_ejection = 0;
                tracing::debug!(
                    upstream = s.upstream.as_str(),
                    upstream_target = s.url.as_str(),
                    error = why.as_str(),
                    "health check failed"
                );
                if s.is_healthy() && fails >= probe.check.unhealthy_after {
                    s.set_healthy(
                        false,
                        &format!("{fails} health checks failed in a row, last: {why}"),
                    );
                }
            }
        }
        drop(s);
        tokio::time::sleep(probe.check.interval).await;
    }
}

/// A probe's own connection, closed when the probe drops it: never one of the request pools'.
enum ProbeConn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl ProbeConn {
    /// The HTTP handshake on a connected socket; the connection task runs on this worker.
    async fn handshake(io: Io, protocol: Protocol) -> Result<ProbeConn, String> {
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => {
                let (send, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
                actix_web::rt::spawn(conn);
                Ok(ProbeConn::H1(send))
            }
            Protocol::Http2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
                actix_web::rt::spawn(conn);
                Ok(ProbeConn::H2(send))
            }
        }
    }

    async fn send_request(
        &mut self,
        req: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            ProbeConn::H1(c) => c.send_request(req).await,
            ProbeConn::H2(c) => c.send_request(req).await,
        }
    }
}

/// What one check says: `Ok(None)` passed, `Ok(Some(why))` the gateway could not open a
/// socket (out of descriptors or ports: no verdict on the target), `Err(why)` failed.
type Checked = Result<Option<String>, String>;

/// One GET of the check path on a fresh connection.
async fn check_once(probe: &Probe) -> Checked {
    let check = &probe.check;
    let host = match &check.host {
        Some(h) => h.clone(),
        None => probe.authority.to_string(),
    };
    let attempt = async {
        let io = connect(
            &probe.connect_addr,
            probe.tls.as_ref(),
            probe.protocol,
            check.timeout,
        )
        .await;
        let io = match io {
            Ok(io) => io,
            Err(e @ ConnectError::Local(_)) => return Ok(Err(e.to_string())),
            Err(e) => return Err(e.to_string()),
        };
        let mut conn = ProbeConn::handshake(io, probe.protocol).await?;
        let req = match probe.protocol {
            Protocol::Http1 => http::Request::get(check.path.as_str())
                .header(http::header::HOST, host)
                .header(http::header::CONNECTION, "close"),
            // HTTP/2 names the host in `:authority` and has no `Connection` header; the
            // connection closes when the probe drops it.
            Protocol::Http2 => http::Request::get(
                http::Uri::builder()
                    .scheme(probe.scheme.clone())
                    .authority(host)
                    .path_and_query(check.path.as_str())
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
        }
        .header(http::header::USER_AGENT, "rustygate-health-check")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        Ok::<Result<u16, String>, String>(Ok(resp.status().as_u16()))
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Err(_) => Err(format!("no answer in {:?}", check.timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Err(local))) => Ok(Some(local)),
        Ok(Ok(Ok(status))) if check.expects(status) => Ok(None),
        Ok(Ok(Ok(status))) => Err(format!("status {status}")),
    }
}
