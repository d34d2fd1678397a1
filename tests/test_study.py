import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli

STUDY = """
name = "tiny"
[data]
cache = "{cache}"
[train]
sizes = ["c8", "c16"]
images = 32
curve_points = 2
[train.set]
batch_size = 8
warmup_steps = 1
[eval]
samplers = ["ddim", "ddpm"]
steps = [2, 3]
guidance = [2.0]
metrics = ["fd-classifier", "caption-accuracy"]
classifier = "{classifier}"
num_images = 8
batch_size = 8
reference_count = 50
bootstrap = 4
curve_steps = 2
curve_guidance = 2.0
"""


@pytest.fixture()
def study_file(tmp_path, tiny_cache, tiny_classifier):
    path = tmp_path / "tiny.toml"
    path.write_text(STUDY.format(cache=tiny_cache, classifier=tiny_classifier))
    return path


def test_dry_run_lists_jobs_with_cost(study_file, tmp_path):
    p = run_cli("study", "run", study_file, "--out", tmp_path / "s", "--dry-run", check=True)
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("13 jobs, 13 to run")
    assert sum(" train " in line for line in lines) == 2 and sum(" eval " in line for line in lines) == 10
    assert sum(" sanity " in line for line in lines) == 1
    assert not (tmp_path / "s").exists()


