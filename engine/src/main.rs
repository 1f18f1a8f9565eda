//! `cairn-engine`: the data-plane daemon of one node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cairn_engine::daemon::{self, EngineConfig};
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
    /// Pool disk to import at start (repeatable).
    #[arg(long = "pool")]
    pools: Vec<PathBuf>,
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
    };
    let engine = daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone()))
        .context("starting the engine")?;
    // The control runtime: small, and never on the I/O path.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("engine-grpc")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
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
