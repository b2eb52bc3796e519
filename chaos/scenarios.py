"""Chaos scenarios: a fault injected into the monitoring lab, how the system must handle it,
the alert that must reach the on-call receiver, and how the fault is taken away.

A scenario is a subclass of :class:`Scenario` registered in :data:`SCENARIOS` (in the order
``fleet chaos run all`` reports them). It names its alert and the devices it needs
(:attr:`Scenario.specs`, members of the lab's fleet that no other scenario touches), and
implements three steps; ``chaos.chaos_run`` does the rest (timing, waiting for the firing and
the resolved notification, the report card):

- :meth:`Scenario.inject` puts the fault in (a process stopped, a sensor reading changed, a
  device cut off, a release rolled out);
- :meth:`Scenario.handled` says what is still missing from the system's own handling of it
  (None once handled), polled until it is handled or time is up;
- :meth:`Scenario.recover` takes the fault away;
- :meth:`Scenario.restored` (optional) says what is not back to normal yet once the alert has
  resolved, polled the same way.

Alerts are told apart by their labels (:meth:`Scenario.matches`): a device's own alert by its
``device`` label, a rollout's by ``rollout``, a server's by ``instance``. A scenario that stops
a process everything shares (Prometheus, a release server) is :attr:`Scenario.exclusive`: it
runs alone, after the others. Scenarios of one :attr:`Scenario.serial` group (those that need
the fleet's only active rollout) run one after another.

Times are scenario seconds (see ``chaos.monitoring_lab``).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from chaos.fleet import Member, MemberSpec
from chaos.monitoring_lab import MonitoringLab, watchdog_repeat_s
from chaos.receiver import DEADMAN
from chaos.virtual_device import FaultProfile, PowerSwitch

HOT_MILLIDEGREES = 85_000  # above the 80 °C of DeviceOverheating and the updater's limit
COOL_MILLIDEGREES = 45_000
# get_throttled: under-voltage now and since boot; since boot only (updater.device.Throttled)
UNDER_VOLTAGE_NOW = 0x10001
UNDER_VOLTAGE_SEEN = 0x10000
SKEW_S = 3 * 365 * 86400.0  # a Pi without a real-time clock that came up three years ahead
LIFETIME_RESENDS = 4  # Prometheus tells Alertmanager an alert lasts 4 resend delays


@dataclass
class Context:
    """What a running scenario works with: the lab, its own fleet members, and notes it keeps
    between its steps."""

    lab: MonitoringLab
    members: list[Member]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def device_ids(self) -> set[str]:
        return {member.device_id for member in self.members}

    def fleet_seconds(self) -> float:
        """The fleet's simulated seconds since it started (what offline windows count)."""
        fleet = self.lab.fleet
        return float(fleet.clock() - fleet.started)


