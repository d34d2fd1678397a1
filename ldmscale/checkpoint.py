"""Run directories and checkpoints (the README's "Run directories and results").

  RUN/config.json              fully resolved config, UNet config, data identity, package versions
  RUN/metrics.jsonl            one line per log step: loss, lr, images/s and the compute ledger
  RUN/checkpoints/step-000200/ one checkpoint, written as a whole folder then renamed into place:
      model.safetensors, ema.safetensors   weights (config and ledger in the safetensors metadata)
      optimizer.pt                         optimizer + LR schedule state (tensors only; loaded weights_only)
      state.json                           ledger, data position, RNG state; written last
  RUN/checkpoints/LATEST       name of the newest complete checkpoint (atomic)

A kill -9 during a save leaves only a hidden temp folder; LATEST still names the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmscale.errors import UserError
from ldmscale.io import atomic_dir, atomic_write_json, atomic_write_text


def ckpt_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temp folders of interrupted saves are ignored)."""
    root = ckpt_dir(run)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


def latest(run: Path) -> Path | None:
    root = ckpt_dir(run)
    pointer = root / "LATEST"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").exists():
            return cand
    found = list_checkpoints(run)
    return found[-1] if found else None


def resolve(run: Path, which: str = "latest") -> Path:
    """'latest', 'step-000200' or '200' -> a checkpoint folder of the run, or a clear error."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise UserError(f"not a run directory (no config.json): {run}")
    if which in ("latest", ""):
        found = latest(run)
    else:
        name = which if which.startswith("step-") else f"step-{int(which):06d}" if which.isdigit() else which
        found = ckpt_dir(run) / name
        found = found if (found / "state.json").exists() else None
    if found is None:
        have = ", ".join(p.name for p in list_checkpoints(run)) or "none"
        raise UserError(f"run {run} has no checkpoint {which!r} (checkpoints: {have})")
    return found


def _meta(config: dict, state: dict, kind: str) -> dict[str, str]:
    return {"ldmscale_config": json.dumps(config), "ldmscale_state": json.dumps(state), "weights": kind}


def save(run: Path, step: int, config: dict, unet_state: dict, ema_state: dict | None, optimizer_state: dict,
         state: dict, keep: int, protect: set[str] | frozenset = frozenset()) -> Path:
    """Write checkpoint `step` atomically, point LATEST at it, keep the newest `keep` and those named in `protect`."""
    import errno

    name = f"step-{step:06d}"
    out = ckpt_dir(run) / name
    try:
        with atomic_dir(out) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in unet_state.items()}, str(tmp / "model.safetensors"),
                      metadata=_meta(config, state, "raw"))
            if ema_state is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()},
                          str(tmp / "ema.safetensors"), metadata=_meta(config, state, "ema"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            atomic_write_json(tmp / "state.json", state)
    except Exception as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        if not full:
            raise
        good = latest(run)
        raise UserError(f"no space left on device while saving checkpoint {name} of {run}; last good checkpoint: "
                        f"{good.name if good else 'none'} (free space and run the same command to continue)") from None
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
    return torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True)


def read_run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.exists():
        raise UserError(f"not a run directory (no config.json): {run}")
    return json.loads(path.read_text())
