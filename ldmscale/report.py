"""`ldmscale study report`: figures (PNG and SVG), a Markdown summary and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ldmscale import analysis, plots
from ldmscale.config import UserError
from ldmscale.io import atomic_write, atomic_write_json, atomic_write_text


def default_budgets(rows: list[dict]) -> list[float]:
    """A small and a large sampling budget: the 25th percentile and the maximum of the measured costs."""
    costs = sorted(r["sampling_cost"] for r in rows if r.get("sampling_cost") is not None)
    if not costs:
        return []
    return [float(np.percentile(costs, 25)), float(costs[-1])]


def analyze(rows: list[dict], study) -> dict:
    """Everything the report states, as plain data (also written to report/analysis.json)."""
    ev = study.eval
    metric = ev.primary
    t2i = [r for r in rows if r.get("task", "text-to-image") == "text-to-image"]
    final = analysis.final_rows(t2i)
    grid = [r for r in final if not (r["sampler"] == ev.curve_sampler and r["steps"] == ev.curve_steps
                                     and float(r["guidance"]) == ev.curve_guidance and r["guidance"] not in ev.guidance)]
    best = analysis.best_over_guidance(grid, metric)
    curves = analysis.training_curves(t2i, metric, ev.curve_sampler, ev.curve_steps, ev.curve_guidance)
    fits = {}
    for size, pts in curves.items():
        if len(pts) >= 3:
            try:
                fits[size] = analysis.fit_power_law([p["train_flops"] for p in pts], [p[metric] for p in pts],
                                                    lower_better=analysis.lower_is_better(metric))
            except (RuntimeError, ValueError):
                pass
    budgets = default_budgets(best)
    out = {
        "metric": metric, "rows": len(rows), "best_over_guidance": best, "curves": curves,
        "fits": {s: {"a": f.a, "b": f.b, "c": f.c, "ci": f.ci, "ok": f.ok} for s, f in fits.items()},
        "frontier": analysis.pareto_frontier(best, metric),
        "crossovers": {smp: analysis.crossovers([r for r in best if r["sampler"] == smp], metric)
                       for smp in sorted({r["sampler"] for r in best})},
        "crossovers_all_samplers": analysis.crossovers(best, metric),
        "plans": [analysis.plan(best, b, metric) for b in budgets],
        "_fit_objects": fits,
    }
    out["tasks"] = task_analysis(rows, curves, metric)
    out["distillation"] = distillation_table(best, metric)
    align = next((m for m in ("caption-accuracy", "clip_cosine") if any(r.get(m) is not None for r in rows)), None)
    if align and align != metric:
        out["alignment_metric"] = align
        out["alignment_best"] = analysis.best_over_guidance(grid, align)
    return out


TASK_METRIC = {"super-resolution": "psnr", "dreambooth": "subject-ssim"}


def task_analysis(rows: list[dict], curves: dict, pre_metric: str) -> dict:
    """Per downstream task: best rows over guidance, and (pretraining, downstream) quality per size."""
    out = {}
    for task in sorted({r.get("task") for r in rows} - {"text-to-image", None}):
        metric = TASK_METRIC.get(task, pre_metric)
        mine_rows = [r for r in rows if r.get("task") == task]
        if task == "dreambooth" and all(r.get(metric) is None for r in mine_rows):
            metric = "subject-fidelity"  # results evaluated before subject-ssim existed
        best = analysis.best_over_guidance(analysis.final_rows(mine_rows), metric)
        points = []
        for size in sorted({r["size"] for r in best}):
            mine = [r for r in best if r["size"] == size]
            top = max(r["steps"] for r in mine)
            down = [r[metric] for r in mine if r["steps"] == top]
            pick = min(down) if analysis.lower_is_better(metric) else max(down)
            if size in curves:
                points.append({"size": size, "pretrain": curves[size][-1][pre_metric], "downstream": pick, "steps": top})
        out[task] = {"metric": metric, "best_over_guidance": best, "points": points}
    return out


def distillation_table(best: list[dict], metric: str) -> list[dict]:
    """The paper's comparison: each distilled model at 4 steps against the best undistilled configuration
    of the same or lower sampling cost."""
    plain = [r for r in best if not r.get("distilled")]
    out = []
    for d in sorted((r for r in best if r.get("distilled") and r["steps"] == 4), key=lambda r: r["norm_cost"]):
        rival = analysis.plan(plain, d["sampling_cost"], metric)["best"]
        out.append({"distilled": d["size"], "sampler": d["sampler"], "steps": 4, "sampling_cost": d["sampling_cost"],
                    metric: d[metric], "undistilled_best": rival})
    return out


def _save(fig, folder: Path, name: str) -> dict:
    import matplotlib.pyplot as plt

    paths = {}
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130)
        data = buf.getvalue()
        atomic_write(folder / f"{name}.{ext}", lambda tmp, d=data: Path(tmp).write_bytes(d))
        paths[ext] = data
    plt.close(fig)
    return paths


def build_report(out: str | Path, study, overlay_paper: bool = False) -> dict:
    from ldmscale.study import collect, write_csv

    out = Path(out)
    rows = collect(out)
    if not rows:
        raise UserError(f"no evaluation results under {out}; run `ldmscale study run` first")
    write_csv(rows, out / "results.csv")
    a = analyze(rows, study)
    metric = a["metric"]
    folder = out / "report"
    figs = {}
    if a["curves"]:
        figs["training_compute"] = ("Quality vs training compute (per size, power-law fits)",
                                    _save(plots.training_compute(a["curves"], a["_fit_objects"], metric), folder, "training_compute"))
    best = a["best_over_guidance"]
    figs["steps"] = ("Quality vs sampling steps (best guidance per point)",
                     _save(plots.per_sampler(best, metric, "steps", "Quality vs sampling steps", "sampling steps"), folder, "steps"))
    figs["sampling_cost"] = ("Quality vs sampling cost (normalized cost x steps), with the Pareto frontier",
                             _save(plots.per_sampler(best, metric, "sampling_cost", "Quality vs sampling cost",
                                                     "sampling cost (normalized cost x steps)", frontier=True), folder, "sampling_cost"))
    figs["latency"] = ("Quality vs measured latency on this machine",
                       _save(plots.per_sampler(best, metric, "latency_ms_per_image", "Quality vs latency",
                                               "ms per image (this machine)", frontier=True), folder, "latency"))
    if "alignment_best" in a:
        am = a["alignment_metric"]
        figs["alignment"] = (f"Text alignment ({am}) vs sampling cost",
                             _save(plots.per_sampler(a["alignment_best"], am, "sampling_cost", f"{am} vs sampling cost",
                                                     "sampling cost (normalized cost x steps)"), folder, "alignment"))
    for task, ta in a["tasks"].items():
        tm = ta["metric"]
        if ta["best_over_guidance"]:
            figs[f"{task}_cost"] = (f"{task}: {tm} vs sampling cost",
                                    _save(plots.per_sampler(ta["best_over_guidance"], tm, "sampling_cost", f"{task}: {tm} vs sampling cost",
                                                            "sampling cost (normalized cost x steps)"), folder, f"{task}_cost"))
        if len(ta["points"]) >= 2:
            figs[f"{task}_vs_pretraining"] = (f"{task}: downstream vs pretraining quality",
                                              _save(plots.downstream_vs_pretraining(ta["points"], metric, tm, task), folder,
                                                    f"{task}_vs_pretraining"))
    if overlay_paper:
        figs["paper"] = ("The paper's Table 1 beside this study", _save(plots.paper_overlay(best, metric), folder, "paper"))
    md = summary_markdown(a, study, figs)
    atomic_write_text(folder / "summary.md", md)
    atomic_write_text(folder / "report.html", to_html(a, study, figs))
    atomic_write_json(folder / "analysis.json", {k: v for k, v in a.items() if not k.startswith("_")})
    return {"html": str(folder / "report.html"), "markdown": str(folder / "summary.md"), "plans": a["plans"],
            "analysis": a}


def summary_markdown(a: dict, study, figs: dict) -> str:
    metric = a["metric"]
    lines = [f"# {study.name}: scaling report", "",
             f"Primary metric: **{metric}** ({'lower' if analysis.lower_is_better(metric) else 'higher'} is better); "
             f"{a['rows']} evaluation results; guidance chosen per (size, sampler, steps) as the paper does.", ""]
    lines += ["## Planner", ""]
    for p in a["plans"]:
        lines.append(f"- budget {p['budget']:.3g} (sampling cost): best **{analysis.describe_choice(p['best'], metric)}**; "
                     f"runner-up {analysis.describe_choice(p['runner_up'], metric)}")
    lines += ["", "## Power-law fits (metric = a * compute^-b + c)", "", "| size | a | b (90% CI) | c (90% CI) |", "|---|---|---|---|"]
    for s, f in a["fits"].items():
        if not f["ok"]:
            lines.append(f"| {s} | no decaying power law: quality did not improve steadily with compute | | |")
            continue
        ci_b = f["ci"].get("b", (float("nan"),) * 2)
        ci_c = f["ci"].get("c", (float("nan"),) * 2)
        lines.append(f"| {s} | {f['a']:.4g} | {f['b']:.3f} ({ci_b[0]:.3f}-{ci_b[1]:.3f}) | {f['c']:.4g} ({ci_c[0]:.4g}-{ci_c[1]:.4g}) |")
    lines += ["", "## Crossovers (the budget below which the smaller model is better)", "",
              "| sampler | smaller | larger | crossover sampling cost |", "|---|---|---|---|"]
    for smp, xs in list(a["crossovers"].items()) + [("all", a["crossovers_all_samplers"])]:
        for x in xs:
            v = "smaller wins at every budget measured" if x["crossover"] is None else f"{x['crossover']:.3g}"
            lines.append(f"| {smp} | {x['smaller']} | {x['larger']} | {v} |")
    lines += ["", "## Pareto frontier (all samplers)", "", "| size | sampler | steps | guidance | sampling cost | " + metric + " |",
              "|---|---|---|---|---|---|"]
    for r in a["frontier"]:
        lines.append(f"| {r['size']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['sampling_cost']:.3g} | {r[metric]:.4g} |")
    if a.get("distillation"):
        lines += ["", "## Distilled at 4 steps vs undistilled at the same sampling cost", "",
                  f"| distilled | sampling cost | {metric} | best undistilled within that cost | its {metric} |", "|---|---|---|---|---|"]
        for d in a["distillation"]:
            u = d["undistilled_best"]
            rival = f"{u['size']} {u['sampler']} {u['steps']} steps" if u else "none fits"
            lines.append(f"| {d['distilled']} ({d['sampler']}) | {d['sampling_cost']:.3g} | {d[metric]:.4g} | {rival} | "
                         f"{u[metric]:.4g} |" if u else f"| {d['distilled']} | {d['sampling_cost']:.3g} | {d[metric]:.4g} | {rival} | - |")
    for task, ta in a.get("tasks", {}).items():
        tm = ta["metric"]
        lines += ["", f"## {task}", "", f"| size | steps | pretraining {metric} | {task} {tm} |", "|---|---|---|---|"]
        for p in ta["points"]:
            lines.append(f"| {p['size']} | {p['steps']} | {p['pretrain']:.4g} | {p['downstream']:.4g} |")
    lines += ["", "## Figures", ""]
    for name, (title, _) in figs.items():
        lines.append(f"![{title}]({name}.png)")
    return "\n".join(lines) + "\n"


def to_html(a: dict, study, figs: dict) -> str:
    """One self-contained page: figures embedded as base64 PNG, the Markdown tables rendered simply."""
    md = summary_markdown(a, study, {})
    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<p>&bull; {html.escape(line[2:]).replace('**', '')}</p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    body.append("<h2>Figures</h2>")
    for name, (title, data) in figs.items():
        b64 = base64.b64encode(data["png"]).decode()
        body.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


