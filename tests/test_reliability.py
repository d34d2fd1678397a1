"""The silent wrong answers and tracebacks that testers found, each pinned by a test that failed before its fix."""

import errno
import io
import json
import tarfile

import numpy as np
import pytest
from conftest import run_cli, tiny_train_config
from fixtures import make_folder, make_tars, png_bytes, shape_image
from PIL import Image

from ldmscale.errors import UserError


def test_16_bit_and_float_images_are_scaled_by_their_bit_depth(tmp_path):
    from ldmscale.data.sources import preprocess

    sixteen = Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))
    assert sixteen.mode.startswith("I")
    assert preprocess(sixteen, 8, 1).mean() == 128  # PIL's convert("L") makes it 255
    path = tmp_path / "f.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(path)
    with Image.open(path) as im:
        assert im.mode == "F" and preprocess(im, 8, 1).mean() == 128  # convert("L") makes it 0


def test_folder_with_root_metadata_naming_split_files(tmp_path):
    from ldmscale.data.sources import count, iterate, parse_source

    root = tmp_path / "data"
    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
        for i in range(3):
            shape_image(i).save(root / split / f"{i}.png")
    shape_image(9).save(root / "train" / "nocaption.png")
    rows = [{"file_name": f"{s}/{i}.png", "text": f"{s} {i}"} for s in ("train", "validation") for i in range(3)]
    rows.append({"file_name": "../outside.png", "text": "escape"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = parse_source(f"folder:{root}")
    items = list(iterate(src, "train"))
    assert [(i.key, i.caption) for i in items if i.image] == [
        ("train/0.png", "train 0"),
        ("train/1.png", "train 1"),
        ("train/2.png", "train 2"),
    ]
    errors = {i.key: i.error for i in items if not i.image}
    assert errors == {
        "../outside.png": "path outside the dataset folder (not read)",
        "nocaption.png": "no caption in the metadata",
    }
    assert count(src, "train") == len(items) == 5
    assert [i.caption for i in iterate(src, "validation") if i.image] == [
        "validation 0",
        "validation 1",
        "validation 2",
    ]


def test_captions_csv_row_without_caption(tmp_path):
    from ldmscale.data.sources import iterate, parse_source

    make_folder(tmp_path / "f", n=2, corrupt=False)
    (tmp_path / "f" / "metadata.jsonl").unlink()
    (tmp_path / "f" / "captions.csv").write_text("file_name,text\nimg00.png,a square\nimg01.png\n")
    items = list(iterate(parse_source(f"folder:{tmp_path / 'f'}"), "train"))
    assert [i.caption for i in items] == ["a square", ""]


def test_webdataset_shards_that_are_cut_short_empty_or_not_tar(tmp_path):
    from ldmscale.data.sources import iterate, parse_source

    pattern = make_tars(tmp_path / "w", shards=2, per_shard=3)
    first = tmp_path / "w" / "00000.tar"
    data = first.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # cut inside the second sample's image
        cut = [m for m in tar.getmembers()][2].offset_data + 10
    first.write_bytes(data[:cut])
    items = list(iterate(parse_source(f"wds:{pattern}"), "train"))
    good = [i.key for i in items if i.image]
    assert good == ["000000", "000003", "000004", "000005"]
    (err,) = [i.error for i in items if not i.image]
    assert "is cut short after 1 samples" in err
    (tmp_path / "w" / "00001.tar").write_bytes(b"")
    items = list(iterate(parse_source(f"wds:{pattern}"), "train"))
    assert "00001.tar is not a tar file" in items[-1].error
    with pytest.raises(UserError, match="only local tar shards"):
        parse_source("wds:pipe:cat x.tar")


def test_prepare_refuses_a_split_without_readable_images(tmp_path, tiny_ae):
    from ldmscale.data.cache import prepare
    from ldmscale.data.config import PrepareConfig

    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(shape_image(1))[:20])
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="split 'train' has no readable image .1 item.s. skipped"):
        prepare(PrepareConfig(source=f"folder:{root}", autoencoder=str(tiny_ae)), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_eval_reference_defaults_to_the_runs_data_and_names_carry_it(tiny_run, tiny_classifier, tmp_path):
    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.evaluate import evaluate, result_name

    cfg = EvalConfig(
        sampler="ddim",
        steps=1,
        guidance=1.0,
        num_images=4,
        classifier=str(tiny_classifier),
        metrics=("fd-classifier",),
        reference_count=20,
        batch_size=4,
    )
    r = evaluate(tiny_run, cfg, progress=False)
    assert r["reference"]["spec"] == "animal-mnist:validation"
    assert r["metrics"]["fd-classifier"] > 0  # 4 images: the bootstrap no longer crashes
    names = {
        result_name(EvalConfig(reference=ref, classifier=c), "step-000006")
        for ref in ("animal-mnist:validation", "animal-mnist:train")
        for c in ("a", "b")
    }
    assert len(names) == 4


def test_extending_a_cosine_run_is_refused_and_a_constant_one_extends(tmp_path, tiny_cache):
    from ldmscale.train.loop import train

    train(tiny_train_config(tiny_cache, images=16, lr_schedule="cosine"), tmp_path / "cos", progress=False)
    with pytest.raises(UserError, match="cosine lr schedule planned for 16 images"):
        train(tiny_train_config(tiny_cache, images=32, lr_schedule="cosine"), tmp_path / "cos", progress=False)
    train(tiny_train_config(tiny_cache, images=16), tmp_path / "const", progress=False)
    r = train(tiny_train_config(tiny_cache, images=32), tmp_path / "const", progress=False)
    assert r["step"] == 4


def test_a_run_that_fails_to_start_leaves_nothing(tmp_path, tiny_cache, monkeypatch):
    import diffusers

    from ldmscale.train.loop import train

    def broken(**kw):
        raise MemoryError("simulated: the model does not fit")

    monkeypatch.setattr(diffusers, "UNet2DConditionModel", broken)
    with pytest.raises(MemoryError):
        train(tiny_train_config(tiny_cache), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # no config.json to refuse the corrected retry


def test_a_full_disk_names_the_last_good_checkpoint(tmp_path, tiny_cache, monkeypatch):
    from ldmscale import checkpoint
    from ldmscale.train.loop import train

    train(tiny_train_config(tiny_cache, images=16), tmp_path / "run", progress=False)
    real = checkpoint.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError, match="no space left on device .* last good checkpoint: step-000002"):
        train(tiny_train_config(tiny_cache, images=32), tmp_path / "run", progress=False)
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))


