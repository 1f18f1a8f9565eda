//! The headline benchmark: the same jobs against the backing devices alone
//! and against Cairn's layers on top of them, all started in this process.
//!
//! Setups (see [`Setup`]):
//!
//! - baselines, driven directly by the load generator: a RAM device, a file
//!   on tmpfs, a file on disk with `O_DIRECT`, and the SSD model over RAM;
//! - a pool replica exported alone over NVMe-oF/TCP, reached through the
//!   engine's initiator;
//! - nexuses of 1, 2 and 3 replicas published over NVMe-oF/TCP, the first
//!   replica local to the nexus, the others on other "nodes" (targets on
//!   127.0.0.2 and 127.0.0.3) reached through the initiator; plain (replicas
//!   on tmpfs pools) or behind the SSD model (one model per node).
//!
//! Jobs: 4 KiB random read, random write and 50/50 mix at queue depth 64,
//! then 4 KiB random read at queue depth 1 for latency. Rounds alternate the
//! setups (round, job, setup) and the report keeps the median run of each.
//!
//! CPU: the load generator's job threads are pinned to `bench_cpus`, every
//! node's reactor to `engine_cpus` (on a 2-core machine: the load generator
//! on one core, all engine reactors, remote nodes included, on the other).
//! "Engine CPU per I/O" is the summed CPU time of all reactor threads (and
//! of the io_uring worker threads the kernel runs for them) during the
//! measured window divided by the I/Os.

mod chart;
pub mod cluster;
mod report;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_bdev::file::{FileDevice, FileOptions};
use cairn_bdev::ram::RamDevice;
use cairn_bdev::BlockDevice;
use serde::{Deserialize, Serialize};

use crate::cpu;
use crate::model::{ModelDevice, ModelParams};
use crate::result::BenchResult;
use crate::runner::{run, run_interleaved, Progress, RunOptions};
use crate::spec::{format_size, JobSpec, Pattern};
use cluster::Cluster;

pub(crate) use report::median;
pub use report::{IdleCpu, Interleaved, Ratio, RebuildRun, Row, SuiteReport};

/// What a suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// A RAM device, directly.
    Ram,
    /// A file on tmpfs (`/dev/shm`), directly.
    ShmFile,
    /// A file on disk with `O_DIRECT`, directly.
    DiskFile,
    /// The SSD model over a RAM device, directly.
    Model,
    /// A RAM device exported alone over NVMe-oF: the target's own cost.
    RamNvmf,
    /// A pool replica (pool on tmpfs) exported alone over NVMe-oF.
    Replica,
    /// The same behind the SSD model.
    ReplicaModel,
    /// A nexus of N replicas (pools on tmpfs), published over NVMe-oF.
    Nexus(u8),
    /// A nexus of N replicas each behind the SSD model.
    NexusModel(u8),
}

impl Setup {
    /// The default list of a suite.
    pub fn defaults() -> Vec<Setup> {
        vec![
            Setup::Ram,
            Setup::ShmFile,
            Setup::DiskFile,
            Setup::Model,
            Setup::RamNvmf,
            Setup::Replica,
            Setup::Nexus(1),
            Setup::NexusModel(1),
            Setup::NexusModel(2),
            Setup::NexusModel(3),
        ]
    }

    /// Whether it needs the in-process engine.
    pub fn uses_engine(self) -> bool {
        !matches!(
            self,
            Setup::Ram | Setup::ShmFile | Setup::DiskFile | Setup::Model
        )
    }

    /// Nodes it needs.
    fn nodes(self) -> u8 {
        match self {
            Setup::Nexus(n) | Setup::NexusModel(n) => n,
            _ => 1,
        }
    }

