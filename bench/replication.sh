#!/usr/bin/env bash
# Replication benchmark on loopback: a primary mount and a replica daemon, fio
# writing sequentially and randomly through the mount. Reports replication lag
# p50/p99 (write acknowledged -> applied on the replica, sampled every 10 ms
# from the primary's status socket), wire bytes per changed byte, throughput.
#
# usage: bench/replication.sh [WORKDIR]     (root; needs fio, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
W=${1:-/tmp/replicafs-bench-repl}
SEQ_SIZE=${SEQ_SIZE:-512M}
RAND_SIZE=${RAND_SIZE:-128M}
RAND_TIME=${RAND_TIME:-20}
cargo build --release --quiet
B=$ROOT/target/release/replicafs

cleanup() {
  [ -n "${PPID_:-}" ] && kill "$PPID_" 2>/dev/null || true
  [ -n "${RPID:-}" ] && kill "$RPID" 2>/dev/null || true
  sleep 1
  umount -l "$W/p-mnt" 2>/dev/null || true
  umount -l "$W/r-mnt" 2>/dev/null || true
}
trap cleanup EXIT

run_case() {  # name, fio args...
  local name=$1; shift
  cleanup; PPID_=; RPID=
  rm -rf "$W"; mkdir -p "$W"/{p-state,p-back,p-mnt,r-state,r-mirror,r-mnt}
  local pfp rfp port
  pfp=$($B keygen --state-dir "$W/p-state")
  rfp=$($B keygen --state-dir "$W/r-state")
  port=$((20000 + RANDOM % 20000))
  $B replica --mirror "$W/r-mirror" --listen 127.0.0.1:$port --state-dir "$W/r-state" \
    --trust "$pfp" --mount "$W/r-mnt" >"$W/replica.log" 2>&1 &
  RPID=$!
  $B mount "$W/p-back" "$W/p-mnt" --state-dir "$W/p-state" --peer 127.0.0.1:$port="$rfp" \
    >"$W/primary.log" 2>&1 &
  PPID_=$!
  for _ in $(seq 100); do
    $B status --state-dir "$W/p-state" >/dev/null 2>&1 && mountpoint -q "$W/p-mnt" && break
    sleep 0.1
  done
  python3 bench/replication_lag.py "$W/p-state" "$W/lag.json" &
  local SPID=$!
  local t0 t1
  t0=$(date +%s.%N)
  fio --name="$name" --directory="$W/p-mnt" --output-format=json "$@" >"$W/fio.json"
  sync -f "$W/p-mnt"
  # Wait until the replica applied everything.
  for _ in $(seq 1200); do
    local s
    s=$($B status --json --state-dir "$W/p-state")
    if python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["peers"][0]["applied"]>=s["last_seq"] else 1)' <<<"$s"; then break; fi
    sleep 0.1
  done
  t1=$(date +%s.%N)
  sleep 0.3
  kill $SPID; wait $SPID || true
  python3 - "$name" "$W" "$t0" "$t1" <<'PY'
import json, sys
name, w, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
fio = json.load(open(w + "/fio.json"))["jobs"][0]["write"]
lag = json.load(open(w + "/lag.json"))
p = lag["peer"]
written = fio["io_bytes"]
print(f"| {name} | {fio['bw']/1024:.0f} | {lag['lag_p50_ms']} | {lag['lag_p99_ms']} | {lag['lag_max_ms']} | "
      f"{p['payload_bytes']/written:.3f} | {p['wire_bytes']/written:.3f} | {p['payload_bytes']/(1<<20)/(t1-t0):.0f} | {t1-t0:.1f} |")
PY
}

echo "| case | fio write MiB/s | lag p50 ms | lag p99 ms | lag max ms | payload sent / changed byte | wire bytes / changed byte | replication MiB/s (to fully applied) | seconds to fully applied |"
echo "|---|---|---|---|---|---|---|---|---|"
run_case seq-1M-incompressible --rw=write --bs=1M --size="$SEQ_SIZE" --refill_buffers --end_fsync=1
run_case seq-1M-50pct-compressible --rw=write --bs=1M --size="$SEQ_SIZE" --buffer_compress_percentage=50 --refill_buffers --end_fsync=1
run_case seq-1M-paced-40MiBps --rw=write --bs=1M --size=400M --rate=40m --refill_buffers --end_fsync=1
run_case rand-4k-incompressible --rw=randwrite --bs=4k --size="$RAND_SIZE" --time_based --runtime="$RAND_TIME" --refill_buffers --fsync=64
run_case rand-64k-overwrite-hot --rw=randwrite --bs=64k --size=16M --time_based --runtime="$RAND_TIME" --refill_buffers --fsync=16
