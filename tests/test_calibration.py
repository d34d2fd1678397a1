"""The claims' rules calibrated by simulation on the demo's own grid and noise (tests/data/demo_profile.json: per
configuration the mean, one seed's evaluation error and the training-seed spread measured by `make demo-seeds`,
written by `ldmscale study calibrate demo --profile-out`). Where size has no effect at matched cost, a rule may say
"holds" in at most 5% of 500 studies; at the demo's measured effects it must say "holds" in at least 80%.

Claims 2, 5 and 6 need downstream rows the demo does not have: the demo's rows are reused as a super-resolution task
(the same grid, values and noise) and as a distilled student of the largest size (its DDIM values at 1, 2, 4, 8 steps,
one unguided call a step)."""

import json
from collections import Counter

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
    lcm = [dict(p, sampler="lcm", distilled=True, model_calls_per_image=p["steps"]) for p in last
           if p["size"] == largest and p["sampler"] == "ddim" and p["steps"] <= 8]
    return profile + sr + lcm


EXTENDED = with_downstream(PROFILE)


def rate(counts: Counter) -> float:
    return counts["holds"] / STUDIES


@pytest.mark.parametrize("seeds", [1, 3])
def test_no_rule_says_holds_in_more_than_5_percent_of_studies_where_size_has_no_effect(seeds):
    r = calibrate.rates(EXTENDED, M, CURVE, "null", seeds, STUDIES, seed=seeds)
    assert {c: rate(v) for c, v in r.items()} == {c: pytest.approx(rate(v)) for c, v in r.items()}
    assert all(rate(v) <= 0.05 for v in r.values()), {c: dict(v) for c, v in r.items()}


def test_the_rules_find_the_demos_measured_effects():
    r = calibrate.rates(EXTENDED, M, CURVE, "measured", 3, STUDIES, seed=7)
    holds = {c: rate(v) for c, v in r.items()}
    assert all(holds[c] >= 0.8 for c in POWERED), holds


# the claims whose effect the demo measured: with three seeds per size the rules must find it in >= 80% of studies
POWERED = (3,)