    /// One line on what it is.
    pub fn describe(self) -> String {
        match self {
            Setup::Ram => "RAM device, driven directly".into(),
            Setup::ShmFile => "file on tmpfs (/dev/shm), driven directly".into(),
            Setup::DiskFile => "file on disk with O_DIRECT, driven directly".into(),
            Setup::Model => "SSD model over RAM, driven directly".into(),
            Setup::RamNvmf => "RAM device exported alone over NVMe-oF/TCP (the target's own cost)".into(),
            Setup::Replica => {
                "pool replica (pool on tmpfs) exported alone over NVMe-oF/TCP".into()
            }
            Setup::ReplicaModel => "pool replica behind the SSD model, over NVMe-oF/TCP".into(),
            Setup::Nexus(n) => format!(
                "nexus of {n} replica(s) on tmpfs pools over NVMe-oF/TCP (1 local{})",
                if n > 1 {
                    format!(", {} on other nodes via the initiator", n - 1)
                } else {
                    String::new()
                }
            ),
            Setup::NexusModel(n) => format!(
                "nexus of {n} replica(s), each behind its node's SSD model, over NVMe-oF/TCP (1 local{})",
                if n > 1 {
                    format!(", {} on other nodes via the initiator", n - 1)
                } else {
                    String::new()
                }
            ),
        }
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setup::Ram => f.write_str("ram"),
            Setup::ShmFile => f.write_str("shm-file"),
            Setup::DiskFile => f.write_str("disk-odirect"),
            Setup::Model => f.write_str("model"),
            Setup::RamNvmf => f.write_str("ram-nvmf"),
            Setup::Replica => f.write_str("replica"),
            Setup::ReplicaModel => f.write_str("replica-model"),
            Setup::Nexus(n) => write!(f, "nexus-{n}"),
            Setup::NexusModel(n) => write!(f, "nexus-{n}-model"),
        }
    }
}

impl FromStr for Setup {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Setup> {
        Ok(match s {
            "ram" => Setup::Ram,
            "shm-file" | "shm" => Setup::ShmFile,
            "disk-odirect" | "disk" => Setup::DiskFile,
            "model" => Setup::Model,
            "ram-nvmf" => Setup::RamNvmf,
            "replica" => Setup::Replica,
            "replica-model" => Setup::ReplicaModel,
            _ => {
                let (n, model) = match s.strip_prefix("nexus-") {
                    Some(rest) => match rest.strip_suffix("-model") {
                        Some(n) => (n, true),
                        None => (rest, false),
                    },
                    None => bail!(
                        "unknown setup {s:?} (ram, shm-file, disk-odirect, model, replica, \
                         replica-model, nexus-N, nexus-N-model with N 1..=3)"
                    ),
                };
                match n.parse::<u8>() {
                    Ok(n @ 1..=3) if model => Setup::NexusModel(n),
                    Ok(n @ 1..=3) => Setup::Nexus(n),
                    _ => bail!("a nexus has 1 to 3 replicas, not {n:?}"),
                }
            }
        })
    }
}

/// The jobs of a suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Job {
    RandRead,
    RandWrite,
    RandRw,
    /// Random read at queue depth 1, one job thread: latency, with the
    /// load generator polling between I/Os as SPDK's does.
    Qd1Read,
    /// The same with the load generator sleeping between I/Os, as an
    /// interrupt-driven host does.
    Qd1Sleep,
}

impl Job {
    pub const ALL: [Job; 5] = [
        Job::RandRead,
        Job::RandWrite,
        Job::RandRw,
        Job::Qd1Read,
        Job::Qd1Sleep,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Job::RandRead => "randread",
            Job::RandWrite => "randwrite",
            Job::RandRw => "randrw",
            Job::Qd1Read => "qd1-read",
            Job::Qd1Sleep => "qd1-sleep",
        }
    }
}

impl FromStr for Job {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Job> {
        match Job::ALL.into_iter().find(|j| j.label() == s) {
            Some(j) => Ok(j),
            None => bail!(
                "unknown job {s:?} ({})",
                Job::ALL.map(Job::label).join(", ")
            ),
        }
    }
}

/// The pairs of setups the suite also compares within runs, taking turns
/// every slice (see [`run_interleaved`]): the second against the first.
/// Only setups whose I/O takes far less than a slice: at each switch a turn
/// drains its I/Os, which for the model setups (milliseconds at QD64, and a
/// rate limit that saves up while idle) would weigh on the result. Those
/// are steady anyway, being limited by the model rather than the machine.
pub const COMPARISONS: [(Setup, Setup); 2] = [
    // The same setup twice: how finely this machine resolves a difference.
    (Setup::Replica, Setup::Replica),
    // What the nexus layer costs.
    (Setup::Replica, Setup::Nexus(1)),
];

