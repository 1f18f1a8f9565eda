#!/usr/bin/env bash
# The suite's jobs with real fio and the Linux kernel NVMe/TCP initiator,
# inside the project's test VM (sanity-tests/vm/run.sh), against Cairn's
# engine started on the host by `cairn-bench serve` (a replica exported
# alone and nexuses of 1, 2 and 3 replicas, on nodes 127.0.0.1..3).
#
#   bench/vm-fio.sh [--runtime SECS] [--setups LIST] [--size SIZE] [--timeout SECS]
#
# The guest reaches the host's 127.0.0.1 as 10.0.2.2. QEMU runs the guest
# under TCG (no KVM here), so the absolute numbers are meaningless: this is
# a functional comparison (the same jobs work through the kernel initiator,
# with no errors, and the setups rank sensibly), not a measurement.
#
# Needs the VM image (sudo sanity-tests/vm/install-deps.sh and
# build-image.sh, once). CAIRN_BENCH=path uses that binary instead of
# building target/release/cairn-bench.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RUNTIME=10
SETUPS=replica,nexus-1,nexus-2,nexus-3
SIZE=256m
TIMEOUT=1800

while (($#)); do
    case $1 in
    --runtime) RUNTIME=${2:?}; shift 2 ;;
    --setups) SETUPS=${2:?}; shift 2 ;;
    --size) SIZE=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "vm-fio.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

banner() {
    cat <<'EOF'
==========================================================================
 NOTE: the guest runs under QEMU TCG (software emulation, no KVM). The
 absolute IOPS and latencies below are meaningless: compare setups only
 functionally (every job runs, no errors). Use `cairn-bench suite` for
 numbers.
==========================================================================
EOF
}

BENCH=${CAIRN_BENCH:-}
if [[ -z $BENCH ]]; then
    (cd "$ROOT" && cargo build --release -q -p cairn-bench)
    BENCH="$ROOT/target/release/cairn-bench"
fi

WORK="$(mktemp -d)"
SERVE_PID=""
cleanup() {
    if [[ -n $SERVE_PID ]]; then
        kill "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# The engine, on the host. Its standard input is a pipe kept open by this
# script: `serve` stops when it closes, even if this script is killed.
mkfifo "$WORK/stdin"
"$BENCH" serve --setups "$SETUPS" --size "$SIZE" <"$WORK/stdin" >"$WORK/exports" 2>"$WORK/serve.log" &
SERVE_PID=$!
exec 9>"$WORK/stdin"
for _ in $(seq 100); do
    grep -q '^ready$' "$WORK/exports" 2>/dev/null && break
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.1
done
grep -q '^ready$' "$WORK/exports" || { echo "cairn-bench serve did not start" >&2; exit 1; }
echo "host: engine started by cairn-bench serve (pid $SERVE_PID):"
grep '^export' "$WORK/exports"

# The guest script: the functions of vm-fio-guest.sh, then one run_setup
# line per export.
{
    echo "RUNTIME=$RUNTIME"
    cat "$HERE/vm-fio-guest.sh"
    while read -r _ name addr nqn; do
        printf 'run_setup %q %q %q\n' "$name" "${addr##*:}" "$nqn"
    done < <(grep '^export' "$WORK/exports")
} >"$WORK/guest.sh"

banner
status=0
"$ROOT/sanity-tests/vm/run.sh" --timeout "$TIMEOUT" -- "$WORK/guest.sh" || status=$?
banner
exit $status
