//! `cairn`: a whole single-node Cairn system in one process.
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
use cairn_cli::table::parse_size;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::service::EngineService;
use clap::Parser;
use tokio_stream::wrappers::UnixListenerStream;

/// Run a single-node Cairn system.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where the pool file, the state store and the CSI socket live
    /// (default: $XDG_DATA_HOME/cairn or ~/.local/share/cairn, created if
    /// missing; a directory given here must exist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Size of the pool file created on first start.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pool_size: u64,
    /// NVMe-oF/TCP listener.
    #[arg(long, default_value = "127.0.0.1:8420")]
    nvmf_listen: SocketAddr,
    /// Engine gRPC API.
    #[arg(long, default_value = "127.0.0.1:10124")]
    engine_listen: SocketAddr,
    /// Agent Control API (what cairnctl talks to).
    #[arg(long, default_value = "127.0.0.1:10125")]
    agent_listen: SocketAddr,
    /// CSI socket (default: DATA_DIR/csi.sock).
    #[arg(long)]
    csi_socket: Option<PathBuf>,
    /// I/O reactor threads.
    #[arg(long, default_value_t = 1)]
    reactors: usize,
    /// This node's id (default: the host name).
    #[arg(long)]
    node_id: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("cairn: {}", cairn_cli::one_line(&e));
        std::process::exit(1);
    }
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; pass --data-dir")?)
            .join(".local/share"),
    };
    let dir = base.join("cairn");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Takes an exclusive lock on the data directory for this process's life.
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

fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => {
            if !d.is_dir() {
                bail!("data directory {} does not exist", d.display());
            }
            d
        }
        None => default_data_dir()?,
    };
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let node_id = args.node_id.unwrap_or_else(hostname);
    let host_nqn = host_nqn(&data_dir)?;
    let pool_path = data_dir.join("pool0.img");

    let engine_cfg = EngineConfig {
        nvmf_listen: args.nvmf_listen,
        reactors: args.reactors,
        max_io_queues: 8,
        host_nqn: EngineConfig::default_host_nqn(),
        pools: vec![],
    };
    let engine =
        daemon::start(&engine_cfg, daemon::remote_opener()).context("starting the engine")?;
    let size = if pool_path.exists() {
        0
    } else {
        args.pool_size
    };
    engine
        .create_pool("pool0", &pool_path, size, 0)
        .with_context(|| format!("opening the pool on {}", pool_path.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cairn-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let result = rt.block_on(serve(ServeArgs {
        engine: engine.clone(),
        data_dir: data_dir.clone(),
        node_id,
        host_nqn,
        pool_path,
        engine_listen: args.engine_listen,
        agent_listen: args.agent_listen,
        csi_socket: args.csi_socket.unwrap_or_else(|| data_dir.join("csi.sock")),
    }));
    engine.shutdown();
    result
}

struct ServeArgs {
    engine: Arc<cairn_engine::core::Engine>,
    data_dir: PathBuf,
    node_id: String,
    host_nqn: String,
    pool_path: PathBuf,
    engine_listen: SocketAddr,
    agent_listen: SocketAddr,
    csi_socket: PathBuf,
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let engine_srv = tonic::transport::Server::builder()
        .add_service(EngineService::new(a.engine.clone()).server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(engine_listener),
            stopped(stop_rx.clone()),
        );
    let agent_srv = tonic::transport::Server::builder()
        .add_service(ControlService::new(control.clone()).server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(agent_listener),
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
        .add_service(cairn_csi::controller::ControllerService::new(agent_client).server())
        .add_service(
            cairn_csi::node::NodeService::new(cairn_csi::node::NodeConfig {
                node_id: a.node_id.clone(),
                host_nqn: Some(a.host_nqn.clone()),
                max_volumes_per_node: 0,
            })
            .server(),
        )
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(csi_listener),
            stopped(stop_rx.clone()),
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
            name: "pool0".into(),
            device: a.pool_path.display().to_string(),
            size: None,
        }],
        heartbeat: Duration::from_secs(5),
    };
    let registrar = tokio::spawn(cairn_agent::node::run(node, control));

    if let Err(e) = cairn_csi::node::preflight::check_host() {
        tracing::warn!(error = %e, "this host cannot attach volumes with the kernel initiator; NodeStageVolume will fail");
    }
    println!("cairn is running (node {})", a.node_id);
    println!("  CSI endpoint:     unix://{}", a.csi_socket.display());
    println!("  NVMe-oF listener: {}", a.engine.target().local_addr());
    println!("  agent API:        {agent_endpoint}  (cairnctl --agent {agent_endpoint})");
    println!("  engine API:       {engine_endpoint}");
    println!("  data directory:   {}", a.data_dir.display());

    let servers = async { tokio::try_join!(engine_srv, agent_srv, csi_srv) };
    tokio::pin!(servers);
    let result = tokio::select! {
        r = &mut servers => r.map(|_| ()).context("a server stopped"),
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            servers.await.map(|_| ()).context("stopping the servers")
        }
    };
    registrar.abort();
    let _ = std::fs::remove_file(&a.csi_socket);
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
