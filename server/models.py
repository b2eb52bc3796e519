"""The server's tables (SQLAlchemy 2). The schema is created and changed only by the Alembic
migrations in ``server/migrations``; a test checks that they produce exactly these tables.

Every time is the server's clock, stored in UTC. Secrets (tokens, challenges) are stored only as
their SHA-256, so a copy of the database admits nobody.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

HEX64 = 64


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every database.

    SQLite has no time zones: values are stored as naive UTC and made aware again on reading,
    so comparisons in SQL (``expires > :now``) mean the same on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a UTC time is stored")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Release(Base):
    """A bundle the server accepted: its signed manifest and signatures, verbatim."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("version", name="releases_version_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(128))
    product: Mapped[str] = mapped_column(String(128))
    compatible: Mapped[str] = mapped_column(String(128))
    security_version: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)  # the exact signed bytes
    manifest_sha256: Mapped[str] = mapped_column(String(HEX64))
    signature: Mapped[bytes] = mapped_column(LargeBinary)  # the envelope's exact bytes
    created: Mapped[datetime] = mapped_column(UTCDateTime)  # when it was uploaded
    uploaded_by: Mapped[str] = mapped_column(String(160))

    images: Mapped[list[ReleaseImage]] = relationship(
        back_populates="release", order_by="ReleaseImage.position", cascade="all, delete-orphan"
    )


class ReleaseImage(Base):
    """One image of a release, served as the blob named by its SHA-256 (assembled from the
    chunk store if it is chunked: server/chunkstore.py)."""

    __tablename__ = "release_images"
    __table_args__ = (
        UniqueConstraint("release_id", "slot_class", name="uq_release_images_slot_class"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # order in the manifest
    slot_class: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(100))
    compression: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(HEX64), index=True)  # of the stored bytes
    size: Mapped[int] = mapped_column(BigInteger)  # stored bytes
    # A chunked image's chunk index (bundle format 2), a blob of its own; both null for an
    # image without one (format 1).
    chunk_index_sha256: Mapped[str | None] = mapped_column(String(HEX64), default=None)
    chunk_index_size: Mapped[int | None] = mapped_column(BigInteger, default=None)

    release: Mapped[Release] = relationship(back_populates="images")


class DeviceStatus(StrEnum):
    """What operators made of a device (``Device.status``)."""

    ACTIVE = "active"
    QUARANTINED = "quarantined"  # checks in and reports; assigned nothing; rollouts skip it
    DECOMMISSIONED = "decommissioned"  # its key is refused until an operator reinstates it


# What the web console's device list filters by (server/ui/queries.py).
DEVICE_FILTERED = ("status", "last_seen", "state", "version", "role", "tags", "hostname")


def _list_index(column: str, *then: str) -> Index:
    """The device list's index on ``column`` (and ``then``): the device id next, the order's
    tie-break, then the rest of :data:`DEVICE_FILTERED`, so it covers any filters' count."""
    leading = (column, *then)
    rest = [c for c in DEVICE_FILTERED if c not in leading]
    return Index(f"ix_devices_{column}", *leading, "id", *rest)


