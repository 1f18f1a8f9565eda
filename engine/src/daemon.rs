//! Starting an engine: reactors, target, pools. Shared by the
//! `cairn-engine` binary and the single-node `cairn` system.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use crate::core::{Engine, EngineError, RemoteOpener};
use crate::initiator::{InitiatorOptions, NvmfDevice};
use crate::target::{Target, TargetConfig};

/// What an engine serves and where.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// NVMe-oF/TCP listener.
    pub nvmf_listen: SocketAddr,
    /// Reactor (I/O) threads.
    pub reactors: usize,
    /// I/O queues one host controller may create.
    pub max_io_queues: u16,
    /// The engine's host NQN, used when it connects to remote replicas.
    pub host_nqn: String,
    /// Pool disks to import at start.
    pub pools: Vec<PathBuf>,
}

impl EngineConfig {
    /// A default host NQN for this machine.
    pub fn default_host_nqn() -> String {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("nqn.2024-01.dev.cairn:engine:{host}")
    }
}

/// Starts the target and imports the configured pools. A pool that fails to
/// import is an error: the engine never starts half-configured.
pub fn start(cfg: &EngineConfig, remote: Box<RemoteOpener>) -> Result<Arc<Engine>, EngineError> {
    let target = Target::start(TargetConfig {
        listen: cfg.nvmf_listen,
        reactors: cfg.reactors.max(1),
        max_io_queues: cfg.max_io_queues,
        ..TargetConfig::default()
    })?;
    let engine = Arc::new(Engine::new(target, cfg.host_nqn.clone(), remote));
    for p in &cfg.pools {
        engine.import_pool(p)?;
    }
    Ok(engine)
}

/// Opens remote children through Cairn's NVMe/TCP initiator, connecting as
/// `host_nqn`.
pub fn remote_opener(host_nqn: String) -> Box<RemoteOpener> {
    Box::new(move |addr: &str, nqn: &str, queues: u32| {
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("address {addr} resolves to nothing"))?;
        let mut opts = InitiatorOptions::new(sa, nqn, &host_nqn);
        opts.io_queues = u16::try_from(queues.max(1)).unwrap_or(u16::MAX);
        let dev = NvmfDevice::connect(opts).map_err(|e| e.to_string())?;
        Ok(Arc::new(dev) as Arc<dyn cairn_bdev::BlockDevice>)
    })
}
