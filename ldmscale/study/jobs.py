"""Study jobs: identified by the hash of their resolved config, run in order with one progress bar and an
ETA, marked done when they finish (so a killed study loses at most the job in flight)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldmscale import integrity
from ldmscale.integrity import read_json
from ldmscale.io import atomic_write_json
from ldmscale.progress import bar
from ldmscale.train.config import ADDED


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


def run_jobs(out: Path, jobs: list[Job], progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the jobs in order, skipping finished ones; one progress bar over estimated seconds, with an ETA that
    learns each kind of job's real speed on this machine."""

    pending = pending_jobs(out, jobs, log)
    done0 = len(jobs) - len(pending)
    log(f"study {out}: {len(jobs)} jobs, {done0} already done, {len(pending)} to run")
    weights = [estimated_seconds(j) for j in pending]
    pbar = bar(
        total=sum(weights),
        desc="study",
        unit="est-s",
        enabled=progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]",
    )
    eta, t_start = Eta(), time.time()
    for n, (job, w) in enumerate(zip(pending, weights)):
        left = _clock(eta.remaining(pending[n:])) if eta.spent else "?"
        pbar.set_postfix_str(f"<{left} left, jobs {done0 + n}/{len(jobs)}, now: {job.name}")
        t0 = time.time()
        produced = job.run()
        mark_done(out, job, time.time() - t0, produced)
        eta.record(job, time.time() - t0)
        pbar.update(w)
    pbar.set_postfix_str(f"jobs {len(jobs)}/{len(jobs)}")
    pbar.close()
    return {"jobs": len(jobs), "ran": len(pending), "seconds": time.time() - t_start}
