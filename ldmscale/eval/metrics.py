"""Metrics over image iterables. They see feature callables and batches of uint8 images, never models.

- Frechet distance in float64 from running sums (images are streamed, never all held);
- CLIP score as the paper's raw cosine (~0.31 for SD) and as torchmetrics' 100 x max(cos, 0);
- caption accuracy, PSNR, SSIM, LPIPS (from a given TorchScript).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ldmscale.device import current
from ldmscale.errors import UserError

FID_MIN_IMAGES = 2048  # below this, FID is biased upward (and the 2048-d covariance is rank-deficient)
FD_MIN_IMAGES = 500  # for low-dimensional feature spaces (the classifier's 128-d)


class FeatureStats:
    """Running count, sum and sum of outer products of features, in float64; mergeable across processes."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to(torch.float64).reshape(len(feats), -1)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: FeatureStats) -> FeatureStats:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    @property
    def mean(self) -> np.ndarray:
        return (self.sum / self.n).numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (n - 1), as numpy.cov and pytorch-fid."""
        mu = self.sum / self.n
        return ((self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([self.n], dtype=torch.int64), "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> FeatureStats:
        s = cls(t["sum"].shape[0])
        s.n, s.sum, s.outer = int(t["n"][0]), t["sum"].double(), t["outer"].double()
        return s


class BootstrapStats:
    """K Poisson-bootstrap replicas of FeatureStats: image i enters replica k with weight w_ik ~ Poisson(1),
    drawn from a generator seeded by i alone. Streaming, and mergeable across processes with the same result,
    so the spread of the K Frechet distances is the metric's sampling uncertainty at this image count."""

    def __init__(self, dim: int, replicas: int):
        self.k = replicas
        self.n = torch.zeros(replicas, dtype=torch.float64)
        self.sum = torch.zeros(replicas, dim, dtype=torch.float64)
        self.outer = torch.zeros(replicas, dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor, indices: list[int]) -> None:
        f = feats.detach().to(torch.float64).reshape(len(feats), -1)
        w = torch.tensor(
            np.stack([np.random.default_rng(int(i)).poisson(1.0, self.k) for i in indices]), dtype=torch.float64
        )  # [N, K]
        self.n += w.sum(0)
        self.sum += w.T @ f
        self.outer += torch.einsum("nk,ni,nj->kij", w, f, f)

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.sum, self.outer]

    def distances(self, ref: FeatureStats) -> np.ndarray:
        """One Frechet distance per replica that drew at least two images."""
        out, ref_mean, ref_cov = [], ref.mean, ref.cov
        ref_sqrt = _psd_sqrt(np.asarray(ref_cov, np.float64))  # the same for every replica: taken once
        for k in range(self.k):
            n = float(self.n[k])
            if n < 2:
                continue
            mu = self.sum[k] / n
            cov = ((self.outer[k] - n * torch.outer(mu, mu)) / (n - 1)).numpy()
            out.append(frechet_distance(mu.numpy(), cov, ref_mean, ref_cov, sqrt_sigma2=ref_sqrt))
        return np.asarray(out)


