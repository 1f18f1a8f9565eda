//! The nexus: one volume mirrored over N children.
//!
//! Writes, flushes, write-zeroes and deallocates go to every healthy child
//! and complete when all have; reads go to one healthy child, rotating so
//! that N children serve N times the reads of one. A child that fails an I/O
//! is faulted and leaves the rotation; the I/O completes from the others,
//! and fails only when no healthy child is left.
//!
//! Children are [`BlockDevice`]s: a local replica directly, or a remote one
//! through the NVMe/TCP initiator.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use cairn_bdev::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};
use futures::future::join_all;

/// A child's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildState {
    Healthy = 1,
    Faulted = 2,
}

/// One mirror leg.
pub struct Child {
    uri: String,
    device: Arc<dyn BlockDevice>,
    state: AtomicU8,
}

impl Child {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn state(&self) -> ChildState {
        if self.state.load(Ordering::Acquire) == ChildState::Healthy as u8 {
            ChildState::Healthy
        } else {
            ChildState::Faulted
        }
    }

    fn fault(&self, err: &BdevError) {
        if self.state.swap(ChildState::Faulted as u8, Ordering::AcqRel) == ChildState::Healthy as u8
        {
            tracing::warn!(child = %self.uri, error = %err, "nexus child faulted");
        }
    }
}

/// Why a nexus could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum NexusError {
    #[error("a nexus needs at least one child")]
    NoChildren,
    #[error("child {uri} has block size {got}, the nexus uses {want}")]
    BlockSize { uri: String, got: u32, want: u32 },
    #[error("child {uri} holds {got} bytes, the volume needs {want}")]
    TooSmall { uri: String, got: u64, want: u64 },
    #[error("a volume of {from} bytes cannot shrink to {to}")]
    Shrink { from: u64, to: u64 },
}

/// A mirrored volume.
pub struct Nexus {
    info: DeviceInfo,
    /// The volume's size in blocks; grows online (see [`Nexus::resize`]).
    num_blocks: Arc<AtomicU64>,
    children: Arc<Vec<Child>>,
}

impl Nexus {
    /// Assembles a nexus of `size_bytes` over `children` (uri, device).
    pub fn new(
        size_bytes: u64,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
    ) -> Result<Self, NexusError> {
        let first = children.first().ok_or(NexusError::NoChildren)?.1.info();
        let bs = first.block_size;
        for (uri, d) in &children {
            let i = d.info();
            if i.block_size != bs {
                return Err(NexusError::BlockSize {
                    uri: uri.clone(),
                    got: i.block_size,
                    want: bs,
                });
            }
            if i.size_bytes() < size_bytes {
                return Err(NexusError::TooSmall {
                    uri: uri.clone(),
                    got: i.size_bytes(),
                    want: size_bytes,
                });
            }
        }
        let info = DeviceInfo {
            block_size: bs,
            num_blocks: size_bytes / u64::from(bs),
            volatile_write_cache: children.iter().any(|(_, d)| d.info().volatile_write_cache),
            dealloc_reads_zeroes: children.iter().all(|(_, d)| d.info().dealloc_reads_zeroes),
        };
        let children = children
            .into_iter()
            .map(|(uri, device)| Child {
                uri,
                device,
                state: AtomicU8::new(ChildState::Healthy as u8),
            })
            .collect();
        Ok(Nexus {
            num_blocks: Arc::new(AtomicU64::new(info.num_blocks)),
            info,
            children: Arc::new(children),
        })
    }

    /// Grows the volume to `size_bytes`; every child must already hold that
    /// much. Open channels see the new size at once.
    pub fn resize(&self, size_bytes: u64) -> Result<(), NexusError> {
        for c in self.children.iter() {
            // A remote child learns its new size by asking again.
            if let Err(e) = c.device.refresh() {
                tracing::warn!(child = %c.uri, error = %e, "refreshing a child's size failed");
            }
            let got = c.device.info().size_bytes();
            if got < size_bytes {
                return Err(NexusError::TooSmall {
                    uri: c.uri.clone(),
                    got,
                    want: size_bytes,
                });
            }
        }
        let blocks = size_bytes / u64::from(self.info.block_size);
        let old = self.num_blocks.load(Ordering::Acquire);
        if blocks < old {
            return Err(NexusError::Shrink {
                from: old * u64::from(self.info.block_size),
                to: size_bytes,
            });
        }
        self.num_blocks.store(blocks, Ordering::Release);
        Ok(())
    }

    /// The children and their states.
    pub fn children(&self) -> &[Child] {
        &self.children
    }
}

