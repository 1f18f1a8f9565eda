//! Pools: create, import, export, destroy, grow, and the replica table.
//!
//! Control operations are synchronous and do their metadata I/O with
//! `pread`/`pwrite`/`fdatasync` on the calling thread; call them from a
//! blocking-capable thread (`tokio::task::spawn_blocking`), never from a
//! reactor. They are serialized by one control lock per pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::check::{load, resolve, suspects, Damage};
use crate::error::{Location, PoolError, Result};
use crate::format::{
    cluster_offset, clusters_for, encode_group, group_offset, groups_for, replica_offset,
    valid_cluster_size, Entry, ReplicaRecord, Superblock, BLOCK_SIZE, DATA_START, GROUP_CLUSTERS,
    MAX_POOL_NAME, MAX_REPLICA_NAME, MD_BLOCK, REPLICA_SLOTS, REPLICA_TABLE_START,
};
use crate::mdio::MdFile;
use crate::replica::Replica;
use crate::shared::Shared;

/// How long an import waits for a previous holder of the pool (typically a
/// killed engine whose last I/O is still in flight) to let go.
pub(crate) const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Default cluster size: 1 MiB.
pub const DEFAULT_CLUSTER_SIZE: u32 = 1 << 20;

/// Parameters of a new pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCreate {
    pub name: String,
    pub uuid: Uuid,
    /// Bytes per cluster: a power of two from 4 KiB to 64 MiB.
    pub cluster_size: u32,
}

/// Parameters of a new replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaCreate {
    pub uuid: Uuid,
    pub name: String,
    /// Size in bytes, a multiple of 512.
    pub size: u64,
    /// Thin: clusters allocated on first write; thick: all at create.
    pub thin: bool,
}

/// What a pool is and holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: Uuid,
    pub path: PathBuf,
    /// Bytes of data clusters.
    pub capacity: u64,
    /// Bytes of clusters held by replicas (or being allocated).
    pub used: u64,
    /// Sum of replica sizes (may exceed capacity with thin replicas).
    pub committed: u64,
    pub cluster_size: u32,
    /// Number of replicas.
    pub replicas: usize,
}

struct Ctl {
    records: Vec<Option<ReplicaRecord>>,
    replicas: BTreeMap<Uuid, Arc<Replica>>,
    /// Damaged group headers found at import and not yet repaired: their
    /// clusters are neither free nor mapped.
    damaged_groups: Vec<Damage>,
}

/// An in-memory entry for the clusters of a damaged group: not free (they
/// may hold a faulted replica's data), owned by no replica.
const LOST: Entry = Entry {
    owner: u32::MAX,
    incarnation: 0,
    logical: u64::MAX,
    refs: 0,
};

/// What [`Pool::check`] found, and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCheck {
    /// Damaged group headers still on the device.
    pub damaged: Vec<Damage>,
    /// Group headers rewritten by this call.
    pub repaired: Vec<Damage>,
    /// Faulted replicas: they serve no I/O and are to be rebuilt from their
    /// peers and destroyed.
    pub faulted_replicas: Vec<Uuid>,
}

/// An imported pool.
pub struct Pool {
    shared: Arc<Shared>,
    ctl: Mutex<Ctl>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("uuid", &self.shared.uuid)
            .field("path", &self.shared.path)
            .finish()
    }
}

