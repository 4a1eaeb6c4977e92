//! The target's shared HTTP/2 connection on this worker: opened once, awaited by every request
//! that needs it meanwhile, replaced when it closes.

use std::rc::Rc;
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{LocalBoxFuture, Shared};
use http::uri::{Authority, PathAndQuery};
use hyper::body::Incoming;
use hyper::client::conn::http2;

use super::handshake::connect_h2;
use super::{LocalPool, SendFailure, SendOptions, resend_or_fail};

use crate::proxy::ForwardError;
use crate::proxy::body::ProxyBody;
use crate::upstream::Target;
use crate::util::clock;

pub(super) type H2Result = Result<http2::SendRequest<ProxyBody>, ForwardError>;

/// A target's HTTP/2 connection on this worker.
pub(super) enum H2Slot {
    Ready {
        conn: http2::SendRequest<ProxyBody>,
        expires: Instant,
    },
    /// Being opened; every request that needs it awaits the same future.
    Connecting(Shared<LocalBoxFuture<'static, H2Result>>),
}

impl LocalPool {
    /// Sends on the target's shared HTTP/2 connection, opening it if there is none.
    pub(super) async fn send_h2(
        self: &Rc<Self>,
        target: &Target,
        mut req: http::Request<ProxyBody>,
        opts: &SendOptions<'_>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        to_h2_request(&mut req, target);
        // The shared connection may have gone away (GOAWAY, reset) with the request unsent:
        // then it is sent once more on a new connection.
        for fresh in [false, true] {
            let mut conn = match self.h2_conn(target, opts, fresh).await {
                Ok(c) => c,
                Err(error) => {
                    return Err(SendFailure {
                        error,
                        request: Some(Box::new(req)),
                    });
                }
            };
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => req = resend_or_fail(e, fresh)?,
            }
        }
        Err(SendFailure {
            error: ForwardError::Upstream("no connection could take the request".into()),
            request: None,
        })
    }

    /// The target's HTTP/2 connection on this worker: the pooled one unless `fresh` (or it is
    /// closed), else the one being opened, else a new one.
    async fn h2_conn(
        self: &Rc<Self>,
        target: &Target,
        opts: &SendOptions<'_>,
        fresh: bool,
    ) -> H2Result {
        let key = &target.pool_key;
        let opening = {
            let mut map = self.h2.borrow_mut();
            match map.get_mut(key) {
                Some(H2Slot::Ready { conn, expires }) if !fresh && !conn.is_closed() => {
                    *expires = clock::now() + opts.idle_timeout;
                    return Ok(conn.clone());
                }
                Some(H2Slot::Connecting(f)) => f.clone(),
                _ => {
                    let slot = opts.pending_slot().map_err(ForwardError::Overloaded)?;
                    let addr = target.connect_addr.clone();
                    let tls = target.tls.clone();
                    let timeout = opts.connect_timeout;
                    let ping = self.h2_ping;
                    let f = async move {
                        let _slot = slot;
                        connect_h2(&addr, tls.as_ref(), timeout, ping).await
                    }
                    .boxed_local()
                    .shared();
                    map.insert(key.clone(), H2Slot::Connecting(f.clone()));
                    f
                }
            }
        };
        // A shared future keeps going when the request that started it is dropped: the next
        // one to await it drives it on.
        let result = opening.clone().await;
        let mut map = self.h2.borrow_mut();
        if let Some(H2Slot::Connecting(f)) = map.get(key)
            && f.ptr_eq(&opening)
        {
            match &result {
                Ok(conn) => {
                    map.insert(
                        key.clone(),
                        H2Slot::Ready {
                            conn: conn.clone(),
                            expires: clock::now() + opts.idle_timeout,
                        },
                    );
                }
                Err(_) => {
                    map.remove(key);
                }
            }
        }
        result
    }
}

/// An HTTP/2 request carries its target in `:scheme` and `:authority`: the URI becomes
/// absolute, with the `Host` the request would have had as its authority.
fn to_h2_request(req: &mut http::Request<ProxyBody>, target: &Target) {
    let authority = req
        .headers_mut()
        .remove(http::header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| target.authority.clone());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}
