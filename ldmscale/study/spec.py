"""Study files: the sections of a study (TOML, values only), loaded and validated completely at load time."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from ldmscale.config import Config, NonNegative, Positive, Range, apply_overrides, from_dict
from ldmscale.data.config import AutoencoderConfig
from ldmscale.errors import UserError
from ldmscale.eval import registry
from ldmscale.eval.config import ClassifierConfig, EvalConfig, EvalSettings
from ldmscale.model.family import parse_size
from ldmscale.names import Kind
from ldmscale.train.config import TrainConfig


@dataclass(frozen=True)
class DataSection(Config):
    source: str = "animal-mnist"
    resolution: Annotated[int, Range(8, 8192)] = 32
    text_encoder: str = "minilm"
    autoencoder: str = ""  # folder or hub id; empty: train one with [autoencoder]
    cache: str = ""  # an existing latent cache (skips prepare)
    latent_size: Annotated[int, Range(0, 1024)] = 0  # expected latent side for estimates before the cache exists
    # (0: from the autoencoder)
    context_len: Annotated[int, Range(2, 512)] = 77  # text tokens kept (SD's 77; the demo's captions fit in 16):


@dataclass(frozen=True)
class TrainSection(Config):
    sizes: tuple[str, ...] = ("c8", "c16", "c32")
    budget: Literal["images", "compute", "isoflop"] = "images"  # equal images per size (the paper), equal training
    # FLOPs, or isoflop: every size trained to each of `budgets` (one run per size, checkpoints at the budgets)
    images: Positive = 50_000  # per size, budget = images
    flops: Annotated[float, Range(0.0, 1e30)] = 0.0  # per size, budget = compute
    cooldown: Annotated[float, Range(0.0, 0.9)] = 0.2  # isoflop: each budget's model is a cooldown branch (wsd: lr
    # decayed linearly to 0) over this share of its steps, from its size's constant-lr run; 0: the constant run's
    # checkpoints at the budgets, unannealed
    budgets: tuple[Annotated[float, Range(0.0, 1e30, lo_open=True)], ...] = ()  # training FLOPs, budget = isoflop;
    # the largest is held out: the laws fitted on the others predict it, and the runs measure it
    seeds: tuple[Annotated[int, Range(0, 2**31 - 1)], ...] = (0,)  # training seeds: every size is trained once per
    # seed (runs/<size> for seed 0, runs/<size>-seed<k> for the others) and evaluated on its own image seeds; the
    # analysis averages them, its errors holding the spread between seeds as well as the evaluation noise
    match_compute: dict[str, str] = field(default_factory=dict)  # {size = other}: train size to other's training
    # FLOPs instead of the budget's, so that their final (annealed) checkpoints meet at matched compute (claim 1)
    curve_points: Annotated[int, Range(1, 100)] = 4  # checkpoints evaluated for the quality-vs-training-compute curves
    curve_spacing: Literal["log", "linear"] = "log"  # log: each point doubles the compute (from 1/2^(n-1) of the
    # run, at most 1/64), as the training-compute axis is read; linear: equally spaced
    set: dict[str, str] = field(default_factory=dict)  # TrainConfig overrides (lr, batch_size, ...)
    per_size: dict[str, dict[str, str]] = field(default_factory=dict)  # {size = {key = value}}: TrainConfig
    # overrides of one size on top of `set` (its batch size, lr, ...), recorded in that size's run


@dataclass(frozen=True)
class EvalSection(EvalSettings):
    """[eval]: the settings every evaluation shares (EvalSettings, declared once beside EvalConfig), the grid of
    sampling settings, and what the analysis reads."""

    samplers: tuple[str, ...] = ("ddim", "ddpm", "dpmsolver++")
    steps: tuple[Annotated[int, Range(1, 1000)], ...] = (2, 5, 10, 20, 50)
    guidance: tuple[Annotated[float, Range(0.0, 100.0)], ...] = (2.0, 4.0)
    max_steps: dict[str, Annotated[int, Range(1, 1000)]] = field(default_factory=dict)  # per sampler, e.g.
    # {"dpmsolver++" = 20}
    primary: str = "fd-classifier"  # the metric analysis and the planner optimize (lower is better for FD/FID)
    classifier: str = ""  # an existing classifier folder; empty: train one with [classifier]
    curve_sampler: str = "ddim"  # the setting at which training-compute curves are measured
    curve_steps: Annotated[int, Range(1, 1000)] = 20
    curve_guidance: Annotated[float, Range(0.0, 100.0)] = 3.0
    agreement_metric: str = ""  # a second metric (e.g. "fid") measured beside the primary at the final checkpoints,
    agreement_steps: tuple[Annotated[int, Range(1, 1000)], ...] = ()  # ... at these steps of the first sampler and
    # guidance: the report gives the Spearman rank correlation of the two (does the primary rank models as FID would?)
    agreement_images: Annotated[int, Range(0, 10**7)] = 0  # images per agreement point (0: num_images)
    agreement_reference_count: NonNegative = 0  # reference images for the agreement points (0: reference_count)
    sanity: bool = True  # the primary metric of the reference split against the train split and blurred copies


# [eval] fields passed to every evaluation of the study: the EvalSettings (steps and guidance are grids here, and
# the classifier is resolved by the study: given, or trained by it)
EVAL_SHARED = frozenset(f.name for f in dataclasses.fields(EvalSettings))


@dataclass(frozen=True)
class TaskSection(Config):
    """A downstream task or a distillation applied to every trained size, then evaluated over its own grid."""

    kind: Literal["super-resolution", "dreambooth", "consistency", "progressive"] = "super-resolution"
    images: NonNegative = 0  # training images (per round for progressive); 0: the kind's default_images
    set: dict[str, str] = field(default_factory=dict)  # overrides of the task's config (SRConfig, DreamBoothConfig,
    # DistillConfig: tasks/config.py) or of its training loop (TrainConfig), by key, as a verb's --set
    train_set: dict[str, str] = field(default_factory=dict)  # TrainConfig overrides only
    samplers: tuple[str, ...] = ()  # default: lcm (consistency), ddim (others)
    steps: tuple[
        Annotated[int, Range(1, 1000)], ...
    ] = ()  # default: 1, 2, 4, 8 (consistency), the final round (progressive), [eval] steps
    guidance: tuple[
        Annotated[float, Range(0.0, 100.0)], ...
    ] = ()  # default: 1 (super-resolution, no guidance, as the paper), else [eval] guidance
    metrics: tuple[str, ...] = ()  # default: psnr, ssim + [eval] Frechet metrics (SR), [eval] metrics otherwise
    num_images: Annotated[int, Range(0, 10**7)] = 0  # default: [eval] num_images
    sizes: tuple[str, ...] = ()  # the trained sizes this task applies to (default: all of [train] sizes)


@dataclass(frozen=True)
class Study:
    name: str = "study"
    data: DataSection = field(default_factory=DataSection)
    autoencoder: dict[str, object] = field(default_factory=dict)  # AutoencoderConfig overrides
    classifier: dict[str, object] = field(default_factory=dict)  # ClassifierConfig overrides
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tasks: dict[str, TaskSection] = field(default_factory=dict)  # downstream tasks and distillation, by name
    cluster: dict[str, object] = field(
        default_factory=dict
    )  # submitit parameters (slurm_partition, gpus_per_node, ...)


def read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A study file's values, with `extends = "other.toml"` (relative to this file) resolved: the other file's
    sections, then this file's keys over them one by one; a key's value (a list, an inline table such as set or
    match_compute, a whole [tasks.NAME]) replaces the other's, so an extension can say everything it changes."""
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path.name}: extends must be a file name, got {parent!r}")
    base_path = (path.parent / parent).resolve()
    if base_path in seen or base_path == path.resolve():
        raise UserError(f"{path.name}: extends {parent!r} comes back to itself")
    merged = read_toml(base_path, seen + (path.resolve(),))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged[key] | value  # a section: this file's keys over the other's
        else:
            merged[key] = value
    return merged


