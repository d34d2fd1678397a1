"""The paper's figures as pure functions: rows in, matplotlib Figure out (nothing is read or written here)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from ldmscale.analysis.scaling import PowerLaw, pareto_frontier  # noqa: E402
from ldmscale.eval.registry import lower_is_better  # noqa: E402
from ldmscale.names import Backbone

# Table 1 of the paper (50-step DDIM, guidance 7.5, COCO-2014 val 30k)
PAPER_TABLE1 = {
    "params": ["39M", "83M", "145M", "223M", "318M", "430M", "558M", "704M", "866M", "2B", "5B"],
    "norm_cost": [0.07, 0.13, 0.20, 0.30, 0.40, 0.53, 0.67, 0.83, 1.00, 2.39, 5.17],
    "fid": [25.30, 24.30, 24.18, 23.76, 22.83, 22.35, 22.15, 21.82, 21.55, 20.98, 20.14],
    "clip": [0.305, 0.308, 0.310, 0.310, 0.311, 0.312, 0.312, 0.312, 0.312, 0.312, 0.314],
}


def size_order(rows: list[dict]) -> list[str]:
    """Sizes from cheapest to dearest (normalized cost)."""
    sizes = {}
    for r in rows:
        sizes.setdefault(r["size"], r.get("norm_cost", 0))
    return sorted(sizes, key=sizes.get)


def log_axis(ax, axis: str = "x", values=None) -> None:
    """A log axis that reads as plain numbers: ticks at the measured values when given (steps), else at 1-2-5 of
    each decade, labelled 0.05, 2, 1e+12 ... instead of 6x10^0, and no labels on minor ticks."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    if values is not None:
        vals = sorted({float(v) for v in values})
        a.set_major_locator(ticker.FixedLocator(vals))
    else:
        a.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(ticker.NullFormatter())


def _colors(sizes: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(sizes) - 1) * 0.9) for i, s in enumerate(sizes)}


def _label(metric: str) -> str:
    arrow = "lower is better" if lower_is_better(metric) else "higher is better"
    return f"{metric} ({arrow})"


