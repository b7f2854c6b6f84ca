//! Output buffers. Every kernel writes its output through `&mut [MaybeUninit<T>]` (an
//! *output slice*: written once per element, never read), so that the allocating tier can
//! hand the kernels memory that nobody initialized: [`filled`] allocates without zeroing,
//! and the caller-buffer tier passes its initialized buffers through [`out`]. Zeroing an
//! output first would be one more write pass over it: `calloc` clears a block that the
//! heap recycles (outputs up to glibc's 32 MB mmap threshold come back from the heap
//! after the first call), which made the allocating tier 0.3–1.0 ms slower than caller
//! buffers on the benchmark shapes S1–S4, and for 16-bit types `vec![zero; n]` writes
//! every element.
//!
//! A large fresh allocation comes from `mmap` (glibc does so above its threshold, at most
//! 32 MB), so every call of the allocating tier faults its output in page by page: about
//! 25 000 faults of 4 KiB for a 100 MB output, more time than the kernel. On Linux the
//! library asks for transparent huge pages on such buffers before their first touch
//! (`madvise(MADV_HUGEPAGE)`: 2 MiB pages, 512 times fewer faults). Callers who want no
//! faults at all reuse their buffers through the `_into` functions, and can allocate
//! those buffers the same way with [`zeroed_buffer`]: huge pages also spare the kernels
//! most of their TLB misses (the channels-first kernels visit each channel's rows all
//! over a large tensor).

use std::mem::MaybeUninit;

use crate::element::Element;

/// Buffers from this size on (bytes) get the huge-page advice.
const HUGE_MIN_BYTES: usize = 4 << 20;

/// An initialized buffer as an output slice for the kernels.
///
/// Writing through the result can only store initialized values of `T` (the kernels
/// write `MaybeUninit::new(v)` / `write(v)`, never `MaybeUninit::uninit()`), so `v` stays
/// initialized: the view is sound for every use the crate makes of it.
#[inline]
pub(crate) fn out<T>(v: &mut [T]) -> &mut [MaybeUninit<T>] {
    let len = v.len();
    // SAFETY: `MaybeUninit<T>` has the size, alignment and layout of `T`; the slice
    // covers the same `len` elements of the same exclusive borrow. What makes this
    // sound beyond the layout is the crate's rule stated above: output slices only
    // ever receive initialized values, so `v` is initialized again when the borrow ends.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<MaybeUninit<T>>(), len) }
}

/// A `Vec` of `n` elements written by `fill`, allocated without zeroing (huge pages from
/// 4 MB on, as [`zeroed_buffer`]). On `Err` the memory is freed and the error returned.
///
/// # Safety
/// When `fill` returns `Ok`, it must have written every one of the `n` elements of the
/// slice it was given (the kernels' contract: every element of an output is written
/// exactly once). On `Err` it may have written any of them, or none.
pub(crate) unsafe fn filled<T: Element, R, E>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]) -> Result<R, E>,
) -> Result<(Vec<T>, R), E> {
    let mut v: Vec<T> = empty_buffer(n);
    let r = fill(&mut v.spare_capacity_mut()[..n])?;
    // SAFETY: the capacity is at least `n`, and the caller guarantees that `fill`, having
    // returned `Ok`, initialized all `n` elements.
    unsafe { v.set_len(n) };
    Ok((v, r))
}

/// An empty `Vec` with room for `n` elements, not zeroed, backed by transparent huge pages
/// where the OS allows it (as [`zeroed_buffer`]): the allocation for an output that
/// [`forward_into_uninit`](crate::expert::forward_into_uninit) or
/// [`backward_into_uninit`](crate::expert::backward_into_uninit) writes through its
/// spare capacity. The allocating tier's outputs come from here.
///
/// ```
/// let v = bnorm::tuning::empty_buffer::<f32>(1 << 21); // room for 8 MB
/// assert!(v.is_empty() && v.capacity() >= 1 << 21);
/// ```
pub fn empty_buffer<T>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let spare = &mut v.spare_capacity_mut()[..n];
    advise_huge(spare.as_ptr().cast::<u8>(), std::mem::size_of_val(spare));
    v
}

/// A zeroed `Vec` of `n` elements for a large tensor, backed by transparent huge pages
/// where the OS allows it (Linux, from 4 MB on: `madvise(MADV_HUGEPAGE)` before the first
/// touch; elsewhere, or when the kernel declines, an ordinary allocation). A plain `Vec`
/// in every respect. Fewer page faults on first use and fewer TLB misses in every kernel
/// that walks the tensor: measured on a 2-core VM (commit 11d289a), the S5 backward
/// through `backward_into` ran about 12% faster on such buffers than on `vec!` ones.
///
/// ```
/// let mut x = bnorm::tuning::zeroed_buffer::<f32>(1 << 21); // 8 MB
/// assert!(x.iter().all(|&v| v == 0.0));
/// x[12345] = 1.0;
/// assert_eq!(x.iter().sum::<f32>(), 1.0);
/// ```
pub fn zeroed_buffer<T: Element>(n: usize) -> Vec<T> {
    // For f32 and f64 zero, `vec!` asks the allocator for zeroed memory, which a fresh
    // mapping already is: the pages stay untouched until the kernel writes them.
    let v = vec![T::from_f64(0.0); n];
    advise_huge(v.as_ptr().cast::<u8>(), std::mem::size_of_val(&v[..]));
    v
}

/// Asks the kernel to back the whole 4 KiB pages of the `bytes` bytes at `p` (inside one
/// live allocation) with huge pages (advice only: nothing changes if it cannot or will
/// not).
fn advise_huge(p: *const u8, bytes: usize) {
    if bytes < HUGE_MIN_BYTES {
        return;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = p;
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (p as usize).next_multiple_of(PAGE);
        let end = (p as usize + bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: `[start, end)` is a page-aligned range inside the caller's live
            // allocation; MADV_HUGEPAGE is advice about how to back the
            // range and changes neither its contents nor its validity.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_zeroed_and_usable() {
        for n in [0usize, 1, 1000, (HUGE_MIN_BYTES / 4) + 12_345] {
            let mut v = zeroed_buffer::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
            for (i, x) in v.iter_mut().enumerate() {
                *x = i as f32;
            }
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        let w = zeroed_buffer::<half::bf16>(HUGE_MIN_BYTES);
        assert!(w.iter().all(|x| x.to_f32() == 0.0));
    }

    #[test]
    fn filled_outputs_hold_what_was_written() {
        for n in [0usize, 1, 1000, (HUGE_MIN_BYTES / 4) + 12_345] {
            // SAFETY: the closure writes all `n` elements before returning `Ok`.
            let (v, r) = unsafe {
                filled::<f32, _, ()>(n, |o| {
                    assert_eq!(o.len(), n);
                    for (i, x) in o.iter_mut().enumerate() {
                        x.write(i as f32);
                    }
                    Ok(7)
                })
            }
            .unwrap();
            assert_eq!((v.len(), r), (n, 7));
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        // An error frees the memory and comes back unchanged, whatever was written.
        // SAFETY: `Err` asks nothing of the closure.
        let e = unsafe { filled::<half::bf16, (), _>(100, |o| Err(o.len())) };
        assert_eq!(e, Err(100));
    }

    #[test]
    fn out_views_write_through() {
        let mut v = vec![0.0f64; 5];
        for (i, x) in out(&mut v).iter_mut().enumerate() {
            x.write(i as f64 * 0.5);
        }
        assert_eq!(v, [0.0, 0.5, 1.0, 1.5, 2.0]);
    }
}
