"""The first stage: a KL autoencoder (diffusers.AutoencoderKL), pretrained or trained here from scratch.

A trained autoencoder is saved with `save_pretrained`, so it loads exactly like SD's VAE. Its latent
scaling factor is measured on data (1 / std of the latents, as the LDM paper does) and stored in its config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldmscale.config import to_dict
from ldmscale.data.config import AutoencoderConfig
from ldmscale.data.sources import iterate, load_images, parse_source, splits, validation_rule
from ldmscale.device import current
from ldmscale.errors import UserError
from ldmscale.images import psnr, to_8bit, to_float
from ldmscale.io import atomic_dir, atomic_write_json, check_output, file_sha256
from ldmscale.progress import bar as progress_bar


def build_autoencoder(cfg: AutoencoderConfig):
    from diffusers import AutoencoderKL

    if cfg.channels == 0:  # a programming error, not bad input: 0 means "from the data" until resolve_channels
        raise ValueError("build_autoencoder needs channels 1 or 3: call resolve_channels(cfg) first")
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        mid_block_add_attention=False,  # attention at 8x8 buys nothing for silhouettes and costs time
    )


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of float images in [-1, 1], computed on the autoencoder's device,
    returned on the CPU."""
    p = next(vae.parameters())
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].to(p.device, p.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents (as the UNet sees them) -> float images in [-1, 1]."""
    sf = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    p = next(vae.parameters())
    out = [
        vae.decode(latents[i : i + batch].to(p.device, p.dtype) / sf + shift).sample
        for i in range(0, len(latents), batch)
    ]
    return torch.cat(out).clamp(-1, 1)


def source_channels(source: str, sample: int = 64) -> int:
    """3 when any of the first `sample` readable images of the source's first split has colour, else 1."""

    src, seen = parse_source(source), 0
    for item in iterate(src, splits(src)[0]):
        if item.image is None:
            continue
        img = to_8bit(item.image)
        if img.mode not in ("1", "L", "LA"):
            rgb = np.asarray(img.convert("RGB"))
            if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
                return 3
        seen += 1
        if seen >= sample:
            break
    return 1


def resolve_channels(cfg: AutoencoderConfig, announce: bool = True) -> AutoencoderConfig:
    """channels=0 becomes the data's (source_channels), said in one line."""
    if cfg.channels:
        return cfg
    channels = source_channels(cfg.source)
    if announce:
        from ldmscale.integrity import note

        note(
            f"autoencoder channels={channels}: "
            + (
                "RGB, the source has colour images"
                if channels == 3
                else "grayscale, no colour among the source's first 64 images"
            )
            + " (set channels=1 or 3 to choose)"
        )
    return dataclasses.replace(cfg, channels=channels)


def train_autoencoder(cfg: AutoencoderConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Train a KL autoencoder from scratch on a source; save it in diffusers format at `out` (an existing autoencoder
    there is replaced only with overwrite). channels=0 takes the data's."""

    check_output(out, "autoencoder", overwrite)
    cfg = resolve_channels(cfg)

    src = parse_source(cfg.source)
    names = splits(src)
    if "validation" not in names:
        raise UserError(f"source {src} has no validation split to measure the autoencoder on: {validation_rule(src)}")
    limit = cfg.max_images or None
    train_u8, _, _ = load_images(src, "train" if "train" in names else names[0], cfg.resolution, cfg.channels, limit)
    val_u8, _, _ = load_images(src, "validation", cfg.resolution, cfg.channels, limit)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    dev = current()
    vae = build_autoencoder(cfg).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    # OneCycleLR divides by (pct_start x steps - 1): nudge the warm-up share off the one step count where it is 0
    pct = 0.05 if abs(0.05 * cfg.steps - 1.0) > 1e-9 else 0.06
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=pct)
    train = to_float(train_u8)
    t0 = time.time()
    bar = progress_bar(range(cfg.steps), desc="autoencoder", unit="step", enabled=progress)
    for step in bar:
        batch = train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)].to(dev)
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + cfg.kl_weight * post.kl().mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"autoencoder loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.time() - t0
    vae.eval()
    val = to_float(val_u8)
    mean, std = encode(vae, val)
    with torch.no_grad():
        rec = torch.cat([vae.decode(mean[i : i + 256].to(dev)).sample.cpu() for i in range(0, len(mean), 256)]).clamp(
            -1, 1
        )
    val_psnr = float(psnr(rec, val).mean())
    # scaling factor: 1 / std of posterior samples on training images (the LDM/SD recipe)
    sample_mean, sample_std = encode(vae, train[:2048])
    z = sample_mean + sample_std * torch.randn(sample_mean.shape, generator=gen)
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    report = {
        "config": to_dict(cfg),
        "train_images": len(train_u8),
        "validation_images": len(val_u8),
        "validation_split": validation_rule(src),
        "validation_psnr_db": round(val_psnr, 3),
        "train_seconds": round(seconds, 1),
        "scaling_factor": scaling,
        "params": sum(p.numel() for p in vae.parameters()),
        "downsample": 2 ** (len(cfg.block_out_channels) - 1),
    }
    with atomic_dir(out) as tmp:
        vae.cpu().save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(Path(tmp) / "ldmscale_autoencoder.json", report)
    return report


def load_autoencoder(spec: str):
    """A diffusers AutoencoderKL from a local folder (its own, or a pipeline's vae/) or a hub id."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    try:
        if path.is_dir():
            if (path / "vae" / "config.json").exists():
                return AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
            if (path / "config.json").exists():
                return AutoencoderKL.from_pretrained(path).eval()
            raise UserError(f"autoencoder {spec!r}: no config.json (or vae/config.json) in that folder")
        if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
            raise UserError(f"autoencoder not found: {spec} (a diffusers AutoencoderKL folder or a hub id)")
        try:
            return AutoencoderKL.from_pretrained(spec, subfolder="vae").eval()
        except OSError:
            return AutoencoderKL.from_pretrained(spec).eval()
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load autoencoder {spec!r}: {str(e).splitlines()[0]}") from None


def identity(vae, spec: str) -> dict:
    """What a cache or run records about its autoencoder, to refuse mixing latents of two of them."""
    cfg = dict(vae.config)
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    weights = None
    path = Path(spec)
    for cand in (path / "diffusion_pytorch_model.safetensors", path / "vae" / "diffusion_pytorch_model.safetensors"):
        if cand.exists():
            weights = file_sha256(cand)[:16]
            break
    if weights is None:  # hub models: hash the weights in memory
        h = hashlib.sha256()
        for k, v in sorted(vae.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        weights = h.hexdigest()[:16]
    return {
        "spec": str(path.resolve()) if path.exists() else str(spec),
        "config_sha": config_sha,
        "weights_sha": weights,
        "scaling_factor": float(cfg["scaling_factor"]),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "channels": int(cfg["in_channels"]),
        "latent_channels": int(cfg["latent_channels"]),
        "downsample": 2 ** (len(cfg["block_out_channels"]) - 1),
    }


def check_resolution(vae, resolution: int) -> int:
    """The latent side for an image side, or a clear error when it does not divide."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % f:
        raise UserError(f"resolution {resolution} is not a multiple of the autoencoder's downsampling factor {f}")
    return resolution // f
