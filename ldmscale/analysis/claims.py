"""The paper's six claims, checked on a study's results table: one verdict per claim, with its evidence.

Each check is a pure function of the rows (as study.collect makes them, one per training seed) and returns a
Verdict: "holds" (the evidence supports every part of the claim beyond noise), "does not hold" (it contradicts a
part beyond noise) or "not measured" (no rows test it, or what they show is within noise; the reason says which,
and what would measure it). The rules (docs/claims.md; calibrated by tests/test_calibration.py):

- rows of one configuration trained with several seeds are averaged, their error holding both noises
  (stats.aggregate_seeds); a value without a standard error is never significant;
- sizes are compared at matched cost only, each read off its own curve inside the range both were measured
  (stats.matched): training compute for claim 1, executed sampling cost (normalized cost x model calls) for 3-6;
- a comparison is significant when its one-sided p-value is below ALPHA (two standard errors) after Holm's
  correction over every comparison the claim looks at.
"""

from __future__ import annotations

import math

from scipy.stats import spearmanr

from ldmscale.analysis import scaling as analysis
from ldmscale.analysis import stats
from ldmscale.analysis.downstream_claims import claim2, claim5, claim6
from ldmscale.analysis.verdicts import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    PAPER_SAMPLERS,
    Verdict,
    by_cost,
    crossover_tests,
    fmt,
    judge_crossovers,
    p_worse,
    pretraining,
    row_text,
)
from ldmscale.eval import registry
from ldmscale.names import Kind

# --------------------------------------------------------------------------------- claim 1: training compute


def claim1(rows: list[dict], metric: str, curve: tuple[str, int, float]) -> Verdict:
    """Every size improves with training compute (a significant slope against log compute), and at the largest
    training compute where two sizes were both measured the larger is better (Holm over the pairs)."""
    curves = analysis.training_curves(pretraining(rows), metric, *curve)
    curves = {s: pts for s, pts in curves.items() if len(pts) >= 2}
    if len(curves) < 2:
        return Verdict(1, NOT_MEASURED, "", "needs at least two sizes with two or more evaluated checkpoints")
    sizes = by_cost([pts[0] for pts in curves.values()])
    trends = {s: stats.trend(curves[s], "train_flops", metric) for s in sizes}
    parts = [
        f"{s} {row_text(curves[s][0], metric)} -> {row_text(curves[s][-1], metric)} (trend z = {trends[s]['z']:.1f})"
        for s in sizes
    ]
    worse = [s for s in sizes if p_worse(trends[s]) < stats.ALPHA]
    flat = [s for s in sizes if not trends[s]["p"] < stats.ALPHA]
    pairs, missing = [], []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1 :]:
            a, b = (stats.curve(curves[s], "train_flops", metric) for s in (large, small))
            ov = stats.overlap(a, b)
            if ov is None:
                missing.append((small, large, a[-1][0]))
                continue
            top = stats.matched(a, b, metric)[-1]
            final = [s for s, c in ((large, a), (small, b)) if abs(top["x"] - c[-1][0]) <= stats.SAME_X * top["x"]]
            pairs.append(
                {
                    "smaller": small,
                    "larger": large,
                    "flops": top["x"],
                    "lower": ov[0],
                    "final": final,
                    "larger_final_flops": a[-1][0],
                }
                | top
            )
    # a checkpoint before the end of its run may not be annealed (a cosine run's is not), which handicaps it: a
    # comparison counts for the larger only when the smaller is at its end, against it only when the larger is
    pro = [p for p in pairs if p["smaller"] in p["final"]]
    con = [p for p in pairs if p["larger"] in p["final"]]
    for p in pairs:
        p["larger_wins"] = p["smaller_wins"] = False
    for p, w in zip(pro, stats.holm([p["p"] for p in pro])[0]):
        p["larger_wins"] = w
    for p, lo in zip(con, stats.holm([p_worse(p) for p in con])[0]):
        p["smaller_wins"] = lo
    wins = [p["larger_wins"] for p in pairs]
    for p in pairs:
        where = (
            "both final checkpoints"
            if len(p["final"]) == 2
            else " and ".join(s for s in (p["larger"], p["smaller"]) if s not in p["final"])
            + " before the end of its run"
        )
        parts.append(
            f"at {p['flops']:.3g} training FLOPs (the largest both reached; {where}) {p['larger']} "
            f"{fmt(p['a'], p['a_std'])} vs {p['smaller']} {fmt(p['b'], p['b_std'])}: z = {p['z']:.1f}"
        )
    data = {
        "trends": trends,
        "pairs": pairs,
        "unmatched": [{"smaller": s, "larger": large, "needed_flops": f} for s, large, f in missing],
    }
    evidence = "; ".join(parts)
    missing += [(p["smaller"], p["larger"], p["larger_final_flops"]) for p in pairs if p["larger"] not in p["final"]]
    need = "; ".join(
        f"train {s} to {f:.3g} FLOPs ({large}'s final compute) to compare them where {large} is best"
        for s, large, f in missing
    )
    if worse:
        return Verdict(
            1,
            FAILS,
            evidence,
            "; ".join(f"{s} gets worse with training compute (trend z = {trends[s]['z']:.1f})" for s in worse),
            data,
        )
    if not pairs:
        return Verdict(
            1, NOT_MEASURED, evidence, f"no two sizes were evaluated at a common training compute: {need}", data
        )
    data["unmatched"] = [{"smaller": s, "larger": large, "needed_flops": f} for s, large, f in missing]
    if any(wins):
        if flat:
            return Verdict(
                1,
                NOT_MEASURED,
                evidence,
                "the larger model wins at matched compute, but the improvement "
                f"of {', '.join(flat)} with training compute is within noise",
                data,
            )
        return Verdict(1, HOLDS, evidence, "", data)
    if con and all(p["smaller_wins"] for p in con):
        return Verdict(
            1,
            FAILS,
            evidence,
            "at the largest training compute both reached, with the larger size at the "
            "end of its run, the smaller is better in every pair: the bigger model has not won at this "
            "study's compute" + (f"; {need}" if need else ""),
            data,
        )
    return Verdict(
        1,
        NOT_MEASURED,
        evidence,
        "at the largest training compute both reached, no larger size is better "
        "beyond noise after correcting for the pairs tested" + (f"; {need}" if need else ""),
        data,
    )