def bootstrap_std(boot: BootstrapStats, ref: FeatureStats) -> float | None:
    """The spread of the replicas' Frechet distances (None with fewer than two usable replicas)."""
    d = boot.distances(ref)
    return float(d.std(ddof=1)) if len(d) >= 2 else None


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, sqrt_sigma2: np.ndarray | None = None
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    Tr((S1 S2)^(1/2)) is the nuclear norm of S2^(1/2) S1^(1/2) (its singular values are the square roots of
    the eigenvalues of S1^(1/2) S2 S1^(1/2)). Taking singular values avoids both scipy's sqrtm of the
    non-symmetric S1 S2, which can go complex, and square roots of round-off eigenvalues, which add up to
    ~1e-4 over 2048 near-null directions when covariances are rank-deficient (fewer images than dimensions).
    sqrt_sigma2: S2^(1/2) when the caller has it (a bootstrap compares every replica with one reference).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root2 = _psd_sqrt(s2) if sqrt_sigma2 is None else sqrt_sigma2
    tr_covmean = np.linalg.svd(root2 @ _psd_sqrt(s1), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def stats_of(images: Iterable[torch.Tensor], extract: Callable[[torch.Tensor], torch.Tensor], dim: int) -> FeatureStats:
    """Stream uint8 batches through a feature extractor into running statistics."""
    stats = FeatureStats(dim)
    for batch in images:
        stats.update(extract(batch))
    return stats


def fd_of(a: FeatureStats, b: FeatureStats) -> float:
    if a.n < 2 or b.n < 2:
        raise UserError(f"Frechet distance needs at least 2 images per set (got {a.n} and {b.n})")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def clip_scores(cosine_sum: float, n: int) -> dict[str, float]:
    """Both conventions, labelled: the paper's raw mean cosine (~0.31 for SD) and torchmetrics' CLIPScore,
    which computes max(100 x mean cosine, 0) (its docs write the max per sample; its code takes it of the mean)."""
    mean = cosine_sum / n
    return {"clip_cosine": mean, "clip_score_torchmetrics": max(100.0 * mean, 0.0)}


def caption_accuracy(predicted: torch.Tensor, prompted: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the class their prompt named (prompts without a class skipped)."""
    keep = prompted >= 0
    if not keep.any():
        raise UserError("caption accuracy needs prompts that name a class of the dataset")
    return float((predicted[keep] == prompted[keep]).double().mean())


def subject_fidelity(feats: torch.Tensor, subject_feats: torch.Tensor) -> tuple[float, float]:
    """DreamBooth subject fidelity: mean cosine of each image's features to the subject images' mean direction,
    and its standard error."""
    center = torch.nn.functional.normalize(subject_feats.double(), dim=1).mean(0)
    cos = torch.nn.functional.normalize(feats.double(), dim=1) @ center / center.norm()
    return float(cos.mean()), float(cos.std() / len(cos) ** 0.5)


def subject_ssim(images: torch.Tensor, subject: torch.Tensor) -> tuple[float, float]:
    """DreamBooth identity: each uint8 image's best SSIM against any subject view, mean and standard error.
    Class features say "an elephant"; this says "that elephant" (its shape and pose)."""
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as ssim,
    )

    if images.shape[1:] != subject.shape[1:]:
        raise UserError(f"image shapes differ: {tuple(images.shape[1:])} vs {tuple(subject.shape[1:])}")
    x = images.double()
    per_view = [ssim(x, view[None].double().expand_as(x), data_range=255.0, reduction="none") for view in subject]
    best = torch.stack(per_view, 1).max(1).values
    return float(best.mean()), float(best.std() / len(best) ** 0.5)


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of uint8 image pairs, by torchmetrics (data range 255), and the per-image values."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if pred.shape != target.shape:
        raise UserError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, t = pred.double(), target.double()
    psnr = [float(peak_signal_noise_ratio(p[i : i + 1], t[i : i + 1], data_range=255.0)) for i in range(len(p))]
    ssim = structural_similarity_index_measure(p, t, data_range=255.0, reduction="none").tolist()
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_each": psnr, "ssim_each": ssim}


def lpips(pred: torch.Tensor, target: torch.Tensor, path: str | Path, reduce: bool = True) -> float | list[float]:
    """LPIPS from a TorchScript module taking two image batches in [-1, 1] (e.g. a traced lpips.LPIPS): the mean,
    or one value per image pair with reduce=False."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LPIPS TorchScript not found: {path}")

    dev = current()
    net = torch.jit.load(str(path), map_location=dev).eval()

    def to(x):  # uint8 -> [-1, 1], grayscale repeated to the 3 channels LPIPS expects
        x = x.to(dev).float() / 127.5 - 1
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    with torch.no_grad():
        d = net(to(pred), to(target)).flatten().double().cpu()
    return float(d.mean()) if reduce else d.tolist()


def stats_manifest_matches(have: dict, want: dict) -> list[str]:
    """The keys on which stored reference statistics differ from what an evaluation needs."""
    return [k for k in want if json.dumps(have.get(k), sort_keys=True) != json.dumps(want[k], sort_keys=True)]
