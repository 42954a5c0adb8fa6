#!/bin/busybox sh
# /init of the power-cut guest. The kernel command line says what to do:
#   pc.mode=work   primary + replica, fsync'ed writes; each one is printed as
#                  "ACK file slot tag" only after its fsync returned. Runs until
#                  the host cuts the power.
#   pc.mode=clean  buffered writes (printed as "PENDING ..."), then unmount;
#                  once CLEAN exists, the guest cuts its own power after
#                  pc.delay microseconds (sysrq b: no sync, RAM is lost).
#   pc.mode=check  recover both daemons, wait until the replica has applied
#                  everything, stop them cleanly, power off.
# Disks: vda = primary (backing/, state/), vdb = replica (mirror/, state/),
# both ext4. Lines for the host start with "PC ".
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

say() { echo "PC $*" >/dev/console; }
die() { say "FAIL $*"; sync; poweroff -f; }

arg() { sed -n "s/.*\bpc\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
MODE=$(arg mode)
SEED=$(arg seed)
DELAY=$(arg delay)
export REPLICAFS_LOG=$(arg log)
[ -n "$REPLICAFS_LOG" ] || export REPLICAFS_LOG=warn

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk fuse; do
  insmod /lib/modules/$m.ko || die "insmod $m"
done
n=0
while [ ! -b /dev/vdb ]; do
  n=$((n + 1)); [ $n -lt 500 ] || die "no /dev/vdb"; usleep 20000
done
ifconfig lo 127.0.0.1 up

# Nothing reaches the disks unless someone syncs: no periodic or background
# writeback, and a long ext4 commit interval. A missing sync then shows.
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 360000 >/proc/sys/vm/dirty_expire_centisecs
echo 80 >/proc/sys/vm/dirty_background_ratio
echo 90 >/proc/sys/vm/dirty_ratio
echo 1 >/proc/sys/kernel/sysrq

mkdir -p /p /r /mnt
mount -t ext4 -o commit=600 /dev/vda /p || die "mount vda"
mount -t ext4 -o commit=600 /dev/vdb /r || die "mount vdb"

start_daemons() {
  replicafs replica --mirror /r/mirror --listen 127.0.0.1:7070 --state-dir /r/state \
    --trust "$(cat /r/primary.fp)" 2>/dev/console &
  RPID=$!
  replicafs mount /p/backing /mnt --state-dir /p/state \
    --peer "127.0.0.1:7070=$(cat /p/replica.fp)" 2>/dev/console &
  PPID_=$!
  n=0
  while ! grep -q " /mnt fuse" /proc/mounts; do
    n=$((n + 1)); [ $n -lt 3000 ] || die "mount did not come up"
    kill -0 $PPID_ 2>/dev/null || die "replicafs mount exited"
    usleep 100000
  done
}

# One 4 KiB block filled with the tag (and newlines).
block() { yes "$1" | head -c 4096 >/tmp/blk; }

# A deterministic pseudo-random sequence from the seed.
R=$SEED
rnd() { R=$(( (R * 1103515245 + 12345) % 2147483648 )); }

case "$MODE" in
work)
  start_daemons
  say READY
  # The replica's durable applied seq, for the host to cut the power once
  # the replica has persisted one.
  while :; do
    a=$(replicafs status --state-dir /r/state --json 2>/dev/null | tr -d ' \n' |
      sed -n 's/.*"applied":\([0-9]*\).*/\1/p')
    say "RAPPLIED ${a:-0}"
    sleep 1
  done &
  i=0
  s0=0; s1=0; s2=0; s3=0
  while :; do
    rnd
    f=$(( (R >> 16) % 4 ))
    eval "slot=\$s$f"
    eval "s$f=$((slot + 1))"
    tag="s${SEED}w$i"
    block "$tag"
    if [ $(( (R >> 20) % 3 )) -ne 0 ]; then
      dd if=/tmp/blk of=/mnt/f$f bs=4096 seek=$slot count=1 conv=notrunc,fsync 2>/dev/null &&
        say "ACK f$f $slot $tag"
    else
      dd if=/tmp/blk of=/mnt/f$f bs=4096 seek=$slot count=1 conv=notrunc 2>/dev/null
    fi
    i=$((i + 1))
  done
  ;;
clean)
  start_daemons
  say READY
  i=0
  while [ $i -lt 256 ]; do
    rnd
    f=$(( (R >> 16) % 4 ))
    tag="s${SEED}c$i"
    block "$tag"
    dd if=/tmp/blk of=/mnt/f$f bs=4096 seek=$i count=1 conv=notrunc 2>/dev/null ||
      die "write f$f $i"
    say "PENDING f$f $i $tag"
    i=$((i + 1))
  done
  umount /mnt || die "umount"
  while [ ! -e /p/state/journal/CLEAN ]; do
    kill -0 $PPID_ 2>/dev/null || break
    usleep 1000
  done
  [ -n "$DELAY" ] && usleep "$DELAY"
  say CUT
  echo b >/proc/sysrq-trigger
  ;;
check)
  start_daemons
  say READY
  # Converged: the replica durably applied the primary's newest seq, twice
  # in a row a second apart (recovery may still be adding records).
  ok=0
  n=0
  while [ $ok -lt 2 ]; do
    n=$((n + 1)); [ $n -lt 400 ] || die "no convergence: $(replicafs status --state-dir /p/state 2>&1)"
    sleep 1
    st=$(replicafs status --state-dir /p/state --json 2>/dev/null | tr -d ' \n')
    last=$(echo "$st" | sed -n 's/.*"last_seq":\([0-9]*\).*/\1/p')
    applied=$(echo "$st" | sed -n 's/.*"applied":\([0-9]*\).*/\1/p')
    if [ -n "$last" ] && [ "$last" = "$applied" ] && echo "$st" | grep -q '"state":"replicating"'; then
      ok=$((ok + 1))
    else
      ok=0
    fi
  done
  say "CONVERGED $last"
  umount /mnt || die "umount"
  wait $PPID_ || die "replicafs mount failed"
  kill -TERM $RPID
  wait $RPID || die "replicafs replica failed"
  umount /p || die "umount /p"
  umount /r || die "umount /r"
  say DONE
  poweroff -f
  ;;
*)
  die "unknown pc.mode=$MODE"
  ;;
esac
sleep 1000000
