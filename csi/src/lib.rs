//! Cairn's CSI driver: Identity, Controller and Node services.
//!
//! - [`identity`]: plugin name, capabilities, Probe.
//! - [`controller`]: volumes through the agent's Control API.
//! - [`node`]: NVMe-oF/TCP attach with nvme-cli, filesystems, mounts.
//! - [`params`]: the StorageClass parameters.
//!
//! The generated CSI types are `cairn_proto::csi::v1` (spec v1.12.0).

pub mod controller;
pub mod edge;
pub mod identity;
pub mod node;
pub mod params;
pub mod socket;

/// The CSI driver name Kubernetes objects refer to.
pub const DRIVER_NAME: &str = "csi.cairn.dev";
