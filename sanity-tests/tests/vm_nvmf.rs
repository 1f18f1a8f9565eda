//! Cairn's NVMe-oF/TCP target against the real Linux initiator: the target
//! runs in this test process on `127.0.0.1`, the Debian 12 guest (kernel
//! 6.1, nvme-cli, fio, e2fsprogs, xfsprogs) reaches it as `10.0.2.2`.
//! Every `vm_` test boots a guest; each groups many checks into one guest
//! script that prints `PASS <check>` after each and stops at the first
//! failure with its kernel messages.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use cairn_sanity_tests::vm::{ensure_passed, Vm};
use common::{sh_path, sh_vars, Backing, Fixture, HostId, Relay, GUEST_LIB, MIB};

fn vm() -> Vm {
    Vm::new().cpus(2).mem_mib(1536).timeout_secs(300)
}

/// Discovery, the allow-list, `nvme connect` with 2 I/O queues and digests
/// and with the defaults, fio crc32c verification at 4K and 128K on a pool
/// replica and on a RAM device, a namespace with 4 KiB blocks, and a clean
/// `nvme disconnect -n`.
const CONNECT_SCRIPT: &str = r#"
log "discovery as the allowed host"
out=$(nvme discover -t tcp -a "$A" -s "$PORT" --hostnqn "$HOSTNQN" --hostid "$HOSTID") \
    || die "nvme discover failed: $out"
echo "$out"
grep -qF "$POOL_NQN" <<<"$out" || die "discovery log lacks $POOL_NQN"
grep -qF "$RAM_NQN" <<<"$out" || die "discovery log lacks $RAM_NQN"
grep -q "trsvcid: *$TARGET_PORT" <<<"$out" || die "discovery log lacks the target's port"
grep -q "traddr: *127.0.0.1" <<<"$out" || die "discovery log lacks the target's address"
pass discover

log "discovery as a host not on the allow-list"
out=$(nvme discover -t tcp -a "$A" -s "$PORT" --hostnqn "$DENIED_NQN" --hostid "$DENIED_ID" 2>&1) || true
echo "$out"
if grep -qF "$POOL_NQN" <<<"$out"; then die "discovery showed $POOL_NQN to a host not allowed"; fi
pass discover-filtered

log "connect as a host not on the allow-list"
if nvme connect -t tcp -a "$A" -s "$PORT" -n "$POOL_NQN" --hostnqn "$DENIED_NQN" --hostid "$DENIED_ID"; then
    die "a host not on the allow-list connected"
fi
[ -z "$(ctrl_of "$POOL_NQN")" ] || die "a controller exists after the refused connect"
dmesg | tail -n 3
# The kernel decodes the target's Connect status as "Connect Invalid Host".
dmesg | grep -q "$POOL_NQN is not allowed, hostnqn: $DENIED_NQN" \
    || die "the kernel did not see an invalid-host rejection"
pass denied-host

log "connect -i 2 with header and data digests (pool replica)"
connect -n "$POOL_NQN" -i 2 --hdr-digest --data-digest
c=$(ctrl_of "$POOL_NQN")
[ -n "$c" ] || die "no controller for $POOL_NQN"
echo "$c: transport=$(cat /sys/class/nvme/$c/transport) state=$(cat /sys/class/nvme/$c/state) queue_count=$(qcount "$POOL_NQN") address=$(cat /sys/class/nvme/$c/address)"
[ "$(qcount "$POOL_NQN")" = 3 ] || die "expected 1 admin + 2 I/O queues"
[ "$(cat /sys/class/nvme/$c/transport)" = tcp ] || die "not tcp"
nvme list-subsys
dev=$(wait_ns "$POOL_NQN")
echo "namespace $dev: $(cat /sys/block/$(basename $dev)/size) sectors"
[ "$(cat /sys/block/$(basename $dev)/size)" = "$POOL_SECTORS" ] || die "wrong namespace size"
pass connect-2q-digests

verify_fio 4k 16M "$dev"
pass fio-4k-pool-digests
verify_fio 128k 64M "$dev"
pass fio-128k-pool-digests

