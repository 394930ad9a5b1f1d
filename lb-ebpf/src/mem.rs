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

/// Copies a MAC address as a 4-byte and a 2-byte word: a copy of `[u8; 6]`, whose alignment
/// is 1, is expanded byte by byte (six loads, six stores), even with misaligned access
/// allowed (see lb-userspace's build script).
///
/// # Safety
/// Both pointers are valid for six bytes of packet or map memory (not the stack, where the
/// verifier refuses misaligned access) and do not overlap.
#[inline(always)]
pub unsafe fn copy_mac(dst: *mut [u8; 6], src: *const [u8; 6]) {
    let (dst, src) = (dst.cast::<u8>(), src.cast::<u8>());
    // SAFETY: the caller's contract; unaligned reads and writes of bytes 0-3 and 4-5.
    unsafe {
        dst.cast::<u32>().write_unaligned(src.cast::<u32>().read_unaligned());
        dst.add(4).cast::<u16>().write_unaligned(src.add(4).cast::<u16>().read_unaligned());
    }
}

/// Writes an address held as four raw words into a header's 16 bytes, as four 4-byte stores:
/// assigning a `[u8; 16]` (alignment 1) is expanded into sixteen byte stores and the shifts
/// feeding them.
///
/// # Safety
/// `dst` is packet memory (not the stack, where the verifier refuses misaligned access).
#[inline(always)]
pub unsafe fn put_addr(dst: &mut [u8; 16], words: &[u32; 4]) {
    let dst = dst.as_mut_ptr();
    for (i, word) in words.iter().enumerate() {
        // SAFETY: the caller's contract; unaligned writes of bytes 4i to 4i+3 of 16.
        unsafe { dst.add(4 * i).cast::<u32>().write_unaligned(*word) };
    }
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
