//! The CSI Node service: attaches a volume's NVMe-oF/TCP subsystem with the
//! kernel initiator (nvme-cli), finds its block device by namespace UUID
//! (= volume id), puts a filesystem on it when blank, and mounts it for pods.
//!
//! Each RPC checks its arguments first ([`validate`], pure), then claims the
//! volume ([`locks`], ABORTED if another call on it is running), then does
//! the host work ([`host`]) on a blocking thread. Errors are [`NodeError`]
//! values, turned into gRPC statuses in one place.
//!
//! Capabilities: STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS, EXPAND_VOLUME and
//! SINGLE_NODE_MULTI_WRITER; with [`NodeConfig::alpha_capabilities`], also
//! the alpha VOLUME_CONDITION: NodeGetVolumeStats then reports a volume
//! whose subsystem has no live path as abnormal.

pub mod context;
pub mod error;
pub mod host;
pub mod locks;
pub mod preflight;
pub mod validate;

use std::{collections::HashMap, fs, io, path::Path, sync::Arc};

use cairn_proto::csi::v1 as csi;
use csi::node_service_capability::rpc::Type as Cap;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub use error::NodeError;
use host::Host;
use locks::VolumeLocks;
use validate::Access;

/// Topology key this node reports; its value is the node id.
pub const TOPOLOGY_NODE_KEY: &str = "topology.csi.cairn.dev/node";

/// Static settings of one node plugin.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The CSI node id (the Kubernetes node name).
    pub node_id: String,
    /// Host NQN for `nvme connect --hostnqn`; nvme-cli's default
    /// (/etc/nvme/hostnqn) when `None`.
    pub host_nqn: Option<String>,
    /// Volumes the CO may publish here (0 = no limit).
    pub max_volumes_per_node: i64,
    /// Also advertise (and serve) the CSI v1.12.0 alpha capability
    /// VOLUME_CONDITION. Off by default: the sidecars in use do not need it.
    pub alpha_capabilities: bool,
}

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    cfg: Arc<NodeConfig>,
    host: Arc<Host>,
    locks: VolumeLocks,
}

impl NodeService {
    /// A node service using the real host interfaces.
    pub fn new(cfg: NodeConfig) -> Self {
        Self::with_host(cfg, Host::default())
    }

    /// A node service with explicit host paths and timeouts.
    pub fn with_host(cfg: NodeConfig, host: Host) -> Self {
        NodeService {
            cfg: Arc::new(cfg),
            host: Arc::new(host),
            locks: VolumeLocks::default(),
        }
    }

    /// The tonic server for this service.
    pub fn server(self) -> csi::node_server::NodeServer<Self> {
        csi::node_server::NodeServer::new(self)
    }

    /// Runs `f` on a blocking thread while holding the volume's claim.
    async fn exclusive<T, F>(&self, volume_id: &str, f: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce(&Host, &NodeConfig) -> Result<T, NodeError> + Send + 'static,
    {
        let guard = self.locks.try_lock(volume_id)?;
        let (host, cfg) = (Arc::clone(&self.host), Arc::clone(&self.cfg));
        let out = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&host, &cfg)
        })
        .await
        .map_err(|e| NodeError::Worker(e.to_string()))?;
        out
    }
}

fn ensure_dir(p: &Path) -> Result<(), NodeError> {
    fs::create_dir_all(p).map_err(|e| NodeError::io("mkdir", p, e))
}

/// Creates the file a block volume is bind-mounted onto.
fn ensure_file(p: &Path) -> Result<(), NodeError> {
    if let Some(parent) = p.parent() {
        ensure_dir(parent)?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(drop)
        .map_err(|e| NodeError::io("create", p, e))
}

/// Removes the file or directory a publish created; absent is fine.
fn remove_target(p: &Path) -> Result<(), NodeError> {
    let r = match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NodeError::io("stat", p, e)),
        Ok(md) if md.is_dir() => fs::remove_dir(p),
        Ok(_) => fs::remove_file(p),
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(NodeError::io("remove", p, e)),
        _ => Ok(()),
    }
}

