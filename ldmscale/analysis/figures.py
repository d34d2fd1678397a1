"""The report's figures written to disk: each of plots.py's figures rendered from an analysis, as PNG and SVG."""

from __future__ import annotations

import io
from pathlib import Path

from ldmscale.analysis import plots
from ldmscale.analysis.plots import plt
from ldmscale.io import atomic_write


def _save(fig, folder: Path, name: str) -> dict:

    paths = {"wide": len(fig.axes) > 1}  # several panels: the report gives the figure the page's full width
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130)
        data = buf.getvalue()
        atomic_write(folder / f"{name}.{ext}", lambda tmp, d=data: Path(tmp).write_bytes(d))
        paths[ext] = data
    plt.close(fig)
    return paths


def figures(a: dict, folder: Path, overlay_paper: bool) -> dict:
    metric, best = a["metric"], a["best_over_guidance"]
    cost_label = "sampling cost (normalized cost x steps)"
    figs = {
        "sampling_cost": (
            "Quality vs sampling cost (normalized cost x steps), with the Pareto frontier",
            plots.per_sampler(best, metric, "sampling_cost", "Quality vs sampling cost", cost_label, frontier=True),
        )
    }
    if a["curves"]:
        figs["training_compute"] = (
            "Quality vs training compute (per size, power-law fits dashed)",
            plots.training_compute(a["curves"], a["_fit_objects"], metric),
        )
    figs["executed_cost"] = (
        "Quality vs executed cost (normalized cost x model calls per image), every sampler on one "
        "axis, with the Pareto frontier",
        plots.all_samplers(best, metric, "executed_cost", "executed cost (normalized cost x model calls per image)"),
    )
    figs["steps"] = (
        "Quality vs sampling steps (best guidance per point)",
        plots.per_sampler(best, metric, "steps", "Quality vs sampling steps", "sampling steps"),
    )
    figs["latency"] = (
        "Quality vs measured latency on this machine",
        plots.per_sampler(
            best, metric, "latency_ms_per_image", "Quality vs latency", "ms per image (this machine)", frontier=True
        ),
    )
    if "alignment_best" in a:
        am = a["alignment_metric"]
        figs["alignment"] = (
            f"Text alignment ({am}) vs sampling cost",
            plots.per_sampler(a["alignment_best"], am, "sampling_cost", f"{am} vs sampling cost", cost_label),
        )
    if a.get("agreement"):
        ag = a["agreement"]
        figs["agreement"] = (
            f"{ag['a']} against {ag['b']} at the final checkpoints (Spearman {ag['spearman']:.2f})",
            plots.metric_agreement(a["agreement_points"], ag["a"], ag["b"]),
        )
    if a.get("isoflop"):
        figs["isoflop"] = (
            "IsoFLOP curves, compute-optimal size and loss frontier (validation loss)",
            plots.isoflop(a["isoflop"]),
        )
    for task, ta in a["tasks"].items():
        tm = ta["metric"]
        if ta["best_over_guidance"]:
            figs[f"{task}_cost"] = (
                f"{task}: {tm} vs sampling cost",
                plots.per_sampler(
                    ta["best_over_guidance"], tm, "sampling_cost", f"{task}: {tm} vs sampling cost", cost_label
                ),
            )
        if len(ta["points"]) >= 2:
            figs[f"{task}_vs_pretraining"] = (
                f"{task}: downstream vs pretraining quality",
                plots.downstream_vs_pretraining(ta["points"], metric, tm, task),
            )
    if overlay_paper:
        figs["paper"] = ("The paper's Table 1 beside this study", plots.paper_overlay(best, metric))
    n = len(a.get("seeds") or [0])
    seeds = (
        f"; each point the mean of {n} training seeds, ± one standard error over seeds and images"
        if n > 1
        else "; one training seed, ± one standard error of the evaluation"
    )
    return {name: (title + seeds, _save(fig, folder, name)) for name, (title, fig) in figs.items()}
