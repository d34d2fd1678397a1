"""`ldmscale study report`: figures (PNG and SVG), sample grids, a Markdown summary and one self-contained HTML
page, both rendered from templates (ldmscale/analysis/templates) over the data that `analyze` computes."""

from __future__ import annotations

import base64
import hashlib
import math
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from ldmscale.analysis import calibrate, claims, stats
from ldmscale.analysis import scaling as analysis
from ldmscale.analysis.figures import figures
from ldmscale.analysis.grids import sample_grids
from ldmscale.analysis.isoflop import plan_training, study_isoflop
from ldmscale.errors import UserError
from ldmscale.eval import registry
from ldmscale.io import atomic_write_json, atomic_write_text
from ldmscale.names import Kind, backbone_of, task_of
from ldmscale.study.spec import study_eval

CALIBRATION_STUDIES = 200  # simulated studies per world in every report (`ldmscale study calibrate` runs more)


def task_metrics(primary: str) -> dict[str, tuple[str, ...]]:
    """The metrics each downstream task is judged by, one verdict per family: super-resolution by realism (the study's
    Frechet distance, as the paper reports FID) and fidelity to the high-resolution image (PSNR: a model that ignores
    its input fails it), DreamBooth by subject identity. The first is the task's headline metric."""
    realism = (primary,) if primary in ("fid", "fd-classifier") else ()
    return {Kind.SUPER_RESOLUTION: realism + ("psnr",), Kind.DREAMBOOTH: ("subject-ssim",)}


def default_budgets(rows: list[dict], cost: str = "executed_cost") -> list[dict]:
    """A small and a large sampling budget, and why: the 25th percentile and the maximum of the measured costs."""
    costs = sorted(r[cost] for r in rows if r.get(cost) is not None)
    if not costs:
        return []
    return [
        {
            "budget": float(np.percentile(costs, 25)),
            "why": "small budget: the 25th percentile of the measured executed costs",
        },
        {"budget": float(costs[-1]), "why": "large budget: the largest measured executed cost"},
    ]


def fits_table(curves: dict, metric: str) -> tuple[dict, list[dict]]:
    """Power-law fits per size, and one table row per size: its parameters, or why there are none."""
    fits, table = {}, []
    for size, pts in sorted(curves.items(), key=lambda kv: kv[1][0].get("norm_cost", 0)):
        row = {"size": size, "points": len(pts)}
        if len(pts) < 3:
            row["reason"] = f"needs 3 evaluated checkpoints, has {len(pts)}"
        else:
            try:
                f = analysis.fit_power_law(
                    [p["train_flops"] for p in pts],
                    [p[metric] for p in pts],
                    lower_better=registry.lower_is_better(metric),
                )
            except (RuntimeError, ValueError) as e:
                row["reason"] = f"the fit failed: {str(e).splitlines()[0]}"
            else:
                fits[size] = f
                if f.ok:
                    row.update(a=f.a, b=f.b, c=f.c, ci_b=f.ci.get("b"), ci_c=f.ci.get("c"))
                else:
                    row["reason"] = "no decaying power law: quality did not improve steadily with training compute"
        table.append(row)
    return fits, table


