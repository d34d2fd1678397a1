"""WebDataset shards read as plain tar files: local shard paths from a brace or glob pattern, and the samples of
one shard in order, with a cut-short or non-tar shard reported as an error sample instead of lost silently."""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator


def shard_paths(pattern: str) -> list[str]:
    """Local shard paths, absolute (so that webdataset-style URL prefixes in a file name mean nothing)."""
    if "{" in pattern:
        import braceexpand

        urls = list(braceexpand.braceexpand(pattern))
        urls = urls if all(os.path.isfile(u) for u in urls) else []
    else:
        urls = sorted(u for u in glob.glob(pattern) if os.path.isfile(u))
    return [os.path.abspath(u) for u in urls]


def tar_samples(path: str) -> Iterator[dict]:
    """The samples of one tar shard in order, members grouped by name as webdataset groups them; a shard that is
    empty, not a tar or cut short ends with {"__error__": ...} after the samples it did hold."""
    from webdataset.tariterators import base_plus_ext

    n, sample = 0, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                if sample and key != sample["__key__"]:
                    yield sample
                    n, sample = n + 1, {}
                sample.setdefault("__key__", key)
                sample[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        what = "is not a tar file" if n == 0 and not sample else f"is cut short after {n} samples"
        yield {"__key__": f"{os.path.basename(path)}:{n}", "__error__": f"shard {path} {what} ({e})"}
        return
    if sample:
        yield sample
