//! The answers the listener gives itself, before any route sees the request (408, 400, 414,
//! 431...), and the limits they enforce.

use super::head::head_lines;

/// A client whose next request head did not arrive in time (the header timeout).
pub(super) const REQUEST_TIMEOUT: Refusal = Refusal {
    status: 408,
    message: "the request head was not received in time",
};

/// A request the listener refuses itself (a head before the parser has it whole, a head that
/// did not arrive in time, a malformed chunked body): its status and the message of the
/// gateway's JSON error ([`gateway_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: u16,
    pub(super) message: &'static str,
}

/// A request head with a line ending in a bare line feed (SECURITY.md: bare CR or LF in a head
/// is a 400). Proxies and servers split such heads differently, which is what request
/// smuggling is made of.
pub(super) const BARE_LF_HEAD: Refusal = Refusal {
    status: 400,
    message: "a line of the request head ends without a carriage return",
};

/// A request line longer than [`MAX_REQUEST_LINE`].
pub(super) const URI_TOO_LONG: Refusal = Refusal {
    status: 414,
    message: "the request target is too long",
};

/// The gateway's answer to a request the listener refuses itself (a head refused before any
/// route saw it, a head that did not arrive in time), as the handler answers the requests it
/// refuses: a JSON error with a new request id, that id in `x-request-id`; then the connection
/// closes. A malformed chunked body is answered so under its request's id
/// ([`gateway_answer_as`]). Returns the answer and the id. Refusal paths
/// only: nothing here is built for a request that is served.
pub(super) fn gateway_answer(status: u16, message: &str) -> (String, String) {
    let id = new_request_id();
    (gateway_answer_as(status, message, &id), id)
}

/// A new request id ([`crate::server::handler::new_request_id`]) as text.
pub(super) fn new_request_id() -> String {
    let (_, id) = crate::server::handler::new_request_id();
    id.to_str().unwrap_or("unknown").to_owned()
}

/// The client's `x-request-id` in a whole request head (the first, as the handler reads it),
/// if it is one the handler takes.
pub(super) fn client_request_id(head: &[u8]) -> Option<String> {
    let (_, mut fields) = head_lines(head);
    let (_, value) = fields.find(|(name, _)| name.eq_ignore_ascii_case(b"x-request-id"))?;
    crate::wire::headers::valid_request_id(value)
        .then(|| String::from_utf8_lossy(value).into_owned())
}

/// [`gateway_answer`] under a given request id.
pub(super) fn gateway_answer_as(status: u16, message: &str, id: &str) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Bad Request");
    let body = serde_json::json!({ "error": message, "request_id": id }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The longest request line the listener lets through: the `http` crate refuses targets of
/// 65,534 bytes and more, which actix-http then answers with a bare 400. Targets over the
/// handler's 16 KiB limit and under this one get the handler's 414 (the connection serves on);
/// longer lines get [`URI_TOO_LONG`] here, and the connection is closed.
pub(super) const MAX_REQUEST_LINE: usize = 65_000;

/// A request whose chunked body breaks the chunked grammar.
pub(super) const MALFORMED_BODY: Refusal = Refusal {
    status: 400,
    message: "the chunked body is malformed",
};

/// The most of a request head cut across reads kept to find its end: actix-http's own limit
/// (its decoder answers a longer head with 431 and closes). Each read scans only its new bytes
/// (and the last line's start, see [`PartialHead`]), so a client sending a long head a byte at
/// a time costs a scan linear in the head.
///
/// [`PartialHead`]: super::head::PartialHead
pub(super) const MAX_PARTIAL_HEAD: usize = 131_072;

/// What actix-http writes for `Expect: 100-continue`: not yet the request's response.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
