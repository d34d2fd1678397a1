"""The paper's claims checked on hand-made results tables: each rule must be able to say "holds", "does not hold" and
"not measured", for the right reason, at matched cost, with seeds and without standard errors."""

import math

import pytest

from ldmscale.analysis import claims, stats
from ldmscale.analysis import scaling as analysis

M = "fd-classifier"
CURVE = ("ddim", 20, 3.0)
STEPS = (1, 2, 4, 8, 16, 32, 64)


def row(size, norm, sampler, steps, value, std=0.5, images=1000, g=3.0, metric=M, calls=None, seed=0, **kw):
    return {
        "size": size,
        "norm_cost": norm,
        "sampler": sampler,
        "steps": steps,
        "guidance": g,
        metric: value,
        f"{metric}_std": std,
        "sampling_cost": norm * steps,
        "images_seen": images,
        "train_flops": 3 * images * norm * 1e9,
        "checkpoint": f"step-{images}",
        "latency_ms_per_image": steps,
        "model_calls_per_image": 2 * steps if calls is None else calls,
        "task": "text-to-image",
        "train_seed": seed,
        **kw,
    }


def grid(size, norm, values, sampler="ddim", **kw):
    """Final-checkpoint rows at 1..64 steps: executed cost = norm x 2 x steps (guided)."""
    return [row(size, norm, sampler, s, v, **kw) for s, v in zip(STEPS, values)]


def curve(size, norm, values, images=(10, 20, 40, 80, 160, 320), std=1.0):
    return [row(size, norm, *CURVE[:2], v, std, images=n) for n, v in zip(images, values)]


# executed costs: small 0.2 .. 12.8, large 2 .. 128; they overlap on [2, 12.8]
SMALL = [40, 30, 25, 22, 21, 20.5, 20.3]
LARGE_CROSS = [80, 40, 20, 14, 12, 10, 9]  # worse than small at cost 2, better at 12.8
CROSS = grid("small", 0.1, SMALL) + grid("large", 1.0, LARGE_CROSS)


def test_claim3_holds_when_the_smaller_wins_low_and_the_larger_at_the_top_of_the_common_range():
    v = claims.claim3(CROSS, M)
    assert v.verdict == "holds", v.reason
    (t,) = v.data["tests"]
    assert (t["smaller"], t["larger"], t["sampler"]) == ("small", "large", "ddim")
    # at executed cost 2 (large at 1 step) small is read off its curve between 1.6 (22) and 3.2 (21)
    low = t["small_best"]
    assert low["x"] == pytest.approx(2.0) and low["a"] == pytest.approx(22 - math.log2(1.25))
    # at the top of the common range (12.8, small's 64 steps) large is between 8 (20) and 16 (14)
    assert t["top"]["x"] == pytest.approx(12.8) and t["top"]["b"] == pytest.approx(20 - 6 * 0.678072, abs=1e-4)
    assert t["p_adjusted"] == t["p"] < stats.ALPHA
    assert "small -> large with ddim: at executed cost 2 small 21.68 ± 0.5" in v.evidence
    assert v.noise == "" and claims.check_claims(CROSS, M, CURVE)[2].noise == "evaluation noise only (1 training seed)"


def test_claim3_fails_when_the_larger_wins_even_at_the_cheapest_common_budget():
    rows = grid("small", 0.1, [90, 80, 70, 60, 50, 45, 42]) + grid("large", 1.0, [30, 20, 15, 12, 10, 9, 8])
    v = claims.claim3(rows, M)
    assert v.verdict == "does not hold"
    assert v.reason.startswith("in every pair the larger size is better even at the cheapest budget where both run")


def test_claim3_is_not_measured_when_the_crossover_is_within_noise():
    rows = grid("small", 0.1, SMALL, std=30) + grid("large", 1.0, LARGE_CROSS, std=30)
    v = claims.claim3(rows, M)
    assert v.verdict == "not measured"
    assert "no smaller size is better at a small budget and the larger at the top beyond noise" in v.reason


