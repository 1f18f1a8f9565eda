//! A three-node cluster on loopback sharing a real etcd (Debian's
//! `etcd-server`, started by scripts/start-etcd.sh on free ports): every
//! node runs an engine and an agent (Control API, registration, the
//! reconciler behind the control lease), each agent in a runtime of its own
//! so that killing it cancels whatever it was doing.
//!
//! - a node dies under live, verified writes: the volumes keep serving, a
//!   2-replica volume gets a replacement rebuilt elsewhere, a 3-replica one
//!   (with nowhere else to go) is resynced in place when the node returns
//!   (whole: its engine was killed, a new incarnation); every replica then holds exactly what was written,
//!   and nothing is left behind on any engine;
//! - etcd and the lease holder are killed during creations and deletions:
//!   after they return, no volume stays half-made;
//! - 50 volumes created and deleted in parallel through the API, with
//!   retries, leak no replica;
//! - a node whose pool returns with a damaged group header: its replica is
//!   faulted and replaced from the healthy one at once, every write reads
//!   back, and `cairnctl pool check --repair` repairs the header.
//!
//! Without an etcd binary the tests say so and pass without running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_agent::control::{Control, ControlConfig};
use cairn_agent::model::{ReplicaSpec, VolumePhase, VolumeSpec};
use cairn_agent::node::{NodeConfig, PoolConfig};
use cairn_agent::service::ControlService;
use cairn_bdev::{BlockDevice, IoBuf};
use cairn_engine::core::Engine;
use cairn_engine::daemon::{self, AgentHealthRecorder, EngineConfig};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::nexus::NexusConfig;
use cairn_engine::reactor::Reactors;
use cairn_engine::service::EngineService;
use cairn_proto::agent::v1 as apb;
use cairn_proto::engine::v1 as epb;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

/// The tests share the machine's two cores; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1 << 20;
const VOLUME_SIZE: u64 = 32 * MIB;
/// The writers cover this much of each volume, in 4 KiB blocks.
const WRITTEN_BLOCKS: u64 = 1024;
const BLOCK: usize = 4096;

fn control_config() -> ControlConfig {
    ControlConfig {
        node_lease: Duration::from_secs(2),
        engine_timeout: Duration::from_secs(5),
        reconcile_period: Duration::from_millis(300),
        replace_after: Duration::from_secs(3),
        lease_ttl: Duration::from_secs(2),
        stale_op_after: Duration::from_secs(3),
        ..ControlConfig::default()
    }
}

// ---- etcd ----------------------------------------------------------------

fn etcd_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CAIRN_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// These tests need a real etcd; without one they fail (a green run means
/// they ran). `scripts/install-deps.sh` installs Debian's etcd-server.
fn require_etcd() {
    assert!(
        etcd_binary().is_some(),
        "no etcd binary on PATH: run scripts/install-deps.sh (etcd-server) or set CAIRN_ETCD_BIN"
    );
}

