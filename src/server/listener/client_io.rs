//! [`ClientIo`], the accepted socket as the HTTP dispatcher sees it: the head and keep-alive
//! deadlines, the checks on heads and bodies, the answers to refused heads.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::answers::{
    BARE_LF_HEAD, CONTINUE, MALFORMED_BODY, MAX_PARTIAL_HEAD, MAX_REQUEST_LINE, REQUEST_TIMEOUT,
    Refusal, URI_TOO_LONG, client_request_id, gateway_answer, gateway_answer_as, new_request_id,
};
use super::conn_state::{ConnState, Expired};
use super::head::{
    BodyCheck, Left, PartialHead, Pipelined, bodyless_head_end, is_plain_bodyless, line_too_long,
    plain_if_not_websocket, request_body,
};
use super::socket::{SendLimited, SendStall};
use super::{ConnGuard, ConnInfo, Stream};

use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;
use crate::wire::chunked::Fed;

/// The accepted socket as the HTTP dispatcher sees it.
pub(crate) struct ClientIo {
    /// The socket; its writes fail past the send timeout (see [`SendStall`]).
    pub(super) io: SendLimited<Stream>,
    pub(super) state: Rc<ConnState>,
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer last registered a wake-up for, while it has not fired since.
    pub(super) timer_wakes: Option<Waker>,
    pub(super) timed_out: bool,
    /// Pipelined requests, read but not yet given to the dispatcher (see [`Pipelined`]).
    pub(super) held: Pipelined,
    /// The request's body as far as it has been read, when its head was found (see
    /// [`ClientIo::check_body`]).
    pub(super) body: Option<BodyCheck>,
    /// The start of a request head that did not come whole in its first read, kept (up to
    /// [`MAX_PARTIAL_HEAD`]) and withheld from the dispatcher until it is whole: then it is
    /// checked and rewritten as a head that came whole is ([`ClientIo::head_completed`]).
    pub(super) partial_head: PartialHead,
    /// A head put together across reads (with what came after it in its last read, up to its
    /// body's end), checked and rewritten: given to the dispatcher before anything else, as
    /// fast as it takes it, and not scanned again.
    pub(super) ready: bytes::BytesMut,
    /// Bytes of the request's response (not a `100 Continue`) have been written.
    pub(super) responded: bool,
    /// The gateway answered a malformed body itself: end of input for the dispatcher, and
    /// nothing it writes afterwards goes out.
    pub(super) answered: bool,
    /// The first bytes of the latest request head (its method), for counting a head refused
    /// before any route saw it ([`ClientIo::refused`]).
    pub(super) head_start: [u8; 8],
    /// Counts refused heads; the client's address for their log lines.
    pub(super) metrics: Arc<Metrics>,
    /// Refused heads get an access line (`--access-log`), with the version of the config
    /// current when they were refused: the one that would have routed them.
    pub(super) access_log: Option<Arc<SnapshotStore>>,
    pub(super) peer: IpAddr,
    pub(super) _guard: ConnGuard,
}

impl ClientIo {
    pub fn state(&self) -> &Rc<ConnState> {
        &self.state
    }

    pub fn info(&self) -> &Rc<ConnInfo> {
        &self.state.info
    }

    /// The stream (its writes still under the send timeout) and its place under the
    /// connection limits, for a protocol that times its requests itself (HTTP/2). Take
    /// [`ClientIo::info`] first to keep the connection facts.
    pub fn into_parts(self) -> (SendLimited<Stream>, ConnGuard) {
        (self.io, self._guard)
    }

