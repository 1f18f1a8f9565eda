//! The agent's Control gRPC service: a thin skin over [`crate::control`].

use std::collections::HashMap;

use cairn_proto::agent::v1 as pb;
use cairn_proto::engine::v1 as epb;
use pb::control_server::Control as ControlApi;
use tonic::{Request, Response, Status};

use crate::control::health::{HealthOutcome, HealthReport};
use crate::control::placement::Segment;
use crate::control::{Control, CreateVolume};
use crate::model::{replica_of_child_uri, NodeRecord, VolumePhase, VolumeSpec};

/// Serves [`pb::control_server::ControlServer`].
pub struct ControlService {
    control: Control,
}

impl ControlService {
    pub fn new(control: Control) -> Self {
        ControlService { control }
    }

    /// The tonic server for this service.
    pub fn server(self) -> pb::control_server::ControlServer<Self> {
        pb::control_server::ControlServer::new(self)
    }
}

/// A replica's state as shown to users, from the volume record, its node's
/// liveness and the nexus's view of the child.
fn replica_state(
    r: &crate::model::ReplicaSpec,
    online: bool,
    child: Option<&epb::NexusChild>,
) -> (&'static str, Option<pb::RebuildStatus>) {
    if !online {
        return ("offline", None);
    }
    match child.map(|c| epb::ChildState::try_from(c.state)) {
        Some(Ok(epb::ChildState::Rebuilding)) => {
            let progress = child
                .and_then(|c| c.rebuild.as_ref())
                .map(|p| pb::RebuildStatus {
                    kind: p.kind.clone(),
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    rate_bytes_per_sec: p.rate_bytes_per_sec,
                    eta_secs: p.eta_secs,
                });
            ("rebuilding", progress)
        }
        Some(Ok(epb::ChildState::Faulted)) => ("faulted", None),
        Some(Ok(epb::ChildState::Healthy)) if r.healthy => ("healthy", None),
        // Healthy in the nexus, not yet recorded so by the reconciler.
        Some(Ok(epb::ChildState::Healthy)) => ("rebuilding", None),
        _ if r.rebuilding => ("rebuilding", None),
        _ if r.healthy => ("healthy", None),
        _ => ("faulted", None),
    }
}

fn to_pb_volume(
    v: VolumeSpec,
    online: impl Fn(&str) -> bool,
    children: &HashMap<String, epb::NexusChild>,
) -> pb::Volume {
    let healthy = v
        .replicas
        .iter()
        .filter(|r| r.healthy && online(&r.node))
        .count();
    let status = match v.phase {
        VolumePhase::Creating => "creating",
        VolumePhase::Deleting => "deleting",
        VolumePhase::Ready if healthy == 0 => "faulted",
        VolumePhase::Ready if healthy < v.replicas_wanted as usize => "degraded",
        VolumePhase::Ready => "online",
    };
    pb::Volume {
        id: v.id,
        name: v.name,
        size_bytes: v.size_bytes,
        replicas_wanted: v.replicas_wanted,
        thin: v.thin,
        replicas: v
            .replicas
            .into_iter()
            .map(|r| {
                let (state, rebuild) = replica_state(&r, online(&r.node), children.get(&r.uuid));
                pb::ReplicaLocation {
                    healthy: r.healthy && online(&r.node),
                    state: state.to_owned(),
                    rebuild,
                    replaces: r.replaces.unwrap_or_default(),
                    uuid: r.uuid,
                    node: r.node,
                    pool: r.pool,
                }
            })
            .collect(),
        target: v.target.map(|t| pb::Target {
            node: t.node,
            nqn: t.nqn,
            address: t.address,
        }),
        status: status.to_owned(),
        topology: v.topology.into_iter().collect(),
        rebuild_node: v.rebuild_nexus.unwrap_or_default(),
    }
}

fn segments(s: Vec<pb::Segment>) -> Vec<Segment> {
    s.into_iter()
        .map(|s| s.labels.into_iter().collect())
        .collect()
}

impl ControlService {
    async fn volume_view(&self, v: VolumeSpec) -> Result<pb::Volume, Status> {
        Ok(self.volume_views(vec![v]).await?.pop().unwrap_or_default())
    }

