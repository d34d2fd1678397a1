"""Image degradations: Gaussian blur (metric sanity checks), and the low-resolution inputs of
super-resolution (bicubic x4 and a Real-ESRGAN-style blur + noise + JPEG chain)."""

from __future__ import annotations

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
