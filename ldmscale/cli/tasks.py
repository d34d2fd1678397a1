"""`ldmscale finetune sr|dreambooth`: downstream tasks from a trained text-to-image run."""

from __future__ import annotations

from pathlib import Path

import click

from ldmscale.cli.options import Verb
from ldmscale.config import apply_overrides, from_dict, to_dict


def _train_cfg(init: Path, out: Path, images: int | None, train_sets: tuple[str, ...], defaults: dict):
    """The loop settings of a fine-tune: the init run's, then the task's defaults, then --train-set."""
    from ldmscale.checkpoint import read_run_config
    from ldmscale.train.loop import TrainConfig, load_train_config

    if (out / "config.json").exists():
        cfg = load_train_config(out / "config.json")
    else:
        base = read_run_config(init)["train"]
        cfg = from_dict(TrainConfig, {k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__} | defaults)
    if images is not None:
        cfg = from_dict(TrainConfig, to_dict(cfg) | {"images": images})
    return apply_overrides(cfg, train_sets)


@click.group("finetune")
def finetune_group() -> None:
    """Fine-tune a trained text-to-image run on a downstream task (4x super-resolution, DreamBooth).

    \b
    Examples:
      ldmscale finetune sr --init runs/c32 --out runs/c32-sr --images 20000
      ldmscale finetune dreambooth --init runs/c32 --subject examples/subject_elephant --class-prompt "an elephant" --out runs/c32-db
    """


