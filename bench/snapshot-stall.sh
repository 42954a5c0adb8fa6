#!/usr/bin/env bash
# Guest write latency while a primary lists a large tree for a snapshot.
#
# A backing dir of N small files (each N of SIZES, in 100 dirs) is
# mounted with a peer that is not running yet. A guest writer (4 KiB O_DIRECT
# pwrites at random offsets of one 64 MiB file through the mount, one FUSE
# write each) runs throughout; then the replica starts, is fresh, and gets a
# full snapshot. Write latencies are split by when the write ran:
#   before   the BEFORE seconds before the replica started
#   listing  from the replica's "primary connected" to the primary's
#            "sending a full snapshot" (the snapshot's listing)
#   copy     from there to "snapshot sent" (entries and data)
# A write counts for a window if it ran during any part of it. Both the
# baseline (BASE_REF, built from git, or BASE_BIN) and the working tree's
# binary are measured in the same run.
#
# The baseline opens every file of the tree during its listing, so it fails
# (EMFILE) on a tree with more files than the fd limit; that is reported.
#
# usage: bench/snapshot-stall.sh [WORKDIR]   (root; needs python3)
#   SIZES="19000 100000" BEFORE=3 BASE_REF=07f899a BASE_BIN=/path/to/old/replicafs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
W=${1:-/tmp/replicafs-bench-stall}
SIZES=${SIZES:-19000 100000}
BEFORE=${BEFORE:-3}
BASE_REF=${BASE_REF:-07f899a}
mkdir -p "$W"
export NO_COLOR=1

cargo build --release --quiet
NEW=$ROOT/target/release/replicafs
if [ -z "${BASE_BIN:-}" ]; then
  # The baseline from git, built beside ours (dependencies already built).
  rm -rf "$W/base-src" && mkdir -p "$W/base-src"
  git archive "$BASE_REF" | tar -x -C "$W/base-src"
  (cd "$W/base-src" && CARGO_TARGET_DIR=$ROOT/target/bench-base cargo build --release --quiet)
  BASE_BIN=$ROOT/target/bench-base/release/replicafs
fi

# The baseline keeps one descriptor per file of the tree during a snapshot.
ulimit -n "$(ulimit -Hn)"
echo "fd limit: $(ulimit -n)" >&2

cleanup() {
  [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null || true
  [ -n "${PPID_:-}" ] && kill "$PPID_" 2>/dev/null || true
  [ -n "${RPID:-}" ] && kill "$RPID" 2>/dev/null || true
  sleep 1
  umount -l "$W/run/p-mnt" 2>/dev/null || true
  umount -l "$W/run/r-mnt" 2>/dev/null || true
  WPID= PPID_= RPID=
}
trap cleanup EXIT

run() {  # label, binary, files
  local label=$1 B=$2 FILES=$3 R=$W/run
  cleanup
  rm -rf "$R"; mkdir -p "$R"/{p-state,p-back,p-mnt,r-state,r-mirror,r-mnt}
  python3 - "$R/p-back" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = max(1, n // 100)
for i in range(n):
    d = os.path.join(root, f"d{i // per:03}")
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06}"), "w") as f:
        f.write(f"{i}\n")
PY
  local pfp rfp port
  pfp=$($B keygen --state-dir "$R/p-state")
  rfp=$($B keygen --state-dir "$R/r-state")
  port=$((20000 + RANDOM % 20000))
  $B mount "$R/p-back" "$R/p-mnt" --state-dir "$R/p-state" --peer 127.0.0.1:$port="$rfp" \
    >"$R/primary.log" 2>&1 &
  PPID_=$!
  for _ in $(seq 200); do mountpoint -q "$R/p-mnt" && break; sleep 0.1; done
  python3 - "$R/p-mnt/vm.img" "$R/writes.txt" <<'PY' &
import mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
buf = mmap.mmap(-1, 4096)
out = open(sys.argv[2], "w", buffering=1 << 20)
rnd = random.Random(1)
while True:
    buf[:8] = rnd.randbytes(8)
    t0 = time.time_ns()
    os.pwrite(fd, buf, rnd.randrange(16384) * 4096)
    t1 = time.time_ns()
    out.write(f"{t0} {t1}\n")
PY
  WPID=$!
  sleep "$BEFORE"
  local t_start
  t_start=$(date +%s%N)
  $B replica --mirror "$R/r-mirror" --listen 127.0.0.1:$port --state-dir "$R/r-state" \
    --trust "$pfp" --mount "$R/r-mnt" >"$R/replica.log" 2>&1 &
  RPID=$!
  for _ in $(seq 6000); do
    grep -q "snapshot sent" "$R/primary.log" && break
    if grep -q "Too many open files" "$R/primary.log"; then
      echo "| $label | $FILES files | snapshot fails: Too many open files (fd limit $(ulimit -n)) | | | | | |"
      cleanup
      return
    fi
    sleep 0.1
  done
  sleep 1
  kill "$WPID"; wait "$WPID" 2>/dev/null || true; WPID=
  python3 - "$label, $FILES files" "$R" "$t_start" "$BEFORE" <<'PY'
import datetime, re, sys
label, r, t_start, before = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def when(log, what):
    for line in open(log, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if what in line:
            m = re.match(r"(\d{4}-\d\d-\d\dT[\d:.]+)Z", line)
            ts = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
            return int(ts.timestamp() * 1e9)
    raise SystemExit(f"{label}: no {what!r} in {log}")
connected = when(r + "/replica.log", "primary connected")
listed = when(r + "/primary.log", "sending a full snapshot")
sent = when(r + "/primary.log", "snapshot sent")
writes = [tuple(map(int, l.split())) for l in open(r + "/writes.txt") if l.count(" ") == 1]
def stats(name, a, b):
    lat = sorted((t1 - t0) / 1e6 for t0, t1 in writes if t0 < b and t1 > a)
    done = sum(1 for t0, t1 in writes if a <= t1 <= b)
    if not lat:
        print(f"| {label} | {name} | {(b - a) / 1e6:.0f} | 0 | 0 | - | - | - |")
        return
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(f"| {label} | {name} | {(b - a) / 1e6:.0f} | {done} | {done / ((b - a) / 1e9):.0f} | "
          f"{q(0.5):.3f} | {q(0.99):.3f} | {lat[-1]:.1f} |")
stats("before", t_start - int(before * 1e9), t_start)
stats("listing", connected, listed)
stats("copy", listed, sent)
PY
  grep -h "snapshot listing done" "$R/primary.log" | sed 's/^/    /' >&2 || true
  cleanup
}

echo "| binary | window | ms | writes completed | writes/s | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
  run "base $BASE_REF" "$BASE_BIN" "$n"
  run "new" "$NEW" "$n"
done
