"""Image degradations: Gaussian blur (metric sanity checks), and the low-resolution inputs of
super-resolution (bicubic x4 and a Real-ESRGAN-style blur + noise + JPEG chain)."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of uint8 or float images [N, C, H, W] (reflect padding); same dtype back."""
    if sigma <= 0:
        return images
    k = gaussian_kernel(sigma)
    r, c = len(k) // 2, images.shape[1]
    x = images.float()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    if images.dtype == torch.uint8:
        return x.round().clamp(0, 255).to(torch.uint8)
    return x.to(images.dtype)


def resize(images: torch.Tensor, side: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] to side x side (antialiased when shrinking); uint8 back."""
    x = images.float()
    kw = {"antialias": True} if mode in ("bicubic", "bilinear") and side < images.shape[-1] else {}
    if mode in ("bicubic", "bilinear"):
        kw["align_corners"] = False
    y = F.interpolate(x, size=(side, side), mode=mode, **kw)
    return y.round().clamp(0, 255).to(torch.uint8)


def bicubic_down(images: torch.Tensor, scale: int) -> torch.Tensor:
    return resize(images, images.shape[-1] // scale, "bicubic")


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:

    import numpy as np
    from PIL import Image

    from ldmscale.images import to_pil

    pil = to_pil(img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(pil.mode))
    out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return torch.from_numpy(out.copy())


def realesrgan(images: torch.Tensor, scale: int, seeds: list[int]) -> torch.Tensor:
    """A one-stage Real-ESRGAN-style degradation (Wang et al. 2021 use two stages): random Gaussian blur,
    random resize kernel down by `scale`, Gaussian noise, JPEG. Image i draws its parameters from seeds[i]."""
    out = []
    side = images.shape[-1] // scale
    for img, seed in zip(images, seeds):
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(5, generator=g)
        x = gaussian_blur(img[None], float(0.2 + 1.3 * u[0]))
        mode = ("bicubic", "bilinear", "area")[int(u[1] * 3) % 3]
        x = resize(x, side, mode)
        sigma = float(1 + 14 * u[2])  # in 0..255 units
        x = (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
        out.append(_jpeg(x[0], int(50 + 45 * u[3])))
    return torch.stack(out)


def degrade(images: torch.Tensor, scale: int, kind: str, seeds: list[int]) -> torch.Tensor:
    if kind == "bicubic":
        return bicubic_down(images, scale)
    if kind == "realesrgan":
        return realesrgan(images, scale, seeds)
    raise ValueError(f"unknown degradation {kind!r}")
