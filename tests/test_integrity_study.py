"""Every job record and eval result a study holds is verified when read back (each damaged each way, for study run,
plan and verify); data sources name every item they skip; a full disk is one line with nothing partial left."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import worker_cache
from damage import DAMAGES, cli, content, digest, quiet  # noqa: F401  (quiet: autouse)

# ------------------------------------------------------------------------------------------ studies

STUDY = """
name = "tiny-integrity"
[data]
cache = "{cache}"
[train]
sizes = ["c8"]
images = 16
curve_points = 1
[train.set]
batch_size = 8
warmup_steps = 1
[eval]
samplers = ["ddim"]
steps = [1, 2]
guidance = [2.0]
metrics = ["fd-classifier"]
classifier = "{classifier}"
num_images = 4
batch_size = 4
reference_count = 20
bootstrap = 0
curve_steps = 1
curve_guidance = 2.0
"""


@pytest.fixture(scope="module")
def done_study(tmp_path_factory, tiny_cache, tiny_classifier):
    from ldmscale.cli.main import main

    root = tmp_path_factory.mktemp("study")
    (root / "tiny.toml").write_text(STUDY.format(cache=tiny_cache, classifier=tiny_classifier))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as e:
        mp.setenv("LDMSCALE_CACHE", str(worker_cache(tmp_path_factory)))
        mp.setenv("LDMSCALE_PROGRESS", "0")
        main(["study", "run", str(root / "tiny.toml"), "--out", str(root / "s"), "--no-report"])
    assert e.value.code == 0
    shutil.copytree(root / "s", root / "pristine")
    return root


@pytest.fixture()
def study(done_study):
    """The finished study, restored after each test (in place: job ids hold the study's absolute paths)."""
    yield done_study / "s"
    shutil.rmtree(done_study / "s")
    shutil.copytree(done_study / "pristine", done_study / "s")


def _eval_record(study: Path) -> tuple[Path, Path]:
    """A job record of an evaluation and the result it recorded."""
    for rec in sorted((study / "jobs").glob("*.json")):
        data = json.loads(rec.read_text())
        if data["kind"] == "eval" and data["outputs"]:
            return rec, study / next(iter(data["outputs"]))
    raise AssertionError("no eval job record with an output")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("what", ["record", "result"])
def test_a_damaged_job_record_or_eval_result_is_run_again(study, what, damage, capsys):
    rec, result = _eval_record(study)
    csv_before = (study / "results.csv").read_text()
    target = rec if what == "record" else result
    others = (
        [p for p in (study / "jobs").glob("*.json") if p != rec]
        if what == "record"
        else [p for p in result.parent.glob("*.json") if p != result]
    )
    DAMAGES[damage](target, others[0])
    before = digest(study, skip=target)
    code, out, _ = cli(capsys, "verify", study)
    if what == "record" and damage == "delete":  # a job without a record has not run yet: nothing is damaged
        assert code == 0
    else:
        assert code == 1 and (f"damaged: {target}" in out or f"damaged: {rec}" in out), out
    if what == "result" and damage != "delete":
        code, out, _ = cli(capsys, "plan", study, "--budget", "1e9")  # reads every result: no traceback
        assert code == 0
    code, out, err = cli(capsys, "study", "run", study.parent / "tiny.toml", "--out", study, "--no-report")
    assert code == 0 and "1 to run" in out
    assert damage == "delete" and what == "record" or "running it again" in out + err
    assert _measured(study / "results.csv") == _measured_text(csv_before)  # the same numbers back
    after = digest(study)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed <= {"results.csv", str(rec.relative_to(study)), str(result.relative_to(study))}, changed
    assert cli(capsys, "verify", study)[0] == 0


def _measured_text(text: str) -> list[dict]:
    """The rows of a results.csv without what depends on the clock (latency, dates)."""
    import csv
    import io

    timing = ("latency", "seconds", "created", "time", "load", "threads")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in csv.DictReader(io.StringIO(text))]


def _measured(path: Path) -> list[dict]:
    return _measured_text(path.read_text())


def test_results_csv_holds_only_the_jobs_of_the_current_study_file(study, tmp_path, capsys):
    before = _measured(study / "results.csv")
    f = tmp_path / "tiny.toml"
    f.write_text((study.parent / "tiny.toml").read_text().replace("steps = [1, 2]", "steps = [1]"))
    code, out, _ = cli(capsys, "study", "run", f, "--out", study, "--no-report")
    assert code == 0 and "1 results of jobs no longer in the study left out, kept on disk" in out
    rows = _measured(study / "results.csv")
    assert rows == [r for r in before if r["steps"] == "1"] and len(rows) == len(before) - 1


def test_report_and_plan_from_results_csv_alone(study, capsys):
    """A study folder copied without its runs (results.csv and study.toml only) still reports and plans, with the
    same answers and verdicts as with its runs, and says where it read them from."""
    assert cli(capsys, "study", "report", study)[0] == 0
    before = json.loads((study / "report" / "analysis.json").read_text())
    plan = cli(capsys, "plan", study, "--budget", "0.01", "--format", "json")
    shutil.move(study / "runs", study.parent / "runs-away")
    try:
        code, out, err = cli(capsys, "study", "report", study)
        assert code == 0 and f"no evaluation results under {study}/runs: reading {study}/results.csv" in err
        after = json.loads((study / "report" / "analysis.json").read_text())
        assert after["claims"] == before["claims"] and after["plans"] == before["plans"]
        assert "no sample grid: c8's run" in (study / "report" / "summary.md").read_text()
        assert cli(capsys, "plan", study, "--budget", "0.01", "--format", "json")[:2] == plan[:2]
    finally:
        shutil.move(study.parent / "runs-away", study / "runs")


