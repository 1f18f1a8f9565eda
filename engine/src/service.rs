//! The engine's gRPC API. Handlers are thin: they run the synchronous
//! [`Engine`] operations on tokio's blocking pool, never on a reactor, and
//! map errors to status codes here, once.

use std::sync::Arc;

use cairn_bdev::BdevError;
use cairn_pool::PoolError;
use cairn_proto::engine::v1 as pb;
use pb::engine_server::Engine as EngineApi;
use tonic::{Code, Request, Response, Status};

use cairn_nvmf::replica_nqn;

use crate::core::{Engine, EngineError};
use crate::nexus::{Child, ChildState, NexusError};
use crate::target::TargetError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let code = match &e {
            EngineError::Pool(p) => match p {
                PoolError::ReplicaNotFound { .. } => Code::NotFound,
                PoolError::AlreadyExists { .. } => Code::AlreadyExists,
                PoolError::NoSpace { .. } | PoolError::TooManyReplicas { .. } => {
                    Code::ResourceExhausted
                }
                PoolError::Busy { .. }
                | PoolError::ShrinkRefused { .. }
                | PoolError::BadMagic { .. } => Code::FailedPrecondition,
                PoolError::Corrupt { .. }
                | PoolError::BadSuperblock { .. }
                | PoolError::UnsupportedVersion { .. }
                | PoolError::DeviceShrank { .. } => Code::DataLoss,
                PoolError::InvalidArgument { .. } | PoolError::DeviceTooSmall { .. } => {
                    Code::InvalidArgument
                }
                PoolError::Closed { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
            EngineError::Target(t) => match t {
                TargetError::Exists { .. } => Code::AlreadyExists,
                TargetError::NotFound { .. } => Code::NotFound,
                TargetError::InvalidNqn { .. } | TargetError::InvalidNamespace { .. } => {
                    Code::InvalidArgument
                }
                TargetError::Shutdown => Code::Unavailable,
                _ => Code::Internal,
            },
            EngineError::Nexus(NexusError::Shrink { .. } | NexusError::LastHealthy { .. }) => {
                Code::FailedPrecondition
            }
            EngineError::Nexus(NexusError::NoSuchChild { .. }) => Code::NotFound,
            EngineError::Nexus(NexusError::ChildExists { .. }) => Code::AlreadyExists,
            EngineError::Nexus(_) | EngineError::InvalidArgument(_) => Code::InvalidArgument,
            EngineError::NotFound { .. } => Code::NotFound,
            EngineError::AlreadyExists { .. } => Code::AlreadyExists,
            EngineError::Busy { .. } | EngineError::NotAPool { .. } => Code::FailedPrecondition,
            EngineError::ChildUnreachable { .. } => Code::Unavailable,
            EngineError::Io { .. } => Code::Internal,
            EngineError::DiskUri(_) => Code::InvalidArgument,
            EngineError::Disk { source, .. } => match source {
                BdevError::Unsupported { .. } => Code::InvalidArgument,
                BdevError::Io { source, .. } => match source.kind() {
                    std::io::ErrorKind::NotFound => Code::NotFound,
                    std::io::ErrorKind::AlreadyExists => Code::AlreadyExists,
                    _ => Code::Internal,
                },
                _ => Code::Internal,
            },
        };
        Status::new(code, e.to_string())
    }
}

/// Serves the Engine API over an [`Engine`].
pub struct EngineService {
    engine: Arc<Engine>,
    info: pb::EngineInfo,
}

impl EngineService {
    pub fn new(engine: Arc<Engine>) -> Self {
        let info = pb::EngineInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            nvmf_address: engine.target().local_addr().to_string(),
            reactors: engine.target().reactors().len() as u32,
            host_nqn: engine.host_nqn().to_owned(),
        };
        EngineService { engine, info }
    }

    /// The tonic server for this service.
    pub fn server(self) -> pb::engine_server::EngineServer<Self> {
        pb::engine_server::EngineServer::new(self)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| Status::internal(format!("engine task failed: {e}")))?
            .map_err(Status::from)
    }
}

fn pool_pb(p: &cairn_pool::Pool) -> pb::Pool {
    let i = p.info();
    pb::Pool {
        name: i.name,
        uuid: i.uuid.to_string(),
        disk: cairn_bdev::malloc::uri_of(&i.path).unwrap_or_else(|| i.path.display().to_string()),
        capacity_bytes: i.capacity,
        used_bytes: i.used,
        committed_bytes: i.committed,
        cluster_size: u64::from(i.cluster_size),
        replica_count: i.replicas as u32,
    }
}

