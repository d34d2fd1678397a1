"""Speed work, each measured as a before/after ratio of training step time in one run (fwd + bwd + AdamW,
batch 64, 8x8x4 latents, 77x384 context), on the `cpu` sizes:

  heads         the SD layout's 8 heads vs ldmscale's C/8 heads below C=64 (same FLOPs: reported too)
  channels_last model and input in channels-last memory format vs contiguous
  fused_adamw   torch.optim.AdamW(fused=True) vs the default (foreach)
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

from ldmscale.family import build_unet, make_size, parse_size


def step_time(size, *, channels_last=False, fused=False, classic_attn=False, bf16=False, reps=4, batch=64) -> float:
    torch.manual_seed(0)
    unet = build_unet(size, 8, 384)
    if classic_attn:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    x = torch.randn(batch, 4, 8, 8)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused or None)
    t, ctx = torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 384)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        with amp:
            loss = unet(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from ldmscale.flops import cost

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="c16,c32,c64")
    args = p.parse_args()
    out = {}
    for name in args.sizes.split(","):
        size = parse_size(name)
        base = step_time(size)
        r = {"baseline_step_s": round(base, 4)}
        sd_heads = make_size(size.C, heads=8, norm_groups=size.norm_groups)
        if sd_heads != size:
            r["heads"] = {"ldmscale_heads": size.heads, "speedup_vs_8_heads": round(step_time(sd_heads) / base, 3),
                          "flops_ratio": cost(sd_heads, 8, 77, 384).flops / cost(size, 8, 77, 384).flops}
        r["channels_last"] = round(base / step_time(size, channels_last=True), 3)
        r["fused_adamw"] = round(base / step_time(size, fused=True), 3)
        r["sdpa_vs_classic"] = round(step_time(size, classic_attn=True) / base, 3)
        r["bf16_autocast"] = round(base / step_time(size, bf16=True), 3)
        out[name] = r
        print(name, r, flush=True)
    with tempfile.TemporaryDirectory() as d:
        os.environ["LDMSCALE_CACHE"] = d
        from ldmscale import flops

        flops.measure.cache_clear()
        t0 = time.perf_counter()
        flops.measure(make_size(320), 64, 77, 1024)
        cold = time.perf_counter() - t0
        flops.measure.cache_clear()
        t0 = time.perf_counter()
        flops.measure(make_size(320), 64, 77, 1024)
        warm = time.perf_counter() - t0
    record("speedups", {"note": "ratios > 1 mean the change is faster (speed-up); step = fwd+bwd+AdamW, batch 64",
                        "sizes": out, "flop_cache": {"cold_s": round(cold, 3), "cached_s": round(warm, 4),
                                                     "speedup": round(cold / warm, 1)}})


if __name__ == "__main__":
    main()
