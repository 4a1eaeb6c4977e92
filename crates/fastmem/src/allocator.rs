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

/// `mi_option_allow_thp` in mimalloc 3's `mi_option_e`.
pub(crate) const MI_OPTION_ALLOW_THP: core::ffi::c_int = 43;

// mimalloc's option functions, which the -sys crate declares only with its `extended` feature
// (and a dependency for C types that `core::ffi` has).
unsafe extern "C" {
    fn mi_option_set_default(option: core::ffi::c_int, value: core::ffi::c_long);
    fn mi_option_get(option: core::ffi::c_int) -> core::ffi::c_long;
}

/// Whether mimalloc may use transparent huge pages: `false` unless `MIMALLOC_ALLOW_THP=1`.
///
/// A binary must call it (the gateway logs it at start-up): that is what links the object
/// holding the start-up hook (`THP_OFF_BY_DEFAULT`). The allocator's methods are all inlined
/// into their callers, so without a call into this crate the linker leaves that object, and
/// the hook in it, out (as the release build with fat LTO did: THP stayed on).
#[inline(never)]
pub fn transparent_huge_pages() -> bool {
    // SAFETY: reads one of mimalloc's options.
    unsafe { mi_option_get(MI_OPTION_ALLOW_THP) != 0 }
}

/// Transparent huge pages off unless `MIMALLOC_ALLOW_THP=1` says otherwise. mimalloc 3 allows
/// them by default and `madvise(MADV_HUGEPAGE)`s its 1 GiB arena, so under the common `madvise`
/// THP setting every touched 4 KiB became a 2 MiB page: the gateway's idle RSS was 24 MiB
/// instead of 13, each idle connection cost half as much again, and an idle process grew from
/// 80 to 142 MiB in 90 s as khugepaged collapsed pages. With the option off, mimalloc also
/// turns THP off for the process (`prctl(PR_SET_THP_DISABLE)`) when it starts.
///
/// mimalloc reads its options and sets up its arena in a constructor that runs before `main`
/// (and before any allocation), so the default is changed in one that runs before it: the
/// linker orders `.init_array.NNNNN` by priority, ahead of unnumbered constructors (gcc's
/// default) and of clang's priority 101; 100 is after the standard library's 99, which only
/// records the arguments. `mi_option_set_default` leaves the environment variable in charge.
extern "C" fn thp_off_by_default() {
    // SAFETY: writes the default of one of mimalloc's options, a static table; mimalloc reads
    // it when it starts, later in this same thread.
    unsafe { mi_option_set_default(MI_OPTION_ALLOW_THP, 0) }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static THP_OFF_BY_DEFAULT: extern "C" fn() = thp_off_by_default;

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

    /// THP is off before mimalloc starts: the option reads 0, and the kernel says THP is
    /// disabled for this process (which mimalloc does only if the option was 0 when it started,
    /// before `main`). Run with `MIMALLOC_ALLOW_THP=1` (the child below), the variable wins.
    #[test]
    #[cfg(target_os = "linux")]
    fn transparent_huge_pages_are_off_unless_the_environment_allows_them() {
        let allowed = std::env::var("MIMALLOC_ALLOW_THP").ok();
        // SAFETY: reads one of mimalloc's options.
        let option = unsafe { mi_option_get(MI_OPTION_ALLOW_THP) };
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        // `THP_enabled:` is there since Linux 5.0; 0 once `PR_SET_THP_DISABLE` is set.
        let kernel = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(str::trim);
        if allowed.as_deref() == Some("1") {
            println!("child: option {option}, THP_enabled {kernel:?}");
            assert_eq!(option, 1, "MIMALLOC_ALLOW_THP=1 turns them back on");
            return;
        }
        assert_eq!(option, 0, "mimalloc's allow_thp option");
        if let Some(k) = kernel {
            assert_eq!(k, "0", "THP_enabled in /proc/self/status");
        }
        // The override, in a child process (mimalloc reads the variable when it starts).
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "allocator::tests::transparent_huge_pages_are_off_unless_the_environment_allows_them",
                "--nocapture",
            ])
            .env("MIMALLOC_ALLOW_THP", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("child: option 1"), "{text}");
    }

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
