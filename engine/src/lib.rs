//! The Cairn engine: the data-plane daemon of one node.
//!
//! It owns the node's pools and replicas, assembles nexuses (a volume's
//! mirror over its replicas), and serves them over NVMe-oF/TCP from
//! io_uring reactors. The gRPC control API runs on a separate tokio runtime
//! and reaches the data path only through the target's registry.

pub mod core;
pub mod daemon;
pub mod initiator;
pub mod nexus;
pub mod reactor;
pub mod service;
pub mod target;