@finetune_group.command("sr", cls=Verb, aliases={"--data": ["--source"]}, epilog="""
\b
Examples:
  ldmscale finetune sr --init runs/c32 --source animal-mnist --out runs/c32-sr --images 20000
  ldmscale finetune sr --init runs/c32 --source animal-mnist --out runs/c32-sr-real --set degradation=realesrgan \\
      --set condition=latent --set noise_aug=0.1
""")
@click.option("--init", "init", required=True, type=click.Path(path_type=Path), help="Text-to-image run directory.")
@click.option("--source", "data", default="animal-mnist", show_default=True, help="SOURCE[:SPLIT] of high-resolution images.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help='Run directory of the fine-tune (resumes if it exists).')
@click.option("--images", type=int, help="Fine-tuning duration in images (default 20000).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="SRConfig: scale, degradation (bicubic|realesrgan), condition (pixels|latent), noise_aug, limit.")
@click.option("--train-set", "train_sets", multiple=True, metavar="KEY=VALUE", help="TrainConfig override (lr, batch_size, ...).")
def finetune_sr_cmd(init, data, out, images, overrides, train_sets) -> None:
    """Turn a text-to-image run into a 4x super-resolution model (SD x4 upscaler conditioning)."""
    from ldmscale.checkpoint import read_run_config
    from ldmscale.tasks.superres import SRConfig, finetune_sr, sr_prediction

    sr = apply_overrides(SRConfig(init=str(init), data=data), overrides)
    prediction = sr_prediction(read_run_config(init)["train"].get("prediction", "epsilon"))
    cfg = _train_cfg(init, out, images, train_sets, {"images": 20_000, "lr": 5e-4, "warmup_steps": 50, "cfg_dropout": 0.1,
                                                      "checkpoint_every": 0, "keep": 2, "prediction": prediction})
    r = finetune_sr(sr, from_dict(type(cfg), to_dict(cfg) | {"data": data}), out)
    if r["is_main"]:
        click.echo(f"super-resolution run {out}: {r['step']} steps, {r['images_seen']:,} images, "
                   f"{r['train_flops']:.3e} training FLOPs")


@finetune_group.command("dreambooth", epilog="""
\b
Example:
  ldmscale finetune dreambooth --init runs/c32 --subject my_dog/ --identifier sks --class-prompt "a dog" --out runs/c32-db
""")
@click.option("--init", "init", required=True, type=click.Path(path_type=Path), help='Text-to-image run directory.')
@click.option("--subject", required=True, type=click.Path(path_type=Path), help="Folder with 3-5 images of the subject.")
@click.option("--identifier", default="sks", show_default=True,
              help="The rare token bound to the subject (the prompt becomes 'a sks dog').")
@click.option("--class-prompt", required=True, help='The class of the subject, e.g. "a dog".')
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help='Run directory of the fine-tune (resumes if it exists).')
@click.option("--images", type=int, help="Fine-tuning duration in images (default 3200).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="DreamBoothConfig: num_class_images, prior_sampler, prior_steps, prior_guidance, seed.")
@click.option("--train-set", "train_sets", multiple=True, metavar="KEY=VALUE",
              help='TrainConfig override (lr, batch_size, ...).')
def finetune_dreambooth_cmd(init, subject, identifier, class_prompt, out, images, overrides, train_sets) -> None:
    """DreamBooth: bind a subject to a rare identifier, with class-prior preservation."""
    from ldmscale.tasks.dreambooth import (
        DreamBoothConfig,
        finetune_dreambooth,
        instance_prompt,
    )

    db = apply_overrides(DreamBoothConfig(init=str(init), subject=str(subject), identifier=identifier,
                                          class_prompt=class_prompt), overrides)
    cfg = _train_cfg(init, out, images, train_sets, {"images": 3200, "lr": 2e-4, "warmup_steps": 10, "cfg_dropout": 0.1,
                                                      "checkpoint_every": 0, "keep": 2, "batch_size": 32})
    r = finetune_dreambooth(db, from_dict(type(cfg), to_dict(cfg) | {"data": str(subject)}), out)
    if r["is_main"]:
        click.echo(f"dreambooth run {out}: {r['step']} steps; prompt the subject with '{instance_prompt(db)}'")


@click.command("distill", epilog="""
\b
Examples:
  ldmscale distill --teacher runs/c32 --method consistency --out runs/c32-lcm --images 20000
  ldmscale distill --teacher runs/c32 --out runs/c32-lcm-w3 --set w_min=3 --set w_max=3   # one guidance scale
  ldmscale sample --run runs/c32-lcm --prompt "a horse" --sampler lcm --steps 4 --guidance 3 --out samples/lcm
  ldmscale distill --teacher runs/c32 --method progressive --out runs/c32-pd --set start_steps=8 --set final_steps=2
  accelerate launch --multi_gpu --num_processes 2 -m ldmscale distill --teacher runs/c32 --out runs/c32-lcm-ddp
""")
@click.option("--teacher", required=True, type=click.Path(path_type=Path), help="Text-to-image run directory.")
@click.option("--method", default="consistency", show_default=True, type=click.Choice(["consistency", "progressive"]),
              help='consistency (LCM) or progressive (halving the DDIM steps per round).')
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help='Run directory of the fine-tune (resumes if it exists).')
@click.option("--images", type=click.IntRange(1, 10**12), default=20_000, show_default=True,
              help="Training duration in images: per run (consistency) or per halving round (progressive).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="DistillConfig (w_min, w_max, loss, loss_space, solver_steps, start_steps, final_steps, ...) or "
                   "TrainConfig (lr, lr_schedule, batch_size, ema_decay, mixed_precision, seed, ...) field.")
def distill_cmd(teacher, method, out, images, overrides) -> None:
    """Distill a run into a few-step sampler (latent consistency, or guided progressive distillation)."""
    from ldmscale.tasks.distill import configs, distill

    cfg, tcfg = configs(str(teacher), method, overrides)
    r = distill(cfg, tcfg, out, images)
    if not r["is_main"]:
        return
    how = "sample with --sampler lcm --steps 1..8" if method == "consistency" else f"sample with --sampler ddim --steps {r['rounds'][-1]}"
    click.echo(f"distilled {teacher} -> {out} ({method}): {r['step']} steps, {r['train_flops']:.3e} training FLOPs; {how}")


COMMANDS = [finetune_group, distill_cmd]
