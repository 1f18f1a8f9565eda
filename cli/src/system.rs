//! A whole single-node Cairn system in one process: what the `cairn` binary
//! runs, and what system tests start with a temporary data directory.
//!
//! Engine (NVMe-oF/TCP target and its gRPC API), agent (node registration,
//! control logic, Control API), the embedded state store, a file-backed pool,
//! and the CSI Identity, Controller and Node services on a Unix socket.
//! Everything lives under one data directory; the next start finds the
//! pool, its replicas and the volumes again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_agent::control::{Control, ControlConfig};
use cairn_agent::node::{NodeConfig, PoolConfig};
use cairn_agent::service::ControlService;
use cairn_engine::core::Engine;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::service::EngineService;
use tokio_stream::wrappers::TcpListenerStream;

/// Name of the pool the system keeps in its data directory.
pub const POOL_NAME: &str = "pool0";

/// What to run and where.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Pool file, state store, CSI socket and host NQN live here; it must exist.
    pub data_dir: PathBuf,
    /// Size of the pool file created on first start.
    pub pool_size: u64,
    /// The pool's disk as a URI (a path, `aio://`, `uring://` or
    /// `malloc:///NAME?size_mb=N`; see `cairn_bdev::uri`). Default: a file
    /// `pool0.img` in the data directory.
    pub pool_disk: Option<String>,
    pub nvmf_listen: SocketAddr,
    pub engine_listen: SocketAddr,
    pub agent_listen: SocketAddr,
    /// Default: DATA_DIR/csi.sock.
    pub csi_socket: Option<PathBuf>,
    pub reactors: usize,
    /// Default: the host name.
    pub node_id: Option<String>,
    /// The node's kernel host NQN. Default: /etc/nvme/hostnqn, else one
    /// generated once and kept in the data directory.
    pub host_nqn: Option<String>,
    /// Seconds between node heartbeats.
    pub heartbeat: Duration,
    /// Extra nodes that only hold replicas, each an engine of its own on
    /// the next loopback address (127.0.0.2, ...) with a pool under
    /// DATA_DIR/node-N: a local multi-node cluster for replicated volumes.
    pub replica_nodes: u8,
    /// Advertise CSI v1.12.0's alpha capabilities too (GET_VOLUME,
    /// VOLUME_CONDITION).
    pub csi_alpha: bool,
}

impl SystemConfig {
    /// Defaults on loopback with the standard ports.
    pub fn new(data_dir: PathBuf) -> Self {
        SystemConfig {
            data_dir,
            pool_size: 10 << 30,
            pool_disk: None,
            nvmf_listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            engine_listen: SocketAddr::from(([127, 0, 0, 1], 10124)),
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 10125)),
            csi_socket: None,
            reactors: 1,
            node_id: None,
            host_nqn: None,
            heartbeat: Duration::from_secs(5),
            replica_nodes: 0,
            csi_alpha: false,
        }
    }

    /// Every listener on an ephemeral loopback port (for tests).
    pub fn ephemeral(data_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        SystemConfig {
            nvmf_listen: any,
            engine_listen: any,
            agent_listen: any,
            heartbeat: Duration::from_secs(1),
            ..SystemConfig::new(data_dir)
        }
    }
}

/// A running system.
pub struct System {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    /// Engines of the replica-only nodes.
    extra: Vec<Arc<Engine>>,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    registrars: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _lock: std::fs::File,
    pub data_dir: PathBuf,
    pub node_id: String,
    pub host_nqn: String,
    pub csi_socket: PathBuf,
    pub nvmf_addr: SocketAddr,
    pub agent_endpoint: String,
    pub engine_endpoint: String,
}

/// Takes an exclusive lock on the data directory for the system's life.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("cairn.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock takes a descriptor we own for the call's duration and
    // plain integer flags.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("{} is in use by another cairn process", dir.display());
    }
    Ok(f)
}

