"""The statistics behind every verdict, as pure functions of the results table.

- seeds: rows of one configuration trained with several seeds become one row, whose standard error holds the
  spread between seeds and the evaluation noise (a random-effects estimate: the between-seed variance, never less
  than the evaluation variance, over the number of seeds);
- matched cost: two sizes are compared where both were measured, each read off its own curve (linear in log cost
  between its measured points, never extrapolated), so that a coarse grid cannot make one of them win;
- one-sided z-tests against ALPHA (a single comparison is significant beyond two standard errors) and Holm's
  control of the error rate over a family of comparisons (statsmodels).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.special import ndtr

from ldmscale.eval.registry import lower_is_better

ALPHA = float(ndtr(-2.0))  # one-sided; unadjusted, "better by more than two standard errors"
SEED = "train_seed"  # the training seed of a row (0 for rows written before seeds existed)
# what makes two rows the same configuration, whatever their training seed
CONFIG_KEY = ("task", "size", "distilled", "sampler", "steps", "guidance", "spacing", "tag", "checkpoint")


def std(r: dict, metric: str) -> float | None:
    """The row's standard error, or None when it has none (a value without one is never significant)."""
    v = r.get(f"{metric}_std")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _metrics(rows: list[dict]) -> list[str]:
    return sorted({k[:-4] for r in rows for k in r if k.endswith("_std") and k[:-4] in r})


