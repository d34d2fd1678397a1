"""The metric registry: every metric's name, direction, the run kinds that compute it and what it needs.

Evaluation, study planning, analysis, plots and the report read it; nothing decides a metric's direction from
its name. A metric a run kind cannot compute is refused before any work starts, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldmscale.errors import UserError
from ldmscale.names import Kind

T2I, SR, DB = Kind.TEXT_TO_IMAGE, Kind.SUPER_RESOLUTION, Kind.DREAMBOOTH
# distilled runs are text-to-image models with a few-step sampler: they are evaluated as text-to-image
EVAL_KIND = {"consistency": T2I, "progressive": T2I, T2I: T2I, SR: SR, DB: DB}


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool
    kinds: tuple[str, ...]  # run kinds whose evaluation computes it
    needs: str  # "", "classifier", "clip" or "lpips": the option that must name a model
    about: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("fid", True, (T2I, SR), "", "Frechet distance in Inception-v3 pool features (FID)"),
        Metric("fd-classifier", True, (T2I, SR), "classifier", "Frechet distance in the domain classifier's features"),
        Metric("caption-accuracy", False, (T2I, DB), "classifier", "share of images classified as the prompted class"),
        Metric("clip", False, (T2I,), "clip", "CLIP score (torchmetrics' definition) of image and prompt"),
        Metric("psnr", False, (SR,), "", "PSNR of the upscaled image against the original (dB)"),
        Metric(
            "consistency",
            False,
            (SR,),
            "",
            "PSNR of the upscaled image brought back down by bicubic, against its low-resolution input (dB)",
        ),
        Metric("ssim", False, (SR,), "", "SSIM of the upscaled image against the original"),
        Metric("lpips", True, (SR,), "lpips", "LPIPS distance to the original (a TorchScript LPIPS model)"),
        Metric("subject-ssim", False, (DB,), "", "best SSIM of each image against the subject's views (identity)"),
        Metric(
            "subject-fidelity",
            False,
            (DB,),
            "",
            "cosine to the subject's mean feature (classifier features, Inception without a classifier)",
        ),
    )
}
NEEDS_OPTION = {
    "classifier": "--classifier DIR (train one: ldmscale classifier train)",
    "clip": "--clip PATH_OR_ID (a transformers CLIP model)",
    "lpips": "--lpips PATH (a TorchScript LPIPS model)",
}
PREFIXES = ("bicubic_", "teacher_")  # baselines reported beside a metric, in the same units


FRECHET = ("fid", "fd-classifier")  # distances between feature distributions (their image counts matter)


def model_free(kind: str) -> tuple[str, ...]:
    """The metrics of a run kind that need no model to be named and are not Frechet distances: a task's defaults
    (psnr, consistency, ssim for super-resolution; subject-ssim, subject-fidelity for DreamBooth)."""
    return tuple(m.name for m in METRICS.values() if kind in m.kinds and not m.needs and m.name not in FRECHET)


def metric(name: str) -> Metric:
    """The registry entry of a metric, or of a column derived from one (bicubic_psnr, fid_std)."""
    base = name.removesuffix("_std")
    for p in PREFIXES:
        base = base.removeprefix(p)
    if base not in METRICS:
        raise UserError(f"unknown metric {name!r}; metrics: {', '.join(METRICS)}")
    return METRICS[base]


def lower_is_better(name: str) -> bool:
    return metric(name).lower_is_better


def known(names, where: str = "") -> list[Metric]:
    """The registry entries of a non-empty list of metric names; an unknown name is a UserError."""
    if not names:
        raise UserError(f"{where + ': ' if where else ''}no metric given; metrics: {', '.join(METRICS)}")
    try:
        return [metric(n) for n in names]
    except UserError as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from None


def check_metrics(names, kind: str, where: str = "", **models: str) -> None:
    """Refuse unknown metrics, metrics this run kind does not compute, and metrics whose model is not given.
    models: classifier=..., clip=..., lpips=... (a missing key is not checked: the study trains a classifier)."""
    at = f"{where}: " if where else ""
    run_kind = EVAL_KIND.get(kind, kind)
    for name, m in zip(names, known(names, where)):
        if run_kind not in m.kinds:
            raise UserError(
                f"{at}metric {name!r} is not computed for {kind} runs (it applies to {' and '.join(m.kinds)} runs)"
            )
        if m.needs and m.needs in models and not models[m.needs]:
            raise UserError(f"{at}the {name} metric needs {NEEDS_OPTION[m.needs]}")