def resolved_toml(path: str | Path) -> str:
    """The study as it runs, for its folder's study.toml: `extends` resolved, so the copy stands alone."""
    import tomli_w

    return f"# {Path(path).name} as run, `extends` resolved\n" + tomli_w.dumps(read_toml(Path(path)))


def per_size(study: Study) -> dict[str, dict[str, str]]:
    """[train.per_size] by canonical size name (a study may spell a size as its paper label)."""
    return {parse_size(k).name: v for k, v in study.train.per_size.items()}


def load_study(path: str | Path) -> Study:

    path = Path(path)
    raw = read_toml(path)

    def strings(d):
        return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in d.items()} if isinstance(d, dict) else d

    if isinstance(raw.get("train"), dict) and "set" in raw["train"]:
        raw["train"]["set"] = strings(raw["train"]["set"])
    if isinstance(raw.get("train"), dict) and isinstance(raw["train"].get("per_size"), dict):
        raw["train"]["per_size"] = {k: strings(v) for k, v in raw["train"]["per_size"].items()}
    for t in (raw.get("tasks") or {}).values():
        if isinstance(t, dict):
            for key in ("set", "train_set"):
                if key in t:
                    t[key] = strings(t[key])
    study = from_dict(Study, raw, where=path.name)
    from_dict(AutoencoderConfig, dict(study.autoencoder), where=f"{path.name} [autoencoder]")
    from_dict(ClassifierConfig, dict(study.classifier), where=f"{path.name} [classifier]")

    train_cfg = apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in study.train.set.items()])
    if not study.train.seeds or len(set(study.train.seeds)) != len(study.train.seeds):
        raise UserError(
            f"{path.name}: [train] seeds must be a non-empty list of distinct seeds, got {list(study.train.seeds)}"
        )
    names = {parse_size(x).name for x in study.train.sizes}
    for a, b in study.train.match_compute.items():
        if (
            parse_size(a).name not in names
            or parse_size(b).name not in names
            or a == b
            or b in study.train.match_compute
        ):
            raise UserError(
                f"{path.name}: [train] match_compute {{{a} = {b!r}}} must pair two different [train] sizes, "
                "the second trained to the study's budget"
            )
    for name, sets in study.train.per_size.items():
        if parse_size(name).name not in {parse_size(x).name for x in study.train.sizes}:
            raise UserError(f"{path.name}: [train.per_size] {name!r} is not among [train] sizes")
        apply_overrides(train_cfg, [f"{k}={v}" for k, v in sets.items()])
        if "seed" in sets or "size" in sets:
            raise UserError(f"{path.name}: [train.per_size] {name} may not set seed or size")
    if "seed" in study.train.set:
        raise UserError(f"{path.name}: give training seeds as [train] seeds = [...], not [train.set] seed")
    for s in study.train.sizes:
        parse_size(s)
    ev = study.eval
    if not study.train.sizes:
        raise UserError(f"{path.name}: [train] sizes is empty")
    if not ev.samplers or not ev.steps or not ev.guidance:
        raise UserError(f"{path.name}: the evaluation grid is empty (samplers, steps and guidance each need a value)")
    from ldmscale.diffusion.schedulers import check_sampling_args

    for smp in ev.samplers:
        for st in ev.steps:
            for g in ev.guidance:
                check_sampling_args(smp, st, g)
    registry.check_metrics(ev.metrics, Kind.TEXT_TO_IMAGE, f"{path.name} [eval]", clip=ev.clip, lpips=ev.lpips)
    if ev.primary not in ev.metrics:
        raise UserError(f"{path.name}: primary metric {ev.primary!r} is not among [eval] metrics")
    if ev.agreement_metric:
        registry.check_metrics(
            [ev.agreement_metric],
            Kind.TEXT_TO_IMAGE,
            f"{path.name} [eval] agreement_metric",
            clip=ev.clip,
            lpips=ev.lpips,
        )
        if ev.agreement_metric in ev.metrics:
            raise UserError(f"{path.name}: agreement_metric {ev.agreement_metric!r} is already in [eval] metrics")
        missing = [st for st in ev.agreement_steps if st not in ev.steps]
        if len(ev.agreement_steps) < 1 or missing:
            raise UserError(f"{path.name}: agreement_steps must be a non-empty subset of [eval] steps")
    for tname, task in study.tasks.items():
        if task.metrics:
            registry.check_metrics(
                task.metrics, task.kind, f"{path.name} [tasks.{tname}]", clip=ev.clip, lpips=ev.lpips
            )
        for t in task.sizes:
            if parse_size(t).name not in {parse_size(x).name for x in study.train.sizes}:
                raise UserError(f"{path.name}: [tasks.{tname}] size {t!r} is not among [train] sizes")
    if not 1 <= study.data.context_len <= 512:
        raise UserError(f"{path.name}: [data] context_len must be between 1 and 512, got {study.data.context_len}")
    if study.train.budget == "compute" and study.train.flops <= 0:
        raise UserError(f'{path.name}: budget = "compute" needs [train] flops > 0')
    if study.train.budget == "isoflop":
        if len(set(study.train.budgets)) < 3 or len(study.train.sizes) < 3:
            raise UserError(
                f'{path.name}: budget = "isoflop" needs 3 or more [train] budgets (two to fit the laws, '
                "the largest to check them) and 3 or more sizes (a parabola per budget)"
            )
        if train_cfg.lr_schedule != "constant":
            raise UserError(
                f'{path.name}: budget = "isoflop" reads every budget off one run per size, which needs '
                'lr_schedule = "constant" (a cosine schedule is planned for one length)'
            )
    from ldmscale.diffusion.schedulers import check_sampler_fits

    for smp in sorted({*ev.samplers, ev.curve_sampler}):
        try:
            check_sampler_fits(smp, train_cfg.prediction)
        except UserError as e:
            raise UserError(f"{path.name} [eval]: {e}") from None
    return study


