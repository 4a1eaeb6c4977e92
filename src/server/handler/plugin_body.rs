//! Bodies that WASM plugins read (`proxy_on_request_body`, `proxy_on_response_body`; the
//! chunk-by-chunk rules are in [`crate::plugins::BodyFilter`]). Only exchanges with such a
//! plugin come here; every other body streams as in the handler.
//!
//! ```text
//! request:  client chunks ─► filter ─► (nothing goes upstream until a plugin lets bytes go)
//!           ├─ the body ended first: sent whole, with its exact Content-Length (and replayable)
//!           └─ bytes let go early:  streamed (chunked), the rest filtered by a task as it comes
//! response: upstream chunks ─► filter ─► (no head goes to the client until bytes are let go)
//!           ├─ the body ended first: sent whole, with its exact Content-Length
//!           └─ bytes let go early:  the head, then the body streamed (chunked)
//! ```
//!
//! Until the first bytes go on, every failure still gets a proper answer: a plugin's local
//! response, 500 (`fail_closed`), 413 (request body over the route's limit), 503 (what the
//! plugins hold of request bodies would take the worker past `max_buffered_bodies`), 502
//! (response body over the route's limit, or the upstream broke off). After that, a failure
//! can only end the stream: the upstream request is aborted (and the client answered as
//! above, if its response has not started), or the client's connection is aborted
//! mid-response.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::HttpResponse;
use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;
use futures_util::future::poll_fn;
use tokio::sync::mpsc;

use super::errors::{body_timeout, client_body_failed};
use super::exchange::Exchange;
use super::forward::{Buffered, Outgoing, TOO_MANY_BODIES};
use super::{WorkerState, respond};
use crate::plugins::{BodyFilter, BodyStop};
use crate::proxy::body::{
    BodyError, BodyStats, CHANNEL_DEPTH, Ended, OnFinish, ProxyBody, UpstreamBody,
    UpstreamBodyError, next_chunk,
};
use crate::snapshot::{Route, Snapshot};

/// Why a request body already on its way upstream was stopped: the answer the handler gives
/// when the upstream request fails for it.
pub(super) type Stop = Rc<RefCell<Option<Halt>>>;

/// Why a request body read through the plugins cannot go on.
#[derive(Debug)]
pub(super) enum Halt {
    /// A plugin stopped it.
    Plugin(BodyStop),
    /// What the plugins hold would take the worker past `max_buffered_bodies`.
    Busy,
}

/// The client's answer for a request body that was stopped on its way.
pub(super) fn halted(ex: &Exchange, halt: &Halt) -> HttpResponse {
    match halt {
        Halt::Plugin(s) => stopped(ex, s, true),
        Halt::Busy => ex.error(503, TOO_MANY_BODIES),
    }
}

/// The client's answer for a body a plugin stopped.
pub(super) fn stopped(ex: &Exchange, stop: &BodyStop, request: bool) -> HttpResponse {
    match stop {
        BodyStop::Respond(r) => respond(ex, r),
        BodyStop::Failed => ex.error(500, "a plugin of this route failed"),
        BodyStop::TooLarge if request => {
            ex.error(413, "request body is larger than this route accepts")
        }
        BodyStop::TooLarge => ex.error(
            502,
            "the upstream's response body is larger than this route's plugins may hold",
        ),
    }
}

/// What reading one more piece of the client's body gave.
enum Pulled {
    Client(BodyError),
    Stop(Halt),
}

/// The client's body as read so far, and how it is read.
struct Reader {
    payload: actix_web::dev::Payload,
    declared: Option<u64>,
    limit: u64,
    idle: std::time::Duration,
    stats: Rc<BodyStats>,
    /// What the plugins hold, counted against the worker's `max_buffered_bodies` (`cap`) as
    /// it grows; given back as they let it go, and whatever way the body ends (on drop).
    held: Buffered,
    cap: u64,
}

