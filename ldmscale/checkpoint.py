"""Run directories and checkpoints (the README's "Run directories and results").

  RUN/config.json              fully resolved config, UNet config, data identity, package versions
  RUN/metrics.jsonl            one line per log step: loss, lr, images/s and the compute ledger
  RUN/checkpoints/step-000200/ one checkpoint, written as a whole folder then renamed into place:
      model.safetensors, ema.safetensors   weights (config and ledger in the safetensors metadata)
      optimizer.pt                         optimizer + LR schedule state (tensors only; loaded weights_only)
      state.json                           the ledger and each file's bytes + sha256; written last
  RUN/checkpoints/LATEST       name of the newest complete checkpoint (atomic)
  RUN/checkpoints/damaged/     checkpoints a resume found damaged, set aside (never deleted)

A kill -9 during a save leaves only a hidden temp folder; LATEST still names the previous checkpoint. Every read
checks the files against state.json's record and falls back to the newest intact checkpoint, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmscale import integrity
from ldmscale.errors import DiskFull, UserError
from ldmscale.io import atomic_dir, atomic_write_json, atomic_write_text, disk_full

FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt")


def ckpt_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders, oldest first. Saves are atomic (an interrupted one is a hidden temp folder, ignored here),
    so a listed folder without state.json is a damaged one, and damage() says so."""
    root = ckpt_dir(run)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint, as LATEST names it (unverified: for messages)."""
    root = ckpt_dir(run)
    pointer = root / "LATEST"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").exists():
            return cand
    found = list_checkpoints(run)
    return found[-1] if found else None


WEIGHTS = ("model.safetensors", "ema.safetensors")  # what sampling, evaluation and export read


def damage(ckpt: Path, only: tuple[str, ...] | None = None) -> str:
    """What is wrong with a checkpoint, "" when intact: state.json must parse and every file it records (of `only`,
    the files the caller reads, when given) must have its bytes and sha256 (checkpoints from before the record:
    their structure)."""
    try:
        state = integrity.read_json(Path(ckpt) / "state.json", "state.json")
    except (ValueError, OSError):
        return "state.json is missing or not valid JSON"
    if state.get("step") != int(Path(ckpt).name.split("-")[-1]):
        return f"state.json is for step {state.get('step')}, not this checkpoint's"
    files = state.get("files")
    if not isinstance(files, dict):
        files = {f: None for f in FILES if f != "ema.safetensors" or (Path(ckpt) / f).exists()}
    for name in sorted(f for f in files if only is None or f in only):
        bad = integrity.damage(Path(ckpt) / name, files[name])
        if bad:
            return f"{name}: {bad}"
    return ""


def newest_intact(run: Path, announce: bool = True, only: tuple[str, ...] | None = None) -> Path | None:
    """The newest checkpoint that passes damage(); each damaged newer one is named in one line (and kept)."""
    found, skipped = None, []
    for ckpt in reversed(list_checkpoints(run)):
        bad = damage(ckpt, only)
        if not bad:
            found = ckpt
            break
        skipped.append((ckpt, bad))
    for ckpt, bad in skipped if announce else []:
        integrity.note(
            f"checkpoint {ckpt} is damaged ({bad}); using "
            f"{found.name if found else 'none (no intact checkpoint: from the start)'} instead; the damaged "
            "one is kept"
        )
    return found


def set_aside_after(run: Path, step: int) -> None:
    """Move checkpoints newer than `step` (the damaged ones a resume skipped) to checkpoints/damaged/, so that the
    resumed run's own saves never replace them."""
    for ckpt in list_checkpoints(run):
        if int(ckpt.name.split("-")[1]) > step:
            dest = integrity.set_aside(ckpt, ckpt_dir(run) / "damaged")
            integrity.note(f"damaged checkpoint {ckpt.name} moved to {dest}")


def point_latest(run: Path, ckpt: Path) -> None:
    atomic_write_text(ckpt_dir(run) / "LATEST", ckpt.name + "\n")


def _name(run: Path, which: str) -> str:
    """A checkpoint of this run only: a step number, step-NNNNNN or a path to one of its checkpoints."""
    if which.isdigit():
        return f"step-{int(which):06d}"
    if "/" not in which and which.startswith("step-") and which[5:].isdigit():
        return which
    p = Path(which)
    if p.name.startswith("step-") and p.resolve().parent == ckpt_dir(run).resolve():
        return p.name
    raise UserError(
        f"--checkpoint {which!r} is not a checkpoint of run {run}: give latest, a step number or "
        "step-NNNNNN of this run"
    )


