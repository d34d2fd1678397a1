"""What the training loop minimizes: an objective turns a batch into a per-sample loss.

The loop (train/loop.py) owns everything else: data order, caption dropout, accelerate, the EMA, the optimizer,
checkpoints and the ledger. An objective declares
  draw(g, n, shape)          its per-sample randomness for the global batch, from the step's generator
                             (each process takes its slice, so 1 and N processes train the same model)
  loss(model, batch, rand)   the per-sample loss of the model being trained
  setup(model, ema, device)  networks it needs beside the model (a teacher, a target), on the device
  before_step(step, model)   a hook at each optimizer step (progressive distillation changes teacher)
  evals(step), evals_until(step)   network evaluations per training image at a step (3 = forward +
                             backward), and their sum over the steps before it: the compute ledger counts them
  state_dict / load_state_dict   what a checkpoint must hold to resume it exactly
Denoising (this file) covers text-to-image pretraining, super-resolution and DreamBooth; distill.py has the
consistency and progressive distillation objectives.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ldmscale.data.batch import Batch
from ldmscale.diffusion.schedulers import noise_scheduler
from ldmscale.errors import UserError
from ldmscale.train.config import TrainConfig


@runtime_checkable
class Objective(Protocol):
    """The interface above as a type: the loop calls nothing else of an objective."""

    def draw(self, g: torch.Generator, n: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]: ...
    def loss(self, model: torch.nn.Module, batch: Batch, rand: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def setup(self, model: torch.nn.Module, ema, device: torch.device) -> None: ...
    def before_step(self, step: int, model: torch.nn.Module) -> None: ...
    def evals(self, step: int) -> float: ...
    def evals_until(self, step: int) -> float: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class TrainData(Protocol):
    """What the loop reads a task's images from (a LatentCache, a super-resolution or DreamBooth set): its length,
    batch(idx, latent_noise, seeds) -> a Batch (z, text, mask, and extra where the task has a condition), and the
    empty caption's states."""

    empty_text: torch.Tensor
    empty_mask: torch.Tensor

    def __len__(self) -> int: ...
    def batch(self, idx: torch.Tensor, latent_noise: torch.Tensor | None = None, seeds=None) -> Batch: ...


