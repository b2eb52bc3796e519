"""Signed heads of the audit trail (server/anchor.py): a chain rewritten whole, a tail dropped
or re-hashed, and forged or tampered anchors are all named by `fleet audit verify`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update

from fleet_core.cli import fleet
from server import audit
from server.anchor import (
    AnchorError,
    SignedHead,
    anchor_head,
    check_trail,
    sign_head,
    stored_anchors,
)
from server.database import Database
from server.models import AuditAnchorRow, AuditRow
from signing.keys import generate_key, load_private_key
from tests.server.conftest import FakeClock, Harness, LiveServer
from tests.server.test_audit import AT, assert_broken, chain, fill


def data_dir_args(harness: Harness) -> list[str]:
    """The server's data directory (its key) and its database, SQLite or PostgreSQL."""
    return [
        "--data-dir", str(harness.settings.data_dir),
        "--database-url", harness.settings.database_url,
    ]  # fmt: skip


def run(*args: str) -> Result:
    return CliRunner().invoke(fleet, ["audit", *args])


def anchor_now(harness: Harness) -> SignedHead:
    result = run("head", *data_dir_args(harness))
    assert result.exit_code == 0, result.output
    return SignedHead.from_dict(json.loads(result.stdout))


def rewrite_whole(harness: Harness, seq: int, subject: str) -> None:
    """Change entry ``seq`` and recompute every hash after it, as someone with write access to
    the database but not the server key could: a chain that holds on its own."""
    with harness.db.write() as session:
        chain = audit.entries(session)
        prev = chain[seq - 2].hash if seq > 1 else audit.GENESIS_HASH
        for entry in chain[seq - 1 :]:
            changed = replace(entry, subject=subject) if entry.seq == seq else entry
            changed = replace(changed, prev_hash=prev, hash=changed.expected_hash(prev))
            session.execute(
                update(AuditRow)
                .where(AuditRow.seq == entry.seq)
                .values(subject=changed.subject, prev_hash=changed.prev_hash, hash=changed.hash)
            )
            prev = changed.hash


def test_a_chain_rewritten_whole_passes_alone_and_fails_against_its_signed_head(
    harness: Harness,
) -> None:
    fill(harness)
    head = anchor_now(harness)
    rewrite_whole(harness, 3, "forged")
    plain = run("verify", "--database-url", harness.settings.database_url)
    assert plain.exit_code == 0, plain.output  # the hash chain alone holds
    assert_broken(
        run("verify", *data_dir_args(harness)),
        f"entry {head.seq} differs from the recorded head",
    )


def test_a_dropped_tail_is_named_from_the_stored_anchor(harness: Harness) -> None:
    fill(harness)
    head = anchor_now(harness)
    with harness.db.write() as session:
        session.execute(delete(AuditRow).where(AuditRow.seq >= head.seq - 1))
    assert_broken(
        run("verify", *data_dir_args(harness)),
        f"entries {head.seq - 1} to {head.seq} were removed from the end",
    )


def test_an_intact_trail_reports_its_signed_heads(harness: Harness) -> None:
    fill(harness)
    first = anchor_now(harness)
    assert anchor_now(harness) == first  # the same head is not signed twice
    fill(harness, 2)
    second = anchor_now(harness)
    assert second.seq == first.seq + 2
    result = run("verify", *data_dir_args(harness))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "signed heads: 2 hold"
    assert [a.seq for a in stored_anchors(harness.db)] == [first.seq, second.seq]


@pytest.mark.parametrize("forgery", ["other-key", "flipped", "garbage", "moved"])
def test_an_anchor_made_or_changed_without_the_server_key_is_named(
    harness: Harness, tmp_path: Path, forgery: str
) -> None:
    fill(harness)
    real = anchor_now(harness)
    if forgery == "other-key":
        stranger = generate_key(tmp_path / "stranger")
        forged = sign_head(real.seq, real.hash, AT, stranger)
        fragment = f"signed head {real.seq} is by key {stranger.key_id}, not the server key"
    elif forgery == "flipped":
        flipped = f"{int(real.signature[0], 16) ^ 1:x}" + real.signature[1:]
        forged = replace(real, signature=flipped)
        fragment = f"signed head {real.seq}: "
    elif forgery == "garbage":
        forged = replace(real, signature="zz" * 64)
        fragment = f"signed head {real.seq}: malformed signature"
    else:  # the anchor moved to a rewritten head, its signature kept
        forged = replace(real, hash="ab" * 32)
        fragment = "the signature does not verify with the server key"
    with harness.db.write() as session:
        session.execute(delete(AuditAnchorRow))
        session.add(AuditAnchorRow(**forged.to_dict()))
    assert_broken(run("verify", *data_dir_args(harness)), fragment)


