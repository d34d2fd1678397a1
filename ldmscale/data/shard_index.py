"""The integrity side of a latent cache: its shards, the index that records each one (bytes, sha256, source
positions) as it is written, and the checks a read makes against it."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ldmscale import integrity
from ldmscale.io import atomic_write_json

MANIFEST = "manifest.json"
INDEX = "index.json"  # each shard's bytes, sha256 and source positions, written as the shard is


def shards(split_dir: Path) -> list[Path]:
    return sorted(split_dir.glob("shard-*.safetensors"))


def shard_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def read_index(out: Path) -> dict:
    """{shard path relative to the cache: {bytes, sha256, start, end}}; {} when missing or damaged (the shards are
    then checked by their structure)."""
    try:
        idx = integrity.read_json(Path(out) / INDEX, "cache index")
    except (ValueError, OSError):
        return {}
    ok = all(
        k.endswith(".safetensors") and isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for k, v in idx.items()
    )
    return idx if ok else {}


def file_damage(out: Path, name: str) -> str:
    """What is wrong with a cache's manifest or index (the shards: damaged_files), "" when intact or absent."""
    path = Path(out) / name
    if not path.exists():
        return (
            "missing: the cache is incomplete (the same `ldmscale data prepare` finishes it)"
            if name == MANIFEST
            else ""
        )
    bad = integrity.json_damage(path)
    if bad:
        return bad
    data = json.loads(path.read_text())
    if name == MANIFEST and (not isinstance(data, dict) or data.get("format") != "ldmscale-latent-cache-v1"):
        return "not a latent cache manifest"
    if name == INDEX and data and not read_index(out):
        return "not a shard index"
    return ""


def index_add(out: Path, path: Path, start: int | None = None, end: int | None = None) -> None:
    idx = read_index(out)
    idx[str(path.relative_to(out))] = integrity.record(path) | (
        {"start": start, "end": end} if start is not None else {}
    )
    atomic_write_json(out / INDEX, idx)


def shard_range(out: Path, path: Path, shards: list[Path]) -> tuple[int, int | None]:
    """The source positions a shard holds: from the index, else from its own metadata, else from its neighbours'
    (the end of the last shard of a split, if damaged, is unknown: None)."""
    rec = read_index(out).get(str(path.relative_to(out)), {})
    if "start" in rec:
        return int(rec["start"]), int(rec["end"])
    if not integrity.safetensors_damage(path):
        m = shard_meta(path)
        return int(m["start"]), int(m["end"])
    i = shards.index(path)
    start = shard_range(out, shards[i - 1], shards)[1] if i else 0
    return int(start or 0), shard_range(out, shards[i + 1], shards)[0] if i + 1 < len(shards) else None


def damaged_files(out: str | Path, split: str | None = None) -> list[tuple[Path, str]]:
    """(file, what is wrong) for every shard (of `split` when given) and the empty-caption file of a cache that fail
    their record."""
    out, idx = Path(out), read_index(Path(out))
    inside = {out / rel for rel in idx if (out / rel).resolve().is_relative_to(out.resolve())}  # never a path elsewhere
    found = inside | {p for d in out.iterdir() if d.is_dir() for p in shards(d)}
    if split is not None:
        found = {p for p in found if p.parent.name == split or p.parent == out}
    bad = []
    for p in sorted(found):
        what = integrity.damage(p, idx.get(str(p.relative_to(out))))
        if what:
            bad.append((p, what))
    return bad


def indexed(out: Path) -> bool:
    """Every shard of the cache has its record in the index."""
    idx = read_index(out)
    return all(str(p.relative_to(out)) in idx for d in out.iterdir() if d.is_dir() for p in shards(d))
