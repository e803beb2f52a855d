"""Stage ``teacher``: ``frames.zarr/<dataset>`` -> ``teacher.zarr/<teacher>/<dataset>/``.

The frozen 2D teacher (:mod:`lift3d.pipeline.teachers.registry`) runs once over every stored frame; the
trainer only ever reads its cached outputs. One group per (teacher, dataset), so several
teachers coexist. Row i belongs to frame i of ``frames.zarr/<dataset>``.

Arrays (docs/stores.md):

- ``features`` float16 (N, C, h, w): the teacher's frozen map, before any learnable layer.
- ``soft_labels/prob`` float16 (N, k, hs, ws) and ``soft_labels/index`` uint16 (N, k, hs, ws):
  the k = ``teacher.top_k`` most probable classes per cell, most probable first, as the
  teacher's softmax gave them (not renormalised: consumers renormalise over the k). The mass
  left outside the top-k (1 - sum of the k, per cell, from the float32 probabilities) is
  reported as ``topk_leftover_mass`` {mean, max} in the attributes and the summary.
- with ``teacher.flip_pass: true`` also ``features_flip``, ``soft_labels/prob_flip`` and
  ``soft_labels/index_flip``: the teacher's output on the horizontally flipped frame
  (``rgb[:, :, ::-1]``), stored in the *flipped image's own* cell grid: cell (i, j) of a flip
  array covers the flipped image's pixel centre ((i + 0.5) H / h - 0.5, (j + 0.5) W / w - 0.5),
  i.e. the original image's column W - 1 - that. To compare with the unflipped map, flip the
  last axis back (``features_flip[..., ::-1]``).

Work is cut into *shards* of ``SHARD_FRAMES`` consecutive frames (``teacher.shard_frames``
once that key exists in stages.yaml); each shard is one part (``shard-000000``, ...; sorted
order = frame order) marked done only after all its rows are written, so a killed run
resumes at the shard level and the committer gives the same store as a clean run.
A part also records the frame range, the weights' sha256 and the flip setting; one that does
not match the current run is redone, never mixed in.

Identity: the group's config is the whole ``teacher`` section plus the dataset entry, chained
to the frames group's lineage (:func:`lift3d.core.graph.groups`). A group written by another
configuration of the same teacher (other input size, top_k, weights, device, ...) or from
other frames is removed (with a log line) and rebuilt. ``device`` is part of the identity on
purpose: the GPU path runs in bf16 autocast, whose outputs differ from float32 on the CPU.
A weights file whose bytes changed under the same path is caught through ``weights_sha256``.

Execution. ``teacher.device: auto`` picks cuda when available. One pipeline per process:
a thread reads the next batch from Zarr (into pinned host memory on the GPU), the main thread
runs the model (inference mode; on the GPU: bf16 autocast, channels-last, cudnn autotuning,
non-blocking copies both ways), and a thread writes the finished batches into the parts, so
the device never waits on Zarr. On a dask cluster (``cluster.n_workers > 0``, a scheduler or a
jobqueue) each shard is a task and every worker process builds the teacher once; with a local
cluster and a CUDA device the stage runs in this process. On a scheduler or a jobqueue cluster
each worker resolves ``teacher.device`` itself (the client may have no GPU), and with
``cluster.gpu_resource: GPU`` each shard takes one unit of the workers' ``GPU`` resource
(``dask worker --resources GPU=1``, one worker per GPU), so several GPUs and nodes share the
shards. Each part records the device it ran on; shards from different kinds of device are
never committed into one group (bf16 and float32 outputs differ).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import zarr

from lift3d.core.cluster import ROWS_FOLLOW_FRAMES, dask_client, run_groups, run_tasks
from lift3d.core.config import resolve_path
from lift3d.core.config import workdir as get_workdir
from lift3d.core.device import resolve_device as core_resolve_device
from lift3d.core.errors import TeacherError
from lift3d.core.graph import Group, fit2d_run_dir, groups, uses_fit2d
from lift3d.core.progress import bar as progress_bar
from lift3d.core.store import GroupWriter, PartWriter, StoreError, group_state, open_group, stage_lock, writing
from lift3d.pipeline.teachers import pca as P
from lift3d.pipeline.teachers.pca import project
from lift3d.pipeline.teachers.pca import sha256 as pca_sha256
from lift3d.pipeline.teachers.registry import build_teacher

log = logging.getLogger("lift3d")

SHARD_FRAMES = 64  # default of teacher.shard_frames (frames per part)
FULL_MAX_CLASSES = 64  # teachers with at most this many classes store their whole distribution
QUEUE_DEPTH = 2  # batches in flight between the reader / model / writer threads
SHARD_PREFIX = "shard-"
FLIP_CONVENTION = (
    "*_flip arrays: the teacher's output on the horizontally flipped frame "
    "rgb[:, :, ::-1], in the flipped image's own cell grid (flip the last axis "
    "to align with the unflipped arrays)"
)
ARRAYS = ("features", "soft_labels/prob", "soft_labels/index")
FLIP_ARRAYS = ("features_flip", "soft_labels/prob_flip", "soft_labels/index_flip")


# ----------------------------------------------------------------------------- helpers


def resolve_device(device: str | None) -> str:
    """The teacher's device as a string (``cpu``, ``cuda``, ``cuda:1``): :func:`lift3d.core.device.resolve_device`."""
    return str(core_resolve_device(device, "teacher.device"))