/// How to run a suite.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteOptions {
    pub quick: bool,
    /// Output folder (created).
    pub out: PathBuf,
    pub rounds: u32,
    #[serde(with = "crate::spec::secs")]
    pub runtime: Duration,
    #[serde(with = "crate::spec::secs")]
    pub ramp: Duration,
    /// Job threads of the queue-depth-64 jobs.
    pub numjobs: u32,
    pub iodepth: u32,
    /// Bytes of every device and replica.
    pub size: u64,
    /// The SSD model of the model setups.
    pub model: ModelParams,
    pub setups: Vec<Setup>,
    /// The jobs to run (default: all).
    pub jobs: Vec<Job>,
    /// How long each setup's turn lasts in the interleaved comparisons;
    /// zero skips them.
    #[serde(with = "crate::spec::secs")]
    pub slice: Duration,
    /// CPUs of the engine's reactors (all nodes).
    pub engine_cpus: Vec<usize>,
    /// How long the engine's reactors poll after network activity.
    #[serde(with = "crate::spec::secs")]
    pub engine_busy_poll: Duration,
    /// CPUs of the load generator's job threads.
    pub bench_cpus: Vec<usize>,
    /// Where the disk file goes.
    pub disk_dir: PathBuf,
    /// Where the tmpfs file and the pools go.
    pub shm_dir: PathBuf,
    /// How long to measure the idle engine.
    #[serde(with = "crate::spec::secs")]
    pub idle: Duration,
    #[serde(skip)]
    pub progress: Progress,
}

impl SuiteOptions {
    /// Defaults for full (`quick == false`) or quick mode, on this machine.
    pub fn new(quick: bool) -> SuiteOptions {
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Two cores or more: engine on core 0, load generator on core 1.
        let (engine_cpus, bench_cpus) = if ncpu >= 2 {
            (vec![0], vec![1])
        } else {
            (Vec::new(), Vec::new())
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        SuiteOptions {
            quick,
            out: PathBuf::from(format!("results/suite-{stamp}")),
            rounds: if quick { 1 } else { 3 },
            runtime: if quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(3)
            },
            ramp: if quick {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(500)
            },
            numjobs: 1,
            iodepth: 64,
            size: if quick { 32 << 20 } else { 512 << 20 },
            model: default_model(),
            setups: Setup::defaults(),
            jobs: Job::ALL.to_vec(),
            slice: if quick {
                Duration::from_millis(10)
            } else {
                DEFAULT_SLICE
            },
            engine_cpus,
            engine_busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
            bench_cpus,
            disk_dir: PathBuf::from("/var/tmp"),
            shm_dir: PathBuf::from("/dev/shm"),
            idle: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(5)
            },
            progress: Progress::Auto,
        }
    }
}

/// Turn length of the interleaved comparisons: long next to an I/O's
/// latency at queue depth 64 (the drain at each switch), short next to the
/// machine's drifts.
pub const DEFAULT_SLICE: Duration = Duration::from_millis(20);

/// The suite's SSD: the data-centre NVMe preset with its IOPS scaled down
/// so that one device, not the two-core machine's CPU, is the bottleneck
/// at queue depth 64, which is what the replica-scaling ratios need.
pub fn default_model() -> ModelParams {
    ModelParams {
        max_iops: Some(20_000),
        ..ModelParams::datacenter_nvme()
    }
}

/// One exported setup of [`export_setups`].
#[derive(Debug, Clone)]
pub struct Export {
    pub setup: Setup,
    pub addr: std::net::SocketAddr,
    pub nqn: String,
}

