//! `cairn-bench`: runs fio-like jobs against a file, a block device or a RAM
//! disk, optionally behind the SSD model, and prints a Markdown table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use cairn_bdev::file::{FileDevice, FileOptions};
use cairn_bdev::ram::RamDevice;
use cairn_bdev::BlockDevice;
use cairn_bench::spec::{format_size, parse_count, parse_cpu_list, parse_duration};
use cairn_bench::suite::{export_setups, run_suite, Job, Setup, SuiteOptions};
use cairn_bench::{
    markdown_table, parse_size, report, run, JobSpec, ModelDevice, ModelParams, Pattern, Progress,
    RunOptions,
};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};

const USAGE: &str = "\
usage: cairn-bench (--filename PATH | --ram SIZE | --nvmf HOST:PORT --nqn NQN) [options]
       cairn-bench suite [--quick] [--out DIR] [suite options]   (see: cairn-bench suite --help)
       cairn-bench serve [options]   the suite's engine setups for outside initiators (serve --help)
       cairn-bench discard-stall [--size 10g] [--read-size 64m] [--runtime 3s] [--rounds 3] [--disk URI]
                      QD1 reads on one replica while another of the same pool
                      and reactor is discarded whole (p99 side by side)

target:
  --filename PATH     file or block device (a missing file is created with --size)
  --ram SIZE          a RAM disk of SIZE instead (e.g. 1g)
  --nvmf HOST:PORT    a remote NVMe-oF/TCP namespace, through Cairn's initiator
  --nqn NQN           its subsystem NQN (with --nvmf)
  --hostnqn NQN       host NQN to connect as (with --nvmf)
  --nsid N            namespace id (with --nvmf; default 1)
  --queues N          I/O queues to ask for (with --nvmf; default: numjobs)
  --hdr-digest, --data-digest   NVMe/TCP digests (with --nvmf)
  --lba SIZE          logical block size of the target: 512 (default) or 4k
  --buffered          do not use O_DIRECT
  --file-io MODE      how the file is driven: auto (default: inline copies on
                      tmpfs, io_uring elsewhere), uring, or inline
  --model PARAMS      put the SSD model in front: e.g. nvme, or
                      read_lat=80us,write_lat=20us,iops=200k,bw=2g,burst=32

job (fio names; sizes 4k/1m/2g, durations 500ms/10s/1m):
  --rw PATTERN[,PATTERN...]  randread randwrite randrw read write (one row each)
  --rwmixread PCT     reads in randrw (default 50)
  --bs SIZE           bytes per I/O (default 4k)
  --iodepth N         I/Os in flight per job thread (default 32)
  --numjobs N         job threads (default 1)
  --runtime TIME      measured time (default 10s)
  --ramp_time TIME    unmeasured warm-up first
  --offset SIZE, --size SIZE   byte range to use (default: whole target)
  --number_ios N      stop each job thread after N I/Os
  --verify            tag written blocks, check read ones
  --cpus_allowed LIST pin job threads, e.g. 0 or 0-1
  --continue_on_error keep going after I/O errors
  --busy_poll TIME    keep polling this long after network activity before
                      sleeping (default 50us; 0 sleeps at once, as an
                      interrupt-driven host would)
  --name LABEL        row label

output:
  --json              print JSON instead of the table
  --json-out PATH     also write JSON to PATH
  --progress / --no-progress   live line on stderr (default: when a terminal)
  --watch-pid PID     also measure the CPU time of PID (e.g. the engine)
";

/// Set by SIGINT: the run stops early and reports what it measured.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // An atomic store is async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_sigint() {
    // SAFETY: sigaction is plain data, for which all-zero bytes are valid
    // (an empty mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
    // A second Ctrl-C kills the process as usual.
    sa.sa_flags = libc::SA_RESETHAND;
    // SAFETY: the handler only stores to an atomic, which is async-signal-
    // safe; `sa` is a live, initialised sigaction.
    unsafe { libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) };
}

#[derive(Default)]
struct Args {
    filename: Option<PathBuf>,
    ram: Option<u64>,
    nvmf: Option<String>,
    nqn: Option<String>,
    hostnqn: Option<String>,
    nsid: Option<u32>,
    queues: Option<u16>,
    hdr_digest: bool,
    data_digest: bool,
    lba: Option<u64>,
    buffered: bool,
    file_io: cairn_bdev::file::IoMode,
    model: Option<ModelParams>,
    patterns: Vec<String>,
    spec: JobSpec,
    json: bool,
    json_out: Option<PathBuf>,
    progress: Progress,
    watch_pid: Option<u32>,
}