log "disconnect -n"
disconnect "$POOL_NQN"
[ ! -e "$dev" ] || die "$dev still exists"
pass disconnect-pool

log "connect with the default queue count, no digests (RAM device)"
connect -n "$RAM_NQN"
echo "queue_count=$(qcount "$RAM_NQN") nproc=$(nproc)"
[ "$(qcount "$RAM_NQN")" = "$(( $(nproc) + 1 ))" ] || die "expected one I/O queue per guest CPU"
dev=$(wait_ns "$RAM_NQN")
pass connect-default

verify_fio 4k 16M "$dev"
pass fio-4k-ram
verify_fio 128k 64M "$dev"
pass fio-128k-ram

disconnect "$RAM_NQN"
[ ! -e "$dev" ] || die "$dev still exists"
[ -z "$(ls /sys/class/nvme/ 2>/dev/null)" ] || die "controllers left: $(ls /sys/class/nvme/)"
pass disconnect-ram

log "a namespace with 4 KiB blocks"
connect -n "$RAM4K_NQN" -i 1
dev=$(wait_ns "$RAM4K_NQN")
b=$(basename "$dev")
echo "$dev: logical_block_size=$(cat /sys/block/$b/queue/logical_block_size) size=$(cat /sys/block/$b/size)"
[ "$(cat /sys/block/$b/queue/logical_block_size)" = 4096 ] || die "not 4 KiB blocks"
[ "$(cat /sys/block/$b/size)" = "$RAM4K_SECTORS" ] || die "wrong namespace size"
if dd if=/dev/zero of="$dev" bs=512 count=1 oflag=direct status=none 2>/dev/null; then
    die "a 512-byte direct write to a 4 KiB-block namespace succeeded"
fi
verify_fio 4k 8M "$dev"
disconnect "$RAM4K_NQN"
pass ram-4k-blocks
if dmesg | grep -Ei "digest error|nvme.*(I/O error|timeout)"; then die "kernel reported errors"; fi
pass clean-dmesg
"#;

#[test]
fn vm_nvmf_discover_allowlist_connect_fio() -> Result<()> {
    let host = HostId::random();
    let denied = HostId::random();
    let pool_bytes = 256 * MIB;
    let fx = Fixture::start(
        &[
            Backing::PoolReplica(pool_bytes),
            Backing::Ram(128 * MIB),
            Backing::Ram4k(64 * MIB),
        ],
        &[&host],
    )?;
    let relay = Relay::start(fx.target.local_addr())?;
    let script = sh_vars(&[
        ("PORT", relay.port().to_string()),
        ("TARGET_PORT", fx.port().to_string()),
        ("HOSTNQN", host.nqn.clone()),
        ("HOSTID", host.id.to_string()),
        ("DENIED_NQN", denied.nqn.clone()),
        ("DENIED_ID", denied.id.to_string()),
        ("POOL_NQN", fx.nqns[0].clone()),
        ("RAM_NQN", fx.nqns[1].clone()),
        ("RAM4K_NQN", fx.nqns[2].clone()),
        ("POOL_SECTORS", (pool_bytes / 512).to_string()),
        ("RAM4K_SECTORS", (64 * MIB / 512).to_string()),
    ]) + GUEST_LIB
        + CONNECT_SCRIPT;
    let out = vm().run(&script).context("guest run")?;
    ensure_passed(
        &out,
        &[
            "discover",
            "discover-filtered",
            "denied-host",
            "connect-2q-digests",
            "fio-4k-pool-digests",
            "fio-128k-pool-digests",
            "disconnect-pool",
            "connect-default",
            "fio-4k-ram",
            "fio-128k-ram",
            "disconnect-ram",
            "ram-4k-blocks",
            "clean-dmesg",
        ],
    )?;

    // What crossed the wire: the 2-queue connect asked for both digests on
    // its admin and both I/O queues and the target granted them; the other
    // connections asked for none and got none.
    let seen = relay.negotiated();
    eprintln!("negotiated (ICReq, ICResp DGST): {seen:?}");
    let both = seen.iter().filter(|n| n.req == 3 && n.resp == 3).count();
    ensure!(
        both == 3,
        "expected 3 connections with both digests: {seen:?}"
    );
    ensure!(
        seen.iter().all(|n| n.req == n.resp),
        "the target granted other digests than asked: {seen:?}"
    );
    ensure!(
        seen.iter().filter(|n| n.req == 0).count() >= 4,
        "expected connections without digests: {seen:?}"
    );
    ensure!(
        fx.target
            .list_subsystems()
            .iter()
            .all(|s| s.controllers == 0),
        "controllers left on the target: {:?}",
        fx.target.list_subsystems()
    );
    Ok(())
}

