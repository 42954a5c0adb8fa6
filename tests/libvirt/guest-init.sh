#!/bin/busybox sh
# /init of the libvirt test's guest: reads the marker the host wrote at the
# start of its disk (vda, a raw volume of the pool), prints it on the serial
# console, writes its own line 1 MiB in, flushes, powers off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
for _ in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "GUEST READ: $(dd if=/dev/vda bs=32 count=1 2>/dev/null)"
echo "GUEST-WROTE-THIS" | dd of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null
sync
echo "GUEST DONE"
poweroff -f
