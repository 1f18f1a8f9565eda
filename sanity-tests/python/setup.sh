#!/usr/bin/env bash
# Creates the virtualenv the Python CSI client test uses (grpcio and
# grpcio-tools from PyPI, pinned) and prints its python. Quick when it
# exists already. scripts/install-deps.sh runs it, so CI has it.
set -euo pipefail

GRPCIO_VERSION=1.85.1

venv="${XDG_CACHE_HOME:-$HOME/.cache}/cairn-grpc-venv"
stamp="$venv/.grpcio-$GRPCIO_VERSION"
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION"
    touch "$stamp"
fi
echo "$venv/bin/python"
