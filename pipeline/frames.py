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

from lift3d.core.cluster import TaskFailures, dask_client, run_groups, run_tasks
from lift3d.core.config import dataset_lists, sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.graph import stage_identity
from lift3d.core.store import GroupWriter, PartWriter, failed_scenes, stage_lock, writing
from lift3d.pipeline.readers.base import Frame, make_reader

log = logging.getLogger("lift3d")
FLUSH_EVERY = 16  # frames buffered in memory before a part write (chunk_frames > 1)
IMAGES = ("rgb", "depth")
SMALL_ROWS = 4096  # rows per chunk of the small per-frame arrays (pose, intrinsics, indices)


def frames_config(cfg: dict, entry: dict) -> dict:
    """The identity of one frames group: this stage's section plus the dataset entry."""
    return {"stage": stage_identity(cfg, "frames"), "dataset": entry}


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
    """Run the frames stage for every configured dataset; returns one summary row per dataset.
    Every scene's task runs even when some fail; the failures are listed at the end (and in
    ``<workdir>/logs/frames-failures.json``), and with ``skip_failed_scenes`` the groups are
    committed without them."""
    wd = get_workdir(cfg)
    wd.mkdir(parents=True, exist_ok=True)
    skip = bool(cfg.get("skip_failed_scenes"))
    hint = "re-running redoes only these" + (
        "" if skip else "; fix or remove them, or set skip_failed_scenes: true to commit without them"
    )
    entries = [e for _, listed in dataset_lists(cfg) for e in listed]  # the 3D datasets, then fit2d's corpus
    jobs = [(e["name"], lambda failures, e=e: run_dataset(cfg, e, wd, failures)) for e in entries]
    with stage_lock(wd, "frames"):
        return run_groups(wd, "frames", jobs, skip, hint)


def run_dataset(cfg: dict, entry: dict, wd: Path, failures: dict | None = None) -> dict:
    failures = {} if failures is None else failures
    config = frames_config(cfg, entry)
    before = failed_scenes(wd, "frames", entry["name"], sha256_json(config))  # skipped by an earlier run
    writer = GroupWriter(wd, "frames", entry["name"], config, failed=list(before))
    if writer.up_to_date() and not before:
        attrs = writer_attrs(writer)
        log.info("frames/%s: up to date (%d frames), nothing to do", entry["name"], attrs["n_frames"])
        return _row(entry, "up to date", attrs["n_frames"], attrs.get("skipped", {}))
    writer.check_replace(bool(cfg.get("rebuild")))
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
    results: dict = {}
    with dask_client(cfg["cluster"]) as client:
        try:
            results = run_tasks(client, scene_task, tasks, desc=f"frames/{entry['name']}", timings=timings)
        except TaskFailures as exc:
            failures.update(exc.failures)
            if not cfg.get("skip_failed_scenes") or len(exc.failures) == len(scenes):
                raise  # nothing is committed; the good scenes' parts are kept for the re-run
    if writer.up_to_date() and sorted(failures) == writer.failed:
        log.info("frames/%s: up to date; the %d failed scene(s) still fail", entry["name"], len(failures))
        attrs = writer_attrs(writer)
        return _row(entry, "up to date", attrs["n_frames"], attrs.get("skipped", {}))
    t_commit = time.perf_counter()
    good = [s for s in scenes if s not in failures]
    final = GroupWriter(wd, "frames", entry["name"], config, failed=list(failures))
    skipped = final.commit(
        good,
        attrs={"stored_size": [h, w], "kind": entry["kind"], **({"failed_scenes": failures} if failures else {})},
        chunks={"rgb": (chunk, h, w, 3), "depth": (chunk, h, w)},
        keep_parts=bool(failures),
    )
    if failures:
        skipped = {**skipped, "failed_scene": len(failures)}
        with writing(final.path, "record the failed scenes"):
            zarr.open_group(str(final.path), mode="a").attrs["skipped"] = dict(sorted(skipped.items()))
        log.warning(
            "frames/%s: committed without %d failed scene(s) (skip_failed_scenes)", entry["name"], len(failures)
        )
    done = time.perf_counter()
    return {
        **_row(entry, "written", writer_attrs(final)["n_frames"], skipped),
        "seconds": done - t0,
        "task_seconds": sum(r["seconds"] for r in results.values()),
        "tasks_wall_seconds": timings.get("tasks", 0.0),
        "cluster_seconds": t_commit - t_cluster - timings.get("tasks", 0.0),
        "commit_seconds": done - t_commit,
    }


def _row(entry: dict, status: str, frames: int, skipped: dict) -> dict:
    return {
        "dataset": entry["name"],
        "status": status,
        "frames": frames,
        "skipped": skipped,
        "seconds": 0.0,
        "task_seconds": 0.0,
        "tasks_wall_seconds": 0.0,
        "cluster_seconds": 0.0,
        "commit_seconds": 0.0,
    }


def writer_attrs(writer: GroupWriter) -> dict:
    g = zarr.open_group(str(writer.path), mode="r")
    return {**dict(g.attrs), "n_frames": int(g["source_index"].shape[0])}
