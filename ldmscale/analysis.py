"""Scaling analysis as pure functions of the results table (a list of row dicts, as study.collect makes).

- power-law fits of quality against training compute, metric = a * compute^-b + c, with bootstrap CIs;
- quality against sampling cost at the best guidance per (size, sampler, steps), as the paper does;
- the Pareto frontier, the crossover budgets below which a smaller model beats a larger one;
- the planner: the best (size, sampler, steps, guidance) within a budget, and the runner-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def lower_is_better(metric: str) -> bool:
    return metric in ("fid", "fd-classifier") or metric.startswith("fd")


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


def _key(r: dict) -> tuple:
    return (r.get("task", "text-to-image"), r["size"], bool(r.get("distilled")))


def final_rows(rows: list[dict]) -> list[dict]:
    """Rows of each model's last checkpoint (the grid; earlier checkpoints feed the training curves)."""
    last: dict = {}
    for r in rows:
        k = _key(r)
        last[k] = max(last.get(k, -1), r.get("images_seen") or 0)
    return [r for r in rows if (r.get("images_seen") or 0) == last[_key(r)]]


def best_over_guidance(rows: list[dict], metric: str) -> list[dict]:
    """For each (model, sampler, steps, checkpoint) keep the guidance with the best metric (the paper's protocol)."""
    best: dict = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        k = _key(r) + (r["sampler"], r["steps"], r.get("checkpoint"))
        if k not in best or _better(r[metric], best[k][metric], metric):
            best[k] = r
    return sorted(best.values(), key=lambda r: (_key(r), r["sampler"], r["steps"]))


@dataclass
class PowerLaw:
    a: float
    b: float
    c: float
    ci: dict  # name -> (low, high), 90% bootstrap intervals
    x0: float  # x is fitted as x / x0 for conditioning; a refers to the unscaled x
    lower_better: bool = True

    def __call__(self, x):
        return self.a * np.asarray(x, dtype=float) ** -self.b + self.c

    @property
    def ok(self) -> bool:
        """False when the fitted curve does not improve with compute (a has the wrong sign) or the exponent ran
        into its bounds: the data do not follow the power law, so a, b, c mean nothing."""
        improving = self.a > 0 if self.lower_better else self.a < 0
        return improving and 1e-3 < self.b < 9.9 and bool(np.isfinite([self.a, self.b, self.c]).all())


def fit_power_law(x, y, boot: int = 200, seed: int = 0, lower_better: bool = True) -> PowerLaw:
    """Least-squares fit of y = a * x^-b + c (b > 0), with percentile bootstrap intervals over points."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        raise ValueError("a power law with offset needs at least 3 points")
    x0 = float(np.exp(np.mean(np.log(x))))

    def f(u, a, b, c):
        return a * u ** -b + c

    def fit(xs, ys):
        span = float(np.ptp(ys)) or 1.0
        p0 = (span, 0.5, float(ys.min()) - 0.1 * span)
        p, _ = curve_fit(f, xs / x0, ys, p0=p0, bounds=([-np.inf, 1e-4, -np.inf], [np.inf, 10.0, np.inf]), maxfev=20000)
        return p

    a, b, c = fit(x, y)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        try:
            samples.append(fit(x[idx], y[idx]))
        except (RuntimeError, ValueError):
            continue
    ci = {}
    if samples:
        s = np.asarray(samples)
        s[:, 0] = s[:, 0] * x0 ** s[:, 1]
        for i, name in enumerate("abc"):
            ci[name] = (float(np.percentile(s[:, i], 5)), float(np.percentile(s[:, i], 95)))
    return PowerLaw(a=float(a * x0**b), b=float(b), c=float(c), ci=ci, x0=x0, lower_better=lower_better)


def training_curves(rows: list[dict], metric: str, sampler: str, steps: int, guidance: float) -> dict[str, list[dict]]:
    """Per size: the metric at each checkpoint, at the study's curve setting, ordered by training compute."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if (r["sampler"], r["steps"], float(r["guidance"])) == (sampler, steps, float(guidance)) and r.get(metric) is not None \
                and not r.get("distilled") and r.get("task", "text-to-image") == "text-to-image":
            out.setdefault(r["size"], []).append(r)
    return {k: sorted(v, key=lambda r: r["train_flops"]) for k, v in out.items()}


