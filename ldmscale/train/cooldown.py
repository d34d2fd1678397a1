"""IsoFLOP cooldown branches: a budget's annealed model as a continuation of its size's constant-lr run."""

from __future__ import annotations

import shutil
from pathlib import Path

from ldmscale.errors import UserError
from ldmscale.train.config import TrainConfig
from ldmscale.train.loop import train


def branch(stable: str | Path, step: int, cfg: TrainConfig, run: str | Path, progress: bool = True) -> dict:
    """A cooldown branch: `cfg` (a wsd run whose decay begins at `step`) continued from the stable run's checkpoint at
    `step`, copied into its own folder once. Its ledger starts where the stable run's stood there, so it ends at the
    branch's whole training compute; the stable run is left as it was."""
    run, src = Path(run), Path(stable) / "checkpoints" / f"step-{step:06d}"
    if not (run / "checkpoints").exists():
        if not src.is_dir():
            raise UserError(f"cooldown branch {run}: the stable run {stable} has no checkpoint at step {step}")
        tmp = run.parent / f".{run.name}.branching"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp / "checkpoints" / src.name)
        run.mkdir(parents=True, exist_ok=True)
        tmp.joinpath("checkpoints").rename(run / "checkpoints")
        shutil.rmtree(tmp)
    return train(cfg, run, progress)
