#!/usr/bin/env bash
# Install every host package the Cairn VM harness needs on a Debian 12 host.
# Idempotent: refreshes the package lists (build-image.sh downloads packages
# by their current versions, so the lists must be fresh) and installs only
# what is missing. QEMU, the guest kernel, busybox and debootstrap are NOT
# installed on the host: build-image.sh unpacks them into its cache.
set -euo pipefail

PKGS=(
    apt dpkg libc-bin            # apt-get download, dpkg -x, ldd
    coreutils util-linux grep mawk tar gzip xz-utils  # timeout, flock, realpath, od
    e2fsprogs                    # mkfs.ext4 -d
    wget ca-certificates gpgv debian-archive-keyring perl-base  # debootstrap
)

if [[ $(id -u) != 0 ]]; then
    echo "install-deps.sh: must run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q "^i[it]" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps.sh: installing ${missing[*]}" >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps.sh: host packages for the VM harness are present" >&2