def shard_frames(tcfg: dict) -> int:
    n = int(tcfg.get("shard_frames", SHARD_FRAMES))
    if n < 1:
        raise ValueError(f"teacher.shard_frames must be >= 1, got {n}")
    return n


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:06d}"


def shard_ranges(n_frames: int, size: int) -> list[tuple[str, int, int]]:
    """(name, start, stop) per shard; an empty dataset gets one empty shard (so the committed
    group still holds its (0, ...) arrays)."""
    if n_frames == 0:
        return [(shard_name(0), 0, 0)]
    return [(shard_name(i), s, min(n_frames, s + size)) for i, s in enumerate(range(0, n_frames, size))]


def templates(feat_shape, label_shape, k: int, flip: bool) -> dict:
    """Array name -> (shape after N, dtype) for the parts and the final group."""
    (c, h, w), (_, hs, ws) = feat_shape, label_shape
    out = {
        "features": ((c, h, w), np.float16),
        "soft_labels/prob": ((k, hs, ws), np.float16),
        "soft_labels/index": ((k, hs, ws), np.uint16),
    }
    if flip:
        out.update(
            {
                "features_flip": out["features"],
                "soft_labels/prob_flip": out["soft_labels/prob"],
                "soft_labels/index_flip": out["soft_labels/index"],
            }
        )
    return out


_CACHE: dict[tuple, object] = {}


def get_teacher(tcfg: dict, device: str):
    """Build the configured teacher once per process (a dask worker reuses it across shards).
    ``tcfg["weights"]`` is already resolved (:func:`teacher_section`)."""
    size = tuple(tcfg["input_size"]) if tcfg.get("input_size") else None
    key = (tcfg["name"], tcfg.get("weights"), size, device, tcfg.get("class_map"))
    if key not in _CACHE:
        t = build_teacher(
            tcfg["name"], weights=tcfg.get("weights"), input_size=size, device=device, class_map=tcfg.get("class_map")
        )
        if device.startswith("cuda"):
            t.module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        _CACHE[key] = t
    return _CACHE[key]


# ----------------------------------------------------------------------------- the pipeline


class _Stop(Exception):
    pass


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def _postprocess(
    feats: torch.Tensor, probs: torch.Tensor, k: int, flip: bool, m: int, pca: tuple | None = None
) -> dict:
    """The model's outputs for a batch (m frames, then their m flipped copies when ``flip``) ->
    the stored arrays: float16 features (projected when ``pca`` = (mean, components) is given,
    with ``_pca`` = the sums of :func:`lift3d.pipeline.teachers.pca.project`), top-k probabilities
    (float16) and indices, the flip pass split off, and ``_leftover`` = (sum, max, count) of the
    mass outside the top-k."""
    out = {}
    if pca is not None:
        feats, out["_pca"] = project(feats, *pca)
    v, i = torch.topk(probs, k, dim=1, largest=True, sorted=True)
    left = (1.0 - v.sum(1)).clamp_min_(0.0)
    out |= {
        "features": feats.to(torch.float16),
        "soft_labels/prob": v.to(torch.float16),
        "soft_labels/index": i.to(torch.int32),
        "_leftover": torch.stack(
            [
                left.sum(dtype=torch.float64),
                left.max().to(torch.float64),
                torch.tensor(float(left.numel()), dtype=torch.float64, device=left.device),
            ]
        ),
    }
    if flip:
        for name, fname in zip(ARRAYS, FLIP_ARRAYS):
            out[fname], out[name] = out[name][m:], out[name][:m]
    return {name: t.contiguous() for name, t in out.items()}


