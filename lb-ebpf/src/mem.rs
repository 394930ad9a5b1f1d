//! Copies and zeroing that stay inline.
//!
//! The BPF backend expands `memcpy` inline, but a plain assignment between two pointers
//! LLVM cannot prove disjoint (packet to map value, map value to map value) becomes a call to
//! `memmove`, and zeroing an array becomes a call to `memset`: both are byte loops from
//! `compiler_builtins`, several times slower than the whole lookup they serve. These helpers
//! keep every copy a `memcpy` and every zeroing a few volatile stores (which LLVM does not
//! merge back into a `memset`).

/// Copies `*src` to `*dst`.
///
/// # Safety
/// Both pointers are valid for a `T` (checked packet ranges or map values) and do not
/// overlap.
#[inline(always)]
pub unsafe fn copy<T>(dst: *mut T, src: *const T) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) };
}

/// Zeroes an address.
#[inline(always)]
pub fn zero_addr(dst: &mut [u32; 4]) {
    for word in dst.iter_mut() {
        // SAFETY: a valid, aligned reference.
        unsafe { core::ptr::write_volatile(word, 0) };
    }
}

/// Zeroes a MAC address.
#[inline(always)]
pub fn zero_mac(dst: &mut [u8; 6]) {
    for byte in dst.iter_mut() {
        // SAFETY: a valid reference.
        unsafe { core::ptr::write_volatile(byte, 0) };
    }
}