impl Pool {
    /// Formats `path` (a file or block device) as a new pool and imports it.
    /// If the device already holds a pool with this name and UUID, imports
    /// that instead; any other pool makes this fail with `AlreadyExists`.
    pub fn create(path: &Path, opts: PoolCreate) -> Result<Arc<Pool>> {
        if opts.name.is_empty() || opts.name.len() > MAX_POOL_NAME {
            return Err(PoolError::InvalidArgument {
                reason: format!("pool name must be 1..={MAX_POOL_NAME} bytes"),
            });
        }
        if !valid_cluster_size(opts.cluster_size) {
            return Err(PoolError::InvalidArgument {
                reason: format!(
                    "cluster size {} is not a power of two from 4 KiB to 64 MiB",
                    opts.cluster_size
                ),
            });
        }
        let md = MdFile::open(path, true)?;
        md.lock(true, LOCK_WAIT)?;
        match crate::check::read_superblock(&md) {
            Ok((sb, _)) => {
                if sb.name == opts.name
                    && sb.uuid == opts.uuid
                    && sb.cluster_size == opts.cluster_size
                {
                    drop(md);
                    return Pool::import(path);
                }
                return Err(PoolError::AlreadyExists {
                    what: format!("pool {} ({}) on {path:?}", sb.name, sb.uuid),
                });
            }
            Err(PoolError::BadMagic { .. }) => {}
            Err(e @ PoolError::Io { .. }) => return Err(e),
            // A damaged or foreign-version superblock is not overwritten
            // silently either.
            Err(e) => return Err(e),
        }
        let size = md.size()?;
        let num_clusters = clusters_for(size, opts.cluster_size);
        if num_clusters == 0 {
            return Err(PoolError::DeviceTooSmall {
                size,
                min: DATA_START + MD_BLOCK + u64::from(opts.cluster_size),
            });
        }
        let sb = Superblock {
            generation: 1,
            uuid: opts.uuid,
            name: opts.name,
            cluster_size: opts.cluster_size,
            device_size: size,
            num_clusters,
        };
        // Replica table and groups first, the superblock last: a pool is
        // visible only when all its metadata is in place.
        md.zero(REPLICA_TABLE_START, u64::from(REPLICA_SLOTS) * MD_BLOCK)?;
        for g in 0..groups_for(num_clusters) {
            md.write(
                group_offset(sb.cluster_size, g),
                &encode_group(g, &sb.uuid, &[]),
            )?;
        }
        md.sync()?;
        write_superblock(&md, &sb)?;
        drop(md);
        tracing::info!(pool = %sb.name, uuid = %sb.uuid, ?path, clusters = num_clusters, "pool created");
        Pool::import(path)
    }