def process_shards(
    teacher,
    rgb,
    shards: list[tuple[str, int, int, str]],
    batch_size: int,
    k: int,
    flip: bool,
    part_attrs: dict,
    progress=None,
    pca: dict | None = None,
) -> dict:
    """Run ``teacher`` over the frames of ``shards`` (name, start, stop, part path) of the uint8
    (N, H, W, 3) array ``rgb`` and write one done part per shard.

    Three stages overlap: reader thread (Zarr -> host, pinned on the GPU; on the CPU also the
    preprocessing) -> this thread (the model; on the GPU also top-k and the asynchronous copy
    back) -> writer thread (on the CPU also top-k; the parts). Torch ops release the GIL, so on
    the CPU the threads' work runs beside the model's. Returns {"frames": n, "seconds": wall time}.
    """
    device = teacher.device
    cuda = device.type == "cuda"
    feat_shape, label_shape = teacher.output_shapes()
    k = min(int(k), label_shape[0])
    proj = None
    if pca is not None:  # (mean, components) on the device that projects: the model's on the GPU
        where = device if cuda else torch.device("cpu")
        proj = (torch.as_tensor(pca["mean"], device=where), torch.as_tensor(pca["components"], device=where))
        feat_shape = (int(pca["components"].shape[0]),) + tuple(feat_shape[1:])
    tmpl = templates(feat_shape, label_shape, k, flip)
    batches = []  # (shard position, start, stop, last batch of the shard)
    for si, (_, a, b, _) in enumerate(shards):
        for s in range(a, b, batch_size):
            batches.append((si, s, min(b, s + batch_size), min(b, s + batch_size) == b))
    stop = threading.Event()
    errors: list[BaseException] = []
    q_in: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    q_out: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH + 1)

    def reader():
        try:
            for si, a, b, last in batches:
                x = torch.from_numpy(np.ascontiguousarray(rgb[a:b]))
                if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
                    raise ValueError(
                        f"frames rgb rows {a}:{b}: expected uint8 (n, H, W, 3), got {x.dtype} {tuple(x.shape)}"
                    )
                if cuda:
                    x = x.pin_memory()
                else:  # CPU: preprocessing here overlaps the model running in the main thread
                    x = teacher.preprocess(torch.cat([x, x.flip(2)]) if flip else x)
                _put(q_in, (si, a, b, last, x), stop)
            _put(q_in, None, stop)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()

    def writer():
        pw, stats = None, None
        try:
            while True:
                item = _get(q_out, stop)
                if item is None:
                    return
                si, a, b, last, host, event = item
                if event is not None:
                    event.synchronize()  # the device -> pinned host copies have landed
                if "_raw" in host:  # CPU: top-k and float16 here, beside the model's next batch
                    with torch.inference_mode():
                        host = _postprocess(*host["_raw"], k, flip, b - a, proj)
                arrays = {name: t.numpy() for name, t in host.items() if not name.startswith("_")}
                for name in list(arrays):
                    if name.startswith("soft_labels/index"):
                        arrays[name] = arrays[name].astype(np.uint16)
                lo = host["_leftover"].numpy()
                name, s0, s1, path = shards[si]
                if pw is None:  # the first batch of a shard: a fresh part (a not-done one is redone)
                    # one chunk per frame, encoded and written here as each batch arrives (zstd
                    # releases the GIL; zarr's per-chunk machinery is bypassed), so the writer
                    # holds the GIL little beside the model and the committer hard-links the chunks
                    pw = PartWriter(Path(path), direct=tuple(tmpl))
                    stats = {"leftover_sum": 0.0, "leftover_max": 0.0, "leftover_cells": 0}
                    if proj is not None:
                        stats.update({"pca_f2": 0.0, "pca_centred2": 0.0, "pca_z2": 0.0})
                pw.append(**arrays)
                if "_pca" in host:
                    f2, c2, z2 = (float(v) for v in host["_pca"].numpy())
                    stats["pca_f2"] += f2
                    stats["pca_centred2"] += c2
                    stats["pca_z2"] += z2
                stats["leftover_sum"] += float(lo[0])
                stats["leftover_max"] = max(stats["leftover_max"], float(lo[1]))
                stats["leftover_cells"] += int(lo[2])
                if last:
                    pw.finish(tmpl, **part_attrs, shard=name, start=s0, stop=s1, device=device.type, **stats)
                    pw = None
                if progress is not None:
                    progress(b - a)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    # empty shards (an empty dataset) have no batches: write their parts here
    for name, a, b, path in shards:
        if a == b:
            PartWriter(Path(path), direct=tuple(tmpl)).finish(
                tmpl,
                **part_attrs,
                shard=name,
                start=a,
                stop=b,
                device=device.type,
                leftover_sum=0.0,
                leftover_max=0.0,
                leftover_cells=0,
                **({"pca_f2": 0.0, "pca_centred2": 0.0, "pca_z2": 0.0} if proj is not None else {}),
            )

    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=reader, name="teacher-reader", daemon=True),
        threading.Thread(target=writer, name="teacher-writer", daemon=True),
    ]
    for t in threads:
        t.start()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    n = 0
    try:
        with torch.inference_mode():
            while True:
                item = _get(q_in, stop)
                if item is None:
                    break
                si, a, b, last, x = item
                if cuda:
                    x = x.to(device, non_blocking=True)
                    if flip:
                        x = torch.cat([x, x.flip(2)])  # NHWC: axis 2 is the image's width
                    x = teacher.preprocess(x).contiguous(memory_format=torch.channels_last)
                with autocast:
                    feats, probs = teacher.forward(x)
                if cuda:
                    host = {}
                    for name, t in _postprocess(feats, probs, k, flip, b - a, proj).items():
                        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                        h.copy_(t, non_blocking=True)
                        host[name] = h
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host, event = {"_raw": (feats, probs)}, None
                _put(q_out, (si, a, b, last, host, event), stop)
                n += b - a
            _put(q_out, None, stop)
    except _Stop:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return {"frames": n, "seconds": time.perf_counter() - t0}


