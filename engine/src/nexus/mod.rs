//! The nexus: one volume mirrored over N children.
//!
//! Writes, flushes, write-zeroes and deallocates go to every child that is
//! healthy or rebuilding and complete when all have; reads go to one healthy
//! child, the one with the fewest reads outstanding on this channel (local
//! children first on a tie). A child that fails an I/O (or, for a remote
//! child, does not answer within the I/O timeout) is faulted and leaves the
//! I/O path; the I/O completes from the others. So is a child that fails a
//! write another healthy child took, whatever the error (no space on an
//! over-committed pool too): a child that serves reads holds every
//! acknowledged write, with no exception per block. The last healthy child is
//! never faulted by an I/O error (it holds every acknowledged write): I/O it
//! fails is retried for up to a bounded pause before the error reaches the
//! host, so that a filesystem does not go read-only on a blip.
//!
//! **Health record.** Before a write is acknowledged with fewer healthy
//! children than before, the nexus has its new healthy set recorded through
//! a [`HealthRecorder`] (the agent backs it with the cluster store). After a
//! restart only children recorded healthy may serve as sources.
//!
//! **Stale map (dirty-region log).** Every child carries a map of the
//! segments where it may lack acknowledged writes. A faulted child's map
//! gains every segment written while it is away; bringing it back copies
//! only those segments. A new child starts with every segment marked (a full
//! rebuild). The map lives in memory: after the nexus restarts, a child that
//! was away is added again and copied whole.
//!
//! **Incarnation.** A child that comes back is compared with the one that
//! left by its device's incarnation (a replica's is a random id of its
//! pool's opening, new at every import; a remote one reports it as its
//! namespace's EUI64). If its engine or pool restarted meanwhile, it may
//! have lost writes it completed but had not made durable, which the stale
//! map cannot name: it is copied whole (a thin one stays thin, see
//! [`rebuild`]). Nothing is logged on the write path for it.
//!
//! **Rebuild.** A rebuilding child receives every new write and is filled in
//! the background (see [`rebuild`]) from a healthy child, segment by
//! segment, with bounded concurrency and an optional rate limit. A segment
//! being copied is locked against new writes, and the copy waits for writes
//! already in flight to it, so that no write is lost between the copy's
//! read and its write.
//!
//! Children are [`BlockDevice`]s: a local replica directly, or a remote one
//! through the NVMe/TCP initiator.

mod channel;
mod locks;
pub mod rebuild;
mod stale;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_bdev::{BdevError, BlockDevice, DeviceInfo, IoChannel};
use uuid::Uuid;

use channel::NexusChannel;
use locks::RangeLocks;
use stale::SegmentMap;

/// A child's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildState {
    /// Holds every acknowledged write; serves reads.
    Healthy = 1,
    /// Out of the I/O path; its stale map grows with every write.
    Faulted = 2,
    /// Receives new writes while the rebuild fills in the rest.
    Rebuilding = 3,
}

impl ChildState {
    fn from_u8(v: u8) -> ChildState {
        match v {
            1 => ChildState::Healthy,
            3 => ChildState::Rebuilding,
            _ => ChildState::Faulted,
        }
    }
}

/// Tunables of a nexus.
#[derive(Debug, Clone)]
pub struct NexusConfig {
    /// A remote child's I/O that takes longer than this faults the child.
    pub io_timeout: Duration,
    /// How long I/O waits for a healthy child when none is left.
    pub pause: Duration,
    /// Granularity of the stale map and of rebuild copies.
    pub segment_bytes: u64,
    /// Segments a rebuild copies at once.
    pub rebuild_concurrency: usize,
    /// Rebuild bandwidth limit in bytes per second; 0 is unlimited.
    pub rebuild_rate: u64,
    /// How long a write waits for its health record before failing.
    pub health_timeout: Duration,
}

impl Default for NexusConfig {
    fn default() -> Self {
        NexusConfig {
            io_timeout: Duration::from_secs(30),
            pause: Duration::from_secs(5),
            segment_bytes: 1 << 20,
            rebuild_concurrency: 4,
            rebuild_rate: 0,
            health_timeout: Duration::from_secs(30),
        }
    }
}

