#!/usr/bin/env bash
# Installs what the power-cut harness needs: QEMU (system emulator), a static
# busybox for the guest's initramfs, and a Debian cloud kernel unpacked into a
# cache dir (never installed into the host's /boot).
set -euo pipefail
cache=${POWERCUT_CACHE:-/var/cache/replicafs-powercut}

need=()
system=0
# A newer qemu-utils (qemu-img, qemu-io, which other tests use; a backport,
# say) breaks the distribution's qemu-system-x86: install both together, at
# the system emulator's version (a downgrade of qemu-utils if need be).
command -v qemu-system-x86_64 >/dev/null || system=1
command -v qemu-img >/dev/null || need+=(qemu-utils)
# The initramfs needs a static busybox (no libraries of its own).
if ! command -v busybox >/dev/null || ldd "$(command -v busybox)" >/dev/null 2>&1; then
  need+=(busybox-static)
fi
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ] || [ $system = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  extra=()
  if [ $system = 1 ]; then
    ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2; exit}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "no qemu-system-x86 package" >&2; exit 1; }
    need=("${need[@]/#qemu-utils/}")
    need+=(qemu-system-x86 "qemu-utils=$ver")
    extra+=(--allow-downgrades)
  fi
  echo "installing: ${need[*]}"
  apt-get install -y -qq "${extra[@]}" ${need[@]} >/dev/null
fi

if ! ls "$cache"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  echo "fetching the guest kernel into $cache"
  mkdir -p "$cache/debs" "$cache/kernel"
  # The meta package names the versioned image package it depends on.
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 |
      awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "cannot find the cloud kernel package" >&2; exit 1; }
  (cd "$cache/debs" && apt-get download "$pkg")
  for deb in "$cache"/debs/*.deb; do dpkg -x "$deb" "$cache/kernel"; done
fi
ls "$cache"/kernel/boot/vmlinuz-* >/dev/null
