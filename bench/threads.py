"""`ldmscale sample` with a second CPU-bound process on the machine: the default thread policy (the idle cores) against
one thread (OMP_NUM_THREADS=1, the target) and a thread per core (torch's own default, the baseline), in one run.
The model is a c16 with random weights trained one step (speed does not depend on the weights), as bench/sampling.py.
Run: .venv/bin/python bench/threads.py [--size c16 --steps 20 --images 32]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, record, tiny_run


def sample_ms(run: Path, out: Path, env: dict, args) -> tuple[float, float]:
    """(ms an image as `sample` reports it, seconds of the whole command with its start-up)."""
    cmd = [
        sys.executable,
        "-m",
        "ldmscale",
        "sample",
        "--run",
        str(run),
        "--prompt",
        "a cat",
        "--steps",
        str(args.steps),
        "--num-images",
        str(args.images),
        "--out",
        str(out),
        "--overwrite",
    ]
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LDMSCALE_THREADS")} | env
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=True, env=full, capture_output=True, text=True, cwd=ROOT)
    ms = float(re.search(r"([0-9.]+) ms/image", proc.stdout).group(1))
    return ms, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="c16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--busy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the second process (the "
        "measurement); --no-busy for the suite's smoke run, which must not take a core from its neighbour",
    )
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tiny_run(tmp, args.size, warmup_steps=0)
    cores = len(os.sched_getaffinity(0))
    policies = {
        "default policy": {},
        "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
        "a thread per core": {"LDMSCALE_THREADS": str(cores)},
    }
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass" if args.busy else "pass"])  # the other process
    try:
        time.sleep(1.0)
        times = {name: [] for name in policies}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every policy alike
            for name, env in policies.items():
                times[name].append(sample_ms(tmp / "run", tmp / "s", env, args))
    finally:
        busy.kill()
    best = {name: min(ms for ms, _ in v) for name, v in times.items()}
    result = {
        "cores": cores,
        "busy_process": args.busy,
        "size": args.size,
        "steps": args.steps,
        "images": args.images,
        "ms_per_image": {k: round(v, 2) for k, v in best.items()},
        "command_seconds": {k: round(min(s for _, s in v), 2) for k, v in times.items()},
        "default_over_one_thread": round(best["default policy"] / best["OMP_NUM_THREADS=1"], 3),
        "thread_per_core_over_one_thread": round(best["a thread per core"] / best["OMP_NUM_THREADS=1"], 3),
        "baseline": "OMP_NUM_THREADS=1 (target: the default within 1.2x of it)",
    }
    print(
        f"with one busy process on {cores} cores, ms an image: default {best['default policy']:.1f}, one thread "
        f"{best['OMP_NUM_THREADS=1']:.1f}, a thread per core {best['a thread per core']:.1f}: default / one "
        f"thread = {result['default_over_one_thread']}x (target <= 1.2x), a thread per core / one thread = "
        f"{result['thread_per_core_over_one_thread']}x"
    )
    record("threads", result)


if __name__ == "__main__":
    main()
