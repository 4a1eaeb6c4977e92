//! The memory functions under RustyGate: the global allocator ([`Mimalloc`], every build) and
//! `memcpy`, `memmove`, `memcmp` and `bcmp` for the static musl build.
//!
//! musl's x86_64 `memcpy` moves single bytes up to an 8-byte boundary and after the last whole
//! word, around a `rep movsq` that takes tens of cycles to start (its `memmove` copies forward
//! with it); its `memcmp` compares a byte at a time, and `bcmp` is `memcmp`. A proxied request
//! makes about a hundred copies, most of them short (header names and values, futures' state
//! moved between owners): under load, `memcpy` was the gateway's largest user-space symbol on the
//! CPU, 7.7% and 9.2% of all its samples (kernel included) in two `perf` runs, and 2.2% with
//! these functions. musl's `memset` is kept: it stores small sizes in overlapping words and
//! large ones with `rep stosq` (0.5% of the samples, most of it actix-http zeroing a 3 KiB
//! header index four times per request).
//!
//! Here a short copy is two overlapping loads and stores of the widest size that fits, all loads
//! before any store (so every length up to 64 is also a correct `memmove`); a longer one is a
//! loop of 64-byte unaligned loads and stores, with the last 64 bytes read before the loop.
//! Comparisons go 8 bytes at a time, loaded big-endian so that integer order is byte order.
//!
//! The C symbols are exported only on x86_64 musl, where the static link takes them in place
//! of libc's (`memmove` too, as musl's calls into the object holding its `memcpy`, which would
//! then be linked beside this one). Elsewhere the crate is the plain functions, which the tests
//! check.
//!
//! `no_builtins`: LLVM must not turn these loops back into calls to the functions they define.
#![no_builtins]
#![cfg_attr(not(test), no_std)]

mod allocator;

pub use allocator::{Mimalloc, transparent_huge_pages};

#[cfg(target_arch = "x86_64")]
mod wide {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};

    pub type W = __m128i;

    #[inline(always)]
    pub unsafe fn load(p: *const u8) -> W {
        // SAFETY: the caller's: `p` is readable for 16 bytes. SSE2 is part of x86_64.
        unsafe { _mm_loadu_si128(p.cast()) }
    }

    #[inline(always)]
    pub unsafe fn store(p: *mut u8, v: W) {
        // SAFETY: the caller's: `p` is writable for 16 bytes.
        unsafe { _mm_storeu_si128(p.cast(), v) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod wide {
    use core::ptr::{read_unaligned, write_unaligned};

    pub type W = [u64; 2];

    #[inline(always)]
    pub unsafe fn load(p: *const u8) -> W {
        // SAFETY: the caller's: `p` is readable for 16 bytes.
        unsafe {
            [
                read_unaligned(p.cast::<u64>()),
                read_unaligned(p.add(8).cast::<u64>()),
            ]
        }
    }

    #[inline(always)]
    pub unsafe fn store(p: *mut u8, v: W) {
        // SAFETY: the caller's: `p` is writable for 16 bytes.
        unsafe {
            write_unaligned(p.cast::<u64>(), v[0]);
            write_unaligned(p.add(8).cast::<u64>(), v[1]);
        }
    }
}

use core::ptr::{read_unaligned, write_unaligned};
use wide::{load, store};

/// Copies `n` bytes of `src` to `dst`, ranges that may overlap only with `dst` before `src`
/// (as `memcpy`'s callers, which promise no overlap, and `memmove`'s forward case).
///
/// # Safety
/// `src` is readable and `dst` writable for `n` bytes; if they overlap, `dst <= src`.
#[inline(always)]
pub unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: every access below lies within the `n` bytes of `src` or `dst`.
    unsafe {
        if n <= 64 {
            return copy_short(dst, src, n);
        }
        // Read first: with `dst < src`, the loop may overwrite the source's last bytes.
        let tail = load4(src.add(n - 64));
        let mut i = 0;
        while i < n - 64 {
            store4(dst.add(i), load4(src.add(i)));
            i += 64;
        }
        store4(dst.add(n - 64), tail);
    }
}

/// Copies `n` bytes of `src` to `dst`, ranges that may overlap in any way.
///
/// # Safety
/// `src` is readable and `dst` writable for `n` bytes.
#[inline(always)]
pub unsafe fn copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's promise, and every access within the `n` bytes of `src` or `dst`.
    unsafe {
        // `dst` at or before `src`, or past its end: a forward copy reads each byte before
        // it is overwritten.
        if (dst as usize).wrapping_sub(src as usize) >= n {
            return copy_forward(dst, src, n);
        }
        if n <= 64 {
            return copy_short(dst, src, n);
        }
        // `dst` inside the source: from the end, with the first 64 bytes read first.
        let head = load4(src);
        let mut end = n;
        while end > 64 {
            store4(dst.add(end - 64), load4(src.add(end - 64)));
            end -= 64;
        }
        store4(dst, head);
    }
}

