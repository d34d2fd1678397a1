"""The claims' rules calibrated by simulation on the demo's own grid and noise (tests/data/demo_profile.json: per
configuration the mean, one seed's evaluation error and the training-seed spread that `make demo-seeds` measured,
written by `ldmscale study calibrate demo --profile-out`). Where size has no effect at matched cost a rule may say
"holds" in at most 5% of 500 studies; at the demo's measured effects it should say "holds" in at least 80%.

Claims 2, 5 and 6 need downstream rows the demo does not have: its rows are reused as a super-resolution task (the
same grid, values and noise) and as a distilled student of the largest size (its DDIM values at 1, 2, 4, 8 steps, one
unguided call a step). The counts are pinned: they move only when a rule or the simulation changes."""

import json

import pytest
from conftest import ROOT

from ldmscale.analysis import calibrate

M = "fd-classifier"
CURVE = ("ddim", 8, 12.0)
STUDIES = 500
PROFILE = json.loads((ROOT / "tests" / "data" / "demo_profile.json").read_text())


def with_downstream(profile: list[dict]) -> list[dict]:
    """The demo's profile plus a super-resolution task on every size and an LCM student of the largest size."""
    final = {}
    for p in profile:
        final[p["size"]] = max(final.get(p["size"], 0), p["images_seen"])
    last = [p for p in profile if p["images_seen"] == final[p["size"]]]
    sr = [dict(p, task="super-resolution") for p in last if p["sampler"] == "ddim"]
    largest = max(last, key=lambda p: p["norm_cost"])["size"]
    lcm = [
        dict(p, sampler="lcm", distilled=True, model_calls_per_image=p["steps"])
        for p in last
        if p["size"] == largest and p["sampler"] == "ddim" and p["steps"] <= 8
    ]
    return profile + sr + lcm


EXTENDED = with_downstream(PROFILE)


def holds(world: str, seeds: int, seed: int) -> dict[int, int]:
    r = calibrate.rates(EXTENDED, M, CURVE, world, seeds, STUDIES, seed=seed)
    return {c: v["holds"] for c, v in r.items()}


def test_with_seeds_no_rule_says_holds_in_more_than_5_percent_of_studies_where_size_has_no_effect():
    false = holds("null", 3, seed=3)
    assert all(n <= 0.05 * STUDIES for n in false.values()), false
    assert false == GOLDEN_NULL_3


def test_with_one_seed_no_rule_says_holds_in_more_than_5_percent_either():
    """One seed's errors hold evaluation noise only. Claims 3-5 need two opposite differences, which a run that trained
    better everywhere does not fake; claims 1, 2 and 6 compare one run with another in one direction, and without
    seeds they are "not measured" (in these simulations they said "holds" falsely in 17% and 45% of studies before
    that rule)."""
    false = holds("null", 1, seed=1)
    assert all(n <= 0.05 * STUDIES for n in false.values()), false
    assert false == GOLDEN_NULL_1


@pytest.mark.parametrize("seeds", [3, 5])
def test_power_at_the_demos_measured_effects(seeds):
    """Claim 3 (the c16 -> c32 crossover) at the demo's effects: 80% needs 5 seeds of the demo's training noise (3 give
    about 70%); claim 4 needs each sampler's crossover and about 10 seeds. The demo measured no effect for claim 1."""
    power = holds("measured", seeds, seed=7)
    assert power == GOLDEN_POWER[seeds]
    if seeds == 5:
        assert power[3] >= 0.8 * STUDIES


GOLDEN_NULL_3 = {1: 6, 2: 0, 3: 0, 4: 0, 5: 0, 6: 13}
GOLDEN_NULL_1 = {1: 0, 2: 0, 3: 2, 4: 0, 5: 0, 6: 0}
GOLDEN_POWER = {3: {1: 0, 2: 0, 3: 315, 4: 76, 5: 0, 6: 500}, 5: {1: 0, 2: 0, 3: 485, 4: 257, 5: 0, 6: 500}}
