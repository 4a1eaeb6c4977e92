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
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
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
