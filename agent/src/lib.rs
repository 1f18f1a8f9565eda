//! The Cairn agent: one per node, and the cluster's control logic.
//!
//! - [`node`]: brings the node's pools up on its engine and keeps the node's
//!   registration (address, host NQN, topology, pools) fresh in the store.
//! - [`control`]: placement and volume operations (create, delete, publish,
//!   unpublish, resize), idempotent and restartable; the nexus health
//!   records engines write before acknowledging degraded writes
//!   ([`control::health`]); the control lease ([`control::lease`]) whose
//!   holder runs the self-healing reconciler ([`control::reconcile`]):
//!   replicas on dead nodes or faulted children are resynced from the
//!   dirty-region log when their node returns, or replaced and rebuilt
//!   elsewhere (through a temporary nexus when the volume is unpublished);
//!   orphaned replicas, nexuses and shares are garbage-collected.
//! - [`store`]: the state store trait and its implementations.
//! - [`service`]: the Control gRPC API that the CSI controller and cairnctl
//!   call.

pub mod control;
pub mod error;
pub mod model;
pub mod node;
pub mod service;
pub mod store;

use std::path::Path;
use std::sync::Arc;

/// Opens the state store named by `spec`: a file path (the embedded store),
/// `file://PATH`, or `etcd://host:port[,host:port...]`.
pub async fn open_store(spec: &str) -> Result<Arc<dyn store::Store>, store::StoreError> {
    if spec.starts_with(store::etcd::SPEC_SCHEME) {
        return Ok(Arc::new(store::etcd::open_etcd(spec).await?));
    }
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    Ok(Arc::new(store::file::FileStore::open(Path::new(path))?))
}

/// The host NQN of this machine's kernel initiator, from /etc/nvme/hostnqn.
pub fn system_host_nqn() -> Option<String> {
    std::fs::read_to_string("/etc/nvme/hostnqn")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
