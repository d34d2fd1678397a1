"""Every byte read back is verified. The fault cases are generated: each file kind a run, a latent cache and a study
folder hold, damaged each way disks and interrupted copies damage files (truncate, garble, delete, replace), for each
verb that reads it. Each case asserts the one line, the exit code, the recovery, and that nothing else changed."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from ldmscale import checkpoint
from ldmscale.errors import UserError

# ------------------------------------------------------------------------------------------ damages


def truncate(p: Path, other: Path | None = None) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garble(p: Path, other: Path | None = None) -> None:
    b = bytearray(p.read_bytes())
    i = len(b) // 2
    b[i:i + 8] = bytes(x ^ 0xFF for x in b[i:i + 8])
    p.write_bytes(bytes(b))


def delete(p: Path, other: Path | None = None) -> None:
    p.unlink()


class _Crafted:
    def __reduce__(self):
        return (print, ("code ran from a crafted pickle",))


def replace(p: Path, other: Path | None = None) -> None:
    """Another valid file of the same kind: the same file of another checkpoint or shard, or a crafted pickle."""
    if other is not None and other.exists():
        shutil.copyfile(other, p)
    else:
        p.write_bytes(pickle.dumps(_Crafted()))


DAMAGES = {"truncate": truncate, "garble": garble, "delete": delete, "replace": replace}


def cli(capsys, *args) -> tuple[int, str, str]:
    """The ldmscale command in this process (no start-up cost): exit code, stdout, stderr."""
    from ldmscale.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def content(path: Path) -> tuple:
    """A safetensors file's tensors and metadata (its bytes are not reproducible: the header's key order is not)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tuple((k, f.get_tensor(k).tolist()) for k in sorted(f.keys())), sorted((f.metadata() or {}).items())


def digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock" and p != skip}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LDMSCALE_PROGRESS", "0")


# ------------------------------------------------------------------------------------------ checkpoints

CKPT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json")


@pytest.fixture()
def run(tmp_path, tiny_run):
    """A copy of the tiny run: checkpoints at steps 3 and 6."""
    shutil.copytree(tiny_run, tmp_path / "c8", ignore=shutil.ignore_patterns(".lock", "eval"))
    return tmp_path / "c8"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", CKPT_FILES)
def test_every_damage_to_a_checkpoint_is_named_and_the_previous_one_used(run, name, damage, capsys):
    last, prev = run / "checkpoints" / "step-000006", run / "checkpoints" / "step-000003"
    DAMAGES[damage](last / name, prev / name)
    before = digest(run)
    problem = checkpoint.damage(last)
    assert name in problem or (name == "state.json" and "state.json" in problem), problem
    assert checkpoint.damage(prev) == ""
    capsys.readouterr()
    assert checkpoint.resolve(run, only=None) == prev  # every file: what a resume reads
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and f"using {prev.name}" in lines[0] and "kept" in lines[0]
    # sampling, evaluation and export read the weights only: a damaged optimizer.pt does not stop them
    assert checkpoint.resolve(run) == (last if name == "optimizer.pt" else prev)
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1 and out.splitlines()[0].startswith(f"damaged: {last}: ") and "1 damaged" in out
    with pytest.raises(UserError, match=f"checkpoint {last} is damaged"):
        checkpoint.resolve(run, "6", only=None)
    assert digest(run) == before  # reading never changes anything


