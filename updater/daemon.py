"""The updater daemon (``fleet-updater daemon``): the device's side of the release server.

One loop, one thread. Each :meth:`Daemon.run_once` does what is due, in this order, and returns
how long to sleep before something is due again:

==============  ==========================================================================
duty            what it does
==============  ==========================================================================
enroll          once, unless ``<data_dir>/identity/enrolled.json`` names this device id
events          send what waits in the outbox, oldest first, 100 a request, until it is empty
check-in        every ``checkin_interval_s`` (±10 % jitter), or the shorter interval the server
                asks for while a rollout is active: a verified answer → act on it; during an
                install the check-ins go on, and an answer that no longer assigns the release
                abandons the install (an emergency stop reaches a download in progress)
heartbeat       every ``heartbeat_interval_s``: slots, boot state, health, sensors, clock skew
==============  ==========================================================================

An install starts only inside the device's maintenance windows (``[updates] windows``),
narrowed by the windows of the rollout that assigned the release (the assignment's
``windows``), in the device's local time (:mod:`updater.bandwidth`). Outside them the daemon
waits: it logs ``daemon.waiting_for_window`` (with when the next window opens) once per wait,
heartbeats at once with ``updater_state`` ``waiting_window``, and starts at its first check-in
after a window opens (check-ins are jittered, so a fleet does not start at the same second).
An install that started inside a window finishes. Only installs wait: a rollback to the
intact other slot (no download) and a recovery from safe mode do not.

When the server does not answer, the step stops and the daemon waits
:meth:`ServerClient.retry_delay_s` (failover to the next URL within ``failover_after_s``, then
exponential backoff with full jitter), then resumes where it stopped. Through any outage the
device keeps running what it runs: nothing changes without a verified answer.

Acting on an answer is a table (:mod:`updater.decision`): the situation picks one action.
What the daemon keeps on the data partition: the outbox of events for the server
(:mod:`updater.outbox`), the history of assigned releases (:mod:`updater.history`) and the
device identity (:mod:`updater.identity`). Its heartbeat is :mod:`updater.heartbeat`; systemd
hears from it through :mod:`updater.systemd`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from bootloader_hooks.base import ROOT_SLOTS, other_slot
from fleet_core.errors import FleetError
from fleet_core.windows import WindowError
from image_builder.errors import ImageIntegrityError
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.bandwidth import UpdateSchedule, now_utc, schedule_from_config
from updater.client import (
    Assignment,
    CheckinResult,
    DeviceDecommissionedError,
    NotEnrolledError,
    ServerClient,
    ServerError,
    ServerRejectedError,
    ServerUnavailableError,
    events_that_fit,
)
from updater.config_guard import ConfigGuard, Drift, Repair
from updater.decision import Decision, decide
from updater.device import free_space_mb, read_temperature_c, run_reboot, uptime_s
from updater.errors import (
    DaemonError,
    DownloadError,
    InstallAbandonedError,
    LockedError,
    PreconditionError,
    StateError,
)
from updater.heartbeat import NEWER_FIELDS, heartbeat_document, protocol_hostname
from updater.history import ReleaseHistoryStore, ReleaseRecord
from updater.identity import (
    enrollment_token,
    forget_enrollment,
    load_enrollment,
    load_or_create_identity,
    save_enrollment,
)
from updater.install import InstallResult
from updater.log import EventSink
from updater.outbox import OUTBOX_NAME, Outbox, OutboxLog
from updater.recovery import Recovery
from updater.runtime import Runtime
from updater.state import DeviceState, update_lock
from updater.systemd import SystemdNotifier

JITTER = 0.1
MIN_SLEEP_S = 0.1  # between steps, whatever the schedule says: never a busy loop
MIN_CHECKIN_S = 5.0  # the shortest check-in interval a server may ask for
MAX_BATCHES_PER_STEP = 10
INSTALL_RETRY_MAX_S = 3600.0
DECOMMISSIONED_RETRY_S = 900.0  # how often a decommissioned device asks whether it is back
WATCHDOG_GRACE_S = 120.0
WAITING_STATE = "waiting_window"  # the heartbeat's updater_state while outside the windows


# --- the daemon -----------------------------------------------------------------------------


class Daemon:
    """See the module docstring. ``clock`` is monotonic; ``sleep`` waits between steps
    (default: until :meth:`stop`); ``rng`` gives the jitter."""

    def __init__(
        self,
        runtime: Runtime,
        client: ServerClient,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        rng: Callable[[], float] = random.random,
        *,
        notifier: SystemdNotifier | None = None,
        outbox: Outbox | None = None,
        wall_clock: Callable[[], float] = time.time,
        hostname: str | None = None,
        schedule: UpdateSchedule | None = None,
    ) -> None:
        data_dir = runtime.config.data_dir
        self.outbox = outbox or Outbox(data_dir / OUTBOX_NAME, wall_clock=wall_clock)
        # One outbox, the daemon's: a log already teed into another (a runtime made for a
        # command) is re-teed, so numbering and limits are this outbox's.
        inner = runtime.log.inner if isinstance(runtime.log, OutboxLog) else runtime.log
        runtime = dataclasses.replace(runtime, log=OutboxLog(inner, self.outbox))
        self.runtime = runtime
        self.log: EventSink = runtime.log
        self.client = client
        if client.log is None:
            client.log = self.log
        self.history = ReleaseHistoryStore(data_dir)
        self.notifier = notifier or SystemdNotifier(None)
        self._clock = clock
        self._stop = threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._stop.wait
        self._rng = rng
        self._wall_clock = wall_clock
        self._hostname = protocol_hostname(hostname or socket.gethostname())
        self._enrolled = False
        self._next_contact_at = -math.inf
        self._next_checkin_at = -math.inf
        self._next_heartbeat_at = -math.inf
        self._unreachable_since: float | None = None
        self._decommissioned_since: float | None = None
        self._install_retry_at: dict[str, float] = {}
        self._reported: set[tuple[str, str]] = set()
        # heartbeat fields the server refused (one from before them): left out until a restart
        self._older_server = False
        self._duty_errors: dict[str, str] = {}
        # config drift (updater.config_guard): the guard, and whether the drift going on now
        # was logged (once until the file holds what runs again)
        self._config_guard = ConfigGuard(clock)
        self._drifting = False
        self.last_error: str | None = None  # of the last step, None if it went through
        self.last_checkin: CheckinResult | None = None
        # when installs may start ([updates] windows, time_zone); what the device waits for
        self.schedule = schedule or schedule_from_config(runtime.config)
        self.waiting: dict[str, Any] | None = None
        config = runtime.config
        self.checkin_interval_s = config.checkin_interval_s
        self.heartbeat_interval_s = config.heartbeat_interval_s
        with contextlib.suppress(OSError):
            self.outbox.counts()  # a damaged outbox is found (and set aside) now, and reported
        if self.outbox.problem:
            self.log.event("outbox.damaged", level="warning", detail=self.outbox.problem)

    # --- the loop ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return after the current step."""
        self._stop.set()

    def run_forever(self) -> None:
        """Count this start for the crash-loop guard, tell systemd we are ready, then run
        steps until :meth:`stop`, feeding the watchdog after each."""
        try:
            self.runtime.record_start()
        except (FleetError, OSError, ValueError) as err:
            self.log.event("daemon.start_not_counted", level="warning", error=str(err))
        self.log.event(
            "daemon.started", device_id=self.client.device_id, urls=list(self.client.urls)
        )
        self.notifier.ready(self.status_line())
        while not self._stop.is_set():
            delay = self.run_once()
            self.notifier.watchdog(self.status_line())
            if self._stop.is_set():
                break
            interval = self.notifier.watchdog_interval_s
            self._sleep(max(MIN_SLEEP_S, min(delay, interval) if interval else delay))
        self.notifier.stopping()
        self.log.event("daemon.stopped")

    def run_once(self) -> float:
        """Do what is due (see the module docstring); return the seconds until the next
        thing is due. Never raises for a server, network or device problem: it is logged
        (once until it changes), kept in :attr:`last_error`, and tried again later."""
        now = self._clock()
        if now >= self._next_contact_at:
            self._step(now)
        due = max(self._next_contact_at, min(self._next_checkin_at, self._next_heartbeat_at))
        return max(0.0, due - self._clock())

    def _step(self, now: float) -> None:
        self.last_error = None
        self._keep_config()
        duties: list[tuple[str, Callable[[], None]]] = [
            ("enroll", self._ensure_enrolled),
            ("queued events", self._send_events),
        ]
        if now >= self._next_checkin_at:
            duties.append(("checkin", self._checkin))
        if now >= self._next_heartbeat_at:
            duties.append(("heartbeat", self._heartbeat))
        duties.append(("events", self._send_events))
        for name, duty in duties:
            try:
                duty()
            except ServerUnavailableError as err:
                if name == "queued events":
                    # an events endpoint that fails must not keep the device from checking in:
                    # following the server matters more than reporting to it
                    continue
                self._server_unreachable(err)
                return
            except NotEnrolledError as err:
                self._not_enrolled(err)
                return
            except DeviceDecommissionedError as err:
                self._decommissioned(err)
                return
            except Exception as err:  # refused (4xx), a device problem, or a bug: log it and
                self._duty_failed(name, err)  # carry on, so the device keeps phoning home
                if name == "enroll":
                    self._next_contact_at = self._clock() + self._jittered(self.checkin_interval_s)
                    return
            else:
                self._duty_errors.pop(name, None)
            if name == "checkin":
                self._next_checkin_at = self._clock() + self._jittered(self.checkin_every_s)
            elif name == "heartbeat":
                self._next_heartbeat_at = self._clock() + self.heartbeat_interval_s
        self._server_answered()
        self._next_contact_at = -math.inf

    def _keep_config(self) -> None:
        """Config drift: tell once when the configuration file stops holding what runs, and
        write the running configuration back once the repair time has passed
        (:mod:`updater.config_guard`). Never stops the step: a device keeps phoning home."""
        try:
            verdict = self._config_guard.check(self.runtime.loaded)
        except Exception as err:  # the repair could not be written: tried again next step
            self._duty_failed("config repair", err)
            return
        self._duty_errors.pop("config repair", None)
        if isinstance(verdict, Drift) and not self._drifting:
            self._drifting = True
            limits = self.runtime.config.limits
            self.log.event(
                "config.drift", level="warning", path=self.runtime.loaded.path,
                problem=verdict.problem, repair_in_s=limits.config_repair_after_s or None,
            )  # fmt: skip
        elif verdict is None:
            self._drifting = False
        elif isinstance(verdict, Repair):
            self._drifting = False
            self.runtime = dataclasses.replace(
                self.runtime, loaded=verdict.loaded, config_sha256=None
            )
            self.log.event(
                "config.repaired", level="warning", path=str(verdict.path),
                problem=verdict.problem,
                replaced=str(verdict.replaced) if verdict.replaced else None,
            )  # fmt: skip

    def _duty_failed(self, duty: str, err: Exception) -> None:
        message = f"{type(err).__name__}: {err}" if not isinstance(err, FleetError) else str(err)
        self.last_error = f"{duty}: {message}"
        if self._duty_errors.get(duty) != message:
            self._duty_errors[duty] = message
            self.log.event("daemon.step_failed", level="error", duty=duty, error=message)

    @property
    def checkin_every_s(self) -> float:
        """Seconds between check-ins now: the configured interval, or the shorter one the
        server's last answer asked for while a rollout is active (never below
        ``MIN_CHECKIN_S``: a server cannot make a fleet hammer it)."""
        answer = self.client.last_answer
        asked = answer.checkin_interval_s if answer is not None else None
        if asked is None:
            return self.checkin_interval_s
        return min(self.checkin_interval_s, max(MIN_CHECKIN_S, float(asked)))

    def _jittered(self, interval: float) -> float:
        return interval * (1 - JITTER + 2 * JITTER * self._rng())

    def status_line(self) -> str:
        """One line for ``systemctl status``: server, assignment, events waiting."""
        try:
            waiting: int | str = self.outbox.counts()[0]
        except OSError:
            waiting = "?"
        server = (
            f"server unreachable since {self._clock() - self._unreachable_since:.0f} s"
            if self._unreachable_since is not None
            else f"server {self.client.active_url}"
        )
        answer = self.client.last_answer
        assigned = answer.assignment.version if answer and answer.assignment else "no assignment"
        if self.waiting is not None:
            opens = self.waiting["next_open"] or "no window ahead"
            assigned += f" (waiting for its window: {opens})"
        return f"{server}; assigned: {assigned}; {waiting} event(s) queued"

    # --- duties --------------------------------------------------------------------------

    def _ensure_enrolled(self) -> None:
        if self._enrolled:
            return
        data_dir = self.runtime.config.data_dir
        device_id = self.client.device_id
        if load_enrollment(data_dir, device_id) is None:
            result = self.client.enroll(
                compatible=self.runtime.config.compatible or "unknown",
                hostname=self._hostname,
                token=enrollment_token(data_dir, self.runtime.config.enrollment_token),
            )
            save_enrollment(data_dir, device_id, result.server_url, result.server_keys)
            self.log.event("daemon.enrolled", device_id=device_id, server=result.server_url)
        self._enrolled = True

    def _send_events(self) -> None:
        for _ in range(MAX_BATCHES_PER_STEP):
            pending = self.outbox.pending(100)
            if not pending:
                return
            wire = [e.to_wire() for e in pending]
            fit = max(1, events_that_fit(wire))
            batch = pending[:fit]
            try:
                self.client.send_events([e.to_wire() for e in batch])
            except ServerRejectedError as err:
                if err.status not in (413, 422):
                    raise
                # a batch the server will never take must not block the ones behind it
                self.log.event(
                    "daemon.events_rejected", level="error", error=str(err),
                    first_seq=batch[0].seq, last_seq=batch[-1].seq,
                )  # fmt: skip
            except ValueError as err:  # one event too large to send: drop it
                self.log.event("daemon.events_rejected", level="error", error=str(err))
            self.outbox.ack(batch[-1].seq)

    def _checkin(self) -> None:
        result = self.client.checkin()
        self.last_checkin = result
        self._act_on(result)

    def _heartbeat(self) -> None:
        runtime = self.runtime
        with self.notifier.keep_alive(runtime.config.health.deadline_s + WATCHDOG_GRACE_S):
            try:
                report = runtime.run_health_checks()
                health = [(r.name, r.ok) for r in report.results]
            except Exception as err:  # a broken check must not stop the heartbeat
                self._report_once("health", str(err), event="daemon.health_failed")
                health = []
        free: int | None = None
        with contextlib.suppress(OSError):
            free = free_space_mb(runtime.config.data_dir)
        up: float | None = None
        with contextlib.suppress(OSError, ValueError):
            up = uptime_s(runtime.proc)
        snapshot = runtime.snapshot()
        document = heartbeat_document(
            snapshot,
            health=health,
            temperature_c=read_temperature_c(runtime.config.thermal_dir),
            free_space_mb=free,
            uptime_s=up,
            clock=self._wall_clock(),
            clock_skew_s=self.client.clock_skew_s,
            role=runtime.config.role,
            tags=runtime.config.tags,
            metrics_address=runtime.scrape_address(self._hostname),
            throttled=runtime.throttled(),
        )
        if self.waiting is not None and document["updater_state"] == "idle":
            document["updater_state"] = WAITING_STATE
        # the metrics follow the heartbeat: a textfile or a scrape is never older than one
        runtime.publish_metrics(document=snapshot, server_unreachable_s=0.0)
        newer = [name for name in NEWER_FIELDS if name in document]
        if self._older_server:
            for name in newer:
                del document[name]
        try:
            self.client.heartbeat(document)
        except ServerRejectedError as err:
            # a server from before these fields names one in its refusal ("body.throttled:
            # Extra inputs are not permitted"); a refusal for any other reason is no such news
            refused = [name for name in newer if f"body.{name}" in str(err)]
            if err.status != 422 or self._older_server or not refused:
                raise
            for name in newer:
                del document[name]
            self.client.heartbeat(document)  # the server still learns everything else
            self._older_server = True  # only once a heartbeat without them went through
            self._report_once("heartbeat", f"the server refuses {', '.join(refused)}: left out",
                              event="daemon.heartbeat_reduced")  # fmt: skip

    # --- acting on an answer -------------------------------------------------------------

    def _situation(self) -> tuple[DeviceState, str | None, bool]:
        loaded = self.runtime.store.load()
        try:
            backend = self.runtime.backend
            booted = backend.booted()
            undecided = booted in ROOT_SLOTS and (backend.is_trial() or backend.primary() != booted)
        except FleetError as err:
            self._report_once("bootloader", f"cannot read the boot state: {err}")
            return loaded.state, None, True
        return loaded.state, booted, undecided

    def _act_on(self, result: CheckinResult) -> None:
        assignment = result.answer.assignment
        state, booted, undecided = self._situation()
        decision = decide(assignment, state, booted, undecided, self.history.load())
        if assignment is None or decision.action in ("none", "skip"):
            self._stop_waiting()
        if assignment is None or decision.action == "none":
            return
        sha = assignment.manifest_sha256
        if decision.action == "skip":
            self._skip(assignment, decision)
            return
        if self._clock() < self._install_retry_at.get(sha, -math.inf):
            return
        if decision.action == "install" and not self._window_open(assignment):
            return
        try:
            with update_lock(self.runtime.config.data_dir):
                self._act_locked(assignment, result.server_url)
        except LockedError as err:
            self._report_once(sha, f"not now: {err}")

    def _window_open(self, assignment: Assignment) -> bool:
        """Whether an install of ``assignment`` may start now: inside the device's windows
        and the assigning rollout's. When not, wait (see the module docstring): say so once
        per wait and heartbeat at once. A rollout window this updater cannot read (a newer
        server's syntax) is waited on, never ignored."""
        now = now_utc(self._wall_clock)
        problem: str | None = None
        try:
            schedule = self.schedule.narrowed(assignment.windows)
        except WindowError as err:
            schedule, problem = self.schedule, f"cannot read the rollout's windows: {err}"
        if problem is None and schedule.inside(now):
            if self.waiting is not None:
                self._stop_waiting()
                # the server still sees "waiting_window" until the next heartbeat, and none
                # is sent while the install runs: send one now
                with contextlib.suppress(Exception):
                    self._heartbeat()
                    self._next_heartbeat_at = self._clock() + self.heartbeat_interval_s
            return True
        described = schedule.describe(now)
        waiting = {
            "release": assignment.release_id, "version": assignment.version,
            "next_open": None if problem else described["next_open"],
            "windows": described["windows"], "rollout_windows": described["rollout_windows"],
            "time_zone": described["time_zone"], **({"problem": problem} if problem else {}),
        }  # fmt: skip
        if waiting != self.waiting:
            if self.waiting is None:
                self._next_heartbeat_at = -math.inf  # tell the server now, not in a minute
            self.waiting = waiting
            level = "warning" if problem or waiting["next_open"] is None else "info"
            self.log.event("daemon.waiting_for_window", level=level, **waiting)
        return False

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.waiting = None
            self._next_heartbeat_at = -math.inf

    def _act_locked(self, assignment: Assignment, server_url: str) -> None:
        """Decide again under the update lock (the state may have changed), then act."""
        sha = assignment.manifest_sha256
        history = self.history.load()
        record = history.get(sha)
        if record is not None and record.outcome == "installing":
            # we hold the lock, so no install of it is running: the last one was cut short
            record = dataclasses.replace(
                record, outcome="interrupted", interrupted=record.interrupted + 1
            )
            history = history.with_record(sha, record)
            self.history.save(history)
            self.log.event(
                "daemon.install_interrupted", level="warning", release=assignment.release_id,
                version=assignment.version, times=record.interrupted,
            )  # fmt: skip
        state, booted, undecided = self._situation()
        decision = decide(assignment, state, booted, undecided, history)
        if decision.action == "skip":
            self._skip(assignment, decision)
        elif decision.action == "flip" and booted is not None:
            self._flip(assignment, state, other_slot(booted))
        elif decision.action == "install":
            self._install(assignment, server_url, record)
        elif decision.action == "recover":
            self._install(assignment, server_url, record, recover=True)

    def _skip(self, assignment: Assignment, decision: Decision) -> None:
        sha = assignment.manifest_sha256
        if decision.fail:
            self._record(sha, assignment, "failed", detail=decision.reason)
            self.log.event(
                "daemon.release_failed", level="error", release=assignment.release_id,
                version=assignment.version, reason=decision.reason,
            )  # fmt: skip
            self._reported.add((sha, f"failed on this device before: {decision.reason}"))
            return
        self._report_once(sha, decision.reason, assignment)

    def _report_once(
        self,
        key: str,
        reason: str,
        assignment: Assignment | None = None,
        event: str = "daemon.install_skipped",
    ) -> None:
        """Log ``event`` once per (``key``, ``reason``) in this process: a check-in every
        minute must not repeat the same news every minute."""
        if (key, reason) in self._reported:
            return
        self._reported.add((key, reason))
        fields: dict[str, Any] = {"reason": reason}
        if assignment is not None:
            fields.update(release=assignment.release_id, version=assignment.version)
        self.log.event(event, level="warning", **fields)

    def _record(
        self, sha: str, assignment: Assignment, outcome: str, **changes: Any
    ) -> ReleaseRecord:
        history = self.history.load()
        previous = history.get(sha) or ReleaseRecord(outcome, assignment.version)
        record = dataclasses.replace(previous, outcome=outcome, **changes)
        self.history.save(history.with_record(sha, record))
        return record

    def _restore(self, sha: str, previous: ReleaseRecord | None) -> None:
        history = self.history.load()
        self.history.save(history.with_record(sha, previous) if previous else history.without(sha))

    def _install(
        self,
        assignment: Assignment,
        server_url: str,
        previous: ReleaseRecord | None,
        *,
        recover: bool = False,
    ) -> None:
        """Install the assigned release into the other root slot and reboot into its trial;
        with ``recover`` (safe mode), into the root slot the firmware no longer boots, through
        :class:`updater.recovery.Recovery`. The outcomes are recorded the same way."""
        runtime = self.runtime
        sha = assignment.manifest_sha256
        urls = self.client.blob_urls(assignment, server_url)
        name = f"release {assignment.release_id} ({assignment.version})"
        self.log.event(
            "daemon.install", release=assignment.release_id, version=assignment.version,
            manifest_sha256=sha,
        )  # fmt: skip
        self._record(sha, assignment, "installing")  # persist before acting
        installer = runtime.installer(http_options={"sleep": self._sleep, "rng": self._rng})
        limit = runtime.config.limits.update_deadline_s + WATCHDOG_GRACE_S
        result: InstallResult | None = None
        try:
            with self.notifier.keep_alive(limit):
                if recover:
                    Recovery(installer).recover_parts(
                        assignment.manifest, assignment.manifest_sig, urls, name=name,
                        abandon=self._withdrawn_check(sha),
                    )  # fmt: skip
                else:
                    result = installer.install_parts(
                        assignment.manifest, assignment.manifest_sig, urls, name=name,
                        reboot=True, abandon=self._withdrawn_check(sha),
                    )  # fmt: skip
        except InstallAbandonedError as err:
            # the server no longer wants this release here (an emergency stop, a rollback):
            # not the release's fault, nothing is counted against it: installed afresh when
            # it is assigned again
            self._record(sha, assignment, "abandoned", detail=str(err))
            self._install_retry_at.pop(sha, None)
            self.log.event(
                "daemon.install_abandoned", level="warning", release=assignment.release_id,
                version=assignment.version, reason=str(err),
            )  # fmt: skip
            return
        except (PreconditionError, StateError) as err:
            # refused before the release was looked at (too hot, too little space, a trial
            # undecided) or the data partition failed us: not the release's fault; nothing
            # is counted, the next check-in tries again
            self._restore(sha, previous)
            self._report_once(sha, f"deferred: {err}", assignment)
            return
        except FleetError as err:
            runtime.publish_metrics(event="failed")
            if _is_download_problem(err):
                failures = (previous.download_failures if previous else 0) + 1
                self._record(
                    sha, assignment, "download_failed", download_failures=failures, detail=str(err)
                )
                delay = min(INSTALL_RETRY_MAX_S, self.checkin_interval_s * 2 ** min(failures, 10))
                self._install_retry_at[sha] = self._clock() + delay
                self.log.event(
                    "daemon.install_retry", level="warning", version=assignment.version,
                    error=str(err), retry_in_s=round(delay),
                )  # fmt: skip
                return
            self._skip(assignment, Decision("skip", str(err), fail=True))
            return
        except (subprocess.CalledProcessError, OSError) as err:
            if not self._armed(sha):
                raise  # not the reboot: left "installing", counted as interrupted next time
            # the install armed the trial, then the reboot command failed: the trial stays
            # armed for whenever the device reboots
            self._record(sha, assignment, "armed")
            self.log.event("daemon.reboot_failed", level="error", error=str(err))
            return
        self._record(sha, assignment, "armed", detail=None)
        runtime.publish_metrics(install=result)  # None after a recovery: the state only

    def _withdrawn_check(self, sha: str) -> Callable[[], str | None]:
        """For a running install of release ``sha``: check in whenever a check-in is due and
        say why to stop when the answer no longer assigns ``sha``. A server that cannot be
        reached does not stop the install (its deadline bounds it)."""

        def withdrawn() -> str | None:
            if self._clock() < self._next_checkin_at:
                return None
            self._next_checkin_at = self._clock() + self._jittered(self.checkin_every_s)
            try:
                result = self.client.checkin()
            except ServerError as err:
                self.log.event("daemon.checkin_during_install_failed", level="debug",
                               error=str(err))  # fmt: skip
                return None
            self.last_checkin = result
            assigned = result.answer.assignment
            if assigned is None:
                return "the server withdrew the release (no assignment now)"
            if assigned.manifest_sha256 != sha:
                return f"the server now assigns {assigned.version} instead"
            return None

        return withdrawn

    def _armed(self, sha: str) -> bool:
        """Whether the other slot holds release ``sha``, armed for its trial boot."""
        state, booted, _ = self._situation()
        if booted not in ROOT_SLOTS:
            return False
        other = state.slot(other_slot(booted))
        return other.bundle_sha256 == sha and other.status == "trial"

    def _flip(self, assignment: Assignment, state: DeviceState, slot: str) -> None:
        """Roll back to the release intact in ``slot``: a trial boot of it, no download."""
        runtime = self.runtime
        backend = runtime.backend
        runtime.lifecycle.arm_trial(state, slot, purpose="rollback")
        self._record(assignment.manifest_sha256, assignment, "armed")
        runtime.log.event(
            "rollback.armed", slot=slot, version=assignment.version, reason="assignment"
        )
        command = list(runtime.config.reboot_command or backend.reboot_command())
        try:
            (runtime.reboot or run_reboot)(command)
        except (subprocess.CalledProcessError, OSError) as err:
            self.log.event("daemon.reboot_failed", level="error", error=str(err))

    # --- server reachability -------------------------------------------------------------

    def _server_unreachable(self, err: ServerError) -> None:
        now = self._clock()
        delay = self.client.retry_delay_s()
        self._next_contact_at = now + delay
        self.last_error = str(err)
        if self._unreachable_since is None:
            self._unreachable_since = now
            self.log.event("daemon.server_unreachable", level="warning", error=str(err))
        # the metrics go on without the server: a local Prometheus still sees this device
        self.runtime.publish_metrics(server_unreachable_s=now - self._unreachable_since)
        self.log.event("daemon.retry", level="debug", error=str(err), retry_in_s=round(delay, 3))

    def _server_answered(self) -> None:
        if self._decommissioned_since is not None:
            self._decommissioned_since = None
            self.log.event("daemon.reinstated")
        if self._unreachable_since is not None:
            # the gauge goes back to 0 now, not at the next heartbeat (which may be minutes off)
            with contextlib.suppress(FleetError, OSError):
                self.runtime.publish_metrics(server_unreachable_s=0.0)
            outage = self._clock() - self._unreachable_since
            self.log.event(
                "daemon.server_back", url=self.client.active_url, outage_s=round(outage, 3)
            )
            self._unreachable_since = None

    def _not_enrolled(self, err: NotEnrolledError) -> None:
        self.last_error = str(err)
        if self._enrolled:  # the server forgot us: enroll again, now
            self._enrolled = False
            forget_enrollment(self.runtime.config.data_dir)
            self.log.event("daemon.enrollment_lost", level="warning", error=str(err))
            self._next_contact_at = self._clock() + self.client.retry_delay_s()
            return
        self._report_once("enroll", str(err), event="daemon.enroll_refused")
        self._next_contact_at = self._clock() + self._jittered(self.checkin_interval_s)

    def _decommissioned(self, err: DeviceDecommissionedError) -> None:
        """The server refuses this device's key. It keeps its identity and enrollment (only an
        operator's reinstatement lets it in again, with the same key), says so once, and asks
        again every ``DECOMMISSIONED_RETRY_S`` (or its check-in interval, if longer)."""
        self.last_error = str(err)
        if self._decommissioned_since is None:
            self._decommissioned_since = self._clock()
            self.log.event("daemon.decommissioned", level="error", error=str(err))
        retry = max(self.checkin_interval_s, DECOMMISSIONED_RETRY_S)
        self._next_contact_at = self._clock() + self._jittered(retry)

    def _problem(self, event: str, err: Exception) -> None:
        self.last_error = str(err)
        self.log.event(event, level="error", error=str(err))


