"""The training loop: one UNet of the family, from a latent cache, on accelerate (1 CPU, N GPUs, many nodes).

Determinism is by construction: the global batch of optimizer step s (indices, noise, timesteps, caption
dropout) is drawn from a generator seeded by (seed, s) and each process takes its slice. So a resumed run
equals an uninterrupted one, and 2 processes train the same model as 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldmscale import checkpoint, integrity
from ldmscale.device import accelerator_kwargs
from ldmscale.errors import TrainingDiverged, UserError
from ldmscale.io import (
    DirLock,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    check_output,
    is_main_process,
    read_jsonl,
)
from ldmscale.model import flops, fsdp
from ldmscale.model.family import build_network
from ldmscale.progress import bar
from ldmscale.train import trackers
from ldmscale.train.config import CONTINUABLE, TrainConfig, warmup  # noqa: F401  (re-exported)
from ldmscale.train.objectives import Objective, TrainData, ValidationLoss, objective_for  # noqa: F401
from ldmscale.train.run import Task, text_to_image_task

if TYPE_CHECKING:  # heavy imports, for the annotations only
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The dataset indices of optimizer step `step`: a fresh seeded permutation per epoch, batches in order."""
    out, pos = [], step * batch
    while sum(len(o) for o in out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch - sum(len(o) for o in out), n - off)
        out.append(perm[off : off + take])
        pos += take
    return torch.cat(out)


def train(cfg: TrainConfig, run: str | Path, progress: bool = True, make_task=text_to_image_task) -> dict:
    """Train (or continue) the run at `run`, holding its lock; the main process checks --out first."""

    run, main = Path(run), is_main_process()
    trackers.check(cfg.report_to)
    if main:
        check_output(run, "run")
    with DirLock(run, "run", enabled=main):
        return loop(cfg, run, progress, make_task)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class State:
    """Everything the loop carries between stages."""

    acc: Accelerator
    task: Task
    model: torch.nn.Module
    ema: EMAModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    ckpt_steps: int
    start: int = 0
    resume_from: Path | None = None  # the newest intact checkpoint, found in setup()
    net: torch.nn.Module | None = None  # the model without its wrappers, taken once: accelerate's unwrap_model walks
    # every module each call (6 ms of a c8 step's 190 on one CPU thread, twice a step)


def loop(cfg: TrainConfig, run: Path, progress: bool, make_task) -> dict:
    """setup -> resume -> (step, log, save) until the budget -> the ledger at the end."""

    s = setup(cfg, run, make_task)
    resume(cfg, run, s)
    warnings = dead_settings(cfg, s.total_steps)
    if s.acc.is_main_process:  # written once everything is built: a run that fails to start leaves no config behind
        for w in warnings:
            integrity.note(f"warning: {w}")
        machine = {
            "device": str(s.acc.device),
            "processes": s.acc.num_processes,
            "distributed": str(s.acc.distributed_type),
            "mixed_precision": cfg.mixed_precision,
        }
        atomic_write_json(run / "config.json", s.task.resolved | {"machine": machine, "warnings": warnings})
    trackers.start(cfg, run, s)
    window = {"t": time.perf_counter(), "images": 0, "loss": 0.0, "n": 0}
    s.model.train()
    with bar(
        total=s.total_steps,
        initial=s.start,
        desc=f"train {s.task.resolved['train']['size']}",
        unit="step",
        enabled=progress and s.acc.is_main_process,
    ) as pbar:  # closed before a stopped run's one line
        for step in range(s.start, s.total_steps):
            loss = train_step(cfg, run, s, step)
            window["images"] += cfg.batch_size
            window["loss"], window["n"] = window["loss"] + loss, window["n"] + 1
            pbar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == s.total_steps:
                log(cfg, run, s, done, window, pbar)
            if done % s.ckpt_steps == 0 or done == s.total_steps or done in cfg.checkpoint_at:
                save(cfg, run, s, done, loss)
    s.acc.end_training()
    return ledger(cfg, s, max(s.start, s.total_steps), float("nan")) | {
        "run": str(run),
        "is_main": s.acc.is_main_process,
    }


