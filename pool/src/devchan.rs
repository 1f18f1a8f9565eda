//! The reactor-side channel to the pool's device.
//!
//! It shares the open file description of the pool's control handle (a
//! `dup`), which holds the pool's `flock`. io_uring keeps a reference to
//! that description for every request in flight, so the lock outlives a
//! killed engine until its last write has landed: a new import can never
//! read metadata that a dead process is still writing.
//!
//! Reads and writes go through [`FileIo`]: io_uring, or inline copies when
//! the pool lives in memory (a file on tmpfs, a `malloc://` disk). Write
//! zeroes runs on the [`cairn_bdev::blocking`] pool, off the reactor.

use std::sync::Arc;

use cairn_bdev::file::{zero_or_discard_sync, FileIo, IoMode};
use cairn_bdev::{BdevError, BufResult, IoBuf, IoChannel, IoFuture};

use crate::format::BLOCK_SIZE;

pub(crate) struct DevChannel {
    io: FileIo,
    /// Another `dup`, for the calls that run on the blocking pool.
    ctl: Arc<std::fs::File>,
    is_block: bool,
}

impl DevChannel {
    /// Wraps a `dup` of the pool's device handle; call on the reactor that
    /// will use it.
    pub(crate) fn new(file: std::fs::File, is_block: bool) -> Result<Self, BdevError> {
        let ctl = Arc::new(file.try_clone().map_err(|e| BdevError::io("dup", e))?);
        let io = FileIo::new(file, IoMode::Auto)?;
        Ok(DevChannel { io, ctl, is_block })
    }

    /// Reads at `lba`; what [`IoChannel::read`] boxes, awaited directly on
    /// the replica's data path.
    pub(crate) async fn read_at(&self, lba: u64, buf: IoBuf) -> BufResult {
        self.io.read_at(lba * u64::from(BLOCK_SIZE), buf).await
    }

    /// Writes at `lba`, durably with `fua`; what [`IoChannel::write`] boxes.
    pub(crate) async fn write_at(&self, lba: u64, buf: IoBuf, fua: bool) -> BufResult {
        self.io
            .write_at(lba * u64::from(BLOCK_SIZE), buf, fua)
            .await
    }

    /// Makes `blocks` blocks at `lba` read as zeros, on the blocking pool.
    pub(crate) async fn zero(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        if blocks == 0 {
            return Ok(());
        }
        let off = lba * u64::from(BLOCK_SIZE);
        let len = blocks * u64::from(BLOCK_SIZE);
        let (ctl, is_block) = (self.ctl.clone(), self.is_block);
        cairn_bdev::blocking::run(move || zero_or_discard_sync(&ctl, is_block, off, len, false))
            .await
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
        Box::pin(self.io.sync_data())
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.zero(lba, blocks))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.zero(lba, blocks))
    }
}
