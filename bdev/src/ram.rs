//! A RAM-backed device, thin: memory is taken per chunk on first write and
//! given back when a whole chunk is deallocated. For tests and benchmarks.

use std::sync::{Arc, RwLock};

use crate::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};

/// Bytes per independently locked and allocated chunk.
const CHUNK: usize = 64 * 1024;

/// A RAM disk. Clones share the same memory.
#[derive(Clone)]
pub struct RamDevice {
    inner: Arc<Inner>,
}

struct Inner {
    info: DeviceInfo,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl RamDevice {
    /// A device of `num_blocks` blocks of `block_size` bytes, all zeros.
    ///
    /// # Panics
    /// If `block_size` is not 512 or 4096.
    pub fn new(block_size: u32, num_blocks: u64) -> Self {
        assert!(
            block_size == 512 || block_size == 4096,
            "unsupported block size {block_size}"
        );
        let size = num_blocks * u64::from(block_size);
        let n = usize::try_from(size.div_ceil(CHUNK as u64)).expect("RAM device too large");
        RamDevice {
            inner: Arc::new(Inner {
                info: DeviceInfo {
                    block_size,
                    num_blocks,
                    volatile_write_cache: false,
                    dealloc_reads_zeroes: true,
                },
                chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            }),
        }
    }

    /// Bytes of memory currently holding data.
    pub fn allocated_bytes(&self) -> u64 {
        let n = self
            .inner
            .chunks
            .iter()
            .filter(|c| c.read().expect("poisoned").is_some())
            .count();
        (n * CHUNK) as u64
    }

    /// Visits the chunk pieces covering `len` bytes at byte offset `off`:
    /// `(chunk index, offset in chunk, offset in the I/O, length)`.
    fn pieces(off: u64, len: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done == len {
                return None;
            }
            let pos = off + done as u64;
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(len - done);
            let piece = (idx, within, done, n);
            done += n;
            Some(piece)
        })
    }

    fn read_sync(&self, lba: u64, buf: &mut [u8]) -> Result<(), BdevError> {
        self.inner.info.check_buf(lba, buf.len())?;
        let off = lba * u64::from(self.inner.info.block_size);
        for (idx, within, at, n) in Self::pieces(off, buf.len()) {
            let chunk = self.inner.chunks[idx].read().expect("poisoned");
            match chunk.as_deref() {
                Some(data) => buf[at..at + n].copy_from_slice(&data[within..within + n]),
                None => buf[at..at + n].fill(0),
            }
        }
        Ok(())
    }

    fn write_sync(&self, lba: u64, data: Option<&[u8]>, len: usize) -> Result<(), BdevError> {
        self.inner.info.check_buf(lba, len)?;
        let off = lba * u64::from(self.inner.info.block_size);
        for (idx, within, at, n) in Self::pieces(off, len) {
            let mut chunk = self.inner.chunks[idx].write().expect("poisoned");
            match data {
                Some(src) => {
                    let dst = chunk.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
                    dst[within..within + n].copy_from_slice(&src[at..at + n]);
                }
                None if n == CHUNK => *chunk = None,
                None => {
                    if let Some(dst) = chunk.as_deref_mut() {
                        dst[within..within + n].fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    fn zero_sync(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.inner.info.check_range(lba, blocks)?;
        let bytes = blocks * u64::from(self.inner.info.block_size);
        let len = usize::try_from(bytes).map_err(|_| BdevError::OutOfRange {
            lba,
            blocks,
            capacity: self.inner.info.num_blocks,
        })?;
        if len == 0 {
            return Ok(());
        }
        self.write_sync(lba, None, len)
    }
}

impl BlockDevice for RamDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info.clone()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(self.clone()))
    }
}

impl IoChannel for RamDevice {
    fn read(&self, lba: u64, mut buf: IoBuf) -> IoFuture<'_, BufResult> {
        let r = self.read_sync(lba, buf.as_mut_slice());
        Box::pin(std::future::ready((r, buf)))
    }

    fn write(&self, lba: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, BufResult> {
        let r = self.write_sync(lba, Some(buf.as_slice()), buf.len());
        Box::pin(std::future::ready((r, buf)))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(std::future::ready(self.zero_sync(lba, blocks)))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(std::future::ready(self.zero_sync(lba, blocks)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn writes_read_back_across_chunks_and_zeroes_release_memory() {
        let dev = RamDevice::new(512, 1024); // 512 KiB, 8 chunks
        let ch = dev.open_channel().unwrap();
        block_on(async {
            let pattern: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
            let (r, _) = ch.write(100, IoBuf::from_slice(&pattern), false).await;
            r.unwrap();
            let (r, back) = ch.read(100, IoBuf::zeroed(pattern.len())).await;
            r.unwrap();
            assert_eq!(back.as_slice(), &pattern[..]);
            // Unwritten space reads as zeros.
            let (r, z) = ch.read(900, IoBuf::zeroed(512)).await;
            r.unwrap();
            assert!(z.iter().all(|&b| b == 0));
            ch.deallocate(0, 1024).await.unwrap();
            assert_eq!(dev.allocated_bytes(), 0);
            let (_, back) = ch.read(100, IoBuf::zeroed(4096)).await;
            assert!(back.iter().all(|&b| b == 0));
            let (r, _) = ch.read(1020, IoBuf::zeroed(4096)).await;
            assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
        });
    }
}
