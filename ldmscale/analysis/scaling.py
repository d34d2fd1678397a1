"""Scaling analysis as pure functions of the results table (a list of row dicts, as study.collect makes).

- power-law fits of quality against training compute, metric = a * compute^-b + c, with bootstrap CIs;
- quality against sampling cost at the best guidance per (size, sampler, steps), as the paper does;
- the Pareto frontier, and the crossovers: the budget from which a larger model beats a smaller one, both read off
  their own curves at matched cost (executed sampling cost, or training compute);
- the planner: the best (size, sampler, steps, guidance) within a budget, and the runner-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

from ldmscale.analysis import stats
from ldmscale.eval.registry import lower_is_better
from ldmscale.names import Kind, task_of


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


def _key(r: dict) -> tuple:
    return (task_of(r), r["size"], bool(r.get("distilled")))


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

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        raise ValueError("a power law with offset needs at least 3 points")
    x0 = float(np.exp(np.mean(np.log(x))))

    def f(u, a, b, c):
        return a * u**-b + c

    def fit(xs, ys):
        # the asymptote c lies beyond the best value seen (and at or above 0 for a non-negative, lower-is-better
        # metric such as a Frechet distance): without this, 3-5 points fit a meaningless negative floor
        span = float(np.ptp(ys)) or 1.0
        if lower_better:
            lo, hi = (0.0 if ys.min() >= 0 else -np.inf), float(ys.min())
        else:
            lo, hi = float(ys.max()), np.inf
        c0 = min(max(float(ys.min()) - 0.1 * span if lower_better else float(ys.max()) + 0.1 * span, lo), hi)
        if hi - lo < 1e-12:
            hi = lo + 1e-9
        p0 = (span if lower_better else -span, 0.5, c0 if c0 < hi else (lo + hi) / 2 if np.isfinite(hi) else lo + span)
        p, _ = curve_fit(f, xs / x0, ys, p0=p0, bounds=([-np.inf, 1e-4, lo], [np.inf, 10.0, hi]), maxfev=20000)
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
        if (
            (r["sampler"], r["steps"], float(r["guidance"])) == (sampler, steps, float(guidance))
            and r.get(metric) is not None
            and not r.get("distilled")
            and task_of(r) == Kind.TEXT_TO_IMAGE
        ):
            out.setdefault(r["size"], []).append(r)
    return {k: sorted(v, key=lambda r: r["train_flops"]) for k, v in out.items()}


def pareto_frontier(rows: list[dict], metric: str, cost: str = "sampling_cost") -> list[dict]:
    """Configurations not beaten by any other at lower or equal cost, by increasing cost."""
    pts = sorted(
        (r for r in rows if r.get(metric) is not None and r.get(cost) is not None),
        key=lambda r: (r[cost], r[metric] if lower_is_better(metric) else -r[metric]),
    )
    front, best = [], None
    for r in pts:
        if best is None or _better(r[metric], best, metric):
            front.append(r)
            best = r[metric]
    return front


def with_costs(rows: list[dict]) -> list[dict]:
    """Each row with `executed_cost`: normalized cost x model calls per image, as the sampler and guidance actually
    ran (Heun's two calls a step, guidance's two, an LCM step's one), beside the paper's `sampling_cost`
    (normalized cost x steps, guidance's 2x not counted)."""
    out = []
    for r in rows:
        calls, norm = r.get("model_calls_per_image"), r.get("norm_cost")
        ex = (
            float(norm) * float(calls) if calls not in (None, "") and norm not in (None, "") else r.get("executed_cost")
        )
        out.append(dict(r, executed_cost=ex))
    return out


def crossover(small: list[dict], large: list[dict], metric: str, cost: str = "executed_cost") -> dict:
    """Where a larger model overtakes a smaller one at matched cost: both read off their own curves (linear in log
    cost) at every measured cost inside the range both cover. The crossover is the first of those budgets from which
    the larger is at least as good at every budget after it; `kind` says why there is none."""
    if cost == "executed_cost":
        small, large = with_costs(small), with_costs(large)
    a, b = stats.curve(small, cost, metric), stats.curve(large, cost, metric)
    m = stats.matched(a, b, metric)  # z > 0: the smaller is better
    small_wins = [i for i, c in enumerate(m) if c["diff"] > 0]
    if not m:
        kind, x = "no budget where both run", None
    elif not small_wins:
        kind, x = "larger wins wherever both run", None
    elif small_wins[-1] == len(m) - 1:
        kind, x = "smaller wins at every budget", None
    else:
        kind, x = "crossover", m[small_wins[-1] + 1]["x"]
    return {
        "crossover": x,
        "kind": kind,
        "budgets_where_smaller_wins": len(small_wins),
        "budgets": len(m),
        "range": (m[0]["x"], m[-1]["x"]) if m else None,
    }


def crossover_with_interval(
    small: list[dict], large: list[dict], metric: str, boot: int = 300, seed: int = 0, cost: str = "executed_cost"
) -> dict:
    """crossover() plus its uncertainty: each point is redrawn from its value and standard error (`metric`_std)
    `boot` times; `share` is the fraction of replicates with a crossover, `interval` the 5-95% range of theirs
    (evidence for the report; the claims' verdicts use stats' tests)."""
    rng = np.random.default_rng(seed)

    def redraw(rows):
        return [
            dict(r, **{metric: r[metric] + (stats.std(r, metric) or 0.0) * rng.standard_normal()})
            for r in rows
            if r.get(metric) is not None
        ]

    found = [
        x
        for x in (crossover(redraw(small), redraw(large), metric, cost)["crossover"] for _ in range(boot))
        if x is not None
    ]
    interval = (float(np.percentile(found, 5)), float(np.percentile(found, 95))) if found else None
    return crossover(small, large, metric, cost) | {"share": len(found) / boot if boot else 0.0, "interval": interval}


def crossovers(rows: list[dict], metric: str, cost: str = "executed_cost", boot: int = 0) -> list[dict]:
    """crossover() for every pair (smaller, larger) of sizes, ordered by normalized cost."""
    by_size: dict[str, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["size"], []).append(r)
    sizes = sorted(by_size, key=lambda s: by_size[s][0]["norm_cost"])
    out = []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1 :]:
            x = (
                crossover_with_interval(by_size[small], by_size[large], metric, boot, cost=cost)
                if boot
                else crossover(by_size[small], by_size[large], metric, cost)
            )
            out.append({"smaller": small, "larger": large} | x)
    return out


def training_frontier(curves: dict[str, list[dict]], metric: str, boot: int = 200) -> dict:
    """The best size at each training compute (every size read off its own curve where it was measured), the
    runner-up's distance in standard errors, and the crossovers in training compute with their intervals."""
    cs = {s: stats.curve(pts, "train_flops", metric) for s, pts in curves.items()}
    points = []
    for x in stats.knots([p[0] for c in cs.values() for p in c]):
        vals = sorted(
            ((s, v) for s, v in ((s, stats.at(c, x)) for s, c in cs.items()) if v is not None),
            key=lambda sv: sv[1][0] if lower_is_better(metric) else -sv[1][0],
        )
        (s, (y, e, d)), runner = vals[0], vals[1] if len(vals) > 1 else None
        p = {"flops": x, "best": s, "value": y, "std": e, "runner_up": None, "z": None}
        if runner:
            c = stats.compare(y, e, runner[1][0], runner[1][1], metric, d, runner[1][2])
            p |= {"runner_up": runner[0], "z": c["z"] if c["se"] else None}
        points.append(p)
    pairs = crossovers([r for pts in curves.values() for r in pts], metric, "train_flops", boot)
    return {"points": points, "crossovers": pairs}


def plan(rows: list[dict], budget: float, metric: str, cost: str = "executed_cost") -> dict:
    """The best configuration within the budget and the runner-up (the best of a different size). The budget is in
    executed cost by default (normalized cost x model calls per image, so that samplers with more calls per step and
    unguided students are placed where they really are); "sampling_cost" is the paper's axis."""
    rows = with_costs(rows) if cost == "executed_cost" else rows
    ok = sorted(
        (r for r in rows if r.get(cost) is not None and r[cost] <= budget + 1e-12 and r.get(metric) is not None),
        key=lambda r: r[metric] if lower_is_better(metric) else -r[metric],
    )
    if not ok:
        cheapest = min((r[cost] for r in rows if r.get(cost) is not None), default=math.nan)
        return {
            "budget": budget,
            "cost": cost,
            "metric": metric,
            "best": None,
            "runner_up": None,
            "message": f"nothing fits a budget of {budget:g}; the cheapest configuration costs {cheapest:g}",
        }
    best = ok[0]
    runner = next(
        (r for r in ok[1:] if (r["size"], bool(r.get("distilled"))) != (best["size"], bool(best.get("distilled")))),
        None,
    )
    return {
        "budget": budget,
        "cost": cost,
        "metric": metric,
        "best": _choice(best, metric, cost),
        "runner_up": _choice(runner, metric, cost) if runner else None,
    }


def _choice(r: dict, metric: str, cost: str) -> dict:
    return {
        "size": r["size"],
        "distilled": bool(r.get("distilled")),
        "sampler": r["sampler"],
        "steps": r["steps"],
        "guidance": r["guidance"],
        metric: r[metric],
        f"{metric}_std": r.get(f"{metric}_std"),
        cost: r[cost],
        "sampling_cost": r.get("sampling_cost"),
        "executed_cost": r.get("executed_cost"),
        "model_calls_per_image": r.get("model_calls_per_image"),
        "n_seeds": r.get("n_seeds", 1),
        "latency_ms_per_image": r.get("latency_ms_per_image"),
        "task": task_of(r),
    }


def plan_note(p: dict, metric: str) -> str:
    """How sure the planner's answer is: the gap to the runner-up in standard errors, or why there is none."""
    if p["best"] is None:
        return p["message"]
    b, r = p["best"], p["runner_up"]
    if r is None:
        return "no other size has a configuration within this budget, so there is no runner-up"
    se = float(np.hypot(b.get(f"{metric}_std") or 0.0, r.get(f"{metric}_std") or 0.0))
    gap = abs(b[metric] - r[metric])
    if se == 0:
        return f"the runner-up is {gap:.3g} worse (no standard errors recorded)"
    if gap < 2 * se:
        return (
            f"within noise: the runner-up is {gap / se:.1f} standard errors away, so either is as good at this budget"
        )
    return f"the runner-up is {gap / se:.1f} standard errors worse"


def describe_choice(c: dict | None, metric: str) -> str:
    if c is None:
        return "none"
    std = c.get(f"{metric}_std")
    unc = f" ± {std:.3g}" if std is not None else ""
    seeds = f", {c['n_seeds']} seeds" if (c.get("n_seeds") or 1) > 1 else ""
    tag = " (distilled)" if c.get("distilled") else ""
    executed = f"executed cost {c['executed_cost']:.3g}, " if c.get("executed_cost") is not None else ""
    return (
        f"{c['size']}{tag} with {c['sampler']} at {c['steps']} step{'s' * (c['steps'] != 1)}, "
        f"guidance {c['guidance']:g}: "
        f"{metric} {c[metric]:.4g}{unc}{seeds} ({executed}sampling cost {c['sampling_cost']:.3g}, "
        f"{c['latency_ms_per_image']:.1f} ms/image here)"
    )


def latency_note(rows: list[dict]) -> str:
    """Where the latencies were measured (CPU or GPU, threads) and how many on a busy machine: a 1-minute load
    average above the usable cores at the end of a measurement means other work shared the cores."""
    pts = [r for r in rows if r.get("latency_ms_per_image") is not None]
    if not pts:
        return "no latencies recorded"
    where = sorted({_machine(r) for r in pts})
    known = [r for r in pts if r.get("load_average") is not None and r.get("cores")]
    busy = [r for r in known if float(r["load_average"]) > int(r["cores"])]
    text = f"latencies measured on {'; '.join(where)}"
    if not known:
        return text + "; the load they were measured under was not recorded"
    top = max(known, key=lambda r: float(r["load_average"]))
    load = f"load average up to {float(top['load_average']):g} on {int(top['cores'])} cores"
    if busy:
        return (
            text + f"; {len(busy)} of {len(pts)} under load ({load}): those are slower than on an idle machine, "
            "so a budget in ms reads them pessimistically"
        )
    return text + f"; none under load ({load})"


def _machine(r: dict) -> str:
    device = str(r.get("device") or "cpu")
    name = r.get("cpu_model") or f"{device} (model not recorded)"
    if device != "cpu":
        name += f" ({r.get('gpu_model') or device})"
    threads = int(r.get("threads") or 0)
    return name + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")