impl Reader {
    /// One piece of the body through the plugins: what goes on now, and whether the body
    /// ended (with a declared length, with its last byte; otherwise when the client's stream
    /// does).
    async fn pull(&mut self, filter: &mut BodyFilter) -> Result<(Bytes, bool), Pulled> {
        self.stats.unfinished.set(true);
        let (data, end) = match next_chunk(&mut self.payload, self.idle, &self.stats).await {
            None => (Bytes::new(), true),
            Some(Err(e)) => return Err(Pulled::Client(e)),
            Some(Ok(b)) => {
                let total = self.stats.bytes.get() + b.len() as u64;
                self.stats.bytes.set(total);
                if total > self.limit {
                    self.stats.too_large.set(true);
                    return Err(Pulled::Client(BodyError::TooLarge { limit: self.limit }));
                }
                (b, self.declared == Some(total))
            }
        };
        if end {
            self.stats.unfinished.set(false);
        }
        let out = filter
            .chunk(data, end)
            .map_err(|s| Pulled::Stop(Halt::Plugin(s)))?;
        if !self.held.resize(filter.held(), self.cap) {
            return Err(Pulled::Stop(Halt::Busy));
        }
        Ok((out, end))
    }
}

/// The request body through `filter`: read until a plugin lets bytes go or the body ends,
/// bounded by the route's timeout, before anything goes upstream. `Err` is the answer when
/// the body is refused.
pub(super) async fn request(
    ex: &mut Exchange,
    snap: &Snapshot,
    payload: actix_web::dev::Payload,
    state: &WorkerState,
    route: &Route,
    declared: Option<u64>,
    mut filter: BodyFilter,
) -> Result<Outgoing, HttpResponse> {
    let stats = Rc::new(BodyStats::default());
    ex.body = Some(Rc::clone(&stats));
    let stop: Stop = Rc::default();
    ex.plugin_stop = Some(Rc::clone(&stop));
    let mut reader = Reader {
        payload,
        declared,
        limit: route.max_body_size,
        idle: snap.limits.body_idle_timeout,
        stats,
        held: Buffered::empty(&state.buffered),
        cap: snap.limits.max_buffered_bodies,
    };
    let first = tokio::time::timeout(route.timeout, async {
        loop {
            let (out, end) = reader.pull(&mut filter).await?;
            if end || !out.is_empty() {
                return Ok((out, end));
            }
        }
    })
    .await;
    let (first, end) = match first {
        Ok(Ok(f)) => f,
        Ok(Err(Pulled::Stop(h))) => return Err(halted(ex, &h)),
        Ok(Err(Pulled::Client(BodyError::TooLarge { .. }))) => {
            return Err(ex.error(413, "request body is larger than this route accepts"));
        }
        Ok(Err(Pulled::Client(BodyError::Client(_) | BodyError::Stopped))) => {
            return Err(client_body_failed(ex));
        }
        Ok(Err(Pulled::Client(BodyError::Idle(_)))) | Err(_) => {
            return Err(body_timeout(ex, state));
        }
    };
    if end {
        // Whole, as the plugins left it: sent with its exact length, and again on a retry.
        // Held until the exchange ends, so it stays counted, as a body read for retries is.
        let mut held = reader.held;
        if !held.resize(first.len() as u64, reader.cap) {
            return Err(ex.error(503, TOO_MANY_BODIES));
        }
        ex.buffered = Some(held);
        return Ok(Outgoing::Replayable(first));
    }
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    actix_web::rt::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            match reader.pull(&mut filter).await {
                Ok((out, end)) => {
                    if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                    if end {
                        return;
                    }
                }
                Err(Pulled::Client(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(Pulled::Stop(s)) => {
                    *stop.borrow_mut() = Some(s);
                    let _ = tx.send(Err(BodyError::Stopped)).await;
                    return;
                }
            }
        }
    });
    Ok(Outgoing::Once(Some(ProxyBody::Channel { rx, len: None })))
}

/// A response body that came whole with its head ([`UpstreamIncoming::take_whole`]), through
/// the plugins that read it in one last call: what [`Response::send`] does for a body read to
/// its end, without a stream to poll.
///
/// [`UpstreamIncoming::take_whole`]: crate::proxy::body::UpstreamIncoming::take_whole
pub(super) fn whole(
    ex: &Exchange,
    mut out: actix_web::HttpResponseBuilder,
    status: u16,
    data: Bytes,
    mut filter: BodyFilter,
) -> HttpResponse {
    match filter.chunk(data, true) {
        Ok(whole) => {
            ex.emit(status, whole.len() as u64, Ok(()));
            out.body(whole)
        }
        Err(s) => stopped(ex, &s, false),
    }
}

