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
from test_study import STUDY as TINY

from ldmscale.checkpoint import list_checkpoints
from ldmscale.study.cluster import SACCT_ENV

pytestmark = pytest.mark.xdist_group("slurm")
START = ROOT / "tests" / "slurm" / "start.sh"

# test_study.py's tiny study, one size, one grid point and one curve point: 3 jobs in 2 waves
STUDY = (
    TINY.replace('sizes = ["c8", "c16"]', 'sizes = ["c8"]')
    .replace("images = 32", "images = {images}")
    .replace("curve_points = 2", "curve_points = 1")
    .replace("warmup_steps = 1\n", "warmup_steps = 1\ncheckpoint_every = {every}\n")
    .replace('samplers = ["ddim", "ddpm"]', 'samplers = ["ddim"]')
    .replace("steps = [2, 3]", "steps = [2]")
    + "{cluster}\n"
)


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
    # sacct every 2 s (a study's default is 30): a cancelled job is seen at once
    env = {"SLURM_CONF": str(d / "etc" / "slurm.conf"), "PATH": os.environ["PATH"] + ":/usr/sbin", SACCT_ENV: "2"}
    yield env
    subprocess.run(["bash", str(START), "--stop", str(d)], timeout=120)


def study(tmp_path, cache, classifier, images=32, cluster="", sanity=True, every=160):
    path = tmp_path / f"tiny-{images}-{abs(hash(cluster))}-{sanity}.toml"
    text = STUDY.format(cache=cache, classifier=classifier, images=images, cluster=cluster, every=every)
    path.write_text(text if sanity else text.replace("[eval]\n", "[eval]\nsanity = false\n"))
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


def _popen_study(path, out, env):
    cmd = [sys.executable, "-m", "ldmscale", "study", "run", str(path), "--out", str(out), "--executor", "slurm"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_job(env) -> str | None:
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, env=env).stdout
    return next((ln.split("|")[0] for ln in queue.splitlines() if "ldmscale train c8" in ln), None)


