//! What a connection shares with its requests: whether one is being handled ([`Busy`]) and
//! the deadline of the next head.

use std::cell::Cell;
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use super::{ConnInfo, now};

/// What the connection and its requests share: whether a request is being handled, and the
/// deadline of the next head. Lives on the worker thread.
pub(crate) struct ConnState {
    pub(super) header_timeout: Duration,
    /// Idle time allowed between requests; `None`: keep-alive is off.
    keep_alive: Option<Duration>,
    /// `rustygate_client_timeouts_total{phase="header"}`
    pub(super) timeouts: prometheus::IntCounter,
    /// Requests of this connection between head parsed and response finished.
    pub(super) busy: Cell<u32>,
    /// When the head being received must be complete (set on its first bytes).
    pub(super) head_deadline: Cell<Option<Instant>>,
    /// When the connection, idle since its last request ended, is closed (set at that end,
    /// cleared by the next request's first bytes). Before the first request: when its head
    /// must have begun, `header_timeout` after the connection was served (`first` is set).
    pub(super) idle_deadline: Cell<Option<Instant>>,
    /// No request has begun yet: the idle deadline is the first head's, answered as one.
    pub(super) first: Cell<bool>,
    /// End the connection once no request is in progress ([`ConnState::close`]).
    pub(super) closing: Cell<bool>,
    /// The dispatcher waiting for input, woken by `close`.
    pub(super) reader: Cell<Option<Waker>>,
    /// Requests of this connection that have ended: when held pipelined bytes may go.
    pub(super) ended: Cell<u64>,
    /// The request in progress has no body: whatever the client sends meanwhile is its next
    /// requests ([`ClientIo`] holds them).
    ///
    /// [`ClientIo`]: super::ClientIo
    pub(super) bodyless: Cell<bool>,
    /// [`ClientIo`] holds bytes of pipelined requests: wake it when a request ends.
    ///
    /// [`ClientIo`]: super::ClientIo
    pub(super) holding: Cell<bool>,
    /// The request's chunked body broke the chunked grammar: [`ClientIo`] has answered `400`
    /// (when no response had begun) and ends the connection.
    ///
    /// [`ClientIo`]: super::ClientIo
    pub(super) body_broken: Cell<bool>,
    /// The request's client went away before its body's end: nothing more is written to the
    /// connection (no client reads it), and it ends ([`Busy::drop_response`]).
    pub(super) silent: Cell<bool>,
    /// A write to the client failed at the send timeout: the response it cut ended for that,
    /// not because the client left (HTTP/1.1; [`Busy::send_timed_out`]).
    pub(super) send_timed_out: Cell<bool>,
    /// The request id of that `400`, taken by the request if the handler did not have it yet.
    pub(super) body_refusal_id: Cell<Option<String>>,
    /// The request being read has a chunked body that [`ClientIo`] checks.
    ///
    /// [`ClientIo`]: super::ClientIo
    pub(super) body_checked: Cell<bool>,
    /// The id the handler gave that request (the one its upstream gets): that `400` carries it.
    pub(super) body_request_id: Cell<Option<actix_web::http::header::HeaderValue>>,
    /// The connection's facts, here too so that a request finds both in one lookup.
    pub(super) info: Rc<ConnInfo>,
}

impl ConnState {
    pub(super) fn new(
        header_timeout: Duration,
        keep_alive: Option<Duration>,
        timeouts: prometheus::IntCounter,
        info: Rc<ConnInfo>,
    ) -> Self {
        Self {
            header_timeout,
            keep_alive,
            timeouts,
            busy: Cell::new(0),
            head_deadline: Cell::new(None),
            // A connection that never sends a byte (after its TLS handshake, or with h2c off)
            // gets `header_timeout` too, not actix-http's first-request timeout.
            idle_deadline: Cell::new(Some(now() + header_timeout)),
            first: Cell::new(true),
            closing: Cell::new(false),
            reader: Cell::new(None),
            ended: Cell::new(0),
            bodyless: Cell::new(false),
            holding: Cell::new(false),
            body_broken: Cell::new(false),
            silent: Cell::new(false),
            send_timed_out: Cell::new(false),
            body_refusal_id: Cell::new(None),
            body_checked: Cell::new(false),
            body_request_id: Cell::new(None),
            info,
        }
    }

    /// The connection's facts.
    pub fn info(&self) -> &Rc<ConnInfo> {
        &self.info
    }