    /// Opens the pool on `path`, checks its metadata and rebuilds the
    /// allocation state by walking the cluster entries.
    ///
    /// A damaged replica record makes import fail. A damaged group header
    /// does not: its clusters are set aside (neither free nor mapped), every
    /// replica that may have owned one of them ([`crate::check`] explains
    /// which) is marked faulted in its record, durably, before the pool is
    /// served, and the others serve as before. [`Pool::check`] rewrites the
    /// damaged headers.
    pub fn import(path: &Path) -> Result<Arc<Pool>> {
        let md = MdFile::open(path, true)?;
        md.lock(true, LOCK_WAIT)?;
        let mut l = load(&md)?;
        let group_damage: Vec<Damage> = l
            .damage
            .iter()
            .filter(|d| d.location.offset >= DATA_START)
            .cloned()
            .collect();
        l.damage.retain(|d| d.location.offset < DATA_START);
        if let Some(d) = l.damage.first() {
            return Err(PoolError::Corrupt {
                location: d.location.clone(),
                reason: if l.damage.len() > 1 {
                    format!(
                        "{} (and {} more damaged blocks)",
                        d.reason,
                        l.damage.len() - 1
                    )
                } else {
                    d.reason.clone()
                },
            });
        }
        for d in &l.sb_damage {
            tracing::warn!(path = ?path, location = %d.location, reason = %d.reason, "damaged superblock copy; using the other one");
        }
        let r = resolve(&l);
        if let Some(&p) = r.doubly_owned.first() {
            let e = l.entries[p as usize];
            return Err(PoolError::Corrupt {
                location: Location {
                    offset: group_offset(l.sb.cluster_size, p / GROUP_CLUSTERS),
                    what: format!("cluster group {}", p / GROUP_CLUSTERS),
                },
                reason: format!(
                    "cluster {p} claims logical cluster {} of replica slot {} that another cluster holds",
                    e.logical,
                    e.owner - 1
                ),
            });
        }
        let mut entries = l.entries.clone();
        for &p in r.orphaned.iter().chain(&r.leaked) {
            entries[p as usize] = Entry::FREE;
        }
        let suspects = suspects(&l, &r);
        for d in &group_damage {
            tracing::error!(path = ?path, location = %d.location, reason = %d.reason, "damaged cluster group header; its clusters are set aside");
        }
        for &g in &l.damaged_groups {
            let start = (g * GROUP_CLUSTERS) as usize;
            let end = (start + GROUP_CLUSTERS as usize).min(entries.len());
            entries[start..end].fill(LOST);
        }
        let mut marked = false;
        for &s in &suspects {
            if let Some(rec) = l.records[s as usize].as_mut().filter(|r| !r.faulted) {
                rec.faulted = true;
                md.write(replica_offset(s), &rec.encode())?;
                marked = true;
                tracing::error!(path = ?path, replica = %rec.uuid, "replica may have lost clusters to a damaged group header; marked faulted");
            }
        }
        if marked {
            md.sync()?;
        }
        if !r.leaked.is_empty() {
            tracing::warn!(path = ?path, clusters = r.leaked.len(), "reclaimed clusters beyond their replica's size");
        }
        let shared = Arc::new(Shared::new(path.to_owned(), md, l.sb.clone(), entries)?);
        let mut replicas = BTreeMap::new();
        let mut by_slot = BTreeMap::new();
        for (s, rec) in l.records.iter().enumerate() {
            if let Some(rec) = rec.as_ref().filter(|r| r.active) {
                let rep = Replica::new(
                    shared.clone(),
                    s as u32,
                    rec.incarnation,
                    rec.uuid,
                    rec.name.clone(),
                    rec.size,
                    rec.thin,
                );
                if rec.faulted {
                    rep.set_faulted();
                }
                by_slot.insert(s as u32, rep.clone());
                replicas.insert(rec.uuid, rep);
            }
        }
        {
            let _a = shared.lock_alloc();
            for &(slot, logical, p) in &r.mappings {
                if let Some(rep) = by_slot.get(&slot) {
                    rep.set_mapping(logical, p);
                }
            }
        }
        tracing::info!(pool = %l.sb.name, ?path, replicas = replicas.len(), "pool imported");
        Ok(Arc::new(Pool {
            shared,
            ctl: Mutex::new(Ctl {
                records: l.records,
                replicas,
                damaged_groups: group_damage,
            }),
        }))
    }

