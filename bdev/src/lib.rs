//! Block devices: the one trait every Cairn data-path layer speaks.
//!
//! A [`BlockDevice`] is shared (`Send + Sync`) and describes a device; the I/O
//! itself goes through an [`IoChannel`], which a reactor opens for itself and
//! never shares with another thread (one NVMe queue, one channel). Channels
//! take and give back owned, aligned [`IoBuf`]s so that io_uring can work on
//! them without copies: a buffer read from a socket is the buffer written to
//! the disk.
//!
//! Backends: [`ram::RamDevice`] (tests and benchmarks) and
//! [`file::FileDevice`] (a file or block device through io_uring with
//! `O_DIRECT`, or inline copies on tmpfs). Pools, replicas and the nexus
//! implement the same trait. Disks are named by [`uri::DiskUri`]; RAM disks
//! by name live in [`malloc`].

pub mod blocking;
pub mod buf;
pub mod error;
pub mod file;
pub mod malloc;
pub mod ram;
pub mod uri;

use std::future::Future;
use std::pin::Pin;

pub use buf::IoBuf;
pub use error::BdevError;

/// A future returned by an [`IoChannel`]; channels are thread-local, so the
/// future need not be `Send`.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The result of an I/O that borrowed a buffer: the buffer always comes back.
pub type BufResult = (Result<(), BdevError>, IoBuf);

/// What a device is: its geometry and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
    /// Whether the device has a volatile write cache (flush means something).
    pub volatile_write_cache: bool,
    /// Whether deallocated blocks read back as zeros.
    pub dealloc_reads_zeroes: bool,
}

impl DeviceInfo {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * u64::from(self.block_size)
    }

    /// Checks that `blocks` blocks starting at `lba` lie inside the device.
    pub fn check_range(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.num_blocks => Ok(()),
            _ => Err(BdevError::OutOfRange {
                lba,
                blocks,
                capacity: self.num_blocks,
            }),
        }
    }

    /// Checks a buffer length for I/O at `lba` and returns its length in blocks.
    pub fn check_buf(&self, lba: u64, len: usize) -> Result<u64, BdevError> {
        let bs = self.block_size as usize;
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(BdevError::Misaligned {
                len,
                block_size: self.block_size,
            });
        }
        let blocks = (len / bs) as u64;
        self.check_range(lba, blocks)?;
        Ok(blocks)
    }
}

/// A block device, shared by every reactor that serves it.
pub trait BlockDevice: Send + Sync + 'static {
    /// Geometry and identity.
    fn info(&self) -> DeviceInfo;

    /// Opens a channel for I/O from the calling thread. Call it on the reactor
    /// that will use the channel; io_uring backends bind to that reactor.
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError>;

    /// Re-reads the device's geometry where it can change underneath (a
    /// remote namespace that grew). May block; call it from a control
    /// thread. Local devices know their size already.
    fn refresh(&self) -> Result<(), BdevError> {
        Ok(())
    }

    /// An id that changes whenever the device may have lost writes it
    /// completed (its pool was opened again: an engine restart, a power
    /// loss); `None` for a device that keeps none. A mirror compares it
    /// when a child comes back.
    fn incarnation(&self) -> Option<u64> {
        None
    }
}

/// The I/O path of a device on one thread. Offsets are in logical blocks; the
/// length of a read or write is the buffer's length, a multiple of the block
/// size.
pub trait IoChannel {
    /// Reads `buf.len()` bytes at `lba` into `buf`.
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult>;

    /// Writes `buf` at `lba`. With `fua` the data is durable when this
    /// completes, as if a flush had followed.
    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>>;

    /// Makes `blocks` blocks at `lba` read as zeros.
    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>>;

    /// Tells the device that `blocks` blocks at `lba` are no longer needed;
    /// afterwards they read as zeros if `dealloc_reads_zeroes` is set.
    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            block_size: 512,
            num_blocks: 100,
            volatile_write_cache: false,
            dealloc_reads_zeroes: true,
        }
    }

    #[test]
    fn range_checks_reject_overflow_and_past_end() {
        let i = info();
        assert!(i.check_range(0, 100).is_ok());
        assert!(i.check_range(99, 1).is_ok());
        assert!(matches!(
            i.check_range(99, 2),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            i.check_range(u64::MAX, 2),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            i.check_buf(0, 0),
            Err(BdevError::Misaligned { .. })
        ));
        assert!(matches!(
            i.check_buf(0, 513),
            Err(BdevError::Misaligned { .. })
        ));
        assert_eq!(i.check_buf(10, 1024).unwrap(), 2);
    }
}