/// ext4 and XFS on a pool replica: files written, the controller
/// disconnected and reconnected (with other queue and digest settings),
/// the files read back identical.
const FS_SCRIPT: &str = r#"
mkdir -p /mnt/t
# write_files: 3 files of 4 MiB plus one of 1 MiB, checksums kept outside.
write_files() {
    local i
    for i in 1 2 3; do dd if=/dev/urandom of=/mnt/t/f$i bs=1M count=4 status=none; done
    dd if=/dev/urandom of=/mnt/t/small bs=4k count=256 status=none
    (cd /mnt/t && sha256sum f1 f2 f3 small) > "/root/$1.sum"
    cat "/root/$1.sum"
}
check_files() {
    (cd /mnt/t && sha256sum -c "/root/$1.sum") || die "$1 files differ after reconnect"
}

log "ext4"
connect -n "$POOL_NQN" -i 1
[ "$(qcount "$POOL_NQN")" = 2 ] || die "expected 1 admin + 1 I/O queue"
dev=$(wait_ns "$POOL_NQN")
mkfs.ext4 -q -F "$dev"
mount "$dev" /mnt/t
write_files ext4
umount /mnt/t
disconnect "$POOL_NQN"
connect -n "$POOL_NQN"
dev=$(wait_ns "$POOL_NQN")
mount "$dev" /mnt/t
check_files ext4
umount /mnt/t
e2fsck -fn "$dev" || die "e2fsck -fn found damage"
pass ext4-survives-reconnect

log "xfs"
mkfs.xfs -q -f "$dev"
mount "$dev" /mnt/t
write_files xfs
umount /mnt/t
disconnect "$POOL_NQN"
connect -n "$POOL_NQN" -i 2 --hdr-digest --data-digest
dev=$(wait_ns "$POOL_NQN")
mount "$dev" /mnt/t
check_files xfs
umount /mnt/t
xfs_repair -n "$dev" || die "xfs_repair -n found damage"
disconnect "$POOL_NQN"
pass xfs-survives-reconnect
if dmesg | grep -Ei "digest error|I/O error|corrupt"; then die "kernel reported errors"; fi
pass clean-dmesg
"#;

