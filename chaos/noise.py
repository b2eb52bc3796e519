"""The series a healthy fleet gives Prometheus, with the ordinary noise of real devices.

:mod:`chaos.false_positives` runs the alert rules over these series to measure how often an
alert fires when nothing is wrong. Each device follows the updater's documented contact rules
(``updater.daemon``, ``updater.client``, docs/updater-config.md): a check-in every
``checkin_interval_s`` with ±10 % jitter, a heartbeat every ``heartbeat_interval_s``, a failed
request ends after the client's timeout and is retried after full-jitter exponential backoff
(:func:`updater.fetch.backoff_delay`). The noise on top of that is ordinary life: a request
lost now and then, a network blip of one to three minutes, a warm afternoon, a short load
spike, logs slowly filling the disk, a clock a few seconds off, a scrape that fails.

The series are sampled once per rule evaluation (30 s, ``evaluation_interval`` of
deploy/monitoring/prometheus/prometheus.yml), at the evaluation instant itself: the freshest
value a scrape could give, which is the largest a last-seen age can be (the pessimistic case).

Every device draws from its own random generator, seeded with the run's seed and its name, so
a run is the same for a seed whatever the window size it is read in. A value of ``None`` in a
window is a missing sample: the series is stale there (a failed scrape), as Prometheus marks it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from updater.fetch import backoff_delay

STEP_S = 30  # the rule evaluation interval, and the spacing of the samples
DAY_S = 86400
MIB = 2**20
GIB = 2**30
SERVER = 'job="fleet-server", instance="fleet-server:8080"'
SCRAPED = 'job="fleet-devices"'
MONITORING_JOBS = ("prometheus", "alertmanager", "loki", "grafana")
FELL_BACK = "boot_check.fell_back"

Sample = float | None
Window = dict[str, list[Sample]]


@dataclass(frozen=True)
class NoiseParameters:
    """What a healthy fleet does, each figure named after what it is.

    The contact figures are the updater's defaults and code (they decide every last-seen age);
    the rest describe ordinary devices and networks and are chosen without looking at the
    alert thresholds (docs/chaos.md, "False positives", says where each comes from).
    """

    # the updater's contact rules (updater/config.py defaults, updater/client.py, daemon.py)
    checkin_interval_s: float = 60.0
    checkin_jitter: float = 0.10  # updater.daemon.JITTER: ±10 % on every check-in interval
    heartbeat_interval_s: float = 60.0
    request_timeout_s: float = 10.0  # ServerClient: min(10, failover_after_s / 3)
    backoff_base_s: float = 1.0  # ServerClient's backoff_s
    max_backoff_s: float = 300.0  # ServerClient's max_backoff_s
    # ordinary network trouble
    lost_request_probability: float = 0.01  # a request that gets no answer (then retried)
    blips_per_device_day: float = 2.0  # the device's link down for a while
    blip_min_s: float = 60.0
    blip_max_s: float = 180.0
    # ordinary scrapes: one in a thousand fails (Prometheus marks the target's series stale)
    server_scrape_failure_probability: float = 0.001
    device_scrape_failure_probability: float = 0.001
    monitoring_scrape_failure_probability: float = 0.001
    scraped_share: float = 0.5  # devices Prometheus also scrapes directly (http_sd)
    # a Raspberry Pi in an enclosure: idle temperature, afternoon warmth, sensor noise, load
    temperature_base_c: tuple[float, float] = (42.0, 58.0)
    temperature_daily_swing_c: float = 5.0  # amplitude of the day's sine
    temperature_noise_c: float = 1.0  # standard deviation of the reading's noise
    temperature_spikes_per_device_day: float = 2.0  # a busy minute or three
    temperature_spike_c: tuple[float, float] = (4.0, 10.0)
    temperature_spike_s: tuple[float, float] = (60.0, 180.0)
    # the data partition: what is free at the start, and logs filling it a little every day
    free_space_start_gib: tuple[float, float] = (2.0, 12.0)
    free_space_daily_use_mib: tuple[float, float] = (5.0, 40.0)  # rotated away each midnight
    free_space_noise_mib: float = 2.0
    # NTP keeps a clock within a few seconds; the device measures it against a Date header,
    # which has one-second resolution
    clock_offset_s: float = 1.5  # standard deviation of a device's offset
    # devices that fell back once, long ago: the stored count is constant (never an increase)
    past_fallback_share: float = 0.05
    committed_share: float = 0.3  # devices whose last update committed (state "committed")

    def __post_init__(self) -> None:
        for name in ("checkin_interval_s", "heartbeat_interval_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, not {getattr(self, name)!r}")
        for name in (
            "lost_request_probability", "server_scrape_failure_probability",
            "device_scrape_failure_probability", "monitoring_scrape_failure_probability",
            "scraped_share", "past_fallback_share", "committed_share", "checkin_jitter",
        ):  # fmt: skip
            value = getattr(self, name)
            if not 0 <= value < 1 or (name == "scraped_share" and value > 1):
                raise ValueError(f"{name} must be a share in [0, 1), not {value!r}")
        if not 0 < self.blip_min_s <= self.blip_max_s:
            raise ValueError("blip_min_s must be above 0 and at most blip_max_s")


def device_name(index: int) -> str:
    """The id of the fleet's ``index``-th device."""
    return f"dev-{index:05d}"


