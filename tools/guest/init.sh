#!/bin/busybox sh
# PID 1 of the vfs test guest (tools/guest). Everything it says goes to the serial console as
# lines starting "vfsguest: ", which the host-side tests read from the serial log.
#
# Kernel command line (read from /proc/cmdline; the dotted names are ignored by the kernel):
#   vfsguest.run=W[,W...]   workloads: idle (default), dirty, append, poweroff
#   vfsguest.count=N        stop dirty/append after N rounds (0 = forever, the default)
#   vfsguest.dirty_mb=M     memory the dirty workload rewrites each round (default 32 MiB)
#   vfsguest.interval=S     seconds between appended lines (default 0.1)
#
# dirty:    rewrites M MiB of tmpfs with non-zero bytes (zero pages would migrate for free),
#           round after round, and prints "vfsguest: dirty N"; a 1 MiB random block is checked
#           against its md5 every round and "vfsguest: dirty CORRUPT N" printed if it changed.
# append:   appends "line N" to /mnt/vfsguest/append.log on /dev/vda, fsyncs it (dd conv=fsync)
#           and only then prints "vfsguest: synced N"; numbering continues from the file's last
#           line, so a restored or rebooted guest goes on where it was.
# poweroff: once the other workloads end (vfsguest.count), unmount the disk and power off.

/bin/busybox mkdir -p /proc /sys /dev /mnt /run /tmp
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run

say() { echo "vfsguest: $*"; }

RUN=idle
COUNT=0
DIRTY_MB=32
INTERVAL=0.1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vfsguest.run=*) RUN="${arg#*=}" ;;
        vfsguest.count=*) COUNT="${arg#*=}" ;;
        vfsguest.dirty_mb=*) DIRTY_MB="${arg#*=}" ;;
        vfsguest.interval=*) INTERVAL="${arg#*=}" ;;
    esac
done

while read -r m; do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done < /lib/modules/load-order

DISK=no
if [ -b /dev/vda ]; then
    if mount -t ext4 /dev/vda /mnt; then
        DISK=yes
        say "disk /dev/vda mounted"
    else
        DISK=failed
        say "disk /dev/vda mount failed"
    fi
fi

again() { [ "$COUNT" -eq 0 ] || [ "$1" -lt "$COUNT" ]; }

dirty() {
    dd if=/dev/urandom of=/run/check bs=64k count=16 2>/dev/null
    sum=$(md5sum < /run/check)
    i=0
    while [ "$i" -lt "$DIRTY_MB" ]; do cat /run/check; i=$((i + 1)); done > /run/src
    i=0
    while again "$i"; do
        i=$((i + 1))
        dd if=/run/src of=/run/dirty bs=1M conv=notrunc 2>/dev/null
        if [ "$(md5sum < /run/check)" = "$sum" ]; then say "dirty $i"; else say "dirty CORRUPT $i"; fi
    done
}

append() {
    if [ "$DISK" != yes ]; then say "append: no disk"; return 1; fi
    f=/mnt/vfsguest/append.log
    mkdir -p /mnt/vfsguest
    touch "$f"
    sync
    last=$(tail -n 1 "$f" | cut -d ' ' -f 2)
    n=${last:-0}
    i=0
    while again "$i"; do
        i=$((i + 1))
        n=$((n + 1))
        if echo "line $n" | dd of="$f" oflag=append conv=notrunc,fsync 2>/dev/null; then
            say "synced $n"
        else
            say "append $n FAILED"
        fi
        sleep "$INTERVAL"
    done
}

POWEROFF=no
for w in $(echo "$RUN" | tr ',' ' '); do
    case "$w" in
        idle) ;;
        dirty) dirty & ;;
        append) append & ;;
        poweroff) POWEROFF=yes ;;
        *) say "unknown workload $w" ;;
    esac
done

say "ready run=$RUN disk=$DISK uptime=$(cut -d ' ' -f 1 /proc/uptime)"

if [ "$POWEROFF" = yes ]; then
    wait
    [ "$DISK" = yes ] && umount /mnt
    sync
    say "poweroff"
    poweroff -f
fi
while :; do wait; sleep 3600; done
