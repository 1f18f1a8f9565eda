//! Replicas: thin or thick block devices carved out of a pool.
//!
//! The I/O path looks a logical cluster up in an array of `AtomicU64`
//! (0 = unmapped, [`PENDING`] = being allocated or released, otherwise the
//! physical cluster + 1) with no lock; a write to a mapped cluster is one
//! data write. Only allocation and release take the pool's allocator lock,
//! and only for the few instructions that pick a cluster and change a map
//! slot; their device I/O runs outside it.
//!
//! Released clusters return to the free list only after every I/O that might
//! still target them has finished: each channel counts its in-flight I/Os in
//! two counters selected by the parity of a replica epoch, and a release
//! waits, twice, for the counters of the previous epoch to drain (a small
//! sleepable RCU).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_bdev::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};
use uuid::Uuid;

use crate::devchan::DevChannel;
use crate::format::{Entry, BLOCK_SIZE, GROUP_CLUSTERS};
use crate::shared::Shared;

/// Map value of a cluster being allocated or released.
pub(crate) const PENDING: u64 = u64::MAX;

/// What a replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub uuid: Uuid,
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    pub thin: bool,
    /// See [`Replica::is_faulted`].
    pub faulted: bool,
    /// Bytes of pool space the replica holds.
    pub allocated: u64,
    pub pool_uuid: Uuid,
    pub pool_name: String,
}

/// I/O counters of a replica since the pool was imported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Write zeroes and deallocate commands.
    pub unmaps: u64,
    pub flushes: u64,
    /// Bytes of pool space the replica holds.
    pub allocated: u64,
}

impl ReplicaStats {
    fn add(&mut self, o: &ReplicaStats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.unmaps += o.unmaps;
        self.flushes += o.flushes;
    }
}

/// Per-channel state that other threads read: in-flight counts for
/// quiescence and the channel's statistics (one writer, so no contention).
#[derive(Default)]
struct ChanState {
    inflight: [AtomicU64; 2],
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    unmaps: AtomicU64,
    flushes: AtomicU64,
}

impl ChanState {
    fn snapshot(&self) -> ReplicaStats {
        ReplicaStats {
            reads: self.reads.load(SeqCst),
            writes: self.writes.load(SeqCst),
            bytes_read: self.bytes_read.load(SeqCst),
            bytes_written: self.bytes_written.load(SeqCst),
            unmaps: self.unmaps.load(SeqCst),
            flushes: self.flushes.load(SeqCst),
            allocated: 0,
        }
    }

    fn bump(counter: &AtomicU64, by: u64) {
        // Only the owning thread writes, and readers want statistics, not
        // ordering: a relaxed load and store is a plain move, with no locked
        // instruction or fence on the I/O path.
        counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
    }
}

#[derive(Default)]
struct Chans {
    open: Vec<Arc<ChanState>>,
    closed: bool,
    totals: ReplicaStats,
}

/// A replica. It is a [`BlockDevice`]: open a channel on each reactor that
/// serves it.
pub struct Replica {
    pub(crate) shared: Arc<Shared>,
    me: std::sync::Weak<Replica>,
    pub(crate) slot: u32,
    pub(crate) incarnation: u32,
    uuid: Uuid,
    name: String,
    thin: bool,
    size: AtomicU64,
    /// Logical → physical map. Replaced (grown) and changed only under the
    /// pool's allocator lock.
    map: Mutex<Arc<Vec<AtomicU64>>>,
    map_gen: AtomicU64,
    /// Clusters held, changed under the allocator lock.
    allocated: AtomicU64,
    epoch: AtomicU64,
    grace_lock: AtomicBool,
    chans: Mutex<Chans>,
    /// Its data cannot be trusted (see [`crate::Pool::import`]): every I/O
    /// fails with `Unavailable`.
    faulted: AtomicBool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("uuid", &self.uuid)
            .field("name", &self.name)
            .field("size", &self.size())
            .field("thin", &self.thin)
            .finish()
    }
}