def analyze(rows: list[dict], study) -> dict:
    """Everything the report states, as plain data (also written to report/analysis.json)."""
    from ldmscale.study.plan import frechet_dims

    ev = study.eval
    metric = ev.primary
    tagged = [r for r in rows if r.get("tag")]
    raw = [r for r in rows if not r.get("tag")]  # the grid and the curves; tagged points have their own use
    # one row per configuration, averaged over training seeds: every figure, table, fit and plan reads these
    rows = analysis.with_costs(stats.aggregate_seeds(raw))
    t2i = [r for r in rows if task_of(r) == Kind.TEXT_TO_IMAGE]
    final = analysis.final_rows(t2i)
    grid = [
        r
        for r in final
        if not (
            r["sampler"] == ev.curve_sampler
            and r["steps"] == ev.curve_steps
            and float(r["guidance"]) == ev.curve_guidance
            and r["guidance"] not in ev.guidance
        )
    ]
    best = analysis.best_over_guidance(grid, metric)
    curve = (ev.curve_sampler, ev.curve_steps, ev.curve_guidance)
    dims = frechet_dims(study)  # a claim on points with fewer images than these is "not measured"
    curves = analysis.training_curves(t2i, metric, *curve)
    fits, fit_rows = fits_table(curves, metric)
    budgets = default_budgets([r for r in best if not r.get("distilled")])
    plans = []
    for b in budgets:
        p = analysis.plan(best, b["budget"], metric, "executed_cost")
        plans.append(p | {"why": b["why"], "note": analysis.plan_note(p, metric)})
    samplers = sorted({r["sampler"] for r in best})
    out = {
        "metric": metric,
        "lower_is_better": registry.lower_is_better(metric),
        "rows": len(rows),
        "best_over_guidance": best,
        "curves": curves,
        "fit_rows": fit_rows,
        "fits": {s: {"a": f.a, "b": f.b, "c": f.c, "ci": f.ci, "ok": f.ok} for s, f in fits.items()},
        "frontier": analysis.pareto_frontier(best, metric, "executed_cost"),
        "crossovers": {
            smp: analysis.crossovers(
                [r for r in best if r["sampler"] == smp and not r.get("distilled")], metric, boot=200
            )
            for smp in samplers
        },
        "training_frontier": analysis.training_frontier(curves, metric, boot=200),
        "plans": plans,
        "_fit_objects": fits,
        "noise": stats.noise_of([r for r in rows if r.get(metric) is not None]),
        "seeds": sorted({int(r.get(stats.SEED) or 0) for r in raw}),
        "claims": [v.as_dict() for v in claims.check_claims(raw, metric, curve, task_metrics(metric), dims)],
        "side_costs": side_costs(best),
    }
    if study.train.budget == "isoflop":
        iso = study_isoflop(t2i, list(study.train.budgets), metric, curve)
        # the training-budget answer beside the sampling-budget ones: twice the study's largest budget
        budget = 2 * max(study.train.budgets)
        out["training_plans"] = {}
        for bb, v in iso.items():
            sizes = {
                r["size"]: {"size": r["size"], "params": int(r["params"]), "forward_flops": float(r["gflops"]) * 1e9}
                for r in final
                if backbone_of(r) == bb
            }
            out["training_plans"][bb] = _finite_plan(plan_training(v, budget, list(sizes.values()), metric))
        out["_isoflop"] = {bb: (v.pop("_fit"), v.pop("_rel")) for bb, v in iso.items()}
        out["isoflop"] = iso
    backbones = sorted({backbone_of(r) for r in t2i})
    if len(backbones) > 1:  # the paper's claims within each family, beside the claims across all models
        out["by_backbone"] = {
            bb: {
                "claims": [
                    v.as_dict()
                    for v in claims.check_claims(
                        [r for r in raw if backbone_of(r) == bb], metric, curve, task_metrics(metric), dims
                    )
                ],
                "crossovers": analysis.crossovers(
                    [r for r in best if backbone_of(r) == bb and not r.get("distilled")], metric, boot=200
                ),
            }
            for bb in backbones
        }
    # the rules on this study's own grid and noise: false "holds" where size has no effect, and power

    out["calibration"] = calibrate.summary(
        calibrate.profile(raw, metric),
        metric,
        curve,
        len(out["seeds"]),
        CALIBRATION_STUDIES,
        task_metrics=task_metrics(metric),
    )
    out["calibration_studies"] = CALIBRATION_STUDIES
    out["negative_control"] = calibrate.negative_control(raw, metric, curve, task_metrics(metric))
    out["headline"] = headline(out)
    out["tasks"] = task_analysis(rows, curves, metric)
    out["distillation"] = distillation_table(best, metric)
    align = next((m for m in ("caption-accuracy", "clip_cosine") if any(r.get(m) is not None for r in rows)), None)
    if align and align != metric:
        out["alignment_metric"] = align
        out["alignment_best"] = analysis.best_over_guidance(grid, align)
        top = max((r for r in out["alignment_best"] if r.get(align) is not None), key=lambda r: r[align], default=None)
        out["alignment_top"] = top
    out["agreement"], out["agreement_points"] = None, []
    if ev.agreement_metric:
        pts = [
            r
            for r in tagged
            if r["tag"] == "agreement" and r.get(ev.agreement_metric) is not None and r.get(metric) is not None
        ]
        out["agreement"] = claims.metric_agreement(pts, metric, ev.agreement_metric)
        out["agreement_points"] = pts
    return out


