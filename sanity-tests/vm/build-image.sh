#!/usr/bin/env bash
# Build (or verify) everything the Cairn test VM needs, cached outside the
# repository in ${CAIRN_VM_CACHE:-/var/cache/cairn-vm}:
#
#   qemu/       QEMU 7.2 from Debian bookworm, unpacked with dpkg -x (never
#               installed: the host keeps its own qemu-utils)
#   kernel/     Debian 12 linux-image (6.1) unpacked; vmlinux is the ELF
#               decompressed from the bzImage for fast PVH boot
#   tools/      busybox-static and debootstrap, unpacked
#   rootfs/     debootstrap --variant=minbase bookworm tree (+ test tools)
#   rootfs.ext4 the tree, the kernel modules and the guest init as an ext4
#               image (booted with snapshot=on, so every run starts clean)
#   initramfs.cpio.gz  busybox initramfs that mounts rootfs.ext4
#   stamp       what was built; a second run only checks stamps
#
# Each step has its own stamp, so changing the guest init only rebuilds the
# ext4 image. Prints how long each step took. Safe to run concurrently (flock).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CAIRN_VM_CACHE:-/var/cache/cairn-vm}"
MIRROR="${CAIRN_VM_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
# Bump a step's recipe number when the step changes in a way its inputs do
# not show; later steps rebuild with it.
R_QEMU=1 R_KERNEL=1 R_TOOLS=1 R_ROOTFS=1 R_IMAGE=1 R_INITRAMFS=1

ROOTFS_PACKAGES="nvme-cli,fio,e2fsprogs,xfsprogs,util-linux,udev,kmod,iproute2"
# Modules the initramfs loads (with their dependencies): the root disk, and
# what the guest init needs before anything else (busybox insmod is much
# quicker under TCG than kmod's modprobe).
INITRAMFS_MODULES="virtio_pci virtio_blk ext4 crc32c_generic crc32c-intel configfs 9pnet_virtio 9p
virtio_net virtio_rng"
# Module directories left out of the guest (large and never used in the VM).
MODULES_EXCLUDE="drivers/gpu drivers/media drivers/net/wireless net/wireless
net/mac80211 sound drivers/staging drivers/bluetooth net/bluetooth drivers/iio
drivers/infiniband/hw drivers/net/ethernet drivers/hid drivers/input/touchscreen"

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

