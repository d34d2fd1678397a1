"""Cluster fan-out of a study through submitit: each job is an ordinary ldmscale job run on a SLURM node.

The same rules as the local executor: finished jobs (STUDY/jobs/<id>.json) are skipped; a job marks itself
done when it finishes, so a cancelled or failed SLURM job is simply run again next time (training resumes
from its checkpoint). Jobs go out in waves that respect their dependencies: first stage and classifier,
then the cache, then every size's training in parallel, then every evaluation in parallel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ldmscale.study.jobs import mark_done, pending_jobs
from ldmscale.study.tasks import KINDS

# a task's training (fine-tune or distillation, from the task registry) needs its trained size; its evaluations need it
WAVES = {
    "autoencoder": 0,
    "classifier": 0,
    "prepare": 1,
    "train": 2,
    "sanity": 2,
    "cooldown": 3,  # an IsoFLOP budget's branch, from its size's stable run
    "eval": 4,
    **{k.job_kind: 4 for k in KINDS.values()},
    "task-eval": 5,
}


def _execute(out: str, job) -> str:

    t0 = time.time()
    produced = job.run()
    mark_done(Path(out), job, time.time() - t0, produced)
    return job.id


def _submit_wave(ex, executor: str, out: Path, pending: list) -> list:
    """Submit a wave. The local executor runs its jobs side by side on this machine: each gets its share of the
    threads (LDMSCALE_THREADS, inherited), never a thread per core each; a SLURM job takes its node's cores."""

    from ldmscale.device import THREADS_ENV, thread_count

    saved = os.environ.get(THREADS_ENV)
    if executor != "slurm":
        os.environ[THREADS_ENV] = str(max(1, thread_count()[0] // len(pending)))
    try:
        return [ex.submit(_execute, str(out), j) for j in pending]
    finally:
        if saved is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = saved


def run_submitit(
    out: Path, jobs: list, executor: str, log: Callable[[str], None] = print, parameters: dict | None = None
) -> dict:
    import submitit

    out = Path(out)
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"), cluster="slurm")
    else:  # submitit's local executor: real subprocesses, the code path of SLURM without a cluster
        ex = submitit.LocalExecutor(folder=str(out / "submitit" / "%j"))
    params = {"timeout_min": 24 * 60} | dict(parameters or {})
    ex.update_parameters(**params)
    t0, ran = time.time(), 0
    for wave in sorted({WAVES.get(j.kind, 5) for j in jobs}):
        pending = pending_jobs(out, [j for j in jobs if WAVES.get(j.kind, 5) == wave], log)
        if not pending:
            continue
        log(
            f"wave {wave}: submitting {len(pending)} job(s): {', '.join(j.name for j in pending[:4])}"
            + (" ..." if len(pending) > 4 else "")
        )
        handles = _submit_wave(ex, executor, out, pending)
        failures = []
        for job, h in zip(pending, handles):
            try:
                h.result()
                ran += 1
            except Exception as e:  # report every failure of the wave, then stop before dependants
                failures.append(f"{job.name}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
        if failures:
            raise RuntimeError(
                f"{len(failures)} job(s) failed in wave {wave} (logs in {out / 'submitit'}): " + "; ".join(failures[:3])
            )
    return {"jobs": len(jobs), "ran": ran, "seconds": time.time() - t0}