    fn lock_ctl(&self) -> Result<MutexGuard<'_, Ctl>> {
        let g = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared.closed.load(SeqCst) {
            return Err(PoolError::Closed {
                name: self.shared.name.clone(),
            });
        }
        Ok(g)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn uuid(&self) -> Uuid {
        self.shared.uuid
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Capacity, use and commitment.
    pub fn info(&self) -> PoolInfo {
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let a = self.shared.lock_alloc();
        let cs = u64::from(self.shared.cluster_size);
        let n = a.sb.num_clusters;
        PoolInfo {
            name: self.shared.name.clone(),
            uuid: self.shared.uuid,
            path: self.shared.path.clone(),
            capacity: n * cs,
            used: (n - a.free.len() as u64) * cs,
            committed: ctl.replicas.values().map(|r| r.size()).sum(),
            cluster_size: self.shared.cluster_size,
            replicas: ctl.replicas.len(),
        }
    }

    /// Reports the damaged group headers found at import and the faulted
    /// replicas; with `repair`, rewrites each damaged header with every
    /// entry free (flushed) and returns its clusters to the free list. The
    /// faulted replicas were recorded so at import, before this, so nothing
    /// a repaired header frees is reachable from a replica that serves I/O:
    /// they stay faulted until destroyed.
    pub fn check(&self, repair: bool) -> Result<PoolCheck> {
        let mut ctl = self.lock_ctl()?;
        let faulted_replicas = ctl
            .replicas
            .values()
            .filter(|r| r.is_faulted())
            .map(|r| r.uuid())
            .collect();
        if !repair || ctl.damaged_groups.is_empty() {
            return Ok(PoolCheck {
                damaged: ctl.damaged_groups.clone(),
                repaired: Vec::new(),
                faulted_replicas,
            });
        }
        let damaged = std::mem::take(&mut ctl.damaged_groups);
        let cs = self.shared.cluster_size;
        let mut result = Ok(());
        let mut repaired = Vec::new();
        for d in damaged {
            let g = (d.location.offset - DATA_START) / (MD_BLOCK + u64::from(cs) * GROUP_CLUSTERS);
            if result.is_ok() && group_offset(cs, g) == d.location.offset {
                self.shared.md_writes.fetch_add(1, SeqCst);
                result = self
                    .shared
                    .md
                    .write(d.location.offset, &encode_group(g, &self.shared.uuid, &[]))
                    .and_then(|()| self.shared.md.sync());
                if result.is_ok() {
                    let mut a = self.shared.lock_alloc();
                    let start = g * GROUP_CLUSTERS;
                    let end = (start + GROUP_CLUSTERS).min(a.entries.len() as u64);
                    for p in start..end {
                        a.entries[p as usize] = Entry::FREE;
                    }
                    // Lowest first: the free list pops from its end.
                    let mut free: Vec<u64> = (start..end).rev().collect();
                    free.append(&mut a.free);
                    a.free = free;
                    drop(a);
                    tracing::info!(pool = %self.shared.name, location = %d.location, "damaged group header rewritten");
                    repaired.push(d);
                    continue;
                }
            }
            ctl.damaged_groups.push(d);
        }
        result?;
        Ok(PoolCheck {
            damaged: ctl.damaged_groups.clone(),
            repaired,
            faulted_replicas,
        })
    }

    /// Every replica.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        ctl.replicas.values().cloned().collect()
    }

    /// One replica.
    pub fn replica(&self, uuid: Uuid) -> Result<Arc<Replica>> {
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        ctl.replicas
            .get(&uuid)
            .cloned()
            .ok_or(PoolError::ReplicaNotFound { uuid })
    }

    /// Metadata blocks written since import: allocation, release and control
    /// operations write them; writes into allocated clusters never do.
    pub fn metadata_writes(&self) -> u64 {
        self.shared.md_writes.load(SeqCst)
    }

    fn write_record(&self, slot: u32, rec: &ReplicaRecord) -> Result<()> {
        self.shared.md_writes.fetch_add(1, SeqCst);
        self.shared.md.write(replica_offset(slot), &rec.encode())?;
        self.shared.md.sync()
    }

