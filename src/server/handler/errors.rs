//! The gateway's own error answers: the gRPC way for a gRPC call, and those that are also
//! counted (408 body timeout, 503 overload, 502 invalid response).

use actix_web::HttpResponse;
use actix_web::http::{StatusCode, header as ax};
use http::header::HeaderValue;

use super::exchange::{CLIENT_CLOSED, Exchange};

use crate::server::WorkerState;
use crate::upstream::Upstream;
use crate::upstream::state::Overflow;

/// The gRPC status for an error the gateway answers with HTTP `status`, as Envoy maps them.
fn grpc_code(status: u16) -> &'static str {
    match status {
        400 => "13",       // INTERNAL
        401 => "16",       // UNAUTHENTICATED
        403 => "7",        // PERMISSION_DENIED
        404 | 405 => "12", // UNIMPLEMENTED
        408 | 504 => "4",  // DEADLINE_EXCEEDED
        413 | 429 => "8",  // RESOURCE_EXHAUSTED
        502 | 503 => "14", // UNAVAILABLE
        500 => "13",
        _ => "2", // UNKNOWN
    }
}

/// A gateway error for a gRPC client: HTTP 200 and a trailers-only response carrying
/// `grpc-status` and `grpc-message` (percent-encoded, gRPC over HTTP/2 spec), as gRPC clients
/// read only those.
pub(super) fn grpc_error(
    status: u16,
    message: &str,
    request_id: &HeaderValue,
) -> (HttpResponse, &'static str) {
    let code = grpc_code(status);
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let resp = HttpResponse::Ok()
        .insert_header((ax::CONTENT_TYPE, "application/grpc"))
        .insert_header(("grpc-status", code))
        .insert_header(("grpc-message", encoded))
        .insert_header(("x-request-id", request_id.as_bytes()))
        .finish();
    (resp, code)
}

pub(super) fn status_code(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// 408: the client paused too long while sending its body.
pub(super) fn body_timeout(ex: &Exchange, state: &WorkerState) -> HttpResponse {
    state
        .recorder
        .metrics()
        .client_timeouts
        .with_label_values(&["body"])
        .inc();
    let mut resp = ex.error(408, "the request body was not received in time");
    // The rest of the body may still be on its way: the connection cannot carry another request.
    resp.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    if let Some(busy) = &ex.busy {
        busy.close_connection();
    }
    resp
}

/// The client's body could not be read. Its client went away before the body's end (end of
/// input or a reset before the declared length, an HTTP/2 stream cancelled or its connection
/// closed): recorded as `499 client_gone`, as when the dispatcher drops the request, and
/// nothing is sent (a client that only shut its side down reads no answer; the connection
/// ends). A chunked body the listener found malformed has had its `400` from the listener:
/// recorded as such (`client_body`). Any other malformed body is answered `400`.
pub(super) fn client_body_failed(ex: &Exchange) -> HttpResponse {
    let broken = ex.busy.as_ref().is_some_and(|b| b.body_broken());
    let gone = ex.body.as_ref().is_some_and(|b| b.gone.get());
    if !broken && !gone {
        return ex.error(400, "the request body could not be read");
    }
    if broken {
        ex.emit(400, 0, Err("client_body"));
    } else {
        ex.emit(CLIENT_CLOSED, 0, Err("client_gone"));
        if let Some(busy) = &ex.busy {
            busy.drop_response();
        }
    }
    // Never sent: the listener drops what the dispatcher writes, and an HTTP/2 stream that
    // failed this way is reset or its connection gone.
    let mut resp = HttpResponse::new(StatusCode::BAD_REQUEST);
    resp.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    resp
}

/// 503 from an upstream's circuit breaker.
pub(super) fn overloaded(
    ex: &Exchange,
    state: &WorkerState,
    upstream: &Upstream,
    o: Overflow,
) -> HttpResponse {
    state
        .recorder
        .metrics()
        .upstream_overflow
        .with_label_values(&[upstream.name.as_str(), o.as_str()])
        .inc();
    ex.error(503, "the upstream is at its concurrency limit")
}

/// The kind of [`ForwardError::Invalid`], for a response refused once its head has arrived.
///
/// [`ForwardError::Invalid`]: crate::proxy::ForwardError::Invalid
pub(super) const INVALID_RESPONSE: &str = "invalid_response";

/// 502 for an upstream response whose head arrived but may not be relayed (a 101 to a request
/// that did not ask to switch, or a failed WebSocket handshake; both framings at once): counted
/// like the invalid responses the upstream client refuses itself ([`attempt_failed`]), under
/// `rustygate_upstream_errors_total{kind="invalid_response"}` and against the target.
///
/// [`attempt_failed`]: super::attempt::attempt_failed
pub(super) fn invalid_response(ex: &Exchange, state: &WorkerState) -> HttpResponse {
    if let Some(upstream) = &ex.upstream {
        if let Some(index) = ex.target {
            upstream.record_failure(index, &"the upstream sent an invalid response");
        }
        // The error path only: a labelled lookup is fine here.
        state
            .recorder
            .metrics()
            .upstream_errors
            .with_label_values(&[upstream.name.as_str(), INVALID_RESPONSE])
            .inc();
    }
    ex.error(502, "the upstream sent an invalid response")
}

#[cfg(test)]
mod tests {
    use super::grpc_code;

    #[test]
    fn gateway_errors_map_to_grpc_codes_as_envoy_does() {
        for (http, grpc) in [
            (502, "14"),
            (503, "14"),
            (504, "4"),
            (401, "16"),
            (429, "8"),
            (404, "12"),
            (403, "7"),
            (400, "13"),
            (418, "2"),
        ] {
            assert_eq!(grpc_code(http), grpc, "{http}");
        }
    }
}
