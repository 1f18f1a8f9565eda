//! Run shell scripts inside a throwaway Linux VM.
//!
//! A thin layer over `sanity-tests/vm/run.sh` and `build-image.sh`: the image
//! (QEMU 7.2, Debian 12 kernel 6.1, a minbase root with nvme-cli, fio,
//! e2fsprogs, xfsprogs, udev) is built once into
//! `${CAIRN_VM_CACHE:-/var/cache/cairn-vm}`, then every [`Vm::run`] boots a
//! clean guest, runs the script as root under `bash -e` and returns its exit
//! status and output.
//!
//! The guest reaches the host's `127.0.0.1` as [`HOST_ADDR_FROM_GUEST`], so a
//! test starts a target on `127.0.0.1:PORT` and runs, in the guest,
//! `nvme connect -t tcp -a 10.0.2.2 -s PORT -n NQN`.
//!
//! ```no_run
//! use cairn_sanity_tests::vm::Vm;
//! let out = Vm::new().cpus(2).mem_mib(1536).timeout_secs(120)
//!     .run("modprobe nvme-tcp && nvme version")?;
//! assert_eq!(out.status, 0);
//! # Ok::<(), cairn_sanity_tests::vm::VmError>(())
//! ```
//!
//! VM runs in one process are serialised: under TCG each guest wants every
//! host core.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

/// The host's loopback as seen from the guest (QEMU user networking).
pub const HOST_ADDR_FROM_GUEST: &str = "10.0.2.2";
/// The guest's own address.
pub const GUEST_ADDR: &str = "10.0.2.15";
/// Exit status of `run.sh` when the run hit its hard timeout.
const STATUS_TIMEOUT: i32 = 124;

/// Errors of the VM harness itself (never the guest command's failure,
/// which is an `Ok` [`VmOutput`] with a non-zero status, or
/// [`VmError::CommandFailed`] from [`Vm::run_ok`]).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `build-image.sh` failed; `log` is the tail of its output.
    #[error("building the VM image with {script} failed (exit {status:?}):\n{log}")]
    Build {
        script: PathBuf,
        status: Option<i32>,
        log: String,
    },
    /// A harness script could not be started.
    #[error("cannot start {script}: {source}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The VM did not finish in time and was killed.
    #[error("VM run timed out after {secs}s and was killed:\n{log}")]
    Timeout { secs: u64, log: String },
    /// The harness failed (missing image, QEMU error, guest never ran the
    /// command); `log` has the harness messages and the guest console tail.
    #[error("VM harness failed: {message}\n{log}")]
    Harness { message: String, log: String },
    /// The guest command exited non-zero (only from [`Vm::run_ok`]).
    #[error("guest command exited {status}; output:\n{output}")]
    CommandFailed { status: i32, output: String },
    /// I/O while talking to the harness.
    #[error("VM harness I/O: {0}")]
    Io(#[from] io::Error),
}

/// What a guest command did.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// The guest command's exit status.
    pub status: i32,
    /// Its stdout and stderr, interleaved as written.
    pub output: String,
    /// The harness's own messages (stderr of `run.sh`).
    pub log: String,
}

impl VmOutput {
    /// Whether the guest command exited 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// A VM configuration; each [`Vm::run`] boots a fresh guest from it.
#[derive(Debug, Clone)]
pub struct Vm {
    cpus: u32,
    mem_mib: u32,
    shares: Vec<PathBuf>,
    timeout: Duration,
    udev: bool,
    console: bool,
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vm {
    /// 2 vCPUs, 1536 MiB, no shares, 300 s timeout, no udev.
    pub fn new() -> Self {
        Vm {
            cpus: 2,
            mem_mib: 1536,
            shares: Vec::new(),
            timeout: Duration::from_secs(300),
            udev: false,
            console: false,
        }
    }

    /// Share a host directory into the guest at the same path (9p).
    pub fn share(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shares.push(dir.into());
        self
    }

    /// Number of guest vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// Guest memory in MiB.
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib.max(256);
        self
    }

    /// Hard limit for the whole run (boot included); rounded up to seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// [`Vm::timeout`] in seconds.
    pub fn timeout_secs(self, secs: u64) -> Self {
        self.timeout(Duration::from_secs(secs))
    }

    /// Start `systemd-udevd` in the guest (for `/dev/disk/by-id`); costs a
    /// few seconds of boot.
    pub fn udev(mut self, on: bool) -> Self {
        self.udev = on;
        self
    }

