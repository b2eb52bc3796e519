"""What the reference device's slots hold: small real root filesystems running the real updater.

A root slot is an ext4 image with the kernel and initramfs at its top (GRUB loads
``(hd0,gpt2)/vmlinuz``), static busybox, an ``/sbin/init`` script, the updater's configuration
and keyring, and a release file saying what the release does at boot (``healthy``;
``unhealthy``: its health check fails; ``hang``: init hangs with the watchdog armed; ``panic``:
init dies, the kernel panics and reboots).

The updater is the host's: the host's ``/usr``, its Python installation and the project
checkout are shared read-only over virtio-9p and mounted at the same paths in the guest, and
``fleet-updater`` runs from there. This keeps a slot image at about 20 MiB, so an install
under emulation takes seconds and ten power cuts fit the time budget; a Debian root with
Python and the project's dependencies would be ten times larger and would test a copy of the
code rather than the checkout (docs/qemu.md).

The init scripts report on the serial console in lines ``FLEET-QEMU <event> key=value ...``
that :mod:`chaos.qemu.machine` parses, and then serve a few commands read from the console
(``install <bundle>``, ``status``, ``reboot``).
"""

from __future__ import annotations

import compileall
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chaos.qemu.kernel import PROJECT_ROOT

MARKER = "FLEET-QEMU"
BEHAVIOURS = ("healthy", "unhealthy", "hang", "panic")
COMPATIBLE = "qemu-reference"
INBOX = "/srv/inbox"
RELEASE_FILE = "etc/fleet-lab/release"
SHARES_FILE = "etc/fleet-lab/shares"

# /sbin/init of every slot (root slots and safe mode); @UPDATER@ is the fleet-updater command.
SLOT_INIT = r"""#!/bin/sh
# Metrica Fleet reference device: init of a slot.
export PATH=/bin:/usr/bin:/usr/sbin HOME=/tmp LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
. /etc/fleet-lab/release
say() { echo "FLEET-QEMU $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/disk/by-partlabel
for uevent in /sys/class/block/*/uevent; do
  name=$(sed -n 's/^PARTNAME=//p' "$uevent")
  device=/dev/$(sed -n 's/^DEVNAME=//p' "$uevent")
  [ -n "$name" ] && ln -sf "$device" "/dev/disk/by-partlabel/$name"
done
while read -r tag path; do
  mkdir -p "$path" 2>/dev/null  # under /tmp (a tmpfs now); elsewhere the image has it
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose "$tag" "$path" ||
    say mount-failed share=$tag
done < /etc/fleet-lab/shares
mount -t vfat -o rw,flush /dev/disk/by-partlabel/esp /boot/efi || say mount-failed part=esp
mount -t ext4 -o rw /dev/disk/by-partlabel/data /var/lib/fleet || say mount-failed part=data
slot=unknown
for word in $(cat /proc/cmdline); do
  case "$word" in fleet.slot=*) slot="${word#fleet.slot=}" ;; esac
done
env=$(grep -E '^(BOOT_ORDER|BOOT_A_LEFT|BOOT_B_LEFT|FLEET_TRIAL)=' /boot/efi/EFI/fleet/grubenv |
  sed 's/ /,/g' | tr '\n' ' ')
say booted slot=$slot role=$ROLE version=$VERSION behaviour=$BEHAVIOUR $env
case "$BEHAVIOUR" in
  hang)
    exec 3>/dev/watchdog
    say hanging watchdog=armed
    while :; do sleep 3600; done ;;
  panic)
    say panicking
    exit 1 ;;
esac
watchdog -T 30 -t 2 /dev/watchdog
status() {
  say status-begin
  @UPDATER@ status --json 2>/dev/null
  say status-end
}
if [ "$ROLE" = safe ]; then
  say safe-mode
  @UPDATER@ boot-check
  say boot-check rc=$?
  status
  if [ -e @INBOX@/recovery.bundle ]; then
    @UPDATER@ recover @INBOX@/recovery.bundle
    say recover rc=$?
  fi
else
  @UPDATER@ boot-check
  say boot-check rc=$?
fi
say ready slot=$slot
while read -r command argument; do
  case "$command" in
    install) @UPDATER@ install "$argument"; say done command=install rc=$? ;;
    status) status ;;
    reboot) sync; reboot -f ;;
    *) say unknown command=$command ;;
  esac
done < /dev/console
"""

