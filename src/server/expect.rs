//! `Expect: 100-continue` on HTTP/1.1: `100 Continue` goes out only once the request's body is
//! wanted.
//!
//! actix-http calls an expect service before the main one and writes `100 Continue` when it
//! hands the request back. Ours starts the request's exchange right there, with the body behind
//! a [`Wanted`] stream, and polls it until it reads the body or answers:
//! - it reads the body (to buffer it, to stream it upstream, for a plugin): the exchange is
//!   handed back inside a request of its own ([`Continued`]), actix-http writes `100 Continue`,
//!   and the main service ([`super::tls::entry`]) goes on polling that same exchange;
//! - it answers first (413 for a declared length over the route's limit, 401, 404, 429, a
//!   policy's or plugin's answer, a redirect): that answer goes out *instead of* `100 Continue`,
//!   as the expect service's error. The client never sends the body it was about to send
//!   (RFC 9110 §10.1.1); actix-http closes the connection after the answer, since the announced
//!   body was not read.
//!
//! Without this, actix-http's default answers every `Expect` with `100 Continue` at once, and a
//! client that announced a body over the route's limit started uploading it before the 413.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_http::{HttpMessage as _, Payload, Request, Response};
use actix_web::body::BoxBody;
use actix_web::web;
use bytes::Bytes;
use futures_util::Stream;

use super::WorkerState;
use super::tls::{Exchange, entry_with};

/// The expect service's call: the exchange, polled until it wants the body or answers.
pub(crate) fn call(mut req: Request, state: web::Data<WorkerState>) -> Expecting {
    let asked = Rc::new(Asked::default());
    let payload = match req.take_payload() {
        // Nothing will be read: the exchange runs to its answer here.
        Payload::None => Payload::None,
        body => {
            let wanted: actix_http::BoxedPayloadStream = Box::pin(Wanted {
                body,
                asked: Rc::clone(&asked),
            });
            Payload::Stream { payload: wanted }
        }
    };
    Expecting {
        exchange: Some(entry_with(req, payload, state)),
        asked,
    }
}

/// Set on the body's first read; wakes the expect service's task (the dispatcher's), since the
/// read may be made from a task of its own (a body streamed upstream).
#[derive(Default)]
struct Asked {
    yes: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// The client's body, noting that it was asked for.
struct Wanted {
    body: Payload,
    asked: Rc<Asked>,
}

impl Stream for Wanted {
    type Item = Result<Bytes, actix_http::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.asked.yes.replace(true)
            && let Some(w) = self.asked.waker.borrow_mut().take()
        {
            w.wake();
        }
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// The exchange handed back to actix-http in a request of its own, for the main service to
/// go on with.
pub(crate) struct Continued(pub(crate) Exchange);

/// The method of that request, so that the main service looks for an exchange only there.
pub(crate) const CONTINUED: &str = "RUSTYGATE-CONTINUED";

/// The expect service's future: `Ok` (actix-http writes `100 Continue`) when the body is
/// wanted, the answer as `Err` when the exchange answered first.
pub(crate) struct Expecting {
    exchange: Option<Exchange>,
    asked: Rc<Asked>,
}

impl Future for Expecting {
    type Output = Result<Request, Response<BoxBody>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Poll::Pending;
        };
        if let Poll::Ready(resp) = exchange.as_mut().poll(cx) {
            self.exchange = None;
            return Poll::Ready(Err(resp.into()));
        }
        if self.asked.yes.get() {
            let mut req = Request::new();
            if let Ok(m) = actix_http::Method::from_bytes(CONTINUED.as_bytes()) {
                req.head_mut().method = m;
            }
            if let Some(exchange) = self.exchange.take() {
                req.extensions_mut().insert(Continued(exchange));
            }
            return Poll::Ready(Ok(req));
        }
        let mut waker = self.asked.waker.borrow_mut();
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}
