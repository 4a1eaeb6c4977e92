//! The idle HTTP/1.1 connections: taken out for a request, given back once its response has
//! been read, swept when they expire.

use std::collections::HashSet;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;

use super::h2_shared::H2Slot;
use super::{H1Conn, LocalPool, MAX_IDLE_PER_TARGET};

use crate::proxy::h1;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::upstream::PoolKey;
use crate::util::clock;

/// How often expired idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
pub(super) struct Idle {
    conn: H1Conn,
    expires: Instant,
}

/// An idle connection of the request-task client ([`super::h1`]).
pub(super) struct IdleOwn {
    conn: h1::Conn,
    expires: Instant,
}

impl LocalPool {
    /// A pooled connection still usable at `now`.
    pub(super) fn checkout_own(&self, key: &PoolKey, now: Instant) -> Option<h1::Conn> {
        let mut idle = self.own.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if now < i.expires && i.conn.is_usable() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to the end ([`h1::ResponseBody`]).
    pub(crate) fn checkin_own(&self, key: &PoolKey, conn: h1::Conn, idle_timeout: Duration) {
        let mut idle = self.own.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(IdleOwn {
                conn,
                expires: clock::now() + idle_timeout,
            });
        }
    }

    pub(super) fn checkout(&self, key: &PoolKey) -> Option<H1Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = clock::now();
        while let Some(i) = list.pop() {
            if !i.conn.send.is_closed() && now < i.expires {
                return Some(i.conn);
            }
        }
        None
    }

    /// Pools the connection once its current response has been read to the end (hyper then
    /// reports it ready); a connection that closes first is simply dropped.
    pub(super) fn checkin_when_ready(
        self: &Rc<Self>,
        key: PoolKey,
        mut conn: H1Conn,
        idle_timeout: Duration,
    ) {
        let pool = Rc::downgrade(self);
        actix_web::rt::spawn(async move {
            if conn.send.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.checkin(&key, conn, idle_timeout);
            }
        });
    }

    fn checkin(&self, key: &PoolKey, conn: H1Conn, idle_timeout: Duration) {
        let mut idle = self.idle.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                conn,
                expires: clock::now() + idle_timeout,
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|i| !i.conn.send.is_closed() && now < i.expires);
            !list.is_empty()
        });
        self.own.borrow_mut().retain(|_, list| {
            list.retain(|i| now < i.expires && i.conn.is_usable());
            !list.is_empty()
        });
        // Requests in flight hold their own handle: dropping the pool's only stops reuse.
        self.h2.borrow_mut().retain(|_, slot| match slot {
            H2Slot::Ready { conn, expires } => !conn.is_closed() && now < *expires,
            H2Slot::Connecting(_) => true,
        });
    }

    /// Drops the idle connections to targets that `snapshot` no longer has (a reload removed
    /// their upstream or changed how they are reached): nothing would reuse them before their
    /// `idle_timeout`, which may be long, and upstreams see them gone at the reload, as Envoy
    /// drains the pools of removed hosts. A shared HTTP/2 connection stops being handed out;
    /// requests in flight on it keep their own handles.
    pub(super) fn keep_only(&self, snapshot: &Snapshot) {
        if self.idle.borrow().is_empty()
            && self.own.borrow().is_empty()
            && self.h2.borrow().is_empty()
        {
            // Nothing pooled on this worker: no set of the config's targets to build.
            return;
        }
        let kept: HashSet<&PoolKey> = snapshot
            .upstreams
            .iter()
            .flat_map(|u| u.targets.iter().map(|t| &t.pool_key))
            .collect();
        self.idle.borrow_mut().retain(|k, _| kept.contains(k));
        self.own.borrow_mut().retain(|k, _| kept.contains(k));
        self.h2
            .borrow_mut()
            .retain(|k, slot| kept.contains(k) || matches!(slot, H2Slot::Connecting(_)));
    }

    /// Idle HTTP/1.1 connections held for `authority`, whatever their TLS settings (for tests
    /// and status).
    pub fn idle_count(&self, authority: &Authority) -> usize {
        let hyper: usize = self
            .idle
            .borrow()
            .iter()
            .filter(|(k, _)| k.authority() == authority)
            .map(|(_, l)| l.len())
            .sum();
        let own: usize = self
            .own
            .borrow()
            .iter()
            .filter(|(k, _)| k.authority() == authority)
            .map(|(_, l)| l.len())
            .sum();
        hyper + own
    }
}

/// Every [`SWEEP_EVERY`], drops expired connections; at each published snapshot, those to
/// targets it no longer has ([`LocalPool::keep_only`]). Runs on the pool's worker, as long as
/// the pool lives.
pub(super) async fn sweep(pool: Weak<LocalPool>, store: std::sync::Weak<SnapshotStore>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let mut changes = store.upgrade().map(|s| s.subscribe());
    loop {
        let published = async {
            match &mut changes {
                Some(c) => c.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let reloaded = tokio::select! {
            _ = tick.tick() => false,
            ok = published => {
                if !ok {
                    // The store is gone: expiry sweeps only.
                    changes = None;
                }
                ok
            }
        };
        let Some(p) = pool.upgrade() else {
            return;
        };
        match reloaded.then(|| store.upgrade()).flatten() {
            Some(s) => p.keep_only(&s.load()),
            None => p.sweep(),
        }
    }
}
