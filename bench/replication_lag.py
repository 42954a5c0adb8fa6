#!/usr/bin/env python3
"""Samples a primary's status socket and reports replication lag.

For every journal seq the primary shows, the lag is the time from the first
status sample in which `last_seq` reached it (the write was acknowledged: a
record is journaled before the write returns) to the first sample in which the
peer's `applied` reached it (the replica acknowledged it applied). Resolution
is the sampling period (default 10 ms).

usage: replication_lag.py STATE_DIR OUT_JSON   (runs until SIGTERM/SIGINT)
"""
import json
import signal
import socket
import sys
import time

state, out = sys.argv[1], sys.argv[2]
period = 0.01
running = True


def stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)


def query():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(state + "/status.sock")
    buf = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        buf += b
    s.close()
    return json.loads(buf)


seen = []       # (seq, t) first time last_seq >= seq, increasing
lags = []
next_idx = 0    # first entry of `seen` not applied yet
first = last = None
while running:
    t = time.monotonic()
    try:
        st = query()
    except Exception:
        time.sleep(period)
        continue
    last_seq = st["last_seq"]
    applied = min((p["applied"] for p in st["peers"]), default=0)
    if not seen or last_seq > seen[-1][0]:
        seen.append((last_seq, t))
    while next_idx < len(seen) and seen[next_idx][0] <= applied:
        lags.append(t - seen[next_idx][1])
        next_idx += 1
    first = first or st
    last = st
    time.sleep(period)

lags.sort()


def pct(p):
    if not lags:
        return None
    return lags[min(len(lags) - 1, int(p / 100.0 * len(lags)))]


res = {
    "samples": len(lags),
    "lag_p50_ms": None if not lags else round(pct(50) * 1000, 1),
    "lag_p99_ms": None if not lags else round(pct(99) * 1000, 1),
    "lag_max_ms": None if not lags else round(lags[-1] * 1000, 1),
    "peer": last["peers"][0] if last and last["peers"] else None,
}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
