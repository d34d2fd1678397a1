"""Evaluation of downstream runs: super-resolution (PSNR, SSIM, FID/classifier FD, LPIPS; against bicubic
upsampling of the same inputs) and DreamBooth (subject fidelity, prompt fidelity). Called by evaluate()."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ldmscale.config import from_dict, to_dict
from ldmscale.data.degrade import bicubic_down, degrade, resize
from ldmscale.device import latency_conditions
from ldmscale.errors import UserError
from ldmscale.eval import metrics
from ldmscale.eval.reference import parse_reference, reference_stats
from ldmscale.model import flops
from ldmscale.tasks.config import DreamBoothConfig, SRConfig
from ldmscale.tasks.dreambooth import subject_images
from ldmscale.tasks.superres import upscale


def _common(model, cfg, info_seconds: float, n: int, nfe: int) -> dict:
    from ldmscale.checkpoint import load_state

    acc = model.config["accounting"]
    st = load_state(model.ckpt)
    return {
        "run": str(Path(model.run).resolve()),
        "size": model.config["train"]["size"],
        "kind": model.config["kind"],
        "task": model.config["kind"],
        "init_run": model.config.get("init", {}).get("run"),
        "checkpoint": model.ckpt.name,
        "weights": cfg.weights,
        "images_seen": st.get("images_seen"),
        "train_flops": st.get("train_flops"),
        "steps_x_gflops": st.get("steps_x_gflops"),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "spacing": cfg.spacing,
        "num_images": n,
        "seeds": [cfg.seed, cfg.seed + n - 1],
        "params": acc["params"],
        "gflops": acc["gflops"],
        "norm_cost": acc["norm_cost"],
        "sampling_cost": flops.sampling_cost(acc["norm_cost"], cfg.steps),
        "model_calls_per_image": nfe,
        "latency_ms_per_image": 1000 * info_seconds / max(1, n),
        "latency_batch_size": cfg.batch_size,
        "processes": 1,
        **latency_conditions(next(model.unet.parameters()).device),
        "distilled": bool(model.config.get("distilled", False)),
        "config": to_dict(cfg),
        "flop_convention": acc.get("flop_convention"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _extractors(cfg):
    """Feature networks of the Frechet metrics asked for (registry.check_metrics has checked what they need)."""
    from ldmscale.eval.features import ClassifierFeatures, InceptionFeatures

    ex = {}
    if "fid" in cfg.metrics:
        ex["fid"] = InceptionFeatures(cfg.inception or None, cfg.fid_resize)
    if "fd-classifier" in cfg.metrics:
        ex["fd-classifier"] = ClassifierFeatures(cfg.classifier)
    return ex


def evaluate_sr(model, cfg) -> dict:
    from ldmscale.data.sources import load_images

    sr = from_dict(SRConfig, model.config["task"])
    res, ch = int(model.config["data"]["resolution"]), int(model.config["data"]["channels"])
    src, split = parse_reference(cfg.reference)
    hr_all, caps, _ = load_images(src, split, res, ch, cfg.num_images)
    n = len(hr_all)
    ex = _extractors(cfg)
    refs = {k: reference_stats(cfg, e, res, ch) for k, e in ex.items()}
    each: dict[str, list[float]] = {}  # per-image PSNR / SSIM / LPIPS of the samples and of bicubic upsampling
    stats = {k: metrics.FeatureStats(e.num_features) for k, e in ex.items()}
    base_stats = {k: metrics.FeatureStats(e.num_features) for k, e in ex.items()}
    boot = {k: metrics.BootstrapStats(e.num_features, cfg.bootstrap) for k, e in ex.items() if cfg.bootstrap > 1}
    seconds, nfe = 0.0, 0
    for i in range(0, n, cfg.batch_size):
        hr = torch.as_tensor(hr_all[i : i + cfg.batch_size])
        seeds = [cfg.seed + i + j for j in range(len(hr))]
        lr = degrade(hr, sr.scale, sr.degradation, seeds)
        out, info = upscale(
            model, lr, caps[i : i + len(hr)], seeds, cfg.sampler, cfg.steps, cfg.guidance, cfg.batch_size, cfg.spacing
        )
        seconds += info["seconds_per_image"] * len(hr)
        nfe = info["model_calls_per_image"]
        bicubic = resize(lr, res, "bicubic")
        for pred, prefix in ((out, ""), (bicubic, "bicubic_")):
            r = metrics.psnr_ssim(pred, hr)
            each.setdefault(prefix + "psnr", []).extend(r["psnr_each"])
            # consistency: the output brought back down by 4x bicubic, against its input (ignoring the input: ~9 dB)
            each.setdefault(prefix + "consistency", []).extend(
                metrics.psnr_ssim(bicubic_down(pred, sr.scale), lr)["psnr_each"]
            )
            each.setdefault(prefix + "ssim", []).extend(r["ssim_each"])
            if cfg.lpips:
                each.setdefault(prefix + "lpips", []).extend(metrics.lpips(pred, hr, cfg.lpips, reduce=False))
        for k, e in ex.items():
            feats = e(out)
            stats[k].update(feats)
            if k in boot:
                boot[k].update(feats, list(range(i, i + len(hr))))
            base_stats[k].update(e(bicubic))
    values = {}
    for k, v in each.items():  # mean and its standard error
        values[k], values[f"{k}_std"] = (
            float(np.mean(v)),
            float(np.std(v, ddof=1) / len(v) ** 0.5) if len(v) > 1 else 0.0,
        )
    for k in ex:
        values[k] = metrics.fd_of(stats[k], refs[k][0])
        if k in boot:
            values[f"{k}_std"] = metrics.bootstrap_std(boot[k], refs[k][0])
        values[f"bicubic_{k}"] = metrics.fd_of(base_stats[k], refs[k][0])
    result = _common(model, cfg, seconds, n, nfe)
    result.update(
        {
            "metrics": values,
            "warnings": [],
            "degradation": sr.degradation,
            "scale": sr.scale,
            "condition": sr.condition,
            "reference": {k: r[1] for k, r in refs.items()} | {"spec": cfg.reference},
        }
    )
    return result


def evaluate_dreambooth(model, cfg) -> dict:
    from ldmscale.data.sources import label_of_prompt
    from ldmscale.diffusion.generate import generate

    db = from_dict(DreamBoothConfig, {k: v for k, v in model.config["task"].items() if k != "instance_prompt"})
    prompt = model.config["task"]["instance_prompt"]
    res, ch = int(model.config["data"]["resolution"]), int(model.config["data"]["channels"])
    from ldmscale.eval.features import ClassifierFeatures, InceptionFeatures

    feat = ClassifierFeatures(cfg.classifier) if cfg.classifier else None
    if "subject-fidelity" in cfg.metrics and feat is None:  # class-level likeness in Inception's features instead
        feat = InceptionFeatures(cfg.inception or None, cfg.fid_resize)
    label = label_of_prompt(db.class_prompt)
    if "caption-accuracy" in cfg.metrics and label < 0:
        raise UserError(
            f"caption-accuracy: the class prompt {db.class_prompt!r} is none of the classifier's classes; "
            "leave the metric out"
        )
    subject = subject_images(db.subject, res, ch)
    n = cfg.num_images
    seeds = [cfg.seed + i for i in range(n)]
    images, info = generate(
        model, [prompt] * n, cfg.sampler, cfg.steps, cfg.guidance, seeds, cfg.batch_size, spacing=cfg.spacing
    )
    values = {}
    if "subject-ssim" in cfg.metrics:  # identity: that subject's shape and pose
        values["subject-ssim"], values["subject-ssim_std"] = metrics.subject_ssim(images, subject)
    if "subject-fidelity" in cfg.metrics:  # class-level likeness in a feature space
        values["subject-fidelity"], values["subject-fidelity_std"] = metrics.subject_fidelity(
            feat(images), feat(subject)
        )
    if "caption-accuracy" in cfg.metrics:
        values["caption-accuracy"] = metrics.caption_accuracy(feat.predict(images), torch.full((n,), label))
    result = _common(model, cfg, info["seconds_per_image"] * n, n, info["model_calls_per_image"])
    result.update({"metrics": values, "warnings": [], "prompt": prompt, "reference": {"subject": db.subject}})
    return result
