"""4x super-resolution fine-tuning of a text-to-image run, as the SD x4 upscaler conditions.

The low-resolution image (bicubic x4, or a Real-ESRGAN-style degradation) is concatenated to the noisy latent
at the UNet input: as pixels at the latent's resolution (SD x4 upscaler), or as its latent code (the paper).
The first convolution is widened and initialized from the pretrained weights, the new input channels at zero,
so the fine-tune starts exactly at the pretrained model. Noise augmentation adds Gaussian noise of a fixed
level to the condition, in training and sampling alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldmscale.config import from_dict, to_dict
from ldmscale.data.batch import Batch
from ldmscale.data.degrade import degrade, resize
from ldmscale.errors import UserError
from ldmscale.model import flops
from ldmscale.model.family import parse_size
from ldmscale.names import Kind
from ldmscale.tasks.config import SRConfig
from ldmscale.train.objectives import check_same_objective, objective_for


def sr_prediction(init_prediction: str) -> str:
    """The objective a super-resolution fine-tune trains with, as the SD x4 upscaler: v prediction (a flow run stays
    flow). Under the noise objective the condition's signal is weighted by the SNR, so it vanishes at the high-noise
    steps where the low-resolution input decides the image: c16 fine-tuned on 8,000 images scored PSNR 11.6 dB and
    consistency 15.1 dB with epsilon, 14.8 and 19.9 with v (bench/sr_diagnose.py, docs/demo.md)."""
    return "flow" if init_prediction == "flow" else "v_prediction"


def condition_channels(cfg: SRConfig, image_channels: int, latent_channels: int) -> int:
    return image_channels if cfg.condition == "pixels" else latent_channels


def check_shapes(cfg: SRConfig, resolution: int, latent_side: int) -> None:
    if cfg.scale < 1 or resolution % cfg.scale:
        raise UserError(f"scale {cfg.scale} does not divide the run's resolution {resolution}")
    if cfg.condition == "pixels" and resolution // cfg.scale != latent_side:
        raise UserError(
            f"pixel conditioning needs the low-resolution side ({resolution // cfg.scale}) to equal the "
            f"latent side ({latent_side}); use --set scale={resolution // latent_side} or condition=latent"
        )


def condition(lr: torch.Tensor, cfg: SRConfig, vae, resolution: int, latent_side: int, seeds) -> torch.Tensor:
    """uint8 low-resolution images -> the extra UNet input channels (noise-augmented)."""
    from ldmscale.images import to_float

    if lr.shape[-1] * cfg.scale != resolution:
        raise UserError(
            f"low-resolution inputs are {lr.shape[-1]}px; this model upsamples {resolution // cfg.scale}px "
            f"by {cfg.scale} to {resolution}px"
        )
    if cfg.condition == "pixels":
        c = to_float(lr)
    else:
        from ldmscale.data.autoencoder import encode

        mean, _ = encode(
            vae, to_float(resize(lr, resolution, "bicubic"))
        )  # on the autoencoder's device, back on the CPU
        c = mean * float(vae.config.scaling_factor)
    if cfg.noise_aug > 0:
        noise = torch.stack(
            [torch.randn(c.shape[1:], generator=torch.Generator().manual_seed(int(s) + 7)) for s in seeds]
        )
        c = c + cfg.noise_aug * noise
    return c


def widen_conv_in(state: dict, extra: int) -> dict:
    """Pretrained weights with `extra` zero-initialized input channels on the first convolution."""
    state = dict(state)
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], extra, *w.shape[2:], dtype=w.dtype)], dim=1)
    return state


class SRData:
    """High-resolution training images with their latents and caption states; degradations drawn per sample."""

    def __init__(self, cfg: SRConfig, model):
        from ldmscale.data.autoencoder import encode
        from ldmscale.data.sources import load_images, parse_source
        from ldmscale.images import to_float

        data = model.config["data"]
        self.cfg, self.vae = cfg, model.vae
        self.resolution, channels = int(data["resolution"]), int(data["channels"])
        self.latent_side = model.latent_shape[1]
        hr, caps, _ = load_images(parse_source(cfg.data), "train", self.resolution, channels, cfg.limit or None)
        self.hr = torch.as_tensor(hr)
        self.mean, self.std = encode(model.vae, to_float(self.hr))
        self.sf = float(model.vae.config.scaling_factor)
        states, masks = model.text.encode(caps)
        self.text, self.mask = states.to(torch.float16), masks
        empty, empty_mask = model.text.encode([""])
        self.empty_text, self.empty_mask = empty[0], empty_mask[0]

    def __len__(self) -> int:
        return len(self.hr)

    def batch(self, idx, latent_noise=None, seeds=None):

        z = self.mean[idx] if latent_noise is None else self.mean[idx] + self.std[idx] * latent_noise
        seeds = [int(s) for s in (seeds if seeds is not None else idx)]
        lr = degrade(self.hr[idx], self.cfg.scale, self.cfg.degradation, seeds)
        extra = condition(lr, self.cfg, self.vae, self.resolution, self.latent_side, seeds)
        return Batch(z * self.sf, self.text[idx].float(), self.mask[idx], extra)


def sr_task(sr: SRConfig):
    """A make_task for train.train: the widened init model on super-resolution data."""
    from ldmscale import checkpoint
    from ldmscale.diffusion.generate import load_run
    from ldmscale.train.run import check_continuation

    def make(cfg, run):
        model = load_run(sr.init, sr.checkpoint, "ema")
        if model.config.get("kind") != Kind.TEXT_TO_IMAGE:
            raise UserError(
                f"--init {sr.init} is a {model.config.get('kind')} run; super-resolution starts from a "
                "text-to-image run"
            )
        if "unet" not in model.config:
            raise UserError(
                f"--init {sr.init} is a {model.config.get('backbone')} run; super-resolution widens a UNet's "
                "input convolution (UNet runs only in this version)"
            )
        check_same_objective(model.prediction, cfg)
        c, h, _ = model.latent_shape
        resolution, channels = int(model.config["data"]["resolution"]), int(model.config["data"]["channels"])
        check_shapes(sr, resolution, h)
        extra = condition_channels(sr, channels, c)
        resolved = dict(model.config)
        resolved["kind"] = Kind.SUPER_RESOLUTION
        resolved["task"] = to_dict(sr) | {"init": str(Path(sr.init).resolve())}
        resolved["init"] = {"run": str(Path(sr.init).resolve()), "checkpoint": model.ckpt.name}
        resolved["unet"] = dict(model.config["unet"], in_channels=c + extra)
        resolved["train"] = to_dict(cfg) | {"size": model.config["train"]["size"], "data": sr.data}
        cost = flops.cost(
            parse_size(model.config["train"]["size"]),
            h,
            model.config["data"]["context_len"],
            model.config["data"]["context_dim"],
            c,
            extra,
        )
        resolved["accounting"] = dict(
            model.config["accounting"],
            params=cost.params,
            forward_flops=cost.flops,
            gflops=cost.gflops,
            norm_cost=cost.norm_cost,
        )
        check_continuation(run, resolved)
        from ldmscale.train.run import Task

        init = widen_conv_in(checkpoint.load_weights(model.ckpt, "ema"), extra)
        return Task(resolved, SRData(sr, model), objective_for(cfg), init=init)

    return make


def finetune_sr(sr: SRConfig, train_cfg, out: str | Path, progress: bool = True) -> dict:
    from ldmscale.train.loop import train

    if not sr.init:
        raise UserError("--init RUN_DIR is required")
    return train(train_cfg, out, progress, make_task=sr_task(sr))


def upscale(
    model,
    lr: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    batch_size: int = 64,
    spacing: str = "leading",
) -> tuple[torch.Tensor, dict]:
    """Super-resolve uint8 low-resolution images with a super-resolution run."""
    from ldmscale.diffusion.generate import generate

    cfg = from_dict(SRConfig, model.config["task"])
    res = int(model.config["data"]["resolution"])
    extra = condition(lr, cfg, model.vae, res, model.latent_shape[1], seeds)
    return generate(model, prompts, sampler, steps, guidance, seeds, batch_size, extra_channels=extra, spacing=spacing)
