//! WebSocket tunnels (RFC 6455 over HTTP/1.1).
//!
//! ```text
//! client GET + Upgrade: websocket ─► handler: checks, auth, rate limit, policy on_request
//!   ─► handshake(): is it one, may it be forwarded ─► pool.send_upgrade (new h1 connection)
//!   ─► upstream 101 checked (Upgrade, Sec-WebSocket-Accept) ─► 101 relayed to the client
//!   ─► Tunnel: upstream → client as the response body, client → upstream by a task on the
//!      worker, until either side closes or nothing moves for the idle timeout ─► access log
//! ```
//! Frames are not parsed: bytes are relayed as they come, so extensions and subprotocols the
//! two ends agree on pass untouched. Only the frames' heads are followed ([`frames`]), so that
//! a tunnel still open near the end of the shutdown grace can end with close frames (1001
//! Going Away) put between two frames of each direction. Actix reads the client's bytes after a `Upgrade: websocket`
//! head until EOF as that request's payload, and writes a response marked as an upgrade with no
//! framing after its head: the tunnel needs no dispatcher of its own.
//!
//! This module owns recognising a handshake, the headers that carry it upstream, checking the
//! upstream's 101 and the tunnel. It does not touch routing, the filters or the pool's reuse.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_http::{HttpMessage as _, Request};
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::{Method, Version, header as ax};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::body::{BodyStats, Ended, OnFinish};
use frames::Frames;

mod frames;

/// RFC 6455 §1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Bytes read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What a request asks for, as far as WebSockets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Not a WebSocket handshake on a route that takes them: forwarded as a plain request
    /// (upgrade headers are hop-by-hop and stripped, so `Upgrade: h2c` never goes upstream).
    Plain,
    /// A WebSocket handshake to forward with its upgrade headers.
    WebSocket,
}

/// Whether `req` is a WebSocket handshake to tunnel on a route where `allowed`
/// (`route.websocket`). `Err` (400) for requests that name `websocket` in `Upgrade` but cannot
/// be forwarded as either: one with a body (actix reads everything after such a head as its
/// payload, so a declared length would not bound it), a handshake that is not a GET, or one
/// without a usable `Sec-WebSocket-Key`.
pub fn handshake(req: &Request, allowed: bool) -> Result<Handshake, &'static str> {
    let h = req.headers();
    let names_websocket = h
        .get_all(ax::UPGRADE)
        .any(|v| upgrade_is_websocket(v.as_bytes()));
    if !names_websocket {
        return Ok(Handshake::Plain);
    }
    let declares_body = h.contains_key(ax::TRANSFER_ENCODING)
        || h.get_all(ax::CONTENT_LENGTH)
            .any(|v| v.as_bytes().iter().any(|&b| b != b'0'));
    if declares_body {
        return Err("a WebSocket handshake cannot carry a request body");
    }
    let asks_upgrade = h
        .get_all(ax::CONNECTION)
        .any(|v| has_token(v.as_bytes(), "upgrade"));
    // HTTP/1.0 has no upgrade (RFC 9110 §7.8); other versions carry WebSockets differently.
    if !allowed || !asks_upgrade || req.version() != Version::HTTP_11 {
        return Ok(Handshake::Plain);
    }
    if req.method() != Method::GET {
        return Err("a WebSocket handshake must be a GET request");
    }
    let mut keys = h.get_all("sec-websocket-key");
    match (keys.next(), keys.next()) {
        (Some(k), None) if valid_key(k.as_bytes()) => Ok(Handshake::WebSocket),
        _ => Err("a WebSocket handshake needs one valid Sec-WebSocket-Key"),
    }
}

/// Whether an `Upgrade` field of a request asks for WebSocket as actix-http's decoder reads it
/// (the field's whole value is `websocket`, any case): only then does actix hand the rest of
/// the connection to the handler as the tunnel's bytes. `websocket, foo` named WebSocket to the
/// gateway and not to actix: the 101 went out chunk-encoded and what the client sent next was
/// parsed as requests. Such a request is a plain one.
pub fn upgrade_is_websocket(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"websocket")
        && value
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// RFC 6455 §4.1: the base64 encoding of 16 bytes.
fn valid_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key.trim_ascii())
        .is_ok_and(|k| k.len() == 16)
}

/// Puts back the headers that carry the handshake (stripped from every request as hop-by-hop).
/// `Sec-WebSocket-*` are end-to-end and already there.
pub fn set_upgrade_headers(headers: &mut http::HeaderMap) {
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
}

