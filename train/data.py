"""Streaming pretraining data over the stores: frames.zarr (poses), teacher.zarr (cached 2D
features / soft labels) and points.zarr (lifted points with their pixels).

Nothing here runs a 2D network, and no store is ever loaded whole: a frame is read as its own
rows (points ``offsets[i]:offsets[i+1]``, ``features[i]``, ``soft_labels/*[i]``, ``pose[i]``).

Order. Frames of every configured dataset form one global list. Each epoch (seeded by
``seed`` and the epoch number) the list is cut into blocks of ``shuffle_block`` consecutive
frames (which share Zarr chunks of the ragged points arrays), the blocks are permuted, groups of
``shuffle_mix`` permuted blocks are pooled and shuffled frame-wise, and the stream is cut into
batches (the last incomplete batch of an epoch is dropped). Batch b of the stream is a pure
function of (seed, b): DataLoader workers take batches b = worker, worker + n_workers, ...
(the DataLoader returns them round-robin, i.e. in stream order), and a resumed run starts at
its step, so any number of workers and any kill/resume give the same batches.

Data-parallel sharding (``rank``, ``world`` > 1, one process per GPU under torchrun): global
batch b is the same ``batch_size`` frames for any process count; rank r takes its contiguous
slice, frames ``r * B / W`` to ``(r + 1) * B / W - 1`` of the batch (B must be a multiple of W).
With W > 1 each frame's 3D augmentation is drawn from its own generator seeded by
(seed, b, slot in the global batch), so a frame is augmented the same way for any W > 1; the
single-process stream (W = 1) keeps its one generator per batch.

2D flip (``pretrain.augment.flip_2d``, only with a teacher flip pass, ``teacher.flip_pass``):
each frame of global batch b is flipped with probability 0.5, decided by a generator seeded by
(seed, b) alone (the same decisions for any W, and no draw taken from the 3D augmentation's
generator). A flipped frame uses the cached ``*_flip`` teacher arrays (the teacher's output on
``rgb[:, :, ::-1]``, in the flipped image's own cell grid), each point's pixel column c becomes
W - 1 - c, and its camera-frame point is mirrored x -> -x: that is exactly the point the flipped
pinhole camera (cx' = W - 1 - cx) or panorama (longitude u -> -u) sees at the flipped pixel.
The pose becomes diag(-1, 1, 1) R diag(-1, 1, 1) (translation diag(-1, 1, 1) t), the pose of the
flipped camera in the world mirrored about its x = 0 plane, so in the gravity / world frames the
flipped frame's cloud is the mirror image of the original about a vertical plane and z stays up
(keeping the original pose would tilt the floor whenever the camera has roll).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import MinkowskiEngine as ME
import numpy as np
import torch
import zarr

from lift3d.core.config import workdir as get_workdir
from lift3d.core.graph import groups
from lift3d.core.store import StoreError, open_group, store_path
from lift3d.nets.heads import sample_soft_labels
from lift3d.train.augment import augment_points

log = logging.getLogger("lift3d")

FRAMES = ("gravity", "camera", "world")
MIRROR = np.diag([-1.0, 1.0, 1.0])
METHODS = ("ppnce", "soft_ce", "ppkd")


@dataclass
class Source:
    """One dataset's three verified groups (paths; opened lazily in each worker)."""

    name: str
    frames_path: str
    teacher_path: str
    points_path: str
    n_frames: int
    image_hw: tuple[int, int]
    lineages: dict = field(default_factory=dict)
    classes: int = 0
    flip_pass: bool = False  # the teacher group holds the *_flip arrays (teacher.flip_pass)
    ignore_class: int | None = None  # a teacher class soft labels leave out (a folded "other" bin)


