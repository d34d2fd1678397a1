"""The paper's six claims, checked on a study's results table: one verdict per claim, with its evidence.

Each check is a pure function of the rows (as study.collect makes them) and returns a Verdict: "holds",
"does not hold" (with a one-line reason) or "not measured" (the study has no rows that test it). A difference
counts only when it is larger than twice its standard error (the bootstrap spread of each point, combined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ldmscale.analysis import scaling as analysis
from ldmscale.eval import registry

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
PAPER_SAMPLERS = ("ddim", "ddpm", "dpmsolver++")
STATEMENTS = {
    1: "Pretraining quality improves with training compute, and the bigger model wins with enough of it.",
    2: "Downstream quality (super-resolution, DreamBooth) follows pretraining quality.",
    3: "Under a small sampling budget a smaller model beats a larger one (bigger is not always better).",
    4: "The sampler (DDIM, DDPM, DPM-Solver++) does not change that trend.",
    5: "The same holds for downstream tasks at small step counts.",
    6: "Distillation does not change it: a distilled larger model is matched by an undistilled smaller one at similar cost.",
}


@dataclass
class Verdict:
    claim: int
    verdict: str
    evidence: str
    reason: str = ""
    data: dict = field(default_factory=dict)

    @property
    def statement(self) -> str:
        return STATEMENTS[self.claim]

    def as_dict(self) -> dict:
        return {"claim": self.claim, "statement": self.statement, "verdict": self.verdict, "evidence": self.evidence,
                "reason": self.reason, "data": self.data}


def _se(r: dict, metric: str) -> float:
    v = r.get(f"{metric}_std")
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


def _fmt(r: dict, metric: str) -> str:
    se = r.get(f"{metric}_std")
    return f"{r[metric]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def margin(a: dict, b: dict, metric: str) -> float:
    """How many combined standard errors a is better than b (negative: worse; inf when both are exact)."""
    diff = (b[metric] - a[metric]) if registry.lower_is_better(metric) else (a[metric] - b[metric])
    se = math.hypot(_se(a, metric), _se(b, metric))
    return diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0


def _pretraining(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("task", "text-to-image") == "text-to-image" and not r.get("distilled")]


def _by_cost(rows: list[dict]) -> list[str]:
    sizes: dict[str, float] = {}
    for r in rows:
        sizes.setdefault(r["size"], float(r.get("norm_cost") or 0))
    return sorted(sizes, key=sizes.get)


# --------------------------------------------------------------------------------- claim 1: training compute


def improves(points: list[dict], metric: str) -> tuple[bool, str]:
    """A training curve improves when a decaying power law fits it, or when no checkpoint is significantly worse
    than the one before and the last is significantly better than the first."""
    if len(points) >= 3:
        try:
            fit = analysis.fit_power_law([p["train_flops"] for p in points], [p[metric] for p in points],
                                         boot=50, lower_better=registry.lower_is_better(metric))
            if fit.ok:
                return True, f"power law, exponent b = {fit.b:.2f}"
        except (RuntimeError, ValueError):
            pass
    worse = [i for i in range(1, len(points)) if margin(points[i], points[i - 1], metric) < -2]
    if worse:
        i = worse[0]
        return False, (f"checkpoint {i + 1} ({_fmt(points[i], metric)}) is worse than checkpoint {i} "
                       f"({_fmt(points[i - 1], metric)}) beyond noise")
    m = margin(points[-1], points[0], metric)
    if m <= 2:
        return False, f"the last checkpoint is not better than the first beyond noise ({m:.1f} standard errors)"
    return True, f"monotone within noise, {m:.1f} standard errors better at the end"


def claim1(rows: list[dict], metric: str, curve: tuple[str, int, float]) -> Verdict:
    curves = analysis.training_curves(_pretraining(rows), metric, *curve)
    curves = {s: pts for s, pts in curves.items() if len(pts) >= 2}
    if len(curves) < 2:
        return Verdict(1, NOT_MEASURED, "", "needs at least two sizes with two or more evaluated checkpoints")
    sizes = _by_cost([pts[0] for pts in curves.values()])
    parts, failing = [], []
    for s in sizes:
        ok, how = improves(curves[s], metric)
        parts.append(f"{s} {_fmt(curves[s][0], metric)} -> {_fmt(curves[s][-1], metric)} ({how})")
        if not ok:
            failing.append(f"{s} does not improve with training: {how}")
    largest = sizes[-1]
    final = {s: curves[s][-1] for s in sizes}
    rivals = [(s, margin(final[largest], final[s], metric)) for s in sizes[:-1]]
    weakest = min(rivals, key=lambda t: t[1])
    parts.append(f"at the largest training compute {largest} beats {weakest[0]} by {weakest[1]:.1f} standard errors")
    if weakest[1] <= 2:
        failing.append(f"at the largest training compute {largest} ({_fmt(final[largest], metric)}) is not better than "
                       f"{weakest[0]} ({_fmt(final[weakest[0]], metric)}) by two standard errors")
    data = {"curves": {s: [(p["train_flops"], p[metric], p.get(f"{metric}_std")) for p in curves[s]] for s in sizes},
            "largest": largest,
            "margin_over_next_best": weakest[1] if math.isfinite(weakest[1]) else None}  # None: no standard errors
    return Verdict(1, FAILS if failing else HOLDS, "; ".join(parts), "; ".join(failing), data)


# --------------------------------------------------------------------------------- claims 3, 4, 5: crossovers


def _winner(rows: list[dict], metric: str, budget: float) -> dict | None:
    return analysis.plan(rows, budget, metric)["best"]


def crossover_claim(claim: int, rows: list[dict], metric: str, label: str = "") -> Verdict:
    """A smaller size wins at the smallest budgets where both run, a larger one at the largest: some pair of sizes
    has a crossover inside the measured range, present in at least 80% of bootstrap replicates."""
    best = analysis.best_over_guidance(analysis.final_rows(rows), metric)
    best = [r for r in best if r.get("sampling_cost") is not None]
    sizes = _by_cost(best)
    if len(sizes) < 2:
        return Verdict(claim, NOT_MEASURED, "", f"needs at least two sizes{label}")
    found = []
    for i, s in enumerate(sizes):
        for big in sizes[i + 1:]:
            rs, rl = [r for r in best if r["size"] == s], [r for r in best if r["size"] == big]
            x = analysis.crossover_with_interval(rs, rl, metric)
            if x["crossover"] is None:
                continue
            lo = max(r["sampling_cost"] for r in rs + rl if r["sampling_cost"] < x["crossover"])
            ws, wl = _winner(rs, metric, lo), _winner(rl, metric, lo)
            hi = max(r["sampling_cost"] for r in rs + rl)
            top_s, top_l = _winner(rs, metric, hi), _winner(rl, metric, hi)
            iv = x["interval"]
            text = (f"{s} -> {big} at sampling cost {x['crossover']:.3g} (90% interval {iv[0]:.3g}-{iv[1]:.3g}, "
                    f"in {100 * x['share']:.0f}% of replicates): at {lo:.3g} {s} {_fmt(ws, metric)} "
                    f"({ws['sampler']} {ws['steps']}) beats {big} {_fmt(wl, metric)}; at {hi:.3g} {big} "
                    f"{_fmt(top_l, metric)} beats {s} {_fmt(top_s, metric)}")
            found.append((x["share"], text, {"smaller": s, "larger": big} | x))
    robust = [f for f in found if f[0] >= 0.8]
    if robust:
        return Verdict(claim, HOLDS, "; ".join(f[1] for f in robust), data={"crossovers": [f[2] for f in robust]})
    if found:
        return Verdict(claim, FAILS, "; ".join(f[1] for f in found),
                       f"crossovers are within noise (at most {100 * max(f[0] for f in found):.0f}% of replicates){label}",
                       {"crossovers": [f[2] for f in found]})
    hi = max(r["sampling_cost"] for r in best)
    top = _winner(best, metric, hi)
    small_top = top["size"] == sizes[0]
    why = (f"the smallest size {sizes[0]} is best at every budget, even the largest ({hi:.3g})" if small_top else
           f"no smaller size beats a larger one at any budget where both run{label}")
    return Verdict(claim, FAILS, f"best at the largest budget {hi:.3g}: {top['size']} {_fmt(top, metric)}", why)


def claim3(rows: list[dict], metric: str) -> Verdict:
    return crossover_claim(3, _pretraining(rows), metric)


def claim4(rows: list[dict], metric: str) -> Verdict:
    t2i = _pretraining(rows)
    present = [s for s in PAPER_SAMPLERS if any(r["sampler"] == s for r in t2i)]
    if len(present) < 2:
        return Verdict(4, NOT_MEASURED, "", "needs at least two of DDIM, DDPM and DPM-Solver++")
    per = {s: crossover_claim(4, [r for r in t2i if r["sampler"] == s], metric, f" with {s}") for s in present}
    evidence = "; ".join(f"{s}: {v.verdict} ({v.evidence.split(': at')[0] if v.verdict == HOLDS else v.reason})"
                         for s, v in per.items())
    bad = [s for s, v in per.items() if v.verdict != HOLDS]
    return Verdict(4, FAILS if bad else HOLDS, evidence,
                   f"no robust crossover with {', '.join(bad)}" if bad else "", {s: v.as_dict() for s, v in per.items()})


def claim5(rows: list[dict], task_metrics: dict[str, str]) -> Verdict:
    tasks = sorted({r.get("task") for r in rows} & {"super-resolution", "dreambooth"})
    if not tasks:
        return Verdict(5, NOT_MEASURED, "", "no downstream task in this study")
    per = {t: crossover_claim(5, [r for r in rows if r.get("task") == t], task_metrics[t], f" for {t}") for t in tasks}
    measured = {t: v for t, v in per.items() if v.verdict != NOT_MEASURED}
    if not measured:
        return Verdict(5, NOT_MEASURED, "", "downstream tasks need at least two sizes")
    bad = [t for t, v in measured.items() if v.verdict != HOLDS]
    evidence = "; ".join(f"{t} ({task_metrics[t]}): {v.evidence}" for t, v in measured.items())
    return Verdict(5, FAILS if bad else HOLDS, evidence, "; ".join(measured[t].reason for t in bad))


# --------------------------------------------------------------------------------- claim 2: downstream follows


def claim2(rows: list[dict], metric: str, curve: tuple[str, int, float], task_metrics: dict[str, str]) -> Verdict:
    """For every pair of sizes, the better-pretrained one is the better downstream model (at the task's largest
    step count, best guidance)."""
    curves = analysis.training_curves(_pretraining(rows), metric, *curve)
    pre = {s: pts[-1] for s, pts in curves.items()}
    tasks = sorted({r.get("task") for r in rows} & {"super-resolution", "dreambooth"})
    parts, bad, noise, shown, measured = [], [], [], False, False
    for t in tasks:
        tm = task_metrics[t]
        best = analysis.best_over_guidance(analysis.final_rows([r for r in rows if r.get("task") == t]), tm)
        down = {}
        for s in {r["size"] for r in best}:
            top = max(r["steps"] for r in best if r["size"] == s)
            cands = [r for r in best if r["size"] == s and r["steps"] == top]
            down[s] = min(cands, key=lambda r: r[tm] if registry.lower_is_better(tm) else -r[tm])
        sizes = [s for s in _by_cost(list(down.values())) if s in pre]
        if len(sizes) < 2:
            continue
        measured = True
        parts.append(f"{t}: " + ", ".join(f"{s} pretraining {_fmt(pre[s], metric)} -> {tm} {_fmt(down[s], tm)}"
                                           for s in sizes))
        for i, a in enumerate(sizes):
            for b in sizes[i + 1:]:
                hi, lo = (b, a) if margin(pre[b], pre[a], metric) > 0 else (a, b)
                if margin(pre[hi], pre[lo], metric) <= 2:
                    continue  # pretrained alike: nothing to follow
                m = margin(down[hi], down[lo], tm)
                if m < -2:
                    bad.append(f"{hi} is better pretrained than {lo} but worse at {t} ({tm} {down[hi][tm]:.4g} vs "
                               f"{down[lo][tm]:.4g}, {-m:.1f} standard errors)")
                elif m <= 2:
                    noise.append(f"{hi} is better pretrained than {lo}, and at {t} {m:+.1f} standard errors "
                                 f"({down[hi][tm]:.4g} vs {down[lo][tm]:.4g}): within noise")
                else:
                    shown = True
    if not measured:
        return Verdict(2, NOT_MEASURED, "", "no downstream task fine-tuned from two or more sizes")
    if bad:
        return Verdict(2, FAILS, "; ".join(parts), "; ".join(bad))
    if noise and not shown:  # a difference counts only beyond two standard errors
        return Verdict(2, NOT_MEASURED, "; ".join(parts), "; ".join(noise))
    return Verdict(2, HOLDS, "; ".join(parts + noise), "")


# --------------------------------------------------------------------------------- claim 6: distillation


def claim6(rows: list[dict], metric: str) -> Verdict:
    """Each distilled model at 4 steps (its fewest-step point if it has no 4) against the best undistilled
    configuration of a smaller size within the same sampling cost."""
    t2i = [r for r in analysis.final_rows([r for r in rows if r.get("task", "text-to-image") == "text-to-image"])]
    best = analysis.best_over_guidance(t2i, metric)
    distilled = [r for r in best if r.get("distilled")]
    plain = [r for r in best if not r.get("distilled")]
    if not distilled:
        return Verdict(6, NOT_MEASURED, "", "no distilled model in this study")
    order = {s: i for i, s in enumerate(_by_cost(best))}
    parts, bad, measured = [], [], False
    for size in sorted({r["size"] for r in distilled}, key=order.get):
        mine = [r for r in distilled if r["size"] == size]
        d = next((r for r in mine if r["steps"] == 4), min(mine, key=lambda r: r["steps"]))
        smaller = [r for r in plain if order[r["size"]] < order[size]]
        rival = analysis.plan(smaller, d["sampling_cost"], metric)["best"] if smaller else None
        if rival is None:
            parts.append(f"{size} distilled at {d['steps']} steps {_fmt(d, metric)}: no smaller undistilled model "
                         f"fits its cost {d['sampling_cost']:.3g}")
            continue
        measured = True
        rival_row = next(r for r in smaller if (r["size"], r["sampler"], r["steps"]) ==
                         (rival["size"], rival["sampler"], rival["steps"]))
        m = margin(d, rival_row, metric)
        parts.append(f"{size} distilled, {d['steps']} steps (cost {d['sampling_cost']:.3g}): {_fmt(d, metric)} vs "
                     f"{rival['size']} undistilled {rival['sampler']} {rival['steps']} steps: {_fmt(rival_row, metric)}")
        if m > 2:
            bad.append(f"distilled {size} beats every smaller undistilled model within its cost by {m:.1f} standard "
                       f"errors: distillation moves the crossover")
    if not measured:
        return Verdict(6, NOT_MEASURED, "; ".join(parts), "no smaller undistilled model within a distilled model's cost")
    return Verdict(6, FAILS if bad else HOLDS, "; ".join(parts), "; ".join(bad))


# --------------------------------------------------------------------------------- all six, and metric agreement


def check_claims(rows: list[dict], metric: str, curve: tuple[str, int, float],
                 task_metrics: dict[str, str] | None = None) -> list[Verdict]:
    tm = {"super-resolution": "psnr", "dreambooth": "subject-ssim"} | dict(task_metrics or {})
    return [claim1(rows, metric, curve), claim2(rows, metric, curve, tm), claim3(rows, metric),
            claim4(rows, metric), claim5(rows, tm), claim6(rows, metric)]


def metric_agreement(rows: list[dict], a: str, b: str) -> dict | None:
    """Spearman rank correlation between two metrics over the points that carry both (oriented so that +1 means
    they rank the points the same way whatever their directions)."""
    from scipy.stats import spearmanr

    pts = [r for r in rows if r.get(a) is not None and r.get(b) is not None]
    if len(pts) < 3:
        return None
    rho = float(spearmanr([r[a] for r in pts], [r[b] for r in pts]).statistic)
    if registry.lower_is_better(a) != registry.lower_is_better(b):
        rho = -rho
    return {"a": a, "b": b, "spearman": rho, "points": len(pts)}