def resolve(run: Path, which: str = "latest", only: tuple[str, ...] | None = WEIGHTS) -> Path:
    """'latest', 'step-000200' or '200' -> a checkpoint folder of the run whose files `only` (default: the weights,
    what reading a model needs) are intact, or a clear error. 'latest' is the newest such one (a damaged newer one
    is named and skipped)."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise UserError(f"not a run directory (no config.json): {run}")
    have = ", ".join(p.name for p in list_checkpoints(run)) or "none"
    if which in ("latest", ""):
        found = newest_intact(run, only=only)
        if found is None:
            raise UserError(
                f"run {run} has no intact checkpoint (checkpoints: {have}; `ldmscale verify {run}` lists what is wrong)"
            )
        return found
    found = ckpt_dir(run) / _name(run, which)
    if not found.is_dir():
        raise UserError(f"run {run} has no checkpoint {which!r} (checkpoints: {have})")
    bad = damage(found, only)
    if bad:
        raise UserError(f"checkpoint {found} is damaged ({bad}); give another --checkpoint (checkpoints: {have})")
    return found


def _meta(config: dict, state: dict, kind: str) -> dict[str, str]:
    return {"ldmscale_config": json.dumps(config), "ldmscale_state": json.dumps(state), "weights": kind}


def save(
    run: Path,
    step: int,
    config: dict,
    unet_state: dict,
    ema_state: dict | None,
    optimizer_state: dict,
    state: dict,
    keep: int,
    protect: set[str] | frozenset = frozenset(),
) -> Path:
    """Write checkpoint `step` atomically with the record of its files, point LATEST at it, keep the newest `keep`
    and those named in `protect`."""
    name = f"step-{step:06d}"
    out = ckpt_dir(run) / name
    try:
        with atomic_dir(out) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in unet_state.items()},
                str(tmp / "model.safetensors"),
                metadata=_meta(config, state, "raw"),
            )
            if ema_state is not None:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in ema_state.items()},
                    str(tmp / "ema.safetensors"),
                    metadata=_meta(config, state, "ema"),
                )
            torch.save(optimizer_state, tmp / "optimizer.pt")
            files = {f: integrity.record(tmp / f) for f in FILES if (tmp / f).exists()}
            atomic_write_json(tmp / "state.json", state | {"files": files})
    except Exception as e:  # safetensors reports a full disk as its own error type
        if not isinstance(e, DiskFull) and not disk_full(e):
            raise
        good = latest(run)
        raise UserError(
            f"no space left on device while saving checkpoint {name} of {run}; last good checkpoint: "
            f"{good.name if good else 'none'} (free space and run the same command to continue)"
        ) from None
    atomic_write_text(ckpt_dir(run) / "LATEST", name + "\n")
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        if old.name not in protect:
            remove(old)
    return out


def remove(ckpt: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a partial one listed as complete: it is renamed to
    a hidden name first (one atomic step), then deleted; clean_stale() finishes what a kill interrupted."""
    doomed = ckpt.parent / f".{ckpt.name}.deleting"
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_stale(run: Path) -> None:
    """Remove the hidden folders that a killed save or prune left behind (call under the run's lock)."""
    for stale in ckpt_dir(run).glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    path = Path(ckpt) / ("ema.safetensors" if which == "ema" else "model.safetensors")
    if which == "ema" and not path.exists():
        path = Path(ckpt) / "model.safetensors"
    if not path.exists():
        raise UserError(f"checkpoint {ckpt} has no weights file")
    return load_file(str(path))


def load_optimizer(ckpt: Path) -> dict:
    """Tensors and plain containers only (weights_only): a file that holds anything else is refused in one line."""
    path = Path(ckpt) / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{path} cannot be loaded as optimizer state ({type(e).__name__}: {first[:200]}); "
            f"`ldmscale verify {Path(ckpt).parent.parent} --repair` sets the checkpoint aside"
        ) from None


def read_run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.exists():
        raise UserError(f"not a run directory (no config.json): {run}")
    try:
        return integrity.read_json(path, "run config")
    except ValueError as e:
        raise UserError(f"{e}; it is rewritten from the settings by the next `ldmscale train` of this run") from None
