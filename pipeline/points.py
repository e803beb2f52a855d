"""Stage ``points``: ``frames.zarr/<dataset>`` -> ``points.zarr/<dataset>`` (back-projected points).

Per frame (vectorised NumPy, no Python loop over pixels):

1. depth uint16 mm -> metres; pixels with no measurement (0) or outside
   [``min_depth``, ``max_depth``] are dropped (both ends kept). The limits apply to the stored
   depth: z for pinhole frames, the distance along the ray for panoramas.
2. back-projection into the OpenCV camera frame: pinhole ``p = d K^-1 [col, row, 1]``;
   panorama (``projection == 1``) ``p = d * ray(row, col)`` with the mapping of docs/stores.md.
3. voxel down-sampling: a point's voxel is ``floor(coords / voxel_size)`` (float64 on the
   float32 coordinates); each occupied voxel keeps one point, the one with the smallest pixel
   index (row-major), with its colour and its (row, col). Survivors are in row-major pixel order.

Per scene, a task reads that scene's rows of the frames group and writes a part holding
``coords``/``colors``/``pixel`` and ``counts`` (points per frame, one per frame, frames in the
frames-store order, 0 for a frame with no surviving point); the committer builds ``offsets``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr

from lift3d.core.cluster import ROWS_FOLLOW_FRAMES, dask_client, run_groups, run_tasks
from lift3d.core.config import workdir as get_workdir
from lift3d.core.graph import Group, groups
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group, stage_lock

log = logging.getLogger("lift3d")

PINHOLE, EQUIRECT = 0, 1
CHUNK_POINTS = 1 << 16  # rows per chunk of coords/colors/pixel (part and final group)
FLUSH_EVERY = 16  # frames read and buffered per block in a scene task
RAGGED = ("coords", "colors", "pixel")
COUNT_KEYS = ("pixels", "no_depth", "out_of_range", "voxel_merged", "points", "empty_frames")


@dataclass
class FramePoints:
    """One frame's points after down-sampling, and where the other pixels went."""

    coords: np.ndarray  # float32 (P, 3), metres, OpenCV camera frame
    colors: np.ndarray  # uint8 (P, 3)
    pixel: np.ndarray  # int32 (P, 2), (row, col)
    no_depth: int  # pixels with depth 0
    out_of_range: int  # measured pixels outside [min_depth, max_depth]
    voxel_merged: int  # in-range points removed by voxel down-sampling

    def counts(self) -> dict:
        n = len(self.coords)
        return {
            "pixels": self.no_depth + self.out_of_range + self.voxel_merged + n,
            "no_depth": self.no_depth,
            "out_of_range": self.out_of_range,
            "voxel_merged": self.voxel_merged,
            "points": n,
            "empty_frames": int(n == 0),
        }


# -- geometry -------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _rays(h: int, w: int, projection: int, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    if projection == PINHOLE:
        x = ((np.arange(w, dtype=np.float64) - cx) / fx)[None, :].repeat(h, 0)
        y = ((np.arange(h, dtype=np.float64) - cy) / fy)[:, None].repeat(w, 1)
        rays = np.stack([x, y, np.ones((h, w))])
    elif projection == EQUIRECT:
        u = np.pi - 2 * np.pi * (np.arange(w, dtype=np.float64) + 0.5) / w  # longitude per column
        v = np.pi * (np.arange(h, dtype=np.float64) + 0.5) / h - np.pi / 2  # latitude per row
        cu, su = np.cos(u)[None, :], np.sin(u)[None, :]
        cv, sv = np.cos(v)[:, None], np.sin(v)[:, None]
        x, y, z = cv * cu, cv * su, -sv * np.ones((1, w))  # seed paper's frame
        rays = np.stack([-y, -z, x])  # -> OpenCV camera frame
    else:
        raise ValueError(f"projection {projection}: expected 0 (pinhole) or 1 (equirectangular)")
    out = np.ascontiguousarray(rays.reshape(3, h * w).astype(np.float32))
    out.flags.writeable = False
    return out


def pixel_rays(h: int, w: int, intrinsics, projection: int) -> np.ndarray:
    """(3, h*w) float32 per-pixel rays, row-major: z = 1 for pinhole, unit length for panoramas."""
    projection = int(projection)
    if projection == PINHOLE:
        fx, fy, cx, cy = (float(v) for v in np.asarray(intrinsics, np.float64).reshape(4))
        if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
            raise ValueError(f"pinhole frame with invalid intrinsics (fx, fy, cx, cy) = {(fx, fy, cx, cy)}")
        return _rays(h, w, PINHOLE, fx, fy, cx, cy)
    return _rays(h, w, projection, 0.0, 0.0, 0.0, 0.0)