def aggregate_seeds(rows: list[dict]) -> list[dict]:
    """One row per configuration: the mean over its training seeds, with `<metric>_std` the standard error of that
    mean. With S seeds of values v_s and evaluation errors e_s: SE^2 = max(var(v), mean(e^2)) / S, where var(v) is
    the sample variance between seeds (which holds evaluation noise as well as training noise). One seed keeps its
    evaluation error. `n_seeds`, `<metric>_seed_sd` and `<metric>_eval_std` say where the error comes from."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(str(r.get(k)) for k in CONFIG_KEY)].append(r)
    metrics = _metrics(rows)
    out = []
    for group in groups.values():
        group = sorted(group, key=lambda r: int(r.get(SEED) or 0))
        agg = dict(group[0])
        agg["n_seeds"] = len({int(r.get(SEED) or 0) for r in group})
        agg["seeds_used"] = sorted({int(r.get(SEED) or 0) for r in group})
        for key in ("latency_ms_per_image",):
            vals = [float(r[key]) for r in group if r.get(key) is not None]
            if vals:
                agg[key] = float(np.mean(vals))
        for m in metrics:
            pairs = [(float(r[m]), std(r, m)) for r in group if r.get(m) is not None]
            if not pairs:
                continue
            v = np.array([p[0] for p in pairs])
            e = [p[1] for p in pairs]
            agg[m] = float(v.mean())
            eval_var = float(np.mean([x * x for x in e])) if all(x is not None for x in e) else None
            agg[f"{m}_eval_std"] = math.sqrt(eval_var / len(v)) if eval_var is not None else None
            if len(v) == 1:
                agg[f"{m}_std"] = e[0]
                agg[f"{m}_seed_sd"] = None
                continue
            between = float(v.var(ddof=1))
            agg[f"{m}_seed_sd"] = math.sqrt(between)
            agg[f"{m}_std"] = math.sqrt(max(between, eval_var or 0.0) / len(v)) if eval_var is not None or between > 0 \
                else None
        out.append(agg)
    return out


def noise_of(rows: list[dict]) -> str:
    """Which noise the standard errors of these rows hold, in words (every verdict says it)."""
    seeds = sorted({int(r.get("n_seeds") or 1) for r in rows})
    if not seeds or seeds == [1]:
        return "evaluation noise only (1 training seed)"
    span = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return f"training-seed spread ({span} seeds) and evaluation noise"


# ------------------------------------------------------------------------------------------- matched cost


def curve(points: list[dict], x: str, metric: str) -> list[tuple[float, float, float | None]]:
    """(x, value, standard error) of each point with a positive x, by increasing x (the best value when two share
    an x)."""
    best: dict[float, tuple] = {}
    for p in points:
        if p.get(x) is None or p.get(metric) is None or not float(p[x]) > 0:
            continue
        xv, y = float(p[x]), float(p[metric])
        if xv not in best or better(y, best[xv][1], metric):
            best[xv] = (xv, y, std(p, metric))
    return [best[k] for k in sorted(best)]


def at(c: list[tuple], x0: float) -> tuple[float, float | None] | None:
    """The curve's value at x0, linear in log x between its two neighbouring points; None outside the measured
    range (never extrapolated). The error of an interpolated value is (1-w) e1 + w e2: the two points come from the
    same runs, so their errors are not independent, and this is the bound for any correlation."""
    if not c or x0 < c[0][0] * (1 - SAME_X) or x0 > c[-1][0] * (1 + SAME_X):
        return None
    x0 = min(max(x0, c[0][0]), c[-1][0])
    for (x1, y1, e1), (x2, y2, e2) in zip(c, c[1:]):
        if x1 * (1 - 1e-9) <= x0 <= x2 * (1 + 1e-9):
            w = min(1.0, max(0.0, math.log(x0 / x1) / math.log(x2 / x1)))
            e = None if e1 is None or e2 is None else (1 - w) * e1 + w * e2
            if w == 0.0:
                e = e1
            elif w == 1.0:
                e = e2
            return (1 - w) * y1 + w * y2, e
    x1, y1, e1 = c[-1] if abs(x0 - c[-1][0]) <= abs(x0 - c[0][0]) else c[0]
    return y1, e1


def overlap(a: list[tuple], b: list[tuple]) -> tuple[float, float] | None:
    """The range of x where both curves were measured, or None."""
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    return (lo, hi) if lo <= hi * (1 + SAME_X) else None


SAME_X = 1e-3  # costs closer than this (relative) are one budget: checkpoints of two sizes at "the same" compute


def knots(xs: list[float]) -> list[float]:
    """The distinct budgets among xs, by increasing value, merging those within SAME_X of the previous one."""
    out: list[float] = []
    for x in sorted(xs):
        if not out or x > out[-1] * (1 + SAME_X):
            out.append(x)
    return out


def compare(ya: float, ea: float | None, yb: float | None, eb: float | None, metric: str) -> dict:
    """How much better a is than b: the difference (positive: a better), its standard error, z and the one-sided
    p-value of "a is better". Without a standard error on either side z is 0 and p is 1: never significant."""
    diff = (yb - ya) if lower_is_better(metric) else (ya - yb)
    se = math.hypot(ea, eb) if ea is not None and eb is not None else None
    z = diff / se if se else 0.0
    return {"diff": diff, "se": se, "z": z, "p": sf(z) if se else 1.0}


def matched(a: list[tuple], b: list[tuple], metric: str) -> list[dict]:
    """a against b at every measured x of either inside their overlap (a's z > 0: a better)."""
    ov = overlap(a, b)
    if ov is None:
        return []
    xs = knots([x for x, _, _ in a + b if ov[0] * (1 - 1e-9) <= x <= ov[1] * (1 + 1e-9)])
    out = []
    for x in xs:
        (ya, ea), (yb, eb) = at(a, x), at(b, x)
        out.append({"x": x, "a": ya, "a_std": ea, "b": yb, "b_std": eb} | compare(ya, ea, yb, eb, metric))
    return out


def sf(z: float) -> float:
    """The standard normal's upper tail (scipy.special.ndtr: the stats.norm.sf number at a ufunc's cost)."""
    return float(ndtr(-z))


def better(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


# ------------------------------------------------------------------------------------------- tests


def holm(pvalues: list[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down control of the family-wise error rate: which tests are significant, and the adjusted
    p-values. The same numbers as statsmodels' multipletests(method="holm") (a test checks it), which calls
    gc.collect() on every call: 0.15 s each, an hour for the calibration's simulations."""
    if not pvalues:
        return [], []
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(m, 0, -1)))
    out = np.empty(m)
    out[order] = adjusted
    return [bool(x <= alpha) for x in out], [float(x) for x in out]


def bonferroni_min(pvalues: list[float]) -> float:
    """The p-value of "at least one of these": the smallest, times how many were looked at."""
    return min(1.0, min(pvalues) * len(pvalues)) if pvalues else 1.0


def trend(points: list[dict], x: str, metric: str) -> dict:
    """The least-squares slope of the metric against log10(x) and its standard error from the points' own errors,
    oriented so that z > 0 means improving with x. The slope is a contrast of the points, so errors shared along a
    run (positively correlated) only make this standard error an overestimate."""
    c = curve(points, x, metric)
    if len(c) < 2:
        return {"slope": None, "se": None, "z": 0.0, "p": 1.0, "points": len(c)}
    lx = np.log10([p[0] for p in c])
    y = np.array([p[1] for p in c])
    d = lx - lx.mean()
    sxx = float((d * d).sum())
    slope = float((d * y).sum() / sxx)
    errs = [p[2] for p in c]
    se = math.sqrt(sum((di * e) ** 2 for di, e in zip(d, errs)) / sxx**2) if all(e is not None for e in errs) else None
    improving = -slope if lower_is_better(metric) else slope
    z = improving / se if se else 0.0
    return {"slope": slope, "se": se, "z": z, "p": sf(z) if se else 1.0, "points": len(c)}