class Device(Base):
    """An enrolled device, named by the key id of its public key."""

    __tablename__ = "devices"
    __table_args__ = (
        CheckConstraint(
            "status IN ('active', 'quarantined', 'decommissioned')", name="ck_devices_status"
        ),
        # the web console's device list: one per sort key and filter, the id next, so a page
        # in any order (ties by id) is read from its index; the filters' indexes carry every
        # column the list filters by, so a count under any filters reads an index alone, never
        # the wide rows (migration 0008)
        Index("ix_devices_hostname", "hostname", "id"),
        _list_index("last_seen"),
        _list_index("version"),
        _list_index("state"),
        _list_index("role"),
        # status with what the overview counts by first, for its grouped counts
        _list_index("status", "last_seen", "state"),
        Index("ix_devices_enrolled", "enrolled", "id"),
    )

    id: Mapped[str] = mapped_column(String(HEX64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(HEX64))  # raw Ed25519 key, hex
    compatible: Mapped[str] = mapped_column(String(128))
    hostname: Mapped[str] = mapped_column(String(253))
    enrolled: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_heartbeat: Mapped[str | None] = mapped_column(Text)  # JSON, as validated
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Copied out of the last heartbeat, so listings and metrics can group in SQL.
    version: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str | None] = mapped_column(String(32))
    clock_skew_s: Mapped[float | None] = mapped_column(Float)
    # What the device says it is for (its heartbeat): rollouts select by role and tags.
    role: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[str | None] = mapped_column(Text)  # JSON list, sorted
    assigned_release_id: Mapped[int | None] = mapped_column(
        ForeignKey("releases.id", ondelete="SET NULL")
    )
    # The highest event seq stored; an event at or below it is a resend and is ignored.
    event_seq: Mapped[int] = mapped_column(BigInteger, default=-1)
    # What operators made of it (server/devices.py): ``active``; ``quarantined`` (checks in and
    # reports, is assigned nothing, rollouts skip it); ``decommissioned`` (its key is refused
    # until an operator reinstates it). Why, since when and by whom, for the listings.
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status_by: Mapped[str | None] = mapped_column(String(160))

    assigned_release: Mapped[Release | None] = relationship()


class EnrollmentToken(Base):
    """A token that admits at most ``uses_left`` more devices, until ``expires`` or until it
    is ``revoked``."""

    __tablename__ = "enrollment_tokens"
    __table_args__ = (
        UniqueConstraint("token_sha256", name="enrollment_tokens_token_sha256_key"),
        CheckConstraint("uses_left >= 0", name="ck_enrollment_tokens_uses_left"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(HEX64))
    uses_left: Mapped[int] = mapped_column(Integer)
    expires: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(160))
    revoked: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PreauthorizedKey(Base):
    """A device public key an operator admitted in advance: it enrolls without a token."""

    __tablename__ = "preauthorized_keys"

    key_id: Mapped[str] = mapped_column(String(HEX64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(HEX64))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(160))


class OperatorToken(Base):
    """A bearer token of a person or a tool, with its role; valid until ``expires`` (None:
    a token from before expiries, which never expires) unless ``revoked``."""

    __tablename__ = "operator_tokens"
    __table_args__ = (
        UniqueConstraint("token_sha256", name="operator_tokens_token_sha256_key"),
        CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="ck_operator_tokens_role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(HEX64))
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(160))
    expires: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeviceChallenge(Base):
    """A challenge handed to a device: single use, valid until ``expires``."""

    __tablename__ = "device_challenges"

    challenge_sha256: Mapped[str] = mapped_column(String(HEX64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    expires: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class DeviceSession(Base):
    """A device's session token, valid until ``expires``."""

    __tablename__ = "device_sessions"

    token_sha256: Mapped[str] = mapped_column(String(HEX64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    expires: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditRow(Base):
    """One entry of the append-only audit trail (see ``server/audit.py`` for the chain).

    ``at`` and ``details`` are stored as the exact text that was hashed, so verification never
    depends on how a database round-trips times or JSON.
    """

    __tablename__ = "audit"
    # actor: a device's events; action: the rollout engine's search for failure events
    __table_args__ = (Index("ix_audit_actor", "actor"), Index("ix_audit_action", "action"))

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(160))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(HEX64))
    hash: Mapped[str] = mapped_column(String(HEX64))


class AuditAnchorRow(Base):
    """A head of the audit trail signed with the server key (see ``server/anchor.py``)."""

    __tablename__ = "audit_anchors"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(HEX64))
    at: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(HEX64))
    signature: Mapped[str] = mapped_column(String(2 * HEX64))


