"""Image helpers shared by data sources, sampling, the report and degradations: decoding any bit depth to 8 bits,
cropping and resizing, uint8 tensors to PIL, grids, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldmscale.io import atomic_write


def to_pil(img: torch.Tensor | np.ndarray) -> Image.Image:
    arr = np.asarray(img)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], "L")
    return Image.fromarray(arr.transpose(1, 2, 0), "RGB")


def grid(images: torch.Tensor, ncol: int, min_cell: int = 96, pad: int = 2) -> Image.Image:
    """Images [N,C,H,W] uint8 in rows of `ncol`, upscaled (nearest) so small images stay visible."""
    n, c, h, w = images.shape
    scale = max(1, min_cell // h)
    nrow = (n + ncol - 1) // ncol
    out = Image.new("L" if c == 1 else "RGB", (ncol * (w * scale + pad) + pad, nrow * (h * scale + pad) + pad), 128)
    for i in range(n):
        tile = to_pil(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        out.paste(tile, (pad + (i % ncol) * (w * scale + pad), pad + (i // ncol) * (h * scale + pad)))
    return out


def label_rows(img: Image.Image, labels: list[str], font_size: int = 14, pad: int = 8) -> Image.Image:
    """The grid with one label per row written to its left (the prompt each row was sampled with)."""

    font = ImageFont.load_default(size=font_size)
    width = max(int(font.getlength(t)) for t in labels) + 2 * pad if labels else 0
    out = Image.new("RGB", (img.width + width, img.height), "white")
    out.paste(img.convert("RGB"), (width, 0))
    draw, row = ImageDraw.Draw(out), img.height / max(1, len(labels))
    for i, text in enumerate(labels):
        draw.text((pad, int((i + 0.5) * row)), text, fill="black", font=font, anchor="lm")
    return out


def save_png(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def to_8bit(img: Image.Image) -> Image.Image:
    """8-bit by the image's own bit depth: 16-bit integers are divided by 257, floats are read as 0..1.
    (PIL's convert clips instead: a 16-bit image turns near white, a 0..1 float image black.)"""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) <= 65535 else 2.0**32 - 1
        return Image.fromarray(np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.clip(np.round(arr * 255), 0, 255).astype(np.uint8), "L")
    return img


def preprocess(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """8-bit (to_8bit), center-crop to a square, resize (Lanczos down, bicubic up), to uint8 [channels, H, W]."""
    img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        method = Image.LANCZOS if side > resolution else Image.BICUBIC
        img = img.resize((resolution, resolution), method)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, rounding as PIL/diffusers do."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of float images in [-1, 1] (torchmetrics', data range 2, one value per image)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # 0.4 s of imports, for two callers

    return peak_signal_noise_ratio(a.float(), b.float(), data_range=2.0, reduction="none", dim=(1, 2, 3))
