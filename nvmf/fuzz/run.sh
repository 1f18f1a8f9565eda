#!/bin/sh
# Fuzzes NVMe/TCP PDU and command parsing for a bounded time.
# Usage: nvmf/fuzz/run.sh SECONDS
# cargo-fuzz needs nightly compiler features; only a stable toolchain is
# installed, so RUSTC_BOOTSTRAP=1 unlocks them on that compiler.
set -eu
secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
cd "$here"
mkdir -p corpus/pdu artifacts/pdu
# Crash seeds and hand-written malformed PDUs under regressions/ are
# replayed first.
if [ -d regressions ] && [ -n "$(ls -A regressions 2>/dev/null)" ]; then
    RUSTC_BOOTSTRAP=1 cargo fuzz run pdu regressions/* -- -runs=0
fi
RUSTC_BOOTSTRAP=1 cargo fuzz run pdu corpus/pdu -- \
    -max_total_time="$secs" -max_len=4096 -rss_limit_mb=1024
