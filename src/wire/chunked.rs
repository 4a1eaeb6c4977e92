//! A check of a chunked request body as it streams past, byte for byte the grammar actix-http's
//! decoder applies (`actix_http::h1::chunked`), so that the listener knows a body is broken
//! *before* the decoder sees it. actix-http takes a broken chunk for a client that went away and
//! drops the connection without a word; the listener answers `400` instead (see
//! `server::listener`).
//!
//! ```text
//! chunk      = size [ws] [";" ext] CRLF data CRLF      size: hex digits, fits in a u64
//! last-chunk = "0" ... CRLF  *(trailer-line CRLF)  CRLF
//! ```
//! Extensions may hold any byte but controls (`\t` aside); trailer lines any byte but `\r`.
//! Nothing is copied: data is skipped by count.

/// Where a chunked body stands after the bytes fed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkCheck {
    state: State,
    /// The chunk size being read, then the data bytes still to come.
    size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SizeFirst,
    SizeRest,
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk's line, or a trailer line: an empty line ends the body.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// What the bytes fed did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// All of them belong to the body, which goes on.
    More,
    /// The body ended after this many of them; the rest is the next request.
    Ended(usize),
    /// The byte at this index breaks the grammar; the ones before it were fine.
    Broken(usize),
}

impl Default for ChunkCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkCheck {
    /// A body whose first byte has not come yet.
    pub fn new() -> Self {
        Self {
            state: State::SizeFirst,
            size: 0,
        }
    }

    /// Feeds the next bytes of the body. After `Ended` or `Broken` the check is spent.
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == State::Data {
                let n = self.size.min((bytes.len() - i) as u64);
                self.size -= n;
                i += n as usize;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            let next = match (self.state, b) {
                (State::SizeFirst, _) => hex(b).map(|d| {
                    self.size = d;
                    State::SizeRest
                }),
                (State::SizeRest, b'\t' | b' ') => Some(State::SizeSpace),
                (State::SizeRest | State::SizeSpace, b';') => Some(State::Extension),
                (State::SizeRest | State::SizeSpace | State::Extension, b'\r') => {
                    Some(State::SizeLf)
                }
                (State::SizeRest, _) => hex(b).and_then(|d| {
                    self.size = self.size.checked_mul(16)? + d;
                    Some(State::SizeRest)
                }),
                (State::SizeSpace, b'\t' | b' ') => Some(State::SizeSpace),
                (State::SizeSpace, _) => None,
                (State::Extension, 0x00..=0x08 | 0x0a..=0x1f | 0x7f) => None,
                (State::Extension, _) => Some(State::Extension),
                (State::SizeLf, b'\n') if self.size == 0 => Some(State::EndCr),
                (State::SizeLf, b'\n') => Some(State::Data),
                (State::DataCr, b'\r') => Some(State::DataLf),
                (State::DataLf, b'\n') => Some(State::SizeFirst),
                (State::EndCr, b'\r') => Some(State::EndLf),
                (State::Trailer, b'\r') => Some(State::TrailerLf),
                (State::EndCr | State::Trailer, _) => Some(State::Trailer),
                (State::TrailerLf, b'\n') => Some(State::EndCr),
                (State::EndLf, b'\n') => return Fed::Ended(i + 1),
                (State::SizeLf | State::DataCr | State::DataLf | State::TrailerLf, _)
                | (State::EndLf, _) => None,
                (State::Data, _) => unreachable!("data is skipped above"),
            };
            match next {
                Some(s) => self.state = s,
                None => return Fed::Broken(i),
            }
            i += 1;
        }
        Fed::More
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder as _;
    use actix_http::ServiceConfig;
    use actix_http::h1::{Codec, Message};
    use bytes::BytesMut;
    use rand::{Rng, SeedableRng};

    const HEAD: &[u8] = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";