need() {
    local missing=()
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    if ((${#missing[@]})); then
        die "missing host tools: ${missing[*]} (run sanity-tests/vm/install-deps.sh)"
    fi
}

TOTAL0=$(date +%s.%N)
step() {
    # step NAME KEY FUNCTION: run FUNCTION unless stamp NAME already holds KEY.
    local name=$1 key=$2 fn=$3 t0 t1
    local stamp="$CACHE/stamps/$name"
    if [[ -f $stamp && "$(cat "$stamp")" == "$key" ]]; then
        printf '[build-image] %-10s cached\n' "$name" >&2
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "step $name must be built as root (debootstrap, chroot, mkfs -d ownership)"
    t0=$(date +%s.%N)
    log "$name: building"
    rm -f "$stamp"
    "$fn"
    mkdir -p "$CACHE/stamps"
    printf '%s' "$key" >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
    t1=$(date +%s.%N)
    printf '[build-image] %-10s built in %.1fs\n' "$name" "$(awk "BEGIN{print $t1-$t0}")" >&2
}

apt_download() {
    # apt_download DIR PKG...: download .debs of PKG into DIR.
    local dir=$1
    shift
    mkdir -p "$dir"
    (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$@") >&2 ||
        die "apt-get download $* failed (is 'apt-get update' done?)"
}

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

first_deps() {
    # The Depends/Pre-Depends of the given packages, first alternative of
    # each group only (one apt-cache call: it is slow to start).
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$@" 2>/dev/null |
        awk '/^[^ ]/ { prev=0; next }
             { alt=prev; prev=($1 ~ /^\|/); if (alt) next;
               if ($1 ~ /Depends:$/ && $2 !~ /^</) print $2 }' | sort -u
}

closure_not_installed() {
    # Packages needed by "$@" (recursively) that the host does not have,
    # resolved breadth first, one apt-cache call per level.
    local -A seen=()
    local level=("$@") next out=() p
    while ((${#level[@]})); do
        next=()
        for p in "${level[@]}"; do
            [[ -n ${seen[$p]:-} ]] && continue
            seen[$p]=1
            installed "$p" && continue
            out+=("$p")
            next+=("$p")
        done
        ((${#next[@]})) || break
        mapfile -t level < <(first_deps "${next[@]}")
    done
    echo "${out[@]}"
}

# ---------------------------------------------------------------- steps

build_qemu() {
    local pkgs dir="$CACHE/qemu.tmp"
    rm -rf "$dir" "$CACHE/qemu"
    pkgs=$(closure_not_installed qemu-system-x86)
    [[ -n $pkgs ]] || die "could not resolve qemu-system-x86 dependencies"
    log "qemu: packages: $pkgs"
    # shellcheck disable=SC2086
    apt_download "$dir/debs" $pkgs
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
    local bin="$dir/root/usr/bin/qemu-system-x86_64"
    [[ -x $bin ]] || die "qemu-system-x86_64 not found in the unpacked packages"
    local libs
    libs=$(qemu_libpath "$dir/root")
    if LD_LIBRARY_PATH="$libs" ldd "$bin" | grep -q 'not found'; then
        LD_LIBRARY_PATH="$libs" ldd "$bin" | grep 'not found' >&2
        die "qemu has unresolved libraries"
    fi
    LD_LIBRARY_PATH="$libs" "$bin" --version | head -1 >&2
    ls "$dir"/debs >"$dir/packages.txt"
    rm -rf "$dir/debs"
    mv "$dir" "$CACHE/qemu"
}

qemu_libpath() {
    local root=$1
    echo "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/pulseaudio"
}

build_kernel() {
    local dir="$CACHE/kernel.tmp" pkg ver
    rm -rf "$dir" "$CACHE/kernel"
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    [[ -n $pkg ]] || die "cannot resolve linux-image-amd64"
    apt_download "$dir/debs" "$pkg"
    dpkg -x "$dir"/debs/*.deb "$dir/root"
    ver=$(ls "$dir/root/lib/modules")
    [[ -n $ver && -f "$dir/root/boot/vmlinuz-$ver" ]] || die "kernel package has no vmlinuz"
    # The bzImage carries an xz-compressed ELF: find the xz magic, decompress.
    local bz="$dir/root/boot/vmlinuz-$ver" off
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -1 | cut -d: -f1)
    [[ -n $off ]] || die "no xz payload in $bz"
    tail -c +"$((off + 1))" "$bz" | xz -dc 2>/dev/null >"$dir/vmlinux" || true
    [[ "$(head -c 4 "$dir/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]] ||
        die "decompressed kernel is not an ELF"
    cp "$bz" "$dir/bzImage"
    echo "$ver" >"$dir/version"
    rm -rf "$dir/debs"
    mv "$dir" "$CACHE/kernel"
}

build_tools() {
    local dir="$CACHE/tools.tmp"
    rm -rf "$dir" "$CACHE/tools"
    apt_download "$dir/debs" busybox-static debootstrap
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
    [[ -x $dir/root/bin/busybox && -x $dir/root/usr/sbin/debootstrap ]] ||
        die "busybox/debootstrap missing from their packages"
    rm -rf "$dir/debs"
    mv "$dir" "$CACHE/tools"
}

umount_under() {
    # Unmount anything still mounted below $1 (a failed debootstrap leaves /proc).
    local m
    for m in $(awk -v p="$1/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

build_rootfs() {
    local dir="$CACHE/rootfs.tmp" ds="$CACHE/tools/root"
    umount_under "$dir"
    rm -rf --one-file-system "$dir" "$CACHE/rootfs"
    mkdir -p "$CACHE/debootstrap-debs"
    DEBOOTSTRAP_DIR="$ds/usr/share/debootstrap" \
        "$ds/usr/sbin/debootstrap" --variant=minbase --include="$ROOTFS_PACKAGES" \
        --cache-dir="$CACHE/debootstrap-debs" \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
        tail -30 "$CACHE/debootstrap.log" >&2
        umount_under "$dir"
        die "debootstrap failed (full log: $CACHE/debootstrap.log)"
    }
    umount_under "$dir"
    # No name resolution and no package caches in the guest.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    : >"$dir/etc/resolv.conf"
    for t in nvme fio mkfs.ext4 mkfs.xfs ip modprobe udevadm; do
        chroot "$dir" /bin/sh -c "command -v $t" >/dev/null || die "rootfs lacks $t"
    done
    mv "$dir" "$CACHE/rootfs"
}

modules_dir() { echo "$CACHE/kernel/root/lib/modules/$(cat "$CACHE/kernel/version")"; }

build_image() {
    local ver tree="$CACHE/rootfs" img="$CACHE/rootfs.ext4.tmp" mods
    ver=$(cat "$CACHE/kernel/version")
    mods=$(modules_dir)
    # Kernel modules go into the tree under /lib/modules/VER (minus the
    # excluded folders); depmod runs with the tree's own kmod.
    rm -rf "$tree/lib/modules"
    mkdir -p "$tree/lib/modules/$ver"
    local excl=()
    for e in $MODULES_EXCLUDE; do excl+=(--exclude="kernel/$e"); done
    (cd "$mods" && tar -cf - "${excl[@]}" .) | tar -xf - -C "$tree/lib/modules/$ver"
    cp "$CACHE/kernel/root/boot/System.map-$ver" "$tree/lib/modules/$ver/System.map"
    chroot "$tree" /sbin/depmod -a -F "/lib/modules/$ver/System.map" "$ver"
    rm -f "$tree/lib/modules/$ver/System.map"
    install -m 0755 "$HERE/guest/init.sh" "$tree/sbin/cairn-init"
    echo cairn-vm >"$tree/etc/hostname"
    : >"$tree/etc/fstab"
    mkdir -p "$tree/etc/nvme" "$tree/run/cairn-ctl"
    local used size
    used=$(du -sm "$tree" | cut -f1)
    size=$((used + used / 4 + 1024))
    rm -f "$img"
    mkfs.ext4 -q -F -L cairn-root -d "$tree" "$img" "${size}M" >/dev/null
    mv "$img" "$CACHE/rootfs.ext4"
}

build_initramfs() {
    local dir="$CACHE/initramfs.tmp" ver mods bb="$CACHE/tools/root/bin/busybox"
    ver=$(cat "$CACHE/kernel/version")
    # Use the depmod output of the rootfs tree (the host may lack kmod).
    mods="$CACHE/rootfs/lib/modules/$ver"
    [[ -f $mods/modules.dep ]] || die "no modules.dep (image step incomplete)"
    rm -rf "$dir"
    mkdir -p "$dir"/{bin,dev,proc,sys,newroot,lib/modules}
    cp "$bb" "$dir/bin/busybox"
    local order=() m path deps d
    for m in $INITRAMFS_MODULES; do
        # modules.dep keys are paths; modules are named with _ or - in them.
        path=$(awk -F: -v a="/${m//-/_}.ko" -v b="/${m//_/-}.ko" \
            '{ n=$1; sub(/.*\//, "/", n) } n==a || n==b { print $1; exit }' "$mods/modules.dep")
        if [[ -z $path ]]; then
            if grep -qE "/(${m//-/_}|${m//_/-})\.ko$" "$mods/modules.builtin"; then continue; fi
            continue # not built for this kernel (e.g. crc32c-intel optional)
        fi
        deps=$(awk -F: -v k="$path" '$1==k { print $2 }' "$mods/modules.dep")
        # Dependencies load last-listed first.
        for d in $(echo "$deps" | tr ' ' '\n' | tac) "$path"; do
            [[ -z $d ]] && continue
            [[ " ${order[*]} " == *" $d "* ]] || order+=("$d")
        done
    done
    for p in "${order[@]}"; do
        mkdir -p "$dir/lib/modules/$(dirname "$p")"
        cp "$mods/$p" "$dir/lib/modules/$p"
        echo "$p" >>"$dir/modules.order"
    done
    install -m 0755 "$HERE/guest/initramfs-init.sh" "$dir/init"
    (cd "$dir" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1) >"$CACHE/initramfs.cpio.gz.tmp"
    mv "$CACHE/initramfs.cpio.gz.tmp" "$CACHE/initramfs.cpio.gz"
    rm -rf "$dir"
}

# ---------------------------------------------------------------- main

# The whole main part is one function, so bash has parsed all of it before
# running: editing this file while a build runs cannot derail that build.
main() {

    if [[ $(id -u) == 0 ]]; then
        need apt-get apt-cache dpkg dpkg-query xz gzip mkfs.ext4 chroot flock wget gpgv perl grep awk tar
        mkdir -p "$CACHE"
        exec 9>"$CACHE/.lock"
        flock 9
    else
        # Without root only a complete cache passes (each step checks its stamp).
        [[ -d $CACHE ]] || die "no VM cache at $CACHE; build it as root first"
    fi

    hash_of() { cat "$@" | sha256sum | cut -c1-16; }

    step qemu "recipe=$R_QEMU qemu-system-x86 $SUITE" build_qemu
    step kernel "recipe=$R_KERNEL linux-image-amd64 $SUITE" build_kernel
    step tools "recipe=$R_TOOLS busybox-static debootstrap" build_tools
    step rootfs "recipe=$R_ROOTFS $SUITE minbase $ROOTFS_PACKAGES" build_rootfs
    step image "recipe=$R_IMAGE kernel=$(cat "$CACHE/kernel/version") rootfs=$(cat "$CACHE/stamps/rootfs" | sha256sum | cut -c1-8) init=$(hash_of "$HERE/guest/init.sh") excl=$(echo "$MODULES_EXCLUDE" | sha256sum | cut -c1-8)" build_image
    step initramfs "recipe=$R_INITRAMFS image=$(cat "$CACHE/stamps/image" | sha256sum | cut -c1-8) init=$(hash_of "$HERE/guest/initramfs-init.sh") mods=$INITRAMFS_MODULES" build_initramfs

    [[ $(id -u) == 0 ]] && {
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "kernel=$(cat "$CACHE/kernel/version")"
        echo "qemu=$(grep -o 'qemu-system-x86_[^_]*' "$CACHE/qemu/packages.txt" | head -1)"
        for s in qemu kernel tools rootfs image initramfs; do echo "$s: $(cat "$CACHE/stamps/$s")"; done
    } >"$CACHE/stamp"
    printf '[build-image] done in %.1fs: %s\n' "$(awk "BEGIN{print $(date +%s.%N)-$TOTAL0}")" "$CACHE" >&2
}

main "$@"
exit $?
