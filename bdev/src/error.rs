//! Block device errors. The NVMe-oF target maps each to one NVMe status, in
//! one place; nothing here knows about the wire.

use std::io;

/// Why a block device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// The range does not fit in the device.
    #[error("blocks {lba}..+{blocks} lie outside a device of {capacity} blocks")]
    OutOfRange {
        lba: u64,
        blocks: u64,
        capacity: u64,
    },
    /// The buffer is not a non-zero multiple of the block size.
    #[error("length {len} is not a non-zero multiple of the block size {block_size}")]
    Misaligned { len: usize, block_size: u32 },
    /// A thin device could not get space for a write.
    #[error("no space left to allocate for this write")]
    NoSpace,
    /// The device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The device is gone or faulted (a nexus with no healthy child, a
    /// remote replica that disconnected).
    #[error("device unavailable: {reason}")]
    Unavailable { reason: String },
    /// The operation is not supported by this device.
    #[error("operation {op} is not supported by this device")]
    Unsupported { op: &'static str },
    /// Stored data failed its integrity check.
    #[error("data integrity check failed at block {lba}")]
    Integrity { lba: u64 },
    /// The operating system reported an error.
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl BdevError {
    /// Wraps an I/O error with the operation that caused it.
    pub fn io(op: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) => BdevError::NoSpace,
            Some(libc::EROFS) => BdevError::ReadOnly,
            _ => BdevError::Io { op, source },
        }
    }
}
