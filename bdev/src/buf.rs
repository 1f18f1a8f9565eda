//! Owned, page-aligned I/O buffers.
//!
//! `O_DIRECT` needs buffers aligned to the device's logical block size, and
//! io_uring needs buffers it can own while the kernel works on them. An
//! [`IoBuf`] is both: a heap allocation aligned to [`ALIGN`] whose length can
//! shrink and grow within its capacity without reallocating, so one buffer
//! can be received into from a socket, written to a disk and reused.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size Cairn supports.
pub const ALIGN: usize = 4096;

/// An owned, `ALIGN`-aligned byte buffer. Bytes up to `capacity` are always
/// initialised (zeroed on allocation), so any length up to the capacity is
/// valid to read.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>; moving it to
// another thread moves that ownership.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out `&[u8]`, which is Sync.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows a Layout");
        // SAFETY: `layout` has a non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = IoBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of [`ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length. Bytes past the old length keep whatever they held
    /// (zeros, or earlier data); they are always initialised.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf length {len} exceeds capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, and &mut self
        // guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Fills the buffer with zeros.
    pub fn zero(&mut self) {
        self.as_mut_slice().fill(0);
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at alloc");
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf::from_slice(self.as_slice())
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

// SAFETY: read_ptr points at `bytes_init()` initialised bytes that stay valid
// and unmoved while the buffer is owned by an in-flight operation (the heap
// allocation does not move when the IoBuf value moves).
unsafe impl monoio::buf::IoBuf for IoBuf {
    fn read_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: write_ptr points at `bytes_total()` writable bytes of our own
// allocation; the heap allocation does not move with the IoBuf value.
unsafe impl monoio::buf::IoBufMut for IoBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The kernel fills the buffer up to its current length: callers size a
    /// buffer with [`IoBuf::set_len`] before reading into it.
    fn bytes_total(&mut self) -> usize {
        self.len
    }

    unsafe fn set_init(&mut self, _pos: usize) {
        // Every byte up to the capacity is always initialised, and the length
        // is chosen by the caller before the read, so nothing changes here.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable() {
        let mut b = IoBuf::zeroed(100);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 100);
        assert_eq!(b.capacity(), ALIGN);
        assert!(b.iter().all(|&x| x == 0));
        b[99] = 7;
        b.set_len(ALIGN);
        assert_eq!(b[99], 7);
        assert_eq!(b[ALIGN - 1], 0);
        let c = b.clone();
        assert_eq!(c.as_slice(), b.as_slice());
    }

    #[test]
    #[should_panic(expected = "exceeds capacity")]
    fn set_len_past_capacity_panics() {
        IoBuf::zeroed(10).set_len(ALIGN + 1);
    }
}
