"""Request bodies: one pydantic model per body, each its only validating entry.

Every model forbids unknown fields, is strict about types (``1.0`` is not an integer, ``"1"`` is
not a number, ``NaN`` is not a number at all) and bounds every string, number and list, so a
validated body has a known size and meaning. :func:`parse` turns any failure into one
:class:`InvalidRequestError` (422) naming the first offending field.

Free text (what is not an identifier, a label or a number) follows one rule,
:func:`fleet_core.text.check_text`: no control, format, separator, private-use or unassigned
character, so nothing stored can later steer a terminal or reorder what a reader sees.
:data:`Text128` and :data:`ReportedVersion` are one line (no tab, no newline either); the
string values of an event's ``fields`` are log lines and may hold a tab, their keys may not.
A heartbeat's ``metrics_address`` follows ``server/scrape.py``, with the networks of the
server's settings (:class:`Policy`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fleet_core.text import check_text, describe, printable, refused_character
from fleet_core.windows import MAX_ENTRY, MAX_WINDOWS, WindowError, parse_windows
from server.errors import InvalidRequestError
from server.scrape import MAX_ADDRESS_LENGTH, Network, check_metrics_address


@dataclass(frozen=True)
class Policy:
    """What the server's settings add to the validation of a body (the default: nothing
    configured)."""

    metrics_networks: tuple[Network, ...] = ()


def one_line(text: str) -> str:
    """The rule of one-line free text: :func:`~fleet_core.text.check_text`, no tab either.

    Raises:
        ValueError: naming the first refused character by its code point.
    """
    return check_text(text)


def _scrape_target(address: str, info: ValidationInfo) -> str:
    policy = info.context if isinstance(info.context, Policy) else Policy()
    return check_metrics_address(address, policy.metrics_networks)


Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex128 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32,64}$")]
# The manifest's identifier rule (image_builder.manifest), so a device's compatible string can
# equal a release's.
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")]
_DEVICE_ID_SHAPE = re.compile(r"[0-9A-Fa-f]{64}")


def not_a_device_id(hostname: str) -> str:
    """The rule that keeps a device's full id one device's: a hostname may not have its shape
    (64 hex digits, in any case: references are read case-insensitively). Shorter hex hostnames
    (a board's serial number) are kept: a reference that is both a hostname and an id prefix is
    refused as ambiguous by the one resolver (``server/cli/devices.py``), naming both devices.

    Raises:
        ValueError: 64 hex digits.
    """
    if _DEVICE_ID_SHAPE.fullmatch(hostname):
        raise ValueError("64 hex digits is the shape of a device id, which no hostname may take")
    return hostname


Hostname = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"),
    AfterValidator(not_a_device_id),
]
Word = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
# A device's role or tag: what rollout selectors and metric labels are made of.
Label = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
MAX_TAGS = 16
SlotName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,15}$")]
# Free text, one line: NUL cannot be stored in PostgreSQL, a line break (U+2028 too) would forge
# lines in logs and one-line error messages, and a control or format character would steer the
# terminal or reorder the text of whoever reads it (fleet_core/text.py).
Text128 = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(one_line)]
EventName = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$", max_length=64)
]
Version = Text128
# What a device reports as a version may be empty (a slot written by other tools); it is shown,
# never matched against releases.
ReportedVersion = Annotated[str, StringConstraints(max_length=128), AfterValidator(one_line)]
Token = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,256}$")]
# "host:port" (a host name, an IPv4 address or a bracketed IPv6 address): a scrape target, on
# the networks the server allows (server/scrape.py; the networks come with parse's policy).
MetricsAddress = Annotated[
    str, StringConstraints(max_length=MAX_ADDRESS_LENGTH), AfterValidator(_scrape_target)
]
MAX_FIELDS_DEPTH = 16
MAX_EVENTS = 100
MAX_SEQ = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Model = TypeVar("Model", bound=_Body)


def parse(model: type[Model], body: bytes, policy: Policy | None = None) -> Model:
    """Validate a JSON request body, with the server's ``policy`` (default: nothing configured).

    Raises:
        InvalidRequestError: not JSON, not an object, unknown fields, wrong types or ranges,
            refused characters in free text, a metrics address outside the policy.
    """
    try:
        return model.model_validate_json(body, context=policy or Policy())
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidRequestError(
            f"{where}: {first['msg']} ({err.error_count()} problem(s))"
        ) from None


# --- devices (docs/device-protocol.md) --------------------------------------------------------


class EnrollRequest(_Body):
    public_key: Hex64
    compatible: Ident
    hostname: Hostname
    enrollment_token: Token | None = None
    proof: Hex128


class SessionRequest(_Body):
    challenge: Hex64
    signature: Hex128


class CheckinRequest(_Body):
    nonce: Nonce


class SlotReport(_Body):
    status: Word
    version: ReportedVersion | None = None


class HealthReport(_Body):
    name: Text128
    ok: bool


class Heartbeat(_Body):
    version: ReportedVersion | None = None
    booted: SlotName
    primary: SlotName
    trial: bool
    slots: Annotated[dict[SlotName, SlotReport], Field(max_length=8)]
    updater_state: Word
    health: Annotated[list[HealthReport], Field(max_length=64)] = []
    temperature_c: Annotated[float, Field(ge=-273.15, le=1000)] | None = None
    # the Raspberry Pi firmware's get_throttled bits (32 of them); absent on other boards
    throttled: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None
    free_space_mb: Annotated[float, Field(ge=0, le=2**53)] | None = None
    uptime_s: Annotated[float, Field(ge=0, le=2**53)] | None = None
    clock: Annotated[float, Field(ge=0, le=2**40)] | None = None
    clock_skew_s: Annotated[float, Field(ge=-(2**40), le=2**40)] | None = None
    safe_mode: bool = False
    role: Label | None = None
    tags: Annotated[list[Label], Field(max_length=MAX_TAGS)] = []
    metrics_address: MetricsAddress | None = None  # where Prometheus scrapes the device


class Event(_Body):
    event: EventName
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    fields: dict[str, JsonValue] = {}

    @field_validator("fields")
    @classmethod
    def _storable(cls, fields: dict[str, JsonValue]) -> dict[str, JsonValue]:
        _check_storable(fields, 0)
        return fields


# An event's fields are what the updater logged (updater/log.py): their string values are log
# lines, which may keep a tab to align what they hold, never a line break.
LOG_LINE_ALLOWS = "\t"


def _check_storable(value: JsonValue, depth: int, where: str = "fields") -> None:
    """Refuse what JSON cannot carry or PostgreSQL cannot store (NaN, infinities, NUL) and
    what free text may not hold: in keys (one line) and string values (log lines)."""
    if depth > MAX_FIELDS_DEPTH:
        raise ValueError(f"nested deeper than {MAX_FIELDS_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    if isinstance(value, str):
        char = refused_character(value, allow=LOG_LINE_ALLOWS)
        if char is not None:
            raise ValueError(f"{where}: {describe(char)} is not allowed in text")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_storable(item, depth + 1, f"{where}[{index}]")
    if isinstance(value, dict):
        for key, item in value.items():
            inside = f"{where}.{printable(key)[:64]}"
            char = refused_character(key)
            if char is not None:
                raise ValueError(f"{inside}: {describe(char)} is not allowed in a key")
            _check_storable(item, depth + 1, inside)


class EventsRequest(_Body):
    events: Annotated[list[Event], Field(max_length=MAX_EVENTS)]


# --- operators --------------------------------------------------------------------------------


class AssignmentRequest(_Body):
    version: Version | None


class EnrollmentTokenRequest(_Body):
    uses: Annotated[int, Field(ge=1, le=1_000_000)]
    expires_in: Annotated[int, Field(ge=1, le=10 * 366 * 86400)] | None = None


class OperatorTokenRequest(_Body):
    name: Text128
    role: Literal["viewer", "operator", "admin"]


class PreauthorizeRequest(_Body):
    public_key: Hex64


# --- rollouts -----------------------------------------------------------------------------------

DEFAULT_STAGES = (5, 25, 100)
DEFAULT_SOAK_S = 900
DEFAULT_MAX_FAILURE_RATE = 0.05
DEFAULT_INSTALL_DEADLINE_S = 3600
# A device not seen for longer than this is offline: a rollout neither assigns nor expects it.
DEFAULT_OFFLINE_AFTER_S = 86400
# The shortest: a device is seen at each check-in (every minute by default) and its last_seen
# is written once a minute, so a healthy device can look a few minutes old.
MIN_OFFLINE_AFTER_S = 300
MAX_TARGETS = 100_000


class RolloutSelector(_Body):
    """Which devices a rollout is for, besides ``compatible``: every given field must match
    (the device's role, and every one of the tags among the device's tags)."""

    role: Label | None = None
    tags: Annotated[list[Label], Field(max_length=MAX_TAGS, default_factory=list)]


def _canonical_windows(entries: list[str]) -> list[str]:
    """A rollout's maintenance windows, each in its canonical text (``mon-fri 2:00-5:00`` is
    ``Mon-Fri 02:00-05:00``), duplicates once.

    Raises:
        ValueError: naming the entry that cannot be read and why (fleet_core.windows).
    """
    try:
        return [window.text for window in parse_windows(entries, where="windows")]
    except WindowError as err:
        raise ValueError(str(err)) from None


WindowEntry = Annotated[str, StringConstraints(max_length=MAX_ENTRY)]


class RolloutStartRequest(_Body):
    version: Version
    device_ids: Annotated[list[Hex64], Field(max_length=MAX_TARGETS)] | None = None
    canary: Annotated[list[Hex64], Field(max_length=1000, default_factory=list)]
    stages: Annotated[
        list[Annotated[int, Field(ge=1, le=100)]],
        Field(min_length=1, max_length=20, default_factory=lambda: list(DEFAULT_STAGES)),
    ]
    soak_s: Annotated[int, Field(ge=0, le=30 * 86400)] = DEFAULT_SOAK_S
    max_failure_rate: Annotated[float, Field(ge=0, lt=1)] = DEFAULT_MAX_FAILURE_RATE
    install_deadline_s: Annotated[int, Field(ge=1, le=30 * 86400)] = DEFAULT_INSTALL_DEADLINE_S
    rollback_on_halt: bool = True
    selector: RolloutSelector | None = None
    offline_after_s: Annotated[int, Field(ge=MIN_OFFLINE_AFTER_S, le=365 * 86400)] = (
        DEFAULT_OFFLINE_AFTER_S
    )
    # a rollout that would assign no device is refused unless this says it is meant
    allow_empty: bool = False
    # maintenance windows in each device's local time (fleet_core.windows): its devices start
    # installing only inside them, and inside their own; empty: any time
    windows: Annotated[
        list[WindowEntry],
        Field(max_length=MAX_WINDOWS, default_factory=list),
        AfterValidator(_canonical_windows),
    ]


class ReasonRequest(_Body):
    reason: Text128 | None = None


class ResumeRequest(ReasonRequest):
    """A resume's reason, and the failed devices the operator looked at and acknowledges
    (absent: every failed device; one not named refuses the resume)."""

    acknowledge: Annotated[list[Hex64], Field(max_length=MAX_TARGETS)] | None = None


class RenameRequest(_Body):
    hostname: Hostname
