"""Shared bits of the bench scripts: a float32 matmul peak measured in the same run, and result recording."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results.json"


def matmul_peak_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """This machine's float32 matmul throughput (GFLOP/s), at the threads torch uses, measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t
        best = max(best, 4 * 2 * n**3 / dt / 1e9)
    return best


def record(name: str, result: dict) -> None:
    """Merge one bench's result into bench/results.json (read by `make bench`'s table)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result = dict(
        result, threads=torch.get_num_threads(), cpu_count=os.cpu_count(), when=time.strftime("%Y-%m-%d %H:%M:%S")
    )
    data[name] = result
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({name: result}, indent=2))


def untrained_cache(tmp: Path, images: int) -> Path:
    """A latent cache of `images` animal-mnist images under an untrained autoencoder (speed does not depend on its
    weights)."""
    from ldmscale.data import autoencoder as ae
    from ldmscale.data.cache import prepare
    from ldmscale.data.config import PrepareConfig

    vae = ae.build_autoencoder(ae.AutoencoderConfig(channels=1))  # animal-mnist is grayscale
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp / "ae")
    prepare(
        PrepareConfig(source="animal-mnist", autoencoder=str(tmp / "ae"), resolution=32, limit=images),
        tmp / "cache",
        progress=False,
    )
    return tmp / "cache"


def tiny_run(tmp: Path, size: str = "c16", warmup_steps: int = 100) -> Path:
    """A real run directory of `size` with random weights trained one step (speed does not depend on the weights),
    on a 64-image animal-mnist cache with an untrained tiny autoencoder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import make_autoencoder

    from ldmscale.data.cache import prepare
    from ldmscale.data.config import PrepareConfig
    from ldmscale.train.config import TrainConfig
    from ldmscale.train.loop import train

    make_autoencoder(tmp / "ae")
    prepare(
        PrepareConfig(source="animal-mnist", autoencoder=str(tmp / "ae"), resolution=32, limit=64),
        tmp / "cache",
        progress=False,
    )
    train(
        TrainConfig(data=str(tmp / "cache"), size=size, images=8, batch_size=8, warmup_steps=warmup_steps),
        tmp / "run",
        progress=False,
    )
    return tmp / "run"