fn parse_args(raw: Vec<String>) -> anyhow::Result<Option<Args>> {
    let mut a = Args::default();
    let mut i = 0;
    while i < raw.len() {
        let arg = &raw[i];
        i += 1;
        if !arg.starts_with("--") {
            bail!("unexpected argument {arg:?}\n\n{USAGE}");
        }
        let (key, inline) = match arg[2..].split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (arg[2..].to_owned(), None),
        };
        match key.as_str() {
            "help" | "h" => return Ok(None),
            "json" => a.json = true,
            "buffered" => a.buffered = true,
            "hdr-digest" => a.hdr_digest = true,
            "data-digest" => a.data_digest = true,
            "progress" => a.progress = Progress::Always,
            "no-progress" => a.progress = Progress::Never,
            _ if JobSpec::is_flag(&key) => {
                let value = match inline {
                    Some(v) => Some(v),
                    None => match raw.get(i).map(String::as_str) {
                        Some("0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off") => {
                            i += 1;
                            raw.get(i - 1).cloned()
                        }
                        _ => None,
                    },
                };
                a.spec.set(&key, value.as_deref())?;
            }
            _ => {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        let v = raw
                            .get(i)
                            .with_context(|| format!("--{key} needs a value"))?
                            .clone();
                        i += 1;
                        v
                    }
                };
                match key.as_str() {
                    "filename" => a.filename = Some(PathBuf::from(value)),
                    "file-io" => a.file_io = value.parse().map_err(anyhow::Error::msg)?,
                    "ram" => a.ram = Some(parse_size(&value)?),
                    "nvmf" => a.nvmf = Some(value),
                    "nqn" => a.nqn = Some(value),
                    "hostnqn" => a.hostnqn = Some(value),
                    "nsid" => a.nsid = Some(u32::try_from(parse_count(&key, &value)?)?),
                    "queues" => a.queues = Some(u16::try_from(parse_count(&key, &value)?)?),
                    "lba" => a.lba = Some(parse_size(&value)?),
                    "model" => a.model = Some(value.parse()?),
                    "json-out" => a.json_out = Some(PathBuf::from(value)),
                    "watch-pid" => {
                        a.watch_pid = Some(u32::try_from(parse_count(&key, &value)?)?);
                    }
                    "rw" | "readwrite" => {
                        for p in value.split(',') {
                            // Checked now, applied per run.
                            p.parse::<Pattern>()?;
                            a.patterns.push(p.to_owned());
                        }
                    }
                    k if JobSpec::is_option(k) => a.spec.set(k, Some(&value))?,
                    k => bail!("unknown option --{k}\n\n{USAGE}"),
                }
            }
        }
    }
    Ok(Some(a))
}

fn open_target(a: &Args) -> anyhow::Result<(Arc<dyn BlockDevice>, String)> {
    let block_size = match a.lba {
        None | Some(512) => 512,
        Some(4096) => 4096,
        Some(n) => bail!("--lba must be 512 or 4k, not {n}"),
    };
    if let Some(hostport) = &a.nvmf {
        if a.filename.is_some() || a.ram.is_some() {
            bail!("give one of --filename, --ram and --nvmf");
        }
        return open_nvmf(a, hostport);
    }
    if a.nqn.is_some() {
        bail!("--nqn goes with --nvmf");
    }
    let (dev, what): (Arc<dyn BlockDevice>, String) = match (&a.filename, a.ram) {
        (Some(_), Some(_)) => bail!("give --filename or --ram, not both"),
        (None, None) => bail!("no target: give --filename PATH or --ram SIZE\n\n{USAGE}"),
        (None, Some(size)) => {
            let dev = RamDevice::new(block_size, size / u64::from(block_size));
            (Arc::new(dev), format!("RAM disk of {}", format_size(size)))
        }
        (Some(path), None) => {
            let opts = FileOptions {
                block_size,
                direct: !a.buffered,
                io: a.file_io,
            };
            let dev = if path.exists() {
                FileDevice::open(path, opts)
            } else {
                let size = a.spec.size.with_context(|| {
                    format!(
                        "{} does not exist; give --size to create it",
                        path.display()
                    )
                })?;
                FileDevice::create(path, a.spec.offset + size, opts)
            }
            .with_context(|| format!("opening {}", path.display()))?;
            let what = format!(
                "{} ({}{}{})",
                path.display(),
                format_size(dev.info().size_bytes()),
                if dev.is_direct() {
                    ", O_DIRECT"
                } else {
                    ", buffered"
                },
                if dev.copies_inline() {
                    ", inline copies"
                } else {
                    ", io_uring"
                }
            );
            (Arc::new(dev), what)
        }
    };
    match &a.model {
        Some(p) => {
            let what = format!("{what} behind the SSD model [{p}]");
            Ok((Arc::new(ModelDevice::new(dev, p.clone())), what))
        }
        None => Ok((dev, what)),
    }
}