    /// Ends the connection as soon as the current response is out, whatever the client still
    /// sends: for a request whose body was abandoned half-way. Without it the dispatcher keeps
    /// the connection open waiting for the rest of that body.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_reader();
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// A request head has arrived: no head timeout until the returned guard drops (when the
    /// request is done). `bodyless`: the request has no body and is no upgrade, so that any
    /// bytes the client sends before its end are its next requests.
    pub fn begin(self: &Rc<Self>, bodyless: bool) -> Busy {
        self.busy.set(self.busy.get() + 1);
        self.bodyless.set(bodyless);
        self.head_deadline.set(None);
        self.idle_deadline.set(None);
        Busy(Rc::clone(self))
    }

    /// Counts the request being handled once more, until the returned guard drops: it is not
    /// over (nor are the bytes pipelined behind it let through) until both guards are gone.
    pub fn hold(self: &Rc<Self>) -> Busy {
        self.busy.set(self.busy.get() + 1);
        Busy(Rc::clone(self))
    }

    /// The deadline that applies now: none while a request is being handled.
    pub(super) fn deadline(&self) -> Option<(Instant, Expired)> {
        if self.busy.get() > 0 {
            return None;
        }
        match (self.head_deadline.get(), self.idle_deadline.get()) {
            (Some(at), _) => Some((at, Expired::Head)),
            (None, Some(at)) if self.first.get() => Some((at, Expired::Head)),
            (None, Some(at)) => Some((at, Expired::Idle)),
            (None, None) => None,
        }
    }

    /// How far ahead of now any deadline set from now on lies, at least: the timer may wait that
    /// long before looking again, never longer.
    pub(super) fn shortest_wait(&self) -> Duration {
        self.keep_alive
            .map_or(self.header_timeout, |k| k.min(self.header_timeout))
    }
}

/// Which wait of a connection ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// A request head did not arrive whole in time: `408`, then close.
    Head,
    /// Nothing came after the last request within the keep-alive time: close.
    Idle,
}

/// A request being handled on its connection.
pub(crate) struct Busy(Rc<ConnState>);

impl Busy {
    /// See [`ConnState::close`].
    pub fn close_connection(&self) {
        self.0.close();
    }

    /// The request's client went away before its body's end: what the dispatcher writes from
    /// now on is dropped, and the connection ends once the request is done.
    pub fn drop_response(&self) {
        self.0.silent.set(true);
        self.0.close();
    }

    /// Whether the connection's send timeout cut what was being written to the client.
    pub fn send_timed_out(&self) -> bool {
        self.0.send_timed_out.get()
    }

    /// Whether the request's chunked body was malformed (its client has been told `400`).
    pub fn body_broken(&self) -> bool {
        self.0.body_broken.get()
    }

    /// Whether the request's body is chunked and checked by the listener, which answers a
    /// malformed one `400` itself ([`Busy::share_request_id`]).
    pub fn body_checked(&self) -> bool {
        self.0.body_checked.get()
    }

    /// Gives the request and the listener's `400` for its malformed chunked body one request
    /// id, the one its upstream gets and its access line names. A body that broke before the
    /// handler had the request was answered already: the request takes that answer's id (`id`
    /// and `reply` are replaced). Otherwise the request's own id is left for such an answer.
    pub fn share_request_id(
        &self,
        id: &mut http::HeaderValue,
        reply: &mut actix_web::http::header::HeaderValue,
    ) {
        let state = &self.0;
        if let Some(sent) = state.body_refusal_id.take() {
            if let (Ok(i), Ok(r)) = (
                http::HeaderValue::from_str(&sent),
                actix_web::http::header::HeaderValue::from_str(&sent),
            ) {
                (*id, *reply) = (i, r);
            }
        } else {
            state.body_request_id.set(Some(reply.clone()));
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        let busy = state.busy.get().saturating_sub(1);
        state.busy.set(busy);
        if busy == 0 {
            state.ended.set(state.ended.get() + 1);
            state.bodyless.set(false);
            if let Some(k) = state.keep_alive {
                // The timer need not move: it fires within `shortest_wait` of when it was
                // armed.
                state.idle_deadline.set(Some(now() + k));
            }
        }
        if state.closing.get() || (busy == 0 && state.holding.get()) {
            state.wake_reader();
        }
    }
}
