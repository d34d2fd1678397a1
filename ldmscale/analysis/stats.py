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
from scipy.special import ndtr, stdtr

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
            # the error's degrees of freedom (None: one seed's bootstrap error, treated as normal)
            agg[f"{m}_df"] = len(v) - 1 if len(v) > 1 else dof(group[0], m)
            if len(v) == 1:
                agg[f"{m}_std"] = e[0]
                agg[f"{m}_seed_sd"] = None
                continue
            between = float(v.var(ddof=1))
            agg[f"{m}_seed_sd"] = math.sqrt(between)
            agg[f"{m}_std"] = (
                math.sqrt(max(between, eval_var or 0.0) / len(v)) if eval_var is not None or between > 0 else None
            )
            agg[f"_{m}_parts"] = (len(v), between, eval_var)
        out.append(agg)
    return pool_training_variance(out, metrics)


def pool_training_variance(agg: list[dict], metrics: list[str]) -> list[dict]:
    """A size's training variance from all of its configurations together. One configuration's spread over 3 seeds has
    2 degrees of freedom (its sd is uncertain by half); the training noise of one size differs little between its
    samplers and step counts, so each configuration's error uses the size's pooled training variance (the mean of
    each configuration's between-seed variance less its evaluation variance): SE^2 = (pooled + mean(e^2)) / S, with
    the pooled degrees of freedom. `<metric>_seed_sd` keeps each configuration's own spread."""
    for m in metrics:
        by: dict[tuple, list[dict]] = defaultdict(list)
        for r in agg:
            if r.get(f"_{m}_parts"):
                by[(r.get("task"), r.get("size"), bool(r.get("distilled")))].append(r)
        for group in by.values():
            parts = [r[f"_{m}_parts"] for r in group]
            if any(e is None for _, _, e in parts):
                continue
            pooled = float(np.mean([max(0.0, b - e) for _, b, e in parts]))
            df = sum(n - 1 for n, _, _ in parts)
            for r, (n, _, e) in zip(group, parts):
                r[f"{m}_std"] = math.sqrt((pooled + e) / n)
                r[f"{m}_df"] = df
                r[f"{m}_train_sd"] = math.sqrt(pooled)
    for r in agg:
        for m in metrics:
            r.pop(f"_{m}_parts", None)
    return agg


def dof(r: dict, metric: str) -> int | None:
    """The degrees of freedom of the row's standard error: seeds - 1 when it came from several seeds, None (normal)
    for one seed's bootstrap error."""
    v = r.get(f"{metric}_df")
    return int(v) if v not in (None, "") and float(v) == float(v) else None


def noise_of(rows: list[dict]) -> str:
    """Which noise the standard errors of these rows hold, in words (every verdict says it)."""
    seeds = sorted({int(r.get("n_seeds") or 1) for r in rows})
    if not seeds or seeds == [1]:
        return "evaluation noise only (1 training seed)"
    span = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return f"training-seed spread ({span} seeds) and evaluation noise"


# ------------------------------------------------------------------------------------------- matched cost


def curve(points: list[dict], x: str, metric: str) -> list[tuple[float, float, float | None]]:
    """(x, value, standard error, degrees of freedom) of each point with a positive x, by increasing x (the best value
    when two share an x)."""
    best: dict[float, tuple] = {}
    for p in points:
        if p.get(x) is None or p.get(metric) is None or not float(p[x]) > 0:
            continue
        xv, y = float(p[x]), float(p[metric])
        if xv not in best or better(y, best[xv][1], metric):
            best[xv] = (xv, y, std(p, metric), dof(p, metric))
    return [best[k] for k in sorted(best)]


def at(c: list[tuple], x0: float) -> tuple[float, float | None, int | None] | None:
    """The curve's value at x0, linear in log x between its two neighbouring points; None outside the measured
    range (never extrapolated). The error of an interpolated value is (1-w) e1 + w e2: the two points come from the
    same runs, so their errors are not independent, and this is the bound for any correlation."""
    if not c or x0 < c[0][0] * (1 - SAME_X) or x0 > c[-1][0] * (1 + SAME_X):
        return None
    x0 = min(max(x0, c[0][0]), c[-1][0])
    for (x1, y1, e1, d1), (x2, y2, e2, d2) in zip(c, c[1:]):
        if x1 * (1 - 1e-9) <= x0 <= x2 * (1 + 1e-9):
            w = min(1.0, max(0.0, math.log(x0 / x1) / math.log(x2 / x1)))
            if w == 0.0:
                return y1, e1, d1
            if w == 1.0:
                return y2, e2, d2
            e = None if e1 is None or e2 is None else (1 - w) * e1 + w * e2
            return (1 - w) * y1 + w * y2, e, min((d for d in (d1, d2) if d is not None), default=None)
    _, y1, e1, d1 = c[-1] if abs(x0 - c[-1][0]) <= abs(x0 - c[0][0]) else c[0]
    return y1, e1, d1


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