def pareto_frontier(rows: list[dict], metric: str, cost: str = "sampling_cost") -> list[dict]:
    """Configurations not beaten by any other at lower or equal cost, by increasing cost."""
    pts = sorted((r for r in rows if r.get(metric) is not None and r.get(cost) is not None),
                 key=lambda r: (r[cost], r[metric] if lower_is_better(metric) else -r[metric]))
    front, best = [], None
    for r in pts:
        if best is None or _better(r[metric], best, metric):
            front.append(r)
            best = r[metric]
    return front


def envelope(rows: list[dict], metric: str, cost: str, budgets) -> list[float | None]:
    """The best metric reachable at each budget (cost <= budget), or None where nothing fits."""
    out = []
    for b in budgets:
        vals = [r[metric] for r in rows if r.get(cost) is not None and r[cost] <= b + 1e-12 and r.get(metric) is not None]
        out.append((min(vals) if lower_is_better(metric) else max(vals)) if vals else None)
    return out


def crossovers(rows: list[dict], metric: str, cost: str = "sampling_cost") -> list[dict]:
    """For each pair (smaller, larger) of sizes: the budget below which the smaller model is better.

    Using each model's envelope (best metric within the budget), the crossover is the smallest budget from
    which the larger model is at least as good at every larger budget measured. None: the smaller model
    wins at every budget measured; the lowest cost: the larger one wins everywhere it can run."""
    by_size: dict[str, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["size"], []).append(r)
    sizes = sorted(by_size, key=lambda s: by_size[s][0]["norm_cost"])
    budgets = sorted({r[cost] for r in rows if r.get(cost) is not None})
    out = []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1:]:
            es, el = envelope(by_size[small], metric, cost, budgets), envelope(by_size[large], metric, cost, budgets)
            small_wins = [b for b, s, l in zip(budgets, es, el) if s is not None and (l is None or _better(s, l, metric))]
            if not small_wins:
                x = min(r[cost] for r in by_size[large])
            elif small_wins[-1] == budgets[-1]:
                x = None
            else:
                x = next(b for b in budgets if b > small_wins[-1])
            out.append({"smaller": small, "larger": large, "crossover": x,
                        "smaller_wins_below": x, "budgets_where_smaller_wins": len(small_wins)})
    return out


def plan(rows: list[dict], budget: float, metric: str, cost: str = "sampling_cost") -> dict:
    """The best configuration within the budget and the runner-up (the best of a different size)."""
    ok = sorted((r for r in rows if r.get(cost) is not None and r[cost] <= budget + 1e-12 and r.get(metric) is not None),
                key=lambda r: r[metric] if lower_is_better(metric) else -r[metric])
    if not ok:
        cheapest = min((r[cost] for r in rows if r.get(cost) is not None), default=math.nan)
        return {"budget": budget, "cost": cost, "metric": metric, "best": None, "runner_up": None,
                "message": f"nothing fits a budget of {budget:g}; the cheapest configuration costs {cheapest:g}"}
    best = ok[0]
    runner = next((r for r in ok[1:] if (r["size"], bool(r.get("distilled"))) != (best["size"], bool(best.get("distilled")))), None)
    return {"budget": budget, "cost": cost, "metric": metric, "best": _choice(best, metric, cost),
            "runner_up": _choice(runner, metric, cost) if runner else None}


def _choice(r: dict, metric: str, cost: str) -> dict:
    return {"size": r["size"], "distilled": bool(r.get("distilled")), "sampler": r["sampler"], "steps": r["steps"],
            "guidance": r["guidance"], metric: r[metric], f"{metric}_std": r.get(f"{metric}_std"),
            cost: r[cost], "sampling_cost": r.get("sampling_cost"), "model_calls_per_image": r.get("model_calls_per_image"),
            "latency_ms_per_image": r.get("latency_ms_per_image"), "task": r.get("task", "text-to-image")}


def describe_choice(c: dict | None, metric: str) -> str:
    if c is None:
        return "none"
    std = c.get(f"{metric}_std")
    unc = f" ± {std:.3g}" if std is not None else ""
    tag = " (distilled)" if c.get("distilled") else ""
    return (f"{c['size']}{tag} with {c['sampler']} at {c['steps']} steps, guidance {c['guidance']:g}: "
            f"{metric} {c[metric]:.4g}{unc} (sampling cost {c['sampling_cost']:.3g}, "
            f"{c['latency_ms_per_image']:.1f} ms/image here)")
