"""`ldmscale study lr-sweep`: the learning rate each size of a study should train at, from a short sweep (#28)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ldmscale.cli.main import FINITE
from ldmscale.cli.study import study_group
from ldmscale.errors import UserError


def _lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lrs {text!r}: give learning rates separated by commas, e.g. 3e-3,1e-2,3e-2") from None
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs) or len(set(lrs)) != len(lrs):
        raise UserError(f"--lrs {text!r}: give distinct positive learning rates, e.g. 3e-3,1e-2,3e-2")
    return lrs


@study_group.command(
    "lr-sweep",
    epilog="""
\b
Example:
  ldmscale study lr-sweep studies/isoflop.toml --cache isoflop/cache --out isoflop-lr --lrs 3e-3,1e-2,3e-2 --flops 3e11
\b
Every size of the study trains once per learning rate for --flops training FLOPs (a cosine run, the study's batch
and its other settings); the command prints each run's validation loss and the study's [train.per_size] table with
the chosen learning rates, and keeps them in OUT/sweep.json. Running it again keeps the finished runs.
""",
)
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Latent cache to train on.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Sweep folder (created, or continued).")
@click.option("--lrs", required=True, help="Learning rates, comma-separated.")
@click.option("--flops", required=True, type=FINITE, help="Training FLOPs of every run (an IsoFLOP budget).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar per run.")
def lr_sweep_cmd(study_file, cache, out, lrs, flops, progress) -> None:
    """Train every size of a study at each learning rate and choose one per size."""
    from ldmscale.io import DirLock, atomic_write_text, check_output
    from ldmscale.study.spec import load_study, resolved_toml
    from ldmscale.study.sweep import RULE, lr_sweep, per_size_toml, sweep_configs

    study, rates = load_study(study_file), _lrs(lrs)
    if flops <= 0:
        raise UserError(f"--flops {flops:g}: give a positive training budget")
    configs = sweep_configs(study, cache, rates, flops)  # refuses a missing cache or under 2 steps, before writing
    check_output(out, "sweep")
    with DirLock(out, "sweep"):
        if not (out / "sweep.toml").exists():
            atomic_write_text(out / "sweep.toml", resolved_toml(study_file))
        elif (out / "sweep.toml").read_text() != resolved_toml(study_file):
            raise UserError(f"--out {out} swept another study file; use a new --out")
        result = lr_sweep(configs, out, flops, progress=progress, log=click.echo)
    click.echo(f"\nvalidation loss at {flops:g} training FLOPs (+- its standard error; * the lr chosen):")
    for r in result["runs"]:
        mark = "*" if result["chosen"].get(r["size"]) == r["lr"] else " "
        loss = f"{r['val_loss']:.4f} +- {r['val_loss_se']:.4f}"
        click.echo(f"  {r['size']:>5}  lr {r['lr']:<7g} {r['steps']:>6} steps  {loss} {mark}")
    click.echo(f"chosen: {RULE}\n\n{per_size_toml(study, result['chosen'])}")


COMMANDS: list = []  # the command joins `ldmscale study`