def training_compute(curves: dict[str, list[dict]], fits: dict[str, PowerLaw], metric: str, title: str = ""):
    """Quality against training compute (images x 3 x forward FLOPs), one line per size, power-law fits dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = _colors(sorted(curves, key=lambda s: curves[s][0]["norm_cost"]))
    for size, pts in sorted(curves.items(), key=lambda kv: kv[1][0]["norm_cost"]):
        x = np.array([p["train_flops"] for p in pts])
        y = np.array([p[metric] for p in pts])
        err = [p.get(f"{metric}_std") or 0 for p in pts]
        label = size
        if size in fits and fits[size].ok:
            label += f"  (b = {fits[size].b:.2f})"
            xs = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xs, fits[size](xs), "--", color=colors[size], alpha=0.7)
        ax.errorbar(x, y, yerr=err, fmt="o-", color=colors[size], label=label, capsize=2)
    log_axis(ax)
    ax.set_xlabel("training compute (FLOPs; multiply-add = 2)")
    ax.set_ylabel(_label(metric))
    ax.set_title(title or "Quality vs training compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_sampler(
    best: list[dict], metric: str, x: str, title: str, xlabel: str, frontier: bool = False, logx: bool = True
):
    """One panel per sampler: metric against `x` (steps, sampling cost, latency), a line per size."""
    samplers = sorted({r["sampler"] for r in best})
    sizes = size_order(best)
    colors = _colors(sizes)
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.6 * len(samplers), 4.2), squeeze=False, sharey=True)
    for ax, smp in zip(axes[0], samplers):
        sub = [r for r in best if r["sampler"] == smp and r.get(x) is not None]
        for size in sizes:
            for distilled in (False, True):
                pts = sorted(
                    (r for r in sub if r["size"] == size and bool(r.get("distilled")) == distilled), key=lambda r: r[x]
                )
                if not pts:
                    continue
                ax.errorbar(
                    [p[x] for p in pts],
                    [p[metric] for p in pts],
                    yerr=[p.get(f"{metric}_std") or 0 for p in pts],
                    fmt="s--" if distilled else "o-",
                    color=colors[size],
                    capsize=2,
                    label=f"{size}{' distilled' if distilled else ''}",
                )
        if frontier and sub:
            front = pareto_frontier(sub, metric, x)
            ax.step(
                [p[x] for p in front],
                [p[metric] for p in front],
                where="post",
                color="k",
                lw=1,
                alpha=0.6,
                label="Pareto frontier",
            )
        ax.set_title(smp)
        if logx:
            log_axis(ax, values=[p[x] for p in sub] if x == "steps" else None)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(_label(metric))
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def all_samplers(best: list[dict], metric: str, x: str, xlabel: str):
    """Every sampler on one axis (a colour per size, a marker per sampler), with the Pareto frontier: on executed
    cost, samplers with different calls per step compare where they really stand."""
    sizes, samplers = size_order(best), sorted({r["sampler"] for r in best})
    colors, markers = _colors(sizes), dict(zip(samplers, "osD^v<>p*h"))
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    pts = [r for r in best if r.get(x) is not None and r.get(metric) is not None]
    for size in sizes:
        for smp in samplers:
            for distilled in (False, True):
                mine = sorted(
                    (
                        r
                        for r in pts
                        if r["size"] == size and r["sampler"] == smp and bool(r.get("distilled")) == distilled
                    ),
                    key=lambda r: r[x],
                )
                if mine:
                    ax.errorbar(
                        [r[x] for r in mine],
                        [r[metric] for r in mine],
                        yerr=[r.get(f"{metric}_std") or 0 for r in mine],
                        fmt=markers[smp] + ("--" if distilled else "-"),
                        color=colors[size],
                        capsize=2,
                        alpha=0.85,
                        ms=5,
                        label=f"{size}{' distilled' if distilled else ''} {smp}",
                    )
    front = pareto_frontier(pts, metric, x)
    if front:
        ax.step(
            [p[x] for p in front],
            [p[metric] for p in front],
            where="post",
            color="k",
            lw=1,
            alpha=0.6,
            label="Pareto frontier",
        )
    log_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_label(metric))
    ax.set_title("Quality vs executed cost, all samplers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def paper_overlay(best: list[dict], metric: str = "fid"):
    """The paper's Table 1 (FID vs normalized cost, 50-step DDIM) next to this study's points at 50 steps."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(PAPER_TABLE1["norm_cost"], PAPER_TABLE1["fid"], "k^-", label="paper Table 1 (COCO, 30k, DDIM 50)")
    for c, f, p in zip(PAPER_TABLE1["norm_cost"], PAPER_TABLE1["fid"], PAPER_TABLE1["params"]):
        ax.annotate(p, (c, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ours = sorted(
        (r for r in best if r["sampler"] == "ddim" and r["steps"] == 50 and r.get(metric) is not None),
        key=lambda r: r["norm_cost"],
    )
    if ours:
        ax.plot(
            [r["norm_cost"] for r in ours], [r[metric] for r in ours], "o-", label=f"this study ({metric}, DDIM 50)"
        )
    log_axis(ax)
    ax.set_xlabel("normalized cost (C=320 = 1)")
    ax.set_ylabel(f"FID (paper) / {metric} (this study)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def downstream_vs_pretraining(points: list[dict], pre_metric: str, down_metric: str, task: str):
    """One point per size: its pretraining quality (x) against its downstream quality (y)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    sizes = [p["size"] for p in points]
    colors = _colors(sizes)
    for p in points:
        ax.plot(p["pretrain"], p["downstream"], "o", color=colors[p["size"]], ms=8)
        ax.annotate(p["size"], (p["pretrain"], p["downstream"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"pretraining {_label(pre_metric)}")
    ax.set_ylabel(f"{task} {_label(down_metric)}")
    ax.set_title(f"{task}: downstream against pretraining quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metric_agreement(rows: list[dict], a: str, b: str):
    """One point per evaluated configuration: metric a against metric b, labelled by size and steps."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    colors = _colors(size_order(rows))
    for r in rows:
        ax.plot(r[a], r[b], "o", color=colors[r["size"]], ms=7)
        ax.annotate(
            f"{r['size']} {r['sampler']} {r['steps']}",
            (r[a], r[b]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel(_label(a))
    ax.set_ylabel(_label(b))
    ax.set_title(f"Do {a} and {b} rank the models alike?")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def isoflop(iso: dict):
    """Three panels per study: validation loss against parameters at each training budget (the IsoFLOP curves, a
    parabola in log N through each budget's sizes), N_opt against compute, and the loss frontier L_opt(C)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    markers = {Backbone.UNET: "o", Backbone.DIT: "s", Backbone.MMDIT: "^"}
    budgets = sorted({p["budget"] for bb in iso.values() for p in bb["points"]})
    cmap = plt.get_cmap("plasma")
    bcolor = {b: cmap(i / max(1, len(budgets) - 1) * 0.85) for i, b in enumerate(budgets)}
    for bb, res in iso.items():
        m = markers.get(bb, "o")
        for par in res["parabolas"]:
            pts = [p for p in res["points"] if p["budget"] == par["budget"]]
            axes[0].plot(
                [p["params"] for p in pts],
                [p["val_loss"] for p in pts],
                m,
                color=bcolor[par["budget"]],
                label=f"{bb} {par['budget']:.2g} FLOPs",
            )
            if par["a"] is not None:
                xs = np.linspace(np.log10(min(p["params"] for p in pts)), np.log10(max(p["params"] for p in pts)), 50)
                axes[0].plot(
                    10**xs, par["a"] * xs**2 + par["b"] * xs + par["c"], "--", color=bcolor[par["budget"]], lw=1
                )
            if par["ok"]:
                axes[0].plot(par["n_opt"], par["loss_opt"], "*", color=bcolor[par["budget"]], ms=11, mec="k")
        good = [p for p in res["parabolas"] if p["ok"]]
        cs = np.array([p["budget"] for p in good])
        for ax, key, law in ((axes[1], "n_opt", res["n_opt"]), (axes[2], "loss_opt", res["loss_opt"])):
            ax.plot(cs, [p[key] for p in good], m, label=bb)
            if law:
                xs = np.geomspace(min(budgets), max(budgets) * 2, 20)
                ax.plot(
                    xs,
                    10 ** (law["log10_k"] + law["exponent"] * np.log10(xs)),
                    "--",
                    lw=1,
                    label=f"{bb}: C^{law['exponent']:.2f}",
                )
    axes[0].set(xscale="log", xlabel="parameters", ylabel="validation loss", title="IsoFLOP curves (star: minimum)")
    axes[1].set(
        xscale="log", yscale="log", xlabel="training FLOPs", ylabel="compute-optimal parameters N_opt", title="N_opt(C)"
    )
    axes[2].set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="loss at N_opt", title="Loss frontier L(C)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
