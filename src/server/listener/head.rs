//! Reading request heads off the socket: where a head ends, its framing and body, the
//! pipelined requests held behind one in progress, and the rewrites a head may need.

use super::answers::MAX_REQUEST_LINE;

use crate::proxy::websocket::upgrade_is_websocket;
use crate::wire::chunked::ChunkCheck;

/// Bytes of requests that came after one still in progress (HTTP/1.1 pipelining), given to the
/// dispatcher only once it has ended. actix-http keeps one HEAD flag, HTTP version and
/// connection type per connection, set by the last head it parsed and read when it writes a
/// response head: a pipelined HEAD parsed early dropped the body of the response before it
/// (and the client read the next response as that body), and a request after a HEAD had the
/// HEAD's response written as its own. Only what follows a request without a body is held:
/// bytes after a head with a body are that body.
#[derive(Default)]
pub(super) struct Pipelined {
    pub(super) bytes: bytes::BytesMut,
    /// Bytes at the front that may be given now (the next request's head).
    pub(super) free: usize,
    /// Bytes read are held until `until` requests of the connection have ended.
    pub(super) gated: bool,
    pub(super) until: u64,
}

/// Where the first request head in `bytes` ends, when it is whole and a plain request without
/// a body (no `Transfer-Encoding` or `Upgrade`, no `Content-Length` but one of `0`; not
/// `CONNECT`); `None` otherwise (a head cut short, a body, anything odd): then nothing after
/// it is held.
pub(super) fn bodyless_head_end(bytes: &[u8]) -> Option<usize> {
    let end = head_end(bytes)?;
    is_plain_bodyless(&bytes[..end]).then_some(end)
}

/// Where the first head in `bytes` ends (after its empty line), if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    scan_head(bytes).filter(|h| !h.bare_lf).map(|h| h.end)
}

/// A whole head found at the start of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Just past its empty line.
    pub(super) end: usize,
    /// One of its lines starts with `transfer-encoding:` (in any case).
    transfer_encoding: bool,
    /// One of its lines starts with `content-length:` (in any case).
    content_length: bool,
    /// One of its lines starts with `upgrade:`, or with `connection:` and names `upgrade`
    /// (in any case): the head may be rewritten by [`plain_if_not_websocket`].
    pub(super) upgrade: bool,
    /// A line ends in a bare line feed (no carriage return before it): the head is refused
    /// (`end` is then just past that line feed, not the head's end).
    pub(super) bare_lf: bool,
}

/// Finds the first head in `bytes` (see [`Head`]). Every request's first read is looked at:
/// line feeds are found eight bytes at a time (a word XORed with `\n`s has a zero byte where one
/// was; the test may also flag a byte after a real one, which the check of the four bytes
/// ending there rules out). A substring search cost ~390 instructions a request to set up,
/// `memchr` per line feed ~270. At each line feed, the next line's first byte and one more
/// tell whether it could be `Transfer-Encoding`, `Content-Length`, `Upgrade` or `Connection`.
pub(super) fn scan_head(bytes: &[u8]) -> Option<Head> {
    const LF: u64 = u64::from_ne_bytes([b'\n'; 8]);
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut names = Names::default();
    let words = bytes.chunks_exact(8);
    let tail = bytes.len() - words.remainder().len();
    for (k, w) in words.enumerate() {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) ^ LF;
        let mut found = w.wrapping_sub(ONES) & !w & HIGH;
        while found != 0 {
            let i = k * 8 + (found.trailing_zeros() / 8) as usize;
            if bytes[i] == b'\n'
                && let Some(head) = names.at_lf(bytes, i)
            {
                return Some(head);
            }
            found &= found - 1;
        }
    }
    for i in tail..bytes.len() {
        if bytes[i] == b'\n'
            && let Some(head) = names.at_lf(bytes, i)
        {
            return Some(head);
        }
    }
    None
}

/// The names [`scan_head`] has seen so far.
#[derive(Default)]
struct Names {
    transfer_encoding: bool,
    content_length: bool,
    upgrade: bool,
}

impl Names {
    const TE: &[u8] = b"transfer-encoding:";
    const CL: &[u8] = b"content-length:";
    const UPGRADE: &[u8] = b"upgrade:";
    const CONNECTION: &[u8] = b"connection:";
    /// How far past a line feed [`Names::at_lf`] looks: the longer name's length.
    const NAME_LOOKAHEAD: usize = Self::TE.len();