@dataclass
class _Device:
    """One device's state between samples: its contact schedule and its sensors."""

    name: str
    params: NoiseParameters
    rng: random.Random
    scraped: bool
    state: str
    fallbacks: int
    temperature_base_c: float
    temperature_phase: float
    free_start_b: float
    daily_use_b: float
    clock_offset_s: float
    next_checkin_at: float = 0.0
    next_heartbeat_at: float = 0.0
    next_contact_at: float = -math.inf
    failures: int = 0
    unreachable_since: float | None = None
    unreachable_gauge: float = 0.0
    last_seen: float = 0.0
    blip_start: float = 0.0
    blip_end: float = 0.0
    spike_start: float = 0.0
    spike_end: float = 0.0
    spike_c: float = 0.0
    noise_c: float = 0.0
    reported: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, seed: int, index: int, params: NoiseParameters) -> _Device:
        name = device_name(index)
        rng = random.Random(f"{seed}:{name}")  # noqa: S311 (simulation, not secrets)
        device = cls(
            name=name,
            params=params,
            rng=rng,
            scraped=rng.random() < params.scraped_share,
            state="committed" if rng.random() < params.committed_share else "idle",
            fallbacks=rng.randint(1, 2) if rng.random() < params.past_fallback_share else 0,
            temperature_base_c=rng.uniform(*params.temperature_base_c),
            temperature_phase=rng.uniform(-0.05, 0.05),  # sites a little east or west
            free_start_b=rng.uniform(*params.free_space_start_gib) * GIB,
            daily_use_b=rng.uniform(*params.free_space_daily_use_mib) * MIB,
            clock_offset_s=rng.gauss(0.0, params.clock_offset_s),
        )
        # a device that has run for a while: its schedules are anywhere in their period
        device.next_checkin_at = rng.uniform(0, params.checkin_interval_s)
        device.next_heartbeat_at = rng.uniform(0, params.heartbeat_interval_s)
        device.last_seen = device.next_heartbeat_at - params.heartbeat_interval_s
        device.blip_start = device._after(0.0, params.blips_per_device_day)
        device.blip_end = device.blip_start + rng.uniform(params.blip_min_s, params.blip_max_s)
        device._next_spike(0.0)
        device.reported = {
            "temperature": device.temperature(0.0),
            "free": device.free_space(0.0),
            "skew": device.clock_skew(),
        }
        return device

    def _after(self, now: float, per_day: float) -> float:
        """When a Poisson process of ``per_day`` events a day next fires after ``now``."""
        return now + self.rng.expovariate(per_day / DAY_S) if per_day > 0 else math.inf

    def _next_spike(self, now: float) -> None:
        params = self.params
        self.spike_start = self._after(now, params.temperature_spikes_per_device_day)
        self.spike_end = self.spike_start + self.rng.uniform(*params.temperature_spike_s)
        self.spike_c = self.rng.uniform(*params.temperature_spike_c)

    def temperature(self, now: float) -> float:
        """The hottest thermal zone now: base, the day's swing, noise and any load spike."""
        params = self.params
        while now >= self.spike_end:
            self._next_spike(self.spike_end)
        # the noise is correlated from one reading to the next (an AR(1) process)
        self.noise_c = 0.8 * self.noise_c + self.rng.gauss(0.0, params.temperature_noise_c * 0.6)
        day = math.sin(2 * math.pi * (now / DAY_S + self.temperature_phase - 0.375))
        spike = self.spike_c if self.spike_start <= now else 0.0
        return (
            self.temperature_base_c + params.temperature_daily_swing_c * day + self.noise_c + spike
        )

    def free_space(self, now: float) -> float:
        """Free bytes on the data partition: logs grow through the day and rotate at midnight."""
        used = self.daily_use_b * ((now % DAY_S) / DAY_S)
        noise = self.rng.uniform(-1, 1) * self.params.free_space_noise_mib * MIB
        return float(int((self.free_start_b - used + noise) / MIB) * MIB)

    def clock_skew(self) -> float:
        """The skew the device reports: its offset, read against a whole-second Date header."""
        self.clock_offset_s += self.rng.gauss(0.0, 0.05)  # NTP slews it back and forth
        return round(self.clock_offset_s + self.rng.uniform(-1.0, 0.0), 3)

    def _network_down(self, now: float) -> bool:
        while now >= self.blip_end:
            params = self.params
            self.blip_start = self._after(self.blip_end, params.blips_per_device_day)
            self.blip_end = self.blip_start + self.rng.uniform(params.blip_min_s, params.blip_max_s)
        return self.blip_start <= now

    def advance(self, until: float) -> None:
        """Run the daemon's contact loop (``Daemon.run_once``) up to ``until``."""
        params = self.params
        while True:
            due = max(self.next_contact_at, min(self.next_checkin_at, self.next_heartbeat_at))
            if due > until:
                return
            lost = self.rng.random() < params.lost_request_probability
            if lost or self._network_down(due):
                # no answer: the request ends at the client's timeout, then backs off
                now = due + params.request_timeout_s
                self.failures += 1
                if self.unreachable_since is None:
                    self.unreachable_since = now
                self.unreachable_gauge = now - self.unreachable_since
                delay = backoff_delay(
                    self.failures - 1, params.backoff_base_s, params.max_backoff_s, self.rng.random
                )
                self.next_contact_at = now + delay
                continue
            self.last_seen = due
            if due >= self.next_checkin_at:
                jitter = 1 - params.checkin_jitter + 2 * params.checkin_jitter * self.rng.random()
                self.next_checkin_at = due + params.checkin_interval_s * jitter
            if due >= self.next_heartbeat_at:
                self.next_heartbeat_at = due + params.heartbeat_interval_s
                self.reported = {
                    "temperature": self.temperature(due),
                    "free": self.free_space(due),
                    "skew": self.clock_skew(),
                }
            self.failures = 0
            self.unreachable_since = None
            self.unreachable_gauge = 0.0
            self.next_contact_at = -math.inf