def compare(
    ya: float,
    ea: float | None,
    yb: float | None,
    eb: float | None,
    metric: str,
    dfa: int | None = None,
    dfb: int | None = None,
) -> dict:
    """How much better a is than b: the difference (positive: a better), its standard error, z and the one-sided
    p-value of "a is better". Errors estimated from a few seeds (dfa, dfb degrees of freedom) make z a Student t
    with Welch-Satterthwaite's degrees of freedom: with 3 seeds "two standard errors" is not enough. Without a
    standard error on either side z is 0 and p is 1: never significant."""
    diff = (yb - ya) if lower_is_better(metric) else (ya - yb)
    se = math.hypot(ea, eb) if ea is not None and eb is not None else None
    z = diff / se if se else 0.0
    df = welch(((ea, dfa), (eb, dfb))) if se else None
    return {"diff": diff, "se": se, "z": z, "df": df, "p": tail(z, df) if se else 1.0}


def welch(parts) -> float | None:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variances e^2 with df degrees of freedom each
    (None: known, as a normal); None when none of them was estimated from seeds."""
    est = [(e, d) for e, d in parts if d is not None and e]
    if not est:
        return None
    total = sum(e * e for e, _ in parts if e)
    return total**2 / sum(e**4 / d for e, d in est)


def tail(z: float, df: float | None = None) -> float:
    """The one-sided p-value of z: the normal's upper tail, or Student's t with df degrees of freedom."""
    return sf(z) if df is None else float(stdtr(df, -z))


def matched(a: list[tuple], b: list[tuple], metric: str) -> list[dict]:
    """a against b at every measured x of either inside their overlap (a's z > 0: a better)."""
    ov = overlap(a, b)
    if ov is None:
        return []
    xs = knots([p[0] for p in a + b if ov[0] * (1 - 1e-9) <= p[0] <= ov[1] * (1 + 1e-9)])
    out = []
    for x in xs:
        (ya, ea, da), (yb, eb, db) = at(a, x), at(b, x)
        out.append({"x": x, "a": ya, "a_std": ea, "b": yb, "b_std": eb} | compare(ya, ea, yb, eb, metric, da, db))
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


def simes(pvalues: list[float]) -> float:
    """The p-value of "at least one of these" (Simes 1986: min over i of K p_(i) / i). Valid when the tests are
    positively dependent, as comparisons at neighbouring budgets read off the same points are; it equals Bonferroni's
    K p_min when only one is small, and approaches p when they all are."""
    if not pvalues:
        return 1.0
    p = np.sort(np.asarray(pvalues, dtype=float))
    return float(min(1.0, (p * len(p) / np.arange(1, len(p) + 1)).min()))


def trend(points: list[dict], x: str, metric: str) -> dict:
    """The least-squares slope of the metric against log10(x) and its standard error from the points' own errors,
    oriented so that z > 0 means improving with x. The slope is a contrast of the points, so errors shared along a
    run (positively correlated) only make this standard error an overestimate."""
    c = curve(points, x, metric)
    if len(c) < 2:
        return {"slope": None, "se": None, "z": 0.0, "df": None, "p": 1.0, "points": len(c)}
    lx = np.log10([p[0] for p in c])
    y = np.array([p[1] for p in c])
    d = lx - lx.mean()
    sxx = float((d * d).sum())
    slope = float((d * y).sum() / sxx)
    errs = [p[2] for p in c]
    se = math.sqrt(sum((di * e) ** 2 for di, e in zip(d, errs)) / sxx**2) if all(e is not None for e in errs) else None
    improving = -slope if lower_is_better(metric) else slope
    z = improving / se if se else 0.0
    df = welch([(di * e, p[3]) for di, e, p in zip(d, errs, c)]) if se else None
    return {"slope": slope, "se": se, "z": z, "df": df, "p": tail(z, df) if se else 1.0, "points": len(c)}