fn stage_blocking(host: &Host, cfg: &NodeConfig, s: validate::Stage) -> Result<(), NodeError> {
    let dev = match host.find_device(&s.uuid) {
        Some(d) => d,
        None => {
            if let Err(e) = host.nvme_connect(&s.connect, cfg.host_nqn.as_deref()) {
                // "Already connected" from an earlier, interrupted attempt
                // is fine as long as the namespace shows up.
                if host.controllers(&s.connect.nqn).is_empty() {
                    return Err(e);
                }
                tracing::warn!(volume = %s.uuid, error = %e, "nvme connect failed but the subsystem is attached");
            }
            host.wait_device(&s.uuid)?
        }
    };
    let Access::Mount { fs_type, flags } = s.capability.access else {
        // Block volumes: attached is staged.
        return Ok(());
    };
    if let Some(m) = host.mounts_at(&s.staging_path)?.last() {
        if m.dev_t == dev.dev_t {
            return Ok(());
        }
        return Err(NodeError::AlreadyExists(format!(
            "{} is already mounted from another device ({})",
            s.staging_path.display(),
            m.source
        )));
    }
    ensure_dir(&s.staging_path)?;
    match host.fs_type(&dev.path)? {
        None => {
            tracing::info!(volume = %s.uuid, device = %dev.path.display(), fs = fs_type.as_str(), "creating filesystem");
            host.mkfs(&dev.path, fs_type)?;
        }
        Some(found) if found == fs_type.as_str() => {}
        Some(found) => {
            return Err(NodeError::FailedPrecondition(format!(
                "volume holds a {found} filesystem, the capability asks for {}",
                fs_type.as_str()
            )))
        }
    }
    let mut opts = flags;
    if s.capability.read_only_mode {
        opts.push("ro".into());
    }
    host.mount(&dev.path, &s.staging_path, fs_type.as_str(), &opts)
}

fn unstage_blocking(host: &Host, volume_id: &str, staging: &Path) -> Result<(), NodeError> {
    host.unmount_all(staging)?;
    // A volume id that is not a UUID was never attached by this plugin.
    if Uuid::parse_str(volume_id).is_ok() {
        host.nvme_disconnect(&context::volume_nqn(volume_id))?;
    }
    Ok(())
}