/// A response whose body a plugin reads, its head ready but not yet sent.
pub(super) struct Response {
    pub ex: Box<Exchange>,
    pub out: actix_web::HttpResponseBuilder,
    pub status: u16,
    pub body: UpstreamBody,
    /// The upstream's `Content-Length`: its last byte ends the body for the plugins (as a
    /// declared request length does), so a body read in one piece goes out with its length.
    pub declared: Option<u64>,
    pub filter: BodyFilter,
}

impl Response {
    /// Reads the upstream's body through the plugins until they let bytes go (then the head
    /// goes out and the rest streams) or it ends (then it goes out whole, with its length).
    pub(super) async fn send(self) -> HttpResponse {
        let Response {
            ex,
            mut out,
            status,
            mut body,
            declared,
            mut filter,
        } = self;
        let mut received = 0u64;
        let first = loop {
            match poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await {
                Some(Ok(data)) => {
                    received += data.len() as u64;
                    let end = declared == Some(received);
                    match filter.chunk(data, end) {
                        Ok(whole) if end => {
                            // Read to its end, so that the upstream's connection can be reused.
                            let _ = poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await;
                            ex.emit(status, whole.len() as u64, Ok(()));
                            return out.body(whole);
                        }
                        Ok(b) if b.is_empty() => {}
                        Ok(b) => break b,
                        Err(s) => return stopped(&ex, &s, false),
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        request_id = ex.request_id.to_str().unwrap_or(""),
                        error = %e,
                        "upstream response body failed while a plugin held it"
                    );
                    return ex.error(502, "the upstream's response broke off");
                }
                // The end, with nothing more: the plugins' last call is an empty one.
                None => return whole(&ex, out, status, Bytes::new(), filter),
            }
        };
        let on_finish: OnFinish = Box::new(move |bytes, end| ex.emit(status, bytes, end));
        out.body(Filtered {
            first: Some(first),
            inner: body,
            filter,
            declared,
            received,
            sent: 0,
            on_finish: Some(on_finish),
            done: false,
        })
    }
}

/// Why a response body whose head was sent broke off; the client's connection is aborted.
#[derive(Debug, thiserror::Error)]
pub(super) enum FilteredError {
    #[error(transparent)]
    Upstream(#[from] UpstreamBodyError),
    #[error("a plugin stopped the response body after its head was sent ({0:?})")]
    Plugin(BodyStop),
}

/// The rest of a response body, through the plugins, after its head was sent.
struct Filtered {
    first: Option<Bytes>,
    inner: UpstreamBody,
    filter: BodyFilter,
    declared: Option<u64>,
    received: u64,
    sent: u64,
    on_finish: Option<OnFinish>,
    done: bool,
}

impl Filtered {
    fn finish(&mut self, end: Ended) {
        if let Some(f) = self.on_finish.take() {
            f(self.sent, end);
        }
    }

    fn give(&mut self, b: Bytes) -> Poll<Option<Result<Bytes, FilteredError>>> {
        self.sent += b.len() as u64;
        Poll::Ready(Some(Ok(b)))
    }

    fn stop(&mut self, s: BodyStop) -> Poll<Option<Result<Bytes, FilteredError>>> {
        self.done = true;
        self.finish(Err("plugin_failed"));
        Poll::Ready(Some(Err(FilteredError::Plugin(s))))
    }
}

impl MessageBody for Filtered {
    type Error = FilteredError;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, FilteredError>>> {
        let this = self.get_mut();
        if let Some(b) = this.first.take() {
            return this.give(b);
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    this.received += data.len() as u64;
                    // With a declared length, the last byte is the plugins' last call; the
                    // upstream body's end that follows finds the filter ended.
                    let end = this.declared == Some(this.received);
                    match this.filter.chunk(data, end) {
                        Ok(b) if b.is_empty() => {}
                        Ok(b) => return this.give(b),
                        Err(s) => return this.stop(s),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish(Err("upstream_error"));
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    match this.filter.chunk(Bytes::new(), true) {
                        Ok(b) => {
                            this.sent += b.len() as u64;
                            this.finish(Ok(()));
                            if !b.is_empty() {
                                return Poll::Ready(Some(Ok(b)));
                            }
                        }
                        Err(s) => return this.stop(s),
                    }
                }
            }
        }
    }
}

impl Drop for Filtered {
    fn drop(&mut self) {
        // The client went away before the end (or the shutdown
        // grace ended).
        self.finish(Err(crate::server::drain::gone_reason()));
    }
}
