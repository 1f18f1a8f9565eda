//! Does a whole-device discard stall the other queues of its reactor?
//!
//! One NVMe-oF/TCP target with a single reactor exports two thick replicas
//! of one pool: a large one (10 GiB by default) that a host discards whole,
//! over and over, and a small one that another host reads at queue depth 1.
//! Both connections live on the same reactor. Each round measures the
//! reads' latency twice, once alone and once while the discards run (the
//! order alternating between rounds), so the two are compared side by
//! side on the same machine state; the report gives medians.
//!
//! A discard of a thick replica becomes a `fallocate` (file or RAM disk)
//! or `BLKDISCARD` (block device) on the pool's disk; such a call can take
//! from milliseconds to seconds, and it runs on the pool's blocking workers,
//! not on the reactor, so the reads should barely notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use cairn_bdev::BlockDevice;
use cairn_engine::target::{Target, TargetConfig};
use cairn_pool::{Pool, PoolCreate, ReplicaCreate};
use uuid::Uuid;

use crate::suite::cluster::{connect, export};
use crate::{run, JobSpec, Pattern, RunOptions};

/// What to measure.
#[derive(Debug, Clone)]
pub struct DiscardOptions {
    /// The pool's disk, as a URI (`malloc:///NAME?size_mb=N`, a path, ...).
    /// `None`: a RAM disk big enough for both replicas.
    pub disk: Option<String>,
    /// Size of the replica that is discarded.
    pub discard_size: u64,
    /// Size of the replica that is read.
    pub read_size: u64,
    /// Measured time of each read run.
    pub runtime: Duration,
    /// Rounds (each: reads alone, reads beside discards).
    pub rounds: u32,
}

/// One read run.
#[derive(Debug, Clone, Copy)]
pub struct ReadRun {
    pub with_discards: bool,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
    /// Whole-device discards completed during the run.
    pub discards: u64,
    /// Their mean duration.
    pub discard_ms: f64,
}

/// Every run, in order.
#[derive(Debug, Clone)]
pub struct DiscardReport {
    pub opts: DiscardOptions,
    pub runs: Vec<ReadRun>,
}

/// The median of `v`; NaN (shown as such) when there is none.
fn median(v: Vec<f64>) -> f64 {
    crate::suite::median(v).unwrap_or(f64::NAN)
}

impl DiscardReport {
    fn side(&self, with: bool) -> Vec<&ReadRun> {
        self.runs
            .iter()
            .filter(|r| r.with_discards == with)
            .collect()
    }

    /// Median p99 with discards over median p99 alone.
    pub fn p99_ratio(&self) -> f64 {
        let p99 = |with| median(self.side(with).iter().map(|r| r.p99_us).collect());
        p99(true) / p99(false)
    }

    /// A Markdown table: every run, then the medians and the ratio.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "QD1 4 KiB random reads on one replica while another replica of the same pool \
             ({} GiB, thick) is discarded whole, again and again; one reactor serves both.\n\n",
            self.opts.discard_size >> 30
        ));
        s.push_str("| run | discards | IOPS | p50 µs | p99 µs | p99.9 µs | max µs | discards done | mean discard ms |\n");
        s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for (i, r) in self.runs.iter().enumerate() {
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {:.1} |\n",
                i + 1,
                if r.with_discards { "yes" } else { "no" },
                r.iops,
                r.p50_us,
                r.p99_us,
                r.p99_9_us,
                r.max_us,
                r.discards,
                r.discard_ms
            ));
        }
        for with in [false, true] {
            let side = self.side(with);
            let m = |f: fn(&ReadRun) -> f64| median(side.iter().map(|r| f(r)).collect());
            s.push_str(&format!(
                "| median | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | | {:.1} |\n",
                if with { "yes" } else { "no" },
                m(|r| r.iops),
                m(|r| r.p50_us),
                m(|r| r.p99_us),
                m(|r| r.p99_9_us),
                m(|r| r.max_us),
                m(|r| r.discard_ms)
            ));
        }
        s.push_str(&format!(
            "\np99 with discards / p99 alone (medians): **{:.2}x** (target: within 2x)\n",
            self.p99_ratio()
        ));
        s
    }
}

