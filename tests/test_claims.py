"""The paper's claims checked on hand-made results tables: each check must be able to say "holds", "does not hold"
and "not measured", for the right reason."""

import pytest

from ldmscale.analysis import claims
from ldmscale.analysis import scaling as analysis

M = "fd-classifier"
CURVE = ("ddim", 20, 3.0)


def row(size, norm, sampler, steps, value, std=1.0, images=40, g=3.0, metric=M, **kw):
    return {"size": size, "norm_cost": norm, "sampler": sampler, "steps": steps, "guidance": g, metric: value,
            f"{metric}_std": std, "sampling_cost": norm * steps, "images_seen": images,
            "train_flops": 3 * images * norm * 1e9, "checkpoint": f"step-{images}", "latency_ms_per_image": steps,
            "model_calls_per_image": 2 * steps, "task": "text-to-image", **kw}


def curve(size, norm, values, std=1.0):
    return [row(size, norm, *CURVE[:2], v, std, images=n) for n, v in zip((10, 20, 40), values)]


def grid(size, norm, values, sampler="ddim", **kw):
    """Final-checkpoint rows at steps 2, 8, 32."""
    return [row(size, norm, sampler, s, v, **kw) for s, v in zip((2, 8, 32), values)]


def verdict(v):
    return v.verdict, v.reason


def test_claim1_holds_when_every_size_improves_and_the_largest_wins():
    rows = curve("small", 0.1, [40, 30, 25]) + curve("large", 1.0, [50, 25, 15])
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "holds", v.reason
    assert "large beats small by 7.1 standard errors" in v.evidence


def test_claim1_fails_when_the_largest_is_not_better_beyond_noise():
    rows = curve("small", 0.1, [40, 30, 25]) + curve("large", 1.0, [50, 30, 24])
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "does not hold"
    assert "large (24 ± 1) is not better than small (25 ± 1) by two standard errors" in v.reason


def test_claim1_fails_when_a_size_gets_worse_with_training():
    rows = curve("small", 0.1, [40, 30, 45]) + curve("large", 1.0, [50, 25, 15])
    v = claims.claim1(rows, M, CURVE)
    assert v.verdict == "does not hold"
    assert v.reason.startswith("small does not improve with training: checkpoint 3 (45 ± 1) is worse than checkpoint 2")


def test_claim1_not_measured_with_one_size():
    assert claims.claim1(curve("small", 0.1, [40, 30, 25]), M, CURVE).verdict == "not measured"


# small wins at small budgets (costs 0.2, 0.8), large from cost 8 on: a crossover at 8
CROSS = grid("small", 0.1, [40, 30, 28], std=0.5) + grid("large", 1.0, [60, 20, 10], std=0.5)


def test_claim3_holds_with_a_crossover_and_its_interval():
    v = claims.claim3(CROSS, M)
    assert v.verdict == "holds"
    (x,) = v.data["crossovers"]
    assert (x["smaller"], x["larger"], x["crossover"]) == ("small", "large", 8.0)
    assert x["share"] == 1.0 and x["interval"] == (8.0, 8.0)
    assert "at 3.2 small 28 ± 0.5 (ddim 32) beats large 60 ± 0.5" in v.evidence


def test_claim3_fails_when_the_larger_model_wins_wherever_both_run():
    rows = grid("small", 0.1, [80, 70, 65]) + grid("large", 1.0, [60, 20, 10])
    v = claims.claim3(rows, M)
    assert v.verdict == "does not hold" and v.reason == "no smaller size beats a larger one at any budget where both run"


def test_claim3_fails_when_the_smaller_model_wins_everywhere():
    rows = grid("small", 0.1, [40, 30, 5]) + grid("large", 1.0, [60, 20, 10])
    v = claims.claim3(rows, M)
    assert v.verdict == "does not hold" and "the smallest size small is best at every budget" in v.reason


def test_claim3_fails_when_the_crossover_is_noise():
    rows = grid("small", 0.1, [40, 30, 28], std=8) + grid("large", 1.0, [60, 29, 27], std=8)
    v = claims.claim3(rows, M)
    assert v.verdict == "does not hold" and v.reason.startswith("crossovers are within noise")


