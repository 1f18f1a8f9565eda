//! The CSI Controller service: volumes through the agent's Control API.
//!
//! Checks arguments with the spec's codes, turns StorageClass parameters
//! into a placement request, and maps the agent's answers to CSI codes
//! through one table ([`crate::edge`]): each RPC answers only with codes
//! its CSI error table has.

use std::collections::HashMap;

use cairn_proto::agent::v1 as apb;
use cairn_proto::csi::v1 as csi;
use csi::controller_service_capability::rpc::Type as Cap;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::AccessType;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::edge::Rpc;
use crate::node::context as publish_context;
use crate::params::{VolumeParams, FILESYSTEMS};

/// Volume size when the request gives none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Sizes are rounded up to this.
const SIZE_ALIGN: u64 = 1 << 20;

/// The Controller service.
pub struct ControllerService {
    agent: apb::control_client::ControlClient<Channel>,
    alpha: bool,
}

impl ControllerService {
    /// A controller that speaks CSI v1.12.0's GA capabilities (and
    /// SINGLE_NODE_MULTI_WRITER, which Kubernetes uses for
    /// ReadWriteOncePod).
    pub fn new(agent: apb::control_client::ControlClient<Channel>) -> Self {
        ControllerService {
            agent,
            alpha: false,
        }
    }

    /// Also advertise the alpha GET_VOLUME and VOLUME_CONDITION
    /// capabilities, and report each volume's condition in ListVolumes and
    /// ControllerGetVolume.
    pub fn with_alpha_capabilities(mut self, on: bool) -> Self {
        self.alpha = on;
        self
    }

    /// A volume's condition, when the alpha capabilities are on.
    fn condition(&self, v: &apb::Volume) -> Option<csi::VolumeCondition> {
        self.alpha.then(|| condition(v))
    }

    /// The tonic server for this service.
    pub fn server(self) -> csi::controller_server::ControllerServer<Self> {
        csi::controller_server::ControllerServer::new(self)
    }

    fn agent(&self) -> apb::control_client::ControlClient<Channel> {
        self.agent.clone()
    }

    /// One page of volumes, in the agent's stable order; a bad token is
    /// ABORTED (from the agent), a negative size INVALID_ARGUMENT.
    async fn page(
        &self,
        max_entries: i32,
        token: String,
    ) -> Result<apb::ListVolumesResponse, Status> {
        let max_entries =
            u32::try_from(max_entries).map_err(|_| invalid("max_entries must not be negative"))?;
        Ok(self
            .agent()
            .list_volumes(apb::ListVolumesRequest {
                max_entries,
                starting_token: token,
            })
            .await
            .map_err(|s| Rpc::ListVolumes.status(s))?
            .into_inner())
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn require(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(())
}

/// Checks one capability; returns why it is unsupported.
fn unsupported(cap: &csi::VolumeCapability) -> Option<String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    match mode {
        None => return Some("access_mode is required".into()),
        Some(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Some(m) => return Some(format!("access mode {} is not supported", m.as_str_name())),
    }
    match &cap.access_type {
        None => Some("access_type (block or mount) is required".into()),
        Some(AccessType::Block(_)) => None,
        Some(AccessType::Mount(m))
            if m.fs_type.is_empty() || FILESYSTEMS.contains(&m.fs_type.as_str()) =>
        {
            None
        }
        Some(AccessType::Mount(m)) => Some(format!(
            "filesystem {:?} is not supported (use one of {FILESYSTEMS:?})",
            m.fs_type
        )),
    }
}

fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities is required"));
    }
    for c in caps {
        if let Some(why) = unsupported(c) {
            return Err(invalid(why));
        }
    }
    Ok(())
}

/// Capabilities are optional in some calls; when given they must be valid.
fn check_capabilities_if_any(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Ok(());
    }
    check_capabilities(caps)
}