    /// What actix-http's decoder makes of `body` after a chunked request head: `Ended(n)` when
    /// the body ended after `n` bytes, `Broken` on an error, `More` when it wants more.
    fn actix_verdict(config: &ServiceConfig, body: &[u8]) -> Fed {
        let mut codec = Codec::new(config.clone());
        let mut buf = BytesMut::from(HEAD);
        buf.extend_from_slice(body);
        match codec.decode(&mut buf) {
            Ok(Some(Message::Item(_))) => {}
            other => panic!("the head did not parse: {other:?}"),
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Message::Chunk(Some(_)))) => {}
                Ok(Some(Message::Chunk(None))) => return Fed::Ended(body.len() - buf.len()),
                Ok(Some(Message::Item(_))) => unreachable!("a chunk or the end comes first"),
                Ok(None) => return Fed::More,
                Err(_) => return Fed::Broken(usize::MAX),
            }
        }
    }

    /// The check's verdict fed `body` in pieces cut at `cuts`.
    fn verdict(body: &[u8], cuts: &[usize]) -> Fed {
        let mut check = ChunkCheck::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&body.len())) {
            let to = to.clamp(from, body.len());
            match check.feed(&body[from..to]) {
                Fed::More => from = to,
                Fed::Ended(n) => return Fed::Ended(from + n),
                Fed::Broken(n) => return Fed::Broken(from + n),
            }
        }
        Fed::More
    }

    fn same(ours: Fed, theirs: Fed) -> bool {
        match (ours, theirs) {
            (Fed::Broken(_), Fed::Broken(_)) => true,
            (a, b) => a == b,
        }
    }

    // actix-http's configuration starts its date service on the actix runtime.
    #[actix_rt::test]
    async fn bodies_end_or_break_where_the_grammar_says() {
        let config = ServiceConfig::default();
        let cases: &[(&[u8], Fed)] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", Fed::Ended(15)),
            (b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n", Fed::Ended(15)),
            (b"5;name=\"v\"\r\nhello\r\n0\r\n\r\n", Fed::Ended(24)),
            (b"5 \t;x\r\nhello\r\n0\r\n\r\n", Fed::Ended(19)),
            (b"A\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n", Fed::Ended(28)),
            (b"5\r\nhel", Fed::More),
            (b"0\r\n", Fed::More),
            (b"zz\r\nhello\r\n0\r\n\r\n", Fed::Broken(0)),
            (b"5\r\nhelloXX0\r\n\r\n", Fed::Broken(8)),
            (b"5\nhello\r\n0\r\n\r\n", Fed::Broken(1)),
            (b"5 5\r\n", Fed::Broken(2)),
            (b"5;\x01\r\n", Fed::Broken(2)),
            (b"\r\n", Fed::Broken(0)),
            (b"10000000000000000\r\n", Fed::Broken(16)),
            (b"0\r\n\r\r", Fed::Broken(4)),
            (b"0\r\nx\r\r", Fed::Broken(5)),
        ];
        for &(body, want) in cases {
            assert_eq!(
                verdict(body, &[]),
                want,
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(
                same(want, actix_verdict(&config, body)),
                "actix differs on {:?}",
                String::from_utf8_lossy(body)
            );
            for cut in 0..body.len() {
                assert_eq!(verdict(body, &[cut]), want, "cut at {cut}");
            }
        }
    }

    /// Random bodies made of the pieces that matter to the grammar, cut at random: the check
    /// and actix-http's decoder agree on every one.
    #[actix_rt::test]
    async fn agrees_with_actix_http_on_random_bodies() {
        let config = ServiceConfig::default();
        const PIECES: &[&[u8]] = &[
            b"0",
            b"3",
            b"a",
            b"F",
            b"g",
            b"z",
            b";",
            b"=x",
            b" ",
            b"\t",
            b"\r",
            b"\n",
            b"\r\n",
            b"\r\n",
            b"abc",
            b"\x01",
            b"\x7f",
            b"0\r\n\r\n",
            b"3\r\nabc\r\n",
            b"0\r\n",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let mut broken = 0;
        let mut ended = 0;
        for _ in 0..20_000 {
            let body: Vec<u8> = (0..rng.random_range(0..8))
                .flat_map(|_| PIECES[rng.random_range(0..PIECES.len())].iter().copied())
                .collect();
            let mut cuts = [
                rng.random_range(0..=body.len()),
                rng.random_range(0..=body.len()),
            ];
            cuts.sort_unstable();
            let ours = verdict(&body, &cuts);
            let theirs = actix_verdict(&config, &body);
            assert!(
                same(ours, theirs),
                "{:?}: ours {ours:?}, actix {theirs:?}",
                String::from_utf8_lossy(&body)
            );
            match ours {
                Fed::Broken(_) => broken += 1,
                Fed::Ended(_) => ended += 1,
                Fed::More => {}
            }
        }
        assert!(
            broken > 1_000 && ended > 100,
            "broken {broken}, ended {ended}"
        );
    }
}