def test_autoencoder_step_counts_and_bad_shapes(tmp_path):
    from ldmscale.data.autoencoder import train_autoencoder
    from ldmscale.data.config import AutoencoderConfig

    r = train_autoencoder(
        AutoencoderConfig(steps=20, batch_size=4, max_images=16, block_out_channels=(8, 8), norm_groups=4),
        tmp_path / "ae",
        progress=False,
    )
    assert r["config"]["steps"] == 20  # OneCycleLR divided by zero at exactly 20 steps
    with pytest.raises(UserError, match="resolution 30 is not a multiple of its downsampling factor 4"):
        AutoencoderConfig(resolution=30)
    p = run_cli("train", "--config", tmp_path / "ae" / "config.json", "--out", tmp_path / "x")
    assert p.returncode == 2 and "unknown key" in p.stderr
    (tmp_path / "bad.json").write_text("{not json")
    p = run_cli("train", "--config", tmp_path / "bad.json", "--out", tmp_path / "x")
    assert p.returncode == 2 and "not valid JSON" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_guidance_that_is_not_finite_is_refused_before_sampling(tiny_run, tmp_path):
    for g in ("inf", "nan"):
        p = run_cli("sample", "--run", tiny_run, "--prompt", "a cat", "--guidance", g, "--out", tmp_path / g)
        assert p.returncode == 2 and "not a finite number" in p.stderr
        assert not (tmp_path / g).exists()


def test_a_warmup_longer_than_the_run_is_said_at_the_start_and_recorded(tmp_path, tiny_cache, capsys):
    from ldmscale.train.loop import train

    train(
        tiny_train_config(tiny_cache, images=32, warmup_steps=100, checkpoint_at=(2, 9)), tmp_path / "r", progress=False
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(err) == 2 and "warmup_steps=100 is not shorter than the run (4 optimizer steps of 8 images)" in err[0]
    assert "ends at 4% of it" in err[0] and "checkpoint_at steps 9 are after the run's last step (4)" in err[1]
    warnings = json.loads((tmp_path / "r" / "config.json").read_text())["warnings"]
    assert [w[:30] for w in warnings] == [e.split("warning: ")[1][:30] for e in err]
