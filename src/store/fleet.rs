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
use crate::telemetry::throttle::LogThrottle;

/// A replica's entry is written at least this often.
pub const REFRESH: Duration = Duration::from_secs(5);
/// A replica's entry outlives its last write by this long.
pub const TTL: Duration = Duration::from_secs(15);
/// Time one fleet call (publish, read) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before a lost subscription is made again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// The heads subscription is pinged this often: a subscription only waits, so one whose
/// connection was black-holed would otherwise never notice; a ping unanswered within
/// [`CALL_TIMEOUT`] makes a new subscription.
pub const HEADS_PING_EVERY: Duration = Duration::from_secs(3);
/// A replica whose entry is this old missed a refresh: it is shown as stale until its entry
/// expires at [`TTL`].
pub const STALE_AFTER: Duration = Duration::from_secs(2 * REFRESH.as_secs());

/// One replica as it last reported itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Replica {
    pub replica: String,
    pub applied: String,
    pub attempted: String,
    pub ok: bool,
    pub loaded_at: String,
    /// Milliseconds since the replica last wrote its entry, from the entry's remaining TTL in
    /// the store (so the replicas' clocks do not matter); `None` if the store gave no TTL.
    pub heartbeat_age_ms: Option<u64>,
    /// The entry is [`STALE_AFTER`] old or more: the replica missed a refresh (stopped, cut
    /// off from the store, or stalled) and leaves the view when the entry expires.
    pub stale: bool,
}

impl Replica {
    /// Sets the heartbeat from the entry's remaining time to live (`PTTL`: negative when the
    /// key is gone or has no expiry).
    fn with_pttl(mut self, pttl_ms: i64) -> Replica {
        let age = u64::try_from(pttl_ms)
            .ok()
            .map(|left| (TTL.as_millis() as u64).saturating_sub(left));
        self.heartbeat_age_ms = age;
        self.stale = age.is_some_and(|a| a >= STALE_AFTER.as_millis() as u64);
        self
    }
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

/// How a commit is named in a verdict: its first 12 characters.
fn short(sha: &str) -> &str {
    match sha {
        "" => "nothing applied",
        s => s.get(..12).unwrap_or(s),
    }
}

impl FleetView {
    /// The view of these replicas, sorted by name.
    pub fn of(mut replicas: Vec<Replica>) -> FleetView {
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        let mut shas = BTreeMap::new();
        for r in &replicas {
            *shas.entry(r.applied.clone()).or_insert(0) += 1;
        }
        FleetView {
            agree: shas.len() <= 1,
            shas,
            replicas,
        }
    }

    /// The replicas by the commit they apply: the commit most replicas apply first (ties by
    /// SHA), each with its replicas by name.
    pub fn commits(&self) -> Vec<(&str, Vec<&str>)> {
        let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for r in &self.replicas {
            by.entry(&r.applied).or_default().push(&r.replica);
        }
        let mut out: Vec<(&str, Vec<&str>)> = by.into_iter().collect();
        out.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
        out
    }