/// Connects to a remote namespace through the engine's initiator.
fn open_nvmf(a: &Args, hostport: &str) -> anyhow::Result<(Arc<dyn BlockDevice>, String)> {
    use std::net::ToSocketAddrs;
    let nqn = a.nqn.as_deref().context("--nvmf needs --nqn")?;
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport:?} (HOST:PORT)"))?
        .next()
        .with_context(|| format!("{hostport:?} resolves to no address"))?;
    let hostnqn = a.hostnqn.clone().unwrap_or_else(|| {
        format!(
            "nqn.2014-08.org.nvmexpress:uuid:{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"cairn-bench")
        )
    });
    let mut o = InitiatorOptions::new(addr, nqn, &hostnqn);
    o.nsid = a.nsid.unwrap_or(1);
    o.io_queues = a
        .queues
        .unwrap_or_else(|| u16::try_from(a.spec.jobs).unwrap_or(u16::MAX))
        .max(1);
    o.queue_depth = o
        .queue_depth
        .max(u16::try_from(a.spec.queue_depth + 1).unwrap_or(u16::MAX));
    o.header_digest = a.hdr_digest;
    o.data_digest = a.data_digest;
    let dev = NvmfDevice::connect(o).with_context(|| format!("connecting to {nqn} at {addr}"))?;
    let info = dev.info();
    let what = format!(
        "{nqn} at {addr} (nsid {}, {}, {}-byte blocks, {} I/O queues{}{})",
        a.nsid.unwrap_or(1),
        format_size(info.size_bytes()),
        info.block_size,
        dev.granted_queues(),
        if a.hdr_digest { ", header digest" } else { "" },
        if a.data_digest { ", data digest" } else { "" },
    );
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    match &a.model {
        Some(p) => Ok((
            Arc::new(ModelDevice::new(dev, p.clone())),
            format!("{what} behind the SSD model [{p}]"),
        )),
        None => Ok((dev, what)),
    }
}