/// Checks the upstream's 101 against the client's `Sec-WebSocket-Key`: it must switch to
/// `websocket` and prove it read the key. Anything else is not a WebSocket server, and no
/// tunnel is opened to it.
pub fn check_switch(headers: &http::HeaderMap, key: &[u8]) -> Result<(), &'static str> {
    if !headers
        .get_all(http::header::UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), "websocket"))
    {
        return Err("the upstream switched protocols without `Upgrade: websocket`");
    }
    let expected = accept_for(key);
    let mut accepts = headers.get_all("sec-websocket-accept").iter();
    match (accepts.next(), accepts.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == expected.as_bytes() => Ok(()),
        _ => Err("the upstream's Sec-WebSocket-Accept does not match the client's key"),
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
fn accept_for(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim_ascii());
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// What both directions of a tunnel share.
struct Shared {
    /// When a byte last went either way.
    last: Cell<Instant>,
    /// Set by the client-to-upstream side when it failed: the tunnel ends.
    failed: Cell<Option<&'static str>>,
    /// The response body, to wake when `failed` is set.
    waker: Cell<Option<Waker>>,
    /// Bytes from the client (the access log's `bytes_in`).
    stats: Rc<BodyStats>,
    /// The shutdown grace is nearly over: the tunnel ends itself with close frames.
    closing: Cell<bool>,
    /// While `closing`: the client is done, its close frame seen (or its connection closed).
    client_done: Cell<bool>,
}

impl Shared {
    fn fail(&self, why: &'static str) {
        self.failed.set(Some(why));
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// How far the upstream-to-client side is in ending the tunnel at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutting {
    No,
    /// Relaying the rest of the upstream's current frame, then the close frame.
    Closing,
    /// The client has its close frame; waiting for its answer.
    CloseSent,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Io = TokioIo<Upgraded>;

enum Upstream {
    /// The 101 is on its way to the client; hyper hands over the connection once it has read
    /// the head. The client's payload waits here for the other direction.
    Switching(OnUpgrade, Option<actix_web::dev::Payload>),
    Open(ReadHalf<Io>),
    Closed,
}

/// Keeps `rustygate_websocket_connections` up for as long as it lives.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(g: prometheus::IntGauge) -> Self {
        g.inc();
        Counted(g)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An open tunnel, as the body of the client's 101 response: it yields what the upstream
/// sends, while a task on the worker writes what the client sends to the upstream. Dropping it
/// (the client's connection ended) closes the upstream's.
pub struct Tunnel {
    upstream: Upstream,
    shared: Rc<Shared>,
    buf: Box<[u8]>,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    sent: u64,
    on_finish: Option<OnFinish>,
    /// Dropped when the tunnel ends: stops the client-to-upstream task.
    stop: Option<oneshot::Sender<()>>,
    /// The task that waits for the shutdown to set `shared.closing` (one per tunnel, so that
    /// relaying a chunk polls nothing shared between workers).
    watcher: Option<AbortOnDrop>,
    /// The upstream's frames.
    down: Frames,
    shutting: Shutting,
    /// The upstream's connection ended (or failed) while the tunnel closed itself.
    upstream_done: bool,
    _counted: Counted,
}

impl Tunnel {
    /// A tunnel over the upstream connection `on_upgrade` will yield and the client's
    /// `payload`, closed after `idle` without a byte either way. `stats` counts the client's
    /// bytes; `on_finish` gets the upstream's byte count and how the tunnel ended.
    pub fn new(
        on_upgrade: OnUpgrade,
        payload: actix_web::dev::Payload,
        idle: Duration,
        stats: Rc<BodyStats>,
        gauge: prometheus::IntGauge,
        on_finish: OnFinish,
    ) -> Self {
        Tunnel {
            upstream: Upstream::Switching(on_upgrade, Some(payload)),
            shared: Rc::new(Shared {
                last: Cell::new(Instant::now()),
                failed: Cell::new(None),
                waker: Cell::new(None),
                stats,
                closing: Cell::new(false),
                client_done: Cell::new(false),
            }),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            idle,
            timer: None,
            sent: 0,
            on_finish: Some(on_finish),
            stop: None,
            watcher: None,
            down: Frames::default(),
            shutting: Shutting::No,
            upstream_done: false,
            _counted: Counted::new(gauge),
        }
    }

    fn finish(&mut self, end: Ended) {
        self.upstream = Upstream::Closed;
        self.stop = None;
        self.watcher = None;
        if let Some(f) = self.on_finish.take() {
            f(self.sent, end);
        }
    }

    /// After the client got the tunnel's close frame at shutdown: reads on what the upstream
    /// sends (dropped) until its close frame or its end, so that it reads the close frame it
    /// was sent rather than have its connection reset under it; the tunnel ends when both
    /// sides are done (or when the server's stop cuts it).
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        while !(self.upstream_done || self.down.closed()) {
            let Upstream::Open(read) = &mut self.upstream else {
                break;
            };
            let mut buf = ReadBuf::new(&mut self.buf);
            match Pin::new(read).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => self.upstream_done = true,
                Poll::Ready(Ok(())) => self.down.pass(buf.filled()),
                Poll::Ready(Err(_)) => self.upstream_done = true,
                Poll::Pending => break,
            }
        }
        if self.shared.client_done.get() && (self.upstream_done || self.down.closed()) {
            self.finish(Err("shutdown"));
            return Poll::Ready(None);
        }
        self.shared.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }

    /// Whether nothing moved either way for `idle` (arms the wake-up if not).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let due = self.shared.last.get() + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl MessageBody for Tunnel {
    type Error = std::io::Error;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(why) = this.shared.failed.get() {
                this.finish(Err(why));
                return Poll::Ready(None);
            }
            match &mut this.upstream {
                Upstream::Closed => return Poll::Ready(None),
                Upstream::Switching(on_upgrade, payload) => match Pin::new(on_upgrade).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "the upstream's WebSocket upgrade failed");
                        this.finish(Err("upstream_error"));
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Ok(upgraded)) => {
                        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                        let (stop, stopped) = oneshot::channel();
                        let (closing, closing_rx) = oneshot::channel();
                        if let Some(payload) = payload.take() {
                            actix_web::rt::spawn(client_to_upstream(
                                payload,
                                write,
                                Rc::clone(&this.shared),
                                stopped,
                                closing_rx,
                            ));
                        }
                        let shared = Rc::clone(&this.shared);
                        this.watcher = Some(AbortOnDrop(actix_web::rt::spawn(async move {
                            crate::server::drain::tunnels_close().await;
                            shared.closing.set(true);
                            shared.wake();
                            let _ = closing.send(());
                        })));
                        this.stop = Some(stop);
                        this.shared.last.set(Instant::now());
                        this.upstream = Upstream::Open(read);
                    }
                },
                Upstream::Open(read) => {
                    if this.shutting == Shutting::No && this.shared.closing.get() {
                        this.shutting = Shutting::Closing;
                    }
                    if this.shutting == Shutting::Closing
                        && (this.down.at_boundary() || this.down.closed())
                    {
                        this.shutting = Shutting::CloseSent;
                        // Unless the upstream's own close frame went to the client already.
                        if !this.down.closed() {
                            let close = frames::going_away_to_client();
                            return Poll::Ready(Some(Ok(Bytes::copy_from_slice(&close))));
                        }
                    }
                    if this.shutting == Shutting::CloseSent {
                        return this.poll_closed(cx);
                    }
                    let mut buf = ReadBuf::new(&mut this.buf);
                    match Pin::new(read).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            this.finish(Ok(()));
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(())) => {
                            let filled = buf.filled();
                            let data = if this.shutting == Shutting::Closing {
                                close_at_boundary(
                                    &mut this.down,
                                    filled,
                                    &frames::going_away_to_client(),
                                )
                                .map(|(n, out)| {
                                    this.shutting = Shutting::CloseSent;
                                    // Dropped, read only for the upstream's close frame.
                                    this.down.pass(&filled[n..]);
                                    out
                                })
                                .unwrap_or_else(|| Bytes::copy_from_slice(filled))
                            } else {
                                this.down.pass(filled);
                                Bytes::copy_from_slice(filled)
                            };
                            this.sent += data.len() as u64;
                            this.shared.last.set(Instant::now());
                            return Poll::Ready(Some(Ok(data)));
                        }
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(error = %e, "reading from the WebSocket upstream failed");
                            this.finish(Err("upstream_error"));
                            return Poll::Ready(Some(Err(e)));
                        }
                        Poll::Pending => {
                            this.shared.waker.set(Some(cx.waker().clone()));
                            if this.idle_expired(cx) {
                                this.finish(Err("websocket_idle_timeout"));
                                return Poll::Ready(None);
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The client's connection ended before the tunnel did (or the
        // shutdown grace ended).
        self.finish(Err(crate::server::drain::gone_reason()));
    }
}

