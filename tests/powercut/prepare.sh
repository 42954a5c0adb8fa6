#!/usr/bin/env bash
# prepare.sh initrd OUT_DIR REPLICAFS_BIN KERNEL_DIR
#   Builds OUT_DIR/initrd.cpio: busybox, the virtio and fuse modules, the
#   replicafs binary (debug info stripped) with the libraries ldd names, and
#   init.sh as /init.
# prepare.sh disks OUT_DIR REPLICAFS_BIN
#   Makes fresh OUT_DIR/primary.img and OUT_DIR/replica.img (ext4, raw), each
#   with its node key and the other's fingerprint.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=$1 out=$2 bin=$3

case "$cmd" in
initrd)
  kdir=$4
  root=$out/initrd.root
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
  cp "$(command -v busybox)" "$root/bin/busybox"
  mods=$(ls -d "$kdir"/lib/modules/*/kernel)
  for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk fs/fuse/fuse; do
    cp "$mods/$m.ko" "$root/lib/modules/"
  done
  objcopy --strip-debug "$bin" "$root/bin/replicafs"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  install -m 0755 "$here/init.sh" "$root/init"
  (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) >"$out/initrd.cpio"
  rm -rf "$root"
  ;;
disks)
  for side in primary replica; do
    rm -rf "$out/$side.root"
    mkdir -p "$out/$side.root/state"
    chmod 0700 "$out/$side.root/state"
    "$bin" keygen --state-dir "$out/$side.root/state" >"$out/$side.fp"
  done
  mkdir -p "$out/primary.root/backing" "$out/replica.root/mirror"
  cp "$out/replica.fp" "$out/primary.root/replica.fp"
  cp "$out/primary.fp" "$out/replica.root/primary.fp"
  for side in primary replica; do
    rm -f "$out/$side.img"
    truncate -s 256M "$out/$side.img"
    mkfs.ext4 -q -F -d "$out/$side.root" "$out/$side.img"
    rm -rf "$out/$side.root"
  done
  ;;
*)
  echo "usage: prepare.sh initrd|disks OUT_DIR REPLICAFS_BIN [KERNEL_DIR]" >&2
  exit 2
  ;;
esac
