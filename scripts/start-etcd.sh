#!/usr/bin/env bash
# Starts a single-member etcd on 127.0.0.1 in the background and waits until
# it serves requests. Prints the etcd process id on stdout.
#
#   scripts/start-etcd.sh DATA_DIR CLIENT_PORT PEER_PORT
#
# Clients use http://127.0.0.1:CLIENT_PORT (cairn: --store etcd://127.0.0.1:CLIENT_PORT).
# Starting again on the same DATA_DIR and ports brings the same member back
# with its data. The log goes to DATA_DIR.log. Stop it with `kill PID`.
#
# A member of a larger cluster: set CAIRN_ETCD_NAME and CAIRN_ETCD_INITIAL_CLUSTER
# (name1=http://127.0.0.1:PEER1,name2=...) and start every member at once;
# each waits until the cluster has a leader. CAIRN_ETCD_START_TIMEOUT (seconds,
# default 20) bounds the wait.
# Needs Debian's etcd-server package: apt-get install -y etcd-server
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: $0 DATA_DIR CLIENT_PORT PEER_PORT" >&2
    exit 2
fi
data_dir=$1
client_port=$2
peer_port=$3
wait_secs=${CAIRN_ETCD_START_TIMEOUT:-20}

etcd_bin=${CAIRN_ETCD_BIN:-$(command -v etcd || true)}
if [[ -z "$etcd_bin" || ! -x "$etcd_bin" ]]; then
    echo "etcd not found: install it with 'apt-get install -y etcd-server'" >&2
    exit 1
fi

mkdir -p "$data_dir"
chmod 700 "$data_dir"
log="${data_dir%/}.log"
client_url="http://127.0.0.1:${client_port}"
peer_url="http://127.0.0.1:${peer_port}"
name=${CAIRN_ETCD_NAME:-cairn}
initial_cluster=${CAIRN_ETCD_INITIAL_CLUSTER:-${name}=${peer_url}}

# etcd reads ETCD_* variables as flags and refuses to start when one
# repeats a flag given here.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^ETCD_' || true)

# setsid: the server outlives this script and its caller's process group.
setsid "$etcd_bin" \
    --name "$name" \
    --data-dir "$data_dir" \
    --listen-client-urls "$client_url" \
    --advertise-client-urls "$client_url" \
    --listen-peer-urls "$peer_url" \
    --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "$initial_cluster" \
    --initial-cluster-state new \
    --initial-cluster-token cairn-local \
    >>"$log" 2>&1 </dev/null &
pid=$!

# Wait until the member has a leader and serves reads: /health says so.
healthy() {
    local reply
    reply=$(
        exec 3<>"/dev/tcp/127.0.0.1/${client_port}" &&
            printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 &&
            timeout 2 cat <&3
    ) || return 1
    [[ "$reply" == *'"health":"true"'* ]]
}
deadline=$((SECONDS + wait_secs))
while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "etcd exited during startup; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    if healthy 2>/dev/null; then
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "etcd did not become healthy within ${wait_secs}s; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.1
done
echo "$pid"