class HealthyFleet:
    """The series of ``devices`` healthy devices, read window by window from time 0 on.

    Raises:
        ValueError: no devices, or parameters out of range.
    """

    def __init__(self, devices: int, seed: int, params: NoiseParameters | None = None) -> None:
        if devices < 1:
            raise ValueError(f"a fleet needs at least one device, not {devices}")
        self.params = params or NoiseParameters()
        self.seed = seed
        self._devices = [_Device.create(seed, i, self.params) for i in range(devices)]
        # one generator per target, so a run is the same whatever its windows
        self._scrapes = {
            job: random.Random(f"{seed}:scrapes:{job}")  # noqa: S311 (simulation, not secrets)
            for job in ("fleet-server", *MONITORING_JOBS)
        }
        self._step = 0

    @property
    def devices(self) -> int:
        return len(self._devices)

    def window(self, steps: int) -> Window:
        """The next ``steps`` samples of every series, one per evaluation (``STEP_S`` apart),
        keyed by promtool's series selector."""
        series: Window = {}
        probability = self.params.server_scrape_failure_probability
        failed_server = [self._fails("fleet-server", probability) for _ in range(steps)]
        self._fleet_series(series, failed_server)
        first = self._step
        for device in self._devices:
            self._device_series(series, device, first, steps, failed_server)
        self._step += steps
        return series

    def _fails(self, job: str, probability: float) -> bool:
        return self._scrapes[job].random() < probability

    def _fleet_series(self, series: Window, failed: list[bool]) -> None:
        """The server's fleet-wide series (no rollout runs: a healthy fleet at rest) and the
        monitoring stack's own targets."""
        steps = len(failed)

        def exported(value: float) -> list[Sample]:
            return [None if down else value for down in failed]

        series[f"up{{{SERVER}}}"] = [0.0 if down else 1.0 for down in failed]
        counts: dict[str, int] = {}
        for device in self._devices:
            counts[device.state] = counts.get(device.state, 0) + 1
        for state, count in sorted(counts.items()):
            series[f'fleet_devices{{{SERVER}, state="{state}", version="1.0.0"}}'] = exported(
                float(count)
            )
        series[f"fleet_devices_unhealthy{{{SERVER}}}"] = exported(0.0)
        series[f"fleet_emergency_stop{{{SERVER}}}"] = exported(0.0)
        for job in MONITORING_JOBS:
            series[f'up{{job="{job}", instance="{job}:1"}}'] = [
                0.0 if self._fails(job, self.params.monitoring_scrape_failure_probability) else 1.0
                for _ in range(steps)
            ]

    def _device_series(
        self, series: Window, device: _Device, first: int, steps: int, failed: list[bool]
    ) -> None:
        labels = f'device="{device.name}", hostname="{device.name}"'
        server = f"{SERVER}, {labels}"
        ages: list[Sample] = []
        temperature: list[Sample] = []
        free: list[Sample] = []
        skew: list[Sample] = []
        live_temperature: list[Sample] = []
        live_free: list[Sample] = []
        unreachable: list[Sample] = []
        scrape_failed: list[bool] = []
        for index in range(steps):
            now = float((first + index) * STEP_S)
            device.advance(now)
            if failed[index]:
                ages.append(None)
                temperature.append(None)
                free.append(None)
                skew.append(None)
            else:
                ages.append(round(now - device.last_seen, 3))
                temperature.append(round(device.reported["temperature"], 1))
                free.append(device.reported["free"])
                skew.append(device.reported["skew"])
            if device.scraped:
                down = device.rng.random() < self.params.device_scrape_failure_probability
                scrape_failed.append(down)
                live_temperature.append(None if down else round(device.temperature(now), 1))
                live_free.append(None if down else device.free_space(now))
                unreachable.append(None if down else round(device.unreachable_gauge, 3))

        def exported(value: float) -> list[Sample]:
            return [None if down else value for down in failed]

        series[f"fleet_device_last_seen_age_seconds{{{server}}}"] = ages
        series[f"fleet_device_temperature_celsius{{{server}}}"] = temperature
        series[f"fleet_device_free_space_bytes{{{server}}}"] = free
        series[f"fleet_device_clock_skew_seconds{{{server}}}"] = skew
        info = f'role="camera", compatible="metrica-rpi4", version="1.0.0", state="{device.state}"'
        series[f"fleet_device_info{{{server}, {info}}}"] = exported(1.0)
        series[f'fleet_device_outcome_events_total{{{server}, event="{FELL_BACK}"}}'] = exported(
            float(device.fallbacks)
        )
        if not device.scraped:
            return
        scraped = f'{SCRAPED}, instance="{device.name}:9101", {labels}'

        def constant(value: float) -> list[Sample]:
            return [None if down else value for down in scrape_failed]

        series[f"fleet_updater_temperature_celsius{{{scraped}}}"] = live_temperature
        series[f'fleet_updater_free_space_bytes{{{scraped}, path="/data"}}'] = live_free
        series[f"fleet_updater_server_unreachable_seconds{{{scraped}}}"] = unreachable
        series[f"fleet_updater_crash_loop_restarts{{{scraped}}}"] = constant(0.0)
        series[f"fleet_updater_config_drift{{{scraped}}}"] = constant(0.0)
        series[f"fleet_updater_config_problems{{{scraped}}}"] = constant(0.0)
        series[f'fleet_updater_update_state{{{scraped}, state="{device.state}"}}'] = constant(1.0)
        series[f'fleet_updater_update_state{{{scraped}, state="suspended"}}'] = constant(0.0)


def windows(fleet: HealthyFleet, total_steps: int, size: int) -> Iterator[Window]:
    """``total_steps`` samples of ``fleet`` in windows of at most ``size`` steps."""
    done = 0
    while done < total_steps:
        steps = min(size, total_steps - done)
        yield fleet.window(steps)
        done += steps
