"""Does a super-resolution fine-tune use its low-resolution input? Fine-tunes one text-to-image run with the given
settings and prints, on the validation split, PSNR against the high-resolution image and consistency (the output
brought back down by the same 4x bicubic, against the input) at each step count, beside bicubic upsampling and a
model fed another image's input (what ignoring the input scores).

    python bench/sr_diagnose.py --init demo/runs/c16 --images 8000 --out /tmp/sr-a
    python bench/sr_diagnose.py --init demo/runs/c16 --images 8000 --out /tmp/sr-b --sr condition=latent
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from ldmscale.eval.metrics import psnr_ssim

    return psnr_ssim(a, b)["psnr"]


def main() -> None:
    from ldmscale.config import apply_overrides
    from ldmscale.data.degrade import degrade, resize
    from ldmscale.data.sources import load_images, parse_source
    from ldmscale.diffusion.generate import load_run
    from ldmscale.tasks.config import SRConfig
    from ldmscale.tasks.superres import finetune_sr, upscale
    from ldmscale.train.config import TrainConfig

    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--sr", nargs="*", default=[], help="SRConfig KEY=VALUE")
    p.add_argument("--train", nargs="*", default=[], help="TrainConfig KEY=VALUE")
    p.add_argument("--steps", default="1,4,16")
    p.add_argument("--num-images", type=int, default=200)
    a = p.parse_args()

    init = json.loads((Path(a.init) / "config.json").read_text())["train"]
    base = TrainConfig(
        size=init["size"],
        images=a.images,
        batch_size=32,
        lr=1e-3,
        warmup_steps=50,
        lr_schedule="cosine",
        checkpoint_every=0,
        data="animal-mnist",
    )  # the study's [train.set]
    tcfg = apply_overrides(base, a.train)
    sr = apply_overrides(SRConfig(init=a.init, data="animal-mnist"), a.sr)
    t0 = time.perf_counter()
    finetune_sr(sr, tcfg, a.out, progress=False)
    seconds = time.perf_counter() - t0
    model = load_run(a.out)
    w = model.unet.conv_in.weight.detach()
    c = model.latent_shape[0]
    hr, caps, _ = load_images(parse_source("animal-mnist"), "validation", 32, 1, a.num_images)
    hr = torch.as_tensor(hr)
    seeds = list(range(len(hr)))
    low = degrade(hr, sr.scale, sr.degradation, seeds)
    bic = resize(low, hr.shape[-1], "bicubic")
    print(f"{a.out}: {tcfg.images} images in {seconds:.0f} s; sr {a.sr} train {a.train}")
    print(f"  conv_in |w| per input channel: latent {w[:, :c].abs().mean():.4f}, condition {w[:, c:].abs().mean():.4f}")
    print(f"  bicubic: psnr {psnr(bic, hr):.2f} consistency {psnr(degrade(bic, sr.scale, 'bicubic', seeds), low):.2f}")
    from ldmscale.data.autoencoder import decode, encode
    from ldmscale.images import to_float, to_uint8

    sf = float(model.vae.config.scaling_factor)
    rec = to_uint8(
        decode(model.vae, encode(model.vae, to_float(hr))[0] * sf)
    )  # the ceiling: the autoencoder's own loss
    print(
        f"  autoencoder reconstruction: psnr {psnr(rec, hr):.2f} consistency "
        f"{psnr(degrade(rec, sr.scale, 'bicubic', seeds), low):.2f}"
    )
    for steps in [int(s) for s in a.steps.split(",")]:
        out, _ = upscale(model, low, caps, seeds, "ddim", steps, 1.0, 100, "trailing")
        other, _ = upscale(model, low.roll(1, 0), caps, seeds, "ddim", steps, 1.0, 100, "trailing")
        print(
            f"  ddim {steps:2d}: psnr {psnr(out, hr):.2f} "
            f"consistency {psnr(degrade(out, sr.scale, 'bicubic', seeds), low):.2f}"
            f" | another image's input: psnr {psnr(other, hr):.2f}"
        )


if __name__ == "__main__":
    main()
