#!/usr/bin/env bash
# Installs and starts what the libvirt test (tests/libvirt.rs) needs, without
# systemd: libvirtd with the QEMU driver, virtlogd, the libvirt-qemu user
# (group kvm) that runs the guests. QEMU and the guest kernel come from
# tests/powercut/setup.sh.
set -euo pipefail
need=()
command -v libvirtd >/dev/null || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
getent group kvm >/dev/null || groupadd -r kvm
# The QEMU driver also looks the group libvirt-qemu up at start.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 ||
  useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /etc/libvirt /var/log/libvirt /var/run/libvirt
[ -e /etc/libvirt/qemu.conf ] || printf 'user = "libvirt-qemu"\ngroup = "kvm"\n' >/etc/libvirt/qemu.conf
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
virsh -c qemu:///system version >/dev/null || {
  echo "libvirtd did not come up; /var/log/libvirt/libvirtd.log:" >&2
  tail -20 /var/log/libvirt/libvirtd.log >&2
  exit 1
}
