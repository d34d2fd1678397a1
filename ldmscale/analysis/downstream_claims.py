"""Claims 2, 5 and 6: the paper's claims about downstream models (super-resolution, DreamBooth) and distilled
samplers, under the rules of analysis/claims.py (matched executed cost, seeds averaged, Holm over the comparisons)."""

from __future__ import annotations

from ldmscale.analysis import scaling as analysis
from ldmscale.analysis import stats
from ldmscale.analysis.verdicts import (
    COST,
    FAILS,
    HOLDS,
    NOT_MEASURED,
    SMALL_STEPS,
    Verdict,
    by_cost,
    compare_rows,
    crossover_tests,
    fmt,
    judge_crossovers,
    p_worse,
    pretraining,
    row_text,
)
from ldmscale.eval import registry
from ldmscale.names import Kind, task_of

# what each downstream metric judges: a super-resolution model must be realistic and faithful to its input (the paper
# reports FID and LPIPS); the verdicts of claims 2 and 5 are given per family
FAMILY = {
    "fid": "realism",
    "fd-classifier": "realism",
    "psnr": "fidelity",
    "consistency": "fidelity",
    "ssim": "fidelity",
    "lpips": "fidelity",
    "subject-ssim": "identity",
    "subject-fidelity": "identity",
}


def _judged(rows: list[dict], task_metrics: dict) -> list[tuple[str, str, str]]:
    """(task, metric, label) for every downstream task of the rows and every metric it is judged by."""
    out = []
    for t in sorted({r.get("task") for r in rows} & {Kind.SUPER_RESOLUTION, Kind.DREAMBOOTH}):
        ms = task_metrics[t]
        for m in [ms] if isinstance(ms, str) else ms:
            out.append((t, m, f"{t} {FAMILY.get(m, m)} ({m})"))
    return out


def claim5(rows: list[dict], task_metrics: dict) -> Verdict:
    judged = _judged(rows, task_metrics)
    if not judged:
        return Verdict(5, NOT_MEASURED, "", "no downstream task in this study")
    per = {
        label: judge_crossovers(
            5,
            crossover_tests(
                [r for r in rows if r.get("task") == t and r["steps"] < SMALL_STEPS and r.get(m) is not None], m
            ),
            f" for {label}",
        )
        for t, m, label in judged
    }
    measured = {t: v for t, v in per.items() if v.verdict != NOT_MEASURED}
    evidence = "; ".join(f"{t}: {v.verdict}: {v.evidence or v.reason}" for t, v in per.items())
    if measured and all(v.verdict == HOLDS for v in measured.values()) and len(measured) == len(per):
        return Verdict(5, HOLDS, evidence)
    bad = [t for t, v in measured.items() if v.verdict == FAILS]
    if bad:
        return Verdict(5, FAILS, evidence, "; ".join(per[t].reason for t in bad))
    return Verdict(5, NOT_MEASURED, evidence, "; ".join(v.reason for v in per.values() if v.verdict == NOT_MEASURED))


def claim2(rows: list[dict], metric: str, curve: tuple[str, int, float], task_metrics: dict[str, str]) -> Verdict:
    """For every pair of sizes whose pretraining differs beyond noise, does the better-pretrained one make the better
    downstream model (at the task's largest step count, best guidance)? Holds with a supporting pair and no
    contradicting one (each family Holm-corrected)."""
    curves = analysis.training_curves(pretraining(rows), metric, *curve)
    pre = {s: pts[-1] for s, pts in curves.items()}
    parts, tests = [], []
    for t, tm, label in _judged(rows, task_metrics):
        best = analysis.best_over_guidance(
            analysis.final_rows([r for r in rows if r.get("task") == t and r.get(tm) is not None]), tm
        )
        down = {}
        for s in {r["size"] for r in best}:
            top = max(r["steps"] for r in best if r["size"] == s)
            cands = [r for r in best if r["size"] == s and r["steps"] == top]
            down[s] = min(cands, key=lambda r: r[tm] if registry.lower_is_better(tm) else -r[tm])
        sizes = [s for s in by_cost(list(down.values())) if s in pre]
        if len(sizes) < 2:
            continue
        parts.append(
            f"{label}: "
            + ", ".join(f"{s} pretraining {row_text(pre[s], metric)} -> {tm} {row_text(down[s], tm)}" for s in sizes)
        )
        for i, a in enumerate(sizes):
            for b in sizes[i + 1 :]:
                c = compare_rows(pre[b], pre[a], metric)
                hi, lo = (b, a) if c["z"] > 0 else (a, b)
                c_pre = c if hi == b else compare_rows(pre[a], pre[b], metric)
                d = compare_rows(down[hi], down[lo], tm)
                tests.append(
                    {
                        "task": t,
                        "family": label,
                        "metric": tm,
                        "better": hi,
                        "worse": lo,
                        "p_pre": c_pre["p"],
                        "z_down": d["z"],
                        "p_support": max(c_pre["p"], d["p"]),
                        "p_against": max(c_pre["p"], p_worse(d)),
                        "text": f"{hi} {'better' if c_pre['z'] > 0 else 'no worse'} pretrained than {lo} "
                        f"(z = {c_pre['z']:.1f}), at {label} z = {d['z']:+.1f}",
                    }
                )
    if not tests:
        return Verdict(2, NOT_MEASURED, "", "no downstream task fine-tuned from two or more sizes")
    support, _ = stats.holm([x["p_support"] for x in tests])
    against, _ = stats.holm([x["p_against"] for x in tests])
    families = {}
    for x, sup, con in zip(tests, support, against):
        f = families.setdefault(x["family"], [False, False])
        f[0], f[1] = f[0] or sup, f[1] or con
    verdicts = [
        f"{label}: {FAILS if con else HOLDS if sup else NOT_MEASURED}" for label, (sup, con) in families.items()
    ]
    evidence = "; ".join(verdicts + parts + [x["text"] for x in tests])
    data = {"tests": tests}
    if any(against):
        return Verdict(
            2,
            FAILS,
            evidence,
            "; ".join(
                f"{x['better']} is better pretrained than {x['worse']} but worse at {x['family']} beyond noise"
                for x, n in zip(tests, against)
                if n
            ),
            data,
        )
    if any(support):
        return Verdict(2, HOLDS, evidence, "", data)
    return Verdict(
        2,
        NOT_MEASURED,
        evidence,
        "no pair of sizes differs beyond noise both in pretraining and downstream "
        f"(after correcting for the {len(tests)} pairs)",
        data,
    )


