"""`ldmscale verify`: check a run, a latent cache or a study folder against the records written with its files."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(
    "verify",
    epilog="""
\b
Examples:
  ldmscale verify demo                  every checkpoint, cache shard, job record and eval result of the demo
  ldmscale verify demo/runs/c16 --repair
\b
Exit code 0 when everything is intact, 1 when something is damaged (each named in one line), 2 on bad input.
""",
)
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--repair",
    is_flag=True,
    help="Set damaged checkpoints, eval results and job records aside (never "
    "deleted) so the next command redoes them, rewrite a damaged run config.json from its newest intact "
    "checkpoint, and encode damaged cache shards again.",
)
def verify_cmd(path, repair) -> None:
    """Check every file of a run, cache or study folder (bytes + sha256, structure for older files)."""
    from ldmscale.study.verify import verify

    rep = verify(path, repair)
    for line in rep.damaged:
        click.echo(f"damaged: {line}")
    for line in rep.repaired:
        click.echo(f"repaired: {line}")
    left = verify(path).damaged if repair and rep.damaged else rep.damaged
    click.echo(
        f"{path}: {rep.checked} files checked, {len(rep.damaged)} damaged"
        + (
            f", {len(left)} still damaged after repair"
            if repair and rep.damaged
            else " (--repair sets them aside or rebuilds them)"
            if rep.damaged
            else ""
        )
    )
    sys.exit(1 if left else 0)


COMMANDS = [verify_cmd]
