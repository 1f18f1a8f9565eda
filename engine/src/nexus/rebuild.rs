//! Filling a rebuilding child from a healthy one.
//!
//! The order that keeps every write: the child is marked rebuilding (so
//! every new write goes to it and takes segment locks) before the rebuild
//! starts; the rebuild then waits for the writes that began before that
//! (they may have skipped the child, and have marked its stale map if so);
//! only then does it walk the stale map. Each segment is copied under an
//! exclusive lock (see `locks`), and unmarked before the lock is released.
//! A child that still has no stale segment once the walk ends is healthy.
//!
//! **Thin stays thin.** A chunk that reads back all zeroes from the source
//! (never written, or deallocated) is deallocated on the child (written as
//! zeroes if the child's deallocated blocks do not read zeroes) instead of
//! written, so that a rebuilt thin replica allocates what its source holds,
//! not the whole volume. The cost is a scan of each chunk read (memory
//! speed); the source is still read whole.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_bdev::{IoBuf, IoChannel};
use futures::future::join_all;

use super::{is_child_failure, Child, ChildState, Nexus, Progress, Shared};

/// Largest single copy I/O (below the NVMe/TCP target's MDTS).
const CHUNK_BYTES: u64 = 256 << 10;
const POLL: Duration = Duration::from_micros(200);

/// Why a rebuild stopped before the child was healthy.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("child {0} is not rebuilding")]
    NotRebuilding(String),
    #[error("no healthy child to copy from")]
    NoSource,
    #[error("source {uri} failed: {reason}")]
    Source { uri: String, reason: String },
    #[error("rebuilding child failed: {0}")]
    Target(String),
}

/// Rebuilds child `uri` of `nexus`; run it on a reactor. Returns the bytes
/// copied. On failure the child is faulted and keeps its stale map, so
/// bringing it back resumes where this stopped.
pub async fn run(nexus: Arc<Nexus>, uri: String) -> Result<u64, RebuildError> {
    let sh = nexus.shared.clone();
    let r = rebuild(&sh, &uri).await;
    sh.rebuilding.fetch_sub(1, Ordering::SeqCst);
    match &r {
        Ok(bytes) => {
            tracing::info!(nexus = %sh.uuid, child = %uri, bytes, "rebuild finished; child healthy")
        }
        Err(e) => {
            tracing::warn!(nexus = %sh.uuid, child = %uri, error = %e, "rebuild stopped");
            if let Some(c) = sh.children().iter().find(|c| c.uri == uri) {
                if c.state() == ChildState::Rebuilding {
                    sh.fault(c, &e.to_string());
                }
                *c.progress.lock().expect("poisoned") = None;
            }
        }
    }
    r
}

/// Waits for every write that started before now to finish.
async fn drain_earlier_writes(sh: &Shared) {
    while sh.epoch_flipping.swap(true, Ordering::SeqCst) {
        monoio::time::sleep(POLL).await;
    }
    let old = sh.epoch.fetch_add(1, Ordering::SeqCst);
    while sh.inflight[(old & 1) as usize].load(Ordering::SeqCst) != 0 {
        monoio::time::sleep(POLL).await;
    }
    sh.epoch_flipping.store(false, Ordering::SeqCst);
}

async fn rebuild(sh: &Arc<Shared>, uri: &str) -> Result<u64, RebuildError> {
    let not_rebuilding = || RebuildError::NotRebuilding(uri.to_owned());
    let child = sh
        .children()
        .iter()
        .find(|c| c.uri == uri)
        .cloned()
        .ok_or_else(not_rebuilding)?;
    if child.state() != ChildState::Rebuilding {
        return Err(not_rebuilding());
    }
    drain_earlier_writes(sh).await;
    let source = {
        let children = sh.children();
        let mut healthy: Vec<_> = children
            .iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .cloned()
            .collect();
        healthy.sort_by_key(|c| !c.local);
        healthy.into_iter().next().ok_or(RebuildError::NoSource)?
    };
    let src = source
        .device
        .open_channel()
        .map_err(|e| RebuildError::Source {
            uri: source.uri.clone(),
            reason: e.to_string(),
        })?;
    let dst = child
        .device
        .open_channel()
        .map_err(|e| RebuildError::Target(e.to_string()))?;
    let progress = child.progress().unwrap_or_else(|| {
        Arc::new(Progress {
            partial: true,
            total_bytes: child.stale_bytes(sh.cfg.segment_bytes),
            done: Default::default(),
            started: Instant::now(),
        })
    });
    let job = Job {
        sh,
        child: &child,
        source: &source,
        src: src.as_ref(),
        dst: dst.as_ref(),
        cursor: Cell::new(0),
        reserved: Cell::new(0),
        progress: &progress,
        started: Instant::now(),
    };
    let workers = (0..sh.cfg.rebuild_concurrency.max(1)).map(|_| job.worker());
    for r in join_all(workers).await {
        r?;
    }
    job.dst
        .flush()
        .await
        .map_err(|e| RebuildError::Target(e.to_string()))?;
    if child.stale.lock().expect("poisoned").count() != 0 {
        // Only a failed write marks a rebuilding child, and that faults it.
        return Err(not_rebuilding());
    }
    if child
        .state
        .compare_exchange(
            ChildState::Rebuilding as u8,
            ChildState::Healthy as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        return Err(not_rebuilding());
    }
    let copied = progress.done_bytes();
    child.last_rebuild_bytes.store(copied, Ordering::Relaxed);
    *child.progress.lock().expect("poisoned") = None;
    child.fault_reason.lock().expect("poisoned").clear();
    sh.bump();
    sh.publish_health(false, false);
    Ok(copied)
}

