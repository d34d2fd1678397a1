"""The model family: the Stable Diffusion v1.5 UNet with only the base width C changed.

`block_out_channels=(C, 2C, 4C, 4C)`, 3x CrossAttnDownBlock2D + DownBlock2D, UpBlock2D + 3x CrossAttnUpBlock2D,
`layers_per_block=2`, 8 attention heads, 32 norm groups (the README's family section). Below C=64 the layout needs two
adjustments, made by one rule and reported by `ldmscale family`:
- GroupNorm needs C divisible by the group count: 32 groups when C is a multiple of 32, otherwise the largest
  divisor of C that is at most 16;
- 8 heads at C=8 would be 1-channel heads; below C=64 the head count is C/8 (8 channels per head at level 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated

from ldmscale.config import Range, validate
from ldmscale.errors import UserError
from ldmscale.names import Backbone

REFERENCE_C = 320  # SD v1.5: normalized cost 1.0


@dataclass(frozen=True)
class ModelSize:
    """One member of the family: everything about the UNet that depends on its size."""

    C: Annotated[int, Range(1, 65536)]  # base width
    heads: Annotated[int, Range(1, 65536)] = 8  # attention heads
    norm_groups: Annotated[int, Range(1, 65536)] = 32  # GroupNorm groups
    layers_per_block: Annotated[int, Range(1, 64)] = 2  # ResNet (and transformer) layers per resolution

    def __post_init__(self) -> None:  # every way of making a size (a name, --set, a study) is checked here
        if not 1 <= self.C <= 65536:
            raise UserError(f"base width C must be between 1 and 65536, got {self.C}")
        if self.heads < 1 or self.norm_groups < 1 or self.layers_per_block < 1:
            raise UserError(
                f"size c{self.C}: heads, norm groups and layers per block must be positive "
                f"(got {self.heads}, {self.norm_groups}, {self.layers_per_block})"
            )
        validate(self)  # and within their ranges
        if self.C % self.norm_groups:
            raise UserError(f"size c{self.C}: {self.norm_groups} norm groups do not divide C={self.C}")
        if self.C % self.heads:
            raise UserError(f"size c{self.C}: {self.heads} heads do not divide C={self.C}")

    @property
    def name(self) -> str:
        return f"c{self.C}"

    @property
    def adjusted(self) -> str:
        """What differs from the SD v1.5 layout, in words ('' when nothing does)."""
        notes = []
        if self.norm_groups != 32:
            notes.append(f"{self.norm_groups} norm groups")
        if self.heads != 8:
            notes.append(f"{self.heads} head{'s' if self.heads > 1 else ''}")
        if self.layers_per_block != 2:
            notes.append(f"{self.layers_per_block} layers/block")
        return ", ".join(notes)


@dataclass(frozen=True)
class Preset:
    name: str
    widths: tuple[int, ...]
    latent_size: int  # latent side (64 for 512px images with the f=8 SD VAE)
    latent_channels: int
    context_len: int
    context_dim: int
    description: str


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        (64, 96, 128, 160, 192, 224, 256, 288, 320, 512, 768),
        64,
        4,
        77,
        1024,
        "the paper's 11 sizes, 39M-5B (64x64x4 latent, 77x1024 text context)",
    ),
    "cpu": Preset(
        "cpu",
        (8, 16, 32, 64),
        8,
        4,
        77,
        384,
        "tiny sizes of the same layout that train on a CPU (8x8x4 latent of 32px images, 77x384 MiniLM context)",
    ),
}

# The paper's labels for its sizes (Table 1), accepted as size names.
PAPER_LABELS: dict[int, str] = {
    64: "39M",
    96: "83M",
    128: "145M",
    160: "223M",
    192: "318M",
    224: "430M",
    256: "558M",
    288: "704M",
    320: "866M",
    512: "2B",
    768: "5B",
}
_ALIASES = {label.lower(): c for c, label in PAPER_LABELS.items()} | {"sd1.5": 320, "sd15": 320}


def default_groups(C: int) -> int:
    if C % 32 == 0:
        return 32
    return max(d for d in range(1, 17) if C % d == 0)


def default_heads(C: int) -> int:
    return 8 if C >= 64 else max(1, C // 8)


def make_size(C: int, heads: int | None = None, norm_groups: int | None = None, layers_per_block: int = 2) -> ModelSize:
    if not 1 <= C <= 65536:  # before the defaults, which divide by C
        raise UserError(f"base width C must be between 1 and 65536, got {C}")
    heads = default_heads(C) if heads is None else heads
    groups = default_groups(C) if norm_groups is None else norm_groups
    return ModelSize(C=C, heads=heads, norm_groups=groups, layers_per_block=layers_per_block)


def parse_size(name: str):
    """'c64', '64', '39M' (paper label) or 'sd1.5' -> ModelSize. Heads/groups by the rule above;
    'c48:h4:g8' sets them explicitly. 'dit-...' and 'mmdit-...' are transformer sizes (model/transformers.py)."""
    text = str(name).strip().lower()
    if text.startswith(("dit-", "mmdit-")):
        from ldmscale.model.transformers import parse_transformer

        return parse_transformer(text)
    parts = text.split(":")
    base, opts = parts[0], parts[1:]
    if base in _ALIASES:
        C = _ALIASES[base]
    else:
        m = re.fullmatch(r"c?(\d+)", base)
        if not m:
            valid = ", ".join([f"c{c}" for c in PRESETS["cpu"].widths + PRESETS["paper"].widths[1:]])
            raise UserError(
                f"unknown size {name!r}: use c<width> (any width, e.g. {valid}) or a paper label "
                f"({', '.join(PAPER_LABELS.values())})"
            )
        C = int(m.group(1))
    heads = groups = None
    for opt in opts:
        m = re.fullmatch(r"([hg])(\d+)", opt)
        if not m:
            raise UserError(f"size {name!r}: option {opt!r} is not h<heads> or g<groups>")
        if m.group(1) == "h":
            heads = int(m.group(2))
        else:
            groups = int(m.group(2))
    return make_size(C, heads, groups)


def size_spec(size) -> str:
    """Inverse of parse_size: a name that rebuilds exactly this size."""
    if not isinstance(size, ModelSize):
        return size.name  # a transformer's name carries its options
    spec = size.name
    if size.heads != default_heads(size.C):
        spec += f":h{size.heads}"
    if size.norm_groups != default_groups(size.C):
        spec += f":g{size.norm_groups}"
    return spec


def preset_sizes(preset: str) -> list[ModelSize]:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return [make_size(c) for c in PRESETS[preset].widths]


def unet_config(
    size: ModelSize,
    latent_size: int,
    context_dim: int,
    latent_channels: int = 4,
    extra_in_channels: int = 0,
) -> dict:
    """diffusers UNet2DConditionModel kwargs for this size (SD v1.5 layout)."""
    C = size.C
    return dict(
        sample_size=latent_size,
        in_channels=latent_channels + extra_in_channels,
        out_channels=latent_channels,
        layers_per_block=size.layers_per_block,
        block_out_channels=(C, 2 * C, 4 * C, 4 * C),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # diffusers' historic naming: attention_head_dim=8 in SD v1.5 means 8 heads.
        attention_head_dim=size.heads,
        norm_num_groups=size.norm_groups,
        cross_attention_dim=context_dim,
    )


def build_unet(
    size: ModelSize,
    latent_size: int,
    context_dim: int,
    latent_channels: int = 4,
    extra_in_channels: int = 0,
    device: str | None = None,
):
    """Build the UNet (randomly initialised). device='meta' costs no memory, for counting."""
    import torch
    from diffusers import UNet2DConditionModel

    if latent_size % 8:
        raise UserError(f"latent size {latent_size} must be a multiple of 8 (the UNet downsamples 3 times)")
    cfg = unet_config(size, latent_size, context_dim, latent_channels, extra_in_channels)
    if device == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    return UNet2DConditionModel(**cfg)


def paper_label(C: int) -> str:
    return PAPER_LABELS.get(C, "")


def paper_params(label: str) -> float:
    """'39M' -> 39e6, '2B' -> 2e9: the paper's rounded parameter count."""
    if not label:
        return math.nan
    return float(label[:-1]) * (1e6 if label.endswith("M") else 1e9)


