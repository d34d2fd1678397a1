"""The damages the integrity tests do to files (the way disks, full file systems and interrupted copies damage
them), and the helpers they share: the command in this process, a folder's digest, a safetensors file's content."""

import hashlib
import pickle
import shutil
from pathlib import Path

import pytest


def truncate(p: Path, other: Path | None = None) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garble(p: Path, other: Path | None = None) -> None:
    b = bytearray(p.read_bytes())
    i = len(b) // 2
    b[i : i + 8] = bytes(x ^ 0xFF for x in b[i : i + 8])
    p.write_bytes(bytes(b))


def delete(p: Path, other: Path | None = None) -> None:
    p.unlink()


class _Crafted:
    def __reduce__(self):
        return (print, ("code ran from a crafted pickle",))


def replace(p: Path, other: Path | None = None) -> None:
    """Another valid file of the same kind: the same file of another checkpoint or shard, or a crafted pickle."""
    if other is not None and other.exists():
        shutil.copyfile(other, p)
    else:
        p.write_bytes(pickle.dumps(_Crafted()))


DAMAGES = {"truncate": truncate, "garble": garble, "delete": delete, "replace": replace}


def cli(capsys, *args) -> tuple[int, str, str]:
    """The ldmscale command in this process (no start-up cost): exit code, stdout, stderr."""
    from ldmscale.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def content(path: Path) -> tuple:
    """A safetensors file's tensors and metadata (its bytes are not reproducible: the header's key order is not)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tuple((k, f.get_tensor(k).tolist()) for k in sorted(f.keys())), sorted((f.metadata() or {}).items())


def digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock" and p != skip
    }


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("LDMSCALE_PROGRESS", "0")