fn publish_blocking(host: &Host, p: validate::Publish) -> Result<(), NodeError> {
    if let Some(m) = host.mounts_at(&p.target_path)?.last() {
        if m.read_only() != p.readonly {
            return Err(NodeError::AlreadyExists(format!(
                "{} is already published {}",
                p.target_path.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        return Ok(());
    }
    match p.capability.access {
        Access::Block => {
            let dev = host.find_device(&p.uuid).ok_or_else(|| {
                NodeError::FailedPrecondition(format!(
                    "volume {} is not staged on this node (no device)",
                    p.uuid
                ))
            })?;
            ensure_file(&p.target_path)?;
            host.bind_mount(&dev.path, &p.target_path, p.readonly)
        }
        Access::Mount { .. } => {
            if host.mounts_at(&p.staging_path)?.is_empty() {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {} is not staged at {}",
                    p.uuid,
                    p.staging_path.display()
                )));
            }
            ensure_dir(&p.target_path)?;
            host.bind_mount(&p.staging_path, &p.target_path, p.readonly)
        }
    }
}

fn unpublish_blocking(host: &Host, target: &Path) -> Result<(), NodeError> {
    host.unmount_all(target)?;
    remove_target(target)
}

fn stats_blocking(
    host: &Host,
    uuid: Uuid,
    path: &Path,
    with_condition: bool,
) -> Result<csi::NodeGetVolumeStatsResponse, NodeError> {
    use csi::volume_usage::Unit;
    if !path.exists() {
        return Err(NodeError::NotFound(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let dev = host.find_device(&uuid).ok_or_else(|| {
        NodeError::NotFound(format!("volume {uuid} is not attached to this node"))
    })?;
    let volume_condition = with_condition.then(|| volume_condition(host, uuid));
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let Some(dev_t) = host.block_dev_at(path)? {
        if dev_t != dev.dev_t {
            return Err(NodeError::NotFound(format!(
                "{} is another block device, not volume {uuid}",
                path.display()
            )));
        }
        let size = host.device_size(&dev_t)?;
        return Ok(csi::NodeGetVolumeStatsResponse {
            usage: vec![csi::VolumeUsage {
                available: 0,
                total: to_i64(size),
                used: 0,
                unit: Unit::Bytes as i32,
            }],
            volume_condition,
        });
    }
    match host.mounts_at(path)?.last() {
        None => {
            return Err(NodeError::NotFound(format!(
                "no volume is mounted at {}",
                path.display()
            )))
        }
        Some(m) if m.dev_t != dev.dev_t => {
            return Err(NodeError::NotFound(format!(
                "{} holds {} (device {}), not volume {uuid}",
                path.display(),
                m.source,
                m.dev_t
            )))
        }
        Some(_) => {}
    }
    let s = host.statvfs(path)?;
    Ok(csi::NodeGetVolumeStatsResponse {
        usage: vec![
            csi::VolumeUsage {
                available: to_i64(s.available_bytes),
                total: to_i64(s.total_bytes),
                used: to_i64(s.used_bytes),
                unit: Unit::Bytes as i32,
            },
            csi::VolumeUsage {
                available: to_i64(s.free_inodes),
                total: to_i64(s.total_inodes),
                used: to_i64(s.used_inodes),
                unit: Unit::Inodes as i32,
            },
        ],
        volume_condition,
    })
}

/// The condition of a volume whose block device is attached here:
/// abnormal when none of its NVMe controllers is live. (Without a device
/// there are no stats to carry a condition: the call is NOT_FOUND.)
fn volume_condition(host: &Host, uuid: Uuid) -> csi::VolumeCondition {
    let nqn = context::volume_nqn(&uuid.to_string());
    let ctrls = host.controllers(&nqn);
    if !ctrls.is_empty() && !ctrls.iter().any(|(_, state)| state == "live") {
        let states: Vec<String> = ctrls.iter().map(|(c, s)| format!("{c}={s}")).collect();
        return csi::VolumeCondition {
            abnormal: true,
            message: format!("no live NVMe controller for {nqn}: {}", states.join(", ")),
        };
    }
    csi::VolumeCondition {
        abnormal: false,
        message: "attached, with a live NVMe controller".into(),
    }
}

fn expand_blocking(
    host: &Host,
    uuid: Uuid,
    path: &Path,
    required: Option<u64>,
    block: Option<bool>,
) -> Result<i64, NodeError> {
    if !path.exists() {
        return Err(NodeError::NotFound(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let dev = host.find_device(&uuid).ok_or_else(|| {
        NodeError::NotFound(format!("volume {uuid} is not attached to this node"))
    })?;
    host.nvme_ns_rescan(&context::volume_nqn(&uuid.to_string()))?;
    // The new size reaches the block layer asynchronously after the rescan.
    let start = std::time::Instant::now();
    let size = loop {
        let size = host.device_size(&dev.dev_t)?;
        if required.is_none_or(|r| size >= r) {
            break size;
        }
        if start.elapsed() >= host.device_timeout {
            return Err(NodeError::FailedPrecondition(format!(
                "device {} is {size} bytes after rescan, {} requested",
                dev.path.display(),
                required.unwrap_or_default()
            )));
        }
        std::thread::sleep(host.poll_interval);
    };
    let is_block = match block {
        Some(b) => b,
        None => host.block_size_at(path)?.is_some(),
    };
    if !is_block {
        let fs = host.fs_type(&dev.path)?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!("no filesystem on {}", dev.path.display()))
        })?;
        host.grow_fs(&dev.path, path, &fs)?;
    }
    Ok(i64::try_from(size).unwrap_or(i64::MAX))
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let plan = validate::stage(&r)?;
        tracing::info!(volume = %r.volume_id, staging = %plan.staging_path.display(), target = %plan.connect.target(), "NodeStageVolume");
        self.exclusive(&r.volume_id, move |h, c| stage_blocking(h, c, plan))
            .await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let (id, staging) =
            validate::id_and_path(&r.volume_id, "staging_target_path", &r.staging_target_path)?;
        tracing::info!(volume = %id, staging = %staging.display(), "NodeUnstageVolume");
        let vid = id.clone();
        self.exclusive(&id, move |h, _| unstage_blocking(h, &vid, &staging))
            .await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let plan = validate::publish(&r)?;
        tracing::info!(volume = %r.volume_id, target = %plan.target_path.display(), readonly = plan.readonly, "NodePublishVolume");
        self.exclusive(&r.volume_id, move |h, _| publish_blocking(h, plan))
            .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let (id, target) = validate::id_and_path(&r.volume_id, "target_path", &r.target_path)?;
        tracing::info!(volume = %id, target = %target.display(), "NodeUnpublishVolume");
        self.exclusive(&id, move |h, _| unpublish_blocking(h, &target))
            .await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let (uuid, path) = validate::volume_at_path(&r.volume_id, &r.volume_path)?;
        let with_condition = self.cfg.alpha_capabilities;
        // Read-only: no volume claim, so stats never block stage/publish.
        let host = Arc::clone(&self.host);
        let resp =
            tokio::task::spawn_blocking(move || stats_blocking(&host, uuid, &path, with_condition))
                .await
                .map_err(|e| NodeError::Worker(e.to_string()))??;
        Ok(Response::new(resp))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        validate::required_id(&r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(NodeError::Missing("volume_path").into());
        }
        let required = validate::expand_range(r.capacity_range.as_ref())?;
        let block = match r.volume_capability.as_ref() {
            None => None,
            Some(cap) => Some(matches!(
                validate::capability(Some(cap), None)?.access,
                Access::Block
            )),
        };
        let (uuid, path) = validate::volume_at_path(&r.volume_id, &r.volume_path)?;
        let id = r.volume_id;
        tracing::info!(volume = %id, path = %path.display(), ?required, "NodeExpandVolume");
        let capacity_bytes = self
            .exclusive(&id, move |h, _| {
                expand_blocking(h, uuid, &path, required, block)
            })
            .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let mut caps = vec![
            Cap::StageUnstageVolume,
            Cap::GetVolumeStats,
            Cap::ExpandVolume,
            Cap::SingleNodeMultiWriter,
        ];
        if self.cfg.alpha_capabilities {
            caps.push(Cap::VolumeCondition);
        }
        let capabilities = caps
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(
                    csi::node_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: self.cfg.max_volumes_per_node,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.cfg.node_id.clone())]),
            }),
        }))
    }
}

#[cfg(test)]
mod tests;