def depth_limits_mm(min_depth: float, max_depth: float) -> tuple[int, int]:
    """The kept range in integer millimetres: mm / 1000 in [min_depth, max_depth], and mm > 0."""
    lo = max(1, int(math.ceil(min_depth * 1000.0 - 1e-6)))
    hi = int(math.floor(max_depth * 1000.0 + 1e-6))
    return lo, hi


def lift(depth: np.ndarray, intrinsics, projection: int, min_depth: float, max_depth: float):
    """Back-project the in-range pixels of one depth map.

    Returns (coords (3, n) float32, flat pixel index (n,) int64 ascending, no_depth, out_of_range).
    """
    h, w = depth.shape
    flat = depth.reshape(-1)
    lo, hi = depth_limits_mm(min_depth, max_depth)
    keep = (flat >= lo) & (flat <= hi)
    idx = np.flatnonzero(keep)
    no_depth = int(h * w - np.count_nonzero(flat))
    out_of_range = int(h * w - no_depth - len(idx))
    d = flat[idx].astype(np.float32)
    d *= np.float32(0.001)
    coords = pixel_rays(h, w, intrinsics, projection)[:, idx]
    coords *= d
    return coords, idx, no_depth, out_of_range


def voxel_keys(coords: np.ndarray, voxel_size: float) -> np.ndarray:
    """(3, n) int64 voxel indices floor(c / voxel_size), computed in float64. coords is (3, n)."""
    return np.stack([_axis_keys(c, voxel_size) for c in coords])


def _axis_keys(c: np.ndarray, voxel_size: float) -> np.ndarray:
    if not voxel_size > 0:
        raise ValueError(f"points.voxel_size must be > 0, got {voxel_size}")
    v = c.astype(np.float64)
    v /= voxel_size
    np.floor(v, out=v)
    return v.astype(np.int64)


def voxel_downsample(coords: np.ndarray, voxel_size: float, method: str = "sort") -> np.ndarray:
    """Positions (ascending, int64) of the points kept: the first point of each occupied voxel.

    ``coords`` is (n, 3) with points in priority order (the stage passes them in row-major pixel
    order, so the smallest pixel index wins). ``method``: ``"sort"`` packs (voxel, position)
    into one int64 and sorts the values; ``"unique"`` uses np.unique on packed voxel keys.
    """
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coords must be (n, 3), got {c.shape}")
    return _first_per_voxel(np.ascontiguousarray(c.T), voxel_size, method)


def _first_per_voxel(c: np.ndarray, voxel_size: float, method: str) -> np.ndarray:
    """voxel_downsample on (3, n) coordinates."""
    n = c.shape[1]
    if n == 0:
        return np.zeros(0, np.int64)
    k, bits = [], []
    for axis in range(3):  # row by row: NumPy's axis reductions on int64 are slow
        ka = _axis_keys(c[axis], voxel_size)
        ka -= ka.min()
        bits.append(int(ka.max()).bit_length())
        k.append(ka)
    pbits = max(1, int(n - 1).bit_length())
    if method == "unique":
        if sum(bits) > 63:
            return _downsample_lexsort(k)
        key = (k[0] << (bits[1] + bits[2])) | (k[1] << bits[2]) | k[2]
        _, first = np.unique(key, return_index=True)  # stable: the first (lowest) position
        first.sort()
        return first.astype(np.int64, copy=False)
    if method != "sort":
        raise ValueError(f"method {method!r}: expected 'sort' or 'unique'")
    if sum(bits) + pbits > 63:
        return _downsample_lexsort(k)
    key = k[0] << (bits[1] + bits[2] + pbits)
    key |= k[1] << (bits[2] + pbits)
    key |= k[2] << pbits
    key |= np.arange(n, dtype=np.int64)
    key.sort()
    vox = key >> pbits
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(vox[1:], vox[:-1], out=first[1:])
    pos = key[first] & ((1 << pbits) - 1)
    pos.sort()
    return pos