class Scenario:
    """See the module docstring."""

    name: ClassVar[str]
    alert: ClassVar[str]  # the alertname that must reach the receiver
    runbook_alert: ClassVar[str | None] = None  # whose runbook applies, if not ``alert``'s
    summary: ClassVar[str]
    specs: ClassVar[tuple[MemberSpec, ...]] = (MemberSpec(),)
    exclusive: ClassVar[bool] = False
    serial: ClassVar[str | None] = None
    # Scenario seconds the fault must last before the alert's condition can hold at all (a
    # threshold on time out of contact, say): detection is due 3 minutes after that.
    condition_s: ClassVar[float] = 0.0
    # Heartbeats that may pass before the alert's signal reaches Prometheus: a device reports
    # its sensors in its heartbeat (every ``heartbeat_interval_s``; its own metrics are
    # refreshed with it), so the system learns of such a fault up to one heartbeat after it
    # happens; 0 for what the server or Prometheus sees by itself.
    heartbeats: ClassVar[int] = 1

    # Scenario seconds the alert's condition may hold after the recovery by its own rule (a
    # count over a window): added to the time allowed for the resolution.
    clears_after_s: ClassVar[float] = 0.0
    # Restarts a release server, which every device and scenario uses: such a scenario runs
    # after every other.
    restarts_server: ClassVar[bool] = False

    @classmethod
    def specs_for(cls, others: int) -> tuple[MemberSpec, ...]:
        """The devices this scenario needs in a fleet where ``others`` devices are not its."""
        return cls.specs

    def inject(self, ctx: Context) -> None:
        raise NotImplementedError

    def handled(self, ctx: Context) -> str | None:
        raise NotImplementedError

    def recover(self, ctx: Context) -> None:
        raise NotImplementedError

    def restored(self, ctx: Context) -> str | None:
        """What is still not back to normal after the recovery (None once it all is), polled
        once the alert has resolved."""
        return None

    def cleanup(self, ctx: Context) -> None:
        """Undo what :meth:`recover` may not have (it did not run, or failed): called last,
        always, before the lab goes."""

    def matches(self, ctx: Context, labels: Mapping[str, str]) -> bool:
        """Whether an alert with ``labels`` is this scenario's (by default: one of its
        devices')."""
        return labels.get("device") in ctx.device_ids


class ScenarioError(Exception):
    """A scenario cannot inject its fault here (what it needs is missing)."""


def _checkins(ctx: Context, members: list[Member] | None = None) -> list[int]:
    return [id(m.daemon.last_checkin) for m in (members or ctx.lab.fleet.members)]


def _still_checking_in(ctx: Context, members: list[Member] | None = None) -> str | None:
    """None once every member (of ``members``, or the fleet) has checked in since the
    inject (``notes["checkins"]``)."""
    members = members or ctx.lab.fleet.members
    with ctx.lab.pacer.lock:
        now = _checkins(ctx, members)
    stale = [
        m.hostname
        for m, before, after in zip(members, ctx.notes["checkins"], now, strict=True)
        if before == after and ctx.lab.fleet.online(m)
    ]
    return f"no check-in since the fault from {', '.join(stale)}" if stale else None


def _set_temperature(member: Member, millidegrees: int) -> None:
    zone = member.daemon.runtime.config.thermal_dir / "thermal_zone0"
    (zone / "temp").write_text(f"{millidegrees}\n")


def _deferred(member: Member, version: str, why: str = "update deferred") -> bool:
    """Whether the member's updater logged that it put off installing ``version``, saying
    ``why``."""
    return any(
        why in str(event.get("reason", "")) and event.get("version") == version
        for event in member.device.events("daemon.install_skipped")
    )


class MonitoringDown(Scenario):
    name = "monitoring-down"
    alert = DEADMAN
    runbook_alert = "Watchdog"
    summary = (
        "Prometheus stops: Watchdog stops reaching the dead man's switch, which records an "
        "incident; the fleet keeps checking in; Prometheus restarts and Watchdog resumes"
    )
    specs = ()
    exclusive = True
    heartbeats = 0

    @classmethod
    def grace_s(cls) -> float:
        """Silence the dead man's switch tolerates: two Watchdog repeat intervals."""
        from chaos.monitoring_lab import ALERTMANAGER_YML, load_yaml

        return 2 * watchdog_repeat_s(load_yaml(ALERTMANAGER_YML))

    @classmethod
    def condition(cls) -> float:
        from chaos.monitoring_lab import RESEND_DELAY_S

        # Alertmanager keeps a silent Prometheus's alert for 4 resend delays, then the switch
        # waits out its grace
        return LIFETIME_RESENDS * RESEND_DELAY_S + cls.grace_s()

    def inject(self, ctx: Context) -> None:
        with ctx.lab.pacer.lock:
            ctx.notes["checkins"] = _checkins(ctx)
        ctx.lab.monitoring.prometheus.stop()

    def handled(self, ctx: Context) -> str | None:
        return _still_checking_in(ctx)

    def recover(self, ctx: Context) -> None:
        ctx.lab.monitoring.prometheus.start()

    def matches(self, ctx: Context, labels: Mapping[str, str]) -> bool:
        return True


