"""Transformer backbones and the rectified-flow objective (issue 18): published parameter counts, FLOPs against
hand formulas, one cost axis with the UNet, the flow sampler on a Gaussian whose velocity field is known in closed
form, and exact resume for every backbone x objective through the one training loop."""

import json

import pytest
import torch
from conftest import printed_pipeline, resume_exactly, run_cli, tiny_train_config

from ldmscale.errors import UserError
from ldmscale.model import flops
from ldmscale.model.family import make_size, parse_size, size_spec
from ldmscale.model.transformers import (
    build_transformer,
    parse_transformer,
    transformer_config,
)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_published_transformer_parameter_counts():
    # PixArt-alpha XL/2 at 512 px (64x64x4 latent, T5-XXL's 4096-wide captions): "0.6B" in its paper
    # (PixArt also predicts the variance: 8 output channels; ldmscale's DiT predicts the 4 of the objective)
    published = dict(transformer_config(parse_size("dit-xl"), 64, 4096), out_channels=8)
    assert _params(build_transformer("dit", published, "meta")) == 610_856_096  # rounds to 0.6B
    ours = build_transformer("dit", transformer_config(parse_size("dit-xl"), 64, 4096), "meta")
    assert _params(ours) == 610_856_096 - 1152 * 2 * 2 * 4 - 2 * 2 * 4
    # SD3-medium's transformer (its published config: 128x128x16 latent, 4096-wide joint context, 2048-wide pooled
    # CLIP vector, position table 192): "2B"
    sd3 = dict(
        transformer_config(parse_size("mmdit-d24"), 128, 4096, latent_channels=16),
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    assert _params(build_transformer("mmdit", sd3, "meta")) == 2_028_328_000
    assert parse_size("mmdit-d24").hidden == 1536 and parse_size("dit-xl").heads == 16


def dit_flops(d, L, N, M, c_in, C, p):
    """Hand count (multiply-add = 2): patch embedding, adaLN-single's timestep MLP and 6d modulation, the caption
    projection MLP; per block self-attention (q, k, v, out; QK^T and AV), cross-attention to M caption tokens,
    and the 4x MLP; the output projection."""
    embed = 2 * N * C * p * p * d + 2 * (256 * d + d * d) + 2 * 6 * d * d + 2 * M * (c_in * d + d * d)
    self_attn = 4 * 2 * N * d * d + 2 * 2 * N * N * d
    cross = 2 * N * d * d + 2 * 2 * M * d * d + 2 * N * d * d + 2 * 2 * N * M * d
    mlp = 2 * 2 * N * d * 4 * d
    return embed + L * (self_attn + cross + mlp) + 2 * N * d * p * p * C


def mmdit_flops(d, L, N, M, c_in, C, p):
    """Hand count for SD3's MM-DiT: both streams get AdaLN-Zero (6d), q/k/v and an MLP; attention runs over the
    N + M joint tokens; the last block keeps no context output (SD3's context_pre_only)."""
    T = N + M
    embed = 2 * N * C * p * p * d + 2 * (256 * d + d * d) + 2 * (c_in * d + d * d) + 2 * M * c_in * d
    head = 2 * 2 * d * d + 2 * N * d * p * p * C
    joint = 3 * 2 * N * d * d + 3 * 2 * M * d * d + 2 * 2 * T * T * d + 2 * N * d * d + 2 * 2 * N * d * 4 * d
    block = 2 * 2 * 6 * d * d + joint + 2 * M * d * d + 2 * 2 * M * d * 4 * d
    last = 2 * 6 * d * d + 2 * 2 * d * d + joint
    return embed + (L - 1) * block + last + head


@pytest.mark.parametrize("name", ["dit-64x6", "dit-128x6:h4", "mmdit-d2:a32", "mmdit-d4:a32"])
def test_transformer_flops_equal_the_hand_formulas(name):
    size = parse_size(name)
    params, counted = flops.measure(size, 8, 16, 384, 4)
    formula = (dit_flops if size.backbone == "dit" else mmdit_flops)(size.hidden, size.depth, 16, 16, 384, 4, 2)
    assert counted == formula
    c = flops.cost(size, 8, 16, 384, 4)
    _, unet320 = flops.measure(make_size(320), 8, 16, 384, 4)
    assert c.norm_cost == pytest.approx(counted / unet320, rel=1e-12)  # the UNet's reference: one cost axis


def test_size_names_round_trip_and_bad_ones_say_why():
    for name in ["dit-s", "dit-xl", "dit-64x6", "dit-64x6:h4", "dit-96x2:p1", "mmdit-d24", "mmdit-d4:a16"]:
        assert size_spec(parse_size(name)) == name and parse_size(size_spec(parse_size(name))) == parse_size(name)
    for bad, msg in [
        ("dit-huge", "dit-s, dit-b"),
        ("dit-64x6:h5", "do not divide"),
        ("mmdit-d4:h2", "depth heads"),
        ("dit-64x6:a16", "mmdit"),
        ("mmdit-x", "mmdit-d<depth>"),
    ]:
        with pytest.raises(UserError, match=msg):
            parse_transformer(bad)
    with pytest.raises(UserError, match="patch 3 does not divide"):
        transformer_config(parse_size("dit-64x2:p3"), 8, 384)


def test_family_cli_prints_a_backbone():
    p = run_cli("family", "--backbone", "dit", "--preset", "cpu", "--format", "json", check=True)
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["dit-64x6", "dit-128x6", "dit-192x8"]
    assert {r["backbone"] for r in rows} == {"dit"} and rows[0]["depth"] == 6
    assert rows[0]["params"] == flops.measure(parse_size("dit-64x6"), 8, 77, 384, 4)[0]


class Velocity(torch.nn.Module):
    """The exact velocity E[noise - x0 | x_t] of rectified flow when x0 ~ N(mu, s^2) per coordinate."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.w = mu, s, torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {})()

    def forward(self, x, t, encoder_hidden_states=None, **_):
        t = (torch.as_tensor(t, dtype=x.dtype) / 1000).reshape(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2
        r = x - (1 - t) * self.mu
        e_x0 = self.mu + (1 - t) * self.s**2 / var * r
        e_noise = t / var * r
        return type("O", (), {"sample": e_noise - e_x0})()


@pytest.mark.parametrize("sampler,steps", [("flow-euler", 50), ("flow-heun", 20)])
def test_flow_samplers_recover_a_gaussian_target(sampler, steps):
    from ldmscale.diffusion.schedulers import SampleStats, generate_latents, make_sampler

    mu, s = 1.5, 0.5
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    stats = SampleStats()
    x = generate_latents(
        Velocity(mu, s), make_sampler(sampler), steps, torch.zeros(2000, 1, 1), None, 1.0, gens, (1, 4, 4), stats=stats
    )
    assert float(x.mean()) == pytest.approx(mu, abs=0.02)
    assert float(x.std()) == pytest.approx(s, abs=0.02 if sampler == "flow-heun" else 0.03)
    assert stats.model_calls == (steps if sampler == "flow-euler" else 2 * steps - 1)


def test_flow_objective_interpolates_and_targets_the_velocity():
    from ldmscale.train.objectives import Batch, RectifiedFlow

    z = torch.randn(6, 4, 8, 8)
    obj = RectifiedFlow()
    rand = obj.draw(torch.Generator().manual_seed(0), 6, (4, 8, 8))

    def oracle(x_t, timestep, **_):  # knows x0: the velocity of the straight path through x_t
        t = (timestep / 1000).view(-1, 1, 1, 1)
        return type("O", (), {"sample": (x_t - z) / t})()

    b = Batch(z, torch.zeros(6, 3, 8), torch.ones(6, 3, dtype=torch.bool), None, torch.zeros(3, 8))
    assert float(obj.loss(oracle, b, rand).max()) < 1e-8
    t = torch.sigmoid(rand["u"])
    assert 0 < float(t.min()) and float(t.max()) < 1  # logit-normal: never the ends of the path


@pytest.mark.parametrize(
    "size,prediction",
    [
        ("dit-32x2", "epsilon"),
        ("dit-32x2", "flow"),
        ("mmdit-d2:a16", "epsilon"),
        ("mmdit-d2:a16", "flow"),
        ("c8", "flow"),
    ],
)
def test_every_backbone_and_objective_resumes_exactly(size, prediction, tiny_cache, tmp_path, monkeypatch):
    from ldmscale.train.loop import train

    cfg = tiny_train_config(tiny_cache, size=size, prediction=prediction, images=24, checkpoint_every=8)
    resume_exactly(
        tmp_path,
        monkeypatch,
        lambda out: train(cfg, out, progress=False),
        kill_at=2,
        steps=3,
        weights=("raw", "ema"),
        atol=0.0,
    )  # bit-equal
    rc = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert ("transformer" in rc) == (size != "c8") and rc["train"]["prediction"] == prediction


def test_a_sampler_must_fit_the_objective_and_export_says_what_it_writes(tiny_cache, tmp_path):
    from ldmscale.diffusion.generate import generate, load_run
    from ldmscale.train.loop import train

    train(tiny_train_config(tiny_cache, size="dit-32x2", prediction="flow", images=8), tmp_path / "f", progress=False)
    m = load_run(tmp_path / "f")
    with pytest.raises(UserError, match="does not fit a run trained with prediction=flow"):
        generate(m, ["a cat"], "ddim", 2, 1.0, [0])
    images, info = generate(m, ["a cat"], "flow-heun", 2, 2.0, [0])
    assert images.shape == (1, 1, 32, 32) and info["model_calls_per_image"] == 2 * (2 * 2 - 1)
    p = run_cli("export", "--run", tmp_path / "f", "--out", tmp_path / "e")
    assert p.returncode == 2 and "no diffusers pipeline samples this combination" in p.stderr
    p = run_cli(
        "train",
        "--cache",
        tiny_cache,
        "--size",
        "c8",
        "--prediction",
        "flow",
        "--snr-gamma",
        "5",
        "--out",
        tmp_path / "g",
        "--images",
        "8",
    )
    assert p.returncode == 2 and "snr_gamma" in p.stderr


def test_validation_loss_is_logged_at_every_checkpoint_and_reaches_the_eval_result(tiny_run, tiny_classifier, tmp_path):
    """The number is the objective's loss on fixed validation triples, with the EMA weights: recomputed here by hand."""
    from ldmscale import checkpoint
    from ldmscale.data.cache import LatentCache
    from ldmscale.diffusion.generate import load_run
    from ldmscale.io import read_jsonl
    from ldmscale.train.objectives import Batch, Denoising, ValidationLoss

    logged = read_jsonl(tiny_run / "validation.jsonl")
    ckpts = checkpoint.list_checkpoints(tiny_run)
    assert [r["step"] for r in logged][-len(ckpts) :] == [int(c.name[5:]) for c in ckpts]
    last = checkpoint.load_state(ckpts[-1])
    assert last["val_loss"] == logged[-1]["val_loss"]
    rc = json.loads((tiny_run / "config.json").read_text())
    val = LatentCache(rc["train"]["data"], "validation")
    n = min(256, len(val))
    b = val.batch(torch.arange(n))
    z, text, mask = b.z, b.text, b.mask
    obj = Denoising()
    obj.setup(None, None, "cpu")
    rand = obj.draw(torch.Generator().manual_seed(ValidationLoss.SEED), n, tuple(z.shape[1:]))
    model = load_run(tiny_run, weights="ema").unet
    with torch.no_grad():
        by_hand = float(obj.loss(model, Batch(z, text, mask, None, val.empty_text.float()), rand).mean())
    assert last["val_loss"] == pytest.approx(by_hand, rel=1e-5)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    run_cli(
        "eval",
        "--run",
        run,
        "--steps",
        "2",
        "--num-images",
        "4",
        "--classifier",
        tiny_classifier,
        "--metrics",
        "fd-classifier",
        "--bootstrap",
        "0",
        "--reference-count",
        "20",
        check=True,
    )
    r = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert r["val_loss"] == last["val_loss"] and r["backbone"] == "unet-sd15" and r["prediction"] == "epsilon"


ISO = """
name = "iso"
[data]
cache = "{cache}"
[train]
sizes = ["c8", "c12", "c16", "dit-64x4"]
budget = "isoflop"
budgets = [1e10, 2e10, 4e10]
[train.set]
batch_size = 8
warmup_steps = 1
[eval]
samplers = ["ddim"]
steps = [2]
guidance = [2.0]
metrics = ["fd-classifier"]
classifier = "{classifier}"
num_images = 8
batch_size = 8
reference_count = 50
bootstrap = 0
sanity = false
curve_steps = 2
curve_guidance = 2.0
"""


def test_isoflop_study_trains_every_size_to_each_budget_and_reports_per_backbone(tiny_cache, tiny_classifier, tmp_path):
    study = tmp_path / "iso.toml"
    study.write_text(ISO.format(cache=tiny_cache, classifier=tiny_classifier))
    out = tmp_path / "s"
    run_cli("study", "run", study, "--out", out, check=True)
    rows = [r for r in json.loads((out / "report" / "analysis.json").read_text())["isoflop"].values()]
    a = json.loads((out / "report" / "analysis.json").read_text())
    assert set(a["isoflop"]) == {"unet-sd15", "dit"} and set(a["by_backbone"]) == {"unet-sd15", "dit"}
    unet = a["isoflop"]["unet-sd15"]
    # every size has a checkpoint at every budget, within the rounding of whole optimizer steps
    assert sorted((p["size"], p["budget"]) for p in unet["points"]) == sorted(
        (s, b) for s in ("c8", "c12", "c16") for b in (1e10, 2e10, 4e10)
    )
    for p in unet["points"]:
        assert abs(p["train_flops"] / p["budget"] - 1) < 0.25 and p["val_loss"] > 0
    # three sizes per budget: a parabola each; one DiT size: none, and the report says why
    assert len(unet["parabolas"]) == 3 and all(pb["points"] == 3 for pb in unet["parabolas"])
    assert "2 or more" in a["isoflop"]["dit"]["why"] and rows[0]["held_out"]["budget"] == 4e10
    html = (out / "report" / "report.html").read_text()
    assert "IsoFLOP" in html and "Training budget 8e+10 FLOPs, unet-sd15" in html
    assert set(a["training_plans"]) == {"unet-sd15", "dit"} and "why" in a["training_plans"]["dit"]
    assert "within each backbone" in (out / "report" / "summary.md").read_text()
    csv = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"val_loss", "backbone", "prediction"} <= set(csv)
    p = run_cli("plan", out, "--train-flops", "8e10", "--format", "json", check=True)
    answer = json.loads(p.stdout)
    assert set(answer) == {"unet-sd15", "dit"} and "why" in answer["dit"]
    p = run_cli("plan", out, "--budget", "1")
    assert p.returncode == 0, p.stderr


