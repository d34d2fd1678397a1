"""Diffusion distillation of a text-to-image run into a few-step sampler: two objectives for the training loop.

consistency  latent consistency distillation (Luo et al. 2023), the public cousin of the paper's conditional
             consistency distillation (CoDi, Mei et al. 2024): the student starts as the teacher plus a zero-
             initialised guidance embedding (w drawn per sample); the target network is the loop's EMA of the
             student (decay `ema_decay`, 0.95, without warm-up); a skipping-step DDIM solver on the teacher's
             classifier-free-guided prediction; LCM's boundary scalings f(x, t) = c_skip(t) x + c_out(t) x0(x, t),
             which make f the identity at t = 0; a pseudo-Huber loss in noise units (consistency_distance).
             Sampled with `lcm` on the solver's grid.
progressive  guided distillation (Meng et al. 2023; Salimans & Ho 2022): the w-conditioned student learns to
             match two DDIM steps of its teacher (the guided original in round 1, the previous student after)
             in one, halving the step count each round. Sampled with `ddim` at the final step count.

Both run in train.loop: accelerate (DDP, bf16), the ledger (student forward+backward = 3 network evaluations per
image, a guided teacher call 2, the target 1), exact resume, checkpoints, the NaN guard and diffusers' lr schedules.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch

from ldmscale import checkpoint
from ldmscale.config import apply_overrides, route_overrides, to_dict
from ldmscale.device import on
from ldmscale.diffusion.schedulers import guidance_embedding, noise_scheduler
from ldmscale.errors import UserError
from ldmscale.names import Kind
from ldmscale.tasks.config import DistillConfig, task_train_config
from ldmscale.train.config import TrainConfig
from ldmscale.train.loop import train
from ldmscale.train.run import Task, check_continuation

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary-condition constants (also diffusers' LCMScheduler)


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


def consistency_distance(pred: torch.Tensor, tgt: torch.Tensor, a: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """Per-sample d(f_student, f_target). In x0 units, x0 = (x - sqrt(1-a) eps) / sqrt(a) makes an error in the
    network's eps output cost sqrt((1-a)/a) times more at t=999 than at t=99 (15 vs 0.3), so the high-t pairs
    steer every shared weight and the student drifts away from the teacher at small t, which multistep sampling
    ends on (measured at c16: its error at t=99 rose by half in 150 steps). In eps units (x sqrt(SNR)) every t
    pulls alike."""
    diff = pred.float() - tgt.float()
    if cfg.loss_space == "eps":
        diff = diff * (a / (1 - a)).sqrt()
    if cfg.loss == "l2":
        return diff.pow(2).flatten(1).mean(1)
    return (torch.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c).flatten(1).mean(1)


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


class _Distillation:
    """What both objectives share: the frozen teacher, the guidance scale drawn per sample and embedded."""

    def __init__(
        self, cfg: DistillConfig, teacher_unet: dict, teacher_weights: dict, student_unet: dict, per_round: int
    ):
        self.cfg, self.teacher_unet, self.teacher_weights = cfg, teacher_unet, teacher_weights
        self.student_unet, self.per_round, self.rounds = student_unet, per_round, len(cfg.rounds)

    def _student_copy(self, weights: dict):
        from diffusers import UNet2DConditionModel

        net = UNet2DConditionModel(**self.student_unet)
        net.load_state_dict(weights)
        return on(net, self.device)

    def setup(self, model, ema, device) -> None:
        from diffusers import UNet2DConditionModel

        self.alphas = noise_scheduler().alphas_cumprod.to(device)
        self.teacher = UNet2DConditionModel(**self.teacher_unet)
        self.teacher.load_state_dict(self.teacher_weights)
        self.teacher = on(self.teacher, device)
        self.ema, self.device = ema, device

    def draw(self, g: torch.Generator, n: int, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(n, generator=g)
        return {"noise": torch.randn(n, *shape, generator=g), "w": w, "u": torch.rand(n, generator=g)}

    def guided_teacher(self, x, t, text, empty, w) -> torch.Tensor:
        """The teacher's classifier-free-guided noise prediction at the per-sample scale w."""
        uncond = empty[None].expand(len(x), -1, -1)
        e = self.teacher(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, text])).sample
        e_u, e_c = e.chunk(2)
        return e_u + w.view(-1, 1, 1, 1) * (e_c - e_u)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Consistency(_Distillation):
    def setup(self, model, ema, device) -> None:

        super().setup(model, ema, device)
        self.target = copy.deepcopy(model).eval().requires_grad_(False)

    def before_step(self, step: int, model) -> None:
        # the target network is the loop's EMA of the student: tie its parameters to the EMA's shadow tensors,
        # which the EMA updates in place (again each step: a resume replaces the shadow tensors)
        for p, shadow in zip(self.target.parameters(), self.ema.shadow_params):
            p.data = shadow

    def evals(self, step: int) -> float:
        return 3 + 2 + 1  # student forward + backward, guided teacher, target

    def evals_until(self, step: int) -> float:
        return 6.0 * step

    def loss(self, model, b, rand) -> torch.Tensor:
        cfg = self.cfg
        skip = 1000 // cfg.solver_steps
        grid = torch.arange(1, cfg.solver_steps + 1, device=b.z.device) * skip - 1  # LCM's DDIM grid 99, ..., 999
        n = (rand["u"] * cfg.solver_steps).long().clamp(max=cfg.solver_steps - 1)
        t, t_prev = grid[n], (grid[n] - skip).clamp_min(0)
        a, a_prev = self.alphas[t].view(-1, 1, 1, 1), self.alphas[t_prev].view(-1, 1, 1, 1)
        x_t = a.sqrt() * b.z + (1 - a).sqrt() * rand["noise"]
        w_emb = guidance_embedding(rand["w"] - 1.0, cfg.cond_dim).to(b.z)
        pred = consistency_fn(model, x_t, t, b.text, w_emb, self.alphas)
        with torch.no_grad():
            eps = self.guided_teacher(x_t, t, b.text, b.empty, rand["w"])
            x0 = x0_from_eps(x_t, eps, a)
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # one skipping DDIM step
            tgt = consistency_fn(self.target, x_prev, t_prev, b.text, w_emb, self.alphas)
        return consistency_distance(pred, tgt, a, cfg)


