"""The latent cache: every image and caption encoded once, so training never touches images again.

Layout of a cache folder:
  prepare.json                  the settings it was made with (a resumed prepare must match them)
  {split}/shard-00000.safetensors
      mean, std   float16 [N, c, h, w]   posterior of the autoencoder (unscaled)
      text        float16 [N, L, D]      token states (trimmed to the shard's longest caption when the
                                          encoder zero-pads; padded back with zeros on read)
      text_len    int32 [N]              tokens per caption (the attention mask)
      label       int64 [N]              class label, -1 if none
      metadata: start/end source positions, keys, captions, skipped items
  index.json                    each shard's bytes, sha256 and source positions, updated as each shard is written
  manifest.json                 written last: counts per split, resolution, encoders, scaling factor
  skipped.json                  every unreadable item with its error
  damaged/                      shards found damaged, set aside when they were encoded again

Each shard is written atomically and records which source positions it consumed, so a killed prepare
resumes at the next position with nothing duplicated or lost. Loading a split checks its shards against the
index; a prepare into an existing cache encodes again only the shards that fail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldmscale import integrity
from ldmscale.config import to_dict
from ldmscale.data.batch import Batch
from ldmscale.data.config import PrepareConfig
from ldmscale.data.shard_index import (
    INDEX,
    MANIFEST,
    damaged_files,
    file_damage,
    index_add,
    indexed,
    shard_meta,
    shard_range,
    shards,
)
from ldmscale.data.text import load_text_encoder
from ldmscale.device import on
from ldmscale.errors import UserError
from ldmscale.io import DirLock, atomic_write, atomic_write_json, check_output
from ldmscale.progress import bar as progress_bar

REPAIR = (
    "`ldmscale verify {cache} --repair` (or the same `ldmscale data prepare` again) encodes only what is damaged again"
)


def _settings(cfg: PrepareConfig) -> dict:
    d = to_dict(cfg)
    d.pop("batch_size")  # does not change the result
    return d


def _write_shard(
    path: Path, mean, std, states, masks, labels, keys, captions, skipped, start, end, zero_pad, truncated: int = 0
) -> None:
    n = len(keys)
    lengths = masks.sum(1).to(torch.int32) if n else torch.zeros(0, dtype=torch.int32)
    if zero_pad and n:
        states = states[:, : max(1, int(lengths.max()))]
    tensors = {
        "mean": mean.to(torch.float16).contiguous(),
        "std": std.to(torch.float16).contiguous(),
        "text": states.to(torch.float16).contiguous(),
        "text_len": lengths.contiguous(),
        "label": torch.as_tensor(labels, dtype=torch.int64),
    }
    meta = {"start": start, "end": end, "keys": keys, "captions": captions, "skipped": skipped, "truncated": truncated}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))


def prepare(cfg: PrepareConfig, out: str | Path, progress: bool = True) -> dict:
    """Encode a source into a cache at `out`; resumes a partial one, under the cache's lock. Returns the manifest."""

    check_output(out, "cache")
    with DirLock(out, "latent cache"):
        return _prepare(cfg, Path(out), progress)


def encoders(cfg: PrepareConfig):
    """The autoencoder and the text encoder of a prepare, on the device."""
    from ldmscale.data.autoencoder import load_autoencoder

    text = load_text_encoder(cfg.text_encoder, cfg.max_length)
    text.model = on(text.model)
    return on(load_autoencoder(cfg.autoencoder)), text


