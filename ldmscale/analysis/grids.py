"""The report's sample grids: per size, images at its best configuration and at the small budget's best, one row
per prompt with the prompt written at its left, the same seeds in every grid."""

from __future__ import annotations

from pathlib import Path

from ldmscale.analysis import plots
from ldmscale.analysis import scaling as analysis
from ldmscale.study.spec import study_eval


def report_prompts(reference: str, n: int = 10) -> list[str]:
    """The sample grids' rows: one prompt per class for animal-mnist, else the first distinct reference captions."""
    from ldmscale.data.sources import ANIMAL_CLASSES, class_prompt, iterate
    from ldmscale.eval.reference import parse_reference

    src, split = parse_reference(reference)
    if src.kind == "animal-mnist":
        return [class_prompt(i) for i in range(len(ANIMAL_CLASSES))]
    seen: list[str] = []
    for item in iterate(src, split):
        if item.caption and item.caption not in seen:
            seen.append(item.caption)
        if len(seen) >= n:
            break
    return seen


def sample_grids(a: dict, study, folder: Path, per_prompt: int = 4) -> list[dict]:
    """Per size: a grid (a row per prompt, `per_prompt` seeds) at its best configuration and at the small
    budget's best configuration for that size, so the figures' differences can be seen."""
    from ldmscale.diffusion.generate import generate, load_run
    from ldmscale.images import grid, label_rows, save_png

    ev, metric = study_eval(study), a["metric"]
    best = [r for r in a["best_over_guidance"] if not r.get("distilled") and r.get("run")]
    prompts = report_prompts(ev.reference)
    small = a["plans"][0]["budget"] if a["plans"] else None
    out = []
    for size in plots.size_order(best):
        mine = [r for r in best if r["size"] == size]
        top = analysis.plan(mine, float("inf"), metric, "executed_cost")["best"]
        picks = [("best configuration", top)]
        cheap = analysis.plan(mine, small, metric, "executed_cost")["best"] if small is not None else None
        picks.append((f"small budget ({small:.3g})", cheap))
        if not Path(mine[0]["run"]).is_dir():  # a report redrawn from results.csv alone
            out.append(
                {
                    "size": size,
                    "label": "best configuration",
                    "note": f"no sample grid: {size}'s run {mine[0]['run']} is not on this machine",
                }
            )
            continue
        model = load_run(mine[0]["run"], mine[0].get("checkpoint") or "latest")
        for label, c in picks:
            entry = {"size": size, "label": label}
            if c is None or (
                c is not top
                and (c["sampler"], c["steps"], c["guidance"]) == (top["sampler"], top["steps"], top["guidance"])
            ):
                entry["note"] = (
                    f"{size} has no configuration within the small budget"
                    if c is None
                    else "its best configuration fits the small budget: the grid above"
                )
                out.append(entry)
                continue
            seeds = [ev.seed + i for i in range(len(prompts) * per_prompt)]
            images, _ = generate(
                model,
                [p for p in prompts for _ in range(per_prompt)],
                c["sampler"],
                c["steps"],
                c["guidance"],
                seeds,
                batch_size=64,
                spacing=ev.spacing,
            )
            name = f"{size}-{c['sampler']}-s{c['steps']}-g{c['guidance']:g}.png"
            save_png(label_rows(grid(images, per_prompt), prompts), folder / "samples" / name)
            entry |= {
                "config": c,
                "file": f"samples/{name}",
                "png": (folder / "samples" / name).read_bytes(),
                "caption": f"{size}, {c['sampler']} {c['steps']} steps, guidance {c['guidance']:g}: "
                f"{metric} {c[metric]:.4g} (executed cost {c['executed_cost']:.3g}, sampling cost "
                f"{c['sampling_cost']:.3g})",
            }
            out.append(entry)
    return out