    /// Creates a replica; returns the existing one if it has the same
    /// parameters.
    pub fn create_replica(&self, req: ReplicaCreate) -> Result<Arc<Replica>> {
        if req.size == 0 || !req.size.is_multiple_of(u64::from(BLOCK_SIZE)) {
            return Err(PoolError::InvalidArgument {
                reason: format!(
                    "replica size {} is not a positive multiple of 512",
                    req.size
                ),
            });
        }
        if req.name.len() > MAX_REPLICA_NAME {
            return Err(PoolError::InvalidArgument {
                reason: format!("replica name longer than {MAX_REPLICA_NAME} bytes"),
            });
        }
        let mut ctl = self.lock_ctl()?;
        if let Some(r) = ctl.replicas.get(&req.uuid) {
            if r.name() == req.name && r.size() == req.size && r.is_thin() == req.thin {
                return Ok(r.clone());
            }
            return Err(PoolError::AlreadyExists {
                what: format!("replica {}", req.uuid),
            });
        }
        if !req.name.is_empty() && ctl.replicas.values().any(|r| r.name() == req.name) {
            return Err(PoolError::AlreadyExists {
                what: format!("replica named {:?}", req.name),
            });
        }
        let slot = ctl
            .records
            .iter()
            .position(|r| r.as_ref().is_none_or(|r| !r.active))
            .ok_or(PoolError::TooManyReplicas { max: REPLICA_SLOTS })? as u32;
        let incarnation = ctl.records[slot as usize]
            .as_ref()
            .map_or(1, |r| r.incarnation.wrapping_add(1).max(1));
        let clusters = req.size.div_ceil(u64::from(self.shared.cluster_size));
        let reserved = if req.thin {
            Vec::new()
        } else {
            self.reserve(clusters)?
        };
        let rec = ReplicaRecord {
            active: true,
            incarnation,
            uuid: req.uuid,
            name: req.name.clone(),
            size: req.size,
            thin: req.thin,
            faulted: false,
        };
        if let Err(e) = self.write_record(slot, &rec) {
            self.unreserve(&reserved);
            return Err(e);
        }
        ctl.records[slot as usize] = Some(rec);
        let rep = Replica::new(
            self.shared.clone(),
            slot,
            incarnation,
            req.uuid,
            req.name,
            req.size,
            req.thin,
        );
        ctl.replicas.insert(req.uuid, rep.clone());
        if !req.thin {
            self.thick_fill(&rep, 0, reserved, None)?;
        }
        tracing::info!(pool = %self.shared.name, replica = %rep.uuid(), size = req.size, thin = req.thin, "replica created");
        Ok(rep)
    }

    /// Takes `n` free clusters for a thick replica.
    fn reserve(&self, n: u64) -> Result<Vec<u64>> {
        let mut a = self.shared.lock_alloc();
        let cs = u64::from(self.shared.cluster_size);
        if (a.free.len() as u64) < n {
            return Err(PoolError::NoSpace {
                needed: n * cs,
                free: a.free.len() as u64 * cs,
            });
        }
        let at = a.free.len() - n as usize;
        Ok(a.free.split_off(at))
    }

    fn unreserve(&self, clusters: &[u64]) {
        self.shared.lock_alloc().free.extend_from_slice(clusters);
    }

    /// Zeroes reserved clusters, makes them durable, then writes the entries
    /// giving them to `rep` as logical clusters `first..`; finally grows the
    /// replica to `grow_to` (if given) and maps them, under the allocator
    /// lock, so no write can allocate those logical clusters meanwhile.
    fn thick_fill(
        &self,
        rep: &Arc<Replica>,
        first: u64,
        clusters: Vec<u64>,
        grow_to: Option<u64>,
    ) -> Result<()> {
        let cs = self.shared.cluster_size;
        let r = (|| {
            for &p in &clusters {
                self.shared
                    .md
                    .zero_allocated(cluster_offset(cs, p), u64::from(cs))?;
            }
            self.shared.md.sync()
        })();
        if let Err(e) = r {
            self.unreserve(&clusters);
            if let Some(size) = grow_to {
                // The record already holds the new size; missing clusters
                // are allocated on first write like a thin replica's.
                let _a = self.shared.lock_alloc();
                rep.grow_to(size);
            }
            return Err(e);
        }
        let mut groups: Vec<u64> = clusters.iter().map(|p| p / GROUP_CLUSTERS).collect();
        groups.sort_unstable();
        groups.dedup();
        {
            let mut a = self.shared.lock_alloc();
            for (i, &p) in clusters.iter().enumerate() {
                a.entries[p as usize] = Entry {
                    owner: rep.slot + 1,
                    incarnation: rep.incarnation,
                    logical: first + i as u64,
                    refs: 1,
                };
            }
        }
        let r = self
            .shared
            .persist_groups_sync(&groups)
            .and_then(|()| self.shared.md.sync());
        if let Err(e) = r {
            // Entries may have reached the disk: keep the clusters out of
            // the free list; the next import settles them.
            let mut a = self.shared.lock_alloc();
            for &p in &clusters {
                a.entries[p as usize] = Entry::FREE;
            }
            if let Some(size) = grow_to {
                rep.grow_to(size);
            }
            return Err(e);
        }
        let _a = self.shared.lock_alloc();
        if let Some(size) = grow_to {
            rep.grow_to(size);
        }
        for (i, &p) in clusters.iter().enumerate() {
            rep.set_mapping(first + i as u64, p);
        }
        Ok(())
    }