def shards_task(
    tcfg: dict,
    device: str,
    frames_path: str,
    shards: list,
    part_attrs: dict,
    torch_threads: int | None = None,
    pca: dict | None = None,
) -> dict:
    """One dask task: the shards given, in a worker process (the teacher is built once there)."""
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    device = resolve_device(device)  # here, on the worker: its own GPU or none
    teacher = get_teacher(tcfg, device)
    rgb = zarr.open_group(frames_path, mode="r")["rgb"]
    return process_shards(
        teacher,
        rgb,
        shards,
        int(tcfg["batch_size"]),
        full_distribution(teacher.output_shapes()[1][0], int(tcfg["top_k"])),
        bool(tcfg.get("flip_pass")),
        part_attrs,
        pca=pca,
    )


def fitted_pca(tcfg: dict, teacher, rgb, writer: GroupWriter) -> dict | None:
    """The channel projection of ``teacher.pca_channels`` (None when unset), fitted once per
    configuration and kept beside the parts, so that every shard of a run, resumed or not, uses
    the same one (a GPU fit in bf16 is not bit-reproducible)."""
    channels = tcfg.get("pca_channels")
    if not channels:
        return None
    path = writer.parts_dir / "pca.npz"
    if path.exists():
        try:
            p = P.load(path)
            if str(p.get("weights_sha256")) == str(teacher.weights_sha256):
                return p
        except (OSError, ValueError, KeyError) as exc:  # unreadable: fitted again
            log.info("teacher: %s unreadable (%s); fitting again", path, exc)
    t0 = time.perf_counter()
    p = P.fit_teacher(teacher, rgb, int(channels), int(tcfg.get("pca_fit_frames", 256)), int(tcfg["batch_size"]))
    p["weights_sha256"] = np.array(str(teacher.weights_sha256))
    with writing(path, "write the fitted projection"):
        P.save(path, p)
    log.info(
        "teacher: fitted a %d -> %d channel projection on %d frames (%d vectors) in %.1f s; it keeps "
        "%.2f %% of the sample's variance",
        p["mean"].shape[0],
        int(channels),
        p["fit_frames"],
        p["fit_vectors"],
        time.perf_counter() - t0,
        100 * p["explained"],
    )
    return P.load(path)


