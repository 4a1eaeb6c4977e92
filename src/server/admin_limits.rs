//! What keeps the admin listener answering under hostile clients: the bytes of webhook bodies
//! read at once ([`BodyBudget`]) and the connections one client address holds
//! ([`ConnLimit`]). The listener takes webhooks from the internet and the kubelet's probes on
//! one port; neither a flood of bodies nor one address's connections may take it over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Semaphore;

/// Bodies of the largest size that may be read at once; the budget is this many times
/// `--webhook-max-body`.
pub const BODIES_AT_ONCE: usize = 4;
/// How long a webhook waits for room in the budget before it is answered 503.
const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// What a 503 asks the sender to wait.
const RETRY_AFTER_SECONDS: &str = "5";

/// The bytes of webhook bodies the admin listener holds at once. A body reserves its
/// `Content-Length` (the cap when it has none, chunked) before its first byte is read, so
/// memory for bodies stays under `BODIES_AT_ONCE` × the cap however many connections send one.
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    /// Largest body read (`--webhook-max-body`).
    pub cap: usize,
    reserved: IntGauge,
}

impl BodyBudget {
    pub fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, u32::MAX as usize / BODIES_AT_ONCE);
        let reserved = IntGauge::new(
            "rustygate_admin_webhook_body_bytes",
            "Bytes reserved by webhook bodies being read on the admin listener",
        )
        .unwrap_or_else(|_| unreachable!("constant metric definition"));
        Self {
            permits: Arc::new(Semaphore::new(cap * BODIES_AT_ONCE)),
            cap,
            reserved,
        }
    }

    /// The gauge of reserved bytes, for the metrics registry.
    pub fn metric(&self) -> IntGauge {
        self.reserved.clone()
    }

    /// The body of a webhook whose headers passed the checks that need no body; `Err` is the
    /// answer to send: 413 over the cap (from `Content-Length`, before reading), 503 with
    /// `Retry-After` when the budget stays full for [`BUDGET_WAIT`], 400 for a broken body.
    pub async fn read(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<Bytes, HttpResponse> {
        let too_large = || {
            super::admin::reply(
                413,
                &format!("the webhook body is over {} KiB", self.cap / 1024),
            )
        };
        let declared = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let wanted = match declared {
            Some(n) if n > self.cap as u64 => return Err(too_large()),
            Some(n) => n as usize,
            None => self.cap,
        };
        let permits = u32::try_from(wanted).unwrap_or(u32::MAX);
        let acquire = Arc::clone(&self.permits).acquire_many_owned(permits);
        let Ok(Ok(permit)) = tokio::time::timeout(BUDGET_WAIT, acquire).await else {
            tracing::warn!(
                peer = logged_peer(req),
                "webhook refused: too many webhook bodies are being read"
            );
            let mut busy = super::admin::reply(
                503,
                "too many webhook bodies are being read at once; retry later",
            );
            busy.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
            return Err(busy);
        };
        self.reserved.add(i64::from(permits));
        let body = super::api::read_capped(payload, wanted).await;
        self.reserved.sub(i64::from(permits));
        drop(permit);
        match body {
            Ok(Some(body)) => Ok(Bytes::from(body)),
            Ok(None) => Err(too_large()),
            Err(e) => Err(super::admin::reply(
                400,
                &format!("the webhook body could not be read: {e}"),
            )),
        }
    }
}

/// Connections the admin listener holds per client address (an IPv6 client by its /64), like
/// nginx's `limit_conn`: one address cannot take all of the listener's connections and starve
/// the kubelet's probes. A connection over it is closed at once, before its request is read.
pub(crate) struct ConnLimit {
    open: Mutex<HashMap<IpAddr, usize>>,
    per_client: usize,
    refused: IntCounter,
}

