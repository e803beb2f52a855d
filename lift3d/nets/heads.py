"""Learnable heads of the trainer: 3D projection head, PPKT's 2D upsampling projection layer
(UPL), the per-point segmentation head, and the bilinear sampling of cached soft labels.

Pixel conventions follow docs/stores.md: pixels are (row, col) of the stored H x W frame with integer
coordinates at pixel centres, and cell (i, j) of an h x w teacher map covers the stored pixel
centre ((i + 0.5) H / h - 0.5, (j + 0.5) W / w - 0.5), i.e. align_corners=False.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectionHead3D", "UPL", "SegHead", "bilinear_taps", "sample_soft_labels"]


def _features(x) -> torch.Tensor:
    """Per-point features of a tensor or of a MinkowskiEngine SparseTensor (its ``.F``)."""
    return x.F if hasattr(x, "F") and not isinstance(x, torch.Tensor) else x


class ProjectionHead3D(nn.Module):
    """PPKT's 3D projection: a linear layer on per-point features followed by L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    def forward(self, x) -> torch.Tensor:
        """``x``: (n, in_dim) tensor or SparseTensor -> (n, out_dim) unit-norm embeddings."""
        return F.normalize(self.linear(_features(x)), p=2, dim=1)


def bilinear_taps(coord: torch.Tensor, in_size: int, out_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis for resizing ``in_size`` cells to ``out_size`` pixels.

    Same rule as ``F.interpolate(mode='bilinear', align_corners=False)`` with an explicit output
    size: source position s = (p + 0.5) * in_size / out_size - 0.5, clamped below at 0; taps
    i0 = floor(s), i1 = min(i0 + 1, in_size - 1), weight of i1 = s - i0.
    Returns (i0, i1, w1) for integer pixel coordinates ``coord``.
    """
    scale = float(in_size) / float(out_size)
    s = ((coord.to(torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = s.floor().to(torch.long).clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    w1 = s - i0.to(s.dtype)
    return i0, i1, w1


def sample_soft_labels(prob: np.ndarray, index: np.ndarray, pixels: np.ndarray, image_hw) -> tuple:
    """Each point's teacher distribution sampled bilinearly at its stored pixel (row, col), as the
    reference upsamples the teacher's output to every pixel (align_corners=False, the rule of
    :func:`bilinear_taps`).

    ``prob`` / ``index`` (k, hs, ws): a frame's stored classes per cell (the whole distribution,
    or its top k). Returns ``prob`` (M, 4k) float32 and ``index`` (M, 4k) int64: for each of the
    four nearest cells its k probabilities renormalised to sum to 1 (a cell holding none gets 1/k
    each), times the cell's bilinear weight. A point's entries sum to 1; a class appearing in
    several cells adds up when scattered (:func:`lift3d.train.losses.topk_to_dense`).
    """
    k, hs, ws = prob.shape
    H, W = int(image_hw[0]), int(image_hw[1])
    px = torch.from_numpy(np.asarray(pixels, np.int64).reshape(-1, 2))
    r0, r1, wr = (t.numpy() for t in bilinear_taps(px[:, 0], hs, H))
    c0, c1, wc = (t.numpy() for t in bilinear_taps(px[:, 1], ws, W))
    p = prob.astype(np.float32)
    total = p.sum(0, keepdims=True)
    p = np.where(total > 0, p / np.maximum(total, np.finfo(np.float32).tiny), np.float32(1.0 / k))
    probs, idxs = [], []
    for r, c, w in ((r0, c0, (1 - wr) * (1 - wc)), (r0, c1, (1 - wr) * wc), (r1, c0, wr * (1 - wc)), (r1, c1, wr * wc)):
        probs.append(p[:, r, c].T * w[:, None].astype(np.float32))
        idxs.append(index[:, r, c].T.astype(np.int64))
    return np.concatenate(probs, 1), np.concatenate(idxs, 1)


class UPL(nn.Module):
    """PPKT's UpSampling Projection Layer: 1x1 conv -> bilinear upsampling to the image size ->
    L2 normalisation, applied to a cached low-resolution 2D feature map (N, C, h, w).

    Both the 1x1 conv and bilinear interpolation are linear and the bilinear weights sum to 1, so
    ``sample`` interpolates the C-channel map at the requested pixels and applies the conv there;
    the full-resolution map is never built. ``dense`` is the literal (memory-hungry) version.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=bias)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    def sample(
        self, feature_maps: torch.Tensor, frame_idx: torch.Tensor, pixels_rc: torch.Tensor, image_hw: Sequence[int]
    ) -> torch.Tensor:
        """Unit-norm embeddings (P, out_dim) at pixels ``pixels_rc`` (P, 2) of frames ``frame_idx``
        (P,) indexing ``feature_maps`` (N, C, h, w); ``image_hw`` = stored (H, W)."""
        if feature_maps.dim() != 4 or feature_maps.shape[1] != self.in_dim:
            raise ValueError(f"feature_maps must be (N, {self.in_dim}, h, w), got {tuple(feature_maps.shape)}")
        pixels_rc = torch.as_tensor(pixels_rc, device=feature_maps.device)
        frame_idx = torch.as_tensor(frame_idx, device=feature_maps.device).to(torch.long)
        if pixels_rc.dim() != 2 or pixels_rc.shape[1] != 2 or frame_idx.shape != pixels_rc.shape[:1]:
            raise ValueError("pixels_rc must be (P, 2) and frame_idx (P,)")
        H, W = int(image_hw[0]), int(image_hw[1])
        _, _, h, w = feature_maps.shape
        r0, r1, wr = bilinear_taps(pixels_rc[:, 0], h, H)
        c0, c1, wc = bilinear_taps(pixels_rc[:, 1], w, W)
        dtype = self.conv.weight.dtype
        wr, wc = wr.to(dtype)[:, None], wc.to(dtype)[:, None]

        def at(r, c):  # (P, C) features of cell (r, c) of each point's frame
            return feature_maps[frame_idx, :, r, c].to(dtype)

        top = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
        bottom = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
        interp = top * (1 - wr) + bottom * wr  # (P, C)
        weight = self.conv.weight.view(self.out_dim, self.in_dim)
        out = F.linear(interp, weight, self.conv.bias)
        return F.normalize(out, p=2, dim=1)

    def dense(self, feature_maps: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
        """Full-resolution (N, out_dim, H, W) unit-norm map (reference / visualisation only)."""
        y = self.conv(feature_maps.to(self.conv.weight.dtype))
        y = F.interpolate(y, size=(int(image_hw[0]), int(image_hw[1])), mode="bilinear", align_corners=False)
        return F.normalize(y, p=2, dim=1)

    forward = sample


class SegHead(nn.Module):
    """Per-point linear classifier (soft-label pretraining head, or the fine-tuning classifier)."""

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes, bias=bias)
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)

    def forward(self, x) -> torch.Tensor:
        """``x``: (n, in_dim) tensor or SparseTensor -> (n, num_classes) logits."""
        return self.linear(_features(x))
