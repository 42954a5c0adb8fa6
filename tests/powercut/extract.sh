#!/usr/bin/env bash
# extract.sh IMAGE OUT_DIR: the files of an ext4 image as a kernel would see
# them after mounting it: a copy of the image gets its ext4 journal replayed
# (e2fsck), then everything is copied out (debugfs rdump; no loop device).
set -euo pipefail
img=$1 out=$2
tmp=$out.img
cp --sparse=always "$img" "$tmp"
rc=0
e2fsck -fy "$tmp" >"$out.fsck.log" 2>&1 || rc=$?
if [ $rc -ge 4 ]; then
  echo "e2fsck failed ($rc) on a copy of $img: see $out.fsck.log" >&2
  exit 1
fi
mkdir -p "$out"
debugfs -R "rdump / $out" "$tmp" >"$out.debugfs.log" 2>&1
rm -f "$tmp"
