"""The browser tier cannot pass by testing nothing: a missing Chromium or axe-core fails it,
naming the step that installs it; only FLEET_SKIP_BROWSER=1, set on purpose, skips it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import conftest


def test_a_missing_chromium_fails_the_tier_naming_make_deps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(conftest.SKIP_ENV, raising=False)
    monkeypatch.setattr(conftest, "CHROMIUM", tmp_path / "chromium")
    with pytest.raises(pytest.fail.Exception, match=r"make deps"):
        conftest.require_browser()


def test_a_missing_axe_core_fails_the_tier_naming_its_make_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(conftest.SKIP_ENV, raising=False)
    monkeypatch.setattr(conftest, "AXE", conftest.ROOT / "tests" / "ui" / "no-such" / "axe.js")
    with pytest.raises(pytest.fail.Exception, match=r"make browser-deps"):
        conftest.require_browser()


def test_only_an_explicit_request_skips_the_tier(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(conftest, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setenv(conftest.SKIP_ENV, "yes")
    with pytest.raises(pytest.fail.Exception):
        conftest.require_browser()
    monkeypatch.setenv(conftest.SKIP_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match=conftest.SKIP_ENV):
        conftest.require_browser()


def test_the_installed_tier_has_what_it_needs() -> None:
    """Chromium and axe-core are there; with FLEET_SKIP_BROWSER=1 this is skipped like the
    rest of the tier (the request to skip is honoured, and shows in the summary)."""
    conftest.require_browser()
    assert conftest.CHROMIUM.is_file() and conftest.AXE.is_file()
