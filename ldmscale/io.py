"""Atomic file writes: write to a temporary file beside the target, fsync, rename, fsync the folder.

A reader (or a resumed run) therefore sees either the old file or the whole new one, never a torn one,
even if the process is killed with SIGKILL in the middle of a write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldmscale.errors import DiskFull, UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], needed: int | None = None) -> Path:
    """Call write(tmp_path) to produce the file, then move it into place atomically; a full disk is one DiskFull
    line and no temp file left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):
            raise DiskFull(path, needed or written or None) from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Standard JSON only: a NaN or infinity is a bug to report, not a file to write."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync; a torn last line (kill mid-append) is skipped by read_jsonl."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill; everything before it is intact
    return out


class atomic_dir:
    """`with atomic_dir(out) as tmp:` write a whole folder into tmp; it appears at `out` only on success.

    An existing `out` is replaced (moved aside first, deleted after), so a reader never sees a mix.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)

    def __enter__(self) -> Path:

        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:

        if exc_type is not None:
            written = sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())
            shutil.rmtree(self.tmp, ignore_errors=True)
            if disk_full(exc) and not isinstance(exc, DiskFull):
                raise DiskFull(self.out, written or None) from None
            return
        for p in self.tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """sha256 of a file (of its first `limit` bytes when given), for identities in manifests."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ outputs and locks

# What marks a folder as each kind of ldmscale output (the first file found decides).
OUTPUT_MARKERS = {
    "run": ("config.json", "checkpoints"),
    "cache": ("prepare.json", "manifest.json"),
    "study": ("study.toml", "jobs"),
    "sweep": ("sweep.toml",),
    "autoencoder": ("ldmscale_autoencoder.json",),
    "classifier": ("classifier.json",),
    "export": ("model_index.json",),
    "samples": ("sample.json",),
}
NEVER_REPLACED = ("run", "cache", "study", "sweep")  # continued when the same kind, never replaced


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of ldmscale output a folder holds, "" when it is empty, None when it holds something else."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(p.name != ".lock" for p in path.iterdir())):
        return ""
    if path.is_dir():
        if (path / "model_index.json").exists():  # an exported pipeline also holds config.json files
            return "export"
        for kind, markers in OUTPUT_MARKERS.items():
            if any((path / m).exists() for m in markers):
                return kind
    return None


def check_output(path: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """The --out rule: a command writes into a new or empty folder, continues a run, cache or study of its own kind,
    and replaces an autoencoder, classifier, export or sample folder only with --overwrite; anything else is refused."""

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is an existing file; give a folder")
    have = output_kind(path)
    if have == "" or (have == kind and kind in NEVER_REPLACED):
        return
    if have in NEVER_REPLACED:
        raise UserError(f"--out {path} is a {have} folder and ldmscale never replaces one; use a new --out")
    if have == kind:
        if overwrite:
            return
        raise UserError(
            f"--out {path} already holds {'samples' if kind == 'samples' else 'a ' + kind}; pass "
            "--overwrite to replace it, or use a new --out"
        )
    what = f"a {have} folder" if have else "a folder with other files"
    raise UserError(f"--out {path} is {what}, not a {kind} folder; use a new --out")


class DirLock:
    """An exclusive OS lock on a folder (PATH/.lock), held while a command writes into it. It dies with the process,
    so a kill -9 leaves no stale lock; a second process is refused with the holder's PID. `enabled=False` (the
    non-main processes of a distributed launch) makes it a no-op."""

    def __init__(self, path: str | os.PathLike, what: str = "folder", enabled: bool = True):
        self.path, self.what, self.enabled, self.fd = Path(path), what, enabled, None

    def __enter__(self) -> DirLock:

        if not self.enabled:
            return self
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{self.what} {self.path} is in use by process {holder}; wait for it or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.fd is None:
            return
        if exc_type is not None and self.created and [p.name for p in self.path.iterdir()] == [".lock"]:
            os.unlink(self.path / ".lock")  # a command that failed before writing anything leaves nothing behind
            os.rmdir(self.path)
        os.close(self.fd)  # closing releases the lock; the file stays (unlinking it would race a new locker)
        self.fd = None


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (accelerate and torchrun set RANK), or a plain process."""
    return os.environ.get("RANK", "0") == "0"
