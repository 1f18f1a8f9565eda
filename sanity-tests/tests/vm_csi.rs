//! Cairn's CSI driver end to end on a real kernel, the way kubelet drives
//! it: the host runs Cairn (engine, agent, controller, and a second node on
//! 127.0.0.2, so every volume has two replicas and its nexus reaches one of
//! them through Cairn's own initiator) and acts as the external provisioner
//! and attacher (CreateVolume,
//! ControllerPublishVolume); the Debian 12 guest (kernel 6.1) runs
//! `cairn-csi --mode node` and `csi-kubelet`, which stages the volume
//! (`nvme connect` to the host's target at 10.0.2.2, mkfs, mount),
//! publishes it into pod paths, uses it, and tears it down again.
//!
//! Host and guest coordinate through files in a shared directory: the guest
//! writes `ready-to-expand`, the host grows the published volume with
//! ControllerExpandVolume and writes `expanded` (or `expand-failed`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_cli::system::{System, SystemConfig};
use cairn_proto::csi::v1 as csi;
use cairn_sanity_tests::csi::{block_cap, create_request, ext4_rwo, range, CsiClients};
use cairn_sanity_tests::vm::{ensure_passed, target_dir, Vm, HOST_ADDR_FROM_GUEST};
use csi::volume_capability::access_mode::Mode;

const MIB: i64 = 1 << 20;
const NODE: &str = "vm-node";

/// Builds `cairn-csi` next to `csi-kubelet` (same profile) and returns both.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let kubelet = PathBuf::from(env!("CARGO_BIN_EXE_csi-kubelet"));
    let dir = kubelet.parent().context("binary dir")?.to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace dir")?;
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "cairn-csi", "--bin", "cairn-csi"])
        .current_dir(workspace);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let st = cmd.status().context("running cargo build -p cairn-csi")?;
    ensure!(st.success(), "cargo build -p cairn-csi failed: {st}");
    let csi = dir.join("cairn-csi");
    ensure!(csi.exists(), "{} missing after the build", csi.display());
    Ok((csi, kubelet))
}

/// A running system with CSI clients on a client runtime.
struct Host {
    sys: System,
    rt: tokio::runtime::Runtime,
    csi: CsiClients,
    _data: tempfile::TempDir,
}

impl Host {
    fn start(host_nqn: &str) -> Result<Host> {
        let data = tempfile::tempdir()?;
        let mut cfg = SystemConfig::ephemeral(data.path().to_path_buf());
        cfg.pool_size = 2 << 30;
        cfg.node_id = Some(NODE.into());
        cfg.host_nqn = Some(host_nqn.into());
        // A second node on 127.0.0.2 holds each volume's other replica; the
        // nexus on the VM's node reaches it through Cairn's initiator.
        cfg.replica_nodes = 1;
        let sys = System::start(cfg).context("starting the system")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let csi = rt.block_on(CsiClients::connect(&sys.csi_socket))?;
        Ok(Host {
            sys,
            rt,
            csi,
            _data: data,
        })
    }

