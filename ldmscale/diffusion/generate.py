"""Generate images from a run: prompts -> text states -> sampling loop -> autoencoder decode -> PNGs and a grid."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmscale import checkpoint
from ldmscale.data.text import load_text_encoder
from ldmscale.device import current, on
from ldmscale.diffusion.schedulers import (
    SampleStats,
    check_sampler_fits,
    check_sampling_args,
    generate_latents,
    make_sampler,
)
from ldmscale.errors import UserError
from ldmscale.model.family import build_network
from ldmscale.model.flops import count_flops
from ldmscale.progress import bar


@dataclass
class RunModel:
    """A loaded run: UNet (EMA or raw weights), its config, and the autoencoder and text encoder it was trained with."""

    run: Path
    ckpt: Path
    config: dict
    unet: torch.nn.Module
    vae: torch.nn.Module = field(repr=False)
    text: object = field(repr=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.config["data"]["latent_shape"]
        return int(c), int(h), int(w)

    @property
    def prediction(self) -> str:
        return self.config["train"].get("prediction", "epsilon")

    def sampler(self, name: str, spacing: str = "leading"):
        """The named sampler for this run: a distilled student steps on the grid it was distilled on; others on
        SD v1.5's leading timestep spacing or on the trailing one (every sample starts at t=999). A flow run takes
        the flow samplers only (they start at sigma 1 whatever the spacing)."""

        check_sampler_fits(name, self.prediction)

        distill = self.config.get("task", {}).get("distill", {})
        if name == "lcm" and distill.get("solver_steps"):
            return make_sampler(name, self.prediction, original_inference_steps=int(distill["solver_steps"]))
        if distill.get("method") == "progressive" and distill.get("spacing") == "trailing":
            return make_sampler(name, self.prediction, timestep_spacing="trailing")  # the grid it was distilled on
        return make_sampler(name, self.prediction, timestep_spacing=spacing)


@lru_cache(maxsize=4)
def _vae(spec: str, device: str = "cpu"):
    from ldmscale.data.autoencoder import load_autoencoder

    return on(load_autoencoder(spec), torch.device(device))


@lru_cache(maxsize=4)
def _text(spec: str, max_length: int, device: str = "cpu"):

    enc = load_text_encoder(spec, max_length)
    enc.model = on(enc.model, torch.device(device))
    return enc


def load_run(
    run: str | Path,
    which: str = "latest",
    weights: str = "ema",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> RunModel:
    """A run's UNet (its EMA or raw weights, in `dtype` when given: bf16 inference), autoencoder and text encoder,
    all on the device (ldmscale.device.current() unless given)."""

    device = torch.device(device) if device is not None else current()
    run = Path(run)
    ckpt = checkpoint.resolve(run, which)
    config = checkpoint.read_run_config(run)
    unet = build_network(config)
    unet.load_state_dict(checkpoint.load_weights(ckpt, weights))
    unet = on(unet, device, dtype)
    data = config["data"]
    vae = _vae(data["autoencoder"]["spec"], str(device))
    text = _text(data["text_encoder"]["spec"], int(data["context_len"]), str(device))
    return RunModel(run, ckpt, config, unet, vae, text)


def encode_prompts(model: RunModel, prompts: list[str], with_mask: bool = False):
    """(cond [N,L,D], uncond [1,L,D]) as the run was trained (zero-padded or full CLIP states);
    with_mask adds (cond_mask [N,L], uncond_mask [1,L])."""
    states, masks = model.text.encode(list(prompts) + [""])
    if with_mask:
        return states[:-1], states[-1:], masks[:-1], masks[-1:]
    return states[:-1], states[-1:]


def generate(
    model: RunModel,
    prompts: list[str],
    sampler: str,
    steps: int,
    guidance: float,
    seeds: list[int],
    batch_size: int = 64,
    extra_channels: torch.Tensor | None = None,
    progress: bool = False,
    spacing: str = "leading",
) -> tuple[torch.Tensor, dict]:
    """One image per (prompt, seed) pair: uint8 [N,C,H,W] and sampling stats (model calls, latency)."""
    from ldmscale.data.autoencoder import decode
    from ldmscale.images import to_uint8

    check_sampling_args(sampler, steps, guidance)
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    cond, uncond, cmask, umask = encode_prompts(model, prompts, with_mask=True)
    use_mask = bool(model.config["train"].get("text_mask"))
    images, nfe, t_total, t_loop = [], 0, 0.0, 0.0
    for i in bar(range(0, len(prompts), batch_size), enabled=progress, desc=f"sample {sampler} {steps}", unit="batch"):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        stats = SampleStats()
        t0 = time.perf_counter()
        extra = None if extra_channels is None else extra_channels[i : i + batch_size]
        lat = generate_latents(
            model.unet,
            model.sampler(sampler, spacing),
            steps,
            cond[i : i + batch_size],
            uncond,
            guidance,
            gens,
            model.latent_shape,
            extra,
            stats,
            cmask[i : i + batch_size] if use_mask else None,
            umask if use_mask else None,
        )
        images.append(to_uint8(decode(model.vae, lat.float())).cpu())  # .cpu() waits for the device too
        t_total += time.perf_counter() - t0
        t_loop += stats.seconds
        nfe = stats.model_calls
    n = len(prompts)
    info = {
        "model_calls_per_image": nfe,
        "seconds_per_image": t_total / n,
        "denoise_seconds_per_image": t_loop / n,
        "images": n,
        "batch_size": batch_size,
    }
    return torch.cat(images), info


def check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise UserError("give at least one --prompt")


@lru_cache(maxsize=8)
def side_flops(text_spec: str, max_length: int, vae_spec: str, latent_shape: tuple[int, int, int]) -> dict:
    """Forward FLOPs (multiply-add = 2) of what the paper's cost axis leaves out: the text encoder on one prompt of
    `max_length` tokens, and the decoder on one latent. Counted with attention in torch's math kernel, whose
    products the FLOP counter sees (its CPU flash kernel has no formula)."""

    from ldmscale.data.autoencoder import decode

    text, vae = _text(text_spec, max_length), _vae(vae_spec)
    ids = torch.full((1, max_length), int(text.tokenizer.pad_token_id or 0), dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH):
        t = count_flops(text.model, input_ids=ids, attention_mask=torch.ones_like(ids))
        d = count_flops(lambda z: decode(vae, z), torch.zeros(1, *latent_shape))
    return {"text_encoder_flops": t, "decoder_flops": d}