    /// Destroys a replica and returns its clusters to the pool. Fails with
    /// `Busy` while channels to it are open. Destroying a missing replica
    /// succeeds (idempotent).
    pub fn destroy_replica(&self, uuid: Uuid) -> Result<()> {
        let mut ctl = self.lock_ctl()?;
        let Some(rep) = ctl.replicas.get(&uuid).cloned() else {
            return Ok(());
        };
        if !rep.close_if_idle() {
            return Err(PoolError::Busy {
                what: format!("replica {uuid}"),
                reason: format!("{} open channels", rep.open_channels()),
            });
        }
        let mut rec = ctl.records[rep.slot as usize]
            .clone()
            .ok_or(PoolError::ReplicaNotFound { uuid })?;
        rec.active = false;
        self.write_record(rep.slot, &rec)?;
        ctl.records[rep.slot as usize] = Some(rec);
        ctl.replicas.remove(&uuid);
        // Clear the entries so the checker sees no orphans; until this is
        // durable, entries naming the dead incarnation are free anyway.
        let freed: Vec<u64> = {
            let mut a = self.shared.lock_alloc();
            let freed: Vec<u64> = rep.mapped_clusters().into_iter().map(|(_, p)| p).collect();
            for &p in &freed {
                a.entries[p as usize] = Entry::FREE;
            }
            freed
        };
        let mut groups: Vec<u64> = freed.iter().map(|p| p / GROUP_CLUSTERS).collect();
        groups.sort_unstable();
        groups.dedup();
        let r = self
            .shared
            .persist_groups_sync(&groups)
            .and_then(|()| self.shared.md.sync());
        // The record is gone: the clusters are free on disk whether or not
        // the entries were rewritten.
        self.shared.lock_alloc().free.extend(freed.iter().rev());
        r?;
        tracing::info!(pool = %self.shared.name, replica = %uuid, clusters = freed.len(), "replica destroyed");
        Ok(())
    }

    /// Grows a replica to `new_size` bytes; shrinking is refused.
    pub fn resize_replica(&self, uuid: Uuid, new_size: u64) -> Result<()> {
        let mut ctl = self.lock_ctl()?;
        let rep = ctl
            .replicas
            .get(&uuid)
            .cloned()
            .ok_or(PoolError::ReplicaNotFound { uuid })?;
        let cur = rep.size();
        if new_size < cur {
            return Err(PoolError::ShrinkRefused {
                uuid,
                current: cur,
                requested: new_size,
            });
        }
        if !new_size.is_multiple_of(u64::from(BLOCK_SIZE)) {
            return Err(PoolError::InvalidArgument {
                reason: format!("replica size {new_size} is not a multiple of 512"),
            });
        }
        if new_size == cur {
            return Ok(());
        }
        let cs = u64::from(self.shared.cluster_size);
        let (old_n, new_n) = (cur.div_ceil(cs), new_size.div_ceil(cs));
        let reserved = if rep.is_thin() {
            Vec::new()
        } else {
            self.reserve(new_n - old_n)?
        };
        let mut rec = ctl.records[rep.slot as usize]
            .clone()
            .ok_or(PoolError::ReplicaNotFound { uuid })?;
        rec.size = new_size;
        if let Err(e) = self.write_record(rep.slot, &rec) {
            self.unreserve(&reserved);
            return Err(e);
        }
        ctl.records[rep.slot as usize] = Some(rec);
        if rep.is_thin() {
            let _a = self.shared.lock_alloc();
            rep.grow_to(new_size);
        } else {
            // The new range becomes visible together with its clusters.
            self.thick_fill(&rep, old_n, reserved, Some(new_size))?;
        }
        Ok(())
    }