MonitoringDown.condition_s = MonitoringDown.condition()


class ServerUnavailable(Scenario):
    name = "server-unavailable"
    alert = "FleetServerDown"
    summary = (
        "one of the two release servers is killed: FleetServerDown fires for it; every device "
        "checks in through the other; the server restarts"
    )
    specs = ()
    exclusive = True
    heartbeats = 0
    restarts_server = True

    def inject(self, ctx: Context) -> None:
        ctx.notes["instance"] = ctx.lab.servers[0].url.split("://", 1)[1]
        with ctx.lab.pacer.lock:
            ctx.notes["checkins"] = _checkins(ctx)
        ctx.lab.servers[0].stop()

    def handled(self, ctx: Context) -> str | None:
        waiting = _still_checking_in(ctx)
        if waiting:
            return waiting
        other = ctx.lab.servers[1].url
        with ctx.lab.pacer.lock:
            elsewhere = [
                m.hostname for m in ctx.lab.fleet.members if m.daemon.client.active_url != other
            ]
        return f"not using the other server: {', '.join(elsewhere)}" if elsewhere else None

    def recover(self, ctx: Context) -> None:
        ctx.lab.servers[0].start()

    def restored(self, ctx: Context) -> str | None:
        up = ctx.lab.monitoring.query(
            f'up{{job="fleet-server", instance="{ctx.notes["instance"]}"}} == 1'
        )
        return None if up else "Prometheus does not scrape the restarted server"

    def matches(self, ctx: Context, labels: Mapping[str, str]) -> bool:
        return labels.get("instance") == ctx.notes.get("instance")


class BadRelease(Scenario):
    name = "bad-release"
    alert = "CanaryFailed"
    summary = (
        "release 3.0.0 fails its health check on the canary: the rollout halts at the canary "
        "and the canary goes back to 1.0.0; the rollout is aborted"
    )
    serial = "rollout"

    def inject(self, ctx: Context) -> None:
        import json

        (member,) = ctx.members
        answer = json.loads(
            ctx.lab.operator(
                "rollout",
                "start",
                "3.0.0",
                "--canary",
                member.device_id,
                "--device",
                member.device_id,
                "--soak",
                "60s",
                "--json",
            )
        )
        ctx.notes["rollout"] = str(answer["id"])

    def handled(self, ctx: Context) -> str | None:
        import json

        (member,) = ctx.members
        status = json.loads(ctx.lab.operator("rollout", "status", ctx.notes["rollout"], "--json"))
        state = status.get("state")
        with ctx.lab.pacer.lock:
            version = member.version
            reached = any(
                e.get("version") == "3.0.0" for e in member.device.events("install.verified")
            )
        if not reached:
            return "the canary has not installed 3.0.0 yet"
        if state != "halted":
            return f"the rollout is {state}, not halted"
        if version != "1.0.0":
            return f"the canary runs {version}, not 1.0.0 again"
        return None

    def recover(self, ctx: Context) -> None:
        ctx.lab.operator("rollout", "abort", ctx.notes["rollout"])

    def matches(self, ctx: Context, labels: Mapping[str, str]) -> bool:
        return labels.get("rollout") == ctx.notes.get("rollout")


class Overheating(Scenario):
    name = "overheating"
    alert = "DeviceOverheating"
    summary = (
        "a device's CPU reads 85 °C and release 2.0.0 is assigned to it: the install is "
        "deferred; it cools down and the assignment is withdrawn"
    )

    def inject(self, ctx: Context) -> None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            _set_temperature(member, HOT_MILLIDEGREES)
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            deferred = _deferred(member, "2.0.0")
            version = member.version
        if not deferred:
            return "no deferred install of 2.0.0 logged"
        if version != "1.0.0":
            return f"the device installed {version} while hot"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "none")
        with ctx.lab.pacer.lock:
            _set_temperature(member, COOL_MILLIDEGREES)


