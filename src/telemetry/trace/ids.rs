//! Trace and span ids: random, never all zero, written as lowercase hex (W3C Trace Context).
//!
//! Ids come from a per-thread wyrand generator seeded once from the OS: a request costs a few
//! multiplications, not a syscall or a lock. Ids need to be unique, not unpredictable.

use std::cell::Cell;

/// A 16-byte trace id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SpanId(pub [u8; 8]);

thread_local! {
    static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// wyrand: 64 random bits.
fn next() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

impl TraceId {
    pub fn random() -> TraceId {
        loop {
            let (a, b) = (next(), next());
            if a | b != 0 {
                let mut out = [0; 16];
                out[..8].copy_from_slice(&a.to_be_bytes());
                out[8..].copy_from_slice(&b.to_be_bytes());
                return TraceId(out);
            }
        }
    }

    pub fn is_valid(&self) -> bool {
        self.0 != [0; 16]
    }

    /// The lowest 63 bits as the OpenTelemetry `TraceIdRatioBased` sampler reads them, so that
    /// a ratio decision is the same in every process that sees this trace.
    pub fn sampling_value(&self) -> u64 {
        let mut low = [0; 8];
        low.copy_from_slice(&self.0[8..]);
        u64::from_be_bytes(low) >> 1
    }

    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0; 32];
        encode(&self.0, &mut out);
        out
    }
}

impl SpanId {
    pub fn random() -> SpanId {
        loop {
            let a = next();
            if a != 0 {
                return SpanId(a.to_be_bytes());
            }
        }
    }

    pub fn is_valid(&self) -> bool {
        self.0 != [0; 8]
    }

    pub fn hex(&self) -> [u8; 16] {
        let mut out = [0; 16];
        encode(&self.0, &mut out);
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

/// Lowercase hex of exactly `N` bytes (uppercase is refused, as W3C Trace Context requires).
pub(crate) fn decode<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Hex as text; the bytes are always ASCII.
pub fn as_str(hex: &[u8]) -> &str {
    std::str::from_utf8(hex).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_valid_and_round_trip_through_hex() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let t = TraceId::random();
            let s = SpanId::random();
            assert!(t.is_valid() && s.is_valid());
            assert!(seen.insert(t.0), "a trace id came twice");
            assert_eq!(decode::<16>(&t.hex()), Some(t.0));
            assert_eq!(decode::<8>(&s.hex()), Some(s.0));
        }
        assert_eq!(decode::<8>(b"00F067aa0ba902b7"), None, "uppercase");
        assert_eq!(decode::<8>(b"00f067aa0ba902b"), None, "short");
        assert_eq!(decode::<8>(b"00f067aa0ba902bz"), None, "not hex");
    }
}
