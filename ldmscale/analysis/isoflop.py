"""The compute-optimal question, by Chinchilla's IsoFLOP method (Hoffmann et al. 2022, approach 2) as Liang et al.
(2024) apply it to diffusion transformers. Pure functions of a table of (budget, params, loss) rows.

- per training budget C: loss against log(params) with a fitted parabola; its minimum gives N_opt(C), L_opt(C);
- across budgets: N_opt(C) = k C^a and L_opt(C) = e C^-b as power laws (least squares in log-log), with
  bootstrap intervals (resampling each budget's rows, refitting everything);
- a prediction for a budget outside the fitted ones, with its interval, to check against a run trained to it;
- the relation of validation loss to a sample metric (Spearman, and a line fit in log loss), so a predicted loss
  reads as a predicted quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ldmscale.names import Kind, backbone_of, task_of


@dataclass
class Parabola:
    budget: float
    a: float  # loss = a x^2 + b x + c, x = log10(params)
    b: float
    c: float
    points: int
    lo: float  # the fitted sizes' range, log10(params)
    hi: float

    @property
    def ok(self) -> bool:
        """A minimum exists (a > 0) and lies within the sizes trained at this budget: else the optimum is
        outside them and N_opt is not measured (reported, not extrapolated)."""
        return self.a > 0 and self.lo <= self.x_opt <= self.hi

    @property
    def x_opt(self) -> float:
        return -self.b / (2 * self.a) if self.a else math.nan

    @property
    def n_opt(self) -> float:
        return 10**self.x_opt

    @property
    def loss_opt(self) -> float:
        x = self.x_opt
        return self.a * x * x + self.b * x + self.c

    @property
    def why(self) -> str:
        if self.a <= 0:
            return "loss is not convex in log(size) here: no interior optimum"
        if not self.ok:
            side, add = ("largest", "larger") if self.x_opt > self.hi else ("smallest", "smaller")
            return f"the optimum lies beyond the {side} size trained at this budget: add {add} sizes"
        return ""


def fit_parabola(budget: float, params: list[float], losses: list[float]) -> Parabola:
    x = np.log10(np.asarray(params, dtype=float))
    y = np.asarray(losses, dtype=float)
    if len(set(x.tolist())) < 3:
        return Parabola(budget, math.nan, math.nan, math.nan, len(x), float(x.min()), float(x.max()))
    a, b, c = np.polyfit(x, y, 2)
    return Parabola(budget, float(a), float(b), float(c), len(x), float(x.min()), float(x.max()))


@dataclass
class LogLine:
    """y = k * C^a, fitted as log10 y = log10 k + a log10 C."""

    a: float
    log_k: float
    interval_a: tuple[float, float] = (math.nan, math.nan)
    replicates: list[tuple[float, float]] = field(default_factory=list)  # bootstrap (a, log_k)

    def __call__(self, c: float) -> float:
        return 10 ** (self.log_k + self.a * math.log10(c))

    def interval(self, c: float, level: float = 0.9) -> tuple[float, float]:
        if not self.replicates:
            return (math.nan, math.nan)
        ys = [10 ** (lk + a * math.log10(c)) for a, lk in self.replicates]
        q = (1 - level) / 2
        return float(np.quantile(ys, q)), float(np.quantile(ys, 1 - q))


def _line(cs: list[float], ys: list[float]) -> tuple[float, float]:
    a, lk = np.polyfit(np.log10(cs), np.log10(ys), 1)
    return float(a), float(lk)


def _group(rows: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in rows:
        out.setdefault(float(r["budget"]), []).append(r)
    return dict(sorted(out.items()))


def _fits(groups: dict[float, list[dict]], loss_key: str) -> list[Parabola]:
    return [fit_parabola(c, [r["params"] for r in g], [r[loss_key] for r in g]) for c, g in groups.items()]


@dataclass
class IsoFlop:
    parabolas: list[Parabola]
    n_opt: LogLine | None  # N_opt(C)
    loss_opt: LogLine | None  # L_opt(C), a decaying power law: a < 0
    why: str = ""  # when a law could not be fitted
    interior: dict[float, float] = field(default_factory=dict)  # per budget: the share of bootstrap replicates whose
    # parabola has its minimum inside the sizes (how firmly the optimum is bracketed)

    def predict(self, budget: float, level: float = 0.9) -> dict:
        if self.n_opt is None or self.loss_opt is None:
            return {"budget": budget, "why": self.why}
        return {
            "budget": budget,
            "n_opt": self.n_opt(budget),
            "n_opt_interval": self.n_opt.interval(budget, level),
            "loss": self.loss_opt(budget),
            "loss_interval": self.loss_opt.interval(budget, level),
        }


def isoflop(rows: list[dict], loss_key: str = "val_loss", bootstrap: int = 200, seed: int = 0) -> IsoFlop:
    """rows: {"budget": training FLOPs, "params": N, loss_key: loss}, several sizes per budget. With standard errors
    (`<loss_key>_std` on every row) the bootstrap redraws each loss from its error (one row per size and budget
    is the usual table); without them it resamples each budget's rows (repeated runs per size)."""
    groups = _group([r for r in rows if r.get(loss_key) is not None and math.isfinite(r[loss_key])])
    parabolas = _fits(groups, loss_key)
    good = [p for p in parabolas if p.ok]
    n_line = LogLine(*_line([p.budget for p in good], [p.n_opt for p in good])) if len(good) >= 2 else None
    l_line = LogLine(*_line([p.budget for p in good], [p.loss_opt for p in good])) if len(good) >= 2 else None
    interior = {c: 0 for c in groups}
    rng = np.random.default_rng(seed)
    std_key = f"{loss_key}_std"
    parametric = all(r.get(std_key) is not None for g in groups.values() for r in g)
    for _ in range(bootstrap):  # redraw, refit the parabolas and the lines
        if parametric:
            boot = {
                c: [r | {loss_key: r[loss_key] + r[std_key] * rng.standard_normal()} for r in g]
                for c, g in groups.items()
            }
        else:
            boot = {c: [g[i] for i in rng.integers(0, len(g), len(g))] for c, g in groups.items()}
        fits = [p for p in _fits(boot, loss_key) if p.ok]
        for p in fits:
            interior[p.budget] += 1
        if len(fits) >= 2 and n_line is not None:
            n_line.replicates.append(_line([p.budget for p in fits], [p.n_opt for p in fits]))
            l_line.replicates.append(_line([p.budget for p in fits], [p.loss_opt for p in fits]))
    share = {c: k / bootstrap for c, k in interior.items()} if bootstrap else {}
    if n_line is None:
        why = (
            f"an interior optimum at {len(good)} of {len(parabolas)} budgets; the power laws need 2 or more "
            "(train smaller and larger sizes around the optimum)"
        )
        return IsoFlop(parabolas, None, None, why, share)
    for line in (n_line, l_line):
        if line.replicates:
            a = [r[0] for r in line.replicates]
            line.interval_a = (float(np.quantile(a, 0.05)), float(np.quantile(a, 0.95)))
    return IsoFlop(parabolas, n_line, l_line, interior=share)


