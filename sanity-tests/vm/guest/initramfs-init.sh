#!/bin/busybox sh
# shellcheck shell=dash
# initramfs /init: load the modules needed for the root disk, mount it and
# hand over to /sbin/cairn-init on the real root. On any failure, reboot
# (QEMU runs with -no-reboot, so the VM exits and the host reports it).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "cairn-initramfs: $*" >/dev/console
    echo b >/proc/sysrq-trigger
    sleep 10
}

while read -r m; do
    insmod "/lib/modules/$m" 2>/dev/null || echo "cairn-initramfs: insmod $m failed" >/dev/console
done </modules.order

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "no root disk /dev/vda"
    sleep 0.1
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
[ -x /newroot/sbin/cairn-init ] || fail "root disk has no /sbin/cairn-init"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/cairn-init
