"""The domain classifier: a small CNN trained on a labelled source, whose penultimate features are the space of the
classifier Frechet distance and whose predictions give caption accuracy (eval/features.py reads it back)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ldmscale.config import to_dict
from ldmscale.data.sources import ANIMAL_CLASSES, load_images, parse_source
from ldmscale.device import current
from ldmscale.errors import UserError
from ldmscale.eval.config import ClassifierConfig
from ldmscale.io import atomic_dir, atomic_write_json, check_output
from ldmscale.progress import bar


class Classifier(nn.Module):
    """A small CNN: its penultimate layer is the feature space of the classifier Frechet distance."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int):
        super().__init__()
        w = cfg.width

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(
            block(cfg.channels, w),
            block(w, 2 * w),
            block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, cfg.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(cfg.feature_dim, num_classes)
        self.cfg = cfg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def prepare_input(images: torch.Tensor, cfg: ClassifierConfig) -> torch.Tensor:
    x = images.float().div(127.5).sub(1)
    if x.shape[1] != cfg.channels:
        x = x.mean(1, keepdim=True) if cfg.channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != cfg.resolution:
        x = F.interpolate(
            x, size=(cfg.resolution, cfg.resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return x


def train_classifier(cfg: ClassifierConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Train the domain classifier on a labelled source (animal-mnist) and store it like any model (an existing
    classifier at `out` is replaced only with overwrite)."""
    check_output(out, "classifier", overwrite)

    src = parse_source(cfg.source)
    if src.kind != "animal-mnist":
        raise UserError("the domain classifier needs a labelled source; ldmscale knows the labels of animal-mnist")
    x_tr, _, y_tr = load_images(src, "train", cfg.resolution, cfg.channels)
    x_va, _, y_va = load_images(src, "validation", cfg.resolution, cfg.channels)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    dev = current()
    model = Classifier(cfg, len(ANIMAL_CLASSES)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * ((len(x_tr) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    xt, yt = torch.as_tensor(x_tr), torch.as_tensor(y_tr)
    pbar = bar(total=steps, desc="classifier", unit="step", enabled=progress)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = prepare_input(xt[idx].to(dev), cfg)
            # light augmentation: shifts and flips keep silhouettes' classes
            x = torch.roll(
                x,
                shifts=(int(torch.randint(-2, 3, (1,), generator=g)), int(torch.randint(-2, 3, (1,), generator=g))),
                dims=(2, 3),
            )
            if torch.rand(1, generator=g) < 0.5:
                x = x.flip(3)
            loss = F.cross_entropy(model(x), yt[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            pbar.update(1)
    pbar.close()
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [
                model(prepare_input(torch.as_tensor(x_va[i : i + 500]).to(dev), cfg)).argmax(1).cpu()
                for i in range(0, len(x_va), 500)
            ]
        )
    acc = float((pred == torch.as_tensor(y_va)).float().mean())
    meta = {
        "config": to_dict(cfg),
        "classes": list(ANIMAL_CLASSES),
        "validation_accuracy": round(acc, 4),
        "train_images": len(x_tr),
    }
    with atomic_dir(out) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "classifier.json", meta)
    return meta
