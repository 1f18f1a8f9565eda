//! Short runs against real devices: a RAM device and a file in a tempdir.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_bdev::file::{FileDevice, FileOptions};
use cairn_bdev::ram::RamDevice;
use cairn_bdev::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};
use cairn_bench::verify::{check_block, BlockState, MismatchKind};
use cairn_bench::{
    markdown_table, report, run, BenchResult, JobSpec, Pattern, Progress, RunError, RunOptions,
};

fn spec(args: &[&str]) -> JobSpec {
    JobSpec::from_args(args).unwrap()
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: Progress::Never,
        ..RunOptions::default()
    }
}

/// Counts that must agree in any result.
fn assert_consistent(r: &BenchResult) {
    let bs = u64::from(r.spec.block_size);
    assert_eq!(r.total.ios, r.read.ios + r.write.ios);
    assert_eq!(r.total.ios, r.ios_per_job.iter().sum::<u64>());
    assert_eq!(r.ios_per_job.len(), r.spec.jobs as usize);
    assert_eq!(r.total.bytes, r.total.ios * bs);
    assert_eq!(r.read.bytes, r.read.ios * bs);
    if r.total.ios > 0 {
        let l = &r.total.latency;
        assert!(l.min_us <= l.p50_us && l.p50_us <= l.p99_us, "{l:?}");
        assert!(
            l.p99_us <= l.p99_9_us && l.p99_9_us <= l.max_us * 1.001,
            "{l:?}"
        );
        assert!(l.mean_us >= l.min_us && l.mean_us <= l.max_us, "{l:?}");
        let iops = r.total.ios as f64 / r.elapsed_secs;
        assert!((r.total.iops - iops).abs() < 1e-6 * iops.max(1.0));
    }
}

#[test]
fn ram_mixed_run_completes_with_consistent_counts() {
    let dev = Arc::new(RamDevice::new(4096, 4096));
    let s = spec(&[
        "--name=ram",
        "--rw=randrw",
        "--rwmixread=70",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--runtime=200ms",
    ]);
    let r = run(dev, &s, &quiet()).unwrap();
    assert_consistent(&r);
    assert!(r.is_clean(), "{:?}", r.first_errors);
    assert!(r.total.ios > 1000, "only {} I/Os", r.total.ios);
    assert!(r.ios_per_job.iter().all(|&n| n > 0));
    assert!(
        r.read.ios > r.write.ios,
        "70 % reads: {} vs {}",
        r.read.ios,
        r.write.ios
    );
    assert!(r.write.ios > 0);
    assert!((0.15..1.0).contains(&r.elapsed_secs), "{}", r.elapsed_secs);
    assert!(r.cpu.job_threads_secs > 0.0);
    assert!(r.cpu.process_secs >= r.cpu.job_threads_secs * 0.5);
    assert!(r.verify.is_none());

    // The table has a header, a rule and one row per setup, and the JSON
    // reads back to the same results.
    let table = markdown_table(&[r.clone(), r.clone()]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].contains("IOPS") && lines[0].contains("p99.9 µs"));
    assert!(lines[2].starts_with("| ram ") && lines[2].contains("randrw70 4k qd8x2"));
    let json = report::to_json(std::slice::from_ref(&r)).unwrap();
    let back = report::from_json(&json).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].spec, r.spec);
    assert_eq!(back[0].total.ios, r.total.ios);
    assert!((back[0].total.latency.mean_us - r.total.latency.mean_us).abs() < 1e-9);

    // Medians: three runs of "a" (IOPS 3, 1, 2) and one of "b".
    let with = |name: &str, iops: f64| {
        let mut x = r.clone();
        x.name = name.to_owned();
        x.total.iops = iops;
        x
    };
    let runs = [
        with("a", 3.0),
        with("b", 9.0),
        with("a", 1.0),
        with("a", 2.0),
    ];
    let med = cairn_bench::median_runs(&runs);
    assert_eq!(med.len(), 2);
    assert_eq!((med[0].name.as_str(), med[0].total.iops), ("a", 2.0));
    assert_eq!((med[1].name.as_str(), med[1].total.iops), ("b", 9.0));
}

#[test]
fn io_limit_stops_at_exactly_that_many_ios() {
    let dev = Arc::new(RamDevice::new(512, 2048));
    let s = spec(&[
        "--rw=write",
        "--bs=4k",
        "--iodepth=4",
        "--numjobs=2",
        "--number_ios=100",
        "--runtime=0",
    ]);
    let r = run(dev.clone(), &s, &quiet()).unwrap();
    assert_consistent(&r);
    assert_eq!(r.total.ios, 200);
    assert_eq!(r.ios_per_job, vec![100, 100]);
    assert_eq!(r.write.ios, 200);
    // Sequential writes by 2 job threads each cover the start of their half
    // of the device: 100 I/Os of 4k = 400 KiB from 0 and from 512 KiB.
    assert_eq!(dev.allocated_bytes(), 2 * 7 * 64 * 1024);
}

