"""One training micro-batch: what every data source's batch() returns and every objective's loss() reads."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """Scaled latents [B,c,h,w], text states [B,L,D] and mask [B,L], the UNet's extra input channels
    (super-resolution's low-resolution condition) and the empty caption's states (the unconditional branch of
    guidance; the training loop adds them with its caption dropout)."""

    z: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    extra: torch.Tensor | None = None
    empty: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in (getattr(self, f.name) for f in fields(self))))