def loss_to_metric(rows: list[dict], metric: str, loss_key: str = "val_loss") -> dict | None:
    """How validation loss reads as sample quality across checkpoints: Spearman's rho and metric = u + v log10(loss)."""
    from scipy.stats import spearmanr

    pts = [(r[loss_key], r[metric]) for r in rows if r.get(loss_key) is not None and r.get(metric) is not None]
    if len(pts) < 3:
        return None
    x, y = np.log10([p[0] for p in pts]), np.asarray([p[1] for p in pts], dtype=float)
    v, u = np.polyfit(x, y, 1)
    rho = spearmanr(x, y).statistic
    return {
        "points": len(pts),
        "spearman": float(rho),
        "intercept": float(u),
        "slope": float(v),
        "metric": metric,
        "read": lambda loss: float(u + v * math.log10(loss)),
    }


def _parabola_dict(p: Parabola) -> dict:
    return {
        "budget": p.budget,
        "a": p.a,
        "b": p.b,
        "c": p.c,
        "points": p.points,
        "ok": p.ok,
        "why": p.why,
        "n_opt": p.n_opt if p.ok else None,
        "loss_opt": p.loss_opt if p.ok else None,
    }


def _parabolas(fit: IsoFlop) -> list[dict]:
    return [_parabola_dict(p) | {"interior_share": fit.interior.get(p.budget)} for p in fit.parabolas]


def _law_dict(line: LogLine | None) -> dict | None:
    if line is None:
        return None
    return {
        "exponent": line.a,
        "log10_k": line.log_k,
        "interval": list(line.interval_a),
        "replicates": len(line.replicates),
    }