def test_dit_export_loads_as_pixart_and_reproduces_ldmscale_latents(tiny_cache, tmp_path):
    from diffusers import PixArtAlphaPipeline

    from ldmscale.diffusion.generate import encode_prompts, load_run
    from ldmscale.diffusion.schedulers import generate_latents, make_sampler
    from ldmscale.train.loop import train

    train(tiny_train_config(tiny_cache, size="dit-32x2", images=16), tmp_path / "run", progress=False)
    proc = run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "export", check=True)
    assert "use_resolution_binning=False" in proc.stdout and "height=32, width=32" in proc.stdout
    m = load_run(tmp_path / "run", device="cpu")
    cond, uncond = encode_prompts(m, ["a cat", "a zebra"])
    ours = generate_latents(
        m.unet,
        make_sampler("ddim"),
        5,
        cond,
        uncond,
        3.0,
        [torch.Generator().manual_seed(s) for s in (3, 4)],
        m.latent_shape,
    )
    pipe = printed_pipeline(proc)  # the line export printed
    assert isinstance(pipe, PixArtAlphaPipeline)
    pipe.set_progress_bar_config(disable=True)
    ones = torch.ones(cond.shape[:2], dtype=torch.long)
    size = m.latent_shape[1] * pipe.vae_scale_factor
    theirs = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=cond,
        prompt_attention_mask=ones,
        negative_prompt_embeds=uncond.expand(2, -1, -1),
        negative_prompt_attention_mask=ones,
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="latent",
        height=size,
        width=size,
        use_resolution_binning=False,
    ).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert "PixArtAlphaPipeline" in (tmp_path / "export" / "ldmscale_source.txt").read_text()