    /// Stream the guest kernel console to stderr as well.
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// Boot a clean guest, run `script` (bash, `-e`) as root and return its
    /// status and output. Builds the image first if it is not cached. A
    /// non-zero guest status is `Ok`; harness failures are errors.
    pub fn run(&self, script: &str) -> Result<VmOutput, VmError> {
        ensure_image()?;
        let _serial = RUN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let run_sh = vm_dir().join("run.sh");
        let work = TempDir::new()?;
        let script_path = work.path.join("script.sh");
        let result_path = work.path.join("result");
        fs::write(&script_path, script)?;

        let secs = self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0);
        let mut cmd = Command::new(&run_sh);
        cmd.arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--mem")
            .arg(format!("{}M", self.mem_mib))
            .arg("--timeout")
            .arg(secs.max(1).to_string())
            .arg("--result-file")
            .arg(&result_path);
        for s in &self.shares {
            cmd.arg("--share").arg(s);
        }
        if self.udev {
            cmd.arg("--udev");
        }
        if self.console {
            cmd.arg("--console");
        }
        cmd.arg("--").arg(&script_path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
            script: run_sh.clone(),
            source,
        })?;

        let stderr = child.stderr.take();
        let log_thread = thread::spawn(move || -> String {
            let mut log = String::new();
            if let Some(err) = stderr {
                for line in BufReader::new(err).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line);
                    eprintln!("{line}");
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            log
        });
        let mut output = String::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                // print! rather than a raw write, so the test harness captures it.
                println!("{line}");
                output.push_str(&line);
                output.push('\n');
            }
        }
        let exit = child.wait()?;
        let log = log_thread.join().unwrap_or_default();
        let result = fs::read_to_string(&result_path).unwrap_or_default();
        let result = result.trim();
        if let Some(status) = result.strip_prefix("status ") {
            let status = status.parse::<i32>().map_err(|_| VmError::Harness {
                message: format!("bad result line '{result}'"),
                log: log.clone(),
            })?;
            return Ok(VmOutput {
                status,
                output,
                log,
            });
        }
        if exit.code() == Some(STATUS_TIMEOUT) || result.starts_with("error timeout") {
            return Err(VmError::Timeout { secs, log });
        }
        let message = match result.strip_prefix("error ") {
            Some(m) => m.to_string(),
            None => format!("run.sh exited {exit} without a result"),
        };
        Err(VmError::Harness { message, log })
    }

    /// [`Vm::run`], and a non-zero guest status is an error too.
    pub fn run_ok(&self, script: &str) -> Result<VmOutput, VmError> {
        let out = self.run(script)?;
        if out.success() {
            Ok(out)
        } else {
            Err(VmError::CommandFailed {
                status: out.status,
                output: out.output,
            })
        }
    }
}

static RUN_LOCK: Mutex<()> = Mutex::new(());
static IMAGE_READY: Mutex<bool> = Mutex::new(false);

/// The folder holding `run.sh`, `build-image.sh` and the guest scripts.
pub fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
}

/// The workspace's cargo target folder (`CARGO_TARGET_DIR` or `target/`
/// next to the workspace `Cargo.toml`): share it to run host-built binaries
/// in the guest (same glibc as the host).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|p| p.join("target"))
            .unwrap_or_else(|| PathBuf::from("target")),
    }
}

/// Where the image is cached (`CAIRN_VM_CACHE`, default `/var/cache/cairn-vm`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CAIRN_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cairn-vm"))
}

/// Build the VM image unless this process already checked it; quick when
/// the cache is complete. Runs `build-image.sh`, which takes a lock, so
/// concurrent callers in several processes are safe.
pub fn ensure_image() -> Result<(), VmError> {
    let mut ready = IMAGE_READY.lock().unwrap_or_else(|e| e.into_inner());
    if *ready {
        return Ok(());
    }
    let script = vm_dir().join("build-image.sh");
    let mut child = Command::new(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VmError::Spawn {
            script: script.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take();
    let out_thread = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut buf);
        }
        buf
    });
    let mut log = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            eprintln!("{line}");
            log.push_str(&line);
            log.push('\n');
        }
    }
    let status = child.wait()?;
    let out = out_thread.join().unwrap_or_default();
    log.push_str(&String::from_utf8_lossy(&out));
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(VmError::Build {
            script,
            status: status.code(),
            log: tail.join("\n"),
        });
    }
    *ready = true;
    Ok(())
}

/// A private temporary folder removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "cairn-vm-rs.{}.{}.{}",
            std::process::id(),
            n,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Checks a guest script that prints `PASS <check>` after each step: it
/// exited 0 and printed every one of `checks`; otherwise the error carries
/// the guest's output and console log.
pub fn ensure_passed(out: &VmOutput, checks: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(
        out.status == 0,
        "guest script exited {}:\n{}\n{}",
        out.status,
        out.output,
        out.log
    );
    for c in checks {
        anyhow::ensure!(
            out.output
                .lines()
                .any(|l| l.trim_end() == format!("PASS {c}")),
            "check {c} did not pass:\n{}",
            out.output
        );
    }
    Ok(())
}