EVAL_SEED_STRIDE = 1_000_000  # training seed k evaluates on image seeds from [eval] seed + k * EVAL_SEED_STRIDE


def run_name(size: str, seed: int) -> str:
    """The run folder of one size and training seed (seed 0 keeps the plain name of a one-seed study)."""
    return size if seed == 0 else f"{size}-seed{seed}"


def eval_config(ev: EvalSection, classifier: str, **job):
    """One evaluation of the study: every EvalConfig field the [eval] section declares, then the job's own values
    (sampler, steps, guidance, checkpoint, ...). A field added to both is passed through without another line."""
    shared = {name: getattr(ev, name) for name in EVAL_SHARED if name not in job}
    return EvalConfig(**shared, classifier=classifier, **job)


def study_eval(study: Study) -> EvalSection:
    """The [eval] section with its defaults resolved: the reference is the study's own data unless given."""

    from ldmscale.eval.reference import canonical_reference

    if study.eval.reference:
        return study.eval
    try:  # the split spelled out (animal-mnist -> animal-mnist:validation) when the data can tell it now
        ref = canonical_reference(study.data.source)
    except UserError:
        ref = study.data.source  # data not there yet (a plan made before the shards exist): evaluate() resolves it
    return dataclasses.replace(study.eval, reference=ref)
