//! The node role of the agent: bring the engine's pools up from
//! configuration, register the node and keep its heartbeat fresh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cairn_proto::engine::v1 as pb;
use pb::engine_client::EngineClient;
use serde::Deserialize;
use tonic::transport::Channel;

use crate::control::Control;
use crate::model::{NodeRecord, PoolRecord};

/// One pool this node should have.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    /// Block device or file path, or a disk URI (`aio://`, `uring://`,
    /// `malloc://`), passed to the engine as it is.
    pub device: String,
    /// For a file that does not exist yet: create it sparse with this size.
    #[serde(default)]
    pub size: Option<u64>,
}

/// The per-node pool configuration file: `nodes: { NODE: [pools] }`.
#[derive(Debug, Deserialize)]
pub struct PoolConfigFile {
    pub nodes: BTreeMap<String, Vec<PoolConfig>>,
}

impl PoolConfigFile {
    /// Reads the file; the pools of `node` (none if the node is not listed).
    pub fn pools_for(path: &std::path::Path, node: &str) -> anyhow::Result<Vec<PoolConfig>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read pool config {}: {e}", path.display()))?;
        let f: PoolConfigFile = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("bad pool config {}: {e}", path.display()))?;
        Ok(f.nodes.get(node).cloned().unwrap_or_default())
    }
}

/// What this node is.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Address other nodes and hosts reach this node's NVMe-oF listener at
    /// (replaces an unspecified listen address such as 0.0.0.0).
    pub node_address: Option<String>,
    pub engine_endpoint: String,
    /// The node's kernel host NQN (for the CSI node plugin's connections).
    pub host_nqn: String,
    pub topology: BTreeMap<String, String>,
    pub pools: Vec<PoolConfig>,
    pub heartbeat: Duration,
}

/// Brings the configured pools up on the engine (create, or import what is
/// already there).
pub async fn ensure_pools(
    engine: &mut EngineClient<Channel>,
    pools: &[PoolConfig],
) -> Result<(), tonic::Status> {
    for p in pools {
        let exists = PathBuf::from(&p.device).exists();
        engine
            .create_pool(pb::CreatePoolRequest {
                name: p.name.clone(),
                disk: p.device.clone(),
                create_file_size: if exists { 0 } else { p.size.unwrap_or(0) },
                cluster_size: 0,
            })
            .await?;
        tracing::info!(pool = %p.name, device = %p.device, "pool ready");
    }
    Ok(())
}

fn advertised(nvmf: &str, node_address: Option<&str>) -> String {
    match (nvmf.parse::<std::net::SocketAddr>(), node_address) {
        (Ok(sa), Some(addr)) if sa.ip().is_unspecified() => format!("{addr}:{}", sa.port()),
        _ => nvmf.to_owned(),
    }
}

/// Reads the engine's state into a node record.
pub async fn node_record(
    engine: &mut EngineClient<Channel>,
    cfg: &NodeConfig,
) -> Result<NodeRecord, tonic::Status> {
    let info = engine.get_info(pb::GetInfoRequest {}).await?.into_inner();
    let pools = engine
        .list_pools(pb::ListPoolsRequest {})
        .await?
        .into_inner()
        .pools;
    Ok(NodeRecord {
        id: cfg.node_id.clone(),
        engine_endpoint: cfg.engine_endpoint.clone(),
        nvmf_address: advertised(&info.nvmf_address, cfg.node_address.as_deref()),
        engine_host_nqn: info.host_nqn,
        host_nqn: cfg.host_nqn.clone(),
        topology: cfg.topology.clone(),
        pools: pools
            .into_iter()
            .map(|p| PoolRecord {
                name: p.name,
                disk: p.disk,
                capacity_bytes: p.capacity_bytes,
                used_bytes: p.used_bytes,
                committed_bytes: p.committed_bytes,
            })
            .collect(),
        last_seen: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    })
}

/// Registers the node, restores its published nexuses, and heartbeats until
/// the future is dropped. Transient failures are logged and retried.
pub async fn run(cfg: NodeConfig, control: Control) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(cfg.engine_endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    let mut engine = EngineClient::new(channel);
    let mut pools_ready = false;
    let mut restored = false;
    loop {
        let step = async {
            if !pools_ready {
                ensure_pools(&mut engine, &cfg.pools).await?;
                pools_ready = true;
            }
            let rec = node_record(&mut engine, &cfg).await?;
            control.register_node(&rec).await?;
            if !restored {
                control.restore_published(&cfg.node_id).await?;
                restored = true;
            }
            anyhow::Ok(())
        };
        if let Err(e) = step.await {
            tracing::warn!(node = %cfg.node_id, error = %e, "node registration failed; retrying");
        }
        tokio::time::sleep(cfg.heartbeat).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_config_parses_and_selects_node() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pools.yaml");
        std::fs::write(
            &p,
            "nodes:\n  n1:\n    - name: pool-a\n      device: /dev/nvme1n1\n  n2: []\n",
        )
        .unwrap();
        let pools = PoolConfigFile::pools_for(&p, "n1").unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].device, "/dev/nvme1n1");
        assert!(PoolConfigFile::pools_for(&p, "n3").unwrap().is_empty());
        std::fs::write(&p, "nodes: [").unwrap();
        assert!(PoolConfigFile::pools_for(&p, "n1").is_err());
    }

    #[test]
    fn unspecified_listener_is_advertised_with_node_address() {
        assert_eq!(
            advertised("0.0.0.0:8420", Some("10.1.2.3")),
            "10.1.2.3:8420"
        );
        assert_eq!(
            advertised("127.0.0.2:8420", Some("10.1.2.3")),
            "127.0.0.2:8420"
        );
        assert_eq!(advertised("0.0.0.0:8420", None), "0.0.0.0:8420");
    }
}
