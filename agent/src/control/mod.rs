//! The cluster control logic: volume operations over the registered nodes'
//! engines, with the desired state recorded in the store first.
//!
//! Every operation is idempotent and restartable: a volume record is written
//! in the `Creating` or `Deleting` phase before any engine is touched, so an
//! operation cut short by a crash is finished (or undone) by its retry.
//! Operations on one volume are serialised; a concurrent second one is
//! refused with `Busy` (CSI's ABORTED) rather than queued.
//!
//! - [`placement`]: where replicas go, a pure function of the node records.
//! - [`health`]: the nexus health records engines write before they
//!   acknowledge a write with fewer healthy children.
//! - [`lease`]: the lease that lets one agent at a time run the
//!   reconcilers.
//! - [`reconcile`]: the self-healing loop (mark, resync, replace, rebuild,
//!   garbage-collect).

pub mod health;
pub mod lease;
pub mod placement;
pub mod reconcile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::engine::v1 as pb;
use pb::engine_client::EngineClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::error::ControlError;
use crate::model::{
    decode, encode, volume_id_for_name, NexusHealth, NodeRecord, Record, ReplicaSpec, TargetSpec,
    VolumePhase, VolumeSpec,
};
use crate::store::Store;
use placement::{place, PlacementRequest, Segment};

/// Tunables of the control logic.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// A node whose heartbeat is older than this is offline.
    pub node_lease: Duration,
    /// Thin replicas may commit this percentage of a pool's capacity.
    pub overcommit_pct: u64,
    /// Deadline of one engine call.
    pub engine_timeout: Duration,
    /// Pause between two reconciler rounds.
    pub reconcile_period: Duration,
    /// A replica unhealthy for this long is replaced by a new one elsewhere.
    pub replace_after: Duration,
    /// Lifetime of the reconciler lease; the holder renews it every round.
    pub lease_ttl: Duration,
    /// A volume left `Creating` or `Deleting` this long (its operation was
    /// cut short) is finished by the reconciler.
    pub stale_op_after: Duration,
    /// Whether the reconciler destroys replicas, nexuses and shares that no
    /// volume record needs.
    pub garbage_collect: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            node_lease: Duration::from_secs(15),
            overcommit_pct: 1000,
            engine_timeout: Duration::from_secs(30),
            reconcile_period: Duration::from_secs(5),
            replace_after: Duration::from_secs(300),
            lease_ttl: Duration::from_secs(15),
            stale_op_after: Duration::from_secs(120),
            garbage_collect: true,
        }
    }
}

/// A request to create a volume.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    /// An existing volume of this name is the same volume when its size
    /// lies in `[min_bytes, max_bytes]` (0: unbounded); both 0 means exactly
    /// `size_bytes`.
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub replicas: u32,
    pub thin: bool,
    pub requisite: Vec<Segment>,
    pub preferred: Vec<Segment>,
}

/// The control logic.
#[derive(Clone)]
pub struct Control {
    store: Arc<dyn Store>,
    cfg: ControlConfig,
    engines: Arc<Mutex<HashMap<String, EngineClient<Channel>>>>,
    /// Volumes with an operation in progress here, and who runs it.
    busy: Arc<Mutex<HashMap<String, Holder>>>,
    /// Leases this process holds, with their expiry (Unix milliseconds).
    leases: Arc<Mutex<HashMap<String, i64>>>,
}

/// Who holds a volume's operation slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A volume operation (an API call).
    Operation,
    /// The reconciler, for a short step; operations wait for it.
    Reconciler,
}