impl ConnLimit {
    pub fn new(per_client: usize) -> Arc<Self> {
        let refused = IntCounter::new(
            "rustygate_admin_connections_refused_total",
            "Admin connections closed at once: their client address held its limit already",
        )
        .unwrap_or_else(|_| unreachable!("constant metric definition"));
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            per_client: per_client.max(1),
            refused,
        })
    }

    pub fn metric(&self) -> IntCounter {
        self.refused.clone()
    }

    /// A place for a connection from `peer`, held until the guard drops; `None` when the
    /// address holds its limit.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<ConnGuard> {
        let key = client_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            drop(open);
            self.refused.inc();
            tracing::debug!(peer = %crate::util::canonical_ip(peer), "admin connection refused: the address holds its limit");
            return None;
        }
        *n += 1;
        Some(ConnGuard {
            limit: Arc::clone(self),
            key,
        })
    }
}

/// One admitted connection's place in [`ConnLimit`].
pub(crate) struct ConnGuard {
    limit: Arc<ConnLimit>,
    key: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The client's address as the admin listener's warnings give it: an IPv4 client of a
/// dual-stack listener as IPv4, not `[::ffff:a.b.c.d]:port`.
pub(crate) fn logged_peer(
    req: &HttpRequest,
) -> Option<tracing::field::DisplayValue<std::net::SocketAddr>> {
    req.peer_addr()
        .map(|a| tracing::field::display(crate::util::canonical_peer(a)))
}

/// The address a client is counted by: IPv4 as is, IPv6 by its /64 (one host commonly holds a
/// whole /64), an IPv4-mapped IPv6 address as the IPv4 address.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    crate::util::client_prefix(ip, crate::filters::rate_limit::DEFAULT_IPV6_PREFIX)
}

/// The refusal of a request a web page on another site made through the operator's browser:
/// its `Origin` names another host than its `Host`, or `Sec-Fetch-Site` says `cross-site` or
/// `same-site`. Without a token, a loopback admin listener would otherwise run
/// `/api/v1/explain` (policies, plugins) for any page the operator visits. Tools that are not
/// browsers (curl, CI) send neither header.
pub(crate) fn cross_site(req: &HttpRequest) -> Option<HttpResponse> {
    let headers = req.headers();
    let fetched_from_elsewhere = headers
        .get("sec-fetch-site")
        .is_some_and(|v| matches!(v.as_bytes(), b"cross-site" | b"same-site"));
    let host = headers.get("host").map(|v| v.as_bytes());
    // `scheme://host[:port]`; `null` (a sandboxed or file page) names no host.
    let foreign_origin = headers.get("origin").is_some_and(|origin| {
        let origin_host = origin.as_bytes().split(|&b| b == b'/').nth(2);
        !matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
    });
    (fetched_from_elsewhere || foreign_origin).then(|| {
        tracing::warn!(
            peer = logged_peer(req),
            path = req.path(),
            "cross-site admin request refused"
        );
        super::admin::reply(
            403,
            "cross-site requests are refused: this request came from a web page of another \
             origin (Origin / Sec-Fetch-Site)",
        )
    })
}

/// The refusal of a body that is not declared JSON (`415`): a browser sends a cross-site
/// `text/plain` or form body without asking first (no CORS preflight), never a JSON one.
pub(crate) fn not_json(req: &HttpRequest) -> Option<HttpResponse> {
    let media_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match media_type {
        Some(t) if t.eq_ignore_ascii_case("application/json") => None,
        _ => Some(super::admin::reply(
            415,
            "the body must be JSON: send Content-Type: application/json",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0; 4]));
        let b: IpAddr = "2001:db8:1:2:ffff::9"
            .parse()
            .unwrap_or(IpAddr::from([0; 4]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 4]));
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4]));
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn one_address_holds_at_most_its_limit_and_gets_places_back() {
        let limit = ConnLimit::new(2);
        let ip = IpAddr::from([192, 0, 2, 1]);
        let first = limit.admit(ip);
        let second = limit.admit(ip);
        assert!(first.is_some() && second.is_some());
        assert!(limit.admit(ip).is_none(), "a third is refused");
        assert!(limit.admit(IpAddr::from([192, 0, 2, 2])).is_some());
        drop(first);
        assert!(
            limit.admit(ip).is_some(),
            "a closed one gives its place back"
        );
        assert_eq!(limit.metric().get(), 1);
    }
}
