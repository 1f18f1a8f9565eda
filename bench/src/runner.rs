//! Running a job.
//!
//! Each job thread builds its own monoio io_uring runtime, opens its own
//! [`IoChannel`] on it, and spawns `queue_depth` worker tasks. A worker owns
//! one preallocated [`IoBuf`] and loops: pick an offset, submit, await,
//! record the latency into the thread's histograms. Nothing is allocated per
//! I/O by the load generator (the channel's boxed future aside), nothing is
//! shared between job threads but one progress counter each, on its own
//! cache line. The calling thread waits, samples CPU times at the start and
//! end of the measured window, and draws the progress line.
//!
//! ```text
//!   caller ── spawn ──> job 0: runtime ─ channel ─ worker 0..qd ─> histograms
//!     │                 job 1: runtime ─ channel ─ worker 0..qd ─> histograms
//!     └─ gate ─ ramp ─ CPU sample ─ progress ... join ─ CPU sample ─ merge
//! ```

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cairn_bdev::{BdevError, BlockDevice, DeviceInfo, IoBuf, IoChannel};
use hdrhistogram::Histogram;

use crate::cpu;
use crate::result::{BenchResult, CpuStats, OpStats, VerifyStats};
use crate::rng::{splitmix64, Rng};
use crate::spec::{JobSpec, SpecError};
use crate::verify::{self, Mismatch};

/// How many errors and verify mismatches are kept as examples.
const KEEP_FIRST: usize = 8;
/// Largest latency the histograms hold (longer ones are clamped): 1 hour.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;
/// Largest verify map per job thread, in entries (4 bytes each).
const MAX_VERIFY_UNITS: u64 = 64 << 20;

/// Why a run could not be carried out. Failed I/Os are not errors of the
/// run: they are counted in the result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job description is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The job does not fit the device.
    #[error("job does not fit the device: {reason}")]
    Layout { reason: String },
    /// A job thread could not open its channel.
    #[error("job thread {job} could not open a channel: {source}")]
    Channel {
        job: u32,
        #[source]
        source: BdevError,
    },
    /// A job thread could not be set up.
    #[error("job thread {job}: {what}: {source}")]
    Setup {
        job: u32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The run was called off before this job thread started.
    #[error("run aborted before it started")]
    Aborted,
    /// A job thread panicked.
    #[error("job thread {job} panicked")]
    Panicked { job: u32 },
}

/// When to draw the live progress line on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Progress {
    /// Only when stderr is a terminal.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// How to run a job, beyond what it does.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Live progress line.
    pub progress: Progress,
    /// Also account the CPU time of this process (e.g. the engine).
    pub watch_pid: Option<u32>,
    /// Also account the CPU time of these threads of this process (e.g. the
    /// reactors of an engine running in-process) and of their io_uring
    /// workers, summed; ignored when `watch_pid` is set.
    pub watch_threads: Vec<u32>,
    /// Set to stop the run early (e.g. on Ctrl-C); results cover what ran.
    pub stop: Option<Arc<AtomicBool>>,
}

/// Runs `spec` against `dev` and returns what it measured. Blocks the calling
/// thread (never call it on a reactor) for `ramp + runtime`.
pub fn run(
    dev: Arc<dyn BlockDevice>,
    spec: &JobSpec,
    opts: &RunOptions,
) -> Result<BenchResult, RunError> {
    let mut r = run_interleaved(&[dev], spec, Duration::ZERO, opts)?;
    Ok(r.swap_remove(0))
}

