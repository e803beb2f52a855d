"""Stage ``distill2d``: 3D-to-2D distillation (Liu, Qi, Fu, CVPR 2021). A 2D segmentation network
learns, from RGB alone, to simulate the features of a frozen 3D network, and segments better with
them; at test time it needs no depth and no points.

1. Paired 3D features in image space (once per 3D checkpoint, cached). For each training scene the
   frozen 3D network (``distill2d.checkpoint``; null = the fine-tuned network of this config) runs
   on the labelled mesh vertices (``<root>/scans/<scene>/<scene>_vh_clean_2.ply``, the ``.sens``
   pose frame), voxelised at the checkpoint's voxel size; a vertex takes its voxel's penultimate
   (block8, ``decoder_dim`` channels) feature through MinkowskiEngine's ``sparse_quantize``
   inverse map. The vertices are projected into every kept frame of ``frames.zarr/<dataset>`` with
   its intrinsics and camera-to-world pose (OpenCV camera; (row, col) with integer coordinates at
   pixel centres, the nearest pixel centre taken); a point counts only where the frame measured a
   depth with |z - depth| < ``depth_tolerance`` (so occluded points do not leak through), and
   among those the nearest point per pixel wins. The covered pixels of each frame are cached,
   ragged, in ``<workdir>/runs/distill2d/features3d-<id>.zarr/<dataset>/`` (``feats`` float16
   (P, C), ``pixel`` int32 (P, 2), ``label3d`` uint8 (P,) = the point's ScanNet-20 class or 255,
   ``frame_index`` int64 (N,) = the frames.zarr row, ``offsets`` int64 (N + 1)), written per scene
   and committed like the other stores, so a killed run redoes at most the scenes not done and 2D
   training never runs the 3D network again.
2. Two 2D networks on the training frames (scenes of the evaluation split are never trained on),
   same seed, data order and schedule: the baseline (PSPNet-style, no 3D branch) and the distilled
   network (with the simulated-3D branch, DN1 / DN2, the L2 loss on covered pixels and, for the
   ``unpaired_fraction`` of frames treated as having no 3D data, the semantic-aware adversarial
   loss); see :mod:`train.distill2d_net`.
3. Evaluation: ScanNet-20 2D mIoU of both on the held-out frames (``eval_split``, read directly
   with the dataset's reader: frames.zarr holds only the training split) against the ground-truth
   2D label images, and the measured inference time of both.

Run folder ``<workdir>/runs/distill2d/<run_name>/``: ``run.json``, ``metrics.csv``,
``checkpoint.pt`` (latest, atomic; resumable), ``baseline.pt``, ``model.pt`` (the distilled 2D
network), ``eval.json``.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from lift3d.classmaps import scannet20_names
from lift3d.config import sha256_json, workdir as get_workdir
from lift3d.stages import groups
from lift3d.store import GroupWriter, PartWriter, StoreError, group_state, open_group, stage_lock, store_path
from pipeline.eval_teacher import confusion, default_labels, scores, to_grid
from pipeline.reader_common import read_split
from pipeline.readers import Frame, make_reader
from pipeline.scannet_labels import IGNORE_INDEX, nyu40_to_scannet20, read_labelled_mesh
from train.pretrain import _read_json, _save_json, _torch_save, _write_atomic, run_status
from train.pretrain import _write_metrics as _write_csv
from train.distill2d_net import Discriminators, Seg2D, gan_losses, masked_l2, sample_pixels, set_requires_grad

log = logging.getLogger("lift3d")

NUM_CLASSES = 20
LABELLED_KINDS = ("scannet", "synthetic")
BOOKKEEPING = ("checkpoint_every", "run_name", "device")
PHASES = ("baseline", "distilled")


class DistillError(ValueError):
    """A distill2d input (3D checkpoint, dataset, setting) is unusable; the message names it."""


# ----------------------------------------------------------------------------- 3D checkpoint

def resolve_checkpoint(cfg: dict) -> Path:
    """The 3D network's model.pt: ``distill2d.checkpoint`` (a run folder or a file), or, when it is
    null, the finetune run of the current configuration (which must be complete)."""
    ck = cfg["distill2d"].get("checkpoint")
    if ck is None:
        try:
            from train import finetune
        except ModuleNotFoundError as exc:
            if exc.name != "train.finetune":
                raise
            raise StoreError("distill2d.checkpoint is null (= the fine-tuned 3D network of this config), but the "
                             "finetune stage is not built in this version; set distill2d.checkpoint to a 3D run "
                             "folder or model.pt") from None
        state, why = finetune.status(cfg)
        if state != "done":
            raise StoreError(f"distill2d distils the fine-tuned 3D network of this config "
                             f"(distill2d.checkpoint: null), but finetune is {state} ({'; '.join(why)}): run "
                             f"'lift3d run finetune' first, or set distill2d.checkpoint to a run folder or model.pt")
        return Path(finetune.run_dir(cfg)) / "model.pt"
    p = Path(str(ck)).expanduser()
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise FileNotFoundError(f"distill2d.checkpoint: {p} not found (expected a 3D run folder holding model.pt, "
                                f"or a model.pt file)")
    return p


def load_3d(path: Path, cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The frozen 3D network of a lift3d model.pt (eval mode) and (model_name, channels, voxel_size, sha256).

    A file that is not such a dict, names a model that is not a Res16UNet, has ``in_channels`` != 3
    (colours are the input) or whose weights do not fit the named network is refused, naming the file."""
    from lift3d.backbones import sha256_path
    from train.models import MODELS, build_model

    path = Path(path)
    what = ("a lift3d 3D model file (torch.save dict with 'model' = a Res16UNet state dict, 'model_name', "
            "'in_channels', 'out_channels'), as finetune and pretrain write")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DistillError(f"distill2d.checkpoint {path}: cannot read it: {type(exc).__name__}: {exc}; expected {what}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "model_name" not in obj:
        raise DistillError(f"distill2d.checkpoint {path}: not {what}")
    name = obj["model_name"]
    if name not in MODELS:
        raise DistillError(f"distill2d.checkpoint {path}: model_name {name!r} is not a Res16UNet "
                           f"(known: {', '.join(sorted(MODELS))})")
    cin, cout = obj.get("in_channels"), obj.get("out_channels")
    if cin != 3:
        raise DistillError(f"distill2d.checkpoint {path}: in_channels is {cin!r}; the 3D network must take "
                           f"3 colour channels (the mesh's vertex colours)")
    if not isinstance(cout, int) or cout <= 0:
        raise DistillError(f"distill2d.checkpoint {path}: out_channels is {cout!r}, expected a positive integer")
    net = build_model(name, 3, cout)
    try:
        net.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DistillError(f"distill2d.checkpoint {path}: its weights do not fit {name}(3, {cout}) (channels or "
                           f"layers differ): {' '.join(first[:3])[:400]}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    vs = cfg["distill2d"].get("voxel_size") or obj.get("voxel_size") or cfg["pretrain"]["voxel_size"]
    return net, {"model_name": name, "channels": int(net.decoder_dim), "voxel_size": float(vs),
                 "sha256": sha256_path(path), "path": str(path)}


# ----------------------------------------------------------------------------- geometry

def project_points(xyz: np.ndarray, pose: np.ndarray, intrinsics, depth_m: np.ndarray, tolerance: float
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
    cam = (xyz.astype(np.float64) - t) @ R            # rows: R^T (x - t)
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
    order = np.lexsort((zf, flat))                     # by pixel, then nearest first
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
    import MinkowskiEngine as ME

    coords = torch.from_numpy(np.floor(xyz.astype(np.float64) / voxel_size).astype(np.int32))
    bc = ME.utils.batched_coordinates([coords])            # (V, 4): batch 0, x, y, z
    index, inverse = ME.utils.sparse_quantize(bc, return_index=True, return_inverse=True, return_maps_only=True)
    index, inverse = torch.as_tensor(index).long().cpu(), torch.as_tensor(inverse).long().cpu()
    feats = torch.from_numpy(rgb.astype(np.float32) / 255.0 - 0.5)[index]
    x = ME.SparseTensor(feats.to(device), coordinates=bc[index].to(device))
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
    train_rows: np.ndarray     # frames.zarr rows trained on (scenes outside the evaluation split)
    eval_scenes: list[str]
    hw: tuple[int, int]


def open_sources(cfg: dict) -> list[Source]:
    wd = get_workdir(cfg)
    split = cfg["distill2d"]["eval_split"]
    out = []
    for g in groups(cfg, "frames"):
        entry = g.config["dataset"]
        if entry["kind"] not in LABELLED_KINDS:
            log.info("distill2d: dataset %s (kind %s) has no labelled meshes / 2D labels; not used",
                     entry["name"], entry["kind"])
            continue
        fr = open_group(wd, "frames", g.path, expect_lineage=g.lineage_sha256)
        reader = make_reader(entry, wd)
        root = Path(reader.root)
        eval_scenes = read_split(root / f"scannetv2_{split}.txt", split)
        scenes = list(fr.attrs["scenes"])
        scene_index = fr["scene_index"][...]
        held = np.array([scenes[s] in set(eval_scenes) for s in scene_index], bool)
        if held.any():
            log.info("distill2d: %d frames of %s belong to %s scenes; not trained on", int(held.sum()),
                     entry["name"], split)
        if not bool((fr["projection"][...] == 0).all()):
            raise DistillError(f"dataset {entry['name']}: distill2d needs pinhole frames")
        out.append(Source(entry, str(store_path(wd, "frames") / g.path), g.lineage_sha256, g.config_sha256, root,
                          scenes, np.flatnonzero(~held), eval_scenes, tuple(int(x) for x in fr["rgb"].shape[1:3])))
    if not out:
        raise DistillError(f"distill2d needs a dataset of kind {' or '.join(LABELLED_KINDS)} (labelled meshes and "
                           f"2D label images); configured: {', '.join(d['kind'] for d in cfg['datasets'])}")
    if len({s.hw for s in out}) > 1:
        raise DistillError(f"distill2d: datasets have different stored sizes {[s.hw for s in out]}; set image_size")
    if sum(len(s.train_rows) for s in out) == 0:
        raise DistillError("distill2d: no training frames outside the evaluation split")
    return out


# ----------------------------------------------------------------------------- the 3D feature cache

def cache_config(d: dict, info: dict) -> dict:
    return {"checkpoint_sha256": info["sha256"], "model_name": info["model_name"],
            "voxel_size": info["voxel_size"], "depth_tolerance": float(d["depth_tolerance"])}


def cache_store(cc: dict) -> str:
    return f"runs/distill2d/features3d-{sha256_json(cc)[:10]}"


def cache_writer(wd: Path, src: Source, cc: dict) -> GroupWriter:
    return GroupWriter(wd, cache_store(cc), src.entry["name"], {"stage": cc, "dataset": src.entry},
                       upstream_sha256=src.frames_config_sha256, upstream_lineage=src.frames_lineage)


def build_cache(cfg: dict, sources: list[Source], ck_path: Path) -> dict:
    """Make (or reuse) the 3D feature cache of every source; returns {dataset: group path}."""
    wd = get_workdir(cfg)
    d = cfg["distill2d"]
    net, info = load_3d(ck_path, cfg)    # the cache's identity needs the checkpoint's voxel size
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
        gw.commit(train_scenes, {"scenes": train_scenes, "channels": info["channels"],
                                 "checkpoint": info["path"]}, ragged=("feats", "pixel", "label3d"))
    log.info("distill2d: 3D feature cache ready (%d scenes computed now)", made)
    return out


def _cache_scene(net, info, d, src: Source, fr, scene: str, rows: np.ndarray, part: Path, device) -> None:
    xyz, rgb, nyu40 = read_labelled_mesh(src.root / "scans" / scene)
    lab = nyu40_to_scannet20(nyu40, IGNORE_INDEX).astype(np.uint8)
    vf = vertex_features(net, xyz, rgb, info["voxel_size"], device).astype(np.float16)
    C = vf.shape[1]
    pw = PartWriter(part, chunk_rows={"feats": 4096, "pixel": 4096, "label3d": 4096, "counts": 4096,
                                      "frame_index": 4096})
    covered = 0
    for r in rows:
        depth = fr["depth"][int(r)].astype(np.float64) / 1000.0
        idx, pix = project_points(xyz, fr["pose"][int(r)], fr["intrinsics"][int(r)], depth,
                                  float(d["depth_tolerance"]))
        pw.append(feats=vf[idx], pixel=pix, label3d=lab[idx], counts=np.array([len(idx)], np.int64),
                  frame_index=np.array([int(r)], np.int64))
        covered += len(idx)
    pw.finish({"feats": ((C,), np.float16), "pixel": ((2,), np.int32), "label3d": ((), np.uint8),
               "counts": ((), np.int64), "frame_index": ((), np.int64)}, scene=scene, covered=covered,
              vertices=int(len(xyz)))


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
        self.memory: dict[int, tuple] = {}      # frames already read, up to MEMORY_BYTES
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


# ----------------------------------------------------------------------------- training data

class TrainData:
    """The training frames of all sources, their 2D labels and cached 3D features.

    Batch b is a pure function of (seed, b): epoch e is a seeded permutation of all frames, the
    stream of epochs is cut into batches; each frame is flipped horizontally with probability 1/2
    (seeded by (seed, b, k)); ``unpaired`` frames (a seeded ``unpaired_fraction`` of them) never
    show their 3D features to the L2 loss. The L2 loss sees at most ``l2_pixels`` covered pixels of
    a frame per step (a seeded random subset; null = all)."""

    def __init__(self, cfg: dict, sources: list[Source], caches: dict | None):
        d = cfg["distill2d"]
        self.sources = sources
        self.seed = int(d["seed"])
        self.batch_size = int(d["batch_size"])
        self.flip = bool(d["flip"])
        self.l2_pixels = None if d.get("l2_pixels") is None else int(d["l2_pixels"])
        self.items = [(si, int(r)) for si, s in enumerate(sources) for r in s.train_rows]
        n = len(self.items)
        n_unp = int(round(float(d["unpaired_fraction"]) * n))
        rng = np.random.default_rng([self.seed, 0xD157])
        self.unpaired = np.zeros(n, bool)
        self.unpaired[rng.permutation(n)[:n_unp]] = True
        self.frames = [zarr.open_group(s.frames_path, mode="r") for s in sources]
        self.labels = [default_labels(s.entry, get_workdir(cfg)) for s in sources]
        for s, lab in zip(sources, self.labels):
            if lab is None:
                raise DistillError(f"dataset {s.entry['name']}: no 2D label images under {s.root}/scans")
        self.caches = [Cache3D(caches[s.entry["name"]][0]) for s in sources] if caches else None
        self.hw = sources[0].hw
        self._gt: dict[int, np.ndarray] = {}

    def __len__(self):
        return len(self.items)

    def gt(self, k: int) -> np.ndarray:
        """ScanNet-20 labels (H, W) int64 of item k, IGNORE_INDEX (255) where unlabelled."""
        if k not in self._gt:
            si, row = self.items[k]
            fr = self.frames[si]
            scene = self.sources[si].scenes[int(fr["scene_index"][row])]
            raw = self.labels[si](scene, int(fr["source_index"][row]))
            if raw is None:
                lab = np.full(self.hw, IGNORE_INDEX, np.int64)
            else:
                lab = to_grid(np.asarray(raw), *self.hw).astype(np.int64)
                lab[(lab < 0) | (lab >= NUM_CLASSES)] = IGNORE_INDEX
            if len(self._gt) < 4096:
                self._gt[k] = lab
            return lab
        return self._gt[k]

    def batch_items(self, b: int) -> list[int]:
        n, B = len(self.items), self.batch_size
        out = []
        for pos in range(b * B, (b + 1) * B):
            epoch, i = divmod(pos, n)
            out.append(int(np.random.default_rng([self.seed, epoch, 0xE90C]).permutation(n)[i]))
        return out

    def batch(self, b: int, with_3d: bool) -> dict:
        ks = self.batch_items(b)
        H, W = self.hw
        rgb, lab, flips = [], [], []
        pf, pp, pv, pl = [], [], [], []
        for j, k in enumerate(ks):
            si, row = self.items[k]
            img = self.frames[si]["rgb"][row]
            gt = self.gt(k)
            flip = self.flip and bool(np.random.default_rng([self.seed, b, j, 0xF11]).random() < 0.5)
            if flip:
                img, gt = img[:, ::-1], gt[:, ::-1]
            rgb.append(np.ascontiguousarray(img))
            lab.append(np.ascontiguousarray(gt))
            flips.append(flip)
            if with_3d and not self.unpaired[k]:
                f, p, l3 = self.caches[si].frame(row)
                if self.l2_pixels is not None and len(p) > self.l2_pixels:
                    keep = np.sort(np.random.default_rng([self.seed, b, j, 0x12]).choice(len(p), self.l2_pixels,
                                                                                         replace=False))
                    f, p, l3 = f[keep], p[keep], l3[keep]
                p = p.astype(np.int64)
                if flip:
                    p = np.stack([p[:, 0], W - 1 - p[:, 1]], 1)
                pf.append(np.full(len(p), j, np.int64))
                pp.append(p)
                pv.append(f.astype(np.float32))
                pl.append(l3.astype(np.int64))
        out = {"items": ks, "rgb": torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float(),
               "labels": torch.from_numpy(np.stack(lab)), "flips": flips,
               "unpaired": [bool(self.unpaired[k]) for k in ks]}
        if with_3d:
            C = self.caches[0].channels
            out["pair_frame"] = torch.from_numpy(np.concatenate(pf)) if pf else torch.zeros(0, dtype=torch.long)
            out["pair_pixel"] = torch.from_numpy(np.concatenate(pp)) if pp else torch.zeros((0, 2), dtype=torch.long)
            out["pair_feat"] = torch.from_numpy(np.concatenate(pv)) if pv else torch.zeros((0, C))
            out["pair_label"] = torch.from_numpy(np.concatenate(pl)) if pl else torch.zeros(0, dtype=torch.long)
        return out

    def real_bank(self, b: int, per_class: int) -> dict[int, torch.Tensor]:
        """Real 3D features by category for the discriminators: from two seeded-random paired
        frames (any frames, not the batch's: the unpaired setting has no correspondence)."""
        paired = np.flatnonzero(~self.unpaired)
        if len(paired) == 0:
            return {}
        rng = np.random.default_rng([self.seed, b, 0xBA4C])
        feats, labs = [], []
        for k in rng.choice(paired, size=min(2, len(paired)), replace=False):
            si, row = self.items[int(k)]
            f, _, l3 = self.caches[si].frame(row)
            feats.append(f.astype(np.float32))
            labs.append(l3.astype(np.int64))
        f, l3 = np.concatenate(feats), np.concatenate(labs)
        out = {}
        for c in np.unique(l3):
            if c >= NUM_CLASSES:
                continue
            rows = np.flatnonzero(l3 == c)
            rows = rng.choice(rows, size=min(per_class, len(rows)), replace=False)
            out[int(c)] = torch.from_numpy(f[rows])
        return out


# ----------------------------------------------------------------------------- model building

def _device(d: dict) -> torch.device:
    name = d.get("device")
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_backbone(d: dict):
    from lift3d import backbones

    if d["backbone"] == "efficientnet_lite0":
        return backbones.efficientnet_lite0(weights_path=d.get("backbone_weights"))
    if d["backbone"] == "resnet50":
        return backbones.resnet50(d.get("backbone_weights"))
    raise DistillError(f"distill2d.backbone must be efficientnet_lite0 or resnet50, got {d['backbone']!r}")


def build_net(d: dict, distilled: bool, channels_3d: int | None = None, mean_3d=None, std_3d=None) -> Seg2D:
    torch.manual_seed(int(d["seed"]))
    bb = make_backbone(d)
    ts = int(d["backbone_train_stages"])
    ts = None if ts < 0 else ts
    if not distilled:
        return Seg2D(bb, NUM_CLASSES, int(d["head_dim"]), train_stages=ts)
    return Seg2D(bb, NUM_CLASSES, int(d["head_dim"]), channels_3d, mean_3d, std_3d, train_stages=ts)


def make_optimizer(d: dict, net: Seg2D) -> torch.optim.Optimizer:
    """SGD with momentum; the new layers at ``head_lr_mult`` times the backbone's rate (PSPNet: 10)."""
    head = net.head_parameters()
    ids = {id(p) for p in head}
    trunk = [p for p in net.parameters() if id(p) not in ids and p.requires_grad]
    lr = float(d["lr"])
    return torch.optim.SGD([{"params": trunk, "lr": lr, "mult": 1.0},
                            {"params": head, "lr": lr * float(d["head_lr_mult"]), "mult": float(d["head_lr_mult"])}],
                           lr=lr, momentum=float(d["momentum"]), weight_decay=float(d["weight_decay"]))


def poly_lr(d: dict, step: int) -> float:
    total = max(1, int(d["iterations"]))
    return float(d["lr"]) * (1.0 - min(step, total) / total) ** 0.9


# ----------------------------------------------------------------------------- one step

def generator_step(net: Seg2D, disc: Discriminators | None, opt, batch: dict, d: dict, hw, fake_rng=None,
                   real: dict | None = None) -> tuple[dict, dict]:
    """One update of the 2D network (the discriminators frozen). Returns (loss parts, fake features
    by category for the discriminator step; detached)."""
    if disc is not None:
        set_requires_grad(disc, False)
    opt.zero_grad(set_to_none=True)
    out = net(batch["rgb"])
    logits = F.interpolate(out["logits"], size=tuple(hw), mode="bilinear", align_corners=False)
    seg = F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)
    parts = {"seg": seg}
    loss = float(d["loss_seg"]) * seg
    fake = {}
    if net.distilled:
        l2 = masked_l2(out["f3d_sim"], batch["pair_frame"], batch["pair_pixel"], batch["pair_feat"], hw)
        parts["l2"] = l2
        loss = loss + float(d["loss_l2"]) * l2
        if disc is not None and any(batch["unpaired"]):
            fake = fake_features(out["f3d_sim"], batch, int(d["disc_samples"]), hw, fake_rng)
            adv = gan_losses(disc, fake, real or {}, for_generator=True)
            parts["adv"] = adv
            loss = loss + float(d["loss_adv"]) * adv
    parts["loss"] = loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"distill2d: loss is {loss.item()}")
    loss.backward()
    opt.step()
    if disc is not None:
        set_requires_grad(disc, True)
    return {k: float(v.detach()) for k, v in parts.items()}, {c: f.detach() for c, f in fake.items()}


def discriminator_step(disc: Discriminators, opt_d, fake: dict, real: dict) -> float:
    """One update of the per-category discriminators on detached simulated (fake) and real 3D features."""
    opt_d.zero_grad(set_to_none=True)
    loss = gan_losses(disc, fake, real, for_generator=False)
    loss.backward()
    opt_d.step()
    return float(loss.detach())


def fake_features(f3d_sim: torch.Tensor, batch: dict, per_class: int, hw, rng) -> dict[int, torch.Tensor]:
    """Simulated 3D features of the unpaired frames at up to ``per_class`` pixels per 2D category."""
    labels = batch["labels"]
    out = {}
    frames = [j for j, u in enumerate(batch["unpaired"]) if u]
    lab = labels[frames]                                    # (U, H, W)
    for c in torch.unique(lab).tolist():
        if c >= NUM_CLASSES:
            continue
        where = torch.nonzero(lab == c)                     # (n, 3): u, row, col
        pick = torch.from_numpy(rng.choice(len(where), size=min(per_class, len(where)), replace=False))
        w = where[pick]
        fidx = torch.tensor(frames, dtype=torch.long)[w[:, 0]]
        out[int(c)] = sample_pixels(f3d_sim, fidx, w[:, 1:], hw)
    return out


# ----------------------------------------------------------------------------- identity and status

def identity(cfg: dict) -> dict:
    d = {k: v for k, v in cfg["distill2d"].items() if k not in BOOKKEEPING}
    return {"distill2d": d, "datasets": cfg["datasets"]}


def run_dir(cfg: dict) -> Path:
    d = cfg["distill2d"]
    name = d.get("run_name") or f"{d['backbone']}-{sha256_json(identity(cfg))[:10]}"
    return get_workdir(cfg) / "runs" / "distill2d" / name


def upstream(cfg: dict, ck_path: Path) -> dict:
    from lift3d.backbones import sha256_path

    out = {f"frames.zarr/{g.path}": g.lineage_sha256 for g in groups(cfg, "frames")}
    out["checkpoint_sha256"] = sha256_path(ck_path)
    return out


def status(cfg: dict) -> tuple[str, list[str]]:
    d = run_dir(cfg)
    where = f"runs/distill2d/{d.name}"
    try:
        ck = resolve_checkpoint(cfg)
    except (StoreError, FileNotFoundError) as exc:
        return ("missing" if not d.exists() else "out of date"), [str(exc)]
    wd = get_workdir(cfg)
    reasons = []
    for g in groups(cfg, "frames"):
        attrs = group_state(wd, "frames", g.path)
        if attrs is None or not attrs.get("complete") or attrs.get("lineage_sha256") != g.lineage_sha256:
            reasons.append(f"frames.zarr/{g.path} is missing or out of date: run 'lift3d run frames'")
    state, why, _ = run_status(d, where, reasons,
                               (upstream(cfg, ck), "was made from another 3D checkpoint or other frames"))
    if state != "done":
        return state, why
    ev = _read_json(d / "eval.json") or {}
    return "done", [f"{where} complete: 2D mIoU baseline {_pct(ev, 'baseline')}, distilled {_pct(ev, 'distilled')}"]


def _pct(ev: dict, k: str) -> str:
    v = (ev.get(k) or {}).get("miou")
    return "n/a" if v is None else f"{100 * v:.1f} %"


def summary(cfg: dict) -> dict | None:
    """For the demo's verdict table: the finished run's eval.json figures, or None when not done.
    {"2D mIoU baseline", "2D mIoU distilled", "2D mIoU gain", "extra_inference_ms_per_frame", "run_dir"}."""
    ev = _read_json(run_dir(cfg) / "eval.json")
    if not ev:
        return None
    b, t = ev["baseline"]["miou"], ev["distilled"]["miou"]
    return {"2D mIoU baseline": b, "2D mIoU distilled": t,
            "2D mIoU gain": None if b is None or t is None else t - b,
            "extra_inference_ms_per_frame": ev.get("extra_inference_ms_per_frame"), "run_dir": str(run_dir(cfg))}


# ----------------------------------------------------------------------------- training

FIELDS = ["phase", "step", "loss", "seg", "l2", "adv", "disc", "lr", "time"]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def train_phase(cfg: dict, phase: str, data: TrainData, run: Path, ident: str, up: dict, stats=None,
                stop_at: int | None = None) -> tuple[Seg2D | None, list[dict]]:
    """Train (or resume) one network. Returns (the network, or None when stopped early; its rows)."""
    d = cfg["distill2d"]
    distilled = phase == "distilled"
    total = int(d["iterations"])
    hw = data.hw
    if distilled:
        net = build_net(d, True, data.caches[0].channels, stats[0], stats[1])
    else:
        net = build_net(d, False)
    opt = make_optimizer(d, net)
    adversarial = distilled and bool(data.unpaired.any())
    disc = opt_d = None
    if adversarial:
        torch.manual_seed(int(d["seed"]) + 1)
        disc = Discriminators(net.channels_3d, NUM_CLASSES, int(d["disc_hidden"]))
        opt_d = torch.optim.Adam(disc.parameters(), lr=float(d["disc_lr"]), betas=(0.5, 0.999))
    ck = run / "checkpoint.pt"
    start = 0
    if ck.exists():
        st = torch.load(ck, map_location="cpu", weights_only=False)
        if st.get("identity") == ident and st.get("phase") == phase:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            if disc is not None:
                disc.load_state_dict(st["disc"])
                opt_d.load_state_dict(st["optimizer_d"])
            torch.set_rng_state(st["rng"])
            start = int(st["step"])
    rows = [r for r in _rows(run / "metrics.csv") if r["phase"] == phase and int(r["step"]) < start]
    end = total if stop_at is None else min(total, stop_at)
    every = max(1, int(d["checkpoint_every"]))
    device = _device(d)
    net.to(device)
    if disc is not None:
        disc.to(device)
    net.train()
    t0 = time.perf_counter()
    step = start
    for step in range(start, end):
        lr = poly_lr(d, step)
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        batch = data.batch(step, distilled)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        real = {c: f.to(device) for c, f in data.real_bank(step, int(d["disc_samples"])).items()} if adversarial else None
        parts, fake = generator_step(net, disc, opt, batch, d, hw, np.random.default_rng([int(d["seed"]), step, 0xFA4E]),
                                     real)
        dl = discriminator_step(disc, opt_d, fake, real) if adversarial and fake else None
        rows.append({"phase": phase, "step": step, "loss": f"{parts['loss']:.6f}", "seg": f"{parts['seg']:.6f}",
                     "l2": f"{parts['l2']:.6f}" if "l2" in parts else "",
                     "adv": f"{parts['adv']:.6f}" if "adv" in parts else "",
                     "disc": f"{dl:.6f}" if dl is not None else "", "lr": f"{lr:.6g}",
                     "time": f"{time.perf_counter() - t0:.3f}"})
        done = step + 1
        if done % every == 0 or done == end:
            state = {"phase": phase, "step": done, "identity": ident, "model": net.state_dict(),
                     "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
            if disc is not None:
                state.update(disc=disc.state_dict(), optimizer_d=opt_d.state_dict())
            _write_atomic(ck, lambda t: _torch_save(state, t))
            _write_metrics(run, phase, rows)
            _save_json(run / "run.json", _run_info(cfg, ident, up, phase, done, False))
        if step % 20 == 0:
            log.info("distill2d %s step %d/%d loss %s", phase, step, total, rows[-1]["loss"])
    _write_metrics(run, phase, rows)
    if end < total:
        return None, rows
    return net.to("cpu").eval(), rows


def _write_metrics(run: Path, phase: str, rows: list[dict]) -> None:
    keep = [r for r in _rows(run / "metrics.csv") if r["phase"] != phase]

    _write_atomic(run / "metrics.csv", lambda t: _write_csv(t, keep + rows, FIELDS))


def _run_info(cfg, ident, up, phase, step, complete) -> dict:
    return {"config": cfg, "identity_sha256": ident, "upstream": up, "phase": phase,
            "step": step, "steps": int(cfg["distill2d"]["iterations"]), "complete": complete}


def save_net(path: Path, net: Seg2D, d: dict, extra: dict) -> None:
    obj = {"model": net.state_dict(), "backbone": d["backbone"], "num_classes": NUM_CLASSES,
           "head_dim": int(d["head_dim"]), "distilled": net.distilled,
           "channels_3d": getattr(net, "channels_3d", None), "classes": scannet20_names(), **extra}
    _write_atomic(path, lambda t: _torch_save(obj, t))


def load_net(path: Path, d: dict) -> Seg2D:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if obj["distilled"]:
        c = obj["channels_3d"]
        net = build_net(d, True, c, torch.zeros(c), torch.ones(c))
    else:
        net = build_net(d, False)
    net.load_state_dict(obj["model"])
    return net.eval()


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: dict, sources: list[Source], nets: dict[str, Seg2D]) -> dict:
    """2D mIoU (ScanNet-20) of each network on the frames of the evaluation split, read with the
    dataset's reader, against the 2D label images; and each network's CPU/GPU time per frame."""
    d = cfg["distill2d"]
    wd = get_workdir(cfg)
    names = scannet20_names()
    conf = {k: np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64) for k in nets}
    times = {k: [] for k in nets}
    n_frames = 0
    device = _device(d)
    for net in nets.values():
        net.to(device).eval()
    for src in sources:
        entry = {**src.entry, "split": d["eval_split"]}
        reader = make_reader(entry, wd)
        reader.prepare()
        labels = default_labels(entry, wd)
        if labels is None:
            raise DistillError(f"dataset {entry['name']}: no 2D label images under {reader.root}/scans")
        try:
            for scene in reader.scenes():
                for fr in reader.frames(scene, int(entry.get("frame_skip") or 1)):
                    if not isinstance(fr, Frame):
                        continue
                    gt = labels(scene, fr.source_index)
                    if gt is None:
                        continue
                    H, W = fr.rgb.shape[:2]
                    gt = to_grid(np.asarray(gt), H, W).astype(np.int64)
                    x = torch.from_numpy(np.ascontiguousarray(fr.rgb)).permute(2, 0, 1)[None].float().to(device)
                    for k, net in nets.items():
                        with torch.no_grad():
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            t = time.perf_counter()
                            logits = net(x)["logits"]
                            pred = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False).argmax(1)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            times[k].append(time.perf_counter() - t)
                        conf[k] += confusion(gt, pred[0].cpu().numpy())
                    n_frames += 1
        finally:
            labels.close()
    if n_frames == 0:
        raise DistillError(f"distill2d: no labelled frames in split {d['eval_split']!r} to evaluate on")
    out = {}
    for k in nets:
        res = scores(conf[k], names)
        t = times[k][1:] or times[k]        # the first call warms up
        out[k] = {**res, "ms_per_frame": 1000 * float(np.median(t)), "frames": n_frames,
                  "parameters": int(sum(p.numel() for p in nets[k].parameters()))}
    return out