class UpdateStuck(Scenario):
    name = "update-stuck"
    alert = "UpdateStuck"
    summary = (
        "a rollout assigns 2.0.0 to a device that is too hot to install it: the device defers, "
        "the rollout waits (the device stays pending, not failed) until UpdateStuck fires; it "
        "cools down, installs and commits 2.0.0 and the rollout completes"
    )
    serial = "rollout"
    condition_s = 900.0  # fleet_device_update_pending_seconds > 900

    def inject(self, ctx: Context) -> None:
        import json

        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            _set_temperature(member, HOT_MILLIDEGREES)
        answer = json.loads(
            ctx.lab.operator(
                "rollout",
                "start",
                "2.0.0",
                "--device",
                member.device_id,
                "--stages",
                "100",
                "--soak",
                "30s",
                "--install-deadline",
                "2h",
                "--json",
            )
        )
        ctx.notes["rollout"] = str(answer["id"])

    def handled(self, ctx: Context) -> str | None:
        import json

        (member,) = ctx.members
        status = json.loads(ctx.lab.operator("rollout", "status", ctx.notes["rollout"], "--json"))
        with ctx.lab.pacer.lock:
            deferred = _deferred(member, "2.0.0")
        if not deferred:
            return "no deferred install of 2.0.0 logged"
        if status.get("state") != "running" or status["counts"].get("failed"):
            return f"the rollout is {status.get('state')} with counts {status.get('counts')}"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            _set_temperature(member, COOL_MILLIDEGREES)

    def restored(self, ctx: Context) -> str | None:
        import json

        (member,) = ctx.members
        status = json.loads(ctx.lab.operator("rollout", "status", ctx.notes["rollout"], "--json"))
        with ctx.lab.pacer.lock:
            version = member.version
        if version != "2.0.0":
            return f"the device runs {version}, not 2.0.0"
        if status.get("state") != "completed":
            return f"the rollout is {status.get('state')}, not completed"
        return None


class ClockSkew(Scenario):
    name = "clock-skew"
    alert = "ClockSkew"
    # the device measures its skew from a server's answer (its Date header) and reports it
    # in the heartbeat after that: a heartbeat sent first still carries the old figure
    heartbeats = 2
    summary = (
        "a device's clock jumps three years ahead: it keeps checking in and reporting; its "
        "clock is set right again"
    )

    def _offset(self, ctx: Context, seconds: float) -> None:
        (member,) = ctx.members

        def wall() -> float:
            return time.time() + seconds

        with ctx.lab.pacer.lock:
            member.daemon._wall_clock = wall
            member.daemon.client._wall_clock = wall

    def inject(self, ctx: Context) -> None:
        with ctx.lab.pacer.lock:
            ctx.notes["checkins"] = _checkins(ctx, ctx.members)
        self._offset(ctx, SKEW_S)

    def handled(self, ctx: Context) -> str | None:
        return _still_checking_in(ctx, ctx.members)

    def recover(self, ctx: Context) -> None:
        self._offset(ctx, 0.0)


class _OutOfContact(Scenario):
    """A device loses its network (the fleet's offline window: it runs, but reaches no
    server) until recovery."""

    def inject(self, ctx: Context) -> None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            ctx.notes["version"] = member.version
            ctx.notes["boots"] = len(member.boots)
            member.spec = dataclasses.replace(
                member.spec, offline=((ctx.fleet_seconds(), math.inf),)
            )

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            if member.version != ctx.notes["version"] or len(member.boots) != ctx.notes["boots"]:
                return "the device changed release or rebooted while out of contact"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            (start, _end), *_ = member.spec.offline
            member.spec = dataclasses.replace(member.spec, offline=((start, ctx.fleet_seconds()),))