def _downsample_lexsort(k) -> np.ndarray:
    """Fallback for very wide voxel ranges: a stable lexicographic sort of the keys."""
    k = np.stack(k)
    order = np.lexsort((np.arange(k.shape[1]), k[2], k[1], k[0]))
    ks = k[:, order]
    first = np.ones(k.shape[1], bool)
    first[1:] = np.any(ks[:, 1:] != ks[:, :-1], axis=0)
    return np.sort(order[first]).astype(np.int64)


def lift_frame(
    rgb: np.ndarray,
    depth: np.ndarray,
    intrinsics,
    projection: int,
    voxel_size: float,
    min_depth: float,
    max_depth: float,
    method: str = "sort",
) -> FramePoints:
    """One frame -> its down-sampled points with colour and source pixel."""
    h, w = depth.shape
    if rgb.shape != (h, w, 3):
        raise ValueError(f"rgb {rgb.shape} does not match depth {depth.shape}")
    coords, idx, no_depth, out_of_range = lift(depth, intrinsics, projection, min_depth, max_depth)
    keep = _first_per_voxel(coords, voxel_size, method)
    pix = idx[keep]
    row, col = np.divmod(pix, w)
    return FramePoints(
        coords=np.ascontiguousarray(coords[:, keep].T),
        colors=np.ascontiguousarray(rgb.reshape(-1, 3)[pix]),
        pixel=np.stack([row, col], axis=1).astype(np.int32),
        no_depth=no_depth,
        out_of_range=out_of_range,
        voxel_merged=len(idx) - len(keep),
    )