    /// Volumes with their replicas' states, asking each nexus node once.
    async fn volume_views(&self, vols: Vec<VolumeSpec>) -> Result<Vec<pb::Volume>, Status> {
        let nodes = self.control.nodes().await?;
        let online = |id: &str| {
            nodes
                .iter()
                .any(|n| n.id == id && self.control.is_online(n))
        };
        let mut nexuses: HashMap<String, Vec<epb::Nexus>> = HashMap::new();
        for v in &vols {
            let Some(nn) = v.nexus_node() else { continue };
            if nexuses.contains_key(nn) {
                continue;
            }
            let listed = match nodes
                .iter()
                .find(|n| n.id == nn && self.control.is_online(n))
            {
                // What the engine shows is best effort: the record stands
                // on its own when the engine does not answer.
                Some(n) => self.control.list_nexuses_on(n).await.unwrap_or_default(),
                None => vec![],
            };
            nexuses.insert(nn.to_owned(), listed);
        }
        let mut out = Vec::with_capacity(vols.len());
        for v in vols {
            let children: HashMap<String, epb::NexusChild> = v
                .nexus_node()
                .and_then(|nn| nexuses.get(nn))
                .and_then(|l| l.iter().find(|n| n.uuid == v.id))
                .map(|n| {
                    n.children
                        .iter()
                        .filter_map(|c| {
                            replica_of_child_uri(&c.uri).map(|u| (u.to_owned(), c.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(to_pb_volume(v, online, &children));
        }
        Ok(out)
    }

    fn node_view(&self, n: NodeRecord) -> pb::Node {
        pb::Node {
            online: self.control.is_online(&n),
            id: n.id,
            engine_endpoint: n.engine_endpoint,
            nvmf_address: n.nvmf_address,
            host_nqn: n.host_nqn,
            topology: n.topology.into_iter().collect(),
            pools: n
                .pools
                .into_iter()
                .map(|p| pb::PoolRecord {
                    name: p.name,
                    disk: p.disk,
                    capacity_bytes: p.capacity_bytes,
                    used_bytes: p.used_bytes,
                    committed_bytes: p.committed_bytes,
                })
                .collect(),
            last_seen: n.last_seen,
        }
    }
}

#[tonic::async_trait]
impl ControlApi for ControlService {
    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.control.nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(|n| self.node_view(n)).collect(),
        }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let (requisite, preferred) = match r.topology {
            Some(t) => (segments(t.requisite), segments(t.preferred)),
            None => (vec![], vec![]),
        };
        let v = self
            .control
            .create_volume(CreateVolume {
                name: r.name,
                size_bytes: r.size_bytes,
                min_bytes: r.min_bytes,
                max_bytes: r.max_bytes,
                replicas: r.replicas,
                thin: r.thin,
                requisite,
                preferred,
            })
            .await?;
        Ok(Response::new(self.volume_view(v).await?))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.control.delete_volume(&req.into_inner().id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let v = self.control.volume(&req.into_inner().id).await?;
        Ok(Response::new(self.volume_view(v).await?))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let all = self.control.volumes().await?;
        // The token is the id of the first volume of the next page; volumes
        // are listed in id order, so pages stay stable under inserts.
        let start = if r.starting_token.is_empty() {
            0
        } else {
            if uuid::Uuid::parse_str(&r.starting_token).is_err() {
                return Err(Status::aborted(format!(
                    "invalid starting token {:?}",
                    r.starting_token
                )));
            }
            all.iter()
                .position(|v| v.id.as_str() >= r.starting_token.as_str())
                .unwrap_or(all.len())
        };
        let max = if r.max_entries == 0 {
            usize::MAX
        } else {
            r.max_entries as usize
        };
        let page: Vec<VolumeSpec> = all.iter().skip(start).take(max).cloned().collect();
        let next_token = all
            .get(start + page.len())
            .map(|v| v.id.clone())
            .unwrap_or_default();
        let volumes = self.volume_views(page).await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            next_token,
        }))
    }

    async fn publish_volume(
        &self,
        req: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let v = self.control.publish_volume(&r.id, &r.node).await?;
        Ok(Response::new(self.volume_view(v).await?))
    }

    async fn unpublish_volume(
        &self,
        req: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let v = self.control.unpublish_volume(&r.id, &r.node).await?;
        Ok(Response::new(self.volume_view(v).await?))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let v = self.control.resize_volume(&r.id, r.size_bytes).await?;
        Ok(Response::new(self.volume_view(v).await?))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let seg = req
            .into_inner()
            .segment
            .map(|s| s.labels.into_iter().collect())
            .unwrap_or_default();
        let (available, largest) = self.control.capacity(&seg).await?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_bytes: available,
            maximum_volume_size: largest,
        }))
    }

    async fn check_pool(
        &self,
        req: Request<pb::CheckPoolRequest>,
    ) -> Result<Response<pb::CheckPoolResponse>, Status> {
        let r = req.into_inner();
        let c = self.control.check_pool(&r.node, &r.pool, r.repair).await?;
        let damage = |d: Vec<cairn_proto::engine::v1::PoolDamage>| {
            d.into_iter()
                .map(|d| pb::PoolDamage {
                    what: d.what,
                    offset: d.offset,
                    reason: d.reason,
                })
                .collect()
        };
        Ok(Response::new(pb::CheckPoolResponse {
            damaged: damage(c.damaged),
            repaired: damage(c.repaired),
            faulted_replicas: c.faulted_replicas,
        }))
    }

    async fn record_nexus_health(
        &self,
        req: Request<pb::RecordNexusHealthRequest>,
    ) -> Result<Response<pb::RecordNexusHealthResponse>, Status> {
        let r = req.into_inner();
        let outcome =
            self.control
                .record_nexus_health(&HealthReport {
                    volume_id: r.volume_id,
                    healthy_children: r.healthy_children,
                    clean_shutdown: r.clean_shutdown,
                    generation: r.generation,
                    instance: r.instance,
                })
                .await
                .map_err(|e| match e {
                    // The engine holds a write until this succeeds: any store
                    // trouble is worth a retry.
                    crate::error::ControlError::Store(_)
                    | crate::error::ControlError::Busy { .. } => Status::unavailable(e.to_string()),
                    e => Status::from(e),
                })?;
        match outcome {
            HealthOutcome::Stale => tracing::debug!("stale nexus health report ignored"),
            // The reporting nexus is not the volume's current one: it must
            // not acknowledge the writes it wanted to record this for.
            HealthOutcome::Fenced => {
                return Err(Status::failed_precondition(
                    "the volume names another nexus instance as current",
                ))
            }
            HealthOutcome::Recorded | HealthOutcome::UnknownVolume => {}
        }
        Ok(Response::new(pb::RecordNexusHealthResponse {}))
    }
}
