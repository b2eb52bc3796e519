"""The shared parameter types refuse what their ranges cannot."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from fleet_core.params import FiniteFloatRange


@click.command()
@click.option("--every", type=FiniteFloatRange(0.1, 3600), default=1.0)
def command(every: float) -> None:
    click.echo(repr(every))


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity", "1e999"])
def test_a_number_that_is_not_finite_is_a_usage_error(text: str) -> None:
    result = CliRunner().invoke(command, ["--every", text])
    assert result.exit_code == 2 and "--every" in result.output, result.output


@pytest.mark.parametrize(("text", "code"), [("0.5", 0), ("3600", 0), ("0.05", 2), ("4000", 2)])
def test_the_range_still_holds(text: str, code: int) -> None:
    assert CliRunner().invoke(command, ["--every", text]).exit_code == code