fn replica_pb(engine: &Engine, pool: &str, r: &cairn_pool::Replica) -> pb::Replica {
    let s = r.stats();
    let share = engine.share_of(&r.uuid());
    pb::Replica {
        uuid: r.uuid().to_string(),
        name: r.name().to_owned(),
        pool: pool.to_owned(),
        size_bytes: r.size(),
        thin: r.is_thin(),
        allocated_bytes: r.allocated_bytes(),
        share_nqn: if share.is_some() {
            replica_nqn(&r.uuid())
        } else {
            String::new()
        },
        allowed_hosts: share.unwrap_or_default(),
        stats: Some(pb::ReplicaStats {
            reads: s.reads,
            writes: s.writes,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
        }),
        state: if r.is_faulted() {
            pb::ReplicaState::Faulted
        } else {
            pb::ReplicaState::Online
        } as i32,
    }
}

fn damage_pb(d: &cairn_pool::Damage) -> pb::PoolDamage {
    pb::PoolDamage {
        what: d.location.what.clone(),
        offset: d.location.offset,
        reason: d.reason.clone(),
    }
}

fn child_pb(c: &Child, segment_bytes: u64) -> pb::NexusChild {
    let state = c.state();
    pb::NexusChild {
        uri: c.uri().to_owned(),
        state: match state {
            ChildState::Healthy => pb::ChildState::Healthy,
            ChildState::Faulted => pb::ChildState::Faulted,
            ChildState::Rebuilding => pb::ChildState::Rebuilding,
        } as i32,
        rebuild: c.progress().map(|p| pb::RebuildProgress {
            kind: if p.partial { "partial" } else { "full" }.into(),
            bytes_done: p.done_bytes(),
            bytes_total: p.total_bytes,
            rate_bytes_per_sec: p.rate(),
            eta_secs: p.eta_secs(),
        }),
        last_rebuild_bytes: c.last_rebuild_bytes(),
        dirty_bytes: (state == ChildState::Faulted).then(|| c.stale_bytes(segment_bytes)),
        fault_reason: c.fault_reason(),
    }
}

fn nexus_pb(engine: &Engine, uuid: &str) -> Result<pb::Nexus, EngineError> {
    let addr = engine.target().local_addr().to_string();
    engine
        .nexuses(|n| {
            let seg = n.nexus.config().segment_bytes;
            pb::Nexus {
                uuid: n.uuid.to_string(),
                size_bytes: n.size_bytes,
                children: n
                    .nexus
                    .children()
                    .iter()
                    .map(|c| child_pb(c, seg))
                    .collect(),
                nqn: n.nqn.clone(),
                address: addr.clone(),
                allowed_hosts: n.allowed_hosts.clone(),
                instance: n.nexus.instance().to_string(),
            }
        })
        .into_iter()
        .find(|n| n.uuid == uuid)
        .ok_or(EngineError::NotFound {
            kind: "nexus",
            id: uuid.to_owned(),
        })
}

#[tonic::async_trait]
impl EngineApi for EngineService {
    async fn get_info(
        &self,
        _r: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::EngineInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let r = r.into_inner();
        let cluster = u32::try_from(r.cluster_size).map_err(|_| {
            Status::invalid_argument(format!("cluster size {} is too large", r.cluster_size))
        })?;
        let p = self
            .run(move |e| e.create_pool_uri(&r.name, &r.disk, r.create_file_size, cluster))
            .await?;
        Ok(Response::new(pool_pb(&p)))
    }

    async fn import_pool(
        &self,
        r: Request<pb::ImportPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let disk = r.into_inner().disk;
        let p = self.run(move |e| e.import_pool_uri(&disk)).await?;
        Ok(Response::new(pool_pb(&p)))
    }

    async fn export_pool(
        &self,
        r: Request<pb::ExportPoolRequest>,
    ) -> Result<Response<pb::ExportPoolResponse>, Status> {
        let name = r.into_inner().name;
        self.run(move |e| e.export_pool(&name)).await?;
        Ok(Response::new(pb::ExportPoolResponse {}))
    }

    async fn destroy_pool(
        &self,
        r: Request<pb::DestroyPoolRequest>,
    ) -> Result<Response<pb::DestroyPoolResponse>, Status> {
        let name = r.into_inner().name;
        self.run(move |e| e.destroy_pool(&name)).await?;
        Ok(Response::new(pb::DestroyPoolResponse {}))
    }