impl BlockDevice for Nexus {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            num_blocks: self.num_blocks.load(Ordering::Acquire),
            ..self.info.clone()
        }
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let mut channels = Vec::with_capacity(self.children.len());
        for (i, c) in self.children.iter().enumerate() {
            if c.state() != ChildState::Healthy {
                continue;
            }
            match c.device.open_channel() {
                Ok(ch) => channels.push((i, ch)),
                Err(e) => c.fault(&e),
            }
        }
        if channels.is_empty() {
            return Err(no_child());
        }
        Ok(Box::new(NexusChannel {
            info: self.info.clone(),
            num_blocks: self.num_blocks.clone(),
            children: self.children.clone(),
            channels,
            next: Cell::new(0),
        }))
    }
}

fn no_child() -> BdevError {
    BdevError::Unavailable {
        reason: "no healthy child".into(),
    }
}

/// Whether an error says something about the child rather than the request.
fn is_child_failure(e: &BdevError) -> bool {
    matches!(
        e,
        BdevError::Io { .. } | BdevError::Unavailable { .. } | BdevError::Integrity { .. }
    )
}

struct NexusChannel {
    /// Geometry; `num_blocks` here is stale, the live size is `num_blocks`.
    info: DeviceInfo,
    num_blocks: Arc<AtomicU64>,
    children: Arc<Vec<Child>>,
    /// (index into `children`, channel) for children healthy at open time.
    channels: Vec<(usize, Box<dyn IoChannel>)>,
    next: Cell<usize>,
}

impl NexusChannel {
    fn geometry(&self) -> DeviceInfo {
        DeviceInfo {
            num_blocks: self.num_blocks.load(Ordering::Acquire),
            ..self.info.clone()
        }
    }

    fn healthy(&self) -> impl Iterator<Item = &(usize, Box<dyn IoChannel>)> {
        self.channels
            .iter()
            .filter(|(i, _)| self.children[*i].state() == ChildState::Healthy)
    }

    /// Folds per-child results: success if any healthy child succeeded and
    /// every failure was the child's own (it is faulted); a request error
    /// (out of range, no space) is the request's and is returned as is.
    fn settle(&self, results: Vec<(usize, Result<(), BdevError>)>) -> Result<(), BdevError> {
        let mut ok = false;
        let mut request_error = None;
        let mut last = None;
        for (i, r) in results {
            match r {
                Ok(()) => ok = true,
                Err(e) if is_child_failure(&e) => {
                    self.children[i].fault(&e);
                    last = Some(e);
                }
                Err(e) => request_error = Some(e),
            }
        }
        match (request_error, ok) {
            (Some(e), _) => Err(e),
            (None, true) => Ok(()),
            (None, false) => Err(last.unwrap_or_else(no_child)),
        }
    }

    async fn all<'a, F>(&'a self, op: F) -> Result<(), BdevError>
    where
        F: Fn(&'a dyn IoChannel) -> IoFuture<'a, Result<(), BdevError>>,
    {
        let futs: Vec<_> = self
            .healthy()
            .map(|(i, ch)| {
                let f = op(ch.as_ref());
                let i = *i;
                async move { (i, f.await) }
            })
            .collect();
        if futs.is_empty() {
            return Err(no_child());
        }
        self.settle(join_all(futs).await)
    }
}

