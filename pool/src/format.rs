//! The on-disk format: byte layouts of the superblock, the replica table and
//! the cluster groups, with their checksums. See `pool/FORMAT.md`.
//!
//! Every metadata block is [`MD_BLOCK`] bytes, aligned to [`MD_BLOCK`], all
//! integers little-endian, and carries a CRC32C of the whole block computed
//! with its checksum field zeroed.

use uuid::Uuid;

/// Size and alignment of every metadata block.
pub const MD_BLOCK: u64 = 4096;
/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"CAIRNPOL";
/// Replica record magic.
pub const REPLICA_MAGIC: &[u8; 8] = b"CAIRNREP";
/// Cluster group header magic.
pub const GROUP_MAGIC: &[u8; 8] = b"CAIRNGRP";
/// Format version written and understood by this build.
pub const VERSION: u32 = 1;
/// Number of superblock copies (at offsets 0 and [`MD_BLOCK`]).
pub const SB_COPIES: u64 = 2;
/// Byte offset of the replica table.
pub const REPLICA_TABLE_START: u64 = SB_COPIES * MD_BLOCK;
/// Number of replica slots (one metadata block each).
pub const REPLICA_SLOTS: u32 = 512;
/// Byte offset of the first cluster group.
pub const DATA_START: u64 = REPLICA_TABLE_START + REPLICA_SLOTS as u64 * MD_BLOCK;
/// Bytes of a group header before the first entry.
pub const GROUP_HEADER: usize = 32;
/// Bytes of one cluster entry.
pub const ENTRY_SIZE: usize = 32;
/// Clusters per group: as many entries as fit in one metadata block.
pub const GROUP_CLUSTERS: u64 = ((MD_BLOCK as usize - GROUP_HEADER) / ENTRY_SIZE) as u64;
/// Logical block size of replicas.
pub const BLOCK_SIZE: u32 = 512;
/// Longest pool name in bytes.
pub const MAX_POOL_NAME: usize = 128;
/// Longest replica name in bytes.
pub const MAX_REPLICA_NAME: usize = 255;
/// Smallest and largest cluster sizes.
pub const MIN_CLUSTER: u32 = 4096;
pub const MAX_CLUSTER: u32 = 64 << 20;

/// A 4 KiB metadata block image.
pub type Block = [u8; MD_BLOCK as usize];

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Offset of the checksum field in every block type.
const CRC_AT: usize = 12;

/// CRC32C of a block with its checksum field taken as zero.
pub fn block_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[CRC_AT + 4..])
}

fn seal(b: &mut [u8]) {
    let crc = block_crc(b);
    put_u32(b, CRC_AT, crc);
}

fn crc_ok(b: &[u8]) -> bool {
    get_u32(b, CRC_AT) == block_crc(b)
}

/// Why a block failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The magic is not ours.
    Magic,
    /// A version this build does not know.
    Version(u32),
    /// The checksum does not match.
    Checksum,
    /// A field is out of range.
    Field(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Magic => write!(f, "bad magic"),
            DecodeError::Version(v) => write!(f, "unsupported version {v}"),
            DecodeError::Checksum => write!(f, "checksum mismatch"),
            DecodeError::Field(s) => write!(f, "bad field: {s}"),
        }
    }
}

/// The pool superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped by every rewrite; the newest valid copy wins.
    pub generation: u64,
    pub uuid: Uuid,
    pub name: String,
    pub cluster_size: u32,
    /// Device size in bytes when the pool was created or last grown.
    pub device_size: u64,
    /// Number of data clusters.
    pub num_clusters: u64,
}

impl Superblock {
    /// Bytes of one cluster group (header block plus its clusters).
    pub fn group_bytes(&self) -> u64 {
        group_bytes(self.cluster_size)
    }

