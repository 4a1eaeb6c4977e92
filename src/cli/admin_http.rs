//! The `status` command's HTTP/1.1 client: one `GET` to an admin listener, plain TCP. Small on
//! purpose (no runtime for one request), but a correct client: the request in one write with
//! `Connection: close`, the answer framed by `Content-Length` or chunked (or read to the close
//! without either), each resolved address tried in turn, and bounded in size and time however
//! the other side behaves. Every error names what was asked of whom and what went wrong.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long a connection to one address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole answer may take once connected, however slowly it trickles.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body, and largest answer head.
const MOST: usize = 16 * 1024 * 1024;
const MOST_HEAD: usize = 64 * 1024;

/// An admin listener's address: `http://host[:port][/base]` (port 80 by default; a base path
/// for a listener behind a reverse proxy that serves it under a prefix).
pub struct AdminUrl {
    /// The host as resolved: a name, or an IP address without brackets.
    host: String,
    port: u16,
    /// `host[:port]` as written, for `Host`.
    authority: String,
    /// The path before `/status`, without a trailing `/`.
    base: String,
}

impl AdminUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}); write e.g. http://127.0.0.1:8081"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(
                    "https is not spoken here: the admin listener serves plain HTTP; \
                            give its http:// address"
                        .into(),
                );
            }
            Some(other) => return Err(format!("the scheme is `{other}`, not http")),
            None => return Err("no http:// in front; write e.g. http://127.0.0.1:8081".into()),
        }
        let Some(authority) = uri.authority() else {
            return Err("no host; write e.g. http://127.0.0.1:8081".into());
        };
        if authority.as_str().contains('@') {
            return Err("credentials in the URL (`user@`) are not sent: /status needs none".into());
        }
        if uri.query().is_some() {
            return Err("a query (`?...`) is not taken; give the listener's base URL".into());
        }
        let host = authority.host();
        // `http` reads a port that is not a u16 (`:99999`, `:8o81`) as no port at all.
        let port = match authority.as_str().get(host.len()..).unwrap_or("") {
            "" | ":" => 80,
            written => authority.port_u16().ok_or_else(|| {
                format!("`{}` is not a port number", written.trim_start_matches(':'))
            })?,
        };
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            base: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// `GET base + path`: the body of a `200`, as text.
pub fn get(url: &AdminUrl, path: &str) -> Result<String, String> {
    let target = format!("{}{path}", url.base);
    let (stream, addr) = connect(url)?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\
         User-Agent: rustygate-status/{}\r\nConnection: close\r\n\r\n",
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    let mut answer = Answer {
        silent: format!(
            "{addr} accepted the connection but did not answer {target} within {} s",
            ANSWER_TIMEOUT.as_secs()
        ),
        stream,
        addr,
        buf: Vec::new(),
        deadline: Instant::now() + ANSWER_TIMEOUT,
    };
    let _ = answer.stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    // One write. A listener that answers without reading the request (a redirect) may be gone
    // before it is written: what it answered is still read, and told.
    let written = answer.stream.write_all(request.as_bytes());
    let head = match answer.head() {
        Ok(head) => head,
        Err(e) => {
            return Err(match written {
                Err(w) => format!("sending GET {target} to {addr}: {w}"),
                Ok(()) => e,
            });
        }
    };
    if head.code != 200 {
        let to = head
            .location
            .map(|l| format!(" to {l}; redirects are not followed: give the listener's own URL"))
            .unwrap_or_default();
        return Err(format!(
            "GET {target} was answered {} {}{to}",
            head.code, head.reason
        ));
    }
    let body = match head.framing {
        Framing::Length(n) => answer.exactly(head.len, n)?,
        Framing::Chunked => answer.chunked(head.len)?,
        Framing::Close => answer.until_close(head.len)?,
    };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A connection to the first address of `url` that takes one.
fn connect(url: &AdminUrl) -> Result<(TcpStream, SocketAddr), String> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{}`: {e}", url.host))?
        .collect();
    let mut failed = Vec::new();
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok((s, *addr)),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => failed
                .push(format!(
                    "{addr}: no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )),
            Err(e) => failed.push(format!("{addr}: {e}")),
        }
    }
    if failed.is_empty() {
        return Err(format!("`{}` resolves to no address", url.host));
    }
    Err(format!(
        "cannot connect to {}: {}",
        url.authority,
        failed.join("; ")
    ))
}

/// How the body of an answer ends.
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

struct Head {
    code: u16,
    reason: String,
    location: Option<String>,
    framing: Framing,
    /// Bytes of the buffer the head took.
    len: usize,
}

/// An answer being read, within its deadline and size.
struct Answer {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
    /// What to say at the deadline.
    silent: String,
}

impl Answer {
    /// Reads more into the buffer; false at the end of the stream.
    fn more(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.silent.clone());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    if self.buf.len() > MOST + MOST_HEAD {
                        return Err(format!("{} answered more than 16 MiB", self.addr));
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.silent.clone());
                }
                Err(e) => return Err(format!("reading the answer from {}: {e}", self.addr)),
            }
        }
    }

    /// More, or `ended` when the stream ends first.
    fn more_or(&mut self, ended: impl FnOnce() -> String) -> Result<(), String> {
        if self.more()? { Ok(()) } else { Err(ended()) }
    }

    /// The head of the final answer (interim `1xx` answers skipped).
    fn head(&mut self) -> Result<Head, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = parsed.code.unwrap_or(0);
                    if (100..200).contains(&code) && code != 101 {
                        self.buf.drain(..len);
                        continue;
                    }
                    let reason = parsed.reason.unwrap_or("").to_owned();
                    let framing = framing(parsed.headers).map_err(|e| {
                        format!("{} answered a head this client cannot read: {e}", self.addr)
                    })?;
                    let location = parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("location"))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned());
                    return Ok(Head {
                        code,
                        reason,
                        location,
                        framing,
                        len,
                    });
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MOST_HEAD => {
                    return Err(format!("{} answered a head over 64 KiB", self.addr));
                }
                Ok(httparse::Status::Partial) => {
                    let (addr, started) = (self.addr, !self.buf.is_empty());
                    self.more_or(|| match started {
                        true => format!(
                            "{addr} closed the connection in the middle of its answer's head"
                        ),
                        false => format!("{addr} closed the connection without answering"),
                    })?;
                }
                Err(e) => return Err(format!("{} did not answer HTTP/1.1 ({e})", self.addr)),
            }
        }
    }

    /// The `n` bytes of body after the head.
    fn exactly(&mut self, from: usize, n: usize) -> Result<Vec<u8>, String> {
        if n > MOST {
            return Err(format!(
                "{} announced an answer of {n} bytes, over 16 MiB",
                self.addr
            ));
        }
        while self.buf.len() - from < n {
            let (addr, got) = (self.addr, self.buf.len() - from);
            self.more_or(|| {
                format!("{addr} closed the connection after {got} of the {n} bytes it announced")
            })?;
        }
        Ok(self.buf.get(from..from + n).unwrap_or_default().to_vec())
    }

    /// The body after the head, to the end of the stream.
    fn until_close(&mut self, from: usize) -> Result<Vec<u8>, String> {
        while self.more()? {}
        Ok(self.buf.get(from..).unwrap_or_default().to_vec())
    }

    /// A chunked body from `from` on (chunk extensions and trailers skipped).
    fn chunked(&mut self, mut at: usize) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.line(at)?;
            let size_text = String::from_utf8_lossy(self.buf.get(at..line).unwrap_or_default())
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let size = usize::from_str_radix(&size_text, 16)
                .map_err(|_| format!("{} sent a chunk size `{size_text}`", self.addr))?;
            at = line + 2;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let end = self.line(at)?;
                    let empty = end == at;
                    at = end + 2;
                    if empty {
                        return Ok(body);
                    }
                }
            }
            if body.len() + size > MOST {
                return Err(format!("{} answered more than 16 MiB", self.addr));
            }
            let chunk = self.exactly(at, size + 2)?;
            if !chunk.ends_with(b"\r\n") {
                return Err(format!("{} sent a chunk without its CRLF", self.addr));
            }
            body.extend_from_slice(chunk.get(..size).unwrap_or_default());
            at += size + 2;
        }
    }

    /// Where the line starting at `from` ends (its CR), once it is in the buffer.
    fn line(&mut self, from: usize) -> Result<usize, String> {
        loop {
            let rest = self.buf.get(from..).unwrap_or_default();
            if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                return Ok(from + i);
            }
            if rest.len() > 4096 {
                return Err(format!("{} sent a chunk line over 4 KiB", self.addr));
            }
            let addr = self.addr;
            self.more_or(|| format!("{addr} closed the connection inside its chunked answer"))?;
        }
    }
}

/// How the body ends, from the head's `Transfer-Encoding` and `Content-Length`.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Framing, String> {
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if let Some(te) = values("transfer-encoding").next_back() {
        return match te.rsplit(',').next().map(str::trim) {
            Some("chunked") => Ok(Framing::Chunked),
            _ => Err(format!("Transfer-Encoding `{te}`")),
        };
    }
    let lengths: Vec<String> = values("content-length").collect();
    match lengths.first() {
        None => Ok(Framing::Close),
        Some(first) if lengths.iter().all(|l| l == first) => first
            .parse()
            .map(Framing::Length)
            .map_err(|_| format!("Content-Length `{first}`")),
        Some(_) => Err(format!("Content-Lengths {}", lengths.join(", "))),
    }
}