class DeviceOffline(_OutOfContact):
    name = "device-offline"
    alert = "DeviceOffline"
    summary = (
        "a device loses its network for over 5 minutes: it keeps running its release; the "
        "network comes back and it checks in again"
    )
    condition_s = 300.0  # fleet_device_last_seen_age_seconds > 300


class NetworkPartition(_OutOfContact):
    name = "network-partition"
    alert = "NetworkPartition"
    summary = (
        "a device is cut off for over 15 minutes: it keeps running its release; the partition "
        "heals and it resyncs"
    )
    condition_s = 900.0  # fleet_device_last_seen_age_seconds > 900


class DiskFull(Scenario):
    name = "disk-full"
    alert = "DeviceDiskLow"
    summary = (
        "a device's data partition is replaced by one of 64 MiB (a real, small file system "
        "mounted over it, its files copied in) and release 2.0.0 is assigned: the install is "
        "skipped; the partition is given back and the assignment withdrawn"
    )
    size = "64m"

    def inject(self, ctx: Context) -> None:
        import os

        if os.geteuid() != 0:
            raise ScenarioError("mounting a small data partition needs root")
        (member,) = ctx.members
        data = member.daemon.runtime.config.data_dir
        saved = ctx.lab.workdir / f"{member.hostname}-data"
        with ctx.lab.pacer.lock:
            shutil.copytree(data, saved, symlinks=True)
            _run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "chaos-disk",
                  str(data)])  # fmt: skip
            ctx.notes["mounted"] = data
            shutil.copytree(saved, data, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(saved)
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            skipped = _deferred(member, "2.0.0", "update skipped")
            version = member.version
        if not skipped:
            return "no skipped install of 2.0.0 logged"
        if version != "1.0.0":
            return f"the device installed {version} on a full disk"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "none")
        data = ctx.notes.pop("mounted")
        saved = ctx.lab.workdir / f"{member.hostname}-data"
        with ctx.lab.pacer.lock:
            shutil.copytree(data, saved, symlinks=True)
            _run(["umount", str(data)])
            shutil.rmtree(data)
            shutil.copytree(saved, data, symlinks=True)
            shutil.rmtree(saved)

    def cleanup(self, ctx: Context) -> None:
        mounted = ctx.notes.pop("mounted", None)
        if mounted is not None:
            _run(["umount", "--lazy", str(mounted)])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ScenarioError(f"{' '.join(command)}: {done.stderr.strip()}")


class _ConfigFileChanged(Scenario):
    """The updater's configuration file changes under the running updater: it keeps running
    the configuration it loaded, and once the change has stood for ``[limits]
    config_repair_after_s`` it writes that configuration back, keeping the changed file as
    ``updater.replaced.toml`` (updater.config_guard). Nothing is undone by hand."""

    def change(self, original: bytes) -> bytes:
        raise NotImplementedError

    def _path(self, ctx: Context) -> Path:
        (member,) = ctx.members
        return Path(member.daemon.runtime.loaded.source)

    def inject(self, ctx: Context) -> None:
        path = self._path(ctx)
        with ctx.lab.pacer.lock:
            ctx.notes["original"] = path.read_bytes()
            ctx.notes["checkins"] = _checkins(ctx, ctx.members)
            ctx.notes["config"] = ctx.members[0].daemon.runtime.config
            ctx.notes["changed"] = self.change(ctx.notes["original"])
            path.write_bytes(ctx.notes["changed"])

    def handled(self, ctx: Context) -> str | None:
        waiting = _still_checking_in(ctx, ctx.members)
        if waiting:
            return waiting
        if ctx.members[0].daemon.runtime.config != ctx.notes["config"]:
            return "the updater no longer runs the configuration it loaded"
        return None

    def recover(self, ctx: Context) -> None:
        """Nothing: the updater repairs the file itself."""

    def restored(self, ctx: Context) -> str | None:
        from updater.config_guard import REPLACED_NAME

        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            now = self._path(ctx).read_bytes()
            runtime = member.daemon.runtime
            replaced = runtime.config.data_dir / REPLACED_NAME
            kept = replaced.read_bytes() if replaced.exists() else None
        if now != ctx.notes["original"]:
            return "the configuration file does not hold the running configuration again"
        if kept != ctx.notes["changed"]:
            return f"{REPLACED_NAME} does not keep the file the repair replaced"
        if runtime.loaded.problems:
            return f"the updater still reports problems: {runtime.loaded.problems[0]}"
        return None

    def cleanup(self, ctx: Context) -> None:
        if "original" in ctx.notes:  # a repair that never came
            with ctx.lab.pacer.lock:
                self._path(ctx).write_bytes(ctx.notes["original"])