def _prepare(cfg: PrepareConfig, out: Path, progress: bool) -> dict:
    from ldmscale.data import autoencoder as ae
    from ldmscale.data import sources as data

    out = Path(out)
    src = data.parse_source(cfg.source)
    settings = _settings(cfg)
    if (out / "prepare.json").exists():
        try:
            old = integrity.read_json(out / "prepare.json", "cache settings")
        except ValueError as e:
            raise UserError(f"{e}; the cache's settings are unknown: use a new --out folder") from None
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UserError(
                f"{out} holds a cache prepared with other settings ({', '.join(diff)} differ); use a new --out folder"
            )
        if not file_damage(out, MANIFEST) and indexed(out) and not damaged_files(out):
            return json.loads((out / MANIFEST).read_text())
    vae, text = encoders(cfg)
    enc = _Encoder(cfg, vae, text, ae.check_resolution(vae, cfg.resolution), int(vae.config.in_channels))
    atomic_write_json(out / "prepare.json", settings)
    for stale in out.rglob(".shard-*.tmp"):
        stale.unlink()  # a temp file from a prepare killed mid-write
    _reencode_damaged(out, src, enc, progress)

    split_names = data.splits(src)
    totals = {s: data.count(src, s) for s in split_names}
    if cfg.limit:
        totals = {s: min(cfg.limit, n) if n is not None else cfg.limit for s, n in totals.items()}
    t0 = time.time()
    for split in split_names:
        sdir = out / split
        sdir.mkdir(parents=True, exist_ok=True)
        done = shards(sdir)
        pos = shard_range(out, done[-1], done)[1] if done else 0
        if cfg.limit and pos >= cfg.limit:
            continue
        bar = progress_bar(total=totals[split], initial=pos, desc=f"prepare {split}", unit="img", enabled=progress)
        items, exhausted = data.iterate(src, split, start=pos), False
        while not exhausted:
            want = cfg.shard_size if not cfg.limit else min(cfg.shard_size, cfg.limit - pos)
            if want <= 0:
                break
            start = pos
            pos, exhausted = enc.shard(
                items, out, sdir / f"shard-{len(shards(sdir)):05d}.safetensors", start, want, bar
            )
        bar.close()
        metas = [shard_meta(p) for p in shards(sdir)]
        if not metas and split == "validation" and data.count(src, split) is None:  # a stream of < HOLDOUT items
            sdir.rmdir()
            continue
        if not any(m["keys"] for m in metas):  # nothing to train or evaluate on: refuse to call it a cache
            skipped = [x for m in metas for x in m["skipped"]]
            why = f"; e.g. {skipped[0]['key']}: {skipped[0]['error']}" if skipped else ""
            raise UserError(
                f"source {src} split {split!r} has no readable image ({len(skipped)} item(s) skipped"
                f"{why}); the cache at {out} is left incomplete"
            )
        if not any(c for m in metas for c in m["captions"]):
            raise UserError(
                f"source {src} split {split!r} has no captions (a folder needs metadata.jsonl with "
                "file_name and text, or captions.csv); a text-to-image cache needs them"
            )
    return _finish(out, cfg, src, vae, text, enc.side, enc.channels, enc.encoded, time.time() - t0)


class _Encoder:
    """Encodes runs of source items into shards (images through the autoencoder, captions through the text
    encoder) and records each shard in the cache's index."""

    def __init__(self, cfg: PrepareConfig, vae, text, side: int, channels: int):
        self.cfg, self.vae, self.text, self.side, self.channels, self.encoded = cfg, vae, text, side, channels, 0

    def shard(self, items, out: Path, path: Path, start: int, want: int, bar=None) -> tuple[int, bool]:
        """Encode up to `want` items of `items` (which is at source position `start`) into the shard at `path`;
        returns (the next position, whether the source ran out)."""
        from ldmscale.data import autoencoder as ae
        from ldmscale.data import sources as data

        cfg, text, pos, exhausted = self.cfg, self.text, start, True
        imgs, keys, caps, labels, skipped = [], [], [], [], []
        for item in items:
            pos += 1
            if item.image is None:
                skipped.append({"key": item.key, "error": item.error})
            else:
                try:
                    imgs.append(data.preprocess(item.image, cfg.resolution, self.channels))
                    keys.append(item.key)
                    caps.append(item.caption)
                    labels.append(item.label)
                except Exception as e:  # e.g. a palette image PIL cannot convert
                    skipped.append({"key": item.key, "error": f"{type(e).__name__}: {e}"})
            if pos - start >= want:
                exhausted = False
                break
        if pos == start:
            return pos, True
        if imgs:
            mean, std = ae.encode(self.vae, ae.to_float(np.stack(imgs)), cfg.batch_size)
            states, masks = text.encode(caps, cfg.batch_size)
        else:
            mean = std = torch.zeros(0, self.vae.config.latent_channels, self.side, self.side)
            states, masks = torch.zeros(0, cfg.max_length, text.dim), torch.zeros(0, cfg.max_length, dtype=torch.bool)
        cut = text.truncated(caps)
        _write_shard(path, mean, std, states, masks, labels, keys, caps, skipped, start, pos, text.zero_pad, cut)
        index_add(out, path, start, pos)
        self.encoded += len(imgs)
        if bar is not None:
            bar.update(pos - start)
            if cut:
                bar.write(
                    f"{cut} caption(s) in {path.parent.name} are longer than {cfg.max_length} tokens and were truncated"
                )
            if skipped:
                bar.write(
                    f"skipped {len(skipped)} unreadable item(s) in {path.parent.name}, e.g. {skipped[0]['key']}: "
                    f"{skipped[0]['error']}"
                )
        return pos, exhausted


