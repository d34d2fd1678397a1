"""How often the claims' rules say "holds": in simulated studies on a real study's grid and noise, where size has no
effect at matched cost (the null: a false "holds" rate), and where the effects are the ones measured (power).

A profile is the study's table reduced to what a simulation needs, one entry per configuration: the measured mean,
the evaluation error of one seed's value, and the training-seed spread where several seeds were trained. A simulated
study draws every configuration once per seed: truth + training noise + evaluation noise, where the training noise
of one run is shared in part by all of its configurations (a run that trained a bit better is better everywhere)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ldmscale.analysis import claims, stats
from ldmscale.analysis import scaling as analysis
from ldmscale.names import Kind

FIELDS = (
    "task",
    "size",
    "norm_cost",
    "sampler",
    "steps",
    "guidance",
    "model_calls_per_image",
    "images_seen",
    "train_flops",
    "checkpoint",
    "distilled",
)
SHARED = 0.5  # the share of a run's training variance common to all of its configurations


def profile(rows: list[dict], metric: str) -> list[dict]:
    """One entry per configuration of the table (tagged rows left out): its mean, the evaluation error of a single
    seed's value, and the training noise sd (the between-seed variance less the evaluation variance; None with one
    seed)."""
    agg = stats.aggregate_seeds([r for r in rows if not r.get("tag") and r.get(metric) is not None])
    out = []
    for r in agg:
        e = stats.std(r, f"{metric}_eval") if r.get(f"{metric}_eval_std") else None
        one = e * math.sqrt(r["n_seeds"]) if e else stats.std(r, metric)
        sd = r.get(f"{metric}_seed_sd")
        train = math.sqrt(max(0.0, sd**2 - one**2)) if sd is not None and one is not None else None
        out.append({k: r.get(k) for k in FIELDS} | {"value": r[metric], "eval_std": one, "train_std": train})
    return out


def _train_std(p: list[dict]) -> list[float]:
    """Each configuration's training noise sd; where no seeds measured it, the median ratio to the evaluation error
    over the configurations where they did (0 when no configuration has seeds)."""
    ratios = [q["train_std"] / q["eval_std"] for q in p if q["train_std"] is not None and q["eval_std"]]
    ratio = float(np.median(ratios)) if ratios else 0.0
    return [q["train_std"] if q["train_std"] is not None else ratio * (q["eval_std"] or 0.0) for q in p]


def null_world(p: list[dict], claim: int, curve: tuple, metric: str) -> list[dict]:
    """The profile with size's effect removed at matched cost. Claims 3-6: every (task, sampler) curve's value is a
    quadratic in log executed cost fitted to all sizes' points together; claim 1: the training curves' values are a
    quadratic in log training compute fitted to all sizes; claim 2: the downstream values of every size are their
    mean at each step count; claim 6: each distilled row as good as the best undistilled sampler's curve (quadratics
    in log executed cost over all sizes) at its executed cost."""
    q = [dict(x) for x in p]
    if claim == 1:
        points = [
            x
            for x in q
            if x["task"] == Kind.TEXT_TO_IMAGE
            and not x.get("distilled")
            and (x["sampler"], x["steps"], float(x["guidance"])) == (curve[0], curve[1], float(curve[2]))
        ]
        _fit(points, lambda x: math.log(x["train_flops"]))
        return q
    if claim == 2:
        for t in {x["task"] for x in q} - {Kind.TEXT_TO_IMAGE}:
            for st in {x["steps"] for x in q if x["task"] == t}:
                same = [x for x in q if x["task"] == t and x["steps"] == st]
                m = float(np.mean([x["value"] for x in same]))
                for x in same:
                    x["value"] = m
        return q
    final = _final(q)
    for key in {(x["task"], x["sampler"]) for x in final}:
        _fit(
            [x for x in final if (x["task"], x["sampler"]) == key],
            lambda x: math.log(x["norm_cost"] * x["model_calls_per_image"]),
        )
    if claim == 6:  # each distilled row as good as the best undistilled curve at its cost, and no better
        curves = {}
        for smp in {x["sampler"] for x in final if not x.get("distilled") and x["task"] == Kind.TEXT_TO_IMAGE}:
            pts = [
                x for x in final if x["sampler"] == smp and not x.get("distilled") and x["task"] == Kind.TEXT_TO_IMAGE
            ]
            lx = [math.log(x["norm_cost"] * x["model_calls_per_image"]) for x in pts]
            if len(set(lx)) > 2:
                curves[smp] = (np.polyfit(lx, [x["value"] for x in pts], 2), min(lx), max(lx))
        for x in final:
            if x.get("distilled"):
                lc = math.log(x["norm_cost"] * x["model_calls_per_image"])
                vals = [float(np.polyval(c, min(max(lc, lo), hi))) for c, lo, hi in curves.values()]
                if vals:
                    x["value"] = min(vals) if stats.lower_is_better(metric) else max(vals)
    return q


def _fit(points: list[dict], x_of) -> None:
    if len(points) < 3:
        return
    lx = [x_of(x) for x in points]
    coef = np.polyfit(lx, [x["value"] for x in points], 2 if len(set(lx)) > 2 else 1)
    for x, v in zip(points, lx):
        x["value"] = float(np.polyval(coef, v))


def _final(q: list[dict]) -> list[dict]:
    last = {}
    for x in q:
        k = (x["task"], x["size"], bool(x.get("distilled")))
        last[k] = max(last.get(k, -1), x.get("images_seen") or 0)
    return [x for x in q if (x.get("images_seen") or 0) == last[(x["task"], x["size"], bool(x.get("distilled")))]]


def draw(
    p: list[dict], seeds: int, metric: str, rng: np.random.Generator, train_std: list[float] | None = None
) -> list[dict]:
    """One simulated study: every configuration once per seed, as the rows study.collect makes."""
    train_std = _train_std(p) if train_std is None else train_std
    rows = []
    runs = sorted({(x["task"], x["size"], bool(x.get("distilled"))) for x in p})
    for s in range(seeds):
        shared = dict(zip(runs, rng.standard_normal(len(runs))))
        own = rng.standard_normal((len(p), 2))
        for x, t, (zr, ze) in zip(p, train_std, own):
            z_run = shared[(x["task"], x["size"], bool(x.get("distilled")))]
            noise = t * (math.sqrt(SHARED) * z_run + math.sqrt(1 - SHARED) * zr) + (x["eval_std"] or 0.0) * ze
            rows.append(
                {k: x[k] for k in FIELDS}
                | {
                    metric: x["value"] + noise,
                    f"{metric}_std": x["eval_std"],
                    "train_seed": s,
                    "spacing": "trailing",
                    "tag": "",
                }
            )
    return rows


def rates(
    p: list[dict],
    metric: str,
    curve: tuple,
    world: str,
    seeds: int,
    studies: int = 500,
    seed: int = 0,
    task_metrics: dict | None = None,
    which: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
) -> dict[int, Counter]:
    """For each claim, how many of `studies` simulated studies got each verdict. world: "measured" (the profile as
    it is) or "null" (each claim in its own null world: null_world; claims 3-5 share one)."""
    rng = np.random.default_rng(seed)
    train_std = _train_std(p)
    worlds: dict[int, list[dict]] = {}
    for c in which:
        worlds[c] = (
            p
            if world == "measured"
            else worlds.get(3)
            if c in (4, 5) and 3 in worlds
            else null_world(p, c, curve, metric)
        )
    groups: dict[int, list[int]] = {}
    for c, w in worlds.items():
        groups.setdefault(id(w), []).append(c)
    out: dict[int, Counter] = {c: Counter() for c in which}
    for _ in range(studies):
        for cs in groups.values():
            agg = analysis.with_costs(stats.aggregate_seeds(draw(worlds[cs[0]], seeds, metric, rng, train_std)))
            for c in cs:
                out[c][claims.check(c, agg, metric, curve, task_metrics).verdict] += 1
    return out


def summary(
    p: list[dict],
    metric: str,
    curve: tuple,
    seeds: int,
    studies: int = 500,
    seed: int = 0,
    task_metrics: dict | None = None,
) -> dict:
    """The false "holds" rate (null) and the "holds" rate (measured effects) of every claim, as fractions."""
    null = rates(p, metric, curve, "null", seeds, studies, seed, task_metrics)
    power = rates(p, metric, curve, "measured", seeds, studies, seed + 1, task_metrics)
    return {
        c: {
            "null_holds": null[c][claims.HOLDS] / studies,
            "power_holds": power[c][claims.HOLDS] / studies,
            "null": dict(null[c]),
            "measured": dict(power[c]),
        }
        for c in range(1, 7)
    }


def negative_control(rows: list[dict], metric: str, curve: tuple, task_metrics: dict | None = None) -> dict | None:
    """A real negative control: two training seeds of one size presented as two sizes of the same cost. Each seed's
    value carries its evaluation error and the training-seed spread measured for that configuration (a single seed's
    value varies by both), so no claim may hold. None when no size has two seeds."""
    t2i = [r for r in rows if not r.get("tag") and r.get(metric) is not None]
    seeds: dict[str, set] = {}
    for r in t2i:
        seeds.setdefault(r["size"], set()).add(int(r.get(stats.SEED) or 0))
    many = [s for s, k in seeds.items() if len(k) >= 2]
    if not many:
        return None
    size = max(many, key=lambda s: (len(seeds[s]), -min(float(r["norm_cost"]) for r in t2i if r["size"] == s)))
    a, b = sorted(seeds[size])[:2]
    mine = [r for r in t2i if r["size"] == size]
    spread = {}
    for g in stats.aggregate_seeds(mine):
        sd, e = g.get(f"{metric}_seed_sd"), g.get(f"{metric}_eval_std")
        one = e * math.sqrt(g["n_seeds"]) if e else 0.0
        spread[tuple(str(g.get(k)) for k in stats.CONFIG_KEY if k != "size")] = (
            math.sqrt(max(0.0, sd**2 - one**2)) if sd is not None else 0.0,
            g.get(f"{metric}_df"),
        )
    pseudo = []
    for r in mine:
        k = int(r.get(stats.SEED) or 0)
        if k not in (a, b):
            continue
        t, df = spread.get(tuple(str(r.get(x)) for x in stats.CONFIG_KEY if x != "size"), (0.0, None))
        e = stats.std(r, metric)
        pseudo.append(
            dict(
                r,
                size=f"{size} seed {k}",
                train_seed=0,
                norm_cost=float(r["norm_cost"]) * (1.0 if k == a else 1.000001),
                **{f"{metric}_std": math.hypot(e, t) if e is not None else None, f"{metric}_df": df},
            )
        )
    verdicts = claims.check_claims(pseudo, metric, curve, task_metrics)
    return {
        "size": size,
        "seeds": [a, b],
        "verdicts": [v.as_dict() for v in verdicts],
        "holds": [v.claim for v in verdicts if v.verdict == claims.HOLDS],
    }
