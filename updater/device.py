"""Device sensors: temperature, free space, Raspberry Pi throttling, boot id, uptime.

Every function takes the filesystem root it reads (``/sys/class/thermal``, ``/proc``, ...) as a
parameter, so tests and the virtual device pass a fake tree; the throttling bits may also come
from the ``vcgencmd`` program, found on ``PATH``. Nothing here writes anything.

Sensors that are merely absent or unreadable (no thermal zones in a VM, no Raspberry Pi
firmware on an x86 gateway) read as ``None``: an update precondition decides what a missing
reading means, not the sensor code.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, cast

DEFAULT_THERMAL_DIR = Path("/sys/class/thermal")
DEFAULT_PROC = Path("/proc")
DEFAULT_THROTTLED_PATH = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
# Readings outside this range come from a broken or unsupported sensor (some report -273 °C or
# 2^31 millidegrees): trusting one would defer updates forever, or hide a real overheat.
PLAUSIBLE_TEMPERATURE_C = (-60.0, 200.0)
# The firmware's get_throttled value is 32 bits; its text is at most "throttled=0xffffffff".
MAX_THROTTLED = 0xFFFFFFFF
MAX_THROTTLED_TEXT = 64
# Asked when the sysfs node is absent (kernels before 5.x on the Pi); the firmware mailbox
# answers in milliseconds, and a hung one must not hold up the daemon's round.
VCGENCMD_THROTTLED = ("vcgencmd", "get_throttled")
VCGENCMD_TIMEOUT_S = 2.0
_MIB = 1024 * 1024


def read_temperature_c(thermal_dir: Path = DEFAULT_THERMAL_DIR) -> float | None:
    """The hottest plausible reading of ``thermal_dir/thermal_zone*/temp``, in °C.

    Each ``temp`` file holds millidegrees Celsius as a decimal integer. Zones that cannot be
    read, do not hold an integer, or read outside :data:`PLAUSIBLE_TEMPERATURE_C` are ignored.
    Returns ``None`` when no zone gives a usable reading (or ``thermal_dir`` does not exist).
    """
    readings: list[float] = []
    for zone in thermal_dir.glob("thermal_zone*"):
        try:
            millidegrees = int((zone / "temp").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        celsius = millidegrees / 1000.0
        low, high = PLAUSIBLE_TEMPERATURE_C
        if low <= celsius <= high:
            readings.append(celsius)
    return max(readings, default=None)


def free_space_mb(path: Path) -> int:
    """Space available to unprivileged users on the filesystem holding ``path``, in MiB
    (rounded down).

    The unprivileged figure (``f_bavail``), not the total free: the blocks ext4 reserves for
    root are the margin that keeps the device working when the data partition fills up, so an
    update must not count on them.

    Raises:
        OSError: ``path`` does not exist or cannot be examined.
    """
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize // _MIB


class Throttled(enum.IntFlag):
    """The bits of the Raspberry Pi firmware's ``get_throttled`` value.

    The low bits say what is happening now, the same bits shifted by 16 say whether it has
    happened at any time since boot (they stay set until the next boot).
    """

    UNDER_VOLTAGE = 1 << 0  # supply below about 4.63 V now: SD card writes may corrupt
    FREQUENCY_CAPPED = 1 << 1  # ARM frequency capped now
    THROTTLED = 1 << 2  # ARM frequency reduced now (temperature or voltage)
    SOFT_TEMPERATURE_LIMIT = 1 << 3  # soft temperature limit active now (Pi 3B+ and later)
    UNDER_VOLTAGE_OCCURRED = 1 << 16
    FREQUENCY_CAPPED_OCCURRED = 1 << 17
    THROTTLED_OCCURRED = 1 << 18
    SOFT_TEMPERATURE_LIMIT_OCCURRED = 1 << 19

    @property
    def now(self) -> Throttled:
        """Only the conditions that are active at the time of reading."""
        return self & Throttled(0xF)

    @property
    def since_boot(self) -> Throttled:
        """Only the conditions that have occurred at some time since boot."""
        return self & Throttled(0xF0000)


def parse_throttled(text: str) -> int | None:
    """The ``get_throttled`` value in ``text``, or ``None`` when it holds none.

    Accepts the sysfs form (bare hexadecimal, ``50005``) and the ``vcgencmd get_throttled``
    form (``throttled=0x50005``). The firmware's value is 32 bits wide: anything longer than
    :data:`MAX_THROTTLED_TEXT` characters, negative, or above 32 bits is not one.
    """
    text = text.strip()
    if len(text) > MAX_THROTTLED_TEXT:
        return None
    _, _, value = text.rpartition("=")
    value = value.strip()
    if not value or not value.isascii():
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number if 0 <= number <= MAX_THROTTLED else None


def read_throttled(path: Path = DEFAULT_THROTTLED_PATH) -> int | None:
    """The firmware's ``get_throttled`` value (see :class:`Throttled` for its bits) read from
    ``path``, in either form :func:`parse_throttled` accepts, so a ``vcgencmd`` output can be
    captured into a file. Returns ``None`` when the file is missing (not a Raspberry Pi,
    firmware driver not loaded), cannot be read or does not hold a value.
    """
    try:
        return parse_throttled(_node_text(path))
    except (OSError, ValueError):
        return None


def _node_text(path: Path) -> str:
    """The start of the firmware node ``path``, enough for any value. Raises
    ``FileNotFoundError``/``NotADirectoryError`` when it is absent, ``OSError`` or
    ``ValueError`` when it cannot be read: opened without blocking and refused unless a
    regular file (a sysfs attribute is one), so a FIFO put in its place cannot stop the
    daemon's round."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return (handle.read(MAX_THROTTLED_TEXT + 1) or b"").decode("ascii")


