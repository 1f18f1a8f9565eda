//! `cairn-engine`: the data-plane daemon of one node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::nexus::NexusConfig;
use cairn_engine::service::EngineService;
use clap::Parser;

/// Cairn storage engine.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address for the engine's gRPC control API.
    #[arg(long, default_value = "127.0.0.1:10124")]
    grpc_listen: SocketAddr,
    /// Address for the NVMe-oF/TCP listener.
    #[arg(long, default_value = "0.0.0.0:8420")]
    nvmf_listen: SocketAddr,
    /// Number of I/O reactor threads.
    #[arg(long, default_value_t = 1)]
    reactors: usize,
    /// Most I/O queues one host may create.
    #[arg(long, default_value_t = 8)]
    max_io_queues: u16,
    /// Host NQN the engine uses toward remote replicas.
    #[arg(long)]
    host_nqn: Option<String>,
    /// Pool disk to import at start: a path, aio:///path or uring:///dev/...
    /// (repeatable).
    #[arg(long = "pool")]
    pools: Vec<PathBuf>,
    /// The node agent's Control API, where nexuses record their healthy
    /// set before acknowledging a degraded write. Empty: not recorded
    /// (a single engine without a cluster).
    #[arg(long, default_value = "http://127.0.0.1:10125")]
    agent_endpoint: String,
    /// Milliseconds a remote nexus child may take to answer an I/O before
    /// it is faulted.
    #[arg(long, default_value_t = 30_000)]
    child_io_timeout_ms: u64,
    /// Rebuild bandwidth limit per rebuilding child, MiB/s (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rebuild_rate_mib: u64,
    /// Microseconds a reactor keeps polling after network activity before
    /// it sleeps (0: sleep at once). Polling spares a host at low queue
    /// depth the wake-up of a sleeping thread on every I/O.
    #[arg(long, default_value_t = cairn_engine::target::DEFAULT_BUSY_POLL.as_micros() as u64)]
    busy_poll_us: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("cairn-engine: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = EngineConfig {
        nvmf_listen: args.nvmf_listen,
        reactors: args.reactors,
        max_io_queues: args.max_io_queues,
        host_nqn: args.host_nqn.unwrap_or_else(EngineConfig::default_host_nqn),
        pools: args.pools,
        busy_poll: Duration::from_micros(args.busy_poll_us),
        nexus: NexusConfig {
            io_timeout: Duration::from_millis(args.child_io_timeout_ms.max(1)),
            rebuild_rate: args.rebuild_rate_mib << 20,
            ..NexusConfig::default()
        },
    };
    // The control runtime: small, and never on the I/O path.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("engine-grpc")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let engine = daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone()))
        .context("starting the engine")?;
    if args.agent_endpoint.is_empty() {
        tracing::warn!("no agent endpoint: nexus health is not recorded durably");
    } else {
        engine.set_health_recorder(daemon::AgentHealthRecorder::new(
            args.agent_endpoint.clone(),
            rt.handle().clone(),
        ));
    }
    tracing::info!(grpc = %args.grpc_listen, nvmf = %engine.target().local_addr(), "cairn-engine serving");
    let served = rt.block_on(
        tonic::transport::Server::builder()
            .add_service(EngineService::new(engine.clone()).server())
            .serve_with_shutdown(args.grpc_listen, async {
                let _ = tokio::signal::ctrl_c().await;
            }),
    );
    engine.shutdown();
    served.context("serving the engine API")
}
