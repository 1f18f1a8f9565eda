//! What a run measured.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;
use crate::verify::Mismatch;

/// Latency distribution, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
}

impl LatencyStats {
    /// Summarises a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyStats::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyStats {
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p99_9_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Throughput and latency of one kind of I/O (or of all of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    /// I/Os completed in the measured window.
    pub ios: u64,
    /// Bytes they moved.
    pub bytes: u64,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency: LatencyStats,
}

impl OpStats {
    pub(crate) fn new(h: &Histogram<u64>, bytes_per_io: u64, secs: f64) -> Self {
        let ios = h.len();
        let bytes = ios * bytes_per_io;
        let (iops, mib_per_sec) = if secs > 0.0 {
            (ios as f64 / secs, bytes as f64 / secs / (1u64 << 20) as f64)
        } else {
            (0.0, 0.0)
        };
        OpStats {
            ios,
            bytes,
            iops,
            mib_per_sec,
            latency: LatencyStats::from_histogram(h),
        }
    }
}

/// CPU time (user + system) spent during the measured window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuStats {
    /// The job threads only: the load generator itself, even when the
    /// device under test runs in the same process.
    pub job_threads_secs: f64,
    /// This whole process.
    pub process_secs: f64,
    /// The watched process (e.g. the engine), if one was given and readable.
    pub watched_pid: Option<u32>,
    /// Or the watched threads of this process (thread ids), summed.
    #[serde(default)]
    pub watched_threads: Vec<u32>,
    pub watched_secs: Option<f64>,
    /// Per measured I/O, in microseconds.
    pub job_threads_us_per_io: f64,
    pub process_us_per_io: f64,
    pub watched_us_per_io: Option<f64>,
}

/// Outcome of verify mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStats {
    /// Device blocks read back that held a valid tag.
    pub blocks_checked: u64,
    /// Device blocks read back as zeros, never written.
    pub blocks_unwritten: u64,
    /// Device blocks that failed verification.
    pub mismatches: u64,
    /// The first few failures.
    pub first_mismatches: Vec<Mismatch>,
}

/// Everything one run measured. Times cover the measured window only (after
/// the ramp), except `ramp_ios`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// The setup's label (the job name).
    pub name: String,
    /// What was run.
    pub spec: JobSpec,
    /// Length of the measured window, in seconds.
    pub elapsed_secs: f64,
    /// All I/Os together.
    pub total: OpStats,
    pub read: OpStats,
    pub write: OpStats,
    /// I/Os completed during the ramp, not counted above.
    pub ramp_ios: u64,
    /// I/Os per job thread in the measured window.
    pub ios_per_job: Vec<u64>,
    /// Failed I/Os (not counted in the statistics above).
    pub errors: u64,
    /// The first few errors, as text.
    pub first_errors: Vec<String>,
    /// Present when the job verified data.
    pub verify: Option<VerifyStats>,
    pub cpu: CpuStats,
}

impl BenchResult {
    /// Whether the run saw no I/O errors and no verify mismatches.
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.verify.as_ref().is_none_or(|v| v.mismatches == 0)
    }
}
