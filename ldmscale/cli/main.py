"""The `ldmscale` command line. Each verb is a thin wrapper over a module's functions.

Every bad input ends as one line on stderr and exit code 2 (UserError, click usage errors); a traceback
means a bug in ldmscale.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import click

from ldmscale.errors import Stopped, UserError

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=110)


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and infinities (click's FLOAT accepts them)."""

    name = "float"

    def convert(self, value, param, ctx):

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


FINITE = FiniteFloat()
COUNT = click.IntRange(0, 10**12)  # an image count, 0 meaning "all" or "default"
POSITIVE = click.IntRange(1, 10**12)


# `ldmscale --help` lists the verbs in the order of the pipeline, not alphabetically
ORDER = (
    "family",
    "autoencoder",
    "data",
    "classifier",
    "train",
    "sample",
    "eval",
    "compare",
    "finetune",
    "distill",
    "export",
    "study",
    "plan",
    "verify",
)
# the cli modules that define commands (sweep adds `study lr-sweep`)
MODULES = ("family", "data", "train", "eval", "study", "sweep", "tasks", "verify")


class PipelineGroup(click.Group):
    def list_commands(self, ctx) -> list[str]:
        return sorted(self.commands, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


@click.group(cls=PipelineGroup, context_settings=CONTEXT)
@click.version_option(package_name="ldmscale")
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Compute on this device (cpu, cuda, cuda:1; default: accelerate's choice, the GPU when there is "
    "one). Same as LDMSCALE_DEVICE=DEVICE.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, 4096),
    metavar="N",
    help="CPU threads for torch (default: LDMSCALE_THREADS, else OMP_NUM_THREADS, else the cores this "
    "process may use that other processes do not keep busy now, shared among the processes of a "
    "launch). On a shared machine fewer threads are faster: a thread per core spins on cores "
    "others use.",
)
@click.pass_context
def cli(ctx, device, threads) -> None:
    """ldmscale: scaling studies of latent diffusion models.

    \b
    Train a family of SD-v1.5-layout LDMs of different widths, sample them with any sampler at any
    step count, evaluate them (FID, CLIP score, ...), and find the best model for a sampling budget.

    \b
    Example:
      ldmscale family --preset paper
    """

    if device:
        from ldmscale.device import ENV, requested

        os.environ[ENV] = device
        requested()  # refuse a device that is not there, now
    if ctx.invoked_subcommand and "--help" not in sys.argv[1:] and "-h" not in sys.argv[1:]:
        from ldmscale.device import set_threads

        set_threads(threads)


def register(*modules: str) -> None:
    """Add the commands that each module of cli/ defines (keeps this file short)."""

    for name in modules:
        mod = importlib.import_module(f"ldmscale.cli.{name}")
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    register(*MODULES)
    try:
        rc = cli.main(args=argv, prog_name="ldmscale", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("ldmscale: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "ldmscale"
        click.echo(f"{cmd}: error: {_one_line(e.format_message())} (see {cmd} --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"ldmscale: error: {_one_line(e.format_message())}", err=True)
        sys.exit(2)
    except UserError as e:
        click.echo(f"ldmscale: error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except Stopped as e:  # a diverged training, failed study jobs: not bad input, so exit 1
        click.echo(f"ldmscale: stopped: {_one_line(str(e))}", err=True)
        sys.exit(1)
    except OSError as e:  # a full disk outside an atomic write (those raise DiskFull, a UserError)
        from ldmscale.io import disk_full

        if not disk_full(e):
            raise
        click.echo(
            f"ldmscale: error: no space left on device writing {e.filename or 'output'}; free space and run the "
            "same command again",
            err=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("ldmscale: interrupted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