# ----------------------------------------------------------------------------- the stage

def train(cfg: dict, stop_at: int | None = None) -> list[dict]:
    """Run (or resume) the stage. ``stop_at`` ends after that many steps of the current phase
    without completing the run (the tests' 'kill')."""
    d = cfg["distill2d"]
    if int(d["batch_size"]) < 2:
        raise DistillError("distill2d.batch_size must be >= 2 (batch statistics in the pyramid pooling and DN)")
    if not 0.0 <= float(d["unpaired_fraction"]) < 1.0:
        raise DistillError(f"distill2d.unpaired_fraction must be in [0, 1), got {d['unpaired_fraction']}")
    sources = open_sources(cfg)
    ck_path = resolve_checkpoint(cfg)
    up = upstream(cfg, ck_path)
    ident = sha256_json(identity(cfg))
    run = run_dir(cfg)
    info = _read_json(run / "run.json")
    if info and info.get("complete") and info.get("upstream") == up:
        log.info("distill2d: %s is complete and up to date, nothing to do", run)
        return _summary_rows(run, "up to date", 0.0)
    if info and info.get("upstream") != up and run.exists():
        log.info("distill2d: %s was made from another 3D checkpoint or other frames; starting over", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    caches = build_cache(cfg, sources, ck_path)
    _save_json(run / "run.json", _run_info(cfg, ident, up, "baseline", 0, False))
    data = TrainData(cfg, sources, caches)
    nets = {}
    for phase in PHASES:
        path = run / ("baseline.pt" if phase == "baseline" else "model.pt")
        if path.exists():
            nets[phase] = load_net(path, d)
            continue
        stats = None
        if phase == "distilled":
            paired = [data.items[k] for k in np.flatnonzero(~data.unpaired)]
            mean, std, n = _stats(data, paired)
            stats = (mean, std)
        net, _ = train_phase(cfg, phase, data, run, ident, up, stats, stop_at)
        if net is None:
            return _summary_rows(run, "stopped", time.perf_counter() - t0)
        extra = {"steps": int(d["iterations"])}
        if phase == "distilled":
            extra.update(mean_3d=stats[0].tolist(), std_3d=stats[1].tolist(), checkpoint_3d=str(ck_path))
        save_net(path, net, d, extra)
        nets[phase] = net
    res = evaluate(cfg, sources, nets)
    ev = {**res, "extra_inference_ms_per_frame": res["distilled"]["ms_per_frame"] - res["baseline"]["ms_per_frame"],
          "miou_gain": (None if res["baseline"]["miou"] is None or res["distilled"]["miou"] is None
                        else res["distilled"]["miou"] - res["baseline"]["miou"]),
          "eval_split": d["eval_split"], "datasets": ",".join(s.entry["name"] for s in sources),
          "device": str(_device(d)), "threads": torch.get_num_threads(),
          "train_frames": len(data), "unpaired_frames": int(data.unpaired.sum()),
          "checkpoint_3d": str(ck_path)}
    _save_json(run / "eval.json", ev)
    _save_json(run / "run.json", _run_info(cfg, ident, up, "distilled", int(d["iterations"]), True))
    (run / "checkpoint.pt").unlink(missing_ok=True)
    return _summary_rows(run, "trained", time.perf_counter() - t0)


def _stats(data: TrainData, items) -> tuple[np.ndarray, np.ndarray, int]:
    s = np.zeros(data.caches[0].channels)
    s2 = np.zeros_like(s)
    n = 0
    for si, row in items:
        f = data.caches[si].frame(row)[0].astype(np.float64)
        s += f.sum(0)
        s2 += (f * f).sum(0)
        n += len(f)
    if n == 0:
        raise DistillError("distill2d: no covered pixel in any paired training frame (the 3D points do not project "
                           "into the frames: check poses, intrinsics and distill2d.depth_tolerance)")
    mean = s / n
    return mean, np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12)), n


