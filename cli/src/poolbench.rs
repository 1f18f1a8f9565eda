//! `cairnctl bench pool`: what a pool replica costs against the raw file it
//! lives on, measured side by side by the same load generator.
//!
//! For each directory (a tmpfs and a disk by default) and each round, the
//! same 4 KiB random write and read jobs run against (1) a file used raw,
//! (2) a thick replica in a pool on a file of the same size in the same
//! place (every cluster allocated), and (3) a thin replica whose writes all
//! land on unallocated clusters (the first-write allocation cost). Setups
//! alternate within each round, and the report gives the median round.
//! First writes are measured as 1 MiB sequential writes that each allocate
//! one cluster, against the same writes to the raw file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_bdev::file::{FileDevice, FileOptions};
use cairn_bdev::BlockDevice;
use cairn_bench::{markdown_table, median_runs, BenchResult, JobSpec, Pattern, RunOptions};
use cairn_pool::{Pool, PoolCreate, ReplicaCreate};

/// What to measure.
#[derive(Debug, Clone)]
pub struct PoolBench {
    /// Directories to put the files in.
    pub dirs: Vec<PathBuf>,
    /// Bytes of the region each job uses (raw file and replicas alike).
    pub size: u64,
    pub runtime: Duration,
    pub iodepth: u32,
    pub rounds: usize,
}

/// The measured rows (medians) and the ratios.
pub struct PoolBenchReport {
    pub results: Vec<BenchResult>,
    pub table: String,
    pub ratios: Vec<String>,
}

fn job(name: String, pattern: Pattern, b: &PoolBench) -> JobSpec {
    JobSpec {
        name,
        pattern,
        block_size: 4096,
        queue_depth: b.iodepth,
        jobs: 1,
        runtime: b.runtime,
        size: Some(b.size),
        ..JobSpec::default()
    }
}

/// Sequential cluster-sized writes over the whole region, each once.
fn first_writes(name: String, b: &PoolBench) -> JobSpec {
    let cluster = u64::from(cairn_pool::DEFAULT_CLUSTER_SIZE);
    JobSpec {
        block_size: cairn_pool::DEFAULT_CLUSTER_SIZE,
        queue_depth: b.iodepth.min(8),
        io_limit: Some(b.size / cluster),
        runtime: Duration::from_secs(600),
        ..job(name, Pattern::SeqWrite, b)
    }
}

fn measure(dev: Arc<dyn BlockDevice>, spec: &JobSpec) -> anyhow::Result<BenchResult> {
    let r = cairn_bench::run(dev, spec, &RunOptions::default())
        .with_context(|| format!("running {}", spec.name))?;
    if !r.is_clean() {
        bail!(
            "{}: {} I/O errors: {:?}",
            spec.name,
            r.errors,
            r.first_errors
        );
    }
    Ok(r)
}

fn place(dir: &Path) -> String {
    let d = dir.display().to_string();
    if d.starts_with("/dev/shm") {
        format!("tmpfs {d}")
    } else {
        d
    }
}

/// One round in one directory: raw, thick replica, thin first writes.
fn round(dir: &Path, b: &PoolBench, out: &mut Vec<BenchResult>) -> anyhow::Result<()> {
    let raw_path = dir.join(format!("cairn-poolbench-raw-{}.img", std::process::id()));
    let pool_path = dir.join(format!("cairn-poolbench-pool-{}.img", std::process::id()));
    let label = place(dir);
    let result = (|| {
        let raw = FileDevice::create(&raw_path, b.size, FileOptions::default())?;
        let raw: Arc<dyn BlockDevice> = Arc::new(raw);
        let name = format!("raw file, {label}, 1m write once");
        out.push(measure(raw.clone(), &first_writes(name, b))?);
        for p in [Pattern::RandWrite, Pattern::RandRead] {
            out.push(measure(
                raw.clone(),
                &job(format!("raw file, {label}, {p}"), p, b),
            )?);
        }
        drop(raw);
        std::fs::remove_file(&raw_path).ok();

        // Room for two replicas of `size` plus metadata.
        let f = std::fs::File::create(&pool_path)?;
        f.set_len(2 * b.size + (64 << 20))?;
        drop(f);
        let pool = Pool::create(
            &pool_path,
            PoolCreate {
                name: "bench".into(),
                uuid: uuid::Uuid::new_v4(),
                cluster_size: cairn_pool::DEFAULT_CLUSTER_SIZE,
            },
        )?;
        let thick = pool.create_replica(ReplicaCreate {
            uuid: uuid::Uuid::new_v4(),
            name: "thick".into(),
            size: b.size,
            thin: false,
        })?;
        for p in [Pattern::RandWrite, Pattern::RandRead] {
            out.push(measure(
                thick.clone(),
                &job(format!("replica, {label}, {p}"), p, b),
            )?);
        }
        let thin = pool.create_replica(ReplicaCreate {
            uuid: uuid::Uuid::new_v4(),
            name: "thin".into(),
            size: b.size,
            thin: true,
        })?;
        let name = format!("replica, {label}, 1m write once (allocating)");
        out.push(measure(thin.clone(), &first_writes(name, b))?);
        drop((thick, thin));
        pool.destroy()?;
        anyhow::Ok(())
    })();
    std::fs::remove_file(&raw_path).ok();
    std::fs::remove_file(&pool_path).ok();
    result.with_context(|| format!("benchmarking in {}", dir.display()))
}

/// Runs every round and summarises.
pub fn run(b: &PoolBench) -> anyhow::Result<PoolBenchReport> {
    let mut all = Vec::new();
    for r in 0..b.rounds {
        for dir in &b.dirs {
            eprintln!("round {}/{}: {}", r + 1, b.rounds, dir.display());
            round(dir, b, &mut all)?;
        }
    }
    let results = median_runs(&all);
    let iops = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.total.iops)
    };
    let mut ratios = Vec::new();
    for dir in &b.dirs {
        let label = place(dir);
        for p in [Pattern::RandWrite, Pattern::RandRead] {
            if let (Some(rep), Some(raw)) = (
                iops(&format!("replica, {label}, {p}")),
                iops(&format!("raw file, {label}, {p}")),
            ) {
                ratios.push(format!(
                    "{label}, {p}: replica {:.0} IOPS = {:.1} % of raw {:.0} IOPS",
                    rep,
                    100.0 * rep / raw,
                    raw
                ));
            }
        }
        let lat = |name: &str| {
            results
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.total.latency.mean_us)
        };
        if let (Some(first), Some(raw)) = (
            lat(&format!("replica, {label}, 1m write once (allocating)")),
            lat(&format!("raw file, {label}, 1m write once")),
        ) {
            ratios.push(format!(
                "{label}, first write of a 1 MiB cluster (allocation): {first:.0} us mean \
                 against {raw:.0} us for the same write to the raw file"
            ));
        }
    }
    Ok(PoolBenchReport {
        table: markdown_table(&results),
        results,
        ratios,
    })
}
