//! The engine's state: pools, shared replicas and nexuses, and the target
//! that exports them. Control operations are synchronous and called from
//! the gRPC runtime's blocking pool; the data path never waits on them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_bdev::uri::DiskUri;
use cairn_bdev::BlockDevice;
use cairn_nvmf::{replica_nqn, volume_nqn, volume_serial};
use cairn_pool::{Pool, PoolCreate, PoolError, Replica, ReplicaCreate};
use uuid::Uuid;

use crate::nexus::{rebuild, HealthRecorder, Nexus, NexusConfig, NexusError};
use crate::target::{NamespaceConfig, SubsystemConfig, Target, TargetError};

/// Why an engine operation failed. Mapped to gRPC codes in one place
/// (`crate::service`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Nexus(#[from] NexusError),
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{what} already exists with other parameters")]
    AlreadyExists { what: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} is in use: {reason}")]
    Busy { what: String, reason: String },
    #[error("{disk} holds data that is not a Cairn pool; refusing to overwrite it")]
    NotAPool { disk: String },
    #[error(transparent)]
    DiskUri(#[from] cairn_bdev::uri::UriError),
    #[error("disk {disk}: {source}")]
    Disk {
        disk: String,
        #[source]
        source: cairn_bdev::BdevError,
    },
    #[error("cannot reach child {uri}: {reason}")]
    ChildUnreachable { uri: String, reason: String },
    #[error("{op} failed: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// A nexus and what it was made from.
pub struct NexusEntry {
    pub uuid: Uuid,
    pub size_bytes: u64,
    pub nexus: Arc<Nexus>,
    pub nqn: String,
    pub allowed_hosts: Vec<String>,
}

/// I/O queues asked of a remote child's target: one per nexus channel (one
/// per host I/O queue) plus one for a rebuild; the target may grant fewer.
const REMOTE_CHILD_QUEUES: u32 = 16;

/// Opens a remote child given as `nvmf://host:port/nqn`.
pub type RemoteOpener =
    dyn Fn(&str, &str, u32) -> Result<Arc<dyn BlockDevice>, String> + Send + Sync;

/// The engine.
pub struct Engine {
    target: Target,
    host_nqn: String,
    pools: Mutex<BTreeMap<String, Arc<Pool>>>,
    /// Replica uuid -> allowed hosts, for shared replicas.
    shares: Mutex<BTreeMap<Uuid, Vec<String>>>,
    nexuses: Mutex<BTreeMap<Uuid, NexusEntry>>,
    remote: Box<RemoteOpener>,
    nexus_cfg: NexusConfig,
    health: std::sync::OnceLock<Arc<dyn HealthRecorder>>,
}

/// Whether the first bytes of a disk are all zeros (a blank disk or new file).
fn is_blank(path: &Path) -> Result<bool, EngineError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|source| EngineError::Io {
        op: format!("open {}", path.display()),
        source,
    })?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => {
                return Err(EngineError::Io {
                    op: format!("read {}", path.display()),
                    source,
                })
            }
        }
    }
    Ok(buf[..n].iter().all(|&b| b == 0))
}

fn resolve(uri: &DiskUri) -> Result<PathBuf, EngineError> {
    uri.resolve().map_err(|source| EngineError::Disk {
        disk: uri.to_string(),
        source,
    })
}

fn parse_uuid(kind: &'static str, s: &str) -> Result<Uuid, EngineError> {
    Uuid::parse_str(s)
        .map_err(|_| EngineError::InvalidArgument(format!("{kind} id {s:?} is not a UUID")))
}

impl Engine {
    /// An engine exporting through `target`, connecting to remote children
    /// with `remote` (host:port, nqn, own host NQN).
    pub fn new(target: Target, host_nqn: String, remote: Box<RemoteOpener>) -> Self {
        Engine {
            target,
            host_nqn,
            pools: Mutex::default(),
            shares: Mutex::default(),
            nexuses: Mutex::default(),
            remote,
            nexus_cfg: NexusConfig::default(),
            health: std::sync::OnceLock::new(),
        }
    }

    /// Sets the tunables of nexuses created from now on.
    pub fn with_nexus_config(mut self, cfg: NexusConfig) -> Self {
        self.nexus_cfg = cfg;
        self
    }