/// Holds a volume's operation slot until dropped.
struct VolumeGuard {
    busy: Arc<Mutex<HashMap<String, Holder>>>,
    id: String,
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy.lock().expect("poisoned").remove(&self.id);
    }
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Adds `uri` to the nexus of `volume` on `node`'s engine; a child the
/// nexus has already is left as it is.
async fn add_child(
    engine: &mut EngineClient<Channel>,
    volume: &str,
    uri: &str,
    node: &str,
) -> Result<(), ControlError> {
    match engine
        .add_child(pb::AddChildRequest {
            uuid: volume.to_owned(),
            uri: uri.to_owned(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(engine_err(node)(s)),
    }
}

fn engine_err(node: &str) -> impl Fn(tonic::Status) -> ControlError + '_ {
    move |status| ControlError::Engine {
        node: node.to_owned(),
        status,
    }
}

impl Control {
    pub fn new(store: Arc<dyn Store>, cfg: ControlConfig) -> Self {
        Control {
            store,
            cfg,
            engines: Arc::default(),
            busy: Arc::default(),
            leases: Arc::default(),
        }
    }

    /// The store this control logic records its state in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Takes the volume's slot for `holder`, or says who has it.
    fn try_lock(&self, id: &str, holder: Holder) -> Result<VolumeGuard, Holder> {
        let mut busy = self.busy.lock().expect("poisoned");
        if let Some(h) = busy.get(id) {
            return Err(*h);
        }
        busy.insert(id.to_owned(), holder);
        Ok(VolumeGuard {
            busy: self.busy.clone(),
            id: id.to_owned(),
        })
    }

    /// Takes the volume's slot for an operation. Another operation in
    /// progress refuses it (`Busy`); the reconciler's step is waited for.
    async fn lock(&self, id: &str) -> Result<VolumeGuard, ControlError> {
        let deadline = tokio::time::Instant::now() + self.cfg.engine_timeout * 2;
        loop {
            match self.try_lock(id, Holder::Operation) {
                Ok(g) => return Ok(g),
                Err(Holder::Reconciler) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => return Err(ControlError::Busy { id: id.to_owned() }),
            }
        }
    }

    /// Whether a node's heartbeat is recent enough.
    pub fn is_online(&self, node: &NodeRecord) -> bool {
        now_secs().saturating_sub(node.last_seen) <= self.cfg.node_lease.as_secs() as i64
    }

    // ---- records -------------------------------------------------------

    async fn load<T: Record>(&self, id: &str) -> Result<Option<(T, u64)>, ControlError> {
        let key = T::key_of(id);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some((decode(&key, &v.value)?, v.version))),
            None => Ok(None),
        }
    }

    async fn save<T: Record>(&self, rec: &T) -> Result<(), ControlError> {
        self.store.put(&T::key_of(rec.id()), &encode(rec)).await?;
        Ok(())
    }

    /// Writes `rec` if its stored version is still `version` (0: absent);
    /// returns the new version, or `None` when someone wrote in between.
    async fn save_if<T: Record>(&self, rec: &T, version: u64) -> Result<Option<u64>, ControlError> {
        Ok(self
            .store
            .compare_and_put(&T::key_of(rec.id()), &encode(rec), version)
            .await?)
    }

    async fn list_records<T: Record>(&self) -> Result<Vec<T>, ControlError> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(&T::prefix()).await? {
            out.push(decode(&key, &v.value)?);
        }
        Ok(out)
    }

    /// Records (or refreshes) a node's registration.
    pub async fn register_node(&self, node: &NodeRecord) -> Result<(), ControlError> {
        self.save(node).await
    }

    /// Every registered node.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        self.list_records().await
    }

    async fn node(&self, id: &str) -> Result<NodeRecord, ControlError> {
        self.load::<NodeRecord>(id)
            .await?
            .map(|(n, _)| n)
            .ok_or(ControlError::NotFound {
                kind: "node",
                id: id.to_owned(),
            })
    }

    /// Asks `node`'s engine to check (and with `repair`, repair) its pool
    /// `pool`.
    pub async fn check_pool(
        &self,
        node: &str,
        pool: &str,
        repair: bool,
    ) -> Result<cairn_proto::engine::v1::CheckPoolResponse, ControlError> {
        let n = self.node(node).await?;
        let mut engine = self.engine(&n)?;
        let r = engine
            .check_pool(cairn_proto::engine::v1::CheckPoolRequest {
                name: pool.to_owned(),
                repair,
            })
            .await
            .map_err(engine_err(node))?;
        Ok(r.into_inner())
    }

    /// A volume by id.
    pub async fn volume(&self, id: &str) -> Result<VolumeSpec, ControlError> {
        self.load::<VolumeSpec>(id)
            .await?
            .map(|(v, _)| v)
            .ok_or(ControlError::NotFound {
                kind: "volume",
                id: id.to_owned(),
            })
    }

    /// Every volume, in id order.
    pub async fn volumes(&self) -> Result<Vec<VolumeSpec>, ControlError> {
        self.list_records().await
    }

    // ---- engines -------------------------------------------------------

    fn engine(&self, node: &NodeRecord) -> Result<EngineClient<Channel>, ControlError> {
        let mut engines = self.engines.lock().expect("poisoned");
        if let Some(c) = engines.get(&node.engine_endpoint) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(node.engine_endpoint.clone())
            .map_err(|e| ControlError::Engine {
                node: node.id.clone(),
                status: tonic::Status::invalid_argument(format!(
                    "bad engine endpoint {}: {e}",
                    node.engine_endpoint
                )),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.cfg.engine_timeout);
        let client = EngineClient::new(ep.connect_lazy());
        engines.insert(node.engine_endpoint.clone(), client.clone());
        Ok(client)
    }

    /// The nexuses on a node's engine, answering within a short bound (for
    /// views that must not hang on a slow engine).
    pub async fn list_nexuses_on(&self, node: &NodeRecord) -> Result<Vec<pb::Nexus>, ControlError> {
        let mut engine = self.engine(node)?;
        let mut req = tonic::Request::new(pb::ListNexusesRequest {});
        req.set_timeout(Duration::from_secs(2));
        Ok(engine
            .list_nexuses(req)
            .await
            .map_err(engine_err(&node.id))?
            .into_inner()
            .nexuses)
    }

    async fn create_replica(
        &self,
        node: &NodeRecord,
        r: &ReplicaSpec,
        vol: &VolumeSpec,
    ) -> Result<(), ControlError> {
        let mut engine = self.engine(node)?;
        engine
            .create_replica(pb::CreateReplicaRequest {
                uuid: r.uuid.clone(),
                name: vol.name.clone(),
                pool: r.pool.clone(),
                size_bytes: vol.size_bytes,
                thin: vol.thin,
            })
            .await
            .map_err(engine_err(&node.id))?;
        Ok(())
    }

    /// Destroys a replica on its node. A node that left the cluster took
    /// its replicas with it; one that is offline gets them destroyed by
    /// garbage collection when it returns (they are no longer recorded).
    async fn destroy_replica(&self, r: &ReplicaSpec) -> Result<(), ControlError> {
        let node = match self.node(&r.node).await {
            Ok(n) if self.is_online(&n) => n,
            Ok(_) | Err(ControlError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut engine = self.engine(&node)?;
        match engine
            .destroy_replica(pb::DestroyReplicaRequest {
                uuid: r.uuid.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(engine_err(&node.id)(s)),
        }
    }

    // ---- volume operations ---------------------------------------------

    /// Creates a volume, or returns the existing one with the same name and
    /// parameters. Finishes a creation that an earlier crash cut short.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeSpec, ControlError> {
        if req.name.is_empty() {
            return Err(ControlError::InvalidArgument("volume name is empty".into()));
        }
        if req.size_bytes == 0 {
            return Err(ControlError::InvalidArgument("volume size is zero".into()));
        }
        if req.replicas == 0 {
            return Err(ControlError::InvalidArgument(
                "replica count is zero".into(),
            ));
        }
        let id = volume_id_for_name(&req.name);
        let _guard = self.lock(&id).await?;
        let (mut vol, version) = match self.load::<VolumeSpec>(&id).await? {
            Some((v, _)) if v.phase == VolumePhase::Deleting => {
                return Err(ControlError::FailedPrecondition(format!(
                    "volume {} is being deleted",
                    v.name
                )))
            }
            Some((v, version)) => {
                let fits = if req.min_bytes == 0 && req.max_bytes == 0 {
                    v.size_bytes == req.size_bytes
                } else {
                    v.size_bytes >= req.min_bytes
                        && (req.max_bytes == 0 || v.size_bytes <= req.max_bytes)
                };
                if !fits || v.replicas_wanted != req.replicas || v.thin != req.thin {
                    return Err(ControlError::AlreadyExists {
                        name: req.name,
                        existing: format!(
                            "size {} bytes, {} replica(s), thin={}",
                            v.size_bytes, v.replicas_wanted, v.thin
                        ),
                    });
                }
                (v, version)
            }
            None => {
                let nodes = self.nodes().await?;
                let chosen = place(
                    &nodes,
                    |n| self.is_online(n),
                    &PlacementRequest {
                        size: req.size_bytes,
                        count: req.replicas,
                        thin: req.thin,
                        overcommit_pct: self.cfg.overcommit_pct,
                        requisite: req.requisite.clone(),
                        preferred: req.preferred.clone(),
                        exclude: vec![],
                    },
                )
                .map_err(|reason| ControlError::NoCapacity {
                    wanted: req.replicas,
                    size: req.size_bytes,
                    reason,
                })?;
                let topology = nodes
                    .iter()
                    .find(|n| n.id == chosen[0].node)
                    .map(|n| n.topology.clone())
                    .unwrap_or_default();
                let vol = VolumeSpec {
                    id: id.clone(),
                    name: req.name.clone(),
                    size_bytes: req.size_bytes,
                    replicas_wanted: req.replicas,
                    thin: req.thin,
                    phase: VolumePhase::Creating,
                    replicas: chosen
                        .into_iter()
                        .map(|p| ReplicaSpec::new(uuid::Uuid::new_v4().to_string(), p.node, p.pool))
                        .collect(),
                    target: None,
                    topology,
                    rebuild_nexus: None,
                    nexus_instance: String::new(),
                    phase_since: now_secs(),
                    requisite: req.requisite.clone(),
                    preferred: req.preferred.clone(),
                };
                // Intent first: a crash after this point leaves a record that
                // the retry (or the reconciler) finishes. Only if absent: an
                // agent creating the same volume at once wins, and this
                // call's retry finishes that one's record.
                match self.save_if(&vol, 0).await? {
                    Some(version) => (vol, version),
                    None => return Err(ControlError::Busy { id }),
                }
            }
        };
        if vol.phase == VolumePhase::Creating {
            self.finish_create(&mut vol, version).await?;
        }
        Ok(vol)
    }

    /// Creates every replica of a `Creating` volume recorded at `version`
    /// and marks it ready, unless the record changed meanwhile (another
    /// agent finished it, or a delete started).
    async fn finish_create(&self, vol: &mut VolumeSpec, version: u64) -> Result<(), ControlError> {
        for r in &vol.replicas {
            let node = self.node(&r.node).await?;
            self.create_replica(&node, r, vol).await?;
        }
        vol.phase = VolumePhase::Ready;
        vol.phase_since = now_secs();
        if self.save_if(vol, version).await?.is_none() {
            match self.load::<VolumeSpec>(&vol.id).await? {
                Some((now, _))
                    if now.phase == VolumePhase::Ready && now.replicas == vol.replicas =>
                {
                    *vol = now;
                    return Ok(());
                }
                _ => return Err(ControlError::Busy { id: vol.id.clone() }),
            }
        }
        tracing::info!(volume = %vol.id, name = %vol.name, replicas = vol.replicas.len(), "volume created");
        Ok(())
    }

    /// Deletes a volume and its replicas. Deleting an unknown volume succeeds.
    pub async fn delete_volume(&self, id: &str) -> Result<(), ControlError> {
        let _guard = self.lock(id).await?;
        let Some((mut vol, version)) = self.load::<VolumeSpec>(id).await? else {
            return Ok(());
        };
        if vol.phase != VolumePhase::Deleting {
            vol.phase = VolumePhase::Deleting;
            vol.phase_since = now_secs();
            // Against the version read: a creation finishing elsewhere
            // must not be overwritten by a stale copy.
            if self.save_if(&vol, version).await?.is_none() {
                return Err(ControlError::Busy { id: id.to_owned() });
            }
        }
        self.finish_delete(&vol).await
    }

    /// Tears down a `Deleting` volume's nexuses and replicas, then forgets it.
    async fn finish_delete(&self, vol: &VolumeSpec) -> Result<(), ControlError> {
        let id = vol.id.as_str();
        if let Some(t) = vol.target.clone() {
            self.destroy_nexus(&t.node, id).await?;
        }
        if let Some(n) = vol.rebuild_nexus.clone() {
            self.destroy_nexus(&n, id).await?;
        }
        for r in &vol.replicas {
            self.destroy_replica(r).await?;
        }
        self.store.delete(&NexusHealth::key_of(id)).await?;
        self.store.delete(&VolumeSpec::key_of(id)).await?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Destroys a volume's nexus on a node; an offline node's is left to
    /// garbage collection.
    async fn destroy_nexus(&self, node_id: &str, id: &str) -> Result<(), ControlError> {
        let node = match self.node(node_id).await {
            Ok(n) if self.is_online(&n) => n,
            Ok(_) | Err(ControlError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut engine = self.engine(&node)?;
        match engine
            .destroy_nexus(pb::DestroyNexusRequest {
                uuid: id.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(engine_err(&node.id)(s)),
        }
    }

    /// Builds the volume's nexus on `node_id` and publishes it to that
    /// node's host NQN. Idempotent for the same node; another node while
    /// published is `PublishedElsewhere`.
    pub async fn publish_volume(
        &self,
        id: &str,
        node_id: &str,
    ) -> Result<VolumeSpec, ControlError> {
        let _guard = self.lock(id).await?;
        let mut vol = self.volume(id).await?;
        if vol.phase != VolumePhase::Ready {
            return Err(ControlError::FailedPrecondition(format!(
                "volume {id} is not ready ({:?})",
                vol.phase
            )));
        }
        if let Some(t) = vol.target.clone() {
            if t.node != node_id {
                if !t.nqn.is_empty() {
                    return Err(ControlError::PublishedElsewhere {
                        id: id.to_owned(),
                        node: t.node,
                    });
                }
                // A publish there never finished: undo it.
                self.destroy_nexus(&t.node, id).await?;
            }
        }
        let node = self.node(node_id).await?;
        // Intent first: garbage collection spares a nexus only where a
        // volume record places one.
        if vol.target.as_ref().map(|t| t.node.as_str()) != Some(node_id) {
            vol.target = Some(TargetSpec {
                node: node.id.clone(),
                nqn: String::new(),
                address: String::new(),
            });
            self.save(&vol).await?;
        }
        // A temporary rebuild nexus elsewhere goes; one on this node becomes
        // the published nexus (creating it again only opens it to the host).
        if let Some(r) = vol.rebuild_nexus.clone() {
            if r != node_id {
                self.destroy_nexus(&r, id).await?;
            }
            vol.rebuild_nexus = None;
            self.save(&vol).await?;
        }
        let nexus = self
            .ensure_nexus(&mut vol, &node, vec![node.host_nqn.clone()])
            .await?;
        let target = TargetSpec {
            node: node.id.clone(),
            nqn: nexus.nqn,
            address: nexus.address,
        };
        if vol.target.as_ref() != Some(&target) {
            vol.target = Some(target);
            self.save(&vol).await?;
        }
        Ok(vol)
    }

    /// Creates the volume's nexus on `node` if the engine lacks it (after a
    /// publish, an engine restart, or for a rebuild), sharing remote
    /// replicas to that engine. Its children are the replicas healthy in
    /// the volume record and in the nexus health record (when one exists)
    /// whose nodes are online; healthy replicas left out are marked
    /// unhealthy in the record before the nexus exists, since it will not
    /// write to them.
    async fn ensure_nexus(
        &self,
        vol: &mut VolumeSpec,
        node: &NodeRecord,
        allowed_hosts: Vec<String>,
    ) -> Result<pb::Nexus, ControlError> {
        let record = self.nexus_health(&vol.id).await?;
        let nodes = self.nodes().await?;
        let mut children = Vec::new();
        let mut left_out = Vec::new();
        for r in vol.replicas.iter().filter(|r| r.healthy) {
            if record
                .as_ref()
                .is_some_and(|h| !h.healthy.contains(&r.uuid))
            {
                left_out.push(r.uuid.clone());
                continue;
            }
            if r.node == node.id {
                children.push(format!("replica:///{}", r.uuid));
                continue;
            }
            let Some(holder) = nodes.iter().find(|n| n.id == r.node && self.is_online(n)) else {
                left_out.push(r.uuid.clone());
                continue;
            };
            match self.share_to(holder, &r.uuid, &node.engine_host_nqn).await {
                Ok(uri) => children.push(uri),
                Err(e) => {
                    tracing::warn!(volume = %vol.id, replica = %r.uuid, error = %e, "replica cannot be shared; left out of the nexus");
                    left_out.push(r.uuid.clone());
                }
            }
        }
        if children.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "volume {} has no healthy replica that can serve",
                vol.id
            )));
        }
        if !left_out.is_empty() {
            for r in vol
                .replicas
                .iter_mut()
                .filter(|r| left_out.contains(&r.uuid))
            {
                r.healthy = false;
                r.unhealthy_since = now_secs();
            }
            self.save(vol).await?;
        }
        let (children, resync) = after_unclean_end(children, record.as_ref());
        // The instance is named before the nexus exists: from now on only
        // its health records are stored (a nexus elsewhere is fenced off).
        vol.nexus_instance = uuid::Uuid::new_v4().to_string();
        self.save(vol).await?;
        let mut engine = self.engine(node)?;
        let nexus = engine
            .create_nexus(pb::CreateNexusRequest {
                uuid: vol.id.clone(),
                size_bytes: vol.size_bytes,
                children,
                allowed_hosts,
                instance: vol.nexus_instance.clone(),
            })
            .await
            .map_err(engine_err(&node.id))?
            .into_inner();
        if !nexus.instance.is_empty() && nexus.instance != vol.nexus_instance {
            // The engine had the nexus already: that one stays current.
            vol.nexus_instance = nexus.instance.clone();
            self.save(vol).await?;
        }
        for uri in resync {
            add_child(&mut engine, &vol.id, &uri, &node.id).await?;
            tracing::info!(volume = %vol.id, child = %uri, "nexus did not shut down cleanly; child copied from the first one");
        }
        Ok(nexus)
    }

    /// Shares replica `uuid` on `holder` to the engine with host NQN
    /// `host`; returns the child URI a nexus there uses.
    async fn share_to(
        &self,
        holder: &NodeRecord,
        uuid: &str,
        host: &str,
    ) -> Result<String, ControlError> {
        let mut engine = self.engine(holder)?;
        let shared = engine
            .share_replica(pb::ShareReplicaRequest {
                uuid: uuid.to_owned(),
                allowed_hosts: vec![host.to_owned()],
            })
            .await
            .map_err(engine_err(&holder.id))?
            .into_inner();
        Ok(format!(
            "nvmf://{}/{}",
            holder.nvmf_address, shared.share_nqn
        ))
    }

    /// Tears down the volume's nexus. Idempotent; `node_id` empty means
    /// wherever it is published.
    pub async fn unpublish_volume(
        &self,
        id: &str,
        node_id: &str,
    ) -> Result<VolumeSpec, ControlError> {
        let _guard = self.lock(id).await?;
        let mut vol = match self.volume(id).await {
            Ok(v) => v,
            Err(e) => return Err(e),
        };
        let Some(t) = vol.target.clone() else {
            return Ok(vol);
        };
        if !node_id.is_empty() && t.node != node_id {
            // Not published there: nothing to undo on that node.
            return Ok(vol);
        }
        self.destroy_nexus(&t.node, id).await?;
        for r in vol.replicas.iter().filter(|r| r.node != t.node) {
            // An offline node's share goes with garbage collection.
            if let Ok(holder) = self.node(&r.node).await {
                if !self.is_online(&holder) {
                    continue;
                }
                let mut engine = self.engine(&holder)?;
                match engine
                    .unshare_replica(pb::UnshareReplicaRequest {
                        uuid: r.uuid.clone(),
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => return Err(engine_err(&holder.id)(s)),
                }
            }
        }
        vol.target = None;
        self.save(&vol).await?;
        Ok(vol)
    }

    /// Grows a volume: every replica first, then the nexus if published, so
    /// the host sees the new size only when all of it is backed.
    pub async fn resize_volume(
        &self,
        id: &str,
        size_bytes: u64,
    ) -> Result<VolumeSpec, ControlError> {
        let _guard = self.lock(id).await?;
        let mut vol = self.volume(id).await?;
        if size_bytes < vol.size_bytes {
            return Err(ControlError::FailedPrecondition(format!(
                "volume {id} is {} bytes; shrinking to {size_bytes} is not supported",
                vol.size_bytes
            )));
        }
        if size_bytes == vol.size_bytes {
            return Ok(vol);
        }
        for r in &vol.replicas {
            let node = self.node(&r.node).await?;
            let mut engine = self.engine(&node)?;
            engine
                .resize_replica(pb::ResizeReplicaRequest {
                    uuid: r.uuid.clone(),
                    size_bytes,
                })
                .await
                .map_err(engine_err(&node.id))?;
        }
        if let Some(t) = &vol.target {
            let node = self.node(&t.node).await?;
            let mut engine = self.engine(&node)?;
            engine
                .resize_nexus(pb::ResizeNexusRequest {
                    uuid: id.to_owned(),
                    size_bytes,
                })
                .await
                .map_err(engine_err(&node.id))?;
        }
        vol.size_bytes = size_bytes;
        self.save(&vol).await?;
        Ok(vol)
    }

    /// Re-creates the nexuses of volumes published on `node_id` that its
    /// engine no longer has (for example after the engine restarted).
    pub async fn restore_published(&self, node_id: &str) -> Result<usize, ControlError> {
        let node = self.node(node_id).await?;
        let present: HashSet<String> = self
            .list_nexuses_on(&node)
            .await?
            .into_iter()
            .map(|n| n.uuid)
            .collect();
        let mut restored = 0;
        for vol in self.volumes().await? {
            let Some(t) = &vol.target else { continue };
            if t.node != node_id || present.contains(&vol.id) {
                continue;
            }
            let Ok(_guard) = self.try_lock(&vol.id, Holder::Operation) else {
                continue;
            };
            let Ok(Some((mut vol, _))) = self.load::<VolumeSpec>(&vol.id).await else {
                continue;
            };
            self.ensure_nexus(&mut vol, &node, vec![node.host_nqn.clone()])
                .await?;
            restored += 1;
            tracing::info!(volume = %vol.id, node = node_id, "nexus restored");
        }
        Ok(restored)
    }

    /// Free bytes for new volumes on online nodes matching `segment`: the
    /// largest single pool's free space (what one replica can get).
    pub async fn capacity(
        &self,
        segment: &BTreeMap<String, String>,
    ) -> Result<(u64, u64), ControlError> {
        let mut total = 0u64;
        let mut largest = 0u64;
        for node in self.nodes().await? {
            if !self.is_online(&node)
                || !segment.iter().all(|(k, v)| node.topology.get(k) == Some(v))
            {
                continue;
            }
            for p in &node.pools {
                let free = p.capacity_bytes.saturating_sub(p.used_bytes);
                total = total.saturating_add(free);
                largest = largest.max(free);
            }
        }
        Ok((total, largest))
    }
}

/// How a nexus starts over `children` (the local child first, if any),
/// given the last health record: after one that did not shut down cleanly
/// (a crash, an engine stop), the children may differ where writes were in
/// flight. Those were never acknowledged, but every child must answer
/// alike: the nexus starts from the first child alone and the others join
/// it as new children, copied from it (thin-aware). Returns the children to
/// create the nexus with and the ones to add after.
fn after_unclean_end(
    mut children: Vec<String>,
    record: Option<&NexusHealth>,
) -> (Vec<String>, Vec<String>) {
    let unclean = record.is_some_and(|h| !h.clean_shutdown);
    if !unclean || children.len() < 2 {
        return (children, Vec::new());
    }
    if let Some(i) = children.iter().position(|c| c.starts_with("replica:///")) {
        children.swap(0, i);
    }
    let rest = children.split_off(1);
    (children, rest)
}
