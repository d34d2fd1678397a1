"""Studies on a real one-node SLURM (tests/slurm/start.sh): every job through sbatch and seen by sacct, results equal
to the local executor's, a 2-task training job data-parallel from SLURM's environment, and the faults clusters
have (scancel, a time limit, a preemption signal, a job the node refuses).

LDMSCALE_TEST_SLURM=0 skips these (with that reason); LDMSCALE_TEST_SLURM=require (.ci/run) fails instead of
skipping when SLURM cannot start."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

from ldmscale.checkpoint import list_checkpoints

pytestmark = pytest.mark.xdist_group("slurm")
START = ROOT / "tests" / "slurm" / "start.sh"

STUDY = """
name = "tiny"
[data]
cache = "{cache}"
[train]
sizes = ["c8"]
images = {images}
curve_points = 1
[train.set]
batch_size = 8
warmup_steps = 1
checkpoint_every = 160
[eval]
samplers = ["ddim"]
steps = [2]
guidance = [2.0]
metrics = ["fd-classifier", "caption-accuracy"]
classifier = "{classifier}"
num_images = 8
batch_size = 8
reference_count = 50
bootstrap = 4
curve_steps = 2
curve_guidance = 2.0
{cluster}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Local and SLURM runs on one thread each: bit-equality holds for equal thread counts (summation order)."""
    saved = os.environ.get("LDMSCALE_THREADS")
    os.environ["LDMSCALE_THREADS"] = "1"
    yield
    if saved is None:
        os.environ.pop("LDMSCALE_THREADS")
    else:
        os.environ["LDMSCALE_THREADS"] = saved


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    mode = os.environ.get("LDMSCALE_TEST_SLURM", "1")
    if mode == "0":
        pytest.skip("LDMSCALE_TEST_SLURM=0: the one-node SLURM tests are off")
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(START), str(d)], capture_output=True, text=True, timeout=900)
    if p.returncode == 3 and mode != "require":
        pytest.skip(p.stderr.strip())
    assert p.returncode == 0, p.stderr[-3000:]
    env = {"SLURM_CONF": str(d / "etc" / "slurm.conf"), "PATH": os.environ["PATH"] + ":/usr/sbin"}
    yield env
    subprocess.run(["bash", str(START), "--stop", str(d)], timeout=120)


def study(tmp_path, cache, classifier, images=32, cluster=""):
    path = tmp_path / f"tiny-{images}-{abs(hash(cluster))}.toml"
    path.write_text(STUDY.format(cache=cache, classifier=classifier, images=images, cluster=cluster))
    return path


def sacct(env, *job_ids, wait=60) -> dict[str, str]:
    """{job id: state} of the batch jobs, from SLURM's accounting, once none is pending or running (a job's
    result file is written a moment before its process ends)."""
    for _ in range(wait * 2):
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout
        states = dict(line.split("|") for line in out.strip().splitlines())
        if not {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"} & set(states.values()):
            break
        time.sleep(0.5)
    return states


def slurm_ids(stdout: str) -> dict[str, str]:
    """{job name: SLURM job id} from study run's log lines."""
    return {
        line.split(": SLURM job ")[0].strip(): line.split(": SLURM job ")[1].strip()
        for line in stdout.splitlines()
        if ": SLURM job " in line
    }


def weights(run):
    ckpt = list_checkpoints(run)[-1]
    return load_file(ckpt / "model.safetensors")


def rows(out):
    """results.csv without what names the folder or the clock (run path, latency, time of writing)."""
    with open(out / "results.csv") as f:
        return [
            {k: v for k, v in r.items() if k not in ("run", "latency_ms_per_image", "load_average", "created")}
            for r in csv.DictReader(f)
        ]