impl Replica {
    pub(crate) fn new(
        shared: Arc<Shared>,
        slot: u32,
        incarnation: u32,
        uuid: Uuid,
        name: String,
        size: u64,
        thin: bool,
    ) -> Arc<Self> {
        let n = size.div_ceil(u64::from(shared.cluster_size));
        Arc::new_cyclic(|me| Replica {
            shared,
            me: me.clone(),
            slot,
            incarnation,
            uuid,
            name,
            thin,
            size: AtomicU64::new(size),
            map: Mutex::new(Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())),
            map_gen: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            grace_lock: AtomicBool::new(false),
            chans: Mutex::new(Chans::default()),
            faulted: AtomicBool::new(false),
        })
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    pub fn is_thin(&self) -> bool {
        self.thin
    }

    /// Identity, size and space held.
    pub(crate) fn set_faulted(&self) {
        self.faulted.store(true, SeqCst);
    }

    /// Whether the replica may have lost data with a damaged group header:
    /// it serves no I/O; rebuild it elsewhere from its peers.
    pub fn is_faulted(&self) -> bool {
        self.faulted.load(SeqCst)
    }

    pub fn replica_info(&self) -> ReplicaInfo {
        ReplicaInfo {
            uuid: self.uuid,
            name: self.name.clone(),
            size: self.size(),
            thin: self.thin,
            faulted: self.is_faulted(),
            allocated: self.allocated_bytes(),
            pool_uuid: self.shared.uuid,
            pool_name: self.shared.name.clone(),
        }
    }

    /// Bytes of pool space held.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(SeqCst) * u64::from(self.shared.cluster_size)
    }

    /// I/O counters of every channel, open or closed.
    pub fn stats(&self) -> ReplicaStats {
        let chans = self.lock_chans();
        let mut s = chans.totals.clone();
        for c in &chans.open {
            s.add(&c.snapshot());
        }
        s.allocated = self.allocated_bytes();
        s
    }

    /// Number of open channels.
    pub fn open_channels(&self) -> usize {
        self.lock_chans().open.len()
    }

    fn lock_chans(&self) -> MutexGuard<'_, Chans> {
        self.chans.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_map(&self) -> MutexGuard<'_, Arc<Vec<AtomicU64>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses new channels if none is open; returns whether it closed.
    pub(crate) fn close_if_idle(&self) -> bool {
        let mut c = self.lock_chans();
        if c.open.is_empty() {
            c.closed = true;
            true
        } else {
            false
        }
    }

    /// Sets a mapping at import or for thick allocation (allocator lock held
    /// by the caller).
    pub(crate) fn set_mapping(&self, logical: u64, phys: u64) {
        let map = self.lock_map();
        if let Some(slot) = map.get(logical as usize) {
            if slot.swap(phys + 1, SeqCst) == 0 {
                self.allocated.fetch_add(1, SeqCst);
            }
        }
    }

    /// Physical clusters of this replica (allocator lock held by the caller).
    pub(crate) fn mapped_clusters(&self) -> Vec<(u64, u64)> {
        let map = self.lock_map();
        map.iter()
            .enumerate()
            .filter_map(|(l, v)| {
                let v = v.load(SeqCst);
                (v != 0 && v != PENDING).then(|| (l as u64, v - 1))
            })
            .collect()
    }

    /// Grows the map and the size (allocator lock held by the caller).
    pub(crate) fn grow_to(&self, size: u64) {
        let n = size.div_ceil(u64::from(self.shared.cluster_size)) as usize;
        let mut map = self.lock_map();
        if n > map.len() {
            let grown: Vec<AtomicU64> = (0..n)
                .map(|i| AtomicU64::new(map.get(i).map_or(0, |v| v.load(SeqCst))))
                .collect();
            *map = Arc::new(grown);
            self.map_gen.fetch_add(1, SeqCst);
        }
        self.size.store(size, SeqCst);
    }

    fn entry(&self, logical: u64) -> Entry {
        Entry {
            owner: self.slot + 1,
            incarnation: self.incarnation,
            logical,
            refs: 1,
        }
    }

    /// Waits until no I/O that started before this call is still running.
    async fn quiesce(&self) {
        let n = &self.shared.notify;
        let _held = n.lock(&self.grace_lock).await;
        self.shared.quiescing.fetch_add(1, SeqCst);
        for _ in 0..2 {
            let old = self.epoch.fetch_add(1, SeqCst);
            let open = self.lock_chans().open.clone();
            for c in open {
                loop {
                    let e = n.epoch();
                    if c.inflight[(old & 1) as usize].load(SeqCst) == 0 {
                        break;
                    }
                    n.wait(e).await;
                }
            }
        }
        self.shared.quiescing.fetch_sub(1, SeqCst);
    }
}