    /// At the line feed `bytes[i]`: the head, if it ends there; else notes the next line's name.
    #[inline(always)]
    fn at_lf(&mut self, bytes: &[u8], i: usize) -> Option<Head> {
        const { assert!(Names::CL.len() < Names::NAME_LOOKAHEAD) };
        let bare_lf = i == 0 || bytes[i - 1] != b'\r';
        if bare_lf || (i >= 3 && bytes[i - 3..=i] == *b"\r\n\r\n") {
            return Some(Head {
                end: i + 1,
                transfer_encoding: self.transfer_encoding,
                content_length: self.content_length,
                upgrade: self.upgrade,
                bare_lf,
            });
        }
        // The next line's first letter picks the one name it could be (for `c`, where its
        // colon is).
        let (name, seen) = match bytes.get(i + 1).map(|b| b | 0x20) {
            Some(b't') => (Self::TE, &mut self.transfer_encoding),
            Some(b'u') => (Self::UPGRADE, &mut self.upgrade),
            Some(b'c') if bytes.get(i + Self::CONNECTION.len()) == Some(&b':') => {
                let value = i + Self::CONNECTION.len() + 1;
                if bytes[i + 1..value].eq_ignore_ascii_case(Self::CONNECTION)
                    && may_name_upgrade(&bytes[value..])
                {
                    self.upgrade = true;
                }
                return None;
            }
            Some(b'c') => (Self::CL, &mut self.content_length),
            _ => return None,
        };
        if bytes.get(i + name.len()) == Some(&b':')
            && bytes[i + 1..=i + name.len()].eq_ignore_ascii_case(name)
        {
            *seen = true;
        }
        None
    }
}

/// Whether the `Connection` value that starts `rest` (up to its line feed) may name
/// `upgrade`: `Connection: upgrade` alone, without an `Upgrade` field, made actix-http treat
/// the request as an upgrade and end the connection after its response. A value whose line
/// feed has not come yet may.
fn may_name_upgrade(rest: &[u8]) -> bool {
    memchr::memchr(b'\n', rest).is_none_or(|n| {
        rest[..n]
            .windows(7)
            .any(|w| w.eq_ignore_ascii_case(b"upgrade"))
    })
}

/// A request head cut across reads, as far as it came, scanned as it grows: the same
/// [`Names`] and line feeds [`scan_head`] looks at, each line feed once, except the last one
/// while the name of the line after it may still be coming.
#[derive(Default)]
pub(super) struct PartialHead {
    pub(super) bytes: Vec<u8>,
    names: Names,
    /// Where the next scan starts: the last line feed when the bytes after it do not yet tell
    /// the next line's name, else the end of what was scanned.
    next: usize,
}

impl PartialHead {
    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(super) fn clear(&mut self) {
        *self = PartialHead::default();
    }

    /// Adds the next bytes of the head; the head, once whole (its `end` counts from the
    /// head's first byte).
    pub(super) fn extend(&mut self, new: &[u8]) -> Option<Head> {
        self.bytes.extend_from_slice(new);
        let bytes = &self.bytes[..];
        let mut last_lf = None;
        for i in self.next..bytes.len() {
            if bytes[i] == b'\n' {
                if let Some(head) = self.names.at_lf(bytes, i) {
                    return Some(head);
                }
                last_lf = Some(i);
            }
        }
        // `at_lf` looks at most `NAME_LOOKAHEAD` bytes past a line feed.
        self.next = match last_lf {
            Some(i) if i + Names::NAME_LOOKAHEAD >= bytes.len() => i,
            _ => bytes.len(),
        };
        None
    }
}

/// Whether a whole request head (ending with its empty line) gets a chunked body from
/// actix-http's decoder: HTTP/1.1 and exactly one `Transfer-Encoding` field, `chunked`.
fn is_chunked_request(head: &[u8]) -> bool {
    let (request_line, fields) = head_lines(head);
    if !request_line.ends_with(b" HTTP/1.1") {
        return false;
    }
    let mut values = fields
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"transfer-encoding"))
        .map(|(_, value)| value);
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.eq_ignore_ascii_case(b"chunked")
    )
}

/// A whole request head's request line, and its fields as name and value (the value without
/// the whitespace around it); lines without a colon are left out.
pub(super) fn head_lines(head: &[u8]) -> (&[u8], impl Iterator<Item = (&[u8], &[u8])>) {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let fields = lines.filter_map(|l| {
        let colon = l.iter().position(|&b| b == b':')?;
        Some((&l[..colon], l[colon + 1..].trim_ascii()))
    });
    (request_line, fields)
}

/// Where a request's body stands, as far as the client has sent it: the listener follows each
/// body to its end so that what comes after it (pipelined requests) waits for the request to
/// end, as after a request without a body (see [`Pipelined`]).
pub(super) struct BodyCheck {
    pub(super) left: Left,
    /// [`ConnState::ended`] once the body's request has ended: what follows the body is held
    /// only while the request is in progress.
    ///
    /// [`ConnState::ended`]: super::ConnState::ended
    pub(super) owner: u64,
}

