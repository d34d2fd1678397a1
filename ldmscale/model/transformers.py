"""Transformer backbones on the family's cost axis (issue 18): a cross-attention DiT (PixArt-alpha's, diffusers
`PixArtTransformer2DModel`, adaLN-single) and SD3's joint-attention MM-DiT (`SD3Transformer2DModel`).

Size names (any of them works wherever a UNet size `c16` does: `train --size`, a study's `sizes`):
- `dit-s`, `dit-b`, `dit-l`, `dit-xl`: DiT's (hidden 384/768/1024/1152, depth 12/12/24/28, heads 6/12/16/16);
  `dit-<hidden>x<depth>` for any other (tiny CPU sizes, e.g. `dit-64x4`), heads = hidden/32 by default;
- `mmdit-d<depth>`: SD3's rule, hidden = 64 x depth and heads = depth (`mmdit-d24` is SD3-medium); the head
  width 64 changes with `:a<width>` for tiny CPU sizes (`mmdit-d4:a16`: hidden 64, 4 heads);
- options `:h<heads>` (dit), `:p<patch>` (both; 2 by default, the "/2" of DiT-XL/2).

Both take the text encoder's token states as they are (projected to the hidden width inside, as PixArt's
caption projection and SD3's context embedder do). SD3's pooled text vector is the mean of the token states
(ldmscale's text encoders have no pooled output). The wrappers give them the UNet's call, so the training loop,
the objectives and the samplers drive every backbone the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ldmscale.errors import UserError
from ldmscale.names import Backbone

BACKBONES = (Backbone.UNET, Backbone.DIT, Backbone.MMDIT)
DIT_NAMED = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
PRESETS = {  # tiny CPU sizes of each backbone, then the published ones
    # cpu: the FLOPs of c8, c16 and c32 at the demo's 8x8x4 latent and 16-token context
    Backbone.DIT: {"cpu": ("dit-64x6", "dit-128x6", "dit-192x8"), "paper": ("dit-s", "dit-b", "dit-l", "dit-xl")},
    Backbone.MMDIT: {
        "cpu": ("mmdit-d2:a32", "mmdit-d4:a32", "mmdit-d6:a32"),
        "paper": ("mmdit-d12", "mmdit-d18", "mmdit-d24", "mmdit-d30"),
    },
}


@dataclass(frozen=True)
class TransformerSize:
    backbone: str  # "dit" or "mmdit"
    hidden: int
    depth: int
    heads: int
    patch: int = 2

    @property
    def name(self) -> str:
        if self.backbone == Backbone.MMDIT:
            a = self.hidden // self.depth
            return (
                f"mmdit-d{self.depth}" + (f":a{a}" if a != 64 else "") + (f":p{self.patch}" if self.patch != 2 else "")
            )
        named = {v: k for k, v in DIT_NAMED.items()}.get((self.hidden, self.depth, self.heads))
        base = f"dit-{named}" if named else f"dit-{self.hidden}x{self.depth}"
        if not named and self.heads != max(1, self.hidden // 32):
            base += f":h{self.heads}"
        return base + (f":p{self.patch}" if self.patch != 2 else "")

    @property
    def adjusted(self) -> str:
        return ""

    @property
    def layout(self) -> str:
        kind = "DiT (PixArt-alpha)" if self.backbone == Backbone.DIT else "MM-DiT (SD3)"
        return f"{kind}, {self.heads} heads, patch {self.patch}"


def parse_transformer(text: str) -> TransformerSize:
    """'dit-xl', 'dit-64x4:h2', 'mmdit-d24', 'mmdit-d4:a16:p1' -> TransformerSize."""
    base, *opts = text.strip().lower().split(":")
    got = {}
    for opt in opts:
        m = re.fullmatch(r"([hpa])(\d+)", opt)
        if not m:
            raise UserError(f"size {text!r}: option {opt!r} is not h<heads>, p<patch> or a<head width>")
        got[m.group(1)] = int(m.group(2))
    patch = got.get("p", 2)
    if base.startswith("dit-"):
        rest = base[4:]
        if rest in DIT_NAMED:
            hidden, depth, heads = DIT_NAMED[rest]
        else:
            m = re.fullmatch(r"(\d+)x(\d+)", rest)
            if not m:
                raise UserError(f"unknown DiT size {text!r}: dit-s, dit-b, dit-l, dit-xl or dit-<hidden>x<depth>")
            hidden, depth = int(m.group(1)), int(m.group(2))
            heads = max(1, hidden // 32)
        heads = got.get("h", heads)
        if "a" in got:
            raise UserError(f"size {text!r}: :a<head width> is for mmdit sizes; a DiT takes :h<heads>")
        size = TransformerSize(Backbone.DIT, hidden, depth, heads, patch)
    elif base.startswith("mmdit-"):
        m = re.fullmatch(r"d(\d+)", base[6:])
        if not m:
            raise UserError(f"unknown MM-DiT size {text!r}: mmdit-d<depth> (hidden = 64 x depth, as SD3)")
        depth = int(m.group(1))
        if "h" in got:
            raise UserError(f"size {text!r}: an MM-DiT has depth heads (SD3's rule); change the head width with :a")
        size = TransformerSize(Backbone.MMDIT, got.get("a", 64) * depth, depth, depth, patch)
    else:
        raise UserError(f"unknown transformer size {text!r}")
    if min(size.hidden, size.depth, size.heads, size.patch) < 1 or size.hidden > 65536 or size.depth > 1000:
        raise UserError(f"size {text!r}: hidden, depth, heads and patch must be positive (hidden <= 65536)")
    if size.hidden % size.heads:
        raise UserError(f"size {text!r}: {size.heads} heads do not divide the hidden width {size.hidden}")
    return size


def transformer_config(
    size: TransformerSize, latent_size: int, context_dim: int, latent_channels: int = 4, extra_in_channels: int = 0
) -> dict:
    """diffusers kwargs of the backbone at this latent size and text width."""
    if extra_in_channels:
        raise UserError(
            f"{size.name}: super-resolution fine-tunes take UNet runs only (a {size.backbone} has no "
            "input convolution to widen)"
        )
    if latent_size % size.patch:
        raise UserError(f"{size.name}: patch {size.patch} does not divide the latent side {latent_size}")
    head_dim = size.hidden // size.heads
    if size.backbone == Backbone.DIT:
        return dict(
            num_attention_heads=size.heads,
            attention_head_dim=head_dim,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=size.depth,
            cross_attention_dim=size.hidden,
            caption_channels=context_dim,
            sample_size=latent_size,
            patch_size=size.patch,
            use_additional_conditions=False,
            norm_num_groups=32,
        )
    return dict(
        sample_size=latent_size,
        patch_size=size.patch,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=size.depth,
        attention_head_dim=head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=context_dim,
        caption_projection_dim=size.hidden,
        pooled_projection_dim=context_dim,
        pos_embed_max_size=latent_size // size.patch,
    )


def _batch_t(t: torch.Tensor | float, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(n) if t.dim() == 0 else t


class DiT(torch.nn.Module):
    """PixArtTransformer2DModel behind the UNet's call: net(x, t, encoder_hidden_states=, encoder_attention_mask=)."""

    def __init__(self, **kwargs):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        self.net = PixArtTransformer2DModel(**kwargs)
        self.config = self.net.config

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None, timestep_cond=None, **_):
        if timestep_cond is not None:
            raise UserError("guidance-conditioned (distilled) students are UNets; a DiT takes no timestep_cond")
        mask = None if encoder_attention_mask is None else encoder_attention_mask.to(x.dtype)
        return self.net(
            x,
            encoder_hidden_states=encoder_hidden_states,
            timestep=_batch_t(t, x.shape[0], x.device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=mask,
        )


class MMDiT(torch.nn.Module):
    """SD3Transformer2DModel behind the UNet's call; the pooled text vector is the (masked) mean of the tokens."""

    def __init__(self, **kwargs):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.net = SD3Transformer2DModel(**kwargs)
        self.config = self.net.config

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None, timestep_cond=None, **_):
        if timestep_cond is not None:
            raise UserError("guidance-conditioned (distilled) students are UNets; an MM-DiT takes no timestep_cond")
        ctx = encoder_hidden_states
        if encoder_attention_mask is None:
            pooled = ctx.mean(1)
        else:
            m = encoder_attention_mask.to(ctx.dtype)[..., None]
            pooled = (ctx * m).sum(1) / m.sum(1).clamp(min=1)
        return self.net(
            x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=_batch_t(t, x.shape[0], x.device)
        )


def build_transformer(backbone: str, kwargs: dict, device: str | None = None) -> torch.nn.Module:
    cls = {Backbone.DIT: DiT, Backbone.MMDIT: MMDiT}[backbone]
    if device == "meta":
        with torch.device("meta"):
            return cls(**kwargs)
    return cls(**kwargs)