/// Starts the engine pieces of `opts.setups` (the baselines are skipped) and
/// returns where each is exported, for an outside initiator (the kernel's,
/// with fio) to run the suite's jobs. Everything stops when the cluster is
/// dropped.
pub fn export_setups(opts: &SuiteOptions) -> anyhow::Result<(Cluster, Vec<Export>)> {
    let engine: Vec<Setup> = opts
        .setups
        .iter()
        .copied()
        .filter(|s| s.uses_engine())
        .collect();
    let Some(nodes) = engine.iter().map(|s| s.nodes()).max() else {
        bail!("none of the setups runs on the engine");
    };
    let dir = opts
        .shm_dir
        .join(format!("cairn-bench-{}", std::process::id()));
    let queues = 8;
    let mut c = Cluster::start(
        nodes,
        dir,
        opts.size,
        &opts.model,
        &opts.engine_cpus,
        opts.engine_busy_poll,
        queues,
    )?;
    let mut out = Vec::new();
    for setup in engine {
        let n1 = &c.nodes[0];
        let addr = n1.addr();
        let nqn = match setup {
            Setup::RamNvmf => n1.ram_nqn.clone(),
            Setup::Replica => n1.replica_nqn.clone(),
            Setup::ReplicaModel => n1.model_nqn.clone(),
            Setup::Nexus(n) => c.add_volume(n.into(), false, opts.size, queues)?,
            Setup::NexusModel(n) => c.add_volume(n.into(), true, opts.size, queues)?,
            _ => continue,
        };
        out.push(Export { setup, addr, nqn });
    }
    Ok((c, out))
}

/// A device under test and what the suite knows of it.
struct Target {
    setup: Setup,
    dev: Arc<dyn BlockDevice>,
    /// Engine threads to account (empty for baselines).
    tids: Vec<u32>,
}

