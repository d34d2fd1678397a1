"""The executed-cost axis counts what the sampling loop really runs: a forward hook counts the network's calls per
image for every sampler, with and without guidance, and for a student whose guidance scale is embedded."""

import pytest
import torch

from ldmscale.diffusion.schedulers import (
    FLOW_SAMPLERS,
    SAMPLERS,
    SampleStats,
    generate_latents,
    make_sampler,
    model_calls,
)
from ldmscale.model.family import build_network, network_config, parse_size


def counted(unet):
    """Calls per image: each forward adds its batch, so a guided call (cond and uncond in one batch of 2B) counts 2."""
    seen = []
    unet.register_forward_hook(lambda m, args, kwargs, out: seen.append(args[0].shape[0]), with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_network(network_config(parse_size("c8"), 8, 16)).eval()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("steps", [1, 3])
def test_calls_per_image_match_the_formula(unet, sampler, guidance, steps):
    batch = 2
    seen = counted(unet)
    stats = SampleStats()
    sch = make_sampler(sampler, "flow" if sampler in FLOW_SAMPLERS else "epsilon", timestep_spacing="trailing")
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    generate_latents(
        unet, sch, steps, torch.randn(batch, 4, 16), torch.zeros(1, 4, 16), guidance, gens, (4, 8, 8), stats=stats
    )
    unet._forward_hooks.clear()
    calls = sum(seen) / batch
    assert calls == model_calls(sampler, steps, guidance) == stats.model_calls
    assert calls == {"heun": 2 * steps - 1, "flow-heun": 2 * steps - 1}.get(sampler, steps) * (2 if guidance > 1 else 1)


def test_an_embedded_guidance_scale_runs_one_call_a_step():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = network_config(parse_size("c8"), 8, 16)["unet"] | {"time_cond_proj_dim": 32}
    student = UNet2DConditionModel(**cfg).eval()
    seen = counted(student)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    generate_latents(
        student,
        make_sampler("lcm", timestep_spacing="trailing"),
        4,
        torch.randn(2, 4, 16),
        torch.zeros(1, 4, 16),
        8.0,
        gens,
        (4, 8, 8),
    )
    assert sum(seen) / 2 == 4 == model_calls("lcm", 4, 8.0, guidance_embedded=True)


def test_the_text_encoders_cost_is_counted_with_its_attention(tiny_ae):
    """MiniLM on one 16-token prompt, against the BERT formula: per layer 2T(4d^2 + 2df) for the projections and the
    MLP and 4T^2 d for the attention products, plus the pooler's 2d^2. Attention runs in torch's math kernel while
    counting: the CPU flash kernel has no FLOP formula and would lose the 4T^2 d."""
    from ldmscale.diffusion.generate import side_flops

    T, d, f, layers = 16, 384, 1536, 6
    costs = side_flops("minilm", T, str(tiny_ae), (4, 8, 8))
    assert costs["text_encoder_flops"] == layers * (2 * T * (4 * d * d + 2 * d * f) + 4 * T * T * d) + 2 * d * d
    assert costs["decoder_flops"] == 19_359_744  # the fixture's decoder (8, 16, 16 channels) on a 4x8x8 latent