#[test]
fn vm_nvmf_ext4_xfs_survive_reconnect() -> Result<()> {
    let host = HostId::random();
    // XFS wants at least 300 MB.
    let fx = Fixture::start(&[Backing::PoolReplica(512 * MIB)], &[&host])?;
    let script = sh_vars(&[
        ("PORT", fx.port().to_string()),
        ("HOSTNQN", host.nqn.clone()),
        ("HOSTID", host.id.to_string()),
        ("POOL_NQN", fx.nqns[0].clone()),
    ]) + GUEST_LIB
        + FS_SCRIPT;
    let out = vm().run(&script).context("guest run")?;
    ensure_passed(
        &out,
        &[
            "ext4-survives-reconnect",
            "xfs-survives-reconnect",
            "clean-dmesg",
        ],
    )?;
    // What the kernel wrote landed in the pool, and its metadata is
    // consistent once the target lets go of it.
    let pool = fx.pool.clone().context("pool")?;
    let info = pool.info();
    ensure!(info.used > 0, "the replica holds no data: {info:?}");
    fx.target.shutdown();
    let t0 = Instant::now();
    while let Err(e) = pool.export() {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "exporting the pool after the target stopped: {e}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let report = cairn_pool::check(&info.path).context("checking the pool")?;
    ensure!(report.is_clean(), "pool check: {report:?}");
    ensure!(
        report.replicas == 1 && report.used_clusters * u64::from(report.cluster_size) == info.used,
        "pool check disagrees with the live pool ({info:?}): {report:?}"
    );
    Ok(())
}

/// The guest's ctrl-loss-tmo for the target-kill test, in seconds.
const CTRL_LOSS_TMO: u64 = 5;
/// How long after the target stops the guest's I/O must have failed:
/// ctrl-loss-tmo plus margin for detection, reconnect attempts and TCG.
const IO_FAIL_LIMIT: u64 = CTRL_LOSS_TMO + 40;

/// Writes run against the target; the host shuts the target down; the
/// kernel must give up after ctrl-loss-tmo and fail the I/O rather than
/// hang. Hand-shake over the 9p-shared `$SYNC`: the guest creates
/// `io-running`, the host shuts the target down and creates `target-stopped`.
const KILL_SCRIPT: &str = r#"
log "connect with ctrl-loss-tmo=$CTRL_LOSS_TMO reconnect-delay=1"
connect -n "$NQN" --ctrl-loss-tmo="$CTRL_LOSS_TMO" --reconnect-delay=1
c=$(ctrl_of "$NQN")
[ -e "/sys/class/nvme/$c/ctrl_loss_tmo" ] && echo "ctrl_loss_tmo=$(cat /sys/class/nvme/$c/ctrl_loss_tmo)"
dev=$(wait_ns "$NQN")
fio --name=busy --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=64k --iodepth=8 --size=64M --time_based --runtime=600 >/root/fio.log 2>&1 &
pid=$!
sleep 3
kill -0 "$pid" || { cat /root/fio.log; die "fio stopped before the target did"; }
pass io-running
touch "$SYNC/io-running"

for i in $(seq 1 1200); do [ -e "$SYNC/target-stopped" ] && break; sleep 0.1; done
[ -e "$SYNC/target-stopped" ] || die "the host never stopped the target"
t0=$(date +%s%N)
log "target stopped; waiting up to ${LIMIT}s for the I/O to fail"
while kill -0 "$pid" 2>/dev/null; do
    if [ $(( ($(date +%s%N) - t0) / 1000000000 )) -ge "$LIMIT" ]; then
        dmesg | tail -n 30
        kill -9 "$pid" || true
        die "I/O still hanging ${LIMIT}s after the target stopped"
    fi
    sleep 0.2
done
rc=0
wait "$pid" || rc=$?
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
cat /root/fio.log
echo "fio exit $rc after ${ms} ms"
echo "IO_FAILED_AFTER_MS $ms"
[ "$rc" -ne 0 ] || die "fio succeeded although the target is gone"
grep -Eq "err= *[1-9]|Input/output error|No such device" /root/fio.log || die "fio reported no I/O error"
pass io-failed
wait_gone "$NQN"
dmesg | grep -E "nvme" | tail -n 25
# The kernel noticed the loss, retried against the closed port and gave
# up at ctrl-loss-tmo.
dmesg | grep -q "Failed reconnect attempt" || die "the kernel never tried to reconnect"
dmesg | grep -q "Removing ctrl: NQN \"$NQN\"" || die "the kernel did not remove the controller"
pass controller-removed
"#;

#[test]
fn vm_nvmf_target_shutdown_fails_guest_io() -> Result<()> {
    let host = HostId::random();
    let fx = Fixture::start(&[Backing::Ram(128 * MIB)], &[&host])?;
    let sync = common::shared_dir()?;
    let script = sh_vars(&[
        ("PORT", fx.port().to_string()),
        ("HOSTNQN", host.nqn.clone()),
        ("HOSTID", host.id.to_string()),
        ("NQN", fx.nqns[0].clone()),
        ("SYNC", sh_path(sync.path())),
        ("CTRL_LOSS_TMO", CTRL_LOSS_TMO.to_string()),
        ("LIMIT", IO_FAIL_LIMIT.to_string()),
    ]) + GUEST_LIB
        + KILL_SCRIPT;
    let guest = {
        let vm = vm().share(sync.path());
        thread::spawn(move || vm.run(&script))
    };

    let running = sync.path().join("io-running");
    // The guest run is bounded by its own timeout (and may first wait for
    // other tests' VMs).
    while !running.exists() && !guest.is_finished() {
        thread::sleep(Duration::from_millis(100));
    }
    let saw_io = running.exists();
    if saw_io {
        // Let the I/O run against the target for a moment, then stop it.
        thread::sleep(Duration::from_secs(1));
        fx.target.shutdown();
        eprintln!("target shut down");
    }
    std::fs::write(sync.path().join("target-stopped"), b"")?;
    let out = guest
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
        .context("guest run")?;
    ensure!(saw_io, "the guest never started I/O:\n{}", out.output);
    ensure_passed(&out, &["io-running", "io-failed", "controller-removed"])?;
    let ms: u64 = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix("IO_FAILED_AFTER_MS "))
        .and_then(|v| v.trim().parse().ok())
        .context("no IO_FAILED_AFTER_MS line")?;
    eprintln!("guest I/O failed {ms} ms after the target stopped");
    ensure!(ms <= IO_FAIL_LIMIT * 1000, "I/O failed only after {ms} ms");
    Ok(())
}

