"""The audit trail's hash chain: intact, and each kind of tampering named precisely."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import delete, update

from fleet_core.cli import fleet
from server import audit
from server.audit import AuditEntry, verify_chain
from server.models import AuditRow
from tests.server.conftest import Harness, LiveServer

AT = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


def fill(harness: Harness, count: int = 5) -> None:
    with harness.db.write() as session:
        for n in range(count):
            audit.append(
                harness.db,
                session,
                at=AT,
                actor="operator:test",
                action="test.action",
                subject=f"thing-{n}",
                details={"n": n, "text": "grüße"},
            )


def verify(harness: Harness, *extra: str) -> Result:
    return CliRunner().invoke(
        fleet, ["audit", "verify", "--database-url", harness.settings.database_url, *extra]
    )


def assert_broken(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: audit trail broken: ")
    assert fragment in lines[0], lines[0]


def test_intact_chain_via_data_dir_database_and_api(
    live_server: LiveServer,
) -> None:
    harness = live_server.harness
    fill(harness)
    total = harness.count(AuditRow)  # the operator tokens of the fixture are audited too
    result = verify(harness)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"audit trail intact: {total} entries; head {total}:")
    if harness.settings.database_url.startswith("sqlite"):
        by_dir = CliRunner().invoke(
            fleet, ["audit", "verify", "--data-dir", str(harness.settings.data_dir)]
        )
        assert by_dir.output == result.output
    token = harness.viewer["Authorization"].split()[1]
    by_api = CliRunner().invoke(
        fleet, ["audit", "verify", "--server", live_server.url, "--token", token]
    )
    assert by_api.exit_code == 0, by_api.output
    assert by_api.output == result.output


def test_changed_entry_is_named(harness: Harness) -> None:
    fill(harness)
    with harness.db.write() as session:
        session.execute(update(AuditRow).where(AuditRow.seq == 5).values(subject="other"))
    assert_broken(verify(harness), "entry 5 changed (its content does not match its hash)")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "operator:someone-else"),
        ("action", "test.other_action"),
        ("at", "2027-01-15T08:00:01.000000Z"),
        ("details", '{"n":2,"text":"grüße"}'),
    ],
)
def test_every_hashed_field_is_covered_by_the_hash(
    harness: Harness, column: str, value: str
) -> None:
    fill(harness)
    with harness.db.write() as session:
        session.execute(update(AuditRow).where(AuditRow.seq == 5).values({column: value}))
    assert_broken(verify(harness), "entry 5 changed (its content does not match its hash)")


def test_removed_entry_is_named(harness: Harness) -> None:
    fill(harness)
    with harness.db.write() as session:
        session.execute(delete(AuditRow).where(AuditRow.seq.in_([4, 5])))
    assert_broken(verify(harness), "entries 4-5 removed")


def test_rewritten_entry_with_recomputed_hash_is_named(harness: Harness) -> None:
    fill(harness)
    with harness.db.write() as session:
        row = session.get(AuditRow, 4)
        assert row is not None
        forged = replace(AuditEntry.from_row(row), details='{"n":99}')
        row.details = forged.details
        row.hash = forged.expected_hash(forged.prev_hash)
    assert_broken(verify(harness), "entry 4 changed (its hash was recomputed")


def test_edited_prev_hash_is_named(harness: Harness) -> None:
    fill(harness)
    with harness.db.write() as session:
        session.execute(update(AuditRow).where(AuditRow.seq == 6).values(prev_hash="1" * 64))
    assert_broken(verify(harness), "entry 6 changed (its prev_hash does not match entry 5)")


def test_truncated_end_needs_the_recorded_head(harness: Harness) -> None:
    fill(harness)
    head = verify(harness).output.split("head ")[1].strip()
    last = int(head.split(":")[0])
    with harness.db.write() as session:
        session.execute(delete(AuditRow).where(AuditRow.seq >= last - 1))
    assert verify(harness).exit_code == 0  # a shorter chain is a valid chain
    assert_broken(
        verify(harness, "--expect-head", head), f"entries {last - 1} to {last} were removed"
    )
    bad = verify(harness, "--expect-head", "garbage")
    assert bad.exit_code == 2


def test_verify_chain_unit() -> None:
    entries: list[AuditEntry] = []
    prev = audit.GENESIS_HASH
    for seq in range(1, 4):
        draft = AuditEntry(seq, "t", "a", "x", None, "{}", prev, "")
        entry = replace(draft, hash=draft.expected_hash(prev))
        entries.append(entry)
        prev = entry.hash
    report = verify_chain(entries)
    assert report.intact
    assert (report.checked, report.head_seq, report.head_hash) == (3, 3, prev)
    assert not verify_chain(entries, expect_head=(2, "0" * 64)).intact
    assert verify_chain(entries, expect_head=(2, entries[1].hash)).intact
    assert verify_chain([]).head_hash == audit.GENESIS_HASH
    swapped = verify_chain([entries[0], entries[2]])
    assert swapped.problem is not None
    assert swapped.problem.startswith("entry 2 removed")


@pytest.mark.parametrize("field", ["seq", "hash"])
def test_entry_from_dict_rejects_wrong_types(field: str) -> None:
    document = {
        "seq": 1,
        "at": "t",
        "actor": "a",
        "action": "x",
        "subject": None,
        "details": {},
        "prev_hash": "0" * 64,
        "hash": "0" * 64,
    }
    document[field] = None
    with pytest.raises(ValueError):
        AuditEntry.from_dict(document)
