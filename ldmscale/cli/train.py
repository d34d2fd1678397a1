"""`ldmscale train`, `ldmscale sample` and `ldmscale export`."""

from __future__ import annotations

from pathlib import Path

import click

from ldmscale.cli.main import FINITE
from ldmscale.cli.options import Verb, config_options, given_overrides
from ldmscale.config import apply_overrides
from ldmscale.errors import UserError
from ldmscale.names import Kind
from ldmscale.train.config import TrainConfig

# TrainConfig fields spelled with another word on the command line (the vocabulary's: a latent cache is --cache)
CLI_NAMES = {"data": "cache"}


def checkpoint_options(fn):
    """--checkpoint and --weights, as sample and export spell them (eval's come from EvalConfig)."""
    fn = click.option(
        "--weights",
        default="ema",
        show_default=True,
        type=click.Choice(["ema", "raw"]),
        help="EMA or raw training weights.",
    )(fn)
    return click.option(
        "--checkpoint",
        "which",
        default="latest",
        show_default=True,
        help="latest (the newest intact one), a step number or step-NNNNNN of this run.",
    )(fn)


@click.command(
    "train",
    cls=Verb,
    aliases={"--data": ["--cache"]},
    epilog="""
\b
Examples:
  ldmscale train --cache runs/cache --size c16 --out runs/c16 --images 200000
  ldmscale train --cache runs/cache --size c32 --out runs/c32 --lr 5e-4 --prediction v_prediction
  accelerate launch --multi_gpu --num_processes 2 -m ldmscale train --cache runs/cache --size c16 --out runs/c16-ddp
\b
Every TrainConfig field is an option; --set KEY=VALUE sets the same fields. Running the same command again
continues from the last checkpoint (a larger --images extends the run).
""",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="TrainConfig JSON (or a run's config.json)."
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field (lr, batch_size, ...)."
)
@config_options(TrainConfig, rename=CLI_NAMES)
def train_cmd(out, config_file, overrides, **fields) -> None:
    """Train one family member from a latent cache (compute ledger, exact resume)."""
    from ldmscale.train.loop import train
    from ldmscale.train.run import load_train_config

    if config_file:
        if not Path(config_file).is_file():
            raise UserError(f"config file not found: {config_file}")
        cfg = load_train_config(config_file)
    elif (out / "config.json").exists():
        cfg = load_train_config(out / "config.json")  # continue a run with its own settings
    else:
        cfg = TrainConfig()
    cfg = apply_overrides(cfg, [*given_overrides(TrainConfig, fields), *overrides])
    if not cfg.data:
        raise UserError("--cache is required (a latent cache folder)")
    result = train(cfg, out)
    if not result["is_main"]:
        return
    click.echo(
        f"run {out}: {result['step']} steps, {result['images_seen']:,} images, "
        f"{result['train_flops']:.3e} training FLOPs ({result['steps_x_gflops']:.3e} steps x GFLOPs; "
        f"{result['flop_convention']})"
    )