def side_costs(best: list[dict]) -> list[dict]:
    """Per size, in normalized units (the C=320 UNet's forward pass = 1): one UNet call, and what the paper's axis
    leaves out, the text encoder on one prompt and the decoder on one image."""
    out = {}
    for r in best:
        if r.get("text_encoder_cost") is not None and r["size"] not in out:
            out[r["size"]] = {
                "size": r["size"],
                "unet": r["norm_cost"],
                "text_encoder": r["text_encoder_cost"],
                "decoder": r["decoder_cost"],
            }
    return sorted(out.values(), key=lambda x: x["unet"])


def headline(a: dict) -> str:
    """What a reader should conclude, in one line: the verdicts, the planner's two answers, the noise they hold."""
    by = {}
    for c in a["claims"]:
        by.setdefault(c["verdict"], []).append(str(c["claim"]))
    plural = {"holds": "hold", "does not hold": "do not hold"}
    verdicts = "; ".join(
        f"claim{'s' * (len(v) > 1)} {', '.join(v)} {plural.get(k, k) if len(v) > 1 else k}" for k, v in by.items()
    )
    plans = [p for p in a["plans"] if p["best"]]
    answer = ""
    if plans:
        answer = " Best within a small budget: " + _short(plans[0]["best"])
        if len(plans) > 1:
            answer += "; within the largest: " + _short(plans[-1]["best"])
        answer += "."
    return f"{verdicts}.{answer} Uncertainty: {a['noise']}."


def _short(c: dict) -> str:
    return f"{c['size']}{' (distilled)' if c.get('distilled') else ''} {c['sampler']} {c['steps']} steps"


def _finite_plan(p: dict) -> dict:

    return {
        k: (
            None
            if isinstance(v, float) and not math.isfinite(v)
            else [None if not math.isfinite(x) else x for x in v]
            if isinstance(v, tuple)
            else v
        )
        for k, v in p.items()
    }


FIDELITY = {Kind.SUPER_RESOLUTION: ("psnr", "consistency")}  # shown beside a task's headline metric


def task_analysis(rows: list[dict], curves: dict, pre_metric: str) -> dict:
    """Per downstream task: best rows over guidance, and (pretraining, downstream) quality per size."""
    out = {}
    for task in sorted({r.get("task") for r in rows} - {Kind.TEXT_TO_IMAGE, None}):
        metric = task_metrics(pre_metric).get(task, (pre_metric,))[0]
        mine_rows = [r for r in rows if r.get("task") == task]
        if task == Kind.DREAMBOOTH and all(r.get(metric) is None for r in mine_rows):
            metric = "subject-fidelity"  # results evaluated before subject-ssim existed
        best = analysis.best_over_guidance(analysis.final_rows(mine_rows), metric)
        points = []
        for size in sorted({r["size"] for r in best}):
            mine = [r for r in best if r["size"] == size]
            top = max(r["steps"] for r in mine)
            down = [r[metric] for r in mine if r["steps"] == top]
            pick = min(down) if registry.lower_is_better(metric) else max(down)
            if size in curves:
                points.append(
                    {"size": size, "pretrain": curves[size][-1][pre_metric], "downstream": pick, "steps": top}
                )
        # every step count on each metric of the task, beside bicubic upsampling of the same inputs (super-resolution)
        cols = [m for m in dict.fromkeys((metric,) + FIDELITY.get(task, ())) if any(r.get(m) is not None for r in best)]
        table = [
            {"size": r["size"], "steps": r["steps"], "values": {m: (r.get(m), r.get(f"{m}_std")) for m in cols}}
            for r in sorted(best, key=lambda r: (r["norm_cost"], r["steps"]))
        ]
        baseline = {m: next((r[f"bicubic_{m}"] for r in best if r.get(f"bicubic_{m}") is not None), None) for m in cols}
        out[task] = {
            "metric": metric,
            "best_over_guidance": best,
            "points": points,
            "columns": cols,
            "table": table,
            "bicubic": baseline if any(v is not None for v in baseline.values()) else None,
        }
    return out


