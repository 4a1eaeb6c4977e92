//! The response body, read straight from the connection ([`ResponseBody`]): its framing
//! (length, chunked, until close) and the chunked decoder.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};

use super::{Checkin, Conn, H1Error, MAX_CHUNK_LINE, MAX_TRAILERS, poll_fill};

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Reading a `size[;ext]\r\n` line.
    Size,
    /// Bytes of the current chunk still to come.
    Data(u64),
    /// The `\r\n` after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// The upstream's response body, read from the connection as the client side asks for it.
pub struct ResponseBody {
    pub(super) conn: Option<Conn>,
    pub(super) framing: Framing,
    pub(super) checkin: Checkin,
}

impl ResponseBody {
    /// Once the body is complete: the connection back to the pool when it can be reused.
    pub(super) fn end_if_done(&mut self) {
        if !matches!(self.framing, Framing::Length(0) | Framing::Done) {
            return;
        }
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let (Some(idle), Some(pool)) = (self.checkin.idle, self.checkin.pool.upgrade())
            && conn.buf.is_empty()
        {
            pool.checkin_own(&self.checkin.key, conn, idle);
        }
    }

    /// The whole body when all of it is already in the buffer (a `Content-Length` body that
    /// came with its head, as most small ones do): taken at once, and the connection goes
    /// back to the pool as after the last read. `None` leaves the body as it was.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        let Framing::Length(left) = self.framing else {
            return None;
        };
        let conn = self.conn.as_mut()?;
        let left = usize::try_from(left)
            .ok()
            .filter(|&n| n <= conn.buf.len())?;
        let data = conn.buf.split_to(left).freeze();
        self.framing = Framing::Length(0);
        self.end_if_done();
        Some(data)
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e)))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What the buffer already holds.
            match this.framing {
                Framing::Done => {
                    this.end_if_done();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.end_if_done();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.end_if_done();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) if !conn.buf.is_empty() => {
                    match chunk_step(&mut conn.buf, state) {
                        Ok(Step::Need) => {}
                        Ok(Step::State(s)) => {
                            this.framing = Framing::Chunked(s);
                            continue;
                        }
                        Ok(Step::Data(data, s)) => {
                            this.framing = Framing::Chunked(s);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Step::End(trailers)) => {
                            this.framing = Framing::Done;
                            this.end_if_done();
                            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                        }
                        Err(e) => return this.fail(e),
                    }
                }
                _ => {}
            }
            // More from the socket.
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(poll_fill(conn, cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(H1Error::Read(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(_) => {}
                Err(e) => return this.fail(H1Error::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Length(0) | Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    /// More bytes are needed.
    Need,
    State(Chunk),
    Data(Bytes, Chunk),
    /// The body ended, with its trailer fields if it had any.
    End(Option<HeaderMap>),
}

/// One step of the chunked decoder over what the buffer holds.
fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Step, H1Error> {
    match state {
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(H1Error::Invalid("chunk size line too long"));
                }
                return Ok(Step::Need);
            };
            let size = chunk_size(&buf[..end])?;
            buf.advance(end + 2);
            Ok(Step::State(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Step::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::Need);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Invalid("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::State(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let Some(end) = find(buf, b"\r\n\r\n") else {
                if buf.len() > MAX_TRAILERS {
                    return Err(H1Error::Invalid("trailer section too large"));
                }
                return Ok(Step::Need);
            };
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let parsed = httparse::parse_headers(&buf[..end + 4], &mut fields)
                .map_err(|_| H1Error::Invalid("malformed trailer section"))?;
            let mut map = HeaderMap::new();
            if let httparse::Status::Complete((_, fields)) = parsed {
                for f in fields {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(f.name.as_bytes()),
                        HeaderValue::from_bytes(f.value),
                    ) {
                        map.append(n, v);
                    }
                }
            }
            buf.advance(end + 4);
            Ok(Step::End(Some(map)))
        }
    }
}

/// The size on a chunk's `size[;ext]` line (without its CRLF).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let size_part = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if size_part.is_empty() || size_part.len() > 15 || !size_part.iter().all(u8::is_ascii_hexdigit)
    {
        return Err(H1Error::Invalid("invalid chunk size"));
    }
    u64::from_str_radix(std::str::from_utf8(size_part).unwrap_or("x"), 16)
        .map_err(|_| H1Error::Invalid("invalid chunk size"))
}

/// Checks the chunks that `buf` (the bytes read past the head) already holds, without taking
/// them: a body that came with its head and is broken fails the exchange (a 502) instead of
/// failing once its head is relayed, when the client could only be cut off. What has not come
/// yet is checked as it is decoded.
pub(super) fn check_buffered_chunks(buf: &[u8]) -> Result<(), H1Error> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(end) = find_crlf(rest) else {
            if rest.len() > MAX_CHUNK_LINE {
                return Err(H1Error::Invalid("chunk size line too long"));
            }
            return Ok(());
        };
        let size = chunk_size(&rest[..end])?;
        if size == 0 {
            // Trailers are checked as they are decoded.
            return Ok(());
        }
        let Some(data_end) = usize::try_from(size)
            .ok()
            .and_then(|n| (at + end + 2).checked_add(n))
        else {
            return Ok(());
        };
        match buf.get(data_end..data_end.saturating_add(2)) {
            Some(b"\r\n") => at = data_end + 2,
            Some(_) => return Err(H1Error::Invalid("chunk data not followed by CRLF")),
            None => return Ok(()),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n")
}

pub(super) fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_chunks_are_checked_as_far_as_they_came() {
        for (bytes, ok) in [
            (&b""[..], true),
            (b"5", true),
            (b"5\r\nhel", true),
            (b"5\r\nhello", true),
            (b"5\r\nhello\r", true),
            (b"5\r\nhello\r\n0\r\nx-t: 1\r\n", true),
            (b"a\r\n0123456789\r\n0\r\n\r\n", true),
            (b"fffffffffffffff\r\nab", true),
            (b"zz\r\n", false),
            (b"\r\n", false),
            (b"5\r\nhelloXY", false),
            (b"1\r\na\r\n2\r\nabc\r\n", false),
            (b"1000000000000000\r\n", false),
        ] {
            assert_eq!(
                check_buffered_chunks(bytes).is_ok(),
                ok,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(check_buffered_chunks(&long).is_err());
    }
}
