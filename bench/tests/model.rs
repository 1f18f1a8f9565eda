//! The SSD model: its rate limit and latency hold, and waiting costs no CPU.
//! Timing tests here run one at a time; the bounds are generous because the
//! machine is shared.

use std::sync::{Arc, Mutex};

use cairn_bdev::ram::RamDevice;
use cairn_bdev::BlockDevice;
use std::time::Duration;

use cairn_bench::{
    markdown_table, run, run_interleaved, JobSpec, ModelDevice, ModelParams, Progress, RunOptions,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn quiet() -> RunOptions {
    RunOptions {
        progress: Progress::Never,
        ..RunOptions::default()
    }
}

fn model(params: &str) -> Arc<dyn BlockDevice> {
    let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(4096, 4096));
    Arc::new(ModelDevice::new(
        ram,
        params.parse::<ModelParams>().unwrap(),
    ))
}

#[test]
fn iops_limit_holds_across_job_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A burst allowance lets the model catch up after the machine delays a
    // thread, so the average holds even when the host is busy.
    let dev = model("lat=100us,iops=2000,burst=100");
    let spec = JobSpec::from_args([
        "--rw=randread",
        "--iodepth=8",
        "--numjobs=2",
        "--ramp=50ms",
        "--runtime=400ms",
    ])
    .unwrap();
    let r = run(dev, &spec, &quiet()).unwrap();
    eprint!("{}", markdown_table(std::slice::from_ref(&r)));
    assert_eq!(r.errors, 0);
    // Queue depth 16 at 100 µs could do 160K IOPS: the limit decides.
    assert!(
        (1200.0..2400.0).contains(&r.total.iops),
        "{} IOPS, limit 2000",
        r.total.iops
    );
    // Waiting sleeps in the kernel: the job threads use a small share of
    // the wall time (spinning would use 100 % of two threads).
    let busy = r.cpu.job_threads_secs / (2.0 * r.elapsed_secs);
    assert!(busy < 0.3, "job threads busy {:.0} %", busy * 100.0);
}

#[test]
fn bandwidth_limit_holds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 64 MiB/s of 64k I/Os = 1024 IOPS.
    let dev = model("bw=64m");
    let spec =
        JobSpec::from_args(["--rw=read", "--bs=64k", "--iodepth=4", "--runtime=300ms"]).unwrap();
    let r = run(dev, &spec, &quiet()).unwrap();
    eprint!("{}", markdown_table(std::slice::from_ref(&r)));
    assert!(
        (45.0..72.0).contains(&r.total.mib_per_sec),
        "{} MiB/s, limit 64",
        r.total.mib_per_sec
    );
}

#[test]
fn latency_is_modelled_below_a_millisecond() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = model("read_lat=200us,write_lat=50us");
    let spec = JobSpec::from_args(["--rw=randread", "--iodepth=1", "--runtime=200ms"]).unwrap();
    let r = run(dev.clone(), &spec, &quiet()).unwrap();
    eprint!("{}", markdown_table(std::slice::from_ref(&r)));
    let l = &r.total.latency;
    assert!(l.min_us >= 200.0, "{l:?}");
    // monoio's own timers would round every wait up to 1 ms.
    assert!(l.p50_us < 600.0, "{l:?}");
    assert!(r.total.iops > 1000.0, "{} IOPS", r.total.iops);

    let spec = JobSpec::from_args(["--rw=randwrite", "--iodepth=1", "--runtime=200ms"]).unwrap();
    let w = run(dev, &spec, &quiet()).unwrap();
    assert!(w.total.latency.min_us >= 50.0, "{:?}", w.total.latency);
    assert!(
        w.total.latency.p50_us < l.p50_us,
        "writes are faster than reads"
    );
}

#[test]
fn queue_depth_overlaps_latency() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 1 ms each, 8 in flight, no rate limit: about 8000 IOPS (at queue
    // depth 1 it would be 1000).
    let dev = model("lat=1ms");
    let spec = JobSpec::from_args(["--rw=randread", "--iodepth=8", "--runtime=300ms"]).unwrap();
    let r = run(dev, &spec, &quiet()).unwrap();
    eprint!("{}", markdown_table(std::slice::from_ref(&r)));
    assert!(
        (3000.0..8100.0).contains(&r.total.iops),
        "{} IOPS",
        r.total.iops
    );
    assert!(r.total.latency.min_us >= 1000.0);
}

#[test]
fn interleaved_devices_are_each_measured_over_their_own_slices() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Two devices with different rate limits, taking turns every 20 ms
    // across two job threads. Each must show its own limit over its half of
    // the run, not the blend of both over all of it.
    let slow = model("lat=100us,iops=2000,burst=2");
    let fast = model("lat=100us,iops=6000,burst=2");
    let spec = JobSpec::from_args([
        "--rw=randread",
        "--iodepth=8",
        "--numjobs=2",
        "--ramp=40ms",
        "--runtime=600ms",
    ])
    .unwrap();
    let r = run_interleaved(&[slow, fast], &spec, Duration::from_millis(20), &quiet()).unwrap();
    eprint!("{}", markdown_table(&r));
    assert_eq!(r.len(), 2);
    for x in &r {
        assert_eq!(x.errors, 0);
        assert_eq!(x.ios_per_job.len(), 2);
        assert!(x.elapsed_secs > 0.1, "{}", x.elapsed_secs);
    }
    // The turns never overlap: together they fit in the run.
    let both = r[0].elapsed_secs + r[1].elapsed_secs;
    assert!(both < 0.62, "{both} s of turns in a 600 ms run");
    let (s, f) = (r[0].total.iops, r[1].total.iops);
    assert!((1200.0..2400.0).contains(&s), "{s} IOPS, limit 2000");
    assert!((3600.0..7000.0).contains(&f), "{f} IOPS, limit 6000");
}

#[test]
fn interleaving_refuses_what_it_cannot_measure() {
    let a = model("lat=10us");
    let small: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(4096, 2048));
    let spec = JobSpec::from_args(["--rw=randread", "--runtime=50ms"]).unwrap();
    let slice = Duration::from_millis(10);
    let e = run_interleaved(&[a.clone(), small], &spec, slice, &quiet()).unwrap_err();
    assert!(e.to_string().contains("differ"), "{e}");
    let e = run_interleaved(&[a.clone(), a.clone()], &spec, Duration::ZERO, &quiet()).unwrap_err();
    assert!(e.to_string().contains("slice"), "{e}");
    let verify = JobSpec::from_args(["--rw=randrw", "--verify", "--runtime=50ms"]).unwrap();
    let e = run_interleaved(&[a.clone(), a.clone()], &verify, slice, &quiet()).unwrap_err();
    assert!(e.to_string().contains("verify"), "{e}");
    assert!(run_interleaved(&[], &spec, slice, &quiet()).is_err());
    // One device needs no slice: the same as `run`.
    let r = run_interleaved(&[a], &spec, Duration::ZERO, &quiet()).unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].total.ios > 0);
}
