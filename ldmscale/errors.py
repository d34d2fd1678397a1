"""The one error users see: a UserError is printed by the CLI as one line, with exit code 2."""

import shutil


class UserError(Exception):
    """Bad input from the user (a path, a name, a value). The CLI prints it and exits with code 2."""


class DiskFull(UserError):
    """No space left while writing: names the path, the space it needed and what is free; nothing partial is left."""

    def __init__(self, path, needed: int | None = None):

        where = path if path.exists() else path.parent
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        need = f", about {needed / 1e6:,.1f} MB needed" if needed else ""
        super().__init__(
            f"no space left on device writing {path} ({free / 1e6:,.1f} MB free{need}); nothing partial "
            "was kept: free space and run the same command again"
        )


class Stopped(RuntimeError):
    """Work that ran and did not finish (not bad input): the CLI prints it as one line and exits with code 1."""


class JobsFailed(Stopped):
    """Study jobs that failed or that a cluster refused or ended; each is named with its reason before this."""


class TrainingDiverged(Stopped):
    """The loss became NaN or Inf; the run stopped without saving. Every verb that trains ends in one line and exit
    code 1 (cli.main), naming the last good checkpoint."""