def test_killed_study_resumes_without_redoing_finished_jobs(study_file, tmp_path):
    out = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldmscale", "study", "run", str(study_file), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "jobs").glob("*.json")) if (out / "jobs").exists() else []) < 5:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.json")}
    assert 5 <= len(finished) < 13
    evals_before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval/*.json")}
    p = run_cli("study", "run", study_file, "--out", out, check=True)
    assert f"{len(finished)} already done, {13 - len(finished)} to run" in p.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.json")}
    assert len(after) == 13 and all(after[k] == v for k, v in finished.items())
    for path, mtime in evals_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 10
    # the report: figures, Markdown, self-contained HTML, planner answers
    assert "report: " in p.stdout and "plan for executed-cost budget" in p.stdout
    for name in ("training_compute", "steps", "sampling_cost", "executed_cost", "latency", "alignment"):
        assert (out / "report" / f"{name}.png").stat().st_size > 5000 and (out / "report" / f"{name}.svg").exists()
    html = (out / "report" / "report.html").read_text()
    grids = sorted((out / "report" / "samples").glob("*.png"))
    assert len(grids) >= 2 and html.count("data:image/png;base64,") == 6 + len(grids) and "Pareto frontier" in html
    analysis = json.loads((out / "report" / "analysis.json").read_text())
    assert len(analysis["best_over_guidance"]) == 8 and analysis["metric"] == "fd-classifier"
    # the paper's claims: six verdicts in the report, the summary and the command's output
    verdicts = [c["verdict"] for c in analysis["claims"]]
    assert len(verdicts) == 6 and set(verdicts) <= {"holds", "does not hold", "not measured"}
    assert [verdicts[i] for i in (1, 4, 5)] == ["not measured"] * 3  # no downstream task, no distillation
    assert "The paper's claims at this study's budget" in html and html.count('class="badge') == 6
    summary = (out / "report" / "summary.md").read_text()
    assert "| 6 | Distillation does not change it" in summary and "**not measured**" in summary
    # 8 images a point against the tiny classifier's 32 feature dimensions: said at the start and in the report
    small = "fd-classifier on 8 images a point: fewer than its 32 feature dimensions"
    assert f"**Warning:** {small}" in summary and f"warning: {small}" in p.stderr
    assert "the paper's claims at this budget" in p.stdout and "  6  not measured" in p.stdout
    assert len(analysis["sanity"]) == 4 and analysis["sanity"][0]["images"] == "train split"
    again = run_cli("study", "run", study_file, "--out", out, "--no-report", check=True)
    assert "13 already done, 0 to run" in again.stdout
    plan = run_cli("plan", out, "--budget", "1000", "--format", "json", check=True)
    best = json.loads(plan.stdout)["best"]
    assert best["size"] in ("c8", "c16") and best["steps"] in (2, 3) and best["fd-classifier_std"] > 0
    p = run_cli("plan", out, "--budget", "1e-9")
    assert p.returncode == 0 and "nothing fits" in p.stdout
    p = run_cli("plan", out)
    assert p.returncode == 2 and "exactly one of --budget" in p.stderr
    # seeds: the same study trained with [0, 1] reuses every job of seed 0 and adds seed 1's training and evaluations
    study_file.write_text(study_file.read_text().replace("curve_points = 2", "curve_points = 2\nseeds = [0, 1]"))
    p = run_cli("study", "run", study_file, "--out", out, check=True)
    assert "13 already done, 12 to run" in p.stdout
    assert (out / "runs" / "c8-seed1" / "config.json").exists() and (out / "runs" / "c16-seed1").is_dir()
    import csv

    table = list(csv.DictReader(open(out / "results.csv")))
    assert len(table) == 20 and sorted({r["train_seed"] for r in table}) == ["0", "1"]
    seed1 = [r for r in table if r["train_seed"] == "1"]
    assert all(json.loads((out / r["file"]).read_text())["seeds"][0] == 1_000_000 for r in seed1)  # its own images
    analysis = json.loads((out / "report" / "analysis.json").read_text())
    assert analysis["seeds"] == [0, 1] and len(analysis["best_over_guidance"]) == 8
    assert all(c["noise"] == "training-seed spread (2 seeds) and evaluation noise" for c in analysis["claims"])
    assert "training-seed spread (2 seeds)" in p.stdout
    control = analysis["negative_control"]
    assert control["size"] in ("c8", "c16") and control["seeds"] == [0, 1] and control["holds"] == []
    assert set(analysis["calibration"]) == {"1", "2", "3", "4", "5", "6"}
    best = json.loads(run_cli("plan", out, "--budget", "1000", "--format", "json", check=True).stdout)["best"]
    assert best["n_seeds"] == 2
    # a moved study folder keeps its results (paths inside it are compared relative to it)
    import shutil

    shutil.copytree(out, tmp_path / "moved")
    moved = json.loads(run_cli("plan", tmp_path / "moved", "--budget", "1000", "--format", "json", check=True).stdout)
    assert moved["best"] == best


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.replace('name = "tiny"', 'name = "tiny"\nepochs = 3'), "unknown key 'epochs'"),
        (lambda s: s.replace('sizes = ["c8", "c16"]', 'sizes = ["c8", "huge"]'), "unknown size 'huge'"),
        (lambda s: s.replace("steps = [2, 3]", "steps = []"), "evaluation grid is empty"),
        (lambda s: s.replace('samplers = ["ddim", "ddpm"]', 'samplers = ["ddim", "plms"]'), "unknown sampler 'plms'"),
        (lambda s: s.replace("[train.set]", "[train.set]\nlrr = 1"), "unknown key 'lrr'"),
        (lambda s: s.replace('name = "tiny"', 'name = "tiny'), "not valid TOML"),
    ],
)
def test_bad_study_files_exit_2(study_file, tmp_path, edit, needle):
    study_file.write_text(edit(study_file.read_text()))
    p = run_cli("study", "run", study_file, "--out", tmp_path / "s")
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_paper_study_plans_the_papers_compute(tmp_path):
    from ldmscale.model.family import make_size
    from ldmscale.model.flops import cost
    from ldmscale.study.plan import plan_jobs
    from ldmscale.study.spec import load_study

    study = load_study(ROOT / "studies" / "paper.toml")
    jobs = plan_jobs(study, tmp_path / "paper")
    train = [j for j in jobs if j.kind == "train"]
    assert [j.config["size"] for j in train] == [f"c{c}" for c in (64, 96, 128, 160, 192, 224, 256, 288, 320, 512, 768)]
    sd = next(j for j in train if j.config["size"] == "c320")
    assert sd.config["images"] == 500_000 * 2048 and sd.config["lr"] == 1e-4
    assert sd.cost_flops == pytest.approx(3 * 500_000 * 2048 * cost(make_size(320), 64, 77, 1024).flops)
    evals = [j for j in jobs if j.kind == "eval" and "curve" not in j.name]
    # 11 sizes x (ddim 9 + ddpm 9 + dpmsolver++ 4 step counts) x 8 guidance scales
    assert len(evals) == 11 * (9 + 9 + 4) * 8


def test_submitit_local_executor_runs_and_skips_like_local(study_file, tmp_path):
    out = tmp_path / "s"
    # one size and sampler: every job is a process that imports torch, and a wave runs them all at once
    study_file.write_text(
        study_file.read_text()
        .replace('sizes = ["c8", "c16"]', 'sizes = ["c8"]')
        .replace('samplers = ["ddim", "ddpm"]', 'samplers = ["ddim"]')
        .replace("steps = [2, 3]", "steps = [2]")
        .replace("curve_points = 2", "curve_points = 1")
    )
    p = run_cli("study", "run", study_file, "--out", out, "--executor", "submitit-local", "--no-report", check=True)
    assert "wave 2: submitting 2 job(s)" in p.stdout and "wave 4: submitting 1 job(s)" in p.stdout
    assert len(list((out / "jobs").glob("*.json"))) == 3
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 1
    again = run_cli("study", "run", study_file, "--out", out, "--executor", "submitit-local", "--no-report", check=True)
    assert "wave" not in again.stdout and "3 jobs run" not in again.stdout
    local = run_cli("study", "run", study_file, "--out", out, "--no-report", check=True)
    assert "3 already done, 0 to run" in local.stdout


def test_jobs_side_by_side_give_the_results_of_one_at_a_time(study_file, tmp_path):
    """--jobs 2 runs a wave's jobs in two processes; with the same threads per job every number is the same."""
    study_file.write_text(  # two sizes, one grid point each
        study_file.read_text()
        .replace('samplers = ["ddim", "ddpm"]', 'samplers = ["ddim"]')
        .replace("steps = [2, 3]", "steps = [2]")
        .replace("curve_points = 2", "curve_points = 1")
    )
    env = {**os.environ, "LDMSCALE_THREADS": "1", "LDMSCALE_PROGRESS": "0"}
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("study", "run", study_file, "--out", one, "--no-report", env=env, check=True)
    p = run_cli("study", "run", study_file, "--out", two, "--no-report", "-j", "2", env=env, check=True)
    assert "running 2 jobs, 2 at a time with 1 thread(s) each" in p.stdout  # the two sizes' training
    assert p.stdout.count(" at a time ") == 1  # the evaluations: one at a time, with every thread
    rows = [_rows(out / "results.csv") for out in (one, two)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    refused = run_cli("study", "run", study_file, "--out", two, "-j", "2", "--executor", "submitit-local")
    assert refused.returncode == 2 and "--jobs 2 is for the local executor" in refused.stderr


def test_fid_reference_statistics_are_one_job_the_evaluations_read(study_file, tmp_path, monkeypatch):
    """The Inception statistics of the FID points are computed once, by their own job in the training wave (beside
    the training runs on one machine), and the evaluations read them instead of computing them."""
    from ldmscale.config import from_dict
    from ldmscale.data import sources
    from ldmscale.data.cache import read_manifest
    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.evaluate import build_extractors
    from ldmscale.eval.reference import reference_stats
    from ldmscale.study.jobs import LOCAL_WAVES, WAVES
    from ldmscale.study.plan import plan_jobs
    from ldmscale.study.spec import load_study

    study_file.write_text(
        study_file.read_text()
        + 'agreement_metric = "fid"\nagreement_steps = [2]\nagreement_images = 4\nagreement_reference_count = 6\n'
    )
    jobs = plan_jobs(load_study(study_file), tmp_path / "out")
    refs = [j for j in jobs if j.kind == "reference"]
    assert [j.name for j in refs] == ["fid reference statistics (6 images)"]
    assert WAVES["reference"] == WAVES["train"] and LOCAL_WAVES["reference"] == LOCAL_WAVES["train"]
    monkeypatch.setenv("LDMSCALE_CACHE", str(tmp_path / "refcache"))
    refs[0].run()
    assert len(list((tmp_path / "refcache" / "refstats").glob("*.safetensors"))) == 1

    def no_images(*a, **k):
        raise AssertionError("an evaluation computed reference statistics again")

    monkeypatch.setattr(sources, "load_images", no_images)
    agreement = next(j for j in jobs if j.kind == "eval" and "agreement" in j.name)
    cfg = from_dict(EvalConfig, {k: v for k, v in agreement.config.items() if k != "run"})
    m = read_manifest(study_file.read_text().split('cache = "')[1].split('"')[0])
    stats, manifest = reference_stats(cfg, build_extractors(cfg)[0]["fid"], m["resolution"], m["channels"])
    assert stats.n == 6 and manifest["count"] == 6


def _rows(path) -> list[dict]:
    """results.csv less what differs between two folders and two runs: the run path, the time, latency, load."""
    import csv

    with open(path) as f:
        rows = csv.DictReader(f)
        return [
            {k: v for k, v in r.items() if k not in ("run", "created", "load_average") and "latency" not in k}
            for r in rows
        ]


def test_downstream_study_is_the_demo_plus_tasks():
    """`make demo-full` runs into the demo's folder: every shared setting must match so no finished job reruns."""
    from ldmscale.config import to_dict
    from ldmscale.study.spec import load_study

    demo, full = (to_dict(load_study(ROOT / "studies" / f"{n}.toml")) for n in ("demo", "downstream"))
    assert {k: v for k, v in full.items() if k not in ("name", "tasks")} == {
        k: v for k, v in demo.items() if k not in ("name", "tasks")
    }
    assert sorted(t["kind"] for t in full["tasks"].values()) == ["consistency", "dreambooth", "super-resolution"]


def test_a_study_file_extends_another_key_by_key_and_its_folder_copy_stands_alone(tmp_path):
    """`extends`: the other file's sections, this file's keys over them; a value (list, inline table, [train.set])
    replaces the other's whole. The copy in the study folder has it resolved. Cycles and missing files: one line."""
    from ldmscale.errors import UserError
    from ldmscale.study.spec import load_study, resolved_toml

    (tmp_path / "base.toml").write_text(
        'name = "base"\n[train]\nsizes = ["c8", "c16"]\nimages = 100\n'
        "[train.set]\nlr = 1e-3\nwarmup_steps = 5\n[eval]\nsteps = [2]\n"
        'guidance = [2.0]\nsamplers = ["ddim"]\nnum_images = 20\n'
    )
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"
    child.write_text('extends = "../base.toml"\nname = "child"\n[train]\nimages = 200\n[train.set]\nbatch_size = 8\n')
    st = load_study(child)
    assert (st.name, st.train.sizes, st.train.images, st.train.set) == (
        "child",
        ("c8", "c16"),
        200,
        {"batch_size": "8"},
    )
    assert (st.eval.steps, st.eval.num_images) == ((2,), 20)
    copy = tmp_path / "elsewhere" / "study.toml"
    copy.parent.mkdir()
    copy.write_text(resolved_toml(child))
    assert "extends =" not in copy.read_text() and load_study(copy) == st
    (tmp_path / "base.toml").write_text('extends = "sub/child.toml"\n')
    with pytest.raises(UserError, match="comes back to itself"):
        load_study(child)
    child.write_text('extends = "missing.toml"\n')
    with pytest.raises(UserError, match="study file not found"):
        load_study(child)
    for name in ("downstream", "backbones", "demo-seeds"):  # the shipped variants say only what they change
        assert (ROOT / "studies" / f"{name}.toml").read_text().count('extends = "demo.toml"') == 1


def test_seeds_study_is_the_demo_with_seeds_and_reuses_its_jobs(tmp_path):
    """`make demo-seeds` runs into the demo's folder: every job of the demo is one of its jobs (seed 0)."""
    from ldmscale.config import to_dict
    from ldmscale.study.plan import plan_jobs
    from ldmscale.study.spec import load_study

    demo, seeds = (load_study(ROOT / "studies" / f"{n}.toml") for n in ("demo", "demo-seeds"))
    a, b = to_dict(demo), to_dict(seeds)
    assert b["train"].pop("seeds") == [0, 1, 2] and a["train"].pop("seeds") == [0]
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    ids = {j.id for j in plan_jobs(demo, tmp_path / "demo")}
    more = plan_jobs(seeds, tmp_path / "demo")
    assert ids <= {j.id for j in more}
    extra = [j for j in more if j.id not in ids]
    assert sorted(j.name for j in extra if j.kind == "train") == [
        "train c16 seed 1 (32,000 images)",
        "train c16 seed 2 (32,000 images)",
        "train c32 seed 1 (32,000 images)",
        "train c32 seed 2 (32,000 images)",
        "train c8 seed 1 (91,520 images)",
        "train c8 seed 2 (91,520 images)",
    ]
    assert not [j for j in extra if "agreement" in j.name]  # the metric check is made once, on seed 0


def test_dreambooth_caption_accuracy_needs_a_class_prompt_at_planning(study_file, tmp_path):
    # caption accuracy of a subject whose class the classifier does not know used to vanish from the results
    study_file.write_text(
        study_file.read_text() + '\n[tasks.db]\nkind = "dreambooth"\nimages = 16\n'
        'set = { subject = "examples/subject_elephant", class_prompt = "a robot" }\n'
        'metrics = ["subject-ssim", "caption-accuracy"]\n'
    )
    p = run_cli("study", "run", study_file, "--out", tmp_path / "s", "--dry-run")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "ldmscale: error: [tasks.db]: caption-accuracy needs a class prompt "
        "among the classifier's classes, not 'a robot'"
    )


def test_every_task_kind_plans_its_training_and_grid(study_file, tmp_path):
    # planning reads the task registry: one training job per (task, size), then the task's default grid
    study_file.write_text(
        study_file.read_text()
        + """
[tasks.sr]
kind = "super-resolution"
images = 16
[tasks.db]
kind = "dreambooth"
images = 16
set = { subject = "examples/subject_elephant", class_prompt = "an elephant" }
[tasks.lcm]
kind = "consistency"
images = 16
[tasks.pd]
kind = "progressive"
images = 16
set = { start_steps = 4, final_steps = 2 }
"""
    )
    p = run_cli("study", "run", study_file, "--out", tmp_path / "s", "--dry-run", check=True)
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("39 jobs, 39 to run")
    names = [line.split("FLOPs", 1)[1].strip() for line in lines[:-1]]
    for size in ("c8", "c16"):
        assert {f"sr {size}", f"db {size}", f"lcm {size}", f"pd {size}"} <= set(names)
        # super-resolution: ddim at the [eval] steps, no guidance; dreambooth: the [eval] grid;
        # consistency: lcm at 1, 2, 4, 8 steps; progressive: ddim at its final round's steps
        assert [n for n in names if n.startswith(f"eval sr {size}")] == [
            f"eval sr {size} ddim 2 steps g1",
            f"eval sr {size} ddim 3 steps g1",
        ]
        assert [n for n in names if n.startswith(f"eval db {size}")] == [
            f"eval db {size} ddim 2 steps g2",
            f"eval db {size} ddim 3 steps g2",
        ]
        assert [n for n in names if n.startswith(f"eval lcm {size}")] == [
            f"eval lcm {size} lcm {s} step{'s' * (s > 1)} g2" for s in (1, 2, 4, 8)
        ]
        assert [n for n in names if n.startswith(f"eval pd {size}")] == [f"eval pd {size} ddim 2 steps g2"]


def test_eta_learns_each_kind_of_jobs_pace_shrunk_towards_the_studys():
    """A kind's pace is its own seconds over its estimate, shrunk to the study's pace by 300 estimated seconds."""
    from ldmscale.study.jobs import Eta, Job, estimated_seconds

    def job(kind, seconds):  # a job whose first-guess estimate is `seconds`
        return Job(kind, kind, {}, lambda: None, extra_seconds=seconds - estimated_seconds(Job(kind, kind, {}, None)))

    eta = Eta()
    eta.record(job("eval", 100.0), 200.0)  # evals run at twice their estimate
    assert eta.remaining([job("eval", 100.0)]) == pytest.approx(200.0)  # (200 + 2 x 300) / (100 + 300) = 2
    assert eta.remaining([job("task-eval", 50.0)]) == pytest.approx(100.0)  # an unseen kind: the study's pace
    eta.record(job("task-eval", 100.0), 50.0)  # one fast job of a new kind does not set its pace alone
    pooled = 250.0 / 200.0
    assert eta.remaining([job("task-eval", 100.0)]) == pytest.approx(100.0 * (50.0 + pooled * 300) / 400.0)
    assert eta.remaining([job("eval", 100.0)]) == pytest.approx(100.0 * (200.0 + pooled * 300) / 400.0)


def test_cluster_tables_set_a_kind_or_a_size_and_unknown_keys_are_refused(study_file, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ldmscale.errors import UserError
    from ldmscale.study.cluster import check_cluster, job_parameters

    cluster = {"slurm_partition": "gpu", "mem_gb": 10, "train": {"gpus_per_node": 8, "mem_gb": 80}, "c32": {"nodes": 2}}
    train32 = SimpleNamespace(kind="train", config={"size": "c32"})
    evaluation = SimpleNamespace(kind="eval", config={"run": "runs/c32"})
    assert job_parameters(cluster, train32) == {
        "timeout_min": 1440, "slurm_partition": "gpu", "mem_gb": 80, "gpus_per_node": 8, "nodes": 2
    }  # fmt: skip
    assert job_parameters(cluster, evaluation) == {"timeout_min": 1440, "slurm_partition": "gpu", "mem_gb": 10}
    check_cluster(cluster, {"train", "eval"}, {"c32"})
    with pytest.raises(UserError, match=r"\[cluster.c64\]: not a job kind or size of this study"):
        check_cluster({"c64": {"nodes": 2}}, {"train"}, {"c32"})
    with pytest.raises(UserError, match="gpus_per_nod"):
        check_cluster({"train": {"gpus_per_nod": 8}}, {"train"}, {"c32"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: one line, before anything is written
    p = run_cli("study", "run", study_file, "--out", tmp_path / "s", "--executor", "slurm")
    assert p.returncode == 2 and "--executor slurm needs SLURM's sbatch on PATH" in p.stderr
    assert not (tmp_path / "s").exists()
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # an sbatch, but a sacct interval that is no number
    (tmp_path / "sbatch").chmod(0o755)
    for bad, line in (("soon", "='soon' is not a number of seconds"), ("0", "=0: give 0.5 to 3600 seconds")):
        monkeypatch.setenv("LDMSCALE_SACCT_EVERY_S", bad)
        p = run_cli("study", "run", study_file, "--out", tmp_path / "s", "--executor", "slurm")
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"ldmscale: error: LDMSCALE_SACCT_EVERY_S{line}"]
        assert not (tmp_path / "s").exists()
