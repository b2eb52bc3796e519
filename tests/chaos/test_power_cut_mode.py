"""How FLEET_POWER_CUTS and FLEET_POWER_CUT_SEED choose the power-cut tests' cuts: a bad value
is refused by name, a seed repeats its choices, and second cuts are distinct and in range."""

from __future__ import annotations

import random

import pytest

from tests.chaos.conftest import (
    CI_SECOND_CUTS,
    CI_SEED,
    LONG_SEQUENCES,
    PowerCutMode,
    power_cut_mode,
    second_cuts,
)


def test_ci_is_the_default_with_a_fixed_seed() -> None:
    assert power_cut_mode({}) == PowerCutMode("ci", CI_SEED)
    assert power_cut_mode({"FLEET_POWER_CUTS": " ci "}) == PowerCutMode("ci", CI_SEED)
    assert power_cut_mode({"FLEET_POWER_CUT_SEED": "42"}) == PowerCutMode("ci", 42)
    assert PowerCutMode("ci", CI_SEED).second_cuts(50) == CI_SECOND_CUTS


def test_long_draws_a_seed_unless_given_one() -> None:
    seeds = {power_cut_mode({"FLEET_POWER_CUTS": "long"}).seed for _ in range(8)}
    assert len(seeds) > 1, seeds
    given = power_cut_mode({"FLEET_POWER_CUTS": "long", "FLEET_POWER_CUT_SEED": "1234"})
    assert given == PowerCutMode("long", 1234)
    assert given.second_cuts(50) == LONG_SEQUENCES - 50
    assert given.second_cuts(LONG_SEQUENCES + 1) == 0


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FLEET_POWER_CUTS": "longer"}, "FLEET_POWER_CUTS='longer'"),
        ({"FLEET_POWER_CUT_SEED": "-3"}, "FLEET_POWER_CUT_SEED='-3'"),
        ({"FLEET_POWER_CUTS": "long", "FLEET_POWER_CUT_SEED": "0x10"}, "'0x10'"),
    ],
)
def test_a_bad_value_is_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(pytest.UsageError, match=named):
        power_cut_mode(environ)


def test_a_seed_repeats_its_choices_and_another_seed_changes_them() -> None:
    lengths = {i: 3 + i % 7 for i in range(40)}

    def choose(seed: int) -> list[tuple[int, int]]:
        rng = PowerCutMode("long", seed).rng("grub install+commit")
        return second_cuts(rng, list(lengths), lengths.__getitem__, 50)

    assert choose(5) == choose(5)
    assert choose(5) != choose(6)
    assert PowerCutMode("long", 5).rng("a").random() != PowerCutMode("long", 5).rng("b").random()


def test_second_cuts_are_distinct_in_range_and_stop_when_all_are_taken() -> None:
    lengths = {2: 3, 5: 0, 9: 2}
    rng = random.Random(0)  # noqa: S311 (test data)
    some = second_cuts(rng, list(lengths), lengths.__getitem__, 4)
    assert len(some) == len(set(some)) == 4
    assert all(first in (2, 9) and 0 <= second < lengths[first] for first, second in some)
    every = second_cuts(rng, list(lengths), lengths.__getitem__, 100)
    assert every == [(2, 0), (2, 1), (2, 2), (9, 0), (9, 1)]
    assert second_cuts(rng, [], lengths.__getitem__, 10) == []