class ConfigDrift(_ConfigFileChanged):
    name = "config-drift"
    alert = "ConfigDrift"
    summary = (
        "the configuration file is edited on the device (min_free_mb changed) and the updater "
        "is not restarted: it keeps running what it loaded, and 5 minutes on writes it back "
        "over the edit, keeping the edited file"
    )

    def change(self, original: bytes) -> bytes:
        changed = original.replace(b"min_free_mb = 0", b"min_free_mb = 200")
        if changed == original:
            raise ScenarioError("the configuration file has no min_free_mb = 0 to change")
        return changed


class ConfigCorrupted(_ConfigFileChanged):
    name = "config-corrupted"
    alert = "ConfigDrift"
    summary = (
        "the configuration file is cut short with garbage at its end (a bad write, a failing "
        "card): the running updater keeps the configuration it loaded, and 5 minutes on "
        "writes it back over the damaged file, keeping that one"
    )

    def change(self, original: bytes) -> bytes:
        return original[: len(original) // 2] + b"\x00\xff[limits\n"


class CrashLoop(Scenario):
    name = "agent-crash-loop"
    alert = "AgentCrashLoop"
    summary = (
        "the updater starts five times within a minute (each start counted as the daemon's "
        "run_forever counts it) and 2.0.0 is assigned: the crash-loop guard suspends updates "
        "and the install is refused; an operator resumes updates (fleet-updater resume)"
    )

    def inject(self, ctx: Context) -> None:
        from updater.state import CRASH_LOOP_STARTS

        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            for _ in range(CRASH_LOOP_STARTS + 1):
                member.daemon.runtime.record_start()
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            state = member.daemon.runtime.store.load().state
            refused = _deferred(member, "2.0.0", "updates are suspended")
            version = member.version
        if not state.suspended:
            return "updates are not suspended"
        if not refused:
            return "no refused install of 2.0.0 logged"
        if version != "1.0.0":
            return f"the device installed {version} while suspended"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "none")
        with ctx.lab.pacer.lock:
            runtime = member.daemon.runtime
            state = runtime.store.load().state  # what fleet-updater resume does
            runtime.store.save(dataclasses.replace(state, suspended=None, restarts=()))
            runtime.log.event("update.resumed", previously=state.suspended)


