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
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::Authority;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::ForwardError;
use super::body::ProxyBody;
use crate::upstream::Target;
use crate::upstream::state::UpstreamShared;

/// How often expired idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Idle connections kept per target and worker.
pub const MAX_IDLE_PER_TARGET: usize = 512;

struct Idle {
    conn: SendRequest<ProxyBody>,
    expires: Instant,
}

#[derive(Default)]
pub struct LocalPool {
    idle: RefCell<HashMap<Authority, Vec<Idle>>>,
}

/// How one attempt is made.
pub struct SendOptions<'a> {
    pub connect_timeout: Duration,
    /// Time allowed until the response head, connecting included.
    pub timeout: Duration,
    /// How long the connection may then wait idle in the pool.
    pub idle_timeout: Duration,
    /// The upstream's counters and its `max_pending` limit for opening connections.
    pub pending: Option<(&'a Arc<UpstreamShared>, u32)>,
}

/// A failed attempt, with the request when none of it was sent (so it can go elsewhere).
pub struct SendFailure {
    pub error: ForwardError,
    pub request: Option<http::Request<ProxyBody>>,
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

    /// Sends `req` to `target` on a pooled or new connection, waiting at most `opts.timeout`
    /// (connect included) for the response head.
    pub async fn send(
        self: &Rc<Self>,
        target: &Target,
        req: http::Request<ProxyBody>,
        opts: &SendOptions<'_>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        match tokio::time::timeout(opts.timeout, self.send_inner(target, req, opts)).await {
            Ok(r) => r,
            Err(_) => Err(SendFailure {
                error: ForwardError::Timeout(opts.timeout),
                request: None,
            }),
        }
    }

    async fn send_inner(
        self: &Rc<Self>,
        target: &Target,
        mut req: http::Request<ProxyBody>,
        opts: &SendOptions<'_>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
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
                None => {
                    let _slot = match opts.pending {
                        Some((shared, limit)) => match shared.acquire_pending(Some(limit)) {
                            Ok(slot) => slot,
                            Err(o) => {
                                return Err(SendFailure {
                                    error: ForwardError::Overloaded(o),
                                    request: Some(req),
                                });
                            }
                        },
                        None => None,
                    };
                    match connect(&target.connect_addr, opts.connect_timeout).await {
                        Ok(c) => c,
                        Err(error) => {
                            return Err(SendFailure {
                                error,
                                request: Some(req),
                            });
                        }
                    }
                }
            };
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin_when_ready(target.authority.clone(), conn, opts.idle_timeout);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(returned) if !fresh => req = returned,
                    returned => {
                        return Err(SendFailure {
                            error: super::classify(&e.into_error()),
                            request: returned,
                        });
                    }
                },
            }
        }
        Err(SendFailure {
            error: ForwardError::Upstream("no connection could take the request".into()),
            request: None,
        })
    }

    fn checkout(&self, key: &Authority) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if !i.conn.is_closed() && now < i.expires {
                return Some(i.conn);
            }
        }
        None
    }

    /// Pools the connection once its current response has been read to the end (hyper then
    /// reports it ready); a connection that closes first is simply dropped.
    fn checkin_when_ready(
        self: &Rc<Self>,
        key: Authority,
        mut conn: SendRequest<ProxyBody>,
        idle_timeout: Duration,
    ) {
        let pool = Rc::downgrade(self);
        actix_web::rt::spawn(async move {
            if conn.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.checkin(&key, conn, idle_timeout);
            }
        });
    }

    fn checkin(&self, key: &Authority, conn: SendRequest<ProxyBody>, idle_timeout: Duration) {
        let mut idle = self.idle.borrow_mut();
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                conn,
                expires: Instant::now() + idle_timeout,
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|i| !i.conn.is_closed() && now < i.expires);
            !list.is_empty()
        });
    }

    /// Idle connections held for `key` (for tests and status).
    pub fn idle_count(&self, key: &Authority) -> usize {
        self.idle.borrow().get(key).map_or(0, Vec::len)
    }
}

async fn sweep(pool: Weak<LocalPool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

/// Opens an HTTP/1.1 connection to `addr` (`host:port`); the connection task runs on the
/// current worker.
pub(crate) async fn connect(
    addr: &str,
    timeout: Duration,
) -> Result<SendRequest<ProxyBody>, ForwardError> {
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
