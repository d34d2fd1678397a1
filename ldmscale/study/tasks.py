"""The task registry: the downstream tasks and distillations a study applies to its trained sizes.

Each kind declares how it builds its training job from a trained run (its config class, the fine-tune or
distillation it runs, its cost in forward passes per image), its default evaluation grid and metrics, and the run
kind its evaluation is. Study planning, the cluster's waves and the metric checks read it; adding a kind is one
entry here (and its config/training module), not an if/elif in each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldmscale.config import apply_overrides, route_overrides, to_dict
from ldmscale.errors import UserError
from ldmscale.eval import registry
from ldmscale.model.family import parse_size, size_spec
from ldmscale.names import Kind
from ldmscale.tasks.config import DistillConfig, DreamBoothConfig, SRConfig, task_train_config
from ldmscale.train.config import TrainConfig


@dataclass(frozen=True)
class Built:
    """A task's training job for one trained size."""

    cfg: object  # the task's config (SRConfig, DreamBoothConfig, DistillConfig)
    train: object  # the TrainConfig its loop runs with
    run: Callable[[], object]  # trains it into the task's run folder
    metrics: tuple[str, ...]  # default metrics of its evaluations
    grid: tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...]]  # default samplers, steps, guidance
    images: int  # training images (per round for progressive distillation)


@dataclass(frozen=True)
class TaskKind:
    name: str
    job_kind: str  # the study job that trains it: "finetune" or "distill"
    # training FLOPs per image in forward passes, for --dry-run and the ETA only (3: forward + backward; 6: + teacher
    # and target); the ledger counts each step's own from the objective (progressive: 7 in its guided first
    # round, 5 after)
    forward_passes: int
    guidance_doubles_calls: bool  # False where the guidance scale is embedded in the student (one call per step)
    build: Callable[..., Built]  # (task, study, ev, base TrainConfig, init run, task run, progress) -> Built


def _sets(pairs: dict) -> list[str]:
    return [f"{k}={v}" for k, v in pairs.items()]


def _routed(task, cls) -> dict[str, list[str]]:
    """A task section's overrides: `set` routed by key (as a verb's --set), `train_set` to the loop."""

    items = _sets(task.set) + [f"train.{s}" for s in _sets(task.train_set)]
    return route_overrides({"task": cls, "train": TrainConfig}, items)


def _super_resolution(task, study, ev, base, init: Path, run: Path, progress: bool) -> Built:
    from ldmscale.tasks.superres import finetune_sr, sr_prediction

    sets = _routed(task, SRConfig)
    cfg = apply_overrides(SRConfig(init=str(init), data=study.data.source), sets["task"])
    tcfg = task_train_config(
        SRConfig,
        to_dict(base),
        sets["train"],
        images=task.images or SRConfig.default_images,
        data=cfg.data,
        prediction=sr_prediction(base.prediction),
    )
    frechet = tuple(m for m in ev.metrics if m in registry.FRECHET)
    # no guidance for super-resolution, as the paper
    return Built(
        cfg,
        tcfg,
        lambda: finetune_sr(cfg, tcfg, run, progress),
        registry.model_free(Kind.SUPER_RESOLUTION) + frechet,
        (("ddim",), tuple(ev.steps), (1.0,)),
        tcfg.images,
    )


def _dreambooth(task, study, ev, base, init: Path, run: Path, progress: bool) -> Built:
    from ldmscale.data.sources import label_of_prompt
    from ldmscale.tasks.dreambooth import finetune_dreambooth

    sets = _routed(task, DreamBoothConfig)
    cfg = apply_overrides(DreamBoothConfig(init=str(init)), sets["task"])
    tcfg = task_train_config(
        DreamBoothConfig, to_dict(base), sets["train"], images=task.images or DreamBoothConfig.default_images
    )
    known_class = label_of_prompt(cfg.class_prompt) >= 0
    if "caption-accuracy" in task.metrics and not known_class:
        raise UserError(
            f"caption-accuracy needs a class prompt among the classifier's classes, not {cfg.class_prompt!r}"
        )
    # caption accuracy only where the class prompt is one of the classifier's classes
    metrics = registry.model_free(Kind.DREAMBOOTH) + (("caption-accuracy",) if known_class else ())
    return Built(
        cfg,
        tcfg,
        lambda: finetune_dreambooth(cfg, tcfg, run, progress),
        metrics,
        (("ddim",), tuple(ev.steps), tuple(ev.guidance)),
        tcfg.images,
    )


def _distillation(task, study, ev, base, init: Path, run: Path, progress: bool) -> Built:
    from ldmscale.tasks.distill import configs, distill

    cfg, tcfg = configs(
        str(init),
        task.kind,
        _sets(task.set) + [f"train.{s}" for s in _sets(task.train_set)],
        base={"data": base.data, "size": size_spec(parse_size(init.name)), "seed": base.seed},
    )
    if task.kind == "consistency":  # a consistency student samples in 1-8 steps with the lcm sampler
        grid = (("lcm",), (1, 2, 4, 8), tuple(ev.guidance))
    else:  # a progressive student samples at the step count of its final round
        grid = (("ddim",), (cfg.final_steps,), tuple(ev.guidance))
    images = task.images or DistillConfig.default_images
    return Built(cfg, tcfg, lambda: distill(cfg, tcfg, run, images, progress), tuple(ev.metrics), grid, images)


KINDS: dict[str, TaskKind] = {
    k.name: k
    for k in (
        TaskKind(Kind.SUPER_RESOLUTION, "finetune", 3, True, _super_resolution),
        TaskKind(Kind.DREAMBOOTH, "finetune", 3, True, _dreambooth),
        TaskKind("consistency", "distill", 6, False, _distillation),
        TaskKind("progressive", "distill", 6, True, _distillation),
    )
}


def kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise UserError(f"unknown task kind {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name]
