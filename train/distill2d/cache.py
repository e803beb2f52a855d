"""distill2d, part 1: the frozen 3D network and its features projected into the frames, cached once
per 3D checkpoint (see :mod:`lift3d.train.distill2d`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import MinkowskiEngine as ME
import numpy as np
import torch
import zarr

from lift3d.core import checkpoint as ckpt
from lift3d.core.config import resolve_path, sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.device import resolve_device
from lift3d.core.errors import CheckpointError, DistillError
from lift3d.core.graph import groups
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group, store_path
from lift3d.nets.backbones2d import sha256_path
from lift3d.nets.res16unet import MODELS
from lift3d.nets.sparse import backend_of, build_model, checkpoint_backend, sparse_input
from lift3d.pipeline.readers.base import make_reader
from lift3d.pipeline.readers.common import read_split
from lift3d.pipeline.readers.scannet_labels import IGNORE_INDEX, nyu40_to_scannet20, read_labelled_mesh
from lift3d.train import finetune

log = logging.getLogger("lift3d")

NUM_CLASSES = 20
LABELLED_KINDS = ("scannet", "synthetic")


# ----------------------------------------------------------------------------- 3D checkpoint


def _device(d: dict) -> torch.device:
    return resolve_device(d.get("device"), "distill2d.device")


def resolve_checkpoint(cfg: dict) -> Path:
    """The 3D network's model.pt: ``distill2d.checkpoint`` (a run folder or a file), or, when it is
    null, the finetune run of the current configuration (which must be complete)."""
    ck = cfg["distill2d"].get("checkpoint")
    if ck is None:
        state, why = finetune.status(cfg)
        if state != "done":
            raise StoreError(
                f"distill2d distils the fine-tuned 3D network of this config "
                f"(distill2d.checkpoint: null), but finetune is {state} ({'; '.join(why)}): run "
                f"'lift3d run finetune' first, or set distill2d.checkpoint to a run folder or model.pt"
            )
        return Path(finetune.run_dir(cfg)) / "model.pt"
    p = resolve_path(cfg, ck)  # relative: under the workdir first, then the current folder
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise FileNotFoundError(
            f"distill2d.checkpoint: {p} not found (expected a 3D run folder holding model.pt, or a model.pt file)"
        )
    return p


def load_3d(path: Path, cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The frozen 3D network of a lift3d model.pt (eval mode) and (model_name, channels, voxel_size, sha256).

    A file that is not such a dict, names a model that is not a Res16UNet, has ``in_channels`` != 3
    (colours are the input) or whose weights do not fit the named network is refused, naming the file."""
    path = Path(path)
    what = (
        "a lift3d 3D model file (torch.save dict with 'model' = a Res16UNet state dict, 'model_name', "
        "'in_channels', 'out_channels'), as finetune and pretrain write"
    )
    try:
        obj = ckpt.load(path, what)
    except CheckpointError as exc:
        raise DistillError(f"distill2d.checkpoint {path}: cannot read it: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "model_name" not in obj:
        raise DistillError(f"distill2d.checkpoint {path}: not {what}")
    name = obj["model_name"]
    if name not in MODELS:
        raise DistillError(
            f"distill2d.checkpoint {path}: model_name {name!r} is not a Res16UNet (known: {', '.join(sorted(MODELS))})"
        )
    cin, cout = obj.get("in_channels"), obj.get("out_channels")
    if cin != 3:
        raise DistillError(
            f"distill2d.checkpoint {path}: in_channels is {cin!r}; the 3D network must take "
            f"3 colour channels (the mesh's vertex colours)"
        )
    if not isinstance(cout, int) or cout <= 0:
        raise DistillError(f"distill2d.checkpoint {path}: out_channels is {cout!r}, expected a positive integer")
    try:
        net = build_model(name, 3, cout, backend=checkpoint_backend(obj))  # the backend it was trained on
    except ValueError as exc:
        raise DistillError(f"distill2d.checkpoint {path}: {exc}") from None
    try:
        net.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DistillError(
            f"distill2d.checkpoint {path}: its weights do not fit {name}(3, {cout}) (channels or "
            f"layers differ): {' '.join(first[:3])[:400]}"
        ) from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    vs = cfg["distill2d"].get("voxel_size") or obj.get("voxel_size") or cfg["pretrain"]["voxel_size"]
    return net, {
        "model_name": name,
        "channels": int(net.decoder_dim),
        "voxel_size": float(vs),
        "sha256": sha256_path(path),
        "path": str(path),
    }


# ----------------------------------------------------------------------------- geometry


def project_points(
    xyz: np.ndarray, pose: np.ndarray, intrinsics, depth_m: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """World points -> the covered pixels of one pinhole frame.

    Camera coordinates X_c = R^T (X - t) for the camera-to-world pose [R | t]; pixel (row, col) =
    (round(fy y / z + cy), round(fx x / z + cx)) with integer coordinates at pixel centres. A point
    counts where z > 0, the pixel is inside the H x W frame, the frame measured a depth d > 0 there
    and |z - d| < tolerance; among those the nearest (smallest z) per pixel wins.
    Returns (point index (K,), pixel (K, 2) int32 (row, col)), sorted by row-major pixel."""
    H, W = depth_m.shape
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    R, t = pose[:3, :3].astype(np.float64), pose[:3, 3].astype(np.float64)
    cam = (xyz.astype(np.float64) - t) @ R  # rows: R^T (x - t)
    z = cam[:, 2]
    front = z > 1e-6
    idx = np.flatnonzero(front)
    zf = z[idx]
    col = np.floor(fx * cam[idx, 0] / zf + cx + 0.5).astype(np.int64)
    row = np.floor(fy * cam[idx, 1] / zf + cy + 0.5).astype(np.int64)
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    idx, zf, row, col = idx[inside], zf[inside], row[inside], col[inside]
    d = depth_m[row, col]
    ok = (d > 0) & (np.abs(zf - d) < tolerance)
    idx, zf, row, col = idx[ok], zf[ok], row[ok], col[ok]
    flat = row * W + col
    order = np.lexsort((zf, flat))  # by pixel, then nearest first
    flat_o = flat[order]
    first = np.ones(len(order), bool)
    first[1:] = flat_o[1:] != flat_o[:-1]
    keep = order[first]
    return idx[keep], np.stack([row[keep], col[keep]], 1).astype(np.int32)


def vertex_features(net, xyz: np.ndarray, rgb: np.ndarray, voxel_size: float, device: torch.device) -> np.ndarray:
    """(V, decoder_dim) float32: each vertex gets the penultimate (block8) feature of its voxel.

    Voxels are ``floor(xyz / voxel_size)`` quantised with MinkowskiEngine's ``sparse_quantize``
    (one representative vertex per voxel supplies the colour input, rgb / 255 - 0.5 as in
    pretraining); the inverse map sends the voxel features back to every vertex."""
    coords = torch.from_numpy(np.floor(xyz.astype(np.float64) / voxel_size).astype(np.int32))
    bc = ME.utils.batched_coordinates([coords])  # (V, 4): batch 0, x, y, z
    index, inverse = ME.utils.sparse_quantize(bc, return_index=True, return_inverse=True, return_maps_only=True)
    index, inverse = torch.as_tensor(index).long().cpu(), torch.as_tensor(inverse).long().cpu()
    feats = torch.from_numpy(rgb.astype(np.float32) / 255.0 - 0.5)[index]
    x = sparse_input(feats.to(device), bc[index].to(device), backend_of(net))
    with torch.no_grad():
        _, dec = net(x, return_decoder=True)
    if dec.F.shape[0] != len(index) or not torch.equal(dec.C.cpu(), x.C.cpu()):
        raise RuntimeError("3D network: decoder rows are not in the order of the input voxels")
    return dec.F.float().cpu().numpy()[inverse.numpy()]


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One labelled dataset: its verified frames group, raw root and 2D labels."""

    entry: dict
    frames_path: str
    frames_lineage: str
    frames_config_sha256: str
    root: Path
    scenes: list[str]
    train_rows: np.ndarray  # frames.zarr rows trained on (scenes outside the evaluation split)
    eval_scenes: list[str]
    hw: tuple[int, int]


def open_sources(cfg: dict) -> list[Source]:
    wd = get_workdir(cfg)
    split = cfg["distill2d"]["eval_split"]
    out = []
    for g in groups(cfg, "frames"):
        entry = g.config["dataset"]
        if entry["kind"] not in LABELLED_KINDS:
            log.info(
                "distill2d: dataset %s (kind %s) has no labelled meshes / 2D labels; not used",
                entry["name"],
                entry["kind"],
            )
            continue
        fr = open_group(wd, "frames", g.path, expect_lineage=g.lineage_sha256)
        reader = make_reader(entry, wd)
        root = Path(reader.root)
        eval_scenes = read_split(root / f"scannetv2_{split}.txt", split)
        scenes = list(fr.attrs["scenes"])
        scene_index = fr["scene_index"][...]
        held = np.array([scenes[s] in set(eval_scenes) for s in scene_index], bool)
        if held.any():
            log.info(
                "distill2d: %d frames of %s belong to %s scenes; not trained on", int(held.sum()), entry["name"], split
            )
        if not bool((fr["projection"][...] == 0).all()):
            raise DistillError(f"dataset {entry['name']}: distill2d needs pinhole frames")
        out.append(
            Source(
                entry,
                str(store_path(wd, "frames") / g.path),
                g.lineage_sha256,
                g.config_sha256,
                root,
                scenes,
                np.flatnonzero(~held),
                eval_scenes,
                tuple(int(x) for x in fr["rgb"].shape[1:3]),
            )
        )
    if not out:
        raise DistillError(
            f"distill2d needs a dataset of kind {' or '.join(LABELLED_KINDS)} (labelled meshes and "
            f"2D label images); configured: {', '.join(d['kind'] for d in cfg['datasets'])}"
        )
    if len({s.hw for s in out}) > 1:
        raise DistillError(f"distill2d: datasets have different stored sizes {[s.hw for s in out]}; set image_size")
    if sum(len(s.train_rows) for s in out) == 0:
        raise DistillError("distill2d: no training frames outside the evaluation split")
    return out


# ----------------------------------------------------------------------------- the 3D feature cache


def cache_config(d: dict, info: dict) -> dict:
    return {
        "checkpoint_sha256": info["sha256"],
        "model_name": info["model_name"],
        "voxel_size": info["voxel_size"],
        "depth_tolerance": float(d["depth_tolerance"]),
    }


def cache_store(cc: dict) -> str:
    return f"runs/distill2d/features3d-{sha256_json(cc)[:10]}"


def cache_writer(wd: Path, src: Source, cc: dict) -> GroupWriter:
    return GroupWriter(
        wd,
        cache_store(cc),
        src.entry["name"],
        {"stage": cc, "dataset": src.entry},
        upstream_sha256=src.frames_config_sha256,
        upstream_lineage=src.frames_lineage,
    )


def build_cache(cfg: dict, sources: list[Source], ck_path: Path) -> dict:
    """Make (or reuse) the 3D feature cache of every source; returns {dataset: group path}."""
    wd = get_workdir(cfg)
    d = cfg["distill2d"]
    net, info = load_3d(ck_path, cfg)  # the cache's identity needs the checkpoint's voxel size
    device = _device(d)
    net.to(device)
    out, made = {}, 0
    for src in sources:
        cc = cache_config(d, info)
        gw = cache_writer(wd, src, cc)
        out[src.entry["name"]] = (str(gw.path), cc)
        if gw.up_to_date():
            continue
        gw.prepare_parts()
        fr = zarr.open_group(src.frames_path, mode="r")
        scene_index = fr["scene_index"][...]
        train_scenes = sorted({src.scenes[s] for s in scene_index[src.train_rows]})
        for scene in train_scenes:
            if gw.part_done(scene):
                continue
            rows = src.train_rows[np.array([src.scenes[scene_index[r]] == scene for r in src.train_rows])]
            _cache_scene(net, info, d, src, fr, scene, rows, gw.part_path(scene), device)
            made += 1
        gw.commit(
            train_scenes,
            {"scenes": train_scenes, "channels": info["channels"], "checkpoint": info["path"]},
            ragged=("feats", "pixel", "label3d"),
        )
    log.info("distill2d: 3D feature cache ready (%d scenes computed now)", made)
    return out


def _cache_scene(net, info, d, src: Source, fr, scene: str, rows: np.ndarray, part: Path, device) -> None:
    xyz, rgb, nyu40 = read_labelled_mesh(src.root / "scans" / scene)
    lab = nyu40_to_scannet20(nyu40, IGNORE_INDEX).astype(np.uint8)
    vf = vertex_features(net, xyz, rgb, info["voxel_size"], device).astype(np.float16)
    C = vf.shape[1]
    pw = PartWriter(
        part, chunk_rows={"feats": 4096, "pixel": 4096, "label3d": 4096, "counts": 4096, "frame_index": 4096}
    )
    covered = 0
    for r in rows:
        depth = fr["depth"][int(r)].astype(np.float64) / 1000.0
        idx, pix = project_points(xyz, fr["pose"][int(r)], fr["intrinsics"][int(r)], depth, float(d["depth_tolerance"]))
        pw.append(
            feats=vf[idx],
            pixel=pix,
            label3d=lab[idx],
            counts=np.array([len(idx)], np.int64),
            frame_index=np.array([int(r)], np.int64),
        )
        covered += len(idx)
    pw.finish(
        {
            "feats": ((C,), np.float16),
            "pixel": ((2,), np.int32),
            "label3d": ((), np.uint8),
            "counts": ((), np.int64),
            "frame_index": ((), np.int64),
        },
        scene=scene,
        covered=covered,
        vertices=int(len(xyz)),
    )


class Cache3D:
    """Read side of one dataset's cache: covered pixels of a frames.zarr row."""

    def __init__(self, path: str):
        g = zarr.open_group(path, mode="r")
        if not g.attrs.get("complete"):
            raise StoreError(f"{path} is not complete: re-run 'lift3d run distill2d'")
        self.g = g
        self.offsets = g["offsets"][...]
        self.row_of = {int(f): i for i, f in enumerate(g["frame_index"][...])}
        self.channels = int(g["feats"].shape[1])
        self.memory: dict[int, tuple] = {}  # frames already read, up to MEMORY_BYTES
        self.held = 0

    MEMORY_BYTES = 1 << 30

    def frame(self, row: int):
        i = self.row_of.get(int(row))
        if i is None:
            return (np.zeros((0, self.channels), np.float16), np.zeros((0, 2), np.int32), np.zeros(0, np.uint8))
        if i in self.memory:
            return self.memory[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = (self.g["feats"][a:b], self.g["pixel"][a:b], self.g["label3d"][a:b])
        size = sum(x.nbytes for x in out)
        if self.held + size <= self.MEMORY_BYTES:
            self.memory[i] = out
            self.held += size
        return out