def distillation_table(best: list[dict], metric: str) -> list[dict]:
    """The paper's comparison at every step count a distilled model was evaluated at: the distilled model against
    the best undistilled configuration of any smaller size within the same executed cost."""
    plain = [r for r in best if not r.get("distilled")]
    out = []
    for d in sorted((r for r in best if r.get("distilled")), key=lambda r: (r["norm_cost"], r["steps"])):
        smaller = [r for r in plain if r["norm_cost"] < d["norm_cost"]]
        rival = analysis.plan(smaller, d["executed_cost"], metric, "executed_cost")["best"] if smaller else None
        out.append(
            {
                "distilled": d["size"],
                "sampler": d["sampler"],
                "steps": d["steps"],
                "executed_cost": d["executed_cost"],
                "sampling_cost": d["sampling_cost"],
                metric: d[metric],
                f"{metric}_std": d.get(f"{metric}_std"),
                "undistilled_best": rival,
            }
        )
    return out


def provenance(out: Path, study, rows: list[dict]) -> dict:
    """What produced the report: versions, date, study file, data, reference, images per point, machine."""

    import torch

    from ldmscale.data.cache import read_manifest

    ev, d = study_eval(study), study.data
    saved = out / "study.toml"
    info = {
        "ldmscale": version("ldmscale"),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "study_file": f"{saved} (sha256 {hashlib.sha256(saved.read_bytes()).hexdigest()[:12]})"
        if saved.exists()
        else "-",
        "reference": ev.reference + (f" (first {ev.reference_count} images)" if ev.reference_count else ""),
        "images_per_point": sorted({int(r["num_images"]) for r in rows if r.get("num_images")}),
        "seeds": f"{ev.seed}..{ev.seed + ev.num_images - 1}",
        "bootstrap": ev.bootstrap,
        "spacing": ev.spacing,
        "fid": (
            {
                "tf": "Inception-v3 at 299 px, TensorFlow 1's bilinear resize (as published FIDs)",
                "pytorch": "Inception-v3 at 299 px, torch's bilinear resize (as pytorch-fid; not comparable to "
                "published FIDs)",
            }[ev.fid_resize]
            if "fid" in (*ev.metrics, ev.agreement_metric)
            else ""
        ),
        "machine": analysis.latency_note(rows),
    }
    cache = Path(d.cache or out / "cache")
    if (cache / "manifest.json").exists():
        m = read_manifest(cache)
        info["data"] = (
            f"{m['source']}, {m['resolution']} px, {m['total']:,} images, latents "
            f"{'x'.join(map(str, m['latent_shape']))}, {m['text_encoder']['spec']} text "
            f"{m['context_len']} tokens x {m['context_dim']}"
        )
    return info


def render(template: str, **context) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ldmscale.analysis", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=template.endswith(".html.j2"),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v, digits=4: "-" if v is None else f"{v:.{digits}g}"
    env.filters["b64"] = lambda data: base64.b64encode(data).decode()
    env.filters["choice"] = lambda c, metric: analysis.describe_choice(c, metric)
    return env.get_template(template).render(**context)


def build_report(out: str | Path, study, overlay_paper: bool = False, samples: bool = True) -> dict:
    from ldmscale.study.results import study_results, write_csv

    out = Path(out)
    rows, stale = study_results(out, study)
    if not rows:
        raise UserError(f"no evaluation results under {out}; run `ldmscale study run` first")
    write_csv(rows, out / "results.csv")
    a = analyze(rows, study)
    folder = out / "report"
    figs = figures(a, folder, overlay_paper)
    grids = sample_grids(a, study, folder) if samples else []  # analysis/grids.py
    sanity = None
    if (out / "sanity.json").exists():
        import json

        sanity = json.loads((out / "sanity.json").read_text())
    from ldmscale.study.plan import sample_size_warnings

    prov = provenance(out, study, rows) | {"left_out": stale, "warnings": sample_size_warnings(study)}
    ctx = dict(a=a, study=study, figs=figs, grids=grids, sanity=sanity, prov=prov)
    atomic_write_text(folder / "summary.md", render("summary.md.j2", **ctx))
    atomic_write_text(folder / "report.html", render("report.html.j2", **ctx))
    atomic_write_json(
        folder / "analysis.json", {k: v for k, v in a.items() if not k.startswith("_")} | {"sanity": sanity}
    )
    return {
        "html": str(folder / "report.html"),
        "markdown": str(folder / "summary.md"),
        "plans": a["plans"],
        "analysis": a,
    }