class Rollout(Base):
    """A staged rollout of one release to the selected devices (see ``server/rollouts.py``).

    ``canary_ids``, ``device_ids`` and ``stages`` are JSON lists, ``selector`` a JSON object
    (``role``, ``tags``); ``stage`` indexes the plan (the canary stage first when there are
    canaries, then one stage per percentage).
    """

    __tablename__ = "rollouts"
    __table_args__ = (
        CheckConstraint(
            "state IN ('running', 'paused', 'halted', 'aborted', 'completed')",
            name="ck_rollouts_state",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    device_ids: Mapped[str | None] = mapped_column(Text)  # JSON list; None: every compatible
    selector: Mapped[str | None] = mapped_column(Text)  # JSON {"role", "tags"}; None: any
    canary_ids: Mapped[str] = mapped_column(Text)  # JSON list
    stages: Mapped[str] = mapped_column(Text)  # JSON list of percentages, the last 100
    soak_s: Mapped[int] = mapped_column(Integer)
    max_failure_rate: Mapped[float] = mapped_column(Float)
    install_deadline_s: Mapped[int] = mapped_column(Integer)
    rollback_on_halt: Mapped[bool] = mapped_column(Boolean)
    # a device not seen for longer is offline: neither assigned nor expected (86400 for the
    # rollouts made before the setting existed, as for new ones by default)
    offline_after_s: Mapped[int] = mapped_column(Integer, server_default="86400")
    # JSON list of maintenance windows (fleet_core.windows, canonical text), in each device's
    # local time: its devices start installing only inside them; None: any time
    windows: Mapped[str | None] = mapped_column(Text, default=None)
    state: Mapped[str] = mapped_column(String(16), index=True)  # check-ins ask "any active?"
    stage: Mapped[int] = mapped_column(Integer)
    stage_started: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)  # why it was paused, halted or aborted
    # JSON list: failed devices an operator acknowledged on a resume; the failure rule no
    # longer counts them
    acknowledged: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(160))

    release: Mapped[Release] = relationship()


class RolloutDevice(Base):
    """A device a rollout assigned its release to, and how it fared."""

    __tablename__ = "rollout_devices"
    __table_args__ = (
        CheckConstraint(
            "outcome IN ('pending', 'succeeded', 'failed')", name="ck_rollout_devices_outcome"
        ),
    )

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    stage: Mapped[int] = mapped_column(Integer)  # the stage whose cohort it joined
    previous_release_id: Mapped[int | None] = mapped_column(
        ForeignKey("releases.id", ondelete="SET NULL")
    )
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    committed_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))


class FleetControl(Base):
    """The one row (``id`` 1) of fleet-wide switches: the emergency stop."""

    __tablename__ = "fleet_control"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    emergency_stop: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    actor: Mapped[str | None] = mapped_column(String(160))


class UiSessionRow(Base):
    """A signed-in browser of the web console (server/ui/sessions.py): the SHA-256 of the
    cookie's secret, the operator token it was opened with (its session ends when the token is
    revoked or expires), the CSRF token of its forms, and a one-shot notice to show."""

    __tablename__ = "ui_sessions"

    secret_sha256: Mapped[str] = mapped_column(String(HEX64), primary_key=True)
    operator_token_id: Mapped[int] = mapped_column(
        ForeignKey("operator_tokens.id", ondelete="CASCADE"), index=True
    )
    csrf: Mapped[str] = mapped_column(String(HEX64))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used: Mapped[datetime] = mapped_column(UTCDateTime)
    expires: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # the absolute limit
    notice: Mapped[str | None] = mapped_column(Text)


class ContactGap(Base):
    """A silence of a device longer than the offline threshold (the DeviceOffline alert's,
    ``server.contacts.OFFLINE_AFTER_S``): from its last contact before it to the contact that
    ended it. One row per silence, written by the contact that ends it, never per heartbeat;
    what ``fleet slo report`` counts as down time. Keyed by the device and the silence's start,
    so two contacts that end the same silence at once record it once."""

    __tablename__ = "contact_gaps"
    __table_args__ = (Index("ix_contact_gaps_ended", "ended"),)

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    started: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)  # last contact before
    ended: Mapped[datetime] = mapped_column(UTCDateTime)  # the contact that ended it


class RecordEpoch(Base):
    """Since when the server keeps a record (``name``: ``contact_gaps``): a database that had
    devices before the record began knows nothing of their silences before ``since``; null
    when the record is complete (it began before the first device enrolled)."""

    __tablename__ = "record_epochs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime)
