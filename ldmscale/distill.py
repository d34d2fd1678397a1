"""Diffusion distillation of a text-to-image run into a few-step sampler, in its own short loop.

consistency  latent consistency distillation (Luo et al. 2023), the public cousin of the paper's conditional
             consistency distillation (CoDi, Mei et al. 2024): the student starts as the teacher plus a zero-
             initialised guidance embedding (w drawn per sample); an EMA target network; a skipping-step DDIM
             solver on the teacher's classifier-free-guided prediction; LCM's boundary scalings
             f(x, t) = c_skip(t) x + c_out(t) x0(x, t), which make f the identity at t = 0; a pseudo-Huber loss
             in noise units (consistency_distance). Sampled with `lcm` on the solver's grid.
progressive  guided distillation (Meng et al. 2023; Salimans & Ho 2022): the w-conditioned student learns to
             match two DDIM steps of its teacher (the guided original in round 1, the previous student after)
             in one, halving the step count each round. Sampled with `ddim` at the final step count.

Same ledger, resume, atomic checkpoints and NaN guard as `train`: the ledger counts every network
evaluation (student forward+backward = 3, teacher with guidance = 2, target = 1 forward per image).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from ldmscale import checkpoint, flops
from ldmscale.config import Config, NonNegative, Positive, Range, UserError, to_dict
from ldmscale.io import append_jsonl, atomic_write_json

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary-condition constants (also diffusers' LCMScheduler)


@dataclass(frozen=True)
class DistillConfig(Config):
    teacher: str = ""  # text-to-image run directory
    checkpoint: str = "latest"
    method: Literal["consistency", "progressive"] = "consistency"
    images: Positive = 20_000  # per run (consistency) or per round (progressive)
    batch_size: Annotated[int, Range(1, 2**20)] = 64
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 2e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to 0 over the run (each round)
    w_min: Annotated[float, Range(1.0, 100.0)] = 1.0  # guidance scale range drawn per sample (the teacher's CFG)
    w_max: Annotated[float, Range(1.0, 100.0)] = 4.0
    ema_decay: Annotated[float, Range(0.0, 1.0)] = 0.95  # target network (consistency)
    loss: Literal["huber", "l2"] = "huber"  # consistency: pseudo-Huber (LCM's option) or MSE
    huber_c: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 0.001
    loss_space: Literal["eps", "x0"] = "eps"  # compare f's outputs in noise units (x0 error x sqrt(SNR)), see below
    solver_steps: Annotated[int, Range(1, 1000)] = 10  # grid of the skipping-step DDIM solver (LCM uses 50; 10 learns faster on a small
    # budget: 1-step FD 139.6 vs 153.4 at c16); `lcm` sampling then steps on this grid
    start_steps: Annotated[int, Range(2, 1000)] = 8  # teacher steps of the first round (progressive); 1000 / start_steps must be an integer
    final_steps: Annotated[int, Range(1, 500)] = 2  # progressive: halve until this many steps
    spacing: Literal["trailing", "leading"] = "trailing"  # progressive grid: trailing starts every sample at t=999;
    # SD's leading spacing starts a 2-step one at t=501 from pure noise (measured: round 2 worse than the teacher)
    cond_dim: Annotated[int, Range(2, 4096)] = 256  # width of the guidance embedding
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    keep: Annotated[int, Range(1, 10**6)] = 2
    log_every: Annotated[int, Range(1, 10**9)] = 20
    checkpoint_every: NonNegative = 0  # images (0: 4 per run / round)


def scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip, c_out: c_skip(0) = 1 and c_out(0) = 0, so the consistency function is the identity at t = 0."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency_fn(unet, x, t, ctx, w_emb, alphas) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t): the student's (or target's) consistency function."""
    a = alphas[t].view(-1, 1, 1, 1)
    eps = unet(x, t, encoder_hidden_states=ctx, timestep_cond=w_emb).sample
    c_skip, c_out = scalings(t)
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0_from_eps(x, eps, a)


def student_config(teacher_unet: dict, cond_dim: int) -> dict:
    return dict(teacher_unet, time_cond_proj_dim=cond_dim)


