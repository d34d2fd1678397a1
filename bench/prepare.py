"""`data prepare` throughput on animal-mnist vs a naive loop (every caption encoded at full 77-token length).

Baseline ("naive"): the same autoencoder and MiniLM, each batch encoded as is, captions padded to 77 tokens,
no de-duplication: what a straightforward cache writer does. Both write nothing but the encodings compared.
Run: .venv/bin/python bench/prepare.py [--images N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import record

from ldmscale.data import autoencoder as ae
from ldmscale.data import sources as data
from ldmscale.data.cache import prepare
from ldmscale.data.config import PrepareConfig
from ldmscale.data.text import load_text_encoder


def naive(images: int, ae_dir: str, batch: int = 250) -> float:
    vae = ae.load_autoencoder(ae_dir)
    text = load_text_encoder("minilm")
    src = data.parse_source("animal-mnist")
    items = [it for _, it in zip(range(images), data.iterate(src, "train"))]
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            x = ae.to_float(np.stack([data.preprocess(it.image, 32, 1) for it in chunk]))
            ae.encode(vae, x)
            tok = text.tokenizer(
                [it.caption for it in chunk], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            text.model(**tok)
    return len(items) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        from ldmscale.data.autoencoder import build_autoencoder
        from ldmscale.data.config import AutoencoderConfig

        vae = build_autoencoder(AutoencoderConfig(channels=1))  # the default architecture, grayscale as animal-mnist
        vae.register_to_config(scaling_factor=0.5)
        vae.save_pretrained(tmp / "ae")
        cfg = PrepareConfig(source="animal-mnist", autoencoder=str(tmp / "ae"), resolution=32, limit=args.images)
        t = time.perf_counter()
        m = prepare(cfg, tmp / "cache", progress=False)
        ours = m["total"] / (time.perf_counter() - t)
        base = naive(args.images, str(tmp / "ae"))
    finally:
        shutil.rmtree(tmp)
    record(
        "prepare",
        {
            "images": m["total"],
            "ldmscale_images_per_s": round(ours, 1),
            "baseline": "naive loop (full-length captions, no de-duplication)",
            "baseline_images_per_s": round(base, 1),
            "ratio": round(ours / base, 2),
        },
    )


if __name__ == "__main__":
    main()