class FleetWideFailure(Scenario):
    name = "fleet-wide-failure"
    alert = "EmergencyStopActive"
    summary = (
        "release 3.0.0, whose health check fails, is rolled out at once (no canary, halting "
        "only at 99 % failed) to enough devices to be 30 % of the fleet, and to one more that "
        "is too hot to install, so the rollout never counts 99 % failed: the devices fail and "
        "go back, and the fleet guard turns the emergency stop on by itself (Alertmanager then "
        "holds back FleetWideFailure); the rollout is aborted, the device cooled, the stop cleared"
    )
    specs = ()  # sized to the fleet: specs_for
    exclusive = True  # the emergency stop touches every rollout and assignment
    share = 0.3  # of the fleet failing; the guard's limit is 20 %

    @classmethod
    def specs_for(cls, others: int) -> tuple[MemberSpec, ...]:
        # failing / (others + failing + 1 hot) >= share
        failing = math.ceil(cls.share * (others + 1) / (1 - cls.share))
        return (MemberSpec(role="gateway"), *(MemberSpec(role="sensor") for _ in range(failing)))

    def inject(self, ctx: Context) -> None:
        import json

        hot, *_ = ctx.members
        with ctx.lab.pacer.lock:
            _set_temperature(hot, HOT_MILLIDEGREES)
        devices = [arg for m in ctx.members for arg in ("--device", m.device_id)]
        answer = json.loads(
            ctx.lab.operator(
                "rollout",
                "start",
                "3.0.0",
                *devices,
                "--stages",
                "100",
                "--max-failure",
                "99%",
                "--soak",
                "30m",
                "--json",
            )
        )
        ctx.notes["rollout"] = str(answer["id"])

    def handled(self, ctx: Context) -> str | None:
        import json

        answer = json.loads(ctx.lab.operator("rollout", "status", "--json"))
        stop = answer.get("emergency_stop") or {}
        if not stop.get("active"):
            return "the emergency stop is off"
        if "fleet guard" not in str(stop.get("reason")):
            return f"the emergency stop was not the fleet guard's: {stop.get('reason')}"
        with ctx.lab.pacer.lock:
            versions = {m.hostname: m.version for m in ctx.members[1:]}
        wrong = sorted(host for host, version in versions.items() if version != "1.0.0")
        return f"not back on 1.0.0: {', '.join(wrong)}" if wrong else None

    def recover(self, ctx: Context) -> None:
        ctx.lab.operator("rollout", "abort", ctx.notes["rollout"])
        with ctx.lab.pacer.lock:
            _set_temperature(ctx.members[0], COOL_MILLIDEGREES)
        ctx.lab.operator("emergency-stop", "--clear")

    def restored(self, ctx: Context) -> str | None:
        import json

        answer = json.loads(ctx.lab.operator("rollout", "status", "--json"))
        if (answer.get("emergency_stop") or {}).get("active"):
            return "the emergency stop is still on"
        return None

    def matches(self, ctx: Context, labels: Mapping[str, str]) -> bool:
        return True


class LowVoltage(Scenario):
    name = "low-voltage"
    alert = "DeviceUnderVoltage"
    summary = (
        "a device's firmware flags its supply under-voltage now (get_throttled 0x10001) and "
        "2.0.0 is assigned: the install is deferred; the supply recovers (0x10000: seen since "
        "boot, not now) and the assignment is withdrawn"
    )

    def inject(self, ctx: Context) -> None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            member.device.set_throttled(UNDER_VOLTAGE_NOW)
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            deferred = _deferred(member, "2.0.0", "under-voltage now")
            version = member.version
        if not deferred:
            return "no install of 2.0.0 deferred for the supply"
        if version != "1.0.0":
            return f"the device installed {version} on a failing supply"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "none")
        with ctx.lab.pacer.lock:
            member.device.set_throttled(UNDER_VOLTAGE_SEEN)


