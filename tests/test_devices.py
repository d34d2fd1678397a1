"""Every model a command builds ends on the configured device. This machine has no second device, so the tests
configure "meta" (a real torch device that holds no data): a model left behind on the CPU shows up at once."""

import pytest
import torch

META = torch.device("meta")


def _devices(*modules):
    out = set()
    for m in modules:
        out |= {p.device for p in m.parameters()}
    return out


@pytest.fixture()
def on_meta(monkeypatch):
    monkeypatch.setenv("LDMSCALE_DEVICE", "meta")
    from ldmscale.diffusion import generate as sample

    sample._vae.cache_clear()
    sample._text.cache_clear()
    yield
    sample._vae.cache_clear()
    sample._text.cache_clear()


def test_sampling_models_are_on_the_device(tiny_run, on_meta):
    from ldmscale.diffusion.generate import load_run

    m = load_run(tiny_run)
    assert _devices(m.unet, m.vae, m.text.model) == {META}
    bf16 = load_run(tiny_run, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}


def test_evaluation_feature_networks_are_on_the_device(tiny_classifier, tmp_path, on_meta):
    from fixtures import make_tiny_clip_model

    from ldmscale.eval.config import EvalConfig
    from ldmscale.eval.evaluate import build_extractors

    clip = make_tiny_clip_model(tmp_path / "clip")
    ex, clf, cl = build_extractors(
        EvalConfig(
            metrics=("fid", "fd-classifier", "caption-accuracy", "clip"),
            classifier=str(tiny_classifier),
            clip=str(clip),
        )
    )
    assert ex["fid"].device == META and clf.device == META
    assert _devices(clf.model, cl.model) == {META}


def test_prepare_encoders_are_on_the_device(tiny_ae, on_meta):
    from ldmscale.data.cache import encoders
    from ldmscale.data.config import PrepareConfig

    vae, text = encoders(PrepareConfig(source="animal-mnist", autoencoder=str(tiny_ae)))
    assert _devices(vae, text.model) == {META}


@pytest.fixture()
def accelerator_on_meta(monkeypatch):
    """A device-recording double for accelerate: the Accelerator reports "meta" as its device."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: META))


def test_training_puts_model_ema_and_objective_networks_on_the_device(
    tiny_run, tiny_cache, tmp_path, accelerator_on_meta
):
    from conftest import tiny_train_config

    from ldmscale.tasks.distill import configs, distill_task
    from ldmscale.train.loop import setup
    from ldmscale.train.run import text_to_image_task

    s = setup(tiny_train_config(tiny_cache), tmp_path / "run", text_to_image_task)
    assert _devices(s.model) == {META} and {t.device for t in s.ema.shadow_params} == {META}
    assert s.task.objective.alphas.device == META
    cfg, tcfg = configs(str(tiny_run), "consistency", ["batch_size=8"])
    d = setup(tcfg, tmp_path / "lcm", distill_task(cfg, 16))
    assert _devices(d.model, d.task.objective.teacher, d.task.objective.target) == {META}
    assert {t.device for t in d.ema.shadow_params} == {META}
