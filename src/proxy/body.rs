//! Bodies, streamed both ways and never buffered whole.
//!
//! Actix's request payload is tied to its worker thread, while the hyper client wants a `Send`
//! body; a small bounded channel bridges the two (backpressure: the client is read only as fast
//! as the upstream takes it). The request size limit is counted while streaming, so a chunked
//! body that grows past it aborts the upstream request.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Chunks in flight between the client reader and the upstream writer.
const CHANNEL_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the client's body failed: {0}")]
    Client(String),
}

/// The request body sent upstream.
pub enum ProxyBody {
    Empty,
    /// A body read whole beforehand (small enough to replay on a retry).
    Full(Option<Bytes>),
    Channel {
        rx: mpsc::Receiver<Result<Bytes, BodyError>>,
        len: Option<u64>,
    },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Channel { rx, .. } => {
                Poll::Ready(ready!(rx.poll_recv(cx)).map(|r| r.map(Frame::data)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty | ProxyBody::Channel { len: Some(0), .. } => true,
            ProxyBody::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            ProxyBody::Channel { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Channel { len: Some(n), .. } => SizeHint::with_exact(*n),
            ProxyBody::Channel { len: None, .. } => SizeHint::default(),
        }
    }
}

/// What the request-body reader saw, read by the handler after the fact.
#[derive(Default)]
pub struct BodyStats {
    pub bytes: Cell<u64>,
    pub too_large: Cell<bool>,
}

/// Starts reading the client's body on this worker and returns the upstream side of it.
/// `len` is the declared `Content-Length`, if any.
pub fn stream_request_body(
    mut payload: actix_web::dev::Payload,
    len: Option<u64>,
    limit: u64,
) -> (ProxyBody, Rc<BodyStats>) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let stats = Rc::new(BodyStats::default());
    let seen = Rc::clone(&stats);
    actix_web::rt::spawn(async move {
        while let Some(chunk) = payload.next().await {
            let msg = match chunk {
                Ok(bytes) => {
                    let total = seen.bytes.get() + bytes.len() as u64;
                    seen.bytes.set(total);
                    if total > limit {
                        seen.too_large.set(true);
                        Err(BodyError::TooLarge { limit })
                    } else {
                        Ok(bytes)
                    }
                }
                Err(e) => Err(BodyError::Client(e.to_string())),
            };
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    (ProxyBody::Channel { rx, len }, stats)
}

/// Reads the client's whole body (at most `limit` bytes), so that it can be sent again on a
/// retry.
pub async fn read_request_body(
    payload: &mut actix_web::dev::Payload,
    limit: u64,
    stats: &BodyStats,
) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(limit).unwrap_or(0).min(1 << 20));
    while let Some(chunk) = payload.next().await {
        let bytes = chunk.map_err(|e| BodyError::Client(e.to_string()))?;
        let total = stats.bytes.get() + bytes.len() as u64;
        stats.bytes.set(total);
        if total > limit {
            stats.too_large.set(true);
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&bytes);
    }
    Ok(buf.freeze())
}

/// Called once when a response body ends: bytes sent, and whether it ended cleanly.
pub type OnFinish = Box<dyn FnOnce(u64, bool)>;

/// The upstream's response body, handed to actix as it arrives.
pub struct UpstreamBody {
    inner: hyper::body::Incoming,
    size: BodySize,
    sent: u64,
    on_finish: Option<OnFinish>,
}

impl UpstreamBody {
    pub fn new(inner: hyper::body::Incoming, size: BodySize, on_finish: Option<OnFinish>) -> Self {
        Self {
            inner,
            size,
            sent: 0,
            on_finish,
        }
    }

    fn finish(&mut self, clean: bool) {
        if let Some(f) = self.on_finish.take() {
            f(self.sent, clean);
        }
    }
}

impl MessageBody for UpstreamBody {
    type Error = hyper::Error;

    fn size(&self) -> BodySize {
        self.size
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, hyper::Error>>> {
        let this = self.get_mut();
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers (HTTP/2 upstreams, e.g. gRPC's `grpc-status`) cannot be passed
                    // on: actix writes the client's response as HTTP/1.1 without trailers.
                    match frame.into_data() {
                        Ok(data) => {
                            this.sent += data.len() as u64;
                            return Poll::Ready(Some(Ok(data)));
                        }
                        Err(frame) => {
                            if let Some(t) = frame.trailers_ref() {
                                tracing::debug!(
                                    trailers = t.len(),
                                    "upstream response trailers dropped: the client side is HTTP/1.1"
                                );
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.finish(true);
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away before the end.
        self.finish(false);
    }
}
