//! Reading a pool's metadata from disk, for import and for the offline
//! checker.

use std::path::Path;

use uuid::Uuid;

use crate::error::{Location, PoolError, Result};
use crate::format::{
    decode_group, group_offset, groups_for, replica_offset, DecodeError, Entry, ReplicaRecord,
    Superblock, GROUP_CLUSTERS, MD_BLOCK, REPLICA_SLOTS, REPLICA_TABLE_START,
};
use crate::mdio::MdFile;

/// A damaged metadata block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub location: Location,
    pub reason: String,
}

/// Everything the metadata says, before it is interpreted.
pub(crate) struct Loaded {
    pub sb: Superblock,
    /// Damaged superblock copies (the pool was loaded from another copy).
    pub sb_damage: Vec<Damage>,
    pub records: Vec<Option<ReplicaRecord>>,
    /// One entry per data cluster.
    pub entries: Vec<Entry>,
    /// Damaged replica records and groups.
    pub damage: Vec<Damage>,
    /// Indices of the damaged groups (their entries read as free).
    pub damaged_groups: Vec<u64>,
}

fn damage(offset: u64, what: String, e: &DecodeError) -> Damage {
    Damage {
        location: Location { offset, what },
        reason: e.to_string(),
    }
}

/// Picks the newest valid superblock copy.
pub(crate) fn read_superblock(md: &MdFile) -> Result<(Superblock, Vec<Damage>)> {
    let mut best: Option<Superblock> = None;
    let mut errs = Vec::new();
    for copy in 0..crate::format::SB_COPIES {
        let off = copy * MD_BLOCK;
        let b = md.read(off, MD_BLOCK as usize)?;
        match Superblock::decode(&b) {
            Ok(sb) => {
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
            Err(e) => errs.push((off, e)),
        }
    }
    let Some(sb) = best else {
        if let Some((_, DecodeError::Version(v))) = errs
            .iter()
            .find(|(_, e)| matches!(e, DecodeError::Version(_)))
        {
            return Err(PoolError::UnsupportedVersion { version: *v });
        }
        if errs.iter().all(|(_, e)| *e == DecodeError::Magic) {
            return Err(PoolError::BadMagic {
                path: md.path().to_owned(),
            });
        }
        let reason = errs
            .iter()
            .map(|(off, e)| format!("copy at byte offset {off}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(PoolError::BadSuperblock { reason });
    };
    let sb_damage = errs
        .iter()
        .map(|(off, e)| damage(*off, format!("superblock copy {}", off / MD_BLOCK), e))
        .collect();
    Ok((sb, sb_damage))
}

pub(crate) fn load(md: &MdFile) -> Result<Loaded> {
    let (sb, sb_damage) = read_superblock(md)?;
    let actual = md.size()?;
    if actual < sb.device_size {
        return Err(PoolError::DeviceShrank {
            recorded: sb.device_size,
            actual,
        });
    }
    let mut damage_list = Vec::new();
    let mut damaged_groups = Vec::new();
    let table = md.read(
        REPLICA_TABLE_START,
        REPLICA_SLOTS as usize * MD_BLOCK as usize,
    )?;
    let mut records = Vec::with_capacity(REPLICA_SLOTS as usize);
    for s in 0..REPLICA_SLOTS {
        let at = s as usize * MD_BLOCK as usize;
        match ReplicaRecord::decode(&table[at..at + MD_BLOCK as usize]) {
            Ok(r) => records.push(r),
            Err(e) => {
                damage_list.push(damage(replica_offset(s), format!("replica slot {s}"), &e));
                records.push(None);
            }
        }
    }
    let mut entries = Vec::with_capacity(sb.num_clusters as usize);
    for g in 0..groups_for(sb.num_clusters) {
        let off = group_offset(sb.cluster_size, g);
        let b = md.read(off, MD_BLOCK as usize)?;
        let n = (sb.num_clusters - g * GROUP_CLUSTERS).min(GROUP_CLUSTERS) as usize;
        match decode_group(&b, g, &sb.uuid) {
            Ok(es) => entries.extend_from_slice(&es[..n]),
            Err(e) => {
                damage_list.push(damage(off, format!("cluster group {g}"), &e));
                damaged_groups.push(g);
                entries.extend(std::iter::repeat_n(Entry::FREE, n));
            }
        }
    }
    Ok(Loaded {
        sb,
        sb_damage,
        records,
        entries,
        damage: damage_list,
        damaged_groups,
    })
}

/// Replicas that may have owned a cluster of a damaged group: every live
/// replica with a logical cluster no healthy group maps. Their entries may
/// have been in the lost header, so their data cannot be trusted; a replica
/// whose every cluster is mapped elsewhere owned none there (a logical
/// cluster has one owner). With no damaged group, none.
pub(crate) fn suspects(l: &Loaded, r: &Resolved) -> Vec<u32> {
    if l.damaged_groups.is_empty() {
        return Vec::new();
    }
    let cs = u64::from(l.sb.cluster_size);
    let mut mapped: std::collections::HashMap<u32, u64> = Default::default();
    for &(slot, _, _) in &r.mappings {
        *mapped.entry(slot).or_default() += 1;
    }
    l.records
        .iter()
        .enumerate()
        .filter_map(|(s, rec)| {
            let rec = rec.as_ref().filter(|r| r.active)?;
            let s = s as u32;
            let have = mapped.get(&s).copied().unwrap_or(0);
            (have < rec.size.div_ceil(cs)).then_some(s)
        })
        .collect()
}

/// How the entries of a loaded pool resolve.
#[derive(Default)]
pub(crate) struct Resolved {
    /// `(slot, logical, physical)` of every live mapping.
    pub mappings: Vec<(u32, u64, u64)>,
    /// Entries naming a destroyed replica (free space, reclaimable).
    pub orphaned: Vec<u64>,
    /// Entries of live replicas beyond their size (unreachable).
    pub leaked: Vec<u64>,
    /// Entries naming a logical cluster another entry already holds.
    pub doubly_owned: Vec<u64>,
}

pub(crate) fn resolve(l: &Loaded) -> Resolved {
    let cs = u64::from(l.sb.cluster_size);
    let mut out = Resolved::default();
    let mut seen: std::collections::HashSet<(u32, u64)> = Default::default();
    for (p, e) in l.entries.iter().enumerate() {
        let p = p as u64;
        if e.is_free() {
            continue;
        }
        let slot = e.owner - 1;
        let rec = l.records.get(slot as usize).and_then(|r| r.as_ref());
        let Some(rec) = rec.filter(|r| r.active && r.incarnation == e.incarnation) else {
            out.orphaned.push(p);
            continue;
        };
        if e.logical >= rec.size.div_ceil(cs) {
            out.leaked.push(p);
            continue;
        }
        if !seen.insert((slot, e.logical)) {
            out.doubly_owned.push(p);
            continue;
        }
        out.mappings.push((slot, e.logical, p));
    }
    out
}

/// What the offline checker found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub pool_uuid: Uuid,
    pub pool_name: String,
    pub generation: u64,
    pub cluster_size: u32,
    pub clusters: u64,
    /// Clusters owned by live replicas.
    pub used_clusters: u64,
    /// Live replicas.
    pub replicas: usize,
    /// Damaged superblock copies and metadata blocks.
    pub damaged: Vec<Damage>,
    /// Clusters owned by a live replica but outside its size.
    pub leaked: Vec<u64>,
    /// Clusters claiming a logical cluster another cluster already holds.
    pub doubly_owned: Vec<u64>,
    /// Clusters still naming a destroyed replica: free, reclaimed on reuse.
    pub orphaned: Vec<u64>,
    /// Replicas faulted (recorded so, or because a damaged group header may
    /// have named their clusters): they serve no I/O and are rebuilt from
    /// their peers.
    pub faulted_replicas: Vec<Uuid>,
}

impl CheckReport {
    /// No damage, no leaked and no doubly-owned clusters.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.leaked.is_empty() && self.doubly_owned.is_empty()
    }
}

/// Walks the metadata of the pool on `path` without changing it and reports
/// damaged blocks, leaked and doubly-owned clusters. Fails when no
/// superblock copy is readable, or with `Busy` when the pool is imported
/// (checking a live pool would race with its writes).
pub fn check(path: &Path) -> Result<CheckReport> {
    let md = MdFile::open(path, false)?;
    md.lock(false, crate::pool::LOCK_WAIT)?;
    let l = load(&md)?;
    let r = resolve(&l);
    let mut damaged = l.sb_damage.clone();
    damaged.extend(l.damage.iter().cloned());
    let suspects = suspects(&l, &r);
    let faulted_replicas = l
        .records
        .iter()
        .enumerate()
        .filter_map(|(s, rec)| {
            let rec = rec.as_ref().filter(|r| r.active)?;
            (rec.faulted || suspects.contains(&(s as u32))).then_some(rec.uuid)
        })
        .collect();
    Ok(CheckReport {
        pool_uuid: l.sb.uuid,
        pool_name: l.sb.name.clone(),
        generation: l.sb.generation,
        cluster_size: l.sb.cluster_size,
        clusters: l.sb.num_clusters,
        used_clusters: r.mappings.len() as u64,
        replicas: l.records.iter().flatten().filter(|r| r.active).count(),
        damaged,
        leaked: r.leaked,
        doubly_owned: r.doubly_owned,
        orphaned: r.orphaned,
        faulted_replicas,
    })
}
