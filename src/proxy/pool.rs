//! A per-worker pool of upstream HTTP/1.1 connections.
//!
//! Each actix worker is a single thread, so its pool needs no lock: a `RefCell` over idle
//! connections keyed by target address. Pools outlive snapshots (the key is the address, not the
//! route), so a config swap that keeps a target keeps its warm connections.
//!
//! A connection goes back to the pool once hyper reports it ready, that is once its previous
//! response body has been read to the end; every pooled connection is idle.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::ForwardError;
use super::body::ProxyBody;
use crate::upstream::Target;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per target and worker.
pub const MAX_IDLE_PER_TARGET: usize = 512;

struct Idle {
    conn: SendRequest<ProxyBody>,
    since: Instant,
}

#[derive(Default)]
pub struct LocalPool {
    idle: RefCell<HashMap<Authority, Vec<Idle>>>,
}

impl LocalPool {
    /// A pool that drops expired idle connections in the background, for as long as it lives.
    /// Must be called on the worker's runtime.
    pub fn new() -> Rc<LocalPool> {
        let pool = Rc::new(LocalPool::default());
        let weak = Rc::downgrade(&pool);
        actix_web::rt::spawn(sweep(weak));
        pool
    }

    /// Sends `req` to `target` on a pooled or new connection, waiting at most `timeout` (connect
    /// included) for the response head.
    pub async fn send(
        self: &Rc<Self>,
        target: &Target,
        req: http::Request<ProxyBody>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<http::Response<Incoming>, ForwardError> {
        match tokio::time::timeout(timeout, self.send_inner(target, req, connect_timeout)).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Timeout(timeout)),
        }
    }

    async fn send_inner(
        self: &Rc<Self>,
        target: &Target,
        mut req: http::Request<ProxyBody>,
        connect_timeout: Duration,
    ) -> Result<http::Response<Incoming>, ForwardError> {
        // A pooled connection can close between the check and the send; hyper then hands the
        // untouched request back and it is sent once more on a fresh connection.
        for fresh in [false, true] {
            let pooled = if fresh {
                None
            } else {
                self.checkout(&target.authority)
            };
            let mut conn = match pooled {
                Some(c) => c,
                None => connect(target, connect_timeout).await?,
            };
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin_when_ready(target.authority.clone(), conn);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(returned) if !fresh => req = returned,
                    _ => return Err(super::classify(&e.into_error())),
                },
            }
        }
        Err(ForwardError::Upstream(
            "no connection could take the request".into(),
        ))
    }

    fn checkout(&self, key: &Authority) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if !i.conn.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT {
                return Some(i.conn);
            }
        }
        None
    }

    /// Pools the connection once its current response has been read to the end (hyper then
    /// reports it ready); a connection that closes first is simply dropped.
    fn checkin_when_ready(self: &Rc<Self>, key: Authority, mut conn: SendRequest<ProxyBody>) {
        let pool = Rc::downgrade(self);
        actix_web::rt::spawn(async move {
            if conn.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.checkin(&key, conn);
            }
        });
    }

    fn checkin(&self, key: &Authority, conn: SendRequest<ProxyBody>) {
        let mut idle = self.idle.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|i| !i.conn.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Idle connections held for `key` (for tests and status).
    pub fn idle_count(&self, key: &Authority) -> usize {
        self.idle.borrow().get(key).map_or(0, Vec::len)
    }
}

async fn sweep(pool: Weak<LocalPool>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<SendRequest<ProxyBody>, ForwardError> {
    let addr = target.connect_addr.as_str();
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Err(ForwardError::Timeout(timeout)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Err(ForwardError::Timeout(timeout));
        }
        Ok(Err(e)) => return Err(ForwardError::Connect(format!("{addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
