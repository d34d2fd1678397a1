"""Warmup-stable-decay and IsoFLOP cooldown branches (Hagele et al. 2024): a branch resumed from a constant-lr run's
checkpoint is the WSD run of the budget's length, bit for bit; its ledger counts the whole budget; it resumes
exactly; a study's isoflop budgets are branches of one stable run per size."""

import json

import pytest
import torch
from conftest import resume_exactly, tiny_train_config

from ldmscale import checkpoint
from ldmscale.train.config import TrainConfig
from ldmscale.train.cooldown import branch
from ldmscale.train.loop import lr_schedule, train


def test_wsd_warms_up_holds_then_decays_linearly_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(TrainConfig(lr_schedule="wsd", warmup_steps=2, decay_fraction=0.4), opt, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    frac = TrainConfig(warmup_fraction=0.25, warmup_steps=100)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_schedule(frac, opt2, total=8)  # warm-up: a quarter of the run, warmup_steps ignored
    assert opt2.param_groups[0]["lr"] == 0.0


def test_a_cooldown_branch_is_the_wsd_run_and_its_ledger_counts_the_whole_budget(tiny_cache, tmp_path):
    stable = tiny_train_config(tiny_cache, images=32, checkpoint_every=32, checkpoint_at=(3,), lr_schedule="constant")
    train(stable, tmp_path / "stable", progress=False)
    wsd = tiny_train_config(tiny_cache, images=40, checkpoint_every=40, lr_schedule="wsd", decay_fraction=0.4)
    train(wsd, tmp_path / "wsd", progress=False)  # 5 steps from scratch: decay over steps 4-5
    r = branch(tmp_path / "stable", 3, wsd, tmp_path / "branch", progress=False)
    a, b = (checkpoint.load_weights(checkpoint.latest(tmp_path / n), "raw") for n in ("wsd", "branch"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    led = [json.loads(x) for x in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    scratch = [json.loads(x) for x in (tmp_path / "wsd" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in led] == [4, 5]  # its own steps; the first three are the stable run's
    assert led[-1]["train_flops"] == scratch[-1]["train_flops"] == r["train_flops"]
    assert led[-1]["images_seen"] == 40
    assert checkpoint.latest(tmp_path / "stable").name == "step-000004"  # the stable run is as it was
    with pytest.raises(Exception, match="no checkpoint at step 2"):
        branch(tmp_path / "stable", 2, wsd, tmp_path / "nowhere", progress=False)


def test_a_killed_branch_resumes_exactly(tiny_cache, tmp_path, monkeypatch):
    stable = tiny_train_config(tiny_cache, images=16, checkpoint_every=16, checkpoint_at=(1,))
    train(stable, tmp_path / "stable", progress=False)
    wsd = tiny_train_config(tiny_cache, images=24, checkpoint_every=8, lr_schedule="wsd", decay_fraction=2 / 3)
    resume_exactly(
        tmp_path, monkeypatch, lambda out: branch(tmp_path / "stable", 1, wsd, out, progress=False), kill_at=2, steps=3
    )


def test_a_schedule_planned_for_its_length_cannot_be_extended(tiny_cache, tmp_path):
    from ldmscale.errors import UserError

    train(tiny_train_config(tiny_cache, images=16, lr_schedule="wsd"), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="wsd lr schedule planned for 16 images"):
        train(tiny_train_config(tiny_cache, images=32, lr_schedule="wsd"), tmp_path / "r", progress=False)


def test_settings_added_since_keep_old_runs_and_jobs_as_they_were():
    """A job recorded before decay_fraction and warmup_fraction existed has the same id now, at their defaults."""
    from ldmscale.config import to_dict
    from ldmscale.study.jobs import job_id
    from ldmscale.train.config import ADDED

    cfg = to_dict(TrainConfig())
    before = {k: v for k, v in cfg.items() if k not in ADDED}
    assert job_id("train", cfg) == job_id("train", before)
    assert job_id("cooldown", cfg | {"decay_fraction": 0.5}) != job_id("cooldown", before)
    assert job_id("finetune", {"train": cfg}) == job_id("finetune", {"train": before})


def test_an_isoflop_study_branches_every_budget_from_one_stable_run_per_size(tmp_path):
    from ldmscale.study.plan import plan_jobs
    from ldmscale.study.spec import load_study

    (tmp_path / "s.toml").write_text(
        """
name = "s"
[data]
cache = "/nowhere"
latent_size = 8
context_len = 16
[train]
sizes = ["c8", "c12", "c16"]
budget = "isoflop"
budgets = [1e11, 2e11, 4e11]
cooldown = 0.25
[train.set]
batch_size = 8
warmup_fraction = 0.1
[train.per_size]
c16 = { batch_size = 16 }
[eval]
samplers = ["ddim"]
steps = [2]
guidance = [2.0]
classifier = "/c"
sanity = false
curve_steps = 2
curve_guidance = 2.0
"""
    )
    jobs = plan_jobs(load_study(tmp_path / "s.toml"), tmp_path / "out")
    trains = {j.name.split()[1]: j for j in jobs if j.kind == "train"}
    cools = [j for j in jobs if j.kind == "cooldown"]
    assert len(cools) == 9 and set(trains) == {"c8", "c12", "c16"}
    assert trains["c16"].config["batch_size"] == 16 and trains["c8"].config["batch_size"] == 8  # [train.per_size]
    for size, t in trains.items():
        bs = t.config["batch_size"]
        mine = [j for j in cools if j.name.split()[1] == size]
        budgets = sorted(j.config["images"] // bs for j in mine)  # each budget's steps
        starts = sorted(j.config["at"] for j in mine)
        assert starts == [round(s * 0.75) for s in budgets] and tuple(starts) == tuple(t.config["checkpoint_at"])
        assert t.config["images"] == max(starts) * bs and t.config["lr_schedule"] == "constant"
        assert t.config["warmup_steps"] == round(0.1 * budgets[0]) and t.config["warmup_fraction"] == 0.0
        for j in mine:
            assert j.config["lr_schedule"] == "wsd" and j.config["stable_run"].endswith(f"runs/{size}")
            assert j.config["decay_fraction"] * j.config["images"] / bs == pytest.approx(
                j.config["images"] / bs - j.config["at"]
            )
    evals = [j for j in jobs if j.kind == "eval"]
    assert {j.config["run"].rsplit("/", 1)[1] for j in evals} == {f"{s}-budget{k}" for s in trains for k in (1, 2, 3)}
