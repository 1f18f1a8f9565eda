//! Cairn's load generator: a small fio for [`BlockDevice`]s.
//!
//! It drives any `Arc<dyn BlockDevice>` — a file or block device
//! ([`cairn_bdev::file::FileDevice`]), a RAM device, a remote NVMe-oF
//! namespace behind the engine's initiator — so it knows nothing of NVMe.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cairn_bdev::ram::RamDevice;
//! use cairn_bench::{run, markdown_table, JobSpec, RunOptions};
//!
//! let spec = JobSpec::from_args(["--rw", "randread", "--bs", "4k", "--iodepth", "32", "--runtime", "5s"])?;
//! let dev = Arc::new(RamDevice::new(4096, 1 << 18));
//! let result = run(dev, &spec, &RunOptions::default())?;
//! println!("{}", markdown_table(&[result]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Parts: [`spec`] (what to run, and the fio-like syntax), [`runner`] (job
//! threads on io_uring reactors), [`result`] and [`report`] (what was
//! measured, as Markdown or JSON), [`model`] (a device wrapper that behaves
//! like an SSD), [`verify`] (block tags), [`cpu`] (CPU accounting and
//! pinning), [`timer`] (precise sleeps on a reactor), [`suite`] (the headline
//! benchmark: Cairn's engine started in-process against its baselines).
//!
//! [`BlockDevice`]: cairn_bdev::BlockDevice

pub mod cpu;
pub mod discard;
pub mod model;
pub mod report;
pub mod result;
pub mod rng;
pub mod runner;
pub mod spec;
pub mod suite;
pub mod timer;
pub mod verify;

pub use model::{ModelDevice, ModelParams};
pub use report::{markdown_table, median_runs, to_json};
pub use result::{BenchResult, CpuStats, LatencyStats, OpStats, VerifyStats};
pub use runner::{run, run_interleaved, Progress, RunError, RunOptions};
pub use spec::{parse_duration, parse_size, JobSpec, Pattern, SpecError};
