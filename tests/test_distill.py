import json

import pytest
import torch
from conftest import run_cli

import ldmscale.train.loop as train_mod
from ldmscale import checkpoint
from ldmscale.io import read_jsonl
from ldmscale.tasks.config import DistillConfig
from ldmscale.tasks.distill import (
    configs,
    consistency_distance,
    consistency_fn,
    distill,
    scalings,
    student_config,
    student_init,
)


def _distill(teacher, out, method="consistency", images=16, sets=()):
    cfg, tcfg = configs(str(teacher), method, ["batch_size=8", *sets])
    return distill(cfg, tcfg, out, images, progress=False)


def _student(tiny_run):
    from diffusers import UNet2DConditionModel

    cfg = json.loads((tiny_run / "config.json").read_text())["unet"]
    weights = checkpoint.load_weights(checkpoint.latest(tiny_run), "ema")
    teacher = UNet2DConditionModel(**cfg).eval()
    teacher.load_state_dict(weights)
    scfg = student_config(cfg, 256)
    student = UNet2DConditionModel(**scfg).eval()
    student.load_state_dict(student_init(weights, scfg))
    return teacher, student


def test_consistency_boundary_condition_identity_at_smallest_timestep(tiny_run):
    from ldmscale.diffusion.schedulers import guidance_embedding, noise_scheduler

    _, student = _student(tiny_run)
    c_skip, c_out = scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-3
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 384)
    w = guidance_embedding(torch.tensor([0.0, 1.0, 3.0]), 256)
    with torch.no_grad():
        f = consistency_fn(student, x, torch.zeros(3, dtype=torch.long), ctx, w, noise_scheduler().alphas_cumprod)
    assert torch.equal(f, x)


def test_consistency_distance_in_noise_units():
    # an x0 error d at alpha_bar a is an eps error d * sqrt(a / (1 - a)); eps units weigh every t alike
    a = torch.tensor([0.0047, 0.9]).view(2, 1, 1, 1)
    d = torch.full((2, 4, 8, 8), 0.01)
    l2 = DistillConfig(loss="l2")
    per_sample = consistency_distance(d, 0 * d, a, l2)
    assert per_sample.shape == (2,)
    assert per_sample.tolist() == pytest.approx((1e-4 * (a / (1 - a))).flatten().tolist(), rel=1e-5)
    x0 = consistency_distance(d, 0 * d, a, DistillConfig(loss="l2", loss_space="x0"))
    assert x0.tolist() == pytest.approx([1e-4, 1e-4])
    huber = float(consistency_distance(d[:1], 0 * d[:1], a[1:], DistillConfig(huber_c=0.001)))
    assert huber == pytest.approx((0.03**2 + 0.001**2) ** 0.5 - 0.001, rel=1e-4)  # 0.01 * sqrt(0.9 / 0.1) = 0.03