HEALTH = {
    True: "#!/bin/sh\necho 'release healthy'\nexit 0\n",
    False: "#!/bin/sh\necho 'release reports unhealthy' >&2\nexit 1\n",
}


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts read-only over virtio-9p: at ``mount``, by default
    at the same path."""

    tag: str
    path: Path
    mount: Path | None = None

    @property
    def mount_point(self) -> Path:
        return self.mount or self.path


def host_shares(inbox: Path, checkout: Path | None = None) -> list[Share]:
    """What the guest needs of the host to run the updater: ``/usr`` (libraries), the Python
    installation, the project checkout; and the inbox of bundles, mounted at :data:`INBOX`.
    ``checkout`` (from :func:`compiled_checkout`) is mounted in place of the project checkout."""
    project = PROJECT_ROOT.resolve()
    pythons = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()]
    paths: list[Path] = [Path("/usr")]
    for real in (*pythons, project):
        if not any(real.is_relative_to(p) for p in paths):
            paths = [p for p in paths if not p.is_relative_to(real)] + [real]
    shares = [Share(f"host{index}", path) for index, path in enumerate(paths)]
    if checkout is not None:
        shares = [s for s in shares if s.path != project]
        shares.append(Share("checkout", checkout, project))
        # a Python installation inside the checkout (its virtual environment, as `make test`
        # makes it) is not in the copy: shared on its own, mounted on the copy's directory
        for index, real in enumerate(pythons):
            if real.is_relative_to(project) and all(s.path != real for s in shares):
                (checkout / real.relative_to(project)).mkdir(parents=True, exist_ok=True)
                shares.append(Share(f"python{index}", real))
    # parents before what is mounted inside them
    shares.sort(key=lambda share: len(share.mount_point.parts))
    return [*shares, Share("inbox", inbox, Path(INBOX))]


def compiled_checkout(destination: Path) -> Path:
    """A copy of the project's Python packages at ``destination``, with their bytecode.

    The guest mounts it where the checkout is (the editable install points there) and imports
    the code under test from it. Without bytecode every ``fleet-updater`` run in the guest
    would compile the project's modules again (the checkout has none when the host runs with
    ``PYTHONDONTWRITEBYTECODE``, and the guest's share is read-only): seconds under TCG, for
    each boot check, install and status. The copy keeps modification times, so the bytecode
    matches its sources.
    """
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for package in sorted(PROJECT_ROOT.iterdir()):
        if package.name != "tests" and (package / "__init__.py").is_file():
            shutil.copytree(package, destination / package.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    if not compileall.compile_dir(destination, quiet=2):
        raise RuntimeError(f"cannot compile the project's modules in {destination}")
    return destination


def updater_command() -> str:
    """The ``fleet-updater`` of the host's Python, as the guest runs it."""
    script = Path(sys.executable).parent / "fleet-updater"
    if script.is_file():
        return str(script)
    return f"{sys.executable} -c 'from updater.cli import main; main()'"


def updater_toml(*, attempts: int, recovery: bool = False) -> str:
    """The updater configuration of a slot."""
    del recovery
    return f"""\
compatible = "{COMPATIBLE}"
keyring = "/etc/fleet/keyring"
data_dir = "/var/lib/fleet"
reboot_command = ["/bin/reboot", "-f"]

[bootloader]
backend = "grub"
grubenv = "/boot/efi/EFI/fleet/grubenv"
attempts = {attempts}

[slots.a]
rootfs = "PARTLABEL=root_a"

[slots.b]
rootfs = "PARTLABEL=root_b"

[limits]
min_free_mb = 1

[health]
deadline_s = 60

[[health.checks]]
type = "command"
argv = ["/etc/fleet/health"]
"""


def _busybox_applets(busybox: Path) -> list[str]:
    result = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    # init is ours (/sbin/init), not busybox's
    return sorted(name for name in result.stdout.split() if name not in ("busybox", "init"))


def populate_slot_tree(
    root: Path,
    *,
    vmlinuz: Path,
    initrd: bytes,
    busybox: Path,
    keyring: Path,
    shares: Sequence[Share],
    version: str,
    behaviour: str,
    role: str = "root",
    attempts: int = 3,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Fill ``root`` with a slot's tree (see the module docstring)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r} (known: {', '.join(BEHAVIOURS)})")
    directories = ["bin", "sbin", "proc", "sys", "dev", "tmp", "run", "boot/efi", "var/lib/fleet",
                   "etc/fleet/keyring", "etc/fleet-lab", INBOX.lstrip("/")]  # fmt: skip
    for directory in directories:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for share in shares:
        (root / share.mount_point.relative_to("/")).mkdir(parents=True, exist_ok=True)
    for name, target in (("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (root / name).symlink_to(target)
    shutil.copyfile(vmlinuz, root / "vmlinuz")
    (root / "initrd.img").write_bytes(initrd)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in _busybox_applets(busybox):
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    init = SLOT_INIT.replace("@UPDATER@", updater_command()).replace("@INBOX@", INBOX)
    _write(root / "sbin" / "init", init, 0o755)
    _write(root / RELEASE_FILE, f"VERSION={version}\nBEHAVIOUR={behaviour}\nROLE={role}\n")
    _write(root / SHARES_FILE, "".join(f"{s.tag} {s.mount_point}\n" for s in shares))
    _write(root / "etc/fleet/updater.toml", updater_toml(attempts=attempts))
    _write(root / "etc/fleet/health", HEALTH[behaviour != "unhealthy"], 0o755)
    for key in sorted(keyring.iterdir()):
        shutil.copyfile(key, root / "etc/fleet/keyring" / key.name)
    for relative, text in (extra_files or {}).items():
        _write(root / relative, text)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
