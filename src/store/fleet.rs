//! The fleet view and the "new head seen" fan-out, through the store of the served snapshot's
//! `[rate_limit_store]` (nothing happens without one).
//!
//! * Each replica keeps a hash `<prefix>fleet:<replica>` = {replica, applied, attempted, ok,
//!   loaded_at} with a TTL of [`TTL`], written after every reload attempt (every poll, webhook
//!   or admin call) and at least every [`REFRESH`]; the set `<prefix>fleet` lists them. A
//!   replica that stops is gone from the view when its hash expires.
//! * A replica that accepts a push webhook publishes `{replica, sha}` on `<prefix>heads`; every
//!   other replica subscribed there fetches at once, unless it already serves or tried that
//!   commit. Replicas behind a load balancer each get only some webhooks; this makes one enough.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntGaugeVec, Opts};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use super::{Store, StoreError, StoreMetrics, StoreSpec};
use crate::snapshot::SnapshotStore;
use crate::source::reload::{ReloadStatus, Trigger};

/// A replica's entry is written at least this often.
pub const REFRESH: Duration = Duration::from_secs(5);
/// A replica's entry outlives its last write by this long.
pub const TTL: Duration = Duration::from_secs(15);
/// Time one fleet call (publish, read) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before a lost subscription is made again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// One replica as it last reported itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Replica {
    pub replica: String,
    pub applied: String,
    pub attempted: String,
    pub ok: bool,
    pub loaded_at: String,
}

/// Every live replica, and whether they serve one commit.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub replicas: Vec<Replica>,
    /// Replicas by applied SHA.
    pub shas: BTreeMap<String, usize>,
    /// Every live replica applies the same commit.
    pub agree: bool,
}

/// This replica's part in the fleet: publishing itself, reading the others, and the head
/// fan-out.
pub struct Fleet {
    pub replica: String,
    snapshots: Arc<SnapshotStore>,
    status: Arc<Mutex<ReloadStatus>>,
    /// `rustygate_fleet_replicas{sha}`
    pub gauge: IntGaugeVec,
    /// Woken after every reload attempt (see `Reloader::with_notify`).
    pub changed: Arc<Notify>,
    current: Mutex<Option<Arc<Store>>>,
}