/// The size to create for a capacity range, or OUT_OF_RANGE.
fn size_for(range: Option<&csi::CapacityRange>) -> Result<u64, Status> {
    let (req, lim) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    if req < 0 || lim < 0 {
        return Err(invalid("capacity_range bytes must not be negative"));
    }
    if lim > 0 && req > lim {
        return Err(Status::out_of_range(format!(
            "required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let want = if req > 0 {
        req as u64
    } else if lim > 0 {
        (lim as u64).min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    let size = want.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
    if lim > 0 && size > lim as u64 {
        // Rounding up broke the limit; round down instead if it still meets the floor.
        let down = (lim as u64 / SIZE_ALIGN) * SIZE_ALIGN;
        if down >= want && down > 0 {
            return Ok(down);
        }
        return Err(Status::out_of_range(format!(
            "no size that is a multiple of {SIZE_ALIGN} lies in [{req}, {lim}]"
        )));
    }
    Ok(size)
}

fn segments(t: &[csi::Topology]) -> Vec<apb::Segment> {
    t.iter()
        .map(|s| apb::Segment {
            labels: s.segments.clone(),
        })
        .collect()
}

fn csi_volume(v: &apb::Volume, context: HashMap<String, String>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.id.clone(),
        volume_context: context,
        content_source: None,
        accessible_topology: vec![],
    }
}

/// The volume's condition: abnormal unless every wanted replica is healthy.
fn condition(v: &apb::Volume) -> csi::VolumeCondition {
    let healthy = v.replicas.iter().filter(|r| r.healthy).count();
    csi::VolumeCondition {
        abnormal: v.status != "online",
        message: format!(
            "volume is {}: {healthy} of {} replica(s) healthy",
            v.status, v.replicas_wanted
        ),
    }
}

fn published_nodes(v: &apb::Volume) -> Vec<String> {
    v.target.iter().map(|t| t.node.clone()).collect()
}

/// Splits `host:port`.
fn split_address(addr: &str) -> Result<(String, String), Status> {
    addr.rsplit_once(':')
        .map(|(h, p)| (h.trim_matches(['[', ']']).to_owned(), p.to_owned()))
        .ok_or_else(|| Status::internal(format!("target address {addr:?} has no port")))
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        require("name", &r.name)?;
        check_capabilities(&r.volume_capabilities)?;
        if r.volume_content_source.is_some() {
            return Err(invalid(
                "volume content sources (snapshots, clones) are not supported",
            ));
        }
        let params = VolumeParams::parse(&r.parameters).map_err(invalid)?;
        let size = size_for(r.capacity_range.as_ref())?;
        let (min_bytes, max_bytes) = r.capacity_range.as_ref().map_or((0, 0), |c| {
            (c.required_bytes.max(0) as u64, c.limit_bytes.max(0) as u64)
        });
        let topology = r
            .accessibility_requirements
            .as_ref()
            .map(|t| apb::TopologyRequirement {
                requisite: segments(&t.requisite),
                preferred: segments(&t.preferred),
            });
        let vol = self
            .agent()
            .create_volume(apb::CreateVolumeRequest {
                name: r.name,
                size_bytes: size,
                // A volume of this name whose size is in the requested
                // range is this volume (CSI idempotency); with no range,
                // any size is.
                min_bytes: min_bytes.max(1),
                max_bytes,
                replicas: params.repl,
                thin: params.thin,
                topology,
            })
            .await
            .map_err(|s| Rpc::CreateVolume.status(s))?
            .into_inner();
        let mut context: HashMap<String, String> = params
            .nvme
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_string()))
            .collect();
        if let Some(fs) = params.fs_type {
            context.insert("fsType".into(), fs);
        }
        let mut volume = csi_volume(&vol, context);
        // Reachable from any node over NVMe-oF; within the requested
        // segments when some were required.
        volume.accessible_topology = r
            .accessibility_requirements
            .map(|t| t.requisite)
            .unwrap_or_default();
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        match self
            .agent()
            .delete_volume(apb::DeleteVolumeRequest { id: r.volume_id })
            .await
        {
            Ok(_) => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(s) if s.code() == Code::FailedPrecondition => {
                Err(Status::failed_precondition(s.message().to_owned()))
            }
            Err(s) => Err(Rpc::DeleteVolume.status(s)),
        }
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        require("node_id", &r.node_id)?;
        let cap = r
            .volume_capability
            .ok_or_else(|| invalid("volume_capability is required"))?;
        if let Some(why) = unsupported(&cap) {
            return Err(invalid(why));
        }
        let mut agent = self.agent();
        // NOT_FOUND for an unknown volume or node, per the spec.
        agent
            .get_volume(apb::GetVolumeRequest {
                id: r.volume_id.clone(),
            })
            .await
            .map_err(|s| Rpc::Publish.status(s))?;
        let nodes = agent
            .list_nodes(apb::ListNodesRequest {})
            .await
            .map_err(|s| Rpc::Publish.status(s))?
            .into_inner()
            .nodes;
        if !nodes.iter().any(|n| n.id == r.node_id) {
            return Err(Status::not_found(format!("node {} not found", r.node_id)));
        }
        let vol = agent
            .publish_volume(apb::PublishVolumeRequest {
                id: r.volume_id,
                node: r.node_id,
            })
            .await
            .map_err(|s| Rpc::Publish.status(s))?
            .into_inner();
        let target = vol
            .target
            .ok_or_else(|| Status::internal("published volume has no target"))?;
        let (host, port) = split_address(&target.address)?;
        let mut ctx: HashMap<String, String> = r
            .volume_context
            .into_iter()
            .filter(|(k, _)| crate::params::PARAMETERS.contains(&k.as_str()))
            .collect();
        ctx.insert(publish_context::ADDRESS.into(), host);
        ctx.insert(publish_context::PORT.into(), port);
        ctx.insert(publish_context::NQN.into(), target.nqn);
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context: ctx,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        match self
            .agent()
            .unpublish_volume(apb::UnpublishVolumeRequest {
                id: r.volume_id,
                node: r.node_id,
            })
            .await
        {
            // A volume that is gone is unpublished everywhere.
            Ok(_) => Ok(Response::new(csi::ControllerUnpublishVolumeResponse {})),
            Err(s) if s.code() == Code::NotFound => {
                Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
            }
            Err(s) => Err(Rpc::Unpublish.status(s)),
        }
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        self.agent()
            .get_volume(apb::GetVolumeRequest { id: r.volume_id })
            .await
            .map_err(|s| Rpc::Validate.status(s))?;
        if let Some(why) = r.volume_capabilities.iter().find_map(unsupported) {
            return Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            }));
        }
        if let Err(why) = VolumeParams::parse(&r.parameters) {
            return Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            }));
        }
        Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: r.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let page = self.page(r.max_entries, r.starting_token).await?;
        Ok(Response::new(csi::ListVolumesResponse {
            entries: page
                .volumes
                .iter()
                .map(|v| csi::list_volumes_response::Entry {
                    volume: Some(csi_volume(v, HashMap::new())),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: published_nodes(v),
                        volume_condition: self.condition(v),
                    }),
                })
                .collect(),
            next_token: page.next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        check_capabilities_if_any(&r.volume_capabilities)?;
        if let Err(why) = VolumeParams::parse(&r.parameters) {
            return Err(invalid(why));
        }
        let segment = r
            .accessible_topology
            .map(|t| apb::Segment { labels: t.segments });
        let cap = self
            .agent()
            .get_capacity(apb::GetCapacityRequest { segment })
            .await
            .map_err(|s| Rpc::GetCapacity.status(s))?
            .into_inner();
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: i64::try_from(cap.available_bytes).unwrap_or(i64::MAX),
            maximum_volume_size: Some(i64::try_from(cap.maximum_volume_size).unwrap_or(i64::MAX)),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let mut caps = vec![
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::ExpandVolume,
            Cap::ListVolumesPublishedNodes,
            Cap::SingleNodeMultiWriter,
        ];
        if self.alpha {
            caps.extend([Cap::GetVolume, Cap::VolumeCondition]);
        }
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|c| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: c as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn delete_snapshot(
        &self,
        _req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn list_snapshots(
        &self,
        _req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn get_snapshot(
        &self,
        _req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered"))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .ok_or_else(|| invalid("capacity_range is required"))?;
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        let mut agent = self.agent();
        let current = agent
            .get_volume(apb::GetVolumeRequest {
                id: r.volume_id.clone(),
            })
            .await
            .map_err(|s| Rpc::Expand.status(s))?
            .into_inner();
        // Volumes never shrink: a request that would make the volume
        // smaller cannot be met (OUT_OF_RANGE); one for the current size is
        // a retry and succeeds.
        let size = size_for(Some(&range))?;
        if size < current.size_bytes
            || (range.limit_bytes > 0 && current.size_bytes > range.limit_bytes as u64)
        {
            return Err(Status::out_of_range(format!(
                "volume is {} bytes and cannot shrink to {size}",
                current.size_bytes
            )));
        }
        let vol = if size == current.size_bytes {
            current
        } else {
            agent
                .resize_volume(apb::ResizeVolumeRequest {
                    id: r.volume_id,
                    size_bytes: size,
                })
                .await
                .map_err(|s| Rpc::Expand.status(s))?
                .into_inner()
        };
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: vol.size_bytes as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let v = self
            .agent()
            .get_volume(apb::GetVolumeRequest { id: r.volume_id })
            .await
            .map_err(|s| Rpc::GetVolume.status(s))?
            .into_inner();
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, HashMap::new())),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: self.condition(&v),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("volume modification is not offered"))
    }
}
