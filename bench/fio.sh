#!/usr/bin/env bash
# fio on the native backing dir vs. through a replicafs mount, in one run.
#
#   sudo bench/fio.sh                      # default mount options
#   MOUNT_ARGS="--no-writeback-cache" bench/fio.sh
#   VARIANTS="default|;no-wbc|--no-writeback-cache;t2|--threads 2" bench/fio.sh
#   VARIANTS=all bench/fio.sh              # every variant in ALL_VARIANTS below
#
# Environment (all optional):
#   BENCH_DIR    where the backing dir, mountpoint and results go; must be on a real
#                disk, not tmpfs [default: <repo>/target/fio-bench]
#   MOUNT_ARGS   extra args for `replicafs mount` for a single variant named "custom"
#   VARIANTS     ';'-separated list of NAME|ARGS[|BDI] (ARGS may be empty), or "all".
#                The word @peer in ARGS starts a replica daemon on loopback for the
#                variant and stands for its --peer ADDR=FINGERPRINT (the journal then
#                holds writes for it and the shipper reads them back)
#                BDI: space-separated KEY=VALUE written to /sys/class/bdi/<mount>/KEY
#                after mounting (read_ahead_kb, max_ratio, strict_limit, ...), or with
#                KEY=conn.NAME to /sys/fs/fuse/connections/<mount>/NAME (max_background,
#                congestion_threshold), to try kernel-side tuning the daemon could apply
#                itself
#   JOBS         space-separated subset of: seqwrite randwrite randwrite_fsync randread
#                seqread seqread_cold dio_randwrite dio_randread qemu_write qemu_read
#                [these ten], or the extra randread_rw seqread_cold_rw seqwrite_cached
#                randwrite_cached dio_randwrite_fsync dio_seqwrite (see job_spec)
#   SIZE         fio file size [1g];  RUNTIME  seconds per job [12]
#   REPEAT       runs per job and side; the median is reported [1]
#   DROP_CACHES  1: sync + drop the page cache before every fio run (both sides start
#                cold) [1].  0: keep caches (not a like-for-like comparison: the mount
#                then has two page caches, its own and the backing file's)
#   FIO_EXTRA    extra fio options, given to the native and the mount runs alike
#   NICE         niceness for fio and the daemon alike, e.g. -10 on a busy machine [0]
#   NO_BUILD=1   do not run `cargo build --release`
#   REPLICAFS_BIN  the binary to mount with [<repo>/target/release/replicafs]; setting
#                it skips the build (for comparing prototype builds)
#
# Every fio job but the dio_* ones is buffered (direct=0), ioengine=psync, numjobs=1,
# iodepth=1, on a preallocated, fully written SIZE file (a raw VM disk being
# overwritten), for about RUNTIME seconds, with the same options on both sides. Write
# jobs use end_fsync=1 and fio counts that fsync in the job's run time; see job_spec
# for how passes are synced. The dio_* jobs are what a VM with cache=none does:
# O_DIRECT, libaio, iodepth 32, 4 KiB random. qemu_* run `qemu-img bench -t none -i
# native` (O_DIRECT, Linux AIO, depth 32, 4 KiB) and report IOPS.
#
# Besides the metric, each row has the growth of `Cached` in /proc/meminfo over the
# run (other processes' I/O counts too), the page cache held by the job's own files
# right after it (fincore: the test file, and on the mount side the state dir with
# the journal too; exact, whatever else runs) and the daemon's peak RSS (VmHWM) at
# the end of the job.
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/target/fio-bench}
SIZE=${SIZE:-1g}
RUNTIME=${RUNTIME:-12}
REPEAT=${REPEAT:-1}
DROP_CACHES=${DROP_CACHES:-1}
FIO_EXTRA=${FIO_EXTRA:-}
NICE=${NICE:-0}
JOBS=${JOBS:-"seqwrite randwrite randwrite_fsync randread seqread seqread_cold dio_randwrite dio_randread qemu_write qemu_read"}
BIN=${REPLICAFS_BIN:-$REPO/target/release/replicafs}

# The variants `VARIANTS=all` runs: NAME|ARGS for `replicafs mount`[|BDI settings].
# Add new ones here (e.g. journal settings once they exist).
ALL_VARIANTS=(
    "default|"
    "no-journal|--no-journal"
    "no-wbc|--no-writeback-cache"
    "no-wbc-no-pt|--no-writeback-cache --no-passthrough"
    "threads2|--threads 2"
    "threads8|--threads 8"
    "ra1m|--|read_ahead_kb=1024"
    "ra8m|--|read_ahead_kb=8192"
    "dirty100|--|max_ratio=100 strict_limit=0"
    "bg64|--|conn.max_background=64 conn.congestion_threshold=48"
)