class Pretraining:
    """What the pretraining objectives share: one forward and backward pass per image, no state of their own,
    nothing to do between steps."""

    def setup(self, model, ema, device) -> None:
        pass

    def before_step(self, step: int, model) -> None:
        pass

    def evals(self, step: int) -> float:
        return 3.0

    def evals_until(self, step: int) -> float:
        return 3.0 * step

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Denoising(Pretraining):
    """The DDPM objective on SD v1.5's schedule: predict the noise (or v) of a noised latent; optional Min-SNR-gamma
    weighting (Hang et al. 2023) and attention masks over the text."""

    def __init__(self, prediction: str = "epsilon", snr_gamma: float = 0.0, text_mask: bool = False):
        self.prediction, self.snr_gamma, self.text_mask = prediction, snr_gamma, text_mask
        self.sched = noise_scheduler(prediction)

    def setup(self, model, ema, device) -> None:
        self.alphas = self.sched.alphas_cumprod.to(device)

    def draw(self, g: torch.Generator, n: int, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {
            "noise": torch.randn(n, *shape, generator=g),
            "t": torch.randint(0, self.sched.config.num_train_timesteps, (n,), generator=g),
        }

    def loss(self, model, b: Batch, rand: dict[str, torch.Tensor]) -> torch.Tensor:
        noise, t = rand["noise"], rand["t"]
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * b.z + (1 - a).sqrt() * noise
        if b.extra is not None:
            noisy = torch.cat([noisy, b.extra], dim=1)
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * b.z
        pred = model(
            noisy, t, encoder_hidden_states=b.text, encoder_attention_mask=b.mask if self.text_mask else None
        ).sample
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        if self.snr_gamma > 0:  # down-weight the easy, low-noise timesteps
            snr = (a / (1 - a)).flatten()
            per_sample = per_sample * snr.clamp(max=self.snr_gamma) / (snr if self.prediction == "epsilon" else snr + 1)
        return per_sample


class RectifiedFlow(Pretraining):
    """SD3's rectified flow (Esser et al. 2024): x_t = (1 - t) x0 + t noise on a straight path, the network predicts
    the velocity noise - x0 at timestep 1000 t, and t is drawn logit-normal(0, 1), which weights the middle of the
    path. The flow samplers (FlowMatchEuler/Heun, sigma = t) integrate the same velocity from t = 1 to 0."""

    def __init__(self, text_mask: bool = False, mean: float = 0.0, std: float = 1.0):
        self.text_mask, self.mean, self.std = text_mask, mean, std

    def draw(self, g: torch.Generator, n: int, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {"noise": torch.randn(n, *shape, generator=g), "u": torch.randn(n, generator=g)}

    def loss(self, model, b: Batch, rand: dict[str, torch.Tensor]) -> torch.Tensor:
        noise = rand["noise"]
        t = torch.sigmoid(self.mean + self.std * rand["u"]).view(-1, 1, 1, 1)
        noisy = (1 - t) * b.z + t * noise
        if b.extra is not None:
            noisy = torch.cat([noisy, b.extra], dim=1)
        pred = model(
            noisy,
            1000 * t.flatten(),
            encoder_hidden_states=b.text,
            encoder_attention_mask=b.mask if self.text_mask else None,
        ).sample
        return (pred.float() - (noise - b.z)).pow(2).flatten(1).mean(1)


def check_same_objective(init_prediction: str, cfg: TrainConfig) -> None:
    """A fine-tune keeps its initial model's objective family: a flow model read as a noise predictor (or back)
    would train and sample silently wrong."""
    if (init_prediction == "flow") != (cfg.prediction == "flow"):
        raise UserError(
            f"the initial run was trained with prediction={init_prediction}; fine-tune it with "
            f"--train-set prediction={init_prediction}, not {cfg.prediction}"
        )


def objective_for(cfg: TrainConfig):
    """The pretraining objective: DDPM noise (or v) prediction on SD's schedule, or SD3's rectified flow."""
    if cfg.prediction == "flow":
        if cfg.snr_gamma > 0:
            raise UserError(
                "snr_gamma (Min-SNR) weights the DDPM objective; the flow objective samples its timesteps "
                "logit-normally instead: set snr_gamma=0"
            )
        return RectifiedFlow(cfg.text_mask)
    return Denoising(cfg.prediction, cfg.snr_gamma, cfg.text_mask)


class ValidationLoss:
    """The objective's loss on a fixed set of (latent, noise, timestep) triples from the validation split: the first
    `n` validation latents (posterior means), captions as given, noise and timesteps from one fixed generator. The
    same triples for every run of a cache and objective, so the number compares across sizes and backbones (not
    across objectives: eps, v and flow losses are different quantities). Measured on the EMA weights, as sampled."""

    SEED = 20240101

    def __init__(self, data, objective, n: int = 256, batch: int = 64):
        self.objective, self.batch_size = objective, batch
        idx = torch.arange(min(n, len(data)))
        b = data.batch(idx)
        self.z, self.text, self.mask = b.z, b.text, b.mask
        self.empty = data.empty_text.float()
        self.rand = objective.draw(torch.Generator().manual_seed(self.SEED), len(idx), tuple(self.z.shape[1:]))

    @torch.no_grad()
    def __call__(self, model, ema) -> tuple[float, float]:
        """(mean loss, its standard error over the triples)."""
        dev = next(model.parameters()).device
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        was_training = model.training
        model.eval()
        try:
            losses = []
            for i in range(0, len(self.z), self.batch_size):
                sl = slice(i, i + self.batch_size)
                b = Batch(
                    self.z[sl].float().to(dev),
                    self.text[sl].float().to(dev),
                    self.mask[sl].to(dev),
                    None,
                    self.empty.to(dev),
                )
                losses.append(self.objective.loss(model, b, {k: v[sl].to(dev) for k, v in self.rand.items()}).double())
            per = torch.cat(losses).cpu()
            return float(per.mean()), float(per.std() / len(per) ** 0.5) if len(per) > 1 else 0.0
        finally:
            ema.restore(model.parameters())
            model.train(was_training)
