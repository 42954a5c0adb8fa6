#!/usr/bin/env bash
# initrd.sh OUT KERNEL_DIR: a busybox initramfs with the virtio block modules
# and guest-init.sh as /init, for the libvirt test's guest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1 kdir=$2
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,lib/modules}
cp "$(command -v busybox)" "$root/bin/busybox"
mods=$(ls -d "$kdir"/lib/modules/*/kernel)
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
  drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk; do
  cp "$mods/$m.ko" "$root/lib/modules/"
done
install -m 0755 "$here/guest-init.sh" "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) >"$out"