/// Runs `spec` against each of `devs` in turn within one run: the run is
/// cut into slices of `slice`, and slice k (counted from the start of the
/// measured window) belongs to device `k % devs.len()`. When a slice ends,
/// a job thread stops issuing, lets its I/Os in flight complete, and only
/// then starts on the next device, so the devices never overlap. Returns
/// one result per device, each over its own turns: from the first I/O of a
/// turn to the last completion, with the CPU times of those turns (the
/// process's and the watched threads' are sampled by job thread 0 at its
/// switches, so they are exact with one job thread).
///
/// This is how two setups are compared on a machine whose speed drifts: a
/// drift slower than a few slices slows both alike, so the ratio of their
/// IOPS keeps only the difference between them.
pub fn run_interleaved(
    devs: &[Arc<dyn BlockDevice>],
    spec: &JobSpec,
    slice: Duration,
    opts: &RunOptions,
) -> Result<Vec<BenchResult>, RunError> {
    spec.validate()?;
    let Some(first) = devs.first() else {
        return Err(RunError::Layout {
            reason: "no device to run against".into(),
        });
    };
    let layout = Layout::new(&first.info(), spec)?;
    if devs.len() > 1 {
        if slice.is_zero() {
            return Err(RunError::Layout {
                reason: "interleaving devices needs a slice longer than zero".into(),
            });
        }
        if spec.verify {
            return Err(RunError::Layout {
                reason: "verify runs against one device at a time".into(),
            });
        }
        for d in &devs[1..] {
            if Layout::new(&d.info(), spec)? != layout {
                return Err(RunError::Layout {
                    reason: "interleaved devices differ in size or block size".into(),
                });
            }
        }
    }
    let slices = Slices::new(devs.len(), slice);
    let jobs = spec.jobs;
    let counters: Arc<[PaddedCounter]> = (0..jobs).map(|_| PaddedCounter::default()).collect();
    let gate = Arc::new(Gate::default());
    let nonce = run_nonce(spec.seed);

    let mut handles: Vec<JoinHandle<Result<JobOutcome, RunError>>> = Vec::new();
    for job in 0..jobs {
        let ctx = ThreadArgs {
            devs: devs.to_vec(),
            slices,
            watch: (job == 0 && devs.len() > 1).then(|| opts.clone()),
            spec: spec.clone(),
            layout,
            job,
            counters: counters.clone(),
            gate: gate.clone(),
            stop: opts.stop.clone(),
            nonce,
        };
        let h = std::thread::Builder::new()
            .name(format!("bench-{job}"))
            .spawn(move || job_thread(ctx));
        match h {
            Ok(h) => handles.push(h),
            Err(source) => {
                // Release the threads already started without running them.
                gate.open(None);
                for h in handles {
                    let _ = h.join();
                }
                return Err(RunError::Setup {
                    job,
                    what: "spawn thread",
                    source,
                });
            }
        }
    }
    while !gate.wait_ready(jobs as usize, Duration::from_millis(100)) {
        // A thread that ended before reporting ready died in its setup.
        if handles.iter().any(|h| h.is_finished()) {
            gate.open(None);
            let mut first = None;
            for (job, h) in handles.into_iter().enumerate() {
                let e = match h.join() {
                    Ok(Ok(_)) | Ok(Err(RunError::Aborted)) => continue,
                    Ok(Err(e)) => e,
                    Err(_) => RunError::Panicked { job: job as u32 },
                };
                first.get_or_insert(e);
            }
            return Err(first.unwrap_or(RunError::Aborted));
        }
    }
    let t0 = Instant::now();
    gate.open(Some(t0));
    let measure_from = t0 + spec.ramp;
    let total = spec.ramp + spec.runtime;

    let show = match opts.progress {
        Progress::Always => true,
        Progress::Never => false,
        Progress::Auto => std::io::stderr().is_terminal(),
    };
    let mut cpu_start: Option<CpuSample> = None;
    let mut last_draw = t0;
    let mut last_count = 0u64;
    let mut drawn = false;
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= measure_from {
            cpu_start = Some(sample_cpu(opts));
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if show && now.duration_since(last_draw) >= Duration::from_millis(500) {
            let count: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
            let rate = (count - last_count) as f64 / now.duration_since(last_draw).as_secs_f64();
            draw_progress(&spec.name, now - t0, total, rate, count);
            last_draw = now;
            last_count = count;
            drawn = true;
        }
        let mut nap = Duration::from_millis(20);
        if cpu_start.is_none() {
            nap = nap.min(measure_from.saturating_duration_since(now));
        }
        std::thread::sleep(nap);
    }
    let cpu_end = sample_cpu(opts);
    // A run that ended before its measured window measured nothing.
    let mut whole = CpuSplit::new(1);
    whole.add(0, &cpu_start.unwrap_or(cpu_end), &cpu_end);
    if drawn {
        eprintln!();
    }

    let mut outcomes = Vec::with_capacity(handles.len());
    let mut first_err = None;
    for (job, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(RunError::Panicked { job: job as u32 });
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(merge(spec, slices, measure_from, outcomes, whole, opts))
}

/// How a run divides its time between its devices.
#[derive(Debug, Clone, Copy)]
struct Slices {
    devices: usize,
    /// Nanoseconds per slice; 0 with one device.
    len_ns: u64,
}

impl Slices {
    fn new(devices: usize, slice: Duration) -> Slices {
        let len_ns = if devices > 1 {
            u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX).max(1)
        } else {
            0
        };
        Slices {
            devices: devices.max(1),
            len_ns,
        }
    }

    /// The device whose slice holds `t` (the ramp takes turns too).
    fn at(&self, measure_from: Instant, t: Instant) -> usize {
        if self.len_ns == 0 {
            return 0;
        }
        let k = if t >= measure_from {
            ((t - measure_from).as_nanos() / u128::from(self.len_ns)) as i64
        } else {
            -((measure_from - t)
                .as_nanos()
                .div_ceil(u128::from(self.len_ns)) as i64)
        };
        k.rem_euclid(self.devices as i64) as usize
    }
}

/// Process and watched CPU times at one instant.
type CpuSample = (Option<Duration>, Option<Duration>);

/// Process and watched CPU time per device.
#[derive(Debug, Clone)]
struct CpuSplit {
    process: Vec<Duration>,
    watched: Vec<Duration>,
    /// Whether the watched CPU could be read at all.
    watched_seen: bool,
}

