//! A response head's fields, in either shape the head is made in ([`Fields`]), and the names
//! the parser knows.

use actix_http::header as ax;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::H1Error;

/// A header map a parsed head's fields go into, named and valued by slices of the head.
pub(super) trait Fields {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error>;
}

impl Fields for HeaderMap {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error> {
        let name = match known {
            Some(k) => KNOWN[k as usize].1.clone(),
            None => {
                HeaderName::from_bytes(name).map_err(|_| H1Error::Invalid("invalid header name"))?
            }
        };
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::Invalid("invalid header value"))?;
        self.append(name, value);
        Ok(())
    }
}

impl Fields for Vec<(ax::HeaderName, ax::HeaderValue)> {
    fn append_field(
        &mut self,
        known: Option<Known>,
        name: &[u8],
        value: Bytes,
    ) -> Result<(), H1Error> {
        let name = match known {
            Some(k) => KNOWN[k as usize].0.clone(),
            None => ax::HeaderName::from_bytes(name)
                .map_err(|_| H1Error::Invalid("invalid header name"))?,
        };
        let value = ax::HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::Invalid("invalid header value"))?;
        self.push((name, value));
        Ok(())
    }
}

/// Names most responses carry, and those the framing rules read: [`known_name`] finds them
/// with one pass over the name, and their `HeaderName`s are taken from [`KNOWN`], not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    ContentType,
    ContentLength,
    Date,
    Server,
    Connection,
    KeepAlive,
    CacheControl,
    TransferEncoding,
}

/// The names of [`Known`], in its order, in both `http` versions. A `static`: a `const` array
/// of names would be built and dropped at each use.
static KNOWN: [(ax::HeaderName, HeaderName); 8] = [
    (ax::CONTENT_TYPE, header::CONTENT_TYPE),
    (ax::CONTENT_LENGTH, header::CONTENT_LENGTH),
    (ax::DATE, header::DATE),
    (ax::SERVER, header::SERVER),
    (ax::CONNECTION, header::CONNECTION),
    (
        ax::HeaderName::from_static("keep-alive"),
        HeaderName::from_static("keep-alive"),
    ),
    (ax::CACHE_CONTROL, header::CACHE_CONTROL),
    (ax::TRANSFER_ENCODING, header::TRANSFER_ENCODING),
];

/// Which [`Known`] name `name` is, in any case: picked by its length, then compared eight
/// bytes at a time. The first cut lowered the name into a buffer and matched the buffer, which
/// compared it with musl's `memcmp`, a byte at a time (~100 instructions a field).
pub(super) fn known_name(name: &[u8]) -> Option<Known> {
    let (known, lower): (Known, &[u8]) = match name.len() {
        4 => (Known::Date, b"date"),
        6 => (Known::Server, b"server"),
        10 if name[0] | 0x20 == b'c' => (Known::Connection, b"connection"),
        10 => (Known::KeepAlive, b"keep-alive"),
        12 => (Known::ContentType, b"content-type"),
        13 => (Known::CacheControl, b"cache-control"),
        14 => (Known::ContentLength, b"content-length"),
        17 => (Known::TransferEncoding, b"transfer-encoding"),
        _ => return None,
    };
    is_name(name, lower).then_some(known)
}

/// Whether the field name `name` is `lower` (lower-case letters and `-`) in any case.
///
/// Compared eight bytes at a time: where `lower` has a letter, the name's byte is compared with
/// its `0x20` bit set (`A`-`Z` lowered; no other byte becomes a letter so); elsewhere as it is.
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    // Bit 0x40 is set in every letter and in no `-`; shifted, it is the case bit of the letters.
    const LETTER: u64 = 0x4040_4040_4040_4040;
    // Eight bytes from `at`, those past the end zero.
    fn word(bytes: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        let part = bytes.get(at..).unwrap_or_default();
        let n = part.len().min(8);
        w[..n].copy_from_slice(&part[..n]);
        u64::from_le_bytes(w)
    }
    if name.len() != lower.len() {
        return false;
    }
    // Whole words, the last one overlapping the one before when the length is no multiple of 8.
    let last = name.len().saturating_sub(8);
    let mut at = 0;
    loop {
        let from = at.min(last);
        let want = word(lower, from);
        if (word(name, from) | ((want & LETTER) >> 1)) != want {
            return false;
        }
        at += 8;
        if at >= name.len() {
            return true;
        }
    }
}

/// Where a field's name and value lie in the head (offsets: a head is at most [`MAX_HEAD`]
/// bytes), and which known name it has.
///
/// [`MAX_HEAD`]: super::MAX_HEAD
#[derive(Clone, Copy)]
struct Span {
    known: Option<Known>,
    name: (u32, u32),
    value: (u32, u32),
}

/// The fields of a head being parsed. Most heads have a few fields, held on the stack; more go
/// to the heap.
pub(super) struct Spans {
    few: [Span; FEW_FIELDS],
    len: usize,
    more: Vec<Span>,
}

const FEW_FIELDS: usize = 16;

impl Spans {
    pub(super) fn new() -> Spans {
        const NONE: Span = Span {
            known: None,
            name: (0, 0),
            value: (0, 0),
        };
        Spans {
            few: [NONE; FEW_FIELDS],
            len: 0,
            more: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, known: Option<Known>, name: (u32, u32), value: (u32, u32)) {
        let span = Span { known, name, value };
        match self.few.get_mut(self.len) {
            Some(slot) => *slot = span,
            None => self.more.push(span),
        }
        self.len += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends the fields, in the order they came, to `map`.
    pub(super) fn fill(&self, head: &Bytes, map: &mut impl Fields) -> Result<(), H1Error> {
        let few = &self.few[..self.len.min(FEW_FIELDS)];
        let range = |(start, end): (u32, u32)| start as usize..end as usize;
        for s in few.iter().chain(&self.more) {
            map.append_field(s.known, &head[range(s.name)], head.slice(range(s.value)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known names are found in any case, and only whole: a name that starts or ends like one
    /// is another field.
    #[test]
    fn known_names_are_matched_whole_in_any_case() {
        for (name, known) in [
            (&b"Content-Length"[..], Some(Known::ContentLength)),
            (b"TRANSFER-ENCODING", Some(Known::TransferEncoding)),
            (b"keep-ALIVE", Some(Known::KeepAlive)),
            (b"date", Some(Known::Date)),
            (b"content-lengths", None),
            (b"content-lengt", None),
            (b"transfer-encodings", None),
            (b"x-content-type", None),
            (b"", None),
            // The length of a known name, another name; and CR where the name has `-`.
            (b"connectiox", None),
            (b"keep_alive", None),
            (b"keep\ralive", None),
            (b"content-typf", None),
            (b"Dat", None),
        ] {
            assert_eq!(known_name(name), known, "{}", String::from_utf8_lossy(name));
        }
        for (k, (ax_name, name)) in KNOWN.iter().enumerate() {
            assert_eq!(ax_name.as_str(), name.as_str());
            let known = known_name(name.as_str().to_ascii_uppercase().as_bytes());
            assert_eq!(known.map(|k| k as usize), Some(k), "{name}");
        }
    }
}