    async fn list_pools(
        &self,
        _r: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self
            .run(|e| Ok(e.pools().iter().map(|p| pool_pb(p)).collect()))
            .await?;
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn check_pool(
        &self,
        r: Request<pb::CheckPoolRequest>,
    ) -> Result<Response<pb::CheckPoolResponse>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                let c = e.pool(&r.name)?.check(r.repair)?;
                Ok(pb::CheckPoolResponse {
                    damaged: c.damaged.iter().map(damage_pb).collect(),
                    repaired: c.repaired.iter().map(damage_pb).collect(),
                    faulted_replicas: c.faulted_replicas.iter().map(|u| u.to_string()).collect(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn create_replica(
        &self,
        r: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                let rep = e.create_replica(&r.pool, &r.uuid, &r.name, r.size_bytes, r.thin)?;
                Ok(replica_pb(e, &r.pool, &rep))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn destroy_replica(
        &self,
        r: Request<pb::DestroyReplicaRequest>,
    ) -> Result<Response<pb::DestroyReplicaResponse>, Status> {
        let uuid = r.into_inner().uuid;
        self.run(move |e| e.destroy_replica(&uuid)).await?;
        Ok(Response::new(pb::DestroyReplicaResponse {}))
    }

    async fn resize_replica(
        &self,
        r: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                let rep = e.resize_replica(&r.uuid, r.size_bytes)?;
                let (pool, _) = e.replica(&rep.uuid())?;
                Ok(replica_pb(e, pool.name(), &rep))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn list_replicas(
        &self,
        r: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let only = r.into_inner().pool;
        let replicas = self
            .run(move |e| {
                let mut out = Vec::new();
                for p in e.pools() {
                    if !only.is_empty() && p.name() != only {
                        continue;
                    }
                    out.extend(p.replicas().iter().map(|r| replica_pb(e, p.name(), r)));
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(pb::ListReplicasResponse { replicas }))
    }

    async fn share_replica(
        &self,
        r: Request<pb::ShareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                let rep = e.share_replica(&r.uuid, r.allowed_hosts)?;
                let (pool, _) = e.replica(&rep.uuid())?;
                Ok(replica_pb(e, pool.name(), &rep))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn unshare_replica(
        &self,
        r: Request<pb::UnshareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let uuid = r.into_inner().uuid;
        let out = self
            .run(move |e| {
                e.unshare_replica(&uuid)?;
                let id = uuid::Uuid::parse_str(&uuid)
                    .map_err(|_| EngineError::InvalidArgument(format!("bad uuid {uuid:?}")))?;
                let (pool, rep) = e.replica(&id)?;
                Ok(replica_pb(e, pool.name(), &rep))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn create_nexus(
        &self,
        r: Request<pb::CreateNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                e.create_nexus_as(
                    &r.uuid,
                    &r.instance,
                    r.size_bytes,
                    &r.children,
                    r.allowed_hosts,
                )?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn resize_nexus(
        &self,
        r: Request<pb::ResizeNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let out = self
            .run(move |e| {
                e.resize_nexus(&r.uuid, r.size_bytes)?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn destroy_nexus(
        &self,
        r: Request<pb::DestroyNexusRequest>,
    ) -> Result<Response<pb::DestroyNexusResponse>, Status> {
        let uuid = r.into_inner().uuid;
        self.run(move |e| e.destroy_nexus(&uuid)).await?;
        Ok(Response::new(pb::DestroyNexusResponse {}))
    }

    async fn list_nexuses(
        &self,
        _r: Request<pb::ListNexusesRequest>,
    ) -> Result<Response<pb::ListNexusesResponse>, Status> {
        let nexuses = self
            .run(|e| {
                let ids = e.nexuses(|n| n.uuid.to_string());
                ids.iter().map(|id| nexus_pb(e, id)).collect()
            })
            .await?;
        Ok(Response::new(pb::ListNexusesResponse { nexuses }))
    }

    async fn add_child(
        &self,
        r: Request<pb::AddChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let nexus = self
            .run(move |e| {
                e.add_child(&r.uuid, &r.uri)?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(nexus))
    }

    async fn remove_child(
        &self,
        r: Request<pb::RemoveChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let nexus = self
            .run(move |e| {
                e.remove_child(&r.uuid, &r.uri)?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(nexus))
    }

    async fn fault_child(
        &self,
        r: Request<pb::FaultChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let nexus = self
            .run(move |e| {
                e.fault_child(&r.uuid, &r.uri)?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(nexus))
    }

    async fn online_child(
        &self,
        r: Request<pb::OnlineChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let nexus = self
            .run(move |e| {
                e.online_child(&r.uuid, &r.uri)?;
                nexus_pb(e, &r.uuid.to_lowercase())
            })
            .await?;
        Ok(Response::new(nexus))
    }
}