/// The part of `data` up to the end of the current frame followed by `close` (not if the frame
/// that ended was a close frame already), and how much of `data` that was; `None` if no frame
/// ends within `data` (all of it was followed).
fn close_at_boundary(frames: &mut Frames, data: &[u8], close: &[u8]) -> Option<(usize, Bytes)> {
    let n = frames.follow_to_boundary(data)?;
    let mut out = data[..n].to_vec();
    if !frames.closed() {
        out.extend_from_slice(close);
    }
    Some((n, out.into()))
}

/// Writes what the client sends to the upstream until the client closes (then the upstream's
/// write side is shut, and the tunnel ends when the upstream closes too), a write fails, or the
/// tunnel is over (`stop`).
///
/// When `closing` comes (the shutdown grace is nearly over), the upstream gets a close frame
/// (1001) after the client's current frame and nothing after it; the client's bytes are read on
/// until its own close frame (its answer to the one the tunnel sent it), and then the tunnel is
/// told the client is done.
async fn client_to_upstream(
    mut payload: actix_web::dev::Payload,
    mut upstream: WriteHalf<Io>,
    shared: Rc<Shared>,
    mut stop: oneshot::Receiver<()>,
    mut closing: oneshot::Receiver<()>,
) {
    let mut frames = Frames::default();
    let mut watched = false;
    // The upstream has had its close frame (the client's or the tunnel's): nothing more goes.
    let mut sealed = false;
    let close = || frames::going_away_to_server(rand::random());
    loop {
        let chunk = tokio::select! {
            c = payload.next() => c,
            _ = &mut stop => return,
            r = &mut closing, if !watched => {
                watched = true;
                if r.is_ok() && (frames.at_boundary() || frames.closed()) {
                    sealed = true;
                    if !frames.closed() {
                        match send(&mut upstream, &close(), &mut stop).await {
                            Some(Ok(())) => {}
                            Some(Err(e)) => return upstream_failed(&shared, &e),
                            None => return,
                        }
                    }
                    client_done_if_closed(&shared, &frames);
                }
                continue;
            }
        };
        match chunk {
            Some(Ok(bytes)) => {
                shared.last.set(Instant::now());
                shared
                    .stats
                    .bytes
                    .set(shared.stats.bytes.get() + bytes.len() as u64);
                if sealed {
                    // Read only for the client's close frame.
                    frames.pass(&bytes);
                    client_done_if_closed(&shared, &frames);
                    continue;
                }
                let out = if shared.closing.get() {
                    match close_at_boundary(&mut frames, &bytes, &close()) {
                        Some((n, out)) => {
                            sealed = true;
                            // What follows is dropped; read only for the client's close frame.
                            frames.pass(&bytes[n..]);
                            out
                        }
                        None => bytes,
                    }
                } else {
                    frames.pass(&bytes);
                    bytes
                };
                match send(&mut upstream, &out, &mut stop).await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return upstream_failed(&shared, &e),
                    None => return,
                }
                if sealed {
                    client_done_if_closed(&shared, &frames);
                }
                shared.last.set(Instant::now());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading from the WebSocket client failed");
                shared.fail("client_error");
                return;
            }
            None => {
                shared.client_done.set(true);
                shared.wake();
                tokio::select! {
                    _ = upstream.shutdown() => {}
                    _ = &mut stop => {}
                }
                return;
            }
        }
    }
}

