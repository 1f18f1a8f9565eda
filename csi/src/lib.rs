//! Cairn's CSI driver: Identity, Controller and Node services.

pub mod controller;
pub mod params;

/// The CSI driver name Kubernetes objects refer to.
pub const DRIVER_NAME: &str = "csi.cairn.dev";
