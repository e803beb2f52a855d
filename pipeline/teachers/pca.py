"""Optional channel reduction of the teacher's cached feature maps (``teacher.pca_channels``).

ResNet-50 layer4 is 2048 x 15 x 20 float16 per 480x640 frame, 1.2 MB: about 123 GB for ScanNet's
~100k subsampled frames. A principal-component projection fitted once on a sample of frames keeps
the C' directions of largest variance; the store then holds

    z = W (f - mu)        (W: C' x C, orthonormal rows; mu: the mean feature vector)

per cell instead of f, and ``pca/components`` (W) and ``pca/mean`` (mu) beside it, so that
f ~ mu + W^T z can be rebuilt. PPKT's learnable upsampling projection starts with a 1x1
convolution, a linear map of each cell's vector: on z it can represent any 1x1 convolution of
f restricted to the kept subspace, so only the discarded variance is lost.

Error bookkeeping: with orthonormal rows, ||f - mu - W^T z||^2 = ||f - mu||^2 - ||z||^2, so the
stage sums ||f||^2, ||f - mu||^2 and ||z||^2 over every cell it writes and reports the residual
relative to the features' energy and to their variance, over all frames, not only the fit sample.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch


class Covariance:
    """Running sum of feature vectors and of their outer products (float64), over cells."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.outer = np.zeros((channels, channels), np.float64)

    def add(self, feats: torch.Tensor) -> None:
        """feats: (N, C, h, w), any float dtype and device."""
        x = feats.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x


def fit(cov: Covariance, channels: int) -> dict:
    """The top ``channels`` principal directions of the accumulated vectors.

    Returns {"mean" (C,) float32, "components" (C', C) float32 with orthonormal rows sorted by
    variance, each row's largest-magnitude entry positive (a deterministic sign),
    "explained": the fraction of the sample's variance the C' directions keep}.
    """
    c = cov.sum.shape[0]
    if not 0 < channels < c:
        raise ValueError(
            f"teacher.pca_channels must be between 1 and {c - 1} (the teacher has {c} channels), got {channels}"
        )
    if cov.n < channels + 1:
        raise ValueError(
            f"teacher.pca_channels {channels}: the fit sample has only {cov.n} feature vectors; "
            f"raise teacher.pca_fit_frames"
        )
    mean = cov.sum / cov.n
    scatter = cov.outer / cov.n - np.outer(mean, mean)
    scatter = (scatter + scatter.T) / 2
    values, vectors = np.linalg.eigh(scatter)  # ascending
    order = np.argsort(values)[::-1][:channels]
    comps = vectors[:, order].T
    pivot = np.abs(comps).argmax(1)
    comps *= np.sign(comps[np.arange(channels), pivot])[:, None]
    total = float(np.clip(values, 0, None).sum())
    return {
        "mean": mean.astype(np.float32),
        "components": comps.astype(np.float32),
        "explained": float(np.clip(values[order], 0, None).sum() / total) if total > 0 else 1.0,
    }


def sample_frames(n_frames: int, m: int) -> np.ndarray:
    """``m`` frame indices spread evenly over the dataset (all of them when m >= n)."""
    if m >= n_frames:
        return np.arange(n_frames)
    return np.unique(np.round(np.linspace(0, n_frames - 1, m)).astype(np.int64))


def fit_teacher(teacher, rgb, channels: int, fit_frames: int, batch_size: int) -> dict:
    """Run ``teacher`` on a sample of the (N, H, W, 3) frames and fit the projection."""
    idx = sample_frames(int(rgb.shape[0]), int(fit_frames))
    cov = Covariance(teacher.output_shapes()[0][0])
    cuda = teacher.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        for s in range(0, len(idx), batch_size):
            x = torch.from_numpy(np.stack([np.asarray(rgb[int(i)]) for i in idx[s : s + batch_size]]))
            feats, _ = teacher.forward(x.to(teacher.device))
            cov.add(feats)
    out = fit(cov, channels)
    out.update({"fit_frames": int(len(idx)), "fit_vectors": int(cov.n)})
    return out


def sha256(p: dict) -> str:
    h = hashlib.sha256()
    for key in ("mean", "components"):
        h.update(np.ascontiguousarray(p[key], np.float32).tobytes())
    return h.hexdigest()


def save(path: Path, p: dict) -> None:
    """Atomic: a killed stage leaves the old file or none, never half of one."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in p.items()})
    os.replace(tmp, path)


def load(path: Path) -> dict:
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    for key in ("explained", "fit_frames", "fit_vectors"):
        out[key] = out[key].item()
    return out


def project(feats: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) -> z (N, C', h, w) float32, and (sum ||f||^2, sum ||f - mu||^2, sum ||z||^2) float64."""
    f = feats.float()
    centred = f - mean.view(1, -1, 1, 1)
    z = torch.einsum("kc,nchw->nkhw", comps, centred)
    sums = torch.stack([f.double().square().sum(), centred.double().square().sum(), z.double().square().sum()])
    return z, sums
