"""Command-line parameter types every command shares."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """A number in a range, as ``click.FloatRange``, and finite: ``nan`` passes every range
    comparison and ``inf`` means nothing as a time or a rate, so both are refused here."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
