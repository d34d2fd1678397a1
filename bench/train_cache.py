"""Training throughput from the latent cache vs encoding on the fly, per `cpu` size, in one run.

ldmscale: `ldmscale.train.loop.train` on a latent cache (steady-state images/s from its metrics.jsonl).
Baseline ("on the fly"): the loop of diffusers' examples/text_to_image/train_text_to_image.py: every step
loads and preprocesses the images, encodes them with the autoencoder (latent_dist.sample() x scaling factor)
and the captions with the text encoder, then the same UNet forward/backward and AdamW step.
Also prints achieved GFLOP/s (3 x forward FLOPs per image) as a fraction of this CPU's float32 matmul peak,
measured in the same run.

Run: .venv/bin/python bench/train_cache.py [--sizes c8,c16,c32,c64] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import matmul_peak_gflops, record, untrained_cache

from ldmscale.data import autoencoder as ae
from ldmscale.data import sources as data
from ldmscale.data.text import load_text_encoder
from ldmscale.diffusion.schedulers import noise_scheduler
from ldmscale.model.family import build_unet, parse_size
from ldmscale.model.flops import cost
from ldmscale.train.config import TrainConfig
from ldmscale.train.loop import train


def on_the_fly(size: str, steps: int, batch: int, ae_dir: str) -> float:
    vae = ae.load_autoencoder(ae_dir)
    text = load_text_encoder("minilm")
    items = [
        it for _, it in zip(range(steps * batch + batch), data.iterate(data.parse_source("animal-mnist"), "train"))
    ]
    torch.manual_seed(0)
    unet = build_unet(parse_size(size), 8, 384)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = noise_scheduler()
    sf = vae.config.scaling_factor
    t0 = None
    for step in range(steps + 1):  # step 0 is warm-up, not timed
        if step == 1:
            t0 = time.perf_counter()
        chunk = items[step * batch : (step + 1) * batch]
        pixels = ae.to_float(np.stack([data.preprocess(it.image, 32, 1) for it in chunk]))
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * sf
            tok = text.tokenizer(
                [it.caption for it in chunk], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            states = text.model(**tok).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t0)


def cached(size: str, steps: int, batch: int, cache: Path, run: Path) -> float:
    cfg = TrainConfig(
        data=str(cache),
        size=size,
        images=(steps + 2) * batch,
        batch_size=batch,
        log_every=1,
        checkpoint_every=10**9,
        keep=1,
        lr=1e-4,
    )
    train(cfg, run, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[2:]]  # skip warm-up steps
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean = total images / total time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="c8,c16,c32,c64")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache-images", type=int, default=2000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    results = {}
    try:
        untrained_cache(tmp, args.cache_images)
        peak = matmul_peak_gflops()
        for size in args.sizes.split(","):
            fwd = cost(parse_size(size), 8, 77, 384).flops
            ours = cached(size, args.steps, args.batch, tmp / "cache", tmp / f"run-{size}")
            base = on_the_fly(size, args.steps, args.batch, str(tmp / "ae"))
            gfs = 3 * fwd * ours / 1e9
            results[size] = {
                "cache_images_per_s": round(ours, 1),
                "on_the_fly_images_per_s": round(base, 1),
                "ratio": round(ours / base, 2),
                "achieved_gflops": round(gfs, 1),
                "fraction_of_peak": round(gfs / peak, 3),
            }
            print(size, results[size], flush=True)
    finally:
        shutil.rmtree(tmp)
    record(
        "train_cache",
        {
            "baseline": "on-the-fly encoding (diffusers train_text_to_image.py loop)",
            "batch": args.batch,
            "matmul_peak_gflops": round(peak, 1),
            "sizes": results,
        },
    )


if __name__ == "__main__":
    main()
