"""The audit trail's hash chain: intact, and each kind of tampering named precisely."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import delete, text, update
from sqlalchemy.orm import Session

from fleet_core.cli import fleet
from server import audit
from server.audit import AuditEntry, verify_chain
from server.client import ApiClient
from server.database import AUDIT_CHAIN_LOCK
from server.errors import InvalidRequestError
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
    assert bad.exit_code == 2 and "'garbage': neither SEQ:HASH" in bad.stderr
    broken = json.loads(verify(harness, "--expect-head", head, "--json").stdout)
    assert broken["intact"] is False and broken["head"] is None
    assert f"entries {last - 1} to {last} were removed" in broken["problem"]
    intact = verify(harness, "--json")
    assert intact.exit_code == 0, intact.output
    assert json.loads(intact.stdout) == {
        "intact": True, "problem": None, "entries": last - 2,
        "head": json.loads(intact.stdout)["head"], "signed_heads_held": 0,
        "signed_heads_unchecked": 0,
    }  # fmt: skip
    assert json.loads(intact.stdout)["head"].startswith(f"{last - 2}:")


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
    assert verify_chain([]).intact  # an empty trail, nothing recorded: nothing was removed
    swapped = verify_chain([entries[0], entries[2]])
    assert swapped.problem is not None
    assert swapped.problem.startswith("entry 2 removed")


def entry_document(**fields: Any) -> dict[str, Any]:
    """A stored audit entry as a dict, well-formed apart from ``fields``."""
    document: dict[str, Any] = {
        "seq": 1, "at": "t", "actor": "a", "action": "x", "subject": None, "details": {},
        "prev_hash": "0" * 64, "hash": "0" * 64,
    }  # fmt: skip
    return document | fields


@pytest.mark.parametrize("field", ["seq", "hash"])
def test_entry_from_dict_rejects_wrong_types(field: str) -> None:
    document = entry_document(**{field: None})
    with pytest.raises(ValueError):
        AuditEntry.from_dict(document)


# --- the exact hash input, pinned independently of canonical_json ------------------------------


def test_hash_input_is_pinned_byte_for_byte(harness: Harness) -> None:
    # The keys of details are given unsorted and with a non-ASCII value: the stored text must
    # sort them, drop the spaces and keep the UTF-8, and the hash covers exactly the six fields
    # under their own names.
    with harness.db.write() as session:
        first = audit.append(
            harness.db,
            session,
            at=datetime(2027, 1, 15, 9, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1))),
            actor="operator:ö",
            action="test.pinned",
            subject="cam-1",
            details={"z": [1, 2], "a": "grüße"},
        )
    assert first.at == "2027-01-15T08:30:05.123456Z"
    assert first.subject == "cam-1"
    assert first.details == '{"a":"grüße","z":[1,2]}'
    content = (
        '{"action":"test.pinned","actor":"operator:ö","at":"2027-01-15T08:30:05.123456Z",'
        '"details":"{\\"a\\":\\"grüße\\",\\"z\\":[1,2]}","seq":'
        + str(first.seq)
        + ',"subject":"cam-1"}'
    ).encode("utf-8")
    assert first.content() == content
    assert first.hash == hashlib.sha256(first.prev_hash.encode() + content).hexdigest()
    with harness.db.read() as session:
        row = session.get(AuditRow, first.seq)
        assert row is not None
        assert AuditEntry.from_row(row) == first


def test_hash_of_an_entry_without_subject_is_pinned() -> None:
    entry = AuditEntry(1, "t", "a", "x", None, "{}", audit.GENESIS_HASH, "")
    content = b'{"action":"x","actor":"a","at":"t","details":"{}","seq":1,"subject":null}'
    assert entry.content() == content
    assert (
        entry.expected_hash(audit.GENESIS_HASH) == hashlib.sha256(b"0" * 64 + content).hexdigest()
    )


def test_audit_time_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/St_Johns")
    time.tzset()
    try:
        assert audit.audit_time(AT) == "2027-01-15T08:00:00.000000Z"
        plus_one = datetime(2027, 1, 15, 9, 0, tzinfo=timezone(timedelta(hours=1)))
        assert audit.audit_time(plus_one) == "2027-01-15T08:00:00.000000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_append_takes_the_chain_lock_in_its_transaction(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, int]] = []
    monkeypatch.setattr(harness.db, "lock", lambda session, key: calls.append((session, key)))
    with harness.db.write() as session:
        audit.append(harness.db, session, at=AT, actor="a", action="x")
        assert calls == [(session, AUDIT_CHAIN_LOCK)]


# --- reading the trail ---------------------------------------------------------------------------


def test_entries_after_and_limit(harness: Harness) -> None:
    fill(harness, 6)
    with harness.db.read() as session:
        total = len(audit.entries(session))
        assert [e.seq for e in audit.entries(session)] == list(range(1, total + 1))
        assert [e.seq for e in audit.entries(session, after=2, limit=3)] == [3, 4, 5]
        assert [e.seq for e in audit.entries(session, after=total - 1)] == [total]


def fill_varied(harness: Harness) -> dict[str, int]:
    """Entries whose action, subject and actor differ; their seq by a name."""
    kinds = {
        "rollout": ("rollout", "rollout:1", "operator:ann"),
        "halted": ("rollout.halted", "rollout:1", "rollout-engine"),
        "rollouts": ("rollouts.listed", "rollout:1", "operator:ann"),  # not under "rollout"
        "like": ("axb.c", "rollout:2", "operator:bob"),  # "a_b" as a LIKE pattern matches it
        "a_b": ("a_b.c", "rollout:2", "operator:bob"),
        "device": ("device.enrolled", "ab" * 32, "device:" + "ab" * 32),
    }
    seqs = {}
    with harness.db.write() as session:
        for name, (action, subject, actor) in kinds.items():
            entry = audit.append(
                harness.db, session, at=AT, actor=actor, action=action, subject=subject
            )
            seqs[name] = entry.seq
    return seqs


def test_entries_filtered_by_action_subject_and_actor(harness: Harness) -> None:
    seqs = fill_varied(harness)

    def found(match: audit.AuditFilter, **kwargs: Any) -> list[int]:
        with harness.db.read() as session:
            return [e.seq for e in audit.entries(session, match=match, **kwargs)]

    def named(*names: str) -> list[int]:
        return sorted(seqs[name] for name in names)

    assert found(audit.AuditFilter(("rollout",))) == named("rollout", "halted")
    assert found(audit.AuditFilter(("rollout.halted",))) == named("halted")
    assert found(audit.AuditFilter(("a_b",))) == named("a_b")  # no LIKE wildcard
    assert found(audit.AuditFilter(("rollout", "device"))) == named("rollout", "halted", "device")
    assert found(audit.AuditFilter(subject="rollout:2")) == named("like", "a_b")
    assert found(audit.AuditFilter(actor="operator:ann")) == named("rollout", "rollouts")
    assert found(audit.AuditFilter(("rollout",), "rollout:1", "rollout-engine")) == named("halted")
    assert found(audit.AuditFilter(("nothing",))) == []
    assert found(audit.AuditFilter(subject="")) == []
    every = found(audit.AuditFilter())
    assert every == list(range(1, max(seqs.values()) + 1))
    # paging: after and before bound it, newest_first turns it, limit cuts it
    mine = audit.AuditFilter(subject="rollout:1")
    assert found(mine, newest_first=True) == named("rollout", "halted", "rollouts")[::-1]
    assert found(mine, newest_first=True, limit=2) == named("halted", "rollouts")[::-1]
    assert found(mine, before=seqs["rollouts"]) == named("rollout", "halted")
    assert found(mine, after=seqs["rollout"], limit=1) == named("halted")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"actions": ["x" * 161]}, "action: at most 160 characters"),
        ({"subject": "x" * 161}, "subject: at most 160 characters"),
        ({"actor": "operator:\x1b[2J"}, "actor: a character not allowed in text"),
        ({"actions": ["rollout", "rollout\u202e"]}, "action: a character not allowed in text"),
        ({"actions": [f"a{n}" for n in range(21)]}, "action: at most 20 actions"),
    ],
)
def test_audit_filter_refuses_what_no_entry_could_match(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        audit.AuditFilter.checked(**fields)
    assert audit.AuditFilter.checked(["x" * 160], "y" * 160, "z") == audit.AuditFilter(
        ("x" * 160,), "y" * 160, "z"
    )


def test_the_api_filters_the_trail(harness: Harness) -> None:
    seqs = fill_varied(harness)

    def listed(query: str) -> Any:
        return harness.client.get(f"/api/v1/audit?{query}", headers=harness.viewer)

    answer = listed("action=rollout&action=device&limit=2").json()
    assert [e["seq"] for e in answer["entries"]] == [seqs["rollout"], seqs["halted"]]
    assert answer["next_after"] == seqs["halted"]
    rest = listed(f"action=rollout&action=device&limit=2&after={seqs['halted']}").json()
    assert [e["seq"] for e in rest["entries"]] == [seqs["device"]] and rest["next_after"] is None
    by_both = listed("subject=rollout:1&actor=operator:ann").json()["entries"]
    assert [e["seq"] for e in by_both] == [seqs["rollout"], seqs["rollouts"]]
    assert len(listed("limit=1000").json()["entries"]) == max(seqs.values())
    refused = listed("actor=" + "x" * 161)
    assert refused.status_code == 422 and "actor: at most 160 characters" in refused.text


def test_audit_list_asks_the_server_for_the_filtered_entries(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = live_server.harness
    seqs = fill_varied(harness)
    asked: list[dict[str, Any]] = []
    real_get = ApiClient.get

    def spy(client: ApiClient, path: str, params: Any = None) -> Any:
        asked.append(dict(params or {}))
        return real_get(client, path, params)

    monkeypatch.setattr(ApiClient, "get", spy)
    token = harness.viewer["Authorization"].split()[1]
    result = CliRunner().invoke(
        fleet,
        ["audit", "list", "--action", "rollout", "--action", "device", "--actor", "rollout-engine",
         "--last", "5", "--server", live_server.url, "--token", token],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert asked == [
        {"action": ["rollout", "device"], "actor": "rollout-engine", "after": 0, "limit": 1000}
    ]
    (line,) = result.stdout.splitlines()
    assert line.split()[0] == str(seqs["halted"]) and "rollout.halted rollout:1 {}" in line
    last = CliRunner().invoke(
        fleet,
        ["audit", "list", "--subject", "rollout:1", "--last", "2", "--json",
         "--server", live_server.url, "--token", token],
    )  # fmt: skip
    assert [json.loads(x)["seq"] for x in last.stdout.splitlines()] == [
        seqs["halted"],
        seqs["rollouts"],
    ]
    none = CliRunner().invoke(
        fleet,
        ["audit", "list", "--action", "nothing", "--server", live_server.url, "--token", token],
    )
    assert none.exit_code == 0 and none.stdout == "" and "no matching entries" in none.stderr


def test_entries_are_ordered_by_seq_not_by_storage(harness: Harness) -> None:
    fill(harness, 4)
    with harness.db.read() as session:
        if harness.db.dialect == "sqlite":
            # SQLite then returns rows of a query without ORDER BY in reverse.
            session.execute(text("PRAGMA reverse_unordered_selects = ON"))
        seqs = [e.seq for e in audit.entries(session)]
    assert seqs == sorted(seqs)
    assert len(seqs) >= 4


def test_all_entries_reads_page_by_page(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(harness, 7)
    total = harness.count(AuditRow)
    monkeypatch.setattr(audit, "PAGE", 3)
    pages: list[list[int]] = []
    real_entries = audit.entries

    def spy(session: Session, **kwargs: Any) -> list[AuditEntry]:
        page = real_entries(session, **kwargs)
        pages.append([e.seq for e in page])
        return page

    monkeypatch.setattr(audit, "entries", spy)
    # a bounded read, so a paging loop that never advances fails instead of hanging
    seen = [e.seq for e in itertools.islice(audit.all_entries(harness.db), total + 10)]
    assert seen == list(range(1, total + 1))
    assert all(len(page) <= 3 for page in pages)
    assert len(pages) == total // 3 + 1


# --- the report of a broken chain ----------------------------------------------------------------


def chain(count: int) -> list[AuditEntry]:
    made: list[AuditEntry] = []
    prev = audit.GENESIS_HASH
    for seq in range(1, count + 1):
        draft = AuditEntry(seq, "t", "a", "x", None, f'{{"n":{seq}}}', prev, "")
        made.append(replace(draft, hash=draft.expected_hash(prev)))
        prev = made[-1].hash
    return made


def test_broken_chain_reports_how_far_it_held() -> None:
    entries = chain(5)
    tampered = [*entries[:3], replace(entries[3], actor="b"), *entries[4:]]
    report = verify_chain(tampered)
    assert (report.checked, report.head_seq, report.head_hash) == (3, 3, entries[2].hash)
    assert report.problem == "entry 4 changed (its content does not match its hash)"

    report = verify_chain(entries, expect_head=(4, "f" * 64))
    assert (report.checked, report.head_seq, report.head_hash) == (3, 3, entries[2].hash)
    assert report.problem == (
        "entry 4 differs from the recorded head: the trail was rewritten from entry 4 or earlier"
    )

    report = verify_chain(entries[:2], expect_head=(5, entries[4].hash))
    assert (report.checked, report.head_seq, report.head_hash) == (2, 2, entries[1].hash)
    assert report.problem == (
        "entries 3 to 5 were removed from the end (the recorded head is entry 5)"
    )


def test_recorded_head_at_the_end_is_intact() -> None:
    entries = chain(3)
    report = verify_chain(entries, expect_head=(3, entries[2].hash))
    assert report.intact, report.problem
    assert (report.checked, report.head_seq) == (3, 3)


def test_empty_chain_against_a_recorded_head() -> None:
    report = verify_chain([])
    assert (report.checked, report.head_seq, report.head_hash) == (0, 0, audit.GENESIS_HASH)
    report = verify_chain([], expect_head=(1, "a" * 64))
    assert report.problem == (
        "entries 1 to 1 were removed from the end (the recorded head is entry 1)"
    )
    assert (report.checked, report.head_seq, report.head_hash) == (0, 0, audit.GENESIS_HASH)


def test_problem_texts_are_exact() -> None:
    entries = chain(6)
    assert verify_chain([entries[0], entries[2]]).problem == (
        "entry 2 removed (the trail jumps from entry 1 to 3)"
    )
    assert verify_chain(entries[:2] + entries[5:]).problem == (
        "entries 3-5 removed (the trail jumps from entry 2 to 6)"
    )
    assert verify_chain([entries[1]]).problem == (
        "entry 1 removed (the trail jumps from entry 0 to 2)"
    )
    assert verify_chain([entries[0], entries[0]]).problem == (
        "entry 1 out of order (expected entry 2)"
    )
    rehashed_first = replace(entries[0], details='{"n":99}')
    rehashed_first = replace(rehashed_first, hash=rehashed_first.expected_hash(audit.GENESIS_HASH))
    assert verify_chain([rehashed_first, entries[1]]).problem == (
        "entry 1 changed (its hash was recomputed, but entry 2 still chains to the original)"
    )


def test_first_entry_with_a_foreign_prev_hash_is_named() -> None:
    # Self-consistent (its hash matches its own prev_hash) but not chained to the genesis hash:
    # there is no earlier entry to blame.
    draft = AuditEntry(1, "t", "a", "x", None, "{}", "1" * 64, "")
    entry = replace(draft, hash=draft.expected_hash(draft.prev_hash))
    assert verify_chain([entry]).problem == (
        "entry 1 changed (its prev_hash does not match entry 0)"
    )


def test_entry_from_dict_errors_name_the_entry() -> None:
    document = entry_document(seq=7, hash=5)
    with pytest.raises(ValueError, match=r"^audit entry 7: fields of the wrong type$"):
        AuditEntry.from_dict(document)
    del document["actor"]
    with pytest.raises(ValueError, match=r"^audit entry: missing or malformed field \('actor'\)$"):
        AuditEntry.from_dict(document)