class TrialBootLost(Scenario):
    name = "trial-boot-lost"
    alert = "DeviceFellBack"
    summary = (
        "2.0.0 is assigned to a device on which it never completes its trial boot (it hangs; "
        "the watchdog resets the board, as a power cut would end the trial): the firmware "
        "falls back to 1.0.0 and the device reports it; the assignment is withdrawn"
    )
    specs = (MemberSpec(profile=FaultProfile(hang_on=frozenset({"2.0.0"}))),)
    clears_after_s = 900.0  # increase(...[15m]) > 0 holds 15 minutes after the fallback

    def inject(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            fell_back = member.device.events("boot_check.fell_back")
            tried = any(boot.trial and boot.action == "hang" for boot in member.boots)
            version = member.version
        if not tried:
            return "2.0.0 was not booted on trial"
        if not fell_back:
            return "no fallback logged by the boot check"
        if version != "1.0.0":
            return f"the device runs {version}, not 1.0.0"
        return None

    def recover(self, ctx: Context) -> None:
        (member,) = ctx.members
        ctx.lab.operator("device", "assign", member.device_id, "none")


class _DeviceSwitch:
    """The write-boundary hook (``fleet_core.durable``) while a power cut is set up: the
    boundaries of one device's files (those under ``root``) go to its ``switch``, which cuts
    its power at the boundary it was set for; every other device, stepped in the same process,
    writes on as before (``previous``, the hook found installed)."""

    def __init__(self, root: Path, switch: PowerSwitch, previous: Any) -> None:
        self.root = root
        self.switch = switch
        self.previous = previous

    def __call__(self, point: str, path: Path) -> None:
        if path.is_relative_to(self.root):
            self.switch(point, path)
        elif self.previous is not None:
            self.previous(point, path)


class PowerCutMidInstall(Scenario):
    name = "power-cut"
    alert = "DeviceOffline"
    summary = (
        "2.0.0 is assigned and the device's power fails while its updater writes it into the "
        "other slot (what was not flushed is lost), and stays off for 6 minutes: the power "
        "returns, the firmware boots 1.0.0 from the slot it never left, and the updater counts "
        "the install as interrupted, installs 2.0.0 again and commits it"
    )
    condition_s = 300.0  # fleet_device_last_seen_age_seconds > 300, from the cut on

    def inject(self, ctx: Context) -> None:
        from fleet_core import durable

        (member,) = ctx.members
        switch = PowerSwitch(cut_at_first="slot:before-flush")
        with ctx.lab.pacer.lock:
            ctx.notes["switch"] = switch
            ctx.notes["boots"] = len(member.boots)
            hook = _DeviceSwitch(member.device.root.resolve(), switch, None)
            hook.previous = durable.set_boundary_hook(hook)
            ctx.notes["hook"] = hook
        ctx.lab.operator("device", "assign", member.device_id, "2.0.0")

    def handled(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        switch: PowerSwitch = ctx.notes["switch"]
        with ctx.lab.pacer.lock:
            if not switch.off:
                return "the power has not been cut yet (no write of 2.0.0 into a slot)"
            point, _path = switch.points[-1]
            if member.powered:
                return "the device is still powered"
        if not point.startswith("slot:"):
            return f"the power went off at {point}, not while a slot was written"
        return None

    def recover(self, ctx: Context) -> None:
        """The power comes back (and the cut is no longer set up)."""
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            self._unhook(ctx)
            if not member.powered:
                ctx.lab.fleet.power_on(member)

    cleanup = recover  # a run stopped before the recovery leaves no device dark

    def restored(self, ctx: Context) -> str | None:
        (member,) = ctx.members
        with ctx.lab.pacer.lock:
            boots = member.boots[ctx.notes["boots"] :]
            version = member.version
            interrupted = member.device.events("daemon.install_interrupted")
        if not boots:
            return "the device has not booted since the power came back"
        first = boots[0]
        if first.trial or first.image is None or first.image.version != "1.0.0":
            return f"the first boot after the cut was not 1.0.0 from its committed slot: {first}"
        if not interrupted:
            return "the updater did not count the cut install as interrupted"
        if version != "2.0.0":
            return f"the device runs {version}, not 2.0.0 installed again"
        return None

    @staticmethod
    def _unhook(ctx: Context) -> None:
        from fleet_core import durable

        hook = ctx.notes.pop("hook", None)
        if hook is not None:
            durable.set_boundary_hook(hook.previous)


SCENARIOS: dict[str, type[Scenario]] = {
    scenario.name: scenario
    for scenario in (
        MonitoringDown,
        ServerUnavailable,
        BadRelease,
        Overheating,
        UpdateStuck,
        ClockSkew,
        DeviceOffline,
        NetworkPartition,
        DiskFull,
        ConfigDrift,
        ConfigCorrupted,
        CrashLoop,
        FleetWideFailure,
        LowVoltage,
        TrialBootLost,
        PowerCutMidInstall,
    )
}