# --------------------------------------------------------------------------------- claims 3, 4: crossovers (5 and the
# downstream claims 2, 6: analysis/downstream_claims.py)


def claim3(rows: list[dict], metric: str) -> Verdict:
    return judge_crossovers(3, crossover_tests(pretraining(rows), metric))


def claim4(rows: list[dict], metric: str) -> Verdict:
    t2i = pretraining(rows)
    tests = [t for t in crossover_tests(t2i, metric) if t["sampler"] in PAPER_SAMPLERS]
    present = sorted({t["sampler"] for t in tests})
    if len(present) < 2:
        return Verdict(4, NOT_MEASURED, "", "needs at least two of DDIM, DDPM and DPM-Solver++ measured on two sizes")
    overall = judge_crossovers(4, tests)  # one family: Holm over every pair and sampler
    per = {s: [t for t in tests if t["sampler"] == s] for s in present}
    ok = [s for s in present if any(t["significant"] for t in per[s])]
    bad = [s for s in present if all(t["contradicted"] for t in per[s])]
    evidence = "; ".join(
        f"{s}: " + ("crossover beyond noise" if s in ok else "contradicted" if s in bad else "within noise")
        for s in present
    )
    if len(ok) == len(present):
        return Verdict(4, HOLDS, evidence, "", overall.data)
    if bad:
        return Verdict(
            4,
            FAILS,
            evidence,
            f"with {', '.join(bad)} no smaller size wins at any budget where both run, or "
            "the smaller wins even at the top",
            overall.data,
        )
    return Verdict(
        4, NOT_MEASURED, evidence, f"within noise with {', '.join(s for s in present if s not in ok)}", overall.data
    )