# The fio jobs: METRIC|fio options, METRIC being bw (MiB/s) or iops.
#  PASSES: whole passes over the file, each ending in fsync (end_fsync applies per
#          pass), until RUNTIME; the last, partial pass is fsynced too. The random
#          map makes a random pass write every block once. So every byte counted
#          has reached the disk, on both sides.
#  TIMED:  time_based for RUNTIME; with end_fsync only the final state is synced,
#          so rewrites of data still dirty in the page cache count too.
job_spec() {
    local passes="--loops=1000000 --runtime=$RUNTIME" timed="--time_based --runtime=$RUNTIME"
    case $1 in
    seqwrite) echo "bw|--rw=write --bs=1m --end_fsync=1 $passes" ;;
    randwrite) echo "iops|--rw=randwrite --bs=4k --end_fsync=1 $passes" ;;
    randwrite_fsync) echo "iops|--rw=randwrite --bs=4k --fsync=32 --end_fsync=1 $timed" ;;
    randread) echo "iops|--rw=randread --bs=4k $timed" ;;
    seqread) echo "bw|--rw=read --bs=1m $timed" ;; # first pass from disk, then cached
    seqread_cold) echo "bw|--rw=read --bs=1m --loops=1" ;; # one pass, all from disk
    # Not in the default set:
    # Reads through a read-write open, as a hypervisor opens a disk image (fio opens
    # read jobs O_RDONLY, which replicafs may serve by FUSE passthrough).
    randread_rw) echo "iops|--rw=randrw --rwmixread=100 --bs=4k $timed" ;;
    seqread_cold_rw) echo "bw|--rw=rw --rwmixread=100 --bs=1m --loops=1" ;;
    seqwrite_cached) echo "bw|--rw=write --bs=1m --end_fsync=1 $timed" ;;
    randwrite_cached) echo "iops|--rw=randwrite --bs=4k --end_fsync=1 $timed" ;;
    # A VM disk with cache=none: O_DIRECT, libaio, 32 in flight.
    dio_randwrite) echo "iops|--ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite --bs=4k $timed" ;;
    dio_randread) echo "iops|--ioengine=libaio --direct=1 --iodepth=32 --rw=randread --bs=4k $timed" ;;
    dio_seqwrite) echo "bw|--ioengine=libaio --direct=1 --iodepth=32 --rw=write --bs=1m --loops=1" ;; # one 1 GiB pass
    dio_randwrite_fsync) echo "iops|--ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite --bs=4k --fsync=32 $timed" ;;
    # qemu-img bench: COUNT requests, 4 KiB, depth 32, O_DIRECT (-t none).
    qemu_write) echo "iops|-w" ;;
    qemu_read) echo "iops|" ;;
    *) echo "unknown job $1" >&2; return 1 ;;
    esac
}

COMMON_FIO=(--ioengine=psync --direct=0 --numjobs=1 --iodepth=1 --size="$SIZE"
    --randseed=4242 --fallocate=none --invalidate=0 --fadvise_hint=0 --output-format=json)

log() { printf '[fio.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (mounting and dropping caches need it)"
command -v fio >/dev/null || die "fio is missing: apt-get install -y fio"
command -v jq >/dev/null || die "jq is missing: apt-get install -y jq"

if [[ -n ${VARIANTS:-} ]]; then
    if [[ $VARIANTS == all ]]; then
        variants=("${ALL_VARIANTS[@]}")
    else
        IFS=';' read -r -a variants <<<"$VARIANTS"
    fi
elif [[ -n ${MOUNT_ARGS:-} ]]; then
    variants=("custom|$MOUNT_ARGS")
else
    variants=("default|")
fi
for j in $JOBS; do job_spec "$j" >/dev/null; done

if [[ ${NO_BUILD:-0} != 1 && -z ${REPLICAFS_BIN:-} ]]; then
    log "building the release binary"
    (cd "$REPO" && cargo build --release --quiet)
fi
[[ -x $BIN ]] || die "$BIN missing (build with cargo build --release)"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
exec 9>"$BENCH_DIR/.lock"
flock -n 9 || die "another fio.sh run is using $BENCH_DIR"
fstype=$(stat -f -c %T "$BENCH_DIR")
case $fstype in tmpfs | ramfs | fuseblk | fuse) die "$BENCH_DIR is on $fstype; use a real disk (BENCH_DIR=...)" ;; esac

