"""The one place that decides the device: accelerate's process state (cuda:<local rank> under `accelerate launch`,
cuda:0 on one GPU, else the CPU), overridden by `ldmscale --device` or the LDMSCALE_DEVICE environment variable.
Every command moves every model it uses there; nothing falls back to the CPU silently."""

from __future__ import annotations

import os

import torch

from ldmscale.errors import UserError

ENV = "LDMSCALE_DEVICE"


def _distributed_cpu() -> bool:
    """Without a GPU, accelerate only forms a process group when told it is on the CPU (then gloo)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def requested() -> str:
    spec = os.environ.get(ENV, "").strip()
    if spec:
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise UserError(f"{ENV}={spec!r} is not a device (cpu, cuda, cuda:1, mps, meta)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{ENV}={spec!r} but torch sees no CUDA device (a CPU build of torch, or no GPU)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{ENV}={spec!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return spec


def accelerator_kwargs() -> dict:
    """Keyword arguments for accelerate's Accelerator / PartialState that honour the override."""
    spec = requested()
    return {"cpu": True} if spec == "cpu" or (not spec and _distributed_cpu()) else {}


def current() -> torch.device:
    """The device this process computes on."""
    spec = requested()
    if spec and spec != "cpu":
        return torch.device(spec)
    from accelerate import PartialState

    return PartialState(**accelerator_kwargs()).device


def on(module: torch.nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Put a module on the device (and dtype), in eval mode without gradients: how inference models are held."""
    module = module.to(device or current()) if dtype is None else module.to(device or current(), dtype=dtype)
    return module.eval().requires_grad_(False)
