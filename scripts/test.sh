#!/usr/bin/env bash
# Runs every Cairn check, the way CI does:
#
#   1. system packages (scripts/install-deps.sh; needs root)
#   2. formatting and lints (cargo fmt --check, clippy -D warnings)
#   3. the release build the container image ships (scripts/build-release.sh)
#   4. Kubernetes manifest checks (manifests/test/run.sh)
#   5. a bounded fuzz run of the NVMe/TCP parsers (nvmf/fuzz/run.sh)
#   6. a --quick benchmark smoke run (checks the suite works, not speed)
#   7. all unit, integration, crash and VM tests (cargo test --workspace)
#
# Environment: CAIRN_FUZZ_SECS (default 60), CAIRN_SKIP_DEPS=1 to skip step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

if [[ "${CAIRN_SKIP_DEPS:-0}" != 1 ]]; then
    step "system packages"
    scripts/install-deps.sh
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "release build"
scripts/build-release.sh

step "manifest checks"
manifests/test/run.sh

step "fuzz NVMe/TCP parsing for ${CAIRN_FUZZ_SECS:-60}s"
nvmf/fuzz/run.sh "${CAIRN_FUZZ_SECS:-60}"

step "benchmark smoke runs (they check the benchmarks work, not speed)"
target/release/cairn-bench --ram 256m --rw randread --bs 4k --iodepth 16 --runtime 1s
target/release/cairnctl bench pool --dir /dev/shm --size 64M --runtime 0.3 --rounds 1
target/release/cairn-bench suite --quick --out "$(mktemp -d)"

step "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast
