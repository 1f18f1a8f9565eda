# Guest half of bench/vm-fio.sh (runs inside the test VM, under bash -e):
# the suite's jobs with fio through the kernel NVMe/TCP initiator.
# Expects RUNTIME (seconds per job); vm-fio.sh appends the run_setup calls.
set -euo pipefail
modprobe nvme-tcp

# One line from fio's JSON (the guest has no python): IOPS summed over
# reads and writes, mean completion latency, errors.
summarise() {
    local iops lat err
    iops=$(grep -o '"iops" : [0-9.]*' /tmp/fio.json | awk '{s+=$3} END{printf "%.0f", s}')
    lat=$(grep -A3 '"clat_ns"' /tmp/fio.json | grep -o '"mean" : [0-9.]*' |
        awk '{if($3>0){s+=$3;n++}} END{if(n) printf "%.1f", s/n/1000; else print "-"}')
    err=$(grep -o '"error" : [0-9]*' /tmp/fio.json | awk '{s+=$3} END{print s+0}')
    printf '%-10s %-10s %10s IOPS  avg clat %8s us  errors %s\n' "$1" "$2" "$iops" "$lat" "$err"
}

# run_setup NAME PORT NQN: connect to 10.0.2.2:PORT (the host's loopback),
# run randread/randwrite/randrw at QD64 and randread at QD1, disconnect.
run_setup() {
    local name=$1 port=$2 nqn=$3 dev="" b n
    nvme connect -t tcp -a 10.0.2.2 -s "$port" -n "$nqn" >/dev/null
    # The namespace's block device: the multipath head (nvmeXnY) or, without
    # native multipath, the controller's; never a hidden path (nvmeXcYnZ).
    for _ in $(seq 100); do
        for b in /sys/block/nvme*; do
            n=$(basename "$b")
            [[ $n == *c* ]] && continue
            [[ -e $b/device/subsysnqn ]] || continue
            if [[ $(cat "$b/device/subsysnqn") == "$nqn" ]]; then dev=/dev/$n; fi
        done
        if [[ -n $dev && -b $dev ]]; then break; fi
        dev=""
        sleep 0.1
    done
    if [[ -z $dev ]]; then
        echo "$name: no block device for $nqn"
        nvme disconnect -n "$nqn" >/dev/null || true
        return 1
    fi
    echo "== $name: $nqn as $dev"
    local job label rw qd
    for job in randread:randread:64 randwrite:randwrite:64 randrw:randrw:64 qd1-read:randread:1; do
        IFS=: read -r label rw qd <<<"$job"
        fio --name="$name-$label" --filename="$dev" --ioengine=libaio --direct=1 \
            --rw="$rw" --rwmixread=50 --bs=4k --iodepth="$qd" --numjobs=1 \
            --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting \
            --output-format=json >/tmp/fio.json
        summarise "$name" "$label"
    done
    nvme disconnect -n "$nqn" >/dev/null
}
