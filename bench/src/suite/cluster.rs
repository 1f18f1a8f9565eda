//! The Cairn pieces a suite runs against, started in this process: one
//! NVMe-oF/TCP target per "node" (each on its own reactor thread, listening
//! on its own loopback address), a pool on a tmpfs file and a thick replica
//! per node, and the volumes (nexuses) of the nexus node.
//!
//! ```text
//!  load generator ── initiator ──▶ node 1 (127.0.0.1): replica R1, volumes
//!                                        nexus ─┬─ R1 (local)
//!                                               ├─ initiator ─▶ node 2 (127.0.0.2): R2
//!                                               └─ initiator ─▶ node 3 (127.0.0.3): R3
//! ```
//!
//! The model-backed variants put a [`ModelDevice`] in front of each node's
//! replica (one per node, so its rate limit is that node's "SSD").

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cairn_bdev::BlockDevice;
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::nexus::Nexus;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use cairn_pool::{Pool, PoolCreate, ReplicaCreate};
use uuid::Uuid;

use crate::cpu;
use crate::model::{ModelDevice, ModelParams};

/// Host NQN the suite's initiators use.
pub const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6361726e-6265-6e63-6800-000000000001";

/// One in-process storage node.
pub struct Node {
    /// 1-based node number; it listens on 127.0.0.N.
    pub index: u8,
    pub target: Target,
    /// Thread ids of the target's reactors.
    pub reactor_tids: Vec<u32>,
    pub replica: Arc<dyn BlockDevice>,
    /// The replica behind the SSD model.
    pub model: Arc<dyn BlockDevice>,
    pub replica_nqn: String,
    pub model_nqn: String,
    /// A RAM device exported alone: the target's own cost, no pool.
    pub ram: Arc<dyn BlockDevice>,
    pub ram_nqn: String,
    _pool: Arc<Pool>,
}

impl Node {
    /// Starts node `index`: a target pinned to `cpu`, a pool on a file in
    /// `dir` holding one thick replica of `size` bytes, exported alone and
    /// behind the model.
    pub fn start(
        index: u8,
        dir: &Path,
        size: u64,
        model: &ModelParams,
        cpu: Option<usize>,
        busy_poll: Duration,
        queues: u16,
    ) -> anyhow::Result<Node> {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, index));
        let target = Target::start(TargetConfig {
            listen: SocketAddr::new(ip, 0),
            reactors: 1,
            max_io_queues: queues.max(8),
            busy_poll,
            ..TargetConfig::default()
        })
        .with_context(|| format!("starting the target of node {index} on {ip}"))?;
        let mut reactor_tids = Vec::new();
        for r in 0..target.reactors().len() {
            let tid = target
                .reactors()
                .run(r, move || async move {
                    let pinned = cpu.map(cpu::pin_current_thread).transpose();
                    (cpu::current_tid(), pinned.err().map(|e| e.to_string()))
                })
                .map_err(|e| anyhow!("node {index} reactor {r}: {e}"))?;
            if let Some(e) = tid.1 {
                eprintln!("warning: node {index}: could not pin the reactor: {e}");
            }
            reactor_tids.push(tid.0);
        }
        let pool_path = dir.join(format!("node{index}.pool"));
        // Room for the replica, its cluster group blocks and the pool header.
        let pool_size = size + size / 64 + (16 << 20);
        let f = std::fs::File::create(&pool_path)
            .with_context(|| format!("creating {}", pool_path.display()))?;
        f.set_len(pool_size)?;
        drop(f);
        let pool = Pool::create(
            &pool_path,
            PoolCreate {
                name: format!("bench-node{index}"),
                uuid: Uuid::new_v4(),
                cluster_size: cairn_pool::DEFAULT_CLUSTER_SIZE,
            },
        )
        .with_context(|| format!("creating the pool of node {index}"))?;
        let ruuid = Uuid::new_v4();
        let replica = pool
            .create_replica(ReplicaCreate {
                uuid: ruuid,
                name: format!("bench-r{index}"),
                size,
                thin: false,
            })
            .with_context(|| format!("creating the replica of node {index}"))?;
        let replica: Arc<dyn BlockDevice> = replica;
        let model: Arc<dyn BlockDevice> =
            Arc::new(ModelDevice::new(replica.clone(), model.clone()));
        let muuid = Uuid::new_v5(&ruuid, b"model");
        let replica_nqn = format!("nqn.2024-01.dev.cairn:replica:{ruuid}");
        let model_nqn = format!("nqn.2024-01.dev.cairn:replica:{muuid}");
        let ram_uuid = Uuid::new_v5(&ruuid, b"ram");
        let ram_nqn = format!("nqn.2024-01.dev.cairn:replica:{ram_uuid}");
        let ram: Arc<dyn BlockDevice> = Arc::new(cairn_bdev::ram::RamDevice::new(512, size / 512));
        for (nqn, uuid, dev) in [
            (&replica_nqn, ruuid, replica.clone()),
            (&model_nqn, muuid, model.clone()),
            (&ram_nqn, ram_uuid, ram.clone()),
        ] {
            export(&target, nqn, uuid, dev)?;
        }
        Ok(Node {
            index,
            target,
            reactor_tids,
            replica,
            model,
            replica_nqn,
            model_nqn,
            ram,
            ram_nqn,
            _pool: pool,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.target.local_addr()
    }
}