def claim6(rows: list[dict], metric: str) -> Verdict:
    """At every step count a distilled model was evaluated at, against each smaller undistilled size (each sampler)
    at the same executed cost: holds when a smaller one is still better beyond noise somewhere (the crossover
    survives distillation), does not hold when the distilled model is better beyond noise at every step count against
    every smaller size that reaches its cost (distillation removes the crossover)."""
    t2i = analysis.final_rows([r for r in analysis.with_costs(rows) if task_of(r) == Kind.TEXT_TO_IMAGE])
    best = [r for r in analysis.best_over_guidance(t2i, metric) if r.get(COST) is not None]
    distilled = [r for r in best if r.get("distilled")]
    if not distilled:
        return Verdict(6, NOT_MEASURED, "", "no distilled model in this study")
    plain = [r for r in best if not r.get("distilled")]
    order = {s: i for i, s in enumerate(by_cost(best))}
    without = {(t["smaller"], t["larger"], t["sampler"]): t for t in crossover_tests(plain, metric)}
    tests, parts = [], []
    for size in sorted({r["size"] for r in distilled}, key=order.get):
        for d in sorted((r for r in distilled if r["size"] == size), key=lambda r: r["steps"]):
            for small in [s for s in order if order[s] < order[size]]:
                for sampler in sorted({r["sampler"] for r in plain if r["size"] == small}):
                    c = stats.curve([r for r in plain if r["size"] == small and r["sampler"] == sampler], COST, metric)
                    v = stats.at(c, d[COST])
                    if v is None:
                        continue
                    cmp = stats.compare(v[0], v[1], d[metric], stats.std(d, metric), metric, v[2], stats.dof(d, metric))
                    tests.append(
                        {
                            "distilled": size,
                            "steps": d["steps"],
                            "cost": d[COST],
                            "smaller": small,
                            "sampler": sampler,
                            "small": v[0],
                            "small_std": v[1],
                            "value": d[metric],
                            "value_std": stats.std(d, metric),
                        }
                        | cmp
                    )
    if not tests:
        return Verdict(
            6, NOT_MEASURED, "", "no smaller undistilled size was measured at a distilled model's executed cost"
        )
    survives, _ = stats.holm([t["p"] for t in tests])
    removed, _ = stats.holm([p_worse(t) for t in tests])
    for t, s, r in zip(tests, survives, removed):
        t["smaller_wins"], t["distilled_wins"] = s, r
    for size in sorted({t["distilled"] for t in tests}, key=order.get):
        before = [x for (s, large, _), x in without.items() if large == size]
        known = [x for x in before if x["p"] < stats.ALPHA]
        parts.append(
            f"without distillation {size}'s crossover with a smaller size is "
            + ("beyond noise" if known else "not shown")
            + " (unadjusted)"
        )
        for t in (t for t in tests if t["distilled"] == size):
            parts.append(
                f"distilled {size} at {t['steps']} steps (executed cost {t['cost']:.3g}) "
                f"{fmt(t['value'], t['value_std'])} vs {t['smaller']} {t['sampler']} "
                f"{fmt(t['small'], t['small_std'])} (z = {t['z']:+.1f} for {t['smaller']})"
            )
    data = {"tests": tests}
    evidence = "; ".join(parts)
    if any(survives):
        return Verdict(6, HOLDS, evidence, "", data)
    if all(t["distilled_wins"] for t in tests):
        return Verdict(
            6,
            FAILS,
            evidence,
            "the distilled model is better beyond noise than every smaller undistilled "
            "size at its executed cost, at every step count: distillation removes the crossover",
            data,
        )
    return Verdict(6, NOT_MEASURED, evidence, f"within noise at the {len(tests)} matched comparisons", data)
