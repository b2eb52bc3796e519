"""The web console's Content-Security-Policy says, directive by directive, what docs/console.md
and docs/security.md promise: no framing, no inline or foreign script, forms posted only to the
console. Checked on the headers a page is answered with, not against the constant itself, so
loosening the constant fails here."""

from __future__ import annotations

import pytest

from tests.server.conftest import Harness

PAGES = ("/ui/login", "/ui/nothing-here", "/ui/static/console.js")


def directives(policy: str) -> dict[str, tuple[str, ...]]:
    """A policy's directives: name -> its source expressions."""
    parsed: dict[str, tuple[str, ...]] = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            parsed[words[0].lower()] = tuple(words[1:])
    return parsed


@pytest.mark.parametrize("path", PAGES)
def test_a_console_answer_may_not_be_framed_or_run_foreign_script(
    harness: Harness, path: str
) -> None:
    policy = directives(harness.client.get(path).headers["content-security-policy"])
    assert policy["frame-ancestors"] == ("'none'",)
    assert policy["default-src"] == ("'none'",)
    assert policy["script-src"] == ("'self'",)
    assert policy["style-src"] == ("'self'",)
    assert policy["form-action"] == ("'self'",)
    assert policy["base-uri"] == ("'none'",)
    assert policy["connect-src"] == ("'self'",)