def backbone_of(size) -> str:
    return Backbone.UNET if isinstance(size, ModelSize) else size.backbone


def network_config(
    size, latent_size: int, context_dim: int, latent_channels: int = 4, extra_in_channels: int = 0
) -> dict:
    """The run config's description of the network: {"unet": kwargs} for the UNet family (as every run before
    backbones had), {"backbone": "dit"|"mmdit", "transformer": kwargs} for the transformers."""
    if isinstance(size, ModelSize):
        if latent_size % 8:
            raise UserError(f"latent size {latent_size} must be a multiple of 8 (the UNet downsamples 3 times)")
        return {"unet": unet_config(size, latent_size, context_dim, latent_channels, extra_in_channels)}
    from ldmscale.model.transformers import transformer_config

    return {
        "backbone": size.backbone,
        "transformer": transformer_config(size, latent_size, context_dim, latent_channels, extra_in_channels),
    }


def build_network(config: dict, device: str | None = None):
    """The network a run config (or network_config's dict) describes, randomly initialised; 'meta' for counting."""
    if "transformer" in config:
        from ldmscale.model.transformers import build_transformer

        return build_transformer(config["backbone"], config["transformer"], device)
    import torch
    from diffusers import UNet2DConditionModel

    if device == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**config["unet"])
    return UNet2DConditionModel(**config["unet"])
