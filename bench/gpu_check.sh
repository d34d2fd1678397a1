#!/usr/bin/env bash
# The product on one NVIDIA GPU, end to end, unattended, in under 8 minutes; for a machine with nothing but the
# package registries:   bash bench/gpu_check.sh
#
# 1. installs the CUDA build of torch 2.13.0 and the project into .venv-gpu;
# 2. runs the real CLI at tiny sizes: autoencoder train, data prepare, classifier train, train (bf16), train under
#    torchrun (DDP, 1 process), sample, eval (classifier FD and Inception FID on 300 images), distill
#    (consistency), finetune sr, and checks that every run and evaluation says it computed on the GPU;
# 3. prints training images/s, MFU against the GPU's dense bf16 peak and peak memory for C=64 and C=128 at 32x32
#    latents (the loop's own step: UNet forward and backward, fused AdamW, EMA).
# Any failure, and any model found off the GPU, stops it with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${GPU_CHECK_DIR:-/tmp/ldmscale-gpu-check}
rm -rf "$W" && mkdir -p "$W"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

VENV=.venv-gpu
[ -x $VENV/bin/python ] || python3 -m venv $VENV
PY=$VENV/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0          # PyPI's Linux x86_64 wheel of torch is the CUDA build
$PY -m pip install -q -e '.[dev]'
$PY -m pip install -q --no-deps animal-mnist==0.4
$PY -c "import torch; assert torch.cuda.is_available(), 'this torch has no CUDA: ' + torch.__version__"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
say "installed: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"

export LDMSCALE_PROGRESS=0 LDMSCALE_CACHE=$W/ldmscale-cache HF_HUB_OFFLINE=1
L="$VENV/bin/ldmscale"
$L autoencoder train --out $W/ae --set steps=300
$L data prepare --source animal-mnist --autoencoder $W/ae --resolution 32 --out $W/cache
$L classifier train --out $W/clf --set epochs=2
say "first stage, cache, classifier"
$L train --cache $W/cache --size c16 --out $W/c16 --images 12800 --mixed-precision bf16 --batch-size 64
$VENV/bin/torchrun --standalone --nproc_per_node 1 -m ldmscale train --cache $W/cache --size c16 --out $W/c16-ddp \
    --images 3200 --mixed-precision bf16 --batch-size 64
say "trained (bf16; DDP under torchrun)"
$L sample --run $W/c16 --prompt "a cat" --prompt "a zebra" --sampler ddim --sampler dpmsolver++ --steps 20 \
    --guidance 3 --num-images 4 --out $W/samples
$L eval --run $W/c16 --sampler ddim --steps 20 --guidance 3 --num-images 300 --batch-size 100 \
    --metrics fd-classifier,fid,caption-accuracy --classifier $W/clf
$L eval --run $W/c16 --sampler ddim --steps 20 --guidance 3 --num-images 300 --batch-size 100 \
    --metrics fd-classifier --classifier $W/clf --precision bf16
say "sampled and evaluated"
$L distill --teacher $W/c16 --out $W/lcm --images 1280 --set batch_size=64 --set mixed_precision=bf16
$L eval --run $W/lcm --sampler lcm --steps 4 --guidance 3 --num-images 300 --classifier $W/clf
$L finetune sr --init $W/c16 --out $W/sr --images 1280 --set batch_size=64
$L eval --run $W/sr --sampler ddim --steps 10 --guidance 1 --num-images 100 --metrics psnr,ssim,fd-classifier \
    --classifier $W/clf
say "distilled and fine-tuned"

# every run trained on the GPU, every evaluation sampled on it, and loading a run puts every model there
W=$W $PY - <<'PY'
import glob, json, os, sys
import torch
from ldmscale.diffusion.generate import load_run

w, bad = os.environ["W"], []
for ck in glob.glob(f"{w}/*/checkpoints"):
    machine = json.load(open(os.path.join(os.path.dirname(ck), "config.json"))).get("machine", {})
    bad += [f"{ck}: trained on {machine.get('device')}"] if not str(machine.get("device")).startswith("cuda") else []
ddp = json.load(open(f"{w}/c16-ddp/config.json"))["machine"]["distributed"]
bad += [f"the torchrun run was not data-parallel ({ddp})"] if "MULTI_GPU" not in ddp else []
for r in glob.glob(f"{w}/*/eval/*.json"):
    dev = json.load(open(r)).get("device", "?")
    bad += [f"{r}: sampled on {dev}"] if not dev.startswith("cuda") else []
m = load_run(f"{w}/c16")
for name, mod in (("unet", m.unet), ("vae", m.vae), ("text encoder", m.text.model)):
    devs = {p.device.type for p in mod.parameters()}
    bad += [f"load_run: {name} on {devs}"] if devs != {"cuda"} else []
if bad:
    sys.exit("DEVICE MISMATCH: " + "; ".join(bad))
print("every run and evaluation computed on the GPU")
PY

# throughput, MFU and memory of the loop's step at the paper's text width and a 32x32 latent
$PY - <<'PY'
import time, torch
from diffusers.training_utils import EMAModel
from ldmscale.model.family import build_unet, parse_size
from ldmscale.model.flops import cost

name = torch.cuda.get_device_name()
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "RTX 4090": 165, "A6000": 155}
peak = next((v for k, v in PEAKS.items() if k in name), None)  # dense bf16 TFLOP/s, no sparsity
steps, batch, latent = 200, 64, 32
for size_name in ("c64", "c128"):
    size = parse_size(size_name)
    unet = build_unet(size, latent, 1024).cuda()
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
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
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); ema.step(unet.parameters())
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    ips = steps * batch / dt
    fwd = cost(size, latent, 77, 1024).flops
    mfu = f"{3 * fwd * ips / (peak * 1e12):.1%}" if peak else "n/a"
    print(f"{size_name}: train {ips:.0f} images/s, MFU {mfu} of {peak or '?'} TFLOP/s bf16 dense ({name}), "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
PY
say "done"
