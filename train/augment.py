"""3D augmentations for pretraining. The 2D side is augmented only by the horizontal flip that a
teacher flip pass makes exact (lift3d.train.data, ``pretrain.augment.flip_2d``): the cache cannot
reproduce any other 2D augmentation, so every other point keeps its stored pixel.

All functions take and return numpy arrays and draw from an explicit ``np.random.Generator``,
so a batch's augmentation is a pure function of its seed (workers and resumes agree).

- rotation about the up axis (z in the gravity / world frames; -y in the camera frame),
- uniform random scaling,
- elastic distortion (the Data-Efficient 3D Learner / PointContrast recipe, written here from
  its description): Gaussian noise on a coarse 3D grid of spacing ``granularity``, smoothed by
  repeated separable box blurs, trilinearly interpolated at every point and added with scale
  ``magnitude``; applied for several (granularity, magnitude) pairs,
- chromatic auto-contrast and colour jitter (soft pseudo-label pretraining).
"""

from __future__ import annotations

import numpy as np

UP_AXES = {
    "gravity": np.array([0.0, 0.0, 1.0]),
    "world": np.array([0.0, 0.0, 1.0]),
    "camera": np.array([0.0, -1.0, 0.0]),
}
ELASTIC_PARAMS = ((0.2, 0.4), (0.8, 1.6))  # (granularity, magnitude) in metres


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: the 3x3 rotation by ``angle`` (radians, right-handed) about unit ``axis``."""
    a = np.asarray(axis, np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * (K @ K)


def rotate_up(coords: np.ndarray, frame: str, rng: np.random.Generator) -> np.ndarray:
    """Rotate by a uniform angle in [0, 2 pi) about the frame's up axis through the origin."""
    R = axis_angle_matrix(UP_AXES[frame], rng.uniform(0.0, 2.0 * np.pi))
    return (coords @ R.T.astype(np.float32)).astype(np.float32)


def random_scale(coords: np.ndarray, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    return (coords * np.float32(rng.uniform(low, high))).astype(np.float32)


def _box_blur(grid: np.ndarray, axis: int) -> np.ndarray:
    """Mean over a 3-cell window along ``axis`` (edges replicated)."""
    pad = [(0, 0)] * grid.ndim
    pad[axis] = (1, 1)
    g = np.pad(grid, pad, mode="edge")
    n = grid.shape[axis]
    sl = lambda a, b: tuple(slice(a, b) if d == axis else slice(None) for d in range(grid.ndim))  # noqa: E731
    return (g[sl(0, n)] + g[sl(1, n + 1)] + g[sl(2, n + 2)]) / 3.0


def trilinear(grid: np.ndarray, origin: np.ndarray, spacing: float, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``grid`` (X, Y, Z, C), node (i, j, k) at origin + spacing *
    (i, j, k), at ``points`` (P, 3); points outside are clamped to the grid."""
    shape = np.array(grid.shape[:3])
    u = (points.astype(np.float64) - origin) / spacing
    u = np.clip(u, 0.0, shape - 1.0)
    i0 = np.minimum(np.floor(u).astype(np.int64), np.maximum(shape - 2, 0))
    t = u - i0
    i1 = np.minimum(i0 + 1, shape - 1)
    out = np.zeros((len(points), grid.shape[3]), np.float64)
    for dx in (0, 1):
        wx = t[:, 0] if dx else 1 - t[:, 0]
        ix = i1[:, 0] if dx else i0[:, 0]
        for dy in (0, 1):
            wy = t[:, 1] if dy else 1 - t[:, 1]
            iy = i1[:, 1] if dy else i0[:, 1]
            for dz in (0, 1):
                wz = t[:, 2] if dz else 1 - t[:, 2]
                iz = i1[:, 2] if dz else i0[:, 2]
                out += (wx * wy * wz)[:, None] * grid[ix, iy, iz]
    return out


def elastic_distortion(
    coords: np.ndarray, granularity: float, magnitude: float, rng: np.random.Generator, blurs: int = 2
) -> np.ndarray:
    """Smooth random displacement field: noise on a grid of ``granularity`` metres over the
    cloud's bounding box (+ 3 cells of margin), blurred ``blurs`` times along x, y and z,
    interpolated trilinearly at the points, times ``magnitude``."""
    if len(coords) == 0:
        return coords
    lo = coords.min(0).astype(np.float64) - 3 * granularity
    hi = coords.max(0).astype(np.float64) + 3 * granularity
    dims = np.floor((hi - lo) / granularity).astype(int) + 2
    noise = rng.standard_normal((*dims, 3))
    for _ in range(blurs):
        for ax in range(3):
            noise = _box_blur(noise, ax)
    disp = trilinear(noise, lo, granularity, coords)
    return (coords + magnitude * disp).astype(np.float32)


def chromatic_auto_contrast(colors: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
    """With probability ``p``: stretch each channel to [0, 255] and blend with a random factor."""
    if rng.random() >= p or len(colors) == 0:
        return colors
    c = colors.astype(np.float32)
    lo, hi = c.min(0, keepdims=True), c.max(0, keepdims=True)
    scaled = (c - lo) * (255.0 / np.maximum(hi - lo, 1.0))
    blend = rng.random()
    return np.clip((1 - blend) * c + blend * scaled, 0, 255).astype(np.uint8)


def color_jitter(colors: np.ndarray, rng: np.random.Generator, std: float = 0.05, p: float = 0.95) -> np.ndarray:
    """With probability ``p``: add Gaussian noise of ``std`` x 255 per point and channel."""
    if rng.random() >= p or len(colors) == 0:
        return colors
    noise = rng.standard_normal(colors.shape) * std * 255.0
    return np.clip(colors.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def augment_points(
    coords: np.ndarray, colors: np.ndarray, frame: str, acfg: dict, color: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the switched-on augmentations (``pretrain.augment``) to one frame's points."""
    if acfg.get("rotate_up", True):
        coords = rotate_up(coords, frame, rng)
    if acfg.get("scale", True):
        low, high = acfg.get("scale_range", [0.9, 1.1])
        coords = random_scale(coords, low, high, rng)
    if acfg.get("elastic", True):
        for gran, mag in ELASTIC_PARAMS:
            coords = elastic_distortion(coords, gran, mag, rng)
    if color:
        colors = chromatic_auto_contrast(colors, rng)
        colors = color_jitter(colors, rng)
    return coords, colors
