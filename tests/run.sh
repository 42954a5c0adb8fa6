#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs them all.
# Needs root (FUSE mounts, device nodes) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fio >/dev/null || need+=(fio)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v setfattr >/dev/null || need+=(attr)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: modprobe fuse" >&2; exit 1; }
# QEMU, busybox and a guest kernel for the power-cut harness (tests/powercut.rs).
bash tests/powercut/setup.sh

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets "$@"