    pub fn encode(&self) -> Block {
        let mut b = [0u8; MD_BLOCK as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u64(&mut b, 16, self.generation);
        b[24..40].copy_from_slice(self.uuid.as_bytes());
        put_u32(&mut b, 40, self.cluster_size);
        put_u32(&mut b, 44, BLOCK_SIZE);
        put_u64(&mut b, 48, self.device_size);
        put_u64(&mut b, 56, self.num_clusters);
        put_u64(&mut b, 64, DATA_START);
        put_u64(&mut b, 72, REPLICA_TABLE_START);
        put_u32(&mut b, 80, REPLICA_SLOTS);
        put_u32(&mut b, 84, GROUP_CLUSTERS as u32);
        let name = self.name.as_bytes();
        put_u16(&mut b, 88, name.len() as u16);
        b[90..90 + name.len()].copy_from_slice(name);
        seal(&mut b);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if &b[0..8] != SB_MAGIC {
            return Err(DecodeError::Magic);
        }
        if !crc_ok(b) {
            return Err(DecodeError::Checksum);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let cluster_size = get_u32(b, 40);
        if !valid_cluster_size(cluster_size) {
            return Err(DecodeError::Field(format!("cluster size {cluster_size}")));
        }
        if get_u32(b, 44) != BLOCK_SIZE
            || get_u64(b, 64) != DATA_START
            || get_u64(b, 72) != REPLICA_TABLE_START
            || get_u32(b, 80) != REPLICA_SLOTS
            || u64::from(get_u32(b, 84)) != GROUP_CLUSTERS
        {
            return Err(DecodeError::Field("layout constants".into()));
        }
        let name_len = get_u16(b, 88) as usize;
        if name_len > MAX_POOL_NAME {
            return Err(DecodeError::Field(format!("name length {name_len}")));
        }
        let name = String::from_utf8(b[90..90 + name_len].to_vec())
            .map_err(|_| DecodeError::Field("name is not UTF-8".into()))?;
        let mut u = [0u8; 16];
        u.copy_from_slice(&b[24..40]);
        let sb = Superblock {
            generation: get_u64(b, 16),
            uuid: Uuid::from_bytes(u),
            name,
            cluster_size,
            device_size: get_u64(b, 48),
            num_clusters: get_u64(b, 56),
        };
        if sb.num_clusters != clusters_for(sb.device_size, cluster_size) {
            return Err(DecodeError::Field(format!(
                "{} clusters do not match a device of {} bytes",
                sb.num_clusters, sb.device_size
            )));
        }
        Ok(sb)
    }
}

/// Whether `cs` is a supported cluster size.
pub fn valid_cluster_size(cs: u32) -> bool {
    cs.is_power_of_two() && (MIN_CLUSTER..=MAX_CLUSTER).contains(&cs)
}

/// Bytes of one cluster group.
pub fn group_bytes(cluster_size: u32) -> u64 {
    MD_BLOCK + GROUP_CLUSTERS * u64::from(cluster_size)
}

/// Number of data clusters that fit on a device of `size` bytes.
pub fn clusters_for(size: u64, cluster_size: u32) -> u64 {
    if size < DATA_START + MD_BLOCK {
        return 0;
    }
    let cs = u64::from(cluster_size);
    let gb = group_bytes(cluster_size);
    let rest = size - DATA_START;
    let full = rest / gb;
    let tail = rest % gb;
    let tail_clusters = if tail > MD_BLOCK {
        (tail - MD_BLOCK) / cs
    } else {
        0
    };
    full * GROUP_CLUSTERS + tail_clusters
}

/// Number of groups holding `num_clusters` clusters.
pub fn groups_for(num_clusters: u64) -> u64 {
    num_clusters.div_ceil(GROUP_CLUSTERS)
}

/// Byte offset of group `g`'s header block.
pub fn group_offset(cluster_size: u32, g: u64) -> u64 {
    DATA_START + g * group_bytes(cluster_size)
}

/// Byte offset of physical cluster `p`.
pub fn cluster_offset(cluster_size: u32, p: u64) -> u64 {
    let g = p / GROUP_CLUSTERS;
    let i = p % GROUP_CLUSTERS;
    group_offset(cluster_size, g) + MD_BLOCK + i * u64::from(cluster_size)
}

/// Byte offset of replica slot `s`'s record.
pub fn replica_offset(s: u32) -> u64 {
    REPLICA_TABLE_START + u64::from(s) * MD_BLOCK
}

/// Replica flags.
pub const FLAG_THIN: u32 = 1;
/// The replica may have lost clusters (a damaged group header named them):
/// it serves no I/O until destroyed, and is rebuilt elsewhere.
pub const FLAG_FAULTED: u32 = 2;

/// One replica slot of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Whether the slot holds a live replica.
    pub active: bool,
    /// Bumped every time the slot is reused; cluster entries name it, so
    /// entries of a destroyed replica never attach to its successor.
    pub incarnation: u32,
    pub uuid: Uuid,
    pub name: String,
    pub size: u64,
    pub thin: bool,
    /// See [`FLAG_FAULTED`].
    pub faulted: bool,
}

impl ReplicaRecord {
    pub fn encode(&self) -> Block {
        let mut b = [0u8; MD_BLOCK as usize];
        b[0..8].copy_from_slice(REPLICA_MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 16, u32::from(self.active));
        put_u32(&mut b, 20, self.incarnation);
        b[24..40].copy_from_slice(self.uuid.as_bytes());
        put_u64(&mut b, 40, self.size);
        let flags =
            if self.thin { FLAG_THIN } else { 0 } | if self.faulted { FLAG_FAULTED } else { 0 };
        put_u32(&mut b, 48, flags);
        let name = self.name.as_bytes();
        put_u16(&mut b, 52, name.len() as u16);
        b[54..54 + name.len()].copy_from_slice(name);
        // Bytes 320.. are reserved for snapshot and clone lineage (parent
        // replica UUID, snapshot time); zero today.
        seal(&mut b);
        b
    }

