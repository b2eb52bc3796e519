"""The console's record pages: the releases with their signers and image sizes, and the audit
trail filtered and paged, with the verification of its chain (verified, and broken once a row
is changed in the database)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import update

from server import audit
from server.anchor import anchor_head
from server.models import AuditRow, Release
from server.settings import utc
from server.ui.pages_records import VERIFY_REUSE_S, size_text
from signing.keyring import trust_key
from signing.keys import SigningKey, generate_key
from tests.server.conftest import Harness
from tests.server.test_ui_rollout_pages import HOSTILE, browser, shown_as_text

MakeBundle = Callable[..., Path]


def rows(page: str) -> list[int]:
    return [int(seq) for seq in re.findall(r'data-testid="audit-row" data-seq="([0-9]+)"', page)]


def fill_trail(harness: Harness, count: int, action: str = "test.entry") -> None:
    with harness.db.write() as session:
        for index in range(count):
            audit.append(
                harness.db, session, at=utc(harness.clock), actor=f"tester:{index % 3}",
                action=action, subject=f"thing:{index % 2}", details={"n": index},
            )  # fmt: skip


def test_releases_show_signers_and_sizes(
    harness: Harness, make_bundle: MakeBundle, key: SigningKey, tmp_path: Path
) -> None:
    second = generate_key(tmp_path / "keys" / "second")
    trust_key(harness.settings.keyring_dir, tmp_path / "keys" / "second.pub")
    assert harness.upload(make_bundle("a.bundle", version="1.0.0", size=3000)).status_code == 201
    signed_twice = make_bundle(
        "b.bundle", version="2.0.0", size=5000, bootfs=True, keys=[key, second],
        security_version=4,
    )  # fmt: skip
    assert harness.upload(signed_twice).status_code == 201
    page = browser(harness, "viewer").get("/ui/releases")
    assert page.status_code == 200
    versions = re.findall(r'data-testid="release-row" data-version="([^"]+)"', page.text)
    assert versions == ["2.0.0", "1.0.0"]  # newest first
    newest, oldest = page.text.split('data-version="1.0.0"')
    assert key.key_id in newest and second.key_id in newest
    assert key.key_id in oldest and second.key_id not in oldest
    assert size_text(3000) == "2.9 KiB" and size_text(5000) == "4.9 KiB"
    assert "2.9 KiB" in oldest and "4.9 KiB" in newest and "2.4 KiB" in newest
    assert "operator:test-operator" in page.text
    assert "<td>4</td>" in newest and "metrica-rpi4" in newest


def test_a_hostile_release_version_is_text(harness: Harness, make_bundle: MakeBundle) -> None:
    assert harness.upload(make_bundle()).status_code == 201
    with harness.db.write() as session:  # a version no manifest allows, written directly
        session.execute(update(Release).values(version=HOSTILE))
    page = browser(harness, "viewer").get("/ui/releases")
    assert page.status_code == 200 and shown_as_text(page.text)


def test_an_unreadable_signature_envelope_is_said(
    harness: Harness, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle()).status_code == 201
    with harness.db.write() as session:
        session.execute(update(Release).values(signature=b"{}"))
    page = browser(harness, "viewer").get("/ui/releases")
    assert page.status_code == 200 and "unreadable signature envelope" in page.text


def test_audit_is_newest_first_and_paged(harness: Harness) -> None:
    fill_trail(harness, 120)
    viewer = browser(harness, "viewer")
    first = viewer.get("/ui/audit")
    assert first.status_code == 200
    head = max(rows(first.text))
    assert rows(first.text) == list(range(head, head - 50, -1))
    older = re.search(r'href="/ui/audit\?([^"]*)" rel="next"', first.text)
    assert older is not None and 'rel="prev"' not in first.text
    second = viewer.get("/ui/audit?" + older.group(1).replace("&amp;", "&"))
    assert rows(second.text) == list(range(head - 50, head - 100, -1))
    newer = re.search(r'href="/ui/audit\?([^"]*)" rel="prev"', second.text)
    assert newer is not None
    back = viewer.get("/ui/audit?" + newer.group(1).replace("&amp;", "&"))
    assert rows(back.text) == rows(first.text)
    # before the first entry there is nothing: not the newest page again
    for oldest in ("before=1", "before=0"):
        nothing = viewer.get(f"/ui/audit?{oldest}")
        assert nothing.status_code == 200 and rows(nothing.text) == []


def test_audit_filters(harness: Harness) -> None:
    fill_trail(harness, 30)
    fill_trail(harness, 3, action="test")
    fill_trail(harness, 2, action="tested.other")
    viewer = browser(harness, "viewer")
    by_action = viewer.get("/ui/audit?action=test")
    with harness.db.read() as session:
        trail = audit.entries(session)
    expected = [e.seq for e in reversed(trail) if e.action in ("test", "test.entry")]
    assert rows(by_action.text) == expected  # "test" and what is under it, not "tested.other"
    both = viewer.get("/ui/audit", params={"action": "test.entry", "actor": "tester:1"})
    assert rows(both.text) == [
        e.seq for e in reversed(trail) if e.action == "test.entry" and e.actor == "tester:1"
    ]
    assert 'value="tester:1"' in both.text  # the filter form keeps what was asked
    subject = viewer.get("/ui/audit", params={"subject": "thing:0", "action": "tested"})
    assert rows(subject.text) == [
        e.seq for e in reversed(trail) if e.action == "tested.other" and e.subject == "thing:0"
    ]
    assert "No entry matches" in viewer.get("/ui/audit?actor=nobody").text
    # a wildcard is a character, never a pattern
    assert "No entry matches" in viewer.get("/ui/audit?action=te%25").text


def test_audit_filters_keep_the_paging_links(harness: Harness) -> None:
    fill_trail(harness, 200)
    viewer = browser(harness, "viewer")
    page = viewer.get("/ui/audit?actor=tester:2")
    older = re.search(r'href="/ui/audit\?([^"]*)" rel="next"', page.text)
    assert older is not None and "actor=tester%3A2" in older.group(1)
    with harness.db.read() as session:
        by_tester = [e.seq for e in reversed(audit.entries(session)) if e.actor == "tester:2"]
    assert rows(page.text) == by_tester[:50]
    second = viewer.get("/ui/audit?" + older.group(1).replace("&amp;", "&"))
    assert rows(second.text) == by_tester[50:100]


BAD_PARAMETERS = [
    "before=abc", "after=-1", "before=99999999999999999999", "actor=a%01b", "subject=" + "x" * 161,
    # more digits than int() reads from text (4300)
    "before=" + "9" * 5000, "after=" + "1" * 4301,
]  # fmt: skip


@pytest.mark.parametrize("query", BAD_PARAMETERS)
def test_bad_audit_parameters_are_an_error_page(harness: Harness, query: str) -> None:
    answer = browser(harness, "viewer").get(f"/ui/audit?{query}")
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("text/html")
    assert query.split("=")[0] in answer.text


def test_the_audit_page_shows_the_chain_verified_then_broken(harness: Harness) -> None:
    fill_trail(harness, 5)
    anchor_head(harness.db, harness.app.state.fleet.server_key, utc(harness.clock))
    viewer = browser(harness, "viewer")
    page = viewer.get("/ui/audit")
    status = re.search(r'data-testid="verification-status">([a-z]+)<', page.text)
    assert status is not None and status.group(1) == "verified"
    assert 'data-testid="latest-anchor">Latest signed head: entry' in page.text
    with harness.db.write() as session:
        session.execute(update(AuditRow).where(AuditRow.seq == 2).values(actor="tester:forged"))
    # a verification is reused for a while, then done again
    harness.clock.advance(VERIFY_REUSE_S + 1)
    page = viewer.get("/ui/audit")
    status = re.search(r'data-testid="verification-status">([a-z]+)<', page.text)
    assert status is not None and status.group(1) == "broken"
    assert "entry 2 changed" in page.text


def test_hostile_audit_details_are_text(harness: Harness) -> None:
    with harness.db.write() as session:
        audit.append(
            harness.db, session, at=utc(harness.clock), actor=HOSTILE, action="test.hostile",
            subject=HOSTILE, details={"reason": HOSTILE},
        )  # fmt: skip
    page = browser(harness, "viewer").get("/ui/audit")
    assert page.status_code == 200
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;" in page.text


def test_audit_subjects_link_to_their_pages(harness: Harness) -> None:
    device = "ab" * 32
    with harness.db.write() as session:
        for subject in ("rollout:3", device, "rollout:../../api", "release:1.0.0"):
            audit.append(
                harness.db, session, at=utc(harness.clock), actor="tester", action="test.link",
                subject=subject,
            )  # fmt: skip
    page = browser(harness, "viewer").get("/ui/audit?action=test.link").text
    assert '<a href="/ui/rollouts/3">rollout:3</a>' in page
    assert f'<a href="/ui/devices/{device}">{device}</a>' in page
    assert page.count('href="/ui/rollouts/') == 1 and page.count('href="/ui/devices/') == 1
