//! The span exporter: one background thread that batches finished spans and POSTs them as
//! OTLP/HTTP protobuf.
//!
//! Requests hand their spans over with a `try_send` on a bounded channel and never wait: when
//! the queue is full (the collector is slow, stalled or down), by count ([`QUEUE_CAPACITY`]
//! requests' spans) or by size ([`QUEUE_BYTES`] of encoded spans), the spans are dropped and
//! counted in `rustygate_trace_spans_dropped_total{reason="queue_full"}`; a batch the collector refuses
//! or does not answer in time is counted with `reason="export_failed"`. Each batch goes to the
//! endpoint of the snapshot its requests were served with, so a reload that changes the endpoint
//! applies to the requests that start after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::Full;
use prometheus::IntCounterVec;

use super::otlp;

/// Requests' span sets (encoded) the queue holds before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 4096;
/// Bytes of encoded spans the queue holds before new ones are dropped. A span's string values
/// are cut to [`otlp::MAX_VALUE`], so a request's spans are a few KiB at most; this bounds the
/// queue's memory whatever the requests were like.
pub const QUEUE_BYTES: usize = 16 << 20;
/// Spans sent in one POST at most.
pub const MAX_BATCH: usize = 512;
/// How long a span waits for its batch to fill before it is sent anyway.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// How often the queue is looked at while a batch fills (an idle exporter waits on it).
const POLL: Duration = Duration::from_millis(10);

/// Where and how spans are exported (`[tracing]` in gateway.toml).
#[derive(Debug)]
pub struct ExportConfig {
    /// The full OTLP/HTTP traces URL, e.g. `http://collector:4318/v1/traces`.
    pub endpoint: http::Uri,
    /// Extra request headers (authentication), secrets already resolved.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest one export may take, connection included.
    pub timeout: Duration,
    /// Resource attributes (`service.name`, ...).
    pub resource: Vec<(String, String)>,
    /// How request bodies are encoded.
    pub compression: Compression,
}

/// The `Content-Encoding` of export requests (`[tracing] compression`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

impl Compression {
    /// The OTLP exporter's value names (`OTEL_EXPORTER_OTLP_COMPRESSION`): `gzip` or `none`.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name.trim() {
            "gzip" => Some(Compression::Gzip),
            "none" => Some(Compression::None),
            _ => None,
        }
    }
}

/// `body` gzipped. Level 1: the exporter shares the machine's cores with the request path, and
/// span batches (the same attribute keys and values again and again) shrink most at the first
/// level already.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// `rustygate_trace_spans_dropped_total{reason}`.
pub static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        prometheus::Opts::new(
            "rustygate_trace_spans_dropped_total",
            "Finished spans not delivered to the OTLP collector, by reason (queue_full, export_failed).",
        ),
        &["reason"],
    )
    .unwrap_or_else(|_| unreachable!("constant metric definition"))
});

enum Msg {
    /// One request's spans, encoded ([`otlp::push_span`]), and how many there are.
    Spans(Arc<ExportConfig>, Vec<u8>, usize),
    Flush(std::sync::mpsc::Sender<()>),
}

static QUEUE: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();

/// Bytes of spans in the queue: added by [`submit`], taken off when the exporter receives them.
static QUEUED_BYTES: Room = Room::new(QUEUE_BYTES);

/// A byte count shared by the requests that fill a queue and the thread that empties it.
struct Room {
    used: AtomicUsize,
    cap: usize,
}

