//! The proxy listener's connections, before HTTP sees them.
//!
//! ```text
//! accept ─► admit (max_connections, max_connections_per_ip) ─► TCP_NODELAY
//!        ─► [TLS handshake, within `header_timeout`: `server::tls`]
//!        ─► ClientIo (header timeout on every request head) ─► actix-http dispatcher ─► handler
//! ```
//!
//! What the handler may want to know about the connection (listener, TLS version, SNI, the
//! verified client certificate) is one [`ConnInfo`] per connection, read with [`conn_info`].
//!
//! Actix times only a connection's *first* request head (`client_request_timeout`); once a
//! keep-alive connection has served a request, bytes of the next head clear its keep-alive timer
//! and nothing times the rest. [`ClientIo`] wraps the socket and closes that gap: when bytes
//! arrive while no request of the connection is being handled, a head deadline starts; the
//! handler clears it when the head has been parsed ([`ConnState::begin`]). If the deadline
//! passes first, the client gets `408` and the connection is closed.
//!
//! [`ClientIo`] times the keep-alive idle too (the time between one request's end and the next
//! request's first bytes): when it passes, the dispatcher sees end of input and closes. Actix's
//! own keep-alive timer is off (`KeepAlive::Os`): it boxed and registered a new timer after
//! every response. Here one timer per connection serves both deadlines and is moved only when
//! it fires: a deadline is only ever set at least `min(header_timeout, keep_alive)` from now,
//! so a timer armed for no later than that is never late for one.
//!
//! The limits are read from the snapshot current at accept time, so a config swap applies to
//! the next connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::headers::ClientCert;
use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;

mod answers;
mod client_io;
mod conn_state;
mod head;
mod socket;

pub(crate) use client_io::{ClientIo, client_io};
pub(crate) use conn_state::{Busy, ConnState};

/// The connection poll's clock reading (`util::clock`), as the timers take it.
fn now() -> Instant {
    Instant::from_std(crate::util::clock::now())
}

/// Facts about one client connection, shared by its requests. Inserted per connection by
/// `on_connect_ext` (HTTP/1) or into each request's extensions (HTTP/2); read with
/// [`conn_info`].
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// The `[[listener]]` name; `""` for `--listen`.
    #[allow(dead_code)] // for the HTTP/2 server and logs; kept with the connection
    pub listener: Arc<str>,
    /// Set when the connection came over TLS.
    pub tls: Option<TlsInfo>,
    /// A plain listener with `redirect_to_https`: every request gets 308 to this port.
    pub redirect_to: Option<u16>,
}

impl ConnInfo {
    /// `"https"` or `"http"`, for the access log.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// What the TLS handshake settled.
#[derive(Debug)]
#[allow(dead_code)] // `h2` routes to the HTTP/2 server; `version`/`sni` for logs and policies
pub(crate) struct TlsInfo {
    /// `"TLSv1_3"` or `"TLSv1_2"`.
    pub version: &'static str,
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// The client certificate, verified against `client_auth.ca`.
    pub client_cert: Option<ClientCert>,
}

/// The connection facts of an HTTP/2 request, in its extensions (where the HTTP/2 server puts
/// them; an HTTP/1 request finds them in its connection's [`ConnState`]).
pub(crate) fn conn_info(req: &actix_http::Request) -> Option<Rc<ConnInfo>> {
    actix_web::HttpMessage::extensions(req)
        .get::<Rc<ConnInfo>>()
        .cloned()
}

/// The client's byte stream: plain TCP or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Open client connections, process-wide (all workers), for the connection limits.
#[derive(Default)]
pub(crate) struct ConnCounts {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// `rustygate_client_connections`, when exported.
    gauge: Option<prometheus::IntGauge>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

impl ConnCounts {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            gauge: Some(gauge),
            ..Self::default()
        }
    }

    /// Counts a new connection from `ip`, or refuses it when a limit is reached. The count is
    /// given back when the returned guard drops.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: Option<u32>,
    ) -> Result<ConnGuard, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::MaxConnections);
        }
        // By the address the rate limits count: an IPv6 client by its /64, which one host or
        // subscriber line usually holds whole (counted per address, it could open a fresh set
        // of connections from each of 2^64 addresses).
        let ip = crate::server::admin_limits::client_key(ip);
        if let Some(cap) = max_per_ip {
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= cap {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::MaxConnectionsPerIp);
            }
            *n += 1;
        }
        if let Some(g) = &self.gauge {
            g.inc();
        }
        Ok(ConnGuard {
            counts: Arc::clone(self),
            ip: max_per_ip.map(|_| ip),
        })
    }

    /// Open connections now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One admitted connection; gives its place back when dropped.