/// 64 bytes at `p`, in four loads (the loops' step).
#[inline(always)]
unsafe fn load4(p: *const u8) -> [wide::W; 4] {
    // SAFETY: the caller's: `p` is readable for 64 bytes.
    unsafe { [load(p), load(p.add(16)), load(p.add(32)), load(p.add(48))] }
}

#[inline(always)]
unsafe fn store4(p: *mut u8, v: [wide::W; 4]) {
    // SAFETY: the caller's: `p` is writable for 64 bytes.
    unsafe {
        store(p, v[0]);
        store(p.add(16), v[1]);
        store(p.add(32), v[2]);
        store(p.add(48), v[3]);
    }
}

/// Up to 64 bytes: every load before any store, so any overlap is copied right.
#[inline(always)]
unsafe fn copy_short(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's; each pair of accesses covers `[0, n)` from both ends.
    unsafe {
        if n > 32 {
            let a = load(src);
            let b = load(src.add(16));
            let c = load(src.add(n - 32));
            let d = load(src.add(n - 16));
            store(dst, a);
            store(dst.add(16), b);
            store(dst.add(n - 32), c);
            store(dst.add(n - 16), d);
        } else if n > 16 {
            let a = load(src);
            let b = load(src.add(n - 16));
            store(dst, a);
            store(dst.add(n - 16), b);
        } else if n >= 8 {
            copy_ends::<u64>(dst, src, n);
        } else if n >= 4 {
            copy_ends::<u32>(dst, src, n);
        } else if n >= 2 {
            copy_ends::<u16>(dst, src, n);
        } else if n == 1 {
            *dst = *src;
        }
    }
}

/// The first and the last `T` of `n` bytes (`size_of::<T>() <= n <= 2 * size_of::<T>()`, so the
/// two cover them all), both read before either is written.
#[inline(always)]
unsafe fn copy_ends<T>(dst: *mut u8, src: *const u8, n: usize) {
    let last = n - size_of::<T>();
    // SAFETY: the caller's: both accesses lie within the `n` bytes.
    unsafe {
        let a = read_unaligned(src.cast::<T>());
        let b = read_unaligned(src.add(last).cast::<T>());
        write_unaligned(dst.cast::<T>(), a);
        write_unaligned(dst.add(last).cast::<T>(), b);
    }
}

/// Compares `n` bytes of `a` and `b` as unsigned bytes: negative, zero or positive as `a`'s
/// first differing byte is below, absent or above `b`'s.
///
/// # Safety
/// `a` and `b` are readable for `n` bytes.
#[inline(always)]
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's; every read lies within the first `n` bytes.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            // Big-endian: the first byte is the most significant, so integer order is the
            // order of the first differing byte.
            let x = u64::from_be(read_unaligned(a.add(i).cast::<u64>()));
            let y = u64::from_be(read_unaligned(b.add(i).cast::<u64>()));
            if x != y {
                return if x < y { -1 } else { 1 };
            }
            i += 8;
        }
        while i < n {
            let (x, y) = (*a.add(i), *b.add(i));
            if x != y {
                return i32::from(x) - i32::from(y);
            }
            i += 1;
        }
        0
    }
}

/// Whether `n` bytes of `a` and `b` differ (non-zero) or not (zero).
///
/// # Safety
/// `a` and `b` are readable for `n` bytes.
#[inline(always)]
pub unsafe fn differ(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's; every read lies within the first `n` bytes.
    unsafe {
        if n >= 8 {
            // Words from the start, then the last word (overlapping the one before it).
            let mut i = 0;
            while i + 8 < n {
                if read_unaligned(a.add(i).cast::<u64>()) != read_unaligned(b.add(i).cast::<u64>())
                {
                    return 1;
                }
                i += 8;
            }
            let last = n - 8;
            return i32::from(
                read_unaligned(a.add(last).cast::<u64>())
                    != read_unaligned(b.add(last).cast::<u64>()),
            );
        }
        let mut i = 0;
        while i < n {
            if *a.add(i) != *b.add(i) {
                return 1;
            }
            i += 1;
        }
        0
    }
}

/// The C names, in place of musl's (see the module doc). Not on aarch64, where musl's `memcpy`
/// is ARM's optimized routine (its `memcmp` is the same byte loop: not measured there).
#[cfg(all(target_env = "musl", target_arch = "x86_64"))]
mod symbols {
    use core::ffi::{c_int, c_void};