/// Repeats whole-device discards of `dev` from its own thread until
/// stopped; counts them and their total time.
struct Discarder {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    nanos: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Discarder {
    fn start(dev: Arc<dyn BlockDevice>) -> Discarder {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let nanos = Arc::new(AtomicU64::new(0));
        let (s, d, n) = (stop.clone(), done.clone(), nanos.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .context("discard thread runtime")?;
            rt.block_on(async move {
                let ch = dev.open_channel().map_err(|e| anyhow!("{e}"))?;
                let blocks = dev.info().num_blocks;
                while !s.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    ch.deallocate(0, blocks)
                        .await
                        .map_err(|e| anyhow!("discard: {e}"))?;
                    n.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    d.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        });
        Discarder {
            stop,
            done,
            nanos,
            thread,
        }
    }

    /// Stops, and returns (discards, mean ms).
    fn finish(self) -> anyhow::Result<(u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the discard thread panicked"))??;
        let n = self.done.load(Ordering::Relaxed);
        let ms = self.nanos.load(Ordering::Relaxed) as f64 / 1e6 / n.max(1) as f64;
        Ok((n, ms))
    }
}

/// Runs the measurement.
pub fn discard_stall(opts: DiscardOptions) -> anyhow::Result<DiscardReport> {
    let target = Target::start(TargetConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        reactors: 1,
        ..TargetConfig::default()
    })
    .context("starting the target")?;
    let overhead = (opts.discard_size + opts.read_size) / 64 + (64 << 20);
    let name = format!("discard-stall-{}", std::process::id());
    let uri = opts.disk.clone().unwrap_or_else(|| {
        let mb = (opts.discard_size + opts.read_size + overhead).div_ceil(1 << 20);
        format!("malloc:///{name}?size_mb={mb}")
    });
    let disk = cairn_bdev::uri::DiskUri::parse(&uri)?;
    let path = disk.resolve()?;
    let pool = Pool::create(
        &path,
        PoolCreate {
            name: name.clone(),
            uuid: Uuid::new_v4(),
            cluster_size: cairn_pool::DEFAULT_CLUSTER_SIZE,
        },
    )
    .with_context(|| format!("creating a pool on {uri}"))?;
    let mut nqns = Vec::new();
    for (label, size) in [("discarded", opts.discard_size), ("read", opts.read_size)] {
        eprintln!("creating the thick {label} replica ({size} bytes)");
        let uuid = Uuid::new_v4();
        let replica: Arc<dyn BlockDevice> = pool
            .create_replica(ReplicaCreate {
                uuid,
                name: label.into(),
                size,
                thin: false,
            })
            .with_context(|| format!("creating the {label} replica"))?;
        let nqn = format!("nqn.2024-01.dev.cairn:replica:{uuid}");
        export(&target, &nqn, uuid, replica)?;
        nqns.push(nqn);
    }
    let addr = target.local_addr();
    let discarded: Arc<dyn BlockDevice> = Arc::new(connect(addr, &nqns[0], 1)?);
    let read: Arc<dyn BlockDevice> = Arc::new(connect(addr, &nqns[1], 1)?);
    let spec = JobSpec {
        name: "qd1-read".into(),
        pattern: Pattern::RandRead,
        block_size: 4096,
        queue_depth: 1,
        jobs: 1,
        runtime: opts.runtime,
        ramp: Duration::from_millis(200),
        ..JobSpec::default()
    };
    let mut runs = Vec::new();
    for round in 0..opts.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with in order {
            let discarder = with.then(|| Discarder::start(discarded.clone()));
            let r = run(read.clone(), &spec, &RunOptions::default());
            let (discards, discard_ms) = match discarder {
                Some(d) => d.finish()?,
                None => (0, 0.0),
            };
            let r = r?;
            if r.errors > 0 {
                return Err(anyhow!("read errors: {:?}", r.first_errors));
            }
            let lat = &r.read.latency;
            runs.push(ReadRun {
                with_discards: with,
                iops: r.read.iops,
                p50_us: lat.p50_us,
                p99_us: lat.p99_us,
                p99_9_us: lat.p99_9_us,
                max_us: lat.max_us,
                discards,
                discard_ms,
            });
            eprintln!(
                "round {} discards={with}: p99 {:.1} µs",
                round + 1,
                lat.p99_us
            );
        }
    }
    drop((discarded, read));
    target.shutdown();
    if disk.is_malloc() {
        cairn_bdev::malloc::remove(&name);
    }
    Ok(DiscardReport { opts, runs })
}