impl CpuSplit {
    fn new(devices: usize) -> CpuSplit {
        CpuSplit {
            process: vec![Duration::ZERO; devices],
            watched: vec![Duration::ZERO; devices],
            watched_seen: false,
        }
    }

    /// Gives device `d` what was spent between samples `a` and `b`.
    fn add(&mut self, d: usize, a: &CpuSample, b: &CpuSample) {
        if let (Some(x), Some(y)) = (a.0, b.0) {
            self.process[d] += y.saturating_sub(x);
        }
        if let (Some(x), Some(y)) = (a.1, b.1) {
            self.watched[d] += y.saturating_sub(x);
            self.watched_seen = true;
        }
    }
}

fn draw_progress(name: &str, elapsed: Duration, total: Duration, iops: f64, count: u64) {
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{name}: {:>6.1}s/{:.1}s {:>10.0} IOPS {:>12} I/Os\x1b[K",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        iops,
        count
    );
    let _ = err.flush();
}

fn sample_cpu(opts: &RunOptions) -> CpuSample {
    let watched = match (opts.watch_pid, opts.watch_threads.as_slice()) {
        (Some(p), _) => cpu::pid_cpu(p).ok(),
        (None, []) => None,
        (None, tids) => cpu::threads_cpu_with_workers(tids).ok(),
    };
    (cpu::process_cpu().ok(), watched)
}

fn run_nonce(seed: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // 31 bits, never zero, so generations never look like zeros.
    (splitmix64(seed ^ t ^ u64::from(std::process::id())) & 0x7fff_ffff) | 1
}

/// Where a job's I/Os go, worked out once from the device and the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    dev_block: u64,
    /// Device blocks per I/O.
    blocks_per_io: u64,
    /// LBA of unit 0 of job 0.
    first_lba: u64,
    /// I/O-sized units per job thread.
    units_per_job: u64,
}

impl Layout {
    fn new(info: &DeviceInfo, spec: &JobSpec) -> Result<Layout, RunError> {
        let fail = |reason: String| Err(RunError::Layout { reason });
        let dev_block = u64::from(info.block_size);
        let bs = u64::from(spec.block_size);
        if dev_block == 0 || !bs.is_multiple_of(dev_block) {
            return fail(format!(
                "bs {bs} is not a multiple of the device block size {dev_block}"
            ));
        }
        if !spec.offset.is_multiple_of(dev_block) {
            return fail(format!(
                "offset {} is not a multiple of the device block size {dev_block}",
                spec.offset
            ));
        }
        let dev_size = info.size_bytes();
        if spec.offset >= dev_size {
            return fail(format!(
                "offset {} lies past the end of a {dev_size}-byte device",
                spec.offset
            ));
        }
        let size = match spec.size {
            Some(s) if s > dev_size - spec.offset => {
                return fail(format!(
                    "offset {} + size {s} exceeds the {dev_size}-byte device",
                    spec.offset
                ))
            }
            Some(s) => s,
            None => dev_size - spec.offset,
        };
        let units_per_job = size / bs / u64::from(spec.jobs);
        if units_per_job == 0 {
            return fail(format!(
                "a {size}-byte range holds fewer than one {bs}-byte I/O per job thread"
            ));
        }
        if spec.verify {
            if units_per_job < u64::from(spec.queue_depth) {
                return fail(format!(
                    "verify needs at least iodepth ({}) I/O-sized blocks per job thread, the range gives {units_per_job}",
                    spec.queue_depth
                ));
            }
            if units_per_job > MAX_VERIFY_UNITS {
                return fail(format!(
                    "verify tracks at most {MAX_VERIFY_UNITS} blocks per job thread; limit --size"
                ));
            }
        }
        Ok(Layout {
            dev_block,
            blocks_per_io: bs / dev_block,
            first_lba: spec.offset / dev_block,
            units_per_job,
        })
    }
}

#[derive(Default)]
#[repr(align(64))]
struct PaddedCounter(AtomicU64);

/// Starts every job thread at once, after all have set up, from one start
/// time that they and the caller share (interleaved devices switch in step).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    ready: usize,
    /// `Some(Some(start))` to run, `Some(None)` to abort.
    open: Option<Option<Instant>>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a job thread: reports it is ready, waits for the verdict:
    /// the start time, or `None` to abort.
    fn ready_and_wait(&self) -> Option<Instant> {
        let mut st = self.lock();
        st.ready += 1;
        self.cv.notify_all();
        loop {
            if let Some(go) = st.open {
                return go;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Called by the runner: waits up to `timeout` for `n` job threads to
    /// be ready, and says whether they are.
    fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |st| st.ready < n)
            .unwrap_or_else(|e| e.into_inner());
        st.ready >= n
    }

    fn open(&self, start: Option<Instant>) {
        self.lock().open = Some(start);
        self.cv.notify_all();
    }
}