/// Exports `dev` as namespace 1 of a new subsystem `nqn` on `target`.
pub fn export(
    target: &Target,
    nqn: &str,
    uuid: Uuid,
    dev: Arc<dyn BlockDevice>,
) -> anyhow::Result<()> {
    let serial: String = uuid.simple().to_string().chars().take(20).collect();
    target
        .add_subsystem(SubsystemConfig {
            nqn: nqn.to_owned(),
            serial,
            model: Some("Cairn bench".into()),
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid,
                device: dev,
            }],
            allowed_hosts: None,
        })
        .with_context(|| format!("exporting {nqn}"))
}

/// Connects an initiator to `nqn` at `addr` with `queues` I/O queues.
pub fn connect(addr: SocketAddr, nqn: &str, queues: u16) -> anyhow::Result<NvmfDevice> {
    let mut o = InitiatorOptions::new(addr, nqn, HOST_NQN);
    o.io_queues = queues.max(1);
    o.timeout = Duration::from_secs(10);
    NvmfDevice::connect(o).with_context(|| format!("connecting to {nqn} at {addr}"))
}

/// Every node of a suite, and the volumes on node 1.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Initiator connections the nexuses use to reach remote replicas.
    links: Vec<NvmfDevice>,
    dir: PathBuf,
}

impl Cluster {
    /// Starts `nodes` nodes, their pools in `dir` (created, and removed on
    /// drop), reactors pinned to `cpus` (round robin; empty: unpinned).
    pub fn start(
        nodes: u8,
        dir: PathBuf,
        size: u64,
        model: &ModelParams,
        cpus: &[usize],
        busy_poll: Duration,
        queues: u16,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut c = Cluster {
            nodes: Vec::new(),
            links: Vec::new(),
            dir,
        };
        for i in 1..=nodes.max(1) {
            let cpu = (!cpus.is_empty()).then(|| cpus[usize::from(i - 1) % cpus.len()]);
            let n = Node::start(i, &c.dir, size, model, cpu, busy_poll, queues)?;
            c.nodes.push(n);
        }
        Ok(c)
    }

    /// Thread ids of every node's reactors.
    pub fn reactor_tids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .flat_map(|n| n.reactor_tids.iter().copied())
            .collect()
    }

    /// Builds a nexus of `size` bytes on node 1 over the replicas of nodes
    /// 1..=`replicas` (node 1's local, the others through the initiator),
    /// behind the model or not, exports it as a volume and returns its NQN.
    pub fn add_volume(
        &mut self,
        replicas: usize,
        model: bool,
        size: u64,
        queues: u16,
    ) -> anyhow::Result<String> {
        if replicas == 0 || replicas > self.nodes.len() {
            return Err(anyhow!(
                "a nexus of {replicas} replicas needs {replicas} nodes, the suite has {}",
                self.nodes.len()
            ));
        }
        let mut children: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
        for (i, n) in self.nodes.iter().take(replicas).enumerate() {
            let nqn = if model { &n.model_nqn } else { &n.replica_nqn };
            if i == 0 {
                let dev = if model { &n.model } else { &n.replica };
                children.push((format!("local:///{nqn}"), dev.clone()));
            } else {
                let link = connect(n.addr(), nqn, queues)?;
                children.push((format!("nvmf://{}/{nqn}", n.addr()), Arc::new(link.clone())));
                self.links.push(link);
            }
        }
        let nexus = Nexus::new(size, children).context("assembling the nexus")?;
        let uuid = Uuid::new_v4();
        let nqn = format!("nqn.2024-01.dev.cairn:vol:{uuid}");
        export(&self.nodes[0].target, &nqn, uuid, Arc::new(nexus))?;
        Ok(nqn)
    }
}

/// A volume set up to measure a rebuild: a nexus over node 1's replica
/// alone, and node 2's replica ready to join it.
pub struct RebuildVolume {
    pub nexus: Arc<Nexus>,
    pub nqn: String,
    pub child_uri: String,
    pub child: Arc<dyn BlockDevice>,
}

impl Cluster {
    /// Builds a one-replica nexus of `size` bytes on node 1 (exported as a
    /// volume) and connects to node 2's replica, which a rebuild can add.
    pub fn rebuild_volume(&mut self, size: u64, queues: u16) -> anyhow::Result<RebuildVolume> {
        if self.nodes.len() < 2 {
            return Err(anyhow!("a rebuild needs two nodes"));
        }
        let n1 = &self.nodes[0];
        let nexus = Arc::new(
            Nexus::new(
                size,
                vec![(format!("local:///{}", n1.replica_nqn), n1.replica.clone())],
            )
            .context("assembling the nexus")?,
        );
        let uuid = Uuid::new_v4();
        let nqn = format!("nqn.2024-01.dev.cairn:vol:{uuid}");
        export(&n1.target, &nqn, uuid, nexus.clone())?;
        let n2 = &self.nodes[1];
        // One queue per host queue of the nexus, plus the rebuild's own.
        let link = connect(n2.addr(), &n2.replica_nqn, queues + 1)?;
        self.links.push(link.clone());
        Ok(RebuildVolume {
            nexus,
            nqn,
            child_uri: format!("nvmf://{}/{}", n2.addr(), n2.replica_nqn),
            child: Arc::new(link),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for l in &self.links {
            l.disconnect();
        }
        for n in &self.nodes {
            n.target.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