/// Verified writes run while the target goes away and comes back on the
/// same port within ctrl-loss-tmo: the kernel must reconnect (new admin
/// and I/O queues on the same controller device) and retry the I/O it
/// held, and every
/// block must read back as written. Hand-shake as in the kill test, with
/// `target-restarted` created once the new target listens.
const RESTART_SCRIPT: &str = r#"
log "connect with ctrl-loss-tmo=60 reconnect-delay=1"
connect -n "$NQN" -i 2 --ctrl-loss-tmo=60 --reconnect-delay=1
c=$(ctrl_of "$NQN")
cntlid0=$(cat "/sys/class/nvme/$c/cntlid")
dev=$(wait_ns "$NQN")
fio --name=across-restart --filename="$dev" --direct=1 --ioengine=libaio \
    --rw=randwrite --bs=64k --iodepth=8 --size=96M --rate=8m --eta=never \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    >/root/fio.log 2>&1 &
pid=$!
sleep 2
kill -0 "$pid" || { cat /root/fio.log; die "fio finished before the target stopped"; }
pass io-running
touch "$SYNC/io-running"
for i in $(seq 1 1200); do [ -e "$SYNC/target-restarted" ] && break; sleep 0.1; done
[ -e "$SYNC/target-restarted" ] || die "the host never restarted the target"
# At 8 MB/s each way fio needs 24 s, so it must still be running: the
# restart happened under I/O.
kill -0 "$pid" || { cat /root/fio.log; die "fio finished before the target came back"; }
log "target restarted; waiting for fio"
rc=0
wait "$pid" || rc=$?
cat /root/fio.log
[ "$rc" -eq 0 ] || die "fio failed across the target restart (exit $rc)"
grep -q "err= 0" /root/fio.log || die "fio reported errors"
pass io-survived-restart
dmesg | grep nvme | tail -n 20
dmesg | grep -q "nvme $c: Successfully reconnected" || die "the kernel did not log a reconnect"
[ "$(ctrl_of "$NQN")" = "$c" ] || die "the controller was replaced instead of reconnected"
[ "$(cat "/sys/class/nvme/$c/state")" = live ] || die "controller not live"
echo "cntlid before $cntlid0, after $(cat "/sys/class/nvme/$c/cntlid")"
[ "$(qcount "$NQN")" = 3 ] || die "the reconnect did not restore 2 I/O queues"
pass reconnected
disconnect "$NQN"
pass disconnect
"#;