impl BlockDevice for Replica {
    fn incarnation(&self) -> Option<u64> {
        Some(self.shared.opening)
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            block_size: BLOCK_SIZE,
            num_blocks: self.size() / u64::from(BLOCK_SIZE),
            volatile_write_cache: true,
            dealloc_reads_zeroes: true,
        }
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let st = Arc::new(ChanState::default());
        {
            let mut c = self.lock_chans();
            if c.closed || self.shared.closed.load(SeqCst) {
                return Err(BdevError::Unavailable {
                    reason: format!("replica {} is destroyed or its pool closed", self.uuid),
                });
            }
            c.open.push(st.clone());
        }
        let me = self.me.upgrade().ok_or(BdevError::Unavailable {
            reason: format!("replica {} is gone", self.uuid),
        });
        let me = match me {
            Ok(me) => me,
            Err(e) => {
                self.lock_chans().open.retain(|c| !Arc::ptr_eq(c, &st));
                return Err(e);
            }
        };
        let base = match self.shared.open_device_channel() {
            Ok(b) => b,
            Err(e) => {
                self.lock_chans().open.retain(|c| !Arc::ptr_eq(c, &st));
                return Err(e);
            }
        };
        let map_gen = self.map_gen.load(SeqCst);
        let map = self.lock_map().clone();
        Ok(Box::new(ReplicaChannel {
            r: me,
            st,
            base: Rc::new(base),
            map: RefCell::new((map_gen, map)),
        }))
    }
}

/// One reactor's channel to a replica.
struct ReplicaChannel {
    r: Arc<Replica>,
    st: Arc<ChanState>,
    base: Rc<DevChannel>,
    map: RefCell<(u64, Arc<Vec<AtomicU64>>)>,
}

impl Drop for ReplicaChannel {
    fn drop(&mut self) {
        let mut c = self.r.lock_chans();
        c.open.retain(|x| !Arc::ptr_eq(x, &self.st));
        let s = self.st.snapshot();
        c.totals.add(&s);
    }
}

/// Counts an I/O in flight on its channel for the epoch it started in.
struct InFlight<'a>(&'a AtomicU64, &'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
        if self.1.quiescing.load(SeqCst) != 0 {
            self.1.notify.notify();
        }
    }
}

/// What reserving a cluster for a first write found.
enum Reserve {
    Reserved(u64),
    Mapped,
    Busy,
    NoSpace,
}