    /// Whether the client opens with the HTTP/2 preface (h2c with prior knowledge). Waits for
    /// the first bytes up to the header timeout; `None` if none came (the client got 408 and
    /// the connection is to be closed). Over TLS, ALPN decides and this is `Some(false)`.
    pub async fn starts_with_h2_preface(&self) -> Option<bool> {
        let Stream::Plain(io) = &self.io.io else {
            return Some(false);
        };
        let preface = crate::server::h2::PREFACE;
        let deadline = Instant::now() + self.state.header_timeout;
        let mut buf = [0u8; 24];
        loop {
            let n = match tokio::time::timeout_at(deadline, io.peek(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => return None,
                Err(_) => return self.head_timed_out(io),
            };
            if buf[..n] != preface[..n] {
                return Some(false);
            }
            if n == preface.len() {
                return Some(true);
            }
            // A preface cut into pieces: wait for the rest (rare; bounded by the deadline).
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
                .await
                .is_err()
            {
                return self.head_timed_out(io);
            }
        }
    }

    /// Waits for input: registers the dispatcher's wake-up for `close` and held requests.
    pub(super) fn pending(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        let waker = self.state.reader.take();
        self.state.reader.set(match waker {
            Some(w) if w.will_wake(cx.waker()) => Some(w),
            _ => Some(cx.waker().clone()),
        });
        Poll::Pending
    }

    /// Takes what `buf` holds from `from` on back from the dispatcher, to be given once the
    /// request in progress (or whose head it has just got) has ended.
    pub(super) fn hold(&mut self, buf: &mut ReadBuf<'_>, from: usize) {
        let held = &mut self.held;
        if !held.gated {
            held.gated = true;
            held.until = self.state.ended.get() + 1;
        }
        held.bytes.extend_from_slice(&buf.filled()[from..]);
        buf.set_filled(from);
        self.state.holding.set(true);
    }

    /// Held bytes the dispatcher may have now (`Some(Ready)`), or none while the request
    /// before them is in progress (`Some(Pending)`); `None`: nothing held, read the socket.
    /// The next held request goes alone when it has no body: what follows waits for it to end.
    pub(super) fn held_or_gated(&mut self, buf: &mut ReadBuf<'_>) -> Option<Poll<io::Result<()>>> {
        let ended = self.state.ended.get();
        let held = &mut self.held;
        if held.gated && ended >= held.until {
            held.gated = false;
        }
        if held.free == 0 && !held.gated && !held.bytes.is_empty() {
            held.free = match bodyless_head_end(&held.bytes) {
                Some(end) => {
                    held.gated = true;
                    held.until = ended + 1;
                    end
                }
                None => held.bytes.len(),
            };
        }
        if held.free > 0 {
            let n = held.free.min(buf.remaining());
            buf.put_slice(&held.bytes[..n]);
            bytes::Buf::advance(&mut held.bytes, n);
            held.free -= n;
            self.state.holding.set(held.gated || !held.bytes.is_empty());
            return Some(Poll::Ready(Ok(())));
        }
        // Gated with bytes held: nothing more is read meanwhile (it would only be held).
        (held.gated && !held.bytes.is_empty()).then_some(Poll::Pending)
    }

    /// Follows the request body's bytes in `buf` from `from` on before the dispatcher gets
    /// them. Where the body ends before the bytes do, the rest (the next requests) is held until
    /// the body's request has ended: actix-http would parse the next head at once, and a
    /// `Connection: close` in it closed the connection before its response (and went out on the
    /// response before it). The body's start is known from its head: whole in the request's
    /// first read, or put together from reads up to [`MAX_PARTIAL_HEAD`]; past that the body is
    /// left to actix-http alone.
    ///
    /// A chunked body is checked as well. actix-http takes a body that breaks the chunked
    /// grammar for a client that went away: it drops the connection without a word, and the
    /// request is logged as 499. Here the client is told `400` (unless its response has begun),
    /// the dispatcher gets the bytes before the bad one and then end of input, and nothing it
    /// writes afterwards goes out.
    ///
    /// `buf` holds the body's head from `head_from` to `from` when the head came in this read
    /// (else the two are equal).
    pub(super) fn check_body(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        head_from: usize,
        from: usize,
    ) {
        let Some(check) = &mut self.body else {
            return;
        };
        let new = &buf.filled()[from..];
        let body_ends = match &mut check.left {
            Left::Bytes(left) => {
                let n = (*left).min(new.len() as u64);
                *left -= n;
                // `n` is at most `new.len()`.
                (*left == 0).then_some(n as usize)
            }
            Left::Chunks(chunks) => match chunks.feed(new) {
                Fed::More => None,
                Fed::Ended(at) => Some(at),
                Fed::Broken(at) => {
                    self.body = None;
                    // What is left of this read may be empty: end of input at once.
                    buf.set_filled(from + at);
                    self.state.body_broken.set(true);
                    let mut request_id = String::new();
                    if !self.responded {
                        // Like the 408: a plain socket sends it at once (nothing else is queued
                        // before a response begins); over TLS it leaves with the dispatcher's
                        // flush. It carries the request's id ([`Busy::share_request_id`]): the
                        // handler's when it has the request (its upstream may have it too),
                        // else the client's from the head in this read, else a new one, which
                        // the handler then takes.
                        request_id = self
                            .state
                            .body_request_id
                            .take()
                            .and_then(|v| v.to_str().ok().map(str::to_owned))
                            .or_else(|| client_request_id(&buf.filled()[head_from..from]))
                            .unwrap_or_else(new_request_id);
                        let answer = gateway_answer_as(
                            MALFORMED_BODY.status,
                            MALFORMED_BODY.message,
                            &request_id,
                        );
                        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
                        self.state.body_refusal_id.set(Some(request_id.clone()));
                    }
                    self.answered = true;
                    tracing::debug!(request_id, "malformed chunked request body; closing");
                    return;
                }
            },
        };
        let Some(at) = body_ends else {
            return;
        };
        let owner = check.owner;
        self.body = None;
        if from + at < buf.filled().len() && self.state.ended.get() < owner {
            self.hold_next(buf, from + at, owner);
        }
    }

    /// Takes what follows a request's body in `buf` (from `from` on) back from the dispatcher,
    /// to be given once `until` requests have ended. The bytes may be held ones being given:
    /// they go back in front of the rest.
    fn hold_next(&mut self, buf: &mut ReadBuf<'_>, from: usize, until: u64) {
        self.hold_in_front(&buf.filled()[from..], until);
        buf.set_filled(from);
    }

    /// Holds `rest` in front of what is held already, until `until` requests have ended.
    fn hold_in_front(&mut self, rest: &[u8], until: u64) {
        let held = &mut self.held;
        let mut bytes = bytes::BytesMut::with_capacity(rest.len() + held.bytes.len());
        bytes.extend_from_slice(rest);
        bytes.extend_from_slice(&held.bytes);
        held.bytes = bytes;
        held.free = 0;
        held.gated = true;
        held.until = until;
        self.state.holding.set(true);
    }

    /// The next bytes of a head cut across reads, withheld from the dispatcher like those
    /// before them. Once the head is whole it is treated as one that came whole in one read:
    /// an upgrade other than WebSocket is rewritten into a plain request
    /// ([`plain_if_not_websocket`]), the requests behind a head without a body are held until
    /// it has ended, and its body is followed (and checked, when chunked). The head and what is
    /// left of the read go to [`ClientIo::ready`]; past [`MAX_PARTIAL_HEAD`] without an end,
    /// what came is given as it is (actix-http answers it). `Err`: the head is refused with
    /// that answer.
    pub(super) fn head_completed(
        &mut self,
        cx: &mut Context<'_>,
        new: &[u8],
    ) -> Result<(), Refusal> {
        let Some(head) = self.partial_head.extend(new) else {
            if line_too_long(&self.partial_head.bytes) {
                return Err(URI_TOO_LONG);
            }
            if self.partial_head.bytes.len() > MAX_PARTIAL_HEAD {
                let bytes = std::mem::take(&mut self.partial_head.bytes);
                self.partial_head.clear();
                self.ready.extend_from_slice(&bytes);
            }
            return Ok(());
        };
        if head.bare_lf {
            return Err(BARE_LF_HEAD);
        }
        if head.end > MAX_REQUEST_LINE && line_too_long(&self.partial_head.bytes) {
            return Err(URI_TOO_LONG);
        }
        let mut bytes = std::mem::take(&mut self.partial_head.bytes);
        self.partial_head.clear();
        let end = head.end;
        if head.upgrade {
            plain_if_not_websocket(&mut bytes[..end]);
        }
        let whole = &bytes[..end];
        let until = self.state.ended.get() + 1;
        if is_plain_bodyless(whole) {
            if end < bytes.len() {
                self.hold_in_front(&bytes[end..], until);
                bytes.truncate(end);
            }
        } else if let Some(left) = request_body(head, whole) {
            self.state.body_checked.set(matches!(left, Left::Chunks(_)));
            self.body = Some(BodyCheck { left, owner: until });
            // The body's bytes in this read, checked as if the dispatcher read them.
            let len = bytes.len();
            let mut given = ReadBuf::new(&mut bytes);
            given.set_filled(len);
            self.check_body(cx, &mut given, 0, end);
            let kept = given.filled().len();
            bytes.truncate(kept);
        }
        self.ready.extend_from_slice(&bytes);
        Ok(())
    }

    /// Gives what [`ClientIo::ready`] holds, as much as `buf` takes.
    pub(super) fn give_ready(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ready.len().min(buf.remaining());
        buf.put_slice(&self.ready[..n]);
        bytes::Buf::advance(&mut self.ready, n);
    }

    /// Refuses a request head ([`BARE_LF_HEAD`], [`URI_TOO_LONG`]) before the parser has a
    /// whole head, with the gateway's answer ([`gateway_answer`]): the dispatcher gets none of
    /// this read and then end of input; nothing it writes goes out.
    pub(super) fn refuse_head(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        before: usize,
        refusal: Refusal,
    ) {
        let (answer, id) = gateway_answer(refusal.status, refusal.message);
        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
        self.answered = true;
        let head = if self.partial_head.is_empty() {
            &buf.filled()[before..]
        } else {
            &self.partial_head.bytes[..]
        };
        self.refused(refusal.status, refusal.message, head, &answer, &id);
        self.partial_head.clear();
        buf.set_filled(before);
    }

    /// A request head refused before any route saw it: by this reader ([`ClientIo::refuse_head`],
    /// the header timeout) or by actix-http's parser (a malformed or oversized head, which it
    /// answers itself: seen in [`ClientIo::wrote`]). Like any request: counted and timed under
    /// `route="<none>"`, and one access line with the answer's `request_id`, the method its
    /// first bytes name, the path when `head` (what is known of the head) has its request line,
    /// and why in `error`. Also logged at debug with the reason in words; actix-http's own line
    /// for its refusals (an `ERROR` without the client, one per bad request) is filtered out
    /// ([`crate::telemetry`]). `answer` is what was written.
    pub(super) fn refused(
        &self,
        status: u16,
        reason: &str,
        head: &[u8],
        answer: &str,
        request_id: &str,
    ) {
        let token = self
            .head_start
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default();
        // From the head's first bytes (its deadline was set then), or, for a connection that
        // sent none, from when it was served.
        let began = self
            .state
            .head_deadline
            .get()
            .or(self.state.idle_deadline.get())
            .map(|d| d - self.state.header_timeout);
        let elapsed = began.map_or(Duration::ZERO, |b| {
            Instant::now().saturating_duration_since(b)
        });
        let method = crate::telemetry::recorder::refused(
            &self.metrics,
            token,
            status,
            elapsed.as_secs_f64(),
        );
        tracing::debug!(
            client_ip = %self.peer,
            status,
            reason,
            request_id,
            "request head refused; closing"
        );
        let Some(store) = &self.access_log else {
            return;
        };
        let snapshot = store.load();
        let path = request_target(head);
        crate::telemetry::access::AccessLine {
            request_id,
            client_ip: self.peer,
            method,
            protocol: "HTTP/1.1",
            host: "",
            path: &path,
            route: "",
            upstream: "",
            upstream_target: "",
            scheme: if self.state.info.tls.is_some() {
                "https"
            } else {
                "http"
            },
            status,
            duration: elapsed,
            bytes_in: 0,
            bytes_out: answer
                .split_once("\r\n\r\n")
                .map_or(0, |(_, b)| b.len() as u64),
            completed: true,
            error: match status {
                408 => "header_timeout",
                414 => "uri_too_long",
                431 => "head_too_large",
                _ => "malformed_head",
            },
            grpc_status: "",
            config_version: &snapshot.version.id,
            trace_id: "",
            span_id: "",
        }
        .log();
    }

    /// Notes what the dispatcher writes: whether the request's response has begun; and an
    /// answer of its own to a head it refused (no request in progress, a head begun, and the
    /// shape of actix-http's answer: `400` or `431` with no body, its length first, none of
    /// the gateway's headers), whose status is returned: [`ClientIo::answer_refused`]
    /// answers in its place. (The HTTPS redirect's own `400` for a bad `Host` is no refused
    /// head: it was counted as one too when any error status without `x-request-id` was.)
    pub(super) fn wrote(&mut self, bytes: &[u8]) -> Option<u16> {
        if self.state.busy.get() > 0 {
            if !self.responded && bytes != CONTINUE {
                self.responded = true;
            }
        } else if self.state.head_deadline.get().is_some()
            && let Some(status @ (400 | 431)) = status_of(bytes)
            && memchr::memchr(b'\n', bytes)
                .is_some_and(|nl| bytes[nl + 1..].starts_with(b"content-length: 0\r\n"))
            && memchr::memmem::find(bytes, b"x-request-id:").is_none()
        {
            // Once ([`ClientIo::answer_refused`] clears the deadline): the dispatcher closes
            // the connection after it.
            return Some(status);
        }
        None
    }

    /// Answers a head actix-http's parser refused (a request target with bytes RFC 3986 does
    /// not allow, such as `<`, `>`, `` ` ``, `"` in the query, control bytes; a malformed field;
    /// a head over its 128 KiB) the way the handler answers the requests it refuses: a JSON
    /// error and an `x-request-id`, instead of actix-http's bare `400` (or `431`) without
    /// either. It is written in place of actix-http's answer, best effort like the listener's
    /// other answers (nothing else is queued on a connection whose head was refused); the
    /// connection then ends. Only refused heads pay for this: the parser's reason is not known
    /// here (keeping each head's bytes for it would cost every request), so the message says
    /// what kind of refusal it is.
    pub(super) fn answer_refused(&mut self, cx: &mut Context<'_>, status: u16) {
        let message = match status {
            431 => "the request head is too large",
            _ => "the request head is malformed",
        };
        let (answer, id) = gateway_answer(status, message);
        let _ = Pin::new(&mut self.io).poll_write(cx, answer.as_bytes());
        self.answered = true;
        // The parser keeps the head: only its first bytes are known here.
        self.refused(
            status,
            "malformed or oversized request head",
            &[],
            &answer,
            &id,
        );
        self.state.head_deadline.set(None);
    }

    /// Bytes were read and all withheld (a head still incomplete): nothing for the
    /// dispatcher yet. The socket had bytes, so no wake-up is registered with it: the task is
    /// woken to read it again.
    pub(super) fn withheld(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn head_timed_out(&self, io: &TcpStream) -> Option<bool> {
        self.state.timeouts.inc();
        let (answer, _) = gateway_answer(REQUEST_TIMEOUT.status, REQUEST_TIMEOUT.message);
        let _ = io.try_write(answer.as_bytes());
        None
    }

    /// Which deadline has passed, if one has; keeps the timer's wake-up registered otherwise.
    /// The clock is read only when the timer fires (see the module doc), and the timer is
    /// polled only when it has fired or another task reads ([`crate::util::poll_timer`]).
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        let timer = match &mut self.timer {
            Some(t) => t,
            None => {
                let (at, _) = self.state.deadline()?;
                let at = at.min(Instant::now() + self.state.shortest_wait());
                self.timer_wakes = None;
                self.timer.insert(Box::pin(tokio::time::sleep_until(at)))
            }
        };
        let mut fired = crate::util::poll_timer(timer.as_mut(), &mut self.timer_wakes, cx);
        while fired.is_ready() {
            let now = Instant::now();
            let latest = now + self.state.shortest_wait();
            let next = match self.state.deadline() {
                Some((at, why)) if at <= now => return Some(why),
                Some((at, _)) => at.min(latest),
                None => latest,
            };
            timer.as_mut().reset(next);
            // Moved: polled at once, for this task, in case the new deadline has passed too.
            fired = timer.as_mut().poll(cx);
        }
        None
    }
}

/// The longest request target an access line of a refused head shows.
const MAX_LOGGED_TARGET: usize = 4096;

/// The request target of a head's request line (`head` may be cut anywhere), at most
/// [`MAX_LOGGED_TARGET`] bytes of it; empty when there is none.
fn request_target(head: &[u8]) -> std::borrow::Cow<'_, str> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    String::from_utf8_lossy(&target[..target.len().min(MAX_LOGGED_TARGET)])
}

