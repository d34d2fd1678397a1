"""Two training runs side by side, a process per core with a thread each (what `study run --jobs N` does with a
wave's training jobs), against the same two runs one after another with every thread each (the baseline: `--jobs 1`),
in one run. Each is the real `ldmscale train` command from a start (imports included) to its ledger, on a latent
cache of animal-mnist with an untrained autoencoder (speed does not depend on the weights).

Run: .venv/bin/python bench/side_by_side.py [--sizes c8,c32 --steps 100 --batch 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, record, untrained_cache


def command(cache: Path, size: str, out: Path, threads: int, args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ldmscale",
        "--threads",
        str(threads),
        "train",
        "--cache",
        str(cache),
        "--size",
        size,
        "--out",
        str(out),
        "--images",
        str(args.steps * args.batch),
        "--batch-size",
        str(args.batch),
        "--warmup-steps",
        str(max(1, args.steps // 10)),
        "--checkpoint-every",
        str(10**9),  # one checkpoint, at the end, in both modes
    ]


def wall(cmds: list[list[str]], together: bool) -> float:
    """Seconds from the first start to the last end: all at once, or one after another."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LDMSCALE_THREADS")}
    env["LDMSCALE_PROGRESS"] = "0"
    t = time.perf_counter()
    if together:
        procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.DEVNULL) for c in cmds]
        if any(p.wait() for p in procs):
            raise SystemExit("a training run failed")
    else:
        for c in cmds:
            subprocess.run(c, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="c8,c32", help="each size is measured as a pair of runs of that size")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache-images", type=int, default=2000)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    jobs = max(2, cores)  # a job per core, as the Makefile's STUDY_JOBS; two at least, so there is a pair
    tmp = Path(tempfile.mkdtemp())
    untrained_cache(tmp, args.cache_images)
    sizes = {}
    for size in args.sizes.split(","):
        runs = [tmp / f"{size}-{mode}-{i}" for mode in ("alone", "beside") for i in range(jobs)]
        alone = wall([command(tmp / "cache", size, r, cores, args) for r in runs[:jobs]], together=False)
        beside = wall(
            [command(tmp / "cache", size, r, max(1, cores // jobs), args) for r in runs[jobs:]], together=True
        )
        sizes[size] = {
            "one_at_a_time_s": round(alone, 1),
            "side_by_side_s": round(beside, 1),
            "speedup": round(alone / beside, 3),
        }
    record(
        "side_by_side",
        {
            "runs": jobs,
            "steps": args.steps,
            "batch": args.batch,
            "baseline": f"{jobs} runs one after another, {cores} threads each (study run --jobs 1)",
            "sizes": sizes,
        },
    )


if __name__ == "__main__":
    main()