impl IoChannel for NexusChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            let mut buf = buf;
            if let Err(e) = self.geometry().check_buf(lba, buf.len()) {
                return (Err(e), buf);
            }
            // Try healthy children in rotation until one answers.
            let n = self.channels.len();
            let start = self.next.get();
            self.next.set(start.wrapping_add(1));
            let mut last = None;
            for k in 0..n {
                let (i, ch) = &self.channels[(start + k) % n];
                if self.children[*i].state() != ChildState::Healthy {
                    continue;
                }
                let (r, b) = ch.read(lba, buf).await;
                buf = b;
                match r {
                    Ok(()) => return (Ok(()), buf),
                    Err(e) if is_child_failure(&e) => {
                        self.children[*i].fault(&e);
                        last = Some(e);
                    }
                    Err(e) => return (Err(e), buf),
                }
            }
            (Err(last.unwrap_or_else(no_child)), buf)
        })
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.geometry().check_buf(lba, buf.len()) {
                return (Err(e), buf);
            }
            let legs: Vec<&(usize, Box<dyn IoChannel>)> = self.healthy().collect();
            let Some((first, rest)) = legs.split_first() else {
                return (Err(no_child()), buf);
            };
            let (first_i, first_ch): (usize, &dyn IoChannel) = (first.0, first.1.as_ref());
            if rest.is_empty() {
                let (r, buf) = first_ch.write(lba, buf, fua).await;
                let r = self.settle(vec![(first_i, r)]);
                return (r, buf);
            }
            // Every other leg gets its own copy; the caller's buffer goes to
            // the first and comes back to the caller.
            let others: Vec<_> = rest
                .iter()
                .map(|(i, ch)| {
                    let copy = buf.clone();
                    let i: usize = *i;
                    async move { (i, ch.write(lba, copy, fua).await.0) }
                })
                .collect();
            let (first, others) = futures::join!(first_ch.write(lba, buf, fua), join_all(others));
            let (r0, buf) = first;
            let mut results = vec![(first_i, r0)];
            results.extend(others);
            (self.settle(results), buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.all(|ch| ch.flush()))
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(async move {
            self.geometry().check_range(lba, blocks)?;
            self.all(move |ch| ch.write_zeroes(lba, blocks)).await
        })
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(async move {
            self.geometry().check_range(lba, blocks)?;
            self.all(move |ch| ch.deallocate(lba, blocks)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_bdev::ram::RamDevice;

    /// A child whose I/O fails once switched off.
    struct Flaky {
        inner: RamDevice,
        broken: Arc<std::sync::atomic::AtomicBool>,
    }

    impl BlockDevice for Flaky {
        fn info(&self) -> DeviceInfo {
            self.inner.info()
        }
        fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
            Ok(Box::new(FlakyChannel {
                inner: self.inner.open_channel()?,
                broken: self.broken.clone(),
            }))
        }
    }

    struct FlakyChannel {
        inner: Box<dyn IoChannel>,
        broken: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FlakyChannel {
        fn err(&self) -> Option<BdevError> {
            self.broken
                .load(Ordering::SeqCst)
                .then(|| BdevError::io("test", std::io::Error::other("injected")))
        }
    }

    impl IoChannel for FlakyChannel {
        fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
            match self.err() {
                Some(e) => Box::pin(std::future::ready((Err(e), buf))),
                None => self.inner.read(lba, buf),
            }
        }
        fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
            match self.err() {
                Some(e) => Box::pin(std::future::ready((Err(e), buf))),
                None => self.inner.write(lba, buf, fua),
            }
        }
        fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
            self.inner.flush()
        }
        fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
            self.inner.write_zeroes(lba, blocks)
        }
        fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
            self.inner.deallocate(lba, blocks)
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn mirrors_writes_and_survives_a_failing_child() {
        let a = RamDevice::new(512, 2048);
        let b = RamDevice::new(512, 2048);
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flaky = Flaky {
            inner: b.clone(),
            broken: broken.clone(),
        };
        let nexus = Nexus::new(
            512 * 1024,
            vec![
                ("a".into(), Arc::new(a.clone())),
                ("b".into(), Arc::new(flaky)),
            ],
        )
        .unwrap();
        block_on(async {
            let ch = nexus.open_channel().unwrap();
            let data = IoBuf::from_slice(&[7u8; 4096]);
            let (r, _) = ch.write(8, data, false).await;
            r.unwrap();
            // Both legs hold the data.
            for leg in [&a, &b] {
                let c = leg.open_channel().unwrap();
                let (r, got) = c.read(8, IoBuf::zeroed(4096)).await;
                r.unwrap();
                assert!(got.iter().all(|&x| x == 7));
            }
            // Break one leg: writes and reads go on from the other.
            broken.store(true, Ordering::SeqCst);
            let (r, _) = ch.write(16, IoBuf::from_slice(&[9u8; 512]), false).await;
            r.unwrap();
            assert_eq!(nexus.children()[1].state(), ChildState::Faulted);
            for _ in 0..4 {
                let (r, got) = ch.read(16, IoBuf::zeroed(512)).await;
                r.unwrap();
                assert!(got.iter().all(|&x| x == 9));
            }
            // Request errors are the request's, not a child's.
            let (r, _) = ch.read(1024, IoBuf::zeroed(512)).await;
            assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
            assert_eq!(nexus.children()[0].state(), ChildState::Healthy);
        });
    }

    #[test]
    fn grows_online_within_its_children() {
        let a: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 2048));
        let nexus = Nexus::new(512 * 1024, vec![("a".into(), a)]).unwrap();
        block_on(async {
            let ch = nexus.open_channel().unwrap();
            let (r, _) = ch.write(1500, IoBuf::zeroed(512), false).await;
            assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
            nexus.resize(512 * 2048).unwrap();
            assert_eq!(nexus.info().num_blocks, 2048);
            let (r, _) = ch.write(1500, IoBuf::zeroed(512), false).await;
            r.unwrap();
        });
        assert!(matches!(
            nexus.resize(512 * 4096),
            Err(NexusError::TooSmall { .. })
        ));
        assert!(matches!(
            nexus.resize(512 * 10),
            Err(NexusError::Shrink { .. })
        ));
    }

    #[test]
    fn refuses_mismatched_children() {
        let a: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 100));
        let b: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(4096, 100));
        assert!(matches!(
            Nexus::new(512 * 100, vec![("a".into(), a.clone()), ("b".into(), b)]),
            Err(NexusError::BlockSize { .. })
        ));
        assert!(matches!(
            Nexus::new(512 * 101, vec![("a".into(), a)]),
            Err(NexusError::TooSmall { .. })
        ));
        assert!(matches!(Nexus::new(1, vec![]), Err(NexusError::NoChildren)));
    }
}