def test_a_study_through_sbatch_equals_the_local_executor_after_a_refused_job(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    local = tmp_path / "local"
    run_cli("study", "run", study(tmp_path, tiny_cache, tiny_classifier), "--out", local, "--no-report", check=True)
    # first with a job the node refuses: more memory than it has; the rest of its wave runs and is recorded
    refused = study(tmp_path, tiny_cache, tiny_classifier, cluster="[cluster.sanity]\nmem_gb = 100000")
    out = tmp_path / "slurm"
    p = run_cli("study", "run", refused, "--out", out, "--executor", "slurm", "--no-report", env=slurm)
    assert p.returncode == 1, p.stderr[-3000:]
    reason = "Memory specification can not be satisfied; Requested node configuration is not available"
    assert f"failed: metric sanity (fd-classifier): refused by SLURM: {reason}" in p.stdout.splitlines()
    assert p.stderr.strip().splitlines()[-1].startswith("ldmscale: stopped: 1 job(s) failed in wave 2")
    first = slurm_ids(p.stdout)
    assert list(first) == ["train c8 (32 images)"] and len(list((out / "jobs").glob("*.json"))) == 1

    p = run_cli("study", "run", study(tmp_path, tiny_cache, tiny_classifier), "--out", out, "--executor", "slurm",
                "--no-report", env=slurm)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ids = first | slurm_ids(p.stdout)
    assert "wave 2: submitting 1 job(s): metric sanity" in p.stdout and "wave 4: submitting 1 job(s)" in p.stdout
    assert sacct(slurm, *ids.values()) == {i: "COMPLETED" for i in ids.values()}  # every job went through SLURM
    assert len(ids) == 3 and all((out / "submitit" / i / f"{i}_0_log.out").exists() for i in ids.values())
    assert rows(out) == rows(tmp_path / "local")  # same seeds, same threads: the same numbers, row for row
    a, b = weights(tmp_path / "local" / "runs" / "c8"), weights(out / "runs" / "c8")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_task_training_job_runs_data_parallel_from_slurms_environment(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    cluster = "[cluster.train]\ntasks_per_node = 2\ncpus_per_task = 1"
    path = study(tmp_path, tiny_cache, tiny_classifier, cluster=cluster)
    one = tmp_path / "one"
    run_cli("study", "run", study(tmp_path, tiny_cache, tiny_classifier), "--out", one, "--no-report", check=True)
    p = run_cli("study", "run", path, "--out", tmp_path / "two", "--executor", "slurm", "--no-report", env=slurm)
    assert p.returncode == 0, p.stderr[-3000:]
    train_id = slurm_ids(p.stdout)["train c8 (32 images)"]
    logs = tmp_path / "two" / "submitit" / train_id
    assert (logs / f"{train_id}_0_log.out").exists() and (logs / f"{train_id}_1_log.out").exists()
    assert "WORLD_SIZE" not in os.environ  # set in the job's processes only, from SLURM's variables
    a, b = weights(tmp_path / "one" / "runs" / "c8"), weights(tmp_path / "two" / "runs" / "c8")
    # the tolerance of the accelerate-launched DDP test (test_train_sample.py): only the all-reduce's order differs
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-5).float().mean() > 0.995 and diff.max() <= 4 * 1e-3 + 1e-6
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two processes really summed the gradients
    cfg = json.loads((tmp_path / "two" / "runs" / "c8" / "config.json").read_text())
    assert cfg["machine"]["processes"] == 2


# 200 optimizer steps, about 55 s on one thread: still training when SLURM signals it (5-35 s after it starts) and
# after it resumes from a checkpoint (every 20 steps)
LONG = 1600


def test_a_training_job_through_a_time_limit_and_scancel_ends_bit_equal_to_an_uninterrupted_run(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    local = tmp_path / "local"
    path = study(tmp_path, tiny_cache, tiny_classifier, LONG)
    run_cli("study", "run", path, "--out", local, "--no-report", check=True)
    # a 1-minute limit; SLURM sends USR2 55 s before it (at its next 30-s check); submitit requeues the same call
    cluster = "[cluster.train]\ntimeout_min = 1\nslurm_signal_delay_s = 55"
    limited, out = study(tmp_path, tiny_cache, tiny_classifier, LONG, cluster), tmp_path / "s"
    cmd = [sys.executable, "-m", "ldmscale", "study", "run", str(limited), "--out", str(out), "--executor", "slurm"]
    env = {**os.environ, **slurm}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs, t0 = out / "submitit", time.time()
    resumed = ""
    while not resumed:  # until the requeued job has resumed from its checkpoint, then cancel it halfway
        assert proc.poll() is None and time.time() - t0 < 300, "the training was not requeued at its time limit"
        queue = subprocess.run(["squeue", "-h", "-o", "%i|%r|%j"], capture_output=True, text=True, env=env).stdout
        for job, reason, _ in (ln.split("|") for ln in queue.splitlines() if "ldmscale train c8" in ln):
            if reason == "BeginTime":  # SLURM holds a requeued job 2 minutes; the test lets it start at once
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
            log = logs / job / f"{job}_0_log.err"
            if log.exists() and "this job is timed-out" in log.read_text() and "continuing" in log.read_text():
                resumed = job
        time.sleep(0.5)
    subprocess.run(["scancel", resumed], env=env, check=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    assert f"failed: train c8 ({LONG:,} images) (job {resumed}): CANCELLED by 0: " in stdout
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", resumed], capture_output=True,
                             text=True, env=env).stdout.splitlines()  # fmt: skip
    assert set(history[:-1]) == {"REQUEUED"} and history[-1] == "CANCELLED by 0", history  # time limit(s), scancel
    steps_before = max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "runs" / "c8"))
    assert steps_before < LONG // 8

    # the next study run (the limit raised) resubmits it; it resumes and finishes
    again = run_cli("study", "run", path, "--out", out, "--executor", "slurm", "--no-report", env=slurm)
    assert again.returncode == 0, again.stderr[-3000:]
    job = slurm_ids(again.stdout)[f"train c8 ({LONG:,} images)"]
    assert sacct(slurm, job) == {job: "COMPLETED"}
    log = (logs / job / f"{job}_0_log.err").read_text()
    assert f"continuing {out / 'runs' / 'c8'} from step-{steps_before:06d}" in log
    a, b = weights(tmp_path / "local" / "runs" / "c8"), weights(out / "runs" / "c8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (out / "runs" / "c8" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps))  # the ledger counts no step twice
    assert rows(out) == rows(tmp_path / "local")