def _is_download_problem(err: BaseException) -> bool:
    """Whether an install failed for want of the right bytes (network, host), not because of
    the release. Blob bytes that differ from the signed manifest count as a transport fault:
    the manifest is authentic, so the release is fine and a bad mirror, a proxy or a flipped
    bit is to blame; the release is fetched again later rather than given up."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DownloadError | ImageIntegrityError):
            return True
        seen = seen.__cause__
    return False


def build_daemon(
    runtime: Runtime, *, notifier: SystemdNotifier | None = None, **client_options: Any
) -> Daemon:
    """A daemon wired from the runtime's configuration: identity (made on first start),
    server keyring, client with failover over ``[server] urls`` and the mirrors.

    Raises:
        DaemonError: no server URL configured.
        IdentityError: the device key cannot be read or made.
    """
    config = runtime.config
    if not config.server_urls:
        raise DaemonError("no release server configured ([server] urls)")
    identity, problem = load_or_create_identity(config.data_dir)
    outbox = Outbox(config.data_dir / OUTBOX_NAME)
    log = OutboxLog(runtime.log, outbox)
    runtime = dataclasses.replace(runtime, log=log)
    if problem:
        log.event("identity.regenerated", level="error", detail=problem)
    keyring: Keyring | None = None
    if config.server_keyring is None:
        log.event("daemon.no_server_keyring", level="error", detail="[server] keyring not set")
    else:
        try:
            keyring = Keyring.load(config.server_keyring)
        except KeyringError as err:
            log.event("daemon.no_server_keyring", level="error", detail=str(err))
    client = ServerClient(
        config.server_urls, identity.key, keyring, mirrors=config.server_mirrors,
        failover_after_s=config.failover_after_s, ca_file=config.server_ca_file, log=log,
        **client_options,
    )  # fmt: skip
    notifier = notifier or SystemdNotifier.from_environment()
    return Daemon(runtime, client, notifier=notifier, outbox=outbox)