pub(crate) struct ConnGuard {
    counts: Arc<ConnCounts>,
    /// Set when the connection was counted per IP.
    ip: Option<IpAddr>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(g) = &self.counts.gauge {
            g.dec();
        }
        if let Some(ip) = self.ip {
            let mut map = self.counts.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// An admitted socket, before any TLS handshake.
pub(crate) struct Admitted {
    pub io: TcpStream,
    pub peer: Option<SocketAddr>,
    pub guard: ConnGuard,
    /// `[limits] header_timeout` at accept: for the handshake and every request head.
    pub header_timeout: Duration,
    /// `[limits] send_timeout` at accept.
    pub send_timeout: Duration,
}

/// Admits an accepted socket: limits, `TCP_NODELAY`. `None` when the connection is refused (it
/// is closed by dropping it).
pub(crate) fn admit(
    io: TcpStream,
    store: &SnapshotStore,
    counts: &Arc<ConnCounts>,
    metrics: &Metrics,
) -> Option<Admitted> {
    // An IPv4 client of a dual-stack listener is its IPv4 address from here on: the refused
    // heads' access lines and the HTTP/2 connection logs show it as the request path does.
    let peer = io.peer_addr().ok().map(crate::util::canonical_peer);
    let snap = store.load();
    let limits = &snap.limits;
    let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    let guard = match counts.admit(ip, limits.max_connections, limits.max_connections_per_ip) {
        Ok(g) => g,
        Err(why) => {
            metrics
                .connections_refused
                .with_label_values(&[why.as_str()])
                .inc();
            tracing::debug!(client_ip = %ip, limit = why.as_str(), "connection refused");
            return None;
        }
    };
    // Small responses and the head of streamed ones leave at once: without it, a head and a
    // body written separately meet the client's delayed ACK (a 40 ms stall per response).
    if let Err(e) = io.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    Some(Admitted {
        io,
        peer,
        guard,
        header_timeout: limits.header_timeout,
        send_timeout: limits.send_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_count_and_give_back() {
        let counts = Arc::new(ConnCounts::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let g1 = counts.admit(a, 3, Some(2)).expect("first");
        let g2 = counts.admit(a, 3, Some(2)).expect("second");
        assert_eq!(
            counts.admit(a, 3, Some(2)).err(),
            Some(Refused::MaxConnectionsPerIp)
        );
        let g3 = counts.admit(b, 3, Some(2)).expect("other ip");
        assert_eq!(
            counts.admit(b, 3, Some(2)).err(),
            Some(Refused::MaxConnections)
        );
        assert_eq!(counts.open(), 3);
        drop(g1);
        let g4 = counts.admit(a, 3, Some(2)).expect("place given back");
        drop((g2, g3, g4));
        assert_eq!(counts.open(), 0);
        assert!(counts.per_ip.lock().expect("lock").is_empty());
        // Without a per-IP cap nothing is kept per address.
        let g = counts.admit(a, 3, None).expect("no cap");
        assert!(counts.per_ip.lock().expect("lock").is_empty());
        drop(g);
    }

    /// An IPv6 client is one client for all the addresses of its /64, as the rate limits and
    /// the admin listener count it; an IPv4-mapped peer (a dual-stack listener) is its IPv4
    /// address. Before, each IPv6 address had a cap of its own.
    #[test]
    fn ipv6_clients_are_capped_by_their_64_prefix() {
        let counts = Arc::new(ConnCounts::default());
        let admit = |s: &str| {
            let ip = s.parse::<IpAddr>().unwrap_or(IpAddr::from([0; 4]));
            counts.admit(ip, 10, Some(2))
        };
        let g1 = admit("2001:db8:1:2::1").expect("first");
        let g2 = admit("2001:db8:1:2:ffff::9").expect("second");
        let refused = Some(Refused::MaxConnectionsPerIp);
        assert_eq!(
            admit("2001:db8:1:2::3").err(),
            refused,
            "a third address of the same /64"
        );
        let g3 = admit("2001:db8:1:3::1").expect("another /64");
        let g4 = admit("::ffff:192.0.2.1").expect("mapped");
        let g5 = admit("192.0.2.1").expect("plain");
        assert_eq!(
            admit("::ffff:192.0.2.1").err(),
            refused,
            "mapped and plain are one client"
        );
        drop((g1, g2, g3, g4, g5));
        assert!(counts.per_ip.lock().expect("lock").is_empty());
    }
}