/// A nexus's healthy set, as recorded in the cluster store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRecord {
    /// The volume id.
    pub nexus: Uuid,
    /// This nexus instance (a new one at every creation).
    pub instance: Uuid,
    /// Grows with every record of one instance.
    pub generation: u64,
    /// URIs of the children that hold every acknowledged write.
    pub healthy: Vec<String>,
    /// Whether the nexus was shut down with no write in flight.
    pub clean_shutdown: bool,
}

/// Called with the outcome of one [`HealthRecorder::record`].
pub type HealthDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Records a nexus's healthy set durably; `done` is called once it is (or
/// with the reason it could not be). Called from reactor threads: it must
/// not block.
pub trait HealthRecorder: Send + Sync + 'static {
    fn record(&self, rec: HealthRecord, done: HealthDone);
}

/// Why a nexus or a child operation was refused.
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
    #[error("child {uri} is already in the nexus")]
    ChildExists { uri: String },
    #[error("child {uri} is not in the nexus")]
    NoSuchChild { uri: String },
    #[error("child {uri} is the last healthy child; the volume would lose its data")]
    LastHealthy { uri: String },
}

/// A rebuild's progress.
#[derive(Debug)]
pub struct Progress {
    /// False when the whole volume is copied, true for a resync of the
    /// stale map's segments.
    pub partial: bool,
    pub total_bytes: u64,
    done: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn done_bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes per second since the start.
    pub fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs <= 0.0 {
            return 0;
        }
        (self.done_bytes() as f64 / secs) as u64
    }

    /// Seconds left at the current rate, rounded up.
    pub fn eta_secs(&self) -> u64 {
        let rate = self.rate();
        if rate == 0 {
            return 0;
        }
        self.total_bytes
            .saturating_sub(self.done_bytes())
            .div_ceil(rate)
    }
}

/// One mirror leg.
pub struct Child {
    uri: String,
    device: Arc<dyn BlockDevice>,
    /// The device's incarnation when it joined (see
    /// [`BlockDevice::incarnation`]).
    incarnation: Option<u64>,
    local: bool,
    state: AtomicU8,
    /// Segments where this child may lack acknowledged writes.
    stale: Arc<Mutex<SegmentMap>>,
    fault_reason: Mutex<String>,
    progress: Mutex<Option<Arc<Progress>>>,
    last_rebuild_bytes: AtomicU64,
}

