"""Integrity of what ldmscale reads back: each file it writes is recorded (bytes + sha256) in a manifest at write time
(a checkpoint's state.json, a cache's index.json, a study's job records) and checked when it is read. Files from
before the records existed get a structural check: a safetensors header that accounts for every byte, a zip
(torch.save) whose members pass their CRCs, JSON that parses.

Every check returns what is wrong in a few words, or "" when the file is intact; the callers turn it into one line
that names the file, what was wrong and what they do about it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from ldmscale.io import file_sha256


def record(path: str | os.PathLike) -> dict:
    """{"bytes", "sha256"} of a file as it is now: what a manifest keeps."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def damage(path: str | os.PathLike, want: dict | None = None) -> str:
    """What is wrong with a file against its record `want` (or, with no record, its structure); "" when intact."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if want is None:
        return structure_damage(path)
    size = path.stat().st_size
    if size != want.get("bytes"):
        return f"{size:,} bytes where {want.get('bytes', 0):,} were written"
    if file_sha256(path) != want.get("sha256"):
        return "content differs from what was written (sha256 mismatch)"
    return ""


def structure_damage(path: Path) -> str:
    """The check for a file with no record, by its kind."""
    if path.suffix == ".safetensors":
        return safetensors_damage(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return zip_damage(path)
    if path.suffix == ".json":
        return json_damage(path)
    return ""


def safetensors_damage(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            return f"not a safetensors file or cut short ({size:,} bytes)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return "its safetensors header is garbled"
    if 8 + n + end != size:
        return f"{size:,} bytes where its header accounts for {8 + n + end:,} (cut short or extended)"
    return ""


def zip_damage(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable torch.save file ({e})"
    return f"member {bad} fails its CRC" if bad else ""


def json_damage(path: Path) -> str:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON"
    except OSError:
        return "missing or unreadable"
    return ""


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object ldmscale wrote, or ValueError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{what} {path} is damaged (not valid JSON)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is damaged (not a JSON object)")
    return data


def set_aside(path: Path, folder: Path) -> Path:
    """Move a damaged file or folder into `folder` (never deleted: the user decides), under a free name."""
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / path.name, 1
    while dest.exists():
        n += 1
        dest = folder / f"{path.name}.{n}"
    shutil.move(str(path), str(dest))
    return dest


def note(message: str) -> None:
    """One line on stderr that does not break a progress bar."""

    tqdm.write(f"ldmscale: {message}", file=sys.stderr)