fn free_port(ip: [u8; 4]) -> u16 {
    TcpListener::bind(SocketAddr::from((ip, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member with its data in a temporary directory.
struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    pid: Option<String>,
}

impl Etcd {
    fn start() -> Etcd {
        let mut e = Etcd {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port([127, 0, 0, 1]),
            peer_port: free_port([127, 0, 0, 1]),
            pid: None,
        };
        e.restart();
        e
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    fn restart(&mut self) {
        assert!(self.pid.is_none(), "etcd is already running");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-etcd.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(self.dir.path().join("data"))
            .arg(self.client_port.to_string())
            .arg(self.peer_port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "could not start etcd\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.pid = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }

    /// SIGKILLs the member and waits until its port is closed.
    fn kill(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "etcd still listens after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

// ---- nodes ---------------------------------------------------------------

/// One node: an engine (NVMe-oF target, gRPC API) and an agent, each in a
/// runtime of its own. Restarting brings both back on the same pool file
/// and the same addresses.
struct Node {
    k: u8,
    id: String,
    dir: PathBuf,
    store_spec: String,
    cfg: ControlConfig,
    nvmf_port: u16,
    engine_port: u16,
    agent_port: u16,
    engine: Option<Arc<Engine>>,
    engine_rt: Option<Runtime>,
    agent_rt: Option<Runtime>,
}

fn ip(k: u8) -> [u8; 4] {
    [127, 0, 0, k]
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn listener(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true).unwrap();
                return l;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "binding {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Node {
    fn new(k: u8, dir: &Path, store_spec: &str, cfg: ControlConfig) -> Node {
        Node {
            k,
            id: format!("n{k}"),
            dir: dir.to_owned(),
            store_spec: store_spec.to_owned(),
            cfg,
            nvmf_port: free_port(ip(k)),
            engine_port: free_port(ip(k)),
            agent_port: free_port(ip(k)),
            engine: None,
            engine_rt: None,
            agent_rt: None,
        }
    }

    fn host_nqn(&self) -> String {
        format!(
            "nqn.2014-08.org.nvmexpress:uuid:0000000{}-0000-0000-0000-000000000000",
            self.k
        )
    }

    fn agent_endpoint(&self) -> String {
        format!("http://127.0.0.{}:{}", self.k, self.agent_port)
    }

    fn start(&mut self) {
        self.start_engine();
        self.start_agent();
    }

    fn start_engine(&mut self) {
        let cfg = EngineConfig {
            nvmf_listen: SocketAddr::from((ip(self.k), self.nvmf_port)),
            reactors: 1,
            max_io_queues: 4,
            host_nqn: format!("nqn.2024-01.dev.cairn:engine:{}", self.id),
            pools: vec![],
            nexus: NexusConfig {
                io_timeout: Duration::from_secs(2),
                pause: Duration::from_secs(3),
                // Slow enough that a rebuild's progress can be watched.
                rebuild_rate: 16 * MIB,
                ..NexusConfig::default()
            },
            busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
        };
        let engine = daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone())).unwrap();
        let rt = runtime(&format!("engine-{}", self.id));
        engine.set_health_recorder(AgentHealthRecorder::new(
            self.agent_endpoint(),
            rt.handle().clone(),
        ));
        let l = listener(SocketAddr::from((ip(self.k), self.engine_port)));
        let svc = EngineService::new(engine.clone()).server();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        });
        self.engine = Some(engine);
        self.engine_rt = Some(rt);
    }

    fn start_agent(&mut self) {
        let rt = runtime(&format!("agent-{}", self.id));
        let node = NodeConfig {
            node_id: self.id.clone(),
            node_address: None,
            engine_endpoint: format!("http://127.0.0.{}:{}", self.k, self.engine_port),
            host_nqn: self.host_nqn(),
            topology: BTreeMap::from([("zone".to_owned(), format!("z{}", self.k))]),
            pools: vec![PoolConfig {
                name: format!("pool-{}", self.k),
                device: self
                    .dir
                    .join(format!("pool-{}.img", self.k))
                    .display()
                    .to_string(),
                size: Some(256 * MIB),
            }],
            heartbeat: Duration::from_millis(300),
        };
        let l = listener(SocketAddr::from((ip(self.k), self.agent_port)));
        let spec = self.store_spec.clone();
        let cfg = self.cfg.clone();
        rt.spawn(async move {
            let store = loop {
                match cairn_agent::open_store(&spec).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let control = Control::new(store, cfg);
            let holder = node.node_id.clone();
            tokio::spawn(cairn_agent::node::run(node, control.clone()));
            tokio::spawn(cairn_agent::control::reconcile::run(
                control.clone(),
                holder,
            ));
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let _ = tonic::transport::Server::builder()
                .add_service(ControlService::new(control).server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await;
        });
        self.agent_rt = Some(rt);
    }

    /// Kills the agent: every call it was serving stops where it is.
    fn kill_agent(&mut self) {
        if let Some(rt) = self.agent_rt.take() {
            rt.shutdown_background();
        }
    }

    /// Kills the agent and the engine.
    fn kill(&mut self) {
        self.kill_agent();
        if let Some(rt) = self.engine_rt.take() {
            rt.shutdown_background();
        }
        if let Some(e) = self.engine.take() {
            e.shutdown();
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("engine running")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    // Dropped in this order: nodes before etcd, the directory last.
    nodes: Vec<Node>,
    etcd: Etcd,
    /// The test's own view of the store.
    observer: Control,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(control_config()).await
    }

    /// Three nodes whose agents run with `cfg`.
    async fn start_with(cfg: ControlConfig) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start();
        let observer = Control::new(
            cairn_agent::open_store(&etcd.spec()).await.unwrap(),
            cfg.clone(),
        );
        let mut nodes: Vec<Node> = (2..=4u8)
            .map(|k| Node::new(k, dir.path(), &etcd.spec(), cfg.clone()))
            .collect();
        nodes.iter_mut().for_each(Node::start);
        let c = Cluster {
            nodes,
            etcd,
            observer,
            _dir: dir,
        };
        c.wait_online(3).await;
        c
    }

    fn node(&mut self, id: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    async fn api(&self, node: usize) -> apb::control_client::ControlClient<Channel> {
        let ep = self.nodes[node].agent_endpoint();
        until(Duration::from_secs(10), "agent API", || async {
            apb::control_client::ControlClient::connect(ep.clone())
                .await
                .ok()
        })
        .await
    }

    async fn wait_online(&self, n: usize) {
        until(Duration::from_secs(20), "nodes online", || async {
            let nodes = self.observer.nodes().await.ok()?;
            (nodes
                .iter()
                .filter(|x| self.observer.is_online(x) && !x.pools.is_empty())
                .count()
                == n)
                .then_some(())
        })
        .await
    }

    /// Replica uuids on every running engine, by node.
    fn engine_replicas(&self) -> HashMap<String, HashSet<String>> {
        self.nodes
            .iter()
            .filter_map(|n| {
                let e = n.engine.as_ref()?;
                let uuids = e
                    .pools()
                    .iter()
                    .flat_map(|p| p.replicas().into_iter().map(|r| r.uuid().to_string()))
                    .collect();
                Some((n.id.clone(), uuids))
            })
            .collect()
    }

    /// Asserts that running engines hold exactly the replicas the volume
    /// records name on their nodes: none leaked, none missing.
    /// Waits until the engines hold exactly the replicas the records name
    /// (garbage collection has run), then checks it node by node.
    async fn wait_no_orphans(&self, limit: Duration) {
        until(limit, "no orphans", || async {
            let vols = self.observer.volumes().await.ok()?;
            let recorded: HashSet<String> = vols
                .iter()
                .flat_map(|v| v.replicas.iter().map(|r| r.uuid.clone()))
                .collect();
            let all: HashSet<String> = self.engine_replicas().into_values().flatten().collect();
            (all == recorded).then_some(())
        })
        .await;
        self.assert_no_orphans().await;
    }

    async fn assert_no_orphans(&self) {
        let vols = self.observer.volumes().await.unwrap();
        let mut want: HashMap<String, HashSet<String>> = HashMap::new();
        for v in &vols {
            for r in &v.replicas {
                want.entry(r.node.clone())
                    .or_default()
                    .insert(r.uuid.clone());
            }
        }
        for (node, have) in self.engine_replicas() {
            let expected = want.remove(&node).unwrap_or_default();
            assert_eq!(have, expected, "replicas on {node} differ from the records");
        }
    }
}

/// Polls `f` until it gives a value, for at most `limit`.
async fn until<T, Fut>(limit: Duration, what: &str, mut f: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the verifying writer --------------------------------------------------

/// Block `b` as written the `seq`-th time: (b, seq) repeated.
fn tagged(b: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        v.extend_from_slice(&b.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
    }
    v
}

fn expected_block(b: u64, seq: u64) -> Vec<u8> {
    if seq == 0 {
        vec![0; BLOCK]
    } else {
        tagged(b, seq)
    }
}

struct WriterReport {
    writes: u64,
    reads: u64,
    /// Sequence number last written to each block (0: never).
    expected: Vec<u64>,
    errors: Vec<String>,
}

/// Writes tagged blocks at random through the volume's nexus and checks
/// every read against what was last written, until stopped; then reads
/// every block back once more.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<WriterReport>,
}

impl Writer {
    fn start(addr: &str, nqn: &str, host_nqn: &str, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, nqn, host, flag) = (
            addr.parse::<SocketAddr>().unwrap(),
            nqn.to_owned(),
            host_nqn.to_owned(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut report = WriterReport {
                writes: 0,
                reads: 0,
                expected: vec![0; WRITTEN_BLOCKS as usize],
                errors: vec![],
            };
            let mut o = InitiatorOptions::new(addr, &nqn, &host);
            o.io_queues = 1;
            let dev = match NvmfDevice::connect(o) {
                Ok(d) => d,
                Err(e) => {
                    report.errors.push(format!("connect: {e}"));
                    return report;
                }
            };
            let lbas_per_block = BLOCK as u64 / u64::from(dev.info().block_size);
            let client = Reactors::start(1, "writer").unwrap();
            let d = dev.clone();
            let report = client
                .run(0, move || async move {
                    let q = match d.open_channel() {
                        Ok(q) => q,
                        Err(e) => {
                            report.errors.push(format!("channel: {e}"));
                            return report;
                        }
                    };
                    let mut rng = seed | 1;
                    let mut next = move || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut seq = 0u64;
                    let check = |b: u64, got: &[u8], expected: &[u64], errors: &mut Vec<String>| {
                        let want = expected_block(b, expected[b as usize]);
                        if got != want.as_slice() {
                            errors.push(format!(
                                "block {b}: read {:?}, last written seq {}",
                                &got[..16],
                                expected[b as usize]
                            ));
                        }
                    };
                    while !flag.load(Ordering::Relaxed) && report.errors.len() < 10 {
                        let b = next() % WRITTEN_BLOCKS;
                        seq += 1;
                        let mut buf = IoBuf::zeroed(BLOCK);
                        buf.copy_from_slice(&tagged(b, seq));
                        let (r, _) = q.write(b * lbas_per_block, buf, false).await;
                        match r {
                            Ok(_) => {
                                report.expected[b as usize] = seq;
                                report.writes += 1;
                            }
                            Err(e) => report.errors.push(format!("write block {b}: {e}")),
                        }
                        if seq.is_multiple_of(3) {
                            let b = next() % WRITTEN_BLOCKS;
                            let (r, got) = q.read(b * lbas_per_block, IoBuf::zeroed(BLOCK)).await;
                            match r {
                                Ok(_) => {
                                    report.reads += 1;
                                    check(b, got.as_slice(), &report.expected, &mut report.errors);
                                }
                                Err(e) => report.errors.push(format!("read block {b}: {e}")),
                            }
                        }
                    }
                    if let Err(e) = q.flush().await {
                        report.errors.push(format!("flush: {e}"));
                    }
                    for b in 0..WRITTEN_BLOCKS {
                        let (r, got) = q.read(b * lbas_per_block, IoBuf::zeroed(BLOCK)).await;
                        match r {
                            Ok(_) => check(b, got.as_slice(), &report.expected, &mut report.errors),
                            Err(e) => report.errors.push(format!("final read block {b}: {e}")),
                        }
                    }
                    report
                })
                .unwrap();
            dev.disconnect();
            client.shutdown();
            report
        });
        Writer { stop, thread }
    }

    fn writes_so_far_ok(&self) -> bool {
        !self.thread.is_finished()
    }

    fn finish(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Reads the written region of a replica straight from its pool and checks
/// it block by block against what the writer last wrote.
/// Reads every replica of a volume straight from its pool and checks each
/// block against what the writer last wrote there.
async fn verify_replicas(c: &Cluster, replicas: &[ReplicaSpec], expected: &[u64]) {
    for rep in replicas {
        let node = c.nodes.iter().find(|n| n.id == rep.node).unwrap();
        let engine = node.engine().clone();
        let (uuid, expected) = (rep.uuid.clone(), expected.to_vec());
        tokio::task::spawn_blocking(move || verify_replica(&engine, &uuid, &expected))
            .await
            .unwrap()
            .unwrap();
    }
}

fn verify_replica(engine: &Arc<Engine>, uuid: &str, expected: &[u64]) -> Result<(), String> {
    let (_, replica) = engine
        .replica(&uuid.parse().unwrap())
        .map_err(|e| format!("replica {uuid}: {e}"))?;
    let lbas_per_block = BLOCK as u64 / u64::from(replica.info().block_size);
    let expected = expected.to_vec();
    let uuid = uuid.to_owned();
    let client = Reactors::start(1, "verify").unwrap();
    let r = client
        .run(0, move || async move {
            let q = replica.open_channel().map_err(|e| e.to_string())?;
            for (b, seq) in expected.iter().enumerate() {
                let (r, got) = q
                    .read(b as u64 * lbas_per_block, IoBuf::zeroed(BLOCK))
                    .await;
                r.map_err(|e| format!("replica {uuid} block {b}: {e}"))?;
                if got.as_slice() != expected_block(b as u64, *seq).as_slice() {
                    return Err(format!(
                        "replica {uuid} block {b}: holds {:?}, last written seq {seq}",
                        &got[..16]
                    ));
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    client.shutdown();
    r
}

async fn nexus_children(node: &Node, id: &str) -> Vec<epb::NexusChild> {
    let ep = format!("http://127.0.0.{}:{}", node.k, node.engine_port);
    let Ok(mut c) = epb::engine_client::EngineClient::connect(ep).await else {
        return vec![];
    };
    c.list_nexuses(epb::ListNexusesRequest {})
        .await
        .map(|r| r.into_inner().nexuses)
        .unwrap_or_default()
        .into_iter()
        .find(|n| n.uuid == id)
        .map(|n| n.children)
        .unwrap_or_default()
}

fn healthy_nodes(v: &VolumeSpec) -> Vec<String> {
    let mut n: Vec<String> = v
        .replicas
        .iter()
        .filter(|r| r.healthy)
        .map(|r| r.node.clone())
        .collect();
    n.sort();
    n
}

/// A volume whose replicas go to `zones` first (preferred, not required: a
/// replacement may go elsewhere).
fn create_req(name: &str, replicas: u32, zones: &[&str]) -> apb::CreateVolumeRequest {
    apb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: VOLUME_SIZE,
        replicas,
        thin: true,
        topology: (!zones.is_empty()).then(|| apb::TopologyRequirement {
            requisite: vec![],
            preferred: zones
                .iter()
                .map(|z| apb::Segment {
                    labels: [("zone".to_owned(), (*z).to_owned())].into(),
                })
                .collect(),
        }),
        min_bytes: 0,
        max_bytes: 0,
    }
}

/// `cairnctl --json volume get ID` against an agent, then the table form.
fn cairnctl_json(agent: &str, id: &str) -> (serde_json::Value, String) {
    let run = |json: bool| {
        let mut args = vec!["--agent", agent];
        if json {
            args.push("--json");
        }
        args.extend(["volume", "get", id]);
        let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let json = serde_json::from_slice(&run(true)).unwrap();
    (json, String::from_utf8(run(false)).unwrap())
}

// ---- the tests -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_replaced_or_resynced_and_nothing_is_lost() {
    require_etcd();
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut c = Cluster::start().await;
    let mut api = c.api(0).await;

    // Two replicas on n2 and n4; three on every node. Both published on
    // n2, whose engine runs the nexuses and records their health.
    let two = api
        .create_volume(create_req("two", 2, &["z2", "z4"]))
        .await
        .unwrap()
        .into_inner();
    let three = api
        .create_volume(create_req("three", 3, &[]))
        .await
        .unwrap()
        .into_inner();
    let mut writers = Vec::new();
    for (i, v) in [&two, &three].iter().enumerate() {
        let p = api
            .publish_volume(apb::PublishVolumeRequest {
                id: v.id.clone(),
                node: "n2".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let t = p.target.unwrap();
        writers.push(Writer::start(
            &t.address,
            &t.nqn,
            &c.nodes[0].host_nqn(),
            7 + i as u64,
        ));
    }
    // A third volume is written through n3, then unpublished: it is cold
    // when n4 dies, and is healed through a temporary nexus.
    let cold = api
        .create_volume(create_req("cold", 2, &["z3", "z4"]))
        .await
        .unwrap()
        .into_inner();
    let p = api
        .publish_volume(apb::PublishVolumeRequest {
            id: cold.id.clone(),
            node: "n3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = p.target.unwrap();
    let w = Writer::start(&t.address, &t.nqn, &c.nodes[1].host_nqn(), 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cold_written = w.finish();
    assert!(cold_written.errors.is_empty(), "{:?}", cold_written.errors);
    api.unpublish_volume(apb::UnpublishVolumeRequest {
        id: cold.id.clone(),
        node: String::new(),
    })
    .await
    .unwrap();

    // n4 dies: agent and engine.
    let killed_at = Instant::now();
    c.node("n4").kill();
    let old_two: String = c
        .observer
        .volume(&two.id)
        .await
        .unwrap()
        .replicas
        .iter()
        .find(|r| r.node == "n4")
        .unwrap()
        .uuid
        .clone();

    // The 2-replica volume gets a replacement on n3, rebuilt while the
    // writer goes on; the API and cairnctl show its progress meanwhile.
    let mut seen_progress: Option<(serde_json::Value, String)> = None;
    let agent = c.nodes[0].agent_endpoint();
    let deadline = Instant::now() + Duration::from_secs(40);
    let rebuilt = loop {
        if seen_progress.is_none() {
            let shown = api
                .get_volume(apb::GetVolumeRequest { id: two.id.clone() })
                .await
                .unwrap()
                .into_inner();
            if shown
                .replicas
                .iter()
                .any(|r| r.state == "rebuilding" && r.rebuild.is_some())
            {
                let (agent, id) = (agent.clone(), two.id.clone());
                seen_progress = Some(
                    tokio::task::spawn_blocking(move || cairnctl_json(&agent, &id))
                        .await
                        .unwrap(),
                );
            }
        }
        let v = c.observer.volume(&two.id).await.unwrap();
        if healthy_nodes(&v) == ["n2", "n3"] && v.replicas.len() == 2 {
            break v;
        }
        assert!(Instant::now() < deadline, "no replacement rebuilt: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (shown, table) = seen_progress.expect("the rebuild's progress was never shown");
    println!("cairnctl during the rebuild: {shown}\n{table}");
    for header in ["STATE", "REBUILD", "RATE", "ETA"] {
        assert!(table.contains(header), "{table}");
    }
    let rebuilding = shown[0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "rebuilding" && !r["rebuild"].is_null())
        .cloned();
    let rebuilding = rebuilding.unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(rebuilding["node"], "n3");
    assert_eq!(rebuilding["rebuild"]["kind"], "full");
    assert!(rebuilding["rebuild"]["bytes_total"].as_u64().unwrap() > 0);
    assert!(!rebuilding["replaces"].is_null());
    let replaced_after = killed_at.elapsed();
    assert!(rebuilt.replicas.iter().all(|r| r.uuid != old_two));
    let three_now = c.observer.volume(&three.id).await.unwrap();
    assert_eq!(healthy_nodes(&three_now), ["n2", "n3"], "{three_now:?}");
    assert_eq!(
        three_now.replicas.len(),
        3,
        "nowhere to place a fourth node's replica"
    );
    // The API shows what happened.
    let shown = api
        .get_volume(apb::GetVolumeRequest {
            id: three.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let n4 = shown.replicas.iter().find(|r| r.node == "n4").unwrap();
    assert_eq!(n4.state, "offline");
    assert_eq!(shown.status, "degraded");
    assert!(
        writers.iter().all(Writer::writes_so_far_ok),
        "a writer stopped early"
    );

    // Once n4 counts as dead, the cold volume is healed through a nexus of
    // its own, gone afterwards.
    let healed = until(Duration::from_secs(40), "cold volume healed", || async {
        let v = c.observer.volume(&cold.id).await.ok()?;
        (healthy_nodes(&v) == ["n2", "n3"] && v.replicas.len() == 2 && v.rebuild_nexus.is_none())
            .then_some(v)
    })
    .await;
    verify_replicas(&c, &healed.replicas, &cold_written.expected).await;
    // n4 returns: the 3-replica volume's child is resynced in place,
    // and the 2-replica volume's old replica there is collected.
    let back_at = Instant::now();
    c.node("n4").start();
    let resynced = until(Duration::from_secs(30), "n4 resynced", || async {
        let v = c.observer.volume(&three.id).await.ok()?;
        (healthy_nodes(&v) == ["n2", "n3", "n4"]).then_some(v)
    })
    .await;
    let resync_after = back_at.elapsed();
    let n4_uuid = resynced
        .replicas
        .iter()
        .find(|r| r.node == "n4")
        .unwrap()
        .uuid
        .clone();
    let children = nexus_children(&c.nodes[0], &three.id).await;
    let n4_child = children
        .iter()
        .find(|ch| ch.uri.ends_with(&n4_uuid))
        .expect("n4's child is in the nexus");
    println!(
        "n4 resync copied {} bytes of a {} byte volume",
        n4_child.last_rebuild_bytes, VOLUME_SIZE
    );
    // Its engine was killed: the replica may have lost writes it had
    // completed, so it comes back with a new incarnation and is copied
    // whole, in place.
    assert_eq!(
        n4_child.last_rebuild_bytes, VOLUME_SIZE,
        "a replica whose engine was killed must be copied whole"
    );
    let two_id = two.id.clone();
    let old = old_two.clone();
    until(
        Duration::from_secs(20),
        "n4's old replica collected",
        || async {
            let on_n4 = c.engine_replicas().remove("n4").unwrap_or_default();
            (!on_n4.contains(&old)).then_some(())
        },
    )
    .await;
    let _ = two_id;

    // Stop writing: every read checked out, and every replica holds exactly
    // what was last written.
    let reports: Vec<WriterReport> = writers.into_iter().map(Writer::finish).collect();
    for (r, v) in reports.iter().zip([&two, &three]) {
        assert!(r.errors.is_empty(), "volume {}: {:?}", v.name, r.errors);
        assert!(
            r.writes > 100 && r.reads > 30,
            "{} writes, {} reads",
            r.writes,
            r.reads
        );
        let spec = c.observer.volume(&v.id).await.unwrap();
        assert_eq!(spec.replicas.len(), v.replicas_wanted as usize, "{spec:?}");
        verify_replicas(&c, &spec.replicas, &r.expected).await;
    }
    c.wait_no_orphans(Duration::from_secs(10)).await;
    // Nexuses only where volumes are published, once the reconciler has
    // removed any rebuild nexus and collected what no record places.
    let mut want: Vec<String> = vec![two.id.clone(), three.id.clone()];
    want.sort();
    let nexus_sets = || {
        c.nodes
            .iter()
            .map(|n| {
                let mut nexuses: Vec<String> = n.engine().nexuses(|x| x.uuid.to_string());
                nexuses.sort();
                (n.id.clone(), nexuses)
            })
            .collect::<Vec<_>>()
    };
    let settling = Instant::now();
    let settled = settling + Duration::from_secs(30);
    loop {
        let sets = nexus_sets();
        let ok = sets.iter().all(|(node, have)| {
            if node == "n2" {
                *have == want
            } else {
                have.is_empty()
            }
        });
        if ok {
            println!(
                "nexuses settled {:?} after the replicas",
                settling.elapsed()
            );
            break;
        }
        if Instant::now() >= settled {
            let cold_now = c.observer.volume(&cold.id).await;
            panic!(
                "nexuses {sets:?}; want {want:?} on n2 only; cold volume {} now {cold_now:?}",
                cold.id
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cold_now = c.observer.volume(&cold.id).await.unwrap();
    assert_eq!(healthy_nodes(&cold_now), ["n2", "n3"], "{cold_now:?}");
    verify_replicas(&c, &cold_now.replicas, &cold_written.expected).await;
    println!(
        "writes {}/{}; replacement rebuilt {replaced_after:?} after the kill; \
         resync {resync_after:?} after the return; whole test {:?}",
        reports[0].writes,
        reports[1].writes,
        started.elapsed()
    );
}

/// Retries a call the way a CSI sidecar does, until it succeeds.
async fn retried<T, Fut>(mut f: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(s) => {
                assert!(Instant::now() < deadline, "still failing after 40 s: {s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn connect(ep: String) -> Option<apb::control_client::ControlClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(ep)
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .ok()?;
    Some(apb::control_client::ControlClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_etcd_and_the_lease_holder_leaves_no_half_made_volume() {
    // Volumes created while the kills happen.
    const NEW: usize = 20;
    require_etcd();
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut c = Cluster::start().await;
    let holder = until(Duration::from_secs(10), "a lease holder", || async {
        c.observer
            .lease(cairn_agent::control::lease::CONTROL_LEASE)
            .await
            .ok()
            .flatten()
            .map(|l| l.holder)
    })
    .await;
    let holder_idx = c.nodes.iter().position(|n| n.id == holder).unwrap();
    let holder_ep = c.nodes[holder_idx].agent_endpoint();

    // Some volumes exist already; they are deleted while new ones are made,
    // all through the lease holder's agent.
    let api = c.api(holder_idx).await;
    for i in 0..6 {
        let mut api = api.clone();
        api.create_volume(create_req(&format!("old-{i}"), 2, &[]))
            .await
            .unwrap();
    }
    let old_ids: Vec<String> = c
        .observer
        .volumes()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    let mut calls = Vec::new();
    for i in 0..NEW {
        let ep = holder_ep.clone();
        calls.push(tokio::spawn(async move {
            let Some(mut api) = connect(ep).await else {
                return;
            };
            let _ = api
                .create_volume(create_req(&format!("new-{i}"), 2, &[]))
                .await;
        }));
    }
    for id in old_ids.clone() {
        let ep = holder_ep.clone();
        calls.push(tokio::spawn(async move {
            let Some(mut api) = connect(ep).await else {
                return;
            };
            let _ = api.delete_volume(apb::DeleteVolumeRequest { id }).await;
        }));
    }
    // Cut everything short as soon as an operation is seen half-way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let vols = c.observer.volumes().await.unwrap_or_default();
        if vols.iter().any(|v| v.phase != VolumePhase::Ready) {
            break;
        }
        assert!(Instant::now() < deadline, "no operation seen in flight");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.etcd.kill();
    c.nodes[holder_idx].kill_agent();
    for call in calls {
        let _ = call.await;
    }
    let took_over_at = Instant::now();
    let half_made = || async {
        c.observer
            .volumes()
            .await
            .unwrap()
            .into_iter()
            .filter(|v| v.phase != VolumePhase::Ready)
            .count()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.etcd.restart();
    let in_flight = until(Duration::from_secs(10), "etcd back", || async {
        c.observer
            .volumes()
            .await
            .ok()
            .map(|v| v.iter().filter(|v| v.phase != VolumePhase::Ready).count())
    })
    .await;
    println!("after the kills: {in_flight} volume(s) left creating or deleting");
    assert!(in_flight > 0, "the kills cut no operation short");

    // Another agent takes the lease over once it expires; then the killed
    // one comes back. The holder finishes or undoes what was cut short,
    // with no client retrying anything.
    let successor = until(Duration::from_secs(15), "a new lease holder", || async {
        let l = c
            .observer
            .lease(cairn_agent::control::lease::CONTROL_LEASE)
            .await
            .ok()
            .flatten()?;
        (l.holder != holder).then_some(l.holder)
    })
    .await;
    println!(
        "{successor} took the control lease over from {holder} {:?} after the kill",
        took_over_at.elapsed()
    );
    c.nodes[holder_idx].start_agent();
    c.wait_online(3).await;
    until(Duration::from_secs(30), "operations finished", || async {
        (half_made().await == 0).then_some(())
    })
    .await;
    c.wait_no_orphans(Duration::from_secs(20)).await;
    for v in c.observer.volumes().await.unwrap() {
        assert_eq!(v.phase, VolumePhase::Ready);
        assert_eq!(v.replicas.len(), 2, "{v:?}");
    }

    // Clients retrying now get every creation and deletion done.
    let mut api = c.api((holder_idx + 1) % 3).await;
    for i in 0..NEW {
        let v = retried(|| {
            let mut api = api.clone();
            async move {
                api.create_volume(create_req(&format!("new-{i}"), 2, &[]))
                    .await
            }
        })
        .await
        .into_inner();
        assert_eq!(v.status, "online");
    }
    for id in old_ids {
        retried(|| {
            let mut api = api.clone();
            let id = id.clone();
            async move { api.delete_volume(apb::DeleteVolumeRequest { id }).await }
        })
        .await;
    }
    let left = api
        .list_volumes(apb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(left.len(), NEW);
    c.assert_no_orphans().await;
    println!("whole test {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_volumes_created_and_deleted_in_parallel_leak_nothing() {
    require_etcd();
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    // No garbage collection: the operations alone must leave nothing.
    let c = Cluster::start_with(ControlConfig {
        garbage_collect: false,
        ..control_config()
    })
    .await;
    let mut apis = Vec::new();
    for i in 0..3 {
        apis.push(c.api(i).await);
    }
    // Every volume is created twice at once through two different agents
    // (a retry racing the first attempt), then deleted the same way.
    let mut tasks = Vec::new();
    for i in 0..50usize {
        for j in 0..2 {
            let api = apis[(i + j) % 3].clone();
            tasks.push(tokio::spawn(async move {
                let req = create_req(&format!("par-{i}"), 1 + (i % 3) as u32, &[]);
                retried(|| {
                    let req = req.clone();
                    let mut api = api.clone();
                    async move { api.create_volume(req).await }
                })
                .await
                .into_inner()
            }));
        }
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let v = t.await.unwrap();
        assert_eq!(v.status, "online", "{v:?}");
        ids.insert(v.id);
    }
    assert_eq!(ids.len(), 50);
    let created = c
        .engine_replicas()
        .values()
        .map(HashSet::len)
        .sum::<usize>();
    assert_eq!(created, (0..50).map(|i| 1 + i % 3).sum::<usize>());
    c.assert_no_orphans().await;

    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for j in 0..2 {
            let api = apis[(i + j) % 3].clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                retried(|| {
                    let mut api = api.clone();
                    let id = id.clone();
                    async move { api.delete_volume(apb::DeleteVolumeRequest { id }).await }
                })
                .await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(c.observer.volumes().await.unwrap().is_empty());
    // Nothing is left, and no garbage collection ran.
    let left: usize = c.engine_replicas().values().map(HashSet::len).sum();
    assert_eq!(left, 0, "{:?}", c.engine_replicas());
    println!("50 volumes created and deleted in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_is_built_only_from_replicas_its_health_record_names() {
    require_etcd();
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let mut api = c.api(0).await;
    let v = api
        .create_volume(create_req("recorded", 2, &["z3", "z4"]))
        .await
        .unwrap()
        .into_inner();
    let kept = v
        .replicas
        .iter()
        .find(|r| r.node == "n3")
        .unwrap()
        .uuid
        .clone();
    let stale = v
        .replicas
        .iter()
        .find(|r| r.node == "n4")
        .unwrap()
        .uuid
        .clone();
    // An earlier nexus, which the volume named as current, recorded that
    // only n3's replica holds every write.
    {
        use cairn_agent::model::{decode, encode, Record, VolumeSpec};
        let key = VolumeSpec::key_of(&v.id);
        let got = c.observer.store().get(&key).await.unwrap().unwrap();
        let mut spec: VolumeSpec = decode(&key, &got.value).unwrap();
        spec.nexus_instance = "an-earlier-nexus".into();
        c.observer.store().put(&key, &encode(&spec)).await.unwrap();
    }
    api.record_nexus_health(apb::RecordNexusHealthRequest {
        volume_id: v.id.clone(),
        healthy_children: vec![format!("replica:///{kept}")],
        clean_shutdown: false,
        generation: 5,
        instance: "an-earlier-nexus".into(),
    })
    .await
    .unwrap();
    let spec = c.observer.volume(&v.id).await.unwrap();
    assert!(
        !spec
            .replicas
            .iter()
            .find(|r| r.uuid == stale)
            .unwrap()
            .healthy
    );

    // Published on n2: the nexus has n3's replica only.
    api.publish_volume(apb::PublishVolumeRequest {
        id: v.id.clone(),
        node: "n2".into(),
    })
    .await
    .unwrap();
    let children = nexus_children(&c.nodes[0], &v.id).await;
    assert!(
        children.iter().all(|ch| !ch.uri.ends_with(&stale)),
        "{children:?}"
    );
    // The stale replica is replaced by a rebuilt one on n2 and collected.
    let healed = until(
        Duration::from_secs(30),
        "the stale replica replaced",
        || async {
            let v = c.observer.volume(&v.id).await.ok()?;
            (healthy_nodes(&v) == ["n2", "n3"] && v.replicas.len() == 2).then_some(v)
        },
    )
    .await;
    assert!(healed.replicas.iter().all(|r| r.uuid != stale));
    let record = c.observer.nexus_health(&v.id).await.unwrap().unwrap();
    for r in &healed.replicas {
        assert!(record.healthy.contains(&r.uuid), "{record:?}");
    }
    until(
        Duration::from_secs(10),
        "the stale replica collected",
        || async {
            let on_n4 = c.engine_replicas().remove("n4").unwrap_or_default();
            (!on_n4.contains(&stale)).then_some(())
        },
    )
    .await;
    c.assert_no_orphans().await;

    // Garbage made behind the control plane's back: a replica no volume
    // names, shared, with a nexus over it on another node; and a share of
    // a recorded replica that no nexus needs once the volume is unpublished.
    api.unpublish_volume(apb::UnpublishVolumeRequest {
        id: v.id.clone(),
        node: String::new(),
    })
    .await
    .unwrap();
    let orphan = "0f0f0f0f-0000-4000-8000-00000000000f";
    let n3 = c.nodes[1].engine().clone();
    n3.create_replica("pool-3", orphan, "orphan", 4 * MIB, true)
        .unwrap();
    n3.share_replica(orphan, vec![]).unwrap();
    let uri = format!(
        "nvmf://127.0.0.3:{}/nqn.2024-01.dev.cairn:replica:{orphan}",
        c.nodes[1].nvmf_port
    );
    let stray = "0e0e0e0e-0000-4000-8000-00000000000e";
    c.nodes[0]
        .engine()
        .create_nexus(stray, 4 * MIB, &[uri], vec![])
        .unwrap();
    n3.share_replica(&kept, vec![]).unwrap();
    let kept_uuid: uuid::Uuid = kept.parse().unwrap();
    until(Duration::from_secs(15), "garbage collected", || async {
        let nexuses = c.nodes[0].engine().nexuses(|n| n.uuid.to_string());
        let on_n3 = c.engine_replicas().remove("n3").unwrap_or_default();
        (nexuses.is_empty() && !on_n3.contains(orphan) && n3.share_of(&kept_uuid).is_none())
            .then_some(())
    })
    .await;
    c.assert_no_orphans().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_outage_is_resynced_in_place_not_replaced() {
    require_etcd();
    let _serial = SERIAL.lock().await;
    // Replacement only after a long outage: this one is short.
    let mut c = Cluster::start_with(ControlConfig {
        replace_after: Duration::from_secs(30),
        ..control_config()
    })
    .await;
    let mut api = c.api(0).await;
    let v = api
        .create_volume(create_req("blip", 2, &["z2", "z3"]))
        .await
        .unwrap()
        .into_inner();
    let before: Vec<String> = v.replicas.iter().map(|r| r.uuid.clone()).collect();
    let n3_uuid = v
        .replicas
        .iter()
        .find(|r| r.node == "n3")
        .unwrap()
        .uuid
        .clone();
    let t = api
        .publish_volume(apb::PublishVolumeRequest {
            id: v.id.clone(),
            node: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .target
        .unwrap();
    let writer = Writer::start(&t.address, &t.nqn, &c.nodes[0].host_nqn(), 11);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // n3 goes away for a moment while writes go on.
    c.node("n3").kill();
    until(Duration::from_secs(10), "n3's child faulted", || async {
        let spec = c.observer.volume(&v.id).await.ok()?;
        (healthy_nodes(&spec) == ["n2"]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = Instant::now();
    c.node("n3").start();
    until(Duration::from_secs(20), "n3 resynced", || async {
        let spec = c.observer.volume(&v.id).await.ok()?;
        (healthy_nodes(&spec) == ["n2", "n3"]).then_some(())
    })
    .await;
    let took = back.elapsed();
    let spec = c.observer.volume(&v.id).await.unwrap();
    let after: Vec<String> = spec.replicas.iter().map(|r| r.uuid.clone()).collect();
    assert_eq!(after, before, "the replica was replaced, not resynced");
    let children = nexus_children(&c.nodes[0], &v.id).await;
    let child = children
        .iter()
        .find(|ch| ch.uri.ends_with(&n3_uuid))
        .unwrap();
    println!(
        "short outage: resync copied {} of {VOLUME_SIZE} bytes, healthy {took:?} after the return",
        child.last_rebuild_bytes
    );
    // n3's engine was killed: its replica may have lost completed writes
    // (a new incarnation), so the log alone cannot vouch for it and it is
    // copied whole, in place.
    assert_eq!(
        child.last_rebuild_bytes, VOLUME_SIZE,
        "a replica whose engine was killed must be copied whole"
    );
    let report = writer.finish();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    verify_replicas(&c, &spec.replicas, &report.expected).await;
    c.assert_no_orphans().await;
}

/// A node whose pool comes back with one damaged group header: the pool
/// imports, the volume's replica on it (thin, so the pool cannot tell which
/// clusters it lost) is faulted and replaced from its healthy peer at once
/// (long before `replace_after`), never resynced from the dirty-region log,
/// which would leave the lost clusters reading as zeros; every acknowledged
/// write reads back from both replicas; `CheckPool` through the agent (what
/// `cairnctl pool check` calls) reports the header and repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_group_header_faults_only_its_replicas_which_are_rebuilt() {
    require_etcd();
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start_with(ControlConfig {
        replace_after: Duration::from_secs(60),
        ..control_config()
    })
    .await;
    let mut api = c.api(0).await;
    let v = api
        .create_volume(create_req("damaged", 2, &["z2", "z3"]))
        .await
        .unwrap()
        .into_inner();
    let n3_uuid = v
        .replicas
        .iter()
        .find(|r| r.node == "n3")
        .unwrap()
        .uuid
        .clone();
    let t = api
        .publish_volume(apb::PublishVolumeRequest {
            id: v.id.clone(),
            node: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .target
        .unwrap();
    let writer = Writer::start(&t.address, &t.nqn, &c.nodes[0].host_nqn(), 21);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // n3 stops; its pool's first group header (naming the replica's
    // clusters) is damaged while it is down; writes go on.
    c.node("n3").kill();
    let pool3 = c.node("n3").dir.join("pool-3.img");
    let report = cairn_pool::check(&pool3).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let g0 = cairn_pool::format::group_offset(report.cluster_size, 0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pool3)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, g0 + 40).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, g0 + 40).unwrap();
        f.sync_all().unwrap();
    }
    let back = Instant::now();
    c.node("n3").start();
    let spec = until(Duration::from_secs(40), "n3's replica replaced", || async {
        let spec = c.observer.volume(&v.id).await.ok()?;
        let gone = spec.replicas.iter().all(|r| r.uuid != n3_uuid);
        (gone && healthy_nodes(&spec) == ["n2", "n4"]).then_some(spec)
    })
    .await;
    let took = back.elapsed();
    println!("damaged group header: replica replaced {took:?} after n3 returned");
    assert!(took < Duration::from_secs(60), "waited for replace_after");
    let report = writer.finish();
    println!(
        "acknowledged writes lost or changed: {} ({:?})",
        report.errors.len(),
        report.errors
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    verify_replicas(&c, &spec.replicas, &report.expected).await;

    let check = |repair| {
        let mut api = api.clone();
        async move {
            api.check_pool(apb::CheckPoolRequest {
                node: "n3".into(),
                pool: "pool-3".into(),
                repair,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let r = check(false).await;
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    assert_eq!(r.damaged[0].offset, g0);
    assert!(r.repaired.is_empty());
    // cairnctl reports it (and fails while it remains), then repairs it.
    let agent = c.nodes[0].agent_endpoint();
    let cairnctl = move |repair: bool| {
        let mut args = vec!["--agent", agent.as_str(), "pool", "check", "--node", "n3"];
        if repair {
            args.push("--repair");
        }
        args.push("pool-3");
        let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = tokio::task::spawn_blocking({
        let cairnctl = cairnctl.clone();
        move || cairnctl(false)
    })
    .await
    .unwrap();
    assert!(
        !ok && out.contains("cluster group 0") && out.contains("damaged"),
        "{out}"
    );
    let (ok, out) = tokio::task::spawn_blocking(move || cairnctl(true))
        .await
        .unwrap();
    assert!(ok && out.contains("repaired"), "{out}");
    let r = check(false).await;
    assert!(r.damaged.is_empty() && r.repaired.is_empty(), "{r:?}");
    let _ = check(true).await;
    c.assert_no_orphans().await;
}
