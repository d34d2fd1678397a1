"""Study jobs: identified by the hash of their resolved config, run in order with one progress bar and an
ETA, marked done when they finish (so a killed study loses at most the job in flight)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldmscale import integrity
from ldmscale.integrity import read_json
from ldmscale.io import atomic_write_json
from ldmscale.progress import bar
from ldmscale.study.tasks import KINDS
from ldmscale.train.config import ADDED

# the order of jobs' dependencies: a wave's jobs may run side by side once every earlier wave is done (a task's
# training, fine-tune or distillation, needs its trained size; its evaluations need it)
WAVES = {
    "autoencoder": 0,
    "classifier": 0,
    "prepare": 1,
    "train": 2,
    "sanity": 2,
    "reference": 2,  # the evaluations' Inception reference statistics (they need the data's resolution)
    "cooldown": 3,  # an IsoFLOP budget's branch, from its size's stable run
    "eval": 4,
    **{k.job_kind: 4 for k in KINDS.values()},
    "task-eval": 5,
}


@dataclass
class Job:
    kind: str  # autoencoder | classifier | prepare | train | eval | (task kinds)
    name: str
    config: dict
    run: Callable[[], object]  # returns the path of the file it produced (an eval result) to record its hash
    cost_flops: float = 0.0  # estimate, for --dry-run and the ETA
    extra_seconds: float = 0.0  # work that is not UNet FLOPs (Inception features), for the ETA

    @property
    def id(self) -> str:
        return job_id(self.kind, self.config)


def job_id(kind: str, config: dict) -> str:
    """A job's identity: the hash of its kind and resolved config (so its record's file name checks its content).
    Settings added since 0.1 (train/config.py: ADDED) are left out while they have the value every job had before
    them, so a study run before they existed keeps its finished jobs."""
    return hashlib.sha256(
        json.dumps({"kind": kind, **_without_added(config)}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def _without_added(config):
    if isinstance(config, dict):
        return {k: _without_added(v) for k, v in config.items() if not (k in ADDED and v == ADDED[k])}
    return config


def record_problem(out: Path, path: Path) -> tuple[str, list[tuple[Path, str]]]:
    """(what is wrong with a job record, its damaged outputs and what is wrong with each): the record must parse, its
    kind and config must hash to its file name (the job's id), and every output it recorded (an eval result) must
    still have the bytes and sha256 it was written with."""
    try:
        rec = read_json(path, "job record")
    except ValueError as e:
        return str(e), []
    config = rec.get("config")
    if "finished" not in rec or not isinstance(config, dict) or job_id(str(rec.get("kind")), config) != path.stem:
        return f"job record {path} is damaged (not the record of the job its name says)", []
    return "", [
        (out / rel, what) for rel, want in recorded_outputs(out, rec) if (what := integrity.damage(out / rel, want))
    ]


def check_done(out: Path, job: Job) -> tuple[bool, str, list[Path]]:
    """(done, why not, damaged outputs): done when the job's record and its outputs pass record_problem()."""
    path = out / "jobs" / f"{job.id}.json"
    if not path.exists():
        return False, "", []
    why, bad = record_problem(out, path)
    if why:
        return False, why, []
    if bad:
        return False, f"{bad[0][0]} ({job.name}) is damaged ({bad[0][1]})", [p for p, _ in bad]
    return True, "", []


def recorded_outputs(out: Path, rec: dict) -> list[tuple[str, dict]]:
    """The recorded outputs of a job record that lie inside the study folder (nothing elsewhere is ever touched)."""
    outputs = rec.get("outputs")
    return [
        (rel, want)
        for rel, want in (outputs.items() if isinstance(outputs, dict) else [])
        if isinstance(want, dict) and (out / rel).resolve().is_relative_to(Path(out).resolve())
    ]


def job_done(out: Path, job: Job) -> bool:
    return check_done(out, job)[0]


def mark_done(out: Path, job: Job, seconds: float, produced: object = None) -> None:
    """The job's record, with the bytes and sha256 of the file it produced when its run returned a path."""

    outputs = {}
    if isinstance(produced, Path) and produced.is_file() and produced.resolve().is_relative_to(out.resolve()):
        outputs[str(produced.resolve().relative_to(out.resolve()))] = integrity.record(produced)
    atomic_write_json(
        out / "jobs" / f"{job.id}.json",
        {
            "kind": job.kind,
            "name": job.name,
            "config": job.config,
            "seconds": round(seconds, 2),
            "outputs": outputs,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def pending_jobs(out: Path, jobs: list[Job], log: Callable[[str], None] = print) -> list[Job]:
    """The jobs still to run; a damaged record or output is named in one line and its output set aside (kept in
    a damaged/ folder beside it), so the job runs again from scratch."""
    pending = []
    for j in jobs:
        done, why, damaged = check_done(out, j)
        if done:
            continue
        if why:
            for p in (p for p in damaged if p.exists()):
                why += f"; moved to {integrity.set_aside(p, p.parent / 'damaged')}"
            log(f"{why}; running it again")
        pending.append(j)
    return pending


# A first guess of each job's seconds, measured on a 2-core CPU: UNet FLOPs at NOMINAL_FLOPS, a fixed cost per
# optimizer step (small models are bound by per-layer overheads), and fixed seconds per job (decoding, features,
# loading). Only the ETA uses them, and it rescales them by what each kind of job really takes here.
NOMINAL_FLOPS = 6.4e10


SECONDS_PER_STEP = 0.09


OVERHEAD_S = {
    "prepare": 15.0,
    "sanity": 5.0,
    "eval": 1.5,
    "task-eval": 3.0,
    "train": 3.0,
    "cooldown": 5.0,
    "finetune": 10.0,
    "distill": 10.0,
}


FID_SECONDS_PER_IMAGE = 0.16  # Inception-v3 at 299 px, and the 2048-d Frechet distance


def estimated_seconds(job: Job) -> float:
    if job.kind == "autoencoder":
        return 0.22 * float(job.config.get("steps", 300))
    if job.kind == "classifier":
        return 20.0 * float(job.config.get("epochs", 2)) * float(job.config.get("width", 32)) / 32
    steps = 0.0
    if job.kind in ("train", "cooldown"):  # a cooldown branch trains only its own share of the steps
        steps = float(job.config.get("images", 0)) / float(job.config.get("batch_size", 1))
        steps *= float(job.config.get("decay_fraction", 1.0)) if job.kind == "cooldown" else 1.0
    return job.cost_flops / NOMINAL_FLOPS + steps * SECONDS_PER_STEP + OVERHEAD_S.get(job.kind, 5.0) + job.extra_seconds


class Eta:
    """Remaining time = the estimate of each pending job, scaled by how fast jobs of its kind have actually run so far,
    shrunk towards all kinds' pace by PRIOR_SECONDS of estimated work, so that one slow first job of a kind does not
    swing the forecast (replaying the demo-full study's 101 jobs: worst error 47% of the time left, against 74% with
    each kind's own pace). Averages since the start, so a loaded machine stretches the whole forecast."""

    PRIOR_SECONDS = 300.0

    def __init__(self):
        self.spent: dict[str, list[float]] = {}  # kind -> [actual seconds, estimated seconds]

    def record(self, job: Job, seconds: float) -> None:
        a = self.spent.setdefault(job.kind, [0.0, 0.0])
        a[0] += seconds
        a[1] += estimated_seconds(job)

    def _ratio(self, kind: str) -> float:
        actual, est = (sum(v[i] for v in self.spent.values()) for i in (0, 1))
        pooled = actual / est if est > 0 else 1.0
        mine, mine_est = self.spent.get(kind, (0.0, 0.0))
        return (mine + pooled * self.PRIOR_SECONDS) / (mine_est + self.PRIOR_SECONDS)

    def remaining(self, pending: list[Job]) -> float:
        return sum(estimated_seconds(j) * self._ratio(j.kind) for j in pending)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def run_jobs(
    out: Path, jobs: list[Job], progress: bool = True, log: Callable[[str], None] = print, parallel: int = 1
) -> dict:
    """Run the jobs, skipping finished ones; one progress bar over estimated seconds, with an ETA that learns each
    kind of job's real speed on this machine. With parallel > 1, up to that many jobs of one wave run side by side in
    their own processes, each with its share of this process's threads."""

    pending = pending_jobs(out, jobs, log)
    done0 = len(jobs) - len(pending)
    log(f"study {out}: {len(jobs)} jobs, {done0} already done, {len(pending)} to run")
    pbar = bar(
        total=sum(estimated_seconds(j) for j in pending),
        desc="study",
        unit="est-s",
        enabled=progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]",
    )
    eta, t_start, left = Eta(), time.time(), list(pending)

    def time_left() -> str:  # the jobs trained side by side take about 1/parallel of their time
        side = [j for j in left if parallel > 1 and j.kind not in ONE_AT_A_TIME]
        alone = [j for j in left if j not in side]
        return _clock(eta.remaining(side) / max(1, min(parallel, len(side))) + eta.remaining(alone))

    def finished(job: Job, seconds: float, produced: object) -> None:
        mark_done(out, job, seconds, produced)
        eta.record(job, seconds)
        left.remove(job)
        pbar.update(min(estimated_seconds(job), pbar.total - pbar.n))  # the sum's rounding must not pass 100%
        pbar.set_postfix_str(f"<{time_left()} left, jobs {len(jobs) - len(left)}/{len(jobs)}, done: {job.name}")

    for group in _groups(pending) if parallel > 1 else [[j] for j in pending]:
        if len(group) == 1:  # in this process, with all its threads
            job = group[0]
            pbar.set_postfix_str(f"<{time_left() if eta.spent else '?'} left, now: {job.name}")
            t0 = time.time()
            produced = job.run()
            finished(job, time.time() - t0, produced)
        else:
            _run_side_by_side(group, parallel, finished, log)
    pbar.set_postfix_str(f"jobs {len(jobs)}/{len(jobs)}")
    pbar.close()
    return {"jobs": len(jobs), "ran": len(pending), "seconds": time.time() - t_start}


# Evaluations sample in batches of hundreds, which keep every thread busy: side by side at one thread each the demo's
# 60 took 1,055 s of job time against 412 s one at a time with two threads (and each process loaded Inception and
# computed the reference statistics again). Training at batch 32 leaves a core idle between small operations.
ONE_AT_A_TIME = {"eval", "task-eval", "sanity"}
# On one machine the classifier (needed by the evaluations and the sanity check only) trains beside the sizes, where
# a core is free, instead of beside the first stage, which then has both threads (171 s against 250 s with one)
LOCAL_WAVES = WAVES | {"classifier": 2, "sanity": 3}


def _groups(pending: list[Job]) -> list[list[Job]]:
    """Wave by wave: the training jobs side by side (the longest first, so that they end together), then each
    evaluation on its own."""
    by_wave: dict[int, list[Job]] = {}
    for j in pending:
        by_wave.setdefault(LOCAL_WAVES.get(j.kind, 5), []).append(j)
    groups = []
    for w in sorted(by_wave):
        side = sorted((j for j in by_wave[w] if j.kind not in ONE_AT_A_TIME), key=estimated_seconds, reverse=True)
        groups += [side] if side else []
        groups += [[j] for j in by_wave[w] if j.kind in ONE_AT_A_TIME]
    return groups


def _in_worker(blob: bytes, threads: int) -> tuple[object, float]:
    import cloudpickle

    from ldmscale.device import THREADS_ENV, set_threads

    os.environ[THREADS_ENV] = str(threads)  # and for any process the job starts
    set_threads(threads)
    job = cloudpickle.loads(blob)
    t0 = time.time()
    return job.run(), time.time() - t0


def _run_side_by_side(wave: list[Job], parallel: int, finished, log: Callable[[str], None]) -> None:
    """One wave's jobs in `parallel` spawned processes. Two processes of one thread train 1.6-1.9x the images a second
    of one process with two on a 2-core CPU (c32 to c8, bench/side_by_side.py): small models leave a core idle between
    operations. A job that fails lets the running ones finish (and be recorded), starts no more, and is raised as it
    was."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import cloudpickle
    import torch

    workers = min(parallel, len(wave))
    threads = max(1, torch.get_num_threads() // workers)
    log(f"running {len(wave)} jobs, {workers} at a time with {threads} thread(s) each")
    error = None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_in_worker, cloudpickle.dumps(j), threads): j for j in wave}
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    job = futures.pop(f)
                    if f.cancelled():
                        continue
                    if f.exception() is not None:
                        error = error or f.exception()
                        log(f"failed: {job.name}: {f.exception()}")
                        for other in futures:  # no new ones; the running ones finish and are kept
                            other.cancel()
                        continue
                    produced, seconds = f.result()
                    finished(job, seconds, produced)
        except BaseException:  # Ctrl-C: the workers got it too; what finished is recorded, the rest runs next time
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if error is not None:
        raise error