#[test]
fn vm_nvmf_target_restart_reconnects_and_retries_io() -> Result<()> {
    common::init_logs();
    let host = HostId::random();
    let uuid = uuid::Uuid::new_v4();
    let nqn = cairn_nvmf::volume_nqn(&uuid);
    let device: std::sync::Arc<dyn cairn_bdev::BlockDevice> =
        std::sync::Arc::new(cairn_bdev::ram::RamDevice::new(512, 128 * MIB / 512));
    let start = |listen: std::net::SocketAddr| -> Result<Target> {
        let t = Target::start(TargetConfig {
            listen,
            reactors: 1,
            ..TargetConfig::default()
        })?;
        t.add_subsystem(SubsystemConfig {
            nqn: nqn.clone(),
            serial: "cairn-vm-restart".into(),
            model: None,
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid,
                device: device.clone(),
            }],
            allowed_hosts: Some(vec![host.nqn.clone()]),
        })?;
        Ok(t)
    };
    let first = start("127.0.0.1:0".parse()?)?;
    let addr = first.local_addr();
    let sync = common::shared_dir()?;
    let script = sh_vars(&[
        ("PORT", addr.port().to_string()),
        ("HOSTNQN", host.nqn.clone()),
        ("HOSTID", host.id.to_string()),
        ("NQN", nqn.clone()),
        ("SYNC", sh_path(sync.path())),
    ]) + GUEST_LIB
        + RESTART_SCRIPT;
    let guest = {
        let vm = vm().share(sync.path());
        thread::spawn(move || vm.run(&script))
    };

    let running = sync.path().join("io-running");
    // The guest run is bounded by its own timeout (and may first wait for
    // other tests' VMs).
    while !running.exists() && !guest.is_finished() {
        thread::sleep(Duration::from_millis(100));
    }
    let saw_io = running.exists();
    let mut second = None;
    let mut restart_err = None;
    if saw_io {
        thread::sleep(Duration::from_secs(1));
        first.shutdown();
        drop(first);
        // Down long enough for the kernel to notice and fail a few
        // reconnect attempts.
        thread::sleep(Duration::from_secs(4));
        let t0 = Instant::now();
        loop {
            match start(addr) {
                Ok(t) => {
                    second = Some(t);
                    break;
                }
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    eprintln!("restart on {addr}: {e:#}; retrying");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    restart_err = Some(e);
                    break;
                }
            }
        }
        eprintln!("target restarted on {addr}");
    }
    std::fs::write(sync.path().join("target-restarted"), b"")?;
    let out = guest
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
        .context("guest run")?;
    if let Some(e) = restart_err {
        return Err(e.context("restarting the target on the same port"));
    }
    ensure!(saw_io, "the guest never started I/O:\n{}", out.output);
    ensure_passed(
        &out,
        &[
            "io-running",
            "io-survived-restart",
            "reconnected",
            "disconnect",
        ],
    )?;
    let second = second.context("no second target")?;
    ensure!(
        second.list_subsystems().iter().all(|s| s.controllers == 0),
        "controllers left: {:?}",
        second.list_subsystems()
    );
    Ok(())
}

/// Control-plane changes under a connected kernel host: a removed
/// subsystem and one whose allow-list no longer names the host must both
/// drop the host's controller (its reconnects refused until ctrl-loss-tmo
/// removes it) and vanish from its discovery log, while a third subsystem
/// stays live and usable.
const REVOKE_SCRIPT: &str = r#"
connect -n "$GONE_NQN" --ctrl-loss-tmo=3 --reconnect-delay=1
connect -n "$REVOKED_NQN" --ctrl-loss-tmo=3 --reconnect-delay=1
connect -n "$KEPT_NQN"
wait_ns "$GONE_NQN" >/dev/null
wait_ns "$REVOKED_NQN" >/dev/null
kept=$(wait_ns "$KEPT_NQN")
pass connected
touch "$SYNC/connected"
for i in $(seq 1 1200); do [ -e "$SYNC/changed" ] && break; sleep 0.1; done
[ -e "$SYNC/changed" ] || die "the host never changed the target"
t0=$(date +%s)
while [ -n "$(ctrl_of "$GONE_NQN")$(ctrl_of "$REVOKED_NQN")" ]; do
    [ $(( $(date +%s) - t0 )) -lt "$LIMIT" ] || die "controllers still present ${LIMIT}s after the change"
    sleep 0.2