# ----------------------------------------------------------------------------- the stage


def teacher_section(cfg: dict) -> dict:
    """The teacher settings with ``weights`` resolved: a relative path under the workdir first, and
    for ``fitted`` without weights this configuration's fit2d run (which must be complete)."""
    tcfg = dict(cfg["teacher"])
    if uses_fit2d(cfg):
        run = fit2d_run_dir(cfg)
        try:
            info = json.loads((run / "run.json").read_text())
        except (OSError, ValueError):
            info = None
        if not info or not info.get("complete") or not (run / "model.pt").is_file():
            raise TeacherError(
                f"teacher.name is fitted and teacher.weights is null, so the teacher is this configuration's "
                f"fit2d run {run}, which is not complete: run 'lift3d run fit2d' first (or set teacher.weights)"
            )
        tcfg["weights"] = str(run / "model.pt")
    elif tcfg.get("weights"):
        tcfg["weights"] = str(resolve_path(cfg, tcfg["weights"]))
    return tcfg


def full_distribution(n_classes: int, top_k: int) -> int:
    """How many classes per cell the store keeps: all of them for a teacher with at most
    ``FULL_MAX_CLASSES`` classes (a semantic teacher's distribution is small), else the top ``top_k``."""
    return n_classes if n_classes <= FULL_MAX_CLASSES else min(int(top_k), n_classes)


def run(cfg: dict) -> list[dict]:
    """Run the teacher stage for every configured dataset; one summary row per dataset."""
    wd = get_workdir(cfg)
    wd.mkdir(parents=True, exist_ok=True)
    jobs = [(g.path, lambda _failures, g=g: run_group(cfg, g, wd)) for g in groups(cfg, "teacher")]
    with stage_lock(wd, "teacher"):
        return run_groups(
            wd,
            "teacher",
            jobs,
            hint=ROWS_FOLLOW_FRAMES,
        )


def _part_ok(writer: GroupWriter, name: str, start: int, stop: int, part_attrs: dict) -> bool:
    if not writer.part_done(name):
        return False
    a = zarr.open_group(str(writer.part_path(name)), mode="r").attrs
    return (
        a.get("start") == start and a.get("stop") == stop and all(a.get(key) == val for key, val in part_attrs.items())
    )


def _row(name: str, teacher: str, status: str, attrs: dict, processed: int, ips: float, seconds: float) -> dict:
    lo = attrs.get("topk_leftover_mass", {})
    bpf = attrs.get("bytes_per_frame", {})
    return {
        "dataset": name,
        "teacher": teacher,
        "status": status,
        "frames": attrs.get("n_frames", 0),
        "processed": processed,
        "images_per_s": ips,
        "feature_bytes_per_frame": bpf.get("features", 0),
        "soft_label_bytes_per_frame": bpf.get("soft_labels", 0),
        "leftover_mean": lo.get("mean"),
        "leftover_max": lo.get("max"),
        "seconds": seconds,
    }


