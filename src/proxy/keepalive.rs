//! Keep-alive races with upstreams: what the pool needs to reuse HTTP/1.1 connections safely.
//!
//! An upstream may close an idle connection at the very moment the gateway writes the next
//! request on it. The request then meets an EOF or a reset before any response byte, through no
//! fault of the target. Two things keep clients from seeing that as a 502:
//!
//! * the pool stops reusing a connection before the upstream gives up on it: its idle timeout
//!   defaults below common upstream keep-alives, and an upstream's `Keep-Alive: timeout=N` cuts
//!   it to N-1 s ([`idle_limit`]);
//! * when the race happens anyway, an idempotent request whose body is still at hand is sent
//!   once more on a fresh connection ([`replay_copy`], [`CountingIo`]), as Go's `http.Transport`
//!   does and like nginx `proxy_next_upstream error` / Envoy `retry_on: reset`, but without
//!   counting the stale connection against the target's health.
//!
//! This module owns those rules; the pool applies them. Nothing here knows about routes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::ProxyBody;

/// How much earlier than the upstream's announced keep-alive timeout the pool lets go of a
/// connection: the upstream's timer starts when it has written the response, ours once the
/// response was read, and the next request takes time to arrive.
pub const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);

const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");

/// How long a connection whose response carried `headers` may wait idle in the pool: the
/// configured `idle_timeout`, cut to N-1 s by `Keep-Alive: timeout=N`. `None`: not reused.
pub fn idle_limit(headers: &http::HeaderMap, configured: Duration) -> Option<Duration> {
    let announced = headers
        .get_all(KEEP_ALIVE)
        .iter()
        .filter_map(|v| announced_timeout(v.as_bytes()))
        .min();
    idle_limit_of(announced, configured)
}

/// [`idle_limit`] for the smallest announced `timeout=` (seconds), if any.
pub fn idle_limit_of(announced: Option<u64>, configured: Duration) -> Option<Duration> {
    let limit = match announced {
        Some(secs) => configured.min(Duration::from_secs(secs).saturating_sub(KEEP_ALIVE_MARGIN)),
        None => configured,
    };
    (!limit.is_zero()).then_some(limit)
}

/// The smallest `timeout=N` parameter of one `Keep-Alive` field value (seconds), if any.
pub fn announced_timeout(value: &[u8]) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?;
    value
        .split(',')
        .filter_map(|param| {
            let (name, value) = param.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("timeout") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .min()
}

/// A copy of `req` to send again should a reused connection turn out to be stale: only for an
/// idempotent method whose body is empty or held whole (a streamed body cannot be read twice).
///
/// Made before the send because hyper keeps a request it has started to write.
pub fn replay_copy(req: &http::Request<ProxyBody>) -> Option<http::Request<ProxyBody>> {
    if !crate::upstream::retry::is_idempotent(req.method()) {
        return None;
    }
    let body = match req.body() {
        ProxyBody::Empty => ProxyBody::Empty,
        ProxyBody::Full(b) => ProxyBody::Full(b.clone()),
        ProxyBody::Channel { .. } => return None,
    };
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether a failed send looks like the connection went away under the request (EOF or an I/O
/// error such as a reset), as opposed to a response the upstream got wrong. Whether any response
/// byte arrived is told by [`ReadCount`], not by the error: hyper reports a head cut short
/// the same way as no head at all.
pub fn is_connection_lost(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Bytes read so far from one upstream connection, shared between its I/O and the pool.
#[derive(Clone, Default)]
pub struct ReadCount(Arc<AtomicU64>);

impl ReadCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An upstream connection's I/O that counts the bytes read from it (after TLS, so a TLS alert
/// is not taken for a response), so that the pool can tell "closed before any response byte"
/// from "closed in the middle of a response".
pub struct CountingIo<I> {
    inner: I,
    read: ReadCount,
}

impl<I> CountingIo<I> {
    pub fn new(inner: I) -> (CountingIo<I>, ReadCount) {
        let read = ReadCount::default();
        let io = CountingIo {
            inner,
            read: read.clone(),
        };
        (io, read)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for CountingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.read.0.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountingIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append("keep-alive", http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const NINETY: Duration = Duration::from_secs(90);

    #[test]
    fn an_announced_timeout_of_one_second_or_less_means_no_reuse() {
        assert_eq!(idle_limit(&headers(&["timeout=1"]), NINETY), None);
        assert_eq!(idle_limit(&headers(&["timeout=0"]), NINETY), None);
        assert_eq!(idle_limit(&headers(&["max=5, timeout=1"]), NINETY), None);
        assert_eq!(idle_limit(&headers(&[]), Duration::ZERO), None);
    }

    #[test]
    fn the_pool_lets_go_a_second_before_the_upstream_does() {
        let s = Duration::from_secs;
        assert_eq!(idle_limit(&headers(&["timeout=5"]), NINETY), Some(s(4)));
        assert_eq!(idle_limit(&headers(&["Timeout = 5"]), NINETY), Some(s(4)));
        assert_eq!(idle_limit(&headers(&["timeout=\"3\""]), NINETY), Some(s(2)));
        // Two announcements: the shorter one holds.
        assert_eq!(
            idle_limit(&headers(&["timeout=10", "timeout=3, max=100"]), NINETY),
            Some(s(2))
        );
        // Never longer than configured.
        assert_eq!(idle_limit(&headers(&["timeout=60"]), s(4)), Some(s(4)));
    }

    #[test]
    fn a_malformed_keep_alive_header_leaves_the_configured_timeout() {
        let s = Duration::from_secs;
        for v in [
            "timeout=",
            "timeout=-1",
            "timeout=abc",
            "max=3",
            "timeout",
            "",
        ] {
            assert_eq!(idle_limit(&headers(&[v]), s(4)), Some(s(4)), "{v:?}");
        }
        assert_eq!(idle_limit(&headers(&[]), s(4)), Some(s(4)));
    }

    #[test]
    fn only_idempotent_requests_with_a_body_at_hand_are_copied() {
        let mut post = http::Request::new(ProxyBody::Empty);
        *post.method_mut() = http::Method::POST;
        assert!(replay_copy(&post).is_none());

        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let mut streamed = http::Request::new(ProxyBody::Channel { rx, len: Some(3) });
        *streamed.method_mut() = http::Method::PUT;
        assert!(replay_copy(&streamed).is_none());

        let mut put = http::Request::new(ProxyBody::Full(Some(Bytes::from_static(b"abc"))));
        *put.method_mut() = http::Method::PUT;
        *put.uri_mut() = http::Uri::from_static("/x?y=1");
        put.headers_mut()
            .insert("x-a", http::HeaderValue::from_static("1"));
        let copy = replay_copy(&put).unwrap();
        assert_eq!(copy.method(), http::Method::PUT);
        assert_eq!(copy.uri(), "/x?y=1");
        assert_eq!(copy.headers()["x-a"], "1");
        assert!(matches!(copy.body(), ProxyBody::Full(Some(b)) if b == "abc"));

        let get = http::Request::new(ProxyBody::Empty);
        assert!(matches!(
            replay_copy(&get).unwrap().body(),
            ProxyBody::Empty
        ));
    }
}
