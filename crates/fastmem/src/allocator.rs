//! mimalloc as the global allocator, asking for an alignment only when `malloc`'s would not do.
//!
//! The `mimalloc` crate passes every layout to `mi_malloc_aligned`. In mimalloc 3 that is fast
//! for blocks up to 1 KiB that happen to be aligned, but a larger block whose size is not a
//! power of two takes the over-allocating path (about 400 instructions): the gateway's request
//! future, some 6 KiB, did so on every request. mimalloc aligns every block of 16 bytes or more
//! to 16 (`MI_MAX_ALIGN_SIZE`, as C's `malloc` must), and smaller blocks to their size class (a
//! multiple of 8), so a layout whose alignment is at most 16 and at most its size is served by
//! `mi_malloc` as it is, as the standard library's `System` allocator does with `malloc`.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// What every block of mimalloc's is aligned to, at least, once it is this large.
const MALLOC_ALIGN: usize = 16;

/// The global allocator: `#[global_allocator] static A: fastmem::Mimalloc = fastmem::Mimalloc;`.
pub struct Mimalloc;

/// Whether `mi_malloc` alone gives `size` bytes aligned to `align`.
#[inline(always)]
fn plain(size: usize, align: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: each method passes its layout's size and, where `mi_malloc` would not honour it, its
// alignment to mimalloc, which returns null on failure; every block is freed by `mi_free`,
// whichever function allocated it.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into mimalloc.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into mimalloc.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller's: `ptr` came from this allocator.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's: `ptr` came from this allocator with `layout`.
        unsafe {
            if plain(new_size, layout.align()) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: &[usize] = &[
        1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 40, 48, 56, 64, 72, 80, 96, 100, 128, 136,
        1000, 1024, 1032, 1040, 4096, 5920, 6000, 65536, 100_000, 1_048_576,
    ];
    const ALIGNS: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 4096];

    /// Many blocks of each layout at once (so that not only a page's first block is seen), each
    /// aligned, writable over its whole size, freed without harm.
    #[test]
    fn every_block_has_its_layouts_alignment_and_size() {
        let a = Mimalloc;
        for &size in SIZES {
            for &align in ALIGNS {
                let layout = Layout::from_size_align(size, align).unwrap();
                let n = if size > 10_000 { 3 } else { 40 };
                let blocks: Vec<*mut u8> = (0..n)
                    .map(|i| {
                        // SAFETY: a non-zero size.
                        let p = unsafe { a.alloc(layout) };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        // SAFETY: the block is `size` bytes.
                        unsafe { core::ptr::write_bytes(p, i as u8, size) };
                        p
                    })
                    .collect();
                for (i, &p) in blocks.iter().enumerate() {
                    // SAFETY: each block is `size` bytes, written above.
                    let bytes = unsafe { core::slice::from_raw_parts(p, size) };
                    assert!(bytes.iter().all(|&b| b == i as u8), "blocks overlap");
                    // SAFETY: allocated above with `layout`.
                    unsafe { a.dealloc(p, layout) };
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_and_aligned() {
        let a = Mimalloc;
        for &size in SIZES {
            for &align in ALIGNS {
                let layout = Layout::from_size_align(size, align).unwrap();
                // Dirty memory first, so that a reused block would show.
                // SAFETY: a non-zero size; the block is written then freed.
                unsafe {
                    let d = a.alloc(layout);
                    core::ptr::write_bytes(d, 0xAB, size);
                    a.dealloc(d, layout);
                }
                // SAFETY: a non-zero size.
                let p = unsafe { a.alloc_zeroed(layout) };
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                // SAFETY: the block is `size` bytes.
                let bytes = unsafe { core::slice::from_raw_parts(p, size) };
                assert!(bytes.iter().all(|&b| b == 0), "size {size} align {align}");
                // SAFETY: allocated above with `layout`.
                unsafe { a.dealloc(p, layout) };
            }
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_and_the_alignment_growing_and_shrinking() {
        let a = Mimalloc;
        for &align in ALIGNS {
            let mut layout = Layout::from_size_align(8, align).unwrap();
            // SAFETY: a non-zero size.
            let mut p = unsafe { a.alloc(layout) };
            // SAFETY: 8 bytes.
            unsafe { core::ptr::copy_nonoverlapping(b"rustygat".as_ptr(), p, 8) };
            for &size in SIZES.iter().chain([40usize, 8, 3].iter()) {
                // SAFETY: `p` came from `a` with `layout`; a non-zero new size.
                p = unsafe { a.realloc(p, layout, size) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                let keep = size.min(8);
                // SAFETY: at least `keep` bytes.
                let head = unsafe { core::slice::from_raw_parts(p, keep) };
                assert_eq!(head, &b"rustygat"[..keep], "size {size} align {align}");
                layout = Layout::from_size_align(size, align).unwrap();
                if size < 8 {
                    break;
                }
            }
            // SAFETY: allocated above with `layout`.
            unsafe { a.dealloc(p, layout) };
        }
    }
}
