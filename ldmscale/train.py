"""The training loop: one UNet of the family, from a latent cache, on accelerate (1 CPU, N GPUs, many nodes).

Determinism is by construction: the global batch of optimizer step s (indices, noise, timesteps, caption
dropout) is drawn from a generator seeded by (seed, s) and each process takes its slice. So a resumed run
equals an uninterrupted one, and 2 processes train the same model as 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from ldmscale import checkpoint, flops, fsdp
from ldmscale.config import Config, NonNegative, Positive, Range, UserError, from_dict, to_dict
from ldmscale.config import Fraction
from ldmscale.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl


@dataclass(frozen=True)
class TrainConfig(Config):
    data: str = ""  # latent cache folder
    size: str = "c16"  # family size: c<width>, a paper label, or c<width>:h<heads>:g<groups>
    images: Positive = 200_000  # duration, in training images seen
    batch_size: Annotated[int, Range(1, 2**20)] = 64  # global batch (all processes, all accumulation steps)
    grad_accum: Annotated[int, Range(1, 2**16)] = 1
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 1e-3  # the paper: 1e-4 at batch 2048; tiny models take more
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegative = 100
    weight_decay: Annotated[float, Range(0.0, 10.0)] = 0.01
    betas: tuple[Annotated[float, Range(0.0, 0.99999)], Annotated[float, Range(0.0, 0.99999999)]] = (0.9, 0.999)
    grad_clip: Annotated[float, Range(0.0, 1e6)] = 1.0  # 0: no clipping
    ema_decay: Annotated[float, Range(0.0, 1.0)] = 0.999
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    cfg_dropout: Fraction = 0.1  # caption dropout for classifier-free guidance
    snr_gamma: Annotated[float, Range(0.0, 1e6)] = 0.0  # Min-SNR weighting (Hang et al. 2023); 0: plain MSE
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    checkpoint_every: NonNegative = 0  # images between checkpoints (0: 4 per run)
    keep: Annotated[int, Range(1, 10**6)] = 2  # checkpoints kept (besides those of checkpoint_at)
    checkpoint_at: tuple[Positive, ...] = ()  # optimizer steps that also get a checkpoint, never pruned (curves)
    log_every: Annotated[int, Range(1, 10**9)] = 20  # optimizer steps between log lines
    latent_sample: bool = True  # sample z from the cached posterior (else use its mean)
    text_mask: bool = False  # mask padded text tokens in cross-attention (SD does not)
    report_to: Literal["", "tensorboard", "wandb"] = ""  # an accelerate tracker
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (2B/5B sizes)
    activation_checkpointing: bool = True  # with fsdp: recompute block activations in the backward pass


# settings that may change when a run is continued, without making it a different run
CONTINUABLE = {"images", "checkpoint_every", "checkpoint_at", "keep", "log_every", "report_to"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped without saving."""


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The dataset indices of optimizer step `step`: a fresh seeded permutation per epoch, batches in order."""
    out, pos = [], step * batch
    while sum(len(o) for o in out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch - sum(len(o) for o in out), n - off)
        out.append(perm[off:off + take])
        pos += take
    return torch.cat(out)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            p = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        return 1.0
    return f


def resolve_run(cfg: TrainConfig, run: Path) -> dict:
    """The fully resolved config of a run; checks a continued run matches the one on disk."""
    from importlib.metadata import version

    from ldmscale.cache import read_manifest
    from ldmscale.family import parse_size, size_spec, unet_config

    size = parse_size(cfg.size)
    m = read_manifest(cfg.data)
    c, h, _ = m["latent_shape"]
    if h % 8:
        raise UserError(f"latent size {h} of cache {cfg.data} is not a multiple of 8 (the UNet downsamples 3 times)")
    if cfg.batch_size < 1 or cfg.images < 1 or cfg.grad_accum < 1:
        raise UserError("images, batch_size and grad_accum must be positive")
    cost = flops.cost(size, h, m["context_len"], m["context_dim"], c)
    resolved = {
        "kind": "text-to-image",
        "train": to_dict(cfg) | {"data": str(Path(cfg.data).resolve()), "size": size_spec(size)},
        "unet": unet_config(size, h, m["context_dim"], c),
        "data": {k: m[k] for k in ("source", "resolution", "channels", "latent_shape", "context_len", "context_dim",
                                   "autoencoder", "text_encoder")},
        "accounting": {"params": cost.params, "forward_flops": cost.flops, "gflops": cost.gflops,
                       "norm_cost": cost.norm_cost, "flop_convention": flops.FLOP_CONVENTION},
        "versions": {p: version(p) for p in ("ldmscale", "torch", "diffusers", "accelerate", "transformers")},
    }
    check_continuation(run, resolved)
    return resolved


def check_continuation(run: str | Path, resolved: dict) -> None:
    """A run folder that exists must have been made with the same settings (bar CONTINUABLE ones)."""
    path = Path(run) / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    before, now = old.get("train", {}), resolved["train"]
    if before.get("lr_schedule") == "cosine" and before.get("images") != now.get("images"):
        # the cosine schedule is planned for the run's length: another length would jump the lr mid-run
        raise UserError(f"{run} has a cosine lr schedule planned for {before.get('images'):,} images; it cannot be "
                        f"extended or shortened to {now.get('images'):,}: start a new run (or use lr_schedule=constant, "
                        "whose runs extend)")
    diff = [k for k, v in resolved["train"].items() if k not in CONTINUABLE and old.get("train", {}).get(k) != v]
    diff += [k for k in ("kind", "task", "init") if json.dumps(old.get(k), sort_keys=True) != json.dumps(resolved.get(k), sort_keys=True)]
    if diff:
        raise UserError(f"{run} is a run with other settings ({', '.join(diff)} differ); "
                        "use a new --out or the same settings to continue it")


@dataclass
class Task:
    """What the loop trains: the resolved run config, the data, and the initial weights of a fine-tune.

    data: len(data); data.batch(idx, latent_noise, seeds) -> (z, text, mask) or (z, text, mask, extra) where
    `extra` is concatenated to the noisy latent at the UNet input (super-resolution); data.empty_text/_mask."""

    resolved: dict
    data: object
    init: dict | None = None


def text_to_image_task(cfg: TrainConfig, run: Path) -> Task:
    from ldmscale.cache import LatentCache

    return Task(resolve_run(cfg, run), LatentCache(cfg.data, "train"))


def train(cfg: TrainConfig, run: str | Path, progress: bool = True, make_task=text_to_image_task) -> dict:
    """Train (or continue) the run at `run`, holding its lock; the main process checks --out first."""
    from ldmscale.io import DirLock, check_output, is_main_process

    run, main = Path(run), is_main_process()
    if main:
        check_output(run, "run")
    with DirLock(run, "run", enabled=main):
        return _train(cfg, run, progress, make_task)


def _train(cfg: TrainConfig, run: Path, progress: bool, make_task) -> dict:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from ldmscale.diffusion import noise_scheduler
    from ldmscale.progress import bar

    run = Path(run)
    # Without a GPU, accelerate only forms a process group when told it is on CPU (then gloo).
    on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      log_with=cfg.report_to or None, project_dir=str(run), cpu=on_cpu)
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {world * cfg.grad_accum}")
    task = make_task(cfg, run)
    resolved, data = task.resolved, task.data
    if acc.is_main_process:  # under the run's lock, so no other process is saving here
        checkpoint.clean_stale(run)
    fwd = resolved["accounting"]["forward_flops"]
    total_steps = math.ceil(cfg.images / cfg.batch_size)
    every = cfg.checkpoint_every or max(cfg.batch_size, cfg.images // 4)
    ckpt_steps = max(1, every // cfg.batch_size)

    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**resolved["unet"])
    if task.init is not None:
        unet.load_state_dict(task.init)
    start, state, last = 0, None, checkpoint.latest(run)
    if last is not None:
        unet.load_state_dict(checkpoint.load_weights(last, "raw"))
        state = checkpoint.load_optimizer(last)
        start = checkpoint.load_state(last)["step"]
        if acc.is_main_process:  # drop log lines written after that checkpoint by the run that died
            kept = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("step", 0) <= start]
            atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    if cfg.fsdp:
        if world < 2 or cfg.grad_accum != 1:
            raise UserError("fsdp needs a launch with 2 or more processes and grad_accum = 1")
        fsdp.shard(unet.to(acc.device), cfg.mixed_precision, cfg.activation_checkpointing)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=True)
    # fused AdamW runs on CPU and CUDA; FSDP's sharded DTensors take the foreach path instead
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=not cfg.fsdp, foreach=True if cfg.fsdp else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    if state is not None:
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [fsdp.like(t, p) for t, p in zip(ema_state["shadow_params"], unet.parameters())]
        ema.load_state_dict(ema_state)
        if cfg.fsdp:
            fsdp.load_optimizer_state(unet, opt, state["optimizer"])
        else:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    if not cfg.fsdp:
        unet, opt = acc.prepare(unet, opt)
    if acc.is_main_process:  # written once everything is built: a run that fails to start leaves no config behind
        atomic_write_json(run / "config.json", resolved)
    if cfg.report_to:
        acc.init_trackers("ldmscale", config={k: v for k, v in resolved["train"].items() if isinstance(v, (int, float, str))})
    noise_sched = noise_scheduler(cfg.prediction)
    alphas = noise_sched.alphas_cumprod
    empty, empty_mask = data.empty_text.float(), data.empty_mask
    micro = cfg.batch_size // (world * cfg.grad_accum)
    c, h, w = resolved["data"]["latent_shape"]

    def state_dict(step: int, loss: float) -> dict:
        images = step * cfg.batch_size
        return {"step": step, "images_seen": images, "epoch": images / len(data), "loss": loss,
                "gflops_per_sample": fwd / 1e9, "train_flops": flops.training_flops(images, fwd),
                "steps_x_gflops": flops.steps_x_gflops(step, fwd), "flop_convention": flops.FLOP_CONVENTION,
                "seed": cfg.seed, "rng_note": "per-step generators seeded by (seed, step); no global RNG is used"}

    def save(step: int, loss: float) -> None:
        # under fsdp every process takes part in gathering the full tensors; only the main one writes
        model = fsdp.model_state(unet) if cfg.fsdp else acc.unwrap_model(unet).state_dict()
        ema_state = ema.state_dict()
        ema_state["shadow_params"] = [fsdp.full_tensor(t).cpu() for t in ema_state["shadow_params"]]
        opt_state = fsdp.optimizer_state(unet, opt) if cfg.fsdp else opt.state_dict()
        if acc.is_main_process:
            ema_model = dict(model)
            names = [n for n, _ in acc.unwrap_model(unet).named_parameters()]
            ema_model.update(zip(names, ema_state["shadow_params"]))
            checkpoint.save(run, step, resolved, model, ema_model,
                            {"optimizer": opt_state, "scheduler": sched.state_dict(), "ema": ema_state},
                            state_dict(step, loss), cfg.keep, protect={f"step-{s:06d}" for s in cfg.checkpoint_at})
        acc.wait_for_everyone()

    pbar = bar(total=total_steps, initial=start, desc=f"train {resolved['train']['size']}", unit="step",
               enabled=progress and acc.is_main_process)
    t_log, img_log, loss_acc, loss_n = time.perf_counter(), 0, 0.0, 0
    unet.train()
    for step in range(start, total_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = batch_indices(step, cfg.batch_size, len(data), cfg.seed)
        seeds = torch.arange(cfg.batch_size) + (cfg.seed * 1_000_003 + step) * cfg.batch_size  # per-sample randomness
        noise = torch.randn(cfg.batch_size, c, h, w, generator=g)
        latent_eps = torch.randn(cfg.batch_size, c, h, w, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cfg_dropout
        for a in range(cfg.grad_accum):
            sel = torch.arange(cfg.batch_size).view(cfg.grad_accum, world, micro)[a, rank]
            out = data.batch(idx[sel], latent_noise=latent_eps[sel] if cfg.latent_sample else None, seeds=seeds[sel])
            z, text, mask = out[:3]
            extra = out[3] if len(out) > 3 else None
            text = torch.where(drop[sel, None, None], empty[None], text)
            mask = torch.where(drop[sel, None], empty_mask[None], mask)
            a_t = alphas[t[sel]].view(-1, 1, 1, 1)
            noisy = a_t.sqrt() * z + (1 - a_t).sqrt() * noise[sel]
            if extra is not None:
                noisy = torch.cat([noisy, extra], dim=1)
            target = noise[sel] if cfg.prediction == "epsilon" else a_t.sqrt() * noise[sel] - (1 - a_t).sqrt() * z
            with (contextlib.nullcontext() if cfg.fsdp else acc.accumulate(unet)), \
                    (contextlib.nullcontext() if cfg.fsdp else acc.autocast()):
                pred = unet(noisy.to(acc.device), t[sel].to(acc.device), encoder_hidden_states=text.to(acc.device),
                            encoder_attention_mask=mask.to(acc.device) if cfg.text_mask else None).sample
                per_sample = (pred.float() - target.to(acc.device)).pow(2).flatten(1).mean(1)
                if cfg.snr_gamma > 0:  # Min-SNR-gamma: down-weight the easy, low-noise timesteps
                    snr = (a_t / (1 - a_t)).flatten().to(acc.device)
                    weight = snr.clamp(max=cfg.snr_gamma) / (snr if cfg.prediction == "epsilon" else snr + 1)
                    per_sample = per_sample * weight
                loss = per_sample.mean()
                if cfg.fsdp:  # the sharded model reduces its own gradients; the mp policy does the casting
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                else:
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        acc.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            mean_loss = acc.reduce(loss.detach(), "mean").item()
            if not math.isfinite(mean_loss):
                good = checkpoint.latest(run)
                raise TrainingDiverged(
                    f"loss is {mean_loss} at step {step + 1} (images seen {step * cfg.batch_size}); stopped without "
                    f"saving; last good checkpoint: {good.name if good else 'none'}; try a lower lr")
            loss_acc, loss_n = loss_acc + mean_loss, loss_n + 1
            step_loss = mean_loss
        sched.step()
        ema.step(acc.unwrap_model(unet).parameters())
        img_log += cfg.batch_size
        pbar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            dt = time.perf_counter() - t_log
            rec = state_dict(done, loss_acc / loss_n) | {"lr": sched.get_last_lr()[0], "images_per_s": img_log / dt,
                                                          "time": time.time()}
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            if acc.is_main_process:
                append_jsonl(run / "metrics.jsonl", rec)
            if cfg.report_to:
                acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=done)
            t_log, img_log, loss_acc, loss_n = time.perf_counter(), 0, 0.0, 0
        if done % ckpt_steps == 0 or done == total_steps or done in cfg.checkpoint_at:
            save(done, step_loss)
    pbar.close()
    acc.end_training()
    return state_dict(max(start, total_steps), float("nan")) | {"run": str(run), "is_main": acc.is_main_process}


def load_train_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON file: the config itself or a run's config.json (its "train" section)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return from_dict(TrainConfig, data.get("train", data), where=path.name)
