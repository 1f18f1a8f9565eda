//! Starting an engine: reactors, target, pools. Shared by the
//! `cairn-engine` binary and the single-node `cairn` system.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use crate::core::{Engine, EngineError, RemoteOpener};
use crate::initiator::{InitiatorOptions, NvmfDevice};
use crate::nexus::{HealthDone, HealthRecord, HealthRecorder, NexusConfig};
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
    /// Tunables of the nexuses this engine builds.
    pub nexus: NexusConfig,
    /// How long reactors poll after network activity before they sleep.
    pub busy_poll: std::time::Duration,
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

/// File descriptors the engine wants: one per NVMe queue (host connection),
/// per device channel and per pool, with room to spare.
pub const MIN_OPEN_FILES: u64 = 4096;

/// Raises the soft open-file limit to the hard one and checks it is at least
/// `min`; a lower hard limit is a clear start-up error, not a failure later
/// under load.
pub fn ensure_open_files(min: u64) -> Result<u64, EngineError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(EngineError::Io {
            op: "getrlimit(RLIMIT_NOFILE)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < min {
        return Err(EngineError::InvalidArgument(format!(
            "the open-file limit is {} and cannot be raised to the {min} the engine needs \
             (one descriptor per NVMe queue and device channel); raise it with \
             `ulimit -n` or the container's nofile limit",
            lim.rlim_cur
        )));
    }
    Ok(lim.rlim_cur)
}

/// Starts the target and imports the configured pools. A pool that fails to
/// import is an error: the engine never starts half-configured.
pub fn start(cfg: &EngineConfig, remote: Box<RemoteOpener>) -> Result<Arc<Engine>, EngineError> {
    ensure_open_files(MIN_OPEN_FILES)?;
    let target = Target::start(TargetConfig {
        listen: cfg.nvmf_listen,
        reactors: cfg.reactors.max(1),
        max_io_queues: cfg.max_io_queues,
        busy_poll: cfg.busy_poll,
        ..TargetConfig::default()
    })?;
    let engine = Arc::new(
        Engine::new(target, cfg.host_nqn.clone(), remote).with_nexus_config(cfg.nexus.clone()),
    );
    for p in &cfg.pools {
        engine.import_pool_uri(&p.to_string_lossy())?;
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

/// Records nexus health through an agent's Control API
/// (`RecordNexusHealth`), retrying while the agent or its store is away.
pub struct AgentHealthRecorder {
    endpoint: String,
    runtime: tokio::runtime::Handle,
    /// How long one record is retried before the nexus is told it failed
    /// (the nexus then asks again).
    retry_for: std::time::Duration,
}

impl AgentHealthRecorder {
    /// Records through the agent at `endpoint` (http://host:port), running
    /// the calls on `runtime`.
    pub fn new(endpoint: String, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(AgentHealthRecorder {
            endpoint,
            runtime,
            retry_for: std::time::Duration::from_secs(10),
        })
    }
}

impl HealthRecorder for AgentHealthRecorder {
    fn record(&self, rec: HealthRecord, done: HealthDone) {
        use cairn_proto::agent::v1 as apb;
        let endpoint = self.endpoint.clone();
        let retry_for = self.retry_for;
        let req = apb::RecordNexusHealthRequest {
            volume_id: rec.nexus.to_string(),
            healthy_children: rec.healthy,
            clean_shutdown: rec.clean_shutdown,
            generation: rec.generation,
            instance: rec.instance.to_string(),
        };
        self.runtime.spawn(async move {
            let deadline = std::time::Instant::now() + retry_for;
            let mut last = String::new();
            while std::time::Instant::now() < deadline {
                let client = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .map(|e| {
                        e.connect_timeout(std::time::Duration::from_secs(2))
                            .timeout(std::time::Duration::from_secs(5))
                            .connect_lazy()
                    })
                    .map(apb::control_client::ControlClient::new);
                match client {
                    Ok(mut c) => match c.record_nexus_health(req.clone()).await {
                        Ok(_) => return done(Ok(())),
                        Err(s) => last = s.to_string(),
                    },
                    Err(e) => return done(Err(format!("bad agent endpoint {endpoint}: {e}"))),
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            done(Err(last));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_file_limit_is_raised_and_checked() {
        let got = ensure_open_files(1).unwrap();
        assert!(got >= 1);
        if got < u64::MAX {
            let err = ensure_open_files(got + 1).unwrap_err();
            assert!(err.to_string().contains("open-file limit"), "{err}");
        }
    }
}
