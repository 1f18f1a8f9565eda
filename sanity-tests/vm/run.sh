#!/usr/bin/env bash
# Boot the Cairn test VM, run one command in it as root and exit with that
# command's exit status.
#
#   run.sh [--cpus N] [--mem SIZE] [--share HOSTDIR]... [--timeout SECS]
#          [--udev] [--console] [--build] [--result-file FILE]
#          -- SCRIPT_OR_COMMAND [ARGS...]
#
# SCRIPT_OR_COMMAND is a host script file (copied into the guest), a single
# string of shell text, or a command with arguments. It runs under `bash -e`
# with its stdout and stderr streamed live to this script's stdout.
#
#   --cpus N          guest vCPUs (default 2)
#   --mem SIZE        guest memory, QEMU syntax (default 1536M)
#   --share HOSTDIR   9p-share HOSTDIR into the guest at the same path
#                     (version=9p2000.L,cache=mmap); repeatable
#   --timeout SECS    hard limit for the whole VM run (default 600); QEMU is
#                     killed and the script fails with status 124
#   --udev            start systemd-udevd in the guest (/dev/disk/by-id)
#   --console         also stream the guest kernel console to stderr
#   --build           run build-image.sh first (a no-op when it is cached)
#   --result-file F   write "status N" or "error MESSAGE" to F, so callers
#                     can tell the guest's status from a harness failure
#
# The guest is 10.0.2.15 on QEMU user networking with no default route; the
# host's 127.0.0.1 is reachable as 10.0.2.2. Every run starts from a clean
# root image (snapshot=on) with its own /etc/nvme/hostnqn and hostid.
#
# Exit status: the guest command's, 124 on timeout, 125 on a harness error
# (missing image, QEMU failure, guest that never ran the command).
set -uo pipefail

# One compound command: bash parses all of it before running, so editing
# this file during a run cannot derail the run.
{

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CAIRN_VM_CACHE:-/var/cache/cairn-vm}"
CPUS=2
MEM=1536M
TIMEOUT=600
UDEV=0
CONSOLE=0
BUILD=0
RESULT_FILE=""
SHARES=()

RESULT_WRITTEN=0
result() {
    if [[ -n $RESULT_FILE && $RESULT_WRITTEN == 0 ]]; then
        printf '%s\n' "$*" >"$RESULT_FILE"
        RESULT_WRITTEN=1
    fi
}
die() {
    printf '\n[cairn-vm] ERROR: %s\n' "$*" >&2
    result "error $*"
    exit 125
}
usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 125
}

while (($#)); do
    case $1 in
    --cpus) CPUS=${2:?}; shift 2 ;;
    --mem) MEM=${2:?}; shift 2 ;;
    --share) SHARES+=("${2:?}"); shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --udev) UDEV=1; shift ;;
    --console) CONSOLE=1; shift ;;
    --build) BUILD=1; shift ;;
    --result-file) RESULT_FILE=${2:?}; shift 2 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done
(($#)) || die "no command given (usage: run.sh [options] -- SCRIPT_OR_COMMAND)"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus wants a positive number, got '$CPUS'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout wants seconds, got '$TIMEOUT'"

if ((BUILD)); then
    "$HERE/build-image.sh" || die "build-image.sh failed"
fi

QROOT="$CACHE/qemu/root"
QEMU="$QROOT/usr/bin/qemu-system-x86_64"
VMLINUX="$CACHE/kernel/vmlinux"
INITRD="$CACHE/initramfs.cpio.gz"
ROOTIMG="$CACHE/rootfs.ext4"
for f in "$CACHE/stamp" "$QEMU" "$VMLINUX" "$INITRD" "$ROOTIMG"; do
    [[ -e $f ]] || die "VM image incomplete: $f is missing; run sanity-tests/vm/build-image.sh (CAIRN_VM_CACHE=$CACHE)"
done
export LD_LIBRARY_PATH="$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# KVM here is kvm_pvm, which only runs PVM guest kernels: use TCG then.
ACCEL="${CAIRN_VM_ACCEL:-}"
if [[ -z $ACCEL ]]; then
    if [[ ! -d /sys/module/kvm_pvm && -w /dev/kvm ]]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
case $ACCEL in
kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
tcg) ACCEL_ARGS=(-accel "tcg,thread=multi" -cpu max) ;;
*) die "CAIRN_VM_ACCEL must be kvm or tcg, got '$ACCEL'" ;;
esac

