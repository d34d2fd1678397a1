"""Studies: a TOML file of values declares sizes, data, training budget and the evaluation grid; the runner
turns it into jobs and runs them, skipping what is done.

A job is identified by the hash of its resolved config; finishing one writes STUDY/jobs/<id>.json. Running
the study again skips finished jobs; a killed job loses only its own unfinished work (training resumes from
its last checkpoint). Jobs run in order, in this process (executor "local") or as SLURM jobs (submitit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

from ldmscale.config import Config, NonNegative, Positive, Range, from_dict, to_dict
from ldmscale.errors import UserError
from ldmscale.eval import registry


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
    # FLOPs and costs follow it


@dataclass(frozen=True)
class TrainSection(Config):
    sizes: tuple[str, ...] = ("c8", "c16", "c32")
    budget: Literal["images", "compute"] = "images"  # equal images per size (the paper) or equal training FLOPs
    images: Positive = 50_000  # per size, budget = images
    flops: Annotated[float, Range(0.0, 1e30)] = 0.0  # per size, budget = compute
    curve_points: Annotated[int, Range(1, 100)] = 4  # checkpoints evaluated for the quality-vs-training-compute curves
    curve_spacing: Literal["log", "linear"] = "log"  # log: each point doubles the compute (from 1/2^(n-1) of the
    # run, at most 1/64), as the training-compute axis is read; linear: equally spaced
    set: dict[str, str] = field(default_factory=dict)  # TrainConfig overrides (lr, batch_size, ...)


@dataclass(frozen=True)
class EvalSection(Config):
    samplers: tuple[str, ...] = ("ddim", "ddpm", "dpmsolver++")
    steps: tuple[Annotated[int, Range(1, 1000)], ...] = (2, 5, 10, 20, 50)
    guidance: tuple[Annotated[float, Range(0.0, 100.0)], ...] = (2.0, 4.0)
    max_steps: dict[str, Annotated[int, Range(1, 1000)]] = field(default_factory=dict)  # per sampler, e.g.
    # {"dpmsolver++" = 20}
    metrics: tuple[str, ...] = ("fd-classifier", "caption-accuracy")
    primary: str = "fd-classifier"  # the metric analysis and the planner optimize (lower is better for FD/FID)
    num_images: Annotated[int, Range(2, 10**7)] = 200
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    batch_size: Annotated[int, Range(1, 2**16)] = 250
    reference: str = ""  # SOURCE[:SPLIT] of real images and captions ("": the study's data, its validation split)
    reference_count: NonNegative = 0
    classifier: str = ""  # an existing classifier folder; empty: train one with [classifier]
    clip: str = ""
    inception: str = ""
    fid_resize: Literal["tf", "pytorch"] = "tf"  # FID's resize to 299 px: TF1's, as published FIDs, or pytorch-fid's
    lpips: str = ""  # TorchScript LPIPS model, for the lpips metric of super-resolution tasks
    weights: Literal["ema", "raw"] = "ema"
    precision: Literal["fp32", "bf16"] = "fp32"  # the UNet's precision when sampling (bf16 on GPUs)
    bootstrap: Annotated[int, Range(0, 10**4)] = 10
    curve_sampler: str = "ddim"  # the setting at which training-compute curves are measured
    curve_steps: Annotated[int, Range(1, 1000)] = 20
    curve_guidance: Annotated[float, Range(0.0, 100.0)] = 3.0
    spacing: Literal["leading", "trailing"] = "leading"  # sampler timesteps: SD v1.5's leading, or trailing (t=999 first)
    agreement_metric: str = ""  # a second metric (e.g. "fid") measured beside the primary at the final checkpoints,
    agreement_steps: tuple[Annotated[int, Range(1, 1000)], ...] = ()  # ... at these steps of the first sampler and guidance: the report gives
    # the Spearman rank correlation of the two (does the primary metric rank models as FID would?)
    agreement_images: Annotated[int, Range(0, 10**7)] = 0  # images per agreement point (0: num_images)
    agreement_reference_count: NonNegative = 0  # reference images for the agreement points (0: reference_count)
    sanity: bool = True  # the primary metric of the reference split against the train split and blurred copies


# [eval] fields passed to every evaluation of the study where EvalConfig has a field of that name (steps and guidance
# are grids here, and the classifier is resolved by the study: given, or trained by it)
EVAL_SHARED = frozenset(f.name for f in dataclasses.fields(EvalSection)) - {"steps", "guidance", "classifier"}


@dataclass(frozen=True)
class TaskSection(Config):
    """A downstream task or a distillation applied to every trained size, then evaluated over its own grid."""

    kind: Literal["super-resolution", "dreambooth", "consistency", "progressive"] = "super-resolution"
    images: Positive = 10_000  # fine-tuning images (per round for progressive)
    set: dict[str, str] = field(default_factory=dict)  # SRConfig / DreamBoothConfig / DistillConfig overrides
    train_set: dict[str, str] = field(default_factory=dict)  # TrainConfig overrides (fine-tunes)
    samplers: tuple[str, ...] = ()  # default: lcm (consistency), ddim (others)
    steps: tuple[Annotated[int, Range(1, 1000)], ...] = ()  # default: 1, 2, 4, 8 (consistency), the final round (progressive), [eval] steps
    guidance: tuple[Annotated[float, Range(0.0, 100.0)], ...] = ()  # default: 1 (super-resolution, no guidance, as the paper), else [eval] guidance
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
    cluster: dict[str, object] = field(default_factory=dict)  # submitit parameters (slurm_partition, gpus_per_node, ...)


def load_study(path: str | Path) -> Study:
    from ldmscale.data.autoencoder import AutoencoderConfig
    from ldmscale.eval.features import ClassifierConfig
    from ldmscale.model.family import parse_size
    from ldmscale.train.loop import TrainConfig

    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    def strings(d):
        return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in d.items()} if isinstance(d, dict) else d

    if isinstance(raw.get("train"), dict) and "set" in raw["train"]:
        raw["train"]["set"] = strings(raw["train"]["set"])
    for t in (raw.get("tasks") or {}).values():
        if isinstance(t, dict):
            for key in ("set", "train_set"):
                if key in t:
                    t[key] = strings(t[key])
    study = from_dict(Study, raw, where=path.name)
    from_dict(AutoencoderConfig, dict(study.autoencoder), where=f"{path.name} [autoencoder]")
    from_dict(ClassifierConfig, dict(study.classifier), where=f"{path.name} [classifier]")
    from ldmscale.config import apply_overrides

    apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in study.train.set.items()])
    for s in study.train.sizes:
        parse_size(s)
    ev = study.eval
    if not study.train.sizes:
        raise UserError(f"{path.name}: [train] sizes is empty")
    if not ev.samplers or not ev.steps or not ev.guidance:
        raise UserError(f"{path.name}: the evaluation grid is empty (samplers, steps and guidance each need a value)")
    from ldmscale.diffusion.samplers import check_sampling_args

    for smp in ev.samplers:
        for st in ev.steps:
            for g in ev.guidance:
                check_sampling_args(smp, st, g)
    registry.check_metrics(ev.metrics, "text-to-image", f"{path.name} [eval]", clip=ev.clip, lpips=ev.lpips)
    if ev.primary not in ev.metrics:
        raise UserError(f"{path.name}: primary metric {ev.primary!r} is not among [eval] metrics")
    if ev.agreement_metric:
        registry.check_metrics([ev.agreement_metric], "text-to-image", f"{path.name} [eval] agreement_metric",
                               clip=ev.clip, lpips=ev.lpips)
        if ev.agreement_metric in ev.metrics:
            raise UserError(f"{path.name}: agreement_metric {ev.agreement_metric!r} is already in [eval] metrics")
        missing = [st for st in ev.agreement_steps if st not in ev.steps]
        if len(ev.agreement_steps) < 1 or missing:
            raise UserError(f"{path.name}: agreement_steps must be a non-empty subset of [eval] steps")
    for tname, task in study.tasks.items():
        if task.metrics:
            registry.check_metrics(task.metrics, task.kind, f"{path.name} [tasks.{tname}]", clip=ev.clip, lpips=ev.lpips)
        for t in task.sizes:
            if parse_size(t).name not in {parse_size(x).name for x in study.train.sizes}:
                raise UserError(f"{path.name}: [tasks.{tname}] size {t!r} is not among [train] sizes")
    if not 1 <= study.data.context_len <= 512:
        raise UserError(f"{path.name}: [data] context_len must be between 1 and 512, got {study.data.context_len}")
    if study.train.budget == "compute" and study.train.flops <= 0:
        raise UserError(f"{path.name}: budget = \"compute\" needs [train] flops > 0")
    return study


@dataclass
class Job:
    kind: str  # autoencoder | classifier | prepare | train | eval | (task kinds)
    name: str
    config: dict
    run: Callable[[], object]
    cost_flops: float = 0.0  # estimate, for --dry-run and the ETA
    extra_seconds: float = 0.0  # work that is not UNet FLOPs (Inception features), for the ETA

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps({"kind": self.kind, **self.config}, sort_keys=True, default=str)
                              .encode()).hexdigest()[:16]


def job_done(out: Path, job: Job) -> bool:
    return (out / "jobs" / f"{job.id}.json").exists()


def mark_done(out: Path, job: Job, seconds: float) -> None:
    from ldmscale.io import atomic_write_json

    atomic_write_json(out / "jobs" / f"{job.id}.json", {"kind": job.kind, "name": job.name, "config": job.config,
                                                        "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


# A first guess of each job's seconds, measured on a 2-core CPU: UNet FLOPs at NOMINAL_FLOPS, a fixed cost per
# optimizer step (small models are bound by per-layer overheads), and fixed seconds per job (decoding, features,
# loading). Only the ETA uses them, and it rescales them by what each kind of job really takes here.
NOMINAL_FLOPS = 6.4e10
SECONDS_PER_STEP = 0.09
OVERHEAD_S = {"prepare": 15.0, "sanity": 5.0, "eval": 1.5, "task-eval": 3.0, "train": 3.0, "finetune": 10.0,
              "distill": 10.0}
FID_SECONDS_PER_IMAGE = 0.16  # Inception-v3 at 299 px, and the 2048-d Frechet distance


def estimated_seconds(job: Job) -> float:
    if job.kind == "autoencoder":
        return 0.22 * float(job.config.get("steps", 300))
    if job.kind == "classifier":
        return 20.0 * float(job.config.get("epochs", 2)) * float(job.config.get("width", 32)) / 32
    steps = float(job.config.get("images", 0)) / float(job.config.get("batch_size", 1)) if job.kind == "train" else 0
    return job.cost_flops / NOMINAL_FLOPS + steps * SECONDS_PER_STEP + OVERHEAD_S.get(job.kind, 5.0) + job.extra_seconds


class Eta:
    """Remaining time = the estimate of each pending job, scaled by how fast jobs of its kind have actually run so far
    (all kinds together until a kind has finished one). Averages since the start, so a loaded machine stretches
    the whole forecast instead of making it jump."""

    def __init__(self):
        self.spent: dict[str, list[float]] = {}  # kind -> [actual seconds, estimated seconds]

    def record(self, job: Job, seconds: float) -> None:
        a = self.spent.setdefault(job.kind, [0.0, 0.0])
        a[0] += seconds
        a[1] += estimated_seconds(job)

    def _ratio(self, kind: str) -> float:
        if kind in self.spent and self.spent[kind][1] > 0:
            return self.spent[kind][0] / self.spent[kind][1]
        actual, est = (sum(v[i] for v in self.spent.values()) for i in (0, 1))
        return actual / est if est > 0 else 1.0

    def remaining(self, pending: list[Job]) -> float:
        return sum(estimated_seconds(j) * self._ratio(j.kind) for j in pending)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def run_jobs(out: Path, jobs: list[Job], progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the jobs in order, skipping finished ones; one progress bar over estimated seconds, with an ETA that
    learns each kind of job's real speed on this machine."""
    from ldmscale.progress import bar

    pending = [j for j in jobs if not job_done(out, j)]
    done0 = len(jobs) - len(pending)
    log(f"study {out}: {len(jobs)} jobs, {done0} already done, {len(pending)} to run")
    weights = [estimated_seconds(j) for j in pending]
    pbar = bar(total=sum(weights), desc="study", unit="est-s", enabled=progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
    eta, t_start = Eta(), time.time()
    for n, (job, w) in enumerate(zip(pending, weights)):
        left = _clock(eta.remaining(pending[n:])) if eta.spent else "?"
        pbar.set_postfix_str(f"<{left} left, jobs {done0 + n}/{len(jobs)}, now: {job.name}")
        t0 = time.time()
        job.run()
        mark_done(out, job, time.time() - t0)
        eta.record(job, time.time() - t0)
        pbar.update(w)
    pbar.set_postfix_str(f"jobs {len(jobs)}/{len(jobs)}")
    pbar.close()
    return {"jobs": len(jobs), "ran": len(pending), "seconds": time.time() - t_start}


def eval_config(ev: EvalSection, classifier: str, **job):
    """One evaluation of the study: every EvalConfig field the [eval] section declares, then the job's own values
    (sampler, steps, guidance, checkpoint, ...). A field added to both is passed through without another line."""
    from ldmscale.eval.evaluate import EvalConfig

    shared = {f.name: getattr(ev, f.name) for f in dataclasses.fields(EvalConfig)
              if f.name in EVAL_SHARED and f.name not in job}
    return EvalConfig(**shared, classifier=classifier, **job)


def study_eval(study: Study) -> EvalSection:
    """The [eval] section with its defaults resolved: the reference is the study's own data unless given."""
    import dataclasses

    from ldmscale.eval.reference import canonical_reference

    if study.eval.reference:
        return study.eval
    try:  # the split spelled out (animal-mnist -> animal-mnist:validation) when the data can tell it now
        ref = canonical_reference(study.data.source)
    except UserError:
        ref = study.data.source  # data not there yet (a plan made before the shards exist): evaluate() resolves it
    return dataclasses.replace(study.eval, reference=ref)


def expected_shapes(study: Study, out: Path) -> dict:
    """Latent and text-context shapes the study's models will see (from the cache if it exists, else from
    the autoencoder and text encoder configs), for FLOP estimates before anything has run."""
    from ldmscale.data.cache import read_manifest

    cache = Path(study.data.cache or out / "cache")
    if (cache / "manifest.json").exists():
        m = read_manifest(cache)
        c, h, _ = m["latent_shape"]
        return {"latent": h, "channels": c, "ctx_len": m["context_len"], "ctx_dim": m["context_dim"]}
    if study.data.autoencoder and (Path(study.data.autoencoder) / "config.json").exists():
        ae = json.loads((Path(study.data.autoencoder) / "config.json").read_text())
    else:
        from ldmscale.data.autoencoder import AutoencoderConfig

        cfg = from_dict(AutoencoderConfig, dict(study.autoencoder))
        ae = {"block_out_channels": cfg.block_out_channels, "latent_channels": cfg.latent_channels}
    down = 2 ** (len(ae["block_out_channels"]) - 1)
    enc = study.data.text_encoder
    dims = {"minilm": 384, "clip-l": 768, "clip-h": 1024}
    dim = dims.get(enc.split(":")[0])
    if dim is None:
        path = Path(enc.partition(":")[2]) / "config.json"
        dim = json.loads(path.read_text()).get("hidden_size", 768) if path.exists() else 768
    latent = study.data.latent_size or study.data.resolution // down
    return {"latent": latent, "channels": ae["latent_channels"], "ctx_len": study.data.context_len, "ctx_dim": dim}


def plan_jobs(study: Study, out: Path, progress: bool = False) -> list[Job]:
    """The study as an ordered list of jobs: first stage, cache, classifier, training, evaluation."""
    from ldmscale.config import apply_overrides
    from ldmscale.data.autoencoder import AutoencoderConfig, train_autoencoder
    from ldmscale.data.cache import PrepareConfig, prepare
    from ldmscale.eval.evaluate import evaluate
    from ldmscale.eval.features import ClassifierConfig, train_classifier
    from ldmscale.model import flops
    from ldmscale.model.family import parse_size, size_spec
    from ldmscale.train.loop import TrainConfig, train

    out = Path(out).resolve()
    jobs: list[Job] = []
    d = study.data
    ae_dir = d.autoencoder or str(out / "autoencoder")
    if not d.autoencoder and not d.cache:
        ae_cfg = from_dict(AutoencoderConfig, {"source": d.source, "resolution": d.resolution} | dict(study.autoencoder))
        jobs.append(Job("autoencoder", "autoencoder", to_dict(ae_cfg),
                        lambda c=ae_cfg: train_autoencoder(c, out / "autoencoder", progress=progress, overwrite=True)))
    cache = d.cache or str(out / "cache")
    if not d.cache:
        p_cfg = PrepareConfig(source=d.source, autoencoder=ae_dir, text_encoder=d.text_encoder, resolution=d.resolution,
                              max_length=d.context_len)
        jobs.append(Job("prepare", "latent cache", to_dict(p_cfg), lambda c=p_cfg: prepare(c, cache, progress=progress)))
    ev = study_eval(study)
    clf_dir = ev.classifier
    if {"fd-classifier", "caption-accuracy"} & set(ev.metrics) and not clf_dir:
        clf_cfg = from_dict(ClassifierConfig, {"source": d.source, "resolution": d.resolution} | dict(study.classifier))
        clf_dir = str(out / "classifier")
        jobs.append(Job("classifier", "classifier", to_dict(clf_cfg),
                        lambda c=clf_cfg: train_classifier(c, clf_dir, progress=progress, overwrite=True)))
    if ev.sanity and ev.primary in ("fid", "fd-classifier"):
        s_cfg = eval_config(ev, clf_dir, metrics=(ev.primary,))

        def sanity(c=s_cfg, metric=ev.primary):
            from ldmscale.data.cache import read_manifest
            from ldmscale.eval.evaluate import sanity_rows
            from ldmscale.io import atomic_write_json

            m = read_manifest(cache)
            atomic_write_json(out / "sanity.json", sanity_rows(c, metric, m["resolution"], m["channels"]))

        jobs.append(Job("sanity", f"metric sanity ({ev.primary})", to_dict(s_cfg), sanity))
    shapes = expected_shapes(study, out)
    base = apply_overrides(TrainConfig(data=cache), [f"{k}={v}" for k, v in study.train.set.items()])
    for name in study.train.sizes:
        size = parse_size(name)
        fwd = flops.cost(size, shapes["latent"], shapes["ctx_len"], shapes["ctx_dim"], shapes["channels"]).flops
        if study.train.budget == "images":
            images = study.train.images
        else:
            images = int(study.train.flops / (3 * fwd))
        steps = max(1, round(images / base.batch_size))
        points = max(1, study.train.curve_points)
        every = max(1, steps // points)
        curve_steps = curve_checkpoints(steps, points, study.train.curve_spacing)
        t_cfg = TrainConfig(**(to_dict(base) | {"size": size_spec(size), "images": steps * base.batch_size,
                                                "checkpoint_every": every * base.batch_size, "keep": 2,
                                                "checkpoint_at": curve_steps}))
        t_cfg = from_dict(TrainConfig, to_dict(t_cfg))
        run = out / "runs" / size.name
        jobs.append(Job("train", f"train {size.name} ({steps * base.batch_size:,} images)", to_dict(t_cfg),
                        lambda c=t_cfg, r=run: train(c, r, progress=progress),
                        cost_flops=flops.training_flops(steps * base.batch_size, fwd)))

        def eval_job(label, sampler, n_steps, g, ckpt, run=run, fwd=fwd, agreement=False):
            n = (ev.agreement_images or ev.num_images) if agreement else ev.num_images
            e_cfg = eval_config(ev, clf_dir, sampler=sampler, steps=n_steps, guidance=g, num_images=n,
                                checkpoint=str(ckpt), **(dict(
                                    metrics=(ev.primary, ev.agreement_metric), tag="agreement",
                                    reference_count=ev.agreement_reference_count or ev.reference_count,
                                    bootstrap=0) if agreement else {}))  # the rank correlation needs values only
            calls = flops.model_calls(n_steps, g, 2 if sampler == "heun" else 1)
            return Job("eval", f"eval {size.name} {label}", to_dict(e_cfg) | {"run": str(run)},
                       lambda: evaluate(run, e_cfg, progress=False), cost_flops=n * calls * fwd,
                       extra_seconds=n * FID_SECONDS_PER_IMAGE * ("fid" in e_cfg.metrics))

        for ck in curve_steps:
            jobs.append(eval_job(f"curve step {ck}", ev.curve_sampler, ev.curve_steps, ev.curve_guidance, ck))
        for sampler in ev.samplers:
            for n_steps in ev.steps:
                if n_steps > ev.max_steps.get(sampler, 10**9):
                    continue
                for g in ev.guidance:
                    jobs.append(eval_job(f"{sampler} {n_steps} step{'s' * (n_steps != 1)} g{g:g}", sampler, n_steps, g, steps))
                if ev.agreement_metric and n_steps in ev.agreement_steps and sampler == ev.samplers[0]:
                    jobs.append(eval_job(f"{sampler} {n_steps} step{'s' * (n_steps != 1)} g{ev.guidance[0]:g}, {ev.agreement_metric} "
                                         "agreement", sampler, n_steps, ev.guidance[0], steps, agreement=True))
        for tname, task in study.tasks.items():
            if task.sizes and size.name not in {parse_size(t).name for t in task.sizes}:
                continue
            jobs += task_jobs(tname, task, study, base, run, out / "tasks" / tname / size.name, fwd, clf_dir, progress)
    seen: set[str] = set()  # a curve point can coincide with a grid point: one job
    return [j for j in jobs if not (j.id in seen or seen.add(j.id))]


def curve_checkpoints(steps: int, points: int, spacing: str = "log") -> tuple[int, ...]:
    """The optimizer steps evaluated for the training curves, always ending at the last step."""
    if spacing == "linear":
        every = max(1, steps // points)
        return tuple(sorted({min(steps, k * every) for k in range(1, points)} | {steps}))
    first = steps / min(2 ** (points - 1), 64)
    return tuple(sorted({max(1, round(first * (steps / first) ** (k / max(1, points - 1)))) for k in range(points)}))


def collect(out: Path) -> list[dict]:
    """One flat row per eval result under the study (metrics as columns): the results table."""
    rows = []
    for path in sorted(Path(out).glob("**/eval/*.json")):
        r = json.loads(path.read_text())
        row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        row.update(r.get("metrics", {}))
        row["file"] = str(path.relative_to(out))
        row.setdefault("task", "text-to-image")
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    from ldmscale.io import atomic_write_text

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def task_jobs(name: str, task: TaskSection, study: Study, base, init: Path, run: Path, fwd: int, clf_dir: str,
              progress: bool) -> list[Job]:
    """Fine-tune (or distill) one trained size for a task, then evaluate it over the task's grid."""
    from ldmscale.eval.evaluate import evaluate
    from ldmscale.model import flops
    from ldmscale.tasks import kinds as tasks

    ev, kind = study_eval(study), tasks.kind(task.kind)
    try:
        built = kind.build(task, study, ev, base, init, run, progress)
    except UserError as e:
        raise UserError(f"[tasks.{name}]: {e}") from None
    jobs = [Job(kind.job_kind, f"{name} {init.name}",
                {"task": name, "images": task.images} | to_dict(built.cfg) | {"train": to_dict(built.train)}, built.run,
                cost_flops=kind.forward_passes * task.images * fwd)]
    metrics = tuple(task.metrics or built.metrics)
    registry.check_metrics(metrics, task.kind, f"[tasks.{name}]", clip=ev.clip, lpips=ev.lpips)
    samplers, steps, guidance = (task.samplers or built.grid[0], task.steps or built.grid[1],
                                 task.guidance or built.grid[2])
    for sampler in samplers:
        for n_steps in steps:
            for g in guidance:
                e_cfg = eval_config(ev, clf_dir, sampler=sampler, steps=n_steps, guidance=g,
                                    num_images=task.num_images or ev.num_images, metrics=metrics)
                calls = flops.model_calls(n_steps, g if kind.guidance_doubles_calls else 1.0)
                jobs.append(Job("task-eval", f"eval {name} {init.name} {sampler} {n_steps} step{'s' * (n_steps != 1)} "
                                f"g{g:g}", to_dict(e_cfg) | {"run": str(run)},
                                lambda c=e_cfg: evaluate(run, c, progress=False), cost_flops=e_cfg.num_images * calls * fwd))
    return jobs
