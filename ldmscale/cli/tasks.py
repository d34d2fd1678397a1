"""`ldmscale finetune sr|dreambooth` and `ldmscale distill`: downstream tasks from a trained text-to-image run.

Every field of the task's config (tasks/config.py) is an option; `--set KEY=VALUE` sets a field of the task's config
or of its training loop (TrainConfig), as a study's [tasks.*] `set` does; the loop starts from the init run's settings
and the task's train_defaults (tasks/config.py: task_train_config), whoever launches it.
"""

from __future__ import annotations

from pathlib import Path

import click

from ldmscale.cli.options import Verb, config_options, given_overrides, set_option
from ldmscale.config import apply_overrides, route_overrides
from ldmscale.errors import UserError
from ldmscale.names import Kind
from ldmscale.tasks.config import DistillConfig, DreamBoothConfig, SRConfig, task_train_config
from ldmscale.train.config import TrainConfig


def _images_option(cls: type, what: str):
    return click.option(
        "--images", type=click.IntRange(1, 10**12), default=None, help=f"{what} [default: {cls.default_images}]."
    )


def _configs(cls: type, init_field: str, fields: dict, overrides, images: int | None, **given):
    """The task's config (options, then --set) and its loop (the init run's, train_defaults, --set); a fine-tune
    that exists continues with its own loop settings."""
    from ldmscale.checkpoint import read_run_config
    from ldmscale.train.run import load_train_config

    routed = route_overrides({"task": cls, "train": TrainConfig}, overrides)
    cfg = apply_overrides(cls(), [*given_overrides(cls, fields), *routed["task"]])
    init = getattr(cfg, init_field)
    if not init:
        raise UserError(f"--{init_field} RUN_DIR is required")
    out = fields["out"]
    if (out / "config.json").exists():  # continue a fine-tune with its own settings
        tcfg = apply_overrides(
            load_train_config(out / "config.json"),
            routed["train"] + ([f"images={images}"] if images is not None else []),
        )
        return cfg, tcfg
    init_train = read_run_config(init)["train"]
    given = {k: v(cfg, init_train) if callable(v) else v for k, v in given.items()}
    tcfg = task_train_config(cls, init_train, routed["train"], images=images or cls.default_images, **given)
    return cfg, tcfg


@click.group("finetune")
def finetune_group() -> None:
    """Fine-tune a trained text-to-image run on a downstream task (4x super-resolution, DreamBooth).

    \b
    Examples:
      ldmscale finetune sr --init runs/c32 --out runs/c32-sr --images 20000
      ldmscale finetune dreambooth --init runs/c32 --subject examples/subject_elephant \\
          --class-prompt "an elephant" --out runs/c32-db
    """


@finetune_group.command(
    "sr",
    cls=Verb,
    aliases={"--data": ["--source"], "--train-set": ["--set"]},
    epilog="""
\b
Examples:
  ldmscale finetune sr --init runs/c32 --source animal-mnist --out runs/c32-sr --images 20000
  ldmscale finetune sr --init runs/c32 --out runs/c32-sr-real --degradation realesrgan --condition latent \\
      --noise-aug 0.1 --set lr=5e-4
""",
)
@config_options(SRConfig, rename={"data": "source", "limit": "num_images"}, required=("init",))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory of the fine-tune (resumes if it exists).",
)
@_images_option(SRConfig, "Fine-tuning duration in images")
@set_option("SRConfig", "TrainConfig")
def finetune_sr_cmd(out, images, overrides, **fields) -> None:
    """Turn a text-to-image run into a 4x super-resolution model (SD x4 upscaler conditioning)."""
    from ldmscale.tasks.superres import finetune_sr, sr_prediction

    sr, cfg = _configs(
        SRConfig,
        "init",
        fields | {"out": out},
        overrides,
        images,
        data=lambda c, _: c.data,
        prediction=lambda _, t: sr_prediction(t.get("prediction", "epsilon")),
    )
    r = finetune_sr(sr, cfg, out)
    if r["is_main"]:
        click.echo(
            f"super-resolution run {out}: {r['step']} steps, {r['images_seen']:,} images, "
            f"{r['train_flops']:.3e} training FLOPs"
        )


@finetune_group.command(
    Kind.DREAMBOOTH,
    cls=Verb,
    aliases={"--train-set": ["--set"]},
    epilog="""
\b
Example:
  ldmscale finetune dreambooth --init runs/c32 --subject my_dog/ --identifier sks --class-prompt "a dog" \\
      --out runs/c32-db
""",
)
@config_options(DreamBoothConfig, required=("init", "subject"))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory of the fine-tune (resumes if it exists).",
)
@_images_option(DreamBoothConfig, "Fine-tuning duration in images")
@set_option("DreamBoothConfig", "TrainConfig")
def finetune_dreambooth_cmd(out, images, overrides, **fields) -> None:
    """DreamBooth: bind a subject to a rare identifier, with class-prior preservation."""
    from ldmscale.tasks.dreambooth import finetune_dreambooth, instance_prompt

    db, cfg = _configs(DreamBoothConfig, "init", fields | {"out": out}, overrides, images)
    if not db.subject:
        raise UserError("--subject DIR is required (3-5 images of the subject)")
    r = finetune_dreambooth(db, cfg, out)
    if r["is_main"]:
        click.echo(f"dreambooth run {out}: {r['step']} steps; prompt the subject with '{instance_prompt(db)}'")


@click.command(
    "distill",
    epilog="""
\b
Examples:
  ldmscale distill --teacher runs/c32 --method consistency --out runs/c32-lcm --images 20000
  ldmscale distill --teacher runs/c32 --out runs/c32-lcm-w3 --w-min 3 --w-max 3   # one guidance scale
  ldmscale sample --run runs/c32-lcm --prompt "a horse" --sampler lcm --steps 4 --guidance 3 --out samples/lcm
  ldmscale distill --teacher runs/c32 --method progressive --out runs/c32-pd --start-steps 8 --final-steps 2
  accelerate launch --multi_gpu --num_processes 2 -m ldmscale distill --teacher runs/c32 --out runs/c32-lcm-ddp
""",
)
@config_options(DistillConfig, required=("teacher",))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory of the fine-tune (resumes if it exists).",
)
@_images_option(DistillConfig, "Training duration in images: per run (consistency) or per halving round (progressive)")
@set_option("DistillConfig", "TrainConfig")
def distill_cmd(out, images, overrides, **fields) -> None:
    """Distill a run into a few-step sampler (latent consistency, or guided progressive distillation)."""
    from ldmscale.tasks.distill import configs, distill

    teacher = fields.get("teacher") or ""
    if not teacher:
        raise UserError("--teacher RUN_DIR is required")
    cfg, tcfg = configs(
        teacher, fields.get("method") or "consistency", [*given_overrides(DistillConfig, fields), *overrides]
    )
    r = distill(cfg, tcfg, out, images or DistillConfig.default_images)
    if not r["is_main"]:
        return
    how = (
        "sample with --sampler lcm --steps 1..8"
        if cfg.method == "consistency"
        else f"sample with --sampler ddim --steps {r['rounds'][-1]}"
    )
    click.echo(
        f"distilled {teacher} -> {out} ({cfg.method}): {r['step']} steps, {r['train_flops']:.3e} training FLOPs; {how}"
    )


COMMANDS = [finetune_group, distill_cmd]
