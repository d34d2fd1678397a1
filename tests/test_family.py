import json

import pytest
import torch
from conftest import run_cli

from ldmscale.diffusion.schedulers import model_calls
from ldmscale.errors import UserError
from ldmscale.model.family import (
    PRESETS,
    build_unet,
    make_size,
    parse_size,
    preset_sizes,
    size_spec,
)
from ldmscale.model.flops import (
    cost,
    count_flops,
    matches_paper,
    sampling_cost,
    steps_x_gflops,
    training_flops,
)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv_flops_equal_hand_formula(device):
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, device=device)
    x = torch.zeros(2, 3, 16, 16, device=device)
    # each output value is a dot product of 3*3*3 inputs: 27 multiply-adds = 54 FLOPs
    assert count_flops(conv, x) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_flops_equal_hand_formula(device):
    lin = torch.nn.Linear(40, 24, device=device)
    x = torch.zeros(5, 7, 40, device=device)
    assert count_flops(lin, x) == 2 * 5 * 7 * 40 * 24


def test_cross_attention_flops_equal_hand_formula():
    from diffusers.models.attention_processor import Attention

    device = "meta"  # how ldmscale counts (see the CPU pitfall below)

    N, M, d, dc, heads = 64, 77, 32, 48, 4
    attn = Attention(query_dim=d, cross_attention_dim=dc, heads=heads, dim_head=d // heads).to(device)
    x = torch.zeros(1, N, d, device=device)
    ctx = torch.zeros(1, M, dc, device=device)
    projections = 2 * N * d * d + 2 * (2 * M * dc * d) + 2 * N * d * d  # q, k+v, out
    scores = 2 * N * M * d  # Q K^T over all heads
    mix = 2 * N * M * d  # softmax(QK^T) V
    assert count_flops(attn, x, encoder_hidden_states=ctx) == projections + scores + mix
    # the pitfall that makes ldmscale count on the meta device: torch's CPU SDPA kernel is not
    # registered with the FLOP counter, so real CPU tensors see only the projections
    attn_cpu = Attention(query_dim=d, cross_attention_dim=dc, heads=heads, dim_head=d // heads)
    assert count_flops(attn_cpu, torch.zeros(1, N, d), encoder_hidden_states=torch.zeros(1, M, dc)) == projections


def test_reference_norm_cost_is_exactly_one():
    c = cost(make_size(320), 64, 77, 1024)
    assert c.norm_cost == 1.0
    assert abs(c.gflops - 804.3) / 804.3 < 0.01
    assert c.params == 865_910_724


def test_paper_family_matches_paper_table():
    rows = {}
    for size in preset_sizes("paper"):
        rows[size.C] = cost(size, 64, 77, 1024)
    expected_m = {64: 39, 96: 83, 128: 145, 160: 223, 192: 318, 224: 430, 256: 558, 288: 704, 320: 866}
    for C, m in expected_m.items():
        assert round(rows[C].params / 1e6) == m, C
        assert matches_paper(rows[C].params, f"{m}M")
    assert round(rows[512].params / 1e9) == 2 and round(rows[768].params / 1e9) == 5
    # the paper's Table 1 normalized costs, to its two decimals (5B: 5.22 vs the paper's 5.17 is FLOP-counting noise)
    paper_cost = {64: 0.07, 96: 0.13, 128: 0.20, 160: 0.30, 192: 0.40, 224: 0.53, 256: 0.67, 288: 0.83, 320: 1.00}
    for C, nc in paper_cost.items():
        assert abs(rows[C].norm_cost - nc) <= 0.011, (C, rows[C].norm_cost)
    costs = [rows[c].norm_cost for c in sorted(rows)]
    assert costs == sorted(costs)


def test_cpu_size_builds_and_trains_one_step():
    preset = PRESETS["cpu"]
    size = parse_size("c16")
    assert (size.heads, size.norm_groups) == (2, 16)
    unet = build_unet(size, preset.latent_size, preset.context_dim)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, preset.context_dim)
    out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    n = sum(p.numel() for p in unet.parameters())
    assert n == cost(size, 8, 77, 384).params


def test_size_names_and_rule():
    assert parse_size("83M").C == 96
    assert parse_size("sd1.5").C == 320
    assert parse_size("c48").norm_groups == 16
    assert parse_size("c8").heads == 1
    s = parse_size("c48:h4:g8")
    assert (s.heads, s.norm_groups) == (4, 8)
    assert parse_size(size_spec(s)) == s
    with pytest.raises(UserError, match="unknown size 'big'"):
        parse_size("big")
    with pytest.raises(UserError, match="do not divide"):
        parse_size("c40:g32")


def test_accounting_functions():
    assert training_flops(1000, 10**9) == 3e12
    assert steps_x_gflops(500_000, 804_257_464_320) == pytest.approx(500_000 * 804.25746432)
    assert sampling_cost(0.124, 50) == pytest.approx(6.2)
    assert model_calls("ddim", 50, 7.5) == 100 and model_calls("ddim", 50, 1.0) == 50
    assert model_calls("heun", 10, 3.0) == 38 and model_calls("lcm", 4, 8.0, guidance_embedded=True) == 4


def test_family_cli_json():
    proc = run_cli("family", "--preset", "cpu", "--format", "json", check=True)
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ["c8", "c16", "c32", "c64"]
    assert all({"name", "C", "params", "gflops", "norm_cost"} <= set(r) for r in rows)
    assert rows[0]["flops_convention"] == "multiply-add = 2 FLOPs"
    assert rows[0]["layout"] == "8 norm groups, 1 head"


def test_family_cli_table_and_csv():
    proc = run_cli("family", "--size", "c320", "--size", "c64", "--latent-size", "32", check=True)
    assert "c320" in proc.stdout and "1.000" in proc.stdout and "multiply-add = 2 FLOPs" in proc.stdout
    proc = run_cli("family", "--size", "c64", "--format", "csv", "--set", "heads=4", check=True)
    header, row = proc.stdout.strip().splitlines()
    assert header.startswith("name,C,heads") and row.startswith("c64,64,4,")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["family", "--size", "huge"], "unknown size 'huge'"),
        (["family", "--preset", "gpu"], "unknown preset 'gpu'"),
        (["family", "--set", "width=3"], "unknown key 'width'"),
        (["family", "--set", "heads=many"], "cannot parse 'many'"),
        (["family", "--set", "heads"], "not of the form key=value"),
        (["family", "--latent-size", "12"], "multiple of 8"),
        (["family", "--format", "xml"], "'xml' is not one of"),
        (["train-everything"], "No such command"),
        # size fields, by --set and in the size name (#27)
        (["family", "--size", "c16", "--set", "heads=0"], "heads must be >= 1 and <= 65,536, got 0"),
        (["family", "--size", "c16", "--set", "norm_groups=-2"], "norm_groups must be >= 1 and <= 65,536, got -2"),
        (["family", "--size", "c16", "--set", "layers_per_block=0"], "layers_per_block must be >= 1 and <= 64, got 0"),
        (
            ["family", "--size", "c16", "--set", "layers_per_block=1e40"],
            "layers_per_block must be >= 1 and <= 64, got 1e+40",
        ),
        (["family", "--size", "c16", "--set", "heads=3"], "3 heads do not divide C=16"),
        (["family", "--size", "c16", "--set", "heads=inf"], "heads: cannot parse 'inf' as int"),
        (["family", "--size", "c16:h0"], "must be positive (got 0, 16, 2)"),
        (["family", "--size", "c0"], "base width C must be between 1 and 65536, got 0"),
        (["family", "--size", "dit-64x4:h0"], "hidden, depth, heads and patch must be positive"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_has_examples():
    proc = run_cli("family", "--help", check=True)
    assert "ldmscale family --preset paper" in proc.stdout


@pytest.mark.parametrize("C,latent", [(32, 8), (320, 64)])
def test_context_length_accounting_follows_the_tokens_kept(C, latent):
    """Only cross-attention sees the text: its K/V projections (2 x 2 L D C_l) and its two attention products
    (2 x 2 N L C_l) grow linearly with the tokens kept L, so FLOPs(L) - FLOPs(L') is a hand formula."""
    size, D = make_size(C), 768
    # (channels, query tokens) of every cross-attention transformer: 2 per down level 0-2, 1 in the middle,
    # 3 per up level 2-0
    h = latent
    blocks = (
        [(C, h * h)] * 2
        + [(2 * C, (h // 2) ** 2)] * 2
        + [(4 * C, (h // 4) ** 2)] * 2
        + [(4 * C, (h // 8) ** 2)]
        + [(4 * C, (h // 4) ** 2)] * 3
        + [(2 * C, (h // 2) ** 2)] * 3
        + [(C, h * h)] * 3
    )
    per_token = sum(4 * c * D + 4 * n * c for c, n in blocks)
    f77, f16 = cost(size, latent, 77, D).flops, cost(size, latent, 16, D).flops
    assert f77 - f16 == 61 * per_token
    # the normalized cost is relative to C=320 at the same context, so it follows the tokens too
    ref16 = cost(make_size(320), latent, 16, D).flops
    assert cost(size, latent, 16, D).norm_cost == f16 / ref16
