"""Stage ``frames``: raw datasets -> ``frames.zarr/<dataset>/`` (subsampled, decoded, aligned).

Per scene, a task reads the kept frames (``source_index % frame_skip == 0``, minus invalid
ones, which are counted by reason) and writes a part; the committer assembles the parts in
sorted scene order. A scene whose part is done is not read again on a re-run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from lift3d.core.cluster import dask_client, run_tasks
from lift3d.core.config import workdir as get_workdir
from lift3d.core.store import GroupWriter, PartWriter, stage_lock
from lift3d.pipeline.readers.base import Frame, make_reader

log = logging.getLogger("lift3d")
FLUSH_EVERY = 16  # frames buffered in memory before a part write (chunk_frames > 1)
IMAGES = ("rgb", "depth")
SMALL_ROWS = 4096  # rows per chunk of the small per-frame arrays (pose, intrinsics, indices)


def frames_config(cfg: dict, entry: dict) -> dict:
    """The identity of one frames group: this stage's section plus the dataset entry."""
    return {"stage": cfg["frames"], "dataset": entry}


def rigid_pose(pose) -> bool:
    """True for a finite camera-to-world rigid transform: a rotation (R^T R = I within 1e-2,
    det R > 0) and bottom row (0, 0, 0, 1). A singular or degenerate pose (e.g. all zeros, which
    some exports write where tracking was lost) cannot place the frame in the world."""
    p = np.asarray(pose, np.float64)
    if p.shape != (4, 4) or not np.isfinite(p).all():
        return False
    r = p[:3, :3]
    return bool(
        np.abs(p[3] - (0.0, 0.0, 0.0, 1.0)).max() < 1e-4
        and np.abs(r.T @ r - np.eye(3)).max() < 1e-2
        and np.linalg.det(r) > 0
    )


def templates(h: int, w: int) -> dict:
    return {
        "rgb": ((h, w, 3), np.uint8),
        "depth": ((h, w), np.uint16),
        "intrinsics": ((4,), np.float32),
        "pose": ((4, 4), np.float32),
        "projection": ((), np.uint8),
        "scene_index": ((), np.int32),
        "source_index": ((), np.int32),
    }


def scene_task(entry: dict, workdir: str, scene: str, part: str, stage_cfg: dict) -> dict:
    """Read one scene's kept frames into a part. Runs on a dask worker."""
    t0 = time.perf_counter()
    reader = make_reader(entry, Path(workdir))
    h, w = reader.stored_size()
    level = int(stage_cfg["zstd_level"])
    chunk = int(stage_cfg["chunk_frames"])
    # rgb / depth: one chunk per frame, encoded and written as each frame is read (chunk_frames 1);
    # the small per-frame arrays stay in memory and are written once per part
    rows = {k: chunk if k in IMAGES else SMALL_ROWS for k in templates(h, w)}
    pw = PartWriter(
        Path(part),
        chunk_rows=rows,
        compressors={k: ZstdCodec(level=level) for k in IMAGES},
        direct=IMAGES if chunk == 1 else (),
    )
    kept = 0
    for item in reader.frames(scene, entry["frame_skip"]):
        if not isinstance(item, Frame):
            pw.skipped[item.reason] += 1
            continue
        if not rigid_pose(item.pose):  # finite but singular / not a rotation: skipped and counted
            pw.skipped["invalid_pose"] += 1
            continue
        if item.rgb.shape != (h, w, 3) or item.depth.shape != (h, w):
            raise ValueError(
                f"{entry['name']}/{scene} frame {item.source_index}: reader returned rgb "
                f"{item.rgb.shape} depth {item.depth.shape}, stored size is {(h, w)}"
            )
        pw.append(
            rgb=item.rgb[None].astype(np.uint8, copy=False),
            depth=item.depth[None].astype(np.uint16, copy=False),
            intrinsics=np.asarray(item.intrinsics, np.float32)[None],
            pose=np.asarray(item.pose, np.float32)[None],
            projection=np.array([item.projection], np.uint8),
            scene_index=np.zeros(1, np.int32),
            source_index=np.array([item.source_index], np.int32),
        )
        kept += 1
        if chunk > 1 and kept % FLUSH_EVERY == 0:
            pw.flush()
    pw.finish(templates(h, w), scene=scene)
    return {"kept": kept, "skipped": dict(pw.skipped), "seconds": time.perf_counter() - t0}


def run(cfg: dict) -> list[dict]:
    """Run the frames stage for every configured dataset; returns one summary row per dataset."""
    wd = get_workdir(cfg)
    wd.mkdir(parents=True, exist_ok=True)
    rows = []
    with stage_lock(wd, "frames"):
        for entry in cfg["datasets"]:
            rows.append(run_dataset(cfg, entry, wd))
    return rows


def run_dataset(cfg: dict, entry: dict, wd: Path) -> dict:
    writer = GroupWriter(wd, "frames", entry["name"], frames_config(cfg, entry))
    if writer.up_to_date():
        attrs = writer_attrs(writer)
        log.info("frames/%s: up to date (%d frames), nothing to do", entry["name"], attrs["n_frames"])
        return {
            "dataset": entry["name"],
            "status": "up to date",
            "frames": attrs["n_frames"],
            "skipped": attrs.get("skipped", {}),
            "seconds": 0.0,
            "task_seconds": 0.0,
            "tasks_wall_seconds": 0.0,
            "cluster_seconds": 0.0,
            "commit_seconds": 0.0,
        }
    t0 = time.perf_counter()
    reader = make_reader(entry, wd)
    reader.prepare()
    scenes = sorted(reader.scenes())
    if not scenes:
        raise ValueError(
            f"dataset {entry['name']!r} ({entry['kind']}, root {entry.get('root')}): no scenes found "
            f"for split {entry.get('split')!r}"
        )
    h, w = reader.stored_size()
    writer.prepare_parts()
    todo = [s for s in scenes if not writer.part_done(s)]
    log.info(
        "frames/%s: %d scenes (%d already done), stored size %dx%d, frame_skip %d",
        entry["name"],
        len(scenes),
        len(scenes) - len(todo),
        h,
        w,
        entry["frame_skip"],
    )
    chunk = int(cfg["frames"]["chunk_frames"])
    tasks = [(s, (entry, str(wd), s, str(writer.part_path(s)), cfg["frames"])) for s in todo]
    timings: dict = {}
    t_cluster = time.perf_counter()
    with dask_client(cfg["cluster"]) as client:
        results = run_tasks(client, scene_task, tasks, desc=f"frames/{entry['name']}", timings=timings)
    t_commit = time.perf_counter()
    skipped = writer.commit(
        scenes,
        attrs={"stored_size": [h, w], "kind": entry["kind"]},
        chunks={"rgb": (chunk, h, w, 3), "depth": (chunk, h, w)},
    )
    n = writer_attrs(writer)["n_frames"]
    done = time.perf_counter()
    return {
        "dataset": entry["name"],
        "status": "written",
        "frames": n,
        "skipped": skipped,
        "seconds": done - t0,
        "task_seconds": sum(r["seconds"] for r in results.values()),
        "tasks_wall_seconds": timings.get("tasks", 0.0),
        "cluster_seconds": t_commit - t_cluster - timings.get("tasks", 0.0),
        "commit_seconds": done - t_commit,
    }


def writer_attrs(writer: GroupWriter) -> dict:
    g = zarr.open_group(str(writer.path), mode="r")
    return {**dict(g.attrs), "n_frames": int(g["source_index"].shape[0])}
