#!/usr/bin/env bash
# Installs every system package Cairn's tests need on a fresh Debian 12
# machine (run as root). Idempotent and quick when everything is present.
#
#   etcd-server   the etcd state-store tests start a real etcd
#   python3-venv  the manifest checks run kubernetes-validate in a venv, and
#                 the Python CSI client test grpcio (sanity-tests/python)
#   (VM harness)  sanity-tests/vm/install-deps.sh: what the QEMU harness
#                 needs on the host; QEMU and the guest come from its cache
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
    echo "install-deps.sh: must run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

sanity-tests/vm/install-deps.sh

PKGS=(etcd-server)
python3 -c 'import venv, ensurepip' 2>/dev/null || PKGS+=(python3-venv)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q "^i[it]" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps.sh: installing ${missing[*]}" >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged etcd as a service; tests run their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd || true
fi
# grpcio for the Python CSI client test (a virtualenv in the cache).
sanity-tests/python/setup.sh >/dev/null
echo "install-deps.sh: all test dependencies are present" >&2
