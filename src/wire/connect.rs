//! Connecting to a target: TCP (with `TCP_NODELAY`), then TLS with the protocol agreed by
//! ALPN, all within one timeout. Used by the request pools and the health checks alike.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Protocol;
use super::tls::{self, TargetTls};

/// Why a connection to a target could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The target refused or reset the connection, or its address did not resolve.
    #[error("connecting to the upstream failed: {0}")]
    Refused(String),
    /// The TLS handshake failed (certificate not trusted, name mismatch, client certificate
    /// refused, protocol not agreed).
    #[error("the TLS handshake with the upstream failed: {0}")]
    Tls(String),
    /// Connecting and the handshake together took longer than allowed.
    #[error("the upstream did not answer in {0:?}")]
    Timeout(Duration),
    /// The gateway itself could not open a socket: out of file descriptors, memory or local
    /// ports. Not the target's fault, and never counted against it (one client holding
    /// enough WebSocket tunnels ejected every target this way).
    #[error("the gateway could not open a connection: {0}")]
    Local(String),
}

/// Whether a failed connect is the gateway's own shortage rather than the target's answer.
fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The socket, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a TCP connection to `addr` (`host:port`), then TLS when `tls` is set, offering
/// `protocol` by ALPN; `timeout` bounds the connect and the handshake together.
pub async fn connect(
    addr: &str,
    tls: Option<&TargetTls>,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Io, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = tcp(addr, timeout).await?;
    match tls {
        None => Ok(Io::Plain(stream)),
        Some(t) => by(deadline, timeout, tls::handshake(stream, t, protocol, addr))
            .await
            .map(|s| Io::Tls(Box::new(s))),
    }
}

async fn tcp(addr: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, connect_any(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            return Err(ConnectError::Timeout(timeout));
        }
        Ok(Err(e)) if is_local_shortage(&e) => {
            return Err(ConnectError::Local(format!("{addr}: {e}")));
        }
        Ok(Err(e)) => return Err(ConnectError::Refused(format!("{addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Time after a connection attempt starts before the next address of the target's name is
/// tried beside it: RFC 8305's Connection Attempt Delay, as browsers, curl and Go use it.
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// A connection to `addr` (`host:port`, or a host and a port): an address as it is, a name by
/// its resolved addresses ([`connect_first`]).
pub(crate) async fn connect_any(addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    connect_first(&addrs).await
}

/// The first of `addrs` to take a connection. They are tried in the resolver's order, the next
/// one as soon as the last one failed or [`NEXT_ADDRESS_AFTER`] after it started, the earlier
/// attempts going on beside it (Happy Eyeballs, RFC 8305). Tried one after the other, a name
/// whose first address drops the SYN (an IPv6 address without a working route, a common
/// dual-stack fault) held the whole connect timeout and failed, its IPv4 address never tried.
async fn connect_first(addrs: &[std::net::SocketAddr]) -> io::Result<TcpStream> {
    use futures_util::StreamExt;
    if let [one] = addrs {
        return TcpStream::connect(one).await;
    }
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut next = addrs.iter();
    let mut failed = None;
    loop {
        match next.next() {
            Some(a) => pending.push(TcpStream::connect(*a)),
            None if pending.is_empty() => {
                return Err(failed.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the name has no address")
                }));
            }
            None => {}
        }
        let more = next.len() > 0;
        tokio::select! {
            Some(r) = pending.next() => match r {
                Ok(s) => return Ok(s),
                Err(e) => failed = Some(e),
            },
            () = tokio::time::sleep(NEXT_ADDRESS_AFTER), if more => {}
            else => {}
        }
    }
}

/// `fut`, or a timeout error once `deadline` passes.
pub async fn by<T, E: From<ConnectError>>(
    deadline: tokio::time::Instant,
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(ConnectError::Timeout(timeout).into()))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    /// A listener on 127.0.0.1 whose accept queue is full: further SYNs are dropped, as by an
    /// address without a route. The queued connection is returned to be kept.
    fn black_hole() -> (socket2::Socket, std::net::TcpStream, SocketAddr) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        s.listen(0).expect("listen");
        let addr = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("address");
        let queued = std::net::TcpStream::connect(addr).expect("first connection");
        (s, queued, addr)
    }

    /// The first address drops the SYN, the second answers: the connection is made to the
    /// second within a moment, not after the connect timeout. Before, the addresses were
    /// tried one after the other and the first held the whole timeout.
    #[tokio::test]
    async fn an_address_that_drops_the_syn_does_not_hold_back_the_next() {
        let (_hole, _queued, hole) = black_hole();
        let good = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let good_addr = good.local_addr().expect("address");
        // The black hole never answers: only trying the next address beside it connects.
        let stream =
            tokio::time::timeout(Duration::from_secs(3), connect_first(&[hole, good_addr]))
                .await
                .expect("connected before the timeout")
                .expect("connected");
        assert_eq!(stream.peer_addr().ok(), Some(good_addr));
    }

    /// A refused first address hands over to the next; with every address refused, the error is
    /// the last one's.
    #[tokio::test]
    async fn refused_addresses_hand_over_at_once_and_the_last_error_is_kept() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("address")
        };
        let good = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let good_addr = good.local_addr().expect("address");
        let stream = connect_first(&[dead, good_addr]).await.expect("connected");
        assert_eq!(stream.peer_addr().ok(), Some(good_addr));
        let err = connect_first(&[dead, dead]).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(connect_first(&[]).await.is_err());
    }
}
