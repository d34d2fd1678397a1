import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from fixtures import caption, make_folder, make_hf, make_tars
from PIL import Image
from safetensors import safe_open

import ldmscale.data.cache as cache_mod
from ldmscale.data import sources as data
from ldmscale.data.cache import LatentCache, prepare, read_manifest
from ldmscale.data.config import PrepareConfig
from ldmscale.data.text import load_text_encoder
from ldmscale.errors import UserError


def test_animal_mnist_source_and_fixed_split():
    src = data.parse_source("animal-mnist")
    assert data.splits(src) == ["train", "validation"]
    assert data.count(src, "train") == 9000 and data.count(src, "validation") == 1000
    idx = data.animal_mnist_split_indices()
    assert len(set(idx["train"]) & set(idx["validation"])) == 0
    _, labels = data.animal_mnist_arrays()
    assert np.bincount(labels[idx["validation"]]).tolist() == [100] * 10
    # shuffled once, fixed: any prefix is a class-balanced sample (the files are sorted by class)
    assert len(set(labels[idx["validation"][:50]].tolist())) >= 8
    assert len(set(labels[idx["train"][:50]].tolist())) >= 8
    items = list(zip(range(3), data.iterate(src, "validation")))
    first = items[0][1]
    assert first.image.size == (28, 28) and first.label == labels[idx["validation"][0]]
    assert data.ANIMAL_CLASSES[first.label] in first.caption
    # fixed: the same item at the same position every time
    again = next(data.iterate(src, "validation"))
    assert (again.key, again.caption) == (first.key, first.caption)
    assert data.label_of_prompt("a photo of a zebra") == 9 and data.label_of_prompt("a car") == -1


def test_a_source_without_validation_split_holds_out_every_tenth_item(tmp_path):
    """One rule for every source without a validation split (folder, WebDataset, a one-split dataset): positions
    9, 19, ... of its fixed order are "validation", the rest "train"; resuming at any position agrees."""
    src = data.parse_source(f"folder:{make_folder(tmp_path / 'f', n=25, corrupt=False)}")
    keys = [f"img{i:02d}.png" for i in range(25)]
    assert data.splits(src) == ["train", "validation"]
    assert (data.count(src, "train"), data.count(src, "validation")) == (23, 2)
    train = [it.key for it in data.iterate(src, "train")]
    assert train == [k for i, k in enumerate(keys) if i not in (9, 19)]
    assert [it.key for it in data.iterate(src, "validation")] == ["img09.png", "img19.png"]
    for start in range(24):
        assert [it.key for it in data.iterate(src, "train", start)] == train[start:]
    assert [it.key for it in data.iterate(src, "validation", 1)] == ["img19.png"]
    assert data.validation_rule(src) == "held out: every 10th item of 'train' (positions 9, 19, ...)"
    small = data.parse_source(f"folder:{make_folder(tmp_path / 's', n=9, corrupt=False)}")
    assert data.splits(small) == ["train"] and data.validation_rule(small) == (
        "none: 'train' has fewer than 10 items to hold one out"
    )
    wds = data.parse_source(f"wds:{make_tars(tmp_path / 't', shards=4, per_shard=5)}")
    assert [it.key for it in data.iterate(wds, "validation")] == [it.key for it in data._iterate(wds, "train", 0)][
        9::10
    ]


def test_preprocess_center_crops_and_resizes():
    from PIL import Image

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # the centre square is white
    out = data.preprocess(img, 8, 1)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    assert out.min() >= 250
    rgb = data.preprocess(img, 16, 3)
    assert rgb.shape == (3, 16, 16)


def test_folder_source_reports_corrupt_file(tmp_path):
    root = make_folder(tmp_path / "imgs", n=4)
    src = data.parse_source(f"folder:{root}")
    items = list(data.iterate(src, "train"))
    assert [i.key for i in items] == sorted(["img00.png", "img01.png", "img02.png", "img03.png", "broken.png"])
    bad = [i for i in items if i.error]
    assert [i.key for i in bad] == ["broken.png"] and bad[0].image is None
    good = {i.key: i.caption for i in items if not i.error}
    assert good["img03.png"] == caption(3)


def test_folder_with_captions_csv(tmp_path):
    root = tmp_path / "csvimgs"
    make_folder(root, n=3, corrupt=False)
    (root / "metadata.jsonl").unlink()
    (root / "captions.csv").write_text("file_name,caption\nimg00.png,zero\nimg01.png,one\n")
    items = list(data.iterate(data.parse_source(f"folder:{root}"), "train"))
    assert [(i.key, i.caption) for i in items if i.image] == [("img00.png", "zero"), ("img01.png", "one")]
    assert [(i.key, i.error) for i in items if not i.image] == [("img02.png", "no caption in the metadata")]