    /// CreateVolume + ControllerPublishVolume to the VM's node; returns the
    /// volume id and the publish context as the guest must see it.
    fn provision(
        &self,
        name: &str,
        bytes: i64,
        cap: csi::VolumeCapability,
    ) -> Result<(String, Vec<(String, String)>)> {
        let mut ctl = self.csi.controller.clone();
        let agent_endpoint = self.sys.agent_endpoint.clone();
        self.rt.block_on(async move {
            let mut req = create_request(name, bytes, &[("nrIoQueues", "2"), ("repl", "2")]);
            req.volume_capabilities = vec![cap.clone()];
            let vol = ctl
                .create_volume(req)
                .await?
                .into_inner()
                .volume
                .context("no volume")?;
            let mut agent = cairn_proto::agent::v1::control_client::ControlClient::connect(
                agent_endpoint.clone(),
            )
            .await?;
            let placed = agent
                .get_volume(cairn_proto::agent::v1::GetVolumeRequest {
                    id: vol.volume_id.clone(),
                })
                .await?
                .into_inner();
            let mut nodes: Vec<&str> = placed.replicas.iter().map(|r| r.node.as_str()).collect();
            nodes.sort();
            nodes.dedup();
            ensure!(nodes.len() == 2, "replicas on {nodes:?}, want two nodes");
            let pc = ctl
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    node_id: NODE.into(),
                    volume_capability: Some(cap),
                    volume_context: vol.volume_context.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .publish_context;
            // The target listens on the host's loopback; the guest reaches
            // it through QEMU's user network.
            let mut ctx: Vec<(String, String)> = pc.into_iter().collect();
            for (k, v) in ctx.iter_mut() {
                if k == "address" {
                    *v = HOST_ADDR_FROM_GUEST.into();
                }
            }
            ctx.sort();
            anyhow::Ok((vol.volume_id, ctx))
        })
    }

    fn expand(&self, id: &str, bytes: i64) -> Result<csi::ControllerExpandVolumeResponse> {
        let mut ctl = self.csi.controller.clone();
        let id = id.to_owned();
        self.rt.block_on(async move {
            Ok(ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id,
                    capacity_range: range(bytes, 0),
                    volume_capability: Some(ext4_rwo()),
                    ..Default::default()
                })
                .await?
                .into_inner())
        })
    }

    fn teardown(self, ids: &[&str]) -> Result<()> {
        let mut ctl = self.csi.controller.clone();
        let res = self.rt.block_on(async move {
            for id in ids {
                ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: (*id).into(),
                    node_id: NODE.into(),
                    ..Default::default()
                })
                .await?;
                ctl.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: (*id).into(),
                    ..Default::default()
                })
                .await?;
            }
            anyhow::Ok(())
        });
        drop(self.rt);
        let stopped = self.sys.stop();
        res?;
        stopped
    }
}

