"""`ldmscale eval`: generate images at one sampling setting with fixed seeds, measure them, write eval/*.json.

Image i uses seed `seed + i` and caption i of a seeded shuffle of the reference split (cycled), as the paper samples
COCO captions. Work is sharded over processes (image i on process i mod N) and the running statistics are
summed across them, so 2 processes give the numbers of 1. Reference statistics are computed once per
(source, split, resolution, channels, count, extractor) and cached with a manifest; statistics whose
manifest does not match the evaluation are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

import torch

from ldmscale.config import from_dict, to_dict
from ldmscale.data.degrade import gaussian_blur
from ldmscale.device import accelerator_kwargs, current, latency_conditions
from ldmscale.diffusion.schedulers import check_sampling_args
from ldmscale.errors import UserError
from ldmscale.eval import metrics, registry
from ldmscale.eval.config import EvalConfig
from ldmscale.eval.reference import (
    canonical_reference,
    parse_reference,
    reference_stats,
)
from ldmscale.integrity import note, read_json, set_aside
from ldmscale.io import atomic_write_json
from ldmscale.model import flops
from ldmscale.names import Kind, backbone_of
from ldmscale.progress import bar


def result_name(cfg: EvalConfig, ckpt_name: str) -> str:
    """The sampling setting in words, then a hash of what else decides the numbers (reference, feature networks,
    metrics, seed), so that an evaluation against another reference or classifier never overwrites this one."""
    extra = "".join(
        f"-{v}"
        for v in (
            cfg.spacing if cfg.spacing != "leading" else "",
            cfg.tag,
            cfg.precision if cfg.precision != "fp32" else "",
        )
        if v
    )
    rest = {
        k: getattr(cfg, k)
        for k in (
            "reference",
            "reference_count",
            "classifier",
            "clip",
            "inception",
            "lpips",
            "metrics",
            "seed",
            "bootstrap",
            "fid_resize",
        )
    }
    rest["classifier"] = str(Path(cfg.classifier).resolve()) if cfg.classifier else ""
    h = hashlib.sha256(json.dumps(rest, sort_keys=True, default=list).encode()).hexdigest()[:8]
    return f"{cfg.sampler}-s{cfg.steps}-g{cfg.guidance:g}-n{cfg.num_images}{extra}-{ckpt_name}-{cfg.weights}-{h}.json"


def _reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum CPU tensors across processes in place when distributed (through the device for nccl, which reduces
    only GPU tensors); float64 sums, so the order barely matters."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"
        for t in tensors:
            if nccl:
                from ldmscale.device import current

                on_device = t.to(current())
                torch.distributed.all_reduce(on_device)
                t.copy_(on_device.cpu())
            else:
                torch.distributed.all_reduce(t)
    return tensors


def _stamp(path: str) -> int:
    p = Path(path) if path else None
    return p.stat().st_mtime_ns if p is not None and p.exists() else 0


@functools.lru_cache(maxsize=8)
def _extractor(kind: str, path: str, stamp: int, device: str, resize: str = "tf"):
    """Feature networks are loaded once per process (a study evaluates dozens of times); the file's modification
    time is part of the key, so a retrained classifier is loaded again."""
    from ldmscale.eval.features import ClassifierFeatures, ClipModel, InceptionFeatures

    if kind == "fid":
        return InceptionFeatures(path or None, resize)
    return {"classifier": ClassifierFeatures, "clip": ClipModel}[kind](path or None)


def build_extractors(cfg: EvalConfig) -> tuple[dict, object, object]:
    """The feature networks an evaluation needs, on the device: {metric: extractor} for the Frechet distances,
    the classifier (caption accuracy) and CLIP, or None."""

    dev = str(current())
    extractors, clf = {}, None
    if "fid" in cfg.metrics:
        extractors["fid"] = _extractor("fid", cfg.inception, _stamp(cfg.inception), dev, cfg.fid_resize)
    if "fd-classifier" in cfg.metrics or "caption-accuracy" in cfg.metrics:
        clf = _extractor("classifier", cfg.classifier, _stamp(str(Path(cfg.classifier) / "model.safetensors")), dev)
        if "fd-classifier" in cfg.metrics:
            extractors["fd-classifier"] = clf
    return extractors, clf, _extractor("clip", cfg.clip, _stamp(cfg.clip), dev) if "clip" in cfg.metrics else None


def result_path(run: str | Path, result: dict) -> Path:
    """Where evaluate() wrote `result` (a study records its hash in the job record)."""
    return Path(run) / "eval" / result_name(from_dict(EvalConfig, result["config"]), result["checkpoint"])


def evaluate(run: str | Path, cfg: EvalConfig, progress: bool = True, force: bool = False) -> dict:
    from accelerate import PartialState

    from ldmscale.checkpoint import load_state
    from ldmscale.data.sources import iterate, label_of_prompt
    from ldmscale.diffusion.generate import generate, load_run, side_flops

    registry.known(cfg.metrics)  # unknown names first, before any model is loaded
    check_sampling_args(cfg.sampler, cfg.steps, cfg.guidance)
    if cfg.num_images < 2 or cfg.batch_size < 1:
        raise UserError("num_images must be at least 2 and batch_size positive")

    state = PartialState(**accelerator_kwargs())
    world, rank = state.num_processes, state.process_index
    model = load_run(run, cfg.checkpoint, cfg.weights, dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    if not cfg.reference:  # the run's own data, its validation split when it has one
        cfg = dataclasses.replace(cfg, reference=canonical_reference(model.config["data"]["source"]))
    out = Path(run) / "eval" / result_name(cfg, model.ckpt.name)
    if out.exists() and not force:
        try:
            existing = read_json(out, "eval result")
            if existing.get("config") == to_dict(cfg):
                return existing
        except (ValueError, OSError) as e:
            if state.is_main_process:
                note(f"{e}; moved to {set_aside(out, out.parent / 'damaged')}; evaluating again")
    kind = model.config.get("kind", Kind.TEXT_TO_IMAGE)
    registry.check_metrics(cfg.metrics, kind, str(run), classifier=cfg.classifier, clip=cfg.clip, lpips=cfg.lpips)
    if kind in (Kind.SUPER_RESOLUTION, Kind.DREAMBOOTH):
        from ldmscale.eval.downstream import evaluate_dreambooth, evaluate_sr

        if world > 1:
            raise UserError(f"{kind} evaluation runs in one process")
        result = (evaluate_sr if kind == Kind.SUPER_RESOLUTION else evaluate_dreambooth)(model, cfg)
        atomic_write_json(out, result)
        return result
    _, h, _ = model.latent_shape
    resolution, channels = int(model.config["data"]["resolution"]), int(model.config["data"]["channels"])

    src, split = parse_reference(cfg.reference)
    captions = [it.caption for it in iterate(src, split) if not it.error]
    if not captions or not any(captions):
        raise UserError(f"reference {cfg.reference} has no captions to prompt with")
    # a seeded shuffle of the reference captions, cycled: prompts follow the reference's mix of content
    # even when its files are sorted (by class, by date, ...)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(cfg.seed))
    prompts = [captions[int(order[i % len(captions)])] for i in range(cfg.num_images)]
    labels = torch.tensor([label_of_prompt(p) for p in prompts])
    seeds = [cfg.seed + i for i in range(cfg.num_images)]

    extractors, clf, clip = build_extractors(cfg)
    refs = {}
    for name, ex in extractors.items():  # every process computes or loads the same cached stats
        with state.main_process_first():
            refs[name] = reference_stats(cfg, ex, resolution, channels, progress=progress and state.is_main_process)

    mine = list(range(rank, cfg.num_images, world))
    stats = {name: metrics.FeatureStats(ex.num_features) for name, ex in extractors.items()}
    boot = {
        name: metrics.BootstrapStats(ex.num_features, cfg.bootstrap)
        for name, ex in extractors.items()
        if cfg.bootstrap > 1
    }
    correct, counted, clip_sum, clip_sq = (torch.zeros(1, dtype=torch.float64) for _ in range(4))
    seconds, nfe = torch.zeros(1, dtype=torch.float64), 0
    for i in bar(
        range(0, len(mine), cfg.batch_size),
        enabled=progress and state.is_main_process,
        desc=f"eval {cfg.sampler} {cfg.steps} g{cfg.guidance:g}",
        unit="batch",
    ):
        idx = mine[i : i + cfg.batch_size]
        images, info = generate(
            model,
            [prompts[j] for j in idx],
            cfg.sampler,
            cfg.steps,
            cfg.guidance,
            [seeds[j] for j in idx],
            cfg.batch_size,
            spacing=cfg.spacing,
        )
        seconds += info["seconds_per_image"] * len(idx)
        nfe = info["model_calls_per_image"]
        feats = {}
        for name, ex in extractors.items():
            feats[name] = ex(images)
            stats[name].update(feats[name])
            if name in boot:
                boot[name].update(feats[name], idx)
        if "caption-accuracy" in cfg.metrics:
            lab = labels[idx]
            keep = lab >= 0
            correct += (clf.predict(images, feats.get("fd-classifier"))[keep] == lab[keep]).sum()
            counted += keep.sum()
        if clip is not None:
            cos = clip.cosine(images, [prompts[j] for j in idx]).double()
            clip_sum += cos.sum()
            clip_sq += (cos**2).sum()
    for s in stats.values():
        n = torch.tensor([float(s.n)], dtype=torch.float64)
        _reduce([n, s.sum, s.outer])
        s.n = int(n.item())
    for b in boot.values():
        _reduce(b.tensors())
    _reduce([correct, counted, clip_sum, clip_sq, seconds])

    values, warnings = {}, []
    for name, s in stats.items():
        values[name] = metrics.fd_of(s, refs[name][0])
        if name in boot:
            values[f"{name}_std"] = metrics.bootstrap_std(boot[name], refs[name][0])
        minimum = metrics.FID_MIN_IMAGES if name == "fid" else metrics.FD_MIN_IMAGES
        if s.n < minimum:
            warnings.append(
                f"{name} from {s.n} images (< {minimum} recommended): biased upward, compare only at equal counts"
            )
    if "caption-accuracy" in cfg.metrics:
        if counted.item() == 0:
            raise UserError("caption accuracy needs prompts that name a class of the dataset")
        p = float(correct.item() / counted.item())
        values["caption-accuracy"] = p
        values["caption-accuracy_std"] = (p * (1 - p) / counted.item()) ** 0.5  # binomial standard error
    if clip is not None:
        values |= metrics.clip_scores(clip_sum.item(), cfg.num_images)
        var = max(0.0, clip_sq.item() / cfg.num_images - values["clip_cosine"] ** 2)
        values["clip_cosine_std"] = (var / cfg.num_images) ** 0.5
    acc = model.config["accounting"]
    ck_state = load_state(model.ckpt)
    data = model.config["data"]
    side = side_flops(
        data["text_encoder"]["spec"], int(data["context_len"]), data["autoencoder"]["spec"], model.latent_shape
    )
    ref_flops = acc["gflops"] * 1e9 / acc["norm_cost"]  # the C=320 UNet at this latent and context
    result = {
        "run": str(Path(run).resolve()),
        "size": model.config["train"]["size"],
        "kind": model.config.get("kind"),
        "checkpoint": model.ckpt.name,
        "weights": cfg.weights,
        "images_seen": ck_state.get("images_seen"),
        "train_flops": ck_state.get("train_flops"),
        "steps_x_gflops": ck_state.get("steps_x_gflops"),
        "val_loss": ck_state.get("val_loss"),
        "val_loss_std": ck_state.get("val_loss_std"),
        "backbone": backbone_of(model.config),
        "prediction": model.prediction,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "spacing": cfg.spacing,
        "num_images": cfg.num_images,
        "tag": cfg.tag,
        "seeds": [cfg.seed, cfg.seed + cfg.num_images - 1],
        "metrics": values,
        "warnings": warnings,
        "params": acc["params"],
        "gflops": acc["gflops"],
        "norm_cost": acc["norm_cost"],
        "sampling_cost": flops.sampling_cost(acc["norm_cost"], cfg.steps),
        "model_calls_per_image": nfe,
        "executed_cost": acc["norm_cost"] * nfe,
        "train_seed": int(model.config["train"].get("seed", 0)),
        "text_encoder_cost": side["text_encoder_flops"] / ref_flops,
        "decoder_cost": side["decoder_flops"] / ref_flops,
        "latency_ms_per_image": 1000 * seconds.item() / cfg.num_images,
        "latency_batch_size": cfg.batch_size,
        "processes": world,
        **latency_conditions(next(model.unet.parameters()).device),
        "distilled": bool(model.config.get("distilled", False)),
        "reference": {name: ref[1] for name, ref in refs.items()} | {"spec": cfg.reference},
        "config": to_dict(cfg),
        "flop_convention": acc.get("flop_convention"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if state.is_main_process:
        atomic_write_json(out, result)
    state.wait_for_everyone()
    return result


def extractor_for(metric: str, cfg: EvalConfig):
    from ldmscale.eval.features import ClassifierFeatures, InceptionFeatures

    if metric == "fid":
        return InceptionFeatures(cfg.inception or None, cfg.fid_resize)
    if metric == "fd-classifier":
        return ClassifierFeatures(cfg.classifier)
    raise UserError(f"{metric} is not a Frechet-distance metric (fid, fd-classifier)")


def sanity_rows(
    cfg: EvalConfig,
    metric: str,
    resolution: int,
    channels: int,
    limit: int = 1000,
    sigmas: tuple[float, ...] = (0.5, 1.0, 2.0),
) -> list[dict]:
    """The metric between the reference split and real images that should score well (the train split) or
    progressively worse (the reference blurred by each sigma): a metric that does not rank these is not sound."""
    from ldmscale.data.sources import load_images, splits

    ex = extractor_for(metric, cfg)
    ref, _ = reference_stats(cfg, ex, resolution, channels)
    src, split = parse_reference(cfg.reference)

    def stats(images):
        return metrics.stats_of(
            (images[i : i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)), ex, ex.num_features
        )

    rows = []
    others = [s for s in splits(src) if s != split]
    if others:
        imgs = torch.as_tensor(load_images(src, others[0], resolution, channels, limit)[0])
        rows.append(
            {"metric": metric, "images": f"{others[0]} split", "n": len(imgs), "value": metrics.fd_of(stats(imgs), ref)}
        )
    base = torch.as_tensor(load_images(src, split, resolution, channels, limit)[0])
    for sigma in sigmas:
        rows.append(
            {
                "metric": metric,
                "images": f"{split}, Gaussian blur sigma {sigma:g} px",
                "n": len(base),
                "value": metrics.fd_of(stats(gaussian_blur(base, sigma)), ref),
            }
        )
    return rows
