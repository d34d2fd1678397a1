"""Golden numbers, diffusers' expected_slice style: a dependency upgrade that changes a default (a scheduler's
spacing, an initializer, AdamW's defaults, the text encoder, a linear-algebra routine) fails here, loudly.

The values were recorded with the pinned torch 2.13.0 CPU wheel and the versions in pyproject.toml. When one of
these fails after an upgrade, find the changed default before re-recording.
"""

import json

import numpy as np
import pytest
import torch

from ldmscale.analysis import scaling as analysis
from ldmscale.diffusion.schedulers import (
    FLOW_SAMPLERS,
    SAMPLERS,
    generate_latents,
    make_sampler,
)
from ldmscale.eval import metrics
from ldmscale.model.family import build_unet, parse_size

# the first six optimizer steps of the tiny c8 run (conftest.tiny_run: seed 0, batch 8, lr 1e-3, warmup 2)
FIRST_LOSSES = [
    1.1703790426254272,
    1.1881029605865479,
    1.139922857284546,
    1.1439212560653687,
    1.0681036710739136,
    0.9781308174133301,
]

# latents[0, 0, 0, :4] after 3 steps at guidance 2, a seeded c8 UNet, prompt states and noise
LATENT_SLICES = {
    "ddim": [-2.54766, 1.48298, -5.16042, -4.47166],
    "ddpm": [-1.30006, 0.21539, -4.00172, -3.27352],
    "dpmsolver++": [-3.6552, 2.26314, -6.94214, -6.00615],
    "euler": [-2.54273, 1.47675, -5.16907, -4.47752],
    "euler-a": [-1.30006, 0.21539, -4.00171, -3.27351],
    "heun": [-2.60678, 1.61728, -5.0003, -4.19222],
    "unipc": [-3.6566, 2.26329, -6.91369, -5.95333],
    "lcm": [-8.16049, 3.69212, -21.07106, -18.04035],
}

# the planner on test_analysis.TABLE (small: cost 0.1 a step, large: 1.0) at four budgets
GOLDEN_PLANS = {  # executed cost: 2 calls a step (guided), so small costs 1, 4, 10 and large 10, 40, 100
    0.5: ["none", "none", "nothing fits a budget of 0.5; the cheapest configuration costs 1"],
    1.0: [
        "small with ddim at 5 steps, guidance 4: fd-classifier 28 ± 0.1 (executed cost 1, sampling cost 0.5, 5.0 "
        "ms/image here)",
        "none",
        "no other size has a configuration within this budget, so there is no runner-up",
    ],
    10.0: [
        "small with ddim at 50 steps, guidance 2: fd-classifier 18 ± 0.1 (executed cost 10, sampling cost 5, 50.0 "
        "ms/image here)",
        "large with ddim at 5 steps, guidance 2: fd-classifier 35 ± 0.1 (executed cost 10, sampling "
        "cost 5, 50.0 ms/image here)",
        "the runner-up is 120.2 standard errors worse",
    ],
    100.0: [
        "large with ddim at 50 steps, guidance 2: fd-classifier 10 ± 0.1 (executed cost 100, sampling cost 50, 500.0 "
        "ms/image here)",
        "small with ddim at 50 steps, guidance 2: fd-classifier 18 ± 0.1 (executed cost 10, "
        "sampling cost 5, 50.0 ms/image here)",
        "the runner-up is 56.6 standard errors worse",
    ],
}


def test_first_training_losses_of_c8(tiny_run):
    losses = [json.loads(x)["loss"] for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(FIRST_LOSSES, rel=1e-4, abs=1e-6)


def _slice(name: str) -> list[float]:
    torch.manual_seed(0)
    unet = build_unet(parse_size("c8"), latent_size=8, context_dim=32).eval()
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 4, 32, generator=g), torch.zeros(1, 4, 32)
    with torch.no_grad():
        z = generate_latents(
            unet, make_sampler(name), 3, cond, uncond, 2.0, [torch.Generator().manual_seed(2)], (4, 8, 8)
        )
    return z[0, 0, 0, :4].tolist()


@pytest.mark.parametrize("name", [s for s in SAMPLERS if s not in FLOW_SAMPLERS])  # flow: test_backbones.py
def test_sampler_latent_slice(name):
    assert _slice(name) == pytest.approx(LATENT_SLICES[name], rel=1e-4, abs=1e-4)


def test_frechet_distance_of_fixed_features():
    rng = np.random.default_rng(0)
    a, b = metrics.FeatureStats(16), metrics.FeatureStats(16)
    a.update(torch.as_tensor(rng.normal(size=(500, 16))))
    b.update(torch.as_tensor(rng.normal(0.3, 1.2, size=(400, 16)) @ rng.normal(size=(16, 16)) / 4))
    assert metrics.fd_of(a, b) == pytest.approx(9.068452900299619, rel=1e-9)


def test_planner_answer_on_a_fixed_table():
    from test_analysis import TABLE

    rows = analysis.best_over_guidance(TABLE, "fd-classifier")
    for budget, want in GOLDEN_PLANS.items():
        p = analysis.plan(rows, budget, "fd-classifier")
        assert [
            analysis.describe_choice(p["best"], "fd-classifier"),
            analysis.describe_choice(p["runner_up"], "fd-classifier"),
            analysis.plan_note(p, "fd-classifier"),
        ] == want