fn ctx_args(ctx: &[(String, String)]) -> String {
    ctx.iter()
        .map(|(k, v)| format!("--ctx {k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bash helpers and the node plugin, started in the guest before each
/// scenario.
const PRELUDE: &str = r#"
log() { echo "== $*"; }
pass() { echo "PASS $1"; }
die() {
    echo "FAIL: $*"
    echo "--- cairn-csi log"; tail -n 40 "$SHARE/csi.log" || true
    echo "--- dmesg"; dmesg | tail -n 25
    exit 1
}
K() { "$KUBELET" --endpoint unix:///run/csi.sock "$@"; }
ctrl_of() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        [ "$(cat "$c/subsysnqn")" = "$1" ] && basename "$c"
    done
    return 0
}
mounted() { findmnt -rn --mountpoint "$1" >/dev/null; }

modprobe nvme-tcp
"$CAIRN_CSI" --mode node --endpoint unix:///run/csi.sock --node-id "$NODE" \
    --host-nqn "$HOSTNQN" --device-timeout-secs 30 --alpha-capabilities >"$SHARE/csi.log" 2>&1 &
K wait || die "node plugin did not become ready"
K info
pass plugin-ready
"#;

/// Filesystem volume: stage (connect, mkfs, mount), publish into two pods,
/// write, stats.
const FS_SETUP: &str = r#"
S=/var/lib/kubelet/plugins/kubernetes.io/csi/csi.cairn.dev/fs/globalmount
A=/var/lib/kubelet/pods/pod-a/volumes/kubernetes.io~csi/fs/mount
B=/var/lib/kubelet/pods/pod-b/volumes/kubernetes.io~csi/fs/mount
C=/var/lib/kubelet/pods/pod-c/volumes/kubernetes.io~csi/fs/mount

log "NodeStageVolume (nvme connect, mkfs.ext4, mount)"
t0=$(date +%s%N)
K stage --volume "$FS_VOL" --staging "$S" --fs ext4 $FS_CTX || die "stage failed"
echo "stage took $((($(date +%s%N) - t0) / 1000000)) ms"
c=$(ctrl_of "$FS_NQN")
[ -n "$c" ] || die "no controller for $FS_NQN"
echo "controller $c state=$(cat /sys/class/nvme/$c/state) queues=$(ls -d /sys/class/nvme/$c/nvme*c*n* 2>/dev/null | wc -l)"
[ "$(cat /sys/class/nvme/$c/subsysnqn)" = "$FS_NQN" ] || die "wrong subsystem"
mounted "$S" || die "staging path not mounted"
[ "$(findmnt -rn -o FSTYPE --mountpoint "$S")" = ext4 ] || die "staging is not ext4"
pass fs-stage
K stage --volume "$FS_VOL" --staging "$S" --fs ext4 $FS_CTX || die "second stage failed"
[ "$(findmnt -rn --mountpoint "$S" | wc -l)" = 1 ] || die "second stage mounted again"
[ "$(ctrl_of "$FS_NQN" | wc -l)" = 1 ] || die "second stage connected again"
pass fs-stage-idempotent

log "NodePublishVolume into two pods"
K publish --volume "$FS_VOL" --staging "$S" --target "$A" --fs ext4 $FS_CTX || die "publish A failed"
K publish --volume "$FS_VOL" --staging "$S" --target "$B" --fs ext4 $FS_CTX || die "publish B failed"
K publish --volume "$FS_VOL" --staging "$S" --target "$A" --fs ext4 $FS_CTX || die "second publish A failed"
mounted "$A" && mounted "$B" || die "targets not mounted"
[ "$(findmnt -rn --mountpoint "$A" | wc -l)" = 1 ] || die "second publish mounted again"
# Published read-write there already: a read-only publish is incompatible.
out=$(K publish --volume "$FS_VOL" --staging "$S" --target "$A" --fs ext4 --readonly $FS_CTX) \
    && die "read-only publish over a read-write one succeeded"
grep -q "^error AlreadyExists" <<<"$out" || die "incompatible publish: $out (want ALREADY_EXISTS)"
pass fs-publish

log "write through pod A, read through pod B"
echo "hello from pod a" > "$A/hello.txt"
dd if=/dev/urandom of="$A/blob" bs=1M count=8 status=none
sync
sum=$(sha256sum < "$A/blob" | cut -d' ' -f1)
[ "$(cat "$B/hello.txt")" = "hello from pod a" ] || die "pod B does not see pod A's file"
[ "$(sha256sum < "$B/blob" | cut -d' ' -f1)" = "$sum" ] || die "pod B reads other data"
echo "$sum" > "$SHARE/blob.sha256"
pass fs-write

log "read-only publish into a third pod"
R=/var/lib/kubelet/pods/pod-r/volumes/kubernetes.io~csi/fs/mount
K publish --volume "$FS_VOL" --staging "$S" --target "$R" --fs ext4 --readonly $FS_CTX || die "read-only publish failed"
findmnt -rn -o OPTIONS --mountpoint "$R" | tr , '\n' | grep -qx ro || die "$R is not mounted read-only"
[ "$(cat "$R/hello.txt")" = "hello from pod a" ] || die "read-only pod cannot read"
if touch "$R/nope" 2>/dev/null; then die "wrote through a read-only publish"; fi
K unpublish --volume "$FS_VOL" --target "$R" || die "unpublish of the read-only pod failed"
mounted "$R" && die "$R still mounted"
pass fs-publish-readonly

log "NodeGetVolumeStats"
out=$(K stats --volume "$FS_VOL" --path "$A") || die "stats failed: $out"
echo "$out"
total=$(sed -n 's/^bytes total=\([0-9]*\) .*/\1/p' <<<"$out")
used=$(sed -n 's/^bytes total=[0-9]* used=\([0-9]*\) .*/\1/p' <<<"$out")
[ -n "$total" ] && [ "$total" -gt $((40 << 20)) ] && [ "$total" -le $((64 << 20)) ] || die "bytes total $total for a 64 MiB volume"
[ "$used" -ge $((8 << 20)) ] || die "bytes used $used after writing 8 MiB"
grep -q '^inodes total=' <<<"$out" || die "no inode usage"
df_total=$(df -B1 --output=size "$A" | tail -n1 | tr -d ' ')
[ "$df_total" = "$total" ] || die "stats total $total != df $df_total"
K health --volume "$FS_VOL" --path "$A" | grep -qx healthy || die "attached volume not healthy"
pass fs-stats
"#;

/// Online expansion of the staged and published filesystem volume: the
/// host grows it (ControllerExpandVolume), then NodeExpandVolume here.
const FS_EXPAND: &str = r#"
log "online expansion: ControllerExpandVolume on the host, NodeExpandVolume here"
before=$(df -B1 --output=size "$A" | tail -n1 | tr -d ' ')
touch "$SHARE/ready-to-expand"
for i in $(seq 1 600); do
    [ -e "$SHARE/expanded" ] || [ -e "$SHARE/expand-failed" ] && break
    sleep 0.2
done
[ -e "$SHARE/expand-failed" ] && die "host could not expand: $(cat "$SHARE/expand-failed")"
[ -e "$SHARE/expanded" ] || die "host never expanded the volume"
out=$(K expand --volume "$FS_VOL" --path "$A" --bytes "$EXPANDED_BYTES") || die "NodeExpandVolume failed: $out"
echo "$out"
dev=$(findmnt -rn -o SOURCE --mountpoint "$S")
echo "device $dev: $(blockdev --getsize64 "$dev") bytes"
[ "$(blockdev --getsize64 "$dev")" -ge "$EXPANDED_BYTES" ] || die "device did not grow"
after=$(df -B1 --output=size "$A" | tail -n1 | tr -d ' ')
echo "filesystem: $before -> $after bytes"
[ "$after" -gt $((before + (48 << 20))) ] || die "filesystem did not grow ($before -> $after)"
[ "$(sha256sum < "$B/blob" | cut -d' ' -f1)" = "$sum" ] || die "data changed by the expansion"
pass fs-expand
"#;

/// Unpublish both pods, unstage, then stage and publish again (the pod
/// moves): files and filesystem size intact.
const FS_TEARDOWN: &str = r#"
after=$(df -B1 --output=size "$A" | tail -n1 | tr -d ' ')
log "NodeUnpublishVolume both, NodeUnstageVolume"
K unpublish --volume "$FS_VOL" --target "$A" || die "unpublish A failed"
K unpublish --volume "$FS_VOL" --target "$B" || die "unpublish B failed"
K unpublish --volume "$FS_VOL" --target "$B" || die "second unpublish B failed"
mounted "$A" || mounted "$B" && die "a target is still mounted"
[ -e "$A" ] && die "target $A still exists"
K unstage --volume "$FS_VOL" --staging "$S" || die "unstage failed"
K unstage --volume "$FS_VOL" --staging "$S" || die "second unstage failed"
mounted "$S" && die "staging still mounted"
[ -z "$(ctrl_of "$FS_NQN")" ] || die "controller still connected after unstage"
pass fs-teardown

log "the pod moves: stage and publish again"
K stage --volume "$FS_VOL" --staging "$S" --fs ext4 $FS_CTX || die "re-stage failed"
K publish --volume "$FS_VOL" --staging "$S" --target "$C" --fs ext4 $FS_CTX || die "publish C failed"
[ "$(cat "$C/hello.txt")" = "hello from pod a" ] || die "file lost across unstage/stage"
[ "$(sha256sum < "$C/blob" | cut -d' ' -f1)" = "$sum" ] || die "blob changed across unstage/stage"
again=$(df -B1 --output=size "$C" | tail -n1 | tr -d ' ')
[ "$again" = "$after" ] || die "filesystem size $again after re-stage, $after before"
K unpublish --volume "$FS_VOL" --target "$C" || die "unpublish C failed"
K unstage --volume "$FS_VOL" --staging "$S" || die "final unstage failed"
[ -z "$(ctrl_of "$FS_NQN")" ] || die "controller still connected"
pass fs-restage
"#;

/// Raw block volume: stage (connect only), publish onto a device file, raw
/// direct I/O through it, stats, teardown, and the data after re-stage.
const BLOCK_SCRIPT: &str = r#"
S=/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/blk
P=/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/blk/pod-d
Q=/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/blk/pod-e

log "block: stage, publish"
K stage --volume "$BLK_VOL" --staging "$S" --block $BLK_CTX || die "block stage failed"
[ -n "$(ctrl_of "$BLK_NQN")" ] || die "no controller for $BLK_NQN"
K publish --volume "$BLK_VOL" --staging "$S" --target "$P" --block $BLK_CTX || die "block publish failed"
K publish --volume "$BLK_VOL" --staging "$S" --target "$P" --block $BLK_CTX || die "second block publish failed"
[ -b "$P" ] || die "$P is not a block device"
size=$(blockdev --getsize64 "$P")
[ "$size" = "$BLK_BYTES" ] || die "published device is $size bytes, volume $BLK_BYTES"
pass block-publish

log "block: raw direct I/O through the published device file"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 status=none
dd if=/tmp/pattern of="$P" bs=1M count=4 seek=2 oflag=direct status=none || die "direct write failed"
dd if="$P" of=/tmp/back bs=1M count=4 skip=2 iflag=direct status=none || die "direct read failed"
cmp /tmp/pattern /tmp/back || die "read back differs"
# The last MiB of the device too.
dd if=/tmp/pattern of="$P" bs=1M count=1 seek=$((size / 1048576 - 1)) oflag=direct status=none || die "tail write failed"
dd if="$P" of=/tmp/tail bs=1M count=1 skip=$((size / 1048576 - 1)) iflag=direct status=none
cmp <(head -c 1048576 /tmp/pattern) /tmp/tail || die "tail read back differs"
pass block-io

out=$(K stats --volume "$BLK_VOL" --path "$P") || die "block stats failed: $out"
echo "$out"
grep -q "^bytes total=$BLK_BYTES " <<<"$out" || die "block stats total is not $BLK_BYTES"
pass block-stats

log "block: teardown, stage and publish again"
K unpublish --volume "$BLK_VOL" --target "$P" || die "block unpublish failed"
[ -e "$P" ] && die "$P still exists"
K unstage --volume "$BLK_VOL" --staging "$S" || die "block unstage failed"
[ -z "$(ctrl_of "$BLK_NQN")" ] || die "block controller still connected"
K stage --volume "$BLK_VOL" --staging "$S" --block $BLK_CTX || die "block re-stage failed"
K publish --volume "$BLK_VOL" --staging "$S" --target "$Q" --block $BLK_CTX || die "block re-publish failed"
dd if="$Q" of=/tmp/back2 bs=1M count=4 skip=2 iflag=direct status=none
cmp /tmp/pattern /tmp/back2 || die "data lost across unstage/stage"
K unpublish --volume "$BLK_VOL" --target "$Q" || die "block unpublish failed"
K unstage --volume "$BLK_VOL" --staging "$S" || die "block unstage failed"
[ -z "$(ctrl_of "$BLK_NQN")" ] || die "block controller still connected"
pass block-restage
"#;

/// One guest run: an ext4 volume staged (real `nvme connect`, mkfs,
/// mount), published into two pods, written, measured, grown online
/// (ControllerExpandVolume on the host, NodeExpandVolume in the guest, `df`
/// shows it), torn down and staged again with its data; then a raw block
/// volume with direct I/O through the published device file, torn down and
/// staged again.
#[test]
fn vm_csi_node_lifecycle() -> Result<()> {
    let (cairn_csi, kubelet) = binaries()?;
    let host_nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4());
    let host = Host::start(&host_nqn)?;
    let (fs_vol, fs_ctx) = host.provision("vm-fs", 64 * MIB, ext4_rwo())?;
    let blk_bytes = 32 * MIB;
    let (blk_vol, blk_ctx) =
        host.provision("vm-blk", blk_bytes, block_cap(Mode::SingleNodeWriter))?;
    let expanded_bytes = 128 * MIB;
    let nqn_of = |ctx: &[(String, String)]| {
        ctx.iter()
            .find(|(k, _)| k == "nqn")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };

    let share = tempfile::Builder::new().prefix("cairn-vm-csi").tempdir()?;
    let share_path = share.path().to_path_buf();
    let vars = [
        ("SHARE", share_path.display().to_string()),
        ("CAIRN_CSI", cairn_csi.display().to_string()),
        ("KUBELET", kubelet.display().to_string()),
        ("NODE", NODE.to_owned()),
        ("HOSTNQN", host_nqn.clone()),
        ("FS_VOL", fs_vol.clone()),
        ("FS_NQN", nqn_of(&fs_ctx)),
        ("FS_CTX", ctx_args(&fs_ctx)),
        ("EXPANDED_BYTES", expanded_bytes.to_string()),
        ("BLK_VOL", blk_vol.clone()),
        ("BLK_NQN", nqn_of(&blk_ctx)),
        ("BLK_CTX", ctx_args(&blk_ctx)),
        ("BLK_BYTES", blk_bytes.to_string()),
    ];
    let mut script = String::new();
    for (k, v) in &vars {
        script.push_str(&format!("{k}='{v}'\n"));
    }
    let parts = [PRELUDE, FS_SETUP, FS_EXPAND, FS_TEARDOWN, BLOCK_SCRIPT];
    let checks = [
        "plugin-ready",
        "fs-stage",
        "fs-stage-idempotent",
        "fs-publish",
        "fs-write",
        "fs-publish-readonly",
        "fs-stats",
        "fs-expand",
        "fs-teardown",
        "fs-restage",
        "block-publish",
        "block-io",
        "block-stats",
        "block-restage",
    ];
    for p in parts {
        script.push_str(p);
    }

    let vm = Vm::new()
        .cpus(2)
        .mem_mib(1536)
        .timeout_secs(300)
        .share(target_dir())
        .share(&share_path);
    let started = Instant::now();
    let guest = thread::spawn(move || vm.run(&script));

    // The host side of the online expansion.
    let ready = share_path.join("ready-to-expand");
    let mut expand_result = None;
    while !guest.is_finished() {
        if expand_result.is_none() && ready.exists() {
            let r = host.expand(&fs_vol, expanded_bytes);
            match &r {
                Ok(resp) => {
                    eprintln!("ControllerExpandVolume: {resp:?}");
                    std::fs::write(share_path.join("expanded"), "")?;
                }
                Err(e) => std::fs::write(share_path.join("expand-failed"), format!("{e:#}"))?,
            }
            expand_result = Some(r);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let out = guest
        .join()
        .map_err(|_| anyhow::anyhow!("VM thread panicked"))??;
    eprintln!("guest run took {:?}", started.elapsed());
    let teardown = host.teardown(&[&fs_vol, &blk_vol]);
    match expand_result {
        Some(Ok(r)) => {
            ensure!(r.capacity_bytes >= expanded_bytes, "expanded to {r:?}");
            ensure!(
                r.node_expansion_required,
                "ext4 volume needs node expansion"
            );
        }
        Some(Err(e)) => bail!("ControllerExpandVolume of the published volume failed: {e:#}"),
        None => {}
    }
    ensure_passed(&out, &checks)?;
    teardown
}