def test_student_starts_as_the_teacher(tiny_run):
    from ldmscale.diffusion.schedulers import guidance_embedding

    teacher, student = _student(tiny_run)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 384)
    with torch.no_grad():
        a = teacher(x, t, encoder_hidden_states=ctx).sample
        b = student(
            x, t, encoder_hidden_states=ctx, timestep_cond=guidance_embedding(torch.tensor([2.0, 6.0]), 256)
        ).sample
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "method,extra,total", [("consistency", (), 2), ("progressive", ("start_steps=8", "final_steps=2"), 4)]
)
def test_two_step_distillation_resumes_exactly(tiny_run, tmp_path, monkeypatch, method, extra, total):
    sets = ("checkpoint_every=8", "log_every=1", *extra)
    _distill(tiny_run, tmp_path / "straight", method, sets=sets)
    real = train_mod.batch_indices
    kill_at = total - 1

    def dies(step, *a):
        if step == kill_at:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train_mod, "batch_indices", dies)
    with pytest.raises(KeyboardInterrupt):
        _distill(tiny_run, tmp_path / "resumed", method, sets=sets)
    monkeypatch.setattr(train_mod, "batch_indices", real)
    assert checkpoint.latest(tmp_path / "resumed").name == f"step-{kill_at:06d}"
    _distill(tiny_run, tmp_path / "resumed", method, sets=sets)
    for which in ("raw", "ema"):
        a = checkpoint.load_weights(checkpoint.latest(tmp_path / "straight"), which)
        b = checkpoint.load_weights(checkpoint.latest(tmp_path / "resumed"), which)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # the metrics log of the resumed run is the uninterrupted one's: no step logged twice
    logs = [
        [(r["step"], round(r["loss"], 6), r["train_flops"]) for r in read_jsonl(tmp_path / n / "metrics.jsonl")]
        for n in ("straight", "resumed")
    ]
    assert [r[0] for r in logs[0]] == list(range(1, total + 1)) and logs[0] == logs[1]
    state = checkpoint.load_state(checkpoint.latest(tmp_path / "straight"))
    fwd = json.loads((tiny_run / "config.json").read_text())["accounting"]["forward_flops"]
    per_image = 6 * 2 if method == "consistency" else 7 * 2 + 5 * 2  # network evals over the steps
    assert state["train_flops"] == pytest.approx(per_image * 8 * fwd)
    conf = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert conf["distilled"] is True and conf["unet"]["time_cond_proj_dim"] == 256
    if method == "progressive":  # the student samples on the trailing grid it was distilled on
        from ldmscale.diffusion.generate import load_run

        sampler = load_run(tmp_path / "straight").sampler("ddim")
        sampler.set_timesteps(2)
        assert sampler.timesteps.tolist() == [999, 499]
        assert "step-000002" in [c.name for c in checkpoint.list_checkpoints(tmp_path / "straight")]  # round 1


def test_distilled_model_samples_with_lcm_and_is_marked(tiny_run, tiny_classifier, tmp_path):
    _distill(tiny_run, tmp_path / "lcm")
    p = run_cli(
        "sample",
        "--run",
        tmp_path / "lcm",
        "--prompt",
        "a cat",
        "--sampler",
        "lcm",
        "--steps",
        "4",
        "--guidance",
        "3",
        "--num-images",
        "2",
        "--out",
        tmp_path / "s",
        check=True,
    )
    assert "4 model calls/image" in p.stdout  # guidance is embedded: no second (unconditional) call
    from ldmscale.diffusion.generate import load_run

    sampler = load_run(tmp_path / "lcm").sampler("lcm")  # lcm steps on the grid the student was distilled on
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 799, 499, 299]
    p = run_cli(
        "eval",
        "--run",
        tmp_path / "lcm",
        "--sampler",
        "lcm",
        "--steps",
        "2",
        "--guidance",
        "3",
        "--num-images",
        "8",
        "--classifier",
        tiny_classifier,
        "--reference-count",
        "50",
        "--batch-size",
        "8",
        check=True,
    )
    r = json.loads(next((tmp_path / "lcm" / "eval").glob("*.json")).read_text())
    assert r["distilled"] is True and r["model_calls_per_image"] == 2


def test_distill_bad_teacher_exits_2(tiny_run, tmp_path):
    p = run_cli("distill", "--teacher", tmp_path / "missing", "--out", tmp_path / "x")
    assert p.returncode == 2 and "not a run directory" in p.stderr
    _distill(tiny_run, tmp_path / "student", images=8)
    p = run_cli("distill", "--teacher", tmp_path / "student", "--out", tmp_path / "y")
    assert p.returncode == 2 and "needs an undistilled text-to-image run" in p.stderr
    p = run_cli(
        "distill", "--teacher", tiny_run, "--method", "progressive", "--set", "start_steps=6", "--out", tmp_path / "z"
    )
    assert p.returncode == 2 and "start_steps dividing 1000" in p.stderr