/// The node's kernel host NQN: the system's, or one kept in the data dir.
fn host_nqn(dir: &Path) -> anyhow::Result<String> {
    if let Some(nqn) = cairn_agent::system_host_nqn() {
        return Ok(nqn);
    }
    let path = dir.join("hostnqn");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_owned());
        }
    }
    let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4());
    std::fs::write(&path, format!("{nqn}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(nqn)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl System {
    /// Starts everything; returns once every listener is bound.
    pub fn start(cfg: SystemConfig) -> anyhow::Result<System> {
        if !cfg.data_dir.is_dir() {
            bail!("data directory {} does not exist", cfg.data_dir.display());
        }
        let data_dir = cfg
            .data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", cfg.data_dir.display()))?;
        let lock = lock_data_dir(&data_dir)?;
        let node_id = cfg.node_id.clone().unwrap_or_else(hostname);
        let host_nqn = match cfg.host_nqn.clone() {
            Some(n) => n,
            None => host_nqn(&data_dir)?,
        };
        let pool_disk = cfg
            .pool_disk
            .clone()
            .unwrap_or_else(|| data_dir.join("pool0.img").display().to_string());
        let pool_uri = cairn_bdev::uri::DiskUri::parse(&pool_disk).context("--pool-disk")?;
        let csi_socket = cfg
            .csi_socket
            .clone()
            .unwrap_or_else(|| data_dir.join("csi.sock"));

        let engine_cfg = EngineConfig {
            nvmf_listen: cfg.nvmf_listen,
            reactors: cfg.reactors,
            max_io_queues: 8,
            host_nqn: EngineConfig::default_host_nqn(),
            pools: vec![],
            nexus: Default::default(),
            busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
        };
        let engine = daemon::start(
            &engine_cfg,
            daemon::remote_opener(engine_cfg.host_nqn.clone()),
        )
        .context("starting the engine")?;
        let size = match &pool_uri {
            cairn_bdev::uri::DiskUri::Aio(p) if !p.exists() => cfg.pool_size,
            _ => 0,
        };
        if let Err(e) = engine.create_pool_uri(POOL_NAME, &pool_disk, size, 0) {
            engine.shutdown();
            return Err(e).with_context(|| format!("opening the pool on {pool_disk}"));
        }
        let mut extra = Vec::new();
        for k in 1..=cfg.replica_nodes {
            match start_replica_node(&cfg, &data_dir, k) {
                Ok(e) => extra.push(e),
                Err(e) => {
                    engine.shutdown();
                    extra.iter().for_each(|x| x.shutdown());
                    return Err(e);
                }
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-control")
            .enable_all()
            .build()
            .context("starting the control runtime")?;
        let started = rt.block_on(Self::bind_and_spawn(Bind {
            engine: engine.clone(),
            data_dir: data_dir.clone(),
            node_id: node_id.clone(),
            host_nqn: host_nqn.clone(),
            pool_disk,
            engine_listen: cfg.engine_listen,
            agent_listen: cfg.agent_listen,
            csi_socket: csi_socket.clone(),
            heartbeat: cfg.heartbeat,
            extra: extra.clone(),
            csi_alpha: cfg.csi_alpha,
        }));
        let s = match started {
            Ok(s) => s,
            Err(e) => {
                engine.shutdown();
                extra.iter().for_each(|x| x.shutdown());
                return Err(e);
            }
        };
        Ok(System {
            nvmf_addr: engine.target().local_addr(),
            rt,
            engine,
            extra,
            stop: s.stop,
            servers: Some(s.servers),
            registrars: s.registrars,
            _lock: lock,
            data_dir,
            node_id,
            host_nqn,
            csi_socket,
            agent_endpoint: s.agent_endpoint,
            engine_endpoint: s.engine_endpoint,
        })
    }

    async fn bind_and_spawn(a: Bind) -> anyhow::Result<Spawned> {
        let engine_listener = tokio::net::TcpListener::bind(a.engine_listen)
            .await
            .with_context(|| format!("binding the engine API to {}", a.engine_listen))?;
        let agent_listener = tokio::net::TcpListener::bind(a.agent_listen)
            .await
            .with_context(|| format!("binding the agent API to {}", a.agent_listen))?;
        if a.csi_socket.exists() {
            std::fs::remove_file(&a.csi_socket)
                .with_context(|| format!("removing a stale {}", a.csi_socket.display()))?;
        }
        let csi_listener = tokio::net::UnixListener::bind(&a.csi_socket)
            .with_context(|| format!("binding the CSI socket {}", a.csi_socket.display()))?;

        let store = cairn_agent::open_store(&a.data_dir.join("state.redb").display().to_string())
            .await
            .context("opening the state store")?;
        let control = Control::new(store, ControlConfig::default());
        let engine_endpoint = format!("http://{}", engine_listener.local_addr()?);
        let agent_endpoint = format!("http://{}", agent_listener.local_addr()?);
        // Nexuses record their healthy set through this system's agent.
        let recorder = daemon::AgentHealthRecorder::new(
            agent_endpoint.clone(),
            tokio::runtime::Handle::current(),
        );
        a.engine.set_health_recorder(recorder.clone());
        for e in &a.extra {
            e.set_health_recorder(recorder.clone());
        }

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let engine_srv = tonic::transport::Server::builder()
            .add_service(EngineService::new(a.engine.clone()).server())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(engine_listener),
                stopped(stop_rx.clone()),
            );
        let agent_srv = tonic::transport::Server::builder()
            .add_service(ControlService::new(control.clone()).server())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(agent_listener),
                stopped(stop_rx.clone()),
            );
        let agent_client = cairn_proto::agent::v1::control_client::ControlClient::new(
            tonic::transport::Endpoint::from_shared(agent_endpoint.clone())?.connect_lazy(),
        );
        let csi_srv = tonic::transport::Server::builder()
            .add_service(
                cairn_csi::identity::IdentityService::new(Arc::new(
                    cairn_csi::identity::EndpointReadiness {
                        uri: agent_endpoint.clone(),
                        timeout: Duration::from_secs(2),
                    },
                ))
                .server(),
            )
            .add_service(
                cairn_csi::controller::ControllerService::new(agent_client)
                    .with_alpha_capabilities(a.csi_alpha)
                    .server(),
            )
            .add_service(
                cairn_csi::node::NodeService::new(cairn_csi::node::NodeConfig {
                    node_id: a.node_id.clone(),
                    host_nqn: Some(a.host_nqn.clone()),
                    max_volumes_per_node: 0,
                    alpha_capabilities: a.csi_alpha,
                })
                .server(),
            )
            .serve_with_incoming_shutdown(
                cairn_csi::socket::incoming(csi_listener),
                stopped(stop_rx),
            );

        let node = NodeConfig {
            node_id: a.node_id.clone(),
            node_address: None,
            engine_endpoint: engine_endpoint.clone(),
            host_nqn: a.host_nqn.clone(),
            topology: BTreeMap::from([(
                cairn_csi::node::TOPOLOGY_NODE_KEY.to_owned(),
                a.node_id.clone(),
            )]),
            pools: vec![PoolConfig {
                name: POOL_NAME.into(),
                device: a.pool_disk.clone(),
                size: None,
            }],
            heartbeat: a.heartbeat,
        };
        // Register once before returning, so the system is usable at once.
        let mut engine_client = cairn_proto::engine::v1::engine_client::EngineClient::new(
            tonic::transport::Endpoint::from_shared(engine_endpoint.clone())?.connect_lazy(),
        );
        let servers = tokio::spawn(async move {
            tokio::try_join!(engine_srv, agent_srv, csi_srv)
                .map(|_| ())
                .context("a server stopped")
        });
        let record = cairn_agent::node::node_record(&mut engine_client, &node)
            .await
            .context("reading the engine's state")?;
        control
            .register_node(&record)
            .await
            .context("registering the node")?;
        let mut registrars = vec![tokio::spawn(cairn_agent::node::run(node, control.clone()))];
        // The self-healing reconciler, run while this system holds the
        // control lease.
        let (reconciler, holder) = (control.clone(), a.node_id.clone());
        registrars.push(tokio::spawn(async move {
            cairn_agent::control::reconcile::run(reconciler, holder).await;
            Ok(())
        }));
        for (i, e) in a.extra.iter().enumerate() {
            let k = i + 1;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding a replica node's engine API")?;
            let endpoint = format!("http://{}", listener.local_addr()?);
            let srv = tonic::transport::Server::builder()
                .add_service(EngineService::new(e.clone()).server())
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stopped(stop_tx.subscribe()),
                );
            tokio::spawn(srv);
            let id = format!("{}-{k}", a.node_id);
            let node = NodeConfig {
                node_id: id.clone(),
                node_address: None,
                engine_endpoint: endpoint,
                // Replica-only nodes attach no volumes; their host NQN is
                // only an identity.
                host_nqn: format!("nqn.2024-01.dev.cairn:node:{id}"),
                topology: BTreeMap::from([(cairn_csi::node::TOPOLOGY_NODE_KEY.to_owned(), id)]),
                pools: vec![],
                heartbeat: a.heartbeat,
            };
            let mut client = cairn_proto::engine::v1::engine_client::EngineClient::new(
                tonic::transport::Endpoint::from_shared(node.engine_endpoint.clone())?
                    .connect_lazy(),
            );
            let record = cairn_agent::node::node_record(&mut client, &node)
                .await
                .context("reading a replica node's engine")?;
            control
                .register_node(&record)
                .await
                .context("registering a replica node")?;
            registrars.push(tokio::spawn(cairn_agent::node::run(node, control.clone())));
        }
        Ok(Spawned {
            stop: stop_tx,
            servers,
            registrars,
            agent_endpoint,
            engine_endpoint,
        })
    }

    /// The engine (for tests that look inside).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Blocks until SIGINT or SIGTERM, or until a server fails.
    pub fn wait_for_signal(&mut self) -> anyhow::Result<()> {
        let servers = self.servers.as_mut().expect("servers run until stop");
        self.rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Ok(()),
                _ = term.recv() => Ok(()),
                r = servers => match r {
                    Ok(Ok(())) => bail!("the servers stopped"),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                },
            }
        })
    }

    /// Stops every server, unpublishes everything and closes the pool.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.registrars.iter().for_each(|r| r.abort());
        let result = match self.servers.take() {
            Some(s) if !s.is_finished() => self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), s).await })
                .map_err(|_| anyhow::anyhow!("servers did not stop within 10s"))
                .and_then(|r| r.map_err(anyhow::Error::from).and_then(|r| r)),
            _ => Ok(()),
        };
        self.engine.shutdown();
        self.extra.iter().for_each(|e| e.shutdown());
        let _ = std::fs::remove_file(&self.csi_socket);
        result
    }
}

