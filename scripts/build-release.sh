#!/usr/bin/env bash
# Builds every Cairn binary in release mode. CI and the container image both
# run this script, so the image ships exactly what CI built and tested.
# Binaries land in target/release/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace --bins