/// The status of a response whose head starts `bytes`, if they are one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let code = bytes.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Wraps the stream (plain, or TLS after its handshake) for the HTTP/1 dispatcher.
pub(crate) fn client_io(
    io: Stream,
    (guard, peer): (ConnGuard, Option<SocketAddr>),
    (header_timeout, send_timeout): (Duration, Duration),
    keep_alive: Option<Duration>,
    info: ConnInfo,
    (metrics, access_log): (&Arc<Metrics>, Option<Arc<SnapshotStore>>),
) -> ClientIo {
    ClientIo {
        io: SendLimited {
            io,
            send: SendStall {
                timeout: send_timeout,
                waiting: false,
                timer: None,
                timeouts: metrics.client_timeouts.with_label_values(&["send"]),
            },
        },
        state: Rc::new(ConnState::new(
            header_timeout,
            keep_alive,
            metrics.client_timeouts.with_label_values(&["header"]),
            Rc::new(info),
        )),
        timer: None,
        timer_wakes: None,
        timed_out: false,
        body: None,
        partial_head: PartialHead::default(),
        ready: bytes::BytesMut::new(),
        responded: false,
        answered: false,
        head_start: [0; 8],
        metrics: Arc::clone(metrics),
        access_log,
        peer: peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip()),
        held: Pipelined::default(),
        _guard: guard,
    }
}
