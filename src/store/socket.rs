//! How the gateway connects to the store: the socket (TCP with the options of
//! [`super::tcp_settings`], TLS for `rediss://`, or a Unix socket), and a cap on what one reply
//! may be.
//!
//! redis-rs reads whatever a reply declares: `$1000000000` and a stream of bytes, or an array
//! of a hundred million elements, is buffered and parsed as it comes, so a hostile Redis, or
//! anyone between the gateway and Redis, could grow the gateway's memory without limit. The
//! gateway's own replies are tiny (a few integers, fleet entries), so every byte read from the
//! store goes through [`Capped`], which follows the RESP framing and fails the read, and with
//! it the connection, as soon as one reply declares or reaches more than [`MAX_REPLY_BYTES`],
//! before redis-rs sees the bytes. Memory then grows with what the gateway accepted, not with
//! what the store declared.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use redis::ConnectionAddr;
use redis::ConnectionInfo;
use redis::io::tcp::socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one reply (a whole top-level value, nested values included, or one message of
/// the heads subscription) may take. The largest reply the gateway asks for is the fleet's
/// member list: 256 KiB holds thousands of replica names.
pub const MAX_REPLY_BYTES: usize = 256 * 1024;
/// Deepest nesting of aggregates in a reply (the gateway's are two deep at most).
const MAX_DEPTH: usize = 16;
/// Longest length line (`$<n>`, `*<n>`, ...).
const MAX_LENGTH_LINE: usize = 24;

/// A byte stream to or from the store.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects to the store named by `info`, its replies capped. `rediss://` verifies the
/// server's certificate against the system's roots, always (`#insecure` is refused).
pub async fn connect(info: &ConnectionInfo) -> io::Result<Capped<Box<dyn Io>>> {
    let settings = super::tcp_settings();
    let tcp = |host: String, port: u16| async move {
        // Its addresses as the upstreams' are tried (Happy Eyeballs): a store named by a host
        // name whose IPv6 address drops packets is reached on its IPv4 one in time.
        let s = crate::wire::connect::connect_any((host.as_str(), port)).await?;
        let sock = SockRef::from(&s);
        s.set_nodelay(settings.nodelay())?;
        if let Some(k) = settings.keepalive() {
            sock.set_tcp_keepalive(k)?;
        }
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        sock.set_tcp_user_timeout(settings.user_timeout())?;
        Ok::<_, io::Error>(s)
    };
    let stream: Box<dyn Io> = match info.addr() {
        ConnectionAddr::Tcp(host, port) => Box::new(tcp(host.clone(), *port).await?),
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            ..
        } => {
            if *insecure {
                return Err(io::Error::other(
                    "rediss:// with #insecure is not supported: the store's certificate is always verified",
                ));
            }
            let roots = crate::wire::tls::system_roots().ok_or_else(|| {
                io::Error::other("no system root certificates to verify the store")
            })?;
            let config =
                crate::wire::tls::verifying_config(roots, None).map_err(io::Error::other)?;
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(io::Error::other)?;
            let s = tcp(host.clone(), *port).await?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            Box::new(connector.connect(name, s).await?)
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        other => {
            return Err(io::Error::other(format!(
                "unsupported store address {other}"
            )));
        }
    };
    Ok(Capped::new(stream))
}

/// A stream whose reads are checked against the RESP framing: a reply over
/// [`MAX_REPLY_BYTES`], nested deeper than [`MAX_DEPTH`], or not RESP at all fails the read
/// (`InvalidData`) instead of reaching redis-rs. Writes pass through.
pub struct Capped<S> {
    inner: S,
    scan: Scanner,
}

impl<S> Capped<S> {
    pub fn new(inner: S) -> Capped<S> {
        Capped {
            inner,
            scan: Scanner::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(why) = this.scan.feed(&buf.filled()[before..]) {
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Where the scan of the reply stream stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// At the type byte of a value.
    #[default]
    Start,
    /// In the line after type byte `kind`.
    Line { kind: u8 },
    /// In the body of a blob: bytes left, its CRLF included.
    Body(u64),
}

/// Follows RESP2/RESP3 framing just enough to know where each top-level reply starts and
/// ends and how large it declares itself.
#[derive(Debug, Default)]
struct Scanner {
    part: Part,
    /// Values still to come in each open aggregate, innermost last.
    open: Vec<u64>,
    /// Bytes of the current reply so far.
    bytes: usize,
    /// The length line being read (for the kinds that carry one).
    line: Vec<u8>,
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        while let Some(&first) = data.first() {
            match self.part {
                Part::Start => {
                    self.take(1)?;
                    if !b"+-:_,#($!=*~>%|".contains(&first) {
                        return Err(format!("not a RESP reply (type byte {first:#04x})"));
                    }
                    self.line.clear();
                    self.part = Part::Line { kind: first };
                    data = &data[1..];
                }
                Part::Line { kind } => {
                    let end = memchr::memchr(b'\n', data);
                    let n = end.map_or(data.len(), |i| i + 1);
                    self.take(n)?;
                    if b"$!=*~>%|".contains(&kind) {
                        self.line.extend_from_slice(&data[..end.unwrap_or(n)]);
                        if self.line.len() > MAX_LENGTH_LINE {
                            return Err("a length line too long".into());
                        }
                    }
                    data = &data[n..];
                    if end.is_some() {
                        self.line_done(kind)?;
                    }
                }
                Part::Body(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.take(n)?;
                    data = &data[n..];
                    match left - n as u64 {
                        0 => self.value_done(),
                        left => self.part = Part::Body(left),
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts `n` more bytes of the current reply.
    fn take(&mut self, n: usize) -> Result<(), String> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > MAX_REPLY_BYTES {
            return Err(format!("a reply over {MAX_REPLY_BYTES} bytes"));
        }
        Ok(())
    }

    fn line_done(&mut self, kind: u8) -> Result<(), String> {
        let text = std::str::from_utf8(&self.line)
            .ok()
            .map(|l| l.trim_end_matches('\r'));
        let len = || -> Result<i64, String> {
            text.and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| "a length that is not a number".to_owned())
        };
        let room = (MAX_REPLY_BYTES - self.bytes) as u64;
        match kind {
            b'$' | b'!' | b'=' => match u64::try_from(len()?) {
                Err(_) => self.value_done(),
                Ok(n) if n.saturating_add(2) > room => {
                    return Err(format!(
                        "a reply declaring {n} bytes, over {MAX_REPLY_BYTES}"
                    ));
                }
                Ok(n) => self.part = Part::Body(n + 2),
            },
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = u64::try_from(len()?).unwrap_or(0);
                let values = match kind {
                    b'%' => n.saturating_mul(2),
                    b'|' => n.saturating_mul(2).saturating_add(1),
                    _ => n,
                };
                // Every value takes 3 bytes at least (`_\r\n`).
                if values.saturating_mul(3) > room {
                    return Err(format!(
                        "a reply declaring {values} values, over {MAX_REPLY_BYTES} bytes"
                    ));
                }
                if values == 0 {
                    self.value_done();
                } else if self.open.len() >= MAX_DEPTH {
                    return Err(format!("a reply nested over {MAX_DEPTH} deep"));
                } else {
                    self.open.push(values);
                    self.part = Part::Start;
                }
            }
            _ => self.value_done(),
        }
        Ok(())
    }

    /// A value ended: it counts in its aggregate, and the reply is over when the outermost
    /// one is.
    fn value_done(&mut self) {
        self.part = Part::Start;
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.open.pop();
        }
        self.bytes = 0;
        self.line = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Result<Scanner, String> {
        let mut s = Scanner::default();
        for c in chunks {
            s.feed(c)?;
        }
        Ok(s)
    }

    #[test]
    fn the_replies_the_gateway_gets_pass_in_any_chunking() {
        let replies: &[u8] = b"+OK\r\n*4\r\n:1\r\n:4\r\n:0\r\n:15000\r\n$-1\r\n*-1\r\n*0\r\n\
            *2\r\n$1\r\na\r\n$2\r\nbc\r\n-NOSCRIPT No matching script\r\n\
            *3\r\n$7\r\nmessage\r\n$15\r\nrustygate:heads\r\n$5\r\n{\"a\"}\r\n\
            %1\r\n+k\r\n*1\r\n#t\r\n_\r\n|1\r\n+a\r\n:1\r\n:2\r\n";
        for size in [1, 2, 3, 7, replies.len()] {
            let chunks: Vec<&[u8]> = replies.chunks(size).collect();
            let s = scan(&chunks).unwrap();
            assert_eq!(
                (s.part, s.open.len(), s.bytes),
                (Part::Start, 0, 0),
                "{size}"
            );
        }
    }

    #[test]
    fn a_reply_over_the_cap_fails_as_soon_as_it_says_so_or_reaches_it() {
        let e = scan(&[b"$1000000000\r\n"]).unwrap_err();
        assert!(e.contains("declaring 1000000000 bytes"), "{e}");
        let e = scan(&[b"*100000000\r\n"]).unwrap_err();
        assert!(e.contains("declaring 100000000 values"), "{e}");
        // Declared small enough, but values that keep coming inside one reply.
        let mut s = Scanner::default();
        s.feed(b"*80000\r\n").unwrap();
        let e = (0..80_000)
            .find_map(|_| s.feed(b":1\r\n").err())
            .expect("stopped at the cap");
        assert!(e.contains("over"), "{e}");
        // An endless simple string.
        let mut s = Scanner::default();
        s.feed(b"+").unwrap();
        let chunk = [b'a'; 4096];
        assert!((0..100).any(|_| s.feed(&chunk).is_err()));
        // Many small replies are fine: the count starts again with each.
        let mut s = Scanner::default();
        for _ in 0..100_000 {
            s.feed(b"*4\r\n:1\r\n:4\r\n:0\r\n:15000\r\n").unwrap();
        }
    }

    #[test]
    fn what_is_not_resp_fails() {
        assert!(scan(&[b"HTTP/1.1 200 OK\r\n"]).is_err());
        assert!(scan(&[b"$abc\r\n"]).is_err());
        assert!(scan(&[b"*1\r\n".repeat(MAX_DEPTH + 1).as_slice()]).is_err());
    }
}