def test_claim3_ignores_a_grid_that_only_looks_like_a_crossover():
    """Quality a function of executed cost alone: the old envelope rule called this a crossover (small's point just
    under a budget against large's point far below it); at matched cost there is nothing."""
    f = lambda c: 20 + 30 / c**0.5  # noqa: E731
    rows = grid("small", 0.1, [f(0.2 * s) for s in STEPS]) + grid("large", 1.0, [f(2.0 * s) for s in STEPS])
    assert analysis.crossover(rows[:7], rows[7:], M)["kind"] == "smaller wins at every budget"  # interpolation bias
    v = claims.claim3(rows, M)
    assert v.verdict == "not measured", v.evidence


def test_a_value_without_standard_error_is_never_significant():
    rows = grid("small", 0.1, SMALL, std=None) + grid("large", 1.0, LARGE_CROSS, std=None)
    v = claims.claim3(rows, M)
    assert v.verdict == "not measured"
    assert "(no standard error)" in v.evidence
    assert stats.compare(1.0, None, 5.0, 1.0, M) == {"diff": 4.0, "se": None, "z": 0.0, "df": None, "p": 1.0}


def test_claim4_needs_the_crossover_with_each_sampler():
    ddpm = [dict(r, sampler="ddpm") for r in CROSS]
    assert claims.claim4(CROSS + ddpm, M).verdict == "holds"
    flat = [
        dict(r, sampler="dpmsolver++")
        for r in grid("small", 0.1, SMALL, std=30) + grid("large", 1.0, LARGE_CROSS, std=30)
    ]
    v = claims.claim4(CROSS + ddpm + flat, M)
    assert v.verdict == "not measured" and v.reason == "within noise with dpmsolver++"
    bad = [
        dict(r, sampler="dpmsolver++")
        for r in grid("small", 0.1, [90, 80, 70, 60, 50, 45, 42]) + grid("large", 1.0, [30, 20, 15, 12, 10, 9, 8])
    ]
    v = claims.claim4(CROSS + ddpm + bad, M)
    assert v.verdict == "does not hold" and v.evidence == (
        "ddim: crossover beyond noise; ddpm: crossover beyond noise; dpmsolver++: contradicted"
    )
    assert claims.claim4(CROSS, M).verdict == "not measured"


# training compute: small 3e9 .. 9.6e10, large 3e10 .. 1.2e11; they overlap on [3e10, 9.6e10]
def test_claim1_holds_when_the_larger_is_better_at_the_largest_matched_compute():
    rows = curve("small", 0.1, [50, 40, 33, 29, 27, 26]) + curve("large", 1.0, [45, 30, 18], images=(10, 20, 40))
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "holds", v.reason
    (p,) = v.data["pairs"]
    assert p["flops"] == pytest.approx(9.6e10) and p["a"] == pytest.approx(30 - 12 * 0.678072, abs=1e-4)
    assert p["b"] == 26 and p["z"] == pytest.approx((26 - p["a"]) / 2**0.5, rel=1e-6)
    assert (
        "at 9.6e+10 training FLOPs (the largest both reached; large before the end of its run) large 21.86 ± 1 "
        "vs small 26 ± 1: z = 2.9"
    ) in v.evidence


def test_claim1_fails_when_the_smaller_is_better_at_the_largest_matched_compute():
    # small trained to large's final compute (400 images at a tenth of the FLOPs): both at the end of their runs
    small = curve("small", 0.1, [50, 40, 33, 29, 27, 26, 24], images=(10, 20, 40, 80, 160, 320, 400))
    rows = small + curve("large", 1.0, [60, 45, 35], images=(10, 20, 40))
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "does not hold" and "the bigger model has not won at this study's compute" in v.reason
    assert "(the largest both reached; both final checkpoints) large 35 ± 1 vs small 24 ± 1: z = -7.8" in v.evidence
    # the same comparison with the larger before the end of its run is handicapped by it: it does not count
    mid = curve("small", 0.1, [50, 40, 33, 29, 27, 26]) + curve("large", 1.0, [60, 45, 35], images=(10, 20, 40))
    v = claims.claim1(mid, M, CURVE)
    assert v.verdict == "not measured" and "train small to 1.2e+11 FLOPs (large's final compute)" in v.reason