    /// In one line: `all 3 replicas serve 3f1c2a4b5c6d`, or `replicas disagree: 2 on
    /// 3f1c2a4b5c6d (a, b); 1 on 9ab04c1d2e3f (c)`, and the stale replicas, if any.
    pub fn verdict(&self) -> String {
        let commits = self.commits();
        let mut out = match (self.replicas.len(), commits.as_slice()) {
            (0, _) => "no replica has reported to the store yet".to_owned(),
            (1, [(sha, _)]) => format!("the only replica serves {}", short(sha)),
            (n, [(sha, _)]) => format!("all {n} replicas serve {}", short(sha)),
            (_, groups) => {
                let parts: Vec<String> = groups
                    .iter()
                    .map(|(sha, names)| {
                        format!("{} on {} ({})", names.len(), short(sha), names.join(", "))
                    })
                    .collect();
                format!("replicas disagree: {}", parts.join("; "))
            }
        };
        let stale: Vec<&str> = self
            .replicas
            .iter()
            .filter(|r| r.stale)
            .map(|r| r.replica.as_str())
            .collect();
        if !stale.is_empty() {
            out.push_str(&format!(
                " (stale, no heartbeat for {}s or more: {})",
                STALE_AFTER.as_secs(),
                stale.join(", ")
            ));
        }
        out
    }
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
    /// "another replica saw a new head": anyone who can publish on the channel can send
    /// thousands a second, so one line per [`super::LOG_EVERY`], with the count left out.
    heads_log: LogThrottle,
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
            heads_log: LogThrottle::new(super::LOG_EVERY),
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
            heartbeat_age_ms: Some(0),
            stale: false,
        }
    }

    /// The URL of the store the fleet view uses (never with a password), or `None` without
    /// `[rate_limit_store]`.
    pub fn store_url(&self) -> Option<String> {
        Some(self.store()?.spec.shown_url())
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
    /// Bounded by [`CALL_TIMEOUT`] however the store behaves (`Store::call`).
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
                // Each entry, then each entry's remaining TTL (its heartbeat), in one round-trip.
                let mut pipe = redis::pipe();
                for n in &names {
                    pipe.hgetall(format!("{prefix}{n}"));
                }
                for n in &names {
                    pipe.pttl(format!("{prefix}{n}"));
                }
                let answers: Vec<redis::Value> = if names.is_empty() {
                    Vec::new()
                } else {
                    pipe.query_async(&mut conn).await?
                };
                if answers.len() != 2 * names.len() {
                    return Err(StoreError::Answer(format!(
                        "{} answers to {} fleet reads",
                        answers.len(),
                        2 * names.len()
                    )));
                }
                let (entries, ttls) = answers.split_at(names.len());
                let parse = |e: redis::ParsingError| StoreError::Answer(e.to_string());
                let mut replicas = Vec::new();
                let mut gone = Vec::new();
                for ((name, entry), ttl) in names.into_iter().zip(entries).zip(ttls) {
                    let mut h: BTreeMap<String, String> =
                        redis::from_redis_value_ref(entry).map_err(parse)?;
                    if h.is_empty() {
                        gone.push(name);
                        continue;
                    }
                    let pttl: i64 = redis::from_redis_value_ref(ttl).map_err(parse)?;
                    let mut take = |k: &str| h.remove(k).unwrap_or_default();
                    let r = Replica {
                        replica: take("replica"),
                        applied: take("applied"),
                        attempted: take("attempted"),
                        ok: take("ok") == "1",
                        loaded_at: take("loaded_at"),
                        heartbeat_age_ms: None,
                        stale: false,
                    };
                    replicas.push(r.with_pttl(pttl));
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
        Some(r.map(|replicas| {
            let view = FleetView::of(replicas);
            self.gauge.reset();
            for (sha, n) in &view.shas {
                self.gauge.with_label_values(&[sha.as_str()]).set(*n as i64);
            }
            view
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
            let info = match spec.connection_info() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow the fleet's heads channel");
                    return;
                }
            };
            // The subscription's messages are capped like every reply (`socket::Capped`).
            let subscribed = tokio::time::timeout(CALL_TIMEOUT, async {
                let stream = super::socket::connect(&info).await?;
                let mut pubsub = redis::aio::PubSub::new(info.redis_settings(), stream).await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub.split())
            })
            .await;
            let (mut sink, mut messages) = match subscribed {
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
            let mut ping = tokio::time::interval(HEADS_PING_EVERY);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            loop {
                let msg = tokio::select! {
                    msg = messages.next() => msg,
                    _ = ping.tick() => {
                        match tokio::time::timeout(CALL_TIMEOUT, sink.ping::<redis::Value>()).await {
                            Ok(Ok(_)) => continue,
                            _ => break,
                        }
                    }
                };
                let Some(msg) = msg else {
                    break;
                };
                if !self.on_head(&msg, &reload) {
                    return;
                }
            }
            tracing::debug!("fleet heads channel lost or silent; subscribing again");
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    }

    /// One message on the heads channel: a [`Trigger::Peer`] unless this replica sent it or
    /// already applies or tried its commit. `false` once `reload` is closed.
    fn on_head(&self, msg: &redis::Msg, reload: &mpsc::Sender<Trigger>) -> bool {
        let Ok(payload) = msg.get_payload::<String>() else {
            return true;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&payload) else {
            return true;
        };
        if v.get("replica").and_then(|r| r.as_str()) == Some(self.replica.as_str()) {
            return true;
        }
        let sha = v.get("sha").and_then(|s| s.as_str());
        let seen = sha.and_then(|sha| {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.seen(sha)
        });
        if let Some(why) = seen {
            tracing::debug!(sha, why, "head announced by another replica ignored");
            return true;
        }
        let from = v.get("replica").and_then(|r| r.as_str());
        match self.heads_log.due() {
            Some(left_out) => tracing::info!(
                sha,
                from,
                heads_since_last_log = left_out,
                "another replica saw a new head; fetching (logged at most every {}s)",
                super::LOG_EVERY.as_secs()
            ),
            None => tracing::debug!(sha, from, "another replica saw a new head; fetching"),
        }
        !matches!(
            reload.try_send(Trigger::Peer),
            Err(mpsc::error::TrySendError::Closed(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, applied: &str, pttl_ms: i64) -> Replica {
        Replica {
            replica: name.into(),
            applied: applied.into(),
            attempted: applied.into(),
            ok: true,
            loaded_at: String::new(),
            heartbeat_age_ms: None,
            stale: false,
        }
        .with_pttl(pttl_ms)
    }

    const V1: &str = "3f1c2a4b5c6d7e8f90a1b2c3d4e5f60718293a4b";
    const V2: &str = "9ab04c1d2e3f405162738495a6b7c8d9e0f1a2b3";

    #[test]
    fn the_heartbeat_is_the_entry_age_from_its_remaining_ttl() {
        let fresh = replica("a", V1, 14_000);
        assert_eq!((fresh.heartbeat_age_ms, fresh.stale), (Some(1_000), false));
        // One refresh missed (5 s) is not yet stale; two are.
        let late = replica("b", V1, 6_000);
        assert_eq!((late.heartbeat_age_ms, late.stale), (Some(9_000), false));
        let stale = replica("c", V1, 5_000);
        assert_eq!((stale.heartbeat_age_ms, stale.stale), (Some(10_000), true));
        // A key without expiry (-1) or gone meanwhile (-2): no age, not called stale.
        for pttl in [-1, -2] {
            let r = replica("d", V1, pttl);
            assert_eq!((r.heartbeat_age_ms, r.stale), (None, false), "{pttl}");
        }
        // A TTL longer than ours (another version's): age 0, never negative.
        assert_eq!(replica("e", V1, 60_000).heartbeat_age_ms, Some(0));
    }

    #[test]
    fn the_verdict_names_the_commits_and_who_serves_which() {
        let none = FleetView::of(vec![]);
        assert!(none.agree);
        assert_eq!(none.verdict(), "no replica has reported to the store yet");

        let one = FleetView::of(vec![replica("a", V1, 15_000)]);
        assert_eq!(one.verdict(), "the only replica serves 3f1c2a4b5c6d");

        let agree = FleetView::of(vec![replica("b", V1, 15_000), replica("a", V1, 12_000)]);
        assert!(agree.agree);
        assert_eq!(agree.verdict(), "all 2 replicas serve 3f1c2a4b5c6d");
        assert_eq!(agree.replicas[0].replica, "a", "sorted by name");

        let split = FleetView::of(vec![
            replica("c", V2, 15_000),
            replica("b", V1, 15_000),
            replica("a", V1, 15_000),
            replica("d", "", 15_000),
        ]);
        assert!(!split.agree);
        assert_eq!(
            split.commits(),
            vec![(V1, vec!["a", "b"]), ("", vec!["d"]), (V2, vec!["c"])]
        );
        assert_eq!(
            split.verdict(),
            "replicas disagree: 2 on 3f1c2a4b5c6d (a, b); 1 on nothing applied (d); \
             1 on 9ab04c1d2e3f (c)"
        );
        assert_eq!(split.shas.get(V1), Some(&2));

        let stale = FleetView::of(vec![replica("a", V1, 15_000), replica("b", V1, 2_000)]);
        assert_eq!(
            stale.verdict(),
            "all 2 replicas serve 3f1c2a4b5c6d (stale, no heartbeat for 10s or more: b)"
        );
    }
}