/// `cairn-bench discard-stall`: see [`cairn_bench::discard`].
fn discard_main(args: &[String]) -> anyhow::Result<ExitCode> {
    let mut o = cairn_bench::discard::DiscardOptions {
        disk: None,
        discard_size: 10 << 30,
        read_size: 64 << 20,
        runtime: std::time::Duration::from_secs(3),
        rounds: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value"))
                .map(String::as_str)
        };
        match flag.as_str() {
            "--size" => o.discard_size = parse_size(value()?)?,
            "--read-size" => o.read_size = parse_size(value()?)?,
            "--runtime" => o.runtime = parse_duration(value()?)?,
            "--rounds" => {
                o.rounds = u32::try_from(parse_count("--rounds", value()?)?)
                    .context("--rounds is too large")?
            }
            "--disk" => o.disk = Some(value()?.to_owned()),
            other => bail!("discard-stall: unknown option {other}"),
        }
    }
    if o.rounds == 0 {
        bail!("discard-stall: --rounds must be at least 1");
    }
    let report = cairn_bench::discard::discard_stall(o)?;
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("suite") {
        return suite_main(raw[1..].to_vec(), false);
    }
    if raw.first().map(String::as_str) == Some("serve") {
        return suite_main(raw[1..].to_vec(), true);
    }
    if raw.first().map(String::as_str) == Some("discard-stall") {
        return discard_main(&raw[1..]);
    }
    let Some(args) = parse_args(raw)? else {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    };
    args.spec.validate()?;
    let (dev, what) = open_target(&args)?;
    eprintln!("target: {what}");
    install_sigint();
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        progress: args.progress,
        watch_pid: args.watch_pid,
        stop: Some(stop.clone()),
        ..RunOptions::default()
    };
    // Forward Ctrl-C to the run's stop flag.
    let watcher_stop = stop.clone();
    let done = Arc::new(AtomicBool::new(false));
    let watcher_done = done.clone();
    let watcher = std::thread::spawn(move || {
        while !watcher_done.load(Ordering::Relaxed) {
            if INTERRUPTED.load(Ordering::Relaxed) {
                watcher_stop.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });

    let patterns = if args.patterns.is_empty() {
        vec![args.spec.pattern.to_string()]
    } else {
        args.patterns.clone()
    };
    let mut results = Vec::new();
    for p in &patterns {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        let mut spec = args.spec.clone();
        spec.set("rw", Some(p))?;
        if patterns.len() > 1 || spec.name == JobSpec::default().name {
            spec.name = if spec.name == JobSpec::default().name {
                p.clone()
            } else {
                format!("{} {p}", spec.name)
            };
        }
        results.push(run(dev.clone(), &spec, &opts)?);
    }
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();

    if let Some(path) = &args.json_out {
        std::fs::write(path, report::to_json(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", report::to_json(&results)?);
    } else {
        print!("{}", markdown_table(&results));
    }
    let mut clean = true;
    for r in &results {
        for e in &r.first_errors {
            eprintln!("{}: error: {e}", r.name);
        }
        if let Some(v) = &r.verify {
            for m in &v.first_mismatches {
                eprintln!("{}: verify: {m}", r.name);
            }
        }
        clean &= r.is_clean();
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

const SUITE_USAGE: &str = "\
usage: cairn-bench suite [--quick] [--out DIR] [options]

Starts Cairn's NVMe-oF targets, pools, replicas and nexuses in this process
(nodes on 127.0.0.1, .2, .3) and runs 4 KiB randread, randwrite, randrw at
QD64 and randread at QD1 against each setup and the raw backing devices;
writes suite.md, suite.json and suite.png into DIR.

  --quick             tiny runs, one round: checks the suite works (CI)
  --out DIR           output folder (default results/suite-UNIXTIME)
  --rounds N          rounds, alternating the setups (full: 3)
  --runtime TIME      measured time per run (full: 3s, quick: 300ms)
  --ramp TIME         warm-up per run (full: 500ms, quick: 50ms)
  --numjobs N         load generator threads of the QD64 jobs (default 1)
  --iodepth N         queue depth of the QD64 jobs (default 64)
  --size SIZE         bytes per device and replica (full: 512m, quick: 32m)
  --model PARAMS      the SSD model (default nvme,iops=20k; see cairn-bench --help)
  --setups LIST       comma-separated, from: ram shm-file disk-odirect model ram-nvmf replica
                      replica-model nexus-1 nexus-2 nexus-3 nexus-1-model
                      nexus-2-model nexus-3-model
  --jobs LIST         comma-separated, from: randread randwrite randrw qd1-read qd1-sleep
                      (default: all)
  --slice TIME        turn length when two setups are compared taking turns
                      within each run (replica vs itself and vs nexus-1,
                      where both ran; default 20ms; 0 skips them)
  --engine-cpus LIST  CPUs of every engine reactor (default 0 on 2+ CPUs)
  --engine-busy-poll TIME  how long reactors poll after network activity
                      (default 50us; 0: they sleep at once)
  --bench-cpus LIST   CPUs of the load generator (default 1 on 2+ CPUs)
  --disk-dir DIR      where the O_DIRECT disk file goes (default /var/tmp)
  --shm-dir DIR       where the tmpfs file and pools go (default /dev/shm)
  --idle TIME         how long to measure the idle engine (full: 5s)
  --progress / --no-progress
";

/// `serve`: what `suite` starts of the engine, exported until SIGINT,
/// SIGTERM or the end of standard input, for fio and the kernel initiator
/// (bench/vm-fio.sh).
const SERVE_USAGE: &str = "\
usage: cairn-bench serve [--setups LIST] [--size SIZE] [--model PARAMS] [--engine-cpus LIST]

Starts the suite's engine setups in this process and prints one line per
setup, `export SETUP HOST:PORT NQN`, then `ready`; runs until SIGINT, SIGTERM
or the end of standard input. Options as for `cairn-bench suite`
(default setups: replica nexus-1 nexus-2 nexus-3, 256m each).
";

fn serve(o: &SuiteOptions) -> anyhow::Result<ExitCode> {
    install_sigint();
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe { libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t) };
    let (cluster, exports) = export_setups(o)?;
    for e in &exports {
        println!("export {} {} {}", e.setup, e.addr, e.nqn);
    }
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let eof = Arc::new(AtomicBool::new(false));
    let eof2 = eof.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        eof2.store(true, Ordering::Relaxed);
    });
    while !INTERRUPTED.load(Ordering::Relaxed) && !eof.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("cairn-bench serve: stopping");
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}

fn suite_main(raw: Vec<String>, serving: bool) -> anyhow::Result<ExitCode> {
    let quick = raw.iter().any(|a| a == "--quick");
    let mut o = SuiteOptions::new(quick);
    if serving {
        o.setups = vec![
            Setup::Replica,
            Setup::Nexus(1),
            Setup::Nexus(2),
            Setup::Nexus(3),
        ];
        o.size = 256 << 20;
    }
    let usage = if serving { SERVE_USAGE } else { SUITE_USAGE };
    let mut i = 0;
    while i < raw.len() {
        let arg = raw[i].clone();
        i += 1;
        let (key, inline) = match arg.strip_prefix("--").map(|k| k.split_once('=')) {
            Some(Some((k, v))) => (k.to_owned(), Some(v.to_owned())),
            Some(None) => (arg[2..].to_owned(), None),
            None => bail!("unexpected argument {arg:?}\n\n{usage}"),
        };
        match key.as_str() {
            "help" | "h" => {
                print!("{usage}");
                return Ok(ExitCode::SUCCESS);
            }
            "quick" => {}
            "progress" => o.progress = Progress::Always,
            "no-progress" => o.progress = Progress::Never,
            _ => {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        let v = raw
                            .get(i)
                            .with_context(|| format!("--{key} needs a value"))?
                            .clone();
                        i += 1;
                        v
                    }
                };
                match key.as_str() {
                    "out" => o.out = PathBuf::from(value),
                    "rounds" => o.rounds = u32::try_from(parse_count(&key, &value)?)?.max(1),
                    "runtime" => o.runtime = parse_duration(&value)?,
                    "ramp" | "ramp_time" => o.ramp = parse_duration(&value)?,
                    "numjobs" => o.numjobs = u32::try_from(parse_count(&key, &value)?)?.max(1),
                    "iodepth" => o.iodepth = u32::try_from(parse_count(&key, &value)?)?.max(1),
                    "size" => o.size = parse_size(&value)?,
                    "model" => o.model = value.parse()?,
                    "setups" => {
                        o.setups = value
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::parse::<Setup>)
                            .collect::<anyhow::Result<_>>()?
                    }
                    "jobs" => {
                        o.jobs = value
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::parse::<Job>)
                            .collect::<anyhow::Result<_>>()?
                    }
                    "slice" => o.slice = parse_duration(&value)?,
                    "engine-cpus" => o.engine_cpus = parse_cpu_list(&value)?,
                    "engine-busy-poll" => o.engine_busy_poll = parse_duration(&value)?,
                    "bench-cpus" => o.bench_cpus = parse_cpu_list(&value)?,
                    "disk-dir" => o.disk_dir = PathBuf::from(value),
                    "shm-dir" => o.shm_dir = PathBuf::from(value),
                    "idle" => o.idle = parse_duration(&value)?,
                    k => bail!("unknown option --{k}\n\n{usage}"),
                }
            }
        }
    }
    if o.runtime.is_zero() {
        bail!("--runtime must be more than zero");
    }
    if o.jobs.is_empty() {
        bail!("--jobs names no job");
    }
    if o.size < (1 << 20) {
        bail!("--size must be at least 1m");
    }
    if serving {
        return serve(&o);
    }
    let report = run_suite(&o)?;
    let clean = report.rows.iter().all(|r| r.median.errors == 0);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
