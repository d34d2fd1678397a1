"""Reference images for evaluation: SOURCE[:SPLIT] specs and their feature statistics, cached per (source, split,
resolution, count, extractor) and refused when they do not match."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ldmscale.errors import UserError
from ldmscale.eval import metrics
from ldmscale.io import atomic_write
from ldmscale.progress import bar


def parse_reference(spec: str) -> tuple[object, str]:
    from ldmscale.data.sources import parse_source, splits

    base, _, split = (
        spec.rpartition(":") if spec.rsplit(":", 1)[-1] in ("train", "validation", "test") else (spec, "", "")
    )
    src = parse_source(base)
    names = splits(src)
    split = split or ("validation" if "validation" in names else names[0])
    if split not in names:
        raise UserError(f"reference {spec!r}: no split {split!r}; splits: {', '.join(names)}")
    return src, split


def canonical_reference(spec: str) -> str:
    """'animal-mnist' -> 'animal-mnist:validation': the reference with its split spelled out."""
    src, split = parse_reference(spec)
    return f"{src}:{split}"


def _cache_root() -> Path:
    root = os.environ.get("LDMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldmscale")
    return Path(root) / "refstats"


def reference_stats(
    cfg, extractor, resolution: int, channels: int, stats_file: str = "", progress: bool = False
) -> tuple[metrics.FeatureStats, dict]:
    """Reference statistics for one extractor (cfg: an EvalConfig): from the cache, computed once, or from a file."""
    from safetensors.torch import load_file, save_file

    from ldmscale.data.sources import load_images

    src, split = parse_reference(cfg.reference)
    want = {
        "source": str(src),
        "split": split,
        "resolution": resolution,
        "channels": channels,
        "count": cfg.reference_count or "all",
        "extractor": extractor.identity,
    }
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(stats_file) if stats_file else _cache_root() / f"{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            have = json.loads(f.metadata()["manifest"])
        bad = metrics.stats_manifest_matches(have, want)
        if bad:
            raise UserError(
                f"reference statistics {path} do not match this evaluation ({', '.join(bad)} differ: "
                f"{[have.get(k) for k in bad]} vs {[want[k] for k in bad]})"
            )
        return metrics.FeatureStats.from_tensors(load_file(str(path))), have
    if stats_file:
        raise UserError(f"reference statistics file not found: {stats_file}")
    images, _, _ = load_images(src, split, resolution, channels, cfg.reference_count or None)

    stats = metrics.FeatureStats(extractor.num_features)
    for i in bar(range(0, len(images), cfg.batch_size), enabled=progress, desc="reference stats", unit="batch"):
        stats.update(extractor(torch.as_tensor(images[i : i + cfg.batch_size])))
    manifest = want | {"images": stats.n, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(path, lambda tmp: save_file(stats.to_tensors(), tmp, metadata={"manifest": json.dumps(manifest)}))
    return stats, manifest