#[test]
fn ramp_is_not_measured() {
    let dev = Arc::new(RamDevice::new(4096, 1024));
    let s = spec(&[
        "--rw=randread",
        "--iodepth=4",
        "--ramp=100ms",
        "--runtime=200ms",
    ]);
    let r = run(dev, &s, &quiet()).unwrap();
    assert_consistent(&r);
    assert!(r.ramp_ios > 0, "{r:?}");
    assert!(r.total.ios > 0, "{r:?}");
    assert!((0.15..0.8).contains(&r.elapsed_secs), "{r:?}");
    // The job threads' CPU time covers the measured window only.
    assert!(r.cpu.job_threads_secs > 0.0, "{r:?}");
    assert!(r.cpu.job_threads_secs < r.elapsed_secs * 1.2, "{r:?}");
}

#[test]
fn file_device_random_writes_verify_in_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let dev =
        FileDevice::create(&dir.path().join("dev.img"), 4 << 20, FileOptions::default()).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let s = spec(&[
        "--name=file",
        "--rw=randrw",
        "--bs=8k",
        "--iodepth=8",
        "--runtime=250ms",
        "--verify",
    ]);
    let r = run(dev, &s, &quiet()).unwrap();
    assert_consistent(&r);
    assert!(r.total.ios > 50, "only {} I/Os", r.total.ios);
    let v = r.verify.as_ref().unwrap();
    assert_eq!(v.mismatches, 0, "{:?}", v.first_mismatches);
    assert!(v.blocks_checked > 0, "{v:?}");
    assert!(r.is_clean());
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn verify_reports_a_corrupted_block() {
    let ram = RamDevice::new(512, 2048); // 1 MiB
    let dev: Arc<dyn BlockDevice> = Arc::new(ram.clone());
    let w = spec(&[
        "--rw=write",
        "--bs=4k",
        "--iodepth=4",
        "--runtime=100ms",
        "--verify",
    ]);
    let r = run(dev.clone(), &w, &quiet()).unwrap();
    assert!(r.is_clean());
    assert!(r.total.ios >= 256, "every block written: {}", r.total.ios);

    // Flip one byte in the payload of block 77.
    let bad_lba = 77;
    block_on(async {
        let ch = ram.open_channel().unwrap();
        let (res, mut buf) = ch.read(bad_lba, IoBuf::zeroed(512)).await;
        res.unwrap();
        let state = check_block(&buf, bad_lba);
        assert!(
            matches!(state, BlockState::Tagged { .. }),
            "{state:?} {:?}",
            &buf[..32]
        );
        buf[200] ^= 1;
        let (res, _) = ch.write(bad_lba, buf, false).await;
        res.unwrap();
    });

    let rd = spec(&[
        "--rw=read",
        "--bs=4k",
        "--iodepth=4",
        "--runtime=100ms",
        "--verify",
    ]);
    let r = run(dev, &rd, &quiet()).unwrap();
    assert_eq!(r.errors, 0);
    let v = r.verify.unwrap();
    assert!(v.mismatches >= 1);
    assert!(v.blocks_checked > 2000, "{v:?}");
    assert_eq!(v.blocks_unwritten, 0);
    let m = &v.first_mismatches[0];
    assert_eq!(m.lba, bad_lba);
    assert!(
        matches!(
            m.kind,
            MismatchKind::CorruptPayload {
                byte_offset: 200,
                ..
            }
        ),
        "{m:?}"
    );
    // Every mismatch is that one block, read again on each pass.
    assert!(v.first_mismatches.iter().all(|m| m.lba == bad_lba));
}

/// A RAM device that silently drops writes to one LBA and can fail reads:
/// the faults verify mode and error accounting exist to catch.
struct FaultyDevice {
    ram: RamDevice,
    lost_lba: u64,
    fail_reads_after: Option<u64>,
    reads: Arc<AtomicU64>,
}

struct FaultyChannel {
    ram: Box<dyn IoChannel>,
    lost_lba: u64,
    fail_reads_after: Option<u64>,
    reads: Arc<AtomicU64>,
    _not_send: Cell<()>,
}

impl BlockDevice for FaultyDevice {
    fn info(&self) -> DeviceInfo {
        self.ram.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(FaultyChannel {
            ram: self.ram.open_channel()?,
            lost_lba: self.lost_lba,
            fail_reads_after: self.fail_reads_after,
            reads: self.reads.clone(),
            _not_send: Cell::new(()),
        }))
    }
}

