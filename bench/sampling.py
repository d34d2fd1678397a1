"""Sampling throughput: `ldmscale sample`'s loop vs diffusers' StableDiffusionPipeline on the same exported
model, sampler (DDIM), steps, guidance and batch, in one run. Both use batched classifier-free guidance.

The model is a `cpu`-preset size with random weights (speed does not depend on them), trained for one step
so that it is a real run directory; the baseline loads the `ldmscale export` of that run.
Run: .venv/bin/python bench/sampling.py [--size c16] [--steps 20] [--images 64]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, matmul_peak_gflops, record, tiny_run

sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from ldmscale.diffusion.export import export
    from ldmscale.diffusion.generate import encode_prompts, generate, load_run

    p = argparse.ArgumentParser()
    p.add_argument("--size", default="c16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        tiny_run(tmp, args.size)
        export(tmp / "run", tmp / "export")
        model = load_run(tmp / "run")
        prompts = ["a cat"] * args.images
        seeds = list(range(args.images))
        generate(model, prompts[:4], "ddim", 2, args.guidance, seeds[:4])  # warm-up
        t = time.perf_counter()
        generate(model, prompts, "ddim", args.steps, args.guidance, seeds, batch_size=args.images)
        ours = args.images / (time.perf_counter() - t)
        pipe = StableDiffusionPipeline.from_pretrained(
            tmp / "export", safety_checker=None, requires_safety_checker=False, trust_remote_code=True
        )  # the MiniLM text encoder ships as code
        pipe.set_progress_bar_config(disable=True)
        cond, uncond = encode_prompts(model, prompts[:1])
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kw = dict(
            prompt_embeds=cond.expand(args.images, -1, -1),
            negative_prompt_embeds=uncond.expand(args.images, -1, -1),
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="np",
        )
        pipe(**(kw | {"num_inference_steps": 2}), generator=gens)
        t = time.perf_counter()
        pipe(**kw, generator=gens)
        base = args.images / (time.perf_counter() - t)
        fwd = model.config["accounting"]["forward_flops"]
        calls = args.steps * 2
        peak = matmul_peak_gflops()
    finally:
        shutil.rmtree(tmp)
    record(
        "sampling",
        {
            "size": args.size,
            "sampler": "ddim",
            "steps": args.steps,
            "guidance": args.guidance,
            "batch": args.images,
            "ldmscale_images_per_s": round(ours, 2),
            "baseline": "diffusers StableDiffusionPipeline on the exported run",
            "baseline_images_per_s": round(base, 2),
            "ratio": round(ours / base, 3),
            "fraction_of_peak": round(ours * calls * fwd / 1e9 / peak, 3),
            "matmul_peak_gflops": round(peak, 1),
        },
    )


if __name__ == "__main__":
    main()