def dead_settings(cfg: TrainConfig, total_steps: int) -> list[str]:
    """Settings that silently do nothing in a run this long: said at the start and kept in config.json."""
    out = []
    w = warmup(cfg, total_steps)
    if w >= total_steps:
        out.append(
            f"warmup_steps={w} is not shorter than the run ({total_steps} optimizer steps of "
            f"{cfg.batch_size} images): the learning rate never reaches lr={cfg.lr:g} (ends at "
            f"{total_steps / max(1, w):.0%} of it); lower warmup_steps or train longer"
        )
    late = [x for x in cfg.checkpoint_at if x > total_steps]
    if late:
        out.append(
            f"checkpoint_at steps {', '.join(map(str, late))} are after the run's last step ({total_steps}): "
            "no checkpoint is written there"
        )
    return out


def setup(cfg: TrainConfig, run: Path, make_task) -> State:
    """Accelerate, the task, the model (from its initial weights), the EMA, the optimizer and the lr schedule."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.report_to or None,
        project_dir=str(run),
        **accelerator_kwargs(),
    )
    world = acc.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {world * cfg.grad_accum}"
        )
    if cfg.fsdp and (world < 2 or cfg.grad_accum != 1):
        raise UserError("fsdp needs a launch with 2 or more processes and grad_accum = 1")
    task = make_task(cfg, run)
    if acc.is_main_process:  # under the run's lock, so no other process is saving here
        checkpoint.clean_stale(run)
    torch.manual_seed(cfg.seed)
    if cfg.fsdp and "unet" not in task.resolved:
        raise UserError("fsdp shards the UNet's blocks; transformer backbones train with DDP in this version")
    model = build_network(task.resolved)
    if task.init is not None:
        model.load_state_dict(task.init)
    last = checkpoint.newest_intact(run, announce=acc.is_main_process)  # a damaged newer one is named and skipped
    if last is not None:  # before sharding, so every process loads the full tensors
        model.load_state_dict(checkpoint.load_weights(last, "raw"))
    model.to(acc.device)
    if cfg.fsdp:
        fsdp.shard(model, cfg.mixed_precision, cfg.activation_checkpointing)
    # foreach updates of sharded DTensors off CUDA spend ~35 s in the first step propagating shardings (a 2-process
    # c8 FSDP run on 2 CPU cores: 64 s with foreach, 32 s without); on GPUs foreach is the fast path
    foreach = not cfg.fsdp or acc.device.type == "cuda"
    ema = EMAModel(
        model.parameters(), decay=cfg.ema_decay, foreach=foreach, min_decay=0.0 if cfg.ema_warmup else cfg.ema_decay
    )  # no warm-up: a constant decay
    # fused AdamW on CPU and CUDA (1.07-1.10x at c16-c64 on 2 CPU cores, make bench); FSDP's sharded DTensors and
    # other devices take the foreach path
    fused = acc.device.type in ("cpu", "cuda") and not cfg.fsdp
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=fused,
        foreach=None if fused else foreach,
    )
    total = math.ceil(cfg.images / cfg.batch_size)
    rounds = getattr(task.objective, "rounds", 1)  # progressive distillation restarts the cosine every round
    sched = lr_schedule(cfg, opt, total, rounds)
    if not cfg.fsdp:
        model, opt = acc.prepare(model, opt)
    net = acc.unwrap_model(model)
    task.objective.setup(net, ema, acc.device)
    every = cfg.checkpoint_every or max(cfg.batch_size, cfg.images // 4)
    return State(acc, task, model, ema, opt, sched, total, max(1, every // cfg.batch_size), resume_from=last, net=net)


def lr_schedule(cfg: TrainConfig, opt, total: int, rounds: int = 1):
    """diffusers' constant (with warm-up) and cosine schedules; transformers' warmup-stable-decay, whose stable part
    is the constant schedule's, so a cooldown branch resumed from a constant run's checkpoint is that WSD run."""
    if cfg.lr_schedule == "wsd":
        from transformers.optimization import get_wsd_schedule

        return get_wsd_schedule(
            opt, warmup(cfg, total), max(1, round(cfg.decay_fraction * total)), total, decay_type="linear"
        )
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine" if rounds == 1 else "cosine_with_restarts"}
    return get_scheduler(
        name[cfg.lr_schedule],
        opt,
        num_warmup_steps=warmup(cfg, total),
        num_training_steps=total,
        **({"num_cycles": rounds} if rounds > 1 and cfg.lr_schedule == "cosine" else {}),
    )


def resume(cfg: TrainConfig, run: Path, s: State) -> None:
    """Continue from the last checkpoint (its weights are in the model already): EMA, optimizer, schedule, the
    objective's own state. The metrics logs keep only the lines up to that checkpoint (none without one), and
    damaged checkpoints newer than it are set aside, so the ledger never counts a step twice."""
    last = s.resume_from
    if last is not None:
        _load_resume_state(cfg, s, last)
    s.acc.wait_for_everyone()  # every process has read what it needs before anything moves
    if s.acc.is_main_process:
        if last is not None:
            integrity.note(f"continuing {run} from {last.name} (step {s.start} of {s.total_steps})")
        checkpoint.set_aside_after(run, s.start)
        for log_file in ("metrics.jsonl", "validation.jsonl"):
            if (run / log_file).exists():
                kept = [r for r in read_jsonl(run / log_file) if r.get("step", 0) <= s.start]
                atomic_write_text(run / log_file, "".join(json.dumps(r) + "\n" for r in kept))


def _load_resume_state(cfg: TrainConfig, s: State, last: Path) -> None:
    model = s.net  # its weights were loaded in setup()
    state = checkpoint.load_optimizer(last)
    ema_state = dict(state["ema"])
    ema_state["shadow_params"] = [
        fsdp.like(t, p).to(p.device) for t, p in zip(ema_state["shadow_params"], model.parameters())
    ]
    s.ema.load_state_dict(ema_state)
    if cfg.fsdp:
        fsdp.load_optimizer_state(model, s.opt, state["optimizer"])
    else:
        s.opt.load_state_dict(state["optimizer"])
    s.sched.load_state_dict(state["scheduler"])
    s.task.objective.load_state_dict(state.get("objective", {}))
    s.start = checkpoint.load_state(last)["step"]


def train_step(cfg: TrainConfig, run: Path, s: State, step: int) -> float:
    """One optimizer step. The global batch's randomness comes from a generator seeded by (seed, step) and each
    process takes its slice, so a resumed run equals an uninterrupted one and N processes train as 1."""
    acc, data, obj = s.acc, s.task.data, s.task.objective
    world, rank, B = acc.num_processes, acc.process_index, cfg.batch_size
    micro = B // (world * cfg.grad_accum)
    shape = tuple(s.task.resolved["data"]["latent_shape"])
    obj.before_step(step, s.net)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = batch_indices(step, B, len(data), cfg.seed)
    seeds = torch.arange(B) + (cfg.seed * 1_000_003 + step) * B  # per-sample randomness of the data (degradations)
    rand = obj.draw(g, B, shape)
    latent_eps = torch.randn(B, *shape, generator=g)
    drop = torch.rand(B, generator=g) < cfg.cfg_dropout
    empty, empty_mask = data.empty_text.float(), data.empty_mask
    dev = acc.device
    for a in range(cfg.grad_accum):
        sel = torch.arange(B).view(cfg.grad_accum, world, micro)[a, rank]
        b = data.batch(idx[sel], latent_noise=latent_eps[sel] if cfg.latent_sample else None, seeds=seeds[sel])
        text = torch.where(drop[sel, None, None], empty[None], b.text)
        mask = torch.where(drop[sel, None], empty_mask[None], b.mask)
        b = replace(b, text=text, mask=mask, empty=empty).to(dev)
        with (
            contextlib.nullcontext() if cfg.fsdp else acc.accumulate(s.model),
            contextlib.nullcontext() if cfg.fsdp else acc.autocast(),
        ):
            loss = obj.loss(s.model, b, {k: v[sel].to(dev) for k, v in rand.items()}).mean()
            if cfg.fsdp:  # the sharded model reduces its own gradients; the mp policy does the casting
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
            else:
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
            s.opt.step()
            s.opt.zero_grad(set_to_none=True)
        mean_loss = acc.reduce(loss.detach(), "mean").item()
        if not math.isfinite(mean_loss):
            good = checkpoint.latest(run)
            raise TrainingDiverged(
                f"loss is {mean_loss} at step {step + 1} (images seen {step * B}); stopped without saving; last "
                f"good checkpoint: {good.name if good else 'none'}; try a lower lr"
            )
    s.sched.step()
    s.ema.step(s.net.parameters())
    return mean_loss


def ledger(cfg: TrainConfig, s: State, step: int, loss: float) -> dict:
    """The compute ledger at an optimizer step: images seen, FLOPs (network evaluations x forward FLOPs), the
    paper's steps x GFLOPs."""
    fwd = s.task.resolved["accounting"]["forward_flops"]
    images = step * cfg.batch_size
    evals = s.task.objective.evals_until(step)
    return {
        "step": step,
        "images_seen": images,
        "epoch": images / len(s.task.data),
        "loss": loss,
        "gflops_per_sample": fwd / 1e9,
        "train_flops": evals * cfg.batch_size * fwd,
        "network_evals_per_image": s.task.objective.evals(max(0, step - 1)),
        "steps_x_gflops": flops.steps_x_gflops(step, fwd),
        "flop_convention": flops.FLOP_CONVENTION,
        "seed": cfg.seed,
        "rng_note": "per-step generators seeded by (seed, step); no global RNG is used",
    }