def study_isoflop(
    rows: list[dict], budgets: list[float], metric: str, curve: tuple, loss_key: str = "val_loss", bootstrap: int = 200
) -> dict:
    """A study's IsoFLOP analysis, per backbone: each size's checkpoints at the budgets (evaluated at the curve
    setting), the parabolas, N_opt(C) and L_opt(C) on all budgets, the largest budget predicted from the others
    and measured, and how loss reads as the primary metric over every checkpoint."""
    sampler, steps, guidance = curve
    on_curve = [
        r
        for r in rows
        if r.get("sampler") == sampler
        and int(r.get("steps", -1)) == steps
        and float(r.get("guidance", -1)) == float(guidance)
        and not r.get("tag")
        and task_of(r) == Kind.TEXT_TO_IMAGE
        and r.get(loss_key) is not None
    ]
    held = max(budgets)
    out = {}
    for bb in sorted({backbone_of(r) for r in on_curve}):
        mine = [r for r in on_curve if backbone_of(r) == bb]
        pts = []
        for r in mine:  # a checkpoint belongs to the budget it reached (steps are whole: within a few percent)
            b = min(budgets, key=lambda x: abs(math.log10(float(r["train_flops"]) / x)))
            if abs(math.log10(float(r["train_flops"]) / b)) < 0.1:
                pts.append(
                    {
                        "budget": b,
                        "params": int(r["params"]),
                        "size": r["size"],
                        loss_key: float(r[loss_key]),
                        f"{loss_key}_std": r.get(f"{loss_key}_std"),
                        metric: r.get(metric),
                        f"{metric}_std": r.get(f"{metric}_std"),
                        "train_flops": float(r["train_flops"]),
                    }
                )
        full = isoflop(pts, loss_key, bootstrap)
        fit = isoflop([p for p in pts if p["budget"] != held], loss_key, bootstrap)
        measured = next((p for p in full.parabolas if p.budget == held), None)
        predicted = fit.predict(held)
        rel = loss_to_metric(mine, metric, loss_key)
        on_metric = isoflop([p for p in pts if p.get(metric) is not None], metric, bootstrap)  # the same on quality
        out[bb] = {
            "points": sorted(pts, key=lambda p: (p["budget"], p["params"])),
            "parabolas": _parabolas(full),
            "n_opt": _law_dict(full.n_opt),
            "loss_opt": _law_dict(full.loss_opt),
            "why": full.why,
            "held_out": {
                "budget": held,
                "predicted": predicted,
                "outcome": held_out_outcome(predicted, measured),
                "fitted_on": sorted({p["budget"] for p in pts} - {held}),
                "measured": _parabola_dict(measured) if measured else None,
                "best_trained": min((p for p in pts if p["budget"] == held), key=lambda p: p[loss_key], default=None),
            },
            "rising": rising(pts, loss_key),
            "loss_to_metric": {k: v for k, v in rel.items() if k != "read"} if rel else None,
            "on_metric": {
                "metric": metric,
                "parabolas": _parabolas(on_metric),
                "n_opt": _law_dict(on_metric.n_opt),
                "why": on_metric.why,
            },
        }
        out[bb] = _finite(out[bb]) | {"_fit": full, "_rel": rel}
    return out


def rising(points: list[dict], loss_key: str = "val_loss") -> list[str]:
    """A size whose loss at a budget is above its loss at a smaller one by over 3 standard errors of the difference:
    more compute made it worse (a diverged or spiking run), which a parabola would take for a sign of size."""
    out = []
    for size in dict.fromkeys(p["size"] for p in points):
        mine = sorted((p for p in points if p["size"] == size), key=lambda p: p["budget"])
        for i, p in enumerate(mine[1:], 1):
            best = min(mine[:i], key=lambda q: q[loss_key])
            se = math.hypot(p.get(f"{loss_key}_std") or 0.0, best.get(f"{loss_key}_std") or 0.0)
            if se > 0 and p[loss_key] - best[loss_key] > 3 * se:
                out.append(
                    f"{size} at {p['budget']:.3g} FLOPs: loss {p[loss_key]:.4f}, above its {best[loss_key]:.4f} at "
                    f"{best['budget']:.3g} by {(p[loss_key] - best[loss_key]) / se:.0f} standard errors (diverged?)"
                )
    return out


def held_out_outcome(predicted: dict, measured: Parabola | None) -> str:
    """Whether the held-out budget's measured optimum (its size, then its loss) fell inside the intervals predicted
    from the other budgets: each is "inside the prediction" or "a miss"."""
    if "n_opt" not in predicted:
        return f"not predicted: {predicted.get('why', '')}"
    if measured is None or not measured.ok:
        return "not measured: " + (measured.why if measured else "no runs at the held-out budget")
    out = [_judge("N_opt", measured.n_opt, predicted["n_opt_interval"], ".3g")]
    if predicted.get("loss_interval"):
        out.append(_judge("loss", measured.loss_opt, predicted["loss_interval"], ".4f"))
    return "; ".join(out)


def _judge(name: str, value: float, interval, fmt: str) -> str:
    lo, hi = interval
    if lo <= value <= hi:
        return f"inside the prediction: {name} {value:{fmt}} in [{lo:{fmt}}, {hi:{fmt}}]"
    return f"a miss: {name} {value:{fmt}} outside the predicted [{lo:{fmt}}, {hi:{fmt}}]"


def _finite(obj):
    """nan and inf (a parabola through fewer than 3 sizes, an empty interval) as None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def plan_training(iso: dict, budget: float, sizes: list[dict], metric: str) -> dict:
    """For a training budget: the compute-optimal size (N_opt), the trained size nearest to it, the images that
    budget buys at that size's forward FLOPs, and the predicted loss and sample quality."""
    fit, rel = iso["_fit"], iso["_rel"]
    pred = fit.predict(budget)
    if "n_opt" not in pred:
        return {"budget": budget, "why": pred["why"]}
    near = min(sizes, key=lambda s: abs(math.log10(s["params"] / pred["n_opt"])))
    return pred | {
        "size": near["size"],
        "size_params": near["params"],
        "images": int(budget / (3 * near["forward_flops"])),
        "quality": rel["read"](pred["loss"]) if rel else None,
        "metric": metric,
        "quality_spearman": rel["spearman"] if rel else None,
    }