struct ThreadArgs {
    devs: Vec<Arc<dyn BlockDevice>>,
    slices: Slices,
    /// What to sample at each switch between devices (job thread 0 only).
    watch: Option<RunOptions>,
    spec: JobSpec,
    layout: Layout,
    job: u32,
    counters: Arc<[PaddedCounter]>,
    gate: Arc<Gate>,
    stop: Option<Arc<AtomicBool>>,
    nonce: u64,
}

/// What one job thread hands back: one part per device.
struct JobOutcome {
    parts: Vec<Recorder>,
    /// This thread's CPU time per device over the measured window.
    thread_cpu: Vec<Duration>,
    /// With several devices: the time of the measured turns per device.
    busy: Vec<Duration>,
    /// With several devices, from job thread 0: the process's and the
    /// watched threads' CPU per device.
    shared_cpu: Option<CpuSplit>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

fn job_thread(args: ThreadArgs) -> Result<JobOutcome, RunError> {
    let job = args.job;
    let setup_err = |what, source| RunError::Setup { job, what, source };
    let pinned = match args.spec.cpus.as_slice() {
        [] => Ok(()),
        cpus => cpu::pin_current_thread(cpus[job as usize % cpus.len()]),
    };
    let entries = (args.spec.queue_depth * 2)
        .clamp(256, 32_768)
        .next_power_of_two();
    let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .uring_builder(cairn_engine::reactor::uring_builder())
        .enable_timer()
        .build();
    let mut rt = match (pinned, rt) {
        (Ok(()), Ok(rt)) => rt,
        (Err(e), _) => {
            args.gate.ready_and_wait();
            return Err(setup_err("pin to CPU", e));
        }
        (_, Err(e)) => {
            args.gate.ready_and_wait();
            return Err(setup_err("build io_uring runtime", e));
        }
    };
    let busy_poll = args.spec.busy_poll;
    rt.block_on(cairn_engine::reactor::polling(busy_poll, run_job(args)))
}

/// State shared by the workers of one job thread.
struct Job {
    /// One channel per device, in the run's order.
    chs: Vec<Box<dyn IoChannel>>,
    slices: Slices,
    read_pct: u8,
    random: bool,
    layout: Layout,
    /// First unit of this job's share of the range, in device LBAs.
    base_lba: u64,
    qd: u64,
    measure_from: Instant,
    stop_at: Option<Instant>,
    io_limit: Option<u64>,
    issued: Cell<u64>,
    stopped: Cell<bool>,
    continue_on_error: bool,
    external_stop: Option<Arc<AtomicBool>>,
    cursor: Cell<u64>,
    verify: Option<VerifyState>,
    counter: Arc<[PaddedCounter]>,
    job: usize,
    /// What was measured, per device.
    recs: Vec<RefCell<Recorder>>,
    yielder: Rc<Yielder>,
    /// With one device: this thread's CPU time when the measured window
    /// began, once it has.
    cpu_at_measure: Cell<Option<Option<Duration>>>,
    /// With several devices: whose turn it is.
    turn: RefCell<Turn>,
    /// What job thread 0 samples at its switches besides its own CPU time.
    watch: Option<RunOptions>,
}

/// Whose turn it is on a job thread that runs against several devices, and
/// what the turns so far measured.
struct Turn {
    dev: usize,
    /// When this turn began: it counts if that was in the measured window.
    began: Instant,
    in_flight: u32,
    /// Workers waiting for this turn's I/Os to drain.
    waiting: Vec<Waker>,
    last_completion: Instant,
    /// CPU times when this turn began.
    thread_cpu_at: Option<Duration>,
    shared_cpu_at: Option<CpuSample>,
    /// Per device, over the counted turns: their time, and this thread's CPU.
    busy: Vec<Duration>,
    thread_cpu: Vec<Duration>,
    /// Per device: the process's and the watched threads' CPU (job 0).
    shared_cpu: CpuSplit,
}

struct VerifyState {
    nonce: u64,
    /// Per unit: 0 = not written in this run, `UNKNOWN` = a write failed,
    /// else the write count of the last completed write.
    expected: RefCell<Vec<u32>>,
}

const UNKNOWN: u32 = u32::MAX;

struct Recorder {
    read: Histogram<u64>,
    write: Histogram<u64>,
    ramp_ios: u64,
    errors: u64,
    first_errors: Vec<String>,
    verify: VerifyStats,
    last_completion: Option<Instant>,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            read: new_histogram(),
            write: new_histogram(),
            ramp_ios: 0,
            errors: 0,
            first_errors: Vec::new(),
            verify: VerifyStats::default(),
            last_completion: None,
        }
    }
}

