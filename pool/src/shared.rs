//! State shared by a pool and its replicas: the device, the allocator and
//! the in-memory image of the cluster groups.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use cairn_bdev::file::{FileDevice, FileOptions};
use cairn_bdev::{BdevError, IoBuf, IoChannel};
use uuid::Uuid;

use crate::error::Result;
use crate::format::{
    encode_group, group_offset, Entry, Superblock, BLOCK_SIZE, GROUP_CLUSTERS, MD_BLOCK,
};
use crate::mdio::MdFile;

/// The allocator: the in-memory image of every cluster entry and the free
/// list. Every change of a replica map happens under this lock too.
pub(crate) struct Alloc {
    pub sb: Superblock,
    /// One per data cluster, as it is (or is about to be) on disk.
    pub entries: Vec<Entry>,
    /// Free clusters; popped from the end, so the lowest come first.
    pub free: Vec<u64>,
}

pub(crate) struct Shared {
    pub path: PathBuf,
    pub md: MdFile,
    dev: Mutex<Arc<FileDevice>>,
    /// Bumped when the device is reopened (after a grow), so channels reopen.
    pub dev_gen: AtomicU64,
    pub uuid: Uuid,
    pub name: String,
    pub cluster_size: u32,
    /// Cluster size in replica blocks.
    pub cluster_blocks: u64,
    pub alloc: Mutex<Alloc>,
    group_locks: Mutex<Vec<Arc<AtomicBool>>>,
    pub closed: AtomicBool,
}

impl Shared {
    pub(crate) fn new(path: PathBuf, md: MdFile, sb: Superblock, entries: Vec<Entry>) -> Result<Self> {
        let dev = open_dev(&path)?;
        let free: Vec<u64> = (0..entries.len() as u64)
            .rev()
            .filter(|&p| entries[p as usize].is_free())
            .collect();
        let groups = crate::format::groups_for(sb.num_clusters);
        Ok(Shared {
            path,
            md,
            dev: Mutex::new(Arc::new(dev)),
            dev_gen: AtomicU64::new(0),
            uuid: sb.uuid,
            name: sb.name.clone(),
            cluster_size: sb.cluster_size,
            cluster_blocks: u64::from(sb.cluster_size / BLOCK_SIZE),
            alloc: Mutex::new(Alloc { sb, entries, free }),
            group_locks: Mutex::new((0..groups).map(|_| Arc::default()).collect()),
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn lock_alloc(&self) -> MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn device(&self) -> Arc<FileDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reopens the device after it grew.
    pub(crate) fn reopen_device(&self, groups: u64) -> Result<()> {
        let dev = open_dev(&self.path)?;
        *self.dev.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(dev);
        let mut locks = self.group_locks.lock().unwrap_or_else(|e| e.into_inner());
        while (locks.len() as u64) < groups {
            locks.push(Arc::default());
        }
        self.dev_gen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Replica-block address of physical cluster `p`.
    pub(crate) fn cluster_lba(&self, p: u64) -> u64 {
        crate::format::cluster_offset(self.cluster_size, p) / u64::from(BLOCK_SIZE)
    }

    fn group_lock(&self, g: u64) -> Arc<AtomicBool> {
        let locks = self.group_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks[g as usize].clone()
    }

    /// The current image of group `g`'s header block.
    fn group_image(&self, g: u64) -> IoBuf {
        let a = self.lock_alloc();
        let start = (g * GROUP_CLUSTERS) as usize;
        let end = (start + GROUP_CLUSTERS as usize).min(a.entries.len());
        IoBuf::from_slice(&encode_group(g, &self.uuid, &a.entries[start..end]))
    }

    /// Writes the header blocks of `groups` through a reactor's channel of
    /// the device. Each group is written under its own lock, so images reach
    /// the disk in the order they were taken.
    pub(crate) async fn persist_groups(
        &self,
        ch: &dyn IoChannel,
        groups: &[u64],
    ) -> std::result::Result<(), BdevError> {
        for &g in groups {
            let lock = self.group_lock(g);
            while lock
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                yield_now().await;
            }
            let _held = Held(&lock);
            let img = self.group_image(g);
            let lba = group_offset(self.cluster_size, g) / u64::from(BLOCK_SIZE);
            let (r, _) = ch.write(lba, img, false).await;
            r?;
        }
        Ok(())
    }

    /// The same as [`Shared::persist_groups`] from a control thread.
    pub(crate) fn persist_groups_sync(&self, groups: &[u64]) -> Result<()> {
        for &g in groups {
            let lock = self.group_lock(g);
            while lock
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                std::thread::yield_now();
            }
            let _held = Held(&lock);
            let img = self.group_image(g);
            self.md.write(group_offset(self.cluster_size, g), &img)?;
        }
        Ok(())
    }
}

fn open_dev(path: &std::path::Path) -> Result<FileDevice> {
    Ok(FileDevice::open(
        path,
        FileOptions {
            block_size: BLOCK_SIZE,
            direct: true,
        },
    )?)
}

/// Releases a spin lock when dropped (also when a future is cancelled).
pub(crate) struct Held<'a>(pub &'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Lets other tasks of the reactor run once.
pub(crate) fn yield_now() -> impl Future<Output = ()> {
    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    Yield(false)
}
