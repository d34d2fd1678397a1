"""Study planning: the jobs a study needs (first stage, cache, classifier, every size's training, the evaluation grid,
curve and agreement points, downstream tasks) in dependency order (their results table: study/results.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ldmscale.config import apply_overrides, from_dict, to_dict
from ldmscale.data.cache import latent_shapes
from ldmscale.data.config import AutoencoderConfig, PrepareConfig
from ldmscale.diffusion.schedulers import model_calls
from ldmscale.errors import UserError
from ldmscale.eval import registry
from ldmscale.eval.config import ClassifierConfig
from ldmscale.io import atomic_write_json
from ldmscale.model import flops
from ldmscale.model.family import parse_size, size_spec
from ldmscale.study import tasks
from ldmscale.study.jobs import FID_SECONDS_PER_IMAGE, Job
from ldmscale.study.spec import EVAL_SEED_STRIDE, Study, TaskSection, eval_config, per_size, run_name, study_eval
from ldmscale.train.config import TrainConfig


def expected_shapes(study: Study, out: Path) -> dict:
    """Latent and text-context shapes the study's models will see (from the cache if it exists, else from
    the autoencoder and text encoder configs), for FLOP estimates before anything has run."""
    cache = Path(study.data.cache or out / "cache")
    if (cache / "manifest.json").exists():
        return latent_shapes(cache)
    if study.data.autoencoder and (Path(study.data.autoencoder) / "config.json").exists():
        ae = json.loads((Path(study.data.autoencoder) / "config.json").read_text())
    else:
        from ldmscale.data.config import AutoencoderConfig

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
    from ldmscale.data.autoencoder import resolve_channels, train_autoencoder
    from ldmscale.data.cache import prepare
    from ldmscale.eval.classifier import train_classifier

    out = Path(out).resolve()
    jobs: list[Job] = []
    d = study.data
    ae_dir = d.autoencoder or str(out / "autoencoder")
    if not d.autoencoder and not d.cache:
        ae_cfg = from_dict(
            AutoencoderConfig, {"source": d.source, "resolution": d.resolution} | dict(study.autoencoder)
        )
        ae_cfg = resolve_channels(ae_cfg, announce=False)  # the data's channels, in the job's config
        jobs.append(
            Job(
                "autoencoder",
                "autoencoder",
                to_dict(ae_cfg),
                lambda c=ae_cfg: train_autoencoder(c, out / "autoencoder", progress=progress, overwrite=True),
            )
        )
    cache = d.cache or str(out / "cache")
    if not d.cache:
        p_cfg = PrepareConfig(
            source=d.source,
            autoencoder=ae_dir,
            text_encoder=d.text_encoder,
            resolution=d.resolution,
            max_length=d.context_len,
        )
        jobs.append(
            Job("prepare", "latent cache", to_dict(p_cfg), lambda c=p_cfg: prepare(c, cache, progress=progress))
        )
    ev = study_eval(study)
    clf_dir = ev.classifier
    if {"fd-classifier", "caption-accuracy"} & set(ev.metrics) and not clf_dir:
        clf_cfg = from_dict(ClassifierConfig, {"source": d.source, "resolution": d.resolution} | dict(study.classifier))
        clf_dir = str(out / "classifier")
        jobs.append(
            Job(
                "classifier",
                "classifier",
                to_dict(clf_cfg),
                lambda c=clf_cfg: train_classifier(c, clf_dir, progress=progress, overwrite=True),
            )
        )
    jobs += metric_jobs(ev, clf_dir, cache, out)
    shapes = expected_shapes(study, out)
    base = apply_overrides(TrainConfig(data=cache), [f"{k}={v}" for k, v in study.train.set.items()])
    for seed in study.train.seeds:
        for name in study.train.sizes:
            jobs += size_jobs(study, ev, base, parse_size(name), seed, shapes, out, clf_dir, progress)
    seen: set[str] = set()  # a curve point can coincide with a grid point: one job
    return [j for j in jobs if not (j.id in seen or seen.add(j.id))]


def metric_jobs(ev, clf_dir: str, cache: str, out: Path) -> list[Job]:
    """The primary metric's sanity check, and the Inception reference statistics of the evaluations that measure FID
    (0.16 s an image here), computed once before them instead of by whichever evaluation comes first (on a cluster, by
    every one that starts before the first has written them); on one machine beside the training runs."""

    def sanity(c, metric=ev.primary):
        from ldmscale.data.cache import read_manifest
        from ldmscale.eval.evaluate import sanity_rows

        m = read_manifest(cache)
        atomic_write_json(out / "sanity.json", sanity_rows(c, metric, m["resolution"], m["channels"]))

    def reference(c):
        from ldmscale.data.cache import read_manifest
        from ldmscale.eval.evaluate import build_extractors
        from ldmscale.eval.reference import reference_stats

        m = read_manifest(cache)  # the evaluations' own extractor, so the statistics are the ones they look up
        reference_stats(c, build_extractors(c)[0]["fid"], m["resolution"], m["channels"])

    jobs = []
    if ev.sanity and ev.primary in ("fid", "fd-classifier"):
        s_cfg = eval_config(ev, clf_dir, metrics=(ev.primary,))
        jobs.append(Job("sanity", f"metric sanity ({ev.primary})", to_dict(s_cfg), lambda c=s_cfg: sanity(c)))
    counts = {ev.reference_count} if "fid" in ev.metrics else set()
    if ev.agreement_metric == "fid":
        counts.add(ev.agreement_reference_count or ev.reference_count)
    for count in sorted(counts):
        r_cfg = eval_config(ev, "", metrics=("fid",), reference_count=count)
        jobs.append(
            Job(
                "reference",
                f"fid reference statistics ({f'{count} images' if count else 'the whole split'})",
                to_dict(r_cfg),
                lambda c=r_cfg: reference(c),
                extra_seconds=(count or 1000) * FID_SECONDS_PER_IMAGE,  # the ETA's guess for a whole split
            )
        )
    return jobs


def size_jobs(
    study: Study, ev, base, size, seed: int, shapes: dict, out: Path, clf_dir: str, progress: bool
) -> list[Job]:
    """One size and training seed: its training run, its evaluations (curve points, the grid, agreement points for
    the first seed) and its downstream tasks. Seed k evaluates on its own image seeds, so that its evaluation noise
    is independent of the other seeds'."""

    from ldmscale.eval.evaluate import evaluate, result_path
    from ldmscale.train.cooldown import branch
    from ldmscale.train.loop import train

    jobs: list[Job] = []
    first = seed == study.train.seeds[0]
    ev = dataclasses.replace(ev, seed=ev.seed + seed * EVAL_SEED_STRIDE)
    base = dataclasses.replace(base, seed=seed)
    mine = per_size(study).get(size.name, {})
    base = apply_overrides(base, [f"{k}={v}" for k, v in mine.items()])  # this size's own settings
    tag = "" if seed == 0 else f" seed {seed}"
    fwd = forward_flops(size, shapes)
    images = budget_images(study, fwd)
    if size.name in study.train.match_compute:  # the other size's training FLOPs, in this size's images
        other = forward_flops(parse_size(study.train.match_compute[size.name]), shapes)
        images = int(budget_images(study, other) * other / fwd)
    steps = max(1, round(images / base.batch_size))
    points = max(1, study.train.curve_points)
    every = max(1, steps // points)
    curve_steps = curve_checkpoints(steps, points, study.train.curve_spacing)
    run = out / "runs" / run_name(size.name, seed)
    branches = []  # IsoFLOP cooldown branches: (the budget's step, the step it branches at, its run folder)
    if study.train.budget == "isoflop":  # the curve points are the budgets: where each size's run reaches them
        curve_steps = budget_steps(study.train.budgets, fwd, base.batch_size)
        every = steps
        if study.train.cooldown > 0:  # the stable run stops at the last branch point; each budget is a branch
            at = [min(s - 1, round(s * (1 - study.train.cooldown))) for s in curve_steps]
            if min(at) < 1:
                raise UserError(
                    f"[train] budgets: {size.name} reaches the smallest budget in {min(curve_steps)} optimizer "
                    f"step(s), too few for a cooldown branch; raise the budgets or lower batch_size"
                )
            branches = [
                (s, k, run.with_name(f"{run.name}-budget{j + 1}")) for j, (s, k) in enumerate(zip(curve_steps, at))
            ]
            steps = every = max(at)
            curve_steps = tuple(sorted(set(at)))
            if base.warmup_fraction > 0:  # every branch shares the stable run's warm-up: a share of the smallest
                base = dataclasses.replace(
                    base, warmup_steps=round(base.warmup_fraction * min(b[0] for b in branches)), warmup_fraction=0.0
                )
    t_cfg = TrainConfig(
        **(
            to_dict(base)
            | {
                "size": size_spec(size),
                "images": steps * base.batch_size,
                # [train.set] checkpoint_every: more often, for a cluster's preemptions and time limits
                "checkpoint_every": base.checkpoint_every or every * base.batch_size,
                "keep": 2,
                "checkpoint_at": curve_steps,
            }
        )
    )
    t_cfg = from_dict(TrainConfig, to_dict(t_cfg))
    jobs.append(
        Job(
            "train",
            f"train {size.name}{tag} ({steps * base.batch_size:,} images)",
            to_dict(t_cfg),
            lambda c=t_cfg, r=run: train(c, r, progress=progress),
            cost_flops=flops.training_flops(steps * base.batch_size, fwd),
        )
    )

    final_run, final_step = run, steps
    for j, (s, k, b_run) in enumerate(branches):
        b_cfg = from_dict(
            TrainConfig,
            to_dict(t_cfg)
            | {
                "images": s * base.batch_size,
                "lr_schedule": "wsd",
                "decay_fraction": (s - k) / s,
                "checkpoint_at": (),
                "checkpoint_every": s * base.batch_size,
                "keep": 1,
            },
        )
        jobs.append(
            Job(
                "cooldown",
                f"cooldown {size.name}{tag} to budget {j + 1} (steps {k}-{s})",
                to_dict(b_cfg) | {"stable_run": str(run), "at": k},
                lambda c=b_cfg, r=b_run, k=k: branch(run, k, c, r, progress=progress),
                cost_flops=flops.training_flops((s - k) * base.batch_size, fwd),
            )
        )
        final_run, final_step = b_run, s

    def eval_job(label, sampler, n_steps, g, ckpt, run=final_run, fwd=fwd, agreement=False):
        n = (ev.agreement_images or ev.num_images) if agreement else ev.num_images
        e_cfg = eval_config(
            ev,
            clf_dir,
            sampler=sampler,
            steps=n_steps,
            guidance=g,
            num_images=n,
            checkpoint=str(ckpt),
            **(
                dict(
                    metrics=(ev.primary, ev.agreement_metric),
                    tag="agreement",
                    reference_count=ev.agreement_reference_count or ev.reference_count,
                    bootstrap=0,
                )
                if agreement
                else {}
            ),
        )  # the rank correlation needs values only
        calls = model_calls(sampler, n_steps, g)
        return Job(
            "eval",
            f"eval {size.name}{tag} {label}",
            to_dict(e_cfg) | {"run": str(run)},
            lambda: result_path(run, evaluate(run, e_cfg, progress=False)),
            cost_flops=n * calls * fwd,
            extra_seconds=n * FID_SECONDS_PER_IMAGE * ("fid" in e_cfg.metrics),
        )

    if branches:  # each budget's annealed model, at the curve setting
        for j, (s, _, b_run) in enumerate(branches):
            jobs.append(
                eval_job(f"budget {j + 1} step {s}", ev.curve_sampler, ev.curve_steps, ev.curve_guidance, s, run=b_run)
            )
    for ck in curve_steps if not branches else ():
        jobs.append(eval_job(f"curve step {ck}", ev.curve_sampler, ev.curve_steps, ev.curve_guidance, ck, run=run))
    for sampler in ev.samplers:
        for n_steps in ev.steps:
            if n_steps > ev.max_steps.get(sampler, 10**9):
                continue
            for g in ev.guidance:
                jobs.append(
                    eval_job(f"{sampler} {n_steps} step{'s' * (n_steps != 1)} g{g:g}", sampler, n_steps, g, final_step)
                )
            if first and ev.agreement_metric and n_steps in ev.agreement_steps and sampler == ev.samplers[0]:
                jobs.append(
                    eval_job(
                        f"{sampler} {n_steps} step{'s' * (n_steps != 1)} g{ev.guidance[0]:g}, {ev.agreement_metric} "
                        "agreement",
                        sampler,
                        n_steps,
                        ev.guidance[0],
                        final_step,
                        agreement=True,
                    )
                )
    for tname, task in study.tasks.items():
        if task.sizes and size.name not in {parse_size(t).name for t in task.sizes}:
            continue
        jobs += task_jobs(
            tname,
            task,
            study,
            base,
            final_run,
            out / "tasks" / tname / run_name(size.name, seed),
            fwd,
            clf_dir,
            progress,
        )
    return jobs


def forward_flops(size, shapes: dict) -> int:

    return flops.cost(size, shapes["latent"], shapes["ctx_len"], shapes["ctx_dim"], shapes["channels"]).flops


def budget_images(study: Study, fwd: int) -> int:
    """The images a size with `fwd` forward FLOPs trains on under the study's budget."""
    if study.train.budget == "images":
        return study.train.images
    if study.train.budget == "compute":
        return int(study.train.flops / (3 * fwd))
    return int(max(study.train.budgets) / (3 * fwd))


def budget_steps(budgets, forward_flops: int, batch_size: int) -> tuple[int, ...]:
    """The optimizer steps at which a run reaches each training-FLOP budget (3 x forward FLOPs an image)."""
    return tuple(sorted({max(1, round(b / (3 * forward_flops * batch_size))) for b in budgets}))


def curve_checkpoints(steps: int, points: int, spacing: str = "log") -> tuple[int, ...]:
    """The optimizer steps evaluated for the training curves, always ending at the last step."""
    if spacing == "linear":
        every = max(1, steps // points)
        return tuple(sorted({min(steps, k * every) for k in range(1, points)} | {steps}))
    first = steps / min(2 ** (points - 1), 64)
    return tuple(sorted({max(1, round(first * (steps / first) ** (k / max(1, points - 1)))) for k in range(points)}))


def task_jobs(
    name: str, task: TaskSection, study: Study, base, init: Path, run: Path, fwd: int, clf_dir: str, progress: bool
) -> list[Job]:
    """Fine-tune (or distill) one trained size for a task, then evaluate it over the task's grid."""
    from ldmscale.eval.evaluate import evaluate, result_path

    ev, kind = study_eval(study), tasks.kind(task.kind)
    try:
        built = kind.build(task, study, ev, base, init, run, progress)
    except UserError as e:
        raise UserError(f"[tasks.{name}]: {e}") from None
    jobs = [
        Job(
            kind.job_kind,
            f"{name} {init.name}",
            {"task": name, "images": built.images} | to_dict(built.cfg) | {"train": to_dict(built.train)},
            built.run,
            cost_flops=kind.forward_passes * built.images * fwd,
        )
    ]
    metrics = tuple(task.metrics or built.metrics)
    registry.check_metrics(metrics, task.kind, f"[tasks.{name}]", clip=ev.clip, lpips=ev.lpips)
    samplers, steps, guidance = (
        task.samplers or built.grid[0],
        task.steps or built.grid[1],
        task.guidance or built.grid[2],
    )
    for sampler in samplers:
        for n_steps in steps:
            for g in guidance:
                e_cfg = eval_config(
                    ev,
                    clf_dir,
                    sampler=sampler,
                    steps=n_steps,
                    guidance=g,
                    num_images=task.num_images or ev.num_images,
                    metrics=metrics,
                )
                calls = model_calls(sampler, n_steps, g, guidance_embedded=not kind.guidance_doubles_calls)
                jobs.append(
                    Job(
                        "task-eval",
                        f"eval {name} {init.name} {sampler} {n_steps} step{'s' * (n_steps != 1)} g{g:g}",
                        to_dict(e_cfg) | {"run": str(run)},
                        lambda c=e_cfg: result_path(run, evaluate(run, c, progress=False)),
                        cost_flops=e_cfg.num_images * calls * fwd,
                    )
                )
    return jobs


def frechet_dims(study: Study) -> dict[str, int]:
    """The feature dimensions of the study's Frechet metrics (its own classifier's, or the one it names)."""

    ev = study_eval(study)
    clf = Path(ev.classifier) / "classifier.json" if ev.classifier else None
    clf_dim = (
        json.loads(clf.read_text())["config"]["feature_dim"]
        if clf is not None and clf.exists()
        else from_dict(ClassifierConfig, {"source": study.data.source} | dict(study.classifier)).feature_dim
    )
    return {"fid": 2048, "fd-classifier": clf_dim}


def sample_size_warnings(study: Study) -> list[str]:
    """Points too small for their metric: a Frechet distance on fewer images than its feature dimensions has a
    rank-deficient covariance, so its values are biased upward and noisier than the bootstrap shows (the claims
    say "not measured" on them)."""
    ev = study_eval(study)
    dims = frechet_dims(study)
    points = [(m, ev.num_images, "") for m in ev.metrics if m in dims]
    if ev.agreement_metric in dims:
        points.append((ev.agreement_metric, ev.agreement_images or ev.num_images, " (the metric check)"))
    return [
        f"{m} on {n} images a point{why}: fewer than its {dims[m]} feature dimensions, so the distance is biased "
        "upward and its noise understated; points compare at equal image counts, absolute values do not"
        for m, n, why in points
        if n < dims[m]
    ]