impl Job {
    fn should_stop(&self, now: Instant) -> bool {
        if self.stopped.get() {
            return true;
        }
        let stop = self.stop_at.is_some_and(|t| now >= t)
            || self.io_limit.is_some_and(|n| self.issued.get() >= n)
            || self
                .external_stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed));
        if stop {
            self.stopped.set(true);
        }
        stop
    }

    /// Picks the next unit for worker `w`; `k` is the worker's own cursor.
    fn next_unit(&self, rng: &mut Rng, w: u64, k: &mut u64) -> u64 {
        let units = self.layout.units_per_job;
        if self.verify.is_some() {
            // Worker w owns units w, w + qd, w + 2qd, ...: no two I/Os in
            // flight ever touch the same block.
            let owned = (units - w).div_ceil(self.qd);
            let i = if self.random {
                rng.below(owned)
            } else {
                let i = *k;
                *k = (*k + 1) % owned;
                i
            };
            w + i * self.qd
        } else if self.random {
            rng.below(units)
        } else {
            let u = self.cursor.get();
            self.cursor.set((u + 1) % units);
            u
        }
    }

    fn lba(&self, unit: u64) -> u64 {
        self.base_lba + unit * self.layout.blocks_per_io
    }

    fn generation(&self, count: u32) -> u64 {
        self.verify
            .as_ref()
            .map_or(0, |v| (v.nonce << 32) | u64::from(count))
    }

    fn record(
        &self,
        d: usize,
        measured: bool,
        is_read: bool,
        issued: Instant,
        done: Instant,
        ok: bool,
    ) {
        self.counter[self.job].0.fetch_add(1, Ordering::Relaxed);
        let mut rec = self.recs[d].borrow_mut();
        if !ok {
            return;
        }
        if !measured {
            rec.ramp_ios += 1;
            return;
        }
        if self.chs.len() == 1 && self.cpu_at_measure.get().is_none() {
            self.cpu_at_measure.set(Some(cpu::thread_cpu().ok()));
        }
        let ns = u64::try_from((done - issued).as_nanos()).unwrap_or(u64::MAX);
        let h = if is_read {
            &mut rec.read
        } else {
            &mut rec.write
        };
        h.saturating_record(ns.max(1));
        rec.last_completion = Some(done);
    }

    /// Waits until the device whose slice it is has this thread's turn,
    /// and counts one more I/O in flight in the turn. Returns the device and
    /// whether the turn is measured.
    fn take_turn(&self) -> impl Future<Output = (usize, bool)> + '_ {
        std::future::poll_fn(move |cx| {
            let want = self.slices.at(self.measure_from, Instant::now());
            let mut t = self.turn.borrow_mut();
            if t.dev != want {
                if t.in_flight > 0 {
                    t.waiting.push(cx.waker().clone());
                    return Poll::Pending;
                }
                self.switch(&mut t, want);
            }
            t.in_flight += 1;
            Poll::Ready((t.dev, t.began >= self.measure_from))
        })
    }

    /// Counts an I/O of the turn as done; the last one of a turn that is
    /// over lets the waiting workers start the next.
    fn end_io(&self, now: Instant) {
        let mut t = self.turn.borrow_mut();
        t.in_flight -= 1;
        t.last_completion = now;
        if t.in_flight == 0 {
            let waiting = std::mem::take(&mut t.waiting);
            drop(t);
            for w in waiting {
                w.wake();
            }
        }
    }

    /// Ends the current turn (nothing of it is in flight) and begins one on
    /// device `to`.
    fn switch(&self, t: &mut Turn, to: usize) {
        self.close_turn(t);
        t.dev = to;
        t.began = Instant::now();
        t.last_completion = t.began;
    }

    /// Books the current turn, if it counts, and samples the CPU times the
    /// next one starts from.
    fn close_turn(&self, t: &mut Turn) {
        let thread_cpu = cpu::thread_cpu().ok();
        let shared = self.watch.as_ref().map(sample_cpu);
        if t.began >= self.measure_from {
            let d = t.dev;
            t.busy[d] += t.last_completion.saturating_duration_since(t.began);
            if let (Some(a), Some(b)) = (t.thread_cpu_at, thread_cpu) {
                t.thread_cpu[d] += b.saturating_sub(a);
            }
            if let (Some(a), Some(b)) = (&t.shared_cpu_at, &shared) {
                t.shared_cpu.add(d, a, b);
            }
        }
        t.thread_cpu_at = thread_cpu;
        t.shared_cpu_at = shared;
    }

    fn record_error(&self, d: usize, is_read: bool, lba: u64, e: &BdevError) {
        let mut rec = self.recs[d].borrow_mut();
        rec.errors += 1;
        if rec.first_errors.len() < KEEP_FIRST {
            let op = if is_read { "read" } else { "write" };
            rec.first_errors.push(format!("{op} at lba {lba}: {e}"));
        }
        drop(rec);
        if !self.continue_on_error {
            self.stopped.set(true);
        }
    }

    fn check_read(&self, unit: u64, lba: u64, data: &[u8]) {
        let Some(v) = &self.verify else { return };
        let count = v.expected.borrow()[unit as usize];
        let expected = match count {
            UNKNOWN => None,
            0 => None,
            c => Some(self.generation(c)),
        };
        // Verify runs against one device.
        let mut rec = self.recs[0].borrow_mut();
        for (i, block) in data
            .chunks_exact(self.layout.dev_block as usize)
            .enumerate()
        {
            let this = lba + i as u64;
            // A failed write leaves either version; accept any valid tag.
            let r = if count == UNKNOWN {
                match verify::check_block(block, this) {
                    verify::BlockState::Bad(kind) => Err(Mismatch { lba: this, kind }),
                    verify::BlockState::Zeroed => Ok(false),
                    verify::BlockState::Tagged { .. } => Ok(true),
                }
            } else {
                verify::verify_block(block, this, expected)
            };
            match r {
                Ok(true) => rec.verify.blocks_checked += 1,
                Ok(false) => rec.verify.blocks_unwritten += 1,
                Err(m) => {
                    rec.verify.mismatches += 1;
                    if rec.verify.first_mismatches.len() < KEEP_FIRST {
                        rec.verify.first_mismatches.push(m);
                    }
                }
            }
        }
    }
}