def vcgencmd_throttled(
    command: Sequence[str] = VCGENCMD_THROTTLED, timeout_s: float = VCGENCMD_TIMEOUT_S
) -> int | None:
    """The ``get_throttled`` value as ``vcgencmd get_throttled`` prints it; ``None`` when the
    program is not installed, fails, takes longer than ``timeout_s`` (the firmware mailbox
    can hang) or prints anything but ``throttled=0x...``."""
    program = shutil.which(command[0])
    if program is None:
        return None
    try:
        # read at most what an answer takes, until its first line ends or the deadline: a
        # program printing without end must not fill the daemon's memory, nor one holding its
        # output open (or a child it left, in a session of its own) hold up the daemon. It
        # runs in a session of its own, killed whole once the answer is read or time is up.
        with subprocess.Popen(
            [program, *command[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True,
        ) as process:  # fmt: skip
            deadline = time.monotonic() + timeout_s
            try:
                head = _read_line(cast(IO[bytes], process.stdout), deadline)  # stdout=PIPE
                # it must exit 0, or still run at the deadline with its answer given
                returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                returncode = -signal.SIGKILL
            finally:
                _kill_session(process)
    except (OSError, subprocess.SubprocessError):
        return None
    if returncode not in (0, -signal.SIGKILL) or not head:
        return None
    output = head.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
    if not output.startswith("throttled="):
        return None
    return parse_throttled(output)


def _read_line(stream: IO[bytes], deadline: float) -> bytes:
    """What ``stream`` gives before ``deadline`` (``time.monotonic``), up to its first newline
    and at most :data:`MAX_THROTTLED_TEXT` + 1 bytes."""
    fd = stream.fileno()
    head = b""
    while b"\n" not in head and len(head) <= MAX_THROTTLED_TEXT:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, MAX_THROTTLED_TEXT + 1 - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _kill_session(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to ``process`` and every process of its session (it was started in one of its
    own); nothing when it is gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def throttled_state(
    path: Path = DEFAULT_THROTTLED_PATH,
    command: Sequence[str] = VCGENCMD_THROTTLED,
    timeout_s: float = VCGENCMD_TIMEOUT_S,
) -> int | None:
    """The firmware's ``get_throttled`` value now: from the sysfs node ``path`` when it exists,
    else from ``vcgencmd`` (older kernels have no node). ``None``: unknown (not a Raspberry
    Pi, or an unreadable answer); a node that exists but reads badly is unknown too, not a
    reason to ask ``vcgencmd``, which reads the same firmware."""
    try:
        text = _node_text(path)
    except (FileNotFoundError, NotADirectoryError):
        return vcgencmd_throttled(command, timeout_s)
    except (OSError, ValueError):
        return None
    return parse_throttled(text)


def under_voltage_now(value: int | None) -> bool | None:
    """Whether ``value`` (a ``get_throttled`` value, ``None``: unknown) says the supply is
    below the firmware's threshold now (bit 0). The "occurred since boot" bits do not count:
    they stay set until the next boot, long after the supply recovered."""
    if value is None:
        return None
    return bool(Throttled(value) & Throttled.UNDER_VOLTAGE)


def throttled_names(value: Throttled) -> list[str]:
    """The names of the bits set in ``value``, lowest first (``under_voltage``, ...)."""
    return [flag.name.lower() for flag in Throttled if flag.name and flag in value]


def boot_id(proc: Path = DEFAULT_PROC) -> str:
    """The kernel's random id of this boot (``proc/sys/kernel/random/boot_id``): it changes on
    every boot, so the boot check can tell "rebooted since" from "restarted since" without a
    real-time clock.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty.
    """
    path = proc / "sys" / "kernel" / "random" / "boot_id"
    text = path.read_text(encoding="ascii").strip()
    if not text:
        raise ValueError(f"{path}: empty")
    return text


def uptime_s(proc: Path = DEFAULT_PROC) -> float:
    """Seconds since boot, from the first field of ``proc/uptime``.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file does not start with a finite, non-negative number.
    """
    path = proc / "uptime"
    fields = path.read_text(encoding="ascii").split()
    try:
        seconds = float(fields[0])
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: not an uptime: {' '.join(fields)[:40]!r}") from err
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{path}: not an uptime: {fields[0][:40]!r}")
    return seconds


def run_reboot(command: Sequence[str]) -> None:
    """Reboot with ``command`` (the backend's, e.g. ``reboot "0 tryboot"``): the one place
    every part of the updater reboots through, unless given a hook (the lab's). Whatever the
    command prints goes to standard error: standard output is the commands' (a ``--json``
    document). The process's descriptor 2, not ``sys.stderr``, which may be no file at all."""
    subprocess.run(list(command), check=True, stdout=2)