def test_plan_in_milliseconds_says_what_the_latencies_were_measured_under(study, capsys):
    from ldmscale.analysis.scaling import latency_note
    from ldmscale.device import cpu_model
    from ldmscale.study.results import read_csv

    code, out, _ = cli(capsys, "plan", study, "--budget-ms", "1e9")
    rows = read_csv(study / "results.csv")
    assert code == 0 and out.splitlines()[-1] == latency_note(rows)
    assert out.splitlines()[-1].startswith(f"latencies measured on {cpu_model()}, {rows[0]['threads']} thread")
    busy = [dict(r, load_average=r["cores"] + 0.5) for r in rows[:1]] + [dict(r, load_average=0.5) for r in rows[1:]]
    assert latency_note(busy).endswith(
        f"; 1 of {len(rows)} under load (load average up to {rows[0]['cores'] + 0.5:g} "
        f"on {rows[0]['cores']} cores): those are slower than on an idle machine, so a "
        "budget in ms reads them pessimistically"
    )
    idle = [dict(r, load_average=r["cores"]) for r in rows]
    assert latency_note(idle).endswith(
        f"; none under load (load average up to {rows[0]['cores']:g} on {rows[0]['cores']} cores)"
    )


# ------------------------------------------------------------------------------------------ sources and full disks


def test_a_folder_without_metadata_refuses_links_outside_and_a_cache_without_captions(tmp_path, tiny_ae, capsys):
    from PIL import Image

    from ldmscale.data.sources import iterate, parse_source

    (tmp_path / "d").mkdir()
    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / "d" / f"{i}.png")
    Image.new("L", (32, 32), 200).save(tmp_path / "secret.png")
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "secret.png")
    items = list(iterate(parse_source(f"folder:{tmp_path / 'd'}"), "train"))
    assert [(i.key, i.image is None, i.error) for i in items] == [
        ("0.png", False, ""),
        ("1.png", False, ""),
        ("2.png", False, ""),
        ("link.png", True, "path outside the dataset folder (not read)"),
    ]
    code, _, err = cli(
        capsys,
        "data",
        "prepare",
        "--source",
        f"folder:{tmp_path / 'd'}",
        "--autoencoder",
        tiny_ae,
        "--out",
        tmp_path / "c",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no captions" in err and "metadata.jsonl" in err


def test_a_webdataset_sample_without_caption_is_skipped_and_listed(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from ldmscale.data.sources import iterate, parse_source

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, caption in (("a", b"a cat"), ("b", None), ("c", b"  ")):
            buf = io.BytesIO()
            Image.new("L", (8, 8)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", caption)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    items = list(iterate(parse_source(f"wds:{tmp_path / 's.tar'}"), "train"))
    assert [(i.key, i.caption, i.error[:10]) for i in items] == [
        ("a", "a cat", ""),
        ("b", "", "no caption"),
        ("c", "", "no caption"),
    ]


def _full_disk_after(monkeypatch, module, name: str, calls: int = 0):
    """Make module.name raise ENOSPC from its (calls+1)-th call, after writing some bytes of it."""
    import errno

    real, seen = getattr(module, name), {"n": 0}

    def full(*a, **k):
        seen["n"] += 1
        if seen["n"] > calls:
            target = next((x for x in a if isinstance(x, (str, Path))), None)
            if target is not None and not Path(target).is_dir():
                Path(target).write_bytes(b"\0" * 100)  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(module, name, full)


def test_a_full_disk_during_prepare_is_one_line_and_the_same_command_finishes(
    tmp_path, tiny_ae, tiny_cache, capsys, monkeypatch
):
    import ldmscale.data.cache as cache_mod

    args = [
        "data",
        "prepare",
        "--source",
        "animal-mnist",
        "--autoencoder",
        tiny_ae,
        "--text-encoder",
        "minilm",
        "--resolution",
        "32",
        "--shard-size",
        "64",
        "--num-images",
        "96",
        "--out",
        tmp_path / "c",
    ]
    _full_disk_after(monkeypatch, cache_mod, "save_file", calls=1)
    code, _, err = cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no space left on device writing" in err and "shard-00001.safetensors" in err and "MB free" in err
    assert not list((tmp_path / "c").rglob("*.tmp")) and not (tmp_path / "c" / "manifest.json").exists()
    monkeypatch.undo()
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    want = {p.relative_to(tiny_cache): content(p) for p in sorted(tiny_cache.rglob("shard-*.safetensors"))}
    assert {p.relative_to(tmp_path / "c"): content(p) for p in sorted((tmp_path / "c").rglob("shard-*"))} == want


def test_a_full_disk_during_export_and_sample_leaves_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    import ldmscale.images as images

    _full_disk_after(monkeypatch, StableDiffusionPipeline, "save_pretrained")
    code, _, err = cli(capsys, "export", "--run", tiny_run, "--out", tmp_path / "e")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"writing {tmp_path / 'e'}" in err
    assert not list(tmp_path.iterdir())
    _full_disk_after(monkeypatch, images, "save_png", calls=1)
    code, _, err = cli(
        capsys,
        "sample",
        "--run",
        tiny_run,
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--num-images",
        "2",
        "--out",
        tmp_path / "s",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left on device" in err
    assert not list(tmp_path.iterdir())