async fn run_job(args: ThreadArgs) -> Result<JobOutcome, RunError> {
    let ThreadArgs {
        devs,
        slices,
        watch,
        spec,
        layout,
        job,
        counters,
        gate,
        stop,
        nonce,
    } = args;
    let chs: Result<Vec<_>, _> = devs.iter().map(|d| d.open_channel()).collect();
    let qd = u64::from(spec.queue_depth);
    let bs = spec.block_size as usize;
    // Buffers first, so that allocation is not timed.
    let mut fill = Rng::new(spec.seed ^ 0x5eed);
    let bufs: Vec<IoBuf> = (0..qd)
        .map(|_| {
            let mut b = IoBuf::zeroed(bs);
            for w in b.chunks_exact_mut(8) {
                w.copy_from_slice(&fill.next_u64().to_le_bytes());
            }
            b
        })
        .collect();
    let verify = spec.verify.then(|| VerifyState {
        nonce,
        expected: RefCell::new(vec![0; layout.units_per_job as usize]),
    });
    let go = gate.ready_and_wait();
    let chs = chs.map_err(|source| RunError::Channel { job, source })?;
    let Some(start) = go else {
        return Err(RunError::Aborted);
    };
    let measure_from = start + spec.ramp;
    let stop_at = if spec.runtime.is_zero() {
        None
    } else {
        Some(measure_from + spec.runtime)
    };
    let ctx = Rc::new(Job {
        recs: chs.iter().map(|_| RefCell::new(Recorder::new())).collect(),
        turn: RefCell::new(Turn {
            dev: slices.at(measure_from, start),
            began: start,
            in_flight: 0,
            waiting: Vec::new(),
            last_completion: start,
            thread_cpu_at: None,
            shared_cpu_at: None,
            busy: vec![Duration::ZERO; chs.len()],
            thread_cpu: vec![Duration::ZERO; chs.len()],
            shared_cpu: CpuSplit::new(chs.len()),
        }),
        watch,
        chs,
        slices,
        read_pct: spec.pattern.read_pct(),
        random: spec.pattern.is_random(),
        layout,
        base_lba: layout.first_lba + u64::from(job) * layout.units_per_job * layout.blocks_per_io,
        qd,
        measure_from,
        stop_at,
        io_limit: spec.io_limit,
        issued: Cell::new(0),
        stopped: Cell::new(false),
        continue_on_error: spec.continue_on_error,
        external_stop: stop,
        cursor: Cell::new(0),
        verify,
        counter: counters,
        job: job as usize,
        yielder: Rc::new(Yielder::default()),
        cpu_at_measure: Cell::new(None),
    });
    let helper = monoio::spawn(YieldHelper(ctx.yielder.clone()));

    // CPU time of this thread over the measured window: sampled now when
    // there is no ramp, else by the first worker to see the ramp end (a
    // timer task would starve while workers never let the reactor park).
    // With several devices, the turns sample it instead.
    if spec.ramp.is_zero() && ctx.chs.len() == 1 {
        ctx.cpu_at_measure.set(Some(cpu::thread_cpu().ok()));
    }

    let mut workers = Vec::with_capacity(bufs.len());
    for (w, buf) in bufs.into_iter().enumerate() {
        let seed = splitmix64(spec.seed ^ (u64::from(job) << 32) ^ w as u64);
        workers.push(monoio::spawn(worker(ctx.clone(), w as u64, buf, seed)));
    }
    for h in workers {
        h.await;
    }
    ctx.yielder.finish();
    helper.await;
    let end_cpu = cpu::thread_cpu().ok();
    let parts = ctx
        .recs
        .iter()
        .map(|r| r.replace(Recorder::new()))
        .collect();
    if ctx.chs.len() == 1 {
        // A run stopped before its ramp ended measured nothing.
        let start_cpu = ctx.cpu_at_measure.get().flatten();
        let thread_cpu = match (start_cpu, end_cpu) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        return Ok(JobOutcome {
            parts,
            thread_cpu: vec![thread_cpu],
            busy: Vec::new(),
            shared_cpu: None,
        });
    }
    let mut t = ctx.turn.borrow_mut();
    ctx.close_turn(&mut t);
    Ok(JobOutcome {
        parts,
        thread_cpu: std::mem::take(&mut t.thread_cpu),
        busy: std::mem::take(&mut t.busy),
        shared_cpu: ctx.watch.is_some().then(|| t.shared_cpu.clone()),
    })
}

