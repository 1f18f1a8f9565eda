#!/usr/bin/env bash
# Validates the Kubernetes manifests and the Dockerfile (see validate.py).
# Creates a virtualenv with the pinned kubernetes-validate on first use.
# The last line of output is "N passed, N failed"; the exit status is
# non-zero when any check failed.
set -euo pipefail

# kubernetes-validate bundles the API schemas; this release carries them up
# to Kubernetes 1.37, the release the manifests are checked against.
KUBERNETES_VALIDATE_VERSION=1.37.0
export CAIRN_KUBERNETES_VERSION="${CAIRN_KUBERNETES_VERSION:-1.37.0}"

here="$(cd "$(dirname "$0")" && pwd)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/cairn-manifests-venv"
stamp="$venv/.kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"

if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    touch "$stamp"
fi

exec "$venv/bin/python" "$here/validate.py"