def test_webdataset_two_shards(tmp_path):
    pattern = make_tars(tmp_path / "tars", shards=2, per_shard=3)
    src = data.parse_source(f"wds:{pattern}")
    items = list(data.iterate(src, "train"))
    assert [i.caption for i in items] == [caption(i) for i in range(6)]
    assert all(i.image.size == (24, 24) for i in items)
    resumed = list(data.iterate(src, "train", start=4))
    assert [i.caption for i in resumed] == [caption(4), caption(5)]


def test_hf_saved_dataset(tmp_path):
    root = make_hf(tmp_path / "hfds", n=5)
    src = data.parse_source(f"hf:{root}")
    items = list(data.iterate(src, "train"))
    assert [i.caption for i in items] == [caption(i) for i in range(5)]
    assert np.array_equal(np.asarray(items[2].image.convert("RGB")), np.asarray(__import__("fixtures").shape_image(2)))


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("folder:/no/such/dir", "folder not found"),
        ("wds:/no/such/{0..3}.tar", "no tar shards match"),
        ("s3://bucket", "unknown source"),
    ],
)
def test_bad_source_specs(spec, needle):
    with pytest.raises(UserError, match=needle):
        data.parse_source(spec)


def test_minilm_trimmed_encoding_equals_full_length():
    enc = load_text_encoder("minilm")
    caps = ["a cat", "a black and white picture of a giraffe", "a cat", ""]
    states, mask = enc.encode(caps)
    assert states.shape == (4, 77, 384) and mask.shape == (4, 77)
    tok = enc.tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    full = enc.model(**tok).last_hidden_state * tok["attention_mask"][..., None]
    assert torch.allclose(states, full, atol=2e-5)
    assert torch.equal(mask, tok["attention_mask"].bool())
    assert torch.equal(states[0], states[2])
    assert mask[3].sum() == 2  # [CLS] [SEP]: the empty caption


def test_prepare_folder_skips_corrupt_and_reports(tmp_path, tiny_ae):
    root = make_folder(tmp_path / "imgs", n=5)
    out = tmp_path / "cache"
    m = prepare(
        PrepareConfig(source=f"folder:{root}", autoencoder=str(tiny_ae), resolution=32, shard_size=4),
        out,
        progress=False,
    )
    assert m["splits"]["train"]["count"] == 5 and m["skipped_total"] == 1
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped[0]["key"] == "broken.png" and "rror" in skipped[0]["error"]
    assert m["latent_shape"] == [4, 8, 8] and m["context_dim"] == 384 and m["channels"] == 1
    c = LatentCache(out)
    b = c.batch(torch.arange(5))
    z, text, mask = b.z, b.text, b.mask
    assert z.shape == (5, 4, 8, 8) and text.shape == (5, 77, 384)
    assert c.captions == [caption(i) for i in range(5)]
    assert torch.all(text[~mask] == 0)


def _cache_contents(out):
    c = LatentCache(out)
    return c.mean, c.text, c.captions


