"""Cluster fan-out of a study through submitit: each job is an ordinary ldmscale job run on a SLURM node.

The same rules as the local executor: finished jobs (STUDY/jobs/<id>.json) are skipped; a job marks itself
done when it finishes, so a cancelled or failed SLURM job is simply run again next time (training resumes
from its checkpoint). Jobs go out in waves that respect their dependencies: first stage and classifier,
then the cache, then every size's training in parallel, then every evaluation in parallel.

A job that SLURM signals before its time limit or a preemption (USR2, submitit's convention) is requeued with
the same arguments and resumes from its last checkpoint within the same `study run`. A job that asks for more
tasks than one runs data-parallel from SLURM's environment: submitit starts one process per task (srun) and
exports RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM's variables, which accelerate reads (gloo on CPUs, NCCL on
GPUs) -- no torchrun inside the job.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from ldmscale.errors import JobsFailed, UserError
from ldmscale.study.jobs import WAVES, mark_done, pending_jobs

# how often a study asks sacct about a job that ended without a result (scancel, a node failure, out of memory);
# LDMSCALE_SACCT_EVERY_S changes it (the tests' one-node SLURM polls every 2 s)
SACCT_EVERY_S = 30
SACCT_ENV = "LDMSCALE_SACCT_EVERY_S"


def sacct_every_s() -> float:
    value = os.environ.get(SACCT_ENV, "").strip() or str(SACCT_EVERY_S)
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"{SACCT_ENV}={value!r} is not a number of seconds") from None
    if not 0.5 <= seconds <= 3600:
        raise UserError(f"{SACCT_ENV}={value}: give 0.5 to 3600 seconds")
    return seconds


class Execute(submitit.helpers.Checkpointable):
    """One study job in a SLURM job (every task of it). Checkpointable: on USR2 submitit requeues the same call,
    which resumes from the run's last checkpoint as any interrupted ldmscale job does."""

    def __init__(self, out: str, job) -> None:
        self.out, self.job = out, job

    def __call__(self) -> str:
        from ldmscale.device import set_threads

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one process per task: accelerate forms the process group from these variables
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        set_threads()  # as the CLI does: the job's CPUs, not a thread per core of the node
        t0 = time.time()
        produced = self.job.run()
        if env.global_rank == 0:
            mark_done(Path(self.out), self.job, time.time() - t0, produced)
        return self.job.id


def job_parameters(cluster: dict, job) -> dict:
    """A job's submitit parameters: [cluster]'s plain keys, then a [cluster.KIND] table (train, eval, cooldown,
    ...), then a [cluster.SIZE] table for the jobs of that size (c32: more GPUs or memory for the large ones)."""
    params = {"timeout_min": 24 * 60} | {k: v for k, v in cluster.items() if not isinstance(v, dict)}
    params |= cluster.get(job.kind, {})
    size = job.config.get("size")
    return params | (cluster.get(size, {}) if isinstance(size, str) else {})


def check_cluster(cluster: dict, kinds: set[str], sizes: set[str], executor: str = "slurm") -> None:
    """Refuse a [cluster] table that names neither a job kind nor a size, and a key submitit does not know."""
    known = kinds | sizes | set(WAVES)
    for key, value in cluster.items():
        if isinstance(value, dict) and key not in known:
            raise UserError(f"[cluster.{key}]: not a job kind or size of this study ({', '.join(sorted(known))})")
    with tempfile.TemporaryDirectory() as folder:  # submitit makes its folder; the probe's goes away with it
        probe = submitit.AutoExecutor(folder=folder, cluster="slurm" if executor == "slurm" else "local")
        for table in [cluster, *(v for v in cluster.values() if isinstance(v, dict))]:
            try:
                probe.update_parameters(
                    **{k: v for k, v in table.items() if not isinstance(v, dict) and k != "max_num_timeout"}
                )
            except (TypeError, ValueError, NameError) as e:
                raise UserError(f"[cluster]: {str(e).strip().splitlines()[0]}") from None


def preflight(cluster: dict, jobs: list, executor: str) -> None:
    """What can be refused before anything is written: no sbatch here, a [cluster] key or table that is wrong."""
    if executor == "slurm":
        if not shutil.which("sbatch"):
            raise UserError("--executor slurm needs SLURM's sbatch on PATH (run on a login node); none found here")
        sacct_every_s()
    check_cluster(cluster, {j.kind for j in jobs}, {j.config.get("size") for j in jobs} - {None}, executor)


