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
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ldmscale.data.animal_mnist import (  # noqa: F401  (re-exported: callers read every source from here)
    ANIMAL_CLASSES,
    animal_caption,
    animal_mnist_arrays,
    animal_mnist_split_indices,
    class_prompt,
    label_of_prompt,
)
from ldmscale.data.shards import shard_paths, tar_samples
from ldmscale.errors import UserError
from ldmscale.images import preprocess

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
        return {"animal-mnist": "animal-mnist"}.get(
            self.kind, f"{self.kind}:{self.arg}" + (f":{self.split}" if self.split else "")
        )


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
        if arg.startswith(("pipe:", "http:", "https:", "s3:", "gs:")):
            raise UserError(
                f"source {spec!r}: only local tar shards are read (a pipe: or URL source would run or "
                "fetch something); download the shards first"
            )
        if not shard_paths(arg):
            raise UserError(f"source {spec!r}: no tar shards match {arg}")
        return SourceSpec("wds", arg)
    if kind == "hf" and arg:
        name, _, split = arg.partition(":") if not os.path.exists(arg) else (arg, "", "")
        return SourceSpec("hf", name, split)
    raise UserError(f"unknown source {spec!r}: use animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT]")


# ---------------------------------------------------------------------------------------- animal-mnist


def _iter_animal(split: str, start: int) -> Iterator[Item]:
    images, labels = animal_mnist_arrays()
    for i in animal_mnist_split_indices()[split][start:]:
        i = int(i)
        yield Item(
            f"am-{i:05d}", Image.fromarray(images[i], mode="L"), animal_caption(i, int(labels[i])), int(labels[i])
        )


# ---------------------------------------------------------------------------------------- folder


def _folder_captions(root: Path) -> dict[str, str]:
    """{file name relative to `root`: caption} from root/metadata.jsonl or root/captions.csv ({} when neither)."""
    meta, table = root / "metadata.jsonl", root / "captions.csv"
    caps: dict[str, str] = {}
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caps[str(row["file_name"])] = str(row.get("text", row.get("caption", "")) or "")
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
            for n, row in enumerate(reader, 2):
                if not row.get(fcol):
                    raise UserError(f"{table}:{n}: the row has no {fcol}")
                caps[row[fcol]] = row.get(tcol) or ""  # a short row has no caption: an empty one
    return caps


def _folder_split_dirs(root: Path) -> dict[str, Path]:
    subs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and d.name in ("train", "validation", "test")}
    return subs or {"train": root}


