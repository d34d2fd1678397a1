"""A run folder's identity: its fully resolved config (what trains, on what, with which library versions), the check
that a continued run is the same run, and the task the loop trains (text-to-image here; tasks/ make their own)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ldmscale import checkpoint
from ldmscale.config import from_dict, to_dict
from ldmscale.errors import UserError
from ldmscale.model import flops
from ldmscale.model.family import network_config, parse_size, size_spec
from ldmscale.names import Kind
from ldmscale.train.config import ADDED, CONTINUABLE, TrainConfig
from ldmscale.train.objectives import Objective, TrainData, ValidationLoss, objective_for


def resolve_run(cfg: TrainConfig, run: Path) -> dict:
    """The fully resolved config of a run; checks a continued run matches the one on disk."""

    from ldmscale.data.cache import read_manifest

    size = parse_size(cfg.size)
    m = read_manifest(cfg.data)
    c, h, _ = m["latent_shape"]
    network = network_config(size, h, m["context_dim"], c)
    cost = flops.cost(size, h, m["context_len"], m["context_dim"], c)
    resolved = {
        "kind": Kind.TEXT_TO_IMAGE,
        "train": to_dict(cfg) | {"data": str(Path(cfg.data).resolve()), "size": size_spec(size)},
        **network,
        "data": {
            k: m[k]
            for k in (
                "source",
                "resolution",
                "channels",
                "latent_shape",
                "context_len",
                "context_dim",
                "autoencoder",
                "text_encoder",
            )
        },
        "accounting": {
            "params": cost.params,
            "forward_flops": cost.flops,
            "gflops": cost.gflops,
            "norm_cost": cost.norm_cost,
            "flop_convention": flops.FLOP_CONVENTION,
        },
        "versions": {p: version(p) for p in ("ldmscale", "torch", "diffusers", "accelerate", "transformers")},
    }
    check_continuation(run, resolved)
    return resolved


def check_continuation(run: str | Path, resolved: dict) -> None:
    """A run folder that exists must have been made with the same settings (bar CONTINUABLE ones)."""
    path = Path(run) / "config.json"
    if not path.exists():
        return
    try:
        old = checkpoint.read_run_config(Path(run))
    except UserError:
        return  # a damaged config.json: the checkpoints carry the config; the loop rewrites this file
    before, now = ADDED | old.get("train", {}), resolved["train"]  # a setting added since: the value it had then
    if before.get("lr_schedule") in ("cosine", "wsd") and before.get("images") != now.get("images"):
        # the cosine and wsd schedules are planned for the run's length: another would jump the lr mid-run
        raise UserError(
            f"{run} has a {before['lr_schedule']} lr schedule planned for {before.get('images'):,} images; it cannot "
            f"be extended or shortened to {now.get('images'):,}: start a new run (or use lr_schedule=constant, "
            "whose runs extend)"
        )
    diff = [k for k, v in resolved["train"].items() if k not in CONTINUABLE and before.get(k) != v]
    diff += [
        k
        for k in ("kind", "task", "init")
        if json.dumps(old.get(k), sort_keys=True) != json.dumps(resolved.get(k), sort_keys=True)
    ]
    if diff:
        raise UserError(
            f"{run} is a run with other settings ({', '.join(diff)} differ); "
            "use a new --out or the same settings to continue it"
        )


@dataclass
class Task:
    """What the loop trains: the resolved run config, the data, the objective, and the initial weights of a
    fine-tune or a student.

    data (TrainData): batch(idx, latent_noise, seeds) -> (z, text, mask) or (z, text, mask, extra) where `extra` is
    concatenated to the noisy latent at the UNet input (super-resolution).
    preview: prompts for the sample grid logged to a tracker at each checkpoint (text-to-image runs)."""

    resolved: dict
    data: TrainData
    objective: Objective | None = None
    init: dict | None = None
    preview: list[str] | None = None
    validation: ValidationLoss | None = None  # the objective on fixed validation triples, at every checkpoint


def text_to_image_task(cfg: TrainConfig, run: Path) -> Task:
    from ldmscale.data.cache import LatentCache

    data = LatentCache(cfg.data, "train")
    prompts = list(dict.fromkeys(data.captions))[:4]
    objective = objective_for(cfg)
    val = None
    if "validation" in data.manifest["splits"]:
        val = ValidationLoss(LatentCache(cfg.data, "validation"), objective)
    return Task(resolve_run(cfg, run), data, objective, preview=prompts, validation=val)


def load_train_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON file: the config itself or a run's config.json (its "train" section)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return from_dict(TrainConfig, data.get("train", data), where=path.name)