impl Child {
    fn new(
        uri: String,
        device: Arc<dyn BlockDevice>,
        state: ChildState,
        stale: SegmentMap,
    ) -> Self {
        Child {
            local: !uri.starts_with("nvmf://"),
            uri,
            incarnation: device.incarnation(),
            device,
            state: AtomicU8::new(state as u8),
            stale: Arc::new(Mutex::new(stale)),
            fault_reason: Mutex::default(),
            progress: Mutex::default(),
            last_rebuild_bytes: AtomicU64::new(0),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn state(&self) -> ChildState {
        ChildState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Why the child was faulted (empty if it never was).
    pub fn fault_reason(&self) -> String {
        self.fault_reason.lock().expect("poisoned").clone()
    }

    /// The running rebuild, if any.
    pub fn progress(&self) -> Option<Arc<Progress>> {
        self.progress.lock().expect("poisoned").clone()
    }

    /// Bytes copied by the last finished rebuild or resync.
    pub fn last_rebuild_bytes(&self) -> u64 {
        self.last_rebuild_bytes.load(Ordering::Relaxed)
    }

    /// Bytes this child may lack: what bringing it back would copy.
    pub fn stale_bytes(&self, segment_bytes: u64) -> u64 {
        self.stale.lock().expect("poisoned").count() * segment_bytes
    }

    fn mark_stale(&self, first_seg: u64, last_seg: u64) {
        self.stale
            .lock()
            .expect("poisoned")
            .set_range(first_seg, last_seg);
    }
}

/// What every channel of a nexus shares.
pub(crate) struct Shared {
    uuid: Uuid,
    instance: Uuid,
    cfg: NexusConfig,
    block_size: u32,
    /// The volume's size in blocks; grows online.
    num_blocks: AtomicU64,
    children: RwLock<Arc<Vec<Arc<Child>>>>,
    /// How many children there are (kept with `children`, read on the
    /// write path without the lock).
    child_count: AtomicUsize,
    /// Bumped whenever the set of children or a child's state changes;
    /// channels reopen their legs when they see a new value.
    generation: AtomicU64,
    recorder: Option<Arc<dyn HealthRecorder>>,
    /// Generation of the last health record sent, of the last one writes
    /// must wait for, and of the last one known durable.
    health_seq: AtomicU64,
    health_wanted: AtomicU64,
    health_durable: AtomicU64,
    /// Writes in flight, counted per epoch (see [`rebuild`]).
    epoch: AtomicU64,
    inflight: [AtomicU64; 2],
    epoch_flipping: AtomicBool,
    /// Serialises I/O-driven faults, so that two children failing at once
    /// cannot both leave the healthy set.
    fault_lock: Mutex<()>,
    /// Rebuilds running; while non-zero, writes take segment locks.
    rebuilding: AtomicUsize,
    locks: RangeLocks,
}

impl Shared {
    fn segment_blocks(&self) -> u64 {
        (self.cfg.segment_bytes / u64::from(self.block_size)).max(1)
    }

    /// The segments `blocks` blocks at `lba` touch (first, last).
    fn segments(&self, lba: u64, blocks: u64) -> (u64, u64) {
        let per = self.segment_blocks();
        (lba / per, (lba + blocks.max(1) - 1) / per)
    }

    fn geometry(&self) -> DeviceInfo {
        DeviceInfo {
            block_size: self.block_size,
            num_blocks: self.num_blocks.load(Ordering::Acquire),
            volatile_write_cache: true,
            dealloc_reads_zeroes: true,
        }
    }

    fn children(&self) -> Arc<Vec<Arc<Child>>> {
        self.children.read().expect("poisoned").clone()
    }

    fn healthy_uris(&self) -> Vec<String> {
        self.children()
            .iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .map(|c| c.uri.clone())
            .collect()
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes a child out of the I/O path after an I/O error, unless it is
    /// the last healthy child: that one holds every acknowledged write, so
    /// it stays, and I/O waits for it (up to the pause) instead. Returns
    /// whether the child was faulted.
    fn fault_io(self: &Arc<Self>, child: &Child, reason: &str) -> bool {
        let _one_at_a_time = self.fault_lock.lock().expect("poisoned");
        if child.state() == ChildState::Healthy
            && self
                .children()
                .iter()
                .filter(|c| c.state() == ChildState::Healthy)
                .count()
                <= 1
        {
            tracing::debug!(nexus = %self.uuid, child = %child.uri, reason, "last healthy child failed an I/O; keeping it");
            return false;
        }
        self.fault(child, reason);
        true
    }

    /// Takes a child out of the I/O path.
    fn fault(self: &Arc<Self>, child: &Child, reason: &str) {
        let prev = ChildState::from_u8(
            child
                .state
                .swap(ChildState::Faulted as u8, Ordering::SeqCst),
        );
        if prev == ChildState::Faulted {
            return;
        }
        *child.fault_reason.lock().expect("poisoned") = reason.to_owned();
        tracing::warn!(nexus = %self.uuid, child = %child.uri, reason, "nexus child faulted");
        self.bump();
        if prev == ChildState::Healthy {
            self.publish_health(false, true);
        }
    }

    /// Asks for the current healthy set to be recorded. With `gate`,
    /// writes acknowledged from now on wait until it is (see
    /// [`Shared::health_settled`]); without, the record is informational
    /// (the set did not shrink).
    fn publish_health(self: &Arc<Self>, clean_shutdown: bool, gate: bool) {
        let healthy = self.healthy_uris();
        if healthy.is_empty() {
            // Never record an empty set: the children faulted last still
            // hold every acknowledged write, and the record must say so.
            return;
        }
        let generation = self.health_seq.fetch_add(1, Ordering::SeqCst) + 1;
        if gate {
            self.health_wanted.fetch_max(generation, Ordering::SeqCst);
        }
        let Some(recorder) = self.recorder.clone() else {
            self.health_durable.fetch_max(generation, Ordering::SeqCst);
            return;
        };
        let me = self.clone();
        recorder.record(
            HealthRecord {
                nexus: self.uuid,
                instance: self.instance,
                generation,
                healthy,
                clean_shutdown,
            },
            Box::new(move |r| match r {
                Ok(()) => {
                    me.health_durable.fetch_max(generation, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!(nexus = %me.uuid, error = %e, "recording the nexus's health failed; retrying");
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(1));
                        if gate && me.health_durable.load(Ordering::SeqCst) < generation {
                            me.publish_health(false, true);
                        }
                    });
                }
            }),
        );
    }

    /// Whether a health record that writes must wait for is not durable yet.
    fn health_pending(&self) -> bool {
        self.health_durable.load(Ordering::SeqCst) < self.health_wanted.load(Ordering::SeqCst)
    }

    /// Waits until every health record asked for so far is durable.
    async fn health_settled(&self) -> Result<(), BdevError> {
        let wanted = self.health_wanted.load(Ordering::SeqCst);
        if self.health_durable.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let deadline = Instant::now() + self.cfg.health_timeout;
        while self.health_durable.load(Ordering::SeqCst) < wanted {
            if Instant::now() >= deadline {
                return Err(BdevError::Unavailable {
                    reason: "the nexus's health record could not be stored".into(),
                });
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// A mirrored volume.
pub struct Nexus {
    shared: Arc<Shared>,
}

impl Nexus {
    /// Assembles a nexus of `size_bytes` over `children` (uri, device), all
    /// healthy, with default tunables and no health recorder.
    pub fn new(
        size_bytes: u64,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
    ) -> Result<Self, NexusError> {
        Self::with_options(
            Uuid::new_v4(),
            size_bytes,
            children,
            NexusConfig::default(),
            None,
        )
    }

    /// Assembles nexus `uuid` of `size_bytes` over `children` (uri,
    /// device), all healthy; `recorder` keeps its healthy set. The
    /// instance id is a new random one.
    pub fn with_options(
        uuid: Uuid,
        size_bytes: u64,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
        cfg: NexusConfig,
        recorder: Option<Arc<dyn HealthRecorder>>,
    ) -> Result<Self, NexusError> {
        Self::with_instance(uuid, Uuid::new_v4(), size_bytes, children, cfg, recorder)
    }

    /// [`Nexus::with_options`] as instance `instance`: the id its health
    /// records carry, which the store accepts only while the volume names
    /// it as current.
    pub fn with_instance(
        uuid: Uuid,
        instance: Uuid,
        size_bytes: u64,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
        cfg: NexusConfig,
        recorder: Option<Arc<dyn HealthRecorder>>,
    ) -> Result<Self, NexusError> {
        let bs = children
            .first()
            .ok_or(NexusError::NoChildren)?
            .1
            .info()
            .block_size;
        for (uri, d) in &children {
            check_child(uri, d.as_ref(), bs, size_bytes)?;
        }
        let children: Vec<Arc<Child>> = children
            .into_iter()
            .map(|(uri, device)| {
                Arc::new(Child::new(
                    uri,
                    device,
                    ChildState::Healthy,
                    SegmentMap::default(),
                ))
            })
            .collect();
        let shared = Arc::new(Shared {
            uuid,
            instance,
            cfg,
            block_size: bs,
            num_blocks: AtomicU64::new(size_bytes / u64::from(bs)),
            child_count: AtomicUsize::new(children.len()),
            children: RwLock::new(Arc::new(children)),
            generation: AtomicU64::new(1),
            recorder,
            health_seq: AtomicU64::new(0),
            health_wanted: AtomicU64::new(0),
            health_durable: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            inflight: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch_flipping: AtomicBool::new(false),
            fault_lock: Mutex::new(()),
            rebuilding: AtomicUsize::new(0),
            locks: RangeLocks::default(),
        });
        shared.publish_health(false, false);
        Ok(Nexus { shared })
    }

    /// The volume id.
    pub fn uuid(&self) -> Uuid {
        self.shared.uuid
    }

    /// This nexus instance.
    pub fn instance(&self) -> Uuid {
        self.shared.instance
    }

    /// The tunables.
    pub fn config(&self) -> &NexusConfig {
        &self.shared.cfg
    }

    /// Grows the volume to `size_bytes`; every child must already hold that
    /// much. Open channels see the new size at once.
    pub fn resize(&self, size_bytes: u64) -> Result<(), NexusError> {
        for c in self.shared.children().iter() {
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
        let bs = u64::from(self.shared.block_size);
        let blocks = size_bytes / bs;
        let old = self.shared.num_blocks.load(Ordering::Acquire);
        if blocks < old {
            return Err(NexusError::Shrink {
                from: old * bs,
                to: size_bytes,
            });
        }
        self.shared.num_blocks.store(blocks, Ordering::Release);
        Ok(())
    }

    /// The children, in the order they joined.
    pub fn children(&self) -> Arc<Vec<Arc<Child>>> {
        self.shared.children()
    }

    /// Whether `uri` is one of the children.
    pub fn has_child(&self, uri: &str) -> bool {
        self.shared.children().iter().any(|c| c.uri == uri)
    }

    fn find(&self, uri: &str) -> Result<Arc<Child>, NexusError> {
        self.shared
            .children()
            .iter()
            .find(|c| c.uri == uri)
            .cloned()
            .ok_or_else(|| NexusError::NoSuchChild { uri: uri.into() })
    }

    /// Adds a child that must be filled whole: it receives new writes at
    /// once; run [`rebuild::run`] on a reactor to copy the rest.
    pub fn add_child(&self, uri: &str, device: Arc<dyn BlockDevice>) -> Result<(), NexusError> {
        let sh = &self.shared;
        let size = sh.num_blocks.load(Ordering::Acquire) * u64::from(sh.block_size);
        check_child(uri, device.as_ref(), sh.block_size, size)?;
        let mut children = sh.children.write().expect("poisoned");
        if children.iter().any(|c| c.uri == uri) {
            return Err(NexusError::ChildExists { uri: uri.into() });
        }
        let segments = size.div_ceil(sh.cfg.segment_bytes);
        let child = Child::new(
            uri.into(),
            device,
            ChildState::Rebuilding,
            SegmentMap::full(segments),
        );
        *child.progress.lock().expect("poisoned") = Some(Arc::new(Progress {
            partial: false,
            total_bytes: size,
            done: AtomicU64::new(0),
            started: Instant::now(),
        }));
        // Writes must take segment locks before the child can receive any.
        sh.rebuilding.fetch_add(1, Ordering::SeqCst);
        let mut next = (**children).clone();
        next.push(Arc::new(child));
        self.shared.child_count.store(next.len(), Ordering::SeqCst);
        *children = Arc::new(next);
        drop(children);
        sh.bump();
        tracing::info!(nexus = %sh.uuid, child = uri, "child added; full rebuild");
        Ok(())
    }

    /// Brings a faulted child back, on `device` if given (a reconnection)
    /// or its old device: it receives new writes at once; run
    /// [`rebuild::run`] to copy the segments its stale map names.
    /// Idempotent for a child that is healthy or rebuilding.
    pub fn online_child(
        &self,
        uri: &str,
        device: Option<Arc<dyn BlockDevice>>,
    ) -> Result<bool, NexusError> {
        let sh = &self.shared;
        let mut children = sh.children.write().expect("poisoned");
        let idx = children
            .iter()
            .position(|c| c.uri == uri)
            .ok_or_else(|| NexusError::NoSuchChild { uri: uri.into() })?;
        let old = children[idx].clone();
        if old.state() != ChildState::Faulted {
            return Ok(false);
        }
        let device = device.unwrap_or_else(|| old.device.clone());
        let size = sh.num_blocks.load(Ordering::Acquire) * u64::from(sh.block_size);
        check_child(uri, device.as_ref(), sh.block_size, size)?;
        let segments = size.div_ceil(sh.cfg.segment_bytes);
        let incarnation = device.incarnation();
        if incarnation != old.incarnation {
            // Its pool was opened again since it left (an engine restart,
            // a power loss): it may have lost writes it completed before
            // it left, which no stale map names. It is copied whole.
            tracing::warn!(nexus = %sh.uuid, child = uri, before = ?old.incarnation, now = ?incarnation, "child restarted while away; resyncing it whole");
            if segments > 0 {
                old.mark_stale(0, segments - 1);
            }
        }
        let stale_segments = old.stale.lock().expect("poisoned").count();
        let child = Child {
            local: old.local,
            uri: uri.into(),
            incarnation,
            device,
            state: AtomicU8::new(ChildState::Rebuilding as u8),
            stale: old.stale.clone(),
            fault_reason: Mutex::default(),
            progress: Mutex::new(Some(Arc::new(Progress {
                partial: stale_segments < segments,
                total_bytes: stale_segments * sh.cfg.segment_bytes,
                done: AtomicU64::new(0),
                started: Instant::now(),
            }))),
            last_rebuild_bytes: AtomicU64::new(old.last_rebuild_bytes()),
        };
        sh.rebuilding.fetch_add(1, Ordering::SeqCst);
        let mut next = (**children).clone();
        next[idx] = Arc::new(child);
        self.shared.child_count.store(next.len(), Ordering::SeqCst);
        *children = Arc::new(next);
        drop(children);
        sh.bump();
        tracing::info!(nexus = %sh.uuid, child = uri, stale_segments, "child back; resyncing");
        Ok(true)
    }

    /// Faults a child by request. The last healthy child is refused.
    pub fn fault_child(&self, uri: &str) -> Result<(), NexusError> {
        let child = self.find(uri)?;
        self.refuse_last_healthy(&child)?;
        self.shared.fault(&child, "faulted by request");
        Ok(())
    }

    /// Removes a child. The last healthy child is refused.
    pub fn remove_child(&self, uri: &str) -> Result<(), NexusError> {
        let child = self.find(uri)?;
        self.refuse_last_healthy(&child)?;
        // A running rebuild sees the fault and stops.
        self.shared.fault(&child, "removed");
        let mut children = self.shared.children.write().expect("poisoned");
        let next: Vec<_> = children.iter().filter(|c| c.uri != uri).cloned().collect();
        self.shared.child_count.store(next.len(), Ordering::SeqCst);
        *children = Arc::new(next);
        drop(children);
        self.shared.bump();
        tracing::info!(nexus = %self.shared.uuid, child = uri, "child removed");
        Ok(())
    }

    fn refuse_last_healthy(&self, child: &Child) -> Result<(), NexusError> {
        let healthy = self
            .shared
            .children()
            .iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .count();
        if child.state() == ChildState::Healthy && healthy <= 1 {
            return Err(NexusError::LastHealthy {
                uri: child.uri.clone(),
            });
        }
        Ok(())
    }

    /// Records a clean shutdown (the nexus is being destroyed with its
    /// host gone).
    pub fn record_clean_shutdown(&self) {
        self.shared.publish_health(true, false);
    }

    /// Whether every health record asked for is durable.
    pub fn health_durable(&self) -> bool {
        self.shared.health_durable.load(Ordering::SeqCst)
            >= self.shared.health_wanted.load(Ordering::SeqCst)
    }
}

fn check_child(
    uri: &str,
    device: &dyn BlockDevice,
    block_size: u32,
    size_bytes: u64,
) -> Result<(), NexusError> {
    let i = device.info();
    if i.block_size != block_size {
        return Err(NexusError::BlockSize {
            uri: uri.into(),
            got: i.block_size,
            want: block_size,
        });
    }
    if i.size_bytes() < size_bytes {
        return Err(NexusError::TooSmall {
            uri: uri.into(),
            got: i.size_bytes(),
            want: size_bytes,
        });
    }
    Ok(())
}

impl BlockDevice for Nexus {
    fn info(&self) -> DeviceInfo {
        let children = self.shared.children();
        DeviceInfo {
            volatile_write_cache: children
                .iter()
                .any(|c| c.device.info().volatile_write_cache),
            dealloc_reads_zeroes: children
                .iter()
                .all(|c| c.device.info().dealloc_reads_zeroes),
            ..self.shared.geometry()
        }
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(NexusChannel::open(self.shared.clone())?))
    }
}

/// Whether an error says something about the child rather than the request.
fn is_child_failure(e: &BdevError) -> bool {
    matches!(
        e,
        BdevError::Io { .. } | BdevError::Unavailable { .. } | BdevError::Integrity { .. }
    )
}

fn no_child() -> BdevError {
    BdevError::Unavailable {
        reason: "no healthy child".into(),
    }
}

#[cfg(test)]
mod tests;