@pytest.mark.parametrize("verb", ["sample", "eval", "export"])
def test_sample_eval_and_export_use_the_newest_intact_checkpoint(run, verb, tmp_path, capsys, tiny_classifier):
    last = run / "checkpoints" / "step-000006"
    truncate(last / "model.safetensors")
    before = digest(run)
    args = {"sample": ["sample", "--run", run, "--prompt", "a cat", "--steps", "2", "--num-images", "2", "--out",
                       tmp_path / "out"],
            "eval": ["eval", "--run", run, "--steps", "2", "--num-images", "4", "--classifier", tiny_classifier,
                     "--reference-count", "20", "--bootstrap", "0"],
            "export": ["export", "--run", run, "--out", tmp_path / "out"]}[verb]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "damaged" in line]
    assert len(notes) == 1 and "model.safetensors" in notes[0] and "using step-000003" in notes[0]
    if verb == "sample":
        assert json.loads((tmp_path / "out" / "sample.json").read_text())["checkpoint"] == "step-000003"
    elif verb == "export":
        assert "checkpoint: step-000003" in (tmp_path / "out" / "ldmscale_source.txt").read_text()
    else:
        assert [p.name for p in (run / "eval").glob("*.json")] and all(
            "step-000003" in p.name for p in (run / "eval").glob("*.json"))
    assert {k: v for k, v in digest(run).items() if not k.startswith("eval/")} == before


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_resume_from_a_damaged_latest_checkpoint_ends_bit_equal(run, name, tiny_run, tiny_cache, capsys):
    from ldmscale.train.loop import train

    last = run / "checkpoints" / "step-000006"
    garble(last / name) if name != "optimizer.pt" else replace(last / name)
    damaged_bytes = (last / name).read_bytes()
    cfg = tiny_train_config(tiny_cache)
    train(cfg, run, progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {last} is damaged ({name}" in err and "using step-000003" in err
    kept = run / "checkpoints" / "damaged" / "step-000006" / name
    assert kept.read_bytes() == damaged_bytes  # set aside, never deleted
    for w in ("raw", "ema"):
        a = checkpoint.load_weights(tiny_run / "checkpoints" / "step-000006", w)
        b = checkpoint.load_weights(checkpoint.resolve(run), w)
        assert all(torch.equal(a[k], b[k]) for k in a), w
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the ledger counts every step once
    code, out, _ = cli(capsys, "verify", run)
    assert code == 0 and "0 damaged" in out


def test_a_resume_without_any_checkpoint_rewrites_the_ledger(tmp_path, tiny_cache, monkeypatch):
    import ldmscale.train.loop as loop

    real = loop.batch_indices

    def dies(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(loop, "batch_indices", dies)
    cfg = tiny_train_config(tiny_cache, checkpoint_every=48)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "r", progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(loop, "batch_indices", real)
    loop.train(cfg, tmp_path / "r", progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5, 6]


def test_checkpoint_option_names_a_checkpoint_of_this_run_only(run, tmp_path, capsys, tiny_run):
    other = tiny_run / "checkpoints" / "step-000003"
    for which in (str(other), "../../other/runs/c8/checkpoints/step-000003", "step-3/../../x"):
        code, _, err = cli(capsys, "sample", "--run", run, "--prompt", "a cat", "--checkpoint", which, "--out",
                           tmp_path / "o")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a checkpoint of run" in err
    code, out, err = cli(capsys, "sample", "--run", run, "--prompt", "a cat", "--steps", "1", "--num-images", "1",
                         "--checkpoint", run / "checkpoints" / "step-000003", "--out", tmp_path / "o")
    assert code == 0 and json.loads((tmp_path / "o" / "sample.json").read_text())["checkpoint"] == "step-000003"


def test_verify_repair_sets_damaged_checkpoints_aside_and_rewrites_the_config(run, capsys, tiny_run):
    garble(run / "checkpoints" / "step-000006" / "ema.safetensors")
    (run / "config.json").write_text("{garbage")
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1 and out.count("damaged: ") == 2
    code, out, _ = cli(capsys, "verify", run, "--repair")
    assert code == 0 and "0 still damaged after repair" in out
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000003"
    assert (run / "checkpoints" / "damaged" / "step-000006" / "ema.safetensors").exists()
    original = json.loads((tiny_run / "config.json").read_text())
    assert json.loads((run / "config.json").read_text()) == {k: v for k, v in original.items()
                                                             if k not in ("machine", "warnings")}
    assert (run / "damaged" / "config.json").read_text() == "{garbage"
    assert cli(capsys, "verify", run)[0] == 0


# ------------------------------------------------------------------------------------------ latent caches

CACHE_FILES = ("train/shard-00000.safetensors", "train/shard-00001.safetensors", "validation/shard-00000.safetensors",
               "empty_caption.safetensors", "manifest.json", "index.json")


@pytest.fixture()
def cache(tmp_path, tiny_cache):
    shutil.copytree(tiny_cache, tmp_path / "cache", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "cache"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", CACHE_FILES)
def test_every_damage_to_a_cache_is_named_and_repaired(cache, name, damage, capsys, tmp_path):
    from ldmscale.data.cache import LatentCache

    shards = {p: content(p) for p in sorted(cache.rglob("*.safetensors"))}
    other = cache / ("train/shard-00001.safetensors" if name.endswith(".safetensors") else "prepare.json")
    DAMAGES[damage](cache / name, other if other != cache / name else cache / "train/shard-00000.safetensors")
    code, out, _ = cli(capsys, "verify", cache)
    if name == "index.json" and damage == "delete":  # a cache from before the index: structure checks only
        assert code == 0
    else:
        assert code == 1 and f"damaged: {cache / name}" in out
    if name != "index.json":
        with pytest.raises(UserError, match=f"{cache / name}|{cache}") as e:
            LatentCache(cache, name.split("/")[0] if "/" in name else "train")
        assert "--repair" in str(e.value) or "ldmscale data prepare" in str(e.value)
    if damage in ("truncate", "replace"):  # the repair re-encodes only what is damaged, to the same bytes
        code, out, err = cli(capsys, "verify", cache, "--repair")
        assert code == 0, out + err
        assert {p: content(p) for p in shards} == shards
        LatentCache(cache, "train")


def test_a_training_on_a_damaged_shard_fails_in_one_line(cache, tmp_path, capsys):
    garble(cache / "train" / "shard-00001.safetensors")
    code, _, err = cli(capsys, "train", "--cache", cache, "--size", "c8", "--images", "16", "--batch-size", "8",
                       "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "shard-00001.safetensors is damaged" in err and f"ldmscale verify {cache} --repair" in err
    assert not (tmp_path / "r").exists()


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
        mp.setenv("LDMSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "ldmscale-cache"))  # as conftest does
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
    others = [p for p in (study / "jobs").glob("*.json") if p != rec] if what == "record" else \
        [p for p in result.parent.glob("*.json") if p != result]
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
        ("0.png", False, ""), ("1.png", False, ""), ("2.png", False, ""),
        ("link.png", True, "path outside the dataset folder (not read)")]
    code, _, err = cli(capsys, "data", "prepare", "--source", f"folder:{tmp_path / 'd'}", "--autoencoder", tiny_ae,
                       "--out", tmp_path / "c")
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
    assert [(i.key, i.caption, i.error[:10]) for i in items] == [("a", "a cat", ""), ("b", "", "no caption"),
                                                                 ("c", "", "no caption")]


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


def test_a_full_disk_during_prepare_is_one_line_and_the_same_command_finishes(tmp_path, tiny_ae, tiny_cache, capsys,
                                                                              monkeypatch):
    import ldmscale.data.cache as cache_mod

    args = ["data", "prepare", "--source", "animal-mnist", "--autoencoder", tiny_ae, "--text-encoder", "minilm",
            "--resolution", "32", "--shard-size", "64", "--num-images", "96", "--out", tmp_path / "c"]
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
    code, _, err = cli(capsys, "sample", "--run", tiny_run, "--prompt", "a cat", "--steps", "1", "--num-images", "2",
                       "--out", tmp_path / "s")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left on device" in err
    assert not list(tmp_path.iterdir())
