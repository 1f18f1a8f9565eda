//! Tests of the VM harness itself, with the guest kernel's own NVMe/TCP
//! initiator and target. Every `vm_` test boots a real guest; they fail
//! (never skip) when the harness cannot run.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn_sanity_tests::vm::{vm_dir, Vm, VmError, HOST_ADDR_FROM_GUEST};

#[test]
fn vm_boots_and_loads_nvme_tcp() -> Result<()> {
    let out = Vm::new()
        .timeout_secs(180)
        .run_ok(
            "modprobe nvme-tcp\n\
             test -d /sys/module/nvme_tcp && echo nvme_tcp-loaded\n\
             nvme version\n\
             echo hostnqn=$(cat /etc/nvme/hostnqn)\n\
             uname -r\n",
        )
        .context("guest run")?;
    ensure!(out.output.contains("nvme_tcp-loaded"), "{}", out.output);
    ensure!(
        out.output.contains("nvme version 2.") && out.output.contains("libnvme version"),
        "no nvme-cli version in:\n{}",
        out.output
    );
    ensure!(
        out.output
            .contains("hostnqn=nqn.2014-08.org.nvmexpress:uuid:"),
        "guest has no hostnqn:\n{}",
        out.output
    );
    ensure!(
        out.output.contains("6.1."),
        "not the 6.1 kernel:\n{}",
        out.output
    );
    Ok(())
}

/// null_blk (memory backed) exported by the guest kernel's nvmet-tcp on the
/// guest loopback, connected with `nvme connect`, with ext4 on top: the data
/// must survive unmount, remount, disconnect and reconnect. udev runs, so
/// the namespace must also show up under `/dev/disk/by-id`.
const KERNEL_TARGET_SCRIPT: &str = r#"
set -euo pipefail
NQN=nqn.2024-01.dev.cairn:vm-selftest
PORT=4420
modprobe -a nvme-tcp nvmet nvmet-tcp
modprobe null_blk nr_devices=0
CFG=/sys/kernel/config

NB=$CFG/nullb/cairnnb
mkdir "$NB"
echo 256 >"$NB/size"
echo 1 >"$NB/memory_backed"
echo 1 >"$NB/power"
test -b /dev/cairnnb
echo "STEP null_blk /dev/cairnnb"

S=$CFG/nvmet/subsystems/$NQN
mkdir "$S"
echo 1 >"$S/attr_allow_any_host"
mkdir "$S/namespaces/1"
echo -n /dev/cairnnb >"$S/namespaces/1/device_path"
echo 1 >"$S/namespaces/1/enable"
P=$CFG/nvmet/ports/1
mkdir "$P"
echo tcp >"$P/addr_trtype"
echo ipv4 >"$P/addr_adrfam"
echo 127.0.0.1 >"$P/addr_traddr"
echo $PORT >"$P/addr_trsvcid"
ln -s "$S" "$P/subsystems/$NQN"
echo "STEP nvmet-tcp port up"

