//! Shared parts of the Cairn-target-in-a-VM tests: a Cairn NVMe-oF/TCP
//! target on the host exporting a pool replica and a RAM device, fixed host
//! identities for the guest, a relay that records what each NVMe/TCP
//! connection negotiated, and the guest's bash helpers.
#![allow(dead_code)] // Each test binary uses a different part.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;

use anyhow::{Context, Result};
use cairn_bdev::ram::RamDevice;
use cairn_bdev::BlockDevice;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use cairn_pool::{Pool, PoolCreate, ReplicaCreate, DEFAULT_CLUSTER_SIZE};
use uuid::Uuid;

pub const MIB: u64 = 1024 * 1024;

/// Sends the target's `tracing` output to the test's captured output
/// (`RUST_LOG` overrides the default `info`).
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A host identity for `nvme connect --hostnqn --hostid`.
#[derive(Debug, Clone)]
pub struct HostId {
    pub nqn: String,
    pub id: Uuid,
}

impl HostId {
    pub fn random() -> Self {
        let id = Uuid::new_v4();
        HostId {
            nqn: format!("nqn.2014-08.org.nvmexpress:uuid:{id}"),
            id,
        }
    }
}

/// What one exported subsystem is backed by.
pub enum Backing {
    /// A thin replica of this many bytes in a pool on a sparse file.
    PoolReplica(u64),
    /// A RAM device of this many bytes (512-byte blocks).
    Ram(u64),
    /// A RAM device of this many bytes with 4 KiB blocks.
    Ram4k(u64),
}

/// A target on `127.0.0.1:0` and the pool file behind it.
pub struct Fixture {
    pub target: Target,
    /// NQNs of the exported subsystems, in the order asked for.
    pub nqns: Vec<String>,
    /// The pool, if a replica was asked for (kept open while exported).
    pub pool: Option<Arc<Pool>>,
    /// Holds the pool file; removed on drop.
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// Starts a target and exports one subsystem per backing, each with
    /// namespace 1 and an allow-list of `allowed`.
    pub fn start(backings: &[Backing], allowed: &[&HostId]) -> Result<Fixture> {
        init_logs();
        let dir = tempfile::tempdir().context("tempdir")?;
        let target = Target::start(TargetConfig {
            listen: "127.0.0.1:0".parse()?,
            reactors: 1,
            ..TargetConfig::default()
        })
        .context("starting the target")?;
        let mut pool: Option<Arc<Pool>> = None;
        let mut nqns = Vec::new();
        for (i, b) in backings.iter().enumerate() {
            let uuid = Uuid::new_v4();
            let device: Arc<dyn BlockDevice> = match b {
                Backing::Ram(bytes) => Arc::new(RamDevice::new(512, bytes / 512)),
                Backing::Ram4k(bytes) => Arc::new(RamDevice::new(4096, bytes / 4096)),
                Backing::PoolReplica(bytes) => {
                    let p = match &pool {
                        Some(p) => p.clone(),
                        None => {
                            let path = dir.path().join("pool.img");
                            std::fs::File::create(&path)
                                .and_then(|f| f.set_len(4096 * MIB))
                                .context("sparse pool file")?;
                            let p = Pool::create(
                                &path,
                                PoolCreate {
                                    name: "vmpool".into(),
                                    uuid: Uuid::new_v4(),
                                    cluster_size: DEFAULT_CLUSTER_SIZE,
                                },
                            )
                            .context("creating the pool")?;
                            pool = Some(p.clone());
                            p
                        }
                    };
                    p.create_replica(ReplicaCreate {
                        uuid,
                        name: format!("r{i}"),
                        size: *bytes,
                        thin: true,
                    })
                    .context("creating the replica")?
                }
            };
            let nqn = cairn_nvmf::volume_nqn(&uuid);
            target
                .add_subsystem(SubsystemConfig {
                    nqn: nqn.clone(),
                    serial: format!("cairn-vm-{i}"),
                    model: None,
                    namespaces: vec![NamespaceConfig {
                        nsid: 1,
                        uuid,
                        device,
                    }],
                    allowed_hosts: Some(allowed.iter().map(|h| h.nqn.clone()).collect()),
                })
                .context("adding the subsystem")?;
            nqns.push(nqn);
        }
        Ok(Fixture {
            target,
            nqns,
            pool,
            dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.target.local_addr().port()
    }
}

/// The `DGST` byte (offset 11) of an ICReq and of the ICResp answering it:
/// bit 0 header digest, bit 1 data digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub req: u8,
    pub resp: u8,
}

/// A TCP relay in front of the target that records, per connection, the
/// digests the host asked for and those the target granted, as they crossed
/// the wire. Everything else is copied unchanged.
pub struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Negotiated>>>,
    stop: Arc<AtomicBool>,
}

const IC_LEN: usize = 128;
const IC_DGST: usize = 11;

