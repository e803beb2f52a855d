"""ScanNet exported frames (ScanNet's ``reader.py`` export): one folder per scene.

``<root>/<scene>/color/N.jpg``, ``depth/N.png`` (uint16 mm), ``pose/N.txt`` (4x4
camera-to-world, ``-inf`` where tracking was lost), ``intrinsic/intrinsic_depth.txt`` and,
optionally, ``intrinsic/intrinsic_color.txt`` (4x4). Frames are numbered by N; the stored size
is the depth size (or ``image_size``). Colour is aligned onto the depth grid as in
``pipeline/scannet.py`` (through the colour intrinsics when ``intrinsic_color.txt`` exists,
otherwise by a plain resize). Splits: ``<root>/scannetv2_{train,val}.txt``.

2D labels (``labels_2d()``): ``<root>/<scene>/label-filt/<N>.png`` (ScanNet ids, the unpacked
``<scene>_2d-label-filt.zip``) through ``<root>/scannetv2-labels.combined.tsv`` and NYU40, each the
size of ``color/<N>.jpg`` (``pipeline/readers/scannet_labels.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.pipeline.readers.base import BaseReader, Frame, LabelSource, ReaderError, Skip
from lift3d.pipeline.readers.common import (
    encoded_image_hw,
    entry_image_size,
    png_size,
    read_bytes,
    read_matrix,
    read_pose,
    resize_depth,
    scale_intrinsics,
    select_split,
    shrink_interpolation,
    subfolders,
)
from lift3d.pipeline.readers.scannet import color_warp
from lift3d.pipeline.readers.scannet_labels import ScanNetExportLabels


def _k(m: np.ndarray) -> tuple[float, float, float, float]:
    return float(m[0, 0]), float(m[1, 1]), float(m[0, 2]), float(m[1, 2])


class Reader(BaseReader):
    kind = "scannet_export"
    family = "scannet"  # the same scenes as kind scannet
    extra_keys = {"color_align": str}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        if self.root is None:
            raise ReaderError(f"dataset {entry.get('name')!r}: no root given")
        self._size: tuple[int, int] | None = None
        self.color_align = entry.get("color_align") or "intrinsics"
        if self.color_align not in ("intrinsics", "resize"):
            raise ReaderError(f"dataset {entry.get('name')!r}: color_align must be 'intrinsics' or 'resize'")

    def scenes(self) -> list[str]:
        if not self.root.is_dir():
            raise ReaderError(f"{self.root}: not a folder (expected <root>/<scene>/color, depth, pose, intrinsic)")
        found = sorted(p.name for p in subfolders(self.root) if (p / "depth").is_dir() and (p / "color").is_dir())
        split = self.entry.get("split", "all")
        out = select_split(found, self.root, split, self.root / f"scannetv2_{split}.txt")
        if not out:
            raise ReaderError(f"{self.root}: no scene folders with color/ and depth/ found")
        return out

    def frame_ids(self, scene: str) -> list[int]:
        d = self.root / scene / "depth"
        if not d.is_dir():
            raise ReaderError(f"{d}: not a folder")
        return sorted(int(p.stem) for p in d.glob("*.png") if p.stem.isdigit())

    def depth_size(self, scene: str) -> tuple[int, int]:
        ids = self.frame_ids(scene)
        if not ids:
            raise ReaderError(f"{self.root / scene / 'depth'}: no N.png depth images")
        return png_size(self.root / scene / "depth" / f"{ids[0]}.png")

    def stored_size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = entry_image_size(self.entry) or self.depth_size(self.scenes()[0])
        return self._size

    def labels_2d(self) -> LabelSource | None:
        """``<scene>/label-filt/<N>.png`` per frame (ScanNet ids, through the tsv and NYU40); None
        when root is not a folder."""
        return ScanNetExportLabels(self.root) if self.root.is_dir() else None

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        sdir = self.root / scene
        out_hw = self.stored_size()
        dh, dw = self.depth_size(scene)
        kd = read_matrix(sdir / "intrinsic" / "intrinsic_depth.txt", (4, 4), "depth intrinsics")
        if not (np.isfinite(kd).all() and kd[0, 0] > 0 and kd[1, 1] > 0):
            raise ReaderError(f"{sdir / 'intrinsic' / 'intrinsic_depth.txt'}: invalid depth intrinsics {_k(kd)}")
        intr = scale_intrinsics(*_k(kd), (dh, dw), out_hw)
        kc_path = sdir / "intrinsic" / "intrinsic_color.txt"
        kc = (
            read_matrix(kc_path, (4, 4), "colour intrinsics")
            if self.color_align == "intrinsics" and kc_path.is_file()
            else None
        )
        for i in self.frame_ids(scene):
            if i % frame_skip:
                continue
            pose = read_pose(sdir / "pose" / f"{i}.txt")
            if not np.isfinite(pose).all():
                yield Skip(i, "nonfinite_pose")
                continue
            dpath = sdir / "depth" / f"{i}.png"
            depth = cv2.imdecode(np.frombuffer(read_bytes(dpath), np.uint8), cv2.IMREAD_UNCHANGED)
            if depth is None:
                yield Skip(i, "corrupt_frame")
                continue
            if depth.dtype != np.uint16 or depth.ndim != 2:
                raise ReaderError(
                    f"{dpath}: depth must be a single-channel uint16 PNG (mm), got {depth.dtype} {depth.shape}"
                )
            if depth.shape != (dh, dw):
                raise ReaderError(
                    f"{dpath}: depth is {depth.shape[1]}x{depth.shape[0]}, the scene's depth is {dw}x{dh}"
                )
            if not depth.any():
                yield Skip(i, "empty_depth")
                continue
            cpath = sdir / "color" / f"{i}.jpg"
            data = read_bytes(cpath)
            ch, cw = encoded_image_hw(data)
            ratio = min(cw / out_hw[1], ch / out_hw[0]) if ch else 1
            reduce = 4 if ratio >= 3.8 else 2 if ratio >= 1.9 else 1
            flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[reduce]
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if bgr is None:
                yield Skip(i, "corrupt_frame")
                continue
            if kc is not None:
                warp = color_warp(_k(kc), intr, reduce)
                if shrink_interpolation(bgr.shape[:2], out_hw) == cv2.INTER_AREA:
                    sy, sx = out_hw[0] / bgr.shape[0], out_hw[1] / bgr.shape[1]
                    bgr = cv2.resize(bgr, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA)
                    warp = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]]) @ np.vstack([warp, [0, 0, 1]])
                bgr = cv2.warpAffine(
                    bgr,
                    warp,
                    (out_hw[1], out_hw[0]),
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REPLICATE,
                )
            elif bgr.shape[:2] != out_hw:
                bgr = cv2.resize(bgr, (out_hw[1], out_hw[0]), interpolation=shrink_interpolation(bgr.shape[:2], out_hw))
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield Frame(i, rgb, resize_depth(depth, out_hw), intr, pose.astype(np.float32))
