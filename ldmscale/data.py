"""Data sources: each yields (image, caption) items in a fixed order, by split.

Source specs:
  animal-mnist        the 10,000 28x28 silhouettes shipped in the `animal-mnist` package (10 classes)
  folder:PATH         image folder + metadata.jsonl (file_name, text) or captions.csv; optional split subfolders
  wds:PATTERN         WebDataset tar shards (jpg/png + txt, img2dataset's layout); braces or globs
  hf:NAME[:SPLIT]     a Hugging Face dataset (hub id, local dataset dir, or a save_to_disk folder)

An unreadable image still yields an item, with `error` set, so that callers can skip and report it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ldmscale.config import UserError

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_TEMPLATES = ("a {}", "a photo of a {}", "a silhouette of a {}", "a black and white picture of a {}",
                    "the shape of a {}")
ANIMAL_VAL_PER_CLASS = 100  # fixed split: 100 per class for validation, 900 per class for training
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Item:
    key: str
    image: Image.Image | None
    caption: str
    label: int = -1
    error: str = ""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # animal-mnist | folder | wds | hf
    arg: str = ""
    split: str = ""  # hf: the dataset split to read

    def __str__(self) -> str:
        return {"animal-mnist": "animal-mnist"}.get(self.kind, f"{self.kind}:{self.arg}" + (f":{self.split}" if self.split else ""))


def parse_source(spec: str) -> SourceSpec:
    spec = spec.strip()
    if spec == "animal-mnist":
        return SourceSpec("animal-mnist")
    kind, _, arg = spec.partition(":")
    if kind == "folder" and arg:
        if not Path(arg).is_dir():
            raise UserError(f"source {spec!r}: folder not found: {arg}")
        return SourceSpec("folder", arg)
    if kind == "wds" and arg:
        if not _wds_urls(arg):
            raise UserError(f"source {spec!r}: no tar shards match {arg}")
        return SourceSpec("wds", arg)
    if kind == "hf" and arg:
        name, _, split = arg.partition(":") if not os.path.exists(arg) else (arg, "", "")
        return SourceSpec("hf", name, split)
    raise UserError(f"unknown source {spec!r}: use animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT]")


# ---------------------------------------------------------------------------------------- animal-mnist


def _animal_dir() -> Path:
    import importlib.util

    found = importlib.util.find_spec("animal_mnist")  # locate only: its __init__ imports tensorflow
    if found is None or not found.submodule_search_locations:
        raise UserError("the animal-mnist package is not installed (pip install --no-deps animal-mnist)")
    return Path(list(found.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


@lru_cache(maxsize=1)
def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [10000, 28, 28], white silhouettes on black; labels int64 [10000])."""
    root = _animal_dir()
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    return images, labels


@lru_cache(maxsize=1)
def animal_mnist_split_indices() -> dict[str, np.ndarray]:
    """The fixed split: per class, a seeded permutation puts 100 in validation, 900 in train; each split in a
    fixed shuffled order."""
    _, labels = animal_mnist_arrays()
    rng = np.random.default_rng(20240401)
    train, val = [], []
    for c in range(len(ANIMAL_CLASSES)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[:ANIMAL_VAL_PER_CLASS])
        train.append(idx[ANIMAL_VAL_PER_CLASS:])
    # the files are sorted by class; a fixed shuffle makes every prefix (a --limit, the first N prompts of an
    # evaluation) a class-balanced sample
    return {"train": rng.permutation(np.concatenate(train)), "validation": rng.permutation(np.concatenate(val))}


def animal_caption(index: int, label: int) -> str:
    template = ANIMAL_TEMPLATES[int(hashlib.md5(str(index).encode()).hexdigest(), 16) % len(ANIMAL_TEMPLATES)]
    return template.format(ANIMAL_CLASSES[label])


def class_prompt(label: int) -> str:
    """The canonical prompt for a class (used for sampling and caption accuracy)."""
    return f"a {ANIMAL_CLASSES[label]}"


def label_of_prompt(prompt: str, classes: tuple[str, ...] = ANIMAL_CLASSES) -> int:
    """The class a prompt names (the last class word in it), or -1."""
    words = prompt.lower().replace(",", " ").split()
    found = [classes.index(w) for w in words if w in classes]
    return found[-1] if found else -1


def _iter_animal(split: str, start: int) -> Iterator[Item]:
    images, labels = animal_mnist_arrays()
    for i in animal_mnist_split_indices()[split][start:]:
        i = int(i)
        yield Item(f"am-{i:05d}", Image.fromarray(images[i], mode="L"), animal_caption(i, int(labels[i])), int(labels[i]))


# ---------------------------------------------------------------------------------------- folder


def _folder_captions(root: Path) -> dict[str, str]:
    meta, table = root / "metadata.jsonl", root / "captions.csv"
    caps: dict[str, str] = {}
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caps[row["file_name"]] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}:{n}: each line must be a JSON object with file_name and text") from None
    elif table.is_file():
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            fcol = next((c for c in ("file_name", "file", "image", "filename") if c in cols), None)
            tcol = next((c for c in ("text", "caption") if c in cols), None)
            if not fcol or not tcol:
                raise UserError(f"{table}: needs a file_name and a text (or caption) column; has {cols}")
            caps = {row[fcol]: row[tcol] for row in reader}
    return caps


def _folder_split_dirs(root: Path) -> dict[str, Path]:
    subs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and d.name in ("train", "validation", "test")}
    return subs or {"train": root}


