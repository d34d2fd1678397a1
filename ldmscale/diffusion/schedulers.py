"""The noise schedule, the sampler registry, and the one sampling loop.

Samplers are diffusers schedulers configured from SD v1.5's training schedule (1000 steps, scaled_linear
betas 0.00085..0.012); the loop is StableDiffusionPipeline's, so `ldmscale sample` and the exported pipeline
give the same latents for the same seeds (tests/test_train_sample.py checks it).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import torch

from ldmscale.errors import UserError

SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    timestep_spacing="leading",
)


def _classes():
    import diffusers as d

    return {
        # the paper's three
        "ddim": (d.DDIMScheduler, {}),
        "ddpm": (d.DDPMScheduler, {}),
        "dpmsolver++": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        # and the usual others
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler-a": (d.EulerAncestralDiscreteScheduler, {}),
        "heun": (d.HeunDiscreteScheduler, {}),
        "unipc": (d.UniPCMultistepScheduler, {}),
        "lcm": (d.LCMScheduler, {}),
        # for the rectified-flow objective (SD3's): Euler and Heun on the straight path, sigma 1 -> 0
        "flow-euler": (d.FlowMatchEulerDiscreteScheduler, {"shift": 1.0}),
        "flow-heun": (d.FlowMatchHeunDiscreteScheduler, {"shift": 1.0}),
    }


SAMPLERS = ("ddim", "ddpm", "dpmsolver++", "euler", "euler-a", "heun", "unipc", "lcm", "flow-euler", "flow-heun")
FLOW_SAMPLERS = ("flow-euler", "flow-heun")


SECOND_ORDER = ("heun", "flow-heun")  # two model calls per step but the last (diffusers' Heun: 2 * steps - 1)


def model_calls(sampler: str, steps: int, guidance: float, guidance_embedded: bool = False) -> int:
    """UNet evaluations per image as the sampling loop runs them: Heun's 2 * steps - 1, one per step otherwise,
    doubled by classifier-free guidance (guidance > 1) unless the scale is embedded in the network (LCM students)."""
    calls = 2 * steps - 1 if sampler in SECOND_ORDER else steps
    return calls * (2 if guidance > 1.0 and not guidance_embedded else 1)


def check_sampler_fits(name: str, prediction: str) -> None:
    """A flow-trained network predicts a velocity on the straight path: only the flow samplers read it, and they
    read nothing else."""
    if (name in FLOW_SAMPLERS) != (prediction == "flow"):
        fits = ", ".join(FLOW_SAMPLERS) if prediction == "flow" else "ddim, ddpm, dpmsolver++, ... (not flow-*)"
        raise UserError(f"sampler {name!r} does not fit a run trained with prediction={prediction}; use {fits}")


def _build(cls, config: dict):
    """A scheduler from the keys of `config` that its class accepts (SD's config has keys DDPM lacks)."""

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def noise_scheduler(prediction_type: str = "epsilon"):
    """The training schedule (DDPM, SD v1.5's betas)."""
    from diffusers import DDPMScheduler

    return _build(DDPMScheduler, SD_SCHEDULE | {"prediction_type": prediction_type})


def make_sampler(name: str, prediction_type: str = "epsilon", **overrides):
    """A sampler on SD v1.5's schedule; `overrides` are scheduler config keys (e.g. lcm's original_inference_steps)."""
    classes = _classes()
    if name not in classes:
        raise UserError(f"unknown sampler {name!r}; samplers: {', '.join(SAMPLERS)}")
    cls, extra = classes[name]
    return _build(cls, SD_SCHEDULE | {"prediction_type": prediction_type} | extra | overrides)


def check_sampling_args(sampler: str, steps: int, guidance: float) -> None:

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; samplers: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise UserError(f"steps must be between 1 and 1000, got {steps}")
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise UserError(f"guidance must be a finite number between 0 and 100, got {guidance}")


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale (LCM/CoDi students take w as an input, w-1 as in diffusers)."""

    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@dataclass
class SampleStats:
    model_calls: int = 0  # UNet evaluations per image (NFE), guidance's 2x included
    seconds: float = 0.0  # wall time of the denoising loop for the whole batch


@torch.no_grad()
def generate_latents(
    unet,
    sampler,
    steps: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    generators: list[torch.Generator],
    latent_shape: tuple[int, int, int],
    extra_channels: torch.Tensor | None = None,
    stats: SampleStats | None = None,
    cond_mask: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop: cond [B,L,D], one generator per image (so an image does not
    depend on its batch). `extra_channels` (super-resolution) is concatenated to the latent at the input."""
    stats = stats if stats is not None else SampleStats()
    B = cond.shape[0]
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype  # everything follows the UNet: its device, its precision
    cond = cond.to(device, dtype)
    uncond = uncond.to(device, dtype) if uncond is not None else None
    cond_mask = cond_mask.to(device) if cond_mask is not None else None
    uncond_mask = uncond_mask.to(device) if uncond_mask is not None else None
    extra_channels = extra_channels.to(device, dtype) if extra_channels is not None else None
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((B, *latent_shape), generator=generators, device=device, dtype=dtype)
    sampler.set_timesteps(steps, device=device)
    latents = latents * getattr(sampler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma 1
    embedded_w = getattr(unet.config, "time_cond_proj_dim", None)
    do_cfg = guidance > 1.0 and uncond is not None and not embedded_w
    timestep_cond = None
    if embedded_w:
        timestep_cond = guidance_embedding(torch.full((B,), guidance - 1.0), embedded_w).to(device, dtype)
    context = torch.cat([uncond.expand(B, -1, -1), cond]) if do_cfg else cond
    mask = None  # runs trained with text_mask attend only to real tokens
    if cond_mask is not None:
        mask = torch.cat([uncond_mask.expand(B, -1), cond_mask]) if do_cfg else cond_mask
    extra_kwargs = {}

    if "generator" in inspect.signature(sampler.step).parameters:
        extra_kwargs["generator"] = generators
    if "eta" in inspect.signature(sampler.step).parameters:
        extra_kwargs["eta"] = 0.0
    t0 = time.perf_counter()
    for t in sampler.timesteps:
        inp = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(sampler, "scale_model_input"):
            inp = sampler.scale_model_input(inp, t)
        if extra_channels is not None:
            inp = torch.cat([inp, torch.cat([extra_channels] * 2) if do_cfg else extra_channels], dim=1)
        pred = unet(
            inp, t, encoder_hidden_states=context, timestep_cond=timestep_cond, encoder_attention_mask=mask
        ).sample
        stats.model_calls += 2 if do_cfg else 1
        if do_cfg:
            p_uncond, p_cond = pred.chunk(2)
            pred = p_uncond + guidance * (p_cond - p_uncond)
        latents = sampler.step(pred, t, latents, **extra_kwargs, return_dict=False)[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds += time.perf_counter() - t0
    return latents