impl Relay {
    pub fn start(to: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        thread::Builder::new()
            .name("nvmf-relay".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(host) = conn else { continue };
                    let seen = s.clone();
                    thread::spawn(move || {
                        let _ = relay_one(host, to, seen);
                    });
                }
            })?;
        Ok(Relay { addr, seen, stop })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What every connection so far negotiated.
    pub fn negotiated(&self) -> Vec<Negotiated> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay_one(host: TcpStream, to: SocketAddr, seen: Arc<Mutex<Vec<Negotiated>>>) -> io::Result<()> {
    let target = TcpStream::connect(to)?;
    let _ = host.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<u8>();
    let (mut h_rd, mut t_wr) = (host.try_clone()?, target.try_clone()?);
    let up = thread::spawn(move || -> io::Result<()> {
        let mut ic = [0u8; IC_LEN];
        let r = h_rd.read_exact(&mut ic).and_then(|_| {
            let _ = tx.send(ic[IC_DGST]);
            t_wr.write_all(&ic)?;
            io::copy(&mut h_rd, &mut t_wr).map(|_| ())
        });
        let _ = t_wr.shutdown(Shutdown::Write);
        r
    });
    let (mut t_rd, mut h_wr) = (target, host);
    let mut ic = [0u8; IC_LEN];
    let r = t_rd.read_exact(&mut ic).and_then(|_| {
        if let Ok(req) = rx.recv() {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Negotiated {
                    req,
                    resp: ic[IC_DGST],
                });
        }
        h_wr.write_all(&ic)?;
        io::copy(&mut t_rd, &mut h_wr).map(|_| ())
    });
    let _ = h_wr.shutdown(Shutdown::Write);
    let _ = up.join();
    r
}

/// A folder shared into the guest (9p) for host/guest hand-shakes.
pub fn shared_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::tempdir()?)
}

/// `path` as a string the guest script can use.
pub fn sh_path(p: impl Into<PathBuf>) -> String {
    p.into().display().to_string()
}

/// Variable assignments for the top of a guest script.
pub fn sh_vars(vars: &[(&str, String)]) -> String {
    let mut s = String::new();
    for (k, v) in vars {
        s.push_str(&format!("{k}='{v}'\n"));
    }
    s
}

/// Bash helpers every guest script starts with. Expects `PORT`, `HOSTNQN`
/// and `HOSTID` to be set. `pass NAME` prints the markers the host asserts.
pub const GUEST_LIB: &str = r#"
set -euo pipefail
A=10.0.2.2
log() { echo "=== $*"; }
pass() { echo "PASS $*"; }
die() {
    echo "FAIL: $*" >&2
    echo "--- dmesg tail" >&2
    dmesg | tail -n 40 >&2
    exit 1
}
# Controller name (nvmeN) connected to subsystem $1, or nothing.
ctrl_of() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        if [ "$(cat "$c/subsysnqn")" = "$1" ]; then basename "$c"; return 0; fi
    done
    return 0
}
# Block device of namespace 1 of subsystem $1, or nothing.
ns_dev() {
    local b n
    for b in /sys/block/nvme*; do
        n=$(basename "$b")
        [[ "$n" =~ ^nvme[0-9]+n[0-9]+$ ]] || continue
        [ -e "$b/device/subsysnqn" ] || continue
        if [ "$(cat "$b/device/subsysnqn")" = "$1" ]; then echo "/dev/$n"; return 0; fi
    done
    return 0
}
wait_ns() {
    local i d
    for i in $(seq 1 150); do
        d=$(ns_dev "$1")
        if [ -n "$d" ] && [ -b "$d" ]; then echo "$d"; return 0; fi
        sleep 0.2
    done
    die "no namespace block device for $1"
}
wait_gone() {
    local i
    for i in $(seq 1 100); do
        if [ -z "$(ctrl_of "$1")" ] && [ -z "$(ns_dev "$1")" ]; then return 0; fi
        sleep 0.2
    done
    die "controller or namespace of $1 still present"
}
qcount() { cat "/sys/class/nvme/$(ctrl_of "$1")/queue_count"; }
connect() {
    nvme connect -t tcp -a "$A" -s "$PORT" --hostnqn "$HOSTNQN" --hostid "$HOSTID" "$@"
}
disconnect() {
    local out
    out=$(nvme disconnect -n "$1") || die "nvme disconnect -n $1 failed: $out"
    echo "$out"
    grep -q "disconnected 1 controller" <<<"$out" || die "disconnect of $1 did not report one controller"
    wait_gone "$1"
}
# verify_fio BS SIZE DEV: random writes, then every block read back and
# checked against its crc32c header.
verify_fio() {
    fio --name="verify-$1" --filename="$3" --direct=1 --ioengine=libaio \
        --rw=randwrite --bs="$1" --iodepth=16 --size="$2" \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
        || die "fio verify bs=$1 on $3 failed"
}
modprobe nvme-tcp
"#;
