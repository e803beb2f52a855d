"""Points stage, per-frame cost: frames/s/core at 640x480 vs the floor of sorting one frame's
voxel keys, points and bytes per frame after down-sampling, and a projection for ScanNet.

Run single-threaded: ``OMP_NUM_THREADS=1 python benchmarks/bench_points.py``.
The frame is a synthetic room (oblique walls, floor, ceiling, a table-like box, 5 % holes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lift3d.pipeline.points import lift, lift_frame, voxel_keys  # noqa: E402

H, W = 480, 640
K = (577.9, 577.9, 319.5, 239.5)  # ScanNet's depth intrinsics at 640x480
SCANNET_FRAMES = 100_000  # ~2.5M raw frames / frame_skip 25
VOXEL, DMIN, DMAX = 0.025, 0.1, 6.0


def room_depth(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A room-like uint16 depth map (mm, z) and an RGB image, by casting rays against boxes."""
    rng = np.random.default_rng(seed)
    fx, fy, cx, cy = K
    c, r = np.meshgrid(np.arange(W), np.arange(H))
    d = np.stack([(c - cx) / fx, (r - cy) / fy, np.ones((H, W))], -1).reshape(-1, 3)
    yaw = np.deg2rad(25.0)  # room rotated about the vertical (camera y)
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    dr = d @ rot.T  # rays in the room's frame (camera at origin)
    lo, hi = np.array([-2.0, -1.3, -1.5]), np.array([2.8, 1.4, 4.5])  # y down: floor at +1.4
    with np.errstate(divide="ignore", invalid="ignore"):
        t_room = np.min(np.where(dr > 0, (hi - 0) / dr, np.where(dr < 0, (lo - 0) / dr, np.inf)), axis=1)
        blo, bhi = np.array([-0.6, 0.65, 1.6]), np.array([0.9, 1.4, 2.6])  # a table-like box
        t1, t2 = (blo - 0) / dr, (bhi - 0) / dr
        tn = np.nanmax(np.minimum(t1, t2), axis=1)
        tf = np.nanmin(np.maximum(t1, t2), axis=1)
    t = np.where((tn <= tf) & (tn > 0), np.minimum(tn, t_room), t_room)  # t is z (d has z = 1)
    z = t.reshape(H, W) + rng.normal(0, 0.004, (H, W))
    depth = np.round(z * 1000).clip(0, 65535).astype(np.uint16)
    depth[rng.random((H, W)) < 0.05] = 0
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return depth, rgb


def timeit(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(reps: int = 60) -> None:
    depth, rgb = room_depth()
    intr = np.array(K, np.float32)
    coords, idx, _, _ = lift(depth, intr, 0, DMIN, DMAX)
    k = voxel_keys(coords, VOXEL)
    k -= np.array([[a.min()] for a in k])
    packed = (k[0] << 42) | (k[1] << 21) | k[2]
    packed_pos = (packed << 19) | np.arange(packed.size)
    rows = [
        ("lift_frame, method=sort", timeit(lambda: lift_frame(rgb, depth, intr, 0, VOXEL, DMIN, DMAX), reps)),
        (
            "lift_frame, method=unique",
            timeit(lambda: lift_frame(rgb, depth, intr, 0, VOXEL, DMIN, DMAX, method="unique"), reps),
        ),
        ("  lift only (range mask + rays)", timeit(lambda: lift(depth, intr, 0, DMIN, DMAX), reps)),
        ("floor: np.sort(voxel keys)", timeit(lambda: np.sort(packed), reps)),
        ("floor: np.sort(keys|position)", timeit(lambda: np.sort(packed_pos), reps)),
        ("floor: np.unique(keys)", timeit(lambda: np.unique(packed), reps)),
    ]
    fp = lift_frame(rgb, depth, intr, 0, VOXEL, DMIN, DMAX)
    n_pts = len(fp.coords)
    bpf = n_pts * (12 + 3 + 8) + 8  # coords f32x3 + colors u8x3 + pixel i32x2, + one offset
    t_frame = rows[0][1]
    print(f"points stage, one {W}x{H} pinhole frame, voxel {VOXEL} m, depth [{DMIN}, {DMAX}] m, 1 thread")
    print(f"{'what':34s} {'ms/frame':>9s} {'frames/s':>9s}")
    for name, t in rows:
        print(f"{name:34s} {t * 1e3:9.2f} {1 / t:9.1f}")
    print(
        f"valid pixels {len(idx)} of {H * W}; after voxelisation {n_pts} points/frame "
        f"({fp.voxel_merged} merged, {fp.no_depth} no depth, {fp.out_of_range} out of range)"
    )
    print(f"bytes/frame (uncompressed) {bpf / 1e3:.1f} kB; lift_frame = {t_frame / rows[3][1]:.1f}x the sort floor")
    print(
        f"ScanNet ~{SCANNET_FRAMES // 1000}k frames: {SCANNET_FRAMES * n_pts / 1e9:.2f} G points, "
        f"{SCANNET_FRAMES * bpf / 1e9:.1f} GB uncompressed, "
        f"{SCANNET_FRAMES * t_frame / 3600:.2f} core-hours for the per-frame work (reads not included)"
    )


if __name__ == "__main__":
    main()
