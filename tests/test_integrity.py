"""Every byte a run or a latent cache holds is verified when read back. The fault cases are generated: each file kind,
damaged each way disks and interrupted copies damage files (truncate, garble, delete, replace), for each verb that
reads it. Each case asserts the one line, the exit code, the recovery, and that nothing else changed.
(Studies, sources and full disks: test_integrity_study.py; the damages: damage.py.)"""

import json
import shutil

import pytest
import torch
from conftest import tiny_train_config
from damage import DAMAGES, cli, content, digest, garble, quiet, replace, truncate  # noqa: F401  (quiet: autouse)

from ldmscale import checkpoint
from ldmscale.errors import UserError

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
    args = {
        "sample": [
            "sample",
            "--run",
            run,
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--out",
            tmp_path / "out",
        ],
        "eval": [
            "eval",
            "--run",
            run,
            "--steps",
            "2",
            "--num-images",
            "4",
            "--classifier",
            tiny_classifier,
            "--reference-count",
            "20",
            "--bootstrap",
            "0",
        ],
        "export": ["export", "--run", run, "--out", tmp_path / "out"],
    }[verb]
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
            "step-000003" in p.name for p in (run / "eval").glob("*.json")
        )
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
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_checkpoint_option_names_a_checkpoint_of_this_run_only(run, tmp_path, capsys, tiny_run):
    other = tiny_run / "checkpoints" / "step-000003"
    for which in (str(other), "../../other/runs/c8/checkpoints/step-000003", "step-3/../../x"):
        code, _, err = cli(
            capsys, "sample", "--run", run, "--prompt", "a cat", "--checkpoint", which, "--out", tmp_path / "o"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a checkpoint of run" in err
    code, out, err = cli(
        capsys,
        "sample",
        "--run",
        run,
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--num-images",
        "1",
        "--checkpoint",
        run / "checkpoints" / "step-000003",
        "--out",
        tmp_path / "o",
    )
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
    assert json.loads((run / "config.json").read_text()) == {
        k: v for k, v in original.items() if k not in ("machine", "warnings")
    }
    assert (run / "damaged" / "config.json").read_text() == "{garbage"
    assert cli(capsys, "verify", run)[0] == 0


# ------------------------------------------------------------------------------------------ latent caches

CACHE_FILES = (
    "train/shard-00000.safetensors",
    "train/shard-00001.safetensors",
    "validation/shard-00000.safetensors",
    "empty_caption.safetensors",
    "manifest.json",
    "index.json",
)


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
    code, _, err = cli(
        capsys,
        "train",
        "--cache",
        cache,
        "--size",
        "c8",
        "--images",
        "16",
        "--batch-size",
        "8",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "shard-00001.safetensors is damaged" in err and f"ldmscale verify {cache} --repair" in err
    assert not (tmp_path / "r").exists()