def test_an_exported_head_catches_what_deleting_the_anchors_hides(
    harness: Harness, tmp_path: Path
) -> None:
    fill(harness)
    out = tmp_path / "head.json"
    result = run("head", *data_dir_args(harness), "--out", str(out))
    assert result.exit_code == 0, result.output
    head = SignedHead.from_dict(json.loads(out.read_text()))
    assert f"signed head {head.seq}:{head.hash} written to {out}" in result.stderr
    with harness.db.write() as session:
        session.execute(delete(AuditAnchorRow))
        session.execute(delete(AuditRow).where(AuditRow.seq == head.seq))
    url = ["--database-url", harness.settings.database_url]
    assert run("verify", *url).exit_code == 0  # no anchor left, a shorter chain
    key = harness.settings.server_key_path
    for option in ("--expect-head", "--expect-signed-head"):  # a file given either way
        assert_broken(
            run("verify", *url, option, str(out), "--server-key", str(key)),
            f"entries {head.seq} to {head.seq} were removed from the end",
        )
    # the file says which head; someone changing it cannot sign it again
    out.write_text(json.dumps({**head.to_dict(), "seq": head.seq - 1}))
    assert_broken(
        run("verify", *url, "--expect-signed-head", str(out), "--server-key", str(key)),
        "the signature does not verify with the server key",
    )
    # a signed head file without the key to check it is refused, not silently trusted
    refused = run("verify", *url, "--expect-signed-head", str(out))
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "Error: checking a signed head needs the server key: give --server-key"
    )
    # a mistyped file name is named as what it is, not as a bad SEQ:HASH
    nowhere = str(tmp_path / "nowhere.json")
    mistyped = run("verify", *url, "--expect-head", nowhere)
    assert mistyped.exit_code == 2 and "nor a signed head file" in mistyped.stderr
    assert "no such file" in mistyped.stderr
    missing = run("verify", *url, "--expect-signed-head", nowhere)
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    twice = run("verify", *url, "--expect-head", str(out), "--expect-signed-head", str(out))
    assert twice.exit_code == 2 and "give the signed head once" in twice.stderr
    as_json = run(
        "verify", *url, "--expect-signed-head", str(out), "--server-key", str(key), "--json"
    )
    assert as_json.exit_code == 1
    outcome = json.loads(as_json.stdout)
    assert outcome["intact"] is False and "does not verify" in outcome["problem"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "signed head: not a JSON object"),
        ('{"seq": 0}', "signed head: seq must be a positive integer"),
        ('{"seq": 3, "hash": "x"}', "signed head: hash must be 64 lowercase hex digits"),
        ('{"seq": 3, "colour": 1}', "signed head: unknown field(s) colour"),
    ],
)
def test_a_malformed_head_file_is_one_clear_error(
    harness: Harness, tmp_path: Path, content: str, problem: str
) -> None:
    fill(harness)
    path = tmp_path / "head.json"
    path.write_text(content)
    result = run("verify", *data_dir_args(harness), "--expect-signed-head", str(path))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: {path}: {problem}"] or (
        len(lines) == 1 and lines[0].startswith(f"Error: {path}: {problem}")
    ), lines


