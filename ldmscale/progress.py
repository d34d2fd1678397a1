"""Progress bars for long work: live on a terminal, a line every 30 s in logs (CI, SLURM), off on request."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    # a transient bar (leave=False) is for terminals: in a log it would leave its "0%" line behind
    disable = (
        not enabled or os.environ.get("LDMSCALE_PROGRESS", "1") == "0" or (not tty and kwargs.get("leave") is False)
    )
    kwargs.setdefault("mininterval", 0.5 if tty else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kwargs)
