//! Header values of small numbers without an allocation: the decimal digits of 0 to 9,999
//! written once, at compile time, into one static table that each value points into (a value
//! formatted at run time takes a heap allocation for its bytes).

use actix_http::header::HeaderValue;
use bytes::Bytes;

/// Numbers below this come from the table.
const SMALL: u64 = 10_000;

/// 0-9, 10-99, 100-999 and 1,000-9,999, written one after the other.
const LEN: usize = 10 + 90 * 2 + 900 * 3 + 9_000 * 4;

static DIGITS: [u8; LEN] = table();

const fn width(n: usize) -> usize {
    match n {
        0..10 => 1,
        10..100 => 2,
        100..1_000 => 3,
        _ => 4,
    }
}

/// Where `n`'s digits start in [`DIGITS`].
const fn offset(n: usize) -> usize {
    match n {
        0..10 => n,
        10..100 => 10 + 2 * (n - 10),
        100..1_000 => 190 + 3 * (n - 100),
        _ => 2_890 + 4 * (n - 1_000),
    }
}

const fn table() -> [u8; LEN] {
    let mut out = [0u8; LEN];
    let mut n = 0;
    while n < SMALL as usize {
        let (at, w) = (offset(n), width(n));
        let (mut i, mut v) = (w, n);
        while i > 0 {
            i -= 1;
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        n += 1;
    }
    out
}

/// `n` in decimal, as a header value: from the static table below 10,000 (no allocation),
/// formatted above.
pub fn header_value(n: u64) -> HeaderValue {
    if n < SMALL {
        let n = n as usize;
        let digits = Bytes::from_static(&DIGITS[offset(n)..offset(n) + width(n)]);
        if let Ok(v) = HeaderValue::from_maybe_shared(digits) {
            return v;
        }
    }
    HeaderValue::from(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_reads_as_itself() {
        for n in (0..12_000).chain([u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(header_value(n).to_str().unwrap(), n.to_string());
        }
    }
}