impl Room {
    const fn new(cap: usize) -> Room {
        Room {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes `n` bytes when they fit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.cap)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken before.
    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

fn queue() -> Option<&'static SyncSender<Msg>> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
            std::thread::Builder::new()
                .name("rustygate-otlp".into())
                .spawn(move || run(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Queues one request's `count` spans, encoded; never blocks.
pub fn submit(export: &Arc<ExportConfig>, spans: Vec<u8>, count: usize) {
    let n = count as u64;
    let Some(q) = queue() else {
        DROPPED.with_label_values(&["queue_full"]).inc_by(n);
        return;
    };
    let bytes = spans.len();
    if !QUEUED_BYTES.take(bytes) {
        DROPPED.with_label_values(&["queue_full"]).inc_by(n);
        return;
    }
    match q.try_send(Msg::Spans(Arc::clone(export), spans, count)) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            QUEUED_BYTES.give_back(bytes);
            DROPPED.with_label_values(&["queue_full"]).inc_by(n);
        }
    }
}

/// Sends what is queued and waits for it, up to `limit` (graceful shutdown). Returns whether
/// the exporter finished in time.
pub fn flush(limit: Duration) -> bool {
    let Some(Some(q)) = QUEUE.get() else {
        return true;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let deadline = Instant::now() + limit;
    // The queue may be full: wait for room, but not past the limit.
    let mut msg = Msg::Flush(tx);
    loop {
        match q.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn run(rx: Receiver<Msg>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("cannot start the OTLP exporter's runtime; spans are dropped");
        return;
    };
    let client = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(b) => {
            let https = b.https_or_http().enable_http1().build();
            Some(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build::<_, Full<Bytes>>(https),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "no TLS roots for the OTLP exporter; spans are dropped");
            None
        }
    };
    let mut exporter = Exporter {
        client,
        pending: Vec::new(),
        pending_spans: 0,
        last_batch: 0,
        target: None,
        last_warning: None,
    };
    let mut due: Option<Instant> = None;
    loop {
        let msg = match due {
            // A batch is filling: the queue is looked at every `POLL` rather than waited on,
            // so that requests hand their spans over without waking this thread each time.
            Some(at) => match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if !left.is_zero() {
                        std::thread::sleep(left.min(POLL));
                        continue;
                    }
                    None
                }
                Err(TryRecvError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            },
        };
        match msg {
            Some(Msg::Spans(target, spans, count)) => {
                QUEUED_BYTES.give_back(spans.len());
                if exporter
                    .target
                    .as_ref()
                    .is_some_and(|t| !Arc::ptr_eq(t, &target))
                {
                    rt.block_on(exporter.send());
                }
                exporter.target = Some(target);
                exporter.add(&spans, count);
                if exporter.pending_spans >= MAX_BATCH {
                    rt.block_on(exporter.send());
                    due = None;
                } else if due.is_none() {
                    due = Some(Instant::now() + BATCH_DELAY);
                }
            }
            Some(Msg::Flush(done)) => {
                rt.block_on(exporter.send());
                due = None;
                let _ = done.send(());
            }
            None => {
                rt.block_on(exporter.send());
                due = None;
            }
        }
    }
}

struct Exporter {
    client: Option<Client>,
    /// Encoded spans waiting for the next POST, after [`otlp::BATCH_PREFIX`] bytes of room
    /// (empty when none wait), and how many.
    pending: Vec<u8>,
    pending_spans: usize,
    /// The size of the last batch sent: the next is given as much room up front, rather than
    /// growing (and being copied) to it.
    last_batch: usize,
    target: Option<Arc<ExportConfig>>,
    last_warning: Option<Instant>,
}

impl Exporter {
    fn add(&mut self, spans: &[u8], count: usize) {
        if self.pending.is_empty() {
            self.pending
                .reserve(otlp::BATCH_PREFIX + self.last_batch.max(spans.len()));
            self.pending.resize(otlp::BATCH_PREFIX, 0);
        }
        self.pending.extend_from_slice(spans);
        self.pending_spans += count;
    }

    /// POSTs what is pending to the current target.
    async fn send(&mut self) {
        if self.pending_spans == 0 {
            return;
        }
        let n = std::mem::take(&mut self.pending_spans) as u64;
        let batch = std::mem::take(&mut self.pending);
        self.last_batch = batch.len();
        let (Some(client), Some(target)) = (&self.client, &self.target) else {
            DROPPED.with_label_values(&["export_failed"]).inc_by(n);
            return;
        };
        let mut body = otlp::encode_batch(&target.resource, batch);
        let mut req = http::Request::post(target.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                http::header::USER_AGENT,
                concat!("rustygate/", env!("CARGO_PKG_VERSION")),
            );
        if target.compression == Compression::Gzip {
            match gzip(&body) {
                Ok(z) => {
                    body = Bytes::from(z);
                    req = req.header(http::header::CONTENT_ENCODING, "gzip");
                }
                // Writing into a Vec does not fail; were it to, the batch goes uncompressed.
                Err(e) => tracing::debug!(error = %e, "gzip of a span batch failed"),
            }
        }
        for (k, v) in &target.headers {
            req = req.header(k, v);
        }
        let Ok(req) = req.body(Full::new(body)) else {
            DROPPED.with_label_values(&["export_failed"]).inc_by(n);
            return;
        };
        let result = tokio::time::timeout(target.timeout, async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            // Read (and discard) the answer so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        })
        .await
        .unwrap_or_else(|_| Err("the collector did not answer in time".into()));
        if let Err(why) = result {
            DROPPED.with_label_values(&["export_failed"]).inc_by(n);
            // One warning a minute at most: a collector that is down should not flood the log.
            let now = Instant::now();
            if self
                .last_warning
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
            {
                self.last_warning = Some(now);
                tracing::warn!(
                    endpoint = %target.endpoint,
                    error = why.as_str(),
                    spans = n,
                    "spans not exported"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_room_holds_bytes_up_to_its_cap() {
        let room = Room::new(100);
        assert!(room.take(60));
        assert!(!room.take(41), "60 + 41 is over 100");
        assert!(room.take(40));
        assert!(!room.take(1));
        room.give_back(60);
        assert!(room.take(60));
        assert!(!room.take(usize::MAX), "no overflow");
    }

    #[test]
    fn gzip_round_trips_and_compression_names_are_the_otlp_ones() {
        use std::io::Read;
        let body = b"service.name rustygate http.request.method GET ".repeat(40);
        let z = gzip(&body).unwrap();
        assert!(z.len() < body.len() / 4, "{} of {}", z.len(), body.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, body);
        assert_eq!(Compression::from_name("gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::from_name(" none "), Some(Compression::None));
        assert_eq!(Compression::from_name("zstd"), None);
    }
}
