"""Speed work, each measured as a before/after ratio of training step time in one run (fwd + bwd + AdamW,
batch 64, 8x8x4 latents, 77x384 context), on the `cpu` sizes:

  heads         the SD layout's 8 heads vs ldmscale's C/8 heads below C=64 (same FLOPs: reported too)
  channels_last model and input in channels-last memory format vs contiguous
  fused_adamw   torch.optim.AdamW(fused=True) vs foreach
  sdpa          diffusers' scaled-dot-product attention (default) vs the classic attention processor
  bf16          torch.autocast(bfloat16) vs float32
  flop_cache    a cached FLOP count vs counting on the meta device
Run: .venv/bin/python bench/speedups.py [--sizes c16,c32,c64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import torch
from common import record

from ldmscale.model.family import build_unet, make_size, parse_size


def make_step(size, *, channels_last=False, fused=False, classic_attn=False, bf16=False, batch=64):
    """A training step (fwd + bwd + AdamW) of a fresh model in one configuration, as a callable."""
    torch.manual_seed(0)
    unet = build_unet(size, 8, 384)
    if classic_attn:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    x = torch.randn(batch, 4, 8, 8)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    t, ctx = torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 384)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with amp:
            loss = unet(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    return step


def seconds(step, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ratio(base, other, repeats: int = 5) -> dict:
    """Speed-up of `other` over `base` (> 1: faster) from `repeats` alternating measurements A B A B ...: the
    median, the min-max spread, and whether the spread clears 1.0 (only then is the choice worth keeping)."""
    rs = []
    for _ in range(repeats):
        a = seconds(base)
        b = seconds(other)
        rs.append(a / b)
    rs.sort()
    lo, hi, med = rs[0], rs[-1], rs[len(rs) // 2]
    verdict = "faster" if lo > 1 else "slower" if hi < 1 else "within noise"
    return {"median": round(med, 3), "min": round(lo, 3), "max": round(hi, 3), "repeats": repeats, "verdict": verdict}


def main() -> None:
    from ldmscale.model.flops import cost

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="c16,c32,c64")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    out = {}
    for name in args.sizes.split(","):
        size = parse_size(name)
        base = make_step(size)
        r = {"baseline_step_s": round(seconds(base), 4)}
        sd_heads = make_size(size.C, heads=8, norm_groups=size.norm_groups)
        if sd_heads != size:  # ldmscale's C/8 heads (base) against SD's 8 (slower if the ratio base/8-heads > 1)
            r["heads"] = {
                "ldmscale_heads": size.heads,
                "flops_ratio": cost(sd_heads, 8, 77, 384).flops / cost(size, 8, 77, 384).flops,
                "speedup_vs_8_heads": ratio(make_step(sd_heads), base, args.repeats),
            }
        r["channels_last"] = ratio(base, make_step(size, channels_last=True), args.repeats)
        r["fused_adamw"] = ratio(base, make_step(size, fused=True), args.repeats)
        r["sdpa_vs_classic"] = ratio(make_step(size, classic_attn=True), base, args.repeats)
        r["bf16_autocast"] = ratio(base, make_step(size, bf16=True), args.repeats)
        out[name] = r
        print(name, r, flush=True)
    with tempfile.TemporaryDirectory() as d:
        os.environ["LDMSCALE_CACHE"] = d
        from ldmscale.model import flops

        flops.measure.cache_clear()
        t0 = time.perf_counter()
        flops.measure(make_size(320), 64, 77, 1024)
        cold = time.perf_counter() - t0
        flops.measure.cache_clear()
        t0 = time.perf_counter()
        flops.measure(make_size(320), 64, 77, 1024)
        warm = time.perf_counter() - t0
    record(
        "speedups",
        {
            "note": "ratios > 1 mean the change is faster; each is the median of 5 alternating A/B "
            "measurements (3 steps each) with its min-max; step = fwd+bwd+AdamW, batch 64; "
            "a choice is kept only when its whole spread is above 1",
            "sizes": out,
            "flop_cache": {"cold_s": round(cold, 3), "cached_s": round(warm, 4), "speedup": round(cold / warm, 1)},
        },
    )


if __name__ == "__main__":
    main()