def test_claim1_fails_when_a_size_gets_worse_with_training():
    rows = curve("small", 0.1, [30, 32, 35, 38, 40, 45]) + curve("large", 1.0, [45, 30, 18], images=(10, 20, 40))
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "does not hold" and v.reason.startswith("small gets worse with training compute")


def test_claim1_is_not_measured_without_a_common_training_compute_and_says_what_would_measure_it():
    rows = curve("small", 0.1, [50, 40, 33], images=(10, 20, 40)) + curve(
        "large", 1.0, [45, 30, 18], images=(10, 20, 40)
    )
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "not measured"
    assert v.reason == (
        "no two sizes were evaluated at a common training compute: train small to 1.2e+11 FLOPs "
        "(large's final compute) to compare them where large is best"
    )
    assert claims.claim1(curve("small", 0.1, [40, 30, 25]), M, CURVE).verdict == "not measured"


def test_seeds_are_averaged_and_their_spread_enters_the_error():
    rows = [row("s", 0.1, "ddim", 4, v, std=1.0, seed=k) for k, v in enumerate((10.0, 14.0, 12.0))]
    (agg,) = stats.aggregate_seeds(rows)
    assert agg[M] == 12.0 and agg["n_seeds"] == 3 and agg[f"{M}_seed_sd"] == 2.0
    assert agg[f"{M}_std"] == pytest.approx((4.0 / 3) ** 0.5)  # between-seed variance 4 > evaluation variance 1
    assert agg[f"{M}_df"] == 2
    # an error from few seeds makes the test a Student t (Welch's degrees of freedom): 2.5 errors is not enough
    c = stats.compare(10.0, 1.0, 12.5, 1.0, M, 2, 2)
    assert c["z"] == pytest.approx(2.5 / 2**0.5) and c["df"] == pytest.approx(4.0)
    assert c["p"] == pytest.approx(0.0759, abs=1e-4) and stats.compare(10.0, 1.0, 12.5, 1.0, M)["p"] == pytest.approx(
        0.0385, abs=1e-4
    )
    close = [row("s", 0.1, "ddim", 4, v, std=3.0, seed=k) for k, v in enumerate((10.0, 10.5))]
    (agg,) = stats.aggregate_seeds(close)
    assert agg[f"{M}_std"] == pytest.approx((9.0 / 2) ** 0.5)  # never below the evaluation noise of the mean
    assert stats.noise_of([agg]) == "training-seed spread (2 seeds) and evaluation noise"


def test_two_seeds_of_one_size_presented_as_two_sizes_hold_no_claim():
    """A negative control: the same size twice (its seeds as "sizes" of equal cost) must not give a crossover."""
    a = grid("a", 0.1, SMALL) + curve("a", 0.1, [50, 40, 33, 29, 27, 26])
    b = [dict(r, size="b", norm_cost=0.1000001, **{M: r[M] + 0.3}) for r in a]
    verdicts = claims.check_claims(a + b, M, CURVE)
    assert [v.verdict for v in verdicts] == ["not measured"] * 6


def sr_rows(values_small, values_large, std=0.1):
    return [
        dict(r, task="super-resolution")
        for r in grid("small", 0.1, values_small, metric="psnr", std=std)
        + grid("large", 1.0, values_large, metric="psnr", std=std)
    ]


PRE = curve("small", 0.1, [50, 40, 33, 29, 27, 26]) + curve("large", 1.0, [45, 30, 18], images=(10, 20, 40))