/// Writes `bytes` to the upstream; `None` if the tunnel ended first.
async fn send(
    upstream: &mut WriteHalf<Io>,
    bytes: &[u8],
    stop: &mut oneshot::Receiver<()>,
) -> Option<std::io::Result<()>> {
    tokio::select! {
        w = async {
            upstream.write_all(bytes).await?;
            upstream.flush().await
        } => Some(w),
        _ = stop => None,
    }
}

fn upstream_failed(shared: &Shared, e: &std::io::Error) {
    tracing::debug!(error = %e, "writing to the WebSocket upstream failed");
    shared.fail("upstream_error");
}

/// While the tunnel closes itself: once the client's close frame has come, the client is done.
fn client_done_if_closed(shared: &Shared, frames: &Frames) {
    if frames.closed() && !shared.client_done.get() {
        shared.client_done.set(true);
        shared.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_6455_example() {
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn switch_needs_upgrade_and_matching_accept() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let mut h = http::HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        assert!(check_switch(&h, key).is_ok());
        let mut wrong = h.clone();
        wrong.insert("sec-websocket-accept", "AAAA".parse().unwrap());
        assert!(check_switch(&wrong, key).is_err());
        let mut other = h.clone();
        other.insert("upgrade", "h2c".parse().unwrap());
        assert!(check_switch(&other, key).is_err());
        let mut none = h;
        none.remove("sec-websocket-accept");
        assert!(check_switch(&none, key).is_err());
    }

    #[test]
    fn tokens_and_keys() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"upgrades", "upgrade"));
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"short"));
        assert!(!valid_key(b""));
    }
}
