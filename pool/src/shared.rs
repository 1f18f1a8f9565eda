//! State shared by a pool and its replicas: the device, the allocator and
//! the in-memory image of the cluster groups.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use cairn_bdev::{BdevError, IoBuf, IoChannel};
use uuid::Uuid;

use crate::devchan::DevChannel;
use crate::error::Result;
use crate::format::{encode_group, group_offset, Entry, Superblock, BLOCK_SIZE, GROUP_CLUSTERS};
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
    pub uuid: Uuid,
    pub name: String,
    pub cluster_size: u32,
    /// Cluster size in replica blocks.
    pub cluster_blocks: u64,
    pub alloc: Mutex<Alloc>,
    group_locks: Mutex<Vec<Arc<AtomicBool>>>,
    pub closed: AtomicBool,
    pub notify: Notify,
    /// Number of releases waiting for in-flight I/O to drain; while it is
    /// not zero, finishing I/Os wake them.
    pub quiescing: AtomicU64,
    /// Metadata blocks written since import (group headers, records).
    pub md_writes: AtomicU64,
    /// A random id of this opening of the pool, new at every creation and
    /// import: replicas report it as their incarnation, so that a mirror
    /// sees that a replica it had may have lost completed writes (its
    /// engine or pool restarted) and copies it whole.
    pub opening: u64,
}

impl Shared {
    pub(crate) fn new(
        path: PathBuf,
        md: MdFile,
        sb: Superblock,
        entries: Vec<Entry>,
    ) -> Result<Self> {
        let free: Vec<u64> = (0..entries.len() as u64)
            .rev()
            .filter(|&p| entries[p as usize].is_free())
            .collect();
        let groups = crate::format::groups_for(sb.num_clusters);
        Ok(Shared {
            path,
            md,
            uuid: sb.uuid,
            name: sb.name.clone(),
            cluster_size: sb.cluster_size,
            cluster_blocks: u64::from(sb.cluster_size / BLOCK_SIZE),
            alloc: Mutex::new(Alloc { sb, entries, free }),
            group_locks: Mutex::new((0..groups).map(|_| Arc::default()).collect()),
            closed: AtomicBool::new(false),
            notify: Notify::default(),
            quiescing: AtomicU64::new(0),
            md_writes: AtomicU64::new(0),
            // Never 0, which the wire uses for "none".
            opening: Uuid::new_v4().as_u64_pair().0 | 1,
        })
    }

    pub(crate) fn lock_alloc(&self) -> MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a channel to the device for the calling reactor.
    pub(crate) fn open_device_channel(&self) -> std::result::Result<DevChannel, BdevError> {
        let f = self.md.dup().map_err(|e| BdevError::io("dup", e))?;
        DevChannel::new(f, self.md.is_block())
    }

    /// Makes room for the group locks of a grown pool.
    pub(crate) fn add_groups(&self, groups: u64) {
        let mut locks = self.group_locks.lock().unwrap_or_else(|e| e.into_inner());
        while (locks.len() as u64) < groups {
            locks.push(Arc::default());
        }
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
            let _held = self.notify.lock(&lock).await;
            let img = self.group_image(g);
            let lba = group_offset(self.cluster_size, g) / u64::from(BLOCK_SIZE);
            self.md_writes.fetch_add(1, Ordering::Relaxed);
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
            let _held = Held {
                flag: &lock,
                notify: &self.notify,
            };
            let img = self.group_image(g);
            self.md_writes.fetch_add(1, Ordering::Relaxed);
            self.md.write(group_offset(self.cluster_size, g), &img)?;
        }
        Ok(())
    }
}

/// Releases a lock flag when dropped (also when a future is cancelled) and
/// wakes whoever waits for it.
pub(crate) struct Held<'a> {
    pub flag: &'a AtomicBool,
    pub notify: &'a Notify,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
        self.notify.notify();
    }
}

/// A wake-up point for tasks on any reactor waiting for a rare event (a
/// cluster allocation finishing, a group block lock, in-flight I/O
/// draining). Waiters take [`Notify::epoch`] before checking their
/// condition and wait for it to change, so no wake-up is lost.
#[derive(Default)]
pub(crate) struct Notify {
    gen: AtomicU64,
    wakers: Mutex<Vec<Waker>>,
}

impl Notify {
    pub(crate) fn epoch(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    pub(crate) fn notify(&self) {
        self.gen.fetch_add(1, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers {
            w.wake();
        }
    }

    /// Completes once the epoch differs from `seen`.
    pub(crate) fn wait(&self, seen: u64) -> impl Future<Output = ()> + '_ {
        struct Wait<'a>(&'a Notify, u64);
        impl Future for Wait<'_> {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0.epoch() != self.1 {
                    return Poll::Ready(());
                }
                self.0
                    .wakers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(cx.waker().clone());
                if self.0.epoch() != self.1 {
                    return Poll::Ready(());
                }
                Poll::Pending
            }
        }
        Wait(self, seen)
    }

    /// Takes a lock flag, waiting for its holder.
    pub(crate) async fn lock<'a>(&'a self, flag: &'a AtomicBool) -> Held<'a> {
        loop {
            let e = self.epoch();
            if flag
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Held { flag, notify: self };
            }
            self.wait(e).await;
        }
    }
}