def test_flow_mmdit_export_loads_as_sd3_and_reproduces_ldmscale_latents(tiny_cache, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from ldmscale.diffusion.export import SD3_TEXT_SLOTS, export
    from ldmscale.diffusion.generate import encode_prompts, load_run
    from ldmscale.diffusion.schedulers import generate_latents, make_sampler
    from ldmscale.train.loop import train

    train(
        tiny_train_config(tiny_cache, size="mmdit-d2:a16", prediction="flow", images=16),
        tmp_path / "run",
        progress=False,
    )
    export(tmp_path / "run", tmp_path / "export")
    m = load_run(tmp_path / "run", device="cpu")
    cond, uncond = encode_prompts(m, ["a cat", "a zebra"])
    ours = generate_latents(
        m.unet,
        make_sampler("flow-euler"),
        5,
        cond,
        uncond,
        3.0,
        [torch.Generator().manual_seed(s) for s in (3, 4)],
        m.latent_shape,
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export", **{k: None for k in SD3_TEXT_SLOTS})
    pipe.set_progress_bar_config(disable=True)
    neg = uncond.expand(2, -1, -1)
    size = m.latent_shape[1] * pipe.vae_scale_factor
    theirs = pipe(
        prompt_embeds=cond,
        pooled_prompt_embeds=cond.mean(1),
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg.mean(1),
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="latent",
        height=size,
        width=size,
    ).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
