import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, printed_pipeline, run_cli, tiny_train_config
from safetensors import safe_open

import ldmscale.train.loop as train_mod
from ldmscale import checkpoint
from ldmscale.diffusion.schedulers import (
    SAMPLERS,
    SampleStats,
    generate_latents,
    make_sampler,
    noise_scheduler,
)
from ldmscale.train.loop import TrainingDiverged, train

# several processes on accelerate's one rendezvous port: one worker runs them one after another
MULTIPROCESS = pytest.mark.xdist_group("multiprocess")


def _weights(run, which="raw"):
    return checkpoint.load_weights(checkpoint.latest(run), which)


def test_run_directory_and_ledger(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["kind"] == "text-to-image" and cfg["train"]["size"] == "c8"
    assert cfg["unet"]["block_out_channels"] == [8, 16, 32, 32]
    fwd = cfg["accounting"]["forward_flops"]
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    last = lines[-1]
    assert last["images_seen"] == 48 and last["train_flops"] == 3 * 48 * fwd
    assert last["steps_x_gflops"] == pytest.approx(6 * fwd / 1e9)
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in lines)
    names = [p.name for p in checkpoint.list_checkpoints(tiny_run)]
    assert names == ["step-000003", "step-000006"]
    assert (tiny_run / "checkpoints" / "LATEST").read_text().strip() == "step-000006"
    with safe_open(str(tiny_run / "checkpoints" / "step-000006" / "ema.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ldmscale_config"])["unet"] == cfg["unet"]
    assert json.loads(meta["ldmscale_state"])["images_seen"] == 48
    ema, raw = _weights(tiny_run, "ema"), _weights(tiny_run, "raw")
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_resume_equals_uninterrupted(tmp_path, tiny_cache, monkeypatch):
    cfg = tiny_train_config(tiny_cache)
    train(cfg, tmp_path / "straight", progress=False)
    real = train_mod.batch_indices

    def dies_at_step_5(step, *a):
        if step == 4:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint, during step 5
        return real(step, *a)

    monkeypatch.setattr(train_mod, "batch_indices", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "batch_indices", real)
    assert checkpoint.latest(tmp_path / "resumed").name == "step-000003"
    train(cfg, tmp_path / "resumed", progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    ea, eb = _weights(tmp_path / "straight", "ema"), _weights(tmp_path / "resumed", "ema")
    assert all(torch.allclose(ea[k], eb[k], atol=1e-6, rtol=0) for k in ea)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a longer --images continues the same run; other changed settings are refused
    from ldmscale.errors import UserError

    with pytest.raises(UserError, match="lr differ"):
        train(tiny_train_config(tiny_cache, lr=0.5), tmp_path / "resumed", progress=False)


KILL_SCRIPT = r"""
import sys, time, pathlib
import ldmscale.checkpoint as ck
real = ck.save_file
calls = {"n": 0}
def slow(tensors, path, metadata=None):
    calls["n"] += 1
    real(tensors, path, metadata=metadata)
    if calls["n"] == 3:  # the first file of the second checkpoint is written: stall there
        pathlib.Path(sys.argv[1]).write_text("saving")
        time.sleep(60)
ck.save_file = slow
from ldmscale.cli.main import main
main(sys.argv[2:])
"""


def test_kill9_during_save_keeps_previous_checkpoint(tmp_path, tiny_cache):
    run, marker = tmp_path / "run", tmp_path / "marker"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    args = [
        "train",
        "--cache",
        str(tiny_cache),
        "--size",
        "c8",
        "--out",
        str(run),
        "--images",
        "48",
        "--set",
        "batch_size=8",
        "--set",
        "checkpoint_every=24",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "training never reached the second save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert hidden, "the interrupted save should have left only a hidden temp folder"
    assert checkpoint.latest(run).name == "step-000003"
    weights = checkpoint.load_weights(checkpoint.latest(run), "ema")
    assert all(torch.isfinite(v).all() for v in weights.values())
    run_cli(*args, check=True)  # the same command resumes and finishes
    assert checkpoint.latest(run).name == "step-000006"


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_cache, monkeypatch):
    from ldmscale.data.cache import LatentCache

    real = LatentCache.batch
    calls = {"n": 0}

    def poisoned(self, idx, latent_noise=None, seeds=None):
        if self.split != "train":  # the validation loss's fixed batch
            return real(self, idx, latent_noise)
        calls["n"] += 1
        b = real(self, idx, latent_noise)
        if calls["n"] == 5:
            b.z = b.z * float("nan")
        return b

    monkeypatch.setattr(LatentCache, "batch", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5 .*last good checkpoint: step-000003"):
        train(tiny_train_config(tiny_cache), tmp_path / "run", progress=False)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-000003"]


@MULTIPROCESS
def test_two_process_data_parallel_trains_the_same_model(tmp_path, tiny_cache):
    args = [
        "train",
        "--cache",
        str(tiny_cache),
        "--size",
        "c8",
        "--images",
        "32",
        "--set",
        "batch_size=8",
        "--set",
        "warmup_steps=1",
    ]
    run_cli(*args, "--out", tmp_path / "one", check=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ldmscale",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run ") == 1  # only the main process reports
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # Same batches, same noise; only the all-reduce's summation order differs. Parameters whose true gradient
    # is exactly zero (a conv bias right before a one-channel-per-group GroupNorm, as at C=8) get rounding
    # noise that Adam scales up to a full step of size lr, so those may differ by at most steps x lr.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-5).float().mean() > 0.995
    assert diff.max() <= 4 * 1e-3 + 1e-6
    close = [k for k in a if (a[k] - b[k]).abs().max() < 1e-5]
    assert "conv_in.weight" in close and "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in close
    changed = _weights(tmp_path / "one")
    assert sum(v.abs().sum().item() for v in changed.values()) > 0


class ToyGaussianDenoiser(torch.nn.Module):
    """The exact epsilon-predictor for data x0 ~ N(mu, s^2) per element, under SD's schedule."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(time_cond_proj_dim=None)
        self.alphas = noise_scheduler().alphas_cumprod

    def forward(self, x, t, encoder_hidden_states=None, timestep_cond=None, encoder_attention_mask=None):
        t = float(t)
        lo, hi = int(np.floor(t)), min(999, int(np.ceil(t)))
        a = self.alphas[lo] + (self.alphas[hi] - self.alphas[lo]) * (t - lo)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        return SimpleNamespace(sample=eps)


@pytest.mark.parametrize("name", [s for s in SAMPLERS if s != "lcm" and not s.startswith("flow-")])
def test_samplers_recover_a_gaussian_with_its_exact_denoiser(name):
    model = ToyGaussianDenoiser(mu=0.5, s=0.7)
    # Ancestral samplers (ddpm, euler-a) add only the posterior's own variance at each jump, which
    # underestimates the true reverse variance at large jumps (Bao et al. 2022): std 0.65 at 50 steps,
    # 0.678 at 200, 0.693 at 500. They converge as steps grow, so they are checked at 500.
    steps = {"dpmsolver++": 25, "unipc": 25, "heun": 25, "ddpm": 500, "euler-a": 500}.get(name, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    cond = torch.zeros(16, 4, 8)
    stats = SampleStats()
    x = generate_latents(model, make_sampler(name), steps, cond, None, 1.0, gens, (4, 16, 16), stats=stats)
    # SD's schedule does not reach zero SNR (alpha_bar(999) ~ 0.005), so starting from N(0, 1) leaves a known
    # small offset of about sqrt(alpha_bar_T) * mu in the mean (Lin et al. 2023); gross loop errors are far larger.
    assert abs(x.mean().item() - 0.5) < 0.06, x.mean()
    assert abs(x.std().item() / 0.7 - 1) < 0.05, x.std()
    assert stats.model_calls == (2 * steps - 1 if name == "heun" else steps)


def test_guidance_doubles_model_calls_and_lcm_runs():
    model = ToyGaussianDenoiser(mu=0.0, s=1.0)
    gens = [torch.Generator().manual_seed(0)]
    stats = SampleStats()
    generate_latents(
        model, make_sampler("ddim"), 10, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 3.0, gens, (4, 8, 8), stats=stats
    )
    assert stats.model_calls == 20
    stats = SampleStats()
    x = generate_latents(model, make_sampler("lcm"), 4, torch.zeros(1, 4, 8), None, 1.0, gens, (4, 8, 8), stats=stats)
    assert stats.model_calls == 4 and torch.isfinite(x).all()


def test_same_seed_same_images_whatever_the_batch(tiny_run):
    from ldmscale.diffusion.generate import generate, load_run

    model = load_run(tiny_run)
    prompts = ["a cat", "a dog", "a cat"]
    a, info = generate(model, prompts, "ddim", 5, 3.0, [1, 2, 1], batch_size=3)
    b, _ = generate(model, prompts, "ddim", 5, 3.0, [1, 2, 1], batch_size=1)
    assert torch.equal(a, b) and torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.uint8
    assert info["model_calls_per_image"] == 10 and info["seconds_per_image"] > 0


def test_sample_cli(tiny_run, tmp_path):
    out = tmp_path / "s"
    proc = run_cli(
        "sample",
        "--run",
        tiny_run,
        "--prompt",
        "a cat",
        "--prompt",
        "a zebra",
        "--sampler",
        "dpmsolver++",
        "--steps",
        "4",
        "--guidance",
        "2",
        "--num-images",
        "3",
        "--out",
        out,
        check=True,
    )
    assert "8 model calls/image" in proc.stdout
    assert sorted(p.name for p in out.glob("p*.png")) == [f"p{p:02d}-{k:03d}.png" for p in range(2) for k in range(3)]
    from PIL import Image

    g = Image.open(out / "grid.png")
    assert g.size == (3 * (96 + 2) + 2, 2 * (96 + 2) + 2)
    rec = json.loads((out / "sample.json").read_text())
    assert rec["seeds"] == [0, 1, 2, 3, 4, 5] and rec["checkpoint"] == "step-000006"
    assert rec["results"]["dpmsolver++"]["sampling_cost"] == pytest.approx(rec["norm_cost"] * 4)
    out2 = tmp_path / "two"
    proc = run_cli(
        "sample",
        "--run",
        tiny_run,
        "--prompt",
        "a cat",
        "--sampler",
        "ddim",
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--guidance",
        "1",
        "--num-images",
        "2",
        "--out",
        out2,
        check=True,
    )
    assert "heun: 5 model calls/image" in proc.stdout and "ddim: 3 model calls/image" in proc.stdout
    assert Image.open(out2 / "grid.png").size == (4 * (96 + 2) + 2, 96 + 4)
    assert np.array_equal(
        np.asarray(Image.open(out2 / "grid.png"))[2:98, 2:98],
        np.asarray(Image.open(out2 / "ddim-p00-000.png").resize((96, 96), Image.NEAREST)),
    )
    for args, needle in [
        (["--sampler", "plms"], "unknown sampler 'plms'"),
        (["--steps", "0"], "'--steps': 0 is not in the range 1<=x<=1000"),
        (["--checkpoint", "99"], "has no checkpoint '99'"),
    ]:
        p = run_cli("sample", "--run", tiny_run, "--prompt", "a cat", "--out", tmp_path / "bad", *args)
        assert p.returncode == 2 and needle in p.stderr, p.stderr
    p = run_cli("sample", "--run", tmp_path / "nope", "--prompt", "a cat", "--out", tmp_path / "bad")
    assert p.returncode == 2 and "not a run directory" in p.stderr
    p = run_cli("sample", "--run", tiny_run, "--prompt", "a cat", "--out", out)
    assert p.returncode == 2 and "already holds samples; pass --overwrite" in p.stderr
    run_cli(
        "sample",
        "--run",
        tiny_run,
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--num-images",
        "1",
        "--out",
        out,
        "--overwrite",
        check=True,
    )


def _pipeline_latents(
    folder, prompt_embeds=None, negative=None, prompt=None, seeds=(3, 4), steps=5, guidance=3.0, pipe=None
):
    from diffusers import StableDiffusionPipeline

    pipe = pipe or StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        output_type="latent",
        height=size,
        width=size,
    )
    return out.images


def _our_latents(run, prompts, seeds=(3, 4), steps=5, guidance=3.0):
    from ldmscale.diffusion.generate import encode_prompts, load_run

    model = load_run(run)
    cond, uncond = encode_prompts(model, prompts)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return generate_latents(model.unet, make_sampler("ddim"), steps, cond, uncond, guidance, gens, model.latent_shape)


def test_export_clip_pipeline_matches_ldmscale_sample(tmp_path, tiny_ae):
    from fixtures import make_tiny_clip

    from ldmscale.data.cache import prepare
    from ldmscale.data.config import PrepareConfig

    clip = make_tiny_clip(tmp_path / "clip")
    cache = tmp_path / "cache"
    prepare(
        PrepareConfig(
            source="animal-mnist", autoencoder=str(tiny_ae), text_encoder=f"clip:{clip}", resolution=32, limit=16
        ),
        cache,
        progress=False,
    )
    train(tiny_train_config(cache, images=16), tmp_path / "run", progress=False)
    proc = run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "export", check=True)
    assert "trust_remote_code" not in proc.stdout  # a CLIP text encoder is plain transformers
    prompts = ["a cat", "a zebra"]
    ours = _our_latents(tmp_path / "run", prompts)
    theirs = _pipeline_latents(None, prompt=prompts, pipe=printed_pipeline(proc))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_export_minilm_pipeline_takes_plain_prompts_or_refuses(tiny_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldmscale.diffusion.generate import encode_prompts, load_run

    proc = run_cli("export", "--run", tiny_run, "--out", tmp_path / "export", check=True)
    assert "trust_remote_code=True" in proc.stdout
    model = load_run(tiny_run)
    # plain prompts through the pipeline's own tokenizer and text encoder give ldmscale's zero-padded states, from
    # the pipeline that the line export printed loads
    ours = _our_latents(tiny_run, ["a cat", "a zebra"])
    assert torch.allclose(
        ours, _pipeline_latents(None, prompt=["a cat", "a zebra"], pipe=printed_pipeline(proc)), atol=1e-5
    )
    cond, uncond = encode_prompts(model, ["a cat", "a zebra"])
    theirs = _pipeline_latents(tmp_path / "export", prompt_embeds=cond, negative=uncond.expand(2, -1, -1))
    assert torch.allclose(ours, theirs, atol=1e-5)
    # without trust_remote_code diffusers refuses the folder instead of encoding prompts with a plain BertModel
    with pytest.raises(ValueError, match="trust_remote_code"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    p = run_cli("export", "--run", tmp_path / "missing", "--out", tmp_path / "x")
    assert p.returncode == 2 and "not a run directory" in p.stderr


def _launch2(args, out):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ldmscale",
        *map(str, args),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@MULTIPROCESS
def test_fsdp_two_processes_train_resume_and_match_one_process(tmp_path, tiny_cache):
    args = [
        "train",
        "--cache",
        tiny_cache,
        "--size",
        "c8",
        "--set",
        "batch_size=8",
        "--set",
        "warmup_steps=1",
        "--set",
        "checkpoint_every=16",
    ]
    run_cli(*args, "--images", "32", "--out", tmp_path / "one", check=True)
    _launch2([*args, "--images", "16", "--set", "fsdp=true"], tmp_path / "fsdp")
    resumed = _launch2([*args, "--images", "32", "--set", "fsdp=true"], tmp_path / "fsdp")
    assert f"continuing {tmp_path / 'fsdp'} from step-000002" in resumed.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "fsdp")
    assert set(a) == set(b)
    # the resumed run against one process, at the DDP tolerance (see above); the bit-equal check of an FSDP resume
    # against an uninterrupted FSDP run was a third launch (30 s), dropped for the suite's time
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-5).float().mean() > 0.99 and diff.max() <= 4e-3 + 1e-6
    cfg = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert cfg["train"]["fsdp"] is True
    from ldmscale.diffusion.generate import generate, load_run

    images, _ = generate(load_run(tmp_path / "fsdp"), ["a cat"], "ddim", 2, 2.0, [0])
    assert images.shape == (1, 1, 32, 32)


def test_tensorboard_tracking_logs_config_curves_and_sample_grids(tmp_path, tiny_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ldmscale.train.loop import train

    run = tmp_path / "run"
    train(tiny_train_config(tiny_cache, images=16, report_to="tensorboard"), run, progress=False)
    train(tiny_train_config(tiny_cache, images=32, report_to="tensorboard"), run, progress=False)  # resumed
    dirs = sorted({str(p.parent) for p in run.rglob("events.out.*")})
    events = [EventAccumulator(d, size_guidance={"images": 0}).Reload() for d in dirs]
    scalars = {
        t: [e.step for ev in events if t in ev.Tags()["scalars"] for e in ev.Scalars(t)]
        for t in ("loss", "lr", "train_flops", "images_seen")
    }
    assert sorted(scalars["loss"]) == [1, 2, 3, 4] and scalars["train_flops"] and "seed" not in str(scalars)
    images = [e.step for ev in events if "samples" in ev.Tags()["images"] for e in ev.Images("samples")]
    assert sorted(images) == [2, 3, 4]  # a grid at each checkpoint: the end of run 1, then steps 3 and 4
    p = run_cli(
        "train", "--cache", tiny_cache, "--size", "c8", "--out", tmp_path / "w", "--images", "8", "--report-to", "wandb"
    )
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert p.returncode == 2 and "needs the wandb package: pip install wandb" in p.stderr


@MULTIPROCESS
@pytest.mark.parametrize("verb", ["distill", "finetune sr"])
def test_two_process_data_parallel_distillation_and_superres(verb, tmp_path, tiny_run):
    """Distillation and super-resolution run in the same loop, so under DDP as pretraining does."""
    if verb == "distill":
        args = ["distill", "--teacher", tiny_run, "--images", "16", "--set", "batch_size=8"]
    else:
        args = [
            "finetune",
            "sr",
            "--init",
            tiny_run,
            "--images",
            "16",
            "--set",
            "batch_size=8",
            "--set",
            "warmup_steps=1",
        ]
    run_cli(*args, "--out", tmp_path / "one", check=True)
    _launch2(args, tmp_path / "two")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-5).float().mean() > 0.99 and diff.max() <= 2 * 1e-3 + 1e-6  # as for train (see above)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["machine"]["processes"] == 2
