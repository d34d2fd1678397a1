"""Exact accounting (the table in the README's family section): parameters, forward FLOPs, normalized cost,
training and sampling cost.

FLOP convention everywhere: a multiply-add counts as 2 FLOPs (torch.utils.flop_counter's convention).
Forward FLOPs are per sample (batch 1), measured once per (size, latent, context) on the meta device,
so even the 5B model costs no memory and well under a second.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ldmscale.io import atomic_write_json
from ldmscale.model.family import (
    REFERENCE_C,
    ModelSize,
    build_network,
    make_size,
    network_config,
    paper_label,
    paper_params,
)
from ldmscale.names import Backbone
from ldmscale.progress import bar

FLOP_CONVENTION = "multiply-add = 2 FLOPs"


@dataclass(frozen=True)
class Cost:
    """The accounting of one model at one latent size and text context."""

    params: int
    flops: int  # forward FLOPs per sample, multiply-add = 2
    norm_cost: float  # flops / flops of the C=320 SD v1.5 UNet at the same latent size and context

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _cache_file() -> Path:
    root = os.environ.get("LDMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldmscale")
    return Path(root) / "flops-v1.json"


def _key(size, latent_size: int, context_len: int, context_dim: int, latent_channels: int, extra_in: int) -> str:

    if not isinstance(size, ModelSize):
        return (
            f"diffusers{version('diffusers')}-{size.backbone}-w{size.hidden}-d{size.depth}-h{size.heads}-"
            f"p{size.patch}-lat{latent_channels}x{latent_size}-ctx{context_len}x{context_dim}-in{extra_in}"
        )
    return (
        f"diffusers{version('diffusers')}-C{size.C}-h{size.heads}-g{size.norm_groups}-l{size.layers_per_block}-lat{latent_channels}x{latent_size}"
        f"-ctx{context_len}x{context_dim}-in{extra_in}"
    )


def _load_disk_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store_disk_cache(key: str, value: list[int]) -> None:

    data = _load_disk_cache()
    data[key] = value
    try:
        atomic_write_json(_cache_file(), data)
    except OSError:
        pass  # a read-only home is fine: counting is cheap, the cache only saves a second


def count_flops(module, *args, **kwargs) -> int:
    """Forward FLOPs of module(*args, **kwargs) by torch.utils.flop_counter (multiply-add = 2).

    Count on the meta device: torch's CPU flash-attention kernel has no FLOP formula registered, so
    counting real CPU tensors silently misses the attention products (tests/test_family.py shows it).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return int(counter.get_total_flops())


@functools.cache
def measure(
    size, latent_size: int, context_len: int, context_dim: int, latent_channels: int = 4, extra_in_channels: int = 0
) -> tuple[int, int]:
    """(params, forward FLOPs per sample) of one network of any backbone, counted on the meta device (cached on
    disk too)."""
    key = _key(size, latent_size, context_len, context_dim, latent_channels, extra_in_channels)
    cached = _load_disk_cache().get(key)
    if cached:
        return int(cached[0]), int(cached[1])
    import torch

    unet = build_network(network_config(size, latent_size, context_dim, latent_channels, extra_in_channels), "meta")
    params = sum(p.numel() for p in unet.parameters())
    x = torch.empty(1, latent_channels + extra_in_channels, latent_size, latent_size, device="meta")
    ctx = torch.empty(1, context_len, context_dim, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    flops = count_flops(unet, x, t, encoder_hidden_states=ctx)
    _store_disk_cache(key, [params, flops])
    return params, flops


def cost(
    size: ModelSize,
    latent_size: int,
    context_len: int,
    context_dim: int,
    latent_channels: int = 4,
    extra_in_channels: int = 0,
) -> Cost:
    params, flops = measure(size, latent_size, context_len, context_dim, latent_channels, extra_in_channels)
    _, ref = measure(make_size(REFERENCE_C), latent_size, context_len, context_dim, latent_channels, 0)
    return Cost(params=params, flops=flops, norm_cost=flops / ref)


def training_flops(images: int, forward_flops: int) -> float:
    """Training compute: forward + backward ~ 3x forward, per image seen (the usual 6N-per-token rule)."""
    return 3.0 * images * forward_flops


def steps_x_gflops(steps: int, forward_flops: int) -> float:
    """The paper's training-compute axis (Fig. 3): optimizer steps x forward GFLOPs."""
    return steps * forward_flops / 1e9


def sampling_cost(norm_cost: float, steps: int) -> float:
    """The paper's sampling-cost axis: normalized cost x sampling steps (guidance's 2x not counted)."""
    return norm_cost * steps


def family_rows(
    sizes: list[ModelSize],
    latent_size: int,
    context_len: int,
    context_dim: int,
    latent_channels: int = 4,
    progress: bool = False,
) -> list[dict]:
    """One accounting row per size: what `ldmscale family` prints."""

    rows = []
    for size in bar(sizes, desc="counting", unit="model", enabled=progress, leave=False):
        c = cost(size, latent_size, context_len, context_dim, latent_channels)
        if not isinstance(size, ModelSize):
            rows.append(_transformer_row(size, c, latent_size, latent_channels, context_len, context_dim))
            continue
        label = paper_label(size.C)
        # parameters depend on the text width, so compare with the paper only at its 1024-wide context
        comparable = label and context_dim == 1024 and latent_channels == 4 and not size.adjusted
        ref_params = paper_params(label) if comparable else float("nan")
        rows.append(
            {
                "name": size.name,
                "C": size.C,
                "heads": size.heads,
                "norm_groups": size.norm_groups,
                "params": c.params,
                "params_m": round(c.params / 1e6, 2),
                "paper_label": label,
                "params_vs_paper_pct": None
                if ref_params != ref_params
                else round(100 * (c.params / ref_params - 1), 2),
                "matches_paper": None if ref_params != ref_params else matches_paper(c.params, label),
                "gflops": round(c.gflops, 3),
                "norm_cost": round(c.norm_cost, 4),
                "latent": f"{latent_size}x{latent_size}x{latent_channels}",
                "context": f"{context_len}x{context_dim}",
                "layout": size.adjusted or "SD v1.5",
                "flops_convention": FLOP_CONVENTION,
                "backbone": Backbone.UNET,
                "depth": None,
            }
        )
    return rows


def matches_paper(params: int, label: str) -> bool:
    """Equal to the paper's label after rounding to its precision (38.80M -> 39M, 2.19B -> 2B)."""

    unit = 1e9 if label.endswith("B") else 1e6
    return round(params / unit) == round(paper_params(label) / unit)


def _transformer_row(size, c: Cost, latent_size: int, latent_channels: int, context_len: int, context_dim: int) -> dict:
    return {
        "name": size.name,
        "C": size.hidden,
        "heads": size.heads,
        "norm_groups": None,
        "params": c.params,
        "params_m": round(c.params / 1e6, 2),
        "paper_label": "",
        "params_vs_paper_pct": None,
        "matches_paper": None,
        "gflops": round(c.gflops, 3),
        "norm_cost": round(c.norm_cost, 4),
        "latent": f"{latent_size}x{latent_size}x{latent_channels}",
        "context": f"{context_len}x{context_dim}",
        "layout": size.layout,
        "flops_convention": FLOP_CONVENTION,
        "backbone": size.backbone,
        "depth": size.depth,
    }