@click.command(
    "sample",
    cls=Verb,
    aliases={"--num": ["--num-images"], "--lr": ["--lowres"]},
    epilog="""
\b
Examples:
  ldmscale sample --run runs/c16 --prompt "a cat" --prompt "a zebra" --sampler ddim --steps 50 --guidance 3 \\
      --num-images 8 --out samples/
  ldmscale sample --run runs/c16 --prompt "a horse" --sampler dpmsolver++ --sampler ddpm --steps 20 --seed 7 \\
      --out samples/cmp
\b
Writes one PNG per image, grid.png (a row per prompt; columns grouped by sampler) and sample.json
(model calls, latency, sampling cost, provenance). The same seeds are used for every sampler.
""",
)
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable).")
@click.option(
    "--sampler",
    "samplers",
    multiple=True,
    help="ddim (default), ddpm, dpmsolver++, euler, euler-a, heun, unipc, lcm; flow-euler, flow-heun for flow "
    "runs. Repeatable.",
)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="Sampling steps.")
@click.option(
    "--guidance", default=7.5, show_default=True, type=FINITE, help="Classifier-free guidance scale (<=1: off)."
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**31 - 1),
    help="Image k of prompt p uses seed + p*N + k (N: --num-images).",
)
@click.option(
    "--num-images",
    "num",
    default=4,
    show_default=True,
    type=click.IntRange(1, 10**6),
    help="Images per prompt (and sampler).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@checkpoint_options
@click.option(
    "--batch-size", default=64, show_default=True, type=click.IntRange(1, 2**16), help="Images per sampling batch."
)
@click.option(
    "--lowres",
    "lr_source",
    default="",
    help="Super-resolution runs: SOURCE[:SPLIT] of low-resolution inputs (the first --num-images).",
)
@click.option(
    "--spacing",
    default="leading",
    show_default=True,
    type=click.Choice(["leading", "trailing"]),
    help="Sampler timesteps: SD v1.5's leading spacing, or trailing (every sample starts at t=999).",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16"]),
    help="The UNet's precision when sampling (bf16 on GPUs).",
)
@click.option("--overwrite", is_flag=True, help="Replace the samples already at --out (nothing else is ever replaced).")
def sample_cmd(
    run_dir,
    prompts,
    samplers,
    steps,
    guidance,
    seed,
    num,
    out,
    which,
    weights,
    batch_size,
    lr_source,
    spacing,
    precision,
    overwrite,
) -> None:
    """Sample images from a trained run with any sampler, step count and guidance (or super-resolve --lowres inputs)."""
    import torch

    from ldmscale.diffusion.generate import check_prompts, generate, load_run
    from ldmscale.diffusion.schedulers import check_sampling_args
    from ldmscale.images import grid, save_png, to_pil
    from ldmscale.io import atomic_dir, atomic_write_json, check_output
    from ldmscale.model import flops

    samplers = list(samplers) or ["ddim"]
    for name in samplers:
        check_sampling_args(name, steps, guidance)
    check_output(out, "samples", overwrite)
    if lr_source:
        return _sample_sr(
            run_dir,
            lr_source,
            list(prompts),
            samplers,
            steps,
            guidance,
            seed,
            num,
            out,
            which,
            weights,
            batch_size,
            spacing,
        )
    check_prompts(list(prompts))
    for name in samplers:
        check_sampling_args(name, steps, guidance)
    if num < 1 or batch_size < 1:
        raise UserError("--num-images and --batch-size must be positive")
    model = load_run(run_dir, which, weights, dtype=torch.bfloat16 if precision == "bf16" else None)
    all_prompts = [p for p in prompts for _ in range(num)]
    seeds = [seed + i for i in range(len(all_prompts))]
    with atomic_dir(out) as tmp:  # the whole folder appears at once: a full disk or a kill leaves nothing
        acc = model.config["accounting"]
        per_sampler, rows = {}, []
        for name in samplers:
            images, info = generate(
                model, all_prompts, name, steps, guidance, seeds, batch_size, progress=True, spacing=spacing
            )
            prefix = f"{name}-" if len(samplers) > 1 else ""
            for i, img in enumerate(images):
                save_png(to_pil(img), tmp / f"{prefix}p{i // num:02d}-{i % num:03d}.png")
            cost = flops.sampling_cost(acc["norm_cost"], steps)
            per_sampler[name] = info | {"sampling_cost": cost}
            rows.append(images.view(len(prompts), num, *images.shape[1:]))
            click.echo(
                f"{name}: {info['model_calls_per_image']} model calls/image, "
                f"{1000 * info['seconds_per_image']:.1f} ms/image, sampling cost {cost:.3f}"
            )
        table = torch.cat(rows, dim=1).flatten(0, 1)  # prompt-major, then sampler, then image
        save_png(grid(table, num * len(samplers)), tmp / "grid.png")
        record = {
            "run": str(run_dir),
            "checkpoint": model.ckpt.name,
            "weights": weights,
            "prompts": list(prompts),
            "num_per_prompt": num,
            "seeds": seeds,
            "samplers": samplers,
            "steps": steps,
            "guidance": guidance,
            "spacing": spacing,
            "norm_cost": acc["norm_cost"],
            "results": per_sampler,
        }
        atomic_write_json(tmp / "sample.json", record)
    click.echo(f"{len(all_prompts) * len(samplers)} images in {out} (grid.png)")


def _sample_sr(
    run_dir,
    lr_source,
    prompts,
    samplers,
    steps,
    guidance,
    seed,
    num,
    out,
    which,
    weights,
    batch_size,
    spacing="leading",
):
    """Super-resolve low-resolution inputs; grid rows: input (nearest-upscaled), then one column per sampler."""
    import torch

    from ldmscale.config import from_dict
    from ldmscale.data.degrade import resize
    from ldmscale.data.sources import load_images
    from ldmscale.diffusion.generate import load_run
    from ldmscale.eval.reference import parse_reference
    from ldmscale.images import grid, save_png, to_pil
    from ldmscale.io import atomic_dir, atomic_write_json
    from ldmscale.tasks.config import SRConfig
    from ldmscale.tasks.superres import upscale

    model = load_run(run_dir, which, weights)
    if model.config.get("kind") != Kind.SUPER_RESOLUTION:
        raise UserError(f"--lowres is for super-resolution runs; {run_dir} is a {model.config.get('kind')} run")
    sr = from_dict(SRConfig, model.config["task"])
    res, ch = int(model.config["data"]["resolution"]), int(model.config["data"]["channels"])
    src, split = parse_reference(lr_source)
    lr, caps, _ = load_images(src, split, res // sr.scale, ch, num)
    lr = torch.as_tensor(lr)
    texts = (prompts * len(lr))[: len(lr)] if prompts else caps
    seeds = [seed + i for i in range(len(lr))]
    with atomic_dir(out) as tmp:  # the whole folder appears at once: a full disk or a kill leaves nothing
        columns = [resize(lr, res, "nearest")]
        for name in samplers:
            images, info = upscale(model, lr, texts, seeds, name, steps, guidance, batch_size, spacing)
            for i, img in enumerate(images):
                save_png(to_pil(img), tmp / f"{name}-{i:03d}.png")
            columns.append(images)
            click.echo(
                f"{name}: {info['model_calls_per_image']} model calls/image, "
                f"{1000 * info['seconds_per_image']:.1f} ms/image"
            )
        table = torch.stack(columns, dim=1).flatten(0, 1)
        save_png(grid(table, len(columns)), tmp / "grid.png")
        atomic_write_json(
            tmp / "sample.json",
            {
                "run": str(run_dir),
                "checkpoint": model.ckpt.name,
                "weights": weights,
                "lr_source": lr_source,
                "seeds": seeds,
                "samplers": samplers,
                "steps": steps,
                "guidance": guidance,
                "spacing": spacing,
            },
        )
    click.echo(f"{len(lr)} inputs x {len(samplers)} samplers in {out} (grid.png: input | " + " | ".join(samplers) + ")")


@click.command(
    "export",
    epilog="""
\b
Example:
  ldmscale export --run runs/c16 --out export/c16
  python -c "import diffusers as d; d.StableDiffusionPipeline.from_pretrained('export/c16', trust_remote_code=True)"

It prints the exact line that loads the folder: trust_remote_code=True with the default MiniLM text encoder (its
zero-padding encoder travels with the folder as code; a CLIP run needs none), PixArtAlphaPipeline for a DiT run
(called with use_resolution_binning=False at ldmscale's sizes), StableDiffusion3Pipeline for a flow MM-DiT run.
""",
)
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@checkpoint_options
@click.option("--overwrite", is_flag=True, help="Replace an export already at --out (nothing else is ever replaced).")
def export_cmd(run_dir, out, which, weights, overwrite) -> None:
    """Export a run as a diffusers pipeline folder (StableDiffusionPipeline; PixArt or SD3 for transformers)."""
    from ldmscale.diffusion.export import export, load_line

    export(run_dir, out, which, weights, overwrite)
    click.echo(f"exported {run_dir} to {out}; load it with:\n  {load_line(out)}")
    from ldmscale.checkpoint import read_run_config

    cfg = read_run_config(run_dir)
    if cfg.get("train", {}).get("text_mask"):  # the SD pipeline never passes an attention mask to the UNet
        click.echo(
            "warning: this run was trained with text_mask=true; StableDiffusionPipeline does not pass the "
            "attention mask, so its samples differ from `ldmscale sample`",
            err=True,
        )
    if cfg.get("distilled"):
        click.echo(
            "note: a distilled run; sample the pipeline with LCMScheduler (consistency) or DDIM "
            "at its distilled step count (progressive)",
            err=True,
        )


COMMANDS = [train_cmd, sample_cmd, export_cmd]