impl ReplicaChannel {
    fn enter(&self) -> InFlight<'_> {
        let e = self.r.epoch.load(SeqCst);
        let c = &self.st.inflight[(e & 1) as usize];
        c.fetch_add(1, SeqCst);
        InFlight(c, &self.r.shared)
    }

    fn base(&self) -> Result<Rc<DevChannel>, BdevError> {
        if self.r.is_faulted() {
            return Err(BdevError::Unavailable {
                reason: format!(
                    "replica {} is faulted: a damaged pool group header may have held its clusters",
                    self.r.uuid
                ),
            });
        }
        Ok(self.base.clone())
    }

    /// The map value of logical cluster `l`.
    fn lookup(&self, l: u64) -> u64 {
        let gen = self.r.map_gen.load(SeqCst);
        let mut m = self.map.borrow_mut();
        if m.0 != gen {
            *m = (gen, self.r.lock_map().clone());
        }
        m.1.get(l as usize).map_or(0, |v| v.load(SeqCst))
    }

    fn info(&self) -> DeviceInfo {
        self.r.info()
    }

    fn reserve(&self, l: u64) -> Reserve {
        let mut a = self.r.shared.lock_alloc();
        let map = self.r.lock_map();
        let Some(slot) = map.get(l as usize) else {
            return Reserve::NoSpace;
        };
        match slot.load(SeqCst) {
            0 => match a.free.pop() {
                Some(p) => {
                    slot.store(PENDING, SeqCst);
                    Reserve::Reserved(p)
                }
                None => Reserve::NoSpace,
            },
            PENDING => Reserve::Busy,
            _ => Reserve::Mapped,
        }
    }

    /// Splits `lba..+blocks` at cluster boundaries: (logical cluster, block
    /// within it, blocks, offset in blocks from `lba`).
    fn segments(&self, lba: u64, blocks: u64) -> Vec<(u64, u64, u64, u64)> {
        let cb = self.r.shared.cluster_blocks;
        let mut out = Vec::new();
        let mut at = lba;
        while at < lba + blocks {
            let l = at / cb;
            let within = at % cb;
            let n = (cb - within).min(lba + blocks - at);
            out.push((l, within, n, at - lba));
            at += n;
        }
        out
    }

    async fn read_impl(&self, lba: u64, mut buf: IoBuf) -> BufResult {
        let blocks = match self.info().check_buf(lba, buf.len()) {
            Ok(b) => b,
            Err(e) => return (Err(e), buf),
        };
        let _g = self.enter();
        ChanState::bump(&self.st.reads, 1);
        ChanState::bump(&self.st.bytes_read, buf.len() as u64);
        let base = match self.base() {
            Ok(b) => b,
            Err(e) => return (Err(e), buf),
        };
        let cb = self.r.shared.cluster_blocks;
        if lba / cb == (lba + blocks - 1) / cb {
            let (l, within) = (lba / cb, lba % cb);
            let v = self.lookup(l);
            if v == 0 || v == PENDING {
                buf.zero();
                return (Ok(()), buf);
            }
            let plba = self.r.shared.cluster_lba(v - 1) + within;
            return base.read_at(plba, buf).await;
        }
        let bs = BLOCK_SIZE as usize;
        for (l, within, n, off) in self.segments(lba, blocks) {
            let range = off as usize * bs..(off + n) as usize * bs;
            let v = self.lookup(l);
            if v == 0 || v == PENDING {
                buf[range].fill(0);
                continue;
            }
            let plba = self.r.shared.cluster_lba(v - 1) + within;
            let (r, part) = base.read_at(plba, IoBuf::zeroed(range.len())).await;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            buf[range].copy_from_slice(&part);
        }
        (Ok(()), buf)
    }

    async fn write_impl(&self, lba: u64, buf: IoBuf, fua: bool) -> BufResult {
        let blocks = match self.info().check_buf(lba, buf.len()) {
            Ok(b) => b,
            Err(e) => return (Err(e), buf),
        };
        let _g = self.enter();
        ChanState::bump(&self.st.writes, 1);
        ChanState::bump(&self.st.bytes_written, buf.len() as u64);
        let base = match self.base() {
            Ok(b) => b,
            Err(e) => return (Err(e), buf),
        };
        let cb = self.r.shared.cluster_blocks;
        if lba / cb == (lba + blocks - 1) / cb {
            return self
                .write_cluster(&base, lba / cb, lba % cb, buf, fua)
                .await;
        }
        let bs = BLOCK_SIZE as usize;
        for (l, within, n, off) in self.segments(lba, blocks) {
            let part = IoBuf::from_slice(&buf[off as usize * bs..(off + n) as usize * bs]);
            let (r, _) = self.write_cluster(&base, l, within, part, fua).await;
            if let Err(e) = r {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Writes inside logical cluster `l`, allocating it on first write.
    async fn write_cluster(
        &self,
        base: &DevChannel,
        l: u64,
        within: u64,
        buf: IoBuf,
        fua: bool,
    ) -> BufResult {
        let n = &self.r.shared.notify;
        loop {
            let e = n.epoch();
            let v = self.lookup(l);
            if v != 0 && v != PENDING {
                let plba = self.r.shared.cluster_lba(v - 1) + within;
                return base.write_at(plba, buf, fua).await;
            }
            if v == PENDING {
                n.wait(e).await;
                continue;
            }
            match self.reserve(l) {
                Reserve::Reserved(p) => {
                    return self.first_write(base, l, p, within, buf, fua).await
                }
                Reserve::Mapped => continue,
                Reserve::Busy => n.wait(e).await,
                Reserve::NoSpace => return (Err(BdevError::NoSpace), buf),
            }
        }
    }

    /// Allocates physical cluster `p` for logical cluster `l`: the whole
    /// cluster is zeroed or written, made durable, and only then the entry
    /// naming it is written; the map publishes it last.
    async fn first_write(
        &self,
        base: &dyn IoChannel,
        l: u64,
        p: u64,
        within: u64,
        buf: IoBuf,
        fua: bool,
    ) -> BufResult {
        let shared = &self.r.shared;
        let plba = shared.cluster_lba(p);
        let cb = shared.cluster_blocks;
        let len_blocks = (buf.len() / BLOCK_SIZE as usize) as u64;
        let (res, buf) = if within == 0 && len_blocks == cb {
            base.write(plba, buf, false).await
        } else {
            match zero_blocks(base, plba, cb).await {
                Ok(()) => base.write(plba + within, buf, false).await,
                Err(e) => (Err(e), buf),
            }
        };
        if let Err(e) = res {
            self.abort(l, p, false);
            return (Err(e), buf);
        }
        if let Err(e) = base.flush().await {
            self.abort(l, p, false);
            return (Err(e), buf);
        }
        shared.lock_alloc().entries[p as usize] = self.r.entry(l);
        let mut r = shared.persist_groups(base, &[p / GROUP_CLUSTERS]).await;
        if r.is_ok() && fua {
            r = base.flush().await;
        }
        if let Err(e) = r {
            self.abort(l, p, true);
            return (Err(e), buf);
        }
        {
            let _a = shared.lock_alloc();
            let map = self.r.lock_map();
            if let Some(slot) = map.get(l as usize) {
                slot.store(p + 1, SeqCst);
            }
            self.r.allocated.fetch_add(1, SeqCst);
        }
        shared.notify.notify();
        (Ok(()), buf)
    }

    /// Undoes a reservation. A cluster whose entry may have reached the disk
    /// is kept out of the free list until the next import decides.
    fn abort(&self, l: u64, p: u64, entry_written: bool) {
        let mut a = self.r.shared.lock_alloc();
        if let Some(slot) = self.r.lock_map().get(l as usize) {
            slot.store(0, SeqCst);
        }
        if entry_written {
            a.entries[p as usize] = Entry::FREE;
        } else {
            a.free.push(p);
        }
        drop(a);
        self.r.shared.notify.notify();
    }

    /// Write zeroes and deallocate: whole clusters of a thin replica are
    /// released, the rest is zeroed in place.
    async fn unmap_impl(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.info().check_range(lba, blocks)?;
        ChanState::bump(&self.st.unmaps, 1);
        if blocks == 0 {
            return Ok(());
        }
        let base = self.base()?;
        let cb = self.r.shared.cluster_blocks;
        let mut release = Vec::new();
        for (l, within, n, _) in self.segments(lba, blocks) {
            if self.r.thin && within == 0 && n == cb {
                release.push(l);
                continue;
            }
            // Zero in place; an unmapped cluster already reads zeros. The
            // in-flight count keeps a concurrent release from reusing it.
            let _g = self.enter();
            let v = self.lookup(l);
            if v != 0 && v != PENDING {
                zero_blocks(&*base, self.r.shared.cluster_lba(v - 1) + within, n).await?;
            }
        }
        if !release.is_empty() {
            self.release(&*base, release).await?;
        }
        Ok(())
    }

    /// Releases logical clusters: entries freed on disk (durably), map
    /// cleared, in-flight I/O drained, then the clusters are free.
    async fn release(&self, base: &dyn IoChannel, mut todo: Vec<u64>) -> Result<(), BdevError> {
        let shared = &self.r.shared;
        while !todo.is_empty() {
            let seen = shared.notify.epoch();
            let mut taken = Vec::new();
            let mut again = Vec::new();
            {
                let mut a = shared.lock_alloc();
                let map = self.r.lock_map();
                for &l in &todo {
                    let Some(slot) = map.get(l as usize) else {
                        continue;
                    };
                    match slot.load(SeqCst) {
                        0 => {}
                        PENDING => again.push(l),
                        v => {
                            slot.store(PENDING, SeqCst);
                            a.entries[(v - 1) as usize] = Entry::FREE;
                            taken.push((l, v - 1));
                        }
                    }
                }
            }
            if !taken.is_empty() {
                let mut groups: Vec<u64> = taken.iter().map(|&(_, p)| p / GROUP_CLUSTERS).collect();
                groups.sort_unstable();
                groups.dedup();
                let mut r = shared.persist_groups(base, &groups).await;
                if r.is_ok() {
                    r = base.flush().await;
                }
                if let Err(e) = r {
                    // The entries may or may not be free on disk: keep the
                    // mappings, and write the entries back as owned.
                    {
                        let mut a = shared.lock_alloc();
                        let map = self.r.lock_map();
                        for &(l, p) in &taken {
                            a.entries[p as usize] = self.r.entry(l);
                            if let Some(slot) = map.get(l as usize) {
                                slot.store(p + 1, SeqCst);
                            }
                        }
                    }
                    shared.notify.notify();
                    let _ = shared.persist_groups(base, &groups).await;
                    return Err(e);
                }
                {
                    let _a = shared.lock_alloc();
                    let map = self.r.lock_map();
                    for &(l, _) in &taken {
                        if let Some(slot) = map.get(l as usize) {
                            slot.store(0, SeqCst);
                        }
                    }
                    self.r.allocated.fetch_sub(taken.len() as u64, SeqCst);
                }
                shared.notify.notify();
                self.r.quiesce().await;
                let mut a = shared.lock_alloc();
                a.free.extend(taken.iter().map(|&(_, p)| p));
            }
            if !again.is_empty() {
                shared.notify.wait(seen).await;
            }
            todo = again;
        }
        Ok(())
    }
}

/// Zeroes `blocks` blocks at `lba` of the device, by write zeroes when it
/// has it, by writing zeros otherwise.
async fn zero_blocks(base: &dyn IoChannel, lba: u64, blocks: u64) -> Result<(), BdevError> {
    if base.write_zeroes(lba, blocks).await.is_ok() {
        return Ok(());
    }
    const CHUNK: u64 = 2048;
    let mut at = lba;
    while at < lba + blocks {
        let n = CHUNK.min(lba + blocks - at);
        let (r, _) = base
            .write(
                at,
                IoBuf::zeroed((n * u64::from(BLOCK_SIZE)) as usize),
                false,
            )
            .await;
        r?;
        at += n;
    }
    Ok(())
}

impl IoChannel for ReplicaChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(self.read_impl(lba, buf))
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(self.write_impl(lba, buf, fua))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(async move {
            ChanState::bump(&self.st.flushes, 1);
            self.base()?.flush().await
        })
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.unmap_impl(lba, blocks))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.unmap_impl(lba, blocks))
    }
}