/// Starts replica-only node `k`: an engine on the k-th next loopback
/// address with a pool under DATA_DIR/node-k.
fn start_replica_node(cfg: &SystemConfig, data_dir: &Path, k: u8) -> anyhow::Result<Arc<Engine>> {
    let ip = match cfg.nvmf_listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => {
            let o = v4.octets();
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                o[0],
                o[1],
                o[2],
                o[3].wrapping_add(k),
            ))
        }
        other => other,
    };
    let engine_cfg = EngineConfig {
        nvmf_listen: SocketAddr::new(ip, 0),
        reactors: 1,
        max_io_queues: 8,
        host_nqn: format!("{}-{k}", EngineConfig::default_host_nqn()),
        pools: vec![],
        nexus: Default::default(),
        busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
    };
    let engine = daemon::start(
        &engine_cfg,
        daemon::remote_opener(engine_cfg.host_nqn.clone()),
    )
    .with_context(|| format!("starting replica node {k}"))?;
    let dir = data_dir.join(format!("node-{k}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pool_path = dir.join("pool0.img");
    let size = if pool_path.exists() { 0 } else { cfg.pool_size };
    if let Err(e) = engine.create_pool(POOL_NAME, &pool_path, size, 0) {
        engine.shutdown();
        return Err(e).with_context(|| format!("opening the pool on {}", pool_path.display()));
    }
    Ok(engine)
}

struct Bind {
    engine: Arc<Engine>,
    data_dir: PathBuf,
    node_id: String,
    host_nqn: String,
    pool_disk: String,
    engine_listen: SocketAddr,
    agent_listen: SocketAddr,
    csi_socket: PathBuf,
    heartbeat: Duration,
    extra: Vec<Arc<Engine>>,
    csi_alpha: bool,
}

struct Spawned {
    stop: tokio::sync::watch::Sender<bool>,
    servers: tokio::task::JoinHandle<anyhow::Result<()>>,
    registrars: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    agent_endpoint: String,
    engine_endpoint: String,
}