def test_claim2_needs_a_significant_supporting_pair_and_no_contradiction():
    tm = {"super-resolution": "psnr"}
    v = claims.claim2(PRE + sr_rows([15, 16, 17, 17, 17, 18, 18], [12, 14, 16, 18, 20, 21, 22]), M, CURVE, tm)
    assert v.verdict == "holds", v.reason
    v = claims.claim2(PRE + sr_rows([15, 16, 17, 17, 17, 18, 23], [12, 14, 16, 18, 20, 21, 22]), M, CURVE, tm)
    assert (
        v.verdict == "does not hold"
        and v.reason
        == "large is better pretrained than small but worse at super-resolution fidelity (psnr) beyond noise"
    )
    v = claims.claim2(PRE + sr_rows([15, 16, 17, 17, 17, 18, 22], [12, 14, 16, 18, 20, 21, 22.2]), M, CURVE, tm)
    assert v.verdict == "not measured" and v.reason.startswith("no pair of sizes differs beyond noise")
    alike = [dict(r, **{M: 26.0}) if r["size"] == "large" else r for r in PRE]  # pretrained alike: no evidence
    v = claims.claim2(alike + sr_rows([15, 16, 17, 17, 17, 18, 18], [12, 14, 16, 18, 20, 21, 22]), M, CURVE, tm)
    assert v.verdict == "not measured"
    assert claims.claim2(PRE, M, CURVE, tm).verdict == "not measured"


def test_claims_2_and_5_give_a_verdict_per_metric_family():
    """Super-resolution is judged on realism (a Frechet distance) and fidelity (PSNR): an upscaler better at one and
    worse at the other is named in both families, and the contradiction decides claim 2."""
    tm = {"super-resolution": ("fd-classifier", "psnr")}
    real = [
        dict(r, task="super-resolution", psnr=None)
        for r in grid("small", 0.1, [60, 50, 45, 42, 41, 40, 40]) + grid("large", 1.0, [80, 50, 40, 35, 30, 28, 27])
    ]  # the large upscaler more realistic at the top
    faithful = sr_rows([15, 16, 17, 17, 17, 18, 23], [12, 14, 16, 18, 20, 21, 22])  # ... and less faithful
    v = claims.claim2(PRE + real + [dict(r, **{M: None}) for r in faithful], M, CURVE, tm)
    assert v.verdict == "does not hold"
    assert v.evidence.startswith(
        "super-resolution realism (fd-classifier): holds; super-resolution fidelity (psnr): does not hold; "
    )
    v = claims.claim5(PRE + real + [dict(r, **{M: None}) for r in faithful], tm)
    assert [part.split(":")[0] for part in v.evidence.split("; super-resolution ")] == [
        "super-resolution realism (fd-classifier)",
        "fidelity (psnr)",
    ]


def test_claim5_downstream_crossover_at_small_step_counts():
    tm = {"super-resolution": "psnr"}
    # higher is better; the small upscaler is better at low cost, the large one at the top of the range (< 20 steps)
    small, large = [20, 22, 23, 23.5, 23.8, 99, 99], [10, 40, 41, 42, 43, 99, 99]
    assert claims.claim5(sr_rows(small, large), tm).verdict == "holds"
    assert (
        claims.claim5(sr_rows([10, 11, 12, 12, 12, 12, 12], [20, 24, 26, 27, 28, 28, 28]), tm).verdict
        == "does not hold"
    )
    assert claims.claim5(CROSS, tm).verdict == "not measured"


def test_claim6_compares_every_distilled_step_count_at_executed_cost_and_goes_either_way():
    plain = grid("small", 0.1, SMALL) + grid("large", 1.0, LARGE_CROSS)

    # an LCM step is one unguided call: executed cost 1, 2, 4, 8 for the large student
    def lcm(values):
        return [row("large", 1.0, "lcm", s, v, calls=s, distilled=True) for s, v in zip((1, 2, 4, 8), values)]

    v = claims.claim6(plain + lcm([60, 30, 25, 22]), M)
    assert v.verdict == "holds"  # small (about 22 at cost 1-8) is better than the 1- and 2-step student
    assert "distilled large at 1 steps (executed cost 1)" in v.evidence
    v = claims.claim6(plain + lcm([12, 10, 9, 8]), M)
    assert v.verdict == "does not hold" and "distillation removes the crossover" in v.reason
    v = claims.claim6(plain + lcm([22.6, 21.2, 20.8, 20.4]), M)
    assert v.verdict == "not measured"
    assert claims.claim6(plain, M).verdict == "not measured"


