"""The verdict and its building blocks, shared by the claims (claims.py): the three outcomes, a comparison of two
rows at matched cost, and the crossover test of claims 3-5 (is a smaller size better at some budget where both run,
and the larger at the top?) judged with Holm's correction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ldmscale.analysis import scaling as analysis
from ldmscale.analysis import stats
from ldmscale.names import Kind, task_of

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
PAPER_SAMPLERS = ("ddim", "ddpm", "dpmsolver++")
SMALL_STEPS = 20  # claim 5: "at small step counts"
COST = "executed_cost"  # the axis of claims 3-6: normalized cost x model calls per image, as each sampler runs
STATEMENTS = {
    1: "Pretraining quality improves with training compute, and the bigger model wins with enough of it.",
    2: "Downstream quality (super-resolution, DreamBooth) follows pretraining quality.",
    3: "Under a small sampling budget a smaller model beats a larger one (bigger is not always better).",
    4: "The sampler (DDIM, DDPM, DPM-Solver++) does not change that trend.",
    5: "The same holds for downstream tasks at small step counts.",
    6: "Distillation does not change it: a distilled larger model is matched by an undistilled smaller one at "
    "similar cost.",
}


@dataclass
class Verdict:
    claim: int
    verdict: str
    evidence: str
    reason: str = ""
    data: dict = field(default_factory=dict)
    noise: str = ""  # which noise the standard errors behind the verdict hold

    @property
    def statement(self) -> str:
        return STATEMENTS[self.claim]

    def as_dict(self) -> dict:
        return {
            "claim": self.claim,
            "statement": self.statement,
            "verdict": self.verdict,
            "evidence": self.evidence,
            "reason": self.reason,
            "noise": self.noise,
            "data": self.data,
        }


def fmt(y: float, e: float | None) -> str:
    return f"{y:.4g}" + (f" ± {e:.2g}" if e is not None else " (no standard error)")


def row_text(r: dict, metric: str) -> str:
    return fmt(r[metric], stats.std(r, metric))


def compare_rows(a: dict, b: dict, metric: str) -> dict:
    return stats.compare(
        a[metric],
        stats.std(a, metric),
        b[metric],
        stats.std(b, metric),
        metric,
        stats.dof(a, metric),
        stats.dof(b, metric),
    )


def pretraining(rows: list[dict]) -> list[dict]:
    return [r for r in rows if task_of(r) == Kind.TEXT_TO_IMAGE and not r.get("distilled")]


def by_cost(rows: list[dict]) -> list[str]:
    sizes: dict[str, float] = {}
    for r in rows:
        sizes.setdefault(r["size"], float(r.get("norm_cost") or 0))
    return sorted(sizes, key=sizes.get)


def p_worse(c: dict) -> float:
    """One-sided p-value of the opposite direction of a comparison (a worse than b)."""
    return stats.tail(-c["z"], c.get("df")) if c["se"] else 1.0


def crossover_tests(rows: list[dict], metric: str, cost: str = COST) -> list[dict]:
    """Per sampler and pair of sizes, at matched cost inside the range both were measured: is the smaller better at
    some budget (Simes' combination of the budgets' p-values), and the larger at the top of that range?
    `p` is the larger of the two: both must hold (an intersection-union test)."""
    rows = analysis.with_costs(rows) if cost == COST else rows
    best = [r for r in analysis.best_over_guidance(analysis.final_rows(rows), metric) if r.get(cost) is not None]
    tests = []
    for sampler in sorted({r["sampler"] for r in best}):
        mine = [r for r in best if r["sampler"] == sampler]
        sizes = by_cost(mine)
        for i, small in enumerate(sizes):
            for large in sizes[i + 1 :]:
                a, b = (stats.curve([r for r in mine if r["size"] == s], cost, metric) for s in (small, large))
                m = stats.matched(a, b, metric)
                if not m:
                    continue
                k = min(range(len(m)), key=lambda j: m[j]["p"])
                p_small = stats.simes([c["p"] for c in m])
                p_large = p_worse(m[-1])
                tests.append(
                    {
                        "sampler": sampler,
                        "smaller": small,
                        "larger": large,
                        "budgets": m,
                        "small_best": m[k],
                        "top": m[-1],
                        "p_small": p_small,
                        "p_large": p_large,
                        "p": max(p_small, p_large),
                        "p_reversed": p_worse(m[0]) if len(m) > 1 else 1.0,
                        "p_small_top": m[-1]["p"],
                    }
                )
    return tests


def describe(t: dict, cost: str = COST) -> str:
    s, top = t["small_best"], t["top"]
    return (
        f"{t['smaller']} -> {t['larger']} with {t['sampler']}: at {cost.replace('_', ' ')} {s['x']:.3g} "
        f"{t['smaller']} {fmt(s['a'], s['a_std'])} vs {t['larger']} {fmt(s['b'], s['b_std'])} (z = {s['z']:.1f}); "
        f"at {top['x']:.3g} {t['larger']} {fmt(top['b'], top['b_std'])} vs {t['smaller']} "
        f"{fmt(top['a'], top['a_std'])} (z = {-top['z']:.1f})"
    )


def holm_text(test: dict) -> str:
    # three digits: an adjusted p of 0.02265 passes ALPHA = 0.02275, and "0.023" would read as failing it
    return f"Holm-adjusted p = {test['p_adjusted']:.3g} (passes at {stats.ALPHA:.3g} or less)"


def judge_crossovers(claim: int, tests: list[dict], label: str = "") -> Verdict:
    """Holds when some (sampler, pair) passes after Holm; does not hold when every one is contradicted beyond noise
    (the larger better even at the cheapest budget both run, or the smaller better even at the top)."""
    if not tests:
        return Verdict(claim, NOT_MEASURED, "", f"needs two sizes measured over a common range of sampling cost{label}")
    passed, adjusted = stats.holm([t["p"] for t in tests])
    against, _ = stats.holm([min(t["p_reversed"], t["p_small_top"]) for t in tests])
    for t, ok, adj, no in zip(tests, passed, adjusted, against):
        t["significant"], t["p_adjusted"], t["contradicted"] = ok, adj, no
    data = {"tests": [{k: v for k, v in t.items() if k != "budgets"} for t in tests]}
    if any(passed):
        return Verdict(
            claim, HOLDS, "; ".join(f"{describe(t)}; {holm_text(t)}" for t in tests if t["significant"]), data=data
        )
    strongest = min(tests, key=lambda t: t["p"])
    evidence = f"closest: {describe(strongest)}; {holm_text(strongest)}"
    if all(against):
        return Verdict(
            claim,
            FAILS,
            evidence,
            "in every pair the larger size is better even at the cheapest budget "
            f"where both run, or the smaller even at the top{label}",
            data,
        )
    return Verdict(
        claim,
        NOT_MEASURED,
        evidence,
        "no smaller size is better at a small budget and the larger at the "
        f"top beyond noise, after correcting for the {len(tests)} comparisons{label}",
        data,
    )