# --------------------------------------------------------------------------------- all six, and metric agreement


def check(
    claim: int,
    agg: list[dict],
    metric: str,
    curve: tuple[str, int, float],
    task_metrics: dict[str, str] | None = None,
    feature_dims: dict[str, int] | None = None,
) -> Verdict:
    """One claim's verdict on rows already averaged over seeds (stats.aggregate_seeds). `feature_dims`: the
    Frechet metrics' feature dimensions, below which a point's images are too few to decide on."""
    tm = {Kind.SUPER_RESOLUTION: "psnr", Kind.DREAMBOOTH: "subject-ssim"} | dict(task_metrics or {})
    v = {
        1: lambda: claim1(agg, metric, curve),
        2: lambda: claim2(agg, metric, curve, tm),
        3: lambda: claim3(agg, metric),
        4: lambda: claim4(agg, metric),
        5: lambda: claim5(agg, tm),
        6: lambda: claim6(agg, metric),
    }[claim]()
    if v.verdict == NOT_MEASURED:
        return v
    would = f'(with enough, the rule says "{v.verdict}": {v.reason or "every part passes"})'
    dim = (feature_dims or {}).get(metric)
    images = [int(r["num_images"]) for r in agg if r.get(metric) is not None and r.get("num_images")]
    if claim != 5 and dim and images and min(images) < dim:
        return Verdict(
            claim,
            NOT_MEASURED,
            v.evidence,
            f"too few images to tell: {metric} on {min(images)} images "
            f"a point, fewer than its {dim} feature dimensions, is biased and noisier than its ± shows "
            f"{would}",
            v.data,
        )
    no_training_noise = not any(v not in (None, "") for r in agg for k, v in r.items() if k.endswith("_df"))
    if claim in RUN_AGAINST_RUN and no_training_noise:
        return Verdict(
            claim,
            NOT_MEASURED,
            v.evidence,
            "too few seeds to tell: with one training seed these "
            "comparisons of one run against another leave out training noise, which moves a run by more "
            f"than the evaluation error {would.replace('enough', 'seeds')}",
            v.data,
        )
    return v


# Claims judged by comparing one run's value with another's in one direction: with one seed their errors leave out
# training noise, and in the demo's simulated studies they say "holds" falsely in 17% (claim 1) and 45% (claim 6) of
# one-seed studies (docs/claims.md). Claims 3-5 need two opposite differences, which a run that trained better
# everywhere does not fake: their one-seed verdicts stay.
RUN_AGAINST_RUN = (1, 2, 6)


def check_claims(
    rows: list[dict],
    metric: str,
    curve: tuple[str, int, float],
    task_metrics: dict[str, str] | None = None,
    feature_dims: dict[str, int] | None = None,
) -> list[Verdict]:
    """The six verdicts on the rows of every training seed: seeds are averaged first, and each verdict says which
    noise its standard errors hold."""
    agg = analysis.with_costs(stats.aggregate_seeds(rows))
    verdicts = [check(n, agg, metric, curve, task_metrics, feature_dims) for n in range(1, 7)]
    noise = stats.noise_of([r for r in agg if r.get(metric) is not None] or agg)
    for v in verdicts:
        v.noise = noise
    return verdicts


def metric_agreement(rows: list[dict], a: str, b: str) -> dict | None:
    """Spearman rank correlation between two metrics over the points that carry both (oriented so that +1 means
    they rank the points the same way whatever their directions)."""

    pts = [r for r in rows if r.get(a) is not None and r.get(b) is not None]
    if len(pts) < 3:
        return None
    rho = float(spearmanr([r[a] for r in pts], [r[b] for r in pts]).statistic)
    if registry.lower_is_better(a) != registry.lower_is_better(b):
        rho = -rho
    if math.isnan(rho):
        return None
    return {"a": a, "b": b, "spearman": rho, "points": len(pts)}
