"""The metric registry: directions, the run kinds that compute each metric, and planning-time refusals."""

import pytest

from ldmscale.errors import UserError
from ldmscale.eval import registry
from ldmscale.study.spec import load_study


def test_directions_come_from_the_registry_not_the_name():
    # lpips is a distance: lower is better, though its name has no "fd"/"fid" in it (it came out wrong before)
    assert registry.lower_is_better("lpips") and registry.lower_is_better("bicubic_lpips")
    assert registry.lower_is_better("fd-classifier_std") and registry.lower_is_better("fid")
    assert not registry.lower_is_better("psnr") and not registry.lower_is_better("caption-accuracy")
    assert not registry.lower_is_better("subject-ssim") and not registry.lower_is_better("clip")
    with pytest.raises(UserError, match="unknown metric 'fd-inception'"):
        registry.lower_is_better("fd-inception")


@pytest.mark.parametrize(
    "metric,kind",
    [
        ("clip", "super-resolution"),
        ("clip", "dreambooth"),
        ("caption-accuracy", "super-resolution"),
        ("psnr", "text-to-image"),
        ("subject-ssim", "consistency"),
        ("fid", "dreambooth"),
    ],
)
def test_a_metric_a_kind_does_not_compute_is_refused(metric, kind):
    # before, clip asked of a super-resolution or DreamBooth run was validated and then silently dropped
    with pytest.raises(UserError, match=f"metric '{metric}' is not computed for {kind} runs"):
        registry.check_metrics([metric], kind)


def test_needs_and_accepted_sets():
    registry.check_metrics(["psnr", "ssim", "fid"], "super-resolution")
    registry.check_metrics(["fd-classifier", "caption-accuracy"], "progressive", classifier="runs/clf")
    with pytest.raises(UserError, match="the lpips metric needs --lpips PATH"):
        registry.check_metrics(["lpips"], "super-resolution", lpips="")
    with pytest.raises(UserError, match="the clip metric needs --clip"):
        registry.check_metrics(["clip"], "text-to-image", clip="")
    with pytest.raises(UserError, match="no metric given"):
        registry.check_metrics([], "text-to-image")


STUDY = """
[data]
source = "animal-mnist"
[train]
sizes = ["c8"]
[eval]
samplers = ["ddim"]
steps = [2]
guidance = [2.0]
[tasks.t]
kind = "{kind}"
metrics = {metrics}
"""


@pytest.mark.parametrize(
    "kind,metrics,message",
    [
        ("super-resolution", '["psnr", "clip"]', "metric 'clip' is not computed for super-resolution runs"),
        ("dreambooth", '["subject-ssim", "lpips"]', "metric 'lpips' is not computed for dreambooth runs"),
        ("consistency", '["psnr"]', "metric 'psnr' is not computed for consistency runs"),
    ],
)
def test_study_refuses_task_metrics_at_load_time(tmp_path, kind, metrics, message):
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format(kind=kind, metrics=metrics))
    with pytest.raises(UserError, match=rf"s.toml \[tasks.t\]: {message}"):
        load_study(path)
