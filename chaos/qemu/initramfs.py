"""The reference device's initramfs: busybox, the driver modules Debian builds as modules, and
an ``/init`` that finds the root slot by partition label and switches to it.

Built in Python as a ``newc`` cpio archive (what the kernel unpacks), gzip-compressed; the
bytes depend only on the inputs (times are zero, owners root).

The ``/init`` mounts the root slot read-only, as the device does: a root slot is never written
while it runs, so its bytes stay exactly those of the image the updater installed (the lab
checks them after every power cut). The squashfs safe-mode slot is read-only anyway.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chaos.qemu.kernel import DebianKernel, module_closure, module_data

# Drivers of the reference machine (virtio disk and 9p, the i6300esb watchdog) and filesystems
# of its slots; dependencies are added by module_closure.
MODULES = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "vfat", "nls_cp437", "nls_ascii",
    "squashfs", "9pnet_virtio", "9p", "i6300esb",
)  # fmt: skip
# The watchdog resets the machine this many seconds after the last keep-alive (QEMU's i6300esb
# resets after its second stage, so the reset comes within twice this).
WATCHDOG_HEARTBEAT_S = 4

INIT = r"""#!/bin/busybox sh
# Metrica Fleet reference device: initramfs. Load the drivers, mount the root slot named by
# root=PARTLABEL=<label> read-only, and hand over to its /sbin/init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do
  case "$module" in
    i6300esb) insmod /modules/$module.ko heartbeat=@HEARTBEAT@ ;;
    *) insmod /modules/$module.ko ;;
  esac
done
label=""
for word in $(cat /proc/cmdline); do
  case "$word" in root=PARTLABEL=*) label="${word#root=PARTLABEL=}" ;; esac
done
device=""
tries=0
while [ -z "$device" ] && [ $tries -lt 100 ]; do
  for uevent in /sys/class/block/*/uevent; do
    if grep -qx "PARTNAME=$label" "$uevent"; then
      device=/dev/$(sed -n 's/^DEVNAME=//p' "$uevent")
    fi
  done
  [ -n "$device" ] || { sleep 0.1; tries=$((tries + 1)); }
done
fstype=ext4
[ "$label" = root_safe ] && fstype=squashfs
mkdir -p /newroot
if [ -z "$device" ] || ! mount -t $fstype -o ro "$device" /newroot; then
  echo "FLEET-QEMU initramfs: cannot mount root $label ($device)"
  exit 1
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes


def _newc(entries: Iterable[_Entry]) -> bytes:
    out = io.BytesIO()
    for number, entry in enumerate([*entries, _Entry("TRAILER!!!", 0, b"")], start=1):
        name = entry.name.encode() + b"\0"
        header = (
            "070701"
            + "".join(
                f"{value:08X}"
                for value in (
                    number if entry.name != "TRAILER!!!" else 0,
                    entry.mode,
                    0, 0,  # uid, gid
                    1 if not stat.S_ISDIR(entry.mode) else 2,
                    0,  # mtime
                    len(entry.data),
                    0, 0, 0, 0,  # device numbers
                    len(name),
                    0,  # checksum
                )
            )
        ).encode()  # fmt: skip
        out.write(header + name)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(entry.data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def build_initramfs(kernel: DebianKernel, busybox: Path) -> bytes:
    """The initramfs for ``kernel``, gzip-compressed (same inputs, same bytes)."""
    modules = module_closure(kernel, MODULES)
    directory = stat.S_IFDIR | 0o755
    entries = [
        _Entry(name, directory, b"") for name in ("bin", "dev", "proc", "sys", "modules", "newroot")
    ]
    entries.append(_Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    init = INIT.replace("@HEARTBEAT@", str(WATCHDOG_HEARTBEAT_S)).encode()
    entries.append(_Entry("init", stat.S_IFREG | 0o755, init))
    order = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(_Entry("modules/order", stat.S_IFREG | 0o644, order))
    for name, path in modules:
        entries.append(_Entry(f"modules/{name}.ko", stat.S_IFREG | 0o644, module_data(path)))
    return gzip.compress(_newc(entries), compresslevel=6, mtime=0)
