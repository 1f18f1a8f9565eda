//! Pool errors. The control plane maps each variant to one gRPC code, in one
//! place; the I/O path reports [`cairn_bdev::BdevError`] instead.

use std::io;
use std::path::PathBuf;

use cairn_bdev::BdevError;
use uuid::Uuid;

/// Where on the device a damaged metadata block lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Byte offset of the block on the device.
    pub offset: u64,
    /// What the block holds ("superblock copy 0", "replica slot 3", "cluster group 7").
    pub what: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte offset {}", self.what, self.offset)
    }
}

/// Why a pool or replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No replica with this UUID in the pool.
    #[error("replica {uuid} not found")]
    ReplicaNotFound { uuid: Uuid },
    /// An object with this identity exists with different parameters.
    #[error("{what} already exists with other parameters")]
    AlreadyExists { what: String },
    /// The pool has too few free clusters.
    #[error("not enough free space: need {needed} bytes, {free} free")]
    NoSpace { needed: u64, free: u64 },
    /// The object is in use (open channels, replicas in use).
    #[error("{what} is busy: {reason}")]
    Busy { what: String, reason: String },
    /// A metadata block failed its checksum or is inconsistent.
    #[error("corrupt metadata: {location}: {reason}")]
    Corrupt { location: Location, reason: String },
    /// No Cairn pool on this device (no valid superblock magic).
    #[error("{path:?} holds no Cairn pool (bad superblock magic)")]
    BadMagic { path: PathBuf },
    /// A pool format this build does not understand.
    #[error("unsupported pool format version {version}")]
    UnsupportedVersion { version: u32 },
    /// Both superblock copies are damaged.
    #[error("bad superblock: {reason}")]
    BadSuperblock { reason: String },
    /// Replicas only grow.
    #[error("replica {uuid}: shrinking from {current} to {requested} bytes is refused")]
    ShrinkRefused {
        uuid: Uuid,
        current: u64,
        requested: u64,
    },
    /// A parameter is out of range (cluster size, name length, size 0, ...).
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// The device is too small for the requested pool.
    #[error("device of {size} bytes is too small: at least {min} bytes needed")]
    DeviceTooSmall { size: u64, min: u64 },
    /// The device got smaller than the pool recorded.
    #[error("device shrank from {recorded} to {actual} bytes")]
    DeviceShrank { recorded: u64, actual: u64 },
    /// Every replica slot of the pool is taken.
    #[error("the pool holds the maximum of {max} replicas")]
    TooManyReplicas { max: u32 },
    /// The pool was exported or destroyed; import it again.
    #[error("pool {name} is no longer open")]
    Closed { name: String },
    /// The device reported an error.
    #[error("{op} on {path:?} failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A block-device operation failed.
    #[error(transparent)]
    Bdev(#[from] BdevError),
}

/// Result alias for pool operations.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;