def test_check_claims_gives_six_verdicts_in_order_and_one_seed_cannot_settle_run_against_run_claims():
    vs = claims.check_claims(CROSS + PRE, M, CURVE)
    assert [v.claim for v in vs] == [1, 2, 3, 4, 5, 6]
    # claim 1 compares one run's last checkpoint with another's: one seed leaves training noise out of the error
    assert [v.verdict for v in vs] == [
        "not measured",
        "not measured",
        "holds",
        "not measured",
        "not measured",
        "not measured",
    ]
    assert vs[0].reason.startswith(
        "too few seeds to tell: with one training seed these comparisons of one run "
        "against another leave out training noise"
    )
    assert 'with seeds, the rule says "holds"' in vs[0].reason
    # two seeds a little apart: the same claim holds, with the spread between seeds in its errors
    seeds = CROSS + PRE + [dict(r, train_seed=1, **{M: r[M] + 0.5}) for r in CROSS + PRE]
    vs = claims.check_claims(seeds, M, CURVE)
    assert [v.verdict for v in vs][:3] == ["holds", "not measured", "holds"]
    assert vs[0].noise == "training-seed spread (2 seeds) and evaluation noise"


def test_holm_and_the_threshold():
    from statsmodels.stats.multitest import multipletests

    assert stats.ALPHA == pytest.approx(0.02275, abs=1e-5)
    for ps in ([0.001, 0.01, 0.02], [0.3, 0.004, 0.011, 0.02, 0.0001], [0.5], [0.01, 0.01, 0.2]):
        reject, adjusted, _, _ = multipletests(ps, alpha=stats.ALPHA, method="holm")
        assert stats.holm(ps) == (list(reject), pytest.approx(list(adjusted)))
    assert stats.holm([0.001, 0.01, 0.02]) == ([True, True, True], [pytest.approx(0.003), 0.02, 0.02])
    assert stats.holm([0.01, 0.02])[0] == [True, True] and stats.holm([0.015, 0.02])[0] == [False, False]


def test_metric_agreement_is_oriented():
    rows = [{"fd-classifier": v, "fid": 2 * v + 1, "caption-accuracy": 1 / v} for v in (10, 20, 30, 40)]
    assert claims.metric_agreement(rows, "fd-classifier", "fid") == {
        "a": "fd-classifier",
        "b": "fid",
        "spearman": 1.0,
        "points": 4,
    }
    assert claims.metric_agreement(rows, "fd-classifier", "caption-accuracy")["spearman"] == pytest.approx(1.0)
    rows[0]["fid"] = 1000
    assert claims.metric_agreement(rows, "fd-classifier", "fid")["spearman"] == pytest.approx(-0.2)


def test_matched_crossover_kinds():
    assert (
        analysis.crossover(grid("s", 0.1, [90] * 7), grid("l", 1.0, [10] * 7), M)["kind"]
        == "larger wins wherever both run"
    )
    assert (
        analysis.crossover(grid("s", 0.1, [1] * 7), grid("l", 1.0, [9] * 7), M)["kind"]
        == "smaller wins at every budget"
    )
    x = analysis.crossover(grid("small", 0.1, SMALL), grid("large", 1.0, LARGE_CROSS), M)
    assert (x["kind"], x["crossover"], x["range"]) == ("crossover", 8.0, (2.0, 12.8))


def test_points_with_fewer_images_than_the_metric_has_dimensions_do_not_decide():
    """16 images a point of a 64-dimensional Frechet distance: biased, and noisier than the bootstrap shows, so a
    verdict the rule would give becomes "not measured" and says what it would have been (issue 26)."""
    rows = [dict(r, num_images=16) for r in CROSS]
    assert claims.check_claims(rows, M, CURVE, feature_dims={M: 16})[2].verdict == "holds"  # 16 images, 16 dims
    v = claims.check_claims(rows, M, CURVE, feature_dims={M: 64})[2]
    assert v.verdict == "not measured"
    assert v.reason.startswith(
        f"too few images to tell: {M} on 16 images a point, fewer than its 64 feature "
        'dimensions, is biased and noisier than its ± shows (with enough, the rule says "holds"'
    )
    assert claims.check_claims(rows, M, CURVE, feature_dims={"other": 64})[2].verdict == "holds"
