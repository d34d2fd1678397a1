"""Experiment tracking through accelerate's trackers (tensorboard, wandb): the resolved config as hyperparameters,
the loss, lr, throughput and compute ledger as curves, a sample grid of the EMA weights at each checkpoint, and one
tracker run per ldmscale run, resumed with it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ldmscale.device import on
from ldmscale.diffusion.schedulers import generate_latents, make_sampler
from ldmscale.errors import UserError
from ldmscale.io import atomic_write_json as write
from ldmscale.model.family import build_network


def start(cfg, run: Path, s) -> None:
    """accelerate's tensorboard or W&B tracker: the resolved config as hyperparameters, and one W&B run per ldmscale
    run (its id is kept in RUN/tracker.json, so a resumed run logs into the same W&B run)."""
    if not cfg.report_to:
        return

    ids = json.loads((run / "tracker.json").read_text()) if (run / "tracker.json").exists() else {}
    if s.acc.is_main_process and "wandb_id" not in ids:
        import uuid

        ids["wandb_id"] = uuid.uuid4().hex[:12]
        write(run / "tracker.json", ids)
    init = (
        {"wandb": {"id": ids.get("wandb_id"), "resume": "allow", "name": run.name}} if cfg.report_to == "wandb" else {}
    )
    s.acc.init_trackers(cfg.project, config=flat_config(s.task.resolved), init_kwargs=init)


def flat_config(resolved: dict, prefix: str = "") -> dict:
    """Nested config -> {'train.lr': 0.001, ...}: scalars only (what trackers take as hyperparameters)."""
    out = {}
    for k, v in resolved.items():
        if isinstance(v, dict):
            out |= flat_config(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = str(v)
    return out


def log_preview(cfg, s, step: int, ema_weights: dict) -> None:
    """A sample grid of the EMA weights (4 prompts x 2 seeds, DDIM 20 steps, guidance 3) in the tracker."""
    import numpy as np

    from ldmscale.data.autoencoder import decode
    from ldmscale.diffusion.generate import _text, _vae
    from ldmscale.images import grid, to_uint8

    data, dev = s.task.resolved["data"], s.acc.device
    unet = build_network(s.task.resolved)
    unet.load_state_dict(ema_weights)
    unet = on(unet, dev)
    text = _text(data["text_encoder"]["spec"], int(data["context_len"]), str(dev))
    prompts = [p for p in s.task.preview for _ in range(2)]
    cond, _ = text.encode(prompts)
    uncond, _ = text.encode([""])
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    lat = generate_latents(
        unet,
        make_sampler("flow-euler" if cfg.prediction == "flow" else "ddim", cfg.prediction),
        20,
        cond,
        uncond,
        3.0,
        gens,
        tuple(data["latent_shape"]),
    )
    img = np.asarray(grid(to_uint8(decode(_vae(data["autoencoder"]["spec"], str(dev)), lat)).cpu(), 2))
    tracker = s.acc.get_tracker(cfg.report_to, unwrap=True)
    if cfg.report_to == "tensorboard":
        tracker.add_image("samples", img if img.ndim == 3 else img[..., None], step, dataformats="HWC")
    else:
        import wandb

        tracker.log({"samples": wandb.Image(img, caption=" | ".join(s.task.preview))}, step=step)


def check(report_to: str) -> None:
    """A tracker's package must be installed: say so now, not after an hour of silent training."""

    need = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if need and importlib.util.find_spec(need) is None:
        raise UserError(f"--report-to {report_to} needs the {need} package: pip install {need}")