pub(super) enum Left {
    /// A chunked body, checked as it passes (see [`ClientIo::check_body`]).
    ///
    /// [`ClientIo::check_body`]: super::ClientIo::check_body
    Chunks(ChunkCheck),
    /// Bytes of a `Content-Length` body still to come.
    Bytes(u64),
}

/// How actix-http's decoder frames the body of the whole request head `bytes` (found by
/// [`scan_head`] as `head`): chunked, by a length, or not followed here (no body, an upgrade,
/// `CONNECT`, or a head the decoder refuses with `400`).
pub(super) fn request_body(head: Head, bytes: &[u8]) -> Option<Left> {
    if head.transfer_encoding {
        return is_chunked_request(bytes).then(|| Left::Chunks(ChunkCheck::new()));
    }
    if !head.content_length {
        return None;
    }
    content_length_of(bytes).filter(|&n| n > 0).map(Left::Bytes)
}

/// The length of the body of a whole request head that actix-http's decoder reads by
/// `Content-Length`: one such field whose value is digits that fit in a `u64`; `None` with an
/// `Upgrade` field (what follows a handshake is the tunnel's), `Transfer-Encoding`, or `CONNECT`.
fn content_length_of(head: &[u8]) -> Option<u64> {
    let (request_line, fields) = head_lines(head);
    if request_line.starts_with(b"CONNECT ") {
        return None;
    }
    let mut length = None;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(value).ok()?.parse::<u64>().ok()?);
        } else if name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            return None;
        }
    }
    length
}

/// A head with `Upgrade` to something else than WebSocket (`h2c` from `curl --http2`, ...), or
/// with `Connection: upgrade` and no `Upgrade` field at all, is served as a plain request, but
/// actix-http reads `Connection: upgrade` as an upgrade and ends the connection after the
/// response (answering `connection: upgrade`). The `upgrade` token of its `Connection` fields
/// is blanked in place (same length, so nothing else moves); the field is hop-by-hop and goes
/// no further either way. nginx keeps such connections open too.
pub(super) fn plain_if_not_websocket(head: &mut [u8]) {
    if head_lines(head)
        .1
        .any(|(name, value)| name.eq_ignore_ascii_case(b"upgrade") && upgrade_is_websocket(value))
    {
        return;
    }
    let mut at = 0;
    while let Some(nl) = memchr::memchr(b'\n', &head[at..]) {
        // The line without its line feed and carriage return.
        let cr = usize::from(nl > 0 && head[at + nl - 1] == b'\r');
        let line = at..at + nl - cr;
        at += nl + 1;
        let Some(colon) = memchr::memchr(b':', &head[line.clone()]) else {
            continue;
        };
        if !head[line.start..line.start + colon].eq_ignore_ascii_case(b"connection") {
            continue;
        }
        let mut start = line.start + colon + 1;
        let mut tokens = Vec::new();
        for piece in head[start..line.end].split(|&b| b == b',') {
            let end = start + piece.len();
            if piece.trim_ascii().eq_ignore_ascii_case(b"upgrade") {
                tokens.push(start..end);
            }
            start = end + 1;
        }
        for t in tokens {
            head[t].fill(b' ');
        }
    }
}

/// Whether the first line of `head` (as far as it came) is longer than [`MAX_REQUEST_LINE`].
pub(super) fn line_too_long(head: &[u8]) -> bool {
    head.len() > MAX_REQUEST_LINE && memchr::memchr(b'\n', &head[..=MAX_REQUEST_LINE]).is_none()
}

/// Whether a whole request head (ending with its empty line) is a plain request without a
/// body (see [`bodyless_head_end`]).
pub(super) fn is_plain_bodyless(head: &[u8]) -> bool {
    // A method is a token; `get` is one too (another method than `GET`, and forwarded).
    if !head.first().is_some_and(u8::is_ascii_alphabetic) {
        return false;
    }
    let (request_line, fields) = head_lines(head);
    if request_line.starts_with(b"CONNECT ")
        || memchr::memmem::find(request_line, b" HTTP/1.").is_none()
    {
        return false;
    }
    let mut length_field = false;
    for (name, value) in fields {
        // What follows a WebSocket handshake may be its first frames; any other upgrade (h2c,
        // ...) is served as a plain request, and what follows it is its next request.
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"upgrade") && upgrade_is_websocket(value))
        {
            return false;
        }
        length_field |= name.eq_ignore_ascii_case(b"content-length");
    }
    // `Content-Length: 0` (as POSTs without a body often say): no body either.
    !length_field || content_length_of(head) == Some(0)
}

#[cfg(test)]
mod tests;