    /// Decodes a slot; `Ok(None)` for a never-used (all zero) slot.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, DecodeError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if &b[0..8] != REPLICA_MAGIC {
            return Err(DecodeError::Magic);
        }
        if !crc_ok(b) {
            return Err(DecodeError::Checksum);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let name_len = get_u16(b, 52) as usize;
        if name_len > MAX_REPLICA_NAME {
            return Err(DecodeError::Field(format!("name length {name_len}")));
        }
        let name = String::from_utf8(b[54..54 + name_len].to_vec())
            .map_err(|_| DecodeError::Field("name is not UTF-8".into()))?;
        let mut u = [0u8; 16];
        u.copy_from_slice(&b[24..40]);
        Ok(Some(ReplicaRecord {
            active: get_u32(b, 16) == 1,
            incarnation: get_u32(b, 20),
            uuid: Uuid::from_bytes(u),
            name,
            size: get_u64(b, 40),
            thin: get_u32(b, 48) & FLAG_THIN != 0,
            faulted: get_u32(b, 48) & FLAG_FAULTED != 0,
        }))
    }
}

/// One cluster entry of a group: who owns the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// Replica slot + 1; 0 means free.
    pub owner: u32,
    /// Incarnation of the owning slot.
    pub incarnation: u32,
    /// Logical cluster index inside the replica.
    pub logical: u64,
    /// Reference count (1 for an owned cluster; room for snapshots sharing
    /// a cluster).
    pub refs: u32,
}

impl Entry {
    pub const FREE: Entry = Entry {
        owner: 0,
        incarnation: 0,
        logical: 0,
        refs: 0,
    };

    pub fn is_free(&self) -> bool {
        self.owner == 0
    }
}

