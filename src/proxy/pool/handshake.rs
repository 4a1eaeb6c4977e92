//! Opening upstream connections: the socket (TCP, TLS), then hyper's HTTP/1.1 (upgradable or
//! not) or HTTP/2 handshake.

use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::h2_shared::H2Result;
use super::{H1Conn, H2Ping};

use crate::proxy::ForwardError;
use crate::proxy::body::ProxyBody;
use crate::proxy::h1;
use crate::proxy::keepalive::CountingIo;
use crate::upstream::Protocol;
use crate::wire::connect;
use crate::wire::tls::TargetTls;

/// Opens a TCP connection to `addr`, with TLS when `tls` is set (offering `http/1.1`);
/// `timeout` bounds the connect and the handshake together.
pub(super) async fn connect_io(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<h1::Io, ForwardError> {
    Ok(connect::connect(addr, tls, Protocol::Http1, timeout).await?)
}

/// Opens a hyper HTTP/1.1 connection; the connection task runs on the current worker.
pub(super) async fn connect_h1(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<H1Conn, ForwardError> {
    h1_handshake(connect_io(addr, tls, timeout).await?, addr).await
}

/// Opens an HTTP/1.1 connection whose responses can be upgraded (TLS offers only
/// `http/1.1`); the connection task runs on the current worker until the upgrade takes its IO.
pub(super) async fn connect_upgradable(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
) -> Result<SendRequest<ProxyBody>, ForwardError> {
    h1_upgradable(connect_io(addr, tls, timeout).await?, addr).await
}

async fn h1_upgradable<I>(io: I, addr: &str) -> Result<SendRequest<ProxyBody>, ForwardError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        // The own client's limits ([`h1`]): a larger head is an error, not a response.
        .max_headers(h1::MAX_HEADERS)
        .max_buf_size(h1::MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

async fn h1_handshake<I>(io: I, addr: &str) -> Result<H1Conn, ForwardError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, read) = CountingIo::new(io);
    let (sender, conn) = http1::Builder::new()
        // The own client's limits ([`h1`]): a larger head is an error, not a response.
        .max_headers(h1::MAX_HEADERS)
        .max_buf_size(h1::MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(H1Conn { send: sender, read })
}

/// Opens an HTTP/2 connection (h2c with prior knowledge without `tls`); the connection task
/// runs on the current worker.
pub(super) async fn connect_h2(
    addr: &str,
    tls: Option<&TargetTls>,
    timeout: Duration,
    ping: H2Ping,
) -> H2Result {
    let deadline = tokio::time::Instant::now() + timeout;
    let io = connect::connect(addr, tls, Protocol::Http2, timeout).await?;
    connect::by(deadline, timeout, h2_handshake(io, addr, ping)).await
}

/// Cancelled streams an upstream HTTP/2 connection remembers at once (a few hundred bytes
/// each): frames for them are dropped; past it, for forgotten ones, answered with a reset.
const MAX_H2_RESETS_REMEMBERED: usize = 1024;

/// The flow-control window of each stream on an upstream HTTP/2 connection: the most of one
/// response the upstream can send ahead of a client that is slow to take it.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;

/// The upstream connection's own window: HTTP/2's largest (2^31-1), so that it never runs out
/// before its streams' windows do. A stream holds what it received until its client takes it;
/// with hyper's 5 MiB for the connection, three slow clients of large responses (2 MiB streams)
/// held all of it and every other request on the connection, other clients' too, got its
/// response head and no byte of its body. What the connection holds is bounded by its streams'
/// windows instead.
const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

async fn h2_handshake<I>(io: I, addr: &str, ping: H2Ping) -> H2Result
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        // One connection per target carries every client's streams. Streams the gateway
        // cancels (their clients went away) are remembered long enough for the frames already
        // on their way to be dropped quietly, and such frames are never counted as the
        // upstream's errors. With h2's defaults (50 streams for 1 s, then 1,024 frames for
        // the connection's life) one client dropping 120 streaming gRPC calls made the
        // gateway send GOAWAY on the shared connection: every client's calls failed, and the
        // target was ejected.
        .max_concurrent_reset_streams(MAX_H2_RESETS_REMEMBERED)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .reset_stream_duration(Duration::from_secs(10))
        .max_local_error_reset_streams(None)
        // A connection whose PING goes unanswered ends, and with it `is_closed`: the pool
        // opens a new one for the next request. Also while idle, so that a pooled connection
        // is checked before a request is given to it.
        .timer(TokioTimer::new())
        .keep_alive_interval(ping.interval)
        .keep_alive_timeout(ping.timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(format!("{addr}: HTTP/2 handshake failed: {e}")))?;
    actix_web::rt::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}
