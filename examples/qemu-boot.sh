#!/usr/bin/env bash
# Boot a VM whose disk lives on a replicafs mount.
# cache=none opens the image O_DIRECT; the guest's flushes become fdatasync on
# the mount, which makes the journal durable through that point.
set -euo pipefail
MNT=${MNT:-/srv/vm}
IMG=${IMG:-$MNT/guest.qcow2}
[ -f "$IMG" ] || qemu-img create -f qcow2 "$IMG" 20G
exec qemu-system-x86_64 \
  -machine q35,accel=kvm:tcg -m 2048 -smp 2 \
  -drive file="$IMG",format=qcow2,if=virtio,cache=none,aio=threads,discard=unmap \
  -nographic "$@"