def test_prepare_resumes_after_interruption(tmp_path, tiny_ae, monkeypatch):
    cfg = PrepareConfig(source="animal-mnist", autoencoder=str(tiny_ae), resolution=32, shard_size=10, limit=35)
    ref = tmp_path / "ref"
    prepare(cfg, ref, progress=False)
    out = tmp_path / "interrupted"
    real = cache_mod._write_shard
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while writing the third shard
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, out, progress=False)
    monkeypatch.setattr(cache_mod, "_write_shard", real)
    assert len(list((out / "train").glob("shard-*"))) == 2 and not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        read_manifest(out)
    m = prepare(cfg, out, progress=False)
    assert m["splits"]["train"]["count"] == 35 and m["splits"]["validation"]["count"] == 35
    mean_a, text_a, caps_a = _cache_contents(ref)
    mean_b, text_b, caps_b = _cache_contents(out)
    assert caps_a == caps_b and torch.equal(mean_a, mean_b) and torch.equal(text_a, text_b)
    with safe_open(str(out / "train" / "shard-00002.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["start"]) == 20
    with pytest.raises(UserError, match="other settings"):
        prepare(
            PrepareConfig(source="animal-mnist", autoencoder=str(tiny_ae), resolution=32, shard_size=10, limit=36),
            out,
            progress=False,
        )


def test_prepare_cli_errors(tmp_path, tiny_ae):
    proc = run_cli("data", "prepare", "--source", "folder:/nope", "--autoencoder", tiny_ae, "--out", tmp_path / "c")
    assert proc.returncode == 2 and "folder not found: /nope" in proc.stderr
    proc = run_cli(
        "data", "prepare", "--source", "animal-mnist", "--autoencoder", tmp_path / "missing-ae", "--out", tmp_path / "c"
    )
    assert proc.returncode == 2 and "autoencoder not found" in proc.stderr
    proc = run_cli(
        "data",
        "prepare",
        "--source",
        "animal-mnist",
        "--autoencoder",
        tiny_ae,
        "--text-encoder",
        "t5",
        "--out",
        tmp_path / "c",
    )
    assert proc.returncode == 2 and "unknown text encoder 't5'" in proc.stderr
    proc = run_cli(
        "data",
        "prepare",
        "--source",
        "animal-mnist",
        "--autoencoder",
        tiny_ae,
        "--resolution",
        "30",
        "--out",
        tmp_path / "c2",
    )
    assert proc.returncode == 2 and "not a multiple of the autoencoder's downsampling factor 4" in proc.stderr


def test_prepare_cli_wds_and_hf(tmp_path, tiny_ae):
    pattern = make_tars(tmp_path / "tars", shards=2, per_shard=3)
    proc = run_cli(
        "data",
        "prepare",
        "--source",
        f"wds:{pattern}",
        "--autoencoder",
        tiny_ae,
        "--out",
        tmp_path / "wc",
        "--shard-size",
        "4",
        check=True,
    )
    assert "6 images (train 6)" in proc.stdout
    make_hf(tmp_path / "hfds", n=5)
    proc = run_cli(
        "data",
        "prepare",
        "--source",
        f"hf:{tmp_path / 'hfds'}",
        "--autoencoder",
        tiny_ae,
        "--out",
        tmp_path / "hc",
        check=True,
    )
    assert "5 images (train 5)" in proc.stdout


def test_autoencoder_train_cli(tmp_path):
    root = make_folder(tmp_path / "imgs", n=12, corrupt=False)
    out = tmp_path / "ae"
    proc = run_cli(
        "autoencoder",
        "train",
        "--source",
        f"folder:{root}",
        "--out",
        out,
        "--set",
        "steps=3",
        "--set",
        "batch_size=4",
        "--set",
        "block_out_channels=8,16,16",
        "--set",
        "norm_groups=8",
        check=True,
    )
    assert "validation PSNR" in proc.stdout
    from ldmscale.data.autoencoder import load_autoencoder

    vae = load_autoencoder(str(out))
    report = json.loads((out / "ldmscale_autoencoder.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["train_images"] == 11 and report["validation_images"] == 1
    proc = run_cli("autoencoder", "train", "--source", "animal-mnist", "--out", out, "--set", "stepz=3")
    assert proc.returncode == 2 and "unknown key 'stepz'" in proc.stderr


def test_an_rgb_folder_trains_rgb_models_end_to_end_by_default(tmp_path):
    from fixtures import shape_image

    root = tmp_path / "rgb"
    root.mkdir()
    rows = []
    for i in range(12):
        arr = np.asarray(shape_image(i, 32)).copy()
        arr[..., 1 + i % 2] = 0  # magenta or yellow shapes
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": "a yellow shape" if i % 2 else "a magenta shape"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_cli(
        "autoencoder",
        "train",
        "--source",
        f"folder:{root}",
        "--out",
        tmp_path / "ae",
        "--set",
        "steps=3",
        "--set",
        "batch_size=4",
        "--set",
        "block_out_channels=8,16,16",
        "--set",
        "norm_groups=8",
        check=True,
    )
    assert "autoencoder channels=3: RGB, the source has colour images" in p.stderr
    run_cli(
        "data",
        "prepare",
        "--source",
        f"folder:{root}",
        "--autoencoder",
        tmp_path / "ae",
        "--out",
        tmp_path / "cache",
        check=True,
    )
    # one validation rule for the autoencoder, the cache and the run: every 10th image (here 09.png) held out
    rule = "held out: every 10th item of 'train' (positions 9, 19, ...)"
    assert json.loads((tmp_path / "ae" / "ldmscale_autoencoder.json").read_text())["validation_split"] == rule
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["validation"] == rule
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 11, "validation": 1}
    run_cli(
        "train",
        "--cache",
        tmp_path / "cache",
        "--size",
        "c8",
        "--images",
        "8",
        "--set",
        "batch_size=8",
        "--set",
        "warmup_steps=0",
        "--out",
        tmp_path / "run",
        check=True,
    )
    assert (tmp_path / "run" / "validation.jsonl").exists()
    run_cli(
        "sample",
        "--run",
        tmp_path / "run",
        "--prompt",
        "a magenta shape",
        "--steps",
        "1",
        "--num-images",
        "1",
        "--out",
        tmp_path / "s",
        check=True,
    )
    assert Image.open(tmp_path / "s" / "p00-000.png").mode == "RGB"
