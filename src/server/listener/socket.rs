//! [`ClientIo`]'s reads and writes, and the send timeout on every write to the client
//! ([`SendLimited`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::answers::{
    BARE_LF_HEAD, MAX_PARTIAL_HEAD, MAX_REQUEST_LINE, REQUEST_TIMEOUT, URI_TOO_LONG, gateway_answer,
};
use super::client_io::ClientIo;
use super::conn_state::Expired;
use super::head::{
    BodyCheck, Left, is_plain_bodyless, line_too_long, plain_if_not_websocket, request_body,
    scan_head,
};
use super::now;

/// A client that stops taking what the gateway writes to it (its receive window and the
/// socket's buffer full): the write waits, and so would the request behind it, its upstream
/// connection and its places under the upstream's limits, for as long as the client likes.
/// Past `[limits] send_timeout` without a byte taken, the write fails and the connection ends.
/// Only a write that must wait reads the clock; the timer is made on the first such wait.
pub(super) struct SendStall {
    pub(super) timeout: Duration,
    /// A write is waiting; `timer` is then set to when it must have moved.
    pub(super) waiting: bool,
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    /// `rustygate_client_timeouts_total{phase="send"}`
    pub(super) timeouts: prometheus::IntCounter,
}

impl SendStall {
    /// `res` of a write or flush to the client: progress clears the deadline; a wait starts
    /// it (or keeps it) and, once it has passed, becomes an error that ends the connection.
    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if !res.is_pending() {
            self.waiting = false;
            return res;
        }
        // The clock is read when a wait begins, not on every poll of it.
        let timer = match &mut self.timer {
            Some(t) if self.waiting => t,
            Some(t) => {
                t.as_mut().reset(now() + self.timeout);
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.waiting = true;
        if timer.as_mut().poll(cx).is_pending() {
            return res;
        }
        self.timeouts.inc();
        tracing::debug!(
            timeout_s = self.timeout.as_secs_f64(),
            "client took nothing of its response within the send timeout; closing"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing within the send timeout",
        )))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out
            || (this.answered && this.ready.is_empty())
            || (this.state.closing.get() && this.state.busy.get() == 0)
        {
            // End of input: the dispatcher flushes what it has written, then closes.
            return Poll::Ready(Ok(()));
        }
        match this.expired(cx) {
            Some(Expired::Head) => {
                // Best effort: the client learns why; the dispatcher sees end of input and
                // closes.
                this.timed_out = true;
                this.state.timeouts.inc();
                // A plain socket sends it at once if it has room; over TLS it is encrypted into
                // the session and leaves with the dispatcher's flush before the close.
                let (answer, id) = gateway_answer(REQUEST_TIMEOUT.status, REQUEST_TIMEOUT.message);
                let _ = Pin::new(&mut this.io).poll_write(cx, answer.as_bytes());
                this.refused(
                    408,
                    "request head not received within the header timeout",
                    &this.partial_head.bytes,
                    &answer,
                    &id,
                );
                return Poll::Ready(Ok(()));
            }
            Some(Expired::Idle) => {
                this.timed_out = true;
                tracing::debug!("keep-alive connection idle past its timeout; closing");
                return Poll::Ready(Ok(()));
            }
            None => {}
        }
        if !this.ready.is_empty() {
            // Checked when it was put together: given as it is.
            this.give_ready(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let (res, read) = match this.held_or_gated(buf) {
            Some(given) => (given, false),
            None => (Pin::new(&mut this.io).poll_read(cx, buf), true),
        };
        if read
            && let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
            && (this.held.gated || (this.state.busy.get() > 0 && this.state.bodyless.get()))
        {
            // Sent while a request without a body is in progress (or before it began): the
            // next requests.
            this.hold(buf, before);
            return this.pending(cx);
        }
        if res.is_pending() {
            return this.pending(cx);
        }
        let mut body_from = before;
        if let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
            && this.state.busy.get() == 0
            && this.state.head_deadline.get().is_none()
        {
            // A new request's first bytes as read; more requests behind it wait for it.
            let new = &buf.filled()[before..];
            let k = new.len().min(this.head_start.len());
            this.head_start = [0; 8];
            this.head_start[..k].copy_from_slice(&new[..k]);
            this.body = None;
            this.partial_head.clear();
            this.responded = false;
            this.state.body_broken.set(false);
            this.state.body_checked.set(false);
            this.state.body_request_id.set(None);
            // Most reads hold one whole head: only where more follows, or the head has a
            // `Transfer-Encoding` or `Content-Length`, is the head looked at further.
            match scan_head(new) {
                Some(head) if head.bare_lf => {
                    this.refuse_head(cx, buf, before, BARE_LF_HEAD);
                    return Poll::Ready(Ok(()));
                }
                Some(head) if head.end > MAX_REQUEST_LINE && line_too_long(new) => {
                    this.refuse_head(cx, buf, before, URI_TOO_LONG);
                    return Poll::Ready(Ok(()));
                }
                None if line_too_long(new) => {
                    this.refuse_head(cx, buf, before, URI_TOO_LONG);
                    return Poll::Ready(Ok(()));
                }
                Some(head) => {
                    let end = head.end;
                    if head.upgrade {
                        plain_if_not_websocket(&mut buf.filled_mut()[before..before + end]);
                    }
                    let new = &buf.filled()[before..];
                    // Held bytes being given go out one bodyless request at a time already.
                    if end < new.len()
                        && this.held.bytes.is_empty()
                        && is_plain_bodyless(&new[..end])
                    {
                        this.hold(buf, before + end);
                    } else if let Some(left) = request_body(head, &new[..end]) {
                        this.state.body_checked.set(matches!(left, Left::Chunks(_)));
                        this.body = Some(BodyCheck {
                            left,
                            owner: this.state.ended.get() + 1,
                        });
                        body_from = before + end;
                    }
                }
                // A head cut across reads (rare): kept, and withheld from the dispatcher, until
                // it is whole.
                None if new.len() <= MAX_PARTIAL_HEAD => {
                    // Scanned again from its start with the next read: once.
                    this.partial_head.bytes.extend_from_slice(new);
                    buf.set_filled(before);
                }
                None => {}
            }
            this.state
                .head_deadline
                .set(Some(now() + this.state.header_timeout));
            this.state.idle_deadline.set(None);
            this.state.first.set(false);
            // Creates the timer for the connection's first head; registers its wake-up.
            let _ = this.expired(cx);
            if !this.partial_head.is_empty() {
                return this.withheld(cx);
            }
        } else if !this.partial_head.is_empty()
            && let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
        {
            // The dispatcher has none of the head yet: no request can be in progress.
            // Completed, the head is given as if it had come whole, and so are the requests
            // after it: held until it has ended, then given (and scanned) one at a time. Given
            // to the dispatcher at once, they were never scanned: a bare line feed or a bad
            // chunk in them went through, a pipelined HEAD lost the response before it, and
            // the rest of a head cut again was scanned as a new one (a valid one got 400 when
            // its last line feed came alone). Given as they came, the first pieces of the
            // head could not be rewritten any more: an `Upgrade: h2c` cut across reads ended
            // the connection after its response.
            let new = buf.filled()[before..].to_vec();
            buf.set_filled(before);
            if let Err(answer) = this.head_completed(cx, &new) {
                this.refuse_head(cx, buf, before, answer);
                return Poll::Ready(Ok(()));
            }
            if this.ready.is_empty() {
                return this.withheld(cx);
            }
            this.give_ready(buf);
            return Poll::Ready(Ok(()));
        }
        if this.body.is_some() && buf.filled().len() > body_from {
            this.check_body(cx, buf, before, body_from);
        }
        res
    }
}

impl ClientIo {
    /// Notes a write the send timeout failed ([`SendStall`]), for the access line of the
    /// response it cut.
    fn note_send_timeout<T>(&self, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &res
            && e.kind() == io::ErrorKind::TimedOut
        {
            self.state.send_timed_out.set(true);
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answered || this.state.silent.get() {
            // The client has its answer (see `check_body`), or has gone (`Busy::drop_response`):
            // the dispatcher's is dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        if let Some(status) = this.wrote(buf) {
            // actix-http's answer to a head it refused: the gateway's goes instead.
            this.answer_refused(cx, status);
            return Poll::Ready(Ok(buf.len()));
        }
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_send_timeout(res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answered || this.state.silent.get() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(status) = this.wrote(first)
        {
            this.answer_refused(cx, status);
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_send_timeout(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_flush(cx);
        this.note_send_timeout(res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A stream whose writes fail once the client has taken nothing for the send timeout (see
/// [`SendStall`]); reads pass through.
pub(crate) struct SendLimited<T> {
    pub(super) io: T,
    pub(super) send: SendStall,
}

impl<T: AsyncRead + Unpin> AsyncRead for SendLimited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendLimited<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        this.send.check(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.send.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_flush(cx);
        this.send.check(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_shutdown(cx);
        this.send.check(cx, res)
    }
}
