//! `cairn-csi`: serves Cairn's CSI Identity and Node services (and, in
//! controller mode, the Controller service) on a Unix socket.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use cairn_csi::{
    controller::ControllerService,
    identity::{AlwaysReady, EndpointReadiness, IdentityService, Readiness},
    node::{host::Host, preflight, NodeConfig, NodeService},
};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Identity + Controller (one per cluster).
    Controller,
    /// Identity + Node (one per node).
    Node,
    /// Everything in one process (single-node setups and tests).
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "cairn-csi",
    version,
    about = "Cairn CSI driver (csi.cairn.dev)"
)]
struct Args {
    /// Which services to serve.
    #[arg(long, value_enum, env = "CAIRN_CSI_MODE")]
    mode: Mode,
    /// CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id (the Kubernetes node name). Required in node mode.
    #[arg(long, env = "CAIRN_NODE_ID")]
    node_id: Option<String>,
    /// Agent gRPC endpoint (Controller service and readiness).
    #[arg(long, env = "CAIRN_AGENT", default_value = "http://127.0.0.1:10125")]
    agent: String,
    /// Host NQN for `nvme connect --hostnqn` (default: /etc/nvme/hostnqn).
    #[arg(long, env = "CAIRN_HOST_NQN")]
    host_nqn: Option<String>,
    /// Volumes the CO may publish on this node (0 = unlimited).
    #[arg(long, default_value_t = 256)]
    max_volumes_per_node: i64,
    /// Seconds to wait for a connected volume's block device.
    #[arg(long, default_value_t = 30)]
    device_timeout_secs: u64,
    /// Also advertise CSI v1.12.0's alpha capabilities (controller
    /// GET_VOLUME and VOLUME_CONDITION, node VOLUME_CONDITION). Off by
    /// default: the Kubernetes sidecars do not use them.
    #[arg(long, env = "CAIRN_CSI_ALPHA")]
    alpha_capabilities: bool,
    /// Skip the start-up check for nvme-cli and the nvme-tcp module (only
    /// for tests that never attach a volume).
    #[arg(long)]
    skip_host_check: bool,
}

fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    match endpoint.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => bail!("endpoint {endpoint:?} must be unix:///absolute/path"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let node_mode = matches!(args.mode, Mode::Node | Mode::All);

    if node_mode && !args.skip_host_check {
        if let Err(e) = preflight::check_host() {
            // One line, exactly what is missing.
            eprintln!("cairn-csi: {e}");
            std::process::exit(2);
        }
    }

    let readiness: Arc<dyn Readiness> = match args.mode {
        Mode::Node => Arc::new(AlwaysReady),
        Mode::Controller | Mode::All => Arc::new(EndpointReadiness {
            uri: args.agent.clone(),
            timeout: Duration::from_secs(2),
        }),
    };
    let mut router =
        tonic::transport::Server::builder().add_service(IdentityService::new(readiness).server());

    if node_mode {
        let node_id = args
            .node_id
            .clone()
            .context("--node-id (or CAIRN_NODE_ID) is required in node mode")?;
        let host = Host {
            device_timeout: Duration::from_secs(args.device_timeout_secs),
            ..Host::default()
        };
        let svc = NodeService::with_host(
            NodeConfig {
                node_id,
                host_nqn: args.host_nqn.clone(),
                max_volumes_per_node: args.max_volumes_per_node,
                alpha_capabilities: args.alpha_capabilities,
            },
            host,
        );
        router = router.add_service(svc.server());
    }
    if matches!(args.mode, Mode::Controller | Mode::All) {
        // Lazy: the agent may come up after the controller; Probe reports
        // readiness meanwhile and calls fail with UNAVAILABLE.
        let agent = tonic::transport::Endpoint::from_shared(args.agent.clone())
            .with_context(|| format!("bad agent endpoint {:?}", args.agent))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = cairn_proto::agent::v1::control_client::ControlClient::new(agent);
        router = router.add_service(
            ControllerService::new(client)
                .with_alpha_capabilities(args.alpha_capabilities)
                .server(),
        );
    }

    let path = socket_path(&args.endpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", path.display()))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    tracing::info!(endpoint = %args.endpoint, mode = ?args.mode, "serving CSI");
    router
        .serve_with_incoming_shutdown(cairn_csi::socket::incoming(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_an_absolute_unix_path() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }

    #[test]
    fn cli_parses_node_mode() {
        let a = Args::try_parse_from([
            "cairn-csi",
            "--mode",
            "node",
            "--node-id",
            "n1",
            "--skip-host-check",
        ])
        .unwrap();
        assert_eq!(a.mode, Mode::Node);
        assert_eq!(a.endpoint, "unix:///csi/csi.sock");
        assert!(a.skip_host_check);
        assert!(Args::try_parse_from(["cairn-csi", "--mode", "bogus"]).is_err());
    }
}
