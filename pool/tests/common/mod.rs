//! Test vocabulary: pools on temporary files and a monoio reactor.
#![allow(dead_code)] // Each test binary uses a different part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_bdev::{BlockDevice, IoBuf, IoChannel};
use cairn_pool::{Pool, PoolCreate, Replica, ReplicaCreate};
use uuid::Uuid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// A temporary directory holding a sparse pool file.
pub struct TestPool {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestPool {
    pub fn file(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        TestPool { dir, path }
    }

    pub fn create(&self, cluster_size: u32) -> Arc<Pool> {
        Pool::create(
            &self.path,
            PoolCreate {
                name: "p0".into(),
                uuid: Uuid::new_v4(),
                cluster_size,
            },
        )
        .unwrap()
    }

    pub fn import(&self) -> Arc<Pool> {
        Pool::import(&self.path).unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn thin(name: &str, size: u64) -> ReplicaCreate {
    ReplicaCreate {
        uuid: Uuid::new_v4(),
        name: name.into(),
        size,
        thin: true,
    }
}

pub fn thick(name: &str, size: u64) -> ReplicaCreate {
    ReplicaCreate {
        thin: false,
        ..thin(name, size)
    }
}

/// Runs `f` on a fresh io_uring reactor of this thread.
pub fn on_reactor<F: std::future::Future>(f: F) -> F::Output {
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .build()
        .expect("io_uring runtime");
    rt.block_on(f)
}

/// A block of `len` bytes filled with a tag derived from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 / 8) % 251) as u8 | 1)
        .collect()
}

pub async fn write(ch: &dyn IoChannel, lba: u64, data: &[u8]) -> Result<(), cairn_bdev::BdevError> {
    let (r, _) = ch.write(lba, IoBuf::from_slice(data), false).await;
    r
}

pub async fn read(ch: &dyn IoChannel, lba: u64, len: usize) -> Vec<u8> {
    let (r, b) = ch.read(lba, IoBuf::zeroed(len)).await;
    r.unwrap();
    b.to_vec()
}

pub fn channel(r: &Arc<Replica>) -> Box<dyn IoChannel> {
    r.open_channel().unwrap()
}