def open_sources(cfg: dict) -> list[Source]:
    """Verify the frames / teacher / points groups of every configured dataset.

    Each group is opened with the lineage the current configuration expects
    (:func:`lift3d.core.graph.groups`), so a missing, incomplete or stale cache is refused with a
    message naming the stage to re-run; the three groups must agree on the frame count.
    """
    wd = get_workdir(cfg)
    out = []
    per_stage = {s: groups(cfg, s) for s in ("frames", "teacher", "points")}
    for fg, tg, pg in zip(per_stage["frames"], per_stage["teacher"], per_stage["points"]):
        fr = open_group(wd, fg.store, fg.path, fg.lineage_sha256)
        te = open_group(wd, tg.store, tg.path, tg.lineage_sha256)
        po = open_group(wd, pg.store, pg.path, pg.lineage_sha256)
        n = int(fr["pose"].shape[0])
        nt, npo = int(te["features"].shape[0]), int(po["offsets"].shape[0]) - 1
        if nt != n or npo != n:
            raise StoreError(
                f"dataset {fg.path}: frames has {n} frames, teacher {nt}, points {npo}; "
                f"re-run 'lift3d run teacher' and 'lift3d run points'"
            )
        H, W = (int(x) for x in fr["rgb"].shape[1:3])
        classes = len(te.attrs.get("classes") or [])
        flip = bool(te.attrs.get("flip_pass")) and all(
            name in te for name in ("features_flip", "soft_labels/prob_flip", "soft_labels/index_flip")
        )
        out.append(
            Source(
                fg.path,
                str(store_path(wd, "frames") / fg.path),
                str(store_path(wd, "teacher") / tg.path),
                str(store_path(wd, "points") / pg.path),
                n,
                (H, W),
                {"frames": fg.lineage_sha256, "teacher": tg.lineage_sha256, "points": pg.lineage_sha256},
                classes,
                flip,
                te.attrs.get("ignore_class"),
            )
        )
    if not out:
        raise StoreError("no datasets configured")
    return out


def to_frame(coords: np.ndarray, pose: np.ndarray, frame: str) -> np.ndarray:
    """Camera-frame points -> the training frame: ``camera`` as is, ``gravity`` rotated by the
    pose's rotation (z up, camera at the origin), ``world`` the full camera-to-world pose."""
    if frame == "camera":
        return coords
    R = pose[:3, :3].astype(np.float64)
    out = coords.astype(np.float64) @ R.T
    if frame == "world":
        out = out + pose[:3, 3].astype(np.float64)
    elif frame != "gravity":
        raise ValueError(f"pretrain.frame must be one of {FRAMES}, got {frame!r}")
    return out.astype(np.float32)