def _refusal(e: Exception) -> str:
    """SLURM's reason in one line, from sbatch's stderr as submitit passes it on."""
    lines = [ln.strip() for ln in str(e).splitlines() if "error:" in ln]
    reasons = [ln.split("error:", 1)[1].strip() for ln in lines] or [str(e).strip().splitlines()[-1]]
    return "; ".join(dict.fromkeys(r.removeprefix("Batch job submission failed: ") for r in reasons if r))


def _submit(out: Path, executor: str, cluster: dict, job, threads: str | None):
    """Submit one job; the local executor runs a wave's jobs side by side, each with its share of the threads
    (LDMSCALE_THREADS, inherited), never a thread per core each; a SLURM job takes what its allocation gives."""
    from ldmscale.device import THREADS_ENV

    params = job_parameters(cluster, job)
    ex = submitit.AutoExecutor(
        folder=str(out / "submitit" / "%j"),
        cluster="slurm" if executor == "slurm" else "local",
        slurm_max_num_timeout=int(params.pop("max_num_timeout", 3)),  # requeues at the time limit, then it fails
    )
    ex.update_parameters(name=f"ldmscale {job.name}"[:120], **params)
    saved = os.environ.get(THREADS_ENV)
    if threads is not None:
        os.environ[THREADS_ENV] = threads
    try:
        return ex.submit(Execute(str(out), job))
    finally:
        if saved is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = saved


def _outcome(handle) -> str | None:
    """None when every task of the job finished, else why not in one line (SLURM's state when it ended it)."""
    try:
        handle.results()
        return None
    except Exception as e:  # the job's own error, or what srun said when SLURM ended it
        text = str(e).strip()
        text = text.splitlines()[-1] if text else type(e).__name__
    try:  # SLURM's word for it (CANCELLED by 0, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, FAILED): results() returned only
        state = handle.get_info(mode="force").get("State", "")  # once sacct called the job done, so it is an end state
    except Exception:
        state = ""
    return f"{state}: {text}" if state and not text.startswith(state) else text


def run_submitit(
    out: Path, jobs: list, executor: str, log: Callable[[str], None] = print, parameters: dict | None = None
) -> dict:
    from ldmscale.device import thread_count

    out, cluster = Path(out), dict(parameters or {})  # checked by preflight() before the study folder was touched
    # a job SLURM ended without a result is seen through sacct, at most once every sacct_every_s() for the whole
    # study, where submitit waits up to 10 minutes between calls
    submitit.slurm.slurm.SlurmJob.watcher._delay_s = sacct_every_s()
    t0, ran = time.time(), 0
    for wave in sorted({WAVES.get(j.kind, 5) for j in jobs}):
        pending = pending_jobs(out, [j for j in jobs if WAVES.get(j.kind, 5) == wave], log)
        if not pending:
            continue
        log(
            f"wave {wave}: submitting {len(pending)} job(s): {', '.join(j.name for j in pending[:4])}"
            + (" ..." if len(pending) > 4 else "")
        )
        share = None if executor == "slurm" else str(max(1, thread_count()[0] // len(pending)))
        failures, handles = [], []
        for job in pending:  # a job SLURM refuses is named with its reason; the rest of the wave still runs
            try:
                h = _submit(out, executor, cluster, job, share)
            except submitit.core.utils.FailedJobError as e:
                failures.append(f"{job.name}: refused by SLURM: {_refusal(e)}")
                continue
            log(f"  {job.name}: SLURM job {h.job_id}" if executor == "slurm" else f"  {job.name}: pid {h.job_id}")
            handles.append((job, h))
        for job, h in handles:
            why = _outcome(h)
            if why is None:
                ran += 1
            else:
                failures.append(f"{job.name} (job {h.job_id}): {why}")
        if failures:  # stop before the jobs that depend on this wave; the next study run resubmits what is missing
            for f in failures:
                log(f"failed: {f}")
            raise JobsFailed(
                f"{len(failures)} job(s) failed in wave {wave} (logs in {out / 'submitit'}); "
                "run the same command again to resubmit them (training resumes from its checkpoint)"
            )
    return {"jobs": len(jobs), "ran": ran, "seconds": time.time() - t0}