def _summary_rows(run: Path, status_: str, seconds: float) -> list[dict]:
    ev = _read_json(run / "eval.json") or {}
    rows = _rows(run / "metrics.csv")
    out = []
    for phase in PHASES:
        r = [x for x in rows if x["phase"] == phase]
        last = [float(x["loss"]) for x in r[-10:]]
        e = ev.get(phase) or {}
        out.append({"dataset": ev.get("datasets", ""), "network": phase, "status": status_, "steps": len(r),
                    "final_loss": round(float(np.mean(last)), 4) if last else None,
                    "miou_2d": None if e.get("miou") is None else round(100 * e["miou"], 2),
                    "pixel_acc": None if e.get("pixel_accuracy") is None else round(100 * e["pixel_accuracy"], 2),
                    "ms_per_frame": None if e.get("ms_per_frame") is None else round(e["ms_per_frame"], 2),
                    "seconds": round(seconds, 1), "run_dir": str(run)})
    return out


def run(cfg: dict) -> list[dict]:
    """Run the distill2d stage: one summary row for the baseline, one for the distilled network."""
    with stage_lock(get_workdir(cfg), "distill2d"):
        return train(cfg)


__all__ = ["run", "status", "train", "run_dir", "identity", "summary", "project_points", "vertex_features",
           "load_3d", "resolve_checkpoint", "TrainData", "generator_step", "discriminator_step", "evaluate",
           "DistillError"]
