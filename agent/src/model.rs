//! Records kept in the state store, their keys and their encoding.
//!
//! Every record is stored as JSON inside an envelope `{"v": N, "data": ...}`
//! where `N` is the record kind's schema version; a reader refuses a version
//! it does not know rather than guessing. Keys live under `/cairn/v1/`.
//!
//! WHEN CHANGING A RECORD: adding an optional field (with `#[serde(default)]`)
//! keeps the version; anything else bumps `VERSION` and teaches `decode` the
//! old one.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

const PREFIX: &str = "/cairn/v1";

/// A kind of record with its own key space and schema version.
pub trait Record: Serialize + DeserializeOwned {
    /// Key-space name, e.g. `volumes`.
    const KIND: &'static str;
    /// Schema version written into every envelope.
    const VERSION: u32;
    /// This record's id within its kind.
    fn id(&self) -> &str;

    /// The key of the record with this id.
    fn key_of(id: &str) -> String {
        format!("{PREFIX}/{}/{id}", Self::KIND)
    }

    /// The prefix under which all records of this kind live.
    fn prefix() -> String {
        format!("{PREFIX}/{}/", Self::KIND)
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

/// Encodes a record with its schema version.
pub fn encode<T: Record>(rec: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: T::VERSION,
        data: rec,
    })
    .expect("records always serialize")
}

/// Decodes a record, refusing unknown schema versions.
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    #[derive(Deserialize)]
    struct Header {
        v: u32,
    }
    let err = |reason: String| StoreError::Decode {
        key: key.to_owned(),
        reason,
    };
    let h: Header = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
    if h.v != T::VERSION {
        return Err(err(format!(
            "schema version {} (this build knows {})",
            h.v,
            T::VERSION
        )));
    }
    let env: Envelope<T> = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
    Ok(env.data)
}

/// A pool as its node last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub disk: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub committed_bytes: u64,
}

/// A node, as its agent registered it. Liveness is the heartbeat time: a
/// node whose `last_seen` is older than the lease is offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub engine_endpoint: String,
    pub nvmf_address: String,
    /// The engine's host NQN (used when it connects to remote replicas).
    pub engine_host_nqn: String,
    /// The node's kernel host NQN (what the CSI node plugin connects as).
    pub host_nqn: String,
    pub topology: BTreeMap<String, String>,
    pub pools: Vec<PoolRecord>,
    /// Unix seconds of the last heartbeat.
    pub last_seen: i64,
}

impl Record for NodeRecord {
    const KIND: &'static str = "nodes";
    const VERSION: u32 = 1;
    fn id(&self) -> &str {
        &self.id
    }
}

/// Where a volume's replica lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub uuid: String,
    pub node: String,
    pub pool: String,
    /// False once the replica was retired from the volume's healthy set
    /// (and, for a replacement, until its rebuild has finished).
    pub healthy: bool,
    /// Unix seconds when the replica was marked unhealthy (0: unknown or
    /// healthy). A replica unhealthy for longer than the control logic's
    /// `replace_after` is replaced.
    #[serde(default)]
    pub unhealthy_since: i64,
    /// True while this replica is a new child being filled by a rebuild; it
    /// becomes healthy when the nexus reports the rebuild finished.
    #[serde(default)]
    pub rebuilding: bool,
    /// The replica this one replaces; the old one leaves the volume once
    /// this one is healthy.
    #[serde(default)]
    pub replaces: Option<String>,
}

impl ReplicaSpec {
    /// A healthy replica at a placement.
    pub fn new(uuid: String, node: String, pool: String) -> Self {
        ReplicaSpec {
            uuid,
            node,
            pool,
            healthy: true,
            unhealthy_since: 0,
            rebuilding: false,
            replaces: None,
        }
    }
}

/// Where a volume is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    pub node: String,
    pub nqn: String,
    pub address: String,
}

/// The life stage of a volume record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumePhase {
    /// Replicas are being created; a crash here is finished or undone by
    /// the next operation on the volume.
    Creating,
    /// Every replica exists.
    Ready,
    /// Being deleted; a crash here is finished by the next delete.
    Deleting,
}

/// A volume: the desired state the control logic maintains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub replicas_wanted: u32,
    pub thin: bool,
    pub phase: VolumePhase,
    pub replicas: Vec<ReplicaSpec>,
    #[serde(default)]
    pub target: Option<TargetSpec>,
    /// Topology of the nodes holding the replicas (what CSI reports as
    /// accessible topology).
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
    /// The node running a temporary nexus that rebuilds replicas of this
    /// volume while it is not published (recorded before the nexus is
    /// created, so a crash mid-way is cleaned up).
    #[serde(default)]
    pub rebuild_nexus: Option<String>,
    /// The nexus instance that serves or rebuilds this volume now (named
    /// before the nexus is created). Only its health records are stored: a
    /// nexus left running on a partitioned node is fenced off.
    #[serde(default)]
    pub nexus_instance: String,
    /// Unix seconds of the last change of phase (0: unknown). A volume left
    /// `Creating` or `Deleting` for long is finished by the reconciler.
    #[serde(default)]
    pub phase_since: i64,
    /// The topology the volume was created with: replacements of lost
    /// replicas are placed under the same constraints.
    #[serde(default)]
    pub requisite: Vec<BTreeMap<String, String>>,
    #[serde(default)]
    pub preferred: Vec<BTreeMap<String, String>>,
}