async fn worker(ctx: Rc<Job>, w: u64, mut buf: IoBuf, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut k = 0u64;
    let mut now = Instant::now();
    let dev_block = ctx.layout.dev_block as usize;
    loop {
        if ctx.should_stop(now) {
            break;
        }
        let unit = ctx.next_unit(&mut rng, w, &mut k);
        let is_read = match ctx.read_pct {
            100 => true,
            0 => false,
            p => rng.below(100) < u64::from(p),
        };
        let lba = ctx.lba(unit);
        let mut count = 0u32;
        if !is_read {
            if let Some(v) = &ctx.verify {
                let last = v.expected.borrow()[unit as usize];
                count = match last {
                    UNKNOWN | 0 => 1,
                    c if c == UNKNOWN - 1 => 1,
                    c => c + 1,
                };
                verify::fill(&mut buf, lba, dev_block, ctx.generation(count));
            }
        }
        let (d, measured) = if ctx.chs.len() > 1 {
            ctx.take_turn().await
        } else {
            (0, true)
        };
        ctx.issued.set(ctx.issued.get() + 1);
        let issued = Instant::now();
        let measured = measured && issued >= ctx.measure_from;
        let ch = &ctx.chs[d];
        let mut io = Watched {
            fut: if is_read {
                ch.read(lba, buf)
            } else {
                ch.write(lba, buf, false)
            },
            pended: false,
        };
        let (r, b) = (&mut io).await;
        buf = b;
        now = Instant::now();
        if ctx.chs.len() > 1 {
            ctx.end_io(now);
        }
        ctx.record(d, measured, is_read, issued, now, r.is_ok());
        match r {
            Ok(()) if is_read => ctx.check_read(unit, lba, &buf),
            Ok(()) => {
                if let Some(v) = &ctx.verify {
                    v.expected.borrow_mut()[unit as usize] = count;
                }
            }
            Err(e) => {
                if !is_read {
                    if let Some(v) = &ctx.verify {
                        v.expected.borrow_mut()[unit as usize] = UNKNOWN;
                    }
                }
                ctx.record_error(d, is_read, lba, &e);
            }
        }
        if !io.pended {
            // The device answered without waiting (a RAM device): let the
            // other workers run, or this one would monopolise the thread.
            ctx.yielder.yield_now().await;
        }
    }
}

fn merge(
    spec: &JobSpec,
    slices: Slices,
    measure_from: Instant,
    outcomes: Vec<JobOutcome>,
    whole: CpuSplit,
    opts: &RunOptions,
) -> Vec<BenchResult> {
    let n = slices.devices;
    let threads = outcomes.len().max(1) as u32;
    (0..n)
        .map(|d| {
            let parts = outcomes.iter().map(|o| (&o.parts[d], o.thread_cpu[d]));
            let (secs, process, watched) = if n == 1 {
                // From the start of the measured window to the last
                // completion.
                let window = outcomes
                    .iter()
                    .filter_map(|o| o.parts[0].last_completion)
                    .map(|t| t.saturating_duration_since(measure_from))
                    .max()
                    .unwrap_or_default();
                let watched = whole.watched_seen.then_some(whole.watched[0]);
                (window, whole.process[0], watched)
            } else {
                // The job threads took their turns side by side: a device's
                // time is their mean.
                let busy: Duration = outcomes.iter().map(|o| o.busy[d]).sum();
                let shared = outcomes.first().and_then(|o| o.shared_cpu.as_ref());
                let process = shared.map_or(Duration::ZERO, |c| c.process[d]);
                let watched = shared.and_then(|c| c.watched_seen.then_some(c.watched[d]));
                (busy / threads, process, watched)
            };
            merge_device(spec, parts, secs.as_secs_f64(), process, watched, opts)
        })
        .collect()
}

