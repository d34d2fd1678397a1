"""TrainConfig: every setting of a training run, declared once (the `train` options, `--set` and a study's
[train] section are generated from or checked against it; the comment after a field is its help text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ldmscale.config import Config, Fraction, NonNegative, Positive, Range


@dataclass(frozen=True)
class TrainConfig(Config):
    data: str = ""  # latent cache folder
    size: str = "c16"  # family size: c<width> (the UNet), a paper label (83M), dit-s..dit-xl, dit-<hidden>x<depth>,
    # mmdit-d<depth>
    images: Positive = 200_000  # duration, in training images seen
    batch_size: Annotated[int, Range(1, 2**20)] = 64  # global batch (all processes, all accumulation steps)
    grad_accum: Annotated[int, Range(1, 2**16)] = 1  # gradient accumulation steps per optimizer step
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = (
        1e-3  # learning rate (the paper: 1e-4 at batch 2048; tiny models take more)
    )
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"  # cosine decays to 0 at `images`; wsd (warm-up,
    # stable, decay: Hagele et al. 2024) holds lr, then decays it linearly to 0 over the last decay_fraction of the
    # run; neither can be extended
    decay_fraction: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.2  # wsd: the share of the run's optimizer
    # steps in the final decay
    warmup_steps: NonNegative = 100  # linear lr warm-up, in optimizer steps
    warmup_fraction: Fraction = 0.0  # warm-up as a share of the run's optimizer steps instead (when > 0), so that
    # runs of every length and size warm up alike
    weight_decay: Annotated[float, Range(0.0, 10.0)] = 0.01  # AdamW's decoupled weight decay
    betas: tuple[Annotated[float, Range(0.0, 0.99999)], Annotated[float, Range(0.0, 0.99999999)]] = (
        0.9,
        0.999,
    )  # AdamW's betas
    grad_clip: Annotated[float, Range(0.0, 1e6)] = 1.0  # gradient-norm clipping (0: none)
    ema_decay: Annotated[float, Range(0.0, 1.0)] = 0.999  # EMA of the weights (sampling uses the EMA by default)
    ema_warmup: bool = True  # diffusers' EMA warm-up: decay (1 + s) / (10 + s) until it reaches ema_decay
    prediction: Literal["epsilon", "v_prediction", "flow"] = "epsilon"  # the objective: DDPM noise (SD v1.5) or v
    # prediction, or flow (SD3's rectified flow: velocity, logit-normal timesteps; sample with flow-euler/flow-heun)
    cfg_dropout: Fraction = 0.1  # caption dropout for classifier-free guidance
    snr_gamma: Annotated[float, Range(0.0, 1e6)] = 0.0  # Min-SNR weighting (Hang et al. 2023); 0: plain MSE
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate's autocast (bf16 on GPUs)
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0  # initialization, data order and noise
    checkpoint_every: NonNegative = 0  # images between checkpoints (0: 4 per run)
    keep: Annotated[int, Range(1, 10**6)] = 2  # checkpoints kept (besides those of checkpoint_at)
    checkpoint_at: tuple[Positive, ...] = ()  # optimizer steps that also get a checkpoint, never pruned (curves)
    log_every: Annotated[int, Range(1, 10**9)] = 20  # optimizer steps between log lines
    latent_sample: bool = True  # sample z from the cached posterior (else use its mean)
    text_mask: bool = False  # mask padded text tokens in cross-attention (SD does not)
    report_to: Literal["", "tensorboard", "wandb"] = ""  # an accelerate tracker (losses, lr, ledger, sample grids)
    project: str = "ldmscale"  # the tracker's project
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (2B/5B sizes)
    activation_checkpointing: bool = True  # with fsdp: recompute block activations in the backward pass


# settings that may change when a run is continued, without making it a different run
CONTINUABLE = {"images", "checkpoint_every", "checkpoint_at", "keep", "log_every", "report_to", "project"}
# settings added after 0.1, with the value every run before them had: a run's config.json or a study's job written
# before a setting existed reads as having that value, so it continues (and its job id stays) as it was
ADDED = {"decay_fraction": 0.2, "warmup_fraction": 0.0}


def warmup(cfg: TrainConfig, total_steps: int) -> int:
    """The run's warm-up in optimizer steps: warmup_fraction of the run when set, else warmup_steps."""
    return round(cfg.warmup_fraction * total_steps) if cfg.warmup_fraction > 0 else cfg.warmup_steps