impl IoChannel for FaultyChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        let n = self.reads.fetch_add(1, Ordering::Relaxed);
        if self.fail_reads_after.is_some_and(|after| n >= after) {
            let err = BdevError::Unavailable {
                reason: String::from("injected"),
            };
            return Box::pin(std::future::ready((Err(err), buf)));
        }
        self.ram.read(lba, buf)
    }
    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        let blocks = (buf.len() / 512) as u64;
        if (lba..lba + blocks).contains(&self.lost_lba) {
            return Box::pin(std::future::ready((Ok(()), buf)));
        }
        self.ram.write(lba, buf, fua)
    }
    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        self.ram.flush()
    }
    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.ram.write_zeroes(lba, blocks)
    }
    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.ram.deallocate(lba, blocks)
    }
}

#[test]
fn verify_catches_a_lost_write_within_a_run() {
    let dev = Arc::new(FaultyDevice {
        ram: RamDevice::new(512, 256),
        lost_lba: 33,
        fail_reads_after: None,
        reads: Arc::new(AtomicU64::new(0)),
    });
    let s = spec(&[
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=4",
        "--runtime=100ms",
        "--verify",
    ]);
    let r = run(dev, &s, &quiet()).unwrap();
    assert_eq!(r.errors, 0);
    let v = r.verify.unwrap();
    assert!(v.mismatches > 0, "{v:?}");
    // The whole 4k write holding block 33 was lost: blocks 32..40.
    assert!(
        v.first_mismatches.iter().all(|m| (32..40).contains(&m.lba)),
        "{v:?}"
    );
    assert!(v
        .first_mismatches
        .iter()
        .all(|m| matches!(m.kind, MismatchKind::MissingWrite { .. })));
}

#[test]
fn io_errors_are_counted_and_stop_the_job_unless_told_otherwise() {
    let faulty = |after| {
        Arc::new(FaultyDevice {
            ram: RamDevice::new(4096, 1024),
            lost_lba: u64::MAX,
            fail_reads_after: Some(after),
            reads: Arc::new(AtomicU64::new(0)),
        })
    };
    let s = spec(&["--rw=randread", "--iodepth=4", "--runtime=150ms"]);
    let r = run(faulty(50), &s, &quiet()).unwrap();
    assert_consistent(&r);
    assert_eq!(r.total.ios, 50);
    // Each of the 4 workers sees at most one error before the job stops.
    assert!((1..=4).contains(&r.errors), "{}", r.errors);
    assert!(
        r.first_errors[0].contains("injected"),
        "{:?}",
        r.first_errors
    );
    assert!(!r.is_clean());

    let mut s = s.clone();
    s.continue_on_error = true;
    s.runtime = Duration::from_millis(50);
    let r = run(faulty(10), &s, &quiet()).unwrap();
    assert_eq!(r.total.ios, 10);
    assert!(r.errors > 100, "{}", r.errors);
    assert_eq!(r.first_errors.len(), 8);
}

#[test]
fn jobs_that_do_not_fit_the_device_are_refused() {
    let dev: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(4096, 16));
    let cases: &[&[&str]] = &[
        &["--bs=2k"],                  // below the device block size
        &["--size=1m"],                // past the end
        &["--offset=64k"],             // at the end
        &["--bs=64k", "--numjobs=2"],  // less than one I/O per job
        &["--verify", "--iodepth=32"], // fewer blocks than workers
    ];
    for args in cases {
        let e = run(dev.clone(), &spec(args), &quiet()).unwrap_err();
        assert!(matches!(e, RunError::Layout { .. }), "{args:?}: {e}");
    }
    let bad = JobSpec {
        queue_depth: 0,
        ..JobSpec::default()
    };
    assert!(matches!(run(dev, &bad, &quiet()), Err(RunError::Spec(_))));
}

#[test]
fn pinned_jobs_with_progress_and_a_watched_pid() {
    let dev = Arc::new(RamDevice::new(4096, 1024));
    let mut s = spec(&[
        "--rw=randread",
        "--iodepth=2",
        "--runtime=120ms",
        "--cpus=0",
    ]);
    s.pattern = Pattern::RandRead;
    let opts = RunOptions {
        progress: Progress::Always,
        watch_pid: Some(std::process::id()),
        stop: None,
        ..RunOptions::default()
    };
    let r = run(dev, &s, &opts).unwrap();
    assert!(r.total.ios > 0);
    assert_eq!(r.cpu.watched_pid, Some(std::process::id()));
    assert!(r.cpu.watched_secs.is_some());
    assert!(r.cpu.watched_us_per_io.is_some());
}

#[test]
fn a_stop_flag_ends_the_run_early() {
    let dev = Arc::new(RamDevice::new(4096, 1024));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        flag.store(true, Ordering::Relaxed);
    });
    let s = spec(&["--rw=randread", "--runtime=30s"]);
    let start = std::time::Instant::now();
    let r = run(
        dev,
        &s,
        &RunOptions {
            progress: Progress::Never,
            watch_pid: None,
            stop: Some(stop),
            ..RunOptions::default()
        },
    )
    .unwrap();
    t.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(r.total.ios > 0);
}
