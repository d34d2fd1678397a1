"""The embedded animal-mnist dataset: the 10,000 28x28 silhouettes shipped in the `animal-mnist` package (10 classes),
its fixed train/validation split, its captions, and the class a prompt names (caption accuracy)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from ldmscale.errors import UserError

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "a silhouette of a {}",
    "a black and white picture of a {}",
    "the shape of a {}",
)
ANIMAL_VAL_PER_CLASS = 100  # fixed split: 100 per class for validation, 900 per class for training


def _animal_dir() -> Path:

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