class Progressive(_Distillation):
    def setup(self, model, ema, device) -> None:
        super().setup(model, ema, device)
        self.round = 0

    def before_step(self, step: int, model) -> None:
        r = min(step // self.per_round, self.rounds - 1)
        if r > self.round:  # the finished round's student teaches the next
            self.teacher, self.round = self._student_copy(model.state_dict()), r

    def evals(self, step: int) -> float:
        return 3 + 2 * (2 if step < self.per_round else 1)  # two teacher DDIM steps, guided in round 1

    def evals_until(self, step: int) -> float:
        first = min(step, self.per_round)
        return 7.0 * first + 5.0 * (step - first)

    def loss(self, model, b, rand) -> torch.Tensor:
        """Student takes one DDIM step t -> t'' where the teacher takes two, t -> t' -> t'' (Salimans & Ho, eq. 8)."""
        steps = self.cfg.rounds[self.round]
        gap = 1000 // steps
        i = (rand["u"] * steps).long().clamp(max=steps - 1) + 1
        if self.cfg.spacing == "trailing":  # DDIM's trailing grid: gap-1, 2 gap-1, ..., 999
            t = i * gap - 1
            t_mid = t - gap // 2
        else:  # leading: 1, 1+gap, ...; from t = 1 DDIM's single final step goes to alpha_bar[0], so there the
            t = (i - 1) * gap + 1  # teacher's first half-step is the identity (t_mid = t)
            t_mid = torch.where(i == 1, t, t - gap // 2)
        t_end = (t - gap).clamp_min(0)
        a, a_mid, a_end = (self.alphas[x].view(-1, 1, 1, 1) for x in (t, t_mid, t_end))
        x_t = a.sqrt() * b.z + (1 - a).sqrt() * rand["noise"]
        w_emb = guidance_embedding(rand["w"] - 1.0, self.cfg.cond_dim).to(b.z)

        def teacher_eps(x, tt):
            if self.round == 0:  # round 1 distills the guidance too: the teacher is the original with CFG
                return self.guided_teacher(x, tt, b.text, b.empty, rand["w"])
            return self.teacher(x, tt, encoder_hidden_states=b.text, timestep_cond=w_emb).sample

        def ddim(x, eps, a_from, a_to):
            return a_to.sqrt() * x0_from_eps(x, eps, a_from) + (1 - a_to).sqrt() * eps

        with torch.no_grad():
            x_mid = ddim(x_t, teacher_eps(x_t, t), a, a_mid)
            x_end = ddim(x_mid, teacher_eps(x_mid, t_mid), a_mid, a_end)
            ratio = ((1 - a_end) / (1 - a)).sqrt()  # the x0 that takes x_t to x_end in one DDIM step
            x0_target = (x_end - ratio * x_t) / (a_end.sqrt() - ratio * a.sqrt())
        eps_s = model(x_t, t, encoder_hidden_states=b.text, timestep_cond=w_emb).sample
        weight = (a / (1 - a)).clamp_min(1.0)  # truncated SNR weighting
        return (weight * (x0_from_eps(x_t, eps_s, a).float() - x0_target.float()) ** 2).flatten(1).mean(1)

    def state_dict(self) -> dict:
        # resuming in round r > 1 needs that round's teacher (the student as it was when the round began)
        return {"round": self.round, "round_teacher": self.teacher.state_dict()} if self.round > 0 else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("round_teacher") is not None:
            self.teacher, self.round = self._student_copy(state["round_teacher"]), int(state.get("round", 1))


def distill_task(cfg: DistillConfig, images_per_round: int):
    """make_task for train.train: the student, its objective and its resolved config."""

    def make(tcfg, run):
        from ldmscale.data.cache import LatentCache

        if not cfg.teacher:
            raise UserError("--teacher RUN_DIR is required")
        teacher_ckpt = checkpoint.resolve(Path(cfg.teacher), cfg.checkpoint)
        tconf = checkpoint.read_run_config(cfg.teacher)
        if tconf.get("kind") != Kind.TEXT_TO_IMAGE or tconf.get("distilled"):
            raise UserError(
                f"teacher {cfg.teacher} is a {'distilled ' if tconf.get('distilled') else ''}"
                f"{tconf.get('kind')} run; distillation needs an undistilled text-to-image run"
            )
        if "unet" not in tconf or tconf["train"].get("prediction") == "flow":
            raise UserError(
                f"teacher {cfg.teacher}: distillation (LCM, progressive) is implemented for UNet teachers "
                "trained on the DDPM objective"
            )
        if tcfg.fsdp:
            raise UserError("fsdp shards pretraining; distillation keeps a full teacher and target per process")
        rounds = cfg.rounds
        per_round = math.ceil(images_per_round / tcfg.batch_size)
        resolved = dict(
            tconf, distilled=True, kind=Kind.TEXT_TO_IMAGE, unet=student_config(tconf["unet"], cfg.cond_dim)
        )
        resolved["task"] = {
            "distill": to_dict(cfg)
            | {"teacher": str(Path(cfg.teacher).resolve()), "images_per_round": images_per_round}
        }
        resolved["init"] = {"run": str(Path(cfg.teacher).resolve()), "checkpoint": teacher_ckpt.name}
        resolved["train"] = to_dict(tcfg) | {"size": tconf["train"]["size"], "data": tconf["train"]["data"]}
        resolved["sampling"] = (
            {"sampler": "lcm", "steps": [1, 2, 4, 8]}
            if cfg.method == "consistency"
            else {"sampler": "ddim", "steps": [rounds[-1]]}
        )
        check_continuation(run, resolved)
        weights = checkpoint.load_weights(teacher_ckpt, "ema")
        objective = (Consistency if cfg.method == "consistency" else Progressive)(
            cfg, tconf["unet"], weights, resolved["unet"], per_round
        )
        return Task(
            resolved,
            LatentCache(tconf["train"]["data"], "train"),
            objective,
            init=student_init(weights, resolved["unet"]),
        )

    return make


def configs(teacher: str, method: str, overrides: list[str] | tuple[str, ...], base: dict | None = None):
    """(DistillConfig, TrainConfig) from KEY=VALUE overrides, each key going to the config that has it (train.KEY or
    task.KEY where both do); the loop starts from DistillConfig.train_defaults and the teacher's data, size and seed
    (`base` gives them where the teacher does not exist yet: a study plans before it trains)."""

    routed = route_overrides({"task": DistillConfig, "train": TrainConfig}, overrides)
    dcfg = apply_overrides(DistillConfig(teacher=str(teacher), method=method), routed["task"])
    init_train = base if base is not None else checkpoint.read_run_config(teacher)["train"]
    tcfg = task_train_config(
        DistillConfig, init_train, routed["train"], ema_decay=0.95 if method == "consistency" else 0.0
    )
    return dcfg, tcfg


def distill(cfg: DistillConfig, train_cfg, out: str | Path, images_per_round: int, progress: bool = True) -> dict:
    """Distill `cfg.teacher` into `out` with the training loop; `train_cfg` holds the loop's settings (images is
    the total over all rounds; each round ends on a checkpoint)."""

    rounds = len(cfg.rounds)
    per_round = math.ceil(images_per_round / train_cfg.batch_size)
    ends = tuple(per_round * (r + 1) for r in range(rounds))
    train_cfg = dataclasses.replace(
        train_cfg,
        images=per_round * rounds * train_cfg.batch_size,
        checkpoint_at=tuple(sorted(set(train_cfg.checkpoint_at) | set(ends[:-1]))),
    )
    r = train(train_cfg, out, progress, make_task=distill_task(cfg, images_per_round))
    return r | {"rounds": cfg.rounds}
