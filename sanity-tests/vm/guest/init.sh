#!/bin/bash
# PID 1 of the Cairn test VM (installed as /sbin/cairn-init in the root image).
#
# The host hands over a control folder through 9p (tag "cairnctl"):
#   env      shell variables: CAIRN_SHARES (tag=path lines), CAIRN_UDEV,
#            CAIRN_HOSTNQN, CAIRN_HOSTID, CAIRN_CWD
#   cmd.sh   the command to run, as root, under bash -e
# The command's output goes to /dev/ttyS1 (the host's stdout); the kernel
# console stays on ttyS0. Its exit status is written to status, then the VM
# reboots, which ends QEMU (-no-reboot).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
CTL=/run/cairn-ctl

out() { echo "cairn-init: $*" >/dev/ttyS1; echo "cairn-init: $*" >/dev/console; }
halt_now() {
    sync
    echo b >/proc/sysrq-trigger
    sleep 30
}
fail() {
    out "ERROR: $*"
    halt_now
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm "$CTL"
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# The initramfs normally loaded these already.
for m in configfs 9pnet_virtio 9p virtio_net virtio_rng; do
    [ -d "/sys/module/$m" ] || modprobe "$m" || fail "cannot load module $m"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=262144 cairnctl "$CTL" ||
    fail "cannot mount the control share"
[ -f "$CTL/env" ] || fail "no $CTL/env"
# shellcheck disable=SC1091
. "$CTL/env"

hostname cairn-vm
mkdir -p /etc/nvme
echo "$CAIRN_HOSTNQN" >/etc/nvme/hostnqn
echo "$CAIRN_HOSTID" >/etc/nvme/hostid

# Network: guest 10.0.2.15/24 on QEMU user networking; 10.0.2.2 is the host's
# loopback. No default route, so nothing can leave the host.
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0

while IFS='=' read -r tag path; do
    [ -n "$tag" ] || continue
    mkdir -p "$path"
    mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=262144 "$tag" "$path" ||
        fail "cannot mount share $tag at $path"
done <<<"${CAIRN_SHARES:-}"

if [ "${CAIRN_UDEV:-0}" = 1 ]; then
    /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 || fail "systemd-udevd did not start"
    # udevd handles every new device; the coldplug replay is limited to the
    # storage subsystems, since a full one costs ~10 s under TCG.
    udevadm trigger --action=add --subsystem-match=block --subsystem-match=nvme \
        --subsystem-match=nvme-subsystem --subsystem-match=misc
    udevadm settle --timeout=30 || true
fi

stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null || true
if [ -n "${CAIRN_CWD:-}" ] && [ -d "$CAIRN_CWD" ]; then cd "$CAIRN_CWD" || cd /; else cd /; fi
bash -e "$CTL/cmd.sh" </dev/null >/dev/ttyS1 2>&1
rc=$?
echo "$rc" >"$CTL/status.tmp" && mv "$CTL/status.tmp" "$CTL/status"
sync
umount "$CTL" 2>/dev/null
halt_now
