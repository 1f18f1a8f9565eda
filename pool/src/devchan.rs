//! The reactor-side channel to the pool's device.
//!
//! It shares the open file description of the pool's control handle (a
//! `dup`), which holds the pool's `flock`. io_uring keeps a reference to
//! that description for every request in flight, so the lock outlives a
//! killed engine until its last write has landed: a new import can never
//! read metadata that a dead process is still writing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use cairn_bdev::{BdevError, BufResult, IoBuf, IoChannel, IoFuture};

use crate::format::BLOCK_SIZE;

/// `BLKZEROOUT`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

pub(crate) struct DevChannel {
    file: monoio::fs::File,
    fd: RawFd,
    is_block: bool,
}

impl DevChannel {
    /// Wraps a `dup` of the pool's device handle; call on the reactor that
    /// will use it.
    pub(crate) fn new(file: std::fs::File, is_block: bool) -> Result<Self, BdevError> {
        let fd = file.as_raw_fd();
        let file = monoio::fs::File::from_std(file).map_err(|e| BdevError::io("register", e))?;
        Ok(DevChannel { file, fd, is_block })
    }

    /// Reads at `lba`; what [`IoChannel::read`] boxes, awaited directly on
    /// the replica's data path.
    pub(crate) async fn read_at(&self, lba: u64, buf: IoBuf) -> BufResult {
        cairn_bdev::file::read_at(&self.file, lba * u64::from(BLOCK_SIZE), buf).await
    }

    /// Writes at `lba`, durably with `fua`; what [`IoChannel::write`] boxes.
    pub(crate) async fn write_at(&self, lba: u64, buf: IoBuf, fua: bool) -> BufResult {
        cairn_bdev::file::write_at(&self.file, lba * u64::from(BLOCK_SIZE), buf, fua).await
    }

    fn zero(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        if blocks == 0 {
            return Ok(());
        }
        let off = lba * u64::from(BLOCK_SIZE);
        let len = blocks * u64::from(BLOCK_SIZE);
        let ok = if self.is_block {
            let range: [u64; 2] = [off, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (offset, length) through
            // the pointer, which points at a live local; the descriptor is
            // open for as long as `self.file`.
            unsafe { libc::ioctl(self.fd, BLKZEROOUT, range.as_ptr()) == 0 }
        } else {
            match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
                (Ok(o), Ok(l)) => {
                    // SAFETY: fallocate takes plain integers; the descriptor
                    // is open for as long as `self.file`.
                    unsafe {
                        libc::fallocate(
                            self.fd,
                            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                            o,
                            l,
                        ) == 0
                    }
                }
                _ => false,
            }
        };
        if ok {
            Ok(())
        } else {
            Err(BdevError::io("write zeroes", io::Error::last_os_error()))
        }
    }
}

impl IoChannel for DevChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(self.read_at(lba, buf))
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(self.write_at(lba, buf, fua))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(async move {
            self.file
                .sync_data()
                .await
                .map_err(|e| BdevError::io("fdatasync", e))
        })
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(std::future::ready(self.zero(lba, blocks)))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(std::future::ready(self.zero(lba, blocks)))
    }
}
