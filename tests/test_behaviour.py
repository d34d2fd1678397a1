"""Behaviour that a plumbing test cannot see: a super-resolution model follows its low-resolution input, and a
DreamBooth run moves its samples towards the subject. Both need a first stage that decodes to real images, so
this module trains a small autoencoder (100 steps, ~20 s) instead of the untrained one the plumbing tests use.
Measured numbers and margins: see each test."""

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

# both tests share one worker, so the autoencoder is trained once
pytestmark = pytest.mark.xdist_group("trained-first-stage")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 100-step autoencoder (validation PSNR ~18 dB), a 96-image cache on it, and a c8 run of 6 steps."""
    from ldmscale.data.autoencoder import train_autoencoder
    from ldmscale.data.cache import prepare
    from ldmscale.data.config import AutoencoderConfig, PrepareConfig
    from ldmscale.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    train_autoencoder(
        AutoencoderConfig(block_out_channels=(8, 16, 16), norm_groups=8, steps=100, lr=8e-3),
        root / "ae",
        progress=False,
    )
    prepare(
        PrepareConfig(
            source="animal-mnist",
            autoencoder=str(root / "ae"),
            text_encoder="minilm",
            resolution=32,
            shard_size=64,
            limit=96,
        ),
        root / "cache",
        progress=False,
    )
    train(tiny_train_config(root / "cache"), root / "c8", progress=False)
    return root


def _mse(a, b):
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def test_super_resolution_output_follows_its_own_low_resolution_input(trained):
    """Consistency: the upscaled images brought back down by 4x bicubic, against their own input and against the next
    image's input (PSNR, dB). Measured: after one step (the new input channels still ~0) 8.96 against 9.02; after 128
    steps 20.7 against 9.0 with v prediction (the task's objective), and 9.0 against 7.7 with the noise objective,
    which weights the condition's signal by the SNR (the upscalers of issue #24)."""
    from ldmscale.data.degrade import degrade
    from ldmscale.data.sources import load_images, parse_source
    from ldmscale.diffusion.generate import load_run
    from ldmscale.eval.metrics import psnr_ssim
    from ldmscale.tasks.config import SRConfig
    from ldmscale.tasks.superres import finetune_sr, upscale

    hr = torch.as_tensor(load_images(parse_source("animal-mnist"), "validation", 32, 1, 16)[0])
    low = degrade(hr, 4, "bicubic", list(range(16)))

    def follows(images: int, prediction: str) -> tuple[float, float]:
        """(consistency with its own input, with the next image's input)"""
        run = trained / f"sr-{images}-{prediction}"
        cfg = tiny_train_config(
            trained / "cache",
            images=images,
            batch_size=16,
            lr=3e-3,
            data="animal-mnist",
            checkpoint_every=0,
            prediction=prediction,
        )
        finetune_sr(SRConfig(init=str(trained / "c8"), data="animal-mnist", limit=512), cfg, run, progress=False)
        out, _ = upscale(load_run(run), low, [""] * 16, list(range(16)), "ddim", 4, 1.0, 16, "trailing")
        back = degrade(out, 4, "bicubic", list(range(16)))
        return psnr_ssim(back, low)["psnr"], psnr_ssim(back, low.roll(1, 0))["psnr"]

    own, other = follows(16, "v_prediction")
    assert own - other < 1.0  # the input ignored: so the test below can fail
    own, other = follows(2048, "v_prediction")
    assert own >= 15.0 and own - other >= 6.0


def test_dreambooth_moves_samples_towards_the_subject(trained, tmp_path):
    """Measured (one thread): subject-ssim of "a sks dog" (16 images, DDIM 20, guidance 3) 0.080 +- 0.012 from the
    initial run, 0.188 +- 0.023 after 300 DreamBooth steps at lr 3e-3: 4.2 standard errors (400 steps at 2e-3: 5.0;
    200 at 4e-3: 2.5). The test asks for 2."""
    from PIL import Image

    from ldmscale.data.sources import animal_mnist_arrays
    from ldmscale.diffusion.generate import generate, load_run
    from ldmscale.eval import metrics
    from ldmscale.tasks.config import DreamBoothConfig
    from ldmscale.tasks.dreambooth import finetune_dreambooth, subject_images

    images, labels = animal_mnist_arrays()
    one = images[np.flatnonzero(labels == 4)[0]]  # one dog, four views: as is, mirrored, shifted by a pixel
    subject = tmp_path / "subject"
    subject.mkdir()
    for k, v in enumerate([one, one[:, ::-1], np.roll(one, 1, 1), np.roll(one, 1, 0)]):
        Image.fromarray(np.ascontiguousarray(v)).save(subject / f"{k}.png")
    db = DreamBoothConfig(
        init=str(trained / "c8"), subject=str(subject), class_prompt="a dog", num_class_images=1, prior_steps=2
    )
    cfg = tiny_train_config(trained / "cache", images=2400, batch_size=8, lr=3e-3, checkpoint_every=0)
    finetune_dreambooth(db, cfg, tmp_path / "db", progress=False)
    views = subject_images(str(subject), 32, 1)
    scores = []
    for run in (trained / "c8", tmp_path / "db"):
        out, _ = generate(load_run(run), ["a sks dog"] * 16, "ddim", 20, 3.0, list(range(16)))
        scores.append(metrics.subject_ssim(out, views))
    (before, se0), (after, se1) = scores
    assert after - before > 2 * (se0**2 + se1**2) ** 0.5, scores
