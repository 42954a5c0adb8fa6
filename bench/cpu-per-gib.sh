#!/usr/bin/env bash
# The mount daemon's CPU time (utime+stime from /proc/PID/stat) for a fixed
# amount of work: a measure that a loaded machine does not move much, unlike
# throughput. Prints one line per job: CPU seconds per GiB written by fio.
#
#   bench/cpu-per-gib.sh                          # default mount (journal on)
#   MOUNT_ARGS=--no-journal bench/cpu-per-gib.sh  # passthrough
#   PERF=1 bench/cpu-per-gib.sh                   # also perf record -g per job
#
# Environment: REPLICAFS_BIN [target/release/replicafs], BENCH_DIR
# [target/cpu-bench], JOBS [seqwrite randwrite dio_seqwrite], SIZE [1g],
# NICE [5].
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${REPLICAFS_BIN:-$REPO/target/release/replicafs}
BENCH_DIR=${BENCH_DIR:-$REPO/target/cpu-bench}
JOBS=${JOBS:-"seqwrite randwrite dio_seqwrite"}
SIZE=${SIZE:-1g}
NICE=${NICE:-5}
MOUNT_ARGS=${MOUNT_ARGS:-}
PERF=${PERF:-0}

BACKING=$BENCH_DIR/backing
MNT=$BENCH_DIR/mnt
OUT=$BENCH_DIR/out
mkdir -p "$BACKING" "$MNT" "$OUT"
mountpoint -q "$MNT" && { echo "$MNT is mounted" >&2; exit 1; }

PID=
unmount() {
    if [[ -n $PID ]]; then
        fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
        wait "$PID" 2>/dev/null || true
        PID=
    fi
}
trap unmount EXIT

# Ticks of the daemon's user + system CPU.
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

job_opts() {
    case $1 in
    seqwrite) echo "--rw=write --bs=1m --end_fsync=1" ;;
    randwrite) echo "--rw=randwrite --bs=4k --end_fsync=1 --norandommap --randrepeat=1 --io_size=256m" ;;
    dio_seqwrite) echo "--ioengine=libaio --direct=1 --iodepth=32 --rw=write --bs=1m" ;;
    *) echo "unknown job $1" >&2; exit 1 ;;
    esac
}

for job in $JOBS; do
    rm -rf "${BACKING:?}"/* "$BACKING"/.replicafs* 2>/dev/null || true
    # The file exists and is fully written before the mount (a VM disk being
    # overwritten); the job then overwrites it through the mount.
    fio --name=prep --filename="$BACKING/disk.img" --size="$SIZE" --rw=write --bs=1m \
        --end_fsync=1 >/dev/null
    # shellcheck disable=SC2086
    nice -n "$NICE" "$BIN" mount "$BACKING" "$MNT" $MOUNT_ARGS >"$OUT/daemon-$job.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
    mountpoint -q "$MNT" || { echo "mount failed" >&2; cat "$OUT/daemon-$job.log" >&2; exit 1; }
    sync; echo 3 >/proc/sys/vm/drop_caches
    if [[ $PERF == 1 ]]; then
        perf record -g -F 999 -p "$PID" -o "$OUT/perf-$job.data" 2>/dev/null &
        PERFPID=$!
        sleep 1
    fi
    t0=$(ticks)
    # shellcheck disable=SC2046
    nice -n "$NICE" fio --name="$job" --filename="$MNT/disk.img" --size="$SIZE" \
        $(job_opts "$job") --output-format=json >"$OUT/fio-$job.json"
    t1=$(ticks)
    if [[ $PERF == 1 ]]; then
        kill -INT "$PERFPID"; wait "$PERFPID" || true
    fi
    bytes=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['jobs'][0]['write']['io_bytes'])" "$OUT/fio-$job.json")
    python3 -c "
import sys
t, b, hz = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f'{sys.argv[4]:14} {b/2**30:6.2f} GiB  daemon CPU {t/hz:6.2f} s  = {t/hz/(b/2**30):6.2f} s/GiB')
" "$((t1 - t0))" "$bytes" "$HZ" "$job"
    unmount
done