impl VolumeSpec {
    /// The node whose nexus serves or rebuilds this volume, if any.
    pub fn nexus_node(&self) -> Option<&str> {
        self.target
            .as_ref()
            .map(|t| t.node.as_str())
            .or(self.rebuild_nexus.as_deref())
    }
}

impl Record for VolumeSpec {
    const KIND: &'static str = "volumes";
    const VERSION: u32 = 1;
    fn id(&self) -> &str {
        &self.id
    }
}

/// A nexus's durable health record, written by its engine (through
/// RecordNexusHealth) before it acknowledges a write with fewer healthy
/// children than before. Only replicas in `healthy` may serve as sources
/// when the volume's nexus is built again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusHealth {
    /// The volume id.
    pub volume_id: String,
    /// The nexus instance that wrote the record.
    pub instance: String,
    /// Grows with every record one instance writes.
    pub generation: u64,
    /// Uuids of the replicas that hold every acknowledged write.
    pub healthy: Vec<String>,
    pub clean_shutdown: bool,
    /// Unix seconds of the last update.
    pub updated: i64,
}

impl Record for NexusHealth {
    const KIND: &'static str = "nexus-health";
    const VERSION: u32 = 1;
    fn id(&self) -> &str {
        &self.volume_id
    }
}

/// A lease on a role that one agent holds at a time (the control logic's
/// reconcilers). Taken and renewed with compare-and-put; another agent may
/// take it once `expires_ms` has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub name: String,
    pub holder: String,
    /// Unix milliseconds after which the lease is free.
    pub expires_ms: i64,
}

impl Record for LeaseRecord {
    const KIND: &'static str = "leases";
    const VERSION: u32 = 1;
    fn id(&self) -> &str {
        &self.name
    }
}

/// The replica uuid a nexus child URI names: `replica:///UUID` or
/// `nvmf://HOST:PORT/NQN` whose NQN ends with `:replica:UUID`.
pub fn replica_of_child_uri(uri: &str) -> Option<&str> {
    let id = if let Some(rest) = uri.strip_prefix("replica:///") {
        rest
    } else if uri.starts_with("nvmf://") {
        uri.rsplit_once(":replica:")?.1
    } else {
        return None;
    };
    uuid::Uuid::parse_str(id).ok().map(|_| id)
}

/// The namespace for deriving volume ids from CSI volume names.
const VOLUME_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6361_6972_6e2d_766f_6c75_6d65_2d69_6473);

/// The volume id for a CSI volume name: stable, so CreateVolume retries
/// land on the same volume.
pub fn volume_id_for_name(name: &str) -> String {
    uuid::Uuid::new_v5(&VOLUME_ID_NAMESPACE, name.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeSpec {
        VolumeSpec {
            id: volume_id_for_name("pvc-1"),
            name: "pvc-1".into(),
            size_bytes: 1 << 30,
            replicas_wanted: 2,
            thin: true,
            phase: VolumePhase::Ready,
            replicas: vec![],
            target: None,
            topology: BTreeMap::new(),
            rebuild_nexus: None,
            nexus_instance: String::new(),
            phase_since: 0,
            requisite: vec![],
            preferred: vec![],
        }
    }

    #[test]
    fn records_round_trip_with_version_and_refuse_unknown_versions() {
        let v = vol();
        let bytes = encode(&v);
        assert_eq!(decode::<VolumeSpec>("k", &bytes).unwrap(), v);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("{\"v\":1,"));
        let future = text.replacen("{\"v\":1,", "{\"v\":9,", 1);
        let err = decode::<VolumeSpec>("k", future.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("schema version 9"));
        assert_eq!(
            VolumeSpec::key_of(&v.id),
            format!("/cairn/v1/volumes/{}", v.id)
        );
    }

    #[test]
    fn records_written_before_the_healing_fields_still_decode() {
        let old = r#"{"v":1,"data":{"id":"x","name":"n","size_bytes":1,"replicas_wanted":1,
            "thin":true,"phase":"ready","replicas":[{"uuid":"u","node":"a","pool":"p","healthy":true}]}}"#;
        let v: VolumeSpec = decode("k", old.as_bytes()).unwrap();
        assert_eq!(v.replicas[0].unhealthy_since, 0);
        assert!(!v.replicas[0].rebuilding);
        assert_eq!(v.replicas[0].replaces, None);
        assert_eq!(v.rebuild_nexus, None);
    }

    #[test]
    fn child_uris_name_their_replica() {
        let u = "6f1b9c8e-2a44-4c1d-9a57-1d2b3c4d5e6f";
        assert_eq!(replica_of_child_uri(&format!("replica:///{u}")), Some(u));
        assert_eq!(
            replica_of_child_uri(&format!(
                "nvmf://127.0.0.2:4420/nqn.2024-01.dev.cairn:replica:{u}"
            )),
            Some(u)
        );
        assert_eq!(
            replica_of_child_uri("nvmf://127.0.0.2:4420/nqn.x:vol"),
            None
        );
        assert_eq!(replica_of_child_uri("replica:///not-a-uuid"), None);
        assert_eq!(replica_of_child_uri("file:///x"), None);
    }

    #[test]
    fn volume_ids_are_stable_per_name() {
        assert_eq!(volume_id_for_name("a"), volume_id_for_name("a"));
        assert_ne!(volume_id_for_name("a"), volume_id_for_name("b"));
    }
}