done
echo "both controllers removed after $(( $(date +%s) - t0 ))s"
dmesg | grep nvme | tail -n 25
dmesg | grep -q "Connect for subsystem $REVOKED_NQN is not allowed, hostnqn: $HOSTNQN" \
    || die "the revoked host's reconnect was not refused as an invalid host"
# Connect to an unknown subsystem: Invalid Parameter pointing at SUBNQN.
dmesg | grep -q "Connect Invalid Data Parameter, subsysnqn \"$GONE_NQN\"" \
    || die "the removed subsystem's reconnect was not refused as an unknown subsystem"
pass dropped
out=$(nvme discover -t tcp -a "$A" -s "$PORT" --hostnqn "$HOSTNQN" --hostid "$HOSTID")
echo "$out"
if grep -qF -e "$GONE_NQN" -e "$REVOKED_NQN" <<<"$out"; then die "discovery still lists a dropped subsystem"; fi
grep -qF "$KEPT_NQN" <<<"$out" || die "discovery lost the kept subsystem"
pass discovery-updated
[ "$(cat "/sys/class/nvme/$(ctrl_of "$KEPT_NQN")/state")" = live ] || die "kept controller not live"
dd if=/dev/urandom of=/root/blk bs=64k count=16 status=none
dd if=/root/blk of="$kept" bs=64k oflag=direct status=none
dd if="$kept" of=/root/back bs=64k count=16 iflag=direct status=none
cmp /root/blk /root/back || die "kept namespace returned other data"
disconnect "$KEPT_NQN"
pass kept-usable
"#;

#[test]
fn vm_nvmf_removed_and_revoked_subsystems_drop_the_host() -> Result<()> {
    let host = HostId::random();
    let other = HostId::random();
    let fx = Fixture::start(
        &[
            Backing::Ram(32 * MIB),
            Backing::Ram(32 * MIB),
            Backing::Ram(32 * MIB),
        ],
        &[&host],
    )?;
    let (gone, revoked) = (fx.nqns[0].clone(), fx.nqns[1].clone());
    let sync = common::shared_dir()?;
    let script = sh_vars(&[
        ("PORT", fx.port().to_string()),
        ("HOSTNQN", host.nqn.clone()),
        ("HOSTID", host.id.to_string()),
        ("GONE_NQN", gone.clone()),
        ("REVOKED_NQN", revoked.clone()),
        ("KEPT_NQN", fx.nqns[2].clone()),
        ("SYNC", sh_path(sync.path())),
        ("LIMIT", "40".into()),
    ]) + GUEST_LIB
        + REVOKE_SCRIPT;
    let guest = {
        let vm = vm().share(sync.path());
        thread::spawn(move || vm.run(&script))
    };
    let connected = sync.path().join("connected");
    while !connected.exists() && !guest.is_finished() {
        thread::sleep(Duration::from_millis(100));
    }
    let saw = connected.exists();
    let mut change = Ok(());
    if saw {
        change = fx.target.remove_subsystem(&gone).and_then(|()| {
            fx.target
                .set_allowed_hosts(&revoked, Some(vec![other.nqn.clone()]))
        });
    }
    std::fs::write(sync.path().join("changed"), b"")?;
    let out = guest
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
        .context("guest run")?;
    change.context("changing the target")?;
    ensure!(saw, "the guest never connected:\n{}", out.output);
    ensure_passed(
        &out,
        &["connected", "dropped", "discovery-updated", "kept-usable"],
    )?;
    let subs = fx.target.list_subsystems();
    ensure!(
        subs.len() == 2 && subs.iter().all(|s| s.controllers == 0),
        "target state after the run: {subs:?}"
    );
    Ok(())
}