# ------------------------------------------------------------------------------------------ integrity


def _reencode_damaged(out: Path, src, enc: _Encoder, progress: bool) -> None:
    """Re-encode every damaged shard from its source positions (the damaged file is moved to CACHE/damaged/)."""
    from ldmscale.data import sources as data

    for path, what in damaged_files(out):
        if path.name == "empty_caption.safetensors":
            continue  # _finish() writes it again
        start, end = shard_range(out, path, sorted(set(shards(path.parent)) | {path}))
        dest = integrity.set_aside(path, out / "damaged" / path.parent.name)
        if end is None:  # the last shard of its split: the resume below encodes from its start
            integrity.note(
                f"cache shard {path} is damaged ({what}); moved to {dest}; encoding again from position {start}"
            )
            continue
        integrity.note(
            f"cache shard {path} is damaged ({what}); moved to {dest}; encoding positions {start}-{end} again"
        )
        enc.shard(data.iterate(src, path.parent.name, start=start), out, path, start, end - start)
    if not indexed(out):  # a damaged or missing index (a cache from before it): recorded again from intact shards
        if file_damage(out, INDEX):
            integrity.set_aside(out / INDEX, out / "damaged")
        for d in (d for d in out.iterdir() if d.is_dir()):
            for path in shards(d):
                index_add(out, path, *shard_range(out, path, shards(d)))


def _finish(out, cfg, src, vae, text, latent_side, channels, encoded, seconds) -> dict:
    from ldmscale.data import autoencoder as ae
    from ldmscale.data import sources as data

    splits, skipped_all, truncated = {}, [], 0
    for sdir in sorted(p for p in out.iterdir() if p.is_dir() and shards(p)):
        metas = [shard_meta(s) for s in shards(sdir)]
        skipped = [dict(s, split=sdir.name) for m in metas for s in m["skipped"]]
        skipped_all += skipped
        truncated += sum(m.get("truncated", 0) for m in metas)
        splits[sdir.name] = {
            "count": sum(len(m["keys"]) for m in metas),
            "skipped": len(skipped),
            "shards": [s.name for s in shards(sdir)],
        }
    empty_states, _ = text.encode([""])
    manifest = {
        "format": "ldmscale-latent-cache-v1",
        "source": str(src),
        "resolution": cfg.resolution,
        "channels": channels,
        "latent_shape": [int(vae.config.latent_channels), latent_side, latent_side],
        "autoencoder": ae.identity(vae, cfg.autoencoder),
        "text_encoder": text.identity(),
        "context_len": cfg.max_length,
        "context_dim": text.dim,
        "splits": splits,
        "total": sum(s["count"] for s in splits.values()),
        "validation": data.validation_rule(src)
        if "validation" in splits
        else f"none: fewer than {data.HOLDOUT} items to hold one out",
        "skipped_total": len(skipped_all),
        "truncated_captions": truncated,
        "encoded_this_run": encoded,
        "seconds_this_run": round(seconds, 2),
        "images_per_second": round(encoded / seconds, 1) if seconds > 0 and encoded else None,
    }
    empty = {"text": empty_states[0].to(torch.float16).contiguous()}
    atomic_write(out / "empty_caption.safetensors", lambda tmp: save_file(empty, tmp))
    index_add(out, out / "empty_caption.safetensors")
    atomic_write_json(out / "skipped.json", skipped_all)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def latent_shapes(cache_dir: str | Path) -> dict:
    """The latent and text-context shapes of a latent cache, from its manifest (FLOP counts need no more)."""
    m = read_manifest(cache_dir)
    c, h, _ = m["latent_shape"]
    return {"latent": h, "channels": c, "ctx_len": m["context_len"], "ctx_dim": m["context_dim"]}