/// One device's result from every job thread's part of it.
fn merge_device<'a>(
    spec: &JobSpec,
    parts: impl Iterator<Item = (&'a Recorder, Duration)>,
    secs: f64,
    process: Duration,
    watched: Option<Duration>,
    opts: &RunOptions,
) -> BenchResult {
    let mut read = new_histogram();
    let mut write = new_histogram();
    let mut ramp_ios = 0;
    let mut errors = 0;
    let mut first_errors = Vec::new();
    let mut verify = spec.verify.then(VerifyStats::default);
    let mut thread_cpu = Duration::ZERO;
    let mut ios_per_job = Vec::new();
    for (p, cpu) in parts {
        // Same bounds on every histogram: adding cannot fail.
        let _ = read.add(&p.read);
        let _ = write.add(&p.write);
        ios_per_job.push(p.read.len() + p.write.len());
        ramp_ios += p.ramp_ios;
        errors += p.errors;
        for e in &p.first_errors {
            if first_errors.len() < KEEP_FIRST {
                first_errors.push(e.clone());
            }
        }
        if let Some(acc) = verify.as_mut() {
            let v = &p.verify;
            acc.blocks_checked += v.blocks_checked;
            acc.blocks_unwritten += v.blocks_unwritten;
            acc.mismatches += v.mismatches;
            for m in &v.first_mismatches {
                if acc.first_mismatches.len() < KEEP_FIRST {
                    acc.first_mismatches.push(m.clone());
                }
            }
        }
        thread_cpu += cpu;
    }
    let bs = u64::from(spec.block_size);
    let mut all = new_histogram();
    let _ = all.add(&read);
    let _ = all.add(&write);
    let total = OpStats::new(&all, bs, secs);
    let ios = total.ios;
    let per_io = |d: Duration| {
        if ios == 0 {
            0.0
        } else {
            d.as_secs_f64() * 1e6 / ios as f64
        }
    };
    BenchResult {
        name: spec.name.clone(),
        spec: spec.clone(),
        elapsed_secs: secs,
        read: OpStats::new(&read, bs, secs),
        write: OpStats::new(&write, bs, secs),
        total,
        ramp_ios,
        ios_per_job,
        errors,
        first_errors,
        verify,
        cpu: CpuStats {
            job_threads_secs: thread_cpu.as_secs_f64(),
            process_secs: process.as_secs_f64(),
            watched_pid: opts.watch_pid,
            watched_threads: if opts.watch_pid.is_none() {
                opts.watch_threads.clone()
            } else {
                Vec::new()
            },
            watched_secs: watched.map(|d| d.as_secs_f64()),
            job_threads_us_per_io: per_io(thread_cpu),
            process_us_per_io: per_io(process),
            watched_us_per_io: watched.map(per_io),
        },
    }
}

/// Runs a future and notes whether it ever had to wait.
struct Watched<F> {
    fut: F,
    pended: bool,
}

impl<F: Future + Unpin> Future for &mut Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = Pin::new(&mut self.fut).poll(cx);
        if r.is_pending() {
            self.pended = true;
        }
        r
    }
}

/// Lets workers whose I/O completed without waiting give the others a turn.
///
/// monoio re-runs a task that wakes itself at the front of its run queue, so
/// a plain "wake and return Pending" yields to nobody. A yielding worker
/// instead parks its waker here and wakes a helper task, which runs after
/// everything already queued and then wakes the parked workers in order.
#[derive(Default)]
struct Yielder {
    parked: RefCell<Vec<Waker>>,
    helper: RefCell<Option<Waker>>,
    done: Cell<bool>,
}

impl Yielder {
    fn yield_now(&self) -> YieldNow<'_> {
        YieldNow {
            y: self,
            parked: false,
        }
    }

    /// Ends the helper task.
    fn finish(&self) {
        self.done.set(true);
        if let Some(w) = self.helper.borrow_mut().take() {
            w.wake();
        }
    }
}

struct YieldNow<'a> {
    y: &'a Yielder,
    parked: bool,
}

impl Future for YieldNow<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.parked {
            return Poll::Ready(());
        }
        self.parked = true;
        self.y.parked.borrow_mut().push(cx.waker().clone());
        let helper = self.y.helper.borrow_mut().take();
        if let Some(w) = helper {
            w.wake();
        }
        Poll::Pending
    }
}

/// The helper task of a [`Yielder`].
struct YieldHelper(Rc<Yielder>);

impl Future for YieldHelper {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let parked = std::mem::take(&mut *self.0.parked.borrow_mut());
        for w in parked {
            w.wake();
        }
        if self.0.done.get() {
            return Poll::Ready(());
        }
        *self.0.helper.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_take_turns_from_the_measured_window() {
        let ms = Duration::from_millis;
        let t0 = Instant::now() + ms(1000);
        let s = Slices::new(2, ms(20));
        assert_eq!(s.at(t0, t0), 0);
        assert_eq!(s.at(t0, t0 + ms(19)), 0);
        assert_eq!(s.at(t0, t0 + ms(20)), 1);
        assert_eq!(s.at(t0, t0 + ms(45)), 0);
        // The ramp takes turns too, ending on the last device.
        assert_eq!(s.at(t0, t0 - ms(1)), 1);
        assert_eq!(s.at(t0, t0 - ms(20)), 1);
        assert_eq!(s.at(t0, t0 - ms(21)), 0);
        let three = Slices::new(3, ms(10));
        assert_eq!(three.at(t0, t0 + ms(25)), 2);
        assert_eq!(three.at(t0, t0 + ms(31)), 0);
        assert_eq!(three.at(t0, t0 - ms(5)), 2);
        // One device has the whole run, whatever the slice.
        let one = Slices::new(1, ms(20));
        assert_eq!(one.at(t0, t0 + ms(35)), 0);
        assert_eq!(one.at(t0, t0 - ms(35)), 0);
    }
}
