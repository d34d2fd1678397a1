#!/usr/bin/env bash
# One short prepared check for a machine with one NVIDIA GPU (the `device` tool, or your own):
# installs what it needs, trains C=64 and C=128 for a few hundred steps in bf16 at a 32x32 latent
# (synthetic latents and a 77x1024 context, the paper's text width), samples, and prints images/s,
# MFU against the GPU's dense bf16 peak, and peak memory.   Usage: bash bench/gpu_check.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || .venv/bin/python -m pip install -q torch  # the CUDA build (on the GPU machine only)
.venv/bin/python -m pip install -q -e . --no-deps >/dev/null
.venv/bin/python -m pip install -q diffusers accelerate transformers safetensors >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STEPS=$STEPS .venv/bin/python - <<'PY'
import os, time, torch
from ldmscale.family import build_unet, parse_size
from ldmscale.flops import cost
from ldmscale.diffusion import make_sampler, generate_latents

name = torch.cuda.get_device_name()
# dense bf16 peak (TFLOP/s, no sparsity) of common parts; unknown parts print MFU as n/a
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "RTX 4090": 165, "A6000": 155}
peak = next((v for k, v in PEAKS.items() if k in name), None)
steps, batch, latent = int(os.environ["STEPS"]), 64, 32
torch.backends.cuda.matmul.allow_tf32 = True
for size_name in ("c64", "c128"):
    size = parse_size(size_name)
    unet = build_unet(size, latent, 1024).cuda()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 4, latent, latent, device="cuda")
    ctx = torch.randn(batch, 77, 1024, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 10):
        if i == 10:
            torch.cuda.synchronize(); t0 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (unet(x, t, encoder_hidden_states=ctx).sample.float() - x).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    ips = steps * batch / dt
    fwd = cost(size, latent, 77, 1024).flops
    mfu = f"{3 * fwd * ips / (peak * 1e12):.1%}" if peak else "n/a"
    mem = torch.cuda.max_memory_allocated() / 2**30
    unet.eval()
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(batch)]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        generate_latents(unet, make_sampler("ddim"), 20, ctx, ctx[:1], 3.0, gens, (4, latent, latent))
    torch.cuda.synchronize(); sps = batch / (time.perf_counter() - t0)
    print(f"{size_name}: train {ips:.0f} images/s, MFU {mfu} of {peak or '?'} TFLOP/s bf16 dense ({name}), "
          f"peak memory {mem:.1f} GiB; sample DDIM 20 steps g3: {sps:.1f} images/s", flush=True)
PY
