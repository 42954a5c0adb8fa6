#!/usr/bin/env bash
# Journal write amplification and index space: write a known number of guest
# bytes through a journaling mount, then compare with what the journal holds.
#
#   bench/journal-wa.sh            # as root; BENCH_DIR as for fio.sh
#
# Guest bytes: one 1 GiB sequential pass (1 MiB writes) and one random pass of a
# 256 MiB file in 4 KiB writes (fsync every 32), both ending in fsync.
# Journal bytes: the segment files (frames: header + op + payload + crc).
# Index bytes: sled's size on disk. Nothing is trimmed (no replica), so the
# journal holds every record.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/target/journal-wa}
BIN=${REPLICAFS_BIN:-$REPO/target/release/replicafs}
[[ -n ${REPLICAFS_BIN:-} ]] || (cd "$REPO" && cargo build --release -q)
command -v fio >/dev/null || { echo "needs fio (apt-get install fio)" >&2; exit 1; }

BACKING=$BENCH_DIR/backing MNT=$BENCH_DIR/mnt
mountpoint -q "$MNT" && umount "$MNT"
rm -rf "$BENCH_DIR"; mkdir -p "$BACKING" "$MNT"
"$BIN" mount "$BACKING" "$MNT" 2>"$BENCH_DIR/daemon.log" &
PID=$!
trap 'mountpoint -q "$MNT" && umount "$MNT"; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done

common="--ioengine=psync --direct=0 --numjobs=1 --output-format=json --end_fsync=1"
seq_bytes=$((1 << 30)) rnd_bytes=$((256 << 20))
fio --name=seq --filename="$MNT/seq.img" --rw=write --bs=1m --size=$seq_bytes $common >"$BENCH_DIR/seq.json"
fio --name=rnd --filename="$MNT/rnd.img" --rw=randwrite --bs=4k --size=$rnd_bytes --fsync=32 $common >"$BENCH_DIR/rnd.json"
umount "$MNT"; wait $PID
trap - EXIT

stats=$("$BIN" journal stats --json --state-dir "$BACKING/.replicafs" 2>/dev/null)
python3 - "$stats" $((seq_bytes + rnd_bytes)) <<'PY'
import json, sys
s = json.loads(sys.argv[1]); guest = int(sys.argv[2])
print(f"guest bytes written      {guest}")
print(f"journal records          {s['records']}")
print(f"journal segment bytes    {s['segment_bytes']}  ({s['segment_bytes']/guest:.3f} per guest byte)")
print(f"sled index bytes on disk {s['sled_bytes']}  ({s['sled_bytes']/max(s['records'],1):.0f} per record)")
print(f"write amplification      {(guest + s['segment_bytes'] + s['sled_bytes'])/guest:.3f} "
      "(backing + segments + index, per guest byte)")
PY