/// Encodes a group header block with `entries` (at most [`GROUP_CLUSTERS`];
/// missing ones are free).
pub fn encode_group(index: u64, pool: &Uuid, entries: &[Entry]) -> Block {
    let mut b = [0u8; MD_BLOCK as usize];
    b[0..8].copy_from_slice(GROUP_MAGIC);
    put_u32(&mut b, 8, VERSION);
    put_u64(&mut b, 16, index);
    b[24..32].copy_from_slice(&pool.as_bytes()[..8]);
    for (i, e) in entries.iter().enumerate().take(GROUP_CLUSTERS as usize) {
        let at = GROUP_HEADER + i * ENTRY_SIZE;
        put_u32(&mut b, at, e.owner);
        put_u32(&mut b, at + 4, e.incarnation);
        put_u64(&mut b, at + 8, e.logical);
        put_u32(&mut b, at + 16, e.refs);
        // at + 20..32: reserved (flags, snapshot sequence).
    }
    seal(&mut b);
    b
}

/// Decodes a group header block.
pub fn decode_group(b: &[u8], index: u64, pool: &Uuid) -> Result<Vec<Entry>, DecodeError> {
    if &b[0..8] != GROUP_MAGIC {
        return Err(DecodeError::Magic);
    }
    if !crc_ok(b) {
        return Err(DecodeError::Checksum);
    }
    let version = get_u32(b, 8);
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    if get_u64(b, 16) != index {
        return Err(DecodeError::Field(format!(
            "group index {} where {index} belongs",
            get_u64(b, 16)
        )));
    }
    if b[24..32] != pool.as_bytes()[..8] {
        return Err(DecodeError::Field("group belongs to another pool".into()));
    }
    Ok((0..GROUP_CLUSTERS as usize)
        .map(|i| {
            let at = GROUP_HEADER + i * ENTRY_SIZE;
            Entry {
                owner: get_u32(b, at),
                incarnation: get_u32(b, at + 4),
                logical: get_u64(b, at + 8),
                refs: get_u32(b, at + 16),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_checksum() {
        let sb = Superblock {
            generation: 3,
            uuid: Uuid::new_v4(),
            name: "pool-a".into(),
            cluster_size: 1 << 20,
            device_size: 1 << 30,
            num_clusters: clusters_for(1 << 30, 1 << 20),
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(DecodeError::Checksum));
        b[0] = b'X';
        assert_eq!(Superblock::decode(&b), Err(DecodeError::Magic));
    }

    #[test]
    fn geometry_is_consistent() {
        let cs = 64 * 1024;
        let n = clusters_for(64 << 20, cs);
        assert!(n > 0);
        let last_end = cluster_offset(cs, n - 1) + u64::from(cs);
        assert!(last_end <= 64 << 20);
        // One more cluster would not fit.
        let next = cluster_offset(cs, n);
        assert!(next + u64::from(cs) > 64 << 20);
        assert_eq!(clusters_for(DATA_START, cs), 0);
        assert_eq!(cluster_offset(cs, 0), DATA_START + MD_BLOCK);
        assert_eq!(
            cluster_offset(cs, GROUP_CLUSTERS),
            DATA_START + group_bytes(cs) + MD_BLOCK
        );
    }

    #[test]
    fn group_and_replica_roundtrip() {
        let pool = Uuid::new_v4();
        let mut entries = vec![Entry::FREE; GROUP_CLUSTERS as usize];
        entries[5] = Entry {
            owner: 2,
            incarnation: 7,
            logical: 99,
            refs: 1,
        };
        let b = encode_group(4, &pool, &entries);
        assert_eq!(decode_group(&b, 4, &pool).unwrap(), entries);
        assert!(decode_group(&b, 5, &pool).is_err());
        assert!(decode_group(&b, 4, &Uuid::new_v4()).is_err());
        let r = ReplicaRecord {
            active: true,
            incarnation: 2,
            uuid: Uuid::new_v4(),
            name: "r".into(),
            size: 1 << 30,
            thin: true,
            faulted: false,
        };
        assert_eq!(ReplicaRecord::decode(&r.encode()).unwrap(), Some(r.clone()));
        let f = ReplicaRecord { faulted: true, ..r };
        assert_eq!(ReplicaRecord::decode(&f.encode()).unwrap(), Some(f));
        assert_eq!(ReplicaRecord::decode(&[0u8; 4096]).unwrap(), None);
    }
}