def run_group(cfg: dict, g: Group, wd: Path) -> dict:
    tcfg = teacher_section(cfg)
    entry = g.config["dataset"]
    frames = open_group(wd, "frames", g.upstream.path, expect_lineage=g.upstream.lineage_sha256)
    writer = GroupWriter(
        wd,
        "teacher",
        g.path,
        g.config,
        upstream_sha256=g.upstream.config_sha256,
        upstream_lineage=g.upstream.lineage_sha256,
    )
    cl = cfg["cluster"]
    remote = bool(cl.get("scheduler") or cl.get("jobqueue"))
    # on a scheduler or a jobqueue cluster each worker resolves teacher.device itself (the
    # client, e.g. a login node, may have no GPU); locally it is resolved here
    device = str(tcfg.get("device") or "auto") if remote else resolve_device(tcfg.get("device"))
    in_process = not remote and (device.startswith("cuda") or int(cl.get("n_workers", 1)) == 0)
    teacher = get_teacher(tcfg, device if in_process else "cpu")
    old = group_state(wd, "teacher", g.path)
    if writer.up_to_date() and old.get("weights_sha256") == teacher.weights_sha256:
        log.info("teacher/%s: up to date (%d frames), nothing to do", g.path, old.get("n_frames", 0))
        return _row(entry["name"], tcfg["name"], "up to date", old, 0, 0.0, 0.0)

    t0 = time.perf_counter()
    if old is not None and old.get("complete") and old.get("lineage_sha256") == writer.lineage_sha256:
        why = (
            f"made with other weights (sha256 {str(old.get('weights_sha256'))[:12]} != "
            f"{str(teacher.weights_sha256)[:12]})"
        )
        writer.check_replace(bool(cfg.get("rebuild")), why)
    else:
        writer.check_replace(bool(cfg.get("rebuild")))

    rgb = frames["rgb"]
    n_frames, h_img, w_img = int(rgb.shape[0]), int(rgb.shape[1]), int(rgb.shape[2])
    size = shard_frames(tcfg)
    flip = bool(tcfg.get("flip_pass"))
    k_req = int(tcfg["top_k"])
    if k_req < 1:
        raise ValueError(f"teacher.top_k must be >= 1, got {k_req}")
    feat_shape, label_shape = teacher.output_shapes()
    k = full_distribution(label_shape[0], k_req)
    part_attrs = {"weights_sha256": teacher.weights_sha256, "flip_pass": flip, "top_k": k}
    writer.prepare_parts()
    pca = fitted_pca(tcfg, teacher, rgb, writer) if n_frames else None  # nothing to fit on an empty dataset
    if pca is not None:
        part_attrs["pca_sha256"] = pca_sha256(pca)
        feat_shape = (int(pca["components"].shape[0]),) + tuple(feat_shape[1:])
    shards = shard_ranges(n_frames, size)
    todo = [
        (name, a, b, str(writer.part_path(name)))
        for name, a, b in shards
        if not _part_ok(writer, name, a, b, part_attrs)
    ]
    log.info(
        "teacher/%s: %d frames %dx%d -> %s at %s on %s, %d shards of %d (%d already done)",
        g.path,
        n_frames,
        h_img,
        w_img,
        tcfg["name"],
        list(teacher.input_size),
        device,
        len(shards),
        size,
        len(shards) - len(todo),
    )

    processed, seconds = 0, 0.0
    if todo:
        frames_path = str(Path(wd) / "frames.zarr" / g.upstream.path)
        if in_process:
            bar = progress_bar(sum(b - a for _, a, b, _ in todo), f"teacher/{g.path}", "frame")
            try:
                res = process_shards(
                    teacher, rgb, todo, int(tcfg["batch_size"]), k, flip, part_attrs, progress=bar.update, pca=pca
                )
            finally:
                bar.close()
            processed, seconds = res["frames"], res["seconds"]
        else:
            tasks = [
                (name, (tcfg, device, frames_path, [(name, a, b, p)], part_attrs, cl.get("threads_per_worker"), pca))
                for name, a, b, p in todo
            ]
            # a GPU shard takes one unit of the workers' GPU resource, so a worker runs one at a time
            gpu = cl.get("gpu_resource")
            resources = {str(gpu): 1} if gpu and not device.startswith("cpu") else None
            with dask_client(cl) as client:
                t1 = time.perf_counter()  # from the first task on (cluster start-up left out)
                res = run_tasks(client, shards_task, tasks, desc=f"teacher/{g.path}", unit="shard", resources=resources)
            processed = sum(r["frames"] for r in res.values())
            seconds = time.perf_counter() - t1

    # the leftover mass over every shard (parts written now or by an earlier, killed run)
    lo_sum, lo_max, cells = 0.0, 0.0, 0
    energy = np.zeros(3)  # sum ||f||^2, ||f - mu||^2, ||z||^2 (channel projection only)
    devices: dict[str, list[str]] = {}
    for name, _, _ in shards:
        a = zarr.open_group(str(writer.part_path(name)), mode="r").attrs
        devices.setdefault(str(a.get("device", "cpu")), []).append(name)
        lo_sum += a["leftover_sum"]
        lo_max = max(lo_max, a["leftover_max"])
        cells += a["leftover_cells"]
        if pca is not None:
            energy += [a["pca_f2"], a["pca_centred2"], a["pca_z2"]]
    if len(devices) > 1:  # bf16 on the GPU and float32 on the CPU are never mixed in one group
        raise StoreError(
            f"teacher/{g.path}: shards ran on different devices ("
            + "; ".join(f"{d}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}" for d, n in sorted(devices.items()))
            + "); set teacher.device to cpu or cuda explicitly (the shards are then redone) "
            "and give every worker the same kind of device"
        )
    device = next(iter(devices), device)
    c, h, w = feat_shape
    _, hs, ws = label_shape
    bpf = {"features": c * h * w * 2, "soft_labels": k * hs * ws * (2 + 2)}
    if flip:
        bpf = {key: 2 * v for key, v in bpf.items()}
    attrs = {
        **teacher.attrs(),
        "normalisation": {
            "mean": list(teacher.mean),
            "std": list(teacher.std),
            "input": "RGB / 255, then (x - mean) / std",
            "resize": "whole stored frame, bilinear, align_corners=False, antialiased when shrinking, no crop",
        },
        "top_k": k,
        "full_distribution": k == label_shape[0],
        "flip_pass": flip,
        "flip_convention": FLIP_CONVENTION if flip else None,
        "features_shape": list(feat_shape),
        "soft_labels_shape": [k, hs, ws],
        "n_frames": n_frames,
        "stored_size": [h_img, w_img],
        "frames_group": f"frames.zarr/{g.upstream.path}",
        "device": device,
        "precision": "bf16 autocast" if device.startswith("cuda") else "float32",
        "topk_leftover_mass": {"mean": lo_sum / cells if cells else 0.0, "max": lo_max},
        "bytes_per_frame": bpf,
        "shards": [name for name, _, _ in shards],
        "shard_frames": size,
        # the frame scenes; GroupWriter.commit writes its part names under "scenes" after these
        # attributes, so "shards" is the reliable part list
        "scenes": list(frames.attrs.get("scenes", [])),
    }
    extra = {}
    if pca is not None:
        residual = max(0.0, energy[1] - energy[2])
        attrs["features_reduction"] = {
            "method": "pca",
            "channels_in": int(pca["mean"].shape[0]),
            "channels": int(feat_shape[0]),
            "fit_frames": int(pca["fit_frames"]),
            "fit_vectors": int(pca["fit_vectors"]),
            "explained_variance_fit": float(pca["explained"]),
            # over every stored frame (the flip pass included), before float16 rounding
            "relative_error": residual / energy[0] if energy[0] > 0 else 0.0,
            "unexplained_variance": residual / energy[1] if energy[1] > 0 else 0.0,
            "sha256": part_attrs["pca_sha256"],
            "reconstruct": "f = pca/mean[:, None, None] + einsum('kc,khw->chw', pca/components, features[i])",
        }
        extra = {"pca/mean": pca["mean"], "pca/components": pca["components"]}
        attrs["channels"] = int(feat_shape[0])  # what `features` holds; the teacher's own in channels_in
    tmpl = templates(feat_shape, label_shape, k, flip)
    writer.commit(
        [name for name, _, _ in shards],
        attrs=attrs,
        chunks={name: (1,) + tuple(tail) for name, (tail, _) in tmpl.items()},
        extra=extra,
    )
    final = group_state(wd, "teacher", g.path)
    ips = processed * (2 if flip else 1) / seconds if seconds > 0 else 0.0
    log.info(
        "teacher/%s: wrote %d frames (%d processed now, %.1f images/s); top-%d leftover mass mean %.4f max %.4f",
        g.path,
        n_frames,
        processed,
        ips,
        k,
        final["topk_leftover_mass"]["mean"],
        final["topk_leftover_mass"]["max"],
    )
    return _row(entry["name"], tcfg["name"], "written", final, processed, ips, time.perf_counter() - t0)


__all__ = [
    "run",
    "run_group",
    "process_shards",
    "shards_task",
    "resolve_device",
    "shard_ranges",
    "templates",
    "get_teacher",
    "SHARD_FRAMES",
    "StoreError",
]
