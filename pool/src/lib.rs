//! Cairn storage pools.
//!
//! A pool formats one file or block device into a superblock (two copies),
//! a replica table and *cluster groups*; replicas are thin or thick block
//! devices carved out of its clusters. The byte layout is in `FORMAT.md`.
//!
//! # Crash safety
//!
//! Ownership is recorded per physical cluster: each group starts with one
//! 4 KiB metadata block holding a checksummed entry (owner replica slot and
//! incarnation, logical cluster, reference count) for each of the 127
//! clusters that follow it. There is no separate free map and no journal;
//! import rebuilds every replica map and the free list by walking the
//! entries, so a cluster is owned by exactly the replica its entry names or
//! it is free: nothing can leak or be owned twice.
//!
//! The ordering rules that make this safe:
//!
//! - **First write to a cluster** (allocation): the whole cluster is zeroed
//!   (write zeroes, or written in full when the write covers it) and the data
//!   written, then flushed; only then is the group block with the new entry
//!   written (and flushed too for a FUA write); only then is the mapping
//!   published in memory and the write acknowledged. A crash before the
//!   entry is durable leaves the cluster free; after, it is owned and holds
//!   zeros or the data. An old replica's data is never reachable.
//! - **A write into an allocated cluster** is one data write, no metadata.
//!   FUA and flush go straight to the device.
//! - **Release** (deallocate/write zeroes of whole clusters of a thin
//!   replica): the freed entry is written and flushed first, the mapping
//!   cleared, in-flight I/O on the replica drained, and only then may the
//!   cluster be reused.
//! - **Replica destroy**: the replica record is marked free (flushed);
//!   entries naming a destroyed slot incarnation are free by definition, so
//!   clearing them afterwards is only tidying.
//! - **Pool create/grow**: all group blocks are written and flushed before
//!   the superblock; the two superblock copies are written one at a time,
//!   each flushed, and import takes the newest valid copy.
//!
//! Every metadata block carries a CRC32C. Import refuses a pool with a
//! damaged replica record ([`PoolError::Corrupt`] with its location) rather
//! than serve wrong data. A damaged group header costs only the replicas
//! that may have owned its clusters: import sets its clusters aside, marks
//! those replicas faulted (in their records, durably; they fail every I/O
//! and are rebuilt elsewhere from their peers) and serves the rest;
//! [`Pool::check`] reports it and rewrites the header. The offline
//! [`check`] reports all damage, faulted replicas, leaked and doubly-owned
//! clusters without changing anything.
//!
//! # Ownership of the device
//!
//! An imported pool holds an exclusive `flock` on the device's open file
//! description, which every reactor channel shares (`dup`). io_uring keeps
//! that description alive for each request in flight, so after an engine is
//! killed the lock is released only once its last write has landed: a new
//! import waits (up to 2 s) instead of reading metadata that is still being
//! written, and a second import of a live pool fails with `Busy`.
//! [`check`] takes the lock shared.
//!
//! # Concurrency
//!
//! Reactors open one [`cairn_bdev::IoChannel`] per thread on a [`Replica`].
//! The lookup is a lock-free load from an array of `AtomicU64`; allocation
//! and release take the pool allocator mutex for a few instructions, never
//! across I/O. Metadata writes from the I/O path go through the reactor's
//! channel of the underlying device; control operations ([`Pool`] methods)
//! are synchronous `pread`/`pwrite`/`fdatasync` and must run on a thread
//! that may block (for tokio: `spawn_blocking`).

pub mod check;
mod devchan;
pub mod error;
pub mod format;
mod mdio;
mod pool;
mod replica;
mod shared;

pub use check::{check, CheckReport, Damage};
pub use error::{Location, PoolError, Result};
pub use pool::{Pool, PoolCheck, PoolCreate, PoolInfo, ReplicaCreate, DEFAULT_CLUSTER_SIZE};
pub use replica::{Replica, ReplicaInfo, ReplicaStats};