def student_init(teacher_weights: dict, cfg_unet: dict) -> dict:
    """Teacher weights plus a zero guidance projection: the student starts exactly as the teacher."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel(**cfg_unet).state_dict().items()}
    state = dict(teacher_weights)
    for k, shape in shapes.items():
        if k not in state:
            state[k] = torch.zeros(shape)
    return state


def distill(cfg: DistillConfig, out: str | Path, progress: bool = True) -> dict:
    from ldmscale.io import DirLock, check_output

    check_output(out, "run")
    with DirLock(out, "run"):
        return _distill(cfg, Path(out), progress)


def _distill(cfg: DistillConfig, out: Path, progress: bool) -> dict:
    from diffusers import UNet2DConditionModel

    from ldmscale.cache import LatentCache
    from ldmscale.diffusion import guidance_embedding, noise_scheduler
    from ldmscale.progress import bar
    from ldmscale.train import TrainingDiverged, batch_indices, check_continuation

    out = Path(out)
    if not cfg.teacher:
        raise UserError("--teacher RUN_DIR is required")
    teacher_ckpt = checkpoint.resolve(Path(cfg.teacher), cfg.checkpoint)
    tconf = checkpoint.read_run_config(cfg.teacher)
    if tconf.get("kind") != "text-to-image" or tconf.get("distilled"):
        raise UserError(f"teacher {cfg.teacher} is a {'distilled ' if tconf.get('distilled') else ''}"
                        f"{tconf.get('kind')} run; distillation needs an undistilled text-to-image run")
    if cfg.method == "progressive" and (1000 % cfg.start_steps or cfg.start_steps <= cfg.final_steps
                                        or cfg.start_steps % cfg.final_steps):
        raise UserError(f"progressive distillation needs start_steps dividing 1000 and halving down to final_steps "
                        f"(got {cfg.start_steps} -> {cfg.final_steps})")
    if not (1 <= cfg.solver_steps <= 1000 and 1.0 <= cfg.w_min <= cfg.w_max and cfg.huber_c > 0 and cfg.lr > 0):
        raise UserError(f"need 1 <= solver_steps <= 1000, 1 <= w_min <= w_max, huber_c > 0 and lr > 0 (got "
                        f"{cfg.solver_steps}, {cfg.w_min}, {cfg.w_max}, {cfg.huber_c}, {cfg.lr})")
    cache = LatentCache(tconf["train"]["data"], "train")
    rounds = [cfg.start_steps // 2**r for r in range(1, 64) if cfg.start_steps // 2**r >= cfg.final_steps] \
        if cfg.method == "progressive" else [1]
    per_round = math.ceil(cfg.images / cfg.batch_size)
    total_steps = per_round * len(rounds)
    fwd = tconf["accounting"]["forward_flops"]

    def evals(step: int) -> int:
        """Network evaluations per image at an optimizer step: student fwd+bwd 3, teacher (guided 2x) per solver step."""
        if cfg.method == "consistency":
            return 3 + 2 + 1  # + guided teacher + target
        return 3 + 2 * (2 if step < per_round else 1)  # two teacher DDIM steps, guided in round 1
    resolved = dict(tconf, distilled=True, kind="text-to-image", unet=student_config(tconf["unet"], cfg.cond_dim))
    resolved["task"] = {"distill": to_dict(cfg) | {"teacher": str(Path(cfg.teacher).resolve())}}
    resolved["init"] = {"run": str(Path(cfg.teacher).resolve()), "checkpoint": teacher_ckpt.name}
    resolved["train"] = dict(tconf["train"], images=cfg.images * len(rounds), batch_size=cfg.batch_size, lr=cfg.lr)
    resolved["sampling"] = ({"sampler": "lcm", "steps": [1, 2, 4, 8]} if cfg.method == "consistency"
                            else {"sampler": "ddim", "steps": [rounds[-1]]})
    check_continuation(out, resolved)
    atomic_write_json(out / "config.json", resolved)

    torch.manual_seed(cfg.seed)
    teacher = UNet2DConditionModel(**tconf["unet"]).eval().requires_grad_(False)
    teacher.load_state_dict(checkpoint.load_weights(teacher_ckpt, "ema"))
    student = UNet2DConditionModel(**resolved["unet"])
    student.load_state_dict(student_init(checkpoint.load_weights(teacher_ckpt, "ema"), resolved["unet"]))
    target = UNet2DConditionModel(**resolved["unet"]).eval().requires_grad_(False)
    target.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    last = checkpoint.latest(out)
    if last is not None:
        student.load_state_dict(checkpoint.load_weights(last, "raw"))
        state = checkpoint.load_optimizer(last)
        opt.load_state_dict(state["optimizer"])
        target.load_state_dict(state["target"])
        start = checkpoint.load_state(last)["step"]
    if cfg.method == "progressive" and start >= per_round:  # the teacher of round r is the student after round r-1
        teacher = UNet2DConditionModel(**resolved["unet"]).eval().requires_grad_(False)
        teacher.load_state_dict(student.state_dict() if start % per_round == 0
                                else checkpoint.load_optimizer(last)["round_teacher"])
    alphas = noise_scheduler().alphas_cumprod
    empty = cache.empty_text.float()
    c, h, w = resolved["data"]["latent_shape"]
    every = max(1, (cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else per_round // 4)

    def ledger(step: int, loss: float) -> dict:
        images = step * cfg.batch_size
        done_evals = sum(evals(s) for s in range(step))
        return {"step": step, "images_seen": images, "loss": loss, "gflops_per_sample": fwd / 1e9,
                "train_flops": done_evals * cfg.batch_size * fwd, "steps_x_gflops": flops.steps_x_gflops(step, fwd),
                "network_evals_per_image": evals(max(0, step - 1)), "flop_convention": flops.FLOP_CONVENTION,
                "round_steps": rounds[min(len(rounds) - 1, max(0, step - 1) // per_round)]}

    def save(step: int, loss: float, round_teacher: dict | None) -> None:
        st = ledger(step, loss)
        extra = {"optimizer": opt.state_dict(), "target": target.state_dict()}
        if round_teacher is not None:
            extra["round_teacher"] = round_teacher
        weights = student.state_dict() if cfg.method == "progressive" else target.state_dict()
        checkpoint.save(out, step, resolved, student.state_dict(), weights, extra, st, cfg.keep)

    pbar = bar(total=total_steps, initial=start, desc=f"distill {cfg.method}", unit="step", enabled=progress)
    t_log, loss_sum, n_log = time.perf_counter(), 0.0, 0
    for step in range(start, total_steps):
        r = step // per_round
        if cfg.method == "progressive" and step % per_round == 0 and r > 0 and step > start:
            teacher = UNet2DConditionModel(**resolved["unet"]).eval().requires_grad_(False)
            teacher.load_state_dict(student.state_dict())  # the finished round's student teaches the next
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = batch_indices(step, cfg.batch_size, len(cache), cfg.seed)
        eps0 = torch.randn(cfg.batch_size, c, h, w, generator=g)
        z, text, _ = cache.batch(idx, latent_noise=torch.randn(cfg.batch_size, c, h, w, generator=g))
        wscale = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(cfg.batch_size, generator=g)
        w_emb = guidance_embedding(wscale - 1.0, cfg.cond_dim)
        uncond = empty[None].expand(cfg.batch_size, -1, -1)
        if cfg.method == "consistency":
            loss = _consistency_loss(student, teacher, target, z, text, uncond, eps0, wscale, w_emb, alphas, cfg, g)
        else:
            loss = _progressive_loss(student, teacher, z, text, uncond, eps0, wscale, w_emb, alphas, rounds[r], r == 0, g,
                                     cfg.spacing)
        if not math.isfinite(loss.item()):
            good = checkpoint.latest(out)
            raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1}; stopped without saving; "
                                   f"last good checkpoint: {good.name if good else 'none'}")
        if cfg.lr_schedule == "cosine":  # a function of the step alone, so resume is exact
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step % per_round) / per_round))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # the target network trails the student
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - cfg.ema_decay)
        loss_sum, n_log = loss_sum + loss.item(), n_log + 1
        pbar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            rec = ledger(done, loss_sum / n_log) | {"images_per_s": n_log * cfg.batch_size / (time.perf_counter() - t_log)}
            append_jsonl(out / "metrics.jsonl", rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_log, loss_sum, n_log = time.perf_counter(), 0.0, 0
        if done % every == 0 or done % per_round == 0 or done == total_steps:
            save(done, loss.item(), teacher.state_dict() if cfg.method == "progressive" and r > 0 else None)
    pbar.close()
    return ledger(max(start, total_steps), float("nan")) | {"run": str(out), "rounds": rounds}


def _consistency_loss(student, teacher, target, z, text, uncond, eps0, wscale, w_emb, alphas, cfg, g):
    skip = 1000 // cfg.solver_steps
    grid = torch.arange(1, cfg.solver_steps + 1) * skip - 1  # LCM's DDIM timesteps 19, 39, ..., 999
    n = torch.randint(0, cfg.solver_steps, (len(z),), generator=g)
    t, t_prev = grid[n], (grid[n] - skip).clamp_min(0)
    a, a_prev = alphas[t].view(-1, 1, 1, 1), alphas[t_prev].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * eps0
    pred = consistency_fn(student, x_t, t, text, w_emb, alphas)
    with torch.no_grad():
        e = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, text])).sample
        e_u, e_c = e.chunk(2)
        w = wscale.view(-1, 1, 1, 1)
        eps = e_u + w * (e_c - e_u)  # classifier-free guidance at the per-sample scale
        x0 = x0_from_eps(x_t, eps, a)
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # one skipping DDIM step
        tgt = consistency_fn(target, x_prev, t_prev, text, w_emb, alphas)
    return consistency_distance(pred, tgt, a, cfg)


def consistency_distance(pred: torch.Tensor, tgt: torch.Tensor, a: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """d(f_student, f_target). In x0 units, x0 = (x - sqrt(1-a) eps) / sqrt(a) makes an error in the network's eps
    output cost sqrt((1-a)/a) times more at t=999 than at t=99 (15 vs 0.3), so the high-t pairs steer every
    shared weight and the student drifts away from the teacher at small t, which multistep sampling ends on
    (measured at c16: its error at t=99 rose by half in 150 steps). In eps units (x sqrt(SNR)) every t pulls alike."""
    diff = pred.float() - tgt.float()
    if cfg.loss_space == "eps":
        diff = diff * (a / (1 - a)).sqrt()
    if cfg.loss == "l2":
        return diff.pow(2).mean()
    return (torch.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c).mean()


def _progressive_loss(student, teacher, z, text, uncond, eps0, wscale, w_emb, alphas, steps, first, g,
                      spacing="trailing"):
    """Student takes one DDIM step t -> t'' where the teacher takes two, t -> t' -> t'' (Salimans & Ho, eq. 8)."""
    gap = 1000 // steps
    i = torch.randint(1, steps + 1, (len(z),), generator=g)
    if spacing == "trailing":  # DDIM's trailing grid: gap-1, 2 gap-1, ..., 999; the last step lands on alpha_bar[0]
        t = i * gap - 1
        t_mid = t - gap // 2
    else:  # leading: 1, 1+gap, ...; from t = 1 DDIM's single final step goes to alpha_bar[0], so there the
        t = (i - 1) * gap + 1  # teacher's first half-step is the identity (t_mid = t)
        t_mid = torch.where(i == 1, t, t - gap // 2)
    t_end = (t - gap).clamp_min(0)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * eps0

    def teacher_eps(x, tt):
        if first:  # round 1 distills the guidance too: the teacher is the original with CFG
            e = teacher(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([uncond, text])).sample
            e_u, e_c = e.chunk(2)
            return e_u + wscale.view(-1, 1, 1, 1) * (e_c - e_u)
        return teacher(x, tt, encoder_hidden_states=text, timestep_cond=w_emb).sample

    def ddim(x, eps, a_from, a_to):
        x0 = x0_from_eps(x, eps, a_from)
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps

    with torch.no_grad():
        a_mid = alphas[t_mid].view(-1, 1, 1, 1)
        a_end = alphas[t_end].view(-1, 1, 1, 1)
        x_mid = ddim(x_t, teacher_eps(x_t, t), a, a_mid)
        x_end = ddim(x_mid, teacher_eps(x_mid, t_mid), a_mid, a_end)
        # the x0 that takes x_t to x_end in one DDIM step
        ratio = ((1 - a_end) / (1 - a)).sqrt()
        x0_target = (x_end - ratio * x_t) / (a_end.sqrt() - ratio * a.sqrt())
    eps_s = student(x_t, t, encoder_hidden_states=text, timestep_cond=w_emb).sample
    x0_s = x0_from_eps(x_t, eps_s, a)
    weight = (a / (1 - a)).clamp_min(1.0)  # truncated SNR weighting
    return (weight * (x0_s.float() - x0_target.float()) ** 2).mean()