find_dev() {
    for b in /sys/block/nvme*n*; do
        [ -e "$b" ] || continue
        case ${b##*/} in *c*) continue ;; esac
        if [ "$(cat "$b/device/subsysnqn" 2>/dev/null)" = "$NQN" ]; then
            echo "/dev/${b##*/}"
            return 0
        fi
    done
    return 1
}
connect() {
    nvme connect -t tcp -a 127.0.0.1 -s $PORT -n "$NQN"
    for i in $(seq 100); do
        DEV=$(find_dev) && [ -b "$DEV" ] && return 0
        sleep 0.1
    done
    echo "no namespace device for $NQN" >&2
    return 1
}
connect
echo "STEP connected $DEV size=$(blockdev --getsize64 "$DEV")"
# udev (started by the harness) links the namespace under /dev/disk/by-id.
udevadm settle --timeout=30
BYID=""
for l in /dev/disk/by-id/nvme-*; do
    [ "$(readlink -f "$l")" = "$DEV" ] && BYID=$l
done
[ -n "$BYID" ] || { ls -l /dev/disk/by-id >&2; echo "no by-id link for $DEV" >&2; exit 1; }
echo "STEP by-id $BYID"

mkfs.ext4 -q -F "$DEV"
mkdir -p /mnt/t
mount "$DEV" /mnt/t
dd if=/dev/urandom of=/mnt/t/data bs=1M count=16 status=none
SUM=$(sha256sum /mnt/t/data | cut -d' ' -f1)
sync
umount /mnt/t
echo "STEP wrote sum=$SUM"

mount "$DEV" /mnt/t
AGAIN=$(sha256sum /mnt/t/data | cut -d' ' -f1)
[ "$AGAIN" = "$SUM" ] || { echo "remount checksum mismatch: $AGAIN != $SUM" >&2; exit 1; }
umount /mnt/t
echo "STEP remount sum=$AGAIN"

nvme disconnect -n "$NQN" | grep -q "disconnected 1 controller"
sleep 0.5
if find_dev >/dev/null; then echo "device still present after disconnect" >&2; exit 1; fi
echo "STEP disconnected"

# Reconnect: the data must come back from the target's memory.
connect
# Drop the host page cache so the read goes over NVMe/TCP.
echo 3 >/proc/sys/vm/drop_caches
mount -o ro "$DEV" /mnt/t
THIRD=$(sha256sum /mnt/t/data | cut -d' ' -f1)
umount /mnt/t
[ "$THIRD" = "$SUM" ] || { echo "reconnect checksum mismatch: $THIRD != $SUM" >&2; exit 1; }
echo "STEP reconnect sum=$THIRD"
nvme disconnect -n "$NQN" >/dev/null

rm "$P/subsystems/$NQN"
rmdir "$P"
echo 0 >"$S/namespaces/1/enable"
rmdir "$S/namespaces/1"
rmdir "$S"
echo 0 >"$NB/power"
rmdir "$NB"
echo "STEP cleaned up"
"#;

#[test]
fn vm_kernel_nvmet_tcp_null_blk_ext4_roundtrip() -> Result<()> {
    let out = Vm::new()
        .mem_mib(1536)
        .udev(true)
        .timeout_secs(300)
        .run(KERNEL_TARGET_SCRIPT)
        .context("guest run")?;
    ensure!(
        out.status == 0,
        "guest script failed with {}:\n{}",
        out.status,
        out.output
    );
    for step in [
        "STEP null_blk /dev/cairnnb",
        "STEP nvmet-tcp port up",
        "STEP connected /dev/nvme",
        "size=268435456",
        "STEP by-id /dev/disk/by-id/nvme-",
        "STEP wrote sum=",
        "STEP remount sum=",
        "STEP disconnected",
        "STEP reconnect sum=",
        "STEP cleaned up",
    ] {
        ensure!(
            out.output.contains(step),
            "missing '{step}' in:\n{}",
            out.output
        );
    }
    let sum_of = |prefix: &str| -> Option<String> {
        let line = out.output.lines().find(|l| l.starts_with(prefix))?;
        Some(line[prefix.len()..].trim().to_string())
    };
    let wrote = sum_of("STEP wrote sum=").context("no written checksum")?;
    ensure!(wrote.len() == 64, "bad checksum '{wrote}'");
    ensure!(sum_of("STEP remount sum=").as_deref() == Some(wrote.as_str()));
    ensure!(sum_of("STEP reconnect sum=").as_deref() == Some(wrote.as_str()));
    Ok(())
}

#[test]
fn vm_exit_status_and_set_e() -> Result<()> {
    let out = Vm::new()
        .timeout_secs(180)
        .run("echo before\n(exit 7)\necho after\n")
        .context("guest run")?;
    ensure!(
        out.status == 7,
        "status {} instead of 7:\n{}",
        out.status,
        out.output
    );
    ensure!(out.output.contains("before"), "{}", out.output);
    ensure!(
        !out.output.contains("after"),
        "bash -e did not stop:\n{}",
        out.output
    );
    match Vm::new().timeout_secs(180).run_ok("exit 3") {
        Err(VmError::CommandFailed { status: 3, .. }) => Ok(()),
        other => anyhow::bail!("run_ok of 'exit 3' gave {other:?}"),
    }
}

#[test]
fn vm_share_and_host_loopback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("from-host"), "host-data\n")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let server = thread::spawn(move || -> Result<String> {
        // Generous: VM runs in this process queue up behind each other.
        let deadline = Instant::now() + Duration::from_secs(900);
        let (conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "guest never connected");
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        (&conn).write_all(b"hello-from-host\n")?;
        Ok(line)
    });

    // The test binary itself, built on the host, must run in the guest.
    let exe = std::env::current_exe()?;
    let exe_dir = exe.parent().context("test binary has no folder")?;
    let d = dir.path().display();
    let exe = exe.display();
    let script = format!(
        "cat {d}/from-host\n\
         {exe} --list | grep -q 'vm_share_and_host_loopback: test' && echo host-binary-runs\n\
         echo guest-data >{d}/from-guest\n\
         exec 3<>/dev/tcp/{HOST_ADDR_FROM_GUEST}/{port}\n\
         echo hello-from-guest >&3\n\
         read -r reply <&3\n\
         echo \"reply=$reply\"\n\
         ip route | grep -q default && echo HAS-DEFAULT-ROUTE || echo no-default-route\n"
    );
    let out = Vm::new()
        .share(dir.path())
        .share(exe_dir)
        .timeout_secs(240)
        .run_ok(&script)
        .context("guest run")?;
    ensure!(out.output.contains("host-data"), "{}", out.output);
    ensure!(out.output.contains("host-binary-runs"), "{}", out.output);
    ensure!(
        out.output.contains("reply=hello-from-host"),
        "{}",
        out.output
    );
    ensure!(out.output.contains("no-default-route"), "{}", out.output);
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(got.trim() == "hello-from-guest", "host got '{got}'");
    let back = std::fs::read_to_string(dir.path().join("from-guest"))?;
    ensure!(back == "guest-data\n", "share write-back: '{back}'");
    Ok(())
}

#[test]
fn vm_hard_timeout_kills_the_guest() -> Result<()> {
    let started = Instant::now();
    match Vm::new().timeout_secs(25).run("sleep 600") {
        Err(VmError::Timeout { secs: 25, .. }) => {}
        other => anyhow::bail!("expected a timeout, got {other:?}"),
    }
    // It must have run into the limit rather than failing early.
    ensure!(
        started.elapsed() >= Duration::from_secs(25),
        "gave up after only {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn vm_missing_image_is_a_loud_error() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let out = Command::new(vm_dir().join("run.sh"))
        .args(["--timeout", "30", "--", "true"])
        .env("CAIRN_VM_CACHE", empty.path())
        .output()?;
    ensure!(out.status.code() == Some(125), "exit {:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("ERROR") && err.contains("VM image incomplete"),
        "{err}"
    );
    ensure!(Path::new(&vm_dir().join("build-image.sh")).exists());
    Ok(())
}