def log(cfg: TrainConfig, run: Path, s: State, done: int, window: dict, pbar) -> None:
    dt = time.perf_counter() - window["t"]
    rec = ledger(cfg, s, done, window["loss"] / window["n"]) | {
        "lr": s.sched.get_last_lr()[0],
        "images_per_s": window["images"] / dt,
        "time": time.time(),
    }
    pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
    if s.acc.is_main_process:
        append_jsonl(run / "metrics.jsonl", rec)
    if cfg.report_to:
        s.acc.log({k: rec[k] for k in ("loss", "lr", "images_per_s", "images_seen", "train_flops", "epoch")}, step=done)
    window.update(t=time.perf_counter(), images=0, loss=0.0, n=0)


def save(cfg: TrainConfig, run: Path, s: State, step: int, loss: float) -> None:
    """A checkpoint: raw and EMA weights, optimizer, schedule, EMA and objective state, the ledger. Under fsdp every
    process takes part in gathering the full tensors; only the main one writes."""
    acc, unwrapped = s.acc, s.net
    model = fsdp.model_state(unwrapped) if cfg.fsdp else unwrapped.state_dict()
    ema_state = s.ema.state_dict()
    ema_state["shadow_params"] = [fsdp.full_tensor(t).cpu() for t in ema_state["shadow_params"]]
    opt_state = fsdp.optimizer_state(unwrapped, s.opt) if cfg.fsdp else s.opt.state_dict()
    val = {}
    if acc.is_main_process and s.task.validation is not None and not cfg.fsdp:
        mean, se = s.task.validation(unwrapped, s.ema)
        val = {"val_loss": mean, "val_loss_std": se}
        append_jsonl(
            run / "validation.jsonl",
            {"step": step, **val, "train_flops": ledger(cfg, s, step, loss)["train_flops"], "time": time.time()},
        )
    if acc.is_main_process:
        ema_model = dict(model)
        ema_model.update(zip([n for n, _ in unwrapped.named_parameters()], ema_state["shadow_params"]))
        extra = {
            "optimizer": opt_state,
            "scheduler": s.sched.state_dict(),
            "ema": ema_state,
            "objective": s.task.objective.state_dict(),
        }
        checkpoint.save(
            run,
            step,
            s.task.resolved,
            model,
            ema_model,
            extra,
            ledger(cfg, s, step, loss) | val,
            cfg.keep,
            protect={f"step-{x:06d}" for x in cfg.checkpoint_at},
        )
        if cfg.report_to and s.task.preview:
            trackers.log_preview(cfg, s, step, ema_model)
    acc.wait_for_everyone()