CTL=$(mktemp -d "${TMPDIR:-/tmp}/cairn-vm.XXXXXX") || die "mktemp failed"
QPID=""
TAILPID=""
cleanup() {
    [[ -n $QPID ]] && kill "$QPID" 2>/dev/null
    [[ -n $TAILPID ]] && kill "$TAILPID" 2>/dev/null
    rm -rf "$CTL"
}
trap cleanup EXIT
trap 'result "error interrupted"; exit 130' INT TERM HUP

# The command. One argument that is a file: a script. One other argument:
# shell text. Several: a command line, quoted as given.
if (($# == 1)) && [[ -f $1 ]]; then
    cp "$1" "$CTL/cmd.sh"
elif (($# == 1)); then
    printf '%s\n' "$1" >"$CTL/cmd.sh"
else
    printf '%q ' "$@" >"$CTL/cmd.sh"
    echo >>"$CTL/cmd.sh"
fi

FSDEVS=(-virtfs "local,path=$CTL,mount_tag=cairnctl,security_model=none,multidevs=remap")
SHARE_LINES=""
i=0
for s in "${SHARES[@]}"; do
    d=$(realpath -e "$s" 2>/dev/null) || die "--share $s: no such directory"
    [[ -d $d ]] || die "--share $s: not a directory"
    [[ $d != *,* && $d != *=* && $d != *$'\n'* ]] || die "--share $s: path has ',', '=' or a newline"
    FSDEVS+=(-virtfs "local,path=$d,mount_tag=share$i,security_model=none,multidevs=remap")
    SHARE_LINES+="share$i=$d"$'\n'
    i=$((i + 1))
done

UUID=$(cat /proc/sys/kernel/random/uuid)
{
    printf 'CAIRN_SHARES=%q\n' "$SHARE_LINES"
    printf 'CAIRN_UDEV=%q\n' "$UDEV"
    printf 'CAIRN_HOSTNQN=%q\n' "nqn.2014-08.org.nvmexpress:uuid:$UUID"
    printf 'CAIRN_HOSTID=%q\n' "$UUID"
    printf 'CAIRN_CWD=%q\n' "$PWD"
} >"$CTL/env"

: >"$CTL/console.log"
if ((CONSOLE)); then
    tail -n +1 -F "$CTL/console.log" >&2 2>/dev/null &
    TAILPID=$!
fi

T0=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" "$QEMU" \
    -nodefaults -no-user-config -display none -monitor none -no-reboot \
    -machine pc "${ACCEL_ARGS[@]}" -smp "$CPUS" -m "$MEM" \
    -kernel "$VMLINUX" -initrd "$INITRD" \
    -append "console=ttyS0,115200 panic=-1 quiet loglevel=4 mitigations=off tsc=reliable i8042.noaux i8042.nokbd modprobe.blacklist=floppy,kvm,kvm_amd,kvm_intel,ata_piix,ata_generic,pata_acpi,pcspkr,i2c_piix4,ccp" \
    -drive "file=$ROOTIMG,format=raw,if=none,id=root,snapshot=on,cache=unsafe" \
    -device virtio-blk-pci,drive=root,serial=cairn-root \
    -chardev "file,id=con,path=$CTL/console.log" -serial chardev:con \
    -chardev stdio,id=out,signal=off -serial chardev:out \
    -netdev user,id=n0,net=10.0.2.0/24,host=10.0.2.2,ipv6=off \
    -device virtio-net-pci,netdev=n0,romfile= \
    -device virtio-rng-pci \
    "${FSDEVS[@]}" </dev/null &
QPID=$!
wait "$QPID"
QRC=$?
QPID=""
ELAPSED=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$T0}")
if [[ -n $TAILPID ]]; then
    sleep 0.2
    kill "$TAILPID" 2>/dev/null
    TAILPID=""
fi

console_tail() {
    if ((!CONSOLE)); then
        echo "[cairn-vm] last guest console lines:" >&2
        tail -n 40 "$CTL/console.log" | sed 's/^/[console] /' >&2
    fi
}

if ((QRC == 124 || QRC == 137)); then
    console_tail
    printf '\n[cairn-vm] ERROR: TIMEOUT after %ss: QEMU killed\n' "$TIMEOUT" >&2
    result "error timeout after ${TIMEOUT}s"
    exit 124
fi
if [[ ! -f $CTL/status ]]; then
    console_tail
    die "guest ended without running the command to completion (QEMU exit $QRC after ${ELAPSED}s)"
fi
STATUS=$(cat "$CTL/status")
[[ $STATUS =~ ^[0-9]+$ ]] || die "guest wrote a bad status '$STATUS'"
echo "[cairn-vm] guest command exited $STATUS after ${ELAPSED}s (accel $ACCEL, $CPUS vCPUs, $MEM)" >&2
result "status $STATUS"
exit "$STATUS"
exit 125
}
