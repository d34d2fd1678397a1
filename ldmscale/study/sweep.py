"""A short learning-rate sweep per size (#28): every size of a study trained at one training budget with each
learning rate (a cosine run, so each is annealed), scored by validation loss, and the lr each size should train at
(RULE). The result is the `[train.per_size]` table the study records; sweep.json keeps every run's loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ldmscale.config import apply_overrides, from_dict, to_dict
from ldmscale.data.cache import latent_shapes
from ldmscale.errors import UserError
from ldmscale.io import atomic_write_json
from ldmscale.model.family import parse_size, size_spec
from ldmscale.study.plan import forward_flops
from ldmscale.study.spec import Study, per_size
from ldmscale.train.config import TrainConfig

RULE = (
    "the lowest validation loss, where losses within two standard errors of their difference count as tied, and of "
    "tied learning rates the smallest (the largest sit next to divergence: c12 and c16 diverged at 3e-2, c6 did not)"
)
DEFAULT_WARMUP = 0.05  # of each run's steps, when the study sets no warmup_fraction


def sweep_configs(study: Study, cache: Path, lrs: list[float], flops: float) -> list[tuple[str, float, TrainConfig]]:
    """(size, lr, its run's config) for every size of the study and every lr: the study's [train.set] and the size's
    own [train.per_size] settings (but its lr), trained for `flops` FLOPs under a cosine schedule."""
    shapes = latent_shapes(cache)  # refuses a folder that is not a latent cache
    base = apply_overrides(TrainConfig(data=str(cache)), [f"{k}={v}" for k, v in study.train.set.items()])
    own = per_size(study)
    out = []
    for name in study.train.sizes:
        size = parse_size(name)
        cfg = apply_overrides(base, [f"{k}={v}" for k, v in own.get(size.name, {}).items() if k != "lr"])
        steps = round(flops / (3 * forward_flops(size, shapes) * cfg.batch_size))
        if steps < 2:
            raise UserError(f"--flops {flops:g} buys {size.name} {steps} optimizer step(s) at batch {cfg.batch_size}")
        images = steps * cfg.batch_size
        for lr in lrs:
            fields = {"size": size_spec(size), "lr": lr, "lr_schedule": "cosine", "images": images}
            fields |= {"checkpoint_every": images, "keep": 1, "checkpoint_at": ()}
            fields |= {"warmup_fraction": cfg.warmup_fraction or DEFAULT_WARMUP}
            out.append((size.name, lr, from_dict(TrainConfig, to_dict(cfg) | fields)))
    return out


def choose(rows: list[dict]) -> dict[str, float]:
    """Per size, the lr RULE picks."""
    best = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size and math.isfinite(r["val_loss"])]
        if not mine:
            continue
        top = min(mine, key=lambda r: r["val_loss"])
        tied = [
            r for r in mine if r["val_loss"] - top["val_loss"] <= 2 * math.hypot(r["val_loss_se"], top["val_loss_se"])
        ]
        best[size] = min(r["lr"] for r in tied)
    return best


def lr_sweep(configs: list[tuple[str, float, TrainConfig]], out: Path, flops: float, progress=True, log=print) -> dict:
    """Train every run of sweep_configs() not yet finished (a run continues from its checkpoint), then write
    sweep.json: each run's validation loss and the lr chosen per size."""
    from ldmscale.train.loop import train

    rows = []
    for size, lr, cfg in configs:
        run, steps = out / f"{size}-lr{lr:g}", cfg.images // cfg.batch_size
        log(f"{size} at lr {lr:g}: {steps} steps of batch {cfg.batch_size}")
        train(cfg, run, progress=progress)
        last = json.loads((run / "validation.jsonl").read_text().splitlines()[-1])
        rows.append(
            {"size": size, "lr": lr, "steps": steps, "val_loss": last["val_loss"], "val_loss_se": last["val_loss_std"]}
        )
    lrs = list(dict.fromkeys(lr for _, lr, _ in configs))
    result = {"flops": flops, "lrs": lrs, "rule": RULE, "runs": rows, "chosen": choose(rows)}
    atomic_write_json(out / "sweep.json", result)
    return result


def per_size_toml(study: Study, chosen: dict[str, float]) -> str:
    """The study's [train.per_size] table with the chosen learning rates (a size at the study's own lr gets none)."""
    default = apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in study.train.set.items()]).lr
    own = per_size(study)
    lines = []
    for size in dict.fromkeys([*own, *chosen]):
        sets = {k: v for k, v in own.get(size, {}).items() if k != "lr" or size not in chosen}
        if size in chosen and chosen[size] != default:
            sets["lr"] = f"{chosen[size]:g}"
        if sets:
            lines.append(f"{size} = {{ {', '.join(f'{k} = {_toml(v)}' for k, v in sets.items())} }}")
    return "\n".join(["[train.per_size]", *lines])


def _toml(value: str) -> str:
    try:
        float(value)
        return value
    except ValueError:
        return value if value in ("true", "false") else json.dumps(value)