impl Fleet {
    pub fn new(
        replica: String,
        snapshots: Arc<SnapshotStore>,
        status: Arc<Mutex<ReloadStatus>>,
    ) -> Fleet {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "rustygate_fleet_replicas",
                "Live replicas sharing this gateway's store, by the config SHA they apply.",
            ),
            &["sha"],
        )
        .unwrap_or_else(|_| super::invalid_metric());
        Fleet {
            replica,
            snapshots,
            status,
            gauge,
            changed: Arc::new(Notify::new()),
            current: Mutex::new(None),
        }
    }

    /// The default replica id: the host name (a pod's name) and the process id.
    pub fn default_replica_id() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "rustygate".to_owned());
        format!("{host}-{}", std::process::id())
    }

    /// The store of the served snapshot (a connection of the fleet's own, with a longer
    /// timeout than rate-limit checks), or `None` without `[rate_limit_store]`.
    fn store(&self) -> Option<Arc<Store>> {
        let spec = self.snapshots.load().rate_limit_store.clone()?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = StoreSpec {
            timeout: CALL_TIMEOUT,
            ..(*spec).clone()
        };
        if let Some(s) = current.as_ref().filter(|s| *s.spec == wanted) {
            return Some(Arc::clone(s));
        }
        let s = Arc::new(Store::new(Arc::new(wanted), StoreMetrics::default()));
        *current = Some(Arc::clone(&s));
        Some(s)
    }

    fn entry(&self) -> Replica {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let applied = s.applied.as_ref();
        let attempted = s.attempted.as_ref();
        Replica {
            replica: self.replica.clone(),
            applied: applied.map(|a| a.sha.clone()).unwrap_or_default(),
            attempted: attempted.and_then(|a| a.sha.clone()).unwrap_or_default(),
            ok: attempted.is_none_or(|a| a.ok),
            loaded_at: applied.map(|a| a.loaded_at.clone()).unwrap_or_default(),
        }
    }

    /// Writes this replica's entry.
    pub async fn publish(&self) -> Result<(), StoreError> {
        let Some(store) = self.store() else {
            return Ok(());
        };
        let e = self.entry();
        let key = store.spec.key(&format!("fleet:{}", e.replica));
        let set = store.spec.key("fleet");
        let ttl = TTL.as_secs();
        store
            .call(|mut conn| async move {
                redis::pipe()
                    .hset_multiple(
                        &key,
                        &[
                            ("replica", e.replica.as_str()),
                            ("applied", e.applied.as_str()),
                            ("attempted", e.attempted.as_str()),
                            ("ok", if e.ok { "1" } else { "0" }),
                            ("loaded_at", e.loaded_at.as_str()),
                        ],
                    )
                    .ignore()
                    .expire(&key, ttl as i64)
                    .ignore()
                    .sadd(&set, &e.replica)
                    .ignore()
                    .expire(&set, ttl as i64)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(StoreError::from)
            })
            .await
    }

    /// Every live replica, or `None` without a store. Entries that expired leave the set.
    pub async fn view(&self) -> Option<Result<FleetView, StoreError>> {
        let store = self.store()?;
        let set = store.spec.key("fleet");
        let prefix = store.spec.key("fleet:");
        let r = store
            .call(|mut conn| async move {
                let names: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&set)
                    .query_async(&mut conn)
                    .await?;
                let mut pipe = redis::pipe();
                for n in &names {
                    pipe.hgetall(format!("{prefix}{n}"));
                }
                let entries: Vec<BTreeMap<String, String>> = if names.is_empty() {
                    Vec::new()
                } else {
                    pipe.query_async(&mut conn).await?
                };
                let mut replicas = Vec::new();
                let mut gone = Vec::new();
                for (name, mut h) in names.into_iter().zip(entries) {
                    if h.is_empty() {
                        gone.push(name);
                        continue;
                    }
                    let mut take = |k: &str| h.remove(k).unwrap_or_default();
                    replicas.push(Replica {
                        replica: take("replica"),
                        applied: take("applied"),
                        attempted: take("attempted"),
                        ok: take("ok") == "1",
                        loaded_at: take("loaded_at"),
                    });
                }
                if !gone.is_empty() {
                    redis::cmd("SREM")
                        .arg(&set)
                        .arg(&gone)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                Ok::<_, StoreError>(replicas)
            })
            .await;
        Some(r.map(|mut replicas| {
            replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
            let mut shas = BTreeMap::new();
            for r in &replicas {
                *shas.entry(r.applied.clone()).or_insert(0) += 1;
            }
            self.gauge.reset();
            for (sha, n) in &shas {
                self.gauge.with_label_values(&[sha.as_str()]).set(*n as i64);
            }
            FleetView {
                agree: shas.len() <= 1,
                shas,
                replicas,
            }
        }))
    }

    /// Tells the other replicas that a push to the tracked branch arrived here (`sha`: the
    /// pushed commit, when the webhook named it). Best effort, off the request.
    pub fn announce_head(self: &Arc<Self>, sha: Option<String>) {
        let Some(store) = self.store() else {
            return;
        };
        let channel = store.spec.key("heads");
        let message = serde_json::json!({ "replica": self.replica, "sha": sha }).to_string();
        actix_web::rt::spawn(async move {
            let r = store
                .call(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&message)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(StoreError::from)
                })
                .await;
            match r {
                Ok(n) => tracing::debug!(receivers = n, "new head announced to the fleet"),
                Err(e) => tracing::warn!(error = %e, "new head not announced to the fleet"),
            }
        });
    }

    /// Publishes this replica after every reload attempt and every [`REFRESH`], and follows
    /// the heads channel of the current store, sending a [`Trigger::Peer`] to `reload` for a
    /// head announced by another replica. Runs until `reload` closes.
    pub async fn run(self: Arc<Self>, reload: mpsc::Sender<Trigger>) {
        let mut subscribed: Option<(StoreSpec, tokio::task::JoinHandle<()>)> = None;
        loop {
            let spec = self.store().map(|s| (*s.spec).clone());
            if subscribed.as_ref().map(|(s, _)| s) != spec.as_ref() {
                if let Some((_, task)) = subscribed.take() {
                    task.abort();
                }
                if let Some(spec) = spec {
                    let task = actix_web::rt::spawn(
                        Arc::clone(&self).follow_heads(spec.clone(), reload.clone()),
                    );
                    subscribed = Some((spec, task));
                }
            }
            if self.store().is_some() {
                if let Err(e) = self.publish().await {
                    tracing::debug!(error = %e, "fleet entry not published");
                }
                let _ = self.view().await;
            }
            if reload.is_closed() {
                break;
            }
            let _ = tokio::time::timeout(REFRESH, self.changed.notified()).await;
        }
        if let Some((_, task)) = subscribed {
            task.abort();
        }
    }

    async fn follow_heads(self: Arc<Self>, spec: StoreSpec, reload: mpsc::Sender<Trigger>) {
        use futures_util::StreamExt;
        let channel = spec.key("heads");
        let mut first = true;
        loop {
            let client = match spec.connection_info().and_then(redis::Client::open) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow the fleet's heads channel");
                    return;
                }
            };
            let subscribed = tokio::time::timeout(CALL_TIMEOUT, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            let mut pubsub = match subscribed {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "fleet heads channel: subscribe failed; retrying");
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                    continue;
                }
                Err(_) => {
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                    continue;
                }
            };
            // A head announced while the subscription was lost: fetch once after a reconnect.
            if !first {
                let _ = reload.try_send(Trigger::Peer);
            }
            first = false;
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&payload) else {
                    continue;
                };
                if v.get("replica").and_then(|r| r.as_str()) == Some(self.replica.as_str()) {
                    continue;
                }
                let sha = v.get("sha").and_then(|s| s.as_str());
                let seen = sha.and_then(|sha| {
                    let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.seen(sha)
                });
                if let Some(why) = seen {
                    tracing::debug!(sha, why, "head announced by another replica ignored");
                    continue;
                }
                tracing::info!(
                    sha,
                    from = v.get("replica").and_then(|r| r.as_str()),
                    "another replica saw a new head; fetching"
                );
                match reload.try_send(Trigger::Peer) {
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    _ => continue,
                }
            }
            tracing::debug!("fleet heads channel lost; subscribing again");
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    }
}