def read_manifest(cache_dir: str | Path) -> dict:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"latent cache not found: {cache_dir}")
    if not (cache_dir / MANIFEST).exists():
        if (cache_dir / "prepare.json").exists():
            raise UserError(
                f"latent cache {cache_dir} is incomplete: run the same `ldmscale data prepare` again to finish it"
            )
        raise UserError(f"{cache_dir} is not a latent cache (no {MANIFEST}); make one with `ldmscale data prepare`")
    bad = file_damage(cache_dir, MANIFEST)
    if bad:
        raise UserError(
            f"latent cache manifest {cache_dir / MANIFEST} is damaged ({bad}); {REPAIR.format(cache=cache_dir)}"
        )
    return json.loads((cache_dir / MANIFEST).read_text())


class LatentCache:
    """One split of a cache in memory (float16), with batched gathers for the training loop."""

    def __init__(self, cache_dir: str | Path, split: str = "train"):

        self.dir, self.split = Path(cache_dir), split
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise UserError(
                f"latent cache {self.dir} has no split {split!r}; splits: {', '.join(self.manifest['splits'])}"
            )
        self.context_len = int(self.manifest["context_len"])
        for path, what in damaged_files(self.dir, split)[:1]:
            raise UserError(f"latent cache shard {path} is damaged ({what}); {REPAIR.format(cache=self.dir)}")
        parts = [load_file(str(p)) for p in shards(self.dir / split)]
        parts = [p for p in parts if len(p["label"])]
        self.mean = torch.cat([p["mean"] for p in parts])
        self.std = torch.cat([p["std"] for p in parts])
        self.labels = torch.cat([p["label"] for p in parts])
        self.text_len = torch.cat([p["text_len"] for p in parts])
        self.text = torch.cat([_pad(p["text"], self.context_len) for p in parts])
        self.captions = [c for s in shards(self.dir / split) for c in shard_meta(s)["captions"]]
        self.empty_text = load_file(str(self.dir / "empty_caption.safetensors"))["text"]
        if self.manifest["text_encoder"].get("zero_pad"):
            self.empty_mask = self.empty_text.float().abs().sum(-1) > 0
        else:
            self.empty_mask = torch.ones(self.context_len, dtype=torch.bool)
        self.scaling_factor = float(self.manifest["autoencoder"]["scaling_factor"])
        self.shift_factor = float(self.manifest["autoencoder"].get("shift_factor", 0.0))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, latent_noise: torch.Tensor | None = None, seeds: torch.Tensor | None = None):
        """Scaled latents float32 [B,c,h,w], text states float32 [B,L,D] and text mask bool [B,L] as a Batch.

        With `latent_noise` (standard normal, the latents' shape) z is a posterior sample, else its mean."""
        mean = self.mean[idx].float()
        z = mean if latent_noise is None else mean + self.std[idx].float() * latent_noise
        z = (z - self.shift_factor) * self.scaling_factor
        mask = torch.arange(self.context_len)[None] < self.text_len[idx, None]
        return Batch(z, self.text[idx].float(), mask)


def _pad(states: torch.Tensor, length: int) -> torch.Tensor:
    if states.shape[1] >= length:
        return states[:, :length]
    pad = torch.zeros(states.shape[0], length - states.shape[1], states.shape[2], dtype=states.dtype)
    return torch.cat([states, pad], 1)
