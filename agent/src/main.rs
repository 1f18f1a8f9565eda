//! `cairn-agent`: the per-node agent and the cluster's Control API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_agent::control::{Control, ControlConfig};
use cairn_agent::node::{NodeConfig, PoolConfigFile};
use cairn_agent::service::ControlService;
use clap::Parser;

/// Cairn node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This node's id (the Kubernetes node name).
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    /// Address at which other nodes and hosts reach this node.
    #[arg(long, env = "NODE_IP")]
    node_address: Option<String>,
    /// The local engine's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10124")]
    engine: String,
    /// Address for the Control gRPC API.
    #[arg(long, default_value = "0.0.0.0:10125")]
    listen: SocketAddr,
    /// State store: a file path (embedded store) or etcd://host:port,...
    #[arg(long, default_value = "/var/lib/cairn/state.redb")]
    store: String,
    /// YAML file mapping node names to pool devices.
    #[arg(long)]
    pool_config: Option<PathBuf>,
    /// Topology labels, KEY=VALUE (repeatable).
    #[arg(long = "topology", value_parser = parse_label)]
    topology: Vec<(String, String)>,
    /// The node's kernel host NQN (default: /etc/nvme/hostnqn).
    #[arg(long)]
    host_nqn: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// Seconds between reconciler rounds (run by the agent holding the
    /// control lease).
    #[arg(long, default_value_t = 5)]
    reconcile_secs: u64,
    /// Seconds a replica may stay unhealthy before it is replaced.
    #[arg(long, default_value_t = 300)]
    replace_after_secs: u64,
    /// Seconds a node may miss heartbeats before it counts as offline.
    #[arg(long, default_value_t = 15)]
    node_lease_secs: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("cairn-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let store = cairn_agent::open_store(&args.store)
        .await
        .context("opening the state store")?;
    let pools = match &args.pool_config {
        Some(p) => PoolConfigFile::pools_for(p, &args.node_id)?,
        None => vec![],
    };
    let host_nqn = args
        .host_nqn
        .or_else(cairn_agent::system_host_nqn)
        .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4()));
    let control = Control::new(
        store,
        ControlConfig {
            reconcile_period: Duration::from_secs(args.reconcile_secs.max(1)),
            replace_after: Duration::from_secs(args.replace_after_secs),
            node_lease: Duration::from_secs(args.node_lease_secs.max(1)),
            ..ControlConfig::default()
        },
    );
    let node = NodeConfig {
        node_id: args.node_id,
        node_address: args.node_address,
        engine_endpoint: args.engine,
        host_nqn,
        topology: args.topology.into_iter().collect::<BTreeMap<_, _>>(),
        pools,
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
    };
    tracing::info!(listen = %args.listen, node = %node.node_id, "cairn-agent starting");
    let registrar = tokio::spawn(cairn_agent::node::run(node.clone(), control.clone()));
    let reconciler = tokio::spawn(cairn_agent::control::reconcile::run(
        control.clone(),
        node.node_id.clone(),
    ));
    let server = tonic::transport::Server::builder()
        .add_service(ControlService::new(control.clone()).server())
        .serve_with_shutdown(args.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        });
    server.await.context("serving the Control API")?;
    registrar.abort();
    reconciler.abort();
    let _ = control
        .release_lease(cairn_agent::control::lease::CONTROL_LEASE, &node.node_id)
        .await;
    Ok(())
}