def _iter_folder(root: Path, split: str, start: int) -> Iterator[Item]:
    base = _folder_split_dirs(root)[split]
    caps = _folder_captions(base) or _folder_captions(root)
    if caps:
        files = sorted(caps)
    else:
        files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    for name in files[start:]:
        path = base / name
        try:
            with open(path, "rb") as f:
                data = f.read()
            yield Item(name, _decode(data), caps.get(name, ""))
        except Exception as e:  # any unreadable file is reported, never fatal
            yield Item(name, None, caps.get(name, ""), error=f"{type(e).__name__}: {e}")


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force a full decode: a truncated file fails here, not later
    return img


# ---------------------------------------------------------------------------------------- webdataset


def _wds_urls(pattern: str) -> list[str]:
    if "{" in pattern:
        import braceexpand

        urls = list(braceexpand.braceexpand(pattern))
        return [u for u in urls if os.path.exists(u)] if all(os.path.exists(u) for u in urls) else []
    return sorted(glob.glob(pattern))


def _iter_wds(pattern: str, start: int) -> Iterator[Item]:
    import webdataset as wds

    ds = wds.WebDataset(_wds_urls(pattern), shardshuffle=False, empty_check=False)
    for n, sample in enumerate(ds):
        if n < start:
            continue
        key = sample.get("__key__", str(n))
        caption = ""
        for ext in ("txt", "caption", "text"):
            if ext in sample:
                caption = sample[ext].decode("utf-8", "replace").strip()
                break
        data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if data is None:
            yield Item(key, None, caption, error="no jpg/png/webp member")
            continue
        try:
            yield Item(key, _decode(data), caption)
        except Exception as e:
            yield Item(key, None, caption, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------- Hugging Face


@lru_cache(maxsize=8)
def _hf_dataset(name: str):
    import datasets

    try:
        p = Path(name)
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name)
    except FileNotFoundError as e:
        raise UserError(f"hf:{name}: {e}") from None
    except Exception as e:
        raise UserError(f"hf:{name}: cannot load ({type(e).__name__}: {e})") from None


def _hf_splits(name: str) -> dict:
    import datasets

    ds = _hf_dataset(name)
    return dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}


def _hf_columns(ds) -> tuple[str, str]:
    cols = ds.column_names
    img = next((c for c in ("image", "img", "jpg", "png") if c in cols), None)
    txt = next((c for c in ("text", "caption", "prompt", "sentence") if c in cols), None)
    if img is None:
        raise UserError(f"hf dataset has no image column (columns: {cols})")
    return img, txt or ""


def _iter_hf(name: str, split: str, start: int) -> Iterator[Item]:
    import datasets

    ds = _hf_splits(name)[split]
    img_col, txt_col = _hf_columns(ds)
    ds = ds.cast_column(img_col, datasets.Image(decode=False))  # decode ourselves, to catch bad files
    for n in range(start, len(ds)):
        row = ds[n]
        caption = str(row[txt_col]) if txt_col else ""
        label = int(row["label"]) if isinstance(row.get("label"), int) else -1
        ref = row[img_col] or {}
        try:
            data = ref.get("bytes") or Path(ref["path"]).read_bytes()
            yield Item(str(n), _decode(data), caption, label)
        except Exception as e:
            yield Item(str(n), None, caption, label, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------- public


def splits(src: SourceSpec) -> list[str]:
    if src.kind == "animal-mnist":
        return ["train", "validation"]
    if src.kind == "folder":
        return list(_folder_split_dirs(Path(src.arg)))
    if src.kind == "wds":
        return ["train"]
    names = list(_hf_splits(src.arg))
    if src.split:
        if src.split not in names:
            raise UserError(f"hf:{src.arg}: no split {src.split!r}; splits: {', '.join(names)}")
        return [src.split]
    return names


def count(src: SourceSpec, split: str) -> int | None:
    """Number of items in a split, when known without reading it (None for tar shards)."""
    if src.kind == "animal-mnist":
        return len(animal_mnist_split_indices()[split])
    if src.kind == "hf":
        return len(_hf_splits(src.arg)[split])
    if src.kind == "folder":
        base = _folder_split_dirs(Path(src.arg))[split]
        caps = _folder_captions(base) or _folder_captions(Path(src.arg))
        return len(caps) if caps else sum(1 for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return None


def iterate(src: SourceSpec, split: str, start: int = 0) -> Iterator[Item]:
    """Items of one split in their fixed order, from position `start` (for resuming)."""
    if split not in splits(src):
        raise UserError(f"source {src}: no split {split!r}; splits: {', '.join(splits(src))}")
    if src.kind == "animal-mnist":
        return _iter_animal(split, start)
    if src.kind == "folder":
        return _iter_folder(Path(src.arg), split, start)
    if src.kind == "wds":
        return _iter_wds(src.arg, start)
    return _iter_hf(src.arg, split, start)


def preprocess(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Center-crop to a square, resize (Lanczos down, bicubic up), to uint8 [channels, H, W]."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        method = Image.LANCZOS if side > resolution else Image.BICUBIC
        img = img.resize((resolution, resolution), method)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def load_images(src: SourceSpec, split: str, resolution: int, channels: int, limit: int | None = None,
                ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A whole split in memory (small datasets, tests, reference sets): uint8 [N,C,H,W], captions, labels."""
    imgs, caps, labels = [], [], []
    for item in iterate(src, split):
        if limit is not None and len(imgs) >= limit:
            break
        if item.image is None:
            continue
        imgs.append(preprocess(item.image, resolution, channels))
        caps.append(item.caption)
        labels.append(item.label)
    if not imgs:
        raise UserError(f"source {src} split {split!r}: no readable images")
    return np.stack(imgs), caps, np.asarray(labels, dtype=np.int64)
