"""distill2d, part 2: the 2D training data: frames, their labels and the cached 3D features per pixel."""

from __future__ import annotations

import logging

import numpy as np
import torch
import zarr

from lift3d.core.config import workdir as get_workdir
from lift3d.core.errors import DistillError
from lift3d.pipeline.readers.common import to_grid
from lift3d.pipeline.readers.scannet_labels import IGNORE_INDEX, default_labels
from lift3d.train.distill2d.cache import NUM_CLASSES, Cache3D, Source

log = logging.getLogger("lift3d")


# ----------------------------------------------------------------------------- training data


class TrainData:
    """The training frames of all sources, their 2D labels and cached 3D features.

    Batch b is a pure function of (seed, b): epoch e is a seeded permutation of all frames, the
    stream of epochs is cut into batches; each frame is flipped horizontally with probability 1/2
    (seeded by (seed, b, k)); ``unpaired`` frames (a seeded ``unpaired_fraction`` of them) never
    show their 3D features to the L2 loss. The L2 loss sees at most ``l2_pixels`` covered pixels of
    a frame per step (a seeded random subset; null = all)."""

    def __init__(self, cfg: dict, sources: list[Source], caches: dict | None, section: str = "distill2d"):
        d = cfg[section]  # distill2d, or fit2d (no 3D features: caches None)
        self.sources = sources
        self.seed = int(d["seed"])
        self.batch_size = int(d["batch_size"])
        self.flip = bool(d["flip"])
        self.l2_pixels = None if d.get("l2_pixels") is None else int(d["l2_pixels"])
        self.items = [(si, int(r)) for si, s in enumerate(sources) for r in s.train_rows]
        n = len(self.items)
        n_unp = int(round(float(d.get("unpaired_fraction", 0.0)) * n))
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
                    keep = np.sort(
                        np.random.default_rng([self.seed, b, j, 0x12]).choice(len(p), self.l2_pixels, replace=False)
                    )
                    f, p, l3 = f[keep], p[keep], l3[keep]
                p = p.astype(np.int64)
                if flip:
                    p = np.stack([p[:, 0], W - 1 - p[:, 1]], 1)
                pf.append(np.full(len(p), j, np.int64))
                pp.append(p)
                pv.append(f.astype(np.float32))
                pl.append(l3.astype(np.int64))
        out = {
            "items": ks,
            "rgb": torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float(),
            "labels": torch.from_numpy(np.stack(lab)),
            "flips": flips,
            "unpaired": [bool(self.unpaired[k]) for k in ks],
        }
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