def test_a_study_through_sbatch_with_a_refused_and_a_cancelled_job_ends_equal_to_the_local_executor(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    # 160 steps, checkpoints every 5: scancel comes at the first, and the 155 steps left take longer than the kill
    # window (KillWait 5 s; submitit lets the job run on through SIGTERM, so a job that finished its work within
    # it would rightly count as done: seen in CI with 28 steps left, about 4.6 s)
    path, local, out = study(tmp_path, tiny_cache, tiny_classifier, 1280, every=40), tmp_path / "local", tmp_path / "s"
    run_cli("study", "run", path, "--out", local, "--no-report", check=True)
    # first with a job the node refuses (more memory than it has) beside the training, which scancel stops halfway
    refused = study(tmp_path, tiny_cache, tiny_classifier, 1280, "[cluster.sanity]\nmem_gb = 100000", every=40)
    env = {**os.environ, **slurm}
    proc = _popen_study(refused, out, env)
    c8 = out / "runs" / "c8"
    t0 = time.time()
    while not list_checkpoints(c8):
        assert proc.poll() is None and time.time() - t0 < 300, "no checkpoint"
        time.sleep(0.2)
    job = _train_job(env)
    subprocess.run(["scancel", job], env=env, check=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    reason = "Memory specification can not be satisfied; Requested node configuration is not available"
    assert f"failed: metric sanity (fd-classifier): refused by SLURM: {reason}" in stdout.splitlines()
    assert "failed: train c8 (1,280 images) (job " + job + "): CANCELLED by 0: " in stdout, stdout  # SLURM's state
    assert stderr.strip().splitlines()[-1].startswith("ldmscale: stopped: 2 job(s) failed in wave 2")
    assert sacct(slurm, job) == {job: "CANCELLED by 0"} and not (out / "jobs").exists()
    at = max(int(p.name.split("-")[1]) for p in list_checkpoints(c8))
    assert at < 160

    # the same command again (the memory request dropped) resubmits both; the training continues from its checkpoint
    p = run_cli("study", "run", path, "--out", out, "--executor", "slurm", "--no-report", env=slurm)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = slurm_ids(p.stdout)
    assert "wave 2: submitting 2 job(s)" in p.stdout and "wave 4: submitting 1 job(s)" in p.stdout
    assert sacct(slurm, *ids.values()) == {i: "COMPLETED" for i in ids.values()}  # every job went through SLURM
    assert len(ids) == 3 and all((out / "submitit" / i / f"{i}_0_log.out").exists() for i in ids.values())
    train = ids["train c8 (1,280 images)"]
    assert f"continuing {c8} from step-{at:06d}" in (out / "submitit" / train / f"{train}_0_log.err").read_text()
    assert rows(out) == rows(local)  # same seeds, same threads: the same numbers, row for row
    a, b = weights(local / "runs" / "c8"), weights(c8)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-equal to the uninterrupted run
    steps = [r["step"] for r in map(json.loads, (c8 / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(20, 161, 20))  # the ledger (a line every 20 steps) counts no step twice


def test_a_two_task_training_job_runs_data_parallel_from_slurms_environment(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    cluster = "[cluster.train]\ntasks_per_node = 2\ncpus_per_task = 1"
    path = study(tmp_path, tiny_cache, tiny_classifier, cluster=cluster, sanity=False)  # a training and its eval
    one = tmp_path / "one"
    local = study(tmp_path, tiny_cache, tiny_classifier, sanity=False)
    run_cli("study", "run", local, "--out", one, "--no-report", check=True)
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


def test_a_training_job_at_its_time_limit_is_requeued_and_continues_from_its_checkpoint(
    slurm, tmp_path, tiny_cache, tiny_classifier
):
    # a 1-minute limit; SLURM sends USR2 45 s before it (at its next 30-s check, 15-45 s after the start: never
    # before the job's process has started) and submitit requeues the same call. 4,000 images is longer than the
    # test waits: it cancels the job once it has continued (that a continued run ends bit-equal to an uninterrupted
    # one is the test above)
    cluster = "[cluster.train]\ntimeout_min = 1\nslurm_signal_delay_s = 45"
    # sacct at the study's default 30 s here: the test forces each requeued job to start at once (scontrol update
    # StartTime=now), which can leave SLURM a failed zero-second incarnation for a moment (seen with a 2-s poll)
    env, out = {**os.environ, **slurm, SACCT_ENV: "30"}, tmp_path / "s"
    proc = _popen_study(study(tmp_path, tiny_cache, tiny_classifier, 4000, cluster, sanity=False), out, env)
    t0, job, log = time.time(), None, ""
    while not ("this job is timed-out" in log and "ldmscale: continuing" in log):
        if proc.poll() is not None:
            raise AssertionError(f"the study run ended ({proc.returncode}):\n{proc.stdout.read()}{proc.stderr.read()}")
        assert time.time() - t0 < 300, f"not requeued at its time limit:\n{log}"
        queue = subprocess.run(["squeue", "-h", "-o", "%i|%r|%j"], capture_output=True, text=True, env=env).stdout
        for job, reason, _ in (ln.split("|") for ln in queue.splitlines() if "ldmscale train c8" in ln):
            if reason == "BeginTime":  # SLURM holds a requeued job 2 minutes; the test lets it start at once
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
            path = out / "submitit" / job / f"{job}_0_log.err"
            log = path.read_text() if path.exists() else ""
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, check=True)
    proc.communicate(timeout=300)
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                             text=True, env=env).stdout.splitlines()  # fmt: skip
    assert set(history[:-1]) == {"REQUEUED"} and history[-1] == "CANCELLED by 0", history  # time limit(s), scancel
    script = (out / "submitit" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --time=1\n" in script and "#SBATCH --signal=USR2@45\n" in script
    resumed = [ln for ln in log.splitlines() if ln.startswith("ldmscale: continuing")][-1]
    assert resumed.startswith(f"ldmscale: continuing {out / 'runs' / 'c8'} from step-")  # where the limit came
    assert 0 < int(resumed.split("from step-")[1][:6]) < 500  # (how far it got in 15-45 s depends on the load)