def test_claim4_per_sampler():
    ddpm = [dict(r, sampler="ddpm") for r in CROSS]
    assert claims.claim4(CROSS + ddpm, M).verdict == "holds"
    bad = [dict(r, sampler="dpmsolver++") for r in grid("small", 0.1, [40, 30, 5]) + grid("large", 1.0, [60, 20, 10])]
    v = claims.claim4(CROSS + ddpm + bad, M)
    assert v.verdict == "does not hold" and v.reason == "no robust crossover with dpmsolver++"
    assert claims.claim4(CROSS, M).verdict == "not measured"


def sr_rows(values_small, values_large):
    return [dict(r, task="super-resolution") for r in grid("small", 0.1, values_small, metric="psnr", std=0.1)
            + grid("large", 1.0, values_large, metric="psnr", std=0.1)]


def test_claim2_downstream_follows_pretraining():
    pre = curve("small", 0.1, [40, 30, 25]) + curve("large", 1.0, [50, 25, 15])
    tm = {"super-resolution": "psnr"}
    assert claims.claim2(pre + sr_rows([15, 17, 18], [12, 20, 22]), M, CURVE, tm).verdict == "holds"
    v = claims.claim2(pre + sr_rows([15, 17, 23], [12, 20, 22]), M, CURVE, tm)
    assert v.verdict == "does not hold" and v.reason == ("large is better pretrained than small but worse at "
                                                         "super-resolution (psnr 22 vs 23, 7.1 standard errors)")
    # a downstream difference within two standard errors neither shows nor refutes the claim
    v = claims.claim2(pre + sr_rows([15, 17, 22], [12, 20, 22.2]), M, CURVE, tm)
    assert v.verdict == "not measured" and v.reason == ("large is better pretrained than small, and at "
                                                        "super-resolution +1.4 standard errors (22.2 vs 22): within noise")
    assert claims.claim2(pre, M, CURVE, tm).verdict == "not measured"


def test_claim5_downstream_crossover():
    tm = {"super-resolution": "psnr"}
    assert claims.claim5(sr_rows([15, 17, 18], [12, 20, 22]), tm).verdict == "holds"
    assert claims.claim5(sr_rows([10, 11, 12], [12, 20, 22]), tm).verdict == "does not hold"
    assert claims.claim5(CROSS, tm).verdict == "not measured"


def test_claim6_distillation():
    plain = grid("small", 0.1, [40, 30, 21]) + grid("large", 1.0, [60, 20, 10])
    matched = row("large", 1.0, "lcm", 4, 20.0, distilled=True)
    assert claims.claim6(plain + [matched], M).verdict == "holds"
    beats = row("large", 1.0, "lcm", 4, 12.0, distilled=True)
    v = claims.claim6(plain + [beats], M)
    assert v.verdict == "does not hold" and "distillation moves the crossover" in v.reason
    assert claims.claim6(plain, M).verdict == "not measured"


def test_check_claims_gives_six_verdicts_in_order():
    vs = claims.check_claims(CROSS + curve("small", 0.1, [40, 30, 25]) + curve("large", 1.0, [50, 25, 15]), M, CURVE)
    assert [v.claim for v in vs] == [1, 2, 3, 4, 5, 6]
    assert [v.verdict for v in vs] == ["holds", "not measured", "holds", "not measured", "not measured", "not measured"]


def test_metric_agreement_is_oriented():
    rows = [{"fd-classifier": v, "fid": 2 * v + 1, "caption-accuracy": 1 / v} for v in (10, 20, 30, 40)]
    assert claims.metric_agreement(rows, "fd-classifier", "fid") == {"a": "fd-classifier", "b": "fid", "spearman": 1.0,
                                                                      "points": 4}
    assert claims.metric_agreement(rows, "fd-classifier", "caption-accuracy")["spearman"] == pytest.approx(1.0)
    rows[0]["fid"] = 1000
    assert claims.metric_agreement(rows, "fd-classifier", "fid")["spearman"] == pytest.approx(-0.2)


def test_crossover_kinds():
    assert analysis.crossover(grid("s", 0.1, [9, 9, 9]), grid("l", 1.0, [1, 1, 1]), M)["kind"] == \
        "larger wins wherever both run"
    assert analysis.crossover(grid("s", 0.1, [1, 1, 1]), grid("l", 1.0, [9, 9, 9]), M)["kind"] == \
        "smaller wins at every budget"
    x = analysis.crossover(grid("small", 0.1, [40, 30, 28]), grid("large", 1.0, [60, 20, 10]), M)
    assert (x["kind"], x["crossover"], x["budgets_where_smaller_wins"]) == ("crossover", 8.0, 2)