    /// Has every nexus created from now on record its healthy set through
    /// `recorder`. Set once; returns false if one was set already.
    pub fn set_health_recorder(&self, recorder: Arc<dyn HealthRecorder>) -> bool {
        self.health.set(recorder).is_ok()
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn host_nqn(&self) -> &str {
        &self.host_nqn
    }

    // ---- pools ---------------------------------------------------------

    /// [`Engine::create_pool`] on a disk named by URI (a path, `aio://`,
    /// `uring://` or `malloc://`; see [`cairn_bdev::uri`]). A `malloc://`
    /// disk is created at the size it names; `create_file_size` is for
    /// missing files only.
    pub fn create_pool_uri(
        &self,
        name: &str,
        disk: &str,
        create_file_size: u64,
        cluster_size: u32,
    ) -> Result<Arc<Pool>, EngineError> {
        let uri = DiskUri::parse(disk)?;
        let path = resolve(&uri)?;
        let size = if uri.is_malloc() { 0 } else { create_file_size };
        self.create_pool(name, &path, size, cluster_size)
    }

    /// [`Engine::import_pool`] on a disk named by URI.
    pub fn import_pool_uri(&self, disk: &str) -> Result<Arc<Pool>, EngineError> {
        let uri = DiskUri::parse(disk)?;
        self.import_pool(&resolve(&uri)?)
    }

    /// Creates a pool on `disk`, or imports the pool of that name already
    /// there. A disk holding anything else is refused.
    pub fn create_pool(
        &self,
        name: &str,
        disk: &Path,
        create_file_size: u64,
        cluster_size: u32,
    ) -> Result<Arc<Pool>, EngineError> {
        if name.is_empty() {
            return Err(EngineError::InvalidArgument("pool name is empty".into()));
        }
        if let Some(p) = self.pools.lock().expect("poisoned").get(name) {
            if p.path() == disk {
                return Ok(p.clone());
            }
            return Err(EngineError::AlreadyExists {
                what: format!("pool {name} (on {})", p.path().display()),
            });
        }
        if !disk.exists() {
            if create_file_size == 0 {
                return Err(EngineError::NotFound {
                    kind: "disk",
                    id: disk.display().to_string(),
                });
            }
            let f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(disk)
                .and_then(|f| f.set_len(create_file_size))
                .map_err(|source| EngineError::Io {
                    op: format!("create {}", disk.display()),
                    source,
                });
            f?;
        }
        let pool = match Pool::import(disk) {
            Ok(pool) if pool.name() == name => pool,
            Ok(pool) => {
                let other = pool.name().to_owned();
                pool.export()?;
                return Err(EngineError::AlreadyExists {
                    what: format!("a pool named {other} on {}", disk.display()),
                });
            }
            Err(PoolError::BadMagic { .. }) if is_blank(disk)? => Pool::create(
                disk,
                PoolCreate {
                    name: name.to_owned(),
                    uuid: Uuid::new_v4(),
                    cluster_size: if cluster_size == 0 {
                        cairn_pool::DEFAULT_CLUSTER_SIZE
                    } else {
                        cluster_size
                    },
                },
            )?,
            Err(PoolError::BadMagic { .. }) => {
                return Err(EngineError::NotAPool {
                    disk: disk.display().to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        self.pools
            .lock()
            .expect("poisoned")
            .insert(name.to_owned(), pool.clone());
        tracing::info!(pool = name, disk = %disk.display(), "pool imported");
        Ok(pool)
    }

    /// Imports the pool on `disk` under the name it records.
    pub fn import_pool(&self, disk: &Path) -> Result<Arc<Pool>, EngineError> {
        let mut pools = self.pools.lock().expect("poisoned");
        if let Some(p) = pools.values().find(|p| p.path() == disk) {
            return Ok(p.clone());
        }
        let pool = Pool::import(disk)?;
        if pools.contains_key(pool.name()) {
            let name = pool.name().to_owned();
            pool.export()?;
            return Err(EngineError::AlreadyExists {
                what: format!("pool {name}"),
            });
        }
        pools.insert(pool.name().to_owned(), pool.clone());
        Ok(pool)
    }

    /// An imported pool by name; unknown is NotFound.
    pub fn pool(&self, name: &str) -> Result<Arc<Pool>, EngineError> {
        self.pools
            .lock()
            .expect("poisoned")
            .get(name)
            .cloned()
            .ok_or(EngineError::NotFound {
                kind: "pool",
                id: name.to_owned(),
            })
    }

    fn check_pool_idle(&self, pool: &Pool) -> Result<(), EngineError> {
        let shares = self.shares.lock().expect("poisoned");
        let nexuses = self.nexuses.lock().expect("poisoned");
        for r in pool.replicas() {
            if shares.contains_key(&r.uuid())
                || nexuses
                    .values()
                    .any(|n| n.nexus.has_child(&local_uri(&r.uuid())))
            {
                return Err(EngineError::Busy {
                    what: format!("pool {}", pool.name()),
                    reason: format!("replica {} is shared or in a nexus", r.uuid()),
                });
            }
        }
        Ok(())
    }

    /// Exports (closes) a pool; its data stays on disk.
    pub fn export_pool(&self, name: &str) -> Result<(), EngineError> {
        let pool = self.pool(name)?;
        self.check_pool_idle(&pool)?;
        pool.export()?;
        self.pools.lock().expect("poisoned").remove(name);
        Ok(())
    }

    /// Destroys a pool that holds no replicas.
    pub fn destroy_pool(&self, name: &str) -> Result<(), EngineError> {
        let pool = match self.pool(name) {
            Ok(p) => p,
            Err(EngineError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.check_pool_idle(&pool)?;
        pool.destroy()?;
        self.pools.lock().expect("poisoned").remove(name);
        Ok(())
    }

    /// Every imported pool.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    // ---- replicas ------------------------------------------------------

    /// Finds a replica in any pool.
    pub fn replica(&self, uuid: &Uuid) -> Result<(Arc<Pool>, Arc<Replica>), EngineError> {
        for p in self.pools() {
            if let Ok(r) = p.replica(*uuid) {
                return Ok((p, r));
            }
        }
        Err(EngineError::NotFound {
            kind: "replica",
            id: uuid.to_string(),
        })
    }

    /// Creates a replica (idempotent for equal parameters).
    pub fn create_replica(
        &self,
        pool: &str,
        uuid: &str,
        name: &str,
        size: u64,
        thin: bool,
    ) -> Result<Arc<Replica>, EngineError> {
        let uuid = parse_uuid("replica", uuid)?;
        if let Ok((p, r)) = self.replica(&uuid) {
            if p.name() != pool || r.size() != size || r.is_thin() != thin {
                return Err(EngineError::AlreadyExists {
                    what: format!("replica {uuid}"),
                });
            }
            return Ok(r);
        }
        Ok(self.pool(pool)?.create_replica(ReplicaCreate {
            uuid,
            name: name.to_owned(),
            size,
            thin,
        })?)
    }

    /// Destroys a replica that is neither shared nor in a nexus.
    pub fn destroy_replica(&self, uuid: &str) -> Result<(), EngineError> {
        let uuid = parse_uuid("replica", uuid)?;
        let (pool, _) = self.replica(&uuid)?;
        if self.shares.lock().expect("poisoned").contains_key(&uuid) {
            self.unshare_replica(&uuid.to_string())?;
        }
        if let Some(n) = self
            .nexuses
            .lock()
            .expect("poisoned")
            .values()
            .find(|n| n.nexus.has_child(&local_uri(&uuid)))
        {
            return Err(EngineError::Busy {
                what: format!("replica {uuid}"),
                reason: format!("it is a child of nexus {}", n.uuid),
            });
        }
        pool.destroy_replica(uuid)?;
        Ok(())
    }

    /// Grows a replica.
    pub fn resize_replica(&self, uuid: &str, size: u64) -> Result<Arc<Replica>, EngineError> {
        let uuid = parse_uuid("replica", uuid)?;
        let (pool, _) = self.replica(&uuid)?;
        pool.resize_replica(uuid, size)?;
        self.target.notice_resized();
        Ok(pool.replica(uuid)?)
    }

    /// Exports a replica as its own subsystem to `allowed` hosts (any host
    /// when empty); sharing again updates the allow-list.
    pub fn share_replica(
        &self,
        uuid: &str,
        allowed: Vec<String>,
    ) -> Result<Arc<Replica>, EngineError> {
        let uuid = parse_uuid("replica", uuid)?;
        let (_, replica) = self.replica(&uuid)?;
        let nqn = replica_nqn(&uuid);
        let mut shares = self.shares.lock().expect("poisoned");
        let hosts = (!allowed.is_empty()).then(|| allowed.clone());
        if shares.contains_key(&uuid) {
            self.target.set_allowed_hosts(&nqn, hosts)?;
        } else {
            self.target.add_subsystem(SubsystemConfig {
                nqn,
                serial: volume_serial(&uuid),
                model: None,
                namespaces: vec![NamespaceConfig {
                    nsid: 1,
                    uuid,
                    device: replica.clone(),
                }],
                allowed_hosts: hosts,
            })?;
        }
        shares.insert(uuid, allowed);
        Ok(replica)
    }

    /// Stops exporting a replica; idempotent.
    pub fn unshare_replica(&self, uuid: &str) -> Result<(), EngineError> {
        let uuid = parse_uuid("replica", uuid)?;
        if self
            .shares
            .lock()
            .expect("poisoned")
            .remove(&uuid)
            .is_some()
        {
            match self.target.remove_subsystem(&replica_nqn(&uuid)) {
                Ok(()) | Err(TargetError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The allow-list of a shared replica, if shared.
    pub fn share_of(&self, uuid: &Uuid) -> Option<Vec<String>> {
        self.shares.lock().expect("poisoned").get(uuid).cloned()
    }

    // ---- nexuses -------------------------------------------------------

    fn open_child(&self, uri: &str) -> Result<Arc<dyn BlockDevice>, EngineError> {
        let unreachable = |reason: String| EngineError::ChildUnreachable {
            uri: uri.to_owned(),
            reason,
        };
        if let Some(id) = uri.strip_prefix("replica:///") {
            let uuid = parse_uuid("replica", id)?;
            let (_, r) = self.replica(&uuid)?;
            return Ok(r);
        }
        if let Some(rest) = uri.strip_prefix("nvmf://") {
            let (addr, nqn) = rest.split_once('/').ok_or_else(|| {
                EngineError::InvalidArgument(format!("child {uri:?} lacks an NQN"))
            })?;
            return (self.remote)(addr, nqn, REMOTE_CHILD_QUEUES).map_err(unreachable);
        }
        Err(EngineError::InvalidArgument(format!(
            "child {uri:?} is neither replica:///UUID nor nvmf://HOST:PORT/NQN"
        )))
    }

    /// Creates a nexus and publishes it; idempotent for the same volume.
    pub fn create_nexus(
        &self,
        uuid: &str,
        size_bytes: u64,
        children: &[String],
        allowed: Vec<String>,
    ) -> Result<(), EngineError> {
        self.create_nexus_as(uuid, "", size_bytes, children, allowed)
    }

    /// [`Engine::create_nexus`] as nexus instance `instance` (empty: a new
    /// random one). A nexus that exists keeps its own instance.
    pub fn create_nexus_as(
        &self,
        uuid: &str,
        instance: &str,
        size_bytes: u64,
        children: &[String],
        allowed: Vec<String>,
    ) -> Result<(), EngineError> {
        let uuid = parse_uuid("nexus", uuid)?;
        let instance = match instance {
            "" => Uuid::new_v4(),
            i => parse_uuid("nexus instance", i)?,
        };
        if let Some(n) = self.nexuses.lock().expect("poisoned").get(&uuid) {
            if n.size_bytes != size_bytes {
                return Err(EngineError::AlreadyExists {
                    what: format!("nexus {uuid}"),
                });
            }
            if n.allowed_hosts != allowed {
                let hosts = (!allowed.is_empty()).then(|| allowed.clone());
                self.target.set_allowed_hosts(&n.nqn, hosts)?;
            }
            return Ok(());
        }
        let mut devices = Vec::with_capacity(children.len());
        for uri in children {
            devices.push((uri.clone(), self.open_child(uri)?));
        }
        let nexus = Arc::new(Nexus::with_instance(
            uuid,
            instance,
            size_bytes,
            devices,
            self.nexus_cfg.clone(),
            self.health.get().cloned(),
        )?);
        let nqn = volume_nqn(&uuid);
        self.target.add_subsystem(SubsystemConfig {
            nqn: nqn.clone(),
            serial: volume_serial(&uuid),
            model: None,
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid,
                device: nexus.clone(),
            }],
            allowed_hosts: (!allowed.is_empty()).then(|| allowed.clone()),
        })?;
        tracing::info!(nexus = %uuid, children = children.len(), "nexus published");
        self.nexuses.lock().expect("poisoned").insert(
            uuid,
            NexusEntry {
                uuid,
                size_bytes,
                nexus,
                nqn,
                allowed_hosts: allowed,
            },
        );
        Ok(())
    }

    /// Grows a nexus online (after its children grew).
    pub fn resize_nexus(&self, uuid: &str, size_bytes: u64) -> Result<(), EngineError> {
        let uuid = parse_uuid("nexus", uuid)?;
        let mut nexuses = self.nexuses.lock().expect("poisoned");
        let entry = nexuses.get_mut(&uuid).ok_or(EngineError::NotFound {
            kind: "nexus",
            id: uuid.to_string(),
        })?;
        entry.nexus.resize(size_bytes)?;
        entry.size_bytes = size_bytes;
        drop(nexuses);
        self.target.notice_resized();
        tracing::info!(nexus = %uuid, size_bytes, "nexus resized");
        Ok(())
    }

    /// Unpublishes and drops a nexus; unknown is NotFound.
    pub fn destroy_nexus(&self, uuid: &str) -> Result<(), EngineError> {
        let uuid = parse_uuid("nexus", uuid)?;
        let entry =
            self.nexuses
                .lock()
                .expect("poisoned")
                .remove(&uuid)
                .ok_or(EngineError::NotFound {
                    kind: "nexus",
                    id: uuid.to_string(),
                })?;
        match self.target.remove_subsystem(&entry.nqn) {
            Ok(()) | Err(TargetError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        entry.nexus.record_clean_shutdown();
        tracing::info!(nexus = %uuid, "nexus destroyed");
        Ok(())
    }

    /// Visits every nexus.
    pub fn nexuses<T>(&self, f: impl Fn(&NexusEntry) -> T) -> Vec<T> {
        self.nexuses
            .lock()
            .expect("poisoned")
            .values()
            .map(f)
            .collect()
    }

    fn nexus(&self, uuid: &str) -> Result<Arc<Nexus>, EngineError> {
        let uuid = parse_uuid("nexus", uuid)?;
        self.nexuses
            .lock()
            .expect("poisoned")
            .get(&uuid)
            .map(|n| n.nexus.clone())
            .ok_or(EngineError::NotFound {
                kind: "nexus",
                id: uuid.to_string(),
            })
    }

    /// Runs a rebuild of `uri` in `nexus` on a reactor.
    fn spawn_rebuild(&self, nexus: Arc<Nexus>, uri: &str) -> Result<(), EngineError> {
        let reactors = self.target.reactors();
        let uri = uri.to_owned();
        reactors
            .spawn(reactors.next_index(), move || async move {
                // The outcome is logged and visible in the child's state.
                let _ = rebuild::run(nexus, uri).await;
            })
            .map_err(|e| EngineError::Io {
                op: "starting a rebuild".into(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// Adds a child to a nexus and rebuilds it whole in the background.
    /// Adding a child that is already there succeeds.
    pub fn add_child(&self, uuid: &str, uri: &str) -> Result<(), EngineError> {
        let nexus = self.nexus(uuid)?;
        if nexus.has_child(uri) {
            return Ok(());
        }
        let device = self.open_child(uri)?;
        nexus.add_child(uri, device)?;
        self.spawn_rebuild(nexus, uri)
    }

    /// Removes a child from a nexus; removing one that is not there succeeds.
    pub fn remove_child(&self, uuid: &str, uri: &str) -> Result<(), EngineError> {
        let nexus = self.nexus(uuid)?;
        match nexus.remove_child(uri) {
            Ok(()) | Err(NexusError::NoSuchChild { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Faults a child of a nexus.
    pub fn fault_child(&self, uuid: &str, uri: &str) -> Result<(), EngineError> {
        Ok(self.nexus(uuid)?.fault_child(uri)?)
    }

    /// Brings a faulted child back (reconnecting a remote one) and resyncs
    /// what it missed in the background.
    pub fn online_child(&self, uuid: &str, uri: &str) -> Result<(), EngineError> {
        let nexus = self.nexus(uuid)?;
        let Some(child) = nexus.children().iter().find(|c| c.uri() == uri).cloned() else {
            return Err(NexusError::NoSuchChild { uri: uri.into() }.into());
        };
        if child.state() != crate::nexus::ChildState::Faulted {
            return Ok(());
        }
        let device = self.open_child(uri)?;
        if nexus.online_child(uri, Some(device))? {
            self.spawn_rebuild(nexus, uri)?;
        }
        Ok(())
    }

    /// Stops serving: unpublishes everything and closes the pools cleanly.
    pub fn shutdown(&self) {
        self.target.shutdown();
        self.nexuses.lock().expect("poisoned").clear();
        self.shares.lock().expect("poisoned").clear();
        for (name, pool) in std::mem::take(&mut *self.pools.lock().expect("poisoned")) {
            if let Err(e) = pool.export() {
                tracing::warn!(pool = %name, error = %e, "pool export at shutdown failed");
            }
        }
    }

    /// The paths of imported pools.
    pub fn pool_paths(&self) -> Vec<PathBuf> {
        self.pools().iter().map(|p| p.path().to_owned()).collect()
    }
}

fn local_uri(uuid: &Uuid) -> String {
    format!("replica:///{uuid}")
}