def test_heads_over_the_api(live_server: LiveServer, tmp_path: Path) -> None:
    harness = live_server.harness
    fill(harness)
    client = harness.client
    answer = client.get("/api/v1/audit/head", headers=harness.viewer)
    assert answer.status_code == 200, answer.text
    head = SignedHead.from_dict(answer.json()["head"])
    key = load_private_key(harness.settings.server_key_path)
    assert head.problem(key.public_key) is None
    assert client.get("/api/v1/audit/head").status_code == 401
    listed = client.get("/api/v1/audit/anchors", headers=harness.viewer).json()["anchors"]
    assert [SignedHead.from_dict(a) for a in listed] == [head]

    token = harness.viewer["Authorization"].split()[1]
    api = ["--server", live_server.url, "--token", token]
    out = tmp_path / "head.json"
    assert run("head", *api, "--out", str(out)).exit_code == 0
    public = tmp_path / "server.pub"
    from signing.keys import public_key_pem

    public.write_bytes(public_key_pem(key.public_key))
    result = run("verify", *api, "--server-key", str(public), "--expect-signed-head", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "signed heads: 1 hold"
    unchecked = run("verify", *api)
    assert unchecked.exit_code == 0
    assert "1 signed head(s) not checked: give --server-key" in unchecked.stderr


def test_anchoring_an_empty_trail_signs_nothing(harness: Harness, tmp_path: Path) -> None:
    with harness.db.write() as session:
        session.execute(delete(AuditRow))
    key = generate_key(tmp_path / "key")
    assert anchor_head(harness.db, key, AT) is None
    with harness.db.read() as session:
        assert session.scalars(select(AuditAnchorRow)).first() is None


def test_a_head_already_anchored_takes_no_write_and_no_chain_lock(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server anchors every minute: an idle trail must not hold the lock every audited
    change waits on, nor write the database."""
    key = generate_key(tmp_path / "key")
    first = anchor_head(harness.db, key, AT)
    assert first is not None

    def no_write() -> None:
        raise AssertionError("an unchanged head took a write transaction")

    monkeypatch.setattr(harness.db, "write", no_write)
    assert anchor_head(harness.db, key, AT) == first
    monkeypatch.undo()
    append_entries(harness.db, 1)
    moved = anchor_head(harness.db, key, AT)
    assert moved is not None and moved.seq == first.seq + 1
    assert [head.seq for head in stored_anchors(harness.db)][-2:] == [first.seq, moved.seq]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=12,
)


@settings(max_examples=200)
@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries(
            {
                "seq": st.integers(),
                "hash": st.text(max_size=70),
                "at": st.text(max_size=40),
                "key_id": st.text(max_size=70),
                "signature": st.text(max_size=130),
            }
        ),
    )
)
def test_anything_but_a_signed_head_is_refused_by_name(document: Any) -> None:
    try:
        head = SignedHead.from_dict(document)
    except AnchorError as err:
        assert str(err).startswith("signed head: ")
        return
    assert head.to_dict() == document


def test_the_running_server_signs_its_head_as_entries_arrive(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> None:
    import time

    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import make_settings

    settings = make_settings(tmp_path, keyring_dir, database_url, clock)
    app = create_app(settings, rollout_interval_s=None, anchor_interval_s=0.05)
    with TestClient(app):
        db = app.state.fleet.db
        append_entries(db, 3)
        deadline = time.monotonic() + 20
        while not stored_anchors(db) and time.monotonic() < deadline:
            time.sleep(0.02)
        (first,) = stored_anchors(db)[:1]
        key = load_private_key(settings.server_key_path)
        assert first.problem(key.public_key) is None
        append_entries(db, 1)
        head = first.seq + 1
        while stored_anchors(db)[-1].seq < head and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stored_anchors(db)[-1].seq == head
    db.dispose()


def append_entries(db: Database, count: int) -> None:
    with db.write() as session:
        for n in range(count):
            audit.append(db, session, at=AT, actor="operator:test", action="test.action",
                         subject=f"thing-{n}")  # fmt: skip


def test_check_trail_checks_the_signed_heads_then_walks_the_chain(tmp_path: Path) -> None:
    key, other = generate_key(tmp_path / "key"), generate_key(tmp_path / "other")
    entries = chain(4)
    heads = [sign_head(e.seq, e.hash, AT, key) for e in entries[1:3]]
    held = check_trail(entries, heads, key.public_key)
    assert (held.intact, held.entries, held.signed_heads, held.unchecked) == (True, 4, 2, 0)
    assert held.head == f"4:{entries[-1].hash}"
    unkeyed = check_trail(entries, heads, None, expect_head=(4, entries[-1].hash))
    assert (unkeyed.intact, unkeyed.signed_heads, unkeyed.unchecked) == (True, 0, 2)
    forged = [heads[0], sign_head(3, entries[2].hash, AT, other)]
    refused = check_trail(entries, forged, key.public_key)
    assert refused.problem == "signed head 3 is by key " + other.key_id + ", not the server key"
    assert (refused.entries, refused.head, refused.signed_heads) == (None, None, None)
    exported = sign_head(5, "ab" * 32, AT, key)  # a head the chain lost since
    cut = check_trail(entries, heads, key.public_key, exported=exported)
    assert cut.problem == (
        "entries 5 to 5 were removed from the end (the recorded head is entry 5) "
        "(4 entries before it hold)"
    )
    assert (cut.entries, cut.head, cut.signed_heads) == (4, None, None)
