//! `cairn`: a whole single-node Cairn system in one command (see
//! [`cairn_cli::system`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cairn_cli::system::{System, SystemConfig};
use cairn_cli::table::parse_size;
use clap::Parser;

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
    /// The pool's disk: a path or aio:///path (file or block device),
    /// uring:///dev/... (a block device with O_DIRECT), or
    /// malloc:///NAME?size_mb=N (a RAM disk, gone when cairn exits).
    /// Default: DATA_DIR/pool0.img, created with --pool-size.
    #[arg(long)]
    pool_disk: Option<String>,
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
    /// The node's kernel host NQN (default: /etc/nvme/hostnqn, else one
    /// generated and kept in the data directory).
    #[arg(long)]
    host_nqn: Option<String>,
    /// Also run this many replica-only nodes on the next loopback
    /// addresses (127.0.0.2, ...), for volumes with several replicas.
    #[arg(long, default_value_t = 0)]
    replica_nodes: u8,
    /// Also advertise CSI v1.12.0's alpha capabilities (controller
    /// GET_VOLUME and VOLUME_CONDITION, node VOLUME_CONDITION).
    #[arg(long)]
    csi_alpha_capabilities: bool,
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

fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let mut sys = System::start(SystemConfig {
        pool_size: args.pool_size,
        pool_disk: args.pool_disk,
        nvmf_listen: args.nvmf_listen,
        engine_listen: args.engine_listen,
        agent_listen: args.agent_listen,
        csi_socket: args.csi_socket,
        reactors: args.reactors,
        node_id: args.node_id,
        host_nqn: args.host_nqn,
        replica_nodes: args.replica_nodes,
        csi_alpha: args.csi_alpha_capabilities,
        ..SystemConfig::new(data_dir)
    })?;
    if let Err(e) = cairn_csi::node::preflight::check_host() {
        tracing::warn!(error = %e, "this host cannot attach volumes with the kernel initiator; NodeStageVolume will fail here");
    }
    println!("cairn is running (node {})", sys.node_id);
    println!("  CSI endpoint:     unix://{}", sys.csi_socket.display());
    println!("  NVMe-oF listener: {}", sys.nvmf_addr);
    println!(
        "  agent API:        {0}  (cairnctl --agent {0})",
        sys.agent_endpoint
    );
    println!("  engine API:       {}", sys.engine_endpoint);
    println!("  host NQN:         {}", sys.host_nqn);
    println!("  data directory:   {}", sys.data_dir.display());
    let waited = sys.wait_for_signal();
    tracing::info!("shutting down");
    let stopped = sys.stop();
    waited.and(stopped)
}