def mirror_frame(
    coords: np.ndarray, pixel: np.ndarray, pose: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame's points as seen in its horizontally flipped image (see the module docstring):
    camera-frame x -> -x, pixel (row, col) -> (row, W - 1 - col), pose (R, t) ->
    (M R M, M t) with M = diag(-1, 1, 1)."""
    c = np.array(coords, dtype=np.float32, copy=True)
    c[:, 0] = -c[:, 0]
    px = np.array(pixel, copy=True)
    px[:, 1] = int(width) - 1 - px[:, 1]
    P = np.array(pose, dtype=np.float64, copy=True)
    P[:3, :3] = MIRROR @ P[:3, :3] @ MIRROR
    P[:3, 3] = MIRROR @ P[:3, 3]
    return c, px, P.astype(np.asarray(pose).dtype)


def label_cells(pixels: np.ndarray, image_hw, cells_hw) -> tuple[np.ndarray, np.ndarray]:
    """The teacher cell covering each stored pixel (row, col): cell i covers pixel centre
    (i + 0.5) H / h - 0.5, so pixel r falls in cell floor((r + 0.5) h / H)."""
    H, W = image_hw
    h, w = cells_hw
    r = np.clip(((pixels[:, 0].astype(np.float64) + 0.5) * h / H).astype(np.int64), 0, h - 1)
    c = np.clip(((pixels[:, 1].astype(np.float64) + 0.5) * w / W).astype(np.int64), 0, w - 1)
    return r, c


def epoch_order(n_total: int, seed: int, epoch: int, block: int, mix: int) -> np.ndarray:
    """Chunk-aware shuffle of ``range(n_total)`` for one epoch (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    starts = np.arange(0, n_total, max(1, block))
    perm = rng.permutation(len(starts))
    order = []
    for g in range(0, len(perm), max(1, mix)):
        pool = np.concatenate([np.arange(s, min(s + block, n_total)) for s in starts[perm[g : g + mix]]])
        order.append(rng.permutation(pool))
    return np.concatenate(order) if order else np.zeros(0, np.int64)


class PretrainStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches (use ``DataLoader(stream, batch_size=None)``).

    ``start``: the first global batch index (the step a resumed run starts at); ``rank`` /
    ``world``: this process's slice of every batch under data-parallel training.
    """

    def __init__(
        self,
        cfg: dict,
        sources: list[Source] | None = None,
        start: int = 0,
        stop: int | None = None,
        augment: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__()
        p = cfg["pretrain"]
        self.sources = sources if sources is not None else open_sources(cfg)
        self.method = p["method"]
        if self.method not in METHODS:
            raise ValueError(f"pretrain.method must be one of {METHODS}, got {self.method!r}")
        self.frame = p.get("frame", "gravity")
        if self.frame not in FRAMES:
            raise ValueError(f"pretrain.frame must be one of {FRAMES}, got {self.frame!r}")
        self.voxel = float(p["voxel_size"])
        self.batch = int(p["batch_size"])
        self.seed = int(p["seed"])
        self.block = int(p.get("shuffle_block", 8))
        self.mix = int(p.get("shuffle_mix", 4))
        self.acfg = dict(p.get("augment") or {}) if augment else {"rotate_up": False, "scale": False, "elastic": False}
        self.color = augment and self.method in (self.acfg.get("color_methods") or [])
        self.start, self.stop = int(start), stop
        self.rank, self.world = int(rank), int(world)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of {self.world} processes")
        if self.batch % self.world:
            raise ValueError(
                f"pretrain.batch_size {self.batch} must be a multiple of the number of processes "
                f"{self.world}: each rank takes batch_size / processes frames of every batch"
            )
        # 2D flip: asked for (default on) and possible per dataset (the teacher's flip pass)
        self.flip_asked = augment and bool(self.acfg.get("flip_2d", True))
        self.flippable = [self.flip_asked and s.flip_pass for s in self.sources]
        if self.flip_asked:
            missing = [s.name for s in self.sources if not s.flip_pass]
            if missing:
                log.info(
                    "pretrain: 2D flip is OFF for %s: pretrain.augment.flip_2d is on, but the teacher cache "
                    "has no flip pass (set teacher.flip_pass: true and re-run 'lift3d run teacher'; "
                    "pretrain.augment.flip_2d: false silences this)",
                    ", ".join(missing),
                )
            if any(self.flippable):
                log.info(
                    "pretrain: 2D flip is on (p = 0.5, the teacher's cached flip pass) for %s",
                    ", ".join(s.name for s, f in zip(self.sources, self.flippable) if f),
                )
        self.cum = np.cumsum([0] + [s.n_frames for s in self.sources])
        self.n_total = int(self.cum[-1])
        if self.n_total < self.batch:
            raise StoreError(f"only {self.n_total} frames in the stores, fewer than pretrain.batch_size {self.batch}")
        self.per_epoch = self.n_total // self.batch
        self._open = None

    # -- reading ------------------------------------------------------------------------
    def _groups(self):
        if self._open is None:  # opened per process (workers), never pickled open
            self._open = []
            for s in self.sources:
                po = zarr.open_group(s.points_path, mode="r")
                self._open.append(
                    {
                        "frames": zarr.open_group(s.frames_path, mode="r"),
                        "teacher": zarr.open_group(s.teacher_path, mode="r"),
                        "points": po,
                        "offsets": po["offsets"][...],
                    }
                )
        return self._open

    def locate(self, g: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.cum, g, side="right") - 1)
        return d, int(g - self.cum[d])

    def read_frame(self, g: int, flip: bool = False) -> dict:
        """One frame's rows from the three stores (camera-frame points); ``flip``: as seen in the
        horizontally flipped image (:func:`mirror_frame` and the teacher's ``*_flip`` arrays)."""
        d, i = self.locate(g)
        grp = self._groups()[d]
        a, b = int(grp["offsets"][i]), int(grp["offsets"][i + 1])
        po, te = grp["points"], grp["teacher"]
        out = {
            "dataset": d,
            "index": i,
            "image_hw": self.sources[d].image_hw,
            "coords": po["coords"][a:b],
            "colors": po["colors"][a:b],
            "pixel": po["pixel"][a:b],
            "pose": grp["frames"]["pose"][i],
        }
        sfx = ""
        if flip:
            if not self.sources[d].flip_pass:
                raise StoreError(f"{self.sources[d].teacher_path} has no flip pass (teacher.flip_pass)")
            out["coords"], out["pixel"], out["pose"] = mirror_frame(
                out["coords"], out["pixel"], out["pose"], self.sources[d].image_hw[1]
            )
            out["flipped"], sfx = True, "_flip"
        if self.method == "ppnce":
            out["features"] = te["features" + sfx][i]
        else:
            out["prob"] = te["soft_labels/prob" + sfx][i]
            out["index_k"] = te["soft_labels/index" + sfx][i]
        return out

    # -- batches ------------------------------------------------------------------------
    def global_frames(self, b: int) -> np.ndarray:
        """The ``batch_size`` frames (global indices) of global batch ``b``."""
        epoch, j = divmod(int(b), self.per_epoch)
        order = epoch_order(self.n_total, self.seed, epoch, self.block, self.mix)
        return order[j * self.batch : (j + 1) * self.batch]

    def shard(self) -> slice:
        """This rank's slots of every global batch."""
        n = self.batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def batch_frames(self, b: int) -> np.ndarray:
        """The frames of batch ``b`` that this process reads (all of them when W = 1)."""
        return self.global_frames(b)[self.shard()]

    def flips(self, b: int, frames: np.ndarray | None = None) -> np.ndarray:
        """Flip decisions for the slots of global batch ``b`` (p = 0.5 where the frame's dataset
        has a flip pass and flip_2d is on; no generator is made otherwise)."""
        frames = self.global_frames(b) if frames is None else frames
        if not any(self.flippable):
            return np.zeros(len(frames), bool)
        draw = np.random.default_rng([self.seed, int(b), 0xF11B]).random(len(frames)) < 0.5
        return draw & np.array([self.flippable[self.locate(g)[0]] for g in frames], bool)

    def make_batch(self, b: int) -> dict:
        rng = np.random.default_rng([self.seed, int(b), 0xA06])
        sl, every = self.shard(), self.global_frames(b)
        flips = self.flips(b, every)[sl]
        frames = [self.read_frame(g, bool(fl)) for g, fl in zip(every[sl], flips)]
        for slot, f in zip(range(sl.start, sl.stop), frames):
            if self.world > 1:  # per-frame generator: the same augmentation for any W > 1
                rng = np.random.default_rng([self.seed, int(b), 0xA06, slot])
            c = to_frame(f["coords"], f["pose"], self.frame)
            f["coords"], f["colors"] = augment_points(c, f["colors"], self.frame, self.acfg, self.color, rng)
        out = collate(frames, self.voxel, self.method)
        out["step"] = int(b)
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + wid
        while self.stop is None or b < self.stop:
            yield self.make_batch(b)
            b += nw


def collate(frames: list[dict], voxel_size: float, method: str) -> dict:
    """Quantise each frame at ``voxel_size`` (one point per voxel, ME.utils.sparse_quantize)
    and batch them for MinkowskiEngine.

    Returns ``coords`` (M, 4) int32 (batch index first), ``feats`` (M, 3) colours in
    [-0.5, 0.5], per voxel its source point's ``pixel`` (M, 2) and ``frame`` (M,) index in the
    batch, ``image_hw`` per frame; for ppnce the frames' ``features`` (list of (C, h, w)
    float16 tensors); for soft_ce / ppkd the soft labels sampled bilinearly at each voxel's
    pixel (:func:`sample_soft_labels`), ``prob`` (M, 4k) and ``index_k`` (M, 4k).
    """
    qcoords, feats, pixels, fidx, probs, idxs = [], [], [], [], [], []
    for bi, f in enumerate(frames):
        q, keep, _inv = ME.utils.sparse_quantize(
            np.ascontiguousarray(f["coords"]), return_index=True, return_inverse=True, quantization_size=voxel_size
        )
        keep = keep.numpy()
        qcoords.append(q)
        feats.append(torch.from_numpy(f["colors"][keep].astype(np.float32) / 255.0 - 0.5))
        pix = f["pixel"][keep].astype(np.int64)
        pixels.append(torch.from_numpy(pix))
        fidx.append(torch.full((len(keep),), bi, dtype=torch.long))
        if method != "ppnce":
            pr, ix = sample_soft_labels(f["prob"], f["index_k"], pix, f["image_hw"])
            probs.append(torch.from_numpy(pr))
            idxs.append(torch.from_numpy(ix))
    out = {
        "coords": ME.utils.batched_coordinates(qcoords, dtype=torch.int32),
        "feats": torch.cat(feats),
        "pixel": torch.cat(pixels),
        "frame": torch.cat(fidx),
        "image_hw": [tuple(f["image_hw"]) for f in frames],
        "ids": [(int(f["dataset"]), int(f["index"])) for f in frames],
        "flipped": [bool(f.get("flipped", False)) for f in frames],
    }
    if method == "ppnce":
        out["features"] = [torch.from_numpy(np.ascontiguousarray(f["features"])) for f in frames]
    else:
        out["prob"], out["index_k"] = torch.cat(probs), torch.cat(idxs)
    return out


def loader(
    cfg: dict,
    sources: list[Source] | None = None,
    start: int = 0,
    stop: int | None = None,
    num_workers: int | None = None,
    augment: bool = True,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`PretrainStream` (batches already collated; this rank's slice)."""
    nw = int(cfg["pretrain"].get("num_workers", 0)) if num_workers is None else int(num_workers)
    ds = PretrainStream(cfg, sources, start=start, stop=stop, augment=augment, rank=rank, world=world)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=nw, persistent_workers=False, prefetch_factor=2 if nw else None
    )


__all__ = [
    "Source",
    "open_sources",
    "to_frame",
    "mirror_frame",
    "label_cells",
    "sample_soft_labels",
    "epoch_order",
    "PretrainStream",
    "collate",
    "loader",
    "FRAMES",
    "METHODS",
]