    /// Takes in space the device gained since the pool was created or last
    /// grown. Returns the new capacity in bytes.
    pub fn grow(&self) -> Result<u64> {
        let _ctl = self.lock_ctl()?;
        let size = self.shared.md.size()?;
        let mut sb = self.shared.lock_alloc().sb.clone();
        let cs = u64::from(sb.cluster_size);
        let new_n = clusters_for(size, sb.cluster_size);
        if new_n <= sb.num_clusters {
            return Ok(sb.num_clusters * cs);
        }
        let (old_groups, new_groups) = (groups_for(sb.num_clusters), groups_for(new_n));
        for g in old_groups..new_groups {
            self.shared.md.write(
                group_offset(sb.cluster_size, g),
                &encode_group(g, &sb.uuid, &[]),
            )?;
        }
        self.shared.md.sync()?;
        sb.generation += 1;
        sb.device_size = size;
        sb.num_clusters = new_n;
        write_superblock(&self.shared.md, &sb)?;
        self.shared.add_groups(new_groups);
        let mut a = self.shared.lock_alloc();
        let old_n = a.sb.num_clusters;
        a.entries.resize(new_n as usize, Entry::FREE);
        let mut add: Vec<u64> = (old_n..new_n).rev().collect();
        add.append(&mut a.free);
        a.free = add;
        a.sb = sb;
        tracing::info!(pool = %self.shared.name, clusters = new_n, "pool grown");
        Ok(new_n * cs)
    }

    fn close(&self, what: &str) -> Result<MutexGuard<'_, Ctl>> {
        let ctl = self.lock_ctl()?;
        let busy: Vec<String> = ctl
            .replicas
            .values()
            .filter(|r| !r.close_if_idle())
            .map(|r| r.uuid().to_string())
            .collect();
        if !busy.is_empty() {
            return Err(PoolError::Busy {
                what: format!("pool {}", self.shared.name),
                reason: format!("cannot {what}: replicas in use: {}", busy.join(", ")),
            });
        }
        self.shared.md.sync()?;
        Ok(ctl)
    }

    /// Closes the pool cleanly; it can be imported again. Fails with `Busy`
    /// while any replica has open channels.
    pub fn export(&self) -> Result<()> {
        let mut ctl = self.close("export")?;
        self.shared.closed.store(true, SeqCst);
        ctl.replicas.clear();
        self.shared.md.unlock();
        tracing::info!(pool = %self.shared.name, "pool exported");
        Ok(())
    }

    /// Destroys the pool and every replica in it (erases the superblocks).
    /// Fails with `Busy` while any replica has open channels.
    pub fn destroy(&self) -> Result<()> {
        let mut ctl = self.close("destroy")?;
        let zero = [0u8; (2 * MD_BLOCK) as usize];
        self.shared.md.write(0, &zero)?;
        self.shared.md.sync()?;
        self.shared.closed.store(true, SeqCst);
        ctl.replicas.clear();
        self.shared.md.unlock();
        tracing::info!(pool = %self.shared.name, "pool destroyed");
        Ok(())
    }
}

/// Writes both superblock copies, one after the other, each made durable
/// before the next: a crash leaves at least one valid copy.
fn write_superblock(md: &MdFile, sb: &Superblock) -> Result<()> {
    let b = sb.encode();
    for copy in 0..crate::format::SB_COPIES {
        md.write(copy * MD_BLOCK, &b)?;
        md.sync()?;
    }
    Ok(())
}