BACKING=$BENCH_DIR/backing
MNT=$BENCH_DIR/mnt
OUT=$BENCH_DIR/results/$(date +%Y%m%d-%H%M%S)
mkdir -p "$BACKING/native" "$BACKING/mount" "$MNT" "$OUT"
NATIVE_FILE=$BACKING/native/disk.img
MOUNT_FILE=$MNT/mount/disk.img # = $BACKING/mount/disk.img, seen through the mount

mountpoint -q "$MNT" && die "$MNT is already mounted (another run?): umount $MNT"

DAEMON_PID=
MOUNTED=0 # set once we started a daemon on $MNT: only then is its unmount ours to do
unmount() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    DAEMON_PID=
    if [[ $MOUNTED == 1 ]] && mountpoint -q "$MNT"; then
        umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    fi
    MOUNTED=0
    stop_replica
}
trap 'unmount' EXIT
trap 'exit 130' INT TERM

REPLICA_PID=
stop_replica() {
    if [[ -n $REPLICA_PID ]]; then
        kill -TERM "$REPLICA_PID" 2>/dev/null || true
        wait "$REPLICA_PID" 2>/dev/null || true
    fi
    REPLICA_PID=
}

# A replica daemon on loopback for a variant whose ARGS hold the word @peer
# (replaced by --peer ADDR=FINGERPRINT, left in PEER_ARG); its mirror is under
# BENCH_DIR/replica. Not in a subshell: REPLICA_PID must survive.
PEER_ARG=
start_replica() { # NAME
    local r=$BENCH_DIR/replica pfp rfp port
    rm -rf "$r"; mkdir -p "$r/state" "$r/mirror"
    pfp=$("$BIN" keygen --force --state-dir "$BACKING/.replicafs")
    rfp=$("$BIN" keygen --force --state-dir "$r/state")
    port=$((20000 + RANDOM % 20000))
    # The lock descriptor stays with this script, not with the daemon.
    nice -n "$NICE" "$BIN" replica --mirror "$r/mirror" --listen "127.0.0.1:$port" \
        --state-dir "$r/state" --trust "$pfp" >"$OUT/replica-$1.log" 2>&1 9>&- &
    REPLICA_PID=$!
    PEER_ARG="--peer 127.0.0.1:$port=$rfp"
}

mount_variant() { # NAME ARGS...
    local name=$1; shift
    local args=()
    for a in "$@"; do
        if [[ $a == @peer ]]; then
            start_replica "$name"
            # shellcheck disable=SC2206
            args+=($PEER_ARG)
        else
            args+=("$a")
        fi
    done
    set -- "${args[@]}"
    nice -n "$NICE" "$BIN" mount "$BACKING" "$MNT" "$@" >"$OUT/daemon-$name.log" 2>&1 9>&- &
    DAEMON_PID=$!
    MOUNTED=1
    for _ in $(seq 100); do
        mountpoint -q "$MNT" && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$OUT/daemon-$name.log" >&2
    die "mount of variant $name failed"
}

