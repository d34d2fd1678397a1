"""The settings of the first stage and the latent cache, declared once (a light module: the CLI builds `ldmscale
autoencoder train` and `ldmscale data prepare` options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ldmscale.config import Config, NonNegative, Range
from ldmscale.errors import UserError


@dataclass(frozen=True)
class PrepareConfig(Config):
    source: str  # animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT]
    autoencoder: str  # AutoencoderKL folder or hub id
    text_encoder: str = "minilm"  # minilm, clip-l[:PATH], clip-h[:PATH] or clip:PATH
    resolution: Annotated[int, Range(8, 8192)] = 32  # image side after center crop and resize
    shard_size: Annotated[int, Range(1, 10**7)] = 1000  # images per cache shard (a killed prepare resumes at the
    # first missing shard)
    batch_size: Annotated[int, Range(1, 2**16)] = 250  # images encoded per batch
    max_length: Annotated[int, Range(2, 512)] = 77  # text tokens kept per caption (SD: 77); FLOPs and normalized
    # cost follow it
    limit: NonNegative = 0  # encode at most N images per split (0: all); for quick trials


@dataclass(frozen=True)
class AutoencoderConfig(Config):
    """A small KL autoencoder for CPU-sized data (defaults: 32px grayscale -> 8x8x4 latents, ~0.25M params)."""

    source: str = "animal-mnist"  # animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT]
    resolution: Annotated[int, Range(8, 8192)] = 32  # image side after center crop and resize
    channels: Literal[0, 1, 3] = 0  # 0: from the data (3 if its images have colour, else 1); 1 grayscale; 3 RGB
    block_out_channels: tuple[Annotated[int, Range(1, 4096)], ...] = (16, 32, 32)  # len-1 downsamplings: f=4
    layers_per_block: Annotated[int, Range(1, 8)] = 1  # ResNet layers per resolution
    latent_channels: Annotated[int, Range(1, 64)] = 4  # channels of the latent (SD: 4)
    norm_groups: Annotated[int, Range(1, 1024)] = 16  # GroupNorm groups (divide every width)
    steps: Annotated[int, Range(1, 10**8)] = 1000  # optimizer steps
    batch_size: Annotated[int, Range(1, 2**16)] = 64  # images per step
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 2e-3  # Adam learning rate
    kl_weight: Annotated[float, Range(0.0, 1e3)] = 1e-6  # SD's first stage uses a tiny KL term: a nearly
    # deterministic latent
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0  # initialization and data order
    max_images: NonNegative = 0  # cap the training images (0: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.block_out_channels:
            raise UserError("autoencoder block_out_channels must not be empty")
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise UserError(f"autoencoder: {self.norm_groups} norm groups do not divide width {bad[0]}")
        f = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % f:
            raise UserError(
                f"autoencoder resolution {self.resolution} is not a multiple of its downsampling factor {f}"
            )