    /// # Safety
    /// As C's `memcpy`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
        // SAFETY: C's contract: `n` bytes readable at `src`, writable at `dst`, no overlap.
        unsafe { super::copy_forward(dst.cast(), src.cast(), n) };
        dst
    }

    /// # Safety
    /// As C's `memmove`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memmove(
        dst: *mut c_void,
        src: *const c_void,
        n: usize,
    ) -> *mut c_void {
        // SAFETY: C's contract: `n` bytes readable at `src`, writable at `dst`.
        unsafe { super::copy(dst.cast(), src.cast(), n) };
        dst
    }

    /// # Safety
    /// As C's `memcmp`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcmp(a: *const c_void, b: *const c_void, n: usize) -> c_int {
        // SAFETY: C's contract: `n` bytes readable at `a` and `b`.
        unsafe { super::compare(a.cast(), b.cast(), n) }
    }

    /// # Safety
    /// As C's `bcmp`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bcmp(a: *const c_void, b: *const c_void, n: usize) -> c_int {
        // SAFETY: C's contract: `n` bytes readable at `a` and `b`.
        unsafe { super::differ(a.cast(), b.cast(), n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct bytes, so that a byte copied from the wrong place shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251 + 1) as u8).collect()
    }

    const LENS: &[usize] = &[
        0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 66, 95, 96, 97, 127,
        128, 129, 200, 255, 256, 257, 1000, 1023, 1024, 1025, 1031, 3072, 4099,
    ];

    #[test]
    fn copies_every_length_at_every_alignment_and_nothing_around_it() {
        let src = pattern(5000);
        for len in (0..300).chain(LENS.iter().copied()) {
            for s_off in 0..16 {
                for d_off in 0..16 {
                    let mut dst = vec![0xEEu8; len + 64];
                    // SAFETY: in bounds: `s_off + len <= 15 + 4099 < 5000`, `d_off + len` in `dst`.
                    unsafe {
                        copy_forward(dst.as_mut_ptr().add(d_off), src.as_ptr().add(s_off), len)
                    };
                    assert_eq!(
                        &dst[d_off..d_off + len],
                        &src[s_off..s_off + len],
                        "len {len}"
                    );
                    assert!(dst[..d_off].iter().all(|&b| b == 0xEE), "before, len {len}");
                    assert!(
                        dst[d_off + len..].iter().all(|&b| b == 0xEE),
                        "after, len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn moves_overlapping_ranges_in_both_directions_as_copy_within_does() {
        let base = pattern(9000);
        for &len in LENS {
            for shift in [
                -300i64, -65, -64, -33, -32, -17, -16, -9, -8, -1, 0, 1, 8, 9, 16, 17, 32, 33, 64,
                65, 300,
            ] {
                let mut got = base.clone();
                let mut want = base.clone();
                let from = 4000usize;
                let to = (from as i64 + shift) as usize;
                want.copy_within(from..from + len, to);
                // SAFETY: both ranges lie inside `got` (4000 ± 300 + 4099 < 9000).
                unsafe { copy(got.as_mut_ptr().add(to), got.as_ptr().add(from), len) };
                assert!(got == want, "len {len} shift {shift}");
            }
        }
    }

    #[test]
    fn compares_as_unsigned_bytes_with_the_first_difference_deciding() {
        let a = pattern(300);
        for len in 0..80 {
            // SAFETY: `len` bytes of both.
            assert_eq!(unsafe { compare(a.as_ptr(), a.as_ptr(), len) }, 0);
            assert_eq!(unsafe { differ(a.as_ptr(), a.as_ptr(), len) }, 0);
            for at in 0..len {
                for (x, y) in [(0x00u8, 0xFFu8), (0x7F, 0x80), (0x41, 0x42)] {
                    let (mut p, mut q) = (a.clone(), a.clone());
                    p[at] = x;
                    q[at] = y;
                    // A later difference the other way must not decide.
                    if at + 1 < len {
                        p[at + 1] = 0xFF;
                        q[at + 1] = 0x00;
                    }
                    // SAFETY: `len` bytes of each.
                    unsafe {
                        assert!(
                            compare(p.as_ptr(), q.as_ptr(), len) < 0,
                            "len {len} at {at}"
                        );
                        assert!(
                            compare(q.as_ptr(), p.as_ptr(), len) > 0,
                            "len {len} at {at}"
                        );
                        assert_ne!(differ(p.as_ptr(), q.as_ptr(), len), 0, "len {len} at {at}");
                        // Past the compared length, differences do not count.
                        assert_eq!(compare(p.as_ptr(), q.as_ptr(), at), 0);
                        assert_eq!(differ(p.as_ptr(), q.as_ptr(), at), 0);
                    }
                }
            }
        }
    }

    /// On musl the C names are these functions: the standard library's own copies and
    /// comparisons go through them.
    #[cfg(all(target_env = "musl", target_arch = "x86_64"))]
    #[test]
    fn the_c_names_are_these_functions() {
        unsafe extern "C" {
            fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8;
        }
        assert_eq!(
            memcpy as *const () as usize,
            symbols::memcpy as *const () as usize
        );
        let v = pattern(1000);
        let w = v.clone();
        assert_eq!(v, w);
        assert!(v.as_slice() < pattern(1001).as_slice());
    }
}