def _folder_entries(root: Path, split: str) -> list[tuple[str, Path | None, str, str]]:
    """(key, path, caption, error) for every item of a split, in a fixed order: the captioned files, then the
    image files that have no caption (reported, not read). The captions come from the split folder's own
    metadata, else from the root's, whose paths are then relative to the root. A path outside the folder is an
    error item, never read."""
    base = _folder_split_dirs(root)[split]
    caps, rel = _folder_captions(base), base
    if not caps and base != root:
        caps, rel = _folder_captions(root), root
    top = base.resolve()
    images = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not caps:  # no metadata: images only (an autoencoder's data; a latent cache refuses a source without captions)
        return [
            (name, None, "", "path outside the dataset folder (not read)")
            if not (base / name).resolve().is_relative_to(top)
            else (name, base / name, "", "")
            for name in images
        ]
    out, listed = [], set()
    for name in sorted(caps):
        path = (rel / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(rel.resolve()):
            out.append((name, None, caps[name], "path outside the dataset folder (not read)"))
        elif not path.is_relative_to(top):
            continue  # root metadata: an entry of another split
        else:
            out.append((name, path, caps[name], ""))
            listed.add(str(path.relative_to(top)))
    out += [(name, None, "", "no caption in the metadata") for name in images if name not in listed]
    return out


def _iter_folder(root: Path, split: str, start: int) -> Iterator[Item]:
    for key, path, caption, error in _folder_entries(root, split)[start:]:
        if error:
            yield Item(key, None, caption, error=error)
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            yield Item(key, _decode(data), caption)
        except Exception as e:  # any unreadable file is reported, never fatal
            yield Item(key, None, caption, error=f"{type(e).__name__}: {e}")


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force a full decode: a truncated file fails here, not later
    return img


# ---------------------------------------------------------------------------------------- webdataset


def _iter_wds(pattern: str, start: int) -> Iterator[Item]:
    n = 0
    for url in shard_paths(pattern):
        for sample in tar_samples(url):
            n += 1
            if n <= start:
                continue
            key = sample["__key__"]
            if "__error__" in sample:
                yield Item(key, None, "", error=sample["__error__"])
                continue
            caption = ""
            for ext in ("txt", "caption", "text"):
                if ext in sample:
                    caption = sample[ext].decode("utf-8", "replace").strip()
                    break
            if not caption:
                yield Item(key, None, "", error="no caption (an empty or missing txt/caption/text member)")
                continue
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


# One validation rule for the autoencoder, the cache and evaluation: a source without a validation split holds out
# every HOLDOUT-th item of its training split (positions 9, 19, 29, ... of its fixed order) as "validation", so
# the held-out images are spread over the source (a folder's sorted tail may be one class) and a stream can be
# split without counting it. A split of fewer than HOLDOUT items holds nothing out.
HOLDOUT = 10


def splits(src: SourceSpec) -> list[str]:
    """The source's splits, with the held-out "validation" (validation_rule) where it has none of its own."""
    names = _own_splits(src)
    return names + ["validation"] if _holds_out(src, names) else names


def validation_rule(src: SourceSpec) -> str:
    """Where the source's validation split comes from, in words (recorded by the cache and the autoencoder)."""
    names = _own_splits(src)
    if "validation" in names:
        return "the source's own validation split"
    if _holds_out(src, names):
        return f"held out: every {HOLDOUT}th item of {_base(names)!r} (positions {HOLDOUT - 1}, {2 * HOLDOUT - 1}, ...)"
    return f"none: {_base(names)!r} has fewer than {HOLDOUT} items to hold one out"


def _base(names: list[str]) -> str:
    return "train" if "train" in names else names[0]


def _holds_out(src: SourceSpec, names: list[str]) -> bool:
    if "validation" in names:
        return False
    n = _own_count(src, _base(names))
    return n is None or n >= HOLDOUT


def _held_out_from(src: SourceSpec, split: str) -> str | None:
    """The source split that `split` is cut from by the hold-out rule (it or its complement), else None."""
    names = _own_splits(src)
    return _base(names) if _holds_out(src, names) and split in ("validation", _base(names)) else None


def _own_splits(src: SourceSpec) -> list[str]:
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
    base = _held_out_from(src, split)
    if base:
        n = _own_count(src, base)
        return None if n is None else n // HOLDOUT if split == "validation" else n - n // HOLDOUT
    return _own_count(src, split)


def _own_count(src: SourceSpec, split: str) -> int | None:
    if src.kind == "animal-mnist":
        return len(animal_mnist_split_indices()[split])
    if src.kind == "hf":
        return len(_hf_splits(src.arg)[split])
    if src.kind == "folder":
        return len(_folder_entries(Path(src.arg), split))
    return None


def iterate(src: SourceSpec, split: str, start: int = 0) -> Iterator[Item]:
    """Items of one split in their fixed order, from position `start` (for resuming)."""
    if split not in splits(src):
        raise UserError(f"source {src}: no split {split!r}; splits: {', '.join(splits(src))}")
    base = _held_out_from(src, split)
    if base:
        # item k of the held-out split is the source's HOLDOUT*k + HOLDOUT-1; the others keep HOLDOUT-1 in HOLDOUT
        held = split == "validation"
        first = HOLDOUT * start + HOLDOUT - 1 if held else start + start // (HOLDOUT - 1)
        return (
            item for pos, item in enumerate(_iterate(src, base, first), first) if (pos % HOLDOUT == HOLDOUT - 1) == held
        )
    return _iterate(src, split, start)


def _iterate(src: SourceSpec, split: str, start: int) -> Iterator[Item]:
    if src.kind == "animal-mnist":
        return _iter_animal(split, start)
    if src.kind == "folder":
        return _iter_folder(Path(src.arg), split, start)
    if src.kind == "wds":
        return _iter_wds(src.arg, start)
    return _iter_hf(src.arg, split, start)


def load_images(
    src: SourceSpec,
    split: str,
    resolution: int,
    channels: int,
    limit: int | None = None,
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