def frame_points(group, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coords, colors, pixel) of frame ``i`` of an open points group."""
    off = group["offsets"]
    if not 0 <= i < off.shape[0] - 1:
        raise IndexError(f"frame {i} out of range: the points group has {off.shape[0] - 1} frames")
    a, b = (int(x) for x in off[i : i + 2])
    return group["coords"][a:b], group["colors"][a:b], group["pixel"][a:b]


# -- stage ----------------------------------------------------------------------------------
def templates() -> dict:
    return {
        "coords": ((3,), np.float32),
        "colors": ((3,), np.uint8),
        "pixel": ((2,), np.int32),
        "counts": ((), np.int64),
    }


def scene_task(
    workdir: str, dataset: str, frames_lineage: str, start: int, stop: int, scene: str, part: str, settings: dict
) -> dict:
    """Lift frames ``start:stop`` of the frames group (one scene) into a part. Runs on a worker."""
    t0 = time.perf_counter()
    frames = open_group(Path(workdir), "frames", dataset, expect_lineage=frames_lineage)
    pw = PartWriter(
        Path(part), chunk_rows={"coords": CHUNK_POINTS, "colors": CHUNK_POINTS, "pixel": CHUNK_POINTS, "counts": 4096}
    )
    totals: Counter = Counter({k: 0 for k in COUNT_KEYS})
    for a in range(start, stop, FLUSH_EVERY):
        b = min(stop, a + FLUSH_EVERY)
        rgb, depth = frames["rgb"][a:b], frames["depth"][a:b]
        intr, proj, src = frames["intrinsics"][a:b], frames["projection"][a:b], frames["source_index"][a:b]
        for j in range(b - a):
            try:
                fp = lift_frame(
                    rgb[j],
                    depth[j],
                    intr[j],
                    int(proj[j]),
                    settings["voxel_size"],
                    settings["min_depth"],
                    settings["max_depth"],
                )
            except ValueError as exc:
                raise ValueError(
                    f"frames.zarr/{dataset} row {a + j} (scene {scene}, source frame {int(src[j])}): {exc}"
                ) from None
            pw.append(coords=fp.coords, colors=fp.colors, pixel=fp.pixel, counts=np.array([len(fp.coords)], np.int64))
            totals.update(fp.counts())
        pw.flush()
    pw.finish(templates(), scene=scene, point_counts=dict(totals))
    return {"frames": stop - start, **dict(totals), "seconds": time.perf_counter() - t0}


def run(cfg: dict) -> list[dict]:
    """Run the points stage for every configured dataset; returns one summary row per dataset."""
    wd = get_workdir(cfg)
    wd.mkdir(parents=True, exist_ok=True)
    jobs = [(g.path, lambda _failures, g=g: run_dataset(cfg, g, wd)) for g in groups(cfg, "points")]
    with stage_lock(wd, "points"):
        return run_groups(
            wd,
            "points",
            jobs,
            hint=ROWS_FOLLOW_FRAMES,
        )


def _row(name: str, status: str, n_frames: int, counts: dict, seconds: float) -> dict:
    pts = int(counts.get("points", 0))
    return {
        "dataset": name,
        "status": status,
        "frames": n_frames,
        "points": pts,
        "points_per_frame": round(pts / n_frames, 1) if n_frames else 0.0,
        "no_depth": int(counts.get("no_depth", 0)),
        "out_of_range": int(counts.get("out_of_range", 0)),
        "voxel_merged": int(counts.get("voxel_merged", 0)),
        "empty_frames": int(counts.get("empty_frames", 0)),
        "seconds": seconds,
    }


def run_dataset(cfg: dict, g: Group, wd: Path) -> dict:
    name = g.path
    frames = open_group(wd, "frames", name, expect_lineage=g.upstream.lineage_sha256)
    writer = GroupWriter(
        wd,
        "points",
        name,
        g.config,
        upstream_sha256=frames.attrs["config_sha256"],
        upstream_lineage=g.upstream.lineage_sha256,
    )
    if writer.up_to_date():
        attrs = dict(zarr.open_group(str(writer.path), mode="r").attrs)
        log.info("points/%s: up to date (%d frames), nothing to do", name, attrs["n_frames"])
        return _row(name, "up to date", attrs["n_frames"], attrs.get("point_counts", {}), 0.0)
    writer.check_replace(bool(cfg.get("rebuild")))
    t0 = time.perf_counter()
    scenes = list(frames.attrs["scenes"])
    scene_index = frames["scene_index"][...]
    n = len(scene_index)
    if n and (np.any(np.diff(scene_index) < 0) or scene_index.min() < 0 or scene_index.max() >= len(scenes)):
        raise StoreError(
            f"{writer.path.parent.parent / 'frames.zarr' / name}: scene_index is not sorted "
            f"and within the {len(scenes)} scenes; re-run 'lift3d run frames'"
        )
    starts = np.searchsorted(scene_index, np.arange(len(scenes)), side="left")
    stops = np.searchsorted(scene_index, np.arange(len(scenes)), side="right")
    writer.prepare_parts()
    todo = [i for i, s in enumerate(scenes) if not writer.part_done(s)]
    settings = {k: float(cfg["points"][k]) for k in ("voxel_size", "min_depth", "max_depth")}
    if not settings["voxel_size"] > 0 or not 0 <= settings["min_depth"] <= settings["max_depth"]:
        raise ValueError(f"points: need voxel_size > 0 and 0 <= min_depth <= max_depth, got {settings}")
    log.info(
        "points/%s: %d frames in %d scenes (%d already done), voxel %.4g m, depth [%g, %g] m",
        name,
        n,
        len(scenes),
        len(scenes) - len(todo),
        settings["voxel_size"],
        settings["min_depth"],
        settings["max_depth"],
    )
    tasks = [
        (
            scenes[i],
            (
                str(wd),
                name,
                g.upstream.lineage_sha256,
                int(starts[i]),
                int(stops[i]),
                scenes[i],
                str(writer.part_path(scenes[i])),
                settings,
            ),
        )
        for i in todo
    ]
    with dask_client(cfg["cluster"]) as client:
        run_tasks(client, scene_task, tasks, desc=f"points/{name}")
    totals = _part_counts(writer, scenes)
    writer.commit(
        scenes,
        attrs={"n_frames": n, "point_counts": totals, **settings, "stored_size": frames.attrs.get("stored_size")},
        ragged=RAGGED,
        chunks={k: (CHUNK_POINTS,) + t[0] for k, t in templates().items() if k in RAGGED},
    )
    done = open_group(wd, "points", name, expect_lineage=writer.lineage_sha256)
    if done["offsets"].shape[0] != n + 1:
        raise StoreError(f"{writer.path}: offsets has {done['offsets'].shape[0]} entries, expected {n + 1}")
    return _row(name, "written", n, totals, time.perf_counter() - t0)


def _part_counts(writer: GroupWriter, scenes: list[str]) -> dict:
    totals: Counter = Counter({k: 0 for k in COUNT_KEYS})
    for s in scenes:
        if writer.part_done(s):
            totals.update(zarr.open_group(str(writer.part_path(s)), mode="r").attrs.get("point_counts", {}))
    return {k: int(totals[k]) for k in COUNT_KEYS}
