"""What the operator reads names what the operator types: the option to pass (--allow-empty,
--yes), a usage error for --stages and an empty --server before any request is sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeDevice, LiveServer

REFUSED = "http://127.0.0.1:1"  # nothing listens: a request sent would fail with exit 1


def run(live: LiveServer, *args: str, stdin: str | None = None) -> Result:
    token = live.harness.headers["operator"]["Authorization"].split()[1]
    return CliRunner().invoke(fleet, [*args, "--server", live.url, "--token", token], input=stdin)


def test_an_empty_rollout_is_refused_naming_the_option(
    live_server: LiveServer, make_bundle: Callable[..., Path]
) -> None:
    assert live_server.harness.upload(make_bundle(version="2.0.0")).status_code == 201
    refused = run(live_server, "rollout", "start", "2.0.0")
    assert_one_line_error(refused, "(--allow-empty starts it anyway)")
    assert "allow_empty" not in refused.stderr


def test_remove_without_an_answer_says_to_pass_yes(
    live_server: LiveServer, enrolled: Callable[..., FakeDevice]
) -> None:
    cam = enrolled(hostname="cam-1")
    unanswered = run(live_server, "device", "remove", "cam-1")  # no terminal, no input
    assert unanswered.exit_code == 1 and "Traceback" not in unanswered.output
    question, error = unanswered.stderr.splitlines()  # the question asked, then why it stopped
    assert question == f"remove device {cam.id} (cam-1)? [y/N]: "
    assert error.startswith(f"Error: device {cam.id} not removed: no answer")
    assert error.endswith("(pass --yes to remove it without asking)")
    assert "Aborted" not in unanswered.output
    declined = run(live_server, "device", "remove", "cam-1", stdin="n\n")  # an answer: no
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert run(live_server, "device", "show", "cam-1").exit_code == 0


@pytest.mark.parametrize(
    ("stages", "problem"),
    [
        ("5,25", "stages [5, 25]: give increasing percentages"),
        ("50,25,100", "stages [50, 25, 100]"),
        ("0,100", "stages [0, 100]"),
        ("101", "stages [101]"),
        ("5,,100", "'5,,100': give percentages"),
    ],
)
def test_invalid_stages_are_a_usage_error_before_any_request(stages: str, problem: str) -> None:
    result = CliRunner().invoke(
        fleet,
        ["rollout", "start", "1.4.0", "--stages", stages, "--server", REFUSED, "--token", "x"],
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--stages'" in result.stderr and problem in result.stderr


@pytest.mark.parametrize("command", [["device", "list"], ["emergency-stop"], ["release", "list"]])
def test_an_empty_server_is_a_usage_error_not_the_environments_server(
    command: list[str],
) -> None:
    result = CliRunner().invoke(
        fleet, [*command, "--server", "", "--token", "x"], env={"FLEET_SERVER": REFUSED}
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--server'" in result.stderr
    assert "127.0.0.1:1" not in result.output