struct Job<'a> {
    sh: &'a Arc<Shared>,
    child: &'a Arc<Child>,
    source: &'a Arc<Child>,
    src: &'a dyn IoChannel,
    dst: &'a dyn IoChannel,
    /// The next segment to look at; shared by the workers of this job.
    cursor: Cell<u64>,
    /// Bytes the rate limit has let through (segments started).
    reserved: Cell<u64>,
    progress: &'a Progress,
    started: Instant,
}

impl Job<'_> {
    async fn worker(&self) -> Result<(), RebuildError> {
        loop {
            if self.child.state() != ChildState::Rebuilding {
                return Err(RebuildError::NotRebuilding(self.child.uri.clone()));
            }
            if self.source.state() != ChildState::Healthy {
                return Err(RebuildError::Source {
                    uri: self.source.uri.clone(),
                    reason: "it left the healthy set".into(),
                });
            }
            let seg = {
                let map = self.child.stale.lock().expect("poisoned");
                match map.next_from(self.cursor.get()) {
                    Some(s) => s,
                    None => return Ok(()),
                }
            };
            self.cursor.set(seg + 1);
            self.throttle().await;
            let hold = self.sh.locks.copy(seg).await;
            let bytes = self.copy_segment(seg).await?;
            self.child.stale.lock().expect("poisoned").clear(seg);
            drop(hold);
            self.progress.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Copies one segment (clipped to the volume); returns the bytes copied.
    async fn copy_segment(&self, seg: u64) -> Result<u64, RebuildError> {
        let bs = u64::from(self.sh.block_size);
        let per = self.sh.segment_blocks();
        let end = ((seg + 1) * per).min(self.sh.num_blocks.load(Ordering::Acquire));
        let mut lba = seg * per;
        let mut copied = 0;
        while lba < end {
            let blocks = (CHUNK_BYTES / bs).max(1).min(end - lba);
            let len = (blocks * bs) as usize;
            let (r, buf) = self.src.read(lba, IoBuf::zeroed(len)).await;
            if let Err(e) = r {
                if is_child_failure(&e) {
                    self.sh.fault_io(self.source, &e.to_string());
                }
                return Err(RebuildError::Source {
                    uri: self.source.uri.clone(),
                    reason: e.to_string(),
                });
            }
            let r = if is_zero(&buf) {
                // Never written (or zeroed) on the source: a thin child
                // keeps it unallocated, and reads zeroes there either way.
                if self.child.device.info().dealloc_reads_zeroes {
                    self.dst.deallocate(lba, blocks).await
                } else {
                    self.dst.write_zeroes(lba, blocks).await
                }
            } else {
                self.dst.write(lba, buf, false).await.0
            };
            if let Err(e) = r {
                self.sh
                    .fault(self.child, &format!("rebuild write failed: {e}"));
                return Err(RebuildError::Target(e.to_string()));
            }
            lba += blocks;
            copied += len as u64;
        }
        Ok(copied)
    }

    /// Before a segment is copied: sleeps until the rate limit allows the
    /// bytes copied or started so far plus this segment.
    async fn throttle(&self) {
        let rate = self.sh.cfg.rebuild_rate;
        if rate == 0 {
            return;
        }
        let reserved = self.reserved.get() + self.sh.cfg.segment_bytes;
        self.reserved.set(reserved);
        let due = Duration::from_secs_f64(reserved as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            monoio::time::sleep(due - elapsed).await;
        }
    }
}

/// Whether every byte of `buf` is zero.
fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}
