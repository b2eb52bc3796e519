"""How much of the network an update may use, and when: the download rate limit
(``[bandwidth] rate_limit``) and the maintenance windows (``[updates] windows``).

The rate limit is a token bucket every downloaded byte passes through
(:class:`RateLimit`; :class:`updater.fetch.HttpStream` takes from it). The windows' syntax and
rules are :mod:`fleet_core.windows`, shared with the server, which never imports the updater;
here they meet the device's configuration and time zone (:class:`UpdateSchedule`).

A window only gates the *start* of a download: an install that started inside a window
finishes, however long it takes (its deadline, ``[limits] update_deadline_s``, still bounds
it). Only installs wait: a rollback to the release intact in the other slot (no download) and a
recovery from safe mode go ahead at any time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet_core.windows import Window, WindowError, inside, next_open, next_open_all, parse_windows
from image_builder.filesystem import parse_size

# The slowest rate accepted: a download reads up to 64 KiB at a time (fetch.RECEIVE_CHUNK), and
# a slower rate would hold the daemon in one wait for longer than 8 s, where an emergency stop
# must reach a download within seconds.
MIN_RATE = 8 * 1024
MAX_RATE = 100 * 1000**3  # 100 GB/s: above any link a device has
BURST_S = 1.0  # a bucket holds this many seconds' worth of bytes
LOCALTIME = Path("/etc/localtime")
_RATE = re.compile(r"\s*(.*?)\s*/\s*s\s*", re.IGNORECASE | re.ASCII)


class RateLimit:
    """A token bucket: on average at most ``bytes_per_s`` bytes pass per second, in bursts of
    at most one second's worth (``BURST_S``). ``None``: no limit, :meth:`take` returns at once.

    The bucket starts full. :meth:`take` may take more than the bucket holds (a 64 KiB read at
    8 KiB/s): the bucket goes into debt and the call waits until the debt is paid, so over any
    span of ``t`` seconds at most ``bytes_per_s * (t + BURST_S)`` bytes pass.
    """

    def __init__(
        self,
        bytes_per_s: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"rate limit must be positive bytes per second, not {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self._clock = clock
        self._sleep = sleep
        self._capacity = float(bytes_per_s or 0) * BURST_S
        self._tokens = self._capacity
        self._at = clock()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass, then count them."""
        if self.bytes_per_s is None or n <= 0:
            return
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self.bytes_per_s)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            # the debt is paid by the time the wait ends; the next take counts the refill from
            # ``now``, so a wait that ends early (a stop) leaves the rest of the debt to it
            self._sleep(-self._tokens / self.bytes_per_s)


def from_config(config: Any) -> RateLimit:
    """The rate limit of an :class:`updater.config.UpdaterConfig` (``[bandwidth]
    rate_limit``); no limit when it sets none."""
    return RateLimit(config.rate_limit_bytes_per_s)


def parse_rate(text: object) -> int:
    """Bytes per second from a rate such as ``2MB/s``, ``512KiB/s``, ``1G/s`` or ``65536/s``:
    a size as :func:`image_builder.filesystem.parse_size` reads it (``KB``, ``MB``, ``GB`` are
    decimal, ``KiB``, ``MiB``, ``GiB`` and a bare ``K``, ``M``, ``G`` binary), then ``/s``.

    Raises:
        ValueError: not a rate, or outside ``MIN_RATE`` to ``MAX_RATE``.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a rate like '2MB/s', not {text!r:.40}")
    match = _RATE.fullmatch(text)
    try:
        if match is None:
            raise ValueError("no '/s'")
        rate = parse_size(match[1])
    except ValueError:
        raise ValueError(
            f"{text!r:.40} is not a rate (e.g. '2MB/s', '512KiB/s', '1G/s': KB, MB, GB are "
            "1000-based; KiB, MiB, GiB and K, M, G 1024-based)"
        ) from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{text!r:.40} is {rate} bytes/s: give 8KiB/s to 100GB/s")
    return rate


def rate_text(bytes_per_s: int | None) -> str:
    """``2.0 MB/s (2000000 bytes/s)``; ``unlimited``."""
    if bytes_per_s is None:
        return "unlimited"
    for unit, size in (("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.1f} {unit}/s ({bytes_per_s} bytes/s)"
    return f"{bytes_per_s} bytes/s"


def system_time_zone(environ: dict[str, str] | None = None, localtime: Path = LOCALTIME) -> tzinfo:
    """The device's time zone: ``$TZ`` when it names a zone, else ``/etc/localtime`` (the
    zone file, with its daylight-saving rules), else UTC."""
    name = (os.environ if environ is None else environ).get("TZ", "").removeprefix(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with localtime.open("rb") as handle:
            return ZoneInfo.from_file(handle, key=_zone_name(localtime))
    except (OSError, ValueError):
        return UTC


def _zone_name(localtime: Path) -> str | None:
    target = os.path.realpath(localtime)
    marker = "/zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else None


def time_zone(name: str | None) -> tzinfo:
    """The zone ``name`` (``[updates] time_zone``), or the system's when None.

    Raises:
        ValueError: no such zone.
    """
    if name is None:
        return system_time_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r:.60} (e.g. 'Europe/Berlin', 'UTC')") from None


@dataclass(frozen=True)
class UpdateSchedule:
    """When this device may start an install: its own windows, narrowed by the windows of the
    rollout that assigned the release (both in the device's local time, ``tz``)."""

    windows: tuple[Window, ...]
    tz: tzinfo
    rollout_windows: tuple[Window, ...] = ()

    def narrowed(self, rollout_entries: Sequence[str]) -> UpdateSchedule:
        """This schedule with a rollout's windows (entries as an assignment carries them).

        Raises:
            WindowError: an entry this updater cannot read.
        """
        windows = parse_windows(list(rollout_entries), where="rollout windows")
        return UpdateSchedule(self.windows, self.tz, windows)

    def inside(self, now: datetime) -> bool:
        return inside(self.windows, now, self.tz) and inside(self.rollout_windows, now, self.tz)

    def next_open(self, now: datetime) -> datetime | None:
        """``now`` when inside; the first instant both the device's and the rollout's windows
        hold; None when they never meet (within two weeks)."""
        if not self.rollout_windows:
            return next_open(self.windows, now, self.tz)
        return next_open_all([(self.windows, self.tz), (self.rollout_windows, self.tz)], now)

    def describe(self, now: datetime) -> dict[str, Any]:
        """For ``fleet-updater status``, the daemon's reports and its log: the windows,
        whether ``now`` is inside and, when outside, when the next one opens (ISO 8601 local
        time; None when inside, or when none opens ahead). Nothing in it depends on the
        instant it is asked inside a window, so two readings of an unchanged device agree."""
        opens = self.next_open(now)
        inside = opens == now
        return {
            "windows": [w.text for w in self.windows],
            "rollout_windows": [w.text for w in self.rollout_windows],
            "time_zone": str(self.tz),
            "inside": inside,
            "next_open": None if opens is None or inside else opens.astimezone(self.tz).isoformat(),
        }


def schedule_from_config(config: Any) -> UpdateSchedule:
    """The device's own schedule (``[updates] windows`` and ``time_zone``)."""
    return UpdateSchedule(config.update_windows, time_zone(config.time_zone))


def now_utc(wall_clock: Callable[[], float] = time.time) -> datetime:
    return datetime.fromtimestamp(wall_clock(), UTC)


__all__ = [
    "RateLimit",
    "UpdateSchedule",
    "WindowError",
    "from_config",
    "parse_rate",
    "rate_text",
    "schedule_from_config",
    "system_time_zone",
    "time_zone",
]
