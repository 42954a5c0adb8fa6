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
# The package test (tests/packaging.rs): dpkg-shlibdeps, systemd-analyze, man.
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v man >/dev/null || need+=(man-db)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# promtool for the metrics test (tests/metrics.rs) comes with the Prometheus
# server package, whose service must not start here.
if ! command -v promtool >/dev/null; then
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# cargo-deb builds the package (pinned: its flags are what build-deb.sh uses).
command -v cargo-deb >/dev/null || cargo install cargo-deb --version 3.8.0 --locked
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: modprobe fuse" >&2; exit 1; }
# QEMU, busybox and a guest kernel for the power-cut harness (tests/powercut.rs).
bash tests/powercut/setup.sh
# libvirtd, virtlogd and the libvirt-qemu user for tests/libvirt.rs (no systemd).
bash tests/libvirt/setup.sh

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets "$@"