/// Runs the suite; writes `suite.md`, `suite.json` and `suite.png` into
/// `opts.out` and returns the report.
pub fn run_suite(opts: &SuiteOptions) -> anyhow::Result<SuiteReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    if opts.setups.is_empty() {
        bail!("no setups to run");
    }
    let tag = format!("cairn-bench-{}", std::process::id());
    let shm_dir = opts.shm_dir.join(&tag);
    let _cleanup = RemoveOnDrop(vec![
        shm_dir.clone(),
        opts.disk_dir.join(format!("{tag}.img")),
    ]);
    std::fs::create_dir_all(&shm_dir).with_context(|| format!("creating {}", shm_dir.display()))?;

    say(&format!(
        "cairn-bench suite: {} mode, {} round(s) of {} setups x {} jobs, {} + {} ramp each, {} per device",
        if opts.quick { "quick" } else { "full" },
        opts.rounds,
        opts.setups.len(),
        Job::ALL.len(),
        fmt_dur(opts.runtime),
        fmt_dur(opts.ramp),
        format_size(opts.size),
    ));
    say(&format!("SSD model: {}", opts.model));
    say(&format!(
        "CPUs: engine reactors (every node) on {:?}, load generator on {:?}",
        opts.engine_cpus, opts.bench_cpus
    ));

    // Two channels per job thread when a setup is compared with itself.
    let queues = u16::try_from(opts.numjobs.max(1) * 2)
        .unwrap_or(u16::MAX)
        .max(4);
    let nodes = opts
        .setups
        .iter()
        .filter(|s| s.uses_engine())
        .map(|s| s.nodes())
        .max();
    let mut cluster = match nodes {
        Some(n) => {
            say(&format!("starting {n} node(s) on 127.0.0.1..=127.0.0.{n}"));
            Some(Cluster::start(
                n,
                shm_dir.join("pools"),
                opts.size,
                &opts.model,
                &opts.engine_cpus,
                opts.engine_busy_poll,
                queues,
            )?)
        }
        None => None,
    };
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    for &setup in &opts.setups {
        match open_setup(setup, opts, &shm_dir, cluster.as_mut(), queues) {
            Ok(t) => targets.push(t),
            Err(e) => {
                let note = format!("{setup}: skipped: {e:#}");
                say(&note);
                notes.push(note);
            }
        }
    }
    // Fill every backing device once so reads hit real data.
    prefill(opts, &targets, cluster.as_ref())?;

    let mut runs: Vec<(Setup, Job, BenchResult)> = Vec::new();
    let total = opts.rounds as usize * opts.jobs.len() * targets.len();
    let mut k = 0;
    for round in 1..=opts.rounds {
        for &job in &opts.jobs {
            for t in &targets {
                k += 1;
                let spec = job_spec(opts, t.setup, job)?;
                let ropts = RunOptions {
                    progress: opts.progress,
                    watch_threads: t.tids.clone(),
                    ..RunOptions::default()
                };
                let r = run(t.dev.clone(), &spec, &ropts)
                    .with_context(|| format!("{} {}", t.setup, job.label()))?;
                say(&format!(
                    "[{k:>3}/{total}] round {round} {:<16} {:<9} {:>9.0} IOPS  avg {:>8.1} us  p99 {:>8.1} us{}",
                    t.setup.to_string(),
                    job.label(),
                    r.total.iops,
                    r.total.latency.mean_us,
                    r.total.latency.p99_us,
                    if r.errors > 0 {
                        format!("  {} errors", r.errors)
                    } else {
                        String::new()
                    }
                ));
                runs.push((t.setup, job, r));
            }
        }
    }

    let interleaved = if opts.slice.is_zero() {
        Vec::new()
    } else {
        compare_interleaved(opts, &targets)?
    };

    let idle = match &cluster {
        Some(c) => Some(measure_idle(c, &targets, opts.idle)?),
        None => None,
    };
    drop(targets);
    let rebuild = match cluster.as_mut() {
        Some(c) if c.nodes.len() >= 2 => match measure_rebuild(opts, c, queues) {
            Ok(r) => Some(r),
            Err(e) => {
                let note = format!("rebuild: skipped: {e:#}");
                say(&note);
                notes.push(note);
                None
            }
        },
        _ => None,
    };
    drop(cluster.take());

    let mut report = SuiteReport::build(opts, runs, interleaved, idle, notes, started.elapsed());
    if let Some(r) = rebuild {
        report.add_rebuild(r);
    }
    let md = report.markdown();
    print!("{md}");
    std::fs::write(opts.out.join("suite.md"), &md)?;
    std::fs::write(
        opts.out.join("suite.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    chart::draw(&report, &opts.out.join("suite.png"))?;
    say(&format!(
        "wrote {0}/suite.md, {0}/suite.json, {0}/suite.png in {1}",
        opts.out.display(),
        fmt_dur(started.elapsed())
    ));
    Ok(report)
}

/// Runs the [`COMPARISONS`] whose setups are both open: every job but
/// `qd1-sleep`, `rounds` times, the two setups taking turns within each run (the
/// first to go alternates between runs). Each setup gets as much measured
/// time per run as a run of its own.
fn compare_interleaved(
    opts: &SuiteOptions,
    targets: &[Target],
) -> anyhow::Result<Vec<Interleaved>> {
    let find = |s: Setup| targets.iter().find(|t| t.setup == s);
    let pairs: Vec<(&Target, &Target)> = COMPARISONS
        .iter()
        .filter_map(|&(a, b)| Some((find(a)?, find(b)?)))
        .collect();
    // At queue depth 1 IOPS are the inverse of the latency, so the turns
    // compare latency too.
    let jobs: Vec<Job> = opts
        .jobs
        .iter()
        .copied()
        .filter(|&j| j != Job::Qd1Sleep)
        .collect();
    let total = pairs.len() * jobs.len() * opts.rounds as usize;
    if total > 0 {
        say(&format!(
            "interleaved comparisons: {} pair(s) x {} job(s) x {} round(s), turns of {}",
            pairs.len(),
            jobs.len(),
            opts.rounds,
            fmt_dur(opts.slice)
        ));
    }
    let mut out = Vec::new();
    let mut k = 0;
    for (a, b) in pairs {
        for &job in &jobs {
            let mut spec = job_spec(opts, b.setup, job)?;
            spec.name = format!("{} vs {}", b.setup, a.setup);
            spec.runtime = opts.runtime * 2;
            let mut c = Interleaved::new(a.setup, b.setup, job);
            for round in 0..opts.rounds {
                k += 1;
                let flip = round % 2 == 1;
                let devs = if flip {
                    [b.dev.clone(), a.dev.clone()]
                } else {
                    [a.dev.clone(), b.dev.clone()]
                };
                let ropts = RunOptions {
                    progress: opts.progress,
                    watch_threads: a.tids.clone(),
                    ..RunOptions::default()
                };
                let mut r = run_interleaved(&devs, &spec, opts.slice, &ropts)
                    .with_context(|| format!("{} {}", spec.name, job.label()))?;
                if flip {
                    r.swap(0, 1);
                }
                let (ra, rb) = (&r[0], &r[1]);
                say(&format!(
                    "[{k:>3}/{total}] {:<16} {:<9} {:>9.0} / {:>9.0} IOPS = {:.3}x",
                    spec.name,
                    job.label(),
                    rb.total.iops,
                    ra.total.iops,
                    rb.total.iops / ra.total.iops.max(1.0)
                ));
                if ra.errors + rb.errors > 0 {
                    bail!(
                        "{} {}: I/O errors in an interleaved run",
                        spec.name,
                        job.label()
                    );
                }
                c.push(ra, rb);
            }
            out.push(c);
        }
    }
    Ok(out)
}

/// Measures a full rebuild of node 2's replica into a one-replica nexus
/// while the load generator runs a 50/50 random mix on the volume, and the
/// same load without a rebuild for comparison.
fn measure_rebuild(
    opts: &SuiteOptions,
    cluster: &mut Cluster,
    queues: u16,
) -> anyhow::Result<RebuildRun> {
    use cairn_engine::nexus::{rebuild, ChildState};
    let vol = cluster.rebuild_volume(opts.size, queues)?;
    let node1 = &cluster.nodes[0];
    let dev: Arc<dyn BlockDevice> = Arc::new(cluster::connect(node1.addr(), &vol.nqn, queues)?);
    let mut spec = job_spec(opts, Setup::Nexus(1), Job::RandRw)?;
    spec.name = "rebuild load".into();
    spec.queue_depth = 16;
    let ropts = RunOptions {
        progress: opts.progress,
        ..RunOptions::default()
    };
    say("rebuild: the load alone");
    let alone = run(dev.clone(), &spec, &ropts).context("load without a rebuild")?;
    say("rebuild: the load while node 2's replica is copied in");
    vol.nexus
        .add_child(&vol.child_uri, vol.child.clone())
        .context("adding the child")?;
    let t0 = Instant::now();
    let (nexus, uri) = (vol.nexus.clone(), vol.child_uri.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    node1
        .target
        .reactors()
        .spawn(0, move || async move {
            let r = rebuild::run(nexus, uri).await;
            let _ = tx.send((r.map_err(|e| e.to_string()), t0.elapsed()));
        })
        .context("starting the rebuild")?;
    let during = run(dev.clone(), &spec, &ropts).context("load during the rebuild")?;
    let copied_in_window = vol
        .nexus
        .children()
        .iter()
        .find(|c| c.uri() == vol.child_uri)
        .map(|c| match c.state() {
            ChildState::Healthy => c.last_rebuild_bytes(),
            _ => c.progress().map_or(0, |p| p.done_bytes()),
        })
        .unwrap_or(0);
    let window = t0.elapsed();
    let (outcome, took) = rx
        .recv_timeout(Duration::from_secs(600))
        .context("the rebuild did not finish")?;
    let bytes = outcome.map_err(|e| anyhow::anyhow!("rebuild failed: {e}"))?;
    let finished_in_window = took <= window;
    // The rate under load: over the rebuild if it ended within the load
    // window, else over the window.
    let (rate_bytes, rate_secs) = if finished_in_window {
        (bytes, took.as_secs_f64())
    } else {
        (copied_in_window, window.as_secs_f64())
    };
    let r = RebuildRun {
        bytes,
        secs: took.as_secs_f64(),
        mib_per_sec_under_load: rate_bytes as f64 / rate_secs.max(1e-9) / f64::from(1 << 20),
        load_iops_alone: alone.total.iops,
        load_iops_during: during.total.iops,
    };
    say(&format!(
        "rebuild: {} in {:.2} s, {:.0} MiB/s under load; load {:.0} IOPS alone, {:.0} during",
        format_size(r.bytes),
        r.secs,
        r.mib_per_sec_under_load,
        r.load_iops_alone,
        r.load_iops_during
    ));
    Ok(r)
}

fn say(s: &str) {
    eprintln!("{s}");
}

fn fmt_dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn job_spec(opts: &SuiteOptions, setup: Setup, job: Job) -> anyhow::Result<JobSpec> {
    let mut s = JobSpec {
        name: setup.to_string(),
        block_size: 4096,
        queue_depth: opts.iodepth,
        jobs: opts.numjobs.max(1),
        runtime: opts.runtime,
        ramp: opts.ramp,
        cpus: opts.bench_cpus.clone(),
        // At queue depth 64 the load generator never runs out of work, so
        // polling gains nothing there and would only blur its CPU figures.
        busy_poll: Duration::ZERO,
        ..JobSpec::default()
    };
    s.pattern = match job {
        Job::RandRead | Job::Qd1Read | Job::Qd1Sleep => Pattern::RandRead,
        Job::RandWrite => Pattern::RandWrite,
        Job::RandRw => Pattern::RandRw { read_pct: 50 },
    };
    if matches!(job, Job::Qd1Read | Job::Qd1Sleep) {
        s.queue_depth = 1;
        s.jobs = 1;
    }
    if job == Job::Qd1Read {
        s.busy_poll = JobSpec::default().busy_poll;
    }
    s.validate()?;
    Ok(s)
}

fn open_setup(
    setup: Setup,
    opts: &SuiteOptions,
    shm_dir: &std::path::Path,
    cluster: Option<&mut Cluster>,
    queues: u16,
) -> anyhow::Result<Target> {
    let blocks = opts.size / 4096;
    let file = |path: PathBuf, direct: bool| -> anyhow::Result<Arc<dyn BlockDevice>> {
        let dev = FileDevice::create(
            &path,
            opts.size,
            FileOptions {
                block_size: 4096,
                direct,
                ..FileOptions::default()
            },
        )
        .with_context(|| format!("creating {}", path.display()))?;
        if direct && !dev.is_direct() {
            bail!("{} does not allow O_DIRECT", path.display());
        }
        Ok(Arc::new(dev))
    };
    let (dev, tids): (Arc<dyn BlockDevice>, Vec<u32>) = match setup {
        Setup::Ram => (Arc::new(RamDevice::new(4096, blocks)), Vec::new()),
        Setup::ShmFile => (file(shm_dir.join("file.img"), false)?, Vec::new()),
        Setup::DiskFile => (
            file(
                opts.disk_dir
                    .join(format!("cairn-bench-{}.img", std::process::id())),
                true,
            )?,
            Vec::new(),
        ),
        Setup::Model => (
            Arc::new(ModelDevice::new(
                Arc::new(RamDevice::new(4096, blocks)),
                opts.model.clone(),
            )),
            Vec::new(),
        ),
        Setup::RamNvmf
        | Setup::Replica
        | Setup::ReplicaModel
        | Setup::Nexus(_)
        | Setup::NexusModel(_) => {
            let c = cluster.context("no engine started")?;
            let n1 = &c.nodes[0];
            let (addr, nqn) = match setup {
                Setup::RamNvmf => (n1.addr(), n1.ram_nqn.clone()),
                Setup::Replica => (n1.addr(), n1.replica_nqn.clone()),
                Setup::ReplicaModel => (n1.addr(), n1.model_nqn.clone()),
                Setup::Nexus(n) => (n1.addr(), c.add_volume(n.into(), false, opts.size, queues)?),
                Setup::NexusModel(n) => {
                    (n1.addr(), c.add_volume(n.into(), true, opts.size, queues)?)
                }
                _ => unreachable!("matched above"),
            };
            let dev = cluster::connect(addr, &nqn, queues)?;
            (Arc::new(dev), c.reactor_tids())
        }
    };
    Ok(Target { setup, dev, tids })
}

/// Writes every block of every distinct backing device once (sequential
/// 128 KiB writes), so that reads are served from real data rather than
/// from holes.
fn prefill(
    opts: &SuiteOptions,
    targets: &[Target],
    cluster: Option<&Cluster>,
) -> anyhow::Result<()> {
    let mut devs: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for t in targets {
        match t.setup {
            Setup::Ram | Setup::ShmFile | Setup::DiskFile | Setup::Model => {
                devs.push((t.setup.to_string(), t.dev.clone()))
            }
            _ => {}
        }
    }
    if let Some(c) = cluster {
        for n in &c.nodes {
            devs.push((format!("replica of node {}", n.index), n.replica.clone()));
        }
        if targets.iter().any(|t| t.setup == Setup::RamNvmf) {
            devs.push(("RAM device of node 1".into(), c.nodes[0].ram.clone()));
        }
    }
    let t0 = Instant::now();
    for (name, dev) in devs {
        let bs = 128 * 1024u64;
        let ios = dev.info().size_bytes() / bs;
        if ios == 0 {
            continue;
        }
        let mut s = JobSpec {
            name: format!("prefill {name}"),
            pattern: Pattern::SeqWrite,
            block_size: bs as u32,
            queue_depth: 16,
            jobs: 1,
            runtime: Duration::from_secs(3600),
            io_limit: Some(ios),
            cpus: opts.bench_cpus.clone(),
            ..JobSpec::default()
        };
        s.size = Some(ios * bs);
        // The model's write latency is not what a prefill is about.
        let r = run(
            dev,
            &s,
            &RunOptions {
                progress: Progress::Never,
                ..RunOptions::default()
            },
        )
        .with_context(|| format!("prefilling {name}"))?;
        if r.errors > 0 {
            bail!(
                "prefilling {name}: {} I/O errors: {:?}",
                r.errors,
                r.first_errors
            );
        }
    }
    say(&format!(
        "prefilled the devices in {}",
        fmt_dur(t0.elapsed())
    ));
    Ok(())
}

/// Measures the CPU the running engine uses with nothing to do: every node
/// up, initiators connected (keep-alive running), and one idle I/O queue
/// open on every volume, so the nexuses hold their child queues too.
fn measure_idle(c: &Cluster, targets: &[Target], secs: Duration) -> anyhow::Result<IdleCpu> {
    let devs: Vec<Arc<dyn BlockDevice>> = targets
        .iter()
        .filter(|t| t.setup.uses_engine())
        .map(|t| t.dev.clone())
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::Builder::new()
        .name("bench-idle".into())
        .spawn(move || {
            let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build();
            let mut rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let mut chans = Vec::new();
                for d in &devs {
                    match d.open_channel() {
                        Ok(ch) => chans.push(ch),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(cpu::current_tid()));
                // Hold the queues open, waking rarely, until told to stop.
                while stop_rx.try_recv().is_err() {
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(chans);
            });
        })?;
    let opened = ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("idle queue holder died"))?;
    let tids = c.reactor_tids();
    let result = opened
        .map_err(|e| anyhow::anyhow!("opening idle queues: {e}"))
        .and_then(|holder_tid| {
            // Let connection setup settle first.
            std::thread::sleep(Duration::from_millis(200));
            let r0 = cpu::threads_cpu_with_workers(&tids)?;
            let p0 = cpu::process_cpu()?;
            let h0 = cpu::tid_cpu(holder_tid)?;
            let t0 = Instant::now();
            std::thread::sleep(secs);
            let wall = t0.elapsed().as_secs_f64();
            let reactors = cpu::threads_cpu_with_workers(&tids)?
                .saturating_sub(r0)
                .as_secs_f64();
            let holder_cpu = (cpu::tid_cpu(holder_tid)? - h0).as_secs_f64();
            let process = (cpu::process_cpu()? - p0).as_secs_f64();
            Ok(IdleCpu {
                secs: wall,
                reactor_threads: tids.len(),
                reactor_pct_of_core: reactors / wall * 100.0,
                process_pct_of_core: (process - holder_cpu).max(0.0) / wall * 100.0,
            })
        });
    let _ = stop_tx.send(());
    let _ = holder.join();
    result
}