apply_bdi() { # KEY=VALUE... for the mount's backing_dev_info or fuse connection
    (( $# )) || return 0
    local dev f
    dev=$(mountpoint -d "$MNT")
    for kv in "$@"; do
        case $kv in
        conn.*)
            mountpoint -q /sys/fs/fuse/connections ||
                mount -t fusectl fusectl /sys/fs/fuse/connections
            f=/sys/fs/fuse/connections/${dev#*:}/${kv#conn.}
            ;;
        *) f=/sys/class/bdi/$dev/$kv ;;
        esac
        f=${f%%=*}
        log "  $f <- ${kv#*=} (was $(cat "$f"))"
        echo "${kv#*=}" >"$f"
    done
}

drop_caches() {
    sync
    if [[ $DROP_CACHES == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# The block device under BENCH_DIR, for read/written counters (/sys/block/*/stat).
DISK_STAT=
dev=$(findmnt -n -o SOURCE --target "$BENCH_DIR" || true)
if [[ $dev == /dev/* ]]; then
    d=$(basename "$(readlink -f "$dev")")
    for f in "/sys/class/block/$d/stat" ; do [[ -r $f ]] && DISK_STAT=$f; done
fi
disk_sectors() { # sectors read, sectors written
    if [[ -n $DISK_STAT ]]; then awk '{ print $3, $7 }' "$DISK_STAT"; else echo 0 0; fi
}

cached_kib() { awk '/^Cached:/ { print $2 }' /proc/meminfo; }

resident_mib() { # page cache held by these files and the files under these dirs
    # fincore fails on some files (empty ones): count what it could read.
    { find "$@" -type f -print0 2>/dev/null | xargs -0 -r -n 1 fincore -b -n -r -o RES 2>/dev/null || true; } |
        awk '{ s += $1 } END { printf "%.0f\n", s / 1048576 }'
}

daemon_hwm_mib() { # peak RSS of the daemon so far
    [[ -n $DAEMON_PID ]] || { echo -; return; }
    awk '/^VmHWM:/ { printf "%.0f\n", $2 / 1024 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo -
}

# qemu-img bench on FILE; prints IOPS. QEMU_COUNT requests [200000].
run_qemu() { # FILE EXTRA LOG
    local n=${QEMU_COUNT:-200000} secs
    # shellcheck disable=SC2086
    nice -n "$NICE" qemu-img bench -f raw -t none -i native -d 32 -s 4k -c "$n" $2 "$1" >"$3" 2>&1
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$3")
    [[ -n $secs ]] || { cat "$3" >&2; die "qemu-img bench failed"; }
    awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.0f\n", n / s }'
}

daemon_cpu_ticks() { # utime+stime of the daemon, in clock ticks
    [[ -n $DAEMON_PID ]] || { echo 0; return; }
    awk '{ print $14 + $15 }' "/proc/$DAEMON_PID/stat" 2>/dev/null || echo 0
}

# run_fio JOB SIDE FILE TAG -> prints the metric (MiB/s or IOPS); the json is kept.
run_fio() {
    local job=$1 side=$2 file=$3 tag=$4 spec metric opts json
    if [[ $side == mount ]] && ! mountpoint -q "$MNT"; then
        die "$MNT is no longer mounted"
    fi
    spec=$(job_spec "$job"); metric=${spec%%|*}; opts=${spec#*|}
    json=$OUT/$tag.json
    drop_caches
    cut -d' ' -f1-3 /proc/loadavg >"$OUT/$tag.loadavg"
    local t0 t1 d0 d1 c0 c1 qemu_iops=
    t0=$(daemon_cpu_ticks)
    d0=$(disk_sectors)
    c0=$(cached_kib)
    if [[ $job == qemu_* ]]; then
        qemu_iops=$(run_qemu "$file" "$opts" "$OUT/$tag.qemu.txt")
    else
        # shellcheck disable=SC2086
        nice -n "$NICE" fio --name="$job" --filename="$file" "${COMMON_FIO[@]}" $opts $FIO_EXTRA >"$json"
    fi
    c1=$(cached_kib)
    t1=$(daemon_cpu_ticks)
    d1=$(disk_sectors)
    echo $(( (c1 - c0) / 1024 )) >"$OUT/$tag.cached"
    if [[ $side == mount ]]; then
        resident_mib "$BACKING/mount/disk.img" "$BACKING/.replicafs" >"$OUT/$tag.resident"
    else
        resident_mib "$file" >"$OUT/$tag.resident"
    fi
    if [[ $side == mount ]]; then daemon_hwm_mib >"$OUT/$tag.hwm"; fi
    # MiB read and written on the disk during the run (any process's I/O counts).
    echo "$d0 $d1" | awk '{ printf "%.0f %.0f\n", ($3 - $1) / 2048, ($4 - $2) / 2048 }' >"$OUT/$tag.disk"
    if [[ $side == mount ]]; then
        echo "$(( t1 - t0 ))" >"$OUT/$tag.daemon_ticks"
    fi
    local rw=read
    [[ $opts == *rw=*write* ]] && rw=write
    if [[ -n $qemu_iops ]]; then
        echo "$qemu_iops"
    elif [[ $metric == bw ]]; then
        jq -r ".jobs[0].$rw.bw_bytes / 1048576" "$json"
    else
        jq -r ".jobs[0].$rw.iops" "$json"
    fi
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Lay out both files once, natively (the mount's file is the backing file behind it):
# fully written and on disk, like a preallocated raw VM disk.
layout() {
    local f=$1
    if [[ ! -f $f ]] || (( $(stat -c %s "$f") != $(numfmt --from=iec "${SIZE^^}") )); then
        log "laying out $f ($SIZE)"
        rm -f "$f"
        fio --name=layout --filename="$f" --size="$SIZE" --rw=write --bs=1m --ioengine=psync \
            --end_fsync=1 --output-format=terse >/dev/null
    fi
}
layout "$NATIVE_FILE"
layout "$BACKING/mount/disk.img"

{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r)"
    echo "cores: $(nproc)  mem: $(free -g | awk '/Mem:/ { print $2 }') GiB"
    echo "bench dir: $BENCH_DIR ($(findmnt -n -o SOURCE,FSTYPE,OPTIONS --target "$BENCH_DIR"))"
    echo "fio: $(fio --version)  common: ${COMMON_FIO[*]} $FIO_EXTRA"
    echo "drop caches before each run: $DROP_CACHES  repeat: $REPEAT  nice: $NICE"
    echo "replicafs: $BIN, $(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- src || echo '+dirty')"
} | tee "$OUT/env.txt" >&2

TABLE=$OUT/table.md
printf '| variant | job | unit | native | mount | mount/native | daemon CPU s | disk MiB r/w native | disk MiB r/w mount | Cached Δ MiB native | Cached Δ MiB mount | own files cached MiB native | own files cached MiB mount (journal incl.) | daemon VmHWM MiB |\n' >"$TABLE"
printf '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n' >>"$TABLE"

for v in "${variants[@]}"; do
    name=${v%%|*}; rest=${v#*|}; args=${rest%%|*}; bdi=
    [[ $v == *"|"* ]] || { rest=; args=; }
    [[ $rest == *"|"* ]] && bdi=${rest#*|}
    [[ $args == -- ]] && args=
    log "variant $name: replicafs mount $args${bdi:+ (bdi: $bdi)}"
    # shellcheck disable=SC2086
    mount_variant "$name" $args
    # shellcheck disable=SC2086
    apply_bdi $bdi
    echo "$name: replicafs mount BACKING MNT $args${bdi:+; bdi: $bdi}" >>"$OUT/env.txt"
    for job in $JOBS; do
        spec=$(job_spec "$job"); metric=${spec%%|*}
        unit=MiB/s; [[ $metric == iops ]] && unit=IOPS
        nat=(); mnt=(); ticks=0
        for r in $(seq "$REPEAT"); do
            # Alternate which side goes first, so drift (other load, the disk's own
            # cache) does not always favour the same side.
            sides="native mount"; (( r % 2 == 0 )) && sides="mount native"
            for side in $sides; do
                if [[ $side == native ]]; then
                    nat+=("$(run_fio "$job" native "$NATIVE_FILE" "$name-$job-native-$r")")
                else
                    mnt+=("$(run_fio "$job" mount "$MOUNT_FILE" "$name-$job-mount-$r")")
                    ticks=$(( ticks + $(cat "$OUT/$name-$job-mount-$r.daemon_ticks") ))
                fi
            done
        done
        n=$(printf '%s\n' "${nat[@]}" | median)
        m=$(printf '%s\n' "${mnt[@]}" | median)
        cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v r="$REPEAT" 'BEGIN { printf "%.1f", t / hz / r }')
        # Disk traffic of the first repetition of each side.
        dn=$(tr ' ' / <"$OUT/$name-$job-native-1.disk")
        dm=$(tr ' ' / <"$OUT/$name-$job-mount-1.disk")
        cn=$(cat "$OUT/$name-$job-native-1.cached")
        cm=$(cat "$OUT/$name-$job-mount-1.cached")
        hwm=$(cat "$OUT/$name-$job-mount-$REPEAT.hwm")
        rn=$(cat "$OUT/$name-$job-native-1.resident")
        rm_=$(cat "$OUT/$name-$job-mount-1.resident")
        row=$(awk -v v="$name" -v j="$job" -v u="$unit" -v n="$n" -v m="$m" -v c="$cpu" -v dn="$dn" -v dm="$dm" \
            -v cn="$cn" -v cm="$cm" -v rn="$rn" -v rm="$rm_" -v h="$hwm" \
            'BEGIN { printf "| %s | %s | %s | %.0f | %.0f | %.2f | %s | %s | %s | %s | %s | %s | %s | %s |", v, j, u, n, m, (n > 0 ? m / n : 0), c, dn, dm, cn, cm, rn, rm, h }')
        echo "$row" >>"$TABLE"
        log "$row   (native runs: ${nat[*]}; mount runs: ${mnt[*]})"
    done
    unmount
done

echo "loadavg at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt" >&2
echo
cat "$TABLE"
echo
log "raw fio json, daemon logs and this table: $OUT"
